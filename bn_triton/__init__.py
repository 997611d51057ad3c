"""bn_triton: batch normalization for PyTorch written in Triton.

The public names: ``batch_norm`` (a drop-in for torch.nn.functional.batch_norm), ``BatchNorm1d/2d/3d``,
``LazyBatchNorm1d/2d/3d`` and ``SyncBatchNorm`` (drop-ins for torch.nn's), ``FrozenBatchNorm2d`` (for
torchvision's), ``convert_batchnorm`` and ``fuse`` (a model's normalization layers replaced by ours,
with a report; ``fuse`` also fuses them with the ReLUs and adds that follow), and ``reference`` (the
float64 NumPy reference). The modules behind them, layer by layer:
docs/design.md.

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
from bn_triton.modules import (  # noqa: E402
    BatchNorm1d,
    BatchNorm2d,
    BatchNorm3d,
    BatchNormAct2d,
    FrozenBatchNorm2d,
    LazyBatchNorm1d,
    LazyBatchNorm2d,
    LazyBatchNorm3d,
)
from bn_triton.sync_batchnorm import SyncBatchNorm, SyncBatchNormAct  # noqa: E402

__version__ = "0.1.0"

__all__ = [
    "BatchNorm1d",
    "BatchNorm2d",
    "BatchNorm3d",
    "BatchNormAct2d",
    "FrozenBatchNorm2d",
    "LazyBatchNorm1d",
    "LazyBatchNorm2d",
    "LazyBatchNorm3d",
    "SyncBatchNorm",
    "SyncBatchNormAct",
    "batch_norm",
    "convert_batchnorm",
    "fuse",
    "reference",
    "__version__",
]
