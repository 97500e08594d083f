"""CLI smoke tests on tiny synthetic data: prepare, train, resume, test, merge, predict, report, errors."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import tiny_run_args
from svfseg.cli import main



def tiny(root, out, name, *extra):
    # SVF on layer2 only: the cheapest stage to decompose, still trains through the backbone.
    return tiny_run_args(root, out, name, "train.val_episodes=4", "train.log_every=1", "train.val_every=1",
                         "train.select_on=test_fold", "svf.stages=[layer2]", *extra)


@pytest.fixture(scope="module")
def trained(data_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs")
    assert main(["train", *tiny(data_root, out, "svf")]) == 0
    return out / "svf"


def test_train_writes_run_folder(trained):
    for f in ("config.yaml", "meta.json", "train_log.csv", "val_log.csv", "curves.png", "best.pt", "last.pt",
              "train_summary.json", "val_episodes_test_fold.json"):
        assert (trained / f).exists(), f
    assert any((trained / "tb").iterdir())
    meta = json.loads((trained / "meta.json").read_text())
    assert meta["svfseg_version"] and "git_commit" in meta
    summary = json.loads((trained / "train_summary.json").read_text())
    assert summary["status"] == "finished" and summary["step"] == 4 and len(summary["history"]) == 2
    last = torch.load(trained / "last.pt", weights_only=True)
    assert last["describe"]["regime"] == "svf" and last["describe"]["fold"] == 0


def test_test_merge_predict_report(trained, data_root, tmp_path, capsys):
    best = trained / "best.pt"
    out = tmp_path / "test"
    assert main(["test", "--checkpoint", str(best), "--protocol", "bam", "eval.num_episodes=5",
                 "eval.seeds=[0, 1]", "--save-vis", "2", "--out", str(out)]) == 0
    res = json.loads((out / "results.json").read_text())
    assert [r["seed"] for r in res["runs"]] == [0, 1] and all(r["episodes"] == 5 for r in res["runs"])
    assert set(res["summary"]["miou"]) == {"mean", "std", "best", "values"}
    assert res["novel_classes"] == [1, 2, 3, 4, 5] and len(res["runs"][0]["episode_fingerprint"]) == 16
    md = (out / "results.md").read_text()
    assert "mean ± std" in md and "FB-IoU" in md
    assert len(list((out / "vis").glob("*.png"))) == 2

    merged = tmp_path / "merged.pt"
    assert main(["merge", "--checkpoint", str(best), "--out", str(merged)]) == 0
    out_m = tmp_path / "test_merged"
    ep_file = trained / "val_episodes_test_fold.json"
    assert main(["test", "--checkpoint", str(best), "--episodes", str(ep_file), "--out", str(tmp_path / "t1")]) == 0
    assert main(["test", "--checkpoint", str(merged), "--episodes", str(ep_file), "--out", str(out_m)]) == 0
    a = json.loads((tmp_path / "t1" / "results.json").read_text())
    b = json.loads((out_m / "results.json").read_text())
    assert b["merged"] and b["regime"] == "frozen"
    assert abs(a["summary"]["miou"]["mean"] - b["summary"]["miou"]["mean"]) < 1e-3

    # predict from files on disk, with the checkpoint and with the merged export
    rng = np.random.default_rng(0)
    img = (rng.random((50, 70, 3)) * 255).astype(np.uint8)
    Image.fromarray(img).save(tmp_path / "s.jpg")
    mask = np.zeros((50, 70), np.uint8)
    mask[10:30, 20:50] = 255
    Image.fromarray(mask).save(tmp_path / "s.png")
    Image.fromarray(img[::-1]).save(tmp_path / "q1.jpg")
    Image.fromarray(img[:, ::-1]).save(tmp_path / "q2.png")
    for ck, d in ((best, "p1"), (merged, "p2")):
        assert main(["predict", "--checkpoint", str(ck), "--support", str(tmp_path / "s.jpg"),
                     str(tmp_path / "s.png"), "--query", str(tmp_path / "q1.jpg"), str(tmp_path / "q2.png"),
                     "--out", str(tmp_path / d)]) == 0
        for q in ("q1", "q2"):
            m = np.array(Image.open(tmp_path / d / f"{q}_mask.png"))
            assert m.shape == (50, 70) and set(np.unique(m)) <= {0, 255}
            assert (tmp_path / d / f"{q}_overlay.png").exists()
    same = np.mean(np.array(Image.open(tmp_path / "p1" / "q1_mask.png")) ==
                   np.array(Image.open(tmp_path / "p2" / "q1_mask.png")))
    assert same > 0.99

    capsys.readouterr()
    assert main(["report", str(tmp_path / "test"), str(out_m)]) == 0
    table = capsys.readouterr().out
    assert "| synthetic | efficientnet_lite0 | PFENet + SVF |" in table
    assert "| synthetic | efficientnet_lite0 | PFENet |" in table  # the merged export counts as frozen


def test_kill_and_resume_through_cli(data_root, tmp_path):
    full = tiny(data_root, tmp_path, "full", "model.regime=frozen", "train.val_every=0")
    assert main(["train", *full]) == 0
    assert main(["train", *tiny(data_root, tmp_path, "cut", "model.regime=frozen", "train.val_every=0",
                                "train.stop_after_steps=3")]) == 130
    # a second start without resume refuses to overwrite the run
    assert main(["train", *tiny(data_root, tmp_path, "cut", "model.regime=frozen", "train.val_every=0")]) == 1
    assert main(["train", "--resume", str(tmp_path / "cut"), "train.stop_after_steps=null"]) == 0
    a = torch.load(tmp_path / "full" / "last.pt", weights_only=True)["model"]
    b = torch.load(tmp_path / "cut" / "last.pt", weights_only=True)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_select_on_heldout_base_classes(data_root, tmp_path):
    assert main(["train", *tiny(data_root, tmp_path, "sel", "model.regime=frozen", "train.epochs=1",
                                "train.select_on=base_heldout")]) == 0
    from svfseg.data.episodes import EpisodeList
    from svfseg.data.splits import class_split

    eps = EpisodeList.load(tmp_path / "sel" / "val_episodes_base_heldout.json")
    base0 = set(class_split("synthetic", 0).base)
    assert eps.split == "val" and {e.class_id for e in eps.episodes} <= base0  # never a test-fold class
    best = torch.load(tmp_path / "sel" / "best.pt", weights_only=True)
    assert best["metrics"]["on"] == "base_heldout"


def test_torchrun_two_processes(data_root, tmp_path):
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "svfseg", "train", *tiny(data_root, tmp_path, "ddp", "model.regime=frozen", "train.epochs=1",
                                         "train.val_every=0")]
    env = {**__import__("os").environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    state = torch.load(tmp_path / "ddp" / "last.pt", weights_only=True)
    assert state["step"] == 2 and len(state["rng_per_rank"]) == 2


def test_config_errors_name_the_key(data_root, tmp_path, capsys):
    assert main(["train", *tiny(data_root, tmp_path, "x", "optim.lrr=0.1")]) == 2
    assert "did you mean 'optim.lr'" in capsys.readouterr().err
    assert main(["train", "optim.lr=0.1"]) == 2
    assert "--config" in capsys.readouterr().err


def test_checkpoint_from_other_fold_or_model_is_refused(trained, capsys):
    assert main(["test", "--checkpoint", str(trained / "best.pt"), "fold=1", "eval.num_episodes=2"]) == 1
    err = capsys.readouterr().err
    assert "fold: checkpoint has 0, this run expects 1" in err
    assert main(["test", "--checkpoint", str(trained / "best.pt"), "model.name=baseline"]) == 1
    assert "name: checkpoint has 'pfenet', this run expects 'baseline'" in capsys.readouterr().err


def test_predict_bad_inputs_name_the_file(trained, tmp_path, capsys):
    Image.fromarray(np.zeros((20, 20, 3), np.uint8)).save(tmp_path / "s.png")
    Image.fromarray(np.zeros((20, 20), np.uint8)).save(tmp_path / "empty.png")
    (tmp_path / "broken.jpg").write_bytes(b"not an image")
    ck = str(trained / "best.pt")
    assert main(["predict", "--checkpoint", ck, "--support", str(tmp_path / "s.png"), str(tmp_path / "empty.png"),
                 "--query", str(tmp_path / "s.png"), "--out", str(tmp_path / "o")]) == 1
    err = capsys.readouterr().err
    assert "empty.png" in err and "no foreground" in err
    mask = np.zeros((20, 20), np.uint8)
    mask[5:9, 5:9] = 1  # a 0/1 mask is fine
    Image.fromarray(mask).save(tmp_path / "m01.png")
    assert main(["predict", "--checkpoint", ck, "--support", str(tmp_path / "s.png"), str(tmp_path / "m01.png"),
                 "--query", str(tmp_path / "broken.jpg"), "--out", str(tmp_path / "o")]) == 1
    assert "broken.jpg" in capsys.readouterr().err
