"""Training augmentations (data_adapters.augment): shapes/dtypes, seeding, identity at prob 0, masks follow."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from monai.transforms import Rand3DElastic, RandAffine, RandBiasField, RandGaussianNoise, RandRicianNoise

from data_adapters.augment import make_augmentation, make_augmentation_d


def _ct(shape=(1, 12, 14, 13), seed=0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.uniform(0.0, 1.0, size=shape).astype(np.float32)


def _blob(shape=(28, 32, 30)) -> np.ndarray:
    zz, yy, xx = np.indices(shape)  # an off-centre ellipsoid (a rotation moves it)
    return ((zz - 12) ** 2 / 64 + (yy - 17) ** 2 / 100 + (xx - 13) ** 2 / 49) <= 1.0


@pytest.mark.parametrize("modality", ["ct", "pet", "mri"])
def test_shapes_dtypes_types_kept_and_values_change(modality):
    aug = make_augmentation(modality, prob=1.0, seed=1)
    x = _ct()
    y = aug(x)
    assert isinstance(y, np.ndarray) and y.shape == x.shape and y.dtype == np.float32
    assert np.isfinite(y).all() and not np.allclose(y, x)
    t = torch.from_numpy(_ct(shape=(2, 12, 12, 12))).double()
    out = aug(t)
    assert isinstance(out, torch.Tensor) and out.shape == t.shape and out.dtype == torch.float64
    assert type(out) is torch.Tensor  # not a MONAI MetaTensor
    if modality == "ct":
        assert y.min() >= 0.0 and y.max() <= 1.0  # the HU window stays a window


def test_composition_follows_the_physics():
    names = {m: [type(getattr(t, "inner", t)).__name__ for t in make_augmentation(m).transform.transforms]
             for m in ("ct", "pet", "mri")}
    assert names["ct"] == ["RandAffine", "Rand3DElastic", "RandGaussianNoise"]
    assert names["mri"] == ["RandAffine", "Rand3DElastic", "RandBiasField", "RandRicianNoise"]
    assert names["pet"] == ["RandAffine", "Rand3DElastic", "RandScaleIntensity"]
    affine = make_augmentation("ct").transform.transforms[0]
    assert isinstance(affine, RandAffine)
    assert isinstance(make_augmentation("pet").transform.transforms[1], Rand3DElastic)
    inner = [t.inner for t in make_augmentation("mri").transform.transforms[2:]]
    assert isinstance(inner[0], RandBiasField) and isinstance(inner[1], RandRicianNoise)
    assert isinstance(make_augmentation("ct").transform.transforms[2].inner, RandGaussianNoise)


@pytest.mark.parametrize("modality", ["ct", "pet", "mri"])
def test_deterministic_with_a_seed(modality):
    x = _ct()
    a, b = make_augmentation(modality, prob=0.7, seed=123), make_augmentation(modality, prob=0.7, seed=123)
    outs_a = [a(x) for _ in range(3)]
    outs_b = [b(x) for _ in range(3)]
    for ya, yb in zip(outs_a, outs_b):
        np.testing.assert_array_equal(ya, yb)
    assert not np.array_equal(outs_a[0], outs_a[1])  # each call draws new parameters
    c = make_augmentation(modality, prob=0.7, seed=124)
    assert not np.array_equal(c(x), outs_a[0])


@pytest.mark.parametrize("modality", ["ct", "pet", "mri"])
def test_prob_zero_is_the_identity(modality):
    x = _ct() * 3 - 1  # out of [0, 1] on purpose: nothing may clip it
    np.testing.assert_array_equal(make_augmentation(modality, prob=0.0, seed=0)(x), x)
    d = {"ct": x, "ct_mask": _blob()[None], "label": 3}
    out = make_augmentation_d(["ct"], mask_keys=["ct_mask"], prob=0.0)(d)
    np.testing.assert_array_equal(out["ct"], x)
    np.testing.assert_array_equal(out["ct_mask"], d["ct_mask"])
    assert out["label"] == 3


def test_pet_scaling_acts_on_suv():
    suv = np.linspace(0.0, 12.0, 8 * 8 * 8, dtype=np.float32).reshape(1, 8, 8, 8)
    from data_adapters.augment import _intensity_transforms

    t = _intensity_transforms("pet", 1.0, "log")[0]
    t.set_random_state(5)
    y = t(torch.from_numpy(np.log1p(suv))).numpy()
    ratio = np.expm1(y[suv > 1]) / suv[suv > 1]
    assert np.allclose(ratio, ratio.mean(), rtol=1e-4)  # one global factor on the SUV
    assert 0.9 <= ratio.mean() <= 1.1 and ratio.mean() != pytest.approx(1.0, abs=1e-6)


def test_mr_noise_keeps_the_zscore_background():
    x = np.full((1, 16, 16, 16), -1.5, np.float32)  # background of a z-scored MR
    x[:, 4:12, 4:12, 4:12] = 1.0
    y = make_augmentation("mri", prob=1.0, seed=0)(x)
    # Rician noise on the magnitude image: background stays near its value (not folded to >= 0)
    assert np.median(y[:, :2, :2, :2]) < -1.0 and np.median(y[:, 7:9, 7:9, 7:9]) > 0.5


def _iou(a, b):
    return np.logical_and(a, b).sum() / np.logical_or(a, b).sum()


def test_mask_follows_the_image_under_the_affine():
    blob = _blob()
    img = blob[None].astype(np.float32) * 0.8 + 0.1
    aug = make_augmentation_d(["ct"], mask_keys=["ct_mask"], prob=1.0, seed=3)
    for _ in range(3):
        out = aug({"ct": img, "ct_mask": blob[None], "patient_id": "P-1"})
        m = out["ct_mask"]
        assert m.dtype == np.bool_ and m.shape == (1, *blob.shape)
        assert out["ct"].dtype == np.float32 and out["patient_id"] == "P-1"
        from_image = out["ct"][0] > 0.5  # the image's ROI after (bilinear) transformation
        # the mask (nearest) moved with the image: same place, much closer to it than to the original
        np.testing.assert_allclose(np.argwhere(m[0]).mean(0), np.argwhere(from_image).mean(0), atol=0.5)
        assert _iou(from_image, m[0]) > 0.88
        assert _iou(from_image, m[0]) > _iou(blob, m[0]) + 0.05


def test_dict_twin_per_modality_missing_keys_and_validation():
    x = {"ct": _ct(), "pet": np.log1p(_ct(seed=1) * 5), "mri_scan": torch.randn(1, 20, 24, 22)}
    aug = make_augmentation_d(["ct", "pet", "mri_scan"], {"ct": "ct", "pet": "pet", "mri_scan": "mri"},
                              prob=1.0, seed=0, allow_missing_keys=True)
    out = aug(x)
    assert set(out) == set(x)
    assert isinstance(out["mri_scan"], torch.Tensor) and out["pet"].shape == x["pet"].shape
    partial = aug({"ct": _ct()})  # a patient without PET and MR
    assert set(partial) == {"ct"}
    strict = make_augmentation_d(["ct", "pet"], prob=1.0)
    with pytest.raises(KeyError, match="pet"):
        strict({"ct": _ct()})
    a = make_augmentation_d(["ct", "pet"], prob=0.5, seed=9, share_spatial=True)
    b = make_augmentation_d(["ct", "pet"], prob=0.5, seed=9, share_spatial=True)
    sample = {"ct": _ct(), "pet": _ct(seed=2)}
    for _ in range(2):
        ra, rb = a(sample), b(sample)
        np.testing.assert_array_equal(ra["ct"], rb["ct"])
        np.testing.assert_array_equal(ra["pet"], rb["pet"])
    with pytest.raises(ValueError, match="modality"):
        make_augmentation("xray")
    with pytest.raises(ValueError, match="prob"):
        make_augmentation("ct", prob=1.5)
    with pytest.raises(ValueError, match="modality_by_key"):
        make_augmentation_d(["scan"])
    with pytest.raises(ValueError, match="mask_keys"):
        make_augmentation_d(["ct"], mask_keys=["pet_mask"])
    with pytest.raises(ValueError, match=r"\(C, D, H, W\)"):
        make_augmentation("ct", prob=1.0)(np.zeros((8, 8, 8), np.float32))
