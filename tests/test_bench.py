"""The benchmark harness (bench/): traffic model, suite and its workloads (plain, BN -> add -> ReLU,
BN -> SiLU, BN -> Hardswish), backend detection, the correctness gate (with the activations' kinks:
ReLU's mask, Hardswish's -3 and 3), the timing path (wall, host and device time, with stand-in
timers), the CSV/plot/env writers, kernel stubs, and the command line.

Timings need a CUDA GPU; here the timing path runs with injected timers so that everything around
them (GB/s, fractions of copy bandwidth, speedups, geomeans, the cost split, plots) is checked on
any machine, and the CUDA-graph timer runs against a stand-in for torch.cuda.
"""

import contextlib
import csv
import json
import math
import os
import re
import shutil
import subprocess
import sys
import types

import pytest
import torch
import torch.nn.functional as F

from bench import impls, report, runner, stub, suite, traffic

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
    fused = {p: traffic.model_bytes(p, dims, torch.bfloat16, suite.FUSED.traffic) // (2 * b) for p in expected}
    assert fused == {"train_fwd": 4, "eval_fwd": 3, "bwd": 7, "fwd_bwd": 11}
    # BN -> SiLU and BN -> Hardswish without a residual move batch norm's bytes (docs/math.md)
    for w in (suite.SILU, suite.HARDSWISH):
        assert {p: traffic.model_bytes(p, dims, torch.float32, w.traffic) // (4 * b) for p in expected} == expected


def test_bandwidth_units():
    assert traffic.gbps(10**9, 1.0) == pytest.approx(1000.0)  # 1 GB in 1 ms = 1 TB/s
    assert traffic.gbps(3 * 10**9, 2.0) == pytest.approx(1500.0)
    assert traffic.copy_gbps(10**9, 1.0) == pytest.approx(2000.0)  # read + write


# ---------------------------------------------------------------- suite


def test_suite_v1_shapes():
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


def test_workloads_and_their_smoke_cases():
    """Every workload's rows by prefix, activation and residual; the activation rows on the 4-D
    cases only, and in the smoke on one case each (SiLU fp32 NCHW, Hardswish bf16 channels_last)."""
    spec = [(w.prefix, w.activation, w.residual) for w in suite.WORKLOADS]
    assert spec == [
        ("", None, False),
        ("fused_", "relu", True),
        ("silu_", "silu", False),
        ("hardswish_", "hardswish", False),
    ]
    cases = suite.make_cases([suite.SUITE_BY_NAME["64@56"], suite.SUITE_BY_NAME["8192x1024"]], ["bf16-cl"])
    for w in suite.WORKLOADS[1:]:
        assert [c.shape.name for c in cases if w.applies(c)] == ["64@56"]
    smoke = {w.prefix: [c.label for c in suite.smoke_cases(w)] for w in suite.WORKLOADS}
    assert smoke == {
        "": ["float32/NCHW 4x6x5x5", "bfloat16/channels_last 4x6x5x5", "float16/NC 24x10"],
        "fused_": ["float32/NCHW 4x6x5x5", "bfloat16/channels_last 4x6x5x5"],
        "silu_": ["float32/NCHW 4x6x5x5"],
        "hardswish_": ["bfloat16/channels_last 4x6x5x5"],
    }
    assert suite.smoke_cases() == suite.smoke_cases(suite.PLAIN)


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
    assert torch.equal(inp.x, again.x) and again.residual is None
    r = runner.make_inputs(case, device, residual=True).residual
    assert r.dtype == torch.bfloat16 and r.is_contiguous(memory_format=torch.channels_last) and r.abs().sum() > 0


# ---------------------------------------------------------------- backend detection


def test_classify_backend_names():
    c = impls.classify
    assert c(["aten::batch_norm", "aten::_batch_norm_impl_index", "aten::cudnn_batch_norm"]) == "cudnn"
    assert c(["aten::cudnn_batch_norm_backward", "CudnnBatchNormBackward0"]) == "cudnn"
    assert c(["aten::batch_norm", "aten::native_batch_norm", "aten::native_batch_norm_backward"]) == "native"
    assert c(["bn_triton::stats", "aten::empty"]) == "bn_triton"
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


def _graph_timer(build):
    """Device time 0.5 ms; fails the way a CUDA graph capture does for torch's rows."""
    build()()
    if build.args[0] is impls.torch_bn:
        raise RuntimeError("operation not permitted when stream is capturing")
    return 0.5


def test_timing_path_with_injected_timers(device):
    """Wall time from the timer, host time from the real enqueue_ms (2 calls), device time from the
    graph timer; a device timer that fails leaves NaN and the reason, and the row is still timed."""
    calls = []
    settings = runner.Settings(
        device=torch.device(device), timing=True, copy_gbps=4.0e-3, timer=_fake_timer(calls), calls=2
    )
    settings.device_timer = _graph_timer
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
        assert r["err_ratio"] <= 1.0 and r["mask_flips"] is None
        assert r["host_ms"] > 0
        if r["impl"] == "bn_triton":
            assert r["device_ms"] == 0.5 and r["note"] == ""
            assert r["device_pct_copy_bw"] == pytest.approx(nbytes / 0.5e-3 / 1e9 / 4.0e-3)
        else:
            assert math.isnan(r["device_ms"]) and r.get("device_pct_copy_bw") is None
            assert r["note"].startswith("device time not measured: RuntimeError: operation not permitted")
    assert {r["backend"] for r in rows if r["impl"] == "bn_triton"} == {"bn_triton"}
    report.add_speedups(rows)
    assert all(r["speedup"] == pytest.approx(1.0) for r in rows if r["impl"] == "cudnn")
    (line,) = report.problem_lines(rows).splitlines()
    assert line.startswith("- ok, 4 rows (cudnn; 4 inputs and passes): device time not measured: RuntimeError")


def test_enqueue_ms_times_calls_back_to_back():
    log = []
    ms = runner.enqueue_ms(lambda: log.append("call"), calls=4, sync=lambda: log.append("sync"))
    assert log == ["call", "sync"] + ["call"] * 4 + ["sync"]  # warm-up, then no sync between calls
    assert 0 < ms < 100


def test_cuda_graph_ms_warms_up_on_the_capture_stream_captures_once_and_replays():
    """runner.cuda_graph_ms against a stand-in for torch.cuda that logs every step."""
    log = []

    class Stream:
        def wait_stream(self, other):
            log.append("wait")

    class Graph:
        def replay(self):
            log.append("replay")

    class Event:
        def __init__(self, enable_timing=False):
            assert enable_timing

        def record(self):
            self.replays = log.count("replay")

        def synchronize(self):
            log.append("sync")

        def elapsed_time(self, end):
            return 2.0 * (end.replays - self.replays)  # 2 ms a replay

    capture = Stream()

    @contextlib.contextmanager
    def on(stream, tag):
        assert stream is capture
        log.append(f"{tag} on")
        yield
        log.append(f"{tag} off")

    cuda = types.SimpleNamespace(
        Stream=lambda: capture,
        current_stream=Stream,
        stream=lambda s: on(s, "stream"),
        CUDAGraph=Graph,
        graph=lambda g, stream: on(stream, "capture"),
        Event=Event,
    )

    def build():
        log.append("build")
        return lambda: log.append("call")

    assert runner.cuda_graph_ms(build, reps=5, cuda=cuda) == pytest.approx(2.0)
    assert log == (
        ["wait", "stream on", "build", "call", "call", "call", "stream off"]
        + ["capture on", "call", "capture off", "wait", "replay"]
        + ["replay"] * 5
        + ["sync"]
    )


def test_wrong_result_is_reported_and_never_timed(device, monkeypatch):
    real_make = impls.make_impl

    def off_by_two_percent(*args):
        return impls.torch_bn(*args) * 1.02

    def make(name, *args):
        return impls.Impl(name, off_by_two_percent) if name == "bn_triton" else real_make(name, *args)

    monkeypatch.setattr(impls, "make_impl", make)
    calls = []
    settings = runner.Settings(device=torch.device(device), timing=True, copy_gbps=1.0, timer=_fake_timer(calls))
    settings.host_timer, settings.device_timer = (lambda f: 0.1), (lambda build: 0.2)
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


def test_fused_rows_come_from_the_same_runner(device):
    """The fused workload: pass names prefixed, the fused byte model, d(residual) checked, 4-D only."""
    settings = runner.Settings(device=torch.device(device), timing=False)
    cases = suite.make_cases([suite.SMOKE_SHAPE_4D, suite.SMOKE_SHAPE_2D], ["bf16-cl"])
    rows = []
    runner.run_suite(cases, ["bn_triton", "cudnn"], ["fwd_bwd", "eval_fwd"], settings, rows, workload=suite.FUSED)
    assert [(r["impl"], r["pass"], r["shape"]) for r in rows] == [
        (i, p, "4x6x5x5") for p in ("fused_fwd_bwd", "fused_eval_fwd") for i in ("bn_triton", "cudnn")
    ]
    assert all(r["status"] == "checked" for r in rows), rows
    assert all(r["backend"] == "bn_triton" for r in rows if r["impl"] == "bn_triton")
    dims = suite.SMOKE_SHAPE_4D.dims
    assert rows[0]["model_bytes"] == 11 * traffic.tensor_bytes(dims, torch.bfloat16)
    assert rows[0]["mask_flips"] == 0 and rows[2]["mask_flips"] is None  # train rows count flips

    inp = runner.make_inputs(cases[0], device, residual=True)
    out = runner.run_train(impls.triton_bn, inp)
    assert set(out) == {"y", "running_mean", "running_var", "dx", "dweight", "dbias", "dresidual"}


@pytest.mark.parametrize("workload", [suite.SILU, suite.HARDSWISH], ids=lambda w: w.activation)
def test_activation_rows_come_from_the_same_runner(device, workload):
    """BN -> SiLU and BN -> Hardswish: every pass on the 4-D case only, prefixed, batch norm's bytes,
    every implementation checked against float64 (bn_triton in its fused epilogue); kink flips are
    counted on Hardswish's training rows (none on SiLU's: it has no kink)."""
    settings = runner.Settings(device=torch.device(device), timing=False)
    cases = suite.make_cases([suite.SMOKE_SHAPE_4D, suite.SMOKE_SHAPE_2D], ["fp32-nchw", "bf16-cl"])
    rows = []
    runner.run_suite(cases, ["bn_triton", "native"], list(suite.PASSES), settings, rows, workload=workload)
    assert [(r["impl"], r["pass"], r["dtype"], r["shape"]) for r in rows] == [
        (i, workload.prefix + p, dt, "4x6x5x5")
        for dt in ("float32", "bfloat16")
        for p in suite.PASSES
        for i in ("bn_triton", "native")
    ]
    assert all(r["status"] == "checked" for r in rows), [r for r in rows if r["status"] != "checked"]
    assert {r["backend"] for r in rows if r["impl"] == "bn_triton"} == {"bn_triton"}
    for r in rows:
        dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[r["dtype"]]
        factor = {"train_fwd": 3, "eval_fwd": 2, "bwd": 5, "fwd_bwd": 8}[r["pass"].removeprefix(workload.prefix)]
        assert r["model_bytes"] == factor * traffic.tensor_bytes(suite.SMOKE_SHAPE_4D.dims, dtype)
        train = not r["pass"].endswith("eval_fwd")
        assert (r["mask_flips"] is not None) == (train and workload is suite.HARDSWISH), r

    inp = runner.make_inputs(cases[0], device)
    out = runner.run_train(impls.make_impl("bn_triton", workload.activation).fn, inp)
    assert set(out) == {"y", "running_mean", "running_var", "dx", "dweight", "dbias"}


_TORCH_ACTIVATION = {None: lambda v: v, "relu": torch.relu, "silu": F.silu, "hardswish": F.hardswish}


@pytest.mark.parametrize("workload", suite.WORKLOADS, ids=lambda w: w.prefix.strip("_") or "plain")
def test_one_composition_for_every_workload(device, workload):
    """Every implementation gets its workload's activation from make_impl; torch's rows (and the
    float64 reference, on float64 copies) compute F.batch_norm, then the add, then torch's own
    activation function, and bn_triton's row the same in its fused epilogue, forward and backward."""
    inp = runner.make_inputs(suite.Case(TINY_4D, torch.float32, "NCHW"), device, residual=workload.residual)
    act = _TORCH_ACTIVATION[workload.activation]

    def by_hand(x, rm, rv, w, b, training, residual=None):
        y = F.batch_norm(x, rm, rv, w, b, training, impls.MOMENTUM, impls.EPS)
        return act(y if residual is None else y + residual)

    want = runner.run_train(by_hand, inp)
    for name in ("cudnn", "native", "bn_triton"):
        impl = impls.make_impl(name, workload.activation)
        with impl.active():
            got = runner.run_train(impl.fn, inp)
        assert set(got) == set(want)
        for k in want:
            torch.testing.assert_close(
                got[k], want[k], atol=1e-5, rtol=1e-5, msg=lambda m, k=k, n=name: f"{n} {k}: {m}"
            )
    ref = runner.reference(inp, workload.activation)
    ref_by_hand = runner.run_train(by_hand, inp.double())
    assert all(torch.equal(ref["train"][k], ref_by_hand[k]) for k in ref_by_hand)
    assert ref["eval"]["y"].dtype == torch.float64
    assert ("kinks" in ref) == (workload.activation in ("relu", "hardswish"))


def test_kinks_of_each_activation():
    assert runner.kinks(None) == runner.kinks("silu") == runner.kinks("gelu_tanh") == ()
    assert runner.kinks("relu") == runner.kinks("leaky_relu(0.2)") == (0.0,)
    assert runner.kinks("relu6") == (0.0, 6.0) and runner.kinks("hardswish") == (-3.0, 3.0)
    assert runner.kinks("elu(1.0)") == () and runner.kinks("elu(0.5)") == (0.0,)


@pytest.mark.parametrize(
    "workload, wrong",
    [(suite.SILU, None), (suite.SILU, "gelu"), (suite.HARDSWISH, "relu6"), (suite.FUSED, "leaky_relu(0.2)")],
    ids=["silu-as-none", "silu-as-gelu", "hardswish-as-relu6", "relu-as-leaky"],
)
def test_a_wrong_activation_fails_the_check(device, monkeypatch, workload, wrong):
    """bn_triton computing another activation than its workload's (or none) is wrong on every pass of
    the smoke's cases of that workload, and never timed; torch's rows on the same inputs pass."""
    real = impls.triton_bn
    monkeypatch.setattr(impls, "triton_bn", lambda *a, activation=None, **k: real(*a, activation=wrong, **k))
    settings = runner.Settings(device=torch.device(device), timing=False)
    rows = []
    runner.run_suite(
        suite.smoke_cases(workload), ["bn_triton", "native"], list(suite.PASSES), settings, rows, workload=workload
    )
    assert {r["status"] for r in rows if r["impl"] == "native"} == {"checked"}
    ours = [r for r in rows if r["impl"] == "bn_triton"]
    assert ours and {r["status"] for r in ours} == {"wrong"}, ours
    assert all(r["backend"] == "" and "allowance" in r["note"] for r in ours)


# ---------------------------------------------------------------- kinks: ReLU's mask, Hardswish's -3 and 3


def _near_zero_case(device, k=4):
    """fp32 inputs whose residual cancels BN's output to within rounding at k elements: there
    p = BN(x) + residual is a fraction of an ulp of BN(x), so a correct implementation may round
    it to either side of 0. Returns the case, the inputs, those elements and the float64 mask."""
    case = suite.Case(TINY_4D, torch.float32, "NCHW")
    inp = runner.make_inputs(case, device, residual=True)
    d = inp.double()
    z = F.batch_norm(d.x, None, None, d.weight, d.bias, True, 0.0, impls.EPS)
    idx = torch.arange(k, device=device) * 11
    inp.residual.view(-1)[idx] = (-z.reshape(-1)[idx]).float()
    mask = (z + inp.residual.double()) > 0
    return case, inp, idx, mask.view(-1)[idx]


class _ScaleGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, factor):
        ctx.factor = factor
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        return g * ctx.factor, None


def _flipping(idx, ref_mask, dx_scale=1.0):
    """relu(BN(x) + residual) whose ReLU mask is the opposite of float64's at ``idx`` in training (an
    implementation that rounded p to the other side of 0 there), and whose dx is scaled."""

    def fn(x, rm, rv, w, b, training, residual=None):
        p = F.batch_norm(_ScaleGrad.apply(x, dx_scale), rm, rv, w, b, training, impls.MOMENTUM, impls.EPS) + residual
        with torch.no_grad():
            mask = p > 0
            if training:
                mask.view(-1)[idx] = ~ref_mask
        return p * mask

    return fn


def _check_rows(device, monkeypatch, case, inp, fn, workload=suite.FUSED):
    """The rows of ``inp``: bn_triton's computed by ``fn`` (None: bn_triton itself), and torch's native."""
    monkeypatch.setattr(runner, "make_inputs", lambda *a, **k: inp)
    if fn is not None:
        real_make = impls.make_impl
        stand_in = lambda n, *a: impls.Impl(n, fn) if n == "bn_triton" else real_make(n, *a)
        monkeypatch.setattr(impls, "make_impl", stand_in)
    rows = []
    settings = runner.Settings(device=torch.device(device), timing=False)
    runner.run_case(case, ["bn_triton", "native"], ["fwd_bwd", "eval_fwd"], settings, rows, workload=workload)
    return {(r["impl"], r["pass"].removeprefix(workload.prefix)): r for r in rows}


def _relu_errors(inp, ref, out):
    torch_errs, _ = runner.errors(runner.run_train(impls.make_impl("cudnn", "relu").fn, inp), ref, "train")
    return torch_errs, runner.errors(out, ref, "train")


def test_relu_gate_accepts_mask_flips_within_rounding(device, monkeypatch):
    """A correct implementation whose ReLU input rounds to the other side of 0 at a few elements:
    compared element by element with float64, its d(residual) is off by a whole dy there (far past
    the allowance: the gate before it knew of the mask). Compared under its own mask where p is
    within rounding of 0, it passes, and the flips are counted in the row."""
    case, inp, idx, ref_mask = _near_zero_case(device)
    ref = runner.reference(inp, "relu")
    assert ref["kinks"]["near"].view(-1)[idx].all()
    assert torch.equal(ref["kinks"]["pre"].view(-1)[idx] > 0, ref_mask)
    fn = _flipping(idx, ref_mask)
    out = runner.run_train(fn, inp)
    torch_errs, (errs, flips) = _relu_errors(inp, ref, out)
    naive = {k: runner.rel_error(out[k], v) for k, v in ref["train"].items()}
    assert not runner.verdict(naive, torch_errs, torch.float32)[0]
    assert flips == len(idx)
    assert runner.verdict(errs, torch_errs, torch.float32)[0], errs

    rows = _check_rows(device, monkeypatch, case, inp, fn)
    assert rows["bn_triton", "fwd_bwd"]["status"] == "checked"
    assert rows["bn_triton", "fwd_bwd"]["mask_flips"] == len(idx)
    assert rows["bn_triton", "eval_fwd"]["mask_flips"] is None
    assert rows["native", "fwd_bwd"]["status"] == "checked"  # torch's kernels on the same inputs


def test_relu_gate_still_flags_real_errors(device, monkeypatch):
    """The tolerance covers flips within rounding of 0 and nothing else: dx off by 1% next to those
    flips, or a flip where p is far from 0, is wrong."""
    case = suite.Case(TINY_4D, torch.float32, "NCHW")
    inp = runner.make_inputs(case, device, residual=True)
    ref = runner.reference(inp, "relu")
    d = inp.double()
    p = F.batch_norm(d.x, None, None, d.weight, d.bias, True, 0.0, impls.EPS) + d.residual
    far = p.abs().view(-1).argmax().reshape(1)
    assert not ref["kinks"]["near"].view(-1)[far].any()
    out = runner.run_train(_flipping(far, p.view(-1)[far] > 0), inp)
    torch_errs, (errs, flips) = _relu_errors(inp, ref, out)
    assert flips == 0
    assert not runner.verdict(errs, torch_errs, torch.float32)[0]

    case, inp, idx, ref_mask = _near_zero_case(device)
    rows = _check_rows(device, monkeypatch, case, inp, _flipping(idx, ref_mask, dx_scale=1.01))
    assert rows["bn_triton", "fwd_bwd"]["status"] == "wrong"
    assert rows["bn_triton", "fwd_bwd"]["note"].startswith("dx error")
    assert rows["bn_triton", "eval_fwd"]["status"] == "checked"


def _near_kink_case(device):
    """fp32 inputs, no residual, whose BN(x) lies within rounding of Hardswish's kinks at one element
    per channel (3 in even channels, -3 in odd ones), found by Newton steps on x in float64 then
    rounded to fp32. Returns the case, the inputs, those elements, their kinks and which lie above
    them in float64."""
    case = suite.Case(TINY_4D, torch.float32, "NCHW")
    inp = runner.make_inputs(case, device)
    n, c, h, w = TINY_4D.dims
    idx = torch.arange(c, device=device) * h * w + w + 1  # (0, channel, 1, 1)
    kink = torch.tensor([3.0, -3.0] * c, dtype=torch.float64, device=device)[:c]
    x, weight, bias = inp.x.double(), inp.weight.double(), inp.bias.double()
    for _ in range(60):
        z = F.batch_norm(x, None, None, weight, bias, True, 0.0, impls.EPS)
        scale = weight / (x.var((0, 2, 3), unbiased=False) + impls.EPS).sqrt()
        x.view(-1)[idx] += (kink - z.view(-1)[idx]) / scale
    inp = inp._replace(x=x.float())
    p = F.batch_norm(inp.x.double(), None, None, weight, bias, True, 0.0, impls.EPS).view(-1)[idx]
    assert (p - kink).abs().max() < 1e-5
    return case, inp, idx, kink, p > kink


def _across(idx, kink, above, dx_scale=1.0):
    """hardswish(BN(x)) whose derivative at ``idx`` in training is taken just across ``kink`` from
    float64's side (``above``): an implementation that rounded BN(x) to the other side there; its
    values are hardswish(BN(x)) everywhere, and its dx is scaled."""

    def fn(x, rm, rv, w, b, training, residual=None):
        p = F.batch_norm(_ScaleGrad.apply(x, dx_scale), rm, rv, w, b, training, impls.MOMENTUM, impls.EPS)
        if not training:
            return F.hardswish(p)
        with torch.no_grad():
            shift = torch.zeros_like(p)
            shift.view(-1)[idx] = (kink + torch.where(above, -1e-6, 1e-6)).to(p.dtype) - p.view(-1)[idx]
        v = p + shift  # act'(v) in the backward, act(p) in the forward
        return F.hardswish(v) + (F.hardswish(p) - F.hardswish(v)).detach()

    return fn


def test_hardswish_gate_accepts_kink_flips_within_rounding(device, monkeypatch):
    """Hardswish without a residual: no d(residual) shows which side of -3 or 3 an implementation
    took, so the check reads g = dy * act' back from dx, dweight and dbias. A stand-in taking the
    other side at the elements within rounding of a kink is wrong element by element (its gradient
    there is off by dy / 2), and passes compared with float64 taking the same sides, its flips
    counted; bn_triton itself and torch pass on the same inputs."""
    case, inp, idx, kink, above = _near_kink_case(device)
    ref = runner.reference(inp, "hardswish")
    assert ref["kinks"]["near"].view(-1)[idx].all()
    assert torch.equal(ref["kinks"]["kink"].view(-1)[idx], kink)
    fn = _across(idx, kink, above)
    out = runner.run_train(fn, inp)
    torch_errs, _ = runner.errors(runner.run_train(impls.make_impl("cudnn", "hardswish").fn, inp), ref, "train")
    naive = {k: runner.rel_error(out[k], v) for k, v in ref["train"].items()}
    assert not runner.verdict(naive, torch_errs, torch.float32)[0]
    errs, flips = runner.errors(out, ref, "train")
    assert flips == len(idx)
    assert runner.verdict(errs, torch_errs, torch.float32)[0], errs

    rows = _check_rows(device, monkeypatch, case, inp, fn, suite.HARDSWISH)
    assert rows["bn_triton", "fwd_bwd"]["status"] == "checked"
    assert rows["bn_triton", "fwd_bwd"]["mask_flips"] == len(idx)
    assert rows["bn_triton", "eval_fwd"]["mask_flips"] is None
    assert rows["native", "fwd_bwd"]["status"] == "checked"
    monkeypatch.undo()
    rows = _check_rows(device, monkeypatch, case, inp, None, suite.HARDSWISH)
    assert {r["status"] for r in rows.values()} == {"checked"}, rows


def test_hardswish_gate_still_flags_real_errors(device, monkeypatch):
    """The tolerance covers sides taken within rounding of a kink and nothing else: the other
    region's derivative where BN(x) is far from both kinks, or dx off by 1% next to flips, is wrong."""
    inp = runner.make_inputs(suite.Case(TINY_4D, torch.float32, "NCHW"), device)
    ref = runner.reference(inp, "hardswish")
    assert not ref["kinks"]["near"].any()
    far = ref["kinks"]["pre"].view(-1).sub(ref["kinks"]["kink"].view(-1)).abs().argmax().reshape(1)
    out = runner.run_train(_across(far, torch.tensor([3.0], dtype=torch.float64), torch.tensor([False])), inp)
    torch_errs, _ = runner.errors(runner.run_train(impls.make_impl("cudnn", "hardswish").fn, inp), ref, "train")
    errs, flips = runner.errors(out, ref, "train")
    assert flips == 0
    assert not runner.verdict(errs, torch_errs, torch.float32)[0]

    case, inp, idx, kink, above = _near_kink_case(device)
    rows = _check_rows(device, monkeypatch, case, inp, _across(idx, kink, above, dx_scale=1.01), suite.HARDSWISH)
    assert rows["bn_triton", "fwd_bwd"]["status"] == "wrong"
    assert rows["bn_triton", "fwd_bwd"]["note"].startswith("dx error")
    assert rows["bn_triton", "eval_fwd"]["status"] == "checked"


# ---------------------------------------------------------------- writers


def _synthetic_rows():
    """Made-up times (not measurements) with known geomeans: bn_triton 1 ms wall, 0.4 ms host and
    0.5 ms device everywhere; torch eager (cudnn) 0.1 ms host and 0.5 or 2 ms device."""
    times = {("64@56", "cudnn"): 2.0, ("64@56", "native"): 8.0, ("2048@7", "cudnn"): 0.5, ("2048@7", "native"): 2.0}
    device = {"64@56": 2.0, "2048@7": 0.5}
    rows = []
    for shape in ("64@56", "2048@7"):
        case = suite.Case(suite.SUITE_BY_NAME[shape], torch.bfloat16, "channels_last")
        for impl in ("bn_triton", "cudnn", "native"):
            ms = 1.0 if impl == "bn_triton" else times[shape, impl]
            host, dev = (0.4, 0.5) if impl == "bn_triton" else (0.1, device[shape])
            nbytes = traffic.model_bytes("fwd_bwd", case.shape.dims, case.dtype)
            g = traffic.gbps(nbytes, ms)
            rows.append(
                runner.make_row(case, impl, "fwd_bwd", ms=ms, ms_p20=ms, ms_p80=ms, gbps=g, pct_copy_bw=g / 3000.0,
                                host_ms=host, device_ms=dev, backend="native" if impl == "cudnn" else impl,
                                status="ok", err_ratio=0.1)
            )  # fmt: skip
        rows.append(runner.make_row(case, "compile", "fwd_bwd", status="error", note="RuntimeError: boom"))
    return rows


def test_csv_summary_and_tables(tmp_path):
    rows = report.add_speedups(_synthetic_rows())
    rows[1]["device_ms"] = math.nan  # a failed capture: blank in the CSV
    path = report.write_csv(rows, str(tmp_path / "results.csv"))
    with open(path, newline="") as f:
        header = next(csv.reader(f))
    assert header == report.CSV_COLUMNS
    for col in ("impl", "pass", "dtype", "layout", "shape", "ms", "host_ms", "device_ms", "gbps", "pct_copy_bw"):
        assert col in header
    with open(path, newline="") as f:
        back = list(csv.DictReader(f))
    assert len(back) == len(rows)
    assert {r["impl"] for r in back} == {"bn_triton", "cudnn", "native", "compile"}
    assert all(0 < float(r["pct_copy_bw"]) < 1000 for r in back if r["status"] == "ok")
    assert float(back[0]["pct_copy_bw"]) == rows[0]["pct_copy_bw"]  # floats written exactly
    assert back[0]["host_ms"] == "0.4" and back[1]["device_ms"] == ""  # NaN: blank
    assert back[-1]["ms"] == "" and back[-1]["status"] == "error"

    # Geomean speedups vs cudnn geomean(2, 0.5) and vs native geomean(8, 2), compile never timed;
    # bn_triton's median fraction of copy bandwidth; its worst shape against the fastest baseline.
    (line,) = report.summary_table(rows).splitlines()[2:]
    cells = [c.strip() for c in line.split("|")[1:-1]]
    assert cells[:7] == ["bfloat16", "channels_last", "fwd_bwd", "2", "1.00x", "4.00x", ""]
    assert cells[7:] == ["27%", "", "2048@7 (0.50x vs cudnn)"]
    detail = report.detail_table(rows)
    assert "(native)" in detail  # cudnn's row names the backend that really ran
    assert "0.4000" in detail  # bn_triton's host time
    assert "error, 2 rows (compile; fwd_bwd bfloat16/channels_last 64@56; " in report.problem_lines(rows)
    text, code = report.summary(rows, "## title", elapsed_s=2.0)
    assert text.startswith("## title\n\n" + detail) and report.cost_split_table(rows) in text
    assert text.endswith(f"\n\n{len(rows)} rows in 2 s.\n{report.verdict(rows)[0]}\n") and code == 0


def test_cost_split_geomeans_against_torch_eager():
    """bn_triton / torch eager (the cudnn row) per pass: wall geomean(1/2, 1/0.5) = 1, host 4,
    device geomean(0.25, 1) = 0.5; a device time that is missing leaves the geomean to the rest."""
    rows = _synthetic_rows()
    table = report.cost_split_table(rows)
    assert table.splitlines()[2].split("|")[1:-1] == [" fwd_bwd ", " 2      ", " 1.00x ", " 4.00x ", " 0.50x  "]
    rows[1]["device_ms"] = math.nan
    assert "| 1.00x | 4.00x | 1.00x" in report.cost_split_table(rows)


def test_problems_are_listed_once_each_with_their_row_count():
    case = suite.Case(TINY_4D, torch.float32, "NCHW")
    note = "ImportError: cannot import name 'kernels'"
    rows = [runner.make_row(case, i, p, status="error", note=note) for p in suite.PASSES for i in impls.IMPLS]
    rows.append(runner.make_row(case, "compile", "bwd", status="wrong", note="dx error is 3x the allowance"))
    lines = report.problem_lines(rows).splitlines()
    assert lines == [
        f"- error, 16 rows (bn_triton, cudnn, native, compile; 4 inputs and passes): {note}",
        "- wrong, 1 row (compile; bwd float32/NCHW 3x5x4x3): dx error is 3x the allowance",
    ]


def test_verdict_line():
    case = suite.Case(TINY_4D, torch.float32, "NCHW")

    def rows(*statuses):
        return [
            runner.make_row(case, i, "bwd", status=s) for i, s in zip(("bn_triton", "cudnn"), statuses, strict=True)
        ]

    assert report.verdict(rows("checked", "checked")) == (
        "verdict: PASS: all 1 bn_triton rows checked against float64; 2 rows: 2 checked; exit status 0",
        0,
    )
    line, code = report.verdict(rows("ok", "error"))
    assert code == 0 and line.startswith("verdict: PASS") and "1 ok, 1 error" in line
    line, code = report.verdict(rows("wrong", "ok"))
    assert code == 1 and line.startswith("verdict: FAIL: 1 of 1 bn_triton rows wrong or raised")
    assert line.endswith("; 2 rows: 1 wrong, 1 ok; exit status 1")
    line, code = report.verdict(rows("skipped", "skipped"))
    assert code == 0 and line.startswith("verdict: INCOMPLETE: 0 of 1 bn_triton rows checked")
    assert report.verdict(rows("ok", "ok"), interrupted=True)[1] == 130


def test_plots_are_pngs(tmp_path):
    pytest.importorskip("matplotlib")
    rows = report.add_speedups(_synthetic_rows())
    paths = report.write_plots(rows, str(tmp_path), copy_gbps=3000.0, device_name="synthetic")
    assert paths == [str(tmp_path / "overview.png")]
    with open(paths[0], "rb") as f:
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


def test_stub_replaces_every_kernel_and_restores(device):
    import triton

    import bn_triton
    from bn_triton import kernels

    before = {n: getattr(kernels, n) for n in kernels.__all__}
    x = torch.randn(4, 3, 5, device=device)
    log = []
    with stub.stubbed_kernels(log.append) as originals:
        assert originals and set(originals) == {
            n for n, k in before.items() if isinstance(k, triton.runtime.jit.KernelInterface)
        }
        assert all(getattr(kernels, n) is not k for n, k in originals.items())
        bn_triton.batch_norm(x, None, None, training=True)
    assert log and {ln.name for ln in log} <= set(originals)
    assert all(isinstance(ln.args, tuple) and isinstance(ln.kwargs, dict) for ln in log)
    assert all(getattr(kernels, n) is k for n, k in before.items())
    y = bn_triton.batch_norm(x, None, None, training=True)  # the real kernels again
    torch.testing.assert_close(y, F.batch_norm(x, None, None, training=True), atol=1e-5, rtol=1e-5)


def _run(request, *args, timeout=300):
    root = str(request.config.rootpath)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([root, os.environ.get("PYTHONPATH", "")]))
    return subprocess.run([sys.executable, *args], cwd=root, env=env, capture_output=True, text=True, timeout=timeout)


def test_cli_smoke(tmp_path, request):
    """``python -m bench`` without a GPU (``--smoke`` with one): every implementation checked on
    tiny inputs, backends recorded, nothing timed, exit 0, as many rows as the header says, a
    verdict line last, files written to --out."""
    proc = _run(request, "-m", "bench", "--out", str(tmp_path), *(["--smoke"] if torch.cuda.is_available() else []))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    if not torch.cuda.is_available():
        assert "timings need a CUDA GPU" in proc.stdout
    with open(tmp_path / "results.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    by_workload = {w.prefix: [] for w in suite.WORKLOADS}
    for r in rows:
        by_workload[next(w for w in reversed(by_workload) if r["pass"].startswith(w))].append(r)
    assert len(by_workload[""]) == 3 * 4 * 4  # smoke cases x passes x implementations
    assert len(by_workload["fused_"]) == 2 * 4 * 4  # the 4-D smoke cases get the fused BN -> add -> ReLU rows too
    # BN -> SiLU and BN -> Hardswish on one case each
    assert {(r["dtype"], r["layout"], r["shape"]) for r in by_workload["silu_"]} == {("float32", "NCHW", "4x6x5x5")}
    assert {(r["dtype"], r["layout"]) for r in by_workload["hardswish_"]} == {("bfloat16", "channels_last")}
    assert len(by_workload["silu_"]) == len(by_workload["hardswish_"]) == 4 * 4
    assert all((r["mask_flips"] == "") == r["pass"].endswith("eval_fwd") for r in by_workload["hardswish_"])
    assert {r["mask_flips"] for r in by_workload["silu_"]} == {""}  # no kink
    header = "(3 cases + 2 fused cases + 1 silu case + 1 hardswish case) x 4 passes x 4 implementations = 112 rows"
    assert header in proc.stdout
    assert {r["status"] for r in rows} == {"checked"}
    assert all(r["ms"] == r["gbps"] == r["host_ms"] == "" for r in rows)
    assert {r["backend"] for r in rows if r["impl"] == "bn_triton"} == {"bn_triton"}
    assert {r["backend"] for r in rows if r["impl"] == "compile"} == {"inductor"}
    assert {r["backend"] for r in rows if r["impl"] == "native"} == {"native"}
    with open(tmp_path / "env.json") as f:
        assert json.load(f)["smoke"] is True
    summary = (tmp_path / "summary.md").read_text()
    assert summary.startswith("## Smoke")
    verdict = "verdict: PASS: all 28 bn_triton rows checked against float64; 112 rows: 112 checked; exit status 0"
    assert summary.rstrip().endswith(verdict)
    assert proc.stdout.rstrip().endswith(verdict)


def test_cli_failure_lists_each_error_once(monkeypatch, capsys):
    """When bn_triton raises, the output names that error once with its row count, the verdict
    says FAIL, the exit status is 1, and the header's row count is what came out."""
    from bench.__main__ import main

    def broken(*args, **kwargs):
        raise ImportError("cannot import name 'kernels'")

    monkeypatch.setattr(impls, "triton_bn", broken)
    argv = ["--smoke", "--impls", "bn_triton,native", "--passes", "train_fwd,eval_fwd"]
    assert main(argv) == 1
    out = capsys.readouterr().out
    assert "(3 cases + 2 fused cases + 1 silu case + 1 hardswish case) x 2 passes x 2 implementations = 28 rows" in out
    assert "\n28 rows in " in out
    problems = [line for line in out.splitlines() if line.startswith("- ")]
    assert problems == ["- error, 14 rows (bn_triton; 14 inputs and passes): ImportError: cannot import name 'kernels'"]
    assert out.rstrip().endswith(
        "verdict: FAIL: 14 of 14 bn_triton rows wrong or raised; 28 rows: 14 error, 14 checked; exit status 1"
    )


def test_no_fused_runs_the_plain_rows_only(capsys):
    from bench.__main__ import main

    assert main(["--smoke", "--no-fused", "--impls", "bn_triton", "--passes", "eval_fwd"]) == 0
    out = capsys.readouterr().out
    assert "(3 cases) x 1 passes x 1 implementations = 3 rows" in out
    assert "fused_" not in out and "silu_" not in out and "hardswish_" not in out


def test_model_flag_runs_the_e2e_bench(monkeypatch):
    import bench
    from bench.__main__ import main

    seen = []
    fake = types.SimpleNamespace(main=lambda argv: seen.append(argv) or 7)
    monkeypatch.setattr(bench, "e2e", fake, raising=False)
    monkeypatch.setitem(sys.modules, "bench.e2e", fake)
    assert main(["--model", "resnet50", "--out", "/tmp/x"]) == 7
    smoke = [] if torch.cuda.is_available() else ["--smoke"]
    assert seen == [["--model", "resnet50", "--out", "/tmp/x"] + smoke]


def test_overhead_script_with_stubbed_kernels(request):
    """Times beside the empty autograd.Function and torch, then the Python calls and allocations per
    call of each row (bench/counts.py)."""
    proc = _run(request, "bench/overhead.py", "--stub", "--calls", "2", "--repeats", "1", timeout=120)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "kernels stubbed" in proc.stdout
    names = [
        "batch_norm train forward (grad)",
        "batch_norm eval forward (no_grad)",
        "batch_norm forward + backward",
        "BatchNorm2d train step",
    ]
    timed = [line for line in proc.stdout.splitlines() if line.endswith("x")]
    assert [line.split("  ")[0] for line in timed] == names
    counted = proc.stdout.split("Python calls / tensor allocations per call")[1].splitlines()[2:]
    assert [line.split("  ")[0] for line in counted] == names
    for line in counted:  # "name   calls / allocations" for bn_triton, empty, torch
        assert len(re.findall(r"\d+ / \d+", line)) == 3, line


def test_overhead_decompose_needs_a_gpu(request):
    if torch.cuda.is_available():
        pytest.skip("on a GPU the decomposition runs in bench/gpu_check.sh")
    proc = _run(request, "bench/overhead.py", "--decompose", timeout=120)
    assert proc.returncode == 2 and "there is none here" in proc.stdout


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
