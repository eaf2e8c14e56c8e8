"""The noisy linear imputation of ``benchmarks/cam_layer_rules.py`` (ROAD's deletion fill) against
functions whose Laplace-equation solution is known."""
import importlib.util
from pathlib import Path

import numpy as np
import pytest

BENCH = Path(__file__).resolve().parents[2] / "benchmarks" / "cam_layer_rules.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_cam_layer_rules", BENCH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_harmonic_fill_recovers_a_linear_image_and_keeps_the_rest(bench):
    z, y, x = np.meshgrid(*[np.arange(10.0)] * 3, indexing="ij")
    img = 2.0 * z - 1.5 * y + 0.5 * x + 7.0  # linear: each voxel is the mean of its 6 neighbours
    remove = np.zeros(img.shape, dtype=bool)
    remove[3:7, 2:8, 4:6] = True
    remove[1, 1, 1] = True
    out = bench.harmonic_fill(img, remove, 0.0, np.random.default_rng(0))
    np.testing.assert_allclose(out, img, atol=1e-9)
    spiky = img.copy()
    spiky[remove] = 1e6  # the removed values never enter the fill
    np.testing.assert_allclose(bench.harmonic_fill(spiky, remove, 0.0, np.random.default_rng(0)), img, atol=1e-6)


def test_harmonic_fill_of_a_hole_in_a_constant_image_is_constant_plus_the_noise(bench):
    img = np.full((6, 6, 6), 3.0)
    remove = np.zeros(img.shape, dtype=bool)
    remove[0:3, 0:3, 0:3] = True  # touches the grid's faces: in-grid neighbours only
    out = bench.harmonic_fill(img, remove, 0.5, np.random.default_rng(1))
    assert np.array_equal(out[~remove], img[~remove])
    noise = out[remove] - 3.0
    assert noise.std() > 0.2 and abs(noise.mean()) < 0.3
    assert np.array_equal(bench.harmonic_fill(img, np.zeros_like(remove), 0.5, np.random.default_rng(1)), img)
