"""``bn_triton.fuse``: a model's BatchNorm -> activation, BatchNorm -> add -> activation and BatchNorm ->
add, found in its torch.fx trace and rewritten into our fused layers, so that ``act(BN(x) + residual)``
takes one kernel pass each way instead of BN, an add and an activation apart (torchvision's and
timm's ResNets, MobileNets, EfficientNets, RegNets, CSP nets, unchanged: bench/fusion_report.py).

``fuse(model, example_inputs)`` traces ``model`` (a GraphModule is taken as it is, not retraced),
records every node's shape and dtype from ``example_inputs`` on fake tensors (ShapeProp: nothing
runs, no buffer moves), rewrites the graph, and returns a GraphModule with a ``fusion_report``
(also logged on the "bn_triton" logger at INFO). The model itself is not changed; the result holds
its very Parameter and buffer objects and its other layers, so their state_dicts load into each other.

The layers: torch's and our BatchNorm1d/2d/3d, and timm's and our BatchNormAct2d (timm's recognized by
module and name, never imported; exactly these types). A norm + activation layer whose ``act`` is in
bn_triton/activations.py's table and whose ``drop`` is the identity computes its act in our kernels
(kind: the activation); one whose act and drop are identities (timm's ``apply_act=False``) is a plain
BatchNorm below; one with another act or a real drop is converted, act and drop run after it, as timm
runs them. Each becomes our BatchNormAct2d holding its very drop and act.

What fuses, call by call, looking through identities (``nn.Identity``; a drop at rate 0: nn.Dropout*,
``F.dropout``, timm's DropPath and DropBlock2d, torchvision's stochastic depth; a dropout call in a
graph where its ``training`` is False) that each read the value alone:
* a call whose output has one user, an activation of the table (its module, function or Tensor
  method, in place or not: ``nn.ReLU``, ``F.silu``, ``nn.LeakyReLU(0.1)``, ``Tensor.relu_`` ...): the
  call becomes one of our layer with that ``activation`` (kind: the activation);
* one whose output has one user, an add (``+``, ``+=``, ``torch.add``, ``Tensor.add(_)``, alpha 1)
  of a tensor of exactly its shape and dtype: one call with ``residual=`` the other operand, where the
  add was, and the activation if the add's result has one user, such an activation (kind "add+act"),
  else none (kind "add": the end of an inverted residual block).
A drop above rate 0 is not the identity (in training), so it blocks the pattern it sits in; the
report says so. A layer fuses if every call of it fuses alike, in every graph (where some calls
take their add's activation and others do not, all take the add alone). Where two BatchNorms could
take one add, its first operand does (``out += identity``). The rest is left, each with its reason in
the report; its torch and timm layers converted to ours as ``convert_batchnorm`` does (layers forward
never calls are kept as they are). One user means nobody else reads the tensor, through any alias,
so the fused call may return a new one where an in-place activation, identity or ``+=`` wrote into
it; an add that writes into its other operand in place does not fuse, since the fused call would
leave that tensor unwritten. The BatchNorm runs later, at its add: only if no call in between (but
the identities it goes through) could write in place or use the same layer. The identities go with
the pattern: a drop at rate 0 whose rate is raised after ``fuse`` is not called by the result.

Without ``example_inputs`` no shape is known, so no add fuses (a broadcasting one must not). The
shapes and dtypes are the example's (fuse under the autocast the model runs in): an input on which
an add would broadcast raises our layer's error. A model torch.fx cannot trace raises an error, or
with ``on_untraceable="convert"`` is converted by ``convert_batchnorm`` without fusion, with a warning.

Modes: torch.fx records a read of a module's ``training`` as a constant (``F.dropout(x, p,
self.training)``, torchvision's stochastic depth, ``if self.training:``). A model whose trace reads
one is traced with its modes as at the call, with every module in training and with every module in
eval mode; if the graphs differ, the result is a ``GraphPerMode`` whose ``forward`` runs the graph of
the modes those modules are in now (another mix of them raises an error), and a layer fuses only if
its calls fuse alike in every graph. A model that traces in one of these modes but not in another is
untraceable, as above. Modules that read their own mode as they run (BatchNorm, nn.Dropout, and
timm's DropPath and DropBlock2d, which the trace keeps whole, as torch.fx keeps torch's layers) may be
in any mode. So ``F.dropout(y, 0.2, self.training)`` between a BatchNorm and its add is looked through
in the eval graph and not in the training graph: the BatchNorm is left (not every call fuses alike).
"""

import ast
import collections
import contextlib
import copy
import dataclasses
import inspect
import io
import logging
import operator
import threading
import warnings
from typing import Optional

import torch
from torch import fx, nn
from torch.fx.graph_module import _forward_from_src
from torch.nn.modules.batchnorm import _BatchNorm
from torch.package import sys_importer

from bn_triton import activations, convert, modules
from bn_triton.convert import convert_batchnorm, convert_layer

LOG = logging.getLogger("bn_triton")

OURS = {nn.BatchNorm1d: modules.BatchNorm1d, nn.BatchNorm2d: modules.BatchNorm2d, nn.BatchNorm3d: modules.BatchNorm3d}
OWN = (*OURS.values(), modules.BatchNormAct2d)  # ours: a layer left unfused is kept as it is
FUSABLE = (*OURS, *OWN)
# timm's norm + activation layer, recognized by module and name (timm is never imported).
TIMM_NORM_ACT = ("timm.layers.norm_act", "BatchNormAct2d")
ONLY_THESE = "only torch's and bn_triton's BatchNorm1d/2d/3d and timm's and bn_triton's BatchNormAct2d fuse"
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
    (bn_triton/activations.py), "add+" and it for an add first, "add" for an add alone; ``left`` as
    (name, reason)."""

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
    """One call of a BatchNorm that fuses: its node; the activation's canonical string (None: an add
    alone); the add's node (None: BN -> activation) and its operand that carries the BatchNorm's
    output (that output, or the last identity it goes through); and the nodes the fused call takes
    over, in graph order: identities looked through, the add, identities after it, the activation
    (none for a norm + activation layer's own act, computed in the layer already)."""

    bn: fx.Node
    activation: Optional[str]
    add: Optional[fx.Node] = None
    operand: Optional[fx.Node] = None
    nodes: tuple = ()

    @property
    def kind(self) -> str:
        if self.add is None:
            return self.activation
        return "add" if self.activation is None else f"add+{self.activation}"

    def add_alone(self) -> "_Site":
        """The same add, its activation left to run after the fused call."""
        end = self.nodes.index(self.add) + 1
        return dataclasses.replace(self, activation=None, nodes=self.nodes[:end])


def fuse(model: nn.Module, example_inputs=None, *, on_untraceable: str = "raise") -> nn.Module:
    """``model`` as a GraphModule whose BatchNorm -> [add ->] activation and BatchNorm -> add patterns run
    as our fused layers.

    ``example_inputs``: a tensor, or a tuple of ``forward``'s positional arguments, of the shapes and
    dtypes the model will see (without it no add fuses). ``on_untraceable``: "raise" (a model that
    torch.fx cannot trace raises an error) or "convert" (it is converted without fusion, with a
    warning). The result's ``fusion_report`` (a FusionReport) says what fused and why the rest did not.
    The result follows ``.train()`` and ``.eval()`` as the model does: where the model's forward reads
    ``self.training``, it holds a graph per mode (a ``GraphPerMode``).
    """
    if on_untraceable not in ("raise", "convert"):
        raise ValueError(f"bn_triton.fuse: on_untraceable must be 'raise' or 'convert', got {on_untraceable!r}")
    try:
        traced = _trace(model)
    except Exception as exc:  # noqa: BLE001 - any failure to trace is the untraceable case
        return _untraceable(model, exc, on_untraceable)
    name = type(model).__name__
    first = (GraphPerMode if len(traced.graphs) > 1 else fx.GraphModule)(model, traced.graphs[0], name)
    gms = [first] + [fx.GraphModule(model, graph, name) for graph in traced.graphs[1:]]
    calls = collections.defaultdict(list)  # layer name -> _Site or reason, one per call in any graph
    modes = collections.defaultdict(list)  # layer name -> the modes of each of those calls' graph
    for gm, label in zip(gms, traced.labels, strict=True):
        no_shapes = _record_shapes(gm, example_inputs)
        mods = dict(gm.named_modules())
        for node in gm.graph.nodes:
            if node.op == "call_module" and _fusable(mods[node.target]):
                calls[node.target].append(_match(node, mods, no_shapes))
                modes[node.target].append(label)
    _one_claim_per_add(calls)
    decisions = {layer: _decide(results, modes[layer]) for layer, results in calls.items()}
    fused = {layer: d for layer, d in decisions.items() if isinstance(d, list)}
    for gm in gms:
        _rewrite(gm, {layer: [s for s in sites if s.bn.graph is gm.graph] for layer, sites in fused.items()})
        _attach_targets(model, first, gm.graph)
    replaced = _replace_layers(first, decisions)
    _keep_unreached(model, first, replaced)
    _keep_modes(model, first)
    if len(gms) > 1:
        first.set_modes(traced.names, traced.keys, [gm.graph for gm in gms[1:]])
    return _finish(first, _report(model, calls, decisions))


class _Tracer(fx.Tracer):
    """torch.fx's tracer, with every BatchNorm a leaf: a user's subclass is called, not traced
    through (its input checks are control flow on the input's shape); and the drops of
    activations.DROP_MODULES (timm's DropPath and DropBlock2d) too: one node, which fuse looks through
    at rate 0, and which reads its own ``training`` as it runs, as nn.Dropout does."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        leaf = isinstance(m, _BatchNorm) or activations.drop_rate(m) is not None
        return leaf or super().is_leaf_module(m, qualname)


def _fusable(layer: nn.Module) -> bool:
    cls = type(layer)
    return cls in FUSABLE or (cls.__module__, cls.__qualname__) == TIMM_NORM_ACT


@dataclasses.dataclass
class _Traced:
    """The graphs of a model, one per distinct code: ``graphs[keys[k]]`` was traced with
    ``tuple(model.get_submodule(n).training for n in names) == k``; ``labels[i]`` words graph i's modes."""

    graphs: list
    names: tuple = ()
    keys: dict = dataclasses.field(default_factory=dict)
    labels: list = dataclasses.field(default_factory=lambda: ["the modes at the call"])


class _ModeTraceError(Exception):
    """torch.fx traced the model in the modes it was in, but not in ``mode`` (its cause says why)."""

    def __init__(self, mode: str):
        super().__init__(f"torch.fx could not trace the model in {mode}")
        self.mode = mode


def _trace(model: nn.Module) -> _Traced:
    """The model's graphs. A read of a module's ``training`` is a constant in the graph, so a model that
    reads one is traced again with every module in training and every module in eval mode (where the
    modes at the call are not those already); the graphs of distinct code are kept, the call's first."""
    if isinstance(model, GraphPerMode):  # taken as it is, each of its graphs
        graphs = [copy.deepcopy(g) for g in (model.graph, *model.mode_graphs)]
        return _Traced(graphs, model.mode_names, dict(model.mode_keys), _labels(model.mode_keys, len(graphs)))
    if isinstance(model, fx.GraphModule):  # retracing would turn its in-place adds into out-of-place ones
        return _Traced([copy.deepcopy(model.graph)])
    with _mode_reads(model) as read:
        at_call = _Tracer().trace(model)
    if not read:
        return _Traced([at_call])
    modules = dict(model.named_modules())
    flags = {n: m.training for n, m in modules.items()}
    traces = [(flags, at_call)]
    names = dict(read)
    for training in (True, False):
        state = dict.fromkeys(flags, training)
        if any(flags[n] != training for n in read):
            mode = "training mode" if training else "eval mode"
            try:
                with _modes_set(model, training), _mode_reads(model) as more:
                    graph = _Tracer().trace(model)
            except Exception as exc:  # noqa: BLE001 - reported as the model's, in this mode
                raise _ModeTraceError(mode) from exc
            names.update(more)
            traces.append((state, graph))
        else:  # the same reads, the same values: the same graph
            traces.append((state, at_call))
    names = tuple(n for n in modules if n in names)  # the model's order
    graphs, keys, codes = [], {}, {}
    for state, graph in traces:
        code = graph.python_code(root_module="self").src
        if code not in codes:
            codes[code] = len(graphs)
            graphs.append(graph)
        keys.setdefault(tuple(state[n] for n in names), codes[code])
    return _Traced(graphs, names, keys, _labels(keys, len(graphs)))


def _labels(keys: dict, count: int) -> list:
    """Each graph's modes in words: training mode, eval mode, or the mixed modes at the call."""
    words = [[] for _ in range(count)]
    for key, i in keys.items():
        words[i].append("training mode" if all(key) else "eval mode" if not any(key) else "the modes at the call")
    return [" and ".join(w) for w in words]


_MODE_READS_LOCK = threading.Lock()
_NONE = object()


@contextlib.contextmanager
def _mode_reads(model: nn.Module):
    """{name: None} of the modules of ``model`` whose ``training`` this thread reads inside: for the while,
    ``training`` is a property of nn.Module that stores in and reads from the instance's __dict__, as
    the attribute does, and notes the reads."""
    names = {}
    for name, module in model.named_modules():
        names.setdefault(id(module), name)
    read, thread = {}, threading.get_ident()

    def get(module):
        try:
            training = module.__dict__["training"]
        except KeyError:
            raise AttributeError("training") from None
        if id(module) in names and threading.get_ident() == thread:
            read[names[id(module)]] = None
        return training

    def put(module, training):
        module.__dict__["training"] = training

    with _MODE_READS_LOCK:
        before = vars(nn.Module).get("training", _NONE)
        nn.Module.training = property(get, put)
        try:
            yield read
        finally:
            if before is _NONE:
                del nn.Module.training
            else:
                nn.Module.training = before


@contextlib.contextmanager
def _modes_set(model: nn.Module, training: bool):
    """Every module of ``model`` in one mode (as ``.train(training)`` sets them), restored after."""
    saved = [(m, m.training) for m in model.modules()]
    try:
        for m, _ in saved:
            m.training = training
        yield
    finally:
        for m, flag in saved:
            m.training = flag


def _untraceable(model: nn.Module, exc: Exception, on_untraceable: str) -> nn.Module:
    name = type(model).__name__
    if isinstance(exc, _ModeTraceError):  # it traced in the modes at the call: that graph alone would fix them
        name, exc = f"{name} in {exc.mode}", exc.__cause__
    cause = f"{type(exc).__name__}: {(str(exc).splitlines() or [''])[0]}"
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
    own, why = _own_activation(layer)
    if why is not None:
        return why
    if own is not None:
        return _Site(bn, own)
    if getattr(layer, "activation", None) is not None:
        return f"already fused (activation={layer.activation!r})"
    end, chain = _identities(bn, mods)
    via = _via(chain, mods)
    users = list(end.users)
    if len(users) != 1:
        if not users:
            return f"output{via} is not used"
        return f"output{via} has {len(users)} users: {', '.join(_describe(u, mods) for u in users)}"
    (user,) = users
    activation = _activation(user, end, mods)
    if activation is not None:
        return _Site(bn, activation, nodes=(*chain, user))
    operands = _add_operands(user)
    if operands is None:
        return _not_identity(user, end, mods, via) or (
            f"output{via} feeds {_describe(user, mods)}, not an activation bn_triton fuses or an add"
        )
    if isinstance(operands, str):
        return operands
    first, second, inplace = operands
    if first is end and second is end:
        return "output is added to itself"
    if first is not end and inplace:
        return "the add writes into its other operand in place"
    other = second if first is end else first
    if not isinstance(other, fx.Node):
        return f"the add's other operand is {other!r}, not a tensor"
    nodes = (*chain, user)
    last, after = _identities(user, mods)
    if len(last.users) == 1:
        (next_user,) = last.users
        activation = _activation(next_user, last, mods)
        if activation is not None:
            nodes = (*nodes, *after, next_user)
    site = _Site(bn, activation, user, end, nodes)
    return no_shapes or _mismatch(bn, other) or _unsafe_between(bn, user, mods, chain) or site


def _own_activation(layer: nn.Module) -> tuple:
    """(activation, why not) of a norm + activation layer: (its act's canonical string, None) where
    it computes its act itself; (None, the reason) where it cannot; (None, None) where drop and act
    are identities (a plain BatchNorm to the patterns), and for every other layer."""
    if not convert.is_norm_act(layer):
        return None, None
    drop, act = layer.drop, layer.act
    if not activations.is_identity(drop):
        return None, f"its drop, {_words(drop)}, is not the identity: drop and act run after the layer"
    if activations.is_identity(act):
        return None, None
    own = activations.of_module(act)
    if own is None:
        return None, f"its act, {_words(act)}, is not an activation bn_triton fuses: it runs after the layer"
    if getattr(layer, "activation", None) not in (None, own):
        return None, f"already fused (activation={layer.activation!r})"
    return own, None


def _words(module: nn.Module) -> str:
    text = repr(module)
    return text if "\n" not in text else type(module).__name__


def _identities(node: fx.Node, mods: dict) -> tuple:
    """(end, chain): ``node``'s value carried through the identities that each read it alone
    (nn.Identity, drops at rate 0), ``chain`` these nodes in order and ``end`` the last of them
    (``node`` where there is none)."""
    chain = []
    while len(node.users) == 1:
        (user,) = node.users
        if not _is_identity(user, node, mods):
            break
        chain.append(user)
        node = user
    return node, tuple(chain)


def _is_identity(node: fx.Node, x: fx.Node, mods: dict) -> bool:
    """Whether ``node`` returns ``x`` as it is, in the mode of its graph."""
    if not node.args or node.args[0] is not x:
        return False
    if node.op == "call_module":
        return len(node.args) == 1 and not node.kwargs and activations.is_identity(mods[node.target])
    if node.op == "call_function":
        drop = activations.drop_call(node.target, tuple(node.args), dict(node.kwargs))
        return drop is not None and (drop[0] == 0.0 or not drop[1])
    return False


def _not_identity(node: fx.Node, x: fx.Node, mods: dict, via: str) -> Optional[str]:
    """Why ``node``, a drop that reads ``x``, is not looked through; None where it is no drop."""
    if not node.args or node.args[0] is not x:
        return None
    if node.op == "call_module":
        rate = activations.drop_rate(mods[node.target])
    elif node.op == "call_function":
        rate = (activations.drop_call(node.target, tuple(node.args), dict(node.kwargs)) or (None,))[0]
    else:
        return None
    if rate is None:
        return None
    return f"output{via} feeds {_describe(node, mods)} at rate {rate:g}, not the identity (a drop at rate 0 is)"


def _via(chain: tuple, mods: dict) -> str:
    return f", through {', '.join(_describe(n, mods) for n in chain)}," if chain else ""


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


def _unsafe_between(bn: fx.Node, add: fx.Node, mods: dict, chain: tuple) -> Optional[str]:
    """Why the BatchNorm may not run later, at its add (where the fused call goes), or None. The
    identities of ``chain`` go with it: each reads only the one before and is read only by the next."""
    node = bn.next
    while node is not add:
        if node in chain:
            node = node.next
            continue
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
        known = type(layer).__module__.startswith(("torch.nn.", "bn_triton.")) or _fusable(layer)
        known = known or activations.drop_rate(layer) is not None  # timm's drops: their inplace flag
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
        keep = next(((res, i) for res, i in claimants if res[i].operand is add.args[0]), claimants[0])
        for res, i in claimants:
            if res is not keep[0] or i != keep[1]:
                res[i] = RESIDUAL


def _decide(results: list, modes: list) -> list | str:
    """The sites to fuse, if every call of the layer fuses alike, in every graph (``modes``: each call's);
    else why the layer stays."""
    kinds = [r.kind if isinstance(r, _Site) else r for r in results]
    sites = all(isinstance(r, _Site) for r in results)
    if sites and len(set(kinds)) == 1:
        return results
    if sites and all(r.add is not None for r in results):  # some take their add's activation, some not
        return [r.add_alone() for r in results]
    if len(set(kinds)) == 1:
        return kinds[0]
    fused = {r.kind for r in results if isinstance(r, _Site)}
    if len(set(modes)) == 1:
        return f"called {len(results)} times, and not every call fuses alike: {_counted(kinds, fused)}"
    by_mode = collections.defaultdict(list)
    for mode, kind in zip(modes, kinds, strict=True):
        by_mode[mode].append(kind)
    return "not every call fuses alike: " + "; ".join(f"in {m} {_counted(k, fused)}" for m, k in by_mode.items())


def _counted(kinds: list, fused: set) -> str:
    counts = collections.Counter(kinds)
    return ", ".join(f"{n} {describe_kind(k)}" if k in fused else f"{n} not ({k})" for k, n in counts.items())


def _report(model: nn.Module, calls: dict, decisions: dict) -> FusionReport:
    report = FusionReport()
    for name, layer in _batchnorms(model):
        decision = decisions.get(name)
        if not _fusable(layer):
            cls = type(layer)
            report.left.append((name, f"a {cls.__module__}.{cls.__qualname__}: {ONLY_THESE}"))
        elif name not in calls:
            report.left.append((name, "not called by forward (absent from the torch.fx trace), kept as it is"))
        elif isinstance(decision, list):
            report.fused.append((name, decision[0].kind))
        else:
            report.left.append((name, decision))
    return report


# ---------------------------------------------------------------- rewriting
def _rewrite(gm: fx.GraphModule, fused: dict) -> None:
    """Each fused call in place of its BatchNorm, identity, [add,] activation nodes. Operands are read
    from the graph as it is now: an earlier rewrite may have replaced them (a block's input is the last
    one's activation)."""
    graph = gm.graph
    for name, sites in fused.items():
        for site in sites:
            if not site.nodes:  # a norm + activation layer's own act: only the layer changes
                continue
            last = site.nodes[-1]
            if site.add is None:  # the BatchNorm's node stays, its layer becomes the fused one
                last.replace_all_uses_with(site.bn)
                for node in reversed(site.nodes):
                    graph.erase_node(node)
                continue
            first, second = site.add.args
            residual = second if first is site.operand else first
            with graph.inserting_before(site.add):
                call = graph.call_module(name, (site.bn.args[0],), {"residual": residual})
            call.meta.update(last.meta)
            last.replace_all_uses_with(call)
            for node in (*reversed(site.nodes), site.bn):
                graph.erase_node(node)
    graph.lint()
    gm.recompile()


def _replace_layers(gm: fx.GraphModule, decisions: dict) -> dict:
    """Fused layers become ours with their activation, torch's and timm's others ours, at the same
    names, with the same tensors (a norm + activation layer: with its very drop and act). Returns
    {id(old layer): new layer}."""
    replaced = {}
    for name in decisions:
        layer = gm.get_submodule(name)
        fused = isinstance(decisions[name], list)
        if not fused and type(layer) in OWN:
            continue  # ours already, unfused: kept as it is
        if convert.is_norm_act(layer):
            new = convert_layer(layer, modules.BatchNormAct2d, drop=layer.drop, act=layer.act)
        else:
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


def _attach_targets(model: nn.Module, gm: fx.GraphModule, graph: fx.Graph) -> None:
    """What ``graph`` calls or reads and ``gm`` lacks (``graph`` is another mode's), the model's."""
    for node in graph.nodes:
        if node.op in ("call_module", "get_attr") and not _has(gm, node.target):
            fx.graph_module._copy_attr(model, gm, node.target)


def _has(module: nn.Module, target: str) -> bool:
    try:
        operator.attrgetter(target)(module)
    except AttributeError:
        return False
    return True


# ---------------------------------------------------------------- the result of a model that reads its modes
class GraphPerMode(fx.GraphModule):
    """A GraphModule with a graph per set of modes, whose ``forward`` runs the one traced with its modules
    in the modes they are in now (torch.fx traces a read of ``self.training`` as a constant).

    ``graph`` was traced in the modes at the ``bn_triton.fuse`` call, ``mode_graphs`` in the others:
    ``mode_keys`` maps the ``training`` flags of the modules named in ``mode_names`` ("" is the model) to
    0 (``graph``) or 1 + an index into ``mode_graphs``. Modes that no graph was traced in raise an error.
    ``code`` shows ``forward`` and each graph's code (as ``_forward_mode_<i>``).
    """

    def set_modes(self, names: tuple, keys: dict, graphs: list) -> None:
        self.mode_names, self.mode_keys, self.mode_graphs = tuple(names), dict(keys), list(graphs)
        for graph in self.mode_graphs:
            graph.owning_module = self
        self.recompile()

    def recompile(self):
        python_code = super().recompile()
        if "mode_graphs" not in self.__dict__:  # within GraphModule.__init__: one graph so far
            return python_code
        cls = type(self)
        codes = [python_code] + [graph.python_code(root_module="self") for graph in self.mode_graphs]
        text = [_dispatch_source(python_code.src, self.mode_names, self.mode_keys, len(codes))]
        for i, code in enumerate(codes):
            method = cls.forward if i == 0 else _forward_from_src(code.src, code.globals)
            setattr(cls, f"_forward_mode_{i}", method)
            keys = " or ".join(repr(key) for key, j in self.mode_keys.items() if j == i)
            text.append(f"# traced with modes {keys}" + code.src.replace("def forward(", f"def _forward_mode_{i}(", 1))
        cls.forward = _forward_from_src(text[0], python_code.globals)
        self._code = "\n".join(text)
        return python_code

    def _modes_not_traced(self, modes: tuple):
        now = {True: [], False: []}
        for name, training in zip(self.mode_names, modes, strict=True):
            now[training].append(name or "the model")
        raise RuntimeError(
            f"bn_triton.fuse traced {type(self).__name__} in the modes at the call, in training and in eval mode; "
            f"of the modules whose mode its graphs read, now in training: {', '.join(now[True])}; in eval mode: "
            f"{', '.join(now[False])}. bn_triton.fuse the model again in these modes"
        )

    def __deepcopy__(self, memo):
        result = super().__deepcopy__(memo)  # GraphModule's: one graph; the others went with __dict__
        if "mode_graphs" in self.__dict__:  # not while bn_triton.fuse builds it
            result.set_modes(self.mode_names, self.mode_keys, copy.deepcopy(self.mode_graphs, memo))
        return result

    def __copy__(self):
        """Every child, not only what ``graph`` calls (GraphModule's): the other graphs' and the flags'."""
        result = GraphPerMode(fx.graph_module._CodeOnlyModule(dict(self.__dict__)), self.graph, type(self).__name__)
        result.meta = getattr(self, "meta", {})
        for name, value in result.meta.get(_PRESERVED, {}).items():
            setattr(result, name, value)
        if "mode_graphs" in self.__dict__:
            result.set_modes(self.mode_names, self.mode_keys, self.mode_graphs)
        return result

    def __reduce__(self):
        """As GraphModule's: each graph as its code, traced again when loaded."""
        body = {k: v for k, v in self.__dict__.items() if k not in ("_graph", "mode_graphs")}
        sources = []
        for graph in (self.graph, *self.mode_graphs):
            code = graph.python_code(root_module="self")
            sources.append(fx.graph_module._format_import_block(code.globals, sys_importer) + code.src)
        return (_graph_per_mode, (body, sources, type(self).__name__))

    def __reduce_package__(self, exporter):
        raise NotImplementedError(
            "bn_triton.fuse: torch.package would keep one of this model's graphs (one set of modes); "
            "pickle it (torch.save) instead"
        )


def _graph_per_mode(body: dict, sources: list, class_name: str) -> GraphPerMode:
    graphs = [
        fx.graph_module._deserialize_graph_module(_forward_from_src(source, {}), dict(body)).graph for source in sources
    ]
    result = GraphPerMode(fx.graph_module._CodeOnlyModule(dict(body)), graphs[0], class_name)
    for k, v in body.items():
        if not hasattr(result, k):
            setattr(result, k, v)
    result.meta = body.get("meta", {})
    result.set_modes(body["mode_names"], body["mode_keys"], graphs[1:])
    return result


def _dispatch_source(src: str, names: tuple, keys: dict, count: int) -> str:
    """``forward`` with the signature of the first graph's (``src``): it calls the graph of the flags."""
    args = next(n for n in ast.parse(src).body if isinstance(n, ast.FunctionDef)).args
    passed = [a.arg for a in args.posonlyargs + args.args][1:]  # not self
    passed += [f"*{args.vararg.arg}"] if args.vararg else []
    passed += [f"{a.arg}={a.arg}" for a in args.kwonlyargs]
    passed += [f"**{args.kwarg.arg}"] if args.kwarg else []
    lines = [f"def forward({ast.unparse(args)}):", f"    modes = ({''.join(f'{_path(n)}.training, ' for n in names)})"]
    for i in range(count):
        matches = " or ".join(f"modes == {key!r}" for key, j in keys.items() if j == i)
        lines += [f"    if {matches}:", f"        return self._forward_mode_{i}({', '.join(passed)})"]
    return "\n".join([*lines, "    return self._modes_not_traced(modes)", ""])


def _path(name: str) -> str:
    """The submodule ``name`` of ``self`` through the ``_modules`` dicts: nn.Module.__getattr__ costs 18 times
    as much (efficientnet_v2_s's 35 flags: 21 us a forward instead of 370, on a CPU)."""
    return "self" + "".join(f"._modules[{part!r}]" for part in name.split(".") if name)
