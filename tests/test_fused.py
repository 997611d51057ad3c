"""Fused BN + ReLU and BN + residual add (+ ReLU): batch_norm(..., activation=, residual=) and the modules.

Checked against the float64 NumPy reference (forward, every gradient, running stats) and against
torch's own composition relu(batch_norm(x) + residual) as a second opinion.

How the cross product was pruned (the interpreter runs one program after another):
* The fusion adds loads/stores and a mask to kernels whose tiling the core tests already cover for
  every (rank, layout, dtype). So every (rank, layout) runs every fusion ("relu", "add", "add_relu")
  in training and eval in float32; float16 and bfloat16 (which change only the loads, the stores
  and the rounding before the ReLU mask) run the two ReLU fusions on three (rank, layout) pairs
  that cover both kernel layouts (channel-contiguous 2-D and 4-D channels_last, spatial-contiguous 5-D).
* Every needs_input_grad subset runs on one small 4-D shape: the subsets pick the backward's
  branches (which passes run, whether d(residual) is written), not the layout.
* gradcheck (float64, fast mode) runs both ReLU fusions once per mode.
"""

import itertools

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import bn_triton
from bn_triton import functional, launch, ops, reference
from tests.helpers import SHAPES, TOL, assert_close, layouts_for, make, np64, train_launches

FUSIONS = {"relu": ("relu", False), "add": (None, True), "add_relu": ("relu", True)}
FP32_CASES = [
    (rank, layout, fusion, training)
    for rank in SHAPES
    for layout in layouts_for(rank)
    for fusion in FUSIONS
    for training in (True, False)
]
HALF_CASES = [
    (rank, layout, fusion, training, dtype)
    for rank, layout in ((2, "contiguous"), (4, "channels_last"), (5, "contiguous"))
    for fusion in ("relu", "add_relu")
    for training in (True, False)
    for dtype in (torch.float16, torch.bfloat16)
]
EPS = 1e-5
MOMENTUM = 0.1


def _per_channel(v, x):
    return np.asarray(v, np.float64).reshape((1, -1) + (1,) * (x.ndim - 2))


def _expected(x, w, b, r, rm, rv, training, relu, dy, y_ours):
    """float64 forward, and the gradients with the ReLU mask taken from our output (y > 0).

    The mask comes from our y because the reference's own pre-activation may sit on the other side
    of 0 within rounding; the forward check (y against the float64 output) bounds that.
    """
    x64, dy64 = np64(x), np64(dy)
    w64 = None if w is None else np64(w)
    b64 = None if b is None else np64(b)
    axes = (0,) + tuple(range(2, x64.ndim))
    if training:
        y, mean, var = reference.forward(x64, w64, b64, EPS)
    else:
        y = reference.eval_forward(x64, np64(rm), np64(rv), w64, b64, EPS)
    if r is not None:
        y = y + np64(r)
    if relu:
        y = np.maximum(y, 0.0)
        g = dy64 * (np64(y_ours) > 0)
    else:
        g = dy64
    if training:
        dx, dw, db = reference.backward(g, x64, w64, EPS)
        m = x64.size // x64.shape[1]
        stats = reference.running_stats(np64(rm), np64(rv), mean, var, m, MOMENTUM)
    else:
        dx = reference.eval_backward(g, np64(rv), w64, EPS)
        xhat = (x64 - _per_channel(np64(rm), x64)) / np.sqrt(_per_channel(np64(rv), x64) + EPS)
        dw, db = (g * xhat).sum(axis=axes), g.sum(axis=axes)
        stats = (np64(rm), np64(rv))
    return y, dict(x=dx, w=dw, b=db, r=g), stats


def _inputs(shape, layout, dtype, device, has_residual, residual_layout=None):
    C = shape[1]
    x = make(shape, dtype, device, layout, seed=0)
    # The per-channel tensors share one dtype: float32 for 16-bit inputs (mixed precision's layout).
    pdtype = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
    w = make((C,), pdtype, device, scale=0.5, offset=1.0, seed=1)
    b = make((C,), pdtype, device, scale=0.5, seed=2)
    r = make(shape, dtype, device, residual_layout or layout, seed=3) if has_residual else None
    rm = make((C,), pdtype, device, scale=0.3, seed=4)
    rv = make((C,), pdtype, device, scale=0.2, offset=1.0, seed=5)
    return x, w, b, r, rm, rv


def _run(x, w, b, r, rm, rv, training, activation, dy, wanted="xwbr"):
    """Ours: output and the gradients asked for (a dict keyed like _expected's)."""
    leaves = dict(x=x, w=w, b=b, r=r)
    grads = {k: v.detach().requires_grad_(k in wanted) for k, v in leaves.items() if v is not None}
    before = launch.LAUNCHES.copy()
    y = bn_triton.batch_norm(
        grads["x"],
        rm,
        rv,
        grads["w"],
        grads["b"],
        training,
        MOMENTUM,
        EPS,
        activation=activation,
        residual=grads.get("r"),
    )
    inputs = [k for k, t in grads.items() if t.requires_grad]
    _run.forward_launches = launch.LAUNCHES - before
    got = dict(zip(inputs, torch.autograd.grad(y, [grads[k] for k in inputs], dy), strict=True)) if inputs else {}
    return y, got


def _torch_composition(x, w, b, r, rm, rv, training, relu, dy, torch_bn_forbidden):
    """torch's relu(batch_norm(x) + residual), in float32 on the CPU, with its gradients."""
    with torch_bn_forbidden.allowed():
        leaves = {
            k: v.detach().float().cpu().requires_grad_() for k, v in dict(x=x, w=w, b=b, r=r).items() if v is not None
        }
        rm_t, rv_t = rm.detach().float().cpu().clone(), rv.detach().float().cpu().clone()
        y = F.batch_norm(leaves["x"], rm_t, rv_t, leaves["w"], leaves["b"], training, MOMENTUM, EPS)
        if r is not None:
            y = y + leaves["r"]
        if relu:
            y = torch.relu(y)
        got = dict(zip(leaves, torch.autograd.grad(y, list(leaves.values()), dy.float().cpu()), strict=True))
    return y, got, (rm_t, rv_t)


def _check(x, w, b, r, rm, rv, training, activation, device, torch_bn_forbidden):
    dtype = x.dtype
    relu = activation == "relu"
    rm0, rv0 = rm.clone(), rv.clone()
    dy = make(x.shape, dtype, device, seed=6)
    y, got = _run(x, w, b, r, rm, rv, training, activation, dy)
    # The add and the ReLU ride in the normalize pass: the forward launches what plain BN launches
    # (the running statistics are updated inside the statistics launch).
    expected = train_launches(x)[0] if training else {"normalize": 1}
    assert dict(_run.forward_launches) == expected
    assert y.shape == x.shape and y.dtype == dtype
    if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
        assert y.is_contiguous(memory_format=torch.channels_last)

    y_ref, g_ref, (rm_ref, rv_ref) = _expected(x, w, b, r, rm0, rv0, training, relu, dy, y)
    m = x.numel() // x.shape[1]
    assert_close(y, y_ref, dtype, what="y")
    assert_close(got["x"], g_ref["x"], dtype, scale=4, what="dx")
    assert_close(got["w"], g_ref["w"], dtype, scale=m, what="dweight")
    assert_close(got["b"], g_ref["b"], dtype, scale=m, what="dbias")
    if r is not None:
        # d(residual) is dy masked: exact, no arithmetic.
        assert_close(got["r"], g_ref["r"], torch.float64, what="dresidual")
        assert got["r"].dtype == r.dtype
    assert_close(rm, rm_ref, torch.float32, what="running_mean")
    assert_close(rv, rv_ref, torch.float32, what="running_var")
    if relu:
        assert (y >= 0).all()

    # Second opinion: torch's composition on the same (rounded) inputs, in float32.
    yt, gt, (rm_t, rv_t) = _torch_composition(x, w, b, r, rm0, rv0, training, relu, dy, torch_bn_forbidden)
    tol = TOL[dtype]
    torch.testing.assert_close(y.float().cpu(), yt, **tol)
    for k in gt:
        scale = m if k in "wb" else 4
        torch.testing.assert_close(got[k].float().cpu(), gt[k], atol=tol["atol"] * scale, rtol=tol["rtol"], msg=k)
    torch.testing.assert_close(rm.cpu(), rm_t, **TOL[torch.float32])
    torch.testing.assert_close(rv.cpu(), rv_t, **TOL[torch.float32])


@pytest.mark.parametrize("rank,layout,fusion,training", FP32_CASES)
def test_fused_float32(rank, layout, fusion, training, device, torch_bn_forbidden):
    activation, has_residual = FUSIONS[fusion]
    x, w, b, r, rm, rv = _inputs(SHAPES[rank], layout, torch.float32, device, has_residual)
    _check(x, w, b, r, rm, rv, training, activation, device, torch_bn_forbidden)


@pytest.mark.parametrize("rank,layout,fusion,training,dtype", HALF_CASES)
def test_fused_half(rank, layout, fusion, training, dtype, device, torch_bn_forbidden):
    activation, has_residual = FUSIONS[fusion]
    x, w, b, r, rm, rv = _inputs(SHAPES[rank], layout, dtype, device, has_residual)
    _check(x, w, b, r, rm, rv, training, activation, device, torch_bn_forbidden)


@pytest.mark.parametrize(
    "rank,x_layout,r_layout",
    [
        (4, "contiguous", "channels_last"),
        (4, "channels_last", "contiguous"),
        (4, "channels_last", "strided"),  # a non-contiguous residual: copied into x's layout
        (5, "channels_last_3d", "strided"),
        (3, "contiguous", "strided"),
    ],
)
def test_residual_in_another_layout(rank, x_layout, r_layout, device, torch_bn_forbidden):
    x, w, b, r, rm, rv = _inputs(SHAPES[rank], x_layout, torch.float32, device, True, residual_layout=r_layout)
    _check(x, w, b, r, rm, rv, True, "relu", device, torch_bn_forbidden)


def _subsets(names):
    return ["".join(s) for n in range(1, len(names) + 1) for s in itertools.combinations(names, n)]


GRAD_CASES = [
    (training, has_residual, wanted)
    for training in (True, False)
    for has_residual in (True, False)
    for wanted in _subsets("xwbr" if has_residual else "xwb")
]


@pytest.mark.parametrize("training,has_residual,wanted", GRAD_CASES)
def test_relu_needs_input_grad(training, has_residual, wanted, device):
    """Every subset of requires_grad: the gradients asked for are right, the others are not computed."""
    x, w, b, r, rm, rv = _inputs((2, 3, 4, 5), "contiguous", torch.float32, device, has_residual)
    rm0, rv0 = rm.clone(), rv.clone()
    dy = make(x.shape, torch.float32, device, seed=6)
    y, got = _run(x, w, b, r, rm, rv, training, "relu", dy, wanted)
    _, g_ref, _ = _expected(x, w, b, r, rm0, rv0, training, True, dy, y)
    assert set(got) == set(wanted)
    m = x.numel() // x.shape[1]
    for k in wanted:
        assert_close(got[k], g_ref[k], torch.float32, scale=m if k in "wb" else 4, what=k)


@pytest.mark.parametrize("fusion,training", [("relu", True), ("add_relu", True), ("relu", False), ("add_relu", False)])
def test_gradcheck_float64(fusion, training, device):
    activation, has_residual = FUSIONS[fusion]
    x, w, b, r, rm, rv = _inputs((3, 2, 4), "contiguous", torch.float64, device, has_residual)
    rm, rv = rm.double(), rv.double()
    leaves = [t.detach().requires_grad_() for t in (x, w, b, r) if t is not None]

    def fn(x, w, b, r=None):
        # Fresh running stats each call: gradcheck calls fn many times.
        return bn_triton.batch_norm(
            x, rm.clone(), rv.clone(), w, b, training, MOMENTUM, EPS, activation=activation, residual=r
        )

    # Inputs are random normals: no pre-activation within the finite-difference step of ReLU's kink.
    # fast_mode (one random projection, not one column per input value) keeps this under the
    # interpreter's budget; "add" without ReLU is BN's backward plus dy, covered above.
    assert torch.autograd.gradcheck(fn, leaves, eps=1e-6, atol=1e-7, rtol=1e-5, fast_mode=True)


@pytest.mark.parametrize("has_residual", [True, False])
@pytest.mark.parametrize("training", [True, False])
def test_relu_gradient_at_exact_zero_is_zero(has_residual, training, device, torch_bn_forbidden):
    """weight = 0 makes BN(x) = bias exactly; a residual of -bias (or bias = 0) puts every
    pre-activation at exactly 0. torch's relu passes no gradient there; neither do we."""
    shape = (2, 3, 4)
    x, _w, b, _r, rm, rv = _inputs(shape, "contiguous", torch.float32, device, False)
    w = torch.zeros_like(b)
    if has_residual:
        r = (-b).reshape(1, -1, 1).expand(shape).contiguous()
    else:
        b, r = torch.zeros_like(b), None
    dy = make(shape, torch.float32, device, seed=6)
    y, got = _run(x, w, b, r, rm.clone(), rv.clone(), training, "relu", dy)
    assert (y == 0).all()
    for k, g in got.items():
        assert (g == 0).all(), k
    _, gt, _ = _torch_composition(x, w, b, r, rm, rv, training, True, dy, torch_bn_forbidden)
    for k in gt:
        assert (gt[k] == 0).all(), k  # the same convention as torch


def test_relu_keeps_nan_in_its_channel(device, torch_bn_forbidden):
    x, w, b, r, rm, rv = _inputs((4, 3, 5), "contiguous", torch.float32, device, True)
    x[1, 1, 2] = float("nan")
    y = bn_triton.batch_norm(x, None, None, w, b, True, activation="relu", residual=r)
    with torch_bn_forbidden.allowed():
        yt = torch.relu(F.batch_norm(x, None, None, w, b, True) + r)
    assert torch.isnan(y[:, 1]).all() and torch.isnan(yt[:, 1]).all()  # relu(NaN) is NaN, as torch's
    torch.testing.assert_close(y[:, [0, 2]], yt[:, [0, 2]])


def test_output_modified_in_place_raises(device):
    """With a residual the mask is read from the saved output: writing into it must not go unnoticed
    (autograd's version check, as for torch.relu, which saves its output too)."""
    x, w, b, r, rm, rv = _inputs((2, 3, 4), "contiguous", torch.float32, device, True)
    x.requires_grad_()
    y = bn_triton.batch_norm(x, rm, rv, w, b, True, activation="relu", residual=r)
    y.mul_(2)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.sum().backward()


def test_torch_fallback_path_matches(device, monkeypatch, torch_bn_forbidden):
    """Where our kernels do not run (CPU without the interpreter), torch's ops compose the same result."""
    x, w, b, r, rm, rv = _inputs((3, 4, 5), "contiguous", torch.float32, device, True)
    y = bn_triton.batch_norm(x, rm.clone(), rv.clone(), w, b, True, activation="relu", residual=r)
    monkeypatch.setattr(functional, "uses_triton", lambda t: False)
    with torch_bn_forbidden.allowed():
        y_fb = bn_triton.batch_norm(x, rm.clone(), rv.clone(), w, b, True, activation="relu", residual=r)
        empty = torch.empty(0, 4, 5)
        assert (
            bn_triton.batch_norm(empty, None, None, training=True, activation="relu", residual=empty).shape
            == empty.shape
        )
    torch.testing.assert_close(y, y_fb)


# ---------------------------------------------------------------- bad input
def _bad_calls(device):
    x = make((4, 3, 5), torch.float32, device)
    ok = make((4, 3, 5), torch.float32, device, seed=1)
    return x, [
        ("unknown activation", dict(activation="sigmoid"), ValueError, "unsupported activation 'sigmoid'"),
        ("activation not a name", dict(activation=torch.relu), ValueError, "unsupported activation"),
        ("residual shape", dict(residual=ok[:, :2]), RuntimeError, "residual must have the input's shape"),
        ("residual broadcast", dict(residual=ok[:1]), RuntimeError, "residual must have the input's shape"),
        ("residual dtype", dict(residual=ok.long()), TypeError, "residual must be float16, bfloat16, float32 or"),
        ("residual device", dict(residual=ok.to("meta")), RuntimeError, "same device"),
        ("residual not a tensor", dict(residual=1.0), TypeError, "residual must be a Tensor"),
    ]


@pytest.mark.parametrize("case", range(7))
@pytest.mark.parametrize("training", [True, False])
def test_bad_fused_input_functional(case, training, device):
    x, calls = _bad_calls(device)
    _name, kwargs, exc, match = calls[case]
    rm, rv = torch.zeros(3, device=device), torch.ones(3, device=device)
    before = launch.LAUNCHES.copy()
    with pytest.raises(exc, match=match):
        bn_triton.batch_norm(x, rm, rv, None, None, training, **kwargs)
    assert launch.LAUNCHES == before, "a kernel ran before the error"
    assert (rm == 0).all() and (rv == 1).all()


@pytest.mark.parametrize("case", range(7))
def test_bad_fused_input_module(case, device):
    x, calls = _bad_calls(device)
    _name, kwargs, exc, match = calls[case]
    bn = bn_triton.BatchNorm1d(3, device=device)
    if "activation" in kwargs:
        with pytest.raises(exc, match=match):
            bn_triton.BatchNorm1d(3, activation=kwargs["activation"])
        with pytest.raises(exc, match=match):
            bn.activation = kwargs["activation"]  # set after construction: refused there too
        object.__setattr__(bn, "activation", kwargs["activation"])  # forced in: forward refuses it
    state = {k: v.clone() for k, v in bn.state_dict().items()}
    before = launch.LAUNCHES.copy()
    with pytest.raises(exc, match=match):
        bn(x, residual=kwargs.get("residual"))
    assert launch.LAUNCHES == before
    for k, v in bn.state_dict().items():
        assert torch.equal(v, state[k]), f"{k} changed"


# ---------------------------------------------------------------- modules
class _Block(torch.nn.Module):
    """A ResNet basic block; ``fused`` uses our modules' epilogue, else torch's BN + add + ReLU."""

    def __init__(self, fused: bool, C=4):
        super().__init__()
        self.fused = fused
        self.conv1 = torch.nn.Conv2d(C, C, 3, padding=1, bias=False)
        self.conv2 = torch.nn.Conv2d(C, C, 3, padding=1, bias=False)
        if fused:
            self.bn1 = bn_triton.BatchNorm2d(C, activation="relu")
            self.bn2 = bn_triton.BatchNorm2d(C, activation="relu")
        else:
            self.bn1 = torch.nn.BatchNorm2d(C)
            self.bn2 = torch.nn.BatchNorm2d(C)

    def forward(self, x):
        if self.fused:
            return self.bn2(self.conv2(self.bn1(self.conv1(x))), residual=x)
        return torch.relu(self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x))))) + x)


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
def test_module_parity_resnet_block(memory_format, device, torch_bn_forbidden):
    torch.manual_seed(0)
    ours = _Block(fused=True).to(device=device, memory_format=memory_format)
    theirs = _Block(fused=False).to(device=device, memory_format=memory_format)
    # Same state_dict keys as torch's modules: the fused modules load torch's weights strictly.
    ours.load_state_dict(theirs.state_dict(), strict=True)
    opt_o = torch.optim.SGD(ours.parameters(), lr=0.1)
    opt_t = torch.optim.SGD(theirs.parameters(), lr=0.1)
    for step in range(3):
        x = make((2, 4, 5, 6), torch.float32, device, seed=10 + step).contiguous(memory_format=memory_format)
        target = make((2, 4, 5, 6), torch.float32, device, seed=20 + step)
        for model, opt in ((ours, opt_o), (theirs, opt_t)):
            opt.zero_grad()
            if model is theirs:
                with torch_bn_forbidden.allowed():
                    loss = F.mse_loss(model(x), target)
            else:
                loss = F.mse_loss(model(x), target)
            loss.backward()
            opt.step()
    for (k, a), (k2, t) in zip(ours.state_dict().items(), theirs.state_dict().items(), strict=True):
        assert k == k2
        torch.testing.assert_close(a, t, atol=1e-5, rtol=1e-4, msg=k)
    ours.eval()
    theirs.eval()
    x = make((2, 4, 5, 6), torch.float32, device, seed=99).contiguous(memory_format=memory_format)
    with torch.no_grad():
        y_o = ours(x)
        with torch_bn_forbidden.allowed():
            y_t = theirs(x)
    torch.testing.assert_close(y_o, y_t, atol=1e-5, rtol=1e-4)
    # And back: torch's modules load ours strictly.
    theirs.load_state_dict(ours.state_dict(), strict=True)


def test_module_defaults_stay_drop_ins(device):
    for cls, tcls in ((bn_triton.BatchNorm1d, torch.nn.BatchNorm1d), (bn_triton.BatchNorm3d, torch.nn.BatchNorm3d)):
        m, t = cls(5), tcls(5)
        assert m.activation is None
        assert list(m.state_dict()) == list(t.state_dict())
        assert repr(m) == repr(t)
    m = bn_triton.BatchNorm1d(5, activation="relu")
    assert list(m.state_dict()) == list(torch.nn.BatchNorm1d(5).state_dict())
    assert "activation='relu'" in repr(m)


@pytest.mark.parametrize("training", [True, False])
def test_module_functional_agree(training, device):
    """BatchNorm3d(activation="relu")(x, residual=r) is batch_norm(..., activation="relu", residual=r)."""
    x, _w, _b, r, _rm, _rv = _inputs(SHAPES[5], "channels_last_3d", torch.float32, device, True)
    bn = bn_triton.BatchNorm3d(3, activation="relu", device=device)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-0.5, 0.5)
    bn.train(training)
    rm, rv = bn.running_mean.clone(), bn.running_var.clone()
    y = bn(x, residual=r)
    y_f = bn_triton.batch_norm(x, rm, rv, bn.weight, bn.bias, training, 0.1, 1e-5, activation="relu", residual=r)
    torch.testing.assert_close(y, y_f, atol=0, rtol=0)
    torch.testing.assert_close(bn.running_mean, rm, atol=0, rtol=0)
    assert int(bn.num_batches_tracked) == (1 if training else 0)


# ---------------------------------------------------------------- the op layer
@pytest.mark.parametrize("training", [True, False])
def test_opcheck_fused_ops(training, device):
    """The fused variants of the elementwise and reduction ops (test_compile.py opchecks the plain ones)."""
    x, w, b, r, rm, rv = _inputs((2, 3, 4), "contiguous", torch.float32, device, True)
    mean, scale = (x.mean((0, 2)), x.var((0, 2)).add(EPS).rsqrt()) if training else (rm, rv)
    for res in (r, None):
        torch.library.opcheck(ops.normalize, (x, mean, scale, w, b, EPS, not training, res, "relu"))
    y = ops.normalize(x, mean, scale, w, b, EPS, not training, r, "relu")
    dy = make(x.shape, torch.float32, device, seed=6)
    # act' from y (ReLU with a residual) writing g; recomputed from x and the residual (SiLU); from x alone.
    torch.library.opcheck(ops.grad_sums, (dy, x, mean, scale, w, b, y, None, EPS, not training, "relu", True, True,
                                          True, True))  # fmt: skip
    torch.library.opcheck(ops.grad_sums, (dy, x, mean, scale, w, b, None, r, EPS, not training, "silu", False, True,
                                          True, True))  # fmt: skip
    torch.library.opcheck(ops.grad_sums, (dy, x, mean, scale, w, b, None, None, EPS, not training, "relu", False,
                                          True, True, False))  # fmt: skip
    sums = ops.grad_sums(dy, x, mean, scale, w, b, None, None, EPS, not training, "relu", False, False, False, False)
    sums = sums[:2] if training else (None, None)
    args = (dy, x, mean, scale, w, *sums, b, None, None, EPS, training, 0, "relu", False, True, False)
    torch.library.opcheck(ops.grad_input, args, test_utils=("test_schema", "test_faketensor"))
