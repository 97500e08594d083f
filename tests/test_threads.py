"""The `threads` setting holds wherever the work happens: each compare cell's training and scoring, the warm start."""
import logging
from pathlib import Path

import pytest
import torch

import svfseg.engine.run as run_mod
from conftest import TINY_SIZE
from svfseg.cli import main
from svfseg.engine.tasks import FewShotTask

RECIPE = Path(__file__).resolve().parents[1] / "configs" / "synthetic" / "pfenet_efficientnet_lite0.yaml"


@pytest.fixture
def two_threads():
    """The process starts at 2 torch threads (what one per core gives on 2 cores), and gets its count back."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def test_compare_threads_hold_in_every_cell_the_warm_start_and_the_scoring(data_root, tmp_path, monkeypatch,
                                                                            caplog, two_threads):
    seen = {"train": [], "test": []}
    real_fit, real_test = run_mod.fit, FewShotTask.test

    def fit(cfg, *args, **kwargs):
        seen["train"].append((cfg.name, torch.get_num_threads()))
        return real_fit(cfg, *args, **kwargs)

    def test(self, *args, **kwargs):
        seen["test"].append(torch.get_num_threads())
        return real_test(self, *args, **kwargs)

    monkeypatch.setattr(run_mod, "fit", fit)
    monkeypatch.setattr(FewShotTask, "test", test)
    args = ["compare", "--config", str(RECIPE), "--regimes", "frozen,svf", "--seeds", "0", "--threads", "1",
            "--warm-start", "1", "--out", str(tmp_path / "cmp"), "--test-episodes", "2", "--val-episodes", "2",
            f"data.root={data_root}", f"data.train_crop={TINY_SIZE}", f"data.test_size={TINY_SIZE}",
            "train.steps_per_epoch=1", "train.batch_size=2", "train.progress=false", "svf.stages=[layer4]"]
    with caplog.at_level(logging.INFO, logger="svfseg.engine.run"):
        assert main(args) == 0
    assert seen["train"] == [("warm_start", 1), ("frozen_seed0", 1), ("svf_seed0", 1)]
    assert seen["test"] == [1, 1]
    logged = [r.getMessage() for r in caplog.records if r.getMessage().startswith("torch threads:")]
    assert len(logged) == 3 and all(m.startswith("torch threads: 1 (threads=1;") for m in logged)
    assert torch.get_num_threads() == 2  # the command's setting ends with it
