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
    ``embedding`` (B, D), ``modality_embeddings`` {m: (B, D_m)}, ``attention``
    (B, M) for strategies that weigh modalities, and ``loss``
    (with its parts ``loss_cox`` and ``loss_aux``) when ``time``/``event`` are
    in the batch.

    Parameters
    ----------
    encoders, fusion, head
        The parts.
    aux_loss_weight
        Weight ``w`` of the auxiliary per-modality Cox losses (deep
        supervision): each modality embedding also gets a linear risk head,
        trained with the Cox loss on the patients who have that modality, and
        ``loss = loss_cox + w * mean_m(loss_aux_m)``.  With a few hundred
        patients this keeps the slow-learning image encoders from being
        ignored while the tabular branches fit quickly.  0 disables it.
    modality_dropout
        In training, each present modality of each patient is hidden with
        this probability (at least one modality is always kept), so the
        model learns to predict from any subset.
    """

    def __init__(self, encoders: Mapping[str, nn.Module], fusion: nn.Module, head: nn.Module, *,
                 aux_loss_weight: float = 0.0, modality_dropout: float = 0.0,
                 adversary: nn.Module | None = None, adversary_weight: float = 1.0) -> None:
        super().__init__()
        if aux_loss_weight < 0:
            raise ValueError(f"aux_loss_weight must be >= 0, got {aux_loss_weight}")
        if not 0.0 <= modality_dropout < 1.0:
            raise ValueError(f"modality_dropout must be in [0, 1), got {modality_dropout}")
        self.modalities = sorted(encoders)
        self.encoders = nn.ModuleDict({m: encoders[m] for m in self.modalities})
        self.fusion = fusion
        self.head = head
        self.aux_loss_weight = float(aux_loss_weight)
        self.modality_dropout = float(modality_dropout)
        self.adversary = adversary
        self.adversary_weight = float(adversary_weight)
        self.aux_heads = nn.ModuleDict(
            {m: nn.Linear(encoders[m].out_dim, 1) for m in self.modalities} if aux_loss_weight > 0 else {}
        )

    def _drop_modalities(self, present: torch.Tensor) -> torch.Tensor:
        """Hide present modalities at random, keeping at least one per patient."""
        keep = torch.rand(present.shape, device=present.device) >= self.modality_dropout
        dropped = present & keep
        empty = ~dropped.any(dim=1) & present.any(dim=1)
        if empty.any():
            # restore one random present modality for patients left with none
            scores = torch.rand(present.shape, device=present.device) * present
            pick = scores.argmax(dim=1)
            dropped[empty, pick[empty]] = True
        return dropped

    def forward(self, batch: Mapping) -> dict:
        names = list(batch["modalities"])
        cols = [names.index(m) for m in self.modalities]
        present_all = batch["present"][:, cols]
        if self.training and self.modality_dropout > 0 and len(self.modalities) > 1:
            present_all = self._drop_modalities(present_all)
        device = present_all.device
        embeddings, present = {}, {}
        for j, m in enumerate(self.modalities):
            p = present_all[:, j]
            enc = self.encoders[m]
            emb = torch.zeros(p.shape[0], enc.out_dim, device=device)
            idx = torch.nonzero(p, as_tuple=False).reshape(-1)
            if idx.numel() > 0:
                out = enc(_select(batch[m], idx))
                emb = emb.to(out.dtype).index_copy(0, idx, out)
            embeddings[m] = emb
            present[m] = p
        fusion_out = self.fusion(embeddings, present)
        fused = fusion_out["embedding"]
        # late fusion strategies combine their own per-modality risks; the others feed the shared head
        risk = fusion_out["risk"].reshape(-1) if "risk" in fusion_out else self.head(fused).reshape(-1)
        out = {"risk": risk, "embedding": fused, "modality_embeddings": embeddings}
        for k in ("attention", "modality_risks"):
            if k in fusion_out:
                out[k] = fusion_out[k]
        if self.adversary is not None:
            out["confounder_logits"] = self.adversary(fused)
        if "time" in batch and "event" in batch:
            out["loss_cox"] = cox_ph_loss(risk, batch["time"], batch["event"])
            out["loss"] = out["loss_cox"]
            if self.aux_loss_weight > 0:
                aux = []
                for m in self.modalities:
                    idx = torch.nonzero(present[m], as_tuple=False).reshape(-1)
                    if idx.numel() > 1:
                        r = self.aux_heads[m](embeddings[m].index_select(0, idx)).reshape(-1)
                        aux.append(cox_ph_loss(r, batch["time"].index_select(0, idx),
                                               batch["event"].index_select(0, idx)))
                if aux:
                    out["loss_aux"] = torch.stack(aux).mean()
                    out["loss"] = out["loss"] + self.aux_loss_weight * out["loss_aux"]
            if self.adversary is not None and "confounders" in batch:
                out["loss_adv"] = self.adversary.encoder_loss(fused, batch["confounders"])
                out["loss"] = out["loss"] + self.adversary_weight * out["loss_adv"]
        return out


#: ``fusion.name: early`` replaces each modality's encoder by the parameter-free extractor of its family
#: (encoders/early.py) and fuses the concatenated raw features with one MLP (the ``concat`` strategy).
EARLY_EXTRACTORS = {"image3d": "image_pool", "tabular": "identity", "sequence": "ehr_summary"}


def build_model(cfg: ExperimentConfig, input_dims: Mapping[str, int], modalities: list[str], *,
                confounder_kinds: Mapping[str, int] | None = None,
                omics_structure: Mapping | None = None) -> FusionModel:
    """Build a model for ``modalities`` from the config.

    ``input_dims`` gives, per modality, the channel count (images) or feature
    count (omics, clinical, EHR variables) of the prepared data.
    """
    encoders = {}
    early = cfg.fusion.name == "early"
    for m in sorted(modalities):
        mc = cfg.modalities[m]
        if early:  # early fusion: fixed raw-feature extractors, one model over their concatenation
            family = "image3d" if m in IMAGE_MODALITIES else ("sequence" if m == "ehr" else "tabular")
            mc = mc.model_copy(update={"encoder": EARLY_EXTRACTORS[family], "out_dim": None, "encoder_kwargs": {}})
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
            kwargs = dict(mc.encoder_kwargs)
            if m == "omics" and omics_structure:
                if mc.encoder in ("gene_pathway_masked", "gene_pathway_gnn") and not {"mask", "gene_sets"} & set(kwargs):
                    kwargs.update(gene_sets=omics_structure["gene_sets"], gene_names=omics_structure["feature_names"])
                elif mc.encoder == "pathway_mlp_glasso":
                    kwargs.setdefault("feature_names", omics_structure["feature_names"])
            encoders[m] = create_encoder(mc.encoder, input_dims[m], mc.out_dim, **kwargs)
    fusion = create_fusion(
        "concat" if early else cfg.fusion.name, {m: e.out_dim for m, e in encoders.items()}, cfg.fusion.hidden,
        dropout=cfg.fusion.dropout, **cfg.fusion.kwargs,
    )
    head = nn.Linear(cfg.fusion.hidden, 1)
    adversary = None
    if cfg.adversary.enabled and confounder_kinds:
        from fusion.adversarial import ConfounderAdversary

        adversary = ConfounderAdversary(cfg.fusion.hidden, confounder_kinds, hidden=cfg.adversary.hidden,
                                        mode=cfg.adversary.mode)
    return FusionModel(encoders, fusion, head, aux_loss_weight=cfg.fusion.aux_loss_weight,
                       modality_dropout=cfg.training.modality_dropout, adversary=adversary,
                       adversary_weight=cfg.adversary.weight)
