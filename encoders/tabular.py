"""Encoders for flat feature vectors (pathway scores, clinical covariates)."""
from __future__ import annotations

from typing import Sequence

import torch
from monai.networks.layers.factories import Act
from torch import nn

from encoders.registry import register_encoder


@register_encoder("mlp", family="tabular")
class MLPEncoder(nn.Module):
    """Multilayer perceptron ``(B, F) -> (B, out_dim)``.

    Parameters
    ----------
    in_features
        Input feature count F.
    out_dim
        Output size.
    hidden
        Hidden layer sizes; ``()`` gives a single linear layer.
    dropout
        Dropout on the input and after each hidden layer.
    act
        MONAI activation factory name.
    layer_norm
        Apply LayerNorm after each hidden linear layer.
    """

    def __init__(
        self,
        in_features: int,
        out_dim: int,
        *,
        hidden: Sequence[int] = (64,),
        dropout: float = 0.1,
        act: str = "relu",
        layer_norm: bool = False,
    ) -> None:
        super().__init__()
        if in_features < 1:
            raise ValueError(f"in_features must be >= 1, got {in_features}")
        if out_dim < 1:
            raise ValueError(f"out_dim must be >= 1, got {out_dim}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        if any(h < 1 for h in hidden):
            raise ValueError(f"hidden sizes must be positive, got {hidden}")
        layers: list[nn.Module] = [nn.Dropout(dropout)] if dropout > 0 else []
        d = in_features
        for h in hidden:
            layers.append(nn.Linear(d, h))
            if layer_norm:
                layers.append(nn.LayerNorm(h))
            layers.append(Act[act]())
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
            d = h
        layers.append(nn.Linear(d, out_dim))
        self.net = nn.Sequential(*layers)
        self.in_features = in_features
        self.out_dim = out_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)
