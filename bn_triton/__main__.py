"""``python -m bn_triton``: a self-check for a new machine.

Runs our kernels against torch's batch_norm and the float64 reference on a few shapes, layouts and
dtypes (forward and backward, training mode) on the available device — the GPU, or Triton's
interpreter on CPU — and prints the max errors. On a GPU it also times a training forward+backward
against torch's batch_norm. Exits non-zero if any error is over its tolerance. The inputs come from
a fixed seed, so the errors printed are the same from run to run on the same machine and versions.
"""

import argparse
import os
import sys

SEED = 0

DESCRIPTION = """Self-check of bn_triton on this machine. Runs bn_triton's Triton kernels (training forward and
backward) on 5 layouts (BatchNorm1d/2d/3d, NCHW and channels_last) x 3 dtypes (float32, float16,
bfloat16), and prints the max |error| of y and dx against torch's batch_norm and against the
float64 NumPy reference (bn_triton.reference). On a CUDA GPU the kernels run compiled and a short
timing against torch's batch_norm follows; without one they run in Triton's interpreter
(TRITON_INTERPRET=1 is set, and the check re-runs itself). Inputs are seeded (seed 0)."""

EPILOG = "Exit status: 0 when every error is within its tolerance, 1 otherwise."


def parse_args(argv):
    parser = argparse.ArgumentParser(
        prog="python -m bn_triton",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    return parser.parse_args(argv)


def _ensure_backend() -> None:
    """Without a GPU, re-run under Triton's interpreter: it must be on before the kernels are imported."""
    import torch

    if torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        return
    os.environ["TRITON_INTERPRET"] = "1"
    os.execv(sys.executable, [sys.executable, "-m", "bn_triton", *sys.argv[1:]])


CASES = [
    # (label, shape, memory format)
    ("BatchNorm1d (N, C)", (64, 48), None),
    ("BatchNorm1d (N, C, L)", (8, 16, 33), None),
    ("BatchNorm2d NCHW", (4, 16, 14, 14), None),
    ("BatchNorm2d channels_last", (4, 16, 14, 14), "channels_last"),
    ("BatchNorm3d channels_last_3d", (2, 8, 4, 6, 6), "channels_last_3d"),
]
TOLERANCE = {"torch.float32": 1e-4, "torch.float16": 1e-2, "torch.bfloat16": 6e-2}


def _check(shape, fmt, dtype, device):
    import torch
    import torch.nn.functional as F

    import bn_triton
    from bn_triton import reference

    x = (torch.randn(shape, dtype=torch.float64) * 2 + 0.5).to(device=device, dtype=dtype)
    if fmt:
        x = x.contiguous(memory_format=getattr(torch, fmt))
    w = (torch.rand(shape[1]) + 0.5).to(device)
    b = torch.randn(shape[1]).to(device)
    dy = torch.randn(shape, dtype=torch.float64).to(device=device, dtype=dtype)
    xa = x.clone().requires_grad_()
    ya = bn_triton.batch_norm(xa, None, None, w, b, training=True)
    ya.backward(dy)
    xt = x.float().clone().requires_grad_()
    yt = F.batch_norm(xt, None, None, w, b, training=True)
    yt.backward(dy.float())
    x64, dy64 = x.double().cpu().numpy(), dy.double().cpu().numpy()
    y_ref, _, _ = reference.forward(x64, w.double().cpu().numpy(), b.double().cpu().numpy())
    dx_ref, _, _ = reference.backward(dy64, x64, w.double().cpu().numpy())
    err = lambda a, ref: float((a.detach().double().cpu() - torch.as_tensor(ref)).abs().max())
    return {
        "y vs torch": err(ya, yt.detach().double().cpu().numpy()),
        "y vs ref": err(ya, y_ref),
        "dx vs torch": err(xa.grad, xt.grad.double().cpu().numpy()),
        "dx vs ref": err(xa.grad, dx_ref),
    }


def _timing(device):
    import torch
    import torch.nn.functional as F
    import triton.testing

    import bn_triton

    print("\nTraining forward + backward, median ms (triton.testing.do_bench) on", torch.cuda.get_device_name(device))
    print(f"{'shape':<28}{'dtype':<16}{'bn_triton':>10}{'torch':>10}{'speedup':>9}")
    for shape, dtype, fmt in [
        ((256, 64, 56, 56), torch.float32, torch.contiguous_format),
        ((256, 256, 28, 28), torch.bfloat16, torch.channels_last),
        ((8192, 1024), torch.float16, torch.contiguous_format),
    ]:
        x = torch.randn(shape, device=device, dtype=dtype).contiguous(memory_format=fmt).requires_grad_()
        w = torch.ones(shape[1], device=device, requires_grad=True)
        b = torch.zeros(shape[1], device=device, requires_grad=True)
        dy = torch.randn_like(x)
        times = []
        for fn in (bn_triton.batch_norm, F.batch_norm):
            step = lambda fn=fn, x=x, w=w, b=b, dy=dy: fn(x, None, None, w, b, True).backward(dy)
            times.append(triton.testing.do_bench(step))
        print(f"{str(tuple(shape)):<28}{str(dtype):<16}{times[0]:>10.3f}{times[1]:>10.3f}{times[1] / times[0]:>8.2f}x")


def main(argv=None) -> int:
    parse_args(sys.argv[1:] if argv is None else argv)  # --help and bad flags: answer before any check runs
    _ensure_backend()
    import torch
    import triton

    import bn_triton

    torch.manual_seed(SEED)  # every input below is drawn on the CPU, then moved: the same on any device
    device = "cuda" if torch.cuda.is_available() else "cpu"
    where = torch.cuda.get_device_name() if device == "cuda" else "CPU, Triton interpreter (TRITON_INTERPRET=1)"
    print(
        f"bn_triton {bn_triton.__version__} self-check on {where}; "
        f"torch {torch.__version__}, triton {triton.__version__}"
    )
    print("Training mode, max |error| of y and dx against torch's batch_norm and the float64 reference\n")
    cols = ["y vs torch", "y vs ref", "dx vs torch", "dx vs ref"]
    print(f"{'case':<32}{'dtype':<16}" + "".join(f"{c:>13}" for c in cols) + "  ok")
    failures = 0
    for label, shape, fmt in CASES:
        for dtype in (torch.float32, torch.float16, torch.bfloat16):
            errs = _check(shape, fmt, dtype, device)
            ok = max(errs["y vs ref"], errs["dx vs ref"]) <= TOLERANCE[str(dtype)]
            failures += not ok
            print(
                f"{label:<32}{str(dtype):<16}"
                + "".join(f"{errs[c]:>13.2e}" for c in cols)
                + ("  ok" if ok else "  FAIL")
            )
    if device == "cuda":
        _timing(device)
    print(f"\n{'all checks passed' if not failures else f'{failures} check(s) over tolerance'}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
