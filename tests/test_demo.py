"""`svfseg demo --quick`: the whole pipeline end to end on tiny synthetic data."""
import json

from svfseg.cli import main


def test_quick_demo_end_to_end(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--quick", "--root", str(tmp_path / "data"), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    res = json.loads((out / "demo_results.json").read_text())
    assert set(res["rows"]) == {"frozen", "svf"}
    fro, svf = res["rows"]["frozen"], res["rows"]["svf"]
    # same fixed episodes for both
    assert fro["episodes"] == svf["episodes"] == res["plan"]["eval_episodes"]
    assert (out / "episodes.json").exists() and len(res["episode_fingerprint"]) == 16
    # SVF trains the head plus the singular values; the S file is small
    assert svf["trainable_params"] > fro["trainable_params"]
    assert svf["s_checkpoint_bytes"] < 200_000 and fro["s_checkpoint_bytes"] is None
    for r in (fro, svf):
        assert 0.0 <= r["miou"] <= 1.0 and 0.0 <= r["fb_iou"] <= 1.0
        assert len(list((out / r["run_dir"].split("/")[-1] / "vis").glob("*.png"))) == 2
    assert "| frozen |" in printed and "| SVF |" in printed and "mIoU (%)" in printed
    assert "svfseg prepare pascal" in printed  # tells the user what to run next
    # a second run reuses the cached data and replaces its own previous outputs
    assert main(["demo", "--quick", "--root", str(tmp_path / "data"), "--out", str(out), "--steps", "1"]) == 0
    assert json.loads((out / "demo_results.json").read_text())["plan"]["steps"] == 1


def test_demo_trains_the_synthetic_recipes(tmp_path):
    """The demo loads the recipe files; its FULL plan only restates their sizes."""
    from pathlib import Path

    from svfseg.config import load_config
    from svfseg.demo import FULL, demo_config, recipe_path, run_overrides

    configs = Path(__file__).resolve().parents[1] / "configs" / "synthetic"
    for head in ("pfenet", "baseline"):
        assert recipe_path(head).resolve() == (configs / f"{head}_efficientnet_lite0.yaml").resolve()
        for regime in ("frozen", "svf"):
            demo = demo_config(FULL, tmp_path / "d", tmp_path / "o", head, regime)
            recipe = load_config(configs / f"{head}_efficientnet_lite0.yaml",
                                 run_overrides(tmp_path / "d", tmp_path / "o", regime))
            assert demo == recipe, (head, regime)
