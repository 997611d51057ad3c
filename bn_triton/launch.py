"""Launchers: view tensors as (R, C, S), allocate outputs, pick the grid, launch the kernels.

Nothing here is differentiable or validates user input: ops.py and functional.py do that. Every
function takes tensors already on one device (CUDA, or CPU under the Triton interpreter), with x
canonical (``canonical``) and its geometry. Launches per call: ``batch_stats`` 1 (running
statistics included), ``normalize`` 1, ``grad_sums`` 1, ``grad_input`` 1, ``update_running_stats`` 1;
no torch kernels (fills, copies) unless a per-channel tensor is not contiguous.
"""

import collections
import functools
import struct
from typing import NamedTuple, Optional

import torch

from bn_triton import _config, _launcher, kernels
from bn_triton._config import RUNNING_BLOCK_C, Geometry, LaunchConfig, launch_config
from bn_triton.running import NO_RUNNING, Running

# Kernel launches by name, so tests can prove that our kernels (not torch's batch_norm) ran.
LAUNCHES: collections.Counter = collections.Counter()


def _run(fn, grid, *args, **kwargs):
    """fn[grid](*args, **kwargs), with less host time on a GPU (bn_triton/_launcher.py)."""
    _launcher.launch(fn, grid, args, kwargs)


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


def _channels_last_format(x: torch.Tensor):
    if x.dim() == 4:
        return torch.channels_last
    if x.dim() == 5:
        return torch.channels_last_3d
    return None


@functools.lru_cache(maxsize=4096)  # on the eager hot path: a Geometry per distinct shape/strides
def _geometry(shape: tuple, strides: tuple, contiguous: bool) -> Geometry:
    n, c = shape[0], shape[1]
    s = 1
    for d in shape[2:]:
        s *= d
    if contiguous and s > 1:
        return Geometry(R=n, C=c, S=s, stride_r=c * s, stride_c=s, channels_contig=False)
    return Geometry(R=n * s, C=c, S=1, stride_r=c, stride_c=1, channels_contig=True)


def canonical(x: torch.Tensor) -> tuple[torch.Tensor, Geometry]:
    """Return x in a layout the kernels read directly (copying only if needed) and its geometry.

    Contiguous tensors are (N, C, S) with S contiguous; channels_last tensors are (N*S, C, 1) with C
    contiguous; a contiguous tensor without spatial extent is (N, C, 1) with C contiguous. Anything
    else (sliced, transposed, expanded) is copied to contiguous first.
    """
    x = canonical_layout(x)
    return x, _geometry(tuple(x.shape), x.stride(), x.is_contiguous())


def canonical_layout(x: torch.Tensor) -> torch.Tensor:
    """x itself when the kernels read its layout directly, else a contiguous copy (also for fake tensors)."""
    if x.is_contiguous():
        return x
    fmt = _channels_last_format(x)
    if fmt is not None and x.is_contiguous(memory_format=fmt):
        return x
    return x.contiguous()


def like(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """t with exactly x's strides (dy, residuals: autograd hands them over in any layout)."""
    if t.stride() == x.stride():
        return t
    out = torch.empty_like(x, dtype=t.dtype)
    out.copy_(t)
    return out


def _buffers(size: int, dtype: torch.dtype, device: torch.device, n: int = 1) -> list:
    """n new 1-D tensors of ``size`` values: per-channel outputs, partial workspaces."""
    return [torch.empty((size,), dtype=dtype, device=device) for _ in range(n)]


def _vec(t):
    """A per-channel tensor the kernels index as t[c]: contiguous (a copy only for strided views)."""
    return t if t is None or t.is_contiguous() else t.contiguous()


# Tickets of the last-program merges (kernels/tile.py last_to_arrive), one int32 per channel block
# plus one, per device. Each launch leaves them at zero, so they are allocated and zeroed once (a
# zero fill inside a CUDA-graph capture would be replayed, but an allocation there would belong to
# the graph's pool) and shared by every launch on the device. A larger buffer replaces a smaller
# one when a geometry needs more; the old one is kept alive, since a captured CUDA graph may still
# point at it. Two reductions running at the same time on two streams of one device would share
# tickets: bn_triton launches on the current stream only, so that takes a user's concurrent streams.
_TICKETS: dict = {}
_RETIRED_TICKETS: list = []
_MIN_TICKETS = 4096


def _tickets(device: torch.device, n: int) -> torch.Tensor:
    t = _TICKETS.get(device)
    if t is None or t.numel() < n:
        if t is not None:
            _RETIRED_TICKETS.append(t)
        t = torch.zeros(max(n, _MIN_TICKETS), dtype=torch.int32, device=device)
        _TICKETS[device] = t
    return t


def single_pass(x: torch.Tensor, geom: Geometry) -> bool:
    """Whether ``train_forward`` and ``train_backward`` serve x (``_config.single_pass``)."""
    return _config.single_pass(geom, x.device, x.element_size())


def _tile_args(geom: Geometry, cfg: LaunchConfig) -> dict:
    return dict(
        BLOCK_R=cfg.block_r,
        BLOCK_C=cfg.block_c,
        BLOCK_S=cfg.block_s,
        CHANNELS_CONTIG=geom.channels_contig,
        S_DIV=cfg.s_div,
        num_warps=cfg.num_warps,
    )


def _running_args(running: Running, acc) -> dict:
    """The running-statistics arguments of stats_kernel and forward_kernel (kernels/stats.py
    update_running)."""
    has_running = running.mean is not None
    cumulative = has_running and running.momentum is None
    if cumulative and running.num_batches_tracked is None:
        raise ValueError("momentum=None (the cumulative average) needs num_batches_tracked")
    return dict(
        RUNNING_MEAN=running.mean,
        RUNNING_VAR=running.var,
        NUM_BATCHES=running.num_batches_tracked,
        momentum=scalar(0.0 if cumulative else running.momentum, acc),
        stride_rm=running.mean.stride(0) if has_running else 0,
        stride_rv=running.var.stride(0) if has_running else 0,
        HAS_RUNNING=has_running,
        CUMULATIVE=cumulative,
        COUNT_BATCH=running.num_batches_tracked is not None,
    )


def _epilogue_args(weight, bias, residual, relu: bool) -> dict:
    """The affine and fused-epilogue arguments of normalize_kernel and forward_kernel."""
    return dict(
        W=_vec(weight),
        B=_vec(bias),
        HAS_W=weight is not None,
        HAS_B=bias is not None,
        RES=residual,
        HAS_RESIDUAL=residual is not None,
        RELU=relu,
    )


class ReluGrad(NamedTuple):
    """The fused ReLU in a backward launch: its mask is y > 0 when ``y`` is given, else recomputed
    from x and the affine (the launch's weight, and ``bias``); the masked dy, d(residual), is
    written to ``dz`` when given. ``y`` and ``dz`` have x's strides (see ``like``)."""

    y: Optional[torch.Tensor] = None
    bias: Optional[torch.Tensor] = None
    dz: Optional[torch.Tensor] = None


def _relu_grad_args(relu: Optional[ReluGrad]) -> dict:
    """The fused ReLU's arguments of the backward kernels (kernels/grad.py masked_dy)."""
    if relu is None:
        return dict(RELU=False)
    recompute = relu.y is None
    return dict(
        Y=relu.y,
        B=_vec(relu.bias) if recompute else None,
        DZ=relu.dz,
        RELU=True,
        MASK_FROM_Y=not recompute,
        HAS_B=recompute and relu.bias is not None,
        STORE_DZ=relu.dz is not None,
    )


def _shape_args(geom: Geometry) -> tuple:
    return (geom.R, geom.C, geom.S, geom.stride_r, geom.stride_c)


def batch_stats(x, geom, eps, running: Running = NO_RUNNING, *, want_var=False):
    """Per-channel batch mean and rstd (and the biased variance when ``want_var``), acc dtype.

    One launch, no host sync, the running statistics included (``Running``). Returns (mean, rstd,
    var or None).
    """
    cfg = launch_config(geom, x.device)
    acc = acc_dtype(x.dtype)
    C = geom.C
    (parts,) = _buffers(3 * cfg.num_splits * C, acc, x.device)
    mean, rstd = _buffers(C, acc, x.device, 2)
    var = _buffers(C, acc, x.device)[0] if want_var else None
    _run(
        kernels.stats_kernel,
        (cfg.num_c_blocks, cfg.num_splits),
        x,
        parts,
        _tickets(x.device, cfg.num_c_blocks + 1),
        mean,
        rstd,
        var,
        *_shape_args(geom),
        cfg.num_tiles,
        cfg.num_splits,
        scalar(eps, acc),
        ACC=_tl_acc(acc),
        BLOCK_P=cfg.block_p,
        UNIFORM_S=cfg.uniform_s,
        HAS_VAR=want_var,
        maxnreg=_config.STATS_MAX_REGISTERS if x.element_size() <= 4 else None,
        **_running_args(running, acc),
        **_tile_args(geom, cfg),
    )
    LAUNCHES["stats"] += 1
    return mean, rstd, var


def normalize(x, geom, mean, scale, weight, bias, eps, *, scale_is_var, residual=None, relu=False):
    """y = (x - mean) * s * weight + bias where s = scale (rstd), or rsqrt(scale + eps) if ``scale_is_var``.

    With ``residual`` (x's strides: see ``like``) and/or ``relu`` it is relu(... + residual), fused
    in the same pass.
    """
    cfg = launch_config(geom, x.device)
    y = torch.empty_like(x)
    _run(
        kernels.normalize_kernel,
        (cfg.num_tiles * cfg.num_c_blocks,),
        x,
        y,
        _vec(mean),
        _vec(scale),
        *_shape_args(geom),
        cfg.num_c_blocks,
        scalar(eps, x.dtype),
        ACC=_tl_acc(acc_dtype(x.dtype)),
        SCALE_IS_VAR=scale_is_var,
        **_epilogue_args(weight, bias, residual, relu),
        **_tile_args(geom, cfg),
    )
    LAUNCHES["normalize"] += 1
    return y


def train_forward(x, geom, weight, bias, eps, running: Running = NO_RUNNING, *, residual=None, relu=False):
    """``batch_stats`` then ``normalize`` (training) in one launch (fast where ``single_pass`` holds).

    Returns (y, mean, rstd); running statistics and num_batches_tracked as in ``batch_stats``, the
    epilogue (``residual``, ``relu``) as in ``normalize``. The same code as those two (see
    kernels/single_pass.py).
    """
    cfg = _config.single_pass_config(geom, x.device)
    acc = acc_dtype(x.dtype)
    mean, rstd = _buffers(geom.C, acc, x.device, 2)
    y = torch.empty_like(x)
    _run(
        kernels.forward_kernel,
        (cfg.num_c_blocks,),
        x,
        y,
        mean,
        rstd,
        _tickets(x.device, 1),
        *_shape_args(geom),
        cfg.num_tiles,
        scalar(eps, acc),
        ACC=_tl_acc(acc),
        UNIFORM_S=cfg.uniform_s,
        **_epilogue_args(weight, bias, residual, relu),
        **_running_args(running, acc),
        **_tile_args(geom, cfg),
    )
    LAUNCHES["forward"] += 1
    return y, mean, rstd


def train_backward(dy, x, geom, mean, rstd, weight, *, dweight=None, dbias=None, relu=None):
    """``grad_sums`` then the training ``grad_input`` in one launch (fast where ``single_pass`` holds).

    Returns dx; writes dweight/dbias if given, and with ``relu`` (a ``ReluGrad``) the masked dy to
    its ``dz`` if given. The same code as those two (see kernels/single_pass.py).
    """
    cfg = launch_config(geom, x.device)  # the split kernels' tiles (see _config.SINGLE_PASS_TILE_ELEMS_GPU)
    dx = torch.empty_like(x)
    _run(
        kernels.backward_kernel,
        (cfg.num_c_blocks,),
        dy,
        x,
        dx,
        _vec(mean),
        _vec(rstd),
        _vec(weight),
        dweight,
        dbias,
        *_shape_args(geom),
        cfg.num_tiles,
        geom.per_channel,
        ACC=_tl_acc(acc_dtype(x.dtype)),
        HAS_W=weight is not None,
        HAS_DW=dweight is not None,
        HAS_DB=dbias is not None,
        **_tile_args(geom, cfg),
        **_relu_grad_args(relu),
    )
    LAUNCHES["backward"] += 1
    return dx


def update_running_stats(running_mean, running_var, mean, var, *, momentum, count, num_batches_tracked=None):
    """running <- (1 - f) running + f batch; f = momentum, or 1 / num_batches_tracked when momentum is None.

    For statistics computed elsewhere (SyncBatchNorm); ``batch_stats`` does this in its own launch.
    """
    C = running_mean.numel()
    acc = mean.dtype
    _run(
        kernels.running_stats_kernel,
        ((C + RUNNING_BLOCK_C - 1) // RUNNING_BLOCK_C,),
        running_mean,
        running_var,
        mean,
        var,
        num_batches_tracked if momentum is None else None,
        C,
        scalar(0.0 if momentum is None else momentum, acc),
        count,
        running_mean.stride(0),
        running_var.stride(0),
        ACC=_tl_acc(acc),
        CUMULATIVE=momentum is None,
        BLOCK_C=RUNNING_BLOCK_C,
    )
    LAUNCHES["running_stats"] += 1


def grad_sums(dy, x, geom, mean, scale, weight, eps, *, scale_is_var, dweight=None, dbias=None, relu=None):
    """sum(dy) and sum(dy * xhat) per channel (acc dtype), one launch; also written to dweight/dbias if given.

    xhat = (x - mean) * s with s = scale (rstd), or rsqrt(scale + eps) when ``scale_is_var``. With
    ``relu`` (a ``ReluGrad``), dy is first masked by the fused ReLU.
    """
    cfg = launch_config(geom, x.device)
    acc = acc_dtype(x.dtype)
    C = geom.C
    (parts,) = _buffers(2 * cfg.num_splits * C, acc, x.device)
    sum_dy, sum_dy_xhat = _buffers(C, acc, x.device, 2)
    _run(
        kernels.grad_sums_kernel,
        (cfg.num_c_blocks, cfg.num_splits),
        dy,
        x,
        _vec(mean),
        _vec(scale),
        parts,
        _tickets(x.device, cfg.num_c_blocks),
        sum_dy,
        sum_dy_xhat,
        dweight,
        dbias,
        *_shape_args(geom),
        cfg.num_tiles,
        cfg.num_splits,
        scalar(eps, acc),
        ACC=_tl_acc(acc),
        SCALE_IS_VAR=scale_is_var,
        BLOCK_P=cfg.block_p,
        HAS_DW=dweight is not None,
        HAS_DB=dbias is not None,
        **_tile_args(geom, cfg),
        W=_vec(weight),  # the recomputed ReLU mask's scale
        HAS_W=weight is not None,
        **_relu_grad_args(relu),
    )
    LAUNCHES["grad_sums"] += 1
    return sum_dy, sum_dy_xhat


def grad_input(dy, x, geom, mean, scale, weight, sums, eps, *, training, count=0, relu=None, want_dx=True):
    """dx, one launch (closed form in kernels/grad.py).

    ``training``: from the two per-channel sums, with mean/scale the batch mean and rstd. ``count``
    is the m of the closed form: values per channel behind the sums and statistics; 0 means this
    tensor's own (geom.per_channel; SyncBatchNorm passes the global batch's).
    Not ``training``: the eval dx, dy * weight * rsqrt(scale + eps) with ``scale`` holding
    running_var; no sums. ``relu`` (a ``ReluGrad``): dy is masked first, as in ``grad_sums``, and the
    masked dy goes to its ``dz`` if given. Returns dx, or None when ``want_dx`` is False.
    """
    cfg = launch_config(geom, x.device)
    dx = torch.empty_like(x) if want_dx else None
    sum_dy, sum_dy_xhat = (None, None) if sums is None else sums
    _run(
        kernels.grad_input_kernel,
        (cfg.num_tiles * cfg.num_c_blocks,),
        dy,
        x,
        dx,
        _vec(mean),
        _vec(scale),
        _vec(weight),
        sum_dy,
        sum_dy_xhat,
        *_shape_args(geom),
        cfg.num_c_blocks,
        count or geom.per_channel,
        scalar(eps, x.dtype),
        ACC=_tl_acc(acc_dtype(x.dtype)),
        HAS_W=weight is not None,
        **_tile_args(geom, cfg),
        TRAINING=training,
        STORE_DX=want_dx,
        **_relu_grad_args(relu),
    )
    LAUNCHES["grad_input"] += 1
    return dx
