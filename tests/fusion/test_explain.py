"""Explanations: modality Shapley, feature SHAP, Grad-CAM, stability, OOD score, the patient report and CLI."""
from __future__ import annotations

import argparse
import copy
import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from torch import nn

from fusion import explain as X
from fusion.model import FusionModel


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """This module's toy models and tolerances were set with one intra-op thread; restored afterwards
    so the rest of the suite keeps the machine's thread count."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# --------------------------------------------------------------------------- #
# Hand-built toy models
# --------------------------------------------------------------------------- #
class _Scalar(nn.Module):
    """Encoder returning the first input column (out_dim 1)."""

    out_dim = 1

    def forward(self, x):
        return x[:, :1]


class _Linear(nn.Module):
    def __init__(self, w):
        super().__init__()
        self.lin = nn.Linear(len(w), 1, bias=False)
        with torch.no_grad():
            self.lin.weight.copy_(torch.tensor([w], dtype=torch.float32))
        self.out_dim = 1

    def forward(self, x):
        return self.lin(x)


class _Polynomial(nn.Module):
    """f = w_a e_a + w_b e_b + w_ab e_a e_b + 0 * e_c; an absent modality contributes e = 0."""

    def __init__(self, w_a, w_b, w_ab):
        super().__init__()
        self.w_a, self.w_b, self.w_ab = w_a, w_b, w_ab
        self.dummy = nn.Parameter(torch.zeros(1))

    def forward(self, emb, present):
        e = {m: emb[m] * present[m].to(emb[m].dtype).unsqueeze(1) for m in emb}
        f = self.w_a * e["a"] + self.w_b * e["b"] + self.w_ab * e["a"] * e["b"] + 0.0 * e["c"]
        return {"embedding": f + self.dummy}


class _Sum(nn.Module):
    def __init__(self):
        super().__init__()
        self.dummy = nn.Parameter(torch.zeros(1))

    def forward(self, emb, present):
        return {"embedding": sum(emb[m] * present[m].to(emb[m].dtype).unsqueeze(1) for m in sorted(emb))
                + self.dummy}


class _MeanInBox(nn.Module):
    """Image encoder whose output (and so the fused risk) is the mean of the fixed box [3:7]^3."""

    out_dim = 1

    def forward(self, x):
        return x[:, :, 3:7, 3:7, 3:7].mean(dim=(1, 2, 3, 4)).unsqueeze(1)


def _mean_in_box_model() -> FusionModel:
    return FusionModel({"ct": _MeanInBox()}, _Sum(), nn.Identity()).eval()


def _toy_batch(values: dict, present: dict) -> dict:
    mods = sorted(values)
    return {"modalities": mods, "present": torch.tensor([[present[m] for m in mods]]),
            **{m: torch.tensor([[float(values[m])]]) for m in mods}}


def test_exact_shapley_two_player_game():
    # v(0)=1, v(a)=3, v(b)=2, v(ab)=7: phi_a = ((3-1) + (7-2)) / 2, phi_b = ((2-1) + (7-3)) / 2
    phi = X.exact_shapley(np.array([1.0, 3.0, 2.0, 7.0]), 2)
    assert phi == pytest.approx([3.5, 2.5])
    with pytest.raises(ValueError, match="2\\*\\*n_players"):
        X.exact_shapley(np.zeros(3), 2)


def test_modality_shapley_hand_computed_symmetry_and_dummy():
    w_a, w_b, w_ab = 0.7, -0.4, 0.5
    model = FusionModel({"a": _Scalar(), "b": _Scalar(), "c": _Scalar()}, _Polynomial(w_a, w_b, w_ab), nn.Identity())
    ea, eb = 2.0, 3.0
    res = X.modality_shapley(model, _toy_batch({"a": ea, "b": eb, "c": 5.0}, {"a": True, "b": True, "c": True}))
    # by hand: the interaction is split equally, c is a dummy player
    assert res["values"]["a"] == pytest.approx(w_a * ea + w_ab * ea * eb / 2, abs=1e-6)
    assert res["values"]["b"] == pytest.approx(w_b * eb + w_ab * ea * eb / 2, abs=1e-6)
    assert res["values"]["c"] == pytest.approx(0.0, abs=1e-7)
    assert res["base_value"] == pytest.approx(0.0, abs=1e-7)
    assert res["full_value"] == pytest.approx(w_a * ea + w_b * eb + w_ab * ea * eb, abs=1e-5)
    assert res["efficiency_error"] < 1e-6 and res["absent"] == []
    # symmetry: interchangeable players get equal values
    sym = FusionModel({"a": _Scalar(), "b": _Scalar(), "c": _Scalar()}, _Polynomial(0.3, 0.3, 1.0), nn.Identity())
    res = X.modality_shapley(sym, _toy_batch({"a": 1.5, "b": 1.5, "c": -2.0}, {"a": True, "b": True, "c": True}))
    assert res["values"]["a"] == pytest.approx(res["values"]["b"], abs=1e-7)
    # an absent modality gets 0 and is listed; the others share v(P) - v(empty)
    res = X.modality_shapley(model, _toy_batch({"a": ea, "b": eb, "c": 5.0}, {"a": True, "b": False, "c": True}))
    assert res["absent"] == ["b"] and res["values"]["b"] == 0.0
    assert res["values"]["a"] == pytest.approx(w_a * ea, abs=1e-6)


class _Enc(nn.Module):
    def __init__(self, f, d):
        super().__init__()
        self.lin = nn.Linear(f, d)
        self.out_dim = d

    def forward(self, x):
        return torch.tanh(self.lin(x))


def _fusion_cases():
    from fusion.strategies import list_fusions

    cases = [(name, "cox") for name in list_fusions()]
    return cases + [("concat", "discrete_time"), ("gated_attention", "classification")]


@pytest.mark.parametrize("fusion_name,task", _fusion_cases())
def test_modality_shapley_and_cached_forward_for_every_fusion_and_task(fusion_name, task):
    """Every fusion handles an all-absent row; efficiency holds; the cached one-modality forward is exact."""
    from fusion.strategies import create_fusion

    torch.manual_seed(0)
    dims = {"clinical": 3, "ehr_like": 5, "omics": 6}
    encs = {m: _Enc(f, 4) for m, f in dims.items()}
    kw = {}
    n_out = 1
    if task == "discrete_time":
        kw, n_out = {"cuts": [0.0, 1.0, 2.0, 4.0]}, 3
    elif task == "classification":
        kw, n_out = {"classes": ["a", "b", "c"]}, 3
    model = FusionModel(encs, create_fusion(fusion_name, {m: 4 for m in dims}, 8), nn.Linear(8, n_out),
                        task=task, **kw).eval()
    mods = sorted(dims)
    rng = np.random.default_rng(0)
    batch = {"modalities": mods, "present": torch.tensor([[True, True, True]]),
             **{m: torch.tensor(rng.normal(size=(1, f)), dtype=torch.float32) for m, f in dims.items()}}
    res = X.modality_shapley(model, batch)
    assert res["efficiency_error"] < 1e-6 and math.isfinite(res["base_value"])
    g = X._ModalityRisk(model, batch, "omics")
    assert g.fast
    xs = rng.normal(size=(7, 6)).astype(np.float32)
    full = []
    for x in xs:
        b = dict(batch, omics=torch.from_numpy(x[None]))
        with torch.no_grad():
            full.append(float(model(b)["risk"][0]))
    assert g(xs) == pytest.approx(full, abs=1e-5)


# --------------------------------------------------------------------------- #
# Feature SHAP on a toy model with a planted feature
# --------------------------------------------------------------------------- #
def test_tabular_shap_planted_feature_and_additivity():
    rng = np.random.default_rng(0)
    f_dim, planted = 8, 3
    w = [0.0] * f_dim
    w[planted] = 1.5
    w[5] = 0.1  # a weak second feature
    model = FusionModel({"omics": _Linear(w), "clinical": _Linear([0.5, -0.2, 0.2])}, _Sum(), nn.Identity())
    background = rng.normal(size=(40, f_dim))
    names = [f"pathway_{j}" for j in range(f_dim)]
    for k in range(5):
        x = rng.normal(size=f_dim)
        x[planted] = rng.choice([-2.0, 2.0])
        batch = {"modalities": ["clinical", "omics"], "present": torch.tensor([[True, True]]),
                 "omics": torch.tensor(x[None], dtype=torch.float32),
                 "clinical": torch.tensor([[0.3, 1.0, 0.0]])}
        res = X.tabular_shap(model, batch, "omics", background=background, feature_names=names, nsamples=300, seed=k)
        assert res["items"][0]["feature"] == f"pathway_{planted}"
        total = sum(it["shap"] for it in res["items"])
        assert total + res["expected_value"] == pytest.approx(res["model_output"], abs=1e-5)
        # f(x) is the model's output for the patient; E is the mean over the background
        with torch.no_grad():
            assert res["model_output"] == pytest.approx(float(model(batch)["risk"][0]), abs=1e-5)
        # linear model, independent background: phi_j = w_j (x_j - mean_b x_j)
        phi = {it["feature"]: it["shap"] for it in res["items"]}
        assert phi[f"pathway_{planted}"] == pytest.approx(1.5 * (x[planted] - background[:, planted].mean()), abs=1e-4)
    # grouped players (one-hot columns switch together): one value per group, still additive
    res = X.tabular_shap(model, batch, "clinical", background=np.array([[0.0, 0.0, 1.0], [1.0, 1.0, 0.0]]),
                         feature_names=["age", "sex=F", "sex=M"], groups=[[0], [1, 2]], group_names=["age", "sex"])
    assert {it["group"] for it in res["items"]} == {"age", "sex"} and res["exact"]
    assert sum(it["shap"] for it in res["items"]) + res["expected_value"] == pytest.approx(res["model_output"], abs=1e-6)
    sex = next(it for it in res["items"] if it["group"] == "sex")
    # linear game: phi_sex = f_sex(x) - E_b f_sex(b) = -0.2 - (0.2 - 0.2) / 2
    assert sex["shap"] == pytest.approx(-0.2 - 0.0, abs=1e-6)


def test_global_importance_bootstrap_ci():
    per = {f"P-{i}": [{"feature": "a", "shap": 1.0 + 0.1 * i}, {"feature": "b", "shap": -0.1}] for i in range(10)}
    g = X.global_importance(per, n_boot=200, seed=0)
    assert [d["feature"] for d in g] == ["a", "b"]
    assert g[0]["ci_low"] <= g[0]["mean_abs_shap"] <= g[0]["ci_high"]
    assert g[1]["mean_abs_shap"] == pytest.approx(0.1) and g[1]["ci_low"] == pytest.approx(0.1)


def test_compact_ehr_drops_empty_steps_and_recomputes_delta():
    values = np.zeros((1, 4, 2), np.float32)
    mask = np.array([[[1, 0], [0, 1], [1, 0], [0, 0]]], np.float32)
    times = np.array([[0.0, 2.0, 5.0, 0.0]])
    out = X._compact_ehr(values, mask * np.array([1, 0])[None, None], times, np.array([3]))  # drop variable 1
    assert out["lengths"].tolist() == [2]
    assert out["times"][0, :2].tolist() == [0.0, 5.0]
    assert out["delta"][0, 1, 0] == pytest.approx(5.0)
    assert out["mask"][0, 2:].sum() == 0


# --------------------------------------------------------------------------- #
# Mahalanobis OOD
# --------------------------------------------------------------------------- #
def test_mahalanobis_ood_rates_and_distances():
    from scipy.spatial.distance import mahalanobis

    rng = np.random.default_rng(0)
    d = 6
    a = rng.normal(size=(d, d))
    cov = a @ a.T / d + np.eye(d)
    mean = rng.normal(size=d)
    train = rng.multivariate_normal(mean, cov, size=2000)
    ood = X.MahalanobisOOD().fit(train)
    fresh = rng.multivariate_normal(mean, cov, size=20000)
    rate = ood.flag(fresh).mean()
    assert 0.005 <= rate <= 0.02, rate
    # in-sample distances are optimistic: their 99th percentile is not above the cross-fitted one
    assert np.quantile(ood.train_distances_, 0.99) <= ood.threshold_ + 1e-9
    shifted = mean + 8.0 * np.sqrt(np.diag(cov))
    assert ood.flag(shifted)[0]
    vi = np.linalg.inv(ood.covariance_)
    for x in fresh[:5]:
        assert ood.distance(x)[0] == pytest.approx(mahalanobis(x, ood.location_, vi), rel=1e-8)
    with pytest.raises(ValueError, match="dimensions"):
        ood.distance(np.zeros(d + 1))
    # more dimensions than points: the shrunk covariance stays invertible
    small = X.MahalanobisOOD().fit(rng.normal(size=(20, 40)))
    assert np.isfinite(small.distance(rng.normal(size=(3, 40)))).all()


# --------------------------------------------------------------------------- #
# Grad-CAM
# --------------------------------------------------------------------------- #
def _blob_images(n, rng, size=12, radius=2.0):
    zz, yy, xx = np.meshgrid(*[np.arange(size)] * 3, indexing="ij")
    imgs = rng.normal(0, 0.3, (n, 1, size, size, size)).astype(np.float32)
    masks = np.zeros((n, size, size, size), bool)
    amp = rng.uniform(0.5, 2.0, n).astype(np.float32)
    for i in range(n):
        c = rng.uniform(3, size - 4, 3)
        m = (zz - c[0]) ** 2 + (yy - c[1]) ** 2 + (xx - c[2]) ** 2 <= radius ** 2
        masks[i] = m
        imgs[i, 0][m] += amp[i]
    return torch.from_numpy(imgs), masks, torch.from_numpy(amp)


def _image_batch(x):
    return {"modalities": ["ct"], "present": torch.ones(len(x), 1, dtype=torch.bool), "ct": x}


def test_grad_cam_localises_a_planted_blob():
    from encoders.image import SmallCNN3D
    from fusion.strategies import create_fusion

    rng = np.random.default_rng(0)
    torch.manual_seed(0)
    x, _, amp = _blob_images(192, rng)
    model = FusionModel({"ct": SmallCNN3D(3, 1, 8, channels=(4, 8))},
                        create_fusion("concat", {"ct": 8}, 8, dropout=0.0), nn.Linear(8, 1))
    opt = torch.optim.Adam(model.parameters(), 3e-3)
    for _ in range(120):  # risk = blob intensity
        idx = torch.from_numpy(rng.choice(len(x), 16, replace=False))
        loss = ((model(_image_batch(x[idx]))["risk"] - amp[idx]) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    xt, mt, _ = _blob_images(20, rng)
    hits, fracs, chance = [], [], []
    for i in range(len(xt)):
        h = X.grad_cam(model, _image_batch(xt[i:i + 1]), "ct")
        assert h.shape == (12, 12, 12) and np.isfinite(h).all() and h.min() >= 0.0 and h.max() <= 1.0
        loc = X.localisation(h, mt[i])
        hits.append(bool(loc["hit"]))
        fracs.append(loc["top10_fraction_in_lesion"] or 0.0)
        chance.append(loc["chance_fraction"])
    assert np.mean(hits) >= 0.7, hits
    assert np.mean(fracs) > 3 * np.mean(chance)
    hpp = X.grad_cam(model, _image_batch(xt[:1]), "ct", method="gradcampp")  # Grad-CAM++ variant
    assert hpp.shape == (12, 12, 12) and np.isfinite(hpp).all() and 0.0 <= hpp.min() <= hpp.max() <= 1.0
    # HiResCAM: relu(sum_c dRisk/dA_c * A_c) at the target layer, upsampled (trilinear) and min-max scaled
    hits_hr = []
    for i in range(len(xt)):
        hr = X.grad_cam(model, _image_batch(xt[i:i + 1]), "ct", method="hirescam")
        hits_hr.append(bool(X.localisation(hr, mt[i])["hit"]))
    assert np.mean(hits_hr) >= 0.7, hits_hr
    layer = X.gradcam_target_layer(model.encoders["ct"], xt[:1])
    acts = {}
    handle = model.encoders["ct"].get_submodule(layer).register_forward_hook(lambda mod, inp, out: acts.update(a=out))
    with torch.enable_grad():
        risk = model(_image_batch(xt[:1]))["risk"].sum()
        (g,) = torch.autograd.grad(risk, acts["a"])
    handle.remove()
    ref = torch.relu((g * acts["a"]).sum(1, keepdim=True))
    ref = torch.nn.functional.interpolate(ref, size=(12, 12, 12), mode="trilinear", align_corners=False)[0, 0]
    ref = ((ref - ref.min()) / (ref.max() - ref.min())).detach().numpy()
    np.testing.assert_allclose(X.grad_cam(model, _image_batch(xt[:1]), "ct", method="hirescam"), ref, atol=1e-5)
    # several layers and patients in one pass per patient: each map equals the hand-computed Grad-CAM
    # (relu(sum_c mean_xyz(dRisk/dA_c) * A_c), upsampled trilinearly, min-max scaled) of that layer
    stages = ["features.5", "features.12"]
    multi = X.grad_cam_layers(model, [_image_batch(xt[i:i + 1]) for i in range(3)], "ct", stages)
    assert len(multi) == 3 and all(list(d) == stages for d in multi)
    for i in range(3):
        for name in stages:
            acts = {}
            handle = model.encoders["ct"].get_submodule(name).register_forward_hook(
                lambda mod, inp, out: acts.update(a=out))
            with torch.enable_grad():
                (g,) = torch.autograd.grad(model(_image_batch(xt[i:i + 1]))["risk"].sum(), acts["a"])
            handle.remove()
            ref = torch.relu((g.mean(dim=(2, 3, 4), keepdim=True) * acts["a"]).sum(1, keepdim=True))
            ref = torch.nn.functional.interpolate(ref, size=(12, 12, 12), mode="trilinear", align_corners=False)[0, 0]
            ref = ((ref - ref.min()) / (ref.max() - ref.min())).detach().numpy()
            np.testing.assert_allclose(multi[i][name], ref, atol=1e-5)
    with pytest.raises(ValueError, match="gradcam, gradcampp, hirescam"):
        X.grad_cam(model, _image_batch(xt[:1]), "ct", method="cam")
    # integrated gradients on the same model: localises the blob, and completeness holds on this
    # non-linear network: the attributions sum to risk(x) - risk(median image)
    hits_ig = []
    for i in range(len(xt)):
        b = _image_batch(xt[i:i + 1])
        ig = X.integrated_gradients_map(model, b, "ct", steps=64, raw=True)
        with torch.no_grad():
            gap = float(model(b)["risk"]) - float(model(_image_batch(torch.full_like(xt[i:i + 1],
                                                                          float(xt[i].median()))))["risk"])
        assert ig.sum() == pytest.approx(gap, abs=0.02 * abs(gap) + 1e-4)
        hits_ig.append(bool(X.localisation(np.maximum(ig, 0), mt[i])["hit"]))
        if i == 0:
            disp = X.image_map(model, b, "ct", "integrated_gradients")
            assert disp.dtype == np.float32 and disp.min() >= 0.0 and disp.max() == pytest.approx(1.0)
    assert np.mean(hits_ig) >= 0.7, hits_ig
    # layer selection by the deletion test: risk = blob intensity, so deleting the blob lowers the risk and
    # the stage maps score > 0; the pooled 1x1x1 maps are constant (no voxel ranked) and score exactly 0
    sel_batches = [_image_batch(xt[i:i + 1]) for i in range(8)]
    cands = ["features.5", "features.12", "avg"]
    sel = X.select_cam_layer(model, sel_batches, "ct", candidates=cands)
    assert sel["candidates"] == cands and sel["n_patients"] == 8 and sel["method"] == "gradcam"
    for c in cands:  # the reported means are the per-patient deletion scores of each layer's map
        ref = np.mean([X.deletion_aopc(model, b, "ct", X.grad_cam(model, b, "ct", layer=c)) for b in sel_batches])
        assert sel["aopc"][c] == pytest.approx(ref, abs=1e-6)
    assert sel["aopc"]["avg"] == 0.0 and sel["layer"] != "avg" and sel["aopc"][sel["layer"]] > 0.0
    assert sel["layer"] == max(cands, key=sel["aopc"].get)
    chosen_hits = [bool(X.localisation(X.grad_cam(model, _image_batch(xt[i:i + 1]), "ct", layer=sel["layer"]),
                                       mt[i])["hit"]) for i in range(len(xt))]
    assert np.mean(chosen_hits) >= 0.7, chosen_hits
    # ties (both pooled maps constant) go to the deeper candidate; no usable patient -> the last candidate
    assert X.select_cam_layer(model, sel_batches[:2], "ct", candidates=["avg", "max"])["layer"] == "max"
    absent = dict(sel_batches[0], present=torch.zeros(1, 1, dtype=torch.bool))
    none = X.select_cam_layer(model, [absent], "ct", candidates=cands)
    assert none["layer"] == "avg" and none["n_patients"] == 0 and none["aopc"] == {}
    # the model is not modified by Grad-CAM (MONAI's hooks go on a copy)
    assert all(not m._forward_hooks and not m._backward_hooks for m in model.modules())


def test_gradcam_target_layer_per_encoder():
    from encoders.registry import create_encoder, get_encoder_entry

    cnn = create_encoder("cnn3d_small", 3, 1, 8, channels=(4, 8))
    # the activated map of the last stage: conv features.10 -> BatchNorm features.11 -> ReLU features.12
    assert X.gradcam_target_layer(cnn) == "features.12"
    assert isinstance(cnn.get_submodule("features.10"), torch.nn.Conv3d)
    assert isinstance(cnn.get_submodule("features.12"), torch.nn.ReLU)
    # a conv with nothing shape-preserving after it keeps the conv itself
    bare = torch.nn.Sequential(torch.nn.Conv3d(1, 2, 3, padding=1), torch.nn.Conv3d(2, 2, 3, padding=1),
                               torch.nn.MaxPool3d(2), torch.nn.ReLU())
    assert X.gradcam_target_layer(bare, torch.zeros(1, 1, 4, 4, 4)) == "1"
    assert X.gradcam_target_layer(create_encoder("resnet10", 3, 1, 8, widen_factor=0.125)) == "backbone.layer4"
    dn = get_encoder_entry("densenet121").cls
    assert X.gradcam_target_layer(create_encoder("densenet121", 3, 1, 8, **dn.example_kwargs)) == \
        "backbone.class_layers.relu"
    with pytest.raises(ValueError, match="3D convolutional"):
        X.gradcam_target_layer(create_encoder("slice2d", 3, 1, 8, **get_encoder_entry("slice2d").cls.example_kwargs))


def test_cam_layer_candidates_per_encoder():
    from encoders.registry import create_encoder, get_encoder_entry

    # cnn3d_small: the ReLU closing each stage (conv, norm, act, conv, norm, act, pool = 7 modules a stage)
    assert X.cam_layer_candidates(create_encoder("cnn3d_small", 3, 1, 8, channels=(4, 8))) == \
        ["features.5", "features.12"]
    cnn = create_encoder("cnn3d_small", 3, 1, 8, channels=(4, 8, 16))
    cands = X.cam_layer_candidates(cnn)
    assert cands == ["features.5", "features.12", "features.19"] and cands[-1] == X.gradcam_target_layer(cnn)
    assert all(isinstance(cnn.get_submodule(c), torch.nn.ReLU) for c in cands)
    assert X.cam_layer_candidates(create_encoder("resnet10", 3, 1, 8, widen_factor=0.125)) == \
        ["backbone.layer1", "backbone.layer2", "backbone.layer3", "backbone.layer4"]
    dn = get_encoder_entry("densenet121").cls
    assert X.cam_layer_candidates(create_encoder("densenet121", 3, 1, 8, **dn.example_kwargs)) == \
        ["backbone.class_layers.relu"]
    cnn.gradcam_layer = "features.12"
    assert X.cam_layer_candidates(cnn) == ["features.12"]
    with pytest.raises(ValueError, match="3D convolutional"):
        X.cam_layer_candidates(create_encoder("slice2d", 3, 1, 8, **get_encoder_entry("slice2d").cls.example_kwargs))


def test_deletion_aopc_hand_computed():
    """risk = mean of a fixed 4^3 box in a 12^3 image (1728 voxels): deleting the box's 64 voxels (set to the
    image median) lowers the risk by mean(box) - median; deleting its top half by half the box's excess."""

    model = _mean_in_box_model()
    torch.manual_seed(3)
    x = torch.rand(1, 1, 12, 12, 12)
    x[:, :, 3:7, 3:7, 3:7] += 2.0
    b = _image_batch(x)
    med = float(x.median())
    heat = np.zeros((12, 12, 12))
    heat[3:7, 3:7, 3:7] = 1.0
    heat[3:5, 3:7, 3:7] += 1.0  # the box's first two slices rank first
    whole = float(x[:, :, 3:7, 3:7, 3:7].mean()) - med
    assert X.deletion_aopc(model, b, "ct", heat, fractions=(64 / 1728, 0.2)) == pytest.approx(whole, rel=1e-5)
    half = (float(x[:, :, 3:5, 3:7, 3:7].sum()) - 32 * med) / 64
    assert X.deletion_aopc(model, b, "ct", heat, fractions=(32 / 1728,)) == pytest.approx(half, rel=1e-5)
    assert X.deletion_aopc(model, b, "ct", heat, fractions=(32 / 1728, 64 / 1728)) == \
        pytest.approx((half + whole) / 2, rel=1e-5)
    far = np.zeros((12, 12, 12))
    far[8:, 8:, 8:] = 1.0  # points away from what the model reads
    assert X.deletion_aopc(model, b, "ct", far, fractions=(64 / 1728,)) == pytest.approx(0.0, abs=1e-6)
    assert X.deletion_aopc(model, b, "ct", np.zeros((12, 12, 12))) == 0.0  # ranks nothing
    assert X.deletion_aopc(model, b, "ct", heat) > 0.0  # default fractions
    with pytest.raises(ValueError, match="heatmap shape"):
        X.deletion_aopc(model, b, "ct", np.zeros((4, 4, 4)))
    with pytest.raises(ValueError, match="fractions"):
        X.deletion_aopc(model, b, "ct", heat, fractions=(0.0,))
    with pytest.raises(ValueError, match="no 'ct' image"):
        X.deletion_aopc(model, dict(b, present=torch.zeros(1, 1, dtype=torch.bool)), "ct", heat)


def test_grad_cam_on_a_resnet_encoder_and_localisation_edge_cases():
    from encoders.registry import create_encoder
    from fusion.strategies import create_fusion

    torch.manual_seed(0)
    enc = create_encoder("resnet10", 3, 1, 8, widen_factor=0.125, no_max_pool=True, first_stride=1)
    model = FusionModel({"ct": enc}, create_fusion("concat", {"ct": 8}, 8), nn.Linear(8, 1)).eval()
    h = X.grad_cam(model, _image_batch(torch.randn(1, 1, 16, 16, 16)), "ct")
    assert h.shape == (16, 16, 16) and np.isfinite(h).all() and 0.0 <= h.min() <= h.max() <= 1.0
    roi = np.zeros((4, 4, 4), bool)
    assert X.localisation(np.random.rand(4, 4, 4), roi)["hit"] is None  # no lesion mask
    roi[1:3, 1:3, 1:3] = True
    assert X.localisation(np.zeros((4, 4, 4)), roi)["top10_fraction_in_lesion"] is None  # constant map
    heat = np.zeros((4, 4, 4))
    heat[1:3, 1:3, 1:3] = 1.0
    loc = X.localisation(heat, roi)
    assert loc["top10_fraction_in_lesion"] == 1.0 and loc["hit"] and loc["chance_fraction"] == 8 / 64
    # top 10% = ceil(6.4) = 7 voxels, all in the 8-voxel lesion; the peak (first in voxel order) is in it
    assert loc["lesion_in_top"] == 7 / 8 and loc["peak_hit"]
    # a centred ring around a lesion: the centre of mass is in the lesion, the top voxels and the peak are not
    big = np.zeros((9, 9, 9), bool)
    big[4, 4, 4] = True
    r = np.sqrt(((np.indices((9, 9, 9)) - 4.0) ** 2).sum(axis=0))
    ring = -np.abs(r - 2.5)  # a shell of radius 2.5 voxels around the one-voxel lesion
    ring_loc = X.localisation(ring, big)
    assert ring_loc["hit"] and ring_loc["lesion_in_top"] == 0.0 and not ring_loc["peak_hit"]


def test_save_heatmap_nifti(tmp_path):
    import SimpleITK as sitk

    h = np.random.default_rng(0).random((5, 6, 7)).astype(np.float32)
    p = X.save_heatmap_nifti(h, tmp_path / "h.nii.gz", spacing=(2.0, 2.5, 3.0))
    img = sitk.ReadImage(str(p))
    assert img.GetSize() == (7, 6, 5) and img.GetSpacing() == pytest.approx((2.0, 2.5, 3.0))
    assert np.allclose(sitk.GetArrayFromImage(img), h)


# --------------------------------------------------------------------------- #
# A real (small) trained run
# --------------------------------------------------------------------------- #
def _small_config(cohort: Path, tmp: Path) -> Path:
    from fusion.config import default_config_dir

    cfg = yaml.safe_load((default_config_dir() / "demo.yaml").read_text())
    cfg["data"]["root"] = str(cohort)
    cfg["training"].update(epochs=3, patience=3, batch_size=16, num_threads=1)
    for m in ("ct", "pet", "mri"):
        cfg["modalities"][m]["preprocessing"]["size"] = [16, 16, 16]
        cfg["modalities"][m]["encoder_kwargs"] = {"channels": [4, 8]}
    cfg["evaluation"]["ablation"] = False
    p = tmp / "cfg.yaml"
    p.write_text(yaml.safe_dump(cfg))
    return p


@pytest.fixture(scope="module")
def small_run(tmp_path_factory):
    from apps.cli import main

    tmp = tmp_path_factory.mktemp("explain")
    cohort = tmp / "cohort"
    assert main(["-q", "make-demo-cohort", "--out", str(cohort), "--patients", "48", "--sites", "3", "--seed", "1",
                 "--workers", "1"]) == 0
    run = tmp / "run"
    assert main(["-q", "train", "--config", str(_small_config(cohort, tmp)), "--out", str(run)]) == 0
    return cohort, run


@pytest.fixture(scope="module")
def trained(small_run):
    from fusion.experiment import load_trained_fold

    return load_trained_fold(small_run[1], ablation=False)


def _test_batches(tf, n=4):
    from fusion.data import take

    return [take(tf.tensors["test"], [r]) for r in range(min(n, len(tf.splits["test"])))]


@pytest.mark.slow
def test_modality_shapley_efficiency_on_a_trained_run(trained):
    model = trained.models["fused"]
    for b in _test_batches(trained, 6):
        res = X.modality_shapley(model, b)
        assert res["efficiency_error"] < 1e-5
        with torch.no_grad():
            assert res["full_value"] == pytest.approx(float(model(b)["risk"][0]), abs=1e-5)
        assert all(res["values"][m] == 0.0 for m in res["absent"])
        assert math.isfinite(res["base_value"])  # every modality absent: the fusion's missing tokens
        assert res["subset_values"]["(none)"] == res["base_value"]


@pytest.mark.slow
def test_modality_the_model_cannot_use_gets_zero(trained):
    model = copy.deepcopy(trained.models["fused"])
    fusion = model.fusion
    assert trained.cfg.fusion.name == "concat"
    start = 0
    for m in fusion.modalities:  # the concat projection reads modalities in sorted order
        if m == "pet":
            with torch.no_grad():
                fusion.proj[0].weight[:, start:start + fusion.modality_to_dim[m]] = 0.0
        start += fusion.modality_to_dim[m]
    seen_other = 0.0
    for b in _test_batches(trained, 6):
        res = X.modality_shapley(model, b)
        assert abs(res["values"]["pet"]) < 1e-6
        seen_other = max(seen_other, max(abs(v) for k, v in res["values"].items() if k != "pet"))
    assert seen_other > 1e-4


@pytest.mark.slow
def test_feature_shap_additivity_on_a_trained_run(trained):
    rows = trained.splits["test"][:2]
    for m in ("omics", "clinical", "ehr"):
        res = X.feature_shap(trained, rows, modality=m, background_size=20, n_boot=100)
        assert res["patients"] or res["absent"]
        for p, r in res["patients"].items():
            assert p.startswith("P-")
            total = sum(it["shap"] for it in r["items"])
            assert total + r["expected_value"] == pytest.approx(r["model_output"], abs=1e-4)
            shaps = [abs(it["shap"]) for it in r["items"]]
            assert shaps == sorted(shaps, reverse=True)
        for g in res["global"]:
            assert g["ci_low"] - 1e-12 <= g["mean_abs_shap"] <= g["ci_high"] + 1e-12
    clin = X.feature_shap(trained, rows[:1], modality="clinical", n_boot=10)
    feats = {it["group"] for r in clin["patients"].values() for it in r["items"]}
    assert feats == {"age", "sex", "stage"}  # one-hot columns explained as one covariate


@pytest.mark.slow
def test_grad_cam_on_a_trained_run(trained):
    model = trained.models["fused"]
    non_constant = 0
    for b in _test_batches(trained, 4):
        for m in ("ct", "pet", "mri"):
            if not X._present_of(b, m):
                continue
            h = X.grad_cam(model, b, m)
            assert h.shape == (16, 16, 16) and h.dtype == np.float32
            assert np.isfinite(h).all() and h.min() >= 0.0 and h.max() <= 1.0
            non_constant += int(h.max() > h.min())
    assert non_constant > 0


def test_fold_cam_layers_on_a_trained_run_is_cached_by_checkpoint(trained, monkeypatch):
    sel = X.fold_cam_layers(trained, method="gradcam", max_patients=6, cache=False)
    model = trained.models["fused"]
    assert set(sel) == {m for m in ("ct", "pet", "mri") if m in model.encoders}
    for m, v in sel.items():
        assert v["candidates"] == X.cam_layer_candidates(model.encoders[m]) == ["features.5", "features.12"]
        assert v["layer"] in v["candidates"] and 0 < v["n_patients"] <= 6 and v["split"] in ("validation", "train")
        assert set(v["aopc"]) == set(v["candidates"]) and v["layer"] == max(reversed(v["candidates"]),
                                                                            key=v["aopc"].get)
    path = trained.folder / X.CAM_LAYERS_FILE
    path.unlink(missing_ok=True)
    first = X.fold_cam_layers(trained, method="gradcam", max_patients=6)
    assert first == sel  # deterministic
    stored = json.loads(path.read_text())
    assert stored["methods"]["gradcam"] == first and len(stored["checkpoint_sha256"]) == 64

    def boom(*a, **k):
        raise AssertionError("scored again")

    monkeypatch.setattr(X, "select_cam_layer", boom)
    assert X.fold_cam_layers(trained, method="gradcam", max_patients=6) == first  # read from the cache
    with pytest.raises(AssertionError, match="scored again"):  # another method is not in the cache
        X.fold_cam_layers(trained, method="hirescam", max_patients=6)
    stored["checkpoint_sha256"] = "0" * 64  # a retrained fold (another checkpoint) is scored again
    path.write_text(json.dumps(stored))
    with pytest.raises(AssertionError, match="scored again"):
        X.fold_cam_layers(trained, method="gradcam", max_patients=6)
    monkeypatch.undo()
    path.unlink()
    with pytest.raises(ValueError, match="gradcam, gradcampp, hirescam"):
        X.fold_cam_layers(trained, method="integrated_gradients")


_SCHEMA = {"patient", "fold", "split", "site", "risk", "risk_group", "risk_percentile", "survival_curve", "ood",
           "modality_shapley", "feature_shap", "gradcam", "stability", "pathway_scores",
           "pathway_scores_cohort_percentile"}


@pytest.mark.slow
def test_cli_explain_writes_report_without_phi(small_run, trained, capsys, demo_phi):
    from apps.explain import add_parser, cmd_explain

    cohort, run = small_run
    preds = pd.read_csv(run / "predictions.csv")
    row = preds[preds["split"] == "test"].iloc[0]
    pseudo = row["patient"]
    # the command is registered with the arguments of the brief
    parser = argparse.ArgumentParser(prog="radfusion")
    add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["explain", "--run", str(run), "--patient", pseudo, "--repeats", "2", "--cam", "hirescam"])
    args.quiet = True
    assert args.func is cmd_explain and args.out is None
    assert cmd_explain(args) == 0
    out_txt = capsys.readouterr().out
    assert pseudo in out_txt and "out-of-distribution" in out_txt and "modalities by |Shapley value|" in out_txt

    out = run / "explanations" / pseudo
    res = json.loads((out / "explanation.json").read_text())
    assert _SCHEMA <= set(res)
    assert res["patient"] == pseudo and res["split"] == "test" and res["fold"] == run.name
    assert res["risk"] == pytest.approx(row["risk"], abs=1e-4) and res["risk_group"] == row["risk_group"]
    assert 0.0 <= res["risk_percentile"] <= 100.0 and res["site"] == row["site"]
    s = np.array(res["survival_curve"]["survival"])
    assert len(s) == len(res["survival_curve"]["time"]) and (np.diff(s) <= 1e-12).all() and s[0] <= 1.0
    assert set(res["ood"]) >= {"distance", "threshold", "flag"} and isinstance(res["ood"]["flag"], bool)
    if "ood_distance" in preds.columns:  # the run's own detector gives the same distance and flag
        assert res["ood"]["distance"] == pytest.approx(row["ood_distance"], abs=1e-3)
        assert res["ood"]["flag"] == bool(row["ood_flag"])
    ms = res["modality_shapley"]
    assert set(ms) >= {"values", "base_value", "full_value", "efficiency_error", "absent"}
    assert ms["efficiency_error"] < 1e-5
    for m, items in res["feature_shap"].items():
        assert m in ("omics", "clinical", "ehr") and items
        assert all(set(it) == {"feature", "value", "shap"} for it in items)
        assert (out / f"shap_{m}.png").is_file()
    assert res["gradcam"]
    cached = json.loads((run / X.CAM_LAYERS_FILE).read_text())["methods"]["hirescam"]
    for m, g in res["gradcam"].items():
        assert set(g) >= {"npy", "png", "top10_fraction_in_lesion", "hit", "method"} and g["method"] == "hirescam"
        # the target layer was chosen by the deletion test on the fold's patients (--cam-layer auto)
        assert g["layer"] == g["layer_selection"]["layer"] == cached[m]["layer"]
        assert g["layer_selection"]["split"] == "validation"
        rel = g["roi_reliance"]  # the lesion-replacement check: deltas that reproduce from the risk
        assert set(rel) == {"risk", "delta_roi", "delta_outside", "reads_roi"}
        assert rel["risk"] == pytest.approx(res["risk"], abs=1e-4)
        assert rel["reads_roi"] == (abs(rel["delta_roi"]) > abs(rel["delta_outside"]))
        heat = np.load(out / g["npy"])
        assert heat.dtype == np.float16 and heat.shape == (16, 16, 16)
        assert (out / g["png"]).is_file()
    # the NIfTI heatmaps lie where the crop lies in the scan: the original ROI resampled by SimpleITK onto
    # the heatmap's grid is the ROI the model saw
    import SimpleITK as sitk
    from data_adapters.privacy import pseudonymise

    man = pd.read_csv(cohort / "manifest.csv")
    prow = man[[pseudonymise(p) == pseudo for p in man["patient_id"]]].iloc[0]
    checked = 0
    for m, g in res["gradcam"].items():
        nii = sitk.ReadImage(str(out / g["nifti"]))
        heat = np.load(out / g["npy"]).astype(np.float32)
        np.testing.assert_allclose(sitk.GetArrayFromImage(nii), heat, atol=1e-3)
        assert nii.GetOrigin() != (0.0, 0.0, 0.0)
        mask = sitk.ReadImage(str(cohort / prow[f"{m}_mask"]))
        # the mask is drawn on the CT; for PET and MR the adapter first puts it on that scan's own grid
        reader = sitk.ImageSeriesReader()
        reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(cohort / prow[m])))
        scan = reader.Execute()
        mask = sitk.Resample(mask, scan, sitk.Transform(), sitk.sitkNearestNeighbor, 0)
        on_grid = sitk.GetArrayFromImage(sitk.Resample(mask, nii, sitk.Transform(), sitk.sitkNearestNeighbor, 0))
        seen = trained.cohort.rois[m][trained.cohort.pseudonyms.index(pseudo)]
        ref = on_grid > 0
        dice = 2.0 * (ref & seen).sum() / (ref.sum() + seen.sum())
        shift = np.abs(np.argwhere(ref).mean(0) - np.argwhere(seen).mean(0))
        assert seen.any() and dice > 0.99 and (shift < 0.1).all(), (m, dice, shift)
        checked += 1
    assert checked
    st = res["stability"]
    assert st["n_repeats"] == 2 and set(st) >= {"modality_shapley", "feature_shap", "gradcam"}
    for k in ("modality_shapley", "feature_shap", "gradcam"):
        assert st[k] is None or -1.0 <= st[k] <= 1.0
    if "omics" not in ms["absent"]:
        assert res["pathway_scores"] and set(res["pathway_scores"]) == set(res["pathway_scores_cohort_percentile"])
    assert (out / "modality_shapley.png").is_file()

    # no manifest patient_id or DICOM PHI in anything written
    phi = demo_phi(cohort) | set(pd.read_csv(cohort / "manifest.csv")["patient_id"])
    assert len(phi) > 48
    leaks = [(f.name, v) for f in out.rglob("*") if f.is_file() for v in phi if v.encode() in f.read_bytes()]
    assert not leaks, leaks[:5]


@pytest.mark.slow
def test_cli_explain_bad_input(small_run, tmp_path, capsys):
    from apps.explain import cmd_explain

    _, run = small_run
    ns = argparse.Namespace(run=str(run), patient="DEMO-0001", out=None, repeats=2, seed=0, quiet=True)
    assert cmd_explain(ns) == 2
    err = capsys.readouterr().err
    assert "DEMO-0001" in err and "predictions.csv" in err and "P-" in err
    pseudo = pd.read_csv(run / "predictions.csv")["patient"].iloc[0]
    ns = argparse.Namespace(run=str(run), patient=pseudo, out=str(tmp_path / "x"), repeats=0, seed=0, quiet=True,
                            cam="gradcam", cam_layer="features.99")
    assert cmd_explain(ns) == 2
    err = capsys.readouterr().err
    assert "--cam-layer" in err and "features.99" in err and "features.5, features.12" in err
    ns = argparse.Namespace(run=str(tmp_path / "nope"), patient="P-0000", out=None, repeats=2, seed=0, quiet=True)
    assert cmd_explain(ns) == 2
    assert "does not exist" in capsys.readouterr().err
    empty = tmp_path / "empty"
    empty.mkdir()
    ns = argparse.Namespace(run=str(empty), patient="P-0000", out=None, repeats=2, seed=0, quiet=True)
    assert cmd_explain(ns) == 2
    assert "not a run folder" in capsys.readouterr().err


@pytest.mark.slow
def test_explanation_stability_and_unknown_patient(trained):
    pseudo = trained.cohort.pseudonyms[trained.splits["test"][0]]
    st = X.explanation_stability(trained, pseudo, n_repeats=2, background_size=10, nsamples=200)
    assert st["n_repeats"] == 2
    for k in ("modality_shapley", "feature_shap", "gradcam"):
        assert st[k] is None or -1.0 <= st[k] <= 1.0
    # tiny input noise: the heatmaps and the exactly enumerated EHR game (<= 10 players) barely move
    assert st["gradcam"] is None or st["gradcam"] > 0.5, st
    r = st["per_modality"]["feature_shap"].get("ehr")
    assert r is None or r > 0.5, st
    with pytest.raises(X.UnknownPatientError):
        X.explanation_stability(trained, "P-unknown", n_repeats=2)
    with pytest.raises(ValueError, match="n_repeats"):
        X.explanation_stability(trained, pseudo, n_repeats=1)


def test_occlusion_map_hand_computed_and_planted_blob():
    """MONAI occlusion sensitivity through the fused model, on a model whose risk reads one box of the image."""
    torch.manual_seed(0)

    class MeanInBox(nn.Module):  # risk = mean intensity of a fixed box: only that box matters
        out_dim = 1

        def forward(self, x):
            return x[:, :, 2:6, 2:6, 2:6].mean(dim=(1, 2, 3, 4)).unsqueeze(1)

    model = FusionModel({"ct": MeanInBox()}, _Sum(), nn.Identity()).eval()
    x = 0.1 * torch.rand(1, 1, 12, 12, 12) + 1.0
    x[:, :, 2:6, 2:6, 2:6] += 1.0  # the box is brighter than the image mean
    b = _image_batch(x)
    risk = float(model(b)["risk"])
    occ = X.occlusion_map(model, b, "ct", mask_size=4, overlap=0.5)
    assert occ.shape == (12, 12, 12)
    inside = np.zeros((12, 12, 12), dtype=bool)
    inside[2:6, 2:6, 2:6] = True
    far = np.zeros_like(inside)
    far[8:, 8:, 8:] = True
    assert np.abs(occ[far]).max() < 1e-6  # cubes that never touch the box change nothing
    # every cube overlapping the (bright) box lowers the risk
    assert (occ[inside] > 0).all()
    assert X.localisation(occ, inside)["hit"] and np.unravel_index(np.argmax(occ), occ.shape) in set(
        map(tuple, np.argwhere(inside)))
    # the cube that covers the box exactly, filled with the image mean, by hand
    y = x.clone()
    y[:, :, 2:6, 2:6, 2:6] = x.mean()
    drop = risk - float(model(_image_batch(y))["risk"])
    assert drop == pytest.approx(float(x[:, :, 2:6, 2:6, 2:6].mean() - x.mean()), rel=1e-5)
    assert occ.max() <= drop + 1e-5  # no voxel's mean drop exceeds the full-box drop
    with pytest.raises(ValueError, match="no 'pet' encoder"):
        X.occlusion_map(model, b, "pet")


def test_integrated_gradients_hand_computed():
    """f(x) = sum over a box of w x^2: the path integrand is linear in the path parameter, so the midpoint
    rule is exact and IG_v = w (x_v^2 - c^2) inside the box, 0 outside, with c the baseline value."""

    class SquaresInBox(nn.Module):
        out_dim = 1

        def forward(self, x):
            return (0.5 * x[:, :, 2:6, 2:6, 2:6] ** 2).sum(dim=(1, 2, 3, 4)).unsqueeze(1)

    model = FusionModel({"ct": SquaresInBox()}, _Sum(), nn.Identity()).eval()
    torch.manual_seed(1)
    x = torch.rand(1, 1, 10, 10, 10) + 0.5
    x[:, :, 2:6, 2:6, 2:6] += 2.0
    b = _image_batch(x)
    box = np.zeros((10, 10, 10), dtype=bool)
    box[2:6, 2:6, 2:6] = True
    xn = x[0, 0].numpy().astype(np.float64)
    for baseline, c in (("median", float(x.median())), ("zero", 0.0), (0.25, 0.25)):
        ig = X.integrated_gradients_map(model, b, "ct", baseline=baseline, steps=3, n_batch=2, raw=True)
        expected = np.where(box, 0.5 * (xn ** 2 - c ** 2), 0.0)
        np.testing.assert_allclose(ig, expected, rtol=1e-5, atol=1e-6)
    disp = X.integrated_gradients_map(model, b, "ct")
    assert disp[~box].max() == 0.0 and disp.max() == pytest.approx(1.0)  # positive part, scaled
    # a constant image has nothing to attribute: zeros, not NaN
    flat = X.integrated_gradients_map(model, _image_batch(torch.ones(1, 1, 10, 10, 10)), "ct")
    assert not flat.any()
    with pytest.raises(ValueError, match="baseline"):
        X.integrated_gradients_map(model, b, "ct", baseline="mean")
    with pytest.raises(ValueError, match="steps"):
        X.integrated_gradients_map(model, b, "ct", steps=0)
    with pytest.raises(ValueError, match="no 'pet' encoder"):
        X.integrated_gradients_map(model, b, "pet")
    with pytest.raises(ValueError, match="integrated_gradients"):
        X._Context.__init__(object.__new__(X._Context), None, "P-x", background_size=1, seed=0, cam_method="ig")


def test_roi_reliance_hand_computed():
    """risk = mean of a fixed box: replacing the box by the image median changes the risk by
    mean(box) - median; replacing everything else changes nothing, so the model 'reads' an ROI there."""

    model = _mean_in_box_model()
    torch.manual_seed(2)
    x = torch.rand(1, 1, 12, 12, 12)
    x[:, :, 3:7, 3:7, 3:7] += 3.0
    b = _image_batch(x)
    roi = np.zeros((12, 12, 12), dtype=bool)
    roi[3:7, 3:7, 3:7] = True
    out = X.roi_reliance(model, b, "ct", roi, dilate=0)
    assert out["delta_roi"] == pytest.approx(float(x[:, :, 3:7, 3:7, 3:7].mean() - x.median()), rel=1e-5)
    assert out["delta_outside"] == pytest.approx(0.0, abs=1e-6) and out["reads_roi"]
    core = np.zeros_like(roi)
    core[5, 5, 5] = True  # dilated by 2 voxels (6-connected) the core covers part of the box only
    part = X.roi_reliance(model, b, "ct", core, dilate=2)
    assert 0.0 < part["delta_roi"] < out["delta_roi"] and part["delta_outside"] > 0.0
    # the risk is linear in the box: the two partial replacements add up to the whole box's
    assert part["delta_roi"] + part["delta_outside"] == pytest.approx(out["delta_roi"], rel=1e-5)
    far = np.zeros_like(roi)
    far[9:, 9:, 9:] = True  # an ROI away from the box: the model reads the rest of the image
    out = X.roi_reliance(model, b, "ct", far, dilate=0)
    assert out["delta_roi"] == pytest.approx(0.0, abs=1e-6) and not out["reads_roi"]
    with pytest.raises(ValueError, match="roi shape"):
        X.roi_reliance(model, b, "ct", np.ones((4, 4, 4), bool))
    with pytest.raises(ValueError, match="empty"):
        X.roi_reliance(model, b, "ct", np.zeros((12, 12, 12), bool))
