"""Drop-in modules: torch.nn.BatchNorm1d/2d/3d with our kernels in forward.

They subclass torch's classes, so constructor arguments and defaults, parameters, buffers,
state_dict keys, ``_check_input_dim`` and isinstance checks are torch's. Only ``forward`` changes:
validation comes before ``num_batches_tracked`` moves, and momentum=None reads the cumulative factor
1 / num_batches_tracked on the device (torch calls ``.item()``, a host sync and a graph break).

Fused epilogue: ``activation=`` in the constructor (a name such as "silu", or an instance of
torch's activation module: bn_triton/activations.py) and ``forward(input, residual=None)`` give
``act(BN(input) + residual)`` in one normalize pass. ``activation`` is a plain attribute, not a
parameter or buffer, so state_dicts stay torch's; with the defaults the modules are exact drop-ins.

torch.fx records each layer as one ``call_module`` node (a leaf, as torch's own layers are), whatever
the tracer's leaf rule. TorchScript is refused with an error that names what to use instead.
"""

import torch
from torch import Tensor

from bn_triton import activations, functional


class TritonBatchNormMixin:
    """Mixin placed before torch's _BatchNorm subclass in the MRO; replaces forward only."""

    activation = None  # class default: instances unpickled from before the fused epilogue existed

    def __init__(self, *args, activation=None, **kwargs):
        """torch's constructor arguments, plus keyword-only ``activation`` (None, a name, or an instance
        of torch's activation module; bn_triton/activations.py)."""
        activation = activations.canonical(activation)  # unsupported ones fail at construction
        super().__init__(*args, **kwargs)
        self.activation = activation

    def __setattr__(self, name, value):
        # ``activation`` is kept as its canonical string, however it is set (a module would otherwise
        # become a child and change what the layer holds).
        if name == "activation":
            value = activations.canonical(value)
        super().__setattr__(name, value)

    def extra_repr(self) -> str:
        base = super().extra_repr()
        return base if self.activation is None else f"{base}, activation={self.activation!r}"

    def __prepare_scriptable__(self):
        raise RuntimeError(functional.NO_TORCHSCRIPT.format(how="torch.jit.script", name=type(self).__name__))

    def forward(self, input: Tensor, residual=None) -> Tensor:
        if isinstance(input, torch.fx.Proxy):
            return fx_leaf(self, input, residual)
        if type(self) in OWN_CLASSES:  # the tensors straight from the dicts that nn.Module.__getattr__ reads
            p, b = self._parameters, self._buffers
            try:
                tensors = p["weight"], p["bias"], b["running_mean"], b["running_var"], b["num_batches_tracked"]
            except KeyError:  # one deleted: torch's AttributeError below
                tensors = self.weight, self.bias, self.running_mean, self.running_var, self.num_batches_tracked
        else:  # a subclass may define any of them as a property
            tensors = self.weight, self.bias, self.running_mean, self.running_var, self.num_batches_tracked
        return functional.layer(self, input, residual, *tensors)


def fx_leaf(module, input, residual):
    """The ``call_module`` node that torch.fx records for ``module(input, residual=residual)``."""
    tracer = input.tracer
    kwargs = {} if residual is None else {"residual": residual}
    return tracer.create_proxy("call_module", tracer.path_of_module(module), (input,), kwargs)


class BatchNorm1d(TritonBatchNormMixin, torch.nn.BatchNorm1d):
    """torch.nn.BatchNorm1d on (N, C) or (N, C, L), computed by bn_triton's kernels."""


class BatchNorm2d(TritonBatchNormMixin, torch.nn.BatchNorm2d):
    """torch.nn.BatchNorm2d on (N, C, H, W), contiguous or channels_last, computed by bn_triton's kernels."""


class BatchNorm3d(TritonBatchNormMixin, torch.nn.BatchNorm3d):
    """torch.nn.BatchNorm3d on (N, C, D, H, W), contiguous or channels_last_3d, computed by bn_triton's kernels."""


OWN_CLASSES = {BatchNorm1d, BatchNorm2d, BatchNorm3d}  # and SyncBatchNorm (bn_triton/sync_batchnorm.py)
