"""Drop-in modules: torch.nn.BatchNorm1d/2d/3d with our kernels in forward.

They subclass torch's classes, so constructor arguments and defaults, parameters, buffers,
state_dict keys, ``_check_input_dim`` and isinstance checks are torch's. Only ``forward`` changes:
validation comes before ``num_batches_tracked`` moves, and momentum=None reads the cumulative factor
1 / num_batches_tracked on the device (torch calls ``.item()``, a host sync and a graph break).

Fused epilogue: ``activation="relu"`` in the constructor and ``forward(input, residual=None)`` give
``act(BN(input) + residual)`` in one normalize pass. ``activation`` is a plain attribute, not a
parameter or buffer, so state_dicts stay torch's; with the defaults the modules are exact drop-ins.
"""

import torch
from torch import Tensor

from bn_triton import composite, functional
from bn_triton.running import Running


class TritonBatchNormMixin:
    """Mixin placed before torch's _BatchNorm subclass in the MRO; replaces forward only."""

    activation = None  # class default: instances unpickled from before the fused epilogue existed

    def __init__(self, *args, activation=None, **kwargs):
        """torch's constructor arguments, plus keyword-only ``activation`` (None or "relu")."""
        functional.check_fused(torch.empty(0), activation, None)  # unknown names fail at construction
        super().__init__(*args, **kwargs)
        self.activation = activation

    def extra_repr(self) -> str:
        base = super().extra_repr()
        return base if self.activation is None else f"{base}, activation={self.activation!r}"

    def forward(self, input: Tensor, residual=None) -> Tensor:
        self._check_input_dim(input)
        # Before anything runs or num_batches_tracked moves, on every path.
        functional.check_fused(input, self.activation, residual)
        if not functional.uses_triton(input):
            return composite.epilogue(super().forward(input), self.activation, residual)
        # Eval with track_running_stats=False normalizes with batch statistics, as torch does.
        bn_training = self.training or (self.running_mean is None and self.running_var is None)
        use_running = not self.training or self.track_running_stats
        running_mean = self.running_mean if use_running else None
        running_var = self.running_var if use_running else None
        args = (input, running_mean, running_var, self.weight, self.bias, bn_training)
        fused = dict(activation=self.activation, residual=residual)
        functional.check_inputs(*args, **fused, eps=self.eps)
        # Counted by our statistics kernel, on the device, in the same launch (torch: an add_).
        num_batches = None
        if self.training and self.track_running_stats and self.num_batches_tracked is not None:
            num_batches = self.num_batches_tracked
        running = Running(running_mean, running_var, self.momentum, num_batches)
        return functional._batch_norm(input, self.weight, self.bias, bn_training, self.eps, running, **fused)


class BatchNorm1d(TritonBatchNormMixin, torch.nn.BatchNorm1d):
    """torch.nn.BatchNorm1d on (N, C) or (N, C, L), computed by bn_triton's kernels."""


class BatchNorm2d(TritonBatchNormMixin, torch.nn.BatchNorm2d):
    """torch.nn.BatchNorm2d on (N, C, H, W), contiguous or channels_last, computed by bn_triton's kernels."""


class BatchNorm3d(TritonBatchNormMixin, torch.nn.BatchNorm3d):
    """torch.nn.BatchNorm3d on (N, C, D, H, W), contiguous or channels_last_3d, computed by bn_triton's kernels."""


_REPLACEMENTS = {
    torch.nn.BatchNorm1d: BatchNorm1d,
    torch.nn.BatchNorm2d: BatchNorm2d,
    torch.nn.BatchNorm3d: BatchNorm3d,
}


def convert_layer(bn: torch.nn.Module, new_cls: type, **kwargs) -> torch.nn.Module:
    """A ``new_cls`` layer that holds ``bn``'s very Parameter and buffer objects (optimizers and hooks
    that hold them stay valid), its train/eval mode, its fused activation and qconfig, if any.
    ``kwargs`` go to ``new_cls``'s constructor (SyncBatchNorm's process_group)."""
    new = new_cls(
        bn.num_features,
        eps=bn.eps,
        momentum=bn.momentum,
        affine=bn.affine,
        track_running_stats=bn.track_running_stats,
        device="meta",  # placeholders only: replaced just below by the layer's own tensors
        **kwargs,
    )
    for name in ("weight", "bias"):
        setattr(new, name, getattr(bn, name))
    for name, buf in bn.named_buffers(recurse=False):
        new.register_buffer(name, buf, persistent=name not in bn._non_persistent_buffers_set)
    new.train(bn.training)
    if getattr(bn, "activation", None) is not None:  # our layers' fused ReLU: keep it
        new.activation = bn.activation
    if hasattr(bn, "qconfig"):
        new.qconfig = bn.qconfig
    return new


def convert_batchnorm(module: torch.nn.Module) -> torch.nn.Module:
    """Replace every torch.nn.BatchNorm1d/2d/3d inside ``module`` by ours, in place; returns the module.

    Parameters and buffers are kept as the same objects (device, dtype, requires_grad, values), and
    so is each layer's train/eval mode. Subclasses of torch's classes (SyncBatchNorm, ours, users'
    own) are left alone: their behaviour may differ.
    """
    if type(module) in _REPLACEMENTS:
        return convert_layer(module, _REPLACEMENTS[type(module)])
    for name, child in module.named_children():
        setattr(module, name, convert_batchnorm(child))
    return module
