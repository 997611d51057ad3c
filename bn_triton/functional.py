"""The functional API, ``batch_norm`` (a drop-in for torch.nn.functional.batch_norm), and the layers' call.

A call's signature keys a plan (bn_triton/eager.py) made on the signature's first call, after the
validation (bn_triton/checks.py): the tensors' types, shapes, strides, dtypes, devices and
requires_grad, the input's and the residual's 16-byte alignment, the flags, eps and momentum, grad
mode, and that no tracer, dispatch mode or torch.func transform is active. A later call with that
signature reads those few attributes, finds the plan and launches; a call with any other signature
is validated and planned afresh, so every check fires on the first call and on the Nth alike.

Everything else takes the general route (``_general``), validated the same way:
* torch.compile, export, dispatch modes and tensor subclasses: the custom ops (bn_triton/ops.py);
* torch.func transforms and forward AD: composite.py;
* CPU tensors without Triton's interpreter (TRITON_INTERPRET=1: how the tests run without a GPU),
  and empty batches: torch's own batch_norm, so a model with our layers still runs on a CPU.
"""

from typing import Optional

import torch
import torch.autograd.forward_ad as fwAD
from torch import Tensor
from torch._C._functorch import peek_interpreter_stack

from bn_triton import _loader, activations, checks, composite, eager, launch, ops, planner
from bn_triton._config import interpreting
from bn_triton.running import Running

NO_TORCHSCRIPT = (
    "bn_triton.{name} does not support TorchScript ({how}): its kernels are Triton kernels, which "
    "TorchScript cannot hold. Use torch.compile or torch.export instead, or convert the model's layers "
    "back to torch.nn's BatchNorm before scripting."
)
PLANS_MAX = 1024  # eager plans kept (the oldest dropped first): every shape of every layer, and more
_PLANS: dict = {}
launch._CLEARS.append(_PLANS.clear)


@torch.compiler.assume_constant_result
def _interpreting() -> bool:
    # Dynamo cannot trace triton.knobs (a C getenv): read it at trace time as a constant. The
    # interpreter cannot be switched on later anyway (@triton.jit reads it once, at decoration).
    return interpreting()


def uses_triton(input: Tensor) -> bool:
    """Whether ``input`` is computed by our kernels (else by torch's batch_norm)."""
    if input.device.type == "cuda":
        return True
    return input.device.type == "cpu" and _interpreting() and _loader.interpreter_ready()


_PLAIN = (Tensor, torch.nn.Parameter)


def _signature(x, rm, rv, w, b, res, nbt, *flags) -> tuple:
    """What a plan depends on, from attribute reads alone (each in C); a non-Tensor raises here.

    Every tensor argument gives the same attributes: class, shape, strides, dtype, device,
    requires_grad and the negative bit (a view whose values are read negated); x and the residual,
    which the kernels are specialized on the alignment of, also their address modulo 16. Layouts
    without strides (sparse, mkldnn) raise in ``stride()``: validation then says what is wrong."""
    return (
        x.__class__, x.shape, x.stride(), x.dtype, x.device, x.requires_grad, x.is_neg(),
        x.data_ptr() % 16 if x.__class__ in _PLAIN else None,  # a subclass's data_ptr may warn
        None if rm is None else (rm.__class__, rm.shape, rm.stride(), rm.dtype, rm.device, rm.requires_grad,
                                 rm.is_neg()),
        None if rv is None else (rv.__class__, rv.shape, rv.stride(), rv.dtype, rv.device, rv.requires_grad,
                                 rv.is_neg()),
        None if w is None else (w.__class__, w.shape, w.stride(), w.dtype, w.device, w.requires_grad, w.is_neg()),
        None if b is None else (b.__class__, b.shape, b.stride(), b.dtype, b.device, b.requires_grad, b.is_neg()),
        None if res is None else (res.__class__, res.shape, res.stride(), res.dtype, res.device, res.requires_grad,
                                  res.is_neg(), res.data_ptr() % 16 if res.__class__ in _PLAIN else None),
        None if nbt is None else (nbt.__class__, nbt.shape, nbt.stride(), nbt.dtype, nbt.device, nbt.requires_grad,
                                  nbt.is_neg()),
        torch.is_grad_enabled(), torch._C._len_torch_dispatch_stack(), peek_interpreter_stack(),
        fwAD._current_level, torch._C._get_tracing_state(), *flags,
    )  # fmt: skip


def batch_norm(
    input: Tensor,
    running_mean: Optional[Tensor],
    running_var: Optional[Tensor],
    weight: Optional[Tensor] = None,
    bias: Optional[Tensor] = None,
    training: bool = False,
    momentum: float = 0.1,
    eps: float = 1e-5,
    *,
    activation=None,
    residual: Optional[Tensor] = None,
) -> Tensor:
    """Batch normalization over the channel axis (dim 1); same signature and semantics as torch's.

    In training, normalizes with the batch statistics and, if running_mean/running_var are given,
    updates them in place: running <- (1 - momentum) * running + momentum * batch (unbiased var).
    In eval, normalizes with running_mean/running_var. Differentiable in input, weight and bias.

    Fused epilogue (keyword-only): returns ``act(BN(input) + residual)`` computed in the normalize
    pass. ``activation``: None, a name ("silu", "relu6", "leaky_relu(0.2)" with a parameter ...) or an
    instance of torch's activation module (the table: bn_triton/activations.py). ``residual``
    (optional) has input's shape and device, any floating dtype and layout; the output keeps input's
    dtype, as ``BN(input) += residual`` does. Differentiable in residual too.
    """
    if activation.__class__ is not str and activation is not None:  # a module: its value, read now
        activation = activations.canonical(activation)
    key = plan = None
    if not torch.compiler.is_compiling():  # traced: the general route
        try:
            key = _signature(input, running_mean, running_var, weight, bias, residual, None,
                             training, training.__class__, momentum, eps, activation)  # fmt: skip
            plan = _PLANS[key]
        except Exception:  # a signature not planned yet (or arguments no plan takes: validation says why)
            pass
    if plan is None:
        return _general(key, None, input, running_mean, running_var, weight, bias, training, momentum, eps,
                        activation, residual, None)  # fmt: skip
    if plan.autograd:
        return eager.apply(input, weight, bias, residual, (plan, running_mean, running_var, None))
    return plan.forward(input, weight, bias, residual, running_mean, running_var, None)[0]


def layer(module, input: Tensor, residual, weight, bias, running_mean, running_var, num_batches_tracked) -> Tensor:
    """``module(input, residual)`` for our BatchNorm layers (bn_triton/modules.py), torch's semantics:
    batch statistics in training (and in eval without running statistics), running statistics
    moved and the batch counted when tracked, momentum=None the cumulative average."""
    training, momentum, eps, activation = module.training, module.momentum, module.eps, module.activation
    # batch_norm's lookup, written out again: a shared helper would cost every call a Python frame.
    key = plan = None
    if not torch.compiler.is_compiling():
        try:
            key = _signature(input, running_mean, running_var, weight, bias, residual, num_batches_tracked,
                             module.__class__, training, momentum, eps, activation,
                             module.track_running_stats)  # fmt: skip
            plan = _PLANS[key]
        except Exception:
            pass
    if plan is None:
        return _general(key, module, input, running_mean, running_var, weight, bias, training, momentum, eps,
                        activation, residual, num_batches_tracked)  # fmt: skip
    if plan.autograd:
        return eager.apply(input, weight, bias, residual, (plan, running_mean, running_var, num_batches_tracked))
    return plan.forward(input, weight, bias, residual, running_mean, running_var, num_batches_tracked)[0]


def _general(key, module, input, running_mean, running_var, weight, bias, training, momentum, eps, activation,
             residual, num_batches_tracked):  # fmt: skip
    """Validate a call, then run it: planned, and the plan kept under ``key`` (its signature, or None),
    where the eager route serves it; else by the route it needs. ``module`` is the calling layer, or None."""
    if not torch.compiler.is_compiling() and torch._C._get_tracing_state() is not None:  # torch.jit.trace
        name = "batch_norm" if module is None else type(module).__name__
        raise RuntimeError(NO_TORCHSCRIPT.format(how="torch.jit.trace", name=name))
    count, bn_training = None, training
    if module is None:
        checks.check_arguments(input, weight, bias, running_mean, running_var, training, momentum, eps)
    else:
        module._check_input_dim(input)
        checks.check_numbers(0.0 if momentum is None else momentum, eps)  # torch's module hands them to F.batch_norm
    activation = checks.check_fused(input, activation, residual)
    if isinstance(eps, Tensor) or isinstance(momentum, Tensor):
        key = None  # a 0-d tensor's value is read now, on every call: never a key
    eps, momentum = float(eps), None if momentum is None else float(momentum)
    if module is not None:
        # torch's module: batch statistics in eval too when it has no running statistics; running
        # statistics used (and moved, in training) only when tracked; the batch counted when tracked.
        bn_training = training or (running_mean is None and running_var is None)
        if training and not module.track_running_stats:
            running_mean = running_var = None
        count = num_batches_tracked if training and module.track_running_stats else None
        if momentum is None and count is None:  # torch's factor without a counter: 0.0
            momentum = 0.0
    checks.check_inputs(
        input, running_mean, running_var, weight, bias, bn_training, activation=activation, residual=residual, eps=eps
    )
    if count is not None and not checks.counted_on_device(count, input):
        # torch's way, for a counter our kernels cannot count on: a torch op, the factor read on the host
        if momentum is None:
            momentum = 1.0 / (float(count) + 1.0)  # torch's 1 / float(count) after counting, and its errors
        count.add_(1)
        count, key = None, None  # the factor is this call's: no plan kept
    running = Running(running_mean, running_var, momentum, count)
    plan = _plan(input, running, weight, bias, residual, bn_training, eps, activation)
    if plan is None:
        return _batch_norm(input, weight, bias, bn_training, eps, running, activation=activation, residual=residual)
    if key is not None:
        _PLANS[key] = plan
        while len(_PLANS) > PLANS_MAX:
            _forget_oldest()
    if plan.autograd:
        return eager.BatchNormFunction.apply(input, weight, bias, residual, (plan, running_mean, running_var, count))
    return plan.forward(input, weight, bias, residual, running_mean, running_var, count)[0]


def _forget_oldest() -> None:
    """Drop the oldest plan (dicts keep insertion order), whatever other threads do meanwhile."""
    try:
        del _PLANS[next(iter(_PLANS))]
    except (KeyError, RuntimeError, StopIteration):  # another thread changed the cache: no harm
        pass


def _plan(input, running: Running, weight, bias, residual, training: bool, eps: float, activation):
    """The eager plan of a validated call, or None where another route must serve it."""
    if not ops.plain_eager(input, running.mean, running.var, weight, bias, residual, running.num_batches_tracked):
        return None
    if not uses_triton(input) or input.numel() == 0:
        return None
    grads = (t is not None and t.requires_grad for t in (input, weight, bias, residual))
    autograd = torch.is_grad_enabled() and any(grads)
    return eager.Plan(
        input, weight, bias, residual, *running, training=training, eps=eps, activation=activation, autograd=autograd
    )


def _batch_norm(input, weight, bias, training, eps, running, *, activation=None, residual=None):
    """The general route of a validated call; ``running`` (bn_triton/running.py): the running
    statistics, their momentum, and num_batches_tracked (the modules), on which this batch is counted."""
    if composite.needed(input, running.mean, running.var, weight, bias, residual):  # torch.func, forward AD
        return composite.batch_norm(
            input, weight, bias, training, eps, running, activation=activation, residual=residual
        )
    if not uses_triton(input) or input.numel() == 0:
        args = (input, weight, bias, training, eps, running)
        return composite.torch_batch_norm(*args, activation=activation, residual=residual)
    if planner.forward(training, single=False) == "split":  # the traced route has no single-pass op
        # One launch: statistics, running statistics and num_batches_tracked. Detached: the
        # statistics are constants to BatchNormFunction, whose backward carries their gradients.
        mean, scale, _ = ops.step("stats", input.detach(), *running, eps, False)
    else:
        mean, scale = running.mean, running.var
    return ops.batch_norm(input, weight, bias, residual, mean, scale, eps, training, activation)
