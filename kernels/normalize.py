"""The elementwise normalize pass: y = (x - mean) * (rstd * weight) + bias, one tile per program.

Training passes the batch mean and rstd; eval passes running_mean and running_var
(``SCALE_IS_VAR``), whose rsqrt is taken here per channel rather than in an extra launch. (The eval
backward, dx = dy * rstd * weight, is ``grad_input_kernel``'s eval mode in kernels/grad.py.)

Fusion (``HAS_RESIDUAL``, ``ACT``): y = act((x - mean) * a + bias + residual), all in ACC before the
single store, so BN -> add -> activation costs one extra read (the residual) instead of two more
passes; act is one of kernels/activation.py's. ``bn_affine`` is shared with the backward
(kernels/grad.py), which recomputes the pre-activation for act': the same code on the same inputs
gives the same bits.

Why (x - mean) * a + bias and not x * a + (bias - mean * a): the subtraction first is exact for x
near the mean, so a large mean offset (1e4 in fp32) costs no digits of y; the pass is memory-bound,
so the extra subtract is free.
"""

import triton
import triton.language as tl

from .activation import activate
from .tile import acc_scalar, elementwise_tile, inv_sqrt, launched


@triton.jit
def channel_scale(SCALE, W, c, cm, eps, ACC: tl.constexpr, SCALE_IS_VAR: tl.constexpr, HAS_W: tl.constexpr):
    """rstd * weight per channel, where SCALE holds rstd, or the variance when SCALE_IS_VAR."""
    scale = tl.load(SCALE + c, mask=cm, other=1.0).to(ACC)
    if SCALE_IS_VAR:
        scale = inv_sqrt(scale + acc_scalar(eps, ACC))
    if HAS_W:
        scale = scale * tl.load(W + c, mask=cm, other=0.0).to(ACC)
    return scale


@triton.jit
def channel_values(PTR, c, cm, ACC: tl.constexpr):
    """A per-channel tensor's values for channels c ([BLOCK_C], in ACC; 0 for channels past C)."""
    return tl.load(PTR + c, mask=cm, other=0.0).to(ACC)


@triton.jit
def bn_affine(x, mean, a, b, HAS_B: tl.constexpr):
    """(x - mean) * a + bias on a tile (x in ACC; mean, a, b per channel [BLOCK_C]). The forward and
    the backward's recompute of the pre-activation share it: the same code gives the same bits."""
    y = (x - mean[None, :, None]) * a[None, :, None]
    if HAS_B:
        y = y + b[None, :, None]
    return y


@triton.jit
def normalize_tile(
    X,
    Y,
    RES,
    offs,
    mask,
    mean,
    a,
    b,
    act_param,
    ACC: tl.constexpr,
    HAS_B: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr,
    ACT: tl.constexpr,
):
    """y = act(bn_affine(x) + residual) for one tile, stored in Y's dtype."""
    x = tl.load(X + offs, mask=mask, other=0.0).to(ACC)
    y = bn_affine(x, mean, a, b, HAS_B)
    if HAS_RESIDUAL:
        y = y + tl.load(RES + offs, mask=mask, other=0.0).to(ACC)
    y = activate(y, ACT, act_param)
    tl.store(Y + offs, y.to(Y.dtype.element_ty), mask=mask)


@launched(
    unaligned=(
        "MEAN",
        "SCALE",
        "W",
        "B",
    )
)
def normalize_kernel(
    X,  # input, viewed as (R, C, S)
    Y,  # output, same strides as X
    MEAN,  # [C]: batch mean or running_mean
    SCALE,  # [C]: rstd, or running_var when SCALE_IS_VAR
    W,  # [C] weight (unused unless HAS_W)
    B,  # [C] bias (unused unless HAS_B)
    RES,  # residual, same strides as X, any float dtype (unused unless HAS_RESIDUAL)
    R,
    C,
    S,
    stride_r,
    stride_c,
    num_c_blocks,
    eps,  # acc-dtype scalar (see tile.acc_scalar)
    scale_offset,  # SCALE's first value, in elements (the eager plans pass one workspace as MEAN and SCALE)
    act_param,  # acc-dtype scalar: the activation's parameter (kernels/activation.py)
    ACC: tl.constexpr,
    SCALE_IS_VAR: tl.constexpr,
    HAS_W: tl.constexpr,
    HAS_B: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_S: tl.constexpr,
    CHANNELS_CONTIG: tl.constexpr,
    S_DIV: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr = False,
    ACT: tl.constexpr = "",
):
    SCALE += scale_offset
    offs, mask, c, cm = elementwise_tile(
        num_c_blocks, R, C, S, stride_r, stride_c, BLOCK_R, BLOCK_C, BLOCK_S, CHANNELS_CONTIG, S_DIV
    )
    a = channel_scale(SCALE, W, c, cm, eps, ACC, SCALE_IS_VAR, HAS_W)
    mean = channel_values(MEAN, c, cm, ACC)
    b = channel_values(B, c, cm, ACC) if HAS_B else a
    normalize_tile(X, Y, RES, offs, mask, mean, a, b, acc_scalar(act_param, ACC), ACC, HAS_B, HAS_RESIDUAL, ACT)
