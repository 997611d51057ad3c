"""Converters: torch's BatchNorm layers inside a model replaced by ours, keeping their very tensors."""

import torch

from bn_triton.modules import BatchNorm1d, BatchNorm2d, BatchNorm3d

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
