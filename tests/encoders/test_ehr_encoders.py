"""Tests of the EHR sequence encoders (GRU-D and baselines)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from encoders.ehr import GRUD, GRUForwardFill, TimeTransformer, forward_fill
from encoders.registry import _REGISTRY

ENCODERS = {"grud": GRUD, "gru_ffill": GRUForwardFill, "time_transformer": TimeTransformer}


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def _random_ehr(lengths: list[int], t: int, v: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random EHR dict honouring the contract (padding all zero)."""
    rng = np.random.default_rng(seed)
    b = len(lengths)
    mask = (rng.random((b, t, v)) < 0.5).astype(np.float32)
    values = (rng.normal(size=(b, t, v)) * mask).astype(np.float32)
    times = np.zeros((b, t), dtype=np.float32)
    delta = np.zeros((b, t, v), dtype=np.float32)
    for i, n in enumerate(lengths):
        times[i, :n] = np.cumsum(rng.uniform(0.5, 3.0, size=n))
        for s in range(1, n):
            gap = times[i, s] - times[i, s - 1]
            delta[i, s] = np.where(mask[i, s - 1] > 0, gap, gap + delta[i, s - 1])
        mask[i, n:] = 0
        values[i, n:] = 0
    return {
        "values": torch.from_numpy(values),
        "mask": torch.from_numpy(mask),
        "delta": torch.from_numpy(delta),
        "times": torch.from_numpy(times),
        "lengths": torch.tensor(lengths, dtype=torch.int64),
    }


def _take(ehr: dict[str, torch.Tensor], i: int, t: int | None = None) -> dict[str, torch.Tensor]:
    """Patient ``i`` alone, with its time axis cut to ``t`` steps."""
    out = {k: v[i: i + 1] for k, v in ehr.items()}
    if t is not None:
        out = {k: (v[:, :t] if k != "lengths" else v) for k, v in out.items()}
    return out


def _stack(parts: list[dict[str, torch.Tensor]], t: int) -> dict[str, torch.Tensor]:
    """Concatenate single-patient dicts, zero-padding the time axis to ``t``."""
    out = {}
    for k in ("values", "mask", "delta", "times"):
        padded = []
        for p in parts:
            x = p[k]
            pad = torch.zeros((x.shape[0], t - x.shape[1]) + tuple(x.shape[2:]), dtype=x.dtype)
            padded.append(torch.cat([x, pad], dim=1))
        out[k] = torch.cat(padded)
    out["lengths"] = torch.cat([p["lengths"] for p in parts])
    return out


# --------------------------------------------------------------------------- #
# GRU-D against a hand computation of Che et al. (2018) eqs. (3)-(9)
# --------------------------------------------------------------------------- #
def test_grud_matches_hand_computation() -> None:
    v, h = 2, 2
    enc = GRUD(v, 3, hidden_size=h).eval()
    # fixed small weights
    wgx, bgx = np.array([0.8, 0.3]), np.array([-0.1, 0.2])
    wgh, bgh = np.array([[0.5, -0.2], [0.1, 0.4]]), np.array([0.05, -0.3])
    wz, uz, vz, bz = np.array([[0.2, -0.1], [0.3, 0.4]]), np.array([[0.1, 0.2], [-0.3, 0.1]]), \
        np.array([[0.5, 0.0], [0.0, -0.5]]), np.array([0.1, -0.1])
    wr, ur, vr, br = np.array([[-0.2, 0.1], [0.4, 0.2]]), np.array([[0.3, -0.1], [0.2, 0.2]]), \
        np.array([[0.1, 0.1], [-0.2, 0.3]]), np.array([0.0, 0.2])
    wn, un, vn, bn = np.array([[0.6, -0.3], [0.2, 0.5]]), np.array([[-0.4, 0.3], [0.1, 0.2]]), \
        np.array([[0.2, -0.1], [0.3, 0.1]]), np.array([-0.05, 0.1])
    whead, bhead = np.array([[1.0, -1.0], [0.5, 0.5], [0.0, 2.0]]), np.array([0.1, 0.2, 0.3])
    x_mean = np.array([0.5, -0.5])
    with torch.no_grad():
        f = lambda a: torch.tensor(a, dtype=torch.float32)  # noqa: E731
        enc.gamma_x_weight.copy_(f(wgx))
        enc.gamma_x_bias.copy_(f(bgx))
        enc.gamma_h.weight.copy_(f(wgh))
        enc.gamma_h.bias.copy_(f(bgh))
        enc.input_proj.weight.copy_(f(np.block([[wz, vz], [wr, vr], [wn, vn]])))
        enc.input_proj.bias.copy_(f(np.concatenate([bz, br, bn])))
        enc.hidden_zr.weight.copy_(f(np.vstack([uz, ur])))
        enc.hidden_n.weight.copy_(f(un))
        enc.head.weight.copy_(f(whead))
        enc.head.bias.copy_(f(bhead))
    enc.set_empirical_mean(x_mean)

    # t=0: var0=1.0 observed, var1 missing; t=1: var1=2.0 observed; t=2: nothing observed
    x = np.array([[1.0, 0.0], [0.0, 2.0], [0.0, 0.0]])
    m = np.array([[1.0, 0.0], [0.0, 1.0], [0.0, 0.0]])
    s = np.array([0.0, 1.0, 3.0])
    delta = np.array([[0.0, 0.0], [1.0, 1.0], [3.0, 2.0]])  # eq. (2) by hand
    ehr = {
        "values": torch.tensor(x[None], dtype=torch.float32),
        "mask": torch.tensor(m[None], dtype=torch.float32),
        "delta": torch.tensor(delta[None], dtype=torch.float32),
        "times": torch.tensor(s[None], dtype=torch.float32),
        "lengths": torch.tensor([3]),
    }

    hidden = np.zeros(h)
    x_last = x_mean.copy()
    states = []
    for t in range(3):
        gx = np.exp(-np.maximum(0.0, wgx * delta[t] + bgx))                   # eq. (3), diagonal
        gh = np.exp(-np.maximum(0.0, wgh @ delta[t] + bgh))                   # eq. (3), full
        x_last = np.where(m[t] > 0, x[t], x_last)
        x_hat = m[t] * x[t] + (1 - m[t]) * (gx * x_last + (1 - gx) * x_mean)  # eq. (4)
        hd = gh * hidden                                                      # eq. (5)
        z = _sigmoid(wz @ x_hat + uz @ hd + vz @ m[t] + bz)                   # eq. (6)
        r = _sigmoid(wr @ x_hat + ur @ hd + vr @ m[t] + br)                   # eq. (7)
        cand = np.tanh(wn @ x_hat + un @ (r * hd) + vn @ m[t] + bn)           # eq. (8)
        hidden = (1 - z) * hd + z * cand                                      # eq. (9)
        states.append(hidden)
    expected_out = whead @ hidden + bhead

    with torch.no_grad():
        out, seq = enc(ehr, return_sequences=True)
        feats = enc.forward_features(ehr)
    np.testing.assert_allclose(seq[0].numpy(), np.array(states), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(feats[0].numpy(), hidden, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(out[0].numpy(), expected_out, rtol=1e-5, atol=1e-6)

    # the same patient with 2 padding steps and length 3: identical, states frozen after step 3
    padded = _stack([ehr], 5)
    with torch.no_grad():
        out_p, seq_p = enc(padded, return_sequences=True)
    np.testing.assert_allclose(out_p.numpy(), out.numpy(), atol=1e-6)
    assert seq_p.shape == (1, 5, h)
    np.testing.assert_allclose(seq_p[0, 3:].numpy(), np.array([hidden, hidden]), atol=1e-6)


def test_grud_input_decay_limits() -> None:
    enc = GRUD(2, 4)
    enc.set_empirical_mean(torch.tensor([0.5, -1.0]))
    with torch.no_grad():
        enc.gamma_x_weight.fill_(10.0)
        enc.gamma_x_bias.fill_(0.0)
    values = torch.tensor([[[2.0, 0.0], [0.0, 0.0]]])
    mask = torch.tensor([[[1.0, 0.0], [0.0, 0.0]]])
    # long gap, strong decay: missing -> x_mean
    far = enc.impute(values, mask, torch.tensor([[[0.0, 0.0], [1000.0, 1000.0]]]))
    np.testing.assert_allclose(far[0, 1].detach().numpy(), [0.5, -1.0], atol=1e-6)
    # zero gap: missing -> last observation (x_mean if never observed)
    near = enc.impute(values, mask, torch.zeros(1, 2, 2))
    np.testing.assert_allclose(near[0, 1].detach().numpy(), [2.0, -1.0], atol=1e-6)
    # observed entries are passed through untouched
    np.testing.assert_allclose(near[0, 0].detach().numpy(), [2.0, -1.0], atol=1e-6)
    np.testing.assert_allclose(far[0, 0].detach().numpy(), [2.0, -1.0], atol=1e-6)
    # intermediate gap interpolates with gamma = exp(-10 * delta)
    mid = enc.impute(values, mask, torch.tensor([[[0.0, 0.0], [0.1, 0.1]]]))
    g = np.exp(-1.0)
    np.testing.assert_allclose(mid[0, 1, 0].item(), g * 2.0 + (1 - g) * 0.5, rtol=1e-5)


def test_forward_fill() -> None:
    values = torch.tensor([[[1.0], [0.0], [3.0], [0.0]]])
    mask = torch.tensor([[[0.0], [0.0], [1.0], [0.0]]])
    out = forward_fill(values, mask, torch.tensor([9.0]))
    assert out[0, :, 0].tolist() == [9.0, 9.0, 3.0, 3.0]


def test_set_empirical_mean_validates() -> None:
    enc = GRUD(3, 4)
    enc.set_empirical_mean(np.array([1.0, 2.0, 3.0]))
    assert enc.x_mean.tolist() == [1.0, 2.0, 3.0]
    with pytest.raises(ValueError, match="shape"):
        enc.set_empirical_mean([1.0, 2.0])
    with pytest.raises(ValueError, match="finite"):
        enc.set_empirical_mean([1.0, float("nan"), 0.0])


# --------------------------------------------------------------------------- #
# all three encoders
# --------------------------------------------------------------------------- #
def test_registered_as_sequence() -> None:
    for name, cls in ENCODERS.items():
        assert _REGISTRY[name].cls is cls
        assert _REGISTRY[name].family == "sequence"


@pytest.mark.parametrize("name", sorted(ENCODERS))
def test_padding_and_batch_invariance(name: str) -> None:
    torch.manual_seed(0)
    enc = ENCODERS[name](3, 6, hidden_size=8).eval()
    if isinstance(enc, GRUD):
        enc.set_empirical_mean(torch.tensor([0.1, -0.2, 0.3]))
    ehr = _random_ehr([4, 9, 2, 0, 6], t=9, v=3, seed=1)
    with torch.no_grad():
        full = enc(ehr)
        for i, n in enumerate([4, 9, 2, 0, 6]):
            alone = enc(_take(ehr, i, t=max(n, 1)))
            np.testing.assert_allclose(alone[0].numpy(), full[i].numpy(), atol=1e-5, err_msg=f"patient {i}")
            # more padding than needed
            padded = enc(_stack([_take(ehr, i, t=max(n, 1))], 12))
            np.testing.assert_allclose(padded[0].numpy(), full[i].numpy(), atol=1e-5)
        # other batch companions
        other = _random_ehr([7, 1], t=7, v=3, seed=5)
        mixed = enc(_stack([_take(other, 0), _take(ehr, 0, t=4), _take(other, 1, t=1)], 7))
        np.testing.assert_allclose(mixed[1].numpy(), full[0].numpy(), atol=1e-5)


@pytest.mark.parametrize("name", sorted(ENCODERS))
def test_shapes_length_zero_and_gradients(name: str) -> None:
    torch.manual_seed(0)
    enc = ENCODERS[name](4, 5)
    assert enc.out_dim == 5
    for lengths in ([3], [0], [3, 0], [0, 0]):
        ehr = _random_ehr(lengths, t=3, v=4, seed=2)
        enc.eval()
        with torch.no_grad():
            out = enc(ehr)
            feats = enc.forward_features(ehr)
        assert out.shape == (len(lengths), 5)
        assert feats.shape[0] == len(lengths)
        assert torch.isfinite(out).all() and torch.isfinite(feats).all()
        enc.train()
        out = enc(ehr)
        out.sum().backward()
        for p in enc.parameters():
            if p.grad is not None:
                assert torch.isfinite(p.grad).all()
        enc.zero_grad()
    # T = 0 (no steps at all)
    ehr = _random_ehr([0, 0], t=0, v=4)
    with torch.no_grad():
        assert torch.isfinite(enc.eval()(ehr)).all()


def test_grud_length_zero_is_h0_through_head() -> None:
    enc = GRUD(2, 3).eval()
    ehr = _random_ehr([0], t=4, v=2)
    with torch.no_grad():
        out, seq = enc(ehr, return_sequences=True)
    np.testing.assert_allclose(out[0].numpy(), enc.head.bias.detach().numpy(), atol=1e-7)
    assert seq.shape == (1, 4, 3) and torch.count_nonzero(seq) == 0


def test_nan_placeholders_at_missing_entries_do_not_leak() -> None:
    ehr = _random_ehr([3, 2], t=3, v=2, seed=3)
    ehr["values"] = torch.where(ehr["mask"] > 0, ehr["values"], torch.full_like(ehr["values"], float("nan")))
    for cls in ENCODERS.values():
        with torch.no_grad():
            assert torch.isfinite(cls(2, 4).eval()(ehr)).all()


def test_constructor_and_input_validation() -> None:
    with pytest.raises(ValueError, match="hidden_size"):
        GRUD(3, 4, hidden_size=0)
    with pytest.raises(ValueError, match="dropout"):
        GRUForwardFill(3, 4, dropout=1.5)
    with pytest.raises(ValueError, match="in_features"):
        GRUD(0, 4)
    with pytest.raises(ValueError, match="num_heads"):
        TimeTransformer(3, 4, hidden_size=6, num_heads=4)
    assert TimeTransformer(3, 6, num_heads=4).hidden_size == 8
    enc = GRUD(3, 4)
    with pytest.raises(ValueError, match="in_features"):
        enc(_random_ehr([2], t=2, v=2))
    bad = _random_ehr([2], t=2, v=3)
    bad["lengths"] = torch.tensor([5])
    with pytest.raises(ValueError, match="lengths"):
        enc(bad)
    del bad["delta"]
    with pytest.raises(ValueError, match="delta"):
        enc(bad)


# --------------------------------------------------------------------------- #
# GRU-D fused recurrence (hand-written backward) against plain autograd
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize("scripted", [True, False])
@pytest.mark.parametrize("return_sequences", [False, True])
def test_grud_fused_matches_autograd_reference(return_sequences: bool, scripted: bool,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    import encoders.ehr as ehr_mod

    if not scripted:  # the pure-Python loops (the fallback when TorchScript is unavailable)
        monkeypatch.setattr(ehr_mod, "_LOOPS", (ehr_mod._grud_forward_loop, ehr_mod._grud_backward_loop))
    torch.manual_seed(0)
    lengths = [7, 3, 0, 5, 7, 1]
    ehr = {k: (v.double() if v.is_floating_point() else v) for k, v in _random_ehr(lengths, t=7, v=3, seed=4).items()}
    fused = GRUD(3, 2, hidden_size=5, fused=True).double()
    ref = GRUD(3, 2, hidden_size=5, fused=False).double()
    ref.load_state_dict(fused.state_dict())
    fused.set_empirical_mean([0.2, -0.1, 0.3])
    ref.set_empirical_mean([0.2, -0.1, 0.3])
    weights = torch.linspace(-1.0, 1.0, 6 * 7 * 5, dtype=torch.float64).reshape(6, 7, 5)
    grads = []
    for enc in (fused, ref):
        inp = dict(ehr)
        inp["values"] = ehr["values"].clone().requires_grad_(True)
        inp["delta"] = ehr["delta"].clone().requires_grad_(True)
        enc.zero_grad()
        if return_sequences:
            out, seq = enc(inp, return_sequences=True)
            loss = (out ** 2).sum() + (seq * weights).sum()
        else:
            loss = (enc(inp) ** 3).sum()
        loss.backward()
        grads.append([loss.detach()] + [p.grad.clone() for p in enc.parameters()]
                     + [inp["values"].grad, inp["delta"].grad])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)


def test_grud_fused_gradcheck() -> None:
    from encoders.ehr import grud_recurrence

    torch.manual_seed(1)
    t, b, v, h = 4, 3, 2, 3
    lengths = torch.tensor([4, 2, 0])
    xm = torch.randn(t, b, 2 * v, dtype=torch.float64, requires_grad=True)
    delta = torch.rand(t, b, v, dtype=torch.float64).mul(3.0).requires_grad_(True)
    params = [torch.randn(3 * h, 2 * v), torch.randn(3 * h), torch.randn(h, v), torch.randn(h) - 1.0,
              torch.randn(2 * h, h), torch.randn(h, h)]
    params = [p.double().mul(0.5).requires_grad_(True) for p in params]

    def f(*args):
        h_last, states = grud_recurrence(*args, lengths, return_states=True)
        return h_last, states

    assert torch.autograd.gradcheck(f, (xm, delta, *params), eps=1e-6, atol=1e-6)


def test_grud_float32_fused_close_to_reference_and_validation() -> None:
    torch.manual_seed(0)
    enc = GRUD(3, 4, hidden_size=6)
    ref = GRUD(3, 4, hidden_size=6, fused=False)
    ref.load_state_dict(enc.state_dict())
    ehr = _random_ehr([5, 2, 0, 4], t=5, v=3, seed=7)
    out, seq = enc(ehr, return_sequences=True)
    out_r, seq_r = ref(ehr, return_sequences=True)
    torch.testing.assert_close(out, out_r, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(seq, seq_r, rtol=1e-5, atol=1e-6)
    (out.sum() + seq.sum()).backward()
    (out_r.sum() + seq_r.sum()).backward()
    for p, q in zip(enc.parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="fused"):
        GRUD(3, 4, fused="yes")


def test_grud_fused_recycled_buffers_are_safe() -> None:
    """Interleaved graphs, a retained graph and kept outputs all see their own data."""
    torch.manual_seed(2)
    enc = GRUD(3, 2, hidden_size=4)
    ref = GRUD(3, 2, hidden_size=4, fused=False)
    ref.load_state_dict(enc.state_dict())
    a, b = _random_ehr([4, 2], t=4, v=3, seed=8), _random_ehr([4, 3], t=4, v=3, seed=9)

    def grads(model, first, second, retain=False):
        model.zero_grad()
        out_a, out_b = model(first), model(second)      # two graphs alive at once
        out_b.pow(2).sum().backward()
        loss_a = out_a.sum()
        loss_a.backward(retain_graph=retain)
        if retain:
            loss_a.backward()                             # second pass through the same graph
        return [p.grad.clone() for p in model.parameters()]

    for retain in (False, True):
        for g_f, g_r in zip(grads(enc, a, b, retain), grads(ref, a, b, retain)):
            torch.testing.assert_close(g_f, g_r, rtol=1e-4, atol=1e-6)
    # outputs never alias recycled memory
    with torch.no_grad():
        out1 = enc(a, return_sequences=True)
        kept = [t.clone() for t in out1]
        for _ in range(3):
            enc(b, return_sequences=True)
    for x, y in zip(out1, kept):
        torch.testing.assert_close(x, y, rtol=0, atol=0)
