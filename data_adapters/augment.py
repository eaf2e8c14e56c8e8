"""Training-time augmentation of preprocessed volumes, physically plausible, through MONAI.

:func:`make_augmentation` builds the transform for one modality's array
``(C, D, H, W)`` (numpy or torch; the same type, shape and dtype come back);
:func:`make_augmentation_d` is its dictionary twin (MONAI convention: ``keys``,
``allow_missing_keys``) for a sample dict holding several modalities and
their ROI masks.  Augmentation is for training only: the evaluation path
simply does not call it (and ``prob=0`` is the identity, bit for bit).

The inputs are the outputs of :func:`data_adapters.imaging.preprocess`: CT
windowed HU scaled to [0, 1], PET ``log1p(SUV)`` (or clipped SUV / pet_clip),
MR z-scored.  Every transform is applied independently with probability
``prob`` and mimics a real source of variation:

Geometry (all modalities)
    * ``RandAffine``: rotation up to +/-10 degrees about each axis, isotropic
      per-axis scale 0.9-1.1 (patient positioning, body size), bilinear
      interpolation, ``border`` padding (a crop's surroundings continue the
      edge tissue instead of inventing air, and MR's 0 is mean tissue, not
      background).
    * ``Rand3DElastic``: smooth deformation (Gaussian-smoothed random field,
      sigma 6-8 voxels, magnitude 100-200: mean displacements of 0.7-1.7
      voxels, at most ~3.5), i.e. breathing / soft-tissue deformation.  It is
      the costly transform on a CPU (MONAI smooths a full-resolution random
      field: ~0.25 s for a 24^3 volume); ``elastic=False`` leaves it out.

CT
    ``RandGaussianNoise`` on the [0, 1]-scaled HU with a standard deviation
    drawn from [0, 0.02] (10 HU for a 500 HU window), then clipped back to
    [0, 1].  Quantum noise is Poisson in the projections; after filtered
    back-projection each voxel sums many rays, so the image noise is close
    to Gaussian in HU ("Poisson-Gaussian-like").  The clipping reproduces the
    window saturation a noisy scan would have.

MR
    ``RandBiasField`` (smooth multiplicative coil sensitivity, polynomial
    degree 3, coefficients in [0, 0.1]) and ``RandRicianNoise`` (magnitude of
    complex Gaussian noise, std up to 5 % of the image std).  Both act on
    *magnitude* images, which are >= 0 with background ~0, so they are
    applied to the z-scored image shifted by its per-channel minimum
    (background -> 0) and shifted back: z-scoring is affine, so this is the
    magnitude image up to a scale.

PET
    ``RandScaleIntensity``: one global factor in [0.9, 1.1] on the SUV
    (calibration, weight and dose-assay errors), applied in the SUV domain:
    ``log1p((1 + f) * expm1(x))`` for ``pet_compression="log"``,
    ``clip((1 + f) x, 0, 1)`` for ``"clip"``.

Masks (dict twin) follow their image's geometric transforms with nearest
interpolation and zero padding; intensity transforms never touch them.

Reproducibility: ``seed`` seeds the whole pipeline (MONAI
``set_random_state``); two pipelines with the same seed give the same
sequence of outputs.  Each call draws new parameters.  Not thread-safe:
give each DataLoader worker its own pipeline (or seed it with the worker id).
"""
from __future__ import annotations

import math
from typing import Any, Callable, Mapping, Sequence, TypeVar

import numpy as np
import torch
from monai.transforms import (
    Compose,
    MapTransform,
    Rand3DElastic,
    Rand3DElasticd,
    RandAffine,
    RandAffined,
    RandBiasField,
    RandGaussianNoise,
    Randomizable,
    RandomizableTransform,
    RandRicianNoise,
    RandScaleIntensity,
)
from monai.utils import MAX_SEED

__all__ = [
    "AFFINE_ROTATION_DEG",
    "AFFINE_SCALE",
    "Augmentation",
    "AugmentationD",
    "make_augmentation",
    "make_augmentation_d",
]

ArrayT = TypeVar("ArrayT", np.ndarray, torch.Tensor)

#: Maximum rotation about each axis (degrees).
AFFINE_ROTATION_DEG = 10.0
#: Maximum relative scale change per axis.
AFFINE_SCALE = 0.10
ELASTIC_SIGMA = (6.0, 8.0)
ELASTIC_MAGNITUDE = (100.0, 200.0)
CT_NOISE_STD = 0.02
MR_RICIAN_STD = 0.05
MR_BIAS_COEFF = (0.0, 0.1)
PET_SCALE = 0.10

_MODALITIES = {"ct": "ct", "pet": "pet", "pt": "pet", "mri": "mri", "mr": "mri"}
_PET_COMPRESSIONS = ("log", "clip", "none")


def _modality(modality: str, name: str = "modality") -> str:
    key = str(modality).strip().lower()
    if key not in _MODALITIES:
        raise ValueError(f"{name} must be one of ct, pet, mri; got {modality!r}")
    return _MODALITIES[key]


def _check_common(prob: float, pet_compression: str) -> None:
    if not (isinstance(prob, (int, float)) and 0.0 <= float(prob) <= 1.0):
        raise ValueError(f"prob must be in [0, 1], got {prob!r}")
    if pet_compression not in _PET_COMPRESSIONS:
        raise ValueError(f"pet_compression must be one of {_PET_COMPRESSIONS}, got {pet_compression!r}")


def _plain(t: Any) -> torch.Tensor:
    """A plain tensor (MONAI returns MetaTensor)."""
    if hasattr(t, "as_tensor"):
        return t.as_tensor()
    return torch.as_tensor(t)


class _InDomain(RandomizableTransform):
    """Apply a MONAI transform (``prob=1``) with probability ``prob`` in another intensity domain.

    ``to_domain(x) -> (x', ctx)`` and ``from_domain(y', ctx) -> y`` map to the
    domain where the physics is defined (e.g. SUV from log1p(SUV)); when the
    transform is not drawn the input is returned untouched.
    """

    def __init__(
        self,
        inner: Callable[[torch.Tensor], Any],
        prob: float,
        to_domain: Callable[[torch.Tensor], tuple[torch.Tensor, Any]] | None = None,
        from_domain: Callable[[torch.Tensor, Any], torch.Tensor] | None = None,
    ) -> None:
        RandomizableTransform.__init__(self, prob)
        self.inner = inner
        self.to_domain = to_domain or (lambda x: (x, None))
        self.from_domain = from_domain or (lambda y, ctx: y)

    def set_random_state(self, seed: int | None = None, state: np.random.RandomState | None = None) -> _InDomain:
        super().set_random_state(seed=seed, state=state)
        if isinstance(self.inner, Randomizable):
            self.inner.set_random_state(seed=int(self.R.randint(MAX_SEED, dtype="uint32")))
        return self

    def __call__(self, img: torch.Tensor, randomize: bool = True) -> torch.Tensor:
        if randomize:
            self.randomize(None)
        if not self._do_transform:
            return img
        x, ctx = self.to_domain(_plain(img))
        return self.from_domain(_plain(self.inner(x)), ctx)


def _shift_to_zero(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    m = x.reshape(x.shape[0], -1).amin(dim=1).reshape(-1, *([1] * (x.ndim - 1)))
    return x - m, m


def _shift_back(y: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    return y + m


def _clamp01(y: torch.Tensor, _ctx: Any = None) -> torch.Tensor:
    return y.clamp(0.0, 1.0)


def _intensity_transforms(modality: str, prob: float, pet_compression: str) -> list[Callable]:
    """The intensity transforms of one modality (each with probability ``prob``)."""
    if modality == "ct":
        noise = RandGaussianNoise(prob=1.0, mean=0.0, std=CT_NOISE_STD, sample_std=True)
        return [_InDomain(noise, prob, from_domain=_clamp01)]
    if modality == "mri":
        bias = RandBiasField(degree=3, coeff_range=MR_BIAS_COEFF, prob=1.0)
        rician = RandRicianNoise(prob=1.0, std=MR_RICIAN_STD, relative=True, channel_wise=True, sample_std=True)
        return [_InDomain(bias, prob, _shift_to_zero, _shift_back),
                _InDomain(rician, prob, _shift_to_zero, _shift_back)]
    scale = RandScaleIntensity(factors=PET_SCALE, prob=1.0)
    if pet_compression == "log":
        return [_InDomain(scale, prob, lambda x: (torch.expm1(x.clamp_min(0.0)), None),
                          lambda y, _ctx: torch.log1p(y.clamp_min(0.0)))]
    if pet_compression == "clip":
        return [_InDomain(scale, prob, from_domain=_clamp01)]
    return [_InDomain(scale, prob)]


def _affine_kwargs(prob: float) -> dict[str, Any]:
    rot = math.radians(AFFINE_ROTATION_DEG)
    return {"prob": prob, "rotate_range": (rot, rot, rot), "scale_range": (AFFINE_SCALE,) * 3}


def _elastic_kwargs(prob: float) -> dict[str, Any]:
    return {"prob": prob, "sigma_range": ELASTIC_SIGMA, "magnitude_range": ELASTIC_MAGNITUDE}


def _to_tensor(x: Any, name: str) -> tuple[torch.Tensor, Callable[[torch.Tensor], Any]]:
    """Float tensor of a (C, D, H, W) array and the function restoring the input's type and dtype."""
    if isinstance(x, np.ndarray):
        dtype = x.dtype
        t = torch.from_numpy(np.ascontiguousarray(x))

        def back(y: torch.Tensor) -> Any:
            y = _plain(y)
            if dtype == np.bool_:
                return (y > 0.5).numpy()
            return y.numpy().astype(dtype, copy=False)
    elif isinstance(x, torch.Tensor):
        t = _plain(x)
        dtype_t, device = t.dtype, t.device

        def back(y: torch.Tensor) -> Any:
            y = _plain(y)
            if dtype_t == torch.bool:
                return (y > 0.5).to(device)
            return y.to(device=device, dtype=dtype_t)
    else:
        raise TypeError(f"{name}: expected a numpy array or torch tensor, got {type(x).__name__}")
    if t.ndim != 4:
        raise ValueError(f"{name}: expected shape (C, D, H, W), got {tuple(t.shape)}")
    if not torch.is_floating_point(t):
        t = t.float()
    elif t.dtype == torch.float64:
        t = t.float()
    return t.detach().cpu(), back


class Augmentation:
    """Callable ``(C, D, H, W) -> (C, D, H, W)`` augmentation of one modality.

    Built by :func:`make_augmentation`.  ``transform`` is the MONAI
    ``Compose``; ``set_random_state(seed)`` re-seeds it.
    """

    def __init__(self, modality: str, transform: Compose, prob: float) -> None:
        self.modality = modality
        self.transform = transform
        self.prob = prob

    def set_random_state(self, seed: int | None = None) -> Augmentation:
        self.transform.set_random_state(seed=seed)
        return self

    def __call__(self, x: ArrayT) -> ArrayT:
        """Augment one sample; the output has the input's type, shape, dtype and device."""
        if self.prob == 0.0:
            return x
        t, back = _to_tensor(x, "x")
        return back(self.transform(t))

    def __repr__(self) -> str:
        names = ", ".join(type(t).__name__ for t in self.transform.transforms)
        return f"Augmentation(modality={self.modality!r}, prob={self.prob}, transforms=[{names}])"


def make_augmentation(
    modality: str,
    *,
    prob: float = 0.5,
    seed: int | None = None,
    pet_compression: str = "log",
    elastic: bool = True,
) -> Augmentation:
    """Training augmentation for one modality's preprocessed array.

    Parameters
    ----------
    modality
        ``"ct"``, ``"pet"`` or ``"mri"`` (``"pt"``, ``"mr"`` accepted).
    prob
        Probability with which each transform is applied (independently).
        0 gives the identity.
    seed
        Seeds the pipeline (reproducible sequence of draws); None = MONAI's
        default global-state seeding.
    pet_compression
        How the PET array was compressed by preprocessing (``"log"``,
        ``"clip"``, or ``"none"`` for linear SUV), so that the intensity scale
        is applied to the SUV.
    elastic
        Include the smooth elastic deformation (the slowest transform).

    Returns
    -------
    Augmentation
        Callable on float ``(C, D, H, W)`` numpy arrays or tensors, returning
        the same type, shape and dtype.  See the module docstring for the
        transforms and their physical rationale.
    """
    mod = _modality(modality)
    _check_common(prob, pet_compression)
    prob = float(prob)
    transforms: list[Callable] = [RandAffine(mode="bilinear", padding_mode="border", **_affine_kwargs(prob))]
    if elastic:
        transforms.append(Rand3DElastic(mode="bilinear", padding_mode="border", **_elastic_kwargs(prob)))
    transforms += _intensity_transforms(mod, prob, pet_compression)
    compose = Compose(transforms)
    if seed is not None:
        compose.set_random_state(seed=int(seed))
    return Augmentation(mod, compose, prob)


class _PerKey(Randomizable, MapTransform):
    """Apply one array transform per key (its own random draws per key)."""

    def __init__(self, transforms: Mapping[str, Callable], allow_missing_keys: bool = False) -> None:
        MapTransform.__init__(self, list(transforms), allow_missing_keys)
        self.transforms = dict(transforms)

    def set_random_state(self, seed: int | None = None, state: np.random.RandomState | None = None) -> _PerKey:
        super().set_random_state(seed=seed, state=state)
        for key in sorted(self.transforms):
            t = self.transforms[key]
            if isinstance(t, Randomizable):
                t.set_random_state(seed=int(self.R.randint(MAX_SEED, dtype="uint32")))
        return self

    def randomize(self, data: Any = None) -> None:  # each inner transform draws when called
        return None

    def __call__(self, data: Mapping[str, Any]) -> dict[str, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self.transforms[key](d[key])
        return d


class AugmentationD:
    """Callable ``dict -> dict`` augmentation built by :func:`make_augmentation_d`."""

    def __init__(self, keys: list[str], mask_keys: dict[str, str], transform: Compose, prob: float,
                 allow_missing_keys: bool) -> None:
        self.keys = keys
        self.mask_keys = mask_keys
        self.transform = transform
        self.prob = prob
        self.allow_missing_keys = allow_missing_keys

    def set_random_state(self, seed: int | None = None) -> AugmentationD:
        self.transform.set_random_state(seed=seed)
        return self

    def __call__(self, data: Mapping[str, Any]) -> dict[str, Any]:
        """Augment the image and mask keys of one sample; other keys pass through unchanged."""
        if not isinstance(data, Mapping):
            raise TypeError(f"data: expected a mapping, got {type(data).__name__}")
        out = dict(data)
        backs: dict[str, Callable] = {}
        for key in [*self.keys, *self.mask_keys]:
            if key not in out:
                if not self.allow_missing_keys:
                    raise KeyError(f"key {key!r} is missing from the sample (allow_missing_keys=False)")
                continue
            t, back = _to_tensor(out[key], key)
            out[key], backs[key] = t, back
        if self.prob == 0.0:
            return dict(data)
        out = self.transform(out)
        for key, back in backs.items():
            out[key] = back(out[key])
        return out


def make_augmentation_d(
    keys: Sequence[str],
    modality_by_key: Mapping[str, str] | None = None,
    *,
    mask_keys: Sequence[str] | Mapping[str, str] = (),
    prob: float = 0.5,
    seed: int | None = None,
    pet_compression: str = "log",
    share_spatial: bool = False,
    elastic: bool = True,
    allow_missing_keys: bool = False,
) -> AugmentationD:
    """Dictionary twin of :func:`make_augmentation` (MONAI ``keys`` / ``allow_missing_keys`` convention).

    Parameters
    ----------
    keys
        Image keys of the sample dict, each a ``(C, D, H, W)`` array/tensor.
    modality_by_key
        Modality of each image key; None uses the key itself (the batch keys
        ``ct``, ``pet``, ``mri`` of the data contract).
    mask_keys
        ROI masks that follow an image's geometry (nearest interpolation,
        zero padding, no intensity change): a mapping ``mask_key -> image
        key`` or a sequence of ``<image key>_mask`` names.
    prob, seed, pet_compression
        As in :func:`make_augmentation`.
    share_spatial
        False (default): each image (with its masks) gets its own random
        affine/elastic draw, as modalities are cropped independently.  True:
        one draw for all keys (co-registered inputs of one shape, e.g. PET/CT).
    elastic
        Include the smooth elastic deformation.
    allow_missing_keys
        Skip keys absent from a sample (a patient lacking a modality) instead
        of raising ``KeyError``.

    Returns
    -------
    AugmentationD
        ``dict -> dict``; each augmented value keeps its type and dtype
        (bool masks stay bool).
    """
    _check_common(prob, pet_compression)
    prob = float(prob)
    if isinstance(keys, str) or not keys:
        raise ValueError(f"keys must be a non-empty sequence of key names, got {keys!r}")
    keys = list(keys)
    if len(set(keys)) != len(keys):
        raise ValueError(f"keys must be unique, got {keys}")
    mods: dict[str, str] = {}
    for key in keys:
        if modality_by_key is None:
            mods[key] = _modality(key, "modality_by_key")
        elif key not in modality_by_key:
            raise ValueError(f"modality_by_key has no modality for key {key!r}")
        else:
            mods[key] = _modality(modality_by_key[key], "modality_by_key")
    if isinstance(mask_keys, Mapping):
        masks = {str(k): str(v) for k, v in mask_keys.items()}
    else:
        masks = {}
        for m in mask_keys:
            if not str(m).endswith("_mask"):
                raise ValueError(f"mask_keys: cannot infer the image of {m!r}; pass a mapping mask_key -> image key")
            masks[str(m)] = str(m)[: -len("_mask")]
    for m, img in masks.items():
        if img not in keys:
            raise ValueError(f"mask_keys: mask {m!r} follows {img!r}, which is not in keys {keys}")
        if m in keys:
            raise ValueError(f"mask_keys: {m!r} is also an image key")

    def spatial(group: list[str]) -> list[Callable]:
        modes = ["nearest" if k in masks else "bilinear" for k in group]
        pads = ["zeros" if k in masks else "border" for k in group]
        out: list[Callable] = [RandAffined(keys=group, mode=modes, padding_mode=pads,
                                           allow_missing_keys=allow_missing_keys, **_affine_kwargs(prob))]
        if elastic:
            out.append(Rand3DElasticd(keys=group, mode=modes, padding_mode=pads,
                                      allow_missing_keys=allow_missing_keys, **_elastic_kwargs(prob)))
        return out

    transforms: list[Callable] = []
    if share_spatial:
        transforms += spatial([*keys, *masks])
    else:
        for key in keys:
            transforms += spatial([key, *[m for m, img in masks.items() if img == key]])
    per_key = {key: Compose(_intensity_transforms(mods[key], prob, pet_compression)) for key in keys}
    transforms.append(_PerKey(per_key, allow_missing_keys=allow_missing_keys))
    compose = Compose(transforms)
    if seed is not None:
        compose.set_random_state(seed=int(seed))
    return AugmentationD(keys, masks, compose, prob, allow_missing_keys)
