import anndata as ad
import gseapy
import numpy as np
import pandas as pd
import pytest

from data_adapters.errors import InputError
from data_adapters.omics import filter_gene_sets, pathway_scores_for_cohort, read_expression, read_gmt, score_pathways


def _adata(n=12, g=300, seed=0):
    rng = np.random.default_rng(seed)
    X = rng.poisson(rng.gamma(2, 20, size=g), size=(n, g)).astype(np.float32)
    return ad.AnnData(X, obs=pd.DataFrame(index=[f"S{i}" for i in range(n)]),
                      var=pd.DataFrame(index=[f"G{j}" for j in range(g)]))


def _sets(g=300, seed=1):
    rng = np.random.default_rng(seed)
    return {f"SET{k}": [f"G{j}" for j in rng.choice(g, 25, replace=False)] for k in range(6)}


def test_scores_equal_gseapy_raw_es_and_record_params():
    a = _adata()
    sets = _sets()
    score_pathways(a, sets, min_size=5)
    ours = a.obsm["pathway_scores"]
    ref = gseapy.ssgsea(data=pd.DataFrame(a.X.T, index=a.var_names, columns=a.obs_names), gene_sets=sets,
                        sample_norm_method="rank", permutation_num=0, outdir=None, min_size=5, threads=1,
                        no_plot=True, verbose=False).res2d.pivot(index="Name", columns="Term", values="ES")
    np.testing.assert_allclose(ours.to_numpy(), ref.loc[ours.index, ours.columns].to_numpy(dtype=float), rtol=1e-5)
    assert a.uns["pathway_scores"]["params"]["method"] == "ssgsea"


def test_scores_are_per_sample_leak_free():
    a = _adata(n=12)
    sets = _sets()
    full = score_pathways(a, sets, min_size=5, copy=True).obsm["pathway_scores"]
    sub = score_pathways(a[:4].copy(), sets, min_size=5, copy=True).obsm["pathway_scores"]
    np.testing.assert_allclose(sub.to_numpy(), full.iloc[:4].to_numpy(), rtol=1e-6)


def test_planted_pathway_activity_is_recovered():
    a = _adata(n=30, seed=3)
    sets = _sets()
    factor = np.linspace(-2, 2, 30)
    cols = [a.var_names.get_loc(gn) for gn in sets["SET0"]]
    a.X[:, cols] = a.X[:, cols] * np.exp(0.8 * factor)[:, None]
    score_pathways(a, sets, min_size=5)
    r = np.corrcoef(a.obsm["pathway_scores"]["SET0"], factor)[0, 1]
    assert r > 0.8


def test_gmt_errors(tmp_path):
    p = tmp_path / "x.gmt"
    p.write_text("A\tdesc\tg1\tg2\nB\tdesc\n")
    with pytest.raises(InputError, match="'B' on line 2 lists no genes"):
        read_gmt(p)
    p.write_text("A\td\tg1\nA\td\tg2\n")
    with pytest.raises(InputError, match="defined twice"):
        read_gmt(p)


def test_no_overlap_and_dropped_sets_reported():
    with pytest.raises(InputError, match="identifiers"):
        filter_gene_sets({"A": ["X1", "X2"]}, pd.Index(["G1", "G2"]), min_size=1)
    kept, rep = filter_gene_sets({"A": ["G1", "G2", "Z"], "B": ["G1"]}, pd.Index(["G1", "G2", "G3"]), min_size=2)
    assert list(kept) == ["A"] and rep["dropped_sets"] == {"B": 1} and rep["members_missing_per_set"]["A"] == 1


def test_expression_bad_inputs(tmp_path):
    p = tmp_path / "e.csv"
    pd.DataFrame({"sample": ["S1", "S2"], "G1": [1, "x"], "G2": [3, 4]}).to_csv(p, index=False)
    with pytest.raises(InputError) as e:
        read_expression(p)
    assert e.value.patient == "S2" and e.value.field == "G1"
    pd.DataFrame({"sample": ["S1", "S2"], "G1": [1, np.nan], "G2": [3, 4]}).to_csv(p, index=False)
    with pytest.raises(InputError, match="NaN"):
        read_expression(p)
    pd.DataFrame({"sample": ["S1", "S2"], "g1": [1, 2], "G1": [3, 4]}).to_csv(p, index=False)
    with pytest.raises(InputError, match="duplicated gene"):
        read_expression(p)


def test_cohort_scores_count_missing_and_extra_samples(tmp_path):
    a = _adata(n=10)
    a.write_h5ad(tmp_path / "e.h5ad")
    (tmp_path / "s.gmt").write_text("\n".join(f"{k}\td\t" + "\t".join(v) for k, v in _sets().items()))
    pids = [f"S{i}" for i in range(8)] + ["NEW1"]
    scores, rep = pathway_scores_for_cohort(tmp_path / "e.h5ad", tmp_path / "s.gmt", pids, min_size=5)
    assert scores.shape[0] == 9 and scores.loc["NEW1"].isna().all()
    assert rep["n_samples_not_in_manifest"] == 2 and rep["n_patients_without_expression"] == 1
    assert rep["input_was_counts"]
