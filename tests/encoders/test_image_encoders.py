"""Image encoders: I3D inflation, pretrained loading, anisotropic kernels, input-size checks, 2D/2.5D models."""
from __future__ import annotations

import pytest
import torch
from monai.networks.layers.factories import Conv
from monai.networks.nets import DenseNet121

from encoders.image import PretrainedReport, inflate_2d_to_3d, load_pretrained
from encoders.registry import create_encoder, get_encoder_entry, list_encoders

NEW = ["resnet10", "resnet18", "resnet34", "resnet50", "densenet121", "swin_vit", "slice2d", "cnn25d"]


def _small(name: str, **kw):
    kwargs = dict(get_encoder_entry(name).cls.example_kwargs)
    kwargs.update(kw)
    return kwargs


def test_all_new_encoders_are_registered_as_image3d():
    names = list_encoders("image3d")
    for n in NEW + ["cnn3d_small"]:
        assert n in names


# --------------------------------------------------------------------------- #
# 2D -> 3D inflation
# --------------------------------------------------------------------------- #
def test_inflated_kernel_gives_the_2d_response_on_constant_in_z_input():
    torch.manual_seed(0)
    conv2 = Conv[Conv.CONV, 2](3, 5, kernel_size=(3, 5), padding=(1, 2), bias=True)
    conv3 = Conv[Conv.CONV, 3](3, 5, kernel_size=(4, 3, 5), padding=(0, 1, 2), bias=True)
    with torch.no_grad():
        conv3.weight.copy_(inflate_2d_to_3d(conv2.weight, 4))
        conv3.bias.copy_(conv2.bias)
    assert conv3.weight.shape == (5, 3, 4, 3, 5)
    img = torch.randn(2, 3, 9, 11)
    vol = img[:, :, None].expand(2, 3, 7, 9, 11).contiguous()  # constant along depth
    out2, out3 = conv2(img), conv3(vol)
    assert out3.shape == (2, 5, 4, 9, 11)
    for k in range(out3.shape[2]):
        torch.testing.assert_close(out3[:, :, k], out2, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="weight"):
        inflate_2d_to_3d(conv3.weight, 3)


def test_2d_network_weights_inflate_into_the_3d_network(tmp_path):
    """A 2D-trained cnn3d_small loaded into the 3D one: constant-in-z volumes give the 2D features."""
    torch.manual_seed(1)
    net2 = create_encoder("cnn3d_small", 2, 1, 6, channels=(4, 8))
    for m in net2.modules():  # non-trivial batch-norm statistics
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    path = tmp_path / "net2d.pt"
    torch.save({"state_dict": {f"module.{k}": v for k, v in net2.state_dict().items()}}, path)
    net3 = create_encoder("cnn3d_small", 3, 1, 6, channels=(4, 8), pretrained_path=str(path))
    rep = net3.pretrained_report
    assert isinstance(rep, PretrainedReport) and not rep.missing and not rep.mismatched and not rep.unexpected
    assert set(rep.inflated) == {"features.0.weight", "features.3.weight", "features.7.weight", "features.10.weight"}
    net2.eval()
    net3.eval()
    img = torch.randn(2, 1, 16, 16)
    vol = img[:, :, None].expand(2, 1, 32, 16, 16).contiguous()
    with torch.no_grad():
        f2 = net2.features(img)  # (2, 8, 4, 4)
        f3 = net3.features(vol)  # (2, 8, 8, 4, 4): slices away from the z borders see constant input
    for k in (3, 4):
        torch.testing.assert_close(f3[:, :, k], f2, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(net3.head[1].weight, net2.head[1].weight)


def test_pretrained_resnet_from_bare_monai_state_and_rgb_adaptation(tmp_path):
    from monai.networks.nets.resnet import ResNet

    torch.manual_seed(2)
    # a bare 2D MONAI ResNet-10 (keys conv1.*, layer1.*, fc.*) trained on RGB images
    bare = ResNet("basic", [1, 1, 1, 1], [64, 128, 256, 512], spatial_dims=2, n_input_channels=3,
                  conv1_t_size=7, conv1_t_stride=2, widen_factor=0.125, shortcut_type="B", bias_downsample=False,
                  num_classes=10)
    path = tmp_path / "resnet2d.pt"
    torch.save(bare.state_dict(), path)
    enc = create_encoder("resnet10", 3, 1, 4, widen_factor=0.125, first_kernel=(3, 7, 7), pretrained_path=str(path))
    rep = enc.pretrained_report
    assert rep.target == "backbone"
    assert "conv1.weight" in rep.inflated and rep.adapted_in_channels == ["conv1.weight"]
    expected = inflate_2d_to_3d(bare.conv1.weight.sum(dim=1, keepdim=True), 3)
    torch.testing.assert_close(enc.backbone.conv1.weight, expected)
    assert {"fc.weight", "fc.bias"} <= set(rep.unexpected) and not rep.missing
    assert "layer4.0.conv2.weight" in rep.loaded
    # our own checkpoint of another head size: the head is reported as shape-mismatched, the rest loads
    own = tmp_path / "own.pt"
    torch.save(enc.state_dict(), own)
    enc8 = create_encoder("resnet10", 3, 1, 8, widen_factor=0.125, first_kernel=(3, 7, 7))
    rep8 = enc8.load_pretrained(own)
    assert rep8.target == "" and {k for k, *_ in rep8.mismatched} == {"head.1.weight", "head.1.bias"}
    assert set(rep8.missing) == {"head.1.weight", "head.1.bias"}


def test_pretrained_densenet_from_torchvision_style_keys(tmp_path):
    net = DenseNet121(spatial_dims=2, in_channels=1, out_channels=3, init_features=8, growth_rate=4, bn_size=2)
    tv = {k.replace(".layers.", "."): v for k, v in net.state_dict().items()}  # torchvision naming
    path = tmp_path / "dense.pth"
    torch.save(tv, path)
    enc = create_encoder("densenet121", 3, 1, 5, init_features=8, growth_rate=4, bn_size=2, pretrained_path=str(path))
    rep = enc.pretrained_report
    assert rep.target == "backbone" and not rep.missing
    assert set(rep.unexpected) == {"class_layers.out.weight", "class_layers.out.bias"}
    assert "features.denseblock1.denselayer1.layers.conv2.weight" in rep.inflated


def test_pretrained_errors(tmp_path):
    with pytest.raises(ValueError, match="pretrained_path"):
        create_encoder("cnn3d_small", 3, 1, 4, pretrained_path=str(tmp_path / "missing.pt"))
    unrelated = tmp_path / "other.pt"
    torch.save({"foo.weight": torch.zeros(2, 2)}, unrelated)
    with pytest.raises(ValueError, match="no key"):
        create_encoder("cnn3d_small", 3, 1, 4, pretrained_path=str(unrelated))
    pickled = tmp_path / "pickle.pt"
    torch.save({"weights": PretrainedReport(path="x")}, pickled)  # arbitrary object: refused by weights_only
    with pytest.raises(ValueError, match="weights_only"):
        load_pretrained(torch.nn.Linear(2, 2), pickled)


# --------------------------------------------------------------------------- #
# anisotropic first kernels, sizes, 2D and 2.5D models
# --------------------------------------------------------------------------- #
def test_anisotropic_first_kernels():
    cnn = create_encoder("cnn3d_small", 3, 1, 4, channels=(4, 8), first_kernel=(1, 3, 3))
    assert tuple(cnn.features[0].weight.shape) == (4, 1, 1, 3, 3)
    assert cnn(torch.randn(2, 1, 5, 16, 16)).shape == (2, 4)
    res = create_encoder("resnet18", 3, 1, 4, widen_factor=0.125, first_kernel=(3, 7, 1), first_stride=(1, 2, 2))
    assert tuple(res.backbone.conv1.weight.shape) == (8, 1, 3, 7, 1)
    assert res(torch.randn(2, 1, 8, 16, 16)).shape == (2, 4)
    for bad in ((2, 3, 3), (3, 3), 4):
        with pytest.raises(ValueError, match="first_kernel"):
            create_encoder("resnet34", 3, 1, 4, first_kernel=bad)
        with pytest.raises(ValueError, match="first_kernel"):
            create_encoder("cnn3d_small", 3, 1, 4, first_kernel=bad)


def test_swin_input_size_is_validated():
    enc = create_encoder("swin_vit", 3, 1, 4, **_small("swin_vit"))
    enc.eval()
    with torch.no_grad():
        assert enc(torch.randn(1, 1, 32, 64, 32)).shape == (1, 4)
        with pytest.raises(ValueError, match=r"multiple of 32.*\(32, 48, 32\)"):
            enc(torch.randn(1, 1, 32, 48, 32))
    with pytest.raises(ValueError, match="feature_size"):
        create_encoder("swin_vit", 3, 1, 4, feature_size=10)
    with pytest.raises(ValueError, match="depths"):
        create_encoder("swin_vit", 3, 1, 4, depths=(2, 2))


def test_densenet_needs_32_voxels():
    enc = create_encoder("densenet121", 3, 1, 4, **_small("densenet121"))
    with pytest.raises(ValueError, match=">= 32"):
        enc(torch.randn(2, 1, 16, 32, 32))


def test_slice2d_attention_is_permutation_invariant_and_handles_thick_slices():
    torch.manual_seed(3)
    enc = create_encoder("slice2d", 3, 1, 6, channels=(4, 8))
    enc.eval()
    x = torch.randn(2, 1, 7, 16, 16)
    with torch.no_grad():
        w = enc.slice_weights(x)
        assert w.shape == (2, 7) and torch.allclose(w.sum(1), torch.ones(2))
        torch.testing.assert_close(enc(x[:, :, torch.randperm(7)]), enc(x), rtol=1e-5, atol=1e-6)
        assert enc(torch.randn(2, 1, 1, 16, 16)).shape == (2, 6)  # a single slice
    mean = create_encoder("slice2d", 3, 1, 6, channels=(4, 8), aggregation="mean")
    mean.eval()
    with torch.no_grad():
        torch.testing.assert_close(mean.forward_features(x), mean._slice_features(x).mean(1))
    with pytest.raises(ValueError, match="aggregation"):
        create_encoder("slice2d", 3, 1, 6, aggregation="max")
    with pytest.raises(ValueError, match="spatial_dims"):
        create_encoder("slice2d", 2, 1, 6)


def test_cnn25d_planes_on_a_non_cubic_volume():
    enc = create_encoder("cnn25d", 3, 2, 6, channels=(4, 8), slab=3)
    x = torch.arange(2 * 2 * 9 * 16 * 12, dtype=torch.float32).reshape(2, 2, 9, 16, 12)
    axial, coronal, sagittal = enc.planes(x)
    assert axial.shape == (2, 6, 16, 12) and coronal.shape == (2, 6, 9, 12) and sagittal.shape == (2, 6, 9, 16)
    torch.testing.assert_close(axial[:, 1], x[:, 0, 4])  # channel 0, central axial slice (D=9 -> 4)
    torch.testing.assert_close(coronal[:, 4], x[:, 1, :, 7])  # channel 1, central coronal slice (H=16 -> 7)
    torch.testing.assert_close(sagittal[:, 1], x[:, 0, :, :, 5])  # channel 0, central sagittal (W=12 -> 5)
    assert enc(x).shape == (2, 6) and enc.forward_features(x).shape == (2, 3 * 16)
    with pytest.raises(ValueError, match="slab"):
        create_encoder("cnn25d", 3, 1, 6, slab=2)
    with pytest.raises(ValueError, match="slab=3"):
        enc(torch.randn(1, 2, 2, 16, 16))


@pytest.mark.parametrize("name", ["cnn3d_small", "resnet10"])
def test_channels_last_3d_gives_the_same_output(name):
    cls = get_encoder_entry(name).cls
    assert cls.supports_channels_last_3d
    torch.manual_seed(4)
    enc = create_encoder(name, 3, 1, 4, **cls.example_kwargs).eval()
    x = torch.randn(2, 1, *cls.example_input_size)
    with torch.no_grad():
        ref = enc(x)
        enc_cl = enc.to(memory_format=torch.channels_last_3d)
        out = enc_cl(x.contiguous(memory_format=torch.channels_last_3d))
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
    assert not get_encoder_entry("swin_vit").cls.supports_channels_last_3d
