"""Site-stratified batches: each index once, per-batch site counts within +-1 of the quota, determinism."""
from __future__ import annotations

import numpy as np
import pytest

from fusion.sampling import site_allocation, site_stratified_batches


def _check_epoch(sites, batch_size, batches):
    n = len(sites)
    allidx = np.concatenate(batches)
    assert np.array_equal(np.sort(allidx), np.arange(n))  # each index exactly once
    sizes = np.array([len(b) for b in batches])
    assert len(batches) == -(-n // batch_size)
    assert sizes.max() <= batch_size and sizes.max() - sizes.min() <= 1
    labels, counts = np.unique(sites, return_counts=True)
    for b in batches:
        for lab, cnt in zip(labels, counts):
            expected = len(b) * cnt / n
            got = int((sites[b] == lab).sum())
            assert np.floor(expected) <= got <= np.ceil(expected), (lab, got, expected)
            assert abs(got - expected) <= 1


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("batch_size", [1, 7, 16, 32, 500])
def test_every_batch_matches_site_mix(seed, batch_size):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(40, 400))
    p = rng.dirichlet(np.ones(5) * 0.7)
    sites = rng.choice(np.array(["A", "B", "C", "D", "E"]), size=n, p=p)
    batches = site_stratified_batches(sites, batch_size, np.random.default_rng(seed + 100))
    _check_epoch(sites, batch_size, batches)


def test_hand_example_every_batch_sees_every_site():
    # 60% / 30% / 10% of 40 patients, batches of 10 -> exactly 6 / 3 / 1 per batch
    sites = np.array([0] * 24 + [1] * 12 + [2] * 4)
    batches = site_stratified_batches(sites, 10, np.random.default_rng(0))
    assert len(batches) == 4
    for b in batches:
        assert np.bincount(sites[b], minlength=3).tolist() == [6, 3, 1]


def test_uneven_sizes_and_many_tiny_sites():
    sites = np.array([0] * 50 + list(range(1, 12)))  # 11 singleton sites
    batches = site_stratified_batches(sites, 8, np.random.default_rng(3))
    _check_epoch(sites, 8, batches)
    assert sorted(len(b) for b in batches) == [7] * 3 + [8] * 5  # 61 = 3*7 + 5*8, no tiny last batch


def test_deterministic_by_seed_and_varies_between_epochs():
    sites = np.random.default_rng(0).integers(0, 4, 200)
    a = site_stratified_batches(sites, 16, np.random.default_rng(42))
    b = site_stratified_batches(sites, 16, np.random.default_rng(42))
    assert len(a) == len(b) and all(np.array_equal(x, y) for x, y in zip(a, b))
    rng = np.random.default_rng(42)
    e1, e2 = site_stratified_batches(sites, 16, rng), site_stratified_batches(sites, 16, rng)
    assert not all(np.array_equal(x, y) for x, y in zip(e1, e2))


def test_site_allocation_margins_and_rounding():
    counts, sizes = np.array([13, 5, 2, 1]), np.array([7, 7, 7])
    alloc = site_allocation(counts, sizes)
    assert alloc.sum(1).tolist() == sizes.tolist() and alloc.sum(0).tolist() == counts.tolist()
    expected = np.outer(sizes, counts) / counts.sum()
    assert (alloc >= np.floor(expected)).all() and (alloc <= np.ceil(expected)).all()


@pytest.mark.parametrize("kwargs, field", [
    (dict(sites=np.array([0, 1]), batch_size=0), "batch_size"),
    (dict(sites=np.array([0, 1]), batch_size=2.5), "batch_size"),
    (dict(sites=np.array([]), batch_size=4), "sites"),
    (dict(sites=np.zeros((2, 2)), batch_size=4), "sites"),
    (dict(sites=np.array([0.0, np.nan]), batch_size=4), "sites"),
    (dict(sites=np.array(["a", None], dtype=object), batch_size=4), "sites"),
])
def test_bad_input(kwargs, field):
    with pytest.raises(ValueError, match=field):
        site_stratified_batches(rng=np.random.default_rng(0), **kwargs)


def test_bad_rng_and_bad_allocation_input():
    with pytest.raises(ValueError, match="rng"):
        site_stratified_batches(np.array([0, 1]), 2, 0)
    with pytest.raises(ValueError, match="batch_sizes"):
        site_allocation([3, 2], [2, 2])
    with pytest.raises(ValueError, match="site_counts"):
        site_allocation([3, 0], [3])
