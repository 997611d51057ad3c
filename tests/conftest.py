"""Test setup: without a GPU, run our Triton kernels in Triton's interpreter on CPU tensors.

TRITON_INTERPRET must be set before the kernel modules are imported (``@triton.jit`` reads it when
the decorator runs), so it is set here, before any test module imports bn_triton.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch.nn.functional as F  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture
def device() -> str:
    return DEVICE


@pytest.fixture(autouse=True)
def fresh_plans():
    """Launch plans are built from the launch settings of bn_triton/_config.py, which tests change:
    every test starts (and ends) with none, as a new process would."""
    from bn_triton import launch

    launch.clear_plans()
    yield
    launch.clear_plans()


@pytest.fixture
def torch_bn_forbidden(monkeypatch):
    """Make torch's batch_norm entry points raise, so a passing test proves our kernels did the work.

    Use torch_bn_forbidden.allowed() around the torch calls that compute expected values.
    """
    import contextlib

    saved = {
        (torch, "batch_norm"): torch.batch_norm,
        (F, "batch_norm"): F.batch_norm,
        (torch, "native_batch_norm"): torch.native_batch_norm,
    }

    def forbidden(*args, **kwargs):
        raise AssertionError("torch's batch_norm ran where bn_triton's kernels should have")

    for (mod, name), _fn in saved.items():
        monkeypatch.setattr(mod, name, forbidden)

    class Guard:
        @contextlib.contextmanager
        def allowed(self):
            for (mod, name), fn in saved.items():
                setattr(mod, name, fn)
            try:
                yield
            finally:
                for (mod, name), _fn in saved.items():
                    setattr(mod, name, forbidden)

    return Guard()


@pytest.fixture(params=["split", "single_pass"])
def path(request, monkeypatch):
    """Both training paths: the split kernels (two launches per pass; the interpreter's default), and
    the single-pass kernels (one; taken where one split per channel block is all: a test's tiny
    inputs mostly are)."""
    from bn_triton import _config, launch

    monkeypatch.setattr(_config, "SINGLE_PASS", request.param == "single_pass")
    launch.clear_plans()
    return request.param


@pytest.fixture
def h100(monkeypatch):
    """bn_triton's launch settings for an H100 (132 SMs, 50 MB of L2) on any machine."""
    from bn_triton import _config, launch

    monkeypatch.setattr(_config, "sm_count", lambda index: 132)
    monkeypatch.setattr(_config, "l2_bytes", lambda index: 50 * 2**20)
    _config._cuda_target.cache_clear()
    launch.clear_plans()
    yield torch.device("cuda", 0)
    _config._cuda_target.cache_clear()
