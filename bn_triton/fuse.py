"""``bn_triton.fuse``: a model's BatchNorm -> activation and BatchNorm -> add -> activation, found in its
torch.fx trace and rewritten into our fused layers, so that ``act(BN(x) + residual)`` takes one kernel
pass each way instead of BN, an add and an activation apart (torchvision's ResNets, unchanged).

``fuse(model, example_inputs)`` traces ``model`` (a GraphModule is taken as it is, not retraced),
records every node's shape and dtype from ``example_inputs`` on fake tensors (ShapeProp: nothing
runs, no buffer moves), rewrites the graph, and returns a GraphModule with a ``fusion_report``
(also logged on the "bn_triton" logger at INFO). The model itself is not changed; the result holds
its very Parameter and buffer objects and its other layers, so their state_dicts load into each other.

What fuses, call by call:
* a call of torch's or our BatchNorm1d/2d/3d (exactly these types) whose output has one user, an
  activation of bn_triton/activations.py's table (its module, function or Tensor method, in place or
  not: ``nn.ReLU``, ``F.silu``, ``nn.LeakyReLU(0.1)``, ``Tensor.relu_`` ...): the call becomes one of
  our layer with that ``activation``;
* one whose output has one user, an add (``+``, ``+=``, ``torch.add``, ``Tensor.add(_)``, alpha 1)
  of a tensor of exactly its shape and dtype, whose result has one user, such an activation: one call
  with ``residual=`` the other operand, where the add was.
A layer fuses if every call of it fuses alike. The rest is left as it is, its torch BatchNorms
converted to ours as ``convert_batchnorm`` does (layers forward never calls are kept unconverted).
One user means nobody else reads the tensor, through any alias, so the fused call may return a new
one where an in-place activation or ``+=`` wrote into it; an add that writes into its other operand in
place does not fuse, since the fused call would leave that tensor unwritten. The BatchNorm runs
later, at its add: only if no call in between could write in place or use the same layer.

Without ``example_inputs`` no shape is known, so no add fuses (a broadcasting one must not). The
shapes and dtypes are the example's (fuse under the autocast the model runs in): an input on which
an add would broadcast raises our layer's error. A model torch.fx cannot trace raises an error, or
with ``on_untraceable="convert"`` is converted by ``convert_batchnorm`` without fusion, with a warning.
"""

import collections
import contextlib
import copy
import dataclasses
import inspect
import io
import logging
import operator
import warnings
from typing import Optional

import torch
from torch import fx, nn
from torch.nn.modules.batchnorm import _BatchNorm

from bn_triton import activations, modules
from bn_triton.convert import convert_batchnorm, convert_layer

LOG = logging.getLogger("bn_triton")

OURS = {nn.BatchNorm1d: modules.BatchNorm1d, nn.BatchNorm2d: modules.BatchNorm2d, nn.BatchNorm3d: modules.BatchNorm3d}
FUSABLE = (*OURS, *OURS.values())
ADD_FUNCTIONS = (operator.add, operator.iadd, torch.add)
ADD_METHODS = ("add", "add_")
INPLACE_OPERATORS = tuple(
    getattr(operator, name)
    for name in ("iadd", "isub", "imul", "itruediv", "ifloordiv", "imod", "ipow", "imatmul", "iand", "ior", "ixor")
) + (operator.ilshift, operator.irshift, operator.setitem, operator.delitem)
RESIDUAL = "output feeds an add as the residual"
UNTRACEABLE = "not fused: torch.fx could not trace the model"
# GraphModule.__deepcopy__ rebuilds the module and keeps, of its plain attributes, those named here.
_PRESERVED = getattr(fx.graph_module, "_USER_PRESERVED_ATTRIBUTES_KEY", None)


def describe_kind(kind: str) -> str:
    """A fused kind in words: "silu" is "into silu", "add+relu" "into add + relu"."""
    return "into " + kind.replace("+", " + ")


@dataclasses.dataclass
class FusionReport:
    """What ``fuse`` did: ``fused`` as (layer name, kind), the kind the activation's canonical string
    (bn_triton/activations.py), "add+" and it for an add first; ``left`` as (name, reason)."""

    fused: list = dataclasses.field(default_factory=list)
    left: list = dataclasses.field(default_factory=list)

    def __str__(self) -> str:
        kinds = collections.Counter(kind for _, kind in self.fused)
        text = f"fused {len(self.fused)} of {len(self.fused) + len(self.left)} BatchNorm layers"
        if kinds:
            text += ": " + ", ".join(f"{n} {describe_kind(k)}" for k, n in kinds.items())
        if not self.left:
            return text
        by_reason = collections.defaultdict(list)
        for name, reason in self.left:
            by_reason[reason].append(name)
        groups = "; ".join(f"{', '.join(names)} ({reason})" for reason, names in by_reason.items())
        return f"{text}; left {len(self.left)}: {groups}"


@dataclasses.dataclass
class _Site:
    """One call of a BatchNorm that fuses: its node, its activation's node and canonical string, and
    the add's node (None: BN -> activation)."""

    bn: fx.Node
    act: fx.Node
    activation: str
    add: Optional[fx.Node] = None

    @property
    def kind(self) -> str:
        return self.activation if self.add is None else f"add+{self.activation}"


def fuse(model: nn.Module, example_inputs=None, *, on_untraceable: str = "raise") -> nn.Module:
    """``model`` as a GraphModule whose BatchNorm -> [add ->] activation patterns run as our fused layers.

    ``example_inputs``: a tensor, or a tuple of ``forward``'s positional arguments, of the shapes and
    dtypes the model will see (without it no add fuses). ``on_untraceable``: "raise" (a model that
    torch.fx cannot trace raises an error) or "convert" (it is converted without fusion, with a
    warning). The result's ``fusion_report`` (a FusionReport) says what fused and why the rest did not.
    """
    if on_untraceable not in ("raise", "convert"):
        raise ValueError(f"bn_triton.fuse: on_untraceable must be 'raise' or 'convert', got {on_untraceable!r}")
    try:
        gm = _trace(model)
    except Exception as exc:  # noqa: BLE001 - any failure to trace is the untraceable case
        return _untraceable(model, exc, on_untraceable)
    no_shapes = _record_shapes(gm, example_inputs)
    mods = dict(gm.named_modules())
    calls = collections.defaultdict(list)  # layer name -> _Site or reason, one per call
    for node in gm.graph.nodes:
        if node.op == "call_module" and type(mods[node.target]) in FUSABLE:
            calls[node.target].append(_match(node, mods, no_shapes))
    _one_claim_per_add(calls)
    decisions = {name: _decide(results) for name, results in calls.items()}
    _rewrite(gm, {name: d for name, d in decisions.items() if isinstance(d, list)})
    replaced = _replace_layers(gm, decisions)
    _keep_unreached(model, gm, replaced)
    _keep_modes(model, gm)
    return _finish(gm, _report(model, calls, decisions))


class _Tracer(fx.Tracer):
    """torch.fx's tracer, with every BatchNorm a leaf: a user's subclass is called, not traced
    through (its input checks are control flow on the input's shape)."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, _BatchNorm) or super().is_leaf_module(m, qualname)


def _trace(model: nn.Module) -> fx.GraphModule:
    """A GraphModule of its own: containers new, leaf layers and tensors the model's."""
    if isinstance(model, fx.GraphModule):  # retracing would turn its in-place adds into out-of-place ones
        return fx.GraphModule(model, copy.deepcopy(model.graph), type(model).__name__)
    return fx.GraphModule(model, _Tracer().trace(model), type(model).__name__)


def _untraceable(model: nn.Module, exc: Exception, on_untraceable: str) -> nn.Module:
    cause = f"{type(exc).__name__}: {(str(exc).splitlines() or [''])[0]}"
    name = type(model).__name__
    if on_untraceable == "raise":
        raise RuntimeError(
            f"bn_triton.fuse: torch.fx could not trace {name} ({cause}). "
            'bn_triton.fuse(model, on_untraceable="convert") converts its BatchNorm layers to ours without '
            "fusing them (as bn_triton.convert_batchnorm does) instead."
        ) from exc
    warnings.warn(
        f"bn_triton.fuse: torch.fx could not trace {name} ({cause}); its BatchNorm layers were converted "
        "without fusion (bn_triton.convert_batchnorm)",
        stacklevel=3,
    )
    report = FusionReport(left=[(n, UNTRACEABLE) for n, _ in _batchnorms(model)])
    return _finish(convert_batchnorm(model), report)


def _finish(result: nn.Module, report: FusionReport) -> nn.Module:
    result.fusion_report = report
    if isinstance(result, fx.GraphModule) and _PRESERVED is not None:
        result.meta.setdefault(_PRESERVED, {})["fusion_report"] = report
    LOG.info("bn_triton.fuse: %s", report)
    return result


def _batchnorms(model: nn.Module) -> list:
    return [(name, m) for name, m in model.named_modules() if isinstance(m, _BatchNorm)]


# ---------------------------------------------------------------- shapes
def _record_shapes(gm: fx.GraphModule, example_inputs) -> Optional[str]:
    """Every node's shape and dtype in ``node.meta["tensor_meta"]``; None, or why there are none."""
    if example_inputs is None:
        return "no example input to check the add's shapes: pass bn_triton.fuse(model, example_input)"
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.passes.shape_prop import ShapeProp

    args = example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)
    try:
        # Fake tensors: on copies of the layers, so no running statistic of the model moves. A
        # failure prints its traceback before it raises: the warning below says it instead.
        with contextlib.redirect_stderr(io.StringIO()):
            ShapeProp(gm, fake_mode=FakeTensorMode()).propagate(*args)
    except Exception as exc:  # noqa: BLE001 - without shapes nothing is wrong, only the adds stay
        cause = f"{type(exc).__name__}: {(str(exc).splitlines() or [''])[0]}"
        warnings.warn(f"bn_triton.fuse: the example input did not propagate ({cause}); no add fuses", stacklevel=3)
        return f"the example input did not propagate ({type(exc).__name__}), so the add's shapes are unknown"
    return None


def _tensor_meta(node):
    meta = node.meta.get("tensor_meta")
    return meta if hasattr(meta, "shape") and hasattr(meta, "dtype") else None


# ---------------------------------------------------------------- matching
def _match(bn: fx.Node, mods: dict, no_shapes: Optional[str]) -> _Site | str:
    """How one BatchNorm call fuses, or why it does not."""
    layer = mods[bn.target]
    if len(bn.args) != 1 or bn.kwargs:
        return "called with a residual or more arguments already"
    if getattr(layer, "activation", None) is not None:
        return f"already fused (activation={layer.activation!r})"
    users = list(bn.users)
    if len(users) != 1:
        return f"output has {len(users)} users" if users else "output is not used"
    (user,) = users
    activation = _activation(user, bn, mods)
    if activation is not None:
        return _Site(bn, user, activation)
    operands = _add_operands(user)
    if operands is None:
        return f"output feeds {_describe(user, mods)}, not an activation bn_triton fuses or an add"
    if isinstance(operands, str):
        return operands
    first, second, inplace = operands
    if first is bn and second is bn:
        return "output is added to itself"
    if first is not bn and inplace:
        return "the add writes into its other operand in place"
    other = second if first is bn else first
    if not isinstance(other, fx.Node):
        return f"the add's other operand is {other!r}, not a tensor"
    after = list(user.users)
    activation = _activation(after[0], user, mods) if len(after) == 1 else None
    if activation is None:
        what = f"{len(after)} users" if len(after) != 1 else f"one user, {_describe(after[0], mods)}"
        return f"output feeds an add whose result has {what}, not an activation bn_triton fuses"
    site = _Site(bn, after[0], activation, user)
    return no_shapes or _mismatch(bn, other) or _unsafe_between(bn, user, mods) or site


def _activation(node: fx.Node, x: fx.Node, mods: dict) -> Optional[str]:
    """The canonical activation (bn_triton/activations.py) that ``node`` applies to ``x`` alone, or None."""
    if not node.args or node.args[0] is not x:
        return None
    if node.op == "call_module":
        return activations.of_module(mods[node.target]) if len(node.args) == 1 and not node.kwargs else None
    if node.op in ("call_method", "call_function"):
        return activations.of_call(node.target, tuple(node.args), dict(node.kwargs))
    return None


def _add_operands(node: fx.Node):
    """(first, second, in place) of an add; None for what is not an add; a reason for one that
    cannot fuse."""
    if node.op == "call_function" and any(node.target is f for f in ADD_FUNCTIONS):
        inplace = node.target is operator.iadd
        allowed = {"alpha", "out"} if node.target is torch.add else set()
    elif node.op == "call_method" and node.target in ADD_METHODS:
        inplace, allowed = node.target == "add_", {"alpha"}
    else:
        return None
    if len(node.args) != 2 or not set(node.kwargs) <= allowed:
        return "output feeds an add with arguments other than two tensors and alpha"
    if "out" in node.kwargs:
        return "output feeds an add that writes into out="
    alpha = node.kwargs.get("alpha", 1)
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or alpha != 1:
        return f"output feeds an add with alpha={alpha!r}"
    return node.args[0], node.args[1], inplace


def _mismatch(bn: fx.Node, other: fx.Node) -> Optional[str]:
    """Why ``other`` cannot be bn's residual (our layer takes exactly the input's shape and dtype)."""
    mine, theirs = _tensor_meta(bn), _tensor_meta(other)
    if mine is None or theirs is None:
        return "output feeds an add whose other operand has no recorded shape"
    if tuple(theirs.shape) != tuple(mine.shape):
        return f"output feeds an add that broadcasts {tuple(theirs.shape)} to {tuple(mine.shape)}"
    if theirs.dtype != mine.dtype:
        return f"output feeds an add that promotes: {theirs.dtype} to {mine.dtype}"
    return None


def _unsafe_between(bn: fx.Node, add: fx.Node, mods: dict) -> Optional[str]:
    """Why the BatchNorm may not run later, at its add (where the fused call goes), or None."""
    node = bn.next
    while node is not add:
        if node.op == "call_module" and node.target == bn.target:
            return "called again between its call and its add"
        if node.op == "get_attr" and node.target.startswith(f"{bn.target}."):
            return "its tensors are read between its call and its add"
        if _may_write_in_place(node, mods):
            return f"{_describe(node, mods)} may write in place between its call and its add"
        node = node.next
    return None


def _may_write_in_place(node: fx.Node, mods: dict) -> bool:
    if node.op == "call_module":
        layer = mods[node.target]
        known = type(layer).__module__.startswith(("torch.nn.", "bn_triton."))
        return not known or getattr(layer, "inplace", False) is True  # a user's leaf: anything
    if node.op not in ("call_function", "call_method"):
        return False
    if node.kwargs.get("inplace") is True or "out" in node.kwargs:
        return True
    if node.op == "call_method":
        return _inplace_name(node.target)
    target = node.target
    if any(target is f for f in INPLACE_OPERATORS):
        return True
    if not (getattr(target, "__module__", None) or "").startswith(("torch", "_operator", "math", "builtins")):
        return True  # a user's function, kept whole by torch.fx.wrap: anything
    return _inplace_name(getattr(target, "__name__", "")) or _bound_inplace(node)


def _inplace_name(name: str) -> bool:
    return name.endswith("_") and not name.endswith("__")


def _bound_inplace(node: fx.Node) -> bool:
    """``inplace`` given by position (F.dropout(x, 0.5, True, True))."""
    try:
        bound = inspect.signature(node.target).bind(*node.args, **node.kwargs)
    except (TypeError, ValueError):  # builtins without a signature take no inplace argument
        return False
    return bound.arguments.get("inplace") is True


def _describe(node: fx.Node, mods: dict) -> str:
    if node.op == "call_module":
        return f"{node.target} ({type(mods[node.target]).__name__})"
    if node.op == "call_method":
        return f"Tensor.{node.target}"
    if node.op == "call_function":
        module = getattr(node.target, "__module__", None) or ""
        name = getattr(node.target, "__name__", repr(node.target))
        return f"{module.removeprefix('_')}.{name}" if module else name
    return "the model's output" if node.op == "output" else node.op


# ---------------------------------------------------------------- deciding
def _one_claim_per_add(calls: dict) -> None:
    """Where two BatchNorms could take the same add, its first operand does (``out += identity``):
    the other's output is the residual."""
    claims = collections.defaultdict(list)
    for results in calls.values():
        for i, r in enumerate(results):
            if isinstance(r, _Site) and r.add is not None:
                claims[r.add].append((results, i))
    for add, claimants in claims.items():
        if len(claimants) < 2:
            continue
        keep = next(((res, i) for res, i in claimants if res[i].bn is add.args[0]), claimants[0])
        for res, i in claimants:
            if res is not keep[0] or i != keep[1]:
                res[i] = RESIDUAL


def _decide(results: list) -> list | str:
    """The sites to fuse, if every call of the layer fuses alike; else why the layer stays."""
    kinds = [r.kind if isinstance(r, _Site) else r for r in results]
    if all(isinstance(r, _Site) for r in results) and len(set(kinds)) == 1:
        return results
    if len(set(kinds)) == 1:
        return kinds[0]
    counts = collections.Counter(kinds)
    fused = {r.kind for r in results if isinstance(r, _Site)}
    parts = [f"{n} {describe_kind(k)}" if k in fused else f"{n} not ({k})" for k, n in counts.items()]
    return f"called {len(results)} times, and not every call fuses alike: {', '.join(parts)}"


def _report(model: nn.Module, calls: dict, decisions: dict) -> FusionReport:
    report = FusionReport()
    for name, layer in _batchnorms(model):
        decision = decisions.get(name)
        if type(layer) not in FUSABLE:
            cls = type(layer)
            why = f"a {cls.__module__}.{cls.__qualname__}: only torch's and bn_triton's BatchNorm1d/2d/3d fuse"
            report.left.append((name, why))
        elif name not in calls:
            report.left.append((name, "not called by forward (absent from the torch.fx trace), kept as it is"))
        elif isinstance(decision, list):
            report.fused.append((name, decision[0].kind))
        else:
            report.left.append((name, decision))
    return report


# ---------------------------------------------------------------- rewriting
def _rewrite(gm: fx.GraphModule, fused: dict) -> None:
    """Each fused call in place of its BatchNorm, [add,] activation nodes. Operands are read from the
    graph as it is now: an earlier rewrite may have replaced them (a block's input is the last one's
    activation)."""
    graph = gm.graph
    for name, sites in fused.items():
        for site in sites:
            if site.add is None:  # the BatchNorm's node stays, its layer becomes the fused one
                site.act.replace_all_uses_with(site.bn)
                graph.erase_node(site.act)
                continue
            first, second = site.add.args
            residual = second if first is site.bn else first
            with graph.inserting_before(site.add):
                call = graph.call_module(name, (site.bn.args[0],), {"residual": residual})
            call.meta.update(site.act.meta)
            site.act.replace_all_uses_with(call)
            for node in (site.act, site.add, site.bn):
                graph.erase_node(node)
    graph.lint()
    gm.recompile()


def _replace_layers(gm: fx.GraphModule, decisions: dict) -> dict:
    """Fused layers become ours with their activation, torch's others ours, at the same names, with
    the same tensors. Returns {id(old layer): new layer}."""
    replaced = {}
    for name in decisions:
        layer = gm.get_submodule(name)
        fused = isinstance(decisions[name], list)
        if not fused and type(layer) not in OURS:
            continue  # ours already, unfused: kept as it is
        new = convert_layer(layer, OURS.get(type(layer), type(layer)))
        if fused:
            new.activation = decisions[name][0].activation
        prefix, _, field = name.rpartition(".")
        setattr(gm.get_submodule(prefix), field, new)
        replaced[id(layer)] = new
    return replaced


def _keep_unreached(model: nn.Module, gm: fx.GraphModule, replaced: dict) -> None:
    """What forward never reaches is absent from the trace: attach it, and keep the model's order
    (torch.fx's is the order of first use), so that state_dicts and parameters() match the model's."""
    for name, module in model.named_modules(remove_duplicate=False):
        mine = gm.get_submodule(name)
        if mine is module or id(module) in replaced:
            continue  # the model's own layer, or our replacement of it: complete
        for field, child in module.named_children():
            if field not in mine._modules:
                setattr(mine, field, replaced.get(id(child), child))
        for field, param in module._parameters.items():
            if field not in mine._parameters:
                mine.register_parameter(field, param)
        for field, buf in module._buffers.items():
            if field not in mine._buffers:
                mine.register_buffer(field, buf, persistent=field not in module._non_persistent_buffers_set)
        for attr in ("_modules", "_parameters", "_buffers"):
            theirs, ours = getattr(module, attr), getattr(mine, attr)
            setattr(mine, attr, {**{k: ours[k] for k in theirs}, **ours})


def _keep_modes(model: nn.Module, gm: fx.GraphModule) -> None:
    """torch.fx makes new containers, in training mode: each takes its counterpart's mode."""
    for name, module in model.named_modules(remove_duplicate=False):
        gm.get_submodule(name).training = module.training
