"""Training forward and backward in one launch each, for inputs where one program owns a channel block.

When the channel blocks alone fill the GPU (the split reductions would take one split per block:
many channels, small maps, e.g. ResNet's 2048 x 7 x 7), a program can do the whole layer for its
block: reduce, then run the elementwise pass over the same tiles. Nothing has to be merged across
programs, so there is no partial workspace, no ticket (except num_batches_tracked's), and no second
launch. In DRAM bytes (B: one full tensor):

  forward:  the split path reads x twice and writes y: 3B; here x is read once from DRAM and again
            while the block is still in L2 (the launcher takes this path only where the resident
            programs' blocks fit in L2): 2B.
  backward: the split path reads x and dy twice and writes dx: 5B; here 3B.

Where the second read misses L2 the bytes are those of the split path, with one launch fewer.
Each phase runs the same code as the split kernels (kernels/stats.py block_stats,
normalize.normalize_tile, grad.act_dy and dx_train) on one split: with the same tiles the
results are those of the two-launch path, bitwise under the interpreter (compiled, two kernels may
contract the same arithmetic differently; on a GPU the forward's tiles are also smaller, see
bn_triton/_config.py).

One program per channel block, not a persistent grid walking several: a loop over blocks around
the two phases would keep their loop-invariant addresses live throughout, and cost registers
(docs/design.md).
"""

import triton.language as tl

from .grad import act_dy, block_grad_sums, dx_train
from .normalize import channel_values, normalize_tile
from .stats import block_stats, finish_stats
from .tile import acc_scalar, launched, tile_offsets


@launched(
    unaligned=(
        "MEAN",
        "RSTD",
        "TICKET",
        "W",
        "B",
        "RUNNING_MEAN",
        "RUNNING_VAR",
        "NUM_BATCHES",
    )
)
def forward_kernel(
    X,  # input, viewed as (R, C, S)
    Y,  # out, same strides as X
    MEAN,  # [C] out, acc dtype
    RSTD,  # [C] out
    TICKET,  # int32, zero between launches: num_batches_tracked's ticket (COUNT_BATCH)
    W,  # [C] weight (unused unless HAS_W)
    B,  # [C] bias (unused unless HAS_B)
    RES,  # residual, same strides as X, any float dtype (unused unless HAS_RESIDUAL)
    RUNNING_MEAN,  # [C] updated in place when HAS_RUNNING (strided, any float dtype)
    RUNNING_VAR,
    NUM_BATCHES,  # int64 scalar tensor: read when CUMULATIVE, incremented when COUNT_BATCH
    R,
    C,
    S,
    stride_r,
    stride_c,
    num_tiles,  # tiles of the (R, S) plane: all of them belong to this program's channel block
    eps,  # acc-dtype scalar (see tile.acc_scalar)
    rstd_offset,  # RSTD's first value, in elements (the eager plans pass one workspace as MEAN and RSTD)
    momentum,  # acc-dtype scalar
    stride_rm,
    stride_rv,
    act_param,  # acc-dtype scalar: the activation's parameter (kernels/activation.py)
    ACC: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_S: tl.constexpr,
    CHANNELS_CONTIG: tl.constexpr,
    S_DIV: tl.constexpr,
    UNIFORM_S: tl.constexpr,
    HAS_W: tl.constexpr,
    HAS_B: tl.constexpr,
    HAS_RUNNING: tl.constexpr = False,
    CUMULATIVE: tl.constexpr = False,
    COUNT_BATCH: tl.constexpr = False,
    HAS_RESIDUAL: tl.constexpr = False,
    ACT: tl.constexpr = "",
):
    pid_c = tl.program_id(0)
    RSTD += rstd_offset
    n, mean, m2 = block_stats(
        X, pid_c, 0, num_tiles, R, C, S, stride_r, stride_c,
        ACC, BLOCK_R, BLOCK_C, BLOCK_S, CHANNELS_CONTIG, S_DIV, UNIFORM_S,
    )  # fmt: skip
    c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    cm = c < C
    rstd = finish_stats(
        n, mean, m2, c, cm, MEAN, RSTD, None, RUNNING_MEAN, RUNNING_VAR, NUM_BATCHES, TICKET, eps, momentum,
        stride_rm, stride_rv, ACC, False, HAS_RUNNING, CUMULATIVE, COUNT_BATCH,
    )  # fmt: skip
    a = rstd * channel_values(W, c, cm, ACC) if HAS_W else rstd
    b = channel_values(B, c, cm, ACC) if HAS_B else a
    p = acc_scalar(act_param, ACC)
    for tile in range(0, num_tiles):  # the same tiles again: from L2
        offs, mask, _, _, _ = tile_offsets(
            tile, pid_c, R, C, S, stride_r, stride_c, BLOCK_R, BLOCK_C, BLOCK_S, CHANNELS_CONTIG, S_DIV
        )
        normalize_tile(X, Y, RES, offs, mask, mean, a, b, p, ACC, HAS_B, HAS_RESIDUAL, ACT)


@launched(
    unaligned=(
        "MEAN",
        "RSTD",
        "W",
        "DW",
        "DB",
        "B",
    )
)
def backward_kernel(
    DY,  # grad of the output, same strides as X
    X,  # input, viewed as (R, C, S)
    DX,  # out, same strides as X
    MEAN,  # [C] batch mean
    RSTD,  # [C] batch rstd
    W,  # [C] weight (unused unless HAS_W)
    DW,  # [C] out in the weight's dtype: sum(g * xhat) (when HAS_DW)
    DB,  # [C] out in the bias's dtype: sum(g) (when HAS_DB)
    Y,  # forward output (read when GRAD_FROM_Y)
    B,  # [C] bias: to recompute the pre-activation (an ACT, not GRAD_FROM_Y)
    RES,  # residual, any float dtype: re-read for the pre-activation (when HAS_RESIDUAL)
    DZ,  # out: g = dy * act'(pre), d(residual) (when STORE_DZ)
    R,
    C,
    S,
    stride_r,
    stride_c,
    num_tiles,
    count,  # values per channel (R * S; an int64 when large)
    rstd_offset,  # RSTD's first value, in elements (see forward_kernel)
    act_param,  # acc-dtype scalar: the activation's parameter (kernels/activation.py)
    ACC: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_S: tl.constexpr,
    CHANNELS_CONTIG: tl.constexpr,
    S_DIV: tl.constexpr,
    HAS_W: tl.constexpr,
    HAS_DW: tl.constexpr = False,
    HAS_DB: tl.constexpr = False,
    ACT: tl.constexpr = "",
    GRAD_FROM_Y: tl.constexpr = False,
    HAS_RESIDUAL: tl.constexpr = False,
    HAS_B: tl.constexpr = False,
    STORE_DZ: tl.constexpr = False,
):
    pid_c = tl.program_id(0)
    RSTD += rstd_offset
    c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    cm = c < C
    mean = channel_values(MEAN, c, cm, ACC)
    rstd = channel_values(RSTD, c, cm, ACC)
    a = rstd * channel_values(W, c, cm, ACC) if HAS_W else rstd
    b = channel_values(B, c, cm, ACC) if HAS_B else a
    p = acc_scalar(act_param, ACC)
    sum_g, sum_g_xhat = block_grad_sums(
        DY, X, Y, RES, DZ, pid_c, 0, num_tiles, mean, rstd, a, b, p, R, C, S, stride_r, stride_c,
        ACC, BLOCK_R, BLOCK_C, BLOCK_S, CHANNELS_CONTIG, S_DIV, HAS_B, ACT, GRAD_FROM_Y, HAS_RESIDUAL, STORE_DZ,
    )  # fmt: skip
    if HAS_DW:
        tl.store(DW + c, sum_g_xhat.to(DW.dtype.element_ty), mask=cm)
    if HAS_DB:
        tl.store(DB + c, sum_g.to(DB.dtype.element_ty), mask=cm)
    for tile in range(0, num_tiles):  # the same tiles again: from L2; g recomputed, same bits
        offs, mask, _, _, _ = tile_offsets(
            tile, pid_c, R, C, S, stride_r, stride_c, BLOCK_R, BLOCK_C, BLOCK_S, CHANNELS_CONTIG, S_DIV
        )
        g, x = act_dy(DY, X, Y, RES, offs, mask, mean, a, b, p, ACC, HAS_B, ACT, GRAD_FROM_Y, HAS_RESIDUAL)
        dx = dx_train(g, x, mean, rstd, a, sum_g, sum_g_xhat, count)
        tl.store(DX + offs, dx.to(DX.dtype.element_ty), mask=mask)
