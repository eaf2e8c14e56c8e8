"""Expression + clinical model (radfusion encoders, Cox loss) vs clinical-only CoxPH on GSE7390.

The benchmark is ``benchmarks/omics_breast_cancer.py``; these tests run it on
one outer seed (quick; deselected when the slow one runs) and on three (slow) and require our
mean held-out c-index to be at least lifelines' clinical-only CoxPH's.
"""
import importlib.util
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("sksurv")
pytest.importorskip("lifelines")

BENCH = Path(__file__).resolve().parents[2] / "benchmarks" / "omics_breast_cancer.py"


def _bench():
    spec = importlib.util.spec_from_file_location("bench_omics_breast_cancer", BENCH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_data_and_clinical_design():
    bench = _bench()
    G, C, e, t = bench.load()
    assert G.shape == (198, 76) and C.shape == (198, 5) and int(e.sum()) == 51
    assert list(C.columns) == ["age", "size", "er_positive", "grade_intermediate", "grade_poor"]
    assert np.isfinite(C.to_numpy()).all() and (t > 0).all()


@pytest.mark.quick_variant_of("test_expression_plus_clinical_beats_clinical_cox_three_seeds")
def test_expression_plus_clinical_beats_clinical_cox_one_seed():
    res = _bench().run(seeds=(0,), n_inner=3, verbose=False)
    assert len(res["ours"]) == 5
    assert res["mean_ours"] >= res["mean_clinical_cox"], res


@pytest.mark.slow
def test_expression_plus_clinical_beats_clinical_cox_three_seeds():
    res = _bench().run(seeds=(0, 1, 2), n_inner=5, verbose=False)
    assert res["mean_ours"] >= res["mean_clinical_cox"], res
    assert sum(s["ours"] >= s["clinical_cox"] for s in res["per_seed"]) >= 2
