"""A head registered from outside the package, with its own recipe, trains and tests through the CLI.

Nothing in svfseg.engine or svfseg.cli knows this model: the registry entry and its recipe are
all it takes (the architecture promise of ARCHITECTURE.md).
"""
from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from svfseg.cli import main
from svfseg.data import generate_synthetic
from svfseg.engine import checkpoint as ckpt
from svfseg.models import FewShotModel, ModelRecipe, SVFPolicy, register_model
from svfseg.models.backbones import list_backbones, register_backbone
from svfseg.models.blocks import masked_average_pool
from test_models import TinyBackbone

TOY, TINY = "toy_cosine_head", "tiny_toy_head"


class ToyRecipe(ModelRecipe):
    """Derives a constructor keyword from the config, as BAM's recipe derives its base classes."""

    def model_kwargs(self, cfg):
        return {"temperature": 5.0 + cfg.shot}


@register_model(TOY, recipe=ToyRecipe())
class CosineHead(FewShotModel):
    """Cosine similarity of layer2 query features to the masked support prototype, two logits."""

    model_name = TOY
    feature_stages = ("layer2",)
    masked_support_stage = None

    def __init__(self, backbone: nn.Module, *, temperature: float, **kwargs):
        super().__init__(backbone, **kwargs)
        self.temperature = temperature
        self.bias = nn.Parameter(torch.zeros(2))

    def head_config(self):
        return {"temperature": self.temperature}

    def forward_head(self, feats):
        q = feats.query["layer2"]
        s = feats.support["layer2"].flatten(0, 1)
        fg = feats.support_fg.flatten(0, 1).unsqueeze(1)
        proto = masked_average_pool(s, fg).reshape(q.shape[0], -1, q.shape[1], 1, 1).mean(1)
        sim = torch.cosine_similarity(q, proto, dim=1).unsqueeze(1) * self.temperature
        return torch.cat([-sim, sim], dim=1) + self.bias.view(1, 2, 1, 1), ()


if TINY not in list_backbones():
    register_backbone(TINY, lambda: TinyBackbone())


@pytest.mark.slow
def test_toy_head_trains_and_tests_through_the_cli(tmp_path):
    root = generate_synthetic(tmp_path / "syn", seed=4, n_train=80, n_val=60, size=64, workers=1)
    out = tmp_path / "runs"
    recipe = tmp_path / "toy.yaml"  # a user's own recipe for their own head
    recipe.write_text(f"""
data: {{benchmark: synthetic, root: {root}, train_crop: 64, test_size: 64, workers: 0}}
model: {{name: {TOY}, backbone: {TINY}, regime: svf}}
svf: {{stages: [layer2]}}
optim: {{lr_mult: {{head: 10, svf: 1}}}}
train: {{epochs: 1, steps_per_epoch: 3, batch_size: 2, val_every: 1, val_episodes: 4, progress: false,
        tensorboard: false}}
""")
    common = ["--config", str(recipe), f"output_dir={out}", "name=toy"]
    assert main(["train", *common]) == 0
    best = ckpt.load(out / "toy" / "best.pt")
    assert best["describe"]["name"] == TOY and best["describe"]["head"] == {"temperature": 6.0}
    assert best["describe"]["regime"] == "svf" and best["step"] == 3
    # The head's own parameter and the singular values of layer2 (only they) were trained.
    start = CosineHead(TinyBackbone(), temperature=6.0, regime="svf", svf_policy=SVFPolicy(stages=("layer2",)))
    assert not torch.equal(best["model"]["bias"], start.bias.detach())
    for name, value in start.state_dict().items():
        moved = not torch.equal(best["model"][name], value)
        assert moved == (name == "bias" or name.endswith(".S")), name
    assert main(["test", "--checkpoint", str(out / "toy" / "best.pt"), "eval.num_episodes=6",
                 "eval.seeds=[0]"]) == 0
    res = json.loads((out / "toy" / "test_hsnet_1shot" / "results.json").read_text())
    assert res["model"] == TOY and res["runs"][0]["episodes"] == 6 and 0.0 <= res["runs"][0]["miou"] <= 1.0
