"""EHR events (long format) -> GRU-D ready arrays.

Input is a long table (CSV/TSV/Parquet) with one observation per row::

    patient_id, time, variable, value[, unit]

``time`` is a number in days (any origin, e.g. days since diagnosis; it must
be >= 0), ``value`` a number.  :func:`read_ehr_events` validates and tidies the
table; :class:`EHRPreprocessor` is fitted on the training patients
(per-variable standardisation, GRU-D empirical means) and turns any set of
patients into the arrays of the data contract (``values``, ``mask``,
``delta``, ``times``, ``lengths``).

Documented rules
----------------
* **Every observation must have a value.**  An empty/NaN ``value`` is an
  error (an absent measurement is simply not a row).  Infinite values are
  errors too.
* **Time** must be a finite number >= 0; NaN, negative or non-numeric times
  are errors naming the file, the 1-based data row, the patient and the field.
* **Duplicates**: several events of the same ``(patient_id, time, variable)``
  are averaged into one event; the number of rows merged away is reported
  as ``n_duplicates_averaged``.  With a ``unit`` column, duplicates must
  share their unit (otherwise an error: values in different units cannot be
  averaged).
* **Unsorted input** is accepted: events are sorted by ``patient_id``, then
  ``time`` (stable, then ``variable``); ``report["input_sorted"]`` says
  whether the file already was.
* **Variable selection**: ``variables`` (a list selects, a dict
  ``{old: new}`` selects and renames); rows of other variables are dropped and
  counted per name in ``report["n_dropped_variables"]``.
* **Unseen variables** (present at ``transform`` time but not fitted) are
  dropped and counted per name in ``EHRPreprocessor.report_
  ["unseen_variables"]`` (and logged), never silently.
* **Window**: events with ``time > window`` (after the prediction/landmark
  time) are excluded, in ``fit`` and in ``transform``, and counted.
* **Truncation**: a patient with more than ``max_steps`` distinct observation
  times keeps the *last* ``max_steps`` ones (counted).

The time-since-last-observation ``delta`` follows Che et al. (2018),
"Recurrent neural networks for multivariate time series with missing values",
Sci Rep 8:6085, time-interval definition::

    delta_1^d = 0
    delta_t^d = s_t - s_{t-1} + delta_{t-1}^d   if m_{t-1}^d = 0
              = s_t - s_{t-1}                   otherwise

which is the same as ``s_t`` minus the time of the last observation of ``d``
strictly before step ``t`` (or minus ``s_1`` if there is none).
"""
from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from data_adapters.errors import InputError
from data_adapters.manifest import read_table

__all__ = ["EHR_COLUMNS", "read_ehr_events", "compute_delta", "EHRPreprocessor"]

logger = logging.getLogger(__name__)

#: Required columns of the long-format EHR table.
EHR_COLUMNS = ("patient_id", "time", "variable", "value")


# --------------------------------------------------------------------------- #
# validation helpers
# --------------------------------------------------------------------------- #
def _check_columns(df: pd.DataFrame, file: str | Path | None) -> None:
    for col in EHR_COLUMNS:
        if col not in df.columns:
            raise InputError(
                f"EHR events column '{col}' is missing; expected columns {', '.join(EHR_COLUMNS)} "
                f"(optional 'unit'), found: {', '.join(map(str, df.columns))}",
                file=file, field=col,
            )


def _first_bad(bad: np.ndarray) -> int:
    return int(np.flatnonzero(bad)[0])


def _numeric_column(df: pd.DataFrame, col: str, file: str | Path | None, *, what: str) -> np.ndarray:
    """Column ``col`` as float64, raising :class:`InputError` on text, NaN or inf."""
    raw = df[col]
    pid = df["patient_id"]
    if pd.api.types.is_bool_dtype(raw):
        i = 0
        raise InputError(f"expected a number ({what}), got a boolean column", file=file, row=i + 1,
                         patient=str(pid.iloc[i]), field=col)
    num = pd.to_numeric(raw, errors="coerce")
    arr = num.to_numpy(dtype=np.float64, na_value=np.nan)
    isnull = raw.isna().to_numpy()
    bad_text = np.isnan(arr) & ~isnull
    if bad_text.any():
        # literal "nan"/"NaN" strings are NaN values, not text
        txt = raw[bad_text].astype(str).str.strip().str.lower()
        nan_like = txt.isin(["nan", "na", "n/a", "null", "none"]).to_numpy()
        idx = np.flatnonzero(bad_text)
        isnull[idx[nan_like]] = True
        bad_text[idx[nan_like]] = False
    if bad_text.any():
        i = _first_bad(bad_text)
        raise InputError(f"expected a number ({what}), got {raw.iloc[i]!r}", file=file, row=i + 1,
                         patient=str(pid.iloc[i]), field=col)
    if isnull.any():
        i = _first_bad(isnull)
        raise InputError(f"missing/NaN {col}: every event needs a {what}", file=file, row=i + 1,
                         patient=str(pid.iloc[i]), field=col)
    inf = ~np.isfinite(arr)
    if inf.any():
        i = _first_bad(inf)
        raise InputError(f"expected a finite number ({what}), got {raw.iloc[i]!r}", file=file, row=i + 1,
                         patient=str(pid.iloc[i]), field=col)
    return arr


def _validate_events(df: pd.DataFrame, file: str | Path | None) -> pd.DataFrame:
    """Check columns and types; return a copy with str ids and float times/values."""
    _check_columns(df, file)
    out = df.copy()
    for col in ("patient_id", "variable"):
        miss = out[col].isna().to_numpy() | (out[col].astype(str).str.strip() == "").to_numpy()
        if miss.any():
            i = _first_bad(miss)
            pid = out["patient_id"].iloc[i]
            raise InputError(f"empty {col}", file=file, row=i + 1,
                             patient=None if pd.isna(pid) else str(pid), field=col)
        out[col] = out[col].astype(str).str.strip()
    out["time"] = _numeric_column(out, "time", file, what="time in days")
    neg = (out["time"] < 0).to_numpy()
    if neg.any():
        i = _first_bad(neg)
        raise InputError(f"negative time {out['time'].iloc[i]!r}: times must be >= 0 (days)", file=file,
                         row=i + 1, patient=out["patient_id"].iloc[i], field="time")
    out["value"] = _numeric_column(out, "value", file, what="measured value")
    return out


def _average_duplicates(df: pd.DataFrame, file: str | Path | None = None) -> tuple[pd.DataFrame, int]:
    """Average events sharing ``(patient_id, time, variable)``; return (df, n merged away).

    Other columns (``unit``) keep their first value; duplicates whose units
    differ are an error (averaging values in different units is meaningless).
    """
    keys = ["patient_id", "time", "variable"]
    dup = df.duplicated(keys, keep=False).to_numpy()
    if not dup.any():
        return df, 0
    dups = df.loc[dup]
    if "unit" in df.columns:
        n_units = dups.groupby(keys, sort=False)["unit"].nunique()
        if (n_units > 1).any():
            pid, t, var = n_units.index[int(np.flatnonzero((n_units > 1).to_numpy())[0])]
            rows = np.flatnonzero(dup & (df["patient_id"] == pid).to_numpy() & (df["time"] == t).to_numpy()
                                  & (df["variable"] == var).to_numpy())
            raise InputError(
                f"duplicated events of variable {var!r} at time {t} have different units "
                f"({', '.join(map(str, dups.loc[(dups.patient_id == pid) & (dups.time == t) & (dups.variable == var), 'unit'].unique()))}); "
                "cannot average them",
                file=file, row=int(rows[-1]) + 1, patient=str(pid), field="unit",
            )
    agg: dict[str, str] = {c: ("mean" if c == "value" else "first") for c in df.columns if c not in keys}
    merged = dups.groupby(keys, sort=False, as_index=False).agg(agg)
    n_removed = int(dup.sum()) - len(merged)
    out = pd.concat([df.loc[~dup], merged[df.columns]], ignore_index=True)
    return out, n_removed


def _is_sorted(df: pd.DataFrame) -> bool:
    """Whether rows are already ordered by (patient_id, time)."""
    if len(df) < 2:
        return True
    pid = df["patient_id"].to_numpy(dtype=object)
    t = df["time"].to_numpy(dtype=np.float64)
    same = pid[1:] == pid[:-1]
    ok = (pid[1:] > pid[:-1]) | (same & (t[1:] >= t[:-1]))
    return bool(ok.all())


# --------------------------------------------------------------------------- #
# reading
# --------------------------------------------------------------------------- #
def read_ehr_events(
    path: str | Path,
    *,
    variables: list[str] | dict[str, str] | None = None,
) -> pd.DataFrame:
    """Read and validate a long-format EHR events table.

    Parameters
    ----------
    path
        CSV, TSV or Parquet file with columns ``patient_id, time, variable,
        value`` and optionally ``unit`` (kept as is).
    variables
        ``None`` keeps every variable; a list keeps those; a dict
        ``{old_name: new_name}`` keeps the keys and renames them (two old
        names may map to one new name; their coinciding events are then
        averaged like duplicates).

    Returns
    -------
    pandas.DataFrame
        Columns ``patient_id`` (str), ``time`` (float64, days), ``variable``
        (str), ``value`` (float64) [, ``unit``], sorted by ``patient_id``,
        ``time``, ``variable``, one row per ``(patient_id, time, variable)``.
        ``df.attrs["report"]`` holds counts: ``file``, ``n_rows`` (data rows
        read), ``n_events`` (rows returned), ``n_patients``,
        ``n_duplicates_averaged`` (rows merged into another by averaging),
        ``n_dropped_variables`` (``{name: n_rows}`` of unselected variables),
        ``n_dropped_events``, ``missing_variables`` (selected names absent
        from the file) and ``input_sorted`` (bool).

    Raises
    ------
    InputError
        Missing file or column; empty ``patient_id``/``variable``;
        non-numeric, NaN, infinite or negative ``time``; non-numeric, NaN or
        infinite ``value`` (every observation must have a value).  The
        message names the file, the 1-based data row, the patient and the
        field.

    Notes
    -----
    See the module docstring for the duplicate, sorting and selection rules.
    """
    if variables is not None and not isinstance(variables, (Mapping, list, tuple)):
        raise ValueError(f"variables must be a list, a dict or None, got {type(variables).__name__}")
    df = read_table(path, what="EHR events")
    n_rows = len(df)
    df = _validate_events(df, path)
    already_sorted = _is_sorted(df)

    report: dict = {"file": str(path), "n_rows": n_rows}
    dropped: dict[str, int] = {}
    missing_vars: list[str] = []
    if variables is not None:
        if isinstance(variables, Mapping):
            rename = {str(k): str(v) for k, v in variables.items()}
        else:
            rename = {str(k): str(k) for k in variables}
        keep = df["variable"].isin(list(rename)).to_numpy()
        if (~keep).any():
            dropped = {str(k): int(v) for k, v in df.loc[~keep, "variable"].value_counts().sort_index().items()}
        present = set(df["variable"].unique())
        missing_vars = [k for k in rename if k not in present]
        df = df.loc[keep].copy()
        df["variable"] = df["variable"].map(rename)
    report["n_dropped_variables"] = dropped
    report["n_dropped_events"] = int(sum(dropped.values()))
    report["missing_variables"] = missing_vars

    df, n_dup = _average_duplicates(df, path)
    df = df.sort_values(["patient_id", "time", "variable"], kind="stable", ignore_index=True)
    report["n_duplicates_averaged"] = n_dup
    report["input_sorted"] = already_sorted
    report["n_events"] = len(df)
    report["n_patients"] = int(df["patient_id"].nunique())
    df.attrs["report"] = report
    return df


# --------------------------------------------------------------------------- #
# delta (Che et al. 2018, time-interval definition)
# --------------------------------------------------------------------------- #
def compute_delta(times: np.ndarray, mask: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Time since each variable was last observed, Che et al. (2018) time-interval definition.

    Parameters
    ----------
    times
        ``(N, T)`` observation times ``s_t``.
    mask
        ``(N, T, V)`` 1 where observed.
    lengths
        ``(N,)`` number of valid steps.

    Returns
    -------
    numpy.ndarray
        ``(N, T, V)`` float32 ``delta`` with ``delta_1 = 0`` and
        ``delta_t^d = s_t - s_{t'}`` where ``t'`` is the last step before
        ``t`` at which ``d`` was observed (``t' = 1`` if none), which unrolls
        the recursion of time-interval definition.  Padding steps (``t >= length``) are 0.
    """
    n, t_max = times.shape
    v = mask.shape[2]
    if t_max == 0:
        return np.zeros((n, 0, v), dtype=np.float32)
    steps = np.arange(t_max)
    # last observed step at or before t (-1 = never), then shift to "strictly before t"
    last_obs = np.where(mask > 0, steps[None, :, None], -1)
    last_obs = np.maximum.accumulate(last_obs, axis=1)
    prev = np.empty_like(last_obs)
    prev[:, 0] = -1
    prev[:, 1:] = last_obs[:, :-1]
    ref_step = np.maximum(prev, 0)  # no earlier observation -> s_1
    ref_time = np.take_along_axis(times[:, :, None].astype(np.float64).repeat(v, axis=2), ref_step, axis=1)
    delta = times[:, :, None].astype(np.float64) - ref_time
    valid = steps[None, :] < np.asarray(lengths)[:, None]
    delta = np.where(valid[:, :, None], delta, 0.0)
    return delta.astype(np.float32)


# --------------------------------------------------------------------------- #
# preprocessor
# --------------------------------------------------------------------------- #
class EHRPreprocessor:
    """Fit per-variable statistics on training patients; build contract arrays.

    Parameters
    ----------
    variables
        Variables to use, in this order.  ``None``: every variable seen in the
        training events, sorted by name.
    max_steps
        Maximum number of time steps per patient; longer histories keep the
        last ``max_steps`` distinct observation times.  The arrays returned by
        :meth:`transform` always have ``T = max_steps`` (so arrays of
        different folds/splits stack); encoders skip trailing padding.
    window
        Prediction (landmark) time in days: events with ``time > window`` are
        excluded (in ``fit`` too, so the statistics describe what the model
        sees) and counted.  ``None``: no limit.

    Attributes
    ----------
    variables_ : list[str]
        The V variables, in array order.
    mean_, std_ : numpy.ndarray
        ``(V,)`` training mean and sample standard deviation (ddof=1) of each
        variable's raw values; a std that is 0 or undefined (fewer than two
        observations) is set to 1.0, and a variable without training
        observations gets mean 0, std 1 (listed in
        ``fit_report_["variables_without_training_observations"]``).
    empirical_mean_ : numpy.ndarray
        ``(V,)`` mean of the standardised training observations actually fed
        to the model (after window and truncation): GRU-D's ``x~``
        (Che et al. 2018, input decay); 0 for unobserved variables.
    fit_report_, report_ : dict
        Counts of the last ``fit`` / ``transform`` (see :meth:`transform`).

    Notes
    -----
    One time step per distinct observation time of a patient (no bucketing).
    ``delta`` is computed on the kept steps, so after truncation it restarts
    at 0 at the first kept step (``delta_1 = 0`` of time-interval definition).
    """

    def __init__(
        self,
        variables: list[str] | None = None,
        *,
        max_steps: int = 64,
        window: float | None = None,
    ) -> None:
        if variables is not None:
            variables = [str(v) for v in variables]
            if len(variables) == 0:
                raise ValueError("variables must be None or a non-empty list")
            if len(set(variables)) != len(variables):
                raise ValueError(f"variables has duplicated names: {variables}")
        if isinstance(max_steps, bool) or not isinstance(max_steps, (int, np.integer)) or max_steps < 1:
            raise ValueError(f"max_steps must be a positive integer, got {max_steps!r}")
        if window is not None:
            try:
                window = float(window)
            except (TypeError, ValueError):
                raise ValueError(f"window must be a number of days or None, got {window!r}") from None
            if not np.isfinite(window):
                raise ValueError(f"window must be finite, got {window!r}")
        self.variables = variables
        self.max_steps = int(max_steps)
        self.window = window

    # ------------------------------------------------------------------ #
    @staticmethod
    def _patient_list(patient_ids: Sequence[str]) -> list[str]:
        pids = [str(p) for p in patient_ids]
        dup = pd.Index(pids)[pd.Index(pids).duplicated()]
        if len(dup):
            raise ValueError(f"patient_ids has duplicated id(s): {sorted(set(dup))[:5]}")
        return pids

    def _select(self, events: pd.DataFrame, pids: list[str], report: dict) -> pd.DataFrame:
        """Validate, keep these patients, apply the window, average duplicates."""
        ev = _validate_events(events, events.attrs.get("report", {}).get("file"))
        in_set = ev["patient_id"].isin(pids).to_numpy()
        report["n_events_other_patients"] = int((~in_set).sum())
        ev = ev.loc[in_set]
        if self.window is not None:
            late = (ev["time"] > self.window).to_numpy()
            report["n_events_after_window"] = int(late.sum())
            report["n_patients_with_events_after_window"] = int(ev.loc[late, "patient_id"].nunique())
            ev = ev.loc[~late]
        else:
            report["n_events_after_window"] = 0
            report["n_patients_with_events_after_window"] = 0
        ev, n_dup = _average_duplicates(ev, events.attrs.get("report", {}).get("file"))
        report["n_duplicates_averaged"] = n_dup
        return ev

    # ------------------------------------------------------------------ #
    def fit(self, events: pd.DataFrame, patient_ids: Sequence[str]) -> "EHRPreprocessor":
        """Fit variables and statistics on the events of ``patient_ids`` only.

        Parameters
        ----------
        events
            Long-format events (e.g. from :func:`read_ehr_events`); events of
            other patients are ignored (this is what prevents leakage across
            folds).
        patient_ids
            The training patients.

        Returns
        -------
        EHRPreprocessor
            ``self``.
        """
        pids = self._patient_list(patient_ids)
        report: dict = {"n_patients": len(pids)}
        ev = self._select(events, pids, report)
        if self.variables is None:
            variables = sorted(ev["variable"].unique().tolist())
            if not variables:
                raise InputError("no EHR events for the training patients: cannot choose variables "
                                 "(pass variables=[...] explicitly)", field="variable")
        else:
            variables = list(self.variables)
        report["n_events_unselected_variables"] = int((~ev["variable"].isin(variables)).sum())
        ev = ev.loc[ev["variable"].isin(variables)]
        stats = ev.groupby("variable")["value"].agg(["mean", "std", "count"]).reindex(variables)
        mean = stats["mean"].to_numpy(dtype=np.float64)
        std = stats["std"].to_numpy(dtype=np.float64)
        count = stats["count"].fillna(0).to_numpy(dtype=np.int64)
        unobserved = [v for v, c in zip(variables, count) if c == 0]
        mean = np.where(count > 0, mean, 0.0)
        std = np.where((count > 1) & np.isfinite(std) & (std > 0), std, 1.0)
        self.variables_ = variables
        self.mean_ = mean
        self.std_ = std
        self.empirical_mean_ = np.zeros(len(variables), dtype=np.float64)
        report["n_observations"] = {v: int(c) for v, c in zip(variables, count)}
        report["variables_without_training_observations"] = unobserved
        # empirical mean of what the model sees (after truncation), GRU-D's x~
        arrays = self.transform(events, pids)
        m = arrays["mask"].astype(np.float64)
        n_obs = m.sum(axis=(0, 1))
        tot = (arrays["values"].astype(np.float64) * m).sum(axis=(0, 1))
        self.empirical_mean_ = np.divide(tot, n_obs, out=np.zeros_like(tot), where=n_obs > 0)
        report["transform"] = self.report_
        self.fit_report_ = report
        return self

    def fit_transform(self, events: pd.DataFrame, patient_ids: Sequence[str]) -> dict[str, np.ndarray]:
        """``fit(events, patient_ids).transform(events, patient_ids)``."""
        return self.fit(events, patient_ids).transform(events, patient_ids)

    # ------------------------------------------------------------------ #
    def transform(self, events: pd.DataFrame, patient_ids: Sequence[str]) -> dict[str, np.ndarray]:
        """Arrays of the EHR data contract for ``patient_ids``, in that order.

        Parameters
        ----------
        events
            Long-format events (any patients; others are ignored).
        patient_ids
            Patients to build, N of them.

        Returns
        -------
        dict[str, numpy.ndarray]
            ``values`` float32 (N, T, V) standardised ``(x - mean_) / std_``,
            0 where missing; ``mask`` float32 (N, T, V); ``delta`` float32
            (N, T, V) in days (Che et al. 2018, time-interval definition); ``times`` float32
            (N, T); ``lengths`` int64 (N,).  ``T = max_steps``; steps
            ``t >= length`` are all 0.  The counts are stored in
            ``self.report_``: ``n_patients``, ``n_patients_without_events``
            (length 0), ``n_events_used``, ``n_events_after_window``,
            ``n_patients_with_events_after_window``, ``unseen_variables``
            (``{name: n_events}`` dropped), ``n_unseen_variable_events``,
            ``n_duplicates_averaged``, ``n_patients_truncated``,
            ``n_steps_truncated``, ``n_events_truncated``,
            ``n_events_other_patients``.
        """
        if not hasattr(self, "mean_"):
            raise RuntimeError("EHRPreprocessor.transform called before fit")
        pids = self._patient_list(patient_ids)
        n, t_max, v = len(pids), self.max_steps, len(self.variables_)
        report: dict = {"n_patients": n}
        ev = self._select(events, pids, report)

        known = ev["variable"].isin(self.variables_).to_numpy()
        unseen = {str(k): int(c) for k, c in ev.loc[~known, "variable"].value_counts().sort_index().items()}
        report["unseen_variables"] = unseen
        report["n_unseen_variable_events"] = int(sum(unseen.values()))
        if unseen:
            logger.warning("EHR: dropped %d events of %d variables not seen in fit: %s",
                           report["n_unseen_variable_events"], len(unseen), ", ".join(unseen))
        ev = ev.loc[known]

        p_idx = pd.Index(pids).get_indexer(ev["patient_id"])
        v_idx = pd.Index(self.variables_).get_indexer(ev["variable"])
        time = ev["time"].to_numpy(dtype=np.float64)
        val = (ev["value"].to_numpy(dtype=np.float64) - self.mean_[v_idx]) / self.std_[v_idx]

        order = np.lexsort((time, p_idx))
        p_idx, v_idx, time, val = p_idx[order], v_idx[order], time[order], val[order]
        m = len(time)
        new_step = np.ones(m, dtype=bool)
        if m > 1:
            new_step[1:] = (p_idx[1:] != p_idx[:-1]) | (time[1:] != time[:-1])
        step_id = np.cumsum(new_step) - 1                       # global step number
        n_steps = np.bincount(p_idx[new_step], minlength=n) if m else np.zeros(n, dtype=np.int64)
        first_step = np.concatenate([[0], np.cumsum(n_steps)[:-1]])
        local = step_id - first_step[p_idx]                     # step within patient
        offset = np.maximum(n_steps - t_max, 0)                 # keep the LAST t_max steps
        local = local - offset[p_idx]
        keep = local >= 0
        report["n_patients_truncated"] = int((offset > 0).sum())
        report["n_steps_truncated"] = int(offset.sum())
        report["n_events_truncated"] = int((~keep).sum())
        p_idx, v_idx, time, val, local = p_idx[keep], v_idx[keep], time[keep], val[keep], local[keep]

        lengths = np.minimum(n_steps, t_max).astype(np.int64)
        values = np.zeros((n, t_max, v), dtype=np.float32)
        mask = np.zeros((n, t_max, v), dtype=np.float32)
        times = np.zeros((n, t_max), dtype=np.float32)
        values[p_idx, local, v_idx] = val
        mask[p_idx, local, v_idx] = 1.0
        times_f64 = np.zeros((n, t_max), dtype=np.float64)
        times_f64[p_idx, local] = time
        times[:] = times_f64
        delta = compute_delta(times_f64, mask, lengths)

        report["n_events_used"] = int(len(val))
        report["n_patients_without_events"] = int((lengths == 0).sum())
        self.report_ = report
        return {"values": values, "mask": mask, "delta": delta, "times": times, "lengths": lengths}
