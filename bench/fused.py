"""``fused`` rows: BN -> add residual -> ReLU, bn_triton's fused op against torch's composition.

What is compared (one case = a shape in one dtype and layout, as in suite.py), all with the
runner's forward signature ``fn(x, running_mean, running_var, weight, bias, training) -> y`` so
that runner.run_train / run_eval / pass_callable build the passes exactly as for plain BN:

  bn_triton  bn_triton.batch_norm(..., activation="relu", residual=r): one normalize pass does the
             add and the ReLU; the backward takes its mask from y (kernels/grad.py)
  cudnn      torch eager relu(F.batch_norm(...) + r), cuDNN enabled: three kernels each way
  native     the same with torch.backends.cudnn.enabled = False
  compile    torch.compile (inductor) of that composition: inductor may fuse the add and the ReLU
             into its own BN kernels

The residual ``r`` is a block's identity input: it requires grad (so bn_triton writes d(residual),
as it would in a ResNet) and has x's dtype and layout.

Traffic model (B = bytes of one full tensor; per-channel vectors left out as in traffic.py): the
fewest bytes of the fused op when the tensor does not fit on chip,

  fused_train_fwd  4B   read x (statistics), read x and r, write y
  fused_eval_fwd   3B   read x and r, write y
  fused_bwd        7B   pass 1 reads dy, x, y and writes g = dy * (y > 0), which is d(residual);
                        pass 2 reads g and x and writes dx
  fused_fwd_bwd    11B

For comparison, the unfused composition moves at least 8B forward (BN 3B, add 3B, ReLU 2B) and 8B
backward (ReLU's backward 3B, the add's is free, BN 5B): 16B in all. GB/s below is always the
fused model's bytes / time, for every implementation, so the numbers compare directly.

How the harness (bench/__main__.py) adds the rows: with the same ``Settings`` and the same rows
list as the plain suite,

    from bench import fused
    fused.run_fused_suite(cases, impl_names, passes, settings, rows, progress)

``passes`` are the plain names (train_fwd, eval_fwd, bwd, fwd_bwd); the rows get ``pass`` =
``fused_<name>``, the fused model's ``model_bytes``, and otherwise the runner's columns, so they go
into the same CSV and tables. Standalone: ``python -m bench.fused [--quick] [--shapes ...]``
(on CPU: the interpreter smoke, checks only, no times).
"""

import argparse
import os
import sys
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from bench import impls as impls_mod
from bench import runner, suite, traffic

FUSED_TRAFFIC_FACTOR = {"train_fwd": 4, "eval_fwd": 3, "bwd": 7, "fwd_bwd": 11}
UNFUSED_TRAFFIC_FACTOR = {"train_fwd": 8, "eval_fwd": 7, "bwd": 8, "fwd_bwd": 16}
# ResNet-50's BatchNorm2d shapes (suite v1's N x C x H x W cases): where BN -> add -> ReLU happens.
FUSED_SHAPES = tuple(s.name for s in suite.SUITE_V1 if s.spatial)
QUICK_SHAPES = ("64@56", "256@56", "2048@7")


def model_bytes(pass_name: str, dims, dtype: torch.dtype) -> int:
    """Minimal DRAM bytes of one fused pass (see the module docstring for each factor)."""
    if pass_name not in FUSED_TRAFFIC_FACTOR:
        raise ValueError(f"unknown pass {pass_name!r}; choose from {', '.join(FUSED_TRAFFIC_FACTOR)}")
    return FUSED_TRAFFIC_FACTOR[pass_name] * traffic.tensor_bytes(dims, dtype)


def torch_fused(x, running_mean, running_var, weight, bias, training: bool, residual):
    """The composition torch users write: relu(batch_norm(x) + residual)."""
    y = F.batch_norm(x, running_mean, running_var, weight, bias, training, impls_mod.MOMENTUM, impls_mod.EPS)
    return torch.relu(y + residual)


def triton_fused(x, running_mean, running_var, weight, bias, training: bool, residual):
    import bn_triton  # late: TRITON_INTERPRET must be set first on CPU

    return bn_triton.batch_norm(
        x,
        running_mean,
        running_var,
        weight,
        bias,
        training,
        impls_mod.MOMENTUM,
        impls_mod.EPS,
        activation="relu",
        residual=residual,
    )


def bind(fn: Callable, residual: torch.Tensor) -> Callable:
    """fn with the residual fixed: the runner's six-argument forward signature."""
    return lambda x, rm, rv, w, b, training: fn(x, rm, rv, w, b, training, residual)


def make_fused_impl(name: str, residual: torch.Tensor, compile_backend: str = "inductor") -> impls_mod.Impl:
    """A fresh fused implementation for one case, bound to that case's residual."""
    if name == "bn_triton":
        return impls_mod.Impl(name, bind(triton_fused, residual))
    if name == "cudnn":
        return impls_mod.Impl(name, bind(torch_fused, residual), cudnn=True)
    if name == "native":
        return impls_mod.Impl(name, bind(torch_fused, residual), cudnn=False)
    if name == "compile":
        torch._dynamo.reset()
        compiled = torch.compile(torch_fused, backend=compile_backend)
        return impls_mod.Impl(name, bind(compiled, residual), cudnn=True, compiled=True)
    raise ValueError(f"unknown implementation {name!r}; choose from {', '.join(impls_mod.IMPLS)}")


def make_residual(x: torch.Tensor, seed: int = 1) -> torch.Tensor:
    """Deterministic, never zero, x's dtype and layout, requires grad (a block's identity input)."""
    g = torch.Generator(device=x.device).manual_seed(seed)
    r = torch.randn(x.shape, generator=g, device=x.device, dtype=torch.float32)
    fmt = torch.channels_last if x.dim() == 4 and not x.is_contiguous() else torch.contiguous_format
    return r.to(x.dtype).contiguous(memory_format=fmt).requires_grad_()


def _reference(inp: runner.Inputs, residual: torch.Tensor) -> dict:
    """float64 results of the torch composition: the anchor of every check."""
    ref_inp = runner.Inputs(**{k: getattr(inp, k).double() for k in inp.__dataclass_fields__})
    fn = bind(torch_fused, residual.detach().double())
    return {"train": runner.run_train(fn, ref_inp), "eval": runner.run_eval(fn, ref_inp)}


def _row(case, impl, pass_name, **fields):
    row = runner._row(case, impl, pass_name, **fields)
    row["pass"] = f"fused_{pass_name}"
    row["model_bytes"] = model_bytes(pass_name, case.shape.dims, case.dtype)
    return row


def run_fused_case(case, impl_names, passes, settings: runner.Settings, rows: list, progress: Callable = None) -> None:
    """runner.run_case for the fused op: check every implementation, then (unless smoke) time it."""
    inp = runner.make_inputs(case, settings.device)
    residual = make_residual(inp.x)
    make = lambda name: make_fused_impl(name, residual, settings.compile_backend)
    runner.check_and_time(
        case, inp, _reference(inp, residual), make, impl_names, passes, settings, rows, progress, _row, "fused "
    )


def run_fused_suite(
    cases, impl_names, passes, settings: runner.Settings, rows: list, progress: Callable = None
) -> None:
    """The fused rows for every case (``python -m bench.fused`` picks suite v1's 4-D shapes, where
    conv nets put BN -> add -> ReLU; the fused op runs on BatchNorm1d's (N, C) inputs too)."""
    for i, case in enumerate(cases):
        if settings.deadline is not None and time.monotonic() > settings.deadline:
            rows.extend(
                _row(case, n, p, status="skipped", note="time budget spent") for p in passes for n in impl_names
            )
            continue
        start = len(rows)
        try:
            run_fused_case(
                case,
                impl_names,
                passes,
                settings,
                rows,
                progress and (lambda t, _i=i: progress(f"[{_i + 1}/{len(cases)}] {t}")),
            )
        except Exception as exc:
            del rows[start:]
            rows.extend(_row(case, n, p, status="error", note=runner._short(exc)) for p in passes for n in impl_names)
            if settings.device.type == "cuda":
                torch.cuda.empty_cache()


def summary(rows: list) -> str:
    """A table: per case and pass, bn_triton's ms and GB/s and its speedup over each baseline."""
    by = {}
    for r in rows:
        by.setdefault((r["dtype"], r["layout"], r["shape"], r["pass"]), {})[r["impl"]] = r
    lines = [
        f"{'case':34} {'pass':16} {'ms':>8} {'GB/s':>7} {'%copy':>6}  speedup vs "
        + " ".join(f"{n:>8}" for n in ("cudnn", "native", "compile"))
    ]
    for (dtype, layout, shape, pass_name), impls in by.items():
        ours = impls.get("bn_triton")
        if not ours or ours["ms"] is None:
            status = ours["status"] if ours else "-"
            lines.append(f"{dtype + '/' + layout + ' ' + shape:34} {pass_name:16} {status}")
            continue
        pct = f"{100 * ours['pct_copy_bw']:5.1f}%" if ours["pct_copy_bw"] else "     -"
        sp = []
        for n in ("cudnn", "native", "compile"):
            other = impls.get(n)
            sp.append(f"{other['ms'] / ours['ms']:8.2f}" if other and other["ms"] else f"{'-':>8}")
        case = f"{dtype}/{layout} {shape}"
        lines.append(f"{case:34} {pass_name:16} {ours['ms']:8.3f} {ours['gbps']:7.0f} {pct}  {'':11}" + " ".join(sp))
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.fused", description="BN -> add -> ReLU: bn_triton fused vs torch")
    p.add_argument(
        "--quick", action="store_true", help=f"shapes {','.join(QUICK_SHAPES)}, configs {','.join(suite.QUICK_CONFIGS)}"
    )
    p.add_argument("--shapes", help="comma-separated C@HW or NxCxHxW (default: suite v1's 4-D shapes)")
    p.add_argument("--dtypes", help=f"configs from {', '.join(suite.CONFIGS)}")
    p.add_argument("--passes", help=f"from {', '.join(suite.PASSES)}")
    p.add_argument("--impls", help=f"from {', '.join(impls_mod.IMPLS)}")
    p.add_argument("--csv", help="also write the rows to this CSV file")
    args = p.parse_args(argv)
    gpu = torch.cuda.is_available()
    if not gpu:
        os.environ.setdefault("TRITON_INTERPRET", "1")
        print("No CUDA GPU: timings need one. Running the interpreter smoke (checks only).", file=sys.stderr)
        shapes = [suite.SMOKE_SHAPE_4D, suite.SMOKE_SHAPE_2D]
        configs = ["fp32-nchw", "bf16-cl"]
    else:
        names = args.shapes.split(",") if args.shapes else (QUICK_SHAPES if args.quick else FUSED_SHAPES)
        shapes = [suite.parse_shape(n) for n in names]
        configs = (
            suite.parse_list(args.dtypes, suite.CONFIGS, "config")
            if args.dtypes
            else list(suite.QUICK_CONFIGS if args.quick else suite.DEFAULT_CONFIGS)
        )
    passes = suite.parse_list(args.passes, suite.PASSES, "pass") if args.passes else list(suite.PASSES)
    impl_names = (
        suite.parse_list(args.impls, impls_mod.IMPLS, "implementation") if args.impls else list(impls_mod.IMPLS)
    )
    device = torch.device("cuda" if gpu else "cpu")
    settings = runner.Settings(
        device=device, timing=gpu, warmup_ms=10 if args.quick else 25, rep_ms=40 if args.quick else 100
    )
    if gpu:
        settings.copy_gbps = runner.measure_copy_gbps(device)
        print(f"{torch.cuda.get_device_name(device)}: copy bandwidth {settings.copy_gbps:.0f} GB/s", flush=True)
    rows: list = []
    run_fused_suite(
        suite.make_cases(shapes, configs),
        impl_names,
        passes,
        settings,
        rows,
        lambda t: print(t, file=sys.stderr, flush=True),
    )
    if args.csv:
        import csv

        with open(args.csv, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)
    bad = [r for r in rows if r["status"] in ("wrong", "error")]
    for r in bad:
        print(f"{r['status']}: {r['impl']} {r['pass']} {r['dtype']}/{r['layout']} {r['shape']}: {r['note']}")
    print(summary(rows))
    return 1 if any(r["impl"] == "bn_triton" for r in bad) else 0


if __name__ == "__main__":
    sys.exit(main())
