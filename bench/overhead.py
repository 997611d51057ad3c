"""Eager per-call overhead of bn_triton's op layer, for a tiny tensor (host cost dominates).

Three routes to the same kernels, per call:
  direct  the launchers in bn_triton.launch, no autograd, no dispatcher (the floor)
  op      the torch.library custom ops (dispatcher + custom_op's Python autograd wrapper): what
          torch.compile and torch.export see
  fast    the eager fast path (bn_triton.ops.call_*): the same implementations behind one
          autograd.Function, used by the functional API and the modules outside tracing
and a whole BatchNorm2d training step (forward + backward) by the fast path and by the op path.

    python bench/overhead.py             # CUDA if there is one, else CPU under the Triton interpreter
    python bench/overhead.py --stub      # kernels replaced by no-op launches: Python cost alone

A standalone script (not part of ``python -m bench``). Times are the best of several loops of calls,
routes taking turns, with torch.cuda.synchronize() around each loop on a GPU, so they are the
per-call cost the host pays; with kernels this small the GPU is never the bottleneck. Under the interpreter a real
kernel launch takes tens of milliseconds of NumPy, which drowns microsecond differences: use --stub
there (the numbers to compare) and read the unstubbed CPU numbers as a sanity check only.
"""

import argparse
import os
import sys
import time

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before bn_triton imports the kernels

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import triton  # noqa: E402

import bn_triton  # noqa: E402
from bn_triton import launch, ops  # noqa: E402


class _NoLaunch:
    def __getitem__(self, grid):
        return lambda *args, **kwargs: None


def stub_kernels():
    """Replace every kernel with a no-op launch: what is left is the Python and dispatcher cost."""
    for name in dir(launch.kernels):
        if isinstance(getattr(launch.kernels, name), triton.runtime.jit.KernelInterface):
            setattr(launch.kernels, name, _NoLaunch())


def per_call_us(routes, calls, repeats, sync):
    """Microseconds per call of each route: the best of ``repeats`` loops of ``calls`` calls.

    The routes take turns loop by loop, so a busy spell on the machine hits them alike; the best
    loop is the one least disturbed by other processes (they only ever add time)."""
    routes = {name: fn for name, fn in routes.items() if fn is not None}
    for fn in routes.values():
        for _ in range(3):  # warm-up: Triton's compile cache, allocator, first-call lazy imports
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


def cases(device, shape):
    C = shape[1]
    eps = 1e-5
    x = torch.randn(shape, device=device)
    xg = x.clone().requires_grad_()
    w = torch.randn(C, device=device, requires_grad=True)
    b = torch.randn(C, device=device, requires_grad=True)
    rm, rv = torch.zeros(C, device=device), torch.ones(C, device=device)
    dy = torch.randn(shape, device=device)
    _, mean, rstd, var = ops.train_forward(x, w.detach(), b.detach(), eps)
    count = x.numel() // C

    def train_direct():
        x_, g = launch.canonical(x)
        m, r, _v = launch.batch_stats(x_, g, eps)
        return launch.normalize(x_, g, m, r, False, eps, w, b)

    def eval_direct():
        x_, g = launch.canonical(x)
        return launch.normalize(x_, g, rm, rv, True, eps, w, b)

    def backward_direct():
        x_, g = launch.canonical(x)
        dw, db = torch.empty_like(w), torch.empty_like(b)
        s1, s2 = launch.grad_sums(dy, x_, g, mean, rstd, False, eps, dw, db)
        return launch.grad_input(dy, x_, g, mean, rstd, w, s1, s2)

    def stats_direct():
        launch.update_running_stats(rm, rv, mean, var, 0.1, count, None)

    mask = [True, True, True]
    rows = [
        # train forward with inputs that require grad (training), so the autograd wrappers run too
        (
            "train_forward (x, w, b require grad)",
            train_direct,
            lambda: ops.train_forward(xg, w, b, eps),
            lambda: ops.call_train_forward(xg, w, b, eps),
        ),
        # eval forward under no_grad (inference)
        (
            "eval_forward (no_grad)",
            eval_direct,
            lambda: _no_grad(ops.eval_forward, x, rm, rv, w, b, eps),
            lambda: _no_grad(ops.call_eval_forward, x, rm, rv, w, b, eps),
        ),
        (
            "backward (dx, dw, db)",
            backward_direct,
            lambda: ops.backward(dy, x, mean, rstd, w.detach(), eps, True, mask),
            lambda: ops._IMPL["backward"](dy, x, mean, rstd, w.detach(), eps, True, mask),
        ),
        (
            "update_running_stats",
            stats_direct,
            lambda: ops.update_running_stats(rm, rv, mean, var, 0.1, count, None),
            lambda: ops.call_update_running_stats(rm, rv, mean, var, 0.1, count, None),
        ),
    ]
    return rows


def _no_grad(fn, *args):
    with torch.no_grad():
        return fn(*args)


def module_step(device, shape, force_op_path):
    """One BatchNorm2d training step, forward + backward, by the fast path or forced onto the ops."""
    bn = bn_triton.BatchNorm2d(shape[1]).to(device)
    x = torch.randn(shape, device=device, requires_grad=True)
    dy = torch.randn(shape, device=device)
    plain = ops._plain_eager

    def step():
        if force_op_path:
            ops._plain_eager = lambda *tensors: False
        try:
            bn(x).backward(dy)
        finally:
            ops._plain_eager = plain

    return step


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--stub", action="store_true", help="no-op kernel launches: the Python/dispatcher cost alone")
    p.add_argument("--shape", default="2,3,4,4", help="input shape (default 2,3,4,4: tiny on purpose)")
    p.add_argument("--calls", type=int, help="calls per loop (default 200 on GPU or with --stub, else 3)")
    p.add_argument("--repeats", type=int, default=7)
    args = p.parse_args(argv)
    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    shape = tuple(int(s) for s in args.shape.split(","))
    calls = args.calls or (200 if cuda or args.stub else 3)
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    where = torch.cuda.get_device_name() if cuda else "CPU, Triton interpreter"
    if args.stub:
        stub_kernels()
        where += ", kernels stubbed (no-op launches)"
    print(f"bn_triton eager overhead, {where}; shape {shape}; torch {torch.__version__}, triton {triton.__version__}")
    print(f"best of {args.repeats} loops of {calls} calls, routes taking turns; microseconds per call")
    print(f"{'':40s} {'direct':>9s} {'op':>9s} {'fast':>9s} {'op-direct':>10s} {'fast-direct':>12s}")
    for name, direct, op, fast in cases(device, shape):
        t = per_call_us(dict(direct=direct, op=op, fast=fast), calls, args.repeats, sync)
        d = t["direct"]
        print(f"{name:40s} {d:9.1f} {t['op']:9.1f} {t['fast']:9.1f} {t['op'] - d:10.1f} {t['fast'] - d:12.1f}")
    step = dict(op=module_step(device, shape, True), fast=module_step(device, shape, False))
    t = per_call_us(step, calls, args.repeats, sync)
    name = "BatchNorm2d train step, fwd + bwd"
    print(f"{name:40s} {'-':>9s} {t['op']:9.1f} {t['fast']:9.1f}   (op path - fast path: {t['op'] - t['fast']:.1f})")
    print("backward: the fast path is autograd calling the op's implementation directly (no entry of its own)")


if __name__ == "__main__":
    main()
