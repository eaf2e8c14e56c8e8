import anndata as ad
import gseapy
import numpy as np
import pandas as pd
import pytest

from data_adapters.errors import InputError
from data_adapters.omics import (
    aggregate_duplicate_genes,
    detect_orientation,
    detect_value_type,
    filter_gene_sets,
    harmonise_gene_ids,
    looks_like_counts,
    pathway_scores_for_cohort,
    read_expression,
    read_gmt,
    score_pathways,
)


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
    score_pathways(a, sets, min_size=5, backend="gseapy")
    ours = a.obsm["pathway_scores"]
    fast = score_pathways(a, sets, min_size=5, copy=True).obsm["pathway_scores"]
    np.testing.assert_allclose(fast.to_numpy(), ours.to_numpy(), rtol=1e-5)
    ref = gseapy.ssgsea(data=pd.DataFrame(a.X.T, index=a.var_names, columns=a.obs_names), gene_sets=sets,
                        sample_norm_method="rank", permutation_num=0, outdir=None, min_size=5, threads=1,
                        no_plot=True, verbose=False).res2d.pivot(index="Name", columns="Term", values="ES")
    np.testing.assert_allclose(ours.to_numpy(), ref.loc[ours.index, ours.columns].to_numpy(dtype=float), rtol=1e-5)
    assert a.uns["pathway_scores"]["params"]["method"] == "ssgsea"
    assert a.uns["pathway_scores"]["params"]["backend"] == "gseapy"


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
        read_expression(p, duplicates="error")
    a = read_expression(p)  # default: aggregated (counts -> sum) and reported
    assert list(a.var_names) == ["G1"] and a.X[:, 0].tolist() == [4, 6]
    assert a.uns["expression_report"]["duplicated_genes"] == {"G1": 2}


def test_cohort_scores_count_missing_and_extra_samples(tmp_path):
    a = _adata(n=10)
    a.write_h5ad(tmp_path / "e.h5ad")
    (tmp_path / "s.gmt").write_text("\n".join(f"{k}\td\t" + "\t".join(v) for k, v in _sets().items()))
    pids = [f"S{i}" for i in range(8)] + ["NEW1"]
    scores, rep = pathway_scores_for_cohort(tmp_path / "e.h5ad", tmp_path / "s.gmt", pids, min_size=5)
    assert scores.shape[0] == 9 and scores.loc["NEW1"].isna().all()
    assert rep["n_samples_not_in_manifest"] == 2 and rep["n_patients_without_expression"] == 1
    assert rep["input_was_counts"]


# ---------------------------------------------------------------- readers
SYMBOLS = ["TP53", "BRCA1", "EGFR", "MYC", "KRAS", "PTEN", "CD8A", "CD4", "GAPDH", "ACTB", "VEGFA", "ERBB2",
           "CDK4", "MDM2", "RB1", "APC", "SMAD4", "NOTCH1", "JAK2", "STAT3", "IL6", "TNF", "CXCL8", "FOXP3",
           "GZMB", "PRF1", "IFNG", "HLA-A", "B2M", "MKI67"]


def _gene_table(n_samples=5, seed=0):
    rng = np.random.default_rng(seed)
    return pd.DataFrame(rng.poisson(20, size=(len(SYMBOLS), n_samples)), index=SYMBOLS,
                        columns=[f"PT{i:03d}" for i in range(n_samples)])


@pytest.mark.parametrize("suffix", [".csv", ".tsv", ".csv.gz", ".parquet"])
def test_genes_x_samples_tables_are_detected_and_transposed(tmp_path, suffix):
    df = _gene_table()
    p = tmp_path / f"e{suffix}"
    if suffix == ".parquet":
        df.rename_axis("gene").reset_index().to_parquet(p)
    else:
        df.rename_axis("gene").to_csv(p, sep="\t" if suffix == ".tsv" else ",")
    a = read_expression(p)
    assert a.shape == (5, len(SYMBOLS)) and list(a.obs_names) == list(df.columns)
    assert a.uns["expression_report"]["orientation"] == "genes_x_samples"
    np.testing.assert_array_equal(a[:, "TP53"].X.ravel(), df.loc["TP53"].to_numpy())


@pytest.mark.parametrize("suffix", [".csv", ".parquet"])
def test_samples_x_genes_tables_stay(tmp_path, suffix):
    df = _gene_table(n_samples=40).T  # 40 samples x 30 genes
    p = tmp_path / f"e{suffix}"
    df.rename_axis("sample").reset_index().to_parquet(p) if suffix == ".parquet" else df.to_csv(p)
    a = read_expression(p)
    assert a.shape == (40, 30) and a.uns["expression_report"]["orientation"] == "samples_x_genes"


def test_explicit_orientation_overrides_detection(tmp_path):
    df = _gene_table()
    p = tmp_path / "e.csv"
    df.to_csv(p)
    a = read_expression(p, orientation="samples_x_genes")
    assert a.shape == (30, 5) and a.uns["expression_report"]["reason"] == "set explicitly"
    with pytest.raises(ValueError, match="orientation"):
        read_expression(p, orientation="rows")


def test_h5ad_genes_x_samples_is_transposed_on_request(tmp_path):
    a = _adata(n=4, g=20)
    a.T.copy().write_h5ad(tmp_path / "t.h5ad")
    b = read_expression(tmp_path / "t.h5ad", orientation="genes_x_samples")
    assert b.shape == (4, 20) and list(b.obs_names) == list(a.obs_names)
    c = read_expression(tmp_path / "t.h5ad")  # AnnData convention kept as is
    assert c.shape == (20, 4)


def test_detect_orientation_rules():
    samples = [f"S{i}" for i in range(10)]
    ens = [f"ENSG{i:011d}.{i % 3 + 1}" for i in range(100)]
    assert detect_orientation(ens, samples)[0] == "genes_x_samples"
    assert detect_orientation(samples, ens)[0] == "samples_x_genes"
    assert detect_orientation(SYMBOLS, samples[:5])[0] == "genes_x_samples"
    assert detect_orientation(SYMBOLS, samples[:5] * 4)[0] == "samples_x_genes"  # not many more rows
    assert detect_orientation(samples * 5, SYMBOLS)[0] == "samples_x_genes"


def test_gene_id_harmonisation():
    idx, rep = harmonise_gene_ids([" tp53", "ENSG00000141510.17", "ENSG00000002586.20_PAR_Y", "Hla-a",
                                   "ENST00000269305.9"])
    assert list(idx) == ["TP53", "ENSG00000141510", "ENSG00000002586_PAR_Y", "HLA-A", "ENST00000269305"]
    assert rep == {"n_gene_ids_upper_cased": 2, "n_ensembl_versions_stripped": 3}


def test_ensembl_versions_merge_and_rule_depends_on_value_type(tmp_path):
    counts = pd.DataFrame({"ENSG00000141510.16": [1, 2], "ENSG00000141510.17": [10, 20], "ENSG00000012048.3": [5, 6]},
                          index=["S1", "S2"])
    counts.to_csv(tmp_path / "c.csv")
    a = read_expression(tmp_path / "c.csv")
    rep = a.uns["expression_report"]
    assert rep["value_type"] == "counts" and rep["duplicate_rule"] == "sum" and rep["n_ensembl_versions_stripped"] == 3
    assert a[:, "ENSG00000141510"].X.ravel().tolist() == [11, 22]
    logs = counts.astype(float) / 7.3
    logs.to_csv(tmp_path / "l.csv")
    b = read_expression(tmp_path / "l.csv")
    assert b.uns["expression_report"]["duplicate_rule"] == "mean"
    np.testing.assert_allclose(b[:, "ENSG00000141510"].X.ravel(), [11 / 14.6, 22 / 14.6], rtol=1e-5)
    c = read_expression(tmp_path / "l.csv", duplicates="max")
    np.testing.assert_allclose(c[:, "ENSG00000141510"].X.ravel(), [10 / 7.3, 20 / 7.3], rtol=1e-5)


def test_aggregate_duplicates_keeps_unique_genes_untouched():
    a = ad.AnnData(np.array([[1.0, 2.0, 3.0]]), var=pd.DataFrame(index=["A", "B", "C"]))
    b, rep = aggregate_duplicate_genes(a)
    assert b is a and rep["n_duplicated_genes"] == 0


def test_value_types():
    rng = np.random.default_rng(0)
    assert detect_value_type(rng.poisson(30, size=(5, 50))) == "counts"
    assert looks_like_counts(rng.poisson(3, size=(5, 50)))
    assert detect_value_type(np.log1p(rng.poisson(30, size=(5, 50)) * 1.37)) == "log"
    assert detect_value_type(rng.gamma(2, 200, size=(5, 50))) == "linear"
    assert detect_value_type(rng.normal(size=(5, 50))) == "signed"
    assert not looks_like_counts(np.eye(3))


def test_unknown_suffix_and_unreadable_files(tmp_path):
    p = tmp_path / "e.xyz"
    p.write_text("hello")
    with pytest.raises(InputError, match="no omics adapter"):
        read_expression(p)
    q = tmp_path / "bad.h5ad"
    q.write_text("not hdf5")
    with pytest.raises(InputError, match="cannot read AnnData"):
        read_expression(q)
    with pytest.raises(InputError, match="does not exist"):
        read_expression(tmp_path / "missing.csv")


def test_non_numeric_cell_is_located_in_genes_x_samples_table(tmp_path):
    df = _gene_table().astype(object)
    df.loc["EGFR", "PT002"] = "n/a?"
    df.to_csv(tmp_path / "e.csv")
    with pytest.raises(InputError) as e:
        read_expression(tmp_path / "e.csv")
    assert e.value.patient == "PT002" and e.value.field == "EGFR"


def test_filter_report_names_unmeasured_set_genes():
    kept, rep = filter_gene_sets({"A": ["G1", "G2", "X9"], "B": ["G1", "G2", "G3"]}, pd.Index(["G1", "G2", "G3", "G4"]),
                                 min_size=2)
    assert rep["n_set_genes_not_measured"] == 1 and rep["set_genes_not_measured_examples"] == ["X9"]
    assert rep["n_genes_in_no_set"] == 1
    kept, rep = filter_gene_sets({"ALL": ["G1", "G2"], "A": ["G1"]}, pd.Index(["G1", "G2"]), min_size=1)
    assert "ALL" in rep["dropped_sets"] and list(kept) == ["A"]  # a set covering every gene has no ES


def test_gmt_harmonises_identifiers(tmp_path):
    p = tmp_path / "s.gmt"
    p.write_text("A\td\ttp53\tENSG00000141510.17\tTP53\n")
    assert read_gmt(p) == {"A": ["TP53", "ENSG00000141510"]}


def test_score_pathways_validates_arguments():
    a = _adata()
    with pytest.raises(ValueError, match="method"):
        score_pathways(a, _sets(), method="plage")
    with pytest.raises(ValueError, match="backend"):
        score_pathways(a, _sets(), backend="rust")
    with pytest.raises(InputError, match="layer"):
        score_pathways(a, _sets(), layer="nope")


def test_gsva_through_score_pathways_records_transductive_fit():
    a = _adata(n=15)
    b = score_pathways(a, _sets(), method="gsva", min_size=5, copy=True)
    p = b.uns["pathway_scores"]["params"]
    assert p["method"] == "gsva" and p["fitted_on"].startswith("all 15") and p["kcdf"] == "Gaussian"
    assert b.obsm["pathway_scores"].shape == (15, 6) and "pathway_scores" not in a.obsm


def test_cohort_gsva_requires_training_ids_and_is_fold_safe(tmp_path):
    a = _adata(n=12)
    a.write_h5ad(tmp_path / "e.h5ad")
    (tmp_path / "s.gmt").write_text("\n".join(f"{k}\td\t" + "\t".join(v) for k, v in _sets().items()))
    pids = [f"S{i}" for i in range(12)]
    with pytest.raises(ValueError, match="fit_ids"):
        pathway_scores_for_cohort(tmp_path / "e.h5ad", tmp_path / "s.gmt", pids, min_size=5, method="gsva")
    full, rep = pathway_scores_for_cohort(tmp_path / "e.h5ad", tmp_path / "s.gmt", pids, min_size=5, method="gsva",
                                          fit_ids=pids[:8])
    sub, _ = pathway_scores_for_cohort(tmp_path / "e.h5ad", tmp_path / "s.gmt", pids[:8] + pids[10:], min_size=5,
                                       method="gsva", fit_ids=pids[:8])
    # held-out S10, S11 do not depend on whether S8, S9 are scored too
    np.testing.assert_allclose(sub.loc[["S10", "S11"]].to_numpy(), full.loc[["S10", "S11"]].to_numpy(), rtol=1e-6)
    assert rep["method"] == "gsva" and rep["kcdf"] == "Gaussian" and rep["n_train"] == 8


def test_cohort_fast_and_gseapy_backends_agree(tmp_path):
    a = _adata(n=10)
    a.write_h5ad(tmp_path / "e.h5ad")
    (tmp_path / "s.gmt").write_text("\n".join(f"{k}\td\t" + "\t".join(v) for k, v in _sets().items()))
    pids = [f"S{i}" for i in range(10)]
    f, _ = pathway_scores_for_cohort(tmp_path / "e.h5ad", tmp_path / "s.gmt", pids, min_size=5)
    g, _ = pathway_scores_for_cohort(tmp_path / "e.h5ad", tmp_path / "s.gmt", pids, min_size=5, backend="gseapy")
    np.testing.assert_allclose(f.to_numpy(), g.to_numpy(), rtol=1e-5)
