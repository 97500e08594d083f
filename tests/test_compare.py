"""`svfseg compare` on tiny data: the three files, resume of killed cells, skipped finished cells; the interval code."""
import json
import math
from pathlib import Path

import pytest

from conftest import TINY_SIZE
from svfseg.cli import main
from svfseg.compare.statistics import paired_t_interval

RECIPE = Path(__file__).resolve().parents[1] / "configs" / "synthetic" / "pfenet_efficientnet_lite0.yaml"
SIZE = TINY_SIZE  # the side of the shared `data_root` (conftest)


def test_paired_t_interval_on_a_hand_made_example():
    # differences 1, 2, 3: mean 2, sd 1, t_{0.975, 2} = 4.302653 -> half width 4.302653 / sqrt(3) = 2.484138
    iv = paired_t_interval([11.0, 12.0, 13.0], [10.0, 10.0, 10.0])
    assert iv.mean == 2.0 and iv.n == 3
    assert iv.low == pytest.approx(2 - 2.484138, abs=1e-5) and iv.high == pytest.approx(2 + 2.484138, abs=1e-5)
    assert iv.verdict() == "within"
    # a constant positive difference has zero spread: beyond any interval
    assert paired_t_interval([2.0, 2.0], [1.0, 1.0]).verdict() == "better"
    assert paired_t_interval([0.0, 0.1], [1.0, 1.05]).verdict() == "worse"
    one = paired_t_interval([1.0], [0.0])
    assert one.low is None and one.verdict() == "unknown"
    with pytest.raises(ValueError, match="equally long"):
        paired_t_interval([1.0], [1.0, 2.0])



def _args(root, out, *extra):
    return ["compare", "--config", str(RECIPE), "--regimes", "frozen,svf", "--seeds", "0,1", "--out", str(out),
            "--test-episodes", "4", "--val-episodes", "4", f"data.root={root}", f"data.train_crop={SIZE}",
            f"data.test_size={SIZE}", "train.steps_per_epoch=2", "train.batch_size=2", "train.progress=false",
            "train.log_every=1", "svf.stages=[layer2]", *extra]


def test_compare_writes_three_files_resumes_killed_cells_and_skips_finished(data_root, tmp_path, capsys):
    out = tmp_path / "cmp"
    # "killed" after one of two steps: every cell stops with a resumable last.pt
    assert main(_args(data_root, out, "train.stop_after_steps=1")) == 0
    first = json.loads((out / "compare.json").read_text())
    assert len(first["incomplete"]) == 4 and not first["rows"]
    cell = out / "runs" / "fold0_1shot" / "svf_seed0"
    assert json.loads((cell / "train_summary.json").read_text())["step"] == 1
    # the rerun resumes them to the end (step 2, not a fresh 2-step run: its log keeps step 1's row)
    assert main(_args(data_root, out)) == 0
    res = json.loads((out / "compare.json").read_text())
    for f in ("compare.json", "compare.md", "compare.png"):
        assert (out / f).stat().st_size > 0, f
    assert not res["incomplete"] and set(res["rows"]) == {"frozen", "svf"}
    summary = json.loads((cell / "train_summary.json").read_text())
    assert summary["status"] == "finished" and summary["step"] == 2
    fps = {c["episode_fingerprint"] for c in res["cells"]}
    assert len(fps) == 1  # every cell on the same test episodes
    svf, fro = res["rows"]["svf"], res["rows"]["frozen"]
    assert svf["trainable"]["svf"] > 0 and "svf" not in fro["trainable"]
    assert svf["adapter_bytes"] > 0 and fro["adapter_bytes"] is None
    assert svf["movement_max_stage_mean"] > 0 and fro["movement_max_stage_mean"] is None
    d = svf["diff_to_reference"]
    want = paired_t_interval([svf["per_seed_miou"][s] for s in "01"], [fro["per_seed_miou"][s] for s in "01"])
    assert d["low"] == pytest.approx(want.low) and math.isfinite(d["high"])
    md = (out / "compare.md").read_text()
    assert "| svf |" in md and "**svf**" in md and "beyond the interval" in md
    # a third run retrains nothing: the finished cells' files are untouched
    stamp = (cell / "best.pt").stat().st_mtime_ns
    assert main(_args(data_root, out)) == 0
    assert (cell / "best.pt").stat().st_mtime_ns == stamp
    assert "Verdicts" in capsys.readouterr().out


def test_compare_sweep_chooses_on_validation_and_reuses_the_chosen_cell(data_root, tmp_path):
    from svfseg.compare import ComparePlan, run_compare

    plan = ComparePlan(config=str(RECIPE), regimes=["frozen", "bn"], seeds=[0], out=tmp_path / "sw",
                       backbone_lr=[1.0, 100.0], test_episodes=2, val_episodes=2,
                       overrides=[f"data.root={data_root}", f"data.train_crop={SIZE}", f"data.test_size={SIZE}",
                                  "train.steps_per_epoch=1", "train.batch_size=2", "train.progress=false",
                                  "svf.stages=[layer4]"])
    res = run_compare(plan)
    sweep = res["sweeps"]["bn/fold0/1shot"]
    vals = {float(k): v for k, v in sweep["val_miou"].items()}
    assert sweep["chosen"] == max(vals, key=vals.get)
    assert "frozen/fold0/1shot" not in res["sweeps"]  # nothing of the backbone trains: nothing to sweep
    final = [c for c in res["cells"] if c["regime"] == "bn"]
    assert len(final) == 1 and final[0]["lr_mult"] == sweep["chosen"]
    assert res["rows"]["bn"]["trainable"]["backbone"] > 0


def test_lora_trains_merges_and_the_merged_file_scores_the_same(data_root, tmp_path):
    """model.regime=lora through the CLI: train, `svfseg merge`, and both score identically on one episode file."""
    out = tmp_path / "runs"
    args = ["--config", str(RECIPE), f"data.root={data_root}", f"output_dir={out}", "name=lora",
            f"data.train_crop={SIZE}", f"data.test_size={SIZE}", "train.steps_per_epoch=2", "train.batch_size=2",
            "train.progress=false", "model.regime=lora", "lora.r=2", "svf.stages=[layer4]",
            "optim.lr_mult.backbone=100"]
    assert main(["train", *args]) == 0
    run = out / "lora"
    trainable = json.loads((run / "trainable.json").read_text())
    assert trainable["regime"] == "lora" and trainable["backbone"] > 0
    fp = json.loads((run / "train_summary.json").read_text())["footprint"]
    assert fp["adapter"]["file"] and fp["movement"]["layer4"]["max"] > 0
    assert main(["merge", "--checkpoint", str(run / "best.pt"), "--out", str(tmp_path / "merged.pt")]) == 0
    scores = []
    for ckpt, name in ((run / "best.pt", "a"), (tmp_path / "merged.pt", "b")):
        assert main(["test", "--checkpoint", str(ckpt), "--out", str(tmp_path / name), "eval.num_episodes=4",
                     "eval.seeds=[0]", f"data.root={data_root}"]) == 0
        scores.append(json.loads((tmp_path / name / "results.json").read_text())["runs"][0])
    assert scores[0]["episode_fingerprint"] == scores[1]["episode_fingerprint"]
    assert scores[0]["miou"] == pytest.approx(scores[1]["miou"], abs=1e-6)
    assert scores[0]["fb_iou"] == pytest.approx(scores[1]["fb_iou"], abs=1e-6)


def test_a_diverged_sweep_trial_is_named_in_compare_md_and_json(data_root, tmp_path):
    """A trial whose loss went NaN is a result of the sweep: compare.md and compare.json say so, in the loss's words.

    lr x1e30: the first updates make the trained BN weights inf, and the loss of the step after is not finite.
    """
    import re

    from svfseg.compare import ComparePlan, run_compare
    from svfseg.compare.render import compare_markdown

    plan = ComparePlan(config=str(RECIPE), regimes=["frozen", "bn"], seeds=[0], out=tmp_path / "sw",
                       backbone_lr=[1.0, 1e30], test_episodes=2, val_episodes=2,
                       overrides=[f"data.root={data_root}", f"data.train_crop={SIZE}", f"data.test_size={SIZE}",
                                  "train.steps_per_epoch=3", "train.batch_size=2", "train.progress=false"])
    for attempt in range(2):  # the rerun reads the trial's diverged.txt instead of training it again
        res = run_compare(plan)
        sweep = res["sweeps"]["bn/fold0/1shot"]
        assert sweep["chosen"] == 1.0 and sweep["val_miou"]["1e+30"] is None
        reason = sweep["diverged"]["1e+30"]
        assert re.match(r"loss is (nan|inf|-inf) \(main .*\) at step \d; training stopped", reason), reason
        assert list(sweep["diverged"]) == ["1e+30"]
        md = (plan.out / "compare.md").read_text()
        assert re.search(r"- bn/fold0/1shot: val mIoU x1: \d+\.\d\d, x1e\+30: diverged \(loss is \S+ \(main [^)]*\) "
                         r"at step \d\) -> x1\n", md), md
        assert json.loads((plan.out / "compare.json").read_text())["sweeps"]["bn/fold0/1shot"]["diverged"] == \
            sweep["diverged"]
    del res["sweeps"]["bn/fold0/1shot"]["diverged"]  # a compare.json written before the sweep record had it
    assert "x1e+30: – -> x1" in compare_markdown(res)


def test_a_trial_whose_weights_went_inf_with_a_finite_loss_is_diverged_not_a_crash(data_root, tmp_path):
    """lr x1e30 over 2 steps: the BN weights are inf at the epoch's end while the loss seen was finite.

    The save refuses them (NonFiniteWeights); compare records the trial as diverged and goes on.
    """
    from svfseg.compare import ComparePlan, run_compare

    plan = ComparePlan(config=str(RECIPE), regimes=["frozen", "bn"], seeds=[0], out=tmp_path / "inf",
                       backbone_lr=[1.0, 1e30], test_episodes=2, val_episodes=2,
                       overrides=[f"data.root={data_root}", f"data.train_crop={SIZE}", f"data.test_size={SIZE}",
                                  "train.steps_per_epoch=2", "train.batch_size=2", "train.progress=false"])
    sweep = run_compare(plan)["sweeps"]["bn/fold0/1shot"]
    assert sweep["chosen"] == 1.0 and sweep["val_miou"]["1e+30"] is None
    assert "hold NaN/inf at step 2" in sweep["diverged"]["1e+30"] and "loss was finite" in sweep["diverged"]["1e+30"]
    assert "x1e+30: diverged (" in (plan.out / "compare.md").read_text()
