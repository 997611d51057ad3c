"""The benchmark harness (bench/): traffic model, suite, backend detection, the correctness gate,
the timing path (with a stand-in timer), the CSV/plot/env writers, and the CLI smoke.

Timings need a CUDA GPU; here the timing path runs with a fake timer so that everything after
do_bench (GB/s, fractions of copy bandwidth, speedups, geomeans, plots) is checked on any machine.
"""

import csv
import json
import math
import os
import shutil
import subprocess
import sys

import pytest
import torch

from bench import impls, report, runner, suite, traffic

TINY_4D = suite.Shape("3x5x4x3", (3, 5, 4, 3))


# ---------------------------------------------------------------- traffic model


def test_traffic_model_counts_minimal_bytes():
    dims = (256, 64, 56, 56)
    b = 256 * 64 * 56 * 56
    assert traffic.tensor_bytes(dims, torch.float32) == 4 * b
    assert traffic.tensor_bytes(dims, torch.bfloat16) == 2 * b
    expected = {"train_fwd": 3, "eval_fwd": 2, "bwd": 5, "fwd_bwd": 8}
    for p, k in expected.items():
        assert traffic.model_bytes(p, dims, torch.float16) == k * 2 * b
    # fwd_bwd is the sum of the forward and backward floors
    assert traffic.model_bytes("fwd_bwd", dims, torch.float32) == traffic.model_bytes(
        "train_fwd", dims, torch.float32
    ) + traffic.model_bytes("bwd", dims, torch.float32)
    with pytest.raises(ValueError, match="unknown pass"):
        traffic.model_bytes("forward", dims, torch.float32)


def test_bandwidth_units():
    assert traffic.gbps(10**9, 1.0) == pytest.approx(1000.0)  # 1 GB in 1 ms = 1 TB/s
    assert traffic.gbps(3 * 10**9, 2.0) == pytest.approx(1500.0)
    assert traffic.copy_gbps(10**9, 1.0) == pytest.approx(2000.0)  # read + write
    assert traffic.fraction_of(1500.0, 3000.0) == pytest.approx(0.5)


# ---------------------------------------------------------------- suite


def test_suite_v1_is_the_issue_list():
    names = [s.name for s in suite.SUITE_V1]
    assert names == [
        "64@112", "64@56", "256@56", "128@56", "128@28", "512@28", "256@28",
        "256@14", "1024@14", "512@14", "512@7", "2048@7",
        "8192x1024", "65536x256", "2048x4096",
    ]  # fmt: skip
    assert suite.SUITE_BY_NAME["64@112"].dims == (256, 64, 112, 112)
    assert suite.SUITE_BY_NAME["65536x256"].dims == (65536, 256)
    for token in suite.QUICK_SHAPES:
        assert token in suite.SUITE_BY_NAME
    for key in suite.QUICK_CONFIGS + suite.DEFAULT_CONFIGS:
        assert key in suite.CONFIGS


def test_parse_shape_and_cases():
    assert suite.parse_shape("96@33").dims == (256, 96, 33, 33)
    assert suite.parse_shape("8x3x5x7").dims == (8, 3, 5, 7)
    assert suite.parse_shape("2048x4096") is suite.SUITE_BY_NAME["2048x4096"]
    for bad in ("abc", "7", "0x3"):
        with pytest.raises(ValueError, match="bad shape"):
            suite.parse_shape(bad)
    with pytest.raises(ValueError, match="unknown pass"):
        suite.parse_list("train_fwd,forward", suite.PASSES, "pass")

    shapes = [suite.parse_shape("64@56"), suite.parse_shape("8192x1024"), suite.parse_shape("4x6x10")]
    cases = suite.make_cases(shapes, ["fp32-nchw", "fp32-cl", "bf16-cl"])
    labels = [c.label for c in cases]
    # a 2-D (or 3-D) shape has no channels_last: it runs once per dtype, not once per layout
    assert labels == [
        "float32/NCHW 64@56",
        "float32/NC 8192x1024",
        "float32/contiguous 4x6x10",
        "float32/channels_last 64@56",
        "bfloat16/channels_last 64@56",
        "bfloat16/NC 8192x1024",
        "bfloat16/contiguous 4x6x10",
    ]


def test_inputs_follow_the_case_layout_and_are_not_zeros(device):
    case = suite.Case(TINY_4D, torch.bfloat16, "channels_last")
    inp = runner.make_inputs(case, device)
    assert inp.x.dtype == torch.bfloat16 and inp.x.is_contiguous(memory_format=torch.channels_last)
    assert inp.dy.is_contiguous(memory_format=torch.channels_last)
    assert inp.weight.dtype == torch.float32
    for t in (inp.x, inp.dy, inp.weight, inp.running_var):
        assert t.abs().sum() > 0
    # per-channel means differ, so a statistics bug cannot hide behind identical channels
    means = inp.x.float().mean(dim=(0, 2, 3))
    assert means.max() - means.min() > 1.0
    again = runner.make_inputs(case, device)
    assert torch.equal(inp.x, again.x)


# ---------------------------------------------------------------- backend detection


def test_classify_backend_names():
    c = impls.classify
    assert c(["aten::batch_norm", "aten::_batch_norm_impl_index", "aten::cudnn_batch_norm"]) == "cudnn"
    assert c(["aten::cudnn_batch_norm_backward", "CudnnBatchNormBackward0"]) == "cudnn"
    assert c(["aten::batch_norm", "aten::native_batch_norm", "aten::native_batch_norm_backward"]) == "native"
    assert c(["bn_triton::train_forward", "aten::empty"]) == "bn_triton"
    assert c(["Torch-Compiled Region: 0/0", "CompiledFunction", "triton_red_fused__native_batch_norm_0"]) == "inductor"
    # a compiled region that still dispatched torch's kernel (a fallback) shows both
    assert c(["Torch-Compiled Region: 0/0", "aten::_native_batch_norm_legit"]) == "inductor+native"
    assert c(["aten::add"]) == "unknown"
    assert c(["aten::empty"], triton_launches=2) == "bn_triton"  # the eager fast path: no op names


def test_detect_backend_on_real_calls(device):
    inp = runner.make_inputs(suite.Case(TINY_4D, torch.float32, "NCHW"), device)
    args = (inp.x, inp.running_mean.clone(), inp.running_var.clone(), inp.weight, inp.bias, True)
    assert impls.detect_backend(lambda: impls.triton_bn(*args)) == "bn_triton"
    native = impls.make_impl("native")
    with native.active():
        assert impls.detect_backend(lambda: native.fn(*args)) == "native"


# ---------------------------------------------------------------- check and timing paths


def _fake_timer(calls):
    def timer(f):
        f()
        calls.append(f)
        return 2.0, 1.5, 2.5  # ms: median, 20%, 80%

    return timer


def test_timing_path_with_fake_timer(device):
    calls = []
    settings = runner.Settings(device=torch.device(device), timing=True, copy_gbps=4.0e-3, timer=_fake_timer(calls))
    case = suite.Case(TINY_4D, torch.float16, "NCHW")
    rows = []
    runner.run_case(case, ["bn_triton", "cudnn"], list(suite.PASSES), settings, rows)
    assert len(rows) == 8 and len(calls) == 8
    for r in rows:
        assert r["status"] == "ok", r
        nbytes = traffic.model_bytes(r["pass"], TINY_4D.dims, torch.float16)
        assert r["model_bytes"] == nbytes
        assert r["ms"] == 2.0 and r["ms_p20"] == 1.5 and r["ms_p80"] == 2.5
        assert r["gbps"] == pytest.approx(nbytes / 2e-3 / 1e9)
        assert r["pct_copy_bw"] == pytest.approx(r["gbps"] / 4.0e-3)
        assert r["err_ratio"] <= 1.0
    assert {r["backend"] for r in rows if r["impl"] == "bn_triton"} == {"bn_triton"}
    report.add_speedups(rows)
    assert all(r["speedup"] == pytest.approx(1.0) for r in rows if r["impl"] == "cudnn")


def test_wrong_result_is_reported_and_never_timed(device, monkeypatch):
    real_make = impls.make_impl

    def off_by_two_percent(x, rm, rv, w, b, training):
        return impls.torch_bn(x, rm, rv, w, b, training) * 1.02

    def make(name, *args):
        return impls.Impl(name, off_by_two_percent) if name == "bn_triton" else real_make(name, *args)

    monkeypatch.setattr(impls, "make_impl", make)
    calls = []
    settings = runner.Settings(device=torch.device(device), timing=True, copy_gbps=1.0, timer=_fake_timer(calls))
    rows = []
    runner.run_case(
        suite.Case(TINY_4D, torch.float32, "NCHW"), ["bn_triton", "cudnn"], ["train_fwd", "eval_fwd"], settings, rows
    )
    ours = [r for r in rows if r["impl"] == "bn_triton"]
    assert [r["status"] for r in ours] == ["wrong", "wrong"]
    assert all(r["ms"] is None and r["err_ratio"] > 1.0 and "allowance" in r["note"] for r in ours)
    assert len(calls) == 2  # only cudnn's two passes were timed
    assert [r["status"] for r in rows if r["impl"] == "cudnn"] == ["ok", "ok"]


def test_past_the_budget_cases_are_skipped(device):
    import time

    settings = runner.Settings(device=torch.device(device), timing=True, deadline=time.monotonic() - 1)
    rows = []
    runner.run_suite([suite.Case(TINY_4D, torch.float32, "NCHW")], ["bn_triton", "cudnn"], ["bwd"], settings, rows)
    assert [(r["impl"], r["status"]) for r in rows] == [("bn_triton", "skipped"), ("cudnn", "skipped")]


# ---------------------------------------------------------------- writers


def _synthetic_rows():
    """Made-up times (not measurements) with known geomeans: bn_triton 1 ms everywhere."""
    times = {("64@56", "cudnn"): 2.0, ("64@56", "native"): 8.0, ("2048@7", "cudnn"): 0.5, ("2048@7", "native"): 2.0}
    rows = []
    for shape in ("64@56", "2048@7"):
        case = suite.Case(suite.SUITE_BY_NAME[shape], torch.bfloat16, "channels_last")
        for impl in ("bn_triton", "cudnn", "native"):
            ms = 1.0 if impl == "bn_triton" else times[shape, impl]
            nbytes = traffic.model_bytes("fwd_bwd", case.shape.dims, case.dtype)
            g = traffic.gbps(nbytes, ms)
            rows.append(
                runner._row(case, impl, "fwd_bwd", ms=ms, ms_p20=ms, ms_p80=ms, gbps=g, pct_copy_bw=g / 3000.0,
                            backend="native" if impl == "cudnn" else impl, status="ok", err_ratio=0.1)
            )  # fmt: skip
        rows.append(runner._row(case, "compile", "fwd_bwd", status="error", note="RuntimeError: boom"))
    return rows


def test_csv_summary_and_tables(tmp_path):
    rows = report.add_speedups(_synthetic_rows())
    path = report.write_csv(rows, str(tmp_path / "results.csv"))
    with open(path, newline="") as f:
        header = next(csv.reader(f))
    for col in ("impl", "pass", "dtype", "layout", "shape", "ms", "gbps", "pct_copy_bw"):
        assert col in header
    back = report.read_csv(path)
    assert len(back) == len(rows)
    assert {r["impl"] for r in back} == {"bn_triton", "cudnn", "native", "compile"}
    assert all(0 < r["pct_copy_bw"] < 1000 for r in back if r["status"] == "ok")
    assert back[0]["pct_copy_bw"] == pytest.approx(rows[0]["pct_copy_bw"])
    assert back[-1]["ms"] is None and back[-1]["status"] == "error"

    (summary,) = report.summarize(back)
    assert summary["vs_cudnn"] == pytest.approx(1.0)  # geomean(2, 0.5)
    assert summary["vs_native"] == pytest.approx(4.0)  # geomean(8, 2)
    assert summary["vs_compile"] is None
    assert summary["worst"] == "2048@7 (0.50x vs cudnn)"
    table = report.summary_table(back)
    assert "1.00x" in table and "4.00x" in table
    detail = report.detail_table(back)
    assert "(native)" in detail  # cudnn's row names the backend that really ran
    assert "error: compile fwd_bwd" in report.problem_lines(back)
    assert report.geomean([2.0, 8.0]) == pytest.approx(4.0)
    assert math.isnan(report.geomean([]))


def test_plots_are_pngs(tmp_path):
    pytest.importorskip("matplotlib")
    rows = report.add_speedups(_synthetic_rows())
    paths = report.write_plots(rows, str(tmp_path), copy_gbps=3000.0, device_name="synthetic")
    names = sorted(os.path.relpath(p, tmp_path) for p in paths)
    assert names == ["overview.png", os.path.join("plots", "fwd_bwd_bfloat16_channels_last.png")]
    for p in paths:
        with open(p, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    untimed = [dict(r, status="checked", ms=None) for r in rows]
    assert report.write_plots(untimed, str(tmp_path / "none")) == []


def test_env_json(tmp_path):
    env = report.collect_env(torch.device("cpu"), None, ["python", "-m", "bench"])
    path = report.write_env(env, str(tmp_path / "env.json"))
    with open(path) as f:
        back = json.load(f)
    for key in ("device", "torch", "triton", "cuda_runtime", "cudnn", "driver", "python"):
        assert key in back
    assert back["torch"] == torch.__version__


# ---------------------------------------------------------------- the command


def test_cli_smoke(tmp_path, request):
    """``python -m bench`` without a GPU (``--smoke`` with one): every implementation checked on
    tiny inputs, backends recorded, nothing timed, exit 0, files written to --out."""
    root = str(request.config.rootpath)
    cmd = [sys.executable, "-m", "bench", "--out", str(tmp_path)]
    if torch.cuda.is_available():
        cmd.append("--smoke")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([root, os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    if not torch.cuda.is_available():
        assert "timings need a CUDA GPU" in proc.stdout
    rows = report.read_csv(str(tmp_path / "results.csv"))
    plain = [r for r in rows if not r["pass"].startswith("fused_")]
    fused = [r for r in rows if r["pass"].startswith("fused_")]
    assert len(plain) == 3 * 4 * 4  # smoke cases x passes x implementations
    assert len(fused) == 2 * 4 * 4  # the 4-D smoke cases get the fused BN -> add -> ReLU rows too
    assert {r["status"] for r in rows} == {"checked"}
    assert all(r["ms"] is None and r["gbps"] is None for r in rows)
    assert {r["backend"] for r in rows if r["impl"] == "bn_triton"} == {"bn_triton"}
    assert {r["backend"] for r in rows if r["impl"] == "compile"} == {"inductor"}
    assert {r["backend"] for r in rows if r["impl"] == "native"} == {"native"}
    with open(tmp_path / "env.json") as f:
        assert json.load(f)["smoke"] is True
    assert (tmp_path / "summary.md").read_text().startswith("## Smoke")


GPU_CHECK = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench", "gpu_check.sh")


def test_gpu_check_script_parses_and_lints():
    subprocess.run(["bash", "-n", GPU_CHECK], check=True, timeout=30)
    if shutil.which("shellcheck") is None:
        pytest.skip("shellcheck not installed")
    res = subprocess.run(["shellcheck", GPU_CHECK], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stdout


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without a GPU")
def test_gpu_check_refuses_without_a_gpu(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("GPU_CHECK_")}
    res = subprocess.run(
        ["bash", GPU_CHECK, "--out", str(tmp_path / "out")], capture_output=True, text=True, env=env, timeout=120
    )
    assert res.returncode == 3, res.stdout + res.stderr
    assert "no CUDA GPU" in res.stderr
    assert not (tmp_path / "out").exists()  # nothing written, nothing run
