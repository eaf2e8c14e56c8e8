import pytest
import yaml

from fusion.config import ConfigError, default_config_dir, load_config, parse_config


def _base():
    return yaml.safe_load((default_config_dir() / "demo.yaml").read_text())


def test_demo_config_validates_and_resolves_paths(tmp_path):
    cfg = load_config(default_config_dir() / "demo.yaml", overrides={"data": {"root": str(tmp_path)}})
    assert cfg.data.manifest == str(tmp_path / "manifest.csv")
    assert list(cfg.modalities) == sorted(cfg.modalities)
    raw = _base()["modalities"]["ct"]["preprocessing"]
    assert cfg.modalities["ct"].preprocessing.size == tuple(raw["size"])
    assert cfg.modalities["ct"].preprocessing.spacing == tuple(float(x) for x in raw["spacing"])
    # a modality that gives no preprocessing block gets the documented defaults
    data = _base()
    del data["modalities"]["mri"]["preprocessing"]
    assert parse_config(data).modalities["mri"].preprocessing.size == (24, 24, 24)


def test_unknown_key_is_rejected_with_its_name_and_place(tmp_path):
    data = _base()
    data["training"]["epohcs"] = 3
    p = tmp_path / "bad.yaml"
    p.write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError) as e:
        load_config(p)
    msg = str(e.value)
    assert "epohcs" in msg and "training" in msg and str(p) in msg


def test_unknown_top_level_key_and_modality():
    data = _base()
    data["modalitiez"] = {}
    with pytest.raises(ConfigError, match="unknown key 'modalitiez'"):
        parse_config(data)
    data = _base()
    data["modalities"]["xray"] = {"encoder": "mlp"}
    with pytest.raises(ConfigError, match="unknown modality"):
        parse_config(data)


def test_modality_without_its_input_file():
    data = _base()
    data["data"]["ehr"] = None
    with pytest.raises(ConfigError, match="'ehr' needs data.ehr"):
        parse_config(data)


def test_wrong_types_and_missing_file(tmp_path):
    data = _base()
    data["training"]["epochs"] = "many"
    with pytest.raises(ConfigError, match="training.epochs"):
        parse_config(data)
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
