"""Task kinds: classification (binary, multiclass), discrete-time survival and survival + auxiliary label.

Unit tests of the task heads on random tensors, config and input errors, and (slow) end-to-end runs
through the CLI on one small demo cohort with labels derived from its planted truth.
"""
import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from encoders.registry import create_encoder
from fusion.config import ConfigError, default_config_dir, load_config, parse_config
from fusion.model import FusionModel
from fusion.strategies import create_fusion


# --------------------------------------------------------------------------- unit: heads
def _model(n_out: int, **kw) -> FusionModel:
    torch.manual_seed(0)
    enc = {"ct": create_encoder("cnn3d_small", 3, 1, 8, channels=(4, 8)), "clinical": create_encoder("mlp", 3, 4)}
    fusion = create_fusion("concat", {"ct": 8, "clinical": 4}, 16, dropout=0.0)
    return FusionModel(enc, fusion, torch.nn.Linear(16, n_out), **kw)


def _batch(label=None, b=6):
    g = torch.Generator().manual_seed(1)
    out = {
        "modalities": ["clinical", "ct"],
        "present": torch.tensor([[True, True], [True, False]] * (b // 2)),
        "ct": torch.randn(b, 1, 8, 8, 8, generator=g),
        "clinical": torch.randn(b, 3, generator=g),
        "time": torch.rand(b, generator=g) * 2 + 0.1,
        "event": torch.tensor([True, False, True] * (b // 3)),
    }
    if label is not None:
        out["label"] = torch.tensor(label)
    return out


def _check_loss_backward(model, out):
    assert out["loss"].dim() == 0 and torch.isfinite(out["loss"])
    out["loss"].backward()
    grads = [p.grad for p in model.head.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)


def test_cox_head_is_unchanged():
    m = _model(1)
    out = m(_batch())
    assert out["risk"].shape == (6,) and "proba" not in out and "logits" not in out
    torch.testing.assert_close(out["loss"], out["loss_cox"])
    _check_loss_backward(m, out)


def test_cox_head_with_strata_uses_the_stratified_likelihood():
    from fusion.losses import cox_ph_loss

    m = _model(1)
    b = _batch(b=12)
    b["strata"] = torch.tensor([0, 1] * 6)
    out = m(b)
    ref = cox_ph_loss(out["risk"], b["time"], b["event"], strata=b["strata"])
    torch.testing.assert_close(out["loss_cox"], ref)
    assert not torch.allclose(out["loss_cox"], cox_ph_loss(out["risk"], b["time"], b["event"]))
    _check_loss_backward(m, out)


def test_strata_codes_in_the_tensors_and_empty_stratum_error(tmp_path):
    """task.strata -> batch["strata"]: one code per site, the same in every split; an empty cell is refused."""
    from types import SimpleNamespace

    from data_adapters.errors import InputError
    from fusion.data import Cohort, make_tensors

    n = 6
    cohort = Cohort(patient_ids=[f"S{i}" for i in range(n)], pseudonyms=[f"P-{i}" for i in range(n)],
                    sites=np.array(["A", "B", "A", "C", "B", "A"]), time=np.ones(n, np.float32),
                    event=np.ones(n, bool), confounders={"scanner": np.array(["x", "x", "y", "x", "", "x"],
                                                                              dtype=object)},
                    modalities=[], present=np.zeros((n, 0), bool), task_kind="survival")
    tf = SimpleNamespace(cfg=SimpleNamespace(task=SimpleNamespace(strata=["site"]),
                                             data=SimpleNamespace(manifest="manifest.csv")),
                         task_meta_={}, confounder_kinds_={})
    a, b = make_tensors(cohort, [0, 1, 2], tf)["strata"], make_tensors(cohort, [3, 4, 5], tf)["strata"]
    codes = torch.cat([a, b]).tolist()
    assert codes[0] == codes[2] == codes[5] and codes[1] == codes[4] and len(set(codes)) == 3
    tf.cfg.task.strata = ["site", "scanner"]
    with pytest.raises(InputError) as e:
        make_tensors(cohort, [0, 1], tf)
    assert e.value.field == "scanner" and e.value.patient == "S4" and "manifest.csv" in str(e.value)


def test_discrete_time_head():
    cuts = [0.0, 0.5, 1.0, 1.5, 2.2]
    m = _model(4, task="discrete_time", cuts=cuts)
    out = m(_batch())
    assert out["logits"].shape == (6, 4) and out["survival"].shape == (6, 4) and out["risk"].shape == (6,)
    s = out["survival"].detach()
    assert ((s > 0) & (s <= 1)).all() and (s[:, 1:] <= s[:, :-1] + 1e-7).all()  # non-increasing in time
    assert "cuts" in m.state_dict() and m.task_meta["cuts"] == pytest.approx(cuts)
    _check_loss_backward(m, out)
    with pytest.raises(ValueError, match="head has 1 outputs"):
        _model(1, task="discrete_time", cuts=cuts)


@pytest.mark.parametrize("classes,label", [(["0", "1"], [0, 1, 1, 0, -1, 1]),
                                           (["a", "b", "c"], [0, 1, 2, 2, -1, 0])])
@pytest.mark.parametrize("loss", ["ce", "focal"])
def test_classification_head(classes, label, loss):
    k = len(classes)
    m = _model(1 if k == 2 else k, task="classification", classes=classes, cls_loss=loss,
               class_weights=[1.0] * (k - 1) + [2.0], aux_loss_weight=0.2)
    out = m(_batch(label))
    assert out["proba"].shape == (6, k) and torch.isfinite(out["loss_aux"])  # per-modality heads, same task
    torch.testing.assert_close(out["proba"].sum(1), torch.ones(6))
    if k == 2:
        torch.testing.assert_close(out["risk"], out["proba"][:, 1])
    else:
        torch.testing.assert_close(out["risk"], out["proba"].max(1).values)
    _check_loss_backward(m, out)
    # no targets, no loss
    b = _batch(label)
    del b["label"]
    assert "loss" not in m(b)


def test_multitask_head_and_uncertainty_weights():
    m = _model(1, aux_classes=["x", "y", "z"], aux_loss_weight=0.3)
    out = m(_batch([0, 2, 1, -1, 1, 0]))
    assert out["aux_proba"].shape == (6, 3) and out["risk"].shape == (6,)
    s = m.uncertainty.log_vars
    expect = (torch.exp(-s[0]) * out["loss_cox"] + s[0] + torch.exp(-s[1]) * out["loss_aux_label"] + s[1]
              + 0.3 * out["loss_aux"])
    torch.testing.assert_close(out["loss"], expect)
    _check_loss_backward(m, out)
    assert m.uncertainty.log_vars.grad is not None and torch.isfinite(out["task_weights"]).all()
    # a batch with no auxiliary label keeps the survival term only
    out = m(_batch([-1] * 6))
    assert "loss_aux_label" not in out and torch.isfinite(out["loss"])


def test_late_fusion_refuses_non_cox_tasks():
    enc = {"clinical": create_encoder("mlp", 3, 4), "omics": create_encoder("mlp", 5, 4)}
    late = create_fusion("late", {"clinical": 4, "omics": 4}, 8)
    with pytest.raises(ValueError, match="supports only the Cox"):
        FusionModel(enc, late, torch.nn.Linear(8, 1), task="classification", classes=["0", "1"])
    data = _base_cfg()
    data["task"] = {"kind": "classification"}
    data["fusion"]["name"] = "late"
    with pytest.raises(ConfigError, match="supports only the Cox"):
        parse_config(data)


def test_build_model_needs_the_fitted_task_meta():
    from fusion.model import build_model

    data = _base_cfg()
    data["task"] = {"kind": "survival", "loss": "discrete_time", "n_intervals": 4}
    cfg = parse_config(data)
    with pytest.raises(ValueError, match="task_meta\\['cuts'\\]"):
        build_model(cfg, {"clinical": 5}, ["clinical"])
    m = build_model(cfg, {"clinical": 5}, ["clinical"], task_meta={"cuts": [0, 1, 2, 3, 4]})
    assert m.head.out_features == 4


# --------------------------------------------------------------------------- config errors
def _base_cfg():
    return yaml.safe_load((default_config_dir() / "demo.yaml").read_text())


@pytest.mark.parametrize("task,needle", [
    ({"kind": "survival", "loss": "focal"}, "task.loss 'focal'"),
    ({"kind": "classification", "loss": "cox"}, "task.loss 'cox'"),
    ({"kind": "survival", "classes": ["a", "b"]}, "task.classes"),
    ({"kind": "classification", "n_intervals": 5}, "task.n_intervals"),
    ({"kind": "survival", "loss": "discrete_time", "ties": "breslow"}, "task.ties"),
    ({"kind": "classification", "classes": ["a", "a"]}, "more than once"),
    ({"kind": "classification", "classes": ["a", "b"], "class_weights": [1.0]}, "task.class_weights"),
    ({"kind": "classification", "multitask": {"aux_label": "grade"}}, "task.multitask"),
    ({"kind": "classification", "strata": ["site"]}, "task.strata"),
    ({"kind": "survival", "loss": "discrete_time", "strata": ["site"]}, "task.strata"),
    ({"kind": "survival", "strata": ["hospital"]}, "task.strata: 'hospital'"),
])
def test_bad_task_combinations_are_config_errors(task, needle):
    data = _base_cfg()
    data["task"] = task
    with pytest.raises(ConfigError) as e:
        parse_config(data)
    assert needle in str(e.value)


def test_task_defaults_and_resolved_config_round_trip():
    data = _base_cfg()
    data["task"] = {"kind": "classification", "loss": "focal", "focal_gamma": 1.0}
    cfg = parse_config(data)
    assert cfg.task.loss == "focal" and cfg.task.head == "classification"
    assert parse_config(yaml.safe_load(cfg.to_yaml())).task == cfg.task  # a run folder's config.yaml re-validates
    assert parse_config(_base_cfg()).task.loss == "cox"
    for name, loss in (("demo_classification.yaml", "ce"), ("demo_discrete_time.yaml", "discrete_time")):
        assert load_config(default_config_dir() / name).task.loss == loss


# --------------------------------------------------------------------------- end to end (CLI)
def _truth_labels(cohort: Path, n_classes: int) -> dict:
    truth = json.loads((cohort / "ground_truth.json").read_text())["patients"]
    lp = pd.Series({pid: p["linear_predictor"] for pid, p in truth.items()})
    if n_classes == 2:
        return (lp > lp.median()).astype(int).astype(str).to_dict()
    names = np.array(["low", "mid", "high"])
    return dict(zip(lp.index, names[np.searchsorted(lp.quantile([1 / 3, 2 / 3]).to_numpy(), lp.to_numpy())]))


def _labelled_manifest(cohort: Path, name: str, labels: dict, column: str = "label") -> str:
    df = pd.read_csv(cohort / "manifest.csv", dtype=str, keep_default_na=False)
    df[column] = df["patient_id"].map(labels)
    df.to_csv(cohort / name, index=False)
    return name


def _config(cohort: Path, tmp: Path, name: str, *, task: dict, manifest: str = "manifest.csv",
            drop: tuple = ("mri", "pet")) -> Path:
    """demo.yaml made small; ``drop`` removes modalities (the binary run keeps all six, the others one image
    modality, to keep the file's runtime down)."""
    cfg = _base_cfg()
    for m in drop:
        del cfg["modalities"][m]
    cfg["data"]["root"] = str(cohort)
    cfg["data"]["manifest"] = manifest
    cfg["task"] = task
    cfg["training"].update(epochs=2, patience=2, batch_size=16)
    cfg["evaluation"].update(ablation=False, n_boot=20)
    for m in {"ct", "pet", "mri"} & set(cfg["modalities"]):
        cfg["modalities"][m]["preprocessing"]["size"] = [16, 16, 16]
        cfg["modalities"][m]["encoder_kwargs"] = {"channels": [4, 8]}
    p = tmp / f"{name}.yaml"
    p.write_text(yaml.safe_dump(cfg))
    return p


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    from apps.cli import main

    out = tmp_path_factory.mktemp("tasks") / "cohort"
    assert main(["-q", "make-demo-cohort", "--out", str(out), "--patients", "48", "--sites", "3", "--seed", "2",
                 "--workers", "1"]) == 0
    _labelled_manifest(out, "manifest_binary.csv", _truth_labels(out, 2))
    _labelled_manifest(out, "manifest_3class.csv", _truth_labels(out, 3))
    return out


@pytest.fixture(scope="module")
def binary_run(cohort, tmp_path_factory):
    from apps.cli import main

    tmp = tmp_path_factory.mktemp("binary")
    cfg = _config(cohort, tmp, "binary", task={"kind": "classification", "label": "label"},
                  manifest="manifest_binary.csv", drop=())
    run = tmp / "run"
    assert main(["-q", "train", "--config", str(cfg), "--out", str(run)]) == 0
    return run


@pytest.mark.slow
def test_binary_classification_end_to_end(binary_run, tmp_path, capsys):
    from apps.cli import main

    run = binary_run
    for name in ("metrics.json", "predictions.csv", "calibration.png", "decision_curve.png", "checkpoint.pt",
                 "history.json", "splits.csv"):
        assert (run / name).is_file(), name
    assert not (run / "km_risk_groups.png").exists()
    m = json.loads((run / "metrics.json").read_text())
    assert m["task"] == "classification" and "c_index" not in m
    assert m["auc"] is not None and 0.0 <= m["auc"] <= 1.0
    assert m["ablation"] == {"fused": m["auc"]}
    assert m["classification"]["task"] == "binary" and m["classification"]["classes"] == ["0", "1"]
    assert set(m["auc_per_site"]) == set(pd.read_csv(run / "predictions.csv").query("split == 'test'")["site"])
    assert m["per_site"][-1]["group"] == "all" and m["per_site"][-1]["auc"] == m["auc"]
    assert sum(m["n_patients"].values()) == 48 and "confounder_probe_auc" in m and "ood" in m
    hist = json.loads((run / "history.json").read_text())["fused"]
    assert all("val_auc" in h for h in hist)
    preds = pd.read_csv(run / "predictions.csv", dtype={"label": str, "predicted": str})
    assert len(preds) == 48
    assert {"patient", "site", "split", "label", "predicted", "proba_0", "proba_1", "ood_distance",
            "ood_flag"} <= set(preds.columns)
    assert not {"time", "event", "risk_group"} & set(preds.columns)
    np.testing.assert_allclose(preds["proba_0"] + preds["proba_1"], 1.0, atol=1e-5)
    # evaluate reproduces the metrics from the checkpoint (classes travel in it)
    copy = tmp_path / "run_copy"
    shutil.copytree(run, copy)
    capsys.readouterr()
    assert main(["-q", "evaluate", "--run", str(copy)]) == 0
    assert "ROC AUC" in capsys.readouterr().out
    m2 = json.loads((copy / "metrics.json").read_text())
    assert m2["auc"] == pytest.approx(m["auc"], abs=1e-4)
    assert m2["auc_per_site"] == pytest.approx(m["auc_per_site"], abs=1e-4)


@pytest.mark.slow
def test_multiclass_classification_end_to_end(cohort, tmp_path):
    from apps.cli import main

    cfg = _config(cohort, tmp_path, "three", task={"kind": "classification", "loss": "focal",
                                                     "classes": ["low", "mid", "high"]},
                  manifest="manifest_3class.csv")
    run = tmp_path / "run"
    assert main(["-q", "train", "--config", str(cfg), "--out", str(run)]) == 0
    m = json.loads((run / "metrics.json").read_text())
    assert m["classes"] == ["low", "mid", "high"] and m["classification"]["task"] == "multiclass"
    assert m["auc"] is None or 0.0 <= m["auc"] <= 1.0
    assert (run / "calibration.png").is_file() and not (run / "decision_curve.png").exists()
    preds = pd.read_csv(run / "predictions.csv")
    np.testing.assert_allclose(preds[["proba_low", "proba_mid", "proba_high"]].sum(1), 1.0, atol=1e-5)


@pytest.mark.slow
def test_kfold_classification_aggregates_auc(cohort, tmp_path, capsys):
    from apps.cli import main

    cfg_path = _config(cohort, tmp_path, "kfold", task={"kind": "classification"}, manifest="manifest_binary.csv",
                       drop=("ct", "mri", "pet"))
    cfg = yaml.safe_load(cfg_path.read_text())
    cfg["split"].update(scheme="kfold", n_folds=2, stratify=["label"])
    cfg_path.write_text(yaml.safe_dump(cfg))
    run = tmp_path / "run"
    capsys.readouterr()
    assert main(["-q", "train", "--config", str(cfg_path), "--out", str(run)]) == 0
    out = capsys.readouterr().out
    assert "ROC AUC" in out and "AUC above = mean over folds" in out
    m = json.loads((run / "metrics.json").read_text())
    assert m["task"] == "classification" and "c_index" not in m and len(m["folds"]) == 2
    fold_aucs = [f["auc"] for f in m["folds"]]
    assert all(a is None or 0.0 <= a <= 1.0 for a in fold_aucs)
    assert m["auc"] == pytest.approx(np.mean([a for a in fold_aucs if a is not None]), abs=1e-4)
    assert set(m["auc_per_site"]) <= {"SITE-A", "SITE-B", "SITE-C"} and set(m["ablation"]) == {"fused"}
    # stratified by label: each test fold holds both classes in equal measure
    for k in (1, 2):
        test = pd.read_csv(run / "folds" / f"fold-{k}" / "predictions.csv", dtype={"label": str})
        counts = test.query("split == 'test'")["label"].value_counts()
        assert set(counts.index) == {"0", "1"} and abs(counts["0"] - counts["1"]) <= 1


@pytest.mark.slow
def test_discrete_time_survival_end_to_end(cohort, tmp_path):
    from apps.cli import main
    from fusion.provenance import load_checkpoint

    cfg = _config(cohort, tmp_path, "dt", task={"kind": "survival", "loss": "discrete_time", "n_intervals": 5})
    run = tmp_path / "run"
    assert main(["-q", "train", "--config", str(cfg), "--out", str(run)]) == 0
    m = json.loads((run / "metrics.json").read_text())
    assert 0.0 <= m["c_index"] <= 1.0 and (run / "km_risk_groups.png").is_file()
    ck = load_checkpoint(run / "checkpoint.pt")
    cuts = ck["task_meta"]["cuts"]
    assert 2 <= len(cuts) <= 6 and ck["state_dict"]["cuts"].tolist() == pytest.approx(cuts)
    assert main(["-q", "evaluate", "--run", str(run)]) == 0
    assert json.loads((run / "metrics.json").read_text())["c_index"] == pytest.approx(m["c_index"], abs=1e-4)


@pytest.mark.slow
def test_multitask_survival_with_auxiliary_label_end_to_end(cohort, tmp_path):
    from apps.cli import main

    labels = _truth_labels(cohort, 2)
    first = sorted(labels)[0]
    labels[first] = ""  # an empty auxiliary label is allowed: that patient only trains the survival head
    manifest = _labelled_manifest(cohort, "manifest_aux.csv", labels, column="high_lp")
    cfg = _config(cohort, tmp_path, "mt", task={"kind": "survival", "multitask": {"aux_label": "high_lp"}},
                  manifest=manifest)
    run = tmp_path / "run"
    assert main(["-q", "train", "--config", str(cfg), "--out", str(run)]) == 0
    m = json.loads((run / "metrics.json").read_text())
    assert 0.0 <= m["c_index"] <= 1.0
    mt = m["multitask"]
    assert mt["aux_label"] == "high_lp" and mt["classes"] == ["0", "1"]
    assert all(np.isfinite(v) and v > 0 for v in mt["task_weights"].values())
    assert all(np.isfinite(v) for v in mt["log_variances"].values())
    assert json.loads((run / "report.json").read_text())["n_missing_aux_label"] == 1


# --------------------------------------------------------------------------- bad input through the CLI
@pytest.mark.slow
def test_missing_label_names_file_row_patient_and_column(cohort, tmp_path, capsys):
    from apps.cli import main

    df = pd.read_csv(cohort / "manifest_binary.csv", dtype=str, keep_default_na=False)
    df.loc[6, "label"] = ""
    df.to_csv(cohort / "manifest_missing_label.csv", index=False)
    cfg = _config(cohort, tmp_path, "missing", task={"kind": "classification"},
                  manifest="manifest_missing_label.csv")
    rc = main(["-q", "train", "--config", str(cfg), "--out", str(tmp_path / "r")])
    err = capsys.readouterr().err
    assert rc == 2
    assert "manifest_missing_label.csv" in err and "row 7" in err and df.loc[6, "patient_id"] in err
    assert "'label'" in err


@pytest.mark.slow
def test_focal_loss_with_survival_is_a_config_error_through_the_cli(cohort, tmp_path, capsys):
    from apps.cli import main

    cfg = _config(cohort, tmp_path, "focal", task={"kind": "survival", "loss": "focal"})
    rc = main(["-q", "train", "--config", str(cfg), "--out", str(tmp_path / "r")])
    assert rc == 2 and "task.loss" in capsys.readouterr().err


@pytest.mark.slow
def test_unknown_classes_are_clear_errors(binary_run, cohort, tmp_path, capsys):
    from apps.cli import main

    # a class listed in task.classes that no training patient has
    cfg = _config(cohort, tmp_path, "extra", task={"kind": "classification", "classes": ["0", "1", "2"]},
                  manifest="manifest_binary.csv")
    rc = main(["-q", "train", "--config", str(cfg), "--out", str(tmp_path / "r1")])
    err = capsys.readouterr().err
    assert rc == 2 and "task.classes" in err and "'2'" in err and "no training patient" in err
    # a label of the manifest that task.classes does not list
    cfg = _config(cohort, tmp_path, "missing_cls", task={"kind": "classification", "classes": ["1", "x"]},
                  manifest="manifest_binary.csv")
    rc = main(["-q", "train", "--config", str(cfg), "--out", str(tmp_path / "r2")])
    err = capsys.readouterr().err
    assert rc == 2 and "task.classes" in err and "'0'" in err and "row " in err and "'label'" in err
