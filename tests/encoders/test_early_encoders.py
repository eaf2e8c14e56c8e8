"""Parameter-free early-fusion feature extractors: hand-computed values, registry wiring, bad input."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from encoders.early import EHRSummary, IdentityEncoder, ImagePoolFeatures, percentiles
from encoders.registry import create_encoder, get_encoder_entry, list_encoders


def test_registered_in_the_right_families():
    assert "identity" in list_encoders("tabular")
    assert "image_pool" in list_encoders("image3d")
    assert "ehr_summary" in list_encoders("sequence")
    for name in ("identity", "image_pool", "ehr_summary"):
        assert get_encoder_entry(name).cls.parameter_free is True


# --------------------------------------------------------------------------- #
# identity
# --------------------------------------------------------------------------- #
def test_identity_returns_the_input_and_follows_create_encoder_convention():
    enc = create_encoder("identity", 4, 4)  # create_encoder(name, in_features, out_dim)
    x = torch.randn(3, 4)
    assert enc.out_dim == 4 and len(list(enc.parameters())) == 0
    assert torch.equal(enc.eval()(x), x)
    assert create_encoder("identity", 4, None).out_dim == 4
    assert IdentityEncoder(5).out_dim == 5


def test_identity_dropout_only_in_training():
    enc = IdentityEncoder(1000, dropout=0.5)
    x = torch.ones(2, 1000)
    assert torch.equal(enc.eval()(x), x)
    y = enc.train()(x)
    assert 0.3 < (y == 0).float().mean() < 0.7


def test_identity_bad_input():
    with pytest.raises(ValueError, match="out_dim must equal 4"):
        create_encoder("identity", 4, 32)
    with pytest.raises(ValueError, match="in_features"):
        IdentityEncoder(0)
    with pytest.raises(ValueError, match="dropout"):
        IdentityEncoder(3, dropout=1.0)
    with pytest.raises(ValueError, match="x must be"):
        IdentityEncoder(3)(torch.zeros(2, 4))


# --------------------------------------------------------------------------- #
# image_pool
# --------------------------------------------------------------------------- #
def test_percentiles_match_numpy_linear():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(3, 2, 101))
    q = [0, 5, 33.3, 50, 90, 100]
    got = percentiles(torch.tensor(x), q).numpy()
    np.testing.assert_allclose(got, np.moveaxis(np.percentile(x, q, axis=-1), 0, -1), rtol=1e-12)
    with pytest.raises(ValueError, match="q must"):
        percentiles(torch.tensor(x), [101])


def test_image_pool_hand_computed_values():
    # 1 channel 2x2x2 volume with values 0..7; grid 2 -> each cell is one voxel
    x = torch.arange(8, dtype=torch.float64).reshape(1, 1, 2, 2, 2)
    enc = create_encoder("image_pool", 3, 1, 2 + 3 + 8)
    assert enc.out_dim == 13 and len(list(enc.parameters())) == 0
    out = enc(x)[0].numpy()
    v = np.arange(8.0)
    expected = [v.mean(), v.std(), *np.percentile(v, [10, 50, 90]), *v]
    np.testing.assert_allclose(out, expected)
    assert enc.feature_names()[:6] == ["c0_mean", "c0_std", "c0_p10", "c0_p50", "c0_p90", "c0_grid_0_0_0"]


def test_image_pool_grid_means_two_channels():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(2, 2, 4, 6, 2))
    enc = ImagePoolFeatures(3, 2, grid=(2, 3, 1), percentiles=())
    assert enc.out_dim == 2 * (2 + 6)
    out = enc(torch.tensor(x)).numpy().reshape(2, 2, 8)
    for b in range(2):
        for c in range(2):
            vol = x[b, c]
            cells = vol.reshape(2, 2, 3, 2, 1, 2).mean(axis=(1, 3, 5)).reshape(-1)
            np.testing.assert_allclose(out[b, c], [vol.mean(), vol.std(), *cells], rtol=1e-10)
    assert len(enc.feature_names()) == enc.out_dim


def test_image_pool_2d_and_float32_and_batch_independence():
    enc = ImagePoolFeatures(2, 3)
    x = torch.randn(4, 3, 9, 7)
    out = enc(x)
    assert out.shape == (4, enc.out_dim) == (4, 3 * (2 + 3 + 4)) and out.dtype == torch.float32
    torch.testing.assert_close(enc(x[1:2]), out[1:2])


@pytest.mark.parametrize("args, kw, field", [
    ((4, 1, None), {}, "spatial_dims"),
    ((3, 0, None), {}, "in_channels"),
    ((3, 1, 12), {}, "out_dim must equal 13"),
    ((3, 1, 0), {}, "out_dim"),
    ((3, 1, None), {"grid": (2, 2)}, "grid"),
    ((3, 1, None), {"grid": 0}, "grid"),
    ((3, 1, None), {"percentiles": (50, 120)}, "percentiles"),
    ((3, 1, None), {"dropout": 1.5}, "dropout"),
])
def test_image_pool_bad_arguments(args, kw, field):
    with pytest.raises(ValueError, match=field):
        create_encoder("image_pool", *args, **kw)


def test_image_pool_bad_input_shape():
    with pytest.raises(ValueError, match="x must be"):
        ImagePoolFeatures(3, 2)(torch.zeros(1, 1, 4, 4, 4))


# --------------------------------------------------------------------------- #
# ehr_summary
# --------------------------------------------------------------------------- #
def _ehr():
    """B=2, T=4, V=3; patient 1 has length 2 (steps 2, 3 are padding with junk that must be ignored)."""
    values = torch.tensor([
        [[1.0, 0.0, 5.0], [2.0, 0.0, 0.0], [0.0, 0.0, -1.0], [4.0, 0.0, 0.0]],
        [[3.0, 7.0, 0.0], [0.0, 9.0, 0.0], [99.0, 99.0, 99.0], [99.0, 99.0, 99.0]],
    ])
    mask = torch.tensor([
        [[1, 0, 1], [1, 0, 0], [0, 0, 1], [1, 0, 0]],
        [[1, 1, 0], [0, 1, 0], [1, 1, 1], [1, 1, 1]],
    ], dtype=torch.float32)
    values[0, 2, 0] = float("nan")  # unobserved placeholder
    return {"values": values, "mask": mask, "delta": torch.zeros(2, 4, 3), "times": torch.zeros(2, 4),
            "lengths": torch.tensor([4, 2])}


def test_ehr_summary_hand_computed():
    enc = create_encoder("ehr_summary", 3, 15)
    assert enc.out_dim == 15 and len(list(enc.parameters())) == 0
    out = enc(_ehr()).numpy()
    #            last        mean           min          max          frac = count / T(=4)
    p0 = [4, 0, -1] + [7 / 3, 0, 2] + [1, 0, -1] + [4, 0, 5] + [3 / 4, 0, 2 / 4]
    p1 = [3, 9, 0] + [3, 8, 0] + [3, 7, 0] + [3, 9, 0] + [1 / 4, 2 / 4, 0]
    np.testing.assert_allclose(out, [p0, p1], rtol=1e-6)
    assert enc.feature_names(["hr", "sbp", "lac"])[:4] == ["last[hr]", "last[sbp]", "last[lac]", "mean[hr]"]


def test_ehr_summary_zero_length_patient_and_batch_independence():
    ehr = _ehr()
    ehr["lengths"] = torch.tensor([4, 0])
    out = EHRSummary(3)(ehr)
    assert torch.equal(out[1], torch.zeros(15))
    single = {k: v[:1] for k, v in ehr.items()}
    torch.testing.assert_close(EHRSummary(3)(single), out[:1])


@pytest.mark.parametrize("mutate, field", [
    (lambda e: e.pop("mask"), "keys"),
    (lambda e: e.update(values=torch.zeros(2, 4, 2), mask=torch.zeros(2, 4, 2)), "values"),
    (lambda e: e.update(mask=torch.zeros(2, 3, 3)), "mask"),
    (lambda e: e.update(lengths=torch.tensor([5, 1])), "lengths"),
    (lambda e: e.update(lengths=torch.tensor([1])), "lengths"),
])
def test_ehr_summary_bad_input(mutate, field):
    ehr = _ehr()
    mutate(ehr)
    with pytest.raises(ValueError, match=field):
        EHRSummary(3)(ehr)


def test_ehr_summary_bad_arguments():
    with pytest.raises(ValueError, match="out_dim must equal 15"):
        create_encoder("ehr_summary", 3, 12)
    with pytest.raises(ValueError, match="in_features"):
        EHRSummary(0)
    with pytest.raises(ValueError, match="variables"):
        EHRSummary(3).feature_names(["a"])


def test_early_fusion_model_end_to_end():
    """identity + ehr_summary + concat fusion + linear head trains (the only parameters are fusion + head)."""
    from fusion.model import FusionModel
    from fusion.strategies import create_fusion

    torch.manual_seed(0)
    encs = {"clinical": create_encoder("identity", 4, None), "ehr": create_encoder("ehr_summary", 3, None)}
    fusion = create_fusion("concat", {m: e.out_dim for m, e in encs.items()}, 8, dropout=0.0)
    model = FusionModel(encs, fusion, torch.nn.Linear(8, 1))
    ehr = _ehr()
    batch = {"clinical": torch.randn(2, 4), "ehr": ehr, "modalities": ["clinical", "ehr"],
             "present": torch.tensor([[True, True], [True, False]]),
             "time": torch.tensor([1.0, 2.0]), "event": torch.tensor([True, True])}
    out = model(batch)
    assert out["risk"].shape == (2,)
    out["loss"].backward()
    assert fusion.proj[0].weight.grad.abs().sum() > 0
