"""Tests for the ResNet backbones, stage API, weight loading and frozen BatchNorm."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from svfseg.models.backbones import (
    Backbone,
    WeightsMismatchError,
    checkpoint_state_dict,
    create_backbone,
    freeze_batchnorm,
    is_frozen_batchnorm,
    list_backbones,
    load_backbone_weights,
)

RESNET_DEPTHS = {50: (3, 4, 6, 3), 101: (3, 4, 23, 3)}
BN_SUFFIXES = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")


def _bn(prefix: str, n: int, with_counter: bool) -> dict[str, tuple]:
    return {
        f"{prefix}.{s}": (() if s == "num_batches_tracked" else (n,))
        for s in BN_SUFFIXES
        if with_counter or s != "num_batches_tracked"
    }


def original_resnet_keys(depth: int, deep_stem: bool, with_counter: bool = True) -> dict[str, tuple]:
    """Key -> shape of the original files, written from the published layouts.

    torchvision resnet{50,101}-*.pth (7x7 stem) or PSPNet resnet{50,101}_v2.pth (deep stem),
    both with the 1000-class ``fc``. Independent of the implementation under test.
    """
    keys: dict[str, tuple] = {}
    if deep_stem:
        keys["conv1.weight"] = (64, 3, 3, 3)
        keys |= _bn("bn1", 64, with_counter)
        keys["conv2.weight"] = (64, 64, 3, 3)
        keys |= _bn("bn2", 64, with_counter)
        keys["conv3.weight"] = (128, 64, 3, 3)
        keys |= _bn("bn3", 128, with_counter)
        cin = 128
    else:
        keys["conv1.weight"] = (64, 3, 7, 7)
        keys |= _bn("bn1", 64, with_counter)
        cin = 64
    for i, n in enumerate(RESNET_DEPTHS[depth], start=1):
        p = 64 * 2 ** (i - 1)
        for j in range(n):
            b = f"layer{i}.{j}"
            keys[f"{b}.conv1.weight"] = (p, cin, 1, 1)
            keys |= _bn(f"{b}.bn1", p, with_counter)
            keys[f"{b}.conv2.weight"] = (p, p, 3, 3)
            keys |= _bn(f"{b}.bn2", p, with_counter)
            keys[f"{b}.conv3.weight"] = (4 * p, p, 1, 1)
            keys |= _bn(f"{b}.bn3", 4 * p, with_counter)
            if j == 0:
                keys[f"{b}.downsample.0.weight"] = (4 * p, cin, 1, 1)
                keys |= _bn(f"{b}.downsample.1", 4 * p, with_counter)
            cin = 4 * p
    keys["fc.weight"] = (1000, 2048)
    keys["fc.bias"] = (1000,)
    return keys


def random_file(keys: dict[str, tuple], seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = {}
    for k, shape in keys.items():
        if k.endswith("num_batches_tracked"):
            out[k] = torch.tensor(1234)
        elif k.endswith("running_var"):
            out[k] = torch.rand(shape, generator=g) + 0.5
        else:
            out[k] = torch.randn(shape, generator=g)
    return out


@pytest.fixture(scope="module")
def tv50_file(tmp_path_factory):
    """A torchvision-format resnet50 file (no BN counters, like resnet50-19c8e357.pth)."""
    path = tmp_path_factory.mktemp("weights") / "resnet50-tv.pth"
    state = random_file(original_resnet_keys(50, False, with_counter=False))
    torch.save(state, path, _use_new_zipfile_serialization=False)  # 2017 files are legacy format
    return path, state


@pytest.fixture(scope="module")
def deep50_file(tmp_path_factory):
    """A PSPNet-format resnet50_v2.pth file (deep stem, with fc)."""
    path = tmp_path_factory.mktemp("weights") / "resnet50_v2.pth"
    state = random_file(original_resnet_keys(50, True, with_counter=False), seed=1)
    torch.save(state, path)
    return path, state


@pytest.mark.parametrize("name", ["resnet50", "resnet50_deep"])
@pytest.mark.parametrize("os_", [8, 16, 32])
def test_resnet_stage_shapes(name: str, os_: int) -> None:
    model = create_backbone(name, output_stride=os_).eval()
    assert isinstance(model, Backbone)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        feats = model.forward_stages(x, model.stage_names)
    expected_strides = {"layer0": 4, "layer1": 4, "layer2": 8, "layer3": min(os_, 16), "layer4": os_}
    stem = 128 if name.endswith("_deep") else 64
    expected_channels = {"layer0": stem, "layer1": 256, "layer2": 512, "layer3": 1024, "layer4": 2048}
    assert model.stage_strides == expected_strides
    assert model.stage_channels == expected_channels
    for s, f in feats.items():
        assert f.shape == (1, expected_channels[s], 64 // expected_strides[s], 64 // expected_strides[s])
    assert isinstance(model.get_stage("layer2"), nn.Module)
    assert model.get_stage("layer3") is model.layer3


def test_resnet_dilation_as_pspnet() -> None:
    model = create_backbone("resnet50_deep", output_stride=8)
    for stage, d in (("layer3", 2), ("layer4", 4)):
        for block in getattr(model, stage):
            assert block.conv2.dilation == (d, d) and block.conv2.padding == (d, d)
            assert block.conv2.stride == (1, 1)
        assert getattr(model, stage)[0].downsample[0].stride == (1, 1)
    # v1.5: the stride sits on the 3x3 conv, not on the first 1x1.
    b = model.layer2[0]
    assert b.conv2.stride == (2, 2) and b.conv1.stride == (1, 1)


def test_resnet_parameter_counts_match_torchvision() -> None:
    # torchvision resnet50 / resnet101 without the fc layer.
    assert sum(p.numel() for p in create_backbone("resnet50").parameters()) == 23_508_032
    assert sum(p.numel() for p in create_backbone("resnet101").parameters()) == 42_500_160


def test_forward_stages_stops_early() -> None:
    model = create_backbone("resnet50", output_stride=32).eval()
    called = []
    for s in model.stage_names:
        model.get_stage(s).register_forward_hook(lambda m, i, o, s=s: called.append(s))
    with torch.no_grad():
        out = model.forward_stages(torch.randn(1, 3, 32, 32), ("layer2", "layer1"))
    assert list(out) == ["layer2", "layer1"]
    assert called == ["layer0", "layer1", "layer2"]
    called.clear()
    with torch.no_grad():
        out4 = model.forward_stages(out["layer2"], "layer4", start="layer3")
        full = model.forward_stages(torch.randn(1, 3, 32, 32), "layer4")
    assert called[:2] == ["layer3", "layer4"] and out4["layer4"].shape == full["layer4"].shape
    with pytest.raises(ValueError, match="no stage 'layer9'"):
        model.forward_stages(torch.randn(1, 3, 32, 32), ("layer9",))


def test_registry_lists_and_rejects() -> None:
    names = list_backbones()
    for n in ("resnet50", "resnet101", "resnet50_deep", "resnet101_deep"):
        assert n in names
    with pytest.raises(ValueError, match="unknown backbone 'resnet18'"):
        create_backbone("resnet18")
    with pytest.raises(ValueError, match="output_stride"):
        create_backbone("resnet50", output_stride=4)
    with pytest.raises(ValueError, match="no bundled weights"):
        create_backbone("resnet50", weights="imagenet")
    with pytest.raises(FileNotFoundError, match="nowhere.pth"):
        create_backbone("resnet50", weights="/nowhere.pth")


@pytest.mark.parametrize(
    ("name", "depth", "deep"),
    [
        ("resnet50", 50, False),  # torchvision resnet50-19c8e357.pth: no BN counters
        ("resnet50_deep", 50, True),  # PSPNet resnet50_v2.pth
        ("resnet101", 101, False),  # with BN counters, as newer torchvision files
    ],
)
def test_load_original_files_strictly(tmp_path, tv50_file, deep50_file, name, depth, deep) -> None:
    assert len(original_resnet_keys(50, False)) == 320  # torchvision resnet50 state_dict
    assert len(original_resnet_keys(50, True)) == 332
    if depth == 50:
        path, state = deep50_file if deep else tv50_file
    else:
        state = random_file(original_resnet_keys(depth, deep, with_counter=True))
        path = tmp_path / "weights.pth"
        torch.save(state, path)
    model = create_backbone(name, weights=path, output_stride=8)
    own = model.state_dict()
    assert torch.equal(own["layer0.conv1.weight"], state["conv1.weight"])
    assert torch.equal(own["layer0.bn1.running_var"], state["bn1.running_var"])
    last = f"layer3.{RESNET_DEPTHS[depth][2] - 1}.bn3.bias"
    assert torch.equal(own[last], state[last])
    assert torch.equal(own["layer4.0.downsample.0.weight"], state["layer4.0.downsample.0.weight"])
    if deep:
        assert torch.equal(own["layer0.conv3.weight"], state["conv3.weight"])
    # Every tensor of the file except fc reached the model.
    report = load_backbone_weights(model, path)
    assert report.ignored == ["fc.weight", "fc.bias"]
    assert len(report.loaded) == len(state) - 2 and not report.missing and not report.unexpected


def test_wrong_files_list_keys(tmp_path, tv50_file, deep50_file) -> None:
    model = create_backbone("resnet50_deep")
    state = deep50_file[1]
    before = {k: v.clone() for k, v in model.state_dict().items()}

    missing = dict(state)
    del missing["layer2.1.conv2.weight"]
    torch.save(missing, tmp_path / "missing.pth")
    with pytest.raises(WeightsMismatchError, match=r"missing\.pth.*1 missing keys: \[layer2\.1\.conv2\.weight\]"):
        load_backbone_weights(model, tmp_path / "missing.pth")

    extra = dict(state)
    extra["aux.conv.weight"] = torch.zeros(3)
    torch.save(extra, tmp_path / "extra.pth")
    with pytest.raises(WeightsMismatchError, match=r"1 unexpected keys: \[aux\.conv\.weight\]"):
        load_backbone_weights(model, tmp_path / "extra.pth")

    wrong = dict(state)
    wrong["layer1.0.conv1.weight"] = torch.zeros(64, 64, 1, 1)
    torch.save(wrong, tmp_path / "shape.pth")
    with pytest.raises(WeightsMismatchError, match=r"layer1\.0\.conv1\.weight \(file \(64, 64, 1, 1\), model \(64, 128, 1, 1\)\)"):
        load_backbone_weights(model, tmp_path / "shape.pth")

    # A torchvision (7x7) file in a deep-stem model: many keys listed, counts given.
    with pytest.raises(WeightsMismatchError) as err:
        load_backbone_weights(model, tv50_file[0])
    msg = str(err.value)
    assert "resnet50-tv.pth" in msg and "missing keys" in msg and "conv2.weight" in msg and "conv1.weight (file" in msg
    # Nothing was loaded by the failed attempts.
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k

    # Non-strict: loads what fits, still reports the rest.
    report = load_backbone_weights(model, tmp_path / "missing.pth", strict=False)
    assert report.missing == ["layer2.1.conv2.weight"]
    assert torch.equal(model.state_dict()["layer0.conv2.weight"], state["conv2.weight"])


def test_freeze_batchnorm_structural(tv50_file) -> None:
    model = create_backbone("resnet50", output_stride=32)
    keys_before = list(model.state_dict())
    assert freeze_batchnorm(model) is model
    assert list(model.state_dict()) == keys_before
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(bns) == 53 and all(is_frozen_batchnorm(m) for m in bns)
    load_backbone_weights(model, tv50_file[0])
    model.train()
    assert all(not m.training for m in bns)
    assert all(not p.requires_grad for m in bns for p in m.parameters())
    stats = {k: v.clone() for k, v in model.state_dict().items() if "running" in k}
    model(torch.randn(2, 3, 16, 16))
    for k, v in model.state_dict().items():
        if "running" in k:
            assert torch.equal(v, stats[k]), k
    # Frozen BN behaves as eval BN: output equals a fresh copy in eval mode.
    bn = nn.BatchNorm2d(4)
    bn.running_mean.uniform_()
    frozen = freeze_batchnorm(bn)
    x = torch.randn(2, 4, 3, 3)
    assert torch.allclose(frozen.train()(x), bn.eval()(x))


@pytest.mark.parametrize("name", ["resnet50_deep", "vgg16_bn", "efficientnet_lite0"])
def test_checkpoint_state_dict_round_trip(tmp_path, name) -> None:
    source = create_backbone(name)
    exported = checkpoint_state_dict(source)
    assert exported and not any(k.startswith("layer") and k.split(".")[0] == "layer0" for k in exported)
    torch.save(exported, tmp_path / "w.pth")
    target = create_backbone(name, weights=tmp_path / "w.pth")
    for k, v in target.state_dict().items():
        assert torch.equal(v, source.state_dict()[k]), k
