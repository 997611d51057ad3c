"""BatchNorm from plain torch ops: the path for what the Triton fast path cannot do.

The fast path (ops.py) is an autograd.Function around Triton kernels: it has no forward-mode formula,
no batching rule, and its backward is not differentiable. Everything here is built from ordinary
differentiable torch ops, so autograd, forward AD and every torch.func transform (grad, vmap, jvp,
jacrev, jacfwd, hessian) see through it, to any order:

* ``needed(*args)``: whether a call must take this path (functorch-wrapped tensors, forward-AD
  tangents). Cheap: it runs on the eager hot path.
* ``batch_norm(...)``: the forward, same semantics as ``functional._batch_norm``.
* ``backward_graph(...)``, ``differentiable_backward(...)``: the fast path's first-order gradients as
  a differentiable graph, for double backward (``create_graph=True``).

Statistics are computed in float32 (float64 for float64 inputs), as the kernels do.
"""

import contextlib
from typing import Optional

import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F
from torch import Tensor
from torch._C._functorch import (
    get_unwrapped,
    is_batchedtensor,
    is_functorch_wrapped_tensor,
    maybe_get_level,
    peek_interpreter_stack,
    pop_dynamic_layer_stack,
    push_dynamic_layer_stack,
)

from bn_triton import activations
from bn_triton.running import NO_RUNNING


def needed(*args) -> bool:
    """True when a tensor in ``args`` is wrapped by a torch.func transform, carries a forward-AD
    tangent, or is a view whose values read negated (the negative bit: torch ops resolve it, a kernel
    reading its memory would not)."""
    if torch.compiler.is_compiling():
        # Dynamo cannot trace the functorch queries below; the traced ops (ops.py) serve compile.
        return False
    for a in args:
        if isinstance(a, Tensor) and (is_functorch_wrapped_tensor(a) or a.is_neg()):
            return True
    # Read the module global each call: dual_level() rebinds it. -1 means no dual level is active,
    # so the common case never pays for unpack_dual.
    if fwAD._current_level < 0:
        return False
    return any(isinstance(a, Tensor) and fwAD.unpack_dual(a).tangent is not None for a in args)


def needed_in_backward(dy: Tensor) -> bool:
    """True when a backward must build its gradients from torch ops: under create_graph=True (a
    differentiable backward), or for a dy with no memory of its own (vmap-batched, from
    ``autograd.grad(..., is_grads_batched=True)``), which no kernel can read."""
    if torch.is_grad_enabled():
        return True
    return not torch.compiler.is_compiling() and not torch._C._has_storage(dy)


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _reduce_dims(x: Tensor) -> list[int]:
    return [0, *range(2, x.dim())]


def _per_channel(t: Tensor, x: Tensor, dtype: torch.dtype) -> Tensor:
    """A (C,) tensor shaped to broadcast against x (N, C, ...), in dtype."""
    return t.to(dtype).view(1, -1, *([1] * (x.dim() - 2)))


def batch_norm(input, weight, bias, training, eps, running=NO_RUNNING, *, activation=None, residual=None):
    """``act(BN(input) + residual)`` from differentiable torch ops; arguments as ``functional._batch_norm``.

    Training normalizes with the batch statistics (biased variance) and updates the running
    statistics in place (unbiased variance), outside any graph, as torch does; the cumulative
    factor 1 / num_batches_tracked (momentum None) is read on the device. Eval normalizes with the
    running statistics, which, as in torch, get no gradient.
    """
    if input.numel() == 0:  # nothing to compute: torch's empty-batch rules, under every transform
        return torch_batch_norm(input, weight, bias, training, eps, running, activation=activation, residual=residual)
    running_mean, running_var, momentum, num_batches_tracked = running
    if not training and _has_tangent(running_mean, running_var) and _has_tangent(input, weight, bias, residual):
        raise RuntimeError(  # torch's forward-AD formula refuses them where they are used: in eval
            "batch_norm is not differentiable wrt running_mean and running_var, they cannot have forward grad defined"
        )
    if num_batches_tracked is not None:
        _count_batch(num_batches_tracked)
    acc = _acc_dtype(input.dtype)
    x = input.to(acc)
    if training:
        dims = _reduce_dims(x)
        mean = x.mean(dims)
        var = x.var(dims, correction=0)
        if running_mean is not None:
            count = input.numel() // input.shape[1]
            cumulative = num_batches_tracked if momentum is None else None
            _update_running_stats(running_mean, running_var, mean, var, count, momentum, cumulative)
    else:
        mean, var = running_mean.detach().to(acc), running_var.detach().to(acc)
    y = _affine(x, mean, torch.rsqrt(var + eps), weight, bias)
    if residual is not None:
        y = y + residual.to(acc)
    return activations.apply(y, activation).to(input.dtype)


def _has_tangent(*tensors) -> bool:
    """Whether a tensor carries a forward-AD tangent at the current dual level."""
    if fwAD._current_level < 0:
        return False
    return any(t is not None and fwAD.unpack_dual(t).tangent is not None for t in tensors)


def torch_batch_norm(input, weight, bias, training, eps, running=NO_RUNNING, *, activation=None, residual=None):
    """``act(BN(input) + residual)`` by torch's own batch_norm (CPU tensors without the interpreter,
    empty batches); num_batches_tracked counted with a torch op."""
    momentum = running.momentum
    if running.num_batches_tracked is not None:
        running.num_batches_tracked.add_(1)
        if momentum is None:  # torch's batch_norm takes the factor from the host
            momentum = 1.0 / float(running.num_batches_tracked)
    if momentum is None:  # a module's momentum=None without running statistics: no factor needed
        momentum = 0.0
    y = F.batch_norm(input, running.mean, running.var, weight, bias, training, momentum, eps)
    return epilogue(y, activation, residual)


def epilogue(y: Tensor, activation: Optional[str], residual: Optional[Tensor]) -> Tensor:
    """act(y + residual) with torch ops, in y's dtype as ``y += residual`` gives: the fused epilogue
    where torch's batch_norm did the rest."""
    if residual is not None:
        y = (y + residual).to(y.dtype)
    return activations.apply(y, activation)


def _affine(x: Tensor, mean: Tensor, rstd: Tensor, weight: Optional[Tensor], bias: Optional[Tensor]) -> Tensor:
    """(x - mean) * rstd * weight + bias per channel, in x's dtype (the accumulation dtype here)."""
    y = (x - _per_channel(mean, x, x.dtype)) * _per_channel(rstd, x, x.dtype)
    if weight is not None:
        y = y * _per_channel(weight, x, x.dtype)
    if bias is not None:
        y = y + _per_channel(bias, x, x.dtype)
    return y


# ---------------------------------------------------------------- running statistics
# The update must leave no trace in any graph: no autograd history, no forward-AD tangent, and no
# functorch wrapper. Under grad/jvp, an in-place op on a tensor captured from outside the transform
# is refused, so the update runs below the transforms, on the unwrapped batch statistics, at the
# level the running statistics live at (plain buffers: no transform at all). torch's native kernel
# does the same inside its batch_norm.

_VMAP_ERROR = (
    "bn_triton.batch_norm under vmap: got a batched tensor as input while the running_mean or running_var, "
    "which will be updated in place, were not batched. If you are using a module and do not need eval mode, "
    "set `track_running_stats=False`; otherwise call it in eval mode, or batch the running statistics too."
)


def _level(t: Optional[Tensor]) -> int:
    return -1 if t is None else maybe_get_level(t)


def _lower(t: Tensor, level: int) -> Tensor:
    """t without its transform wrappers above ``level``; detach it below them to drop tangents and graph."""
    while is_functorch_wrapped_tensor(t) and maybe_get_level(t) > level:
        if is_batchedtensor(t):  # one value per sample, one buffer to write it into: torch refuses too
            raise RuntimeError(_VMAP_ERROR)
        t = get_unwrapped(t)
    return t


@contextlib.contextmanager
def _transforms_down_to(level: int):
    """Run the body with the functorch interpreters above ``level`` popped (all of them for -1)."""
    popped = []
    try:
        while (top := peek_interpreter_stack()) is not None and top.level() > level:
            popped.append(pop_dynamic_layer_stack())
        yield
    finally:
        while popped:
            push_dynamic_layer_stack(popped.pop())


def _count_batch(num_batches_tracked: Tensor) -> None:
    """num_batches_tracked += 1 at its own level: a buffer the transformed function captured."""
    level = _level(num_batches_tracked)
    with _transforms_down_to(level), torch.no_grad():
        _lower(num_batches_tracked, level).add_(1)


def _update_running_stats(running_mean, running_var, mean, var, count, momentum, num_batches_tracked):
    level = max(_level(running_mean), _level(running_var))
    mean, var = _lower(mean, level), _lower(var, level)
    if num_batches_tracked is not None:
        num_batches_tracked = _lower(num_batches_tracked, level)
    with _transforms_down_to(level), torch.no_grad():
        # detach() drops forward-AD tangents as well as autograd history.
        mean, var = mean.detach(), var.detach()
        if num_batches_tracked is not None:  # cumulative average: 1 / num_batches_tracked, on the device
            factor = num_batches_tracked.detach().to(mean.dtype).reciprocal()
        else:
            factor = 0.0 if momentum is None else momentum
        unbiased = var * (count / (count - 1))
        for running, batch in ((running_mean, mean), (running_var, unbiased)):
            running.copy_(running.to(batch.dtype) * (1 - factor) + batch * factor)


# ---------------------------------------------------------------- differentiable backward
def backward_graph(
    dy: Tensor,
    x: Tensor,
    weight: Optional[Tensor],
    bias: Optional[Tensor],
    *,
    training: bool,
    eps: float,
    mean_var: Optional[tuple[Tensor, Tensor]] = None,
    activation: Optional[str] = None,
    y: Optional[Tensor] = None,
    residual: Optional[Tensor] = None,
) -> tuple[Tensor, Optional[Tensor], Optional[Tensor], Tensor]:
    """(dx, dweight, dbias, dz) of ``act(BN(x) * weight + bias + residual)`` from differentiable ops.

    For double backward: called with grad mode on, the results carry a graph back to dy, x, weight,
    bias and the residual. ``mean_var`` is (running_mean, running_var) in eval (constants, as in
    torch); in training the batch statistics are recomputed from x, so that dx's dependence on them
    is in the graph. dz = dy * act'(pre) is the gradient at the pre-activation, i.e. of the residual:
    act' is read from the output ``y`` where given (ReLU: y > 0, a constant, relu'' = 0), else taken
    by autograd of the activation's torch ops at the pre-activation recomputed from x, the
    parameters and ``residual``, rounded to x's dtype as the kernels round it. dweight/dbias are
    None when weight/bias is None.
    """
    acc = _acc_dtype(x.dtype)
    xa = x.to(acc)
    dims = _reduce_dims(xa)
    if training:
        mean = xa.mean(dims)
        rstd = torch.rsqrt(xa.var(dims, correction=0) + eps)
    else:
        running_mean, running_var = mean_var
        mean = running_mean.detach().to(acc)
        rstd = torch.rsqrt(running_var.detach().to(acc) + eps)
    g = dy
    if activation is not None and y is not None:
        g = torch.where(y <= 0, torch.zeros((), dtype=dy.dtype, device=dy.device), dy)
    elif activation is not None:
        pre = _affine(xa, mean, rstd, weight, bias)
        if residual is not None:
            pre = pre + residual.to(acc)
        g = _activation_vjp(pre.to(x.dtype).to(acc), dy.to(acc), activation).to(dy.dtype)
    ga = g.to(acc)
    xhat = (xa - _per_channel(mean, xa, acc)) * _per_channel(rstd, xa, acc)
    sum_g = ga.sum(dims)
    sum_g_xhat = (ga * xhat).sum(dims)
    scale = rstd if weight is None else rstd * weight.to(acc)
    if training:
        # d/dx of (x - mean) * rstd, through mean and rstd too: the closed form of torch's formula.
        n = xa.numel() // xa.shape[1]
        dx = _per_channel(scale, xa, acc) * (
            ga - _per_channel(sum_g / n, xa, acc) - xhat * _per_channel(sum_g_xhat / n, xa, acc)
        )
    else:
        dx = ga * _per_channel(scale, xa, acc)
    dweight = None if weight is None else sum_g_xhat.to(weight.dtype)
    dbias = None if bias is None else sum_g.to(bias.dtype)
    return dx.to(x.dtype), dweight, dbias, g


def _activation_vjp(pre: Tensor, dy: Tensor, activation: str) -> Tensor:
    """dy * act'(pre) by autograd of the activation's torch ops: torch's own backward formula, itself
    differentiable (in pre and dy) where the caller's grad mode builds a graph."""
    create_graph = torch.is_grad_enabled()
    with torch.enable_grad():
        leaf = pre if pre.requires_grad else pre.detach().requires_grad_()
        (g,) = torch.autograd.grad(activations.apply(leaf, activation), leaf, dy, create_graph=create_graph)
    return g


def differentiable_backward(dy, x, weight, bias, mean, scale, y, residual, training, eps, activation, wants) -> tuple:
    """The fast path's four gradients (dx, dweight, dbias, d(residual)) as a differentiable graph, for
    a backward under create_graph=True (or with a vmap-batched dy); None where ``wants`` says not
    wanted. ``y`` or ``residual``: what the forward saved for act' (bn_triton/planner.py ``saved``)."""
    grads = backward_graph(
        dy, x, weight, bias, training=training, eps=eps, mean_var=None if training else (mean, scale),
        activation=activation, y=y, residual=residual,
    )  # fmt: skip
    return tuple(g if w else None for w, g in zip(wants, grads, strict=True))
