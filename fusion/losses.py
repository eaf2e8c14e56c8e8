"""Survival losses."""
from __future__ import annotations

import torch


def cox_ph_loss(risk: torch.Tensor, time: torch.Tensor, event: torch.Tensor, *, ties: str = "efron") -> torch.Tensor:
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

    Returns
    -------
    Tensor
        Scalar.  A batch without events returns ``0 * risk.sum()`` (finite, keeps
        the graph) instead of NaN.
    """
    if ties not in ("efron", "breslow"):
        raise ValueError(f"ties must be 'efron' or 'breslow', got {ties!r}")
    risk = risk.reshape(-1)
    time = time.reshape(-1).to(risk.dtype)
    event = event.reshape(-1).bool()
    if risk.numel() == 0 or not bool(event.any()):
        return risk.sum() * 0.0
    n_events = event.sum()
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
    return -(sum_r - log_terms).sum() / n_events
