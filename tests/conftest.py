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
