"""The recipes' facts from upstream code, pinned: the SVF authors' two regimes per group, upstream validation.

Each value below was read from the upstream file the recipe's comment names (zechao-li/SVF-few-shot-
segmentation 5e288a7: config/*/*_split0_*.yaml, train_{pfenet,aspp,BAM}.py, model/*.py get_optim,
util/util.py poly_learning_rate; dvlab-research/PFENet a505675 train.py; chunbolang/BAM c0f935c train.py).
"""
from __future__ import annotations

from pathlib import Path

import pytest

from svfseg.compare import ComparePlan, cell_config
from svfseg.config import ConfigError, load_config
from svfseg.engine.optim import poly_lr

CONFIGS = Path(__file__).resolve().parents[1] / "src" / "svfseg" / "configs"
AUTHORS = sorted(CONFIGS.glob("*/svf_authors/*.yaml"))

#: The lr of each optimiser group at the first step and the schedule's power, per regime.
#: svf: True: get_optim's head groups at base_lr 0.015, layer2-4 at base_lr / 10, a cosine scheduler rebuilt every
#: iteration (constant). svf: False: every head group at base_lr, poly_learning_rate x10 (index_split -1), power 0.9.
AUTHORS_LR = {"svf": ({"head": 0.015, "svf": 0.0015}, 0.0), "frozen": ({"head": 0.15}, 0.9)}


def _group_lrs(cfg, step: int, total: int) -> dict[str, float]:
    lr = poly_lr(step, total, cfg.optim.lr, cfg.optim.power)
    groups = ("head", "svf") if cfg.model.regime == "svf" else ("head",)
    return {g: lr * cfg.optim.lr_mult[g] for g in groups}


def test_every_authors_recipe_exists_for_both_benchmarks():
    assert [f"{p.parent.parent.name}/{p.stem}" for p in AUTHORS] == [
        f"{b}/{h}_{n}" for b in ("coco", "pascal") for h in ("bam", "baseline", "pfenet") for n in ("resnet50", "vgg16")]


@pytest.mark.parametrize("path", AUTHORS, ids=lambda p: f"{p.parent.parent.name}/{p.stem}")
@pytest.mark.parametrize("regime", sorted(AUTHORS_LR))
def test_authors_recipes_train_each_regime_as_their_code(path, regime):
    cfg = load_config(path, [f"model.regime={regime}"])
    start, power = AUTHORS_LR[regime]
    assert _group_lrs(cfg, 0, 1000) == pytest.approx(start)
    assert cfg.optim.power == power
    half = {g: v * 0.5 ** power for g, v in start.items()}
    assert _group_lrs(cfg, 500, 1000) == pytest.approx(half)
    assert (cfg.optim.momentum, cfg.optim.weight_decay, cfg.optim.warmup_steps) == (0.9, 1e-4, 0)
    assert cfg.train.batch_size == 8 and cfg.train.epochs == (200 if "pascal" in path.parts else 50)
    assert (cfg.train.val_every, cfg.train.val_episodes, cfg.train.val_seed) == (1, 1000, 321)
    assert (cfg.train.early_stop_epochs, cfg.train.half_epoch_val_max_epochs) == (75, 100)
    assert cfg.output_dir == "runs/svf_authors"


def test_compare_cells_of_an_authors_recipe_take_their_regimes_schedule(tmp_path):
    path = CONFIGS / "pascal" / "svf_authors" / "pfenet_resnet50.yaml"
    plan = ComparePlan(config=str(path), regimes=["frozen", "svf"], seeds=[0], out=tmp_path)
    frozen = cell_config(plan, 0, 1, "frozen", 0, None)
    svf = cell_config(plan, 0, 1, "svf", 0, None)
    assert (frozen.optim.lr, frozen.optim.power, svf.optim.lr, svf.optim.power) == (0.015, 0.9, 0.0015, 0.0)
    assert frozen.train.batch_size == svf.train.batch_size == 8


def test_by_regime_sits_under_the_command_line_and_is_checked(tmp_path):
    path = CONFIGS / "pascal" / "svf_authors" / "pfenet_resnet50.yaml"
    assert load_config(path, ["model.regime=frozen", "optim.lr=0.01"]).optim.lr == 0.01
    assert load_config(path, ["model.regime=full"]).optim.lr == 0.0015  # no entry: the recipe's own keys
    bad = tmp_path / "bad.yaml"
    for body, message in (("by_regime: {frozzen: {optim: {lr: 1.0}}}", "'by_regime.frozzen' is not a regime"),
                          ("by_regime: {frozen: {model: {regime: svf}}}", "cannot set it"),
                          ("by_regime: [1]", "must map regime names")):
        bad.write_text(body + "\n")
        with pytest.raises(ConfigError, match=message):
            load_config(bad, ["model.regime=frozen"])
    with pytest.raises(ConfigError, match="recipe key"):
        load_config(path, ["by_regime.frozen.optim.lr=1"])


# --- validation as upstream --------------------------------------------------------------------------

#: (val_every, val_episodes, val_seed): PFENet's train.py validates when `epoch % 2 == 0 or (epochs <= 50 and
#: epoch % 1 == 0)` on test_num 5,000 (Pascal) / 20,000 (COCO) at manual_seed 321; BAM's every epoch on 1,000 at 321.
UPSTREAM_VALIDATION = {"pascal/pfenet": (2, 5000, 321), "coco/pfenet": (1, 20000, 321),
                       "pascal/bam": (1, 1000, 321), "coco/bam": (1, 1000, 321)}


@pytest.mark.parametrize("recipe", [f"{k}_{b}" for k in UPSTREAM_VALIDATION for b in ("resnet50", "resnet101", "vgg16")])
def test_pfenet_and_bam_recipes_validate_as_upstream(recipe):
    cfg = load_config(CONFIGS / f"{recipe}.yaml")
    key = recipe.rsplit("_", 1)[0]
    assert (cfg.train.val_every, cfg.train.val_episodes, cfg.train.val_seed) == UPSTREAM_VALIDATION[key]
    assert cfg.train.select_on == "test_fold"
