"""SVF on the real ResNet backbones: the paper's trainable counts and a kilobyte state file."""

import pytest
import torch
from torch import nn

from svfseg.models.backbones import create_backbone
from svfseg.svf import (
    SVFConfig,
    apply_svf,
    full_rank,
    save_svf,
    singular_value_parameters,
    trainable_parameter_report,
)

STAGES = ["layer2", "layer3", "layer4"]


@pytest.mark.parametrize("name, expected", [("resnet50_deep", 12_544), ("resnet101", 25_600)])
def test_layer2_4_singular_value_count_matches_paper(name, expected):
    model = create_backbone(name, output_stride=8)
    total = sum(
        full_rank(m.weight.shape, m.groups)
        for stage in STAGES
        for m in getattr(model, stage).modules()
        if isinstance(m, nn.Conv2d)
    )
    assert total == expected


def test_resnet50_apply_report_and_state_file(tmp_path):
    before = torch.get_num_threads()
    model = create_backbone("resnet50", output_stride=8).eval()
    plain_total = sum(p.numel() for p in model.parameters())
    x = torch.randn(1, 3, 33, 33, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model.forward_stages(x, ("layer1", "layer4"))
    apply_svf(model, SVFConfig(target_modules=STAGES))
    assert torch.get_num_threads() == before  # the single-threaded SVD is undone
    assert sum(p.numel() for _, p in singular_value_parameters(model)) == 12_544
    assert trainable_parameter_report(model) == (
        f"trainable params: 12,544 || all params: {plain_total:,} || "
        f"trainable%: {100 * 12_544 / plain_total:.4f}"
    )
    assert not any(p.requires_grad for p in model.layer1.parameters())
    with torch.no_grad():
        out = model.forward_stages(x, ("layer1", "layer4"))
    torch.testing.assert_close(out["layer1"], ref["layer1"], rtol=0, atol=0)
    rel = (out["layer4"] - ref["layer4"]).norm() / ref["layer4"].norm()
    assert rel <= 1e-5
    path = tmp_path / "resnet50_svf.safetensors"
    save_svf(path, model)
    assert 12_544 * 4 < path.stat().st_size < 12_544 * 4 + 16_384  # ~50 KB: values + names
