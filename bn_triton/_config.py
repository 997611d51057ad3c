"""Launch settings, in one place, with the reason for every number.

``Geometry`` describes a tensor seen as (R, C, S) (see kernels/__init__.py); ``launch_config`` picks
tile shape, split factor and warps for it. The same numbers serve the statistics pass, the normalize
pass and both backward passes, so the tiles of the reductions and of the elementwise passes agree.
"""

import dataclasses
import functools
import os

import torch
import triton


def interpreting() -> bool:
    """True when Triton runs kernels in its NumPy interpreter (TRITON_INTERPRET=1): CPU tensors work."""
    knobs = getattr(triton, "knobs", None)
    if knobs is not None and getattr(knobs.runtime, "interpret", False):
        return True
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


# Elements per tile. On a GPU 4096 elements is 16 KiB of fp32 per tile: 16 values per thread at
# 8 warps, enough loads in flight to cover DRAM latency without spilling the (count, mean, M2) state.
# The interpreter runs programs one after another in NumPy, where cost is per program, so it gets
# big tiles (see shared/docs/platform-notes.md: 831 ms at 64 elements vs 11 ms at 16384).
TILE_ELEMS_GPU = 4096
TILE_ELEMS_INTERPRETER = 16384
# Along the contiguous axis: 128 channels (channels_last) is 256-512 B per row, whole 128-B lines and
# 16-B vectors per thread; 1024 spatial positions (NCHW) covers a full row of most feature maps.
MAX_BLOCK_C = 128
MAX_BLOCK_S = 1024
# Reduction programs per SM: 4 resident programs of 8 warps each keep every SM busy, and the
# partials stay tiny ([SPLIT, C] floats). The interpreter gets few programs but still >1 split so
# the partial merge is exercised on CPU too.
PROGRAMS_PER_SM = 4
INTERPRETER_PROGRAMS = 4
# Finalize kernels: one program per 128 channels; they touch [SPLIT, C] floats only.
FINALIZE_BLOCK_C = 128


@dataclasses.dataclass(frozen=True)
class Geometry:
    R: int  # rows: N (spatial-contiguous) or N * spatial (channel-contiguous)
    C: int
    S: int  # spatial positions per row (1 when channels are contiguous)
    stride_r: int
    stride_c: int
    channels_contig: bool

    @property
    def per_channel(self) -> int:
        return self.R * self.S


@dataclasses.dataclass(frozen=True)
class LaunchConfig:
    block_r: int
    block_c: int
    block_s: int
    num_c_blocks: int
    num_tiles: int  # tiles of the (R, S) plane
    num_splits: int  # reduction programs per channel block
    tiles_per_split: int
    num_warps: int


@functools.cache
def sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _pow2_at_most(n: int, cap: int) -> int:
    return min(triton.next_power_of_2(max(n, 1)), cap)


def launch_config(geom: Geometry, device: torch.device) -> LaunchConfig:
    interp = device.type != "cuda"
    tile = TILE_ELEMS_INTERPRETER if interp else TILE_ELEMS_GPU
    if geom.channels_contig:
        block_c, block_s = _pow2_at_most(geom.C, MAX_BLOCK_C), 1
    else:
        block_c, block_s = 1, _pow2_at_most(geom.S, MAX_BLOCK_S)
    block_r = _pow2_at_most(geom.R, max(tile // (block_c * block_s), 1))
    num_c_blocks = triton.cdiv(geom.C, block_c)
    num_tiles = triton.cdiv(geom.R, block_r) * triton.cdiv(geom.S, block_s)
    if interp:
        target_programs = INTERPRETER_PROGRAMS
    else:
        target_programs = PROGRAMS_PER_SM * sm_count(
            device.index if device.index is not None else torch.cuda.current_device()
        )
    # Split each channel block's tiles so that the reduction grid reaches target_programs; the
    # grid's second axis caps the split at 65535.
    want = max(1, min(num_tiles, triton.cdiv(target_programs, num_c_blocks), 65535))
    tiles_per_split = max(1, num_tiles // want)  # rounding down gives at least `want` splits
    if triton.cdiv(num_tiles, tiles_per_split) > 65535:
        tiles_per_split = triton.cdiv(num_tiles, 65535)
    num_splits = triton.cdiv(num_tiles, tiles_per_split)
    num_warps = 8 if block_r * block_c * block_s >= 2048 else 4
    return LaunchConfig(block_r, block_c, block_s, num_c_blocks, num_tiles, num_splits, tiles_per_split, num_warps)
