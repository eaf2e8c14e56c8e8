"""fusion.evaluation against independent references (sksurv, lifelines, sklearn, hand computation)."""
from __future__ import annotations

import json
import math
import warnings

import numpy as np
import pandas as pd
import pytest

from fusion import evaluation as ev

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _simulate(rng, n, *, beta=1.0, cens_scale=1.5, admin=None):
    """Exponential Cox model: hazard exp(beta * x); exponential censoring, optional admin. censoring."""
    x = rng.normal(size=n)
    t = rng.exponential(np.exp(-beta * x))
    c = rng.exponential(cens_scale, size=n)
    if admin is not None:
        c = np.minimum(c, admin)
    return x, np.minimum(t, c), t <= c


def _strict_json(d):
    """Round-trips through JSON with NaN forbidden."""
    return json.loads(json.dumps(d, allow_nan=False))


@pytest.fixture(scope="module")
def cohort():
    rng = np.random.default_rng(0)
    xtr, ttr, etr = _simulate(rng, 300, admin=4.0)
    xte, tte, ete = _simulate(rng, 150, admin=2.0)  # test follow-up inside the training follow-up
    return xtr, ttr, etr, xte, tte, ete


@pytest.fixture(scope="module")
def coxph(cohort):
    from sksurv.linear_model import CoxPHSurvivalAnalysis
    from sksurv.util import Surv

    xtr, ttr, etr, *_ = cohort
    return CoxPHSurvivalAnalysis().fit(xtr[:, None], Surv.from_arrays(etr, ttr))


# ------------------------------------------------------------------ Breslow
def test_breslow_hand_computed():
    # H0(1) = 1/(1+2+1) = 1/4 ; H0(2) = 1/4 + 1/(2+1) = 7/12 ; censored at 3
    r_train = np.array([0.0, math.log(2.0), 0.0])
    s = ev.breslow_survival(r_train, [1.0, 2.0, 3.0], [1, 1, 0], [0.0, 1.0], [0.5, 1.0, 1.5, 2.0, 10.0])
    h0 = np.array([0.0, 0.25, 0.25, 7 / 12, 7 / 12])
    expected = np.exp(-np.outer(np.exp([0.0, 1.0]), h0))
    np.testing.assert_allclose(s, expected, atol=1e-12)


def test_breslow_matches_sksurv_coxph(cohort, coxph):
    xtr, ttr, etr, xte, *_ = cohort
    times = coxph.unique_times_
    ref = coxph.predict_survival_function(xte[:, None], return_array=True)
    ours = ev.breslow_survival(coxph.predict(xtr[:, None]), ttr, etr, coxph.predict(xte[:, None]), times)
    assert ours.shape == (len(xte), len(times))
    np.testing.assert_allclose(ours, ref, atol=1e-6)


def test_breslow_matches_lifelines(cohort):
    from lifelines import CoxPHFitter

    xtr, ttr, etr, xte, *_ = cohort
    cph = CoxPHFitter().fit(pd.DataFrame({"x": xtr, "T": ttr, "E": etr}), "T", "E")
    beta = float(cph.params_["x"])
    times = np.unique(ttr)[::7]  # observed times: lifelines' linear interpolation is exact there
    ref = cph.predict_survival_function(pd.DataFrame({"x": xte}), times=times).to_numpy().T
    ours = ev.breslow_survival(beta * xtr, ttr, etr, beta * xte, times)  # lifelines centres x; we do not
    np.testing.assert_allclose(ours, ref, atol=1e-6)


def test_breslow_extreme_risks_give_no_nan():
    # sksurv's BreslowEstimator divides by zero here (risk-set sums by subtraction cancel)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        s = ev.breslow_survival([0.0, 300.0, -300.0], [1.0, 2.0, 3.0], [1, 1, 1], [-900.0, 0.0, 900.0],
                                [0.0, 1.5, 5.0])
    assert np.isfinite(s).all() and (s >= 0).all() and (s <= 1).all()
    assert s[2, 1] == 0.0 and s[:, 0].tolist() == [1.0, 1.0, 1.0]
    # H0(5) ~ e^{300} + e^{0} + e^{-300}... dominated by 1/e^{-300}: H(5 | r=-900) = e^{-600} -> S = 1
    assert s[0, 2] == pytest.approx(1.0)
    # log-space result agrees with the direct formula where the direct formula is stable
    r = np.array([0.0, 30.0, -30.0])
    h0 = np.cumsum([1 / np.exp(r).sum(), 1 / np.exp(r[1:]).sum(), 1 / np.exp(r[2:]).sum()])
    np.testing.assert_allclose(ev.breslow_survival(r, [1.0, 2.0, 3.0], [1, 1, 1], [-35.0], [1.0, 2.0, 3.0]),
                               np.exp(-h0 * np.exp(-35.0))[None, :], rtol=1e-12)


def test_breslow_ties_and_no_training_event():
    # tied event and censoring at t = 2 (censored patients at t_k are in the risk set)
    s = ev.breslow_survival([0.0, 0.0, 0.0, 0.0], [1.0, 2.0, 2.0, 4.0], [1, 1, 0, 1], [0.0], [1.0, 2.0, 4.0])
    np.testing.assert_allclose(s[0], np.exp(-np.cumsum([1 / 4, 1 / 3, 1 / 1])), rtol=1e-12)
    assert ev.breslow_survival([0.0, 1.0], [1.0, 2.0], [0, 0], [0.0, 5.0], [0.5, 3.0]).tolist() == [[1.0, 1.0]] * 2


def test_breslow_bad_input_names_argument():
    with pytest.raises(ValueError, match="train_event"):
        ev.breslow_survival([0.0, 1.0], [1.0, 2.0], [1], [0.0], [1.0])
    with pytest.raises(ValueError, match="train_time"):
        ev.breslow_survival([0.0, 1.0], [1.0, -2.0], [1, 0], [0.0], [1.0])
    with pytest.raises(ValueError, match="risk"):
        ev.breslow_survival([0.0, 1.0], [1.0, 2.0], [1, 0], [np.nan], [1.0])


# --------------------------------------------------------- survival metrics
def test_survival_metrics_match_direct_sksurv_calls(cohort, coxph):
    from sksurv.metrics import (concordance_index_censored, concordance_index_ipcw, cumulative_dynamic_auc,
                                integrated_brier_score)
    from sksurv.util import Surv

    xtr, ttr, etr, xte, tte, ete = cohort
    rtr, rte = coxph.predict(xtr[:, None]), coxph.predict(xte[:, None])
    m = ev.survival_metrics(ttr, etr, rtr, tte, ete, rte)
    assert _strict_json(m) == m

    times = np.asarray(m["times"])
    # default rule: quantiles of test event times, inside [min test, min(max train, max test))
    q = np.quantile(tte[ete], np.linspace(0.1, 0.8, 10))
    np.testing.assert_allclose(times, q)
    assert times.min() >= tte.min() and times.max() < min(ttr.max(), tte.max())

    ytr, yte = Surv.from_arrays(etr, ttr), Surv.from_arrays(ete, tte)
    assert m["harrell_c"] == pytest.approx(concordance_index_censored(ete, tte, rte)[0], abs=1e-12)
    assert m["uno_tau"] == pytest.approx(times[-1])
    assert m["uno_c"] == pytest.approx(concordance_index_ipcw(ytr, yte, rte, tau=times[-1])[0], abs=1e-12)
    auc, mean_auc = cumulative_dynamic_auc(ytr, yte, rte, times)
    np.testing.assert_allclose(m["td_auc"]["auc"], auc, atol=1e-12)
    assert m["td_auc"]["mean_auc"] == pytest.approx(mean_auc, abs=1e-12)
    # IBS from sksurv's own Cox survival functions (independent of our Breslow code)
    surv = np.vstack([f(times) for f in coxph.predict_survival_function(xte[:, None])])
    assert m["ibs"] == pytest.approx(integrated_brier_score(ytr, yte, surv, times), abs=1e-6)
    assert 0.65 < m["harrell_c"] < 0.85 and len(m["brier"]["scores"]) == len(times)


def test_calibration_well_specified_model_and_lifelines_reference():
    from lifelines import CoxPHFitter, KaplanMeierFitter

    rng = np.random.default_rng(3)
    xtr, ttr, etr = _simulate(rng, 1500, admin=4.0)
    xte, tte, ete = _simulate(rng, 600, admin=3.0)
    m = ev.survival_metrics(ttr, etr, xtr, tte, ete, xte)  # the true log hazard ratio
    cal = m["calibration"]
    assert cal["horizon"] == pytest.approx(np.median(m["times"]))
    assert cal["n_groups"] == 10 and sum(g["n"] for g in cal["groups"]) == 600
    km = KaplanMeierFitter().fit(tte, ete)
    assert cal["observed"] == pytest.approx(1 - float(km.predict(cal["horizon"])), abs=1e-9)
    assert cal["ici"] < 0.05 and abs(cal["oe_ratio"] - 1) < 0.15 and abs(cal["slope"] - 1) < 0.2
    slope_ref = CoxPHFitter().fit(pd.DataFrame({"r": xte, "T": tte, "E": ete}), "T", "E").params_["r"]
    assert cal["slope"] == pytest.approx(slope_ref, abs=1e-4)
    # risks twice too extreme: slope about 1/2, larger calibration error
    bad = ev.survival_metrics(ttr, etr, 2 * xtr, tte, ete, 2 * xte)["calibration"]
    assert 0.35 < bad["slope"] < 0.65 and bad["ici"] > cal["ici"]


def test_calibration_uses_fewer_groups_for_few_patients(cohort):
    xtr, ttr, etr, xte, tte, ete = cohort
    m = ev.survival_metrics(ttr, etr, xtr, tte[:35], ete[:35], xte[:35], horizon=0.3)
    assert m["calibration"]["n_groups"] == 3 and m["calibration"]["horizon"] == 0.3


def test_all_censored_test_set_gives_none_with_notes(cohort):
    xtr, ttr, etr, xte, tte, _ = cohort
    m = ev.survival_metrics(ttr, etr, xtr, tte, np.zeros(len(tte), bool), xte)
    for k in ("harrell_c", "uno_c", "td_auc", "brier", "ibs", "calibration"):
        assert m[k] is None, k
    assert any("censored" in n for n in m["notes"])
    assert _strict_json(m) == m


def test_single_test_patient_and_times_outside_training(cohort):
    xtr, ttr, etr, xte, tte, ete = cohort
    one = ev.survival_metrics(ttr, etr, xtr, tte[:1], [1], xte[:1])
    assert one["harrell_c"] is None and one["td_auc"] is None and any("2 patients" in n for n in one["notes"])
    # test follow-up entirely after the training follow-up
    late = ev.survival_metrics(ttr, etr, xtr, tte + ttr.max() + 1, ete, xte)
    assert late["harrell_c"] is not None  # does not need the training data
    assert late["uno_c"] is None and late["td_auc"] is None and late["ibs"] is None
    assert any("outside the valid range" in n for n in late["notes"])
    # user times partly outside: dropped with a note, the rest evaluated
    part = ev.survival_metrics(ttr, etr, xtr, tte, ete, xte, times=[0.2, 0.5, 50.0])
    assert part["times"] == [0.2, 0.5] and any("50" in n for n in part["notes"])
    assert _strict_json(late) == late and _strict_json(part) == part


def test_test_follow_up_beyond_training_is_handled(cohort):
    """sksurv raises when test events lie beyond the training follow-up; we evaluate inside it."""
    from sksurv.metrics import cumulative_dynamic_auc
    from sksurv.util import Surv

    rng = np.random.default_rng(5)
    xtr, ttr, etr = _simulate(rng, 200, admin=0.8)
    xte, tte, ete = _simulate(rng, 150, admin=5.0)
    ytr, yte = Surv.from_arrays(etr, ttr), Surv.from_arrays(ete, tte)
    m = ev.survival_metrics(ttr, etr, xtr, tte, ete, xte)
    times = np.asarray(m["times"])
    assert len(times) > 0 and times.max() < ttr.max()
    with pytest.raises(ValueError):
        cumulative_dynamic_auc(ytr, yte, xte, times)
    # censoring the test set after the last evaluation time leaves the estimators unchanged
    cut = (times.max() + min(ttr.max(), tte.max())) / 2
    other = ev.survival_metrics(ttr, etr, xtr, np.minimum(tte, cut), ete & (tte <= cut), xte, times=times)
    for k in ("uno_c", "ibs"):
        assert m[k] == pytest.approx(other[k], abs=1e-12)
    np.testing.assert_allclose(m["td_auc"]["auc"], other["td_auc"]["auc"], atol=1e-12)
    assert 0.6 < m["uno_c"] < 0.9


def test_survival_metrics_bad_input_names_argument(cohort):
    xtr, ttr, etr, xte, tte, ete = cohort
    with pytest.raises(ValueError, match="test_risk"):
        ev.survival_metrics(ttr, etr, xtr, tte, ete, xte[:-1])
    with pytest.raises(ValueError, match="train_event"):
        ev.survival_metrics(ttr, etr[:-2], xtr, tte, ete, xte)
    with pytest.raises(ValueError, match="test_event"):
        ev.survival_metrics(ttr, etr, xtr, tte, np.full(len(tte), 2), xte)
    with pytest.raises(ValueError, match="test_time"):
        ev.survival_metrics(ttr, etr, xtr, np.r_[tte[:-1], np.nan], ete, xte)


# --------------------------------------------------------------- bootstrap
def test_bootstrap_ci_mean_matches_normal_theory_and_is_deterministic():
    x = np.random.default_rng(1).normal(size=400)
    est, lo, hi = ev.bootstrap_ci(np.mean, x, n_boot=400, seed=0)
    se = x.std(ddof=1) / math.sqrt(len(x))
    assert est == pytest.approx(x.mean())
    assert lo == pytest.approx(x.mean() - 1.96 * se, abs=0.3 * se)
    assert hi == pytest.approx(x.mean() + 1.96 * se, abs=0.3 * se)
    assert tuple(ev.bootstrap_ci(np.mean, x, n_boot=400, seed=0)) == (est, lo, hi)
    assert tuple(ev.bootstrap_ci(np.mean, x, n_boot=400, seed=1)) != (est, lo, hi)


def test_bootstrap_resamples_jointly_and_skips_none():
    a = np.arange(20)
    kept = []

    def fn(u, v):
        assert np.array_equal(v, 2 * u)  # rows resampled jointly
        if 0 in u:  # undefined whenever patient 0 is drawn (probability ~ 1 - (19/20)^20 = 0.64)
            return None if len(kept) % 2 else float("nan")
        kept.append(u.mean())
        return u.mean()

    ci = ev.bootstrap_ci(fn, a, 2 * a, n_boot=300, seed=2)
    assert ci.estimate is None  # patient 0 is in the full data
    assert ci.n_used == len(kept) and ci.n_boot == 300 and 60 < ci.n_used < 160
    assert ci.lo == pytest.approx(np.quantile(kept, 0.025)) and ci.hi == pytest.approx(np.quantile(kept, 0.975))
    with pytest.raises(ValueError, match=r"arrays\[1\]"):
        ev.bootstrap_ci(np.mean, a, a[:-1])


def test_per_group_table_matches_sksurv_per_site(cohort):
    from sksurv.metrics import concordance_index_censored

    xtr, ttr, etr, xte, tte, ete = cohort
    site = np.array(["A"] * 70 + ["B"] * 79 + ["C"])
    rows = ev.per_group_table(site, tte, ete, xte, n_boot=50, seed=0)
    assert [r["group"] for r in rows] == ["A", "B", "C", "all"]
    for r, sel in zip(rows, [site == "A", site == "B", site == "C", np.ones(150, bool)]):
        assert r["n"] == sel.sum() and r["n_events"] == ete[sel].sum()
        if r["group"] != "C":
            ref = concordance_index_censored(ete[sel], tte[sel], xte[sel])[0]
            assert r["harrell_c"] == pytest.approx(ref, abs=1e-12)
            assert r["ci_low"] < r["harrell_c"] < r["ci_high"] and r["n_boot_used"] > 40
    assert rows[2]["harrell_c"] is None and rows[2]["ci_low"] is None  # a single patient: no pair
    assert rows == ev.per_group_table(site, tte, ete, xte, n_boot=50, seed=0)
    assert _strict_json(rows) == rows
    # exactly one comparable pair (< 2): None
    one = ev.per_group_table(["s", "s"], [1.0, 2.0], [1, 0], [0.5, 0.1], n_boot=10)
    assert one[0]["harrell_c"] is None and one[0]["n_pairs"] == 1
    with pytest.raises(ValueError, match="risk"):
        ev.per_group_table(site, tte, ete, xte[:10])


# ------------------------------------------------------------ classification
def test_decision_curve_hand_computed():
    y = [1, 1, 0, 0, 1]
    p = [0.9, 0.4, 0.6, 0.2, 0.7]
    dc = ev.classification_metrics(y, p)["decision_curve"]
    assert len(dc["thresholds"]) == 99 and dc["thresholds"][0] == 0.01 and dc["thresholds"][-1] == 0.99
    at = {t: i for i, t in enumerate(dc["thresholds"])}
    # pt = 0.5: treat {0.9, 0.6, 0.7} -> TP 2, FP 1 -> 2/5 - 1/5 * 1
    assert dc["net_benefit"][at[0.5]] == pytest.approx(0.2)
    # pt = 0.3: treat {0.9, 0.4, 0.6, 0.7} -> TP 3, FP 1 -> 3/5 - 1/5 * 3/7
    assert dc["net_benefit"][at[0.3]] == pytest.approx(0.6 - 0.2 * 3 / 7)
    assert dc["treat_all"][at[0.3]] == pytest.approx(0.6 - 0.4 * 3 / 7)
    assert dc["net_benefit"][at[0.95]] == 0.0 and dc["treat_all"][at[0.95]] == pytest.approx(0.6 - 0.4 * 19)
    assert set(dc["treat_none"]) == {0.0}


def test_binary_metrics_against_sklearn_and_hand_ece():
    from sklearn.metrics import brier_score_loss, log_loss, roc_auc_score

    y = np.array([0, 1, 1, 1, 0])
    p = np.array([0.1, 0.3, 0.6, 0.8, 0.9])
    m = ev.classification_metrics(y, p, n_bins=2)
    assert m["task"] == "binary" and _strict_json(m) == m
    assert m["auc"] == pytest.approx(roc_auc_score(y, p))
    assert m["brier"] == pytest.approx(np.mean((y - p) ** 2))
    assert m["log_loss"] == pytest.approx(log_loss(y, p))
    assert m["accuracy"] == pytest.approx(3 / 5)  # predicted [0, 0, 1, 1, 1]: 0.3 and 0.9 wrong
    # bins [0, .5] and (.5, 1]: |0.5 - 0.2| * 2/5 + |2/3 - 2.3/3| * 3/5 = 0.12 + 0.06
    assert m["calibration"]["ece"] == pytest.approx(0.18)
    assert m["calibration"]["counts"] == [2, 3]
    # (N, 2) probabilities and string labels give the same numbers
    m2 = ev.classification_metrics(np.where(y == 1, "pos", "neg"), np.c_[1 - p, p], classes=["neg", "pos"], n_bins=2)
    for k in ("auc", "brier", "log_loss", "accuracy"):
        assert m2[k] == pytest.approx(m[k])
    rng = np.random.default_rng(0)
    yy, pp = rng.integers(0, 2, 300), rng.uniform(size=300)
    big = ev.classification_metrics(yy, pp)
    assert big["auc"] == pytest.approx(roc_auc_score(yy, pp))
    assert big["brier"] == pytest.approx(brier_score_loss(yy, pp))


def test_multiclass_metrics_against_sklearn_and_hand_ece():
    from sklearn.metrics import brier_score_loss, roc_auc_score

    rng = np.random.default_rng(2)
    P = rng.dirichlet(np.ones(3), 200)
    y = rng.integers(0, 3, 200)
    m = ev.classification_metrics(y, P)
    assert m["task"] == "multiclass" and m["decision_curve"] is None and _strict_json(m) == m
    assert m["auc"] == pytest.approx(roc_auc_score(y, P, multi_class="ovr", average="macro"))
    onehot = np.eye(3)[y]
    assert m["brier"] == pytest.approx(np.mean(np.sum((onehot - P) ** 2, axis=1)))
    assert m["brier"] == pytest.approx(brier_score_loss(y, P))
    assert m["accuracy"] == pytest.approx(np.mean(P.argmax(1) == y))
    assert set(m["calibration"]["per_class"]) == {"0", "1", "2"}
    # top-label ECE by hand: confidences 0.4, 0.45 (bin [0, .5]) and 0.8, 0.9 (bin (.5, 1]), n_bins = 2
    P4 = np.array([[0.4, 0.35, 0.25], [0.45, 0.3, 0.25], [0.1, 0.8, 0.1], [0.05, 0.05, 0.9]])
    y4 = np.array([0, 1, 1, 0])  # correct, wrong, correct, wrong: accuracy 1/2 in each bin
    m4 = ev.classification_metrics(y4, P4, n_bins=2, classes=[0, 1, 2])
    assert m4["calibration"]["ece"] == pytest.approx(0.5 * abs(0.5 - 0.425) + 0.5 * abs(0.5 - 0.85))
    assert m4["auc"] is None and any("absent" in n for n in m4["notes"])  # class 2 never occurs


def test_classification_bad_input():
    with pytest.raises(ValueError, match="proba"):
        ev.classification_metrics([0, 1, 1], [0.2, 0.7])
    with pytest.raises(ValueError, match="y_true"):
        ev.classification_metrics([0, 1, 3], [0.2, 0.7, 0.4])
    with pytest.raises(ValueError, match="sum to 1"):
        ev.classification_metrics([0, 1], [[0.2, 0.2, 0.2], [0.5, 0.5, 0.0]])
    one_class = ev.classification_metrics([1, 1, 1], [0.2, 0.7, 0.9])
    assert one_class["auc"] is None and one_class["notes"]


# ------------------------------------------------------------------- plots
def _assert_png(path):
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC and len(data) > 2000


def test_plots_write_valid_pngs(tmp_path, cohort):
    xtr, ttr, etr, xte, tte, ete = cohort
    m = ev.survival_metrics(ttr, etr, xtr, tte, ete, xte)
    rng = np.random.default_rng(0)
    c2 = ev.classification_metrics(rng.integers(0, 2, 100), rng.uniform(size=100))
    c3 = ev.classification_metrics(rng.integers(0, 3, 90), rng.dirichlet(np.ones(3), 90))
    paths = [
        ev.plot_calibration(m["calibration"], tmp_path / "surv_cal.png"),
        ev.plot_calibration(c2["calibration"], tmp_path / "bin_cal.png"),
        ev.plot_calibration(c3["calibration"], tmp_path / "sub" / "multi_cal.png"),
        ev.plot_td_auc(m["td_auc"], tmp_path / "td_auc.png"),
        ev.plot_decision_curve(c2["decision_curve"], tmp_path / "dca.png"),
    ]
    for p in paths:
        _assert_png(p)
    with pytest.raises(ValueError, match="not computed"):
        ev.plot_td_auc(None, tmp_path / "none.png")
