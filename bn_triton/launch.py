"""Launchers: tensors seen as (R, C, S), and each kernel's launch decided once per signature.

Nothing here is differentiable or validates user input (functional.py and checks.py do that). A
builder below takes everything a launch depends on: the geometry (``canonical``), the device, the
dtype of every pointer by the kernel's name for it (``dtypes``; an absent pointer is None), the
flags, the activation and the floats. It picks the tiles and the grid (bn_triton/_config.py) and
returns a ``_launcher.Launch`` that a call gives its pointers only, by the same names. Builders are
cached (bounded), so a signature seen before costs a dictionary lookup; the callers allocate the
outputs and workspaces (the eager plans one workspace per call: bn_triton/eager.py). Launches per
call: one per kernel; no torch kernels (fills, copies) unless a tensor must change layout, or a
reduction runs inside a CUDA-graph capture (its tickets).
"""

import functools
import struct
from typing import NamedTuple

import torch

from bn_triton import _config, activations, kernels
from bn_triton._config import RUNNING_BLOCK_C, Geometry, launch_config
from bn_triton._launcher import LAUNCHES, Launch  # noqa: F401  (LAUNCHES: tests count launches here)

PLANS_PER_KIND = 1024  # launches kept per builder (least recently used dropped first)
_cached = functools.lru_cache(maxsize=PLANS_PER_KIND)
_CLEARS: list = []  # cache_clear of every plan cache (bench/stub.py swaps the kernels under them)


def cached(fn):
    """``fn`` with a bounded LRU cache that ``clear_plans`` empties."""
    fn = _cached(fn)
    _CLEARS.append(fn.cache_clear)
    return fn


def clear_plans() -> None:
    """Forget every launch and plan: the next call of each signature builds them again."""
    for clear in _CLEARS:
        clear()


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Statistics and accumulation dtype: float64 for float64 inputs (gradcheck), else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


@functools.cache
def _tl_acc(dtype: torch.dtype):
    import triton.language as tl

    return tl.float64 if dtype == torch.float64 else tl.float32


def scalar(value: float, dtype: torch.dtype):
    """A float kernel argument in the accumulation dtype of ``dtype``'s kernels (tile.acc_scalar).

    Triton passes a Python float as fp32. A float64 kernel gets the float64 bit pattern as an
    int64 instead, so eps and momentum keep all their digits."""
    if dtype != torch.float64:
        return float(value)
    return struct.unpack("<q", struct.pack("<d", float(value)))[0]


# ---------------------------------------------------------------- layouts
def _channels_last_format(x: torch.Tensor):
    return {4: torch.channels_last, 5: torch.channels_last_3d}.get(x.dim())


@functools.lru_cache(maxsize=4096)
def _geometry(shape: tuple, strides: tuple, contiguous: bool) -> Geometry:
    n, c = shape[0], shape[1]
    s = 1
    for d in shape[2:]:
        s *= d
    if contiguous and s > 1:
        return Geometry(R=n, C=c, S=s, stride_r=c * s, stride_c=s, channels_contig=False)
    return Geometry(R=n * s, C=c, S=1, stride_r=c, stride_c=1, channels_contig=True)


def canonical(x: torch.Tensor) -> tuple[torch.Tensor, Geometry]:
    """x in a layout the kernels read directly (copied only if needed), and its geometry.

    Contiguous tensors are (N, C, S) with S contiguous; channels_last tensors are (N*S, C, 1) with C
    contiguous; a contiguous tensor without spatial extent is (N, C, 1) with C contiguous. Anything
    else (sliced, transposed, expanded, or not 16-byte aligned) is copied to contiguous first.
    """
    x = canonical_layout(x)
    return x, _geometry(tuple(x.shape), x.stride(), x.is_contiguous())


def canonical_layout(x: torch.Tensor) -> torch.Tensor:
    """x itself when the kernels read it directly (its layout, and 16-byte aligned), else a copy."""
    if not _readable_layout(x):
        return x.contiguous()
    if x.device.type != "meta" and x.data_ptr() % 16 != 0:
        return x.clone(memory_format=torch.preserve_format)
    return x


def empty_canonical(x: torch.Tensor) -> torch.Tensor:
    """An uninitialized tensor like ``canonical(x)``'s (fake tensors too: the custom ops' fakes)."""
    fmt = torch.preserve_format if _readable_layout(x) else torch.contiguous_format
    return torch.empty_like(x, memory_format=fmt)


def _readable_layout(x: torch.Tensor) -> bool:
    return x.is_contiguous() or x.is_contiguous(memory_format=_channels_last_format(x) or torch.contiguous_format)


def like(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """t with exactly x's strides and 16-byte aligned (dy, residuals: autograd hands them over in
    any layout)."""
    if t.stride() == x.stride() and (t.data_ptr() % 16 == 0 or t.device.type == "meta"):
        return t
    out = torch.empty_like(x, dtype=t.dtype)
    out.copy_(t)
    return out


def vec(t):
    """A per-channel tensor the kernels index as t[c]: contiguous (a copy only for strided views)."""
    return t if t is None or t.is_contiguous() else t.contiguous()


# ---------------------------------------------------------------- tickets
# The last-program merges (kernels/tile.py last_to_arrive) count arrivals on int32 tickets, one per
# channel block (plus one for num_batches_tracked). Every launch leaves them at zero, so a buffer is
# allocated and zeroed once and reused, one per device and stream: launches on one stream run one
# after another, and two reductions on two streams never share a ticket. Inside a CUDA-graph
# capture each launch gets tickets of its own, zeroed in the graph: the captured kernels replay on
# whatever stream the graph is launched on, possibly beside eager work on the capture stream. A
# larger buffer replaces a smaller one when a geometry needs more; the old one is kept alive, since
# a captured graph or a kernel still in flight may point at it.
_TICKETS: dict = {}
_RETIRED_TICKETS: list = []
_MIN_TICKETS = 4096


def tickets(device: torch.device, n: int) -> torch.Tensor:
    """At least n zeroed int32 tickets for a launch on ``device``'s current stream."""
    if device.type == "cuda":
        if torch._C._cuda_isCurrentStreamCapturing():
            return torch.zeros(n, dtype=torch.int32, device=device)
        key = (device.index, torch._C._cuda_getCurrentRawStream(device.index))
    else:
        key = device
    t = _TICKETS.get(key)
    if t is None or t.numel() < n:
        if t is not None:
            _RETIRED_TICKETS.append(t)
        t = _TICKETS[key] = torch.zeros(max(n, _MIN_TICKETS), dtype=torch.int32, device=device)
    return t


# ---------------------------------------------------------------- launches
# A launch's pointers are named as its kernel's parameters (X, Y, MEAN, ...): a builder takes their
# dtypes by name (``dtypes``), and a call passes the tensors by name; a pointer not named is None.
# A compiled kernel is specialized on the dtypes and on which pointers are None.


def dtypes(**pointers) -> tuple:
    """A builder's ``dtypes``: each named pointer's dtype (given as a tensor or a dtype), None ones
    left out; hashable, so that the builders' caches key on it."""
    return tuple(
        sorted((name, t if isinstance(t, torch.dtype) else t.dtype) for name, t in pointers.items() if t is not None)
    )


class RunningSpec(NamedTuple):
    """How a statistics launch moves the running statistics (when it is given them): their strides,
    the momentum or the cumulative average (read on the device from num_batches_tracked), and
    whether it counts the batch on num_batches_tracked."""

    stride_mean: int = 0
    stride_var: int = 0
    momentum: float = 0.0
    cumulative: bool = False
    count_batch: bool = False


NO_RUNNING = RunningSpec()


def _tiles(geom: Geometry, cfg) -> dict:
    return dict(
        R=geom.R,
        C=geom.C,
        S=geom.S,
        stride_r=geom.stride_r,
        stride_c=geom.stride_c,
        BLOCK_R=cfg.block_r,
        BLOCK_C=cfg.block_c,
        BLOCK_S=cfg.block_s,
        CHANNELS_CONTIG=geom.channels_contig,
        S_DIV=cfg.s_div,
    )


def _running(running: RunningSpec, has_running: bool, acc: torch.dtype) -> dict:
    return dict(
        momentum=scalar(running.momentum, acc),
        stride_rm=running.stride_mean,
        stride_rv=running.stride_var,
        HAS_RUNNING=has_running,
        CUMULATIVE=running.cumulative,
        COUNT_BATCH=running.count_batch,
    )


def _activation(activation, acc: torch.dtype) -> dict:
    """The activation's constexpr and parameter (kernels/activation.py) from its canonical string."""
    name, param = activations.parse(activation)
    return dict(ACT=name, act_param=scalar(param, acc))


def _activation_grad(activation, grad_from_y: bool, d: dict, acc: torch.dtype) -> dict:
    """The backward kernels' activation constexprs (kernels/grad.py act_dy): act' at y (``grad_from_y``)
    or at the pre-activation recomputed with the bias and residual where given; g stored to DZ."""
    return dict(
        **_activation(activation, acc),
        GRAD_FROM_Y=grad_from_y,
        HAS_RESIDUAL="RES" in d,
        HAS_B="B" in d,
        STORE_DZ="DZ" in d,
    )


def _options(cfg, **extra) -> dict:
    return dict(num_warps=cfg.num_warps, **{k: v for k, v in extra.items() if v is not None})


def _named(kind: str, dtypes: tuple, pointers: tuple) -> dict:
    """``dtypes`` as a dict, checked against the kernel's pointers."""
    d = dict(dtypes)
    unknown = set(d) - set(pointers)
    if unknown:
        raise AssertionError(f"{kind}: no pointers {sorted(unknown)}")
    return d


STATS = ("X", "PART", "COUNTER", "MEAN", "RSTD", "VAR", "RUNNING_MEAN", "RUNNING_VAR", "NUM_BATCHES")


@cached
def stats(
    geom: Geometry, device: torch.device, dtypes: tuple, eps: float, running: RunningSpec, rstd_offset=0, part_offset=0
):
    """The statistics launch, pointers X, PART (``.parts`` acc values), COUNTER (``.tickets``
    tickets), MEAN, RSTD, VAR?, RUNNING_MEAN?, RUNNING_VAR?, NUM_BATCHES?. mean, rstd (and the biased
    variance when VAR is given) are written in the acc dtype; the running statistics updated and the
    batch counted as ``running`` says, in the same launch. ``rstd_offset``, ``part_offset``: where
    rstd and the partials start in the tensors given for them (the eager plans give one workspace
    for mean, rstd and parts)."""
    d = _named("stats", dtypes, STATS)
    cfg = launch_config(geom, device)
    acc = acc_dtype(d["X"])
    fixed = dict(
        num_tiles=cfg.num_tiles,
        num_splits=cfg.num_splits,
        eps=scalar(eps, acc),
        rstd_offset=rstd_offset,
        part_offset=part_offset,
        ACC=_tl_acc(acc),
        BLOCK_P=cfg.block_p,
        UNIFORM_S=cfg.uniform_s,
        HAS_VAR="VAR" in d,
        **_running(running, "RUNNING_MEAN" in d, acc),
        **_tiles(geom, cfg),
    )
    maxnreg = _config.STATS_MAX_REGISTERS if d["X"] != torch.float64 else None
    grid = (cfg.num_c_blocks, cfg.num_splits)
    launch = Launch("stats", kernels.stats_kernel, grid, STATS, fixed, _options(cfg, maxnreg=maxnreg), device)
    launch.parts, launch.tickets = 3 * cfg.num_splits * geom.C, cfg.num_c_blocks + 1
    return launch


NORMALIZE = ("X", "Y", "MEAN", "SCALE", "W", "B", "RES")


@cached
def normalize(geom, device, dtypes: tuple, eps: float, scale_is_var: bool, activation, scale_offset=0):
    """The elementwise pass, pointers X, Y, MEAN, SCALE, W?, B?, RES?: y = act((x - mean) * s * weight
    + bias + residual), s = scale (rstd) or rsqrt(scale + eps), the scale starting ``scale_offset``
    values into its tensor; ``activation`` canonical (bn_triton/activations.py) or None."""
    d = _named("normalize", dtypes, NORMALIZE)
    cfg = launch_config(geom, device)
    acc = acc_dtype(d["X"])
    fixed = dict(
        num_c_blocks=cfg.num_c_blocks,
        eps=scalar(eps, acc),
        scale_offset=scale_offset,
        ACC=_tl_acc(acc),
        SCALE_IS_VAR=scale_is_var,
        HAS_W="W" in d,
        HAS_B="B" in d,
        HAS_RESIDUAL="RES" in d,
        **_activation(activation, acc),
        **_tiles(geom, cfg),
    )
    grid = (cfg.num_tiles * cfg.num_c_blocks,)
    return Launch("normalize", kernels.normalize_kernel, grid, NORMALIZE, fixed, _options(cfg), device)


GRAD_SUMS = (
    "DY", "X", "MEAN", "SCALE", "PART", "COUNTER", "SUM_DY", "SUM_DY_XHAT", "DW", "DB", "Y", "W", "B", "RES", "DZ",
)  # fmt: skip


@cached
def grad_sums(
    geom, device, dtypes: tuple, eps: float, scale_is_var: bool, activation, grad_from_y: bool, offsets=(0, 0, 0)
):
    """The backward reduction, pointers DY, X, MEAN, SCALE, PART, COUNTER, SUM_DY, SUM_DY_XHAT, DW?,
    DB?, Y?, W?, B?, RES?, DZ?: sum(g) and sum(g * xhat) per channel in the acc dtype, also to
    dweight/dbias when given, with g = dy * act'(pre) (act' at Y with ``grad_from_y``, else at the
    pre-activation recomputed from x, weight, B and RES), stored to DZ when given. ``offsets``: where
    scale, sum_dy_xhat and the partials start in the tensors given for them (the eager plans give one
    workspace for mean and scale, one for the sums and parts)."""
    d = _named("grad_sums", dtypes, GRAD_SUMS)
    cfg = launch_config(geom, device)
    acc = acc_dtype(d["X"])
    fixed = dict(
        num_tiles=cfg.num_tiles,
        num_splits=cfg.num_splits,
        eps=scalar(eps, acc),
        scale_offset=offsets[0],
        sum2_offset=offsets[1],
        part_offset=offsets[2],
        ACC=_tl_acc(acc),
        SCALE_IS_VAR=scale_is_var,
        BLOCK_P=cfg.block_p,
        HAS_DW="DW" in d,
        HAS_DB="DB" in d,
        HAS_W="W" in d,
        **_activation_grad(activation, grad_from_y, d, acc),
        **_tiles(geom, cfg),
    )
    grid = (cfg.num_c_blocks, cfg.num_splits)
    launch = Launch("grad_sums", kernels.grad_sums_kernel, grid, GRAD_SUMS, fixed, _options(cfg), device)
    launch.parts, launch.tickets = 2 * cfg.num_splits * geom.C, cfg.num_c_blocks
    return launch


GRAD_INPUT = ("DY", "X", "DX", "MEAN", "SCALE", "W", "SUM_DY", "SUM_DY_XHAT", "Y", "B", "RES", "DZ")


@cached
def grad_input(
    geom, device, dtypes: tuple, eps: float, training: bool, count: int, activation, grad_from_y: bool, offsets=(0, 0)
):
    """The elementwise backward, pointers DY, X, DX?, MEAN, SCALE, W?, SUM_DY?, SUM_DY_XHAT?, Y?, B?,
    RES?, DZ?. Training: dx from the two sums over ``count`` values per channel (0: this tensor's
    own); eval: dx = dy * weight * rsqrt(scale + eps). With an ``activation`` dy becomes g = dy *
    act'(pre) first (as in ``grad_sums``), stored to DZ when given. ``offsets``: where scale and
    sum_dy_xhat start in their tensors (as in ``grad_sums``)."""
    d = _named("grad_input", dtypes, GRAD_INPUT)
    cfg = launch_config(geom, device)
    acc = acc_dtype(d["X"])
    fixed = dict(
        num_c_blocks=cfg.num_c_blocks,
        count=count or geom.per_channel,
        eps=scalar(eps, acc),
        scale_offset=offsets[0],
        sum2_offset=offsets[1],
        ACC=_tl_acc(acc),
        HAS_W="W" in d,
        TRAINING=training,
        STORE_DX="DX" in d,
        **_activation_grad(activation, grad_from_y, d, acc),
        **_tiles(geom, cfg),
    )
    grid = (cfg.num_tiles * cfg.num_c_blocks,)
    return Launch("grad_input", kernels.grad_input_kernel, grid, GRAD_INPUT, fixed, _options(cfg), device)


FORWARD = ("X", "Y", "MEAN", "RSTD", "TICKET", "W", "B", "RES", "RUNNING_MEAN", "RUNNING_VAR", "NUM_BATCHES")


@cached
def forward(geom, device, dtypes: tuple, eps: float, running: RunningSpec, activation, rstd_offset=0):
    """The training forward in one launch, where one program owns a channel block (kernels/single_pass.py),
    pointers X, Y, MEAN, RSTD, TICKET, W?, B?, RES?, RUNNING_MEAN?, RUNNING_VAR?, NUM_BATCHES?; the
    statistics as in ``stats`` (rstd ``rstd_offset`` values into its tensor), y as in ``normalize``."""
    d = _named("forward", dtypes, FORWARD)
    cfg = _config.single_pass_config(geom, device)
    acc = acc_dtype(d["X"])
    fixed = dict(
        num_tiles=cfg.num_tiles,
        eps=scalar(eps, acc),
        rstd_offset=rstd_offset,
        ACC=_tl_acc(acc),
        UNIFORM_S=cfg.uniform_s,
        HAS_W="W" in d,
        HAS_B="B" in d,
        HAS_RESIDUAL="RES" in d,
        **_activation(activation, acc),
        **_running(running, "RUNNING_MEAN" in d, acc),
        **_tiles(geom, cfg),
    )
    launch = Launch("forward", kernels.forward_kernel, (cfg.num_c_blocks,), FORWARD, fixed, _options(cfg), device)
    launch.tickets = 1
    return launch


BACKWARD = ("DY", "X", "DX", "MEAN", "RSTD", "W", "DW", "DB", "Y", "B", "RES", "DZ")


@cached
def backward(geom, device, dtypes: tuple, activation, grad_from_y: bool, rstd_offset=0):
    """The training backward in one launch (kernels/single_pass.py), pointers DY, X, DX, MEAN, RSTD,
    W?, DW?, DB?, Y?, B?, RES?, DZ?; the gradients as ``grad_sums`` then ``grad_input`` (rstd
    ``rstd_offset`` values into its tensor)."""
    d = _named("backward", dtypes, BACKWARD)
    cfg = launch_config(geom, device)  # the split kernels' tiles (see _config.SINGLE_PASS_TILE_ELEMS_GPU)
    acc = acc_dtype(d["X"])
    fixed = dict(
        num_tiles=cfg.num_tiles,
        count=geom.per_channel,
        rstd_offset=rstd_offset,
        ACC=_tl_acc(acc),
        HAS_W="W" in d,
        HAS_DW="DW" in d,
        HAS_DB="DB" in d,
        **_activation_grad(activation, grad_from_y, d, acc),
        **_tiles(geom, cfg),
    )
    grid = (cfg.num_c_blocks,)
    return Launch("backward", kernels.backward_kernel, grid, BACKWARD, fixed, _options(cfg), device)


RUNNING_UPDATE = ("RUNNING_MEAN", "RUNNING_VAR", "MEAN", "VAR", "NUM_BATCHES")


@cached
def running_update(C: int, device, dtypes: tuple, running: RunningSpec, count: int):
    """The running-statistics update on its own, for statistics computed elsewhere (SyncBatchNorm),
    pointers RUNNING_MEAN, RUNNING_VAR, MEAN, VAR, NUM_BATCHES?, over ``count`` values."""
    d = _named("running_update", dtypes, RUNNING_UPDATE)
    acc = d["MEAN"]
    fixed = dict(
        C=C,
        momentum=scalar(running.momentum, acc),
        count=count,
        stride_rm=running.stride_mean,
        stride_rv=running.stride_var,
        ACC=_tl_acc(acc),
        CUMULATIVE=running.cumulative,
        BLOCK_C=RUNNING_BLOCK_C,
    )
    grid = ((C + RUNNING_BLOCK_C - 1) // RUNNING_BLOCK_C,)
    return Launch("running_stats", kernels.running_stats_kernel, grid, RUNNING_UPDATE, fixed, {}, device)


def single_pass(geom: Geometry, device: torch.device, itemsize: int) -> bool:
    """Whether ``forward`` and ``backward`` serve this geometry (``_config.single_pass``)."""
    return _config.single_pass(geom, device, itemsize)
