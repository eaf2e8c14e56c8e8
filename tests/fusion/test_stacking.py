"""Cox stacking meta-learner and out-of-fold splits."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from fusion.metrics import harrell_c
from fusion.stacking import CoxStacker, StackedLateFusion, oof_folds, own_training_scale


def _planted(n, seed):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=n)
    t = rng.exponential(np.exp(-x))  # hazard exp(x): higher x = worse
    c = rng.exponential(1.5, n)
    time, event = np.minimum(t, c), t <= c
    true_col = 2.0 * x + 1.0 + rng.normal(scale=0.3, size=n)  # the true risk on another scale
    noise_col = rng.normal(size=n) * 5.0
    return np.column_stack([true_col, noise_col]), time, event


def test_planted_true_column_wins_and_stacking_is_as_good_as_the_best_column():
    r_tr, t_tr, e_tr = _planted(600, 0)
    r_te, t_te, e_te = _planted(600, 1)
    st = CoxStacker(penalizer=0.1).fit(r_tr, t_tr, e_tr)
    assert st.coef_.shape == (2,) and st.coef_[0] > 0 and st.coef_[0] > 5 * abs(st.coef_[1])
    best = max(harrell_c(e_te, t_te, r_te[:, j]) for j in range(2))
    assert harrell_c(e_te, t_te, st.predict(r_te)) >= best - 0.01


def test_design_matches_documented_standardisation_imputation_and_indicators():
    """Independent reconstruction: scikit-survival's ridge Cox (Efron) on the hand-built design, alpha = n * penalizer."""
    from sksurv.linear_model import CoxPHSurvivalAnalysis
    from sksurv.util import Surv

    r, t, e = _planted(300, 2)
    r = np.column_stack([r, np.random.default_rng(3).normal(size=300)])  # third column never missing
    rng = np.random.default_rng(4)
    r[rng.random(300) < 0.3, 1] = np.nan
    r[rng.random(300) < 0.2, 0] = np.nan
    st = CoxStacker(penalizer=0.05).fit(r, t, e)
    assert st.missing_columns_.tolist() == [0, 1]
    mu, sd = np.nanmean(r, 0), np.nanstd(r, 0)
    np.testing.assert_allclose(st.mean_, mu)
    np.testing.assert_allclose(st.scale_, sd)
    z = np.nan_to_num((r - mu) / sd, nan=0.0)
    design = np.column_stack([z, np.isnan(r[:, 0]), np.isnan(r[:, 1])]).astype(float)
    ref = CoxPHSurvivalAnalysis(alpha=300 * 0.05, ties="efron", tol=1e-12).fit(
        design, Surv.from_arrays(e.astype(bool), t)).coef_
    np.testing.assert_allclose(st.coef_, ref[:3], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(st.missing_coef_, [ref[3], ref[4], 0.0], rtol=1e-4, atol=1e-5)
    pred = st.predict(r)
    manual = z @ st.coef_ + np.isnan(r) @ st.missing_coef_
    np.testing.assert_allclose(pred, manual, rtol=1e-10, atol=1e-12)
    assert np.isfinite(pred).all()
    # a row missing a never-missing modality is imputed by its mean (no indicator)
    row = np.array([[np.nan, 0.0, np.nan]])
    np.testing.assert_allclose(st.predict(row), st.missing_coef_[0] + st.coef_[1] * (0.0 - mu[1]) / sd[1])


def test_rare_missingness_indicator_is_shrunk_like_a_risk_column():
    """9 of 220 patients miss a modality at random, and by chance they die first.

    Penalising the standardised indicator (lifelines' default) leaves its coefficient almost free; the
    stacker penalises it on its 0/1 scale, and ranks the other patients as the true risk does.
    """
    from lifelines import CoxPHFitter

    r, t, e = _planted(220, 21)
    rare = np.zeros(220, dtype=bool)
    rare[np.argsort(t)[:40:4]] = True  # 10 of the 40 earliest times
    e[rare] = True
    r = r[:, :1].copy()
    r[rare, 0] = np.nan
    st = CoxStacker(penalizer=0.1).fit(r, t, e)
    z = np.nan_to_num((r[:, 0] - np.nanmean(r[:, 0])) / np.nanstd(r[:, 0]), nan=0.0)
    df = pd.DataFrame({"a": z, "m": rare.astype(float), "T": t, "E": e.astype(int)})
    free = CoxPHFitter(penalizer=0.1).fit(df, "T", "E").params_["m"]
    assert free > 2.0  # the failure mode: a log hazard ratio > 2 for "not measured"
    assert 0.0 < st.missing_coef_[0] < free / 2


def test_constant_column_is_left_out_with_a_warning():
    r, t, e = _planted(200, 5)
    r = np.column_stack([r, np.full(200, 3.0)])
    with pytest.warns(UserWarning, match="constant"):
        st = CoxStacker().fit(r, t, e)
    assert st.coef_[2] == 0.0 and np.isfinite(st.predict(r)).all()


@pytest.mark.parametrize("mutate, field", [
    (lambda r, t, e: (r, t[:-1], e), "time"),
    (lambda r, t, e: (r, t, e[:-1]), "event"),
    (lambda r, t, e: (r, t, np.zeros_like(e)), "censored"),
    (lambda r, t, e: (r, t, e.astype(int) * 2), "event"),
    (lambda r, t, e: (r[:, 0], t, e), "oof_risks"),
    (lambda r, t, e: (np.column_stack([r[:, 0], np.full(len(t), np.nan)]), t, e), "entirely NaN"),
    (lambda r, t, e: (np.where(np.arange(len(t))[:, None] == 0, np.inf, r), t, e), "infinite"),
    (lambda r, t, e: (r, np.where(np.arange(len(t)) == 0, np.nan, t), e), "time"),
])
def test_fit_bad_input(mutate, field):
    r, t, e = _planted(50, 6)
    with pytest.raises(ValueError, match=field):
        CoxStacker().fit(*mutate(r, t, e))


def test_predict_bad_input_and_bad_penalizer():
    r, t, e = _planted(80, 7)
    with pytest.raises(ValueError, match="not fitted"):
        CoxStacker().predict(r)
    st = CoxStacker().fit(r, t, e)
    with pytest.raises(ValueError, match="risks"):
        st.predict(r[:, :1])
    with pytest.raises(ValueError, match="penalizer"):
        CoxStacker(penalizer=-1.0)


def test_oof_folds_are_a_stratified_partition():
    rng = np.random.default_rng(0)
    strata = rng.random(103) < 0.3
    folds = oof_folds(103, 5, strata, seed=1)
    assert len(folds) == 5
    test_all = np.concatenate([te for _, te in folds])
    assert np.array_equal(np.sort(test_all), np.arange(103))
    for tr, te in folds:
        assert np.intersect1d(tr, te).size == 0 and tr.size + te.size == 103
        assert abs(strata[te].sum() - strata.sum() / 5) <= 1
    again = oof_folds(103, 5, strata, seed=1)
    assert all(np.array_equal(a[1], b[1]) for a, b in zip(folds, again))
    plain = oof_folds(10, 3)
    assert sorted(np.concatenate([te for _, te in plain]).tolist()) == list(range(10))


@pytest.mark.parametrize("args, field", [
    ((10, 1, None), "k"),
    ((2, 3, None), "n"),
    ((10, 2, np.zeros(9)), "strata"),
    ((10, 3, np.array([0] * 8 + [1] * 2)), "strata"),
])
def test_oof_folds_bad_input(args, field):
    with pytest.raises(ValueError, match=field):
        oof_folds(*args)


def test_own_training_scale_hand_computed_and_bad_input():
    mu, sd = own_training_scale([1.0, 3.0, 100.0, 5.0], present=[True, True, False, True])
    assert mu == pytest.approx(3.0) and sd == pytest.approx(np.sqrt(8.0 / 3.0))  # population SD of 1, 3, 5
    assert own_training_scale([2.0, 2.0, 2.0]) == (2.0, 1.0)  # a constant model keeps its scale
    with pytest.raises(ValueError, match="no finite training risk"):
        own_training_scale([1.0, 2.0], present=[False, False])
    with pytest.raises(ValueError, match="present"):
        own_training_scale([1.0, 2.0], present=[True])


def test_fold_models_on_different_scales_pool_only_after_own_standardisation():
    """Out-of-fold risks of two fold models (the same ranking, different offset and spread).

    Pooled raw, the offset of one fold puts all its patients above the other's,
    and the stacker's c-index on the pooled risks falls towards the fold-level
    mixture; standardised by each model's own training predictions (not the
    held-out ones), the pooled ranking is as good as the true risk's.
    """
    r, t, e = _planted(800, 11)
    truth = r[:, 0]
    fold = np.arange(800) % 2 == 0
    # each "fold model" predicts its training patients (the other fold) and its held-out fold
    def model(k, x):
        return (1.0 if k == 0 else 8.0) * x + (0.0 if k == 0 else 30.0)
    raw = np.where(fold, model(0, truth), model(1, truth))
    std = np.empty_like(raw)
    for k, held in ((0, fold), (1, ~fold)):
        mu, sd = own_training_scale(model(k, truth[~held]))
        std[held] = (model(k, truth[held]) - mu) / sd
    c_true = harrell_c(e, t, truth)
    c_raw = harrell_c(e, t, CoxStacker().fit(raw[:, None], t, e).predict(raw[:, None]))
    c_std = harrell_c(e, t, CoxStacker().fit(std[:, None], t, e).predict(std[:, None]))
    assert c_std == pytest.approx(c_true, abs=0.01)
    assert c_raw < c_true - 0.05


class _ConstRisk(torch.nn.Module):
    """A single-modality "model" whose risk is a fixed affine map of a batch feature."""

    def __init__(self, a, b):
        super().__init__()
        self.a, self.b = a, b

    def forward(self, batch):
        return {"risk": self.a * batch["x"] + self.b}


def test_stacked_model_composes_the_own_scale_with_the_stacker_standardisation():
    r, t, e = _planted(300, 5)
    r[np.random.default_rng(6).random(300) < 0.2, 1] = np.nan
    st = CoxStacker().fit(r, t, e)  # fitted on already-standardised risks
    x = torch.linspace(-2.0, 2.0, 7)
    present = torch.tensor([[True, True], [True, False]] * 3 + [[True, True]])
    models = {"a": _ConstRisk(3.0, 10.0), "b": _ConstRisk(-0.5, 2.0)}
    own_mean, own_scale = [1.0, -4.0], [2.0, 0.25]
    fused = StackedLateFusion.from_stacker(models, st, risk_mean=own_mean, risk_scale=own_scale)
    out = fused({"x": x, "present": present, "modalities": ["a", "b"]})["risk"].detach().double().numpy()
    raw = np.column_stack([3.0 * x.numpy() + 10.0, -0.5 * x.numpy() + 2.0])
    z = (raw - np.array(own_mean)) / np.array(own_scale)
    z[~present.numpy()] = np.nan
    np.testing.assert_allclose(out, st.predict(z), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="both"):
        StackedLateFusion.from_stacker(models, st, risk_mean=own_mean)
    with pytest.raises(ValueError, match="> 0"):
        StackedLateFusion.from_stacker(models, st, risk_mean=own_mean, risk_scale=[1.0, 0.0])
