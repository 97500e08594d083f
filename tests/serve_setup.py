"""Tiny checkpoints and images for the `svfseg serve` tests (no test functions here)."""
import json
import os
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from svfseg.cli import main

RECIPE = Path(__file__).resolve().parents[1] / "configs" / "synthetic" / "pfenet_efficientnet_lite0.yaml"
SIZE = 64


def write_inputs(folder: Path) -> dict[str, Path]:
    """A support image with its 0/255 mask, its empty mask, two queries and a ground truth, as PNG files."""
    folder.mkdir(parents=True, exist_ok=True)
    yy, xx = np.mgrid[:48, :64]
    rng = np.random.default_rng(0)
    blob = ((yy - 20) ** 2 + (xx - 30) ** 2) < 12 ** 2
    img = (rng.random((48, 64, 3)) * 80).astype(np.uint8)
    img[blob] = (200, 60, 40)
    paths = {"support": folder / "support.png", "mask": folder / "support_mask.png", "empty": folder / "empty.png",
             "query": folder / "query.png", "query2": folder / "other.png", "gt": folder / "query_gt.png"}
    Image.fromarray(img).save(paths["support"])
    Image.fromarray((blob * 255).astype(np.uint8)).save(paths["mask"])
    Image.fromarray(np.zeros((48, 64), np.uint8)).save(paths["empty"])
    q_blob = ((yy - 28) ** 2 + (xx - 40) ** 2) < 10 ** 2
    q = (rng.random((48, 64, 3)) * 80).astype(np.uint8)
    q[q_blob] = (190, 70, 50)
    Image.fromarray(q).save(paths["query"])
    Image.fromarray((q_blob * 255).astype(np.uint8)).save(paths["gt"])
    Image.fromarray(img[:, ::-1].copy()).save(paths["query2"])
    return paths


def _classifier_bias_key(state: dict) -> str:
    keys = [k for k, v in state.items() if re.search(r"(^|\.)cls\.\d+\.bias$", k) and tuple(v.shape) == (2,)]
    assert keys, "no 2-class classifier bias in the checkpoint"
    return keys[-1]


def _calibrate(checkpoint: Path, inputs: dict[str, Path]) -> None:
    # One training step leaves a nearly constant prediction (all background); shift the final
    # bias so the test query is about half foreground, so "masks equal" is a real check.
    from svfseg.engine.model import load_for_inference
    from svfseg.predict import _prepare, read_binary_mask, read_rgb, support_tensors

    model, cfg, state = load_for_inference(checkpoint)
    rgb = read_rgb(inputs["support"])
    s_img, s_mask = support_tensors([rgb], [read_binary_mask(inputs["mask"])], cfg.data.test_size)
    q_img, _, (h, w) = _prepare(read_rgb(inputs["query"]), np.zeros((48, 64), np.uint8), cfg.data.test_size)
    with torch.no_grad():
        logits = model(q_img[None], s_img, s_mask)[0, :, :h, :w]
    shift = float((logits[1] - logits[0]).median())
    key = _classifier_bias_key(state["model"])
    state["model"][key] = state["model"][key] + torch.tensor([0.0, -shift])
    torch.save(state, checkpoint)


def make_checkpoints(base: Path) -> dict[str, Path]:
    """Train an SVF and a frozen tiny PFENet one step each on tiny synthetic data; calibrated best.pt paths."""
    root = base / "synthetic-5i"
    assert main(["prepare", "synthetic", "--out", str(root), "--n-train", "120", "--n-val", "20",
                 "--size", str(SIZE), "--workers", "1"]) == 0
    inputs = write_inputs(base / "inputs")
    out = {}
    for regime in ("svf", "frozen"):
        assert main(["train", "--config", str(RECIPE), f"data.root={root}", f"output_dir={base / 'runs'}",
                     f"name={regime}", f"seed={int(regime == 'frozen')}", f"model.regime={regime}",
                     "svf.stages=[layer2]",
                     f"data.train_crop={SIZE}", f"data.test_size={SIZE}", "train.epochs=1",
                     "train.steps_per_epoch=1", "train.batch_size=2", "train.val_every=0", "train.select_on=last",
                     "train.progress=false", "train.tensorboard=false", "model.weights=null"]) == 0
        out[regime] = base / "runs" / regime / "best.pt"
        _calibrate(out[regime], inputs)
    return out


def shared_checkpoints(tmp_path_factory) -> dict[str, Path]:
    """:func:`make_checkpoints` once per test run, shared by the xdist workers (a file lock guards it)."""
    from filelock import FileLock

    if not os.environ.get("PYTEST_XDIST_WORKER"):
        return make_checkpoints(tmp_path_factory.mktemp("serve"))
    base = tmp_path_factory.getbasetemp().parent / "serve-checkpoints"  # this run's folder, common to workers
    done = base / "done.json"
    with FileLock(str(base) + ".lock"):
        if not done.is_file():
            paths = make_checkpoints(base)
            done.write_text(json.dumps({k: str(v) for k, v in paths.items()}))
    return {k: Path(v) for k, v in json.loads(done.read_text()).items()}


def blank_checkpoint(source: Path, folder: Path, record: dict | None = None) -> Path:
    """A copy of ``source`` whose classifier never predicts foreground (the demo's failure mode), with
    ``record`` written beside it as the demo's SOURCE.json."""
    state = torch.load(source, map_location="cpu", weights_only=False)
    key = _classifier_bias_key(state["model"])
    state["model"][key] = state["model"][key] + torch.tensor([0.0, -1000.0])
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(state, folder / "best.pt")
    if record is not None:
        (folder / "SOURCE.json").write_text(json.dumps(record))
    return folder / "best.pt"


def demo_record(regime: str, miou: float) -> dict:
    """A SOURCE.json as `svfseg demo` writes it (the contract of issue 22, item 16)."""
    return {"regime": regime, "cell": f"runs/demo/cells/{regime}_seed0", "test_miou": miou, "test_fb_iou": 0.5,
            "test_episodes": 1000, "data_root": "data/synthetic-5i", "benchmark": "synthetic", "fold": 0, "shot": 1}


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_server(proc, url: str, log: Path, timeout: float) -> None:
    """Until ``url`` answers 200 (any answer with --auth: the login page), or fail with the server's log."""
    import time
    import urllib.error
    import urllib.request

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"svfseg serve exited with {proc.returncode}: {log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except urllib.error.HTTPError:
            return
        except OSError:
            pass
        time.sleep(0.25)  # polling a port that is not open yet: no event to wait on
    raise AssertionError(f"svfseg serve did not answer on {url} within {timeout} s: {log.read_text()[-3000:]}")


# -- fixtures shared by the serve test files (import them by name: pytest finds imported fixtures) --------------

@pytest.fixture(scope="session")
def ckpts(tmp_path_factory):
    """The two tiny checkpoints (svf, frozen) every serve test file uses."""
    return shared_checkpoints(tmp_path_factory)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """Support, masks and queries written as files."""
    return write_inputs(tmp_path_factory.mktemp("inputs"))


@pytest.fixture(scope="module")
def cache():
    """One model cache per test file."""
    from svfseg.serve.handlers import ModelCache

    return ModelCache()
