"""FrozenBatchNorm2d: torchvision's frozen BatchNorm (torchvision.ops.misc) served by our eval kernels,
and convert_batchnorm on it. Checked against a class that is torchvision's by module and name (its
code, copied), and against torchvision's own where it imports."""

import copy
import os
import subprocess
import sys
import warnings

import pytest
import torch

import bn_triton
from tests.helpers import make

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class FrozenBatchNorm2d(torch.nn.Module):
    """torchvision.ops.misc.FrozenBatchNorm2d's code (torchvision 0.29), under its module and name."""

    def __init__(self, num_features: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.register_buffer("weight", torch.ones(num_features))
        self.register_buffer("bias", torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, errors):
        num_batches_tracked_key = prefix + "num_batches_tracked"
        if num_batches_tracked_key in state_dict:
            del state_dict[num_batches_tracked_key]
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, errors)

    def forward(self, x):
        w = self.weight.reshape(1, -1, 1, 1)
        b = self.bias.reshape(1, -1, 1, 1)
        rv = self.running_var.reshape(1, -1, 1, 1)
        rm = self.running_mean.reshape(1, -1, 1, 1)
        scale = w * (rv + self.eps).rsqrt()
        bias = b - rm * scale
        return x * scale + bias

    def __repr__(self) -> str:
        return f"{self.__class__.__name__}({self.weight.shape[0]}, eps={self.eps})"


FrozenBatchNorm2d.__module__ = "torchvision.ops.misc"


def _torchvision_frozen():
    try:
        from torchvision.ops.misc import FrozenBatchNorm2d as cls
    except Exception as exc:  # noqa: BLE001 - a broken install skips as a missing one does
        pytest.skip(f"torchvision is not importable here ({type(exc).__name__}: {exc}); this checks its layer")
    return cls


def _frozen_classes():
    return {"mimic": lambda: FrozenBatchNorm2d, "torchvision": _torchvision_frozen}


def _filled(layer, seed=0):
    gen = torch.Generator().manual_seed(seed)
    for name, t in layer.named_buffers():
        if t.is_floating_point():
            t.copy_(torch.rand(t.shape, generator=gen, dtype=t.dtype) + (0.1 if name == "running_var" else -0.5))
    return layer


TOLERANCES = {torch.float64: dict(atol=1e-12, rtol=1e-12), torch.float32: dict(atol=2e-6, rtol=2e-6)}


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("source", _frozen_classes())
def test_converted_frozen_layer_computes_torchvisions(source, dtype, layout, device):
    cls = _frozen_classes()[source]()
    theirs = _filled(cls(5, eps=1e-3)).to(device, dtype)
    buffers = dict(theirs._buffers)
    model = torch.nn.Sequential(theirs)  # theirs stays torchvision's: the converter makes a new layer
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        bn_triton.convert_batchnorm(model)
    ours = model[0]
    assert type(ours) is bn_triton.FrozenBatchNorm2d and ours.eps == 1e-3
    assert not isinstance(ours, torch.nn.modules.batchnorm._BatchNorm)  # frozen: no converter trains it
    assert list(ours._buffers) == list(buffers) and all(ours._buffers[k] is v for k, v in buffers.items())
    assert list(ours.parameters()) == [] and repr(ours) == repr(theirs) == "FrozenBatchNorm2d(5, eps=0.001)"
    converted = [("0", "torchvision.ops.misc.FrozenBatchNorm2d -> bn_triton.FrozenBatchNorm2d")]
    assert model.conversion_report.converted == converted
    x = make((3, 5, 4, 7), dtype, device, layout=layout, seed=1).requires_grad_()
    expected, actual = theirs(x), ours(x)
    assert actual.dtype == expected.dtype and actual.is_contiguous(memory_format=torch.channels_last) == (
        layout == "channels_last"
    )
    torch.testing.assert_close(actual, expected, **TOLERANCES[dtype])
    g = make(x.shape, dtype, device, seed=2)
    (gx_theirs,) = torch.autograd.grad(expected, x, g)
    (gx_ours,) = torch.autograd.grad(actual, x, g)
    torch.testing.assert_close(gx_ours, gx_theirs, **TOLERANCES[dtype])
    # Frozen in training too: the same output, nothing moves.
    before = copy.deepcopy(ours.state_dict())
    ours.train()
    torch.testing.assert_close(ours(x), expected, **TOLERANCES[dtype])
    assert all(torch.equal(v, before[k]) for k, v in ours.state_dict().items())


@pytest.mark.parametrize("source", _frozen_classes())
def test_frozen_layer_state_dict_is_torchvisions(source):
    cls = _frozen_classes()[source]()
    theirs = _filled(cls(4))
    ours = _filled(bn_triton.FrozenBatchNorm2d(4), seed=1)
    assert list(ours.state_dict()) == list(theirs.state_dict()) == ["weight", "bias", "running_mean", "running_var"]
    ours.load_state_dict(theirs.state_dict())
    assert all(torch.equal(v, theirs.state_dict()[k]) for k, v in ours.state_dict().items())
    # A BatchNorm2d's state_dict loads too, its num_batches_tracked dropped, as torchvision's does.
    bn = _filled(torch.nn.BatchNorm2d(4), seed=2)
    for layer in (ours, theirs):
        layer.load_state_dict(bn.state_dict())
        assert all(torch.equal(v, bn.state_dict()[k]) for k, v in layer.state_dict().items())
    fresh = cls(4)
    fresh.load_state_dict(ours.state_dict())


def test_frozen_layer_promotes_dtypes_as_torchvision(device):
    """float32 buffers and a float16 input give a float32 output, as torchvision's formula does."""
    theirs = _filled(FrozenBatchNorm2d(3)).to(device)
    ours = bn_triton.convert_batchnorm(copy.deepcopy(theirs))
    x = make((2, 3, 4, 4), torch.float16, device, seed=3)
    expected, actual = theirs(x), ours(x)
    assert actual.dtype == expected.dtype == torch.float32
    torch.testing.assert_close(actual, expected, atol=2e-6, rtol=2e-6)
    with pytest.raises(ValueError, match="expected 4D input"):
        ours(x[0])


def test_only_torchvisions_exact_class_is_recognized():
    """A class of the same name in another module is not torchvision's: left alone, unreported. A
    subclass of torchvision's is named in the report (converting it would drop its own code)."""
    elsewhere = type("FrozenBatchNorm2d", (torch.nn.Module,), {"__module__": "mylib.layers"})

    class Sub(FrozenBatchNorm2d):
        def forward(self, x):
            return super().forward(x) * 2

    model = torch.nn.Sequential(FrozenBatchNorm2d(3), Sub(3), elsewhere())
    with pytest.warns(UserWarning, match=r"'1'.*subclass of torchvision\.ops\.misc\.FrozenBatchNorm2d"):
        bn_triton.convert_batchnorm(model)
    assert type(model[0]) is bn_triton.FrozenBatchNorm2d and type(model[1]) is Sub and type(model[2]) is elsewhere
    ((name, reason),) = model.conversion_report.left
    assert name == "1" and "defines its own forward" in reason
    assert [n for n, _ in model.conversion_report.converted] == ["0"] and not model.conversion_report.kept


def test_bn_triton_does_not_import_torchvision():
    env = dict(os.environ, TRITON_INTERPRET=os.environ.get("TRITON_INTERPRET", "1"))
    code = (
        "import sys, bn_triton\n"
        "bn_triton.convert_batchnorm(bn_triton.FrozenBatchNorm2d(2))\n"
        "print('torchvision' in sys.modules)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip() == "False", done.stdout + done.stderr


def test_torchvision_resnet_with_frozen_layers_converts_whole(device):
    cls = _torchvision_frozen()
    import torchvision

    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10, norm_layer=cls).to(device).eval()
    for m in model.modules():
        if isinstance(m, cls):
            _filled(m, seed=len(m.weight))
    x = make((1, 3, 32, 32), torch.float32, device, seed=0)
    expected = model(x)
    keys = list(model.state_dict())
    bn_triton.convert_batchnorm(model)
    assert len(model.conversion_report.converted) == 20 and not model.conversion_report.left
    assert not any(isinstance(m, cls) for m in model.modules()) and list(model.state_dict()) == keys
    torch.testing.assert_close(model(x), expected, atol=1e-4, rtol=1e-4)
