"""``radfusion score-pathways`` through its parser and ``run``."""
import argparse
import itertools

import anndata as ad
import numpy as np
import pandas as pd
import pytest

from apps.score_pathways import add_parser, run


def _parse(argv):
    p = argparse.ArgumentParser(prog="radfusion")
    sub = p.add_subparsers(dest="command", required=True)
    add_parser(sub)
    return p.parse_args(["score-pathways", *argv])


@pytest.fixture
def inputs(tmp_path):
    rng = np.random.default_rng(0)
    genes = ["".join(t) for t in itertools.product("ACDEGKLMPRST", repeat=3)][:200]  # symbol-like names
    X = rng.poisson(rng.gamma(2, 20, size=200), size=(15, 200))
    samples = [f"P{i:02d}" for i in range(15)]
    # genes x samples TSV: orientation detected
    pd.DataFrame(X.T, index=genes, columns=samples).rename_axis("gene").to_csv(tmp_path / "expr.tsv", sep="\t")
    sets = {f"SET{k}": [genes[j] for j in rng.choice(200, 20, replace=False)] for k in range(5)}
    sets["TINY"] = genes[:3]
    (tmp_path / "sets.gmt").write_text("\n".join(f"{k}\tdesc\t" + "\t".join(v) for k, v in sets.items()) + "\n")
    return tmp_path, samples, sorted(k for k in sets if k != "TINY")


def test_csv_output_ssgsea(inputs, capsys):
    d, samples, kept = inputs
    args = _parse(["--expr", str(d / "expr.tsv"), "--gene-sets", str(d / "sets.gmt"), "--min-size", "5",
                   "--out", str(d / "scores.csv")])
    assert args.func is run and run(args) == 0
    df = pd.read_csv(d / "scores.csv")
    assert df.columns[0] == "sample" and list(df["sample"]) == samples
    assert list(df.columns[1:]) == kept  # TINY (3 genes) dropped
    assert np.isfinite(df[kept].to_numpy()).all()
    out = capsys.readouterr().out
    assert '"gene_sets_dropped": 1' in out and '"orientation": "genes_x_samples"' in out


def test_h5ad_output_and_backends_agree(inputs):
    d, samples, kept = inputs
    common = ["--expr", str(d / "expr.tsv"), "--gene-sets", str(d / "sets.gmt"), "--min-size", "5"]
    assert run(_parse([*common, "--out", str(d / "fast.h5ad")])) == 0
    assert run(_parse([*common, "--backend", "gseapy", "--out", str(d / "ref.csv")])) == 0
    a = ad.read_h5ad(d / "fast.h5ad")
    assert list(a.obs_names) == samples and list(a.obsm["pathway_scores"].columns) == kept
    assert a.uns["pathway_scores"]["params"]["method"] == "ssgsea"
    ref = pd.read_csv(d / "ref.csv", index_col="sample")
    np.testing.assert_allclose(a.obsm["pathway_scores"].to_numpy(), ref[kept].to_numpy(), rtol=1e-5)


def test_gsva_fits_on_all_samples_and_says_so(inputs, capsys):
    d, samples, kept = inputs
    args = _parse(["--expr", str(d / "expr.tsv"), "--gene-sets", str(d / "sets.gmt"), "--min-size", "5",
                   "--method", "gsva", "--out", str(d / "g.csv")])
    assert run(args) == 0
    out = capsys.readouterr().out
    assert "fitted on all 15 samples" in out and "Poisson" in out  # counts -> Poisson kernel
    assert pd.read_csv(d / "g.csv").shape == (15, 1 + len(kept))


def test_run_accepts_a_plain_namespace(inputs):
    d, samples, kept = inputs
    ns = argparse.Namespace(expr=str(d / "expr.tsv"), gene_sets=str(d / "sets.gmt"), method="ssgsea",
                            backend="fast", min_size=5, max_size=500, out=str(d / "ns.csv"))
    assert run(ns) == 0 and (d / "ns.csv").exists()


@pytest.mark.parametrize("case", ["missing_expr", "bad_gmt", "no_overlap", "bad_suffix", "bad_cell"])
def test_bad_input_exits_2_with_message(inputs, capsys, case):
    d, samples, kept = inputs
    expr, gmt, out = d / "expr.tsv", d / "sets.gmt", d / "o.csv"
    if case == "missing_expr":
        expr = d / "nope.h5ad"
    elif case == "bad_gmt":
        gmt = d / "bad.gmt"
        gmt.write_text("ONLY_NAME\tdesc\n")
    elif case == "no_overlap":
        gmt = d / "other.gmt"
        gmt.write_text("X\td\tA1\tA2\tA3\tA4\tA5\n")
    elif case == "bad_suffix":
        out = d / "o.xlsx"
    elif case == "bad_cell":
        df = pd.read_csv(expr, sep="\t", index_col=0).astype(object)
        df.iloc[4, 2] = "oops"
        df.to_csv(expr, sep="\t")
    code = run(_parse(["--expr", str(expr), "--gene-sets", str(gmt), "--min-size", "5", "--out", str(out)]))
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("radfusion score-pathways: error:")
    expected = {"missing_expr": "does not exist", "bad_gmt": "lists no genes", "no_overlap": "identifiers",
                "bad_suffix": ".csv or .h5ad", "bad_cell": "patient P02, field 'AAG'"}[case]
    assert expected in err
    assert not out.exists()
