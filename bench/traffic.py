"""The minimal-traffic model behind every GB/s number the benchmark reports.

For a tensor of B bytes (N·C·spatial elements times the element size), the fewest DRAM bytes a pass
moves when the tensor does not fit on chip (derivation: docs/math.md):

  batch norm           train_fwd 3B  read x for the statistics, read x again, write y
                       eval_fwd  2B  read x, write y
                       bwd       5B  read x and dy for the two per-channel sums, read them again, write dx
                       fwd_bwd   8B  3B + 5B
  BN -> add -> ReLU    train_fwd 4B  read x (statistics), read x and the residual r, write y
  (fused rows)         eval_fwd  3B  read x and r, write y
                       bwd       7B  read dy, x, y for the sums; write g = dy * (y > 0), which is
                                     d(residual); read g and x, write dx
                       fwd_bwd  11B
  BN -> SiLU           3B, 2B, 5B, 8B: batch norm's bytes, SiLU applied on the way out, its derivative
  (silu_ rows)         recomputed in the backward from x, which the backward reads anyway
  BN -> Hardswish      3B, 2B, 5B, 8B: likewise
  (hardswish_ rows)

Per-channel vectors (weight, bias, running and saved statistics: O(C) floats) are left out: below 1%
of the bytes in every suite shape. The unfused composition (BN, add, ReLU as three ops) moves at
least 16B per fwd_bwd, BN then SiLU or Hardswish as two ops 2B more forward and 3B more backward
(13B per fwd_bwd): every row's GB/s uses the fused model of its workload, for every implementation.
"""

import math

import torch

TRAFFIC_FACTOR = {"train_fwd": 3, "eval_fwd": 2, "bwd": 5, "fwd_bwd": 8}
FUSED_TRAFFIC_FACTOR = {"train_fwd": 4, "eval_fwd": 3, "bwd": 7, "fwd_bwd": 11}
SILU_TRAFFIC_FACTOR = dict(TRAFFIC_FACTOR)
HARDSWISH_TRAFFIC_FACTOR = dict(TRAFFIC_FACTOR)


def tensor_bytes(dims, dtype: torch.dtype) -> int:
    return math.prod(dims) * dtype.itemsize


def model_bytes(pass_name: str, dims, dtype: torch.dtype, factors: dict = TRAFFIC_FACTOR) -> int:
    """Minimal DRAM bytes of one pass over a tensor of shape ``dims`` and ``dtype``."""
    if pass_name not in factors:
        raise ValueError(f"unknown pass {pass_name!r}; choose from {', '.join(factors)}")
    return factors[pass_name] * tensor_bytes(dims, dtype)


def gbps(nbytes: int, ms: float) -> float:
    """Bytes moved in ``ms`` milliseconds, as GB/s (10^9 bytes per second)."""
    return nbytes / (ms * 1e-3) / 1e9


def copy_gbps(nbytes_copied: int, ms: float) -> float:
    """Device-to-device copy bandwidth: each copied byte is read once and written once."""
    return gbps(2 * nbytes_copied, ms)
