"""Site-stratified mini-batches.

With a handful of sites of unequal size, random batches of 16-32 patients
often miss a site entirely: the confounder adversary then sees no sample of
that site in the step, and the Cox partial likelihood of the batch compares
patients of fewer sites than the cohort has.  :func:`site_stratified_batches`
gives every batch the training site mix.
"""
from __future__ import annotations

import numpy as np

__all__ = ["site_stratified_batches", "site_allocation"]


def site_allocation(site_counts, batch_sizes) -> np.ndarray:
    """Integer ``(n_batches, n_sites)`` allocation with exact margins and per-cell rounding.

    The expected count of site ``s`` in batch ``b`` is
    ``E[b, s] = n_b * N_s / N`` (batch size times the site's share).  Rows sum
    to ``n_b`` and columns to ``N_s``, both integers, so a *controlled
    rounding* exists in which every cell is ``floor(E)`` or ``ceil(E)`` while
    both margins stay exact (Bacharach 1966, "Matrix rounding problems",
    Management Science 12:732; Cox & Ernst 1982).  It is found as an integer
    max-flow: start from ``floor(E)``; each batch still needs
    ``n_b - sum_s floor(E[b, s])`` units and each site has
    ``N_s - sum_b floor(E[b, s])`` left; a unit may go from batch ``b`` to site
    ``s`` only where ``E[b, s]`` is fractional (capacity 1).  The max flow
    saturates all residuals (by the existence result), giving the rounding.
    Per batch this is a largest-remainder-style rounding (each site gets the
    floor or the ceiling of its quota), made consistent across batches so every
    patient is used exactly once.  Integer arithmetic throughout (no
    floating-point remainders).

    Parameters
    ----------
    site_counts
        ``(S,)`` positive patients per site ``N_s``.
    batch_sizes
        ``(n_batches,)`` positive batch sizes summing to ``N = sum N_s``.

    Returns
    -------
    numpy.ndarray
        ``(n_batches, S)`` int64.
    """
    from scipy.sparse import csr_array
    from scipy.sparse.csgraph import maximum_flow

    counts = np.asarray(site_counts, dtype=np.int64).reshape(-1)
    sizes = np.asarray(batch_sizes, dtype=np.int64).reshape(-1)
    if counts.size == 0 or (counts < 1).any():
        raise ValueError(f"site_counts must be a non-empty sequence of positive counts, got {counts.tolist()}")
    if sizes.size == 0 or (sizes < 1).any():
        raise ValueError(f"batch_sizes must be a non-empty sequence of positive sizes, got {sizes.tolist()}")
    n = int(counts.sum())
    if int(sizes.sum()) != n:
        raise ValueError(f"batch_sizes must sum to the number of patients {n}, got {int(sizes.sum())}")
    num = np.outer(sizes, counts)  # E = num / n
    alloc = num // n
    frac = (num % n) > 0
    need = sizes - alloc.sum(1)  # per batch
    left = counts - alloc.sum(0)  # per site
    if need.sum() == 0:
        return alloc
    nb, ns = alloc.shape
    src, sink = 0, 1 + nb + ns
    rows, cols, caps = [], [], []
    for b in range(nb):
        if need[b] > 0:
            rows.append(src), cols.append(1 + b), caps.append(int(need[b]))
    bb, ss = np.nonzero(frac)
    rows += (1 + bb).tolist()
    cols += (1 + nb + ss).tolist()
    caps += [1] * len(bb)
    for s in range(ns):
        if left[s] > 0:
            rows.append(1 + nb + s), cols.append(sink), caps.append(int(left[s]))
    graph = csr_array((np.asarray(caps, dtype=np.int32), (np.asarray(rows), np.asarray(cols))),
                      shape=(sink + 1, sink + 1))
    res = maximum_flow(graph, src, sink)
    if res.flow_value != need.sum():  # pragma: no cover - impossible by the rounding theorem
        raise RuntimeError("site allocation: no consistent rounding found")
    flow = res.flow.toarray() if hasattr(res.flow, "toarray") else np.asarray(res.flow.todense())
    alloc = alloc + np.clip(flow[1:1 + nb, 1 + nb:1 + nb + ns], 0, None).astype(np.int64)
    return alloc


def site_stratified_batches(sites: np.ndarray, batch_size: int, rng: np.random.Generator) -> list[np.ndarray]:
    """One epoch of batches whose site mix matches the training proportions.

    ``n_batches = ceil(N / batch_size)`` batches of sizes differing by at most
    one (none larger than ``batch_size``; no tiny trailing batch, which would
    make a Cox loss with one or two patients).  In every batch ``b`` of size
    ``n_b`` each site ``s`` appears ``floor(n_b N_s / N)`` or
    ``ceil(n_b N_s / N)`` times (so within +-1 of its expected count; see
    :func:`site_allocation`) and every index ``0..N-1`` appears exactly once
    in the epoch.  Which patients of a site go to which batch, which batches
    get the rounded-up quotas, the order of the batches and the order inside
    each batch are random (from ``rng``); the same seed gives the same epoch.

    A site with fewer patients than there are batches cannot be in every
    batch; it still appears in ``N_s`` of them.

    Parameters
    ----------
    sites
        ``(N,)`` site label of each training patient (any hashable dtype).
    batch_size
        Maximum batch size, ``>= 1``.
    rng
        ``numpy.random.Generator``; call once per epoch with the same
        generator for a new shuffle each epoch.

    Returns
    -------
    list of numpy.ndarray
        int64 index arrays into ``sites``.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    if not isinstance(rng, np.random.Generator):
        raise ValueError("rng must be a numpy.random.Generator (np.random.default_rng(seed)), "
                         f"got {type(rng).__name__}")
    sites = np.asarray(sites)
    if sites.ndim != 1:
        raise ValueError(f"sites must be 1-D (one label per patient), got shape {sites.shape}")
    n = sites.shape[0]
    if n == 0:
        raise ValueError("sites must not be empty")
    if sites.dtype.kind == "f" and np.isnan(sites).any():
        raise ValueError(f"sites contains {int(np.isnan(sites).sum())} NaN label(s); give every patient a site")
    if sites.dtype == object and any(s is None or (isinstance(s, float) and np.isnan(s)) for s in sites):
        raise ValueError("sites contains missing labels (None/NaN); give every patient a site")
    _, codes = np.unique(sites, return_inverse=True)
    codes = codes.reshape(-1)
    n_sites = int(codes.max()) + 1
    n_batches = -(-n // int(batch_size))
    sizes = np.full(n_batches, n // n_batches, dtype=np.int64)
    sizes[: n % n_batches] += 1
    sizes = rng.permutation(sizes)
    members = [rng.permutation(np.flatnonzero(codes == s)) for s in range(n_sites)]
    counts = np.array([len(m) for m in members], dtype=np.int64)
    # randomise which cells receive the rounded-up units: permute sites before the (deterministic) flow
    site_order = rng.permutation(n_sites)
    alloc = site_allocation(counts[site_order], sizes)[:, np.argsort(site_order)]
    starts = np.zeros(n_sites, dtype=np.int64)
    batches = []
    for b in range(n_batches):
        parts = []
        for s in range(n_sites):
            k = int(alloc[b, s])
            parts.append(members[s][starts[s]:starts[s] + k])
            starts[s] += k
        batches.append(rng.permutation(np.concatenate(parts)).astype(np.int64))
    return [batches[i] for i in rng.permutation(n_batches)]
