"""bn_triton/_launcher.py: a launch plan's kernel launch, through Triton's own path once, then direct.

On CPU: a ``Launch`` fixes every argument but the pointers, in the kernel's order, and takes Triton's
own ``fn[grid]`` for interpreted and stubbed kernels. The direct path is checked by
bench/direct_launch.py, which compiles the real launches for sm_90 against a stand-in driver and
records the final C call of both paths: on the installed Triton here, and on the other versions a
user meets (3.5, the Docker image's; 3.6, the GPU machines') in venvs. On a GPU the direct path must
give bitwise the results of Triton's own.
"""

import subprocess
import sys

import pytest
import torch

import bn_triton
from bn_triton import _launcher, launch
from tests.helpers import make
from tests.installs import ROOT, clean_env, fresh_venv


def kernel_fn(X, Y, n, eps, BLOCK: "tl.constexpr", FLAG: "tl.constexpr" = False, Z=None):  # noqa: F821
    """The signature of a stand-in kernel (never run)."""


class FakeKernel:
    """What a Launch needs of a kernel: its Python function, and fn[grid](...)."""

    fn = staticmethod(kernel_fn)

    def __init__(self):
        self.launches = []

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.launches.append((grid, args, kwargs))


def test_a_launch_passes_the_pointers_then_every_other_parameter_in_order():
    k = FakeKernel()
    ln = _launcher.Launch(
        "fake", k, (4, 2), ("X", "Y"), dict(n=3, eps=0.5, BLOCK=16), {"num_warps": 4}, torch.device("cpu")
    )
    x, y = torch.zeros(2), torch.zeros(2)
    before = _launcher.LAUNCHES["fake"]
    ln(Y=y, X=x)
    assert k.launches == [((4, 2), (x, y, 3, 0.5, 16, False, None), {"num_warps": 4})]
    assert _launcher.LAUNCHES["fake"] == before + 1


@pytest.mark.parametrize(
    "pointers,fixed,error",
    [
        (("Y", "X"), dict(n=3, eps=0.5, BLOCK=16), "leading parameters"),  # not the kernel's order
        (("X", "Y"), dict(n=3, eps=0.5, BLOCK=16, W=1), "no parameters"),  # no such parameter
        (("X", "Y"), dict(n=3, eps=0.5), "no value"),  # BLOCK has no default
    ],
)
def test_a_launch_is_checked_against_the_kernels_signature(pointers, fixed, error):
    with pytest.raises(AssertionError, match=error):
        _launcher.Launch("fake", FakeKernel(), (1,), pointers, fixed, {}, torch.device("cpu"))


def test_every_builder_matches_its_kernels_parameters():
    """Each launch builder names its kernel's leading pointers and only parameters it has."""
    x = torch.zeros(2, 3, 4)
    x_, geom = launch.canonical(x)
    cpu, f32, i32 = torch.device("cpu"), torch.float32, torch.int32
    d = launch.dtypes
    launch.stats(geom, cpu, d(**dict.fromkeys(launch.STATS, f32)), 1e-5, launch.RunningSpec(1, 1, 0.1))
    launch.normalize(geom, cpu, d(**dict.fromkeys(launch.NORMALIZE, f32)), 1e-5, False, "silu")
    launch.grad_sums(geom, cpu, d(**{**dict.fromkeys(launch.GRAD_SUMS, f32), "COUNTER": i32}), 1e-5, True, "relu", True)
    launch.grad_input(geom, cpu, d(**dict.fromkeys(launch.GRAD_INPUT, f32)), 1e-5, True, 0, "elu(1.0)", False)
    forward = d(**{**dict.fromkeys(launch.FORWARD, f32), "TICKET": i32})
    launch.forward(geom, cpu, forward, 1e-5, launch.NO_RUNNING, "mish")
    launch.backward(geom, cpu, d(**dict.fromkeys(launch.BACKWARD, f32)), "gelu", False)
    cumulative = launch.RunningSpec(1, 1, 0.1, True)
    launch.running_update(3, cpu, d(**dict.fromkeys(launch.RUNNING_UPDATE, f32)), cumulative, 8)
    with pytest.raises(AssertionError, match="no pointers"):
        launch.normalize(geom, cpu, d(X=f32, PART=f32), 1e-5, False, None)


def test_a_launch_refuses_a_pointer_its_kernel_does_not_have():
    k = FakeKernel()
    ln = _launcher.Launch("fake", k, (1,), ("X", "Y"), dict(n=3, eps=0.5, BLOCK=16), {}, torch.device("cpu"))
    with pytest.raises(TypeError, match="no pointers"):
        ln(X=torch.zeros(2), Z=torch.zeros(2))


def _direct_launch_check(python, cwd=ROOT):
    proc = subprocess.run(
        [str(python), "-m", "bench.direct_launch", "--calls", "100"],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=600,
        env=clean_env(),
    )
    return proc, proc.stdout + proc.stderr


def _assert_direct(out: str, version: str) -> None:
    rows = [line.split() for line in out.splitlines() if line.startswith("  ") and line.split()[-1][0].isdigit()]
    assert f"triton {version}" in out and out.rstrip().endswith("ok"), out[-3000:]
    assert len(rows) == 5 and all(r[-3] == "same" and int(r[-2]) <= 2 for r in rows), out[-3000:]


@pytest.mark.skipif(not _launcher.ENABLED, reason="the installed Triton has no direct path (Triton's own only)")
def test_direct_launches_match_tritons_own_on_the_installed_triton():
    """The final C call of each direct launch equals Triton's own (compiled for sm_90, no GPU), and
    at most 2 Python calls lead from the plan's launch to it."""
    import triton

    proc, out = _direct_launch_check(sys.executable)
    assert proc.returncode == 0, out[-3000:]
    _assert_direct(out, triton.__version__)


@pytest.mark.parametrize("version", ["3.5.1", "3.6.0"])
def test_direct_launches_match_tritons_own_on_other_tritons(version, tmp_path):
    """The same on the Tritons of the Docker image (3.5) and of the GPU machines (3.6), each in a venv
    that sees the running torch (tests/installs.py)."""
    if torch.cuda.is_available():
        pytest.skip("checked on CPU machines (a GPU machine has no network to install another Triton)")
    py = fresh_venv(tmp_path / "venv")
    pip = [str(py), "-m", "pip", "install", "-q", "--no-deps", "--ignore-installed", f"triton=={version}"]
    res = subprocess.run(pip, capture_output=True, text=True, timeout=600)
    if res.returncode != 0:
        pytest.skip(f"pip could not install triton=={version} here: {res.stderr.strip().splitlines()[-1:]}")
    proc, out = _direct_launch_check(py)
    assert proc.returncode == 0, out[-3000:]
    _assert_direct(out, version)


def test_stubs_and_interpreted_kernels_take_tritons_path(device):
    """Under the interpreter (and with stubs) there is no compiled kernel: every launch is Triton's own."""
    x = make((4, 3, 5), torch.float32, device, seed=0)
    before = _launcher.DIRECT_LAUNCHES[0]
    bn_triton.batch_norm(x, None, None, training=True)
    assert device == "cuda" or _launcher.DIRECT_LAUNCHES[0] == before


@pytest.mark.skipif(not torch.cuda.is_available(), reason="compiled kernels need a GPU")
@pytest.mark.skipif(not _launcher.ENABLED, reason="direct launches are off for this Triton")
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_direct_launches_match_tritons_own_bitwise(layout, monkeypatch):
    def step(x, dy):
        bn = bn_triton.BatchNorm2d(5, momentum=None).cuda()
        out = []
        for _ in range(3):  # the first call of each launch goes through Triton, the next ones direct
            xi = x.clone().requires_grad_()
            y = bn(xi, residual=x)
            y.backward(dy)
            out += [y, xi.grad, bn.weight.grad.clone(), bn.running_mean.clone(), bn.running_var.clone()]
        return out

    x = make((4, 5, 6, 7), torch.float16, "cuda", layout, seed=0)
    dy = make((4, 5, 6, 7), torch.float16, "cuda", layout, seed=1)
    before = _launcher.DIRECT_LAUNCHES[0]
    direct = step(x, dy)
    assert _launcher.DIRECT_LAUNCHES[0] > before, "no launch took the direct path"
    monkeypatch.setattr(_launcher, "ENABLED", False)
    launch.clear_plans()
    triton_path = step(x, dy)
    for a, b in zip(direct, triton_path, strict=True):
        torch.testing.assert_close(a, b, atol=0, rtol=0)
