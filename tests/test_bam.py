"""BAM models: PSPNet base learner (stage 1) and the meta learner + ensemble (stage 2), at tiny sizes."""
from __future__ import annotations

import pytest
import torch

from svfseg.models import FewShotOutput, create_model, export_merged
from svfseg.models.heads.bam import BAM, gram_discrepancy, gram_matrix
from svfseg.svf import singular_value_parameters
from conftest import assert_close_to_scale, to_dtype
from test_models import TinyBackbone, episode


BASE = tuple(range(6, 21))  # Pascal fold 0 base classes -> channels 1..15


def stage1(seed=0, kind="os8"):
    torch.manual_seed(seed)
    steps = (2, 2, 2, 1, 1) if kind == "os8" else (2, 2, 2, 2, 2)
    return create_model("bam_base", backbone=TinyBackbone(steps=steps, seed=seed), regime="full",
                        num_classes=len(BASE) + 1)


def stage2(mode="frozen", shot=1, state=None, kind="os8", dtype=torch.float32, **kw):
    # dtype: the backbone's before SVF decomposes it (float64: the factors rebuild W to ~1e-16)
    torch.manual_seed(1)
    steps = (2, 2, 2, 1, 1) if kind == "os8" else (2, 2, 2, 2, 2)
    return create_model("bam", backbone=TinyBackbone(steps=steps, seed=5).to(dtype), regime=mode, base_classes=BASE,
                        shot=shot, base_state=state, reduce_dim=16, **kw).to(dtype)


# -- stage 1 -----------------------------------------------------------------------------------
def test_base_learner_shapes_gradients_groups_and_bn():
    model = stage1()
    x = torch.randn(2, 3, 65, 49)
    bn = model.backbone.layer2[1]
    before = bn.running_mean.clone()
    logits = model(x)
    assert logits.shape == (2, 16, 65, 49)
    torch.nn.functional.cross_entropy(logits, torch.randint(0, 16, (2, 65, 49))).backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    assert not torch.equal(before, bn.running_mean)  # BAM trains the backbone BN in stage 1
    groups = {g["name"]: g for g in model.parameter_groups()}
    assert set(groups) == {"backbone", "head"}
    assert sum(p.numel() for g in groups.values() for p in g["params"]) == sum(p.numel() for p in model.parameters())
    assert model.describe()["num_classes"] == 16 and model.describe()["head"]["ppm_bins"] == [1, 2, 3, 6]
    model.eval()
    assert model(x).shape == (2, 16, 65, 49)
    frozen = create_model("bam_base", backbone=TinyBackbone(), regime="frozen", num_classes=16)
    assert [g["name"] for g in frozen.parameter_groups()] == ["head"]
    with pytest.raises(ValueError, match="does not use SVF"):
        create_model("bam_base", backbone=TinyBackbone(), regime="svf", num_classes=16)


def test_base_learner_without_train_bn_trains_the_backbone_with_every_batchnorm_fixed():
    # BAM never trains BN affine parameters under fixed statistics; the regime registry configures it so
    from svfseg.models.backbones import is_frozen_batchnorm

    model = create_model("bam_base", backbone=TinyBackbone(), regime="full", num_classes=16, train_bn=False)
    bns = [m for m in model.backbone.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    assert bns and all(is_frozen_batchnorm(m) and not any(p.requires_grad for p in m.parameters()) for m in bns)
    bn_params = {id(p) for m in bns for p in m.parameters()}
    others = [p for p in model.backbone.parameters() if id(p) not in bn_params]
    assert others and all(p.requires_grad for p in others)
    model.train()
    assert model.backbone.training and not any(m.training for m in bns)
    before = bns[0].running_mean.clone()
    model(torch.randn(2, 3, 33, 33)).sum().backward()
    assert torch.equal(before, bns[0].running_mean) and model.describe()["head"]["train_bn"] is False


# -- stage 2 -----------------------------------------------------------------------------------
@pytest.mark.parametrize("mode,shot,kind", [("frozen", 1, "os8"), ("svf", 1, "os8"), ("svf", 3, "os32")])
def test_bam_shapes_and_gradients(mode, shot, kind):
    model = stage2(mode, shot, stage1(kind=kind).state_dict(), kind=kind)
    q, s, m = episode(b=2, k=shot, size=(65, 57))
    out = model(q, s, m, class_ids=torch.tensor([6, 20]))
    assert isinstance(out, FewShotOutput) and out.logits.shape == (2, 2, 65, 57)
    assert len(out.aux_logits) == 1 and out.aux_logits[0].shape == (2, 2, 65, 57)
    (out.logits.logsumexp(1).mean() + out.aux_logits[0].logsumexp(1).mean()).backward()
    head = [n for n, p in model.named_parameters() if p.requires_grad and not n.startswith("backbone.")]
    assert {"gram_merge.weight", "cls_merge.weight"} <= set(head)
    assert (shot > 1) == any(n.startswith("kshot_rw.") for n in head)
    assert all(model.get_parameter(n).grad is not None for n in head)
    assert not any(p.requires_grad for p in model.base_learner.parameters())
    svf = dict(singular_value_parameters(model.backbone))
    assert bool(svf) == (mode == "svf")
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in svf.values())
    names = {g["name"] for g in model.parameter_groups()}
    assert names == ({"svf", "head"} if mode == "svf" else {"head"})
    model.eval()
    with torch.no_grad():
        logits = model(q, s, m)
    assert logits.shape == (2, 2, 65, 57) and torch.isfinite(logits).all()


def test_ensemble_initialised_as_pass_through_gives_the_meta_prediction():
    model = stage2("frozen", 1, stage1().state_dict()).eval()
    q, s, m = episode(b=2, k=1, size=(41, 41))
    with torch.no_grad():
        parts = model.forward_parts(q, s, m)
        torch.testing.assert_close(parts.final, parts.meta.softmax(1), rtol=0, atol=1e-6)
        assert torch.equal(parts.final.argmax(1), parts.meta.argmax(1))
        assert parts.base_map.abs().sum() > 0  # the base map exists but is ignored at init
        model.cls_merge.weight.copy_(torch.tensor([1.0, -1.0]).view(1, 2, 1, 1))
        assert not torch.allclose(model.forward_parts(q, s, m).final, parts.final)


def test_base_map_excludes_the_episode_class_in_training():
    model = stage2("frozen", 1, stage1().state_dict())
    with torch.no_grad():  # make the base learner say "class 9" (channel 4) everywhere
        model.base_learner.cls[-1].bias.zero_()
        model.base_learner.cls[-1].bias[4] = 50.0
    q, s, m = episode(b=2, k=1, size=(33, 33))
    parts = model.forward_parts(q, s, m, class_ids=torch.tensor([9, 10]))
    assert parts.base_map[0].max() < 1e-6  # the episode's own class is left out ...
    assert parts.base_map[1].min() > 1 - 1e-6  # ... but not another episode's
    prob = parts.base.softmax(1)
    torch.testing.assert_close(parts.base_map[1], prob[1, 1:].sum(0, keepdim=True) - prob[1, 5:6], rtol=0, atol=1e-6)
    model.eval()
    with torch.no_grad():  # eval: every base class counts (the episode class is novel there)
        assert model.forward_parts(q, s, m).base_map.min() > 1 - 1e-6
    model.train()
    with pytest.raises(ValueError, match="training needs class_ids"):
        model(q, s, m)
    with pytest.raises(ValueError, match=r"must be of base classes .* got class ids \[3\]"):
        model(q, s, m, class_ids=[3, 9])


def test_stage1_weights_reach_both_backbones_and_base_learner_stays_undecomposed(precision):
    dtype, rel = precision
    base = stage1().to(dtype)
    x = torch.randn(1, 3, 33, 33, dtype=dtype)
    base.eval()
    with torch.no_grad():
        want = base(x)
        layer4 = base.backbone.forward_stages(x, ("layer4",))["layer4"]
    model = stage2("svf", 1, base.state_dict(), dtype=dtype).eval()
    with torch.no_grad():
        torch.testing.assert_close(model.base_learner(x), want)
        meta4 = model.backbone.forward_stages(x, ("layer4",))["layer4"]
        assert_close_to_scale(meta4, layer4, rel)  # U S Vh = W, another operation order
        for _, p in singular_value_parameters(model.backbone):
            p.mul_(1.5)  # training S changes the meta backbone only
        assert not torch.allclose(model.backbone.forward_stages(x, ("layer4",))["layer4"], layer4, atol=1e-3)
        torch.testing.assert_close(model.base_learner(x), want)


def test_incompatible_stage1_state_is_refused():
    bad = create_model("bam_base", backbone=TinyBackbone(seed=0), num_classes=11).state_dict()
    with pytest.raises(ValueError, match=r"stage-1 base learner does not fit.*cls\.4\.weight"):
        stage2("frozen", 1, bad)
    with pytest.raises(ValueError, match="stage-1 backbone weights does not fit"):
        stage2("frozen", 1, {"backbone.nope": torch.zeros(1)})


def test_k_shot_weights_follow_the_shots_and_k_is_fixed():
    model = stage2("frozen", 3, stage1().state_dict())
    psi = torch.tensor([[0.3, 0.1, 0.2], [0.5, 0.5, 0.1]])
    w = model.shot_weights(psi)
    torch.testing.assert_close(w.sum(1), torch.ones(2))
    perm = torch.tensor([2, 0, 1])
    torch.testing.assert_close(model.shot_weights(psi[:, perm]), w[:, perm])
    q, s, m = episode(b=1, k=2)
    with pytest.raises(ValueError, match="built for 3-shot"):
        model(q, s, m, class_ids=[6])
    assert model.describe()["shot_independent"] is False and model.describe()["head"]["shot"] == 3


def test_gram_discrepancy_formula():
    gen = torch.Generator().manual_seed(0)
    q = torch.rand(2, 4, 5, 6, generator=gen)
    s = torch.rand(2, 3, 4, 7, 3, generator=gen)  # supports may have another size than the query
    psi = gram_discrepancy(q, s)
    assert psi.shape == (2, 3)
    for b in range(2):
        for k in range(3):
            fq, fs = q[b].flatten(1), s[b, k].flatten(1)
            gq = (fq @ fq.T) / (fq.norm(dim=1)[:, None] * fq.norm(dim=1)[None] + 1e-7)
            gs = (fs @ fs.T) / (fs.norm(dim=1)[:, None] * fs.norm(dim=1)[None] + 1e-7)
            torch.testing.assert_close(psi[b, k], (gq - gs).norm() / 4, rtol=1e-5, atol=1e-6)
    same = gram_discrepancy(q, q.unsqueeze(1))
    assert same.abs().max() < 1e-6
    assert torch.allclose(gram_matrix(q).diagonal(dim1=1, dim2=2), torch.ones(2, 4), atol=1e-5)


def test_merged_export_matches_svf_model(precision):
    dtype, rel = precision
    model = stage2("svf", 1, stage1().state_dict(), dtype=dtype)
    with torch.no_grad():
        for _, p in singular_value_parameters(model.backbone):
            p.mul_(1.1)
    model.eval()
    q, s, m = to_dtype(episode(b=1, k=1, size=(33, 33)), dtype)
    with torch.no_grad():
        want = model(q, s, m)
        merged = export_merged(model)
        assert isinstance(merged, BAM) and merged.regime == "frozen"
        assert_close_to_scale(merged(q, s, m), want, rel)


def test_both_stages_on_efficientnet_lite0_at_65px():
    torch.manual_seed(0)
    base = create_model("bam_base", backbone="efficientnet_lite0", regime="full", num_classes=16)
    x = torch.randn(2, 3, 65, 65)
    logits = base(x)
    assert logits.shape == (2, 16, 65, 65)
    logits.logsumexp(1).mean().backward()
    assert all(p.grad is not None for p in base.backbone.parameters())
    model = create_model("bam", backbone="efficientnet_lite0", regime="svf", base_classes=BASE, shot=1,
                         base_state=base.state_dict())
    q, s, m = episode(b=2, k=1, size=(65, 65))
    out = model(q, s, m, class_ids=[6, 7])
    assert out.logits.shape == (2, 2, 65, 65)
    (out.logits.logsumexp(1).mean() + out.aux_logits[0].logsumexp(1).mean()).backward()
    assert all(p.grad is not None for _, p in singular_value_parameters(model.backbone))


def test_bf16_autocast_keeps_psi_in_float32():
    model = stage2("svf", 2, stage1().state_dict())
    q, s, m = episode(b=2, k=2, size=(41, 41))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(q, s, m, class_ids=[6, 7])
        parts = model.forward_parts(q, s, m, class_ids=[6, 7])
    assert out.logits.shape == (2, 2, 41, 41) and torch.isfinite(out.logits.float()).all()
    assert parts.psi.dtype == torch.float32
    # bf16 features, float32 Gram: psi stays within 2% of the full-precision value
    torch.testing.assert_close(parts.psi, model.forward_parts(q, s, m, class_ids=[6, 7]).psi, rtol=2e-2, atol=1e-4)
    out.logits.float().logsumexp(1).mean().backward()
