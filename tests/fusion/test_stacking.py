"""Cox stacking meta-learner and out-of-fold splits."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from fusion.metrics import harrell_c
from fusion.stacking import CoxStacker, oof_folds


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
    """Independent reconstruction: lifelines on the hand-built design gives the same coefficients."""
    from lifelines import CoxPHFitter

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
    df = pd.DataFrame({"a": z[:, 0], "b": z[:, 1], "c": z[:, 2],
                       "ma": np.isnan(r[:, 0]).astype(float), "mb": np.isnan(r[:, 1]).astype(float),
                       "T": t, "E": e.astype(int)})
    ref = CoxPHFitter(penalizer=0.05).fit(df, "T", "E").params_
    np.testing.assert_allclose(st.coef_, ref[["a", "b", "c"]].to_numpy(), rtol=1e-6, atol=1e-8)
    np.testing.assert_allclose(st.missing_coef_, [ref["ma"], ref["mb"], 0.0], rtol=1e-6, atol=1e-8)
    pred = st.predict(r)
    manual = z @ st.coef_ + np.isnan(r) @ st.missing_coef_
    np.testing.assert_allclose(pred, manual, rtol=1e-10, atol=1e-12)
    assert np.isfinite(pred).all()
    # a row missing a never-missing modality is imputed by its mean (no indicator)
    row = np.array([[np.nan, 0.0, np.nan]])
    np.testing.assert_allclose(st.predict(row), st.missing_coef_[0] + st.coef_[1] * (0.0 - mu[1]) / sd[1])


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
