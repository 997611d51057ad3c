"""The implementations under comparison, defined once, and how to tell which backend really ran.

Each is a forward ``fn(x, running_mean, running_var, weight, bias, training, residual=None) -> y``
with momentum and eps fixed, computing its workload's act(BN(x) + residual) (suite.Workload: the
activation is bound in by make_impl; the residual is passed where the workload has one). runner.py
builds every pass from it, the same way for all:

  bn_triton        bn_triton.batch_norm, the activation and residual in its fused epilogue
  bn_triton_split  the same with its single-pass kernels off (bn_triton/_config.py SINGLE_PASS), on
                   request only (--impls): what the single pass does on the inputs it serves (on
                   the others the two rows are the same kernels)
  cudnn            torch's composition (torch_bn: F.batch_norm, then + residual, then the
                   activation), eager, cuDNN enabled; torch still routes some inputs to its native
                   kernels (2-D; bf16, and fp16 with fp16 weights, in the torch versions we know):
                   detect_backend() records what actually ran
  native           the same with cuDNN disabled: torch's own CUDA kernels
  compile          torch.compile (inductor, default mode) of the same function, fresh per case
                   (dynamo's cache reset: no graph guarded for another shape, no fallback past the
                   recompile limit); donated buffers off (on since torch 2.6): the bwd pass runs
                   backward repeatedly on one graph (retain_graph=True), which donation forbids
"""

import contextlib
import dataclasses
import functools
import os
import sys
from collections.abc import Callable

import torch
import torch.nn.functional as F

MOMENTUM = 0.1
EPS = 1e-5

IMPLS = ("bn_triton", "cudnn", "native", "compile")
EXTRA_IMPLS = ("bn_triton_split",)  # run only when named


def torch_bn(x, running_mean, running_var, weight, bias, training: bool, residual=None, activation=None):
    """torch's composition of every workload: F.batch_norm, then + residual, then the activation as
    torch computes it (bn_triton.activations.apply: torch's own functions). Also the float64
    reference (runner.py)."""
    from bn_triton import activations  # imported late: TRITON_INTERPRET must be set first on CPU

    y = F.batch_norm(x, running_mean, running_var, weight, bias, training, MOMENTUM, EPS)
    return activations.apply(y if residual is None else y + residual, activation)


def triton_bn(x, running_mean, running_var, weight, bias, training: bool, residual=None, activation=None):
    import bn_triton  # imported late: TRITON_INTERPRET must be set first on CPU (see __main__.py)

    return bn_triton.batch_norm(
        x, running_mean, running_var, weight, bias, training, MOMENTUM, EPS, activation=activation, residual=residual
    )


def with_activation(fn: Callable, activation) -> Callable:
    """``fn`` computing ``activation`` (a workload's): the forward an Impl holds."""
    return fn if activation is None else functools.partial(fn, activation=activation)


@dataclasses.dataclass
class Impl:
    name: str
    fn: Callable
    # Global switches it runs under, (object, attribute, value): set around a whole timing loop, not
    # inside the timed callable (toggling them costs host time the kernels would be charged).
    switches: tuple = ()

    @contextlib.contextmanager
    def active(self):
        saved = [(obj, attr, getattr(obj, attr)) for obj, attr, _ in self.switches]
        for obj, attr, value in self.switches:
            setattr(obj, attr, value)
        try:
            yield
        finally:
            for obj, attr, value in saved:
                setattr(obj, attr, value)


def make_impl(name: str, activation=None) -> Impl:
    """A fresh implementation for one case and workload, computing ``activation`` (the workload's;
    for ``compile``: a fresh compiled function)."""
    cudnn = (torch.backends.cudnn, "enabled", name != "native")
    if name == "bn_triton":
        return Impl(name, with_activation(triton_bn, activation))
    if name == "bn_triton_split":
        from bn_triton import _config

        return Impl(name, with_activation(triton_bn, activation), ((_config, "SINGLE_PASS", False),))
    if name in ("cudnn", "native"):
        return Impl(name, with_activation(torch_bn, activation), (cudnn,))
    if name == "compile":
        import torch._functorch.config as functorch_config

        torch._dynamo.reset()
        # cuDNN stays enabled, as in a default training run: inductor lowers batch_norm to its own
        # kernels, and if it fell back to eager, detect_backend() would show which kernels ran.
        # donated_buffer is read when the graph compiles, i.e. at its first call, under active().
        donate = [(functorch_config, "donated_buffer", False)] if hasattr(functorch_config, "donated_buffer") else []
        return Impl(name, torch.compile(with_activation(torch_bn, activation)), (cudnn, *donate))
    raise ValueError(f"unknown implementation {name!r}; choose from {', '.join(IMPLS + EXTRA_IMPLS)}")


# Aten ops that only dispatch to the real batch-norm kernels (cuDNN, MIOpen or native).
_DISPATCHERS = {
    "aten::batch_norm", "aten::_batch_norm_impl_index", "aten::_batch_norm_impl_index_backward",
    "aten::_batch_norm_with_update", "aten::_batch_norm_no_update", "aten::batch_norm_backward",
}  # fmt: skip


def classify(event_names, triton_launches: int = 0) -> str:
    """Name the batch-norm backend(s) seen in profiler event names (and bn_triton's launch count),
    e.g. 'cudnn', 'native', 'bn_triton', 'inductor', or several joined by '+' (a fallback shows up
    that way)."""
    found = {"bn_triton"} if triton_launches else set()
    for name in event_names:
        if name.startswith("bn_triton::"):
            found.add("bn_triton")
        elif name.startswith("Torch-Compiled Region") or name in ("CompiledFunction", "CompiledFunctionBackward"):
            found.add("inductor")
        elif name.startswith("aten::") and "batch_norm" in name and name not in _DISPATCHERS:
            # cudnn_batch_norm, miopen_batch_norm; else native_batch_norm, batch_norm_stats, ...
            found.add(next((k for k in ("cudnn", "miopen") if k in name), "native"))
    return "+".join(sorted(found)) if found else "unknown"


def _quietly(fn: Callable):
    """fn() with file descriptor 2 silenced: some torch builds print a 'USDT: profiler_start/stop'
    line from C++ every time the profiler starts or stops, which would bury the progress output."""
    sys.stderr.flush()
    saved, devnull = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    os.close(devnull)
    try:
        return fn()
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)


def detect_backend(run: Callable[[], object]) -> str:
    """Run ``run`` once under torch's profiler (CPU activity: the aten ops dispatched) and classify.

    Op names, not kernel names: they are what torch's dispatch rules decide on, they read the same
    on every GPU and CUDA version, and recording them needs no CUPTI. bn_triton's eager fast path
    may bypass the dispatcher, so its kernels are counted by bn_triton.launch.LAUNCHES too. Only the
    profiler's start and stop are silenced; whatever ``run`` prints still shows.
    """
    from torch.profiler import ProfilerActivity, profile

    from bn_triton import launch

    launches = sum(launch.LAUNCHES.values())
    prof = profile(activities=[ProfilerActivity.CPU])
    _quietly(prof.start)
    try:
        run()
    finally:
        _quietly(prof.stop)
    return classify((e.name for e in prof.events()), sum(launch.LAUNCHES.values()) - launches)
