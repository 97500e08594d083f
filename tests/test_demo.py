"""`svfseg demo --quick`: the whole pipeline, as a compare of frozen / SVF / full, end to end on tiny synthetic data."""
import json

from svfseg.cli import main


def test_quick_demo_end_to_end(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--quick", "--root", str(tmp_path / "data"), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    res = json.loads((out / "demo_results.json").read_text())
    assert set(res["rows"]) == {"frozen", "svf", "full"}
    cmp = json.loads((out / "compare.json").read_text())
    # every cell on the same fixed test episodes
    assert len({c["episode_fingerprint"] for c in cmp["cells"]}) == 1
    assert {c["episodes"] for c in cmp["cells"]} == {res["plan"]["eval_episodes"]}
    fro, svf, full = (res["rows"][r] for r in ("frozen", "svf", "full"))
    assert fro["trainable"]["backbone"] == 0 < svf["trainable"]["backbone"] < full["trainable"]["backbone"]
    assert svf["adapter_bytes"] < 200_000 < full["adapter_bytes"]
    for r in (fro, svf, full):
        assert 0.0 <= r["miou_mean"] <= 1.0 and r["seeds"] == 1
    for f in ("compare.md", "compare.png", "svf/best.pt", "svf/singular_values.safetensors", "frozen/best.pt"):
        assert (out / f).exists(), f
    for regime in ("svf", "frozen"):  # what `svfseg serve` shows beside each checkpoint
        source = json.loads((out / regime / "SOURCE.json").read_text())
        cell = next(c for c in cmp["cells"] if c["regime"] == regime and c["seed"] == source["seed"])
        assert source["cell"] == cell["run_dir"] and source["test_miou"] == cell["miou"]
        assert source["test_episodes"] == res["plan"]["eval_episodes"] and source["benchmark"] == "synthetic"
    assert "| frozen |" in printed and "| svf |" in printed and "Verdicts" in printed
    assert "svfseg prepare pascal" in printed  # tells the user what to run next
    # the adaptation stage: the kept SVF checkpoint with and without adaptation on the same test episodes
    (stage,) = res["adaptation"]
    row = stage["rows"]["svf checkpoint + adapt svf"]
    assert stage["shot"] == 2 and row["diff_by_episode"]["n"] == res["plan"]["adapt"]["test_episodes"]
    assert row["chosen"] and set(row["trials"]) == {"none", "lr=0.01 steps=1"} and row["trainable"] > 0
    assert "## Adaptation on each episode's supports" in printed and "**svf checkpoint + adapt svf**" in printed
    # a second run reuses the cached data and replaces its own previous outputs
    assert main(["demo", "--quick", "--root", str(tmp_path / "data"), "--out", str(out), "--steps", "1"]) == 0
    assert json.loads((out / "demo_results.json").read_text())["plan"]["steps"] == 1


def test_demo_trains_the_synthetic_recipes(tmp_path):
    """The demo's cells are the recipe file plus the plan's sizes plus compare's cell keys."""
    from pathlib import Path

    from svfseg.compare import cell_config
    from svfseg.config import load_config
    from svfseg.demo import FULL, compare_plan, plan_overrides, recipe_path

    configs = Path(__file__).resolve().parents[1] / "configs" / "synthetic"
    for head in ("pfenet", "baseline"):
        assert recipe_path(head).resolve() == (configs / f"{head}_efficientnet_lite0.yaml").resolve()
        plan = compare_plan(FULL, tmp_path / "d", tmp_path / "o", head)
        cfg = cell_config(plan, 0, 1, "svf", 1, 10.0)
        recipe = load_config(configs / f"{head}_efficientnet_lite0.yaml", plan_overrides(FULL, tmp_path / "d"))
        # the cell's model is the recipe's, started from the plan's shared warm start
        assert cfg.model.init_head == str(tmp_path / "o" / "runs" / "fold0_1shot" / "warm_start" / "best.pt")
        cfg.model.init_head = None
        assert cfg.model == recipe.model and cfg.data == recipe.data and cfg.svf == recipe.svf
        assert cfg.seed == 1 and cfg.optim.lr_mult["svf"] == 10.0 and cfg.train.select_on == "base_heldout"
