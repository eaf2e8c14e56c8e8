"""Typed experiment configuration.

A config is a YAML file validated by :class:`ExperimentConfig`.  Unknown keys
are rejected with a message that names the key and its place in the file, so
a typo never silently falls back to a default.  Relative data paths are
resolved against ``data.root`` when given, else against the folder holding the
config file.
"""
from __future__ import annotations

from pathlib import Path
from typing import Literal, Optional, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

IMAGE_MODALITIES = ("ct", "mri", "pet")
ALL_MODALITIES = ("clinical", "ct", "ehr", "mri", "omics", "pet")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=False)


class DataConfig(_Strict):
    root: Optional[str] = Field(None, description="folder that relative paths below are resolved against")
    manifest: str
    expression: Optional[str] = None
    gene_sets: Optional[str] = None
    ehr: Optional[str] = None
    clinical: Optional[str] = None
    ehr_index_times: Optional[str] = Field(None, description="CSV/Parquet patient_id,index_time for datetime EHR")
    confounders: list[str] = Field(default_factory=list, description="manifest columns that are confounders")
    cache_dir: Optional[str] = Field(None, description="preprocessed-volume cache; default <manifest dir>/.radfusion_cache")


class MultitaskConfig(_Strict):
    """An auxiliary classification label trained jointly with the survival head.

    The auxiliary label gets its own linear head on the fused embedding; the
    survival loss and the auxiliary classification loss are combined with
    homoscedastic uncertainty weighting (Kendall, Gal & Cipolla 2018,
    :class:`fusion.losses.UncertaintyWeighting`): ``sum_i exp(-s_i) L_i + s_i``
    with learnable ``s_i``.  Empty cells of the auxiliary column are allowed
    (those patients only contribute to the survival loss).
    """

    aux_label: str = Field(..., description="manifest column holding the auxiliary class label")
    classes: Optional[list[str]] = Field(None, description="class order (default: sorted labels of the training fold)")
    loss: Literal["ce", "focal"] = "ce"
    focal_gamma: float = Field(2.0, ge=0.0)

    @field_validator("classes")
    @classmethod
    def _classes(cls, v):
        return _check_classes(v, "task.multitask.classes")


def _check_classes(v, where: str):
    if v is None:
        return v
    v = [str(c).strip() for c in v]
    if len(v) < 2:
        raise ValueError(f"{where} needs at least two classes, got {v}")
    dup = sorted({c for c in v if v.count(c) > 1})
    if dup:
        raise ValueError(f"{where} lists {dup} more than once")
    if any(c == "" for c in v):
        raise ValueError(f"{where} holds an empty class name")
    return v


SURVIVAL_LOSSES = ("cox", "discrete_time")
CLASSIFICATION_LOSSES = ("ce", "focal")


class TaskConfig(_Strict):
    """What is predicted, and with which loss.

    * ``kind: survival`` (manifest columns ``time`` + ``event``): ``loss: cox``
      (partial likelihood, ``ties: efron | breslow``; one risk per patient) or
      ``loss: discrete_time`` (``n_intervals`` hazard logits over intervals cut
      at training-fold event-time quantiles; the risk is the cumulative hazard
      at the last cut).  ``multitask`` adds an auxiliary classification label.
    * ``kind: classification`` (manifest column ``label``): ``loss: ce | focal``
      (``focal_gamma``), optional ``class_weights`` (one per class, in the
      order of ``classes``).  ``classes`` fixes the class order (default: the
      sorted labels of the training fold); with two classes the second one is
      the positive class.
    """

    kind: Literal["survival", "classification"] = "survival"
    time: str = "time"
    event: str = "event"
    label: str = "label"
    loss: Optional[Literal["cox", "discrete_time", "ce", "focal"]] = Field(
        None, description="survival: cox (default) | discrete_time; classification: ce (default) | focal")
    ties: Literal["efron", "breslow"] = Field("efron", description="Cox partial likelihood ties (loss cox)")
    strata: list[str] = Field(default_factory=list,
                              description="loss cox: 'site' and/or data.confounders columns; each level (combination) "
                                          "gets its own baseline hazard: risk sets are formed within strata")
    n_intervals: int = Field(10, ge=1, description="discrete-time intervals (loss discrete_time)")
    classes: Optional[list[str]] = Field(None, description="class order (default: sorted training labels)")
    focal_gamma: float = Field(2.0, ge=0.0, description="focal loss exponent (loss focal)")
    class_weights: Optional[list[float]] = Field(None, description="per-class loss weights, in class order")
    multitask: Optional[MultitaskConfig] = Field(None, description="survival only: an auxiliary label head")

    @field_validator("classes")
    @classmethod
    def _classes(cls, v):
        return _check_classes(v, "task.classes")

    @model_validator(mode="after")
    def _combinations(self):
        # Checked by value against the defaults (not by "was it written"), so a resolved config.yaml written
        # into a run folder, which spells out every field, validates again.
        defaults = {f: type(self).model_fields[f].default for f in ("focal_gamma", "n_intervals", "ties")}
        changed = {f for f, d in defaults.items() if getattr(self, f) != d}
        if self.kind == "survival":
            if self.loss is None:
                self.loss = "cox"
            if self.loss not in SURVIVAL_LOSSES:
                raise ValueError(f"task.loss '{self.loss}' is a classification loss; task.kind 'survival' takes "
                                 f"task.loss {' or '.join(SURVIVAL_LOSSES)}")
            misplaced = [f for f in ("classes", "class_weights") if getattr(self, f) is not None]
            misplaced += ["focal_gamma"] if "focal_gamma" in changed else []
            for f in misplaced:
                raise ValueError(f"task.{f} applies to task.kind 'classification' only (this task is "
                                     "survival; an auxiliary label goes under task.multitask)")
            if "n_intervals" in changed and self.loss != "discrete_time":
                raise ValueError(f"task.n_intervals applies to task.loss 'discrete_time' only, not '{self.loss}'")
            if "ties" in changed and self.loss != "cox":
                raise ValueError(f"task.ties applies to task.loss 'cox' only, not '{self.loss}'")
            if self.strata and self.loss != "cox":
                raise ValueError(f"task.strata applies to task.loss 'cox' only, not '{self.loss}'")
        else:
            if self.loss is None:
                self.loss = "ce"
            if self.loss not in CLASSIFICATION_LOSSES:
                raise ValueError(f"task.loss '{self.loss}' is a survival loss; task.kind 'classification' takes "
                                 f"task.loss {' or '.join(CLASSIFICATION_LOSSES)}")
            for f in ("n_intervals", "ties"):
                if f in changed:
                    raise ValueError(f"task.{f} applies to task.kind 'survival' only")
            if self.strata:
                raise ValueError("task.strata applies to task.kind 'survival' (loss cox) only")
            if self.multitask is not None:
                raise ValueError("task.multitask adds an auxiliary label to a survival task; with task.kind "
                                 "'classification' there is nothing to add it to")
            if "focal_gamma" in changed and self.loss != "focal":
                raise ValueError(f"task.focal_gamma applies to task.loss 'focal' only, not '{self.loss}'")
            if self.class_weights is not None:
                w = self.class_weights
                if any(not x >= 0 for x in w) or not sum(w) > 0:
                    raise ValueError(f"task.class_weights must be >= 0 with a positive sum, got {w}")
                if self.classes is not None and len(w) != len(self.classes):
                    raise ValueError(f"task.class_weights has {len(w)} values but task.classes lists "
                                     f"{len(self.classes)} classes; give one weight per class")
        return self

    @property
    def head(self) -> str:
        """``cox``, ``discrete_time`` or ``classification``: which head and loss the model gets."""
        return "classification" if self.kind == "classification" else str(self.loss)


class ImagePreprocessing(_Strict):
    spacing: tuple[float, float, float] = (2.0, 2.0, 2.0)
    size: tuple[int, int, int] = (24, 24, 24)
    ct_window: tuple[float, float] = (-200.0, 300.0)
    pet_compression: Literal["log", "clip"] = "log"
    pet_clip: float = 20.0
    pet_reference: Literal["none", "body_median"] = Field(
        "none", description="PET: 'body_median' divides SUV by the body's median SUV (tumour-to-background ratio)")
    roi: Optional[int | str] = Field(None, description="ROI to use from a SEG/RTSTRUCT/label mask (default: union)")
    augment: bool = Field(False, description="physically plausible augmentation in training only")
    augment_prob: float = Field(0.5, ge=0.0, le=1.0)
    augment_elastic: bool = Field(False, description="include the (slow on CPU) smooth elastic warp")

    @field_validator("spacing")
    @classmethod
    def _positive_spacing(cls, v):
        if any(s <= 0 for s in v):
            raise ValueError("spacing values must be > 0 mm")
        return v

    @field_validator("size")
    @classmethod
    def _positive_size(cls, v):
        if any(s < 4 for s in v):
            raise ValueError("size values must be >= 4 voxels")
        return v


class ModalityConfig(_Strict):
    encoder: str
    out_dim: Optional[int] = Field(32, ge=1, description="embedding size; null = the encoder's natural size "
                                                         "(parameter-free early-fusion extractors)")
    encoder_kwargs: dict = Field(default_factory=dict)
    # imaging
    preprocessing: Optional[ImagePreprocessing] = None
    # omics
    method: Literal["ssgsea", "gsva"] = "ssgsea"
    backend: Literal["fast", "gseapy"] = "fast"
    kcdf: Literal["Gaussian", "Poisson", "auto"] = "Gaussian"
    features: Literal["pathways", "genes"] = Field("pathways", description="pathway scores, or genes (gene-level encoders)")
    combat_batch_key: Optional[str] = Field(None, description="'site' or a data.confounders column; ComBat fitted on the training fold")
    combat_new_batch: Literal["error", "estimate"] = "error"
    min_set_size: int = Field(10, ge=1)
    max_set_size: int = Field(500, ge=1)
    # ehr
    variables: Optional[list[str]] = None
    max_steps: int = Field(64, ge=1)
    window: Optional[float] = None
    time_unit: Literal["days", "hours"] = "days"
    bucket: Optional[float] = Field(None, gt=0, description="merge events within buckets of this width")
    unit_conversions: dict[str, dict[str, float]] = Field(
        default_factory=dict, description="variable -> {source unit: factor into the canonical unit}")
    # clinical
    columns: Optional[list[str]] = None
    categorical: list[str] = Field(default_factory=list)


class FusionConfig(_Strict):
    name: str = "concat"
    hidden: int = Field(64, ge=1)
    dropout: float = Field(0.2, ge=0.0, lt=1.0)
    aux_loss_weight: float = Field(0.0, ge=0.0, description="weight of per-modality auxiliary Cox losses")
    kwargs: dict = Field(default_factory=dict, description="extra arguments of the fusion strategy")

    @field_validator("name")
    @classmethod
    def _known_fusion(cls, v):
        from fusion.strategies import list_fusions

        valid = sorted(set(list_fusions()) | {"early", "late_stacking"})
        if v not in valid:
            raise ValueError(f"unknown fusion {v!r}; valid names: {', '.join(valid)}")
        return v


class AdversaryConfig(_Strict):
    """Adversarial confounder removal (gradient reversal, DANN schedule)."""

    enabled: bool = False
    confounders: list[str] = Field(default_factory=lambda: ["site"], description="names from data.confounders")
    continuous: list[str] = Field(default_factory=list, description="which of them are continuous")
    weight: float = Field(1.0, ge=0.0)
    lambda_max: float = Field(3.0, ge=0.0, description="GRL strength reached at the end of training")
    hidden: int = Field(0, ge=0, description="hidden size of each adversary head; 0 = linear heads")
    steps: int = Field(5, ge=0, description="adversary-only updates per training step (modes confusion and reverse; "
                                            "closed_form trains no adversary)")
    input: Union[Literal["fused", "fused_and_modalities"], list[str]] = Field(
        "fused", description="what the adversary reads: the fused embedding, or the fused embedding concatenated "
                             "with every modality's embedding (zeros where absent), so that no modality encoder "
                             "keeps the confounder either; or a list of parts, e.g. [fused, ct]: the fused "
                             "embedding and the CT encoder's (where a scanner shortcut enters)")
    mode: Literal["reverse", "confusion", "closed_form"] = Field(
        "closed_form", description="reverse: DANN gradient reversal of the adversary's loss; confusion: encoders "
                                 "push the adversary's prediction to the class prior (categorical) or to zero "
                                 "correlation (continuous, CF-Net); closed_form: encoders minimise the normalised "
                                 "cross-covariance of the embedding and each confounder (linear CKA), what a "
                                 "linear adversary at its best response exploits, with no adversary to train")


class TrainingConfig(_Strict):
    epochs: int = Field(40, ge=1)
    batch_size: int = Field(32, ge=2)
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(1e-4, ge=0)
    patience: int = Field(10, ge=1, description="early stopping on the validation c-index (survival) or ROC AUC "
                                                "(classification)")
    modality_dropout: float = Field(0.0, ge=0.0, lt=1.0, description="probability of hiding a modality in training")
    device: Literal["auto", "cpu", "cuda"] = "auto"
    num_threads: Optional[int] = Field(None, ge=1)
    parameter_sharing: float = Field(0.0, ge=0.0, description="weight of the soft parameter-sharing penalty "
                                     "between the image encoders (squared distance to their mean, per parameter)")
    amp: bool = Field(False, description="mixed precision on CUDA (bfloat16, else float16 + scaler); ignored on CPU")
    sampling: Literal["random", "site_stratified"] = Field(
        "random", description="batch composition: shuffled, or every batch with the training sites' proportions")


class ExternalData(_Strict):
    """An external test cohort: its own manifest and tables (unset tables default to data.*)."""

    root: Optional[str] = Field(None, description="folder the relative paths below are resolved against")
    manifest: str
    expression: Optional[str] = None
    ehr: Optional[str] = None
    clinical: Optional[str] = None
    ehr_index_times: Optional[str] = None


class SplitConfig(_Strict):
    scheme: Literal["holdout", "loso", "kfold", "external"] = "holdout"
    held_out_sites: Optional[list[str]] = Field(None, description="loso: sites to hold out (default: every site)")
    n_folds: int = Field(5, ge=2, description="kfold: number of stratified folds")
    external: Optional[ExternalData] = Field(None, description="external: the external test cohort (all of it is "
                                                               "test; train/validation come from data.*)")
    test_fraction: float = Field(0.25, gt=0, lt=1)
    val_fraction: float = Field(0.2, gt=0, lt=1)
    stratify: list[str] = Field(default_factory=lambda: ["site", "event"])


class EvaluationConfig(_Strict):
    ablation: bool = True
    risk_groups: int = Field(2, ge=2, le=4)
    n_boot: int = Field(200, ge=0, description="bootstrap resamples for the per-site confidence intervals")
    model_card: bool = Field(True, description="write model_card.md into the run folder")


class ExperimentConfig(_Strict):
    name: str = "experiment"
    seed: int = 0
    data: DataConfig
    task: TaskConfig = Field(default_factory=TaskConfig)
    modalities: dict[str, ModalityConfig]
    fusion: FusionConfig = Field(default_factory=FusionConfig)
    adversary: AdversaryConfig = Field(default_factory=AdversaryConfig)
    training: TrainingConfig = Field(default_factory=TrainingConfig)
    split: SplitConfig = Field(default_factory=SplitConfig)
    evaluation: EvaluationConfig = Field(default_factory=EvaluationConfig)

    @field_validator("modalities")
    @classmethod
    def _known_modalities(cls, v):
        unknown = sorted(set(v) - set(ALL_MODALITIES))
        if unknown:
            raise ValueError(f"unknown modality {unknown}; valid modalities: {', '.join(ALL_MODALITIES)}")
        if not v:
            raise ValueError("at least one modality is required")
        return dict(sorted(v.items()))

    @model_validator(mode="after")
    def _modality_inputs(self):
        needs = {"omics": ("expression", "gene_sets"), "ehr": ("ehr",), "clinical": ("clinical",)}
        for m, fields in needs.items():
            if m in self.modalities:
                for f in fields:
                    if getattr(self.data, f) is None:
                        raise ValueError(f"modality '{m}' needs data.{f}")
        for m in IMAGE_MODALITIES:
            if m in self.modalities and self.modalities[m].preprocessing is None:
                self.modalities[m].preprocessing = ImagePreprocessing()
        om = self.modalities.get("omics")
        if om is not None:
            if om.method == "gsva" and om.backend == "gseapy":
                raise ValueError("modalities.omics: backend 'gseapy' cannot fit GSVA on the training fold; use 'fast'")
            if om.combat_batch_key not in (None, "site") and om.combat_batch_key not in self.data.confounders:
                raise ValueError(f"modalities.omics.combat_batch_key {om.combat_batch_key!r} must be 'site' or in "
                                 "data.confounders")
        known = set(self.data.confounders) | {"site"}
        for c in self.adversary.confounders + self.adversary.continuous:
            if c not in known:
                raise ValueError(f"adversary: '{c}' is not listed in data.confounders (or 'site')")
        if isinstance(self.adversary.input, list):
            parts = self.adversary.input
            valid = {"fused", *self.modalities}
            if not parts or len(set(parts)) != len(parts) or not set(parts) <= valid:
                raise ValueError(f"adversary.input {parts} must list distinct parts from {sorted(valid)} "
                                 "('fused' or a configured modality)")
        for c in self.task.strata:
            if c not in known:
                raise ValueError(f"task.strata: '{c}' is not listed in data.confounders (or 'site')")
        if (self.split.scheme == "external") != (self.split.external is not None):
            raise ValueError("split.external (the external test cohort) is required by, and only used with, "
                             "split.scheme 'external'")
        if self.adversary.enabled and self.adversary.mode == "confusion" and self.adversary.steps < 1:
            raise ValueError("adversary.mode 'confusion' trains the adversary in its own steps: set adversary.steps >= 1")
        if self.task.head != "cox" and self.fusion.name in ("late", "late_stacking"):
            raise ValueError(f"fusion.name '{self.fusion.name}' combines one risk per modality and supports only "
                             f"the Cox survival task for now (task.kind survival, task.loss cox); this task is "
                             f"{self.task.kind} with task.loss '{self.task.loss}'")
        mt = self.task.multitask
        if mt is not None and mt.aux_label in (self.task.time, self.task.event, "patient_id", "site"):
            raise ValueError(f"task.multitask.aux_label '{mt.aux_label}' is an outcome or identifier column; "
                             "name a label column of the manifest")
        return self

    # ------------------------------------------------------------------ paths
    def resolve_paths(self, base: str | Path) -> "ExperimentConfig":
        """Return a copy whose data paths are absolute (relative to ``data.root`` or ``base``)."""
        cfg = self.model_copy(deep=True)
        root = Path(cfg.data.root) if cfg.data.root else Path(base)
        if not root.is_absolute():
            root = (Path(base) / root).resolve()
        for f in ("manifest", "expression", "gene_sets", "ehr", "clinical", "ehr_index_times", "cache_dir"):
            val = getattr(cfg.data, f)
            if val is not None and not Path(val).is_absolute():
                setattr(cfg.data, f, str((root / val).resolve()))
        cfg.data.root = str(root.resolve())
        ext = cfg.split.external
        if ext is not None:
            eroot = Path(ext.root) if ext.root else Path(base)
            if not eroot.is_absolute():
                eroot = (Path(base) / eroot).resolve()
            for f in ("manifest", "expression", "ehr", "clinical", "ehr_index_times"):
                val = getattr(ext, f)
                if val is not None and not Path(val).is_absolute():
                    setattr(ext, f, str((eroot / val).resolve()))
            ext.root = str(eroot.resolve())
        return cfg

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


class ConfigError(ValueError):
    """A config file that does not validate; the message names the file and keys."""


def _format_validation_error(err: ValidationError, source: str) -> str:
    lines = [f"invalid config {source}:"]
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "(top level)"
        if e["type"] == "extra_forbidden":
            parent = ".".join(str(p) for p in e["loc"][:-1]) or "top level"
            lines.append(f"  - unknown key '{e['loc'][-1]}' under {parent}")
        else:
            lines.append(f"  - {loc}: {e['msg']}")
    return "\n".join(lines)


def parse_config(data: dict, *, source: str = "<dict>", base: str | Path | None = None) -> ExperimentConfig:
    """Validate a config mapping; resolve its paths against ``base`` when given."""
    if not isinstance(data, dict):
        raise ConfigError(f"invalid config {source}: expected a mapping at the top level, got {type(data).__name__}")
    try:
        cfg = ExperimentConfig.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_format_validation_error(err, source)) from None
    return cfg.resolve_paths(base) if base is not None else cfg


def load_config(path: str | Path, *, overrides: dict | None = None) -> ExperimentConfig:
    """Read, validate and resolve a YAML config file.

    ``overrides`` is a nested mapping merged over the file's content before
    validation (used by ``radfusion demo`` to point ``data.root`` at a cohort).
    """
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"config file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ConfigError(f"config file {path} is not valid YAML: {err}") from None
    data = _resolve_extends(data or {}, path, seen=(path.resolve(),))
    if overrides:
        data = _deep_merge(data, overrides)
    return parse_config(data, source=str(path), base=path.parent)


def _resolve_extends(data: dict, path: Path, *, seen: tuple) -> dict:
    """``extends: other.yaml`` (relative to this file): start from that file and merge this one over it.

    Mappings merge key by key; any other value (lists included) replaces the base's.
    """
    if not isinstance(data, dict) or "extends" not in data:
        return data
    data = dict(data)
    ref = data.pop("extends")
    if not isinstance(ref, str) or not ref:
        raise ConfigError(f"{path}: 'extends' must be a file name, got {ref!r}")
    base_path = (path.parent / ref)
    if not base_path.exists():
        raise ConfigError(f"{path}: extends '{ref}', but {base_path} does not exist")
    if base_path.resolve() in seen:
        raise ConfigError(f"{path}: 'extends' makes a cycle through {base_path}")
    try:
        base = yaml.safe_load(base_path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"config file {base_path} is not valid YAML: {err}") from None
    base = _resolve_extends(base, base_path, seen=seen + (base_path.resolve(),))
    return _deep_merge(base, data)


def _deep_merge(a: dict, b: dict) -> dict:
    out = dict(a)
    for k, v in b.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _deep_merge(out[k], v)
        else:
            out[k] = v
    return out


def default_config_dir() -> Path:
    """The repository's ``configs/`` folder (the package is installed editable)."""
    return Path(__file__).resolve().parents[1] / "configs"
