"""Every config shipped in configs/ validates, and `extends:` merges as documented."""
import pytest
import yaml

from fusion.config import ConfigError, default_config_dir, load_config

CONFIGS = sorted(default_config_dir().glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_shipped_config_validates(path):
    cfg = load_config(path, overrides={"data": {"root": "/nonexistent/cohort"}})
    assert cfg.data.manifest.endswith("manifest.csv")


def test_strategy_configs_cover_every_strategy():
    names = {load_config(p).fusion.name for p in CONFIGS}
    assert {"early", "concat", "gated_attention", "bilinear", "tensor", "cross_attention", "late",
            "late_stacking"} <= names


def test_loso_configs_differ_only_by_the_adversary():
    plain = load_config(default_config_dir() / "demo_loso_plain.yaml").model_dump()
    adv = load_config(default_config_dir() / "demo_loso_adversarial.yaml").model_dump()
    assert plain["split"]["scheme"] == "loso" and not plain["adversary"]["enabled"] and adv["adversary"]["enabled"]
    for k in plain:
        if k not in ("adversary", "name"):
            assert plain[k] == adv[k], k


def test_extends_merges_mappings_and_replaces_lists(tmp_path):
    (tmp_path / "base.yaml").write_text((default_config_dir() / "demo.yaml").read_text())
    (tmp_path / "child.yaml").write_text(yaml.safe_dump({
        "extends": "base.yaml", "training": {"epochs": 3}, "data": {"confounders": ["site"]}}))
    cfg = load_config(tmp_path / "child.yaml")
    assert cfg.training.epochs == 3 and cfg.training.lr == 0.002  # merged key by key
    assert cfg.data.confounders == ["site"]  # list replaced


def test_extends_errors(tmp_path):
    (tmp_path / "a.yaml").write_text("extends: b.yaml\n")
    (tmp_path / "b.yaml").write_text("extends: a.yaml\n")
    with pytest.raises(ConfigError, match="cycle"):
        load_config(tmp_path / "a.yaml")
    (tmp_path / "c.yaml").write_text("extends: missing.yaml\n")
    with pytest.raises(ConfigError, match="missing.yaml"):
        load_config(tmp_path / "c.yaml")
