"""Results out: CSV, console/Markdown tables, PNG plots, environment JSON.

Reading the numbers:
  ms           wall time: median of do_bench's timings (ms_p20/ms_p80: the 20% and 80% quantiles)
  host_ms      host time: enqueueing one call on the CPU (30 back-to-back calls, no sync, / 30)
  device_ms    device time: the same call captured in a CUDA graph and replayed (GPU work alone);
               blank, with the reason in note, where capture failed
  gbps         model bytes (traffic.py) / median time; pct_copy_bw: that as a fraction of the
               device-to-device copy bandwidth measured in the same run. Wall time includes the
               host's: device_pct_copy_bw is the same from device_ms, the kernels' own efficiency
  speedup      on a baseline's row: its median time / bn_triton's, so > 1 means bn_triton is faster
  backend      what actually ran, from the profiler (torch sends some inputs past cuDNN)
  status       ok (timed), checked (smoke: correct, not timed), wrong (failed the check: never
               timed), error (raised), skipped (time budget spent)
  err_ratio    worst output error / allowance (2x torch eager's error + a per-dtype floor); <= 1 passes
  mask_flips   training rows of an activation with kinks (ReLU, Hardswish): elements within rounding
               of a kink whose side differs from float64's (ReLU: its mask); their gradients are
               checked against float64 taking the implementation's sides
"""

import csv
import json
import math
import os
import platform
import subprocess
from collections import Counter
from statistics import geometric_mean

CSV_COLUMNS = [
    "impl", "pass", "dtype", "layout", "shape", "dims", "ms", "ms_p20", "ms_p80", "host_ms", "device_ms",
    "gbps", "pct_copy_bw", "device_pct_copy_bw", "speedup", "model_bytes", "peak_mem_mb", "backend",
    "status", "err_ratio", "mask_flips", "note",
]  # fmt: skip
BASELINES = ("cudnn", "native", "compile", "bn_triton_split")
OURS = "bn_triton"


def _group(rows: list, cols: tuple) -> dict:
    """Rows by their values in cols, in the order the rows came (suite order)."""
    groups = {}
    for r in rows:
        groups.setdefault(tuple(r[c] for c in cols), []).append(r)
    return groups


def _by_input(rows: list) -> dict:
    """(dtype, layout, shape, pass) -> {impl: row}: the rows that compare, one input and pass."""
    return {k: {r["impl"]: r for r in g} for k, g in _group(rows, ("dtype", "layout", "shape", "pass")).items()}


def _timed(row) -> bool:
    return row is not None and row.get("status") == "ok" and row.get("ms") is not None


def _num(row, col):
    """A number of a row, None where the row, or the number, is missing or NaN."""
    v = None if row is None else row.get(col)
    return None if v is None or math.isnan(v) else float(v)


def _fmt(value, spec: str = ".3g") -> str:
    """A table or CSV cell: blank for None and NaN; spec "r": repr (a float read back exactly)."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    if isinstance(value, float):
        return repr(value) if spec == "r" else format(value, spec)
    return str(value)


def add_speedups(rows: list) -> list:
    """Set ``speedup`` on each timed baseline row: baseline ms / bn_triton ms on the same input."""
    for d in _by_input(rows).values():
        ours = d.get(OURS)
        for r in d.values():
            timed = r is not ours and _timed(r) and _timed(ours)
            r["speedup"] = r["ms"] / ours["ms"] if timed else None
    return rows


def write_csv(rows: list, path: str) -> str:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_COLUMNS, extrasaction="ignore")
        w.writeheader()
        w.writerows({c: _fmt(r.get(c), "r") for c in CSV_COLUMNS} for r in rows)
    return path


def markdown_table(headers: list, body: list) -> str:
    cells = [[str(h) for h in headers]] + [[_fmt(c) for c in row] for row in body]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) + " |" for row in cells]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def summary_table(rows: list) -> str:
    """One line per (dtype, layout, pass): geomean speedup of bn_triton over each baseline (over the
    shapes where both were timed), bn_triton's median fraction of copy bandwidth (from wall and from
    device time), the shape where bn_triton does worst against the fastest baseline."""
    # The extra baseline (bn_triton_split) gets a column only when it ran.
    baselines = [b for b in BASELINES if b in BASELINES[:3] or any(r["impl"] == b for r in rows)]
    headers = ["dtype", "layout", "pass", "shapes"] + [f"vs {b}" for b in baselines]
    body = []
    for key, group in _group(rows, ("dtype", "layout", "pass")).items():
        ours = [r for r in group if r["impl"] == OURS and _timed(r)]
        line = [*key, len(ours)]
        for b in baselines:
            sp = [r["speedup"] for r in group if r["impl"] == b and r.get("speedup") is not None]
            line.append(f"{geometric_mean(sp):.2f}x" if sp else None)
        for col in ("pct_copy_bw", "device_pct_copy_bw"):
            fractions = sorted(v for v in (_num(r, col) for r in ours) if v is not None)
            line.append(_fmt(fractions[len(fractions) // 2], ".0%") if fractions else None)
        compared = [r for r in group if r.get("speedup") is not None]
        worst = min(compared, key=lambda r: r["speedup"], default=None)
        line.append(worst and f"{worst['shape']} ({worst['speedup']:.2f}x vs {worst['impl']})")
        body.append(line)
    return markdown_table(headers + ["bn_triton % copy BW", "(device time)", "worst shape"], body)


def cost_split_table(rows: list) -> str:
    """Per pass: geomean over the inputs of bn_triton's time / torch eager's (cuDNN enabled, torch's
    own choice, else native), for wall, host (enqueue) and device (CUDA graph replay) time; < 1:
    bn_triton takes less."""
    ratios = {}  # pass -> column -> [ratio]
    for (*_, pass_name), d in _by_input(rows).items():
        ours, theirs = d.get(OURS), next((d[i] for i in ("cudnn", "native") if _timed(d.get(i))), None)
        if _timed(ours) and theirs:
            for col, values in ratios.setdefault(pass_name, {"ms": [], "host_ms": [], "device_ms": []}).items():
                a, b = _num(ours, col), _num(theirs, col)
                if a and b:
                    values.append(a / b)
    body = [
        [p, len(c["ms"])] + [f"{geometric_mean(v):.2f}x" if v else None for v in c.values()] for p, c in ratios.items()
    ]
    return markdown_table(["pass", "inputs", "wall", "host", "device"], body)


def detail_table(rows: list) -> str:
    """One line per input and pass: each implementation's wall time (with the backend that ran where
    it is not the implementation's name), then bn_triton's host and device time and bandwidth."""
    by = _by_input(rows)
    impls = [i for i in (OURS,) + BASELINES if any(i in d for d in by.values())]
    ours_cols = {"host_ms": ".4f", "device_ms": ".4f", "gbps": ".0f", "pct_copy_bw": ".0%", "device_pct_copy_bw": ".0%"}
    headers = ["dtype", "layout", "shape", "pass"] + [f"{i} ms" for i in impls]
    headers += ["bn_triton host ms", "bn_triton device ms", "bn_triton GB/s", "% copy BW", "(device time)"]
    body = []
    for key, d in by.items():
        line = list(key)
        for i in impls:
            r = d.get(i)
            cell = "" if r is None else f"{r['ms']:.4f}" if _timed(r) else r.get("status", "")
            ran = _timed(r) and r.get("backend")
            line.append(cell + (f" ({ran})" if ran and ran != {"compile": "inductor"}.get(i, i) else ""))
        ours = d.get(OURS) if _timed(d.get(OURS)) else None
        body.append(line + [_fmt(_num(ours, c), spec) for c, spec in ours_cols.items()])
    return markdown_table(headers, body)


def check_table(rows: list) -> str:
    """Smoke output: what was checked, which backend ran, and the verdict."""
    cols = ["impl", "pass", "dtype", "layout", "shape", "backend", "status", "err_ratio", "mask_flips"]
    return markdown_table(cols[:-2] + ["err/allowance", "mask flips"], [[r.get(c) for c in cols] for r in rows])


def problem_lines(rows: list) -> str:
    """Each distinct problem (status and note: a failure, or a timed row's missing device time)
    once, with the rows it hit."""
    problems = [r for r in rows if r.get("status") in ("wrong", "error", "skipped") or r.get("note")]
    lines = []
    for (status, note), group in _group(problems, ("status", "note")).items():
        impls = ", ".join(dict.fromkeys(r["impl"] for r in group))
        where = list(dict.fromkeys(f"{r['pass']} {r['dtype']}/{r['layout']} {r['shape']}" for r in group))
        where = "; ".join(where) if len(where) <= 3 else f"{len(where)} inputs and passes"
        lines.append(f"- {status}, {len(group)} row{'s' * (len(group) > 1)} ({impls}; {where}): {note or ''}")
    return "\n".join(lines)


def verdict(rows: list, interrupted: bool = False) -> tuple:
    """(one line: were all of bn_triton's rows checked, the rows by status, the exit status; that
    status). Exit 1 when a bn_triton row is wrong or raised; a baseline's failure (say, a
    torch.compile error) is listed under the problems but is not ours to fail on. 130: interrupted."""
    ours = [r for r in rows if r["impl"] == OURS]
    bad = sum(r["status"] in ("wrong", "error") for r in ours)
    checked = sum(r["status"] in ("ok", "checked") for r in ours)
    code = 130 if interrupted else 1 if bad else 0
    if bad:
        head = f"FAIL: {bad} of {len(ours)} bn_triton rows wrong or raised"
    elif ours and checked == len(ours):
        head = f"PASS: all {len(ours)} bn_triton rows checked against float64"
    else:
        head = f"INCOMPLETE: {checked} of {len(ours)} bn_triton rows checked"
    statuses = ", ".join(f"{n} {s}" for s, n in Counter(r["status"] for r in rows).most_common())
    return f"verdict: {head}; {len(rows)} rows: {statuses}; exit status {code}", code


def summary(rows: list, title=None, interrupted: bool = False, elapsed_s: float = 0.0) -> tuple:
    """(summary.md, the exit status). Under title, the detail, geomean and cost split tables; without
    one (the smoke), the check table. Then the problems, the row count and time, the verdict last."""
    if title is None:
        parts = ["## Smoke: checks against float64, backends that ran (no timing)", check_table(rows)]
    else:
        parts = [
            title,
            detail_table(rows),
            "### Geomean speedup of bn_triton (baseline time / bn_triton time; > 1: bn_triton faster)",
            summary_table(rows),
            "### bn_triton's time / torch eager's, geomean over the inputs (< 1: bn_triton takes less):"
            " wall (do_bench), host (enqueue one call), device (CUDA graph replay)",
            cost_split_table(rows),
        ]
    problems = problem_lines(rows)
    if problems:
        parts += ["### Problems and notes (each once, with the rows it hit)", problems]
    if interrupted:
        parts.append("(interrupted: partial results)")
    line, code = verdict(rows, interrupted)
    return "\n\n".join(parts) + f"\n\n{len(rows)} rows in {elapsed_s:.0f} s.\n{line}\n", code


# ---------------------------------------------------------------- plots


def write_plots(rows: list, out_dir: str, copy_gbps=None, device_name: str = "") -> list:
    """out_dir/overview.png: one panel per (pass, dtype/layout), passes down, dtype/layouts across;
    GB/s per shape, one line per implementation, the copy bandwidth dashed. Returns the paths
    written (none when nothing was timed)."""
    groups = {k: g for k, g in _group(rows, ("dtype", "layout", "pass")).items() if any(map(_timed, g))}
    if not groups:
        return []
    import matplotlib

    matplotlib.use("Agg")  # files only; no display on the GPU machines
    import matplotlib.pyplot as plt

    passes = list(dict.fromkeys(k[2] for k in groups))
    configs = list(dict.fromkeys(k[:2] for k in groups))
    fig, axes = plt.subplots(len(passes), len(configs), figsize=(5 * len(configs), 3.8 * len(passes)), squeeze=False)
    for (dtype, layout, p), group in groups.items():
        ax = axes[passes.index(p)][configs.index((dtype, layout))]
        shapes = list(dict.fromkeys(r["shape"] for r in group))
        for impl in (OURS,) + BASELINES:
            pts = {r["shape"]: r["gbps"] for r in group if r["impl"] == impl and _timed(r)}
            if pts:
                ys = [pts.get(s, math.nan) for s in shapes]
                ax.plot(ys, marker="o", linewidth=2.2 if impl == OURS else 1.2, label=impl)
        if copy_gbps:
            ax.axhline(copy_gbps, color="black", linestyle="--", linewidth=1, label=f"D2D copy {copy_gbps:.0f} GB/s")
        ax.set_xticks(range(len(shapes)))
        ax.set_xticklabels(shapes, rotation=45, ha="right", fontsize=8)
        ax.set_ylim(bottom=0)
        ax.set_title(f"{p} · {dtype}/{layout}", fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    for row in axes:
        row[0].set_ylabel("effective GB/s (model bytes / median)")
    for ax in axes.flat:
        if not ax.has_data():
            ax.axis("off")  # no such pass for this dtype/layout
    fig.suptitle(f"bn_triton vs torch batch norm: effective GB/s · {device_name}")
    fig.tight_layout(rect=(0, 0, 1, 0.97))  # leave the top strip to the suptitle
    path = os.path.join(out_dir, "overview.png")
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return [path]


# ---------------------------------------------------------------- environment


def _output(*cmd: str, cwd=None) -> str:
    """A command's output, stripped; "" when it is missing or fails."""
    try:
        out = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return ""
    return out.stdout.strip() if out.returncode == 0 else ""


def device_name(device) -> str:
    import torch

    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu (Triton interpreter, {platform.processor() or platform.machine()})"


def collect_env(device, copy_gbps=None, argv=None, extra=None) -> dict:
    import numpy
    import torch
    import triton

    here = os.path.dirname(os.path.abspath(__file__))
    commit = _output("git", "rev-parse", "HEAD", cwd=here)
    if commit and _output("git", "status", "--porcelain", cwd=here):
        commit += "-dirty"
    env = dict(
        device=device_name(device),
        device_type=device.type,
        copy_gbps=copy_gbps,
        torch=torch.__version__,
        triton=triton.__version__,
        numpy=numpy.__version__,
        python=platform.python_version(),
        platform=platform.platform(),
        cuda_runtime=torch.version.cuda,
        cudnn=torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        driver=None,
        bn_triton_commit=commit,
        triton_interpret=os.environ.get("TRITON_INTERPRET", ""),
        argv=list(argv) if argv is not None else None,
    )
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update(
            driver=_output("nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader").split("\n")[0],
            sm_count=props.multi_processor_count,
            memory_gib=round(props.total_memory / 2**30, 1),
            capability=f"{props.major}.{props.minor}",
        )
    env.update(extra or {})
    return env


def write_env(env: dict, path: str) -> str:
    with open(path, "w") as f:
        json.dump(env, f, indent=2, default=str)
        f.write("\n")
    return path
