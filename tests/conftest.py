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
