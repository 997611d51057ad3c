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

from bn_triton import composite, launch, planner

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


def _workspace(x: Tensor, launch_) -> dict:
    """A reduction's partials (acc dtype) and tickets, by the kernels' names for them."""
    parts = torch.empty(launch_.parts, dtype=launch.acc_dtype(x.dtype), device=x.device)
    return dict(PART=parts, COUNTER=launch.tickets(x.device, launch_.tickets))


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
    out = dict(MEAN=_stat(x), RSTD=_stat(x), VAR=_stat(x) if want_var else None)
    rs = dict(RUNNING_MEAN=running_mean, RUNNING_VAR=running_var, NUM_BATCHES=num_batches_tracked)
    acc = out["MEAN"].dtype
    types = launch.dtypes(X=x, PART=acc, COUNTER=torch.int32, **out, **rs)
    launch_ = launch.stats(geom, x.device, types, eps, running)
    launch_(X=x_, **_workspace(x, launch_), **out, **rs)
    return out["MEAN"], out["RSTD"], out["VAR"] if want_var else _none(out["MEAN"])


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
    activation: Optional[str],
) -> Tensor:
    """act((x - mean) * s * weight + bias + residual), s = scale or rsqrt(scale + eps) (``scale_is_var``);
    ``activation`` canonical (bn_triton/activations.py) or None."""
    x_, geom = launch.canonical(x)
    y = torch.empty_like(x_)
    if x_.numel() == 0:  # an empty rank of SyncBatchNorm: no grid to launch
        return y
    res = None if residual is None else launch.like(residual, x_)
    pointers = dict(X=x_, Y=y, MEAN=launch.vec(mean), SCALE=launch.vec(scale), W=launch.vec(weight),
                    B=launch.vec(bias), RES=res)  # fmt: skip
    launch.normalize(geom, x.device, launch.dtypes(**pointers), eps, scale_is_var, activation)(**pointers)
    return y


@normalize.register_fake
def _(x, mean, scale, weight, bias, eps, scale_is_var, residual, activation):
    return launch.empty_canonical(x)


def _activation_inputs(activation, grad_from_y: bool, x_, y, bias, residual) -> dict:
    """What a backward launch reads act' from (the caller passes what planner.Backward says): Y, or
    the bias (B) and the residual (RES) of the recompute, in x_'s strides; nothing without an
    activation."""
    if activation is None:
        return {}
    if grad_from_y:
        return dict(Y=launch.like(y, x_))
    return dict(B=launch.vec(bias), RES=None if residual is None else launch.like(residual, x_))


@_op()
def grad_sums(
    dy: Tensor,
    x: Tensor,
    mean: Tensor,
    scale: Tensor,
    weight: Optional[Tensor],
    bias: Optional[Tensor],
    y: Optional[Tensor],
    residual: Optional[Tensor],
    eps: float,
    scale_is_var: bool,
    activation: Optional[str],
    grad_from_y: bool,
    want_dw: bool,
    want_db: bool,
    want_dz: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """sum(g), sum(g * xhat) (acc dtype), dweight and dbias (their dtypes), and g = dy * act'(pre)
    (``want_dz``: it is d(residual)); act' at ``y`` with ``grad_from_y``, else at the pre-activation
    recomputed from x, weight, bias and ``residual``."""
    x_, geom = launch.canonical(x)
    dw, db = _param_grads(x, weight, bias, want_dw, want_db)
    dz = torch.empty_like(x_) if want_dz else None
    if x_.numel() == 0:  # an empty rank of SyncBatchNorm contributes zeros
        zeros = (x.new_zeros((geom.C,), dtype=launch.acc_dtype(x.dtype)) for _ in range(2))
        return *zeros, dw.zero_(), db.zero_(), _none(x) if dz is None else dz
    sums = dict(SUM_DY=_stat(x), SUM_DY_XHAT=_stat(x))
    pointers = dict(
        DY=launch.like(dy, x_), X=x_, MEAN=launch.vec(mean), SCALE=launch.vec(scale), W=launch.vec(weight),
        DW=dw if want_dw else None, DB=db if want_db else None, DZ=dz, **sums,
        **_activation_inputs(activation, grad_from_y, x_, y, bias, residual),
    )  # fmt: skip
    acc = sums["SUM_DY"].dtype
    types = launch.dtypes(PART=acc, COUNTER=torch.int32, **pointers)
    launch_ = launch.grad_sums(geom, x.device, types, eps, scale_is_var, activation, grad_from_y)
    launch_(**_workspace(x, launch_), **pointers)
    return sums["SUM_DY"], sums["SUM_DY_XHAT"], dw, db, _none(x) if dz is None else dz


@grad_sums.register_fake
def _(dy, x, mean, scale, weight, bias, y, residual, eps, scale_is_var, activation, grad_from_y, want_dw, want_db,
      want_dz):  # fmt: skip
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
    residual: Optional[Tensor],
    eps: float,
    training: bool,
    count: int,
    activation: Optional[str],
    grad_from_y: bool,
    want_dx: bool,
    want_dz: bool,
) -> tuple[Tensor, Tensor]:
    """dx (training: from the sums, with ``count`` values per channel behind them, 0 meaning x's own;
    eval: dy * weight * rsqrt(scale + eps)) of g = dy * act'(pre) (as in ``grad_sums``), and g
    (``want_dz``)."""
    x_, geom = launch.canonical(x)
    dx = torch.empty_like(x_) if want_dx else None
    dz = torch.empty_like(x_) if want_dz else None
    if x_.numel() != 0:
        pointers = dict(
            DY=launch.like(dy, x_), X=x_, DX=dx, MEAN=launch.vec(mean), SCALE=launch.vec(scale), W=launch.vec(weight),
            SUM_DY=launch.vec(sum_dy) if training else None, SUM_DY_XHAT=launch.vec(sum_dy_xhat) if training else None,
            DZ=dz,
            **_activation_inputs(activation, grad_from_y, x_, y, bias, residual),
        )  # fmt: skip
        types = launch.dtypes(**pointers)
        launch.grad_input(geom, x.device, types, eps, training, count, activation, grad_from_y)(**pointers)
    return _none(x) if dx is None else dx, _none(x) if dz is None else dz


@grad_input.register_fake
def _(dy, x, mean, scale, weight, sum_dy, sum_dy_xhat, bias, y, residual, eps, training, count, activation,
      grad_from_y, want_dx, want_dz):  # fmt: skip
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
    pointers = dict(
        RUNNING_MEAN=running_mean,
        RUNNING_VAR=running_var,
        MEAN=launch.vec(mean),
        VAR=launch.vec(var),
        NUM_BATCHES=num_batches_tracked if cumulative else None,
    )
    C = running_mean.numel()
    launch.running_update(C, mean.device, launch.dtypes(**pointers), running, count)(**pointers)


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


def step(name: str, *args, **kwargs):
    """Run step ``name``: its implementation directly in plain eager mode, else the custom op."""
    if plain_eager(*args, *kwargs.values()):
        return _IMPL[name](*args, **kwargs)
    return _OPS[name](*args, **kwargs)


class BatchNormFunction(torch.autograd.Function):
    """y = act((x - mean) * s * weight + bias + residual) with the statistics given, and its gradients.

    Training: mean and scale are the batch mean and rstd of x (over ``count`` values per channel,
    0 meaning x's own; SyncBatchNorm passes the global batch's), computed beforehand by ``stats``;
    the backward's closed form carries the paths through them, so they take no gradient here.
    Eval: mean and scale are running_mean and running_var (s = rsqrt(scale + eps)). ``sync``, when
    given, all-reduces the two gradient sums in place between the backward's reduction and its dx
    pass (SyncBatchNorm), on every rank. The launches are bn_triton/planner.py's decisions.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, residual, mean, scale, eps, training, activation, count, sync):
        y = step("normalize", x, mean, scale, weight, bias, eps, not training, residual, activation)
        keep = planner.saved(activation, residual is not None)  # y or the residual, for act'
        ctx.save_for_backward(x, weight, bias, mean, scale, y if keep.y else residual if keep.residual else None)
        ctx.eps, ctx.training, ctx.activation, ctx.count, ctx.sync = eps, training, activation, count, sync
        ctx.has_residual = residual is not None
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight, bias, mean, scale, aux = ctx.saved_tensors
        training, activation, eps, needs = ctx.training, ctx.activation, ctx.eps, ctx.needs_input_grad
        s = planner.backward(training, activation, ctx.has_residual, weight is not None, bias is not None, needs, False)
        wants = (s.dx, s.dweight, s.dbias, s.dresidual is not None)
        y = aux if s.grad_from_y else None
        res = aux if s.read_residual else None
        if composite.needed_in_backward(dy) and ctx.sync is None:  # create_graph=True, or a vmap-batched dy
            grads = composite.differentiable_backward(
                dy, x, weight, bias, mean, scale, y, res, training, eps, activation, wants
            )
            return (*grads, *(None,) * 7)
        act = dict(activation=s.activation, grad_from_y=s.grad_from_y, bias=bias, y=y, residual=res)
        no_act = dict(activation=None, grad_from_y=False, bias=None, y=None, residual=None)
        dx = dw = db = g = None
        if s.kind == "split":
            sum_dy, sum_dy_xhat, dw, db, g = step(
                "grad_sums", dy, x, mean, scale, weight, eps=eps, scale_is_var=not training, want_dw=s.dweight,
                want_db=s.dbias, want_dz=s.store_g, **act,
            )  # fmt: skip
            if ctx.sync is not None:
                ctx.sync(sum_dy, sum_dy_xhat)
            if s.dx:  # from g when the reduction wrote it, else from dy and act'
                dx_act = no_act if s.store_g else act
                dx, _ = step(
                    "grad_input", g if s.store_g else dy, x, mean, scale, weight, sum_dy, sum_dy_xhat, eps=eps,
                    training=training, count=ctx.count, want_dx=True, want_dz=False, **dx_act,
                )  # fmt: skip
        elif s.kind == "elementwise":
            dx, g = step(
                "grad_input", dy, x, mean, scale, weight, None, None, eps=eps, training=training, count=0, want_dx=s.dx,
                want_dz=s.store_g, **act,
            )  # fmt: skip
        dres = dy if s.dresidual == "dy" else g
        return _grads(wants, dx, dw, db, dres)


def _grads(wants, dx, dw, db, dz) -> tuple:
    """BatchNormFunction.backward's return: the four gradients asked for (else None), then None for
    mean, scale, eps, training, activation, count and sync."""
    return tuple(g if w else None for w, g in zip(wants, (dx, dw, db, dz), strict=True)) + (None,) * 7


def batch_norm(x, weight, bias, residual, mean, scale, eps, training, activation, count=0, sync=None):
    """The layer's output through ``BatchNormFunction`` when autograd needs it, else one normalize."""
    if residual is x:  # one tensor as two inputs of an autograd.Function: Dynamo cannot trace it, a view it can
        residual = x.view_as(x)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, weight, bias, residual)):
        return BatchNormFunction.apply(x, weight, bias, residual, mean, scale, eps, training, activation, count, sync)
    return step("normalize", x, mean, scale, weight, bias, eps, not training, residual, activation)
