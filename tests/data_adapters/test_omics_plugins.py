"""Omics adapter / gene-set source registries and entry-point discovery."""
import sys
import textwrap

import numpy as np
import pytest

from data_adapters import omics_plugins as op
from data_adapters.errors import InputError
from data_adapters.omics import read_expression, read_gene_sets


@pytest.fixture
def clean_registries():
    """Snapshot and restore both registries around a test that registers things."""
    saved = []
    for reg in (op._ADAPTERS, op._GENE_SETS):
        op._ensure_builtin()
        saved.append((reg, dict(reg.items), dict(reg.suffixes), dict(reg.origin), dict(reg.broken), reg._discovered))
    yield
    for reg, items, suffixes, origin, broken, disc in saved:
        reg.items, reg.suffixes, reg.origin, reg.broken, reg._discovered = items, suffixes, origin, broken, disc


def test_builtins_are_listed_and_unknown_names_list_valid_ones():
    assert {"csv", "h5ad", "parquet", "tsv"} <= set(op.list_omics_adapters())
    assert "gmt" in op.list_gene_set_sources()
    with pytest.raises(ValueError) as e:
        op.get_omics_adapter("loom9000")
    for name in op.list_omics_adapters():
        assert name in str(e.value)
    with pytest.raises(ValueError, match="valid names: .*gmt"):
        op.get_gene_set_source("msigdb-online")
    assert op.adapter_for_path("x/expr.CSV.gz") == "csv"
    assert op.adapter_for_path("x/expr.txt") == "tsv"
    assert op.adapter_for_path("x/expr.unknown") is None


def test_registered_adapter_is_used_by_suffix_and_its_output_is_harmonised(tmp_path, clean_registries):
    import anndata as ad
    import pandas as pd

    @op.register_omics_adapter("npz_expr", suffixes=(".npz",))
    def read_npz(path, **kwargs):
        z = np.load(path, allow_pickle=False)
        return ad.AnnData(z["X"], obs=pd.DataFrame(index=z["samples"]), var=pd.DataFrame(index=z["genes"]))

    p = tmp_path / "e.npz"
    np.savez(p, X=np.array([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]]), samples=np.array(["a", "b"]),
             genes=np.array(["tp53", "ENSG00000141510.3", "egfr"]))
    a = read_expression(p)
    assert a.uns["expression_report"]["adapter"] == "npz_expr"
    assert list(a.var_names) == ["TP53", "ENSG00000141510", "EGFR"]
    with pytest.raises(ValueError, match="already registered"):
        op.register_omics_adapter("npz_expr")(lambda path: None)
    op.register_omics_adapter("bad", suffixes=(".bad",))(lambda path, **kw: "not an AnnData")
    (tmp_path / "e.bad").write_text("x")
    with pytest.raises(InputError, match="expected AnnData"):
        read_expression(tmp_path / "e.bad")


def _write_plugin(root, *, broken=False):
    """A real installed distribution: a module + a .dist-info with entry_points.txt."""
    (root / "radfusion_demo_plugin.py").write_text(textwrap.dedent('''
        import anndata as ad
        import numpy as np
        import pandas as pd

        def read_demo(path, **kwargs):
            rows = [line.split(",") for line in open(path).read().split()]
            genes = rows[0][1:]
            samples = [r[0] for r in rows[1:]]
            X = np.array([[float(v) for v in r[1:]] for r in rows[1:]])
            return ad.AnnData(X, obs=pd.DataFrame(index=samples), var=pd.DataFrame(index=genes))

        read_demo.radfusion_suffixes = (".demo",)

        def demo_sets(name, **kwargs):
            return {"DEMO_SET": ["g1", "g2"]}
    '''))
    dist = root / "radfusion_demo_plugin-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: radfusion-demo-plugin\nVersion: 0.1\n")
    broken_line = "broken = radfusion_no_such_module:fn\n" if broken else ""
    (dist / "entry_points.txt").write_text(
        "[radfusion.omics_adapters]\ndemo = radfusion_demo_plugin:read_demo\n" + broken_line
        + "\n[radfusion.gene_set_sources]\ndemo_sets = radfusion_demo_plugin:demo_sets\n")


def test_entry_point_discovery_from_an_installed_distribution(tmp_path, monkeypatch, clean_registries):
    _write_plugin(tmp_path, broken=True)
    monkeypatch.syspath_prepend(str(tmp_path))
    op.rediscover()
    try:
        assert "demo" in op.list_omics_adapters() and "broken" not in op.list_omics_adapters()
        assert op._ADAPTERS.origin["demo"] == "entry point radfusion_demo_plugin:read_demo"
        (tmp_path / "e.demo").write_text("sample,g1,g2\nP1,1,2\nP2,3,4\n")
        a = read_expression(tmp_path / "e.demo")  # chosen by the suffix the plug-in declares
        assert a.shape == (2, 2) and list(a.var_names) == ["G1", "G2"]
        assert read_gene_sets("anything", source="demo_sets") == {"DEMO_SET": ["G1", "G2"]}
        with pytest.raises(ValueError, match="failed to load: radfusion_no_such_module"):
            op.get_omics_adapter("broken")
    finally:
        sys.modules.pop("radfusion_demo_plugin", None)


def test_entry_point_cannot_shadow_a_builtin(tmp_path, monkeypatch, clean_registries):
    (tmp_path / "shadow_mod.py").write_text("def fn(path, **kw):\n    raise RuntimeError('should not be used')\n")
    dist = tmp_path / "shadow-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: shadow\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[radfusion.omics_adapters]\ncsv = shadow_mod:fn\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    op.rediscover()
    assert op.get_omics_adapter("csv").__module__ == "data_adapters.omics"
