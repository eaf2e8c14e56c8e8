"""Image encoders built on MONAI networks: ResNets, DenseNet-121, Swin ViT, 2D-slice and 2.5D CNNs.

All follow the image contract of :mod:`encoders.image`: constructor
``(spatial_dims, in_channels, out_dim, *, ...)``, ``out_dim``,
``forward(x) -> (B, out_dim)``, ``forward_features(x) -> (B, feature_dim)``
(pooled features without the head), ``pretrained_path`` (user state dict,
``strict=False``, report in ``pretrained_report``, 2D kernels inflated to
3D), and the class attributes ``example_input_size`` / ``example_kwargs`` /
``supports_channels_last_3d``.

Registered names (backbone; ``example_input_size``; ``channels_last_3d`` support):

* ``resnet10``, ``resnet18``, ``resnet34``, ``resnet50``: MONAI ``ResNet``; 16^3; yes.
* ``densenet121``: MONAI ``DenseNet121``; 32^3 (each size >= 32); yes.
* ``swin_vit``: SwinUNETR's ``swinViT``; 32^3 (each size a multiple of 32); no.
* ``slice2d``: a 2D CNN per axial slice + attention pooling along z; 16^3; no.
* ``cnn25d``: a 2D CNN on three orthogonal central slabs; 16^3; no.

``channels_last_3d`` (NDHWC) helps the pure convolutional networks under
CUDA mixed precision (cuDNN channels-last kernels); for ``swin_vit`` the
input is immediately patch-embedded and permuted to tokens, and ``slice2d``
/ ``cnn25d`` reshape volumes into batches of 2D images, so the format buys
nothing there (they still accept such inputs).
"""
from __future__ import annotations

import re
from numbers import Integral
from typing import Any, ClassVar, Sequence

import torch
from monai.networks.layers.factories import Act, Conv, Norm, Pool
from monai.networks.nets import DenseNet121
from monai.networks.nets.resnet import ResNet, resnet_params
from torch import nn

from encoders.image import (
    ImageEncoderBase,
    check_common_args,
    check_dropout,
    first_kernel_tuple,
)
from encoders.registry import register_encoder

__all__ = [
    "CNN25DEncoder",
    "DenseNet121Encoder",
    "ResNet10Encoder",
    "ResNet18Encoder",
    "ResNet34Encoder",
    "ResNet50Encoder",
    "Slice2DEncoder",
    "SwinViTEncoder",
]


def _head(in_features: int, out_dim: int, dropout: float) -> nn.Sequential:
    return nn.Sequential(nn.Dropout(dropout), nn.Linear(in_features, out_dim))


# --------------------------------------------------------------------------- #
# ResNets
# --------------------------------------------------------------------------- #
class _ResNetEncoder(ImageEncoderBase):
    """MONAI ResNet (Hara et al., "Can Spatiotemporal 3D CNNs Retrace the History of 2D CNNs and
    ImageNet?", CVPR 2018; MedicalNet layouts) without its classifier, plus a linear head.

    Depth-specific block, layers, shortcut and downsample-bias follow
    ``monai.networks.nets.resnet.resnet_params`` so MedicalNet / MONAI
    state dicts load unchanged (``pretrained_path``), 2D ImageNet ResNet
    kernels are inflated.  ``forward_features`` is the global-average-pooled
    output of ``layer4`` (``feed_forward=False``).

    Parameters
    ----------
    spatial_dims
        2 or 3.
    in_channels
        Input channels C.
    out_dim
        Output size of ``forward``.
    first_kernel
        Kernel of ``conv1`` (default 7), odd int or one per dim in (D, H, W)
        order, e.g. ``(1, 7, 7)`` or ``(3, 7, 7)`` for thick axial slices.
    first_stride
        Stride of ``conv1`` (default 2), int or per dim, e.g. ``(1, 2, 2)``
        to keep few slices.
    no_max_pool
        Skip the stem's max-pool (for small inputs).
    widen_factor
        Multiplies the stage widths (64, 128, 256, 512); e.g. 0.25 for CPU.
    shortcut_type
        ``"A"`` (zero-padded identity) or ``"B"`` (1x1 conv); default from
        ``resnet_params`` (MedicalNet: A for 18/34, B for 10/50).
    dropout
        Dropout before the head.
    pretrained_path
        Optional user state dict (of this encoder or of a bare MONAI ResNet).
    """

    _depth: ClassVar[str] = "resnet18"
    example_input_size = (16, 16, 16)
    example_kwargs: ClassVar[dict[str, Any]] = {"widen_factor": 0.125}
    supports_channels_last_3d = True
    _pretrained_targets = ("backbone",)

    def __init__(
        self,
        spatial_dims: int,
        in_channels: int,
        out_dim: int,
        *,
        first_kernel: int | Sequence[int] = 7,
        first_stride: int | Sequence[int] = 2,
        no_max_pool: bool = False,
        widen_factor: float = 1.0,
        shortcut_type: str | None = None,
        dropout: float = 0.0,
        pretrained_path: str | None = None,
    ) -> None:
        super().__init__()
        check_common_args(spatial_dims, in_channels, out_dim)
        check_dropout(dropout)
        kernel = first_kernel_tuple(first_kernel, spatial_dims)
        stride = (first_stride,) * spatial_dims if isinstance(first_stride, int) else tuple(first_stride)
        if len(stride) != spatial_dims or any(not isinstance(s, int) or s < 1 for s in stride):
            raise ValueError(f"first_stride must be a positive int or {spatial_dims} of them, got {first_stride!r}")
        if not float(widen_factor) > 0 or int(64 * float(widen_factor)) < 1:
            raise ValueError(f"widen_factor must be > 0 and keep >= 1 channel, got {widen_factor}")
        block, layers, default_shortcut, bias_downsample, _ = resnet_params[self._depth]
        shortcut = default_shortcut if shortcut_type is None else shortcut_type
        if shortcut not in ("A", "B"):
            raise ValueError(f"shortcut_type must be 'A' or 'B', got {shortcut_type!r}")
        self.backbone = ResNet(
            block=block,
            layers=layers,
            block_inplanes=[64, 128, 256, 512],
            spatial_dims=spatial_dims,
            n_input_channels=in_channels,
            conv1_t_size=kernel,
            conv1_t_stride=stride,
            no_max_pool=no_max_pool,
            shortcut_type=shortcut,
            widen_factor=float(widen_factor),
            feed_forward=False,
            bias_downsample=bias_downsample,
        )
        expansion = 4 if block == "bottleneck" else 1
        self.feature_dim = int(512 * float(widen_factor)) * expansion
        self.head = _head(self.feature_dim, out_dim, dropout)
        self.spatial_dims = spatial_dims
        self.in_channels = in_channels
        self.out_dim = out_dim
        self.pretrained_report = None
        if pretrained_path is not None:
            self.load_pretrained(pretrained_path)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Global-average-pooled ``layer4`` features ``(B, feature_dim)``."""
        return self.backbone(x)


@register_encoder("resnet10", family="image3d")
class ResNet10Encoder(_ResNetEncoder):
    __doc__ = _ResNetEncoder.__doc__
    _depth = "resnet10"


@register_encoder("resnet18", family="image3d")
class ResNet18Encoder(_ResNetEncoder):
    __doc__ = _ResNetEncoder.__doc__
    _depth = "resnet18"


@register_encoder("resnet34", family="image3d")
class ResNet34Encoder(_ResNetEncoder):
    __doc__ = _ResNetEncoder.__doc__
    _depth = "resnet34"


@register_encoder("resnet50", family="image3d")
class ResNet50Encoder(_ResNetEncoder):
    __doc__ = _ResNetEncoder.__doc__
    _depth = "resnet50"


# --------------------------------------------------------------------------- #
# DenseNet-121
# --------------------------------------------------------------------------- #
_TORCHVISION_DENSE = re.compile(r"^(.*denselayer\d+)\.((?:norm|relu|conv)[12])\.(.+)$")


@register_encoder("densenet121", family="image3d")
class DenseNet121Encoder(ImageEncoderBase):
    """MONAI DenseNet-121 features (Huang et al., "Densely Connected Convolutional Networks",
    CVPR 2017) + ReLU + global average pooling, then a linear head.

    The network downsamples 32x (stem conv + pool, three transitions), so each
    spatial size must be >= 32 (``example_input_size`` 32^3).  Torchvision
    2D ImageNet key names (``denselayer1.norm1``) are mapped to MONAI's
    (``denselayer1.layers.norm1``) and their kernels inflated when loaded
    with ``pretrained_path``.

    Parameters
    ----------
    spatial_dims, in_channels, out_dim
        As for every image encoder.
    init_features, growth_rate, block_config, bn_size
        DenseNet widths (defaults: the 121-layer configuration 64, 32,
        (6, 12, 24, 16), 4); smaller ``init_features``/``growth_rate`` for CPU.
    dropout_prob
        Dropout inside dense layers.
    norm, act
        MONAI factory names.
    dropout
        Dropout before the head.
    pretrained_path
        Optional user state dict (this encoder's, or a MONAI/torchvision DenseNet's).
    """

    example_input_size = (32, 32, 32)
    example_kwargs: ClassVar[dict[str, Any]] = {"init_features": 8, "growth_rate": 4, "bn_size": 2}
    supports_channels_last_3d = True
    _pretrained_targets = ("backbone",)

    def __init__(
        self,
        spatial_dims: int,
        in_channels: int,
        out_dim: int,
        *,
        init_features: int = 64,
        growth_rate: int = 32,
        block_config: Sequence[int] = (6, 12, 24, 16),
        bn_size: int = 4,
        dropout_prob: float = 0.0,
        norm: str = "batch",
        act: str = "relu",
        dropout: float = 0.0,
        pretrained_path: str | None = None,
    ) -> None:
        super().__init__()
        check_common_args(spatial_dims, in_channels, out_dim)
        check_dropout(dropout)
        check_dropout(dropout_prob, "dropout_prob")
        for name, value in (("init_features", init_features), ("growth_rate", growth_rate), ("bn_size", bn_size)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if not block_config or any(not isinstance(b, int) or b < 1 for b in block_config):
            raise ValueError(f"block_config must be a non-empty sequence of positive ints, got {block_config!r}")
        self.backbone = DenseNet121(
            spatial_dims=spatial_dims,
            in_channels=in_channels,
            out_channels=1,
            init_features=init_features,
            growth_rate=growth_rate,
            block_config=tuple(block_config),
            bn_size=bn_size,
            dropout_prob=dropout_prob,
            norm=norm,
            act=act,
        )
        self.feature_dim = self.backbone.class_layers.out.in_features
        self.backbone.class_layers.out = nn.Identity()  # features -> relu -> pool -> flatten
        self.min_size = 2 ** (len(block_config) + 1)
        self.head = _head(self.feature_dim, out_dim, dropout)
        self.spatial_dims = spatial_dims
        self.in_channels = in_channels
        self.out_dim = out_dim
        self.pretrained_report = None
        if pretrained_path is not None:
            self.load_pretrained(pretrained_path)

    def _remap_pretrained_key(self, key: str) -> str:
        m = _TORCHVISION_DENSE.match(key)
        return f"{m.group(1)}.layers.{m.group(2)}.{m.group(3)}" if m else key

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled DenseNet features ``(B, feature_dim)``."""
        small = [s for s in x.shape[2:] if s < self.min_size]
        if small:
            raise ValueError(f"densenet121: every spatial size must be >= {self.min_size} "
                             f"(the network downsamples {self.min_size}x), got {tuple(x.shape[2:])}")
        return self.backbone(x)


# --------------------------------------------------------------------------- #
# Swin ViT
# --------------------------------------------------------------------------- #
def _permute_rearrange(tensor: torch.Tensor, pattern: str, **axes: Any) -> torch.Tensor:
    """Stand-in for ``einops.rearrange`` restricted to pure axis permutations ("b c d h w -> b d h w c").

    MONAI's Swin code calls einops only with such patterns; this lets
    ``swin_vit`` run when the optional ``einops`` package is not installed.
    """
    left, _, right = pattern.partition("->")
    src, dst = left.split(), right.split()
    if axes or sorted(src) != sorted(dst) or len(set(src)) != len(src) or len(src) != tensor.ndim \
            or any(not a.isidentifier() for a in src):
        raise ImportError("einops is required for this rearrange pattern: pip install einops")
    return tensor.permute(*[src.index(a) for a in dst])


def _ensure_rearrange() -> None:
    from monai.networks.nets import swin_unetr
    from monai.utils import optional_import

    _, has_einops = optional_import("einops")
    if not has_einops:  # only replaces MONAI's placeholder that would raise OptionalImportError
        swin_unetr.rearrange = _permute_rearrange


@register_encoder("swin_vit", family="image3d")
class SwinViTEncoder(ImageEncoderBase):
    """The Swin transformer backbone of MONAI's SwinUNETR (``swinViT``) as an encoder.

    (Hatamizadeh et al., "Swin UNETR", BrainLes 2021; Liu et al., "Swin
    Transformer", ICCV 2021.)  Patch embedding (2^3 patches) and four stages
    of shifted-window attention with patch merging; ``forward_features`` is
    the mean of the layer-normalised tokens of the last stage,
    ``(B, 16 * feature_size)``.

    Input-size constraint: every spatial size must be a multiple of 32
    (patch size 2 and four 2x merges, as in SwinUNETR); ``forward`` raises a
    ``ValueError`` naming the offending sizes.  Windows larger than a stage's
    feature map shrink to it (MONAI ``get_window_size``).  The state dict keys
    are ``swinViT.*`` so SwinUNETR checkpoints (e.g. the MONAI self-supervised
    weights) load with ``pretrained_path``.

    Parameters
    ----------
    spatial_dims, in_channels, out_dim
        As for every image encoder.
    feature_size
        Embedding size of the first stage; ``feature_size * 2**i`` must be
        divisible by ``num_heads[i]`` (SwinUNETR uses multiples of 12: 12, 24, 48).
    depths, num_heads
        Blocks and attention heads of the four stages.
    window_size
        Attention window (int or per dim).
    drop_rate, attn_drop_rate, drop_path_rate
        Dropouts and stochastic depth of the transformer.
    use_v2
        SwinUNETR-v2 residual convolution blocks.
    dropout
        Dropout before the head.
    pretrained_path
        Optional user state dict (this encoder's, a SwinUNETR's or a bare SwinTransformer's).
    """

    example_input_size = (32, 32, 32)
    example_kwargs: ClassVar[dict[str, Any]] = {"feature_size": 12, "depths": (1, 1, 1, 1), "window_size": 4}
    supports_channels_last_3d = False
    _pretrained_targets = ("swinViT",)
    patch_size: ClassVar[int] = 2

    def __init__(
        self,
        spatial_dims: int,
        in_channels: int,
        out_dim: int,
        *,
        feature_size: int = 48,
        depths: Sequence[int] = (2, 2, 2, 2),
        num_heads: Sequence[int] = (3, 6, 12, 24),
        window_size: int | Sequence[int] = 7,
        drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        use_v2: bool = False,
        dropout: float = 0.0,
        pretrained_path: str | None = None,
    ) -> None:
        super().__init__()
        check_common_args(spatial_dims, in_channels, out_dim)
        check_dropout(dropout)
        for name, value in (("drop_rate", drop_rate), ("attn_drop_rate", attn_drop_rate),
                            ("drop_path_rate", drop_path_rate)):
            check_dropout(value, name)
        if not isinstance(feature_size, int) or feature_size < 1:
            raise ValueError(f"feature_size must be a positive int, got {feature_size!r}")
        depths, num_heads = tuple(depths), tuple(num_heads)
        if len(depths) != 4 or any(not isinstance(d, int) or d < 1 for d in depths):
            raise ValueError(f"depths must be 4 positive ints (one per stage), got {depths!r}")
        if len(num_heads) != 4 or any(not isinstance(h, int) or h < 1 for h in num_heads):
            raise ValueError(f"num_heads must be 4 positive ints (one per stage), got {num_heads!r}")
        for i, h in enumerate(num_heads):
            if (feature_size * 2 ** i) % h:
                raise ValueError(f"feature_size: stage {i} width {feature_size * 2 ** i} is not divisible by "
                                 f"num_heads[{i}]={h}; use a multiple of 12 with the default heads")
        ws = (window_size,) * spatial_dims if isinstance(window_size, int) else tuple(window_size)
        if len(ws) != spatial_dims or any(not isinstance(w, int) or w < 1 for w in ws):
            raise ValueError(f"window_size must be a positive int or {spatial_dims} of them, got {window_size!r}")
        _ensure_rearrange()
        from monai.networks.nets.swin_unetr import SwinTransformer

        self.swinViT = SwinTransformer(
            in_chans=in_channels,
            embed_dim=feature_size,
            window_size=ws,
            patch_size=(self.patch_size,) * spatial_dims,
            depths=depths,
            num_heads=num_heads,
            drop_rate=drop_rate,
            attn_drop_rate=attn_drop_rate,
            drop_path_rate=drop_path_rate,
            spatial_dims=spatial_dims,
            use_v2=use_v2,
        )
        self.feature_dim = feature_size * 16
        self.head = _head(self.feature_dim, out_dim, dropout)
        self.spatial_dims = spatial_dims
        self.in_channels = in_channels
        self.out_dim = out_dim
        self.pretrained_report = None
        if pretrained_path is not None:
            self.load_pretrained(pretrained_path)

    @property
    def size_multiple(self) -> int:
        """Every spatial size must be a multiple of this (32)."""
        return self.patch_size * 2 ** 4

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Mean of the last stage's normalised tokens ``(B, 16 * feature_size)``."""
        if x.ndim != self.spatial_dims + 2:
            raise ValueError(f"swin_vit: expected a (B, C, {'D, ' if self.spatial_dims == 3 else ''}H, W) "
                             f"tensor, got shape {tuple(x.shape)}")
        bad = [int(s) for s in x.shape[2:] if s % self.size_multiple]
        if bad:
            raise ValueError(f"swin_vit: every spatial size must be a multiple of {self.size_multiple} "
                             f"(patch 2 x four 2x merges), got {tuple(x.shape[2:])}; resample or pad the "
                             "volume (e.g. preprocessing size 32 or 64)")
        tokens = self.swinViT(x.contiguous(), normalize=True)[-1]
        return tokens.flatten(2).mean(dim=2)


# --------------------------------------------------------------------------- #
# 2D trunks: per-slice and 2.5D
# --------------------------------------------------------------------------- #
def _trunk_2d(in_channels: int, channels: Sequence[int], norm: str, act: str, first_kernel: tuple[int, ...]
              ) -> nn.Sequential:
    """conv-norm-act x2 + max-pool per stage (as ``cnn3d_small``), 2D, from MONAI factories."""
    conv_t = Conv[Conv.CONV, 2]
    norm_t = Norm[norm, 2]
    act_t = Act[act]
    pool_t = Pool[Pool.MAX, 2]
    layers: list[nn.Module] = []
    c_in = in_channels
    for i, c in enumerate(channels):
        k0 = first_kernel if i == 0 else (3, 3)
        layers += [
            conv_t(c_in, c, kernel_size=k0, padding=tuple(k // 2 for k in k0), bias=False), norm_t(c), act_t(),
            conv_t(c, c, kernel_size=3, padding=1, bias=False), norm_t(c), act_t(),
            pool_t(kernel_size=2, ceil_mode=True),
        ]
        c_in = c
    return nn.Sequential(*layers)


def _check_channels(channels: Sequence[int]) -> tuple[int, ...]:
    if not channels or any(not isinstance(c, Integral) or c < 1 for c in channels):
        raise ValueError(f"channels must be a non-empty sequence of positive ints, got {channels!r}")
    return tuple(int(c) for c in channels)


class _GatedAttentionPool(nn.Module):
    """Gated attention pooling over instances (Ilse et al., "Attention-based Deep Multiple Instance
    Learning", ICML 2018): ``a = softmax(w^T (tanh(V h) * sigmoid(U h)))``, ``z = sum a h``."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.v = nn.Linear(dim, hidden)
        self.u = nn.Linear(dim, hidden)
        self.w = nn.Linear(hidden, 1)

    def weights(self, h: torch.Tensor) -> torch.Tensor:
        """``(B, N, F)`` -> attention ``(B, N)`` summing to 1."""
        return torch.softmax(self.w(torch.tanh(self.v(h)) * torch.sigmoid(self.u(h))).squeeze(-1), dim=1)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return torch.einsum("bn,bnf->bf", self.weights(h), h)


@register_encoder("slice2d", family="image3d")
class Slice2DEncoder(ImageEncoderBase):
    """A 2D CNN applied to every axial slice, aggregated along z.

    ``(B, C, D, H, W)`` is reshaped to ``B * D`` images ``(C, H, W)`` (D is
    the axial / z axis of the data contract), each encoded by a 2D trunk
    (stages conv-norm-act x2 + max-pool, MONAI factories) and summarised by
    global average and max pooling; the ``D`` slice features are then pooled
    by gated attention (Ilse et al. 2018; learns which slices matter, the
    weights are available from :meth:`slice_weights`) or by their mean.
    Any D >= 1 works (slices are independent until pooling), so it suits
    thick-slice, few-slice volumes and 2D-pretrained trunks (2D weights load
    directly with ``pretrained_path``, e.g. from ``cnn3d_small`` built with
    ``spatial_dims=2``).

    Parameters
    ----------
    spatial_dims
        Must be 3 (it consumes volumes).
    in_channels, out_dim
        As for every image encoder.
    channels
        Widths of the 2D stages.
    norm, act
        MONAI factory names.
    aggregation
        ``"attention"`` (gated attention) or ``"mean"``.
    attention_dim
        Hidden size of the attention scorer.
    first_kernel
        In-plane kernel of the first convolution (odd int or (kh, kw)).
    dropout
        Dropout before the head.
    pretrained_path
        Optional user state dict.
    """

    example_input_size = (16, 16, 16)
    example_kwargs: ClassVar[dict[str, Any]] = {"channels": (4, 8)}
    supports_channels_last_3d = False

    def __init__(
        self,
        spatial_dims: int,
        in_channels: int,
        out_dim: int,
        *,
        channels: Sequence[int] = (16, 32, 64),
        norm: str = "batch",
        act: str = "relu",
        aggregation: str = "attention",
        attention_dim: int = 64,
        first_kernel: int | Sequence[int] = 3,
        dropout: float = 0.0,
        pretrained_path: str | None = None,
    ) -> None:
        super().__init__()
        check_common_args(spatial_dims, in_channels, out_dim, allowed_dims=(3,))
        check_dropout(dropout)
        channels = _check_channels(channels)
        if aggregation not in ("attention", "mean"):
            raise ValueError(f"aggregation must be 'attention' or 'mean', got {aggregation!r}")
        if not isinstance(attention_dim, int) or attention_dim < 1:
            raise ValueError(f"attention_dim must be a positive int, got {attention_dim!r}")
        self.features = _trunk_2d(in_channels, channels, norm, act, first_kernel_tuple(first_kernel, 2))
        self.avg = Pool[Pool.ADAPTIVEAVG, 2](1)
        self.max = Pool[Pool.ADAPTIVEMAX, 2](1)
        self.slice_dim = 2 * channels[-1]
        self.aggregation = aggregation
        self.pool = _GatedAttentionPool(self.slice_dim, attention_dim) if aggregation == "attention" else None
        self.feature_dim = self.slice_dim
        self.head = _head(self.feature_dim, out_dim, dropout)
        self.spatial_dims = spatial_dims
        self.in_channels = in_channels
        self.out_dim = out_dim
        self.pretrained_report = None
        if pretrained_path is not None:
            self.load_pretrained(pretrained_path)

    def _slice_features(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 5:
            raise ValueError(f"slice2d: expected (B, C, D, H, W), got shape {tuple(x.shape)}")
        b, c, d, h, w = x.shape
        s = x.permute(0, 2, 1, 3, 4).reshape(b * d, c, h, w)
        f = self.features(s)
        f = torch.cat([self.avg(f).flatten(1), self.max(f).flatten(1)], dim=1)
        return f.reshape(b, d, -1)

    def slice_weights(self, x: torch.Tensor) -> torch.Tensor:
        """Weight of each axial slice in the pooled features, ``(B, D)`` (uniform for ``"mean"``)."""
        h = self._slice_features(x)
        if self.pool is None:
            return torch.full(h.shape[:2], 1.0 / h.shape[1], dtype=h.dtype, device=h.device)
        return self.pool.weights(h)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Slice features pooled along z, ``(B, 2 * channels[-1])``."""
        h = self._slice_features(x)
        return h.mean(dim=1) if self.pool is None else self.pool(h)


@register_encoder("cnn25d", family="image3d")
class CNN25DEncoder(ImageEncoderBase):
    """2.5D encoder: three orthogonal central slabs through a shared 2D CNN.

    From ``(B, C, D, H, W)`` it takes the ``slab`` central slices along each
    axis and stacks them as channels: axial ``(B, C*slab, H, W)`` (slices
    along D), coronal ``(B, C*slab, D, W)`` (along H), sagittal
    ``(B, C*slab, D, H)`` (along W).  One 2D trunk (shared weights, MONAI
    factories) encodes the three planes; their global average+max pooled
    features are concatenated in the fixed order (axial, coronal, sagittal),
    so the head knows which plane is which: ``(B, 3 * 2 * channels[-1])``.
    The volume is expected to be centred on the ROI (as preprocessing
    does); neighbouring slices as channels give some through-plane context
    at 2D cost (Roth et al., "A new 2.5D representation for lymph node
    detection using random sets of deep convolutional neural network
    observations", MICCAI 2014).  Each spatial size must be >= ``slab``.

    Parameters
    ----------
    spatial_dims
        Must be 3.
    in_channels, out_dim
        As for every image encoder.
    slab
        Odd number of neighbouring slices per plane (1 = single central slices).
    channels
        Widths of the 2D stages.
    norm, act
        MONAI factory names.
    first_kernel
        In-plane kernel of the first convolution.
    dropout
        Dropout before the head.
    pretrained_path
        Optional user state dict.
    """

    example_input_size = (16, 16, 16)
    example_kwargs: ClassVar[dict[str, Any]] = {"channels": (4, 8)}
    supports_channels_last_3d = False

    def __init__(
        self,
        spatial_dims: int,
        in_channels: int,
        out_dim: int,
        *,
        slab: int = 3,
        channels: Sequence[int] = (16, 32, 64),
        norm: str = "batch",
        act: str = "relu",
        first_kernel: int | Sequence[int] = 3,
        dropout: float = 0.0,
        pretrained_path: str | None = None,
    ) -> None:
        super().__init__()
        check_common_args(spatial_dims, in_channels, out_dim, allowed_dims=(3,))
        check_dropout(dropout)
        channels = _check_channels(channels)
        if not isinstance(slab, int) or slab < 1 or slab % 2 == 0:
            raise ValueError(f"slab must be an odd positive int, got {slab!r}")
        self.slab = slab
        self.features = _trunk_2d(in_channels * slab, channels, norm, act, first_kernel_tuple(first_kernel, 2))
        self.avg = Pool[Pool.ADAPTIVEAVG, 2](1)
        self.max = Pool[Pool.ADAPTIVEMAX, 2](1)
        self.plane_dim = 2 * channels[-1]
        self.feature_dim = 3 * self.plane_dim
        self.head = _head(self.feature_dim, out_dim, dropout)
        self.spatial_dims = spatial_dims
        self.in_channels = in_channels
        self.out_dim = out_dim
        self.pretrained_report = None
        if pretrained_path is not None:
            self.load_pretrained(pretrained_path)

    def planes(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The axial, coronal and sagittal slabs as 2D images with ``C * slab`` channels."""
        if x.ndim != 5:
            raise ValueError(f"cnn25d: expected (B, C, D, H, W), got shape {tuple(x.shape)}")
        b, c, d, h, w = x.shape
        if min(d, h, w) < self.slab:
            raise ValueError(f"cnn25d: every spatial size must be >= slab={self.slab}, got {(d, h, w)}")
        half = self.slab // 2

        def around(n: int) -> slice:
            centre = (n - 1) // 2
            return slice(centre - half, centre - half + self.slab)

        axial = x[:, :, around(d)].reshape(b, c * self.slab, h, w)
        coronal = x[:, :, :, around(h)].permute(0, 1, 3, 2, 4).reshape(b, c * self.slab, d, w)
        sagittal = x[:, :, :, :, around(w)].permute(0, 1, 4, 2, 3).reshape(b, c * self.slab, d, h)
        return [axial, coronal, sagittal]

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Concatenated pooled features of the three planes ``(B, 6 * channels[-1])``."""
        feats = []
        for plane in self.planes(x):
            f = self.features(plane.contiguous())
            feats.append(torch.cat([self.avg(f).flatten(1), self.max(f).flatten(1)], dim=1))
        return torch.cat(feats, dim=1)
