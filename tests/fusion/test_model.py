import pytest
import torch

from encoders.registry import create_encoder
from fusion.model import FusionModel
from fusion.strategies import create_fusion


def _model():
    torch.manual_seed(0)
    enc = {"ct": create_encoder("cnn3d_small", 3, 1, 8, channels=(4, 8)), "clinical": create_encoder("mlp", 3, 4)}
    fusion = create_fusion("concat", {"ct": 8, "clinical": 4}, 16, dropout=0.0)
    return FusionModel(enc, fusion, torch.nn.Linear(16, 1)).eval()


def _batch(b=4):
    g = torch.Generator().manual_seed(1)
    return {
        "modalities": ["clinical", "ct"],
        "present": torch.tensor([[True, True], [True, False], [True, True], [True, False]])[:b],
        "ct": torch.randn(b, 1, 8, 8, 8, generator=g),
        "clinical": torch.randn(b, 3, generator=g),
        "time": torch.rand(b, generator=g) + 0.1,
        "event": torch.tensor([True, False, True, True])[:b],
    }


def test_output_contract():
    out = _model()(_batch())
    assert out["risk"].shape == (4,)
    assert out["embedding"].shape == (4, 16)
    assert set(out["modality_embeddings"]) == {"clinical", "ct"}
    assert torch.isfinite(out["loss"])


def test_absent_modality_content_is_ignored():
    m, b = _model(), _batch()
    r1 = m(b)["risk"]
    b2 = dict(b)
    b2["ct"] = b["ct"].clone()
    b2["ct"][1] = 1e3  # patient 1 has no CT: whatever sits there must not matter
    r2 = m(b2)["risk"]
    torch.testing.assert_close(r1, r2)
    # but a present CT does matter
    b3 = dict(b)
    b3["ct"] = b["ct"].clone()
    b3["ct"][0] += 5.0
    assert not torch.allclose(m(b3)["risk"][0], r1[0])


def test_patient_output_does_not_depend_on_batch_mates():
    m, b = _model(), _batch()
    full = m(b)["risk"]
    for i in range(4):
        single = {k: (v[i:i + 1] if isinstance(v, torch.Tensor) else v) for k, v in b.items()}
        torch.testing.assert_close(m(single)["risk"], full[i:i + 1], atol=1e-5, rtol=1e-5)


def test_unknown_fusion_lists_valid_names():
    from fusion.strategies import list_fusions

    with pytest.raises(ValueError) as e:
        create_fusion("kronecker9", {"a": 2}, 4)
    assert all(n in str(e.value) for n in list_fusions())


def test_adversary_outputs_and_loss():
    from fusion.adversarial import ConfounderAdversary

    torch.manual_seed(0)
    enc = {"clinical": create_encoder("mlp", 3, 4)}
    fusion = create_fusion("concat", {"clinical": 4}, 8, dropout=0.0)
    adv = ConfounderAdversary(8, {"site": 3, "age": 0})
    m = FusionModel(enc, fusion, torch.nn.Linear(8, 1), adversary=adv, adversary_weight=0.5)
    b = _batch()
    b["modalities"], b["present"] = ["clinical"], b["present"][:, :1]
    b["confounders"] = {"site": torch.tensor([0, 1, 2, 1]), "age": torch.randn(4)}
    out = m(b)
    assert out["confounder_logits"]["site"].shape == (4, 3)
    torch.testing.assert_close(out["loss"], out["loss_cox"] + 0.5 * out["loss_adv"])


def test_adversary_reading_the_modality_embeddings_reaches_each_encoder():
    """``adversary.input: fused_and_modalities``: the adversary reads [fused, every modality embedding], so its
    confusion loss gives gradients to an encoder through that encoder's own embedding too."""
    from fusion.adversarial import ConfounderAdversary

    torch.manual_seed(0)
    enc = {"clinical": create_encoder("mlp", 3, 4), "omics": create_encoder("mlp", 5, 6)}
    fusion = create_fusion("concat", {"clinical": 4, "omics": 6}, 8, dropout=0.0)
    b = {"modalities": ["clinical", "omics"], "present": torch.tensor([[True, True], [True, False]] * 2),
         "clinical": torch.randn(4, 3), "omics": torch.randn(4, 5), "time": torch.rand(4) + 0.1,
         "event": torch.tensor([True, False, True, True]), "confounders": {"site": torch.tensor([0, 1, 0, 1])}}
    grads = {}
    for where in ("fused", "fused_and_modalities"):
        torch.manual_seed(1)
        adv = ConfounderAdversary(8 + (10 if where != "fused" else 0), {"site": 2}, hidden=0)
        adv.lambd = 1.0  # the DANN schedule sets it during training
        m = FusionModel(enc, fusion, torch.nn.Linear(8, 1), adversary=adv, adversary_input=where).eval()
        out = m(b)
        width = 8 if where == "fused" else 18
        assert out["adversary_input"].shape == (4, width) and out["confounder_logits"]["site"].shape == (4, 2)
        if where != "fused":  # [fused | clinical | omics], omics zeros where absent
            torch.testing.assert_close(out["adversary_input"][:, :8], out["embedding"])
            torch.testing.assert_close(out["adversary_input"][:, 8:12], out["modality_embeddings"]["clinical"])
            assert (out["adversary_input"][1::2, 12:] == 0).all()
        m.zero_grad()
        out["loss_adv"].backward()
        grads[where] = [p.grad.clone() for p in enc["omics"].parameters()]
    # with the modality embeddings in its input, the adversary pushes on the omics encoder differently
    assert any(not torch.allclose(a, c) for a, c in zip(grads["fused"], grads["fused_and_modalities"]))
    with pytest.raises(ValueError, match="adversary_input"):
        FusionModel(enc, fusion, torch.nn.Linear(8, 1), adversary_input="modalities")
    # a list names the parts: [fused, omics] reads the fused embedding and the omics encoder's only
    torch.manual_seed(1)
    adv = ConfounderAdversary(8 + 6, {"site": 2}, hidden=0)
    m = FusionModel(enc, fusion, torch.nn.Linear(8, 1), adversary=adv, adversary_input=["fused", "omics"]).eval()
    out = m(b)
    torch.testing.assert_close(out["adversary_input"], torch.cat([out["embedding"],
                                                                  out["modality_embeddings"]["omics"]], dim=1))
    from fusion.model import adversary_parts

    assert adversary_parts(["fused", "ct"], ["clinical"]) == ["fused"]  # an ablation model without CT
    with pytest.raises(ValueError, match="adversary_input"):
        adversary_parts(["ct"], ["clinical"])
    with pytest.raises(ValueError, match="adversary_input"):
        adversary_parts(["fused", "fused"], ["clinical"])


def test_adversary_input_list_is_validated_by_the_config():
    import yaml

    from fusion.config import ConfigError, default_config_dir, parse_config

    data = yaml.safe_load((default_config_dir() / "demo.yaml").read_text())
    data["adversary"] = {"enabled": True, "confounders": ["scanner"], "input": ["fused", "ct"]}
    assert parse_config(data).adversary.input == ["fused", "ct"]
    for bad in (["fused", "xray"], [], ["ct", "ct"]):
        data["adversary"]["input"] = bad
        with pytest.raises(ConfigError, match="adversary.input"):
            parse_config(data)
