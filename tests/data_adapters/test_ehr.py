"""Tests of the EHR events adapter."""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from data_adapters.ehr import EHRPreprocessor, compute_delta, read_ehr_events
from data_adapters.errors import InputError


def _events(rows: list[tuple]) -> pd.DataFrame:
    return pd.DataFrame(rows, columns=["patient_id", "time", "variable", "value"])


def _write(tmp_path: Path, text: str, name: str = "ehr.csv") -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


# --------------------------------------------------------------------------- #
# read_ehr_events
# --------------------------------------------------------------------------- #
def test_read_sorts_averages_duplicates_and_keeps_unit(tmp_path: Path) -> None:
    p = _write(tmp_path, "patient_id,time,variable,value,unit\n"
                         "B,2,hb,10,g/dL\n"
                         "A,5,hb,12,g/dL\n"
                         "A,1,hb,11,g/dL\n"
                         "A,1,hb,13,g/dL\n"
                         "A,1,crp,4,mg/L\n"
                         "007,0,crp,1,mg/L\n")
    df = read_ehr_events(p)
    assert list(df.columns) == ["patient_id", "time", "variable", "value", "unit"]
    assert df["patient_id"].tolist() == ["007", "A", "A", "A", "B"]  # ids kept as text
    assert df[["patient_id", "time", "variable"]].values.tolist() == [
        ["007", 0.0, "crp"], ["A", 1.0, "crp"], ["A", 1.0, "hb"], ["A", 5.0, "hb"], ["B", 2.0, "hb"]]
    assert df.loc[(df.patient_id == "A") & (df.time == 1) & (df.variable == "hb"), "value"].item() == 12.0
    rep = df.attrs["report"]
    assert rep["n_rows"] == 6 and rep["n_events"] == 5
    assert rep["n_duplicates_averaged"] == 1
    assert rep["input_sorted"] is False
    assert rep["n_patients"] == 3
    assert rep["file"] == str(p)


def test_read_sorted_input_reported_sorted(tmp_path: Path) -> None:
    p = _write(tmp_path, "patient_id,time,variable,value\nA,0,x,1\nA,1,x,2\nB,0,x,3\n")
    assert read_ehr_events(p).attrs["report"]["input_sorted"] is True


def test_read_duplicates_with_different_units_rejected(tmp_path: Path) -> None:
    p = _write(tmp_path, "patient_id,time,variable,value,unit\nA,1,glu,5,mmol/L\nA,1,glu,90,mg/dL\n")
    with pytest.raises(InputError, match="units") as err:
        read_ehr_events(p)
    assert err.value.patient == "A" and err.value.file == str(p)


def test_read_variable_selection_and_rename(tmp_path: Path) -> None:
    p = _write(tmp_path, "patient_id,time,variable,value\n"
                         "A,0,hb,1\nA,0,crp,2\nA,1,wbc,3\nA,2,wbc,4\nA,3,plt,5\n")
    df = read_ehr_events(p, variables=["hb", "crp", "ldh"])
    assert sorted(df["variable"].unique()) == ["crp", "hb"]
    rep = df.attrs["report"]
    assert rep["n_dropped_variables"] == {"plt": 1, "wbc": 2}
    assert rep["n_dropped_events"] == 3
    assert rep["missing_variables"] == ["ldh"]
    df = read_ehr_events(p, variables={"hb": "haemoglobin", "wbc": "leukocytes"})
    assert sorted(df["variable"].unique()) == ["haemoglobin", "leukocytes"]
    assert df.attrs["report"]["n_dropped_variables"] == {"crp": 1, "plt": 1}


def test_read_parquet(tmp_path: Path) -> None:
    p = tmp_path / "ehr.parquet"
    pd.DataFrame({"patient_id": [1, 2], "time": [0.5, 0.0], "variable": ["a", "a"], "value": [1, 2]}).to_parquet(p)
    df = read_ehr_events(p)
    assert df["patient_id"].tolist() == ["1", "2"]
    assert df["value"].dtype == np.float64


@pytest.mark.parametrize(
    "text, row, patient, field, match",
    [
        ("patient_id,time,variable,value\nA,0,hb,1\nB,1,hb,high\n", 2, "B", "value", "expected a number"),
        ("patient_id,time,variable,value\nA,0,hb,1\nA,,hb,2\n", 2, "A", "time", "NaN"),
        ("patient_id,time,variable,value\nA,0,hb,1\nC,nan,hb,2\n", 2, "C", "time", "NaN"),
        ("patient_id,time,variable,value\nA,0,hb,1\nA,1,hb,2\nZ,-3,hb,2\n", 3, "Z", "time", "negative"),
        ("patient_id,time,variable,value\nA,0,hb,1\nA,1,hb,\n", 2, "A", "value", "needs a measured value"),
        ("patient_id,time,variable,value\nQ,day1,hb,1\n", 1, "Q", "time", "expected a number"),
        ("patient_id,time,variable,value\nQ,1,hb,inf\n", 1, "Q", "value", "finite"),
    ],
)
def test_read_bad_inputs(tmp_path: Path, text: str, row: int, patient: str, field: str, match: str) -> None:
    p = _write(tmp_path, text)
    with pytest.raises(InputError, match=match) as err:
        read_ehr_events(p)
    e = err.value
    assert (e.file, e.row, e.patient, e.field) == (str(p), row, patient, field)
    assert str(p) in str(e)


def test_read_missing_column_and_file(tmp_path: Path) -> None:
    p = _write(tmp_path, "patient_id,time,value\nA,0,1\n")
    with pytest.raises(InputError, match="variable") as err:
        read_ehr_events(p)
    assert err.value.field == "variable" and err.value.file == str(p)
    with pytest.raises(InputError) as err:
        read_ehr_events(tmp_path / "nope.csv")
    assert err.value.file == str(tmp_path / "nope.csv")


# --------------------------------------------------------------------------- #
# delta (Che et al. 2018, eq. 2)
# --------------------------------------------------------------------------- #
def test_delta_hand_checked() -> None:
    ev = _events([
        ("A", 0.0, "a", 1.0), ("A", 0.0, "b", 2.0),
        ("A", 1.0, "a", 3.0),                      # b missing at step 2
        ("A", 4.0, "a", 5.0), ("A", 4.0, "b", 6.0),
    ])
    pre = EHRPreprocessor(["a", "b"], max_steps=5).fit(ev, ["A"])
    out = pre.transform(ev, ["A"])
    assert out["lengths"].tolist() == [3]
    np.testing.assert_allclose(out["times"][0, :3], [0.0, 1.0, 4.0])
    np.testing.assert_allclose(out["mask"][0, :3], [[1, 1], [1, 0], [1, 1]])
    # a: observed at every step -> s_t - s_{t-1}; b: missing at step 2 -> (4 - 1) + 1 = 4
    np.testing.assert_allclose(out["delta"][0, :3], [[0, 0], [1, 1], [3, 4]])
    # padding is all zero
    for k in ("values", "mask", "delta"):
        assert not out[k][0, 3:].any()
    assert not out["times"][0, 3:].any()
    for k, dt in (("values", np.float32), ("mask", np.float32), ("delta", np.float32), ("times", np.float32),
                  ("lengths", np.int64)):
        assert out[k].dtype == dt


def test_compute_delta_matches_recursion() -> None:
    rng = np.random.default_rng(0)
    n, t, v = 5, 7, 3
    times = np.cumsum(rng.uniform(0.1, 2.0, size=(n, t)), axis=1)
    mask = (rng.random((n, t, v)) < 0.4).astype(np.float32)
    lengths = np.array([7, 3, 1, 0, 5])
    expected = np.zeros((n, t, v))
    for i in range(n):
        for s in range(1, lengths[i]):
            gap = times[i, s] - times[i, s - 1]
            expected[i, s] = np.where(mask[i, s - 1] > 0, gap, gap + expected[i, s - 1])
    np.testing.assert_allclose(compute_delta(times, mask, lengths), expected, rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------- #
# EHRPreprocessor
# --------------------------------------------------------------------------- #
def _cohort() -> pd.DataFrame:
    return _events([
        ("tr1", 0.0, "a", 1.0), ("tr1", 1.0, "a", 3.0), ("tr1", 1.0, "b", 10.0),
        ("tr2", 0.5, "a", 5.0), ("tr2", 2.0, "b", 20.0),
        ("te1", 0.0, "a", 100.0), ("te1", 3.0, "c", 7.0),
    ])


def test_fit_uses_training_patients_only() -> None:
    ev = _cohort()
    pre = EHRPreprocessor().fit(ev, ["tr1", "tr2"])
    assert pre.variables_ == ["a", "b"]                      # 'c' only in a test patient
    np.testing.assert_allclose(pre.mean_, [3.0, 15.0])
    np.testing.assert_allclose(pre.std_, [2.0, np.std([10.0, 20.0], ddof=1)])
    changed = ev.copy()
    changed.loc[changed.patient_id == "te1", "value"] = -999.0
    pre2 = EHRPreprocessor().fit(changed, ["tr1", "tr2"])
    np.testing.assert_array_equal(pre.mean_, pre2.mean_)
    np.testing.assert_array_equal(pre.std_, pre2.std_)
    np.testing.assert_array_equal(pre.empirical_mean_, pre2.empirical_mean_)
    np.testing.assert_allclose(pre.empirical_mean_, [0.0, 0.0], atol=1e-12)
    # standardisation applied with training statistics
    out = pre.transform(ev, ["te1"])
    assert out["values"][0, 0, 0] == pytest.approx((100.0 - 3.0) / 2.0)


def test_std_of_single_or_constant_observation_is_one() -> None:
    ev = _events([("p", 0.0, "a", 4.0), ("p", 1.0, "b", 2.0), ("p", 2.0, "b", 2.0)])
    pre = EHRPreprocessor(["a", "b", "never"]).fit(ev, ["p"])
    np.testing.assert_allclose(pre.std_, [1.0, 1.0, 1.0])
    np.testing.assert_allclose(pre.mean_, [4.0, 2.0, 0.0])
    assert pre.fit_report_["variables_without_training_observations"] == ["never"]


def test_unseen_variable_dropped_and_counted() -> None:
    ev = _cohort()
    pre = EHRPreprocessor().fit(ev, ["tr1", "tr2"])
    out = pre.transform(ev, ["te1", "tr1"])
    assert out["values"].shape == (2, 64, 2)
    assert pre.report_["unseen_variables"] == {"c": 1}
    assert pre.report_["n_unseen_variable_events"] == 1
    # te1's step at time 3 only had 'c': it is gone
    assert out["lengths"].tolist() == [1, 2]


def test_patient_without_events_has_length_zero() -> None:
    ev = _cohort()
    pre = EHRPreprocessor().fit(ev, ["tr1", "tr2"])
    out = pre.transform(ev, ["tr2", "ghost", "tr1"])
    assert out["lengths"].tolist() == [2, 0, 2]
    assert not out["mask"][1].any() and not out["times"][1].any()
    assert pre.report_["n_patients_without_events"] == 1


def test_window_and_truncation_counted() -> None:
    rows = [("p", float(t), "a", float(t)) for t in range(10)] + [("q", 0.0, "a", 1.0), ("q", 8.0, "a", 2.0)]
    ev = _events(rows)
    pre = EHRPreprocessor(max_steps=4, window=6.0).fit(ev, ["p", "q"])
    # window also applies in fit: mean of p's 0..6 and q's 1.0
    assert pre.mean_[0] == pytest.approx(np.mean([0, 1, 2, 3, 4, 5, 6, 1.0]))
    out = pre.transform(ev, ["p", "q"])
    rep = pre.report_
    assert rep["n_events_after_window"] == 4                 # p: 7, 8, 9; q: 8
    assert rep["n_patients_with_events_after_window"] == 2
    assert rep["n_patients_truncated"] == 1
    assert rep["n_steps_truncated"] == 3                     # p keeps times 3..6
    assert rep["n_events_truncated"] == 3
    assert out["values"].shape == (2, 4, 1)
    assert out["lengths"].tolist() == [4, 1]
    np.testing.assert_allclose(out["times"][0], [3, 4, 5, 6])
    np.testing.assert_allclose(out["delta"][0, :, 0], [0, 1, 1, 1])  # eq. (2) restarts at the first kept step


def test_transform_averages_duplicates_and_ignores_order() -> None:
    ev = _events([("p", 2.0, "a", 4.0), ("p", 0.0, "a", 1.0), ("p", 2.0, "a", 6.0)])
    pre = EHRPreprocessor(["a"]).fit(ev, ["p"])
    assert pre.fit_report_["n_duplicates_averaged"] == 1
    out = pre.transform(ev, ["p"])
    assert pre.report_["n_duplicates_averaged"] == 1
    np.testing.assert_allclose(out["times"][0, :2], [0.0, 2.0])
    raw = out["values"][0, :2, 0] * pre.std_[0] + pre.mean_[0]
    np.testing.assert_allclose(raw, [1.0, 5.0], rtol=1e-6)


def test_preprocessor_validation() -> None:
    with pytest.raises(ValueError, match="max_steps"):
        EHRPreprocessor(max_steps=0)
    with pytest.raises(ValueError, match="window"):
        EHRPreprocessor(window="soon")
    with pytest.raises(ValueError, match="variables"):
        EHRPreprocessor(["a", "a"])
    with pytest.raises(RuntimeError):
        EHRPreprocessor().transform(_cohort(), ["tr1"])
    bad = _cohort().drop(columns="value")
    with pytest.raises(InputError, match="value"):
        EHRPreprocessor().fit(bad, ["tr1"])
    bad = _cohort()
    bad.loc[1, "time"] = np.nan
    with pytest.raises(InputError, match="time") as err:
        EHRPreprocessor().fit(bad, ["tr1"])
    assert err.value.row == 2 and err.value.patient == "tr1"


def test_transform_is_fast() -> None:
    rng = np.random.default_rng(0)
    n_pat, n_ev = 400, 100
    ev = pd.DataFrame({
        "patient_id": np.repeat([f"P{i:04d}" for i in range(n_pat)], n_ev),
        "time": rng.uniform(0, 365, n_pat * n_ev).round(2),
        "variable": rng.choice([f"v{j}" for j in range(12)], n_pat * n_ev),
        "value": rng.normal(size=n_pat * n_ev),
    })
    ids = [f"P{i:04d}" for i in range(n_pat)]
    pre = EHRPreprocessor(max_steps=64).fit(ev, ids[:300])
    t0 = time.perf_counter()
    out = pre.transform(ev, ids)
    elapsed = time.perf_counter() - t0
    assert out["values"].shape == (n_pat, 64, 12)
    assert elapsed < 1.0, f"transform took {elapsed:.2f} s"


# --------------------------------------------------------------------------- #
# datetimes and index times
# --------------------------------------------------------------------------- #
_DT_TEXT = ("patient_id,time,variable,value\n"
            "A,2021-01-01T12:00:00,hb,12\n"
            "A,2021-01-03,hb,11\n"
            "A,2020-12-30,hb,14\n"                 # before A's index time: excluded and counted
            "B,2021-02-01T06:00:00+01:00,hb,10\n"  # offset: 05:00 UTC
            "B,2021-02-02,crp,3\n")


@pytest.mark.parametrize("how", ["dict", "frame", "csv", "series"])
def test_datetimes_relative_to_index_times(tmp_path: Path, how: str) -> None:
    p = _write(tmp_path, _DT_TEXT)
    idx = {"A": "2021-01-01", "B": pd.Timestamp("2021-02-01")}
    if how == "frame":
        idx = pd.DataFrame({"patient_id": ["A", "B"], "index_time": ["2021-01-01", "2021-02-01T00:00"]})
    elif how == "csv":
        idx = _write(tmp_path, "patient_id,index_time\nB,2021-02-01\nA,2021-01-01\nC,2020-05-05\n", "index.csv")
    elif how == "series":
        idx = pd.Series(pd.to_datetime(["2021-01-01", "2021-02-01"]), index=["A", "B"])
    df = read_ehr_events(p, index_times=idx)
    assert df[["patient_id", "variable"]].values.tolist() == [["A", "hb"], ["A", "hb"], ["B", "hb"], ["B", "crp"]]
    np.testing.assert_allclose(df["time"], [0.5, 2.0, 5 / 24, 1.0])
    rep = df.attrs["report"]
    assert rep["time_kind"] == "datetime" and rep["time_unit"] == "days"
    assert rep["n_events_before_index"] == 1 and rep["n_patients_with_events_before_index"] == 1
    assert rep["n_rows"] == 5 and rep["n_events"] == 4
    hours = read_ehr_events(p, index_times=idx, time_unit="hours")
    np.testing.assert_allclose(hours["time"], [12.0, 48.0, 5.0, 24.0])
    assert hours.attrs["report"]["time_unit"] == "hours"


def test_datetime_events_go_through_preprocessor_with_window() -> None:
    ev = pd.DataFrame({"patient_id": ["A", "A", "A"], "time": ["2021-01-01", "2021-01-02", "2021-01-10"],
                       "variable": ["x", "x", "x"], "value": [1.0, 2.0, 3.0]})
    df = read_ehr_events(ev, index_times={"A": "2021-01-01"})
    pre = EHRPreprocessor(window=7.0).fit(df, ["A"])
    out = pre.transform(df, ["A"])
    assert out["lengths"].tolist() == [2]
    np.testing.assert_allclose(out["times"][0, :2], [0.0, 1.0])
    assert pre.report_["n_events_after_window"] == 1
    # raw datetimes handed to the preprocessor directly: a clear error, not a crash
    with pytest.raises(InputError, match="index_times"):
        EHRPreprocessor().fit(ev, ["A"])


def test_parquet_datetime_column(tmp_path: Path) -> None:
    p = tmp_path / "ehr.parquet"
    pd.DataFrame({"patient_id": ["A", "A"], "time": pd.to_datetime(["2021-01-01 06:00", "2021-01-02 00:00"]),
                  "variable": ["x", "x"], "value": [1.0, 2.0]}).to_parquet(p)
    df = read_ehr_events(p, index_times={"A": "2021-01-01"}, time_unit="hours")
    np.testing.assert_allclose(df["time"], [6.0, 24.0])


@pytest.mark.parametrize(
    "text, index, row, patient, field, match",
    [
        # datetimes without index times: explains how to give them
        (_DT_TEXT, None, 1, "A", "time", "index_times="),
        # a patient without an index time
        (_DT_TEXT, {"A": "2021-01-01"}, 4, "B", "index_time", "no index time"),
        # a number among datetimes
        ("patient_id,time,variable,value\nA,2021-01-01,x,1\nA,3,x,2\n", {"A": "2021-01-01"}, 2, "A", "time",
         "ISO 8601"),
        # an unparseable date among datetimes
        ("patient_id,time,variable,value\nA,2021-01-01,x,1\nA,2021-13-45,x,2\n", {"A": "2021-01-01"}, 2, "A",
         "time", "ISO 8601"),
        # a missing time among datetimes
        ("patient_id,time,variable,value\nA,2021-01-01,x,1\nA,,x,2\n", {"A": "2021-01-01"}, 2, "A", "time",
         "missing"),
        # index times given for numeric (already relative) times
        ("patient_id,time,variable,value\nA,0,x,1\n", {"A": "2021-01-01"}, None, None, "time",
         "already relative"),
    ],
)
def test_datetime_bad_inputs(tmp_path: Path, text: str, index, row, patient, field, match) -> None:
    p = _write(tmp_path, text)
    with pytest.raises(InputError, match=match) as err:
        read_ehr_events(p, index_times=index)
    e = err.value
    assert (e.file, e.row, e.patient, e.field) == (str(p), row, patient, field)


def test_index_times_bad_inputs(tmp_path: Path) -> None:
    p = _write(tmp_path, _DT_TEXT)
    bad = _write(tmp_path, "patient_id,index_time\nA,2021-01-01\nB,not a date\n", "idx.csv")
    with pytest.raises(InputError, match="ISO 8601") as err:
        read_ehr_events(p, index_times=bad)
    assert (err.value.file, err.value.row, err.value.patient, err.value.field) == (str(bad), 2, "B", "index_time")
    with pytest.raises(InputError, match="index_time") as err:
        read_ehr_events(p, index_times=pd.DataFrame({"patient_id": ["A"], "when": ["2021-01-01"]}))
    assert err.value.field == "index_time"
    with pytest.raises(InputError, match="two different index times") as err:
        read_ehr_events(p, index_times=pd.DataFrame({"patient_id": ["A", "B", "A"],
                                                     "index_time": ["2021-01-01", "2021-02-01", "2021-01-05"]}))
    assert err.value.patient == "A" and err.value.row == 3
    with pytest.raises(InputError, match="does not exist"):
        read_ehr_events(p, index_times=tmp_path / "nope.csv")
    with pytest.raises(ValueError, match="index_times"):
        read_ehr_events(p, index_times=42)
    with pytest.raises(ValueError, match="time_unit"):
        read_ehr_events(p, index_times={"A": "2021-01-01", "B": "2021-02-01"}, time_unit="weeks")


def test_numeric_negative_time_still_an_error(tmp_path: Path) -> None:
    p = _write(tmp_path, "patient_id,time,variable,value\nA,1,x,1\nA,-0.5,x,2\n")
    with pytest.raises(InputError, match="negative") as err:
        read_ehr_events(p)
    assert (err.value.row, err.value.patient, err.value.field) == (2, "A", "time")


# --------------------------------------------------------------------------- #
# unit harmonisation
# --------------------------------------------------------------------------- #
def test_unit_conversions_factor_and_function(tmp_path: Path) -> None:
    p = _write(tmp_path, "patient_id,time,variable,value,unit\n"
                         "A,0,glucose,90,mg/dL\n"
                         "A,1,glucose,5,mmol/L\n"
                         "A,1,glucose,108,mg/dL\n"           # same time, other unit: averaged after conversion
                         "A,2,temp,98.6,F\n"
                         "A,3,temp,37.5,C\n"
                         "A,3,crp,4,mg/L\n")
    conv = {"glucose": {"mg/dL": 1.0, "mmol/L": 18.0},
            "temp": {"C": 1, "F": lambda f: (f - 32.0) * 5.0 / 9.0}}
    df = read_ehr_events(p, unit_conversions=conv)
    glu = df[df.variable == "glucose"]
    np.testing.assert_allclose(glu["value"], [90.0, (90.0 + 108.0) / 2])
    assert glu["unit"].tolist() == ["mg/dL", "mg/dL"]            # canonical unit (factor 1)
    temp = df[df.variable == "temp"]
    np.testing.assert_allclose(temp["value"], [37.0, 37.5])
    assert temp["unit"].tolist() == ["C", "C"]
    assert df.loc[df.variable == "crp", "value"].item() == 4.0   # no conversion declared: untouched
    rep = df.attrs["report"]
    assert rep["n_unit_converted"] == {"glucose": {"mg/dL": 2, "mmol/L": 1}, "temp": {"C": 1, "F": 1}}
    assert rep["n_duplicates_averaged"] == 1
    # element-wise-only functions work too; keys are the names after renaming
    q = _write(tmp_path, "patient_id,time,variable,value,unit\nA,0,bili,1,mg/dL\nA,1,bili,20,umol/L\n", "b.csv")
    import math
    out = read_ehr_events(q, variables={"bili": "log_bili"},
                          unit_conversions={"log_bili": {"mg/dL": math.log, "umol/L": lambda x: math.log(x / 17.1)}})
    np.testing.assert_allclose(out["value"], [0.0, math.log(20 / 17.1)])


@pytest.mark.parametrize(
    "text, row, patient, match",
    [
        ("patient_id,time,variable,value,unit\nA,0,glucose,90,mg/dL\nB,1,glucose,5,mmol/l\n", 2, "B", "'mmol/l'"),
        ("patient_id,time,variable,value,unit\nA,0,glucose,90,mg/dL\nC,1,glucose,5,\n", 2, "C", "empty unit"),
    ],
)
def test_unit_without_conversion_is_an_error(tmp_path: Path, text: str, row: int, patient: str, match: str) -> None:
    p = _write(tmp_path, text)
    with pytest.raises(InputError, match=match) as err:
        read_ehr_events(p, unit_conversions={"glucose": {"mg/dL": 1.0, "mmol/L": 18.0}})
    e = err.value
    assert (e.file, e.row, e.patient, e.field) == (str(p), row, patient, "unit")
    assert "glucose" in str(e)


def test_unit_conversion_bad_arguments(tmp_path: Path) -> None:
    p = _write(tmp_path, "patient_id,time,variable,value\nA,0,glucose,90\n")
    with pytest.raises(InputError, match="no 'unit' column"):
        read_ehr_events(p, unit_conversions={"glucose": {"mg/dL": 1.0}})
    q = _write(tmp_path, "patient_id,time,variable,value,unit\nA,0,x,1,u\nA,1,x,-1,u\n", "neg.csv")
    import math
    with pytest.raises(InputError, match="non-finite") as err:
        read_ehr_events(q, unit_conversions={"x": {"u": math.log}})
    assert (err.value.row, err.value.field) == (2, "value")
    for bad in ({"glucose": {"mg/dL": "x"}}, {"glucose": {"mg/dL": 0}}, {"glucose": {}}, {"glucose": 2.0}, [1]):
        with pytest.raises(ValueError, match="unit_conversions"):
            read_ehr_events(p, unit_conversions=bad)


# --------------------------------------------------------------------------- #
# bucketing
# --------------------------------------------------------------------------- #
def test_bucket_merges_steps_and_averages() -> None:
    ev = _events([("p", 0.0, "a", 1.0), ("p", 0.3, "a", 3.0), ("p", 0.7, "b", 5.0),
                  ("p", 1.0, "a", 7.0), ("p", 2.5, "a", 9.0), ("p", 2.9, "b", 1.0),
                  ("q", 0.2, "a", 2.0)])
    pre = EHRPreprocessor(["a", "b"], bucket=1.0).fit(ev, ["p", "q"])
    out = pre.transform(ev, ["p", "q"])
    assert out["lengths"].tolist() == [3, 1]
    # step time = latest event time in the bucket
    np.testing.assert_allclose(out["times"][0, :3], [0.7, 1.0, 2.9])
    np.testing.assert_allclose(out["mask"][0, :3], [[1, 1], [1, 0], [1, 1]])
    raw = out["values"][0, :3] * pre.std_ + pre.mean_
    np.testing.assert_allclose(raw[:, 0], [2.0, 7.0, 9.0], rtol=1e-6)     # a: (1 + 3) / 2, 7, 9
    np.testing.assert_allclose(raw[[0, 2], 1], [5.0, 1.0], rtol=1e-6)
    np.testing.assert_allclose(out["delta"][0, :3], [[0, 0], [0.3, 0.3], [1.9, 2.2]], atol=1e-6)
    assert pre.report_["n_events_merged_by_bucket"] == 1               # the two a's of [0, 1)
    assert pre.report_["n_steps_merged_by_bucket"] == 3                # p: 0, 0.3, 0.7 -> 1; 2.5, 2.9 -> 1
    # the statistics are those of the bucketed values
    np.testing.assert_allclose(pre.mean_[0], np.mean([2.0, 7.0, 9.0, 2.0]))
    # default: one step per distinct time
    plain = EHRPreprocessor(["a", "b"]).fit(ev, ["p"])
    assert plain.transform(ev, ["p"])["lengths"].tolist() == [6]
    assert plain.report_["n_steps_merged_by_bucket"] == 0


def test_bucket_with_window_never_uses_later_events() -> None:
    ev = _events([("p", 0.5, "a", 1.0), ("p", 1.5, "a", 2.0), ("p", 1.9, "a", 100.0)])
    pre = EHRPreprocessor(["a"], bucket=1.0, window=1.6).fit(ev, ["p"])
    out = pre.transform(ev, ["p"])
    np.testing.assert_allclose(out["times"][0, :2], [0.5, 1.5])          # bucket [1, 2) stops at the window
    raw = out["values"][0, :2, 0] * pre.std_[0] + pre.mean_[0]
    np.testing.assert_allclose(raw, [1.0, 2.0], rtol=1e-6)


def test_bucket_floating_point_edges_and_validation() -> None:
    ev = _events([("p", 0.1, "a", 1.0), ("p", 0.3, "a", 2.0)])
    out = EHRPreprocessor(["a"], bucket=0.1).fit(ev, ["p"]).transform(ev, ["p"])
    assert out["lengths"].tolist() == [2]                                # 0.3 / 0.1 is bucket 3, not 2
    for bad in (0, -1.0, float("inf"), float("nan"), "day", True):
        with pytest.raises(ValueError, match="bucket"):
            EHRPreprocessor(bucket=bad)


def test_bucket_truncation_keeps_last_buckets() -> None:
    ev = _events([("p", float(t) / 2, "a", float(t)) for t in range(10)])   # times 0, 0.5, ..., 4.5
    pre = EHRPreprocessor(["a"], bucket=1.0, max_steps=2).fit(ev, ["p"])
    out = pre.transform(ev, ["p"])
    np.testing.assert_allclose(out["times"][0], [3.5, 4.5])
    assert pre.report_["n_steps_truncated"] == 3 and pre.report_["n_patients_truncated"] == 1
