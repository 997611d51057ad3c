"""Hopper code quality without a GPU: the reduction grids launch_config picks, and the SASS of one shape.

The grid test is plain Python (launch_config with a CUDA device and 132 SMs, as on an H100). The
SASS test compiles for sm_90 with the ptxas/cuobjdump that ship in the Triton wheel, through
bench/inspect_sass.py in a subprocess with the interpreter off (conftest turns it on for this
process, and kernels must be JITFunctions to compile); it skips when those tools are absent.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bench import suite
from bn_triton import _config, launch

REPO = Path(__file__).resolve().parent.parent
H100_SMS = 132


def _meta(case) -> torch.Tensor:
    x = torch.empty(case.shape.dims, dtype=case.dtype, device="meta")
    return x.contiguous(memory_format=torch.channels_last) if case.layout == "channels_last" else x


@pytest.mark.parametrize("config", suite.DEFAULT_CONFIGS)
def test_reduction_grid_fills_h100(monkeypatch, config):
    """Every suite v1 shape: the split reduction's grid reaches all 132 SMs of an H100, and the
    splits partition the tiles (none empty, none past the end)."""
    monkeypatch.setattr(_config, "sm_count", lambda index: H100_SMS)
    for case in suite.make_cases(suite.SUITE_V1, [config]):
        _, geom = launch.canonical(_meta(case))
        cfg = _config.launch_config(geom, torch.device("cuda", 0))
        where = f"{case.label}: {cfg}"
        assert cfg.num_c_blocks * cfg.num_splits >= H100_SMS, where
        assert cfg.num_splits <= 65535, where
        # Split k takes tiles [k*T//P, (k+1)*T//P): none empty, and together exactly the T tiles.
        assert cfg.num_splits <= cfg.num_tiles, where
        assert cfg.num_c_blocks > H100_SMS * _config.PROGRAMS_PER_SM or (
            cfg.num_c_blocks * cfg.num_splits <= H100_SMS * _config.PROGRAMS_PER_SM
        ), f"more than one wave: {where}"


def _tools_present() -> bool:
    try:
        import triton
    except ImportError:
        return False
    d = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
    return (d / "ptxas").exists() and (d / "cuobjdump").exists()


@pytest.mark.skipif(not _tools_present(), reason="ptxas/cuobjdump not in triton/backends/nvidia/bin")
def test_sm90_sass_16_byte_loads_no_spills(tmp_path):
    """64@56 in fp32 NCHW and bf16 channels_last: the big tensors move in 16-byte loads and stores,
    nothing spills, the reduction grids fill the SMs."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = tmp_path / "rows.json"
    cmd = [
        sys.executable,
        "-m",
        "bench.inspect_sass",
        "--shapes",
        "64@56",
        "--dtypes",
        "fp32-nchw,bf16-cl",
        "--big-only",
    ]
    proc = subprocess.run([*cmd, "--json", str(out)], cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = json.loads(out.read_text())
    assert {(r["dtype"], r["layout"]) for r in rows} == {("float32", "NCHW"), ("bfloat16", "channels_last")}
    big_kernels = ("stats_partials_kernel", "normalize_kernel", "grad_partials_kernel", "grad_input_kernel")
    big = [r for r in rows if r["kernel"] in big_kernels]
    assert len(big) == 10  # 4 kernels + the eval normalize, per case
    for r in big:
        assert r["ldg128_covers_big"], r
        if r["kernel"] == "stats_partials_kernel":  # loads nothing but x: every global load is 16-byte
            assert set(r["loads"]) == {"128"}, r
        if r["stg128_covers_big"] is not None:
            assert r["stg128_covers_big"], r
    for r in rows:
        assert r["spills"] == 0, r
        if "fills_sms" in r:
            assert r["fills_sms"], r
