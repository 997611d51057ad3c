"""Helpers of the install tests (test_packaging.py, test_newcomer.py): a copy of the clone, its wheel,
fresh venvs that see the running interpreter's torch and triton, and a clean environment for them.

Nothing here writes into the checkout: the wheel and editable installs are built from a copy of it.
"""

import importlib.util
import os
import shutil
import site
import subprocess
import sys
from pathlib import Path

from packaging.requirements import Requirement
from packaging.version import Version

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: pytest depends on tomli there
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())

# What a clone holds that the commands and the build need (tests/ and the CI files are left out).
CLONE_FILES = ("pyproject.toml", "README.md", "LICENSE")
CLONE_DIRS = ("bn_triton", "kernels", "bench")


def _setuptools_version():
    try:
        import setuptools
    except ImportError:
        return None
    return Version(setuptools.__version__)


BACKEND = Requirement(PYPROJECT["build-system"]["requires"][0])
# Building without isolation (the GPU machines have no network) needs the build backend installed here.
CAN_BUILD = _setuptools_version() is not None and BACKEND.specifier.contains(_setuptools_version())
CANNOT_BUILD_REASON = f"building without isolation needs {BACKEND} installed (the GPU machines have no network)"


def copy_clone(dest: Path) -> Path:
    """A copy of the repository's sources, laid out as a clone is: ``dest`` plays the clone's root."""
    dest.mkdir(parents=True)
    for name in CLONE_FILES:
        shutil.copy2(ROOT / name, dest / name)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "results", "*.egg-info")
    for name in CLONE_DIRS:
        shutil.copytree(ROOT / name, dest / name, ignore=ignore)
    return dest


def build_wheel(src: Path, outdir: Path) -> Path:
    """``python -m build --wheel`` of ``src`` without isolation: the installed setuptools builds it."""
    if importlib.util.find_spec("build") is not None:
        cmd = [sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir", str(outdir), str(src)]
    else:
        cmd = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w", str(outdir), str(src)]
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=src, timeout=180)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    wheels = list(outdir.glob("bn_triton-*.whl"))
    assert len(wheels) == 1, wheels
    return wheels[0]


def outer_site_packages() -> list[str]:
    """The site-packages folders of the interpreter running the tests (a venv's, conda's or the system's)."""
    dirs = list(site.getsitepackages())
    if site.ENABLE_USER_SITE:
        dirs.append(site.getusersitepackages())
    return [d for d in dict.fromkeys(dirs) if os.path.isdir(d)]


def fresh_venv(path: Path) -> Path:
    """A new venv whose Python sees the running interpreter's packages (torch, triton, numpy, pip,
    setuptools); returns its python.

    ``venv --system-site-packages`` would show the packages of the *base* interpreter, which in a venv
    or conda env are not this one's (no torch there). Instead a .pth file in the new venv lists this
    interpreter's site-packages folders. Path lines of a .pth only extend sys.path, after the venv's
    own site-packages: the .pth files inside those folders (an editable install of bn_triton among
    them) do not run, so bn_triton comes only from what is installed into the venv or from the
    current folder.
    """
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(path)], check=True, timeout=120)
    py = path / "bin" / "python"
    purelib = subprocess.run(
        [str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True,
        capture_output=True,
        text=True,
        timeout=60,
    ).stdout.strip()
    (Path(purelib) / "outer_site_packages.pth").write_text("".join(d + "\n" for d in outer_site_packages()))
    return py


def pip_install(py: Path, *args: str) -> None:
    """pip (the outer one, seen through the .pth) installs into the venv of ``py``: no index, no deps;
    --ignore-installed because the outer bn_triton (editable, in CI) must not count as installed."""
    cmd = [str(py), "-m", "pip", "install", "-q", "--no-deps", "--no-index", "--ignore-installed", *args]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]


def clean_env(**extra: str) -> dict:
    """The environment of a newcomer's shell: no PYTHONPATH, no TRITON_INTERPRET (the commands turn the
    interpreter on themselves where there is no GPU)."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "TRITON_INTERPRET")}
    env.update(extra)
    return env
