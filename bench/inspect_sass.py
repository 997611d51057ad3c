"""Compile bn_triton's kernels for Hopper (sm_90) on a machine without a GPU and inspect the SASS.

For each case (suite v1 by default) this runs bn_triton's public API on meta tensors (a training
forward + backward, and an eval forward) with every kernel stubbed to record its launches
(bench/stub.py), as if on an H100 (a CUDA device with 132 SMs), and compiles each launch the way
``JITFunction.run`` would there (same binder, so the same divisibility hints) for
``GPUTarget("cuda", 90, 32)``. Per launch:

* the widths of its global loads (LDG, and LDGSTS: cp.async) and stores (STG) in ``cuobjdump -sass``,
  and whether 16-byte accesses carry all the bytes of its big tensors (arguments shaped like x);
* registers and spills (``ptxas -v`` on the PTX);
* the grid against the SM count and the programs per SM its registers and shared memory allow;
* the time its big-tensor traffic takes at 3.0 TB/s (the H100's measured copy bandwidth): a
  prediction, never a measurement.

Kernels are told apart by their launches, not their names. Run it with TRITON_INTERPRET unset or 0
(kernels must be JITFunctions to compile):

    python -m bench.inspect_sass                      # suite v1: problems and warnings
    python -m bench.inspect_sass --markdown           # also one table line per launch
    python -m bench.inspect_sass --shapes 256@14 --dtypes fp32-nchw --json out.json --keep /tmp/sass

Exit status: 0 when every check passes, 1 when one fails (listed last), 2 when it cannot run.
"""

import argparse
import collections
import json
import math
import re
import subprocess
import sys
import tempfile
from pathlib import Path
from unittest import mock

import torch

COPY_BW_TBS = 3.0  # H100 device-to-device copy, measured
H100_SMS = 132
H100_L2_BYTES = 50 * 2**20
# Per-SM limits of compute capability 9.0 (CUDA occupancy calculator).
REGS_PER_SM, MAX_WARPS_PER_SM, MAX_BLOCKS_PER_SM, SMEM_PER_SM = 65536, 64, 32, 228 * 1024
# The block sizes of the (R, C, S) tile that every kernel streams (kernels/__init__.py).
TILE = ("BLOCK_R", "BLOCK_C", "BLOCK_S")
BIN = Path(__import__("triton").__file__).parent / "backends" / "nvidia" / "bin"


def record_launches(case, sms: int = H100_SMS) -> dict:
    """{pass: [stub.Launch]} for a training forward, its backward and an eval forward of ``case``: meta
    tensors that take bn_triton's CUDA path, with the launch settings of a GPU with ``sms`` SMs. The
    bn_triton internals patched for that are the only ones used here: where the route and the launch
    settings are decided (``_cuda_target`` runs uncached: the pretend GPU stays out of its cache)."""
    import bn_triton
    from bench import stub
    from bn_triton import _config, functional

    x = torch.empty(case.shape.dims, dtype=case.dtype, device="meta")
    if case.layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    w, b, rm, rv = (torch.empty(x.shape[1], dtype=x.dtype, device="meta", requires_grad=i < 2) for i in range(4))
    cuda_target, log, ends = _config._cuda_target.__wrapped__, [], []
    with (
        stub.stubbed_kernels(log.append),
        mock.patch.object(functional, "uses_triton", lambda x: True),
        mock.patch.object(_config, "sm_count", lambda index: sms),
        mock.patch.object(_config, "l2_bytes", lambda index: H100_L2_BYTES),
        mock.patch.object(_config, "target", lambda device: cuda_target(0)),
    ):
        y = bn_triton.batch_norm(x.requires_grad_(), rm, rv, w, b, True)
        ends.append(len(log))
        torch.autograd.grad(y, (x, w, b), torch.empty_like(y))
        ends.append(len(log))
        with torch.no_grad():
            bn_triton.batch_norm(x, rm, rv, w, b, False)
    return {"train_fwd": log[: ends[0]], "bwd": log[ends[0] : ends[1]], "eval_fwd": log[ends[1] :]}


_COMPILED: dict = {}
_ACCESS = re.compile(r"\b(LDG(?:STS)?|STG)((?:\.[A-Z0-9_]+)*)\s")
_BITS = {"128": 128, "64": 64, "U16": 16, "S16": 16, "U8": 8, "S8": 8}  # width modifiers; none: 32 bits


def access_widths(sass: str) -> dict:
    """{bits: count} of the global loads and of the stores in ``sass``. LDGSTS (cp.async: global
    to shared memory, in Triton's pipelined loops, e.g. ``LDGSTS.E.BYPASS.128``) counts as a load."""
    widths = {"LDG": collections.Counter(), "STG": collections.Counter()}
    for op, mods in _ACCESS.findall(sass):
        widths[op[:3]][next((_BITS[m] for m in mods.split(".") if m in _BITS), 32)] += 1
    return dict(loads=dict(widths["LDG"]), stores=dict(widths["STG"]))


def compile_launch(ln, workdir: Path) -> dict:
    """Compile one recorded launch for sm_90 exactly as JITFunction.run would; inspect the binary."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature

    fn, target = ln.kernel, GPUTarget("cuda", 90, 32)
    while not hasattr(fn, "signature") and hasattr(fn, "fn"):  # heuristics/autotune wrap the JITFunction
        fn = fn.fn
    backend = make_backend(target)
    bound, spec, opts = create_function_from_signature(fn.signature, fn.params, backend)(*ln.args, **ln.kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, ln.kwargs, bound, spec, opts)
    key = repr((ln.name, signature, sorted(constexprs.items()), sorted(attrs.items()), options))
    if key in _COMPILED:
        return _COMPILED[key]
    k = triton.compile(ASTSource(fn, signature, constexprs, attrs), target=target, options=options.__dict__)
    stem = workdir / f"{ln.name}_{len(_COMPILED)}"
    stem.with_suffix(".ptx").write_text(k.asm["ptx"])
    stem.with_suffix(".cubin").write_bytes(k.asm["cubin"])
    sass = _tool("cuobjdump", "-res-usage", "-sass", stem.with_suffix(".cubin"))
    stem.with_suffix(".sass").write_text(sass)
    ptxas_v = ["-lineinfo", "-v", "--gpu-name=sm_90a", stem.with_suffix(".ptx"), "-o", "/dev/null"]
    try:  # with the flags Triton passes for sm_90 (Hopper compiles as sm_90a)
        log = _tool("ptxas", "--regAllocOptLevel=2", *ptxas_v)
    except RuntimeError:  # older ptxas builds lack --regAllocOptLevel
        log = _tool("ptxas", *ptxas_v)
    shared = re.search(r"SHARED:(\d+)", sass)
    _COMPILED[key] = info = dict(
        regs=int(re.search(r"Used (\d+) registers", log).group(1)),
        spills=sum(int(n) for n in re.findall(r"(\d+) bytes spill (?:stores|loads)", log)),
        shared=max(int(shared.group(1)) if shared else 0, k.metadata.shared),
        num_warps=k.metadata.num_warps,
        cp_async=sass.count("LDGSTS"),  # > 0: a loop pipelined through shared memory
        **access_widths(sass),
    )
    return info


def _tool(name: str, *args) -> str:
    """The output of one of the CUDA tools in Triton's wheel (stdout, then stderr)."""
    p = subprocess.run([str(BIN / name), *map(str, args)], capture_output=True, text=True)
    if p.returncode:
        raise RuntimeError(f"{name} {' '.join(map(str, args))} failed:\n{p.stdout}{p.stderr}")
    return p.stdout + p.stderr


def resident_programs(regs: int, num_warps: int, shared: int) -> int:
    """Programs of one kernel resident on one SM, limited by registers, warps, blocks and shared memory."""
    regs_per_warp = math.ceil(max(regs, 1) * 32 / 256) * 256  # allocated per warp in 256-register units
    by_regs = (REGS_PER_SM // regs_per_warp) // num_warps
    by_smem = SMEM_PER_SM // shared if shared else MAX_BLOCKS_PER_SM
    return max(0, min(by_regs, MAX_WARPS_PER_SM // num_warps, by_smem, MAX_BLOCKS_PER_SM))


def analyse(case, pass_name: str, ln, info: dict, sms: int) -> dict:
    """The checks and the bandwidth prediction of one launch."""
    grid = ln.grid(ln.kwargs) if callable(ln.grid) else tuple(ln.grid)
    numel = math.prod(case.shape.dims)
    big = {id(a): a for a in ln.args if isinstance(a, torch.Tensor) and a.numel() == numel}.values()
    programs = math.prod(grid)
    slots = sms * resident_programs(info["regs"], info["num_warps"], info["shared"])
    tile = math.prod(ln.kwargs.get(k, 1) for k in TILE)
    per_thread = sum(tile * a.element_size() for a in big) / (info["num_warps"] * 32)
    wide = 16 * (info["loads"].get(128, 0) + info["stores"].get(128, 0))
    moved = sum(a.numel() * a.element_size() for a in big)
    return dict(
        case=case.shape.name, dtype=case.dtype_name, layout=case.layout, pass_=pass_name, kernel=ln.name,
        grid=list(grid), programs=programs, num_warps=info["num_warps"], regs=info["regs"], spills=info["spills"],
        resident_per_sm=slots // sms, waves=round(programs / slots, 2) if slots else math.inf,
        big_tensors=len(big), wide_covers_big=wide >= per_thread if big else None,
        loads=info["loads"], stores=info["stores"], cp_async=info["cp_async"], bytes=moved,
        pred_us=round(moved / (COPY_BW_TBS * 1e12) * 1e6, 1),
    )  # fmt: skip


def _widths(h: dict) -> str:
    return " ".join(f"{n}x{b}b" for b, n in sorted(h.items(), key=lambda kv: -int(kv[0]))) or "-"


def checks(rows: list, sms: int = H100_SMS) -> tuple:
    """(problems, warnings), one line each. Problems: spills; a kernel streaming big tensors whose
    16-byte accesses do not carry all their bytes, or whose grid leaves SMs idle. Warnings: such
    grids a little over one wave, whose last wave runs mostly empty."""
    bad, warn = [], []
    for r in rows:
        where = f"{r['kernel']} ({r['pass_']}) {r['case']} {r['dtype']}/{r['layout']}"
        if r["spills"]:
            bad.append(f"{where}: {r['spills']} bytes of spill stores + loads")
        if r["wide_covers_big"] is False:
            bad.append(f"{where}: big tensors not all moved in 16-byte accesses (loads {_widths(r['loads'])})")
        if r["big_tensors"] and r["programs"] < sms:
            bad.append(f"{where}: grid of {r['programs']} programs leaves SMs idle")
        if r["big_tensors"] and 1.0 < r["waves"] < 2.0:
            waves = f"{r['waves']} waves of {r['resident_per_sm']}/SM ({r['regs']} regs)"
            warn.append(f"{where}: {r['programs']} programs = {waves}")
    return bad, warn


def table(rows: list) -> str:
    head = ["shape", "dtype/layout", "pass", "kernel", "grid", "warps", "regs", "spill B", "res/SM", "waves",
            "LDG", "STG", "16-B big", "MB moved", f"pred. us @{COPY_BW_TBS} TB/s"]  # fmt: skip
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["case"], f"{r['dtype']}/{r['layout']}", r["pass_"], r["kernel"], "x".join(map(str, r["grid"])),
                 r["num_warps"], r["regs"], r["spills"], r["resident_per_sm"], r["waves"], _widths(r["loads"]),
                 _widths(r["stores"]), {True: "yes", False: "**no**", None: "-"}[r["wide_covers_big"]],
                 f"{r['bytes'] / 1e6:.1f}", r["pred_us"] or "-"]  # fmt: skip
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    from bench import suite
    from bn_triton._config import interpreting

    p = argparse.ArgumentParser(prog="python -m bench.inspect_sass", description=__doc__.splitlines()[0])
    p.add_argument("--shapes", help="comma-separated suite names (64@56, 8192x1024) or C@HW / NxC[xHxW]")
    p.add_argument("--dtypes", default=",".join(suite.DEFAULT_CONFIGS), help="configs (default %(default)s)")
    p.add_argument("--sms", type=int, default=H100_SMS, help="SM count of the pretend GPU (default %(default)s)")
    p.add_argument("--keep", help="folder for the PTX, cubin and SASS of each binary (default: a temporary one)")
    p.add_argument("--json", help="write the per-launch rows here")
    p.add_argument("--markdown", action="store_true", help="print one table line per launch")
    a = p.parse_args(argv)
    if interpreting():
        print("inspect_sass: the Triton interpreter is on: run with TRITON_INTERPRET unset or 0", file=sys.stderr)
        return 2
    if not ((BIN / "ptxas").exists() and (BIN / "cuobjdump").exists()):
        print(f"inspect_sass: ptxas/cuobjdump not found under {BIN}", file=sys.stderr)
        return 2
    shapes = [suite.parse_shape(n) for n in a.shapes.split(",")] if a.shapes else suite.SUITE_V1
    cases = suite.make_cases(shapes, suite.parse_list(a.dtypes, suite.CONFIGS, "config"))
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(a.keep or tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        rows = [
            analyse(case, pass_name, ln, compile_launch(ln, workdir), a.sms)
            for case in cases
            for pass_name, launches in record_launches(case, a.sms).items()
            for ln in launches
        ]
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=1))
    if a.markdown:
        print(table(rows))
    bad, warn = checks(rows, a.sms)
    print(f"\n{len(rows)} launches of {len(cases)} cases ({len(_COMPILED)} binaries, sm_90, {a.sms} SMs): ", end="")
    print(f"{len(bad)} problems, {len(warn)} warnings")
    print("".join(f"  problem: {line}\n" for line in bad) + "".join(f"  warning: {line}\n" for line in warn), end="")
    return 1 if bad else 0


if __name__ == "__main__":
    if not __package__:  # run as a file: make `bench` and `bn_triton` importable from the repo root
        sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    sys.exit(main())
