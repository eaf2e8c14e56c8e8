"""EHR events (long format) -> GRU-D ready arrays.

Input is a long table (CSV/TSV/Parquet, or a DataFrame) with one observation
per row::

    patient_id, time, variable, value[, unit]

``time`` is either a number (any origin and unit, e.g. days since diagnosis;
it must be >= 0 and is used as given) or a datetime (ISO 8601 text such as
``2021-03-04`` or ``2021-03-04T08:30:00``, or a datetime column of a Parquet
file).  Datetimes are turned into numbers relative to a per-patient index
time (``index_times``, see :func:`read_ehr_events`) in ``time_unit`` (days by
default, or hours).  ``value`` is a number.  :func:`read_ehr_events`
validates and tidies the table; :class:`EHRPreprocessor` is fitted on the
training patients (per-variable standardisation, GRU-D empirical means) and
turns any set of patients into the arrays of the data contract (``values``,
``mask``, ``delta``, ``times``, ``lengths``).

Documented rules
----------------
* **Every observation must have a value.**  An empty/NaN ``value`` is an
  error (an absent measurement is simply not a row).  Infinite values are
  errors too.
* **Numeric time** must be a finite number >= 0; NaN, negative or
  non-numeric times are errors naming the file, the 1-based data row, the
  patient and the field.
* **Datetime time** (the whole column holds datetimes; mixing numbers and
  datetimes is an error) needs ``index_times`` (``patient_id -> index
  datetime``, e.g. diagnosis or admission): without it, or for a patient
  missing from it, :func:`read_ehr_events` raises an :class:`InputError`
  saying how to give it.  Relative time = (event - index time) in
  ``time_unit``.  Events *before* the index time (negative relative time) are
  **excluded and counted** (``n_events_before_index``,
  ``n_patients_with_events_before_index``): with real timestamps, history
  before the index date is common and is not an input error.  Naive
  timestamps are compared as they are (as if UTC); timestamps with an offset
  are converted to UTC first.
* **Units**: ``unit_conversions`` (``variable -> {source unit -> factor or
  function}``) converts every event of a listed variable into its canonical
  unit; an event whose unit has no entry (or is empty) is an error naming
  the row, the patient, the variable and the unit.  Variables without an
  entry are left as they are.
* **Duplicates**: several events of the same ``(patient_id, time, variable)``
  are averaged into one event (after unit conversion); the number of rows
  merged away is reported as ``n_duplicates_averaged``.  With a ``unit``
  column, duplicates of unconverted variables must share their unit
  (otherwise an error: values in different units cannot be averaged).
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
* **Bucketing** (optional, ``EHRPreprocessor(bucket=w)``): events of a
  patient whose times fall in the same bucket ``[k w, (k + 1) w)`` form one
  step (values of a variable averaged, merges counted); default: one step
  per distinct time.
* **Truncation**: a patient with more than ``max_steps`` steps keeps the
  *last* ``max_steps`` ones (counted).

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
import numbers
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from data_adapters.errors import InputError
from data_adapters.manifest import read_table

__all__ = ["EHR_COLUMNS", "TIME_UNITS", "read_ehr_events", "read_index_times", "compute_delta", "EHRPreprocessor"]

logger = logging.getLogger(__name__)

#: Required columns of the long-format EHR table.
EHR_COLUMNS = ("patient_id", "time", "variable", "value")

#: Units of relative time for datetime input, in seconds.
TIME_UNITS = {"days": 86400.0, "hours": 3600.0}

#: Text read as a missing cell (after stripping blanks).
_NAN_SPELLINGS = frozenset(v for t in ("nan", "na", "n/a", "null", "none", "nat", "")
                           for v in (t, t.upper(), t.capitalize(), {"nan": "NaN", "nat": "NaT"}.get(t, t)))

#: A unit conversion: a factor, or a function of a float array.
UnitConversion = float | Callable[[np.ndarray], np.ndarray]


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


def _nan_like(raw: pd.Series, text: pd.Series | None = None) -> np.ndarray:
    """Bool array: the cell is missing (NaN/None/empty) or a text spelling of it (``text``: stripped cells)."""
    isnull = raw.isna().to_numpy().copy()
    if text is not None:
        isnull |= text.isin(_NAN_SPELLINGS).to_numpy()
    elif raw.dtype == object or pd.api.types.is_string_dtype(raw):
        isnull |= raw.astype(str).str.strip().isin(_NAN_SPELLINGS).to_numpy()
    return isnull


def _is_datetime_column(raw: pd.Series) -> bool:
    """Whether ``time`` holds datetimes: a datetime dtype, or text that parses as ISO 8601 dates.

    A text column is a datetime column when one of its first (up to 100)
    non-numeric, non-empty cells is a datetime or parses as an ISO 8601
    date/time; a column whose cells are all numbers is numeric.
    """
    if pd.api.types.is_datetime64_any_dtype(raw):
        return True
    if pd.api.types.is_numeric_dtype(raw) or pd.api.types.is_bool_dtype(raw):
        return False
    other = (pd.to_numeric(raw, errors="coerce").isna() & raw.notna()).to_numpy()
    if not other.any():
        return False
    cells = raw[other].head(100)
    if cells.map(lambda c: isinstance(c, (pd.Timestamp, np.datetime64)) or hasattr(c, "isoformat")).any():
        return True
    text = cells.astype(str).str.strip()
    text = text[~text.isin(_NAN_SPELLINGS)]
    return bool(pd.to_datetime(text, format="ISO8601", errors="coerce", utc=True).notna().any())


def _parse_datetimes(raw: pd.Series, pid: pd.Series, file: str | Path | None, *, field: str,
                     rows: np.ndarray | None = None) -> pd.Series:
    """Column of datetimes as UTC timestamps; every cell must be a datetime (not a number, not empty)."""
    rows = np.arange(len(raw)) if rows is None else rows
    if pd.api.types.is_datetime64_any_dtype(raw):
        ts = raw.dt.tz_localize("UTC") if raw.dt.tz is None else raw.dt.tz_convert("UTC")
        bad = ts.isna().to_numpy()
        if bad.any():
            i = _first_bad(bad)
            raise InputError(f"missing {field}: every row needs a datetime", file=file, row=int(rows[i]) + 1,
                             patient=str(pid.iloc[i]), field=field)
        return ts.reset_index(drop=True)
    if pd.api.types.infer_dtype(raw, skipna=True) == "string":
        texts = raw.str.strip()
        isnull = _nan_like(raw, texts)
    else:  # datetime objects (e.g. a dict of index times), maybe mixed with text
        texts = raw.map(lambda c: c if isinstance(c, (pd.Timestamp, np.datetime64)) or hasattr(c, "isoformat")
                        else str(c).strip())
        isnull = _nan_like(raw)
    if isnull.any():
        i = _first_bad(isnull)
        raise InputError(f"missing/NaN {field}: every row needs a datetime", file=file, row=int(rows[i]) + 1,
                         patient=str(pid.iloc[i]), field=field)
    numeric = pd.to_numeric(raw, errors="coerce").notna().to_numpy()
    ts = pd.to_datetime(texts, format="ISO8601", errors="coerce", utc=True)
    bad = ts.isna().to_numpy() | numeric
    if bad.any():
        i = _first_bad(bad)
        got = f"the number {raw.iloc[i]!r}" if numeric[i] else repr(raw.iloc[i])
        raise InputError(
            f"expected an ISO 8601 datetime such as 2021-03-04 or 2021-03-04T08:30:00 (the {field} column "
            f"holds datetimes, so every cell must), got {got}",
            file=file, row=int(rows[i]) + 1, patient=str(pid.iloc[i]), field=field,
        )
    return ts.reset_index(drop=True)


def read_index_times(index_times: Mapping | pd.Series | pd.DataFrame | str | Path) -> pd.Series:
    """Per-patient index times (time zero of each patient's datetime events).

    Parameters
    ----------
    index_times
        A mapping ``{patient_id: datetime}`` (``datetime``, ``pandas.Timestamp``
        or ISO 8601 text), a Series indexed by ``patient_id``, a DataFrame
        with columns ``patient_id, index_time``, or the path of a CSV/TSV/
        Parquet file with those columns.

    Returns
    -------
    pandas.Series
        UTC timestamps indexed by ``patient_id`` (str).

    Raises
    ------
    InputError
        Missing column, empty patient id, a value that is not an ISO 8601
        datetime (row, patient and field named), or one patient given two
        different index times.
    """
    file: str | Path | None = None
    if isinstance(index_times, (str, Path)):
        file = index_times
        table = read_table(index_times, what="index times")
    elif isinstance(index_times, pd.DataFrame):
        table = index_times
    elif isinstance(index_times, pd.Series):
        table = pd.DataFrame({"patient_id": index_times.index, "index_time": index_times.to_numpy()})
    elif isinstance(index_times, Mapping):
        table = pd.DataFrame({"patient_id": list(index_times.keys()), "index_time": list(index_times.values())})
    else:
        raise ValueError("index_times must be a mapping patient_id -> datetime, a DataFrame with columns "
                         f"patient_id, index_time, or a file path; got {type(index_times).__name__}")
    for col in ("patient_id", "index_time"):
        if col not in table.columns:
            raise InputError(f"index times need columns patient_id, index_time; column '{col}' is missing "
                             f"(found: {', '.join(map(str, table.columns))})", file=file, field=col)
    table = table.reset_index(drop=True)
    pid_raw = table["patient_id"]
    empty = pid_raw.isna().to_numpy() | (pid_raw.astype(str).str.strip() == "").to_numpy()
    if empty.any():
        i = _first_bad(empty)
        raise InputError("empty patient_id in index times", file=file, row=i + 1, field="patient_id")
    pid = pid_raw.astype(str).str.strip()
    out = _parse_datetimes(table["index_time"], pid, file, field="index_time").rename("index_time")
    out.index = pd.Index(pid.to_numpy(), name="patient_id")
    dup = out.index.duplicated(keep=False)
    if dup.any():
        conflicting = out[dup].groupby(level=0).nunique()
        conflicting = conflicting[conflicting > 1]
        if len(conflicting):
            p = str(conflicting.index[0])
            i = int(np.flatnonzero((pid == p).to_numpy())[-1])
            raise InputError("patient has two different index times", file=file, row=i + 1, patient=p,
                             field="index_time")
        out = out[~out.index.duplicated(keep="first")]
    return out


def _relative_times(
    ts: pd.Series, pid: pd.Series, index: pd.Series, file: str | Path | None, time_unit: str,
) -> np.ndarray:
    """(event - index time of its patient) in ``time_unit``; a patient without an index time is an error."""
    idx = index.reindex(pid.to_numpy())
    missing = idx.isna().to_numpy()
    if missing.any():
        i = _first_bad(missing)
        n_pat = int(pid[missing].nunique())
        raise InputError(
            f"no index time for this patient ({n_pat} patient(s) with datetime events lack one): give "
            "index_times a time for every patient (a dict patient_id -> datetime, a DataFrame or a CSV with "
            "columns patient_id,index_time)", file=file, row=i + 1, patient=str(pid.iloc[i]), field="index_time",
        )
    ev_ns = ts.dt.tz_convert(None).to_numpy().astype("datetime64[ns]")
    ix_ns = idx.dt.tz_convert(None).to_numpy().astype("datetime64[ns]")
    seconds = (ev_ns - ix_ns) / np.timedelta64(1, "s")
    return np.asarray(seconds, dtype=np.float64) / TIME_UNITS[time_unit]


def _validate_events(
    df: pd.DataFrame,
    file: str | Path | None,
    *,
    index_times: pd.Series | None = None,
    time_unit: str = "days",
    report: dict | None = None,
) -> pd.DataFrame:
    """Check columns and types; return a copy with str ids and float times/values.

    Datetime times are converted to ``time_unit`` since the patient's index
    time (``index_times``, from :func:`read_index_times`); events before the
    index time are dropped and counted in ``report``.  Row numbers in errors
    are 1-based positions in ``df``.
    """
    _check_columns(df, file)
    out = df.reset_index(drop=True)
    out = out.copy()
    for col in ("patient_id", "variable"):
        miss = out[col].isna().to_numpy() | (out[col].astype(str).str.strip() == "").to_numpy()
        if miss.any():
            i = _first_bad(miss)
            pid = out["patient_id"].iloc[i]
            raise InputError(f"empty {col}", file=file, row=i + 1,
                             patient=None if pd.isna(pid) else str(pid), field=col)
        out[col] = out[col].astype(str).str.strip()
    before = np.zeros(len(out), dtype=bool)
    if _is_datetime_column(out["time"]):
        if index_times is None:
            raise InputError(
                "the time column holds datetimes, which need a per-patient index time: pass "
                "index_times= (a dict patient_id -> datetime, a DataFrame or a CSV with columns "
                "patient_id,index_time) to read_ehr_events, which converts them to time since the index "
                "in days or hours (time_unit=); or give numeric times (e.g. days since diagnosis)",
                file=file, row=1, patient=str(out["patient_id"].iloc[0]), field="time",
            )
        ts = _parse_datetimes(out["time"], out["patient_id"], file, field="time")
        rel = _relative_times(ts, out["patient_id"], index_times, file, time_unit)
        before = rel < 0
        out["time"] = rel
        if report is not None:
            report["time_kind"] = "datetime"
            report["time_unit"] = time_unit
    else:
        if index_times is not None:
            raise InputError(
                "index_times was given but the time column holds numbers, which are already relative "
                "times; give datetimes (ISO 8601) in the time column, or drop index_times",
                file=file, field="time",
            )
        out["time"] = _numeric_column(out, "time", file, what="time")
        neg = (out["time"] < 0).to_numpy()
        if neg.any():
            i = _first_bad(neg)
            raise InputError(f"negative time {out['time'].iloc[i]!r}: numeric times must be >= 0 (time since "
                             "the patient's time zero)", file=file, row=i + 1, patient=out["patient_id"].iloc[i],
                             field="time")
        if report is not None:
            report["time_kind"] = "numeric"
            report["time_unit"] = "as given"
    out["value"] = _numeric_column(out, "value", file, what="measured value")
    if report is not None:
        report["n_events_before_index"] = int(before.sum())
        report["n_patients_with_events_before_index"] = int(out.loc[before, "patient_id"].nunique())
    if before.any():
        out = out.loc[~before]
    return out


def _check_unit_conversions(unit_conversions: object) -> dict[str, dict[str, UnitConversion]]:
    """Validate the structure of ``unit_conversions`` (ValueError naming the bad entry)."""
    if unit_conversions is None:
        return {}
    if not isinstance(unit_conversions, Mapping):
        raise ValueError("unit_conversions must map variable -> {source unit -> factor or function}, got "
                         f"{type(unit_conversions).__name__}")
    out: dict[str, dict[str, UnitConversion]] = {}
    for var, table in unit_conversions.items():
        if not isinstance(table, Mapping) or not table:
            raise ValueError(f"unit_conversions[{var!r}] must be a non-empty mapping source unit -> factor or "
                             f"function, got {table!r}")
        conv: dict[str, UnitConversion] = {}
        for unit, f in table.items():
            if callable(f):
                conv[str(unit).strip()] = f
            elif isinstance(f, numbers.Real) and not isinstance(f, bool) and np.isfinite(f) and f != 0:
                conv[str(unit).strip()] = float(f)
            else:
                raise ValueError(f"unit_conversions[{var!r}][{unit!r}] must be a finite non-zero factor or a "
                                 f"function, got {f!r}")
        out[str(var)] = conv
    return out


def _apply_conversion(f: UnitConversion, x: np.ndarray) -> np.ndarray:
    if not callable(f):
        return x * f
    try:
        y = np.asarray(f(x.copy()), dtype=np.float64)
        if y.shape == x.shape:
            return y
    except Exception:  # noqa: BLE001 - fall back to one value at a time (e.g. math.log)
        pass
    out = np.empty_like(x)
    for i, v in enumerate(x):
        try:
            out[i] = float(f(float(v)))
        except (ValueError, TypeError, ArithmeticError):
            out[i] = np.nan  # reported as a failed conversion by the caller
    return out


def _convert_units(
    df: pd.DataFrame, conversions: dict[str, dict[str, UnitConversion]], file: str | Path | None, report: dict,
    rows: np.ndarray,
) -> pd.DataFrame:
    """Convert every event of a variable listed in ``conversions`` into its canonical unit.

    ``rows`` are the 0-based data rows of ``df``'s events (for messages).
    Converted rows get ``unit`` = the source unit whose factor is exactly 1
    (the canonical unit) when there is one, else a missing unit.
    """
    report["n_unit_converted"] = {}
    if not conversions:
        return df
    if "unit" not in df.columns:
        raise InputError("unit_conversions was given but the events have no 'unit' column", file=file, field="unit")
    values = df["value"].to_numpy(dtype=np.float64).copy()
    unit_raw = df["unit"]
    units = np.where(_nan_like(unit_raw), "", unit_raw.astype(str).str.strip().to_numpy(dtype=object))
    var = df["variable"].to_numpy(dtype=object)
    new_units = unit_raw.astype(object).to_numpy().copy()
    counts: dict[str, dict[str, int]] = {}
    for name, table in conversions.items():
        sel = var == name
        if not sel.any():
            continue
        known = np.isin(units, list(table))
        bad = sel & ~known
        if bad.any():
            i = _first_bad(bad)
            got = "an empty unit" if units[i] == "" else f"unit {units[i]!r}"
            raise InputError(
                f"variable {name!r} has {got}, which has no conversion in unit_conversions[{name!r}] "
                f"(known units: {', '.join(map(repr, table))}); add it to convert it to the canonical unit",
                file=file, row=int(rows[i]) + 1, patient=str(df["patient_id"].iloc[i]), field="unit",
            )
        canonical = [u for u, f in table.items() if not callable(f) and f == 1.0]
        per_unit: dict[str, int] = {}
        for unit, f in table.items():
            s = sel & (units == unit)
            if not s.any():
                continue
            y = _apply_conversion(f, values[s])
            finite = np.isfinite(y)
            if not finite.all():
                i = int(np.flatnonzero(s)[_first_bad(~finite)])
                raise InputError(
                    f"converting variable {name!r} from {unit!r} failed or gave a non-finite value for "
                    f"{values[i]!r}",
                    file=file, row=int(rows[i]) + 1, patient=str(df["patient_id"].iloc[i]), field="value",
                )
            values[s] = y
            per_unit[unit] = int(s.sum())
        new_units[sel] = canonical[0] if len(canonical) == 1 else None
        counts[name] = per_unit
    out = df.copy()
    out["value"] = values
    out["unit"] = new_units
    report["n_unit_converted"] = counts
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
            label = df.index[int(rows[-1])]
            row = int(label) + 1 if isinstance(label, (int, np.integer)) else int(rows[-1]) + 1
            raise InputError(
                f"duplicated events of variable {var!r} at time {t} have different units "
                f"({', '.join(map(str, dups.loc[(dups.patient_id == pid) & (dups.time == t) & (dups.variable == var), 'unit'].unique()))}); "
                "cannot average them",
                file=file, row=row, patient=str(pid), field="unit",
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
    path: str | Path | pd.DataFrame,
    *,
    variables: list[str] | dict[str, str] | None = None,
    index_times: Mapping | pd.Series | pd.DataFrame | str | Path | None = None,
    time_unit: str = "days",
    unit_conversions: Mapping[str, Mapping[str, UnitConversion]] | None = None,
) -> pd.DataFrame:
    """Read and validate a long-format EHR events table.

    Parameters
    ----------
    path
        CSV, TSV or Parquet file (or a DataFrame) with columns ``patient_id,
        time, variable, value`` and optionally ``unit`` (kept as is).
    variables
        ``None`` keeps every variable; a list keeps those; a dict
        ``{old_name: new_name}`` keeps the keys and renames them (two old
        names may map to one new name; their coinciding events are then
        averaged like duplicates).
    index_times
        Needed when ``time`` holds datetimes (and only then): each patient's
        index (time-zero) datetime, as a mapping ``{patient_id: datetime}``,
        a DataFrame or a CSV/TSV/Parquet file with columns ``patient_id,
        index_time`` (see :func:`read_index_times`).  Patients listed here
        without events are fine; a patient with events but no index time is
        an error.
    time_unit
        ``"days"`` (default) or ``"hours"``: the unit of relative times made
        from datetimes.  Numeric times are used as given.
    unit_conversions
        ``{variable: {source_unit: factor or function}}`` converting each
        listed variable into its canonical unit: a number multiplies the
        value, a function is called with a float array of values and must
        return the converted array (element-wise functions such as
        ``math.log`` are applied value by value).  Variables are the names
        after ``variables`` renaming.  Every event of a listed variable needs
        a ``unit`` with an entry; others are left untouched.

    Returns
    -------
    pandas.DataFrame
        Columns ``patient_id`` (str), ``time`` (float64: numeric times as
        given, or time since the index time in ``time_unit``), ``variable``
        (str), ``value`` (float64) [, ``unit``], sorted by ``patient_id``,
        ``time``, ``variable``, one row per ``(patient_id, time, variable)``.
        ``df.attrs["report"]`` holds counts: ``file``, ``n_rows`` (data rows
        read), ``n_events`` (rows returned), ``n_patients``, ``time_kind``
        (``"numeric"`` or ``"datetime"``), ``time_unit``,
        ``n_events_before_index`` and ``n_patients_with_events_before_index``
        (datetime input: events before the index time, excluded),
        ``n_unit_converted`` (``{variable: {unit: n_events}}``),
        ``n_duplicates_averaged`` (rows merged into another by averaging),
        ``n_dropped_variables`` (``{name: n_rows}`` of unselected variables),
        ``n_dropped_events``, ``missing_variables`` (selected names absent
        from the file) and ``input_sorted`` (bool).

    Raises
    ------
    InputError
        Missing file or column; empty ``patient_id``/``variable``;
        non-numeric, NaN, infinite or negative numeric ``time``; datetime
        ``time`` without ``index_times`` (or a patient without an index
        time), a cell that is not a datetime in a datetime column, or
        ``index_times`` given with numeric times; non-numeric, NaN or
        infinite ``value`` (every observation must have a value); an event
        whose unit has no conversion for a variable listed in
        ``unit_conversions``.  The message names the file, the 1-based data
        row, the patient and the field.
    ValueError
        Bad arguments (``variables``, ``time_unit``, ``unit_conversions``
        structure, ``index_times`` type).

    Notes
    -----
    See the module docstring for the datetime, duplicate, sorting and
    selection rules.
    """
    if variables is not None and not isinstance(variables, (Mapping, list, tuple)):
        raise ValueError(f"variables must be a list, a dict or None, got {type(variables).__name__}")
    if time_unit not in TIME_UNITS:
        raise ValueError(f"time_unit must be one of {', '.join(TIME_UNITS)}, got {time_unit!r}")
    conversions = _check_unit_conversions(unit_conversions)
    index = None if index_times is None else read_index_times(index_times)
    if isinstance(path, pd.DataFrame):
        file = None
        df = path.reset_index(drop=True)
    else:
        file = path
        df = read_table(path, what="EHR events")
    n_rows = len(df)
    report: dict = {"file": None if file is None else str(file), "n_rows": n_rows}
    # rows before the index time are excluded here; the index keeps the 0-based data row for messages
    df = _validate_events(df, file, index_times=index, time_unit=time_unit, report=report)
    already_sorted = _is_sorted(df)

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

    df = _convert_units(df, conversions, file, report, df.index.to_numpy())
    df, n_dup = _average_duplicates(df, file)
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
        last ``max_steps`` steps.  The arrays returned by :meth:`transform`
        always have ``T = max_steps`` (so arrays of different folds/splits
        stack); encoders skip trailing padding.
    window
        Prediction (landmark) time, in the unit of the events' ``time``
        (days by default): events with ``time > window`` are excluded (in
        ``fit`` too, so the statistics describe what the model sees) and
        counted.  ``None``: no limit.
    bucket
        Width of a time bucket (same unit), or ``None`` (default) for one
        step per distinct observation time.  With a width ``w``, the events
        of a patient with times in ``[k w, (k + 1) w)`` form one step whose
        time is the *latest* event time in the bucket (so a step never
        carries a time before information it holds, and never one after the
        window); several values of one variable in a bucket are averaged.
        Applied after the window, before truncation; merges are counted.

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
    One time step per distinct observation time of a patient (or per
    non-empty bucket).  ``delta`` is computed on the kept steps, so after truncation it restarts
    at 0 at the first kept step (``delta_1 = 0`` of time-interval definition).
    """

    def __init__(
        self,
        variables: list[str] | None = None,
        *,
        max_steps: int = 64,
        window: float | None = None,
        bucket: float | None = None,
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
                raise ValueError(f"window must be a number (a time, days by default) or None, got {window!r}") from None
            if not np.isfinite(window):
                raise ValueError(f"window must be finite, got {window!r}")
        if bucket is not None:
            if isinstance(bucket, bool) or not isinstance(bucket, numbers.Real) or not np.isfinite(bucket) \
                    or bucket <= 0:
                raise ValueError(f"bucket must be a positive finite time width or None, got {bucket!r}")
            bucket = float(bucket)
        self.variables = variables
        self.max_steps = int(max_steps)
        self.window = window
        self.bucket = bucket

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
        file = events.attrs.get("report", {}).get("file")
        ev, n_dup = _average_duplicates(ev, file)
        report["n_duplicates_averaged"] = n_dup
        report["n_events_merged_by_bucket"] = 0
        report["n_steps_merged_by_bucket"] = 0
        if self.bucket is not None and len(ev):
            ev = ev.reset_index(drop=True)
            k = np.floor(np.round(ev["time"].to_numpy() / self.bucket, 9))
            n_times = len(ev.drop_duplicates(["patient_id", "time"]))
            step_time = ev.groupby([ev["patient_id"], k])["time"].transform("max")
            ev = ev.assign(time=step_time.to_numpy())
            ev, n_merged = _average_duplicates(ev, file)
            report["n_events_merged_by_bucket"] = n_merged
            report["n_steps_merged_by_bucket"] = n_times - len(ev.drop_duplicates(["patient_id", "time"]))
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
            (N, T, V) in the events' time unit (Che et al. 2018,
            time-interval definition); ``times`` float32 (N, T);
            ``lengths`` int64 (N,).  ``T = max_steps``; steps
            ``t >= length`` are all 0.  The counts are stored in
            ``self.report_``: ``n_patients``, ``n_patients_without_events``
            (length 0), ``n_events_used``, ``n_events_after_window``,
            ``n_patients_with_events_after_window``, ``unseen_variables``
            (``{name: n_events}`` dropped), ``n_unseen_variable_events``,
            ``n_duplicates_averaged``, ``n_events_merged_by_bucket`` (events
            averaged into another of their bucket),
            ``n_steps_merged_by_bucket`` (distinct times merged away),
            ``n_patients_truncated``,
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
