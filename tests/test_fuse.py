"""bn_triton.fuse: BatchNorm -> [add ->] activation, and BatchNorm -> add alone, found in a model's torch.fx
trace (through nn.Identity and drops at rate 0) and run as our fused layers.

torchvision's and timm's own models are in tests/test_real_models.py. Here torchvision may not be
importable, so the blocks are built as torchvision writes them (conv1x1 / conv3x3 helpers,
downsample = Sequential(conv1x1, BatchNorm2d), ``out += identity``, one ``nn.ReLU(inplace=True)``
called several times, a conv-BN-ReLU-maxpool stem), at tiny widths: the interpreter's cost is per
launch, so the one test that trains the ResNet-50-shaped net (212 launches a step) does all its
checks on the same steps, in channels_last (a few programs per launch there).
"""

import collections
import copy
import logging
import operator

import pytest
import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.profiler import ProfilerActivity, profile

import bn_triton
from bn_triton import launch
from bn_triton.fuse import RESIDUAL, UNTRACEABLE, describe_kind
from tests.helpers import TOL, make, train_launches

CL = torch.channels_last
RESNET50_REPORT = (
    "fused 49 of 53 BatchNorm layers: 33 into relu, 16 into add + relu; left 4: layer1.0.downsample.1, "
    "layer2.0.downsample.1, layer3.0.downsample.1, layer4.0.downsample.1 (output feeds an add as the residual)"
)


# ---------------------------------------------------------------- torchvision's blocks, rebuilt
def conv3x3(inplanes, planes, stride=1):
    return nn.Conv2d(inplanes, planes, 3, stride=stride, padding=1, bias=False)


def conv1x1(inplanes, planes, stride=1):
    return nn.Conv2d(inplanes, planes, 1, stride=stride, bias=False)


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, inplanes, planes, stride=1, downsample=None):
        super().__init__()
        self.conv1 = conv3x3(inplanes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample

    def forward(self, x):
        identity = x
        out = self.conv1(x)
        out = self.bn1(out)
        out = self.relu(out)
        out = self.conv2(out)
        out = self.bn2(out)
        if self.downsample is not None:
            identity = self.downsample(x)
        out += identity
        out = self.relu(out)
        return out


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, inplanes, planes, stride=1, downsample=None):
        super().__init__()
        self.conv1 = conv1x1(inplanes, planes)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = conv3x3(planes, planes, stride)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = conv1x1(planes, planes * self.expansion)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x):
        identity = x
        out = self.conv1(x)
        out = self.bn1(out)
        out = self.relu(out)
        out = self.conv2(out)
        out = self.bn2(out)
        out = self.relu(out)
        out = self.conv3(out)
        out = self.bn3(out)
        if self.downsample is not None:
            identity = self.downsample(x)
        out += identity
        out = self.relu(out)
        return out


class ResNet(nn.Module):
    """torchvision's ResNet at ``width`` channels in the stem (64 there), one stage per entry of ``layers``."""

    def __init__(self, block, layers, width=4, num_classes=10):
        super().__init__()
        self.inplanes = width
        self.conv1 = nn.Conv2d(3, width, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.stages = len(layers)
        for i, blocks in enumerate(layers):
            setattr(self, f"layer{i + 1}", self._make_layer(block, width * 2**i, blocks, stride=1 if i == 0 else 2))
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(self.inplanes, num_classes)

    def _make_layer(self, block, planes, blocks, stride):
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = nn.Sequential(
                conv1x1(self.inplanes, planes * block.expansion, stride), nn.BatchNorm2d(planes * block.expansion)
            )
        layers = [block(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes * block.expansion
        layers += [block(self.inplanes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        for i in range(self.stages):
            x = getattr(self, f"layer{i + 1}")(x)
        return self.fc(torch.flatten(self.avgpool(x), 1))


def _resnet50(device):
    torch.manual_seed(0)
    return ResNet(Bottleneck, [3, 4, 6, 3]).to(device, memory_format=CL)


def _images(seed, device, n=4, size=64):
    """4 images of 64x64: layer4 normalizes 16 values per channel. With fewer the net amplifies rounding
    a lot (2 values: BN's input gradient is 0 but for rounding), and the interpreter's cost is per
    launch, not per value."""
    return make((n, 3, size, size), torch.float32, device, seed=seed).contiguous(memory_format=CL)


def _batchnorm_calls(gm):
    calls = [n for n in gm.graph.nodes if n.op == "call_module"]
    return [n for n in calls if isinstance(gm.get_submodule(n.target), nn.BatchNorm2d)]


def _close(actual, expected, what=""):
    """Tight float32: ours fused against ours unfused differ only where the epilogue's rounding does."""
    scale = max(1.0, float(expected.detach().abs().max())) if expected.numel() else 1.0
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-5 * scale, msg=lambda m: f"{what}: {m}")


# ---------------------------------------------------------------- the ResNets
@pytest.mark.parametrize(
    "block,layers,fused,relus,adds",
    [(Bottleneck, [3, 4, 6, 3], 49, 33, 16), (BasicBlock, [2, 2, 2, 2], 17, 9, 8)],
    ids=["resnet50", "resnet18"],
)
def test_resnet_fuses_every_pattern_and_reports_it(block, layers, fused, relus, adds, device, caplog):
    """Stem and bn1 (bn2 too in a Bottleneck) into their ReLU, the last BN of each block into add +
    ReLU; the downsample BNs feed the add as its residual and stay (converted to ours)."""
    torch.manual_seed(0)
    model = ResNet(block, layers).to(device)
    model.layer2.eval()  # modes are kept per submodule
    model.layer3[1].bn2.eval()
    with caplog.at_level(logging.INFO, logger="bn_triton"):
        gm = bn_triton.fuse(model, make((2, 3, 32, 32), torch.float32, device, seed=0))
    report = gm.fusion_report
    assert isinstance(gm, fx.GraphModule)
    assert collections.Counter(k for _, k in report.fused) == {"relu": relus, "add+relu": adds}
    downsamples = [f"layer{i}.0.downsample.1" for i in range(1 if block is Bottleneck else 2, 5)]
    assert report.left == [(name, RESIDUAL) for name in downsamples]
    assert f"fused {fused} of {fused + len(downsamples)} BatchNorm layers" in str(report)
    assert str(report) in caplog.text
    if block is Bottleneck:
        assert str(report) == RESNET50_REPORT

    calls = _batchnorm_calls(gm)
    assert len(calls) == fused + len(downsamples)
    assert sum("residual" in n.kwargs for n in calls) == adds
    leftover = [n for n in gm.graph.nodes if n.op in ("call_function", "call_method")]
    assert [n.target for n in leftover] == [torch.flatten], "every ReLU and add is gone"
    assert [n.target for n in gm.graph.nodes if n.op == "call_module" and "relu" in n.target] == []
    for name, _ in report.fused:
        layer = gm.get_submodule(name)
        assert type(layer) is bn_triton.BatchNorm2d and layer.activation == "relu", name
    for name in downsamples:
        assert type(gm.get_submodule(name)) is bn_triton.BatchNorm2d and gm.get_submodule(name).activation is None
    assert type(model.bn1) is nn.BatchNorm2d, "the model itself is not changed"
    # The very tensors, and each submodule's mode.
    for name, p in model.named_parameters():
        assert gm.get_parameter(name) is p, name
    for name, b in model.named_buffers():
        assert gm.get_buffer(name) is b, name
    for name, m in model.named_modules():
        assert gm.get_submodule(name).training == m.training, name


def test_state_dict_round_trip_with_the_torch_model(device):
    torch.manual_seed(0)
    model = ResNet(BasicBlock, [1, 1]).to(device)
    gm = bn_triton.fuse(model, make((2, 3, 16, 16), torch.float32, device, seed=0))
    ours, theirs = gm.state_dict(), model.state_dict()
    assert list(ours) == list(theirs)
    for k in theirs:
        assert torch.equal(ours[k], theirs[k]), k
    torch.manual_seed(1)
    other = ResNet(BasicBlock, [1, 1]).to(device)
    gm.load_state_dict(other.state_dict(), strict=True)  # torch's weights into the fused model
    fresh = ResNet(BasicBlock, [1, 1]).to(device)
    fresh.load_state_dict(gm.state_dict(), strict=True)  # and back
    for k, v in other.state_dict().items():
        assert torch.equal(fresh.state_dict()[k], v), k


def _aten_ops(prof) -> collections.Counter:
    return collections.Counter(e.name for e in prof.events() if e.name.startswith("aten::"))


def _train(model, device, steps=2):
    """A few SGD steps, then an eval forward; what the comparison and the launch counts need."""
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    out = dict(y=[], grads=[], launches=[], expected=collections.Counter(), bn_calls=0)

    def expect(module, args):  # what our kernels should launch for this call's input
        fwd, bwd = train_launches(args[0])
        out["expected"].update(fwd)
        out["expected"].update(bwd)
        out["bn_calls"] += 1

    for step in range(steps):
        x = _images(10 + step, device).requires_grad_()
        target = torch.randint(0, 10, (x.shape[0],), generator=torch.Generator().manual_seed(step)).to(device)
        hooks = [m.register_forward_pre_hook(expect) for m in model.modules() if isinstance(m, bn_triton.BatchNorm2d)]
        before = launch.LAUNCHES.copy()
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            y = model(x)
            F.cross_entropy(y, target).backward()
        out["launches"].append(launch.LAUNCHES - before)
        for h in hooks:
            h.remove()
        if step == 0:
            out["aten"] = _aten_ops(prof)
        out["y"].append(y.detach())
        out["grads"].append({"input": x.grad, **{k: p.grad.clone() for k, p in model.named_parameters()}})
        opt.step()
        opt.zero_grad(set_to_none=True)
    out["expected"] = collections.Counter({k: v // steps for k, v in out["expected"].items()})
    out["state"] = {k: v.clone() for k, v in model.state_dict().items()}
    model.eval()
    with torch.no_grad():
        out["eval"] = model(_images(20, device))
    return out


RELU_OPS = ("aten::relu", "aten::relu_")
ADD_OPS = ("aten::add", "aten::add_")


def test_resnet50_trains_like_unfused_with_fewer_ops(device):
    """Outputs, every gradient (input's too), running statistics, num_batches_tracked and weights
    after two SGD steps, then eval, equal the unfused model's (ours, by convert_batchnorm); our
    launches per step are the same (the add and ReLU ride in our passes), torch's ReLU, its backward
    and the residual adds are gone (torch's profiler)."""
    base = _resnet50(device)
    torch_run = _train(copy.deepcopy(base), device)
    unfused = _train(bn_triton.convert_batchnorm(copy.deepcopy(base)), device)
    gm = bn_triton.fuse(copy.deepcopy(base), _images(0, device))
    assert str(gm.fusion_report) == RESNET50_REPORT
    fused = _train(gm, device)

    for step in range(2):
        _close(fused["y"][step], unfused["y"][step], f"output, step {step}")
        for k, g in unfused["grads"][step].items():
            _close(fused["grads"][step][k], g, f"grad of {k}, step {step}")
    assert list(fused["state"]) == list(unfused["state"])
    for k, v in unfused["state"].items():
        if k.endswith("num_batches_tracked"):
            assert int(fused["state"][k]) == int(v) == 2, k
        else:
            _close(fused["state"][k], v, k)
    _close(fused["eval"], unfused["eval"], "eval output")

    # Launches per step: ours, the same fused or not; none for torch's model.
    assert unfused["bn_calls"] == fused["bn_calls"] == 2 * 53
    for run in (unfused, fused):
        assert run["launches"] == [run["expected"]] * 2
    assert fused["expected"] == unfused["expected"]
    assert torch_run["launches"] == [collections.Counter()] * 2
    # torch's elementwise ops: 49 ReLUs forward and backward and 16 residual adds unfused, none fused.
    t, u, f = torch_run["aten"], unfused["aten"], fused["aten"]
    for run in (t, u):
        assert sum(run[k] for k in RELU_OPS) == 49 and run["aten::threshold_backward"] == 49
    assert sum(f[k] for k in RELU_OPS) == 0 and f["aten::threshold_backward"] == 0
    assert sum(f[k] for k in ADD_OPS) == sum(u[k] for k in ADD_OPS) - 16
    # And torch's model computes the same function, up to fp32 rounding that 53 BatchNorms amplify.
    torch.testing.assert_close(unfused["y"][0], torch_run["y"][0], atol=1e-3, rtol=1e-3)


# ---------------------------------------------------------------- torch.fx and torch.compile again
def test_result_traces_and_compiles_again(device):
    """The result is FX-traceable (our layers stay leaves, the residual a kwarg) and compiles with
    fullgraph=True; both give the eager result, running statistics included."""
    torch.manual_seed(0)
    x = make((2, 3, 16, 16), torch.float32, device, seed=0)
    gm = bn_triton.fuse(ResNet(BasicBlock, [1, 1]).to(device), x)
    assert copy.deepcopy(gm).fusion_report == gm.fusion_report
    models = [copy.deepcopy(gm) for _ in range(3)]
    retraced = fx.symbolic_trace(models[1])
    assert sum("residual" in n.kwargs for n in _batchnorm_calls(retraced)) == 2
    torch._dynamo.reset()
    try:
        compiled = torch.compile(models[2], fullgraph=True, backend="aot_eager")
        results = [models[0](x), retraced(x), compiled(x)]
    finally:
        torch._dynamo.reset()
    for got, model in zip(results[1:], models[1:], strict=True):
        _close(got, results[0], "output")
        for (k, v), ref in zip(model.state_dict().items(), models[0].state_dict().values(), strict=True):
            _close(v.float(), ref.float(), k)


# ---------------------------------------------------------------- every spelling of ReLU and add
class DropPath(nn.Module):
    """timm.layers.drop.DropPath's structure and forward: each sample zeroed with probability
    ``drop_prob`` in training, the rest scaled by 1 / (1 - drop_prob)."""

    def __init__(self, drop_prob=0.0):
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, x):
        if self.drop_prob == 0.0 or not self.training:
            return x
        keep = 1 - self.drop_prob
        return x * x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep).div_(keep)


class DropBlock2d(nn.Module):
    """timm.layers.drop.DropBlock2d's structure: the identity at rate 0 or in eval mode."""

    def __init__(self, drop_prob=0.1):
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, x):
        if not self.training or not self.drop_prob:
            return x
        raise NotImplementedError("not needed here: only the rate-0 block runs")


DropPath.__module__ = DropBlock2d.__module__ = "timm.layers.drop"


class _Pattern(nn.Module):
    """BN -> [identities ->] [add ->] [identities ->] ReLU spelled by ``fn(self, bn(x), r)``."""

    def __init__(self, fn):
        super().__init__()
        self.bn = nn.BatchNorm2d(3)
        self.relu = nn.ReLU()
        self.relu_inplace = nn.ReLU(inplace=True)
        self.offset = nn.Parameter(torch.randn(3, 1, 1))
        self.identity = nn.Identity()
        self.drop0, self.drop0_inplace, self.drop = nn.Dropout(0.0), nn.Dropout(0.0, inplace=True), nn.Dropout(0.5)
        self.drop_path0, self.drop_path, self.drop_block0 = DropPath(0.0), DropPath(0.2), DropBlock2d(0.0)
        self.fn = fn

    def forward(self, x, r):
        return self.fn(self, self.bn(x), r)


def _iadd(m, y, r):
    y += r
    return m.relu_inplace(y)


RELUS = {
    "nn.ReLU": lambda m, y, r: m.relu(y),
    "nn.ReLU(inplace=True)": lambda m, y, r: m.relu_inplace(y),
    "F.relu": lambda m, y, r: F.relu(y),
    "F.relu(inplace=True)": lambda m, y, r: F.relu(y, inplace=True),
    "torch.relu": lambda m, y, r: torch.relu(y),
    "torch.relu_": lambda m, y, r: torch.relu_(y),
    "Tensor.relu": lambda m, y, r: y.relu(),
    "Tensor.relu_": lambda m, y, r: y.relu_(),
}
ADDS = {
    "+": lambda m, y, r: m.relu(y + r),
    "+ (residual first)": lambda m, y, r: torch.relu(r + y),
    "+=": _iadd,
    "torch.add": lambda m, y, r: F.relu(torch.add(y, r)),
    "torch.add(alpha=1)": lambda m, y, r: torch.relu(torch.add(r, y, alpha=1)),
    "Tensor.add": lambda m, y, r: y.add(r).relu_(),
    "Tensor.add_": lambda m, y, r: y.add_(r, alpha=1.0).relu(),
}


def _iadd_alone(m, y, r):
    y += r
    return y


ADDS_ALONE = {  # BN -> add, its result read by anything but one activation: the add alone fuses
    "+": lambda m, y, r: y + r,
    "+ (residual first), two users": lambda m, y, r: (lambda s: m.relu(s) * s)(r + y),
    "+=": _iadd_alone,
    "torch.add then sigmoid": lambda m, y, r: torch.sigmoid(torch.add(y, r)),
    "Tensor.add_ then a product": lambda m, y, r: y.add_(r) * 2,
}
LOOKED_THROUGH = {  # identities between the BatchNorm, its add and its activation: spelling -> kind
    "nn.Identity -> relu": (lambda m, y, r: m.relu(m.identity(y)), "relu"),
    "DropBlock2d(0) -> relu": (lambda m, y, r: m.relu(m.drop_block0(y)), "relu"),
    "Dropout(0) -> Identity -> relu6": (lambda m, y, r: F.relu6(m.identity(m.drop0(y))), "relu6"),
    "F.dropout(training=False) -> silu": (lambda m, y, r: F.silu(F.dropout(y, 0.5, training=False)), "silu"),
    "F.dropout(p=0) -> add -> Identity -> relu": (
        lambda m, y, r: torch.relu(m.identity(F.dropout(y, 0.0, m.training) + r)),
        "add+relu",
    ),
    "DropPath(0) -> add": (lambda m, y, r: m.drop_path0(y) + r, "add"),
    "Dropout(0, inplace=True) -> add -> DropPath(0) -> hardswish": (
        lambda m, y, r: F.hardswish(m.drop_path0(r + m.drop0_inplace(y))),
        "add+hardswish",
    ),
    "add -> Identity, then no activation": (lambda m, y, r: m.identity(y + r) * 2, "add"),
    "add -> Dropout(0.5) -> relu": (lambda m, y, r: torch.relu(m.drop(y + r)), "add"),
}


def _inputs(device):
    x = make((2, 3, 4, 5), torch.float32, device, seed=1)
    return x, make((2, 3, 4, 5), torch.float32, device, seed=2)


def _same_as_original(model, gm, device, backward=True):
    """Train-mode forward (and backward) of the torch model and of the result: same outputs,
    gradients and running statistics."""
    x, r = _inputs(device)
    results = []
    for m in (model, gm):
        xs = [x.clone().requires_grad_(backward), r.clone().requires_grad_(backward)]
        torch.manual_seed(0)  # the same dropout masks
        y = m(*xs)
        grads = {}
        if backward:
            params = dict(m.named_parameters())
            got = torch.autograd.grad(y.sum(), xs + list(params.values()), allow_unused=True)
            grads = dict(zip(["x", "r", *params], got, strict=True))
        results.append((y, grads, {k: v.clone() for k, v in m.named_buffers()}))
    (y0, g0, b0), (y1, g1, b1) = results
    torch.testing.assert_close(y1, y0, **TOL[torch.float32])
    assert g1.keys() == g0.keys() and b1.keys() == b0.keys()
    for k, g in g0.items():
        if g is None:
            assert g1[k] is None, k
        else:
            torch.testing.assert_close(g1[k], g, atol=1e-4, rtol=1e-4, msg=k)
    for k, b in b0.items():
        torch.testing.assert_close(b1[k], b, **TOL[torch.float32], msg=k)


@pytest.mark.parametrize("spelling", list(RELUS) + list(ADDS))
def test_every_relu_and_add_spelling_fuses(spelling, device):
    kind = "relu" if spelling in RELUS else "add+relu"
    torch.manual_seed(0)
    model = _Pattern({**RELUS, **ADDS}[spelling]).to(device)
    gm = bn_triton.fuse(copy.deepcopy(model), _inputs(device))
    assert gm.fusion_report.fused == [("bn", kind)] and gm.fusion_report.left == []
    assert [n.op for n in gm.graph.nodes] == ["placeholder", "placeholder", "call_module", "output"]
    _same_as_original(model, gm, device)


@pytest.mark.parametrize("spelling", list(ADDS_ALONE) + list(LOOKED_THROUGH))
def test_adds_alone_and_identities_fuse(spelling, device):
    """BN -> add with no activation after it: one call with the residual (the end of an inverted
    residual block); nn.Identity and drops at rate 0 are looked through, before and after the add."""
    fn, kind = (ADDS_ALONE[spelling], "add") if spelling in ADDS_ALONE else LOOKED_THROUGH[spelling]
    torch.manual_seed(0)
    model = _Pattern(fn).to(device)
    gm = bn_triton.fuse(copy.deepcopy(model), _inputs(device))
    assert gm.fusion_report.fused == [("bn", kind)] and gm.fusion_report.left == []
    assert str(gm.fusion_report) == f"fused 1 of 1 BatchNorm layers: 1 {describe_kind(kind)}"
    (call,) = _batchnorm_calls(gm)
    assert ("residual" in call.kwargs) == kind.startswith("add")
    assert gm.bn.activation == (None if kind == "add" else kind.removeprefix("add+"))
    assert [n for n in gm.graph.nodes if n.op == "call_function" and n.target in (operator.add, F.dropout)] == []
    kept = {"add -> Identity, then no activation": ["identity"], "add -> Dropout(0.5) -> relu": ["drop"]}
    modules = [n.target for n in gm.graph.nodes if n.op == "call_module" and n.target not in ("bn", "relu")]
    assert modules == kept.get(spelling, [])
    _same_as_original(model, gm, device)


def _graph_module(first_is_bn: bool):
    """BN -> operator.iadd -> ReLU as a GraphModule (symbolic_trace records ``+=`` as operator.add)."""
    graph = fx.Graph()
    x, r = graph.placeholder("x"), graph.placeholder("r")
    y = graph.call_module("bn", (x,))
    s = graph.call_function(operator.iadd, (y, r) if first_is_bn else (r, y))
    graph.output(graph.call_function(torch.relu, (s,)))
    root = nn.Module()
    root.bn = nn.BatchNorm2d(3)
    return fx.GraphModule(root, graph)


@pytest.mark.parametrize("first_is_bn", [True, False])
def test_in_place_add_fuses_only_into_the_batchnorm_output(first_is_bn, device):
    """A GraphModule is taken as it is: ``y += r`` fuses; ``r += y`` writes into r, which the fused
    call would no longer do, so it stays."""
    model = _graph_module(first_is_bn).to(device)
    gm = bn_triton.fuse(copy.deepcopy(model), _inputs(device))
    if first_is_bn:
        assert gm.fusion_report.fused == [("bn", "add+relu")]
    else:
        assert gm.fusion_report.left == [("bn", "the add writes into its other operand in place")]
    assert operator.iadd in [n.target for n in model.graph.nodes], "the model's own graph is not changed"
    _same_as_original(model, gm, device, backward=False)  # r += y: r is a leaf that requires grad


# ---------------------------------------------------------------- what must not fuse
NOT_FUSED = {
    "BN output used twice": (lambda m, y, r: m.relu(y) + y, "output has 2 users"),
    "ReLU on a tensor read elsewhere": (lambda m, y, r: torch.relu(y + r) * (y + r), "output has 2 users"),
    "add_ alias read after": (lambda m, y, r: y.add_(r).relu() * y, "output has 2 users"),
    "broadcast (N, C, 1, 1)": (
        lambda m, y, r: torch.relu(y + r.mean((2, 3), keepdim=True)),
        "output feeds an add that broadcasts (2, 3, 1, 1) to (2, 3, 4, 5)",
    ),
    "broadcast (C, 1, 1)": (
        lambda m, y, r: torch.relu(y + m.offset),
        "output feeds an add that broadcasts (3, 1, 1) to (2, 3, 4, 5)",
    ),
    "alpha=2": (lambda m, y, r: torch.relu(torch.add(y, r, alpha=2)), "output feeds an add with alpha=2"),
    "Tensor.add alpha=0.5": (lambda m, y, r: y.add(r, alpha=0.5).relu(), "output feeds an add with alpha=0.5"),
    "add into the residual in place": (
        lambda m, y, r: torch.relu(r.clone().add_(y)),
        "the add writes into its other operand in place",
    ),
    "in-place op before the add": (
        lambda m, y, r: torch.relu(y + torch.relu_(r * 2)),
        "torch.relu_ may write in place between its call and its add",
    ),
    "Dropout(0.5) before the ReLU": (
        lambda m, y, r: torch.relu(m.drop(y)),
        "output feeds drop (Dropout) at rate 0.5, not the identity (a drop at rate 0 is)",
    ),
    "DropPath(0.2) before the add": (
        lambda m, y, r: torch.relu(m.drop_path(m.identity(y)) + r),
        "output, through identity (Identity), feeds drop_path (DropPath) at rate 0.2, not the identity (a drop at "
        "rate 0 is)",
    ),
    "identity read twice": (
        lambda m, y, r: (lambda i: torch.relu(i) + i)(m.identity(y)),
        "output, through identity (Identity), has 2 users",
    ),
    "in-place op before the add, through an identity": (
        lambda m, y, r: m.identity(y) + torch.relu_(r * 2),
        "torch.relu_ may write in place between its call and its add",
    ),
    "F.dropout(p=0.5) in training": (
        lambda m, y, r: torch.relu(F.dropout(y, 0.5, m.training)),
        "not every call fuses alike: in training mode 1 not (output feeds torch.nn.functional.dropout at rate 0.5, "
        "not the identity (a drop at rate 0 is)); in eval mode 1 into relu",
    ),
    "not an activation": (
        lambda m, y, r: torch.sigmoid(y),
        "output feeds torch.sigmoid, not an activation bn_triton fuses or an add",
    ),
}


@pytest.mark.parametrize("case", list(NOT_FUSED))
def test_what_must_not_fuse_stays(case, device):
    fn, reason = NOT_FUSED[case]
    torch.manual_seed(0)
    model = _Pattern(fn).to(device)
    gm = bn_triton.fuse(copy.deepcopy(model), _inputs(device))
    ((name, why),) = gm.fusion_report.left
    assert name == "bn" and why.startswith(reason), why
    assert gm.fusion_report.fused == []
    assert type(gm.bn) is bn_triton.BatchNorm2d and gm.bn.activation is None
    if "DropPath" in case:  # timm's drops are leaves: one node, which reads its own mode as it runs
        assert "drop_path" in [n.target for n in gm.graph.nodes if n.op == "call_module"]
    _same_as_original(model, gm, device, backward=False)


class _TwoCalls(nn.Module):
    """One BN layer called twice, each call fused as ``first`` / ``second`` say."""

    def __init__(self, first, second):
        super().__init__()
        self.bn = nn.BatchNorm2d(3)
        self.first, self.second = first, second

    def forward(self, x, r):
        a = self.first(self.bn(x), r)
        return a, self.second(self.bn(r), x)


@pytest.mark.parametrize(
    "first,second,fused",
    [
        (lambda y, r: torch.relu(y), lambda y, r: y.relu(), "relu"),
        (lambda y, r: torch.relu(y + r), lambda y, r: F.relu(r + y), "add+relu"),
        (lambda y, r: torch.relu(y), lambda y, r: y * 2, None),
        (lambda y, r: torch.relu(y), lambda y, r: torch.relu(y + r), None),
        (lambda y, r: torch.relu(y + r), lambda y, r: r + y, "add"),
    ],
    ids=["both-relu", "both-add-relu", "relu-and-none", "relu-and-add-relu", "add-relu-and-add"],
)
def test_a_layer_called_twice_fuses_only_if_both_calls_fuse_alike(first, second, fused, device):
    torch.manual_seed(0)
    model = _TwoCalls(first, second).to(device)
    gm = bn_triton.fuse(copy.deepcopy(model), _inputs(device))
    if fused:
        assert gm.fusion_report.fused == [("bn", fused)]
        assert len(_batchnorm_calls(gm)) == 2 and gm.bn.activation == (None if fused == "add" else "relu")
    else:
        ((name, why),) = gm.fusion_report.left
        assert name == "bn" and why.startswith("called 2 times, and not every call fuses alike: 1 into relu, 1 ")
    x, r = _inputs(device)
    for a, b in zip(gm(x, r), model(x, r), strict=True):
        torch.testing.assert_close(a, b, **TOL[torch.float32])


class _Others(nn.Module):
    """Layers that stay as they are: a SyncBatchNorm, a user's subclass (called, not traced through),
    one forward never calls, ours already fused."""

    class MyBN(nn.BatchNorm2d):
        pass

    def __init__(self):
        super().__init__()
        self.sync = nn.SyncBatchNorm(3)
        self.mine = self.MyBN(3)
        self.unused = nn.BatchNorm2d(3)
        self.ours = bn_triton.BatchNorm2d(3, activation="relu")

    def forward(self, x):
        return torch.relu(self.sync(x)), torch.relu(self.mine(x)), self.ours(x)


def test_other_batchnorms_are_left_with_their_reason():
    model = _Others()
    gm = bn_triton.fuse(model, torch.randn(2, 3, 4, 4))
    left = dict(gm.fusion_report.left)
    assert gm.fusion_report.fused == []
    only = "only torch's and bn_triton's BatchNorm1d/2d/3d and timm's and bn_triton's BatchNormAct2d fuse"
    assert left["sync"] == f"a torch.nn.modules.batchnorm.SyncBatchNorm: {only}"
    assert left["mine"] == f"a tests.test_fuse._Others.MyBN: {only}"
    assert left["unused"] == "not called by forward (absent from the torch.fx trace), kept as it is"
    assert left["ours"] == "already fused (activation='relu')"
    assert list(gm.state_dict()) == list(model.state_dict()), "what forward never calls is kept"
    assert gm.unused is model.unused and gm.sync is model.sync


def test_without_an_example_input_only_batchnorm_relu_fuses(device):
    torch.manual_seed(0)
    model = ResNet(BasicBlock, [1, 1]).to(device)
    report = bn_triton.fuse(model).fusion_report
    assert [k for _, k in report.fused] == ["relu"] * 3
    assert len(report.left) == 3 and all("no example input" in why for _, why in report.left)
    assert "pass bn_triton.fuse(model, example_input)" in str(report)


# ---------------------------------------------------------------- models torch.fx cannot trace
class _Branchy(nn.Module):
    def __init__(self):
        super().__init__()
        self.bn = nn.BatchNorm2d(3)

    def forward(self, x):
        y = self.bn(x)
        if y.sum() > 0:  # data-dependent control flow
            return torch.relu(y)
        return y


def test_untraceable_model_raises_by_default():
    with pytest.raises(RuntimeError, match=r'torch.fx could not trace _Branchy.*on_untraceable="convert"') as info:
        bn_triton.fuse(_Branchy())
    assert isinstance(info.value.__cause__, fx.proxy.TraceError)
    with pytest.raises(ValueError, match="on_untraceable must be"):
        bn_triton.fuse(_Branchy(), on_untraceable="skip")


def test_untraceable_model_is_converted_without_fusion_on_request(device):
    model = _Branchy().to(device)
    expected = copy.deepcopy(model)
    with pytest.warns(UserWarning, match="torch.fx could not trace _Branchy.*converted without fusion"):
        result = bn_triton.fuse(model, on_untraceable="convert")
    assert result is model and type(result.bn) is bn_triton.BatchNorm2d and result.bn.activation is None
    assert result.fusion_report.fused == [] and result.fusion_report.left == [("bn", UNTRACEABLE)]
    x, _ = _inputs(device)
    torch.testing.assert_close(result(x), expected(x), **TOL[torch.float32])


def test_fused_from_float32_then_run_under_autocast(device):
    """Fuse once from a float32 example, then train under autocast to float16: the first block's
    ``out += identity`` adds the float32 input to float16 activations. The fused layer reads the
    residual in its own dtype and returns its input's, as the in-place add does: the unfused block's
    result, within float16's rounding (a ReLU input within rounding of 0 may take the other side:
    the gradients are compared in norm)."""
    torch.manual_seed(0)
    model = nn.Sequential(BasicBlock(8, 8), BasicBlock(8, 8)).to(device)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.3 + (1.0 if p.dim() == 1 else 0.0))
    x = make((2, 8, 6, 6), torch.float32, device, seed=1)
    fused = bn_triton.fuse(copy.deepcopy(model), x)
    assert [k for _, k in fused.fusion_report.fused].count("add+relu") == 2
    dtype = torch.float16
    outs = []
    for m in (model, fused):
        xi = x.clone().requires_grad_()
        with torch.autocast(torch.device(device).type, dtype=dtype):
            y = m(xi)
        y.float().sum().backward()
        outs.append((y, xi.grad))
    (y_ref, g_ref), (y, g) = outs
    assert y.dtype == y_ref.dtype
    torch.testing.assert_close(y.float(), y_ref.float(), atol=1e-2, rtol=1e-2)
    assert (g - g_ref).norm() <= 0.02 * g_ref.norm(), ((g - g_ref).norm(), g_ref.norm())
