"""bn_triton: batch normalization for PyTorch written in Triton.

Layers of the stack, one module each:
  bn_triton.kernels     @triton.jit kernels (the repo's kernels/ folder)
  bn_triton._config     launch settings (tiles, split factor, warps)
  bn_triton.launch      launchers: layouts, allocation, grids
  bn_triton.ops         torch.library custom ops + autograd
  bn_triton.functional  batch_norm (drop-in for torch.nn.functional.batch_norm)
  bn_triton.modules     BatchNorm1d/2d/3d (drop-ins for torch.nn's)
  bn_triton.convert     convert_batchnorm: a model's torch BatchNorm layers replaced by ours
  bn_triton.reference   NumPy float64 reference (the three-path derivation of docs/math.md)
  bn_triton.sync_batchnorm  SyncBatchNorm: global-batch statistics over torch.distributed

The kernels are loaded first (bn_triton._loader): from bn_triton/kernels/ in an installed wheel, or
from the kernels/ folder beside bn_triton/ in a clone, so that both commands run from a clone whether
or not a wheel is installed. The derivation behind the kernels and the reference: docs/math.md.
"""

import sys

from bn_triton import _loader

_loader.load_kernels(sys.modules[__name__])

from bn_triton import reference  # noqa: E402
from bn_triton.convert import convert_batchnorm  # noqa: E402
from bn_triton.functional import batch_norm  # noqa: E402
from bn_triton.fuse import fuse  # noqa: E402
from bn_triton.modules import BatchNorm1d, BatchNorm2d, BatchNorm3d  # noqa: E402
from bn_triton.sync_batchnorm import SyncBatchNorm  # noqa: E402

__version__ = "0.1.0"

__all__ = [
    "BatchNorm1d",
    "BatchNorm2d",
    "BatchNorm3d",
    "SyncBatchNorm",
    "batch_norm",
    "convert_batchnorm",
    "fuse",
    "reference",
    "__version__",
]
