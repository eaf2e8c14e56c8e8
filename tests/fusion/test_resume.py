"""A run killed (SIGKILL) mid-training and resumed ends with the same weights and metrics as an uninterrupted run."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from apps.cli import main
from fusion.config import default_config_dir

pytestmark = pytest.mark.slow

_CLI = "import sys; from apps.cli import main; sys.exit(main(sys.argv[1:]))"


def _config(cohort: Path, tmp: Path, *, augment: bool) -> Path:
    cfg = yaml.safe_load((default_config_dir() / "demo.yaml").read_text())
    cfg["data"]["root"] = str(cohort)
    cfg["training"].update(epochs=4, patience=4, batch_size=16, modality_dropout=0.2)
    cfg["evaluation"]["ablation"] = False
    cfg["adversary"] = {"enabled": True, "confounders": ["site"], "steps": 2}
    for m in ("ct", "pet", "mri"):
        cfg["modalities"][m]["preprocessing"]["size"] = [16, 16, 16]
        cfg["modalities"][m]["preprocessing"]["augment"] = augment
        cfg["modalities"][m]["encoder_kwargs"] = {"channels": [4, 8]}
    p = tmp / f"cfg_{augment}.yaml"
    p.write_text(yaml.safe_dump(cfg))
    return p


def _train(args, env=None):
    return subprocess.run([sys.executable, "-c", _CLI, "-q", "train", *args], env=env, capture_output=True,
                          text=True, cwd=Path(__file__).resolve().parents[2])


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    out = tmp_path_factory.mktemp("resume") / "cohort"
    assert main(["-q", "make-demo-cohort", "--out", str(out), "--patients", "40", "--sites", "2", "--seed", "3",
                 "--workers", "1"]) == 0
    return out


@pytest.mark.parametrize("augment", [False, True])
def test_killed_run_resumes_to_identical_metrics(cohort, tmp_path, augment):
    cfg = _config(cohort, tmp_path, augment=augment)
    full, killed = tmp_path / "full", tmp_path / "killed"
    r = _train(["--config", str(cfg), "--out", str(full)])
    assert r.returncode == 0, r.stderr[-2000:]
    # kill the fused model's training after its epoch 2 (of 4), for real (SIGKILL, no clean-up)
    env = dict(os.environ, RADFUSION_KILL_AFTER="fused:2")
    r = _train(["--config", str(cfg), "--out", str(killed)], env=env)
    assert r.returncode == -9, (r.returncode, r.stderr[-2000:])
    assert (killed / "train_state.pt").exists() and not (killed / "metrics.json").exists()
    state = torch.load(killed / "train_state.pt", weights_only=True)
    assert state["epoch"] == 2
    # resuming without --resume refuses the non-empty folder; with --resume it continues
    assert _train(["--config", str(cfg), "--out", str(killed)]).returncode != 0
    r = _train(["--config", str(cfg), "--out", str(killed), "--resume"])
    assert r.returncode == 0, r.stderr[-2000:]
    assert "resumed after epoch 2" in (killed / "log.txt").read_text()
    assert not (killed / "train_state.pt").exists()
    a = json.loads((full / "metrics.json").read_text())
    b = json.loads((killed / "metrics.json").read_text())
    for k in ("c_index", "c_index_validation", "ablation", "confounder_probe_auc"):
        assert a[k] == b[k], k
    wa = torch.load(full / "checkpoint.pt", weights_only=True)["state_dict"]
    wb = torch.load(killed / "checkpoint.pt", weights_only=True)["state_dict"]
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert (full / "predictions.csv").read_text() == (killed / "predictions.csv").read_text()


def test_resume_with_other_config_is_refused(cohort, tmp_path):
    cfg = _config(cohort, tmp_path, augment=False)
    run = tmp_path / "run"
    env = dict(os.environ, RADFUSION_KILL_AFTER="fused:0")
    assert _train(["--config", str(cfg), "--out", str(run)], env=env).returncode == -9
    other = yaml.safe_load(cfg.read_text())
    other["training"]["lr"] = 0.01
    p = tmp_path / "other.yaml"
    p.write_text(yaml.safe_dump(other))
    r = _train(["--config", str(p), "--out", str(run), "--resume"])
    assert r.returncode == 2 and "differs from the given config" in r.stderr
