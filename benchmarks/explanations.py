"""Do the explanations recover what the demo cohort planted?  Quality, stability and cost on a demo run.

The synthetic demo cohort (``data_adapters.demo``) plants one latent factor
per modality with known log-hazard coefficients (``ground_truth.json``):
tumour 1.0 -> CT (lesion size/texture), metabolic 0.9 -> PET, immune 0.9 ->
omics (a few gene sets), inflammation 0.9 -> EHR (crp, albumin, ldh, wbc),
oedema 0.7 -> MRI, age 0.4 -> clinical.  But ``tumour`` is not CT's alone:
the PET and MR lesions have the CT lesion's size, and the clinical ``stage``
is derived from ``tumour`` plus noise (correlation about 0.8).  Shapley values
split shared information between the modalities that carry it (they do not
find the "causal" modality), so two planted references are shown: the
coefficient of the factor *unique* to each modality, and the log-hazard
signal *visible* in it, :math:`s_m = \sqrt{\sum_f \beta_f^2 \rho_{m,f}^2}`
over the factors it shows (:math:`\rho = 1` for rendered factors,
:math:`\rho` = corr(stage, tumour) measured on the cohort for clinical), e.g.
PET :math:`\sqrt{0.9^2 + 1^2} = 1.35` > MRI 1.22 > CT 1.0.

On the test patients of a trained demo run this prints one table with:

* modality Shapley (:func:`fusion.explain.modality_shapley`): mean
  :math:`|\\phi_m|` per modality over the test patients who have it, its rank,
  the planted coefficient, the Spearman correlation between the two, and the
  largest efficiency error;
* feature SHAP (:func:`fusion.explain.feature_shap`): rank of the planted
  features in the global importance (informative gene sets among all
  pathways; informative labs among the EHR variables; age and stage vs sex
  among the clinical covariates);
* what the model reads in each image (:func:`fusion.explain.roi_reliance`):
  the risk change when the dilated lesion, or everything else, is replaced
  by the image median; the model "reads the lesion" when the first is the
  larger.  This perturbation test is the truth the maps are held to: a
  faithful map sits in the lesion for those patients and not for the others;
* the Grad-CAM target layer :func:`fusion.explain.fold_cam_layers` chooses
  per image modality by the deletion test on the validation patients (no
  lesion mask), with each candidate layer's score;
* image maps (:func:`fusion.explain.image_map`: Grad-CAM, Grad-CAM++,
  HiResCAM on the last layer, Grad-CAM on the chosen layer, and integrated
  gradients) and, for the first
  ``--occlusion-patients`` patients, MONAI occlusion sensitivity
  (:func:`fusion.explain.occlusion_map`, model-agnostic but with 4-voxel
  cubes, smaller than most lesions, so a max-pooled lesion feature survives
  a partial occlusion): per image modality the
  share of patients whose top-10% voxels have their centre of mass in the
  one-voxel-dilated lesion ("hit"; the crop is centred on the lesion, so a
  diffuse map around the centre also hits), whose top-10% voxels cover at
  least half of the lesion ("covers"), whose maximum is in the dilated lesion
  ("peak", the pointing game), the mean fraction of the top-10% voxels inside
  the lesion vs chance, and the Spearman correlation with the occlusion map.
  The lesion mask is the planted *CT* lesion: the MR signal (``oedema``) is a
  rim of up to 6 mm *around* it, and the CT carries a body-wide scanner
  shortcut (HU offset, noise), so a faithful map need not sit inside the mask
  for MR and CT;
* stability (:func:`fusion.explain.explanation_stability`) on a few test
  patients;
* note on omics: interventional SHAP attributes what the *model* does with
  each pathway; the eight informative gene sets are strongly correlated (one
  latent factor) and share their credit, so a nuisance set the model uses as
  a correction can rank above them;
* the out-of-distribution flag rate on test patients (they come from the
  training distribution, so about 1 % is expected; threshold from cross-fitted
  training distances, and calibrated on the validation patients);
* timings per patient.

Run::

    python benchmarks/explanations.py [--patients 400] [--out DIR]
    python benchmarks/explanations.py --run RADFUSION_DEMO/run      # reuse `radfusion demo --out RADFUSION_DEMO`
    python benchmarks/explanations.py --out DIR --modality-dropout 0.3   # same cohort, model trained on subsets
    python benchmarks/explanations.py --run RUN --occlusion-patients 0   # skip the (slow) occlusion reference

Without ``--run`` a demo cohort is generated in ``OUT/cohort`` (kept if
already there) and the fused model is trained with ``configs/demo.yaml``
(no ablation models) into ``OUT/run``.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

#: image maps compared (fusion.explain.image_map methods: three class-activation maps and integrated gradients)
CAM_METHODS = ("gradcam", "gradcampp", "hirescam", "integrated_gradients")
#: the map row of Grad-CAM at the layer fusion.explain.fold_cam_layers chooses (the explain CLI's and app's default)
AUTO = "gradcam (auto layer)"
#: modality -> (factor unique to it, its coefficient)
PLANTED = {"ct": ("tumour", 1.0), "pet": ("metabolic", 0.9), "omics": ("immune", 0.9),
           "ehr": ("inflammation", 0.9), "mri": ("oedema", 0.7), "clinical": ("age", 0.4)}
#: modality -> factors it shows (None = correlation measured on the cohort)
VISIBLE = {"ct": {"tumour": 1.0}, "pet": {"metabolic": 1.0, "tumour": 1.0}, "mri": {"oedema": 1.0, "tumour": 1.0},
           "omics": {"immune": 1.0}, "ehr": {"inflammation": 1.0}, "clinical": {"age": 1.0, "tumour": None}}


def _visible_signal(truth: dict | None) -> dict[str, float]:
    """s_m = sqrt(sum_f beta_f^2 rho_{m,f}^2) per modality (rho of stage and tumour from the cohort)."""
    beta = dict(truth["coefficients"]) if truth else {"tumour": 1.0, "metabolic": 0.9, "oedema": 0.7, "immune": 0.9,
                                                      "inflammation": 0.9, "age": 0.4}
    rho_stage = 0.8
    if truth and truth.get("patients"):
        pts = list(truth["patients"].values())
        stage = np.array([{"I": 1, "II": 2, "III": 3, "IV": 4}.get(p.get("stage"), np.nan) for p in pts], float)
        tum = np.array([p["factors"]["tumour"] for p in pts], float)
        ok = np.isfinite(stage)
        rho_stage = float(np.corrcoef(stage[ok], tum[ok])[0, 1])
    return {m: float(np.sqrt(sum(beta.get(f, 0.0) ** 2 * (rho_stage if r is None else r) ** 2
                                 for f, r in fs.items()))) for m, fs in VISIBLE.items()}


def _make_run(out: Path, patients: int, sites: int, seed: int, threads: int,
              modality_dropout: float | None) -> tuple[Path, dict]:
    from data_adapters.demo import make_demo_cohort
    from fusion.config import default_config_dir, load_config
    from fusion.experiment import run_experiment

    timings = {}
    cohort = out / "cohort"
    t0 = time.perf_counter()
    if not (cohort / "manifest.csv").exists():
        print(f"generating a {patients}-patient demo cohort in {cohort} ...", flush=True)
        make_demo_cohort(cohort, n_patients=patients, n_sites=sites, seed=seed, n_workers=1, progress=False)
        timings["cohort_s"] = time.perf_counter() - t0
    training = {"num_threads": threads}
    if modality_dropout is not None:
        training["modality_dropout"] = modality_dropout
    cfg = load_config(default_config_dir() / "demo.yaml", overrides={
        "data": {"root": str(cohort.resolve())}, "seed": seed, "evaluation": {"ablation": False},
        "training": training})
    run = out / ("run" if modality_dropout is None else f"run_modality_dropout_{modality_dropout:g}")
    if not (run / "checkpoint.pt").exists():
        print(f"training the fused model (configs/demo.yaml, no ablations) into {run} ...", flush=True)
        t0 = time.perf_counter()
        metrics = run_experiment(cfg, run, progress=False, overwrite=True)
        timings["train_s"] = time.perf_counter() - t0
        print(f"  held-out c-index {metrics['c_index']:.3f}", flush=True)
    return run, timings


def _rank_of(names: list[str], targets) -> list[int]:
    pos = {n: i + 1 for i, n in enumerate(names)}
    return sorted(pos[t] for t in targets if t in pos)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--run", default=None, help="existing run folder (e.g. the run/ of `radfusion demo --out DIR`)")
    ap.add_argument("--out", default=None, help="work folder for the generated cohort and run (default: temporary)")
    ap.add_argument("--patients", type=int, default=400)
    ap.add_argument("--sites", type=int, default=4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-patients", type=int, default=None, help="explain at most this many test patients per fold")
    ap.add_argument("--stability-patients", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--background-size", type=int, default=50)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--occlusion-patients", type=int, default=30,
                    help="compute occlusion sensitivity (the model-agnostic reference) for this many test patients")
    ap.add_argument("--modality-dropout", type=float, default=None,
                    help="train with this training.modality_dropout (default: configs/demo.yaml's, 0); the model then "
                         "sees modality subsets in training, which modality Shapley values evaluate")
    args = ap.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    from fusion import explain as X
    from fusion.data import take
    from fusion.experiment import fold_dirs, load_trained_fold
    from fusion.train import predict

    timings: dict[str, float] = {}
    if args.run:
        run = Path(args.run)
    else:
        out = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="radfusion_explain_bench_"))
        run, timings = _make_run(out, args.patients, args.sites, args.seed, args.threads,
                                 args.modality_dropout)

    shap_abs: dict[str, list[float]] = {}
    eff_err = 0.0
    cam: dict[str, dict[str, list]] = {}
    reads: dict[str, dict[str, list]] = {}  # modality -> lesion-replacement test (fusion.explain.roi_reliance)
    ood_flags, ood_flags_val = [], []
    global_rank: dict[str, list[str]] = {}
    stab: dict[str, list[float]] = {"modality_shapley": [], "feature_shap": [], "gradcam": []}
    t_per: dict[str, list[float]] = {"modality_shapley": [], "feature_shap": [], "gradcam": [], "stability": []}
    n_explained = 0
    selections: list[tuple[str, dict]] = []
    n_occluded = 0
    truth = None
    from scipy.stats import spearmanr
    for fold in fold_dirs(run):
        t0 = time.perf_counter()
        tf = load_trained_fold(fold, ablation=False)
        timings["load_fold_s"] = timings.get("load_fold_s", 0.0) + time.perf_counter() - t0
        gt_path = Path(tf.cfg.data.manifest).parent / "ground_truth.json"
        if truth is None and gt_path.exists():
            truth = json.loads(gt_path.read_text())
        model = tf.models["fused"]
        t0 = time.perf_counter()  # Grad-CAM target layer per image modality, chosen without lesion masks
        layer_sel = X.fold_cam_layers(tf, method="gradcam")
        timings["cam_layer_selection_s"] = timings.get("cam_layer_selection_s", 0.0) + time.perf_counter() - t0
        selections.append((fold.name, layer_sel))
        test_rows = np.arange(len(tf.splits["test"]))[:args.max_patients]
        cohort_idx = tf.splits["test"][test_rows]
        n_explained += len(test_rows)

        # out-of-distribution flags
        tr = predict(model, tf.tensors["train"], device=tf.device)
        te = predict(model, tf.tensors["test"], device=tf.device)
        va = predict(model, tf.tensors["validation"], device=tf.device)
        ood = X.MahalanobisOOD(random_state=args.seed).fit(tr["embedding"])
        ood_flags += ood.flag(te["embedding"][test_rows]).tolist()
        ood_val = X.MahalanobisOOD(random_state=args.seed).fit(tr["embedding"]).calibrate(va["embedding"])
        ood_flags_val += ood_val.flag(te["embedding"][test_rows]).tolist()

        for r, ci in zip(test_rows, cohort_idx):
            b = take(tf.tensors["test"], [int(r)])
            t0 = time.perf_counter()
            ms = X.modality_shapley(model, b)
            t_per["modality_shapley"].append(time.perf_counter() - t0)
            eff_err = max(eff_err, ms["efficiency_error"])
            for m, v in ms["values"].items():
                if m not in ms["absent"]:
                    shap_abs.setdefault(m, []).append(abs(v))
            t0 = time.perf_counter()
            with_occlusion = n_occluded < args.occlusion_patients
            for m in ("ct", "pet", "mri"):
                if m in ms["absent"] or m not in model.modalities:
                    continue
                roi = tf.cohort.rois[m][ci]
                if not roi.any():
                    continue
                reliance = X.roi_reliance(model, b, m, roi)
                rel = reads.setdefault(m, {"roi": [], "out": [], "reads": []})
                rel["roi"].append(abs(reliance["delta_roi"]))
                rel["out"].append(abs(reliance["delta_outside"]))
                rel["reads"].append(reliance["reads_roi"])
                maps = {meth: X.image_map(model, b, m, meth) for meth in CAM_METHODS}
                if m in layer_sel:
                    maps[AUTO] = X.image_map(model, b, m, "gradcam", layer=layer_sel[m]["layer"])
                if with_occlusion:
                    maps["occlusion"] = X.occlusion_map(model, b, m)
                for meth, heat in maps.items():
                    loc = X.localisation(heat, roi)
                    d = cam.setdefault((m, meth), {k: [] for k in ("hit", "frac", "chance", "chance_hit", "cover",
                                                                   "peak", "rho_occ", "reads")})
                    d["reads"].append(reliance["reads_roi"])
                    d["hit"].append(bool(loc["hit"]))
                    d["frac"].append(loc["top10_fraction_in_lesion"] or 0.0)
                    d["chance"].append(loc["chance_fraction"])
                    d["chance_hit"].append(loc["chance_hit"])
                    d["cover"].append(loc["lesion_in_top"] or 0.0)
                    d["peak"].append(bool(loc["peak_hit"]))
                    if "occlusion" in maps and meth != "occlusion":
                        d["rho_occ"].append(float(spearmanr(heat.ravel(), maps["occlusion"].ravel()).statistic))
            n_occluded += int(with_occlusion)
            t_per["gradcam"].append(time.perf_counter() - t0)

        t0 = time.perf_counter()
        for m in ("omics", "ehr", "clinical"):
            if m not in model.modalities:
                continue
            fs = X.feature_shap(tf, cohort_idx, modality=m, background_size=args.background_size, seed=args.seed)
            global_rank[m] = [g["feature"] for g in fs["global"]]
        t_per["feature_shap"].append((time.perf_counter() - t0) / max(1, len(cohort_idx)))  # all tabular modalities

        for ci in cohort_idx[:args.stability_patients]:
            t0 = time.perf_counter()
            st = X.explanation_stability(tf, tf.cohort.pseudonyms[ci], n_repeats=args.repeats, seed=args.seed,
                                         background_size=args.background_size)
            t_per["stability"].append(time.perf_counter() - t0)
            for k in stab:
                if st[k] is not None:
                    stab[k].append(st[k])

    # ------------------------------------------------------------------ table
    from scipy.stats import spearmanr

    mean_abs = {m: float(np.mean(v)) for m, v in shap_abs.items()}
    visible = _visible_signal(truth)
    order = sorted(mean_abs, key=lambda m: -mean_abs[m])
    unique_order = sorted(mean_abs, key=lambda m: -PLANTED.get(m, ("", 0.0))[1])
    visible_order = sorted(mean_abs, key=lambda m: -visible.get(m, 0.0))
    rho_u = spearmanr([mean_abs[m] for m in order], [PLANTED.get(m, ("", 0.0))[1] for m in order]).statistic
    rho_v = spearmanr([mean_abs[m] for m in order], [visible.get(m, 0.0) for m in order]).statistic
    lines = []
    lines.append(f"Explanations on {n_explained} test patients of {run}  (efficiency error max {eff_err:.1e}, "
                 f"training.modality_dropout {tf.cfg.training.modality_dropout:g})")
    lines.append("")
    lines.append(f"{'modality':<10}{'mean |phi|':>11}{'rank':>6}{'unique beta':>12}{'rank':>6}{'visible s':>11}"
                 f"{'rank':>6}  factors shown")
    for m in order:
        f, beta = PLANTED.get(m, ("?", float("nan")))
        shown = " + ".join(VISIBLE.get(m, {f: 1.0}))
        lines.append(f"{m:<10}{mean_abs[m]:>11.4f}{order.index(m) + 1:>6}{beta:>12.1f}{unique_order.index(m) + 1:>6}"
                     f"{visible.get(m, float('nan')):>11.2f}{visible_order.index(m) + 1:>6}  {shown} "
                     f"(n={len(shap_abs[m])})")
    lines.append(f"Spearman(mean |phi|, unique beta) = {rho_u:.2f}; Spearman(mean |phi|, visible s) = {rho_v:.2f}; "
                 f"CT (largest unique coefficient) ranks {order.index('ct') + 1 if 'ct' in order else 'n/a'} "
                 f"of {len(order)}")
    lines.append("")
    if truth is not None:
        inf = truth.get("informative_gene_sets", {})
        sets = list(inf.get("up", [])) + list(inf.get("down", []))
        labs = list(truth.get("informative_labs", {}))
        if "omics" in global_rank:
            lines.append(f"feature SHAP omics: ranks of the {len(sets)} informative gene sets among "
                         f"{len(global_rank['omics'])} pathways: {_rank_of(global_rank['omics'], sets)}"
                         f"; nuisance sets {_rank_of(global_rank['omics'], inf.get('nuisance', []))}")
        if "ehr" in global_rank:
            lines.append(f"feature SHAP ehr: ranks of the informative labs {labs} among "
                         f"{len(global_rank['ehr'])} variables: {_rank_of(global_rank['ehr'], labs)}")
    if "clinical" in global_rank:
        lines.append(f"feature SHAP clinical: order {global_rank['clinical']} (sex is not prognostic)")
    lines.append("")
    lines.append("What the model reads (fusion.explain.roi_reliance): |risk change| when the lesion (dilated 2 voxels)")
    lines.append("or everything else is replaced by the image median; 'reads lesion' = the lesion change is larger")
    for m, rel in sorted(reads.items()):
        lines.append(f"  {m:<5} n={len(rel['reads']):>3}  lesion {np.mean(rel['roi']):.3f}  outside "
                     f"{np.mean(rel['out']):.3f}  reads lesion {np.mean(rel['reads']):.2f}")
    lines.append("")
    lines.append("Grad-CAM target layer chosen by the deletion test (fusion.explain.fold_cam_layers: mean AOPC, the")
    lines.append("risk drop when the map's top 2/5/10/20% voxels are set to the image median, on validation patients;")
    lines.append(f"no lesion mask used); the rows '{AUTO}' below use it, the rows 'gradcam' etc. the last layer")
    for fname, sel in selections:
        for m, v in sorted(sel.items()):
            scores = ", ".join(f"{c} {v['aopc'].get(c, float('nan')):+.3f}" for c in v["candidates"])
            lines.append(f"  {fname:<10} {m:<5} chosen {v['layer']:<14} (n={v['n_patients']} {v['split']}) {scores}")
    lines.append("")
    lines.append("Localisation of the top-10% voxels (per patient; share of patients, or mean):")
    lines.append("  hit = their centre of mass in the lesion (dilated 1 voxel); covers = >= half the lesion's voxels")
    lines.append("  are among them; peak = the maximum in the dilated lesion; rho occ = Spearman with occlusion;")
    lines.append("  hit|reads = hit among the patients whose model reads the lesion")
    lines.append(f"{'modality':<9}{'map':<21}{'n':>4}{'hit':>6}{'chance':>7}{'covers':>8}{'peak':>6}"
                 f"{'top10% in lesion':>18}{'chance':>7}{'rho occ':>9}{'hit|reads':>10}")
    for (m, meth), d in sorted(cam.items()):
        rho = f"{np.nanmean(d['rho_occ']):>9.2f}" if d["rho_occ"] else f"{'':>9}"
        sel = np.array(d["reads"], dtype=bool)
        hit_reads = f"{np.mean(np.array(d['hit'])[sel]):>10.2f}" if sel.any() else f"{'n/a':>10}"
        lines.append(f"{m:<9}{meth:<21}{len(d['hit']):>4}{np.mean(d['hit']):>6.2f}{np.mean(d['chance_hit']):>7.3f}"
                     f"{np.mean(np.array(d['cover']) >= 0.5):>8.2f}{np.mean(d['peak']):>6.2f}"
                     f"{np.mean(d['frac']):>18.3f}{np.mean(d['chance']):>7.3f}{rho}{hit_reads}")
    lines.append("")

    def fmt(v):
        return f"{np.mean(v):.3f} (n={len(v)})" if v else "n/a"

    lines.append(f"stability (mean pairwise Spearman, {args.repeats} perturbed repeats): modality Shapley "
                 f"{fmt(stab['modality_shapley'])}, feature SHAP {fmt(stab['feature_shap'])}, Grad-CAM "
                 f"{fmt(stab['gradcam'])}")
    lines.append(f"OOD flag rate on test patients: {np.mean(ood_flags):.3f} (cross-fitted training threshold), "
                 f"{np.mean(ood_flags_val):.3f} (threshold calibrated on validation); 0.01 expected in distribution")
    per = ", ".join(f"{k} {np.mean(v):.2f}" for k, v in t_per.items() if v)
    lines.append(f"time per patient (s): {per}")
    if timings:
        lines.append("setup (s): " + ", ".join(f"{k} {v:.0f}" for k, v in timings.items()))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
