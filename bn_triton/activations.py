"""The activations of the fused epilogue ``act(BN(x) + residual)``: one table, read by validation, the
op schemas, the layers, SyncBatchNorm, the plain-op route (composite.py) and ``fuse``.

An activation travels through bn_triton as one canonical string: its name ("silu", "relu6"), with
its parameter for the two that have one ("leaky_relu(0.2)", "elu(1.0)"). Strings hash and compare in
C (plans are keyed on them), pickle as they are, and fit a custom op's schema. ``canonical`` turns
what a user passes (a name, or an instance of torch's activation module) into it; ``parse`` gives
the kernels' ``ACT`` constexpr and parameter (kernels/activation.py computes act and act' under
that constexpr). Adding an activation: one entry here, one branch there, one in reference.py.

Beside it, the drops: dropout-like layers and calls that compute the identity at rate 0 (torch's
Dropout, timm's DropPath and DropBlock2d, torchvision's stochastic depth). ``fuse`` looks through
them (and ``nn.Identity``) where they are the identity; a norm + activation layer fuses its ``act``
only where its ``drop`` is.
"""

import dataclasses
from collections.abc import Callable
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn


@dataclasses.dataclass(frozen=True)
class Entry:
    """One activation: its kernel name, its torch forms and its plain-op implementation."""

    name: str  # the kernels' ACT, and the canonical string (with "(param)" when it has a parameter)
    torch: Callable  # (v, param) -> act(v) from differentiable torch ops (composite.py)
    modules: tuple = ()  # torch's module classes computing it (their attributes checked against ``fixed``)
    foreign: tuple = ()  # other libraries' module classes computing it, as "module.qualname" (never imported)
    functions: tuple = ()  # (function, its parameters in order with their defaults): the calls ``fuse`` recognizes
    methods: tuple = ()  # Tensor methods computing it
    param: Optional[str] = None  # the argument or module attribute holding the parameter
    default: float = 0.0  # the parameter's default (torch's)
    fixed: tuple = ()  # (argument, value) pairs a module or call must have, where it has that argument
    grad_from_output: bool = False  # act' is readable from the output (ReLU: y > 0), so a saved y serves it


def _params(**defaults) -> tuple:
    """A function's parameters after its input, in order, with their defaults."""
    return tuple(defaults.items())


_INPLACE = _params(inplace=False)
TABLE = {
    e.name: e
    for e in (
        Entry(
            "relu",
            lambda v, p: torch.relu(v),
            modules=(nn.ReLU,),
            functions=((F.relu, _INPLACE), (torch.relu, ()), (torch.relu_, ())),
            methods=("relu", "relu_"),
            grad_from_output=True,
        ),
        Entry(
            "relu6",
            lambda v, p: F.hardtanh(v, 0.0, 6.0),
            modules=(nn.ReLU6, nn.Hardtanh),
            functions=(
                (F.relu6, _INPLACE),
                (F.hardtanh, _params(min_val=-1.0, max_val=1.0, inplace=False)),
                (F.hardtanh_, _params(min_val=-1.0, max_val=1.0)),
            ),
            fixed=(("min_val", 0.0), ("max_val", 6.0)),
        ),
        Entry(
            "leaky_relu",
            lambda v, p: F.leaky_relu(v, p),
            modules=(nn.LeakyReLU,),
            functions=(
                (F.leaky_relu, _params(negative_slope=0.01, inplace=False)),
                (F.leaky_relu_, _params(negative_slope=0.01)),
            ),
            param="negative_slope",
            default=0.01,
        ),
        Entry(
            "elu",
            lambda v, p: F.elu(v, p),
            modules=(nn.ELU,),
            functions=((F.elu, _params(alpha=1.0, inplace=False)), (F.elu_, _params(alpha=1.0))),
            param="alpha",
            default=1.0,
        ),
        Entry("silu", lambda v, p: F.silu(v), modules=(nn.SiLU,), functions=((F.silu, _INPLACE),)),
        Entry("hardswish", lambda v, p: F.hardswish(v), modules=(nn.Hardswish,), functions=((F.hardswish, _INPLACE),)),
        Entry(
            "gelu",
            lambda v, p: F.gelu(v),
            modules=(nn.GELU,),
            foreign=("timm.layers.activations.GELU",),
            functions=((F.gelu, _params(approximate="none")),),
            fixed=(("approximate", "none"),),
        ),
        Entry(
            "gelu_tanh",
            lambda v, p: F.gelu(v, approximate="tanh"),
            modules=(nn.GELU,),
            foreign=("timm.layers.activations.GELUTanh",),
            functions=((F.gelu, _params(approximate="none")),),
            fixed=(("approximate", "tanh"),),
        ),
        Entry("mish", lambda v, p: F.mish(v), modules=(nn.Mish,), functions=((F.mish, _INPLACE),)),
    )
}
SUPPORTED = (
    "None, a name ("
    + ", ".join(repr(name) for name in TABLE)
    + ") or an instance of nn.ReLU, nn.ReLU6, nn.Hardtanh(0.0, 6.0), nn.LeakyReLU, nn.ELU, nn.SiLU, nn.Hardswish, "
    "nn.GELU or nn.Mish"
)


def _spell(entry: Entry, param: float) -> str:
    return entry.name if entry.param is None else f"{entry.name}({float(param)!r})"


def _from_arguments(entry: Entry, arguments: dict) -> Optional[str]:
    """The canonical string if ``arguments`` (a module's attributes, a call's arguments with their
    defaults) are those of ``entry``, else None. An argument the module or function does not have
    constrains nothing (F.relu6 has no min_val)."""
    for name, value in entry.fixed:
        if name in arguments and arguments[name] != value:
            return None
    if entry.param is None:
        return entry.name
    param = arguments.get(entry.param, entry.default)
    if isinstance(param, bool) or not isinstance(param, (int, float)):
        return None
    return _spell(entry, param)


def of_module(module) -> Optional[str]:
    """The canonical activation an instance of one of torch's activation modules computes, or None."""
    cls = type(module)
    for entry in TABLE.values():
        if cls in entry.modules:
            found = _from_arguments(entry, vars(module))
            if found is not None:
                return found
        elif f"{cls.__module__}.{cls.__qualname__}" in entry.foreign:
            return _spell(entry, entry.default)
    return None


def of_call(target, args: tuple, kwargs: dict) -> Optional[str]:
    """The canonical activation that ``target(*args, **kwargs)`` computes of ``args[0]`` (a function,
    or a Tensor method's name with the tensor first), or None."""
    for entry in TABLE.values():
        if isinstance(target, str):
            if target in entry.methods and len(args) == 1 and not kwargs:
                return entry.name
            continue
        for fn, params in entry.functions:
            if target is not fn or len(args) > 1 + len(params) or not set(kwargs) <= {n for n, _ in params}:
                continue
            arguments = {**dict(params), **dict(zip((n for n, _ in params), args[1:], strict=False)), **kwargs}
            found = _from_arguments(entry, arguments)
            if found is not None:
                return found
    return None


def canonical(activation) -> Optional[str]:
    """``activation`` (None, a name, a canonical string, or an instance of torch's activation module)
    as its canonical string; a ValueError naming what is supported for anything else."""
    if activation is None:
        return None
    if isinstance(activation, str):
        try:
            return _canonical_string(activation)
        except (KeyError, ValueError):
            pass
    elif isinstance(activation, nn.Module):
        found = of_module(activation)
        if found is not None:
            return found
    raise ValueError(f"batch_norm: unsupported activation {activation!r}; expected {SUPPORTED}")


def _canonical_string(text: str) -> str:
    name, param = parse_loose(text)
    return _spell(TABLE[name], param)


def parse_loose(text: str) -> tuple:
    """(name, parameter) of "name" or "name(param)"; the parameter's default where it is omitted."""
    name, _, rest = text.partition("(")
    entry = TABLE[name]
    if not rest:
        return name, entry.default
    if entry.param is None or not rest.endswith(")"):
        raise ValueError(text)
    return name, float(rest[:-1])


def parse(activation: Optional[str]) -> tuple:
    """(the kernels' ACT, its parameter) of a canonical activation; ("", 0.0) for None."""
    if activation is None:
        return "", 0.0
    return parse_loose(activation)


def grad_from_output(activation: Optional[str]) -> bool:
    """Whether the stored output gives act' (ReLU: where y > 0), so a residual need not be kept."""
    return activation is not None and TABLE[parse(activation)[0]].grad_from_output


def apply(v: torch.Tensor, activation: Optional[str]) -> torch.Tensor:
    """act(v) from differentiable torch ops (identity for None)."""
    if activation is None:
        return v
    name, param = parse(activation)
    return TABLE[name].torch(v, param)


# ---------------------------------------------------------------- the drops
# Modules that compute the identity at rate 0 (in training too), with the attribute holding the rate;
# other libraries' as "module.qualname" (never imported). Each reads its own ``training`` as it runs.
DROP_MODULES = {
    nn.Dropout: "p",
    nn.Dropout1d: "p",
    nn.Dropout2d: "p",
    nn.Dropout3d: "p",
    "timm.layers.drop.DropPath": "drop_prob",
    "timm.layers.drop.DropBlock2d": "drop_prob",
}
# Calls that compute the identity at rate 0, or where their ``training`` argument is False (a constant
# in a torch.fx graph: each mode's graph has its own): (function, its parameters after the input in
# order with their defaults, the name of the rate, the name of the training flag); other libraries'
# functions as "module.name" (torch.fx.wrap keeps torchvision's stochastic depth one call node).
_DROP = _params(p=0.5, training=True, inplace=False)
DROP_FUNCTIONS = (
    (F.dropout, _DROP, "p", "training"),
    (F.dropout1d, _DROP, "p", "training"),
    (F.dropout2d, _DROP, "p", "training"),
    (F.dropout3d, _DROP, "p", "training"),
    (torch.dropout, _params(p=None, train=None), "p", "train"),
    ("torchvision.ops.stochastic_depth.stochastic_depth", _params(p=None, mode=None, training=True), "p", "training"),
)


def _qualname(obj) -> str:
    return f"{getattr(obj, '__module__', None)}.{getattr(obj, '__qualname__', None)}"


def drop_rate(module) -> Optional[float]:
    """The rate of a drop module of DROP_MODULES (exactly these classes), or None for any other module."""
    cls = type(module)
    name = DROP_MODULES.get(cls) or DROP_MODULES.get(_qualname(cls))
    rate = getattr(module, name, None) if name else None
    return float(rate) if isinstance(rate, (int, float)) and not isinstance(rate, bool) else None


def is_identity(module) -> bool:
    """Whether ``module`` computes its input as it is, in every mode: nn.Identity, or a drop at rate 0."""
    return type(module) is nn.Identity or drop_rate(module) == 0.0


def drop_call(target, args: tuple, kwargs: dict) -> Optional[tuple]:
    """(rate, training) of a call of DROP_FUNCTIONS on ``args[0]``, or None for any other call (or one
    whose rate or flag is not a constant)."""
    for fn, params, rate, flag in DROP_FUNCTIONS:
        if not ((target is fn) if callable(fn) else (callable(target) and _qualname(target) == fn)):
            continue
        names = [n for n, _ in params]
        if len(args) > 1 + len(params) or not set(kwargs) <= set(names):
            return None
        arguments = {**dict(params), **dict(zip(names, args[1:], strict=False)), **kwargs}
        p, training = arguments[rate], arguments[flag]
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not isinstance(training, bool):
            return None
        return float(p), training
    return None
