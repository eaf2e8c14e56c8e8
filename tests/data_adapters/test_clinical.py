import numpy as np
import pandas as pd
import pytest

from data_adapters.clinical import ClinicalPreprocessor, read_clinical
from data_adapters.errors import InputError


def _table(tmp_path, rows):
    p = tmp_path / "clinical.csv"
    pd.DataFrame(rows).to_csv(p, index=False)
    return p


ROWS = [
    {"patient_id": "A", "age": 50, "sex": "F", "stage": "I"},
    {"patient_id": "B", "age": 70, "sex": "M", "stage": "II"},
    {"patient_id": "C", "age": "", "sex": "M", "stage": "III"},
    {"patient_id": "D", "age": 90, "sex": "F", "stage": "IV"},
]


def test_fit_on_training_patients_only(tmp_path):
    t = read_clinical(_table(tmp_path, ROWS), categorical=["sex", "stage"])
    pre = ClinicalPreprocessor(t.attrs["numeric"], t.attrs["categorical"]).fit(t, ["A", "B", "C"])
    X, rep = pre.transform(t, ["A", "B", "C", "D"])
    # training ages 50, 70 (C imputed with the training median 60): mean 60, sd of [50,70,60]
    sd = np.std([50, 70, 60])
    np.testing.assert_allclose(X[:, 0], [(50 - 60) / sd, (70 - 60) / sd, 0.0, (90 - 60) / sd], rtol=1e-5)
    assert rep["n_imputed_values"]["age"] == 1
    # stage IV never seen in training: all-zero one-hot, counted
    stage_cols = [i for i, n in enumerate(pre.feature_names_) if n.startswith("stage=")]
    assert X[3, stage_cols].sum() == 0 and rep["n_unseen_categories"]["stage"] == 1
    # changing a test patient does not change the fitted statistics
    t2 = t.copy()
    t2.loc["D", "age"] = 10.0
    pre2 = ClinicalPreprocessor(t.attrs["numeric"], t.attrs["categorical"]).fit(t2, ["A", "B", "C"])
    np.testing.assert_allclose(pre2.transform(t2, ["A"])[0], pre.transform(t, ["A"])[0])


def test_non_numeric_value_names_row_patient_column(tmp_path):
    rows = [dict(r) for r in ROWS]
    rows[1]["age"] = "seventy"
    p = _table(tmp_path, rows)
    with pytest.raises(InputError) as e:
        read_clinical(p, categorical=["sex", "stage"])
    assert e.value.row == 2 and e.value.patient == "B" and e.value.field == "age"


def test_unknown_column_and_duplicates(tmp_path):
    p = _table(tmp_path, ROWS)
    with pytest.raises(InputError, match="'bmi'"):
        read_clinical(p, columns=["age", "bmi"])
    p = _table(tmp_path, ROWS + [ROWS[0]])
    with pytest.raises(InputError, match="duplicated patient_id"):
        read_clinical(p, categorical=["sex", "stage"])
