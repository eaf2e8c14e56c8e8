import numpy as np

from fusion.audit import confounder_probe


def test_probe_finds_a_planted_confounder_and_not_a_random_one():
    rng = np.random.default_rng(0)
    n = 300
    site = rng.choice(["A", "B", "C"], n)
    emb = rng.normal(size=(n, 6))
    emb[:, 0] += (site == "B") * 2.0
    emb[:, 1] += (site == "C") * 2.0
    assert confounder_probe(emb, site) > 0.85
    assert abs(confounder_probe(rng.normal(size=(n, 6)), site) - 0.5) < 0.08
    binary = np.where(site == "A", "x", "y")
    assert confounder_probe(emb, binary) > 0.75


def test_probe_continuous_r2_and_degenerate_cases():
    rng = np.random.default_rng(1)
    emb = rng.normal(size=(200, 4))
    age = 3 * emb[:, 2] + rng.normal(size=200) * 0.5
    assert confounder_probe(emb, age, continuous=True) > 0.9
    assert confounder_probe(emb, rng.normal(size=200), continuous=True) < 0.05
    assert confounder_probe(emb, np.array(["A"] * 200)) is None
