"""Fusion strategies, modality dropout and confounder removal on the demo cohort: one table.

Runs (all on the same demo cohort, ``configs/demo.yaml`` settings; every part is repeated for each
run seed of ``--seeds``, default 0, and the checks of parts 1 and 2 use the means over seeds: one
seed's differences between strategies, or between plain and adversarial runs, are as large as the
run-to-run noise of the test c-index, about 0.04 on the demo):

1. **Strategies**: a hold-out run per fusion strategy (``early``, ``concat``,
   ``gated_attention``, ``bilinear``, ``tensor``, ``cross_attention``,
   ``late``, ``late_stacking`` where available) on the same split; the
   single-modality models come from the ``concat`` run's ablation (they do
   not depend on the strategy).  Checks: every strategy beats every single
   modality; ``cross_attention`` and ``late`` come within 0.02 of the best
   strategy; the gap of each strategy to the best is printed with its paired
   standard error over seeds.
2. **Missing modalities at test time**: a ``concat`` model trained with
   ``training.modality_dropout`` (default 0.3) is evaluated on the test
   patients with each present non-clinical modality hidden with probability
   0.3 (20 random masks, at least one modality kept); check: the mean c-index
   drop is <= 0.03.  The same is reported for the model trained without
   modality dropout, and for an oracle on the same patients and masks: the
   demo's true log hazard restricted to the factors the present modalities
   show (``ground_truth.json``; frailty, which no modality measures, left
   out), i.e. what hiding modalities costs when the information is simply
   gone.
3. **Confounder removal**: ``configs/demo_loso_plain.yaml`` vs
   ``configs/demo_loso_adversarial.yaml`` (leave the demo's held-out site
   out); checks: the held-out site's c-index is >= 0.05 higher with the
   adversary, and the site-probe AUC on the fused embedding (training sites'
   patients, cross-validated logistic regression) is <= 0.60 with the
   adversary and clearly higher (>= 0.65) without.  ``--seeds 0,1,2`` repeats
   the pair with other run seeds and checks every seed and the mean gain;
   each run also reports the correlation, at the held-out site, between the
   CT part of the fused risk and the SHARP protocol (how much the model uses
   the shortcut), and of the whole risk and the protocol; ``--ceiling`` adds
   the plain config trained without CT (no access to the scanner shortcut),
   the reference for how much removal could gain and for the risk's chance
   correlation with the protocol at the held-out site.

Usage::

    python benchmarks/fusion_quality.py [--cohort DIR] [--out DIR] [--parts 1,2,3] [--seeds 0,1,2]

``--cohort`` reuses a demo cohort (e.g. ``radfusion_demo/cohort`` written by
``radfusion demo``); otherwise one is generated (400 patients, 4 sites).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from fusion.config import default_config_dir, load_config  # noqa: E402
from fusion.experiment import fold_dirs, load_trained_fold, run_experiment  # noqa: E402
from fusion.metrics import harrell_c  # noqa: E402
from fusion.strategies import list_fusions  # noqa: E402
from fusion.train import predict  # noqa: E402

STRATEGIES = ["early", "concat", "gated_attention", "bilinear", "tensor", "cross_attention", "late", "late_stacking"]


def _cfg(name: str, cohort: Path, **over):
    base = {"data": {"root": str(cohort)}}
    for k, v in over.items():
        base.setdefault(k, {}).update(v) if isinstance(v, dict) else base.__setitem__(k, v)
    return load_config(default_config_dir() / f"{name}.yaml", overrides=base)


def _run(cfg, out: Path) -> dict:
    t0 = time.time()
    m = run_experiment(cfg, out, progress=False, overwrite=True)
    m["_seconds"] = round(time.time() - t0, 1)
    return m


def _mean_se(values) -> tuple[float, float]:
    v = np.asarray(values, dtype=float)
    return float(v.mean()), float(v.std(ddof=1) / np.sqrt(len(v))) if len(v) > 1 else float("nan")


def part_strategies(cohort: Path, out: Path, *, seeds=(0,)) -> dict:
    """One hold-out run per strategy and seed; the checks use the means over seeds (one seed's
    differences between strategies are as large as the run-to-run noise)."""
    from fusion.config import FusionConfig

    available = [s for s in STRATEGIES if s in set(list_fusions()) | {"early"}
                 or _accepts(FusionConfig, s)]
    per_seed: dict = {}
    singles: dict = {}
    for seed in seeds:
        res = per_seed.setdefault(str(seed), {})
        for s in available:
            name = "demo" if s == "concat" else f"demo_{s}"  # the shipped per-strategy configs
            cfg = _cfg(name, cohort, seed=seed, evaluation={"ablation": s == "concat"})
            m = _run(cfg, out / f"strategy_{s}_seed{seed}")
            res[s] = m["c_index"]
            if s == "concat":
                for k, v in m["ablation"].items():
                    if k != "fused":
                        singles.setdefault(k, []).append(v)
            print(f"  seed {seed} {s:<16} c-index {m['c_index']:.3f}  ({m['_seconds']:.0f} s)", flush=True)
    mean = {s: round(float(np.mean([per_seed[str(k)][s] for k in seeds])), 4) for s in available}
    single = {k: round(float(np.mean(v)), 4) for k, v in singles.items()}
    best = max(mean.values())
    worst_single = max(single.values()) if single else float("nan")
    print("  mean over seeds: " + ", ".join(f"{s} {c:.3f}" for s, c in sorted(mean.items(), key=lambda x: -x[1]))
          + "; single modalities: " + ", ".join(f"{k} {c:.3f}" for k, c in sorted(single.items(),
                                                                                   key=lambda x: -x[1])), flush=True)
    best_name = max(mean, key=mean.get)
    gap_se = {}
    for s in available:  # paired over seeds: the split and the test patients are shared within a seed
        se = _mean_se([per_seed[str(k)][best_name] - per_seed[str(k)][s] for k in seeds])[1]
        gap_se[s] = round(se, 4) if np.isfinite(se) else None
    print(f"  gap to the best ({best_name}), paired SE over seeds: "
          + ", ".join(f"{s} {best - mean[s]:.3f} (SE {gap_se[s]})" for s in available if s != best_name), flush=True)
    return {
        "seeds": list(seeds), "per_seed": per_seed, "strategies": mean, "single_modality": single,
        "every_strategy_beats_every_single": all(c > worst_single for c in mean.values()),
        "best": best_name,
        "within_0.02_of_best": {s: round(best - mean[s], 4) for s in ("cross_attention", "late") if s in mean},
        "gap_to_best_se": gap_se,
    }


def _accepts(cls, name: str) -> bool:
    try:
        cls(name=name)
        return True
    except Exception:
        return False


def _removal_masks(present, mods, *, p: float, n_masks: int, seed: int) -> list:
    """``n_masks`` random copies of ``present`` (bool tensor, patients x modalities) with each present
    non-clinical modality hidden with probability ``p``; a patient left with nothing keeps what they had."""
    import torch

    cols = [j for j, m in enumerate(mods) if m != "clinical"]
    rng = np.random.default_rng(seed)
    masks = []
    for _ in range(n_masks):
        pr = present.clone()
        drop = rng.random((pr.shape[0], len(cols))) < p
        for k, j in enumerate(cols):
            pr[:, j] &= ~torch.from_numpy(drop[:, k])
        empty = ~pr.any(dim=1)
        pr[empty] = present[empty]  # never hide everything a patient has
        masks.append(pr)
    return masks


def _masked_c(fold, model, *, p: float, n_masks: int, seed: int) -> tuple[float, float]:
    t = fold.tensors["test"]
    base = harrell_c(t["event"].numpy(), t["time"].numpy(), predict(model, t, device=fold.device)["risk"])
    cs = [harrell_c(t["event"].numpy(), t["time"].numpy(), predict(model, dict(t, present=pr), device=fold.device)["risk"])
          for pr in _removal_masks(t["present"], list(t["modalities"]), p=p, n_masks=n_masks, seed=seed)]
    return base, float(np.mean(cs))


def _oracle_masked_c(fold, cohort: Path, *, p: float, n_masks: int, seed: int) -> tuple[float, float] | None:
    """The reference for part 2: the demo's true log hazard restricted to what the patient's present
    modalities show, on the same test patients and the same random masks as :func:`_masked_c`.

    From ``ground_truth.json``: coefficient x factor of each factor a present modality carries
    (``tumour`` when any of CT, PET or MR is present, as the lesion's size shows on all three, else
    its mean given the clinical stage over the training patients; ``metabolic`` with PET, ``oedema``
    with MR, ``immune`` with expression, ``inflammation`` with the EHR; ``age`` always) plus the
    site's baseline log hazard; ``frailty`` is measured by no modality and left out.  What hiding a
    modality costs this oracle is information that is gone; None without a demo ground truth.
    """
    path = Path(cohort) / "ground_truth.json"
    if not path.is_file():
        return None
    gt = json.loads(path.read_text())
    coef, pats = gt["coefficients"], gt["patients"]
    pid = fold.cohort.patient_ids
    train = [pats[pid[i]] for i in fold.splits["train"]]
    by_stage: dict = {}
    for r in train:
        by_stage.setdefault(r["stage"], []).append(r["factors"]["tumour"])
    tumour_given_stage = {k: float(np.mean(v)) for k, v in by_stage.items()}
    test = [pats[pid[i]] for i in fold.splits["test"]]
    site_lh = np.array([r["log_hazard"] - r["linear_predictor"] for r in test])
    t = fold.tensors["test"]
    mods = list(t["modalities"])
    carries = {"pet": "metabolic", "mri": "oedema", "omics": "immune", "ehr": "inflammation"}

    def risk(present) -> np.ndarray:
        pr = present.numpy()
        out = site_lh + coef["age"] * np.array([r["factors"]["age"] for r in test])
        imaging = np.zeros(len(test), dtype=bool)
        for j, m in enumerate(mods):
            if m in ("ct", "pet", "mri"):
                imaging |= pr[:, j]
            if m in carries:
                out = out + pr[:, j] * coef[carries[m]] * np.array([r["factors"][carries[m]] for r in test])
        tum = np.array([r["factors"]["tumour"] if seen else tumour_given_stage.get(r["stage"], 0.0)
                        for r, seen in zip(test, imaging)])
        return out + coef["tumour"] * tum

    ev, tm = t["event"].numpy(), t["time"].numpy()
    base = harrell_c(ev, tm, risk(t["present"]))
    cs = [harrell_c(ev, tm, risk(pr)) for pr in _removal_masks(t["present"], mods, p=p, n_masks=n_masks, seed=seed)]
    return base, float(np.mean(cs))


def part_dropout(cohort: Path, out: Path, *, dropout: float = 0.3, p: float = 0.3, n_masks: int = 20,
                 seeds=(0,)) -> dict:
    res: dict = {"per_seed": {}}
    for seed in seeds:
        row = res["per_seed"].setdefault(str(seed), {})
        for label, md in (("with_modality_dropout", dropout), ("without", 0.0)):
            cfg = _cfg("demo", cohort, seed=seed, training={"modality_dropout": md}, evaluation={"ablation": False})
            run = out / f"dropout_{md}_seed{seed}"
            _run(cfg, run)
            fold = load_trained_fold(run, ablation=False)
            full, masked = _masked_c(fold, fold.models["fused"], p=p, n_masks=n_masks, seed=seed)
            row[label] = {"training_dropout": md, "c_full": round(full, 4), "c_30pct_removed": round(masked, 4),
                          "drop": round(full - masked, 4)}
            print(f"  seed {seed} {label:<22} full {full:.3f}  30% removed {masked:.3f}  drop {full - masked:+.3f}",
                  flush=True)
            if label == "without":  # the split is the run seed's: the same test patients and masks as above
                ora = _oracle_masked_c(fold, cohort, p=p, n_masks=n_masks, seed=seed)
                if ora is not None:
                    row["oracle"] = {"c_full": round(ora[0], 4), "c_30pct_removed": round(ora[1], 4),
                                     "drop": round(ora[0] - ora[1], 4)}
                    print(f"  seed {seed} {'oracle (true factors)':<22} full {ora[0]:.3f}  30% removed {ora[1]:.3f}  "
                          f"drop {ora[0] - ora[1]:+.3f}", flush=True)
    for label in ("with_modality_dropout", "without", "oracle"):
        if not all(label in r for r in res["per_seed"].values()):
            continue
        m, se = _mean_se([r[label]["drop"] for r in res["per_seed"].values()])
        res[f"drop_mean_{label}"] = round(m, 4)
        res[f"drop_se_{label}"] = round(se, 4) if np.isfinite(se) else None
    print(f"  mean drop: with modality dropout {res['drop_mean_with_modality_dropout']:+.3f}, without "
          f"{res['drop_mean_without']:+.3f}" + (f", oracle {res['drop_mean_oracle']:+.3f}" if "drop_mean_oracle" in res
                                                else ""), flush=True)
    res["drop_at_most_0.03"] = res["drop_mean_with_modality_dropout"] <= 0.03
    return res


def _shortcut_reliance(run: Path) -> dict:
    """At the held-out site, Pearson correlations with the demo's SHARP scanner protocol (``scanner`` ending
    in ``-SHARP``) of the fused risk (``risk_vs_sharp``) and of its CT part, the risk minus the risk with CT
    hidden (``ct_part_vs_sharp``; None without CT).  A model that uses the protocol has a CT part that
    correlates with it.  The risk's correlation is comparable across models, CT or not: the plain model
    without CT cannot see the protocol, so its value is what the held-out sample gives by chance (the
    other modalities' risk happens to differ between the protocols); a removal that works comes close to
    it.  Both None without a scanner column."""
    import torch

    fold = load_trained_fold(fold_dirs(run)[0], ablation=False)
    t = fold.tensors["test"]
    scanner = fold.cohort.confounders.get("scanner")
    res = {"risk_vs_sharp": None, "ct_part_vs_sharp": None}
    if scanner is None:
        return res
    sharp = np.array([str(v).endswith("-SHARP") for v in scanner[fold.splits["test"]]], dtype=float)
    if sharp.std() == 0:
        return res
    model = fold.models["fused"]
    with torch.no_grad():
        risk = predict(model, t, device=fold.device)["risk"]
        if np.std(risk) > 0:
            res["risk_vs_sharp"] = round(float(np.corrcoef(risk, sharp)[0, 1]), 3)
        if "ct" in list(t["modalities"]):
            hidden = t["present"].clone()
            hidden[:, list(t["modalities"]).index("ct")] = False
            r_ct = risk - predict(model, dict(t, present=hidden), device=fold.device)["risk"]
            if np.std(r_ct) > 0:
                res["ct_part_vs_sharp"] = round(float(np.corrcoef(r_ct, sharp)[0, 1]), 3)
    return res


def part_confounders(cohort: Path, out: Path, *, seeds=(0,), adversarial_overrides: dict | None = None,
                     ceiling: bool = False) -> dict:
    """Plain vs adversarial leave-one-site-out runs, once per seed (the seed changes the training/validation
    split of the training sites and the initial weights; the held-out site is the same).

    ``ceiling``: also train the plain config without CT, the modality that carries the demo's scanner
    shortcut.  That model cannot use the shortcut at all, so its gain over the plain one is about what a
    perfect removal of the shortcut could gain (it also loses CT's real signal, which is small on the demo)."""
    res: dict = {"per_seed": {}}
    for seed in seeds:
        row = {}
        if ceiling:
            cfg = _cfg("demo_loso_plain", cohort, seed=seed)
            del cfg.modalities["ct"]
            m = _run(cfg, out / f"demo_loso_plain_no_ct_seed{seed}")
            rel = _shortcut_reliance(out / f"demo_loso_plain_no_ct_seed{seed}")
            row["plain_without_ct"] = {"c_index": m["folds"][0]["c_index"], "probe_auc": m["confounder_probe_auc"],
                                       "risk_vs_sharp_corr": rel["risk_vs_sharp"]}
            print(f"  seed {seed} {'plain without CT':<24} held-out {m['folds'][0]['site']} c-index "
                  f"{m['folds'][0]['c_index']:.3f}  probe AUC {m['confounder_probe_auc']}  corr(risk, SHARP) "
                  f"{rel['risk_vs_sharp']}", flush=True)
        for name in ("demo_loso_plain", "demo_loso_adversarial"):
            over = dict(adversarial_overrides or {}) if name == "demo_loso_adversarial" else {}
            over["seed"] = seed
            m = _run(_cfg(name, cohort, **over), out / f"{name}_seed{seed}")
            fold = m["folds"][0]
            rel = _shortcut_reliance(out / f"{name}_seed{seed}")
            row[name] = {"held_out_site": fold["site"], "c_index": fold["c_index"],
                         "probe_auc": m["confounder_probe_auc"], "ct_risk_vs_sharp_corr": rel["ct_part_vs_sharp"],
                         "risk_vs_sharp_corr": rel["risk_vs_sharp"], "seconds": m["_seconds"]}
            print(f"  seed {seed} {name:<24} held-out {fold['site']} c-index {fold['c_index']:.3f}  probe AUC "
                  f"{m['confounder_probe_auc']}  corr(CT part of risk, SHARP) {rel['ct_part_vs_sharp']}  "
                  f"corr(risk, SHARP) {rel['risk_vs_sharp']}  ({m['_seconds']:.0f} s)", flush=True)
        row["c_gain"] = round(row["demo_loso_adversarial"]["c_index"] - row["demo_loso_plain"]["c_index"], 4)
        if ceiling:
            row["c_gain_without_ct"] = round(row["plain_without_ct"]["c_index"] - row["demo_loso_plain"]["c_index"], 4)
        res["per_seed"][str(seed)] = row
    rows = list(res["per_seed"].values())
    gains = [r["c_gain"] for r in rows]
    adv_probe = [r["demo_loso_adversarial"]["probe_auc"].get("site", 1.0) for r in rows]
    plain_probe = [r["demo_loso_plain"]["probe_auc"].get("site", 0.0) for r in rows]
    res["c_gain_mean"] = round(float(np.mean(gains)), 4)
    if ceiling:
        res["c_gain_without_ct_mean"] = round(float(np.mean([r["c_gain_without_ct"] for r in rows])), 4)
        print(f"  ceiling: the plain config without CT gains {res['c_gain_without_ct_mean']:+.3f} on average", flush=True)
    se = _mean_se(gains)[1]
    res["c_gain_se"] = round(se, 4) if np.isfinite(se) else None  # paired over seeds
    res["checks"] = {
        "c_gain_at_least_0.05_every_seed": min(gains) >= 0.05,
        "c_gain_at_least_0.05_mean": float(np.mean(gains)) >= 0.05,
        "site_probe_adversarial_at_most_0.60_every_seed": max(adv_probe) <= 0.60,
        "site_probe_plain_at_least_0.65_every_seed": min(plain_probe) >= 0.65,
    }
    print(f"  gain per seed {gains}, mean {res['c_gain_mean']:+.3f} (SE {res['c_gain_se']}); site probe plain {plain_probe}, "
          f"adversarial {adv_probe}", flush=True)
    return res


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cohort", type=Path, default=None)
    ap.add_argument("--out", type=Path, default=Path("/tmp/radfusion_fusion_quality"))
    ap.add_argument("--patients", type=int, default=400)
    ap.add_argument("--parts", default="1,2,3")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seeds", default="0", help="comma-separated run seeds for every part (default 0); the "
                                                 "checks use the means (or every seed, part 3)")
    ap.add_argument("--adversarial-overrides", default=None,
                    help="part 3: JSON overrides of demo_loso_adversarial.yaml, e.g. "
                         "'{\"training\": {\"sampling\": \"site_stratified\"}}'")
    ap.add_argument("--ceiling", action="store_true",
                    help="part 3: also train the plain config without CT (it cannot see the scanner shortcut): "
                         "about the most a perfect removal of the shortcut could gain")
    args = ap.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    cohort = args.cohort
    if cohort is None:
        from data_adapters.demo import make_demo_cohort

        cohort = args.out / "cohort"
        if not (cohort / "manifest.csv").exists():
            make_demo_cohort(cohort, n_patients=args.patients, seed=0, n_workers=2, progress=False)
    cohort = cohort.resolve()
    parts = {int(p) for p in args.parts.split(",")}
    seeds = [int(k) for k in args.seeds.split(",")]
    report = {}
    if 1 in parts:
        print("1. fusion strategies (hold-out test c-index)", flush=True)
        report["strategies"] = part_strategies(cohort, args.out, seeds=seeds)
    if 2 in parts:
        print("2. 30% of non-clinical modalities removed at test time", flush=True)
        report["modality_removal"] = part_dropout(cohort, args.out, seeds=seeds)
    if 3 in parts:
        print("3. leave the held-out site out: plain vs adversarial", flush=True)
        report["confounders"] = part_confounders(
            cohort, args.out, seeds=seeds, ceiling=args.ceiling,
            adversarial_overrides=json.loads(args.adversarial_overrides) if args.adversarial_overrides else None)
    print("\n" + json.dumps(report, indent=2))
    (args.out / "fusion_quality.json").write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
