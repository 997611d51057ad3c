"""The functional API: ``batch_norm``, a drop-in for ``torch.nn.functional.batch_norm``.

Validation happens here, before any kernel runs or any running statistic changes. Then:
* CUDA tensors always go to our Triton kernels (through the ops in ops.py);
* CPU tensors go to them too when Triton's interpreter is on (TRITON_INTERPRET=1: how the tests run
  without a GPU); otherwise to torch's own CPU batch_norm, so a model with our layers still runs on
  a CPU;
* an empty batch (no values per channel) returns what torch returns: nothing to compute.
"""

from typing import Optional

import torch
from torch import Tensor

from bn_triton import _loader, composite, ops
from bn_triton._config import interpreting
from bn_triton.running import NO_RUNNING, Running

NO_TORCHSCRIPT = (
    "bn_triton.{name} does not support TorchScript ({how}): its kernels are Triton kernels, which "
    "TorchScript cannot hold. Use torch.compile or torch.export instead, or convert the model's layers "
    "back to torch.nn's BatchNorm before scripting."
)

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


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


def check_inputs(
    input: Tensor,
    running_mean: Optional[Tensor],
    running_var: Optional[Tensor],
    weight: Optional[Tensor],
    bias: Optional[Tensor],
    training: bool,
    *,
    activation: Optional[str] = None,
    residual: Optional[Tensor] = None,
    eps: Optional[float] = None,
) -> None:
    """Raise a clear error for anything batch_norm cannot compute; torch's messages where it has one."""
    check_fused(input, activation, residual)
    if eps is not None:
        check_eps(eps, training)
    if input.dim() < 2:
        raise ValueError(
            f"batch_norm: expected an input with at least 2 dimensions (N, C, ...), got {input.dim()}D input"
        )
    if input.dtype not in SUPPORTED_DTYPES:
        raise TypeError(
            f"batch_norm: expected a floating-point input (float16, bfloat16, float32 or float64), got {input.dtype}"
        )
    if (running_mean is None) != (running_var is None):
        raise ValueError("running_mean and running_var must either both be None or neither be None")
    if not training and running_mean is None:
        raise RuntimeError("running_mean must be defined in evaluation mode")
    C = input.shape[1]
    for name, t in (("running_mean", running_mean), ("running_var", running_var), ("weight", weight), ("bias", bias)):
        if t is None:
            continue
        if t.numel() != C:
            raise RuntimeError(f"{name} should contain {C} elements not {t.numel()}")
        if t.device != input.device:
            raise RuntimeError(
                "Expected all tensors to be on the same device, "
                f"but found input on {input.device} and {name} on {t.device}"
            )
        if t.dtype not in (input.dtype, torch.float32):
            raise TypeError(f"batch_norm: {name} must be float32 or the input's dtype ({input.dtype}), got {t.dtype}")
    if training and C > 0 and input.numel() // C == 1:
        raise ValueError(f"Expected more than 1 value per channel when training, got input size {input.size()}")


def check_eps(eps: float, training: bool) -> None:
    """torch's checks and messages: eps > 0 in training (the batch variance may be 0), >= 0 in eval."""
    if training and not eps > 0:
        raise ValueError(f"batch_norm eps must be positive during training, but got {eps}")
    if not training and not eps >= 0:
        raise ValueError(f"batch_norm eps must be non-negative, but got {eps}")


ACTIVATIONS = (None, "relu")


def check_fused(input: Tensor, activation: Optional[str], residual: Optional[Tensor]) -> None:
    """Validate the fused-epilogue arguments: a known activation, a residual exactly like input."""
    if activation not in ACTIVATIONS:
        raise ValueError(f"batch_norm: unknown activation {activation!r}; expected None or 'relu'")
    if residual is None:
        return
    if not isinstance(residual, Tensor):
        raise TypeError(f"batch_norm: residual must be a Tensor or None, got {type(residual).__name__}")
    if residual.shape != input.shape:
        raise RuntimeError(
            f"batch_norm: residual must have the input's shape {tuple(input.shape)}, got {tuple(residual.shape)}"
        )
    if residual.dtype != input.dtype:
        raise TypeError(f"batch_norm: residual must have the input's dtype ({input.dtype}), got {residual.dtype}")
    if residual.device != input.device:
        raise RuntimeError(
            "Expected all tensors to be on the same device, but found input on "
            f"{input.device} and residual on {residual.device}"
        )


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
    activation: Optional[str] = None,
    residual: Optional[Tensor] = None,
) -> Tensor:
    """Batch normalization over the channel axis (dim 1); same signature and semantics as torch's.

    In training, normalizes with the batch statistics and, if running_mean/running_var are given,
    updates them in place: running <- (1 - momentum) * running + momentum * batch (unbiased var).
    In eval, normalizes with running_mean/running_var. Differentiable in input, weight and bias.

    Fused epilogue (keyword-only): returns ``act(BN(input) + residual)`` computed in the normalize
    pass, where ``activation`` is None or ``"relu"`` and ``residual`` (optional) has input's shape,
    dtype and device, in any layout. Differentiable in residual too.
    """
    if torch._C._get_tracing_state() is not None:  # torch.jit.trace
        raise RuntimeError(NO_TORCHSCRIPT.format(how="torch.jit.trace", name="batch_norm"))
    if momentum is None:  # torch's argument parser refuses it (momentum=None is the modules' option)
        raise TypeError(f"batch_norm(): argument 'momentum' (position 7) must be float, not {type(momentum).__name__}")
    if isinstance(eps, Tensor):  # torch accepts a 0-d tensor (its parser reads the number)
        eps = float(eps)
    check_inputs(
        input, running_mean, running_var, weight, bias, training, activation=activation, residual=residual, eps=eps
    )
    running = Running(running_mean, running_var, momentum)
    return _batch_norm(input, weight, bias, training, eps, running, activation=activation, residual=residual)


def _batch_norm(input, weight, bias, training, eps, running=NO_RUNNING, *, activation=None, residual=None):
    """batch_norm after validation; ``running`` (bn_triton/running.py): the running statistics, their
    momentum, and num_batches_tracked (the modules), on which this batch is counted."""
    if composite.needed(input, running.mean, running.var, weight, bias, residual):  # torch.func, forward AD
        return composite.batch_norm(
            input, weight, bias, training, eps, running, activation=activation, residual=residual
        )
    relu = activation == "relu"
    if not uses_triton(input) or input.numel() == 0:
        args = (input, weight, bias, training, eps, running)
        return composite.torch_batch_norm(*args, activation=activation, residual=residual)
    if training:
        plain = ops.plain_eager(input)
        if plain and ops.single_pass(input):  # statistics, running statistics and y: one launch
            return ops.batch_norm(input, weight, bias, residual, None, None, eps, True, relu, stats=running)
        # One launch: statistics, running statistics and num_batches_tracked. Detached: the
        # statistics are constants to BatchNormFunction, whose backward carries their gradients.
        x = input if plain else input.detach()
        mean, scale, _ = ops.step("stats", x, *running, eps, False)
    else:
        mean, scale = running.mean, running.var
    return ops.batch_norm(input, weight, bias, residual, mean, scale, eps, training, relu)
