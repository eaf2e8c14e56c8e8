"""Metrics, through scikit-survival.

One concordance convention throughout radfusion: higher risk = worse outcome
(earlier event), which is also scikit-survival's convention for
``concordance_index_censored(event, time, estimate)``.
"""
from __future__ import annotations

import numpy as np


def harrell_c(event, time, risk) -> float:
    """Harrell's concordance index (scikit-survival); NaN when no pair is comparable."""
    from sksurv.metrics import concordance_index_censored

    event = np.asarray(event, dtype=bool)
    time = np.asarray(time, dtype=float)
    risk = np.asarray(risk, dtype=float)
    if event.sum() == 0 or len(time) < 2:
        return float("nan")
    try:
        return float(concordance_index_censored(event, time, risk)[0])
    except ValueError:
        # raised by scikit-survival when no pair is comparable
        return float("nan")


def c_index_by_group(event, time, risk, groups) -> dict[str, float | None]:
    """Harrell's C within each group (e.g. site); ``None`` where undefined."""
    groups = np.asarray(groups)
    out = {}
    for g in sorted(set(groups.tolist())):
        sel = groups == g
        c = harrell_c(np.asarray(event)[sel], np.asarray(time)[sel], np.asarray(risk)[sel])
        out[str(g)] = None if np.isnan(c) else round(c, 4)
    return out


def logrank_p(event, time, groups) -> float | None:
    """Log-rank test p-value between groups (scikit-survival ``compare_survival``)."""
    from sksurv.compare import compare_survival
    from sksurv.util import Surv

    groups = np.asarray(groups)
    if len(set(groups.tolist())) < 2:
        return None
    y = Surv.from_arrays(event=np.asarray(event, dtype=bool), time=np.asarray(time, dtype=float))
    _, p = compare_survival(y, groups)
    return float(p)
