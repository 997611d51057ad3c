"""The fused activations: ``act(BN(x) + residual)`` for every activation of bn_triton/activations.py,
forward and backward, in our layers and functional API, against torch's own BN followed by torch's
own activation, and in float64 against the NumPy reference extended with the activation.

How the cross product was pruned (the interpreter runs one program after another):
* The activation is one constexpr branch in the normalize pass and in the backward's first pass,
  applied to a tile in the accumulation dtype: the tiling (rank, layout) does not change it. So
  every activation runs every dtype, train and eval, with and without a residual, on one 3-D shape;
  every layout (NCHW, channels_last, channels_last_3d, 2-D) runs with three activations (a
  piecewise one with a parameter, a smooth one, and one that zeroes a whole interval), in every dtype.
* The kinks, NaN and +-inf: with weight 0 the pre-activation is bias + residual exactly, so the
  residual puts it on each kink, its neighbours and the special values, in training and eval.
* Each backward kind (single-pass, split, eval elementwise; g stored or recomputed) by
  needs_input_grad subsets for one piecewise and one smooth activation.
"""

import copy
import pickle

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import bn_triton
from bn_triton import _config, activations, launch, ops, reference
from tests.helpers import TOL, make, np64

EPS = 1e-5
MOMENTUM = 0.1
ACTIVATIONS = ["relu", "relu6", "leaky_relu(0.2)", "elu(0.5)", "silu", "hardswish", "gelu", "gelu_tanh", "mish"]
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32, "fp64": torch.float64}
LAYOUTS = {
    "NCHW": ((2, 3, 4, 5), "contiguous"),
    "channels_last": ((2, 3, 4, 5), "channels_last"),
    "channels_last_3d": ((2, 3, 2, 3, 4), "channels_last_3d"),
    "2-D": ((12, 5), "contiguous"),
}
# The interpreter rounds fp32 to bf16 by truncation (docs: platform notes), so bf16 gets twice its
# usual tolerance; fp16's outputs are compared after both sides rounded to fp16.
SCALE = {torch.float16: 2.0, torch.bfloat16: 2.0, torch.float32: 1.0, torch.float64: 1.0}


def _inputs(shape, layout, dtype, device, residual, seed=0):
    C = shape[1]
    pdtype = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
    x = make(shape, dtype, device, layout, seed=seed, scale=1.5)
    w = make((C,), pdtype, device, scale=0.5, offset=1.0, seed=seed + 1)
    b = make((C,), pdtype, device, scale=0.5, seed=seed + 2)
    r = make(shape, dtype, device, layout, seed=seed + 3) if residual else None
    rm = make((C,), pdtype, device, scale=0.3, seed=seed + 4)
    rv = make((C,), pdtype, device, scale=0.2, offset=1.0, seed=seed + 5).abs()
    return x, w, b, r, rm, rv


def _ours(x, w, b, r, rm, rv, training, activation, dy):
    """Our output, gradients (x, weight, bias, residual) and running statistics after one call."""
    leaves = [t.detach().clone().requires_grad_() if t is not None else None for t in (x, w, b, r)]
    rm, rv = rm.clone(), rv.clone()
    y = bn_triton.batch_norm(leaves[0], rm, rv, leaves[1], leaves[2], training, MOMENTUM, EPS,
                             activation=activation, residual=leaves[3])  # fmt: skip
    wrt = [t for t in leaves if t is not None]
    return y, torch.autograd.grad(y, wrt, dy), (rm, rv)


def _torch_act(v: torch.Tensor, activation) -> torch.Tensor:
    """torch's activation of v, on a strided copy: torch's CPU scalar loop, which gives at NaN what its
    CUDA kernels give (its vectorized loop differs there for relu6, elu and hardswish)."""
    strided = torch.empty(2 * v.numel(), dtype=v.dtype, device=v.device)[::2].view(v.shape).copy_(v)
    return activations.apply(strided, activation)


def _theirs(x, w, b, r, rm, rv, training, activation, dy):
    """torch's act(F.batch_norm(x) + residual) on CPU in the input's dtype (float32 for 16-bit inputs,
    whose batch_norm torch's CPU computes in float32 anyway), with its gradients and statistics."""
    compute = torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype
    leaves = [t.detach().cpu().to(compute).requires_grad_() if t is not None else None for t in (x, w, b, r)]
    rm, rv = rm.detach().cpu().clone(), rv.detach().cpu().clone()
    y = F.batch_norm(leaves[0], rm, rv, leaves[1], leaves[2], training, MOMENTUM, EPS)
    if r is not None:
        y = y + leaves[3]
    y = _torch_act(y.to(x.dtype).to(compute), activation)  # torch's BN output is x.dtype
    wrt = [t for t in leaves if t is not None]
    return y, torch.autograd.grad(y, wrt, dy.detach().cpu().to(compute)), (rm, rv)


def _close(got, want, dtype, what, scale=1.0):
    tol = TOL[dtype]
    torch.testing.assert_close(
        got.detach().cpu().to(torch.float64), want.detach().cpu().to(torch.float64), equal_nan=True,
        atol=tol["atol"] * scale * SCALE[dtype], rtol=tol["rtol"] * SCALE[dtype], msg=lambda m: f"{what}: {m}",
    )  # fmt: skip


def _check_against_torch(x, w, b, r, rm, rv, training, activation, device):
    dy = make(x.shape, x.dtype, device, seed=9)
    y, grads, stats = _ours(x, w, b, r, rm, rv, training, activation, dy)
    y_t, grads_t, stats_t = _theirs(x, w, b, r, rm, rv, training, activation, dy)
    assert y.dtype == x.dtype and y.shape == x.shape and y.stride() == x.stride()
    _close(y, y_t.to(x.dtype), x.dtype, "y")
    # Gradients sum over a channel's values: their tolerance grows with the sums' magnitude.
    for g, g_t, what in zip(grads, grads_t, ("dx", "dweight", "dbias", "dresidual"), strict=False):
        assert g.dtype == g_t.dtype or x.dtype in (torch.float16, torch.bfloat16)
        _close(g, g_t, x.dtype, what, scale=4.0 * (1 + g_t.abs().max().item()))
    for s, s_t, what in zip(stats, stats_t, ("running_mean", "running_var"), strict=True):
        _close(s, s_t, x.dtype, what)


@pytest.mark.parametrize("residual", [False, True], ids=["plain", "residual"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_every_activation_matches_torch(activation, dtype, training, residual, device):
    x, w, b, r, rm, rv = _inputs((3, 4, 6), "contiguous", dtype, device, residual)
    _check_against_torch(x, w, b, r, rm, rv, training, activation, device)


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("activation", ["leaky_relu(0.2)", "silu", "relu6"])
def test_every_layout_matches_torch(activation, layout, dtype, device):
    shape, fmt = LAYOUTS[layout]
    for training in (True, False):
        x, w, b, r, rm, rv = _inputs(shape, fmt, dtype, device, residual=True, seed=20)
        _check_against_torch(x, w, b, r, rm, rv, training, activation, device)


# ---------------------------------------------------------------- float64 against the NumPy reference
def _reference(x, w, b, r, rm, rv, training, activation, dy):
    """float64 NumPy: the three-path derivation of docs/math.md with g = dy * act'(pre)."""
    name, param = activations.parse(activation)
    x64, w64, b64, dy64 = np64(x), np64(w), np64(b), np64(dy)
    axes = (0,) + tuple(range(2, x64.ndim))
    shape = (1, -1) + (1,) * (x64.ndim - 2)
    if training:
        pre, mean, var = reference.forward(x64, w64, b64, EPS)
    else:
        pre = reference.eval_forward(x64, np64(rm), np64(rv), w64, b64, EPS)
    if r is not None:
        pre = pre + np64(r)
    y = reference.activation(pre, name, param)
    g = reference.activation_grad(dy64, pre, name, param)
    if training:
        dx, dw, db = reference.backward(g, x64, w64, EPS)
        stats = reference.running_stats(np64(rm), np64(rv), mean, var, x64.size // x64.shape[1], MOMENTUM)
    else:
        dx = reference.eval_backward(g, np64(rv), w64, EPS)
        xhat = (x64 - np64(rm).reshape(shape)) / np.sqrt(np64(rv).reshape(shape) + EPS)
        dw, db = (g * xhat).sum(axis=axes), g.sum(axis=axes)
        stats = (np64(rm), np64(rv))
    return y, (dx, dw, db, g), stats


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_float64_matches_the_numpy_reference(activation, training, device):
    x, w, b, r, rm, rv = _inputs((3, 4, 2, 3), "contiguous", torch.float64, device, residual=True, seed=30)
    dy = make(x.shape, torch.float64, device, seed=31)
    y, grads, stats = _ours(x, w, b, r, rm, rv, training, activation, dy)
    y_ref, grads_ref, stats_ref = _reference(x, w, b, r, rm, rv, training, activation, dy)
    np.testing.assert_allclose(np64(y), y_ref, rtol=1e-10, atol=1e-12)
    for g, g_ref, what in zip(grads, grads_ref, ("dx", "dweight", "dbias", "dresidual"), strict=True):
        np.testing.assert_allclose(np64(g), g_ref, rtol=1e-9, atol=1e-11, err_msg=what)
    for s, s_ref in zip(stats, stats_ref, strict=True):
        np.testing.assert_allclose(np64(s), s_ref, rtol=1e-12, atol=1e-14)


# ---------------------------------------------------------------- the kinks, NaN and +-inf
def _special(dtype) -> torch.Tensor:
    """Every kink (0, 6, +-3) with its float neighbours in dtype, -0, large values, NaN, +-inf."""
    values = []
    for k in (0.0, 6.0, 3.0, -3.0):
        t = torch.tensor(k, dtype=dtype)
        values += [torch.nextafter(t, torch.tensor(-np.inf, dtype=dtype)).item(), k]
        values.append(torch.nextafter(t, torch.tensor(np.inf, dtype=dtype)).item())
    if dtype == torch.bfloat16 and _config.interpreting():
        # The interpreter's bf16 -> fp32 conversion turns subnormals into 0 (a GPU's does not): 0's
        # neighbours are the smallest normal numbers there.
        tiny = torch.finfo(dtype).tiny
        values[0], values[2] = -tiny, tiny
    return torch.tensor(values + [-0.0, 50.0, -50.0, float("nan"), float("inf"), -float("inf")], dtype=dtype)


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_kinks_nan_and_inf_like_torch(activation, dtype, device):
    """weight 0, bias 0: the pre-activation is the residual exactly, here each kink, its neighbours,
    NaN and +-inf. Outputs and every gradient agree with torch's composition: at the kinks exactly,
    NaN and inf where torch has them."""
    special = _special(dtype)
    C = 2
    r = special.repeat(C, 1).t().contiguous().to(device)  # (values, C): every value in both channels
    x = make(r.shape, dtype, device, seed=40)
    pdtype = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
    w, b = torch.zeros(C, dtype=pdtype, device=device), torch.zeros(C, dtype=pdtype, device=device)
    rm, rv = torch.zeros(C, dtype=pdtype, device=device), torch.ones(C, dtype=pdtype, device=device)
    dy = make(r.shape, dtype, device, seed=41).abs() + 0.5
    for training in (True, False):
        y, grads, _ = _ours(x, w, b, r, rm, rv, training, activation, dy)
        pre = r.detach().cpu().to(torch.float64).requires_grad_()
        y_t = _torch_act(pre, activation)
        (g_t,) = torch.autograd.grad(y_t, pre, dy.detach().cpu().to(torch.float64))
        d64 = lambda t: t.detach().cpu().to(dtype).double()  # both rounded to dtype
        # Subnormal outputs (act(+-tiny)) may differ by a subnormal: the interpreter truncates them.
        tiny = torch.finfo(dtype).tiny
        torch.testing.assert_close(d64(y), d64(y_t), equal_nan=True, atol=tiny, rtol=1e-2)
        g = grads[3]
        torch.testing.assert_close(d64(g), d64(g_t), equal_nan=True, atol=tiny, rtol=1e-2)
        assert torch.equal(d64(g) == 0, d64(g_t) == 0), "the gradient's zeros differ from torch's"
        # dbias = sum(g) per channel: NaN and inf propagate as in torch's BN backward.
        assert torch.equal(grads[2].isnan().cpu(), g_t.sum(0).isnan())


# ---------------------------------------------------------------- backward kinds
NEEDS = {"x": "x", "w": "w", "b": "b", "r": "r", "xr": "xr", "wb": "wb", "all": "xwbr"}


@pytest.mark.parametrize("path", ["split", "single_pass"], indirect=True)
@pytest.mark.parametrize("needs", NEEDS)
@pytest.mark.parametrize("activation", ["hardswish", "gelu"])
def test_every_needs_input_grad_subset(activation, needs, path, device):
    """Each set of wanted gradients picks its launches (bn_triton/planner.py): single-pass or split,
    g stored or recomputed, eval's one pass. Only the wanted gradients come back, each torch's."""
    for training in (True, False):
        x, w, b, r, rm, rv = _inputs((4, 3, 5), "contiguous", torch.float64, device, residual=True, seed=50)
        dy = make(x.shape, torch.float64, device, seed=51)
        leaves = dict(x=x, w=w, b=b, r=r)
        ours = {k: v.clone().requires_grad_(k in NEEDS[needs]) for k, v in leaves.items()}
        y = bn_triton.batch_norm(ours["x"], rm.clone(), rv.clone(), ours["w"], ours["b"], training,
                                 activation=activation, residual=ours["r"])  # fmt: skip
        wanted = [k for k in "xwbr" if k in NEEDS[needs]]
        got = torch.autograd.grad(y, [ours[k] for k in wanted], dy)
        _, want, _ = _theirs(x, w, b, r, rm, rv, training, activation, dy)
        want = dict(zip("xwbr", want, strict=True))
        for k, g in zip(wanted, got, strict=True):
            torch.testing.assert_close(g, want[k], atol=1e-10, rtol=1e-9, msg=lambda m, k=k: f"d{k}: {m}")


# ---------------------------------------------------------------- how an activation is named
@pytest.mark.parametrize(
    "given,canonical",
    [
        ("relu", "relu"), (nn.ReLU(inplace=True), "relu"), ("relu6", "relu6"), (nn.ReLU6(), "relu6"),
        (nn.Hardtanh(0.0, 6.0), "relu6"), ("silu", "silu"), (nn.SiLU(inplace=True), "silu"),
        ("hardswish", "hardswish"), (nn.Hardswish(), "hardswish"), ("mish", "mish"), (nn.Mish(), "mish"),
        ("gelu", "gelu"), (nn.GELU(), "gelu"), (nn.GELU(approximate="tanh"), "gelu_tanh"),
        ("gelu_tanh", "gelu_tanh"), (nn.LeakyReLU(0.1), "leaky_relu(0.1)"), ("leaky_relu", "leaky_relu(0.01)"),
        ("leaky_relu(0.3)", "leaky_relu(0.3)"), (nn.ELU(alpha=0.7), "elu(0.7)"), ("elu", "elu(1.0)"),
        (None, None),
    ],
)  # fmt: skip
def test_activation_names_and_modules(given, canonical):
    """A name, or an instance of torch's activation module with its parameters; the layer keeps the
    canonical string, shows it in its repr, pickles it, and its state_dict is torch's."""
    bn = bn_triton.BatchNorm2d(3, activation=given)
    assert bn.activation == canonical
    assert list(bn.state_dict()) == list(nn.BatchNorm2d(3).state_dict())
    assert not list(bn.children())
    assert (f"activation={canonical!r}" in repr(bn)) == (canonical is not None)
    assert pickle.loads(pickle.dumps(bn)).activation == canonical
    assert copy.deepcopy(bn).activation == canonical
    bn.activation = given  # assigned later: the same
    assert bn.activation == canonical


@pytest.mark.parametrize("bad", ["sigmoid", "relu(0.5)", "leaky_relu(x)", nn.Hardtanh(), nn.Sigmoid(), torch.relu, 1])
def test_unsupported_activations_are_refused_with_the_supported_list(bad, device):
    x = make((4, 3), torch.float32, device)
    for call in (
        lambda: bn_triton.BatchNorm1d(3, activation=bad),
        lambda: bn_triton.batch_norm(x, None, None, training=True, activation=bad),
        lambda: bn_triton.SyncBatchNorm(3, activation=bad),
    ):
        with pytest.raises(ValueError, match=r"unsupported activation .*expected None, a name \('relu', 'relu6'"):
            call()


def test_a_module_instance_is_read_on_every_functional_call(device):
    """bn_triton.batch_norm(activation=nn.LeakyReLU(s)): the slope the module has at that call."""
    x = make((6, 3), torch.float32, device, seed=60)
    act = nn.LeakyReLU(0.1)
    y1 = bn_triton.batch_norm(x, None, None, training=True, activation=act)
    act.negative_slope = 0.5
    y2 = bn_triton.batch_norm(x, None, None, training=True, activation=act)
    xn = F.batch_norm(x.cpu(), None, None, training=True)
    torch.testing.assert_close(y1.cpu(), F.leaky_relu(xn, 0.1))
    torch.testing.assert_close(y2.cpu(), F.leaky_relu(xn, 0.5))


def test_gradcheck_and_gradgradcheck(device):
    """Double backward (composite.py's differentiable backward) for every activation, in one model."""
    for activation in ACTIVATIONS:
        x, w, b, r, rm, rv = _inputs((3, 2, 2), "contiguous", torch.float64, device, residual=True, seed=70)
        args = [t.requires_grad_() for t in (x, w, b, r)]
        fn = lambda x, w, b, r, a=activation: bn_triton.batch_norm(x, None, None, w, b, True, activation=a, residual=r)
        assert torch.autograd.gradcheck(fn, args, fast_mode=True), activation
        assert torch.autograd.gradgradcheck(fn, args, fast_mode=True), activation
        assert launch.LAUNCHES  # the first order ran our kernels


# ---------------------------------------------------------------- torch.compile, export
class _EveryActivation(nn.Module):
    """One of our layers per activation in a chain, every other one with a residual."""

    def __init__(self, C):
        super().__init__()
        self.bns = nn.ModuleList(bn_triton.BatchNorm1d(C, activation=a) for a in ACTIVATIONS)

    def forward(self, x):
        for i, bn in enumerate(self.bns):
            x = bn(x, residual=x if i % 2 else None)
        return x


def test_compile_fullgraph_and_export_with_every_activation(device):
    """torch.compile(fullgraph=True) traces training (forward and backward) and eval without a break,
    bitwise what eager gives (aot_eager runs our very kernels), and torch.export serves eval."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    eager = _EveryActivation(3).to(device).double()
    with torch.no_grad():
        for p in eager.parameters():
            p.copy_(torch.randn_like(p) * 0.5 + 1.0)
    model = copy.deepcopy(eager)
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    x = make((4, 3, 5), torch.float64, device, seed=80)
    dy = make((4, 3, 5), torch.float64, device, seed=81)
    outs = []
    for m in (eager, compiled):
        xi = x.clone().requires_grad_()
        y = m(xi)
        y.backward(dy)
        outs.append((y.detach(), xi.grad))
    for a, b in zip(*outs, strict=True):
        torch.testing.assert_close(a, b, atol=0, rtol=0)
    for (name, a), (_, b) in zip(model.named_buffers(), eager.named_buffers(), strict=True):
        torch.testing.assert_close(a, b, atol=0, rtol=0, msg=name)
    eager.eval(), model.eval()
    torch.testing.assert_close(compiled(x), eager(x), atol=0, rtol=0)
    program = torch.export.export(model, (x,))
    torch.testing.assert_close(program.module()(x), eager(x), atol=0, rtol=0)
    torch._dynamo.reset()


# ---------------------------------------------------------------- opcheck
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_opcheck_with_every_activation(activation, device):
    """The ops that take an activation, under torch.library.opcheck (schema, fake, AOT): the
    forward with a residual, the backward sums recomputing act' (storing d(residual)), and dx."""
    x, dy, r = (make((2, 3, 4), torch.float32, device, seed=s) for s in (0, 1, 2))
    w, b = make((3,), torch.float32, device, offset=1.0, seed=3), make((3,), torch.float32, device, seed=4)
    mean, rstd, _ = ops.stats(x, None, None, 0.1, None, 1e-5, True)
    s1, s2, *_ = ops.grad_sums(dy, x, mean, rstd, w, b, None, r, 1e-5, False, activation, False, False, False, True)
    cases = [
        (ops.normalize, (x, mean, rstd, w, b, 1e-5, False, r, activation)),
        (ops.grad_sums, (dy, x, mean, rstd, w, b, None, r, 1e-5, False, activation, False, True, True, True)),
        (ops.grad_input, (dy, x, mean, rstd, w, s1, s2, b, None, r, 1e-5, True, 8, activation, False, True, True)),
    ]
    for op, args in cases:
        results = torch.library.opcheck(op, args)
        assert set(results.values()) == {"SUCCESS"}, (op, results)
