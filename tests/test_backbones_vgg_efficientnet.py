"""Tests for the VGG16-BN and EfficientNet-Lite0 backbones (layout, weight files, ImageNet check)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from svfseg.models.backbones import (
    WeightsMismatchError,
    create_backbone,
    freeze_batchnorm,
    load_backbone_weights,
    package_weights_path,
    read_state_dict,
)

VGG16_CFG = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M")
IMAGENET_MEAN = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
IMAGENET_STD = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)


def torchvision_vgg16_bn_keys(with_counter: bool) -> dict[str, tuple]:
    """Key -> shape of torchvision's vgg16_bn file, from the published layout ('features.N')."""
    keys: dict[str, tuple] = {}
    idx, cin = 0, 3
    for v in VGG16_CFG:
        if v == "M":
            idx += 1
            continue
        keys[f"features.{idx}.weight"] = (v, cin, 3, 3)
        keys[f"features.{idx}.bias"] = (v,)
        for s in ("weight", "bias", "running_mean", "running_var"):
            keys[f"features.{idx + 1}.{s}"] = (v,)
        if with_counter:
            keys[f"features.{idx + 1}.num_batches_tracked"] = ()
        idx, cin = idx + 3, v
    # The real classifier is 25088x4096 (400 MB); the loader drops classifier.* by name, so
    # small tensors under the real key names exercise the same path.
    for i, shape in ((0, (8, 4)), (3, (8, 8)), (6, (10, 8))):
        keys[f"classifier.{i}.weight"] = shape
        keys[f"classifier.{i}.bias"] = shape[:1]
    return keys


@pytest.mark.parametrize(
    ("name", "channels", "strides"),
    [
        ("vgg16_bn", (64, 128, 256, 512, 512), (2, 4, 8, 16, 16)),
        ("efficientnet_lite0", (16, 24, 40, 112, 320), (2, 4, 8, 16, 32)),
    ],
)
def test_stage_shapes(name, channels, strides) -> None:
    model = create_backbone(name).eval()
    names = model.stage_names
    assert model.stage_channels == dict(zip(names, channels))
    assert model.stage_strides == dict(zip(names, strides))
    with torch.no_grad():
        feats = model.forward_stages(torch.randn(1, 3, 64, 64), names)
    for s, c, st in zip(names, channels, strides):
        assert feats[s].shape == (1, c, 64 // st, 64 // st), s
    called = []
    for s in names:
        model.get_stage(s).register_forward_hook(lambda m, i, o, s=s: called.append(s))
    with torch.no_grad():
        model.forward_stages(torch.randn(1, 3, 64, 64), ("layer1",))
    assert called == ["layer0", "layer1"]


def test_vgg_stage_split_matches_pfenet() -> None:
    model = create_backbone("vgg16_bn")
    # PFENet: features[0:7], [7:14], [14:24], [24:34], [34:43]; the last max pool is dropped.
    assert [len(model.get_stage(s)) for s in model.stage_names] == [7, 7, 10, 10, 9]
    assert isinstance(model.layer3[-1], nn.MaxPool2d) and not isinstance(model.layer4[-1], nn.MaxPool2d)
    assert model.checkpoint_key("layer4.0.weight") == "features.34.weight"
    with torch.no_grad():
        out = model.eval().forward_stages(torch.randn(1, 3, 57, 57), ("layer2", "layer4"))
    # ceil-mode pooling as in PFENet: 57 -> 29 -> 15 -> 8 -> 4.
    assert out["layer2"].shape[-1] == 8 and out["layer4"].shape[-1] == 4
    assert sum(p.numel() for p in model.parameters()) == 14_723_136  # torchvision features


@pytest.mark.parametrize("counter", [False, True])
def test_vgg_loads_torchvision_file(tmp_path, counter) -> None:
    g = torch.Generator().manual_seed(0)
    state = {k: torch.randn(s, generator=g) if s else torch.tensor(7) for k, s in torchvision_vgg16_bn_keys(counter).items()}
    torch.save(state, tmp_path / "vgg16_bn.pth")
    model = create_backbone("vgg16_bn", weights=tmp_path / "vgg16_bn.pth")
    own = model.state_dict()
    assert torch.equal(own["layer0.0.weight"], state["features.0.weight"])
    assert torch.equal(own["layer2.7.running_mean"], state["features.21.running_mean"])
    assert torch.equal(own["layer4.7.bias"], state["features.41.bias"])
    del state["features.24.weight"]
    torch.save(state, tmp_path / "bad.pth")
    with pytest.raises(WeightsMismatchError, match=r"bad\.pth.*1 missing keys: \[features\.24\.weight\]"):
        load_backbone_weights(model, tmp_path / "bad.pth")


def test_efficientnet_tf_same_padding_and_plain_convs() -> None:
    model = create_backbone("efficientnet_lite0").eval()
    with torch.no_grad():
        feats = model.forward_stages(torch.randn(1, 3, 65, 70), model.stage_names)
    # TF "SAME": output size is ceil(n / stride) at every stage.
    for s, f in feats.items():
        st = model.stage_strides[s]
        assert f.shape[-2:] == (-(-65 // st), -(-70 // st)), s
    # Every conv is a plain nn.Conv2d (padding lives in separate modules), so SVF can swap them.
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 1 + 16 * 2 + 15 and all(type(m) is nn.Conv2d for m in convs)
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert all(m.eps == 1e-3 for m in bns)
    freeze_batchnorm(model)
    assert all(m.eps == 1e-3 and not m.training for m in model.modules() if isinstance(m, nn.BatchNorm2d))


def test_efficientnet_file_errors_use_file_names(tmp_path) -> None:
    state = read_state_dict(package_weights_path())
    assert len(state) == 296 and "_blocks.15._project_conv.weight" in state
    del state["_blocks.7._bn1.running_var"]
    torch.save(state, tmp_path / "lite0.pth")
    model = create_backbone("efficientnet_lite0")
    with pytest.raises(WeightsMismatchError, match=r"lite0\.pth.*1 missing keys: \[_blocks\.7\._bn1\.running_var\]"):
        load_backbone_weights(model, tmp_path / "lite0.pth")


def _photo(name: str) -> torch.Tensor:
    """skimage photo -> (3, 224, 224) float in [0, 255]: shorter side to 224, centre crop."""
    import skimage.data

    img = Image.fromarray(getattr(skimage.data, name)())
    w, h = img.size
    scale = 224 / min(w, h)
    img = img.resize((round(w * scale), round(h * scale)), Image.BICUBIC)
    w, h = img.size
    left, top = (w - 224) // 2, (h - 224) // 2
    img = img.crop((left, top, left + 224, top + 224))
    return torch.from_numpy(np.asarray(img, dtype=np.float32)).permute(2, 0, 1)


def test_efficientnet_imagenet_weights_classify_photos() -> None:
    model = create_backbone("efficientnet_lite0", weights="imagenet", with_classifier=True).eval()
    pixels = torch.stack([_photo("chelsea"), _photo("coffee")])
    with torch.no_grad():
        logits = model.classify((pixels / 255 - IMAGENET_MEAN) / IMAGENET_STD)
    top5 = logits.topk(5, dim=1).indices
    assert set(top5[0].tolist()) & {281, 282, 285}  # tabby / tiger cat / Egyptian cat
    assert set(top5[1].tolist()) & {967, 968}  # espresso / cup
    assert top5[0, 0].item() in {281, 282, 285} and top5[1, 0].item() in {967, 968}
    # The ImageNet-normalised input is mapped to the (pixel - 127) / 128 range of the weights.
    to_tf = model.layer0[0].input_range
    assert torch.allclose(to_tf((pixels / 255 - IMAGENET_MEAN) / IMAGENET_STD), (pixels - 127) / 128, atol=1e-4)
    # Without the classifier the head keys of the file are ignored, not reported.
    report = load_backbone_weights(create_backbone("efficientnet_lite0"), package_weights_path())
    assert len(report.ignored) == 8 and not report.missing and not report.unexpected
