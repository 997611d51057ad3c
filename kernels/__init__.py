"""Triton kernels of bn_triton (shipped in the wheel as ``bn_triton.kernels``).

Every kernel sees its tensor as a (R, C, S) view — rows, channels, spatial — through two strides,
with the contiguous axis named by the ``CHANNELS_CONTIG`` flag:

* spatial-contiguous (NCHW, NCL, NCDHW):  offset = r * stride_r + c * stride_c + s   (R = N)
* channel-contiguous (channels_last, 2-D): offset = r * stride_r + c                 (R = N * spatial, S = 1)

so one kernel serves both layouts and every load runs along the contiguous axis.

Files, one job each:
  tile.py       the shared tile indexing and the Chan/Welford merge
  stats.py      split reduction of (count, mean, M2) partials; finalize; running-stat update
  normalize.py  y = (x - mean) * rstd * weight + bias (train and eval)
  grad.py       split reduction of sum(dy), sum(dy * xhat); finalize into dweight/dbias; dx
"""

from .grad import grad_finalize_kernel, grad_input_kernel, grad_partials_kernel
from .normalize import normalize_kernel
from .stats import running_stats_kernel, stats_finalize_kernel, stats_partials_kernel

__all__ = [
    "grad_finalize_kernel",
    "grad_input_kernel",
    "grad_partials_kernel",
    "normalize_kernel",
    "running_stats_kernel",
    "stats_finalize_kernel",
    "stats_partials_kernel",
]
