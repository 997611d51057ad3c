"""Backward in two launches: a split reduction of sum(dy) and sum(dy * xhat) per channel (its last
program sums the partials, as in kernels/stats.py), then the elementwise dx pass.

With those two sums (they are dbias and dweight) the training dx is elementwise:
    dx = weight * rstd * (dy - sum(dy) / m - xhat * sum(dy * xhat) / m),   xhat = (x - mean) * rstd
(the closed form of the three-path derivation; see docs/math.md). x is read again and xhat
recomputed, so the forward saves only mean and rstd. In eval mode the statistics are constants and
dx = dy * weight * rsqrt(running_var + eps): ``grad_input_kernel`` with ``TRAINING=False``.

Fused activation (``ACT``): every formula above runs on g = dy * act'(pre), which is also
d(residual) (kernels/activation.py ``activation_grad``). act' is taken either at the stored output y
(``GRAD_FROM_Y``: ReLU with a residual, where y > 0 exactly where pre > 0), or at the pre-activation
recomputed from x (bn_affine, the forward's own code) plus the residual, re-read (``HAS_RESIDUAL``),
rounded to the output's dtype as the stored y was, so that a mask agrees bit for bit with one taken
from y. Never a full-size pre-activation. Bytes moved, B = one full tensor in the input dtype (the
per-activation table: docs/math.md):

  no residual, training:  recompute costs 0 (x is read by both passes anyway): 5B, as plain BN.
  residual, training:     pass 1 reads dy, x and y (ReLU) or the residual (others) and writes g (it
                          is d(residual), wanted anyway); pass 2 reads g and x and writes dx: 7B.
  eval (dx only):         ReLU with a residual: dy, y in; dx, g out: 4B. Others with a residual:
                          dy, x, residual in; dx, g out: 5B. No residual: dy, x in, dx out: 3B.
A user writing into y in place makes backward raise (autograd's version check), as with torch's own
relu, which also saves its output.
"""

import triton
import triton.language as tl

from .activation import activation_grad
from .normalize import bn_affine, channel_scale, channel_values
from .tile import (
    acc_scalar,
    elementwise_tile,
    last_to_arrive,
    launched,
    load_partials,
    split_range,
    sum_rows,
    sum_rs,
    tile_offsets,
)


@triton.jit
def act_dy(
    DY,
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
    ACT: tl.constexpr,
    GRAD_FROM_Y: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr,
):
    """One tile of x and of g = dy * act'(pre) (dy itself without an activation), in ACC. act' at the
    stored output (``GRAD_FROM_Y``), or at the pre-activation recomputed from x, mean, a = rstd *
    weight, bias and the residual, rounded as the stored output was (see the module doc)."""
    dy = tl.load(DY + offs, mask=mask, other=0.0).to(ACC)
    x = tl.load(X + offs, mask=mask, other=0.0).to(ACC)
    if ACT != "":
        if GRAD_FROM_Y:
            pre = tl.load(Y + offs, mask=mask, other=0.0).to(ACC)
        else:
            pre = bn_affine(x, mean, a, b, HAS_B)
            if HAS_RESIDUAL:
                pre = pre + tl.load(RES + offs, mask=mask, other=0.0).to(ACC)
            pre = pre.to(X.dtype.element_ty).to(ACC)
        dy = activation_grad(dy, pre, ACT, act_param)
    return dy, x


@triton.jit
def dx_train(g, x, mean, rstd, a, sum_g, sum_g_xhat, count):
    """The training dx of one tile from the two per-channel sums over ``count`` values: the closed
    form a * (g - sum(g)/m - xhat * sum(g * xhat)/m) with a = rstd * weight."""
    inv_m = 1.0 / (tl.zeros([], rstd.dtype) + count)  # count may arrive as a constant
    xhat = (x - mean[None, :, None]) * rstd[None, :, None]
    mean_g = (sum_g * inv_m)[None, :, None]
    mean_g_xhat = (sum_g_xhat * inv_m)[None, :, None]
    return a[None, :, None] * (g - mean_g - xhat * mean_g_xhat)


@triton.jit
def block_grad_sums(
    DY, X, Y, RES, DZ, pid_c, first, last, mean, rstd, a, b, act_param, R, C, S, stride_r, stride_c,
    ACC: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr,
    CHANNELS_CONTIG: tl.constexpr, S_DIV: tl.constexpr, HAS_B: tl.constexpr, ACT: tl.constexpr,
    GRAD_FROM_Y: tl.constexpr, HAS_RESIDUAL: tl.constexpr, STORE_DZ: tl.constexpr,
):  # fmt: skip
    """sum(g) and sum(g * xhat) per channel of block ``pid_c`` over tiles [first, last), g = dy *
    act'(pre) (``act_dy``; stored to DZ when STORE_DZ). Per-lane sums, reduced once after the loop:
    no cross-lane work holds up the next load."""
    acc_g = tl.zeros([BLOCK_R, BLOCK_C, BLOCK_S], ACC)
    acc_g_xhat = tl.zeros([BLOCK_R, BLOCK_C, BLOCK_S], ACC)
    for tile in range(first, last):
        offs, mask, _, _, _ = tile_offsets(
            tile, pid_c, R, C, S, stride_r, stride_c, BLOCK_R, BLOCK_C, BLOCK_S, CHANNELS_CONTIG, S_DIV
        )
        g, x = act_dy(DY, X, Y, RES, offs, mask, mean, a, b, act_param, ACC, HAS_B, ACT, GRAD_FROM_Y, HAS_RESIDUAL)
        if STORE_DZ:
            tl.store(DZ + offs, g.to(DZ.dtype.element_ty), mask=mask)
        acc_g += g
        acc_g_xhat += tl.where(mask, g * ((x - mean[None, :, None]) * rstd[None, :, None]), 0.0)
    return sum_rs(acc_g), sum_rs(acc_g_xhat)


@launched(
    unaligned=(
        "MEAN",
        "SCALE",
        "PART",
        "COUNTER",
        "SUM_DY",
        "SUM_DY_XHAT",
        "DW",
        "DB",
        "W",
        "B",
    )
)
def grad_sums_kernel(
    DY,  # grad of the output, same strides as X
    X,  # input, viewed as (R, C, S)
    MEAN,  # [C]
    SCALE,  # [C]: rstd, or running_var when SCALE_IS_VAR
    PART,  # [2, SPLIT, C] acc dtype workspace: sum(dy), sum(dy * xhat) of each split
    COUNTER,  # int32 [num_c_blocks], zero between launches: the tickets
    SUM_DY,  # [C] out, acc dtype
    SUM_DY_XHAT,  # [C] out, acc dtype
    DW,  # [C] out in the weight's dtype: sum(dy * xhat) (when HAS_DW)
    DB,  # [C] out in the bias's dtype: sum(dy) (when HAS_DB)
    Y,  # forward output, same strides as X (read when GRAD_FROM_Y)
    W,  # [C] weight, bias: to recompute the pre-activation (an ACT, not GRAD_FROM_Y)
    B,
    RES,  # residual, same strides as X, any float dtype: re-read for the pre-activation (when HAS_RESIDUAL)
    DZ,  # out, same strides as X: g = dy * act'(pre) (when STORE_DZ)
    R,
    C,
    S,
    stride_r,
    stride_c,
    num_tiles,
    num_splits,  # programs sharing one channel block's tiles (grid axis 1)
    eps,  # acc-dtype scalar (see tile.acc_scalar)
    scale_offset,  # SCALE's, SUM_DY_XHAT's and PART's first values, in elements: the eager plans
    sum2_offset,  # pass one workspace as MEAN and SCALE, and one as SUM_DY, SUM_DY_XHAT and PART
    part_offset,
    act_param,  # acc-dtype scalar: the activation's parameter (kernels/activation.py)
    ACC: tl.constexpr,
    SCALE_IS_VAR: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_S: tl.constexpr,
    BLOCK_P: tl.constexpr,  # partials summed per step by the last program
    CHANNELS_CONTIG: tl.constexpr,
    S_DIV: tl.constexpr,
    HAS_DW: tl.constexpr = False,
    HAS_DB: tl.constexpr = False,
    ACT: tl.constexpr = "",
    GRAD_FROM_Y: tl.constexpr = False,
    HAS_RESIDUAL: tl.constexpr = False,
    HAS_W: tl.constexpr = False,
    HAS_B: tl.constexpr = False,
    STORE_DZ: tl.constexpr = False,
):
    pid_c = tl.program_id(0)
    split = tl.program_id(1)
    SCALE += scale_offset
    SUM_DY_XHAT += sum2_offset
    PART += part_offset
    c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    cm = c < C
    a = channel_scale(SCALE, W, c, cm, eps, ACC, SCALE_IS_VAR, HAS_W)  # weight * rstd: the recompute's scale
    mean = channel_values(MEAN, c, cm, ACC)
    rstd = channel_scale(SCALE, SCALE, c, cm, eps, ACC, SCALE_IS_VAR, False)
    b = channel_values(B, c, cm, ACC) if HAS_B else a
    first, last = split_range(split, num_tiles, num_splits)
    sum_g, sum_g_xhat = block_grad_sums(
        DY, X, Y, RES, DZ, pid_c, first, last, mean, rstd, a, b, acc_scalar(act_param, ACC), R, C, S, stride_r,
        stride_c, ACC, BLOCK_R, BLOCK_C, BLOCK_S, CHANNELS_CONTIG, S_DIV, HAS_B, ACT, GRAD_FROM_Y, HAS_RESIDUAL,
        STORE_DZ,
    )  # fmt: skip
    plane = num_splits * C
    out = split * C + c
    tl.store(PART + out, sum_g, mask=cm)
    tl.store(PART + plane + out, sum_g_xhat, mask=cm)

    if last_to_arrive(COUNTER + pid_c, num_splits):
        # Sum the partials, BLOCK_P splits at a time (a tree within a step, steps in order).
        sum_dy = tl.zeros([BLOCK_C], ACC)
        sum_dy_xhat = tl.zeros([BLOCK_C], ACC)
        for p0 in range(0, num_splits, BLOCK_P):
            sum_dy += sum_rows(load_partials(PART, 0, p0, num_splits, C, c, cm, BLOCK_P))
            sum_dy_xhat += sum_rows(load_partials(PART, 1, p0, num_splits, C, c, cm, BLOCK_P))
        tl.store(SUM_DY + c, sum_dy, mask=cm)
        tl.store(SUM_DY_XHAT + c, sum_dy_xhat, mask=cm)
        if HAS_DW:
            tl.store(DW + c, sum_dy_xhat.to(DW.dtype.element_ty), mask=cm)
        if HAS_DB:
            tl.store(DB + c, sum_dy.to(DB.dtype.element_ty), mask=cm)


@launched(
    unaligned=(
        "MEAN",
        "SCALE",
        "W",
        "SUM_DY",
        "SUM_DY_XHAT",
        "B",
    )
)
def grad_input_kernel(
    DY,
    X,
    DX,  # out, same strides as X
    MEAN,  # [C] batch mean (training) or running_mean (eval)
    SCALE,  # [C] batch rstd (training) or running_var (eval)
    W,  # [C] weight (unused unless HAS_W)
    SUM_DY,  # [C] from grad_sums_kernel (training)
    SUM_DY_XHAT,  # [C]
    Y,  # forward output (read when GRAD_FROM_Y)
    B,  # [C] bias (recompute of the pre-activation)
    RES,  # residual, any float dtype: re-read for the pre-activation (when HAS_RESIDUAL)
    DZ,  # out: g = dy * act'(pre), d(residual) (when STORE_DZ)
    R,
    C,
    S,
    stride_r,
    stride_c,
    num_c_blocks,
    count,  # values per channel behind the sums: the m of the closed form (training)
    eps,  # acc-dtype scalar (see tile.acc_scalar)
    scale_offset,  # SCALE's and SUM_DY_XHAT's first values, in elements (see grad_sums_kernel)
    sum2_offset,
    act_param,  # acc-dtype scalar: the activation's parameter (kernels/activation.py)
    ACC: tl.constexpr,
    HAS_W: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_S: tl.constexpr,
    CHANNELS_CONTIG: tl.constexpr,
    S_DIV: tl.constexpr,
    TRAINING: tl.constexpr = True,  # False: dx = dy * weight * rsqrt(running_var + eps)
    ACT: tl.constexpr = "",
    GRAD_FROM_Y: tl.constexpr = False,
    HAS_RESIDUAL: tl.constexpr = False,
    HAS_B: tl.constexpr = False,
    STORE_DZ: tl.constexpr = False,
    STORE_DX: tl.constexpr = True,
):
    SCALE += scale_offset
    offs, mask, c, cm = elementwise_tile(
        num_c_blocks, R, C, S, stride_r, stride_c, BLOCK_R, BLOCK_C, BLOCK_S, CHANNELS_CONTIG, S_DIV
    )
    a = channel_scale(SCALE, W, c, cm, eps, ACC, not TRAINING, HAS_W)
    mean = channel_values(MEAN, c, cm, ACC)
    b = channel_values(B, c, cm, ACC) if HAS_B else a
    p = acc_scalar(act_param, ACC)
    if TRAINING or (ACT != "" and not GRAD_FROM_Y):  # xhat needs x, and so does a recomputed pre-activation
        dy, x = act_dy(DY, X, Y, RES, offs, mask, mean, a, b, p, ACC, HAS_B, ACT, GRAD_FROM_Y, HAS_RESIDUAL)
    else:  # eval, act' from y or no activation: no x read at all
        dy = tl.load(DY + offs, mask=mask, other=0.0).to(ACC)
        if ACT != "":
            dy = activation_grad(dy, tl.load(Y + offs, mask=mask, other=0.0).to(ACC), ACT, p)
    if STORE_DZ:
        tl.store(DZ + offs, dy.to(DZ.dtype.element_ty), mask=mask)
    if STORE_DX:  # training without dx: g alone (d(residual)), at the batch statistics
        if TRAINING:
            rstd = channel_values(SCALE, c, cm, ACC)
            sum_dy = channel_values(SUM_DY, c, cm, ACC)
            sum_dy_xhat = channel_values(SUM_DY_XHAT + sum2_offset, c, cm, ACC)
            dx = dx_train(dy, x, mean, rstd, a, sum_dy, sum_dy_xhat, count)
        else:
            dx = dy * a[None, :, None]
        tl.store(DX + offs, dx.to(DX.dtype.element_ty), mask=mask)
