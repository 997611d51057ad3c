"""Validation of a batch_norm call: torch's exception types, and its messages where it has one.

Every check runs before any kernel is launched and before any state (running statistics,
num_batches_tracked) moves. The eager route runs them on the first call of each signature only
(bn_triton/functional.py): every property they read is part of the signature, so a later call with
the same signature would pass them again, and a call with another signature is checked afresh.
"""

import numbers
from typing import Optional

import torch
from torch import Tensor

from bn_triton import activations

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
# torch.batch_norm's arguments, in its argument parser's order (its TypeErrors name these positions).
_TENSOR_ARGS = (("weight", 2), ("bias", 3), ("running_mean", 4), ("running_var", 5))


def _type_error(name: str, position: int, expected: str, value) -> TypeError:
    return TypeError(
        f"batch_norm(): argument '{name}' (position {position}) must be {expected}, not {type(value).__name__}"
    )


def check_arguments(input, weight, bias, running_mean, running_var, training, momentum, eps) -> None:
    """torch.nn.functional.batch_norm's checks before its C++ ones: the batch size in training, then
    the argument parser's types: tensors or None, a bool, two floats (or ints, or 0-d tensors)."""
    if training:
        check_batch_size(input.size())
    if not isinstance(input, Tensor):
        raise _type_error("input", 1, "Tensor", input)
    for (name, position), t in zip(_TENSOR_ARGS, (weight, bias, running_mean, running_var), strict=True):
        if t is not None and not isinstance(t, Tensor):
            raise _type_error(name, position, "Tensor", t)
    if not isinstance(training, bool):
        raise _type_error("training", 6, "bool", training)
    check_numbers(momentum, eps)


def check_numbers(momentum, eps) -> None:
    """torch's argument parser on batch_norm's two floats: any real number (Python's, NumPy's), or a
    0-d tensor, which it reads as its number."""
    if not _is_float(momentum):
        raise _type_error("momentum", 7, "float", momentum)
    if not _is_float(eps):
        raise _type_error("eps", 8, "float", eps)


def _is_float(v) -> bool:
    if isinstance(v, Tensor):
        return v.dim() == 0
    return isinstance(v, numbers.Real)  # bool is an int; NumPy registers its scalars as Reals


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
    if input.numel() == 0:  # torch's empty batch returns before its other checks (torch's batch_norm serves it)
        return
    if (running_mean is None) != (running_var is None):
        raise ValueError("running_mean and running_var must either both be None or neither be None")
    if not training and running_mean is None:
        raise RuntimeError("running_mean must be defined in evaluation mode")
    if training:
        check_batch_size(input.shape)
    C = input.shape[1] if input.dim() >= 2 else 0  # torch counts no channels in a 0-d or 1-D input
    per_channel = (("running_mean", running_mean), ("running_var", running_var), ("weight", weight), ("bias", bias))
    for name, t in per_channel:
        if t is not None and t.numel() != C:
            raise RuntimeError(f"{name} should contain {C} elements not {t.numel()}")
    if input.dim() < 2 and input.numel() != 0:
        raise IndexError("Dimension out of range (expected to be in range of [-1, 0], but got 1)")
    for name, t in per_channel:
        if t is None:
            continue
        if t.dim() != 1:  # torch indexes them as 1-D (a TensorAccessor): anything else is refused
            raise RuntimeError(f"TensorAccessor expected 1 dims but tensor has {t.dim()}")
        if t.device != input.device:
            raise RuntimeError(
                "Expected all tensors to be on the same device, "
                f"but found input on {input.device} and {name} on {t.device}"
            )
    for name, t in per_channel[:2]:
        if t is not None and t.requires_grad and torch.is_grad_enabled():
            raise RuntimeError(
                f"The function 'native_batch_norm' is not differentiable with respect to argument '{name}'. "
                "This input cannot have requires_grad True."
            )
    if input.dtype not in SUPPORTED_DTYPES:  # torch's kernel dispatch, after its shape checks
        name = input.new_empty(0).type().rpartition(".")[2].removesuffix("Tensor")  # "Long", "ComplexFloat"
        raise NotImplementedError(f'"batch_norm" not implemented for \'{name}\'')
    check_dtypes(input, per_channel)


def check_batch_size(shape: torch.Size) -> None:
    """torch's: training needs more than one value per channel (N times the spatial size)."""
    if not shape:
        raise IndexError("tuple index out of range")
    values = shape[0]
    for d in shape[2:]:
        values *= d
    if values == 1:
        raise ValueError(f"Expected more than 1 value per channel when training, got input size {shape}")


def check_dtypes(input: Tensor, per_channel) -> None:
    """The per-channel tensors share one dtype: the input's, or float32 for a float16/bfloat16 input."""
    present = [(name, t.dtype) for name, t in per_channel if t is not None]
    allowed = (input.dtype, torch.float32) if input.dtype in (torch.float16, torch.bfloat16) else (input.dtype,)
    for _, dtype in present:
        if dtype not in allowed or dtype != present[0][1]:
            shared = " or ".join(str(d) for d in allowed)
            got = ", ".join(f"{n} {d}" for n, d in present)
            raise RuntimeError(
                f"batch_norm: mixed dtype: weight, bias, running_mean and running_var must share one dtype, "
                f"{shared} for a {input.dtype} input; got {got}"
            )


def counted_on_device(num_batches_tracked: Tensor, input: Tensor) -> bool:
    """Whether our kernels count a module's batch on this counter: one number of an integer or
    floating dtype, on the input's device. torch's module takes any tensor that ``add_(1)`` takes
    (and, for the cumulative average, that ``float()`` reads): bn_triton does the same for the others."""
    t = num_batches_tracked
    return t.numel() == 1 and t.device == input.device and t.dtype != torch.bool and not t.is_complex()


def check_eps(eps: float, training: bool) -> None:
    """torch's checks and messages: eps > 0 in training (the batch variance may be 0), >= 0 in eval."""
    if training and not eps > 0:
        raise ValueError(f"batch_norm eps must be positive during training, but got {eps}")
    if not training and not eps >= 0:
        raise ValueError(f"batch_norm eps must be non-negative, but got {eps}")


def check_fused(input: Tensor, activation, residual: Optional[Tensor]) -> Optional[str]:
    """Validate the fused-epilogue arguments; returns the activation's canonical string
    (bn_triton/activations.py). The residual has the input's shape and device, in any floating dtype:
    it is read in its own dtype, the sum taken in the accumulation dtype, and the output keeps the
    input's dtype, as ``BN(x) += residual`` does."""
    activation = activations.canonical(activation)
    if residual is None:
        return activation
    if not isinstance(residual, Tensor):
        raise TypeError(f"batch_norm: residual must be a Tensor or None, got {type(residual).__name__}")
    if residual.shape != input.shape:
        raise RuntimeError(
            f"batch_norm: residual must have the input's shape {tuple(input.shape)}, got {tuple(residual.shape)}"
        )
    if residual.dtype not in SUPPORTED_DTYPES:
        raise TypeError(
            f"batch_norm: residual must be float16, bfloat16, float32 or float64, got {residual.dtype}"
        )
    if residual.device != input.device:
        raise RuntimeError(
            "Expected all tensors to be on the same device, but found input on "
            f"{input.device} and residual on {residual.device}"
        )
    return activation
