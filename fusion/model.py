"""Model assembly: per-modality encoders + fusion strategy + task head."""
from __future__ import annotations

from typing import Mapping

import torch
from torch import nn

from encoders.registry import create_encoder, get_encoder_entry
from fusion.config import IMAGE_MODALITIES, ExperimentConfig
from fusion.losses import cox_ph_loss
from fusion.strategies import create_fusion


def _select(x, idx: torch.Tensor):
    if isinstance(x, Mapping):
        return {k: _select(v, idx) for k, v in x.items()}
    return x.index_select(0, idx)


class FusionModel(nn.Module):
    """``encoders`` (ModuleDict) + ``fusion`` + ``head``, mapping a batch dict to an output dict.

    Each encoder runs only on the patients that have its modality (so a missing
    CT is never seen as an all-zero image and batch statistics are not polluted);
    absent rows of ``modality_embeddings`` are zero and the fusion strategy
    substitutes its missing-modality handling.

    Forward input: the batch dict of the data contract; ``batch["modalities"]``
    names the columns of ``batch["present"]``.  Output: ``risk`` (B,),
    ``embedding`` (B, D), ``modality_embeddings`` {m: (B, D_m)}, and ``loss``
    when ``time``/``event`` are in the batch.
    """

    def __init__(self, encoders: Mapping[str, nn.Module], fusion: nn.Module, head: nn.Module) -> None:
        super().__init__()
        self.modalities = sorted(encoders)
        self.encoders = nn.ModuleDict({m: encoders[m] for m in self.modalities})
        self.fusion = fusion
        self.head = head

    def forward(self, batch: Mapping) -> dict:
        names = list(batch["modalities"])
        present_all = batch["present"]
        device = present_all.device
        embeddings, present = {}, {}
        for m in self.modalities:
            p = present_all[:, names.index(m)]
            enc = self.encoders[m]
            emb = torch.zeros(p.shape[0], enc.out_dim, device=device)
            idx = torch.nonzero(p, as_tuple=False).reshape(-1)
            if idx.numel() > 0:
                out = enc(_select(batch[m], idx))
                emb = emb.to(out.dtype).index_copy(0, idx, out)
            embeddings[m] = emb
            present[m] = p
        fused = self.fusion(embeddings, present)
        risk = self.head(fused).reshape(-1)
        out = {"risk": risk, "embedding": fused, "modality_embeddings": embeddings}
        if "time" in batch and "event" in batch:
            out["loss"] = cox_ph_loss(risk, batch["time"], batch["event"])
            out["loss_cox"] = out["loss"]
        return out


def build_model(cfg: ExperimentConfig, input_dims: Mapping[str, int], modalities: list[str]) -> FusionModel:
    """Build a model for ``modalities`` from the config.

    ``input_dims`` gives, per modality, the channel count (images) or feature
    count (omics, clinical, EHR variables) of the prepared data.
    """
    encoders = {}
    for m in sorted(modalities):
        mc = cfg.modalities[m]
        entry = get_encoder_entry(mc.encoder)
        expected = "image3d" if m in IMAGE_MODALITIES else ("sequence" if m == "ehr" else "tabular")
        if entry.family != expected:
            raise ValueError(
                f"modalities.{m}.encoder: '{mc.encoder}' is a {entry.family} encoder, "
                f"but '{m}' needs a {expected} encoder"
            )
        if expected == "image3d":
            encoders[m] = create_encoder(mc.encoder, 3, input_dims[m], mc.out_dim, **mc.encoder_kwargs)
        else:
            encoders[m] = create_encoder(mc.encoder, input_dims[m], mc.out_dim, **mc.encoder_kwargs)
    fusion = create_fusion(
        cfg.fusion.name, {m: e.out_dim for m, e in encoders.items()}, cfg.fusion.hidden, dropout=cfg.fusion.dropout
    )
    head = nn.Linear(cfg.fusion.hidden, 1)
    return FusionModel(encoders, fusion, head)
