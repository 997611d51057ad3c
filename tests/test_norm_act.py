"""timm's norm + activation layers (BatchNormAct2d, SyncBatchNormAct) under bn_triton's converters:
recognized by module and class name (timm is never imported by bn_triton), converted to ours with
their very tensors and drop/act modules, the activation fused where the table has it and drop is the
identity, timm's order (BN, drop, act) kept otherwise; and under bn_triton.fuse, which also fuses a
layer whose act and drop are identities into the pattern after it. Stand-ins with timm's module and
class names and timm's forward serve here; the real classes are checked in tests/test_real_models.py."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import bn_triton
from tests.helpers import make


class BatchNormAct2d(nn.BatchNorm2d):
    """timm.layers.norm_act.BatchNormAct2d's structure and forward (BN, then drop, then act)."""

    def __init__(self, num_features, act=None, drop=None, **kwargs):
        super().__init__(num_features, **kwargs)
        self.drop = drop if drop is not None else nn.Identity()
        self.act = act if act is not None else nn.Identity()

    def forward(self, x):
        return self.act(self.drop(super().forward(x)))


BatchNormAct2d.__module__ = "timm.layers.norm_act"


class SyncBatchNormAct(nn.SyncBatchNorm):
    """timm.layers.norm_act.SyncBatchNormAct's structure."""

    def forward(self, x):
        return self.act(self.drop(super().forward(x)))


SyncBatchNormAct.__module__ = "timm.layers.norm_act"


def _layer(act, drop=None, C=4, seed=0):
    torch.manual_seed(seed)
    layer = BatchNormAct2d(C, act=act, drop=drop).double()
    with torch.no_grad():
        for t in (layer.weight, layer.bias, layer.running_mean):
            t.copy_(torch.randn_like(t))
        layer.running_var.copy_(torch.rand_like(layer.running_var) + 0.5)
    return layer


def _step(layer, x, training, seed=1):
    layer.train(training)
    xi = x.clone().requires_grad_()
    torch.manual_seed(seed)
    y = layer(xi)
    y.backward(torch.ones_like(y))
    return y.detach(), xi.grad, layer.weight.grad.clone()


@pytest.mark.parametrize(
    "act,drop,fused",
    [
        (nn.SiLU(inplace=True), None, "silu"),
        (nn.Hardswish(), None, "hardswish"),
        (nn.LeakyReLU(0.1), None, "leaky_relu(0.1)"),
        (nn.ReLU(), None, "relu"),
        (None, None, None),  # apply_act=False: an Identity
        (nn.Sigmoid(), None, None),  # no kernel for it: run after the layer
        (nn.SiLU(), nn.Dropout(0.3), None),  # drop before act: act(drop(BN)) stays timm's order
    ],
    ids=["silu", "hardswish", "leaky", "relu", "identity", "sigmoid", "dropout"],
)
def test_convert_batchnorm_takes_timms_norm_act_layer(act, drop, fused, device):
    model = nn.Sequential(_layer(act, drop)).to(device)
    ref = copy.deepcopy(model)
    layer = model[0]
    tensors = [layer.weight, layer.bias, layer.running_mean, layer.running_var, layer.num_batches_tracked]
    bn_triton.convert_batchnorm(model)
    ours = model[0]
    assert type(ours) is bn_triton.BatchNormAct2d
    assert ours.activation == fused
    assert ours.act is layer.act and ours.drop is layer.drop
    assert [ours.weight, ours.bias, ours.running_mean, ours.running_var, ours.num_batches_tracked] == tensors
    assert list(ours.state_dict()) == list(ref[0].state_dict())
    converted = [("0", "timm.layers.norm_act.BatchNormAct2d -> bn_triton.BatchNormAct2d")]
    assert model.conversion_report.converted == converted
    x = make((2, 4, 3, 5), torch.float64, device, seed=2)
    for training in (True, False, True):
        got, want = _step(ours, x, training), _step(ref[0], x.cpu(), training)
        for g, w in zip(got, want, strict=True):
            torch.testing.assert_close(g.cpu(), w, atol=1e-10, rtol=1e-9)
        ours.weight.grad = ref[0].weight.grad = None
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        torch.testing.assert_close(getattr(ours, name).cpu(), getattr(ref[0], name))


def test_a_subclass_of_timms_layer_is_left_and_named():
    class Mine(BatchNormAct2d):
        def forward(self, x):
            return super().forward(x) * 2

    model = nn.Sequential(Mine(3))
    with pytest.warns(UserWarning, match="defines its own forward"):
        bn_triton.convert_batchnorm(model)
    assert type(model[0]) is Mine


def test_timms_sync_layer_is_kept_and_the_sync_converter_takes_both():
    sync = SyncBatchNormAct(3)
    sync.drop, sync.act = nn.Identity(), nn.SiLU()
    model = nn.Sequential(_layer(nn.Hardswish(), C=3), sync)
    bn_triton.convert_batchnorm(model)
    assert type(model[1]) is SyncBatchNormAct and model.conversion_report.kept[0][0] == "1"
    converted = bn_triton.SyncBatchNorm.convert_sync_batchnorm(model)
    assert [type(m) for m in converted] == [bn_triton.SyncBatchNormAct] * 2
    assert [m.activation for m in converted] == ["hardswish", "silu"]
    # torch's own converter would drop the fused activation: it refuses the model.
    with pytest.raises(RuntimeError, match="would drop the fused activation"):
        torch.nn.SyncBatchNorm.convert_sync_batchnorm(copy.deepcopy(converted))


def test_sync_norm_act_outside_a_process_group_is_the_plain_layer(device):
    layer = _layer(nn.SiLU())
    ref = copy.deepcopy(layer)
    sync = bn_triton.SyncBatchNorm.convert_sync_batchnorm(nn.Sequential(layer))[0].to(device)
    x = make((2, 4, 3, 5), torch.float64, device, seed=3)
    for training in (True, False):
        got, want = _step(sync, x, training), _step(ref, x.cpu(), training)
        for g, w in zip(got, want, strict=True):
            torch.testing.assert_close(g.cpu(), w, atol=1e-10, rtol=1e-9)


def test_timms_gelu_classes_are_in_the_table():
    from bn_triton import activations

    class GELU(nn.Module):
        def forward(self, x):
            return F.gelu(x)

    class GELUTanh(nn.Module):
        def forward(self, x):
            return F.gelu(x, approximate="tanh")

    for cls in (GELU, GELUTanh):
        cls.__module__, cls.__qualname__ = "timm.layers.activations", cls.__name__
    assert activations.of_module(GELU()) == "gelu"
    assert activations.of_module(GELUTanh()) == "gelu_tanh"


# ---------------------------------------------------------------- bn_triton.fuse
class _NormActNet(nn.Module):
    """timm's norm + activation layers as its blocks use them: ``a`` computes its own SiLU; ``b``
    (apply_act=False) feeds a DropPath that is the identity, an add and a ReLU; ``c`` an add alone (the
    end of an inverted residual block); ``d``'s act has no kernel; ``e``'s drop is a real dropout;
    ``f``'s drop is a dropout at rate 0."""

    def __init__(self):
        super().__init__()
        self.a = _layer(nn.SiLU(inplace=True), seed=1)
        self.b = _layer(None, seed=2)
        self.drop_path, self.act = nn.Identity(), nn.ReLU(inplace=True)
        self.c = _layer(None, seed=3)
        self.d = _layer(nn.Sigmoid(), seed=4)
        self.e = _layer(nn.SiLU(), nn.Dropout(0.3), seed=5)
        self.f = _layer(nn.Hardswish(), nn.Dropout(0.0), seed=6)

    def forward(self, x, r):
        y = self.act(self.drop_path(self.b(self.a(x))) + r)
        return self.f(self.e(self.d(self.c(y) + r)))


FUSED = [("a", "silu"), ("b", "add+relu"), ("c", "add"), ("f", "hardswish")]
LEFT = [
    ("d", "its act, Sigmoid(), is not an activation bn_triton fuses: it runs after the layer"),
    ("e", "its drop, Dropout(p=0.3, inplace=False), is not the identity: drop and act run after the layer"),
]


def _run(model, x, r, training, seed):
    model.train(training)
    xs = [x.clone().requires_grad_(), r.clone().requires_grad_()]
    torch.manual_seed(seed)  # the same dropout mask
    y = model(*xs)
    params = dict(model.named_parameters())
    weight = torch.linspace(-1, 1, y.numel(), dtype=y.dtype, device=y.device).view_as(y)  # BN does not cancel it
    grads = torch.autograd.grad((y * weight).sum(), [*xs, *params.values()])
    grads = dict(zip(["x", "r", *params], grads, strict=True))
    return y.detach(), grads, {k: v.clone() for k, v in model.named_buffers()}


@pytest.mark.parametrize("converted_first", [False, True], ids=["timm", "ours"])
def test_fuse_takes_norm_act_layers(converted_first, device):
    """Each layer becomes our BatchNormAct2d holding timm's very tensors, drop and act: its own act
    fused, its identity act replaced by the pattern after it, or, where it cannot fuse, timm's order
    kept; the result computes what timm's layers compute, in training and eval."""
    model = _NormActNet().to(device)
    ref = copy.deepcopy(model)
    source = bn_triton.convert_batchnorm(copy.deepcopy(model)) if converted_first else model
    x, r = make((2, 4, 3, 5), torch.float64, device, seed=7), make((2, 4, 3, 5), torch.float64, device, seed=8)
    gm = bn_triton.fuse(source, (x, r))
    assert gm.fusion_report.fused == FUSED and gm.fusion_report.left == LEFT
    assert str(gm.fusion_report).startswith("fused 4 of 6 BatchNorm layers: 1 into silu, 1 into add + relu, 1 into add")
    for name in "abcdef":
        theirs, ours = source.get_submodule(name), gm.get_submodule(name)
        assert type(ours) is bn_triton.BatchNormAct2d, name
        assert ours.act is theirs.act and ours.drop is theirs.drop, name
        assert ours.weight is theirs.weight and ours.running_var is theirs.running_var, name
    assert [gm.get_submodule(n).activation for n in "abcdef"] == ["silu", "relu", None, None, None, "hardswish"]
    assert list(gm.state_dict()) == list(ref.state_dict())
    for k, v in ref.state_dict().items():
        assert torch.equal(gm.state_dict()[k], v), k
    gm.load_state_dict(ref.state_dict(), strict=True)  # timm's tensors into ours, and back
    copy.deepcopy(ref).load_state_dict(gm.state_dict(), strict=True)
    assert [n.target for n in gm.graph.nodes if n.op == "call_module"] == list("abcdef")
    for step, training in enumerate((True, True, False)):
        (y0, g0, b0), (y1, g1, b1) = _run(ref, x, r, training, step), _run(gm, x, r, training, step)
        torch.testing.assert_close(y1, y0, atol=1e-10, rtol=1e-9)
        for k in g0:
            torch.testing.assert_close(g1[k], g0[k], atol=1e-10, rtol=1e-9, msg=k)
        assert list(b1) == list(b0)
        for k in b0:
            torch.testing.assert_close(b1[k], b0[k], atol=1e-10, rtol=1e-9, msg=k)


def test_fusing_again_and_syncing_keep_the_activations(device):
    model = _NormActNet().to(device)
    x, r = make((2, 4, 3, 5), torch.float64, device, seed=7), make((2, 4, 3, 5), torch.float64, device, seed=8)
    gm = bn_triton.fuse(model, (x, r))
    again = bn_triton.fuse(gm, (x, r)).fusion_report
    assert again.fused == [("a", "silu"), ("f", "hardswish")]  # their own acts, as before
    residual = "called with a residual or more arguments already"
    assert again.left == [("b", residual), ("c", residual), *LEFT]
    synced = bn_triton.SyncBatchNorm.convert_sync_batchnorm(gm)
    assert [type(synced.get_submodule(n)) for n in "abcdef"] == [bn_triton.SyncBatchNormAct] * 6
    assert [synced.get_submodule(n).activation for n in "abcdef"] == ["silu", "relu", None, None, None, "hardswish"]
