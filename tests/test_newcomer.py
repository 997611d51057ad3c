"""A newcomer's path, as the README gives it: clone, install, run the two commands.

Each case runs in a fresh venv that sees this interpreter's torch and triton (tests/installs.py) and
holds its own bn_triton, with a copy of the repository as the clone:

* ``pip install .`` (the wheel), then both commands from the clone's root. The clone's bn_triton/
  comes first on sys.path and shadows the installed one; its kernels must come from the clone's
  kernels/ (bn_triton/_loader.py), never fail as a "circular import".
* the same wheel from a folder outside the clone: ``python -m bn_triton`` and the benchmark, which
  the wheel ships as ``bn_triton.bench`` (``bench`` and ``kernels`` are other PyPI packages' names,
  so neither is installed at the top level): ``python -m bn_triton.bench``, as the README says.
* ``pip install -e .``, then both commands from the clone's root.

Both commands are run as a user types them (no TRITON_INTERPRET: without a GPU they turn the
interpreter on themselves; on a GPU the benchmark gets --smoke, not minutes of timing). Each takes
10 to 45 s on the 2-core CPU machines, so each case runs them once. Also: ``--help`` of both
entry points, the late-TRITON_INTERPRET error and the error for a bn_triton folder without kernels.
"""

import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.installs import CAN_BUILD, CANNOT_BUILD_REASON, ROOT, build_wheel, clean_env, copy_clone, fresh_venv
from tests.installs import pip_install as _pip_install

needs_build = pytest.mark.skipif(not CAN_BUILD, reason=CANNOT_BUILD_REASON)

# Where bn_triton and its kernels were imported from, as "<bn_triton folder>|<kernels folder>".
_WHERE = (
    "import os, bn_triton, bn_triton.kernels as k; "
    "print(os.path.dirname(bn_triton.__file__) + '|' + os.path.dirname(k.__file__))"
)


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def _run(py: Path, args: list, cwd: Path, timeout: int = 300, **env) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(py), *args], cwd=cwd, env=clean_env(**env), capture_output=True, text=True, timeout=timeout
    )


def _where(py: Path, cwd: Path, **env) -> tuple[Path, Path]:
    res = _run(py, ["-c", _WHERE], cwd, timeout=120, **env)
    assert res.returncode == 0, res.stdout + res.stderr
    pkg, kernels = res.stdout.strip().splitlines()[-1].split("|")
    return Path(pkg).resolve(), Path(kernels).resolve()


def _both_commands(py: Path, cwd: Path, bench: str = "bench") -> None:
    """``python -m bn_triton`` and ``python -m <bench>`` from ``cwd``: both exit 0 with their verdicts."""
    res = _run(py, ["-m", "bn_triton"], cwd)
    out = res.stdout + res.stderr
    assert res.returncode == 0, out[-4000:]
    assert "all checks passed" in res.stdout, out[-4000:]
    assert "circular import" not in out
    # On a GPU `python -m bench` would time all of suite v1 (minutes); --smoke runs the same imports and
    # checks on tiny inputs, which is what it runs anyway without a GPU.
    bench_args = ["-m", bench, "--smoke"] if _cuda() else ["-m", bench]
    res = _run(py, bench_args, cwd, timeout=400)
    out = res.stdout + res.stderr
    assert res.returncode == 0, out[-4000:]  # 0: every bn_triton row passed its check
    assert "bn_triton" in res.stdout, out[-4000:]
    assert "circular import" not in out


@pytest.fixture(scope="module")
def clone(tmp_path_factory) -> Path:
    return copy_clone(tmp_path_factory.mktemp("newcomer") / "bn_triton")


@pytest.fixture(scope="module")
def wheel_venv(clone, tmp_path_factory) -> Path:
    """A venv with the wheel installed: ``pip install .``, from a copy of the clone (so the clone stays
    as cloned: no build/ in it)."""
    if not CAN_BUILD:
        pytest.skip(CANNOT_BUILD_REASON)
    tmp = tmp_path_factory.mktemp("wheel")
    wheel = build_wheel(copy_clone(tmp / "src"), tmp / "dist")
    py = fresh_venv(tmp / "venv")
    _pip_install(py, str(wheel))
    return py


@needs_build
def test_pip_install_dot_then_both_commands_from_the_clone(wheel_venv, clone):
    installed = Path(
        _run(wheel_venv, ["-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], clone).stdout.strip()
    )
    assert (installed / "bn_triton" / "kernels" / "__init__.py").is_file()
    # The clone's code runs, all of it: its bn_triton/ shadows the wheel, and the kernels match.
    assert _where(wheel_venv, clone) == (clone / "bn_triton", clone / "kernels")
    _both_commands(wheel_venv, clone)


@needs_build
def test_wheel_runs_from_outside_the_clone(wheel_venv, clone, tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    pkg, kernels = _where(wheel_venv, elsewhere)
    assert not pkg.is_relative_to(clone.resolve()) and kernels == pkg / "kernels", (pkg, kernels)
    assert pkg.is_relative_to(Path(str(wheel_venv.parent.parent)).resolve()), pkg
    # The benchmark as the wheel ships it.
    _both_commands(wheel_venv, elsewhere, bench="bn_triton.bench")


@needs_build
def test_pip_install_editable_then_both_commands_from_the_clone(tmp_path):
    clone = copy_clone(tmp_path / "bn_triton")
    py = fresh_venv(tmp_path / "venv")
    _pip_install(py, "--no-build-isolation", "-e", str(clone))
    assert _where(py, clone) == (clone / "bn_triton", clone / "kernels")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    assert _where(py, elsewhere) == (clone / "bn_triton", clone / "kernels")  # editable: the clone from anywhere
    _both_commands(py, clone)


@needs_build
def test_bn_triton_folder_without_kernels_says_so(wheel_venv, clone, tmp_path):
    """A stray copy of bn_triton/ (no kernels inside or beside it) shadowing the wheel: a clear error."""
    shutil.copytree(clone / "bn_triton", tmp_path / "bn_triton", ignore=shutil.ignore_patterns("__pycache__"))
    for args in (["-c", "import bn_triton"], ["-m", "bn_triton"]):
        res = _run(wheel_venv, args, tmp_path, timeout=120)
        assert res.returncode != 0
        assert "has no Triton kernels" in res.stderr and "kernels/" in res.stderr, res.stderr[-3000:]
        assert "circular" not in res.stderr, res.stderr[-3000:]


# ---------------------------------------------------------------- --help of both entry points


@pytest.mark.parametrize("module", ["bn_triton", "bench"])
def test_help_describes_and_exits_without_running(module):
    res = subprocess.run(
        [sys.executable, "-m", module, "--help"], cwd=ROOT, env=clean_env(), capture_output=True, text=True, timeout=120
    )
    assert res.returncode == 0, res.stdout + res.stderr
    assert res.stdout.startswith(f"usage: python -m {module}"), res.stdout[:500]
    assert "all checks passed" not in res.stdout and "| bn_triton |" not in res.stdout  # nothing ran
    if module == "bn_triton":
        assert "float64" in res.stdout and "Exit status" in res.stdout


# ---------------------------------------------------------------- TRITON_INTERPRET set too late

_LATE = textwrap.dedent(
    """
    import os, sys
    import torch
    import bn_triton
    from bn_triton import launch

    x = torch.randn(4, 3, 5)
    y = bn_triton.BatchNorm1d(3)(x)  # interpreter off: CPU tensors use torch's own batch_norm
    assert sum(launch.LAUNCHES.values()) == 0 and not bn_triton.functional.uses_triton(x)
    torch.testing.assert_close(y, torch.nn.functional.batch_norm(x, None, None, training=True))
    os.environ["TRITON_INTERPRET"] = "1"  # too late: the kernels were built without the interpreter
    for call in (lambda: bn_triton.BatchNorm1d(3)(x), lambda: bn_triton.batch_norm(x, None, None, training=True)):
        try:
            call()
        except RuntimeError as e:
            print("RAISED", e)
        else:
            sys.exit("no error")
    """
)


def test_interpreter_switched_on_after_import_raises_a_clear_error():
    res = subprocess.run(
        [sys.executable, "-c", _LATE], cwd=ROOT, env=clean_env(), capture_output=True, text=True, timeout=120
    )
    assert res.returncode == 0, res.stdout + res.stderr
    errors = [line for line in res.stdout.splitlines() if line.startswith("RAISED")]
    assert len(errors) == 2, res.stdout
    for line in errors:
        assert "before importing bn_triton" in line and "TRITON_INTERPRET=1" in line, line
        assert "active drivers" not in line, line


def test_interpreter_switched_on_before_import_runs_our_kernels_on_cpu():
    check = (
        "import torch, bn_triton; from bn_triton import launch; "
        "bn_triton.BatchNorm1d(3)(torch.randn(4, 3, 5)); "
        "assert launch.LAUNCHES['stats'] + launch.LAUNCHES['forward'] > 0; print('ok')"
    )
    env = clean_env(TRITON_INTERPRET="1")
    res = subprocess.run([sys.executable, "-c", check], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and res.stdout.strip() == "ok", res.stdout + res.stderr


def test_no_top_level_kernels_module_is_imported(tmp_path):
    """The clone's kernels/ loads as bn_triton.kernels: no module named `kernels` appears."""
    check = "import sys, bn_triton; assert 'kernels' not in sys.modules; print(bn_triton.kernels.__name__)"
    env = clean_env(TRITON_INTERPRET="1")
    res = subprocess.run([sys.executable, "-c", check], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and res.stdout.strip() == "bn_triton.kernels", res.stdout + res.stderr
