"""`svf.rank_multiple`: 1 decomposes exactly; 4 rebuilds the SVF authors' network (ranks floored to multiples of 4)."""
import logging

import pytest
import torch
from torch import nn

from svfseg.config import ConfigError, load_config
from svfseg.models import create_model
from svfseg.models.backbones import create_backbone
from svfseg.models.policy import apply_policy, floor_ranks_outside
from svfseg.policies import SVFPolicy
from svfseg.svf import SVFConfig, apply_svf, decompose_weight, floored_rank, svf_layers


def test_floored_rank_is_the_authors_round_to_nearest():
    # svf.py: floor(floor(n * 1.0) / 4) * 4, at least 1
    assert [floored_rank(n, 4) for n in (1, 3, 4, 27, 64, 1152)] == [1, 1, 4, 24, 64, 1152]
    assert floored_rank(27) == 27
    with pytest.raises(ValueError, match="int >= 1"):
        floored_rank(27, 0)


def test_a_27_column_stem_conv_keeps_rank_24_and_changes_its_output():
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 64, 3, stride=2, padding=1, bias=False).double()
    assert decompose_weight(conv.weight).S.shape == (1, 27)
    f = decompose_weight(conv.weight, rank_multiple=4)
    assert f.U.shape == (1, 64, 24) and f.S.shape == (1, 24) and f.Vh.shape == (1, 24, 27)
    model = apply_svf(nn.Sequential(conv), SVFConfig(rank_multiple=4, svd_dtype=torch.float64))
    layer = model[0]
    assert layer.rank == 24  # no exactness error: the floor is lossy by design
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    ref = nn.functional.conv2d(x, conv.weight, None, 2, 1)
    change = ((layer(x) - ref).norm() / ref.norm()).item()
    assert change > 1e-3  # what dropping the 3 smallest of 27 singular values does to a random stem
    exact = apply_svf(nn.Sequential(nn.Conv2d(3, 64, 3, 2, 1, bias=False).double()),
                      SVFConfig(svd_dtype=torch.float64))[0]
    assert exact.rank == 27


@pytest.mark.parametrize("backbone, stem", [("resnet50_deep", "layer0.conv1"), ("vgg16_bn", "layer0.0")])
def test_rank_multiple_4_floors_the_frozen_stem_of_upstream_backbones(backbone, stem):
    net = create_backbone(backbone)
    before = {n: p.clone() for n, p in net.state_dict().items()}
    lossy = floor_ranks_outside(net, SVFPolicy(rank_multiple=4))
    assert lossy == [f"{stem} 27 -> 24"]  # every other conv of these backbones has a rank divisible by 4
    w = net.get_submodule(stem).weight
    sv = torch.linalg.svdvals(w.detach().double().reshape(64, 27))
    assert sv[23] / sv[0] > 1e-2 and sv[24] / sv[0] < 1e-6  # rank 24, up to float32 rounding
    changed = [n for n, v in net.state_dict().items() if not torch.equal(v, before[n])]
    assert changed == [f"{stem}.weight"]


def test_policy_warns_once_and_names_the_lossy_layer(caplog):
    policy = SVFPolicy(rank_multiple=4)
    net = create_backbone("efficientnet_lite0")  # stem 3 -> 32, 3x3: 27 columns, outside layer2-4
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        ref = net.eval().forward_stages(x, "layer0")["layer0"]
    with caplog.at_level(logging.WARNING, logger="svfseg.models.policy"):
        apply_policy(net, policy)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "svf.rank_multiple=4" in warnings[0] and "layer0.0.conv 27 -> 24" in warnings[0]
    assert all(layer.rank == layer.weight_shape[0] or layer.rank % 4 == 0 or layer.rank == 1
               for _, layer in svf_layers(net))
    with torch.no_grad():
        out = net.eval().forward_stages(x, "layer0")["layer0"]
    assert not torch.allclose(out, ref)


def test_config_and_description():
    cfg = load_config(None, ["model.regime=svf", "svf.rank_multiple=4"])
    assert cfg.svf.rank_multiple == 4
    with pytest.raises(ConfigError, match="svf.rank_multiple"):
        load_config(None, ["model.regime=bitfit", "svf.rank_multiple=4"])
    with pytest.raises(ConfigError, match="rank_multiple"):
        load_config(None, ["svf.rank_multiple=0"])
    exact = create_model("baseline", backbone="efficientnet_lite0", regime="svf", svf_policy=SVFPolicy())
    floored = create_model("baseline", backbone="efficientnet_lite0", regime="svf",
                           svf_policy=SVFPolicy(rank_multiple=4))
    from svfseg.engine.model import describe
    from svfseg.engine.resolved import resolve_run

    assert "rank_multiple" not in describe(exact, resolve_run(load_config(None, ["model.regime=svf"])))["svf_policy"]
    assert describe(floored, resolve_run(cfg))["svf_policy"]["rank_multiple"] == 4
