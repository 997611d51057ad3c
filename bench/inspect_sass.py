"""Compile bn_triton's kernels for Hopper (sm_90) on a machine without a GPU and inspect the SASS.

For every shape of suite v1 this drives the real launchers in ``bn_triton.launch`` (training forward,
backward, running-stat update and eval forward) on meta tensors, records each kernel launch (grid,
arguments, constexprs, num_warps) instead of running it, and compiles exactly that specialization
the way ``JITFunction.run`` would on an H100 (same binder, so the same ``tt.divisibility`` hints),
with ``target=GPUTarget("cuda", 90, 32)``. Then, per launch:

* vectorization: the widths of the global loads/stores in the SASS (``cuobjdump -sass``), and
  whether 16-byte accesses (``LDG.E.128`` / ``STG.E.128``) carry all of the big tensors' bytes;
* registers and spills (``ptxas -v`` on the PTX; also ``cuobjdump -res-usage`` on the cubin);
* the grid against the SM count (132 on the H100 SXM) and the resident programs per SM that the
  register and shared-memory use allow: waves and the utilization of the last wave;
* the bytes the kernel moves and the time that traffic takes at a copy bandwidth (3.0 TB/s is the
  device-to-device copy measured on the H100 in shared/docs/platform-notes.md). That time is a
  prediction (a floor), never a measurement.

``launch_config`` is called with a CUDA device (``torch.device("cuda", 0)``) and a patched
``sm_count`` (default 132): no GPU, no CUDA driver needed. Run it without the Triton interpreter
(TRITON_INTERPRET unset or 0): the kernels must be ``JITFunction``s to be compiled.

    python -m bench.inspect_sass                       # all of suite v1: the checks' verdicts
    python -m bench.inspect_sass --markdown            # the tables of bench/NOTES.md
    python -m bench.inspect_sass --shapes 256@14 --dtypes fp32-nchw --json out.json --keep /tmp/sass

Shapes, dtype/layout configurations and the byte model come from bench/suite.py and
bench/traffic.py, so the labels match the benchmark's. Exit status: 0 when every check passes,
1 when one fails (listed last), 2 when it cannot run (interpreter on, tools missing).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import re
import subprocess
import sys
import tempfile
import types
from pathlib import Path

import torch

# The copy bandwidth the predictions divide by, and the H100 SXM's per-SM limits (CUDA occupancy
# calculator numbers for compute capability 9.0).
COPY_BW_TBS = 3.0
H100_SMS = 132
REGS_PER_SM = 65536
MAX_WARPS_PER_SM = 64
MAX_BLOCKS_PER_SM = 32
SMEM_PER_SM = 228 * 1024
L2_BYTES = 50 * 1024 * 1024

# Per kernel: how many big tensors (shaped like x) it loads and stores; the per-channel vectors and
# partials are small. Kernels not listed get widths reported but no 16-byte verdict.
BIG_IO = {
    "stats_partials_kernel": (1, 0),
    "normalize_kernel": (1, 1),
    "grad_partials_kernel": (2, 0),
    "grad_input_kernel": (2, 1),
}
# Kernels whose grid is (channel blocks, splits): the reductions that must fill the SMs.
REDUCTIONS = ("stats_partials_kernel", "grad_partials_kernel")

BIN = None  # set by _tools()


def _tools() -> Path | None:
    """triton/backends/nvidia/bin, if it holds ptxas and cuobjdump."""
    import triton

    d = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
    return d if (d / "ptxas").exists() and (d / "cuobjdump").exists() else None


def suite_cases(config_keys, shape_names=None) -> list:
    """Suite v1 crossed with dtype/layout configurations (bench.suite's rules), optionally filtered."""
    from bench import suite

    shapes = [suite.parse_shape(n) for n in shape_names] if shape_names else suite.SUITE_V1
    return suite.make_cases(shapes, config_keys)


def meta_input(case) -> torch.Tensor:
    """The case's input as a meta tensor (no memory) in its layout."""
    x = torch.empty(case.shape.dims, dtype=case.dtype, device="meta")
    if case.layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    return x


# ------------------------------------------------------------------------------------- recording
@dataclasses.dataclass
class Launch:
    name: str
    fn: object  # the JITFunction
    grid: tuple
    args: tuple
    kwargs: dict


class _Recorder:
    """Stands in for a kernel in ``bn_triton.launch.kernels``: ``k[grid](...)`` records, runs nothing."""

    def __init__(self, name, fn, log):
        self.name, self.fn, self.log = name, fn, log

    def __getitem__(self, grid):
        def record(*args, **kwargs):
            self.log.append(Launch(self.name, self.fn, tuple(grid), args, kwargs))

        return record


def record_launches(case, sms: int, programs_per_sm: int | None = None) -> tuple[list[Launch], object]:
    """Run a training forward + backward, a running-stat update and an eval forward through the
    launchers, recording the launches. Returns them and the LaunchConfig the launchers used."""
    from triton.runtime.jit import JITFunction

    from bn_triton import _config, kernels, launch

    log: list[Launch] = []
    fake = types.SimpleNamespace()
    for name in dir(kernels):
        obj = getattr(kernels, name)
        if isinstance(obj, JITFunction):
            setattr(fake, name, _Recorder(name, obj, log))
    cuda = torch.device("cuda", 0)
    cfgs = []

    def cfg_on_cuda(geom, device):  # what an H100 would get: device type cuda, `sms` SMs
        cfg = _config.launch_config(geom, cuda)
        cfgs.append(cfg)
        return cfg

    saved = (launch.kernels, launch.launch_config, _config.sm_count, _config.PROGRAMS_PER_SM)
    launch.kernels, launch.launch_config = fake, cfg_on_cuda
    _config.sm_count = lambda index: sms
    if programs_per_sm is not None:  # what-if for the split target, without editing _config.py
        _config.PROGRAMS_PER_SM = programs_per_sm
    try:
        x = meta_input(case)
        C = x.shape[1]
        # Parameters in the input's dtype, as after `BatchNorm2d(C).to(dtype)`.
        w, b, rm, rv = (torch.empty(C, dtype=x.dtype, device="meta") for _ in range(4))
        x_, geom = launch.canonical(x)
        mean, rstd, var = launch.batch_stats(x_, geom, 1e-5)
        launch.normalize(x_, geom, mean, rstd, False, 1e-5, w, b)
        launch.update_running_stats(rm, rv, mean, var, 0.1, geom.per_channel, None)
        dy = torch.empty_like(x_)
        dw, db = (torch.empty(C, dtype=x.dtype, device="meta") for _ in range(2))
        s_dy, s_dyx = launch.grad_sums(dy, x_, geom, mean, rstd, False, 1e-5, dw, db)
        launch.grad_input(dy, x_, geom, mean, rstd, w, s_dy, s_dyx)
        launch.normalize(x_, geom, rm, rv, True, 1e-5, w, b)  # eval forward
    finally:
        launch.kernels, launch.launch_config, _config.sm_count, _config.PROGRAMS_PER_SM = saved
    assert all(c == cfgs[0] for c in cfgs), "launchers disagree on the launch config"
    return log, cfgs[0]


# ------------------------------------------------------------------------------------- compiling
_COMPILED: dict = {}


def compile_launch(ln: Launch, workdir: Path) -> dict:
    """Compile one recorded launch for sm_90 exactly as JITFunction.run would; inspect the binary."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature

    target = GPUTarget("cuda", 90, 32)
    backend = make_backend(target)
    fn = ln.fn
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound, spec, opts = binder(*ln.args, **ln.kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, ln.kwargs, bound, spec, opts)
    key = (
        ln.name,
        repr(signature),
        repr(sorted(constexprs.items())),
        repr(sorted(attrs.items())),
        repr(sorted(options.__dict__.items())),
    )
    if key in _COMPILED:
        return _COMPILED[key]
    k = triton.compile(ASTSource(fn, signature, constexprs, attrs), target=target, options=options.__dict__)
    stem = workdir / f"{ln.name}_{len(_COMPILED)}"
    stem.with_suffix(".ptx").write_text(k.asm["ptx"])
    stem.with_suffix(".cubin").write_bytes(k.asm["cubin"])
    info = inspect_binary(stem, ln.name)
    info["num_warps"] = k.metadata.num_warps
    info["shared"] = max(info["shared"], k.metadata.shared)
    info["files"] = str(stem)
    _COMPILED[key] = info
    return info


_ACCESS = re.compile(r"\b(LDG|STG|LDGSTS)((?:\.[A-Z0-9_]+)*)\s")


def _width_bits(mods: str) -> int:
    for bits in ("128", "64"):
        if f".{bits}" in mods:
            return int(bits)
    for narrow, bits in ((".U8", 8), (".S8", 8), (".U16", 16), (".S16", 16)):
        if narrow in mods:
            return bits
    return 32


_PTXAS_EXTRA: list | None = None  # Triton's extra ptxas flags that this ptxas accepts (probed once)


def _ptxas_v(ptx: Path) -> str:
    """ptxas -v with the flags Triton's make_cubin passes for sm_90 (Hopper compiles as sm_90a); older
    ptxas builds lack --regAllocOptLevel, so the first call probes for it."""
    global _PTXAS_EXTRA
    for extra in [_PTXAS_EXTRA] if _PTXAS_EXTRA is not None else (["--regAllocOptLevel=2"], []):
        cmd = [str(BIN / "ptxas"), "-lineinfo", "-v", *extra, "--gpu-name=sm_90a", str(ptx), "-o", os.devnull]
        pv = subprocess.run(cmd, capture_output=True, text=True)
        if pv.returncode == 0:
            _PTXAS_EXTRA = extra
            return pv.stdout + pv.stderr
    raise RuntimeError(f"ptxas failed on {ptx}:\n{pv.stdout}{pv.stderr}")


def inspect_binary(stem: Path, name: str) -> dict:
    # One cuobjdump call: resource usage of the binary Triton built, then its SASS.
    cubin = str(stem.with_suffix(".cubin"))
    sass = subprocess.run(
        [str(BIN / "cuobjdump"), "-res-usage", "-sass", cubin], capture_output=True, text=True, check=True
    ).stdout
    stem.with_suffix(".sass").write_text(sass)
    loads: dict[int, int] = {}
    stores: dict[int, int] = {}
    for m in _ACCESS.finditer(sass):
        op, mods = m.group(1), m.group(2)
        hist = stores if op == "STG" else loads
        bits = _width_bits(mods)
        hist[bits] = hist.get(bits, 0) + 1
    log = _ptxas_v(stem.with_suffix(".ptx"))
    regs = int(re.search(r"Used (\d+) registers", log).group(1))
    spill_st = int(re.search(r"(\d+) bytes spill stores", log).group(1))
    spill_ld = int(re.search(r"(\d+) bytes spill loads", log).group(1))
    stack = int(re.search(r"(\d+) bytes stack frame", log).group(1))
    m = re.search(r"REG:(\d+).*?SHARED:(\d+).*?LOCAL:(\d+)", sass)
    cubin_regs, shared, local = (int(g) for g in m.groups()) if m else (regs, 0, 0)
    return dict(
        regs=max(regs, cubin_regs),
        spill_stores=spill_st,
        spill_loads=spill_ld,
        stack=stack,
        local=local,
        shared=shared,
        loads=loads,
        stores=stores,
    )


def resident_programs(regs: int, num_warps: int, shared: int) -> int:
    """Programs of one kernel resident on one SM, limited by registers, warps, blocks and shared memory."""
    regs_per_warp = math.ceil(max(regs, 1) * 32 / 256) * 256  # allocated per warp in 256-register units
    by_regs = (REGS_PER_SM // regs_per_warp) // num_warps
    by_warps = MAX_WARPS_PER_SM // num_warps
    by_smem = SMEM_PER_SM // shared if shared else MAX_BLOCKS_PER_SM
    return max(0, min(by_regs, by_warps, by_smem, MAX_BLOCKS_PER_SM))


# ------------------------------------------------------------------------------------- analysis
def analyse(case, ln: Launch, cfg, info: dict, sms: int) -> dict:
    """Checks and the bandwidth prediction for one launch."""
    from bench.traffic import tensor_bytes

    elem = torch.empty((), dtype=case.dtype).element_size()
    big = tensor_bytes(case.shape.dims, case.dtype)
    programs = math.prod(ln.grid)
    occ = resident_programs(info["regs"], info["num_warps"], info["shared"])
    slots = sms * occ
    waves = programs / slots if slots else float("inf")
    # Programs in the last wave as a fraction of the slots: 1.0 means full, 0.25 one in four slots used.
    last_fill = (programs - (math.ceil(waves) - 1) * slots) / slots if slots else 0.0
    row = dict(
        case=case.shape.name,
        dtype=case.dtype_name,
        layout=case.layout,
        kernel=ln.name,
        grid=list(ln.grid),
        programs=programs,
        num_warps=info["num_warps"],
        block=[cfg.block_r, cfg.block_c, cfg.block_s],
        regs=info["regs"],
        spills=info["spill_stores"] + info["spill_loads"] + info["local"],
        resident_per_sm=occ,
        waves=round(waves, 2),
        last_wave_fill=round(last_fill, 3),
        loads=info["loads"],
        stores=info["stores"],
        files=info["files"],
    )
    if ln.name in REDUCTIONS:
        row["fills_sms"] = programs >= sms
    io = BIG_IO.get(ln.name)
    if io is not None:
        n_ld, n_st = io
        threads = info["num_warps"] * 32
        per_thread = cfg.block_r * cfg.block_c * cfg.block_s * elem // threads  # bytes per big tensor
        ld16 = info["loads"].get(128, 0) * 16
        st16 = info["stores"].get(128, 0) * 16
        row["ldg128_covers_big"] = ld16 >= n_ld * per_thread
        row["stg128_covers_big"] = st16 >= n_st * per_thread if n_st else None
        # Lanes of the launched tiles that hold data (the rest are masked off).
        lanes = cfg.num_tiles * cfg.num_c_blocks * cfg.block_r * cfg.block_c * cfg.block_s
        row["lane_util"] = round(math.prod(case.shape.dims) / lanes, 3)
        moved = (n_ld + n_st) * big
    else:
        moved = None
    if ln.name in REDUCTIONS:
        n_parts = 3 if ln.name == "stats_partials_kernel" else 2
        moved += n_parts * cfg.num_splits * case.shape.dims[1] * 4  # fp32 partials written
    row["bytes"] = moved
    row["pred_us"] = round(moved / (COPY_BW_TBS * 1e12) * 1e6, 1) if moved else None
    row["fits_l2"] = big <= L2_BYTES
    return row


PASS_OF = {
    "stats_partials_kernel": "train_fwd",
    "stats_finalize_kernel": "train_fwd",
    "running_stats_kernel": "train_fwd",
    "grad_partials_kernel": "bwd",
    "grad_finalize_kernel": "bwd",
    "grad_input_kernel": "bwd",
}


def run(cases: list, sms: int, workdir: Path, verbose=False, big_only=False, programs_per_sm=None) -> list[dict]:
    rows = []
    for case in cases:
        log, cfg = record_launches(case, sms, programs_per_sm)
        seen = set()
        for ln in log:
            tag = (ln.name, ln.kwargs.get("SCALE_IS_VAR"), ln.kwargs.get("TRAINING"))
            if tag in seen or (big_only and ln.name not in BIG_IO):
                continue
            seen.add(tag)
            info = compile_launch(ln, workdir)
            row = analyse(case, ln, cfg, info, sms)
            if ln.name == "normalize_kernel":
                row["pass"] = "eval_fwd" if ln.kwargs.get("SCALE_IS_VAR") else "train_fwd"
            else:
                row["pass"] = PASS_OF.get(ln.name, "other")
            rows.append(row)
            if verbose:
                print(f"  {case.label} {ln.name}: regs {row['regs']} loads {row['loads']}", file=sys.stderr)
    return rows


def _where(r: dict) -> str:
    return f"{r['kernel']} {r['case']} {r['dtype']}/{r['layout']}"


def problems(rows: list[dict]) -> list[str]:
    """Each failed check as one line: big-tensor loads not 16-byte, spills, a reduction grid under the SM count."""
    out = []
    for r in rows:
        if r["spills"]:
            out.append(f"{_where(r)}: spills ({r['spills']} bytes spill stores + loads + local)")
        if r.get("ldg128_covers_big") is False:
            out.append(
                f"{_where(r)}: big-tensor loads not all 16-byte (global loads by width: {_fmt_widths(r['loads'])})"
            )
        if r.get("fills_sms") is False:
            out.append(f"{_where(r)}: reduction grid of {r['programs']} programs leaves SMs idle")
    return out


def warnings(rows: list[dict]) -> list[str]:
    """Reduction grids a little over one wave of resident programs: the last wave runs mostly empty."""
    return [
        f"{_where(r)}: {r['programs']} programs = {r['waves']} waves of {r['resident_per_sm']}/SM "
        f"({r['regs']} registers): the last wave fills {r['last_wave_fill']:.0%} of the slots"
        for r in rows
        if r["kernel"] in REDUCTIONS and 1.0 < r["waves"] < 2.0
    ]


def _fmt_widths(h: dict) -> str:
    return " ".join(f"{n}x{b}b" for b, n in sorted(h.items(), key=lambda kv: -int(kv[0]))) or "-"


SHORT = {
    "stats_partials_kernel": "stats_partials",
    "stats_finalize_kernel": "stats_finalize",
    "normalize_kernel": "normalize",
    "running_stats_kernel": "running_stats",
    "grad_partials_kernel": "grad_partials",
    "grad_finalize_kernel": "grad_finalize",
    "grad_input_kernel": "grad_input",
}


def _table(head: list[str], body: list[list]) -> str:
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in body]
    return "\n".join(lines)


def full_table(rows: list[dict]) -> str:
    """One line per launch: every number the checks use."""
    head = [
        "shape",
        "dtype/layout",
        "kernel",
        "block [R,C,S]",
        "warps",
        "grid",
        "regs",
        "spill B",
        "res/SM",
        "waves (last-wave fill)",
        "lane util",
        "LDG widths",
        "STG widths",
        "16-B big loads",
        "MB moved",
        f"pred. µs @{COPY_BW_TBS} TB/s",
    ]
    body = []
    for r in rows:
        k = SHORT.get(r["kernel"], r["kernel"])
        if r["kernel"] == "normalize_kernel":
            k += " (eval)" if r["pass"] == "eval_fwd" else " (train)"
        ok16 = {True: "yes", False: "**no**", None: "-"}[r.get("ldg128_covers_big")]
        body.append(
            [
                r["case"],
                f"{r['dtype']}/{r['layout']}",
                k,
                r["block"],
                r["num_warps"],
                "x".join(str(g) for g in r["grid"]),
                r["regs"],
                r["spills"],
                r["resident_per_sm"],
                f"{r['waves']} ({r['last_wave_fill']})",
                r.get("lane_util", "-"),
                _fmt_widths(r["loads"]),
                _fmt_widths(r["stores"]),
                ok16,
                f"{r['bytes'] / 1e6:.1f}" if r["bytes"] else "-",
                r["pred_us"] if r["pred_us"] else "-",
            ]
        )
    return _table(head, body)


def summary_table(rows: list[dict]) -> str:
    """One line per case: the launch config, the checks, and predicted times of the four big kernels."""
    head = [
        "shape",
        "dtype/layout",
        "MB (fits L2)",
        "block [R,C,S] x warps",
        "lane util",
        "reduction grid: stats / grad (waves)",
        "16-B loads",
        "max regs",
        "spill B",
        "pred. µs stats / norm / gsum / dx",
        "pred. fwd µs (3B)",
        "pred. bwd µs (5B)",
    ]
    by_case: dict = {}
    for r in rows:
        by_case.setdefault((r["case"], r["dtype"], r["layout"]), {})[(r["kernel"], r["pass"])] = r
    body = []
    for (case, dt, lay), ks in by_case.items():
        st, no = ks[("stats_partials_kernel", "train_fwd")], ks[("normalize_kernel", "train_fwd")]
        gs, gi = ks[("grad_partials_kernel", "bwd")], ks[("grad_input_kernel", "bwd")]
        big4 = (st, no, gs, gi)
        tensor_mb = no["bytes"] / 2 / 1e6  # normalize reads x and writes y
        ok16 = "yes" if all(r["ldg128_covers_big"] for r in big4) else "**no**"
        fwd = sum(r["pred_us"] or 0 for r in ks.values() if r["pass"] == "train_fwd")
        bwd = sum(r["pred_us"] or 0 for r in ks.values() if r["pass"] == "bwd")
        body.append(
            [
                case,
                f"{dt}/{lay}",
                f"{tensor_mb:.1f} ({'yes' if no['fits_l2'] else 'no'})",
                f"{no['block']} x {no['num_warps']}",
                no["lane_util"],
                f"{'x'.join(map(str, st['grid']))} ({st['waves']}) / {'x'.join(map(str, gs['grid']))} ({gs['waves']})",
                ok16,
                max(r["regs"] for r in ks.values()),
                sum(r["spills"] for r in ks.values()),
                " / ".join(str(r["pred_us"]) for r in big4),
                f"{fwd:.1f}",
                f"{bwd:.1f}",
            ]
        )
    return _table(head, body)


def main(argv=None) -> int:
    global BIN
    from bench import suite

    p = argparse.ArgumentParser(prog="python -m bench.inspect_sass", description=__doc__.splitlines()[0])
    p.add_argument(
        "--shapes", help="comma-separated suite names (64@56, 8192x1024) or C@HW / NxC[xHxW]; default: suite v1"
    )
    p.add_argument(
        "--dtypes",
        default=",".join(suite.DEFAULT_CONFIGS),
        help=f"comma-separated configs from {', '.join(suite.CONFIGS)} (default %(default)s)",
    )
    p.add_argument("--sms", type=int, default=H100_SMS, help="SM count given to launch_config (H100 SXM: %(default)s)")
    p.add_argument("--keep", help="folder for the PTX, cubin and SASS of each binary (default: a temporary one)")
    p.add_argument("--json", help="write the per-launch rows here")
    p.add_argument("--markdown", action="store_true", help="print the per-case summary table as markdown")
    p.add_argument("--full", action="store_true", help="with --markdown: also one line per launch")
    p.add_argument("--programs-per-sm", type=int, help="what-if: override _config.PROGRAMS_PER_SM for this run")
    p.add_argument("--big-only", action="store_true", help="only the kernels that stream the big tensors (faster)")
    p.add_argument("-v", "--verbose", action="store_true")
    a = p.parse_args(argv)

    from bn_triton._config import interpreting

    if interpreting():
        print(
            "inspect_sass: the Triton interpreter is on (TRITON_INTERPRET=1): run with TRITON_INTERPRET unset or 0",
            file=sys.stderr,
        )
        return 2
    BIN = _tools()
    if BIN is None:
        print("inspect_sass: ptxas/cuobjdump not found under triton/backends/nvidia/bin", file=sys.stderr)
        return 2
    configs = suite.parse_list(a.dtypes, suite.CONFIGS, "config")
    names = [n.strip() for n in a.shapes.split(",") if n.strip()] if a.shapes else None
    cases = suite_cases(configs, names)
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(a.keep) if a.keep else Path(tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        rows = run(cases, a.sms, workdir, a.verbose, a.big_only, a.programs_per_sm)
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=1))
    if a.markdown:
        print(summary_table(rows))
        if a.full:
            print()
            print(full_table(rows))
    bad, warn = problems(rows), warnings(rows)
    print(
        f"\n{len(rows)} launches of {len(cases)} cases inspected ({len(_COMPILED)} distinct binaries, sm_90, "
        f"{a.sms} SMs); {len(bad)} problems, {len(warn)} warnings"
    )
    for line in bad:
        print("  problem: " + line)
    for line in warn:
        print("  warning: " + line)
    return 1 if bad else 0


if __name__ == "__main__":
    if not __package__:  # run as a file: make `bench` and `bn_triton` importable from the repo root
        sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    sys.exit(main())
