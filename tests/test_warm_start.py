"""A shared head warm start: `model.init_head` and `svfseg compare --warm-start`."""
import json
from pathlib import Path

import pytest
import torch

from conftest import TINY_SIZE
from svfseg.cli import main

RECIPE = Path(__file__).resolve().parents[1] / "configs" / "synthetic" / "pfenet_efficientnet_lite0.yaml"


def _overrides(root):
    return [f"data.root={root}", f"data.train_crop={TINY_SIZE}", f"data.test_size={TINY_SIZE}",
            "train.steps_per_epoch=2", "train.batch_size=2", "train.progress=false", "train.log_every=1",
            "svf.stages=[layer2]"]


def _compare_args(root, out):
    return ["compare", "--config", str(RECIPE), "--regimes", "frozen,svf", "--seeds", "0", "--out", str(out),
            "--test-episodes", "4", "--val-episodes", "4", "--warm-start", "2", *_overrides(root)]


def test_compare_warm_start_starts_every_cell_from_one_trained_head(data_root, tmp_path):
    from svfseg.compare import ComparePlan, cell_config
    from svfseg.engine import checkpoint as ckpt
    from svfseg.engine.model import build_model
    from svfseg.engine.resolved import resolve_run
    from svfseg.engine.warmstart import head_state

    out = tmp_path / "cmp"
    assert main(_compare_args(data_root, out)) == 0
    res = json.loads((out / "compare.json").read_text())
    warm_ckpt = out / "runs" / "fold0_1shot" / "warm_start" / "best.pt"
    assert res["warm_start"] and Path(res["warm_start"][0]["checkpoint"]) == warm_ckpt
    assert "Warm start: every cell started from one shared head, trained 2 steps" in (out / "compare.md").read_text()
    warm = ckpt.load(warm_ckpt)
    assert warm["step"] == 2 and warm["describe"]["regime"] == "frozen"
    # the warm start trained the head: it is not the random initialisation
    plan = ComparePlan(config=str(RECIPE), regimes=["frozen", "svf"], seeds=[0], out=out, warm_start=2,
                       overrides=_overrides(data_root), test_episodes=4, val_episodes=4)
    for regime in ("frozen", "svf"):
        cfg = cell_config(plan, 0, 1, regime, 0, None)
        assert cfg.model.init_head == str(warm_ckpt)
        model = build_model(resolve_run(cfg))
        mine = head_state(model.state_dict())
        assert mine.keys() == head_state(warm["model"]).keys()
        for k, v in head_state(warm["model"]).items():
            assert torch.equal(mine[k], v), k
    fresh_cfg = cell_config(plan, 0, 1, "frozen", 0, None)
    fresh_cfg.model.init_head = None
    fresh = head_state(build_model(resolve_run(fresh_cfg)).state_dict())
    assert any(not torch.equal(fresh[k], v) for k, v in head_state(warm["model"]).items())


def test_init_head_refuses_a_missing_or_foreign_file_in_one_line(data_root, tmp_path, capsys):
    from conftest import tiny_run_args

    rc = main(["train", *tiny_run_args(data_root, tmp_path, "a", f"model.init_head={tmp_path / 'nope.pt'}")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc != 0 and "model.init_head" in err[-1] and "no such checkpoint" in err[-1]
    assert not (tmp_path / "a").exists()  # refused before the run folder is made
    # a checkpoint of another head width does not fit
    assert main(["train", *tiny_run_args(data_root, tmp_path, "b", "model.head.reduce_dim=32")]) == 0
    capsys.readouterr()
    rc = main(["train", *tiny_run_args(data_root, tmp_path, "c", f"model.init_head={tmp_path / 'b' / 'best.pt'}")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc != 0 and "does not fit" in err[-1] and "Traceback" not in "\n".join(err)


def test_a_cell_is_redone_when_the_warm_start_it_started_from_was_made_otherwise(tmp_path):
    from svfseg.compare.cells import _check_cell_settings, _write_cell_record, cell_settings
    from svfseg.engine.runfolder import RunFolder
    from svfseg.compare.cells import CellSettingsChanged
    from svfseg.config import ExperimentConfig

    warm = tmp_path / "warm_start"
    warm.mkdir()
    RunFolder(warm).cell_record.write_text(json.dumps({"config": {"train.steps_per_epoch": 200}}))
    cfg = ExperimentConfig()
    cfg.output_dir, cfg.name, cfg.model.init_head = str(tmp_path), "svf_seed0", str(warm / "best.pt")
    cfg.run_dir().mkdir(parents=True)
    _write_cell_record(cfg.run_dir(), cell_settings(cfg, None))
    assert _check_cell_settings(cfg, None, force=False) is None  # same head: the cell is reused
    # `compare --force --warm-start 300` retrained the shared head: same path, another head
    RunFolder(warm).cell_record.write_text(json.dumps({"config": {"train.steps_per_epoch": 300}}))
    with pytest.raises(CellSettingsChanged, match=r"the shared warm start \(--warm-start\) it started from"):
        _check_cell_settings(cfg, None, force=False)
    assert _check_cell_settings(cfg, None, force=True) == "retrain"
