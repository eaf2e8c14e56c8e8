import pandas as pd
import pytest

from data_adapters.errors import InputError
from data_adapters.manifest import load_manifest


@pytest.fixture
def cohort_dir(tmp_path):
    for pid in ("A", "B", "C"):
        (tmp_path / "img" / pid).mkdir(parents=True)
    return tmp_path


def _write(d, rows, name="manifest.csv"):
    p = d / name
    pd.DataFrame(rows).to_csv(p, index=False)
    return p


def _rows():
    return [
        {"patient_id": "A", "site": "S1", "scanner": "x", "time": 10.5, "event": 1, "ct": "img/A"},
        {"patient_id": "B", "site": "S1", "scanner": "y", "time": 3, "event": 0, "ct": ""},
        {"patient_id": "C", "site": "S2", "scanner": "x", "time": 7, "event": 1, "ct": "img/C"},
    ]


def test_valid_manifest(cohort_dir):
    df = load_manifest(_write(cohort_dir, _rows()), confounders=["scanner"], modalities=["ct"])
    assert list(df.index) == ["A", "B", "C"]
    assert df.loc["A", "ct"] == str(cohort_dir / "img" / "A")
    assert df.loc["B", "ct"] is None
    assert df["event"].dtype == bool and df.loc["A", "time"] == 10.5


def test_parquet_manifest(cohort_dir):
    p = cohort_dir / "m.parquet"
    pd.DataFrame(_rows()).astype(str).to_parquet(p)
    assert len(load_manifest(p, modalities=["ct"])) == 3


@pytest.mark.parametrize(
    "mutate, row, field, patient, text",
    [
        (lambda r: r[2].update(ct="img/MISSING"), 3, "ct", "C", "does not exist"),
        (lambda r: r[1].update(patient_id="A"), 2, "patient_id", "A", "duplicated"),
        (lambda r: r[0].update(time="ten"), 1, "time", "A", "number"),
        (lambda r: r[1].update(time=-1), 2, "time", "B", "> 0"),
        (lambda r: r[2].update(event=2), 3, "event", "C", "0 (censored) or 1"),
        (lambda r: r[0].update(event="yes"), 1, "event", "A", "0 (censored) or 1"),
    ],
)
def test_bad_manifest_names_row_patient_and_column(cohort_dir, mutate, row, field, patient, text):
    rows = _rows()
    mutate(rows)
    p = _write(cohort_dir, rows)
    with pytest.raises(InputError) as e:
        load_manifest(p, confounders=["scanner"], modalities=["ct"])
    err = e.value
    assert err.row == row and err.field == field and err.patient == patient
    msg = str(err)
    assert text in msg and str(p) in msg and f"row {row}" in msg and f"'{field}'" in msg


def test_unknown_column_referenced_by_config(cohort_dir):
    p = _write(cohort_dir, _rows())
    with pytest.raises(InputError, match="confounder column named by the config 'ancestry'"):
        load_manifest(p, confounders=["ancestry"], modalities=["ct"])
    with pytest.raises(InputError, match="required column 'pet'"):
        load_manifest(p, modalities=["ct", "pet"])


def test_missing_manifest_file(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        load_manifest(tmp_path / "nope.csv")
