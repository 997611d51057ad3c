"""bn_triton.fuse keeps the model's train/eval behaviour: torch.fx records a read of ``self.training``
as a constant, so a model that reads it (dropout, stochastic depth, ``if self.training:``) is traced
in each mode, and the result runs the graph of the modes its modules are in.

Each model is fused in training mode and in eval mode (from a copy: the result holds the model's very
tensors), then run beside the original in a sequence of modes, both under the same seed before each
call: outputs, every gradient and the running statistics must agree at every step, in float64 (where
rounding cannot hide a wrong graph: float32 weight gradients that cancel to 1e-4 differ by 1e-5 between
any two summation orders). torchvision's and timm's models that read their modes are in
tests/test_real_models.py.
"""

import copy
import io
import pickle

import pytest
import torch
import torch.nn.functional as F
from torch import fx, nn

import bn_triton
from bn_triton.fuse import UNTRACEABLE
from tests.helpers import TOL, make

MODES = ["train", "eval", "train", "train", "eval", "eval", "train"]  # every switch, and repeats


def stochastic_depth(input, p: float, mode: str, training: bool = True):
    """torchvision.ops.stochastic_depth: in training, each row (or the batch) zeroed with probability
    p, the rest scaled by 1 / (1 - p); the input as it is in eval."""
    if p < 0.0 or p > 1.0:
        raise ValueError(f"drop probability has to be between 0 and 1, but got {p}")
    if mode not in ("batch", "row"):
        raise ValueError(f"mode has to be either 'batch' or 'row', but got {mode}")
    if not training or p == 0.0:
        return input
    survival_rate = 1.0 - p
    size = [input.shape[0]] + [1] * (input.ndim - 1) if mode == "row" else [1] * input.ndim
    noise = torch.empty(size, dtype=input.dtype, device=input.device).bernoulli_(survival_rate)
    if survival_rate > 0.0:
        noise.div_(survival_rate)
    return input * noise


fx.wrap("stochastic_depth")  # as torchvision does: a call node, its ``training`` a constant


class StochasticDepth(nn.Module):
    def __init__(self, p: float, mode: str = "row"):
        super().__init__()
        self.p, self.mode = p, mode

    def forward(self, x):
        return stochastic_depth(x, self.p, self.mode, self.training)


class _Dropout(nn.Module):
    """BN -> ReLU, dropout as timm's heads write it, BN -> add -> ReLU."""

    def __init__(self):
        super().__init__()
        self.bn1, self.bn2 = nn.BatchNorm2d(3), nn.BatchNorm2d(3)

    def forward(self, x, r):
        y = F.dropout(torch.relu(self.bn1(x)), 0.5, training=self.training)
        return torch.relu(self.bn2(y) + r)


class _Branch(nn.Module):
    """``if self.training:`` noise before bn1's ReLU: bn1 feeds an add in training and the ReLU in eval,
    so it fuses in neither (one layer, one activation for both graphs); bn2 fuses in both."""

    def __init__(self):
        super().__init__()
        self.bn1, self.bn2 = nn.BatchNorm2d(3), nn.BatchNorm2d(3)

    def forward(self, x, r):
        y = self.bn1(x)
        if self.training:
            y = y + 0.1 * torch.randn_like(x)
        return torch.relu(self.bn2(torch.relu(y)) + r)


class _Block(nn.Module):
    """An MBConv-like residual block: BN -> ReLU, BN, stochastic depth, ``+= input`` (torchvision's)."""

    def __init__(self, p):
        super().__init__()
        self.bn1, self.bn2 = nn.BatchNorm2d(3), nn.BatchNorm2d(3)
        self.stochastic_depth = StochasticDepth(p)

    def forward(self, x):
        y = self.stochastic_depth(self.bn2(torch.relu(self.bn1(x))))
        y += x
        return y


class _Stochastic(nn.Module):
    def __init__(self):
        super().__init__()
        self.block1, self.block2 = _Block(0.5), _Block(0.9)

    def forward(self, x, r):
        return self.block2(self.block1(x)) + r


MODELS = {"dropout": _Dropout, "if-training": _Branch, "stochastic-depth": _Stochastic}


def _inputs(device):
    return make((4, 3, 4, 5), torch.float64, device, seed=1), make((4, 3, 4, 5), torch.float64, device, seed=2)


def _model(kind: str, device):
    return MODELS[kind]().to(device, torch.float64)


def _step(model, seed, device):
    """One forward and backward under ``seed``: the output, every gradient, the buffers after."""
    xs = [t.requires_grad_() for t in _inputs(device)]
    params = {k.removeprefix("_orig_mod."): p for k, p in model.named_parameters()}  # torch.compile's wrapper
    torch.manual_seed(seed)
    y = model(*xs)
    weight = make(y.shape, y.dtype, y.device, seed=3)  # a loss whose gradient BN does not cancel
    grads = torch.autograd.grad((y * weight).sum(), xs + list(params.values()))
    buffers = {k.removeprefix("_orig_mod."): v.clone() for k, v in model.named_buffers()}
    return y.detach(), dict(zip(["x", "r", *params], grads, strict=True)), buffers


def _set(model, modes: dict):
    """``modes``: {submodule name: True | False}, set in this order ("" is the model: all of it)."""
    for name, training in modes.items():
        model.get_submodule(name).train(training)


def _same_in_every_mode(model, fused, device, sequence):
    for step, modes in enumerate(sequence):
        if isinstance(modes, str):
            modes = {"": modes == "train"}
        _set(model, modes)
        _set(fused, modes)
        (y0, g0, b0), (y1, g1, b1) = _step(model, step, device), _step(fused, step, device)
        what = f"step {step}, modes {modes}"
        _close(y1, y0, f"output, {what}", **TOL[torch.float64])
        assert g1.keys() == g0.keys() and list(b1) == list(b0)
        for k, g in g0.items():
            atol = TOL[torch.float64]["atol"] * max(1.0, float(g.abs().max()))  # a sum over the batch
            _close(g1[k], g, f"grad of {k}, {what}", atol=atol, rtol=TOL[torch.float64]["rtol"])
        for k, b in b0.items():
            _close(b1[k], b, f"{k}, {what}", **TOL[torch.float64])


def _close(actual, expected, what, **tol):
    torch.testing.assert_close(actual, expected, **tol, msg=lambda message: f"{what}: {message}")


@pytest.mark.parametrize("fused_in", ["train", "eval"])
@pytest.mark.parametrize("kind", list(MODELS))
def test_fused_model_follows_train_and_eval(kind, fused_in, device):
    torch.manual_seed(0)
    model = _model(kind, device).train(fused_in == "train")
    fused = bn_triton.fuse(copy.deepcopy(model), _inputs(device))
    assert list(fused.state_dict()) == list(model.state_dict())
    _same_in_every_mode(model, fused, device, MODES if fused_in == "train" else MODES[1:] + MODES[:1])


def test_each_mode_fuses_alike_or_the_layer_stays(device):
    """bn1 would fuse into relu in eval and into add + relu in training: one layer serves both graphs,
    so it stays; bn2 fuses in both, and is counted once."""
    model = _model("if-training", device)
    report = bn_triton.fuse(model, _inputs(device)).fusion_report
    assert report.fused == [("bn2", "add+relu")]
    ((name, why),) = report.left
    assert name == "bn1"
    assert why == "not every call fuses alike: in training mode 1 into add + relu; in eval mode 1 into relu", why
    assert str(report).startswith("fused 1 of 2 BatchNorm layers")


def test_mixed_modes_at_the_call_and_after(device):
    """Fused with block2 in eval: that state, all training and all eval are traced and followed in any
    order; a state none of them is (block1 alone in eval) raises instead of running another's graph."""
    torch.manual_seed(0)
    model = _model("stochastic-depth", device)
    model.block2.eval()
    fused = bn_triton.fuse(copy.deepcopy(model), _inputs(device))
    mixed = {"": True, "block2": False}
    _same_in_every_mode(model, fused, device, [mixed, "eval", mixed, "train", "eval", mixed])
    fused.train()
    fused.block1.eval()
    with pytest.raises(RuntimeError, match=r"block1\.stochastic_depth.*bn_triton\.fuse the model again"):
        fused(*_inputs(device))


def test_only_the_modes_flags_select_the_graph(device):
    """The BatchNorm layers and dropout modules read their own flags when they run: setting them apart
    (frozen BatchNorm statistics) needs no graph of its own."""
    torch.manual_seed(0)
    model = _model("stochastic-depth", device)
    fused = bn_triton.fuse(copy.deepcopy(model), _inputs(device))
    frozen = {"": True, "block1.bn1": False, "block2.bn2": False}
    _same_in_every_mode(model, fused, device, [frozen, "eval", frozen])


@pytest.mark.parametrize(
    "kind,flag", [("if-training", "self.training"), ("stochastic-depth", "self._modules['block1']")]
)
def test_result_copies_pickles_prints_and_compiles(kind, flag, device):
    """deepcopy, pickle and torch.save keep both graphs; ``code`` shows both and how one is chosen;
    torch.compile (fullgraph) and a torch.fx retrace give the eager results in both modes."""
    torch.manual_seed(0)
    model = _model(kind, device)
    fused = bn_triton.fuse(copy.deepcopy(model), _inputs(device))
    assert isinstance(fused, fx.GraphModule)
    assert fused.code.count("def ") == 3 and flag in fused.code.splitlines()[1], fused.code
    buffer = io.BytesIO()
    torch.save(fused, buffer)
    buffer.seek(0)
    copies = {
        "deepcopy": copy.deepcopy(fused),
        "pickle": pickle.loads(pickle.dumps(fused)),
        "torch.save": torch.load(buffer, weights_only=False),
        "copy": copy.copy(copy.deepcopy(fused)),  # shallow: DataParallel's replicas
    }
    for name, other in copies.items():
        assert other.fusion_report == fused.fusion_report, name
        assert other.code.count("def ") == 3 and other.mode_keys == fused.mode_keys, name  # names may differ
        assert list(other.state_dict()) == list(model.state_dict()), name
        _same_in_every_mode(copy.deepcopy(model), other, device, ["eval", "train", "eval"])
    torch._dynamo.reset()
    try:
        compiled = torch.compile(copy.deepcopy(fused), fullgraph=True, backend="aot_eager")
        _same_in_every_mode(copy.deepcopy(model), compiled, device, ["train", "eval", "train"])
    finally:
        torch._dynamo.reset()
    for mode in ("train", "eval"):
        retraced = fx.symbolic_trace(copy.deepcopy(fused).train(mode == "train"))
        expected = copy.deepcopy(model).train(mode == "train")
        _same_in_every_mode(expected, retraced, device, [mode])


def test_fusing_the_result_again_keeps_both_graphs(device):
    torch.manual_seed(0)
    model = _model("dropout", device)
    again = bn_triton.fuse(bn_triton.fuse(copy.deepcopy(model), _inputs(device)), _inputs(device))
    assert again.fusion_report.left == [
        ("bn1", "already fused (activation='relu')"),
        ("bn2", "called with a residual or more arguments already"),
    ]
    _same_in_every_mode(model, again, device, ["train", "eval", "train"])


def test_a_model_without_mode_reads_keeps_one_graph(device):
    class Plain(nn.Module):
        def __init__(self):
            super().__init__()
            self.bn, self.drop = nn.BatchNorm2d(3), nn.Dropout(0.5)  # nn.Dropout reads its flag as it runs

        def forward(self, x, r):
            return self.drop(torch.relu(self.bn(x)))

    fused = bn_triton.fuse(Plain().to(device, torch.float64), _inputs(device))
    assert type(fused).__bases__ == (fx.GraphModule,) and fused.code.count("def ") == 1


class _EvalUntraceable(nn.Module):
    def __init__(self):
        super().__init__()
        self.bn = nn.BatchNorm2d(3)

    def forward(self, x):
        y = torch.relu(self.bn(x))
        if not self.training and y.sum() > 0:  # data-dependent control flow, in eval only
            y = y * 2
        return y


def test_a_model_untraceable_in_one_mode_is_not_fused_in_the_other():
    with pytest.raises(RuntimeError, match="could not trace _EvalUntraceable in eval mode"):
        bn_triton.fuse(_EvalUntraceable())
    model = _EvalUntraceable()
    with pytest.warns(UserWarning, match="could not trace _EvalUntraceable in eval mode.*converted without fusion"):
        result = bn_triton.fuse(model, on_untraceable="convert")
    assert result is model and result.fusion_report.left == [("bn", UNTRACEABLE)]
    assert model.training, "the modes are restored"
