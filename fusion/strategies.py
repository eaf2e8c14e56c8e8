"""Fusion strategies (a registry, TorchMultimodal-style).

A fusion module is built from ``modality_to_dim`` (sizes of each modality's
embedding) and ``out_dim``; its ``forward`` takes ``dict[str, Tensor]`` of
embeddings ``(B, D_m)`` plus ``present`` ``dict[str, BoolTensor (B,)]`` and
returns the fused embedding ``(B, out_dim)``.  Keys are iterated in sorted
order.  Missing modalities are handled inside the strategy.
"""
from __future__ import annotations

from typing import Callable, Mapping

import torch
from torch import nn

_FUSIONS: dict[str, type] = {}


def register_fusion(name: str) -> Callable[[type], type]:
    def deco(cls: type) -> type:
        _FUSIONS[name] = cls
        return cls

    return deco


def list_fusions() -> list[str]:
    return sorted(_FUSIONS)


def create_fusion(name: str, modality_to_dim: Mapping[str, int], out_dim: int, **kwargs) -> nn.Module:
    if name not in _FUSIONS:
        raise ValueError(f"unknown fusion {name!r}; valid names: {', '.join(list_fusions())}")
    return _FUSIONS[name](modality_to_dim, out_dim, **kwargs)


@register_fusion("concat")
class ConcatFusion(nn.Module):
    """Intermediate fusion by concatenation.

    A patient's missing modality is replaced by a learned per-modality
    "missing" embedding before concatenation, so the head sees a distinct,
    trainable input for "not measured" rather than a zero that could be
    confused with a real embedding.  The concatenation is projected to
    ``out_dim`` by Linear -> ReLU -> Dropout.

    Parameters
    ----------
    modality_to_dim
        Embedding size of each modality.
    out_dim
        Size of the fused embedding.
    dropout
        Dropout after the projection.
    """

    def __init__(self, modality_to_dim: Mapping[str, int], out_dim: int, *, dropout: float = 0.2) -> None:
        super().__init__()
        if not modality_to_dim:
            raise ValueError("modality_to_dim must name at least one modality")
        if out_dim < 1:
            raise ValueError(f"out_dim must be >= 1, got {out_dim}")
        self.modalities = sorted(modality_to_dim)
        self.missing = nn.ParameterDict(
            {m: nn.Parameter(torch.zeros(modality_to_dim[m])) for m in self.modalities}
        )
        total = sum(modality_to_dim[m] for m in self.modalities)
        self.proj = nn.Sequential(nn.Linear(total, out_dim), nn.ReLU(), nn.Dropout(dropout))
        self.out_dim = out_dim

    def forward(self, embeddings: Mapping[str, torch.Tensor], present: Mapping[str, torch.Tensor]) -> torch.Tensor:
        parts = []
        for m in self.modalities:
            e = embeddings[m]
            p = present[m].to(e.dtype).unsqueeze(1)
            parts.append(p * e + (1 - p) * self.missing[m].unsqueeze(0))
        return self.proj(torch.cat(parts, dim=1))
