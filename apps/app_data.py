"""Loading, shaping and plotting helpers for the Streamlit app (``apps/streamlit_app.py``).

Everything here is plain Python (pandas, numpy, matplotlib): no Streamlit
import, so each function has ordinary unit tests and the app script stays a
thin layout layer.  Heavy modules (torch through :mod:`fusion`, scikit-survival)
are imported inside the functions that need them.

Privacy: the app only ever sees pseudonyms (``P-xxxxxxxxxx``).  Internal study
patient IDs live inside :class:`fusion.data.Cohort` and are used here only to
map rows; every table returned for display is stripped of them
(:func:`ehr_timeline`).

A *run folder* is what ``radfusion train --out RUN`` writes (and ``radfusion
demo --out DIR`` writes as ``DIR/run``); see :mod:`fusion.experiment`.  A
hold-out run has ``checkpoint.pt``, ``predictions.csv`` and ``metrics.json`` at
its top; a leave-one-site-out run has ``folds/<site>/`` with those files and a
top-level ``metrics.json`` with ``folds``.
"""
from __future__ import annotations

import json
import math
import os
import re
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

__all__ = [
    "MODALITY_NAMES",
    "ExplanationUnavailable",
    "RunFolderError",
    "RunInfo",
    "ablation_table",
    "as_float",
    "calibration_table",
    "compute_explanation",
    "default_slice",
    "ehr_timeline",
    "explanation_dir",
    "feature_shap_table",
    "find_run_fold_dirs",
    "home_rows",
    "km_curves",
    "km_reference",
    "load_explanation",
    "load_gradcam",
    "load_run",
    "modality_label",
    "modality_shapley_table",
    "ood_status",
    "pathway_table",
    "patient_choices",
    "patient_record",
    "probe_table",
    "per_site_table",
    "risk_group_label",
    "risk_percentile",
    "survival_at",
    "survival_summary",
]

#: Display names of the modalities (clinician-facing).
MODALITY_NAMES = {
    "ct": "CT",
    "pet": "PET",
    "mri": "MRI",
    "omics": "Omics (pathway scores)",
    "ehr": "EHR time series",
    "clinical": "Clinical variables",
    "fused": "Fused model (all modalities)",
}

IMAGE_MODALITIES = ("ct", "pet", "mri")

_PSEUDONYM = re.compile(r"^P-[0-9A-Za-z]{4,64}$")
_SPLIT_ORDER = {"test": 0, "validation": 1, "train": 2}


class RunFolderError(ValueError):
    """The folder given to the app is not a (complete) radfusion run folder."""


class ExplanationUnavailable(RuntimeError):
    """Patient explanations cannot be computed (``fusion.explain`` missing or failing)."""


_SHORT_NAMES = {"omics": "Omics", "ehr": "EHR", "clinical": "Clinical", "fused": "Fused"}


def modality_label(m: str, *, short: bool = False) -> str:
    """Display name of a modality key (``"pet"`` -> ``"PET"``; ``short`` for table cells)."""
    if short and m in _SHORT_NAMES:
        return _SHORT_NAMES[m]
    return MODALITY_NAMES.get(m, m)


def risk_group_label(group: Any, k: int) -> str:
    """Plain-language name of risk group ``group`` out of ``k`` (0 = lowest predicted risk)."""
    if group is None or (isinstance(group, float) and math.isnan(group)):
        return "n/a"
    g = int(group)
    names = {2: ["low risk", "high risk"], 3: ["low risk", "intermediate risk", "high risk"]}.get(k)
    if names is not None and 0 <= g < len(names):
        return names[g]
    return f"group {g + 1} of {k}"


# ---------------------------------------------------------------------------------------------- run folder


@dataclass
class RunInfo:
    """A loaded run folder.

    Attributes
    ----------
    path : Path
        The run folder.
    metrics : dict
        The top-level ``metrics.json``.
    scheme : str
        ``"holdout"`` or ``"loso"``.
    folds : list of Path
        Fold folders (the run itself for hold-out runs).
    predictions : pandas.DataFrame
        ``predictions.csv`` of every fold, plus a ``fold`` column (fold folder name).
    risk_groups : int
        Number of predicted risk groups (``evaluation.risk_groups``).
    fold_metrics : dict
        fold name -> that fold's ``metrics.json`` (leave-one-site-out runs).
    """

    path: Path
    metrics: dict
    scheme: str
    folds: list[Path]
    predictions: pd.DataFrame
    risk_groups: int = 2
    fold_metrics: dict = field(default_factory=dict)

    @property
    def modalities(self) -> list[str]:
        return list(self.metrics.get("modalities") or [m for m in self.metrics.get("ablation", {}) if m != "fused"])


def _read_json(path: Path, what: str) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise RunFolderError(f"{path} is not valid JSON ({err.msg} at line {err.lineno}); the {what} file is "
                             "damaged: re-run `radfusion evaluate --run RUN`") from None
    if not isinstance(data, dict):
        raise RunFolderError(f"{path}: expected a JSON object in the {what} file")
    return data


def find_run_fold_dirs(run: str | Path) -> list[Path]:
    """Fold folders of a run, like :func:`fusion.experiment.fold_dirs` but without importing torch."""
    run = Path(run)
    if (run / "checkpoint.pt").exists():
        return [run]
    folds = sorted(p for p in (run / "folds").iterdir() if p.is_dir()) if (run / "folds").is_dir() else []
    return [p for p in folds if (p / "predictions.csv").exists()]


_NOT_A_RUN_HINT = ("Point the app at the folder written by `radfusion train --out RUN` (or `DIR/run` after "
                   "`radfusion demo --out DIR`).")


def load_run(run: str | Path | None) -> RunInfo:
    """Read and check a run folder's metrics and predictions.

    Raises
    ------
    RunFolderError
        With a message naming the folder and the missing or damaged file.
    """
    if run is None or str(run).strip() == "":
        raise RunFolderError("no run folder given. Start the app with `radfusion app --run RUN` (or set the "
                             "RADFUSION_RUN environment variable). " + _NOT_A_RUN_HINT)
    path = Path(run).expanduser()
    if not path.exists():
        raise RunFolderError(f"run folder {path} does not exist. " + _NOT_A_RUN_HINT)
    if not path.is_dir():
        raise RunFolderError(f"{path} is a file, not a run folder. " + _NOT_A_RUN_HINT)
    if not (path / "metrics.json").is_file():
        sub = path / "run"
        extra = (f" It contains a `run` folder: did you mean {sub}?"
                 if (sub / "metrics.json").is_file() else "")
        raise RunFolderError(f"{path} is not a radfusion run folder: metrics.json is missing.{extra} "
                             + _NOT_A_RUN_HINT)
    metrics = _read_json(path / "metrics.json", "metrics")
    folds = find_run_fold_dirs(path)
    if not folds:
        raise RunFolderError(f"{path} has metrics.json but no trained model (no checkpoint.pt and no "
                             "folds/<site>/ with predictions.csv): training did not finish. " + _NOT_A_RUN_HINT)
    frames, fold_metrics = [], {}
    for f in folds:
        p = f / "predictions.csv"
        if not p.is_file():
            raise RunFolderError(f"{f} has no predictions.csv: training did not finish; re-run "
                                 "`radfusion evaluate --run RUN`")
        df = pd.read_csv(p)
        missing = [c for c in ("patient", "split", "risk") if c not in df.columns]
        if missing:
            raise RunFolderError(f"{p} lacks the column(s) {missing}; expected patient, site, split, time, event, "
                                 "risk, risk_group")
        df["fold"] = f.name
        frames.append(df)
        if f != path and (f / "metrics.json").is_file():
            fold_metrics[f.name] = _read_json(f / "metrics.json", "fold metrics")
    preds = pd.concat(frames, ignore_index=True)
    bad = ~preds["patient"].astype(str).str.match(_PSEUDONYM)
    if bad.any():
        raise RunFolderError(f"{int(bad.sum())} row(s) of predictions.csv do not hold a pseudonym (P-...): the app "
                             "shows pseudonymised runs only")
    scheme = str(metrics.get("split_scheme") or ("loso" if "folds" in metrics else "holdout"))
    return RunInfo(path=path, metrics=metrics, scheme=scheme, folds=folds, predictions=preds,
                   risk_groups=_risk_group_count(path, preds), fold_metrics=fold_metrics)


def _risk_group_count(run: Path, preds: pd.DataFrame) -> int:
    try:
        import yaml

        cfg = yaml.safe_load((run / "config.yaml").read_text(encoding="utf-8")) or {}
        k = int(cfg.get("evaluation", {}).get("risk_groups"))
        if k >= 1:
            return k
    except Exception:  # noqa: BLE001 - config is optional here; fall back to the data
        pass
    if "risk_group" in preds and preds["risk_group"].notna().any():
        return int(preds["risk_group"].max()) + 1
    return 2


# ---------------------------------------------------------------------------------------------- patients


def patient_choices(preds: pd.DataFrame) -> list[str]:
    """Pseudonyms for the patient picker: held-out (test) patients first, then validation, then training."""
    rec = home_rows(preds)
    rec = rec.assign(_o=rec["split"].map(_SPLIT_ORDER).fillna(3)).sort_values(["_o", "patient"])
    return rec["patient"].tolist()


def home_rows(preds: pd.DataFrame) -> pd.DataFrame:
    """One row per patient: the fold where the patient was held out (test), else validation, else training."""
    p = preds.assign(_o=preds["split"].map(_SPLIT_ORDER).fillna(3))
    return p.sort_values(["_o", "fold"]).drop_duplicates("patient").drop(columns="_o")


def patient_record(run: RunInfo, pseudonym: str) -> dict:
    """The patient's predictions row (fold where held out, else any) with its risk percentile among training
    patients of that fold.

    Raises
    ------
    KeyError
        If the pseudonym is not in the run.
    """
    rows = home_rows(run.predictions)
    hit = rows[rows["patient"] == pseudonym]
    if hit.empty:
        raise KeyError(f"patient {pseudonym!r} is not in this run (pick a pseudonymised ID from predictions.csv)")
    rec = hit.iloc[0].to_dict()
    rec["risk_percentile"] = risk_percentile(run.predictions, rec["fold"], float(rec["risk"]))
    rec["fold_dir"] = next(f for f in run.folds if f.name == rec["fold"])
    return rec


def risk_percentile(preds: pd.DataFrame, fold: str, risk: float) -> float:
    """Percentage of the fold's training patients whose predicted risk is at most ``risk`` (0-100)."""
    tr = preds[(preds["fold"] == fold) & (preds["split"] == "train")]["risk"].to_numpy(dtype=float)
    if len(tr) == 0:
        return float("nan")
    return float(100.0 * np.mean(tr <= risk))


def ood_status(explanation: dict | None, record: dict | None = None) -> dict | None:
    """``{"flag", "distance", "threshold"}`` from the explanation, else from predictions.csv's
    ``ood_flag`` / ``ood_distance`` columns, else ``None`` (unknown)."""
    if explanation and isinstance(explanation.get("ood"), dict) and "flag" in explanation["ood"]:
        o = explanation["ood"]
        return {"flag": bool(o["flag"]), "distance": as_float(o.get("distance")), "threshold": as_float(o.get("threshold")),
                "method": o.get("method") if isinstance(o.get("method"), str) else None}
    if record and "ood_flag" in record and not _isnan(record["ood_flag"]):
        flag = record["ood_flag"]
        flag = flag if isinstance(flag, bool) else str(flag).strip().lower() in ("1", "true", "1.0", "yes")
        return {"flag": bool(flag), "distance": as_float(record.get("ood_distance")), "threshold": None, "method": None}
    return None


def as_float(v) -> float | None:
    """``float(v)``, or ``None`` for missing, non-numeric or NaN values."""
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(f) else f


def _isnan(v) -> bool:
    return v is None or (isinstance(v, float) and math.isnan(v))


# ---------------------------------------------------------------------------------------------- cohort tables


def km_curves(preds: pd.DataFrame, k: int, *, split: str = "test") -> list[dict]:
    """Kaplan-Meier curves of the predicted risk groups of ``split`` patients.

    Returns
    -------
    list of dict
        One per non-empty group: ``group``, ``label``, ``n``, ``n_events``, ``time`` and ``survival`` (numpy
        arrays starting at time 0, survival 1, for a step plot with ``where="post"``).
    """
    from sksurv.nonparametric import kaplan_meier_estimator

    sub = preds[preds["split"] == split].dropna(subset=["time", "event", "risk_group"])
    out = []
    for g, d in sorted(sub.groupby("risk_group"), key=lambda x: x[0]):
        ev = d["event"].astype(int).to_numpy().astype(bool)
        t, s = kaplan_meier_estimator(ev, d["time"].to_numpy(dtype=float))
        out.append({"group": int(g), "label": risk_group_label(g, k), "n": int(len(d)), "n_events": int(ev.sum()),
                    "time": np.r_[0.0, t], "survival": np.r_[1.0, s]})
    return out


def km_reference(preds: pd.DataFrame, fold: str, *, split: str = "train") -> dict | None:
    """Kaplan-Meier curve of all ``split`` patients of ``fold`` (``time``, ``survival``, ``n``), or ``None``."""
    from sksurv.nonparametric import kaplan_meier_estimator

    d = preds[(preds["fold"] == fold) & (preds["split"] == split)].dropna(subset=["time", "event"])
    if len(d) < 2:
        return None
    t, s = kaplan_meier_estimator(d["event"].astype(int).to_numpy().astype(bool), d["time"].to_numpy(dtype=float))
    return {"time": np.r_[0.0, t], "survival": np.r_[1.0, s], "n": int(len(d))}


def per_site_table(metrics: dict, preds: pd.DataFrame | None = None) -> pd.DataFrame:
    """Per-site discrimination of the fused model on held-out patients.

    Uses ``metrics["per_site"]`` (rows with ``group, n, n_events, harrell_c, ci_low, ci_high``) when present,
    else ``c_index_per_site`` with patient and event counts from the test rows of ``preds``.
    """
    rows = metrics.get("per_site")
    if isinstance(rows, list) and rows and isinstance(rows[0], dict):
        df = pd.DataFrame(rows)
        names = df["group"] if "group" in df else df["site"]
        out = pd.DataFrame({"Site": ["All sites" if str(g) == "all" else str(g) for g in names]})
        if "n" in df:
            out["Patients"] = df["n"].astype("Int64")
        if "n_events" in df:
            out["Events"] = df["n_events"].astype("Int64")
        out["C-index"] = pd.to_numeric(df.get("harrell_c", df.get("c_index")), errors="coerce")
        if "ci_low" in df and "ci_high" in df:
            lo, hi = pd.to_numeric(df["ci_low"], errors="coerce"), pd.to_numeric(df["ci_high"], errors="coerce")
            out["95% CI"] = [("n/a" if (pd.isna(a) or pd.isna(b)) else f"{a:.2f} – {b:.2f}") for a, b in zip(lo, hi)]
        return out.reset_index(drop=True)
    per = metrics.get("c_index_per_site") or {}
    out = pd.DataFrame({"Site": [str(s) for s in per], "C-index": [as_float(v) for v in per.values()]})
    if preds is not None and len(out) and {"site", "split"} <= set(preds.columns):
        test = preds[preds["split"] == "test"]
        n = test.groupby("site").size()
        out.insert(1, "Patients", [int(n.get(s, 0)) for s in out["Site"]])
        if "event" in test:
            e = test.groupby("site")["event"].sum()
            out.insert(2, "Events", [int(e.get(s, 0)) for s in out["Site"]])
    return out


def ablation_table(metrics: dict) -> pd.DataFrame:
    """Held-out c-index of the fused model and of each single-modality model (same code, same split), fused
    first; ``Difference vs fused`` is text (``"+0.012"``, ``"reference"`` for the fused model)."""
    abl = metrics.get("ablation") or {}
    fused = as_float(abl.get("fused"))
    rows = []
    for name, c in abl.items():
        c = as_float(c)
        rows.append({"Model": modality_label(name) if name == "fused" else f"{modality_label(name)} only",
                     "C-index": c,
                     "Difference vs fused": None if (c is None or fused is None or name == "fused") else c - fused})
    df = pd.DataFrame(rows, columns=["Model", "C-index", "Difference vs fused"])
    if len(df):
        df["_f"] = [0 if n == "fused" else 1 for n in abl]
        df = df.sort_values(["_f", "C-index"], ascending=[True, False]).drop(columns="_f").reset_index(drop=True)
        df["Difference vs fused"] = ["reference" if m == modality_label("fused") else
                                     ("n/a" if as_float(d) is None else f"{d:+.3f}")
                                     for d, m in zip(df["Difference vs fused"], df["Model"])]
    return df


def probe_table(metrics: dict) -> pd.DataFrame:
    """Confounder probe AUCs on the fused embedding, with a plain-language reading."""
    rows = []
    for name, auc in (metrics.get("confounder_probe_auc") or {}).items():
        a = as_float(auc)
        if a is None:
            reading = "not computable"
        elif a < 0.6:
            reading = "not recoverable (good)"
        elif a < 0.75:
            reading = "partly recoverable"
        else:
            reading = "recoverable: the model may use it"
        rows.append({"Confounder": str(name), "Probe AUC": a, "Reading": reading})
    for name, r2 in (metrics.get("confounder_probe_r2") or {}).items():
        v = as_float(r2)
        rows.append({"Confounder": f"{name} (continuous, R²)", "Probe AUC": v,
                     "Reading": "n/a" if v is None else ("not recoverable (good)" if v < 0.1 else "recoverable")})
    return pd.DataFrame(rows, columns=["Confounder", "Probe AUC", "Reading"])


_PRED_KEYS = ("predicted", "pred", "mean_predicted", "predicted_risk", "predicted_event_probability",
              "predicted_survival", "expected", "prob_pred", "mean_pred")
_OBS_KEYS = ("observed", "obs", "observed_event_probability", "observed_survival", "observed_km", "km",
             "prob_true", "mean_obs", "actual")


def _pick(d: dict, keys) -> Any:
    for k in keys:
        if k in d:
            return d[k]
    return None


def calibration_table(metrics: dict) -> pd.DataFrame | None:
    """Calibration points (``predicted``, ``observed`` and, when given, ``time``, ``n``, ``ci_low``, ``ci_high``)
    from ``metrics["survival"]["calibration"]``; ``None`` when absent or in an unrecognised layout.

    Accepted layouts: a dict of equal-length lists, a list of row dicts, a dict with ``bins``/``groups``/``rows``
    holding either, or a dict keyed by evaluation time holding any of these.
    """
    surv = metrics.get("survival")
    cal = surv.get("calibration") if isinstance(surv, dict) else None
    if cal is None:
        return None
    try:
        return _calibration_frame(cal)
    except (TypeError, ValueError, KeyError):
        return None


def _calibration_frame(cal, time=None) -> pd.DataFrame | None:
    if isinstance(cal, list):
        if not cal or not isinstance(cal[0], dict):
            return None
        df = pd.DataFrame(cal)
        return _normalise_cal(df, time)
    if not isinstance(cal, dict):
        return None
    for k in ("bins", "groups", "rows", "points", "deciles"):
        if k in cal:
            t = cal.get("time", cal.get("horizon", time))
            return _calibration_frame(cal[k], t)
    if _pick(cal, _PRED_KEYS) is not None and _pick(cal, _OBS_KEYS) is not None:
        lens = {len(v) for v in cal.values() if isinstance(v, list)}
        if len(lens) == 1:
            df = pd.DataFrame({k: v for k, v in cal.items() if isinstance(v, list)})
            t = cal.get("time", cal.get("horizon", time))
            return _normalise_cal(df, t if not isinstance(t, list) else None)
        return None
    frames = []
    for key, sub in cal.items():  # keyed by time horizon
        t = as_float(key)
        f = _calibration_frame(sub, t if t is not None else key)
        if f is not None:
            frames.append(f)
    return pd.concat(frames, ignore_index=True) if frames else None


def _normalise_cal(df: pd.DataFrame, time) -> pd.DataFrame | None:
    pc = next((k for k in _PRED_KEYS if k in df), None)
    oc = next((k for k in _OBS_KEYS if k in df), None)
    if pc is None or oc is None:
        return None
    out = pd.DataFrame({"predicted": pd.to_numeric(df[pc], errors="coerce"),
                        "observed": pd.to_numeric(df[oc], errors="coerce")})
    for src, dst in (("n", "n"), ("ci_low", "ci_low"), ("ci_high", "ci_high"), ("time", "time")):
        if src in df:
            out[dst] = df[src].to_numpy()
    if "time" not in out and time is not None:
        out["time"] = time
    return out.dropna(subset=["predicted", "observed"]).reset_index(drop=True)


def survival_summary(metrics: dict) -> dict:
    """Scalar survival metrics and the time-dependent AUC from ``metrics["survival"]``
    (:func:`fusion.evaluation.survival_metrics`); absent keys give ``None``.

    Returns
    -------
    dict
        ``ibs``, ``uno_c``, ``td_auc`` (DataFrame ``time, auc`` or ``None``), ``td_auc_mean``, and from the
        calibration: ``horizon``, ``ici``, ``oe_ratio``, ``slope``.
    """
    surv = metrics.get("survival") if isinstance(metrics.get("survival"), dict) else {}
    out: dict = {"ibs": None, "uno_c": as_float(surv.get("uno_c")), "td_auc": None, "td_auc_mean": None,
                 "horizon": None, "ici": None, "oe_ratio": None, "slope": None}
    ibs = surv.get("ibs")
    out["ibs"] = as_float(ibs.get("value", ibs.get("ibs")) if isinstance(ibs, dict) else ibs)
    td = surv.get("td_auc")
    if isinstance(td, dict):
        times = _pick(td, ("times", "time", "t"))
        aucs = _pick(td, ("auc", "aucs", "values", "td_auc"))
        if isinstance(times, list) and isinstance(aucs, list) and len(times) == len(aucs):
            out["td_auc"] = pd.DataFrame({"time": pd.to_numeric(pd.Series(times, dtype=object), errors="coerce"),
                                          "auc": pd.to_numeric(pd.Series(aucs, dtype=object), errors="coerce")})
        out["td_auc_mean"] = as_float(_pick(td, ("mean_auc", "mean", "integrated")))
    elif isinstance(td, list) and td and isinstance(td[0], dict):
        df = pd.DataFrame(td)
        if {"time", "auc"} <= set(df.columns):
            out["td_auc"] = df[["time", "auc"]].apply(pd.to_numeric, errors="coerce")
    else:
        out["td_auc_mean"] = as_float(td)
    if out["td_auc_mean"] is None and out["td_auc"] is not None and out["td_auc"]["auc"].notna().any():
        out["td_auc_mean"] = float(out["td_auc"]["auc"].mean())
    cal = surv.get("calibration")
    if isinstance(cal, dict):
        for k in ("horizon", "ici", "oe_ratio", "slope"):
            out[k] = as_float(cal.get(k))
    return out


# ---------------------------------------------------------------------------------------------- explanations


def explanation_dir(run: str | Path, pseudonym: str) -> Path:
    """Where the explanation of ``pseudonym`` is cached: ``RUN/explanations/<pseudonym>/``, or a per-user
    temporary folder when the run folder is read-only.

    Raises
    ------
    ValueError
        If ``pseudonym`` is not of the form ``P-xxxx`` (it becomes a folder name).
    """
    if not _PSEUDONYM.match(str(pseudonym)):
        raise ValueError(f"{pseudonym!r} is not a pseudonymised patient ID (expected P-xxxxxxxxxx)")
    run = Path(run)
    d = run / "explanations" / pseudonym
    if d.exists() or os.access(run, os.W_OK):
        return d
    base = Path(tempfile.gettempdir()) / f"radfusion-app-{os.getuid() if hasattr(os, 'getuid') else 'u'}"
    return base / (re.sub(r"[^0-9A-Za-z_.-]", "_", str(run.resolve()))[-120:]) / pseudonym


def load_explanation(run: str | Path, pseudonym: str) -> dict | None:
    """The cached ``explanation.json`` of a patient, or ``None`` when absent or unreadable."""
    p = explanation_dir(run, pseudonym) / "explanation.json"
    if not p.is_file():
        return None
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None
    return data if isinstance(data, dict) and data.get("patient") == pseudonym else None


_EXPLAIN_LOCK = threading.Lock()  # one explanation at a time: Grad-CAM hooks the shared model


def compute_explanation(run: str | Path, pseudonym: str, *, trained_fold=None) -> dict:
    """Compute (and cache on disk) the explanation of one patient with :mod:`fusion.explain`.

    ``explain_run(run, pseudonym, out_dir)`` chooses the fold and loads it; when the caller already holds that
    fold (``trained_fold``, a :class:`fusion.experiment.TrainedFold` loaded with ``ablation=False``) it is reused
    through ``explain_patient`` instead of being loaded a second time.

    Raises
    ------
    ExplanationUnavailable
        When :mod:`fusion.explain` is not installed or fails; the message is safe to show (no patient data).
    """
    cached = load_explanation(run, pseudonym)
    if cached is not None:
        return cached
    try:
        from fusion import explain as fx
    except ImportError as err:
        raise ExplanationUnavailable(f"patient explanations are not available in this installation "
                                     f"(fusion.explain could not be imported: {type(err).__name__})") from err
    out = explanation_dir(run, pseudonym)
    with _EXPLAIN_LOCK:
        cached = load_explanation(run, pseudonym)  # another session may have finished it meanwhile
        if cached is not None:
            return cached
        try:
            out.mkdir(parents=True, exist_ok=True)
            result = None
            if trained_fold is not None and hasattr(fx, "find_patient_fold") and hasattr(fx, "explain_patient"):
                fold, _ = fx.find_patient_fold(run, pseudonym)
                if Path(fold).resolve() == Path(trained_fold.folder).resolve():
                    result = fx.explain_patient(trained_fold, pseudonym, out_dir=out)
            if result is None:
                result = fx.explain_run(Path(run), pseudonym, out)
        except Exception as err:  # noqa: BLE001 - shown to the user without a traceback
            raise ExplanationUnavailable(f"the explanation of {pseudonym} could not be computed "
                                         f"({type(err).__name__})") from err
    cached = load_explanation(run, pseudonym)
    return cached if cached is not None else dict(result)


def survival_at(curve: dict, times=None, *, n: int = 3) -> pd.DataFrame:
    """Predicted event-free probability at a few follow-up times (``times``, default ``n`` round numbers
    spread over the curve's range): columns ``Time`` and ``Event-free probability``."""
    t = np.asarray(curve.get("time", []), dtype=float)
    s = np.asarray(curve.get("survival", []), dtype=float)
    if len(t) == 0 or len(t) != len(s):
        return pd.DataFrame(columns=["Time", "Event-free probability"])
    if times is None:
        raw = np.quantile(t, np.linspace(0, 1, n + 2)[1:-1]) if t.max() > 0 else []
        times = sorted({float(f"{x:.1g}") if x < 10 else float(round(x, -int(math.floor(math.log10(x))) + 1))
                        for x in raw if x > 0})
    rows = []
    for x in times:
        k = np.searchsorted(t, x, side="right") - 1
        rows.append({"Time": x, "Event-free probability": float(s[k]) if k >= 0 else 1.0})
    return pd.DataFrame(rows, columns=["Time", "Event-free probability"])


def modality_shapley_table(expl: dict) -> pd.DataFrame:
    """Modality Shapley values (contribution to the fused risk), largest absolute first; absent modalities
    listed with value 0 and ``present=False``."""
    ms = expl.get("modality_shapley") or {}
    vals = ms.get("values") or {}
    absent = set(ms.get("absent") or [])
    rows = [{"modality": m, "Modality": modality_label(m), "Contribution": float(v), "present": m not in absent}
            for m, v in vals.items() if as_float(v) is not None]
    for m in sorted(absent - set(vals)):
        rows.append({"modality": m, "Modality": modality_label(m), "Contribution": 0.0, "present": False})
    df = pd.DataFrame(rows, columns=["modality", "Modality", "Contribution", "present"])
    return df.reindex(df["Contribution"].abs().sort_values(ascending=False).index).reset_index(drop=True)


def feature_shap_table(expl: dict, *, top: int = 15) -> pd.DataFrame:
    """Top ``top`` features by absolute SHAP value across modalities: Modality, Feature, Patient value, SHAP,
    Effect ("raises risk" / "lowers risk")."""
    rows = []
    for m, feats in (expl.get("feature_shap") or {}).items():
        for f in feats or []:
            s = as_float(f.get("shap"))
            if s is None:
                continue
            v = f.get("value")
            rows.append({"Modality": modality_label(m, short=True), "Feature": str(f.get("feature")),
                         "Patient value": as_float(v) if as_float(v) is not None else (None if v is None else str(v)),
                         "SHAP": s, "Effect": "raises risk" if s > 0 else ("lowers risk" if s < 0 else "none")})
    df = pd.DataFrame(rows, columns=["Modality", "Feature", "Patient value", "SHAP", "Effect"])
    if df.empty:
        return df
    if df["Patient value"].map(lambda x: isinstance(x, str)).any():
        df["Patient value"] = df["Patient value"].map(lambda x: "" if x is None else (f"{x:.3g}" if isinstance(x, float)
                                                                                       else str(x)))
    return df.reindex(df["SHAP"].abs().sort_values(ascending=False).index).head(top).reset_index(drop=True)


def pathway_table(expl: dict, *, top: int | None = 12) -> pd.DataFrame:
    """The patient's pathway scores and their percentile in the cohort, most unusual first."""
    scores = expl.get("pathway_scores") or {}
    pct = expl.get("pathway_scores_cohort_percentile") or {}
    rows = [{"Pathway": str(p), "Score": as_float(s), "Cohort percentile": as_float(pct.get(p))} for p, s in scores.items()]
    df = pd.DataFrame(rows, columns=["Pathway", "Score", "Cohort percentile"])
    if df.empty:
        return df
    dev = (df["Cohort percentile"].fillna(50.0) - 50.0).abs()
    df = df.reindex(dev.sort_values(ascending=False, kind="stable").index).reset_index(drop=True)
    return df.head(top) if top else df


def load_gradcam(expl_dir: str | Path, expl: dict | None, modality: str, shape: tuple[int, ...]) -> np.ndarray | None:
    """The Grad-CAM heatmap of ``modality`` (float32, ``shape`` = the preprocessed volume's (D, H, W)) scaled to
    0..1, or ``None`` when absent or of another shape."""
    info = ((expl or {}).get("gradcam") or {}).get(modality)
    if not isinstance(info, dict) or not info.get("npy"):
        return None
    p = Path(expl_dir) / Path(str(info["npy"])).name
    if not p.is_file():
        return None
    try:
        cam = np.load(p, allow_pickle=False).astype(np.float32)
    except (OSError, ValueError):
        return None
    cam = np.squeeze(cam)
    if cam.shape != tuple(shape):
        return None
    cam = np.nan_to_num(cam, nan=0.0)
    lo, hi = float(cam.min()), float(cam.max())
    return (cam - lo) / (hi - lo) if hi > lo else np.zeros_like(cam)


def default_slice(roi: np.ndarray | None, depth: int) -> int:
    """Axial slice with the largest ROI area (the lesion), else the middle slice."""
    if roi is not None and roi.ndim == 3 and roi.any():
        return int(np.argmax(roi.reshape(roi.shape[0], -1).sum(axis=1)))
    return depth // 2


def ehr_timeline(events: pd.DataFrame | None, patient_ids: list[str], pseudonyms: list[str],
                 pseudonym: str) -> pd.DataFrame:
    """One patient's measured EHR values (``time, variable, value`` [+ ``unit``]), sorted by time.

    The internal ``patient_id`` is used only to select the rows and is dropped: the result holds no identifier.
    """
    cols = ["time", "variable", "value"]
    if events is None or len(events) == 0:
        return pd.DataFrame(columns=cols)
    try:
        internal = patient_ids[list(pseudonyms).index(pseudonym)]
    except ValueError:
        raise KeyError(f"patient {pseudonym!r} is not in this cohort") from None
    sel = events[events["patient_id"] == internal]
    keep = cols + (["unit"] if "unit" in sel.columns else [])
    out = sel[keep].dropna(subset=["value"]).sort_values(["variable", "time"]).reset_index(drop=True)
    return out


# ---------------------------------------------------------------------------------------------- figures


def _plt():
    import matplotlib

    if matplotlib.get_backend().lower() not in ("agg", "module://matplotlib_inline.backend_inline"):
        matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def fig_to_png(fig) -> bytes:
    """Render and close a matplotlib figure; PNG bytes."""
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    _plt().close(fig)
    return buf.getvalue()


def km_figure(curves: list[dict], *, time_label: str = "follow-up time", title: str | None = None):
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    colours = plt.get_cmap("coolwarm")(np.linspace(0.05, 0.95, max(len(curves), 2)))
    for c, col in zip(curves, colours):
        ax.step(c["time"], c["survival"], where="post", color=col, lw=2,
                label=f"{c['label']} (n={c['n']}, {c['n_events']} events)")
    ax.set_xlabel(time_label)
    ax.set_ylabel("survival probability")
    ax.set_ylim(0, 1.02)
    ax.set_xlim(left=0)
    ax.grid(alpha=0.3)
    if title:
        ax.set_title(title)
    if curves:
        ax.legend(loc="lower left", fontsize=8)
    fig.tight_layout()
    return fig


def calibration_figure(cal: pd.DataFrame):
    plt = _plt()
    fig, ax = plt.subplots(figsize=(4.6, 4.2))
    groups = cal.groupby("time") if "time" in cal else [(None, cal)]
    for t, d in groups:
        ax.plot(d["predicted"], d["observed"], "o-", label=None if t is None else f"t = {t:g}"
                if isinstance(t, (int, float)) else f"{t}")
        if "ci_low" in d and "ci_high" in d:
            lo = pd.to_numeric(d["ci_low"], errors="coerce")
            hi = pd.to_numeric(d["ci_high"], errors="coerce")
            ax.vlines(d["predicted"], lo, hi, alpha=0.5)
    lim = [0, max(1.0, float(np.nanmax(cal[["predicted", "observed"]].to_numpy())))]
    ax.plot(lim, lim, "k--", lw=1, label="perfect calibration")
    ax.set_xlabel("predicted event probability")
    ax.set_ylabel("observed event probability (Kaplan-Meier)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def td_auc_figure(td: pd.DataFrame, mean_auc: float | None = None, *, time_label: str = "follow-up time"):
    """Time-dependent (cumulative/dynamic) AUC against time."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(4.6, 3.2))
    d = td.dropna()
    ax.plot(d["time"], d["auc"], "o-", color="#1f618d", label="AUC(t)")
    if mean_auc is not None:
        ax.axhline(mean_auc, ls="--", color="#c0392b", lw=1, label=f"mean {mean_auc:.2f}")
    ax.axhline(0.5, ls=":", color="0.5", lw=1, label="chance")
    ax.set_ylim(0, 1.02)
    ax.set_xlabel(time_label)
    ax.set_ylabel("time-dependent AUC")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    return fig


def survival_curve_figure(curve: dict, *, reference: dict | None = None, time_label: str = "follow-up time"):
    """The patient's predicted survival curve, with the training cohort's Kaplan-Meier curve as a reference."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.4, 3.8))
    if reference is not None:
        ax.step(reference["time"], reference["survival"], where="post", color="0.6", lw=1.5, ls="--",
                label="training cohort (Kaplan-Meier)")
    t = np.asarray(curve.get("time", []), dtype=float)
    s = np.asarray(curve.get("survival", []), dtype=float)
    if len(t) and t[0] > 0:
        t, s = np.r_[0.0, t], np.r_[1.0, s]
    ax.step(t, s, where="post", color="#c0392b", lw=2.2, label="this patient (predicted)")
    ax.set_xlabel(time_label)
    ax.set_ylabel("probability of being event-free")
    ax.set_ylim(0, 1.02)
    ax.set_xlim(left=0)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower left", fontsize=8)
    fig.tight_layout()
    return fig


def shapley_figure(table: pd.DataFrame):
    """Horizontal bars: contribution of each modality to this patient's fused risk (red raises, blue lowers)."""
    plt = _plt()
    n = max(len(table), 1)
    fig, ax = plt.subplots(figsize=(6.0, 0.45 * n + 1.2))
    d = table.iloc[::-1]
    colours = ["#bbbbbb" if not p else ("#c0392b" if v > 0 else "#2e86c1") for v, p in zip(d["Contribution"],
                                                                                           d["present"])]
    labels = [lab + ("" if p else " (missing)") for lab, p in zip(d["Modality"], d["present"])]
    ax.barh(labels, d["Contribution"], color=colours)
    ax.axvline(0, color="k", lw=0.8)
    ax.set_xlabel("contribution to the risk score (Shapley value)\n← lowers risk      raises risk →")
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    return fig


def pathway_figure(table: pd.DataFrame, cohort: pd.DataFrame | None):
    """Box plots of the cohort's pathway scores with the patient's score marked (pathways of ``table``)."""
    plt = _plt()
    n = max(len(table), 1)
    fig, ax = plt.subplots(figsize=(6.4, 0.38 * n + 1.3))
    names = list(table["Pathway"])[::-1]
    ys = np.arange(len(names))
    if cohort is not None:
        data = [pd.to_numeric(cohort[p], errors="coerce").dropna().to_numpy() if p in cohort else np.array([])
                for p in names]
        ok = [i for i, d in enumerate(data) if len(d)]
        if ok:
            import matplotlib

            horizontal = ({"orientation": "horizontal"} if tuple(int(x) for x in matplotlib.__version__.split(".")[:2])
                          >= (3, 10) else {"vert": False})
            ax.boxplot([data[i] for i in ok], positions=ys[ok], widths=0.6, showfliers=False, patch_artist=True,
                       boxprops={"facecolor": "#d6eaf8", "edgecolor": "#5d6d7e"}, medianprops={"color": "#5d6d7e"},
                       **horizontal)
    vals = table.set_index("Pathway")["Score"]
    ax.scatter([vals[p] for p in names], ys, color="#c0392b", zorder=3, s=36, label="this patient")
    ax.set_yticks(ys, [p if len(p) <= 38 else p[:36] + "…" for p in names], fontsize=8)
    ax.set_xlabel("pathway activity score (ssGSEA/GSVA enrichment)")
    ax.grid(axis="x", alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    return fig


def ehr_figure(timeline: pd.DataFrame, *, time_label: str = "time (days)", max_vars: int = 12):
    """One small panel per variable: measured values as markers at the measured times (lines only join them)."""
    plt = _plt()
    variables = sorted(timeline["variable"].unique())[:max_vars]
    n = max(len(variables), 1)
    ncols = 1 if n == 1 else (2 if n <= 4 else 3)
    nrows = int(math.ceil(n / ncols))
    fig, axes = plt.subplots(nrows, ncols, figsize=(3.0 * ncols + 1.0, 1.45 * nrows + 0.5), sharex=True,
                             squeeze=False)
    for ax, v in zip(axes.ravel(), variables):
        d = timeline[timeline["variable"] == v]
        ax.plot(d["time"], d["value"], color="0.75", lw=1)
        ax.plot(d["time"], d["value"], "o", color="#1f618d", ms=4)
        unit = ""
        if "unit" in d and d["unit"].notna().any():
            unit = f" [{d['unit'].dropna().iloc[0]}]"
        ax.set_title(f"{v}{unit}  ({len(d)} measurements)", fontsize=9, loc="left")
        ax.tick_params(labelsize=8)
        ax.grid(alpha=0.3)
    for ax in axes.ravel()[len(variables):]:
        ax.set_visible(False)
    for ax in axes[-1]:
        ax.set_xlabel(time_label, fontsize=9)
    fig.tight_layout()
    return fig


def slice_figure(volume: np.ndarray, roi: np.ndarray | None, cam: np.ndarray | None, z: int, *,
                 show_cam: bool, title: str = ""):
    """One axial slice of a preprocessed volume (D, H, W) with the ROI contour and, optionally, Grad-CAM."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(4.2, 4.2))
    img = volume[z]
    finite = volume[np.isfinite(volume)]
    lo, hi = (np.percentile(finite, [1, 99]) if finite.size else (0.0, 1.0))
    ax.imshow(img, cmap="gray", vmin=lo, vmax=hi if hi > lo else lo + 1, interpolation="nearest")
    if show_cam and cam is not None:
        ax.imshow(np.ma.masked_less(cam[z], 0.2), cmap="jet", alpha=0.45, vmin=0, vmax=1, interpolation="nearest")
    if roi is not None and roi[z].any():
        ax.contour(roi[z].astype(float), levels=[0.5], colors=["#00e5ff"], linewidths=1.6)
    ax.set_title(title, fontsize=10)
    ax.axis("off")
    fig.tight_layout()
    return fig
