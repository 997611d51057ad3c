"""Backward: a split reduction of sum(dy) and sum(dy * xhat) per channel, then the dx pass.

With those two sums (they are dbias and dweight) the training dx is elementwise:
    dx = weight * rstd * (dy - sum(dy) / m - xhat * sum(dy * xhat) / m),   xhat = (x - mean) * rstd
(the closed form of the three-path derivation; see shared/docs/bn-math.md). x is read again and xhat
recomputed, so the forward saves only mean and rstd. In eval mode the statistics are constants and
dx = dy * weight * rsqrt(running_var + eps), which ``normalize_kernel`` computes.
"""

import triton
import triton.language as tl

from .normalize import channel_scale
from .tile import sum_rs, tile_offsets


@triton.jit
def grad_partials_kernel(
    DY,  # grad of the output, same strides as X
    X,  # input, viewed as (R, C, S)
    MEAN,  # [C]
    SCALE,  # [C]: rstd, or running_var when SCALE_IS_VAR
    PART_SUM_DY,  # [SPLIT, C] acc dtype
    PART_SUM_DY_XHAT,  # [SPLIT, C] acc dtype
    R,
    C,
    S,
    stride_r,
    stride_c,
    num_tiles,
    tiles_per_split,
    eps,
    SCALE_IS_VAR: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_S: tl.constexpr,
    CHANNELS_CONTIG: tl.constexpr,
):
    pid_c = tl.program_id(0)
    split = tl.program_id(1)
    ACC = PART_SUM_DY.dtype.element_ty
    c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    cm = c < C
    mean = tl.load(MEAN + c, mask=cm, other=0.0).to(ACC)[None, :, None]
    rstd = channel_scale(SCALE, SCALE, c, cm, eps, ACC, SCALE_IS_VAR, False)[None, :, None]
    sum_dy = tl.zeros([BLOCK_C], ACC)
    sum_dy_xhat = tl.zeros([BLOCK_C], ACC)
    first = split * tiles_per_split
    last = tl.minimum(first + tiles_per_split, num_tiles)
    for tile in range(first, last):
        offs, mask, _, _ = tile_offsets(
            tile, pid_c, R, C, S, stride_r, stride_c, BLOCK_R, BLOCK_C, BLOCK_S, CHANNELS_CONTIG
        )
        dy = tl.load(DY + offs, mask=mask, other=0.0).to(ACC)
        x = tl.load(X + offs, mask=mask, other=0.0).to(ACC)
        xhat = tl.where(mask, (x - mean) * rstd, 0.0)
        sum_dy += sum_rs(dy)
        sum_dy_xhat += sum_rs(dy * xhat)
    out = split * C + c
    tl.store(PART_SUM_DY + out, sum_dy, mask=cm)
    tl.store(PART_SUM_DY_XHAT + out, sum_dy_xhat, mask=cm)


@triton.jit
def grad_finalize_kernel(
    PART_SUM_DY,
    PART_SUM_DY_XHAT,
    SUM_DY,  # [C] out, acc dtype
    SUM_DY_XHAT,  # [C] out, acc dtype
    DW,  # [C] out in the weight's dtype: sum(dy * xhat) (unused unless HAS_DW)
    DB,  # [C] out in the bias's dtype: sum(dy) (unused unless HAS_DB)
    C,
    num_splits,
    HAS_DW: tl.constexpr,
    HAS_DB: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    cm = c < C
    ACC = SUM_DY.dtype.element_ty
    sum_dy = tl.zeros([BLOCK_C], ACC)
    sum_dy_xhat = tl.zeros([BLOCK_C], ACC)
    for split in range(0, num_splits):  # fixed order: bitwise reproducible
        sum_dy += tl.load(PART_SUM_DY + split * C + c, mask=cm, other=0.0)
        sum_dy_xhat += tl.load(PART_SUM_DY_XHAT + split * C + c, mask=cm, other=0.0)
    tl.store(SUM_DY + c, sum_dy, mask=cm)
    tl.store(SUM_DY_XHAT + c, sum_dy_xhat, mask=cm)
    if HAS_DW:
        tl.store(DW + c, sum_dy_xhat.to(DW.dtype.element_ty), mask=cm)
    if HAS_DB:
        tl.store(DB + c, sum_dy.to(DB.dtype.element_ty), mask=cm)


@triton.jit
def grad_input_kernel(
    DY,
    X,
    DX,  # out, same strides as X
    MEAN,  # [C] batch mean
    RSTD,  # [C] batch rstd
    W,  # [C] weight (unused unless HAS_W)
    SUM_DY,  # [C] from grad_finalize_kernel
    SUM_DY_XHAT,  # [C]
    R,
    C,
    S,
    stride_r,
    stride_c,
    num_c_blocks,
    inv_m,  # 1 / values per channel
    HAS_W: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_S: tl.constexpr,
    CHANNELS_CONTIG: tl.constexpr,
):
    pid = tl.program_id(0)
    pid_c = pid % num_c_blocks
    tile = pid // num_c_blocks
    offs, mask, c, _ = tile_offsets(tile, pid_c, R, C, S, stride_r, stride_c, BLOCK_R, BLOCK_C, BLOCK_S, CHANNELS_CONTIG)
    cm = c < C
    ACC = SUM_DY.dtype.element_ty
    rstd = tl.load(RSTD + c, mask=cm, other=0.0).to(ACC)
    a = channel_scale(RSTD, W, c, cm, 0.0, ACC, False, HAS_W)
    mean = tl.load(MEAN + c, mask=cm, other=0.0).to(ACC)
    mean_dy = tl.load(SUM_DY + c, mask=cm, other=0.0) * inv_m
    mean_dy_xhat = tl.load(SUM_DY_XHAT + c, mask=cm, other=0.0) * inv_m
    dy = tl.load(DY + offs, mask=mask, other=0.0).to(ACC)
    x = tl.load(X + offs, mask=mask, other=0.0).to(ACC)
    xhat = (x - mean[None, :, None]) * rstd[None, :, None]
    dx = a[None, :, None] * (dy - mean_dy[None, :, None] - xhat * mean_dy_xhat[None, :, None])
    tl.store(DX + offs, dx.to(DX.dtype.element_ty), mask=mask)
