"""Encoders for irregular EHR time series (family ``"sequence"``).

Every encoder here is built as ``cls(in_features, out_dim, **kw)`` and its
``forward`` takes the EHR dict of the data contract:

``values`` float (B, T, V)
    standardised values, 0 where missing;
``mask`` float (B, T, V)
    1 where observed;
``delta`` float (B, T, V)
    time since the variable was last observed (days), Che et al. (2018)
    time-interval definition;
``times`` float (B, T)
    observation times (days);
``lengths`` int64 (B,)
    number of valid steps; steps ``t >= length`` are padding (all 0).  A
    length of 0 is allowed (a patient without events).

and returns ``(B, out_dim)``.  ``forward_features`` returns the features
before the output ``Linear`` (the "no head" features).  Padding never changes
a patient's output, and neither does which other patients share the batch
(up to floating-point rounding).  Trailing steps beyond the longest sequence
of the batch are skipped.

Encoders
--------
``grud``
    :class:`GRUD`, GRU-D of Che et al. (2018), "Recurrent neural networks for
    multivariate time series with missing values", Sci Rep 8:6085.
``gru_ffill``
    :class:`GRUForwardFill`, a GRU on forward-filled values, the mask and
    ``log1p(delta)`` (the "GRU-Forward"/"GRU-Simple" baselines of the same
    paper).
``time_transformer``
    :class:`TimeTransformer`, a Transformer encoder over the observed steps
    with a continuous-time sinusoidal embedding of ``times``.
"""
from __future__ import annotations

import math
from typing import Mapping

import numpy as np
import torch
from torch import Tensor, nn

from encoders.registry import register_encoder

__all__ = ["GRUD", "GRUForwardFill", "TimeTransformer", "forward_fill", "EHR_KEYS"]

#: Keys of the EHR dict read by these encoders.
EHR_KEYS = ("values", "mask", "delta", "times", "lengths")


# --------------------------------------------------------------------------- #
# helpers
# --------------------------------------------------------------------------- #
def _check_positive_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or int(value) < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def _check_dropout(value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= float(value) < 1.0:
        raise ValueError(f"dropout must be a number in [0, 1), got {value!r}")
    return float(value)


def _unpack(
    ehr: Mapping[str, Tensor], in_features: int, like: Tensor
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, int]:
    """Validate the EHR dict, cast it to ``like``'s device/dtype and trim padding.

    Returns ``values, mask, delta, times, lengths, T_full`` where the time axis
    is cut to ``max(lengths)`` (steps beyond it are padding for every
    patient), ``values`` is 0 wherever ``mask`` is 0 (so NaN placeholders
    cannot leak) and ``mask`` is exactly 0/1.
    """
    if not isinstance(ehr, Mapping):
        raise ValueError(f"ehr must be a dict with keys {EHR_KEYS}, got {type(ehr).__name__}")
    missing = [k for k in EHR_KEYS if k not in ehr]
    if missing:
        raise ValueError(f"ehr dict is missing key(s) {missing}; expected {list(EHR_KEYS)}")
    dev, dt = like.device, like.dtype
    values = torch.as_tensor(ehr["values"], device=dev, dtype=dt)
    mask = torch.as_tensor(ehr["mask"], device=dev, dtype=dt)
    delta = torch.as_tensor(ehr["delta"], device=dev, dtype=dt)
    times = torch.as_tensor(ehr["times"], device=dev, dtype=dt)
    lengths = torch.as_tensor(ehr["lengths"], device=dev).long()
    if values.dim() != 3:
        raise ValueError(f"ehr['values'] must be (B, T, V), got shape {tuple(values.shape)}")
    b, t_full, v = values.shape
    if v != in_features:
        raise ValueError(f"ehr['values'] has V={v} variables but the encoder was built with in_features={in_features}")
    for key, ten in (("mask", mask), ("delta", delta)):
        if ten.shape != values.shape:
            raise ValueError(f"ehr[{key!r}] must have the shape of ehr['values'] {tuple(values.shape)}, got {tuple(ten.shape)}")
    if times.shape != (b, t_full):
        raise ValueError(f"ehr['times'] must be (B, T) = {(b, t_full)}, got {tuple(times.shape)}")
    if lengths.shape != (b,):
        raise ValueError(f"ehr['lengths'] must be (B,) = ({b},), got {tuple(lengths.shape)}")
    t_eff = 0
    if b > 0:
        lo, hi = int(lengths.min()), int(lengths.max())
        if lo < 0 or hi > t_full:
            raise ValueError(f"ehr['lengths'] must lie in [0, T={t_full}], got min {lo}, max {hi}")
        t_eff = hi
    if t_eff < t_full:
        values, mask, delta, times = values[:, :t_eff], mask[:, :t_eff], delta[:, :t_eff], times[:, :t_eff]
    observed = mask > 0
    mask = observed.to(dt)
    values = torch.where(observed, values, torch.zeros((), device=dev, dtype=dt))
    return values, mask, delta, times, lengths, t_full


def _valid_steps(lengths: Tensor, t: int) -> Tensor:
    """Bool (B, T): step ``t`` is a real observation step (``t < length``)."""
    return torch.arange(t, device=lengths.device).unsqueeze(0) < lengths.unsqueeze(1)


def forward_fill(values: Tensor, mask: Tensor, fill: Tensor) -> Tensor:
    """Last observed value of each variable, vectorised over time.

    Parameters
    ----------
    values, mask
        ``(B, T, V)``; ``mask > 0`` marks observations.
    fill
        ``(V,)`` (or broadcastable) value used before a variable's first
        observation.

    Returns
    -------
    Tensor
        ``(B, T, V)`` ``x'_t`` = value at the last step ``<= t`` at which the
        variable was observed, ``fill`` if none (the ``x_{t'}^d`` of Che et
        al. 2018, input decay).  Computed with a cumulative max over the index of
        the last observation, then a gather: no Python loop.
    """
    t = values.shape[1]
    steps = torch.arange(t, device=values.device).view(1, t, 1)
    last = torch.where(mask > 0, steps, torch.full((), -1, device=values.device, dtype=steps.dtype))
    if t > 0:
        last = torch.cummax(last, dim=1).values
    gathered = torch.gather(values, 1, last.clamp(min=0))
    return torch.where(last >= 0, gathered, fill.to(values.dtype).expand_as(values))


def _pad_states(states: Tensor, t_full: int) -> Tensor:
    """Extend (B, T_eff, H) to (B, t_full, H) by repeating the last state (frozen)."""
    b, t_eff, h = states.shape
    if t_eff == t_full:
        return states
    if t_eff == 0:
        return states.new_zeros(b, t_full, h)
    return torch.cat([states, states[:, -1:].expand(b, t_full - t_eff, h)], dim=1)


# --------------------------------------------------------------------------- #
# GRU-D
# --------------------------------------------------------------------------- #
@register_encoder("grud", family="sequence")
class GRUD(nn.Module):
    r"""GRU-D encoder (Che et al. 2018, Sci Rep 8:6085).

    For step ``t`` with values ``x_t``, mask ``m_t`` and intervals
    ``delta_t`` (the paper's time-interval definition), GRU-D computes, in
    the paper's notation (section "GRU-D"):

    * decay rates, with a *diagonal* ``W_gx`` for the input and a
      full ``W_gh`` (V -> H) for the hidden state:
      ``gamma_x = exp(-max(0, W_gx delta_t + b_gx))``,
      ``gamma_h = exp(-max(0, W_gh delta_t + b_gh))``;
    * input decay:
      ``x_hat_t = m_t x_t + (1 - m_t) (gamma_x x'_t + (1 - gamma_x) x~)``
      with ``x'_t`` the last observed value of the variable and ``x~`` its
      empirical training mean (``x_mean`` buffer; ``x'_t = x~`` before the
      first observation);
    * hidden-state decay: ``h_hat_{t-1} = gamma_h * h_{t-1}``;
    * GRU update with the mask as extra input:
      ``z_t = sigmoid(W_z x_hat_t + U_z h_hat_{t-1} + V_z m_t + b_z)``,
      ``r_t = sigmoid(W_r x_hat_t + U_r h_hat_{t-1} + V_r m_t + b_r)``,
      ``h~_t = tanh(W x_hat_t + U (r_t * h_hat_{t-1}) + V m_t + b)``,
      ``h_t = (1 - z_t) * h_hat_{t-1} + z_t * h~_t``.

    Everything that does not depend on ``h`` (decays, ``x_hat`` for all
    steps, the input-side gate projections ``W x_hat + V m + b`` for all steps
    in one matmul, ``gamma_h`` in one matmul) is computed before the time
    loop; the loop only does the two recurrent matmuls.  For ``t >= length``
    the state is frozen, so the state after the loop is ``h`` at the last
    valid step (``h_0 = 0`` for a patient of length 0), which goes through
    dropout and a ``Linear(H, out_dim)`` head.

    Parameters
    ----------
    in_features
        Number of variables V.
    out_dim
        Output size (``self.out_dim``).
    hidden_size
        GRU state size H (default ``out_dim``).
    dropout
        Dropout on the final state before the head.
    return_sequences
        Default of ``forward``'s ``return_sequences``.

    Attributes
    ----------
    gamma_x_weight, gamma_x_bias : Parameter
        ``(V,)`` diagonal ``W_gx`` and ``b_gx``.
    gamma_h : nn.Linear
        ``W_gh`` (H, V) and ``b_gh``.
    input_proj : nn.Linear
        ``(3H, 2V)``: rows ``[z; r; candidate]``, columns ``[x_hat, m]``,
        i.e. ``[W_z V_z; W_r V_r; W V]`` and the biases ``b_z, b_r, b``.
    hidden_zr : nn.Linear
        ``(2H, H)`` ``[U_z; U_r]``, no bias.
    hidden_n : nn.Linear
        ``(H, H)`` ``U``, no bias.
    x_mean : buffer
        ``(V,)`` empirical mean ``x~``; see :meth:`set_empirical_mean`.
    head : nn.Linear
        ``(out_dim, H)``.
    """

    def __init__(
        self,
        in_features: int,
        out_dim: int,
        *,
        hidden_size: int | None = None,
        dropout: float = 0.0,
        return_sequences: bool = False,
    ) -> None:
        super().__init__()
        self.in_features = _check_positive_int("in_features", in_features)
        self.out_dim = _check_positive_int("out_dim", out_dim)
        self.hidden_size = _check_positive_int("hidden_size", out_dim if hidden_size is None else hidden_size)
        self.dropout_p = _check_dropout(dropout)
        if not isinstance(return_sequences, bool):
            raise ValueError(f"return_sequences must be a bool, got {return_sequences!r}")
        self.return_sequences = return_sequences
        v, h = self.in_features, self.hidden_size
        self.gamma_x_weight = nn.Parameter(torch.empty(v))
        self.gamma_x_bias = nn.Parameter(torch.empty(v))
        self.gamma_h = nn.Linear(v, h)
        self.input_proj = nn.Linear(2 * v, 3 * h)
        self.hidden_zr = nn.Linear(h, 2 * h, bias=False)
        self.hidden_n = nn.Linear(h, h, bias=False)
        self.register_buffer("x_mean", torch.zeros(v))
        self.dropout = nn.Dropout(self.dropout_p)
        self.head = nn.Linear(h, self.out_dim)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Uniform(-1/sqrt(fan), 1/sqrt(fan)) initialisation, as ``nn.GRU``."""
        std_x = 1.0 / math.sqrt(self.in_features)
        nn.init.uniform_(self.gamma_x_weight, -std_x, std_x)
        nn.init.uniform_(self.gamma_x_bias, -std_x, std_x)
        std_h = 1.0 / math.sqrt(self.hidden_size)
        for lin in (self.input_proj, self.hidden_zr, self.hidden_n):
            for p in lin.parameters():
                nn.init.uniform_(p, -std_h, std_h)
        self.gamma_h.reset_parameters()
        self.head.reset_parameters()

    @torch.no_grad()
    def set_empirical_mean(self, mean: Tensor | np.ndarray | list[float]) -> None:
        """Set ``x~`` (input decay), the training mean of each (standardised) variable.

        Parameters
        ----------
        mean
            ``(V,)`` finite values, e.g. ``EHRPreprocessor.empirical_mean_``.
        """
        t = torch.as_tensor(np.asarray(mean) if not isinstance(mean, Tensor) else mean, dtype=self.x_mean.dtype)
        if t.shape != (self.in_features,):
            raise ValueError(f"mean must have shape ({self.in_features},), got {tuple(t.shape)}")
        if not torch.isfinite(t).all():
            raise ValueError("mean must be finite")
        self.x_mean.copy_(t.to(self.x_mean.device))

    # ------------------------------------------------------------------ #
    def decay_rates(self, delta: Tensor) -> tuple[Tensor, Tensor]:
        """``gamma_x`` (B, T, V) and ``gamma_h`` (B, T, H) of decay rates."""
        gamma_x = torch.exp(-torch.relu(delta * self.gamma_x_weight + self.gamma_x_bias))
        gamma_h = torch.exp(-torch.relu(self.gamma_h(delta)))
        return gamma_x, gamma_h

    def impute(self, values: Tensor, mask: Tensor, delta: Tensor) -> Tensor:
        """Decayed inputs ``x_hat`` (B, T, V) of input decay, for all steps at once.

        ``values`` must be 0 (or anything finite) where ``mask`` is 0.
        With ``delta = 0`` an unobserved entry equals the last observation;
        as ``W_gx delta`` grows it tends to ``x_mean``.
        """
        gamma_x = torch.exp(-torch.relu(delta * self.gamma_x_weight + self.gamma_x_bias))
        x_mean = self.x_mean.to(values.dtype)
        x_last = forward_fill(values, mask, x_mean)
        return mask * values + (1.0 - mask) * (gamma_x * x_last + (1.0 - gamma_x) * x_mean)

    def _run(self, ehr: Mapping[str, Tensor], want_sequences: bool) -> tuple[Tensor, Tensor | None]:
        values, mask, delta, _, lengths, t_full = _unpack(ehr, self.in_features, self.head.weight)
        b, t_eff, _ = values.shape
        hs = self.hidden_size
        h = values.new_zeros(b, hs)
        states: list[Tensor] = []
        if t_eff > 0:
            x_hat = self.impute(values, mask, delta)
            gamma_h = torch.exp(-torch.relu(self.gamma_h(delta))).transpose(0, 1).contiguous()   # (T, B, H)
            gi = self.input_proj(torch.cat([x_hat, mask], dim=-1)).transpose(0, 1)              # (T, B, 3H)
            gi_zr = gi[..., : 2 * hs].contiguous()
            gi_n = gi[..., 2 * hs:].contiguous()
            valid = _valid_steps(lengths, t_eff).transpose(0, 1).unsqueeze(-1)                   # (T, B, 1)
            n_full = int(lengths.min())  # steps valid for every patient: no freezing needed
            u_zr = self.hidden_zr.weight.t()
            u_n = self.hidden_n.weight.t()
            for t in range(t_eff):
                hd = h * gamma_h[t]
                zr = torch.sigmoid(torch.addmm(gi_zr[t], hd, u_zr))
                z, r = zr[:, :hs], zr[:, hs:]
                cand = torch.tanh(torch.addmm(gi_n[t], r * hd, u_n))
                h_new = torch.lerp(hd, cand, z)
                h = h_new if t < n_full else torch.where(valid[t], h_new, h)  # freeze padding
                if want_sequences:
                    states.append(h)
        seq = None
        if want_sequences:
            seq = torch.stack(states, dim=1) if states else values.new_zeros(b, 0, hs)
            seq = _pad_states(seq, t_full)
        return h, seq

    def forward_features(
        self, ehr: Mapping[str, Tensor], return_sequences: bool = False
    ) -> Tensor | tuple[Tensor, Tensor]:
        """Final state ``h`` (B, H) without head [, all states (B, T, H)].

        States at padding steps repeat the last valid state; a patient of
        length 0 has ``h_0 = 0`` everywhere.
        """
        h, seq = self._run(ehr, return_sequences)
        return (h, seq) if return_sequences else h

    def forward(
        self, ehr: Mapping[str, Tensor], return_sequences: bool | None = None
    ) -> Tensor | tuple[Tensor, Tensor]:
        """Encode the EHR dict.

        Parameters
        ----------
        ehr
            The EHR dict of the data contract.
        return_sequences
            If true (default: ``self.return_sequences``), also return the
            hidden states of every step.

        Returns
        -------
        Tensor or tuple of Tensor
            ``(B, out_dim)``; with ``return_sequences`` the tuple
            ``(out (B, out_dim), states (B, T, H))`` (see
            :meth:`forward_features`).
        """
        want = self.return_sequences if return_sequences is None else bool(return_sequences)
        h, seq = self._run(ehr, want)
        out = self.head(self.dropout(h))
        return (out, seq) if want else out


# --------------------------------------------------------------------------- #
# baselines
# --------------------------------------------------------------------------- #
@register_encoder("gru_ffill", family="sequence")
class GRUForwardFill(nn.Module):
    """GRU on forward-filled values, mask and ``log1p(delta)`` (baseline).

    The input at step ``t`` is ``[x'_t, m_t, log1p(delta_t)]`` (3V), where
    ``x'_t`` is the last observed value (0 = training mean before the first
    observation), i.e. the GRU-Forward imputation combined with the
    GRU-Simple inputs of Che et al. (2018).  The feature is the output at
    the last valid step ``length - 1`` (unaffected by later padding, as the
    GRU is causal); a patient of length 0 gets the initial state 0.

    Parameters
    ----------
    in_features
        Number of variables V.
    out_dim
        Output size.
    hidden_size
        GRU state size (default ``out_dim``).
    num_layers
        Stacked GRU layers.
    dropout
        Dropout between GRU layers and before the head.
    """

    def __init__(
        self,
        in_features: int,
        out_dim: int,
        *,
        hidden_size: int | None = None,
        num_layers: int = 1,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.in_features = _check_positive_int("in_features", in_features)
        self.out_dim = _check_positive_int("out_dim", out_dim)
        self.hidden_size = _check_positive_int("hidden_size", out_dim if hidden_size is None else hidden_size)
        self.num_layers = _check_positive_int("num_layers", num_layers)
        self.dropout_p = _check_dropout(dropout)
        self.gru = nn.GRU(3 * self.in_features, self.hidden_size, num_layers=self.num_layers, batch_first=True,
                          dropout=self.dropout_p if self.num_layers > 1 else 0.0)
        self.dropout = nn.Dropout(self.dropout_p)
        self.head = nn.Linear(self.hidden_size, self.out_dim)

    def forward_features(self, ehr: Mapping[str, Tensor]) -> Tensor:
        """State at the last valid step, (B, H)."""
        values, mask, delta, _, lengths, _ = _unpack(ehr, self.in_features, self.head.weight)
        b, t_eff, _ = values.shape
        if t_eff == 0:
            return values.new_zeros(b, self.hidden_size)
        x = forward_fill(values, mask, values.new_zeros(self.in_features))
        inp = torch.cat([x, mask, torch.log1p(delta.clamp(min=0))], dim=-1)
        out, _ = self.gru(inp)                                            # (B, T, H)
        idx = (lengths - 1).clamp(min=0).view(b, 1, 1).expand(b, 1, self.hidden_size)
        last = out.gather(1, idx).squeeze(1)
        return torch.where((lengths > 0).unsqueeze(1), last, torch.zeros_like(last))

    def forward(self, ehr: Mapping[str, Tensor]) -> Tensor:
        """``(B, out_dim)`` from the EHR dict."""
        return self.head(self.dropout(self.forward_features(ehr)))


@register_encoder("time_transformer", family="sequence")
class TimeTransformer(nn.Module):
    """Transformer encoder over irregular steps with a continuous-time embedding.

    Each valid step is embedded as ``Linear([values_t, m_t]) + PE(s_t)``
    where ``PE`` is the sinusoidal encoding of Vaswani et al. (2017) applied
    to the real observation time ``s_t`` (days) instead of an integer
    position: ``PE(s)_{2i} = sin(s w_i)``, ``PE(s)_{2i+1} = cos(s w_i)``,
    ``w_i = max_period^{-2i/d}``.  A ``nn.TransformerEncoder`` (pre-norm)
    attends over valid steps only (key padding mask from ``lengths``); the
    outputs are mean-pooled over valid steps.  A patient of length 0 gets a
    learned "empty" vector instead.

    Parameters
    ----------
    in_features
        Number of variables V.
    out_dim
        Output size.
    hidden_size
        Model width d (default: ``out_dim`` rounded up to a multiple of
        ``num_heads``); must be divisible by ``num_heads``.
    num_heads, num_layers
        Attention heads and encoder layers.
    dim_feedforward
        Feed-forward width (default ``4 d``).
    dropout
        Dropout inside the encoder layers and before the head.
    max_period
        Longest period of the time embedding, in days.
    """

    def __init__(
        self,
        in_features: int,
        out_dim: int,
        *,
        hidden_size: int | None = None,
        num_heads: int = 4,
        num_layers: int = 2,
        dim_feedforward: int | None = None,
        dropout: float = 0.1,
        max_period: float = 10000.0,
    ) -> None:
        super().__init__()
        self.in_features = _check_positive_int("in_features", in_features)
        self.out_dim = _check_positive_int("out_dim", out_dim)
        self.num_heads = _check_positive_int("num_heads", num_heads)
        self.num_layers = _check_positive_int("num_layers", num_layers)
        if hidden_size is None:
            hidden_size = self.num_heads * math.ceil(self.out_dim / self.num_heads)
        self.hidden_size = _check_positive_int("hidden_size", hidden_size)
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size ({self.hidden_size}) must be divisible by num_heads ({self.num_heads})")
        dff = 4 * self.hidden_size if dim_feedforward is None else dim_feedforward
        self.dim_feedforward = _check_positive_int("dim_feedforward", dff)
        self.dropout_p = _check_dropout(dropout)
        if isinstance(max_period, bool) or not isinstance(max_period, (int, float)) or not max_period > 1.0:
            raise ValueError(f"max_period must be a number > 1, got {max_period!r}")
        d = self.hidden_size
        n_freq = (d + 1) // 2
        freqs = torch.exp(-math.log(float(max_period)) * torch.arange(n_freq, dtype=torch.float32) * 2.0 / d)
        self.register_buffer("freqs", freqs)
        self.input_proj = nn.Linear(2 * self.in_features, d)
        layer = nn.TransformerEncoderLayer(d, self.num_heads, self.dim_feedforward, self.dropout_p,
                                           batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, self.num_layers, norm=nn.LayerNorm(d),
                                             enable_nested_tensor=False)
        self.empty = nn.Parameter(torch.randn(d) * 0.02)
        self.dropout = nn.Dropout(self.dropout_p)
        self.head = nn.Linear(d, self.out_dim)

    def time_embedding(self, times: Tensor) -> Tensor:
        """Sinusoidal embedding ``(B, T, d)`` of continuous times ``(B, T)``."""
        ang = times.unsqueeze(-1) * self.freqs.to(times.dtype)
        emb = torch.stack([torch.sin(ang), torch.cos(ang)], dim=-1).flatten(-2)
        return emb[..., : self.hidden_size]

    def forward_features(self, ehr: Mapping[str, Tensor]) -> Tensor:
        """Masked mean of the encoder outputs over valid steps, (B, d)."""
        values, mask, _, times, lengths, _ = _unpack(ehr, self.in_features, self.head.weight)
        b, t_eff, v = values.shape
        if t_eff == 0:  # every patient empty: one dummy step, replaced below
            values, mask, times, t_eff = values.new_zeros(b, 1, v), mask.new_zeros(b, 1, v), times.new_zeros(b, 1), 1
        valid = _valid_steps(lengths, t_eff)
        empty_row = lengths == 0
        # a fully masked row would give NaN attention: let empty rows see step 0, then discard them
        attend = valid | (empty_row.unsqueeze(1) & (torch.arange(t_eff, device=valid.device) == 0).unsqueeze(0))
        x = self.input_proj(torch.cat([values, mask], dim=-1)) + self.time_embedding(times)
        hid = self.encoder(x, src_key_padding_mask=~attend)
        w = valid.to(hid.dtype).unsqueeze(-1)
        pooled = (hid * w).sum(dim=1) / lengths.clamp(min=1).to(hid.dtype).unsqueeze(-1)
        return torch.where(empty_row.unsqueeze(1), self.empty.to(pooled.dtype).expand_as(pooled), pooled)

    def forward(self, ehr: Mapping[str, Tensor]) -> Tensor:
        """``(B, out_dim)`` from the EHR dict."""
        return self.head(self.dropout(self.forward_features(ehr)))
