"""Bad input: a clear error before any kernel runs, and the running statistics untouched."""

import pytest
import torch

import bn_triton
from tests.helpers import raises_every_time


def _stats(device, C=3, dtype=torch.float32):
    return torch.randn(C, device=device, dtype=dtype), torch.rand(C, device=device, dtype=dtype) + 0.5


CASES = [
    # (name, build(device) -> kwargs, error type, message pattern)
    # torch counts no channels in a 1-D input: the running statistics must then be empty.
    ("rank 1", lambda d: dict(input=torch.randn(3, device=d)), RuntimeError, "should contain 0 elements not 3"),
    (
        "integer input",
        lambda d: dict(input=torch.ones(4, 3, device=d, dtype=torch.int32)),
        NotImplementedError,
        "\"batch_norm\" not implemented for 'Int'",
    ),
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
        RuntimeError,
        "mixed dtype",
    ),
]


@pytest.mark.parametrize("name,build,exc,pattern", CASES, ids=[c[0] for c in CASES])
def test_bad_input_raises_before_any_kernel(name, build, exc, pattern, device):
    """On the first call and the next, and after a valid call of the same tensors (bn_triton plans
    each call signature once): the error, no kernel launched, the running stats untouched."""
    rm, rv = _stats(device)
    good = dict(input=torch.randn(4, 3, 5, device=device), running_mean=rm, running_var=rv, training=True)
    bad = {**good, **build(device)}
    valid = lambda: bn_triton.batch_norm(**{**good, "running_mean": rm.clone(), "running_var": rv.clone()})
    raises_every_time(lambda: bn_triton.batch_norm(**bad), exc, pattern, state=(rm, rv), valid=valid)


def test_eval_without_running_stats(device):
    x = torch.randn(4, 3, device=device)
    rm, rv = _stats(device)
    raises_every_time(
        lambda: bn_triton.batch_norm(x, None, None, training=False),
        RuntimeError,
        "running_mean must be defined in evaluation mode",
        valid=lambda: bn_triton.batch_norm(x, rm, rv, training=False),
    )


def test_eval_with_one_value_per_channel_is_fine(device):
    """As in torch: only training needs more than one value per channel."""
    rm, rv = _stats(device)
    y = bn_triton.batch_norm(torch.randn(1, 3, device=device), rm, rv, training=False)
    assert y.shape == (1, 3)
