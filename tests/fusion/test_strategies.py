import pytest
import torch

from fusion.strategies import create_fusion, list_fusions

DIMS = {"ct": 6, "ehr": 4, "omics": 5}
#: every registered strategy with its defaults, plus the non-default variants that change the forward pass
VARIANTS = [(n, {}) for n in list_fusions()] + [("cross_attention", {"readout": r}) for r in ("concat", "cls")]
_IDS = [n + ("-" + "-".join(f"{k}={v}" for k, v in kw.items()) if kw else "") for n, kw in VARIANTS]


def _inputs(b=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    emb = {m: torch.randn(b, d, generator=g) for m, d in DIMS.items()}
    present = {
        "ct": torch.tensor([True, False, True, True, False])[:b],
        "ehr": torch.tensor([True, True, False, True, False])[:b],
        "omics": torch.tensor([True, True, True, False, True])[:b],
    }
    return emb, present


@pytest.mark.parametrize("name, kw", VARIANTS, ids=_IDS)
def test_strategy_contract(name, kw):
    torch.manual_seed(0)
    f = create_fusion(name, DIMS, 8, **kw).eval()
    emb, present = _inputs()
    out = f(emb, present)
    assert out["embedding"].shape == (5, 8) and torch.isfinite(out["embedding"]).all()
    # content of an absent modality never matters
    emb2 = {m: e.clone() for m, e in emb.items()}
    emb2["ct"][1] = 1e4
    emb2["omics"][3] = -1e4
    torch.testing.assert_close(f(emb2, present)["embedding"], out["embedding"])
    # a patient's output does not depend on the rest of the batch
    for i in range(5):
        one = f({m: e[i:i + 1] for m, e in emb.items()}, {m: p[i:i + 1] for m, p in present.items()})
        torch.testing.assert_close(one["embedding"], out["embedding"][i:i + 1], atol=1e-5, rtol=1e-5)
    if "attention" in out:
        a = out["attention"]
        mask = torch.stack([present[m] for m in sorted(DIMS)], dim=1)
        assert a.shape == (5, 3)
        torch.testing.assert_close(a.sum(1), torch.ones(5))
        assert (a[~mask] == 0).all()


@pytest.mark.parametrize("name, kw", VARIANTS, ids=_IDS)
def test_strategy_trains(name, kw):
    f = create_fusion(name, DIMS, 8, **kw).train()
    emb, present = _inputs()
    emb = {m: e.requires_grad_() for m, e in emb.items()}
    f(emb, present)["embedding"].sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in f.parameters() if p.grad is not None)
    assert emb["ct"].grad[1].abs().sum() == 0  # no gradient into an absent modality


def test_low_rank_tensor_fusion_equals_kronecker_product_with_the_factorised_weight():
    """LMF (Liu et al. 2018): sum_r lambda_r prod_m W_m^r [h_m;1] == W . ([h_1;1] (x) [h_2;1])."""
    torch.manual_seed(0)
    dims = {"a": 3, "b": 2}
    f = create_fusion("tensor", dims, 4, dropout=0.0, rank=3).eval()
    with torch.no_grad():
        f.bias.zero_()
    emb = {"a": torch.randn(2, 3), "b": torch.randn(2, 2)}
    present = {"a": torch.ones(2, dtype=torch.bool), "b": torch.ones(2, dtype=torch.bool)}
    got = f(emb, present)["embedding"]
    Wa, Wb, lam = f.factors["a"], f.factors["b"], f.rank_weights  # (R, 4, O), (R, 3, O)
    W = torch.einsum("r,rio,rjo->ijo", lam, Wa, Wb)  # full tensor (4, 3, O)
    za = torch.cat([emb["a"], torch.ones(2, 1)], 1)
    zb = torch.cat([emb["b"], torch.ones(2, 1)], 1)
    kron = torch.einsum("bi,bj->bij", za, zb)
    expected = torch.relu(torch.einsum("bij,ijo->bo", kron, W))
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_low_rank_tensor_fusion_starts_as_an_additive_model():
    """Each factor's row for the appended 1 starts at 1, so at initialisation z(0) = sum_r lambda_r = 1 and, to
    first order in the embeddings, z = 1 + sum_r lambda_r sum_m W_m^r h_m (no vanishing product of six factors)."""
    torch.manual_seed(0)
    dims = {m: 4 for m in ("a", "b", "c", "d", "e", "f")}
    f = create_fusion("tensor", dims, 5, dropout=0.0, rank=3).eval()
    present = {m: torch.ones(2, dtype=torch.bool) for m in dims}
    zero = {m: torch.zeros(2, 4) for m in dims}
    torch.testing.assert_close(f(zero, present)["embedding"], torch.ones(2, 5))
    h = {m: torch.randn(2, 4) for m in dims}
    eps = 1e-3
    got = (f({m: eps * v for m, v in h.items()}, present)["embedding"] - 1.0) / eps
    lam = f.rank_weights
    linear = sum(torch.einsum("r,bd,rdo->bo", lam, h[m], f.factors[m][:, :4, :]) for m in dims)
    torch.testing.assert_close(got, linear, atol=5e-3, rtol=5e-3)


def test_cross_attention_cls_sum_is_the_cls_readout_plus_the_present_input_tokens():
    torch.manual_seed(0)
    f = create_fusion("cross_attention", DIMS, 8, readout="cls_sum").eval()
    g = create_fusion("cross_attention", DIMS, 8, readout="cls").eval()
    g.load_state_dict(f.state_dict())
    emb, present = _inputs()
    got, cls = f(emb, present), g(emb, present)
    # by hand: each present modality's projection plus its type embedding, summed; absent ones add nothing
    want = cls["embedding"].clone()
    for j, m in enumerate(f.modalities):
        tok = emb[m] @ f.proj[m].weight.T + f.proj[m].bias + f.type_emb[j]
        want += present[m].unsqueeze(1) * tok
    torch.testing.assert_close(got["embedding"], want)
    torch.testing.assert_close(got["attention"], cls["attention"])


@pytest.mark.parametrize("kw, field", [({"rank": 0}, "rank"), ({"num_heads": 3}, "num_heads"),
                                       ({"attn_dim": 0}, "attn_dim"), ({"readout": "mean"}, "readout")])
def test_bad_arguments_name_the_argument(kw, field):
    name = {"rank": "tensor", "num_heads": "cross_attention", "attn_dim": "gated_attention",
            "readout": "cross_attention"}[field]
    with pytest.raises(ValueError, match=field):
        create_fusion(name, DIMS, 8, **kw)


# --------------------------------------------------------------------------- #
# Every missing pattern, for every strategy
# --------------------------------------------------------------------------- #
import itertools  # noqa: E402

PATTERNS = list(itertools.product([False, True], repeat=3))  # (ct, ehr, omics), includes "nothing present"


def _all_patterns(seed=0):
    g = torch.Generator().manual_seed(seed)
    b = len(PATTERNS)
    emb = {m: torch.randn(b, d, generator=g) for m, d in DIMS.items()}
    pat = torch.tensor(PATTERNS)
    present = {m: pat[:, j].clone() for j, m in enumerate(sorted(DIMS))}
    return emb, present


@pytest.mark.parametrize("name, kw", VARIANTS, ids=_IDS)
def test_every_missing_pattern_ignores_absent_rows_even_nan(name, kw):
    torch.manual_seed(0)
    f = create_fusion(name, DIMS, 9 if name != "cross_attention" else 8, **kw).eval()
    emb, present = _all_patterns()
    out = f(emb, present)
    poisoned = {m: torch.where(present[m].unsqueeze(1), e, torch.full_like(e, float("nan"))) for m, e in emb.items()}
    out2 = f(poisoned, present)
    for key, val in out.items():
        assert torch.isfinite(val).all(), key
        torch.testing.assert_close(out2[key], val, msg=key)
    # a patient's output equals what it gets alone (no batch mixing), for every pattern
    for i in range(len(PATTERNS)):
        one = f({m: e[i:i + 1] for m, e in emb.items()}, {m: p[i:i + 1] for m, p in present.items()})
        torch.testing.assert_close(one["embedding"], out["embedding"][i:i + 1], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name, kw", VARIANTS, ids=_IDS)
def test_every_missing_pattern_gradients_are_finite_and_skip_absent_rows(name, kw):
    torch.manual_seed(0)
    f = create_fusion(name, DIMS, 8, **kw).train()
    emb, present = _all_patterns(seed=1)
    emb = {m: torch.where(present[m].unsqueeze(1), e, torch.full_like(e, float("nan"))).requires_grad_()
           for m, e in emb.items()}
    out = f(emb, present)
    loss = out["embedding"].sum() + (out["risk"].sum() if "risk" in out else 0)
    loss.backward()
    for p in f.parameters():
        assert p.grad is None or torch.isfinite(p.grad).all()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in f.parameters())
    for m, e in emb.items():
        assert torch.isfinite(e.grad).all()
        assert (e.grad[~present[m]] == 0).all()


# --------------------------------------------------------------------------- #
# bilinear (explicit Kronecker)
# --------------------------------------------------------------------------- #
def test_bilinear_equals_explicit_kronecker_product_and_missing_is_the_one_only_vector():
    torch.manual_seed(0)
    dims = {"a": 3, "b": 2}
    f = create_fusion("bilinear", dims, 5, dropout=0.0, rank_dim=2, gated=False).eval()
    emb = {"a": torch.randn(3, 3), "b": torch.randn(3, 2)}
    present = {"a": torch.tensor([True, True, False]), "b": torch.tensor([True, False, True])}
    got = f(emb, present)["embedding"]
    rows = []
    for i in range(3):
        ha = f.proj["a"](emb["a"][i]) if present["a"][i] else torch.zeros(2)
        hb = f.proj["b"](emb["b"][i]) if present["b"][i] else torch.zeros(2)
        z = torch.kron(torch.cat([ha, torch.ones(1)]), torch.cat([hb, torch.ones(1)]))  # (9,)
        rows.append(torch.relu(f.out[0](z)))
    torch.testing.assert_close(got, torch.stack(rows))
    assert f.n_features == 9


def test_bilinear_six_modalities_default_size_and_gate():
    dims = {f"m{i}": 4 for i in range(6)}
    f = create_fusion("bilinear", dims, 8).eval()
    assert f.n_features == 5 ** 6
    emb = {m: torch.randn(2, 4) for m in dims}
    present = {m: torch.tensor([True, i % 2 == 0]) for i, m in enumerate(dims)}
    assert f(emb, present)["embedding"].shape == (2, 8)


# --------------------------------------------------------------------------- #
# late
# --------------------------------------------------------------------------- #
def test_late_risk_is_the_mean_of_present_modality_heads():
    torch.manual_seed(0)
    f = create_fusion("late", DIMS, 8, dropout=0.0).eval()
    emb, present = _all_patterns(seed=2)
    out = f(emb, present)
    mods = sorted(DIMS)
    assert [f.block_dims[m] for m in mods] == [3, 3, 2]
    for i, pat in enumerate(PATTERNS):
        rs = [f.risk_heads[m](f.proj[m](emb[m][i])).item() for m, p in zip(mods, pat) if p]
        expected = sum(rs) / len(rs) if rs else 0.0
        assert out["risk"][i].item() == pytest.approx(expected, abs=1e-6)
        for j, (m, p) in enumerate(zip(mods, pat)):
            r = f.risk_heads[m](f.proj[m](emb[m][i])).item() if p else 0.0
            assert out["modality_risks"][i, j].item() == pytest.approx(r, abs=1e-6)
            assert out["attention"][i, j].item() == pytest.approx(1 / len(rs) if p else 0.0)
    # embedding: projected blocks in sorted order, absent blocks zero
    blocks = torch.split(out["embedding"], [3, 3, 2], dim=1)
    for m, blk in zip(mods, blocks):
        torch.testing.assert_close(blk[present[m]], f.proj[m](emb[m][present[m]]))
        assert (blk[~present[m]] == 0).all()


@pytest.mark.parametrize("name, kw, field", [
    ("bilinear", {"rank_dim": 0}, "rank_dim"),
    ("bilinear", {"rank_dim": 9, "max_features": 500}, "max_features"),
    ("late", {}, "out_dim"),
])
def test_new_strategies_bad_arguments(name, kw, field):
    with pytest.raises(ValueError, match=field):
        create_fusion(name, DIMS, 2 if name == "late" else 8, **kw)


def test_forward_bad_input_names_the_modality():
    f = create_fusion("concat", DIMS, 8)
    emb, present = _inputs()
    with pytest.raises(ValueError, match="ehr"):
        f({m: e for m, e in emb.items() if m != "ehr"}, present)
    with pytest.raises(ValueError, match="embeddings\\['ct'\\]"):
        f({**emb, "ct": torch.zeros(5, 2)}, present)
    with pytest.raises(ValueError, match="present\\['ct'\\]"):
        f(emb, {**present, "ct": torch.ones(4, dtype=torch.bool)})


def test_unknown_strategy_lists_valid_names():
    with pytest.raises(ValueError) as e:
        create_fusion("kronecker9", DIMS, 8)
    for n in ["bilinear", "concat", "cross_attention", "gated_attention", "late", "tensor"]:
        assert n in list_fusions() and n in str(e.value)
