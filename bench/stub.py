"""Kernel stubs: bn_triton's host code runs for real, its Triton kernels do not.

``with stubbed_kernels(): ...`` replaces every kernel in ``bn_triton.kernels.__all__`` (any triton
``KernelInterface``: ``@triton.jit``, heuristics, autotune) by a stub whose ``[grid](*args, **kwargs)``
calls ``on_launch(Launch)`` (default: does nothing), in ``bn_triton.kernels`` and in every loaded
``bn_triton`` module that imported the kernel by name; everything is restored on exit. Uses: the
host cost of a call without its kernels (bench/overhead.py), recording launches to compile them
(bench/inspect_sass.py), and running the launch code on meta tensors (tests).
"""

import contextlib
import dataclasses
import sys
from collections.abc import Callable


@dataclasses.dataclass
class Launch:
    name: str
    kernel: object  # the replaced KernelInterface
    grid: object
    args: tuple
    kwargs: dict


class _Stub:
    def __init__(self, name, kernel, on_launch):
        self.name, self.kernel, self.on_launch = name, kernel, on_launch

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            if self.on_launch is not None:
                self.on_launch(Launch(self.name, self.kernel, grid, args, kwargs))

        return launch


@contextlib.contextmanager
def stubbed_kernels(on_launch: Callable | None = None):
    """Replace every kernel of bn_triton.kernels by a stub; yields {name: original kernel}."""
    from triton.runtime.jit import KernelInterface

    from bn_triton import kernels

    originals = {n: getattr(kernels, n) for n in kernels.__all__}
    originals = {n: k for n, k in originals.items() if isinstance(k, KernelInterface)}
    by_id = {id(k): _Stub(n, k, on_launch) for n, k in originals.items()}
    patched = []  # (module, attribute, original)
    for mod_name, mod in list(sys.modules.items()):
        if mod is None or not (mod_name == "bn_triton" or mod_name.startswith("bn_triton.")):
            continue
        for attr, value in list(vars(mod).items()):
            if id(value) in by_id and value is by_id[id(value)].kernel:
                patched.append((mod, attr, value))
                setattr(mod, attr, by_id[id(value)])
    try:
        yield originals
    finally:
        for mod, attr, value in reversed(patched):
            setattr(mod, attr, value)
