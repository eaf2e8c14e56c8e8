"""The README's main job: `radfusion demo` on the default demo cohort (about 2 minutes on 2 cores).

The cohort plants a different part of the risk in each modality (ground_truth.json), so the
fused model must beat every single-modality model trained by the same code.
"""
import json

import pytest

from apps.cli import main


@pytest.mark.slow
def test_default_demo_fused_beats_every_single_modality(tmp_path, capsys):
    assert main(["-q", "demo", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "fused" in out and "Per site" in out
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    abl = metrics["ablation"]
    assert set(abl) == {"fused", "clinical", "ct", "ehr", "mri", "omics", "pet"}
    assert metrics["c_index"] == abl["fused"]
    assert metrics["c_index"] >= 0.70, abl
    for m, c in abl.items():
        if m != "fused":
            assert metrics["c_index"] > c, (m, abl)
    gt = json.loads((tmp_path / "cohort" / "ground_truth.json").read_text())
    assert set(metrics["c_index_per_site"]) == set(gt["sites"])
    n = metrics["n_patients"]
    assert n["train"] + n["validation"] + n["test"] == gt["n_patients"] == 400
