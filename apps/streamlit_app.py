"""radfusion patient explorer (Streamlit).

Start it with ``radfusion app --run RUN`` (binds 127.0.0.1:8501), or directly::

    streamlit run apps/streamlit_app.py -- --run RUN
    RADFUSION_RUN=RUN streamlit run apps/streamlit_app.py

Two views, reachable by URL (``?page=cohort`` or ``?page=patient&patient=P-xxxxxxxxxx``):

- **Cohort overview**: Kaplan-Meier curves of the predicted risk groups,
  per-site discrimination, calibration (when the run has it), the ablation
  table (fused vs single modalities) and the confounder probes.
- **Patient**: fused risk and its percentile among training patients, the
  predicted survival curve, the out-of-distribution flag, modality Shapley
  values, top SHAP features, pathway scores against the cohort, the EHR
  timeline and a CT/PET/MR slice viewer with Grad-CAM and ROI contour.

Only pseudonyms (``P-...``) are shown: internal patient IDs and DICOM
identifiers never reach the page.  Explanations are computed on first view
with :func:`fusion.explain.explain_run` and cached in ``RUN/explanations/``.
"""
from __future__ import annotations

import contextlib
import logging
import os
import sys
from pathlib import Path

_ROOT = Path(__file__).resolve().parents[1]
if str(_ROOT) not in sys.path:  # `streamlit run apps/streamlit_app.py` from anywhere
    sys.path.insert(0, str(_ROOT))

import streamlit as st  # noqa: E402

from apps import app_data as ad  # noqa: E402

log = logging.getLogger("radfusion.app")

RUN_ENV = "RADFUSION_RUN"
VIEWS = ("Cohort overview", "Patient")
_PAGE_OF_VIEW = {"Cohort overview": "cohort", "Patient": "patient"}
TIME_NOTE = "Times are in the units of the cohort's `time` column (days for the demo cohort)."


def run_folder_argument() -> str | None:
    """The run folder: ``--run RUN`` (or a bare path) after ``--`` on the ``streamlit run`` command line,
    else the ``RADFUSION_RUN`` environment variable."""
    if Path(sys.argv[0]).name == Path(__file__).name:
        args = sys.argv[1:]
        for i, a in enumerate(args):
            if a == "--run" and i + 1 < len(args):
                return args[i + 1]
            if a.startswith("--run="):
                return a.split("=", 1)[1]
        bare = [a for a in args if not a.startswith("-")]
        if bare:
            return bare[0]
    return os.environ.get(RUN_ENV)


# ------------------------------------------------------------------------------------------------ cached loading


def _stamp(p: Path) -> float:
    try:
        return p.stat().st_mtime
    except OSError:
        return 0.0


@st.cache_data(show_spinner=False, max_entries=8)
def _load_run(run: str, stamp: float) -> ad.RunInfo:  # noqa: ARG001 - stamp invalidates the cache
    return ad.load_run(run)


@st.cache_resource(show_spinner=False, max_entries=4)
def _trained_fold(fold: str, stamp: float):  # noqa: ARG001
    from fusion.experiment import load_trained_fold

    return load_trained_fold(fold, ablation=False)


@st.cache_data(show_spinner=False, max_entries=32)
def _png(kind: str, *args, **kwargs) -> bytes:
    fig = getattr(ad, kind)(*args, **kwargs)
    return ad.fig_to_png(fig)


def _figure(kind: str, *args, caption: str | None = None, **kwargs) -> None:
    st.image(_png(kind, *args, **kwargs), caption=caption, width="stretch")


@contextlib.contextmanager
def _section(what: str):
    """Show a plain error (never a traceback) if one section fails; the rest of the page still renders."""
    try:
        yield
    except Exception as err:  # noqa: BLE001
        log.exception("app section %r failed", what)  # server log only
        st.error(f"The {what} could not be displayed ({type(err).__name__}). The details are in the server log.")


# ------------------------------------------------------------------------------------------------ cohort view


def cohort_view(run: ad.RunInfo) -> None:
    m = run.metrics
    st.title("Cohort overview")
    n = m.get("n_patients", {})
    if run.scheme == "loso":
        st.caption(f"Run `{run.path.name}` · leave-one-site-out: {len(run.folds)} folds, each site held out in turn "
                   f"({n.get('total', '?')} patients) · modalities: "
                   + ", ".join(ad.modality_label(x) for x in run.modalities))
    else:
        st.caption(f"Run `{run.path.name}` · hold-out split: {n.get('train', '?')} training, "
                   f"{n.get('validation', '?')} validation, {n.get('test', '?')} held-out test patients · "
                   "modalities: " + ", ".join(ad.modality_label(x) for x in run.modalities))
    c1, c2, c3 = st.columns(3)
    c = ad.as_float(m.get("c_index"))
    c1.metric("Held-out C-index (fused)", "n/a" if c is None else f"{c:.3f}",
              help="Harrell's concordance on patients the model never saw: 0.5 = chance, 1.0 = perfect ranking.")
    n_test = int((run.predictions["split"] == "test").sum())
    c2.metric("Held-out patients", f"{n_test}")
    p = ad.as_float(m.get("logrank_p_risk_groups"))
    c3.metric("Log-rank p (risk groups)", "n/a" if p is None else f"{p:.2g}",
              help="Do the predicted risk groups differ in survival? Small p = clearly separated.")

    st.header("Survival by predicted risk group")
    st.caption("Held-out (test) patients, grouped by the fused model's risk score with cut points from the training "
               "patients. Higher risk = earlier expected event, so the high-risk curve should fall faster. "
               + TIME_NOTE)
    with _section("Kaplan-Meier plot"):
        curves = ad.km_curves(run.predictions, run.risk_groups)
        if curves:
            _figure("km_figure", curves, caption="Kaplan-Meier survival by predicted risk group (held-out patients)")
        elif (run.folds[0] / "km_risk_groups.png").is_file():
            st.image(str(run.folds[0] / "km_risk_groups.png"), caption="Kaplan-Meier survival by predicted risk group")
        else:
            st.info("No held-out patients with outcomes: no Kaplan-Meier curves to show.")

    st.header("Discrimination per site")
    st.caption("Harrell's C-index of the fused model on each site's held-out patients (0.5 = chance). "
               "Small sites give wide confidence intervals.")
    with _section("per-site table"):
        table = ad.per_site_table(m, run.predictions)
        if table.empty:
            st.info("This run has no per-site results.")
        else:
            st.dataframe(table, hide_index=True,
                         column_config={"C-index": st.column_config.NumberColumn(format="%.3f")})

    _calibration_section(m)

    st.header("Which modalities matter: ablation")
    st.caption("The same model trained on one modality at a time, evaluated on the same held-out patients. "
               "A fused model above every single modality means the modalities add complementary information.")
    with _section("ablation table"):
        abl = ad.ablation_table(m)
        if abl.empty:
            st.info("This run was trained without ablations (evaluation.ablation: false).")
        else:
            st.dataframe(abl, hide_index=True, column_config={
                "C-index": st.column_config.NumberColumn(format="%.3f"),
                "Difference vs fused": st.column_config.TextColumn(help="single modality minus fused; negative = "
                                                                         "the fused model does better")})

    st.header("Confounder audit")
    st.caption("Can the site, scanner or other confounders be read off the fused representation? A probe AUC "
               "near 0.5 means the confounder is not recoverable; near 1.0 means the model could be using it.")
    with _section("confounder probe table"):
        probes = ad.probe_table(m)
        if probes.empty:
            st.info("No confounder probes in this run.")
        else:
            st.dataframe(probes, hide_index=True,
                         column_config={"Probe AUC": st.column_config.NumberColumn(format="%.2f")})
    if run.scheme == "loso" and m.get("folds"):
        with st.expander("Per held-out site (leave-one-site-out folds)"):
            import pandas as pd

            st.dataframe(pd.DataFrame([{"Held-out site": f.get("site"), "Patients": f.get("n_test"),
                                        "C-index": f.get("c_index")} for f in m["folds"]]), hide_index=True)
    card = run.path / "model_card.md"
    if card.is_file():
        with st.expander("Model card: intended use, data and limitations"), _section("model card"):
            st.markdown(card.read_text(encoding="utf-8", errors="replace"))


def _calibration_section(m: dict) -> None:
    cal = ad.calibration_table(m)
    summ = ad.survival_summary(m)
    scalars = [summ[k] for k in ("ibs", "uno_c", "td_auc_mean", "ici", "oe_ratio", "slope")]
    if (cal is None or cal.empty) and summ["td_auc"] is None and all(v is None for v in scalars):
        return
    st.header("Calibration and accuracy over time")
    st.caption("Calibration: do predicted event probabilities match what was observed? Points on the dashed "
               "diagonal are well calibrated. Time-dependent AUC: how well the risk separates patients with an event "
               "by each time from those still event-free (0.5 = chance). Integrated Brier score: overall prediction "
               "error (lower is better; 0.25 = no skill).")
    with _section("calibration plot"):
        cols = st.columns(2)
        with cols[0]:
            if cal is not None and not cal.empty:
                h = summ["horizon"]
                st.image(ad.fig_to_png(ad.calibration_figure(cal)), width="stretch",
                         caption="Calibration on held-out patients" + (f" at time {h:g}" if h is not None else ""))
            elif isinstance(m.get("survival"), dict) and m["survival"].get("calibration") is not None:
                st.caption("This run's calibration data has a layout this app does not know; see metrics.json.")
            if summ["td_auc"] is not None and summ["td_auc"]["auc"].notna().any():
                st.image(ad.fig_to_png(ad.td_auc_figure(summ["td_auc"], summ["td_auc_mean"])), width="stretch",
                         caption="Time-dependent AUC on held-out patients. " + TIME_NOTE)
        with cols[1]:
            labels = [("uno_c", "Uno's C-index", "%.3f", "concordance corrected for censoring; 0.5 = chance"),
                      ("td_auc_mean", "Mean time-dependent AUC", "%.3f", "0.5 = chance, 1 = perfect"),
                      ("ibs", "Integrated Brier score", "%.3f", "lower is better; 0.25 = no skill"),
                      ("ici", "Calibration error (ICI)", "%.3f", "mean |predicted - observed| event probability"),
                      ("oe_ratio", "Observed / expected events", "%.2f", "1 = right on average; >1 = risk "
                                                                          "underestimated"),
                      ("slope", "Calibration slope", "%.2f", "1 = ideal; <1 = predictions too extreme")]
            for key, label, fmt, helptext in labels:
                if summ[key] is not None:
                    st.metric(label, fmt % summ[key], help=helptext)


# ------------------------------------------------------------------------------------------------ patient view


def _ordinal(p: float) -> str:
    k = int(round(p))
    suffix = "th" if 10 <= k % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(k % 10, "th")
    return f"{k}{suffix}"


_SPLIT_TEXT = {"test": "held-out test patient (not used for training)",
               "validation": "validation patient (used to pick the training epoch)",
               "train": "training patient (the model has seen this outcome)"}


def patient_view(run: ad.RunInfo, pseudonym: str) -> None:
    rec = ad.patient_record(run, pseudonym)
    st.title(f"Patient {pseudonym}")
    st.caption(f"Site {rec.get('site', '?')} · {_SPLIT_TEXT.get(rec['split'], rec['split'])}"
               + (f" · fold {rec['fold']}" if run.scheme == "loso" else ""))

    fold = _fold_data(rec["fold_dir"])
    expl, expl_dir = None, None
    failed = st.session_state.setdefault("_explanation_failed", {})  # do not retry on every slider move
    try:
        expl = ad.load_explanation(run.path, pseudonym)
        if expl is None and pseudonym not in failed:
            with st.spinner(f"Computing the explanation of {pseudonym} (first view of this patient only; this can "
                            "take a minute)…"):
                expl = ad.compute_explanation(run.path, pseudonym, trained_fold=fold)
        expl_dir = ad.explanation_dir(run.path, pseudonym) if expl is not None else None
    except ad.ExplanationUnavailable as err:
        log.warning("explanation of %s failed: %s", pseudonym, err, exc_info=err.__cause__)
        failed[pseudonym] = str(err)
    if expl is None and pseudonym in failed:
        st.warning(f"Explanations are unavailable: {failed[pseudonym]}. Risk, images and EHR are still shown.")

    k = run.risk_groups
    risk = float(expl["risk"]) if expl and ad.as_float(expl.get("risk")) is not None else float(rec["risk"])
    pct = (float(expl["risk_percentile"]) if expl and ad.as_float(expl.get("risk_percentile")) is not None
           else rec["risk_percentile"])
    group = expl.get("risk_group") if expl and expl.get("risk_group") is not None else rec.get("risk_group")
    c1, c2, c3, c4 = st.columns(4)
    c1.metric("Fused risk score", f"{risk:.2f}",
              help="Log relative hazard from the fused model: higher risk = earlier expected event. "
                   "Compare it with other patients through the percentile, not as an absolute number.")
    c2.metric("Risk percentile", "n/a" if pct != pct else f"{_ordinal(pct)}",
              help="Share of the training patients with a lower or equal risk score.")
    c3.metric("Predicted risk group", ad.risk_group_label(group, k))
    ood = ad.ood_status(expl, rec)
    c4.metric("Similar to training patients?", "unknown" if ood is None else ("no – flagged" if ood["flag"] else "yes"),
              help=(ood or {}).get("method") or "Out-of-distribution check on the fused representation.")
    if ood is None:
        st.info("Out-of-distribution check: not available for this run.")
    elif ood["flag"]:
        st.warning("**Flagged: this patient is unlike the training data; interpret with caution.** "
                   + _ood_numbers(ood))
    else:
        st.success("Out-of-distribution check: this patient resembles the training data. " + _ood_numbers(ood))

    if expl:
        _explanation_sections(run, rec, expl, expl_dir)
    if fold is not None:
        _pathway_section(expl, fold)
        _ehr_section(fold, pseudonym)
        _image_section(fold, pseudonym, expl, expl_dir)


def _ood_numbers(ood: dict) -> str:
    if ood.get("distance") is None:
        return ""
    s = f"Distance to the training patients: {ood['distance']:.2f}"
    if ood.get("threshold") is not None:
        s += f" (flagged above {ood['threshold']:.2f})"
    return s + "."


def _fold_data(fold_dir: Path):
    try:
        with st.spinner("Loading the patient's images and EHR (first view only)…"):
            return _trained_fold(str(fold_dir), _stamp(fold_dir / "checkpoint.pt"))
    except Exception as err:  # noqa: BLE001
        log.exception("loading fold %s failed", fold_dir)
        st.error(f"The patient's images and EHR could not be loaded ({type(err).__name__}): the cohort files named in "
                 "the run's config.yaml must still be readable. The details are in the server log.")
        return None


def _explanation_sections(run: ad.RunInfo, rec: dict, expl: dict, expl_dir) -> None:
    st.header("Predicted survival")
    with _section("predicted survival curve"):
        curve = expl.get("survival_curve") or {}
        if curve.get("time"):
            left, right = st.columns([3, 2])
            ref = ad.km_reference(run.predictions, rec["fold"])
            with left:
                _figure("survival_curve_figure", curve, reference=ref,
                        caption="Predicted probability of remaining event-free (red) against the training cohort "
                                "(dashed).")
            with right:
                st.markdown("**Predicted event-free probability**")
                st.dataframe(ad.survival_at(curve), hide_index=True, column_config={
                    "Time": st.column_config.NumberColumn(format="%g"),
                    "Event-free probability": st.column_config.NumberColumn(format="percent")})
                st.caption("From the fused risk score and the training patients' baseline survival (Breslow). "
                           + TIME_NOTE)
        else:
            st.info("No survival curve in this explanation.")

    st.header("Why this prediction")
    col1, col2 = st.columns([5, 6])
    with col1, _section("modality contribution chart"):
        st.subheader("Contribution of each data type")
        tab = ad.modality_shapley_table(expl)
        if tab.empty:
            st.info("No modality contributions in this explanation.")
        else:
            _figure("shapley_figure", tab, caption="Modality Shapley values: red raises, blue lowers this "
                    "patient's risk relative to an average patient; grey = data missing for this patient.")
            ms = expl.get("modality_shapley") or {}
            if ad.as_float(ms.get("base_value")) is not None and ad.as_float(ms.get("full_value")) is not None:
                st.caption(f"Average-patient risk {ms['base_value']:.2f} + contributions = this patient's risk "
                           f"{ms['full_value']:.2f}.")
    with col2, _section("top features table"):
        st.subheader("Most influential features")
        feats = ad.feature_shap_table(expl)
        if feats.empty:
            st.info("No feature attributions in this explanation.")
        else:
            st.dataframe(feats, hide_index=True, column_config={
                "SHAP": st.column_config.NumberColumn(format="%+.3f", help="contribution to the risk score"),
                "Patient value": st.column_config.Column(help="the patient's value (standardised where the "
                                                               "model uses standardised inputs)")})
            st.caption("SHAP values within each data type: positive = pushes the risk up.")
    stab = expl.get("stability") or {}
    if stab:
        parts = [f"{name.replace('_', ' ')} {ad.as_float(stab.get(name)):.2f}" for name in
                 ("modality_shapley", "feature_shap", "gradcam") if ad.as_float(stab.get(name)) is not None]
        if parts:
            st.caption(f"Stability of these explanations over {stab.get('n_repeats', '?')} repeats (rank correlation, "
                       "1 = identical): " + ", ".join(parts) + ".")


def _pathway_section(expl: dict | None, fold) -> None:
    if not expl or not expl.get("pathway_scores"):
        return
    st.header("Pathway activity")
    st.caption("This patient's gene-set (pathway) scores (red dots) against the training patients (boxes: middle "
               "half, whiskers: range without outliers). Shown: the pathways where the patient is most unusual.")
    with _section("pathway chart"):
        table = ad.pathway_table(expl, top=10)
        cohort_scores = _training_pathways(fold)
        left, right = st.columns([3, 2])
        with left:
            _figure("pathway_figure", table, cohort_scores, caption="Pathway scores vs the training cohort")
        with right:
            st.dataframe(table, hide_index=True, column_config={
                "Score": st.column_config.NumberColumn(format="%.3g"),
                "Cohort percentile": st.column_config.ProgressColumn(format="%.0f", min_value=0, max_value=100,
                                                                     help="share of training patients with a "
                                                                          "lower or equal score")})
        with st.expander("All pathway scores"):
            st.dataframe(ad.pathway_table(expl, top=None), hide_index=True, column_config={
                "Score": st.column_config.NumberColumn(format="%.3f"),
                "Cohort percentile": st.column_config.NumberColumn(format="%.0f")})


def _training_pathways(fold):
    import pandas as pd

    raw = getattr(fold.transforms, "omics_raw_", None)
    if raw is None:
        raw = fold.cohort.omics_raw
    if raw is None:
        return None
    idx = fold.splits.get("train")
    rows = raw.iloc[idx] if idx is not None else raw
    return pd.DataFrame(rows.to_numpy(), columns=[str(c) for c in rows.columns])  # no patient index


def _ehr_section(fold, pseudonym: str) -> None:
    if fold.cohort.ehr_events is None:
        return
    st.header("EHR timeline")
    unit = getattr(fold.cfg.modalities.get("ehr"), "time_unit", "days") if "ehr" in fold.cfg.modalities else "days"
    with _section("EHR timeline"):
        tl = ad.ehr_timeline(fold.cohort.ehr_events, fold.cohort.patient_ids, fold.cohort.pseudonyms, pseudonym)
        if tl.empty:
            st.info("No EHR measurements for this patient.")
            return
        window = getattr(fold.cfg.modalities.get("ehr"), "window", None)
        st.caption(f"Each dot is a measurement ({len(tl)} in total, {tl['variable'].nunique()} variables); grey lines "
                   f"only connect them, nothing between dots was measured. Time in {unit} from baseline"
                   + (f"; the model uses the first {window:g} {unit}." if window else "."))
        _figure("ehr_figure", tl, time_label=f"time ({unit})", caption="Measured EHR values over time")
        with st.expander("Measurements as a table"):
            st.dataframe(tl.rename(columns={"time": f"Time ({unit})", "variable": "Variable", "value": "Value",
                                            "unit": "Unit"}), hide_index=True)


def _image_section(fold, pseudonym: str, expl: dict | None, expl_dir) -> None:
    mods = [m for m in ad.IMAGE_MODALITIES if m in fold.cohort.images]
    if not mods:
        return
    st.header("Images")
    st.caption("Preprocessed volumes as the model sees them (resampled, intensity-normalised). Cyan outline: the "
               "region of interest (lesion). Grad-CAM overlay: warm colours mark the regions that drove the model's "
               "risk estimate most.")
    i = fold.cohort.pseudonyms.index(pseudonym)
    j = {m: fold.cohort.modalities.index(m) for m in mods}
    tabs = st.tabs([ad.modality_label(m) for m in mods])
    for m, tab in zip(mods, tabs):
        with tab, _section(f"{ad.modality_label(m)} viewer"):
            if not fold.cohort.present[i, j[m]]:
                st.info(f"No {ad.modality_label(m)} for this patient.")
                continue
            vol = fold.cohort.images[m][i, 0]
            roi = fold.cohort.rois[m][i] if m in fold.cohort.rois else None
            cam = ad.load_gradcam(expl_dir, expl, m, vol.shape) if expl_dir is not None else None
            depth = vol.shape[0]
            left, right = st.columns([3, 2])
            with right:
                z = st.slider("Axial slice", 1, depth, ad.default_slice(roi, depth) + 1, key=f"slice_{m}",
                              help="Starts at the slice with the largest lesion area.")
                show = st.toggle("Grad-CAM overlay", value=cam is not None, key=f"cam_{m}", disabled=cam is None,
                                 help="Colours the regions that raised the risk estimate (hidden below 20% of the "
                                      "maximum)." if cam is not None else "No Grad-CAM heatmap for this modality.")
                info = ((expl or {}).get("gradcam") or {}).get(m)
                if isinstance(info, dict) and ad.as_float(info.get("top10_fraction_in_lesion")) is not None:
                    frac = float(info["top10_fraction_in_lesion"])
                    st.caption(f"{frac:.0%} of the 10% most salient voxels lie inside the lesion"
                               + (" (attention on the lesion)." if info.get("hit") else " (attention mostly outside "
                                  "the lesion: check the image before trusting this prediction)."))
                sel = info.get("layer_selection") if isinstance(info, dict) else None
                if isinstance(sel, dict) and sel.get("layer") and sel.get("n_patients"):
                    score = ad.as_float((sel.get("aopc") or {}).get(sel["layer"]))
                    st.caption(f"Heatmap from network layer {sel['layer']}: of the layers tried, removing its most "
                               f"salient voxels changed the risk score most in the direction the map claims, on "
                               f"{int(sel['n_patients'])} validation patients"
                               + (f" (mean drop {score:+.3f})." if score is not None else "."))
                rel = info.get("roi_reliance") if isinstance(info, dict) else None
                if isinstance(rel, dict) and ad.as_float(rel.get("delta_roi")) is not None:
                    st.caption(f"What the model reads here: compared with background tissue, the lesion adds "
                               f"{float(rel['delta_roi']):+.2f} to the risk score and the rest of the image "
                               f"{float(rel['delta_outside']):+.2f}"
                               + (" (it reads the lesion)." if rel.get("reads_roi") else
                                  " (it reads mostly outside the lesion: scanner or site effects?)."))
                if cam is not None and not cam.any():
                    st.caption("The Grad-CAM map is zero everywhere: no region of this image raised the patient's "
                               "risk estimate.")
                if roi is not None and not roi.any():
                    st.caption("No region of interest was given for this image.")
            with left:
                on = bool(show and cam is not None)
                _figure("slice_figure", vol, roi, cam, int(z) - 1, show_cam=on,
                        title=f"{ad.modality_label(m)}, slice {int(z)} of {depth}",
                        caption=f"{ad.modality_label(m)} slice {int(z)}/{depth}" + (" with Grad-CAM" if on else ""))


# ------------------------------------------------------------------------------------------------ page


def main() -> None:
    st.set_page_config(page_title="radfusion explorer", page_icon="🩺", layout="wide")
    run_arg = run_folder_argument()
    try:
        run = _load_run(str(run_arg or ""), _stamp(Path(run_arg or ".") / "metrics.json"))
    except ad.RunFolderError as err:
        st.title("radfusion explorer")
        st.error(f"Cannot open the run: {err}")
        return
    except Exception as err:  # noqa: BLE001
        log.exception("loading run %s failed", run_arg)
        st.title("radfusion explorer")
        st.error(f"Cannot open the run folder ({type(err).__name__}); the details are in the server log.")
        return

    choices = ad.patient_choices(run.predictions)
    qp = st.query_params
    link_problem = None
    if "view" not in st.session_state:  # first run of this browser session: follow the link
        st.session_state["view"] = VIEWS[1] if qp.get("page") == "patient" else VIEWS[0]
        wanted = qp.get("patient")
        if wanted in choices:
            st.session_state["patient"] = wanted
        elif wanted:
            link_problem = ("the patient in the link is not in this run (links only work for the run they were made "
                            "from); pick a patient in the sidebar.")
            st.session_state["view"] = VIEWS[0]
    if st.session_state.get("patient") not in choices:
        st.session_state["patient"] = choices[0] if choices else None

    home = ad.home_rows(run.predictions)
    split_of = dict(zip(home["patient"], home["split"]))
    with st.sidebar:
        st.markdown("### radfusion explorer")
        st.caption(f"Run: `{run.path.name}`")
        view = st.radio("View", VIEWS, key="view")
        pseudonym = st.selectbox("Patient (pseudonymised ID)", choices, key="patient",
                                 format_func=lambda p: f"{p} · {split_of.get(p, '')}",
                                 help="Held-out test patients are listed first.")
        st.caption("Only pseudonymised IDs are shown.")

    qp["page"] = _PAGE_OF_VIEW[view]
    if view == "Patient" and pseudonym:
        qp["patient"] = pseudonym
    elif "patient" in qp:
        del qp["patient"]

    if link_problem:
        st.warning(f"Note: {link_problem}")
    if view == "Patient":
        if not pseudonym:
            st.info("This run has no patients to show.")
            return
        try:
            patient_view(run, pseudonym)
        except Exception as err:  # noqa: BLE001
            log.exception("patient view failed for %s", pseudonym)
            st.error(f"The patient view could not be displayed ({type(err).__name__}). The details are in the "
                     "server log.")
    else:
        cohort_view(run)
    st.divider()
    st.caption(f"radfusion explorer · run `{run.path.name}` · pseudonymised data only · research use only, "
               "not a medical device.")


main()
