"""Head settings that follow the published code: VGG head stride, FEM pyramid sizes, the authors' baseline."""
from pathlib import Path

import pytest
import torch

from svfseg.config import load_config
from svfseg.engine.optim import build_param_groups
from svfseg.models import create_model
from svfseg.models.backbones import create_backbone
from svfseg.models.heads.pfenet import DEFAULT_SCALES, SVF_AUTHORS_SCALES, scale_size
from test_models import TinyBackbone, episode

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def _head(recipe: str) -> dict:
    return dict(load_config(CONFIGS / recipe).model.head)


def test_vgg_pfenet_recipe_runs_the_head_at_stride_16():
    head = _head("pascal/pfenet_vgg16.yaml")
    torch.manual_seed(0)
    model = create_model("pfenet", backbone=create_backbone("vgg16_bn"), **head).eval()
    assert model.feature_stage == "layer3" and model.backbone.stage_strides["layer3"] == 16
    # PFENet at 473 px: 473 -> 237 -> 119 -> 60 (layer2) -> 30 (layer3), ceil-mode pools; the head
    # runs at 30x30. A 121 px input keeps the test fast: layer2 is 16x16, layer3 (the head) 8x8.
    assert [473 // 2 ** k + (473 % 2 ** k > 0) for k in (3, 4)] == [60, 30]
    query, supports, masks = episode(b=1, k=1, size=(121, 121))
    with torch.no_grad():
        feats = model.extract_features(query, supports, masks)
        assert feats.query["layer2"].shape[-2:] == (16, 16) and feats.query["layer3"].shape[-2:] == (8, 8)
        assert model.head_size(feats) == (8, 8)
        assert model.query_prototype_prior(feats)[2].shape[-2:] == (8, 8)
    # PFENet's absolute Pascal sizes, pooled from the 30x30 map
    assert [scale_size(s, (30, 30)) for s in model.scales] == [(60, 60), (30, 30), (15, 15), (8, 8)]
    for name in ("baseline_vgg16.yaml", "bam_vgg16.yaml"):
        for bench in ("pascal", "coco"):
            assert _head(f"{bench}/{name}")["feature_stage"] == "layer3"


def test_bam_gram_features_follow_the_head_resolution():
    from test_bam import BASE

    torch.manual_seed(0)
    kw = dict(backbone=TinyBackbone(steps=(2, 2, 2, 2, 1)), regime="frozen", base_classes=BASE,
              reduce_dim=8, shot=2, feature_stage="layer3")
    model = create_model("bam", **kw).eval()
    query, supports, masks = episode(b=1, k=2, size=(64, 64), support_size=(48, 48))
    with torch.no_grad():
        feats = model.extract_features(query, supports, masks)
        psi = model.forward_parts(query, supports, masks).psi
    from svfseg.models.blocks import resize
    from svfseg.models.heads.bam import gram_discrepancy

    q = resize(feats.query["layer2"], feats.query["layer3"].shape[-2:])
    s = resize(feats.support["layer2"][0], feats.support["layer3"].shape[-2:]).unsqueeze(0)
    want = (model.shot_weights(gram_discrepancy(q, s)) * gram_discrepancy(q, s)).sum(1)
    torch.testing.assert_close(psi, want)


@pytest.mark.parametrize("size,expected", [
    ((81, 81), [(81, 81), (40, 40), (20, 20), (10, 10)]),  # ResNet, 641 px: PFENet's int(81 * s)
    ((41, 41), [(41, 41), (20, 20), (10, 10), (5, 5)]),    # VGG16 at stride 16, 641 px
])
def test_coco_pyramid_sizes_match_pfenet(size, expected):
    coco = _head("coco/pfenet_resnet50.yaml")["scales"]
    assert coco == [1.0, 0.5, 0.25, 0.125]  # PFENet's config/coco/*.yaml ppm_scales
    assert [scale_size(s, size) for s in coco] == expected
    assert [scale_size(s, size) for s in DEFAULT_SCALES] == expected


def test_svf_authors_coco_pyramid_is_absolute():
    for bb in ("resnet50", "vgg16"):
        scales = _head(f"coco/svf_authors/pfenet_{bb}.yaml")["scales"]
        assert tuple(scales) == SVF_AUTHORS_SCALES == (60, 30, 15, 8)
        assert [scale_size(s, (81, 81)) for s in scales] == [(60, 60), (30, 30), (15, 15), (8, 8)]


def test_authors_baseline_freezes_down_query_and_sums_shots():
    torch.manual_seed(0)
    mean = create_model("baseline", backbone=TinyBackbone(), reduce_dim=8).eval()
    torch.manual_seed(0)
    summed = create_model("baseline", backbone=TinyBackbone(), reduce_dim=8, shot_reduce="sum",
                          train_down_query=False).eval()
    query, supports, masks = episode(b=2, k=3)
    with torch.no_grad():
        f = mean.extract_features(query, supports, masks)
        _, proto_m, prior_m, _ = mean.query_prototype_prior(f)
        _, proto_s, prior_s, _ = summed.query_prototype_prior(f)
    torch.testing.assert_close(proto_s, 3 * proto_m)  # unit weights, as the authors' K-shot sum
    torch.testing.assert_close(prior_s, 3 * prior_m, rtol=1e-5, atol=1e-6)
    # down_query stays at its initial weights: outside every optimiser group
    trained = {id(p) for g in build_param_groups(summed, {"head": 10.0}, 1e-4) for p in g["params"]}
    assert not any(id(p) in trained for p in summed.down_query.parameters())
    assert all(id(p) in trained for p in summed.down_supp.parameters())
    assert summed.head_config()["shot_reduce"] == "sum" and summed.head_config()["train_down_query"] is False
    with pytest.raises(ValueError, match="shot_reduce"):
        create_model("baseline", backbone=TinyBackbone(), shot_reduce="max")


def test_baseline_recipes_carry_the_authors_values():
    for bench in ("pascal", "coco"):
        for bb in ("resnet50", "resnet101", "vgg16"):
            head = _head(f"{bench}/baseline_{bb}.yaml")
            assert head["train_down_query"] is False and head["shot_reduce"] == "sum", (bench, bb)


def test_bam_rejects_shot_sum():
    from test_bam import BASE

    with pytest.raises(ValueError, match="shot_reduce"):
        create_model("bam", backbone=TinyBackbone(), base_classes=BASE, shot=2, shot_reduce="sum")


def test_svf_authors_recipes():
    recipes = sorted((CONFIGS).glob("*/svf_authors/*.yaml"))
    assert len(recipes) == 12
    for p in recipes:
        cfg = load_config(p)
        lr = {g: cfg.optim.lr * cfg.optim.lr_mult[g] for g in ("head", "svf")}
        assert lr == pytest.approx({"head": 0.015, "svf": 0.0015}), p
        assert cfg.optim.power == 0.0 and cfg.train.batch_size == 8 and cfg.model.regime == "svf", p
        assert cfg.svf.decay_to == "zero" and cfg.output_dir == "runs/svf_authors", p
        ours = load_config(p.parent.parent / p.name)
        assert ours.run_dir() != cfg.run_dir()
        assert ours.optim.power == 0.9  # ours keeps the poly schedule
