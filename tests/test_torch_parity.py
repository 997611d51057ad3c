"""torch parity: bn_triton.batch_norm and BatchNorm1d/2d/3d held to torch's behaviour, case by case.

The rule: where torch raises, we raise the same exception type (and torch's message, matched on a
distinctive fragment, where it has a meaningful one); where torch runs, we give its result: the
output, in training the in-place running_mean / running_var / num_batches_tracked updates, and the
gradients of input, weight and bias where the sample requires them. When we raise, nothing moved:
no kernel launched, running statistics and num_batches_tracked as they were. Each refusal is
checked twice in a row and, where the call has a valid twin (the same tensors, the offending one
made good), again after the twin ran: decisions cached per call signature must refuse on the first
call and on the Nth alike.

torch on CPU clones of the same tensors is the contract (its CUDA path differs in places), run in
each test; every expected error type and message fragment written here is checked against torch's
own first, so a torch that changes shows up as such. Where our rule is stricter than torch, the
test's docstring says so: per-channel tensors that are not 1-D (torch's forward takes a (1, C)
weight, its backward then refuses it), and nothing updated when a module's call fails (torch has
counted the batch in num_batches_tracked by then).

Last, a corpus: PyTorch's own OpInfo samples for nn.functional.batch_norm and the ModuleInfo
inputs of nn.BatchNorm1d/2d/3d, run through both.
"""

import re
import sys
import types
import unittest
from functools import cache

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import bn_triton
from bn_triton import launch
from tests.helpers import TOL, make

f16, bf16, f32, f64 = torch.float16, torch.bfloat16, torch.float32, torch.float64
DTYPE_IDS = {f16: "fp16", bf16: "bf16", f32: "fp32", f64: "fp64"}
TRAIN_EVAL = pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])


# ---------------------------------------------------------------- helpers
def _cpu(v):
    """A CPU clone for torch's reference call (requires_grad kept); meta tensors and non-tensors as they are."""
    if not isinstance(v, torch.Tensor) or v.device.type == "meta":
        return v
    return v.detach().cpu().clone().requires_grad_(v.requires_grad)


def _to(v, device):
    """A fresh leaf copy of v on device (requires_grad kept); non-tensors as they are."""
    if not isinstance(v, torch.Tensor):
        return v
    return v.detach().to(device).clone().requires_grad_(v.requires_grad)


def _launches() -> int:
    return sum(launch.LAUNCHES.values())


def _watch(*values) -> list:
    """The tensors among values that a refused call must leave as they were (meta tensors hold no values)."""
    return [v for v in values if isinstance(v, torch.Tensor) and v.device.type != "meta"]


def _torch_outcome(fn):
    """(fn's result, None), or (None, the exception fn raised)."""
    try:
        return fn(), None
    except Exception as e:
        return None, e


def _check_torch(err, exc, pattern):
    """torch itself does what the case says: raises exactly exc with pattern in its message, or (exc None) runs."""
    assert (None if err is None else type(err)) is exc, f"torch gave {err!r}; the case expects {exc}"
    if pattern is not None:
        assert re.search(pattern, str(err)), f"torch's message {str(err)!r} lacks {pattern!r}"


def _assert_refused(call, exc, pattern, watched, when):
    """call() raises exactly exc (message matching pattern, where given) and changes nothing: no kernel
    launched, each watched tensor bitwise as it was (NaN included)."""
    before = [t.detach().clone() for t in watched]
    launches = _launches()
    try:
        call()
    except Exception as e:
        err = e
    else:
        pytest.fail(f"{when}: no error, where {exc.__name__} is due")
    assert type(err) is exc, f"{when}: {type(err).__name__}: {err}, where {exc.__name__} is due"
    if pattern is not None:
        assert re.search(pattern, str(err)), f"{when}: message {str(err)!r} lacks {pattern!r}"
    assert _launches() == launches, f"{when}: a kernel ran before the error"
    for i, (t, b) in enumerate(zip(watched, before, strict=True)):
        torch.testing.assert_close(
            t.detach(), b, rtol=0, atol=0, equal_nan=True, msg=lambda m, i=i: f"{when}: watched tensor {i} moved: {m}"
        )


def _refused_every_time(call, exc, pattern, watched, valid=None):
    """Refused twice in a row; then, where the call has a valid twin, once more after the twin ran."""
    _assert_refused(call, exc, pattern, watched, "first call")
    _assert_refused(call, exc, pattern, watched, "second call")
    if valid is not None:
        valid()
        _assert_refused(call, exc, pattern, watched, "after a valid call")


def _assert_matches(got, want, what, scale=1.0, tol=None):
    """got (ours, on any device) equals want (torch's, on the CPU) within want's dtype tolerance; integer
    tensors exactly; meta tensors in shape and dtype; None is None."""
    if want is None or got is None:
        assert got is None and want is None, f"{what}: {got!r} where torch has {want!r}"
        return
    if want.device.type == "meta":
        assert got.device.type == "meta" and got.shape == want.shape and got.dtype == want.dtype, f"{what}: {got!r}"
        return
    tol = tol or TOL.get(want.dtype, dict(atol=0.0, rtol=0.0))
    torch.testing.assert_close(
        got.detach().cpu(),
        want.detach(),
        atol=tol["atol"] * scale,
        rtol=tol["rtol"],
        equal_nan=True,
        msg=lambda m: f"{what}: {m}",
    )


def _functional_parity(kwargs, exc=None, pattern=None, valid=None, watch=()):
    """bn_triton.batch_norm(**kwargs) against F.batch_norm on CPU clones. torch raises exc (checked): we
    refuse every time, watching every tensor in kwargs and in watch; ``valid(kwargs)`` gives the twin's
    kwargs. torch runs (exc None): our output and running statistics are torch's."""
    ref = {k: _cpu(v) for k, v in kwargs.items()}
    y_t, err = _torch_outcome(lambda: F.batch_norm(**ref))
    _check_torch(err, exc, pattern)
    if exc is not None:
        twin = None if valid is None else (lambda: bn_triton.batch_norm(**valid(kwargs)))
        watched = _watch(*kwargs.values(), *watch)
        _refused_every_time(lambda: bn_triton.batch_norm(**kwargs), exc, pattern, watched, twin)
        return
    y = bn_triton.batch_norm(**kwargs)
    _assert_matches(y, y_t, "y")
    for name in ("running_mean", "running_var"):
        if isinstance(kwargs.get(name), torch.Tensor):
            _assert_matches(kwargs[name], ref[name], name)


def _stats(C, device, dtype=f32, seed=0):
    """running_mean ~ N(0, 1) and running_var in [0.5, 1.5)."""
    g = torch.Generator().manual_seed(seed)
    rm = torch.randn(C, generator=g, dtype=f64).to(device, dtype)
    rv = (torch.rand(C, generator=g, dtype=f64) + 0.5).to(device, dtype)
    return rm, rv


def _affine(C, device, dtype=f32, seed=1):
    """weight ~ 1 + N(0, 0.25), bias ~ N(0, 0.25)."""
    g = torch.Generator().manual_seed(seed)
    w = (1.0 + 0.5 * torch.randn(C, generator=g, dtype=f64)).to(device, dtype)
    b = (0.5 * torch.randn(C, generator=g, dtype=f64)).to(device, dtype)
    return w, b


def _kwargs(device, shape=(4, 3, 5), training=True, dtype=f32, seed=2):
    """A complete, valid batch_norm call: input, running statistics, weight, bias, momentum, eps."""
    C = shape[1]
    rm, rv = _stats(C, device, dtype)
    w, b = _affine(C, device, dtype)
    x = make(shape, dtype, device, seed=seed)
    return dict(input=x, running_mean=rm, running_var=rv, weight=w, bias=b, training=training, momentum=0.1, eps=1e-5)


def _randomize(module, seed=3, num_batches=2):
    """Random weight, bias and running statistics (var > 0), num_batches_tracked = num_batches."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name in ("weight", "bias", "running_mean", "running_var"):
            t = getattr(module, name)
            if t is None:
                continue
            r = torch.randn(t.shape, generator=g, dtype=f64)
            r = {"weight": 1.0 + 0.5 * r, "bias": 0.5 * r, "running_mean": r, "running_var": r.abs() + 0.5}[name]
            t.copy_(r)
        if module.num_batches_tracked is not None:
            module.num_batches_tracked.fill_(num_batches)


def _module_pair(cls_name, args, kwargs, device, dtype=f32):
    """torch's module (CPU) and ours (on device), with the same random state."""
    ref = getattr(torch.nn, cls_name)(*args, **kwargs, dtype=dtype)
    _randomize(ref)
    ours = getattr(bn_triton, cls_name)(*args, **kwargs, device=device, dtype=dtype)
    ours.load_state_dict(ref.state_dict())
    return ref, ours


def _assert_module_matches(ours, ref, y, y_t, what=""):
    """Output and buffers (running statistics, num_batches_tracked) of our module equal torch's."""
    _assert_matches(y, y_t, f"{what}y")
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        _assert_matches(getattr(ours, name), getattr(ref, name), f"{what}{name}")


# ---------------------------------------------------------------- 1. per-channel tensors that are not 1-D
def _base(device, value):
    """16 slots: a view of 4 channels in it may be read or written out of place (ours wrote base[4], base[8]
    and base[12] for a (1, 4) running_mean), and the writes stay inside memory the test owns."""
    return torch.full((16,), value, device=device)


NOT_1D = {
    # id: (input shape, which argument, its view of the base, its dims)
    "running_mean_1x4": ((5, 4), "running_mean", lambda b: b[:4].view(1, 4), 2),
    "running_var_1x4": ((5, 4), "running_var", lambda b: b[:4].view(1, 4), 2),
    "running_mean_2x2": ((5, 4), "running_mean", lambda b: b[:4].view(2, 2), 2),
    "running_var_1x4_3d_input": ((3, 4, 5), "running_var", lambda b: b[:4].view(1, 4), 2),
    "running_mean_0d_C1": ((5, 1), "running_mean", lambda b: b[0], 0),
    "running_var_0d_C1": ((5, 1), "running_var", lambda b: b[0], 0),
}


@TRAIN_EVAL
@pytest.mark.parametrize("case", list(NOT_1D))
def test_running_stats_that_are_not_1d_are_refused(case, training, device):
    """torch: RuntimeError "TensorAccessor expected 1 dims but tensor has K", in training and in eval. Ours:
    the same, and the bases of the views untouched everywhere (the valid twin: the 1-D view base[:C])."""
    shape, name, view, dims = NOT_1D[case]
    C = shape[1]
    bases = {"running_mean": _base(device, 7.0), "running_var": _base(device, 3.0)}
    kw = dict(input=make(shape, f32, device, seed=10), training=training)
    kw.update({k: b[:C] for k, b in bases.items()})
    kw[name] = view(bases[name])
    pattern = f"TensorAccessor expected 1 dims but tensor has {dims}"
    valid = lambda k: {**k, name: bases[name][:C]}
    _functional_parity(kw, RuntimeError, pattern, valid, watch=bases.values())


@TRAIN_EVAL
@pytest.mark.parametrize("case", ["weight_1x4", "bias_1x4", "weight_2x2", "weight_0d_C1", "bias_0d_C1"])
def test_weight_and_bias_that_are_not_1d_are_refused(case, training, device):
    """Stricter than torch's forward, which takes a (1, C) weight (its backward then fails: "TensorAccessor
    expected 1 dims but tensor has 2"; for a bias, a gradient of the wrong shape). Our rule: any per-channel
    tensor that is not 1-D is refused with that RuntimeError before anything runs."""
    name, kind = case.split("_", 1)
    C = 1 if kind == "0d_C1" else 4
    base = _base(device, 1.0)
    bad = {"1x4": lambda: base[:4].view(1, 4), "2x2": lambda: base[:4].view(2, 2), "0d_C1": lambda: base[0]}[kind]()
    rm, rv = _stats(C, device)
    kw = dict(input=make((5, C), f32, device, seed=11), running_mean=rm, running_var=rv, training=training)
    kw[name] = bad
    call = lambda: bn_triton.batch_norm(**kw)
    valid = lambda: bn_triton.batch_norm(**{**kw, name: base[:C]})
    pattern = f"TensorAccessor expected 1 dims but tensor has {bad.dim()}"
    _refused_every_time(call, RuntimeError, pattern, _watch(base, rm, rv, kw["input"]), valid)


@TRAIN_EVAL
@pytest.mark.parametrize("bad", ["running_mean_1xC", "running_var_requires_grad"])
def test_module_refuses_bad_running_stats_without_counting_the_batch(bad, training, device):
    """A module's bad running statistic: torch raises as its functional does (TensorAccessor / not
    differentiable), after it counted the batch (num_batches_tracked.add_(1) comes first). Ours: the same
    RuntimeError, with num_batches_tracked and the running statistics as they were."""
    ref, ours = _module_pair("BatchNorm1d", (3,), {}, device)
    ref.train(training)
    ours.train(training)
    x = make((6, 3), f32, device, seed=12)
    base = _base(device, 7.0)
    if bad == "running_mean_1xC":
        ref.running_mean = _cpu(base)[:3].view(1, 3)
        ours.running_mean = base[:3].view(1, 3)
        pattern = "TensorAccessor expected 1 dims but tensor has 2"

        def valid():
            ours.running_mean = base[:3]
            ours(x)
            ours.running_mean = base[:3].view(1, 3)
    else:
        ref.running_var.requires_grad_()
        ours.running_var.requires_grad_()
        pattern = "is not differentiable with respect to argument 'running_var'"

        def valid():
            ours.running_var.requires_grad_(False)
            ours(x)
            ours.running_var.requires_grad_()

    _, err = _torch_outcome(lambda: ref(x.cpu()))
    _check_torch(err, RuntimeError, pattern)
    watched = _watch(base, ours.running_mean, ours.running_var, ours.num_batches_tracked)
    _refused_every_time(lambda: ours(x), RuntimeError, pattern, watched, valid)


# ---------------------------------------------------------------- 1. num_batches_tracked in a module
BOOL_COUNTER = "can't be cast to the desired output type Bool"  # torch's add_(1) on a bool counter
NBT_CASES = [
    # (id, momentum, num_batches_tracked on the device, torch's error type in training (None: it runs), its
    # message). In eval torch runs them all: the counter is not read.
    ("shape1", 0.1, lambda d: torch.tensor([3], device=d), None, None),
    ("shape2", 0.1, lambda d: torch.tensor([3, 4], device=d), None, None),  # both counted
    ("float", 0.1, lambda d: torch.tensor(3.0, device=d), None, None),
    ("int32", 0.1, lambda d: torch.tensor(3, dtype=torch.int32, device=d), None, None),
    ("meta", 0.1, lambda d: torch.tensor(3, device="meta"), None, None),
    ("minus1", 0.1, lambda d: torch.tensor(-1, device=d), None, None),
    ("none", 0.1, lambda d: None, None, None),
    ("bool", 0.1, lambda d: torch.tensor(True, device=d), RuntimeError, BOOL_COUNTER),
    ("shape1", None, lambda d: torch.tensor([3], device=d), None, None),
    (
        "shape2",
        None,
        lambda d: torch.tensor([3, 4], device=d),
        ValueError,
        "only one element tensors can be converted to Python scalars",
    ),
    ("float", None, lambda d: torch.tensor(3.0, device=d), None, None),
    ("int32", None, lambda d: torch.tensor(3, dtype=torch.int32, device=d), None, None),
    ("meta", None, lambda d: torch.tensor(3, device="meta"), RuntimeError, "meta"),
    ("none", None, lambda d: None, None, None),  # factor 0.0: the running statistics stay as they are
    ("bool", None, lambda d: torch.tensor(True, device=d), RuntimeError, BOOL_COUNTER),
]
NBT_IDS = [f"{c[0]}-{'cumulative' if c[1] is None else f'momentum{c[1]}'}" for c in NBT_CASES]


@TRAIN_EVAL
@pytest.mark.parametrize("name,momentum,build,exc,pattern", NBT_CASES, ids=NBT_IDS)
def test_module_num_batches_tracked(name, momentum, build, exc, pattern, training, device):
    """num_batches_tracked of any shape, dtype or device (meta), or None: where torch runs, our output,
    running statistics and counter are torch's (shape (2,): each slot counted; momentum=None with no counter:
    factor 0); where torch raises (momentum=None reads the counter on the host), we raise the same with
    nothing moved, though torch has counted the batch by then."""
    ref, ours = _module_pair("BatchNorm1d", (3,), dict(momentum=momentum), device)
    nbt = build(device)
    ref.num_batches_tracked, ours.num_batches_tracked = _cpu(nbt), nbt
    exc, pattern = (exc, pattern) if training else (None, None)
    ref.train(training)
    ours.train(training)
    x = make((6, 3), f32, device, offset=0.5, seed=13)
    y_t, err = _torch_outcome(lambda: ref(x.cpu()))
    _check_torch(err, exc, pattern)
    if exc is not None:

        def valid():
            ours.num_batches_tracked = torch.tensor(3, device=device)
            ours(x)
            ours.num_batches_tracked = nbt

        watched = _watch(ours.running_mean, ours.running_var, nbt)
        _refused_every_time(lambda: ours(x), exc, pattern, watched, valid)
        return
    _assert_module_matches(ours, ref, ours(x), y_t)


def test_module_cumulative_average_with_counter_at_minus_one():
    """momentum=None with num_batches_tracked = -1: torch counts the batch (0), then takes 1 / 0 on the
    host: ZeroDivisionError. Ours: the same error on CPU tensors, the counter still -1 and the running
    statistics untouched. (A CUDA counter is read on the device, where no host error can arise.)"""
    device = "cpu"
    ref, ours = _module_pair("BatchNorm1d", (3,), dict(momentum=None), device)
    ref.num_batches_tracked.fill_(-1)
    ours.num_batches_tracked.fill_(-1)
    x = make((6, 3), f32, device, seed=14)
    _, err = _torch_outcome(lambda: ref(x))
    _check_torch(err, ZeroDivisionError, None)

    def valid():
        ours.num_batches_tracked.fill_(3)
        ours(x)
        ours.num_batches_tracked.fill_(-1)

    watched = _watch(ours.running_mean, ours.running_var, ours.num_batches_tracked)
    _refused_every_time(lambda: ours(x), ZeroDivisionError, None, watched, valid)


# ---------------------------------------------------------------- 2. running statistics that require grad
@pytest.mark.parametrize("x_requires_grad", [False, True], ids=["x", "x_requires_grad"])
@TRAIN_EVAL
@pytest.mark.parametrize("which", ["running_mean", "running_var", "both"])
def test_running_stats_requiring_grad_are_refused(which, training, x_requires_grad, device):
    """torch: RuntimeError "The function 'native_batch_norm' is not differentiable with respect to argument
    'running_mean'. This input cannot have requires_grad True." (running_mean named first when both)."""
    kw = _kwargs(device, training=training)
    kw["input"].requires_grad_(x_requires_grad)
    names = ["running_mean", "running_var"] if which == "both" else [which]
    for n in names:
        kw[n].requires_grad_()
    first = names[0]
    pattern = (
        f"The function 'native_batch_norm' is not differentiable with respect to argument '{first}'. "
        "This input cannot have requires_grad True."
    )
    valid = lambda k: {**k, **{n: k[n].detach() for n in names}}
    _functional_parity(kw, RuntimeError, re.escape(pattern), valid)


@TRAIN_EVAL
def test_running_stats_requiring_grad_under_no_grad(training, device):
    """Under torch.no_grad torch runs (nothing is recorded): so do we, with its output and running statistics."""
    kw = _kwargs(device, training=training)
    kw["running_mean"].requires_grad_()
    kw["running_var"].requires_grad_()
    with torch.no_grad():
        _functional_parity(kw)


# ---------------------------------------------------------------- 4. dtype mixes
# torch's CPU messages for a refused mix: "expected scalar type Half but found Float", "mixed dtype (CPU):
# expect parameter to have scalar type of Float", "mixed dtype (CPU): all inputs must share same datatype."
# (which one depends on the mix); the fragment asks for one of those wordings.
DTYPE_MESSAGE = r"expected scalar type|mixed dtype"
DTYPE_CASES = [
    # (id, input, weight, bias, running_mean, running_var (None: not given), torch raises)
    ("f64_input_f32_weight", f64, f32, f64, f64, f64, True),
    ("f64_input_f32_running_stats", f64, f64, f64, f32, f32, True),
    ("f64_input_all_f32", f64, f32, f32, f32, f32, True),
    ("f16_input_f16_affine_f32_stats", f16, f16, f16, f32, f32, True),
    ("f16_input_f32_affine_f16_stats", f16, f32, f32, f16, f16, True),
    ("bf16_input_bf16_affine_f32_stats", bf16, bf16, bf16, f32, f32, True),
    ("bf16_input_f32_affine_bf16_stats", bf16, f32, f32, bf16, bf16, True),
    ("f32_mean_f16_var", f32, f32, f32, f32, f16, True),
    ("f32_input_f16_weight", f32, f16, f32, f32, f32, True),
    ("f32_input_f64_weight", f32, f64, f32, f32, f32, True),
    ("f32_input_f16_stats", f32, f32, f32, f16, f16, True),
    ("f16_input_all_bf16", f16, bf16, bf16, bf16, bf16, True),
    ("f16_input_f16_weight_f32_bias", f16, f16, f32, None, None, True),
    ("f16_input_all_f32", f16, f32, f32, f32, f32, False),
    ("bf16_input_all_f32", bf16, f32, f32, f32, f32, False),
    ("f16_input_all_f16", f16, f16, f16, f16, f16, False),
    ("bf16_input_all_bf16", bf16, bf16, bf16, bf16, bf16, False),
    ("f16_input_f16_stats_no_affine", f16, None, None, f16, f16, False),
    ("f16_input_f32_affine_no_stats", f16, f32, f32, None, None, False),
]


DTYPE_PARAMS = [
    pytest.param(*c[1:], training, id=f"{c[0]}-{'train' if training else 'eval'}")
    for c in DTYPE_CASES
    for training in (True, False)
    if training or c[4] is not None  # eval needs running statistics
]


@pytest.mark.parametrize("x,w,b,rm,rv,raises,training", DTYPE_PARAMS)
def test_dtype_mixes(x, w, b, rm, rv, raises, training, device):
    """The per-channel tensors share one dtype, the input's, or float32 for a float16/bfloat16 input: torch
    refuses any other mix with a RuntimeError, and runs these (our result is torch's). The valid twin: every
    per-channel tensor in the input's dtype."""
    C = 3
    mean, var = _stats(C, device)
    weight, bias = _affine(C, device)
    kw = dict(input=make((4, C, 5), x, device, seed=15), training=training)
    for key, t, dt in (("weight", weight, w), ("bias", bias, b), ("running_mean", mean, rm), ("running_var", var, rv)):
        kw[key] = None if dt is None else t.to(dt)
    valid = lambda k: {n: (v.to(x) if isinstance(v, torch.Tensor) and n != "input" else v) for n, v in k.items()}
    if raises:
        _functional_parity(kw, RuntimeError, DTYPE_MESSAGE, valid)
    else:
        _functional_parity(kw)


# ---------------------------------------------------------------- 5. argument types, and the values torch takes
ARG_CASES = [
    # (id, overrides of a valid training call (device -> dict), torch's error type (None: it runs),
    #  its message fragment)
    (
        "input_list_eval",
        lambda d: dict(input=[[1.0, 2.0, 3.0]] * 4, training=False),
        TypeError,
        r"argument 'input' \(position 1\) must be Tensor, not list",
    ),
    # training: F.batch_norm reads input.size() in Python first
    ("input_list_train", lambda d: dict(input=[[1.0, 2.0, 3.0]] * 4), AttributeError, None),
    ("weight_list", lambda d: dict(weight=[1.0] * 3), TypeError, r"'weight' \(position 2\) must be Tensor, not list"),
    ("bias_list", lambda d: dict(bias=[0.0] * 3), TypeError, r"'bias' \(position 3\) must be Tensor, not list"),
    (
        "running_mean_list",
        lambda d: dict(running_mean=[0.0] * 3),
        TypeError,
        r"'running_mean' \(position 4\) must be Tensor, not list",
    ),
    (
        "running_var_list",
        lambda d: dict(running_var=[1.0] * 3),
        TypeError,
        r"'running_var' \(position 5\) must be Tensor, not list",
    ),
    ("weight_float", lambda d: dict(weight=1.0), TypeError, r"'weight' \(position 2\) must be Tensor, not float"),
    ("training_1", lambda d: dict(training=1), TypeError, r"'training' \(position 6\) must be bool, not int"),
    ("training_0", lambda d: dict(training=0), TypeError, r"'training' \(position 6\) must be bool, not int"),
    (
        "training_None",
        lambda d: dict(training=None),
        TypeError,
        r"'training' \(position 6\) must be bool, not NoneType",
    ),
    ("training_str", lambda d: dict(training="yes"), TypeError, r"'training' \(position 6\) must be bool, not str"),
    (
        "training_tensor",
        lambda d: dict(training=torch.tensor(True)),
        TypeError,
        r"'training' \(position 6\) must be bool, not Tensor",
    ),
    ("momentum_str", lambda d: dict(momentum="0.1"), TypeError, r"'momentum' \(position 7\) must be float, not str"),
    (
        "momentum_1d_tensor",
        lambda d: dict(momentum=torch.tensor([0.1])),
        TypeError,
        r"'momentum' \(position 7\) must be float, not Tensor",
    ),
    (
        "eps_1d_tensor",
        lambda d: dict(eps=torch.tensor([1e-3])),
        TypeError,
        r"'eps' \(position 8\) must be float, not Tensor",
    ),
    (
        "eps_1d_tensor_eval",
        lambda d: dict(eps=torch.tensor([1e-3]), training=False),
        TypeError,
        r"'eps' \(position 8\) must be float, not Tensor",
    ),
    ("eps_str", lambda d: dict(eps="1e-5"), TypeError, None),  # torch's own eps check compares a str: Python's
    ("eps_0d_tensor", lambda d: dict(eps=torch.tensor(1e-3)), None, None),
    ("eps_0d_tensor_eval", lambda d: dict(eps=torch.tensor(1e-3), training=False), None, None),
    ("eps_0d_f64_tensor", lambda d: dict(eps=torch.tensor(1e-3, dtype=f64)), None, None),
    ("eps_int", lambda d: dict(eps=1), None, None),
    ("eps_bool", lambda d: dict(eps=True), None, None),
    ("momentum_int_1", lambda d: dict(momentum=1), None, None),
    ("momentum_int_0", lambda d: dict(momentum=0), None, None),
    ("momentum_bool", lambda d: dict(momentum=True), None, None),
    ("eps_np_float32", lambda d: dict(eps=np.float32(1e-3)), None, None),
    ("eps_np_float64_eval", lambda d: dict(eps=np.float64(1e-3), training=False), None, None),
    ("momentum_np_int64", lambda d: dict(momentum=np.int64(0)), None, None),
    ("momentum_np_float32", lambda d: dict(momentum=np.float32(0.3)), None, None),
    ("momentum_0d_tensor", lambda d: dict(momentum=torch.tensor(0.3)), None, None),
]


@pytest.mark.parametrize("name,build,exc,pattern", ARG_CASES, ids=[c[0] for c in ARG_CASES])
def test_argument_types(name, build, exc, pattern, device):
    """torch's argument parser: a non-Tensor per-channel argument, a non-bool training, a str or 1-element
    tensor momentum or eps are TypeErrors naming the argument and torch.batch_norm's position; a 0-d tensor,
    int or bool eps or momentum are numbers (our result is torch's). The valid twin: the valid call with
    the same tensors (and the same training, where that is a bool)."""
    good = _kwargs(device)
    kw = {**good, **build(device)}
    valid = lambda k: {**good, "training": k["training"] if isinstance(k["training"], bool) else True}
    _functional_parity(kw, exc, pattern, valid)


# ---------------------------------------------------------------- 5. inputs of rank 0 and 1
RANK_CASES = [
    # (id, input, running statistics' size (None: not given), training, torch's error type, its message)
    ("empty_1d_stats0_train", (0,), 0, True, None, None),
    ("empty_1d_stats0_eval", (0,), 0, False, None, None),
    ("empty_1d_no_stats_train", (0,), None, True, None, None),
    ("1d_stats3_train", (3,), 3, True, RuntimeError, "running_mean should contain 0 elements not 3"),
    ("1d_stats3_eval", (3,), 3, False, RuntimeError, "running_mean should contain 0 elements not 3"),
    (
        "1d_no_stats_train",
        (3,),
        None,
        True,
        IndexError,
        r"Dimension out of range \(expected to be in range of \[-1, 0\], but got 1\)",
    ),
    ("1d_no_stats_eval", (3,), None, False, RuntimeError, "running_mean must be defined in evaluation mode"),
    (
        "1d_one_value_train",
        (1,),
        1,
        True,
        ValueError,
        r"Expected more than 1 value per channel when training, got input size torch.Size\(\[1\]\)",
    ),
    ("1d_one_value_eval", (1,), 1, False, RuntimeError, "running_mean should contain 0 elements not 1"),
    ("0d_stats1_train", (), 1, True, IndexError, None),  # Python's "tuple index out of range" in F.batch_norm
    ("0d_stats1_eval", (), 1, False, RuntimeError, "running_mean should contain 0 elements not 1"),
    ("0d_no_stats_eval", (), None, False, RuntimeError, "running_mean must be defined in evaluation mode"),
]


@pytest.mark.parametrize("name,shape,C,training,exc,pattern", RANK_CASES, ids=[c[0] for c in RANK_CASES])
def test_rank_0_and_1_inputs(name, shape, C, training, exc, pattern, device):
    """torch takes a 1-D input as (N,) with C = 0: an empty one runs (an empty result, in training and
    eval), any other is refused with its own errors; a 0-d input too."""
    rm, rv = (None, None) if C is None else _stats(C, device)
    x = make(shape, f32, device, seed=16) if shape else torch.tensor(0.5, device=device)
    _functional_parity(dict(input=x, running_mean=rm, running_var=rv, training=training), exc, pattern)


# ---------------------------------------------------------------- 5. dtypes torch has no batch_norm for, empty batches
OTHER_DTYPES = [torch.int64, torch.int32, torch.uint8, torch.bool, torch.complex64, torch.float8_e4m3fn]


@pytest.mark.parametrize("dtype", OTHER_DTYPES, ids=str)
@TRAIN_EVAL
def test_inputs_of_other_dtypes_are_not_implemented_like_torch(dtype, training, device):
    """torch has no batch_norm kernel for integer, bool, complex or float8 inputs: NotImplementedError
    ('"batch_norm" not implemented for 'Long''), after its shape checks; an empty one runs."""
    x = torch.ones(4, 3, 5).to(dtype)
    rm, rv = _stats(3, device)
    kw = dict(input=x.to(device), running_mean=rm, running_var=rv, training=training)
    _functional_parity(kw, NotImplementedError, r'"batch_norm" not implemented for \'\w+\'')
    bad_size = dict(kw, running_mean=rm[:2], running_var=rv[:2])
    _functional_parity(bad_size, RuntimeError, "running_mean should contain 3 elements not 2")
    _functional_parity(dict(kw, input=torch.ones(0, 3, 5).to(dtype).to(device)))


EMPTY_BATCHES = {
    # id: overrides of a float32 call on an empty (0, 3, 2, 2) batch that torch runs regardless
    "float64_input": lambda d: dict(input=torch.randn(0, 3, 2, 2, dtype=f64, device=d)),
    "running_stats_of_other_size": lambda d: dict(running_mean=torch.zeros(5, device=d), running_var=torch.ones(5)),
    "running_stats_not_1d": lambda d: dict(running_mean=torch.zeros(1, 3, device=d), running_var=torch.ones(1, 3)),
    "float16_weight": lambda d: dict(weight=torch.ones(3, dtype=torch.float16, device=d)),
    "eval_without_running_stats": lambda d: dict(running_mean=None, running_var=None, training=False),
}


@pytest.mark.parametrize("case", EMPTY_BATCHES)
def test_empty_batches_return_before_other_checks_like_torch(case, device):
    """torch's empty-batch exit comes before its dtype, size and rank checks: an empty output."""
    kw = dict(_kwargs(device), input=torch.randn(0, 3, 2, 2, device=device))
    _functional_parity({**kw, **EMPTY_BATCHES[case](device)})


def test_module_empty_batch_of_another_dtype_like_torch(device):
    ref, ours = _module_pair("BatchNorm2d", (3,), {}, device)
    x = torch.randn(0, 3, 2, 2, dtype=f64)
    y, y_t = ours(x.to(device)), ref(x)
    assert y.shape == y_t.shape and y.dtype == y_t.dtype
    _assert_module_matches(ours, ref, y, y_t)


def test_module_numpy_hyperparameters_like_torch(device):
    """NumPy scalars as a module's eps and momentum, as torch's argument parser takes any real number."""
    ref, ours = _module_pair("BatchNorm1d", (3,), dict(eps=np.float32(1e-3), momentum=np.int64(1)), device)
    x = make((6, 3), f32, device, seed=17)
    for training in (True, False):
        ref.train(training), ours.train(training)
        _assert_module_matches(ours, ref, ours(x), ref(x.cpu()))


# ---------------------------------------------------------------- 6. PyTorch's OpInfo and ModuleInfo corpus
@cache
def _torch_testing():
    """PyTorch's op_db and module_db. torch.testing._internal.common_utils imports expecttest (for its
    TestCase base class only), which is not a dependency of ours: a stand-in serves where it is missing.
    That import also freezes torch.backends' flags (torch's own test-suite guard, which would make a later
    ``torch.backends.cudnn.benchmark = ...`` raise): they are unfrozen again if they were not before."""
    frozen = torch.backends.flags_frozen()
    stub = None
    if "expecttest" not in sys.modules:
        try:
            import expecttest  # noqa: F401
        except ImportError:
            stub = sys.modules["expecttest"] = types.ModuleType("expecttest")
            stub.TestCase = unittest.TestCase
    try:
        from torch.testing._internal.common_methods_invocations import op_db
        from torch.testing._internal.common_modules import module_db
    finally:
        if stub is not None:
            del sys.modules["expecttest"]
        if not frozen:
            torch.backends.flags_frozen.__globals__["__allow_nonbracketed_mutation_flag"] = True
    return op_db, module_db


# The interpreter runs one program after another: a sample of more than ~20k elements takes seconds,
# so such samples are left out (the ones in torch 2.13 have at most a few hundred).
MAX_ELEMS = 20_000
CORPUS_DTYPES = [f32, f64, bf16, f16]
# The interpreter rounds to bfloat16 by truncation, torch to nearest: bf16 results may be a few ulps
# (2^-8 relative each) apart.
CORPUS_TOL = {**TOL, bf16: dict(atol=4e-2, rtol=4e-2)}


@cache
def _opinfo_samples(dtype) -> tuple:
    """The OpInfo samples of nn.functional.batch_norm (CPU, requires_grad=True), the same in every process."""
    (op,) = [o for o in _torch_testing()[0] if o.name == "nn.functional.batch_norm" and not o.variant_test_name]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return tuple(s for s in op.sample_inputs("cpu", dtype, requires_grad=True) if s.input.numel() <= MAX_ELEMS)


def _describe(x, kwargs) -> str:
    """A readable id: "5x5x5-train-momentum0.5-eps0.6", "len0-eval", "2x1-default" (training not given)."""
    shape = f"len{x.numel()}" if x.dim() == 1 else "x".join(map(str, x.shape))
    parts = [shape]
    for k, v in kwargs.items():
        parts.append(("train" if v else "eval") if k == "training" else f"{k}{v}")
    return "-".join(parts if len(parts) > 1 else [shape, "default"])


OPINFO_PARAMS = [
    pytest.param(dtype, i, id=f"{DTYPE_IDS[dtype]}-{i}-{_describe(s.input, s.kwargs)}")
    for dtype in CORPUS_DTYPES
    for i, s in enumerate(_opinfo_samples(dtype))
]


@pytest.mark.parametrize("dtype,index", OPINFO_PARAMS)
def test_opinfo_sample(dtype, index, device):
    """PyTorch's OpInfo samples for nn.functional.batch_norm (its error_inputs: none in torch 2.13): output,
    running statistics, and the gradients of input, weight and bias, as torch's."""
    s = _opinfo_samples(dtype)[index]
    names = ("input", "running_mean", "running_var", "weight", "bias")
    theirs = [_cpu(v) for v in (s.input, *s.args)]
    ours = [_to(v, device) for v in (s.input, *s.args)]
    tol = CORPUS_TOL[dtype]
    y_t, err = _torch_outcome(lambda: F.batch_norm(*theirs, **s.kwargs))
    if err is not None:
        _refused_every_time(lambda: bn_triton.batch_norm(*ours, **s.kwargs), type(err), None, _watch(*ours))
        return
    y = bn_triton.batch_norm(*ours, **s.kwargs)
    _assert_matches(y, y_t, "y", tol=tol)
    for n, a, b in zip(names[1:3], ours[1:3], theirs[1:3], strict=True):
        _assert_matches(a, b, n, tol=tol)
    if y_t.requires_grad:
        dy = make(y_t.shape, dtype, "cpu", seed=17)
        y_t.backward(dy)
        y.backward(dy.to(device))
        for n, a, b in zip(names, ours, theirs, strict=True):
            if isinstance(b, torch.Tensor) and b.requires_grad:
                _assert_matches(a.grad, b.grad, f"d{n}", scale=4, tol=tol)


def _module_info(cls_name):
    (mi,) = [m for m in _torch_testing()[1] if m.module_cls is getattr(torch.nn, cls_name)]
    return mi


@cache
def _module_inputs(cls_name, dtype, training) -> tuple:
    """The ModuleInfo inputs of torch.nn.<cls_name> (CPU, requires_grad=True), the same in every process."""
    mi = _module_info(cls_name)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        inputs = mi.module_inputs_func(mi, device="cpu", dtype=dtype, requires_grad=True, training=training)
    return tuple(m for m in inputs if m.forward_input.args[0].numel() <= MAX_ELEMS)  # as MAX_ELEMS says


MODULE_PARAMS = [
    pytest.param(
        cls_name,
        dtype,
        training,
        i,
        id=f"{cls_name}-{DTYPE_IDS[dtype]}-{'train' if training else 'eval'}-{i}-{m.desc or 'default'}",
    )
    for cls_name in ("BatchNorm1d", "BatchNorm2d", "BatchNorm3d")
    for dtype in (f32, f64)
    for training in (True, False)
    for i, m in enumerate(_module_inputs(cls_name, dtype, training))
]


@pytest.mark.parametrize("cls_name,dtype,training,index", MODULE_PARAMS)
def test_moduleinfo_input(cls_name, dtype, training, index, device):
    """PyTorch's ModuleInfo inputs of nn.BatchNorm1d/2d/3d, in training two steps (the second on another
    batch: a cumulative average moves its factor), in eval one: outputs, running statistics,
    num_batches_tracked, and the gradients of input, weight and bias, as torch's module with the same
    constructor arguments and state."""
    m = _module_inputs(cls_name, dtype, training)[index]
    ref, ours = _module_pair(cls_name, m.constructor_input.args, m.constructor_input.kwargs, device, dtype)
    ref.train(training)
    ours.train(training)
    params = [n for n, _ in ref.named_parameters()]
    for step, (scale, offset) in enumerate([(1.0, 0.0), (1.5, 0.5)][: 2 if training else 1]):
        base = m.forward_input.args[0].detach() * scale + offset
        x_t = base.clone().requires_grad_()
        x = base.to(device).requires_grad_()
        y_t, err = _torch_outcome(lambda x_t=x_t: ref(x_t))
        if err is not None:
            watched = _watch(ours.running_mean, ours.running_var, ours.num_batches_tracked)
            _refused_every_time(lambda x=x: ours(x), type(err), None, watched)
            return
        y = ours(x)
        _assert_module_matches(ours, ref, y, y_t, what=f"step {step}: ")
        dy = make(y_t.shape, dtype, "cpu", seed=18 + step)
        y_t.backward(dy)
        y.backward(dy.to(device))
        _assert_matches(x.grad, x_t.grad, f"step {step}: dx", scale=4)
        for n in params:
            _assert_matches(getattr(ours, n).grad, getattr(ref, n).grad, f"step {step}: d{n}", scale=4)
            getattr(ours, n).grad = None
            getattr(ref, n).grad = None
