"""Shared test settings."""
import pytest
import torch


@pytest.fixture(autouse=True, scope="session")
def _cache_in_tmp(tmp_path_factory):
    # Class-index caches go to $SVFSEG_CACHE: keep the tests' out of the user's ~/.cache/svfseg.
    mp = pytest.MonkeyPatch()
    mp.setenv("SVFSEG_CACHE", str(tmp_path_factory.mktemp("svfseg-cache")))
    yield
    mp.undo()


@pytest.fixture(autouse=True, scope="session")
def _one_intra_op_thread():
    # `make test` runs two xdist workers on two cores; more intra-op threads per worker only
    # oversubscribe the cores (LAPACK's SVD got 10-40x slower that way on this machine).
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


#: Image side of the tiny synthetic-5i the CLI tests share.
TINY_SIZE = 64


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    """A tiny synthetic-5i root (120 train + 60 val images at TINY_SIZE px) made through the CLI."""
    from svfseg.cli import main

    root = tmp_path_factory.mktemp("syn") / "synthetic-5i"
    assert main(["prepare", "synthetic", "--out", str(root), "--n-train", "120", "--n-val", "60",
                 "--size", str(TINY_SIZE), "--workers", "1"]) == 0
    return root


def tiny_run_args(root, out, name, *extra):
    """`svfseg train` arguments of a 2-epoch x 2-step run of the demo recipe on the shared `data_root`."""
    from pathlib import Path

    recipe = Path(__file__).resolve().parents[1] / "configs" / "synthetic" / "pfenet_efficientnet_lite0.yaml"
    return ["--config", str(recipe), f"data.root={root}", f"output_dir={out}", f"name={name}",
            f"data.train_crop={TINY_SIZE}", f"data.test_size={TINY_SIZE}", "train.epochs=2",
            "train.steps_per_epoch=2", "train.batch_size=2", "train.progress=false", *extra]
