"""Drop-in modules: torch.nn.BatchNorm1d/2d/3d with our kernels in forward.

They subclass torch's classes, so constructor arguments and defaults, parameters, buffers,
state_dict keys, ``_check_input_dim`` and isinstance checks are torch's. Only ``forward`` changes:
validation comes before ``num_batches_tracked`` moves, and momentum=None reads the cumulative factor
1 / num_batches_tracked on the device (torch calls ``.item()``, a host sync and a graph break).

Fused epilogue: ``activation=`` in the constructor (a name such as "silu", or an instance of
torch's activation module: bn_triton/activations.py) and ``forward(input, residual=None)`` give
``act(BN(input) + residual)`` in one normalize pass. ``activation`` is a plain attribute, not a
parameter or buffer, so state_dicts stay torch's; with the defaults the modules are exact drop-ins.

LazyBatchNorm1d/2d/3d are torch's lazy layers (num_features inferred from the first input) that
become our BatchNorm1d/2d/3d at their first forward, which our kernels compute already.

FrozenBatchNorm2d is torchvision's (torchvision.ops.misc): fixed statistics and affine parameters,
all four buffers, computed by our eval kernels in training and eval alike.

torch.fx records each layer as one ``call_module`` node (a leaf, as torch's own layers are), whatever
the tracer's leaf rule. TorchScript is refused with an error that names what to use instead.
"""

import functools

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


class NormActMixin:
    """timm's norm + activation layers (its BatchNormAct2d, SyncBatchNormAct): the BatchNorm, then the
    child ``drop``, then the child ``act``, as timm computes them. Where ``drop`` is the identity
    (nn.Identity, or a dropout at rate 0: activations.is_identity) and the activation table
    (bn_triton/activations.py) has ``act``, the activation is fused into the layer's kernels
    (``activation``) and ``act`` is kept, not called; else both run after the layer, unless
    ``activation`` is set: ``bn_triton.fuse`` sets it on a layer whose drop and act are identities (timm's
    ``apply_act=False``) to the activation that followed the layer in the model, which then runs in
    the layer and drop and act (identities) are not called. ``drop`` and ``act`` hold no tensors of the
    layer's: the state_dict is timm's."""

    def __init__(self, *args, drop=None, act=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.drop = torch.nn.Identity() if drop is None else drop
        self.act = torch.nn.Identity() if act is None else act
        self.activation = activations.of_module(self.act) if activations.is_identity(self.drop) else None

    def forward(self, input: Tensor, residual=None) -> Tensor:
        if isinstance(input, torch.fx.Proxy):
            return fx_leaf(self, input, residual)
        y = super().forward(input, residual)
        if self.activation is None:  # not fused: timm's order
            y = self.act(self.drop(y))
        return y


class BatchNormAct2d(NormActMixin, BatchNorm2d):
    """timm's BatchNormAct2d (timm.layers.norm_act) computed by our kernels, its activation fused where
    it can be (NormActMixin). ``drop`` and ``act``: the modules timm's layer holds (default identity)."""


OWN_CLASSES = {BatchNorm1d, BatchNorm2d, BatchNorm3d, BatchNormAct2d}  # and SyncBatchNorm (sync_batchnorm.py)


class _LazyMixin:
    """Placed between TritonBatchNormMixin and torch's lazy class: the first call's ``residual`` is
    no input of torch's parameter inference."""

    def initialize_parameters(self, input, residual=None) -> None:
        super().initialize_parameters(input)


class LazyBatchNorm1d(TritonBatchNormMixin, _LazyMixin, torch.nn.LazyBatchNorm1d):
    """torch.nn.LazyBatchNorm1d that becomes our BatchNorm1d at its first forward (computed by our kernels)."""

    cls_to_become = BatchNorm1d


class LazyBatchNorm2d(TritonBatchNormMixin, _LazyMixin, torch.nn.LazyBatchNorm2d):
    """torch.nn.LazyBatchNorm2d that becomes our BatchNorm2d at its first forward (computed by our kernels)."""

    cls_to_become = BatchNorm2d


class LazyBatchNorm3d(TritonBatchNormMixin, _LazyMixin, torch.nn.LazyBatchNorm3d):
    """torch.nn.LazyBatchNorm3d that becomes our BatchNorm3d at its first forward (computed by our kernels)."""

    cls_to_become = BatchNorm3d


class FrozenBatchNorm2d(torch.nn.Module):
    """torchvision.ops.misc.FrozenBatchNorm2d computed by our eval kernels.

    Same constructor (``num_features``, ``eps=1e-5``), buffers ``weight``, ``bias``, ``running_mean``,
    ``running_var`` (no parameters), state_dict and repr; a state_dict with ``num_batches_tracked``
    (a BatchNorm2d's) loads with that key dropped, as torchvision's does. ``forward`` takes (N, C, H, W)
    and returns ``(x - running_mean) * rsqrt(running_var + eps) * weight + bias`` in training and eval
    alike, in the dtype torchvision's formula gives: x's and the buffers' promoted together (a float16
    input with float32 buffers: a float32 output). Not a torch BatchNorm subclass, as torchvision's is
    not: SyncBatchNorm's converters leave it frozen.
    """

    def __init__(self, num_features: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.register_buffer("weight", torch.ones(num_features))
        self.register_buffer("bias", torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        state_dict.pop(prefix + "num_batches_tracked", None)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def __prepare_scriptable__(self):
        raise RuntimeError(functional.NO_TORCHSCRIPT.format(how="torch.jit.script", name=type(self).__name__))

    def forward(self, x: Tensor) -> Tensor:
        if isinstance(x, torch.fx.Proxy):
            return fx_leaf(self, x, None)
        if x.dim() != 4:
            raise ValueError(f"expected 4D input (got {x.dim()}D input)")
        tensors = self.running_mean, self.running_var, self.weight, self.bias
        dtype = functools.reduce(torch.promote_types, (t.dtype for t in tensors), x.dtype)
        rm, rv, w, b = (t.to(dtype) for t in tensors)
        return functional.batch_norm(x.to(dtype), rm, rv, w, b, training=False, eps=self.eps)

    def __repr__(self) -> str:
        return f"{self.__class__.__name__}({self.weight.shape[0]}, eps={self.eps})"
