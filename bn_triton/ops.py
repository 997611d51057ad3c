"""The traced route: batch norm's steps as torch.library custom ops, and their autograd formula.

Each step (the statistics, the normalize pass, the backward's reduction and its elementwise pass,
and the running-statistics update that SyncBatchNorm uses on its own) is a ``bn_triton::<name>``
custom op with a fake implementation, so that torch.compile, torch.export, make_fx, dispatch modes
and tensor subclasses see it as one opaque node; its implementation runs the launches of
bn_triton/launch.py, as the eager plans do. ``BatchNormFunction`` is the layer's autograd formula on
this route, and ``step`` calls a step's implementation directly where nothing traces (SyncBatchNorm's
eager steps). The common eager call does not come here: bn_triton/eager.py plans it once per
signature. How the pieces fit: docs/design.md.
"""

from typing import Optional

import torch
import torch.autograd.forward_ad as fwAD
from torch import Tensor
from torch._C._functorch import is_functorch_wrapped_tensor as _is_functorch_wrapped
from torch._C._functorch import peek_interpreter_stack

from bn_triton import composite, launch

_IMPL: dict = {}  # the ops' Python implementations by name: the eager route
_OPS: dict = {}  # the custom ops by name: the traced route


def _op(mutates_args=()):
    """Register ``fn`` as the custom op bn_triton::<name> and keep its plain implementation."""

    def register(fn):
        _IMPL[fn.__name__] = fn
        op = torch.library.custom_op(f"bn_triton::{fn.__name__}", mutates_args=mutates_args)(fn)
        _OPS[fn.__name__] = op
        return op

    return register


def _stat(x: Tensor, n=None) -> Tensor:
    return x.new_empty((x.shape[1] if n is None else n,), dtype=launch.acc_dtype(x.dtype))


def _none(x: Tensor) -> Tensor:
    """The empty tensor an op returns for an output nobody asked for."""
    return x.new_empty((0,))


def _workspace(x: Tensor, launch_) -> tuple[Tensor, Tensor]:
    """A reduction's partials (acc dtype) and tickets."""
    parts = torch.empty(launch_.parts, dtype=launch.acc_dtype(x.dtype), device=x.device)
    return parts, launch.tickets(x.device, launch_.tickets)


# ---------------------------------------------------------------- the steps
@_op(mutates_args=("running_mean", "running_var", "num_batches_tracked"))
def stats(
    x: Tensor,
    running_mean: Optional[Tensor],
    running_var: Optional[Tensor],
    momentum: Optional[float],
    num_batches_tracked: Optional[Tensor],
    eps: float,
    want_var: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    x_, geom = launch.canonical(x)
    has_running = running_mean is not None
    cumulative = has_running and momentum is None
    if cumulative and num_batches_tracked is None:
        raise ValueError("momentum=None (the cumulative average) needs num_batches_tracked")
    strides = (running_mean.stride(0), running_var.stride(0)) if has_running else (0, 0)
    momentum = 0.0 if momentum is None else momentum
    running = launch.RunningSpec(*strides, momentum, cumulative, num_batches_tracked is not None)
    mean, rstd, var = _stat(x), _stat(x), _stat(x) if want_var else None
    rest = (mean, rstd, var, running_mean, running_var, num_batches_tracked)
    acc = mean.dtype
    launch_ = launch.stats(geom, x.device, (x.dtype, acc, torch.int32, *launch.dtypes(*rest)), eps, running)
    launch_(x_, *_workspace(x, launch_), *rest)
    return mean, rstd, var if want_var else _none(mean)


@stats.register_fake
def _(x, running_mean, running_var, momentum, num_batches_tracked, eps, want_var):
    return _stat(x), _stat(x), _stat(x, None if want_var else 0)


@_op()
def normalize(
    x: Tensor,
    mean: Tensor,
    scale: Tensor,
    weight: Optional[Tensor],
    bias: Optional[Tensor],
    eps: float,
    scale_is_var: bool,
    residual: Optional[Tensor],
    relu: bool,
) -> Tensor:
    x_, geom = launch.canonical(x)
    y = torch.empty_like(x_)
    if x_.numel() == 0:  # an empty rank of SyncBatchNorm: no grid to launch
        return y
    res = None if residual is None else launch.like(residual, x_)
    pointers = (x_, y, launch.vec(mean), launch.vec(scale), launch.vec(weight), launch.vec(bias), res)
    launch.normalize(geom, x.device, launch.dtypes(*pointers), eps, scale_is_var, relu)(*pointers)
    return y


@normalize.register_fake
def _(x, mean, scale, weight, bias, eps, scale_is_var, residual, relu):
    return launch.empty_canonical(x)


def _relu_mask(relu: bool, y, bias, x_) -> tuple:
    """The backward launches' Y and B: the fused ReLU's mask from y (in x_'s strides) when given,
    else recomputed from x and the bias."""
    if not relu:
        return None, None
    if y is not None:
        return launch.like(y, x_), None
    return None, launch.vec(bias)


@_op()
def grad_sums(
    dy: Tensor,
    x: Tensor,
    mean: Tensor,
    scale: Tensor,
    weight: Optional[Tensor],
    bias: Optional[Tensor],
    y: Optional[Tensor],
    eps: float,
    scale_is_var: bool,
    relu: bool,
    want_dw: bool,
    want_db: bool,
    want_dz: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """sum(dy), sum(dy * xhat) (acc dtype), dweight and dbias (their dtypes), and with ``relu`` the
    masked dy (``want_dz``: d(residual)); the mask is y > 0 when ``y`` is given, else recomputed."""
    x_, geom = launch.canonical(x)
    dw, db = _param_grads(x, weight, bias, want_dw, want_db)
    dz = torch.empty_like(x_) if want_dz else None
    if x_.numel() == 0:  # an empty rank of SyncBatchNorm contributes zeros
        zeros = (x.new_zeros((geom.C,), dtype=launch.acc_dtype(x.dtype)) for _ in range(2))
        return *zeros, dw.zero_(), db.zero_(), _none(x) if dz is None else dz
    sum_dy, sum_dy_xhat = _stat(x), _stat(x)
    y_, b_ = _relu_mask(relu, y, bias, x_)
    head = (launch.like(dy, x_), x_, launch.vec(mean), launch.vec(scale))
    rest = (sum_dy, sum_dy_xhat, dw if want_dw else None, db if want_db else None, y_, launch.vec(weight), b_)
    rest += (dz if relu else None,)
    acc = sum_dy.dtype
    types = (*launch.dtypes(*head), acc, torch.int32, *launch.dtypes(*rest))
    launch_ = launch.grad_sums(geom, x.device, types, eps, scale_is_var, relu)
    launch_(*head, *_workspace(x, launch_), *rest)
    return sum_dy, sum_dy_xhat, dw, db, _none(x) if dz is None else dz


@grad_sums.register_fake
def _(dy, x, mean, scale, weight, bias, y, eps, scale_is_var, relu, want_dw, want_db, want_dz):
    dw, db = _param_grads(x, weight, bias, want_dw, want_db)
    dz = launch.empty_canonical(x) if want_dz else _none(x)
    return _stat(x), _stat(x), dw, db, dz


def _param_grads(x, weight, bias, want_dw, want_db) -> tuple[Tensor, Tensor]:
    """grad_sums' dweight and dbias buffers (the parameters' dtypes), or empty tensors when not wanted."""
    C = x.shape[1]
    dw = x.new_empty((C,), dtype=weight.dtype) if want_dw else _none(x)
    db = x.new_empty((C,), dtype=bias.dtype if bias is not None else launch.acc_dtype(x.dtype)) if want_db else _none(x)
    return dw, db


@_op()
def grad_input(
    dy: Tensor,
    x: Tensor,
    mean: Tensor,
    scale: Tensor,
    weight: Optional[Tensor],
    sum_dy: Optional[Tensor],
    sum_dy_xhat: Optional[Tensor],
    bias: Optional[Tensor],
    y: Optional[Tensor],
    eps: float,
    training: bool,
    count: int,
    relu: bool,
    want_dx: bool,
    want_dz: bool,
) -> tuple[Tensor, Tensor]:
    """dx (training: from the sums, with ``count`` values per channel behind them, 0 meaning x's own;
    eval: dy * weight * rsqrt(scale + eps)), and with ``relu`` the masked dy (``want_dz``)."""
    x_, geom = launch.canonical(x)
    dx = torch.empty_like(x_) if want_dx else None
    dz = torch.empty_like(x_) if want_dz else None
    if x_.numel() != 0:
        y_, b_ = _relu_mask(relu, y, bias, x_)
        pointers = (
            launch.like(dy, x_), x_, dx, launch.vec(mean), launch.vec(scale), launch.vec(weight),
            launch.vec(sum_dy) if training else None, launch.vec(sum_dy_xhat) if training else None,
            y_, b_, dz if relu else None,
        )  # fmt: skip
        launch.grad_input(geom, x.device, launch.dtypes(*pointers), eps, training, count, relu)(*pointers)
    return _none(x) if dx is None else dx, _none(x) if dz is None else dz


@grad_input.register_fake
def _(dy, x, mean, scale, weight, sum_dy, sum_dy_xhat, bias, y, eps, training, count, relu, want_dx, want_dz):
    full = lambda want: launch.empty_canonical(x) if want else _none(x)
    return full(want_dx), full(want_dz)


@_op(mutates_args=("running_mean", "running_var"))
def update_running_stats(
    running_mean: Tensor,
    running_var: Tensor,
    mean: Tensor,
    var: Tensor,
    momentum: Optional[float],
    count: int,
    num_batches_tracked: Optional[Tensor],
) -> None:
    """running <- (1 - f) running + f batch (var unbiased by count/(count-1)); f = momentum, or
    1 / num_batches_tracked (read on the device) when momentum is None."""
    cumulative = momentum is None
    running = launch.RunningSpec(
        running_mean.stride(0), running_var.stride(0), 0.0 if cumulative else momentum, cumulative
    )
    pointers = (
        running_mean,
        running_var,
        launch.vec(mean),
        launch.vec(var),
        num_batches_tracked if cumulative else None,
    )
    C = running_mean.numel()
    launch.running_update(C, mean.device, launch.dtypes(*pointers), running, count)(*pointers)


@update_running_stats.register_fake
def _(running_mean, running_var, mean, var, momentum, count, num_batches_tracked):
    return None


# ---------------------------------------------------------------- one route for eager and tracing
_Parameter = torch.nn.Parameter


def plain_eager(*args) -> bool:
    """True when no tracer, dispatch mode, torch.func transform or forward-AD level is active, and no
    tensor in ``args`` is a subclass, a functorch wrapper or a view with the negative bit: nothing needs
    to see our ops as ops, and their implementations (or an eager plan) may read the tensors' memory."""
    if torch.compiler.is_compiling() or torch._C._len_torch_dispatch_stack():
        return False
    if peek_interpreter_stack() is not None or fwAD._current_level >= 0:
        return False
    for a in args:
        t = type(a)
        if t is Tensor or t is _Parameter:
            if _is_functorch_wrapped(a) or a.is_neg():
                return False
        elif isinstance(a, Tensor):  # a tensor subclass
            return False
    return True


def step(name: str, *args):
    """Run step ``name``: its implementation directly in plain eager mode, else the custom op."""
    if plain_eager(*args):
        return _IMPL[name](*args)
    return _OPS[name](*args)


class BatchNormFunction(torch.autograd.Function):
    """y = act((x - mean) * s * weight + bias + residual) with the statistics given, and its gradients.

    Training: mean and scale are the batch mean and rstd of x (over ``count`` values per channel,
    0 meaning x's own; SyncBatchNorm passes the global batch's), computed beforehand by ``stats``;
    the backward's closed form carries the paths through them, so they take no gradient here.
    Eval: mean and scale are running_mean and running_var (s = rsqrt(scale + eps)). ``sync``, when
    given, all-reduces the two gradient sums in place between the backward's reduction and its dx
    pass (SyncBatchNorm), on every rank.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, residual, mean, scale, eps, training, relu, count, sync):
        y = step("normalize", x, mean, scale, weight, bias, eps, not training, residual, relu)
        # The ReLU's backward mask: from y with a residual (y > 0), else recomputed from x and bias.
        mask_y = y if relu and residual is not None else None
        ctx.save_for_backward(x, weight, bias, mean, scale, mask_y)
        ctx.eps, ctx.training, ctx.relu, ctx.count, ctx.sync = eps, training, relu, count, sync
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight, bias, mean, scale, y = ctx.saved_tensors
        needs = ctx.needs_input_grad
        want_dx, want_dres = needs[0], needs[3]
        want_dw, want_db = needs[1] and weight is not None, needs[2] and bias is not None
        wants = (want_dx, want_dw, want_db, want_dres)
        training, relu, eps = ctx.training, ctx.relu, ctx.eps
        # create_graph=True, or a vmap-batched dy (is_grads_batched): plain torch ops (composite.py)
        if (torch.is_grad_enabled() or not torch._C._has_storage(dy)) and ctx.sync is None:
            grads = composite.differentiable_backward(dy, x, weight, bias, mean, scale, y, training, eps, relu, wants)
            return (*grads, *(None,) * 7)
        dx = dw = db = dz = None
        # With a residual and ReLU, the reduction writes the masked dy g (it is d(residual)), and
        # the dx pass then reads g instead of dy and y.
        store_g = relu and y is not None
        if want_dw or want_db or (training and want_dx):
            sum_dy, sum_dy_xhat, dw, db, g = step(
                "grad_sums",
                dy,
                x,
                mean,
                scale,
                weight,
                bias,
                y,
                eps,
                not training,
                relu,
                want_dw,
                want_db,
                store_g and (want_dres or want_dx),
            )
            if ctx.sync is not None:
                ctx.sync(sum_dy, sum_dy_xhat)
            if want_dx:  # from g (already masked) when the reduction wrote it, else from dy and the mask
                dx, _ = step(
                    "grad_input",
                    g if store_g else dy,
                    x,
                    mean,
                    scale,
                    weight,
                    sum_dy,
                    sum_dy_xhat,
                    bias,
                    None if store_g else y,
                    eps,
                    training,
                    ctx.count,
                    relu and not store_g,
                    True,
                    False,
                )
            dz = g if store_g else None
        elif want_dx or (relu and want_dres):  # eval, elementwise only: dx and/or d(residual)
            dx, dz = step(
                "grad_input",
                dy,
                x,
                mean,
                scale,
                weight,
                None,
                None,
                bias,
                y,
                eps,
                False,
                0,
                relu,
                want_dx,
                relu and want_dres,
            )
        if want_dres and not relu:
            dz = dy
        return _grads(wants, dx, dw, db, dz)


def _grads(wants, dx, dw, db, dz) -> tuple:
    """BatchNormFunction.backward's return: the four gradients asked for (else None), then None for
    mean, scale, eps, training, relu, count and sync."""
    return tuple(g if w else None for w, g in zip(wants, (dx, dw, db, dz), strict=True)) + (None,) * 7


def batch_norm(x, weight, bias, residual, mean, scale, eps, training, relu, count=0, sync=None):
    """The layer's output through ``BatchNormFunction`` when autograd needs it, else one normalize."""
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, weight, bias, residual)):
        return BatchNormFunction.apply(x, weight, bias, residual, mean, scale, eps, training, relu, count, sync)
    return step("normalize", x, mean, scale, weight, bias, eps, not training, residual, relu)
