"""Triton kernels of bn_triton (shipped in the wheel as ``bn_triton.kernels``).

Every kernel sees its tensor as a (R, C, S) view — rows, channels, spatial — through two strides,
with the contiguous axis named by the ``CHANNELS_CONTIG`` flag:

* spatial-contiguous (NCHW, NCL, NCDHW):  offset = r * stride_r + c * stride_c + s   (R = N)
* channel-contiguous (channels_last, 2-D): offset = r * stride_r + c                 (R = N * spatial, S = 1)

so one kernel serves both layouts and every load runs along the contiguous axis.

Files, one job each:
  tile.py       tile indexing, split ranges, per-lane Welford, the Chan merge, the last-program ticket
  stats.py      batch statistics in one launch (split reduction, merged by its last program, running
                statistics updated there too); the running-stat update on its own
  normalize.py  y = (x - mean) * rstd * weight + bias (train and eval), with the fused add + ReLU
  grad.py       sum(dy), sum(dy * xhat) in one launch (dweight, dbias); dx
  single_pass.py  the training forward and backward in one launch each, where one program owns a
                channel block (many channels, small maps): the same code as the above, one split
  activation.py the fused epilogue's activations and their derivatives, one table under one ACT
                constexpr, with torch's values at the kinks, NaN and +-inf

Reductions are deterministic: partials are merged by one program in a fixed order, and the only
atomic is an integer ticket that picks that program.
"""

from .grad import grad_input_kernel, grad_sums_kernel
from .normalize import normalize_kernel
from .single_pass import backward_kernel, forward_kernel
from .stats import running_stats_kernel, stats_kernel

__all__ = [
    "backward_kernel",
    "forward_kernel",
    "grad_input_kernel",
    "grad_sums_kernel",
    "normalize_kernel",
    "running_stats_kernel",
    "stats_kernel",
]
