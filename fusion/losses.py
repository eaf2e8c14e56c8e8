"""Training losses: survival (Cox, discrete-time), classification (CE, focal),
multi-task weighting, confounder correlation and soft parameter sharing.

Every loss takes torch tensors and returns a scalar tensor that stays finite
and keeps the autograd graph on degenerate batches (no events, nothing to
classify, no variance), so a training loop never has to special-case them.

Contents
--------
:func:`cox_ph_loss`
    Negative Cox partial log-likelihood (Breslow / Efron ties).
:func:`make_time_cuts`, :func:`discrete_time_nll`, :func:`discrete_time_survival`, :func:`discrete_time_risk`
    Discrete-time survival (Tutz & Schmid 2016; Gensheimer & Narasimhan 2019).
:func:`classification_loss`
    Binary / multiclass cross-entropy and focal loss (Lin et al. 2017).
:class:`UncertaintyWeighting`
    Homoscedastic-uncertainty task weighting (Kendall, Gal & Cipolla 2018).
:func:`cfnet_correlation_loss`
    CF-Net's squared-correlation adversarial loss (Zhao, Adeli & Pohl 2020).
:func:`parameter_sharing_penalty`
    Soft parameter sharing (Duong et al. 2015; Ruder 2017).
"""
from __future__ import annotations

import warnings
from typing import Sequence

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

__all__ = [
    "cox_ph_loss",
    "make_time_cuts",
    "discrete_time_nll",
    "discrete_time_survival",
    "discrete_time_risk",
    "classification_loss",
    "UncertaintyWeighting",
    "cfnet_correlation_loss",
    "parameter_sharing_penalty",
]


def _check_same_length(**tensors: torch.Tensor) -> int:
    """ValueError naming the argument whose length differs from the first one."""
    names = list(tensors)
    n = tensors[names[0]].reshape(-1).shape[0]
    for name in names[1:]:
        m = tensors[name].reshape(-1).shape[0]
        if m != n:
            raise ValueError(f"{name} must have {n} elements (one per patient, like {names[0]}), got {m}")
    return n


# --------------------------------------------------------------------------- #
# Cox proportional hazards
# --------------------------------------------------------------------------- #
def cox_ph_loss(risk: torch.Tensor, time: torch.Tensor, event: torch.Tensor, *, ties: str = "efron",
                strata: torch.Tensor | None = None) -> torch.Tensor:
    """Negative Cox partial log-likelihood, averaged over events.

    Breslow (1974)::

        L = -(1/n_ev) sum_{i: event_i} [ r_i - log sum_{k: t_k >= t_i} exp(r_k) ]

    Efron (1977), for each distinct event time t_j with d_j tied events D_j and
    risk set R_j = {k: t_k >= t_j}::

        L = -(1/n_ev) sum_j [ sum_{i in D_j} r_i
                              - sum_{l=0}^{d_j-1} log( sum_{k in R_j} e^{r_k} - (l/d_j) sum_{i in D_j} e^{r_i} ) ]

    The two agree when no event times are tied.  Higher ``risk`` means a worse
    outcome (earlier event).

    Parameters
    ----------
    risk
        ``(B,)`` log relative hazard.
    time
        ``(B,)`` follow-up time.
    event
        ``(B,)`` bool, True where the event was observed.
    ties
        ``"efron"`` (default, as lifelines and R's survival) or ``"breslow"``.
    strata
        Optional ``(B,)`` integer stratum of each row: the stratified partial
        likelihood (each stratum its own baseline hazard, risk sets within
        strata; as lifelines ``CoxPHFitter(strata=...)`` and R's
        ``strata()``): the sum of the strata's log-likelihoods, averaged over
        all events.  For multi-site cohorts whose sites differ in baseline
        hazard (case mix, standard of care), so the model gains nothing by
        recognising the site.

    Returns
    -------
    Tensor
        Scalar.  A batch without events (or an empty batch) returns
        ``0 * risk.sum()``: exactly 0, finite, with a (zero) gradient path to
        ``risk`` instead of NaN.
    """
    if ties not in ("efron", "breslow"):
        raise ValueError(f"ties must be 'efron' or 'breslow', got {ties!r}")
    _check_same_length(risk=risk, time=time, event=event)
    risk = risk.reshape(-1)
    time = time.reshape(-1).to(risk.dtype)
    event = event.reshape(-1).bool()
    if risk.numel() == 0 or not bool(event.any()):
        return risk.sum() * 0.0
    if strata is not None:
        strata = strata.reshape(-1)
        if strata.numel() != risk.numel():
            raise ValueError(f"strata has {strata.numel()} rows, risk {risk.numel()}")
        total = risk.sum() * 0.0
        for level in torch.unique(strata):
            rows = (strata == level).nonzero().reshape(-1)
            ev = event.index_select(0, rows)
            if bool(ev.any()):
                total = total + _cox_nll_sum(risk.index_select(0, rows), time.index_select(0, rows), ev, ties)
        return total / event.sum()
    return _cox_nll_sum(risk, time, event, ties) / event.sum()


def _cox_nll_sum(risk: torch.Tensor, time: torch.Tensor, event: torch.Tensor, ties: str) -> torch.Tensor:
    """Negative partial log-likelihood (summed over events) of one stratum with at least one event."""
    # Risk-set sums for every distinct event time, on a shifted scale for stability.
    shift = risk.detach().max()
    exp_r = torch.exp(risk - shift)
    t_sorted, order = torch.sort(time)
    tail = torch.flip(torch.cumsum(torch.flip(exp_r[order], [0]), 0), [0])  # sum over t_k >= t_sorted[i]
    ev_times, inv = torch.unique(time[event], sorted=True, return_inverse=True)
    first = torch.searchsorted(t_sorted.contiguous(), ev_times.contiguous(), right=False)
    risk_set = tail[first]  # (J,)
    n_j = ev_times.numel()
    d = torch.zeros(n_j, dtype=risk.dtype, device=risk.device).index_add_(0, inv, torch.ones_like(risk[event]))
    sum_r = torch.zeros(n_j, dtype=risk.dtype, device=risk.device).index_add_(0, inv, risk[event])
    if ties == "breslow":
        log_terms = d * (torch.log(risk_set) + shift)
    else:
        tie_sum = torch.zeros(n_j, dtype=risk.dtype, device=risk.device).index_add_(0, inv, exp_r[event])
        max_d = int(d.max().item())
        ell = torch.arange(max_d, dtype=risk.dtype, device=risk.device).unsqueeze(0)  # (1, L)
        valid = ell < d.unsqueeze(1)
        inner = risk_set.unsqueeze(1) - (ell / d.unsqueeze(1)) * tie_sum.unsqueeze(1)
        inner = torch.where(valid, inner, torch.ones_like(inner))
        log_terms = (torch.log(inner) * valid).sum(1) + d * shift
    return -(sum_r - log_terms).sum()


# --------------------------------------------------------------------------- #
# Discrete-time survival
# --------------------------------------------------------------------------- #
def make_time_cuts(time, event, k: int) -> np.ndarray:
    """Interval boundaries for discrete-time survival from event-time quantiles.

    Returns ``K + 1`` strictly increasing boundaries ``c_0 < c_1 < ... < c_K``:
    ``c_0 = min(0, min(time))``, ``c_j`` = the ``j/k`` quantile of the
    *event* times (``j = 1..k-1``, numpy's linear interpolation), and
    ``c_K = max(time)`` over all patients (so every training patient falls
    in an interval).  Fit it on the training fold only.

    Tied event times can make quantiles coincide; duplicates are removed with
    a warning, so fewer than ``k`` intervals may come back: size the model's
    hazard head with ``len(cuts) - 1``.

    Parameters
    ----------
    time, event
        ``(N,)`` follow-up times and event indicators (array-like or tensors).
    k
        Requested number of intervals, ``>= 1``.

    Returns
    -------
    numpy.ndarray
        ``(K + 1,)`` float64 boundaries.
    """
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise ValueError(f"k must be a positive integer, got {k!r}")
    time = np.asarray(_to_numpy(time), dtype=float).reshape(-1)
    event = np.asarray(_to_numpy(event)).reshape(-1)
    if time.size == 0:
        raise ValueError("time must not be empty")
    if event.shape != time.shape:
        raise ValueError(f"event must have {time.size} elements (like time), got {event.size}")
    if not np.isfinite(time).all():
        raise ValueError("time must be finite")
    event = event.astype(bool)
    if not event.any():
        raise ValueError("event: no event observed, cannot place cuts at event-time quantiles")
    inner = np.quantile(time[event], np.arange(1, k) / k) if k > 1 else np.empty(0)
    cuts = np.concatenate([[min(0.0, time.min())], inner, [time.max()]])
    uniq = np.unique(cuts)
    if uniq.size < 2:
        raise ValueError(f"time: all follow-up times equal {time.max()}, cannot form an interval")
    if uniq.size != cuts.size:
        warnings.warn(f"make_time_cuts: tied event-time quantiles, {uniq.size - 1} intervals instead of k={k}",
                      stacklevel=2)
    return uniq


def _to_numpy(x):
    return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else x


def _as_cuts(cuts, like: torch.Tensor, k: int) -> torch.Tensor:
    c = torch.as_tensor(cuts, dtype=like.dtype, device=like.device).reshape(-1)
    if c.numel() != k + 1:
        raise ValueError(f"cuts must have K + 1 = {k + 1} boundaries for logits with K = {k} intervals, "
                         f"got {c.numel()}")
    if not torch.isfinite(c).all() or not bool((c[1:] > c[:-1]).all()):
        raise ValueError(f"cuts must be finite and strictly increasing, got {c.tolist()}")
    return c


def _check_logits_2d(logits: torch.Tensor) -> None:
    if logits.dim() != 2 or logits.shape[1] < 1:
        raise ValueError(f"logits must be (B, K) with K >= 1 intervals, got shape {tuple(logits.shape)}")


def _discrete_time_targets(time: torch.Tensor, event: torch.Tensor,
                           cuts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``survived`` and ``failed`` masks ``(B, K)``; rules in :func:`discrete_time_nll`."""
    upper = cuts[1:].unsqueeze(0)  # (1, K)
    mid = (0.5 * (cuts[:-1] + cuts[1:])).unsqueeze(0)
    t = time.unsqueeze(1)
    ev = event.unsqueeze(1)
    survived = torch.where(ev, t > upper, t >= mid)
    prev_upper = torch.cat([torch.full_like(cuts[:1], float("-inf")), cuts[1:-1]]).unsqueeze(0)
    failed = ev & (t <= upper) & (t > prev_upper)
    return survived, failed


def discrete_time_nll(logits: torch.Tensor, time: torch.Tensor, event: torch.Tensor, cuts) -> torch.Tensor:
    """Negative log-likelihood of the discrete-time (logistic hazard) survival model.

    With ``K`` intervals ``I_j = (c_j, c_{j+1}]`` and hazards
    ``h_j = P(T in I_j | T > c_j) = sigmoid(logit_j)`` (Tutz & Schmid 2016,
    "Modeling Discrete Time-to-Event Data", ch. 3; Gensheimer & Narasimhan
    2019, eq. 1-2), a patient's log-likelihood is::

        event in I_j:      log h_j + sum_{k<j} log(1 - h_k)
        censored in I_j:   sum_{k<j} log(1 - h_k)  [+ log(1 - h_j) if t >= midpoint of I_j]

    Intervals are right-closed, ``I_j = (c_j, c_{j+1}]`` (``I_0`` also takes
    ``t <= c_0``), so an event exactly on a cut belongs to the interval that
    ends there:

    * event at ``t``: survived every ``j`` with ``t > c_{j+1}``, failed in the
      interval containing ``t``.  An event after the last cut (``t > c_K``)
      survived all ``K`` intervals and has no failure term (it is censored at
      ``c_K``), as in nnet-survival's ``make_surv_array``;
    * censored at ``t``: survived every ``j`` with ``t >= (c_j + c_{j+1}) / 2``,
      i.e. every earlier interval, plus its own interval when it was followed
      for at least half of it (nnet-survival's rule, Gensheimer & Narasimhan
      2019, PeerJ 7:e6257, "A scalable discrete-time survival model for
      neural networks": a censored patient gets credit for surviving an
      interval if followed past its midpoint).

    ``log h = logsigmoid(logit)`` and ``log(1 - h) = logsigmoid(-logit)`` are
    evaluated stably.

    Parameters
    ----------
    logits
        ``(B, K)`` per-interval hazard logits.
    time, event
        ``(B,)`` follow-up time and event indicator.
    cuts
        ``(K + 1,)`` strictly increasing boundaries (e.g. from
        :func:`make_time_cuts`, fitted on the training fold).

    Returns
    -------
    Tensor
        Scalar: the per-patient negative log-likelihood averaged over the
        batch (the Keras reduction of nnet-survival).  An empty batch gives
        ``0 * logits.sum()``.
    """
    _check_logits_2d(logits)
    b, k = logits.shape
    if time.reshape(-1).shape[0] != b:
        raise ValueError(f"time must have B = {b} elements (rows of logits), got {time.reshape(-1).shape[0]}")
    if event.reshape(-1).shape[0] != b:
        raise ValueError(f"event must have B = {b} elements (rows of logits), got {event.reshape(-1).shape[0]}")
    c = _as_cuts(cuts, logits, k)
    time = time.reshape(-1).to(logits.dtype)
    if not torch.isfinite(time).all():
        raise ValueError("time must be finite")
    if b == 0:
        return logits.sum() * 0.0
    survived, failed = _discrete_time_targets(time, event.reshape(-1).bool(), c)
    zero = logits.new_zeros(())
    ll = (torch.where(survived, F.logsigmoid(-logits), zero).sum(1)
          + torch.where(failed, F.logsigmoid(logits), zero).sum(1))
    return -ll.mean()


def discrete_time_survival(logits: torch.Tensor) -> torch.Tensor:
    """Survival at the interval ends, ``S(c_{j+1}) = prod_{k<=j} (1 - h_k)``, shape ``(B, K)``."""
    _check_logits_2d(logits)
    return torch.exp(torch.cumsum(F.logsigmoid(-logits), dim=1))


def discrete_time_risk(logits: torch.Tensor) -> torch.Tensor:
    """Scalar risk score ``(B,)`` for concordance: cumulative hazard at the last cut.

    ``risk = -log S(c_K) = sum_k -log(1 - h_k) = sum_k softplus(logit_k)``.
    Higher = worse (the radfusion convention); it is monotone in every
    interval's hazard, so a patient whose hazards are all higher ranks as
    riskier.
    """
    _check_logits_2d(logits)
    return F.softplus(logits).sum(1)


# --------------------------------------------------------------------------- #
# Classification
# --------------------------------------------------------------------------- #
def classification_loss(logits: torch.Tensor, target: torch.Tensor, *, kind: str = "ce", gamma: float = 2.0,
                        alpha=None) -> torch.Tensor:
    """Cross-entropy or focal loss, binary or multiclass, averaged over labelled samples.

    Focal loss (Lin, Goyal, Girshick, He & Dollar 2017, ICCV, "Focal loss for
    dense object detection", eq. 5)::

        FL(p_t) = -alpha_t (1 - p_t)^gamma log(p_t)

    where ``p_t`` is the predicted probability of the true class.  ``kind="ce"``
    is the same with ``gamma = 0`` (alpha-balanced cross-entropy, eq. 3, when
    ``alpha`` is given).

    * binary: ``logits`` ``(B,)`` or ``(B, 1)``, ``p = sigmoid(logit)``,
      ``target`` in {0, 1}; ``alpha`` a float in [0, 1] weighting the positive
      class (``alpha_t = alpha`` if y = 1 else ``1 - alpha``, as in the paper);
    * multiclass: ``logits`` ``(B, K)``, ``K >= 2``, softmax; ``target`` in
      ``0..K-1``; ``alpha`` a length-K sequence of class weights
      (``alpha_t = alpha[y]``).

    ``alpha=None`` means ``alpha_t = 1``.  Samples with ``target < 0`` are
    ignored.  The result is the plain mean of the per-sample losses over the
    labelled samples (not normalised by the sum of the weights); with no
    labelled sample it is ``0 * logits.sum()``.
    """
    if kind not in ("ce", "focal"):
        raise ValueError(f"kind must be 'ce' or 'focal', got {kind!r}")
    if not isinstance(gamma, (int, float)) or isinstance(gamma, bool) or not gamma >= 0:
        raise ValueError(f"gamma must be a number >= 0, got {gamma!r}")
    if kind == "ce":
        gamma = 0.0
    binary = logits.dim() == 1 or (logits.dim() == 2 and logits.shape[1] == 1)
    if not binary and logits.dim() != 2:
        raise ValueError(f"logits must be (B,), (B, 1) or (B, K), got shape {tuple(logits.shape)}")
    b = logits.shape[0]
    target = target.reshape(-1)
    if target.shape[0] != b:
        raise ValueError(f"target must have B = {b} elements (rows of logits), got {target.shape[0]}")
    keep = target >= 0
    if not bool(keep.any()):
        return logits.sum() * 0.0
    if binary:
        z = logits.reshape(-1)[keep]
        y = target[keep]
        if bool(((y != 0) & (y != 1)).any()):
            raise ValueError("target must be 0 or 1 (or < 0 to ignore) for binary logits")
        yf = y.to(z.dtype)
        log_pt = -F.binary_cross_entropy_with_logits(z, yf, reduction="none")
        if alpha is None:
            alpha_t = None
        else:
            if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0.0 <= alpha <= 1.0:
                raise ValueError(f"alpha must be a float in [0, 1] for binary logits, got {alpha!r}")
            alpha_t = yf * alpha + (1 - yf) * (1 - alpha)
    else:
        k = logits.shape[1]
        z = logits[keep]
        y = target[keep].long()
        if bool((y >= k).any()):
            raise ValueError(f"target must be < K = {k} (or < 0 to ignore), got max {int(y.max())}")
        log_pt = F.log_softmax(z, dim=1).gather(1, y.unsqueeze(1)).squeeze(1)
        if alpha is None:
            alpha_t = None
        else:
            a = torch.as_tensor(alpha, dtype=z.dtype, device=z.device).reshape(-1)
            if a.numel() != k or not bool((a >= 0).all()):
                raise ValueError(f"alpha must be {k} non-negative class weights for (B, {k}) logits, got {alpha!r}")
            alpha_t = a[y]
    loss = -log_pt
    if gamma > 0:
        one_minus_pt = -torch.expm1(log_pt)  # 1 - p_t, accurate near p_t = 1
        if gamma < 1:  # d/dx x^gamma is infinite at 0
            one_minus_pt = one_minus_pt.clamp_min(torch.finfo(log_pt.dtype).tiny)
        loss = one_minus_pt.pow(gamma) * loss
    if alpha_t is not None:
        loss = alpha_t * loss
    return loss.mean()


# --------------------------------------------------------------------------- #
# Multi-task weighting
# --------------------------------------------------------------------------- #
class UncertaintyWeighting(nn.Module):
    """Homoscedastic-uncertainty weighting of task losses.

    Kendall, Gal & Cipolla (2018), CVPR, "Multi-task learning using
    uncertainty to weigh losses for scene geometry and semantics": each task
    ``i`` gets a learnable log-variance ``s_i = log sigma_i^2`` (their section
    3.2 advice: learn ``s`` rather than ``sigma`` for numerical stability) and
    the combined loss used here is::

        L = sum_i [ exp(-s_i) * L_i + s_i ]

    i.e. twice their eq. 7 (``L_i / (2 sigma_i^2) + log sigma_i``), applied to
    every task (survival, classification, auxiliary) alike; the factor 2 only
    rescales the learning rate.  ``dL/ds_i = 1 - exp(-s_i) L_i``, so for a
    task whose loss stays at ``L_i`` the optimum is ``s_i = log L_i`` (weight
    ``exp(-s_i) = 1 / L_i``).  Note the loss is unbounded below when some
    ``L_i -> 0`` (``s_i -> -inf``); clip or regularise ``s`` if a task can be
    fitted perfectly.

    Parameters
    ----------
    n_tasks
        Number of task losses.
    init
        Initial ``s_i`` (0 = unit weights).
    """

    def __init__(self, n_tasks: int, *, init: float = 0.0) -> None:
        super().__init__()
        if isinstance(n_tasks, bool) or not isinstance(n_tasks, (int, np.integer)) or n_tasks < 1:
            raise ValueError(f"n_tasks must be a positive integer, got {n_tasks!r}")
        if not np.isfinite(init):
            raise ValueError(f"init must be finite, got {init!r}")
        self.n_tasks = int(n_tasks)
        self.log_vars = nn.Parameter(torch.full((self.n_tasks,), float(init)))

    @property
    def weights(self) -> torch.Tensor:
        """Current task weights ``exp(-s_i)`` (detached), shape ``(n_tasks,)``."""
        return torch.exp(-self.log_vars.detach())

    def forward(self, losses: Sequence[torch.Tensor] | torch.Tensor) -> torch.Tensor:
        """``sum_i exp(-s_i) L_i + s_i`` for ``n_tasks`` scalar losses (a sequence or a ``(n_tasks,)`` tensor)."""
        if isinstance(losses, torch.Tensor):
            stacked = losses.reshape(-1)
        else:
            losses = list(losses)
            if any(not isinstance(x, torch.Tensor) or x.numel() != 1 for x in losses):
                raise ValueError("losses must be scalar tensors")
            stacked = torch.stack([x.reshape(()) for x in losses]) if losses else torch.empty(0)
        if stacked.numel() != self.n_tasks:
            raise ValueError(f"losses must hold n_tasks = {self.n_tasks} values, got {stacked.numel()}")
        s = self.log_vars.to(stacked.dtype)
        return (torch.exp(-s) * stacked + s).sum()


# --------------------------------------------------------------------------- #
# Confounder-free training (CF-Net)
# --------------------------------------------------------------------------- #
def cfnet_correlation_loss(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None = None, *,
                           eps: float = 1e-8) -> torch.Tensor:
    """CF-Net adversarial loss: the negative squared Pearson correlation ``-corr(pred, target)^2``.

    Zhao, Adeli & Pohl (2020), Nature Communications 11:5922, "Training
    confounder-free deep learning models for medical applications", eq. 2:
    the confounder predictor (CP) outputs ``pred`` = c_hat from the features and
    minimises ``L_bp = -corr^2(c, c_hat)`` (it tries to predict the confounder
    ``c``); the feature extractor, through the gradient reversal, maximises it,
    i.e. drives ``corr^2`` to 0 so the features carry no (linear) information
    about ``c``.  CF-Net computes it within a subgroup (e.g. controls, y = 0:
    "conditioning"), so the intrinsic confounder-outcome relation is kept;
    pass that subgroup as ``mask``.

    ``corr^2 = cov(p, c)^2 / (var(p) var(c) + eps)`` with population
    (1/n) moments.  Fewer than 2 selected samples, or NaN targets only,
    give ``0 * pred.sum()``; NaN targets are excluded.

    Parameters
    ----------
    pred, target
        ``(B,)`` (or ``(B, 1)``) predicted and true confounder values.
    mask
        Optional bool ``(B,)`` selecting the conditioning subgroup.
    eps
        Added to the denominator so a constant prediction gives 0, not NaN.
    """
    p = pred.reshape(-1)
    b = p.shape[0]
    c = target.reshape(-1)
    if c.shape[0] != b:
        raise ValueError(f"target must have B = {b} elements (like pred), got {c.shape[0]}")
    keep = torch.isfinite(c)
    if mask is not None:
        mask = mask.reshape(-1)
        if mask.shape[0] != b:
            raise ValueError(f"mask must have B = {b} elements (like pred), got {mask.shape[0]}")
        if mask.dtype != torch.bool:
            raise ValueError(f"mask must be a bool tensor, got {mask.dtype}")
        keep = keep & mask
    if int(keep.sum()) < 2:
        return pred.sum() * 0.0
    p = p[keep]
    c = c[keep].to(p.dtype)
    pc = p - p.mean()
    cc = c - c.mean()
    cov = (pc * cc).mean()
    corr2 = cov * cov / ((pc * pc).mean() * (cc * cc).mean() + eps)
    return -corr2


# --------------------------------------------------------------------------- #
# Soft parameter sharing
# --------------------------------------------------------------------------- #
def parameter_sharing_penalty(modules: Sequence[nn.Module]) -> torch.Tensor:
    """Soft parameter sharing: squared L2 distance of matching parameters to their mean.

    Duong, Cohn, Bird & Cook (2015), ACL, "Low resource dependency parsing:
    cross-lingual parameter sharing in a neural network parser" (an L2 penalty
    between the task models' parameters); Ruder (2017), "An overview of
    multi-task learning in deep neural networks", section 3.2::

        P = sum_{name in common} sum_{m=1}^{M} || theta_m[name] - mean_{m'} theta_{m'}[name] ||_2^2

    where "common" are the parameter names present in *every* module with the
    same shape in all of them (others are not shared and are skipped).  For
    two modules this is ``||theta_1 - theta_2||^2 / 2`` per parameter.

    Raises
    ------
    ValueError
        Fewer than two modules, or no parameter in common.
    """
    modules = list(modules)
    if len(modules) < 2 or not all(isinstance(m, nn.Module) for m in modules):
        raise ValueError(f"modules must be a list of at least two nn.Module, got {len(modules)} item(s)")
    params = [dict(m.named_parameters()) for m in modules]
    common = [n for n in params[0]
              if all(n in p and p[n].shape == params[0][n].shape for p in params[1:])]
    if not common:
        raise ValueError("modules have no parameter in common (same name and shape); "
                         f"first module has {sorted(params[0])}, second has {sorted(params[1])}")
    total = None
    for n in common:
        stacked = torch.stack([p[n] for p in params])  # (M, *shape)
        term = (stacked - stacked.mean(0, keepdim=True)).pow(2).sum()
        total = term if total is None else total + term
    return total
