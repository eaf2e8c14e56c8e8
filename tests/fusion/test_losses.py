import numpy as np
import pytest
import torch

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


def _fit_linear_cox(X, time, event, ties):
    p = X.shape[1]
    w = torch.zeros(p, dtype=torch.float64, requires_grad=True)
    Xt, tt, et = torch.tensor(X), torch.tensor(time), torch.tensor(event)
    opt = torch.optim.LBFGS([w], max_iter=200, tolerance_grad=1e-12, tolerance_change=1e-14)

    def closure():
        opt.zero_grad()
        loss = cox_ph_loss(Xt @ w, tt, et, ties=ties)
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
