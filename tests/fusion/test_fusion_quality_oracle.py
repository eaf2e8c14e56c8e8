"""The oracle reference of ``benchmarks/fusion_quality.py`` part 2 (what hiding modalities costs the
demo's true log hazard), checked against the ground truth's own log hazard."""
import importlib.util
import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from apps.cli import main
from fusion.metrics import harrell_c

BENCH = Path(__file__).resolve().parents[2] / "benchmarks" / "fusion_quality.py"
MODS = ["clinical", "ct", "ehr", "mri", "omics", "pet"]
CARRIES = {"ct": "tumour", "pet": "metabolic", "mri": "oedema", "omics": "immune", "ehr": "inflammation"}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    spec = importlib.util.spec_from_file_location("bench_fusion_quality", BENCH)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    cohort = tmp_path_factory.mktemp("oracle") / "cohort"
    assert main(["-q", "make-demo-cohort", "--out", str(cohort), "--patients", "60", "--sites", "3", "--seed", "5",
                 "--workers", "1"]) == 0
    gt = json.loads((cohort / "ground_truth.json").read_text())
    pids = sorted(gt["patients"])
    test = list(range(30, 60))
    rows = [gt["patients"][pids[i]] for i in test]
    fold = SimpleNamespace(
        cohort=SimpleNamespace(patient_ids=pids),
        splits={"train": np.arange(30), "test": np.array(test)},
        tensors={"test": {"modalities": MODS,
                          "present": torch.tensor([[r["has"][m] for m in MODS] for r in rows]),
                          "event": torch.tensor([r["event"] for r in rows], dtype=torch.bool),
                          "time": torch.tensor([r["time"] for r in rows], dtype=torch.float32)}},
    )
    return bench, cohort, gt, fold, rows


def test_oracle_with_every_modality_shown_is_the_true_log_hazard_without_frailty(setup):
    bench, cohort, gt, fold, rows = setup
    coef = gt["coefficients"]
    # the generator's log hazard minus what no modality measures (frailty) and minus the factors of the
    # modalities the patient lacks (the lesion's size shows on CT, PET and MR alike)
    ref = []
    for r in rows:
        f, has = r["factors"], r["has"]
        v = r["log_hazard"] - coef["frailty"] * f["frailty"]
        v -= sum(coef[CARRIES[m]] * f[CARRIES[m]] for m in ("pet", "mri", "omics", "ehr") if not has[m])
        assert has["ct"] or has["pet"] or has["mri"]  # the demo keeps at least one image
        ref.append(v)
    ev, tm = fold.tensors["test"]["event"].numpy(), fold.tensors["test"]["time"].numpy()
    full, masked = bench._oracle_masked_c(fold, cohort, p=0.0, n_masks=3, seed=0)
    assert full == pytest.approx(harrell_c(ev, tm, np.array(ref)), abs=1e-12)
    assert masked == pytest.approx(full, abs=1e-12)  # nothing hidden


def test_oracle_with_only_clinical_left_uses_age_stage_and_site(setup):
    bench, cohort, gt, fold, rows = setup
    coef = gt["coefficients"]
    train = [gt["patients"][fold.cohort.patient_ids[i]] for i in fold.splits["train"]]
    stage_mean = {s: np.mean([r["factors"]["tumour"] for r in train if r["stage"] == s])
                  for s in {r["stage"] for r in train}}
    ref = np.array([r["log_hazard"] - r["linear_predictor"] + coef["age"] * r["factors"]["age"]
                    + coef["tumour"] * stage_mean.get(r["stage"], 0.0) for r in rows])
    ev, tm = fold.tensors["test"]["event"].numpy(), fold.tensors["test"]["time"].numpy()
    full, masked = bench._oracle_masked_c(fold, cohort, p=1.0, n_masks=2, seed=0)
    assert masked == pytest.approx(harrell_c(ev, tm, ref), abs=1e-12)
    assert full - masked > 0.05  # the hidden modalities carried most of the risk


def test_removal_masks_hide_only_non_clinical_and_keep_something(setup):
    bench, _, _, fold, _ = setup
    present = fold.tensors["test"]["present"]
    masks = bench._removal_masks(present, MODS, p=0.5, n_masks=4, seed=1)
    assert len(masks) == 4
    for pr in masks:
        assert not (pr & ~present).any()  # never shows what the patient lacks
        assert torch.equal(pr[:, 0], present[:, 0])  # clinical is never hidden
        assert pr.any(dim=1).all()
    assert any(not torch.equal(pr, present) for pr in masks)
    again = bench._removal_masks(present, MODS, p=0.5, n_masks=4, seed=1)
    assert all(torch.equal(a, b) for a, b in zip(masks, again))


def test_oracle_is_none_without_a_demo_ground_truth(setup, tmp_path):
    bench, _, _, fold, _ = setup
    assert bench._oracle_masked_c(fold, tmp_path, p=0.3, n_masks=2, seed=0) is None
