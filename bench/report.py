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
  mask_flips   fused training rows: elements whose ReLU mask differs from float64's within rounding
               of 0; their gradients are checked against float64 under the implementation's mask
"""

import csv
import json
import math
import os
import platform
import subprocess
from collections import Counter, OrderedDict

CSV_COLUMNS = [
    "impl", "pass", "dtype", "layout", "shape", "dims", "ms", "ms_p20", "ms_p80", "host_ms", "device_ms",
    "gbps", "pct_copy_bw", "device_pct_copy_bw", "speedup", "model_bytes", "peak_mem_mb", "backend",
    "status", "err_ratio", "mask_flips", "note",
]  # fmt: skip
NUMERIC = {
    "ms", "ms_p20", "ms_p80", "host_ms", "device_ms", "gbps", "pct_copy_bw", "device_pct_copy_bw", "speedup",
    "model_bytes", "peak_mem_mb", "err_ratio", "mask_flips",
}  # fmt: skip
BASELINES = ("cudnn", "native", "compile", "bn_triton_split")
OURS = "bn_triton"


def _key(row) -> tuple:
    return (row["dtype"], row["layout"], row["shape"], row["pass"])


def _timed(row) -> bool:
    return row.get("status") == "ok" and row.get("ms") not in (None, "")


def add_speedups(rows: list) -> list:
    """Set ``speedup`` on each timed baseline row: baseline ms / bn_triton ms on the same input."""
    ours = {_key(r): float(r["ms"]) for r in rows if r["impl"] == OURS and _timed(r)}
    for r in rows:
        r["speedup"] = None
        if r["impl"] != OURS and _timed(r) and _key(r) in ours:
            r["speedup"] = float(r["ms"]) / ours[_key(r)]
    return rows


def geomean(values) -> float:
    values = [float(v) for v in values]
    if not values:
        return float("nan")
    return math.exp(sum(math.log(v) for v in values) / len(values))


def _fmt(value, spec: str = ".3g") -> str:
    """A table or CSV cell: blank for None and NaN; spec "r": repr (a float read back exactly)."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    if isinstance(value, float):
        return repr(value) if spec == "r" else format(value, spec)
    return str(value)


def write_csv(rows: list, path: str) -> str:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_COLUMNS, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({c: _fmt(r.get(c), "r") if isinstance(r.get(c), float) else r.get(c) for c in CSV_COLUMNS})
    return path


def read_csv(path: str) -> list:
    """Rows back from a CSV (numbers as floats, blanks as None): for re-plotting old results."""
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    return [{k: (None if v == "" else float(v)) if k in NUMERIC else v for k, v in r.items()} for r in rows]


def markdown_table(headers: list, body: list) -> str:
    cells = [[str(h) for h in headers]] + [[_fmt(c) for c in row] for row in body]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(cells[0], widths, strict=True)) + " |"]
    lines.append("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    lines += ["| " + " | ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) + " |" for row in cells[1:]]
    return "\n".join(lines)


def _groups(rows: list) -> "OrderedDict":
    """(dtype, layout, pass) -> rows, in the order the rows came (suite order)."""
    groups = OrderedDict()
    for r in rows:
        groups.setdefault((r["dtype"], r["layout"], r["pass"]), []).append(r)
    return groups


def summarize(rows: list) -> list:
    """One record per (dtype, layout, pass): geomean speedup of bn_triton over each baseline (over
    the shapes where both were timed), bn_triton's median fraction of copy bandwidth, the shape
    where bn_triton does worst against the fastest baseline."""
    out = []
    for (dtype, layout, pass_name), group in _groups(rows).items():
        ours = [r for r in group if r["impl"] == OURS and _timed(r)]
        rec = OrderedDict(dtype=dtype, layout=layout, pass_=pass_name, shapes=len(ours))
        for b in BASELINES:
            sp = [r["speedup"] for r in group if r["impl"] == b and r.get("speedup") is not None]
            rec[f"vs_{b}"] = geomean(sp) if sp else None
        for col in ("pct_copy_bw", "device_pct_copy_bw"):
            fractions = sorted(v for v in (_num(r, col) for r in ours) if v is not None)
            rec[col] = fractions[len(fractions) // 2] if fractions else None
        worst = None
        for shape in OrderedDict.fromkeys(r["shape"] for r in ours):
            base = [r for r in group if r["shape"] == shape and r["impl"] != OURS and r.get("speedup") is not None]
            if base:
                best = min(base, key=lambda r: r["speedup"])
                if worst is None or best["speedup"] < worst[1]:
                    worst = (shape, best["speedup"], best["impl"])
        rec["worst"] = f"{worst[0]} ({worst[1]:.2f}x vs {worst[2]})" if worst else ""
        out.append(rec)
    return out


def summary_table(rows: list) -> str:
    # The extra baseline (bn_triton_split) gets a column only when it ran.
    baselines = [b for b in BASELINES if b in BASELINES[:3] or any(r["impl"] == b for r in rows)]
    headers = ["dtype", "layout", "pass", "shapes"] + [f"vs {b}" for b in baselines]
    body = []
    for s in summarize(rows):
        pcts = [s[c] for c in ("pct_copy_bw", "device_pct_copy_bw")]
        body.append(
            [s["dtype"], s["layout"], s["pass_"], s["shapes"]]
            + [None if s[f"vs_{b}"] is None else f"{s[f'vs_{b}']:.2f}x" for b in baselines]
            + [None if p is None else f"{100 * p:.0f}%" for p in pcts]
            + [s["worst"]]
        )
    return markdown_table(headers + ["bn_triton % copy BW", "(device time)", "worst shape"], body)


def _torch_row(d: dict):
    """torch eager's row among one input's rows: cuDNN enabled (torch's own choice), else native."""
    return next((d[i] for i in ("cudnn", "native") if i in d and _timed(d[i])), None)


def _num(row, col):
    v = None if row is None else row.get(col)
    return None if v is None or (isinstance(v, float) and math.isnan(v)) else float(v)


def cost_split_table(rows: list) -> str:
    """Per pass: geomean over the inputs of bn_triton's time / torch eager's, for wall, host
    (enqueue) and device (CUDA graph replay) time; < 1: bn_triton takes less."""
    ratios = OrderedDict()  # pass -> column -> [ratio]
    for (_, _, _, pass_name), d in _by_input(rows).items():
        ours, theirs = d.get(OURS), _torch_row(d)
        cols = ratios.setdefault(pass_name, {"ms": [], "host_ms": [], "device_ms": []})
        for col, values in cols.items():
            a, b = _num(ours, col), _num(theirs, col)
            if a and b and _timed(ours):
                values.append(a / b)
    body = [
        [p, len(c["ms"])] + [f"{geomean(v):.2f}x" if v else None for v in c.values()]
        for p, c in ratios.items()
        if c["ms"]
    ]
    return markdown_table(["pass", "inputs", "wall", "host", "device"], body)


def _by_input(rows: list) -> "OrderedDict":
    by = OrderedDict()
    for r in rows:
        by.setdefault(_key(r), {})[r["impl"]] = r
    return by


def detail_table(rows: list) -> str:
    """One line per input and pass: each implementation's wall time (with the backend that ran where
    it is not the implementation's name), then bn_triton's host and device time and bandwidth."""
    by = _by_input(rows)
    impls = [i for i in (OURS,) + BASELINES if any(i in d for d in by.values())]
    headers = ["dtype", "layout", "shape", "pass"] + [f"{i} ms" for i in impls]
    headers += ["bn_triton host ms", "bn_triton device ms", "bn_triton GB/s", "% copy BW", "(device time)"]
    body = []
    for key, d in by.items():
        line = list(key)
        for i in impls:
            r = d.get(i)
            cell = "" if r is None else f"{float(r['ms']):.4f}" if _timed(r) else r.get("status", "")
            ran = r and _timed(r) and r.get("backend")
            line.append(cell + (f" ({ran})" if ran and ran != {"compile": "inductor"}.get(i, i) else ""))
        ours = d.get(OURS) if _timed(d.get(OURS) or {}) else None
        cols = ("host_ms", "device_ms", "gbps", "pct_copy_bw", "device_pct_copy_bw")
        host, dev, gb, pct, dev_pct = (_num(ours, c) for c in cols)
        line += [None if host is None else f"{host:.4f}", None if dev is None else f"{dev:.4f}"]
        line += [None if gb is None else f"{gb:.0f}"]
        line += [None if p is None else f"{100 * p:.0f}%" for p in (pct, dev_pct)]
        body.append(line)
    return markdown_table(headers, body)


def check_table(rows: list) -> str:
    """Smoke output: what was checked, which backend ran, and the verdict."""
    cols = ["impl", "pass", "dtype", "layout", "shape", "backend", "status", "err_ratio", "mask_flips"]
    return markdown_table(cols[:-2] + ["err/allowance", "mask flips"], [[r.get(c) for c in cols] for r in rows])


def problem_lines(rows: list) -> str:
    """Each distinct problem (status and note: a failure, or a timed row's missing device time)
    once, with the rows it hit."""
    groups = OrderedDict()
    for r in rows:
        if r.get("status") in ("wrong", "error", "skipped") or r.get("note"):
            groups.setdefault((r["status"], r.get("note") or ""), []).append(r)
    lines = []
    for (status, note), group in groups.items():
        impls = ", ".join(OrderedDict.fromkeys(r["impl"] for r in group))
        where = list(OrderedDict.fromkeys(f"{r['pass']} {r['dtype']}/{r['layout']} {r['shape']}" for r in group))
        where = "; ".join(where) if len(where) <= 3 else f"{len(where)} inputs and passes"
        lines.append(f"- {status}, {len(group)} row{'s' * (len(group) > 1)} ({impls}; {where}): {note}")
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
    counts = Counter(r["status"] for r in rows)
    statuses = ", ".join(f"{n} {s}" for s, n in counts.most_common())
    return f"verdict: {head}; {len(rows)} rows: {statuses}; exit status {code}", code


# ---------------------------------------------------------------- plots


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only; no display on the GPU machines
    import matplotlib.pyplot as plt

    return plt


def _draw(ax, group: list, copy_gbps, title: str) -> None:
    shapes = list(OrderedDict.fromkeys(r["shape"] for r in group))
    xs = range(len(shapes))
    for impl in (OURS,) + BASELINES:
        pts = {r["shape"]: float(r["gbps"]) for r in group if r["impl"] == impl and _timed(r)}
        if not pts:
            continue
        ys = [pts.get(s, float("nan")) for s in shapes]
        ax.plot(xs, ys, marker="o", linewidth=2.2 if impl == OURS else 1.2, label=impl)
    if copy_gbps:
        ax.axhline(copy_gbps, color="black", linestyle="--", linewidth=1, label=f"D2D copy {copy_gbps:.0f} GB/s")
    ax.set_xticks(list(xs))
    ax.set_xticklabels(shapes, rotation=45, ha="right", fontsize=8)
    ax.set_ylabel("effective GB/s (model bytes / median)")
    ax.set_ylim(bottom=0)
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)


def write_plots(rows: list, out_dir: str, copy_gbps=None, device_name: str = "") -> list:
    """One PNG per (pass, dtype/layout) under out_dir/plots, and overview.png with all of them.

    Returns the paths written (none when nothing was timed)."""
    groups = OrderedDict((k, g) for k, g in _groups(rows).items() if any(_timed(r) for r in g))
    if not groups:
        return []
    plt = _pyplot()
    paths = []
    plot_dir = os.path.join(out_dir, "plots")
    os.makedirs(plot_dir, exist_ok=True)
    for (dtype, layout, pass_name), group in groups.items():
        fig, ax = plt.subplots(figsize=(8, 4.5))
        _draw(ax, group, copy_gbps, f"{pass_name} · {dtype}/{layout} · {device_name}")
        fig.tight_layout()
        path = os.path.join(plot_dir, f"{pass_name}_{dtype}_{layout}.png")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    passes = list(OrderedDict.fromkeys(k[2] for k in groups))
    configs = list(OrderedDict.fromkeys(k[:2] for k in groups))
    fig, axes = plt.subplots(len(passes), len(configs), figsize=(5 * len(configs), 3.8 * len(passes)), squeeze=False)
    for i, p in enumerate(passes):
        for j, (dtype, layout) in enumerate(configs):
            ax = axes[i][j]
            group = groups.get((dtype, layout, p))
            if group is None:
                ax.axis("off")
                continue
            _draw(ax, group, copy_gbps, f"{p} · {dtype}/{layout}")
            if j:
                ax.set_ylabel("")
    fig.suptitle(f"bn_triton vs torch batch norm: effective GB/s · {device_name}")
    fig.tight_layout(rect=(0, 0, 1, 0.97))  # leave the top strip to the suptitle
    path = os.path.join(out_dir, "overview.png")
    fig.savefig(path, dpi=90)
    plt.close(fig)
    paths.append(path)
    return paths


# ---------------------------------------------------------------- environment


def _git_commit() -> str:
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=here, capture_output=True, text=True, timeout=10)
        return out.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "") if out.returncode == 0 else ""
    except (OSError, subprocess.SubprocessError):
        return ""


def _driver_version() -> str:
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=20,
        )
        return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else ""
    except (OSError, subprocess.SubprocessError):
        return ""


def device_name(device) -> str:
    import torch

    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu (Triton interpreter, {platform.processor() or platform.machine()})"


def collect_env(device, copy_gbps=None, argv=None, extra=None) -> dict:
    import numpy
    import torch
    import triton

    env = OrderedDict(
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
        driver=_driver_version() if device.type == "cuda" else None,
        bn_triton_commit=_git_commit(),
        triton_interpret=os.environ.get("TRITON_INTERPRET", ""),
        argv=list(argv) if argv is not None else None,
    )
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env["sm_count"] = props.multi_processor_count
        env["memory_gib"] = round(props.total_memory / 2**30, 1)
        env["capability"] = f"{props.major}.{props.minor}"
    if extra:
        env.update(extra)
    return env


def write_env(env: dict, path: str) -> str:
    with open(path, "w") as f:
        json.dump(env, f, indent=2, default=str)
        f.write("\n")
    return path
