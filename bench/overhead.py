"""Host cost per call of bn_triton's public API, beside an empty autograd.Function and torch's.

    python bench/overhead.py             # CUDA if there is one, else CPU under the Triton interpreter
    python bench/overhead.py --stub      # bn_triton's kernels replaced by no-op launches: Python alone,
                                         # with Python calls and tensor allocations per call
    python bench/overhead.py --decompose # where a GPU host's time per call goes (on a GPU)

Rows: the functional training forward (x, weight, bias require grad), eval forward (no_grad),
forward + backward, and a module's training step (forward + backward: BatchNorm2d for 4-D shapes,
BatchNorm1d for 2-D and 3-D). Columns: bn_triton; ``empty``, an autograd.Function with three inputs
that allocates its output and computes nothing (bench/counts.py), the floor of any layer built on
one; torch (F.batch_norm, torch.nn.BatchNorm*d) on the same tensors; bn_triton's time over the empty
Function's and over torch's. Times are the best of several loops of calls, the routes taking turns,
synchronized around each loop on a GPU: the per-call cost the host pays. With --stub the counts
follow (deterministic, bench/counts.py). Under the interpreter a real kernel launch takes
milliseconds of NumPy, which drowns microseconds: use --stub there, and read unstubbed CPU numbers
as a sanity check only. The direct launch path's Python per launch: python -m bench.direct_launch.
"""

import argparse
import contextlib
import os
import sys
import time

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before bn_triton imports the kernels
if not __package__:  # run as a file: make `bench` and `bn_triton` importable from the repo root
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import bn_triton  # noqa: E402
from bench import counts, impls, runner, stub, suite  # noqa: E402

ROUTES = ("bn_triton", "empty", "torch")


def empty_bn(x, running_mean, running_var, weight, bias, training: bool, residual=None):
    """The empty Function in the implementations' signature (bench/impls.py)."""
    return counts.EmptyFunction.apply(x, weight, bias)


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
    """(name, {route: callable}, grad mode) per row: the bench's own passes (bench/runner.py) on one
    fp32 input."""
    inp = runner.make_inputs(suite.Case(shape, torch.float32, suite.layout_of(shape, False)), device)
    fns = dict(bn_triton=impls.triton_bn, empty=empty_bn, torch=impls.torch_bn)
    rows = [
        (name, {k: runner.pass_callable(fn, p, inp) for k, fn in fns.items()}, grad)
        for name, p, grad in (
            ("batch_norm train forward (grad)", "train_fwd", True),
            ("batch_norm eval forward (no_grad)", "eval_fwd", False),
            ("batch_norm forward + backward", "fwd_bwd", True),
        )
    ]
    # A module's training step: forward, then backward (the empty Function stands in for the module).
    x, C = inp.x.detach().requires_grad_(), shape.dims[1]
    ours, theirs = (bn_triton.BatchNorm2d, torch.nn.BatchNorm2d) if len(shape.dims) == 4 else (
        bn_triton.BatchNorm1d, torch.nn.BatchNorm1d)  # fmt: skip
    modules = dict(bn_triton=ours(C).to(device), torch=theirs(C).to(device))
    step = {k: _train_step(m, x, inp.dy) for k, m in modules.items()}
    step["empty"] = rows[2][1]["empty"]
    rows.append((f"{ours.__name__} train step", {k: step[k] for k in ROUTES}, True))
    return rows


def _train_step(module, x, dy):
    return lambda: torch.autograd.grad(module(x), (x, module.weight, module.bias), dy)


def decompose(device, shape: suite.Shape, calls: int, repeats: int, sync) -> None:
    """Where the host's time per call goes, in one run: the floors (an empty autograd.Function, tensor
    allocations, a no-op Triton kernel with a bn_triton kernel's argument count through Triton's
    ``fn[grid]`` and through the direct path), bn_triton with its kernels stubbed and not, and torch."""
    import triton
    import triton.language as tl

    from bn_triton import _launcher

    @triton.jit
    def noop(X, P, Q, M, R, V, RM, RV, NB, a, b, c, d, e, f, g, h, i, j, k, A: tl.constexpr, B: tl.constexpr):
        pass

    inp = runner.make_inputs(suite.Case(shape, torch.float32, suite.layout_of(shape, False)), device)
    x, w = inp.x, inp.weight
    ints = tuple(range(2, 13))
    pointers = ("X", "P", "Q", "M", "R", "V", "RM", "RV", "NB")
    fixed = dict(zip("abcdefghijk", ints, strict=True), A=1, B=2)
    launch_ = _launcher.Launch("noop", noop, (1,), pointers, fixed, {}, device)
    ptrs = (x, w, w, w, w, w, w, w, w)
    routes = {
        "empty autograd.Function, forward": lambda: counts.EmptyFunction.apply(x, w, w),
        "empty autograd.Function, forward + backward": runner.pass_callable(empty_bn, "fwd_bwd", inp),
        "8 torch.empty calls": lambda: [torch.empty(64, device=device) for _ in range(8)],
        "no-op kernel, 20 arguments, fn[grid]": lambda: noop[(1,)](*ptrs, *ints, A=1, B=2),
        "no-op kernel, 20 arguments, bn_triton's launch": lambda: launch_(*ptrs),
    }
    for name, p in (("train forward", "train_fwd"), ("forward + backward", "fwd_bwd")):
        routes[f"torch F.batch_norm, {name}"] = runner.pass_callable(impls.torch_bn, p, inp)
        routes[f"bn_triton, {name}"] = runner.pass_callable(impls.triton_bn, p, inp)
    t = per_call_us(routes, calls, repeats, sync)
    with stub.stubbed_kernels():
        stubbed = {f"bn_triton, kernels stubbed, {n}": runner.pass_callable(impls.triton_bn, p, inp)
                   for n, p in (("train forward", "train_fwd"), ("forward + backward", "fwd_bwd"))}  # fmt: skip
        t.update(per_call_us(stubbed, calls, repeats, sync))
    print(f"\nhost time per call, {_where(device)}; shape {shape.dims}; direct launches {_launcher.ENABLED}")
    print("| what | us per call |\n|---|---|")
    for name, us in t.items():
        print(f"| {name} | {us:.1f} |")
    profile(routes["bn_triton, forward + backward"], calls, sync)


def _where(device) -> str:
    return torch.cuda.get_device_name() if device.type == "cuda" else "CPU, Triton interpreter"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--stub", action="store_true", help="no-op kernel launches: bn_triton's host cost alone, counted")
    p.add_argument("--decompose", action="store_true", help="where a GPU host's time per call goes (needs a GPU)")
    p.add_argument("--shape", default="2,3,4,4", help="input shape (default 2,3,4,4: tiny on purpose)")
    p.add_argument("--calls", type=int, help="calls per loop (default 200 on GPU or with --stub, else 3)")
    p.add_argument("--repeats", type=int, default=7)
    what = "cProfile and torch.profiler tables of N calls of bn_triton's forward + backward"
    p.add_argument("--profile", type=int, metavar="N", help=f"then {what}: where the host time goes")
    args = p.parse_args(argv)
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    shape = suite.parse_shape(args.shape.replace(",", "x"))
    calls = args.calls or (200 if cuda or args.stub else 3)
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    if args.decompose:
        if not cuda:
            print("--decompose times launches on a GPU: there is none here (bench/overhead.py --stub counts on CPU)")
            return 2
        decompose(device, shape, calls, args.repeats, sync)
        return 0
    where = _where(device) + (", bn_triton's kernels stubbed (no-op launches)" if args.stub else "")
    print(f"host cost per call, {where}; shape {shape.dims}; torch {torch.__version__}")
    print(f"best of {args.repeats} loops of {calls} calls, taking turns; microseconds per call")
    print(f"{'':36s} {'bn_triton':>10s} {'empty':>10s} {'torch':>10s} {'/empty':>7s} {'/torch':>7s}")
    with stub.stubbed_kernels() if args.stub else contextlib.nullcontext():
        rows = cases(device, shape)
        for name, routes, grad in rows:
            with torch.set_grad_enabled(grad):
                t = per_call_us(routes, calls, args.repeats, sync)
            ours = t["bn_triton"]
            print(f"{name:36s} {ours:10.1f} {t['empty']:10.1f} {t['torch']:10.1f} "
                  f"{ours / t['empty']:6.2f}x {ours / t['torch']:6.2f}x")  # fmt: skip
        if args.stub:
            print("\nPython calls / tensor allocations per call (bench/counts.py; deterministic)")
            print(f"{'':36s} {'bn_triton':>10s} {'empty':>10s} {'torch':>10s}")
            for name, routes, grad in rows:
                with torch.set_grad_enabled(grad):
                    n = {k: f"{counts.python_calls(f)} / {counts.allocations(f)}" for k, f in routes.items()}
                print(f"{name:36s} {n['bn_triton']:>10s} {n['empty']:>10s} {n['torch']:>10s}")
        if args.profile:
            profile(rows[2][1]["bn_triton"], args.profile, sync)
    return 0


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
    sys.exit(main())
