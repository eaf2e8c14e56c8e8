import pytest
import torch

from fusion.strategies import create_fusion, list_fusions

DIMS = {"ct": 6, "ehr": 4, "omics": 5}


def _inputs(b=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    emb = {m: torch.randn(b, d, generator=g) for m, d in DIMS.items()}
    present = {
        "ct": torch.tensor([True, False, True, True, False])[:b],
        "ehr": torch.tensor([True, True, False, True, False])[:b],
        "omics": torch.tensor([True, True, True, False, True])[:b],
    }
    return emb, present


@pytest.mark.parametrize("name", list_fusions())
def test_strategy_contract(name):
    torch.manual_seed(0)
    f = create_fusion(name, DIMS, 8).eval()
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


@pytest.mark.parametrize("name", list_fusions())
def test_strategy_trains(name):
    f = create_fusion(name, DIMS, 8).train()
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


@pytest.mark.parametrize("kw, field", [({"rank": 0}, "rank"), ({"num_heads": 3}, "num_heads"),
                                       ({"attn_dim": 0}, "attn_dim")])
def test_bad_arguments_name_the_argument(kw, field):
    name = {"rank": "tensor", "num_heads": "cross_attention", "attn_dim": "gated_attention"}[field]
    with pytest.raises(ValueError, match=field):
        create_fusion(name, DIMS, 8, **kw)
