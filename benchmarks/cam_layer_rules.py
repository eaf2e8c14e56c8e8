"""Which Grad-CAM target layer to use: rules that need no lesion mask, scored against the demo's masks.

For each trained run (its first fold) and each image modality, every candidate layer
(:func:`fusion.explain.cam_layer_candidates`) gets a Grad-CAM map per patient in one pass
(:func:`fusion.explain.grad_cam_layers`).  On up to ``--max-patients`` validation patients (as
:func:`fusion.explain.fold_cam_layers` does) each layer is scored by

- ``deletion``: the shipped rule, :func:`fusion.explain.deletion_aopcs` (the map's top 2/5/10/20%
  voxels set to the image median; mean risk drop);
- ``deletion_road``: the same with noisy linear imputation instead of the median (ROAD, Rong et
  al. 2022): each deleted voxel the mean of its 6 neighbours (a sparse Laplace solve), plus noise
  of 1% of the image's SD;
- ``insertion``: from the median image, the map's top voxels put back (Petsiuk et al. 2018);
  mean risk rise;
- ``deletion+insertion``: the sum;

and the rules ``last`` (the last candidate) and ``first`` (the first) need no score.  Each rule
picks its layer (ties: the deeper one); the **hit** of a layer is the share of test patients whose
top-10% voxels centre on the lesion (:func:`fusion.explain.localisation`, which uses the mask).
The table shows every layer's hit and each rule's choice; the summary the mean hit per rule,
the best layer in hindsight, and how often each rule is worse than ``last``.

Usage::

    python benchmarks/cam_layer_rules.py --runs RUN [RUN ...] [--max-patients 24] [--threads 2]

The README's figures (six development runs: ``demo.yaml`` on the demo cohort, run seeds 0 and 3-7;
five further runs: seeds 1, 2, 8, 9 and a +80 HU CT-lesion cohort) came from the same computation.
"""
from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

SCORED = ("deletion", "deletion_road", "insertion", "deletion+insertion")
RULES = ("last", "first", *SCORED)


def harmonic_fill(x: np.ndarray, remove: np.ndarray, noise_sd: float, rng: np.random.Generator) -> np.ndarray:
    """``x`` with the voxels of ``remove`` replaced by the solution of the discrete Laplace equation
    (each removed voxel = the mean of its in-grid 6 neighbours, the others fixed), plus Gaussian noise."""
    import scipy.sparse as sp
    import scipy.sparse.linalg as spla

    shape = x.shape
    unk = np.flatnonzero(remove.ravel())
    if not len(unk):
        return x.copy()
    idx = -np.ones(x.size, dtype=np.int64)
    idx[unk] = np.arange(len(unk))
    idx = idx.reshape(shape)
    coords = np.unravel_index(unk, shape)
    rows, cols = [], []
    b = np.zeros(len(unk))
    deg = np.zeros(len(unk))
    for axis in range(3):
        for step in (1, -1):
            nb = [c.copy() for c in coords]
            nb[axis] = nb[axis] + step
            ok = (nb[axis] >= 0) & (nb[axis] < shape[axis])
            deg += ok
            k = np.flatnonzero(ok)
            nbk = tuple(c[k] for c in nb)
            j = idx[nbk]
            known = j < 0
            b[k[known]] += x[tuple(c[known] for c in nbk)]
            rows.append(k[~known])
            cols.append(j[~known])
    r, c = np.concatenate(rows), np.concatenate(cols)
    a = sp.csr_matrix((-np.ones(len(r)), (r, c)), shape=(len(unk), len(unk))) + sp.diags(deg)
    out = x.copy().ravel()
    out[unk] = spla.spsolve(a.tocsc(), b) + rng.normal(0.0, noise_sd, len(unk))
    return out.reshape(shape)


def _perturbation_scores(model, batch, modality, heats, *, rng) -> dict[str, list[float]]:
    """ROAD deletion and insertion scores of each map (0 for a constant map), one forward pass each."""
    import torch

    from fusion import explain as X

    b = X._image_patient_batch(model, batch, modality)
    x = b[modality].float()
    x3 = x[0, 0].double().cpu().numpy()
    fill = float(x.median())
    base = torch.full_like(x, fill)
    fr = X.DELETION_FRACTIONS
    ranked = [i for i, h in enumerate(heats) if float(h.max() - h.min()) > 0.0]
    out = {"deletion_road": [0.0] * len(heats), "insertion": [0.0] * len(heats)}
    if not ranked:
        return out
    road, ins = [], []
    for i in ranked:
        order = np.argsort(-heats[i].ravel(), kind="stable")
        for f in fr:
            top = order[:max(1, int(round(f * heats[i].size)))]
            rem = np.zeros(heats[i].size, dtype=bool)
            rem[top] = True
            road.append(torch.as_tensor(harmonic_fill(x3, rem.reshape(x3.shape), 0.01 * float(x3.std()), rng),
                                        dtype=x.dtype, device=x.device)[None, None])
            xi = base.clone().reshape(-1)
            sel = torch.as_tensor(top, device=x.device)
            xi[sel] = x.reshape(-1)[sel]
            ins.append(xi.reshape(x.shape))
    net = X._RiskAsClassScore(model, b, modality)
    with X._EvalMode(model), torch.no_grad():
        f0 = float(net(x)[0, 0])
        fb = float(net(base)[0, 0])
        fr_road = net(torch.cat(road)).reshape(len(ranked), len(fr)).double().cpu().numpy()
        fr_ins = net(torch.cat(ins)).reshape(len(ranked), len(fr)).double().cpu().numpy()
    for k, i in enumerate(ranked):
        out["deletion_road"][i] = float(np.mean(f0 - fr_road[k]))
        out["insertion"][i] = float(np.mean(fr_ins[k] - fb))
    return out


def evaluate_run(run: Path, *, max_patients: int = 24) -> dict:
    """modality -> {"layers", "hit": {layer: share}, "n_test", "scores": {rule: {layer: mean}}, "choice": {rule: layer}}."""
    from fusion import explain as X
    from fusion.data import take
    from fusion.experiment import fold_dirs, load_trained_fold

    tf = load_trained_fold(fold_dirs(run)[0], ablation=False)
    model = tf.models["fused"].eval()
    res = {}
    for m in X.IMAGE_MODALITIES:
        if m not in getattr(model, "encoders", {}):
            continue
        try:
            layers = X.cam_layer_candidates(model.encoders[m])
        except (ValueError, AttributeError, KeyError):
            continue
        one = (take(tf.tensors["validation"], [r]) for r in range(len(tf.splits["validation"])))
        batches = list(itertools.islice((b for b in one if X._present_of(b, m)), max_patients))
        rng = np.random.default_rng(0)
        per = {k: [] for k in SCORED}
        for b, maps in zip(batches, X.grad_cam_layers(model, batches, m, layers)):
            heats = [maps[layer] for layer in layers]
            dele = X.deletion_aopcs(model, b, m, heats)
            other = _perturbation_scores(model, b, m, heats, rng=rng)
            per["deletion"].append(dele)
            per["deletion_road"].append(other["deletion_road"])
            per["insertion"].append(other["insertion"])
            per["deletion+insertion"].append([d + i for d, i in zip(dele, other["insertion"])])
        scores = {k: dict(zip(layers, np.mean(v, axis=0).tolist())) for k, v in per.items() if v}
        choice = {"last": layers[-1], "first": layers[0]}
        for k in SCORED:
            choice[k] = max(reversed(layers), key=scores[k].get) if k in scores else layers[-1]
        hits = {layer: [] for layer in layers}
        for r, ci in enumerate(tf.splits["test"]):
            b = take(tf.tensors["test"], [r])
            roi = tf.cohort.rois[m][ci] if m in tf.cohort.rois else None
            if not X._present_of(b, m) or roi is None or not roi.any():
                continue
            maps = X.grad_cam_layers(model, [b], m, layers)[0]
            for layer in layers:
                hits[layer].append(bool(X.localisation(maps[layer], roi)["hit"]))
        res[m] = {"layers": layers, "n_validation": len(batches), "n_test": len(hits[layers[0]]),
                  "hit": {layer: float(np.mean(v)) if v else None for layer, v in hits.items()},
                  "scores": scores, "choice": choice}
    return res


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", nargs="+", type=Path, required=True, help="trained run folders (hold-out runs)")
    ap.add_argument("--max-patients", type=int, default=24)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = ap.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    results, t0 = {}, time.perf_counter()
    print(f"{'run':<28} {'mod':<4} {'n':>3}  hit per candidate layer            rule -> layer (hit)")
    for run in args.runs:
        res = evaluate_run(run, max_patients=args.max_patients)
        results[str(run)] = res
        for m, r in res.items():
            hits = " ".join(f"{layer} {r['hit'][layer]:.2f}" for layer in r["layers"])
            ch = " ".join(f"{k}->{r['choice'][k]}({r['hit'][r['choice'][k]]:.2f})" for k in RULES)
            print(f"{run.name:<28} {m:<4} {r['n_test']:>3}  {hits}  |  {ch}", flush=True)
    pairs = [r for res in results.values() for r in res.values() if all(v is not None for v in r["hit"].values())]
    print(f"\nmean hit over {len(pairs)} run-modality pairs (and per modality); 'worse than last' = pairs where "
          "the rule's layer hits less often than the last layer's")
    mods = sorted({m for res in results.values() for m in res})
    for k in RULES:
        per_mod = {m: [res[m]["hit"][res[m]["choice"][k]] for res in results.values() if m in res] for m in mods}
        worse = sum(r["hit"][r["choice"][k]] < r["hit"][r["choice"]["last"]] for r in pairs)
        print(f"  {k:<20} {np.mean([r['hit'][r['choice'][k]] for r in pairs]):.3f}  "
              + "  ".join(f"{m} {np.mean(v):.2f}" for m, v in per_mod.items()) + f"  worse than last: {worse}")
    print(f"  {'best in hindsight':<20} {np.mean([max(r['hit'].values()) for r in pairs]):.3f}")
    print(f"({time.perf_counter() - t0:.0f} s)")
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
