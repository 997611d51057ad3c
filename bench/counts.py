"""Host work per call, counted rather than timed: Python calls and tensor allocations.

Counts do not depend on the machine's noise. ``python_calls(fn)`` counts the "call" events of
``sys.setprofile`` while ``fn()`` runs, leaving out ``fn``'s own frame and the frames of
bench/stub.py's stubs (and whatever they call): with the kernels stubbed, what remains is the
Python that a real call runs around its launches. ``allocations(fn)`` counts the tensor allocations
that torch's profiler records (operators that allocate memory themselves; views allocate none).
"""

import sys

import torch

from bench import stub

_STUB_FILE = stub.__file__


def python_calls(fn, excluded=(_STUB_FILE,)) -> int:
    """Python function calls made by ``fn()``: not ``fn``'s own frame, nor the frames of the files in
    ``excluded`` (stand-ins) and what those call."""
    calls, own = [0], fn.__code__

    def profiler(frame, event, arg):
        if event != "call" or frame.f_code is own or frame.f_code.co_filename in excluded:
            return
        back = frame.f_back  # called by a stand-in: the stand-in's work
        if back is None or back.f_code is own or back.f_code.co_filename not in excluded:
            calls[0] += 1

    sys.setprofile(profiler)
    try:
        fn()
    finally:
        sys.setprofile(None)
    return calls[0]


def allocations(fn) -> int:
    """Tensor allocations made by ``fn()``, as torch's profiler records them."""
    from torch.profiler import ProfilerActivity, profile

    from bench.impls import _quietly

    prof = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
    _quietly(prof.start)
    try:
        fn()
    finally:
        _quietly(prof.stop)
    return sum(1 for e in prof.events() if e.self_cpu_memory_usage > 0 and e.name != "[memory]")


class EmptyFunction(torch.autograd.Function):
    """The floor of a layer built on autograd.Function: three inputs, one output allocated, nothing computed."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        return x.new_empty(x.shape)

    @staticmethod
    def backward(ctx, dy):
        return dy, dy.new_empty(dy.shape[1]), dy.new_empty(dy.shape[1])
