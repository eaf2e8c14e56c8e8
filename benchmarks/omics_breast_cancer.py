"""Expression + clinical survival model vs a clinical-only Cox model on GSE7390.

Data: scikit-survival's ``load_breast_cancer`` (Desmedt et al. 2007, GSE7390:
198 node-negative breast-cancer patients, 51 distant metastases, 76 genes of
the Wang et al. 2005 signature + age, tumour size, ER status and grade).

Protocol: 5-fold cross-validation stratified by event (fixed seed), repeated
over several outer seeds.  In every outer fold, using the training patients
only:

* **reference**: lifelines ``CoxPHFitter`` on the clinical variables (age,
  size, ER positive, grade intermediate / poor; well-differentiated and
  unknown grade = reference), ridge ``penalizer`` chosen by 5-fold inner CV
  (Harrell's C) from a grid;
* **ours**: radfusion encoders -> Cox risk, trained with
  ``fusion.losses.cox_ph_loss``: the 76 genes go through
  ``pathway_mlp_glasso`` (here with no hidden layer: a linear map whose
  per-gene group-lasso penalty is an L1-type gene selection), the clinical
  covariates through a linear ``mlp`` encoder, and the two risks are summed.
  Standardisation is fitted on the training fold; an L2 penalty on the
  weights (strength chosen on inner splits from a grid) and early stopping on
  an inner validation split (a quarter of the training fold); the models of
  ``n_inner`` different inner splits are averaged (z-scored risks).

Harrell's C (``fusion.metrics.harrell_c``; higher risk = worse, lifelines'
partial hazard has the same sign) on the held-out fold, averaged over folds
and outer seeds.

Run: ``python benchmarks/omics_breast_cancer.py [--seeds 0 1 2] [--inner 5]``
"""
from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

PENALIZERS = (0.001, 0.01, 0.03, 0.1, 0.3, 1.0)
L2_GRID = (0.03, 0.1, 0.3)


def load():
    """Genes (N, 76), clinical (N, 5) DataFrames, event (N,) bool, time (N,) float."""
    from sksurv.datasets import load_breast_cancer

    X, y = load_breast_cancer()
    genes = X[[c for c in X.columns if c.startswith("X")]].astype(float)
    grade = X["grade"].astype(str)
    clin = pd.DataFrame({
        "age": X["age"].astype(float),
        "size": X["size"].astype(float),
        "er_positive": (X["er"].astype(str) == "positive").astype(float),
        "grade_intermediate": (grade == "intermediate").astype(float),
        "grade_poor": (grade == "poorly differentiated").astype(float),
    })
    return genes, clin, y["e.tdm"].astype(bool), y["t.tdm"].astype(float)


# ----------------------------------------------------------------- reference
def _lifelines_fit(C: pd.DataFrame, t, e, penalizer: float):
    from lifelines import CoxPHFitter

    df = C.reset_index(drop=True).copy()
    df["T"], df["E"] = np.asarray(t), np.asarray(e).astype(int)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return CoxPHFitter(penalizer=penalizer).fit(df, "T", "E")


def clinical_cox(C: pd.DataFrame, t, e, tr, te, *, seed: int) -> tuple[np.ndarray, float]:
    """lifelines CoxPH on clinical variables, penalizer tuned by inner 5-fold CV; risk of ``te``."""
    from sklearn.model_selection import StratifiedKFold

    from fusion.metrics import harrell_c

    inner = StratifiedKFold(5, shuffle=True, random_state=seed)
    scores = []
    for pen in PENALIZERS:
        cs = []
        for a, b in inner.split(tr, e[tr]):
            m = _lifelines_fit(C.iloc[tr[a]], t[tr[a]], e[tr[a]], pen)
            cs.append(harrell_c(e[tr[b]], t[tr[b]], m.predict_partial_hazard(C.iloc[tr[b]].reset_index(drop=True))))
        scores.append(np.nanmean(cs))
    pen = PENALIZERS[int(np.nanargmax(scores))]
    m = _lifelines_fit(C.iloc[tr], t[tr], e[tr], pen)
    return m.predict_partial_hazard(C.iloc[te].reset_index(drop=True)).to_numpy(), pen


# ---------------------------------------------------------------------- ours
class GeneClinicalCox(nn.Module):
    """Omics encoder + clinical encoder (radfusion registry), summed into one Cox log-risk ``(B,)``."""

    def __init__(self, n_genes: int, n_clin: int, *, group_lasso: float) -> None:
        super().__init__()
        import encoders.omics  # noqa: F401  (registers the omics encoders)
        import encoders.tabular  # noqa: F401
        from encoders.registry import create_encoder

        self.omics = create_encoder("pathway_mlp_glasso", n_genes, 1, hidden=(), dropout=0.0,
                                    group_lasso=group_lasso)
        self.clinical = create_encoder("mlp", n_clin, 1, hidden=(), dropout=0.0)

    def forward(self, g: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        return (self.omics(g) + self.clinical(c)).reshape(-1)

    def l2(self) -> torch.Tensor:
        return (self.omics.first.weight ** 2).sum() + (self.clinical.net[-1].weight ** 2).sum()


def _train_one(Gtr, Ctr, ttr, etr, Gva, Cva, tva, eva, *, l2: float, group_lasso: float, seed: int,
               epochs: int = 300, patience: int = 30, lr: float = 0.01):
    from fusion.losses import cox_ph_loss
    from fusion.metrics import harrell_c

    torch.manual_seed(seed)
    model = GeneClinicalCox(Gtr.shape[1], Ctr.shape[1], group_lasso=group_lasso)
    for p in model.parameters():  # re-initialise per seed
        if p.ndim > 1:
            torch.nn.init.normal_(p, std=0.01)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    f = lambda a: torch.as_tensor(np.asarray(a), dtype=torch.float32)  # noqa: E731
    g, c, tt, ee = f(Gtr), f(Ctr), torch.as_tensor(ttr), torch.as_tensor(etr)
    gv, cv = f(Gva), f(Cva)
    best, best_state, bad = -np.inf, None, 0
    for _ in range(epochs):
        model.train()
        opt.zero_grad()
        loss = cox_ph_loss(model(g, c), tt, ee) + l2 * model.l2() + model.omics.penalty()
        loss.backward()
        opt.step()
        model.eval()
        with torch.no_grad():
            cval = harrell_c(eva, tva, model(gv, cv).numpy())
        if cval > best + 1e-6:
            best, bad = cval, 0
            best_state = {k: v.clone() for k, v in model.state_dict().items()}
        else:
            bad += 1
            if bad >= patience:
                break
    model.load_state_dict(best_state)
    model.eval()
    return model, best


def ours_cox(Gdf: pd.DataFrame, C: pd.DataFrame, t, e, tr, te, *, seed: int, n_inner: int = 5,
             group_lasso: float = 1e-3) -> tuple[np.ndarray, float]:
    """Our model's held-out risk (average of ``n_inner`` inner-split models at the L2 chosen on inner validation)."""
    from sklearn.model_selection import StratifiedShuffleSplit
    from sklearn.preprocessing import StandardScaler

    G, Cm = Gdf.to_numpy(float), C.to_numpy(float)
    splits = StratifiedShuffleSplit(n_splits=n_inner, test_size=0.25, random_state=seed).split(tr, e[tr])
    per_l2 = {l2: ([], []) for l2 in L2_GRID}
    for s, (a, b) in enumerate(splits):
        ia, ib = tr[a], tr[b]
        sg, sc = StandardScaler().fit(G[ia]), StandardScaler().fit(Cm[ia])
        for l2 in L2_GRID:
            model, val_c = _train_one(sg.transform(G[ia]), sc.transform(Cm[ia]), t[ia], e[ia],
                                      sg.transform(G[ib]), sc.transform(Cm[ib]), t[ib], e[ib],
                                      l2=l2, group_lasso=group_lasso, seed=1000 * seed + s)
            with torch.no_grad():
                r = model(torch.as_tensor(sg.transform(G[te]), dtype=torch.float32),
                          torch.as_tensor(sc.transform(Cm[te]), dtype=torch.float32)).numpy()
            per_l2[l2][0].append((r - r.mean()) / (r.std() + 1e-8))
            per_l2[l2][1].append(val_c)
    l2 = max(L2_GRID, key=lambda k: np.nanmean(per_l2[k][1]))
    return np.mean(per_l2[l2][0], axis=0), l2


# -------------------------------------------------------------------- driver
def run(seeds=(0, 1, 2), *, n_inner: int = 5, verbose: bool = True) -> dict:
    """Cross-validated c-indices of both models; returns per-seed and overall means."""
    Gdf, C, e, t = load()
    e, t = np.asarray(e), np.asarray(t)
    res = {"ours": [], "clinical_cox": [], "per_seed": []}
    n_threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny full-batch models: extra intra-op threads only add overhead
    try:
        _run_seeds(seeds, Gdf, C, e, t, n_inner, verbose, res)
    finally:
        torch.set_num_threads(n_threads)
    res["mean_ours"] = float(np.mean(res["ours"]))
    res["mean_clinical_cox"] = float(np.mean(res["clinical_cox"]))
    return res


def _run_seeds(seeds, Gdf, C, e, t, n_inner, verbose, res) -> None:
    from sklearn.model_selection import StratifiedKFold

    from fusion.metrics import harrell_c

    for seed in seeds:
        outer = StratifiedKFold(5, shuffle=True, random_state=seed)
        c_ours, c_ref = [], []
        for fold, (tr, te) in enumerate(outer.split(np.zeros(len(e)), e)):
            r_ref, pen = clinical_cox(C, t, e, tr, te, seed=seed)
            r_ours, l2 = ours_cox(Gdf, C, t, e, tr, te, seed=seed, n_inner=n_inner)
            c_ref.append(harrell_c(e[te], t[te], r_ref))
            c_ours.append(harrell_c(e[te], t[te], r_ours))
            if verbose:
                print(f"  seed {seed} fold {fold}: ours {c_ours[-1]:.3f} (l2 {l2})   "
                      f"clinical CoxPH {c_ref[-1]:.3f} (penalizer {pen})")
        res["per_seed"].append({"seed": seed, "ours": float(np.mean(c_ours)), "clinical_cox": float(np.mean(c_ref))})
        res["ours"].extend(c_ours)
        res["clinical_cox"].extend(c_ref)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--inner", type=int, default=5, help="inner splits averaged per outer fold")
    args = ap.parse_args(argv)
    t0 = time.time()
    print(f"GSE7390 (scikit-survival load_breast_cancer): 5-fold CV stratified by event, seeds {args.seeds}")
    res = run(tuple(args.seeds), n_inner=args.inner)
    for s in res["per_seed"]:
        print(f"seed {s['seed']}: mean c-index ours {s['ours']:.4f}   clinical CoxPH {s['clinical_cox']:.4f}")
    print(f"mean c-index over {len(res['ours'])} folds: ours (expression + clinical) {res['mean_ours']:.4f}   "
          f"lifelines CoxPH clinical-only {res['mean_clinical_cox']:.4f}   "
          f"difference {res['mean_ours'] - res['mean_clinical_cox']:+.4f}")
    print(f"seeds where ours >= reference: {sum(s['ours'] >= s['clinical_cox'] for s in res['per_seed'])}"
          f"/{len(res['per_seed'])}   ({time.time() - t0:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
