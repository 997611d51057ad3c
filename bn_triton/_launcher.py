"""One kernel launch of a launch plan, with everything fixed but its pointers.

A ``Launch`` holds a kernel, its grid, its compile options and the values of every parameter after
the leading pointers (bn_triton's kernels take their pointers first: kernels/tile.py ``launched``).
A call passes the pointers only, by the kernel's names for them (``launch(X=x, Y=y)``); one not
named is None. Their order is then written once, in the kernel's signature. The first call goes
through Triton's own ``fn[grid](...)``, which compiles the kernel if needed and returns it; on the
Triton versions whose launch path was read and checked (3.5, 3.6, 3.8) the later calls hand the same
arguments straight to the compiled kernel's C launcher, as ``JITFunction.run`` would: no binding, no
specialization key, no Python per argument. That is valid because everything Triton specializes on
is fixed by the plan that owns the launch: the dtypes and alignment of the big tensors (the plans
pass them 16-byte aligned), the per-channel pointers (never specialized on alignment), None-ness,
the ints and the constexprs.

Triton's own path is taken instead wherever it must decide: the interpreter, stubbed kernels, other
Triton versions, a launch hook (a profiler), kernels that need scratch memory, a current CUDA device
other than the tensors'. ``BN_TRITON_DIRECT_LAUNCH=0`` turns the direct path off.
"""

import collections
import inspect
import operator
import os

import torch
import triton

try:
    from triton import knobs
    from triton.runtime.jit import JITFunction

    _VERSION = tuple(int(p) for p in triton.__version__.split(".")[:2])
except ImportError:  # older Triton: its own path only
    knobs, JITFunction, _VERSION = None, None, ()
_RUNTIME = getattr(knobs, "runtime", None)

# How the compiled kernel's C launcher takes its arguments, by Triton version (read from each
# version's CudaLauncher.__call__, and checked in tests/test_launcher.py against it).
_C_FORM = {(3, 5): "pre_3_8", (3, 6): "pre_3_8", (3, 8): "3_8"}.get(_VERSION)
ENABLED = _C_FORM is not None and os.environ.get("BN_TRITON_DIRECT_LAUNCH", "1") != "0"

# Kernel launches by name (tests prove with it that our kernels, not torch's, ran), and how many of
# them took the direct path.
LAUNCHES: collections.Counter = collections.Counter()
DIRECT_LAUNCHES = [0]


def parameters(fn) -> list:
    """The kernel's parameters (names and defaults), through the wrappers around its Python function
    (JITFunction, heuristics, autotune, bench/stub.py's stubs, which keep the kernel they replace)."""
    while not inspect.isfunction(fn):
        fn = fn.fn if hasattr(fn, "fn") else fn.kernel
    return list(inspect.signature(fn).parameters.values())


class Launch:
    """``fn[grid](*pointers, *tail, **options)``, where ``tail`` is every parameter after the
    pointers, from ``fixed`` or the kernel's defaults."""

    def __init__(self, name: str, fn, grid: tuple, pointers: tuple, fixed: dict, options: dict, device):
        params = parameters(fn)
        names = [p.name for p in params]
        if tuple(names[: len(pointers)]) != tuple(pointers):
            raise AssertionError(
                f"{name}: the kernel's leading parameters are {names[: len(pointers)]}, not {pointers}"
            )
        unknown = set(fixed) - set(names)
        if unknown:
            raise AssertionError(f"{name}: no parameters {sorted(unknown)}")
        self.tail = tuple(fixed[p.name] if p.name in fixed else p.default for p in params[len(pointers) :])
        if inspect.Parameter.empty in self.tail:
            raise AssertionError(f"{name}: no value for {[p.name for p in params if p.name not in fixed]}")
        self.name, self.fn, self.grid, self.options = name, fn, tuple(grid), options
        self.absent = dict.fromkeys(pointers)  # every pointer None unless named
        self.order = operator.itemgetter(*pointers)
        self.cuda = device.type == "cuda"
        self.index = (device.index if device.index is not None else torch.cuda.current_device()) if self.cuda else -1
        self.c_launch = None  # the compiled kernel's C launcher, once known
        g = (*self.grid, 1, 1)
        self.g0, self.g1, self.g2 = g[0], g[1], g[2]

    def __call__(self, **named) -> None:
        LAUNCHES[self.name] += 1
        given = {**self.absent, **named}
        if len(given) != len(self.absent):
            raise TypeError(f"{self.name}: no pointers {sorted(set(named) - set(self.absent))}")
        pointers = self.order(given)
        c_launch = self.c_launch
        hooks = _RUNTIME  # a launch hook (a profiler's) is called by Triton's own path only
        if (
            c_launch is not None
            and not getattr(hooks.launch_enter_hook, "calls", True)
            and not getattr(hooks.launch_exit_hook, "calls", True)
            and torch._C._cuda_getDevice() == self.index
        ):
            DIRECT_LAUNCHES[0] += 1
            stream = torch._C._cuda_getCurrentRawStream(self.index)
            if self.form_3_8:
                c_launch(self.g0, self.g1, self.g2, stream, self.function, self.cooperative, self.pdl,
                         self.metadata, None, None, None, None, None, self.annotations, self.signature,
                         (*pointers, *self.tail))  # fmt: skip
            else:
                c_launch(self.g0, self.g1, self.g2, stream, self.function, self.cooperative, self.pdl,
                         None, None, self.metadata, None, None, None, *pointers, *self.tail)  # fmt: skip
            return
        if self.cuda:
            self.triton_launch(pointers)
        else:  # the interpreter, or stubs
            self.fn[self.grid](*pointers, *self.tail, **self.options)

    def triton_launch(self, pointers: tuple) -> None:
        """Triton's own launch on a GPU (on the tensors' device); afterwards, where it can, the direct one."""
        if torch.cuda.current_device() != self.index:
            with torch.cuda.device(self.index):
                kernel = self.fn[self.grid](*pointers, *self.tail, **self.options)
        else:
            kernel = self.fn[self.grid](*pointers, *self.tail, **self.options)
        if self.c_launch is None and ENABLED and type(self.fn) is JITFunction:
            self._go_direct(kernel)

    def _go_direct(self, kernel) -> None:
        """Keep the compiled kernel's C launcher, if nothing of what its Python wrapper does applies."""
        launcher = getattr(kernel, "run", None)  # also loads the kernel on the device
        if launcher is None or not hasattr(kernel, "packed_metadata"):  # an asynchronous compile's future
            return
        if launcher.global_scratch_size or launcher.profile_scratch_size or getattr(launcher, "gsan_enabled", False):
            return
        self.function, self.metadata = kernel.function, kernel.packed_metadata
        self.cooperative, self.pdl = launcher.launch_cooperative_grid, launcher.launch_pdl
        self.form_3_8 = _C_FORM == "3_8"
        if self.form_3_8:
            self.annotations, self.signature = launcher.arg_annotations, launcher.kernel_signature
        self.c_launch = launcher.launch
