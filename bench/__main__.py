"""``python -m bench``: bn_triton against cuDNN, torch's native kernels and torch.compile.

On a CUDA GPU: suite v1 (or --quick), plain and fused (BN -> add -> ReLU) rows, checked then timed
(wall, host and device time), summary tables, and a verdict line last; results under
bench/results/<gpu-name>-<date>/ (or --out). Without one: a smoke of the same code path on tiny
inputs in Triton's interpreter: correctness and backend detection only, no times.
``--model NAME`` runs the end-to-end training-step benchmark (bench/e2e.py) instead.
"""

import argparse
import datetime
import os
import re
import signal
import sys
import time

from . import start_smoke


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
    p.add_argument("--passes", help=f"comma-separated from {', '.join(suite.PASSES)} (default all)")
    p.add_argument(
        "--impls",
        help=f"comma-separated from {', '.join(impls.IMPLS + impls.EXTRA_IMPLS)} (default: {', '.join(impls.IMPLS)})",
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
        "--no-fused", action="store_true", help="skip the fused BN -> add -> ReLU rows (passes fused_*, 4-D cases)"
    )
    p.add_argument("--model", help="time training steps of this model instead (bench/e2e.py), e.g. resnet50")
    p.add_argument("--warmup-ms", type=int, help="do_bench warm-up (default 25, --quick 10)")
    p.add_argument("--rep-ms", type=int, help="do_bench measuring time per call site (default 100, --quick 40)")
    return p.parse_args(argv)


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9.]+", "-", text).strip("-")


def default_out_dir(name: str) -> str:
    """bench/results/<gpu>-<date>/ in a clone; ./bn_triton-results/<gpu>-<date>/ when the bench runs
    from an installed wheel (as bn_triton.bench: no results folder beside it to write into)."""
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d")
    here = os.path.dirname(os.path.abspath(__file__))
    in_clone = os.path.isfile(os.path.join(here, "..", "pyproject.toml"))
    base = os.path.join(here, "results") if in_clone else os.path.join(os.getcwd(), "bn_triton-results")
    return os.path.join(base, f"{_slug(name)}-{date}")


class Progress:
    """One live line on a terminal; one line per step in a log file."""

    def __init__(self, stream=None):
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self.start = time.monotonic()

    def __call__(self, text: str) -> None:
        line = f"{time.monotonic() - self.start:6.1f}s {text}"
        if self.tty:
            self.stream.write("\r\033[K" + line[:150])
        else:
            self.stream.write(line + "\n")
        self.stream.flush()

    def done(self) -> None:
        if self.tty:
            self.stream.write("\r\033[K")
            self.stream.flush()


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
        known = impls.IMPLS + impls.EXTRA_IMPLS
        impl_names = suite.parse_list(args.impls, known, "implementation") if args.impls else list(impls.IMPLS)
        passes = suite.parse_list(args.passes, suite.PASSES, "pass") if args.passes else list(suite.PASSES)
        default_shapes = suite.QUICK_SHAPES if args.quick else [s.name for s in suite.SUITE_V1]
        shape_tokens = args.shapes.split(",") if args.shapes else default_shapes
        shapes = [suite.parse_shape(t) for t in shape_tokens if t.strip()]
        default_configs = suite.QUICK_CONFIGS if args.quick else suite.DEFAULT_CONFIGS
        configs = (
            suite.parse_list(args.dtypes, suite.CONFIGS, "dtype-layout config") if args.dtypes else default_configs
        )
    except ValueError as exc:
        print(f"python -m bench: {exc}", file=sys.stderr)
        return 2
    if smoke:
        cases = suite.smoke_cases()
        if args.shapes or args.dtypes:
            print("(--shapes/--dtypes are ignored by the smoke: it uses its own tiny cases)")
    else:
        cases = suite.make_cases(shapes, configs)
    workloads = [suite.PLAIN] + ([] if args.no_fused else [suite.FUSED])

    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    settings = runner.Settings(
        device=device,
        timing=not smoke,
        warmup_ms=args.warmup_ms or (10 if args.quick else 25),
        rep_ms=args.rep_ms or (40 if args.quick else 100),
    )
    name = report.device_name(device)
    out = args.out or (None if smoke else default_out_dir(name))

    # `timeout` and schedulers send SIGTERM: stop like Ctrl-C, so the rows measured so far are written.
    def on_term(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)

    per_case = len(passes) * len(impl_names)
    counts = [(w, sum(map(w.applies, cases))) for w in workloads]
    plan = " + ".join(f"{n} {w.prefix.replace('_', ' ')}cases" for w, n in counts)
    print(f"device: {name}; ({plan}) x {len(passes)} passes x {len(impl_names)} implementations", end="")
    print(f" = {sum(n for _, n in counts) * per_case} rows")
    t0 = time.monotonic()
    if settings.timing:
        settings.copy_gbps = runner.measure_copy_gbps(device, warmup_ms=settings.warmup_ms, rep_ms=settings.rep_ms)
        print(f"device-to-device copy bandwidth (1 GiB copy, read + write): {settings.copy_gbps:.0f} GB/s")
    if args.budget_s is not None:
        settings.deadline = t0 + args.budget_s

    rows, progress, interrupted = [], Progress(), False
    try:
        for w in workloads:
            runner.run_suite(cases, impl_names, passes, settings, rows, progress, w)
    except KeyboardInterrupt:
        interrupted = True
    progress.done()
    report.add_speedups(rows)
    elapsed = time.monotonic() - t0

    if smoke:
        text = "## Smoke: checks against float64, backends that ran (no timing)\n\n" + report.check_table(rows)
    else:
        text = (
            f"## bn_triton vs torch batch norm on {name} (suite {suite.SUITE_VERSION}"
            + (", quick" if args.quick else "")
            + f"); copy bandwidth {settings.copy_gbps:.0f} GB/s\n\n"
            + report.detail_table(rows)
            + "\n\n### Geomean speedup of bn_triton (baseline time / bn_triton time; > 1: bn_triton faster)\n\n"
            + report.summary_table(rows)
            + "\n\n### bn_triton's time / torch eager's, geomean over the inputs (< 1: bn_triton takes less):"
            + " wall (do_bench), host (enqueue one call), device (CUDA graph replay)\n\n"
            + report.cost_split_table(rows)
        )
    issues = report.problem_lines(rows)
    if issues:
        text += "\n\n### Problems and notes (each once, with the rows it hit)\n\n" + issues
    if interrupted:
        text += "\n\n(interrupted: partial results)"
    line, code = report.verdict(rows, interrupted)
    text += f"\n\n{len(rows)} rows in {elapsed:.0f} s.\n"

    if out:
        os.makedirs(out, exist_ok=True)
        report.write_csv(rows, os.path.join(out, "results.csv"))
        env = report.collect_env(
            device,
            settings.copy_gbps,
            sys.argv if argv is None else ["python", "-m", "bench"] + list(argv),
            extra=dict(suite=suite.SUITE_VERSION, quick=args.quick, smoke=smoke, elapsed_s=round(elapsed, 1)),
        )
        report.write_env(env, os.path.join(out, "env.json"))
        with open(os.path.join(out, "summary.md"), "w") as f:
            f.write(text + line + "\n")
        try:
            plots = report.write_plots(rows, out, settings.copy_gbps, name)
        except ImportError:
            plots = []
            print("matplotlib is not installed: no plots (pip install matplotlib, or the 'bench' extra)")
        text += f"Wrote {out}: results.csv, env.json, summary.md" + (f", {len(plots)} PNGs" if plots else "") + "\n"

    print()
    print(text + line)
    return code


if __name__ == "__main__":
    sys.exit(main())
