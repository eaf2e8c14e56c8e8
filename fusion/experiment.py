"""One experiment end to end: load, split, fit transforms, train, ablate, evaluate, write the run folder.

Run folder layout::

    config.yaml            resolved config (absolute paths)
    provenance.json        seeds, code version, package versions, input hashes, hashed DICOM UIDs
    splits.csv             pseudonym -> train / validation / test
    checkpoint.pt          fused model (atomic write, load with weights_only=True)
    ablation/<m>/checkpoint.pt   single-modality models trained by the same code
    history.json           per-epoch loss and validation c-index of every model
    metrics.json           c_index, c_index_per_site, ablation, n_patients, ...
                           (classification: auc, auc_per_site, ablation = test AUC, classification)
    predictions.csv        pseudonym, site, split, time, event, risk, risk_group
                           (classification: label, predicted, proba_<class> instead of time ... risk_group)
    km_risk_groups.png     Kaplan-Meier curves of predicted risk groups (test patients; survival only)
    calibration.png, decision_curve.png   classification: reliability diagram, net benefit (two classes)
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
                                omics_structure=getattr(tf, "omics_structure_", None),
                                task_meta=ck.get("task_meta") or tf.task_meta_)
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
                        omics_structure=getattr(tf, "omics_structure_", None), task_meta=tf.task_meta_)
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
                       adversary_steps=(cfg.adversary.steps if cfg.adversary.enabled
                                        and cfg.adversary.mode != "closed_form" else 0),
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
    if cfg.fusion.name == "late_stacking":
        models = _train_stacked(cfg, cohort, splits, tf, tensors, device, progress, out, histories, resume=resume)
        atomic_write_json(out / "history.json", histories)
        metrics = _evaluate(cfg, cohort, splits, tensors, models, device, out)
        return metrics, {k: v.get("report", {}) for k, v in tensors.items()}
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


def _single_modality_cfg(cfg: ExperimentConfig) -> ExperimentConfig:
    return cfg.model_copy(update={"fusion": cfg.fusion.model_copy(update={"name": "concat", "kwargs": {}})})


def _train_stacked(cfg, cohort, splits, tf, tensors, device, progress, out: Path, histories: dict, *,
                   resume: bool) -> dict:
    """Late fusion by stacking (``fusion.name: late_stacking``).

    1. One single-modality model per modality on the whole training split
       (these are also the ablation models, ``ablation/<m>/``).
    2. Out-of-fold training predictions: ``fusion.kwargs.inner_folds``
       (default 3) stratified folds of the training split; per fold and
       modality a model trained on the other folds (early stopping on the
       same validation split) predicts the held-out fold.
    3. A penalised Cox model (:class:`fusion.stacking.CoxStacker`,
       ``fusion.kwargs.penalizer``, default 0.1) on the out-of-fold risks
       (missing modality = NaN, with indicators) gives the weights.  Every
       model's risks (fold or final) are first standardised with the mean and
       SD of its own predictions on the patients it was trained on, so the
       fold models' pooled risks and the final models' risks share one scale;
       ``checkpoint.pt`` holds the stacked model (step-1 models + weights).
    """
    from fusion.data import take
    from fusion.stacking import CoxStacker, StackedLateFusion, oof_folds, own_training_scale

    scfg = _single_modality_cfg(cfg)
    k = int(cfg.fusion.kwargs.get("inner_folds", 3))
    penalizer = float(cfg.fusion.kwargs.get("penalizer", 0.1))
    train = tensors["train"]
    n = train["time"].shape[0]
    present = train["present"].numpy()
    names = list(train["modalities"])
    singles = {}
    for m in cohort.modalities:
        singles[m], histories[m] = _train_or_resume(scfg, [m], tf, tensors, device, progress, f"only {m}", cfg.seed,
                                                    out / "ablation" / m / "checkpoint.pt", resume=resume)
    oof = np.full((n, len(cohort.modalities)), np.nan)
    strata = train["event"].numpy().astype(int)
    for f, (tr_idx, te_idx) in enumerate(oof_folds(n, k, strata=strata, seed=cfg.seed)):
        inner = {"train": take(train, tr_idx), "validation": tensors["validation"]}
        for j, m in enumerate(cohort.modalities):
            mm, _ = _build_and_train(scfg, [m], tf, inner, device, progress, f"oof {f + 1}/{k} {m}", cfg.seed)
            # A Cox risk is identified up to its offset and each fold's model has its own scale:
            # put every fold's risks on the scale of that model's own training predictions
            # before they are pooled (see fusion.stacking.own_training_scale).
            col = names.index(m)
            mu, sd = own_training_scale(predict(mm, inner["train"], device=device)["risk"], present[tr_idx, col])
            r = predict(mm, take(train, te_idx), device=device)["risk"]
            has = present[te_idx, col]
            oof[te_idx[has], j] = (r[has] - mu) / sd
    stacker = CoxStacker(penalizer=penalizer).fit(oof, train["time"].numpy(), train["event"].numpy())
    own = [own_training_scale(predict(singles[m], train, device=device)["risk"], present[:, names.index(m)])
           for m in cohort.modalities]
    fused = StackedLateFusion.from_stacker(singles, stacker, risk_mean=[o[0] for o in own],
                                           risk_scale=[o[1] for o in own]).to(device).eval()
    _save_model(out / "checkpoint.pt", fused, cohort.modalities, cfg)
    atomic_write_json(out / "stacker.json", {
        "modalities": cohort.modalities, "coef": stacker.coef_.tolist(), "missing_coef": stacker.missing_coef_.tolist(),
        "inner_folds": k, "penalizer": penalizer,
        # each final single-modality model's risk is standardised by its own training predictions first
        "own_training_mean": [o[0] for o in own], "own_training_sd": [o[1] for o in own],
    })
    histories["fused"] = []
    log.info("late_stacking weights %s", dict(zip(cohort.modalities, np.round(stacker.coef_, 3).tolist())))
    return {"fused": fused, **singles}


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
    threads = torch.get_num_threads()
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
        log.info("held-out %s (fused): %s", *_headline(metrics))
        return metrics
    finally:
        torch.set_num_threads(threads)  # a config's training.num_threads holds for this run only
        log.removeHandler(handler)
        handler.close()


def _aggregate_loso(cfg: ExperimentConfig, cohort: Cohort, fold_metrics: dict[str, dict]) -> dict:
    """Fold metrics -> run metrics (leave-one-site-out, k-fold): the mean and SD over folds of the main
    metric (``c_index`` for survival, ``auc`` for classification), per-site values, probes, ablations."""
    folds, probes = [], {}
    key = "site" if cfg.split.scheme == "loso" else "fold"
    clf = cfg.task.kind == "classification"
    score = "auc" if clf else "c_index"
    for site, m in fold_metrics.items():
        folds.append({key: site, score: m[score], "n_test": m["n_patients"]["test"],
                      "ablation": m["ablation"], "confounder_probe_auc": m["confounder_probe_auc"]})
        for k, v in m["confounder_probe_auc"].items():
            if v is not None:
                probes.setdefault(k, []).append(v)
    cs = [f[score] for f in folds if f[score] is not None and not np.isnan(f[score])]
    if key == "site":
        per_site = [dict(next((r for r in m.get("per_site", []) if r["group"] == site), {"group": site}))
                    for site, m in fold_metrics.items()]
    else:  # k-fold: pool each site's rows over folds is not a valid CI; report the per-fold per-site rows
        per_site = [dict(r, fold=name) for name, m in fold_metrics.items() for r in m.get("per_site", [])
                    if r["group"] != "all"]
    for f, m in zip(folds, fold_metrics.values()):
        f.update({k: m.get(k) for k in (("auc_validation",) if clf else ("uno_c", "ibs", "mean_td_auc"))})
        if clf:
            f.update({k: (m.get("classification") or {}).get(k) for k in ("brier", "log_loss", "accuracy")})
    if clf:  # a fold whose test set lacks a class has no AUC (None): average the others
        ablation = {}
        for name in folds[0]["ablation"]:
            vals = [f["ablation"][name] for f in folds if f["ablation"].get(name) is not None]
            ablation[name] = round(float(np.mean(vals)), 4) if vals else None
    else:
        ablation = {name: round(float(np.mean([f["ablation"][name] for f in folds])), 4)
                    for name in folds[0]["ablation"]}
    return ({"task": "classification"} if clf else {}) | {
        "per_site": per_site,
        score: round(float(np.mean(cs)), 4) if cs else None,
        f"{score}_sd": round(float(np.std(cs, ddof=1)), 4) if len(cs) > 1 else None,
        f"{score}_per_site": ({f["site"]: f[score] for f in folds} if key == "site" else
                              _mean_per_site(fold_metrics, key=f"{score}_per_site")),
        "folds": folds,
        "confounder_probe_auc": {k: round(float(np.mean(v)), 4) for k, v in probes.items()},
        "ablation": ablation,
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

    card_metrics = dict(metrics.get("survival") or metrics.get("classification") or {})
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


def _mean_per_site(fold_metrics: dict, key: str = "c_index_per_site") -> dict:
    acc: dict = {}
    for m in fold_metrics.values():
        for site, c in m.get(key, {}).items():
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
        "task_meta": dict(getattr(model, "task_meta", {}) or {}),  # cuts / classes to rebuild the head
    }
    if history is not None:
        payload["history"] = history
    save_checkpoint(path, payload)


def _evaluate(cfg, cohort: Cohort, splits, tensors, models, device, out: Path) -> dict:
    if cfg.task.kind == "classification":
        return _evaluate_classification(cfg, cohort, splits, tensors, models, device, out)
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
    probe_auc, probe_r2, all_patients = _confounder_probes(cfg, cohort, splits, preds["fused"])
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
    extra = _multitask_metrics(cfg, models["fused"], tensors, preds["fused"]) if cfg.task.multitask else {}
    return extra | {
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


def _confounder_probes(cfg, cohort: Cohort, splits: dict, fused_preds: dict) -> tuple[dict, dict, bool]:
    """Cross-validated linear probes of every confounder on the fused embedding.

    Hold-out and k-fold runs probe every patient; leave-one-site-out and
    external runs the training cohort (train + validation), since the held-out
    site is a category the model never saw.  Returns (AUCs, R^2s, all_patients).
    """
    all_patients = cfg.split.scheme in ("holdout", "kfold")
    probe_splits = [k_ for k_ in splits if all_patients or k_ != "test"]
    order = np.concatenate([splits[k_] for k_ in probe_splits])
    emb = np.concatenate([fused_preds[k_]["embedding"] for k_ in probe_splits])
    probe_auc, probe_r2 = {}, {}
    for c, vals in cohort.confounders.items():
        if c in cfg.adversary.continuous:
            r2 = confounder_probe(emb, pd.to_numeric(pd.Series(vals[order]), errors="coerce").to_numpy(),
                                  continuous=True, seed=cfg.seed)
            probe_r2[c] = None if r2 is None else round(r2, 4)
        else:
            auc = confounder_probe(emb, vals[order], seed=cfg.seed)
            probe_auc[c] = None if auc is None else round(auc, 4)
    return probe_auc, probe_r2, all_patients


def _proba64(p: np.ndarray) -> np.ndarray:
    """Float64 class probabilities with rows renormalised (float32 softmax rows may miss 1 by ~1e-7)."""
    p = np.asarray(p, dtype=np.float64)
    return p / p.sum(axis=1, keepdims=True)


def _test_auc(y: np.ndarray, proba: np.ndarray) -> float | None:
    """ROC AUC (binary) or macro one-vs-rest ROC AUC (multiclass, scikit-learn's ``roc_auc_score``) of class
    indices ``y`` (``-1`` = unknown class, skipped); ``None`` when a class is absent, as in
    :func:`fusion.evaluation.classification_metrics`."""
    from fusion.train import macro_auc

    y = np.asarray(y).reshape(-1)
    keep = y >= 0
    counts = np.bincount(y[keep], minlength=proba.shape[1]) if keep.any() else np.zeros(proba.shape[1], int)
    if (counts == 0).any():
        return None
    auc = macro_auc(y[keep], proba[keep])
    return None if np.isnan(auc) else round(float(auc), 4)


def _auc_table(groups: np.ndarray, y: np.ndarray, proba: np.ndarray, *, n_boot: int, seed: int) -> list[dict]:
    """ROC AUC with a percentile bootstrap CI (:func:`fusion.evaluation.bootstrap_ci`) per group, plus ``all``."""
    from fusion.evaluation import bootstrap_ci

    rows = []
    names = sorted({str(g) for g in groups.tolist()})
    for name, sel in [(g, groups.astype(str) == g) for g in names] + [("all", np.ones(len(y), dtype=bool))]:
        ys, ps = y[sel], proba[sel]
        auc = _test_auc(ys, ps)
        lo = hi = None
        used = 0
        if auc is not None and n_boot > 0:
            ci = bootstrap_ci(_test_auc, ys, ps, n_boot=n_boot, seed=seed)
            lo, hi, used = ci.lo, ci.hi, ci.n_used
        rows.append({"group": name, "n": int(sel.sum()),
                     "class_counts": np.bincount(ys[ys >= 0], minlength=proba.shape[1]).tolist(), "auc": auc,
                     "ci_low": None if lo is None else round(lo, 4), "ci_high": None if hi is None else round(hi, 4),
                     "n_boot_used": used})
    return rows


def _classification_report(y: np.ndarray, proba: np.ndarray, classes: list[str]) -> dict | None:
    """:func:`fusion.evaluation.classification_metrics` on the patients with a known class (None if none)."""
    from fusion.evaluation import classification_metrics

    keep = y >= 0
    if not keep.any():
        return None
    return classification_metrics(np.asarray(classes, dtype=object)[y[keep]], proba[keep], classes=classes)


def _multitask_metrics(cfg, model, tensors, fused_preds) -> dict:
    """``task.multitask``: the auxiliary label's test metrics and the learned uncertainty weights."""
    classes = list(model.aux_classes)
    y = tensors["test"]["label"].numpy()
    cm = _classification_report(y, _proba64(fused_preds["test"]["aux_proba"]), classes)
    s = model.uncertainty.log_vars.detach().cpu().double().numpy()
    return {"multitask": {
        "aux_label": cfg.task.multitask.aux_label, "classes": classes,
        "auc": None if cm is None else cm["auc"], "classification": cm,
        "n_test_unlabelled": int((y < 0).sum()),
        "task_weights": {"survival": round(float(np.exp(-s[0])), 6), "aux_label": round(float(np.exp(-s[1])), 6)},
        "log_variances": {"survival": round(float(s[0]), 6), "aux_label": round(float(s[1]), 6)},
        "weighting": "homoscedastic uncertainty (Kendall, Gal & Cipolla 2018): sum_i exp(-s_i) L_i + s_i",
    }}


def _evaluate_classification(cfg, cohort: Cohort, splits, tensors, models, device, out: Path) -> dict:
    """:func:`_evaluate` for ``task.kind: classification``.

    Test-split ROC AUC (binary) / macro one-vs-rest ROC AUC (multiclass),
    Brier score, log loss, accuracy, calibration (ECE) and, for two classes,
    the decision curve (:func:`fusion.evaluation.classification_metrics`);
    per-site AUC with bootstrap CIs; ``calibration.png``,
    ``decision_curve.png`` (binary); ``predictions.csv`` with ``label``,
    ``predicted`` and ``proba_<class>`` columns; the same confounder probes
    and out-of-distribution flags as survival.  Patients whose label is not
    one of the model's classes (possible when ``task.classes`` is not set and
    a class is missing from the training fold) are left out of the metrics
    and counted in ``n_unknown_class``.
    """
    from fusion.evaluation import plot_calibration, plot_decision_curve

    preds = {name: {k: predict(m, tensors[k], device=device) for k in splits} for name, m in models.items()}
    classes = list(models["fused"].classes)
    y = {k: tensors[k]["label"].numpy() for k in splits}
    proba = {k: _proba64(preds["fused"][k]["proba"]) for k in splits}
    test = splits["test"]
    ablation = {name: _test_auc(y["test"], _proba64(p["test"]["proba"])) for name, p in preds.items()}
    cm = _classification_report(y["test"], proba["test"], classes)
    if cm is not None:
        plot_calibration(cm["calibration"], out / "calibration.png")
        if cm.get("decision_curve"):
            plot_decision_curve(cm["decision_curve"], out / "decision_curve.png")
    per_site = _auc_table(cohort.sites[test], y["test"], proba["test"], n_boot=cfg.evaluation.n_boot, seed=cfg.seed)

    # Out-of-distribution flag, as for survival: Mahalanobis distance of the fused embedding to the training
    # patients' embeddings, threshold = 99th percentile of out-of-fold training distances.
    from fusion.explain import MahalanobisOOD

    ood = MahalanobisOOD(quantile=0.99).fit(preds["fused"]["train"]["embedding"])
    rows, ood_rate = [], {}
    for split, idx in splits.items():
        p = proba[split]
        dist = ood.distance(preds["fused"][split]["embedding"])
        flag = dist > ood.threshold_
        ood_rate[split] = round(float(flag.mean()), 4) if len(flag) else None
        for r, i in enumerate(idx):
            row = {"patient": cohort.pseudonyms[i], "site": cohort.sites[i], "split": split,
                   "label": str(cohort.labels[i]), "predicted": classes[int(p[r].argmax())]}
            row.update({f"proba_{c}": round(float(p[r, j]), 6) for j, c in enumerate(classes)})
            row.update({"ood_distance": round(float(dist[r]), 4), "ood_flag": bool(flag[r])})
            rows.append(row)
    pd.DataFrame(rows).to_csv(out / "predictions.csv", index=False)
    # Confounder probes on the fused embedding (as for survival).
    probe_auc, probe_r2, all_patients = _confounder_probes(cfg, cohort, splits, preds["fused"])
    return {
        "task": "classification",
        "auc": ablation["fused"],
        "auc_validation": _test_auc(y["validation"], proba["validation"]),
        "auc_per_site": {r["group"]: r["auc"] for r in per_site if r["group"] != "all"},
        "per_site": per_site,
        "ablation": ablation,
        "classification": cm,
        "classes": classes,
        "n_patients": {"train": int(len(splits["train"])), "validation": int(len(splits["validation"])),
                       "test": int(len(test))},
        "n_per_class": {k: dict(zip(classes, np.bincount(v[v >= 0], minlength=len(classes)).tolist()))
                        for k, v in y.items()},
        "n_unknown_class": {k: int((v < 0).sum()) for k, v in y.items()},
        "confounder_probe_auc": probe_auc,
        "confounder_probe_r2": probe_r2,
        "ood": {"threshold": round(float(ood.threshold_), 4), "flag_rate": ood_rate},
        "confounder_probe_patients": "all" if all_patients else "training cohort (train + validation)",
        "modalities": cohort.modalities,
        "split_scheme": cfg.split.scheme,
        "seed": cfg.seed,
    }


def _headline(metrics: dict) -> tuple[str, str]:
    """(metric name, formatted value) of a run's main held-out metric, for the log."""
    name, key = ("ROC AUC", "auc") if metrics.get("task") == "classification" else ("c-index", "c_index")
    v = metrics.get(key)
    return name, "n/a" if v is None else f"{v:.3f}"


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
    if cfg.fusion.name == "late_stacking":
        from fusion.stacking import StackedLateFusion

        ck = load_checkpoint(fold / "checkpoint.pt")
        scfg = _single_modality_cfg(cfg)
        singles = {m: build_model(scfg, tf.input_dims_, [m], confounder_kinds=tf.confounder_kinds_,
                                  omics_structure=getattr(tf, "omics_structure_", None),
                                  task_meta=ck.get("task_meta") or tf.task_meta_) for m in ck["modalities"]}
        fused = StackedLateFusion(singles)
        fused.load_state_dict(ck["state_dict"])
        fused = fused.to(device).eval()
        return {"fused": fused, **({m: fused.models[m] for m in fused.modalities} if ablation else {})}
    models = {}
    paths = [("fused", fold / "checkpoint.pt")]
    if ablation:
        paths += sorted((p.parent.name, p) for p in (fold / "ablation").glob("*/checkpoint.pt"))
    for name, path in paths:
        ck = load_checkpoint(path)
        model = build_model(cfg, tf.input_dims_, ck["modalities"], confounder_kinds=tf.confounder_kinds_,
                            omics_structure=getattr(tf, "omics_structure_", None),
                            task_meta=ck.get("task_meta") or tf.task_meta_)
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
    if cfg.task.kind == "survival" and not cohort.event[splits["train"]].any():
        raise ValueError("every training patient is censored: the survival model cannot be fitted")
    tf = FoldTransforms(cfg).fit(cohort, splits["train"])
    tensors = {k: make_tensors(cohort, v, tf) for k, v in splits.items()}
    return cohort, splits, tf, tensors


def summary_table(metrics: dict) -> str:
    """Plain-text summary printed by the CLI (ROC AUC instead of the c-index for classification)."""
    clf = metrics.get("task") == "classification"
    title, short, score = ("ROC AUC", "AUC", "auc") if clf else ("Harrell's c-index", "c-index", "c_index")
    lines = ["", f"Held-out patients: {title}", "-" * 44]
    for name, c in metrics["ablation"].items():
        lines.append(f"  {name:<12} {'   n/a' if c is None else f'{c:6.3f}'}"
                     + ("   <- fused model" if name == "fused" else ""))
    lines.append("")
    lines.append("Per site (fused):")
    for s, c in metrics[f"{score}_per_site"].items():
        lines.append(f"  {s:<12} {'n/a' if c is None else f'{c:6.3f}'}")
    n = metrics["n_patients"]
    lines.append("")
    if metrics.get("split_scheme") == "loso":
        lines.append(f"leave-one-site-out: {n['folds']} folds over {n['total']} patients "
                     f"({short} above = mean over held-out sites)")
    elif metrics.get("split_scheme") == "kfold":
        lines.append(f"stratified {n['folds']}-fold cross-validation over {n['total']} patients "
                     f"({short} above = mean over folds, SD {metrics.get(f'{score}_sd')})")
    else:
        lines.append(f"patients: train {n['train']}, validation {n['validation']}, test {n['test']}")
    if metrics.get("confounder_probe_auc"):
        probes = ", ".join(f"{k} {'n/a' if v is None else f'{v:.2f}'}" for k, v in metrics["confounder_probe_auc"].items())
        lines.append(f"confounder probe AUC on the fused embedding (0.5 = removed): {probes}")
    if metrics.get("logrank_p_risk_groups") is not None:
        lines.append(f"log-rank p between predicted risk groups (test): {metrics['logrank_p_risk_groups']:.2g}")
    mt = metrics.get("multitask")
    if mt:
        auc = "n/a" if mt.get("auc") is None else f"{mt['auc']:.3f}"
        w = mt.get("task_weights", {})
        lines.append(f"auxiliary label '{mt.get('aux_label')}': test ROC AUC {auc}; uncertainty weights "
                     + ", ".join(f"{k} {v:.3g}" for k, v in w.items()))
    return "\n".join(lines)
