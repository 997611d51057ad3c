"""Bad input: a clear error before any kernel runs, and the running statistics untouched."""

import pytest
import torch

import bn_triton
from bn_triton import launch


def _stats(device, C=3, dtype=torch.float32):
    return torch.randn(C, device=device, dtype=dtype), torch.rand(C, device=device, dtype=dtype) + 0.5


CASES = [
    # (name, build(device) -> kwargs, error type, message pattern)
    ("rank 1", lambda d: dict(input=torch.randn(3, device=d)), ValueError, "at least 2 dimensions"),
    ("integer input", lambda d: dict(input=torch.ones(4, 3, device=d, dtype=torch.int32)), TypeError, "floating-point"),
    (
        "weight of other size",
        lambda d: dict(weight=torch.ones(4, device=d)),
        RuntimeError,
        "weight should contain 3 elements not 4",
    ),
    (
        "bias of other size",
        lambda d: dict(bias=torch.ones(2, device=d)),
        RuntimeError,
        "bias should contain 3 elements not 2",
    ),
    (
        "running stats of other size",
        lambda d: dict(running_mean=torch.zeros(5, device=d), running_var=torch.ones(5, device=d)),
        RuntimeError,
        "running_mean should contain 3 elements not 5",
    ),
    ("running_mean without running_var", lambda d: dict(running_var=None), ValueError, "both be None or neither"),
    (
        "one value per channel",
        lambda d: dict(input=torch.randn(1, 3, device=d)),
        ValueError,
        r"Expected more than 1 value per channel when training, got input size torch.Size\(\[1, 3\]\)",
    ),
    (
        "one value per channel, 4-D",
        lambda d: dict(input=torch.randn(1, 3, 1, 1, device=d)),
        ValueError,
        "Expected more than 1 value per channel when training",
    ),
    ("weight on another device", lambda d: dict(weight=torch.ones(3, device="meta")), RuntimeError, "same device"),
    (
        "float16 weight with float32 input",
        lambda d: dict(weight=torch.ones(3, device=d, dtype=torch.float16)),
        TypeError,
        "float32 or the input's dtype",
    ),
]


@pytest.mark.parametrize("name,build,exc,pattern", CASES, ids=[c[0] for c in CASES])
def test_bad_input_raises_before_any_kernel(name, build, exc, pattern, device):
    rm, rv = _stats(device)
    rm0, rv0 = rm.clone(), rv.clone()
    kwargs = dict(input=torch.randn(4, 3, 5, device=device), running_mean=rm, running_var=rv, training=True)
    kwargs.update(build(device))
    launches = sum(launch.LAUNCHES.values())
    with pytest.raises(exc, match=pattern):
        bn_triton.batch_norm(**kwargs)
    assert sum(launch.LAUNCHES.values()) == launches, "a kernel ran before the error"
    assert torch.equal(rm, rm0) and torch.equal(rv, rv0), "running stats changed"


def test_eval_without_running_stats(device):
    with pytest.raises(RuntimeError, match="running_mean must be defined in evaluation mode"):
        bn_triton.batch_norm(torch.randn(4, 3, device=device), None, None, training=False)


def test_eval_with_one_value_per_channel_is_fine(device):
    """As in torch: only training needs more than one value per channel."""
    rm, rv = _stats(device)
    y = bn_triton.batch_norm(torch.randn(1, 3, device=device), rm, rv, training=False)
    assert y.shape == (1, 3)
