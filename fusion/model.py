"""Model assembly: per-modality encoders + fusion strategy + task head."""
from __future__ import annotations

from typing import Mapping, Sequence

import torch
from torch import nn

from encoders.registry import create_encoder, get_encoder_entry
from fusion.config import IMAGE_MODALITIES, ExperimentConfig
from fusion.losses import (UncertaintyWeighting, classification_loss, cox_ph_loss, discrete_time_nll,
                           discrete_time_risk, discrete_time_survival)
from fusion.strategies import create_fusion

#: The task heads: Cox survival (one log relative hazard), discrete-time survival (K interval hazard
#: logits) and classification (one logit for two classes, K logits for K > 2 classes).
TASK_HEADS = ("cox", "discrete_time", "classification")
_LOSS_NAMES = {"cox": "loss_cox", "discrete_time": "loss_discrete_time", "classification": "loss_classification"}


def _select(x, idx: torch.Tensor):
    if isinstance(x, Mapping):
        return {k: _select(v, idx) for k, v in x.items()}
    return x.index_select(0, idx)


def _n_logits(n_classes: int) -> int:
    """Head size of a classifier: one logit (sigmoid) for two classes, else one per class (softmax)."""
    return 1 if n_classes == 2 else n_classes


def _class_proba(raw: torch.Tensor, n_classes: int) -> torch.Tensor:
    """Class probabilities ``(B, K)`` from a classifier head's raw output (rows sum to 1)."""
    if n_classes == 2:
        p1 = torch.sigmoid(raw.reshape(-1).float())
        return torch.stack([1.0 - p1, p1], dim=1)
    return torch.softmax(raw.float(), dim=1)


def _weighted_classification_loss(raw: torch.Tensor, target: torch.Tensor, n_classes: int, *, kind: str,
                                  gamma: float, weights: Sequence[float] | None) -> torch.Tensor:
    """:func:`~fusion.losses.classification_loss` with per-class weights ``w_y`` (mean of ``w_y * loss``).

    Binary heads take ``alpha`` for the positive class (``alpha_t = alpha`` or ``1 - alpha``); with
    weights ``(w0, w1)`` we pass ``alpha = w1 / (w0 + w1)`` and rescale by ``w0 + w1``, which gives
    exactly ``w_y * loss`` as in the multiclass case.
    """
    raw = raw.float()
    if n_classes == 2:
        z = raw.reshape(-1)
        if weights is None:
            return classification_loss(z, target, kind=kind, gamma=gamma)
        total = float(weights[0]) + float(weights[1])
        return classification_loss(z, target, kind=kind, gamma=gamma, alpha=float(weights[1]) / total) * total
    return classification_loss(raw, target, kind=kind, gamma=gamma,
                               alpha=None if weights is None else [float(w) for w in weights])


class FusionModel(nn.Module):
    """``encoders`` (ModuleDict) + ``fusion`` + ``head``, mapping a batch dict to an output dict.

    Each encoder runs only on the patients that have its modality (so a missing
    CT is never seen as an all-zero image and batch statistics are not polluted);
    absent rows of ``modality_embeddings`` are zero and the fusion strategy
    substitutes its missing-modality handling.

    Forward input: the batch dict of the data contract; ``batch["modalities"]``
    names the columns of ``batch["present"]``.  Output: ``risk`` (B,),
    ``embedding`` (B, D), ``modality_embeddings`` {m: (B, D_m)}, ``attention``
    (B, M) for strategies that weigh modalities, and ``loss`` with its parts
    when the targets are in the batch.  By ``task``:

    * ``"cox"``: ``head`` has 1 output, ``risk`` = the log relative hazard;
      loss ``loss_cox`` (Cox partial likelihood, ``ties``) from ``time``/``event``.
    * ``"discrete_time"``: ``head`` has ``K = len(cuts) - 1`` outputs, the
      per-interval hazard logits ``logits`` (B, K); ``survival`` (B, K) =
      ``S`` at the interval ends; ``risk`` = cumulative hazard at the last
      cut (:func:`~fusion.losses.discrete_time_risk`, so every c-index keeps
      working); loss ``loss_discrete_time`` (:func:`~fusion.losses.discrete_time_nll`).
      ``cuts`` is a buffer, so checkpoints carry it.
    * ``"classification"``: ``head`` has 1 output for two classes (sigmoid;
      ``classes[1]`` is the positive class) or ``K`` outputs (softmax).
      ``logits`` is the head's output, ``proba`` (B, K) the class
      probabilities (rows sum to 1) and ``risk`` = ``P(classes[1])`` for two
      classes, the largest class probability (the confidence of the predicted
      class) for more; use ``proba``.  Loss ``loss_classification`` from
      ``label`` (long class index, ``-1`` = unknown, ignored): cross-entropy or
      focal (``cls_loss``, ``focal_gamma``), optional ``class_weights``.

    ``loss_task`` is the task loss whatever its name.  With ``aux_classes``
    (``task.multitask``) a second linear head ``aux_label_head`` on the fused
    embedding predicts an auxiliary class label (``aux_logits``,
    ``aux_proba``, loss ``loss_aux_label`` from ``batch["label"]``) and the
    two losses are combined by homoscedastic uncertainty weighting
    (:class:`~fusion.losses.UncertaintyWeighting`, Kendall, Gal & Cipolla
    2018): ``exp(-s_1) L_task + s_1 + exp(-s_2) L_aux + s_2``; the current
    weights ``exp(-s_i)`` are returned as ``task_weights``.

    Parameters
    ----------
    encoders, fusion, head
        The parts.
    aux_loss_weight
        Weight ``w`` of the auxiliary per-modality task losses (deep
        supervision): each modality embedding also gets a linear head of the
        task's size, trained with the task loss on the patients who have
        that modality, and ``loss = loss_task + w * mean_m(loss_aux_m)``.
        With a few hundred patients this keeps the slow-learning image
        encoders from being ignored while the tabular branches fit quickly.
        0 disables it.
    modality_dropout
        In training, each present modality of each patient is hidden with
        this probability (at least one modality is always kept), so the
        model learns to predict from any subset.
    task
        One of :data:`TASK_HEADS`.
    ties
        Cox ties handling, ``"efron"`` or ``"breslow"``.
    cuts
        Discrete-time interval boundaries ``(K + 1,)`` fitted on the training fold.
    classes
        Class names in column order (classification).
    cls_loss, focal_gamma, class_weights
        Classification loss ``"ce"`` or ``"focal"``, its exponent, per-class weights.
    aux_classes, aux_cls_loss, aux_focal_gamma
        Auxiliary-label classes and loss (``task.multitask``).
    """

    def __init__(self, encoders: Mapping[str, nn.Module], fusion: nn.Module, head: nn.Module, *,
                 aux_loss_weight: float = 0.0, modality_dropout: float = 0.0,
                 adversary: nn.Module | None = None, adversary_weight: float = 1.0,
                 adversary_input: str = "fused",
                 task: str = "cox", ties: str = "efron", cuts: Sequence[float] | None = None,
                 classes: Sequence[str] | None = None, cls_loss: str = "ce", focal_gamma: float = 2.0,
                 class_weights: Sequence[float] | None = None, aux_classes: Sequence[str] | None = None,
                 aux_cls_loss: str = "ce", aux_focal_gamma: float = 2.0) -> None:
        super().__init__()
        if aux_loss_weight < 0:
            raise ValueError(f"aux_loss_weight must be >= 0, got {aux_loss_weight}")
        if not 0.0 <= modality_dropout < 1.0:
            raise ValueError(f"modality_dropout must be in [0, 1), got {modality_dropout}")
        if task not in TASK_HEADS:
            raise ValueError(f"task must be one of {', '.join(TASK_HEADS)}, got {task!r}")
        if ties not in ("efron", "breslow"):
            raise ValueError(f"ties must be 'efron' or 'breslow', got {ties!r}")
        for name, kind in (("cls_loss", cls_loss), ("aux_cls_loss", aux_cls_loss)):
            if kind not in ("ce", "focal"):
                raise ValueError(f"{name} must be 'ce' or 'focal', got {kind!r}")
        self.task = task
        self.ties = ties
        self.cls_loss = cls_loss
        self.focal_gamma = float(focal_gamma)
        self.classes: list[str] | None = None
        self.class_weights: list[float] | None = None
        if task == "discrete_time":
            if cuts is None:
                raise ValueError("cuts: task 'discrete_time' needs the interval boundaries (K + 1 values)")
            c = torch.as_tensor([float(x) for x in cuts], dtype=torch.float32)
            if c.numel() < 2 or not bool(torch.isfinite(c).all()) or not bool((c[1:] > c[:-1]).all()):
                raise ValueError(f"cuts must be at least 2 finite, strictly increasing values, got {list(cuts)}")
            self.register_buffer("cuts", c)
            n_out = c.numel() - 1
        elif task == "classification":
            if classes is None or len(classes) < 2:
                raise ValueError(f"classes: task 'classification' needs at least two class names, got {classes}")
            self.classes = [str(x) for x in classes]
            n_out = _n_logits(len(self.classes))
            if class_weights is not None:
                w = [float(x) for x in class_weights]
                if len(w) != len(self.classes) or any(not x >= 0 for x in w) or not sum(w) > 0:
                    raise ValueError(f"class_weights must be {len(self.classes)} values >= 0 (one per class "
                                     f"{self.classes}) with a positive sum, got {list(class_weights)}")
                self.class_weights = w
        else:
            n_out = 1
        self.n_outputs = n_out
        out_features = getattr(head, "out_features", None)
        if out_features is not None and out_features != n_out:
            raise ValueError(f"head has {out_features} outputs but task '{task}' needs {n_out}")
        from fusion.strategies import LateFusion

        if task != "cox" and isinstance(fusion, LateFusion):
            raise ValueError(f"fusion 'late' returns one risk per patient and supports only the Cox task for now, "
                             f"not task '{task}'")
        self.modalities = sorted(encoders)
        self.encoders = nn.ModuleDict({m: encoders[m] for m in self.modalities})
        self.fusion = fusion
        self.head = head
        self.aux_loss_weight = float(aux_loss_weight)
        self.modality_dropout = float(modality_dropout)
        self.adversary = adversary
        self.adversary_weight = float(adversary_weight)
        self.adversary_input = adversary_input
        self.adversary_parts = adversary_parts(adversary_input, self.modalities)
        self.aux_heads = nn.ModuleDict(
            {m: nn.Linear(encoders[m].out_dim, n_out) for m in self.modalities} if aux_loss_weight > 0 else {}
        )
        self.aux_classes: list[str] | None = None
        self.aux_label_head: nn.Module | None = None
        self.uncertainty: UncertaintyWeighting | None = None
        if aux_classes is not None:
            if task == "classification":
                raise ValueError("aux_classes: an auxiliary label head goes with a survival task, not classification")
            if len(aux_classes) < 2:
                raise ValueError(f"aux_classes needs at least two class names, got {aux_classes}")
            in_features = getattr(head, "in_features", None)
            if in_features is None:
                raise ValueError("aux_classes needs a head with ``in_features`` (an nn.Linear) to size its own head")
            self.aux_classes = [str(x) for x in aux_classes]
            self.aux_cls_loss = aux_cls_loss
            self.aux_focal_gamma = float(aux_focal_gamma)
            self.aux_label_head = nn.Linear(in_features, _n_logits(len(self.aux_classes)))
            self.uncertainty = UncertaintyWeighting(2)

    @property
    def task_meta(self) -> dict:
        """What :func:`build_model` needs besides the config to rebuild this model (saved in checkpoints)."""
        meta: dict = {}
        if self.task == "discrete_time":
            meta["cuts"] = [float(x) for x in self.cuts.tolist()]
        if self.classes is not None:
            meta["classes"] = list(self.classes)
        if self.aux_classes is not None:
            meta["aux_classes"] = list(self.aux_classes)
        return meta

    def head_outputs(self, raw: torch.Tensor) -> dict:
        """Task outputs (``risk`` and, by task, ``logits``, ``survival``, ``proba``) from the head's raw output."""
        if self.task == "cox":
            return {"risk": raw.reshape(-1)}
        if self.task == "discrete_time":
            logits = raw.reshape(raw.shape[0], -1)
            return {"logits": logits, "risk": discrete_time_risk(logits), "survival": discrete_time_survival(logits)}
        proba = _class_proba(raw, len(self.classes))
        risk = proba[:, 1] if len(self.classes) == 2 else proba.max(dim=1).values
        return {"logits": raw, "proba": proba, "risk": risk}

    def risk_from_embedding(self, fused: torch.Tensor) -> torch.Tensor:
        """``risk`` (B,) from a fused embedding through the shared head (not for late fusion)."""
        return self.head_outputs(self.head(fused))["risk"]

    def _task_loss(self, raw: torch.Tensor, batch: Mapping, idx: torch.Tensor | None = None) -> torch.Tensor | None:
        """The task loss of ``raw`` head outputs (rows ``idx`` of the batch when given); None without targets."""
        def sel(t):
            return t if idx is None else t.index_select(0, idx)

        if self.task in ("cox", "discrete_time"):
            if "time" not in batch or "event" not in batch:
                return None
            if self.task == "cox":
                strata = sel(batch["strata"]) if "strata" in batch else None
                return cox_ph_loss(raw.reshape(-1), sel(batch["time"]), sel(batch["event"]), ties=self.ties,
                                   strata=strata)
            return discrete_time_nll(raw.float().reshape(raw.shape[0], -1), sel(batch["time"]), sel(batch["event"]),
                                     self.cuts)
        if "label" not in batch:
            return None
        return _weighted_classification_loss(raw, sel(batch["label"]), len(self.classes), kind=self.cls_loss,
                                             gamma=self.focal_gamma, weights=self.class_weights)

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
        if "risk" in fusion_out:
            if self.task != "cox":
                raise ValueError(f"the fusion strategy returns its own risk, which supports only the Cox task, "
                                 f"not task '{self.task}'")
            raw = fusion_out["risk"].reshape(-1, 1)
        else:
            raw = self.head(fused)
        out = self.head_outputs(raw)
        out.update({"embedding": fused, "modality_embeddings": embeddings})
        for k in ("attention", "modality_risks"):
            if k in fusion_out:
                out[k] = fusion_out[k]
        aux_raw = None
        if self.aux_label_head is not None:
            aux_raw = self.aux_label_head(fused)
            out["aux_logits"] = aux_raw
            out["aux_proba"] = _class_proba(aux_raw, len(self.aux_classes))
        if self.adversary is not None:
            parts = [fused if p == "fused" else embeddings[p].to(fused.dtype) for p in self.adversary_parts]
            adv_in = parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)
            out["adversary_input"] = adv_in
            out["confounder_logits"] = self.adversary(adv_in)
        task_loss = self._task_loss(raw, batch)
        if task_loss is not None:
            out[_LOSS_NAMES[self.task]] = task_loss
            out["loss_task"] = task_loss
            out["loss"] = task_loss
            if self.uncertainty is not None:
                s = self.uncertainty.log_vars
                if "label" in batch and bool((batch["label"] >= 0).any()):
                    out["loss_aux_label"] = _weighted_classification_loss(
                        aux_raw, batch["label"], len(self.aux_classes), kind=self.aux_cls_loss,
                        gamma=self.aux_focal_gamma, weights=None)
                    out["loss"] = self.uncertainty([task_loss.float(), out["loss_aux_label"]])
                else:  # no auxiliary label in this batch: the task term of the weighted sum only
                    out["loss"] = torch.exp(-s[0]) * task_loss.float() + s[0]
                out["task_weights"] = self.uncertainty.weights
            if self.aux_loss_weight > 0:
                aux = []
                for m in self.modalities:
                    idx = torch.nonzero(present[m], as_tuple=False).reshape(-1)
                    if idx.numel() > 1:
                        r = self.aux_heads[m](embeddings[m].index_select(0, idx))
                        aux.append(self._task_loss(r, batch, idx))
                if aux:
                    out["loss_aux"] = torch.stack(aux).mean()
                    out["loss"] = out["loss"] + self.aux_loss_weight * out["loss_aux"]
            if self.adversary is not None and "confounders" in batch:
                out["loss_adv"] = self.adversary.encoder_loss(adv_in, batch["confounders"], risk=raw)
                out["loss"] = out["loss"] + self.adversary_weight * out["loss_adv"]
        return out


class Standardised(nn.Module):
    """A parameter-free feature extractor followed by per-feature standardisation (BatchNorm without
    affine parameters: batch statistics in training, running training statistics at prediction), so the
    raw features of early fusion (SUV, HU fractions, lab values, counts) enter the MLP on one scale."""

    def __init__(self, extractor: nn.Module) -> None:
        super().__init__()
        self.extractor = extractor
        self.out_dim = extractor.out_dim
        self.norm = nn.BatchNorm1d(self.out_dim, affine=False)

    def forward(self, x):
        z = self.extractor(x)
        if self.training and z.shape[0] < 2:  # one patient in the batch: no batch statistics
            return (z - self.norm.running_mean) / torch.sqrt(self.norm.running_var + self.norm.eps)
        return self.norm(z)


#: ``fusion.name: early`` replaces each modality's encoder by the parameter-free extractor of its family
#: (encoders/early.py) and fuses the concatenated raw features with one MLP (the ``concat`` strategy).
EARLY_EXTRACTORS = {"image3d": "image_pool", "tabular": "identity", "sequence": "ehr_summary"}


def adversary_parts(adversary_input, modalities) -> list[str]:
    """The embeddings the adversary reads, in order: ``"fused"`` and/or modality names.

    ``"fused"`` -> the fused embedding; ``"fused_and_modalities"`` -> it and
    every modality's embedding; a list names the parts (e.g. ``["fused",
    "ct"]``); modalities this model does not have are skipped (a
    single-modality ablation model of a run with ``[fused, ct]``), and a list
    that leaves nothing raises ValueError, as does any other value.
    """
    if adversary_input == "fused":
        return ["fused"]
    if adversary_input == "fused_and_modalities":
        return ["fused", *modalities]
    if isinstance(adversary_input, (list, tuple)) and len(set(adversary_input)) == len(adversary_input):
        parts = [p for p in adversary_input if p == "fused" or p in modalities]
        if parts:
            return parts
    raise ValueError(f"adversary_input must be 'fused', 'fused_and_modalities' or a list of distinct parts from "
                     f"{['fused', *modalities]}, got {adversary_input!r}")


def build_model(cfg: ExperimentConfig, input_dims: Mapping[str, int], modalities: list[str], *,
                confounder_kinds: Mapping[str, int] | None = None,
                omics_structure: Mapping | None = None, task_meta: Mapping | None = None) -> FusionModel:
    """Build a model for ``modalities`` from the config.

    ``input_dims`` gives, per modality, the channel count (images) or feature
    count (omics, clinical, EHR variables) of the prepared data.  ``task_meta``
    holds what the task head needs from the training fold
    (:attr:`fusion.data.FoldTransforms.task_meta_` when training,
    ``checkpoint["task_meta"]`` when loading): ``cuts`` for discrete-time
    survival, ``classes`` for classification, ``aux_classes`` for
    ``task.multitask``.
    """
    task, meta = cfg.task, dict(task_meta or {})
    kind = task.head
    needs = {"discrete_time": "cuts", "classification": "classes"}.get(kind)
    for key, what in ((needs, f"task '{kind}'"), ("aux_classes" if task.multitask else None, "task.multitask")):
        if key is not None and not meta.get(key):
            raise ValueError(f"build_model: {what} needs task_meta[{key!r}] (fitted on the training fold, "
                             "FoldTransforms.task_meta_, and stored in the checkpoint)")
    if kind == "discrete_time":
        n_out = len(meta["cuts"]) - 1
    elif kind == "classification":
        n_out = _n_logits(len(meta["classes"]))
    else:
        n_out = 1
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
        if early:
            encoders[m] = Standardised(encoders[m])
    fusion = create_fusion(
        "concat" if early else cfg.fusion.name, {m: e.out_dim for m, e in encoders.items()}, cfg.fusion.hidden,
        dropout=cfg.fusion.dropout, **cfg.fusion.kwargs,
    )
    head = nn.Linear(cfg.fusion.hidden, n_out)
    adversary = None
    if cfg.adversary.enabled and confounder_kinds:
        from fusion.adversarial import ConfounderAdversary

        in_dim = sum(cfg.fusion.hidden if p == "fused" else encoders[p].out_dim
                     for p in adversary_parts(cfg.adversary.input, sorted(modalities)))
        adversary = ConfounderAdversary(in_dim, confounder_kinds, hidden=cfg.adversary.hidden,
                                        mode=cfg.adversary.mode)
    mt = task.multitask
    classification = kind == "classification"
    return FusionModel(encoders, fusion, head, aux_loss_weight=cfg.fusion.aux_loss_weight,
                       modality_dropout=cfg.training.modality_dropout, adversary=adversary,
                       adversary_weight=cfg.adversary.weight, adversary_input=cfg.adversary.input, task=kind,
                       ties=task.ties, cuts=meta.get("cuts"),
                       classes=meta.get("classes") if classification else None,
                       cls_loss=task.loss if classification else "ce", focal_gamma=task.focal_gamma,
                       class_weights=task.class_weights if classification else None,
                       aux_classes=meta.get("aux_classes") if mt is not None else None,
                       aux_cls_loss=mt.loss if mt is not None else "ce",
                       aux_focal_gamma=mt.focal_gamma if mt is not None else 2.0)
