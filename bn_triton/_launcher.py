"""Kernel launches with less host time: Triton's own path once per specialization, then the compiled
kernel directly.

``kernel[grid](*args, **kwargs)`` binds every argument, computes the specialization key, looks the
compiled kernel up and launches it. Measured on an H200 host (triton 3.6, bench results of
2026-11-26), that costs a bn_triton launch more host time than the kernel of a small BatchNorm
takes on the GPU. The specialization of our launches is a function of a few things we can read
cheaply: each tensor argument's dtype and 16-byte alignment, each int's value class (equal to 1,
divisible by 16, 32 or 64 bits), None-ness, and the constexpr values. ``launch`` keys the compiled
kernel on exactly those; a key seen before launches the compiled kernel with the same arguments,
hooks and launch metadata that ``JITFunction.run`` would pass. Anything else (the interpreter,
stubbed kernels, a Triton whose launch signature was not checked) takes Triton's own path.

The compiled-kernel call and the specialization rules were read from triton 3.6's ``JITFunction.run``
and tested on a GPU with it (bitwise equal to Triton's own launches, tests/test_launcher.py); other
versions take Triton's own path until they are checked the same way (3.8's ``run`` reads the same, but
its binder is native code). ``BN_TRITON_DIRECT_LAUNCH=0`` turns it off.
"""

import inspect
import os

import torch
import triton

try:
    from triton import knobs
    from triton.runtime.driver import driver
    from triton.runtime.jit import JITFunction

    _VERSION = tuple(int(p) for p in triton.__version__.split(".")[:2])
    _SUPPORTED = _VERSION == (3, 6)
except ImportError:  # older Triton: its own path only
    _SUPPORTED = False

ENABLED = _SUPPORTED and os.environ.get("BN_TRITON_DIRECT_LAUNCH", "1") != "0"
_I32 = 2**31


def _spec(v):
    """What Triton's binder specializes on for a (non-constexpr) argument value v."""
    if isinstance(v, torch.Tensor):
        return v.dtype, v.data_ptr() & 15 == 0
    t = type(v)
    if t is int:
        return v == 1, v & 15 == 0, -_I32 <= v < _I32
    if t is float:
        return float
    return v  # None, bools, constexpr values (ints of BLOCK sizes, tl.dtype): hashable, exact


class _Signature:
    """A kernel's parameter names and defaults, in order (what ``JITFunction.run`` passes on)."""

    def __init__(self, fn):
        params = list(inspect.signature(fn.fn).parameters.values())
        self.names = [p.name for p in params]
        self.defaults = {p.name: p.default for p in params if p.default is not inspect.Parameter.empty}
        # Constexpr values are part of the key as they are; the others by their specialization.
        self.key_fns = [(lambda v: v) if "constexpr" in str(p.annotation) else _spec for p in params]
        self.compiled: dict = {}


_SIGNATURES: dict = {}


def launch(fn, grid: tuple, args: tuple, kwargs: dict) -> None:
    """``fn[grid](*args, **kwargs)``, directly through the compiled kernel once its key is known."""
    if not ENABLED or type(fn) is not JITFunction:
        fn[grid](*args, **kwargs)
        return
    sig = _SIGNATURES.get(fn)
    if sig is None:
        sig = _SIGNATURES[fn] = _Signature(fn)
    values = list(args)
    for name in sig.names[len(args) :]:
        values.append(kwargs[name] if name in kwargs else sig.defaults[name])
    device = driver.active.get_current_device()
    key = (
        device,
        kwargs.get("num_warps"),
        kwargs.get("num_stages"),
        *(f(v) for f, v in zip(sig.key_fns, values, strict=True)),
    )
    kernel = sig.compiled.get(key)
    if kernel is None:
        kernel = fn[grid](*args, **kwargs)  # compiles if needed, launches, returns the compiled kernel
        if hasattr(kernel, "packed_metadata"):  # not a future of an asynchronous compile
            sig.compiled[key] = kernel
        return
    stream = driver.active.get_current_stream(device)
    g1 = grid[1] if len(grid) > 1 else 1
    g2 = grid[2] if len(grid) > 2 else 1
    kernel.run(
        grid[0],
        g1,
        g2,
        stream,
        kernel.function,
        kernel.packed_metadata,
        kernel.launch_metadata(grid, stream, *values),
        knobs.runtime.launch_enter_hook,
        knobs.runtime.launch_exit_hook,
        *values,
    )
