import numpy as np
import pytest
import torch
from torch.nn import functional as F

from fusion.losses import cox_ph_loss


def _breslow_nll(risk, time, event):
    """Direct O(n^2) transcription of the Breslow partial likelihood."""
    total, n_ev = 0.0, 0
    for i in range(len(risk)):
        if event[i]:
            at_risk = time >= time[i]
            total += risk[i] - np.log(np.exp(risk[at_risk]).sum())
            n_ev += 1
    return -total / n_ev


def test_cox_loss_matches_hand_computation_small():
    # 3 patients, no ties: hand-computed value.
    risk = torch.tensor([0.5, -0.2, 1.0])
    time = torch.tensor([2.0, 5.0, 1.0])
    event = torch.tensor([True, False, True])
    # event at t=1 (risk 1.0): risk set all three; event at t=2 (risk .5): {0.5, -0.2}
    expected = -((1.0 - np.log(np.exp(0.5) + np.exp(-0.2) + np.exp(1.0)))
                 + (0.5 - np.log(np.exp(0.5) + np.exp(-0.2)))) / 2
    assert cox_ph_loss(risk, time, event).item() == pytest.approx(expected, rel=1e-6)


def _efron_nll(risk, time, event):
    """Direct transcription of Efron's approximation."""
    total = 0.0
    for t in np.unique(time[event]):
        D = event & (time == t)
        R = time >= t
        d = D.sum()
        total += risk[D].sum()
        for ell in range(d):
            total -= np.log(np.exp(risk[R]).sum() - ell / d * np.exp(risk[D]).sum())
    return -total / event.sum()


@pytest.mark.parametrize("ties", [False, True])
def test_cox_loss_matches_direct_formula(ties):
    rng = np.random.default_rng(1)
    n = 60
    time = rng.integers(1, 15, n).astype(float) if ties else rng.exponential(10, n)
    event = rng.random(n) < 0.6
    risk = rng.normal(size=n) * 3
    args = torch.tensor(risk), torch.tensor(time), torch.tensor(event)
    assert cox_ph_loss(*args, ties="breslow").item() == pytest.approx(_breslow_nll(risk, time, event), rel=1e-9)
    assert cox_ph_loss(*args, ties="efron").item() == pytest.approx(_efron_nll(risk, time, event), rel=1e-9)
    if not ties:
        assert cox_ph_loss(*args, ties="efron").item() == pytest.approx(cox_ph_loss(*args, ties="breslow").item())


def test_cox_loss_rejects_unknown_ties():
    with pytest.raises(ValueError, match="ties"):
        cox_ph_loss(torch.zeros(2), torch.ones(2), torch.ones(2, dtype=torch.bool), ties="exact")


def test_cox_loss_without_events_is_zero_and_differentiable():
    risk = torch.randn(5, requires_grad=True)
    loss = cox_ph_loss(risk, torch.rand(5), torch.zeros(5, dtype=torch.bool))
    assert loss.item() == 0.0
    loss.backward()
    assert torch.isfinite(risk.grad).all()


def _fit_linear_cox(X, time, event, ties, strata=None):
    p = X.shape[1]
    w = torch.zeros(p, dtype=torch.float64, requires_grad=True)
    Xt, tt, et = torch.tensor(X), torch.tensor(time), torch.tensor(event)
    opt = torch.optim.LBFGS([w], max_iter=200, tolerance_grad=1e-12, tolerance_change=1e-14)

    def closure():
        opt.zero_grad()
        loss = cox_ph_loss(Xt @ w, tt, et, ties=ties, strata=strata)
        loss.backward()
        return loss

    opt.step(closure)
    return w.detach().numpy()


def _tied_data(seed=0, n=300):
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, 3))
    t = np.ceil(rng.exponential(np.exp(-X @ np.array([0.8, -0.5, 0.0]))) * 4)  # heavy ties
    c = np.ceil(rng.exponential(2.0, n) * 4)
    return X, np.minimum(t, c), t <= c


@pytest.mark.parametrize("ties", ["breslow", "efron"])
def test_linear_cox_fit_matches_scikit_survival(ties):
    """Minimising our loss over a linear predictor gives scikit-survival's Cox coefficients."""
    from sksurv.linear_model import CoxPHSurvivalAnalysis
    from sksurv.util import Surv

    X, time, event = _tied_data()
    ref = CoxPHSurvivalAnalysis(ties=ties).fit(X, Surv.from_arrays(event, time)).coef_
    np.testing.assert_allclose(_fit_linear_cox(X, time, event, ties), ref, atol=1e-4)


def test_linear_cox_fit_matches_lifelines_efron():
    import pandas as pd
    from lifelines import CoxPHFitter

    X, time, event = _tied_data(seed=3)
    df = pd.DataFrame(X, columns=["a", "b", "c"]).assign(T=time, E=event.astype(int))
    ref = CoxPHFitter().fit(df, "T", "E").params_[["a", "b", "c"]].to_numpy()
    np.testing.assert_allclose(_fit_linear_cox(X, time, event, "efron"), ref, atol=1e-4)


def test_stratified_cox_matches_lifelines_strata():
    """Strata: lifelines CoxPHFitter(strata=...) coefficients and partial log-likelihood (Efron), and the
    stratified loss is the sum of the per-stratum losses (risk sets never cross strata)."""
    import pandas as pd
    from lifelines import CoxPHFitter

    X, time, event = _tied_data(seed=5, n=360)
    rng = np.random.default_rng(5)
    site = rng.integers(0, 3, len(time))
    time = np.ceil(time * np.array([1.0, 0.4, 2.5])[site])  # very different baseline hazards per site
    df = pd.DataFrame(X, columns=["a", "b", "c"]).assign(T=time, E=event.astype(int), site=site)
    cph = CoxPHFitter().fit(df, "T", "E", strata=["site"])
    ref = cph.params_[["a", "b", "c"]].to_numpy()
    s = torch.from_numpy(site)
    np.testing.assert_allclose(_fit_linear_cox(X, time, event, "efron", strata=s), ref, atol=1e-4)
    risk = torch.from_numpy(X @ ref)
    tt, ee = torch.from_numpy(time), torch.from_numpy(event)
    loss = cox_ph_loss(risk, tt, ee, strata=s)
    assert float(loss) * event.sum() == pytest.approx(-cph.log_likelihood_, rel=1e-6)
    parts = sum(float(cox_ph_loss(risk[s == k], tt[s == k], ee[s == k])) * int(ee[s == k].sum()) for k in range(3))
    assert float(loss) * event.sum() == pytest.approx(parts, rel=1e-9)
    # the unstratified fit differs (the sites' baseline hazards are confounded with nothing here, but the
    # risk sets differ), a stratum without events adds nothing, and a length mismatch is refused
    assert not np.allclose(_fit_linear_cox(X, time, event, "efron"), ref, atol=1e-3)
    no_ev = ee & (s != 2)
    assert float(cox_ph_loss(risk, tt, no_ev, strata=s)) * int(no_ev.sum()) == pytest.approx(
        sum(float(cox_ph_loss(risk[s == k], tt[s == k], no_ev[s == k])) * int(no_ev[s == k].sum()) for k in (0, 1)))
    with pytest.raises(ValueError, match="strata has 2 rows"):
        cox_ph_loss(risk, tt, ee, strata=s[:2])


# --------------------------------------------------------------------------- #
# Cox: degenerate batches and bad input
# --------------------------------------------------------------------------- #
def test_cox_loss_empty_batch_is_zero_and_differentiable():
    risk = torch.zeros(0, requires_grad=True)
    loss = cox_ph_loss(risk, torch.zeros(0), torch.zeros(0, dtype=torch.bool))
    assert loss.item() == 0.0 and loss.requires_grad
    loss.backward()


def test_cox_loss_without_events_keeps_graph_through_a_network():
    net = torch.nn.Linear(3, 1)
    loss = cox_ph_loss(net(torch.randn(4, 3)).squeeze(1), torch.rand(4), torch.zeros(4, dtype=torch.bool))
    assert loss.item() == 0.0 and not torch.isnan(loss)
    loss.backward()
    assert all(torch.isfinite(p.grad).all() and (p.grad == 0).all() for p in net.parameters())


def test_cox_loss_rejects_length_mismatch_naming_the_argument():
    with pytest.raises(ValueError, match="event"):
        cox_ph_loss(torch.zeros(3), torch.ones(3), torch.ones(2, dtype=torch.bool))
    with pytest.raises(ValueError, match="time"):
        cox_ph_loss(torch.zeros(3), torch.ones(4), torch.ones(3, dtype=torch.bool))


# --------------------------------------------------------------------------- #
# Discrete-time survival
# --------------------------------------------------------------------------- #
from fusion.losses import (  # noqa: E402
    UncertaintyWeighting,
    cfnet_correlation_loss,
    classification_loss,
    discrete_time_nll,
    discrete_time_risk,
    discrete_time_survival,
    make_time_cuts,
    parameter_sharing_penalty,
)


def _ls(x):  # log sigmoid
    return -np.log1p(np.exp(-x))


def test_discrete_time_nll_hand_computed():
    """cuts 0 | 1 | 2 | 4, intervals (0,1], (1,2], (2,4]; midpoints .5, 1.5, 3."""
    cuts = [0.0, 1.0, 2.0, 4.0]
    rng = np.random.default_rng(0)
    L = rng.normal(size=(8, 3))
    time = [1.5, 1.0, 2.5, 3.5, 5.0, 0.6, 0.0, 0.4]
    event = [1, 1, 0, 0, 1, 0, 1, 0]
    lh = lambda i, j: _ls(L[i, j])       # log h_j      # noqa: E731
    ls = lambda i, j: _ls(-L[i, j])      # log(1 - h_j)  # noqa: E731
    ll = [
        ls(0, 0) + lh(0, 1),             # event at 1.5: survived (0,1], failed in (1,2]
        lh(1, 0),                        # event exactly on cut 1 -> fails in (0,1]
        ls(2, 0) + ls(2, 1),             # censored 2.5 < midpoint 3 of (2,4]: own interval not credited
        ls(3, 0) + ls(3, 1) + ls(3, 2),  # censored 3.5 >= 3: credited
        ls(4, 0) + ls(4, 1) + ls(4, 2),  # event after the last cut: survived all, no failure term
        ls(5, 0),                        # censored 0.6 >= midpoint .5 of (0,1]
        lh(6, 0),                        # event at c_0 falls in the first interval
        0.0,                             # censored 0.4 < .5: contributes nothing
    ]
    got = discrete_time_nll(torch.tensor(L), torch.tensor(time), torch.tensor(event, dtype=torch.bool), cuts)
    assert got.item() == pytest.approx(-np.mean(ll), rel=1e-12)


def _nnet_survival_reference(L, t, f, breaks):
    """Transcription of nnet-survival's make_surv_array + surv_likelihood (Gensheimer & Narasimhan 2019)."""
    n_int = len(breaks) - 1
    mid = breaks[:-1] + 0.5 * (breaks[1:] - breaks[:-1])
    y = np.zeros((len(t), 2 * n_int))
    for i in range(len(t)):
        if f[i]:
            y[i, :n_int] = 1.0 * (t[i] >= breaks[1:])
            if t[i] < breaks[-1]:
                y[i, n_int + np.where(t[i] < breaks[1:])[0][0]] = 1
        else:
            y[i, :n_int] = 1.0 * (t[i] >= mid)
    y_pred = 1 / (1 + np.exp(L))  # nnet-survival's output is the conditional survival 1 - h
    cens_uncens = 1.0 + y[:, :n_int] * (y_pred - 1.0)
    uncens = 1.0 - y[:, n_int:] * y_pred
    return np.mean(np.sum(-np.log(np.concatenate([cens_uncens, uncens], 1)), 1))


def test_discrete_time_nll_matches_nnet_survival_off_the_cuts():
    rng = np.random.default_rng(3)
    n, k = 200, 5
    t = rng.exponential(3.0, n) + 1e-3
    f = rng.random(n) < 0.6
    cuts = make_time_cuts(t, f, k)
    t = np.where(np.isin(t, cuts), t + 1e-6, t)
    L = rng.normal(size=(n, len(cuts) - 1))
    got = discrete_time_nll(torch.tensor(L), torch.tensor(t), torch.tensor(f), torch.tensor(cuts)).item()
    assert got == pytest.approx(_nnet_survival_reference(L, t, f, cuts), rel=1e-10)


def test_discrete_time_constant_hazard_mle_is_the_life_table_estimate():
    """With one shared logit per interval, the MLE hazard is failures / (failures + survivors) per interval."""
    rng = np.random.default_rng(5)
    n = 300
    t = rng.uniform(0, 4, n)
    f = rng.random(n) < 0.5
    cuts = np.array([0.0, 1.0, 2.5, 4.0])
    logit = torch.zeros(3, requires_grad=True, dtype=torch.float64)
    opt = torch.optim.LBFGS([logit], max_iter=200, tolerance_grad=1e-12, tolerance_change=1e-15,
                            line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = discrete_time_nll(logit.expand(n, 3), torch.tensor(t), torch.tensor(f), cuts)
        loss.backward()
        return loss

    opt.step(closure)
    mid = (cuts[:-1] + cuts[1:]) / 2
    expected = []
    for j in range(3):
        fail = (f & (t > cuts[j]) & (t <= cuts[j + 1])).sum()
        surv = (f & (t > cuts[j + 1])).sum() + (~f & (t >= mid[j])).sum()
        expected.append(fail / (fail + surv))
    np.testing.assert_allclose(torch.sigmoid(logit).detach().numpy(), expected, atol=1e-6)


def test_discrete_time_survival_and_risk():
    L = torch.tensor([[0.0, 1.0, -2.0], [3.0, 3.0, 3.0]], dtype=torch.float64)
    h = torch.sigmoid(L)
    S = discrete_time_survival(L)
    torch.testing.assert_close(S, torch.cumprod(1 - h, 1))
    r = discrete_time_risk(L)
    torch.testing.assert_close(r, -torch.log(S[:, -1]))
    assert r[1] > r[0]  # uniformly higher hazards -> higher risk


def test_discrete_time_nll_empty_batch_and_gradient():
    logits = torch.zeros(0, 2, requires_grad=True)
    loss = discrete_time_nll(logits, torch.zeros(0), torch.zeros(0, dtype=torch.bool), [0, 1, 2])
    assert loss.item() == 0.0
    loss.backward()
    logits = torch.randn(4, 2, requires_grad=True)
    discrete_time_nll(logits, torch.tensor([0.5, 1.5, 3.0, 1.0]), torch.tensor([1, 0, 1, 0]).bool(),
                      [0, 1, 2]).backward()
    assert torch.isfinite(logits.grad).all()


def test_make_time_cuts_quantiles():
    t = np.array([1.0, 2, 3, 4, 5, 6, 7, 8, 10, 12])
    e = np.array([1, 1, 1, 1, 0, 1, 1, 1, 1, 0], dtype=bool)
    cuts = make_time_cuts(t, e, 4)
    ev = t[e]
    np.testing.assert_allclose(cuts, [0.0, *np.quantile(ev, [0.25, 0.5, 0.75]), 12.0])
    with pytest.warns(UserWarning, match="intervals"):
        tied = make_time_cuts(np.array([1.0, 1, 1, 1, 5]), np.ones(5, dtype=bool), 4)
    assert np.all(np.diff(tied) > 0)


@pytest.mark.parametrize("call, field", [
    (lambda: make_time_cuts([1, 2], [1, 1], 0), "k"),
    (lambda: make_time_cuts([1, 2], [0, 0], 2), "event"),
    (lambda: make_time_cuts([1, 2], [1, 1, 0], 2), "event"),
    (lambda: make_time_cuts([], [], 2), "time"),
    (lambda: make_time_cuts([1, np.nan], [1, 1], 2), "time"),
    (lambda: discrete_time_nll(torch.zeros(3, 2), torch.ones(3), torch.ones(3).bool(), [0, 1]), "cuts"),
    (lambda: discrete_time_nll(torch.zeros(3, 2), torch.ones(3), torch.ones(3).bool(), [0, 2, 1]), "cuts"),
    (lambda: discrete_time_nll(torch.zeros(3), torch.ones(3), torch.ones(3).bool(), [0, 1]), "logits"),
    (lambda: discrete_time_nll(torch.zeros(3, 1), torch.ones(2), torch.ones(3).bool(), [0, 1]), "time"),
    (lambda: discrete_time_nll(torch.zeros(3, 1), torch.ones(3), torch.ones(2).bool(), [0, 1]), "event"),
    (lambda: discrete_time_survival(torch.zeros(3)), "logits"),
    (lambda: discrete_time_risk(torch.zeros(3, 0)), "logits"),
])
def test_discrete_time_bad_input(call, field):
    with pytest.raises(ValueError, match=field):
        call()


# --------------------------------------------------------------------------- #
# Classification
# --------------------------------------------------------------------------- #
def test_focal_loss_binary_hand_computed():
    logits = torch.tensor([0.0, 2.0], dtype=torch.float64)
    target = torch.tensor([1, 0])
    s2 = 1 / (1 + np.exp(-2.0))
    pt1, pt2 = 0.5, 1 - s2
    fl1 = -0.25 * (1 - pt1) ** 2 * np.log(pt1)
    fl2 = -0.75 * (1 - pt2) ** 2 * np.log(pt2)
    got = classification_loss(logits, target, kind="focal", gamma=2.0, alpha=0.25)
    assert got.item() == pytest.approx((fl1 + fl2) / 2, rel=1e-12)
    # (B, 1) logits are binary too
    assert classification_loss(logits[:, None], target, kind="focal", alpha=0.25).item() == pytest.approx(got.item())


def test_focal_loss_multiclass_hand_computed():
    logits = torch.tensor([[1.0, 0.0, -1.0], [0.0, 0.0, 3.0]], dtype=torch.float64)
    target = torch.tensor([0, 1])
    p = np.exp(logits.numpy()) / np.exp(logits.numpy()).sum(1, keepdims=True)
    pt = np.array([p[0, 0], p[1, 1]])
    alpha = np.array([0.2, 0.5, 0.3])
    expected = np.mean(-alpha[[0, 1]] * (1 - pt) ** 1.5 * np.log(pt))
    got = classification_loss(logits, target, kind="focal", gamma=1.5, alpha=alpha.tolist())
    assert got.item() == pytest.approx(expected, rel=1e-12)


def test_focal_with_gamma_zero_equals_cross_entropy_and_ignores_negative_targets():
    torch.manual_seed(0)
    z = torch.randn(6, 4, dtype=torch.float64)
    y = torch.tensor([0, 3, -1, 2, 1, -1])
    ce = F.cross_entropy(z, y, ignore_index=-1)
    torch.testing.assert_close(classification_loss(z, y, kind="focal", gamma=0.0), ce)
    torch.testing.assert_close(classification_loss(z, y, kind="ce"), ce)
    zb = torch.randn(6, dtype=torch.float64)
    keep = y >= 0
    yb = torch.tensor([1, 0, -1, 1, 0, -1])
    bce = F.binary_cross_entropy_with_logits(zb[keep], yb[keep].double())
    torch.testing.assert_close(classification_loss(zb, yb, kind="focal", gamma=0.0), bce)
    torch.testing.assert_close(classification_loss(zb, yb), bce)


def test_focal_loss_is_finite_for_confident_predictions_and_all_ignored():
    z = torch.tensor([40.0, -40.0], requires_grad=True)
    loss = classification_loss(z, torch.tensor([1, 0]), kind="focal", gamma=0.5)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(z.grad).all()
    z = torch.randn(3, 2, requires_grad=True)
    loss = classification_loss(z, torch.full((3,), -1), kind="focal")
    assert loss.item() == 0.0
    loss.backward()


@pytest.mark.parametrize("kw, field", [
    (dict(kind="hinge"), "kind"), (dict(gamma=-1.0), "gamma"), (dict(alpha=1.5), "alpha"),
])
def test_classification_loss_bad_arguments(kw, field):
    with pytest.raises(ValueError, match=field):
        classification_loss(torch.zeros(3), torch.tensor([0, 1, 1]), **kw)


def test_classification_loss_bad_targets_and_shapes():
    with pytest.raises(ValueError, match="target"):
        classification_loss(torch.zeros(3), torch.tensor([0, 2, 1]))
    with pytest.raises(ValueError, match="target"):
        classification_loss(torch.zeros(3, 3), torch.tensor([0, 3, 1]))
    with pytest.raises(ValueError, match="target"):
        classification_loss(torch.zeros(3, 3), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="logits"):
        classification_loss(torch.zeros(3, 3, 2), torch.tensor([0, 1, 1]))
    with pytest.raises(ValueError, match="alpha"):
        classification_loss(torch.zeros(3, 3), torch.tensor([0, 1, 1]), alpha=[1.0, 1.0])


# --------------------------------------------------------------------------- #
# Uncertainty weighting
# --------------------------------------------------------------------------- #
def test_uncertainty_weighting_value_and_analytic_gradient():
    w = UncertaintyWeighting(3)
    with torch.no_grad():
        w.log_vars.copy_(torch.tensor([0.0, 0.5, -1.0]))
    L = torch.tensor([2.0, 0.3, 1.5], requires_grad=True)
    total = w([L[0], L[1], L[2]])
    s = np.array([0.0, 0.5, -1.0])
    Ln = np.array([2.0, 0.3, 1.5])
    assert total.item() == pytest.approx(float(np.sum(np.exp(-s) * Ln + s)), rel=1e-6)
    total.backward()
    np.testing.assert_allclose(w.log_vars.grad.numpy(), 1 - np.exp(-s) * Ln, rtol=1e-6)
    np.testing.assert_allclose(L.grad.numpy(), np.exp(-s), rtol=1e-6)
    np.testing.assert_allclose(w.weights.numpy(), np.exp(-s), rtol=1e-6)


def test_uncertainty_weighting_converges_to_log_loss():
    w = UncertaintyWeighting(2)
    opt = torch.optim.SGD(w.parameters(), lr=0.2)
    L = torch.tensor([0.5, 3.0])
    for _ in range(400):
        opt.zero_grad()
        w(L).backward()
        opt.step()
    np.testing.assert_allclose(w.log_vars.detach().numpy(), np.log([0.5, 3.0]), atol=1e-4)


def test_uncertainty_weighting_bad_input():
    with pytest.raises(ValueError, match="n_tasks"):
        UncertaintyWeighting(0)
    with pytest.raises(ValueError, match="n_tasks"):
        UncertaintyWeighting(2)(torch.ones(3))
    with pytest.raises(ValueError, match="scalar"):
        UncertaintyWeighting(2)([torch.ones(2), torch.ones(())])


# --------------------------------------------------------------------------- #
# CF-Net correlation loss
# --------------------------------------------------------------------------- #
def test_cfnet_loss_matches_numpy_corrcoef_with_and_without_mask():
    rng = np.random.default_rng(0)
    c = rng.normal(size=50)
    p = 0.6 * c + rng.normal(size=50)
    y0 = rng.random(50) < 0.5
    got = cfnet_correlation_loss(torch.tensor(p), torch.tensor(c)).item()
    assert got == pytest.approx(-np.corrcoef(p, c)[0, 1] ** 2, rel=1e-6)
    got = cfnet_correlation_loss(torch.tensor(p), torch.tensor(c), torch.tensor(y0)).item()
    assert got == pytest.approx(-np.corrcoef(p[y0], c[y0])[0, 1] ** 2, rel=1e-6)


def test_cfnet_loss_gradient_direction_and_degenerate_cases():
    rng = np.random.default_rng(1)
    c = torch.tensor(rng.normal(size=30))
    p = torch.tensor(rng.normal(size=30), requires_grad=True)
    before = cfnet_correlation_loss(p, c)
    before.backward()
    with torch.no_grad():
        p2 = p - 0.05 * p.grad  # the confounder predictor's descent step raises corr^2
    assert cfnet_correlation_loss(p2, c).item() < before.item()
    q = torch.ones(5, requires_grad=True)  # constant prediction: 0, not NaN
    loss = cfnet_correlation_loss(q, torch.randn(5))
    loss.backward()
    assert loss.item() == 0.0 and torch.isfinite(q.grad).all()
    one = cfnet_correlation_loss(torch.randn(4), torch.randn(4), torch.tensor([True, False, False, False]))
    assert one.item() == 0.0


def test_cfnet_loss_bad_input():
    with pytest.raises(ValueError, match="target"):
        cfnet_correlation_loss(torch.zeros(4), torch.zeros(3))
    with pytest.raises(ValueError, match="mask"):
        cfnet_correlation_loss(torch.zeros(4), torch.zeros(4), torch.ones(3, dtype=torch.bool))
    with pytest.raises(ValueError, match="mask"):
        cfnet_correlation_loss(torch.zeros(4), torch.zeros(4), torch.ones(4))


# --------------------------------------------------------------------------- #
# Soft parameter sharing
# --------------------------------------------------------------------------- #
def _linear(w, b):
    lin = torch.nn.Linear(len(w), 1)
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([w]))
        lin.bias.copy_(torch.tensor([b]))
    return lin


def test_parameter_sharing_penalty_hand_computed():
    a, b = _linear([1.0, 2.0], 0.0), _linear([3.0, 0.0], 1.0)
    # mean weight (2, 1), mean bias .5: each module is (+-1, +-1) and +-.5 away -> 2 * (1 + 1 + .25)
    assert parameter_sharing_penalty([a, b]).item() == pytest.approx(4.5)
    c = _linear([2.0, 4.0], -1.0)
    # mean weight (2, 2), bias 0: (1+0) + (1+4) + (0+4) for weights, 0 + 1 + 1 for biases
    assert parameter_sharing_penalty([a, b, c]).item() == pytest.approx(12.0)
    pen = parameter_sharing_penalty([a, b])
    pen.backward()
    torch.testing.assert_close(a.weight.grad, torch.tensor([[-2.0, 2.0]]))  # d/dθ_a ||θ_a - θ_b||^2 / 2


def test_parameter_sharing_penalty_uses_only_matching_names_and_shapes():
    a = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.Linear(3, 1))
    b = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.Linear(3, 2))  # layer 1 differs in shape
    expected = sum(((pa - pb) ** 2).sum().item() / 2 for pa, pb in [(a[0].weight, b[0].weight), (a[0].bias, b[0].bias)])
    assert parameter_sharing_penalty([a, b]).item() == pytest.approx(expected, rel=1e-6)


def test_parameter_sharing_penalty_bad_input():
    with pytest.raises(ValueError, match="in common"):
        parameter_sharing_penalty([torch.nn.Linear(2, 1), torch.nn.Linear(3, 2)])
    with pytest.raises(ValueError, match="modules"):
        parameter_sharing_penalty([torch.nn.Linear(2, 1)])
