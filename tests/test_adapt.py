"""Test-time adaptation on each episode's supports (`adapt.params`): what trains, what it may see, exact restore."""
from __future__ import annotations

import math

import pytest
import torch

from conftest import assert_close_to_scale
from svfseg.engine.adapt import EpisodeAdapter, adapted_evaluation
from svfseg.engine.adapt.batched import runner_for
from svfseg.engine.adapt.pseudo import ONE_SHOT_COPIES, augment_pairs, make_bank, plan_pseudo_episodes
from svfseg.engine.distributed import DistInfo
from svfseg.models import create_model
from svfseg.policies import AdaptSettings, LoRAConfig, SVFPolicy
from svfseg.regimes import adapt_name, adapt_parts

SIZE = 64


def model_of(regime="frozen", name="pfenet", dtype=torch.float32, **kw):
    torch.manual_seed(0)
    head = {"reduce_dim": 16} if name in ("pfenet", "baseline") else {}
    m = create_model(name, backbone="efficientnet_lite0", regime=regime, **head, **kw).eval()
    return m.to(dtype)


def supports(k=3, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    imgs = torch.randn(k, 3, SIZE, SIZE, generator=g, dtype=dtype)
    masks = (torch.rand(k, SIZE, SIZE, generator=g) < 0.3).long()
    masks[:, :4] = 255
    return imgs, masks


def adapter_of(model, params, **kw):
    settings = AdaptSettings(params=adapt_name(params), **kw)
    return EpisodeAdapter(model, settings, policy=model.svf_policy or SVFPolicy(), lora=LoRAConfig(r=2))


# -- declarations ---------------------------------------------------------------------------------------
def test_adapt_params_parse_and_refuse_in_one_line():
    assert [s.name for s in adapt_parts("head+svf")] == ["svf", "head"]
    assert adapt_name("head+svf") == "svf+head"
    for bad, says in (("svf+svf", "repeated"), ("none+head", "'none' cannot"), ("full+svf", "'full' already"),
                      ("svd", "'svd' is not one of"), ("", "expected one of")):
        with pytest.raises(ValueError, match=says):
            adapt_parts(bad)


def test_config_section_checks_and_canonical_name():
    from svfseg.config import ConfigError, from_dict

    cfg = from_dict({"adapt": {"params": "head+svf", "grid_lr": [1e-3]}})
    assert cfg.adapt.params == "svf+head" and cfg.adapt.grid_lr == (1e-3,)
    for bad in ({"params": "svd"}, {"lr": -1.0}, {"optimizer": "lbfgs"}, {"grid_steps": [0]}):
        with pytest.raises(ConfigError, match="config section 'adapt'"):
            from_dict({"adapt": bad})


# -- pseudo-episodes ------------------------------------------------------------------------------------
def test_pseudo_episodes_leave_one_out_copies_and_fixed_shot():
    loo = plan_pseudo_episodes(3, augment=False, copies=0)
    assert [(e.query, e.supports) for e in loo] == [(0, (1, 2)), (1, (0, 2)), (2, (0, 1))]
    one = plan_pseudo_episodes(1, augment=False, copies=ONE_SHOT_COPIES)
    assert [(e.query, e.supports) for e in one] == [(1 + j, (0,)) for j in range(ONE_SHOT_COPIES)]
    both = plan_pseudo_episodes(2, augment=True, copies=2)
    assert [(e.query, e.supports) for e in both] == [(0, (1,)), (1, (0,)), (2, (0,)), (3, (1,))]
    fixed = plan_pseudo_episodes(3, augment=False, copies=0, fixed_shot=3)
    assert all(len(e.supports) == 3 and e.query not in e.supports for e in fixed)


def test_augmented_copies_are_seeded_and_pad_with_ignore():
    imgs, masks = supports(2)
    a = augment_pairs(imgs, masks, torch.Generator().manual_seed(5))
    b = augment_pairs(imgs, masks, torch.Generator().manual_seed(5))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert a[0].shape == imgs.shape and a[1].shape == masks.shape
    assert set(a[1].unique().tolist()) <= {0, 1, 255}
    bank = make_bank(imgs[:1], masks[:1], augment=False, generator=torch.Generator().manual_seed(0))
    assert bank.images.shape[0] == 1 + ONE_SHOT_COPIES and len(bank.episodes) == ONE_SHOT_COPIES


# -- the shared-feature path computes what the model computes --------------------------------------------
@pytest.mark.parametrize("name", ["pfenet", "baseline"])
def test_shared_features_give_the_models_own_logits(name):
    model = model_of(name=name, dtype=torch.float64)
    imgs, masks = supports(3, torch.float64)
    feats = model.image_features(imgs, masks)
    ep = feats.episodes(model.feature_stages, [0, 1], [[1, 2], [0, 2]])
    from svfseg.models.blocks import resize

    shared = resize(model.forward_head(ep)[0], imgs.shape[-2:])
    idx = torch.tensor([[1, 2], [0, 2]])
    direct = model(imgs[[0, 1]], imgs[idx], masks[idx])
    assert_close_to_scale(shared, direct, 1e-11, "leave-one-out logits from shared features")
    # the frozen prefix reused: the same features again
    again = model.image_features(imgs, masks, reuse=model.image_features(imgs, masks, keep=("layer1",)), start="layer2")
    for s in model.feature_stages:
        assert_close_to_scale(again.unmasked[s], feats.unmasked[s], 1e-11, s)


# -- what trains ----------------------------------------------------------------------------------------
def _bn_channels(backbone, stages):
    return sum(m.num_features for s in stages for m in getattr(backbone, s).modules()
               if isinstance(m, torch.nn.modules.batchnorm._BatchNorm))


@pytest.mark.parametrize("params", ["svf", "bn", "bitfit", "lora", "head", "full", "svf+head"])
def test_each_choice_trains_exactly_what_it_declares(params):
    model = model_of("frozen")
    stages = SVFPolicy().stages
    head = sum(p.numel() for n, p in model.named_parameters() if p.requires_grad and not n.startswith("backbone."))
    ad = adapter_of(model, params)
    bb = ad.model.backbone
    from svfseg.models.lora import lora_parameters
    from svfseg.svf import singular_value_parameters

    expected = {
        "svf": sum(p.numel() for _, p in singular_value_parameters(bb)),
        "bn": 2 * _bn_channels(model.backbone, stages),
        "bitfit": _bn_channels(model.backbone, stages),  # EfficientNet's convs have no bias: the BN shifts
        "lora": sum(p.numel() for p in lora_parameters(bb)),
        "head": head,
        "full": sum(p.numel() for p in model.backbone.parameters()),
    }
    want = sum(expected[s.name] for s in adapt_parts(params))
    assert ad.trainable_count == want > 0
    assert sum(p.numel() for p in ad.model.parameters() if p.requires_grad) == want
    before = {n: p.detach().clone() for n, p in ad.model.named_parameters()}
    imgs, masks = supports(3)
    ad.adapt(imgs, masks, 1, steps=1, lr=1e-2, generator=torch.Generator().manual_seed(0))
    changed = {n for n, p in ad.model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and changed <= set(ad.parameter_names)


def test_svf_of_an_svf_model_starts_from_its_trained_values_and_decomposes_nothing_new():
    model = model_of("svf")
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith(".S"):
                p.mul_(1.01)
    ad = adapter_of(model, "svf")
    ours = {n: p for n, p in model.named_parameters() if p.requires_grad and n.startswith("backbone.")}
    assert sorted(ad.parameter_names) == sorted(ours)
    for n, p in zip(ad.parameter_names, ad.params):
        assert torch.equal(p, ours[n])


# -- the query plays no part; the model comes back exactly ------------------------------------------------
class _Episodes(torch.utils.data.Dataset):
    """Fixed 3-shot episodes at SIZE px, in the items `svfseg test` scores; ``poison``: NaN query images, junk labels."""

    def __init__(self, n, poison=False):
        self.n, self.poison = n, poison

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        imgs, masks = supports(4, seed=i)
        q, ql = imgs[3], masks[3].clone()
        if self.poison:
            q = torch.full_like(q, float("nan"))
            ql = torch.randint(0, 2, ql.shape, generator=torch.Generator().manual_seed(99 + i))
        return {"query_img": q, "support_imgs": imgs[:3], "support_masks": masks[:3],
                "query_mask": ql, "query_label_orig": ql, "query_valid_hw": [SIZE, SIZE],
                "class_id": 1 + i % 2, "query_name": f"q{i}", "support_names": ["s0", "s1", "s2"]}


def _adapted_params_per_episode(dataset, params):
    """The adapted parameters at each prediction (one episode at a time: svf+head; batched: svf)."""
    ad = adapter_of(model_of("frozen"), params)
    runner = runner_for(ad, ad.settings.parallel) if params == "svf" else ad
    seen = []
    predict = runner.predict

    def spy(*args, **kw):
        seen.append([p.detach().clone() for p in runner.params])
        return predict(*args, **kw)

    runner.predict = spy
    adapted_evaluation(ad, dataset, class_ids=[1, 2], counts=[2], lr=1e-2, seed=0, info=DistInfo())
    return seen


@pytest.mark.parametrize("params", ["svf+head", "svf"])
def test_the_query_image_and_label_cannot_move_the_adapted_parameters(params):
    clean = _adapted_params_per_episode(_Episodes(3), params)
    poisoned = _adapted_params_per_episode(_Episodes(3, poison=True), params)
    assert len(clean) == len(poisoned) == (3 if params == "svf+head" else 1)
    for a, b in zip(clean, poisoned):
        assert all(torch.equal(x, y) for x, y in zip(a, b))
        assert all(torch.isfinite(x).all() for x in b)


def test_after_100_adapted_episodes_the_model_is_bitwise_what_it_was():
    model = model_of("svf")
    original = {k: v.clone() for k, v in model.state_dict().items()}
    ad = adapter_of(model, "svf+head")
    start = {k: v.clone() for k, v in ad.model.state_dict().items()}
    imgs, masks = supports(2, seed=3)
    for i in range(100):
        ad.reset()
        ad.adapt(imgs, masks, 1, steps=1, lr=1e-2, generator=torch.Generator().manual_seed(i))
    assert any(not torch.equal(v, start[k]) for k, v in ad.model.state_dict().items())  # it did move
    ad.reset()
    assert all(torch.equal(v, start[k]) for k, v in ad.model.state_dict().items())
    assert all(torch.equal(v, original[k]) for k, v in model.state_dict().items())


def test_zero_steps_through_the_adapter_scores_exactly_the_plain_test():
    from svfseg.engine.tasks.fewshot import evaluate

    model = model_of("svf")
    ds = _Episodes(4)
    plain = evaluate(model, ds, class_ids=[1, 2], device=torch.device("cpu"), per_episode=True)
    ad = adapter_of(model, "svf")
    r = adapted_evaluation(ad, ds, class_ids=[1, 2], counts=[0], lr=None, seed=0, info=DistInfo())[0]
    assert r["miou"] == plain["miou"] and r["per_episode"] == plain["per_episode"]


def test_batched_adaptation_is_the_sequential_one_per_episode():
    """E episodes adapted in one pass (each sample with its own episode's singular values) = E separate adaptations."""
    model = model_of("frozen", dtype=torch.float64)
    ad = adapter_of(model, "svf")
    items = [_Episodes(3)[i] for i in range(3)]
    imgs = torch.stack([it["support_imgs"] for it in items]).double()
    masks = torch.stack([it["support_masks"] for it in items])
    queries = torch.stack([it["query_img"] for it in items]).double()
    gens = lambda: [torch.Generator().manual_seed(i) for i in range(3)]  # noqa: E731
    sequential, logits = [], []
    for e, g in enumerate(gens()):
        ad.reset()
        ad.adapt(imgs[e], masks[e], 1, steps=3, lr=1e-2, generator=g)
        sequential.append([p.detach().clone() for p in ad.params])
        logits.append(ad.predict(queries[e:e + 1], imgs[e:e + 1], masks[e:e + 1]))
    batched = runner_for(ad, 4)
    batched.reset()
    # a prediction between steps (how the choice scores several step counts) must not disturb the next step
    batched.adapt(imgs, masks, steps=3, lr=1e-2, generators=gens(), on_step=lambda s: batched.predict(queries, imgs, masks))
    for e in range(3):
        moved = [(s - p0).abs().max() for s, p0 in zip(sequential[e], ad._start)]
        assert max(moved) > 1e-4  # it did adapt
        for s, p in zip(sequential[e], batched.params):
            assert_close_to_scale(p[e], s, 1e-9, f"episode {e}")
    assert_close_to_scale(batched.predict(queries, imgs, masks), torch.cat(logits), 1e-9, "logits")
    assert all(torch.equal(p[3], p0[3]) for p, p0 in zip(batched.params, batched._start))  # the unused row stays


def test_bam_adapts_through_whole_forwards_with_its_fixed_shot_and_restores():
    """BAM overrides forward (base learner, K-shot weights built for one K): each pseudo-episode is a whole forward,
    its support list cycled to K; the episode's class reaches the base map; the model comes back exactly."""
    from test_bam import stage2

    model = stage2("frozen", shot=3).eval()
    ad = EpisodeAdapter(model, AdaptSettings(params="svf+head"), policy=SVFPolicy(stages=("layer4",)),
                        lora=LoRAConfig())
    assert not ad.fast and ad.fixed_shot == 3
    start = {k: v.clone() for k, v in ad.model.state_dict().items()}
    imgs, masks = supports(3)
    losses = ad.adapt(imgs, masks, 7, steps=3, lr=1e-2, generator=torch.Generator().manual_seed(0))
    assert len(losses) == 3 and all(math.isfinite(v) for v in losses) and losses[-1] < losses[0]
    q = torch.randn(1, 3, SIZE, SIZE)
    assert ad.predict(q, imgs[None], masks[None], torch.tensor([7])).shape == (1, 2, SIZE, SIZE)
    ad.reset()
    assert all(torch.equal(v, start[k]) for k, v in ad.model.state_dict().items())
