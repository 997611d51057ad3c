"""Forward-mode AD, torch.func transforms and double backward.

The Triton fast path is an autograd.Function with no forward-mode formula, no batching rule and a
once-differentiable backward. Under transforms and forward AD, bn_triton.batch_norm takes
bn_triton.composite's plain-op implementation instead; for double backward the fast path's backward
builds its gradients with composite.backward_graph. torch's own BatchNorm is the contract here: each
test compares against it, on the same inputs (float64, so differences are ours, not rounding).

Tests marked "(wired)" go through the fast path's backward with create_graph=True; each has a twin
that checks composite.backward_graph directly.

Inputs are small (a few dozen elements): the interpreter is slow, and hessian/jacobian sizes grow
with the square of the input.
"""

import pytest
import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F
from torch.func import functional_call, grad, hessian, jacfwd, jacrev, jvp, vmap
from torch.utils._python_dispatch import TorchDispatchMode

import bn_triton
from bn_triton import composite
from bn_triton.running import Running
from tests.helpers import make

F64 = torch.float64
EPS = 1e-5
MOMENTUM = 0.1
SHAPE = (4, 3, 5)  # (N, C, L): 60 values
SMALL = (2, 3, 4)  # for hessians, jacobians and gradgradcheck: 24 values
FUSIONS = {"plain": (None, False), "relu": ("relu", False), "add_relu": ("relu", True)}


def _torch_bn(x, rm, rv, w, b, training, activation=None, residual=None, momentum=MOMENTUM):
    """torch's reference: act(F.batch_norm(x) + residual)."""
    y = F.batch_norm(x, rm, rv, w, b, training, momentum, EPS)
    if residual is not None:
        y = y + residual
    return torch.relu(y) if activation == "relu" else y


def _ours(x, rm, rv, w, b, training, activation=None, residual=None, momentum=MOMENTUM):
    return bn_triton.batch_norm(x, rm, rv, w, b, training, momentum, EPS, activation=activation, residual=residual)


def _inputs(device, shape=SHAPE, seed=0):
    """x, weight, bias, residual: fresh random values; running stats away from (0, 1)."""
    C = shape[1]
    x = make(shape, F64, device, seed=seed, offset=0.5, scale=2.0)
    w = make((C,), F64, device, seed=seed + 1, offset=1.0)
    b = make((C,), F64, device, seed=seed + 2)
    r = make(shape, F64, device, seed=seed + 3)
    return x, w, b, r


def _running(device, C=3, seed=10):
    rm = make((C,), F64, device, seed=seed)
    rv = make((C,), F64, device, seed=seed + 1).abs() + 0.5
    return rm, rv


def _close(actual, expected, what=""):
    torch.testing.assert_close(actual, expected, atol=1e-9, rtol=1e-9, msg=lambda m: f"{what}: {m}")


def _nonzero(t, what):
    assert t.abs().max() > 1e-3, f"{what} is zero: a silently wrong (zero) answer"


# ---------------------------------------------------------------- forward-mode AD
@pytest.mark.parametrize("fusion", FUSIONS)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_func_jvp_matches_torch(training, fusion, device):
    activation, with_residual = FUSIONS[fusion]
    x, w, b, r = _inputs(device)
    tangents = tuple(torch.randn_like(t) for t in (x, w, b))
    res = r if with_residual else None
    results, stats = [], []
    for bn in (_ours, _torch_bn):
        rm, rv = _running(device)
        fn = lambda x, w, b, bn=bn, rm=rm, rv=rv: bn(x, rm, rv, w, b, training, activation, res)
        results.append(jvp(fn, (x, w, b), tangents))
        stats.append((rm, rv))
    (y, ty), (y_ref, ty_ref) = results
    _close(y, y_ref, "y")
    _close(ty, ty_ref, "tangent")
    _nonzero(ty, "jvp tangent")
    for ours, ref in zip(stats[0], stats[1], strict=True):
        _close(ours, ref, "running stats")


@pytest.mark.parametrize("fusion", FUSIONS)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_forward_ad_matches_torch(training, fusion, device):
    activation, with_residual = FUSIONS[fusion]
    x, w, b, r = _inputs(device)
    tx, tw, tr = torch.randn_like(x), torch.randn_like(w), torch.randn_like(r)
    outs = []
    for bn in (_ours, _torch_bn):
        rm, rv = _running(device)
        with fwAD.dual_level():
            res = fwAD.make_dual(r, tr) if with_residual else None
            y = bn(fwAD.make_dual(x, tx), rm, rv, fwAD.make_dual(w, tw), b, training, activation, res)
            primal, tangent = fwAD.unpack_dual(y)
            # Running statistics are updated with primal values only, as torch does.
            assert fwAD.unpack_dual(rm).tangent is None and fwAD.unpack_dual(rv).tangent is None
        outs.append((primal, tangent, rm, rv))
    for ours, ref, what in zip(outs[0], outs[1], ("y", "tangent", "running_mean", "running_var"), strict=True):
        _close(ours, ref, what)
    _nonzero(outs[0][1], "forward-AD tangent")


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_jacfwd_matches_torch(training, device):
    x, w, b, _ = _inputs(device, SMALL)
    rm, rv = _running(device)
    jac = jacfwd(lambda x, w: _ours(x, rm, rv, w, b, training), argnums=(0, 1))(x, w)
    ref = jacfwd(lambda x, w: _torch_bn(x, rm, rv, w, b, training), argnums=(0, 1))(x, w)
    for ours, expected, what in zip(jac, ref, ("d/dx", "d/dweight"), strict=True):
        _close(ours, expected, what)
        _nonzero(ours, what)


def test_forward_ad_half_input_with_float32_params(device):
    """Stats and math in float32, output in the input's dtype, as the fast path."""
    x = make(SHAPE, torch.float16, device, seed=3)
    w = make((3,), torch.float32, device, seed=4, offset=1.0)
    tx = make(SHAPE, torch.float16, device, seed=5)
    with fwAD.dual_level():
        y, ty = fwAD.unpack_dual(_ours(fwAD.make_dual(x, tx), None, None, w, None, True))
    assert y.dtype == ty.dtype == torch.float16
    fn = lambda x: F.batch_norm(x, None, None, w, None, True, MOMENTUM, EPS)
    y_ref, ty_ref = jvp(fn, (x.float(),), (tx.float(),))
    torch.testing.assert_close(y.float(), y_ref, atol=4e-3, rtol=4e-3)
    torch.testing.assert_close(ty.float(), ty_ref, atol=4e-3, rtol=4e-3)


# ---------------------------------------------------------------- reverse-mode transforms
@pytest.mark.parametrize("fusion", FUSIONS)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_func_grad_matches_torch(training, fusion, device):
    activation, with_residual = FUSIONS[fusion]
    x, w, b, r = _inputs(device)
    t = torch.randn_like(x)
    res = r if with_residual else None
    grads = []
    for bn in (_ours, _torch_bn):
        rm, rv = _running(device)
        loss = lambda x, w, b, bn=bn, rm=rm, rv=rv: (bn(x, rm, rv, w, b, training, activation, res).sin() * t).sum()
        grads.append(grad(loss, argnums=(0, 1, 2))(x, w, b))
    for ours, ref, what in zip(grads[0], grads[1], ("dx", "dweight", "dbias"), strict=True):
        _close(ours, ref, what)
        _nonzero(ours, what)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_jacrev_matches_torch(training, device):
    x, w, b, _ = _inputs(device, SMALL)
    rm, rv = _running(device)
    jac = jacrev(lambda x, b: _ours(x, rm, rv, w, b, training), argnums=(0, 1))(x, b)
    ref = jacrev(lambda x, b: _torch_bn(x, rm, rv, w, b, training), argnums=(0, 1))(x, b)
    for ours, expected, what in zip(jac, ref, ("d/dx", "d/dbias"), strict=True):
        _close(ours, expected, what)
        _nonzero(ours, what)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_hessian_matches_torch(training, device):
    x, w, b, _ = _inputs(device, SMALL)
    t = torch.randn_like(x)
    rm, rv = _running(device)
    h = hessian(lambda x, w: (_ours(x, rm, rv, w, b, training).sin() * t).sum(), argnums=(0, 1))(x, w)
    ref = hessian(lambda x, w: (_torch_bn(x, rm, rv, w, b, training).sin() * t).sum(), argnums=(0, 1))(x, w)
    for i, j in ((0, 0), (0, 1), (1, 1)):
        _close(h[i][j], ref[i][j], f"hessian[{i}][{j}]")
        _nonzero(h[i][j], f"hessian[{i}][{j}]")


@pytest.mark.parametrize("transform", ["grad", "jvp", "jacrev", "jacfwd", "hessian"])
def test_transforms_update_running_stats_once_like_torch(transform, device):
    """Running statistics are updated once per forward, with values outside any graph, as torch's."""
    x, w, b, _ = _inputs(device, SMALL)
    stats = []
    for bn in (_ours, _torch_bn):
        rm, rv = _running(device)
        f = lambda x, bn=bn, rm=rm, rv=rv: bn(x, rm, rv, w, b, True).sin().sum()
        if transform == "jvp":
            jvp(f, (x,), (torch.ones_like(x),))
        else:
            {"grad": grad, "jacrev": jacrev, "jacfwd": jacfwd, "hessian": hessian}[transform](f)(x)
        assert not rm.requires_grad and not rv.requires_grad
        stats.append((rm, rv))
    _close(stats[0][0], stats[1][0], "running_mean")
    _close(stats[0][1], stats[1][1], "running_var")


def test_cumulative_running_stats_under_jvp(device):
    """momentum=None with num_batches_tracked (this batch counted: 3 + 1): factor 1 / num_batches_tracked."""
    x, w, b, _ = _inputs(device)
    rm, rv = _running(device)
    rm_ref, rv_ref = rm.clone(), rv.clone()
    nbt = torch.tensor(3, device=device)
    fn = lambda x: composite.batch_norm(x, w, b, True, EPS, Running(rm, rv, None, nbt))
    jvp(fn, (x,), (torch.randn_like(x),))
    assert nbt.item() == 4
    F.batch_norm(x, rm_ref, rv_ref, w, b, True, 0.25, EPS)
    _close(rm, rm_ref, "running_mean")
    _close(rv, rv_ref, "running_var")


def test_module_counts_its_batch_under_jvp(device):
    """A captured module in training: num_batches_tracked counted (torch's modules raise there), and
    the cumulative running statistics as torch's functional batch_norm gives them."""
    x, _, _, _ = _inputs(device)
    ours = bn_triton.BatchNorm1d(x.shape[1], momentum=None, affine=False).to(device, x.dtype)
    rm, rv = ours.running_mean.clone(), ours.running_var.clone()
    jvp(lambda x: ours(x), (x,), (torch.randn_like(x),))
    assert ours.num_batches_tracked.item() == 1
    F.batch_norm(x, rm, rv, None, None, True, 1.0, EPS)
    _close(ours.running_mean, rm, "running_mean")
    _close(ours.running_var, rv, "running_var")


def test_empty_batch_under_jvp_matches_torch(device):
    """No values to normalize: torch's result (an empty tensor), also for a module's momentum=None."""
    x = make((0, 3, 4), F64, device)
    for momentum in (MOMENTUM, None):
        running = Running(momentum=momentum)
        y, ty = jvp(lambda x, r=running: composite.batch_norm(x, None, None, True, EPS, r), (x,), (x,))
        assert y.shape == ty.shape == x.shape


# ---------------------------------------------------------------- vmap
def _module_pair(training, track_running_stats, device):
    ours = bn_triton.BatchNorm2d(3, track_running_stats=track_running_stats).to(device, F64)
    ref = torch.nn.BatchNorm2d(3, track_running_stats=track_running_stats).to(device, F64)
    with torch.no_grad():
        ours.weight.copy_(make((3,), F64, device, seed=20, offset=1.0))
        ours.bias.copy_(make((3,), F64, device, seed=21))
        if track_running_stats:
            rm, rv = _running(device)
            ours.running_mean.copy_(rm)
            ours.running_var.copy_(rv)
    ref.load_state_dict(ours.state_dict())
    return ours.train(training), ref.train(training)


@pytest.mark.parametrize(
    "training, track_running_stats", [(False, True), (True, False)], ids=["eval", "train_no_running_stats"]
)
def test_vmap_grad_per_sample_grads_match_torch(training, track_running_stats, device):
    """Per-sample gradients (vmap(grad(functional_call))), where torch allows them."""
    x = make((4, 3, 2, 3), F64, device, seed=22)
    t = torch.randn_like(x)
    results = []
    for model in _module_pair(training, track_running_stats, device):
        params = {k: v.detach() for k, v in model.named_parameters()}

        def loss(params, x, t, model=model):
            y = functional_call(model, params, (x.unsqueeze(0),))
            return (y.sin() * t.unsqueeze(0)).sum()

        results.append(vmap(grad(loss, argnums=(0, 1)), in_dims=(None, 0, 0))(params, x, t))
    (p_ours, dx_ours), (p_ref, dx_ref) = results
    _close(dx_ours, dx_ref, "per-sample dx")
    _nonzero(dx_ours, "per-sample dx")
    for name in ("weight", "bias"):
        _close(p_ours[name], p_ref[name], f"per-sample d{name}")
        _nonzero(p_ours[name], f"per-sample d{name}")


def test_vmap_with_unbatched_running_stats_raises_like_torch(device):
    """Training under vmap would write one value per sample into one buffer: torch refuses, so do we."""
    x = make((4, 3, 2, 3), F64, device, seed=23)
    ours, ref = _module_pair(True, True, device)
    with pytest.raises(RuntimeError, match="running_mean or running_var"):
        vmap(lambda x: ref(x.unsqueeze(0)))(x)
    rm_before = ours.running_mean.clone()
    with pytest.raises(RuntimeError, match=r"bn_triton\.batch_norm under vmap.*running_mean or running_var"):
        vmap(lambda x: ours(x.unsqueeze(0)))(x)
    assert torch.equal(ours.running_mean, rm_before)  # refused before any write


def test_vmap_with_batched_running_stats_matches_torch(device):
    """An ensemble: one set of running statistics per vmapped member, each updated as torch does."""
    x, w, b, _ = _inputs(device)
    x = x.unsqueeze(1)  # 4 members, each a batch of 1
    stats, outs = [], []
    for bn in (_ours, _torch_bn):
        rm = make((4, 3), F64, device, seed=24)
        rv = make((4, 3), F64, device, seed=25).abs() + 0.5
        outs.append(vmap(lambda x, rm, rv, bn=bn: bn(x, rm, rv, w, b, True))(x, rm, rv))
        stats.append((rm, rv))
    _close(outs[0], outs[1], "y")
    _close(stats[0][0], stats[1][0], "running_mean")
    _close(stats[0][1], stats[1][1], "running_var")


# ---------------------------------------------------------------- the composite path is only taken when needed
def test_needed_only_under_transforms_and_forward_ad(device):
    x, w, b, _ = _inputs(device)
    w.requires_grad_()
    assert not composite.needed(x, None, None, w, b, None)
    with fwAD.dual_level():
        assert not composite.needed(x, None, None, w, b, None)  # a dual level, but no tangent
        assert composite.needed(fwAD.make_dual(x, torch.randn_like(x)), None, None, w, b, None)
        assert composite.needed(x, None, None, w, b, fwAD.make_dual(x, torch.randn_like(x)))
    seen = []
    grad(lambda x: seen.append(composite.needed(x, None, None, w, b, None)) or x.sum())(x)
    vmap(lambda x: seen.append(composite.needed(None, x)) or x)(x)
    assert seen == [True, True]


def test_plain_eager_calls_keep_the_fast_path(device, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("composite.batch_norm ran on a plain eager call")

    monkeypatch.setattr(composite, "batch_norm", refuse)
    x, w, b, _ = _inputs(device)
    w.requires_grad_()
    _ours(x, None, None, w, b, True).sum().backward()
    with fwAD.dual_level():
        _ours(x, None, None, w, b, True)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_composite_matches_fast_path_and_torch(training, device):
    x, w, b, r = _inputs(device)
    outs = []
    for bn in (composite.batch_norm, bn_triton.functional._batch_norm):
        rm, rv = _running(device)
        running = Running(rm, rv, MOMENTUM)
        outs.append((bn(x, w, b, training, EPS, running, activation="relu", residual=r), rm, rv))
    rm, rv = _running(device)
    ref = (_torch_bn(x, rm, rv, w, b, training, "relu", r), rm, rv)
    for ours, fast, expected, what in zip(*outs, ref, ("y", "running_mean", "running_var"), strict=True):
        _close(ours, expected, what)
        _close(fast, expected, what + " (fast path)")


# ---------------------------------------------------------------- double backward
CASES = [
    pytest.param(training, affine, fusion, id=f"{'train' if training else 'eval'}-{affine}-{fusion}")
    for training in (True, False)
    for affine, fusion in (("affine", "plain"), ("no_affine", "plain"), ("affine", "add_relu"))
]


def _gg_inputs(device, affine, with_residual):
    x, w, b, r = _inputs(device, SMALL)
    x.requires_grad_()
    w = w.requires_grad_() if affine == "affine" else None
    b = b.requires_grad_() if affine == "affine" else None
    r = r.requires_grad_() if with_residual else None
    return x, w, b, r


@pytest.mark.parametrize("training, affine, fusion", CASES)
def test_gradgradcheck_composite(training, affine, fusion, device):
    activation, with_residual = FUSIONS[fusion]
    x, w, b, r = _gg_inputs(device, affine, with_residual)
    rm, rv = _running(device)
    fn = lambda x, w, b, r: composite.batch_norm(
        x, w, b, training, EPS, Running(rm.clone(), rv.clone(), MOMENTUM), activation=activation, residual=r
    )
    assert torch.autograd.gradgradcheck(fn, (x, w, b, r))


@pytest.mark.parametrize("training, affine, fusion", CASES)
def test_gradgradcheck_public(training, affine, fusion, device):
    """(wired) Through the fast path's forward and its differentiable backward."""
    activation, with_residual = FUSIONS[fusion]
    x, w, b, r = _gg_inputs(device, affine, with_residual)
    rm, rv = _running(device)
    fn = lambda x, w, b, r: _ours(x, rm.clone(), rv.clone(), w, b, training, activation, r)
    assert torch.autograd.gradgradcheck(fn, (x, w, b, r), fast_mode=True)


def _backward_graph_fn(x, w, b, r, training, activation, rm, rv):
    """dy -> (dx, dweight, dbias, dz) by composite.backward_graph, act' recomputed with the residual r."""
    return lambda dy, x, w, b: composite.backward_graph(
        dy, x, w, b, training=training, eps=EPS, mean_var=None if training else (rm, rv), activation=activation,
        residual=r,
    )  # fmt: skip


@pytest.mark.parametrize("training, affine, fusion", CASES)
def test_backward_graph_matches_torch_first_order(training, affine, fusion, device):
    activation, with_residual = FUSIONS[fusion]
    x, w, b, r = _gg_inputs(device, affine, with_residual)
    rm, rv = _running(device)
    dy = torch.randn_like(x)
    y = _torch_bn(x, rm, rv, w, b, training, activation, r)
    wrt = [t for t in (x, w, b, r) if t is not None]
    expected = iter(torch.autograd.grad(y, wrt, dy))
    got = _backward_graph_fn(x, w, b, r, training, activation, rm, rv)(dy, x, w, b)
    for g, t, what in zip(got, (x, w, b, r), ("dx", "dweight", "dbias", "dresidual"), strict=True):
        if t is None:
            assert what == "dresidual" or g is None, f"{what} for an absent tensor"
            continue
        _close(g, next(expected), what)


@pytest.mark.parametrize("training, affine, fusion", CASES)
def test_backward_graph_gradcheck(training, affine, fusion, device):
    """The first derivatives of the backward are BN's second derivatives: what gradgradcheck checks."""
    activation, with_residual = FUSIONS[fusion]
    x, w, b, r = _gg_inputs(device, affine, with_residual)
    rm, rv = _running(device)
    bg = _backward_graph_fn(x, w, b, r, training, activation, rm, rv)
    fn = lambda *args: tuple(g for g in bg(*args) if g is not None)  # no dweight/dbias without affine
    dy = torch.randn_like(x).requires_grad_()
    assert torch.autograd.gradcheck(fn, (dy, x, w, b))


def _penalty_grads(first_order, x, w, b, dy):
    """A gradient penalty: |d(loss)/dx|^2, differentiated again w.r.t. x, weight and bias."""
    (gx,) = first_order(dy)
    return torch.autograd.grad(gx.pow(2).sum(), (x, w, b), allow_unused=True)


def _torch_first_order(x, w, b, r, training, activation, rm, rv):
    def first(dy):
        y = _torch_bn(x, rm, rv, w, b, training, activation, r)
        return torch.autograd.grad(y, x, dy, create_graph=True)

    return first


def _check_penalty(got, expected):
    for g, e, what in zip(got, expected, ("x", "weight", "bias"), strict=True):
        if e is None:  # torch's graph does not reach it: ours must not either, or give zeros
            assert g is None or g.abs().max() == 0, f"d(penalty)/d{what}"
            continue
        if e.abs().max() == 0 and g is None:  # torch's ReLU backward reaches it with a zero gradient
            continue
        assert g is not None, f"d(penalty)/d{what} is None where torch has a gradient"
        _close(g, e, f"d(penalty)/d{what}")


@pytest.mark.parametrize("fusion", ["plain", "add_relu"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_gradient_penalty_matches_torch(training, fusion, device):
    """(wired) autograd.grad(create_graph=True), then the penalty's gradient w.r.t. the parameters."""
    activation, with_residual = FUSIONS[fusion]
    x, w, b, r = _gg_inputs(device, "affine", with_residual)
    rm, rv = _running(device)
    dy = torch.randn_like(x)

    def ours_first(dy):
        y = _ours(x, rm.clone(), rv.clone(), w, b, training, activation, r)
        return torch.autograd.grad(y, x, dy, create_graph=True)

    expected = _penalty_grads(_torch_first_order(x, w, b, r, training, activation, rm, rv), x, w, b, dy)
    _check_penalty(_penalty_grads(ours_first, x, w, b, dy), expected)
    _nonzero(expected[1], "torch's d(penalty)/dweight")  # a gradient that once came back as None


@pytest.mark.parametrize("fusion", ["plain", "add_relu"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_gradient_penalty_backward_graph_matches_torch(training, fusion, device):
    """test_gradient_penalty_matches_torch's check on composite.backward_graph directly."""
    activation, with_residual = FUSIONS[fusion]
    x, w, b, r = _gg_inputs(device, "affine", with_residual)
    rm, rv = _running(device)
    dy = torch.randn_like(x)
    bg = _backward_graph_fn(x, w, b, r, training, activation, rm, rv)
    got = _penalty_grads(lambda dy: bg(dy, x, w, b)[:1], x, w, b, dy)
    expected = _penalty_grads(_torch_first_order(x, w, b, r, training, activation, rm, rv), x, w, b, dy)
    _check_penalty(got, expected)


def test_gradient_penalty_without_allow_unused_like_torch(device):
    """(wired) Where torch's graph reaches every input, no error (not a misleading one)."""
    x, w, b, _ = _gg_inputs(device, "affine", False)
    dy = torch.randn_like(x)
    results = []
    for bn in (_ours, _torch_bn):
        (gx,) = torch.autograd.grad(bn(x, None, None, w, b, True), x, dy, create_graph=True)
        results.append(torch.autograd.grad(gx.pow(2).sum(), (x, w)))
    for ours, ref, what in zip(results[0], results[1], ("x", "weight"), strict=True):
        _close(ours, ref, f"d(penalty)/d{what}")


class _OpRecorder(TorchDispatchMode):
    """Records every op that reaches the dispatcher, and runs it unchanged."""

    def __init__(self):
        super().__init__()
        self.ops = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.add(str(func.overloadpacket))
        return func(*args, **(kwargs or {}))


def test_double_backward_under_dispatch_mode(device):
    """(wired) Under a dispatch mode the ops are called as ops: their backward must be differentiable too."""
    x, w, b, _ = _gg_inputs(device, "affine", False)
    dy = torch.randn_like(x)
    expected = _penalty_grads(_torch_first_order(x, w, b, None, True, None, None, None), x, w, b, dy)
    with _OpRecorder() as mode:
        got = _penalty_grads(
            lambda dy: torch.autograd.grad(_ours(x, None, None, w, b, True), x, dy, create_graph=True), x, w, b, dy
        )
    assert any(op.startswith("bn_triton.") for op in mode.ops), sorted(mode.ops)
    _check_penalty(got, expected)


def test_double_backward_under_dispatch_mode_backward_graph(device):
    """test_double_backward_under_dispatch_mode's check on composite.backward_graph directly."""
    x, w, b, _ = _gg_inputs(device, "affine", False)
    dy = torch.randn_like(x)
    expected = _penalty_grads(_torch_first_order(x, w, b, None, True, None, None, None), x, w, b, dy)
    with _OpRecorder():
        first = lambda dy: composite.backward_graph(dy, x, w, b, training=True, eps=EPS)[:1]
        got = _penalty_grads(first, x, w, b, dy)
    _check_penalty(got, expected)


# ---------------------------------------------------------------- batched gradients (vmap over dy)
@pytest.mark.parametrize("fusion", FUSIONS)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_batched_gradients_match_torch(training, fusion, device):
    """torch.autograd.grad(..., is_grads_batched=True) hands the backward a batched dy (no memory of
    its own): the plain-op backward serves it. jacobian(vectorize=True) and gradcheck's batched-grad
    check use it; results are torch's."""
    activation, with_residual = FUSIONS[fusion]
    x, w, b, r = (t.requires_grad_() for t in _inputs(device, SMALL))
    r = r if with_residual else None
    rm, rv = _running(device)
    wrt = (x, w, b) if r is None else (x, w, b, r)
    dys = torch.randn(3, *SMALL, dtype=F64, device=device)
    got = torch.autograd.grad(
        _ours(x, rm.clone(), rv.clone(), w, b, training, activation, r), wrt, dys, is_grads_batched=True
    )
    want = torch.autograd.grad(
        _torch_bn(x, rm.clone(), rv.clone(), w, b, training, activation, r), wrt, dys, is_grads_batched=True
    )
    for i, (g, e) in enumerate(zip(got, want, strict=True)):
        _close(g, e, f"grad {i}")
        _nonzero(g, f"grad {i}")


def test_vectorized_jacobian_and_batched_gradcheck(device):
    x, w, b, _ = (t.requires_grad_() for t in _inputs(device, SMALL))
    fn = lambda x, w, b: _ours(x, None, None, w, b, True)
    got = torch.autograd.functional.jacobian(fn, (x, w, b), vectorize=True)
    want = torch.autograd.functional.jacobian(lambda x, w, b: _torch_bn(x, None, None, w, b, True), (x, w, b))
    for g, e in zip(got, want, strict=True):
        _close(g, e, "jacobian")
    assert torch.autograd.gradcheck(fn, (x, w, b), check_batched_grad=True)


# ---------------------------------------------------------------- forward AD and the running statistics
DUALS = [("input",), ("running_mean",), ("running_mean", "running_var"), ("input", "running_mean"),
         ("input", "running_var"), ("weight", "running_mean"), ("input", "running_mean", "running_var")]  # fmt: skip


@pytest.mark.parametrize("duals", DUALS, ids=["+".join(d) for d in DUALS])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_forward_ad_tangents_on_running_stats_like_torch(training, duals, device):
    """torch's forward AD refuses tangents on running_mean/running_var where it uses them (eval) and
    computes a tangent at all; elsewhere it runs. Ours does the same, with torch's message."""
    x, w, b, _ = _inputs(device)
    rm, rv = _running(device)
    args = dict(input=x, running_mean=rm, running_var=rv, weight=w, bias=b)

    def call(fn, args):
        with fwAD.dual_level():
            a = {k: fwAD.make_dual(v.clone(), torch.ones_like(v)) if k in duals else v.clone() for k, v in args.items()}
            try:
                return fwAD.unpack_dual(fn(**a, training=training)), None
            except RuntimeError as e:
                return None, e

    want, err = call(F.batch_norm, args)
    got, ours = call(bn_triton.batch_norm, args)
    if err is not None:
        assert ours is not None and str(ours) == str(err), f"{ours!r} where torch raised {err!r}"
        return
    assert ours is None, ours
    _close(got.primal, want.primal, "primal")
    assert (got.tangent is None) == (want.tangent is None)
    if want.tangent is not None:
        _close(got.tangent, want.tangent, "tangent")
