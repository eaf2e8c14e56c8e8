"""ComBat batch harmonisation as a fit/transform object.

Parametric empirical-Bayes ComBat (Johnson, Li & Rabinovic 2007,
Biostatistics 8:118), fitted on the training fold and applied unchanged to
any sample.  For samples of the training batches, ``ComBat(key).fit(a)
.transform(a)`` equals ``scanpy.pp.combat(a, key)`` (the same port of
Pedersen's ``combat.py``; see ``tests/data_adapters/test_combat.py``).

Model (Johnson et al. 2007, eq. 2.1): for gene ``g``, sample ``j`` of batch
``i``, ``Y_ijg = alpha_g + X_j beta_g + gamma_ig + delta_ig eps_ijg``.

Fit, on the training samples:

1. ordinary least squares of ``Y`` on the design ``[batch one-hot, covariates]``
   gives ``alpha_g`` (the batch-size-weighted mean of the batch
   coefficients), ``beta_g`` and the pooled variance ``sigma_g^2`` (mean
   squared residual);
2. standardise ``Z_ijg = (Y_ijg - alpha_g - X_j beta_g) / sigma_g``;
3. per batch, ``gamma_hat_ig`` = mean and ``delta_hat_ig^2`` = variance
   (ddof 1) of ``Z`` over the batch's samples; hyper-priors
   ``gamma_ig ~ N(gamma_bar_i, tau_i^2)`` and ``delta_ig^2 ~ InvGamma(a_i,
   b_i)`` by the method of moments across genes (eq. 3.1);
4. the posterior means ``gamma*_ig``, ``delta*_ig^2`` are found by iterating
   their conditional expressions to convergence (eq. 3.2-3.3).

Transform, for any sample of a training batch:
``Y*_ijg = sigma_g (Z_ijg - gamma*_ig) / delta*_ig + alpha_g + X_j beta_g``.

Batches not seen in training: ``new_batch="error"`` (default) refuses them
with the batch and sample named; ``new_batch="estimate"`` estimates that
batch's own location/scale parameters at transform time with the same
empirical-Bayes step (3-4) applied to its samples, against the frozen
training standardisation (``alpha``, ``beta``, ``sigma``).  This needs >= 2
samples of the new batch in one ``transform`` call, and those samples'
corrected values depend on each other (as any correction of a batch does),
never on samples of other batches or on outcomes.

Categorical covariates are one-hot encoded with the first level dropped
(levels fixed at fit time); numeric covariates enter as they are.  Genes
with zero pooled variance are returned as their fitted mean (as scanpy
does).  Only parametric ComBat is implemented.
"""
from __future__ import annotations

import logging
from typing import Sequence

import numpy as np
import pandas as pd

from data_adapters.errors import InputError
from data_adapters.omics import expression_matrix

log = logging.getLogger(__name__)


def _aprior(delta_hat: np.ndarray) -> float:
    m, s2 = delta_hat.mean(), delta_hat.var(ddof=1)
    return (2 * s2 + m**2) / s2


def _bprior(delta_hat: np.ndarray) -> float:
    m, s2 = delta_hat.mean(), delta_hat.var(ddof=1)
    return (m * s2 + m**3) / s2


def _it_sol(s_data: np.ndarray, g_hat: np.ndarray, d_hat: np.ndarray, *, g_bar: float, t2: float, a: float,
            b: float, conv: float = 1e-4, max_iter: int = 10_000) -> tuple[np.ndarray, np.ndarray]:
    """Posterior means of gamma and delta^2 (Johnson et al. 2007, eq. 3.2-3.3), iterated to convergence.

    ``s_data`` is ``(n_samples_of_batch, G)``.  The convergence criterion is
    sva's and scanpy's, ``max(|new - old| / old)`` (signed denominator, as in
    the reference implementations), taken over entries with a non-zero
    previous value.
    """
    n = s_data.shape[0]
    g_old, d_old = g_hat.copy(), d_hat.copy()
    g_new, d_new = g_old, d_old
    for _ in range(max_iter):
        g_new = (t2 * n * g_hat + d_old * g_bar) / (t2 * n + d_old)
        sum2 = ((s_data - g_new[None, :]) ** 2).sum(axis=0)
        d_new = (0.5 * sum2 + b) / (n / 2.0 + a - 1.0)
        with np.errstate(divide="ignore", invalid="ignore"):
            rg = np.abs(g_new - g_old) / g_old
            rd = np.abs(d_new - d_old) / d_old
        change = max(np.max(rg[np.isfinite(rg)], initial=0.0), np.max(rd[np.isfinite(rd)], initial=0.0))
        g_old, d_old = g_new, d_new
        if change <= conv:
            break
    return g_new, d_new


def _eb_batch(s: np.ndarray, *, conv: float) -> dict:
    """Empirical-Bayes location/scale of one batch's standardised data ``s`` (n_b, G)."""
    gamma_hat = s.mean(axis=0)
    delta_hat = s.var(axis=0, ddof=1)
    g_bar = float(gamma_hat.mean())
    t2 = float(gamma_hat.var())
    a = _aprior(delta_hat)
    b = _bprior(delta_hat)
    gamma, delta = _it_sol(s, gamma_hat, delta_hat, g_bar=g_bar, t2=t2, a=a, b=b, conv=conv)
    return {"gamma_hat": gamma_hat, "delta_hat": delta_hat, "gamma_bar": g_bar, "t2": t2, "a": a, "b": b,
            "gamma_star": gamma, "delta_star": delta}


class ComBat:
    """Parametric empirical-Bayes ComBat, fitted on training samples (Johnson et al. 2007).

    Parameters
    ----------
    batch_key
        ``adata.obs`` column holding the batch (site, scanner, run ...).
    covariates
        ``adata.obs`` columns to protect (biological covariates); numeric
        columns enter as they are, others are one-hot encoded (first level
        dropped).
    new_batch
        ``"error"`` (default) or ``"estimate"``: what :meth:`transform` does
        with a batch not seen in :meth:`fit` (see the module docstring).
    layer
        Use ``adata.layers[layer]`` instead of ``adata.X``.
    conv
        Convergence tolerance of the empirical-Bayes iteration.

    Attributes
    ----------
    batches_ : list[str]
        Training batches (sorted).
    grand_mean_, var_pooled_ : ndarray (G,)
        ``alpha_g`` and ``sigma_g^2``.
    beta_ : ndarray (C, G)
        Covariate coefficients (C = number of covariate columns).
    gamma_star_, delta_star_ : ndarray (B, G)
        Posterior batch location and squared scale.
    priors_ : dict
        Per batch ``gamma_bar``, ``t2``, ``a``, ``b``.
    genes_ : pd.Index
        Training genes; transform input must contain them.
    """

    def __init__(self, batch_key: str, *, covariates: Sequence[str] | None = None, new_batch: str = "error",
                 layer: str | None = None, conv: float = 1e-4) -> None:
        if new_batch not in ("error", "estimate"):
            raise ValueError(f"new_batch must be 'error' or 'estimate', got {new_batch!r}")
        covariates = list(covariates or [])
        if batch_key in covariates:
            raise ValueError("covariates must not include the batch key")
        if len(set(covariates)) != len(covariates):
            raise ValueError("covariates must be unique")
        self.batch_key = batch_key
        self.covariates = covariates
        self.new_batch = new_batch
        self.layer = layer
        self.conv = conv

    # ------------------------------------------------------------ helpers
    def _matrix(self, adata) -> np.ndarray:
        return expression_matrix(adata, self.layer)

    def _batches(self, adata) -> np.ndarray:
        if self.batch_key not in adata.obs:
            raise InputError(f"batch column {self.batch_key!r} not in obs (columns: {', '.join(adata.obs.columns)})",
                             field=self.batch_key)
        b = adata.obs[self.batch_key]
        if b.isna().any():
            raise InputError("missing batch", patient=str(b.index[b.isna().to_numpy()][0]), field=self.batch_key)
        return b.astype(str).to_numpy()

    def _covariate_matrix(self, adata, *, fit: bool) -> np.ndarray:
        cols = []
        if fit:
            self.covariate_levels_: dict[str, list[str] | None] = {}
        for c in self.covariates:
            if c not in adata.obs:
                raise InputError(f"covariate {c!r} not in obs", field=c)
            v = adata.obs[c]
            if fit:
                numeric = pd.api.types.is_numeric_dtype(v) and not isinstance(v.dtype, pd.CategoricalDtype)
                self.covariate_levels_[c] = None if numeric else sorted(v.astype(str).unique())
            levels = self.covariate_levels_[c]
            if v.isna().any():
                raise InputError("missing covariate value", patient=str(v.index[v.isna().to_numpy()][0]), field=c)
            if levels is None:
                cols.append(v.to_numpy(dtype=np.float64)[:, None])
            else:
                s = v.astype(str).to_numpy()
                unknown = sorted(set(s) - set(levels))
                if unknown:
                    raise InputError(f"covariate level {unknown[0]!r} not seen in training (levels: "
                                     f"{', '.join(levels)})", field=c)
                cols.append(np.stack([(s == lv).astype(np.float64) for lv in levels[1:]], axis=1)
                            if len(levels) > 1 else np.zeros((len(s), 0)))
        return np.concatenate(cols, axis=1) if cols else np.zeros((adata.n_obs, 0))

    def _standardise(self, X: np.ndarray, cov: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        stand_mean = self.grand_mean_[None, :] + cov @ self.beta_
        sd = np.sqrt(self.var_pooled_)
        with np.errstate(divide="ignore", invalid="ignore"):
            s = np.where(self.var_pooled_[None, :] == 0, 0.0, (X - stand_mean) / sd[None, :])
        return s, stand_mean

    # ---------------------------------------------------------------- fit
    def fit(self, adata) -> "ComBat":
        """Estimate the standardisation and the empirical-Bayes batch parameters on ``adata`` (training fold)."""
        X = self._matrix(adata)
        batches = self._batches(adata)
        levels = sorted(set(batches))
        if len(levels) < 2:
            raise InputError(f"ComBat needs at least 2 batches in training, found {levels}", field=self.batch_key)
        counts = {lv: int((batches == lv).sum()) for lv in levels}
        small = [lv for lv, n in counts.items() if n < 2]
        if small:
            raise InputError(f"batch {small[0]!r} has fewer than 2 training samples", field=self.batch_key)
        n, G = X.shape
        batch_design = np.stack([(batches == lv).astype(np.float64) for lv in levels], axis=1)
        cov = self._covariate_matrix(adata, fit=True)
        design = np.concatenate([batch_design, cov], axis=1)
        if np.linalg.matrix_rank(design) < design.shape[1]:
            raise InputError("the covariates are confounded with the batches (design matrix is not of full rank)",
                             field=",".join(self.covariates) or self.batch_key)
        B_hat = np.linalg.solve(design.T @ design, design.T @ X)  # (P, G)
        nb = batch_design.shape[1]
        n_batches = batch_design.sum(axis=0)
        self.batches_ = levels
        self.n_per_batch_ = counts
        self.genes_ = pd.Index(adata.var_names)
        self.grand_mean_ = (n_batches / n) @ B_hat[:nb]
        self.beta_ = B_hat[nb:]
        self.var_pooled_ = ((X - design @ B_hat) ** 2).mean(axis=0)
        self.n_zero_variance_genes_ = int((self.var_pooled_ == 0).sum())
        s, _ = self._standardise(X, cov)
        gam, dlt, pri = [], [], {}
        for lv in levels:
            eb = _eb_batch(s[batches == lv], conv=self.conv)
            gam.append(eb["gamma_star"])
            dlt.append(eb["delta_star"])
            pri[lv] = {k: float(eb[k]) for k in ("gamma_bar", "t2", "a", "b")}
        self.gamma_star_ = np.array(gam)
        self.delta_star_ = np.array(dlt)
        self.priors_ = pri
        return self

    # ---------------------------------------------------------- transform
    def transform(self, adata):
        """Batch-corrected AnnData (``X`` float64); parameters in ``uns["combat"]``.

        Samples keep their order; genes are restricted to the training genes.
        """
        import anndata as ad

        if not hasattr(self, "gamma_star_"):
            raise RuntimeError("ComBat is not fitted; call fit(adata_train) first")
        missing = self.genes_.difference(pd.Index(adata.var_names))
        if len(missing):
            raise InputError(f"{len(missing)} training genes are missing, e.g. {', '.join(map(str, missing[:5]))}",
                             field="var_names")
        sub = adata if pd.Index(adata.var_names).equals(self.genes_) else adata[:, self.genes_]
        X = self._matrix(sub)
        batches = self._batches(adata)
        cov = self._covariate_matrix(adata, fit=False)
        s, stand_mean = self._standardise(X, cov)
        out = np.empty_like(s)
        new_batches: dict[str, int] = {}
        for lv in sorted(set(batches)):
            rows = batches == lv
            if lv in self.batches_:
                i = self.batches_.index(lv)
                g, d = self.gamma_star_[i], self.delta_star_[i]
            else:
                if self.new_batch == "error":
                    pid = str(adata.obs_names[np.flatnonzero(rows)[0]])
                    raise InputError(f"batch {lv!r} was not seen when ComBat was fitted (training batches: "
                                     f"{', '.join(self.batches_)}); use new_batch='estimate' to estimate it from "
                                     "its own samples", patient=pid, field=self.batch_key)
                if rows.sum() < 2:
                    pid = str(adata.obs_names[np.flatnonzero(rows)[0]])
                    raise InputError(f"new batch {lv!r} has a single sample; new_batch='estimate' needs >= 2",
                                     patient=pid, field=self.batch_key)
                eb = _eb_batch(s[rows], conv=self.conv)
                g, d = eb["gamma_star"], eb["delta_star"]
                new_batches[lv] = int(rows.sum())
            with np.errstate(divide="ignore", invalid="ignore"):
                adj = (s[rows] - g[None, :]) / np.sqrt(d)[None, :]
            out[rows] = np.where(np.isfinite(adj), adj, 0.0)
        Y = out * np.sqrt(self.var_pooled_)[None, :] + stand_mean
        res = ad.AnnData(X=Y, obs=adata.obs.copy(), var=pd.DataFrame(index=self.genes_))
        res.uns["combat"] = {"params": {"batch_key": self.batch_key, "covariates": list(self.covariates),
                                        "new_batch": self.new_batch, "training_batches": list(self.batches_)},
                             "new_batches_estimated": new_batches}
        return res

    def fit_transform(self, adata):
        return self.fit(adata).transform(adata)
