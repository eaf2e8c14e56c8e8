"""Encoder registry (timm-style).

>>> @register_encoder("my_mlp", family="tabular")
... class MyMLP(nn.Module): ...
>>> enc = create_encoder("my_mlp", in_features=10, out_dim=16)

Every registered encoder is an ``nn.Module`` exposing ``out_dim`` and
returning features ``(B, out_dim)`` from ``forward``.  ``family`` says which
input it takes: ``"image3d"`` (a float tensor ``(B, C, D, H, W)``, built as
``cls(spatial_dims, in_channels, out_dim, **kw)``), ``"tabular"`` (``(B, F)``,
built as ``cls(in_features, out_dim, **kw)``) or ``"sequence"`` (the EHR
dict of the data contract, built as ``cls(in_features, out_dim, **kw)``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from torch import nn

FAMILIES = ("image3d", "tabular", "sequence")


@dataclass(frozen=True)
class EncoderEntry:
    name: str
    family: str
    cls: type


_REGISTRY: dict[str, EncoderEntry] = {}


def register_encoder(name: str, *, family: str) -> Callable[[type], type]:
    """Class decorator that registers an encoder under ``name``."""
    if family not in FAMILIES:
        raise ValueError(f"family must be one of {FAMILIES}, got {family!r}")

    def deco(cls: type) -> type:
        if name in _REGISTRY and _REGISTRY[name].cls is not cls:
            raise ValueError(f"encoder name {name!r} is already registered by {_REGISTRY[name].cls!r}")
        _REGISTRY[name] = EncoderEntry(name, family, cls)
        return cls

    return deco


def _ensure_builtin() -> None:
    # Importing the modules registers the built-in encoders.
    from encoders import early, ehr, image, image_monai, omics, tabular  # noqa: F401


def list_encoders(family: str | None = None) -> list[str]:
    """Sorted names of registered encoders, optionally of one family."""
    _ensure_builtin()
    return sorted(n for n, e in _REGISTRY.items() if family is None or e.family == family)


def get_encoder_entry(name: str) -> EncoderEntry:
    _ensure_builtin()
    if name not in _REGISTRY:
        raise ValueError(f"unknown encoder {name!r}; valid names: {', '.join(list_encoders())}")
    return _REGISTRY[name]


def create_encoder(name: str, *args, **kwargs) -> nn.Module:
    """Instantiate a registered encoder; an unknown name lists the valid ones."""
    return get_encoder_entry(name).cls(*args, **kwargs)
