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
from fusion.audit import confounder_probe
from fusion.data import (Cohort, FoldTransforms, concat_cohorts, external_split, load_cohort, load_external_cohort,
                         make_tensors, site_holdout, stratified_holdout, stratified_kfold)
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


def _check_resumable(cfg: ExperimentConfig, out: Path) -> None:
    if not (out / "config.yaml").exists():
        raise FileNotFoundError(f"cannot resume: {out} has no config.yaml (not a started run folder)")
    if (out / "config.yaml").read_text() != cfg.to_yaml():
        raise ValueError(f"cannot resume {out}: its config.yaml differs from the given config "
                         "(resume needs the identical config; start a new run folder instead)")


def _prepare_run_dir(out: Path, overwrite: bool) -> None:
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"run folder {out} is not empty; choose another --out or pass --overwrite")
    out.mkdir(parents=True, exist_ok=True)


def _train_or_resume(cfg, modalities, tf, tensors, device, progress, desc, seed, ck_path: Path, *, resume: bool,
                     train_sites=None):
    """Train one model into ``ck_path``; with ``resume`` reuse a finished checkpoint or continue a killed run."""
    state = ck_path.parent / "train_state.pt"
    if resume and ck_path.exists():
        ck = load_checkpoint(ck_path)
        if "history" in ck:
            model = build_model(cfg, tf.input_dims_, ck["modalities"], confounder_kinds=tf.confounder_kinds_,
                                omics_structure=getattr(tf, "omics_structure_", None))
            model.load_state_dict(ck["state_dict"])
            log.info("%s: finished checkpoint found, not retrained", desc)
            return model.to(device).eval(), ck["history"]
    if not resume and state.exists():
        state.unlink()
    model, history = _build_and_train(cfg, modalities, tf, tensors, device, progress, desc, seed, state_path=state,
                                      train_sites=train_sites)
    _save_model(ck_path, model, modalities, cfg, history=history)
    state.unlink(missing_ok=True)
    return model, history


def _build_and_train(cfg, modalities, tf, tensors, device, progress, desc, seed, *, state_path=None,
                     train_sites=None):
    seed_everything(seed)  # initial weights depend only on the seed, not on what ran before
    model = build_model(cfg, tf.input_dims_, modalities, confounder_kinds=tf.confounder_kinds_,
                        omics_structure=getattr(tf, "omics_structure_", None))
    if "ehr" in modalities and hasattr(model.encoders["ehr"], "set_empirical_mean"):
        model.encoders["ehr"].set_empirical_mean(torch.as_tensor(tf.ehr_.empirical_mean_, dtype=torch.float32))
    augment = {}
    for m in modalities:
        pp = cfg.modalities[m].preprocessing
        if pp is not None and pp.augment:
            from data_adapters.augment import make_augmentation

            augment[m] = make_augmentation(m, prob=pp.augment_prob, seed=seed, pet_compression=pp.pet_compression,
                                           elastic=pp.augment_elastic)
    batch_order = None
    if cfg.training.sampling == "site_stratified":
        if train_sites is None:
            raise ValueError("training.sampling: site_stratified needs the training patients' sites")
        from fusion.sampling import site_stratified_batches

        sites_arr = np.asarray(train_sites)

        def batch_order(rng):
            return site_stratified_batches(sites_arr, cfg.training.batch_size, rng)

    return train_model(model, tensors["train"], tensors["validation"], cfg.training, seed=seed, device=device,
                       progress=progress, desc=desc, lambda_max=cfg.adversary.lambda_max,
                       adversary_steps=cfg.adversary.steps if cfg.adversary.enabled else 0,
                       augment=augment or None, state_path=state_path, batch_order=batch_order)


def _configure_torch(cfg: ExperimentConfig) -> torch.device:
    if cfg.training.num_threads:
        torch.set_num_threads(cfg.training.num_threads)
    torch.use_deterministic_algorithms(True, warn_only=True)
    return resolve_device(cfg.training.device)


def _write_splits(path: Path, cohort: Cohort, splits: dict) -> None:
    split_col = np.full(len(cohort), "excluded", dtype=object)
    for k, v in splits.items():
        split_col[v] = k
    pd.DataFrame({"patient": cohort.pseudonyms, "split": split_col}).to_csv(path, index=False)


def _run_fold(cfg: ExperimentConfig, cohort: Cohort, splits: dict, out: Path, device, progress: bool,
              *, ablation: bool, resume: bool = False) -> tuple[dict, dict]:
    """Fit transforms, train (fused + ablations), evaluate one split into ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    cohort, splits, tf, tensors = _prepare_from(cfg, cohort, splits)
    log.info("split sizes %s", {k: len(v) for k, v in splits.items()})
    _write_splits(out / "splits.csv", cohort, splits)
    histories: dict = {}
    train_sites = cohort.sites[splits["train"]]
    model, histories["fused"] = _train_or_resume(cfg, cohort.modalities, tf, tensors, device, progress, "fused",
                                                 cfg.seed, out / "checkpoint.pt", resume=resume,
                                                 train_sites=train_sites)
    models = {"fused": model}
    if ablation and len(cohort.modalities) > 1:
        for m in cohort.modalities:
            models[m], histories[m] = _train_or_resume(cfg, [m], tf, tensors, device, progress, f"only {m}",
                                                       cfg.seed, out / "ablation" / m / "checkpoint.pt",
                                                       resume=resume, train_sites=train_sites)
    atomic_write_json(out / "history.json", histories)
    metrics = _evaluate(cfg, cohort, splits, tensors, models, device, out)
    return metrics, {k: v.get("report", {}) for k, v in tensors.items()}


def run_experiment(cfg: ExperimentConfig, out: str | Path, *, progress: bool = True, overwrite: bool = False,
                   resume: bool = False) -> dict:
    """Train and evaluate ``cfg`` into the run folder ``out``; return the metrics.

    ``split.scheme: holdout`` trains once (train / validation / test stratified
    by ``split.stratify``).  ``split.scheme: loso`` (leave one site out) trains
    one model per held-out site (``split.held_out_sites``, default every site)
    on the other sites, each fold in ``out/folds/<site>/``, and reports
    ``folds`` (site -> c-index of that held-out site), their mean as
    ``c_index``, and ``confounder_probe_auc`` averaged over folds.
    ``split.scheme: kfold`` does the same over ``split.n_folds`` stratified
    folds (``out/folds/fold-<k>/``).  ``split.scheme: external`` trains on the
    development cohort and tests on every patient of ``split.external``.
    ``resume=True`` continues a killed run (same config) from its last
    completed epoch, reusing finished models.
    """
    out = Path(out)
    if resume:
        _check_resumable(cfg, out)
    else:
        _prepare_run_dir(out, overwrite)
    handler = _setup_logging(out)
    try:
        t0 = time.time()
        device = _configure_torch(cfg)
        seed_everything(cfg.seed)
        atomic_write_bytes(out / "config.yaml", cfg.to_yaml().encode("utf-8"))
        cohort = load_cohort(cfg, progress=progress)
        log.info("cohort: %d patients, modalities %s", len(cohort), cohort.modalities)
        s = cfg.split
        if s.scheme in ("holdout", "external"):
            if s.scheme == "holdout":
                splits = stratified_holdout(cohort, test_fraction=s.test_fraction, val_fraction=s.val_fraction,
                                            stratify=s.stratify, seed=cfg.seed)
            else:
                ext = load_external_cohort(cfg, progress=progress)
                n_dev = len(cohort)
                splits = external_split(n_dev, len(ext), cohort, val_fraction=s.val_fraction,
                                        stratify=s.stratify, seed=cfg.seed)
                cohort = concat_cohorts(cohort, ext)
                log.info("external test cohort: %d patients", len(ext))
            metrics, transform_report = _run_fold(cfg, cohort, splits, out, device, progress,
                                                  ablation=cfg.evaluation.ablation, resume=resume)
        elif s.scheme == "kfold":
            folds = stratified_kfold(cohort, n_folds=s.n_folds, val_fraction=s.val_fraction, stratify=s.stratify,
                                     seed=cfg.seed)
            metrics, transform_report = _run_folds(cfg, cohort, out, device, progress, folds, resume=resume)
        else:
            metrics, transform_report = _run_loso(cfg, cohort, out, device, progress, resume=resume)
        metrics["train_seconds"] = round(time.time() - t0, 1)
        atomic_write_json(out / "metrics.json", _jsonable(metrics))
        if cfg.evaluation.model_card:
            _write_model_card(out, cfg, cohort, metrics)
        report = dict(cohort.report)
        report["transform"] = transform_report
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


def _aggregate_loso(cfg: ExperimentConfig, cohort: Cohort, fold_metrics: dict[str, dict]) -> dict:
    folds, probes = [], {}
    key = "site" if cfg.split.scheme == "loso" else "fold"
    for site, m in fold_metrics.items():
        folds.append({key: site, "c_index": m["c_index"], "n_test": m["n_patients"]["test"],
                      "ablation": m["ablation"], "confounder_probe_auc": m["confounder_probe_auc"]})
        for k, v in m["confounder_probe_auc"].items():
            if v is not None:
                probes.setdefault(k, []).append(v)
    cs = [f["c_index"] for f in folds if f["c_index"] is not None and not np.isnan(f["c_index"])]
    if key == "site":
        per_site = [dict(next((r for r in m.get("per_site", []) if r["group"] == site), {"group": site}))
                    for site, m in fold_metrics.items()]
    else:  # k-fold: pool each site's rows over folds is not a valid CI; report the per-fold per-site rows
        per_site = [dict(r, fold=name) for name, m in fold_metrics.items() for r in m.get("per_site", [])
                    if r["group"] != "all"]
    for f, m in zip(folds, fold_metrics.values()):
        f.update({k: m.get(k) for k in ("uno_c", "ibs", "mean_td_auc")})
    return {
        "per_site": per_site,
        "c_index": round(float(np.mean(cs)), 4) if cs else None,
        "c_index_sd": round(float(np.std(cs, ddof=1)), 4) if len(cs) > 1 else None,
        "c_index_per_site": ({f["site"]: f["c_index"] for f in folds} if key == "site" else
                             _mean_per_site(fold_metrics)),
        "folds": folds,
        "confounder_probe_auc": {k: round(float(np.mean(v)), 4) for k, v in probes.items()},
        "ablation": {name: round(float(np.mean([f["ablation"][name] for f in folds])), 4)
                     for name in folds[0]["ablation"]},
        "n_patients": {"total": len(cohort), "folds": len(folds)},
        "modalities": cohort.modalities,
        "split_scheme": cfg.split.scheme,
        "seed": cfg.seed,
    }


def _cohort_summary(cohort: Cohort, metrics: dict) -> dict:
    sites = {}
    for site in sorted(set(cohort.sites.tolist())):
        sel = cohort.sites == site
        sites[site] = {"n": int(sel.sum()), "n_events": int(cohort.event[sel].sum())}
    return {
        "n_patients": len(cohort), "n_events": int(cohort.event.sum()),
        "splits": metrics.get("n_patients", {}),
        "sites": sites,
        "modalities": {m: {"n_present": int(cohort.present[:, j].sum()),
                           "n_missing": int((~cohort.present[:, j]).sum())} for j, m in enumerate(cohort.modalities)},
    }


def _write_model_card(out: Path, cfg: ExperimentConfig, cohort: Cohort, metrics: dict) -> None:
    from fusion.model_card import write_model_card

    card_metrics = dict(metrics.get("survival") or {})
    card_metrics.update({k: metrics[k] for k in ("per_site", "confounder_probe_auc", "c_index", "ablation", "folds")
                         if k in metrics})
    card_metrics.setdefault("harrell_c", metrics.get("c_index"))
    write_model_card(out / "model_card.md", config=cfg.model_dump(mode="json"), metrics=card_metrics,
                     cohort_summary=_cohort_summary(cohort, metrics))


def load_full_cohort(cfg: ExperimentConfig, *, progress: bool = False) -> Cohort:
    """The development cohort, plus the external test cohort for ``split.scheme: external``."""
    cohort = load_cohort(cfg, progress=progress)
    if cfg.split.scheme == "external":
        cohort = concat_cohorts(cohort, load_external_cohort(cfg, progress=progress))
    return cohort


def _mean_per_site(fold_metrics: dict) -> dict:
    acc: dict = {}
    for m in fold_metrics.values():
        for site, c in m.get("c_index_per_site", {}).items():
            if c is not None:
                acc.setdefault(site, []).append(c)
    return {k: round(float(np.mean(v)), 4) for k, v in sorted(acc.items())}


def _run_loso(cfg: ExperimentConfig, cohort: Cohort, out: Path, device, progress: bool,
              resume: bool = False) -> tuple[dict, dict]:
    sites = sorted(set(cohort.sites.tolist()))
    if len(sites) < 2:
        raise ValueError(f"leave-one-site-out needs at least two sites; the manifest has only {sites}")
    held = cfg.split.held_out_sites or sites
    unknown = sorted(set(held) - set(sites))
    if unknown:
        raise ValueError(f"split.held_out_sites {unknown} are not sites of the manifest; sites: {sites}")
    folds = {site: site_holdout(cohort, site, val_fraction=cfg.split.val_fraction, stratify=cfg.split.stratify,
                                seed=cfg.seed) for site in held}
    return _run_folds(cfg, cohort, out, device, progress, folds, resume=resume)


def _run_folds(cfg: ExperimentConfig, cohort: Cohort, out: Path, device, progress: bool, folds: dict,
               *, resume: bool = False) -> tuple[dict, dict]:
    fold_metrics, reports = {}, {}
    for name, splits in folds.items():
        log.info("fold %s", name)
        fold_metrics[name], reports[name] = _run_fold(cfg, cohort, splits, out / "folds" / name, device, progress,
                                                      ablation=cfg.evaluation.ablation, resume=resume)
        atomic_write_json(out / "folds" / name / "metrics.json", _jsonable(fold_metrics[name]))
    return _aggregate_loso(cfg, cohort, fold_metrics), reports


def _save_model(path: Path, model: torch.nn.Module, modalities: list[str], cfg: ExperimentConfig, *,
                history: list | None = None) -> None:
    payload = {
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "modalities": list(modalities),
        "seed": cfg.seed,
    }
    if history is not None:
        payload["history"] = history
    save_checkpoint(path, payload)


def _evaluate(cfg, cohort: Cohort, splits, tensors, models, device, out: Path) -> dict:
    preds = {name: {k: predict(m, tensors[k], device=device) for k in splits} for name, m in models.items()}
    test = splits["test"]
    ev, tm = cohort.event[test], cohort.time[test]
    fused_test = preds["fused"]["test"]["risk"]
    ablation = {name: round(harrell_c(ev, tm, p["test"]["risk"]), 4) for name, p in preds.items()}

    # Risk groups: cut points are quantiles of the *training* patients' predicted risk.
    k = cfg.evaluation.risk_groups
    cuts = np.quantile(preds["fused"]["train"]["risk"], np.linspace(0, 1, k + 1)[1:-1])
    # Out-of-distribution flag: Mahalanobis distance of the fused embedding to the training patients'
    # embeddings (Ledoit-Wolf covariance), threshold = 99th percentile of out-of-fold training distances.
    from fusion.explain import MahalanobisOOD

    ood = MahalanobisOOD(quantile=0.99).fit(preds["fused"]["train"]["embedding"])
    rows, ood_rate = [], {}
    for split, idx in splits.items():
        r = preds["fused"][split]["risk"]
        grp = np.digitize(r, cuts)
        dist = ood.distance(preds["fused"][split]["embedding"])
        flag = dist > ood.threshold_
        ood_rate[split] = round(float(flag.mean()), 4) if len(flag) else None
        for i, ri, gi, di, fi in zip(idx, r, grp, dist, flag):
            rows.append({"patient": cohort.pseudonyms[i], "site": cohort.sites[i], "split": split,
                         "time": float(cohort.time[i]), "event": int(cohort.event[i]), "risk": float(ri),
                         "risk_group": int(gi), "ood_distance": round(float(di), 4), "ood_flag": bool(fi)})
    pred_df = pd.DataFrame(rows)
    pred_df.to_csv(out / "predictions.csv", index=False)
    test_groups = np.digitize(fused_test, cuts)
    _plot_km(ev, tm, test_groups, k, out / "km_risk_groups.png")
    # Audit: can each confounder be read off the fused embedding (probe cross-validated)?  Hold-out runs:
    # every patient.  Leave-one-site-out: the training sites' patients (train + validation), since the
    # held-out site is a category the model never saw and the test set holds that one site only.
    all_patients = cfg.split.scheme in ("holdout", "kfold")
    probe_splits = [k_ for k_ in splits if all_patients or k_ != "test"]
    order = np.concatenate([splits[k_] for k_ in probe_splits])
    emb = np.concatenate([preds["fused"][k_]["embedding"] for k_ in probe_splits])
    probe_auc, probe_r2 = {}, {}
    for c, vals in cohort.confounders.items():
        if c in cfg.adversary.continuous:
            r2 = confounder_probe(emb, pd.to_numeric(pd.Series(vals[order]), errors="coerce").to_numpy(),
                                  continuous=True, seed=cfg.seed)
            probe_r2[c] = None if r2 is None else round(r2, 4)
        else:
            auc = confounder_probe(emb, vals[order], seed=cfg.seed)
            probe_auc[c] = None if auc is None else round(auc, 4)
    # Reviewer metrics (scikit-survival): Uno's C, time-dependent AUC, IBS, calibration; per-site bootstrap CIs.
    from fusion.evaluation import per_group_table, plot_calibration, plot_td_auc, survival_metrics

    tr = splits["train"]
    surv = survival_metrics(cohort.time[tr], cohort.event[tr].astype(bool), preds["fused"]["train"]["risk"],
                            tm, ev.astype(bool), fused_test)
    per_site = per_group_table(cohort.sites[test], tm, ev.astype(bool), fused_test, n_boot=cfg.evaluation.n_boot,
                               seed=cfg.seed)
    if surv.get("calibration") and surv["calibration"].get("groups"):
        plot_calibration(surv["calibration"], out / "calibration.png")
    if surv.get("td_auc") and surv["td_auc"].get("auc"):
        plot_td_auc(surv["td_auc"], out / "td_auc.png")
    return {
        "c_index": round(harrell_c(ev, tm, fused_test), 4),
        "uno_c": surv.get("uno_c"),
        "ibs": surv.get("ibs"),
        "mean_td_auc": (surv.get("td_auc") or {}).get("mean_auc"),
        "survival": surv,
        "per_site": per_site,
        "c_index_validation": round(harrell_c(cohort.event[splits["validation"]], cohort.time[splits["validation"]],
                                              preds["fused"]["validation"]["risk"]), 4),
        "c_index_per_site": c_index_by_group(ev, tm, fused_test, cohort.sites[test]),
        "ablation": ablation,
        "n_patients": {"train": int(len(splits["train"])), "validation": int(len(splits["validation"])),
                       "test": int(len(test))},
        "n_events": {k: int(cohort.event[v].sum()) for k, v in splits.items()},
        "logrank_p_risk_groups": logrank_p(ev, tm, test_groups),
        "confounder_probe_auc": probe_auc,
        "confounder_probe_r2": probe_r2,
        "ood": {"threshold": round(float(ood.threshold_), 4), "flag_rate": ood_rate},
        "confounder_probe_patients": "all" if all_patients else "training cohort (train + validation)",
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
    """Re-evaluate a finished run from its checkpoints, config and recorded splits.

    Preprocessing statistics are refitted on the recorded training patients
    (deterministic), the saved weights are loaded with ``weights_only=True``,
    and ``metrics.json`` / ``predictions.csv`` / the KM plot are rewritten (per
    fold for leave-one-site-out runs).
    """
    run = Path(run)
    if not (run / "config.yaml").exists():
        raise FileNotFoundError(f"{run} is not a run folder: config.yaml is missing")
    cfg = load_config(run / "config.yaml")
    device = _configure_torch(cfg)
    seed_everything(cfg.seed)
    cohort = load_full_cohort(cfg, progress=progress)
    if cfg.split.scheme in ("holdout", "external"):
        metrics = _evaluate_fold(cfg, cohort, run, device)
    else:
        fold_dirs = sorted(p for p in (run / "folds").iterdir() if p.is_dir()) if (run / "folds").is_dir() else []
        if not fold_dirs:
            raise FileNotFoundError(f"{run} is a leave-one-site-out run without folds/")
        fold_metrics = {}
        for d in fold_dirs:
            fold_metrics[d.name] = _evaluate_fold(cfg, cohort, d, device)
            atomic_write_json(d / "metrics.json", _jsonable(fold_metrics[d.name]))
        metrics = _aggregate_loso(cfg, cohort, fold_metrics)
    atomic_write_json(run / "metrics.json", _jsonable(metrics))
    return metrics


class TrainedFold:
    """Everything needed to re-run a trained fold: ``cfg``, ``cohort``, ``splits`` (name -> cohort row
    indices), fitted ``transforms``, per-split ``tensors`` and ``models`` (``"fused"`` plus one per
    ablated modality, eval mode, on ``device``)."""

    def __init__(self, cfg, cohort, splits, transforms, tensors, models, device, folder):
        self.cfg, self.cohort, self.splits, self.transforms = cfg, cohort, splits, transforms
        self.tensors, self.models, self.device, self.folder = tensors, models, device, Path(folder)

    def locate(self, pseudonym: str) -> tuple[str, int]:
        """(split name, row inside that split's tensors) of a patient pseudonym."""
        pos = {p: i for i, p in enumerate(self.cohort.pseudonyms)}
        if pseudonym not in pos:
            raise KeyError(f"patient {pseudonym!r} is not in this run (use the pseudonymised ID of predictions.csv)")
        i = pos[pseudonym]
        for k, idx in self.splits.items():
            hit = np.nonzero(idx == i)[0]
            if len(hit):
                return k, int(hit[0])
        raise KeyError(f"patient {pseudonym!r} was excluded from this fold")


def fold_dirs(run: str | Path) -> list[Path]:
    """The fold folders of a run: the run itself (hold-out) or ``run/folds/<site>`` (leave one site out)."""
    run = Path(run)
    if (run / "checkpoint.pt").exists():
        return [run]
    folds = sorted(p for p in (run / "folds").iterdir() if p.is_dir()) if (run / "folds").is_dir() else []
    if not folds:
        raise FileNotFoundError(f"{run} is not a run folder: no checkpoint.pt and no folds/")
    return folds


def load_trained_fold(fold: str | Path, *, cohort: Cohort | None = None, progress: bool = False,
                      ablation: bool = True) -> TrainedFold:
    """Rebuild a trained fold from its folder (config from the fold or its run, recorded splits,
    transforms refitted on the recorded training patients, weights loaded with ``weights_only=True``)."""
    fold = Path(fold)
    cfg_path = fold / "config.yaml" if (fold / "config.yaml").exists() else fold.parent.parent / "config.yaml"
    if not cfg_path.exists():
        raise FileNotFoundError(f"{fold}: no config.yaml in the fold or its run folder")
    cfg = load_config(cfg_path)
    device = _configure_torch(cfg)
    if cohort is None:
        cohort = load_full_cohort(cfg, progress=progress)
    cohort, splits, tf, tensors = _load_fold_splits(cfg, cohort, fold)
    models = _load_models(cfg, tf, fold, device, ablation=ablation)
    return TrainedFold(cfg, cohort, splits, tf, tensors, models, device, fold)


def _load_models(cfg, tf, fold: Path, device, *, ablation: bool = True) -> dict:
    models = {}
    paths = [("fused", fold / "checkpoint.pt")]
    if ablation:
        paths += sorted((p.parent.name, p) for p in (fold / "ablation").glob("*/checkpoint.pt"))
    for name, path in paths:
        ck = load_checkpoint(path)
        model = build_model(cfg, tf.input_dims_, ck["modalities"], confounder_kinds=tf.confounder_kinds_,
                            omics_structure=getattr(tf, "omics_structure_", None))
        model.load_state_dict(ck["state_dict"])
        models[name] = model.to(device).eval()
    return models


def _load_fold_splits(cfg, cohort: Cohort, fold: Path):
    for name in ("splits.csv", "checkpoint.pt"):
        if not (fold / name).exists():
            raise FileNotFoundError(f"{fold} is not a run folder: {name} is missing")
    split_df = pd.read_csv(fold / "splits.csv")
    pos = {p: i for i, p in enumerate(cohort.pseudonyms)}
    unknown = [p for p in split_df["patient"] if p not in pos]
    if unknown:
        raise ValueError(
            f"{len(unknown)} patients of {fold / 'splits.csv'} are not in the cohort (different manifest, or a "
            "different pseudonymisation salt than the run used)"
        )
    split_df = split_df[split_df["split"] != "excluded"]
    splits = {k: np.sort(np.array([pos[p] for p in g["patient"]])) for k, g in split_df.groupby("split")}
    return _prepare_from(cfg, cohort, splits)


def _evaluate_fold(cfg: ExperimentConfig, cohort: Cohort, fold: Path, device) -> dict:
    cohort, splits, tf, tensors = _load_fold_splits(cfg, cohort, fold)
    models = _load_models(cfg, tf, fold, device)
    return _evaluate(cfg, cohort, splits, tensors, models, device, fold)


def _prepare_from(cfg, cohort, splits):
    if not cohort.event[splits["train"]].any():
        raise ValueError("every training patient is censored: the Cox model cannot be fitted")
    tf = FoldTransforms(cfg).fit(cohort, splits["train"])
    tensors = {k: make_tensors(cohort, v, tf) for k, v in splits.items()}
    return cohort, splits, tf, tensors


def summary_table(metrics: dict) -> str:
    """Plain-text summary printed by the CLI."""
    lines = ["", "Held-out patients: Harrell's c-index", "-" * 44]
    for name, c in metrics["ablation"].items():
        lines.append(f"  {name:<12} {c:6.3f}" + ("   <- fused model" if name == "fused" else ""))
    lines.append("")
    lines.append("Per site (fused):")
    for s, c in metrics["c_index_per_site"].items():
        lines.append(f"  {s:<12} {'n/a' if c is None else f'{c:6.3f}'}")
    n = metrics["n_patients"]
    lines.append("")
    if metrics.get("split_scheme") == "loso":
        lines.append(f"leave-one-site-out: {n['folds']} folds over {n['total']} patients "
                     "(c-index above = mean over held-out sites)")
    elif metrics.get("split_scheme") == "kfold":
        lines.append(f"stratified {n['folds']}-fold cross-validation over {n['total']} patients "
                     f"(c-index above = mean over folds, SD {metrics.get('c_index_sd')})")
    else:
        lines.append(f"patients: train {n['train']}, validation {n['validation']}, test {n['test']}")
    if metrics.get("confounder_probe_auc"):
        probes = ", ".join(f"{k} {'n/a' if v is None else f'{v:.2f}'}" for k, v in metrics["confounder_probe_auc"].items())
        lines.append(f"confounder probe AUC on the fused embedding (0.5 = removed): {probes}")
    if metrics.get("logrank_p_risk_groups") is not None:
        lines.append(f"log-rank p between predicted risk groups (test): {metrics['logrank_p_risk_groups']:.2g}")
    return "\n".join(lines)
