"""Survival losses."""
from __future__ import annotations

import torch


def cox_ph_loss(risk: torch.Tensor, time: torch.Tensor, event: torch.Tensor) -> torch.Tensor:
    """Negative Cox partial log-likelihood with Breslow's handling of ties.

    ``L = -(1 / n_events) * sum_{i: event_i} [ r_i - log sum_{j: t_j >= t_i} exp(r_j) ]``
    (Cox 1972; Breslow 1974), averaged over events so the scale does not depend
    on the batch size.  Higher ``risk`` means a worse outcome (earlier event).

    Parameters
    ----------
    risk
        ``(B,)`` log relative hazard.
    time
        ``(B,)`` follow-up time.
    event
        ``(B,)`` bool, True where the event was observed.

    Returns
    -------
    Tensor
        Scalar.  A batch without events returns ``0 * risk.sum()`` (finite, keeps
        the graph) instead of NaN.
    """
    risk = risk.reshape(-1)
    time = time.reshape(-1).to(risk.dtype)
    event = event.reshape(-1).bool()
    if risk.numel() == 0 or not bool(event.any()):
        return risk.sum() * 0.0
    order = torch.argsort(time, descending=True, stable=True)
    r = risk[order]
    t = time[order]
    e = event[order]
    log_cum = torch.logcumsumexp(r, dim=0)
    # Ties: the risk set of a time includes every patient with the same time, i.e. up to
    # the last index of that tie group in the descending order.
    neg_t = -t
    last = torch.searchsorted(neg_t.contiguous(), neg_t.contiguous(), right=True) - 1
    log_risk_set = log_cum[last]
    return -(r[e] - log_risk_set[e]).sum() / e.sum()
