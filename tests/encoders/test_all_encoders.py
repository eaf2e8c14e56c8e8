"""Every registered encoder: shape, finite output, batch 1 and 2, out_dim, argument validation.

Image encoders run at their class's ``example_input_size`` (a size the
architecture supports, default 16^3) with its ``example_kwargs`` (small
widths, to keep this file fast on a CPU).
"""
import pytest
import torch

from encoders.registry import create_encoder, get_encoder_entry, list_encoders


def _image_size(name):
    return tuple(getattr(get_encoder_entry(name).cls, "example_input_size", (16, 16, 16)))


def _input(family, b, name=None):
    g = torch.Generator().manual_seed(0)
    if family == "image3d":
        return torch.randn(b, 1, *_image_size(name), generator=g)
    if family == "tabular":
        return torch.randn(b, 7, generator=g)
    T, V = 5, 3
    mask = (torch.rand(b, T, V, generator=g) > 0.4).float()
    times = torch.cumsum(torch.rand(b, T, generator=g) * 3, dim=1)
    return {
        "values": torch.randn(b, T, V, generator=g) * mask,
        "mask": mask,
        "delta": torch.rand(b, T, V, generator=g) * 5,
        "times": times,
        "lengths": torch.tensor([T] + [2] * (b - 1)),
    }


def _parameter_free(name):
    # early-fusion extractors (encoders/early.py): out_dim is fixed by the input size, no weights
    return getattr(get_encoder_entry(name).cls, "parameter_free", False)


def _build(name):
    fam = get_encoder_entry(name).family
    out_dim = None if _parameter_free(name) else 12
    if fam == "image3d":
        kwargs = dict(getattr(get_encoder_entry(name).cls, "example_kwargs", {}))
        return create_encoder(name, 3, 1, out_dim, **kwargs), fam
    in_f = 7 if fam == "tabular" else 3
    return create_encoder(name, in_f, out_dim), fam


@pytest.mark.parametrize("name", list_encoders())
@pytest.mark.parametrize("b", [1, 2])
def test_every_registered_encoder(name, b):
    enc, fam = _build(name)
    enc.eval()
    assert enc.out_dim == 12 or _parameter_free(name)
    with torch.no_grad():
        out = enc(_input(fam, b, name))
    assert out.shape == (b, enc.out_dim)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("name", list_encoders())
def test_every_encoder_trains_one_step(name):
    enc, fam = _build(name)
    if _parameter_free(name):
        assert not list(enc.parameters())
        return
    enc.train()
    out = enc(_input(fam, 2, name))
    out.sum().backward()
    grads = [p.grad for p in enc.parameters() if p.requires_grad]
    assert any(g is not None and torch.isfinite(g).all() and g.abs().sum() > 0 for g in grads)


def test_unknown_encoder_lists_valid_names():
    with pytest.raises(ValueError) as e:
        create_encoder("resnet9000", 3, 1, 8)
    for n in list_encoders():
        assert n in str(e.value)


def test_arguments_are_validated_by_name():
    with pytest.raises(ValueError, match="out_dim"):
        create_encoder("cnn3d_small", 3, 1, 0)
    with pytest.raises(ValueError, match="spatial_dims"):
        create_encoder("cnn3d_small", 4, 1, 8)
    with pytest.raises(ValueError, match="in_features"):
        create_encoder("mlp", 0, 8)
    with pytest.raises(ValueError, match="dropout"):
        create_encoder("mlp", 3, 8, dropout=1.5)


@pytest.mark.parametrize("name", list_encoders("image3d"))
def test_image_encoders_expose_features_and_example_size(name):
    cls = get_encoder_entry(name).cls
    size = _image_size(name)
    assert len(size) == 3 and all(isinstance(s, int) and s > 0 for s in size)
    enc, _ = _build(name)
    enc.eval()
    with torch.no_grad():
        feats = enc.forward_features(_input("image3d", 2, name))
    assert feats.ndim == 2 and feats.shape[0] == 2 and torch.isfinite(feats).all()
    assert feats.shape[1] == getattr(enc, "feature_dim", feats.shape[1])
    assert isinstance(getattr(cls, "supports_channels_last_3d", False), bool)


@pytest.mark.parametrize("name", sorted(set(list_encoders("image3d")) - {"cnn3d_small"}))
def test_image_encoder_arguments_are_validated_by_name(name):
    with pytest.raises(ValueError, match="out_dim"):
        create_encoder(name, 3, 1, 0)
    with pytest.raises(ValueError, match="in_channels"):
        create_encoder(name, 3, 0, 8)
    with pytest.raises(ValueError, match="spatial_dims"):
        create_encoder(name, 4, 1, 8)
    with pytest.raises(ValueError, match="dropout"):
        create_encoder(name, 3, 1, 8, dropout=1.5)
