"""Parameter-free feature extractors for *early* fusion.

Early fusion = the modalities' raw (or fixed, hand-crafted) features are
concatenated and a single network is trained on top.  In radfusion that is
these encoders + the ``concat`` fusion strategy (whose Linear -> ReLU
projection and the task head form the one MLP on the concatenated features).

Each encoder is an ``nn.Module`` without learned parameters (so it moves with
``.to(device)`` and sits in an ``nn.ModuleDict`` like any other), its output
size ``out_dim`` is fixed by its input size, and an ``out_dim`` that differs
from it raises a ``ValueError`` saying which value is needed (``None`` takes
it automatically).  Optional ``dropout`` (0 by default) drops input features
in training, the usual regulariser for early fusion of many raw features.

Encoders
--------
``identity`` (tabular)
    :class:`IdentityEncoder`: the features unchanged, ``out_dim = in_features``.
``image_pool`` (image3d)
    :class:`ImagePoolFeatures`: per channel the global mean, standard
    deviation, intensity percentiles and the means of an adaptive average
    pooling grid (``2 x 2 x 2`` by default).
``ehr_summary`` (sequence)
    :class:`EHRSummary`: per variable the last observed value, mean, min,
    max and the fraction of steps at which it was observed.
"""
from __future__ import annotations

from numbers import Integral
from typing import Mapping, Sequence

import torch
from monai.networks.layers.factories import Pool
from torch import Tensor, nn

from encoders.registry import register_encoder

__all__ = ["IdentityEncoder", "ImagePoolFeatures", "EHRSummary", "percentiles"]


def _check_pos_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, Integral) or int(value) < 1:
        raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    return int(value)


def _check_out_dim(out_dim: object, natural: int, what: str) -> int:
    if out_dim is None:
        return natural
    if isinstance(out_dim, bool) or not isinstance(out_dim, Integral) or int(out_dim) < 1:
        raise ValueError(f"out_dim must be None or an int >= 1, got {out_dim!r}")
    if int(out_dim) != natural:
        raise ValueError(
            f"out_dim must equal {natural} ({what}) for this parameter-free encoder, got {out_dim}; "
            "set out_dim to that value (or None)"
        )
    return natural


def _check_dropout(dropout: object) -> float:
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0.0 <= float(dropout) < 1.0:
        raise ValueError(f"dropout must be a number in [0, 1), got {dropout!r}")
    return float(dropout)


def percentiles(x: Tensor, q: Sequence[float]) -> Tensor:
    """Percentiles along the last axis with numpy's default ``"linear"`` interpolation.

    ``x`` ``(..., N)``, ``q`` in [0, 100] -> ``(..., len(q))``.  The value at
    percentile ``q`` is ``x_(i) + (x_(i+1) - x_(i)) * g`` with ``pos = q/100 *
    (N - 1)``, ``i = floor(pos)``, ``g = pos - i`` on the sorted values
    (Hyndman & Fan 1996, definition 7).  Uses one sort, without
    ``torch.quantile``'s input-size limit (large volumes).
    """
    qs = [float(v) for v in q]
    if not qs or any(not 0.0 <= v <= 100.0 for v in qs):
        raise ValueError(f"q must be a non-empty sequence of percentiles in [0, 100], got {list(q)!r}")
    n = x.shape[-1]
    if n < 1:
        raise ValueError("x must have at least one value along its last axis")
    xs = torch.sort(x, dim=-1).values
    pos = torch.tensor(qs, dtype=torch.float64) / 100.0 * (n - 1)
    lo = pos.floor().long().clamp(0, n - 1)
    hi = (lo + 1).clamp(max=n - 1)
    g = (pos - lo.to(torch.float64)).to(x.dtype).to(x.device)
    lo, hi = lo.to(x.device), hi.to(x.device)
    a, b = xs[..., lo], xs[..., hi]
    return a + (b - a) * g


@register_encoder("identity", family="tabular")
class IdentityEncoder(nn.Module):
    """The input features unchanged: ``(B, F) -> (B, F)``.

    Parameters
    ----------
    in_features
        Feature count F.
    out_dim
        ``None`` or F (anything else raises, naming F).
    dropout
        Feature dropout in training (0 = none).
    """

    parameter_free = True

    def __init__(self, in_features: int, out_dim: int | None = None, *, dropout: float = 0.0) -> None:
        super().__init__()
        self.in_features = _check_pos_int("in_features", in_features)
        self.drop = nn.Dropout(_check_dropout(dropout))
        self.out_dim = _check_out_dim(out_dim, self.in_features, f"in_features={self.in_features}")
        self.feature_dim = self.out_dim

    def forward_features(self, x: Tensor) -> Tensor:
        if x.dim() != 2 or x.shape[1] != self.in_features:
            raise ValueError(f"x must be (B, {self.in_features}), got shape {tuple(x.shape)}")
        return x

    def forward(self, x: Tensor) -> Tensor:
        return self.drop(self.forward_features(x))


@register_encoder("image_pool", family="image3d")
class ImagePoolFeatures(nn.Module):
    """Fixed intensity/layout features of an image, per channel.

    For each channel ``c`` of ``(B, C, *spatial)`` the features are, in this
    order::

        mean_c, std_c (population, 1/N), percentiles_c (len(q)), grid means_c (prod(grid))

    ``grid`` means are an adaptive average pooling to ``grid`` cells
    (``2 x 2 x 2`` by default: a coarse "where is the signal" layout).
    Channels are concatenated, so
    ``out_dim = C * (2 + len(percentiles) + prod(grid))`` (13 per channel
    with the defaults).  The features are computed in float32 (or float64
    for float64 input) and returned in that dtype.

    Parameters
    ----------
    spatial_dims
        2 or 3.
    in_channels
        C.
    out_dim
        ``None`` or the value above.
    grid
        Pooling grid, an int or one int per spatial dim (``(D, H, W)`` order).
    percentiles
        Intensity percentiles in [0, 100] (``()`` for none).
    dropout
        Feature dropout in training (0 = none).
    """

    parameter_free = True
    example_input_size = (16, 16, 16)
    supports_channels_last_3d = False

    def __init__(self, spatial_dims: int, in_channels: int, out_dim: int | None = None, *,
                 grid: int | Sequence[int] = 2, percentiles: Sequence[float] = (10.0, 50.0, 90.0),
                 dropout: float = 0.0) -> None:
        super().__init__()
        if spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims!r}")
        self.spatial_dims = int(spatial_dims)
        self.in_channels = _check_pos_int("in_channels", in_channels)
        self.drop = nn.Dropout(_check_dropout(dropout))
        if isinstance(grid, Integral) and not isinstance(grid, bool):
            grid = (int(grid),) * self.spatial_dims
        grid = tuple(grid)
        if len(grid) != self.spatial_dims or any(isinstance(g, bool) or not isinstance(g, Integral) or g < 1
                                                 for g in grid):
            raise ValueError(f"grid must be an int >= 1 or {self.spatial_dims} of them, got {grid!r}")
        self.grid = tuple(int(g) for g in grid)
        q = tuple(float(v) for v in percentiles)
        if any(not 0.0 <= v <= 100.0 for v in q):
            raise ValueError(f"percentiles must lie in [0, 100], got {q}")
        self.percentiles = q
        n_cells = 1
        for g in self.grid:
            n_cells *= g
        self.per_channel = 2 + len(q) + n_cells
        natural = self.in_channels * self.per_channel
        self.out_dim = _check_out_dim(
            out_dim, natural, f"in_channels={self.in_channels} x (2 + {len(q)} percentiles + {n_cells} grid cells)")
        self.feature_dim = self.out_dim
        self.pool = Pool[Pool.ADAPTIVEAVG, self.spatial_dims](self.grid)

    def feature_names(self) -> list[str]:
        """Names of the ``out_dim`` features, e.g. ``"c0_mean"``, ``"c0_p50"``, ``"c0_grid_1_0_1"``."""
        import itertools

        names = []
        for c in range(self.in_channels):
            names += [f"c{c}_mean", f"c{c}_std"] + [f"c{c}_p{v:g}" for v in self.percentiles]
            names += [f"c{c}_grid_" + "_".join(map(str, idx)) for idx in itertools.product(*map(range, self.grid))]
        return names

    def forward_features(self, x: Tensor) -> Tensor:
        if x.dim() != 2 + self.spatial_dims or x.shape[1] != self.in_channels:
            raise ValueError(f"x must be (B, {self.in_channels}, {', '.join(['S'] * self.spatial_dims)}), "
                             f"got shape {tuple(x.shape)}")
        if x.dtype != torch.float64:
            x = x.float()
        b, c = x.shape[:2]
        flat = x.reshape(b, c, -1)
        parts = [flat.mean(-1, keepdim=True), flat.std(-1, unbiased=False, keepdim=True)]
        if self.percentiles:
            parts.append(percentiles(flat, self.percentiles))
        parts.append(self.pool(x).reshape(b, c, -1))
        return torch.cat(parts, dim=-1).reshape(b, -1)

    def forward(self, x: Tensor) -> Tensor:
        return self.drop(self.forward_features(x))


_EHR_KEYS = ("values", "mask", "lengths")
_EHR_STATS = ("last", "mean", "min", "max", "frac_observed")


@register_encoder("ehr_summary", family="sequence")
class EHRSummary(nn.Module):
    """Per-variable summary statistics of an irregular EHR time series.

    For each variable ``v`` over the patient's observed steps
    ``O_v = {t < length : mask[t, v] > 0}``::

        last_v  = values[max O_v, v]
        mean_v  = mean(values[O_v, v])
        min_v, max_v over values[O_v, v]
        frac_v  = |O_v| / T

    where ``T`` is the time axis length of the input: radfusion's EHR
    preprocessor always pads to ``T = max_steps``, so ``frac_v`` does not
    depend on the batch.  A variable never observed gets 0 for all five
    (``frac_v = 0`` tells it apart).  The output is feature-major:
    ``[last (V), mean (V), min (V), max (V), frac (V)]``, ``out_dim = 5 V``.

    Parameters
    ----------
    in_features
        Number of variables V.
    out_dim
        ``None`` or ``5 * V``.
    dropout
        Feature dropout in training (0 = none).
    """

    parameter_free = True

    def __init__(self, in_features: int, out_dim: int | None = None, *, dropout: float = 0.0) -> None:
        super().__init__()
        self.in_features = _check_pos_int("in_features", in_features)
        self.drop = nn.Dropout(_check_dropout(dropout))
        self.out_dim = _check_out_dim(out_dim, 5 * self.in_features,
                                      f"5 statistics x in_features={self.in_features} variables")
        self.feature_dim = self.out_dim

    def feature_names(self, variables: Sequence[str] | None = None) -> list[str]:
        """``"<stat>[<variable>]"`` for the ``out_dim`` features, in output order."""
        variables = list(variables) if variables is not None else [f"v{i}" for i in range(self.in_features)]
        if len(variables) != self.in_features:
            raise ValueError(f"variables must name {self.in_features} variables, got {len(variables)}")
        return [f"{s}[{v}]" for s in _EHR_STATS for v in variables]

    def forward_features(self, ehr: Mapping[str, Tensor]) -> Tensor:
        if not isinstance(ehr, Mapping) or any(k not in ehr for k in _EHR_KEYS):
            raise ValueError(f"ehr must be a dict with keys {list(_EHR_KEYS)} (the EHR batch of the data contract)")
        values = torch.as_tensor(ehr["values"])
        if not values.is_floating_point():
            values = values.float()
        mask = torch.as_tensor(ehr["mask"], device=values.device)
        lengths = torch.as_tensor(ehr["lengths"], device=values.device).long()
        if values.dim() != 3 or values.shape[2] != self.in_features:
            raise ValueError(f"ehr['values'] must be (B, T, {self.in_features}), got shape {tuple(values.shape)}")
        b, t, v = values.shape
        if mask.shape != values.shape:
            raise ValueError(f"ehr['mask'] must have the shape of ehr['values'] {tuple(values.shape)}, "
                             f"got {tuple(mask.shape)}")
        if lengths.shape != (b,):
            raise ValueError(f"ehr['lengths'] must be (B,) = ({b},), got {tuple(lengths.shape)}")
        if b and (int(lengths.min()) < 0 or int(lengths.max()) > t):
            raise ValueError(f"ehr['lengths'] must lie in [0, T={t}], got min {int(lengths.min())}, "
                             f"max {int(lengths.max())}")
        valid = torch.arange(t, device=values.device).unsqueeze(0) < lengths.unsqueeze(1)  # (B, T)
        obs = (mask > 0) & valid.unsqueeze(2)  # (B, T, V)
        zero = values.new_zeros(())
        x = torch.where(obs, values, zero)  # NaN placeholders at unobserved steps cannot leak
        count = obs.sum(1).to(values.dtype)  # (B, V)
        seen = count > 0
        mean = x.sum(1) / count.clamp_min(1.0)
        vmin = torch.where(obs, values, torch.full_like(values, float("inf"))).amin(1)
        vmax = torch.where(obs, values, torch.full_like(values, float("-inf"))).amax(1)
        step = torch.arange(t, device=values.device).view(1, t, 1).expand(b, t, v)
        last_idx = torch.where(obs, step, torch.full_like(step, -1)).amax(1).clamp_min(0)  # (B, V)
        last = x.gather(1, last_idx.unsqueeze(1)).squeeze(1)
        frac = count / max(t, 1)
        feats = [torch.where(seen, s, zero) for s in (last, mean, vmin, vmax)] + [frac]
        return torch.cat(feats, dim=1)

    def forward(self, ehr: Mapping[str, Tensor]) -> Tensor:
        return self.drop(self.forward_features(ehr))
