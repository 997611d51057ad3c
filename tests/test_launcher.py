"""bn_triton/_launcher.py: Triton's own launch once per specialization, then the compiled kernel.

On CPU the compiled-kernel call is checked against a stand-in for a JITFunction (the interpreter has
no compiled kernels): which launches go through Triton, which go direct, and that the direct call
gets every parameter in order with defaults filled in. On a GPU the direct path must give bitwise
the results of Triton's own path.
"""

import pytest
import torch

import bn_triton
from bn_triton import _launcher
from tests.helpers import make


def kernel_fn(X, Y, n, eps, BLOCK: "tl.constexpr", FLAG: "tl.constexpr" = False, Z=None):  # noqa: F821
    """The signature of a stand-in kernel (never run)."""


class FakeCompiled:
    def __init__(self):
        self.calls = []
        self.function, self.packed_metadata = "function", "packed"

    def launch_metadata(self, grid, stream, *args):
        return ("meta", grid)

    @property
    def run(self):
        return lambda *args: self.calls.append(args)


class FakeJIT:
    """What _launcher needs of a JITFunction: .fn, and fn[grid](...) that launches and returns a kernel."""

    def __init__(self):
        self.fn = kernel_fn
        self.triton_launches = []
        self.compiled = FakeCompiled()

    def __getitem__(self, grid):
        def run(*args, **kwargs):
            self.triton_launches.append((grid, args, kwargs))
            return self.compiled

        return run


class FakeDriver:
    class active:
        get_current_device = staticmethod(lambda: 0)
        get_current_stream = staticmethod(lambda device: "stream")


@pytest.fixture
def fake(monkeypatch):
    monkeypatch.setattr(_launcher, "ENABLED", True)
    monkeypatch.setattr(_launcher, "JITFunction", FakeJIT)
    monkeypatch.setattr(_launcher, "driver", FakeDriver)
    monkeypatch.setattr(
        _launcher,
        "knobs",
        type("K", (), {"runtime": type("R", (), {"launch_enter_hook": "enter", "launch_exit_hook": "exit"})}),
    )
    monkeypatch.setattr(_launcher, "_SIGNATURES", {})
    return FakeJIT()


def test_first_launch_of_a_key_goes_through_triton_then_direct(fake):
    x, y = torch.zeros(8), torch.zeros(8)
    _launcher.launch(fake, (4,), (x, y, 32, 0.5), dict(BLOCK=16, num_warps=4))
    assert len(fake.triton_launches) == 1 and fake.compiled.calls == []
    _launcher.launch(fake, (4, 2), (x, y, 48, 0.25), dict(BLOCK=16, num_warps=4))
    assert len(fake.triton_launches) == 1, "same specialization: no second trip through Triton"
    (call,) = fake.compiled.calls
    # grid, stream, function, metadata, launch metadata, hooks, then every parameter in order.
    assert call[:9] == (4, 2, 1, "stream", "function", "packed", ("meta", (4, 2)), "enter", "exit")
    # Tensors as their device pointers: Triton's launcher would ask the driver for each.
    assert call[9:] == (x.data_ptr(), y.data_ptr(), 48, 0.25, 16, False, None)


@pytest.mark.parametrize(
    "change",
    [
        dict(n=1),  # an int equal to 1 is a constant to Triton
        dict(n=33),  # not divisible by 16
        dict(n=2**40),  # 64-bit
        dict(y=torch.zeros(8, dtype=torch.float16)),  # another dtype
        dict(y=torch.zeros(9)[1:]),  # 4-byte aligned, not 16
        dict(BLOCK=32),  # a constexpr
        dict(Z=torch.zeros(8)),  # None -> tensor
        dict(num_warps=8),  # an option
    ],
    ids=lambda c: next(iter(c)),
)
def test_anything_triton_specializes_on_makes_a_new_key(fake, change):
    base = dict(X=torch.zeros(8), y=torch.zeros(8), n=32, BLOCK=16, Z=None, num_warps=4)

    def call(p):
        kwargs = dict(BLOCK=p["BLOCK"], num_warps=p["num_warps"], Z=p["Z"])
        _launcher.launch(fake, (1,), (p["X"], p["y"], p["n"], 0.5), kwargs)

    call(base)
    call({**base, **change})
    assert len(fake.triton_launches) == 2
    call({**base, **change})
    assert len(fake.triton_launches) == 2 and len(fake.compiled.calls) == 1


def test_stubs_and_interpreted_kernels_take_tritons_path(fake):
    calls = []

    class Stub:
        def __getitem__(self, grid):
            return lambda *a, **k: calls.append(grid)

    _launcher.launch(Stub(), (3,), (), {})
    assert calls == [(3,)]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="compiled kernels need a GPU")
@pytest.mark.skipif(not _launcher.ENABLED, reason="direct launches are off for this Triton")
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_direct_launches_match_tritons_own_bitwise(layout, monkeypatch):
    def step(x, dy):
        bn = bn_triton.BatchNorm2d(5, momentum=None).cuda()
        out = []
        for _ in range(3):  # the first call of each key goes through Triton, the next ones direct
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
    triton_path = step(x, dy)
    for a, b in zip(direct, triton_path, strict=True):
        torch.testing.assert_close(a, b, atol=0, rtol=0)
