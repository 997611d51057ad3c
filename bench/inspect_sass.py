"""Compile bn_triton's kernels for Hopper (sm_90) on a machine without a GPU and inspect the SASS.

For each case (suite v1 by default) this runs bn_triton's public API on meta tensors (a training
forward + backward, and an eval forward) with every kernel stubbed to record its launches
(bench/stub.py), as if on an H100: a CUDA device with 132 SMs. Each recorded launch is compiled the
way ``JITFunction.run`` would compile it there (same binder, so the same divisibility hints), with
``target=GPUTarget("cuda", 90, 32)``; then, per kernel launch:

* the widths of its global loads and stores (``cuobjdump -sass``), and whether 16-byte accesses
  (``LDG.E.128`` / ``STG.E.128``) carry all the bytes of its big tensors (arguments shaped like x);
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
import contextlib
import json
import math
import re
import subprocess
import sys
import tempfile
import types
from pathlib import Path

import torch

COPY_BW_TBS = 3.0  # H100 device-to-device copy, measured
H100_SMS = 132
H100_L2_BYTES = 50 * 2**20
# Per-SM limits of compute capability 9.0 (CUDA occupancy calculator).
REGS_PER_SM, MAX_WARPS_PER_SM, MAX_BLOCKS_PER_SM, SMEM_PER_SM = 65536, 64, 32, 228 * 1024
# The block sizes of the (R, C, S) tile that every kernel streams (kernels/__init__.py).
TILE = ("BLOCK_R", "BLOCK_C", "BLOCK_S")
BIN = Path(__import__("triton").__file__).parent / "backends" / "nvidia" / "bin"


@contextlib.contextmanager
def pretend_cuda(sms: int):
    """Meta tensors take bn_triton's CUDA path, with the launch settings of a GPU with ``sms`` SMs.
    These are the only bn_triton internals used here: where the route and the launch settings are
    decided."""
    from bn_triton import _config, functional

    cuda = torch.device("cuda", 0)
    real_target = _config.target
    props = types.SimpleNamespace(multi_processor_count=sms, L2_cache_size=H100_L2_BYTES)
    patches = [(torch.cuda, "get_device_properties", lambda *a, **k: props)]
    patches.append((functional, "uses_triton", lambda x: True))
    patches.append((_config, "target", lambda device: real_target(cuda)))
    saved = [(m, a, getattr(m, a)) for m, a, _ in patches]
    for m, a, v in patches:
        setattr(m, a, v)
    caches = (_config.sm_count, _config.l2_bytes, _config._cuda_target)
    for fn in caches:
        fn.cache_clear()
    try:
        yield
    finally:
        for m, a, v in saved:
            setattr(m, a, v)
        for fn in caches:
            fn.cache_clear()


def record_launches(case, sms: int = H100_SMS) -> dict:
    """{pass: [stub.Launch]} for a training forward, its backward and an eval forward of ``case``."""
    import bn_triton
    from bench import stub

    log, by_pass = [], {}
    x = torch.empty(case.shape.dims, dtype=case.dtype, device="meta")
    if case.layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    C = x.shape[1]
    w, b, rm, rv = (torch.empty(C, dtype=x.dtype, device="meta", requires_grad=i < 2) for i in range(4))
    with pretend_cuda(sms), stub.stubbed_kernels(log.append):
        y = bn_triton.batch_norm(x.requires_grad_(), rm, rv, w, b, True)
        by_pass["train_fwd"], log[:] = list(log), []
        torch.autograd.grad(y, (x, w, b), torch.empty_like(y))
        by_pass["bwd"], log[:] = list(log), []
        with torch.no_grad():
            bn_triton.batch_norm(x, rm, rv, w, b, False)
        by_pass["eval_fwd"] = list(log)
    return by_pass


def _jit(kernel):
    while not hasattr(kernel, "signature") and hasattr(kernel, "fn"):  # heuristics/autotune wrap it
        kernel = kernel.fn
    return kernel


_COMPILED: dict = {}
_ACCESS = re.compile(r"\b(LDG|STG)((?:\.[A-Z0-9_]+)*)\s")


def compile_launch(ln, workdir: Path) -> dict:
    """Compile one recorded launch for sm_90 exactly as JITFunction.run would; inspect the binary."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature

    fn, target = _jit(ln.kernel), GPUTarget("cuda", 90, 32)
    backend = make_backend(target)
    bound, spec, opts = create_function_from_signature(fn.signature, fn.params, backend)(*ln.args, **ln.kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, ln.kwargs, bound, spec, opts)
    key = repr((ln.name, signature, sorted(constexprs.items()), sorted(attrs.items()), options))
    if key not in _COMPILED:
        k = triton.compile(ASTSource(fn, signature, constexprs, attrs), target=target, options=options.__dict__)
        stem = workdir / f"{ln.name}_{len(_COMPILED)}"
        stem.with_suffix(".ptx").write_text(k.asm["ptx"])
        stem.with_suffix(".cubin").write_bytes(k.asm["cubin"])
        sass = _run("cuobjdump", "-res-usage", "-sass", str(stem.with_suffix(".cubin")))
        stem.with_suffix(".sass").write_text(sass)
        widths = {"LDG": {}, "STG": {}}
        for op, mods in _ACCESS.findall(sass):
            bits = next((b for b in (128, 64) if f".{b}" in mods), 16 if "16" in mods else 8 if "8" in mods else 32)
            widths[op][bits] = widths[op].get(bits, 0) + 1
        log = _ptxas_v(stem.with_suffix(".ptx"))
        spills = sum(int(n) for n in re.findall(r"(\d+) bytes spill (?:stores|loads)", log))
        shared = re.search(r"SHARED:(\d+)", sass)
        _COMPILED[key] = dict(
            regs=int(re.search(r"Used (\d+) registers", log).group(1)),
            spills=spills,
            shared=max(int(shared.group(1)) if shared else 0, k.metadata.shared),
            num_warps=k.metadata.num_warps,
            loads=widths["LDG"],
            stores=widths["STG"],
        )
    return _COMPILED[key]


def _run(tool: str, *args: str) -> str:
    return subprocess.run([str(BIN / tool), *args], capture_output=True, text=True, check=True).stdout


def _ptxas_v(ptx: Path) -> str:
    """ptxas -v with the flags Triton passes for sm_90 (Hopper compiles as sm_90a); older ptxas
    builds lack --regAllocOptLevel."""
    for extra in (["--regAllocOptLevel=2"], []):
        cmd = [str(BIN / "ptxas"), "-lineinfo", "-v", *extra, "--gpu-name=sm_90a", str(ptx), "-o", "/dev/null"]
        pv = subprocess.run(cmd, capture_output=True, text=True)
        if pv.returncode == 0:
            return pv.stdout + pv.stderr
    raise RuntimeError(f"ptxas failed on {ptx}:\n{pv.stdout}{pv.stderr}")


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
        loads=info["loads"], stores=info["stores"], bytes=moved,
        pred_us=round(moved / (COPY_BW_TBS * 1e12) * 1e6, 1),
    )  # fmt: skip


def run(cases: list, sms: int, workdir: Path) -> list:
    return [
        analyse(case, pass_name, ln, compile_launch(ln, workdir), sms)
        for case in cases
        for pass_name, launches in record_launches(case, sms).items()
        for ln in launches
    ]


def _where(r: dict) -> str:
    return f"{r['kernel']} ({r['pass_']}) {r['case']} {r['dtype']}/{r['layout']}"


def _widths(h: dict) -> str:
    return " ".join(f"{n}x{b}b" for b, n in sorted(h.items(), key=lambda kv: -int(kv[0]))) or "-"


def problems(rows: list, sms: int = H100_SMS) -> list:
    """Failed checks, one line each: spills; a kernel streaming big tensors whose 16-byte accesses
    do not carry all their bytes, or whose grid leaves SMs idle."""
    out = []
    for r in rows:
        if r["spills"]:
            out.append(f"{_where(r)}: {r['spills']} bytes of spill stores + loads")
        if r["wide_covers_big"] is False:
            out.append(f"{_where(r)}: big tensors not all moved in 16-byte accesses (loads {_widths(r['loads'])})")
        if r["big_tensors"] and r["programs"] < sms:
            out.append(f"{_where(r)}: grid of {r['programs']} programs leaves SMs idle")
    return out


def warnings(rows: list) -> list:
    """Grids a little over one wave: the last wave runs mostly empty."""
    return [
        f"{_where(r)}: {r['programs']} programs = {r['waves']} waves of {r['resident_per_sm']}/SM ({r['regs']} regs)"
        for r in rows
        if r["big_tensors"] and 1.0 < r["waves"] < 2.0
    ]


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

    p = argparse.ArgumentParser(prog="python -m bench.inspect_sass", description=__doc__.splitlines()[0])
    p.add_argument("--shapes", help="comma-separated suite names (64@56, 8192x1024) or C@HW / NxC[xHxW]")
    p.add_argument("--dtypes", default=",".join(suite.DEFAULT_CONFIGS), help="configs (default %(default)s)")
    p.add_argument("--sms", type=int, default=H100_SMS, help="SM count of the pretend GPU (default %(default)s)")
    p.add_argument("--keep", help="folder for the PTX, cubin and SASS of each binary (default: a temporary one)")
    p.add_argument("--json", help="write the per-launch rows here")
    p.add_argument("--markdown", action="store_true", help="print one table line per launch")
    a = p.parse_args(argv)

    from bn_triton._config import interpreting

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
        rows = run(cases, a.sms, workdir)
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=1))
    if a.markdown:
        print(table(rows))
    bad, warn = problems(rows, a.sms), warnings(rows)
    print(f"\n{len(rows)} launches of {len(cases)} cases ({len(_COMPILED)} binaries, sm_90, {a.sms} SMs): ", end="")
    print(f"{len(bad)} problems, {len(warn)} warnings")
    print("".join(f"  problem: {line}\n" for line in bad) + "".join(f"  warning: {line}\n" for line in warn), end="")
    return 1 if bad else 0


if __name__ == "__main__":
    if not __package__:  # run as a file: make `bench` and `bn_triton` importable from the repo root
        sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    sys.exit(main())
