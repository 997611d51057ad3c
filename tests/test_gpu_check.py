"""bench/gpu_check.sh without a GPU: its dry run (GPU_CHECK_ALLOW_CPU=1), the files it packs, its
time plan. (Its lint and its refusal without a GPU are in tests/test_bench.py.)

On a GPU machine these skip: there gpu_check.sh is the real run, and it runs this suite.
"""

import os
import re
import subprocess
import sys
import tarfile

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "bench", "gpu_check.sh")
FILES = {
    "gpu_check.log",
    "summary.md",
    "results.csv",
    "compile.csv",
    "e2e.csv",
    "env.json",
    "overview.png",
    "plots.tar.gz",
}

no_gpu = pytest.mark.skipif(torch.cuda.is_available(), reason="a dry run needs a machine without a GPU")


def _env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GPU_CHECK_")}
    env.pop("TRITON_INTERPRET", None)  # gpu_check.sh unsets it anyway; the tests and benches set their own
    env.update(GPU_CHECK_ALLOW_CPU="1", PYTHON=sys.executable, **extra)
    return env


def test_time_plan_fits_8_minutes():
    """The planned stage limits, the setup and the packing fit in the total, and the total in 8 min."""
    text = open(SCRIPT).read()
    total = int(re.search(r"TOTAL_S=\$\{GPU_CHECK_TOTAL_S:-(\d+)\}", text).group(1))
    plans = {k: int(v) for k, v in re.findall(r"^PLAN_(\w+)=(\d+)$", text, re.M)}
    assert set(plans) == {"TESTS", "E2E", "BENCH", "COMPARE"}
    assert total <= 8 * 60 - 15, "leave a margin below 8 minutes"
    assert sum(plans.values()) + 10 + 20 <= total, "plans + packing (10 s) + setup (20 s) exceed the total"


@no_gpu
def test_dry_run_packs_at_most_8_files(tmp_path):
    """Every stage on CPU (the tests on a small selection, the benches' smokes, the background
    warm-up forced on): exit 0, at most 8 files and no folder in --out, each stage in the summary."""
    out = tmp_path / "out"
    env = _env(
        GPU_CHECK_PYTEST_ARGS="tests/test_e2e.py -k bad_arguments",
        GPU_CHECK_WORKERS="0",
        GPU_CHECK_PRECOMPILE="1",
    )
    proc = subprocess.run(
        ["bash", SCRIPT, "--out", str(out)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    names = set(os.listdir(out))
    assert names <= FILES and len(names) <= 8, names
    assert not [n for n in names if (out / n).is_dir()]
    assert {"gpu_check.log", "summary.md", "results.csv", "compile.csv", "e2e.csv", "env.json"} <= names
    assert (out / "e2e.csv").read_text().splitlines()[0] == "model,config,variant,batch,step_ms,launches"
    summary = (out / "summary.md").read_text()
    for stage in ("| tests | 0 |", "| e2e | 0 |", "| suite v1 | 0 |", "| vs torch.compile | 0 |"):
        assert stage in summary, summary[:2000]
    assert "3 passed" in summary
    with tarfile.open(out / "plots.tar.gz") as tar:
        packed = {os.path.normpath(n) for n in tar.getnames()}
    assert {"pytest.xml", "e2e.md", "precompile.log", "compile_summary.md"} <= packed, packed
    log = (out / "gpu_check.log").read_text()
    assert "== summary (summary.md)" in log and log.rstrip().splitlines()[-1].startswith("== gpu_check done")


@no_gpu
def test_no_time_left_skips_stages_and_fails(tmp_path):
    """With no time left every stage is skipped and said so; tests that never ran are a failure."""
    out = tmp_path / "out"
    proc = subprocess.run(
        ["bash", SCRIPT, "--out", str(out)],
        cwd=tmp_path,
        env=_env(GPU_CHECK_TOTAL_S="30"),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-2000:]
    summary = (out / "summary.md").read_text()
    assert summary.count("skipped: no time left") == 4, summary
