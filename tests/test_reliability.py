"""Reliability promises (per-channel views, float64 precision, huge values, argument checks) and the
CPU proofs of the launch plan (launch counts, no torch kernels on the path, a bitwise-reproducible
last-program finalize).

Each test failed on d78ce61, the state before these fixes, except the ones whose docstring says
"guard": those pin down behaviour that must not change while the others were fixed. Where torch's
behaviour is the contract, the expected values come from torch's own batch_norm on identical clones.
"""

import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import bn_triton
from bn_triton import _config, kernels, launch, reference
from tests.helpers import assert_close, make, np64, raises_every_time, train_launches


def _clones(*ts):
    return [None if t is None else t.detach().clone() for t in ts]


# torch's messages (torch.nn.functional.batch_norm, torch >= 2.13): the contract. Older torch (2.11 on
# the GPU machines) does not check eps at all, so the expected error is written down, not asked for.
EPS_MESSAGES = {
    True: "batch_norm eps must be positive during training, but got {eps}",
    False: "batch_norm eps must be non-negative, but got {eps}",
}


def _torch_error(fn):
    """The exception torch raises for the same call (its type and message are the contract)."""
    with pytest.raises(Exception) as info:
        fn()
    return info.value


# ---------------------------------------------------------------- non-contiguous per-channel tensors
def _view(base: torch.Tensor, kind: str) -> torch.Tensor:
    """A 3-element view of ``base`` that is not contiguous: a column of a (3, 2) matrix, every other
    element, or one element expanded (stride 0). ``base`` has 6 elements."""
    if kind == "sliced":
        return base.view(3, 2)[:, 0]
    if kind == "strided":
        return base[::2]
    return base[1:2].expand(3)  # "expanded": neighbours on both sides of the viewed slot


def _base(seed, offset=0.0, positive=False):
    b = make((6,), torch.float32, "cpu", offset=offset, seed=seed)
    return b.abs() + 0.5 if positive else b


@pytest.mark.parametrize("kind", ["sliced", "strided", "expanded"])
def test_non_contiguous_weight_and_bias(kind, device):
    """y, dx and the gradients of the weight and bias bases match torch's for views of them."""
    x = make((4, 3, 5), torch.float32, device, seed=101)
    dy = make(x.shape, torch.float32, device, seed=102)
    wb, bb = _base(103, offset=1.0).to(device), _base(104).to(device)
    results = []
    for fn in (bn_triton.batch_norm, F.batch_norm):
        xg, wg, bg = (t.clone().requires_grad_() for t in (x, wb, bb))
        y = fn(xg, None, None, _view(wg, kind), _view(bg, kind), training=True)
        y.backward(dy)
        results.append((y, xg.grad, wg.grad, bg.grad))
    (y, dx, dw, db), (y_t, dx_t, dw_t, db_t) = results
    assert_close(y, np64(y_t), torch.float32, what="y")
    assert_close(dx, np64(dx_t), torch.float32, scale=4, what="dx")
    assert_close(dw, np64(dw_t), torch.float32, scale=4, what="d(weight base)")
    assert_close(db, np64(db_t), torch.float32, scale=4, what="d(bias base)")


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("kind", ["sliced", "strided"])
def test_non_contiguous_running_stats_updated_in_place(kind, training, device):
    """Running statistics that are views are read, and updated in place, exactly where torch does:
    the neighbour slots of their bases stay untouched."""
    x = make((4, 3, 5), torch.float32, device, offset=0.5, seed=105)
    rm_base, rv_base = _base(106).to(device), _base(107, positive=True).to(device)
    rm_t, rv_t = _clones(rm_base, rv_base)
    y = bn_triton.batch_norm(x, _view(rm_base, kind), _view(rv_base, kind), training=training)
    y_t = F.batch_norm(x, _view(rm_t, kind), _view(rv_t, kind), training=training)
    assert_close(y, np64(y_t), torch.float32, what="y")
    # The whole bases: the viewed slots updated as torch updates them, the others bitwise unchanged.
    assert_close(rm_base, np64(rm_t), torch.float32, what="running_mean base")
    assert_close(rv_base, np64(rv_t), torch.float32, what="running_var base")
    untouched = [i for i in range(6) if i not in _view(torch.arange(6), kind).tolist()]
    assert torch.equal(rm_base[untouched], rm_t[untouched]) and torch.equal(rv_base[untouched], rv_t[untouched])


def test_expanded_running_stats_stay_inside_the_view(device):
    """Stride-0 running statistics (one slot seen as 3 channels) are written at that slot only.

    Only where and how finite is asserted, not the value: torch's CPU update runs over the channels
    one after another, each reading the slot the previous one wrote, while our kernels write the slot
    once per channel in an order the launch does not define (programs or lanes), so the last writer,
    and with it the value, is unspecified. torch gives no contract for aliased buffers either.
    """
    x = make((4, 3, 5), torch.float32, device, offset=0.5, seed=108)
    rm_base = torch.full((3,), 7.0, device=device)
    rv_base = torch.full((3,), 3.0, device=device)
    y = bn_triton.batch_norm(x, rm_base[1:2].expand(3), rv_base[1:2].expand(3), training=True)
    with torch.no_grad():
        y_t = F.batch_norm(x, None, None, training=True)  # training y does not read running stats
    assert_close(y, np64(y_t), torch.float32, what="y")
    assert rm_base[0] == 7.0 and rm_base[2] == 7.0 and rv_base[0] == 3.0 and rv_base[2] == 3.0
    assert torch.isfinite(rm_base[1]) and rm_base[1] != 7.0
    assert torch.isfinite(rv_base[1]) and rv_base[1] > 0 and rv_base[1] != 3.0


# ---------------------------------------------------------------- float64 keeps float64 digits
F64_EXACT = dict(rtol=1e-13, atol=0.0)


@pytest.mark.parametrize("momentum", [0.1, None], ids=["momentum0.1", "cumulative"])
def test_float64_running_stats_keep_float64_digits(momentum, device):
    """running_mean = 1000 with momentum 0.1: the update's error was 2.4e-5 (momentum passed as fp32),
    torch's is 0. The modules' cumulative factor 1/3 is not exact in fp32 either."""
    xs = [make((4, 3, 5), torch.float64, device, offset=3.0, scale=2.0, seed=110 + i) for i in range(3)]
    if momentum is not None:
        rm = 1000.0 + make((3,), torch.float64, device, seed=114)
        rv = 1000.0 + make((3,), torch.float64, device, seed=115).abs()
        rm_t, rv_t = _clones(rm, rv)
        bn_triton.batch_norm(xs[0], rm, rv, training=True, momentum=momentum)
        F.batch_norm(xs[0], rm_t, rv_t, training=True, momentum=momentum)
        got, want = (rm, rv), (rm_t, rv_t)
    else:
        ours = bn_triton.BatchNorm1d(3, momentum=None, dtype=torch.float64, device=device)
        ref = torch.nn.BatchNorm1d(3, momentum=None, dtype=torch.float64, device=device)
        for m in (ours, ref):
            m.running_mean.fill_(1000.0)
            for x in xs:  # the third step's factor is 1/3
                m(x)
        got, want = (ours.running_mean, ours.running_var), (ref.running_mean, ref.running_var)
    for g, w, name in zip(got, want, ("running_mean", "running_var"), strict=True):
        torch.testing.assert_close(g, w, **F64_EXACT, msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_float64_eps_keeps_float64_digits(training, device):
    """eps = 1e-5 on a variance of ~1e-6: fp32(1e-5) is off by 2.5e-13, which moves y by ~1e-8
    relative; in float64 y must match the float64 reference to 1e-12.

    Guard on CPU: the interpreter hands a kernel the Python float itself, so d78ce61 passes here; on a
    GPU (fp32 float arguments) it did not. test_float64_kernels_get_no_fp32_rounded_floats is the CPU proof."""
    eps = 1e-5
    x = make((4, 3, 5), torch.float64, device, scale=1e-3, seed=116)
    if training:
        y = bn_triton.batch_norm(x, None, None, training=True, eps=eps)
        y_ref, _, _ = reference.forward(np64(x), eps=eps)
    else:
        rm = make((3,), torch.float64, device, scale=1e-3, seed=117)
        rv = make((3,), torch.float64, device, scale=1e-6, seed=118).abs() + 1e-7
        y = bn_triton.batch_norm(x, rm, rv, training=False, eps=eps)
        y_ref = reference.eval_forward(np64(x), np64(rm), np64(rv), eps=eps)
    np.testing.assert_allclose(np64(y), y_ref, rtol=1e-12, atol=1e-12 * np.abs(y_ref).max())


def test_float64_dx_keeps_float64_digits(device):
    """m = 3 * 7 = 21 values per channel: 1/m is not exact in fp32 (relative error ~1e-8), so dx in
    float64 must get it as float64 to match the reference to 1e-12.

    Guard on CPU, as the eps test above: it discriminates on a GPU only."""
    x = make((3, 2, 7), torch.float64, device, offset=1.0, seed=119).requires_grad_()
    w = make((2,), torch.float64, device, offset=1.0, seed=120).requires_grad_()
    dy = make(x.shape, torch.float64, device, seed=121)
    bn_triton.batch_norm(x, None, None, w, None, training=True).backward(dy)
    dx_ref, dw_ref, _ = reference.backward(np64(dy), np64(x), weight=np64(w))
    np.testing.assert_allclose(np64(x.grad), dx_ref, rtol=1e-12, atol=1e-12 * np.abs(dx_ref).max())
    np.testing.assert_allclose(np64(w.grad), dw_ref, rtol=1e-12, atol=1e-12 * np.abs(dw_ref).max())


class _RecordingKernel:
    """A kernel whose launch records (name, args, kwargs) and computes nothing."""

    def __init__(self, name, record):
        self.name, self.record = name, record
        self.kernel = getattr(kernels, name)  # the replaced kernel: launch plans read its parameters

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.record.append((self.name, args, kwargs))


def test_float64_kernels_get_no_fp32_rounded_floats(device, monkeypatch, path):
    """Compiled for a GPU, Triton types a Python float argument as fp32. (The interpreter keeps the
    Python float: that is why the value tests above pass under it on d78ce61, while on an H100 they
    do not.) So no float reaching a kernel of a float64 call may lose digits in fp32: eps, momentum,
    1/m and m/(m-1) must travel as float64 (bit patterns). Checked on the recorded launch arguments
    of a training forward + backward, an eval forward + backward and a cumulative-average module step."""
    record = []
    for name in kernels.__all__:
        monkeypatch.setattr(kernels, name, _RecordingKernel(name, record))
    x = make((3, 2, 7), torch.float64, device, seed=138).requires_grad_()
    w = make((2,), torch.float64, device, offset=1.0, seed=139).requires_grad_()
    b = make((2,), torch.float64, device, seed=140).requires_grad_()
    rm, rv = torch.zeros(2, dtype=torch.float64, device=device), torch.ones(2, dtype=torch.float64, device=device)
    for training in (True, False):
        y = bn_triton.batch_norm(x, rm, rv, w, b, training=training, momentum=0.1, eps=1e-5)
        y.backward(torch.ones_like(y))
    bn_triton.BatchNorm1d(2, momentum=None, dtype=torch.float64, device=device)(x.detach())
    # training forward + backward: 2 + 2 (split) or 1 + 1 (single pass); eval 1 + 1; the module 1 or more
    assert len(record) >= (7 if path == "split" else 5)
    rounded = {
        (name, v)
        for name, args, kwargs in record
        for v in (*args, *kwargs.values())
        if isinstance(v, float) and float(np.float32(v)) != v and not np.isnan(v)
    }
    assert not rounded, f"floats that fp32 rounds, by kernel: {sorted(rounded)}"


# ---------------------------------------------------------------- huge channel means stay finite
def _huge(case: str, dtype: torch.dtype) -> torch.Tensor:
    gen = torch.Generator().manual_seed(122)
    if case == "constant_1e30":  # the example: delta^2 * 0 = inf * 0 in the Chan merge
        x = torch.full((2, 1, 3), 1e30)
    elif case == "mix_3e38_1e38":  # near fp32's max: the per-tile sum overflows; the variance (~1e76) does too
        x = torch.where(torch.rand(4, 2, 7, generator=gen) > 0.5, 3e38, 1e38)
    else:  # "mean_1e20": above 1.84e19 with a variance fp32 holds (4e36), so y is O(1)
        x = 1e20 + 2e18 * torch.randn(3, 2, 5, generator=gen, dtype=torch.float64)
    return x.to(dtype)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # NumPy's overflow warnings inside the interpreter
@pytest.mark.parametrize("case", ["constant_1e30", "mix_3e38_1e38", "mean_1e20"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_huge_channel_mean_stays_finite(case, dtype, device):
    """Finite wherever torch is finite (y, running_mean, running_var), and the values agree."""
    x = _huge(case, dtype).to(device)
    C = x.shape[1]
    rm, rv = torch.zeros(C, dtype=dtype, device=device), torch.ones(C, dtype=dtype, device=device)
    rm_t, rv_t = _clones(rm.cpu(), rv.cpu())
    y = bn_triton.batch_norm(x, rm, rv, training=True)
    y, rm, rv = y.cpu(), rm.cpu(), rv.cpu()
    # torch on the CPU is the contract: torch's CUDA kernels turn these into NaN themselves (seen on an
    # H200 with torch 2.11: y NaN for the 1e20 case, where the float64 reference is O(1)).
    y_t = F.batch_norm(x.cpu(), rm_t, rv_t, training=True)
    for got, want, name in ((y, y_t, "y"), (rm, rm_t, "running_mean"), (rv, rv_t, "running_var")):
        assert torch.isfinite(got)[torch.isfinite(want)].all(), f"{name}: {got} where torch has {want}"
    rtol = 1e-4 if dtype == torch.float32 else 2e-2  # fp32 vs torch's double accumulation; one bf16 ulp
    for got, want in ((rm, rm_t), (rv, rv_t)):
        both = torch.isfinite(got) & torch.isfinite(want)
        torch.testing.assert_close(got[both].double(), want[both].double(), rtol=rtol, atol=0.0)
    # The running variance overflows exactly where torch's does (mix: ~1e76 is inf in fp32).
    assert torch.equal(torch.isinf(rv), torch.isinf(rv_t))
    if case == "constant_1e30":
        # Every value equals the mean: y is exactly 0 (the float64 reference). torch's fp32 CPU y is
        # -2.3e24 here, from its own rounding of the mean, so it is not the reference for values.
        assert torch.equal(y, torch.zeros_like(y))
    elif case == "mix_3e38_1e38":
        # The variance is inf in fp32, so rstd = 0 and torch's y is 0 wherever it is finite.
        fin = torch.isfinite(y_t)
        assert torch.equal(y[fin], y_t[fin])
    else:
        y_ref, _, _ = reference.forward(np64(x))
        assert_close(y, y_ref, dtype, scale=2, what="y")
        if dtype == torch.float32:  # torch's bf16 CPU y is off by up to 0.23 here (its x - mean in bf16)
            assert_close(y, np64(y_t), dtype, scale=2, what="y vs torch")


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_huge_values_of_opposite_sign_stay_finite(device):
    """[3e38, -3e38] in one channel: the mean (0) is finite, the variance is inf in fp32 as torch's."""
    x = torch.tensor([[[3e38, -3e38]], [[3e38, -3e38]]], device=device)
    rm, rv = torch.zeros(1, device=device), torch.ones(1, device=device)
    rm_t, rv_t = _clones(rm.cpu(), rv.cpu())
    y = bn_triton.batch_norm(x, rm, rv, training=True)
    y, rm, rv = y.cpu(), rm.cpu(), rv.cpu()
    y_t = F.batch_norm(x.cpu(), rm_t, rv_t, training=True)  # y = 0, running_mean = 0, running_var = inf
    assert torch.isfinite(y_t).all() and torch.isfinite(rm_t).all()
    assert torch.equal(y, y_t) and torch.equal(rm, rm_t) and torch.equal(rv, rv_t)


# ---------------------------------------------------------------- arguments torch checks
EPS_CASES = [(True, 0.0), (True, -1.0), (False, -1e-3)]


@pytest.mark.parametrize("api", ["functional", "module"])
@pytest.mark.parametrize("training,eps", EPS_CASES, ids=["train0", "train-1", "eval-1e-3"])
def test_bad_eps_raises_torchs_error_before_any_kernel(api, training, eps, device):
    """eps <= 0 in training, eps < 0 in eval: torch's ValueError and message; no kernel runs and no
    running statistic (nor num_batches_tracked) moves. The modules check their constructor's eps."""
    x = make((4, 3, 5), torch.float32, device, seed=123)
    expected = ValueError(EPS_MESSAGES[training].format(eps=eps))
    if api == "functional":
        rm, rv = make((3,), torch.float32, device, seed=124), make((3,), torch.float32, device, seed=125).abs()
        rm_t, rv_t = _clones(rm, rv)
        if _torch_checks_eps():
            torch_error = _torch_error(lambda: F.batch_norm(x, rm_t, rv_t, training=training, eps=eps))
            assert (type(torch_error), str(torch_error)) == (ValueError, str(expected))
        call = lambda: bn_triton.batch_norm(x, rm, rv, training=training, eps=eps)
        valid = lambda: bn_triton.batch_norm(x, *_clones(rm, rv), training=training, eps=0.1)
        state = (rm, rv)
    else:
        ref = torch.nn.BatchNorm1d(3, eps=eps, device=device).train(training)
        if _torch_checks_eps():
            torch_error = _torch_error(lambda: ref(x))
            assert (type(torch_error), str(torch_error)) == (ValueError, str(expected))
        mod = bn_triton.BatchNorm1d(3, eps=eps, device=device).train(training)
        with torch.no_grad():
            mod.running_mean.copy_(make((3,), torch.float32, device, seed=126))
        call = lambda: mod(x)
        valid = lambda: bn_triton.BatchNorm1d(3, eps=0.1, device=device).train(training)(x)
        state = (mod.running_mean, mod.running_var, mod.num_batches_tracked)
    raises_every_time(call, ValueError, f"^{re.escape(str(expected))}$", state=state, valid=valid)


def _torch_checks_eps() -> bool:
    try:
        F.batch_norm(torch.ones(2, 1), None, None, training=True, eps=0.0)
    except ValueError:
        return True
    return False


def test_zero_eps_in_eval_is_accepted(device):
    """Guard: torch accepts eps = 0 in eval (only negative is refused); so do we, with its result."""
    x = make((4, 3, 5), torch.float32, device, seed=127)
    rm, rv = make((3,), torch.float32, device, seed=128), make((3,), torch.float32, device, seed=129).abs() + 0.5
    y = bn_triton.batch_norm(x, rm, rv, training=False, eps=0.0)
    # torch on the CPU: its CUDA path may send eps = 0 to cuDNN, which wants eps >= 1e-5.
    y_t = F.batch_norm(x.cpu(), rm.cpu(), rv.cpu(), training=False, eps=0.0)
    assert_close(y, np64(y_t), torch.float32, what="y")


@pytest.mark.parametrize("with_running", [True, False], ids=["running", "no_running"])
def test_functional_momentum_none_raises_like_torch(with_running, device):
    """torch's functional batch_norm refuses momentum=None (a TypeError from its argument parser),
    with running statistics or without; nothing runs and the running statistics stay as they were."""
    x = make((4, 3, 5), torch.float32, device, seed=130)
    rm, rv = (None, None)
    if with_running:
        rm, rv = make((3,), torch.float32, device, seed=131), torch.ones(3, device=device)
    expected = _torch_error(lambda: F.batch_norm(x, *_clones(rm, rv), training=True, momentum=None))
    assert type(expected) is TypeError
    call = lambda: bn_triton.batch_norm(x, rm, rv, training=True, momentum=None)
    valid = lambda: bn_triton.batch_norm(x, *_clones(rm, rv), training=True, momentum=0.1)
    state = (rm, rv) if with_running else ()
    raises_every_time(call, TypeError, f"^{re.escape(str(expected))}$", state=state, valid=valid)


def test_module_momentum_none_is_the_cumulative_average(device):
    """Guard: the modules' momentum=None is torch's cumulative average (factor 1/num_batches_tracked)."""
    ours = bn_triton.BatchNorm2d(3, momentum=None, device=device)
    ref = torch.nn.BatchNorm2d(3, momentum=None, device=device)
    for step in range(3):
        x = make((2, 3, 4, 5), torch.float32, device, offset=step, scale=1.0 + step, seed=132 + step)
        assert_close(ours(x), np64(ref(x)), torch.float32, what=f"y, step {step}")
        assert_close(ours.running_mean, np64(ref.running_mean), torch.float32, what=f"running_mean, step {step}")
        assert_close(ours.running_var, np64(ref.running_var), torch.float32, what=f"running_var, step {step}")
        assert ours.num_batches_tracked.item() == ref.num_batches_tracked.item() == step + 1


# ---------------------------------------------------------------- zero channels, a 0-d eps
@pytest.mark.parametrize("with_running", [True, False], ids=["running", "no_running"])
@pytest.mark.parametrize("shape", [(2, 0, 3), (2, 0)])
def test_zero_channels_in_training(shape, with_running, device):
    """C = 0 in training: torch returns an empty tensor of the input's shape (it raised ZeroDivisionError)."""
    x = torch.randn(shape, device=device)
    stats = (torch.zeros(0, device=device), torch.ones(0, device=device)) if with_running else (None, None)
    y = bn_triton.batch_norm(x, *stats, training=True)
    y_t = F.batch_norm(x, *_clones(*stats), training=True)
    assert y.shape == y_t.shape == x.shape and y.dtype == y_t.dtype


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_eps_as_a_0d_tensor(training, device):
    """torch accepts eps as a 0-d tensor (it crashed inside the kernel); the result is torch's."""
    x = make((4, 3, 5), torch.float32, device, seed=135)
    rm, rv = make((3,), torch.float32, device, seed=136), make((3,), torch.float32, device, seed=137).abs() + 0.5
    rm_t, rv_t = _clones(rm, rv)
    eps = torch.tensor(1e-3)
    y = bn_triton.batch_norm(x, rm, rv, training=training, eps=eps)
    y_t = F.batch_norm(x, rm_t, rv_t, training=training, eps=eps)
    assert_close(y, np64(y_t), torch.float32, what="y")
    assert_close(rm, np64(rm_t), torch.float32, what="running_mean")
    assert_close(rv, np64(rv_t), torch.float32, what="running_var")


# ---------------------------------------------------------------- launches, no torch kernels
MODULE_CASES = [
    (bn_triton.BatchNorm1d, (6, 3), None),
    (bn_triton.BatchNorm1d, (4, 3, 5), None),
    (bn_triton.BatchNorm2d, (2, 3, 4, 5), None),
    (bn_triton.BatchNorm2d, (2, 3, 4, 5), torch.channels_last),
    (bn_triton.BatchNorm3d, (2, 3, 2, 3, 4), None),
    (bn_triton.BatchNorm3d, (2, 3, 2, 3, 4), torch.channels_last_3d),
]
MODULE_IDS = ["1d-NC", "1d-NCL", "2d-NCHW", "2d-channels_last", "3d-NCDHW", "3d-channels_last_3d"]


def _input(shape, fmt, device, seed):
    x = make(shape, torch.float32, device, seed=seed)
    return (x if fmt is None else x.contiguous(memory_format=fmt)).requires_grad_()


def _launches(fn) -> tuple:
    """(our launches by name during fn(), fn's result)."""
    launch.LAUNCHES.clear()
    out = fn()
    counts = {k: v for k, v in launch.LAUNCHES.items() if v}
    return counts, out


@pytest.mark.parametrize("cls,shape,fmt", MODULE_CASES, ids=MODULE_IDS)
def test_launch_counts_modules(cls, shape, fmt, device, path):
    """Training forward 2 launches (stats, with the running statistics and num_batches_tracked
    updated inside it, and normalize), backward 2; 1 each on the single-pass path. Eval forward 1,
    eval backward of dx alone 1."""
    m = cls(3, device=device)
    x = _input(shape, fmt, device, 140)
    FWD, BWD = train_launches(x)
    assert ("forward" in FWD) == (path == "single_pass")
    rm, rv = _clones(m.running_mean, m.running_var)
    counts, y = _launches(lambda: m(x))
    assert counts == FWD
    assert m.num_batches_tracked.item() == 1
    assert not torch.equal(m.running_mean, rm) and not torch.equal(m.running_var, rv)
    counts, _ = _launches(lambda: y.backward(torch.randn_like(y)))
    assert counts == BWD
    m.eval()
    m.weight.requires_grad_(False)
    m.bias.requires_grad_(False)
    x = _input(shape, fmt, device, 141)
    counts, y = _launches(lambda: m(x))
    assert counts == {"normalize": 1}
    counts, _ = _launches(lambda: y.backward(torch.randn_like(y)))
    assert counts == {"grad_input": 1}


@pytest.mark.parametrize("fmt", [None, torch.channels_last], ids=["NCHW", "channels_last"])
def test_launch_counts_functional(fmt, device, path):
    """The same counts through bn_triton.batch_norm: the running statistics are updated by "stats"
    (or "forward")."""
    x = _input((2, 3, 4, 5), fmt, device, 142)
    FWD, BWD = train_launches(x)
    assert ("forward" in FWD) == (path == "single_pass")
    w = make((3,), torch.float32, device, offset=1.0, seed=143).requires_grad_()
    b = make((3,), torch.float32, device, seed=144).requires_grad_()
    rm, rv = torch.zeros(3, device=device), torch.ones(3, device=device)
    counts, y = _launches(lambda: bn_triton.batch_norm(x, rm, rv, w, b, training=True))
    assert counts == FWD and rm.ne(0).all() and rv.ne(1).all()
    counts, _ = _launches(lambda: y.backward(torch.randn_like(y)))
    assert counts == BWD
    x = _input((2, 3, 4, 5), fmt, device, 145)
    counts, y = _launches(lambda: bn_triton.batch_norm(x, rm, rv, w.detach(), b.detach(), training=False))
    assert counts == {"normalize": 1}
    counts, _ = _launches(lambda: y.backward(torch.randn_like(y)))
    assert counts == {"grad_input": 1}


# aten ops allowed on the path: allocations (empty*: no kernel writes memory) and detach (a view:
# autograd's saved/accumulated tensors and the statistics' detached input). Anything else (add_,
# copy_, fill_, zero_, mul, contiguous copies...) would be a torch kernel launched next to ours.
# Allocations, and views of them (the eager plans slice one workspace into its parts): no kernels.
ALLOWED_ATEN = {"detach", "empty", "empty_like", "empty_strided", "new_empty", "slice", "as_strided"}


class _RecordOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func.overloadpacket))
        return func(*args, **(kwargs or {}))


def _module_or_functional(api, fmt, device):
    """A training forward + backward to run, with fp32 parameters and fresh leaves (no .grad yet,
    so autograd's accumulation is a detach, not an add_)."""
    shape = (2, 3, 4, 5)
    x = _input(shape, fmt, device, 146)
    # dy in x's layout, as the next layer's backward hands it over (a dy in another layout is copied to
    # x's: one copy_, by design of launch.like).
    dy = make(shape, torch.float32, device, seed=147)
    dy = dy if fmt is None else dy.contiguous(memory_format=fmt)
    if api == "module":
        m = bn_triton.BatchNorm2d(3, device=device)
        return lambda: m(x).backward(dy)
    w = make((3,), torch.float32, device, offset=1.0, seed=148).requires_grad_()
    b = make((3,), torch.float32, device, seed=149).requires_grad_()
    rm, rv = torch.zeros(3, device=device), torch.ones(3, device=device)
    return lambda: bn_triton.batch_norm(x, rm, rv, w, b, training=True).backward(dy)


@pytest.mark.parametrize("api", ["module", "functional"])
@pytest.mark.parametrize("fmt", [None, torch.channels_last], ids=["NCHW", "channels_last"])
def test_no_torch_kernels_around_our_ops(api, fmt, device):
    """Under a dispatch mode (which routes through the custom ops): our four ops, in order, and no
    aten compute op around them."""
    run = _module_or_functional(api, fmt, device)
    with _RecordOps() as rec:
        run()
    ours = [op for op in rec.ops if op.startswith("bn_triton.")]
    assert ours == ["bn_triton.stats", "bn_triton.normalize", "bn_triton.grad_sums", "bn_triton.grad_input"]
    aten = {op.removeprefix("aten.") for op in rec.ops if not op.startswith("bn_triton.")}
    assert aten <= ALLOWED_ATEN, f"torch ops on the path: {sorted(aten - ALLOWED_ATEN)}"


class _StubKernel:
    """A kernel whose launch only records its name (the interpreter's own torch ops stay out)."""

    def __init__(self, name, record):
        self.name, self.record = name, record
        self.kernel = getattr(kernels, name)  # the replaced kernel: launch plans read its parameters

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.record.append(self.name)


@pytest.mark.parametrize("api", ["module", "functional"])
@pytest.mark.parametrize("fmt", [None, torch.channels_last], ids=["NCHW", "channels_last"])
def test_no_torch_kernels_in_plain_eager(api, fmt, device, monkeypatch, path):
    """Plain eager mode (the route users take), seen by the profiler, with our kernels stubbed so the
    interpreter's conversions do not show: the library's own torch ops are allocations only.

    A dispatch mode cannot see inside our custom ops (it is off while an op runs), so this checks the
    launchers' allocations and the absence of fills and copies there."""
    from torch.profiler import ProfilerActivity, profile

    record = []
    for name in kernels.__all__:
        monkeypatch.setattr(kernels, name, _StubKernel(name, record))
    run = _module_or_functional(api, fmt, device)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        run()
    if path == "split":
        assert record == ["stats_kernel", "normalize_kernel", "grad_sums_kernel", "grad_input_kernel"]
    else:
        assert record == ["forward_kernel", "backward_kernel"]
    aten = {e.name.removeprefix("aten::") for e in prof.events() if e.name.startswith("aten::")}
    assert aten <= ALLOWED_ATEN, f"torch ops on the path: {sorted(aten - ALLOWED_ATEN)}"


@pytest.fixture
def many_splits(monkeypatch):
    """Tiny tiles and many reduction programs (as tests/test_numerics.py), so the last program of
    each reduction merges several partials."""
    monkeypatch.setattr(_config, "TILE_ELEMS_INTERPRETER", 32)
    monkeypatch.setattr(_config, "TILE_ELEMS_GPU", 32)
    monkeypatch.setattr(_config, "INTERPRETER_PROGRAMS", 14)
    monkeypatch.setattr(_config, "PROGRAMS_PER_SM", 1)


def _tickets_at_zero():
    # Tickets of devices that hold data (another test may have run the launchers on meta tensors).
    return all(int(t.count_nonzero()) == 0 for t in launch._TICKETS.values() if t.device.type != "meta")


@pytest.mark.parametrize("fmt", [None, torch.channels_last], ids=["NCHW", "channels_last"])
def test_last_program_finalize_is_bitwise_reproducible(fmt, many_splits, device):
    """The same training forward + backward, three times: bitwise equal y, dx, dweight, dbias and
    running statistics; the tickets are back at zero after every launch."""
    x = make((5, 3, 6, 5), torch.float32, device, offset=2.0, seed=150)
    x = x if fmt is None else x.contiguous(memory_format=fmt)
    x_, geom = launch.canonical(x)
    assert _config.launch_config(geom, x_.device).num_splits > 1
    w = make((3,), torch.float32, device, offset=1.0, seed=151)
    b = make((3,), torch.float32, device, seed=152)
    dy = make(x.shape, torch.float32, device, seed=153)
    results = []
    for _ in range(3):
        xg, wg, bg = (t.clone().requires_grad_() for t in (x, w, b))
        rm, rv = torch.zeros(3, device=device), torch.ones(3, device=device)
        y = bn_triton.batch_norm(xg, rm, rv, wg, bg, training=True)
        assert _tickets_at_zero()
        y.backward(dy)
        assert _tickets_at_zero()
        results.append([y, xg.grad, wg.grad, bg.grad, rm, rv])
    for run in results[1:]:
        for a, r in zip(results[0], run, strict=True):
            assert torch.equal(a, r)


@pytest.mark.parametrize("which", ["momentum", "eps"])
def test_module_reads_a_0d_tensor_hyperparameter_on_every_call(which, device):
    """A module whose momentum or eps is a 0-d tensor, changed in place between calls: each call reads
    its value then, as torch's module does (a plan never keeps the first value)."""
    x = make((4, 3, 5), torch.float32, device, seed=140)
    ours, ref = bn_triton.BatchNorm1d(3).to(device), torch.nn.BatchNorm1d(3)
    t_ours, t_ref = torch.tensor(0.1), torch.tensor(0.1)
    setattr(ours, which, t_ours)
    setattr(ref, which, t_ref)
    for value in (0.1, 0.9, 0.5):
        t_ours.fill_(value)
        t_ref.fill_(value)
        for training in (True, False):
            ours.train(training), ref.train(training)
            y, y_t = ours(x), ref(x.cpu())
            assert_close(y, np64(y_t), torch.float32, what=f"y, {which}={value}")
            assert_close(ours.running_mean, np64(ref.running_mean), torch.float32, what="running_mean")
            assert_close(ours.running_var, np64(ref.running_var), torch.float32, what="running_var")


@pytest.mark.parametrize("name", ["input", "running_mean", "running_var", "weight", "bias", "residual"])
def test_views_with_the_negative_bit_give_torchs_result(name, device):
    """A view whose values read negated (``z.conj().imag``): torch resolves the bit, and so do we (its
    memory holds the other sign, so no kernel reads it)."""
    g = torch.Generator().manual_seed(141)
    args = dict(
        input=torch.randn(4, 3, 5, generator=g), running_mean=torch.randn(3, generator=g),
        running_var=torch.rand(3, generator=g) + 0.5, weight=torch.randn(3, generator=g),
        bias=torch.randn(3, generator=g), residual=torch.randn(4, 3, 5, generator=g),
    )  # fmt: skip
    for training in (True, False):
        ref = {k: v.clone() for k, v in args.items()}
        ours = {k: v.clone().to(device) for k, v in args.items()}
        ours[name] = torch._neg_view(ours[name].neg())  # the same values, read through the negative bit
        assert ours[name].is_neg()
        res = ref.pop("residual")
        y_t = torch.relu(F.batch_norm(**ref, training=training) + res)
        y = bn_triton.batch_norm(**ours, training=training, activation="relu")
        assert_close(y, np64(y_t), torch.float32, what=f"y, {name}")
        assert_close(ours["running_mean"], np64(ref["running_mean"]), torch.float32, what="running_mean")
