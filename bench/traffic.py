"""The minimal-traffic model behind every GB/s number the benchmark reports.

For a tensor of B bytes (N·C·spatial elements times the element size), the fewest DRAM bytes a
batch norm pass moves when the tensor does not fit on chip (shared/docs/bn-math.md):

  train_fwd  3B   read x for the batch statistics, read x again to normalize, write y
  eval_fwd   2B   read x, write y (statistics are given)
  bwd        5B   read x and dy for the two per-channel sums, read them again and write dx
  fwd_bwd    8B   the two above: 3B + 5B

Per-channel vectors (weight, bias, running statistics, the saved mean/rstd: O(C) floats) are
left out: against N·spatial values per channel they are far below 1% in every suite shape.
Effective GB/s = model bytes / median time. A kernel that re-reads more than the model says, or
an implementation that writes extra tensors, shows up as lower GB/s; none can beat the model
except by keeping data on chip across passes.
"""

import torch

TRAFFIC_FACTOR = {"train_fwd": 3, "eval_fwd": 2, "bwd": 5, "fwd_bwd": 8}


def tensor_bytes(dims, dtype: torch.dtype) -> int:
    n = 1
    for d in dims:
        n *= int(d)
    return n * torch.empty((), dtype=dtype).element_size()


def model_bytes(pass_name: str, dims, dtype: torch.dtype) -> int:
    """Minimal DRAM bytes of one pass over a tensor of shape ``dims`` and ``dtype``."""
    if pass_name not in TRAFFIC_FACTOR:
        raise ValueError(f"unknown pass {pass_name!r}; choose from {', '.join(TRAFFIC_FACTOR)}")
    return TRAFFIC_FACTOR[pass_name] * tensor_bytes(dims, dtype)


def gbps(nbytes: int, ms: float) -> float:
    """Bytes moved in ``ms`` milliseconds, as GB/s (10^9 bytes per second)."""
    return nbytes / (ms * 1e-3) / 1e9


def copy_gbps(nbytes_copied: int, ms: float) -> float:
    """Device-to-device copy bandwidth: each copied byte is read once and written once."""
    return gbps(2 * nbytes_copied, ms)


def fraction_of(value_gbps: float, reference_gbps: float) -> float:
    """value as a fraction of the reference bandwidth (0.8 = 80% of the copy bandwidth)."""
    return value_gbps / reference_gbps
