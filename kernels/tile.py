"""Helpers shared by every kernel: where a tile lives, which tiles a split owns, per-lane Welford
accumulation, the Chan merge of (count, mean, M2) partials, and the scalars of float64 kernels."""

import triton
import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction


def launched(*, unaligned: tuple):
    """``@triton.jit`` for a kernel that bn_triton's launch plans call: its pointer parameters come
    first (what changes from call to call), then the scalars, then the constexprs. The pointers in
    ``unaligned`` (per-channel vectors, workspaces: views may start anywhere) are not specialized on
    their 16-byte alignment, so one compiled kernel serves every call of a plan; the big tensors
    (x, y, dy, dx, residual) are, and the plans only ever pass them aligned."""
    try:
        return triton.jit(do_not_specialize_on_alignment=list(unaligned))
    except TypeError:  # a Triton without the option specializes them: its own launch path only
        return triton.jit


@triton.jit
def tile_offsets(
    tile,
    pid_c,
    R,
    C,
    S,
    stride_r,
    stride_c,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_S: tl.constexpr,
    CHANNELS_CONTIG: tl.constexpr,
    S_DIV: tl.constexpr = 1,
):
    """Offsets, mask and channel indices of one [BLOCK_R, BLOCK_C, BLOCK_S] tile, and which of its
    rows ([BLOCK_R, 1, 1]) and spatial columns ([1, 1, BLOCK_S]) hold values.

    ``tile`` numbers the tiles of the (R, S) plane row-major; ``pid_c`` picks the channel block.
    Every offset product is int64: a tensor may hold more than 2**31 elements, and so may
    (C - 1) * stride_c alone.

    S_DIV (a power of two dividing S, set by the launcher) lets the compiler prove that each row of
    a channel starts on a multiple of S_DIV elements and that the mask is constant over such runs:
    without it, S = 196 (14x14) gives 4-byte loads instead of 16-byte ones. The value is the same;
    only what the compiler can see changes.
    """
    tiles_s = tl.cdiv(S, BLOCK_S)
    tile = tl.zeros([], tl.int64) + tile  # int64 arithmetic from here (tile may be a plain int)
    tile_r = tile // tiles_s
    tile_s = tile - tile_r * tiles_s
    r = tile_r * BLOCK_R + tl.arange(0, BLOCK_R)
    c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    s = tile_s * BLOCK_S + tl.arange(0, BLOCK_S)
    r3 = r[:, None, None]
    c3 = c.to(tl.int64)[None, :, None]
    s3 = s[None, None, :]
    if CHANNELS_CONTIG:
        offs = r3 * stride_r + c3 + s3  # S == 1 here, so s3 == 0
    else:
        offs = r3 * ((stride_r // S_DIV) * S_DIV) + c3 * ((stride_c // S_DIV) * S_DIV) + s3
    rows = r3 < R
    cols = s3 < (S // S_DIV) * S_DIV
    mask = rows & cols & (c3 < C)
    return offs, mask, c, rows, cols


@triton.jit
def elementwise_tile(
    num_c_blocks,
    R,
    C,
    S,
    stride_r,
    stride_c,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_S: tl.constexpr,
    CHANNELS_CONTIG: tl.constexpr,
    S_DIV: tl.constexpr,
):
    """The tile of this program in an elementwise pass (one tile each, channel blocks fastest):
    offsets, mask, channel indices and their mask."""
    pid = tl.program_id(0)
    offs, mask, c, _, _ = tile_offsets(
        pid // num_c_blocks,
        pid % num_c_blocks,
        R,
        C,
        S,
        stride_r,
        stride_c,
        BLOCK_R,
        BLOCK_C,
        BLOCK_S,
        CHANNELS_CONTIG,
        S_DIV,
    )
    return offs, mask, c, c < C


@triton.jit
def split_range(split, num_tiles, num_splits):
    """Tiles [k*T/P, (k+1)*T/P) of split k: every split gets floor or ceil of T/P tiles, so the
    programs of a reduction finish together (int64: k*T may pass 2**31)."""
    first = (split.to(tl.int64) * num_tiles) // num_splits
    last = ((split.to(tl.int64) + 1) * num_tiles) // num_splits
    return first, last


@triton.jit
def welford_lanes(n, mean, m2, x, lanes):
    """Add one tile to per-lane (count, mean, M2) accumulators (Welford's update, lane by lane).

    Each lane keeps its own running statistics, so the loop body has no cross-lane reduction and the
    next tile's load is not held up by one: the lanes are merged once, after the loop. ``n`` and
    ``lanes`` have the shape of the lanes whose counts can differ: [BLOCK_R, 1, 1] when the spatial
    columns that hold values are the same in every tile (one division per row, not per element), else
    [BLOCK_R, 1, BLOCK_S]. Lanes outside ``lanes`` keep their state.
    """
    n = n + lanes.to(n.dtype)
    step = tl.where(lanes, 1.0 / tl.maximum(n, 1.0), 0.0)
    delta = x - mean
    mean = mean + delta * step
    m2 = m2 + tl.where(lanes, delta * (x - mean), 0.0)
    return n, mean, m2


@triton.jit
def merge_lanes(n, mean, m2, ref):
    """Merge per-lane accumulators ([BLOCK_R, BLOCK_C, BLOCK_S], counts broadcastable) into one
    (count, mean, M2) per channel: mean = ref + sum(w_l mean_l - w_l ref) with w_l = n_l / N, and
    M2 = sum(M2_l) + sum(n_l (mean_l - mean)^2): the exact parallel formula, in sums.

    ``ref`` ([BLOCK_C]) is one value of each channel: the terms summed are then deviations (no digits
    lost to a large common offset, a mean of 1e4 with std 1 in fp32), and w_l <= 1 keeps each
    product within fp32's range even for values of opposite signs near its limits. Empty lanes
    contribute exactly nothing.
    """
    n = n + tl.zeros_like(mean)
    full = n > 0
    total = sum_rs(n)
    w = n * (1.0 / tl.where(total > 0, total, 1.0))[None, :, None]
    mean_c = ref + sum_rs(tl.where(full, w * mean - w * ref[None, :, None], 0.0))
    d = mean - mean_c[None, :, None]
    m2_c = sum_rs(m2) + sum_rs(tl.where(full, n * d * d, 0.0))
    return total, mean_c, m2_c


@triton.jit
def chan_combine(n_a, mean_a, m2_a, n_b, mean_b, m2_b):
    """Chan et al.'s merge of two (count, mean, M2) partials (a ``tl.reduce`` combine function).

    An empty side contributes nothing, exactly: with n_a = 0 the general formula would compute
    delta^2 * 0, which is NaN once |delta| passes ~1.8e19 in fp32 (delta^2 = inf).
    """
    n = n_a + n_b
    safe_n = tl.where(n > 0, n, 1.0)
    frac_b = n_b / safe_n
    delta = mean_b - mean_a
    mean = mean_a + delta * frac_b
    # delta * (delta * frac_b) * n_a rather than delta^2 * n_a * n_b / n: no overflow of delta^2
    # when the partial means are far apart but both finite.
    m2 = m2_a + m2_b + (delta * frac_b) * delta * n_a
    mean = tl.where(n_a == 0, mean_b, tl.where(n_b == 0, mean_a, mean))
    m2 = tl.where(n_a == 0, m2_b, tl.where(n_b == 0, m2_a, m2))
    return n, mean, m2


@triton.jit
def sum_rs(v):
    """Sum a [BLOCK_R, BLOCK_C, BLOCK_S] tile over rows and spatial positions: one value per channel."""
    return sum_rows(tl.sum(v, axis=2))


@triton.jit
def _probe():
    pass


# Whether @triton.jit, which reads TRITON_INTERPRET once, made NumPy-interpreted functions here.
INTERPRETED = tl.constexpr(isinstance(_probe, InterpretedFunction))


@triton.jit
def sum_rows(v):
    """Sum a [rows, BLOCK_C] block over its rows: one value per channel.

    A GPU reduces the rows as a tree. NumPy, in Triton's interpreter, would add them one after
    another (axis 0 is not the inner one): a channels_last tile of 1024 rows then loses ten times
    the digits (on 800 values, 6e-5 against 6e-6). So the interpreter halves the rows explicitly,
    and CPU runs round as a GPU does. Annotated assignments keep the sizes constexpr there.
    """
    if INTERPRETED:
        rows: tl.constexpr = v.shape[0]
        cols: tl.constexpr = v.shape[1]
        while rows > 1:
            rows: tl.constexpr = rows // 2
            v = tl.sum(tl.reshape(v, [2, rows, cols]), axis=0)
        return tl.reshape(v, [cols])
    else:
        return tl.sum(v, axis=0)


@triton.jit
def last_to_arrive(COUNTER, num_arrivals):
    """True in the one program that arrives last at ``COUNTER`` (an int32 ticket), which it resets.

    Each program calls this after storing its partial results. The barrier makes every thread's
    stores happen before the ticket is taken, and the acq_rel atomic publishes them (release) and
    lets the last program see everyone's (acquire). Only the ticket is atomic: the partials are then
    merged by one program in a fixed order, so results stay bitwise reproducible. Resetting the
    ticket leaves the workspace ready for the next launch without a memset.
    """
    tl.debug_barrier()
    ticket = tl.atomic_add(COUNTER, 1, sem="acq_rel")
    last = ticket == num_arrivals - 1
    if last:
        tl.atomic_xchg(COUNTER, 0, sem="relaxed")
    return last


@triton.jit
def load_partials(PART, plane, p0, num_splits, C, c, cm, BLOCK_P: tl.constexpr):
    """Plane ``plane`` of a [planes, SPLIT, C] partials workspace, splits p0 .. p0 + BLOCK_P of
    channels c: a [BLOCK_P, BLOCK_C] block, 0 past the last split. Read through L2 (.cg), where the
    other programs' stores are, never from a stale L1 line."""
    p = p0 + tl.arange(0, BLOCK_P)
    idx = (plane * num_splits + p[:, None]) * C + c[None, :]
    pm = (p[:, None] < num_splits) & cm[None, :]
    return tl.load(PART + idx, mask=pm, other=0.0, cache_modifier=".cg")


@triton.jit
def acc_scalar(value, ACC: tl.constexpr):
    """A float argument in the accumulation dtype. Triton passes Python floats as fp32, so float64
    kernels receive theirs as the int64 bit pattern (``launch.scalar``) and reinterpret it here."""
    if ACC == tl.float64:
        return value.to(tl.int64).to(tl.float64, bitcast=True)
    else:
        return value


@triton.jit
def inv_sqrt(v):
    """1 / sqrt(v), correctly rounded: sqrt_rn for fp32 (rsqrt.approx is off by ulps), sqrt for fp64."""
    if v.dtype == tl.float64:
        return 1.0 / tl.sqrt(v)
    else:
        return 1.0 / tl.sqrt_rn(v)
