"""The op layer: torch.library custom ops around the launchers, and their autograd formulas.

Ops (namespace ``bn_triton``), each with a fake (meta) implementation so that torch.compile and
torch.export trace through them without running a kernel:

* ``train_forward(x, weight?, bias?, eps) -> (y, mean, rstd, var)``  batch statistics + normalize
* ``eval_forward(x, running_mean, running_var, weight?, bias?, eps) -> y``
* ``backward(dy, x, mean, scale, weight?, eps, training, mask) -> (dx, dweight, dbias)``
* ``update_running_stats(running_mean!, running_var!, mean, var, momentum, count, num_batches?)``

The forward ops are functional (``register_autograd`` refuses ops that mutate their inputs); the
running statistics are updated by their own op, which declares exactly what it mutates.
Gradients not asked for come back as empty tensors from ``backward`` and as None from autograd.
"""

from typing import Optional

import torch
from torch import Tensor

from bn_triton import launch


def _stat_like(x: Tensor) -> Tensor:
    return x.new_empty((x.shape[1],), dtype=launch.acc_dtype(x.dtype))


# ---------------------------------------------------------------- training forward
@torch.library.custom_op("bn_triton::train_forward", mutates_args=())
def train_forward(
    x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], eps: float
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    x_, geom = launch.canonical(x)
    mean, rstd, var = launch.batch_stats(x_, geom, eps)
    y = launch.normalize(x_, geom, mean, rstd, False, eps, weight, bias)
    return y, mean, rstd, var


@train_forward.register_fake
def _(x, weight, bias, eps):
    x_, _ = launch.canonical(x)
    return torch.empty_like(x_), _stat_like(x), _stat_like(x), _stat_like(x)


def _train_setup_context(ctx, inputs, output):
    x, weight, _bias, eps = inputs
    _y, mean, rstd, _var = output
    ctx.save_for_backward(x, weight, mean, rstd)
    ctx.eps = eps
    ctx.mark_non_differentiable(mean, rstd, _var)


def _train_backward(ctx, dy, _dmean, _drstd, _dvar):
    x, weight, mean, rstd = ctx.saved_tensors
    dx, dw, db = _backward(ctx, dy, x, mean, rstd, weight, training=True)
    return dx, dw, db, None


train_forward.register_autograd(_train_backward, setup_context=_train_setup_context)


# ---------------------------------------------------------------- eval forward
@torch.library.custom_op("bn_triton::eval_forward", mutates_args=())
def eval_forward(
    x: Tensor,
    running_mean: Tensor,
    running_var: Tensor,
    weight: Optional[Tensor],
    bias: Optional[Tensor],
    eps: float,
) -> Tensor:
    x_, geom = launch.canonical(x)
    return launch.normalize(x_, geom, running_mean, running_var, True, eps, weight, bias)


@eval_forward.register_fake
def _(x, running_mean, running_var, weight, bias, eps):
    x_, _ = launch.canonical(x)
    return torch.empty_like(x_)


def _eval_setup_context(ctx, inputs, output):
    x, running_mean, running_var, weight, _bias, eps = inputs
    ctx.save_for_backward(x, weight, running_mean, running_var)
    ctx.eps = eps


def _eval_backward(ctx, dy):
    x, weight, running_mean, running_var = ctx.saved_tensors
    dx, dw, db = _backward(ctx, dy, x, running_mean, running_var, weight, training=False, weight_index=3)
    return dx, None, None, dw, db, None


eval_forward.register_autograd(_eval_backward, setup_context=_eval_setup_context)


# ---------------------------------------------------------------- backward
@torch.library.custom_op("bn_triton::backward", mutates_args=())
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
            dx = launch.normalize(dy_, geom, None, scale, True, eps, weight, None)
    return dx, dw, db


def _empty_grads(x, weight, output_mask):
    """Output buffers for dweight/dbias (empty when not asked for), and a placeholder for dx."""
    acc = launch.acc_dtype(x.dtype)
    C = x.shape[1]
    dw = x.new_empty((C,), dtype=weight.dtype) if output_mask[1] and weight is not None else x.new_empty((0,), dtype=acc)
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
    dx, dw, db = backward(dy, x, mean, scale, weight, ctx.eps, training, mask)
    return (
        dx if mask[0] else None,
        dw if mask[1] and weight is not None else None,
        db if mask[2] else None,
    )


# ---------------------------------------------------------------- running statistics
@torch.library.custom_op("bn_triton::update_running_stats", mutates_args=("running_mean", "running_var"))
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
