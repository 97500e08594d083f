"""Shared test settings."""
import os

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
    # SVFSEG_TEST_THREADS=N runs the suite with N intra-op threads instead: the numeric tests must
    # hold for any thread count (a different count is a different summation order), and
    # OMP_NUM_THREADS alone cannot show that, since this fixture would override it.
    before = torch.get_num_threads()
    torch.set_num_threads(int(os.environ.get("SVFSEG_TEST_THREADS", "1")))
    yield
    torch.set_num_threads(before)


@pytest.fixture(autouse=True, scope="session")
def _mkldnn_switch():
    # SVFSEG_TEST_MKLDNN=0 runs the suite with oneDNN off (torch.backends.mkldnn.flags(enabled=False)):
    # the CPU convolutions then take torch's own kernels, another operation order. Whether oneDNN is
    # used, and which of its kernels, depends on the CPU (AVX-512 on a Xeon, AVX2 on an EPYC); the
    # numeric tests must hold either way. Default: torch's own default (on).
    # Only the `enabled` switch: `mkldnn.flags(enabled=False)` also resets oneDNN's TF32 and fp32
    # precision settings (and warns that TF32 needs an Intel GPU).
    if os.environ.get("SVFSEG_TEST_MKLDNN", "1") != "0":
        yield
        return
    before = torch.backends.mkldnn.enabled
    torch.backends.mkldnn.enabled = False
    yield
    torch.backends.mkldnn.enabled = before


def assert_close_to_scale(actual, expected, rel, what=""):
    """``actual`` equals ``expected`` up to ``rel`` x the largest magnitude of ``expected``, element-wise.

    For results of two different operation orders (BN folded or not, a merged or a factorised weight,
    a batched or a per-shot pass, another CPU's or thread count's summation order): their rounding
    error scales with the magnitudes summed, i.e. with the tensor's scale, not with each element. An
    element that is a small difference of large terms can carry any relative error, so an
    element-wise ``rtol`` fails on another machine while the code is right. An exactness claim is
    tested in float64 with a tiny ``rel``; a float32 check with a ``rel`` of float32 rounding through
    the network (1e-4 for a forward pass, 1e-3 to 1e-2 for gradients that sum many terms).
    """
    expected = torch.as_tensor(expected)
    actual = torch.as_tensor(actual)
    scale = expected.abs().max().item() if expected.numel() else 0.0

    def message(m: str) -> str:
        head = f"{what}: " if what else ""
        if actual.shape == expected.shape and expected.numel():  # else assert_close names the mismatch
            worst = (actual - expected).abs().max().item()
            head += (f"greatest difference {worst:.3g} is {worst / max(scale, 1e-300):.3g} of the largest "
                     f"magnitude {scale:.3g} (allowed {rel:g})")
        return f"{head}\n{m}"

    torch.testing.assert_close(actual, expected, rtol=0, atol=rel * scale + torch.finfo(expected.dtype).tiny,
                               msg=message)


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


#: Allowed greatest difference, relative to the tensor's largest magnitude, of two operation orders
#: of one function (see assert_close_to_scale): float64 tests the exactness claim, float32 the
#: precision training runs in.
SAME_FUNCTION_REL = {torch.float64: 1e-11, torch.float32: 1e-4}


@pytest.fixture(params=[torch.float64, torch.float32], ids=["float64", "float32"])
def precision(request):
    """(dtype, rel) for a test that two paths compute the same function: once per precision."""
    return request.param, SAME_FUNCTION_REL[request.param]


def to_dtype(tensors, dtype):
    """The floating tensors of ``tensors`` in ``dtype`` (masks and class ids stay as they are)."""
    return tuple(t.to(dtype) if t.is_floating_point() else t for t in tensors)


def error_line(capsys, command):
    """The CLI's error: exactly one line on stderr after any log lines, and no traceback."""
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    last = err.strip().splitlines()[-1]
    assert last.startswith(f"svfseg {command}: error: "), err
    return last
