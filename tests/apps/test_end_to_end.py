"""End to end through the CLI on a small demo cohort: run folder, determinism, privacy, bad input."""
import json
import shutil
from pathlib import Path

import pandas as pd
import pytest
import yaml

from apps.cli import main
from fusion.config import default_config_dir


def _small_config(cohort: Path, tmp: Path, *, epochs=3, seed=0) -> Path:
    cfg = yaml.safe_load((default_config_dir() / "demo.yaml").read_text())
    cfg["data"]["root"] = str(cohort)
    cfg["seed"] = seed
    cfg["training"].update(epochs=epochs, patience=epochs, batch_size=16)
    for m in ("ct", "pet", "mri"):
        cfg["modalities"][m]["preprocessing"]["size"] = [16, 16, 16]
        cfg["modalities"][m]["encoder_kwargs"] = {"channels": [4, 8]}
    p = tmp / f"cfg_{seed}_{epochs}.yaml"
    p.write_text(yaml.safe_dump(cfg))
    return p


@pytest.fixture(scope="module")
def small_cohort(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "cohort"
    assert main(["-q", "make-demo-cohort", "--out", str(out), "--patients", "48", "--sites", "3", "--seed", "1",
                 "--workers", "1"]) == 0
    return out


@pytest.fixture(scope="module")
def small_run(small_cohort, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("runs")
    run = tmp / "run"
    assert main(["-q", "train", "--config", str(_small_config(small_cohort, tmp)), "--out", str(run)]) == 0
    return run


def test_run_folder_contents(small_run):
    for name in ("config.yaml", "provenance.json", "splits.csv", "checkpoint.pt", "metrics.json", "predictions.csv",
                 "km_risk_groups.png", "report.json", "history.json", "log.txt"):
        assert (small_run / name).is_file(), name
    metrics = json.loads((small_run / "metrics.json").read_text())
    assert set(metrics["ablation"]) == {"fused", "clinical", "ct", "ehr", "mri", "omics", "pet"}
    assert metrics["n_patients"]["train"] + metrics["n_patients"]["validation"] + metrics["n_patients"]["test"] == 48
    for m in ("clinical", "ct", "ehr", "mri", "omics", "pet"):
        assert (small_run / "ablation" / m / "checkpoint.pt").is_file()
    prov = json.loads((small_run / "provenance.json").read_text())
    assert prov["seed"] == 0 and prov["packages"]["torch"]
    assert prov["code"].get("git_commit") or prov["code"].get("package_version")
    # every imaging input has hashed UIDs recorded
    assert any(v.get("ct", {}).get("SeriesInstanceUID", "").startswith("uid-") for v in prov["dicom_uid_hashes"].values())
    preds = pd.read_csv(small_run / "predictions.csv")
    assert len(preds) == 48 and preds["patient"].str.startswith("P-").all()


def test_no_phi_in_run_folder(small_cohort, small_run, demo_phi):
    phi = demo_phi(small_cohort)
    assert len(phi) > 48  # names, MRNs, birth dates, addresses were planted
    manifest_ids = set(pd.read_csv(small_cohort / "manifest.csv")["patient_id"])
    leaks = []
    for f in small_run.rglob("*"):
        if not f.is_file():
            continue
        blob = f.read_bytes()
        for v in phi | manifest_ids:
            if v.encode() in blob:
                leaks.append((f.name, v))
    assert not leaks, leaks[:5]


def test_same_seed_same_metrics_and_evaluate_reproduces(small_cohort, small_run, tmp_path):
    run2 = tmp_path / "run2"
    assert main(["-q", "train", "--config", str(_small_config(small_cohort, tmp_path)), "--out", str(run2)]) == 0
    m1 = json.loads((small_run / "metrics.json").read_text())
    m2 = json.loads((run2 / "metrics.json").read_text())
    for k in ("c_index", "c_index_per_site", "ablation", "n_patients"):
        assert m1[k] == m2[k], k
    # second run reads every volume from the cache
    rep = json.loads((run2 / "report.json").read_text())
    assert all(v > 0 for v in rep["image_cache_hits"].values())
    # evaluate recomputes the same metrics from the checkpoints
    shutil.copytree(small_run, tmp_path / "run_copy")
    assert main(["-q", "evaluate", "--run", str(tmp_path / "run_copy")]) == 0
    m3 = json.loads((tmp_path / "run_copy" / "metrics.json").read_text())
    assert m3["c_index"] == pytest.approx(m1["c_index"], abs=1e-4)
    assert m3["ablation"] == pytest.approx(m1["ablation"], abs=1e-4)


def test_bad_manifest_through_cli(small_cohort, tmp_path, capsys):
    bad_cohort = tmp_path / "bad"
    shutil.copytree(small_cohort, bad_cohort, ignore=shutil.ignore_patterns("images", ".radfusion_cache"))
    (bad_cohort / "images").symlink_to(small_cohort / "images")
    df = pd.read_csv(bad_cohort / "manifest.csv", dtype=str, keep_default_na=False)
    df.loc[4, "event"] = "2"
    df.to_csv(bad_cohort / "manifest.csv", index=False)
    rc = main(["-q", "train", "--config", str(_small_config(bad_cohort, tmp_path)), "--out", str(tmp_path / "r")])
    err = capsys.readouterr().err
    assert rc == 2
    assert "row 5" in err and "'event'" in err and df.loc[4, "patient_id"] in err


def test_unknown_confounder_column_through_cli(small_cohort, tmp_path, capsys):
    cfg_path = _small_config(small_cohort, tmp_path)
    cfg = yaml.safe_load(cfg_path.read_text())
    cfg["data"]["confounders"] = ["site", "ancestry_pc1"]
    cfg_path.write_text(yaml.safe_dump(cfg))
    rc = main(["-q", "train", "--config", str(cfg_path), "--out", str(tmp_path / "r")])
    assert rc == 2 and "ancestry_pc1" in capsys.readouterr().err


def test_non_empty_run_folder_is_refused(small_cohort, small_run, tmp_path, capsys):
    rc = main(["-q", "train", "--config", str(_small_config(small_cohort, tmp_path)), "--out", str(small_run)])
    assert rc == 2 and "not empty" in capsys.readouterr().err


def test_adversarial_training_through_the_config(small_cohort, tmp_path):
    cfg_path = _small_config(small_cohort, tmp_path, epochs=2)
    cfg = yaml.safe_load(cfg_path.read_text())
    cfg["adversary"] = {"enabled": True, "confounders": ["site", "scanner"]}
    cfg["evaluation"]["ablation"] = False
    cfg_path.write_text(yaml.safe_dump(cfg))
    run = tmp_path / "adv"
    assert main(["-q", "train", "--config", str(cfg_path), "--out", str(run)]) == 0
    metrics = json.loads((run / "metrics.json").read_text())
    assert set(metrics["ablation"]) == {"fused"} and 0.0 <= metrics["c_index"] <= 1.0
    assert main(["-q", "evaluate", "--run", str(run)]) == 0


def test_adversary_on_an_unknown_confounder_is_a_config_error(small_cohort, tmp_path, capsys):
    cfg_path = _small_config(small_cohort, tmp_path)
    cfg = yaml.safe_load(cfg_path.read_text())
    cfg["adversary"] = {"enabled": True, "confounders": ["ancestry"]}
    cfg_path.write_text(yaml.safe_dump(cfg))
    assert main(["-q", "train", "--config", str(cfg_path), "--out", str(tmp_path / "r")]) == 2
    assert "ancestry" in capsys.readouterr().err


def test_leave_one_site_out(small_cohort, tmp_path, capsys):
    cfg_path = _small_config(small_cohort, tmp_path, epochs=2)
    cfg = yaml.safe_load(cfg_path.read_text())
    cfg["split"] = {"scheme": "loso", "val_fraction": 0.2, "stratify": ["event"]}
    cfg["evaluation"]["ablation"] = False
    cfg_path.write_text(yaml.safe_dump(cfg))
    run = tmp_path / "loso"
    assert main(["-q", "train", "--config", str(cfg_path), "--out", str(run)]) == 0
    metrics = json.loads((run / "metrics.json").read_text())
    sites = sorted(pd.read_csv(small_cohort / "manifest.csv")["site"].unique())
    assert [f["site"] for f in metrics["folds"]] == sites
    for f in metrics["folds"]:
        split = pd.read_csv(run / "folds" / f["site"] / "splits.csv")
        preds = pd.read_csv(run / "folds" / f["site"] / "predictions.csv")
        # the held-out site is the test set, and only it
        assert set(preds.loc[preds["split"] == "test", "site"]) == {f["site"]}
        assert f["site"] not in set(preds.loc[preds["split"] != "test", "site"])
        assert (split["split"] == "test").sum() == f["n_test"]
    assert set(metrics["confounder_probe_auc"]) == {"site", "scanner"}
    assert "leave-one-site-out" in capsys.readouterr().out
    assert main(["-q", "evaluate", "--run", str(run)]) == 0
    again = json.loads((run / "metrics.json").read_text())
    assert again["c_index_per_site"] == pytest.approx(metrics["c_index_per_site"], abs=1e-4)


def test_leave_one_site_out_needs_two_sites(small_cohort, tmp_path, capsys):
    one = tmp_path / "one"
    shutil.copytree(small_cohort, one, ignore=shutil.ignore_patterns("images", ".radfusion_cache"))
    (one / "images").symlink_to(small_cohort / "images")
    df = pd.read_csv(one / "manifest.csv", dtype=str, keep_default_na=False)
    df["site"] = "SITE-A"
    df.to_csv(one / "manifest.csv", index=False)
    cfg_path = _small_config(one, tmp_path)
    cfg = yaml.safe_load(cfg_path.read_text())
    cfg["split"] = {"scheme": "loso", "stratify": ["event"]}
    cfg_path.write_text(yaml.safe_dump(cfg))
    assert main(["-q", "train", "--config", str(cfg_path), "--out", str(tmp_path / "r")]) == 2
    assert "at least two sites" in capsys.readouterr().err


def test_training_with_augmentation_and_inspect_image(small_cohort, tmp_path, capsys):
    cfg_path = _small_config(small_cohort, tmp_path, epochs=1)
    cfg = yaml.safe_load(cfg_path.read_text())
    for m in ("ct", "pet", "mri"):
        cfg["modalities"][m]["preprocessing"].update(augment=True, augment_prob=1.0)
    cfg["evaluation"]["ablation"] = False
    cfg_path.write_text(yaml.safe_dump(cfg))
    assert main(["-q", "train", "--config", str(cfg_path), "--out", str(tmp_path / "aug")]) == 0
    capsys.readouterr()
    ct = pd.read_csv(small_cohort / "manifest.csv", dtype=str, keep_default_na=False)["ct"].iloc[0]
    assert main(["inspect-image", str(small_cohort / ct), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["modality"] == "CT" and info["spacing"] == pytest.approx([0.8, 0.8, 3.0])
    assert main(["inspect-image", str(small_cohort / "manifest.csv")]) == 2


@pytest.mark.parametrize("omics", [
    {"encoder": "pathway_mlp_glasso", "method": "gsva", "combat_batch_key": "site", "min_set_size": 10},
    {"encoder": "gene_pathway_masked", "features": "genes", "min_set_size": 10},
])
def test_fold_fitted_omics_paths(small_cohort, tmp_path, omics):
    cfg_path = _small_config(small_cohort, tmp_path, epochs=1)
    cfg = yaml.safe_load(cfg_path.read_text())
    cfg["modalities"] = {"omics": {**omics, "out_dim": 8}, "clinical": cfg["modalities"]["clinical"]}
    cfg["evaluation"]["ablation"] = False
    cfg_path.write_text(yaml.safe_dump(cfg))
    run = tmp_path / "omics"
    assert main(["-q", "train", "--config", str(cfg_path), "--out", str(run)]) == 0
    assert 0.0 <= json.loads((run / "metrics.json").read_text())["c_index"] <= 1.0
    assert main(["-q", "evaluate", "--run", str(run)]) == 0
