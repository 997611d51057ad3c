"""Training statistics: a split (two-stage) reduction of per-channel (count, mean, M2).

Stage 1 (``stats_partials_kernel``): program (channel block, split) walks its own contiguous range of
tiles and keeps a running (count, mean, M2) per channel, merging each tile with Chan's formula. The
tile's own M2 is taken around the tile mean while the tile sits in registers, so no E[x^2] - E[x]^2
cancellation ever happens. Splitting each channel's values over many programs fills the GPU even
when C is small.

Stage 2 (``stats_finalize_kernel``): one program per channel block merges the SPLIT partials in a
fixed order (bitwise reproducible: no atomics) into mean, rstd and the biased variance.

``running_stats_kernel`` folds the batch statistics into running_mean/running_var with momentum, or
with the cumulative factor 1 / num_batches_tracked read on the device (never a host sync).
"""

import triton
import triton.language as tl

from .tile import chan_merge, inv_sqrt, sum_rs, tile_offsets


@triton.jit
def stats_partials_kernel(
    X,  # input, viewed as (R, C, S)
    PART_COUNT,  # [SPLIT, C] acc dtype: values seen by each split
    PART_MEAN,  # [SPLIT, C] acc dtype
    PART_M2,  # [SPLIT, C] acc dtype: sum of squared deviations from PART_MEAN
    R,
    C,
    S,
    stride_r,
    stride_c,
    num_tiles,  # tiles of the (R, S) plane
    num_splits,  # programs sharing one channel block's tiles (grid axis 1)
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_S: tl.constexpr,
    CHANNELS_CONTIG: tl.constexpr,
    S_DIV: tl.constexpr,
):
    pid_c = tl.program_id(0)
    split = tl.program_id(1)
    ACC = PART_MEAN.dtype.element_ty
    n_acc = tl.zeros([BLOCK_C], ACC)
    mean_acc = tl.zeros([BLOCK_C], ACC)
    m2_acc = tl.zeros([BLOCK_C], ACC)
    # Split k takes tiles [k*T/P, (k+1)*T/P): every split gets floor or ceil of T/P tiles, so the
    # programs finish together (int64: k*T may pass 2**31).
    first = (split.to(tl.int64) * num_tiles) // num_splits
    last = ((split.to(tl.int64) + 1) * num_tiles) // num_splits
    for tile in range(first, last):
        offs, mask, c, count = tile_offsets(
            tile, pid_c, R, C, S, stride_r, stride_c, BLOCK_R, BLOCK_C, BLOCK_S, CHANNELS_CONTIG, S_DIV
        )
        x = tl.load(X + offs, mask=mask, other=0.0).to(ACC)
        n_tile = count.to(ACC)
        mean_tile = sum_rs(x) / n_tile
        dev = tl.where(mask, x - mean_tile[None, :, None], 0.0)
        m2_tile = sum_rs(dev * dev)
        n_acc, mean_acc, m2_acc = chan_merge(n_acc, mean_acc, m2_acc, n_tile, mean_tile, m2_tile)
    c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    out = split * C + c
    tl.store(PART_COUNT + out, n_acc, mask=c < C)
    tl.store(PART_MEAN + out, mean_acc, mask=c < C)
    tl.store(PART_M2 + out, m2_acc, mask=c < C)


@triton.jit
def stats_finalize_kernel(
    PART_COUNT,
    PART_MEAN,
    PART_M2,
    MEAN,  # [C] out, acc dtype
    RSTD,  # [C] out: 1 / sqrt(var + eps)
    VAR,  # [C] out: biased batch variance
    C,
    num_splits,
    eps,
    BLOCK_C: tl.constexpr,
):
    c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    cm = c < C
    ACC = MEAN.dtype.element_ty
    n = tl.zeros([BLOCK_C], ACC)
    mean = tl.zeros([BLOCK_C], ACC)
    m2 = tl.zeros([BLOCK_C], ACC)
    for split in range(0, num_splits):  # fixed order: bitwise reproducible
        idx = split * C + c
        n_b = tl.load(PART_COUNT + idx, mask=cm, other=0.0)
        mean_b = tl.load(PART_MEAN + idx, mask=cm, other=0.0)
        m2_b = tl.load(PART_M2 + idx, mask=cm, other=0.0)
        n, mean, m2 = chan_merge(n, mean, m2, n_b, mean_b, m2_b)
    var = m2 / tl.where(n > 0, n, 1.0)
    rstd = inv_sqrt(var + eps)
    tl.store(MEAN + c, mean, mask=cm)
    tl.store(RSTD + c, rstd, mask=cm)
    tl.store(VAR + c, var, mask=cm)


@triton.jit
def running_stats_kernel(
    RUNNING_MEAN,  # [C] updated in place (float32 or the input's dtype)
    RUNNING_VAR,  # [C] updated in place: unbiased variance
    MEAN,  # [C] batch mean
    VAR,  # [C] biased batch variance
    NUM_BATCHES,  # int64 scalar tensor, read only when CUMULATIVE
    C,
    momentum,
    unbias,  # m / (m - 1)
    CUMULATIVE: tl.constexpr,  # momentum=None: factor = 1 / num_batches_tracked
    BLOCK_C: tl.constexpr,
):
    c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    cm = c < C
    if CUMULATIVE:
        factor = 1.0 / tl.load(NUM_BATCHES).to(tl.float32)
    else:
        factor = momentum
    ACC = MEAN.dtype.element_ty
    rm = tl.load(RUNNING_MEAN + c, mask=cm).to(ACC)
    rv = tl.load(RUNNING_VAR + c, mask=cm).to(ACC)
    mean = tl.load(MEAN + c, mask=cm)
    var = tl.load(VAR + c, mask=cm) * unbias
    # Same form as torch: (1 - f) * running + f * batch.
    rm = (1.0 - factor) * rm + factor * mean
    rv = (1.0 - factor) * rv + factor * var
    tl.store(RUNNING_MEAN + c, rm.to(RUNNING_MEAN.dtype.element_ty), mask=cm)
    tl.store(RUNNING_VAR + c, rv.to(RUNNING_VAR.dtype.element_ty), mask=cm)
