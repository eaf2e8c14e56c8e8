"""Clinical covariates table -> scaled feature matrix.

The table (CSV/TSV/Parquet) has one row per patient: ``patient_id`` plus the
covariates.  Numeric columns are imputed with the training median and
standardised; categorical columns are one-hot encoded (a category unseen in
training encodes as all zeros and is counted).  Every statistic is fitted on
the training patients only (:meth:`ClinicalPreprocessor.fit`) and applied to
the others (:meth:`ClinicalPreprocessor.transform`), with scikit-learn's
``SimpleImputer``, ``StandardScaler`` and ``OneHotEncoder``.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

from data_adapters.errors import InputError
from data_adapters.manifest import check_columns_referenced, read_table


def read_clinical(path: str | Path, *, columns: Sequence[str] | None = None,
                  categorical: Sequence[str] = ()) -> pd.DataFrame:
    """Read and validate the clinical table, indexed by ``patient_id``.

    ``columns`` selects covariates (default: every column but
    ``patient_id``); a column not listed in ``categorical`` must be numeric
    (empty cells are allowed and imputed; other text is an error naming the
    row, patient and column).
    """
    df = read_table(path, what="clinical table")
    check_columns_referenced(df, ["patient_id"], file=path, what="clinical")
    cols = list(columns) if columns is not None else [c for c in df.columns if c != "patient_id"]
    check_columns_referenced(df, cols, file=path, what="clinical")
    check_columns_referenced(df, list(categorical), file=path, what="clinical categorical")
    df = df.copy()
    df["patient_id"] = df["patient_id"].astype(str).str.strip()
    dup = df["patient_id"].duplicated()
    if dup.any():
        i = int(np.flatnonzero(dup.to_numpy())[0])
        raise InputError("duplicated patient_id", file=path, row=i + 1, patient=df["patient_id"].iloc[i],
                         field="patient_id")
    out = pd.DataFrame(index=pd.Index(df["patient_id"], name="patient_id"))
    for c in cols:
        if c in categorical:
            out[c] = df[c].where(df[c].notna(), None).to_numpy(dtype=object)
            continue
        num = pd.to_numeric(df[c], errors="coerce")
        bad = num.isna() & df[c].notna() & (df[c].astype(str).str.strip() != "")
        if bad.any():
            i = int(np.flatnonzero(bad.to_numpy())[0])
            raise InputError(
                f"expected a number, got {df[c].iloc[i]!r} (list the column under 'categorical' if it is one)",
                file=path, row=i + 1, patient=df["patient_id"].iloc[i], field=c,
            )
        out[c] = num.to_numpy(dtype=float)
    out.attrs["categorical"] = [c for c in cols if c in categorical]
    out.attrs["numeric"] = [c for c in cols if c not in categorical]
    return out


class ClinicalPreprocessor:
    """Fit on training patients, transform anyone.

    Attributes (after ``fit``)
    --------------------------
    feature_names_ : list[str]
        Output column names (numeric, then one-hot ``col=value``).
    """

    def __init__(self, numeric: Sequence[str], categorical: Sequence[str] = ()) -> None:
        self.numeric = list(numeric)
        self.categorical = list(categorical)

    def fit(self, table: pd.DataFrame, patient_ids: Sequence[str]) -> "ClinicalPreprocessor":
        from sklearn.impute import SimpleImputer
        from sklearn.preprocessing import OneHotEncoder, StandardScaler

        train = table.reindex(list(patient_ids))
        self.imputer_ = SimpleImputer(strategy="median", keep_empty_features=True)
        self.scaler_ = StandardScaler()
        if self.numeric:
            self.scaler_.fit(self.imputer_.fit_transform(train[self.numeric].to_numpy(dtype=float)))
        self.onehot_ = OneHotEncoder(handle_unknown="ignore", sparse_output=False)
        if self.categorical:
            self.onehot_.fit(train[self.categorical].fillna("__missing__").astype(str).to_numpy())
        names = list(self.numeric)
        if self.categorical:
            for col, cats in zip(self.categorical, self.onehot_.categories_):
                names += [f"{col}={c}" for c in cats]
        self.feature_names_ = names
        return self

    def transform(self, table: pd.DataFrame, patient_ids: Sequence[str]) -> tuple[np.ndarray, dict]:
        """Return ``(features float32 (N, F), report)`` in ``patient_ids`` order."""
        if not hasattr(self, "feature_names_"):
            raise RuntimeError("ClinicalPreprocessor.transform called before fit")
        sub = table.reindex(list(patient_ids))
        missing_rows = sub.index[sub.isna().all(axis=1)].tolist() if len(sub.columns) else []
        parts = []
        report = {"n_patients_without_clinical_row": len(missing_rows), "n_imputed_values": {}, "n_unseen_categories": {}}
        if self.numeric:
            raw = sub[self.numeric].to_numpy(dtype=float)
            report["n_imputed_values"] = {c: int(np.isnan(raw[:, j]).sum()) for j, c in enumerate(self.numeric)}
            parts.append(self.scaler_.transform(self.imputer_.transform(raw)))
        if self.categorical:
            cats = sub[self.categorical].fillna("__missing__").astype(str).to_numpy()
            for j, col in enumerate(self.categorical):
                report["n_unseen_categories"][col] = int((~np.isin(cats[:, j], self.onehot_.categories_[j])).sum())
            parts.append(self.onehot_.transform(cats))
        X = np.concatenate(parts, axis=1) if parts else np.zeros((len(sub), 0))
        return X.astype(np.float32), report
