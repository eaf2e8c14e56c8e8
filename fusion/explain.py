r"""Explanations of a trained fusion model for one patient at a time.

What a clinician sees in the app, computed here from a trained fold
(:func:`fusion.experiment.load_trained_fold`):

1. **Modality Shapley values** (:func:`modality_shapley`): how much each of the
   patient's modalities moves the fused risk.  The game is the fused model
   evaluated on subsets :math:`S` of the patient's present modalities (absent
   ones get the fusion's learned missing-modality handling, exactly as for a
   patient who lacks them), :math:`v(S) = f(x; \text{present}=S)`, and the
   Shapley value (Shapley 1953; Strumbelj & Kononenko 2014, *KAIS* 41:647) is

   .. math:: \phi_i = \sum_{S \subseteq P \setminus \{i\}}
             \frac{|S|!\,(p - |S| - 1)!}{p!}\,\bigl[v(S \cup \{i\}) - v(S)\bigr],

   computed exactly over all :math:`2^p` subsets (:math:`p \le 6`) in one
   batched forward pass.  Efficiency: :math:`\sum_i \phi_i = v(P) - v(\emptyset)`
   where :math:`v(\emptyset)` is the model with no modality at all.

2. **Feature SHAP** (:func:`feature_shap`, :func:`tabular_shap`,
   :func:`ehr_shap`): Kernel SHAP (Lundberg & Lee 2017, *NeurIPS*, "A unified
   approach to interpreting model predictions", eq. 8-9; ``shap.KernelExplainer``)
   inside one tabular modality, the other modalities held at the patient's
   own values.  The explainer runs on a binary *coalition* representation
   :math:`z \in \{0, 1\}^G` of :math:`G` players, with the value function

   .. math:: v(z) = \frac{1}{K} \sum_{k=1}^{K} f\bigl(h(z, x, b_k)\bigr)

   (interventional / "baseline" SHAP, Janzing et al. 2020, *AISTATS*;
   Sundararajan & Najmi 2020, *ICML*, "The many Shapley values"):

   * omics pathway scores: one player per pathway; an absent player takes the
     value of background patient :math:`b_k` (``K = background_size``
     training patients with expression data);
   * clinical covariates: one player per *original* covariate, so the one-hot
     columns of a categorical variable switch together (mixing the columns of
     two patients would create impossible rows such as ``sex=F`` and
     ``sex=M`` both 1); background as for omics;
   * EHR: one player per variable the patient has measured; an absent player
     is *never measured* (its values and mask are removed, steps left
     without any observation are dropped, ``delta`` is recomputed with the
     time-interval definition of Che et al. 2018), a single reference
     (:math:`K = 1`).  Substituting another patient's time series for one
     variable would put measurements on visit times the patient never had;
     "not measured" is the reference GRU-D-style encoders model explicitly.
     The base value is therefore the risk of the patient with the EHR
     modality present but no laboratory value measured.

   With :math:`2^G - 2 \le` ``nsamples`` Kernel SHAP enumerates every
   coalition and its weighted least squares returns the exact Shapley values
   of this game; otherwise coalitions are sampled (``seed``).  No
   :math:`\ell_1` feature selection is applied (``l1_reg=False``), so every
   player gets a value and ``sum(shap) + expected_value = f(x)`` exactly.
   Global importance (:func:`global_importance`) is the mean :math:`|\phi|`
   over patients with a percentile bootstrap CI resampling patients.

3. **Grad-CAM** (:func:`grad_cam`): MONAI's ``GradCAM`` (Selvaraju et al.
   2017, *ICCV*) on an activated feature map of the image encoder (by
   default the last, :func:`gradcam_target_layer`; in explanations the one
   of :func:`cam_layer_candidates` that passes the deletion test
   :func:`deletion_aopc` best on validation patients,
   :func:`select_cam_layer` / :func:`fold_cam_layers`), with the *fused* risk of the full model as
   the "class score" (other modalities at the patient's values):
   :math:`L = \mathrm{ReLU}(\sum_c \alpha_c A^c)`,
   :math:`\alpha_c = \frac{1}{Z}\sum_{ijk} \partial r / \partial A^c_{ijk}`,
   trilinearly upsampled to the preprocessed grid and min-max normalised to
   [0, 1].  It shows where the image *raises* the risk; a map that is 0
   everywhere (no region raises it) is returned as zeros.
   :func:`localisation` scores it against the lesion mask.
   :func:`integrated_gradients_map` is the alternative with a reference
   (attributions sum to the risk change from a featureless image): on the
   demo cohort it, not Grad-CAM, agrees with what the model reads
   (``benchmarks/explanations.py``); ``cam_method="integrated_gradients"``.

4. **Stability** (:func:`explanation_stability`): the three explanations
   recomputed under small input noise (tabular: sd 0.05 x the training sd of
   each feature; images: sd 0.02 x the volume's voxel sd) and new SHAP
   sampling seeds; the mean pairwise Spearman correlation per explanation
   type (1 = identical ranking).

5. **Out-of-distribution score** (:class:`MahalanobisOOD`): Mahalanobis
   distance of the fused embedding to the training embeddings (Lee et al.
   2018, *NeurIPS*) with a Ledoit-Wolf shrunk covariance (Ledoit & Wolf 2004,
   *J. Multivariate Anal.* 88:365), threshold from cross-fitted training
   distances.

6. :func:`explain_patient` / :func:`explain_run` write everything for one
   patient: ``explanation.json`` (schema in :func:`explain_patient`), PNGs and
   the Grad-CAM arrays.  Only pseudonyms are written.

What is explained is the model output ``risk``: the log relative hazard of a
Cox head, the cumulative hazard at the last cut of a discrete-time head, and
the positive-class probability (two classes) or the predicted class's
probability of a classifier.  Late fusion (``risk`` from the fusion) and
every fusion strategy are supported; all of them map a row with no modality
present to a finite output (learned missing tokens, or a constant), which is
:math:`v(\emptyset)` of the modality game.
"""
from __future__ import annotations

import copy
import itertools
import json
import logging
import math
import time
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from fusion.data import take, to_device

log = logging.getLogger("radfusion")

__all__ = [
    "MahalanobisOOD",
    "UnknownLayerError",
    "UnknownPatientError",
    "breslow_survival",
    "ehr_shap",
    "exact_shapley",
    "explain_patient",
    "explain_run",
    "explanation_stability",
    "feature_shap",
    "find_patient_fold",
    "global_importance",
    "grad_cam",
    "grad_cam_layers",
    "gradcam_target_layer",
    "cam_layer_candidates",
    "deletion_aopc",
    "deletion_aopcs",
    "select_cam_layer",
    "fold_cam_layers",
    "IMAGE_MAP_METHODS",
    "image_map",
    "integrated_gradients_map",
    "roi_reliance",
    "localisation",
    "mean_pairwise_spearman",
    "modality_shapley",
    "save_heatmap_nifti",
    "tabular_shap",
]

IMAGE_MODALITIES = ("ct", "mri", "pet")
TABULAR_MODALITIES = ("clinical", "ehr", "omics")
_TARGET_KEYS = ("time", "event", "label", "confounders", "strata")
_CHUNK = 4096


class UnknownLayerError(ValueError):
    """A named Grad-CAM target layer that the encoder does not have (the message lists the candidates)."""


class UnknownPatientError(ValueError):
    """A pseudonym that is not in the run (or fold)."""


# --------------------------------------------------------------------------- #
# Small helpers
# --------------------------------------------------------------------------- #
def _device_of(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def _strip_targets(batch: Mapping) -> dict:
    """The batch without outcome / confounder keys (no loss is computed on synthetic rows)."""
    return {k: v for k, v in batch.items() if k not in _TARGET_KEYS and k != "report"}


def _replicate(batch: Mapping, n: int) -> dict:
    """``n`` copies of row 0 of ``batch`` (tensors on the batch's device)."""
    idx = torch.zeros(n, dtype=torch.long)

    def sel(v):
        if isinstance(v, Mapping):
            return {k: sel(x) for k, x in v.items()}
        if isinstance(v, torch.Tensor):
            return v.index_select(0, idx.to(v.device))
        return v

    out = {}
    for k, v in batch.items():
        if k in ("modalities",):
            out[k] = v
        elif k == "patient_id":
            out[k] = [v[0]] * n
        else:
            out[k] = sel(v)
    return out


def _model_modalities(model: nn.Module, batch: Mapping) -> list[str]:
    return list(getattr(model, "modalities", batch["modalities"]))


def _present_of(batch: Mapping, m: str) -> bool:
    names = list(batch["modalities"])
    return bool(batch["present"][0, names.index(m)])


class _EvalMode:
    """Context manager: model in eval mode, previous mode restored."""

    def __init__(self, model: nn.Module) -> None:
        self.model, self.was_training = model, model.training

    def __enter__(self):
        self.model.eval()
        return self.model

    def __exit__(self, *exc):
        self.model.train(self.was_training)


def _finite_or_none(x) -> float | None:
    if x is None:
        return None
    x = float(x)
    return x if math.isfinite(x) else None


def _jsonable(obj):
    if isinstance(obj, Mapping):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, (bool, np.bool_)):
        return bool(obj)
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        return _finite_or_none(obj)
    if isinstance(obj, np.ndarray):
        return _jsonable(obj.tolist())
    return obj


# --------------------------------------------------------------------------- #
# 1. Modality Shapley values
# --------------------------------------------------------------------------- #
def exact_shapley(values: np.ndarray, n_players: int) -> np.ndarray:
    r"""Exact Shapley values of a game given on all coalitions.

    Parameters
    ----------
    values
        ``(2**n_players,)`` :math:`v(S)`, indexed by the bit mask of ``S``
        (bit ``j`` set = player ``j`` in ``S``).
    n_players
        ``p``.

    Returns
    -------
    numpy.ndarray
        ``(p,)`` :math:`\phi_j = \sum_{S \not\ni j} \frac{|S|!(p-|S|-1)!}{p!}
        [v(S \cup \{j\}) - v(S)]` (Shapley 1953).
    """
    values = np.asarray(values, dtype=np.float64)
    p = int(n_players)
    if values.shape != (2 ** p,):
        raise ValueError(f"values must have shape (2**n_players,) = ({2 ** p},), got {values.shape}")
    masks = np.arange(2 ** p)
    sizes = np.array([bin(s).count("1") for s in masks])
    weight = np.array([math.factorial(s) * math.factorial(p - s - 1) / math.factorial(p) if s < p else 0.0
                       for s in sizes])
    phi = np.zeros(p)
    for j in range(p):
        without = masks[(masks >> j) & 1 == 0]
        phi[j] = float(np.sum(weight[without] * (values[without | (1 << j)] - values[without])))
    return phi


def modality_shapley(model: nn.Module, batch: Mapping, *, batch_size: int = 32) -> dict:
    r"""Exact Shapley values of the patient's present modalities for the fused risk.

    The patient's row (row 0 of ``batch``) is replicated :math:`2^p` times,
    one copy per subset :math:`S` of the ``p`` present modalities, with
    ``present`` set to :math:`S` (the model's own missing-modality handling
    replaces the others), and evaluated in one batched forward pass
    (``batch_size`` rows at a time).  See the module docstring for the formula.

    Caveat: the subsets are inputs the model may rarely have seen in
    training.  Natural missingness covers some; ``training.modality_dropout``
    > 0 trains on random subsets (but never on the empty set, so
    :math:`v(\emptyset)`, the fusion's output from its missing-modality
    handling alone, is always an extrapolation).  Without modality dropout the
    values describe the model's behaviour off its training distribution.

    Parameters
    ----------
    model
        A :class:`fusion.model.FusionModel` (or any module mapping a batch dict
        to ``{"risk": (B,)}`` that honours ``batch["present"]``).
    batch
        Batch dict of the data contract; row 0 is the patient.
    batch_size
        Rows per forward pass.

    Returns
    -------
    dict
        ``values`` {modality: phi} for every modality of the model (0.0 for
        the patient's absent ones), ``base_value`` :math:`v(\emptyset)` (no
        modality present), ``full_value`` :math:`v(P)`, ``efficiency_error``
        :math:`|\sum_i \phi_i - (v(P) - v(\emptyset))|`, ``absent`` (the
        patient's absent modalities) and ``subset_values`` {"+".join(S) or
        "(none)": v(S)}.
    """
    device = _device_of(model)
    b = to_device(_strip_targets(_replicate(batch, 1)), device)
    names = list(b["modalities"])
    mods = _model_modalities(model, b)
    present = [m for m in mods if _present_of(b, m)]
    absent = [m for m in mods if m not in present]
    p = len(present)
    n = 2 ** p
    pres = torch.zeros(n, len(names), dtype=torch.bool, device=b["present"].device)
    for s in range(n):
        for j, m in enumerate(present):
            if (s >> j) & 1:
                pres[s, names.index(m)] = True
    values = []
    with _EvalMode(model), torch.no_grad():
        for start in range(0, n, batch_size):
            k = min(n, start + batch_size) - start
            rows = _replicate(b, k)
            rows["present"] = pres[start:start + k]
            values.append(model(rows)["risk"].detach().double().cpu().reshape(-1))
    v = torch.cat(values).numpy()
    phi = exact_shapley(v, p) if p else np.zeros(0)
    full, base = float(v[n - 1]), float(v[0])
    subset_values = {("+".join(m for j, m in enumerate(present) if (s >> j) & 1) or "(none)"): float(v[s])
                     for s in range(n)}
    out_values = {m: 0.0 for m in mods}
    out_values.update({m: float(phi[j]) for j, m in enumerate(present)})
    return {
        "values": out_values,
        "base_value": base,
        "full_value": full,
        "efficiency_error": float(abs(phi.sum() - (full - base))),
        "absent": absent,
        "subset_values": subset_values,
    }


# --------------------------------------------------------------------------- #
# The model as a function of one modality's input
# --------------------------------------------------------------------------- #
def _to_tensor_input(x, device):
    if isinstance(x, Mapping):
        return {k: torch.as_tensor(v).to(device) for k, v in x.items()}
    return torch.as_tensor(x).to(device)


def _n_rows(x) -> int:
    if isinstance(x, Mapping):
        return int(next(iter(x.values())).shape[0])
    return int(x.shape[0])


def _slice_rows(x, start: int, stop: int):
    if isinstance(x, Mapping):
        return {k: v[start:stop] for k, v in x.items()}
    return x[start:stop]


class _ModalityRisk:
    """``g(X) -> risk (n,)``: the fused model with ``modality``'s input replaced by the rows of ``X``.

    The other modalities stay at the patient's values (row 0 of ``batch``)
    and ``modality`` is marked present.  Fast path for a
    :class:`~fusion.model.FusionModel`: the other modalities' embeddings are
    computed once and only ``modality``'s encoder, the fusion and the head run
    per row; it is checked against the full forward pass on the patient's own
    input, and the full (replicated-batch) forward is used if they differ.
    """

    def __init__(self, model: nn.Module, batch: Mapping, modality: str, *, chunk: int = _CHUNK) -> None:
        self.model, self.modality, self.chunk = model, modality, chunk
        self.device = _device_of(model)
        b = to_device(_strip_targets(batch), self.device)
        names = list(b["modalities"])
        pres = b["present"][:1].clone()
        pres[0, names.index(modality)] = True
        b = _replicate(b, 1)
        b["present"] = pres
        self.batch = b
        self.fast = False
        own = b[modality]
        with _EvalMode(model), torch.no_grad():
            ref = float(model(b)["risk"].reshape(-1)[0])
        if all(hasattr(model, a) for a in ("encoders", "fusion", "head", "modalities")):
            try:
                with torch.no_grad():
                    self._prepare_fast()
                    self.fast = True
                    got = float(self(own)[0])
                if abs(got - ref) > 1e-4 * max(1.0, abs(ref)):
                    log.warning("explain: cached forward differs from the model's forward (%.6g vs %.6g); "
                                "using the full forward pass", got, ref)
                    self.fast = False
            except Exception as err:  # noqa: BLE001 - any mismatch with the model's internals
                log.warning("explain: cached forward unavailable (%s); using the full forward pass", err)
                self.fast = False
        self.reference = ref

    def _prepare_fast(self) -> None:
        m, b = self.model, self.batch
        names = list(b["modalities"])
        self._fixed: dict[str, torch.Tensor] = {}
        self._fixed_present: dict[str, bool] = {}
        with _EvalMode(m):
            for mod in m.modalities:
                p = bool(b["present"][0, names.index(mod)])
                self._fixed_present[mod] = p
                if mod == self.modality:
                    continue
                enc = m.encoders[mod]
                self._fixed[mod] = enc(b[mod]) if p else torch.zeros(1, enc.out_dim, device=self.device)

    def _fast_forward(self, x) -> torch.Tensor:
        m = self.model
        n = _n_rows(x)
        x_emb = m.encoders[self.modality](x)
        emb, present = {}, {}
        for mod in m.modalities:
            emb[mod] = x_emb if mod == self.modality else self._fixed[mod].to(x_emb.dtype).expand(n, -1)
            present[mod] = torch.full((n,), self._fixed_present[mod] or mod == self.modality, dtype=torch.bool,
                                      device=self.device)
        fusion_out = m.fusion(emb, present)
        if "risk" in fusion_out:  # late fusion combines its own per-modality risks
            return fusion_out["risk"].reshape(-1)
        raw = m.head(fusion_out["embedding"])
        if hasattr(m, "head_outputs"):  # task heads (Cox, discrete time, classification)
            return m.head_outputs(raw)["risk"].reshape(-1)
        return raw.reshape(-1)

    def _full_forward(self, x) -> torch.Tensor:
        rows = _replicate(self.batch, _n_rows(x))
        rows[self.modality] = x
        return self.model(rows)["risk"].reshape(-1)

    def __call__(self, x) -> np.ndarray:
        x = _to_tensor_input(x, self.device)
        n = _n_rows(x)
        out = []
        chunk = self.chunk if self.fast else min(self.chunk, 256)  # the full forward replicates every input
        with _EvalMode(self.model), torch.no_grad():
            for start in range(0, n, chunk):
                xs = _slice_rows(x, start, min(n, start + chunk))
                r = self._fast_forward(xs) if self.fast else self._full_forward(xs)
                out.append(r.detach().double().cpu())
        return torch.cat(out).numpy() if out else np.zeros(0)


# --------------------------------------------------------------------------- #
# 2. Feature SHAP
# --------------------------------------------------------------------------- #
def _kernel_shap_game(value_fn: Callable[[np.ndarray], np.ndarray], n_players: int, *, nsamples="auto",
                      seed: int = 0) -> tuple[np.ndarray, float, float, bool]:
    """Kernel SHAP of a coalition game ``value_fn(Z (n, G) in {0,1}) -> (n,)``.

    Returns ``(phi (G,), expected_value = v(0), model_output = v(1), exact)``;
    ``exact`` is True when every coalition was enumerated.
    """
    import shap

    g = int(n_players)
    ones = np.ones((1, g))
    if g == 0:
        v1 = float(value_fn(ones)[0])
        return np.zeros(0), v1, v1, True

    def f(z):
        return np.asarray(value_fn(np.asarray(z, dtype=np.float64)), dtype=np.float64)

    state = np.random.get_state()
    np.random.seed(int(seed) % (2 ** 32))
    try:
        explainer = shap.KernelExplainer(f, np.zeros((1, g)))
        phi = np.asarray(explainer.shap_values(ones, nsamples=nsamples, l1_reg=False, silent=True),
                         dtype=np.float64).reshape(-1)
    finally:
        np.random.set_state(state)
    n_eval = (2 * g + 2048) if nsamples == "auto" else int(nsamples)
    exact = g <= 30 and n_eval >= 2 ** g - 2
    return phi, float(np.ravel(explainer.expected_value)[0]), float(f(ones)[0]), bool(exact)


def _items(names, values, shap_values, groups=None) -> list[dict]:
    items = []
    for j, (name, val, s) in enumerate(zip(names, values, shap_values)):
        item = {"feature": str(name), "value": _finite_or_none(val), "shap": float(s)}
        item["group"] = str(groups[j]) if groups is not None else str(name)
        items.append(item)
    items.sort(key=lambda d: -abs(d["shap"]))
    return items


def tabular_shap(model: nn.Module, batch: Mapping, modality: str, *, background: np.ndarray,
                 feature_names: Sequence[str], groups: Sequence[Sequence[int]] | None = None,
                 group_names: Sequence[str] | None = None,
                 display: Callable[[np.ndarray], tuple[list[str], list[float]]] | None = None,
                 nsamples="auto", seed: int = 0) -> dict:
    r"""Kernel SHAP of a tabular modality (omics, clinical) of one patient.

    Parameters
    ----------
    model
        The fused model.
    batch
        Row 0 = the patient (the modality must be present).
    modality
        ``"omics"`` or ``"clinical"`` (any ``(B, F)`` input).
    background
        ``(K, F)`` model-scale inputs of background (training) patients.
    feature_names
        ``F`` column names.
    groups
        Players: lists of column indices that switch together (default one
        player per column), e.g. the one-hot columns of a categorical variable.
    group_names
        One name per group (default: the first column's name).
    display
        ``x (F,) -> (names, values)`` per group, for the report (e.g. raw
        values and the active category); default ``feature_names`` and the
        model-scale values.
    nsamples
        Coalitions evaluated by ``shap.KernelExplainer`` (``"auto"`` =
        ``2 G + 2048``; exact when :math:`\ge 2^G - 2`).
    seed
        Seed of the coalition sampling.

    Returns
    -------
    dict
        ``items``: [{feature, value, shap, group}] sorted by :math:`|\phi|`;
        ``expected_value`` :math:`E_b f(b)`, ``model_output`` :math:`f(x)`
        (``sum(shap) + expected_value = model_output``), ``exact``.
    """
    if not _present_of(batch, modality):
        raise ValueError(f"the patient has no {modality!r} data: nothing to explain")
    x = batch[modality][0].detach().cpu().numpy().astype(np.float64)
    f_dim = x.shape[0]
    background = np.asarray(background, dtype=np.float64)
    if background.ndim != 2 or background.shape[1] != f_dim or len(background) == 0:
        raise ValueError(f"background must be (K, {f_dim}) with K >= 1, got {background.shape}")
    if len(feature_names) != f_dim:
        raise ValueError(f"feature_names has {len(feature_names)} names for {f_dim} features")
    groups = [list(g) for g in groups] if groups is not None else [[j] for j in range(f_dim)]
    if group_names is None:
        group_names = [feature_names[g[0]] for g in groups]
    col_of = np.zeros((len(groups), f_dim))
    for j, g in enumerate(groups):
        col_of[j, g] = 1.0
    g_fn = _ModalityRisk(model, batch, modality)
    k = len(background)

    step = max(1, (1 << 22) // max(1, k * f_dim))  # coalitions per chunk: <= 4M model inputs in memory

    def value_fn(z: np.ndarray) -> np.ndarray:
        out = []
        for s in range(0, len(z), step):
            cols = (z[s:s + step] @ col_of > 0.5)  # (n, F)
            xs = np.where(cols[:, None, :], x[None, None, :], background[None, :, :])  # (n, K, F)
            r = g_fn(xs.reshape(-1, f_dim).astype(np.float32))
            out.append(r.reshape(len(cols), k).mean(axis=1))
        return np.concatenate(out)

    phi, expected, output, exact = _kernel_shap_game(value_fn, len(groups), nsamples=nsamples, seed=seed)
    if display is not None:
        names, values = display(x)
    else:
        names, values = list(group_names), [float(x[g[0]]) if len(g) == 1 else float("nan") for g in groups]
    return {"items": _items(names, values, phi, group_names), "expected_value": expected,
            "model_output": output, "exact": exact}


def _compact_ehr(values: np.ndarray, mask: np.ndarray, times: np.ndarray, lengths: np.ndarray) -> dict:
    """Drop steps without any observation (per row), recompute ``delta`` (Che et al. 2018)."""
    from data_adapters.ehr import compute_delta

    n, t_max, _ = mask.shape
    valid = np.arange(t_max)[None, :] < lengths[:, None]
    keep = valid & (mask.sum(axis=2) > 0)
    order = np.argsort(~keep, axis=1, kind="stable")  # kept steps first, in time order
    rows = np.arange(n)[:, None]
    values, mask, times = values[rows, order], mask[rows, order], times[rows, order]
    new_len = keep.sum(axis=1).astype(np.int64)
    pad = np.arange(t_max)[None, :] >= new_len[:, None]
    values = np.where(pad[..., None], 0.0, values).astype(np.float32)
    mask = np.where(pad[..., None], 0.0, mask).astype(np.float32)
    times = np.where(pad, 0.0, times)
    delta = compute_delta(times.astype(np.float64), mask, new_len)
    return {"values": values, "mask": mask, "delta": delta.astype(np.float32), "times": times.astype(np.float32),
            "lengths": new_len}


def ehr_shap(model: nn.Module, batch: Mapping, *, variables: Sequence[str], mean: np.ndarray | None = None,
             std: np.ndarray | None = None, nsamples="auto", seed: int = 0) -> dict:
    r"""Kernel SHAP of the EHR variables of one patient, each variable switched on/off as a whole.

    A player is a variable the patient has at least one measurement of; "off"
    = the variable was never measured (values and mask removed, steps left
    empty dropped, ``delta`` recomputed); the reference (expected value) is
    the patient with none of them measured.  Variables the patient never had
    get :math:`\phi = 0` (value ``None``).  See the module docstring.

    Parameters
    ----------
    model, batch
        The fused model; row 0 of ``batch`` is the patient (EHR present).
    variables
        The V variable names (``EHRPreprocessor.variables_``).
    mean, std
        ``(V,)`` standardisation of the preprocessor, to report each
        variable's last observed value in its raw unit (default: model scale).
    nsamples, seed
        As in :func:`tabular_shap`.

    Returns
    -------
    dict
        As :func:`tabular_shap`; ``value`` = last observed value.
    """
    if not _present_of(batch, "ehr"):
        raise ValueError("the patient has no 'ehr' data: nothing to explain")
    e = {k: v[:1].detach().cpu().numpy() for k, v in batch["ehr"].items()}
    length = int(e["lengths"][0])
    values0, mask0, times0 = e["values"][0], e["mask"][0], e["times"][0].astype(np.float64)
    n_var = values0.shape[1]
    if len(variables) != n_var:
        raise ValueError(f"variables has {len(variables)} names for {n_var} EHR variables")
    observed = np.flatnonzero(mask0[:length].sum(axis=0) > 0)
    g_fn = _ModalityRisk(model, batch, "ehr")

    step = max(1, (1 << 22) // max(1, values0.size))  # coalitions per chunk

    def value_fn(z: np.ndarray) -> np.ndarray:
        out = []
        for s in range(0, len(z), step):
            zc = z[s:s + step]
            n = len(zc)
            keep_var = np.ones((n, n_var))
            keep_var[:, observed] = zc > 0.5
            mask = mask0[None] * keep_var[:, None, :]
            vals = values0[None] * keep_var[:, None, :]
            out.append(g_fn(_compact_ehr(vals, mask, np.repeat(times0[None], n, 0), np.full(n, length))))
        return np.concatenate(out)

    phi_obs, expected, output, exact = _kernel_shap_game(value_fn, len(observed), nsamples=nsamples, seed=seed)
    phi = np.zeros(n_var)
    phi[observed] = phi_obs
    last = np.full(n_var, np.nan)
    for v in observed:
        t_last = np.flatnonzero(mask0[:length, v] > 0)[-1]
        last[v] = values0[t_last, v]
    if mean is not None and std is not None:
        last = last * np.asarray(std, dtype=np.float64) + np.asarray(mean, dtype=np.float64)
    return {"items": _items(list(variables), last, phi), "expected_value": expected, "model_output": output,
            "exact": exact}


def _clinical_groups(pre) -> tuple[list[list[int]], list[str]]:
    """Players of the clinical table: numeric columns alone, one-hot columns of one variable together."""
    names = list(pre.feature_names_)
    groups, gnames = [], []
    for j, c in enumerate(pre.numeric):
        groups.append([j])
        gnames.append(c)
    start = len(pre.numeric)
    if pre.categorical:
        for col, cats in zip(pre.categorical, pre.onehot_.categories_):
            groups.append(list(range(start, start + len(cats))))
            gnames.append(col)
            start += len(cats)
    if start != len(names):
        raise ValueError("clinical feature names do not match the preprocessor's columns")
    return groups, gnames


def _tabular_setup(trained_fold, modality: str) -> dict:
    """Feature names, players and value display of a tabular modality from the fitted transforms."""
    tf = trained_fold.transforms
    if modality == "omics":
        names = list(tf.omics_structure_.get("feature_names") or [])
        sc = tf.omics_scaler_
        if not names:
            names = [f"feature_{j}" for j in range(sc.n_features_in_)]

        def display(x):
            return names, list(x * sc.scale_ + sc.mean_)

        return {"feature_names": names, "groups": None, "group_names": None, "display": display}
    if modality == "clinical":
        pre = tf.clinical_
        names = list(pre.feature_names_)
        groups, gnames = _clinical_groups(pre)
        n_num = len(pre.numeric)

        def display(x):
            raw_num = (pre.scaler_.inverse_transform(x[None, :n_num])[0] if n_num else np.zeros(0))
            out_names, out_values = [], []
            for j, (g, gname) in enumerate(zip(groups, gnames)):
                if j < n_num:
                    out_names.append(gname)
                    out_values.append(float(raw_num[j]))
                else:
                    sub = x[g]
                    if sub.max() > 0.5:
                        out_names.append(names[g[int(np.argmax(sub))]])
                        out_values.append(1.0)
                    else:
                        out_names.append(f"{gname}=(unseen category)")
                        out_values.append(0.0)
            return out_names, out_values

        return {"feature_names": names, "groups": groups, "group_names": gnames, "display": display}
    raise ValueError(f"modality must be 'omics' or 'clinical' for tabular SHAP, got {modality!r}")


def _background(trained_fold, modality: str, size: int, seed: int) -> np.ndarray:
    """``size`` training patients with ``modality`` (model-scale inputs), drawn with ``seed``."""
    tr = trained_fold.tensors["train"]
    j = list(tr["modalities"]).index(modality)
    rows = np.flatnonzero(tr["present"][:, j].numpy())
    if len(rows) == 0:
        raise ValueError(f"no training patient has {modality!r}: no SHAP background")
    rng = np.random.default_rng(seed)
    if len(rows) > size:
        rows = np.sort(rng.choice(rows, size=size, replace=False))
    return tr[modality][torch.as_tensor(rows)].numpy().astype(np.float64)


def _patient_batch(trained_fold, cohort_index: int) -> tuple[str, int, dict]:
    pseudo = trained_fold.cohort.pseudonyms[int(cohort_index)]
    split, row = trained_fold.locate(pseudo)
    return split, row, take(trained_fold.tensors[split], [row])


def _one_patient_shap(trained_fold, batch: Mapping, modality: str, *, background: np.ndarray | None,
                      setup: dict | None, nsamples, seed: int) -> dict:
    model = trained_fold.models["fused"]
    if modality == "ehr":
        e = trained_fold.transforms.ehr_
        return ehr_shap(model, batch, variables=e.variables_, mean=e.mean_, std=e.std_, nsamples=nsamples,
                        seed=seed)
    return tabular_shap(model, batch, modality, background=background, feature_names=setup["feature_names"],
                        groups=setup["groups"], group_names=setup["group_names"], display=setup["display"],
                        nsamples=nsamples, seed=seed)


def global_importance(per_patient: Mapping[str, Sequence[Mapping]], *, n_boot: int = 1000, seed: int = 0,
                      ci: float = 0.95) -> list[dict]:
    r"""Mean :math:`|\phi|` per feature over patients, with a percentile bootstrap CI (patients resampled).

    Parameters
    ----------
    per_patient
        pseudonym -> items ``[{feature, shap, group?}]``; features are matched
        by ``group`` (the original variable) when present.
    n_boot
        Bootstrap replicates.
    seed
        Seed of the resampling.
    ci
        Coverage of the interval.

    Returns
    -------
    list[dict]
        ``[{feature, mean_abs_shap, ci_low, ci_high, n_patients}]`` sorted by
        ``mean_abs_shap``; a feature missing for a patient counts as 0.
    """
    pats = list(per_patient)
    if not pats:
        return []
    feats: list[str] = []
    for p in pats:
        for it in per_patient[p]:
            key = it.get("group", it["feature"])
            if key not in feats:
                feats.append(key)
    a = np.zeros((len(pats), len(feats)))
    pos = {f: j for j, f in enumerate(feats)}
    for i, p in enumerate(pats):
        for it in per_patient[p]:
            a[i, pos[it.get("group", it["feature"])]] += abs(float(it["shap"]))
    mean = a.mean(axis=0)
    rng = np.random.default_rng(seed)
    boots = np.empty((n_boot, len(feats)))
    for b in range(n_boot):
        boots[b] = a[rng.integers(0, len(pats), len(pats))].mean(axis=0)
    lo, hi = np.quantile(boots, [(1 - ci) / 2, 1 - (1 - ci) / 2], axis=0) if n_boot else (mean, mean)
    out = [{"feature": f, "mean_abs_shap": float(mean[j]), "ci_low": float(lo[j]), "ci_high": float(hi[j]),
            "n_patients": len(pats)} for j, f in enumerate(feats)]
    out.sort(key=lambda d: -d["mean_abs_shap"])
    return out


def feature_shap(trained_fold, patients_idx: Sequence[int | str], *, modality: str, background_size: int = 50,
                 nsamples="auto", seed: int = 0, n_boot: int = 1000) -> dict:
    """SHAP values of a tabular modality for several patients of a trained fold, plus global importance.

    Parameters
    ----------
    trained_fold
        :class:`fusion.experiment.TrainedFold`.
    patients_idx
        Cohort row indices (``int``) or pseudonyms (``str``).
    modality
        ``"omics"``, ``"clinical"`` or ``"ehr"``.
    background_size
        Training patients drawn (with ``seed``) as the background of omics /
        clinical (EHR uses the "never measured" reference, no background).
    nsamples
        Kernel SHAP coalitions (``"auto"``: ``2 G + 2048``; exact when
        ``2**G - 2 <= nsamples``).
    seed
        Seed of the background draw and the coalition sampling.
    n_boot
        Bootstrap replicates of the global importance CIs.

    Returns
    -------
    dict
        ``modality``, ``design`` (text), ``patients`` {pseudonym:
        {"items": [{feature, value, shap, group}] sorted by :math:`|\\phi|`,
        "expected_value", "model_output", "exact"}}, ``absent`` (pseudonyms
        without the modality), ``global`` (:func:`global_importance`).
    """
    if modality not in TABULAR_MODALITIES:
        raise ValueError(f"modality must be one of {TABULAR_MODALITIES}, got {modality!r}")
    if modality not in trained_fold.cohort.modalities:
        raise ValueError(f"modality {modality!r} is not in this run; modalities: {trained_fold.cohort.modalities}")
    pos = {p: i for i, p in enumerate(trained_fold.cohort.pseudonyms)}
    setup = background = None
    if modality != "ehr":
        setup = _tabular_setup(trained_fold, modality)
        background = _background(trained_fold, modality, background_size, seed)
    results, absent = {}, []
    for pi in patients_idx:
        if isinstance(pi, str):
            if pi not in pos:
                raise UnknownPatientError(f"patient {pi!r} is not in this fold")
            pi = pos[pi]
        pseudo = trained_fold.cohort.pseudonyms[int(pi)]
        _, _, b = _patient_batch(trained_fold, int(pi))
        if not _present_of(b, modality):
            absent.append(pseudo)
            continue
        results[pseudo] = _one_patient_shap(trained_fold, b, modality, background=background, setup=setup,
                                            nsamples=nsamples, seed=seed)
    return {
        "modality": modality,
        "design": _SHAP_DESIGN[modality],
        "patients": results,
        "absent": absent,
        "global": global_importance({p: r["items"] for p, r in results.items()}, n_boot=n_boot, seed=seed),
    }


_SHAP_DESIGN = {
    "omics": "Kernel SHAP, one player per pathway score; absent players take training background patients' "
             "values (interventional SHAP), other modalities at the patient's values",
    "clinical": "Kernel SHAP, one player per clinical covariate (one-hot columns switch together); absent "
                "players take training background patients' values, other modalities at the patient's values",
    "ehr": "Kernel SHAP, one player per measured EHR variable; an absent player = variable never measured "
           "(steps without observations dropped, delta recomputed); reference = no variable measured",
}


# --------------------------------------------------------------------------- #
# 3. Grad-CAM
# --------------------------------------------------------------------------- #
def gradcam_target_layer(encoder: nn.Module, example: torch.Tensor | None = None) -> str:
    """Name (relative to ``encoder``) of Grad-CAM's default layer: the last convolutional feature map.

    In order: an encoder attribute ``gradcam_layer``; ``backbone.layer4`` (the
    last residual stage) for MONAI ResNet backbones (``resnet10`` ...
    ``resnet50``); ``backbone.class_layers.relu`` (the final activated
    feature map, MONAI's own Grad-CAM example) for MONAI DenseNet; otherwise
    the last 3D convolution executed in a forward pass of ``example`` (or of
    zeros of ``encoder.example_input_size``), skipping 1x1x1 kernels (shortcut
    projections) when another convolution exists, and then the normalisation
    and activation modules run right after it on a map of the same shape: the
    *activated* feature map, as Selvaraju et al. (2017) use (VGG's last
    ``conv -> ReLU``) and as ResNet's ``layer4`` ends.  For ``cnn3d_small`` that
    is the ReLU that closes the last stage (``features.<k>``).  On the demo
    run's 100 test patients the activated map localised better than the raw
    convolution output (half the MR lesion covered by the top 10%: 68% vs 46%
    of patients; PET 27% vs 23%; ``benchmarks/explanations.py``).

    Raises
    ------
    ValueError
        The encoder has no late 3D convolutional feature map (2D-slice and
        2.5D encoders, Swin ViT).
    """
    explicit = getattr(encoder, "gradcam_layer", None)
    if isinstance(explicit, str):
        return explicit
    backbone = getattr(encoder, "backbone", None)
    if backbone is not None:
        from monai.networks.nets import DenseNet, ResNet

        if isinstance(backbone, ResNet):
            return "backbone.layer4"
        if isinstance(backbone, DenseNet):
            return "backbone.class_layers.relu"
    order, executed = _trace_convolutions(encoder, example)
    if len(order) < 2:
        raise ValueError(f"Grad-CAM needs a late 3D convolutional feature map; {type(encoder).__name__} has "
                         f"{len(order)} 3D convolution(s) (2D-slice, 2.5D and transformer encoders are not "
                         "supported; set encoder.gradcam_layer to choose a layer)")
    non_pointwise = [(n, m) for n, m in order if any(k > 1 for k in m.kernel_size)]
    conv_name = (non_pointwise or order)[-1][0]
    return _activated_after(conv_name, executed)


def _trace_convolutions(encoder: nn.Module, example: torch.Tensor | None):
    """One forward pass of ``example`` (default zeros of ``encoder.example_input_size``): the 3D convolutions
    in execution order, and every leaf module run with its output shape."""
    if example is None:
        size = tuple(getattr(encoder, "example_input_size", (16, 16, 16)))
        example = torch.zeros(1, int(getattr(encoder, "in_channels", 1)), *size, device=_device_of(encoder))
    order: list[tuple[str, nn.Module]] = []
    executed: list[tuple[str, nn.Module, tuple]] = []  # every leaf module, in forward order
    hooks = []
    for name, mod in encoder.named_modules():
        if isinstance(mod, nn.modules.conv._ConvNd):
            hooks.append(mod.register_forward_hook(
                lambda mod_, inp, out, name=name: order.append((name, mod_)) if out.ndim == 5 else None))
        if not any(True for _ in mod.children()):
            hooks.append(mod.register_forward_hook(
                lambda mod_, inp, out, name=name: executed.append((name, mod_, tuple(out.shape)))
                if isinstance(out, torch.Tensor) else None))
    try:
        with _EvalMode(encoder), torch.no_grad():
            encoder(example[:1])
    finally:
        for h in hooks:
            h.remove()
    return order, executed


#: Modules that may follow a convolution inside the same block (normalisation, activation).
_NORM_ACT = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm, nn.ReLU, nn.LeakyReLU, nn.PReLU,
             nn.ELU, nn.GELU, nn.SiLU, nn.Tanh, nn.Sigmoid, nn.Softplus)


def _activated_after(conv_name: str, executed: list[tuple[str, nn.Module, tuple]]) -> str:
    """The last normalisation/activation run right after ``conv_name`` on a map of its shape (else the conv)."""
    pos = max((i for i, (n, _, _) in enumerate(executed) if n == conv_name), default=None)
    if pos is None:
        return conv_name
    shape, chosen = executed[pos][2], conv_name
    for name, mod, out_shape in executed[pos + 1:]:
        if not isinstance(mod, _NORM_ACT) or out_shape != shape:
            break
        chosen = name
    return chosen


def cam_layer_candidates(encoder: nn.Module, example: torch.Tensor | None = None) -> list[str]:
    """Target layers a class-activation map may use, shallow to deep: one activated map per resolution.

    For an encoder with a ``gradcam_layer`` attribute, that layer only; for
    MONAI ResNet backbones ``backbone.layer1`` ... ``backbone.layer4``; for
    MONAI DenseNet the final activated map only.  Otherwise, for every
    feature-map resolution the network passes through, the activated output
    of the last (non-pointwise) 3D convolution at that resolution, found as
    in :func:`gradcam_target_layer`: for ``cnn3d_small`` the ReLU closing
    each stage.  The last candidate is always :func:`gradcam_target_layer`'s
    layer.  :func:`select_cam_layer` picks among them.
    """
    explicit = getattr(encoder, "gradcam_layer", None)
    if isinstance(explicit, str):
        return [explicit]
    backbone = getattr(encoder, "backbone", None)
    if backbone is not None:
        from monai.networks.nets import DenseNet, ResNet

        if isinstance(backbone, ResNet):
            return [f"backbone.layer{k}" for k in (1, 2, 3, 4)]
        if isinstance(backbone, DenseNet):
            return ["backbone.class_layers.relu"]
    last = gradcam_target_layer(encoder, example)  # raises for encoders without a 3D feature map
    order, executed = _trace_convolutions(encoder, example)
    shapes = {n: shape for n, _, shape in executed}
    convs = [n for n, m in order if any(k > 1 for k in m.kernel_size)] or [n for n, _ in order]
    last_at: dict[tuple, str] = {}  # spatial shape -> last convolution producing it (insertion = first seen)
    for n in convs:
        key = tuple(shapes.get(n, ()))[2:]
        last_at.pop(key, None)
        last_at[key] = n
    names = [_activated_after(n, executed) for n in last_at.values()]
    if last in names:
        names.remove(last)
    return [*dict.fromkeys(names), last]


#: Class-activation methods :func:`grad_cam` accepts.
CAM_METHODS = ("gradcam", "gradcampp", "hirescam")


def _hirescam_class():
    """MONAI ``GradCAM`` with HiResCAM's map (Draelos & Carin 2020): sum over channels of gradient x activation.

    Grad-CAM multiplies each channel's activation map by the channel's
    *spatially averaged* gradient, so a channel that is active everywhere but
    read by the head at one place (global max pooling, or a head that compares
    regions) lights up everywhere.  HiResCAM keeps the gradient per location;
    for a network whose head pools the target layer globally it is exactly the
    first-order contribution of each location to the score.
    """
    import torch.nn.functional as F
    from monai.visualize import GradCAM

    class HiResCAM(GradCAM):
        def compute_map(self, x, class_idx=None, retain_graph=False, layer_idx=-1, **kwargs):
            _, acti, grad = self.nn_module(x, class_idx=class_idx, retain_graph=retain_graph, **kwargs)
            acti, grad = acti[layer_idx], grad[layer_idx]
            return F.relu((grad * acti).sum(1, keepdim=True))

    return HiResCAM


def _image_patient_batch(model: nn.Module, batch: Mapping, modality: str) -> dict:
    """Row 0 of ``batch`` without targets, on the model's device; ValueError when the model has no
    ``modality`` encoder or the patient no ``modality`` image (shared by every image map)."""
    if modality not in getattr(model, "encoders", {}):
        raise ValueError(f"the model has no {modality!r} encoder")
    if not _present_of(batch, modality):
        raise ValueError(f"the patient has no {modality!r} image")
    return to_device(_strip_targets(_replicate(batch, 1)), _device_of(model))


class _RiskAsClassScore(nn.Module):
    """``x (B, 1, D, H, W) -> (B, 1)`` fused risks: ``modality``'s input = ``x``, the rest of the one-patient
    ``batch`` fixed (repeated B times when B > 1, e.g. occlusion batches)."""

    def __init__(self, model: nn.Module, batch: Mapping, modality: str) -> None:
        super().__init__()
        self.model = model
        self._batch = dict(batch)
        self.modality = modality

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = dict(self._batch) if len(x) == 1 else dict(_replicate(self._batch, len(x)))
        b[self.modality] = x
        return self.model(b)["risk"].reshape(-1, 1)


class _HookCache:
    """MONAI ``ModelWithHooks`` that runs the forward and backward pass once per input: every target
    layer's activation and gradient come from the same pass (MONAI recomputes both for each
    ``layer_idx``).  ``reset()`` before each new input."""

    def __init__(self, inner) -> None:
        self.inner = inner
        self.out = None

    def reset(self) -> None:
        self.out = None

    def __call__(self, x, class_idx=None, retain_graph=False, **kwargs):
        if self.out is None:
            self.out = self.inner(x, class_idx=class_idx, retain_graph=retain_graph, **kwargs)
        return self.out

    def __getattr__(self, name):  # score, class_idx, model, ... (Grad-CAM++ reads ``score``)
        return getattr(self.inner, name)


class _CamSession:
    """Class-activation maps of one image modality at several target layers, patient after patient.

    The fused model is deep-copied once (MONAI registers hooks it never
    removes and sets ``inplace=False`` on the target layers), wrapped so that
    MONAI sees a ``(1, 1)`` class score = the fused risk with the other
    modalities at the patient's values, and only the image encoder's
    parameters keep gradients.  One forward and one backward pass per patient
    give the maps of every layer; each equals :func:`grad_cam` at that layer
    alone.
    """

    def __init__(self, model: nn.Module, modality: str, layers: Sequence[str], method: str = "gradcam") -> None:
        from monai.visualize import GradCAM, GradCAMpp

        if method not in CAM_METHODS:
            raise ValueError(f"method must be one of {', '.join(CAM_METHODS)}, got {method!r}")
        if modality not in getattr(model, "encoders", {}):
            raise ValueError(f"the model has no {modality!r} encoder")
        if not layers:
            raise ValueError("layers must name at least one layer")
        self.model, self.modality, self.layers = model, modality, list(layers)
        net = copy.deepcopy(model).eval()
        for p in net.parameters():
            p.requires_grad_(False)
        for p in net.encoders[modality].parameters():
            p.requires_grad_(True)
        self._wrapper = _RiskAsClassScore(net, {}, modality).eval()
        cam_cls = {"gradcam": GradCAM, "gradcampp": GradCAMpp, "hirescam": _hirescam_class()}[method]
        self._cam = cam_cls(nn_module=self._wrapper, target_layers=[f"model.encoders.{modality}.{l}" for l in layers],
                            postprocessing=lambda t: t)
        self._hooks = _HookCache(self._cam.nn_module)
        self._cam.nn_module = self._hooks

    def maps(self, batch: Mapping) -> dict[str, np.ndarray]:
        """layer -> float32 ``(D, H, W)`` map on the preprocessed grid, min-max scaled to [0, 1] (all zeros
        when no region raises the risk), for the patient in row 0 of ``batch``."""
        b = _image_patient_batch(self.model, batch, self.modality)
        self._wrapper._batch = dict(b)
        x = b[self.modality].float()
        self._hooks.reset()
        out = {}
        with torch.enable_grad():
            for i, layer in enumerate(self.layers):
                heat = self._cam(x, class_idx=0, layer_idx=i)
                arr = heat[0, 0].detach().float().cpu().numpy().astype(np.float64)
                arr = np.nan_to_num(arr, nan=0.0, posinf=0.0, neginf=0.0)
                lo, hi = float(arr.min()), float(arr.max())
                out[layer] = (np.zeros(arr.shape, dtype=np.float32) if hi - lo <= 1e-12 * max(1.0, abs(hi))
                              else ((arr - lo) / (hi - lo)).astype(np.float32))
        self._hooks.reset()
        self._wrapper._batch = {}
        return out


def grad_cam(model: nn.Module, batch: Mapping, modality: str, *, layer: str | None = None,
             method: str = "gradcam") -> np.ndarray:
    """Grad-CAM of the fused risk on one image modality of one patient (MONAI ``GradCAM``).

    The model is deep-copied (MONAI registers hooks it never removes, and
    sets ``inplace=False`` on the target layer), wrapped so that MONAI sees a
    ``(1, 1)`` class score = the fused risk of the full model with the other
    modalities at the patient's values, and only the image encoder's
    parameters keep gradients.  MONAI's default post-processing (which maps
    max -> 0 and min -> 1) is replaced by a plain min-max scaling.  For
    several layers or patients use :func:`grad_cam_layers` (one copy, one
    pass per patient).

    Parameters
    ----------
    model
        The fused model.
    batch
        Row 0 = the patient; ``modality`` must be present.
    modality
        ``"ct"``, ``"pet"`` or ``"mri"``.
    layer
        Target layer name relative to the encoder (default
        :func:`gradcam_target_layer`).
    method
        ``"gradcam"``, ``"gradcampp"`` (Grad-CAM++, Chattopadhyay et al. 2018)
        or ``"hirescam"`` (HiResCAM, Draelos & Carin 2020: per-voxel gradient x
        activation; MONAI's ``GradCAM`` with its channel weighting replaced).

    Returns
    -------
    numpy.ndarray
        float32 ``(D, H, W)`` on the preprocessed input grid, in [0, 1]; all
        zeros when no region raises the risk.
    """
    if method not in CAM_METHODS:
        raise ValueError(f"method must be one of {', '.join(CAM_METHODS)}, got {method!r}")
    if layer is None:
        b = _image_patient_batch(model, batch, modality)
        layer = gradcam_target_layer(model.encoders[modality], b[modality].float())
    return grad_cam_layers(model, [batch], modality, [layer], method=method)[0][layer]


def grad_cam_layers(model: nn.Module, batches: Sequence[Mapping], modality: str, layers: Sequence[str], *,
                    method: str = "gradcam") -> list[dict[str, np.ndarray]]:
    """:func:`grad_cam` at every layer in ``layers`` for every one-patient batch in ``batches``
    (each must have ``modality``): one copy of the model, one forward and backward pass per patient.

    Returns one ``{layer: map}`` per batch, each map equal to :func:`grad_cam` at that layer.
    """
    session = _CamSession(model, modality, layers, method)
    return [session.maps(b) for b in batches]


def occlusion_map(model: nn.Module, batch: Mapping, modality: str, *, mask_size: int = 4, overlap: float = 0.5,
                  mode: str = "mean_img", n_batch: int = 64) -> np.ndarray:
    """Occlusion sensitivity of the fused risk to one image (MONAI ``OcclusionSensitivity``).

    A model-agnostic reference for the class-activation maps: each voxel gets
    the mean, over the occluding cubes (``mask_size`` voxels, filled with the
    image mean by default) that cover it, of ``risk(image) - risk(occluded)``,
    so positive = the region raises the predicted risk.  Costs one forward
    pass per cube position (about ``(size / (mask_size * (1 - overlap)))^3``).

    Returns
    -------
    numpy.ndarray
        float32 ``(D, H, W)`` on the preprocessed grid (not rescaled).
    """
    from monai.visualize import OcclusionSensitivity

    b = _image_patient_batch(model, batch, modality)
    net = _RiskAsClassScore(model.eval(), b, modality).eval()
    x = b[modality].float()
    occ = OcclusionSensitivity(net, mask_size=mask_size, n_batch=n_batch, verbose=False, mode=mode, overlap=overlap,
                               activate=False)
    with torch.no_grad():
        occ_map, _ = occ(x)
        base = float(net(x)[0, 0])
    return (base - occ_map[0, 0].float().cpu().numpy()).astype(np.float32)  # (B, classes, D, H, W)


def integrated_gradients_map(model: nn.Module, batch: Mapping, modality: str, *, baseline: str | float = "median",
                             steps: int = 32, n_batch: int = 32, raw: bool = False) -> np.ndarray:
    """Integrated gradients (Sundararajan, Taly & Yan, ICML 2017) of the fused risk on one image.

    .. math:: \\mathrm{IG}_v = (x_v - x'_v) \\int_0^1
              \\frac{\\partial f(x' + a (x - x'))}{\\partial x_v}\\, da

    with the integral by the midpoint rule over ``steps`` points; ``f`` is the
    fused risk with the patient's other modalities fixed.  Unlike a
    class-activation map it has a reference: the attributions sum to
    ``f(x) - f(x')`` (completeness, up to the quadrature error), so a voxel
    that every patient shares (body background) gets nothing and a lesion
    that raises the risk gets the credit.  On the demo cohort it is the map
    that agrees with the lesion-replacement test of what the model reads
    (``benchmarks/explanations.py``); Grad-CAM on the small CNN does not.

    Parameters
    ----------
    baseline
        ``"median"`` (default): a constant image at the image's median, i.e.
        the patient's background tissue in a lesion-centred crop;
        ``"zero"``: 0 in preprocessed units; or a number.
    steps
        Quadrature points; the completeness error falls as ``1/steps^2``.
    n_batch
        Path points per forward/backward pass.
    raw
        Return the signed attributions (preprocessed grid, summing to about
        ``f(x) - f(x')``) instead of the display map.

    Returns
    -------
    numpy.ndarray
        float32 ``(D, H, W)``: by default the positive part (voxels that raise
        the risk above the baseline's) scaled to [0, 1], all zeros when none
        does, as :func:`grad_cam` returns.
    """
    if int(steps) < 1 or int(n_batch) < 1:
        raise ValueError(f"steps and n_batch must be >= 1, got {steps} and {n_batch}")
    b = _image_patient_batch(model, batch, modality)
    was_training = model.training
    model.eval()
    net = _RiskAsClassScore(model, b, modality)
    x = b[modality].float().detach()
    if baseline == "median":
        x0 = torch.full_like(x, float(x.median()))
    elif baseline == "zero":
        x0 = torch.zeros_like(x)
    elif isinstance(baseline, (int, float)) and math.isfinite(float(baseline)):
        x0 = torch.full_like(x, float(baseline))
    else:
        raise ValueError(f"baseline must be 'median', 'zero' or a finite number, got {baseline!r}")
    alphas = (torch.arange(int(steps), dtype=x.dtype, device=x.device) + 0.5) / int(steps)
    grad_sum = torch.zeros_like(x)
    try:
        with torch.enable_grad():
            for start in range(0, len(alphas), int(n_batch)):
                a = alphas[start:start + int(n_batch)].view(-1, *([1] * (x.ndim - 1)))
                path = (x0 + a * (x - x0)).requires_grad_(True)
                (g,) = torch.autograd.grad(net(path).sum(), path)
                grad_sum += g.sum(0, keepdim=True)
    finally:
        model.train(was_training)
    ig = ((x - x0) * grad_sum / len(alphas))[0, 0].detach().float().cpu().numpy()
    if raw:
        return ig.astype(np.float32)
    pos = np.maximum(np.nan_to_num(ig, nan=0.0, posinf=0.0, neginf=0.0), 0.0)
    hi = float(pos.max())
    if hi <= 0.0:
        return np.zeros(pos.shape, dtype=np.float32)
    return (pos / hi).astype(np.float32)


def roi_reliance(model: nn.Module, batch: Mapping, modality: str, roi: np.ndarray, *, dilate: int = 2) -> dict:
    """What the model reads in one image: the ROI or the rest (a perturbation test, the truth maps are scored by).

    The fused risk is recomputed twice with the image's median (the
    background tissue of a lesion-centred crop) written (a) into the ROI
    dilated by ``dilate`` voxels and (b) everywhere else.  ``delta_roi`` and
    ``delta_outside`` are ``risk(image) - risk(replaced)``; the model reads
    the lesion when ``|delta_roi| > |delta_outside|``.  A faithful map puts
    its top voxels in the lesion for those patients, and outside for the
    others (e.g. a CT model that reads a scanner's noise and HU offset).

    Returns
    -------
    dict
        ``risk``, ``delta_roi``, ``delta_outside``, ``reads_roi`` (bool).
    """
    from scipy.ndimage import binary_dilation

    b = _image_patient_batch(model, batch, modality)
    roi = np.asarray(roi, dtype=bool)
    x = b[modality].float()
    if roi.shape != tuple(x.shape[-3:]):
        raise ValueError(f"roi shape {roi.shape} differs from the image's {tuple(x.shape[-3:])}")
    if not roi.any():
        raise ValueError("roi is empty")
    region = torch.from_numpy(binary_dilation(roi, iterations=int(dilate)) if dilate > 0 else roi).to(x.device)
    fill = x.median()
    inside, outside = x.clone(), x.clone()
    inside[..., region] = fill
    outside[..., ~region] = fill
    was_training = model.training
    model.eval()
    try:
        net = _RiskAsClassScore(model, b, modality)
        with torch.no_grad():
            r = net(torch.cat([x, inside, outside]))[:, 0].double().cpu().numpy()
    finally:
        model.train(was_training)
    d_roi, d_out = float(r[0] - r[1]), float(r[0] - r[2])
    return {"risk": float(r[0]), "delta_roi": d_roi, "delta_outside": d_out, "reads_roi": abs(d_roi) > abs(d_out)}


#: Image-map methods :func:`image_map` (and ``radfusion explain --cam``) accept.
IMAGE_MAP_METHODS = (*CAM_METHODS, "integrated_gradients")


def image_map(model: nn.Module, batch: Mapping, modality: str, method: str = "gradcam", *,
              layer: str | None = None) -> np.ndarray:
    """The display map of ``method`` (one of :data:`IMAGE_MAP_METHODS`) in [0, 1] on the preprocessed grid
    (``layer``: the class-activation map's target layer, default :func:`gradcam_target_layer`; ignored by
    integrated gradients)."""
    if method == "integrated_gradients":
        return integrated_gradients_map(model, batch, modality)
    return grad_cam(model, batch, modality, method=method, layer=layer)


#: Shares of the image deleted, most relevant voxels first, in :func:`deletion_aopc`.
DELETION_FRACTIONS = (0.02, 0.05, 0.1, 0.2)


def deletion_aopc(model: nn.Module, batch: Mapping, modality: str, heatmap: np.ndarray, *,
                  fractions: Sequence[float] = DELETION_FRACTIONS) -> float:
    """How much the fused risk falls when the voxels a map ranks highest are deleted (AOPC).

    The deletion test of a relevance map (Samek et al. 2017, "Evaluating the
    visualization of what a deep neural network has learned", IEEE TNNLS;
    Petsiuk et al. 2018, RISE): for each fraction ``k`` the top ``k`` of the
    voxels by ``heatmap`` are replaced by the image's median (the background
    tissue of a lesion-centred crop, the same reference as
    :func:`roi_reliance` and :func:`integrated_gradients_map`), and the area
    over the perturbation curve is the mean of ``f(x) - f(x_deleted)`` over
    the fractions, ``f`` = the fused risk with the other modalities at the
    patient's values.  A map of what raises the risk scores high; one that
    points at voxels the model ignores scores near 0; one that points at
    voxels whose removal *raises* the risk scores below 0.  Ties are broken
    in raster order; a constant map ranks nothing and scores 0.

    Uses no lesion mask, so it can choose between maps on any patient.
    """
    return deletion_aopcs(model, batch, modality, [heatmap], fractions=fractions)[0]


def deletion_aopcs(model: nn.Module, batch: Mapping, modality: str, heatmaps: Sequence[np.ndarray], *,
                   fractions: Sequence[float] = DELETION_FRACTIONS) -> list[float]:
    """:func:`deletion_aopc` of several maps of the same patient, in one forward pass (one score per map)."""
    fr = [float(f) for f in fractions]
    if not fr or any(not 0.0 < f <= 1.0 for f in fr):
        raise ValueError(f"fractions must be in (0, 1], got {list(fractions)}")
    b = _image_patient_batch(model, batch, modality)
    x = b[modality].float()
    heats = [np.asarray(h, dtype=np.float64) for h in heatmaps]
    for heat in heats:
        if heat.shape != tuple(x.shape[2:]):
            raise ValueError(f"heatmap shape {heat.shape} differs from the {modality} image's {tuple(x.shape[2:])}")
    ranked = [i for i, h in enumerate(heats) if float(h.max() - h.min()) > 0.0]  # a constant map ranks nothing
    scores = [0.0] * len(heats)
    if not ranked:
        return scores
    fill = x.median()
    xs = []
    for i in ranked:
        order = torch.as_tensor(np.argsort(-heats[i].ravel(), kind="stable"), device=x.device)
        for f in fr:
            xd = x.clone().reshape(-1)
            xd[order[:max(1, int(round(f * heats[i].size)))]] = fill
            xs.append(xd.reshape(x.shape))
    net = _RiskAsClassScore(model, b, modality)
    with _EvalMode(model), torch.no_grad():
        f0 = float(net(x)[0, 0])
        fd = net(torch.cat(xs)).reshape(len(ranked), len(fr)).double().cpu().numpy()
    for k, i in enumerate(ranked):
        scores[i] = float(np.mean(f0 - fd[k]))
    return scores


def select_cam_layer(model: nn.Module, batches: Sequence[Mapping], modality: str, *, method: str = "gradcam",
                     candidates: Sequence[str] | None = None,
                     fractions: Sequence[float] = DELETION_FRACTIONS) -> dict:
    """Choose the class-activation map's target layer by the deletion test, without any lesion mask.

    For each candidate layer (default :func:`cam_layer_candidates`: one
    activated map per resolution) the map of ``method`` is computed for each
    one-patient batch in ``batches`` that has ``modality`` and scored by
    :func:`deletion_aopc`; the layer with the highest mean score is chosen
    (ties: the deeper layer).  Which layer's map is faithful depends on the
    trained network: on six demo runs the last layer's Grad-CAM centred on
    the lesion for 0-84% of the test patients depending on the run and
    modality; the layer chosen this way on validation patients was never
    worse than the last one and was the best of the three stages in 8 of the
    18 run-modality pairs (README, "Explanations").

    Returns
    -------
    dict
        ``{"layer", "aopc": {layer: mean score}, "n_patients", "candidates", "method", "fractions"}``;
        with no usable patient ``layer`` is the last candidate and ``aopc`` is empty.
    """
    if method not in CAM_METHODS:
        raise ValueError(f"method must be one of {', '.join(CAM_METHODS)}, got {method!r}")
    enc = model.encoders[modality]
    cands = list(candidates) if candidates is not None else cam_layer_candidates(enc)
    if not cands:
        raise ValueError("candidates must name at least one layer")
    usable = [b for b in batches if _present_of(b, modality)]
    scores: dict[str, list[float]] = {c: [] for c in cands}
    session = _CamSession(model, modality, cands, method) if usable else None
    for b in usable:
        heats = session.maps(b)
        for c, a in zip(cands, deletion_aopcs(model, b, modality, [heats[c] for c in cands], fractions=fractions)):
            scores[c].append(a)
    mean = {c: float(np.mean(v)) for c, v in scores.items() if v}
    chosen = max(reversed(cands), key=lambda c: mean[c]) if mean else cands[-1]
    return {"layer": chosen, "aopc": mean, "n_patients": len(usable), "candidates": cands, "method": method,
            "fractions": [float(f) for f in fractions]}


#: File of a fold folder caching :func:`fold_cam_layers`.
CAM_LAYERS_FILE = "cam_layers.json"


def _file_sha256(path: Path) -> str | None:
    import hashlib

    try:
        return hashlib.sha256(Path(path).read_bytes()).hexdigest()
    except OSError:
        return None


def fold_cam_layers(trained_fold, *, method: str = "gradcam", max_patients: int = 24, cache: bool = True) -> dict:
    """:func:`select_cam_layer` for every image modality of a trained fold's fused model.

    Scored on up to ``max_patients`` *validation* patients who have the
    modality (the training patients when fewer than 5 validation patients
    have it), so the test patients' maps are not chosen on.  The result is
    cached in ``<fold>/cam_layers.json`` per method, keyed by the checkpoint's
    SHA-256 (a retrained fold is scored again); an unwritable folder only
    skips the cache.

    Returns
    -------
    dict
        modality -> :func:`select_cam_layer`'s dict plus ``"split"``; image
        modalities whose encoder has no 3D feature map are left out.
    """
    if method not in CAM_METHODS:
        raise ValueError(f"method must be one of {', '.join(CAM_METHODS)}, got {method!r}")
    folder = Path(trained_fold.folder)
    digest = _file_sha256(folder / "checkpoint.pt")
    path = folder / CAM_LAYERS_FILE
    stored: dict = {}
    if cache and digest is not None and path.is_file():
        try:
            stored = json.loads(path.read_text())
        except (OSError, ValueError):
            stored = {}
        if stored.get("checkpoint_sha256") != digest:
            stored = {}
        if method in stored.get("methods", {}):
            return stored["methods"][method]
    model = trained_fold.models["fused"]
    result = {}
    for m in IMAGE_MODALITIES:
        if m not in getattr(model, "encoders", {}):
            continue
        try:
            cands = cam_layer_candidates(model.encoders[m])
        except (ValueError, AttributeError, KeyError):
            continue
        chosen = None
        for split in ("validation", "train"):
            tens = trained_fold.tensors.get(split)
            if tens is None or not len(trained_fold.splits.get(split, ())):
                continue
            one = (take(tens, [r]) for r in range(len(trained_fold.splits[split])))
            batches = list(itertools.islice((b for b in one if _present_of(b, m)), max_patients))
            if len(batches) >= 5 or split == "train":
                chosen = select_cam_layer(model, batches, m, method=method, candidates=cands)
                chosen["split"] = split
                break
        if chosen is not None:
            result[m] = chosen
    if cache and digest is not None:
        stored = {"checkpoint_sha256": digest, "methods": {**stored.get("methods", {}), method: result}}
        try:
            path.write_text(json.dumps(stored, indent=1))
        except OSError:
            pass
    return result


def save_heatmap_nifti(heatmap: np.ndarray, path: str | Path, *, spacing: Sequence[float] | None = None,
                       origin: Sequence[float] | None = None, direction: Sequence[float] | None = None) -> Path:
    """Write a ``(D, H, W)`` heatmap as NIfTI (float32).

    ``spacing``/``origin``/``direction`` are in SimpleITK's (x, y, z)
    convention.  With the geometry that ``data_adapters.imaging.preprocess``
    returns (kept per patient in ``Cohort.grids``) the file lies where the
    preprocessed crop lies in the scan, so a viewer overlays it on the
    original image; without it the file has origin 0 and identity direction.
    """
    import SimpleITK as sitk

    heatmap = np.asarray(heatmap, dtype=np.float32)
    if heatmap.ndim != 3:
        raise ValueError(f"heatmap must be (D, H, W), got shape {heatmap.shape}")
    img = sitk.GetImageFromArray(heatmap)
    if spacing is not None:
        img.SetSpacing([float(s) for s in spacing])
    if origin is not None:
        img.SetOrigin([float(o) for o in origin])
    if direction is not None:
        img.SetDirection([float(d) for d in direction])
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(img, str(path), useCompression=True)
    return path


def localisation(heatmap: np.ndarray, roi: np.ndarray, *, top_fraction: float = 0.1) -> dict:
    """How well a heatmap points at the lesion.

    Parameters
    ----------
    heatmap
        ``(D, H, W)``.
    roi
        bool ``(D, H, W)`` lesion mask on the same grid.
    top_fraction
        Fraction of voxels kept as "the top" (ties broken by voxel order).

    Returns
    -------
    dict
        ``top10_fraction_in_lesion``: fraction of the top voxels inside the
        mask; ``hit``: the (unweighted) centre of mass of the top voxels,
        rounded to a voxel, lies in the mask dilated by one voxel
        (6-connected); ``chance_fraction`` = lesion fraction of the crop (the
        expected fraction for a random map); ``chance_hit`` = fraction of the
        crop inside the dilated mask; ``lesion_in_top``: fraction of the
        lesion's voxels that are among the top voxels (1.0 when the top set
        contains the whole lesion; a map that is flat over the body gives
        about ``top_fraction``); ``peak_hit``: the maximum lies in the dilated
        mask (the "pointing game", Zhang et al. 2016).  ``None`` values when
        the mask is empty or the map is constant.

        The crop is centred on the lesion, so ``hit`` also counts diffuse maps
        whose top voxels surround the centre; ``lesion_in_top`` and
        ``peak_hit`` do not.
    """
    from scipy.ndimage import binary_dilation

    heatmap = np.asarray(heatmap, dtype=np.float64)
    roi = np.asarray(roi, dtype=bool)
    if heatmap.shape != roi.shape:
        raise ValueError(f"heatmap {heatmap.shape} and roi {roi.shape} differ in shape")
    out = {"top10_fraction_in_lesion": None, "hit": None, "chance_fraction": None, "chance_hit": None,
           "lesion_in_top": None, "peak_hit": None}
    if not roi.any():
        return out
    dil = binary_dilation(roi, iterations=1)
    out["chance_fraction"] = float(roi.mean())
    out["chance_hit"] = float(dil.mean())
    if float(heatmap.max()) <= float(heatmap.min()):
        return out
    k = max(1, int(math.ceil(top_fraction * heatmap.size)))
    top = np.argsort(-heatmap.ravel(), kind="stable")[:k]
    out["top10_fraction_in_lesion"] = float(roi.ravel()[top].mean())
    out["lesion_in_top"] = float(np.isin(np.flatnonzero(roi.ravel()), top).mean())
    out["peak_hit"] = bool(dil.ravel()[top[0]])
    com = np.array(np.unravel_index(top, heatmap.shape), dtype=np.float64).mean(axis=1)
    idx = tuple(int(np.clip(round(c), 0, s - 1)) for c, s in zip(com, heatmap.shape))
    out["hit"] = bool(dil[idx])
    return out


# --------------------------------------------------------------------------- #
# 4. Stability
# --------------------------------------------------------------------------- #
def mean_pairwise_spearman(vectors: Sequence[np.ndarray]) -> float | None:
    """Mean Spearman correlation over all pairs of vectors (pairs with a constant vector are skipped)."""
    from scipy.stats import spearmanr

    vs = [np.asarray(v, dtype=np.float64).ravel() for v in vectors]
    rs = []
    for a, b in itertools.combinations(vs, 2):
        if len(a) < 2 or np.ptp(a) == 0 or np.ptp(b) == 0:
            continue
        r = spearmanr(a, b).statistic
        if np.isfinite(r):
            rs.append(float(r))
    return float(np.mean(rs)) if rs else None


def _noise_scales(trained_fold) -> dict:
    """Per-feature training sd of each tabular modality (model scale), for the stability noise."""
    tr = trained_fold.tensors["train"]
    names = list(tr["modalities"])
    out = {}
    for m in ("omics", "clinical"):
        if m in names:
            rows = tr["present"][:, names.index(m)].numpy()
            x = tr[m].numpy()[rows] if rows.any() else tr[m].numpy()
            out[m] = x.std(axis=0) if len(x) > 1 else np.ones(x.shape[1])
    if "ehr" in names:
        v, msk = tr["ehr"]["values"].numpy(), tr["ehr"]["mask"].numpy()
        n = msk.sum(axis=(0, 1))
        mu = np.divide((v * msk).sum(axis=(0, 1)), n, out=np.zeros_like(n), where=n > 0)
        var = np.divide((((v - mu) ** 2) * msk).sum(axis=(0, 1)), n, out=np.ones_like(n), where=n > 0)
        out["ehr"] = np.sqrt(var)
    return out


def _perturb(batch: Mapping, rng: np.random.Generator, scales: Mapping[str, np.ndarray], *,
             tabular_rel_sd: float = 0.05, image_rel_sd: float = 0.02) -> dict:
    """A copy of a one-patient batch with Gaussian noise on every present input."""
    b = dict(batch)
    names = list(b["modalities"])
    for m in names:
        if m not in b or not bool(b["present"][0, names.index(m)]):
            continue
        if m in IMAGE_MODALITIES:
            x = b[m]
            sd = float(x.float().std()) or 1.0
            b[m] = x + torch.as_tensor(rng.normal(0.0, image_rel_sd * sd, size=tuple(x.shape)), dtype=x.dtype)
        elif m == "ehr":
            e = dict(b[m])
            v, msk = e["values"], e["mask"]
            sd = torch.as_tensor(scales.get("ehr", np.ones(v.shape[-1])), dtype=v.dtype)
            noise = torch.as_tensor(rng.normal(0.0, 1.0, size=tuple(v.shape)), dtype=v.dtype) * tabular_rel_sd * sd
            e["values"] = v + noise * msk
            b[m] = e
        elif m in scales:
            x = b[m]
            sd = torch.as_tensor(scales[m], dtype=x.dtype)
            b[m] = x + torch.as_tensor(rng.normal(0.0, 1.0, size=tuple(x.shape)), dtype=x.dtype) * tabular_rel_sd * sd
    return b


class _Context:
    """What the explanations of one patient of a trained fold share."""

    def __init__(self, trained_fold, pseudonym: str, *, background_size: int, seed: int,
                 cam_method: str = "gradcam", cam_layer: str = "auto") -> None:
        if cam_method not in IMAGE_MAP_METHODS:
            raise ValueError(f"cam_method must be one of {', '.join(IMAGE_MAP_METHODS)}, got {cam_method!r}")
        if not isinstance(cam_layer, str) or not cam_layer:
            raise ValueError(f"cam_layer must be 'auto', 'last' or a layer name, got {cam_layer!r}")
        self.cam_method = cam_method
        self.cam_layer = cam_layer
        self.tf = trained_fold
        self.pseudonym = pseudonym
        pos = {p: i for i, p in enumerate(trained_fold.cohort.pseudonyms)}
        if pseudonym not in pos:
            raise UnknownPatientError(f"patient {pseudonym!r} is not in this run (use the pseudonymised IDs of "
                                      "the 'patient' column of predictions.csv)")
        self.index = pos[pseudonym]
        self.split, self.row = trained_fold.locate(pseudonym)
        self.batch = take(trained_fold.tensors[self.split], [self.row])
        self.model = trained_fold.models["fused"]
        self.mods = list(self.model.modalities)
        self.present = [m for m in self.mods if _present_of(self.batch, m)]
        self.setup, self.background = {}, {}
        for m in ("omics", "clinical"):
            if m in self.present:
                self.setup[m] = _tabular_setup(trained_fold, m)
                self.background[m] = _background(trained_fold, m, background_size, seed)
        self.scales = _noise_scales(trained_fold)
        self.cam_unavailable: dict[str, str] = {}
        for m in IMAGE_MODALITIES:
            if m in self.present and cam_method in CAM_METHODS:  # integrated gradients needs no layer
                try:
                    gradcam_target_layer(self.model.encoders[m], self.batch[m].to(self.tf.device))
                except (ValueError, AttributeError, KeyError) as err:
                    self.cam_unavailable[m] = str(err)
        # target layer of each class-activation map: chosen by the deletion test (auto), the last, or named
        self.layers: dict[str, str | None] = {}
        self.layer_selection: dict[str, dict] = {}
        if cam_method in CAM_METHODS and self.images:
            if cam_layer == "auto":
                self.layer_selection = fold_cam_layers(trained_fold, method=cam_method)
                self.layers = {m: self.layer_selection[m]["layer"] for m in self.images if m in self.layer_selection}
            elif cam_layer != "last":
                for m in self.images:
                    enc = self.model.encoders[m]
                    if cam_layer not in dict(enc.named_modules()):
                        raise UnknownLayerError(f"the {m} encoder ({type(enc).__name__}) has no layer "
                                                f"{cam_layer!r}; candidates: "
                                                f"{', '.join(cam_layer_candidates(enc))} (or 'auto', 'last')")
                self.layers = {m: cam_layer for m in self.images}
        for m in self.images:
            if cam_method in CAM_METHODS and self.layers.get(m) is None:
                self.layers[m] = gradcam_target_layer(self.model.encoders[m], self.batch[m].to(self.tf.device))

    @property
    def tabular(self) -> list[str]:
        return [m for m in TABULAR_MODALITIES if m in self.present]

    @property
    def images(self) -> list[str]:
        """Present image modalities whose encoder has a feature map Grad-CAM can use."""
        return [m for m in IMAGE_MODALITIES if m in self.present and m not in self.cam_unavailable]

    def shapley(self, batch) -> dict:
        return modality_shapley(self.model, batch)

    def shap(self, batch, m: str, *, nsamples, seed: int) -> dict:
        return _one_patient_shap(self.tf, batch, m, background=self.background.get(m), setup=self.setup.get(m),
                                 nsamples=nsamples, seed=seed)

    def cam(self, batch, m: str) -> np.ndarray:
        return image_map(self.model, batch, m, self.cam_method, layer=self.layers.get(m))


def _stability(ctx: _Context, *, n_repeats: int, seed: int, nsamples) -> dict:
    rng = np.random.default_rng(np.random.SeedSequence([seed, 7919]))
    shapley_runs, shap_runs, cam_runs = [], {m: [] for m in ctx.tabular}, {m: [] for m in ctx.images}
    for r in range(n_repeats):
        b = _perturb(ctx.batch, rng, ctx.scales)
        ms = ctx.shapley(b)
        shapley_runs.append(np.array([ms["values"][m] for m in ctx.present]))
        for m in ctx.tabular:
            res = ctx.shap(b, m, nsamples=nsamples, seed=seed + 1000 * (r + 1))
            by_feature = {it.get("group", it["feature"]): it["shap"] for it in res["items"]}
            shap_runs[m].append(np.array([by_feature[k] for k in sorted(by_feature)]))
        for m in ctx.images:
            cam_runs[m].append(ctx.cam(b, m))
    per_shap = {m: mean_pairwise_spearman(v) for m, v in shap_runs.items()}
    per_cam = {m: mean_pairwise_spearman(v) for m, v in cam_runs.items()}

    def avg(d):
        vals = [v for v in d.values() if v is not None]
        return float(np.mean(vals)) if vals else None

    return {
        "modality_shapley": mean_pairwise_spearman(shapley_runs) if len(ctx.present) > 1 else None,
        "feature_shap": avg(per_shap),
        "gradcam": avg(per_cam),
        "n_repeats": int(n_repeats),
        "per_modality": {"feature_shap": per_shap, "gradcam": per_cam},
    }


def explanation_stability(trained_fold, pseudonym: str, *, n_repeats: int = 5, seed: int = 0,
                          background_size: int = 50, nsamples="auto") -> dict:
    """Stability of the three explanations of one patient under small input perturbations.

    Each of ``n_repeats`` repeats adds Gaussian noise to every present input
    (tabular: sd = 0.05 x the training sd of the feature, on observed EHR
    values only; images: sd = 0.02 x the volume's voxel sd) and uses a new
    Kernel SHAP sampling seed, then recomputes the modality Shapley values,
    the feature SHAP values of every tabular modality and the Grad-CAM of
    every image modality.  Reported: the mean Spearman correlation over the
    ``n_repeats (n_repeats - 1) / 2`` pairs of repeats, per explanation type
    (feature SHAP and Grad-CAM averaged over modalities; Grad-CAM compares
    the voxel values of the heatmaps; pairs with a constant vector are
    skipped; ``None`` when nothing could be compared).

    Returns
    -------
    dict
        ``modality_shapley``, ``feature_shap``, ``gradcam`` (floats or None),
        ``n_repeats``, ``per_modality``.
    """
    if n_repeats < 2:
        raise ValueError(f"n_repeats must be >= 2 to compare repeats, got {n_repeats}")
    ctx = _Context(trained_fold, pseudonym, background_size=background_size, seed=seed)
    return _stability(ctx, n_repeats=n_repeats, seed=seed, nsamples=nsamples)


# --------------------------------------------------------------------------- #
# 5. Out-of-distribution score
# --------------------------------------------------------------------------- #
class MahalanobisOOD:
    r"""Mahalanobis distance to the training embeddings, with a Ledoit-Wolf covariance.

    :math:`d(x) = \sqrt{(x - \hat\mu)^\top \hat\Sigma^{-1} (x - \hat\mu)}`
    with :math:`\hat\Sigma` the Ledoit-Wolf shrinkage estimate
    (``sklearn.covariance.LedoitWolf``; well conditioned even with more
    dimensions than patients or dead embedding units).

    Threshold: the ``quantile`` (0.99) of the training distances.  In-sample
    distances are optimistic (each point pulled the mean and covariance
    towards itself, so they are smaller than those of new points from the same
    distribution, more so in high dimension / small samples) and a threshold
    on them flags more than 1 % of new in-distribution points.  The default
    ``threshold_method="crossfit"`` uses out-of-fold distances instead: the
    training set is split into ``n_splits`` folds, mean and covariance are fitted
    without a fold and its points' distances computed, so every distance is
    that of an unseen point.  ``"in_sample"`` keeps the optimistic version.
    :meth:`calibrate` sets the threshold from any held-out set (e.g. the
    validation patients, whose embeddings the network was not fitted on:
    the network's own fit makes training embeddings more typical than new
    patients' ones, which no refitting of the covariance can remove).

    Attributes
    ----------
    location_, covariance_, precision_, shrinkage_
        Fitted on all training points.
    train_distances_
        In-sample distances; ``crossfit_distances_`` out-of-fold ones.
    threshold_
        Distances above it are flagged.
    """

    def __init__(self, *, quantile: float = 0.99, threshold_method: str = "crossfit", n_splits: int = 10,
                 random_state: int = 0) -> None:
        if not 0.0 < quantile < 1.0:
            raise ValueError(f"quantile must be in (0, 1), got {quantile}")
        if threshold_method not in ("crossfit", "in_sample"):
            raise ValueError(f"threshold_method must be 'crossfit' or 'in_sample', got {threshold_method!r}")
        if n_splits < 2:
            raise ValueError(f"n_splits must be >= 2, got {n_splits}")
        self.quantile = quantile
        self.threshold_method = threshold_method
        self.n_splits = n_splits
        self.random_state = random_state

    @staticmethod
    def _check(x, name: str) -> np.ndarray:
        x = np.asarray(x, dtype=np.float64)
        if x.ndim == 1:
            x = x[None, :]
        if x.ndim != 2 or not np.isfinite(x).all():
            raise ValueError(f"{name} must be a finite (N, D) array, got shape {x.shape}")
        return x

    @staticmethod
    def _dist(x, loc, prec) -> np.ndarray:
        d = x - loc
        return np.sqrt(np.maximum(np.einsum("ij,jk,ik->i", d, prec, d), 0.0))

    def fit(self, train_embeddings) -> "MahalanobisOOD":
        """Fit mean and Ledoit-Wolf covariance on ``(N, D)`` training embeddings; set ``threshold_``."""
        from sklearn.covariance import LedoitWolf

        x = self._check(train_embeddings, "train_embeddings")
        if len(x) < 3:
            raise ValueError(f"need at least 3 training embeddings, got {len(x)}")
        lw = LedoitWolf().fit(x)
        self.location_ = lw.location_
        self.covariance_ = lw.covariance_
        self.precision_ = np.linalg.pinv(lw.covariance_, hermitian=True)
        self.shrinkage_ = float(lw.shrinkage_)
        self.n_features_in_ = x.shape[1]
        self.train_distances_ = self._dist(x, self.location_, self.precision_)
        k = min(self.n_splits, len(x))
        cf = np.empty(len(x))
        folds = np.array_split(np.random.default_rng(self.random_state).permutation(len(x)), k)
        for held in folds:
            rest = np.setdiff1d(np.arange(len(x)), held)
            if len(rest) < 2:
                cf[held] = self.train_distances_[held]
                continue
            f = LedoitWolf().fit(x[rest])
            cf[held] = self._dist(x[held], f.location_, np.linalg.pinv(f.covariance_, hermitian=True))
        self.crossfit_distances_ = cf
        ref = cf if self.threshold_method == "crossfit" else self.train_distances_
        self.threshold_ = float(np.quantile(ref, self.quantile))
        return self

    def calibrate(self, embeddings) -> "MahalanobisOOD":
        """Set ``threshold_`` to the ``quantile`` of the distances of held-out ``embeddings``."""
        self.threshold_ = float(np.quantile(self.distance(embeddings), self.quantile))
        return self

    def distance(self, emb) -> np.ndarray:
        """``(N,)`` Mahalanobis distances of ``(N, D)`` (or ``(D,)``) embeddings."""
        if not hasattr(self, "location_"):
            raise RuntimeError("MahalanobisOOD.distance called before fit")
        x = self._check(emb, "emb")
        if x.shape[1] != self.n_features_in_:
            raise ValueError(f"emb has {x.shape[1]} dimensions, the detector was fitted on {self.n_features_in_}")
        return self._dist(x, self.location_, self.precision_)

    def flag(self, emb) -> np.ndarray:
        """``(N,)`` bool: distance above ``threshold_``."""
        return self.distance(emb) > self.threshold_


# --------------------------------------------------------------------------- #
# 6. One patient's report
# --------------------------------------------------------------------------- #
def breslow_survival(train_risk, train_time, train_event, risk, times) -> np.ndarray:
    r"""``(N, T)`` survival :math:`S(t|x) = \exp(-\hat H_0(t) e^{r(x)})` with Breslow's baseline.

    Uses :func:`fusion.evaluation.breslow_survival` when available, else
    :math:`\hat H_0(t) = \sum_{t_i \le t} d_i / \sum_{j: t_j \ge t_i} e^{r_j}`
    (Breslow 1972) computed here.
    """
    try:
        from fusion.evaluation import breslow_survival as _bs

        out = np.asarray(_bs(train_risk, train_time, train_event, risk, times), dtype=np.float64)
        if out.shape == (len(np.atleast_1d(risk)), len(np.atleast_1d(times))):
            return out
    except Exception as err:  # noqa: BLE001 - module being written concurrently; fall back
        log.debug("fusion.evaluation.breslow_survival unavailable (%s); local Breslow", err)
    r = np.asarray(train_risk, dtype=np.float64)
    t = np.asarray(train_time, dtype=np.float64)
    e = np.asarray(train_event, dtype=bool)
    shift = float(r.max())
    w = np.exp(r - shift)
    ev_times = np.unique(t[e])
    h = np.array([e[t == s].sum() / w[t >= s].sum() for s in ev_times])
    cum = np.cumsum(h)
    times = np.atleast_1d(np.asarray(times, dtype=np.float64))
    pos = np.searchsorted(ev_times, times, side="right")
    h0 = np.where(pos > 0, cum[np.maximum(pos - 1, 0)], 0.0) if len(cum) else np.zeros_like(times)
    risk = np.atleast_1d(np.asarray(risk, dtype=np.float64))
    return np.exp(-h0[None, :] * np.exp(risk - shift)[:, None])


def _plot_modality_shapley(ms: dict, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    items = sorted(ms["values"].items(), key=lambda kv: abs(kv[1]))
    fig, ax = plt.subplots(figsize=(6, 0.5 * len(items) + 1.6), dpi=110)
    labels = [m.upper() + (" (absent)" if m in ms["absent"] else "") for m, _ in items]
    vals = [v for _, v in items]
    ax.barh(labels, vals, color=["#c0392b" if v > 0 else "#2471a3" for v in vals])
    ax.axvline(0, color="k", lw=0.8)
    ax.set_xlabel("Shapley value (change in log relative hazard)")
    ax.set_title(f"{title}\nno modality {ms['base_value']:+.3f} -> all present {ms['full_value']:+.3f}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _plot_shap(res: dict, modality: str, path: Path, title: str, top: int = 15) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    items = res["items"][:top][::-1]
    fig, ax = plt.subplots(figsize=(7, 0.35 * len(items) + 1.6), dpi=110)
    labels = [f"{it['feature']} = {it['value']:.3g}" if it["value"] is not None else f"{it['feature']} (not measured)"
              for it in items]
    vals = [it["shap"] for it in items]
    ax.barh(labels, vals, color=["#c0392b" if v > 0 else "#2471a3" for v in vals])
    ax.axvline(0, color="k", lw=0.8)
    ax.tick_params(axis="y", labelsize=7)
    ax.set_xlabel("SHAP value (change in log relative hazard)")
    ax.set_title(f"{title}: {modality}\nE[f] {res['expected_value']:+.3f} -> f(x) {res['model_output']:+.3f}",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _lesion_slice(roi: np.ndarray, heat: np.ndarray) -> int:
    if roi.any():
        return int(round(float(np.argwhere(roi)[:, 0].mean())))
    return int(np.unravel_index(np.argmax(heat), heat.shape)[0]) if heat.max() > 0 else heat.shape[0] // 2


def _plot_gradcam(image: np.ndarray, heat: np.ndarray, roi: np.ndarray, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    z = _lesion_slice(roi, heat)
    fig, axes = plt.subplots(1, 2, figsize=(7, 3.6), dpi=110)
    for ax in axes:
        ax.imshow(image[z], cmap="gray", interpolation="nearest")
        if roi[z].any():
            ax.contour(roi[z].astype(float), levels=[0.5], colors="lime", linewidths=1.0)
        ax.set_axis_off()
    im = axes[1].imshow(heat[z], cmap="jet", alpha=0.45, vmin=0, vmax=1, interpolation="bilinear")
    fig.colorbar(im, ax=axes[1], fraction=0.046)
    axes[0].set_title(f"axial slice {z} (lesion contour)", fontsize=8)
    axes[1].set_title("Grad-CAM of the fused risk", fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _write_json(path: Path, obj) -> None:
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(_jsonable(obj), indent=2, allow_nan=False), encoding="utf-8")
    tmp.replace(path)


def explain_patient(trained_fold, pseudonym: str, *, out_dir: str | Path, n_repeats: int = 5, seed: int = 0,
                    background_size: int = 50, nsamples="auto", cam_method: str = "gradcam",
                    cam_layer: str = "auto") -> dict:
    """Explain one patient of a trained fold; write ``explanation.json``, PNGs and Grad-CAM arrays.

    Parameters
    ----------
    trained_fold
        :class:`fusion.experiment.TrainedFold`.
    pseudonym
        The patient's pseudonym (``P-...``, as in ``predictions.csv``).
    out_dir
        Output folder (created).
    n_repeats
        Repeats of the stability analysis (0 or 1 skips it).
    seed
        Seed of the SHAP background draw, sampling and stability noise.
    background_size, nsamples
        Kernel SHAP background size and coalitions (see :func:`feature_shap`).
    cam_method
        ``"gradcam"`` (default), ``"gradcampp"`` or ``"hirescam"`` (see :func:`grad_cam`), or
        ``"integrated_gradients"`` (:func:`integrated_gradients_map`).
    cam_layer
        Target layer of a class-activation map: ``"auto"`` (default) = chosen per
        image modality by the deletion test on the fold's validation patients
        (:func:`fold_cam_layers`, cached in the fold folder), ``"last"`` = the
        last activated feature map (:func:`gradcam_target_layer`), or a layer
        name relative to the encoder.

    Returns
    -------
    dict
        The content of ``explanation.json``::

            {"patient", "fold", "split", "site", "risk", "risk_group", "risk_percentile",
             "survival_curve": {"time", "survival"},
             "ood": {"distance", "threshold", "flag"},
             "modality_shapley": {"values", "base_value", "full_value", "efficiency_error", "absent"},
             "feature_shap": {modality: [{"feature", "value", "shap"}]},
             "gradcam": {modality: {"npy", "png", "top10_fraction_in_lesion", "hit", ...}},
             "stability": {"modality_shapley", "feature_shap", "gradcam", "n_repeats"},
             "pathway_scores": {pathway: score}, "pathway_scores_cohort_percentile": {pathway: pct}}

        plus ``task`` (``cox``, ``discrete_time`` or ``classification``),
        ``proba`` {class: p} (classification; ``risk_group`` is then null and
        the survival curve empty; discrete-time curves are the model's own
        ``S`` at the interval ends, Cox curves use Breslow's baseline),
        ``feature_shap_details`` (expected value, model output, exactness per
        modality), ``ood.method``, ``gradcam.<m>.chance_fraction`` /
        ``nifti`` / ``layer`` / ``layer_selection`` (the deletion scores of
        each candidate layer with ``cam_layer="auto"``; ``unavailable`` with null files for encoders
        without a 3D feature map) and ``timings_s``.  Files in
        ``out_dir``: ``explanation.json``, ``modality_shapley.png``,
        ``shap_<modality>.png``, ``gradcam_<modality>.png``,
        ``gradcam_<modality>.npy`` (float16 on the preprocessed grid) and
        ``gradcam_<modality>.nii.gz`` (see :func:`save_heatmap_nifti`).
    """
    from fusion.train import predict

    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tf = trained_fold
    ctx = _Context(tf, pseudonym, background_size=background_size, seed=seed, cam_method=cam_method,
                   cam_layer=cam_layer)
    cohort, model, device = tf.cohort, ctx.model, tf.device
    i = ctx.index

    # prediction, risk group, percentile, survival curve, OOD
    train = predict(model, tf.tensors["train"], device=device)
    with _EvalMode(model), torch.no_grad():
        out = model(to_device(_strip_targets(ctx.batch), _device_of(model)))
    risk = float(out["risk"].reshape(-1)[0])
    emb = out["embedding"].detach().float().cpu().numpy()
    tr_idx = tf.splits["train"]
    k = tf.cfg.evaluation.risk_groups
    cuts = np.quantile(train["risk"], np.linspace(0, 1, k + 1)[1:-1])
    task = getattr(model, "task", "cox")
    extra: dict = {}
    if task == "classification":
        grid, surv, risk_group = np.zeros(0), np.zeros(0), None
        proba = out["proba"][0].detach().float().cpu().numpy()
        extra["proba"] = {str(c): float(p_) for c, p_ in zip(model.classes, proba)}
    else:
        risk_group = int(np.digitize(risk, cuts))
        if task == "discrete_time":  # the model's own survival at the interval ends
            grid = np.r_[0.0, model.cuts.detach().cpu().numpy()[1:]]
            surv = np.r_[1.0, out["survival"][0].detach().float().cpu().numpy()]
        else:  # Cox: Breslow baseline hazard of the training patients
            t_tr, e_tr = cohort.time[tr_idx].astype(np.float64), cohort.event[tr_idx].astype(bool)
            grid = np.linspace(0.0, float(t_tr.max()), 100)
            surv = breslow_survival(train["risk"], t_tr, e_tr, np.array([risk]), grid)[0]
    # the same detector (and threshold) as the run's predictions.csv (fusion.experiment)
    ood = MahalanobisOOD().fit(train["embedding"])
    dist = float(ood.distance(emb)[0])
    timings["prediction_ood"] = time.perf_counter() - t0

    title = f"{pseudonym} ({ctx.split})"
    t1 = time.perf_counter()
    ms = ctx.shapley(ctx.batch)
    _plot_modality_shapley(ms, out_dir / "modality_shapley.png", title)
    timings["modality_shapley"] = time.perf_counter() - t1

    t1 = time.perf_counter()
    fshap, fdetails = {}, {}
    for m in ctx.tabular:
        res = ctx.shap(ctx.batch, m, nsamples=nsamples, seed=seed)
        fshap[m] = [{"feature": it["feature"], "value": it["value"], "shap": it["shap"]} for it in res["items"]]
        fdetails[m] = {"expected_value": res["expected_value"], "model_output": res["model_output"],
                       "exact": res["exact"], "design": _SHAP_DESIGN[m]}
        _plot_shap(res, m, out_dir / f"shap_{m}.png", title)
    timings["feature_shap"] = time.perf_counter() - t1

    t1 = time.perf_counter()
    cams = {}
    for m in ctx.images:
        heat = ctx.cam(ctx.batch, m)
        roi = cohort.rois[m][i] if m in cohort.rois else np.zeros(heat.shape, dtype=bool)
        np.save(out_dir / f"gradcam_{m}.npy", heat.astype(np.float16))
        pp = tf.cfg.modalities[m].preprocessing
        geom = (cohort.grids.get(m) or [None] * len(cohort))[i]
        if geom is not None:  # on the scan's physical grid: overlays the original image
            save_heatmap_nifti(heat, out_dir / f"gradcam_{m}.nii.gz", spacing=geom["spacing"], origin=geom["origin"],
                               direction=geom["direction"])
        else:
            save_heatmap_nifti(heat, out_dir / f"gradcam_{m}.nii.gz", spacing=tuple(pp.spacing) if pp else None)
        _plot_gradcam(ctx.batch[m][0, 0].numpy(), heat, roi, out_dir / f"gradcam_{m}.png", f"{title}: {m.upper()}")
        loc = localisation(heat, roi)
        cams[m] = {"npy": f"gradcam_{m}.npy", "png": f"gradcam_{m}.png", "nifti": f"gradcam_{m}.nii.gz",
                   "top10_fraction_in_lesion": loc["top10_fraction_in_lesion"], "hit": loc["hit"],
                   "chance_fraction": loc["chance_fraction"],
                   "layer": ctx.layers.get(m) if ctx.cam_method in CAM_METHODS else "input",
                   "layer_selection": ctx.layer_selection.get(m) if ctx.cam_layer == "auto" else None,
                   "method": ctx.cam_method,
                   # what the model reads in this image (lesion vs rest), the check on the map above
                   "roi_reliance": roi_reliance(model, ctx.batch, m, roi) if roi.any() else None}
    for m, why in ctx.cam_unavailable.items():
        cams[m] = {"npy": None, "png": None, "top10_fraction_in_lesion": None, "hit": None, "unavailable": why}
    timings["gradcam"] = time.perf_counter() - t1

    t1 = time.perf_counter()
    if n_repeats >= 2:
        stability = _stability(ctx, n_repeats=n_repeats, seed=seed, nsamples=nsamples)
    else:
        stability = {"modality_shapley": None, "feature_shap": None, "gradcam": None, "n_repeats": int(n_repeats)}
    timings["stability"] = time.perf_counter() - t1

    pathway, pathway_pct = {}, {}
    if "omics" in ctx.present and getattr(tf.transforms, "omics_raw_", None) is not None:
        raw = tf.transforms.omics_raw_
        vals = raw.iloc[i].to_numpy(dtype=np.float64)
        j = cohort.modalities.index("omics")
        tr_rows = tr_idx[cohort.present[tr_idx, j]]
        ref = raw.iloc[tr_rows].to_numpy(dtype=np.float64)
        for c, name in enumerate(raw.columns):
            if np.isfinite(vals[c]):
                pathway[str(name)] = float(vals[c])
                col = ref[:, c][np.isfinite(ref[:, c])]
                pathway_pct[str(name)] = float(100.0 * np.mean(col <= vals[c])) if len(col) else None
    timings["total"] = time.perf_counter() - t0

    result = {
        "patient": pseudonym,
        "fold": tf.folder.name,
        "split": ctx.split,
        "site": str(cohort.sites[i]),
        "risk": risk,
        "risk_group": risk_group,
        "risk_percentile": float(100.0 * np.mean(train["risk"] <= risk)),
        "survival_curve": {"time": grid.tolist(), "survival": surv.tolist()},
        "ood": {"distance": dist, "threshold": ood.threshold_, "flag": bool(dist > ood.threshold_),
                "method": "Mahalanobis distance of the fused embedding to the training embeddings (Ledoit-Wolf "
                          "covariance); threshold = 99th percentile of cross-fitted training distances"},
        "modality_shapley": {k_: ms[k_] for k_ in ("values", "base_value", "full_value", "efficiency_error",
                                                   "absent")},
        "feature_shap": fshap,
        "feature_shap_details": fdetails,
        "gradcam": cams,
        "stability": stability,
        "pathway_scores": pathway,
        "pathway_scores_cohort_percentile": pathway_pct,
        "task": task,
        **extra,
        "timings_s": {k_: round(v, 3) for k_, v in timings.items()},
    }
    _write_json(out_dir / "explanation.json", result)
    return _jsonable(result)


def find_patient_fold(run: str | Path, pseudonym: str) -> tuple[Path, str]:
    """The fold folder of ``run`` to explain ``pseudonym`` in, and the patient's split there.

    The fold where the patient is a test patient (leave-one-site-out runs:
    the fold of the patient's site; hold-out runs: the run folder itself),
    else the first fold that contains the patient.

    Raises
    ------
    FileNotFoundError
        ``run`` is not a run folder.
    UnknownPatientError
        No fold contains the pseudonym (the message says where to find valid ones).
    """
    import pandas as pd

    from fusion.experiment import fold_dirs

    run = Path(run)
    if not run.is_dir():
        raise FileNotFoundError(f"run folder {run} does not exist")
    first = None
    examples: list[str] = []
    for fold in fold_dirs(run):
        f = fold / "splits.csv"
        if not f.is_file():
            continue
        df = pd.read_csv(f, dtype=str)
        df = df[df["split"] != "excluded"]
        if not examples:
            examples = df["patient"].head(3).tolist()
        hit = df.loc[df["patient"] == pseudonym, "split"]
        if len(hit):
            if hit.iloc[0] == "test":
                return fold, "test"
            if first is None:
                first = (fold, str(hit.iloc[0]))
    if first is not None:
        return first
    where = "predictions.csv" if (run / "predictions.csv").exists() else "folds/<site>/predictions.csv"
    raise UnknownPatientError(
        f"patient {pseudonym!r} is not in run {run}: use a pseudonymised ID from the 'patient' column of "
        f"{run / where} (e.g. {', '.join(examples) or 'P-...'}); study patient IDs are never accepted")


def explain_run(run: str | Path, pseudonym: str, out_dir: str | Path | None = None, *, n_repeats: int = 5,
                seed: int = 0, progress: bool = False, **kwargs) -> dict:
    """Explain ``pseudonym`` with the fold of ``run`` chosen by :func:`find_patient_fold`.

    ``out_dir`` defaults to ``run/explanations/<pseudonym>/``; ``kwargs`` go to
    :func:`explain_patient`.
    """
    from fusion.experiment import load_trained_fold

    fold, _ = find_patient_fold(run, pseudonym)
    tf = load_trained_fold(fold, progress=progress, ablation=False)
    out_dir = Path(out_dir) if out_dir is not None else Path(run) / "explanations" / pseudonym
    return explain_patient(tf, pseudonym, out_dir=out_dir, n_repeats=n_repeats, seed=seed, **kwargs)
