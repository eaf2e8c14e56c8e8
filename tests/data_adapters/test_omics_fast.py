"""Fast ssGSEA and fold-safe GSVA against gseapy (the reference implementation)."""
import importlib.util
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
from scipy.stats import spearmanr

from data_adapters.errors import InputError
from data_adapters.omics import (
    GSVAScorer,
    PathwayScorer,
    _gsva_gseapy,
    _ssgsea_gseapy,
    _stable_order_and_ranks,
    filter_gene_sets,
    read_gmt,
    ssgsea_es,
)

BENCH = Path(__file__).resolve().parents[2] / "benchmarks" / "pathways.py"


def _reactome_gmt() -> Path:
    spec = importlib.util.find_spec("sigc")
    if spec is None or spec.origin is None:
        pytest.skip("sigc (REACTOME_metabolism.gmt) not installed")
    p = Path(spec.origin).parent / "resources" / "REACTOME_metabolism.gmt"
    if not p.exists():
        pytest.skip("sigc has no REACTOME_metabolism.gmt")
    return p


def _min_spearman(a: np.ndarray, b: np.ndarray) -> float:
    return min(spearmanr(a[:, j], b[:, j])[0] for j in range(a.shape[1]))


@pytest.fixture(scope="module")
def pbmc():
    sc = pytest.importorskip("scanpy")
    a = sc.datasets.pbmc68k_reduced()
    sets = read_gmt(_reactome_gmt())
    raw = np.asarray(a.raw.X.toarray() if hasattr(a.raw.X, "toarray") else a.raw.X, dtype=np.float64)
    genes = pd.Index([g.upper() for g in a.raw.var_names])
    kept, _ = filter_gene_sets(sets, genes, min_size=5)
    return a, raw, genes, kept


@pytest.mark.parametrize("which", ["raw", "X"])
def test_fast_ssgsea_matches_gseapy_on_pbmc68k_reduced(pbmc, which):
    a, raw, genes, kept = pbmc
    # .raw: log-normalised counts, full of tied zeros; .X: scaled values with negatives
    X = raw if which == "raw" else np.asarray(a.X, dtype=np.float64)
    assert len(kept) >= 10  # Reactome metabolism sets keeping >= 5 of the 765 genes
    ours = ssgsea_es(X, genes, kept)
    ref = _ssgsea_gseapy(X, a.obs_names, genes, kept, weight=0.25, min_size=5, max_size=500, threads=1)
    ref = ref.loc[a.obs_names, list(kept)].to_numpy()
    assert _min_spearman(ours, ref) >= 0.999
    np.testing.assert_allclose(ours, ref, rtol=1e-9, atol=1e-8)


def test_fast_ssgsea_matches_gseapy_on_synthetic_matrix():
    spec = importlib.util.spec_from_file_location("bench_pathways", BENCH)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    X, genes, sets = bench.synthetic(n_genes=2000, n_samples=60, n_sets=10, seed=3)
    ours = ssgsea_es(X, genes, sets)
    obs = pd.Index([f"S{i}" for i in range(60)])
    ref = _ssgsea_gseapy(X.astype(np.float64), obs, genes, sets, weight=0.25, min_size=1, max_size=5000,
                         threads=1).loc[obs, list(sets)].to_numpy()
    assert _min_spearman(ours, ref) >= 0.999
    np.testing.assert_allclose(ours, ref, rtol=1e-9, atol=1e-8)


@pytest.mark.slow
def test_fast_ssgsea_matches_gseapy_20000_genes_500_samples_50_sets():
    spec = importlib.util.spec_from_file_location("bench_pathways", BENCH)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    res = bench.run(20000, 500, 50, threads=2, verbose=False)
    assert res["min_spearman"] >= 0.999 and res["max_abs_diff"] < 1e-6
    assert res["speedup"] > 5  # the >= 20x target is reported by the benchmark; CI machines are noisy


def test_fast_ssgsea_float64_and_float32_paths_and_threads_agree():
    rng = np.random.default_rng(0)
    X64 = rng.normal(size=(30, 400))
    X64[:, :50] = 0.0  # ties
    genes = pd.Index([f"G{i}" for i in range(400)])
    sets = {f"S{k}": list(genes[rng.choice(400, 30, replace=False)]) for k in range(5)}
    ref = _ssgsea_gseapy(X64, pd.Index([f"s{i}" for i in range(30)]), genes, sets, weight=0.25, min_size=1,
                         max_size=500, threads=1).loc[[f"s{i}" for i in range(30)], list(sets)].to_numpy()
    np.testing.assert_allclose(ssgsea_es(X64, genes, sets), ref, rtol=1e-9, atol=1e-8)
    np.testing.assert_allclose(ssgsea_es(X64, genes, sets, n_jobs=2, chunk_size=7), ref, rtol=1e-9, atol=1e-8)
    X32 = X64.astype(np.float32)
    ref32 = _ssgsea_gseapy(X32.astype(np.float64), pd.Index([f"s{i}" for i in range(30)]), genes, sets, weight=0.25,
                           min_size=1, max_size=500, threads=1).loc[[f"s{i}" for i in range(30)], list(sets)]
    np.testing.assert_allclose(ssgsea_es(X32, genes, sets), ref32.to_numpy(), rtol=1e-9, atol=1e-8)


def test_stable_order_and_average_ranks_match_numpy_and_scipy():
    from scipy.stats import rankdata

    rng = np.random.default_rng(1)
    cases = [rng.normal(size=(4, 200)), np.round(rng.normal(size=(4, 200)), 1),
             np.round(rng.normal(size=(4, 200)), 1).astype(np.float32).astype(np.float64),
             np.array([[0.0, -0.0, 1, -1, 0, 2, -1e30, 1e-40, -1e-40, 7, 7]]), np.zeros((2, 9))]
    for X in cases:
        o, tie_idx, tie_r2 = _stable_order_and_ranks(X)
        np.testing.assert_array_equal(o, np.argsort(X, axis=1, kind="stable"))
        r2 = np.tile(np.arange(2, 2 * X.shape[1] + 2, 2), X.shape[0]).astype(float)
        r2[tie_idx] = tie_r2
        np.testing.assert_allclose(r2.reshape(X.shape) / 2, np.take_along_axis(rankdata(X, axis=1), o, 1))


def test_torch_backend_equals_numpy():
    pytest.importorskip("torch")
    rng = np.random.default_rng(2)
    X = np.round(rng.normal(size=(20, 300)), 1)
    genes = pd.Index([f"G{i}" for i in range(300)])
    sets = {f"S{k}": list(genes[rng.choice(300, 25, replace=False)]) for k in range(4)}
    np.testing.assert_allclose(ssgsea_es(X, genes, sets, device="cpu-torch", chunk_size=8), ssgsea_es(X, genes, sets),
                               rtol=1e-10, atol=1e-9)


def test_ssgsea_es_validates():
    genes = pd.Index(["A", "B", "C"])
    with pytest.raises(ValueError, match="gene_names"):
        ssgsea_es(np.ones((2, 3)), ["A"], {"S": ["A"]})
    with pytest.raises(ValueError, match="every measured gene"):
        ssgsea_es(np.ones((2, 3)), genes, {"S": ["A", "B", "C"]})
    with pytest.raises(ValueError, match="NaN"):
        ssgsea_es(np.array([[1.0, np.nan, 2.0]]), genes, {"S": ["A"]})


# --------------------------------------------------------------------- GSVA
def _gsva_data(n=25, g=300, seed=0):
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, g)) * rng.gamma(2, 1, size=g) + rng.normal(size=g) * 3
    genes = [f"G{i}" for i in range(g)]
    sets = {f"S{k}": [genes[j] for j in rng.choice(g, 20, replace=False)] for k in range(8)}
    a = ad.AnnData(X, obs=pd.DataFrame(index=[f"s{i}" for i in range(n)]), var=pd.DataFrame(index=genes))
    return a, sets


def test_gsva_fit_on_all_equals_gseapy_gsva():
    a, sets = _gsva_data()
    ours = GSVAScorer(sets, min_size=5).fit_transform(a)
    ref = _gsva_gseapy(a.X, a.obs_names, a.var_names, sets, kcdf="Gaussian", tau=1.0, mx_diff=True,
                       abs_ranking=False, min_size=5, max_size=500, threads=1).loc[ours.index, ours.columns]
    np.testing.assert_allclose(ours.to_numpy(), ref.to_numpy(), atol=1e-10)
    exact = GSVAScorer(sets, min_size=5, cdf="exact").fit_transform(a)  # exact normal CDF instead of R's table
    assert np.abs(exact.to_numpy() - ref.to_numpy()).max() < 0.02
    assert _min_spearman(exact.to_numpy(), ref.to_numpy()) > 0.99


def test_gsva_on_pbmc68k_subset_equals_gseapy(pbmc):
    a, raw, genes, kept = pbmc
    b = ad.AnnData(raw[:120], obs=pd.DataFrame(index=a.obs_names[:120]), var=pd.DataFrame(index=genes))
    ours = GSVAScorer(kept, min_size=5).fit_transform(b)
    ref = _gsva_gseapy(raw[:120], b.obs_names, genes, kept, kcdf="Gaussian", tau=1.0, mx_diff=True,
                       abs_ranking=False, min_size=5, max_size=500, threads=1).loc[ours.index, ours.columns]
    np.testing.assert_allclose(ours.to_numpy(), ref.to_numpy(), atol=1e-8)


def test_gsva_poisson_close_to_gseapy():
    rng = np.random.default_rng(4)
    a, sets = _gsva_data()
    a.X = rng.poisson(rng.gamma(2, 5, size=a.n_vars), size=a.shape).astype(np.float64)
    sc = GSVAScorer(sets, kcdf="auto", min_size=5).fit(a)
    assert sc.kcdf_ == "Poisson"
    ours = sc.transform(a)
    ref = _gsva_gseapy(a.X, a.obs_names, a.var_names, sets, kcdf="Poisson", tau=1.0, mx_diff=True,
                       abs_ranking=False, min_size=5, max_size=500, threads=1).loc[ours.index, ours.columns]
    assert np.abs(ours.to_numpy() - ref.to_numpy()).max() < 5e-3


def test_gsva_held_out_scores_do_not_depend_on_other_held_out_samples():
    a, sets = _gsva_data(n=40)
    train, test = a[:25].copy(), a[25:].copy()
    sc = GSVAScorer(sets, min_size=5).fit(train)
    all_test = sc.transform(test)
    alone = sc.transform(test[[3]].copy())
    fewer = sc.transform(test[[0, 3, 7]].copy())
    more = sc.transform(ad.concat([test, a[:5]], index_unique="-dup"))
    np.testing.assert_allclose(alone.to_numpy(), all_test.iloc[[3]].to_numpy(), atol=1e-12)
    np.testing.assert_allclose(fewer.iloc[[1]].to_numpy(), all_test.iloc[[3]].to_numpy(), atol=1e-12)
    np.testing.assert_allclose(more.iloc[:15].to_numpy(), all_test.to_numpy(), atol=1e-12)
    # ... but they do depend on the training reference (it is not a per-sample score)
    other = GSVAScorer(sets, min_size=5).fit(a[5:30].copy()).transform(test)
    assert np.abs(other.to_numpy() - all_test.to_numpy()).max() > 1e-3


def test_gsva_statistic_variants_and_constant_genes():
    a, sets = _gsva_data()
    a.X[:, 0] = 1.5  # constant gene in training -> neutral statistic
    for kw in ({}, {"abs_ranking": True}, {"mx_diff": False}):
        s = GSVAScorer(sets, min_size=5, **kw).fit(a)
        out = s.transform(a)
        assert np.isfinite(out.to_numpy()).all()
    assert s.n_constant_genes_ == 1
    assert (s.gene_statistics(a)[:, 0] == 0).all()


def test_gsva_errors():
    a, sets = _gsva_data()
    with pytest.raises(RuntimeError, match="not fitted"):
        GSVAScorer(sets).transform(a)
    with pytest.raises(ValueError, match="kcdf"):
        GSVAScorer(sets, kcdf="Epanechnikov")
    sc = GSVAScorer(sets, min_size=5).fit(a)
    with pytest.raises(InputError, match="missing") as e:
        sc.transform(a[:, 10:].copy())
    assert e.value.field == "var_names"
    with pytest.raises(InputError, match="at least 2"):
        GSVAScorer(sets, min_size=5).fit(a[:1].copy())
    b = a.copy()
    b.X[0, 0] = -1
    with pytest.raises(InputError, match="Poisson") as e:
        GSVAScorer(sets, kcdf="Poisson", min_size=5).fit(b)
    assert e.value.patient == "s0" and e.value.field == "G0"


def test_pathway_scorer_combat_then_gsva_is_fit_on_training_only():
    rng = np.random.default_rng(5)
    a, sets = _gsva_data(n=48)
    a.obs["site"] = np.repeat(["A", "B", "C"], 16)
    a.X = a.X + np.repeat([0.0, 2.0, -1.0], 16)[:, None] * rng.normal(size=a.n_vars)
    tr = np.r_[0:10, 16:26, 32:42]
    te = np.setdiff1d(np.arange(48), tr)
    ps = PathwayScorer(sets, method="gsva", min_size=5, combat_batch_key="site").fit(a[tr].copy())
    full = ps.transform(a[te].copy())
    part = ps.transform(a[te[:5]].copy())
    np.testing.assert_allclose(part.to_numpy(), full.iloc[:5].to_numpy(), atol=1e-12)
    assert ps.report_["combat_batches"] == ["A", "B", "C"] and ps.report_["n_train"] == 30
    ss = PathwayScorer(sets, method="ssgsea", min_size=5).fit(a[tr].copy())
    np.testing.assert_allclose(ss.transform(a).to_numpy(), ssgsea_es(a.X, a.var_names, ss.gene_sets_), atol=1e-12)
    with pytest.raises(ValueError, match="gseapy"):
        PathwayScorer(sets, method="gsva", backend="gseapy")
