"""`svfseg train --resume`: last.pt is read once and its weights enter the model once (engine.state)."""
from pathlib import Path

import torch
from torch import nn

from svfseg.cli import main
from svfseg.engine import checkpoint as ckpt
from svfseg.models.fewshot import FewShotModel
from conftest import tiny_run_args


def _count_reads_and_loads(monkeypatch) -> dict:
    """Count reads of a run's last.pt (or its fallback) and whole-model load_state_dict calls."""
    counts = {"reads": 0, "model_loads": 0}
    read, load_state_dict = ckpt.load, nn.Module.load_state_dict

    def counting_read(path, *a, **kw):
        if Path(path).name in ("last.pt", "last.prev.pt"):
            counts["reads"] += 1
        return read(path, *a, **kw)

    def counting_load(self, state, *a, **kw):
        if isinstance(self, FewShotModel):
            counts["model_loads"] += 1
        return load_state_dict(self, state, *a, **kw)

    monkeypatch.setattr(ckpt, "load", counting_read)
    monkeypatch.setattr(nn.Module, "load_state_dict", counting_load)
    return counts


def test_resume_reads_last_pt_once_and_loads_the_weights_once(data_root, tmp_path, monkeypatch):
    args = tiny_run_args(data_root, tmp_path, "cut", "model.regime=svf", "train.val_every=0")
    assert main(["train", *args, "train.stop_after_steps=3"]) == 130
    stopped = ckpt.load(tmp_path / "cut" / "last.pt")
    counts = _count_reads_and_loads(monkeypatch)
    assert main(["train", "--resume", str(tmp_path / "cut"), "train.stop_after_steps=null"]) == 0
    assert counts == {"reads": 1, "model_loads": 1}
    # and the one load is the restore: the run continued from step 3 to its end
    finished = torch.load(tmp_path / "cut" / "last.pt", weights_only=True)
    assert stopped["step"] == 3 and finished["step"] == 4 and finished["status"] == "finished"

