"""Stacking meta-learner for late fusion of per-modality survival risks.

Late fusion by stacking (Wolpert 1992, "Stacked generalization", Neural
Networks 5:241): each modality's model is trained in cross-validation and
predicts the patients of the held-out fold (out-of-fold, OOF, risks); a small
Cox model learns how to combine the OOF risks.  Training the combiner on
in-fold predictions would reward the modality that overfits most.

:func:`oof_folds` gives the stratified folds, :class:`CoxStacker` the
combiner.  Risks follow radfusion's convention: higher = worse.
"""
from __future__ import annotations

import warnings

import numpy as np
import torch

__all__ = ["CoxStacker", "StackedLateFusion", "oof_folds", "own_training_scale"]


def oof_folds(n: int, k: int, strata=None, seed: int = 0) -> list[tuple[np.ndarray, np.ndarray]]:
    """``k`` stratified folds over ``n`` patients, as ``(train_idx, test_idx)`` pairs.

    scikit-learn's ``StratifiedKFold(n_splits=k, shuffle=True,
    random_state=seed)`` on ``strata`` (e.g. the event indicator, or
    ``site + "_" + event`` so every fold has events of every site); plain
    ``KFold`` when ``strata`` is None.  Every patient is in exactly one test
    fold.

    Raises
    ------
    ValueError
        ``n < k``, ``k < 2``, ``strata`` of the wrong length, or a stratum
        with fewer than ``k`` patients (a fold would miss it).
    """
    from sklearn.model_selection import KFold, StratifiedKFold

    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 2:
        raise ValueError(f"k must be an integer >= 2, got {k!r}")
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < k:
        raise ValueError(f"n must be an integer >= k = {k}, got {n!r}")
    x = np.zeros((int(n), 1))
    if strata is None:
        splits = KFold(n_splits=int(k), shuffle=True, random_state=seed).split(x)
    else:
        strata = np.asarray(strata)
        if strata.ndim != 1 or strata.shape[0] != n:
            raise ValueError(f"strata must have n = {n} labels, got shape {strata.shape}")
        labels, counts = np.unique(strata, return_counts=True)
        small = {str(lab): int(c) for lab, c in zip(labels, counts) if c < k}
        if small:
            raise ValueError(f"strata: every stratum needs at least k = {k} patients, got {small}")
        splits = StratifiedKFold(n_splits=int(k), shuffle=True, random_state=seed).split(x, strata)
    return [(tr.astype(np.int64), te.astype(np.int64)) for tr, te in splits]


def own_training_scale(risk_train, present=None) -> tuple[float, float]:
    """Mean and SD of a model's risks on the patients it was trained on (``present`` ones only).

    A Cox model's risk is identified only up to an additive constant, and its
    spread depends on how long it was trained, so the risks of two models of
    the same modality (two cross-validation folds, or a fold model and the
    model trained on every patient) are not on one scale.  Standardising each
    model's risks by its own training predictions, ``(r - mean) / sd``, puts
    them on a common scale without looking at any held-out patient.  An SD
    of 0 (a constant model) is returned as 1.

    Raises
    ------
    ValueError
        No finite risk among the ``present`` patients.
    """
    r = np.asarray(risk_train, dtype=float).reshape(-1)
    if present is not None:
        present = np.asarray(present, dtype=bool).reshape(-1)
        if present.shape != r.shape:
            raise ValueError(f"present must have one flag per risk ({r.shape[0]}), got {present.shape[0]}")
        r = r[present]
    r = r[np.isfinite(r)]
    if r.size == 0:
        raise ValueError("own_training_scale: no finite training risk among the present patients")
    sd = float(r.std())
    return float(r.mean()), (sd if sd > 1e-12 * max(1.0, abs(float(r.mean()))) else 1.0)


def _as_risk_matrix(x, name: str, m: int | None = None) -> np.ndarray:
    try:
        arr = np.asarray(x, dtype=float)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{name} must be a numeric (N, M) array: {e}") from None
    if arr.ndim != 2 or arr.shape[0] < 1 or arr.shape[1] < 1:
        raise ValueError(f"{name} must be a 2-D (N, M) array with N, M >= 1, got shape {arr.shape}")
    if m is not None and arr.shape[1] != m:
        raise ValueError(f"{name} must have M = {m} columns (one per modality, as in fit), got {arr.shape[1]}")
    if np.isinf(arr).any():
        raise ValueError(f"{name} contains infinite values; use NaN for a missing modality")
    return arr


class CoxStacker:
    """Penalised Cox model on standardised out-of-fold modality risks.

    Design matrix, from ``oof_risks`` ``(N, M)`` (NaN = modality missing):

    1. each column ``j`` is standardised with the mean and standard
       deviation of its *observed* training values:
       ``z_j = (r_j - mean_j) / sd_j``;
    2. a missing value becomes 0 (its training mean);
    3. for every modality with at least one missing training value, an
       indicator column ``1[r_j is NaN]`` is appended (so "not measured" may
       carry risk of its own, and the imputed 0 is not read as an average
       patient).

    The model ``log h(t | x) = log h_0(t) + beta^T x`` maximises
    ``loglik(beta) - n * penalizer * ||beta||^2 / 2`` (Efron ties) on the
    design *as built*: standardised risks and 0/1 indicators, with no further
    standardisation.  So the coefficient of a missing indicator (a log hazard
    ratio of "not measured") is shrunk like that of a one-SD change of a
    modality's risk, however rare the missingness.  (Standardising the
    indicators too, lifelines' default, divides a rare indicator by its small
    SD and leaves its coefficient almost unpenalised: a modality missing for
    9 of 220 training patients got a log hazard ratio of 5.2 on the demo.
    Binary inputs are best left on their 0/1 scale, Gelman 2008, Stat Med
    27:2865.)  The fit is lifelines' ``CoxPHFitter`` with the per-column
    penalty ``penalizer / var_j`` (lifelines penalises its internally
    standardised coefficients, ``beta_j * sd_j``), which equals
    scikit-survival's ``CoxPHSurvivalAnalysis(alpha=n * penalizer,
    ties="efron")`` on the same design.  The penalty is scaled by ``n``, so
    ``penalizer=0.1`` means the same shrinkage for a cohort of 100 or 10,000
    and across CV folds of different sizes.

    A column whose observed training values are constant carries no
    information: it is left out of the fit with a warning and gets
    coefficient 0.

    Parameters
    ----------
    penalizer
        Ridge strength (``>= 0``); some shrinkage is advisable because the
        modality risks are correlated.

    Attributes
    ----------
    coef_
        ``(M,)`` coefficient of each modality's standardised risk (per 1 SD).
    missing_coef_
        ``(M,)`` coefficient of each modality's missing indicator (0 where the
        modality was never missing in training).
    mean_, scale_
        ``(M,)`` training standardisation.
    missing_columns_
        Indices of the modalities that got an indicator column.
    n_features_in_
        M.
    model_
        The fitted lifelines ``CoxPHFitter``.
    """

    def __init__(self, penalizer: float = 0.1) -> None:
        if isinstance(penalizer, bool) or not isinstance(penalizer, (int, float)) or not penalizer >= 0 \
                or not np.isfinite(penalizer):
            raise ValueError(f"penalizer must be a finite number >= 0, got {penalizer!r}")
        self.penalizer = float(penalizer)

    # ------------------------------------------------------------------ #
    def _design(self, risks: np.ndarray) -> np.ndarray:
        miss = np.isnan(risks)
        z = (np.where(miss, 0.0, risks) - self.mean_) / self.scale_
        z = np.where(miss, 0.0, z)
        cols = [z[:, self.used_columns_]]
        if self.missing_columns_.size:
            cols.append(miss[:, self.missing_columns_].astype(float))
        return np.concatenate(cols, axis=1)

    def fit(self, oof_risks, time, event) -> "CoxStacker":
        """Fit on out-of-fold risks ``(N, M)`` (NaN = modality missing), ``time`` and ``event`` ``(N,)``; returns self."""
        import pandas as pd
        from lifelines import CoxPHFitter

        risks = _as_risk_matrix(oof_risks, "oof_risks")
        n, m = risks.shape
        time = np.asarray(time, dtype=float).reshape(-1)
        event = np.asarray(event).reshape(-1)
        if time.shape[0] != n:
            raise ValueError(f"time must have N = {n} values (rows of oof_risks), got {time.shape[0]}")
        if event.shape[0] != n:
            raise ValueError(f"event must have N = {n} values (rows of oof_risks), got {event.shape[0]}")
        if not np.isfinite(time).all():
            raise ValueError("time must be finite")
        if not np.isin(event, [0, 1]).all():
            raise ValueError("event must be 0/1 or bool")
        event = event.astype(bool)
        if not event.any():
            raise ValueError("event: all patients are censored, a Cox model cannot be fitted")
        miss = np.isnan(risks)
        empty = np.flatnonzero(miss.all(0))
        if empty.size:
            raise ValueError(f"oof_risks column(s) {empty.tolist()} are entirely NaN (modality never observed)")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            self.mean_ = np.nanmean(risks, axis=0)
            sd = np.nanstd(risks, axis=0)
        constant = sd <= 1e-12 * np.maximum(1.0, np.abs(self.mean_))
        if constant.any():
            warnings.warn(f"CoxStacker: oof_risks column(s) {np.flatnonzero(constant).tolist()} are constant "
                          "on the observed training rows; left out (coefficient 0)", stacklevel=2)
        self.scale_ = np.where(constant, 1.0, sd)
        self.used_columns_ = np.flatnonzero(~constant)
        self.missing_columns_ = np.flatnonzero(miss.any(0))
        self.n_features_in_ = m
        x = self._design(risks)
        names = [f"risk_{j}" for j in self.used_columns_] + [f"missing_{j}" for j in self.missing_columns_]
        df = pd.DataFrame(x, columns=names)
        df["_time"] = time
        df["_event"] = event.astype(int)
        if n < 2:
            raise ValueError(f"oof_risks: a Cox model needs at least 2 patients, got {n}")
        var = x.var(axis=0, ddof=1)  # lifelines standardises each column by its ddof=1 SD
        self.model_ = CoxPHFitter(penalizer=self.penalizer / var).fit(df, duration_col="_time", event_col="_event")
        beta = self.model_.params_.reindex(names).to_numpy(dtype=float)
        self.coef_ = np.zeros(m)
        self.coef_[self.used_columns_] = beta[: self.used_columns_.size]
        self.missing_coef_ = np.zeros(m)
        self.missing_coef_[self.missing_columns_] = beta[self.used_columns_.size:]
        self._beta = beta
        return self

    def predict(self, risks) -> np.ndarray:
        """Stacked risk ``(N,)`` (the linear predictor ``beta^T x``; higher = worse) for ``risks`` ``(N, M)``.

        NaN marks a missing modality, handled as in training (0 after
        standardisation plus its indicator).  A modality that was never
        missing in training has no indicator: it is imputed by its mean only.
        """
        if not hasattr(self, "coef_"):
            raise ValueError("CoxStacker is not fitted; call fit(oof_risks, time, event) first")
        arr = _as_risk_matrix(risks, "risks", self.n_features_in_)
        return self._design(arr) @ self._beta


class StackedLateFusion(torch.nn.Module):
    """Late fusion by stacking: single-modality models combined by a fitted :class:`CoxStacker`.

    ``forward(batch)`` runs every single-modality model on the batch, takes
    each one's risk where its modality is present, standardises it with the
    stacker's training mean / SD (0 where absent) and returns
    ``risk = sum_m coef_m z_m + sum_m missing_coef_m [m absent]`` (exactly
    ``CoxStacker.predict``), ``embedding`` = the standardised per-modality
    risks ``(B, M)`` and ``modality_risks``.  It is not trained by gradient:
    the single-modality models are trained first and the stacker is fitted on
    their out-of-fold training predictions (see ``fusion.experiment``).
    """

    def __init__(self, models: dict, *, coef=None, missing_coef=None, mean=None, scale=None) -> None:
        super().__init__()
        self.modalities = sorted(models)
        self.models = torch.nn.ModuleDict({m: models[m] for m in self.modalities})
        k = len(self.modalities)

        def buf(v, fill):
            return torch.as_tensor(np.full(k, fill) if v is None else np.asarray(v, dtype=float), dtype=torch.float32)

        self.register_buffer("coef", buf(coef, 0.0))
        self.register_buffer("missing_coef", buf(missing_coef, 0.0))
        self.register_buffer("mean", buf(mean, 0.0))
        self.register_buffer("scale", buf(scale, 1.0))

    @classmethod
    def from_stacker(cls, models: dict, stacker: CoxStacker, *, risk_mean=None,
                     risk_scale=None) -> "StackedLateFusion":
        """The stacked model; ``risk_mean`` / ``risk_scale`` ``(M,)`` standardise each model's raw risk first.

        With them, modality ``m``'s input to the stacker is
        ``((r_m - risk_mean_m) / risk_scale_m - stacker.mean_m) / stacker.scale_m``
        (the stacker was fitted on risks standardised the same way, see
        :func:`own_training_scale`); the two affine maps are composed into one.
        """
        mean, scale = np.asarray(stacker.mean_, dtype=float), np.asarray(stacker.scale_, dtype=float)
        if (risk_mean is None) != (risk_scale is None):
            raise ValueError("give both risk_mean and risk_scale, or neither")
        if risk_mean is not None:
            rm, rs = np.asarray(risk_mean, dtype=float), np.asarray(risk_scale, dtype=float)
            if rm.shape != mean.shape or rs.shape != mean.shape:
                raise ValueError(f"risk_mean and risk_scale must have one value per modality ({mean.shape[0]})")
            if not (np.isfinite(rm).all() and np.isfinite(rs).all() and (rs > 0).all()):
                raise ValueError("risk_mean must be finite and risk_scale finite and > 0")
            mean, scale = rm + rs * mean, rs * scale
        return cls(models, coef=stacker.coef_, missing_coef=stacker.missing_coef_, mean=mean, scale=scale)

    def forward(self, batch) -> dict:
        names = list(batch["modalities"])
        zs, absent = [], []
        for m in self.modalities:
            p = batch["present"][:, names.index(m)]
            r = self.models[m]({k: v for k, v in batch.items() if k not in ("time", "event")})["risk"]
            j = self.modalities.index(m)
            z = torch.where(p, (r - self.mean[j]) / self.scale[j], torch.zeros_like(r))
            zs.append(z)
            absent.append((~p).to(r.dtype))
        z = torch.stack(zs, dim=1)
        miss = torch.stack(absent, dim=1)
        risk = z @ self.coef + miss @ self.missing_coef
        return {"risk": risk, "embedding": z, "modality_risks": z, "modality_embeddings": {}}
