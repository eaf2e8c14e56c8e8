"""3D image encoders and their shared machinery (pretrained weights, 2D->3D inflation).

Built from MONAI's layer factories (``Conv``, ``Norm``, ``Act``, ``Pool``) as
MONAI's own networks are, so the same code runs in 2D or 3D and a user can
swap normalisation or activation by name.  More encoders (ResNets, DenseNet,
Swin, 2D-slice and 2.5D models) live in :mod:`encoders.image_monai`.

Every image encoder has the class attributes

* ``example_input_size`` (D, H, W): a size it supports, used by the
  contract test and the benchmark (architectures that downsample 32x need 32^3);
* ``example_kwargs``: small widths for fast smoke tests;
* ``supports_channels_last_3d``: whether it is a pure convolutional network
  that benefits from ``torch.channels_last_3d`` memory format (set by the
  trainer on CUDA, with mixed precision).

Pretrained weights
------------------
``pretrained_path`` loads a user-supplied state dict (``torch.load(...,
weights_only=True)``; a checkpoint dict holding ``state_dict``/``model`` is
unwrapped; ``module.`` and ``_orig_mod.`` prefixes are stripped) with
``strict=False`` through :func:`load_pretrained`, which returns and logs a
:class:`PretrainedReport` (loaded, inflated, missing, unexpected and
shape-mismatched keys; also kept as ``encoder.pretrained_report``).  2D
convolution kernels ``(O, I, kh, kw)`` loaded into 3D convolutions are
*inflated* I3D-style (Carreira & Zisserman, "Quo Vadis, Action Recognition?
A New Model and the Kinetics Dataset", CVPR 2017): repeated ``kd`` times
along depth and divided by ``kd``, so that a volume that is constant along
z gives exactly the 2D response on every (interior) slice.  A first
convolution trained on 3-channel (RGB) images loaded into a 1-channel
encoder has its input channels summed (a grey image replicated to RGB gives
the same response).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from numbers import Integral
from pathlib import Path
from typing import Any, Callable, ClassVar, Mapping, Sequence

import torch
from monai.networks.layers.factories import Act, Conv, Norm, Pool
from torch import nn

from encoders.registry import register_encoder

__all__ = [
    "PretrainedReport",
    "SmallCNN3D",
    "first_kernel_tuple",
    "inflate_2d_to_3d",
    "load_pretrained",
]

logger = logging.getLogger(__name__)

_PREFIXES = ("module.", "_orig_mod.")


# --------------------------------------------------------------------------- #
# Shared helpers
# --------------------------------------------------------------------------- #
def check_common_args(spatial_dims: int, in_channels: int, out_dim: int, *,
                      allowed_dims: Sequence[int] = (2, 3)) -> None:
    """ValueErrors naming ``spatial_dims``, ``in_channels`` or ``out_dim``."""
    if spatial_dims not in tuple(allowed_dims):
        allowed = " or ".join(str(d) for d in allowed_dims)
        raise ValueError(f"spatial_dims must be {allowed}, got {spatial_dims}")
    if not isinstance(in_channels, Integral) or in_channels < 1:
        raise ValueError(f"in_channels must be an int >= 1, got {in_channels}")
    if not isinstance(out_dim, Integral) or out_dim < 1:
        raise ValueError(f"out_dim must be an int >= 1, got {out_dim}")


def check_dropout(dropout: float, name: str = "dropout") -> None:
    if not 0.0 <= float(dropout) < 1.0:
        raise ValueError(f"{name} must be in [0, 1), got {dropout}")


def first_kernel_tuple(first_kernel: int | Sequence[int], spatial_dims: int,
                       name: str = "first_kernel") -> tuple[int, ...]:
    """Validate an (an)isotropic kernel size: odd positive ints, one per spatial dim.

    Order is the tensor's spatial order ``(D, H, W)``: ``(1, 3, 3)`` is an
    in-plane kernel for thick axial slices, ``(3, 3, 1)`` one that spares W.
    """
    if isinstance(first_kernel, Integral):
        ks = (first_kernel,) * spatial_dims
    else:
        ks = tuple(first_kernel)
    if all(isinstance(k, Integral) for k in ks):
        ks = tuple(int(k) for k in ks)
    if len(ks) != spatial_dims or any(not isinstance(k, Integral) or k < 1 or k % 2 == 0 for k in ks):
        raise ValueError(f"{name} must be an odd positive int or {spatial_dims} of them, got {first_kernel!r}")
    return ks


def inflate_2d_to_3d(weight: torch.Tensor, depth: int) -> torch.Tensor:
    """Inflate a 2D convolution kernel to 3D (I3D).

    Parameters
    ----------
    weight
        ``(O, I, kh, kw)``.
    depth
        Kernel depth ``kd`` of the 3D convolution.

    Returns
    -------
    torch.Tensor
        ``(O, I, kd, kh, kw)`` = the 2D kernel repeated ``kd`` times along
        depth, divided by ``kd``: for an input constant along depth the 3D
        convolution equals the 2D one.
    """
    if weight.ndim != 4:
        raise ValueError(f"weight must be a 2D kernel (O, I, kh, kw), got shape {tuple(weight.shape)}")
    if depth < 1:
        raise ValueError(f"depth must be >= 1, got {depth}")
    return weight.unsqueeze(2).repeat(1, 1, depth, 1, 1) / depth


@dataclass
class PretrainedReport:
    """What :func:`load_pretrained` did.

    Attributes
    ----------
    path
        The file loaded.
    target
        The sub-module the weights were loaded into (``""`` = the encoder itself).
    loaded
        Keys loaded (after inflation/adaptation).
    inflated
        2D kernels inflated to 3D.
    adapted_in_channels
        First-layer kernels whose input channels were summed (e.g. RGB -> 1).
    missing
        Parameters/buffers of the target left at their initial values.
    unexpected
        Keys of the file with no counterpart in the target.
    mismatched
        ``(key, file shape, target shape)`` not loaded because the shapes differ.
    """

    path: str
    target: str = ""
    loaded: list[str] = field(default_factory=list)
    inflated: list[str] = field(default_factory=list)
    adapted_in_channels: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    mismatched: list[tuple[str, tuple[int, ...], tuple[int, ...]]] = field(default_factory=list)

    def summary(self) -> str:
        """One line for logs."""
        return (f"pretrained weights {Path(self.path).name} -> {self.target or 'encoder'}: "
                f"{len(self.loaded)} loaded ({len(self.inflated)} inflated 2D->3D, "
                f"{len(self.adapted_in_channels)} input-channel adapted), {len(self.missing)} missing, "
                f"{len(self.unexpected)} unexpected, {len(self.mismatched)} shape-mismatched")


def _unwrap_state(obj: Any, path: str) -> dict[str, torch.Tensor]:
    if isinstance(obj, Mapping):
        for key in ("state_dict", "model_state_dict", "model", "net", "module"):
            inner = obj.get(key)
            if isinstance(inner, Mapping) and inner and all(isinstance(v, torch.Tensor) for v in inner.values()):
                obj = inner
                break
    if not isinstance(obj, Mapping) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                               for k, v in obj.items()):
        raise ValueError(f"pretrained_path: {path} does not hold a state dict (str -> Tensor)")
    out = {}
    for k, v in obj.items():
        for prefix in _PREFIXES:
            while k.startswith(prefix):
                k = k[len(prefix):]
        out[k] = v
    return out


def load_pretrained(
    module: nn.Module,
    path: str | Path,
    *,
    targets: Sequence[str] = (),
    remap: Callable[[str], str] | None = None,
) -> PretrainedReport:
    """Load a user-supplied state dict into ``module`` (or one of its sub-modules), ``strict=False``.

    Parameters
    ----------
    module
        The encoder.
    path
        A file written by ``torch.save(state_dict)`` (or a checkpoint dict
        holding one); loaded with ``weights_only=True``.
    targets
        Names of sub-modules that may be what the file describes (e.g.
        ``"backbone"`` for a bare MONAI ResNet state dict); the candidate
        (the module itself or one of these) matching the most keys is used.
    remap
        Optional key renaming applied first (e.g. torchvision -> MONAI names).

    Returns
    -------
    PretrainedReport
        Also logged at INFO level.

    Raises
    ------
    ValueError
        Unreadable file, not a state dict, or no key matching the module.
    """
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"pretrained_path: file not found: {p}")
    try:
        raw = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - pickle/zip errors of many types
        raise ValueError(f"pretrained_path: cannot load {p} with weights_only=True "
                         f"({type(exc).__name__}: {exc})") from None
    state = _unwrap_state(raw, str(p))
    if remap is not None:
        state = {remap(k): v for k, v in state.items()}

    candidates = [("", module)] + [(t, getattr(module, t)) for t in targets
                                    if isinstance(getattr(module, t, None), nn.Module)]
    scored = []
    for cand_name, cand in candidates:
        keys = set(cand.state_dict())
        scored.append((sum(k in keys for k in state), cand_name, cand))
    best = max(s[0] for s in scored)
    _, name, target = next(s for s in scored if s[0] == best)  # ties: the encoder itself
    own = target.state_dict()
    report = PretrainedReport(path=str(p), target=name)
    new: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if key not in own:
            report.unexpected.append(key)
            continue
        want = own[key]
        v = value
        if v.ndim == 4 and want.ndim == 5 and tuple(v.shape[2:]) == tuple(want.shape[3:]):
            v = inflate_2d_to_3d(v, int(want.shape[2]))
            report.inflated.append(key)
        if (v.ndim == want.ndim and v.ndim >= 3 and v.shape[0] == want.shape[0] and want.shape[1] == 1
                and v.shape[1] > 1 and tuple(v.shape[2:]) == tuple(want.shape[2:])):
            v = v.sum(dim=1, keepdim=True)
            report.adapted_in_channels.append(key)
        if tuple(v.shape) != tuple(want.shape):
            report.mismatched.append((key, tuple(value.shape), tuple(want.shape)))
            continue
        new[key] = v.to(dtype=want.dtype)
    if not new:
        raise ValueError(f"pretrained_path: no key of {p.name} matches the encoder "
                         f"(file keys e.g. {sorted(state)[:3]}, encoder keys e.g. {sorted(own)[:3]})")
    result = target.load_state_dict(new, strict=False)
    report.loaded = sorted(new)
    report.missing = sorted(result.missing_keys)
    report.unexpected = sorted(set(report.unexpected) | set(result.unexpected_keys))
    logger.info(report.summary())
    return report


class ImageEncoderBase(nn.Module):
    """Shared contract of the image encoders (see the module docstring)."""

    example_input_size: ClassVar[tuple[int, int, int]] = (16, 16, 16)
    example_kwargs: ClassVar[dict[str, Any]] = {}
    supports_channels_last_3d: ClassVar[bool] = False
    #: Sub-modules a bare pretrained state dict may describe.
    _pretrained_targets: ClassVar[tuple[str, ...]] = ()

    out_dim: int
    feature_dim: int
    pretrained_report: PretrainedReport | None

    def _remap_pretrained_key(self, key: str) -> str:
        return key

    def load_pretrained(self, path: str | Path) -> PretrainedReport:
        """Load user weights (see :func:`load_pretrained`); stores and returns the report."""
        self.pretrained_report = load_pretrained(self, path, targets=self._pretrained_targets,
                                                 remap=self._remap_pretrained_key)
        return self.pretrained_report

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, C, D, H, W)`` -> ``(B, out_dim)``."""
        return self.head(self.forward_features(x))


# --------------------------------------------------------------------------- #
# Small CNN
# --------------------------------------------------------------------------- #
@register_encoder("cnn3d_small", family="image3d")
class SmallCNN3D(ImageEncoderBase):
    """A small CNN for CPU-sized volumes (e.g. 24^3 voxels at 2 mm).

    Each stage is conv(3) -> norm -> act -> conv(3) -> norm -> act -> max-pool(2).
    The last feature map is summarised by global average *and* global max
    pooling (so both the extent of a finding and its peak intensity survive,
    e.g. lesion volume on CT and SUVmax on PET), then projected to ``out_dim``.
    Supports ``channels_last_3d``.

    Parameters
    ----------
    spatial_dims
        2 or 3.
    in_channels
        Input channels C of ``(B, C, D, H, W)``.
    out_dim
        Feature size returned by ``forward``.
    channels
        Channels of each stage; len(channels) stages, each halving the size.
    norm, act
        MONAI factory names, e.g. ``"batch"``, ``"instance"``; ``"relu"``, ``"prelu"``.
    dropout
        Dropout before the final projection.
    first_kernel
        Kernel of the very first convolution, an odd int or one per spatial
        dim in (D, H, W) order: ``(1, 3, 3)`` for thick-slice (anisotropic)
        volumes, ``(3, 3, 1)`` etc.
    pretrained_path
        Optional state dict to load (2D kernels are inflated, see the module
        docstring); the report is kept in ``pretrained_report``.
    """

    example_input_size = (16, 16, 16)
    supports_channels_last_3d = True

    def __init__(
        self,
        spatial_dims: int,
        in_channels: int,
        out_dim: int,
        *,
        channels: Sequence[int] = (8, 16, 32),
        norm: str = "batch",
        act: str = "relu",
        dropout: float = 0.0,
        first_kernel: int | Sequence[int] = 3,
        pretrained_path: str | None = None,
    ) -> None:
        super().__init__()
        check_common_args(spatial_dims, in_channels, out_dim)
        if not channels or any(not isinstance(c, Integral) or c < 1 for c in channels):
            raise ValueError(f"channels must be a non-empty sequence of positive ints, got {channels}")
        check_dropout(dropout)
        first = first_kernel_tuple(first_kernel, spatial_dims)
        conv_t = Conv[Conv.CONV, spatial_dims]
        norm_t = Norm[norm, spatial_dims]
        act_t = Act[act]
        pool_t = Pool[Pool.MAX, spatial_dims]
        layers: list[nn.Module] = []
        c_in = in_channels
        for i, c in enumerate(channels):
            k0 = first if i == 0 else 3
            p0 = tuple(k // 2 for k in first) if i == 0 else 1
            layers += [
                conv_t(c_in, c, kernel_size=k0, padding=p0, bias=False), norm_t(c), act_t(),
                conv_t(c, c, kernel_size=3, padding=1, bias=False), norm_t(c), act_t(),
                pool_t(kernel_size=2, ceil_mode=True),
            ]
            c_in = c
        self.features = nn.Sequential(*layers)
        self.avg = Pool[Pool.ADAPTIVEAVG, spatial_dims](1)
        self.max = Pool[Pool.ADAPTIVEMAX, spatial_dims](1)
        self.head = nn.Sequential(nn.Dropout(dropout), nn.Linear(2 * c_in, out_dim))
        self.spatial_dims = spatial_dims
        self.in_channels = in_channels
        self.out_dim = out_dim
        self.feature_dim = 2 * c_in
        self.pretrained_report = None
        if pretrained_path is not None:
            self.load_pretrained(pretrained_path)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled features ``(B, 2 * channels[-1])`` before the projection."""
        f = self.features(x)
        return torch.cat([self.avg(f).flatten(1), self.max(f).flatten(1)], dim=1)

