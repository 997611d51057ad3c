"""Host cost per call of bn_triton's public API against torch's, on a tiny tensor (host cost dominates).

    python bench/overhead.py           # CUDA if there is one, else CPU under the Triton interpreter
    python bench/overhead.py --stub    # bn_triton's kernels replaced by no-op launches: Python cost alone

Rows: the functional training forward (x, weight, bias require grad), eval forward (no_grad),
forward + backward, and a BatchNorm2d training step (forward + backward). Columns: bn_triton,
torch on the same tensors (F.batch_norm, torch.nn.BatchNorm2d), their ratio. Times are the best of
several loops of calls, the two taking turns, synchronized around each loop on a GPU: the per-call
cost the host pays. Under the interpreter a real kernel launch takes milliseconds of NumPy, which
drowns microseconds: use --stub there, and read unstubbed CPU numbers as a sanity check only.
"""

import argparse
import contextlib
import os
import sys
import time

import torch
import torch.nn.functional as F

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before bn_triton imports the kernels
if not __package__:  # run as a file: make `bench` and `bn_triton` importable from the repo root
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import bn_triton  # noqa: E402
from bench import stub  # noqa: E402


def per_call_us(routes: dict, calls: int, repeats: int, sync) -> dict:
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


def cases(device, shape) -> list:
    """(name, {route: callable}) per row."""
    C = shape[1]
    x = torch.randn(shape, device=device)
    xg = x.clone().requires_grad_()
    w, b = (torch.randn(C, device=device, requires_grad=True) for _ in range(2))
    rm, rv = torch.zeros(C, device=device), torch.ones(C, device=device)
    dy = torch.randn(shape, device=device)

    def train(bn):
        return lambda: bn(xg, rm, rv, w, b, True, 0.1, 1e-5)

    def eval_(bn):
        def f():
            with torch.no_grad():
                return bn(x, rm, rv, w, b, False, 0.1, 1e-5)

        return f

    def fwd_bwd(bn):
        return lambda: torch.autograd.grad(bn(xg, rm, rv, w, b, True, 0.1, 1e-5), (xg, w, b), dy)

    def step(module):
        m = module(C).to(device)
        return lambda: m(xg).backward(dy)

    pair = dict(bn_triton=bn_triton.batch_norm, torch=F.batch_norm)
    rows = [(n, {k: make(bn) for k, bn in pair.items()}) for n, make in (
        ("batch_norm train forward (grad)", train), ("batch_norm eval forward (no_grad)", eval_),
        ("batch_norm forward + backward", fwd_bwd),
    )]  # fmt: skip
    if len(shape) == 4:
        modules = dict(bn_triton=bn_triton.BatchNorm2d, torch=torch.nn.BatchNorm2d)
        rows.append(("BatchNorm2d train step", {k: step(m) for k, m in modules.items()}))
    return rows


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--stub", action="store_true", help="no-op kernel launches: bn_triton's host cost alone")
    p.add_argument("--shape", default="2,3,4,4", help="input shape (default 2,3,4,4: tiny on purpose)")
    p.add_argument("--calls", type=int, help="calls per loop (default 200 on GPU or with --stub, else 3)")
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument(
        "--profile",
        type=int,
        metavar="N",
        help="then profile N calls of bn_triton's forward + backward (cProfile, top functions by own time): "
        "where the host time goes, launcher and allocations included",
    )
    args = p.parse_args(argv)
    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    shape = tuple(int(s) for s in args.shape.split(","))
    calls = args.calls or (200 if cuda or args.stub else 3)
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    where = torch.cuda.get_device_name() if cuda else "CPU, Triton interpreter"
    where += ", bn_triton's kernels stubbed (no-op launches)" if args.stub else ""
    print(f"host cost per call, {where}; shape {shape}; torch {torch.__version__}")
    print(f"best of {args.repeats} loops of {calls} calls, taking turns; microseconds per call")
    print(f"{'':36s} {'bn_triton':>10s} {'torch':>10s} {'ratio':>7s}")
    with stub.stubbed_kernels() if args.stub else contextlib.nullcontext():
        rows = cases(device, shape)
        for name, routes in rows:
            t = per_call_us(routes, calls, args.repeats, sync)
            print(f"{name:36s} {t['bn_triton']:10.1f} {t['torch']:10.1f} {t['bn_triton'] / t['torch']:6.2f}x")
        if args.profile:
            profile(dict(rows)["batch_norm forward + backward"]["bn_triton"], args.profile, sync)


def profile(fn, calls: int, sync) -> None:
    """cProfile of ``calls`` calls of fn, synchronized at the end: the 25 functions with the most own time."""
    import cProfile
    import pstats

    fn()
    sync()
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(calls):
        fn()
    sync()
    prof.disable()
    print(f"\ncProfile of {calls} bn_triton forward + backward calls (own time, then cumulative):")
    pstats.Stats(prof).sort_stats("tottime").print_stats(25)


if __name__ == "__main__":
    main()
