"""The Streamlit explorer: ``apps/app_data.py`` helpers, and ``apps/streamlit_app.py`` through AppTest on a real
small run (cohort view, patient view with a real explanation, privacy, bad input), plus ``apps/app.py``'s CLI."""
from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from streamlit.testing.v1 import AppTest

from apps import app_data as ad
from apps.cli import main
from fusion.config import default_config_dir

SCRIPT = Path(__file__).resolve().parents[2] / "apps" / "streamlit_app.py"
TIMEOUT = 600  # first patient view loads the fold and computes the explanation (tens of seconds on 2 cores)


# ------------------------------------------------------------------------------------------------ fixtures


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


def shared_app_run(tmp_path_factory) -> tuple[Path, Path]:
    """(cohort, run): a 48-patient demo cohort and a small run, built once per pytest session (shared with
    test_app_browser.py, which reuses the cached explanation)."""
    base = tmp_path_factory.getbasetemp() / "radfusion_app"
    cohort, run = base / "cohort", base / "run"
    if not (cohort / "manifest.csv").exists():
        assert main(["-q", "make-demo-cohort", "--out", str(cohort), "--patients", "48", "--sites", "3",
                     "--seed", "1", "--workers", "1"]) == 0
    if not (run / "metrics.json").exists():
        assert main(["-q", "train", "--config", str(_small_config(cohort, base)), "--out", str(run),
                     "--overwrite"]) == 0
    return cohort, run


@pytest.fixture(scope="module")
def app_run(tmp_path_factory):
    return shared_app_run(tmp_path_factory)


@pytest.fixture(scope="module")
def run_info(app_run):
    return ad.load_run(app_run[1])


def complete_test_patient(cohort: Path, run: ad.RunInfo) -> str:
    """The first held-out patient (in the app's order) who has every modality (pseudonyms depend on the site's
    salt, so the choice is made from the cohort's planted truth, not hard-coded)."""
    from data_adapters.privacy import pseudonymise

    truth = json.loads((cohort / "ground_truth.json").read_text())["patients"]
    complete = {pseudonymise(pid) for pid, p in truth.items() if all(p["has"].values())}
    return next(p for p in ad.patient_choices(run.predictions) if p in complete)


@pytest.fixture(scope="module")
def explained(app_run, run_info):
    """The patient whose explanation the tests compute through the app (and test_app_browser.py reuses)."""
    return complete_test_patient(app_run[0], run_info)


def _app(run: Path | str | None, monkeypatch) -> AppTest:
    if run is None:
        monkeypatch.delenv("RADFUSION_RUN", raising=False)
    else:
        monkeypatch.setenv("RADFUSION_RUN", str(run))
    return AppTest.from_file(str(SCRIPT), default_timeout=TIMEOUT)


def _nodes(node):
    yield node
    for child in getattr(node, "children", {}).values():
        yield from _nodes(child)


def _page_text(at: AppTest) -> str:
    """Every string the page shows: element protos (labels, options, captions, markdown, metrics, alerts ...)
    and the full content of every table."""
    parts = []
    for n in _nodes(at._tree):
        proto = getattr(n, "proto", None)
        if proto is not None:
            parts.append(str(proto))
        if getattr(n, "type", None) == "dataframe":
            parts.append(n.value.to_csv())
    parts += [str(o) for sb in at.selectbox for o in sb.options]
    return "\n".join(parts)


def _image_captions(at: AppTest) -> list[str]:
    return [c for im in at.image for c in im.captions]


def _no_failure(at: AppTest) -> None:
    assert not at.exception, [e.value for e in at.exception]
    assert not at.error, [e.value for e in at.error]
    assert "Traceback" not in _page_text(at)


# ------------------------------------------------------------------------------------------------ app_data


def test_load_run_and_cohort_tables(run_info, app_run):
    run = run_info
    assert run.scheme == "holdout" and run.folds == [app_run[1]] and run.risk_groups == 2
    assert len(run.predictions) == 48 and set(run.predictions["fold"]) == {"run"}
    choices = ad.patient_choices(run.predictions)
    assert len(choices) == 48 and all(p.startswith("P-") for p in choices)
    n_test = int((run.predictions["split"] == "test").sum())
    split = run.predictions.set_index("patient")["split"]
    assert (split[choices[:n_test]] == "test").all()  # held-out patients first
    curves = ad.km_curves(run.predictions, run.risk_groups)
    assert sum(c["n"] for c in curves) == n_test
    for c in curves:
        assert c["time"][0] == 0 and c["survival"][0] == 1 and np.all(np.diff(c["survival"]) <= 0)
        assert c["label"] in ("low risk", "high risk")
    sites = ad.per_site_table(run.metrics, run.predictions)
    per_site = sites[sites["Site"] != "All sites"]
    assert set(per_site["Site"]) == set(run.metrics["c_index_per_site"])
    assert per_site["Patients"].sum() == n_test
    abl = ad.ablation_table(run.metrics)
    assert abl["Model"].iloc[0].startswith("Fused") and len(abl) == 7
    assert abl["Difference vs fused"].iloc[0] == "reference"
    assert all(d.startswith(("+", "-")) for d in abl["Difference vs fused"].iloc[1:])
    probes = ad.probe_table(run.metrics)
    assert set(probes["Confounder"]) >= {"site", "scanner"}
    rec = ad.patient_record(run, choices[0])
    assert rec["split"] == "test" and 0 <= rec["risk_percentile"] <= 100 and rec["fold_dir"] == app_run[1]
    with pytest.raises(KeyError, match="not in this run"):
        ad.patient_record(run, "P-0000000000")


def test_load_run_rejects_what_is_not_a_run(app_run, tmp_path):
    cohort, run = app_run
    with pytest.raises(ad.RunFolderError, match="no run folder given"):
        ad.load_run(None)
    with pytest.raises(ad.RunFolderError, match="does not exist"):
        ad.load_run(tmp_path / "nope")
    with pytest.raises(ad.RunFolderError, match="is a file"):
        ad.load_run(cohort / "manifest.csv")
    with pytest.raises(ad.RunFolderError, match="metrics.json is missing"):
        ad.load_run(cohort)
    demo = tmp_path / "demo_out"
    (demo / "run").mkdir(parents=True)
    shutil.copy(run / "metrics.json", demo / "run" / "metrics.json")
    with pytest.raises(ad.RunFolderError, match="did you mean .*run"):
        ad.load_run(demo)
    unfinished = tmp_path / "unfinished"
    unfinished.mkdir()
    shutil.copy(run / "metrics.json", unfinished / "metrics.json")
    with pytest.raises(ad.RunFolderError, match="training did not finish"):
        ad.load_run(unfinished)
    (unfinished / "metrics.json").write_text("{not json")
    with pytest.raises(ad.RunFolderError, match="not valid JSON"):
        ad.load_run(unfinished)


def test_ehr_timeline_drops_internal_ids():
    events = pd.DataFrame({"patient_id": ["MRN-1", "MRN-1", "MRN-2", "MRN-1"], "time": [5.0, 1.0, 2.0, 3.0],
                           "variable": ["crp", "crp", "crp", "wbc"], "value": [4.0, 3.0, 9.0, np.nan]})
    tl = ad.ehr_timeline(events, ["MRN-1", "MRN-2"], ["P-aaaaaaaaaa", "P-bbbbbbbbbb"], "P-aaaaaaaaaa")
    assert list(tl.columns) == ["time", "variable", "value"]
    assert tl["time"].tolist() == [1.0, 5.0] and "MRN" not in tl.to_csv()
    assert ad.ehr_timeline(None, [], [], "P-aaaaaaaaaa").empty
    with pytest.raises(KeyError):
        ad.ehr_timeline(events, ["MRN-1"], ["P-aaaaaaaaaa"], "P-cccccccccc")


def test_evaluation_metrics_are_parsed(run_info):
    """per_site (with CIs) and survival (calibration, td-AUC, IBS) as fusion.evaluation writes them."""
    from fusion.evaluation import per_group_table, survival_metrics

    p = run_info.predictions
    tr, te = p[p["split"] == "train"], p[p["split"] == "test"]
    surv = survival_metrics(tr["time"], tr["event"].astype(bool), tr["risk"], te["time"], te["event"].astype(bool),
                            te["risk"])
    rows = per_group_table(te["site"].to_numpy(), te["time"], te["event"].astype(bool), te["risk"], n_boot=20)
    metrics = dict(run_info.metrics, survival=surv, per_site=rows)
    table = ad.per_site_table(metrics)
    assert list(table.columns) == ["Site", "Patients", "Events", "C-index", "95% CI"]
    assert table["Site"].iloc[-1] == "All sites" and table["Patients"].iloc[-1] == len(te)
    summ = ad.survival_summary(metrics)
    if surv["td_auc"] is not None:
        assert len(summ["td_auc"]) == len(surv["td_auc"]["times"])
    assert summ["ibs"] == surv["ibs"]
    cal = ad.calibration_table(metrics)
    if surv["calibration"] is not None:
        defined = [g for g in surv["calibration"]["groups"] if g["observed"] is not None]
        assert len(cal) == len(defined) and (cal["time"] == surv["calibration"]["horizon"]).all()
    # other layouts and absent keys
    assert ad.calibration_table({}) is None and ad.survival_summary({})["ibs"] is None
    alt = ad.calibration_table({"survival": {"calibration": {"predicted": [0.1, 0.5], "observed": [0.2, 0.4]}}})
    assert alt["observed"].tolist() == [0.2, 0.4]
    assert ad.calibration_table({"survival": {"calibration": {"weird": 1}}}) is None


def test_explanation_helpers(tmp_path):
    with pytest.raises(ValueError, match="pseudonymised"):
        ad.explanation_dir(tmp_path, "../../etc")
    with pytest.raises(ValueError, match="pseudonymised"):
        ad.explanation_dir(tmp_path, "DEMO-0001")
    assert ad.load_explanation(tmp_path, "P-aaaaaaaaaa") is None
    expl = {"modality_shapley": {"values": {"ct": 0.2, "pet": -0.3, "ehr": 0.0}, "absent": ["ehr"]},
            "feature_shap": {"clinical": [{"feature": "age", "value": 70.0, "shap": 0.1}],
                             "omics": [{"feature": "PW1", "value": 0.3, "shap": -0.4}]},
            "pathway_scores": {"PW1": 0.3, "PW2": 1.0}, "pathway_scores_cohort_percentile": {"PW1": 55.0, "PW2": 99.0},
            "gradcam": {"ct": {"npy": "gradcam_ct.npy"}}}
    ms = ad.modality_shapley_table(expl)
    assert ms["modality"].tolist() == ["pet", "ct", "ehr"] and not ms["present"].iloc[-1]
    fs = ad.feature_shap_table(expl)
    assert fs["Feature"].tolist() == ["PW1", "age"] and fs["Effect"].tolist() == ["lowers risk", "raises risk"]
    assert ad.pathway_table(expl)["Pathway"].tolist() == ["PW2", "PW1"]
    np.save(tmp_path / "gradcam_ct.npy", np.arange(8, dtype=np.float16).reshape(2, 2, 2))
    cam = ad.load_gradcam(tmp_path, expl, "ct", (2, 2, 2))
    assert cam.dtype == np.float32 and cam.min() == 0 and cam.max() == 1
    assert ad.load_gradcam(tmp_path, expl, "ct", (3, 3, 3)) is None and ad.load_gradcam(tmp_path, expl, "pet",
                                                                                       (2, 2, 2)) is None
    roi = np.zeros((5, 4, 4), dtype=bool)
    roi[3, 1:3, 1:3] = True
    assert ad.default_slice(roi, 5) == 3 and ad.default_slice(None, 5) == 2
    s = ad.survival_at({"time": [0, 10, 20, 30], "survival": [1, 0.9, 0.5, 0.2]}, [15, 30])
    assert s["Event-free probability"].tolist() == [0.9, 0.2]
    assert ad.ood_status(None, {"ood_flag": True, "ood_distance": 3.0})["flag"] is True
    assert ad.ood_status(None, {}) is None


def _fake_loso_run(app_run, tmp: Path) -> Path:
    """A leave-one-site-out run folder layout built from the hold-out run's files (no training)."""
    src = app_run[1]
    preds = pd.read_csv(src / "predictions.csv")
    metrics = json.loads((src / "metrics.json").read_text())
    run = tmp / "loso"
    folds = []
    for site in sorted(preds["site"].unique()):
        d = run / "folds" / site
        d.mkdir(parents=True)
        for name in ("checkpoint.pt", "splits.csv"):
            shutil.copy(src / name, d / name)
        p = preds.assign(split=np.where(preds["site"] == site, "test", "train"))
        p.to_csv(d / "predictions.csv", index=False)
        m = dict(metrics, split_scheme="loso")
        (d / "metrics.json").write_text(json.dumps(m))
        folds.append({"site": site, "c_index": 0.6, "n_test": int((p["split"] == "test").sum()),
                      "ablation": metrics["ablation"], "confounder_probe_auc": metrics["confounder_probe_auc"]})
    shutil.copy(src / "config.yaml", run / "config.yaml")
    top = {"c_index": 0.6, "c_index_per_site": {f["site"]: f["c_index"] for f in folds}, "folds": folds,
           "confounder_probe_auc": metrics["confounder_probe_auc"], "ablation": metrics["ablation"],
           "n_patients": {"total": len(preds), "folds": len(folds)}, "modalities": metrics["modalities"],
           "split_scheme": "loso", "seed": 0}
    (run / "metrics.json").write_text(json.dumps(top))
    return run


def test_leave_one_site_out_layout(app_run, tmp_path, monkeypatch):
    run = _fake_loso_run(app_run, tmp_path)
    info = ad.load_run(run)
    assert info.scheme == "loso" and [f.name for f in info.folds] == ["SITE-A", "SITE-B", "SITE-C"]
    assert len(info.predictions) == 3 * 48 and set(info.fold_metrics) == {"SITE-A", "SITE-B", "SITE-C"}
    choices = ad.patient_choices(info.predictions)
    assert len(choices) == 48  # one entry per patient, every one held out in its site's fold
    rec = ad.patient_record(info, choices[0])
    assert rec["split"] == "test" and rec["fold"] == rec["site"] and rec["fold_dir"] == run / "folds" / rec["site"]
    assert len(ad.km_curves(info.predictions, info.risk_groups)) >= 1
    at = _app(run, monkeypatch).run()
    _no_failure(at)
    assert at.title[0].value == "Cohort overview" and "leave-one-site-out" in at.caption[0].value
    assert any(e.label.startswith("Per held-out site") for e in at.expander)


# ------------------------------------------------------------------------------------------------ the app


def test_cohort_view(app_run, monkeypatch):
    at = _app(app_run[1], monkeypatch).run()
    _no_failure(at)
    assert at.title[0].value == "Cohort overview"
    headers = [h.value for h in at.header]
    assert "Survival by predicted risk group" in headers and "Discrimination per site" in headers
    assert any("Kaplan-Meier" in c for c in _image_captions(at))
    frames = [d.value for d in at.dataframe]
    sites = next(f for f in frames if "Site" in f.columns)
    assert {"SITE-A", "SITE-B", "SITE-C"} <= set(sites["Site"]) and "C-index" in sites
    abl = next(f for f in frames if "Model" in f.columns)
    assert abl["Model"].iloc[0].startswith("Fused") and len(abl) == 7
    assert any("Probe AUC" in f.columns for f in frames)
    assert at.metric[0].label.startswith("Held-out C-index")
    if (app_run[1] / "model_card.md").is_file():
        assert any(e.label.startswith("Model card") for e in at.expander)
    assert at.query_params.get("page") == "cohort"
    assert at.radio(key="view").value == "Cohort overview"


def test_cohort_view_renders_evaluation_metrics(app_run, tmp_path, monkeypatch):
    """A run whose metrics.json carries per_site CIs and survival metrics shows them (skipped when absent)."""
    from fusion.evaluation import per_group_table, survival_metrics

    run = tmp_path / "run"
    run.mkdir()
    for name in ("config.yaml", "predictions.csv", "checkpoint.pt", "splits.csv"):
        shutil.copy(app_run[1] / name, run / name)
    p = pd.read_csv(run / "predictions.csv")
    tr, te = p[p["split"] == "train"], p[p["split"] == "test"]
    metrics = json.loads((app_run[1] / "metrics.json").read_text())
    metrics["survival"] = survival_metrics(tr["time"], tr["event"].astype(bool), tr["risk"], te["time"],
                                           te["event"].astype(bool), te["risk"], times=[200.0, 400.0, 600.0],
                                           n_groups=2)
    metrics["per_site"] = per_group_table(te["site"].to_numpy(), te["time"], te["event"].astype(bool), te["risk"],
                                          n_boot=20)
    (run / "metrics.json").write_text(json.dumps(metrics))
    at = _app(run, monkeypatch).run()
    _no_failure(at)
    sites = next(d.value for d in at.dataframe if "Site" in d.value.columns)
    assert "95% CI" in sites.columns and sites["Site"].iloc[-1] == "All sites"
    assert "Calibration and accuracy over time" in [h.value for h in at.header]
    labels = [m.label for m in at.metric]
    assert any(lab.startswith("Integrated Brier") or lab.startswith("Uno") for lab in labels)


def test_patient_view(app_run, run_info, explained, monkeypatch):
    at = _app(app_run[1], monkeypatch).run()
    _no_failure(at)
    # pick the patient in the sidebar and switch to the patient view (one rerun)
    at.radio(key="view").set_value("Patient")
    at.selectbox(key="patient").select(explained)
    at.run()
    _no_failure(at)
    assert at.title[0].value == f"Patient {explained}"
    assert at.query_params == {"page": "patient", "patient": explained}
    assert (app_run[1] / "explanations" / explained / "explanation.json").is_file()  # computed and cached
    labels = {m.label: m.value for m in at.metric}
    assert set(labels) >= {"Fused risk score", "Risk percentile", "Predicted risk group",
                           "Similar to training patients?"}
    risk = float(run_info.predictions.set_index("patient").loc[explained, "risk"])
    assert float(labels["Fused risk score"]) == pytest.approx(risk, abs=0.01)
    assert labels["Similar to training patients?"] in ("yes", "no – flagged")
    ood_boxes = [a.value for a in list(at.success) + list(at.warning)]
    assert any("training data" in v for v in ood_boxes)
    captions = _image_captions(at)
    assert any("Modality Shapley" in c for c in captions)
    assert any("Predicted probability of remaining event-free" in c for c in captions)
    assert any("Pathway scores" in c for c in captions) and any("EHR" in c for c in captions)
    feats = next(d.value for d in at.dataframe if "SHAP" in d.value.columns)
    assert len(feats) > 0 and set(feats["Modality"]) <= {"Omics", "EHR", "Clinical"}
    assert {"Predicted survival", "Why this prediction", "EHR timeline", "Images"} <= {h.value for h in at.header}
    # slice viewer: one slider and Grad-CAM toggle per image modality; moving the slider redraws the slice
    assert {s.key for s in at.slider} == {"slice_ct", "slice_pet", "slice_mri"}
    ct = at.slider(key="slice_ct")
    assert 1 <= ct.value <= ct.max == 16
    assert at.toggle(key="cam_ct").value is True
    assert any(c.startswith("CT slice") and c.endswith("with Grad-CAM") for c in _image_captions(at))
    # the lesion-replacement check of what the model reads is stated next to each map
    assert any(c.value.startswith("What the model reads here") for c in at.caption)
    # and the layer the map was taken from, chosen by the deletion test on validation patients
    assert any(c.value.startswith("Heatmap from network layer features.") for c in at.caption)
    at.slider(key="slice_ct").set_value(1).run()
    _no_failure(at)
    assert "CT slice 1/16 with Grad-CAM" in _image_captions(at)
    at.toggle(key="cam_ct").set_value(False).run()
    _no_failure(at)
    assert "CT slice 1/16" in _image_captions(at) and at.title[0].value == f"Patient {explained}"


def test_patient_view_from_a_link(app_run, explained, monkeypatch):
    at = _app(app_run[1], monkeypatch)
    at.query_params["page"] = "patient"
    at.query_params["patient"] = explained
    at.run()
    _no_failure(at)
    assert at.title[0].value == f"Patient {explained}" and at.radio(key="view").value == "Patient"
    # a link to a patient that is not in the run: a plain warning and the cohort view
    at = _app(app_run[1], monkeypatch)
    at.query_params.update(page="patient", patient="P-0000000000")
    at.run()
    _no_failure(at)
    assert at.title[0].value == "Cohort overview"
    assert any("not in this run" in w.value for w in at.warning)


def test_patient_view_when_the_explanation_fails(app_run, run_info, explained, monkeypatch):
    """A failing explanation is a plain warning (no exception text, which could name a patient); risk, EHR and
    images are still shown, and the failure is not retried on every rerun."""
    import fusion.explain as fx

    calls = []

    def boom(*args, **kwargs):
        calls.append(1)
        raise RuntimeError("boom for DEMO-0001")

    monkeypatch.setattr(fx, "explain_patient", boom)
    monkeypatch.setattr(fx, "explain_run", boom)
    patient = next(p for p in ad.patient_choices(run_info.predictions) if p != explained
                   and ad.load_explanation(app_run[1], p) is None)
    at = _app(app_run[1], monkeypatch)
    at.query_params.update(page="patient", patient=patient)
    at.run()
    _no_failure(at)
    warning = " ".join(w.value for w in at.warning)
    assert "Explanations are unavailable" in warning and "RuntimeError" in warning
    assert "boom" not in _page_text(at) and "DEMO-0001" not in _page_text(at)
    assert at.metric[0].label == "Fused risk score" and len(at.slider) >= 1
    assert {"EHR timeline", "Images"} <= {h.value for h in at.header}
    at.slider[0].set_value(2).run()
    _no_failure(at)
    assert len(calls) == 1
    assert not (app_run[1] / "explanations" / patient / "explanation.json").exists()


def test_no_phi_in_rendered_pages(app_run, explained, monkeypatch, demo_phi):
    cohort, run = app_run
    phi = demo_phi(cohort)
    assert len(phi) > 48
    manifest_ids = set(pd.read_csv(cohort / "manifest.csv")["patient_id"])
    at = _app(run, monkeypatch).run()
    pages = {"cohort": _page_text(at)}
    at.radio(key="view").set_value("Patient")
    at.selectbox(key="patient").select(explained)
    at.run()
    _no_failure(at)
    pages["patient"] = _page_text(at)
    assert explained in pages["patient"] and "crp" in pages["patient"]  # the EHR table is part of the text
    leaks = [(page, v) for page, text in pages.items() for v in phi | manifest_ids if v in text]
    assert not leaks, leaks[:5]
    assert all(p.startswith("P-") for p in at.selectbox(key="patient").options)


@pytest.mark.parametrize("where", ["cohort", "missing", "unset"])
def test_not_a_run_folder_is_a_clear_error(app_run, tmp_path, monkeypatch, where):
    target = {"cohort": app_run[0], "missing": tmp_path / "nope", "unset": None}[where]
    at = _app(target, monkeypatch).run()
    assert not at.exception
    assert len(at.error) == 1
    msg = at.error[0].value
    assert msg.startswith("Cannot open the run")
    assert {"cohort": "not a radfusion run folder", "missing": "does not exist",
            "unset": "no run folder given"}[where] in msg
    assert "radfusion train --out RUN" in msg and "Traceback" not in msg


# ------------------------------------------------------------------------------------------------ apps/app.py


def test_app_command_line(app_run, tmp_path, capsys):
    from apps import app as app_mod

    parser = argparse.ArgumentParser(prog="radfusion")
    app_mod.add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["app", "--run", str(app_run[1])])
    assert (args.host, args.port, args.func) == ("127.0.0.1", 8501, app_mod.cmd_app)
    cmd = app_mod.streamlit_command(app_run[1], port=9999)
    assert cmd[cmd.index("--server.address") + 1] == "127.0.0.1"
    assert cmd[cmd.index("--server.port") + 1] == "9999" and cmd[cmd.index("--server.headless") + 1] == "true"
    assert cmd[-2:] == ["--run", str(app_run[1].resolve())] and Path(cmd[4]) == SCRIPT
    with pytest.raises(ad.RunFolderError, match="metrics.json is missing"):
        app_mod.launch(app_run[0])
    with pytest.raises(ValueError, match="--port"):
        app_mod.launch(app_run[1], port=0)
    # through the radfusion CLI: a folder that is not a run is a one-line error, exit status 2, no server
    assert main(["-q", "app", "--run", str(app_run[0])]) == 2
    assert "metrics.json is missing" in capsys.readouterr().err
