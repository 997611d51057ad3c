"""bn_triton.fuse and convert_batchnorm on torchvision's and timm's own models. Every test here needs
torchvision or timm, and skips with the reason where one cannot be imported (CI runs this file in a
second environment that has both).

Counts: each model of bench/fusion_report.py's MODELS fused with a 2x3x224x224 example on fake
tensors (nothing runs: about a second a model) and converted; its BatchNorms, the fused count and
kinds checked against EXPECTED, every BatchNorm ours both ways, no warning raised.

Training: one small real definition per family (a ResNet, two MobileNets, an EfficientNet, a CSP
net), in float64, channels_last (the interpreter runs far fewer programs on channel-contiguous tiles
than on NCHW ones with many channels and tiny maps), on 2 images of the smallest size that leaves 8
values per channel in the last stage (2x2 maps): 2 SGD steps, then an eval forward, of the model with
torch's BatchNorm beside ``convert_batchnorm`` of it and ``fuse`` of it (fused in eval mode, then
trained, then evaluated: both mode switches). Outputs, gradients and every state_dict entry
(running statistics, num_batches_tracked) agree to 1e-9 relative (``_close``). With 2 values per
channel (1x1 maps) BN's input gradient is 0 but for rounding, divided by the channel's deviation, and
that noise flows into every earlier gradient: at 32x32, mobilenet_v2(0.25)'s weights after 2 steps
differed by 1e-5 relative between torch's BatchNorm and ours; at 64x64, by 1e-13.
"""

import collections
import copy
import importlib
import warnings

import pytest
import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

import bn_triton
from bench import fusion_report
from tests.helpers import make

CL = torch.channels_last


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """The interpreter runs a great many tiny torch ops, for which more intra-op threads only add
    hand-offs: mobilenet_v2(0.25)'s float64 training step took 4 s with one thread and 28 to 56 s with
    two on a 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _library(name):
    lib = fusion_report.library(name)
    if isinstance(lib, str):
        pytest.skip(f"{lib}; this checks its models")
    return lib


# ---------------------------------------------------------------- the counts
EXPECTED = {  # label: (BatchNorms, fused at least, fused of each kind at least)
    "torchvision mobilenet_v2": (52, 45, {"relu6": 35, "add": 10}),
    "torchvision mobilenet_v3_large": (46, 41, {"hardswish": 20, "relu": 11, "add": 10}),
    "torchvision efficientnet_b0": (49, 33, {"silu": 33}),
    "torchvision mnasnet0_5": (52, 45, {"relu": 35, "add": 10}),
    "torchvision resnet18": (20, 17, {"relu": 9, "add+relu": 8}),
    "torchvision resnet50": (53, 49, {"relu": 33, "add+relu": 16}),
    "torchvision regnet_y_400mf": (53, 49, {"relu": 33, "add+relu": 16}),
    "timm resnet50": (53, 49, {"relu": 33, "add+relu": 16}),
    "timm efficientnet_b0": (49, 42, {"silu": 33, "add": 9}),
    "timm mobilenetv3_large_100": (46, 41, {"hardswish": 20, "relu": 11, "add": 10}),
    "timm regnety_002": (44, 40, {"relu": 27, "add+relu": 13}),
    "timm cspdarknet53": (67, 67, {"leaky_relu(0.01)": 67}),
    "timm cspresnet50": (55, 51, {"leaky_relu(0.01)": 38, "add+leaky_relu(0.01)": 13}),
}
# Why the rest stay, where a model has a reason of its own: torchvision's efficientnet_b0 multiplies 9
# BatchNorm outputs by a random per-sample mask in training (stochastic depth at rates 0.0125 to
# 0.175) before their add; ResNets' downsample BatchNorms are the residual of an add another takes.
LEFT_BECAUSE = {
    "torchvision efficientnet_b0": (9, "feeds torchvision.ops.stochastic_depth.stochastic_depth at rate"),
    "torchvision resnet50": (4, "output feeds an add as the residual"),
    "timm resnet50": (4, "output feeds an add as the residual"),
    "timm regnety_002": (4, "output feeds an add as the residual"),
}


def test_expected_covers_the_report():
    assert list(EXPECTED) == [label for label, *_ in fusion_report.MODELS]


@pytest.mark.parametrize("label,library,name,kwargs", fusion_report.MODELS, ids=[m[0] for m in fusion_report.MODELS])
def test_fused_and_converted_counts(label, library, name, kwargs):
    lib = _library(library)
    torch.manual_seed(0)
    model = fusion_report.build(lib, library, name, kwargs)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing the model did not cause
        row = fusion_report.measure(label, model, torch.randn(fusion_report.EXAMPLE_SHAPE))
    batchnorms, at_least, kinds = EXPECTED[label]
    assert row.batchnorms == batchnorms
    assert row.converted == row.ours_in_fused == batchnorms, "every BatchNorm is ours, fused or not"
    assert row.fused >= at_least, row
    for kind, n in kinds.items():
        assert row.kinds[kind] >= n, (kind, row)
    assert row.fused + len(row.left) == batchnorms
    assert all(reason for _, reason in row.left)
    if label in LEFT_BECAUSE:
        count, because = LEFT_BECAUSE[label]
        assert sum(because in reason for _, reason in row.left) == count, row.left


# ---------------------------------------------------------------- training, in float64
def _tv_efficientnet(tv):
    """torchvision's EfficientNet with two small stages: block 0 keeps its 16 channels at stochastic
    depth 0 (looked through: its add fuses), blocks 1 and 3 keep theirs at stochastic depth 0.125 and
    0.375 (not the identity in training: they stay)."""
    from torchvision.models.efficientnet import MBConvConfig

    stages = [MBConvConfig(1, 3, 1, 16, 16, 2), MBConvConfig(6, 3, 2, 16, 24, 2)]
    return tv.models.EfficientNet(stages, dropout=0.2, stochastic_depth_prob=0.5, num_classes=10)


TRAINED = {  # id: (library, builder, input height and width, the fused kinds)
    "timm test_resnet": (
        "timm",
        lambda t: t.create_model("test_resnet", num_classes=10),
        64,
        {"relu": 8, "add+relu": 4},
    ),
    "torchvision mobilenet_v2(0.25)": (
        "torchvision",
        lambda tv: tv.models.mobilenet_v2(width_mult=0.25, num_classes=10),
        64,
        {"relu6": 35, "add": 11},
    ),
    "timm mobilenetv3_small_050": (
        "timm",
        lambda t: t.create_model("mobilenetv3_small_050", num_classes=10, drop_rate=0.2),
        64,
        {"hardswish": 18, "relu": 5, "add": 7},
    ),
    "torchvision EfficientNet(2 stages)": ("torchvision", _tv_efficientnet, 8, {"silu": 8, "add": 1}),
    "timm cs3darknet_focus_s": (
        "timm",
        lambda t: t.create_model("cs3darknet_focus_s", num_classes=10),
        64,
        {"silu": 31},
    ),
}


def _train(model, size, steps=2):
    """``steps`` SGD steps in training mode, then an eval forward: each step's output and gradients,
    the state_dict after, the eval output. The same seed before each forward: the same dropout and
    stochastic-depth masks."""
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    out = {"y": [], "grads": []}
    for step in range(steps):
        x = make((2, 3, size, size), torch.float64, "cpu", seed=10 + step).contiguous(memory_format=CL)
        x.requires_grad_()
        torch.manual_seed(step)
        y = model(x)
        weight = make(y.shape, torch.float64, "cpu", seed=20 + step)  # a loss whose gradient BN does not cancel
        (y * weight).mean().backward()
        out["y"].append(y.detach())
        out["grads"].append({"input": x.grad, **{k: p.grad.clone() for k, p in model.named_parameters()}})
        opt.step()
        opt.zero_grad(set_to_none=True)
    out["state"] = {k: v.clone() for k, v in model.state_dict().items()}
    model.eval()
    with torch.no_grad():
        out["eval"] = model(make((2, 3, size, size), torch.float64, "cpu", seed=30).contiguous(memory_format=CL))
    return out


def _close(actual, expected, what, floor=0.0):
    """1e-9 relative, and 1e-9 of the tensor's largest value or of ``floor``, whichever is larger: a
    gradient that is 0 but for rounding (a BN bias whose output feeds a conv and a BN in training:
    the sum of that BN's input gradient is 0) is noise of about 1e-16 of the step's gradients."""
    if not expected.is_floating_point():
        assert torch.equal(actual, expected), what
        return
    atol = 1e-9 * max(float(expected.abs().max()), floor) if expected.numel() else 0.0
    torch.testing.assert_close(actual, expected, rtol=1e-9, atol=atol, msg=lambda m: f"{what}: {m}")


def _same(got, want, variant):
    for step, (y, y0) in enumerate(zip(got["y"], want["y"], strict=True)):
        _close(y, y0, f"{variant}: output, step {step}")
        assert got["grads"][step].keys() == want["grads"][step].keys()
        largest = max(float(g.abs().max()) for g in want["grads"][step].values())
        for k, g in want["grads"][step].items():
            _close(got["grads"][step][k], g, f"{variant}: grad of {k}, step {step}", floor=1e-3 * largest)
    assert list(got["state"]) == list(want["state"]), variant
    for k, v in want["state"].items():
        _close(got["state"][k], v, f"{variant}: {k}", floor=1.0)  # running statistics and biases near 0
    assert int(got["state"][next(k for k in want["state"] if k.endswith("num_batches_tracked"))]) == 2
    _close(got["eval"], want["eval"], f"{variant}: eval output")


@pytest.mark.parametrize("case", list(TRAINED))
def test_trains_like_the_original(case):
    library, builder, size, kinds = TRAINED[case]
    lib = _library(library)
    torch.manual_seed(0)
    model = builder(lib).double().to(memory_format=CL)
    example = make((2, 3, size, size), torch.float64, "cpu", seed=0).contiguous(memory_format=CL)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        converted = bn_triton.convert_batchnorm(copy.deepcopy(model))
        fused = bn_triton.fuse(copy.deepcopy(model).eval(), example)  # then trained: both mode switches
    assert collections.Counter(k for _, k in fused.fusion_report.fused) == kinds
    for variant in (converted, fused):
        layers = [m for m in variant.modules() if isinstance(m, _BatchNorm)]
        assert layers and all(type(m).__module__.startswith("bn_triton.") for m in layers)
    want = _train(model, size)
    _same(_train(converted, size), want, "convert_batchnorm")
    _same(_train(fused, size), want, "fuse")


# ---------------------------------------------------------------- modes read in the trace
@pytest.mark.parametrize("name,reads", [("efficientnet_b0", 9), ("ghostnet_100", 1)])
def test_models_with_mode_reads_follow_train_and_eval(name, reads):
    """torchvision's efficientnet_b0 reads ``self.training`` in 9 stochastic-depth calls, timm's
    ghostnet_100 in its head's dropout. Fused in training, it evaluates as the original does; fused
    in eval, it trains as the original does (same seed). One forward each, float32, channels_last."""
    library = "torchvision" if name == "efficientnet_b0" else "timm"
    lib = _library(library)
    kwargs = {"stochastic_depth_prob": 0.9} if name == "efficientnet_b0" else {}
    x = make((2, 3, 64, 64), torch.float32, "cpu", seed=0).contiguous(memory_format=CL)  # 2x2 maps at the end
    for fused_in, run_in, seed in (("train", "eval", 0), ("eval", "train", 1)):
        torch.manual_seed(0)
        model = fusion_report.build(lib, library, name, kwargs).to(memory_format=CL).train(fused_in == "train")
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            fused = bn_triton.fuse(copy.deepcopy(model), x)
        assert len(fused.mode_names) == reads and len(fused.mode_graphs) == 1
        model.train(run_in == "train")
        fused.train(run_in == "train")
        outputs = []
        for m in (model, fused):
            torch.manual_seed(seed)
            with torch.no_grad():
                outputs.append(m(x))
        scale = float(outputs[0].abs().max())  # efficientnet_b0's eval output is about 1e-14 at its init
        torch.testing.assert_close(outputs[1], outputs[0], atol=1e-3 * scale, rtol=1e-3)


def test_torchvision_resnet18():
    tv = _library("torchvision")
    torch.manual_seed(0)
    model = tv.models.resnet18(num_classes=10).to(memory_format=CL)
    x = make((4, 3, 64, 64), torch.float32, "cpu", seed=0).contiguous(memory_format=CL)
    gm = bn_triton.fuse(copy.deepcopy(model), x)
    assert collections.Counter(k for _, k in gm.fusion_report.fused) == {"relu": 9, "add+relu": 8}
    assert [n for n, _ in gm.fusion_report.left] == [f"layer{i}.0.downsample.1" for i in (2, 3, 4)]
    unfused = bn_triton.convert_batchnorm(model)
    for mode in ("train", "eval"):
        with torch.no_grad():
            expected = unfused.train(mode == "train")(x)
            got = gm.train(mode == "train")(x)
        scale = max(1.0, float(expected.abs().max()))
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5 * scale, msg=lambda m, mode=mode: f"{mode}: {m}")


def test_the_real_timm_classes():
    """timm's BatchNormAct2d and SyncBatchNormAct themselves (tests/test_norm_act.py uses stand-ins)."""
    _library("timm")
    from timm.layers import BatchNormAct2d as TimmBNAct
    from timm.layers.norm_act import convert_sync_batchnorm

    layers = [TimmBNAct(4, act_layer=a) for a in ("silu", "hard_swish", "gelu", "leaky_relu")] + [
        TimmBNAct(4, apply_act=False)
    ]
    model = nn.Sequential(*layers).double()
    ref = copy.deepcopy(model)
    bn_triton.convert_batchnorm(model)
    assert [m.activation for m in model] == ["silu", "hardswish", "gelu", "leaky_relu(0.01)", None]
    x = make((2, 4, 3, 3), torch.float64, "cpu", seed=4)
    for training in (True, False):
        model.train(training), ref.train(training)
        torch.testing.assert_close(model(x), ref(x), atol=1e-10, rtol=1e-9)
    synced = bn_triton.SyncBatchNorm.convert_sync_batchnorm(convert_sync_batchnorm(copy.deepcopy(ref)))
    assert all(type(m) is bn_triton.SyncBatchNormAct for m in synced)


def test_fuse_takes_timms_classes_from_the_models_layers():
    """timm's own drop layers at rate 0 and above, in its own norm + activation layer and after it."""
    timm = _library("timm")
    importlib.import_module("timm.layers")
    from timm.layers import BatchNormAct2d as TimmBNAct
    from timm.layers import DropPath

    class Block(nn.Module):
        def __init__(self, rate):
            super().__init__()
            self.bn = TimmBNAct(4, apply_act=False)
            self.drop_path, self.act = DropPath(rate), nn.ReLU()

        def forward(self, x, r):
            return self.act(self.drop_path(self.bn(x)) + r)

    assert timm.layers.DropPath is DropPath
    x, r = make((2, 4, 3, 5), torch.float64, "cpu", seed=1), make((2, 4, 3, 5), torch.float64, "cpu", seed=2)
    fused = bn_triton.fuse(Block(0.0).double(), (x, r))
    assert fused.fusion_report.fused == [("bn", "add+relu")]
    left = bn_triton.fuse(Block(0.1).double(), (x, r)).fusion_report.left
    assert left == [("bn", "output feeds drop_path (DropPath) at rate 0.1, not the identity (a drop at rate 0 is)")]
