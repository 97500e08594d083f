"""Issue 20: upstream's test protocol by default (geometry, query order, empty classes) and the authors' recipes."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from svfseg.config import load_config
from svfseg.data.episodes import PROTOCOLS, EpisodeList, make_episodes, make_pool
from svfseg.data.index import ClassIndex, ImageRecord
from svfseg.data import transforms
from svfseg.data.transforms import upstream_test_size
from svfseg.metrics import IoUAccumulator

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


# --- item 1: the test geometry -------------------------------------------------------------------

def test_upstream_short_side_is_truncated_not_rounded():
    # 389 x 500 at 473: 389 * 0.946 = 367.99 -> PFENet's int() gives 367 -> 360 (a multiple of 8);
    # rounding gave 368, 8 px more. The longer side: 473 -> 472.
    assert upstream_test_size(389, 500, 473) == (360, 472)
    assert upstream_test_size(500, 389, 473) == (472, 360)
    assert upstream_test_size(375, 500, 473) == (352, 472)   # 354.75 -> 354 -> 352
    image, label = np.zeros((389, 500, 3), np.uint8), np.ones((389, 500), np.uint8)
    _, lbl, valid = transforms.TestTransform(size=473, upstream=True)(image, label)
    assert valid == (360, 472) and lbl.shape == (473, 473)
    # Over the 401 short sides 100..500 of a 500 px long side, 26 differ between the two rules.
    rounded = sum(int(round(v * 473 / 500)) // 8 * 8 != upstream_test_size(v, 500, 473)[0]
                  for v in range(100, 501))
    assert rounded == 26


def test_pascal_and_coco_recipes_default_to_upstream_geometry_and_synthetic_does_not():
    for p in sorted(CONFIGS.glob("pascal/**/*.yaml")) + sorted(CONFIGS.glob("coco/**/*.yaml")):
        if p.name.startswith("_"):
            continue
        assert load_config(p).eval.upstream_padding is True, p
    assert load_config(CONFIGS / "synthetic/pfenet_efficientnet_lite0.yaml").eval.upstream_padding is False
    assert "what the SVF tables report" not in (CONFIGS / "pascal/_pascal.yaml").read_text()


# --- item 3: the authors' schedule and their ResNet's dilation ------------------------------------

def test_svf_authors_recipes_stop_early_validate_half_way_and_dilate_as_torchvision():
    for p in sorted(CONFIGS.glob("*/svf_authors/*.yaml")):
        cfg = load_config(p)
        assert cfg.train.early_stop_epochs == 75 and cfg.train.half_epoch_val_max_epochs == 100, p
        assert cfg.train.val_seed == 321, p
        style = cfg.model.backbone_kwargs.get("dilation_style", "pspnet")
        torchvision = cfg.model.name in ("pfenet", "baseline") and cfg.model.backbone.startswith("resnet")
        assert style == ("torchvision" if torchvision else "pspnet"), p
    assert "dilation_style" not in load_config(CONFIGS / "pascal/pfenet_resnet50.yaml").model.backbone_kwargs


def test_torchvision_dilation_style_keeps_the_previous_dilation_in_each_first_block():
    import torch

    from svfseg.models.backbones import create_backbone

    def dilations(style):
        net = create_backbone("resnet50_deep", dilation_style=style)
        return net, {f"{s}.{i}": net.get_submodule(f"{s}.{i}.conv2").dilation[0]
                     for s in ("layer3", "layer4") for i in (0, 1)}

    psp, d_psp = dilations("pspnet")
    tv, d_tv = dilations("torchvision")
    assert d_psp == {"layer3.0": 2, "layer3.1": 2, "layer4.0": 4, "layer4.1": 4}
    assert d_tv == {"layer3.0": 1, "layer3.1": 2, "layer4.0": 2, "layer4.1": 4}
    assert tv.get_submodule("layer4.0.conv2").padding == (2, 2)
    tv.load_state_dict(psp.state_dict())  # the same weights ...
    x = torch.randn(1, 3, 65, 65)
    with torch.no_grad():
        a, b = psp.eval()(x), tv.eval()(x)
    assert a.shape == b.shape and not torch.allclose(a, b)  # ... other features
    with pytest.raises(ValueError, match="dilation_style"):
        create_backbone("resnet50", dilation_style="dense")


# --- item 4: BAM's query order --------------------------------------------------------------------

def _index(n=6):
    # Image i shows class 1 (i even) or 2 (i odd), 100 px each; one pool in list order.
    recs = tuple(ImageRecord(f"JPEGImages/{i}.jpg", f"L/{i}.png", (20, 20), {1 + i % 2: 100, 3: 100})
                 for i in range(n))
    return ClassIndex(Path("root"), "val", 20, recs, "fp")


def test_bam_protocol_walks_the_list_in_order_for_every_seed():
    pool = make_pool(_index(), (1, 2, 3), shot=1, min_pixels=50)
    assert PROTOCOLS["bam"].order == "list" and PROTOCOLS["bam_permuted"].order == "permuted"
    walks = [[e.query for e in make_episodes(pool, benchmark="pascal", fold=0, shot=1, seed=s, count=9,
                                              order="list").episodes] for s in (510, 365)]
    listed = [f"JPEGImages/{i}.jpg" for i in (0, 1, 2, 3, 4, 5, 0, 1, 2)]
    assert walks == [listed, listed]  # the same queries whatever the seed, the list again and again
    first = make_episodes(pool, benchmark="coco", fold=0, shot=1, seed=1, count=4, order="list")
    assert [e.query for e in first] == listed[:4]  # fewer episodes than images: the first ones only
    permuted = [[e.query for e in make_episodes(pool, benchmark="pascal", fold=0, shot=1, seed=s, count=6).episodes]
                for s in (510, 365)]
    assert permuted[0] != permuted[1] and sorted(permuted[0]) == sorted(listed[:6])


def test_list_order_is_recorded_and_old_files_keep_their_fingerprint(tmp_path):
    pool = make_pool(_index(), (1, 2, 3), shot=1, min_pixels=50)
    listed = make_episodes(pool, benchmark="pascal", fold=0, shot=1, seed=0, count=3, order="list")
    again = EpisodeList.load(listed.save(tmp_path / "l.json"))
    assert again.order == "list" and again.fingerprint == listed.fingerprint
    permuted = make_episodes(pool, benchmark="pascal", fold=0, shot=1, seed=0, count=3)
    assert "order" not in permuted._payload()  # lists made before the field: the same fingerprint
    with pytest.raises(ValueError, match="order"):
        make_episodes(pool, benchmark="pascal", fold=0, shot=1, seed=0, count=3, order="sorted")


def test_protocol_names_agree_with_the_config_choices():
    from svfseg.config.schema import _CHOICES

    assert set(_CHOICES["eval.protocol"]) == set(PROTOCOLS)


# --- item 5: a class without episodes ---------------------------------------------------------------

def test_a_class_without_episodes_counts_zero_under_pfenet_and_bam():
    import torch

    acc = IoUAccumulator(class_ids=(3, 4))
    acc.update(torch.tensor([[1, 0]]), torch.tensor([[1, 0]]), 3)   # class 3: IoU 1; class 4: no episode
    drop, zero = acc.compute(), acc.compute("zero")
    assert drop["miou"] == 1.0 and drop["missing_classes"] == [4]
    assert zero["miou"] == 0.5 and zero["per_class"][4] == 0.0 and zero["missing_classes"] == [4]
    assert {n: PROTOCOLS[n].empty_class for n in PROTOCOLS} == {
        "pfenet": "zero", "bam": "zero", "hsnet": "drop", "pfenet_permuted": "drop", "bam_permuted": "drop"}
