"""ComBat fit/transform: parity with scanpy.pp.combat, fold safety, unseen batches."""
import anndata as ad
import numpy as np
import pandas as pd
import pytest

from data_adapters.combat import ComBat
from data_adapters.errors import InputError


def _data(n=(20, 25, 15), g=40, seed=0, shift=(0.0, 1.0, -1.0)):
    rng = np.random.default_rng(seed)
    batch = np.repeat(["a", "b", "c"][:len(n)], n)
    codes = pd.factorize(batch, sort=True)[0]
    X = rng.normal(size=(sum(n), g)) * 1.5 + 5
    X += np.array(shift)[codes][:, None] * rng.normal(1, 0.3, size=g)  # location effect
    X *= np.array([1.0, 1.6, 0.7])[codes][:, None]  # scale effect
    age = rng.normal(50, 10, sum(n))
    X += 0.05 * age[:, None]
    obs = pd.DataFrame({"batch": batch, "age": age, "sex": rng.choice(["F", "M"], sum(n))},
                       index=[f"s{i}" for i in range(sum(n))])
    return ad.AnnData(X, obs=obs, var=pd.DataFrame(index=[f"G{j}" for j in range(g)]))


def test_fit_transform_equals_scanpy_combat():
    sc = pytest.importorskip("scanpy")
    a = _data()
    ours = ComBat("batch").fit_transform(a).X
    ref = a.copy()
    sc.pp.combat(ref, "batch")
    np.testing.assert_allclose(ours, ref.X, rtol=1e-9, atol=1e-9)


def test_fit_transform_with_numeric_covariate_equals_scanpy_combat():
    sc = pytest.importorskip("scanpy")
    a = _data(seed=1)
    ours = ComBat("batch", covariates=["age"]).fit_transform(a).X
    ref = a.copy()
    sc.pp.combat(ref, "batch", covariates=["age"])
    np.testing.assert_allclose(ours, ref.X, rtol=1e-9, atol=1e-9)


def test_batch_effect_is_removed():
    a = _data(seed=2)
    before = pd.DataFrame(a.X).groupby(a.obs["batch"].to_numpy()).mean()
    out = ComBat("batch").fit_transform(a)
    after = pd.DataFrame(out.X).groupby(a.obs["batch"].to_numpy()).mean()
    assert after.std(axis=0).mean() < 0.2 * before.std(axis=0).mean()


def test_fitted_on_training_fold_only():
    a = _data(seed=3)
    rng = np.random.default_rng(0)
    test = rng.random(a.n_obs) < 0.3
    cb = ComBat("batch").fit(a[~test].copy())
    t_all = cb.transform(a[test].copy()).X
    t_one = cb.transform(a[test][[2]].copy()).X
    np.testing.assert_allclose(t_one, t_all[[2]], atol=1e-12)  # a test sample ignores the other test samples
    other = ComBat("batch").fit(a[test].copy()).transform(a[test].copy()).X
    assert np.abs(other - t_all).max() > 1e-3  # and the parameters really come from the training fold


def test_unseen_batch_error_and_estimate():
    a = _data(n=(20, 25, 15), seed=4)
    train = a[a.obs["batch"] != "c"].copy()
    newb = a[a.obs["batch"] == "c"].copy()
    cb = ComBat("batch").fit(train)
    with pytest.raises(InputError, match="'c' was not seen") as e:
        cb.transform(newb)
    assert e.value.field == "batch" and e.value.patient == newb.obs_names[0]
    est = ComBat("batch", new_batch="estimate").fit(train)
    out = est.transform(a)
    assert out.uns["combat"]["new_batches_estimated"] == {"c": 15}
    known = est.transform(train).X
    np.testing.assert_allclose(out[train.obs_names].X, known, atol=1e-12)  # known batches unaffected
    # the new batch's location lands on the corrected training mean
    gap_before = np.abs(newb.X.mean(0) - ComBat("batch").fit(train).transform(train).X.mean(0)).mean()
    gap_after = np.abs(out[newb.obs_names].X.mean(0) - known.mean(0)).mean()
    assert gap_after < 0.25 * gap_before
    with pytest.raises(InputError, match="single sample"):
        est.transform(newb[:1].copy())


def test_categorical_covariate_and_unknown_level():
    a = _data(seed=5)
    cb = ComBat("batch", covariates=["sex"]).fit(a)
    assert cb.covariate_levels_["sex"] == ["F", "M"] and cb.beta_.shape == (1, a.n_vars)
    b = a[:4].copy()
    b.obs["sex"] = "X"
    with pytest.raises(InputError, match="not seen in training"):
        cb.transform(b)


def test_zero_variance_gene_and_bad_inputs():
    a = _data(seed=6)
    a.X[:, 0] = 3.0
    out = ComBat("batch").fit_transform(a).X
    assert np.isfinite(out).all() and np.allclose(out[:, 0], 3.0)
    with pytest.raises(InputError, match="batch column"):
        ComBat("site").fit(a)
    with pytest.raises(InputError, match="at least 2 batches"):
        ComBat("batch").fit(a[a.obs["batch"] == "a"].copy())
    b = a.copy()
    b.obs["batch"] = ["a"] * (a.n_obs - 1) + ["z"]
    with pytest.raises(InputError, match="fewer than 2"):
        ComBat("batch").fit(b)
    with pytest.raises(ValueError, match="new_batch"):
        ComBat("batch", new_batch="ignore")
    with pytest.raises(ValueError, match="batch key"):
        ComBat("batch", covariates=["batch"])
    with pytest.raises(RuntimeError, match="not fitted"):
        ComBat("batch").transform(a)
    c = a.copy()
    c.obs["conf"] = c.obs["batch"]
    with pytest.raises(InputError, match="confounded"):
        ComBat("batch", covariates=["conf"]).fit(c)
