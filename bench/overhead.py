"""Host cost per call of bn_triton's public API against torch's, on a tiny tensor (host cost dominates).

    python bench/overhead.py           # CUDA if there is one, else CPU under the Triton interpreter
    python bench/overhead.py --stub    # bn_triton's kernels replaced by no-op launches: Python cost alone
    python bench/overhead.py --launcher  # the direct launcher's Python per launch (no GPU needed; the
                                         # Triton it supports, 3.6: pip install triton==3.6.0 in a venv)

Rows: the functional training forward (x, weight, bias require grad), eval forward (no_grad),
forward + backward, and a BatchNorm2d training step (forward + backward). Columns: bn_triton,
torch on the same tensors (F.batch_norm, torch.nn.BatchNorm2d), their ratio. Times are the best of
several loops of calls, the two taking turns, synchronized around each loop on a GPU: the per-call
cost the host pays. Under the interpreter a real kernel launch takes milliseconds of NumPy, which
drowns microseconds: use --stub there, and read unstubbed CPU numbers as a sanity check only.
"""

import argparse
import contextlib
import functools
import os
import sys
import time
import types
from unittest import mock

import torch

if "--launcher" in sys.argv:  # compiled kernels (JITFunctions), never interpreted ones
    os.environ["TRITON_INTERPRET"] = "0"
elif not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before bn_triton imports the kernels
if not __package__:  # run as a file: make `bench` and `bn_triton` importable from the repo root
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import bn_triton  # noqa: E402
from bench import impls, runner, stub, suite  # noqa: E402


def per_call_us(routes: dict, calls: int, repeats: int, sync=lambda: None) -> dict:
    """Microseconds per call of each route: the best of ``repeats`` loops of ``calls`` calls, the
    routes taking turns loop by loop (other processes only ever add time)."""
    for fn in routes.values():
        for _ in range(3):  # warm-up: compile caches, allocator, lazy imports
            fn()
    best = dict.fromkeys(routes, float("inf"))
    for _ in range(repeats):
        for name, fn in routes.items():
            sync()
            t0 = time.perf_counter()
            for _ in range(calls):
                fn()
            sync()
            best[name] = min(best[name], (time.perf_counter() - t0) / calls * 1e6)
    return best


def cases(device, shape: suite.Shape) -> list:
    """(name, {route: callable}) per row: the bench's own passes (bench/runner.py) on one fp32 input."""
    inp = runner.make_inputs(suite.Case(shape, torch.float32, suite.layout_of(shape, False)), device)
    pair = dict(bn_triton=impls.triton_bn, torch=impls.torch_bn)
    rows = [
        (name, {k: wrap(runner.pass_callable(fn, p, inp)) for k, fn in pair.items()})
        for name, p, wrap in (
            ("batch_norm train forward (grad)", "train_fwd", lambda f: f),
            ("batch_norm eval forward (no_grad)", "eval_fwd", torch.no_grad()),
            ("batch_norm forward + backward", "fwd_bwd", lambda f: f),
        )
    ]
    if len(shape.dims) == 4:  # a module's training step: forward, then backward
        x, C = inp.x.detach().requires_grad_(), shape.dims[1]
        modules = dict(bn_triton=bn_triton.BatchNorm2d(C), torch=torch.nn.BatchNorm2d(C))
        train_step = lambda m: lambda: m(x).backward(inp.dy)
        rows.append(("BatchNorm2d train step", {k: train_step(m.to(device)) for k, m in modules.items()}))
    return rows


def launcher_us(calls: int) -> None:
    """Python time per launch of bn_triton/_launcher.py's direct path, for the launches of a training
    forward and backward at 32x64x14x14: a no-op compiled kernel and device queries, so the CUDA
    launch itself (C, driver) is not in it."""
    from bn_triton import _launcher, launch

    version = _launcher.triton.__version__
    if not _launcher.ENABLED:
        print(f"the direct launcher is off for triton {version} (it supports 3.6)")
        return
    record = []
    x, geom = launch.canonical(torch.randn(32, 64, 14, 14))
    w, mean, rstd = torch.randn(64), torch.zeros(64), torch.ones(64)
    with mock.patch.object(_launcher, "launch", lambda *launch_args: record.append(launch_args)):
        launch.batch_stats(x, geom, 1e-5)
        launch.normalize(x, geom, mean, rstd, w, w, 1e-5, scale_is_var=False)
        sums = launch.grad_sums(x, x, geom, mean, rstd, w, 1e-5, scale_is_var=False)
        launch.grad_input(x, x, geom, mean, rstd, w, sums, 1e-5, training=True)
    noop = types.SimpleNamespace(function=0, packed_metadata=0, launch_metadata=lambda *a: None, run=lambda *a: None)
    device = types.SimpleNamespace(get_current_device=lambda: 0, get_current_stream=lambda index: 0)
    print(f"direct launcher, Python per launch (triton {version}, no-op kernel):")
    with mock.patch.object(_launcher, "driver", types.SimpleNamespace(active=device)):
        routes = {}
        for fn, grid, args, kwargs in record:  # each launch's key already compiled, to the no-op kernel
            sig, values, key, _ = _launcher.bind(fn, args, kwargs)
            sig.compiled[key] = _launcher.plan_for(noop, values)
            routes[fn.__name__] = functools.partial(_launcher.launch, fn, grid, args, kwargs)
        for name, us in per_call_us(routes, calls, repeats=5).items():
            print(f"  {name:20s} {us:6.2f} us")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--stub", action="store_true", help="no-op kernel launches: bn_triton's host cost alone")
    p.add_argument("--launcher", action="store_true", help="the direct launcher's Python per launch, no GPU needed")
    p.add_argument("--shape", default="2,3,4,4", help="input shape (default 2,3,4,4: tiny on purpose)")
    p.add_argument("--calls", type=int, help="calls per loop (default 200 on GPU or with --stub, else 3)")
    p.add_argument("--repeats", type=int, default=7)
    what = "cProfile and torch.profiler tables of N calls of bn_triton's forward + backward"
    p.add_argument("--profile", type=int, metavar="N", help=f"then {what}: where the host time goes")
    args = p.parse_args(argv)
    if args.launcher:
        launcher_us(args.calls or 20000)
        return
    cuda = torch.cuda.is_available()
    shape = suite.parse_shape(args.shape.replace(",", "x"))
    calls = args.calls or (200 if cuda or args.stub else 3)
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    where = torch.cuda.get_device_name() if cuda else "CPU, Triton interpreter"
    where += ", bn_triton's kernels stubbed (no-op launches)" if args.stub else ""
    print(f"host cost per call, {where}; shape {shape.dims}; torch {torch.__version__}")
    print(f"best of {args.repeats} loops of {calls} calls, taking turns; microseconds per call")
    print(f"{'':36s} {'bn_triton':>10s} {'torch':>10s} {'ratio':>7s}")
    with stub.stubbed_kernels() if args.stub else contextlib.nullcontext():
        rows = cases("cuda" if cuda else "cpu", shape)
        for name, routes in rows:
            t = per_call_us(routes, calls, args.repeats, sync)
            print(f"{name:36s} {t['bn_triton']:10.1f} {t['torch']:10.1f} {t['bn_triton'] / t['torch']:6.2f}x")
        if args.profile:
            profile(dict(rows)["batch_norm forward + backward"]["bn_triton"], args.profile, sync)


def profile(fn, calls: int, sync) -> None:
    """Where the host time of ``calls`` calls of fn goes: cProfile (the 25 Python functions with the
    most own time), then torch's profiler (the 20 ops and, on a GPU, CUDA API calls with the most
    self CPU time: kernel launches, allocations, any synchronization)."""
    import cProfile
    import pstats

    def loop():
        for _ in range(calls):
            fn()
        sync()

    fn()
    sync()
    prof = cProfile.Profile()
    prof.runcall(loop)
    print(f"\ncProfile of {calls} bn_triton forward + backward calls (own time):")
    pstats.Stats(prof).sort_stats("tottime").print_stats(25)
    with torch.profiler.profile() as tprof:  # CPU, and CUDA where there is one
        loop()
    print(f"torch.profiler of {calls} bn_triton forward + backward calls (self CPU time):")
    print(tprof.key_averages().table(sort_by="self_cpu_time_total", row_limit=20))


if __name__ == "__main__":
    main()
