"""Two gloo processes on the CPU: training agrees with one process on the same global batch;
sharded evaluation reduces to exactly the single-process sums."""
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from svfseg.engine.distributed import DistInfo
from svfseg.engine.loop import fit
from svfseg.engine.state import TrainingState
from svfseg.engine.tasks import FewShotTask, EvalSet
from svfseg.engine.tasks.fewshot import evaluate
from conftest import assert_close_to_scale
from test_engine_toys import ToyEval, ToyFewShot, ToyTrain, toy_config


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(tmp_path, name, info):
    torch.manual_seed(0)
    model = ToyFewShot(dropout=0.0)  # dropout masks would differ between 1 and 2 processes
    cfg = toy_config(tmp_path, f"name={name}", "train.epochs=2")
    (tmp_path / name).mkdir(exist_ok=True)
    state = TrainingState(cfg, model, run_dir=tmp_path / name, describe=model.describe(), train_items=12, info=info)
    res = fit(cfg, state, ToyTrain(n=12), task=FewShotTask(), val=EvalSet(ToyEval(9), (1, 2)))
    scores = evaluate(model, ToyEval(9), class_ids=(1, 2), device=torch.device("cpu"), info=info)
    return model, res, scores


def _worker(rank, world, port, tmp_path, out):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        model, res, scores = _run(tmp_path, "ddp", DistInfo(rank, world, rank, torch.device("cpu")))
        if rank == 0:
            torch.save({"weights": model.state_dict(), "best": res.best, "scores": scores,
                        "history": res.history}, out)
    finally:
        dist.barrier()
        dist.destroy_process_group()


def test_two_gloo_processes_match_single_process(tmp_path):
    out = tmp_path / "ddp_result.pt"
    mp.spawn(_worker, args=(2, _free_port(), tmp_path, out), nprocs=2, join=True)
    ddp = torch.load(out, weights_only=False)
    model, res, scores = _run(tmp_path, "single", None)
    single = model.state_dict()
    for k, v in single.items():
        # gradients all-reduced over two ranks vs one batch: another summation order, so float32
        # rounding relative to each tensor's scale (an element-wise rtol fails on near-zero weights)
        if v.is_floating_point():
            assert_close_to_scale(ddp["weights"][k], v, 1e-5, k)
        else:
            assert torch.equal(v, ddp["weights"][k]), k
    assert any(not torch.equal(v, ToyFewShot(dropout=0.0).state_dict()[k]) for k, v in single.items())
    # evaluation: sharded sums equal the single-process sums exactly (same weights up to float noise
    # would not guarantee this, so score the DDP weights in one process)
    model.load_state_dict(ddp["weights"])
    again = evaluate(model, ToyEval(9), class_ids=(1, 2), device=torch.device("cpu"))
    for key in ("miou", "fb_iou", "episodes", "per_class", "episodes_per_class"):
        assert again[key] == ddp["scores"][key], key
    assert [h["step"] for h in ddp["history"]] == [h["step"] for h in res.history] == [4, 8]
