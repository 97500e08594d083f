"""Issue 30, items 2, 5, 6 and 7: overrides and config values refused (or accepted) in one line, before any work."""
from pathlib import Path

import pytest

from conftest import error_line
from svfseg.cli import main

RECIPE = Path(__file__).resolve().parents[1] / "configs" / "synthetic" / "pfenet_efficientnet_lite0.yaml"


# ---------------------------------------------------------------- item 6: overrides anywhere on the line


def test_overrides_are_read_anywhere_on_the_command_line(tmp_path, capsys):
    # fold=9 after an option: read as an override (refused by the config check, which names it), not
    # argparse's "unrecognized arguments"
    out = str(tmp_path / "e.json")
    assert main(["episodes", "--config", str(RECIPE), "shot=1", "--count", "5", "--out", out, "fold=9"]) == 2
    assert "'fold' must be 0..3, found 9" in error_line(capsys, "episodes")
    assert main(["train", "--config", str(RECIPE), "name=x", "--threads", "1", "shot=0"]) == 2
    assert "'shot' must be >= 1, found 0" in error_line(capsys, "train")
    assert main(["test", "--checkpoint", str(tmp_path / "none.pt"), "--config", str(RECIPE), "shot=1",
                 "--protocol", "hsnet", "fold=9"]) == 2
    assert "found 9" in error_line(capsys, "test")
    # the later of two overrides of one key wins, as typed
    assert main(["episodes", "--config", str(RECIPE), "fold=9", "--count", "5", "--out", out, "fold=7"]) == 2
    assert "found 7" in error_line(capsys, "episodes")
    # what is not an override is still refused by argparse
    with pytest.raises(SystemExit):
        main(["episodes", "--config", str(RECIPE), "--out", out, "fold=1", "--count", "5", "stray"])
    assert "unrecognized arguments: stray" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["predict", "--checkpoint", "c.pt", "--support", "a", "b", "--query", "q", "--out", "o", "fold=1"])


# ---------------------------------------------------------------- item 2: keys compare owns


def _compare(tmp_path, *extra):
    return ["compare", "--config", str(RECIPE), "--regimes", "frozen,svf", "--seeds", "0", "--out",
            str(tmp_path / "cmp"), f"data.root={tmp_path / 'no-data'}", *extra]


@pytest.mark.parametrize("extra, expected", [
    (["fold=2", "shot=5"], "the override 'fold=2' sets fold, which compare sets in every cell (it would be replaced): "
                           "use --folds 2"),
    (["--vary", "fold=1|2"], "--vary fold=1|2 varies fold, which compare sets in every cell of 'svf' (the rows would "
                             "not differ as labelled): use --folds 1 2"),
    (["--vary", "svf:seed=1|2"], "use --seeds 1,2"),
    (["--vary", "svf:model.regime=svf|full"], "use --regimes svf,full"),
    (["model.regime=full"], "use --regimes full"),
    (["model.backbone_mode=train"], "sets model.regime"),  # svfseg 0.1's alias of model.regime
    (["train.val_episodes=50"], "use --val-episodes 50"),
    (["--vary", "svf:train.val_episodes=5|9"], "use --val-episodes 5,9"),
    (["train.val_episodes_file=v.json"], "set its size with --val-episodes N"),
    (["name=mine"], "compare names each cell's folder"),
    (["output_dir=elsewhere"], "use --out elsewhere"),
    (["--backbone-lr", "1,10", "optim.lr_mult.svf=5"], "--backbone-lr 1,10 sets it per cell"),
    (["--backbone-lr", "1,10", "optim.lr_mult={backbone: 5}"], "sets optim.lr_mult.backbone"),
    (["--backbone-lr", "1,10", "--vary", "svf:optim.lr_mult.svf=1|2"], "varies optim.lr_mult.svf"),
    (["--warm-start", "2", "model.init_head=h.pt"], "--warm-start starts every cell from the head it trains"),
    (["--threads", "1", "threads=2"], "use --threads 2"),
    (["--folds", "0", "1", "fold=0"], "use --folds 0"),  # the override after a list option, too
])
def test_compare_refuses_overrides_of_the_keys_it_sets(tmp_path, capsys, extra, expected):
    assert main(_compare(tmp_path, *extra)) == 1
    line = error_line(capsys, "compare")
    assert expected in line, line
    assert not (tmp_path / "cmp").exists()  # refused before anything is made


def test_compare_keeps_overrides_of_keys_it_sets_only_sometimes(tmp_path):
    from svfseg.compare import ComparePlan, cell_config
    from svfseg.compare.plan import check_owned_keys

    # no sweep: the recipe's multipliers are the user's; no --threads: `threads` is the user's; no warm start
    plan = ComparePlan(config=str(RECIPE), regimes=["frozen", "svf"], seeds=[0], out=tmp_path,
                       overrides=["optim.lr_mult.svf=5", "threads=2", "model.init_head=h.pt", "train.epochs=3"])
    check_owned_keys(plan)
    cfg = cell_config(plan, 0, 1, "svf", 0, None)
    assert cfg.optim.lr_mult["svf"] == 5 and cfg.threads == 2 and cfg.model.init_head == "h.pt"
    assert cfg.train.epochs == 3 and cfg.train.select_on == "base_heldout" and cfg.seed == 0
    # a sweep owns the multipliers of the rows that train the backbone only
    plan.backbone_lr, plan.overrides, plan.regimes = [1.0, 10.0], ["optim.lr_mult.head=3"], ["frozen"]
    check_owned_keys(plan)


# ---------------------------------------------------------------- item 7: every key checked when loaded


@pytest.mark.parametrize("override, expected", [
    ('model.name=""', "config key 'model.name' must be a registered model (e.g. pfenet), found ''"),
    ('model.backbone=""', "config key 'model.backbone' must be a backbone"),
    ("model.head.reduce_dim=-5", "config key 'model.head.reduce_dim' must be a finite number >= 0"),
    ("model.backbone_kwargs.output_stride=-8", "'model.backbone_kwargs.output_stride' must be a finite number"),
    ("lora.r=1000000000", "config key 'lora.r' must be <= 4096"),
    ('output_dir=""', "config key 'output_dir' must be a folder (e.g. runs), found ''"),
    ("train.val_episodes=-5", "config key 'train.val_episodes' must be >= 1, found -5"),
    ("train.val_episodes=2000000", "config key 'train.val_episodes' must be <= 1,000,000 episodes"),
    ("eval.num_episodes=0", "config key 'eval.num_episodes' must be >= 1 or null, found 0"),
    ("eval.save_vis=-1", "config key 'eval.save_vis' must be >= 0, found -1"),
    ("train.early_stop_epochs=-1", "config key 'train.early_stop_epochs' must be >= 0, found -1"),
    ("train.half_epoch_val_max_epochs=-1", "'train.half_epoch_val_max_epochs' must be >= 0"),
    # item 6: an empty data root, an empty seed list (it fell back to the protocol's seeds), a non-UTF-8 name
    ('data.root=""', "config key 'data.root' must be a prepared dataset folder (e.g. data/pascal), found ''"),
    ("eval.seeds=[]", "config key 'eval.seeds' must list at least one seed, or be null for the protocol's seeds"),
    ("eval.seeds=[-1]", "'eval.seeds' must hold seeds in 0 .. 2**32-1, found -1"),
    ("data.root=/data/caf\udce9", "command-line override 'data.root=/data/caf\\xe9': expected UTF-8 text"),
])
def test_values_only_training_or_test_read_are_refused_by_every_command(tmp_path, capsys, override, expected):
    # `episodes` builds no model and trains nothing: the config check alone refuses the value
    assert main(["episodes", "--config", str(RECIPE), "--out", str(tmp_path / "e.json"), override]) == 2
    line = error_line(capsys, "episodes")
    assert expected in line, line


def test_keys_only_the_model_registry_knows_are_refused_before_any_data_is_read(tmp_path, capsys):
    from svfseg.config import load_config
    from svfseg.engine.model import build_model
    from svfseg.engine.resolved import resolve_run

    no_data = f"data.root={tmp_path / 'none'}"  # read after the registry's checks: never reached
    assert main(["train", "--config", str(RECIPE), no_data, f"output_dir={tmp_path}", "svf.stages=[layer9]"]) == 2
    assert "config key 'svf.stages' must name stages of efficientnet_lite0" in error_line(capsys, "train")
    assert main(["train", "--config", str(RECIPE), no_data, f"output_dir={tmp_path}", "model.backbone=resnet5"]) == 2
    assert "config key 'model.backbone' must be one of" in error_line(capsys, "train")
    assert not list(tmp_path.iterdir())
    assert main([*_compare(tmp_path, "--vary", "svf:svf.stages=[layer4]|[layer9]")]) == 2
    assert "'svf.stages' must name stages" in error_line(capsys, "compare")
    assert not (tmp_path / "cmp").exists()  # refused before the first cell trains
    # a head's own check, named as its config key (it was a torch RuntimeError)
    cfg = load_config(RECIPE, ["model.head.reduce_dim=0", "model.weights=null"])
    with pytest.raises(ValueError, match=r"config key 'model.head.reduce_dim': expected the head's width"):
        build_model(resolve_run(cfg))
    assert main(["test", "--checkpoint", str(tmp_path / "c.pt"), "--save-vis", "-1"]) == 2
    assert "--save-vis must be >= 0" in error_line(capsys, "test")


# ---------------------------------------------------------------- item 5: episode counts


def test_episode_counts_beyond_the_limit_are_refused_at_once_and_long_lists_log_progress(
        data_root, tmp_path, capsys, caplog, monkeypatch):
    from svfseg.config.schema import MAX_EPISODES as CONFIG_MAX
    from svfseg.data import episodes

    assert episodes.MAX_EPISODES == CONFIG_MAX  # the config's copy (config/ imports no data module)
    out = tmp_path / "e.json"
    assert main(["episodes", "--config", str(RECIPE), f"data.root={data_root}", "--count", "100000000000",
                 "--out", str(out)]) == 2
    assert "--count must be 1 .. 1,000,000" in error_line(capsys, "episodes") and not out.exists()
    with pytest.raises(ValueError, match="episode count must be 1 .. 1,000,000, got 1,000,001"):
        episodes.make_episodes(None, benchmark="synthetic", fold=0, shot=1, seed=0, count=CONFIG_MAX + 1)
    for option in ("--test-episodes", "--val-episodes"):  # refused before the first cell, not after it trained
        assert main([*_compare(tmp_path, option, "100000000000")]) == 1
        assert f"compare: {option}: expected 1 .. 1,000,000 episodes" in error_line(capsys, "compare")
    monkeypatch.setattr(episodes, "PROGRESS_FROM", 10)  # a long list, made short
    caplog.set_level("INFO", logger="svfseg.data.episodes")
    assert main(["episodes", "--config", str(RECIPE), f"data.root={data_root}", "--count", "20", "--out",
                 str(out)]) == 0
    made = [r.getMessage() for r in caplog.records if "of 20 made" in r.getMessage()]
    assert made == [f"episodes: {n} of 20 made" for n in range(2, 21, 2)]
    assert any("writing 20 episodes" in r.getMessage() for r in caplog.records)
