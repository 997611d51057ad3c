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

Per-channel vectors (weight, bias, running and saved statistics: O(C) floats) are left out: below 1%
of the bytes in every suite shape. The unfused composition (BN, add, ReLU as three ops) moves at
least 16B per fwd_bwd; the fused rows' GB/s always use the fused model, for every implementation.
"""

import math

import torch

TRAFFIC_FACTOR = {"train_fwd": 3, "eval_fwd": 2, "bwd": 5, "fwd_bwd": 8}
FUSED_TRAFFIC_FACTOR = {"train_fwd": 4, "eval_fwd": 3, "bwd": 7, "fwd_bwd": 11}


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
