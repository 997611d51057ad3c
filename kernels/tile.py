"""Helpers shared by every kernel: where a tile lives, and how two (count, mean, M2) partials merge."""

import triton
import triton.language as tl


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
    """Offsets, mask and channel indices of one [BLOCK_R, BLOCK_C, BLOCK_S] tile.

    ``tile`` numbers the tiles of the (R, S) plane row-major; ``pid_c`` picks the channel block.
    Also returns the number of valid (r, s) positions of the tile, the same for each channel.
    Row offsets are int64: a tensor may hold more than 2**31 elements.

    S_DIV (a power of two dividing S, set by the launcher) lets the compiler prove that each row of
    a channel starts on a multiple of S_DIV elements and that the mask is constant over such runs:
    without it, S = 196 (14x14) gives 4-byte loads instead of 16-byte ones. The value is the same;
    only what the compiler can see changes.
    """
    tiles_s = tl.cdiv(S, BLOCK_S)
    tile_r = tile // tiles_s
    tile_s = tile - tile_r * tiles_s
    r = tile_r * BLOCK_R + tl.arange(0, BLOCK_R)
    c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    s = tile_s * BLOCK_S + tl.arange(0, BLOCK_S)
    r3 = r.to(tl.int64)[:, None, None]
    c3 = c[None, :, None]
    s3 = s[None, None, :]
    if CHANNELS_CONTIG:
        offs = r3 * stride_r + c3 + s3  # S == 1 here, so s3 == 0
    else:
        offs = r3 * ((stride_r // S_DIV) * S_DIV) + c3 * ((stride_c // S_DIV) * S_DIV) + s3
    mask = (r3 < R) & (c3 < C) & (s3 < (S // S_DIV) * S_DIV)
    count = tl.minimum(R - tile_r * BLOCK_R, BLOCK_R) * tl.minimum(S - tile_s * BLOCK_S, BLOCK_S)
    return offs, mask, c, count


@triton.jit
def sum_rs(v):
    """Sum a [BLOCK_R, BLOCK_C, BLOCK_S] tile over rows and spatial positions: one value per channel."""
    return tl.sum(tl.sum(v, axis=2), axis=0)


@triton.jit
def chan_merge(n_a, mean_a, m2_a, n_b, mean_b, m2_b):
    """Chan et al.'s parallel merge of two (count, mean, M2) partials; an empty side leaves the other."""
    n = n_a + n_b
    safe_n = tl.where(n > 0, n, 1.0)
    delta = mean_b - mean_a
    mean = mean_a + delta * (n_b / safe_n)
    m2 = m2_a + m2_b + delta * delta * (n_a * n_b / safe_n)
    return n, mean, m2


@triton.jit
def inv_sqrt(v):
    """1 / sqrt(v), correctly rounded: sqrt_rn for fp32 (rsqrt.approx is off by ulps), sqrt for fp64."""
    if v.dtype == tl.float64:
        return 1.0 / tl.sqrt(v)
    else:
        return 1.0 / tl.sqrt_rn(v)
