"""Converters: the normalization layers inside a model replaced by ours, keeping their very tensors,
with a report of what was converted, kept and left; and guards on torch's tools that would drop our
fused activations: ``SyncBatchNorm.convert_sync_batchnorm``, the conv/linear + BatchNorm folds of
``torch.nn.utils.fusion`` and torch.ao.quantization's module fusers (which also learn our plain layers)."""

import collections
import contextvars
import dataclasses
import functools
import sys
import warnings

import torch
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.lazy import LazyModuleMixin

from bn_triton.modules import (
    BatchNorm1d,
    BatchNorm2d,
    BatchNorm3d,
    BatchNormAct2d,
    FrozenBatchNorm2d,
    LazyBatchNorm1d,
    LazyBatchNorm2d,
    LazyBatchNorm3d,
    NormActMixin,
    TritonBatchNormMixin,
)

_REPLACEMENTS = {
    torch.nn.BatchNorm1d: BatchNorm1d,
    torch.nn.BatchNorm2d: BatchNorm2d,
    torch.nn.BatchNorm3d: BatchNorm3d,
    torch.nn.LazyBatchNorm1d: LazyBatchNorm1d,
    torch.nn.LazyBatchNorm2d: LazyBatchNorm2d,
    torch.nn.LazyBatchNorm3d: LazyBatchNorm3d,
}
_TORCHS = {BatchNorm1d: torch.nn.BatchNorm1d, BatchNorm2d: torch.nn.BatchNorm2d, BatchNorm3d: torch.nn.BatchNorm3d}


def _take_tensors(new: torch.nn.Module, old: torch.nn.Module) -> None:
    """``new`` holds exactly ``old``'s Parameter and buffer objects, None included (named_buffers()
    skips None), with their persistence: no placeholder of its own constructor may stay."""
    new._parameters.clear()
    new._buffers.clear()
    new._non_persistent_buffers_set.clear()
    for name, param in old._parameters.items():
        new.register_parameter(name, param)
    for name, buf in old._buffers.items():
        new.register_buffer(name, buf, persistent=name not in old._non_persistent_buffers_set)


def convert_layer(bn: torch.nn.Module, new_cls: type, **kwargs) -> torch.nn.Module:
    """A ``new_cls`` layer that holds exactly ``bn``'s Parameter and buffer objects, None included
    (optimizers and hooks that hold them stay valid), its train/eval mode, fused activation and qconfig.
    ``kwargs`` go to ``new_cls``'s constructor (SyncBatchNorm's process_group). A lazy ``new_cls``
    takes no num_features: it keeps ``bn``'s (0 until the first forward) and its uninitialized tensors."""
    lazy = issubclass(new_cls, LazyModuleMixin)
    new = new_cls(
        *(() if lazy else (bn.num_features,)),
        eps=bn.eps,
        momentum=bn.momentum,
        affine=bn.affine,
        track_running_stats=bn.track_running_stats,
        device="meta",  # placeholders only: replaced just below by the layer's own tensors
        **kwargs,
    )
    if lazy:
        new.num_features = bn.num_features
    _take_tensors(new, bn)
    new.train(bn.training)
    if getattr(bn, "activation", None) is not None:  # our layers' fused activation: keep it
        new.activation = bn.activation
    if hasattr(bn, "qconfig"):
        new.qconfig = bn.qconfig
    return new


def _convert_frozen(layer: torch.nn.Module) -> FrozenBatchNorm2d:
    """Our FrozenBatchNorm2d holding exactly torchvision's layer's buffers, eps and mode."""
    new = FrozenBatchNorm2d(0, eps=layer.eps)
    _take_tensors(new, layer)
    new.train(layer.training)
    return new


def _convert_norm_act(layer: torch.nn.Module) -> BatchNormAct2d:
    """Our BatchNormAct2d holding exactly timm's layer's tensors, and its very drop and act modules."""
    return convert_layer(layer, BatchNormAct2d, drop=layer.drop, act=layer.act)


# Other libraries' normalization layers, recognized by their class's module and qualified name (the
# library is never imported): (module, qualname) -> the converter of a layer of exactly that class.
_FOREIGN = {
    ("torchvision.ops.misc", "FrozenBatchNorm2d"): _convert_frozen,
    ("timm.layers.norm_act", "BatchNormAct2d"): _convert_norm_act,
}
# timm's synchronized norm + activation layer: kept by convert_batchnorm as torch's SyncBatchNorm is.
_TIMM_SYNC_NORM_ACT = ("timm.layers.norm_act", "SyncBatchNormAct")


def is_norm_act(layer: torch.nn.Module) -> bool:
    """Whether ``layer`` is a norm + activation layer: timm's BatchNormAct2d or SyncBatchNormAct
    (exactly these classes), or ours (modules.NormActMixin)."""
    key = (type(layer).__module__, type(layer).__qualname__)
    return isinstance(layer, NormActMixin) or key in (("timm.layers.norm_act", "BatchNormAct2d"), _TIMM_SYNC_NORM_ACT)
SYNC_KEPT = (
    "torch.nn.SyncBatchNorm, statistics over the process group: "
    "bn_triton.SyncBatchNorm.convert_sync_batchnorm converts it"
)
OURS_KEPT = "already bn_triton's"


@dataclasses.dataclass
class ConversionReport:
    """What ``convert_batchnorm`` did with each normalization layer, as (name in named_modules(), text):

    ``converted``: "old class -> new class"; ``kept``: layers that need no conversion and why (ours
    already, torch's SyncBatchNorm); ``left``: layers still computed by their own class, and why
    (each named in the call's warning).
    """

    converted: list = dataclasses.field(default_factory=list)
    kept: list = dataclasses.field(default_factory=list)
    left: list = dataclasses.field(default_factory=list)

    def __str__(self) -> str:
        total = len(self.converted) + len(self.kept) + len(self.left)
        parts = [f"converted {len(self.converted)} of {total} normalization layers"]
        if self.converted:
            parts[0] += f": {_grouped(self.converted)}"
        for label, entries in (("kept", self.kept), ("left", self.left)):
            if entries:
                parts.append(f"{label} {len(entries)}: {_grouped(entries)}")
        return "; ".join(parts)


def _shown(name: str) -> str:
    return repr(name) if name else "the given module"


def _grouped(entries: list) -> str:
    """(name, text) pairs as "'a', 'b' (text); ..." (one group per text, in first-seen order)."""
    groups = collections.defaultdict(list)
    for name, text in entries:
        groups[text].append(_shown(name))
    return "; ".join(f"{', '.join(names)} ({text})" for text, names in groups.items())


def _class_name(cls: type) -> str:
    """A class as users write it: torch.nn.BatchNorm2d, bn_triton.BatchNorm2d, else module.qualname."""
    if getattr(torch.nn, cls.__name__, None) is cls:
        return f"torch.nn.{cls.__name__}"
    if cls.__module__.startswith("bn_triton."):
        return f"bn_triton.{cls.__qualname__}"
    return f"{cls.__module__}.{cls.__qualname__}"


def _is_foreign(cls: type) -> bool:
    return (cls.__module__, cls.__qualname__) in _FOREIGN


def _why_left(cls: type) -> str:
    """Why a layer of ``cls`` (a torch BatchNorm class or subclass, or a subclass of a foreign class
    in _FOREIGN) cannot be converted exactly."""
    base = next(c for c in cls.__mro__ if c.__module__.startswith("torch.") or _is_foreign(c))
    if base is cls:
        return f"{_class_name(cls)} is not a class bn_triton converts"
    own = cls.__mro__[: cls.__mro__.index(base)]
    if any("forward" in vars(c) for c in own):
        return f"{_class_name(cls)} is a subclass of {_class_name(base)} that defines its own forward"
    return f"{_class_name(cls)} is a subclass of {_class_name(base)}: ours would drop its class's own code"


def _verdict(layer: torch.nn.Module):
    """("convert", converter), ("kept", why), ("left", why), or (None, None): not a normalization layer."""
    cls = type(layer)
    if cls in _REPLACEMENTS:
        return "convert", functools.partial(convert_layer, new_cls=_REPLACEMENTS[cls])
    if _is_foreign(cls):
        return "convert", _FOREIGN[(cls.__module__, cls.__qualname__)]
    if isinstance(layer, (TritonBatchNormMixin, FrozenBatchNorm2d)):
        return "kept", OURS_KEPT
    if cls is torch.nn.SyncBatchNorm or (cls.__module__, cls.__qualname__) == _TIMM_SYNC_NORM_ACT:
        return "kept", SYNC_KEPT
    if isinstance(layer, _BatchNorm) or any(_is_foreign(c) for c in cls.__mro__):
        return "left", _why_left(cls)
    return None, None


def convert_batchnorm(module: torch.nn.Module) -> torch.nn.Module:
    """Replace the normalization layers inside ``module`` by ours, in place; returns the module.

    Converted: torch.nn.BatchNorm1d/2d/3d (exactly these classes) to our BatchNorm1d/2d/3d;
    torchvision's FrozenBatchNorm2d (torchvision.ops.misc, recognized by module and name) to our
    FrozenBatchNorm2d; torch's LazyBatchNorm1d/2d/3d to our LazyBatchNorm1d/2d/3d. A lazy layer is
    converted as it is, before or after loading a state_dict: ours holds its very (uninitialized)
    tensors, computes from its first forward on, and then becomes our BatchNorm1d/2d/3d, its tensors
    materialized in place. (A torch lazy layer that has run forward is a torch.nn.BatchNorm*d, its
    ``cls_to_become``, and is converted as one.) Parameters and buffers are kept as the same objects
    (device, dtype, requires_grad, values), and so is each layer's train/eval mode; a layer shared by
    several parents stays one layer.

    Kept, with no warning: our own layers, and torch.nn.SyncBatchNorm (statistics over the process
    group, which our plain layers would not compute: ``bn_triton.SyncBatchNorm.convert_sync_batchnorm``
    converts it). Left, with one UserWarning per call naming each and why: every other subclass of
    torch's BatchNorm classes (a user's subclass, which may override forward or add code that ours
    would drop; torch.ao's quantized BatchNorm) and subclasses of torchvision's FrozenBatchNorm2d.
    The returned module's ``conversion_report`` (a ConversionReport) lists all three.
    """
    report = ConversionReport()
    result = _convert(module, "", report, {})
    result.conversion_report = report
    if report.left:
        warnings.warn(
            f"bn_triton.convert_batchnorm: left {len(report.left)} normalization layer(s) as they were, "
            f"computed by their own classes: {_grouped(report.left)}. The returned module's conversion_report "
            "lists every layer.",
            stacklevel=2,
        )
    return result


def _convert(module: torch.nn.Module, name: str, report: ConversionReport, done: dict) -> torch.nn.Module:
    """``module`` converted, or with its descendants converted in place; ``done``: id -> result."""
    if id(module) in done:  # reached again through another parent: one layer, reported once
        return done[id(module)]
    verdict, how = _verdict(module)
    if verdict == "convert":
        new = done[id(module)] = how(module)
        report.converted.append((name, f"{_class_name(type(module))} -> {_class_name(type(new))}"))
        return new
    if verdict is not None:
        getattr(report, verdict).append((name, how))
    done[id(module)] = module
    for field, child in list(module.named_children()):
        new = _convert(child, f"{name}.{field}" if name else field, report, done)
        if new is not child:
            setattr(module, field, new)
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


def _refuse_fused(layer, tool: str) -> None:
    """Raise if ``layer`` is one of ours with a fused activation, which ``tool`` would drop."""
    activation = getattr(layer, "activation", None) if isinstance(layer, TritonBatchNormMixin) else None
    if activation is not None:
        raise RuntimeError(
            f"{tool} would drop the fused activation ({activation!r}) of this bn_triton {type(layer).__name__}: "
            "the folded or fused module would compute its BatchNorm without it, silently. Nothing was changed. "
            "Fold only layers with activation=None (or fold this one by hand and apply the activation after it)."
        )


_FOLDS = ("fuse_conv_bn_eval", "fuse_linear_bn_eval")


def guard_torch_fusion() -> None:
    """Make ``torch.nn.utils.fusion.fuse_conv_bn_eval`` and ``fuse_linear_bn_eval`` refuse one of our
    layers with a fused activation, under every name torch holds them by; idempotent.

    torch's conv/linear + BatchNorm folds reach these two (torch.ao.quantization's fusers, its onednn
    backend config, torch.fx.experimental.optimization.fuse, Inductor's pre-grad pass); the other
    modules that fold, with fuse_conv_bn_weights, get their BatchNorm from those fusers or build their
    own. The guarded function replaces the original in torch.nn.utils.fusion and in every torch module
    already imported that imported it by name; torch modules imported later take it from
    torch.nn.utils.fusion. Other code that imported it by name before bn_triton keeps torch's.
    """
    from torch.nn.utils import fusion

    for name in _FOLDS:
        current = getattr(fusion, name)
        original = current.__wrapped__ if getattr(current, "_bn_triton_guard", False) else current
        guarded = current if current is not original else _guarded_fold(original, name)
        for module_name, module in list(sys.modules.items()):
            if (module_name == "torch" or module_name.startswith("torch.")) and vars(module).get(name) is original:
                setattr(module, name, guarded)


def _guarded_fold(fold, name: str):
    @functools.wraps(fold)
    def guarded(*args, **kwargs):
        _refuse_fused(args[1] if len(args) > 1 else kwargs.get("bn"), f"torch.nn.utils.fusion.{name}")
        return fold(*args, **kwargs)

    guarded._bn_triton_guard = True
    return guarded


def register_quantization_fusers() -> None:
    """Teach torch.ao.quantization's module fusion (``fuse_modules``, ``fuse_modules_qat``) our plain
    BatchNorm1d/2d/3d; idempotent.

    Its fuser table is keyed by exact types: each pattern with a torch.nn.BatchNorm1d/2d/3d gets a twin
    with our class in its place. The twin refuses a layer with a fused activation, and hands torch's
    fuser a torch.nn.BatchNorm*d holding our layer's very tensors, mode and qconfig (convert_layer): the
    result is what torch makes of its own layer (a folded conv in eval, torch's intrinsic modules such
    as ConvBnReLU2d for QAT, whose BatchNorm is then torch's).
    """
    try:
        from torch.ao.quantization import fuser_method_mappings
    except ImportError:  # a torch without quantization: nothing to teach
        return
    table = getattr(fuser_method_mappings, "_DEFAULT_OP_LIST_TO_FUSER_METHOD", None)
    if not isinstance(table, dict):
        return
    ours = {torchs: mine for mine, torchs in _TORCHS.items()}
    for pattern, fuser in list(table.items()):
        if isinstance(pattern, tuple) and any(t in ours for t in pattern):
            table.setdefault(tuple(ours.get(t, t) for t in pattern), _fuser_for_ours(fuser))


def _fuser_for_ours(fuser):
    def fuse(is_qat, *mods):
        for m in mods:
            _refuse_fused(m, "torch.ao.quantization's module fusion")
        return fuser(is_qat, *(convert_layer(m, _TORCHS[type(m)]) if type(m) in _TORCHS else m for m in mods))

    return fuse


# Our layers subclass torch's BatchNorm, so torch's tools would take a fused BN + ReLU for a plain
# BatchNorm: its converter (the first line of DDP scripts) would make it a plain SyncBatchNorm, its
# folds a conv without the ReLU. They refuse such layers instead; module fusion learns our plain ones.
guard_torch_converter()
guard_torch_fusion()
register_quantization_fusers()
