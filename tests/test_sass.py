"""Hopper code quality without a GPU: the grids bn_triton launches on an H100, and the SASS of one shape.

Both drive bn_triton's public API on meta tensors with the kernels stubbed (bench/inspect_sass.py,
pretending a CUDA device with 132 SMs). The grid test only records the launches. The SASS test
compiles for sm_90 with the ptxas/cuobjdump that ship in the Triton wheel, in a subprocess with the
interpreter off (conftest turns it on for this process; kernels must be JITFunctions to compile);
it skips when those tools are absent.
"""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bench import inspect_sass, suite

H100_SMS = 132


@pytest.mark.parametrize("config", suite.DEFAULT_CONFIGS)
def test_grids_fill_h100(config):
    """Every suite v1 shape: each kernel that streams x-sized tensors launches at least one program
    per SM of an H100, and no grid axis passes CUDA's limits."""
    for case in suite.make_cases(suite.SUITE_V1, [config]):
        launches = inspect_sass.record_launches(case, H100_SMS)
        assert launches["train_fwd"] and launches["bwd"] and launches["eval_fwd"], case.label
        numel = math.prod(case.shape.dims)
        for pass_name, lns in launches.items():
            for ln in lns:
                grid = ln.grid(ln.kwargs) if callable(ln.grid) else tuple(ln.grid)
                where = f"{case.label} {pass_name} {ln.name} grid {grid}"
                assert grid[0] < 2**31 and all(g <= 65535 for g in grid[1:]), where
                if any(isinstance(a, torch.Tensor) and a.numel() == numel for a in ln.args):
                    assert math.prod(grid) >= H100_SMS, where


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_statistics_register_cap(dtype):
    """The statistics kernel is launched with the register cap of 3 programs per SM (80,
    bn_triton/_config.py STATS_MAX_REGISTERS) for 16- and 32-bit inputs, and without one for fp64."""
    from bn_triton import _config

    shape = suite.parse_shape("64@56")
    for layout in ("NCHW", "channels_last"):
        launches = inspect_sass.record_launches(suite.Case(shape, dtype, layout), H100_SMS)["train_fwd"]
        (stats,) = [ln for ln in launches if ln.name == "stats_kernel"]
        expected = None if dtype == torch.float64 else _config.STATS_MAX_REGISTERS
        assert _config.STATS_MAX_REGISTERS == 80 and stats.kwargs.get("maxnreg") == expected, layout


def test_access_widths_count_cp_async_loads():
    """LDGSTS (cp.async, in Triton's pipelined loops) counts as a load of its width; LTC128B is a
    cache hint, not a width; LDGDEPBAR is no access. Lines as cuobjdump prints them (sm_90, sm_80)."""
    sass = """
        /*03e0*/                   LDGSTS.E.BYPASS.128 [R23], desc[UR14][R2.64], P0 ;
        /*0210*/                   LDGSTS.E.BYPASS.LTC128B.128 [R78+0x800], [R10.64+-0x800], P5 ;
        /*0230*/                   LDGDEPBAR ;
        /*0400*/                   LDG.E.U16 R19, desc[UR30][R20.64] ;
        /*0410*/               @P0 LDG.E.64 R4, desc[UR6][R2.64] ;
        /*0500*/                   STG.E.128 desc[UR6][R2.64], R4 ;
        /*0510*/                   STG.E desc[UR6][R2.64], R9 ;
    """
    assert inspect_sass.access_widths(sass) == {"loads": {128: 2, 16: 1, 64: 1}, "stores": {128: 1, 32: 1}}


def _tools_present() -> bool:
    return (inspect_sass.BIN / "ptxas").exists() and (inspect_sass.BIN / "cuobjdump").exists()


@pytest.mark.skipif(not _tools_present(), reason="ptxas/cuobjdump not in triton/backends/nvidia/bin")
def test_sm90_sass_16_byte_accesses_no_spills(tmp_path, request):
    """64@56 in fp32 NCHW and bf16 channels_last: the big tensors move in 16-byte loads and stores,
    nothing spills, the grids fill the SMs, the statistics loop is pipelined."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = tmp_path / "rows.json"
    cmd = [sys.executable, "-m", "bench.inspect_sass", "--shapes", "64@56", "--dtypes", "fp32-nchw,bf16-cl"]
    root = Path(str(request.config.rootpath))
    proc = subprocess.run([*cmd, "--json", str(out)], cwd=root, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = json.loads(out.read_text())
    assert {(r["dtype"], r["layout"]) for r in rows} == {("float32", "NCHW"), ("bfloat16", "channels_last")}
    assert {r["pass_"] for r in rows} == {"train_fwd", "bwd", "eval_fwd"}
    big = [r for r in rows if r["big_tensors"]]
    assert {r["pass_"] for r in big} == {"train_fwd", "bwd", "eval_fwd"}
    for r in big:
        assert r["wide_covers_big"], r
        assert r["programs"] >= H100_SMS, r
    for r in rows:
        assert r["spills"] == 0, r
    # The statistics kernel: its tile loop pipelined (cp.async) in both layouts, and held to the
    # registers of 3 programs per SM (bn_triton/_config.py STATS_MAX_REGISTERS).
    stats = [r for r in rows if r["kernel"] == "stats_kernel"]
    assert len(stats) == 2
    for r in stats:
        assert r["cp_async"] > 0 and r["regs"] <= 80 and r["resident_per_sm"] == 3, r
