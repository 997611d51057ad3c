"""Kernel stubs: bn_triton's host code runs for real, its Triton kernels do not.

``with stubbed_kernels(): ...`` replaces every kernel in ``bn_triton.kernels.__all__`` (any triton
``KernelInterface``: ``@triton.jit``, heuristics, autotune) by a stub whose ``[grid](*args, **kwargs)``
calls ``on_launch(Launch)`` (default: does nothing), in ``bn_triton.kernels`` and in every loaded
``bn_triton`` module that imported the kernel by name; everything is restored on exit, and the
launch plans built meanwhile are forgotten. Uses: the
host cost of a call without its kernels (bench/overhead.py), recording launches to compile them
(bench/inspect_sass.py), and running the launch code on meta tensors (tests).
"""

import contextlib
import dataclasses
import sys
from collections.abc import Callable
from unittest import mock


@dataclasses.dataclass
class Launch:
    name: str
    kernel: object  # the replaced KernelInterface
    grid: object
    args: tuple
    kwargs: dict


def _no_launch(*args, **kwargs):
    return None


class _Stub(dict):
    """``stub[grid]`` is a dict lookup once a grid was seen: a launch then costs what a no-op call does."""

    def __init__(self, name, kernel, on_launch):
        super().__init__()
        self.name, self.kernel, self.on_launch = name, kernel, on_launch

    def __missing__(self, grid):
        if self.on_launch is None:  # nothing to record
            launch = _no_launch
        else:
            launch = lambda *args, **kwargs: self.on_launch(Launch(self.name, self.kernel, grid, args, kwargs))
        self[grid] = launch
        return launch

    __hash__ = object.__hash__  # kept by id (stubbed_kernels maps ids to stubs)


@contextlib.contextmanager
def stubbed_kernels(on_launch: Callable | None = None):
    """Replace every kernel of bn_triton.kernels by a stub; yields {name: original kernel}."""
    from triton.runtime.jit import KernelInterface

    from bn_triton import kernels, launch

    originals = {n: getattr(kernels, n) for n in kernels.__all__}
    originals = {n: k for n, k in originals.items() if isinstance(k, KernelInterface)}
    # By id: the originals are alive meanwhile, so an object with one of their ids is that kernel.
    stubs = {id(k): _Stub(n, k, on_launch) for n, k in originals.items()}
    with contextlib.ExitStack() as restore:
        # Launch plans hold the kernels they were built with: none built before or inside survives.
        launch.clear_plans()
        restore.callback(launch.clear_plans)
        for mod_name, mod in list(sys.modules.items()):
            if mod is not None and mod_name.partition(".")[0] == "bn_triton":
                for attr, value in list(vars(mod).items()):
                    if id(value) in stubs:
                        restore.enter_context(mock.patch.object(mod, attr, stubs[id(value)]))
        yield originals
