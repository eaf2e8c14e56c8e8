"""``radfusion explain --run RUN --patient ID [--out DIR] [--repeats N] [--seed K]``: explain one patient.

Finds the fold of the run where the patient is a test patient (a
leave-one-site-out run has ``folds/<site>/``; a hold-out run is one fold, the
run folder itself), else the first fold that contains the patient, rebuilds
it (:func:`fusion.experiment.load_trained_fold`) and writes, with
:func:`fusion.explain.explain_patient`, into ``--out`` (default
``RUN/explanations/<pseudonym>/``):

* ``explanation.json``: prediction, risk group and percentile, survival curve,
  out-of-distribution score, modality Shapley values, feature SHAP values,
  Grad-CAM localisation, stability, pathway scores (the Streamlit app reads it);
* ``modality_shapley.png``, ``shap_<modality>.png``, ``gradcam_<modality>.png``;
* ``gradcam_<modality>.npy`` (float16) and ``.nii.gz`` on the preprocessed grid.

``--patient`` takes the pseudonym (``P-...``) shown in the run's
``predictions.csv`` / ``splits.csv``; study patient IDs are never accepted.  An
unknown pseudonym or a missing run folder exits with status 2 and a message
saying where valid pseudonyms are listed.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

__all__ = ["add_parser", "cmd_explain", "summary"]


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``explain`` on the CLI's sub-parsers (``func`` = :func:`cmd_explain`)."""
    p = subparsers.add_parser(
        "explain",
        help="explain one patient's prediction (modality Shapley, SHAP, Grad-CAM, OOD score)",
        description="Explain the fused model's prediction for one patient of a trained run: modality Shapley "
                    "values, feature SHAP values, Grad-CAM on the images, stability and an out-of-distribution "
                    "score, written as explanation.json + PNGs.",
    )
    p.add_argument("--run", required=True, help="run folder written by `radfusion train` or `radfusion demo`")
    p.add_argument("--patient", required=True,
                   help="patient pseudonym (P-...), as in the 'patient' column of RUN/predictions.csv")
    p.add_argument("--out", default=None, help="output folder (default RUN/explanations/<pseudonym>/)")
    p.add_argument("--repeats", type=int, default=5,
                   help="repeats of the stability analysis (default 5; 0 or 1 skips it)")
    p.add_argument("--seed", type=int, default=0, help="seed of SHAP sampling and perturbations")
    p.add_argument("--cam", default="gradcam", choices=["gradcam", "gradcampp", "hirescam", "integrated_gradients"],
                   help="image map: Grad-CAM (default), Grad-CAM++, HiResCAM (gradient x activation per voxel, "
                        "exact for a globally pooled target layer) or integrated gradients (from a featureless "
                        "image at the image's median; sums to the risk change)")
    p.add_argument("--cam-layer", default="auto",
                   help="target layer of a class-activation map: 'auto' (default; per image modality the layer "
                        "whose map passes the deletion test best on the fold's validation patients, cached in "
                        "the fold folder), 'last' (the last activated feature map) or a layer name of the encoder")
    p.set_defaults(func=cmd_explain)
    return p


def summary(result: dict) -> str:
    """Short plain-text summary of an explanation (risk, OOD flag, modality ranking)."""
    lines = [f"patient {result['patient']} (fold {result['fold']}, {result['split']} split, site {result['site']})"]
    grp = result.get("risk_group")
    what = {"discrete_time": "cumulative hazard", "classification": "probability of the positive class"}.get(
        result.get("task", "cox"), "log relative hazard")
    lines.append(f"  risk ({what}) {result['risk']:+.3f}: percentile {result['risk_percentile']:.0f} "
                 f"among training patients" + (f", risk group {grp}" if grp is not None else ""))
    ood = result["ood"]
    lines.append(f"  out-of-distribution: {'YES' if ood['flag'] else 'no'} (Mahalanobis distance "
                 f"{ood['distance']:.2f}, threshold {ood['threshold']:.2f})")
    ms = result["modality_shapley"]
    ranked = sorted((m for m in ms["values"] if m not in ms["absent"]), key=lambda m: -abs(ms["values"][m]))
    lines.append("  modalities by |Shapley value|: "
                 + ", ".join(f"{m} {ms['values'][m]:+.3f}" for m in ranked)
                 + (f"   (absent: {', '.join(ms['absent'])})" if ms["absent"] else ""))
    for m, items in result.get("feature_shap", {}).items():
        if items:
            top = items[0]
            lines.append(f"  top {m} feature: {top['feature']} (SHAP {top['shap']:+.3f})")
    for m, g in result.get("gradcam", {}).items():
        frac = g.get("top10_fraction_in_lesion")
        if g.get("unavailable"):
            lines.append(f"  Grad-CAM {m}: not available ({g['unavailable']})")
            continue
        lines.append(f"  Grad-CAM {m}: " + ("no lesion mask or a constant map" if frac is None else
                                            f"{100 * frac:.0f}% of the top-10% voxels in the lesion, "
                                            f"hit {'yes' if g.get('hit') else 'no'}"))
    st = result.get("stability", {})
    if st.get("n_repeats", 0) >= 2:
        def fmt(v):
            return "n/a" if v is None else f"{v:.2f}"
        lines.append(f"  stability (mean Spearman over {st['n_repeats']} perturbed repeats): modality Shapley "
                     f"{fmt(st.get('modality_shapley'))}, feature SHAP {fmt(st.get('feature_shap'))}, "
                     f"Grad-CAM {fmt(st.get('gradcam'))}")
    return "\n".join(lines)


def cmd_explain(args) -> int:
    """Run ``radfusion explain``; 0 on success, 2 on bad input (message on stderr)."""
    from fusion.explain import UnknownLayerError, UnknownPatientError, explain_run, find_patient_fold

    run = Path(args.run)
    prog = "radfusion explain"
    if not run.is_dir():
        print(f"{prog}: error: run folder {run} does not exist (give the folder written by `radfusion train "
              "--out RUN` or the run/ folder of `radfusion demo`)", file=sys.stderr)
        return 2
    repeats = getattr(args, "repeats", 5)
    if repeats is None or repeats < 0:
        print(f"{prog}: error: --repeats must be >= 0, got {repeats}", file=sys.stderr)
        return 2
    try:
        find_patient_fold(run, args.patient)
    except (FileNotFoundError, UnknownPatientError) as err:
        print(f"{prog}: error: {err}", file=sys.stderr)
        return 2
    out = Path(args.out) if getattr(args, "out", None) else run / "explanations" / args.patient
    try:
        result = explain_run(run, args.patient, out, n_repeats=repeats, seed=getattr(args, "seed", 0),
                             progress=not getattr(args, "quiet", False), cam_method=getattr(args, "cam", "gradcam"),
                             cam_layer=getattr(args, "cam_layer", "auto"))
    except UnknownLayerError as err:
        print(f"{prog}: error: --cam-layer: {err}", file=sys.stderr)
        return 2
    print(summary(result))
    print(f"\nexplanation written to {out}")
    return 0
