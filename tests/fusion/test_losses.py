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


@pytest.mark.parametrize("ties", [False, True])
def test_cox_loss_matches_direct_formula(ties):
    rng = np.random.default_rng(1)
    n = 60
    time = rng.integers(1, 15, n).astype(float) if ties else rng.exponential(10, n)
    event = rng.random(n) < 0.6
    risk = rng.normal(size=n)
    got = cox_ph_loss(torch.tensor(risk), torch.tensor(time), torch.tensor(event)).item()
    assert got == pytest.approx(_breslow_nll(risk, time, event), rel=1e-9)


def test_cox_loss_without_events_is_zero_and_differentiable():
    risk = torch.randn(5, requires_grad=True)
    loss = cox_ph_loss(risk, torch.rand(5), torch.zeros(5, dtype=torch.bool))
    assert loss.item() == 0.0
    loss.backward()
    assert torch.isfinite(risk.grad).all()


def test_linear_cox_fit_matches_scikit_survival_breslow():
    """Minimising our loss over a linear predictor gives scikit-survival's Cox coefficients."""
    from sksurv.linear_model import CoxPHSurvivalAnalysis
    from sksurv.util import Surv

    rng = np.random.default_rng(0)
    n, p = 300, 3
    X = rng.normal(size=(n, p))
    beta = np.array([0.8, -0.5, 0.0])
    t = rng.exponential(np.exp(-X @ beta))
    c = rng.exponential(2.0, n)
    time, event = np.minimum(t, c), t <= c
    ref = CoxPHSurvivalAnalysis(ties="breslow").fit(X, Surv.from_arrays(event, time)).coef_

    w = torch.zeros(p, dtype=torch.float64, requires_grad=True)
    Xt, tt, et = torch.tensor(X), torch.tensor(time), torch.tensor(event)
    opt = torch.optim.LBFGS([w], max_iter=200, tolerance_grad=1e-12, tolerance_change=1e-14)

    def closure():
        opt.zero_grad()
        loss = cox_ph_loss(Xt @ w, tt, et)
        loss.backward()
        return loss

    opt.step(closure)
    np.testing.assert_allclose(w.detach().numpy(), ref, atol=1e-4)
