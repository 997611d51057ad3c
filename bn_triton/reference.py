"""NumPy float64 reference for batch normalization (channel axis 1, any rank >= 2).

Independent of the kernels on purpose: ``backward`` follows the three-path derivation of
docs/math.md ("Backward: the derivation, three paths") step by step — dL/dvar, then dL/dmean, then
dL/dx along the numerator, variance and mean paths — and not the closed form the kernels use; the
activations are their textbook formulas, not the kernels' rearrangements of them.
"""

import math

import numpy as np


def _axes(x: np.ndarray) -> tuple:
    if x.ndim < 2:
        raise ValueError(f"expected an array with at least 2 dimensions (N, C, ...), got {x.ndim}")
    return (0,) + tuple(range(2, x.ndim))


def _per_channel(v, x: np.ndarray) -> np.ndarray:
    """A length-C vector shaped to broadcast against x along axis 1."""
    return np.asarray(v, dtype=np.float64).reshape((1, -1) + (1,) * (x.ndim - 2))


def forward(x, weight=None, bias=None, eps=1e-5):
    """Training-mode forward. Returns (y, mean, var) with the biased batch variance."""
    x = np.asarray(x, dtype=np.float64)
    axes = _axes(x)
    mean = x.mean(axis=axes)  # mu_B = (1/m) sum x_i
    var = ((x - _per_channel(mean, x)) ** 2).mean(axis=axes)  # sigma_B^2 = (1/m) sum (x_i - mu_B)^2
    xhat = (x - _per_channel(mean, x)) / np.sqrt(_per_channel(var, x) + eps)
    y = xhat
    if weight is not None:
        y = y * _per_channel(weight, x)
    if bias is not None:
        y = y + _per_channel(bias, x)
    return y, mean, var


def eval_forward(x, running_mean, running_var, weight=None, bias=None, eps=1e-5):
    """Eval-mode forward: normalize with the running statistics."""
    x = np.asarray(x, dtype=np.float64)
    y = (x - _per_channel(running_mean, x)) / np.sqrt(_per_channel(running_var, x) + eps)
    if weight is not None:
        y = y * _per_channel(weight, x)
    if bias is not None:
        y = y + _per_channel(bias, x)
    return y


def backward(dy, x, weight=None, eps=1e-5):
    """Training-mode backward. Returns (dx, dweight, dbias) for y = weight * xhat + bias."""
    x = np.asarray(x, dtype=np.float64)
    dy = np.asarray(dy, dtype=np.float64)
    axes = _axes(x)
    m = x.size // x.shape[1]
    mu = _per_channel(x.mean(axis=axes), x)
    var = _per_channel(((x - mu) ** 2).mean(axis=axes), x)
    std_inv = 1.0 / np.sqrt(var + eps)
    xhat = (x - mu) * std_inv
    gamma = _per_channel(np.ones(x.shape[1]) if weight is None else weight, x)

    # g_i = dL/dxhat_i = dL/dy_i * gamma
    g = dy * gamma
    # 1) dL/dvar = -1/2 sum_i g_i (x_i - mu) (var + eps)^(-3/2)
    dvar = (-0.5 * g * (x - mu) * (var + eps) ** -1.5).sum(axis=axes, keepdims=True)
    # 2) dL/dmu = -(1 / sqrt(var + eps)) sum_i g_i   (the path through var vanishes: sum (x_j - mu) = 0)
    dmu = (-g * std_inv).sum(axis=axes, keepdims=True)
    # 3) dL/dx_i = g_i / sqrt(var + eps) + dL/dvar * (2/m)(x_i - mu) + dL/dmu * (1/m)
    dx = g * std_inv + dvar * (2.0 / m) * (x - mu) + dmu / m

    dweight = (dy * xhat).sum(axis=axes)
    dbias = dy.sum(axis=axes)
    return dx, dweight, dbias


def eval_backward(dy, running_var, weight=None, eps=1e-5):
    """Eval-mode dx: the statistics are constants, so dx = dy * weight / sqrt(running_var + eps)."""
    dy = np.asarray(dy, dtype=np.float64)
    dx = dy / np.sqrt(_per_channel(running_var, dy) + eps)
    if weight is not None:
        dx = dx * _per_channel(weight, dy)
    return dx


def running_stats(running_mean, running_var, batch_mean, batch_var, count, momentum):
    """One running-statistics update (torch's): the variance is unbiased by count / (count - 1)."""
    rm = (1 - momentum) * np.asarray(running_mean, np.float64) + momentum * np.asarray(batch_mean, np.float64)
    rv = (1 - momentum) * np.asarray(running_var, np.float64) + momentum * np.asarray(batch_var, np.float64) * (
        count / (count - 1)
    )
    return rm, rv


# ---------------------------------------------------------------- activations
_erf = np.vectorize(math.erf, otypes=[np.float64])


def activation(v, name: str, param: float = 0.0) -> np.ndarray:
    """act(v) for the fused epilogue's activations (kernels/activation.py's names; "" is none).
    ``param`` is leaky_relu's negative_slope or elu's alpha. NaN and +-inf give what torch gives,
    NaN included where a formula meets inf * 0 (silu, mish, the gelus and hardswish at -inf)."""
    v = np.asarray(v, dtype=np.float64)
    with np.errstate(all="ignore"):  # exp overflow and inf * 0 are part of the definitions
        if name == "":
            return v.copy()
        if name == "relu":
            return np.where(v < 0, 0.0, v)
        if name == "relu6":
            return np.where(v < 0, 0.0, np.where(v > 6, 6.0, v))
        if name == "leaky_relu":
            return np.where(v > 0, v, param * v)
        if name == "elu":
            return np.where(v > 0, v, param * np.expm1(v))
        if name == "silu":
            return v / (1 + np.exp(-v))
        if name == "hardswish":
            return v * np.clip(v + 3, 0, 6) / 6
        if name == "gelu":
            return 0.5 * v * (1 + _erf(v / math.sqrt(2)))
        if name == "gelu_tanh":
            return 0.5 * v * (1 + np.tanh(math.sqrt(2 / math.pi) * (v + 0.044715 * v**3)))
        if name == "mish":
            return v * np.tanh(np.logaddexp(0, v))
    raise ValueError(f"unknown activation {name!r}")


def activation_grad(dy, v, name: str, param: float = 0.0) -> np.ndarray:
    """dy * act'(v) at the pre-activation v, with torch's backward at the kinks (relu and relu6: 0
    at 0 and 6; leaky_relu: the slope at 0; elu: alpha at 0; hardswish: 0 at -3, 1 at 3) and at NaN
    (where torch's CUDA kernels and scalar CPU loop pass dy: relu, relu6, elu, hardswish)."""
    v = np.asarray(v, dtype=np.float64)
    dy = np.asarray(dy, dtype=np.float64)
    with np.errstate(all="ignore"):
        if name == "":
            return dy.copy()
        if name == "relu":
            return np.where(v <= 0, 0.0, dy)
        if name == "relu6":
            return np.where((v <= 0) | (v >= 6), 0.0, dy)
        if name == "leaky_relu":
            return np.where(v > 0, dy, param * dy)
        if name == "elu":
            return np.where(v <= 0, param * np.exp(v) * dy, dy)
        if name == "silu":
            s = 1 / (1 + np.exp(-v))
            return dy * s * (1 + v * (1 - s))
        if name == "hardswish":
            return np.where(v <= -3, 0.0, np.where(v < 3, dy * (2 * v + 3) / 6, dy))
        if name == "gelu":
            cdf = 0.5 * (1 + _erf(v / math.sqrt(2)))
            pdf = np.exp(-0.5 * v * v) / math.sqrt(2 * math.pi)
            return dy * (cdf + v * pdf)
        if name == "gelu_tanh":
            k = math.sqrt(2 / math.pi)
            t = np.tanh(k * (v + 0.044715 * v**3))
            return dy * (0.5 * (1 + t) + 0.5 * v * (1 - t * t) * k * (1 + 3 * 0.044715 * v * v))
        if name == "mish":
            t = np.tanh(np.logaddexp(0, v))
            s = 1 / (1 + np.exp(-v))
            return dy * (t + v * s * (1 - t * t))
    raise ValueError(f"unknown activation {name!r}")
