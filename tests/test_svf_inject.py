"""Tests for apply_svf / merge_svf / state files / report on small models."""

import json
import logging

import pytest
import torch
from torch import nn

from conftest import assert_close_to_scale
from svfseg.svf import (
    SVFConfig,
    apply_svf,
    is_svf_layer,
    load_svf,
    load_svf_state_dict,
    merge_svf,
    save_svf,
    singular_value_parameters,
    svf_layers,
    svf_state_dict,
    trainable_parameter_report,
)


class Toy(nn.Module):
    """Stem (3->64 3x3, rank 27), BN, grouped and depthwise convs, a 1x1, a Linear head."""

    def __init__(self, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.stem = nn.Conv2d(3, 64, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(64)
        self.block = nn.Sequential(
            nn.Conv2d(64, 32, 1),
            nn.ReLU(),
            nn.Conv2d(32, 32, 3, padding=1, groups=4, padding_mode="reflect"),
            nn.Conv2d(32, 32, 3, padding=2, dilation=2, groups=32),
        )
        self.head = nn.Linear(32, 5)

    def forward(self, x):
        x = self.block(torch.relu(self.bn(self.stem(x))))
        return self.head(x.mean((2, 3)))


def _x(seed=1, batch=2, size=8):
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


def _fresh_with_bn_stats():
    model = Toy()
    with torch.no_grad():
        model.bn.running_mean.uniform_(-0.1, 0.1)
        model.bn.running_var.uniform_(0.5, 1.5)
    return model.eval()


@pytest.mark.parametrize("mode", ["auto", "reparam", "factorized"])
def test_apply_is_exact_and_freezes_everything_but_s(mode):
    model = _fresh_with_bn_stats()
    x = _x()
    ref = model(x)
    apply_svf(model, SVFConfig(mode=mode))
    names = [n for n, _ in svf_layers(model)]
    assert names == ["stem", "block.0", "block.2", "block.3", "head"]
    assert model.stem.S.shape == (1, 27) and model.block[2].S.shape == (4, 8)
    assert model.block[3].S.shape == (32, 1)
    out = model(x)
    assert ((out - ref).norm() / ref.norm()).item() <= 1e-5
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {n for n, _ in singular_value_parameters(model)}
    assert trainable == {f"{n}.S" for n in names}


def test_report_counts():
    model = Toy()
    plain_total = sum(p.numel() for p in model.parameters())
    apply_svf(model)
    s_total = sum(p.numel() for _, p in singular_value_parameters(model))
    assert s_total == 27 + 32 + 32 + 32 + 5
    report = trainable_parameter_report(model)
    assert report == (
        f"trainable params: {s_total:,} || all params: {plain_total:,} || "
        f"trainable%: {100 * s_total / plain_total:.4f}"
    )


def test_selection_options():
    m = apply_svf(Toy(), SVFConfig(target_modules=r"block\.\d"))
    assert [n for n, _ in svf_layers(m)] == ["block.0", "block.2", "block.3"]
    m = apply_svf(Toy(), SVFConfig(target_modules=["block"], exclude_modules=["3"]))
    assert [n for n, _ in svf_layers(m)] == ["block.0", "block.2"]
    m = apply_svf(Toy(), SVFConfig(skip_1x1=True, skip_3x3=True))
    assert [n for n, _ in svf_layers(m)] == ["head"]  # Linear is not a 1x1 conv
    with pytest.raises(ValueError, match="matched no supported layer"):
        apply_svf(Toy(), SVFConfig(target_modules=["nothing"]))


def test_train_bias_and_trainable_modules():
    m = apply_svf(Toy(), SVFConfig(target_modules=["block"], train_bias=True, trainable_modules=["head", "bn"]))
    trainable = {n for n, p in m.named_parameters() if p.requires_grad}
    assert trainable == {
        "block.0.S", "block.0.bias", "block.2.S", "block.2.bias", "block.3.S", "block.3.bias",
        "head.weight", "head.bias", "bn.weight", "bn.bias",
    }  # fmt: skip
    assert set(svf_state_dict(m)) == {f"block.{i}.{p}" for i in (0, 2, 3) for p in ("S", "bias")}
    # a container of SVD layers may be trainable: its SVD layers keep the SVF rule
    m = apply_svf(Toy(), SVFConfig(target_modules=["block"], trainable_modules=["block"]))
    assert not m.block[0].bias.requires_grad and m.block[0].S.requires_grad
    with pytest.raises(ValueError, match="'block.0' is decomposed and also named in trainable_modules"):
        apply_svf(Toy(), SVFConfig(trainable_modules=["block.0"]))
    with pytest.raises(ValueError, match="trainable_modules=.*matched no module"):
        apply_svf(Toy(), SVFConfig(trainable_modules=["decoder"]))


def test_apply_twice_and_root_layer_errors():
    model = apply_svf(Toy())
    with pytest.raises(RuntimeError, match="already contains SVD layers.*'stem'.*merge_svf"):
        apply_svf(model)
    with pytest.raises(ValueError, match="root module is a plain Conv2d"):
        apply_svf(nn.Conv2d(3, 4, 3))
    with pytest.raises(TypeError, match="expected an SVFConfig"):
        apply_svf(Toy(), {"mode": "auto"})


class MyConv(nn.Conv2d):
    """A subclass may change the forward: SVF must not assume it is a plain conv."""


def test_unsupported_layers_left_alone_and_logged_once(caplog):
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3),
        nn.ConvTranspose2d(4, 4, 2),
        nn.LazyConv2d(4, 1),
        MyConv(4, 4, 1),
        nn.Flatten(),
        nn.LazyLinear(3),
    )
    with caplog.at_level(logging.WARNING, logger="svfseg.svf.inject"):
        apply_svf(model)
    records = [r for r in caplog.records if "unsupported" in r.getMessage()]
    assert len(records) == 1
    msg = records[0].getMessage()
    for expected in ("1 (ConvTranspose2d)", "2 (LazyConv2d)", "3 (MyConv)", "5 (LazyLinear)"):
        assert expected in msg
    assert [n for n, _ in svf_layers(model)] == ["0"]
    assert type(model[1]) is nn.ConvTranspose2d and type(model[3]) is MyConv
    model(torch.randn(1, 3, 6, 6))  # lazy layers initialise, and stay frozen
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {"0.S"}


def test_shared_module_replaced_everywhere():
    shared = nn.Linear(4, 4)
    model = nn.Sequential(shared, nn.ReLU(), shared)
    x = torch.randn(2, 4)
    ref = model(x)
    apply_svf(model)
    assert model[0] is model[2] and is_svf_layer(model[0])
    # another operation order: float32 rounding relative to the tensor's scale (conftest)
    assert_close_to_scale(model(x), ref, 1e-5)


def test_toy_training_changes_only_s():
    model = _fresh_with_bn_stats()
    apply_svf(model)  # BN stays in eval: the cache must not cut the graph
    x = _x(batch=4)
    # a reachable target: the same network with perturbed singular values
    teacher = apply_svf(_fresh_with_bn_stats())
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for _, s in singular_value_parameters(teacher):
            s.mul_(1 + 0.3 * torch.randn(s.shape, generator=gen))
        target = teacher(x)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=0.01)
    losses = []
    for _ in range(30):
        loss = nn.functional.mse_loss(model(x), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.3 * losses[0], losses
    after = model.state_dict()
    for key, value in before.items():
        if key.endswith(".S"):
            assert not torch.equal(after[key], value), key
        else:
            assert torch.equal(after[key], value), key  # U, Vh, biases, BN untouched


def test_merge_round_trip_strict_into_fresh_model():
    model = _fresh_with_bn_stats()
    keys = list(model.state_dict())
    apply_svf(model, SVFConfig(train_bias=True))
    with torch.no_grad():
        for _, s in singular_value_parameters(model):
            s.mul_(1.1)
        model.head.bias.add_(0.3)
    x = _x()
    with torch.no_grad():
        expected = model(x)
    merge_svf(model)
    assert not any(type(m).__module__.startswith("svfseg") for m in model.modules())
    state = model.state_dict()
    assert list(state) == keys
    fresh = Toy(seed=7).eval()
    fresh.load_state_dict(state, strict=True)
    # another operation order: float32 rounding relative to the tensor's scale (conftest)
    assert_close_to_scale(fresh(x), expected, 1e-5)
    assert model.stem.weight.requires_grad and not model.stem.weight.is_inference()


def test_state_round_trip_through_file(tmp_path):
    model = apply_svf(_fresh_with_bn_stats(), SVFConfig(mode="reparam"))
    with torch.no_grad():
        for i, (_, s) in enumerate(singular_value_parameters(model)):
            s.mul_(1.0 + 0.1 * (i + 1))
    x = _x()
    with torch.no_grad():
        expected = model(x)
    path = tmp_path / "svf.safetensors"
    save_svf(path, model, metadata={"run": "toy"})
    assert path.stat().st_size < 4096  # only 128 values

    other = apply_svf(_fresh_with_bn_stats(), SVFConfig(mode="reparam"))
    with torch.no_grad():
        assert not torch.allclose(other(x), expected)
        meta = load_svf(path, other)
        torch.testing.assert_close(other(x), expected)
    assert meta["run"] == "toy" and meta["format"] == "svfseg-svf"
    assert json.loads(meta["modules"]) == ["stem", "block.0", "block.2", "block.3", "head"]
    assert json.loads(meta["shapes"])["stem.S"] == [1, 27]
    assert json.loads(meta["config"])["mode"] == "reparam"
    assert set(svf_state_dict(other)) == {f"{n}.S" for n, _ in svf_layers(other)}


class Renamed(Toy):
    def __init__(self):
        super().__init__()
        self.classifier = self.head
        del self.head

    def forward(self, x):
        return self.classifier(self.block(self.stem(x)).mean((2, 3)))


def test_load_mismatches_name_the_first_problem(tmp_path):
    path = tmp_path / "svf.safetensors"
    save_svf(path, apply_svf(Toy()))

    with pytest.raises(KeyError, match="missing key 'classifier.S'.*unexpected keys such as 'head.S'"):
        load_svf(path, apply_svf(Renamed()))

    narrow = Toy()
    narrow.head = nn.Linear(32, 3)
    with pytest.raises(ValueError, match=r"shape mismatch for 'head.S'.*\(1, 3\).*\(1, 5\)"):
        load_svf(path, apply_svf(narrow))

    partial = apply_svf(Toy(), SVFConfig(target_modules=["stem"]))
    with pytest.raises(KeyError, match="unexpected key 'block.0.S'"):
        load_svf_state_dict(partial, svf_state_dict(apply_svf(Toy())))

    with pytest.raises(ValueError, match="has no SVD layers; call apply_svf first"):
        load_svf(path, Toy())
    with pytest.raises(FileNotFoundError, match="no such file"):
        load_svf(tmp_path / "missing.safetensors", apply_svf(Toy()))
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        load_svf(junk, apply_svf(Toy()))


def test_config_validation():
    with pytest.raises(ValueError, match="mode: expected one of"):
        SVFConfig(mode="fast")
    with pytest.raises(ValueError, match="not a valid regex"):
        SVFConfig(target_modules="layer[")
    with pytest.raises(TypeError, match="module-name strings"):
        SVFConfig(exclude_modules=["ok", 3])
    with pytest.raises(KeyError, match="did you mean 'train_bias'"):
        SVFConfig.from_dict({"train_biases": True})
    cfg = SVFConfig(svd_dtype="float32", target_modules=["a", "b"])
    assert cfg.svd_dtype is torch.float32
    assert SVFConfig.from_dict(json.loads(cfg.to_json())) == cfg
