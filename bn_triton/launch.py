"""Launchers: view tensors as (R, C, S), allocate outputs, pick the grid, launch the kernels.

Nothing here is differentiable or validates user input: ops.py and functional.py do that. Every
function takes tensors already on one device (CUDA, or CPU under the Triton interpreter).
"""

import collections

import torch

from bn_triton import kernels
from bn_triton._config import FINALIZE_BLOCK_C, Geometry, LaunchConfig, launch_config

# Kernel launches by name, so tests can prove that our kernels (not torch's batch_norm) ran.
LAUNCHES: collections.Counter = collections.Counter()


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Statistics and accumulation dtype: float64 for float64 inputs (gradcheck), else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _tl_acc(dtype: torch.dtype):
    import triton.language as tl

    return tl.float64 if dtype == torch.float64 else tl.float32


def _channels_last_format(x: torch.Tensor):
    if x.dim() == 4:
        return torch.channels_last
    if x.dim() == 5:
        return torch.channels_last_3d
    return None


def canonical(x: torch.Tensor) -> tuple[torch.Tensor, Geometry]:
    """Return x in a layout the kernels read directly (copying only if needed) and its geometry.

    Contiguous tensors are (N, C, S) with S contiguous; channels_last tensors are (N*S, C, 1) with C
    contiguous; a contiguous tensor without spatial extent is (N, C, 1) with C contiguous. Anything
    else (sliced, transposed, expanded) is copied to contiguous first.
    """
    n, c = x.shape[0], x.shape[1]
    s = x.numel() // max(n * c, 1) if x.numel() else 1
    if not x.is_contiguous():
        fmt = _channels_last_format(x)
        if fmt is None or not x.is_contiguous(memory_format=fmt):
            x = x.contiguous()
    if x.is_contiguous() and s > 1:
        return x, Geometry(R=n, C=c, S=s, stride_r=c * s, stride_c=s, channels_contig=False)
    return x, Geometry(R=n * s, C=c, S=1, stride_r=c, stride_c=1, channels_contig=True)


def like(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """t with exactly x's strides (dy, residuals: autograd hands them over in any layout)."""
    if t.stride() == x.stride():
        return t
    out = torch.empty_like(x, dtype=t.dtype)
    out.copy_(t)
    return out


def _tile_args(geom: Geometry, cfg: LaunchConfig) -> dict:
    return dict(
        BLOCK_R=cfg.block_r,
        BLOCK_C=cfg.block_c,
        BLOCK_S=cfg.block_s,
        CHANNELS_CONTIG=geom.channels_contig,
        S_DIV=cfg.s_div,
        num_warps=cfg.num_warps,
    )


def _shape_args(geom: Geometry) -> tuple:
    return (geom.R, geom.C, geom.S, geom.stride_r, geom.stride_c)


def _finalize_grid(C: int) -> tuple:
    return ((C + FINALIZE_BLOCK_C - 1) // FINALIZE_BLOCK_C,)


def batch_stats(x: torch.Tensor, geom: Geometry, eps: float):
    """Per-channel batch mean, rstd and biased variance (acc dtype): two launches, no host sync."""
    cfg = launch_config(geom, x.device)
    acc = acc_dtype(x.dtype)
    parts = torch.empty((3, cfg.num_splits, geom.C), dtype=acc, device=x.device)
    kernels.stats_partials_kernel[(cfg.num_c_blocks, cfg.num_splits)](
        x, parts[0], parts[1], parts[2], *_shape_args(geom), cfg.num_tiles, cfg.num_splits, **_tile_args(geom, cfg)
    )
    # Three separate tensors (not views of one): ops return them, and op outputs must not alias.
    mean, rstd, var = (torch.empty(geom.C, dtype=acc, device=x.device) for _ in range(3))
    kernels.stats_finalize_kernel[_finalize_grid(geom.C)](
        parts[0], parts[1], parts[2], mean, rstd, var, geom.C, cfg.num_splits, eps, BLOCK_C=FINALIZE_BLOCK_C
    )
    LAUNCHES["stats"] += 1
    return mean, rstd, var


def normalize(x, geom, mean, scale, scale_is_var, eps, weight, bias, out=None, residual=None, relu=False):
    """y = (x - mean) * scale' * weight + bias where scale' = rstd, or rsqrt(scale + eps) if scale_is_var.

    With ``residual``
    (x's strides: see ``like``) and/or ``relu`` it is relu(... + residual), fused in the same pass.
    """
    cfg = launch_config(geom, x.device)
    y = torch.empty_like(x) if out is None else out
    kernels.normalize_kernel[(cfg.num_tiles * cfg.num_c_blocks,)](
        x,
        y,
        mean,
        scale,
        weight,
        bias,
        *_shape_args(geom),
        cfg.num_c_blocks,
        eps,
        ACC=_tl_acc(x.dtype),
        SCALE_IS_VAR=scale_is_var,
        HAS_W=weight is not None,
        HAS_B=bias is not None,
        **_tile_args(geom, cfg),
        RES=residual,
        HAS_RESIDUAL=residual is not None,
        RELU=relu,
    )
    LAUNCHES["normalize"] += 1
    return y


def update_running_stats(running_mean, running_var, mean, var, momentum, count, num_batches_tracked):
    """running <- (1 - f) running + f batch; f = momentum, or 1 / num_batches_tracked when given."""
    C = running_mean.numel()
    kernels.running_stats_kernel[_finalize_grid(C)](
        running_mean,
        running_var,
        mean,
        var,
        num_batches_tracked,
        C,
        0.0 if momentum is None else float(momentum),
        count / (count - 1) if count > 1 else float("nan"),
        CUMULATIVE=num_batches_tracked is not None,
        BLOCK_C=FINALIZE_BLOCK_C,
    )
    LAUNCHES["running_stats"] += 1


def grad_sums(
    dy, x, geom, mean, scale, scale_is_var, eps, dweight=None, dbias=None, *,
    relu=False, y=None, weight=None, bias=None, dz=None,
):
    """sum(dy) and sum(dy * xhat) per channel (acc dtype); also written to dweight/dbias if given.

    With ``relu``, dy is first masked by the fused ReLU: by y > 0 when ``y`` is given, else by the
    pre-activation recomputed from x, ``weight`` and ``bias``; the masked dy is written to ``dz`` if given.
    """
    recompute = relu and y is None
    cfg = launch_config(geom, x.device)
    acc = acc_dtype(x.dtype)
    parts = torch.empty((2, cfg.num_splits, geom.C), dtype=acc, device=x.device)
    kernels.grad_partials_kernel[(cfg.num_c_blocks, cfg.num_splits)](
        dy,
        x,
        mean,
        scale,
        parts[0],
        parts[1],
        *_shape_args(geom),
        cfg.num_tiles,
        cfg.num_splits,
        eps,
        SCALE_IS_VAR=scale_is_var,
        **_tile_args(geom, cfg),
        Y=y,
        W=weight if recompute else None,
        B=bias if recompute else None,
        DZ=dz,
        RELU=relu,
        MASK_FROM_Y=y is not None,
        HAS_W=recompute and weight is not None,
        HAS_B=recompute and bias is not None,
        STORE_DZ=dz is not None,
    )
    sums = torch.empty((2, geom.C), dtype=acc, device=x.device)
    kernels.grad_finalize_kernel[_finalize_grid(geom.C)](
        parts[0],
        parts[1],
        sums[0],
        sums[1],
        dweight,
        dbias,
        geom.C,
        cfg.num_splits,
        HAS_DW=dweight is not None,
        HAS_DB=dbias is not None,
        BLOCK_C=FINALIZE_BLOCK_C,
    )
    LAUNCHES["grad_sums"] += 1
    return sums[0], sums[1]


def grad_input(
    dy,
    x,
    geom,
    mean,
    rstd,
    weight,
    sum_dy,
    sum_dy_xhat,
    count=None,
    *,
    training=True,
    eps=0.0,
    relu=False,
    y=None,
    bias=None,
    dz=None,
    want_dx=True,
):
    """Training dx from the two per-channel sums (closed form in kernels/grad.py).

    ``count`` is the m of the closed form: values per channel behind the sums and statistics. It is
    this tensor's own (geom.per_channel) unless given; SyncBatchNorm passes the global batch's.

    ``training=False``: the eval dx, dy * weight * rsqrt(rstd + eps) with ``rstd`` holding
    running_var and no sums. ``relu``: dy is masked first, as in ``grad_sums`` (by y > 0 when ``y``
    is given, else recomputed from x, ``weight`` and ``bias``); the masked dy goes to ``dz`` if given.
    Returns dx, or None when ``want_dx`` is False (only dz wanted).
    """
    cfg = launch_config(geom, x.device)
    dx = torch.empty_like(x) if want_dx else None
    kernels.grad_input_kernel[(cfg.num_tiles * cfg.num_c_blocks,)](
        dy,
        x,
        dx,
        mean,
        rstd,
        weight,
        sum_dy,
        sum_dy_xhat,
        *_shape_args(geom),
        cfg.num_c_blocks,
        1.0 / (geom.per_channel if count is None else count),
        HAS_W=weight is not None,
        **_tile_args(geom, cfg),
        Y=y,
        B=bias if relu and y is None else None,
        DZ=dz,
        eps=eps,
        EVAL_ACC=_tl_acc(x.dtype),
        TRAINING=training,
        RELU=relu,
        MASK_FROM_Y=y is not None,
        HAS_B=relu and y is None and bias is not None,
        STORE_DZ=dz is not None,
        STORE_DX=want_dx,
    )
    LAUNCHES["grad_input"] += 1
    return dx
