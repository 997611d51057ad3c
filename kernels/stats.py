"""Training statistics in one launch: a split reduction of per-channel (count, mean, M2) whose last
program merges the partials and, when asked, updates the running statistics.

Program (channel block, split) walks its own contiguous range of tiles with per-lane Welford
accumulators (no cross-lane work inside the loop), merges its lanes once, and stores one partial per
channel. The last program of the channel block to arrive (``last_to_arrive``: an atomic ticket, the
only atomic) merges the SPLIT partials in a fixed order into mean, rstd (and the biased variance)
and folds them into running_mean/running_var. Splitting each channel's values over many programs
fills the GPU even when C is small; no E[x^2] - E[x]^2 cancellation happens anywhere.

``running_stats_kernel`` is the same update on its own, for statistics computed elsewhere
(SyncBatchNorm's global ones).
"""

import triton
import triton.language as tl

from .tile import (
    acc_scalar,
    chan_combine,
    inv_sqrt,
    last_to_arrive,
    launched,
    load_partials,
    merge_lanes,
    split_range,
    tile_offsets,
    welford_lanes,
)


@triton.jit
def update_running(
    RUNNING_MEAN,
    RUNNING_VAR,
    NUM_BATCHES,
    c,
    cm,
    mean,
    var,
    count,
    momentum,
    stride_rm,
    stride_rv,
    CUMULATIVE: tl.constexpr,
    COUNT_BATCH: tl.constexpr,
):
    """running <- (1 - f) running + f batch, var unbiased by count / (count - 1), as torch does.

    f = momentum, or 1 / num_batches_tracked (CUMULATIVE: momentum=None) read on the device, where
    num_batches_tracked counts this batch too (COUNT_BATCH: it is incremented by this launch).
    Running buffers may be strided views: they are written exactly where torch writes them.
    """
    ACC = mean.dtype
    if CUMULATIVE:
        batches = tl.load(NUM_BATCHES).to(ACC)
        if COUNT_BATCH:
            batches = batches + 1.0
        factor = 1.0 / batches
    else:
        factor = momentum
    count = tl.zeros([], ACC) + count  # a tensor or a constant int
    unbiased = var * (count / (count - 1.0))
    RM = RUNNING_MEAN + c.to(tl.int64) * stride_rm
    RV = RUNNING_VAR + c.to(tl.int64) * stride_rv
    rm = tl.load(RM, mask=cm).to(ACC)
    rv = tl.load(RV, mask=cm).to(ACC)
    tl.store(RM, ((1.0 - factor) * rm + factor * mean).to(RUNNING_MEAN.dtype.element_ty), mask=cm)
    tl.store(RV, ((1.0 - factor) * rv + factor * unbiased).to(RUNNING_VAR.dtype.element_ty), mask=cm)


@triton.jit
def block_stats(
    X, pid_c, first, last, R, C, S, stride_r, stride_c,
    ACC: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr,
    CHANNELS_CONTIG: tl.constexpr, S_DIV: tl.constexpr, UNIFORM_S: tl.constexpr,
):  # fmt: skip
    """(count, mean, M2) of channel block ``pid_c`` over tiles [first, last): per-lane Welford in the
    loop (no cross-lane work holds up the next load), the lanes merged once after it."""
    # Per-lane counts: per row when every tile has the same valid spatial columns (UNIFORM_S: the
    # launcher's BLOCK_S covers S or divides it), else per (row, column).
    if UNIFORM_S:
        n = tl.zeros([BLOCK_R, 1, 1], ACC)
    else:
        n = tl.zeros([BLOCK_R, 1, BLOCK_S], ACC)
    mean = tl.zeros([BLOCK_R, BLOCK_C, BLOCK_S], ACC)
    m2 = tl.zeros([BLOCK_R, BLOCK_C, BLOCK_S], ACC)
    # One tile in flight per program leaves DRAM idle: three stages keep two more in flight (16-byte
    # cp.async), where channels are contiguous and where NCHW rows are multiples of 16 values; at
    # the register cap (_config.STATS_MAX_REGISTERS) 14x14 maps would spill. Numbers: docs/design.md.
    for tile in tl.range(first, last, num_stages=3 if CHANNELS_CONTIG or S_DIV == 16 else 1):
        offs, mask, _, rows, cols = tile_offsets(
            tile, pid_c, R, C, S, stride_r, stride_c, BLOCK_R, BLOCK_C, BLOCK_S, CHANNELS_CONTIG, S_DIV
        )
        x = tl.load(X + offs, mask=mask, other=0.0).to(ACC)
        if UNIFORM_S:
            n, mean, m2 = welford_lanes(n, mean, m2, x, rows)
        else:
            n, mean, m2 = welford_lanes(n, mean, m2, x, rows & cols)
    if UNIFORM_S:  # the columns past S never held values: no count there
        n = n * (tl.arange(0, BLOCK_S) < S).to(ACC)[None, None, :]
    c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    cm = c < C
    # Each channel's first value (row 0, position 0): the reference the lane means are merged around.
    # Channels contiguous: offset c (no int64 multiply by stride_c = 1: 8 fewer registers, sm_90).
    if CHANNELS_CONTIG:
        ref = tl.load(X + c, mask=cm, other=0.0).to(ACC)
    else:
        ref = tl.load(X + c.to(tl.int64) * stride_c, mask=cm, other=0.0).to(ACC)
    return merge_lanes(n, mean, m2, ref)


@triton.jit
def count_batch(NUM_BATCHES, TICKET):
    """num_batches_tracked += 1, by the last of the programs that take ``TICKET`` (each after its
    reads of num_batches_tracked), so that every one of them read the old count."""
    if last_to_arrive(TICKET, tl.num_programs(0)):
        tl.store(NUM_BATCHES, tl.load(NUM_BATCHES) + 1)


@triton.jit
def finish_stats(
    n, mean, m2, c, cm, MEAN, RSTD, VAR, RUNNING_MEAN, RUNNING_VAR, NUM_BATCHES, TICKET, eps, momentum,
    stride_rm, stride_rv, ACC: tl.constexpr, HAS_VAR: tl.constexpr, HAS_RUNNING: tl.constexpr,
    CUMULATIVE: tl.constexpr, COUNT_BATCH: tl.constexpr,
):  # fmt: skip
    """A channel block's (count, mean, M2), finished: mean, rstd (and the biased variance when
    HAS_VAR) stored, the running statistics updated, and with COUNT_BATCH the batch counted by the
    last of the programs that take TICKET. Returns rstd."""
    var = m2 / tl.where(n > 0, n, 1.0)
    rstd = inv_sqrt(var + acc_scalar(eps, ACC))
    tl.store(MEAN + c, mean, mask=cm)
    tl.store(RSTD + c, rstd, mask=cm)
    if HAS_VAR:
        tl.store(VAR + c, var, mask=cm)
    if HAS_RUNNING:
        update_running(
            RUNNING_MEAN, RUNNING_VAR, NUM_BATCHES, c, cm, mean, var, n, acc_scalar(momentum, ACC),
            stride_rm, stride_rv, CUMULATIVE, COUNT_BATCH,
        )  # fmt: skip
    if COUNT_BATCH:
        count_batch(NUM_BATCHES, TICKET)
    return rstd


@launched(
    unaligned=(
        "PART",
        "COUNTER",
        "MEAN",
        "RSTD",
        "VAR",
        "RUNNING_MEAN",
        "RUNNING_VAR",
        "NUM_BATCHES",
    )
)
def stats_kernel(
    X,  # input, viewed as (R, C, S)
    PART,  # [3, SPLIT, C] acc dtype workspace: count, mean, M2 of each split
    COUNTER,  # int32 [num_c_blocks + 1], zero between launches: the tickets
    MEAN,  # [C] out, acc dtype
    RSTD,  # [C] out: 1 / sqrt(var + eps)
    VAR,  # [C] out: biased batch variance (stored when HAS_VAR)
    RUNNING_MEAN,  # [C] updated in place when HAS_RUNNING (strided, any float dtype)
    RUNNING_VAR,
    NUM_BATCHES,  # int64 scalar tensor: read when CUMULATIVE, incremented when COUNT_BATCH
    R,
    C,
    S,
    stride_r,
    stride_c,
    num_tiles,  # tiles of the (R, S) plane
    num_splits,  # programs sharing one channel block's tiles (grid axis 1)
    eps,  # acc-dtype scalar (see tile.acc_scalar)
    rstd_offset,  # RSTD's and PART's first values, in elements: the eager plans pass one workspace
    part_offset,  # as MEAN, RSTD and PART
    momentum,  # acc-dtype scalar
    stride_rm,
    stride_rv,
    ACC: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_S: tl.constexpr,
    BLOCK_P: tl.constexpr,  # partials merged per step by the last program
    CHANNELS_CONTIG: tl.constexpr,
    S_DIV: tl.constexpr,
    UNIFORM_S: tl.constexpr,  # every tile has the same valid spatial columns (see _config.launch_config)
    HAS_VAR: tl.constexpr = False,
    HAS_RUNNING: tl.constexpr = False,
    CUMULATIVE: tl.constexpr = False,
    COUNT_BATCH: tl.constexpr = False,
):
    pid_c = tl.program_id(0)
    split = tl.program_id(1)
    RSTD += rstd_offset
    PART += part_offset
    first, last = split_range(split, num_tiles, num_splits)
    n_s, mean_s, m2_s = block_stats(
        X, pid_c, first, last, R, C, S, stride_r, stride_c,
        ACC, BLOCK_R, BLOCK_C, BLOCK_S, CHANNELS_CONTIG, S_DIV, UNIFORM_S,
    )  # fmt: skip
    c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    cm = c < C
    plane = num_splits * C
    out = split * C + c
    tl.store(PART + out, n_s, mask=cm)
    tl.store(PART + plane + out, mean_s, mask=cm)
    tl.store(PART + 2 * plane + out, m2_s, mask=cm)

    if last_to_arrive(COUNTER + pid_c, num_splits):
        # Merge the partials, BLOCK_P splits at a time (a tree within a step, steps in order).
        n_t = tl.zeros([BLOCK_C], ACC)
        mean_t = tl.zeros([BLOCK_C], ACC)
        m2_t = tl.zeros([BLOCK_C], ACC)
        for p0 in range(0, num_splits, BLOCK_P):
            n_b = load_partials(PART, 0, p0, num_splits, C, c, cm, BLOCK_P)
            mean_b = load_partials(PART, 1, p0, num_splits, C, c, cm, BLOCK_P)
            m2_b = load_partials(PART, 2, p0, num_splits, C, c, cm, BLOCK_P)
            n_b, mean_b, m2_b = tl.reduce((n_b, mean_b, m2_b), 0, chan_combine)
            n_t, mean_t, m2_t = chan_combine(n_t, mean_t, m2_t, n_b, mean_b, m2_b)
        finish_stats(
            n_t, mean_t, m2_t, c, cm, MEAN, RSTD, VAR, RUNNING_MEAN, RUNNING_VAR, NUM_BATCHES,
            COUNTER + tl.num_programs(0), eps, momentum, stride_rm, stride_rv,
            ACC, HAS_VAR, HAS_RUNNING, CUMULATIVE, COUNT_BATCH,
        )  # fmt: skip


@launched(
    unaligned=(
        "RUNNING_MEAN",
        "RUNNING_VAR",
        "MEAN",
        "VAR",
        "NUM_BATCHES",
    )
)
def running_stats_kernel(
    RUNNING_MEAN,  # [C] updated in place (strided, any float dtype)
    RUNNING_VAR,  # [C] updated in place: unbiased variance
    MEAN,  # [C] batch mean (acc dtype)
    VAR,  # [C] biased batch variance
    NUM_BATCHES,  # int64 scalar tensor, read only when CUMULATIVE
    C,
    momentum,  # acc-dtype scalar
    count,  # values per channel behind MEAN and VAR
    stride_rm,
    stride_rv,
    ACC: tl.constexpr,
    CUMULATIVE: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    cm = c < C
    mean = tl.load(MEAN + c, mask=cm).to(ACC)
    var = tl.load(VAR + c, mask=cm).to(ACC)
    update_running(
        RUNNING_MEAN,
        RUNNING_VAR,
        NUM_BATCHES,
        c,
        cm,
        mean,
        var,
        count,
        acc_scalar(momentum, ACC),
        stride_rm,
        stride_rv,
        CUMULATIVE,
        False,
    )
