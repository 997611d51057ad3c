"""bench/e2e.py (``python -m bench.e2e``): the end-to-end training-step bench, by its smoke.

The smoke is the same code path as the ResNet-50 run (deepcopy, convert, compile, autocast,
channels_last, SGD steps, loss check, CSV) on a tiny net; on a GPU the real run is in
bench/gpu_check.sh, not here.
"""

import csv
import os
import subprocess
import sys

import pytest

from bench import e2e

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _read(path):
    with open(path, newline="") as f:
        return list(csv.reader(f))


def test_smoke_runs_every_variant_and_writes_the_csv(tmp_path):
    """The command line as gpu_check.sh and ``python -m bench --model`` call it (with --smoke, so a
    GPU machine runs the tiny net too): exit 0, one row per config x variant, exact columns, the
    losses checked against torch eager's."""
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
    assert tuple(rows[0]) == ("model", "config", "variant", "batch", "step_ms")
    got = {(r[1], r[2]) for r in rows[1:]}
    assert got == {(c, v) for c in e2e.CONFIGS for v in e2e.VARIANTS}
    assert {r[0] for r in rows[1:]} == {"tinynet"}
    assert {r[3] for r in rows[1:]} == {"2"}
    assert {r[4] for r in rows[1:]} == {""}, "the smoke reports no times"
    assert "no time is meaningful" in proc.stdout
    text = md.read_text()
    assert text.count(": ok") == 6, text  # 3 variants x 2 configs against torch eager's loss
    assert "DISAGREES" not in text and "Errors" not in text


def test_without_torchvision_it_says_so_and_exits_0(monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "torchvision", None)  # import torchvision raises ImportError
    monkeypatch.setitem(sys.modules, "torchvision.models", None)
    assert e2e.main(["--model", "resnet50", "--out", str(tmp_path)]) == 0
    assert e2e.NO_TORCHVISION in capsys.readouterr().out
    assert not (tmp_path / "e2e.csv").exists()


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


def _result(config, variant, ms, loss, error=None):
    return e2e.Result(config, variant, 64, step_ms=ms, first_loss=loss, error=error)


def test_table_speedups_and_loss_verdicts(tmp_path):
    """Speedup = torch's step time / bn_triton's, eager with eager and compiled with compiled; a
    bn_triton loss outside the allowance is flagged, and makes the CSV skip errored rows only."""
    results = [
        _result("fp32_nchw", "torch", 40.0, 6.9),
        _result("fp32_nchw", "bn_triton", 32.0, 6.9 * (1 + 5e-5)),
        _result("fp32_nchw", "torch_compile", 30.0, 6.9),
        _result("fp32_nchw", "bn_triton_compile", 60.0, 7.5),
        _result("bf16_cl", "torch", 35.0, 6.9),
        _result("bf16_cl", "bn_triton", None, None, error="RuntimeError: boom"),
    ]
    text = e2e.table("resnet50", results, [("bf16_cl", "torch_compile")], smoke=False, device_name="GPU")
    assert "| fp32_nchw | bn_triton | 64 | 32.00 | 1.25x |" in text
    assert "| fp32_nchw | bn_triton_compile | 64 | 60.00 | 0.50x |" in text
    assert "fp32_nchw bn_triton: loss" in text and "fp32_nchw bn_triton_compile: loss" in text
    assert text.count("DISAGREES") == 1  # bn_triton_compile's 7.5 against 6.9
    assert "- bf16_cl bn_triton: RuntimeError: boom" in text
    assert "Not run (time budget spent): bf16_cl torch_compile" in text
    e2e.write_csv(str(tmp_path / "e2e.csv"), "resnet50", results)
    rows = _read(tmp_path / "e2e.csv")
    assert rows[0] == ["model", "config", "variant", "batch", "step_ms"]
    assert rows[1] == ["resnet50", "fp32_nchw", "torch", "64", "40.000"]
    assert len(rows) == 1 + 5  # the errored run has no row


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
    assert "Not run (interrupted): fp32_nchw torch_compile, fp32_nchw bn_triton_compile" in out
    assert [r[2] for r in _read(tmp_path / "e2e.csv")[1:]] == ["torch", "bn_triton"]
