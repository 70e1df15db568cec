"""Models: timm by name, one logit, in_chans, local ImageNet weights (timm and torchvision
layouts, stem adaptation), hub weights without a network, Grad-CAM target layers,
safe loading of trained models; the batched on-device augmentation."""

from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
torch.set_num_threads(1)

from nhb_core import models  # noqa: E402
from nhb_core.errors import ConfigError, NetworkUnavailableError, RunError  # noqa: E402


@pytest.mark.parametrize("name", list(models.DEFAULT_MODELS))
@pytest.mark.parametrize("in_chans", [1, 2])
def test_create_model_one_logit(name, in_chans):
    torch.manual_seed(0)
    m = models.create_model(name, in_chans).eval()
    with torch.no_grad():
        y = m(torch.randn(3, in_chans, 32, 32))
    assert y.shape == (3, 1)
    # the Grad-CAM layer exists and yields a spatial map
    layer = models.default_target_layer(m, name)
    feats = []
    h = layer.register_forward_hook(lambda mod, i, o: feats.append(o))
    with torch.no_grad():
        m(torch.randn(1, in_chans, 64, 64))
    h.remove()
    assert feats and feats[0].ndim == 4


def test_target_layers_are_last_blocks():
    assert models.default_target_layer(models.create_model("resnet18", 1), "resnet18").__class__.__name__ == "BasicBlock"
    d = models.create_model("densenet121", 1)
    assert models.default_target_layer(d, "densenet121") is d.features[-1]
    e = models.create_model("efficientnet_b0", 1)
    assert models.default_target_layer(e, "efficientnet_b0") is e.bn2
    # any other timm classifier: a module of its last feature stage
    m = models.create_model("mobilenetv3_small_050", 1)
    assert models.default_target_layer(m, "mobilenetv3_small_050") is not None


def test_unknown_model_is_config_error():
    with pytest.raises(ConfigError, match="unknown model"):
        models.create_model("no_such_net", 1)


def test_other_timm_classifier_accepted():
    m = models.create_model("mobilenetv3_small_050", 1).eval()
    with torch.no_grad():
        assert m(torch.randn(2, 1, 32, 32)).shape == (2, 1)


def test_hub_weights_without_network(monkeypatch):
    monkeypatch.setattr(models, "_network_available", lambda *a, **k: False)
    with pytest.raises(NetworkUnavailableError) as ei:
        models.create_model("resnet18", 1, weights="imagenet")
    assert "\n" not in ei.value.line() and "--weights FILE" in ei.value.line()


def test_torchvision_resnet_weights_stem_summed(tmp_path):
    tv = pytest.importorskip("torchvision")
    torch.manual_seed(1)
    ref = tv.models.resnet18(weights=None).eval()
    p = tmp_path / "resnet18_tv.pth"
    torch.save(ref.state_dict(), p)
    m1 = models.create_model("resnet18", 1, weights=p).eval()
    assert torch.allclose(m1.conv1.weight, ref.conv1.weight.sum(1, keepdim=True))
    assert torch.equal(m1.layer4[1].conv2.weight, ref.layer4[1].conv2.weight)
    assert m1.fc.weight.shape == (1, 512)  # new one-logit head
    # a grey image through the summed stem == the same grey image replicated over RGB
    x = torch.rand(2, 1, 32, 32)
    with torch.no_grad():
        f1 = m1.forward_head(m1.forward_features(x), pre_logits=True)
        fr = torch.flatten(torch.nn.Sequential(*list(ref.children())[:-1])(x.expand(-1, 3, -1, -1)), 1)
    assert torch.allclose(f1, fr, atol=1e-4)
    # 2 channels: repeated and rescaled (timm's rule), still loads everything else
    m2 = models.create_model("resnet18", 2, weights=p)
    assert m2.conv1.weight.shape[1] == 2


def test_torchvision_efficientnet_safetensors_positional(tmp_path):
    tv = pytest.importorskip("torchvision")
    from safetensors.torch import save_file

    torch.manual_seed(2)
    ref = tv.models.efficientnet_b0(weights=None)
    torch.nn.init.normal_(ref.features[8][1].weight)
    p = tmp_path / "effb0_tv.safetensors"  # stored alphabetically: order must be recovered
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, str(p))
    m = models.create_model("efficientnet_b0", 1, weights=p)
    assert torch.equal(m.bn2.weight, ref.features[8][1].weight)
    assert torch.allclose(m.conv_stem.weight, ref.features[0][0].weight.sum(1, keepdim=True))
    assert torch.equal(m.blocks[3][1].conv_pwl.weight, ref.features[4][1].block[3][0].weight)


def test_timm_layout_and_bad_weights(tmp_path):
    from safetensors.torch import save_file

    torch.manual_seed(3)
    src = models.create_model("densenet121", 3)
    import timm

    src = timm.create_model("densenet121", num_classes=1000)
    p = tmp_path / "dn.safetensors"
    save_file({k: v.contiguous() for k, v in src.state_dict().items()}, str(p))
    m = models.create_model("densenet121", 1, weights=p)
    assert torch.equal(m.features.denseblock4.denselayer16.conv2.weight,
                       src.features.denseblock4.denselayer16.conv2.weight)
    # weights of another architecture: a clear ConfigError, not a silent random model
    with pytest.raises(ConfigError, match="do not fit"):
        models.create_model("resnet18", 1, weights=p)
    with pytest.raises(ConfigError, match="does not exist"):
        models.create_model("resnet18", 1, weights=tmp_path / "missing.pth")


class _Evil:
    def __reduce__(self):
        return (print, ("pwned",))


def test_pickled_code_is_refused(tmp_path):
    p = tmp_path / "evil.pth"
    torch.save({"conv1.weight": torch.zeros(1), "x": _Evil()}, p)
    with pytest.raises(ConfigError, match="cannot read weights"):
        models.create_model("resnet18", 1, weights=p)


def test_load_trained_roundtrip(tmp_path):
    torch.manual_seed(4)
    m = models.create_model("efficientnet_b0", 1).eval()
    models.save_weights(m, tmp_path / "model.safetensors")
    (tmp_path / "model.json").write_text(json.dumps({"name": "efficientnet_b0", "architecture": "efficientnet_b0",
                                                     "timm_name": "efficientnet_b0", "in_chans": 1}))
    m2, mj = models.load_trained(tmp_path)
    x = torch.randn(2, 1, 32, 32)
    with torch.no_grad():
        assert torch.equal(m(x), m2(x))
    assert mj["in_chans"] == 1 and not m2.training
    (tmp_path / "model.json").write_text(json.dumps({"timm_name": "resnet18", "in_chans": 1}))
    with pytest.raises(RunError, match="do not load"):
        models.load_trained(tmp_path)
    with pytest.raises(RunError, match="missing"):
        models.load_trained(tmp_path / "nothing")


# --------------------------------------------------------------------------- augmentation

def test_augment_seeded_and_shape():
    from nhb_core.augment import AugmentConfig, augment_batch

    x = torch.rand(6, 2, 32, 32)
    x[:, 1] = (x[:, 1] > 0.5).float()
    a = augment_batch(x, torch.Generator().manual_seed(0), intensity_channels=1)
    b = augment_batch(x, torch.Generator().manual_seed(0), intensity_channels=1)
    c = augment_batch(x, torch.Generator().manual_seed(1), intensity_channels=1)
    assert a.shape == x.shape and a.dtype == x.dtype
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert not torch.equal(a, x)
    # the mask channel is only warped (bilinear): values stay in [0, 1]
    assert a[:, 1].min() >= 0 and a[:, 1].max() <= 1
    # no ranges, no flip: identity
    ident = AugmentConfig(rotate_deg=0, scale=0, translate=0, flip_lr=False, intensity_scale=0, intensity_shift=0,
                          bias_field=0, noise_std=0)
    assert torch.allclose(augment_batch(x, torch.Generator(), ident), x, atol=1e-5)
    # flip only: an exact left-right mirror
    flip = AugmentConfig(**{**ident.to_dict(), "flip_lr": True})
    out = augment_batch(x, torch.Generator().manual_seed(3), flip)
    for i in range(len(x)):
        assert torch.allclose(out[i], x[i], atol=1e-5) or torch.allclose(out[i], x[i].flip(-1), atol=1e-5)


def test_augment_config_validation():
    from nhb_core.augment import AugmentConfig

    with pytest.raises(ConfigError, match="unknown"):
        AugmentConfig.from_dict({"rotation": 3})
    with pytest.raises(ConfigError):
        AugmentConfig(scale=-1)
    assert AugmentConfig.from_dict({"rotate_deg": 5}).rotate_deg == 5.0


def test_augment_channels_last_kept():
    from nhb_core.augment import augment_batch

    x = torch.rand(4, 1, 16, 16).contiguous(memory_format=torch.channels_last)
    x = torch.rand(4, 3, 16, 16).contiguous(memory_format=torch.channels_last)
    y = augment_batch(x, torch.Generator().manual_seed(0))
    assert y.is_contiguous(memory_format=torch.channels_last)
    assert np.isfinite(y.numpy()).all()
