"""Evaluation layer: the survival and classification metrics a reviewer expects.

Everything here is numpy in, JSON-serialisable ``dict`` out (Python floats and
ints, ``None`` where a metric cannot be computed, never NaN), built on
scikit-survival and scikit-learn rather than re-implementing them.

Conventions
-----------
* ``risk`` is a log relative hazard (the model's ``risk`` output): **higher
  risk = worse outcome (earlier event)**.  This is scikit-survival's
  convention for ``concordance_index_censored``, ``concordance_index_ipcw`` and
  ``cumulative_dynamic_auc``, so risks are passed to them unchanged.
* ``time`` is a non-negative float array, ``event`` a bool/0-1 array
  (``True`` = event observed, ``False`` = right-censored).
* A metric that cannot be computed is ``None`` and the reason is appended to
  the result's ``notes`` list; bad *input* (mismatched lengths, NaN, negative
  times) raises a ``ValueError`` that names the argument.

Survival metrics
----------------
* Harrell's C (Harrell et al. 1996), ``sksurv.metrics.concordance_index_censored``.
* Uno's C (Uno et al. 2011), ``sksurv.metrics.concordance_index_ipcw`` with the
  training data as the censoring distribution and ``tau`` = the largest
  evaluation time.
* Cumulative/dynamic time-dependent AUC (Uno et al. 2007; Hung & Chiang 2010),
  ``sksurv.metrics.cumulative_dynamic_auc``.
* Brier score / integrated Brier score (Graf et al. 1999),
  ``sksurv.metrics.brier_score`` / ``integrated_brier_score``, on survival
  probabilities from the Breslow estimator (:func:`breslow_survival`).
* Calibration at a horizon: groups of predicted event probability against the
  Kaplan-Meier observed event probability in each group, the grouped
  integrated calibration index (Austin, Harrell & van Klaveren 2020), the
  observed/expected ratio and the Cox calibration slope (van Houwelingen 2000).

Classification metrics
----------------------
ROC AUC, Brier score, log loss, accuracy (scikit-learn), reliability curves
(``sklearn.calibration.calibration_curve``), expected calibration error
(Naeini et al. 2015; Guo et al. 2017) and, for binary tasks, decision curves
(Vickers & Elkin 2006).
"""
from __future__ import annotations

import math
import warnings
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

__all__ = [
    "BootstrapCI",
    "breslow_survival",
    "evaluation_times",
    "survival_metrics",
    "bootstrap_ci",
    "per_group_table",
    "classification_metrics",
    "decision_curve",
    "plot_calibration",
    "plot_td_auc",
    "plot_decision_curve",
]

# Calibration groups hold at least this many test patients (fewer groups when few patients).
MIN_CALIBRATION_GROUP_SIZE = 10
# Default evaluation times: these quantiles of the test event times.
DEFAULT_TIME_QUANTILES = (0.1, 0.8)


# --------------------------------------------------------------------- checks
def _as_1d(name: str, x, *, kind: str = "float") -> np.ndarray:
    """Validate and convert one 1-D input; ``kind`` is ``float``, ``time`` or ``event``."""
    arr = np.asarray(x)
    if arr.ndim == 0:
        arr = arr.reshape(1)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be a 1-D array, got shape {arr.shape}")
    if kind == "event":
        if arr.dtype == bool:
            return arr
        try:
            num = arr.astype(float)
        except (TypeError, ValueError):
            raise ValueError(f"{name} must be boolean or 0/1, got dtype {arr.dtype}") from None
        bad = ~np.isin(num, (0.0, 1.0))
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            raise ValueError(f"{name} must be boolean or 0/1; index {i} holds {arr[i]!r}")
        return num.astype(bool)
    try:
        num = arr.astype(float)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be numeric, got dtype {arr.dtype}") from None
    bad = ~np.isfinite(num)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise ValueError(f"{name} must be finite; index {i} holds {num[i]}")
    if kind == "time" and (num < 0).any():
        i = int(np.flatnonzero(num < 0)[0])
        raise ValueError(f"{name} must be >= 0; index {i} holds {num[i]}")
    return num


def _same_length(ref: str, n: int, **arrays: np.ndarray) -> None:
    for name, arr in arrays.items():
        if len(arr) != n:
            raise ValueError(f"{name} has length {len(arr)} but {ref} has length {n}; they must match")


def _finite_or_none(x) -> float | None:
    if x is None:
        return None
    x = float(x)
    return x if math.isfinite(x) else None


def _jsonable(obj: Any) -> Any:
    """Recursively turn numpy scalars/arrays into Python types and NaN/inf into ``None``."""
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return [_jsonable(v) for v in obj.tolist()]
    if isinstance(obj, (bool, np.bool_)):
        return bool(obj)
    if isinstance(obj, (int, np.integer)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        return _finite_or_none(obj)
    if isinstance(obj, np.generic):
        return obj.item()
    return obj


def _surv(event: np.ndarray, time: np.ndarray):
    from sksurv.util import Surv

    return Surv.from_arrays(event=np.asarray(event, dtype=bool), time=np.asarray(time, dtype=float))


# ------------------------------------------------------------------- Breslow
def breslow_survival(train_risk, train_time, train_event, risk, times) -> np.ndarray:
    r"""Survival probabilities from a Cox model's risks via the Breslow estimator.

    The cumulative baseline hazard is Breslow's (1972) estimator on the
    training patients (``d_k`` events at the distinct time ``t_k``),

    .. math:: \hat H_0(t) = \sum_{t_k \le t} \frac{d_k}{\sum_{j: t_j \ge t_k} e^{r_j}},

    and

    .. math:: \hat S(t \mid x) = \exp\{-\hat H_0(t)\, e^{r(x)}\}.

    ``H0`` is a right-continuous step function: 0 before the first event,
    constant after the last one.  Without any training event ``H0 = 0`` and
    every ``S`` is 1.

    The estimator is the one of ``sksurv.linear_model.coxph.BreslowEstimator``
    and lifelines' ``CoxPHFitter`` (the tests check agreement to 1e-6), but is
    evaluated in log space: the risk-set sums are reverse log-sum-exp
    accumulations (``numpy.logaddexp.accumulate``).  scikit-survival forms them
    by subtracting from the total, which cancels catastrophically (a zero
    divisor, infinite hazard) once the training risks span more than about 35
    log units; here any finite risks give finite, NaN-free probabilities.

    Parameters
    ----------
    train_risk, train_time, train_event : array, shape (N_train,)
        Training patients' log relative hazards, follow-up times and event
        indicators.
    risk : array, shape (N,)
        Log relative hazards of the patients to predict.
    times : array, shape (T,)
        Times at which to evaluate the survival function.

    Returns
    -------
    ndarray, shape (N, T)
        :math:`\hat S(t_k \mid x_i)`.

    References
    ----------
    Breslow NE. Discussion of "Regression models and life-tables" by D.R. Cox.
    J R Stat Soc B 1972;34:216-7.
    """
    train_time = _as_1d("train_time", train_time, kind="time")
    n = len(train_time)
    if n == 0:
        raise ValueError("train_time is empty: the Breslow baseline hazard needs training patients")
    train_event = _as_1d("train_event", train_event, kind="event")
    train_risk = _as_1d("train_risk", train_risk)
    _same_length("train_time", n, train_event=train_event, train_risk=train_risk)
    risk = _as_1d("risk", risk)
    times = _as_1d("times", times)

    order = np.argsort(train_time, kind="mergesort")
    t_sorted, r_sorted = train_time[order], train_risk[order]
    uniq, first = np.unique(t_sorted, return_index=True)
    # log of the risk-set sum at each distinct time: log sum_{j: t_j >= t_k} exp(r_j)
    log_at_risk = np.logaddexp.accumulate(r_sorted[::-1])[::-1][first]
    d = np.add.reduceat(train_event[order].astype(float), first)
    has_event = d > 0
    log_h0 = np.logaddexp.accumulate(np.log(d[has_event]) - log_at_risk[has_event])  # log H0 at event times
    idx = np.searchsorted(uniq[has_event], times, side="right") - 1
    log_h0_t = np.where(idx >= 0, log_h0[np.clip(idx, 0, None)] if len(log_h0) else -np.inf, -np.inf)
    with np.errstate(over="ignore", under="ignore"):
        return np.exp(-np.exp(log_h0_t[None, :] + risk[:, None]))


# --------------------------------------------------------- evaluation times
def evaluation_times(train_time, test_time, test_event, *, times=None,
                     n_times: int = 10) -> tuple[np.ndarray, list[str]]:
    """Evaluation times at which sksurv's IPCW metrics are valid.

    Rule: a time ``t`` is valid when ``min(test_time) <= t < min(max(train_time),
    max(test_time))``: strictly inside the training follow-up (so the
    Kaplan-Meier censoring survival ``G`` estimated on the training patients
    is positive at ``t``) and below the largest test time (so at least one test
    patient is still event-free after ``t``, as ``cumulative_dynamic_auc`` and
    ``brier_score`` require).  Default candidates are ``n_times`` evenly spaced
    quantiles, from the 10th to the 80th percentile, of the test **event**
    times (so every time has at least one case).  Invalid candidates, default
    or given, are dropped with a note.

    Returns
    -------
    times : ndarray, shape (T,)
        Sorted unique valid times (possibly empty).
    notes : list of str
        Why candidates were dropped, or why no time is available.
    """
    train_time = _as_1d("train_time", train_time, kind="time")
    test_time = _as_1d("test_time", test_time, kind="time")
    test_event = _as_1d("test_event", test_event, kind="event")
    _same_length("test_time", len(test_time), test_event=test_event)
    notes: list[str] = []
    if len(train_time) == 0 or len(test_time) < 2:
        notes.append(f"no evaluation times: need training patients and at least 2 test patients "
                     f"(got {len(train_time)} and {len(test_time)})")
        return np.empty(0), notes
    if times is None:
        if n_times < 1:
            raise ValueError(f"n_times must be >= 1, got {n_times}")
        ev = test_time[test_event]
        if len(ev) == 0:
            notes.append("no evaluation times: the test set has no events (all censored)")
            return np.empty(0), notes
        cand = np.unique(np.quantile(ev, np.linspace(*DEFAULT_TIME_QUANTILES, n_times)))
    else:
        cand = np.unique(_as_1d("times", times))
    lo = float(test_time.min())
    hi = float(min(train_time.max(), test_time.max()))
    ok = (cand >= lo) & (cand < hi)
    if (~ok).any():
        dropped = ", ".join(f"{t:g}" for t in cand[~ok])
        notes.append(f"evaluation times dropped outside the valid range [{lo:g}, {hi:g}) "
                     f"(min test time; min(max training time, max test time)): {dropped}")
    out = cand[ok]
    if len(out) == 0:
        notes.append("no valid evaluation time: time-dependent AUC, Brier score, IBS, Uno's C and "
                     "calibration are not computed")
    return out, notes


# ------------------------------------------------------------ concordance
def _harrell(time: np.ndarray, event: np.ndarray, risk: np.ndarray,
             min_pairs: int = 1) -> tuple[float | None, int, str | None]:
    """Harrell's C through sksurv: (value or None, comparable pairs, reason if None)."""
    from sksurv.metrics import concordance_index_censored

    if len(time) < 2:
        return None, 0, f"Harrell's C needs at least 2 patients, got {len(time)}"
    if not event.any():
        return None, 0, "Harrell's C needs at least one event; all patients are censored"
    try:
        c, conc, disc, tied_risk, _ = concordance_index_censored(event, time, risk)
    except ValueError as err:  # NoComparablePairException is a ValueError
        return None, 0, f"Harrell's C not computable: {err}"
    pairs = int(conc + disc + tied_risk)
    if pairs < min_pairs:
        return None, pairs, f"Harrell's C needs at least {min_pairs} comparable pairs, got {pairs}"
    return _finite_or_none(c), pairs, None


# -------------------------------------------------------- survival metrics
def survival_metrics(train_time, train_event, train_risk, test_time, test_event, test_risk, *,
                     times=None, n_times: int = 10, horizon: float | None = None,
                     n_groups: int = 10) -> dict:
    r"""Discrimination, accuracy and calibration of survival risks on a test set.

    Parameters
    ----------
    train_time, train_event, train_risk : array, shape (N_train,)
        Training patients: they define the censoring distribution for the IPCW
        estimators and the Breslow baseline hazard.
    test_time, test_event, test_risk : array, shape (N_test,)
        Test patients; ``risk`` is a log relative hazard, higher = worse.
    times : array, optional
        Evaluation times; default and validity rule in :func:`evaluation_times`.
    n_times : int
        Number of default evaluation times.
    horizon : float, optional
        Calibration horizon; default the median of the evaluation times.
    n_groups : int
        Maximum number of calibration groups (deciles); fewer when there are
        fewer than ``10 * n_groups`` test patients (at least 10 per group).

    Returns
    -------
    dict
        ``harrell_c``; ``uno_c`` and ``uno_tau``; ``times``; ``td_auc``
        ``{"times", "auc", "mean_auc"}``; ``brier`` ``{"times", "scores"}``;
        ``ibs``; ``calibration`` (see below); counts ``n_train``,
        ``n_train_events``, ``n_test``, ``n_test_events``; and ``notes``
        explaining every ``None``.

    Notes
    -----
    For the IPCW estimators the test patients are administratively censored at
    a time ``c`` between the largest evaluation time and the validity bound of
    :func:`evaluation_times`.  Uno's C with ``tau < c``, the
    cumulative/dynamic AUC, the Brier score and the IBS at times ``< c`` only
    use events and risk sets before ``c`` and are therefore unchanged; this
    merely stops sksurv from asking for censoring weights beyond the training
    follow-up.

    Calibration at horizon ``h``: patients are split into equal-size groups of
    predicted event probability :math:`1 - \hat S(h \mid x)`; in each group
    the observed event probability is :math:`1 - \mathrm{KM}(h)`
    (``sksurv.nonparametric.kaplan_meier_estimator``; ``None`` when nobody in
    the group is followed up to ``h``).  Summaries: ``ici`` = size-weighted
    mean ``|predicted - observed|`` over groups (a grouped integrated
    calibration index, Austin et al. 2020), ``e_max`` = the largest
    difference, ``oe_ratio`` = observed (KM of all test patients) / mean
    predicted event probability, and ``slope`` = the coefficient of a Cox
    model of the test outcome on ``test_risk`` (calibration slope, 1 = ideal,
    < 1 = risks too extreme; van Houwelingen 2000).

    References
    ----------
    Harrell FE et al. Stat Med 1996;15:361-87.  Uno H et al. Stat Med
    2011;30:1105-17.  Uno H et al. JASA 2007;102:527-37.  Graf E et al. Stat
    Med 1999;18:2529-45.  Austin PC, Harrell FE, van Klaveren D. Stat Med
    2020;39:2714-42.  van Houwelingen HC. Stat Med 2000;19:3401-15.
    """
    from sksurv.metrics import (brier_score, concordance_index_ipcw, cumulative_dynamic_auc,
                                integrated_brier_score)

    train_time = _as_1d("train_time", train_time, kind="time")
    n_tr = len(train_time)
    if n_tr == 0:
        raise ValueError("train_time is empty: the IPCW estimators and the Breslow baseline need training patients")
    train_event = _as_1d("train_event", train_event, kind="event")
    train_risk = _as_1d("train_risk", train_risk)
    _same_length("train_time", n_tr, train_event=train_event, train_risk=train_risk)
    test_time = _as_1d("test_time", test_time, kind="time")
    n_te = len(test_time)
    test_event = _as_1d("test_event", test_event, kind="event")
    test_risk = _as_1d("test_risk", test_risk)
    _same_length("test_time", n_te, test_event=test_event, test_risk=test_risk)
    if n_groups < 1:
        raise ValueError(f"n_groups must be >= 1, got {n_groups}")

    notes: list[str] = []
    out: dict[str, Any] = {
        "n_train": n_tr, "n_train_events": int(train_event.sum()),
        "n_test": n_te, "n_test_events": int(test_event.sum()),
        "harrell_c": None, "uno_c": None, "uno_tau": None, "times": [],
        "td_auc": None, "brier": None, "ibs": None, "calibration": None, "notes": notes,
    }

    c, _, why = _harrell(test_time, test_event, test_risk)
    out["harrell_c"] = c
    if why:
        notes.append(why)

    ev_times, time_notes = evaluation_times(train_time, test_time, test_event, times=times, n_times=n_times)
    notes.extend(time_notes)
    out["times"] = ev_times.tolist()
    if len(ev_times) == 0:
        return _jsonable(out)

    # administrative censoring of the test set beyond the evaluation window (see Notes)
    upper = min(train_time.max(), test_time.max())
    cut = 0.5 * (ev_times[-1] + upper)
    y_train = _surv(train_event, train_time)
    y_test = _surv(test_event & (test_time <= cut), np.minimum(test_time, cut))

    # Uno's C, truncated at tau = the largest evaluation time
    tau = float(ev_times[-1])
    out["uno_tau"] = tau
    if not test_event[test_time < tau].any():
        notes.append(f"Uno's C not computable: no test event before tau = {tau:g}")
    else:
        try:
            with np.errstate(invalid="ignore", divide="ignore"):
                uno = concordance_index_ipcw(y_train, y_test, test_risk, tau=tau)[0]
            out["uno_c"] = _finite_or_none(uno)
            if out["uno_c"] is None:
                notes.append("Uno's C not computable: all comparable pairs have zero weight")
        except ValueError as err:
            notes.append(f"Uno's C not computable: {err}")

    # cumulative/dynamic time-dependent AUC
    try:
        with np.errstate(invalid="ignore", divide="ignore"):
            auc, mean_auc = cumulative_dynamic_auc(y_train, y_test, test_risk, ev_times)
        auc_list = [_finite_or_none(a) for a in auc]
        missing = [f"{t:g}" for t, a in zip(ev_times, auc_list) if a is None]
        if missing:
            notes.append("td-AUC undefined (no case or no control) at times: " + ", ".join(missing))
        out["td_auc"] = {"times": ev_times.tolist(), "auc": auc_list, "mean_auc": _finite_or_none(mean_auc)}
        if out["td_auc"]["mean_auc"] is None:
            notes.append("mean td-AUC undefined")
    except ValueError as err:
        notes.append(f"td-AUC not computable: {err}")

    # Brier score and IBS on Breslow survival probabilities
    if not train_event.any():
        notes.append("training set has no events: the Breslow baseline hazard is zero, so Brier score, "
                     "IBS and calibration are not computed")
        return _jsonable(out)
    surv = breslow_survival(train_risk, train_time, train_event, test_risk, ev_times)
    try:
        _, scores = brier_score(y_train, y_test, surv, ev_times)
        out["brier"] = {"times": ev_times.tolist(), "scores": [_finite_or_none(s) for s in scores]}
        if len(ev_times) >= 2:
            out["ibs"] = _finite_or_none(integrated_brier_score(y_train, y_test, surv, ev_times))
        else:
            notes.append("IBS needs at least 2 evaluation times, got 1")
    except ValueError as err:
        notes.append(f"Brier score not computable: {err}")

    # calibration at the horizon
    if horizon is None:
        h = float(np.median(ev_times))
    else:
        h = float(horizon)
        lo = float(test_time.min())
        if not (lo <= h < upper):
            notes.append(f"calibration not computed: horizon {h:g} outside the valid range [{lo:g}, {upper:g})")
            return _jsonable(out)
    out["calibration"] = _survival_calibration(train_time, train_event, train_risk, test_time, test_event,
                                               test_risk, h, n_groups, notes)
    return _jsonable(out)


def _km_event_prob(time: np.ndarray, event: np.ndarray, h: float) -> float | None:
    """Observed event probability ``1 - KM(h)``; ``None`` when KM is undefined at ``h``."""
    from sksurv.nonparametric import kaplan_meier_estimator

    if len(time) == 0:
        return None
    x, s = kaplan_meier_estimator(event, time)
    if h < x[0]:
        return 0.0
    if h > x[-1] and s[-1] > 0:
        return None  # nobody followed up to h
    return float(1.0 - s[np.searchsorted(x, h, side="right") - 1])


def _survival_calibration(train_time, train_event, train_risk, test_time, test_event, test_risk,
                          h: float, n_groups: int, notes: list[str]) -> dict:
    pred = 1.0 - breslow_survival(train_risk, train_time, train_event, test_risk, [h])[:, 0]
    n = len(pred)
    k = max(1, min(n_groups, n // MIN_CALIBRATION_GROUP_SIZE))
    order = np.argsort(pred, kind="mergesort")
    groups = []
    for idx in np.array_split(order, k):
        obs = _km_event_prob(test_time[idx], test_event[idx], h)
        groups.append({"n": int(len(idx)), "n_events": int(test_event[idx].sum()),
                       "predicted": float(pred[idx].mean()), "observed": obs})
    defined = [g for g in groups if g["observed"] is not None]
    if len(defined) < len(groups):
        notes.append(f"calibration: {len(groups) - len(defined)} group(s) have no follow-up to the horizon "
                     f"{h:g}; their observed probability is None")
    ici = e_max = None
    if defined:
        w = np.array([g["n"] for g in defined], dtype=float)
        d = np.abs([g["predicted"] - g["observed"] for g in defined])
        ici, e_max = float((w * d).sum() / w.sum()), float(d.max())
    obs_all = _km_event_prob(test_time, test_event, h)
    mean_pred = float(pred.mean())
    oe = obs_all / mean_pred if (obs_all is not None and mean_pred > 0) else None
    if oe is None:
        notes.append("calibration: observed/expected ratio undefined")
    return {"horizon": h, "n_groups": k, "groups": groups, "ici": ici, "e_max": e_max,
            "observed": obs_all, "expected": mean_pred, "oe_ratio": _finite_or_none(oe),
            "slope": _calibration_slope(test_time, test_event, test_risk, notes)}


def _calibration_slope(time, event, risk, notes: list[str]) -> float | None:
    """Coefficient of a one-covariate Cox model of the outcome on ``risk`` (sksurv)."""
    from sksurv.linear_model import CoxPHSurvivalAnalysis

    if len(time) < 2 or not event.any() or np.ptp(risk) == 0:
        notes.append("calibration slope needs >= 2 patients, >= 1 event and non-constant risks")
        return None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            coef = float(CoxPHSurvivalAnalysis().fit(risk[:, None], _surv(event, time)).coef_[0])
        except (ValueError, ArithmeticError, np.linalg.LinAlgError) as err:
            notes.append(f"calibration slope: Cox fit failed ({err})")
            return None
    if caught or not math.isfinite(coef):
        msg = "; ".join(str(w.message) for w in caught)[:200] or "non-finite coefficient"
        notes.append(f"calibration slope: Cox fit did not converge ({msg})")
        return None
    return coef


# --------------------------------------------------------------- bootstrap
class BootstrapCI(tuple):
    """``(estimate, lo, hi)`` that also carries ``n_used`` and ``n_boot``.

    Unpacks as a 3-tuple; ``n_used`` is how many resamples gave a finite value.
    """

    def __new__(cls, estimate, lo, hi, *, n_used: int, n_boot: int):
        self = super().__new__(cls, (estimate, lo, hi))
        self.n_used = int(n_used)
        self.n_boot = int(n_boot)
        return self

    @property
    def estimate(self) -> float | None:
        return self[0]

    @property
    def lo(self) -> float | None:
        return self[1]

    @property
    def hi(self) -> float | None:
        return self[2]

    def as_dict(self) -> dict:
        return {"estimate": self[0], "lo": self[1], "hi": self[2], "n_used": self.n_used, "n_boot": self.n_boot}

    def __repr__(self) -> str:
        return f"BootstrapCI(estimate={self[0]}, lo={self[1]}, hi={self[2]}, n_used={self.n_used}/{self.n_boot})"


def _metric_value(v) -> float | None:
    if v is None:
        return None
    try:
        v = float(v)
    except (TypeError, ValueError):
        raise TypeError(f"metric_fn must return a number or None, got {type(v).__name__}") from None
    return v if math.isfinite(v) else None


def bootstrap_ci(metric_fn: Callable[..., float | None], *arrays, n_boot: int = 200, seed: int = 0,
                 alpha: float = 0.05) -> BootstrapCI:
    """Percentile bootstrap confidence interval over patients (Efron & Tibshirani 1993).

    Each resample draws ``N`` row indices with replacement and applies them
    jointly to every array (axis 0); ``metric_fn(*resampled_arrays)`` is
    evaluated on each.  Resamples where it returns ``None`` or NaN (e.g. no
    comparable pair) are skipped; ``n_used`` on the result says how many were
    kept.  The interval is the ``alpha/2`` and ``1 - alpha/2`` quantiles of the
    kept values (``None`` when fewer than 2 were kept).  Deterministic for a
    given ``seed`` (``numpy.random.default_rng``).

    Returns
    -------
    BootstrapCI
        ``(estimate, lo, hi)``, where ``estimate = metric_fn(*arrays)`` on all
        patients, with attributes ``n_used`` and ``n_boot``.
    """
    if not arrays:
        raise ValueError("arrays: give at least one array to resample")
    if int(n_boot) < 1:
        raise ValueError(f"n_boot must be >= 1, got {n_boot}")
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    arrs = [np.asarray(a) for a in arrays]
    for i, a in enumerate(arrs):
        if a.ndim == 0:
            raise ValueError(f"arrays[{i}] must have at least one dimension (one row per patient)")
    n = len(arrs[0])
    for i, a in enumerate(arrs[1:], start=1):
        if len(a) != n:
            raise ValueError(f"arrays[{i}] has {len(a)} rows but arrays[0] has {n}; they must match")
    estimate = _metric_value(metric_fn(*arrs))
    if n == 0:
        return BootstrapCI(estimate, None, None, n_used=0, n_boot=n_boot)
    rng = np.random.default_rng(seed)
    vals = []
    for _ in range(int(n_boot)):
        idx = rng.integers(0, n, size=n)
        v = _metric_value(metric_fn(*(a[idx] for a in arrs)))
        if v is not None:
            vals.append(v)
    if len(vals) < 2:
        return BootstrapCI(estimate, None, None, n_used=len(vals), n_boot=n_boot)
    lo, hi = np.quantile(vals, [alpha / 2, 1 - alpha / 2])
    return BootstrapCI(estimate, float(lo), float(hi), n_used=len(vals), n_boot=n_boot)


def per_group_table(group, time, event, risk, *, n_boot: int = 200, seed: int = 0,
                    alpha: float = 0.05) -> list[dict]:
    """Harrell's C with a bootstrap CI per group (e.g. site), plus an ``"all"`` row.

    Rows (sorted by group name, ``"all"`` last) hold ``group``, ``n``,
    ``n_events``, ``harrell_c``, ``ci_low``, ``ci_high`` (percentile bootstrap,
    :func:`bootstrap_ci`), ``n_boot_used`` and ``n_pairs`` (comparable pairs).
    A group with fewer than 2 comparable pairs gets ``None`` for the C-index
    and its interval; bootstrap resamples with fewer than 2 pairs are skipped.
    """
    group = np.asarray(group)
    if group.ndim != 1:
        raise ValueError(f"group must be a 1-D array, got shape {group.shape}")
    time = _as_1d("time", time, kind="time")
    event = _as_1d("event", event, kind="event")
    risk = _as_1d("risk", risk)
    _same_length("group", len(group), time=time, event=event, risk=risk)

    def c_fn(t, e, r):
        return _harrell(t, e, r, min_pairs=2)[0]

    def row(name: str, sel: np.ndarray) -> dict:
        t, e, r = time[sel], event[sel], risk[sel]
        c, pairs, _ = _harrell(t, e, r, min_pairs=2)
        lo = hi = None
        used = 0
        if c is not None:
            ci = bootstrap_ci(c_fn, t, e, r, n_boot=n_boot, seed=seed, alpha=alpha)
            lo, hi, used = ci.lo, ci.hi, ci.n_used
        return {"group": name, "n": int(sel.sum()), "n_events": int(e.sum()), "harrell_c": c,
                "ci_low": lo, "ci_high": hi, "n_boot_used": used, "n_pairs": pairs}

    names = sorted({str(g) for g in group.tolist()})
    as_str = np.array([str(g) for g in group.tolist()], dtype=object)
    rows = [row(g, as_str == g) for g in names]
    rows.append(row("all", np.ones(len(group), dtype=bool)))
    return _jsonable(rows)


# ------------------------------------------------------------ classification
def _ece(y: np.ndarray, p: np.ndarray, n_bins: int) -> tuple[float, list[int], np.ndarray, np.ndarray]:
    """Expected calibration error with ``calibration_curve``'s uniform bins.

    ``ECE = sum_b (n_b / N) |mean(y in b) - mean(p in b)|`` (Naeini et al.
    2015), over non-empty bins ``[0, 1/B], (1/B, 2/B], ...`` -- the same
    binning (``searchsorted`` on the inner edges) as
    ``sklearn.calibration.calibration_curve(strategy="uniform")``.
    """
    from sklearn.calibration import calibration_curve

    prob_true, prob_pred = calibration_curve(y.astype(int), p, n_bins=n_bins, strategy="uniform", pos_label=1)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    counts = np.bincount(np.searchsorted(edges[1:-1], p), minlength=n_bins)
    counts = counts[counts > 0]
    ece = float(np.sum(counts / len(p) * np.abs(prob_true - prob_pred)))
    return ece, counts.tolist(), prob_true, prob_pred


def decision_curve(y_true, proba, *, thresholds=None) -> dict:
    r"""Net benefit of treating patients with predicted risk ``>= pt`` (Vickers & Elkin 2006).

    .. math:: \mathrm{NB}(p_t) = \frac{TP}{N} - \frac{FP}{N} \frac{p_t}{1 - p_t}

    with the references "treat all" (``prevalence - (1 - prevalence) pt/(1-pt)``)
    and "treat none" (0).  Default thresholds 0.01, 0.02, ..., 0.99.

    Parameters
    ----------
    y_true : array, shape (N,)
        0/1 or bool outcome.
    proba : array, shape (N,)
        Predicted probability of the positive class.
    """
    y = _as_1d("y_true", y_true, kind="event")
    p = _as_1d("proba", proba)
    _same_length("y_true", len(y), proba=p)
    if len(y) == 0:
        raise ValueError("y_true is empty")
    pt = np.round(np.arange(1, 100) / 100.0, 2) if thresholds is None else _as_1d("thresholds", thresholds)
    if ((pt <= 0) | (pt >= 1)).any():
        raise ValueError("thresholds must lie strictly between 0 and 1")
    n = len(y)
    treat = p[:, None] >= pt[None, :]
    tp = (treat & y[:, None]).sum(axis=0)
    fp = (treat & ~y[:, None]).sum(axis=0)
    odds = pt / (1 - pt)
    prev = y.mean()
    return _jsonable({"thresholds": pt, "net_benefit": tp / n - fp / n * odds,
                      "treat_all": prev - (1 - prev) * odds, "treat_none": np.zeros(len(pt))})


def classification_metrics(y_true, proba, *, classes=None, n_bins: int = 10) -> dict:
    """Discrimination, accuracy and calibration of predicted class probabilities.

    Parameters
    ----------
    y_true : array, shape (N,)
        True labels, each one of ``classes``.
    proba : array, shape (N,), (N, 1), (N, 2) or (N, K)
        Binary: probability of the positive class ``classes[1]`` (or both
        columns).  Multiclass: one column per class, rows summing to 1.
    classes : sequence, optional
        Labels in column order; default ``[0, 1]`` for binary and
        ``range(K)`` for ``K`` columns.
    n_bins : int
        Uniform bins of the reliability curve and ECE.

    Returns
    -------
    dict
        ``task`` (``"binary"``/``"multiclass"``), ``n``, ``classes``,
        ``class_counts``, ``auc``, ``brier``, ``log_loss``, ``accuracy``,
        ``calibration``, ``decision_curve`` (binary; :func:`decision_curve`)
        and ``notes``.

    Notes
    -----
    * AUC: ``roc_auc_score``; multiclass one-vs-rest, macro average
      (Hand & Till's pairwise variant is not used).  ``None`` when a class is
      absent from ``y_true``.
    * Brier: ``brier_score_loss``.  Binary: mean ``(y - p)^2`` (range [0, 1]).
      Multiclass: the original Brier (1950) score ``mean_i sum_k (y_ik -
      p_ik)^2`` of the one-hot outcome (range [0, 2]; divide by K for the
      per-entry mean squared error).
    * Accuracy: predicted class = argmax (binary: positive when ``p > 0.5``).
    * Calibration, binary: ``calibration_curve`` of ``P(y = classes[1])``
      with ``ece`` (Naeini et al. 2015).  Multiclass: a curve and ECE per
      class (one-vs-rest), ``classwise_ece`` = their mean (Kull et al. 2019)
      and ``ece`` = top-label ECE of the argmax confidence (Guo et al. 2017).

    References
    ----------
    Brier GW. Mon Weather Rev 1950;78:1-3.  Naeini MP, Cooper G, Hauskrecht M.
    AAAI 2015.  Guo C et al. ICML 2017.  Kull M et al. NeurIPS 2019.  Vickers
    AJ, Elkin EB. Med Decis Making 2006;26:565-74.
    """
    from sklearn.metrics import accuracy_score, brier_score_loss, log_loss, roc_auc_score

    y_raw = np.asarray(y_true)
    if y_raw.ndim != 1:
        raise ValueError(f"y_true must be a 1-D array, got shape {y_raw.shape}")
    n = len(y_raw)
    if n == 0:
        raise ValueError("y_true is empty")
    P = np.asarray(proba, dtype=float)
    if P.ndim == 2 and P.shape[1] == 1:
        P = P[:, 0]
    if P.ndim not in (1, 2):
        raise ValueError(f"proba must have shape (N,) or (N, K), got {P.shape}")
    if len(P) != n:
        raise ValueError(f"proba has {len(P)} rows but y_true has length {n}; they must match")
    if not np.isfinite(P).all() or (P < 0).any() or (P > 1).any():
        raise ValueError("proba must hold finite probabilities in [0, 1]")
    if P.ndim == 2 and not np.allclose(P.sum(axis=1), 1.0, atol=1e-6):
        i = int(np.flatnonzero(~np.isclose(P.sum(axis=1), 1.0, atol=1e-6))[0])
        raise ValueError(f"proba rows must sum to 1; row {i} sums to {P[i].sum():.6g}")
    k = 2 if P.ndim == 1 else P.shape[1]
    if k < 2:
        raise ValueError("proba needs at least 2 classes")
    classes = list(range(k)) if classes is None else list(classes)
    if len(classes) != k:
        raise ValueError(f"classes has {len(classes)} labels but proba describes {k} classes")
    if len(set(classes)) != k:
        raise ValueError(f"classes must be unique, got {classes}")
    lookup = {c: i for i, c in enumerate(classes)}
    try:
        y = np.array([lookup[v] for v in y_raw.tolist()], dtype=int)
    except KeyError as err:
        raise ValueError(f"y_true holds label {err.args[0]!r} that is not in classes {classes}") from None
    if k == 2 and P.ndim == 2:
        P = P[:, 1]
    notes: list[str] = []
    counts = np.bincount(y, minlength=k)
    out: dict[str, Any] = {"task": "binary" if k == 2 else "multiclass", "n": n, "classes": classes,
                           "class_counts": counts.tolist(), "auc": None, "notes": notes}
    absent = [classes[i] for i in range(k) if counts[i] == 0]
    if absent:
        notes.append(f"AUC not computable: class(es) {absent} absent from y_true")

    if k == 2:
        yb = y == 1
        if not absent:
            out["auc"] = _finite_or_none(roc_auc_score(yb, P))
        out["brier"] = _finite_or_none(brier_score_loss(yb, P, pos_label=True))
        out["log_loss"] = _finite_or_none(log_loss(yb, P, labels=[False, True]))
        out["accuracy"] = _finite_or_none(accuracy_score(yb, P > 0.5))
        ece, cnt, pt, pp = _ece(yb, P, n_bins)
        out["calibration"] = {"n_bins": n_bins, "strategy": "uniform", "prob_true": pt, "prob_pred": pp,
                              "counts": cnt, "ece": ece}
        out["decision_curve"] = decision_curve(yb, P)
        return _jsonable(out)

    labels = list(range(k))
    if not absent:
        out["auc"] = _finite_or_none(roc_auc_score(y, P, multi_class="ovr", average="macro", labels=labels))
    out["brier"] = _finite_or_none(brier_score_loss(y, P, labels=labels))
    out["log_loss"] = _finite_or_none(log_loss(y, P, labels=labels))
    pred = P.argmax(axis=1)
    out["accuracy"] = _finite_or_none(accuracy_score(y, pred))
    per_class = {}
    for i, c in enumerate(classes):
        ece, cnt, pt, pp = _ece(y == i, P[:, i], n_bins)
        per_class[str(c)] = {"prob_true": pt, "prob_pred": pp, "counts": cnt, "ece": ece}
    top_ece, _, _, _ = _ece(pred == y, P.max(axis=1), n_bins)
    out["calibration"] = {"n_bins": n_bins, "strategy": "uniform", "per_class": per_class, "ece": top_ece,
                          "classwise_ece": float(np.mean([v["ece"] for v in per_class.values()]))}
    out["decision_curve"] = None
    notes.append("decision curve is defined for binary tasks only")
    return _jsonable(out)


# ------------------------------------------------------------------- plots
def _new_figure(figsize=(5.0, 4.2)):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize, dpi=100)
    FigureCanvasAgg(fig)
    return fig, fig.add_subplot(1, 1, 1)


def _save(fig, path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, format="png")
    return path


def _xy(xs: Sequence, ys: Sequence) -> tuple[list[float], list[float]]:
    pairs = [(float(x), float(y)) for x, y in zip(xs, ys) if x is not None and y is not None]
    return [p[0] for p in pairs], [p[1] for p in pairs]


def plot_calibration(calib_dict: dict, path, *, title: str | None = None) -> Path:
    """Reliability diagram as a PNG; returns ``path``.

    Accepts the ``calibration`` entry of :func:`survival_metrics` (groups of
    predicted vs Kaplan-Meier observed event probability at the horizon) or of
    :func:`classification_metrics` (binary curve, or one curve per class).
    """
    if not isinstance(calib_dict, dict):
        raise ValueError("calib_dict must be a calibration dict (it is None when calibration was not computed; "
                         "see the metrics' notes)")
    fig, ax = _new_figure()
    ax.plot([0, 1], [0, 1], ls="--", color="grey", lw=1, label="ideal")
    if "groups" in calib_dict:
        g = calib_dict["groups"]
        x, y = _xy([r.get("predicted") for r in g], [r.get("observed") for r in g])
        ax.plot(x, y, "o-", label="groups")
        ax.set_xlabel(f"predicted event probability by t = {calib_dict.get('horizon', float('nan')):.3g}")
        ax.set_ylabel("observed (Kaplan-Meier) event probability")
        sub = f"ICI = {calib_dict['ici']:.3f}" if calib_dict.get("ici") is not None else ""
    elif "prob_true" in calib_dict:
        x, y = _xy(calib_dict["prob_pred"], calib_dict["prob_true"])
        ax.plot(x, y, "o-", label="model")
        ax.set_xlabel("mean predicted probability")
        ax.set_ylabel("fraction of positives")
        sub = f"ECE = {calib_dict['ece']:.3f}" if calib_dict.get("ece") is not None else ""
    elif "per_class" in calib_dict:
        for name, cc in calib_dict["per_class"].items():
            x, y = _xy(cc["prob_pred"], cc["prob_true"])
            ax.plot(x, y, "o-", label=f"class {name}")
        ax.set_xlabel("mean predicted probability")
        ax.set_ylabel("fraction of the class")
        sub = f"top-label ECE = {calib_dict['ece']:.3f}" if calib_dict.get("ece") is not None else ""
    else:
        raise ValueError("calib_dict has neither 'groups', 'prob_true' nor 'per_class'")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_title(title or ("Calibration" + (f" ({sub})" if sub else "")))
    ax.legend(loc="upper left", fontsize="small")
    return _save(fig, path)


def plot_td_auc(td_auc_dict: dict, path, *, title: str | None = None) -> Path:
    """Cumulative/dynamic AUC against time, with the mean AUC, as a PNG; returns ``path``."""
    if not isinstance(td_auc_dict, dict):
        raise ValueError("td_auc_dict must be the 'td_auc' dict (it is None when td-AUC was not computed; "
                         "see the metrics' notes)")
    fig, ax = _new_figure()
    x, y = _xy(td_auc_dict["times"], td_auc_dict["auc"])
    ax.plot(x, y, "o-", label="AUC(t)")
    mean_auc = td_auc_dict.get("mean_auc")
    if mean_auc is not None:
        ax.axhline(mean_auc, ls="--", color="C1", label=f"mean AUC = {mean_auc:.3f}")
    ax.axhline(0.5, ls=":", color="grey", lw=1)
    ax.set_ylim(0, 1)
    ax.set_xlabel("time")
    ax.set_ylabel("cumulative/dynamic AUC")
    ax.set_title(title or "Time-dependent AUC")
    ax.legend(loc="lower right", fontsize="small")
    return _save(fig, path)


def plot_decision_curve(dc_dict: dict, path, *, title: str | None = None) -> Path:
    """Net benefit of the model, treat-all and treat-none against threshold; returns ``path``."""
    if not isinstance(dc_dict, dict):
        raise ValueError("dc_dict must be the 'decision_curve' dict (None for multiclass tasks)")
    fig, ax = _new_figure()
    pt = np.asarray(dc_dict["thresholds"], dtype=float)
    nb = np.asarray(dc_dict["net_benefit"], dtype=float)
    ax.plot(pt, nb, label="model")
    ax.plot(pt, np.asarray(dc_dict["treat_all"], dtype=float), label="treat all")
    ax.plot(pt, np.asarray(dc_dict["treat_none"], dtype=float), color="k", label="treat none")
    top = float(np.nanmax(np.r_[nb, dc_dict["treat_all"], 0.0]))
    ax.set_ylim(-0.05 * max(top, 0.05) - 0.02, 1.1 * max(top, 0.05))
    ax.set_xlim(0, 1)
    ax.set_xlabel("threshold probability")
    ax.set_ylabel("net benefit")
    ax.set_title(title or "Decision curve")
    ax.legend(loc="upper right", fontsize="small")
    return _save(fig, path)
