"""3D image encoders.

Built from MONAI's layer factories (``Conv``, ``Norm``, ``Act``, ``Pool``) as
MONAI's own networks are, so the same code runs in 2D or 3D and a user can
swap normalisation or activation by name.
"""
from __future__ import annotations

from typing import Sequence

import torch
from monai.networks.layers.factories import Act, Conv, Norm, Pool
from torch import nn

from encoders.registry import register_encoder


@register_encoder("cnn3d_small", family="image3d")
class SmallCNN3D(nn.Module):
    """A small CNN for CPU-sized volumes (e.g. 24^3 voxels at 2 mm).

    Each stage is conv(3) -> norm -> act -> conv(3) -> norm -> act -> max-pool(2).
    The last feature map is summarised by global average *and* global max
    pooling (so both the extent of a finding and its peak intensity survive,
    e.g. lesion volume on CT and SUVmax on PET), then projected to ``out_dim``.

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
    """

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
    ) -> None:
        super().__init__()
        if spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}")
        if in_channels < 1:
            raise ValueError(f"in_channels must be >= 1, got {in_channels}")
        if out_dim < 1:
            raise ValueError(f"out_dim must be >= 1, got {out_dim}")
        if not channels or any(c < 1 for c in channels):
            raise ValueError(f"channels must be a non-empty sequence of positive ints, got {channels}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        conv_t = Conv[Conv.CONV, spatial_dims]
        norm_t = Norm[norm, spatial_dims]
        act_t = Act[act]
        pool_t = Pool[Pool.MAX, spatial_dims]
        layers: list[nn.Module] = []
        c_in = in_channels
        for c in channels:
            layers += [
                conv_t(c_in, c, kernel_size=3, padding=1, bias=False), norm_t(c), act_t(),
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

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled features ``(B, 2 * channels[-1])`` before the projection."""
        f = self.features(x)
        return torch.cat([self.avg(f).flatten(1), self.max(f).flatten(1)], dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, C, D, H, W)`` -> ``(B, out_dim)``."""
        return self.head(self.forward_features(x))
