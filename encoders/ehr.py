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
import os
import warnings
from typing import Mapping

import numpy as np
import torch
from torch import Tensor, nn

from encoders.registry import register_encoder

__all__ = ["GRUD", "GRUForwardFill", "TimeTransformer", "forward_fill", "grud_recurrence", "EHR_KEYS"]

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
# GRU-D recurrence: autograd reference loop and fused forward/backward
# --------------------------------------------------------------------------- #
def _grud_recurrence_reference(
    xm: Tensor, delta: Tensor, w_in: Tensor, b_in: Tensor, w_gh: Tensor, b_gh: Tensor, w_zr: Tensor,
    w_n: Tensor, valid: Tensor, n_full: int, want_states: bool,
) -> tuple[Tensor, Tensor]:
    """Plain-autograd GRU-D recurrence, the reference for :class:`_GRUDRecurrence`.

    Same arguments as :meth:`_GRUDRecurrence.forward`; returns ``(h, states)``
    with ``states`` empty unless ``want_states``.
    """
    t_eff, b, _ = xm.shape
    hs = w_n.shape[0]
    gamma_h = torch.exp(-torch.relu(torch.nn.functional.linear(delta, w_gh, b_gh)))     # (T, B, H)
    gi = torch.nn.functional.linear(xm, w_in, b_in)                                     # (T, B, 3H)
    h = xm.new_zeros(b, hs)
    u_zr, u_n = w_zr.t(), w_n.t()
    valid_b = valid > 0
    states = []
    for t, (gi_t, g_t) in enumerate(zip(gi.unbind(0), gamma_h.unbind(0))):
        hd = h * g_t
        z, r = torch.sigmoid(torch.addmm(gi_t[:, : 2 * hs], hd, u_zr)).chunk(2, dim=1)
        cand = torch.tanh(torch.addmm(gi_t[:, 2 * hs:], r * hd, u_n))
        h_new = torch.lerp(hd, cand, z)
        h = h_new if t < n_full else torch.where(valid_b[t], h_new, h)
        if want_states:
            states.append(h)
    return h, (torch.stack(states) if want_states else h.new_empty(0))


class _Workspace:
    """Recycled CPU buffers for the per-step tensors the fused GRU-D keeps for backward.

    Tensors kept alive from forward to backward are fresh memory on every
    training step; on CPU touching fresh pages (page faults) costs about as
    much as the GRU-D arithmetic itself.  A few buffers are therefore
    recycled: forward takes one and hands it to a :class:`_Lease` stored on
    the autograd context, which gives it back when the graph is freed (so a
    second backward with ``retain_graph=True`` still reads intact data).
    """

    _pool: dict[tuple, list[Tensor]] = {}
    _max_cached = 4                 # buffers
    _max_bytes = 256 * 2**20        # larger buffers are not kept

    @classmethod
    def take(cls, numel: int, like: Tensor) -> Tensor:
        free = cls._pool.get((numel, like.dtype, like.device))
        return free.pop() if free else like.new_empty(numel)

    @classmethod
    def give_back(cls, buf: Tensor) -> None:
        if buf.device.type != "cpu" or buf.numel() * buf.element_size() > cls._max_bytes:
            return  # (the CUDA caching allocator already recycles memory)
        if sum(len(v) for v in cls._pool.values()) >= cls._max_cached:
            cls._pool.clear()
        cls._pool.setdefault((buf.numel(), buf.dtype, buf.device), []).append(buf)


class _Lease:
    """Gives a workspace buffer back to :class:`_Workspace` when it is garbage collected."""

    __slots__ = ("buf",)

    def __init__(self, buf: Tensor) -> None:
        self.buf = buf

    def __del__(self) -> None:
        try:
            _Workspace.give_back(self.buf)
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass


def _grud_forward_loop(
    xm1: Tensor, d1: Tensor, u_in: Tensor, u_gh: Tensor, u_zr: Tensor, u_n: Tensor, valid: Tensor, n_full: int,
    h_all: Tensor, g_all: Tensor, gs_all: Tensor, hd_all: Tensor, zr_all: Tensor, q_all: Tensor, n_all: Tensor,
) -> Tensor:
    """Forward time loop of :class:`_GRUDRecurrence` (TorchScript-compatible); returns the last state.

    ``xm1`` (T, B, 2V + 1) and ``d1`` (T, B, V + 1) carry a trailing column
    of ones (biases folded into ``u_in`` (2V + 1, 3H) and ``u_gh``
    (V + 1, H)); ``u_zr`` (H, 2H) and ``u_n`` (H, H) are the transposed
    recurrent weights.  Per step it writes ``h``, ``gamma_h``, the sign used
    by its derivative, ``hd``, ``[z, r]``, ``q = r hd`` and the candidate
    into the ``*_all`` (T, B, .) planes.
    """
    t_eff = xm1.shape[0]
    b = xm1.shape[1]
    hs = u_n.shape[0]
    h = torch.zeros([b, hs], dtype=xm1.dtype, device=xm1.device)
    tmp = torch.empty([b, hs], dtype=xm1.dtype, device=xm1.device)
    valid_b = valid > 0
    for t in range(t_eff):
        # gamma_h = exp(-max(0, a)) = exp(min(0, -a)), a = W_gh delta + b_gh;
        # d gamma / d a = gamma * sign(min(0, -a)) (0 where a <= 0)
        g = torch.mm(d1[t], u_gh, out=g_all[t])
        g.neg_()
        g.clamp_(max=0.0)
        torch.sign(g, out=gs_all[t])
        g.exp_()
        gi = torch.mm(xm1[t], u_in)                                               # (B, 3H)
        hd = torch.mul(h, g, out=hd_all[t])
        zr = torch.addmm(gi[:, : 2 * hs], hd, u_zr, out=zr_all[t])
        zr.sigmoid_()
        q = torch.mul(zr[:, hs:], hd, out=q_all[t])
        # tanh(a) = 2 sigmoid(2a) - 1 (sigmoid is much faster than tanh on CPU)
        n = torch.addmm(gi[:, 2 * hs:], q, u_n, beta=2.0, alpha=2.0, out=n_all[t])
        n.sigmoid_()
        n.mul_(2.0)
        n.sub_(1.0)
        if t < n_full:
            h = torch.lerp(hd, n, zr[:, :hs], out=h_all[t])
        else:
            torch.lerp(hd, n, zr[:, :hs], out=tmp)
            h = torch.where(valid_b[t], tmp, h, out=h_all[t])
    return h


def _grud_backward_loop(
    d_h: Tensor, d_states: Tensor, xm1: Tensor, d1: Tensor, w_in: Tensor, w_gh: Tensor, w_zr: Tensor, w_n: Tensor,
    valid: Tensor, n_full: int, h_all: Tensor, g_all: Tensor, gs_all: Tensor, hd_all: Tensor, zr_all: Tensor,
    q_all: Tensor, n_all: Tensor, need_xm: bool, need_delta: bool,
) -> list[Tensor]:
    """Backward time loop of :class:`_GRUDRecurrence` (TorchScript-compatible).

    Returns ``[d_xm, d_delta, d_u_in, d_u_gh, d_w_zr, d_w_n]`` (``d_xm`` and
    ``d_delta`` empty unless needed; ``d_u_in`` = ``[d w_in, d b_in]``,
    ``d_u_gh`` = ``[d w_gh, d b_gh]``).
    """
    t_eff = xm1.shape[0]
    b = xm1.shape[1]
    n_in = xm1.shape[2]
    hs = w_n.shape[0]
    seq_grad = d_states.numel() > 0
    d_xm = torch.zeros([t_eff, b, n_in - 1], dtype=xm1.dtype, device=xm1.device) if need_xm \
        else torch.empty([0], dtype=xm1.dtype, device=xm1.device)
    d_delta = torch.zeros([t_eff, b, d1.shape[2] - 1], dtype=xm1.dtype, device=xm1.device) if need_delta \
        else torch.empty([0], dtype=xm1.dtype, device=xm1.device)
    d_u_in = torch.zeros([3 * hs, n_in], dtype=xm1.dtype, device=xm1.device)
    d_u_gh = torch.zeros([hs, d1.shape[2]], dtype=xm1.dtype, device=xm1.device)
    d_w_zr = torch.zeros_like(w_zr)
    d_w_n = torch.zeros_like(w_n)
    one = torch.ones([], dtype=xm1.dtype, device=xm1.device)
    dh = d_h.contiguous()
    for i in range(t_eff):
        t = t_eff - 1 - i
        if seq_grad:
            dh = dh + d_states[t]
        zr = zr_all[t]
        n = n_all[t]
        hd = hd_all[t]
        z = zr[:, :hs]
        r = zr[:, hs:]
        dh_new = dh
        dh_skip = dh
        frozen = t >= n_full
        if frozen:
            dh_new = dh * valid[t]
            dh_skip = dh - dh_new
        # h = hd + z (n - hd);  n = tanh(gi_n + q U^T), q = r hd;  [z, r] = sigmoid(gi_zr + hd [U_z; U_r]^T)
        dgi = torch.empty([b, 3 * hs], dtype=xm1.dtype, device=xm1.device)     # d [z; r; n] pre-activations
        dzr = dgi[:, : 2 * hs]
        dn = torch.mul(dh_new, z, out=dgi[:, 2 * hs:])
        dn.mul_(torch.addcmul(one, n, n, value=-1.0))
        dq = torch.mm(dn, w_n)
        dz = torch.sub(n, hd, out=dgi[:, :hs])
        dz.mul_(dh_new)
        torch.mul(dq, hd, out=dgi[:, hs: 2 * hs])
        dzr.mul_(torch.addcmul(zr, zr, zr, value=-1.0))
        dhd = torch.addcmul(dh_new, dh_new, z, value=-1.0)
        dhd.addcmul_(dq, r)
        dhd.addmm_(dzr, w_zr)
        d_w_zr.addmm_(dzr.t(), hd)
        d_w_n.addmm_(dn.t(), q_all[t])
        d_u_in.addmm_(dgi.t(), xm1[t])
        if need_xm:
            torch.mm(dgi, w_in, out=d_xm[t])
        dh = dhd.mul_(g_all[t])                   # d h_{t-1} through hd = gamma_h h_{t-1}
        if t > 0:  # h_0 = 0: no gradient reaches gamma_h at the first step
            dpre = torch.mul(dh, h_all[t - 1])    # d a, a = W_gh delta + b_gh
            dpre.mul_(gs_all[t])
            d_u_gh.addmm_(dpre.t(), d1[t])
            if need_delta:
                torch.mm(dpre, w_gh, out=d_delta[t])
        if frozen:
            dh = dh.add_(dh_skip)
    return [d_xm, d_delta, d_u_in, d_u_gh, d_w_zr, d_w_n]


_LOOPS: tuple | None = None


def _loops() -> tuple:
    """The two time loops, compiled with TorchScript when it is available (about 2x less overhead per op).

    ``torch.jit.script`` is deprecated in recent PyTorch; its warning is
    silenced here and any failure falls back to the Python functions (same
    results, slower).  Set ``RADFUSION_GRUD_NO_JIT=1`` to use the Python
    loops.
    """
    global _LOOPS
    if _LOOPS is None:
        loops: tuple = (_grud_forward_loop, _grud_backward_loop)
        if os.environ.get("RADFUSION_GRUD_NO_JIT", "") in ("", "0"):
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    loops = (torch.jit.script(_grud_forward_loop), torch.jit.script(_grud_backward_loop))
            except Exception:  # noqa: BLE001 - TorchScript missing or unable: the Python loops are exact
                loops = (_grud_forward_loop, _grud_backward_loop)
        _LOOPS = loops
    return _LOOPS


class _GRUDRecurrence(torch.autograd.Function):
    """GRU-D recurrence with a hand-written backward (same maths as the reference loop).

    Everything that touches ``(T, B, H)``-sized data is done one step at a
    time on small ``(B, .)`` tensors: per step the forward computes
    ``gamma_h``, the input projections and the gated update (no autograd
    bookkeeping), writing what backward needs into a recycled workspace
    (:class:`_Workspace`); backward walks the steps in reverse, accumulating
    every weight gradient with in-place ``addmm_`` (biases folded into the
    weights through a column of ones).  Both loops are TorchScript-compiled
    when possible (:func:`_loops`).  On CPU this avoids most page faults and
    most of the per-op overhead of autograd and Python.  First-order
    gradients only (``once_differentiable``).
    """

    @staticmethod
    def forward(ctx, xm: Tensor, delta: Tensor, w_in: Tensor, b_in: Tensor, w_gh: Tensor, b_gh: Tensor,
                w_zr: Tensor, w_n: Tensor, valid: Tensor, n_full: int, want_states: bool) -> tuple[Tensor, Tensor]:
        """Run the recurrence.

        ``xm`` (T, B, 2V) ``[x_hat, m]``; ``delta`` (T, B, V); ``w_in`` (3H, 2V),
        ``b_in`` (3H,) input-side gate weights ``[z; r; n]``; ``w_gh`` (H, V),
        ``b_gh`` (H,) hidden decay; ``w_zr`` (2H, H), ``w_n`` (H, H)
        recurrent weights; ``valid`` (T, B, 1) float; steps ``t < n_full``
        are valid for every row.  Returns ``h`` (B, H) and the states
        (T, B, H) (empty unless ``want_states``).
        """
        t_eff, b, _ = xm.shape
        hs = w_n.shape[0]
        ones = xm.new_ones(t_eff, b, 1)
        xm1 = torch.cat([xm, ones], dim=2)                       # biases as an extra input column
        d1 = torch.cat([delta, ones], dim=2)
        u_in = torch.cat([w_in, b_in[:, None]], dim=1).t()       # (2V + 1, 3H)
        u_gh = torch.cat([w_gh, b_gh[:, None]], dim=1).t()       # (V + 1, H)
        # workspace planes, each (T, B, width): h, gamma_h, sign, hd, [z, r], q = r hd, candidate n
        buf = _Workspace.take(t_eff * b * 8 * hs, xm)
        planes, off = [], 0
        for width in (1, 1, 1, 1, 2, 1, 1):
            planes.append(buf[off * t_eff * b * hs:(off + width) * t_eff * b * hs].view(t_eff, b, width * hs))
            off += width
        forward_loop, _ = _loops()
        h = forward_loop(xm1, d1, u_in, u_gh, w_zr.t(), w_n.t(), valid, n_full, *planes)
        h_last = h.clone()
        states = planes[0].clone() if want_states else h.new_empty(0)
        if any(ctx.needs_input_grad[:8]):
            ctx.save_for_backward(xm1, d1, w_in, w_gh, w_zr, w_n, valid)
            ctx.planes = planes
            ctx.lease = _Lease(buf)       # back to the pool when the graph is freed
            ctx.n_full = n_full
        else:
            _Workspace.give_back(buf)
        return h_last, states

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, d_h: Tensor, d_states: Tensor):
        xm1, d1, w_in, w_gh, w_zr, w_n, valid = ctx.saved_tensors
        _, backward_loop = _loops()
        need = ctx.needs_input_grad
        d_xm, d_delta, d_u_in, d_u_gh, d_w_zr, d_w_n = backward_loop(
            d_h, d_states, xm1, d1, w_in, w_gh, w_zr, w_n, valid, ctx.n_full, *ctx.planes, need[0], need[1])
        return (d_xm if need[0] else None, d_delta if need[1] else None, d_u_in[:, :-1], d_u_in[:, -1],
                d_u_gh[:, :-1], d_u_gh[:, -1], d_w_zr, d_w_n, None, None, None)


def grud_recurrence(
    xm: Tensor, delta: Tensor, w_in: Tensor, b_in: Tensor, w_gh: Tensor, b_gh: Tensor, w_zr: Tensor,
    w_n: Tensor, lengths: Tensor, *, return_states: bool = False, fused: bool = True,
) -> tuple[Tensor, Tensor | None]:
    """GRU-D hidden-state decay and GRU update (Che et al. 2018), time-major.

    Parameters
    ----------
    xm
        ``(T, B, 2V)`` decayed inputs and mask ``[x_hat_t, m_t]``.
    delta
        ``(T, B, V)`` time intervals.
    w_in, b_in
        ``(3H, 2V)``, ``(3H,)``: ``[W_z V_z; W_r V_r; W V]`` and ``[b_z; b_r; b]``.
    w_gh, b_gh
        ``(H, V)``, ``(H,)``: ``W_gh``, ``b_gh`` of
        ``gamma_h = exp(-max(0, W_gh delta_t + b_gh))``.
    w_zr, w_n
        ``(2H, H)`` ``[U_z; U_r]`` and ``(H, H)`` ``U`` (``nn.Linear``
        weights: the recurrent term is ``hd @ w.T``).
    lengths
        ``(B,)`` valid steps per row; the state is frozen for ``t >= length``.
    return_states
        Also return every step's state, ``(T, B, H)``.
    fused
        Use :class:`_GRUDRecurrence` (hand-written backward, first-order
        gradients) instead of the plain autograd loop.

    Returns
    -------
    tuple
        ``h`` ``(B, H)``, the state at each row's last valid step (0 for
        length 0), and the states ``(T, B, H)`` or ``None``.  Under autocast
        the recurrence runs in ``w_zr``'s dtype.
    """
    dt = w_zr.dtype
    xm, delta = xm.to(dt).contiguous(), delta.to(dt).contiguous()
    t_eff, b, _ = xm.shape
    valid = _valid_steps(lengths, t_eff).transpose(0, 1).unsqueeze(-1).to(dt)
    n_full = int(lengths.min()) if b else 0
    args = (xm, delta, w_in, b_in, w_gh, b_gh, w_zr, w_n, valid, n_full, return_states)
    if fused:
        with torch.autocast(device_type=xm.device.type, enabled=False):
            h, states = _GRUDRecurrence.apply(*args)
    else:
        h, states = _grud_recurrence_reference(*args)
    return h, (states if return_states else None)


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

    The input decay (``x_hat`` for all steps, with a vectorised forward
    fill) is computed before the time loop.  The loop (hidden decay, input
    projections, gates) is :func:`grud_recurrence`, by default a custom
    autograd function (:class:`_GRUDRecurrence`) that works on small per-step
    tensors and has a hand-written backward (2-3x the training throughput
    of PyPOTS' GRU-D on CPU, see ``benchmarks/ehr.py``); ``fused=False`` runs the same
    maths with plain autograd.  For ``t >= length``
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
    fused
        Run the recurrence with the fused forward/backward of
        :class:`_GRUDRecurrence` (default; first-order gradients, about
        1.4x faster than the autograd loop on CPU and lighter on memory)
        instead of the plain autograd loop (needed only for double
        backward, e.g. gradient penalties).  Both compute the same maths.

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
        fused: bool = True,
    ) -> None:
        super().__init__()
        self.in_features = _check_positive_int("in_features", in_features)
        self.out_dim = _check_positive_int("out_dim", out_dim)
        self.hidden_size = _check_positive_int("hidden_size", out_dim if hidden_size is None else hidden_size)
        self.dropout_p = _check_dropout(dropout)
        if not isinstance(return_sequences, bool):
            raise ValueError(f"return_sequences must be a bool, got {return_sequences!r}")
        self.return_sequences = return_sequences
        if not isinstance(fused, bool):
            raise ValueError(f"fused must be a bool, got {fused!r}")
        self.fused = fused
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
        seq = None
        if t_eff > 0:
            x_hat = self.impute(values, mask, delta)
            # time-major (small (T, B, V) copies), so per-step slices are contiguous
            xm = torch.cat([x_hat, mask], dim=-1).transpose(0, 1)
            h, seq = grud_recurrence(xm, delta.transpose(0, 1), self.input_proj.weight, self.input_proj.bias,
                                     self.gamma_h.weight, self.gamma_h.bias, self.hidden_zr.weight,
                                     self.hidden_n.weight, lengths, return_states=want_sequences, fused=self.fused)
            if seq is not None:
                seq = seq.transpose(0, 1)
        if want_sequences:
            if seq is None:
                seq = values.new_zeros(b, 0, hs)
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
