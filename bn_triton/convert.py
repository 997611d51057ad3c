"""Converters: torch's BatchNorm layers inside a model replaced by ours, keeping their very tensors;
and a guard on torch's ``SyncBatchNorm.convert_sync_batchnorm``, which would drop our fused activations."""

import contextvars
import functools

import torch

from bn_triton.modules import BatchNorm1d, BatchNorm2d, BatchNorm3d, TritonBatchNormMixin

_REPLACEMENTS = {
    torch.nn.BatchNorm1d: BatchNorm1d,
    torch.nn.BatchNorm2d: BatchNorm2d,
    torch.nn.BatchNorm3d: BatchNorm3d,
}


def convert_layer(bn: torch.nn.Module, new_cls: type, **kwargs) -> torch.nn.Module:
    """A ``new_cls`` layer that holds exactly ``bn``'s Parameter and buffer objects, None included
    (optimizers and hooks that hold them stay valid), its train/eval mode, fused activation and qconfig.
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
    # Exactly bn's tensors, None included (named_buffers() skips None): no meta placeholder may stay.
    new._parameters.clear()
    new._buffers.clear()
    new._non_persistent_buffers_set.clear()
    for name, param in bn._parameters.items():
        new.register_parameter(name, param)
    for name, buf in bn._buffers.items():
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


# True while a guarded conversion runs: torch's converter recurses through the class attribute (the
# wrapper below), and the whole tree was checked at the top.
_converting = contextvars.ContextVar("bn_triton_converting", default=False)


def guard_torch_converter() -> None:
    """Make ``torch.nn.SyncBatchNorm.convert_sync_batchnorm`` refuse, before it changes anything, a
    module tree that holds one of our layers with a fused activation; idempotent."""
    original = torch.nn.SyncBatchNorm.convert_sync_batchnorm.__func__
    if getattr(original, "_bn_triton_guard", False):  # already wrapped (a second call, a re-import)
        return

    @functools.wraps(original)
    def convert_sync_batchnorm(cls, module, process_group=None):
        if _converting.get():
            return original(cls, module, process_group)
        fused = [
            repr(name) if name else "given"
            for name, m in module.named_modules()
            if isinstance(m, TritonBatchNormMixin) and m.activation is not None
        ]
        if fused:
            raise RuntimeError(
                "torch.nn.SyncBatchNorm.convert_sync_batchnorm would drop the fused activation of the bn_triton "
                f"layer(s) {', '.join(fused)} (the model would then compute something else, silently): use "
                "bn_triton.SyncBatchNorm.convert_sync_batchnorm, which keeps it. Nothing was converted."
            )
        token = _converting.set(True)
        try:
            return original(cls, module, process_group)
        finally:
            _converting.reset(token)

    convert_sync_batchnorm._bn_triton_guard = True
    torch.nn.SyncBatchNorm.convert_sync_batchnorm = classmethod(convert_sync_batchnorm)


# Our layers subclass torch's BatchNorm, so torch's converter (the first line of DDP scripts) would
# silently turn a fused BN + ReLU into a plain SyncBatchNorm: it refuses such models instead.
guard_torch_converter()
