"""Cohort manifest: one row per patient.

Columns: ``patient_id``, ``site``, outcome columns (``time`` + ``event`` for
survival, ``label`` for classification), confounder columns, and one path
column per imaging modality (``ct``, ``pet``, ``mri``) with optional
``<modality>_mask`` ROI columns.  Paths are relative to the manifest's folder
(absolute paths are accepted); an empty cell means the patient lacks that
modality.  CSV and Parquet are read.

Every problem is reported with the file, the 1-based data row, the patient and
the column, e.g.::

    file cohort/manifest.csv, row 7, patient DEMO-0007, field 'event': expected 0 or 1, got 2
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

from data_adapters.errors import InputError

IMAGE_COLUMNS = ("ct", "mri", "pet")


def read_table(path: str | Path, *, what: str = "table") -> pd.DataFrame:
    """Read a CSV/TSV/Parquet table with string cells kept as strings."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"{what} file does not exist", file=path)
    suffix = "".join(path.suffixes[-2:]).lower() if path.suffix.lower() == ".gz" else path.suffix.lower()
    try:
        if suffix in (".parquet", ".pq"):
            return pd.read_parquet(path)
        sep = "\t" if suffix in (".tsv", ".tsv.gz", ".txt") else ","
        return pd.read_csv(path, sep=sep, dtype=str, keep_default_na=False, na_values=[""])
    except (ValueError, OSError, pd.errors.ParserError) as err:
        raise InputError(f"cannot read {what}: {err}", file=path) from None


def load_manifest(
    path: str | Path,
    *,
    task: str = "survival",
    time_col: str = "time",
    event_col: str = "event",
    label_col: str = "label",
    confounders: Sequence[str] = (),
    modalities: Sequence[str] = IMAGE_COLUMNS,
    check_files: bool = True,
) -> pd.DataFrame:
    """Read and validate a cohort manifest.

    Parameters
    ----------
    path
        CSV or Parquet manifest.
    task
        ``"survival"`` (needs ``time_col`` > 0 and ``event_col`` in {0, 1}) or
        ``"classification"`` (needs ``label_col``).
    confounders
        Columns the config names as confounders; each must exist.
    modalities
        Imaging modalities the config uses; their path columns must exist and
        every non-empty path must exist on disk (when ``check_files``).

    Returns
    -------
    DataFrame
        One row per patient, indexed by ``patient_id`` (str), with ``time``
        float and ``event`` bool (survival), image path columns made absolute
        (``None`` where missing), and ``manifest_row`` (1-based) kept for
        error messages.
    """
    path = Path(path)
    df = read_table(path, what="manifest")
    if df.empty:
        raise InputError("manifest has no rows", file=path)
    required = ["patient_id", "site"]
    if task == "survival":
        required += [time_col, event_col]
    elif task == "classification":
        required += [label_col]
    else:
        raise ValueError(f"task must be 'survival' or 'classification', got {task!r}")
    image_mods = [m for m in modalities if m in IMAGE_COLUMNS]
    for col in [*required, *confounders, *image_mods]:
        if col not in df.columns:
            kind = "confounder column named by the config" if col in confounders else "required column"
            raise InputError(
                f"{kind} '{col}' is missing; manifest columns are: {', '.join(map(str, df.columns))}",
                file=path,
                field=col,
            )

    df = df.copy()
    df["manifest_row"] = np.arange(1, len(df) + 1)
    ids = df["patient_id"].astype("string")
    for i, pid in enumerate(ids):
        if pd.isna(pid) or str(pid).strip() == "":
            raise InputError("empty patient_id", file=path, row=i + 1, field="patient_id")
    df["patient_id"] = ids.str.strip().astype(str)
    dup = df["patient_id"].duplicated(keep="first")
    if dup.any():
        i = int(np.flatnonzero(dup.to_numpy())[0])
        first = int(np.flatnonzero((df["patient_id"] == df["patient_id"].iloc[i]).to_numpy())[0])
        raise InputError(
            f"duplicated patient_id (first seen at row {first + 1}); each patient must have exactly one row",
            file=path,
            row=i + 1,
            patient=df["patient_id"].iloc[i],
            field="patient_id",
        )
    for i, site in enumerate(df["site"]):
        if pd.isna(site) or str(site).strip() == "":
            raise InputError("empty site", file=path, row=i + 1, patient=df["patient_id"].iloc[i], field="site")
    df["site"] = df["site"].astype(str).str.strip()

    if task == "survival":
        times = pd.to_numeric(df[time_col], errors="coerce")
        for i, (raw, val) in enumerate(zip(df[time_col], times)):
            if pd.isna(val) or not np.isfinite(val) or val <= 0:
                why = "a number > 0" if not pd.isna(val) else "a number"
                raise InputError(
                    f"expected {why} (follow-up time), got {raw!r}",
                    file=path, row=i + 1, patient=df["patient_id"].iloc[i], field=time_col,
                )
        events = pd.to_numeric(df[event_col], errors="coerce")
        for i, (raw, val) in enumerate(zip(df[event_col], events)):
            if pd.isna(val) or val not in (0, 1):
                raise InputError(
                    f"expected 0 (censored) or 1 (event), got {raw!r}",
                    file=path, row=i + 1, patient=df["patient_id"].iloc[i], field=event_col,
                )
        df[time_col] = times.astype(float)
        df[event_col] = events.astype(int).astype(bool)
    else:
        for i, raw in enumerate(df[label_col]):
            if pd.isna(raw) or str(raw).strip() == "":
                raise InputError("empty label", file=path, row=i + 1, patient=df["patient_id"].iloc[i], field=label_col)

    for col in confounders:
        for i, raw in enumerate(df[col]):
            if pd.isna(raw) or str(raw).strip() == "":
                raise InputError(
                    "empty confounder value", file=path, row=i + 1, patient=df["patient_id"].iloc[i], field=col
                )

    base = path.parent
    path_cols = [c for m in image_mods for c in (m, f"{m}_mask") if c in df.columns]
    for col in path_cols:
        resolved = []
        for i, raw in enumerate(df[col]):
            if pd.isna(raw) or str(raw).strip() == "":
                resolved.append(None)
                continue
            p = Path(str(raw).strip())
            p = p if p.is_absolute() else base / p
            if check_files and not p.exists():
                raise InputError(
                    f"path '{raw}' does not exist (resolved to {p}; paths are relative to the manifest's folder)",
                    file=path, row=i + 1, patient=df["patient_id"].iloc[i], field=col,
                )
            resolved.append(str(p))
        df[col] = resolved
    for m in image_mods:
        mask_col = f"{m}_mask"
        if mask_col in df.columns:
            orphan = df[mask_col].notna() & df[m].isna()
            if orphan.any():
                i = int(np.flatnonzero(orphan.to_numpy())[0])
                raise InputError(
                    f"a mask is given but the '{m}' image is missing",
                    file=path, row=i + 1, patient=df["patient_id"].iloc[i], field=mask_col,
                )
    return df.set_index("patient_id", drop=False)


def check_columns_referenced(df: pd.DataFrame, columns: Sequence[str], *, file: str | Path, what: str) -> None:
    """Raise if a column the config references is not in ``df``."""
    for col in columns:
        if col not in df.columns:
            raise InputError(
                f"{what} column '{col}' referenced by the config is missing; available: {', '.join(map(str, df.columns))}",
                file=file,
                field=col,
            )
