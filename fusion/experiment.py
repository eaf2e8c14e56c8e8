"""One experiment end to end: load, split, fit transforms, train, ablate, evaluate, write the run folder.

Run folder layout::

    config.yaml            resolved config (absolute paths)
    provenance.json        seeds, code version, package versions, input hashes, hashed DICOM UIDs
    splits.csv             pseudonym -> train / validation / test
    checkpoint.pt          fused model (atomic write, load with weights_only=True)
    ablation/<m>/checkpoint.pt   single-modality models trained by the same code
    history.json           per-epoch loss and validation c-index of every model
    metrics.json           c_index, c_index_per_site, ablation, n_patients, ...
    predictions.csv        pseudonym, site, split, time, event, risk, risk_group
    km_risk_groups.png     Kaplan-Meier curves of predicted risk groups (test patients)
    report.json            counts of everything excluded, missing or imputed
    log.txt                the run's log (pseudonyms and counts only)
"""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from fusion.config import ExperimentConfig, load_config
from fusion.data import Cohort, FoldTransforms, load_cohort, make_tensors, stratified_holdout
from fusion.metrics import c_index_by_group, harrell_c, logrank_p
from fusion.model import build_model
from fusion.provenance import atomic_write_bytes, atomic_write_json, load_checkpoint, provenance, save_checkpoint
from fusion.train import predict, resolve_device, seed_everything, train_model

log = logging.getLogger("radfusion")


def _setup_logging(run: Path) -> logging.Handler:
    handler = logging.FileHandler(run / "log.txt", mode="a", encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    return handler


def _prepare_run_dir(out: Path, overwrite: bool) -> None:
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"run folder {out} is not empty; choose another --out or pass --overwrite")
    out.mkdir(parents=True, exist_ok=True)


def _build_and_train(cfg, modalities, tf, tensors, device, progress, desc, seed):
    seed_everything(seed)  # initial weights depend only on the seed, not on what ran before
    model = build_model(cfg, tf.input_dims_, modalities, confounder_kinds=tf.confounder_kinds_)
    if "ehr" in modalities and hasattr(model.encoders["ehr"], "set_empirical_mean"):
        model.encoders["ehr"].set_empirical_mean(torch.as_tensor(tf.ehr_.empirical_mean_, dtype=torch.float32))
    return train_model(model, tensors["train"], tensors["validation"], cfg.training, seed=seed, device=device,
                       progress=progress, desc=desc, lambda_max=cfg.adversary.lambda_max,
                       adversary_steps=cfg.adversary.steps)


def _prepare(cfg: ExperimentConfig, progress: bool):
    cohort = load_cohort(cfg, progress=progress)
    s = cfg.split
    splits = stratified_holdout(cohort, test_fraction=s.test_fraction, val_fraction=s.val_fraction,
                                stratify=s.stratify, seed=cfg.seed)
    return _prepare_from(cfg, cohort, splits)


def _configure_torch(cfg: ExperimentConfig) -> torch.device:
    if cfg.training.num_threads:
        torch.set_num_threads(cfg.training.num_threads)
    torch.use_deterministic_algorithms(True, warn_only=True)
    return resolve_device(cfg.training.device)


def run_experiment(cfg: ExperimentConfig, out: str | Path, *, progress: bool = True, overwrite: bool = False) -> dict:
    """Train and evaluate ``cfg`` into the run folder ``out``; return the metrics."""
    out = Path(out)
    _prepare_run_dir(out, overwrite)
    handler = _setup_logging(out)
    try:
        t0 = time.time()
        device = _configure_torch(cfg)
        seed_everything(cfg.seed)
        atomic_write_bytes(out / "config.yaml", cfg.to_yaml().encode("utf-8"))
        cohort, splits, tf, tensors = _prepare(cfg, progress)
        log.info("cohort: %d patients, modalities %s; split sizes %s", len(cohort), cohort.modalities,
                 {k: len(v) for k, v in splits.items()})
        split_col = np.empty(len(cohort), dtype=object)
        for k, v in splits.items():
            split_col[v] = k
        pd.DataFrame({"patient": cohort.pseudonyms, "split": split_col}).to_csv(out / "splits.csv", index=False)

        histories: dict = {}
        model, histories["fused"] = _build_and_train(cfg, cohort.modalities, tf, tensors, device, progress,
                                                     "fused", cfg.seed)
        _save_model(out / "checkpoint.pt", model, cohort.modalities, cfg)
        models = {"fused": model}
        if cfg.evaluation.ablation and len(cohort.modalities) > 1:
            for m in cohort.modalities:
                mm, histories[m] = _build_and_train(cfg, [m], tf, tensors, device, progress, f"only {m}", cfg.seed)
                _save_model(out / "ablation" / m / "checkpoint.pt", mm, [m], cfg)
                models[m] = mm
        atomic_write_json(out / "history.json", histories)
        metrics = _evaluate(cfg, cohort, splits, tensors, models, device, out)
        metrics["train_seconds"] = round(time.time() - t0, 1)
        atomic_write_json(out / "metrics.json", metrics)
        report = dict(cohort.report)
        report["transform"] = {k: v.get("report", {}) for k, v in tensors.items()}
        atomic_write_json(out / "report.json", _jsonable(report))
        atomic_write_json(out / "provenance.json", provenance(
            seed=cfg.seed,
            input_files={k: getattr(cfg.data, k) for k in ("manifest", "expression", "gene_sets", "ehr", "clinical")},
            uid_hashes=cohort.uid_hashes,
        ))
        log.info("held-out c-index (fused): %.3f", metrics["c_index"])
        return metrics
    finally:
        log.removeHandler(handler)
        handler.close()


def _save_model(path: Path, model: torch.nn.Module, modalities: list[str], cfg: ExperimentConfig) -> None:
    save_checkpoint(path, {
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "modalities": list(modalities),
        "seed": cfg.seed,
    })


def _evaluate(cfg, cohort: Cohort, splits, tensors, models, device, out: Path) -> dict:
    preds = {name: {k: predict(m, tensors[k], device=device) for k in splits} for name, m in models.items()}
    test = splits["test"]
    ev, tm = cohort.event[test], cohort.time[test]
    fused_test = preds["fused"]["test"]["risk"]
    ablation = {name: round(harrell_c(ev, tm, p["test"]["risk"]), 4) for name, p in preds.items()}

    # Risk groups: cut points are quantiles of the *training* patients' predicted risk.
    k = cfg.evaluation.risk_groups
    cuts = np.quantile(preds["fused"]["train"]["risk"], np.linspace(0, 1, k + 1)[1:-1])
    rows = []
    for split, idx in splits.items():
        r = preds["fused"][split]["risk"]
        grp = np.digitize(r, cuts)
        for i, ri, gi in zip(idx, r, grp):
            rows.append({"patient": cohort.pseudonyms[i], "site": cohort.sites[i], "split": split,
                         "time": float(cohort.time[i]), "event": int(cohort.event[i]), "risk": float(ri),
                         "risk_group": int(gi)})
    pred_df = pd.DataFrame(rows)
    pred_df.to_csv(out / "predictions.csv", index=False)
    test_groups = np.digitize(fused_test, cuts)
    _plot_km(ev, tm, test_groups, k, out / "km_risk_groups.png")
    return {
        "c_index": round(harrell_c(ev, tm, fused_test), 4),
        "c_index_validation": round(harrell_c(cohort.event[splits["validation"]], cohort.time[splits["validation"]],
                                              preds["fused"]["validation"]["risk"]), 4),
        "c_index_per_site": c_index_by_group(ev, tm, fused_test, cohort.sites[test]),
        "ablation": ablation,
        "n_patients": {"train": int(len(splits["train"])), "validation": int(len(splits["validation"])),
                       "test": int(len(test))},
        "n_events": {k: int(cohort.event[v].sum()) for k, v in splits.items()},
        "logrank_p_risk_groups": logrank_p(ev, tm, test_groups),
        "modalities": cohort.modalities,
        "split_scheme": cfg.split.scheme,
        "seed": cfg.seed,
    }


def _plot_km(event, time, groups, k, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sksurv.nonparametric import kaplan_meier_estimator

    labels = {2: ["low risk", "high risk"], 3: ["low", "intermediate", "high"]}.get(k, [f"group {i + 1}" for i in range(k)])
    fig, ax = plt.subplots(figsize=(6, 4.5), dpi=110)
    for g in range(k):
        sel = groups == g
        if sel.sum() == 0:
            continue
        t, s = kaplan_meier_estimator(np.asarray(event[sel], dtype=bool), np.asarray(time[sel], dtype=float))
        ax.step(np.r_[0, t], np.r_[1.0, s], where="post", label=f"{labels[g]} (n={int(sel.sum())})")
    p = logrank_p(event, time, groups)
    ax.set_xlabel("time")
    ax.set_ylabel("survival probability")
    ax.set_ylim(0, 1.02)
    ax.set_title("Held-out patients by predicted risk group" + (f"\nlog-rank p = {p:.2g}" if p is not None else ""))
    ax.legend(loc="lower left")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _jsonable(obj):
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (np.floating,)):
        return float(obj)
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    return obj


def evaluate_run(run: str | Path, *, progress: bool = True) -> dict:
    """Re-evaluate a finished run from its checkpoints, config and recorded split.

    Preprocessing statistics are refitted on the recorded training patients
    (deterministic), the saved weights are loaded with ``weights_only=True``,
    and ``metrics.json`` / ``predictions.csv`` / the KM plot are rewritten.
    """
    run = Path(run)
    for name in ("config.yaml", "splits.csv", "checkpoint.pt"):
        if not (run / name).exists():
            raise FileNotFoundError(f"{run} is not a run folder: {name} is missing")
    cfg = load_config(run / "config.yaml")
    device = _configure_torch(cfg)
    seed_everything(cfg.seed)
    cohort = load_cohort(cfg, progress=progress)
    split_df = pd.read_csv(run / "splits.csv")
    pos = {p: i for i, p in enumerate(cohort.pseudonyms)}
    unknown = [p for p in split_df["patient"] if p not in pos]
    if unknown:
        raise ValueError(
            f"{len(unknown)} patients of {run / 'splits.csv'} are not in the cohort (different manifest, or a "
            "different pseudonymisation salt than the run used)"
        )
    splits = {k: np.sort(np.array([pos[p] for p in g["patient"]])) for k, g in split_df.groupby("split")}
    cohort, splits, tf, tensors = _prepare_from(cfg, cohort, splits)
    models = {}
    for name, path in [("fused", run / "checkpoint.pt")] + sorted(
        (p.parent.name, p) for p in (run / "ablation").glob("*/checkpoint.pt")
    ):
        ck = load_checkpoint(path)
        model = build_model(cfg, tf.input_dims_, ck["modalities"], confounder_kinds=tf.confounder_kinds_)
        model.load_state_dict(ck["state_dict"])
        models[name] = model.to(device).eval()
    metrics = _evaluate(cfg, cohort, splits, tensors, models, device, run)
    atomic_write_json(run / "metrics.json", metrics)
    return metrics


def _prepare_from(cfg, cohort, splits):
    if not cohort.event[splits["train"]].any():
        raise ValueError("every training patient is censored: the Cox model cannot be fitted")
    tf = FoldTransforms(cfg).fit(cohort, splits["train"])
    tensors = {k: make_tensors(cohort, v, tf) for k, v in splits.items()}
    return cohort, splits, tf, tensors


def summary_table(metrics: dict) -> str:
    """Plain-text summary printed by the CLI."""
    lines = ["", "Held-out test patients: Harrell's c-index", "-" * 44]
    for name, c in metrics["ablation"].items():
        lines.append(f"  {name:<12} {c:6.3f}" + ("   <- fused model" if name == "fused" else ""))
    lines.append("")
    lines.append("Per site (fused):")
    for s, c in metrics["c_index_per_site"].items():
        lines.append(f"  {s:<12} {'n/a' if c is None else f'{c:6.3f}'}")
    n = metrics["n_patients"]
    lines.append("")
    lines.append(f"patients: train {n['train']}, validation {n['validation']}, test {n['test']}")
    if metrics.get("logrank_p_risk_groups") is not None:
        lines.append(f"log-rank p between predicted risk groups (test): {metrics['logrank_p_risk_groups']:.2g}")
    return "\n".join(lines)
