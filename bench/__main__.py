"""``python -m bench``: bn_triton against cuDNN, torch's native kernels and torch.compile.

On a CUDA GPU: suite v1 (or --quick), plain rows and fused ones (BN -> add -> ReLU, BN -> SiLU,
BN -> Hardswish: bench/suite.py WORKLOADS), checked then timed
(wall, host and device time), summary tables, and a verdict line last; results under
bench/results/<gpu-name>-<date>/ (or --out). Without one: a smoke of the same code path on tiny
inputs in Triton's interpreter: correctness and backend detection only, no times.
``--model NAME`` runs the end-to-end training-step benchmark (bench/e2e.py) instead.
"""

import argparse
import os
import re
import sys
import time

from . import sigterm_as_interrupt, start_smoke


def parse_args(argv):
    from . import impls, suite

    p = argparse.ArgumentParser(
        prog="python -m bench", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help=f"subset: shapes {','.join(suite.QUICK_SHAPES)}, configs {','.join(suite.QUICK_CONFIGS)}",
    )
    p.add_argument(
        "--smoke",
        action="store_true",
        help="tiny inputs, correctness and backends only, no timing (the default without a GPU)",
    )
    p.add_argument("--shapes", help="comma-separated: suite names like 64@56 or 8192x1024, C@HW (N=256), or NxC[xHxW]")
    p.add_argument(
        "--dtypes",
        help=f"comma-separated dtype-layout configs from {', '.join(suite.CONFIGS)} "
        f"(default {','.join(suite.DEFAULT_CONFIGS)})",
    )
    p.add_argument(
        "--passes", default=",".join(suite.PASSES), help=f"comma-separated from {', '.join(suite.PASSES)} (default all)"
    )
    p.add_argument(
        "--impls",
        default=",".join(impls.IMPLS),
        help=f"comma-separated from {', '.join(impls.IMPLS + impls.EXTRA_IMPLS)} (default: %(default)s)",
    )
    p.add_argument(
        "--out",
        help="output folder (default on a GPU: bench/results/<gpu-name>-<date>/ in a clone, "
        "./bn_triton-results/<gpu-name>-<date>/ from an installed wheel; none for the smoke)",
    )
    p.add_argument(
        "--budget-s", type=float, help="start no new case after this many seconds; the rest is recorded as skipped"
    )
    p.add_argument(
        "--no-fused",
        action="store_true",
        help="plain batch norm rows only: skip BN -> add -> ReLU, BN -> SiLU and BN -> Hardswish "
        "(passes fused_*, silu_*, hardswish_*; 4-D cases)",
    )
    p.add_argument("--model", help="time training steps of this model instead (bench/e2e.py), e.g. resnet50")
    p.add_argument("--warmup-ms", type=int, help="do_bench warm-up (default 25, --quick 10)")
    p.add_argument("--rep-ms", type=int, help="do_bench measuring time per call site (default 100, --quick 40)")
    return p.parse_args(argv)


def default_out_dir(name: str) -> str:
    """bench/results/<gpu>-<date>/ in a clone; ./bn_triton-results/<gpu>-<date>/ when the bench runs
    from an installed wheel (as bn_triton.bench: no results folder beside it to write into)."""
    here = os.path.dirname(os.path.abspath(__file__))
    in_clone = os.path.isfile(os.path.join(here, "..", "pyproject.toml"))
    base = os.path.join(here, "results") if in_clone else os.path.abspath("bn_triton-results")
    slug = re.sub(r"[^A-Za-z0-9.]+", "-", name).strip("-")
    return os.path.join(base, f"{slug}-{time.strftime('%Y-%m-%d', time.gmtime())}")


def main(argv=None) -> int:
    import torch

    args = parse_args(sys.argv[1:] if argv is None else argv)
    cuda = torch.cuda.is_available()
    smoke = args.smoke or not cuda
    if args.model:
        from . import e2e

        return e2e.main(["--model", args.model] + (["--out", args.out] if args.out else []) + ["--smoke"] * smoke)
    start_smoke(
        cuda,
        smoke,
        (
            "No CUDA GPU: timings need a CUDA GPU. Running the smoke instead: the same checks on tiny inputs",
            "in Triton's interpreter (correctness and backend detection only; no times are reported).",
        ),
        "--smoke: tiny inputs, correctness and backend detection only; no times are reported.",
    )

    from . import impls, report, runner, suite

    try:
        impl_names = suite.parse_list(args.impls, impls.IMPLS + impls.EXTRA_IMPLS, "implementation")
        passes = suite.parse_list(args.passes, suite.PASSES, "pass")
        shapes = args.shapes or ",".join(suite.QUICK_SHAPES if args.quick else [s.name for s in suite.SUITE_V1])
        shapes = [suite.parse_shape(t) for t in shapes.split(",") if t.strip()]
        configs = args.dtypes or ",".join(suite.QUICK_CONFIGS if args.quick else suite.DEFAULT_CONFIGS)
        configs = suite.parse_list(configs, suite.CONFIGS, "dtype-layout config")
    except ValueError as exc:
        print(f"python -m bench: {exc}", file=sys.stderr)
        return 2
    if smoke and (args.shapes or args.dtypes):
        print("(--shapes/--dtypes are ignored by the smoke: it uses its own tiny cases)")
    cases = None if smoke else suite.make_cases(shapes, configs)
    workloads = [suite.PLAIN] if args.no_fused else list(suite.WORKLOADS)
    # (workload, its cases): in the smoke a workload may run on one case only (suite.smoke_cases)
    plan = [(w, suite.smoke_cases(w) if smoke else [c for c in cases if w.applies(c)]) for w in workloads]

    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    settings = runner.Settings(
        device=device,
        timing=not smoke,
        warmup_ms=args.warmup_ms or (10 if args.quick else 25),
        rep_ms=args.rep_ms or (40 if args.quick else 100),
    )
    name = report.device_name(device)
    out = args.out or (None if smoke else default_out_dir(name))

    counts = " + ".join(f"{len(c)} {w.prefix.replace('_', ' ')}case{'s' * (len(c) != 1)}" for w, c in plan)
    print(f"device: {name}; ({counts}) x {len(passes)} passes x {len(impl_names)} implementations", end="")
    print(f" = {sum(len(c) for _, c in plan) * len(passes) * len(impl_names)} rows")
    t0 = time.monotonic()
    if settings.timing:
        settings.copy_gbps = runner.measure_copy_gbps(device, warmup_ms=settings.warmup_ms, rep_ms=settings.rep_ms)
        print(f"device-to-device copy bandwidth (1 GiB copy, read + write): {settings.copy_gbps:.0f} GB/s")
    if args.budget_s is not None:
        settings.deadline = t0 + args.budget_s

    tty = sys.stderr.isatty()

    def progress(text: str) -> None:  # one live line on a terminal; one line per step in a log file
        line = f"{time.monotonic() - t0:6.1f}s {text}"
        sys.stderr.write("\r\033[K" + line[:150] if tty else line + "\n")
        sys.stderr.flush()

    rows, interrupted = [], False
    try:  # `timeout` and schedulers send SIGTERM: stop as on Ctrl-C, and write the rows measured so far
        with sigterm_as_interrupt():
            for w, w_cases in plan:
                runner.run_suite(w_cases, impl_names, passes, settings, rows, progress, w)
    except KeyboardInterrupt:
        interrupted = True
    sys.stderr.write("\r\033[K" if tty else "")  # clear the live line
    report.add_speedups(rows)
    elapsed = time.monotonic() - t0
    title = None
    if not smoke:
        quick = ", quick" if args.quick else ""
        title = f"## bn_triton vs torch batch norm on {name} (suite {suite.SUITE_VERSION}{quick})"
        title += f"; copy bandwidth {settings.copy_gbps:.0f} GB/s"
    text, code = report.summary(rows, title, interrupted, elapsed)

    if out:
        os.makedirs(out, exist_ok=True)
        report.write_csv(rows, os.path.join(out, "results.csv"))
        extra = dict(suite=suite.SUITE_VERSION, quick=args.quick, smoke=smoke, elapsed_s=round(elapsed, 1))
        env = report.collect_env(
            device, settings.copy_gbps, sys.argv if argv is None else ["python", "-m", "bench", *argv], extra
        )
        report.write_env(env, os.path.join(out, "env.json"))
        with open(os.path.join(out, "summary.md"), "w") as f:
            f.write(text)
        try:
            plots = report.write_plots(rows, out, settings.copy_gbps, name)
        except ImportError:
            plots = []
            print("matplotlib is not installed: no plots (pip install matplotlib, or the 'bench' extra)")
        print(f"Wrote {out}: results.csv, env.json, summary.md" + ", overview.png" * bool(plots))
    print()
    print(text, end="")
    return code


if __name__ == "__main__":
    sys.exit(main())
