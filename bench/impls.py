"""The implementations under comparison, defined once, and how to tell which backend really ran.

Every implementation is a forward ``fn(x, running_mean, running_var, weight, bias, training,
residual=None) -> y`` with momentum and eps fixed; with a residual it computes relu(BN(x) + residual)
(the fused workload, suite.FUSED). runner.py builds every pass from it, the same way for all:

  bn_triton  bn_triton.batch_norm (with a residual: its fused add + ReLU epilogue)
  bn_triton_split  the same with its single-pass kernels off (bn_triton/_config.py SINGLE_PASS):
             the split path everywhere; on request only (--impls), to measure what the single pass
             does on the inputs it serves (on the others the two rows are the same kernels)
  cudnn      torch.nn.functional.batch_norm (then + residual, relu), eager, cuDNN enabled. torch
             still routes some inputs to its native kernels (2-D inputs; bf16, and fp16 with fp16
             weights, in the torch versions we know): detect_backend() records what actually ran
  native     the same with torch.backends.cudnn.enabled = False: torch's own CUDA kernels
  compile    torch.compile (inductor, default mode) of the same torch function, compiled and warmed
             before timing; a fresh compile per case (dynamo's cache is reset), so no case runs a
             graph guarded for another shape or falls back after the recompile limit. Donated
             buffers are off (torch >= 2.6 turns them on): the backward-only pass runs backward
             repeatedly on one graph (retain_graph=True), which donation forbids.
"""

import contextlib
import dataclasses
import os
import sys
from collections.abc import Callable

import torch
import torch.nn.functional as F

MOMENTUM = 0.1
EPS = 1e-5

IMPLS = ("bn_triton", "cudnn", "native", "compile")
EXTRA_IMPLS = ("bn_triton_split",)  # run only when named


def torch_bn(x, running_mean, running_var, weight, bias, training: bool, residual=None):
    y = F.batch_norm(x, running_mean, running_var, weight, bias, training, MOMENTUM, EPS)
    return y if residual is None else torch.relu(y + residual)


def triton_bn(x, running_mean, running_var, weight, bias, training: bool, residual=None):
    import bn_triton  # imported late: TRITON_INTERPRET must be set first on CPU (see __main__.py)

    fused = {} if residual is None else dict(activation="relu", residual=residual)
    return bn_triton.batch_norm(x, running_mean, running_var, weight, bias, training, MOMENTUM, EPS, **fused)


@dataclasses.dataclass
class Impl:
    name: str
    fn: Callable
    cudnn: bool | None = None  # torch.backends.cudnn.enabled while this runs; None: leave as is
    compiled: bool = False
    single_pass: bool | None = None  # bn_triton's single-pass kernels on or off; None: leave as is

    @contextlib.contextmanager
    def active(self):
        """Set the global switches this implementation runs under (around a whole timing loop, not
        inside the timed callable: toggling them costs host time the kernels would be charged)."""
        with contextlib.ExitStack() as stack:
            import torch._functorch.config

            if self.compiled and hasattr(torch._functorch.config, "donated_buffer"):
                # Read when the graph compiles, i.e. at the first call, which happens in here.
                stack.enter_context(torch._functorch.config.patch(donated_buffer=False))
            if self.cudnn is not None:
                saved = torch.backends.cudnn.enabled
                torch.backends.cudnn.enabled = self.cudnn
                stack.callback(setattr, torch.backends.cudnn, "enabled", saved)
            if self.single_pass is not None:
                from bn_triton import _config

                stack.callback(setattr, _config, "SINGLE_PASS", _config.SINGLE_PASS)
                _config.SINGLE_PASS = self.single_pass
            yield


def make_impl(name: str, compile_backend: str = "inductor") -> Impl:
    """A fresh implementation for one case (for ``compile``: a fresh compiled function)."""
    if name == "bn_triton":
        return Impl(name, triton_bn)
    if name == "bn_triton_split":
        return Impl(name, triton_bn, single_pass=False)
    if name == "cudnn":
        return Impl(name, torch_bn, cudnn=True)
    if name == "native":
        return Impl(name, torch_bn, cudnn=False)
    if name == "compile":
        torch._dynamo.reset()
        # cuDNN stays enabled, as in a default training run: inductor lowers batch_norm to its own
        # kernels, and if it fell back to eager, detect_backend() would show which kernels ran.
        return Impl(name, torch.compile(torch_bn, backend=compile_backend), cudnn=True, compiled=True)
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
    compiled = False
    for name in event_names:
        if name.startswith("bn_triton::"):
            found.add("bn_triton")
        elif name.startswith("Torch-Compiled Region") or name in ("CompiledFunction", "CompiledFunctionBackward"):
            compiled = True
        elif name.startswith("aten::") and "batch_norm" in name and name not in _DISPATCHERS:
            if "cudnn" in name:
                found.add("cudnn")
            elif "miopen" in name:
                found.add("miopen")
            else:
                found.add("native")  # native_batch_norm, _native_batch_norm_legit, batch_norm_stats, ...
    if compiled:
        found.add("inductor")
    return "+".join(sorted(found)) if found else "unknown"


@contextlib.contextmanager
def _quiet_stderr_fd():
    """Silence file descriptor 2: some torch builds print a 'USDT: profiler_start/stop' line from
    C++ every time the profiler starts or stops, which would bury the progress output."""
    sys.stderr.flush()
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    os.close(devnull)
    try:
        yield
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
    with _quiet_stderr_fd():
        prof.start()
    try:
        run()
    finally:
        with _quiet_stderr_fd():
            prof.stop()
    return classify((e.name for e in prof.events()), sum(launch.LAUNCHES.values()) - launches)
