"""Shared test helpers: random inputs in every layout, per-dtype tolerances, float64 comparisons."""

import numpy as np
import torch

# Tolerances against the float64 reference, per input dtype. The output is rounded to the input's
# dtype (half an ulp: 2^-11 relative for fp16, 2^-8 for bf16) on values up to ~4 in magnitude, plus
# fp32 accumulation error.
TOL = {
    torch.float64: dict(atol=1e-10, rtol=1e-9),
    torch.float32: dict(atol=2e-5, rtol=2e-5),
    torch.float16: dict(atol=4e-3, rtol=4e-3),
    torch.bfloat16: dict(atol=3e-2, rtol=2e-2),
}

# Shapes by rank, small on purpose (the interpreter runs one program after another); odd sizes so
# that tiles are partly masked.
SHAPES = {
    2: (7, 5),
    3: (3, 4, 9),
    4: (2, 3, 5, 7),
    5: (2, 3, 3, 4, 5),
}


def layouts_for(rank: int) -> list[str]:
    extra = {4: ["channels_last"], 5: ["channels_last_3d"]}.get(rank, [])
    return ["contiguous", *extra, "strided"]


def make(shape, dtype, device, layout="contiguous", offset=0.0, scale=1.0, seed=None) -> torch.Tensor:
    """Fresh random values (never zeros) in the requested memory layout."""
    gen = torch.Generator().manual_seed(seed) if seed is not None else None
    big = list(shape)
    if layout == "strided":
        big[-1] *= 2  # then every other element of the last axis: neither contiguous nor channels_last
    x = (torch.randn(big, generator=gen, dtype=torch.float64) * scale + offset).to(device=device, dtype=dtype)
    if layout == "strided":
        return x[..., ::2]
    if layout == "channels_last":
        return x.contiguous(memory_format=torch.channels_last)
    if layout == "channels_last_3d":
        return x.contiguous(memory_format=torch.channels_last_3d)
    return x


def np64(t: torch.Tensor) -> np.ndarray:
    return t.detach().to("cpu", torch.float64).numpy()


def assert_close(actual: torch.Tensor, expected, dtype: torch.dtype, scale: float = 1.0, what: str = ""):
    tol = TOL[dtype]
    expected = torch.as_tensor(np.asarray(expected), dtype=torch.float64)
    torch.testing.assert_close(
        actual.detach().to("cpu", torch.float64),
        expected,
        atol=tol["atol"] * scale,
        rtol=tol["rtol"],
        msg=lambda m: f"{what}: {m}",
    )


def single_pass(x: torch.Tensor) -> bool:
    """Whether x's training forward and backward take the single-pass kernels (one launch each)."""
    from bn_triton import launch

    xc, geom = launch.canonical(x)
    return launch.single_pass(geom, x.device, x.element_size())


def train_launches(x: torch.Tensor) -> tuple[dict, dict]:
    """Our launches by name in a training forward on x, and in its backward (dx wanted): the
    single-pass kernels where single_pass(x) holds, else the split path's two each."""
    if single_pass(x):
        return {"forward": 1}, {"backward": 1}
    return {"stats": 1, "normalize": 1}, {"grad_sums": 1, "grad_input": 1}


def raises_every_time(call, exc, match, state=(), valid=None) -> None:
    """``call()`` raises ``exc`` (message matching ``match``) on its first call and on the next, and
    again after ``valid()`` (a good call that plans its own signature, where given): bn_triton caches
    a plan per call signature, and an error must fire on every call alike. Each time no kernel ran
    and the ``state`` tensors (running statistics, counters) kept their values."""
    import pytest

    from bn_triton import launch

    for attempt in ("first", "second", "after a valid call"):
        if attempt == "after a valid call":
            if valid is None:
                return
            valid()
        before = [t.clone() for t in state]
        launches = dict(launch.LAUNCHES)
        with pytest.raises(exc, match=match):
            call()
        assert dict(launch.LAUNCHES) == launches, f"a kernel ran before the error ({attempt} call)"
        for b, t in zip(before, state, strict=True):
            assert torch.equal(t, b), f"state changed before the error ({attempt} call)"
