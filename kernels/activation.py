"""The activations a fused BN epilogue applies, act(BN(x) + residual), and their derivatives: one
table under one string constexpr ``ACT`` ("" for none), with torch's semantics.

``activate(v, ACT, param)`` is act(v); ``activation_grad(dy, v, ACT, param)`` is dy * act'(v), where
v is the pre-activation and act' is what torch's own backward computes, including its choice at each
kink (relu6 passes the gradient only on 0 < v < 6, hardswish is 0 at v = -3 and dy at v = 3, elu
takes alpha * exp(v) at v = 0). At NaN, torch's CUDA kernels and its scalar CPU loop are followed:
a branch chosen by a comparison takes its else side (relu, relu6, elu and hardswish pass dy through;
torch's vectorized CPU loop gives 0 or NaN there instead). The smooth ones give NaN where torch's
formulas do: silu, mish and both gelus at -inf (forward) and at +-inf (gradient), hardswish(-inf).

v, dy and ``param`` (leaky_relu's negative_slope, elu's alpha; 0 when unused) are in the
accumulation dtype: fp32, or fp64 for float64 inputs. Torch applies the activation to BN's output
rounded to the input dtype; a caller that wants its masks bit for bit passes v rounded the same way.

Only tl.exp and tl.erf are used (Triton has no tanh, and libdevice fails in the interpreter). No
kept result comes from exp of a large positive number, so a large finite |v| gives no inf / inf or
inf * 0 that torch's formulas do not have too. gelu_tanh and mish need no tanh: 0.5 (1 + tanh u)
= sigmoid(2u), and tanh(softplus(v)) has a closed form in exp(-|v|); both keep their digits where
torch's formulas cancel. gelu's 1 + erf(v / sqrt 2) cancels for v < -4 as torch's does (Triton has
no erfc): an absolute error ~|v| ulp(1), far below the output's tolerance.
"""

import triton
import triton.language as tl

SQRT1_2 = tl.constexpr(0.7071067811865476)  # 1 / sqrt(2)
INV_SQRT_2PI = tl.constexpr(0.3989422804014327)  # 1 / sqrt(2 pi): the normal density at 0
SQRT_2_OVER_PI = tl.constexpr(0.7978845608028654)  # gelu_tanh's inner scale
GELU_KAPPA = tl.constexpr(0.044715)  # gelu_tanh's cubic coefficient


@triton.jit
def sigmoid(v):
    """1 / (1 + exp(-v)), from exp(-|v|) only: never exp of a large positive number, and sigmoid of
    a very negative v keeps its digits (e^v, not 1 minus something close to 1)."""
    e = tl.exp(-tl.abs(v))  # in [0, 1]; NaN stays NaN
    s = 1.0 / (1.0 + e)  # sigmoid(|v|)
    return tl.where(v < 0, e * s, s)


@triton.jit
def expm1(v):
    """exp(v) - 1, accurate near 0 as well (elu's negative side)."""
    # exp(v) - 1 loses digits as v -> 0 (relative error ~ ulp / |v|). For |v| < 1/4 use Taylor's
    # series in Horner form, v (1 + v/2 (1 + v/3 (...))): the terms after v^12/12! are below
    # float64's half ulp there.
    p = tl.zeros_like(v) + 1.0
    for k in tl.static_range(12, 1, -1):
        p = 1.0 + v * (1.0 / k) * p
    return tl.where(tl.abs(v) < 0.25, v * p, tl.exp(v) - 1.0)


@triton.jit
def tanh_softplus(v):
    """t = tanh(softplus(v)) = tanh(log(1 + e^v)) and 1 - t, in closed form from e = exp(-|v|)."""
    # tanh(log w) = (w^2 - 1) / (w^2 + 1) with w = 1 + e^v: no log, no tanh. For v >= 0 divide by
    # e^(2v), so nothing overflows; for v < 0, w^2 - 1 = e (e + 2) keeps its digits when tiny
    # (mish(-80) ~ -80 e^-80, not 0). 1 - t comes from its own formula, without cancellation.
    e = tl.exp(-tl.abs(v))
    n = e * (e + 2.0)
    d_pos = 1.0 + 2.0 * e + 2.0 * e * e
    t = tl.where(v < 0, n / (n + 2.0), (1.0 + 2.0 * e) / d_pos)
    one_minus_t = tl.where(v < 0, 2.0 / (n + 2.0), 2.0 * e * e / d_pos)
    return t, one_minus_t


@triton.jit
def activate(v, ACT: tl.constexpr, param):
    """act(v) for the activation named ACT ("" returns v); param: negative_slope or alpha."""
    if ACT == "relu":
        v = tl.where(v < 0, 0.0, v)  # NaN < 0 is false: NaN stays, as in torch.relu
    elif ACT == "relu6":
        v = tl.where(v < 0, 0.0, tl.where(v > 6.0, 6.0, v))
    elif ACT == "leaky_relu":
        v = tl.where(v > 0, v, v * param)
    elif ACT == "elu":
        v = tl.where(v > 0, v, expm1(v) * param)
    elif ACT == "silu":
        v = v * sigmoid(v)
    elif ACT == "hardswish":
        # torch's order: like torch's, hardswish(v) is inf for v > max / 6 (v * 6 overflows first)
        v = v * tl.minimum(tl.maximum(v + 3.0, 0.0), 6.0) / 6.0
    elif ACT == "gelu":
        v = v * 0.5 * (1.0 + tl.erf(v * SQRT1_2))
    elif ACT == "gelu_tanh":
        # 0.5 (1 + tanh(u)) = sigmoid(2u): no cancellation for very negative v
        u = SQRT_2_OVER_PI * (v + GELU_KAPPA * (v * v * v))
        v = v * sigmoid(2.0 * u)
    elif ACT == "mish":
        t, _ = tanh_softplus(v)
        v = v * t
    else:
        tl.static_assert(ACT == "", "unknown activation")
    return v


@triton.jit
def activation_grad(dy, v, ACT: tl.constexpr, param):
    """dy * act'(v) for the activation named ACT at the pre-activation v ("" returns dy)."""
    if ACT == "relu":
        dy = tl.where(v <= 0, 0.0, dy)  # torch masks by relu(v) <= 0: 0 at v = 0, dy at NaN
    elif ACT == "relu6":
        dy = tl.where((v <= 0) | (v >= 6.0), 0.0, dy)  # open interval: 0 at both kinks
    elif ACT == "leaky_relu":
        dy = tl.where(v > 0, dy, dy * param)  # slope at v = 0 and at NaN
    elif ACT == "elu":
        dy = tl.where(v <= 0, dy * param * tl.exp(v), dy)  # alpha at v = 0, dy at NaN
    elif ACT == "silu":
        # s (1 + v (1 - s)), with 1 - s = sigmoid(-v) computed, not subtracted
        dy = dy * sigmoid(v) * (1.0 + v * sigmoid(-v))
    elif ACT == "hardswish":
        dy = tl.where(v <= -3.0, 0.0, tl.where(v < 3.0, dy * (v / 3.0 + 0.5), dy))
    elif ACT == "gelu":
        cdf = 0.5 * (1.0 + tl.erf(v * SQRT1_2))
        pdf = INV_SQRT_2PI * tl.exp(-0.5 * v * v)
        dy = dy * (cdf + v * pdf)
    elif ACT == "gelu_tanh":
        # d/dv [v s(2u)] = s + 2 v s (1 - s) u', s = sigmoid(2u), which is torch's
        # 0.5 (1 + tanh u) + 0.5 v (1 - tanh^2 u) u' with 1 + tanh u = 2s, 1 - tanh u = 2 (1 - s)
        u = SQRT_2_OVER_PI * (v + GELU_KAPPA * (v * v * v))
        du = SQRT_2_OVER_PI * (1.0 + 3.0 * GELU_KAPPA * (v * v))
        s = sigmoid(2.0 * u)
        dy = dy * (s + 2.0 * v * s * sigmoid(-2.0 * u) * du)
    elif ACT == "mish":
        # t + v sigmoid(v) (1 - t^2), 1 - t^2 = (1 - t)(1 + t)
        t, one_minus_t = tanh_softplus(v)
        dy = dy * (t + v * sigmoid(v) * (one_minus_t * (1.0 + t)))
    else:
        tl.static_assert(ACT == "", "unknown activation")
    return dy
