"""CUDA checks (run by benchmarks/gpu.sh): bf16 AMP train step, 1-process NCCL DDP, merged = unmerged."""

from __future__ import annotations

import socket

import pytest
import torch
from torch import nn

from svfseg.models import SVFPolicy, create_model, export_merged
from svfseg.models.backbones.resnet import ResNet
from svfseg.svf import FoldedBatchNorm, singular_value_parameters, svf_layers
from test_models import episode

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU on this machine"),
]


def svf_model(mode: str = "auto", fold: bool = True) -> nn.Module:
    torch.manual_seed(0)
    backbone = ResNet((1, 1, 1, 1), deep_stem=True, output_stride=8)
    with torch.no_grad():
        for m in backbone.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_var.uniform_(0.5, 2.0)
                m.running_mean.uniform_(-0.2, 0.2)
    policy = SVFPolicy(mode=mode, fold_bn=fold)
    return create_model("pfenet", backbone=backbone, regime="svf", svf_policy=policy).cuda()


def cuda_episode(size=(65, 65)):
    return [t.cuda() for t in episode(b=2, k=1, size=size)]


@pytest.mark.parametrize("mode", ["reparam", "factorized", "tune"])
def test_bf16_autocast_train_step_keeps_s_float32(mode):
    model = svf_model(mode).train()
    assert any(isinstance(m, FoldedBatchNorm) for m in model.backbone.modules())
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    before = [p.detach().clone() for _, p in singular_value_parameters(model.backbone)]
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = model(*cuda_episode())
        loss = out.logits.float().square().mean()
    loss.backward()
    for _, p in singular_value_parameters(model.backbone):
        assert p.dtype == torch.float32 and p.grad.dtype == torch.float32
        assert torch.isfinite(p.grad).all()
    opt.step()
    after = [p.detach() for _, p in singular_value_parameters(model.backbone)]
    assert any(not torch.equal(a, b) for a, b in zip(before, after))


@pytest.mark.parametrize("fold", [False, True])
def test_merged_equals_unmerged_on_cuda(fold):
    model = svf_model(fold=fold).eval()
    with torch.no_grad():
        for _, s in singular_value_parameters(model.backbone):
            s.mul_(1 + 0.2 * torch.rand_like(s))
        ep = cuda_episode()
        expected = model(*ep)
        for bn_fold in (False, True):
            merged = export_merged(model, fold_bn=bn_fold)
            assert not list(svf_layers(merged.backbone))
            torch.testing.assert_close(merged(*ep), expected, rtol=1e-3, atol=1e-3)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_one_process_nccl_ddp_step():
    import torch.distributed as dist

    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1)
    try:
        model = svf_model("auto").train()
        ddp = nn.parallel.DistributedDataParallel(model, device_ids=[torch.cuda.current_device()])
        out = ddp(*cuda_episode())
        out.logits.float().square().mean().backward()
        grads = [p.grad for _, p in singular_value_parameters(model.backbone)]
        assert all(g is not None and torch.isfinite(g).all() for g in grads)
        dist.barrier()
    finally:
        dist.destroy_process_group()
