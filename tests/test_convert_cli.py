"""A converted upstream checkpoint through `svfseg test`, `predict`, `merge` and `model.init_from` (SVF)."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from svfseg.cli import main
from svfseg.config import load_config
from svfseg.convert import FORMATS, Manifest
from svfseg.engine.model import build_model
from svfseg.engine.resolved import resolve_run
from svfseg.svf import merge_svf, svf_layers
from test_data_episodes import MIN_PX, make_root

FIXTURES = Path(__file__).parent / "fixtures" / "upstream"
RECIPE = Path(__file__).resolve().parents[1] / "src" / "svfseg" / "configs" / "pascal" / "pfenet_resnet50.yaml"
SMALL = [f"data.min_pixels={MIN_PX}", "data.test_size=64", "data.workers=0"]


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """A tiny Pascal-layout root and a PFENet (ResNet-50, deep stem) file converted from a manifest stand-in."""
    tmp = tmp_path_factory.mktemp("convert")
    root = make_root(tmp / "pascal")
    up = Manifest.load(FIXTURES / "pfenet_resnet50_deep.json").fake_state(seed=7)
    # random stand-in weights a network can run: positive BN variances, small conv weights
    up = {k: v.abs() + 1 if k.endswith("running_var") else v * 0.05 if k.endswith("weight") and v.dim() == 4 else v
          for k, v in up.items()}
    src = tmp / "train_epoch_107_0.6897.pth"
    torch.save({"epoch": 107, "state_dict": up}, src)
    out = tmp / "pfenet_fold0.pt"
    assert main(["convert", "--from", "pfenet", str(src), "--out", str(out)]) == 0
    return root, out, up


def test_converted_model_is_tested_predicted_and_merged(converted, tmp_path, capsys):
    root, conv, _ = converted
    out = tmp_path / "test"
    assert main(["test", "--checkpoint", str(conv), "--protocol", "pfenet", f"data.root={root}", *SMALL,
                 "eval.num_episodes=3", "--out", str(out)]) == 0
    res = json.loads((out / "results.json").read_text())
    assert res["merged"] and res["regime"] == "frozen" and res["runs"][0]["episodes"] == 3
    assert res["protocol"] == "pfenet" and res["runs"][0]["seed"] == 321

    rng = np.random.default_rng(0)
    img = (rng.random((40, 48, 3)) * 255).astype(np.uint8)
    Image.fromarray(img).save(tmp_path / "s.jpg")
    mask = np.zeros((40, 48), np.uint8)
    mask[10:30, 10:40] = 255
    Image.fromarray(mask).save(tmp_path / "s.png")
    Image.fromarray(img[::-1]).save(tmp_path / "q.jpg")
    assert main(["predict", "--checkpoint", str(conv), "--support", str(tmp_path / "s.jpg"), str(tmp_path / "s.png"),
                 "--query", str(tmp_path / "q.jpg"), "--size", "64", "--out", str(tmp_path / "pred")]) == 0
    assert np.array(Image.open(tmp_path / "pred" / "q_mask.png")).shape == (40, 48)

    capsys.readouterr()
    assert main(["merge", "--checkpoint", str(conv), "--out", str(tmp_path / "m.pt")]) == 0
    assert "nothing to merge" in capsys.readouterr().out and not (tmp_path / "m.pt").exists()


def test_init_from_puts_the_converted_weights_under_svf(converted, tmp_path):
    root, conv, up = converted
    over = [f"data.root={root}", *SMALL, "model.regime=svf", f"model.init_from={conv}",
            f"output_dir={tmp_path}", "train.epochs=1", "train.steps_per_epoch=1", "train.batch_size=1",
            "data.train_crop=64", "train.val_every=0", "train.select_on=last", "train.tensorboard=false"]
    # the recipe's backbone file (pretrained/resnet50_v2.pth) is not needed: init_from gives every weight
    model = build_model(resolve_run(load_config(RECIPE, over)))
    assert any(True for _ in svf_layers(model.backbone))
    head = {k: v for k, v in model.state_dict().items() if not k.startswith("backbone.")}
    key = FORMATS["pfenet"].upstream_key
    assert all(torch.equal(v, up[key(k)]) for k, v in head.items())
    plain = merge_svf(model.backbone).state_dict()
    for k in ("layer2.0.conv2.weight", "layer4.2.conv3.weight", "layer0.conv1.weight"):
        torch.testing.assert_close(plain[k], up[key("backbone." + k)], rtol=0, atol=1e-5 * up[key("backbone." + k)]
                                   .abs().max().item())
    # and a run starts from it through the command line
    assert main(["train", "--config", str(RECIPE), *over, "name=from_converted"]) == 0
    assert (tmp_path / "from_converted" / "last.pt").is_file()


def test_init_from_refuses_another_fold_and_an_svf_checkpoint(converted, tmp_path):
    root, conv, _ = converted
    base = [f"data.root={root}", *SMALL, f"model.init_from={conv}"]
    with pytest.raises(ValueError, match=r"model.init_from=.*fold: checkpoint has 0, this run expects 1"):
        build_model(resolve_run(load_config(RECIPE, [*base, "fold=1", "model.regime=frozen"])))
    with pytest.raises(ValueError, match="'model.init_head' and 'model.init_from' are both set"):
        load_config(RECIPE, [*base, f"model.init_head={conv}"])
    # a run's SVF checkpoint holds U, S, Vh, not the plain weights: merged first, it is a model file
    blob = torch.load(conv, weights_only=True)
    blob["describe"]["regime"] = "svf"
    svf_file = tmp_path / "svf_best.pt"
    torch.save(blob, svf_file)
    with pytest.raises(ValueError, match="model.regime=svf one .*svfseg merge --checkpoint"):
        build_model(resolve_run(load_config(RECIPE, [*base, f"model.init_from={svf_file}"])))


def test_init_from_a_converted_bam_needs_no_stage1_checkpoint(tmp_path):
    # BAM's stage-1 base learner comes with the converted file, so model.base_checkpoint is not read
    up = Manifest.load(FIXTURES / "bam_resnet50_deep_pascal_1shot.json").fake_state(seed=2)
    src = tmp_path / "bam.pth"
    torch.save({"state_dict": up}, src)
    conv = tmp_path / "bam.pt"
    assert main(["convert", "--from", "bam", str(src), "--out", str(conv)]) == 0
    recipe = RECIPE.parent / "bam_resnet50.yaml"
    cfg = load_config(recipe, [f"model.init_from={conv}", "model.regime=svf", f"output_dir={tmp_path / 'none'}"])
    model = build_model(resolve_run(cfg))
    key = FORMATS["bam"].upstream_key
    base = {k: v for k, v in model.state_dict().items() if k.startswith("base_learner.")}
    assert base and all(torch.equal(v, up[key(k)]) for k, v in base.items())
    assert any(True for _ in svf_layers(model.backbone)) and not any(True for _ in svf_layers(model.base_learner))
