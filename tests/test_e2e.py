"""bench/e2e.py (``python -m bench.e2e``): the end-to-end training-step bench, by its smoke.

The smoke is the same code path as the ResNet-50 run (deepcopy, convert, fuse, compile, autocast,
channels_last, SGD steps, loss check, launch counts, CSV) on a tiny net; CUDA graphs only where CUDA
is (else they are skipped, with the reason); on a GPU the real run is in bench/gpu_check.sh, not here.
"""

import csv
import os
import subprocess
import sys

import pytest
import torch

from bench import e2e

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _read(path):
    with open(path, newline="") as f:
        return list(csv.reader(f))


def test_smoke_runs_every_variant_and_writes_the_csv(tmp_path):
    """The command line as gpu_check.sh and ``python -m bench --model`` call it (with --smoke, so a
    GPU machine runs the tiny net too): exit 0, one row per config x variant that can run here
    (CUDA graphs need CUDA), exact columns, the losses checked against torch eager's, the fused
    variant fused every pattern (BN -> ReLU, BN -> add -> ReLU, BN -> SiLU) and launches fewer kernels
    than the unfused one."""
    md = tmp_path / "e2e.md"
    proc = subprocess.run(
        [sys.executable, "-m", "bench.e2e", "--smoke", "--out", str(tmp_path), "--md", str(md)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = _read(tmp_path / "e2e.csv")
    assert tuple(rows[0]) == ("model", "config", "variant", "batch", "step_ms", "launches")
    cuda = torch.cuda.is_available()
    ran = [v for v in e2e.VARIANTS if cuda or not v.endswith("_graph")]
    got = {(r[1], r[2]) for r in rows[1:]}
    assert got == {(c, v) for c in e2e.CONFIGS for v in ran}
    assert {r[0] for r in rows[1:]} == {"tinynet"}
    assert {r[3] for r in rows[1:]} == {"2"}
    assert {r[4] for r in rows[1:]} == {""}, "the smoke reports no times"
    launches = {(r[1], r[2]): int(r[5]) for r in rows[1:]}
    for config in e2e.CONFIGS:
        assert 0 < launches[config, "bn_triton_fused"] < launches[config, "bn_triton"], launches
    assert "no time is meaningful" in proc.stdout
    text = md.read_text()
    assert text.count(": ok") == len(e2e.CONFIGS) * (len(ran) - 1), text  # every variant against torch eager's
    assert "DISAGREES" not in text and "Errors" not in text
    fused = "fused 4 of 5 BatchNorm layers: 2 into relu, 1 into add + relu, 1 into silu; left 1: bn_feat"
    assert f"- bf16_cl, fp32_nchw: {fused}" in text
    if not cuda:
        assert f"Skipped ({e2e.NO_CUDA_GRAPHS}): bf16_cl torch_graph, bf16_cl bn_triton_graph" in text
        assert "| fp32_nchw | bn_triton_fused_graph | 2 | skipped |" in text


def test_without_torchvision_it_says_so_and_exits_0(monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "torchvision", None)  # import torchvision raises ImportError
    monkeypatch.setitem(sys.modules, "torchvision.models", None)
    assert e2e.main(["--model", "resnet50", "--out", str(tmp_path)]) == 0
    assert e2e.NO_TORCHVISION in capsys.readouterr().out
    assert not (tmp_path / "e2e.csv").exists()


def test_the_interpreter_is_on_before_the_model_is_built(monkeypatch, capsys):
    """torchvision imports triton, whose own @triton.jit functions read TRITON_INTERPRET when they are
    made: the smoke switches the interpreter on before it builds a torchvision model."""
    order = []
    monkeypatch.setattr(e2e, "start_smoke", lambda *args: order.append("start_smoke"))
    monkeypatch.setattr(e2e, "build_model", lambda name: order.append(name))  # None: as without torchvision
    assert e2e.main(["--smoke", "--model", e2e.SILU_MODEL]) == 0
    assert order == ["start_smoke", "efficientnet_b0"]
    assert e2e.NO_TORCHVISION in capsys.readouterr().out


@pytest.mark.parametrize(
    "argv", [["--configs", "fp16_cl"], ["--variants", "torch,jax"], ["--model", "tinynet", "--configs", ","]]
)
def test_bad_arguments_exit_2(argv, capsys):
    assert e2e.main(argv + ["--smoke"]) == 2
    assert "python -m bench.e2e:" in capsys.readouterr().err


def test_budget_spent_runs_nothing_and_says_so(tmp_path, capsys):
    assert e2e.main(["--smoke", "--budget-s", "-1", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "Not run (time budget spent)" in out and "bf16_cl torch" in out
    assert _read(tmp_path / "e2e.csv") == [list(e2e.COLUMNS)]


def _result(config, variant, ms, loss, error=None, launches=None, skipped=None):
    return e2e.Result(config, variant, 64, step_ms=ms, first_loss=loss, error=error, launches=launches, skipped=skipped)


def test_table_speedups_and_loss_verdicts(tmp_path):
    """Speedup = the baseline's step time / the variant's: torch for bn_triton and bn_triton_fused,
    torch_compile for bn_triton_compile, torch_graph for the graph variants; a bn_triton loss outside
    the allowance is flagged; the CSV skips errored and skipped rows only."""
    results = [
        _result("fp32_nchw", "torch", 40.0, 6.9, launches=900),
        _result("fp32_nchw", "bn_triton", 32.0, 6.9 * (1 + 5e-5), launches=950),
        _result("fp32_nchw", "bn_triton_fused", 25.0, 6.9, launches=800),
        _result("fp32_nchw", "torch_graph", 30.0, 6.9),
        _result("fp32_nchw", "bn_triton_graph", 24.0, 6.9),
        _result("fp32_nchw", "bn_triton_fused_graph", 20.0, 6.9),
        _result("fp32_nchw", "torch_compile", 30.0, 6.9),
        _result("fp32_nchw", "bn_triton_compile", 60.0, 7.5),
        _result("bf16_cl", "torch", 35.0, 6.9),
        _result("bf16_cl", "bn_triton", None, None, error="RuntimeError: boom"),
        _result("bf16_cl", "torch_graph", None, None, skipped=e2e.NO_CUDA_GRAPHS),
    ]
    text = e2e.table("resnet50", results, [("bf16_cl", "torch_compile")], smoke=False, device_name="GPU")
    assert "| fp32_nchw | bn_triton | 64 | 32.00 | 1.25x | 950 |" in text
    assert "| fp32_nchw | bn_triton_fused | 64 | 25.00 | 1.60x | 800 |" in text
    assert "| fp32_nchw | torch_graph | 64 | 30.00 |  |  |" in text
    assert "| fp32_nchw | bn_triton_graph | 64 | 24.00 | 1.25x |" in text
    assert "| fp32_nchw | bn_triton_fused_graph | 64 | 20.00 | 1.50x |" in text
    assert "| fp32_nchw | bn_triton_compile | 64 | 60.00 | 0.50x |" in text
    assert "| bf16_cl | torch_graph | 64 | skipped |" in text
    assert "fp32_nchw bn_triton: loss" in text and "fp32_nchw bn_triton_compile: loss" in text
    assert text.count("DISAGREES") == 1  # bn_triton_compile's 7.5 against 6.9
    assert "- bf16_cl bn_triton: RuntimeError: boom" in text
    assert f"Skipped ({e2e.NO_CUDA_GRAPHS}): bf16_cl torch_graph" in text
    assert "Not run (time budget spent): bf16_cl torch_compile" in text
    e2e.write_csv(str(tmp_path / "e2e.csv"), "resnet50", results)
    rows = _read(tmp_path / "e2e.csv")
    assert rows[0] == ["model", "config", "variant", "batch", "step_ms", "launches"]
    assert rows[1] == ["resnet50", "fp32_nchw", "torch", "64", "40.000", "900"]
    assert rows[4] == ["resnet50", "fp32_nchw", "torch_graph", "64", "30.000", ""]
    assert len(rows) == 1 + 9  # the errored and the skipped run have no row


def test_sigterm_keeps_the_rows_so_far_and_exits_130(monkeypatch, tmp_path, capsys):
    """`timeout` sends SIGTERM: the run stops like Ctrl-C, the CSV keeps the variants that ran, the
    table lists the rest, and no handler is left behind. The variants are faked (no model runs)."""
    import signal

    calls = []

    def fake_run_variant(res, *args):
        calls.append(res.variant)
        if len(calls) == 3:
            os.kill(os.getpid(), signal.SIGTERM)
        return res

    handler = signal.getsignal(signal.SIGTERM)
    monkeypatch.setattr(e2e, "run_variant", fake_run_variant)
    assert e2e.main(["--smoke", "--configs", "fp32_nchw", "--out", str(tmp_path)]) == 130
    assert signal.getsignal(signal.SIGTERM) is handler
    out = capsys.readouterr().out
    not_run = "bn_triton_fused, fp32_nchw torch_graph, fp32_nchw bn_triton_graph, fp32_nchw bn_triton_fused_graph"
    assert f"Not run (interrupted): fp32_nchw {not_run}, fp32_nchw torch_compile, fp32_nchw bn_triton_compile" in out
    assert [r[2] for r in _read(tmp_path / "e2e.csv")[1:]] == ["torch", "bn_triton"]
