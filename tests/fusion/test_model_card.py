"""fusion.model_card: sections, numbers, automatic caveats, robustness and privacy."""
from __future__ import annotations

import json

import numpy as np

from fusion import evaluation as ev
from fusion.model_card import NOT_COMPUTED, data_driven_caveats, write_model_card

SECTIONS = ["## Model details", "## Intended use", "## Factors", "## Data", "## Metrics", "### Per site",
            "### Time-dependent AUC", "### Calibration", "### Confounder probes", "## Ethical considerations",
            "## Caveats and recommendations", "## Limitations"]
PATIENT_IDS = ["PAT-000917", "MRN4418230", "sub-0042", "Doe^Jane", "1.2.840.113619.2.55.3.604688119"]

CONFIG = {
    "name": "demo-fusion", "seed": 17,
    "data": {"manifest": f"/data/{PATIENT_IDS[0]}/manifest.csv", "confounders": ["site", "scanner"]},
    "task": {"kind": "survival"},
    "modalities": {"ct": {"encoder": "cnn3d_small", "out_dim": 16},
                   "omics": {"encoder": "mlp", "out_dim": 8}},
    "fusion": {"name": "gated_attention", "hidden": 32, "dropout": 0.2},
    "adversary": {"enabled": True, "confounders": ["site"], "weight": 0.5},
    "training": {"epochs": 40, "batch_size": 64, "lr": 0.002, "weight_decay": 0.0001, "patience": 10},
    "split": {"scheme": "loso"},
}

METRICS = {
    "n_test": 120, "n_test_events": 55,
    "harrell_c": 0.7123, "uno_c": 0.6987, "uno_tau": 3.5, "ibs": 0.1432,
    "td_auc": {"times": [1.0, 2.0, 3.0], "auc": [0.751, 0.7321, None], "mean_auc": 0.7412},
    "brier": {"times": [1.0, 2.0, 3.0], "scores": [0.101, 0.152, 0.183]},
    "calibration": {"horizon": 2.0, "groups": [{"n": 60, "predicted": 0.21, "observed": 0.25},
                                               {"n": 60, "predicted": 0.55, "observed": 0.49}],
                    "ici": 0.0512, "e_max": 0.06, "slope": 0.8771, "oe_ratio": 0.9876},
    "per_site": [
        {"group": "Hospital-A", "n": 95, "n_events": 44, "harrell_c": 0.7312, "ci_low": 0.66, "ci_high": 0.79},
        {"group": "Hospital-B", "n": 12, "n_events": 5, "harrell_c": 0.6111, "ci_low": 0.40, "ci_high": 0.85},
        {"group": "Hospital-C", "n": 13, "n_events": 0, "harrell_c": None, "ci_low": None, "ci_high": None},
        {"group": "all", "n": 120, "n_events": 49, "harrell_c": 0.7123, "ci_low": 0.65, "ci_high": 0.77},
    ],
    "confounder_probe_auc": {"site": 0.8123, "scanner": 0.5312},
    "notes": ["td-AUC undefined (no case or no control) at times: 3"],
    "patient_id": [PATIENT_IDS[1]],  # not a metric: must be ignored
}

COHORT = {
    "n_patients": 480, "n_events": 210,
    "splits": {"train": 300, "val": 60, "test": {"n": 120, "n_events": 55}},
    "sites": {"Hospital-A": {"n": 380, "n_events": 170, "n_test": 95}, "Hospital-B": 50, "Hospital-C": 50},
    "modalities": {"ct": {"n_present": 470, "n_missing": 10}, "omics": {"n_present": 240, "missing_rate": 0.5}},
    "patient_ids": PATIENT_IDS,
    "excluded": [{"patient_id": PATIENT_IDS[2], "reason": f"corrupt DICOM {PATIENT_IDS[4]}"}],
    "names": {PATIENT_IDS[3]: 1},
}


def test_card_has_sections_and_numbers(tmp_path):
    path = write_model_card(tmp_path / "run", config=CONFIG, metrics=METRICS, cohort_summary=COHORT)
    assert path == tmp_path / "run" / "model_card.md"
    text = path.read_text()
    positions = [text.index(s) for s in SECTIONS]
    assert positions == sorted(positions)
    for expected in ["gated_attention", "cnn3d_small", "| ct |", "Seed: 17", "leave-one-site-out",
                     "| Harrell's C-index | 0.712 | 0.650 to 0.770 |", "Uno's C-index (tau = 3.5) | 0.699",
                     "| Mean time-dependent AUC | 0.741 |", "| Integrated Brier score | 0.143 |",
                     "| Calibration: slope | 0.877 |", "| Hospital-A | 95 | 44 | 0.731 | 0.660 to 0.790 |",
                     "| Hospital-C | 13 | 0 | not computed | not computed |", "| 2 | 0.732 |",
                     "| site | 0.812 |", "| omics | 240 | 50.0% |", "| ct | 470 | 2.1% |", "| test | 120 | 55 |",
                     "Patients: 480", "not a medical device", "td-AUC undefined",
                     "Confounder removal: closed-form linear dependence penalty"]:  # the default mode
        assert expected in text, expected
    reverse = dict(CONFIG, adversary=dict(CONFIG["adversary"], mode="reverse"))
    text = write_model_card(tmp_path / "rev", config=reverse, metrics=METRICS, cohort_summary=COHORT).read_text()
    assert "Confounder removal: adversarial heads (gradient reversal) on site" in text


def test_caveats_triggered_by_planted_conditions(tmp_path):
    text = write_model_card(tmp_path / "card.md", config=CONFIG, metrics=METRICS, cohort_summary=COHORT).read_text()
    caveats = text[text.index("## Caveats and recommendations"):text.index("## Limitations")]
    assert "Small test sites" in caveats and "Hospital-B (n = 12)" in caveats and "Hospital-C (n = 13)" in caveats
    assert "Hospital-A (n" not in caveats
    assert "Wide 95% bootstrap CIs" in caveats and "Hospital-B (0.40 to 0.85)" in caveats
    assert "confounder" in caveats and "site (AUC 0.81)" in caveats and "scanner (AUC" not in caveats
    assert "High missing rates" in caveats and "omics (50%)" in caveats and "ct (" not in caveats
    assert "C-index not computable" in caveats and "Hospital-C" in caveats
    assert "No data-driven caveat" not in caveats


def test_clean_run_triggers_no_caveat():
    metrics = {"harrell_c": 0.7, "uno_c": 0.68, "ibs": 0.15, "confounder_probe_auc": {"site": 0.52},
               "per_site": [{"group": "A", "n": 80, "n_events": 30, "harrell_c": 0.7, "ci_low": 0.62, "ci_high": 0.78}]}
    assert data_driven_caveats(metrics, {"modalities": {"ct": 0.05}}) == []


def test_no_patient_identifier_reaches_the_card(tmp_path):
    text = write_model_card(tmp_path, config=CONFIG, metrics=METRICS, cohort_summary=COHORT).read_text()
    for pid in PATIENT_IDS:
        assert pid.lower() not in text.lower(), pid
    assert "/data/" not in text  # no data paths either


def test_missing_keys_read_not_computed(tmp_path):
    text = write_model_card(tmp_path / "m.md", config={}, metrics={}, cohort_summary={}).read_text()
    for s in ("## Model details", "## Intended use", "## Data", "## Metrics", "## Limitations"):
        assert s in text
    assert f"| Harrell's C-index | {NOT_COMPUTED} | {NOT_COMPUTED} |" in text
    assert f"| Integrated Brier score | {NOT_COMPUTED} |" in text
    assert "Not computed on the test set: harrell_c, uno_c, ibs" in text
    # wrongly typed entries do not raise either
    odd = {"td_auc": None, "calibration": "n/a", "per_site": "n/a", "confounder_probe_auc": [0.7], "harrell_c": "x"}
    write_model_card(tmp_path / "odd.md", config={"fusion": None, "modalities": None}, metrics=odd,
                     cohort_summary={"sites": None, "modalities": {"ct": "?"}})


def test_custom_intended_use_and_classification_card(tmp_path):
    rng = np.random.default_rng(0)
    m = ev.classification_metrics(rng.integers(0, 2, 80), rng.uniform(size=80))
    cfg = {**CONFIG, "task": {"kind": "classification"}}
    text = write_model_card(tmp_path / "c.md", config=cfg, metrics=m, cohort_summary={"n_patients": 80},
                            intended_use="Benchmarking only.").read_text()
    assert "Benchmarking only." in text and "not a medical device" not in text
    assert f"| ROC AUC | {m['auc']:.3f} |" in text
    assert f"| Expected calibration error | {m['calibration']['ece']:.3f}" in text


def test_card_from_real_evaluation_outputs(tmp_path):
    rng = np.random.default_rng(4)
    n_tr, n_te = 200, 90
    x = rng.normal(size=n_tr + n_te)
    t = rng.exponential(np.exp(-x))
    c = np.minimum(rng.exponential(1.5, size=n_tr + n_te), np.r_[np.full(n_tr, 4.0), np.full(n_te, 2.0)])
    time, event = np.minimum(t, c), t <= c
    site = rng.choice(["S1", "S2", "S3"], n_te, p=[0.6, 0.3, 0.1])
    metrics = ev.survival_metrics(time[:n_tr], event[:n_tr], x[:n_tr], time[n_tr:], event[n_tr:], x[n_tr:])
    metrics["per_site"] = ev.per_group_table(site, time[n_tr:], event[n_tr:], x[n_tr:], n_boot=30)
    json.dumps(metrics, allow_nan=False)
    text = write_model_card(tmp_path, config=CONFIG, metrics=metrics, cohort_summary=COHORT).read_text()
    assert f"| Harrell's C-index | {metrics['harrell_c']:.3f} |" in text
    assert f"| Integrated Brier score | {metrics['ibs']:.3f} |" in text
    assert "Small test sites" in text and "S3 (n = " in text
