"""Adaptation where users meet it: `svfseg test --adapt`, `svfseg compare --adapt`, the choice on validation only."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import TINY_SIZE, tiny_run_args
from svfseg.cli import main

RECIPE = Path(__file__).resolve().parents[1] / "configs" / "synthetic" / "pfenet_efficientnet_lite0.yaml"
#: A small grid so the choice runs in seconds.
GRID = ["adapt.grid_lr=[0.001,0.01]", "adapt.grid_steps=[1,2]", "adapt.val_episodes=4"]


@pytest.fixture(scope="module")
def checkpoint(data_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("adapt-runs")
    # the grid is in the run's config: `predict --adapt` without steps/lr chooses with it
    assert main(["train", *tiny_run_args(data_root, out, "svf", "train.val_every=0", "train.select_on=last",
                                         *GRID)]) == 0
    return out / "svf" / "best.pt"


def _test(checkpoint, data_root, out, *options, overrides=()):
    assert main(["test", "--checkpoint", str(checkpoint), "--out", str(out), *options, "eval.num_episodes=6",
                 "eval.seeds=[0]", f"data.root={data_root}", "shot=2", "train.progress=false", *overrides]) == 0
    return json.loads((out / "results.json").read_text())


def test_adapt_none_is_exactly_the_plain_test_and_adapting_records_its_choice(checkpoint, data_root, tmp_path):
    plain = _test(checkpoint, data_root, tmp_path / "plain")
    none = _test(checkpoint, data_root, tmp_path / "none", "--adapt", "none")
    zero = _test(checkpoint, data_root, tmp_path / "zero", "--adapt", "svf", "--adapt-steps", "0")
    assert none["runs"][0]["miou"] == plain["runs"][0]["miou"] == zero["runs"][0]["miou"]
    assert none["runs"][0]["per_class"] == plain["runs"][0]["per_class"]
    given = _test(checkpoint, data_root, tmp_path / "given", "--adapt", "svf", "--adapt-steps", "2",
                  "--adapt-lr", "0.01")
    a = given["adapt"]
    assert a["params"] == "svf" and a["chosen"]["source"] == "given" and a["chosen"]["steps"] == 2
    assert a["trainable"] > 0 and given["runs"][0]["seconds_per_episode"] > 0
    assert len(given["runs"][0]["per_episode"]) == 6
    assert "Adapted on each episode's supports: **svf**" in (tmp_path / "given" / "results.md").read_text()


def test_the_choice_reads_only_base_class_validation_episodes(checkpoint, data_root, tmp_path, monkeypatch):
    """Every episode the choice scores is a val-split episode of the next fold's novel classes (base classes here)."""
    from svfseg.engine.adapt import score as adapt_score
    from svfseg.engine.resolved import resolve_benchmark
    from svfseg.engine.model import checkpoint_config

    seen = []
    real = adapt_score.adapted_evaluation

    def spy(adapter, dataset, **kw):
        seen.append(([int(e.class_id) for e in dataset.episodes.episodes], dataset.episodes.fold, kw["counts"]))
        return real(adapter, dataset, **kw)

    monkeypatch.setattr(adapt_score, "adapted_evaluation", spy)
    res = _test(checkpoint, data_root, tmp_path / "chosen", "--adapt", "svf", overrides=GRID)
    bench = resolve_benchmark(checkpoint_config(checkpoint))
    novel = set(bench.split(0).novel)
    choice_calls = seen[:2]  # one per lr of the grid; the test episodes come after
    assert [c[2] for c in choice_calls] == [[0, 1, 2], [1, 2]]
    for classes, fold, _ in choice_calls:
        assert fold == 1 and not set(classes) & novel and set(classes) <= set(bench.split(1).novel)
    trials = res["adapt"]["chosen"]["trials"]
    assert set(trials) == {"none", "lr=0.001 steps=1", "lr=0.001 steps=2", "lr=0.01 steps=1", "lr=0.01 steps=2"}
    chosen = res["adapt"]["chosen"]
    assert trials[chosen["steps"] and f"lr={chosen['lr']:g} steps={chosen['steps']}" or "none"] == max(trials.values())


def test_compare_adapt_writes_rows_with_both_intervals(data_root, tmp_path):
    out = tmp_path / "cmp"
    args = ["compare", "--config", str(RECIPE), "--regimes", "frozen,svf", "--seeds", "0,1", "--out", str(out),
            "--shots", "1", "2", "--test-episodes", "4", "--val-episodes", "4", "--adapt", "none,svf,full",
            f"data.root={data_root}", f"data.train_crop={TINY_SIZE}", f"data.test_size={TINY_SIZE}",
            "train.steps_per_epoch=1", "train.batch_size=2", "train.progress=false", "svf.stages=[layer4]", *GRID]
    assert main(args) == 0
    res = json.loads((out / "compare.json").read_text())
    rows = res["adapt_rows"]
    assert set(rows) == {f"{r} + adapt {a}" for r in ("frozen", "svf") for a in ("svf", "full")}
    for r in rows.values():
        assert r["diff_by_episode"]["n"] == 8  # 4 episodes x 2 shots
        assert r["diff_by_seed"]["n"] == 2 and r["verdict"] in ("better", "worse", "within")
    # the first seed chose; the second reused its choice
    for key, c in res["adapt_choices"].items():
        assert c["seed"] == 0 and c["source"] == "validation"
        later = [a for a in res["adapted"] if a["seed"] == 1 and f"{a['regime']}/{a['adapt']}/fold{a['fold']}/"
                 f"{a['shot']}shot" == key]
        assert later and all(a["steps"] == c["steps"] for a in later)
    md = (out / "compare.md").read_text()
    assert "## Adaptation on each episode's supports" in md and "**svf + adapt svf**" in md and "by episodes" in md
    # a rerun scores nothing again
    stamp = Path(res["adapted"][0]["results"]).stat().st_mtime_ns
    assert main(args) == 0
    assert Path(res["adapted"][0]["results"]).stat().st_mtime_ns == stamp


def _user_images(folder: Path, k: int):
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    pairs = []
    for i in range(k):
        Image.fromarray(rng.integers(0, 255, (48, 60, 3), dtype=np.uint8)).save(folder / f"s{i}.png")
        mask = np.zeros((48, 60), np.uint8)
        mask[10:30, 15 + i:40] = 255
        Image.fromarray(mask).save(folder / f"m{i}.png")
        pairs += ["--support", str(folder / f"s{i}.png"), str(folder / f"m{i}.png")]
    Image.fromarray(rng.integers(0, 255, (40, 50, 3), dtype=np.uint8)).save(folder / "q.png")
    return pairs, folder / "q.png"


def test_predict_adapts_once_to_the_users_supports(checkpoint, data_root, tmp_path, capsys, monkeypatch):
    from conftest import error_line

    pairs, query = _user_images(tmp_path / "in", 2)
    args = ["predict", "--checkpoint", str(checkpoint), *pairs, "--query", str(query)]
    assert main([*args, "--out", str(tmp_path / "given"), "--adapt", "svf", "--adapt-steps", "2",
                 "--adapt-lr", "0.01"]) == 0
    printed = capsys.readouterr().out
    assert "adapted svf (" in printed and "2 steps at lr 0.01 (given)" in printed
    assert (tmp_path / "given" / "q_mask.png").exists()
    # no steps/lr: chosen on the checkpoint's base-class validation episodes (its data root, its config's grid)
    monkeypatch.chdir(data_root.parent)  # the run's data.root is absolute here; the choice only needs it to exist
    assert main([*args, "--out", str(tmp_path / "chosen"), "--adapt", "svf"]) == 0
    assert "on validation" in capsys.readouterr().out  # "chosen on validation", or "not adapting scored best .."
    # ... and without the data there is nothing to choose on: one line that says what to give
    from svfseg.engine.model import checkpoint_config

    cfg = checkpoint_config(checkpoint)
    moved = tmp_path / "elsewhere"
    Path(cfg.data.root).rename(moved)
    try:
        assert main([*args, "--out", str(tmp_path / "none"), "--adapt", "svf"]) == 1
        line = error_line(capsys, "predict")
        assert "--adapt-steps N and --adapt-lr LR" in line and "no such folder" in line
    finally:
        moved.rename(cfg.data.root)


def test_compare_owns_adapt_params(data_root, tmp_path, capsys):
    """`adapt.params=svf` given to compare would score every plain cell adapted: refused, naming --adapt."""
    from conftest import error_line

    assert main(["compare", "--config", str(RECIPE), "--regimes", "frozen", "--seeds", "0", "--out",
                 str(tmp_path / "c"), f"data.root={data_root}", "adapt.params=svf"]) == 1
    line = error_line(capsys, "compare")
    assert "adapt.params" in line and "use --adapt svf" in line
