"""The op layer: torch.library custom ops around the launchers, and their autograd formulas.

Ops (namespace ``bn_triton``), each with a fake (meta) implementation so that torch.compile and
torch.export trace through them without running a kernel:

* ``train_forward(x, weight?, bias?, eps, residual?=None, relu=False) -> (y, mean, rstd, var)``  batch
  statistics + normalize (+ residual add + ReLU, fused into the normalize pass)
* ``eval_forward(x, running_mean, running_var, weight?, bias?, eps, residual?=None, relu=False) -> y``
* ``backward(dy, x, mean, scale, weight?, eps, training, mask) -> (dx, dweight, dbias)``
* ``backward_relu(dy, x, y?, mean, scale, weight?, bias?, eps, training, mask) -> (dx, dweight, dbias, dresidual)``
  the backward through a fused ReLU (y given: the mask is y > 0; else recomputed from x; see kernels/grad.py)
* ``update_running_stats(running_mean!, running_var!, mean, var, momentum, count, num_batches?)``

The forward ops are functional (``register_autograd`` refuses ops that mutate their inputs); the
running statistics are updated by their own op, which declares exactly what it mutates.
Gradients not asked for come back as empty tensors from ``backward`` and as None from autograd.
Without ReLU, d(residual) is dy itself (the add's gradient): no kernel.
"""

import inspect
from typing import Optional

import torch
from torch import Tensor
from torch._C._functorch import is_functorch_wrapped_tensor as _is_functorch_wrapped
from torch.autograd.function import once_differentiable
from torch.utils._python_dispatch import _get_current_dispatch_mode

from bn_triton import launch


def _stat_like(x: Tensor) -> Tensor:
    return x.new_empty((x.shape[1],), dtype=launch.acc_dtype(x.dtype))


# The ops' plain Python implementations by name, for the eager fast path at the end of this file.
_IMPL: dict = {}


def _keep_impl(fn):
    _IMPL[fn.__name__] = fn
    return fn


# ---------------------------------------------------------------- training forward
@torch.library.custom_op("bn_triton::train_forward", mutates_args=())
@_keep_impl
def train_forward(
    x: Tensor,
    weight: Optional[Tensor],
    bias: Optional[Tensor],
    eps: float,
    residual: Optional[Tensor] = None,
    relu: bool = False,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    x_, geom = launch.canonical(x)
    mean, rstd, var = launch.batch_stats(x_, geom, eps)
    res = None if residual is None else launch.like(residual, x_)
    y = launch.normalize(x_, geom, mean, rstd, False, eps, weight, bias, residual=res, relu=relu)
    return y, mean, rstd, var


@train_forward.register_fake
def _(x, weight, bias, eps, residual=None, relu=False):
    x_, _ = launch.canonical(x)
    return torch.empty_like(x_), _stat_like(x), _stat_like(x), _stat_like(x)


def _train_setup_context(ctx, inputs, output):
    x, weight, bias, eps, residual, relu = inputs
    y, mean, rstd, _var = output
    ctx.save_for_backward(x, weight, mean, rstd, *_relu_saved(y, bias, residual, relu))
    ctx.eps = eps
    ctx.relu = relu
    ctx.mark_non_differentiable(mean, rstd, _var)


def _train_backward(ctx, dy, _dmean, _drstd, _dvar):
    x, weight, mean, rstd, y, bias = ctx.saved_tensors
    if ctx.relu:
        dx, dw, db, dres = _backward_relu(ctx, dy, x, y, mean, rstd, weight, bias, True)
        return _trim(ctx, dx, dw, db, None, dres, None)
    dx, dw, db = _backward(ctx, dy, x, mean, rstd, weight, training=True)
    return _trim(ctx, dx, dw, db, None, _residual_grad(ctx, dy, 4), None)


train_forward.register_autograd(_train_backward, setup_context=_train_setup_context)


# ---------------------------------------------------------------- eval forward
@torch.library.custom_op("bn_triton::eval_forward", mutates_args=())
@_keep_impl
def eval_forward(
    x: Tensor,
    running_mean: Tensor,
    running_var: Tensor,
    weight: Optional[Tensor],
    bias: Optional[Tensor],
    eps: float,
    residual: Optional[Tensor] = None,
    relu: bool = False,
) -> Tensor:
    x_, geom = launch.canonical(x)
    res = None if residual is None else launch.like(residual, x_)
    return launch.normalize(x_, geom, running_mean, running_var, True, eps, weight, bias, residual=res, relu=relu)


@eval_forward.register_fake
def _(x, running_mean, running_var, weight, bias, eps, residual=None, relu=False):
    x_, _ = launch.canonical(x)
    return torch.empty_like(x_)


def _eval_setup_context(ctx, inputs, output):
    x, running_mean, running_var, weight, bias, eps, residual, relu = inputs
    ctx.save_for_backward(x, weight, running_mean, running_var, *_relu_saved(output, bias, residual, relu))
    ctx.eps = eps
    ctx.relu = relu


def _eval_backward(ctx, dy):
    x, weight, running_mean, running_var, y, bias = ctx.saved_tensors
    if ctx.relu:
        dx, dw, db, dres = _backward_relu(ctx, dy, x, y, running_mean, running_var, weight, bias, False, weight_index=3)
        return _trim(ctx, dx, None, None, dw, db, None, dres, None)
    dx, dw, db = _backward(ctx, dy, x, running_mean, running_var, weight, training=False, weight_index=3)
    return _trim(ctx, dx, None, None, dw, db, None, _residual_grad(ctx, dy, 6), None)


eval_forward.register_autograd(_eval_backward, setup_context=_eval_setup_context)


# ---------------------------------------------------------------- backward
@torch.library.custom_op("bn_triton::backward", mutates_args=())
@_keep_impl
def backward(
    dy: Tensor,
    x: Tensor,
    mean: Tensor,
    scale: Tensor,
    weight: Optional[Tensor],
    eps: float,
    training: bool,
    output_mask: list[bool],
) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients of y = (x - mean) * s * weight + bias; s = rstd (training) or rsqrt(scale + eps) (eval).

    In training, mean and scale are the batch mean and rstd, and dx carries the paths through them.
    """
    want_dx, want_dw, want_db = output_mask
    want_dw = want_dw and weight is not None
    x_, geom = launch.canonical(x)
    dy_ = launch.like(dy, x_)
    dx, dw, db = _empty_grads(x, weight, output_mask)
    if want_dw or want_db or (training and want_dx):
        sum_dy, sum_dy_xhat = launch.grad_sums(
            dy_, x_, geom, mean, scale, not training, eps, dw if want_dw else None, db if want_db else None
        )
    if want_dx:
        if training:
            dx = launch.grad_input(dy_, x_, geom, mean, scale, weight, sum_dy, sum_dy_xhat)
        else:
            dx = launch.grad_input(dy_, x_, geom, mean, scale, weight, None, None, training=False, eps=eps)
    return dx, dw, db


def _empty_grads(x, weight, output_mask):
    """Output buffers for dweight/dbias (empty when not asked for), and a placeholder for dx."""
    acc = launch.acc_dtype(x.dtype)
    C = x.shape[1]
    dw = (
        x.new_empty((C,), dtype=weight.dtype) if output_mask[1] and weight is not None else x.new_empty((0,), dtype=acc)
    )
    db = x.new_empty((C,), dtype=acc) if output_mask[2] else x.new_empty((0,), dtype=acc)
    return x.new_empty((0,)), dw, db


@backward.register_fake
def _(dy, x, mean, scale, weight, eps, training, output_mask):
    _, dw, db = _empty_grads(x, weight, output_mask)
    dx = torch.empty_like(launch.canonical(x)[0]) if output_mask[0] else x.new_empty((0,))
    return dx, dw, db


def _backward(ctx, dy, x, mean, scale, weight, training, weight_index=1):
    needs = ctx.needs_input_grad
    mask = [needs[0], needs[weight_index], needs[weight_index + 1]]
    op = _IMPL["backward"] if _plain_eager(dy, x) else backward
    dx, dw, db = op(dy, x, mean, scale, weight, ctx.eps, training, mask)
    return (
        dx if mask[0] else None,
        dw if mask[1] and weight is not None else None,
        db if mask[2] else None,
    )


# ---------------------------------------------------------------- backward through a fused ReLU
@torch.library.custom_op("bn_triton::backward_relu", mutates_args=())
@_keep_impl
def backward_relu(
    dy: Tensor,
    x: Tensor,
    y: Optional[Tensor],
    mean: Tensor,
    scale: Tensor,
    weight: Optional[Tensor],
    bias: Optional[Tensor],
    eps: float,
    training: bool,
    output_mask: list[bool],
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Gradients of out = relu(BN(x) + residual): (dx, dweight, dbias, dresidual).

    g = dy where the ReLU passed (d(residual) = g), then ``backward``'s formulas on g. The mask is
    y > 0 when the forward's output ``y`` is given (the residual case), else the pre-activation is
    recomputed from x, weight and bias (kernels/grad.py has the byte counts behind this choice).
    """
    want_dx, want_dw, want_db, want_dres = output_mask
    want_dw = want_dw and weight is not None
    want_dres = want_dres and y is not None  # without a residual there is no d(residual)
    x_, geom = launch.canonical(x)
    dy_ = launch.like(dy, x_)
    y_ = None if y is None else launch.like(y, x_)
    dx, dw, db = _empty_grads(x, weight, output_mask[:3])
    dres = x.new_empty((0,))
    need_sums = want_dw or want_db or (training and want_dx)
    # With a residual, pass 1 writes g: it is d(residual), and pass 2 then reads g instead of dy and y.
    dz = torch.empty_like(x_) if y is not None and (want_dres or (need_sums and want_dx)) else None
    relu_args = dict(relu=True, y=y_, bias=bias)
    if need_sums:
        sum_dy, sum_dy_xhat = launch.grad_sums(
            dy_,
            x_,
            geom,
            mean,
            scale,
            not training,
            eps,
            dw if want_dw else None,
            db if want_db else None,
            weight=weight,
            dz=dz,
            **relu_args,
        )
        if want_dx:
            if dz is not None:  # already masked
                dx = launch.grad_input(
                    dz, x_, geom, mean, scale, weight, sum_dy, sum_dy_xhat, training=training, eps=eps
                )
            else:
                dx = launch.grad_input(
                    dy_, x_, geom, mean, scale, weight, sum_dy, sum_dy_xhat, training=training, eps=eps, **relu_args
                )
    elif want_dx or dz is not None:  # elementwise only: eval dx, and/or d(residual)
        dx_ = launch.grad_input(
            dy_, x_, geom, mean, scale, weight, None, None, training=False, eps=eps, dz=dz, want_dx=want_dx, **relu_args
        )
        dx = dx_ if want_dx else dx
    if want_dres:
        dres = dz
    return dx, dw, db, dres


@backward_relu.register_fake
def _(dy, x, y, mean, scale, weight, bias, eps, training, output_mask):
    _, dw, db = _empty_grads(x, weight, output_mask[:3])
    full = lambda want: torch.empty_like(launch.canonical(x)[0]) if want else x.new_empty((0,))
    return full(output_mask[0]), dw, db, full(output_mask[3] and y is not None)


def _relu_saved(y, bias, residual, relu):
    """What the ReLU backward needs beyond BN's: y for the mask with a residual, else bias to recompute it."""
    if not relu:
        return None, None
    return (y, None) if residual is not None else (None, bias)


def _trim(ctx, *grads):
    """One gradient per input the op was called with (trailing defaulted arguments may be absent)."""
    return grads[: len(ctx.needs_input_grad)]


def _needs(ctx, index):
    needs = ctx.needs_input_grad
    return index < len(needs) and needs[index]


def _residual_grad(ctx, dy, index):
    """d(residual) of a plain add: dy itself."""
    return dy if _needs(ctx, index) else None


def _backward_relu(ctx, dy, x, y, mean, scale, weight, bias, training, weight_index=1):
    residual_index = 4 if training else 6
    mask = [_needs(ctx, 0), _needs(ctx, weight_index), _needs(ctx, weight_index + 1), _needs(ctx, residual_index)]
    op = _IMPL["backward_relu"] if _plain_eager(dy, x) else backward_relu
    dx, dw, db, dres = op(dy, x, y, mean, scale, weight, bias, ctx.eps, training, mask)
    return (
        dx if mask[0] else None,
        dw if mask[1] and weight is not None else None,
        db if mask[2] else None,
        dres if mask[3] and y is not None else None,
    )


# ---------------------------------------------------------------- running statistics
@torch.library.custom_op("bn_triton::update_running_stats", mutates_args=("running_mean", "running_var"))
@_keep_impl
def update_running_stats(
    running_mean: Tensor,
    running_var: Tensor,
    mean: Tensor,
    var: Tensor,
    momentum: float,
    count: int,
    num_batches_tracked: Optional[Tensor],
) -> None:
    """running <- (1 - f) running + f batch (var unbiased by count/(count-1)).

    f = momentum, or 1 / num_batches_tracked (read on the device) when num_batches_tracked is given.
    """
    launch.update_running_stats(running_mean, running_var, mean, var, momentum, count, num_batches_tracked)


@update_running_stats.register_fake
def _(running_mean, running_var, mean, var, momentum, count, num_batches_tracked):
    return None


# ---------------------------------------------------------------- eager fast path
# Calling an op above costs the dispatcher plus custom_op's Python autograd wrapper, tens of
# microseconds a call on top of the launches (bench/overhead.py), about as much as the launches of a
# small BatchNorm on a GPU. In plain eager mode nothing needs to see our ops as ops, so the
# functional API calls the same implementations and the same autograd formulas through one
# autograd.Function instead. Whenever something traces or intercepts operators (torch.compile,
# torch.export, make_fx, fake tensors, dispatch modes, functorch transforms, tensor subclasses), the
# ops are called, exactly as before. Both routes run the same code: only the wrapping differs.

_PLAIN_TYPES = (Tensor, torch.nn.Parameter)


def _plain_eager(*args) -> bool:
    """True when no tracer, mode, transform or tensor subclass needs to see our ops as ops."""
    if torch.compiler.is_compiling() or _get_current_dispatch_mode() is not None:
        return False
    return all(not isinstance(a, Tensor) or (type(a) in _PLAIN_TYPES and not _is_functorch_wrapped(a)) for a in args)


def _requires_autograd(args) -> bool:
    return torch.is_grad_enabled() and any(isinstance(a, Tensor) and a.requires_grad for a in args)


# The ops' default arguments, so that the fast path hands setup_context every input, as the
# dispatcher does for the ops (trailing defaults filled in).
_DEFAULTS = {name: tuple(p.default for p in inspect.signature(fn).parameters.values()) for name, fn in _IMPL.items()}


def _complete(name, args) -> tuple:
    return args + _DEFAULTS[name][len(args) :]


# forward(ctx, ...) calls the setup_context itself: with a separate setup_context staticmethod,
# Function.apply binds default arguments through inspect.signature on every call, which costs more
# than the dispatcher it replaces.
class _TrainForward(torch.autograd.Function):
    """train_forward without the dispatcher: the op's implementation and autograd formulas."""

    @staticmethod
    def forward(ctx, *inputs):
        output = _IMPL["train_forward"](*inputs)
        _train_setup_context(ctx, inputs, output)
        return output

    backward = staticmethod(once_differentiable(_train_backward))


class _EvalForward(torch.autograd.Function):
    """eval_forward without the dispatcher: the op's implementation and autograd formulas."""

    @staticmethod
    def forward(ctx, *inputs):
        output = _IMPL["eval_forward"](*inputs)
        _eval_setup_context(ctx, inputs, output)
        return output

    backward = staticmethod(once_differentiable(_eval_backward))


def call_train_forward(*args):
    """``train_forward(*args)``, through the eager fast path when nothing traces (same results, grads)."""
    if not _plain_eager(*args):
        return train_forward(*args)
    args = _complete("train_forward", args)
    if _requires_autograd(args):
        return _TrainForward.apply(*args)
    return _IMPL["train_forward"](*args)


def call_eval_forward(*args):
    """``eval_forward(*args)``, through the eager fast path when nothing traces (same results, grads)."""
    if not _plain_eager(*args):
        return eval_forward(*args)
    args = _complete("eval_forward", args)
    if _requires_autograd(args):
        return _EvalForward.apply(*args)
    return _IMPL["eval_forward"](*args)


def call_update_running_stats(running_mean, running_var, *args):
    """``update_running_stats(...)``, through the eager fast path when nothing traces."""
    if not _plain_eager(running_mean, running_var, *args):
        return update_running_stats(running_mean, running_var, *args)
    _IMPL["update_running_stats"](running_mean, running_var, *args)
    # The op bumps the version counters of what it mutates, so autograd catches a running
    # statistic changed between an eval forward that saved it and its backward: so do we.
    for t in (running_mean, running_var):
        if not t.is_inference():
            torch.autograd.graph.increment_version(t)
