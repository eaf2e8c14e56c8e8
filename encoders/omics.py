"""Encoders for gene expression and pathway scores (tabular family).

* ``pathway_mlp_glasso``: MLP on pathway scores with a group-lasso penalty on
  the first layer's input columns (feature selection).
* ``gene_pathway_masked``: gene-level encoder whose first layer maps genes to
  pathways through a Linear layer masked by pathway membership (P-NET /
  "biologically informed" sparse layer, Elmarakeby et al. 2021, Nature 598:348).
* ``gene_pathway_gnn``: a graph neural network over the gene-pathway bipartite
  graph (torch-geometric), messages from genes to pathways.

All take ``(B, F)`` float tensors and are built as ``cls(in_features, out_dim,
**kw)``.  The structured encoders default to an *identity membership* (every
gene is its own pathway) when no mask or gene sets are given, so that
``create_encoder(name, in_features, out_dim)`` always works; pass ``mask=`` or
``gene_sets=`` + ``gene_names=`` for the real structure.  Encoders know
nothing about files: gene sets arrive as plain mappings.
"""
from __future__ import annotations

import math
from typing import Mapping, Sequence

import torch
import torch.nn.functional as F
from monai.networks.layers.factories import Act
from torch import nn

from encoders.registry import register_encoder

EXAMPLE_IN_FEATURES = 7


def _check_common(in_features: int, out_dim: int, dropout: float) -> None:
    if in_features < 1:
        raise ValueError(f"in_features must be >= 1, got {in_features}")
    if out_dim < 1:
        raise ValueError(f"out_dim must be >= 1, got {out_dim}")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {dropout}")


def _mlp(d_in: int, hidden: Sequence[int], out_dim: int, *, act: str, dropout: float,
         layer_norm: bool = False) -> nn.Sequential:
    if any(h < 1 for h in hidden):
        raise ValueError(f"hidden sizes must be positive, got {tuple(hidden)}")
    layers: list[nn.Module] = []
    d = d_in
    for h in hidden:
        layers.append(nn.Linear(d, h))
        if layer_norm:
            layers.append(nn.LayerNorm(h))
        layers.append(Act[act]())
        if dropout > 0:
            layers.append(nn.Dropout(dropout))
        d = h
    layers.append(nn.Linear(d, out_dim))
    return nn.Sequential(*layers)


def membership_mask(
    in_features: int,
    *,
    mask=None,
    gene_sets: Mapping[str, Sequence[str]] | None = None,
    gene_names: Sequence[str] | None = None,
) -> tuple[torch.Tensor, list[str]]:
    """Bool membership ``(n_pathways, in_features)`` and the pathway names.

    Exactly one of ``mask`` (array-like ``(n_pathways, in_features)``, non-zero
    = member) or ``gene_sets`` + ``gene_names`` (``len(gene_names) ==
    in_features``; set members not in ``gene_names`` are ignored and sets with
    no measured member dropped) may be given; with neither, the identity
    membership (pathway ``i`` = gene ``i``) is returned.
    """
    if mask is not None and gene_sets is not None:
        raise ValueError("give either mask or gene_sets + gene_names, not both")
    if mask is not None:
        m = torch.as_tensor(mask)
        if m.ndim != 2 or m.shape[1] != in_features:
            raise ValueError(f"mask must have shape (n_pathways, in_features={in_features}), got {tuple(m.shape)}")
        m = m != 0
        if not m.any(dim=1).all():
            raise ValueError(f"mask row {int((~m.any(dim=1)).nonzero()[0])} has no member gene")
        return m, [f"pathway_{i}" for i in range(m.shape[0])]
    if gene_sets is not None:
        if gene_names is None:
            raise ValueError("gene_sets needs gene_names (the genes of the input columns)")
        gene_names = [str(g).upper() for g in gene_names]
        if len(gene_names) != in_features:
            raise ValueError(f"gene_names has {len(gene_names)} entries, in_features is {in_features}")
        pos = {g: i for i, g in enumerate(gene_names)}
        rows, names = [], []
        for name, members in gene_sets.items():
            idx = sorted({pos[str(g).upper()] for g in members if str(g).upper() in pos})
            if idx:
                row = torch.zeros(in_features, dtype=torch.bool)
                row[idx] = True
                rows.append(row)
                names.append(str(name))
        if not rows:
            raise ValueError("gene_sets: no set has a member among gene_names")
        return torch.stack(rows), names
    if gene_names is not None and len(gene_names) != in_features:
        raise ValueError(f"gene_names has {len(gene_names)} entries, in_features is {in_features}")
    return torch.eye(in_features, dtype=torch.bool), [f"gene_{i}" for i in range(in_features)]


# --------------------------------------------------------------- group lasso
@register_encoder("pathway_mlp_glasso", family="tabular")
class PathwayMLPGroupLasso(nn.Module):
    """MLP on pathway scores with a group-lasso penalty on its input columns.

    The first layer ``W`` (hidden x F) is penalised by the group lasso
    (Yuan & Lin 2006, J. R. Stat. Soc. B 68:49), one group per input column::

        penalty = lambda * sum_j sqrt(h) * ||W[:, j]||_2

    (``h`` = group size = first hidden width).  It drives whole columns to
    zero, i.e. removes pathways from the model; the trainer adds
    :meth:`penalty` to the loss, and :meth:`proximal_step` (group soft
    thresholding) can be called after each optimiser step to get exact zeros.

    Parameters
    ----------
    in_features
        Number of pathway scores F.
    out_dim
        Output size.
    hidden
        Hidden sizes; ``()`` makes the penalised layer the output layer.
    dropout
        Dropout after hidden layers (not on the input, which would blur the
        selection).
    act
        MONAI activation factory name.
    group_lasso
        ``lambda`` (>= 0).
    feature_names
        Optional names of the F inputs (returned by :meth:`selected_features`).
    layer_norm
        LayerNorm after hidden linear layers.
    """

    example_in_features = EXAMPLE_IN_FEATURES

    def __init__(self, in_features: int, out_dim: int, *, hidden: Sequence[int] = (64,), dropout: float = 0.1,
                 act: str = "relu", group_lasso: float = 1e-3, feature_names: Sequence[str] | None = None,
                 layer_norm: bool = False) -> None:
        super().__init__()
        _check_common(in_features, out_dim, dropout)
        if group_lasso < 0:
            raise ValueError(f"group_lasso must be >= 0, got {group_lasso}")
        if feature_names is not None and len(feature_names) != in_features:
            raise ValueError(f"feature_names has {len(feature_names)} entries, in_features is {in_features}")
        if any(h < 1 for h in hidden):
            raise ValueError(f"hidden sizes must be positive, got {tuple(hidden)}")
        hidden = tuple(hidden)
        self.first = nn.Linear(in_features, hidden[0] if hidden else out_dim)
        if hidden:
            body: list[nn.Module] = []
            for i, h in enumerate(hidden):
                if i > 0:
                    body.append(nn.Linear(hidden[i - 1], h))
                if layer_norm:
                    body.append(nn.LayerNorm(h))
                body.append(Act[act]())
                if dropout > 0:
                    body.append(nn.Dropout(dropout))
            self.body = nn.Sequential(*body)
            self.head = nn.Linear(hidden[-1], out_dim)
            self.feature_dim = hidden[-1]
        else:
            self.body = nn.Identity()
            self.head = nn.Identity()
            self.feature_dim = in_features
        self.hidden = hidden
        self.in_features = in_features
        self.out_dim = out_dim
        self.group_lasso = float(group_lasso)
        self.feature_names = list(feature_names) if feature_names is not None else None

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, feature_dim)`` representation before the output layer (the input itself without hidden layers)."""
        return self.body(self.first(x)) if self.hidden else x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(self.first(x)))

    def group_norms(self) -> torch.Tensor:
        """``(F,)`` L2 norm of each input column of the first layer."""
        return self.first.weight.norm(dim=0)

    def penalty(self) -> torch.Tensor:
        """Group-lasso penalty (scalar tensor, differentiable) to add to the loss."""
        w = self.first.weight
        return self.group_lasso * math.sqrt(w.shape[0]) * w.norm(dim=0).sum()

    @torch.no_grad()
    def proximal_step(self, lr: float) -> None:
        """Group soft-thresholding ``W_j <- W_j * max(0, 1 - lr * lambda * sqrt(h) / ||W_j||)`` (in place)."""
        w = self.first.weight
        thr = lr * self.group_lasso * math.sqrt(w.shape[0])
        norms = w.norm(dim=0).clamp_min(1e-12)
        w.mul_(torch.clamp(1.0 - thr / norms, min=0.0)[None, :])

    def selected_features(self, threshold: float = 1e-3, *, relative: bool = False,
                          names: bool | None = None) -> list:
        """Inputs whose first-layer column norm exceeds ``threshold``.

        With ``relative=True`` the threshold is a fraction of the largest
        column norm.  Returns indices, or names when ``feature_names`` were
        given (or ``names=True``).  With a plain optimiser the penalty makes
        dropped columns small rather than exactly zero; call
        :meth:`proximal_step` after each step to get exact zeros.
        """
        norms = self.group_norms().detach()
        thr = threshold * float(norms.max()) if relative else threshold
        idx = [int(i) for i in torch.nonzero(norms > thr).reshape(-1)]
        use_names = self.feature_names is not None if names is None else names
        if use_names:
            if self.feature_names is None:
                raise ValueError("names=True needs feature_names")
            return [self.feature_names[i] for i in idx]
        return idx

    @classmethod
    def example_input(cls, batch_size: int = 2) -> torch.Tensor:
        """An input the default-constructed encoder (``in_features=example_in_features``) accepts."""
        return torch.randn(batch_size, cls.example_in_features)


# -------------------------------------------------------------- masked layer
class MaskedLinear(nn.Module):
    """``y = x (W * M)^T + b`` with a fixed 0/1 mask ``M`` (out x in).

    The mask is applied in the forward pass, so the gradient of every masked
    entry of ``W`` is exactly zero and masked weights stay zero under any
    optimiser without weight decay coupling (they are also zeroed at init).
    Rows are initialised uniformly in ``+-1/sqrt(fan_in of the row)``.
    """

    def __init__(self, mask: torch.Tensor, *, bias: bool = True) -> None:
        super().__init__()
        mask = mask.to(torch.float32)
        self.register_buffer("mask", mask)
        self.weight = nn.Parameter(torch.empty_like(mask))
        self.bias = nn.Parameter(torch.empty(mask.shape[0])) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        fan = self.mask.sum(dim=1).clamp_min(1.0)
        bound = (1.0 / fan.sqrt())[:, None]
        with torch.no_grad():
            self.weight.uniform_(-1.0, 1.0).mul_(bound).mul_(self.mask)
            if self.bias is not None:
                self.bias.uniform_(-1.0, 1.0).mul_(bound.squeeze(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight * self.mask, self.bias)


@register_encoder("gene_pathway_masked", family="tabular")
class GenePathwayMasked(nn.Module):
    """Gene-level encoder with a pathway-membership-masked first layer.

    ``(B, G) -> MaskedLinear(G -> P) -> act -> [dropout] -> MLP(P -> hidden -> out_dim)``:
    each pathway unit sees only its member genes (Elmarakeby et al. 2021,
    Nature 598:348, P-NET), so :meth:`pathway_activations` are interpretable.

    Parameters
    ----------
    in_features
        Number of genes G (input columns).
    out_dim
        Output size.
    mask
        ``(P, G)`` membership (non-zero = member).
    gene_sets, gene_names
        Alternatively, set name -> genes and the names of the G input
        columns.  With neither ``mask`` nor ``gene_sets`` the membership is
        the identity (P = G, each gene its own pathway), which makes the
        first layer a per-gene scaling: a neutral default for smoke tests
        and ``create_encoder(name, G, out_dim)``.
    hidden
        Hidden sizes after the pathway layer.
    dropout
        Dropout after the pathway layer and hidden layers.
    act
        MONAI activation factory name.

    Attributes
    ----------
    pathway_names : list[str]
    n_pathways : int
    """

    example_in_features = EXAMPLE_IN_FEATURES

    def __init__(self, in_features: int, out_dim: int, *, mask=None,
                 gene_sets: Mapping[str, Sequence[str]] | None = None, gene_names: Sequence[str] | None = None,
                 hidden: Sequence[int] = (64,), dropout: float = 0.1, act: str = "tanh") -> None:
        super().__init__()
        _check_common(in_features, out_dim, dropout)
        m, names = membership_mask(in_features, mask=mask, gene_sets=gene_sets, gene_names=gene_names)
        self.pathways = MaskedLinear(m)
        self.act = Act[act]()
        self.drop = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.head = _mlp(m.shape[0], tuple(hidden), out_dim, act=act, dropout=dropout)
        self.in_features = in_features
        self.out_dim = out_dim
        self.pathway_names = names
        self.n_pathways = int(m.shape[0])
        self.feature_dim = self.n_pathways

    def pathway_activations(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, P)`` activations of the pathway layer."""
        return self.act(self.pathways(x))

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Features without the head: the pathway activations ``(B, P)``."""
        return self.pathway_activations(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.drop(self.pathway_activations(x)))

    @classmethod
    def example_input(cls, batch_size: int = 2) -> torch.Tensor:
        return torch.randn(batch_size, cls.example_in_features)


# ---------------------------------------------------------------------- GNN
@register_encoder("gene_pathway_gnn", family="tabular")
class GenePathwayGNN(nn.Module):
    """GNN over the gene-pathway bipartite graph (torch-geometric).

    Each sample is a copy of the bipartite graph *genes -> pathways* (an edge
    per membership).  Gene node ``g`` carries ``[x_g, e_g]``: the sample's
    expression value and a learned gene embedding (so genes are told apart),
    projected to ``hidden``.  Pathway node ``p`` starts from a learned
    embedding ``q_p``.  One GraphSAGE layer (Hamilton et al. 2017, NeurIPS)
    passes messages from genes to pathways::

        h_p = W_1 q_p + W_2 * aggr_{g in p} h_g

    followed by the activation; the pathway embeddings ``(B, P, hidden)`` are
    pooled over pathways (mean and max, concatenated) and mapped to
    ``out_dim`` by a linear layer.  :meth:`pathway_embeddings` returns the
    unpooled ``(B, P, hidden)``.

    Parameters
    ----------
    in_features
        Number of genes G.
    out_dim
        Output size.
    mask, gene_sets, gene_names
        Membership, as for :class:`GenePathwayMasked` (default: identity,
        each gene its own pathway).
    hidden
        Node embedding width.
    gene_embedding_dim
        Width of the learned gene-identity embedding ``e_g``.
    aggr
        Neighbourhood aggregation of the SAGE layer (``"mean"``, ``"sum"``, ``"max"``).
    dropout
        Dropout on the pooled representation.
    act
        MONAI activation factory name.

    Notes
    -----
    Memory and time grow with ``B x edges``; for genome-wide inputs with
    large collections prefer ``gene_pathway_masked`` (the same bipartite
    structure as one sparse-by-mask matrix product).
    """

    example_in_features = EXAMPLE_IN_FEATURES

    def __init__(self, in_features: int, out_dim: int, *, mask=None,
                 gene_sets: Mapping[str, Sequence[str]] | None = None, gene_names: Sequence[str] | None = None,
                 hidden: int = 32, gene_embedding_dim: int = 8, aggr: str = "mean", dropout: float = 0.1,
                 act: str = "relu") -> None:
        super().__init__()
        _check_common(in_features, out_dim, dropout)
        if hidden < 1:
            raise ValueError(f"hidden must be >= 1, got {hidden}")
        if gene_embedding_dim < 0:
            raise ValueError(f"gene_embedding_dim must be >= 0, got {gene_embedding_dim}")
        if aggr not in ("mean", "sum", "add", "max"):
            raise ValueError(f"aggr must be 'mean', 'sum' or 'max', got {aggr!r}")
        try:
            from torch_geometric.nn import SAGEConv
        except ImportError as err:  # pragma: no cover - optional dependency
            raise ImportError("gene_pathway_gnn needs torch-geometric (pip install torch-geometric)") from err
        m, names = membership_mask(in_features, mask=mask, gene_sets=gene_sets, gene_names=gene_names)
        p_idx, g_idx = torch.nonzero(m, as_tuple=True)
        self.register_buffer("edge_index", torch.stack([g_idx, p_idx]).long())  # (2, E): gene -> pathway
        self.gene_embedding = nn.Parameter(torch.randn(in_features, gene_embedding_dim) * 0.1)
        self.pathway_embedding = nn.Parameter(torch.randn(m.shape[0], hidden) * 0.1)
        self.gene_proj = nn.Linear(1 + gene_embedding_dim, hidden)
        self.conv = SAGEConv((hidden, hidden), hidden, aggr="sum" if aggr == "add" else aggr)
        self.act = Act[act]()
        self.drop = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.out = nn.Linear(2 * hidden, out_dim)
        self.in_features = in_features
        self.out_dim = out_dim
        self.hidden = hidden
        self.feature_dim = 2 * hidden
        self.pathway_names = names
        self.n_pathways = int(m.shape[0])

    def pathway_embeddings(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, P, hidden)`` pathway node embeddings after message passing."""
        if x.ndim != 2 or x.shape[1] != self.in_features:
            raise ValueError(f"expected input (B, {self.in_features}), got {tuple(x.shape)}")
        B, G = x.shape
        P = self.n_pathways
        genes = torch.cat([x.unsqueeze(-1), self.gene_embedding.unsqueeze(0).expand(B, -1, -1)], dim=-1)
        h_g = self.act(self.gene_proj(genes)).reshape(B * G, self.hidden)
        h_p = self.pathway_embedding.unsqueeze(0).expand(B, -1, -1).reshape(B * P, self.hidden)
        E = self.edge_index.shape[1]
        offs = torch.arange(B, device=x.device).repeat_interleave(E)
        ei = self.edge_index.repeat(1, B) + torch.stack([offs * G, offs * P])
        out = self.conv((h_g, h_p), ei, size=(B * G, B * P))
        return self.act(out).reshape(B, P, self.hidden)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled pathway embeddings ``(B, 2 * hidden)`` (mean and max over pathways), without the head."""
        h = self.pathway_embeddings(x)
        return torch.cat([h.mean(dim=1), h.amax(dim=1)], dim=-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.drop(self.forward_features(x)))

    @classmethod
    def example_input(cls, batch_size: int = 2) -> torch.Tensor:
        return torch.randn(batch_size, cls.example_in_features)
