"""Stratified k-fold, external test manifest, every fusion strategy end to end, and bad inputs, through the CLI."""
import json
from pathlib import Path

import pandas as pd
import pytest
import yaml

from apps.cli import main
from fusion.config import default_config_dir

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    out = tmp_path_factory.mktemp("schemes") / "cohort"
    assert main(["-q", "make-demo-cohort", "--out", str(out), "--patients", "48", "--sites", "3", "--seed", "5",
                 "--workers", "1"]) == 0
    return out


def _cfg(cohort: Path, tmp: Path, name="cfg", **sections) -> Path:
    cfg = yaml.safe_load((default_config_dir() / "demo.yaml").read_text())
    cfg["data"]["root"] = str(cohort)
    cfg["training"].update(epochs=2, patience=2, batch_size=16)
    cfg["evaluation"].update(ablation=False, n_boot=20)
    for m in ("ct", "pet", "mri"):
        cfg["modalities"][m]["preprocessing"]["size"] = [16, 16, 16]
        cfg["modalities"][m]["encoder_kwargs"] = {"channels": [4, 8]}
    for k, v in sections.items():
        if isinstance(v, dict) and isinstance(cfg.get(k), dict):
            cfg[k].update(v)
        else:
            cfg[k] = v
    p = tmp / f"{name}.yaml"
    p.write_text(yaml.safe_dump(cfg))
    return p


def test_stratified_kfold(cohort, tmp_path):
    run = tmp_path / "run"
    cfg = _cfg(cohort, tmp_path, split={"scheme": "kfold", "n_folds": 3})
    assert main(["-q", "train", "--config", str(cfg), "--out", str(run)]) == 0
    m = json.loads((run / "metrics.json").read_text())
    assert m["split_scheme"] == "kfold" and [f["fold"] for f in m["folds"]] == ["fold-1", "fold-2", "fold-3"]
    assert m["c_index_sd"] is not None and m["n_patients"] == {"total": 48, "folds": 3}
    tests = [set(pd.read_csv(run / "folds" / f / "predictions.csv").query("split == 'test'")["patient"])
             for f in ("fold-1", "fold-2", "fold-3")]
    assert sum(map(len, tests)) == 48 and len(set().union(*tests)) == 48  # every patient tested exactly once
    fold = json.loads((run / "folds" / "fold-1" / "metrics.json").read_text())
    for k in ("uno_c", "ibs", "mean_td_auc", "per_site", "survival"):
        assert k in fold
    assert (run / "model_card.md").is_file() and "## Metrics" in (run / "model_card.md").read_text()


def _split_manifest(cohort: Path, overlap: bool = False) -> tuple[str, str]:
    man = pd.read_csv(cohort / "manifest.csv")
    dev = man[man["site"] != "SITE-C"]
    ext = man[man["site"] == "SITE-C"]
    if overlap:
        ext = pd.concat([ext, dev.head(2)])
    dev.to_csv(cohort / "dev.csv", index=False)
    ext.to_csv(cohort / ("ext_overlap.csv" if overlap else "ext.csv"), index=False)
    return "dev.csv", ("ext_overlap.csv" if overlap else "ext.csv")


def test_external_test_manifest(cohort, tmp_path):
    dev, ext = _split_manifest(cohort)
    run = tmp_path / "run"
    cfg = _cfg(cohort, tmp_path, data={"manifest": dev},
               split={"scheme": "external", "external": {"root": str(cohort), "manifest": ext}})
    assert main(["-q", "train", "--config", str(cfg), "--out", str(run)]) == 0
    m = json.loads((run / "metrics.json").read_text())
    n_ext = int((pd.read_csv(cohort / "manifest.csv")["site"] == "SITE-C").sum())
    assert m["n_patients"]["test"] == n_ext and m["split_scheme"] == "external"
    preds = pd.read_csv(run / "predictions.csv")
    assert set(preds.loc[preds["split"] == "test", "site"]) == {"SITE-C"}
    assert "SITE-C" not in set(preds.loc[preds["split"] != "test", "site"])
    assert main(["-q", "evaluate", "--run", str(run)]) == 0
    assert json.loads((run / "metrics.json").read_text())["c_index"] == m["c_index"]


def test_external_manifest_sharing_patients_is_refused(cohort, tmp_path, capsys):
    dev, ext = _split_manifest(cohort, overlap=True)
    cfg = _cfg(cohort, tmp_path, data={"manifest": dev},
               split={"scheme": "external", "external": {"root": str(cohort), "manifest": ext}})
    assert main(["-q", "train", "--config", str(cfg), "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert "2 patient(s) are in both the development and the external manifest" in err


def test_external_scheme_needs_the_external_block(cohort, tmp_path, capsys):
    cfg = _cfg(cohort, tmp_path, split={"scheme": "external"})
    assert main(["-q", "train", "--config", str(cfg), "--out", str(tmp_path / "run")]) == 2
    assert "split.external" in capsys.readouterr().err


@pytest.mark.parametrize("fusion", ["early", "concat", "gated_attention", "bilinear", "tensor", "cross_attention",
                                    "late", "late_stacking"])
def test_every_fusion_strategy_trains_with_missing_modalities(cohort, tmp_path, fusion):
    run = tmp_path / "run"
    cfg = _cfg(cohort, tmp_path, fusion={"name": fusion}, training={"modality_dropout": 0.3})
    assert main(["-q", "train", "--config", str(cfg), "--out", str(run)]) == 0
    m = json.loads((run / "metrics.json").read_text())
    assert 0.0 <= m["c_index"] <= 1.0
    preds = pd.read_csv(run / "predictions.csv")
    assert len(preds) == 48 and preds["risk"].notna().all()


def test_unknown_fusion_and_encoder_names_list_the_valid_ones(cohort, tmp_path, capsys):
    cfg = _cfg(cohort, tmp_path, fusion={"name": "kronecker"})
    assert main(["-q", "train", "--config", str(cfg), "--out", str(tmp_path / "a")]) == 2
    err = capsys.readouterr().err
    assert "unknown fusion 'kronecker'" in err and "bilinear" in err and "late" in err
    raw = yaml.safe_load(_cfg(cohort, tmp_path).read_text())
    raw["modalities"]["ct"]["encoder"] = "resnet999"
    p = tmp_path / "enc.yaml"
    p.write_text(yaml.safe_dump(raw))
    assert main(["-q", "train", "--config", str(p), "--out", str(tmp_path / "b")]) == 2
    err = capsys.readouterr().err
    assert "resnet999" in err and "cnn3d_small" in err


def test_all_censored_training_fold_is_a_clear_error(cohort, tmp_path, capsys):
    man = pd.read_csv(cohort / "manifest.csv")
    man["event"] = 0
    man.to_csv(cohort / "censored.csv", index=False)
    import torch

    threads = torch.get_num_threads()
    cfg = _cfg(cohort, tmp_path, data={"manifest": "censored.csv"},
               training={"num_threads": threads + 1})
    assert main(["-q", "train", "--config", str(cfg), "--out", str(tmp_path / "run")]) == 2
    assert "every training patient is censored" in capsys.readouterr().err
    # training.num_threads held for that run only, failed or not
    assert torch.get_num_threads() == threads


def test_site_stratified_sampling_with_the_adversary(cohort, tmp_path):
    run = tmp_path / "run"
    cfg = _cfg(cohort, tmp_path, training={"sampling": "site_stratified"},
               data={"confounders": ["site", "scanner"]},
               adversary={"enabled": True, "confounders": ["site"], "steps": 2})
    assert main(["-q", "train", "--config", str(cfg), "--out", str(run)]) == 0
    assert "site" in json.loads((run / "metrics.json").read_text())["confounder_probe_auc"]


def test_parameter_sharing_pulls_the_image_encoders_together(cohort, tmp_path):
    import torch

    def distance(run):
        sd = torch.load(run / "checkpoint.pt", weights_only=True)["state_dict"]
        keys = [k for k in sd if k.startswith("encoders.ct.") and sd[k].is_floating_point()]
        return sum(float(((sd[k] - sd[k.replace("encoders.ct.", "encoders.mri.")]) ** 2).sum()) for k in keys)

    d, first_loss = {}, {}
    for w in (0.0, 10.0):
        run = tmp_path / f"run_{w}"
        cfg = _cfg(cohort, tmp_path, name=f"ps_{w}",
                   training={"parameter_sharing": w, "epochs": 15, "patience": 15, "lr": 0.02})
        assert main(["-q", "train", "--config", str(cfg), "--out", str(run)]) == 0
        d[w] = distance(run)
        first_loss[w] = json.loads((run / "history.json").read_text())["fused"][0]["loss"]
    # same seed, same initial weights: the penalty is in the training loss, and the encoders end closer
    assert first_loss[10.0] > first_loss[0.0] + 1.0
    assert d[10.0] < d[0.0]
