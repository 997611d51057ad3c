"""torch's conv/linear + BatchNorm folding and quantization fusers, given our layers.

A layer with a fused activation is never folded into a conv or linear (the activation would be
dropped silently): torch.nn.utils.fusion, torch.ao.quantization's fusers, torch.fx's and Inductor's
conv-BN passes refuse or leave it. A plain layer of ours folds and fuses exactly as torch's does.
"""

import copy
import os
import subprocess
import sys

import pytest
import torch
from torch import nn
from torch.ao.quantization import fuse_modules, fuse_modules_qat

import bn_triton
from tests.helpers import make

DROPS = r"would drop the fused activation \('relu'\)"
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _randomize(model: nn.Module, seed: int = 0) -> nn.Module:
    """Random parameters and running statistics (running_var > 0), so that a fold moves values."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if t.is_floating_point():
                t.copy_(torch.rand(t.shape, generator=gen, dtype=t.dtype) + (0.5 if "running_var" in name else -0.5))
    return model


def _fused_block(kind: str) -> nn.Sequential:
    conv = {"conv": nn.Conv2d(3, 4, 3), "convt": nn.ConvTranspose2d(3, 4, 3), "linear": nn.Linear(3, 4)}[kind]
    bn = (bn_triton.BatchNorm1d if kind == "linear" else bn_triton.BatchNorm2d)(4, activation="relu")
    return _randomize(nn.Sequential(conv, bn)).eval()


def _input(kind: str) -> torch.Tensor:
    return make((2, 3) if kind == "linear" else (2, 3, 5, 5), torch.float32, "cpu", seed=1)


# ---------------------------------------------------------------- fused layers are never folded


@pytest.mark.parametrize("kind", ["conv", "convt", "linear"])
def test_fusion_utilities_refuse_a_fused_layer(kind):
    """fuse_conv_bn_eval / fuse_linear_bn_eval, under every name torch offers them, refuse our fused
    layer instead of returning a conv that computes conv + BN without the ReLU."""
    model = _fused_block(kind)
    layer, bn = model
    calls = {
        "conv": [lambda f: f.fuse_conv_bn_eval(layer, bn)],
        "convt": [lambda f: f.fuse_conv_bn_eval(layer, bn, transpose=True)],
        "linear": [lambda f: f.fuse_linear_bn_eval(layer, bn)],
    }[kind]
    for namespace in (torch.nn.utils.fusion, torch.nn.utils):
        for call in calls:
            with pytest.raises(RuntimeError, match=DROPS):
                call(namespace)
    # The layer itself is left as it was, and still computes relu(conv + BN).
    assert model[1].activation == "relu"
    assert (model(_input(kind)) >= 0).all()


def test_quantization_fusers_refuse_a_fused_layer():
    model = nn.Sequential(*_fused_block("conv"), nn.ReLU()).eval()
    for modules in (["0", "1"], ["0", "1", "2"], ["1", "2"]):
        with pytest.raises(RuntimeError, match=DROPS):
            fuse_modules(model, modules)
    model.train()
    for modules in (["0", "1"], ["0", "1", "2"]):
        with pytest.raises(RuntimeError, match=DROPS):
            fuse_modules_qat(model, modules)
    linear = nn.Sequential(*_fused_block("linear")).eval()
    with pytest.raises(RuntimeError, match=DROPS):
        fuse_modules(linear, ["0", "1"])


def test_fx_and_inductor_conv_bn_passes_leave_a_fused_layer():
    """torch.fx.experimental.optimization.fuse and Inductor's pre-grad conv-BN pass match their
    patterns by exact type: our fused layer is left as it is, and the model computes the same."""
    from torch._inductor.fx_passes import pre_grad
    from torch.fx.experimental import optimization

    model = _fused_block("conv")
    x = _input("conv")
    expected = model(x)
    for result in (optimization.fuse(model), pre_grad.fuse_conv_bn(torch.fx.symbolic_trace(model))):
        assert any(isinstance(m, bn_triton.BatchNorm2d) and m.activation == "relu" for m in result.modules())
        torch.testing.assert_close(result(x), expected, rtol=0, atol=0)


def _guarded(name):
    return getattr(torch.nn.utils.fusion, name)


def test_every_loaded_torch_module_holds_the_guarded_functions():
    from torch._inductor.fx_passes import pre_grad  # noqa: F401 - imports the function by name
    from torch.fx.experimental import optimization  # noqa: F401 - imports the function by name

    for name in ("fuse_conv_bn_eval", "fuse_linear_bn_eval"):
        guarded = _guarded(name)
        stale = [m for m, mod in list(sys.modules.items()) if m.startswith("torch") and
                 getattr(mod, "__dict__", {}).get(name, guarded) is not guarded]  # fmt: skip
        assert not stale, (name, stale)


def test_guard_reaches_modules_imported_before_bn_triton():
    code = (
        "import torch, torch.fx.experimental.optimization as o, torch.nn.utils as u\n"
        "import bn_triton\n"
        "m = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 1), bn_triton.BatchNorm2d(4, activation='relu')).eval()\n"
        "for f in (o.fuse_conv_bn_eval, u.fuse_conv_bn_eval, torch.nn.utils.fusion.fuse_conv_bn_eval):\n"
        "    try:\n"
        "        f(m[0], m[1])\n"
        "    except RuntimeError as e:\n"
        "        assert 'would drop the fused activation' in str(e), e\n"
        "    else:\n"
        "        raise SystemExit('folded')\n"
        "print('refused')\n"
    )
    env = dict(os.environ, TRITON_INTERPRET=os.environ.get("TRITON_INTERPRET", "1"))
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip() == "refused", done.stdout + done.stderr


# ---------------------------------------------------------------- plain layers fold as torch's


@pytest.mark.parametrize("kind", ["conv", "convt", "linear"])
def test_fusion_utilities_fold_a_plain_layer_as_torchs(kind):
    torch_model = _fused_block(kind)
    torch_model[1] = (nn.BatchNorm1d if kind == "linear" else nn.BatchNorm2d)(4)
    _randomize(torch_model, seed=3).eval()
    ours = bn_triton.convert_batchnorm(copy.deepcopy(torch_model))
    assert type(ours[1]) in (bn_triton.BatchNorm1d, bn_triton.BatchNorm2d) and ours[1].activation is None
    if kind == "linear":
        fused, expected = (torch.nn.utils.fusion.fuse_linear_bn_eval(*m) for m in (ours, torch_model))
    else:
        fold = torch.nn.utils.fusion.fuse_conv_bn_eval
        fused, expected = (fold(*m, transpose=kind == "convt") for m in (ours, torch_model))
    assert type(fused) is type(expected)
    for a, b in zip(fused.parameters(), expected.parameters(), strict=True):
        assert torch.equal(a, b)


# (modules of one pattern, the input's shape); each pattern of torch's fuser table with a BatchNorm.
PATTERNS = {
    "conv1d_bn": ([nn.Conv1d(3, 4, 3), nn.BatchNorm1d(4)], (2, 3, 7)),
    "conv1d_bn_relu": ([nn.Conv1d(3, 4, 3), nn.BatchNorm1d(4), nn.ReLU()], (2, 3, 7)),
    "conv2d_bn": ([nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)], (2, 3, 5, 5)),
    "conv2d_bn_relu": ([nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU()], (2, 3, 5, 5)),
    "conv3d_bn": ([nn.Conv3d(3, 4, 1), nn.BatchNorm3d(4)], (2, 3, 2, 3, 3)),
    "conv3d_bn_relu": ([nn.Conv3d(3, 4, 1), nn.BatchNorm3d(4), nn.ReLU()], (2, 3, 2, 3, 3)),
    "linear_bn": ([nn.Linear(3, 4), nn.BatchNorm1d(4)], (5, 3)),
    "bn2d_relu": ([nn.BatchNorm2d(3), nn.ReLU()], (2, 3, 5, 5)),
    "bn3d_relu": ([nn.BatchNorm3d(3), nn.ReLU()], (2, 3, 2, 3, 3)),
    "convt2d_bn": ([nn.ConvTranspose2d(3, 4, 3), nn.BatchNorm2d(4)], (2, 3, 5, 5)),
}


def _structure(model):
    return [(n, type(m)) for n, m in model.named_modules()]


def _fuse(fuser, model, names):
    try:
        return fuser(model, names)
    except Exception as exc:  # noqa: BLE001 - torch's own refusals are compared as they are
        return exc


@pytest.mark.parametrize("qat", [False, True], ids=["eval", "qat"])
@pytest.mark.parametrize("pattern", PATTERNS)
def test_quantization_fuses_a_converted_layer_as_torchs(pattern, qat):
    """fuse_modules (eval) and fuse_modules_qat (train) on a converted model: the same fused modules,
    tensors and outputs as on torch's model (a torch.nn.BatchNorm*d where torch's fused module
    holds one, with our layer's tensors); torch's own refusals alike."""
    mods, shape = PATTERNS[pattern]
    torch_model = _randomize(nn.Sequential(*copy.deepcopy(mods))).train(qat)
    ours = bn_triton.convert_batchnorm(copy.deepcopy(torch_model))
    assert any(isinstance(m, bn_triton.BatchNorm1d | bn_triton.BatchNorm2d | bn_triton.BatchNorm3d) for m in ours)
    names = [str(i) for i in range(len(mods))]
    fuser = fuse_modules_qat if qat else fuse_modules
    expected, fused = _fuse(fuser, torch_model, names), _fuse(fuser, ours, names)
    if isinstance(expected, Exception):
        assert type(fused) is type(expected) and str(fused) == str(expected)
        return
    assert not isinstance(fused, Exception), fused
    assert _structure(fused) == _structure(expected)
    a, e = fused.state_dict(), expected.state_dict()
    assert list(a) == list(e) and all(torch.equal(a[k], e[k]) for k in e)
    x = make(shape, torch.float32, "cpu", seed=2)
    torch.testing.assert_close(fused(x), expected(x), rtol=0, atol=0)
    if qat:  # fused in place, torch's fused module holds the converted layer's very tensors
        layer = next(m for m in ours if isinstance(m, nn.modules.batchnorm._BatchNorm))
        fuse_modules_qat(ours, names, inplace=True)
        (bn,) = (m for m in ours.modules() if type(m) in (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d))
        assert bn.weight is layer.weight and bn.running_mean is layer.running_mean
