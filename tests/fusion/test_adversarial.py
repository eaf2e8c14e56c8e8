import math

import numpy as np
import pytest
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import cross_val_predict

from fusion.adversarial import ConfounderAdversary, adversary_inner_steps, dann_lambda, grad_reverse
from fusion.losses import cox_ph_loss


def test_gradient_reversal_is_identity_forward_and_negates_backward():
    x = torch.randn(4, 3, requires_grad=True)
    y = grad_reverse(x, 0.7)
    torch.testing.assert_close(y, x)
    (y * torch.arange(3.0)).sum().backward()
    torch.testing.assert_close(x.grad, -0.7 * torch.arange(3.0).expand(4, 3))


def test_dann_schedule_matches_ganin_et_al():
    assert dann_lambda(0.0) == 0.0
    assert dann_lambda(0.5) == pytest.approx(2 / (1 + math.exp(-5)) - 1)
    assert dann_lambda(1.0) == pytest.approx(0.99991, abs=1e-5)
    with pytest.raises(ValueError, match="progress"):
        dann_lambda(1.5)


def test_adversary_arguments_and_ignored_targets():
    with pytest.raises(ValueError, match="confounders\\['site'\\]"):
        ConfounderAdversary(8, {"site": 1})
    adv = ConfounderAdversary(8, {"site": 3, "age": 0})
    out = adv(torch.randn(5, 8))
    assert out["site"].shape == (5, 3) and out["age"].shape == (5,)
    loss = adv.loss(out, {"site": torch.tensor([0, 1, -1, 2, 0]), "age": torch.tensor([0.1, float("nan"), 0, 1, 2])})
    assert torch.isfinite(loss)


def _planted_site_task(seed=0):
    """Survival depends on s; site shifts a nuisance feature (a scanner artefact).  600 patients, all events."""
    rng = np.random.default_rng(seed)
    n = 600
    site = rng.integers(0, 2, n)
    s = rng.normal(size=n)
    X = np.c_[s + 0.3 * rng.normal(size=n), 2.0 * site + 0.3 * rng.normal(size=n), rng.normal(size=(n, 2))]
    t = rng.exponential(np.exp(-s))
    Xt, tt, et = torch.tensor(X, dtype=torch.float32), torch.tensor(t, dtype=torch.float32), torch.ones(n, dtype=torch.bool)
    return site, s, Xt, tt, et


def _train(adversarial: bool, seed=0):
    site, s, Xt, tt, et = _planted_site_task(seed)
    torch.manual_seed(seed)
    enc = torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.ReLU(), torch.nn.Linear(16, 8))
    head = torch.nn.Linear(8, 1)
    adv = ConfounderAdversary(8, {"site": 2}, hidden=0)
    opt = torch.optim.Adam([*enc.parameters(), *head.parameters(), *adv.parameters()], lr=1e-2)
    adv_opt = torch.optim.Adam(adv.parameters(), lr=1e-2)
    target = {"site": torch.tensor(site)}
    steps = 300
    for i in range(steps):
        adv.lambd = 3.0 * dann_lambda(i / (steps - 1)) if adversarial else 0.0
        z = enc(Xt)
        loss = cox_ph_loss(head(z).reshape(-1), tt, et)
        if adversarial:
            loss = loss + adv.loss(adv(z), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if adversarial:
            with torch.no_grad():
                z_now = enc(Xt)  # the updated encoder's embedding
            adversary_inner_steps(adv, adv_opt, z_now, target, 5)
    with torch.no_grad():
        z = enc(Xt).numpy()
        risk = head(enc(Xt)).reshape(-1).numpy()
    probe = cross_val_predict(LogisticRegression(max_iter=2000), z, site, cv=5, method="predict_proba")[:, 1]
    return roc_auc_score(site, probe), np.corrcoef(risk, s)[0, 1]


def test_gradient_reversal_removes_the_site_from_the_embedding(seed=0):
    # Measured over seeds 0-4: probe AUC 0.97-1.00 without the adversary, 0.54-0.70 with it.
    auc_plain, r_plain = _train(adversarial=False, seed=seed)
    auc_adv, r_adv = _train(adversarial=True, seed=seed)
    assert auc_plain > 0.95  # without the adversary the embedding keeps the site
    assert auc_adv < 0.75  # with it a linear probe can hardly tell the sites apart
    assert r_adv > 0.8 and r_plain > 0.8  # the survival signal is kept


# --------------------------------------------------------------------------- #
# closed-form mode: linear dependence (linear CKA) instead of a trained adversary
# --------------------------------------------------------------------------- #
from fusion.adversarial import linear_dependence  # noqa: E402


def _cka_gram(z, y):
    """Linear CKA from centred Gram matrices (Kornblith et al. 2019, eq. 3-5): an independent formula."""
    n = z.shape[0]
    h = np.eye(n) - 1.0 / n
    k, l_ = h @ (z @ z.T) @ h, h @ (y @ y.T) @ h
    return np.trace(k @ l_) / np.sqrt(np.trace(k @ k) * np.trace(l_ @ l_))


def test_linear_dependence_equals_gram_matrix_cka_and_squared_correlation():
    rng = np.random.default_rng(0)
    z = rng.normal(size=(40, 5))
    site = rng.integers(0, 3, 40)
    z[:, 1] += site  # a planted site shift
    got = float(linear_dependence(torch.tensor(z), torch.tensor(site), 3))
    assert got == pytest.approx(_cka_gram(z, np.eye(3)[site]), rel=1e-10)
    age = rng.normal(size=40)
    one = float(linear_dependence(torch.tensor(z[:, :1]), torch.tensor(age), 0))
    assert one == pytest.approx(np.corrcoef(z[:, 0], age)[0, 1] ** 2, rel=1e-10)  # D = 1: Pearson r^2
    # unknown categories and NaN values are left out; one group left -> None
    y = torch.tensor(np.where(np.arange(40) < 5, -1, site))
    assert float(linear_dependence(torch.tensor(z), y, 3)) == pytest.approx(
        _cka_gram(z[5:], np.eye(3)[site[5:]]), rel=1e-10)
    assert linear_dependence(torch.tensor(z), torch.zeros(40, dtype=torch.long), 2) is None
    assert linear_dependence(torch.tensor(z), torch.full((40,), float("nan")), 0) is None


def test_linear_dependence_is_zero_when_group_means_are_equal():
    rng = np.random.default_rng(1)
    site = np.repeat([0, 1], 30)
    z = rng.normal(size=(60, 4))
    z -= np.array([z[site == g].mean(0) for g in (0, 1)])[site]  # every group's mean is 0
    z[site == 1] *= 3.0  # a different spread is not a linear dependence
    assert float(linear_dependence(torch.tensor(z), torch.tensor(site), 2)) < 1e-20


def test_closed_form_mode_removes_the_site_from_the_embedding_and_keeps_the_signal():
    """As test_gradient_reversal_removes_the_site_from_the_embedding, with no adversary to train."""
    site, s, Xt, tt, et = _planted_site_task(0)
    target = {"site": torch.tensor(site)}

    def train(weight):
        torch.manual_seed(0)
        enc = torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.ReLU(), torch.nn.Linear(16, 8))
        head = torch.nn.Linear(8, 1)
        adv = ConfounderAdversary(8, {"site": 2}, mode="closed_form")
        opt = torch.optim.Adam([*enc.parameters(), *head.parameters()], lr=1e-2)
        for i in range(300):
            adv.lambd = 3.0 * dann_lambda(i / 299)
            z = enc(Xt)
            loss = cox_ph_loss(head(z).reshape(-1), tt, et) + weight * adv.encoder_loss(z, target)
            opt.zero_grad()
            loss.backward()
            opt.step()
        with torch.no_grad():
            z = enc(Xt).numpy()
            risk = head(enc(Xt)).reshape(-1).numpy()
        probe = cross_val_predict(LogisticRegression(max_iter=2000), z, site, cv=5, method="predict_proba")[:, 1]
        return roc_auc_score(site, probe), np.corrcoef(risk, s)[0, 1], np.corrcoef(risk, site)[0, 1]

    auc_plain, r_plain, _ = train(0.0)
    auc_cf, r_cf, site_corr = train(10.0)
    assert auc_plain > 0.95
    assert auc_cf < 0.65
    assert abs(site_corr) < 0.05  # the linear risk head cannot differ between the sites on average
    assert r_cf > 0.8 and r_plain > 0.8


def test_closed_form_encoder_loss_averages_the_embedding_and_risk_terms():
    rng = np.random.default_rng(2)
    z, r = torch.tensor(rng.normal(size=(30, 6))), torch.tensor(rng.normal(size=(30, 1)))
    site = torch.tensor(rng.integers(0, 3, 30))
    age = torch.tensor(rng.normal(size=30))
    adv = ConfounderAdversary(6, {"site": 3, "age": 0}, mode="closed_form")
    adv.lambd = 2.5
    targets = {"site": site, "age": age}
    parts = [linear_dependence(x, targets[n], k) for x in (z, r) for n, k in (("age", 0), ("site", 3))]
    torch.testing.assert_close(adv.encoder_loss(z, targets, risk=r), 2.5 * torch.stack(parts).mean())
    torch.testing.assert_close(adv.encoder_loss(z, targets), 2.5 * torch.stack(parts[:2]).mean())
    # no usable target in the batch: a zero that still carries a gradient graph
    empty = adv.encoder_loss(z.requires_grad_(), {"site": torch.full((30,), -1), "age": torch.full((30,), float("nan"))})
    assert float(empty.detach()) == 0.0 and empty.requires_grad
    with pytest.raises(ValueError, match="closed_form"):
        ConfounderAdversary(6, {"site": 3}, mode="best")
