"""Kernel launches with less host time: Triton's own path once per specialization, then the compiled
kernel directly.

``kernel[grid](*args, **kwargs)`` binds every argument, computes the specialization key, looks the
compiled kernel up and launches it. Measured on an H200 host (triton 3.6, bench results of
2026-11-26), that costs a bn_triton launch more host time than the kernel of a small BatchNorm
takes on the GPU. The specialization of our launches is a function of a few things we can read
cheaply: each tensor argument's dtype and 16-byte alignment, each int's value class (equal to 1,
divisible by 16, 32 or 64 bits), None-ness, and the constexpr values. ``launch`` keys the compiled
kernel on exactly those; a key seen before launches the compiled kernel with the same arguments,
hooks and launch metadata that ``JITFunction.run`` would pass, tensors as their device pointers
(``data_ptr()``; what Triton's launcher computes from them with a driver call). Anything else (the interpreter,
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
DIRECT_LAUNCHES = [0]  # launches that took the direct path (tests prove the path is taken)
_I32 = 2**31


def _spec(v):
    """What Triton's binder specializes on for a (non-constexpr) argument value v (cheapest tests first:
    this runs for every argument of every launch)."""
    t = type(v)
    if t is int:
        return v == 1, v & 15 == 0, -_I32 <= v < _I32
    if v is None:
        return None
    if t is float:
        return float
    if isinstance(v, torch.Tensor):
        return v.dtype, v.data_ptr() & 15 == 0
    return v  # bools, constexpr values (ints of BLOCK sizes, tl.dtype): hashable, exact


class _Signature:
    """A kernel's parameter names and defaults, in order (what ``JITFunction.run`` passes on)."""

    def __init__(self, fn):
        params = list(inspect.signature(fn.fn).parameters.values())
        self.names = [p.name for p in params]
        self.defaults = {p.name: p.default for p in params if p.default is not inspect.Parameter.empty}
        # Constexpr values are part of the key as they are; the others by their specialization.
        constexpr = ["constexpr" in str(p.annotation) for p in params]
        self.constexprs = [i for i, c in enumerate(constexpr) if c]
        self.specialized = [i for i, c in enumerate(constexpr) if not c]
        self.compiled: dict = {}


_SIGNATURES: dict = {}


def plan_for(kernel, values: list) -> tuple:
    """What a key's later launches need: the compiled kernel, and which arguments are tensors."""
    return kernel, [i for i, v in enumerate(values) if isinstance(v, torch.Tensor)]


def bind(fn, args: tuple, kwargs: dict) -> tuple:
    """(signature, every parameter's value in order, specialization key, device) of a launch."""
    sig = _SIGNATURES.get(fn)
    if sig is None:
        sig = _SIGNATURES[fn] = _Signature(fn)
    defaults = sig.defaults
    values = [*args, *[kwargs[n] if n in kwargs else defaults[n] for n in sig.names[len(args) :]]]
    device = driver.active.get_current_device()
    key = (
        device,
        kwargs.get("num_warps"),
        kwargs.get("num_stages"),
        kwargs.get("maxnreg"),
        *[values[i] for i in sig.constexprs],
        *[_spec(values[i]) for i in sig.specialized],
    )
    return sig, values, key, device


def launch(fn, grid: tuple, args: tuple, kwargs: dict) -> None:
    """``fn[grid](*args, **kwargs)``, directly through the compiled kernel once its key is known."""
    if not ENABLED or type(fn) is not JITFunction:
        fn[grid](*args, **kwargs)
        return
    sig, values, key, device = bind(fn, args, kwargs)
    plan = sig.compiled.get(key)
    if plan is None:
        kernel = fn[grid](*args, **kwargs)  # compiles if needed, launches, returns the compiled kernel
        if hasattr(kernel, "packed_metadata"):  # not a future of an asynchronous compile
            # The key fixes which arguments are tensors: they go to the kernel as device pointers.
            sig.compiled[key] = plan_for(kernel, values)
        return
    kernel, tensors = plan
    stream = driver.active.get_current_stream(device)
    g1 = grid[1] if len(grid) > 1 else 1
    g2 = grid[2] if len(grid) > 2 else 1
    metadata = kernel.launch_metadata(grid, stream, *values)
    # Triton's C launcher turns a tensor into a pointer by calling its data_ptr() and then
    # cuPointerGetAttribute, a driver call, per tensor and launch; an int it takes as the pointer.
    for i in tensors:
        values[i] = values[i].data_ptr()
    DIRECT_LAUNCHES[0] += 1
    kernel.run(
        grid[0],
        g1,
        g2,
        stream,
        kernel.function,
        kernel.packed_metadata,
        metadata,
        knobs.runtime.launch_enter_hook,
        knobs.runtime.launch_exit_hook,
        *values,
    )
