"""Benchmarks of bn_triton against cuDNN, torch's native kernels and torch.compile.

Run ``python -m bench`` (see __main__.py). Modules, one job each:
  suite.py        shapes (suite v1, --quick, the smoke's tiny cases), dtype/layout configs, passes,
                  workloads (plain BN; BN -> add -> ReLU; BN -> SiLU; BN -> Hardswish)
  traffic.py      the minimal-traffic byte model behind every GB/s number
  impls.py        the implementations, defined once, and detection of the backend that actually ran
  runner.py       inputs, float64 reference, correctness check, wall/host/device timing
  report.py       CSV, tables, verdict, PNG plots, environment JSON
  stub.py         bn_triton's kernels replaced by recording or no-op launches
  e2e.py          training steps of a whole model (``python -m bench --model resnet50``)
  fusion_report.py what bn_triton.fuse fuses in torchvision's and timm's models (``python -m bench.fusion_report``)
  overhead.py     host cost per call of the public API, kernels stubbed or not
  inspect_sass.py sm_90 SASS of every kernel launch, compiled without a GPU
  gpu_check.sh    one call on a GPU machine: versions, the test suite on the GPU, e2e, suite v1,
                  the comparison with torch.compile

Nothing here imports bn_triton at import time: on CPU, TRITON_INTERPRET must be set first.
"""

import contextlib
import signal


def start_smoke(cuda: bool, smoke: bool, no_gpu_lines: tuple, smoke_line: str) -> None:
    """Say why no times follow. Without a GPU also switch Triton's interpreter on: before triton and
    bn_triton's kernels are imported, since @triton.jit reads TRITON_INTERPRET when it decorates them.
    Run as ``python -m bn_triton.bench`` (an installed wheel), bn_triton is imported before this
    runs (and triton may be, by another import such as torchvision's): then the same command starts
    again, in a new process, with the interpreter on."""
    import os
    import sys

    if not cuda:
        imported = "bn_triton" in sys.modules or "triton" in sys.modules
        if os.environ.get("TRITON_INTERPRET", "0") in ("", "0") and imported:
            os.environ["TRITON_INTERPRET"] = "1"
            module = sys.modules["__main__"].__spec__.name.removesuffix(".__main__")
            os.execv(sys.executable, [sys.executable, "-m", module, *sys.argv[1:]])
        print("\n".join(no_gpu_lines))
        os.environ["TRITON_INTERPRET"] = "1"
    elif smoke:
        print(smoke_line)


@contextlib.contextmanager
def sigterm_as_interrupt():
    """Within this block SIGTERM (what `timeout` and schedulers send) raises KeyboardInterrupt, like
    Ctrl-C, so a run stops where Ctrl-C would stop it and writes the rows measured so far. Outside
    the main thread (a caller's worker) no handler can be set: the block runs without one."""

    def on_term(signum, frame):
        raise KeyboardInterrupt

    try:
        previous = signal.signal(signal.SIGTERM, on_term)
    except ValueError:
        previous = None
    try:
        yield
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
