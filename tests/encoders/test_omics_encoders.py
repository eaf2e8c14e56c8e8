"""Omics encoders: shapes, masks, group-lasso selection, the gene-pathway GNN."""
import numpy as np
import pytest
import torch

import encoders.omics  # noqa: F401  (registers the omics encoders)
from encoders.omics import GenePathwayGNN, GenePathwayMasked, PathwayMLPGroupLasso, membership_mask
from encoders.registry import create_encoder, get_encoder_entry


@pytest.fixture(autouse=True)
def _one_torch_thread():
    """Tiny models: intra-op threads only add contention on a shared 2-core machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


NAMES = ["pathway_mlp_glasso", "gene_pathway_masked", "gene_pathway_gnn"]
GENES = [f"G{i}" for i in range(12)]
SETS = {"P_A": ["G0", "G1", "G2", "G3"], "P_B": ["G3", "G4", "G5"], "P_C": ["G6", "G7", "G8", "G9"],
        "P_EMPTY": ["NOT_MEASURED"]}


def _build(name, structured):
    if name == "pathway_mlp_glasso":
        return create_encoder(name, 12, 5, feature_names=GENES)
    kw = {"gene_sets": SETS, "gene_names": GENES} if structured else {}
    return create_encoder(name, 12, 5, **kw)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("b", [1, 2])
@pytest.mark.parametrize("structured", [False, True])
def test_shapes_batch_sizes_and_finite(name, b, structured):
    assert get_encoder_entry(name).family == "tabular"
    enc = _build(name, structured).eval()
    assert enc.out_dim == 5
    with torch.no_grad():
        out = enc(torch.randn(b, 12))
    assert out.shape == (b, 5) and torch.isfinite(out).all()
    enc.train()
    enc(torch.randn(3, 12)).sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in enc.parameters() if p.grad is not None)


@pytest.mark.parametrize("name", NAMES)
def test_default_construction_example_input_and_features(name):
    cls = get_encoder_entry(name).cls
    enc = create_encoder(name, cls.example_in_features, 4).eval()
    x = cls.example_input(2)
    assert enc(x).shape == (2, 4)
    f = _build(name, True).eval().forward_features(torch.randn(3, 12))
    assert f.ndim == 2 and f.shape[0] == 3 and torch.isfinite(f).all()
    assert f.shape[1] == _build(name, True).feature_dim


@pytest.mark.parametrize("name", NAMES)
def test_arguments_validated_by_name(name):
    with pytest.raises(ValueError, match="in_features"):
        create_encoder(name, 0, 4)
    with pytest.raises(ValueError, match="out_dim"):
        create_encoder(name, 3, 0)
    with pytest.raises(ValueError, match="dropout"):
        create_encoder(name, 3, 4, dropout=1.0)


def test_membership_from_gene_sets_and_mask_validation():
    m, names = membership_mask(12, gene_sets=SETS, gene_names=GENES)
    assert names == ["P_A", "P_B", "P_C"] and m.shape == (3, 12)  # the set with no measured gene is dropped
    assert m[1].nonzero().reshape(-1).tolist() == [3, 4, 5]
    assert torch.equal(membership_mask(4)[0], torch.eye(4, dtype=torch.bool))
    with pytest.raises(ValueError, match="mask must have shape"):
        GenePathwayMasked(12, 4, mask=np.ones((3, 5)))
    with pytest.raises(ValueError, match="no member"):
        GenePathwayMasked(3, 4, mask=np.array([[1, 0, 0], [0, 0, 0]]))
    with pytest.raises(ValueError, match="gene_names"):
        GenePathwayMasked(12, 4, gene_sets=SETS)
    with pytest.raises(ValueError, match="gene_names has"):
        GenePathwayMasked(12, 4, gene_sets=SETS, gene_names=GENES[:5])
    with pytest.raises(ValueError, match="no set has a member"):
        GenePathwayMasked(12, 4, gene_sets={"X": ["Q"]}, gene_names=GENES)


@pytest.mark.parametrize("opt_cls", [torch.optim.SGD, torch.optim.Adam, torch.optim.AdamW])
def test_mask_zeroes_non_member_weights_and_their_gradients(opt_cls):
    torch.manual_seed(0)
    enc = GenePathwayMasked(12, 3, gene_sets=SETS, gene_names=GENES, dropout=0.0)
    mask = enc.pathways.mask.bool()
    assert (enc.pathways.weight[~mask] == 0).all()
    opt = opt_cls(enc.parameters(), lr=0.1)
    for _ in range(3):
        opt.zero_grad()
        (enc(torch.randn(8, 12)) ** 2).sum().backward()
        assert (enc.pathways.weight.grad[~mask] == 0).all()
        assert (enc.pathways.weight.grad[mask] != 0).any()
        opt.step()
    assert (enc.pathways.weight[~mask] == 0).all()
    # a gene in no pathway (G10, G11) cannot influence the output
    x = torch.randn(4, 12)
    y = x.clone()
    y[:, 10:] += 5.0
    enc.eval()
    assert torch.allclose(enc(x), enc(y))
    assert enc.pathway_activations(x).shape == (4, 3)


def test_gnn_structure_follows_membership():
    torch.manual_seed(0)
    enc = GenePathwayGNN(12, 4, gene_sets=SETS, gene_names=GENES, dropout=0.0).eval()
    assert enc.edge_index.shape == (2, 11) and enc.pathway_names == ["P_A", "P_B", "P_C"]
    x = torch.randn(3, 12)
    base = enc.pathway_embeddings(x)
    assert base.shape == (3, 3, enc.hidden)
    y = x.clone()
    y[:, 10:] += 5.0  # genes in no pathway: no edge, no effect
    assert torch.allclose(enc(x), enc(y))
    z = x.clone()
    z[:, 4] += 3.0  # G4 is only in P_B: only P_B's embedding changes
    emb = enc.pathway_embeddings(z)
    assert torch.allclose(emb[:, [0, 2]], base[:, [0, 2]]) and not torch.allclose(emb[:, 1], base[:, 1])
    # batching does not mix samples
    assert torch.allclose(enc(x[1:2]), enc(x)[1:2], atol=1e-6)
    with pytest.raises(ValueError, match="expected input"):
        enc(torch.randn(2, 11))


def _planted(seed=0):
    rng = np.random.default_rng(seed)
    n, p = 400, 20
    X = rng.normal(size=(n, p)).astype(np.float32)
    y = X[:, 2] * 1.5 - X[:, 7] + 0.8 * np.tanh(2 * X[:, 13]) + 0.1 * rng.normal(size=n)
    return torch.from_numpy(X), torch.from_numpy(y.astype(np.float32)), [2, 7, 13]


def test_group_lasso_selects_planted_pathways():
    """Training as the trainer does (loss + penalty(), Adam) separates the planted inputs."""
    torch.manual_seed(0)
    xt, yt, informative = _planted()
    names = [f"PATHWAY_{j}" for j in range(xt.shape[1])]
    enc = PathwayMLPGroupLasso(xt.shape[1], 1, hidden=(16,), dropout=0.0, group_lasso=0.02, feature_names=names)
    opt = torch.optim.Adam(enc.parameters(), lr=0.01)
    for _ in range(600):
        opt.zero_grad()
        loss = torch.mean((enc(xt).squeeze(-1) - yt) ** 2) + enc.penalty()
        loss.backward()
        opt.step()
    norms = enc.group_norms().detach()
    others = np.setdiff1d(np.arange(xt.shape[1]), informative)
    assert norms[informative].min() > 10 * norms[others].max()
    assert enc.selected_features(0.05) == [names[j] for j in informative]
    assert enc.selected_features(0.1, relative=True, names=False) == informative


def test_group_lasso_proximal_steps_give_exact_zeros():
    torch.manual_seed(0)
    xt, yt, informative = _planted(1)
    enc = PathwayMLPGroupLasso(xt.shape[1], 1, hidden=(16,), dropout=0.0, group_lasso=0.02)
    lr = 0.05
    opt = torch.optim.SGD(enc.parameters(), lr=lr)
    for _ in range(600):
        opt.zero_grad()
        torch.mean((enc(xt).squeeze(-1) - yt) ** 2).backward()
        opt.step()
        enc.proximal_step(lr)  # proximal gradient descent (group soft-thresholding)
    norms = enc.group_norms().detach()
    assert (norms == 0).sum() >= 8
    assert set(informative) <= set(enc.selected_features(0.05))


def test_group_lasso_penalty_formula_and_validation():
    enc = PathwayMLPGroupLasso(4, 2, hidden=(9,), group_lasso=0.5)
    w = enc.first.weight.detach()
    assert torch.isclose(enc.penalty(), 0.5 * 3.0 * w.norm(dim=0).sum())
    with pytest.raises(ValueError, match="group_lasso"):
        PathwayMLPGroupLasso(4, 2, group_lasso=-1)
    with pytest.raises(ValueError, match="feature_names"):
        PathwayMLPGroupLasso(4, 2, feature_names=["a"])
    with pytest.raises(ValueError, match="names=True"):
        PathwayMLPGroupLasso(4, 2).selected_features(names=True)
    lin = PathwayMLPGroupLasso(4, 1, hidden=())  # no hidden layer: a penalised linear map
    assert lin(torch.randn(3, 4)).shape == (3, 1) and lin.first.out_features == 1
