"""Assemble a cohort from the config into tensors that follow the data contract.

Two stages:

1. :func:`load_cohort` reads every input once (manifest, preprocessed image
   volumes through the on-disk cache, raw pathway scores, EHR events, the
   clinical table).  Nothing here is fitted across patients: image
   preprocessing is per volume and ssGSEA scores are per sample.
2. :class:`FoldTransforms` fits what is estimated from data (pathway-score
   scaling, EHR standardisation and GRU-D empirical means, clinical imputation,
   scaling and one-hot categories) on the *training* patients only, then
   :func:`make_tensors` applies it to any split.
"""
from __future__ import annotations

import logging
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from data_adapters.errors import InputError
from data_adapters.manifest import IMAGE_COLUMNS, load_manifest
from data_adapters.privacy import pseudonymise
from fusion.config import IMAGE_MODALITIES, ExperimentConfig

log = logging.getLogger("radfusion")


@dataclass
class Cohort:
    """Everything read from disk, one row per manifest patient (internal IDs never leave).

    ``time`` / ``event`` hold the survival outcome; a classification cohort
    (``task_kind == "classification"``) has no survival outcome and carries
    ``time = NaN`` and ``event = False``.  ``labels`` (str, ``""`` where a
    cell is empty) is the class label of a classification task, or the
    auxiliary label of ``task.multitask``; ``None`` otherwise.
    """

    patient_ids: list[str]
    pseudonyms: list[str]
    sites: np.ndarray
    time: np.ndarray
    event: np.ndarray
    confounders: dict[str, np.ndarray]
    modalities: list[str]
    present: np.ndarray  # bool (N, M), columns = modalities
    images: dict[str, np.ndarray] = field(default_factory=dict)  # m -> float32 (N, 1, D, H, W)
    rois: dict[str, np.ndarray] = field(default_factory=dict)  # m -> bool (N, D, H, W)
    #: m -> per patient, the preprocessed grid's geometry in the scan's physical space
    #: (``spacing``, ``origin``, ``direction``; None where the image is absent)
    grids: dict[str, list] = field(default_factory=dict)
    omics_raw: pd.DataFrame | None = None  # (N, P) raw ES, NaN rows = absent
    omics_adata: object | None = None  # expression, when scores must be fitted per fold (GSVA, ComBat, genes)
    omics_gene_sets: dict | None = None
    ehr_events: pd.DataFrame | None = None
    clinical_table: pd.DataFrame | None = None
    uid_hashes: dict[str, dict[str, dict[str, str]]] = field(default_factory=dict)
    report: dict = field(default_factory=dict)
    labels: np.ndarray | None = None  # str (N,): class label (classification) or auxiliary label (multitask)
    task_kind: str = "survival"

    def __len__(self) -> int:
        return len(self.patient_ids)


def _imaging_params(cfg: ExperimentConfig, m: str):
    from data_adapters.imaging import ImagingParams

    p = cfg.modalities[m].preprocessing
    return ImagingParams(
        modality=m,
        spacing=tuple(p.spacing),
        size=tuple(p.size),
        ct_window=tuple(p.ct_window),
        pet_compression=p.pet_compression,
        pet_clip=p.pet_clip,
        pet_reference=p.pet_reference,
    )


def _load_one(args):
    cache_root, image_path, mask_path, params, roi, patient = args
    from data_adapters.imaging import VolumeCache

    pv = VolumeCache(cache_root).load_preprocessed(image_path, mask_path, params, roi=roi, patient=patient)
    return pv.image, pv.roi, pv.uid_hashes, pv.cache_hit, pv.grid


def _load_images(cfg, manifest: pd.DataFrame, m: str, cache_root: Path, progress: bool, workers: int):
    params = _imaging_params(cfg, m)
    mask_col = f"{m}_mask"
    rows = [(pid, r[m], r[mask_col] if mask_col in manifest.columns else None)
            for pid, r in manifest.iterrows() if r[m] is not None]
    roi = cfg.modalities[m].preprocessing.roi
    jobs = [(str(cache_root), img, mask, params, roi, pid) for pid, img, mask in rows]
    desc = f"preprocess {m.upper()}"
    if workers > 1 and len(jobs) > 8:
        with ProcessPoolExecutor(max_workers=workers) as ex:
            results = list(tqdm(ex.map(_load_one, jobs, chunksize=4), total=len(jobs), desc=desc, disable=not progress))
    else:
        results = [_load_one(j) for j in tqdm(jobs, desc=desc, disable=not progress)]
    return {pid: res for (pid, _, _), res in zip(rows, results)}


def load_cohort(cfg: ExperimentConfig, *, progress: bool = True, workers: int = 2) -> Cohort:
    """Read every input named by ``cfg`` (paths already resolved)."""
    d = cfg.data
    mods = sorted(cfg.modalities)
    manifest = load_manifest(
        d.manifest,
        task=cfg.task.kind,
        time_col=cfg.task.time,
        event_col=cfg.task.event,
        label_col=cfg.task.label,
        confounders=d.confounders,
        modalities=[m for m in mods if m in IMAGE_COLUMNS],
    )
    pids = manifest["patient_id"].tolist()
    n = len(pids)
    present = np.zeros((n, len(mods)), dtype=bool)
    survival = cfg.task.kind == "survival"
    cohort = Cohort(
        patient_ids=pids,
        pseudonyms=[pseudonymise(p) for p in pids],
        sites=manifest["site"].to_numpy(dtype=str),
        time=manifest[cfg.task.time].to_numpy(dtype=np.float32) if survival else np.full(n, np.nan, np.float32),
        event=manifest[cfg.task.event].to_numpy(dtype=bool) if survival else np.zeros(n, dtype=bool),
        confounders={c: manifest[c].to_numpy() for c in dict.fromkeys(["site", *d.confounders])},
        modalities=mods,
        present=present,
        task_kind=cfg.task.kind,
    )
    report: dict = {"n_patients_manifest": n, "missing_modality": {}}
    cohort.labels = _read_labels(cfg, manifest, report)
    cache_root = Path(d.cache_dir) if d.cache_dir else Path(d.manifest).parent / ".radfusion_cache"
    uid_hashes: dict[str, dict[str, dict[str, str]]] = {ps: {} for ps in cohort.pseudonyms}
    for j, m in enumerate(mods):
        if m in IMAGE_MODALITIES:
            loaded = _load_images(cfg, manifest, m, cache_root, progress, workers)
            size = cfg.modalities[m].preprocessing.size
            shape = (size[2], size[1], size[0])
            img = np.zeros((n, 1, *shape), dtype=np.float32)
            roi = np.zeros((n, *shape), dtype=bool)
            hits = 0
            grids: list[dict | None] = [None] * n
            for i, pid in enumerate(pids):
                if pid in loaded:
                    a, r, uids, hit, grids[i] = loaded[pid]
                    img[i], roi[i] = a, r
                    present[i, j] = True
                    uid_hashes[cohort.pseudonyms[i]][m] = dict(uids)
                    hits += int(hit)
            cohort.images[m], cohort.rois[m], cohort.grids[m] = img, roi, grids
            report.setdefault("image_cache_hits", {})[m] = hits
        elif m == "omics":
            mc = cfg.modalities[m]
            if mc.method == "ssgsea" and mc.combat_batch_key is None and mc.features == "pathways":
                from data_adapters.omics import pathway_scores_for_cohort

                scores, orep = pathway_scores_for_cohort(d.expression, d.gene_sets, pids, min_size=mc.min_set_size,
                                                         max_size=mc.max_set_size, backend=mc.backend)
                cohort.omics_raw = scores
                present[:, j] = ~scores.isna().all(axis=1).to_numpy()
            else:  # fitted per fold in FoldTransforms
                from data_adapters.omics import load_expression_for_cohort, read_gene_sets

                adata, orep = load_expression_for_cohort(d.expression, pids)
                if mc.combat_batch_key is not None:
                    key = mc.combat_batch_key
                    col = cohort.sites if key == "site" else cohort.confounders[key]
                    lookup = dict(zip(pids, np.asarray(col).astype(str)))
                    adata.obs[key] = [lookup[p] for p in adata.obs_names]
                cohort.omics_adata, cohort.omics_gene_sets = adata, read_gene_sets(d.gene_sets)
                have = set(adata.obs_names)
                present[:, j] = [p in have for p in pids]
            report["omics"] = orep
        elif m == "ehr":
            from data_adapters.ehr import read_ehr_events

            mc = cfg.modalities[m]
            events = read_ehr_events(d.ehr, variables=mc.variables, index_times=d.ehr_index_times,
                                     time_unit=mc.time_unit, unit_conversions=mc.unit_conversions or None)
            unknown = sorted(set(events["patient_id"]) - set(pids))
            report["ehr"] = dict(events.attrs.get("report", {}))
            report["ehr"]["n_events_of_patients_not_in_manifest"] = int(events["patient_id"].isin(unknown).sum())
            events = events[events["patient_id"].isin(set(pids))]
            cohort.ehr_events = events
            has = set(events["patient_id"])
            if mc.window is not None:
                has = set(events.loc[events["time"] <= mc.window, "patient_id"])
            present[:, j] = [p in has for p in pids]
        elif m == "clinical":
            from data_adapters.clinical import read_clinical

            mc = cfg.modalities[m]
            table = read_clinical(d.clinical, columns=mc.columns, categorical=mc.categorical)
            cohort.clinical_table = table
            present[:, j] = [p in table.index for p in pids]
            report["clinical"] = {"n_rows_not_in_manifest": int((~table.index.isin(pids)).sum())}
        report["missing_modality"][m] = int((~present[:, j]).sum())
    cohort.uid_hashes = uid_hashes
    none = ~present.any(axis=1)
    if none.any():
        i = int(np.flatnonzero(none)[0])
        raise InputError(
            "patient has none of the configured modalities", file=d.manifest, row=i + 1, patient=pids[i]
        )
    cohort.report = report
    return cohort


def _read_labels(cfg: ExperimentConfig, manifest: pd.DataFrame, report: dict) -> np.ndarray | None:
    """Class labels (classification) or auxiliary labels (``task.multitask``) as stripped strings.

    A label outside an explicit ``classes`` list is an error naming the file,
    row, patient and column.  Empty auxiliary labels are allowed (counted in
    the report); empty classification labels were already refused by
    :func:`~data_adapters.manifest.load_manifest`.
    """
    from data_adapters.manifest import check_columns_referenced

    mt = cfg.task.multitask
    if cfg.task.kind == "classification":
        col, classes, where = cfg.task.label, cfg.task.classes, "task.classes"
    elif mt is not None:
        col, classes, where = mt.aux_label, mt.classes, "task.multitask.classes"
        check_columns_referenced(manifest, [col], file=cfg.data.manifest, what="task.multitask.aux_label")
    else:
        return None
    raw = manifest[col]
    labels = np.array(["" if pd.isna(v) else str(v).strip() for v in raw], dtype=object).astype(str)
    if classes is not None:
        allowed = set(classes)
        for i, lab in enumerate(labels):
            if lab != "" and lab not in allowed:
                raise InputError(f"label {lab!r} is not one of {where} {list(classes)}", file=cfg.data.manifest,
                                 row=int(manifest["manifest_row"].iloc[i]), patient=manifest["patient_id"].iloc[i],
                                 field=col)
    if mt is not None and cfg.task.kind == "survival":
        report["n_missing_aux_label"] = int((labels == "").sum())
    return labels


def _fit_classes(labels: np.ndarray, train_idx: np.ndarray, classes, *, where: str, file) -> list[str]:
    """The class list: ``classes`` from the config, else the sorted labels of the training patients."""
    seen = sorted({str(v) for v in labels[train_idx]} - {""})
    if classes is None:
        if len(seen) < 2:
            raise InputError(f"the training patients have {len(seen)} distinct label(s) {seen}; a classifier needs "
                             "at least two classes", file=file)
        return seen
    absent = [c for c in classes if c not in seen]
    if absent:
        raise InputError(f"{where} lists {absent}, but no training patient has that label (training labels: "
                         f"{seen}); remove it from {where} or check the label column", file=file)
    return list(classes)


class FoldTransforms:
    """Everything estimated from data, fitted on training patients only.

    ``task_meta_`` holds what the task head needs from the training fold:
    ``cuts`` (discrete-time survival interval boundaries, from the training
    patients' event times), ``classes`` (classification) or ``aux_classes``
    (``task.multitask``).  It is stored in every checkpoint so a saved model
    can be rebuilt (:func:`fusion.model.build_model`).
    """

    def __init__(self, cfg: ExperimentConfig) -> None:
        self.cfg = cfg

    def _fit_omics(self, cohort: Cohort, rows: np.ndarray) -> pd.DataFrame:
        """ComBat / GSVA / gene-level features fitted on the training patients ``rows``."""
        from data_adapters.omics import PathwayScorer

        mc = self.cfg.modalities["omics"]
        a = cohort.omics_adata
        tr = a[[cohort.patient_ids[i] for i in rows]].copy()
        if mc.features == "genes":
            if mc.combat_batch_key is not None:
                from data_adapters.combat import ComBat

                self.omics_combat_ = ComBat(mc.combat_batch_key, new_batch=mc.combat_new_batch).fit(tr)
                a = self.omics_combat_.transform(a)
            X = np.asarray(a.X.toarray() if hasattr(a.X, "toarray") else a.X, dtype=np.float64)
            raw = pd.DataFrame(X, index=a.obs_names, columns=a.var_names)
            self.omics_structure_ = {"gene_sets": cohort.omics_gene_sets, "feature_names": list(a.var_names)}
        else:
            layer = "counts" if mc.kcdf == "Poisson" and "counts" in a.layers else None
            self.omics_scorer_ = PathwayScorer(
                cohort.omics_gene_sets, method=mc.method, backend=mc.backend, kcdf=mc.kcdf, min_size=mc.min_set_size,
                max_size=mc.max_set_size, combat_batch_key=mc.combat_batch_key,
                combat_kwargs={"new_batch": mc.combat_new_batch}, layer=layer).fit(tr)
            raw = self.omics_scorer_.transform(a)
            raw = raw[sorted(raw.columns)]
            self.omics_structure_ = {"gene_sets": self.omics_scorer_.gene_sets_, "feature_names": list(raw.columns)}
        return raw.reindex(cohort.patient_ids)

    def _fit_task(self, cohort: Cohort, train_idx: np.ndarray) -> dict:
        task, meta = self.cfg.task, {}
        if task.kind == "classification":
            meta["classes"] = _fit_classes(cohort.labels, train_idx, task.classes, where="task.classes",
                                           file=self.cfg.data.manifest)
            if task.class_weights is not None and len(task.class_weights) != len(meta["classes"]):
                raise InputError(f"task.class_weights has {len(task.class_weights)} values but the training fold "
                                 f"has {len(meta['classes'])} classes {meta['classes']}; give one weight per class "
                                 "(and set task.classes to fix their order)", file=self.cfg.data.manifest)
            return meta
        if task.loss == "discrete_time":
            from fusion.losses import make_time_cuts

            meta["cuts"] = [float(c) for c in make_time_cuts(cohort.time[train_idx], cohort.event[train_idx],
                                                             task.n_intervals)]
        if task.multitask is not None:
            meta["aux_classes"] = _fit_classes(cohort.labels, train_idx, task.multitask.classes,
                                               where="task.multitask.classes", file=self.cfg.data.manifest)
        return meta

    def fit(self, cohort: Cohort, train_idx: Sequence[int]) -> "FoldTransforms":
        train_idx = np.asarray(train_idx)
        tr_ids = [cohort.patient_ids[i] for i in train_idx]
        mods = cohort.modalities
        self.task_meta_ = self._fit_task(cohort, train_idx)
        self.input_dims_: dict[str, int] = {}
        for m in mods:
            if m in IMAGE_MODALITIES:
                self.input_dims_[m] = cohort.images[m].shape[1]
        if "omics" in mods:
            from sklearn.preprocessing import StandardScaler

            j = mods.index("omics")
            rows = train_idx[cohort.present[train_idx, j]]
            if len(rows) < 2:
                raise InputError("fewer than two training patients have expression data", field="omics")
            raw = cohort.omics_raw
            self.omics_structure_ = {"gene_sets": None, "feature_names": None if raw is None else list(raw.columns)}
            if cohort.omics_adata is not None:
                raw = self._fit_omics(cohort, rows)
            self.omics_raw_ = raw
            self.omics_scaler_ = StandardScaler().fit(raw.iloc[rows].to_numpy())
            self.input_dims_["omics"] = raw.shape[1]
        if "ehr" in mods:
            from data_adapters.ehr import EHRPreprocessor

            mc = self.cfg.modalities["ehr"]
            self.ehr_ = EHRPreprocessor(mc.variables, max_steps=mc.max_steps, window=mc.window, bucket=mc.bucket).fit(
                cohort.ehr_events, tr_ids
            )
            self.input_dims_["ehr"] = len(self.ehr_.variables_)
        adv = self.cfg.adversary
        self.confounder_kinds_: dict[str, int] = {}
        self.confounder_stats_: dict[str, object] = {}
        if adv.enabled:
            for c in adv.confounders:
                vals = cohort.confounders[c]
                if c in adv.continuous:
                    x = pd.to_numeric(pd.Series(vals[train_idx]), errors="coerce").to_numpy(dtype=float)
                    if np.isnan(x).any():
                        raise InputError("non-numeric value in a continuous confounder", file=self.cfg.data.manifest,
                                         field=c)
                    self.confounder_stats_[c] = (float(x.mean()), float(x.std()) or 1.0)
                    self.confounder_kinds_[c] = 0
                else:
                    cats = sorted(set(map(str, vals[train_idx])))
                    if len(cats) < 2:
                        raise InputError(f"confounder has a single value ({cats[0]!r}) among training patients; "
                                         "an adversary needs at least two", file=self.cfg.data.manifest, field=c)
                    self.confounder_stats_[c] = cats
                    self.confounder_kinds_[c] = len(cats)
        if "clinical" in mods:
            from data_adapters.clinical import ClinicalPreprocessor

            t = cohort.clinical_table
            self.clinical_ = ClinicalPreprocessor(t.attrs["numeric"], t.attrs["categorical"]).fit(t, tr_ids)
            self.input_dims_["clinical"] = len(self.clinical_.feature_names_)
        return self


def make_tensors(cohort: Cohort, idx: Sequence[int], tf: FoldTransforms) -> dict:
    """Tensors of the data contract for the patients ``idx`` (whole split, CPU)."""
    idx = np.asarray(idx)
    ids = [cohort.patient_ids[i] for i in idx]
    out: dict = {
        "modalities": list(cohort.modalities),
        "present": torch.from_numpy(cohort.present[idx].copy()),
        "patient_id": [cohort.pseudonyms[i] for i in idx],
        "report": {},
    }
    if cohort.task_kind == "survival":
        out["time"] = torch.from_numpy(cohort.time[idx].astype(np.float32))
        out["event"] = torch.from_numpy(cohort.event[idx].copy())
        strata = list(tf.cfg.task.strata)
        if strata:  # stratified Cox: one code per level combination, the same in every split
            raw = [cohort.sites if c == "site" else cohort.confounders[c] for c in strata]
            for c, v in zip(strata, raw):
                bad = pd.isna(pd.Series(v)).to_numpy() | (pd.Series(v).astype(str).str.strip() == "").to_numpy()
                if bad.any():
                    i = int(np.flatnonzero(bad)[0])
                    raise InputError(f"task.strata column {c!r} is empty for {int(bad.sum())} patient(s); give every "
                                     "patient a stratum or drop the column from task.strata",
                                     file=tf.cfg.data.manifest, patient=cohort.patient_ids[i], field=c)
            cols = [np.asarray(v).astype(str) for v in raw]
            codes = pd.factorize(pd.Series(["\x1f".join(v) for v in zip(*cols)]))[0]
            out["strata"] = torch.from_numpy(codes[idx].astype(np.int64))
    classes = tf.task_meta_.get("classes", tf.task_meta_.get("aux_classes"))
    if classes is not None and cohort.labels is not None:
        pos = {c: i for i, c in enumerate(classes)}  # empty or unseen label -> -1 (ignored by the loss)
        out["label"] = torch.tensor([pos.get(str(v), -1) for v in cohort.labels[idx]], dtype=torch.long)
    if tf.confounder_kinds_:
        conf = {}
        for c, kind in tf.confounder_kinds_.items():
            vals = cohort.confounders[c][idx]
            if kind == 0:
                mu, sd = tf.confounder_stats_[c]
                x = pd.to_numeric(pd.Series(vals), errors="coerce").to_numpy(dtype=float)
                conf[c] = torch.from_numpy(((x - mu) / sd).astype(np.float32))
            else:
                pos = {v: i for i, v in enumerate(tf.confounder_stats_[c])}
                conf[c] = torch.tensor([pos.get(str(v), -1) for v in vals], dtype=torch.long)
        out["confounders"] = conf
    for m in cohort.modalities:
        if m in IMAGE_MODALITIES:
            out[m] = torch.from_numpy(cohort.images[m][idx])
        elif m == "omics":
            x = tf.omics_raw_.iloc[idx].to_numpy()
            x = np.where(np.isnan(x), 0.0, x)
            out[m] = torch.from_numpy(tf.omics_scaler_.transform(x).astype(np.float32))
        elif m == "ehr":
            arrs = tf.ehr_.transform(cohort.ehr_events, ids)
            out[m] = {k: torch.from_numpy(np.asarray(arrs[k])) for k in ("values", "mask", "delta", "times", "lengths")}
            out["report"]["ehr"] = dict(getattr(tf.ehr_, "report_", {}))
        elif m == "clinical":
            x, rep = tf.clinical_.transform(cohort.clinical_table, ids)
            out[m] = torch.from_numpy(x)
            out["report"]["clinical"] = rep
    return out


def take(tensors: dict, idx) -> dict:
    """Sub-batch of a tensors dict by row indices (LongTensor or array)."""
    idx_t = torch.as_tensor(np.asarray(idx), dtype=torch.long)

    def sel(v):
        if isinstance(v, dict):
            return {k: sel(x) for k, x in v.items()}
        if isinstance(v, torch.Tensor):
            return v.index_select(0, idx_t)
        return v

    out = {}
    for k, v in tensors.items():
        if k in ("modalities", "report"):
            out[k] = v
        elif k == "patient_id":
            out[k] = [v[i] for i in idx_t.tolist()]
        else:
            out[k] = sel(v)
    return out


def to_device(batch: dict, device: torch.device) -> dict:
    def mv(v):
        if isinstance(v, dict):
            return {k: mv(x) for k, x in v.items()}
        if isinstance(v, torch.Tensor):
            return v.to(device, non_blocking=True)
        return v

    return {k: (v if k in ("modalities", "patient_id", "report") else mv(v)) for k, v in batch.items()}


def load_external_cohort(cfg: ExperimentConfig, *, progress: bool = True) -> Cohort:
    """Load ``split.external`` with the development config's modalities and preprocessing."""
    ext = cfg.split.external
    data = cfg.data.model_copy(update={
        "manifest": ext.manifest,
        "expression": ext.expression or cfg.data.expression,
        "ehr": ext.ehr or cfg.data.ehr,
        "clinical": ext.clinical or cfg.data.clinical,
        "ehr_index_times": ext.ehr_index_times or cfg.data.ehr_index_times,
    })
    return load_cohort(cfg.model_copy(update={"data": data}), progress=progress)


def concat_cohorts(a: Cohort, b: Cohort, *, b_name: str = "external") -> Cohort:
    """One cohort with the patients of ``a`` then ``b`` (same modalities and confounders)."""
    if a.modalities != b.modalities:
        raise ValueError(f"{b_name} cohort has modalities {b.modalities}, the development cohort {a.modalities}")
    if set(a.confounders) != set(b.confounders):
        raise ValueError(f"{b_name} cohort has confounders {sorted(b.confounders)}, the development cohort "
                         f"{sorted(a.confounders)}")
    dup = sorted(set(a.patient_ids) & set(b.patient_ids))
    if dup:
        raise ValueError(f"{len(dup)} patient(s) are in both the development and the {b_name} manifest "
                         f"(first: pseudonym {pseudonymise(dup[0])}); an external test set must be disjoint")
    out = Cohort(
        patient_ids=a.patient_ids + b.patient_ids,
        pseudonyms=a.pseudonyms + b.pseudonyms,
        sites=np.concatenate([a.sites, b.sites]),
        time=np.concatenate([a.time, b.time]),
        event=np.concatenate([a.event, b.event]),
        confounders={c: np.concatenate([a.confounders[c], b.confounders[c]]) for c in a.confounders},
        modalities=list(a.modalities),
        present=np.vstack([a.present, b.present]),
        images={m: np.concatenate([a.images[m], b.images[m]]) for m in a.images},
        rois={m: np.concatenate([a.rois[m], b.rois[m]]) for m in a.rois},
        grids={m: list(a.grids.get(m, [None] * len(a))) + list(b.grids.get(m, [None] * len(b))) for m in a.rois},
        omics_gene_sets=a.omics_gene_sets,
        uid_hashes={**a.uid_hashes, **b.uid_hashes},
        report={"development": a.report, b_name: b.report},
        labels=None if a.labels is None else np.concatenate([a.labels, b.labels]),
        task_kind=a.task_kind,
    )
    if a.omics_raw is not None:
        out.omics_raw = pd.concat([a.omics_raw, b.omics_raw.reindex(columns=a.omics_raw.columns)])
    if a.omics_adata is not None:
        import anndata as ad

        out.omics_adata = ad.concat([a.omics_adata, b.omics_adata], join="inner", merge="same")
    if a.ehr_events is not None:
        out.ehr_events = pd.concat([a.ehr_events, b.ehr_events]) if b.ehr_events is not None else a.ehr_events
    if a.clinical_table is not None:
        # each table holds every row of its file (the two cohorts may share one file): keep one row per patient,
        # the development table's for development patients and the external table's for external ones
        x, y = a.clinical_table, b.clinical_table
        x = x[x.index.isin(a.patient_ids)]
        y = y[y.index.isin(b.patient_ids)] if y is not None else y
        out.clinical_table = pd.concat([x, y]) if y is not None else x
    return out


def external_split(n_dev: int, n_ext: int, cohort_dev: Cohort, *, val_fraction: float, stratify: Sequence[str],
                   seed: int) -> dict[str, np.ndarray]:
    """Train / validation from the development patients ``0..n_dev-1``; test = every external patient."""
    from sklearn.model_selection import train_test_split

    rest = np.arange(n_dev)
    strata = _strata(cohort_dev, stratify)
    n_val = max(1, int(round(val_fraction * n_dev)))
    train, val = train_test_split(rest, test_size=n_val, random_state=seed + 1, stratify=_safe(strata, rest))
    return {"train": np.sort(train), "validation": np.sort(val), "test": np.arange(n_dev, n_dev + n_ext)}


def stratified_kfold(cohort: Cohort, *, n_folds: int, val_fraction: float, stratify: Sequence[str],
                     seed: int) -> dict[str, dict[str, np.ndarray]]:
    """``fold-1`` .. ``fold-k``: test = one stratified fold, train / validation from the others."""
    from sklearn.model_selection import StratifiedKFold, train_test_split

    n = len(cohort)
    if n < 2 * n_folds:
        raise ValueError(f"split.n_folds {n_folds} is too many for {n} patients")
    strata = _strata(cohort, stratify)
    counts = pd.Series(strata).value_counts()
    strata = np.where(pd.Series(strata).map(counts).to_numpy() < n_folds, "__small__", strata)
    if pd.Series(strata).value_counts().min() < n_folds:
        strata = np.zeros(n, dtype=str)
    folds = {}
    skf = StratifiedKFold(n_splits=n_folds, shuffle=True, random_state=seed)
    for k, (rest, test) in enumerate(skf.split(np.zeros(n), strata)):
        n_val = max(1, int(round(val_fraction * len(rest))))
        train, val = train_test_split(rest, test_size=n_val, random_state=seed + 1, stratify=_safe(strata, rest))
        folds[f"fold-{k + 1}"] = {"train": np.sort(train), "validation": np.sort(val), "test": np.sort(test)}
    return folds


def stratified_holdout(cohort: Cohort, *, test_fraction: float, val_fraction: float, stratify: Sequence[str],
                       seed: int) -> dict[str, np.ndarray]:
    """Split patient indices into train / validation / test, stratified by ``stratify``.

    ``stratify`` names ``site``, ``event`` or confounder columns.  Strata
    smaller than 3 patients are merged into one stratum so each stratum can
    contribute to every split.
    """
    from sklearn.model_selection import train_test_split

    n = len(cohort)
    strata = _strata(cohort, stratify)
    counts = pd.Series(strata).value_counts()
    strata = np.where(pd.Series(strata).map(counts).to_numpy() < 3, "__small__", strata)
    idx = np.arange(n)
    n_test = max(1, int(round(test_fraction * n)))
    n_val = max(1, int(round(val_fraction * n)))
    if n - n_test - n_val < 2:
        raise ValueError(f"cohort of {n} patients is too small for the requested test/validation fractions")
    rest, test = train_test_split(idx, test_size=n_test, random_state=seed, stratify=_safe(strata, idx))
    train, val = train_test_split(rest, test_size=n_val, random_state=seed + 1, stratify=_safe(strata, rest))
    return {"train": np.sort(train), "validation": np.sort(val), "test": np.sort(test)}


def _strata(cohort: Cohort, stratify: Sequence[str]) -> np.ndarray:
    """One stratum label per patient from ``site``, ``event``, ``label`` and confounder columns.

    ``label`` is the class label (classification) or the auxiliary label
    (``task.multitask``).  A classification cohort has no event, so ``event``
    (in the default ``[site, event]``) stratifies by the class label there:
    both mean "stratify by the outcome".
    """
    keys = []
    for s in stratify:
        if s == "site":
            keys.append(cohort.sites.astype(str))
        elif s == "label" or (s == "event" and cohort.task_kind == "classification"):
            if cohort.labels is None:
                raise ValueError("split.stratify: 'label' needs task.kind 'classification' or task.multitask")
            keys.append(np.asarray(cohort.labels).astype(str))
        elif s == "event":
            keys.append(cohort.event.astype(int).astype(str))
        elif s in cohort.confounders:
            keys.append(cohort.confounders[s].astype(str))
        else:
            raise ValueError(f"split.stratify: unknown column {s!r}; use 'site', 'event', 'label' or a confounder")
    return np.array(["|".join(t) for t in zip(*keys)]) if keys else np.zeros(len(cohort), dtype=str)


def _safe(strata: np.ndarray, idx: np.ndarray):
    s = strata[idx]
    counts = pd.Series(s).value_counts()
    return s if counts.min() >= 2 else None


def site_holdout(cohort: Cohort, site: str, *, val_fraction: float, stratify: Sequence[str],
                 seed: int) -> dict[str, np.ndarray]:
    """Test = every patient of ``site``; train / validation from the other sites, stratified."""
    from sklearn.model_selection import train_test_split

    test = np.flatnonzero(cohort.sites == site)
    rest = np.flatnonzero(cohort.sites != site)
    if len(test) == 0:
        raise ValueError(f"site {site!r} has no patients")
    strata = _strata(cohort, stratify)
    n_val = max(1, int(round(val_fraction * len(rest))))
    train, val = train_test_split(rest, test_size=n_val, random_state=seed + 1, stratify=_safe(strata, rest))
    return {"train": np.sort(train), "validation": np.sort(val), "test": np.sort(test)}
