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
# big tiles (docs/design.md has the timings).
TILE_ELEMS_GPU = 4096
TILE_ELEMS_INTERPRETER = 16384
# Along the contiguous axis: 128 channels (channels_last) is 256-512 B per row, whole 128-B lines and
# 16-B vectors per thread; 1024 spatial positions (NCHW) covers a full row of most feature maps.
MAX_BLOCK_C = 128
MAX_BLOCK_S = 1024
# Reduction programs per SM: the grid aims at one wave of resident programs (a second, nearly empty
# wave would cost a whole program's time). 3 programs of 8 warps fit an SM at up to 80 registers
# (3 x 256 threads x 80 = 61440 of 65536; registers are allocated in steps of 8 per thread, so 88
# would fit only 2). The statistics kernel, which ptxas would give more, is held to that
# (STATS_MAX_REGISTERS; no suite-v1 launch spills there: docs/design.md); fp64 keeps ptxas's
# choice, it runs for exactness, not speed. The partials stay tiny ([SPLIT, C] floats). The
# interpreter gets few programs, but more than one split for small C so that the merge runs on CPU too.
PROGRAMS_PER_SM = 3
STATS_MAX_REGISTERS = 80
INTERPRETER_PROGRAMS = 8
# The last program of a reduction merges its channel block's [SPLIT, BLOCK_C] partials in steps of
# about this many values: enough loads in flight per step that a merge of ~400 splits takes a few
# steps, not hundreds of dependent ones.
MERGE_ELEMS = 4096
# The running-stat update on its own (SyncBatchNorm): one program per 128 channels.
RUNNING_BLOCK_C = 128
# The single-pass kernels (kernels/single_pass.py) serve the inputs whose reductions get one split
# per channel block (the blocks alone fill a wave) and whose resident programs' blocks, x and dy
# together (the backward's), fit in L2: the second read of each block then comes from L2, not DRAM.
# 2048 x 7 x 7 at batch 256: 396 programs x 12544 values x 2 tensors x 4 B = 40 MB, under the 50 MB
# of an H100's L2. The forward's tiles are half the split kernels' (it takes more registers than the
# split kernels, and fewer programs would fit an SM with bigger tiles); the backward keeps the split
# kernels' (smaller ones would make more programs resident than L2 holds). So PROGRAMS_PER_SM bounds
# the resident programs of both. Register counts behind this: docs/design.md.
SINGLE_PASS_TILE_ELEMS_GPU = 2048
# SINGLE_PASS: None (the default) applies the rule above on a GPU and keeps the interpreter on the
# split path (which most inputs take on a GPU, so the test suite exercises it; tests/test_single_pass.py
# and the tests' ``path`` fixture turn the single pass on); False turns it off (the bench's
# bn_triton_split); True takes it wherever one split per block is all, L2 or not. The environment
# variable BN_TRITON_SINGLE_PASS=0 or 1 sets False or True.
SINGLE_PASS = {"0": False, "1": True}.get(os.environ.get("BN_TRITON_SINGLE_PASS", ""))


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
    s_div: int  # largest power of two (<= 16) dividing S: alignment the kernels can prove (kernels/tile.py)
    num_c_blocks: int
    num_tiles: int  # tiles of the (R, S) plane
    num_splits: int  # reduction programs per channel block; split k takes tiles [k*T/P, (k+1)*T/P)
    num_warps: int
    block_p: int  # partials merged per step by the last program of a reduction
    uniform_s: bool  # every tile has the same valid spatial columns: BLOCK_S covers S, or divides it


@functools.cache
def sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


@functools.cache
def l2_bytes(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).L2_cache_size


@dataclasses.dataclass(frozen=True)
class Target:
    """What the launch settings need to know of a device."""

    tile: int  # values per tile of the split kernels
    single_pass_tile: int  # and of the single-pass kernels
    programs: int  # resident reduction programs to aim for: one wave
    l2_bytes: int | None  # None: no cache to fit (the interpreter)


def target(device: torch.device) -> Target:
    """The Target of ``device``: a CUDA GPU, or the CPU under the interpreter (read anew each time:
    tests change its settings)."""
    if device.type != "cuda":
        return Target(TILE_ELEMS_INTERPRETER, TILE_ELEMS_INTERPRETER, INTERPRETER_PROGRAMS, None)
    return _cuda_target(device.index if device.index is not None else torch.cuda.current_device())


@functools.cache
def _cuda_target(index: int) -> Target:
    return Target(TILE_ELEMS_GPU, SINGLE_PASS_TILE_ELEMS_GPU, PROGRAMS_PER_SM * sm_count(index), l2_bytes(index))


def single_pass(geom: Geometry, device: torch.device, itemsize: int) -> bool:
    """Whether the single-pass kernels serve ``geom`` (see SINGLE_PASS_TILE_ELEMS_GPU and SINGLE_PASS)."""
    return SINGLE_PASS is not False and _single_pass(geom, target(device), itemsize, SINGLE_PASS is True)


@functools.lru_cache(maxsize=4096)  # on the eager hot path
def _single_pass(geom: Geometry, t: Target, itemsize: int, forced: bool) -> bool:
    split = _launch_config(geom, t.tile, t.programs, MAX_BLOCK_C, MAX_BLOCK_S)
    if split.num_splits != 1:
        return False
    if forced:
        return True
    if t.l2_bytes is None:  # the interpreter: the split path unless asked
        return False
    resident = min(split.num_c_blocks, t.programs)
    return resident * split.block_c * geom.per_channel * 2 * itemsize <= t.l2_bytes


def single_pass_config(geom: Geometry, device: torch.device) -> LaunchConfig:
    """The single-pass forward's tiles (its backward takes ``launch_config``'s). Its kernel is
    correct for any geometry (a program walks every tile of its block); ``single_pass`` says where
    it is fast."""
    t = target(device)
    return _launch_config(geom, t.single_pass_tile, t.programs, MAX_BLOCK_C, MAX_BLOCK_S)


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)  # plain ints: triton.cdiv costs microseconds per call on the host


def _pow2_at_most(n: int, cap: int) -> int:
    return min(1 << (max(n, 1) - 1).bit_length(), cap)


def launch_config(geom: Geometry, device: torch.device) -> LaunchConfig:
    """Tile, split and warps of the split kernels for ``geom`` on ``device``."""
    t = target(device)
    return _launch_config(geom, t.tile, t.programs, MAX_BLOCK_C, MAX_BLOCK_S)


@functools.lru_cache(maxsize=4096)  # on the eager hot path: every input decides it again
def _launch_config(geom: Geometry, tile: int, target_programs: int, max_block_c: int, max_block_s: int):
    if geom.channels_contig:
        block_c, block_s = _pow2_at_most(geom.C, max_block_c), 1
    else:
        block_c, block_s = 1, _pow2_at_most(geom.S, max_block_s)
        # A row longer than a tile: prefer a BLOCK_S that divides S (3136 = 64 * 49, 12544 = 256 * 49),
        # so that every tile is whole along S and the statistics count per row, not per element.
        divisor = min(geom.S & -geom.S, max_block_s)
        if geom.S > max_block_s and divisor >= 64:
            block_s = divisor
    block_r = _pow2_at_most(geom.R, max(tile // (block_c * block_s), 1))
    num_c_blocks = _cdiv(geom.C, block_c)
    num_tiles = _cdiv(geom.R, block_r) * _cdiv(geom.S, block_s)
    # Split each channel block's tiles over as many programs as keep the grid at one wave of
    # target_programs (at least one split; at most one per tile; grid axis 1 caps it at 65535). The
    # tiles are dealt out evenly, so no split runs longer than the others by more than one tile.
    num_splits = max(1, min(num_tiles, target_programs // num_c_blocks, 65535))
    s_div = min(geom.S & -geom.S, 16)
    num_warps = 8 if block_r * block_c * block_s >= 2048 else 4
    block_p = _pow2_at_most(num_splits, max(MERGE_ELEMS // block_c, 1))
    uniform_s = geom.S <= block_s or geom.S % block_s == 0
    return LaunchConfig(
        block_r, block_c, block_s, s_div, num_c_blocks, num_tiles, num_splits, num_warps, block_p, uniform_s
    )
