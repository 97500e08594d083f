"""Config: defaults <- YAML <- dotlist, closest-key errors, recipes parse."""
from pathlib import Path

import pytest

from svfseg.config import ConfigError, dump_yaml, from_dict, load_config, parse_dotlist, to_dict

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def test_dotlist_overrides_yaml_and_defaults(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("fold: 2\noptim:\n  lr: 0.01\n  lr_mult: {head: 5.0}\nsvf:\n  enabled: true\n")
    cfg = load_config(recipe, ["fold=1", "shot=5", "svf.enabled=false", "optim.lr=0.005",
                               "data.train_scale=[0.8, 1.25]", "model.weights=null"])
    assert (cfg.fold, cfg.shot, cfg.model.regime, cfg.optim.lr) == (1, 5, "frozen", 0.005)
    assert cfg.data.train_scale == (0.8, 1.25)
    # lr_mult merges key by key: head from the recipe, svf/backbone from the defaults
    assert cfg.optim.lr_mult == {"head": 5.0, "svf": 1.0, "backbone": 1.0}
    assert cfg.optim.momentum == 0.9  # default untouched
    assert load_config(None, ["optim.lr=1e-4"]).optim.lr == 1e-4  # YAML 1.1 would read "1e-4" as a string
    # ... and so in the lr_mult map (compare's --backbone-lr 1e-5 writes optim.lr_mult.svf=1e-05)
    assert load_config(None, ["optim.lr_mult.svf=1e-05", "optim.lr_mult.backbone=1e+20"]).optim.lr_mult == \
        {"head": 10.0, "svf": 1e-5, "backbone": 1e20}
    with pytest.raises(ConfigError, match="'optim.lr_mult.svf' must be a number >= 0, found nan"):
        load_config(None, ["optim.lr_mult.svf=nan"])


def test_unknown_key_names_closest_valid_key():
    with pytest.raises(ConfigError, match=r"unknown config key 'optim.lrr'.*did you mean 'optim.lr'"):
        load_config(None, ["optim.lrr=0.1"])
    with pytest.raises(ConfigError, match=r"'fodl'.*did you mean 'fold'"):
        load_config(None, ["fodl=1"])


def test_unknown_key_in_yaml_names_the_file(tmp_path):
    recipe = tmp_path / "bad.yaml"
    recipe.write_text("train:\n  epoch: 3\n")
    with pytest.raises(ConfigError, match=r"bad.yaml.*'train.epoch'.*did you mean 'train.epochs'"):
        load_config(recipe)


def test_wrong_types_and_values_name_the_key():
    with pytest.raises(ConfigError, match="'fold' expects int"):
        load_config(None, ["fold=abc"])
    with pytest.raises(ConfigError, match="'svf.enabled' expects bool"):
        load_config(None, ["svf.enabled=3"])
    with pytest.raises(ConfigError, match="'train.amp' must be one of"):
        load_config(None, ["train.amp=fp8"])
    with pytest.raises(ConfigError, match="'fold' must be 0..3"):
        load_config(None, ["fold=4"])
    with pytest.raises(ConfigError, match="key=value"):
        parse_dotlist(["fold"])


def test_roundtrip_through_dict_and_yaml(tmp_path):
    cfg = load_config(None, ["fold=3", "svf.stages=[layer3, layer4]"])
    again = from_dict(to_dict(cfg))
    assert again == cfg
    p = tmp_path / "c.yaml"
    p.write_text(dump_yaml(cfg))
    assert load_config(p) == cfg


def test_base_inheritance(tmp_path):
    (tmp_path / "base.yaml").write_text("train:\n  epochs: 7\n  batch_size: 3\n")
    (tmp_path / "child.yaml").write_text("_base_: base.yaml\ntrain:\n  epochs: 9\n")
    cfg = load_config(tmp_path / "child.yaml")
    assert (cfg.train.epochs, cfg.train.batch_size) == (9, 3)


def test_every_recipe_loads():
    recipes = sorted(p for p in CONFIGS.rglob("*.yaml") if not p.name.startswith("_"))
    assert len(recipes) >= 13, recipes
    # The one documented departure: the demo's PFENet recipe runs its 64-wide head at 20x (README, "The demo"),
    # with the backbone groups at the base lr as everywhere else.
    demo = CONFIGS / "synthetic" / "pfenet_efficientnet_lite0.yaml"
    for p in recipes:
        cfg = load_config(p)
        if p == demo:
            assert cfg.optim.lr_mult == {"head": 20.0, "svf": 1.0, "backbone": 1.0}, p
            continue
        assert cfg.optim.lr_mult["head"] == 10.0, p
        if cfg.model.regime == "svf":
            assert cfg.optim.lr_mult["svf"] * 10 == cfg.optim.lr_mult["head"], p  # S at 1/10 of the head lr


def test_regime_is_one_key_and_the_old_pair_still_works(tmp_path, caplog):
    assert load_config(None).model.regime == "svf"
    assert load_config(None, ["model.regime=full"]).model.regime == "full"
    with pytest.raises(ConfigError, match="'model.regime' must be one of"):
        load_config(None, ["model.regime=lora-ish"])
    # svfseg 0.1's two keys combine across layers exactly as they did: svf.enabled wins when true,
    # and a backbone_mode given while SVF was on counts once SVF is switched off.
    recipe = tmp_path / "old.yaml"
    recipe.write_text("model:\n  backbone_mode: train\n")
    with caplog.at_level("WARNING"):
        assert load_config(recipe).model.regime == "svf"
        assert load_config(recipe, ["svf.enabled=false"]).model.regime == "full"
    assert "deprecated; use model.regime" in caplog.text
    assert load_config(None, ["svf.enabled=false"]).model.regime == "frozen"
    with pytest.raises(ConfigError, match="keep only model.regime"):
        load_config(None, ["model.regime=svf", "svf.enabled=false"])
    # A config stored by svfseg 0.1 (e.g. in a checkpoint) reads as the same regime.
    old = to_dict(load_config(None))
    del old["model"]["regime"]
    old["model"]["backbone_mode"], old["svf"]["enabled"] = "train", False
    assert from_dict(old).model.regime == "full"
    assert "enabled" not in to_dict(from_dict(old))["svf"]
