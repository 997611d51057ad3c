"""Converters: convert_batchnorm, SyncBatchNorm.convert_sync_batchnorm, and the guard on torch's converter."""

import copy
import importlib
import inspect
import warnings

import pytest
import torch

import bn_triton
from tests.helpers import make


def test_convert_batchnorm_keeps_state(device):
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 1),
        torch.nn.BatchNorm2d(4, momentum=None),
        torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4 * 9, 5), torch.nn.BatchNorm1d(5, affine=False)),
    ).to(device)
    bn3 = torch.nn.BatchNorm3d(2, track_running_stats=False).to(device).eval()
    model.add_module("extra", bn3)
    model[1].running_mean.uniform_()
    model[1].weight.requires_grad_(False)
    model[2][2].eval()
    twin = copy.deepcopy(model)  # stays torch's
    ref_state = copy.deepcopy(model.state_dict())
    params = {n: p for n, p in model.named_parameters()}
    buffers = {n: b for n, b in model.named_buffers()}
    out = bn_triton.convert_batchnorm(model)
    assert out is model
    assert type(model[1]) is bn_triton.BatchNorm2d
    assert type(model[2][2]) is bn_triton.BatchNorm1d
    assert type(model.extra) is bn_triton.BatchNorm3d
    assert model[1].momentum is None and model[2][2].affine is False and model.extra.track_running_stats is False
    assert model[1].training and not model[2][2].training and not model.extra.training
    for n, p in model.named_parameters():
        assert p is params[n]
    assert not model[1].weight.requires_grad
    for n, b in model.named_buffers():
        assert b is buffers[n]
        assert b.device.type == torch.device(device).type
    for k, v in model.state_dict().items():
        assert torch.equal(v, ref_state[k]), k
    # The converted model computes what torch's did, and moves its buffers the same way.
    x = make((2, 3, 3, 3), torch.float32, device, seed=1)
    torch.testing.assert_close(model[:3](x), twin[:3](x), atol=2e-5, rtol=2e-5)
    for (k, v), (_, w) in zip(model.state_dict().items(), twin.state_dict().items(), strict=True):
        torch.testing.assert_close(v, w, atol=2e-5, rtol=2e-5, msg=k)
    # A torch BN layer passed directly is returned converted.
    single = bn_triton.convert_batchnorm(torch.nn.BatchNorm1d(3))
    assert type(single) is bn_triton.BatchNorm1d


# ---------------------------------------------------------------- tensors that are None


def _no_running_stats(bn):
    bn.running_mean = bn.running_var = None  # torch then normalizes with batch statistics in eval too


def _no_num_batches_tracked(bn):
    bn.num_batches_tracked = None


def _no_buffers(bn):
    _no_running_stats(bn)
    _no_num_batches_tracked(bn)


def _no_weight_counter_not_persistent(bn):
    bn.weight = None
    bn.register_buffer("num_batches_tracked", bn.num_batches_tracked, persistent=False)


CASES = {
    "running_stats_none": (dict(), _no_running_stats),
    "num_batches_tracked_none": (dict(), _no_num_batches_tracked),
    "buffers_none": (dict(), _no_buffers),
    "weight_none": (dict(), _no_weight_counter_not_persistent),
    "affine_false": (dict(affine=False), _no_running_stats),
}
CONVERTERS = {
    "convert_batchnorm": (bn_triton.convert_batchnorm, bn_triton.BatchNorm2d),
    "convert_sync_batchnorm": (bn_triton.SyncBatchNorm.convert_sync_batchnorm, bn_triton.SyncBatchNorm),
}


def _assert_same_state(actual: torch.nn.Module, expected: torch.nn.Module):
    a, e = actual.state_dict(), expected.state_dict()
    assert list(a) == list(e)
    for k, v in a.items():
        assert v.device == e[k].device, k
        torch.testing.assert_close(v, e[k], atol=2e-5, rtol=2e-5, msg=k)


def _assert_same_objects(actual: dict, expected: dict):
    assert list(actual) == list(expected)
    assert all(actual[k] is v for k, v in expected.items())


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("converter", CONVERTERS)
def test_converted_layer_holds_exactly_the_originals_tensors(converter, case, device):
    """None stays None (no meta placeholder): state_dicts, loading and outputs are torch's."""
    convert, cls = CONVERTERS[converter]
    kwargs, edit = CASES[case]
    gen = torch.Generator().manual_seed(0)
    ref = torch.nn.BatchNorm2d(3, **kwargs)
    for t in ref.state_dict().values():
        t.copy_(torch.rand(t.shape, generator=gen) + 1) if t.is_floating_point() else t.fill_(5)
    edit(ref)
    ref.to(device)
    bn = copy.deepcopy(ref)  # converted; ref stays torch's
    params, buffers = dict(bn._parameters), dict(bn._buffers)
    non_persistent = set(bn._non_persistent_buffers_set)

    new = convert(bn)
    assert type(new) is cls
    _assert_same_objects(new._parameters, params)
    _assert_same_objects(new._buffers, buffers)
    assert new._non_persistent_buffers_set == non_persistent
    _assert_same_state(new, ref)
    # Loading moves the values, both ways (into a meta placeholder it would do nothing).
    other = copy.deepcopy(ref)
    for t in other.state_dict().values():
        t.add_(1)
    new.load_state_dict(other.state_dict(), strict=True)
    _assert_same_state(new, other)
    ref.load_state_dict(new.state_dict(), strict=True)
    _assert_same_state(ref, other)

    for step in range(2):
        x = make((4, 3, 2, 3), torch.float32, device, seed=step)
        torch.testing.assert_close(new(x), ref(x), atol=2e-5, rtol=2e-5)
        _assert_same_state(new, ref)
    new.eval()
    ref.eval()
    x = make((4, 3, 2, 3), torch.float32, device, seed=9)
    torch.testing.assert_close(new(x), ref(x), atol=2e-5, rtol=2e-5)


# ---------------------------------------------------------------- torch's converter and fused layers


class Block(torch.nn.Module):
    """relu(BN(conv(x)) + x) with a fused layer; conv(x) alone with an unfused one."""

    def __init__(self, bn):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 3, 1)
        self.bn = bn

    def forward(self, x):
        if getattr(self.bn, "activation", None) is None:
            return self.bn(self.conv(x))
        return self.bn(self.conv(x), residual=x)


class TheirSubclass(torch.nn.SyncBatchNorm):
    """A user's subclass of torch's class: torch's converter called with cls=TheirSubclass."""


REFUSED = r"drop the fused activation.*bn_triton\.SyncBatchNorm\.convert_sync_batchnorm"


def test_torch_converter_refuses_fused_layers_before_converting():
    model = torch.nn.Sequential(
        torch.nn.BatchNorm2d(3),  # converted first by torch's recursion, were it let through
        Block(bn_triton.BatchNorm2d(3, activation="relu")),
        bn_triton.BatchNorm2d(3),
    )
    before = list(model.named_modules())
    for convert in (torch.nn.SyncBatchNorm.convert_sync_batchnorm, TheirSubclass.convert_sync_batchnorm):
        with pytest.raises(RuntimeError, match=REFUSED) as refused:
            convert(model, process_group=None)
        assert "'1.bn'" in str(refused.value)
        after = list(model.named_modules())
        assert [n for n, _ in after] == [n for n, _ in before]
        assert all(a is b for (_, a), (_, b) in zip(after, before, strict=True))
    # A fused layer passed directly, ours or our SyncBatchNorm, positional process_group.
    for layer in (bn_triton.BatchNorm1d(3, activation="relu"), bn_triton.SyncBatchNorm(3, activation="relu")):
        with pytest.raises(RuntimeError, match=REFUSED):
            torch.nn.SyncBatchNorm.convert_sync_batchnorm(layer, None)


def _plain_model():
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 3, 1),
        torch.nn.BatchNorm2d(3),
        torch.nn.Sequential(bn_triton.BatchNorm2d(3, momentum=None), torch.nn.SyncBatchNorm(3, affine=False)),
        Block(bn_triton.BatchNorm2d(3, eps=1e-3)),
    )
    for t in model.state_dict().values():
        t.add_(torch.rand(t.shape) if t.is_floating_point() else 2)
    model[1].eval()
    model[2][0].qconfig = "qconfig"
    return model


def _summary(model):
    """Each module's class and public attributes (settings, mode, process group, qconfig)."""
    return [(n, type(m), {k: v for k, v in vars(m).items() if not k.startswith("_")}) for n, m in model.named_modules()]


@pytest.mark.parametrize("cls", [torch.nn.SyncBatchNorm, TheirSubclass], ids=lambda c: c.__name__)
def test_torch_converter_converts_plain_models_as_unwrapped(cls, monkeypatch):
    """Without fused layers the wrapper changes nothing: our unfused layers become torch's too."""
    group = object()  # stands in for a process group: stored, not used outside training
    model = _plain_model()
    twin, before = copy.deepcopy(model), copy.deepcopy(model).eval()
    x = make((2, 3, 2, 2), torch.float32, "cpu", seed=3)
    expected = before(x)

    out = cls.convert_sync_batchnorm(model, process_group=group)
    unwrapped = torch.nn.SyncBatchNorm.convert_sync_batchnorm.__wrapped__
    with monkeypatch.context() as m:
        m.setattr(torch.nn.SyncBatchNorm, "convert_sync_batchnorm", classmethod(unwrapped))
        out_twin = cls.convert_sync_batchnorm(twin, process_group=group)

    assert out is model and out_twin is twin
    assert type(model[2][0]) is torch.nn.SyncBatchNorm and model[2][0].process_group is group
    assert _summary(model) == _summary(twin)
    _assert_same_state(model, twin)
    torch.testing.assert_close(model.eval()(x), expected, atol=2e-5, rtol=2e-5)
    # A layer passed directly: a new torch SyncBatchNorm, as unwrapped.
    layer = bn_triton.BatchNorm1d(3)
    new = torch.nn.SyncBatchNorm.convert_sync_batchnorm(layer)
    assert type(new) is torch.nn.SyncBatchNorm and new.weight is layer.weight and new.running_var is layer.running_var


def test_bn_triton_converter_keeps_fused_activation(device):
    torch.manual_seed(0)
    model = torch.nn.Sequential(Block(bn_triton.BatchNorm2d(3, activation="relu"))).to(device)
    twin = copy.deepcopy(model)
    out = bn_triton.SyncBatchNorm.convert_sync_batchnorm(model)
    assert out is model and type(model[0].bn) is bn_triton.SyncBatchNorm and model[0].bn.activation == "relu"
    for step in range(2):
        x = make((2, 3, 2, 3), torch.float32, device, seed=step)
        torch.testing.assert_close(model(x), twin(x), atol=2e-5, rtol=2e-5)
    model.eval()
    twin.eval()
    x = make((2, 3, 2, 3), torch.float32, device, seed=5)
    torch.testing.assert_close(model(x), twin(x), atol=2e-5, rtol=2e-5)
    _assert_same_state(model, twin)


def test_guard_wraps_torch_converter_once():
    """A second call or a re-import leaves one wrapper, which keeps torch's name, docstring,
    signature and classmethod nature."""
    from bn_triton import convert

    convert.guard_torch_converter()
    importlib.reload(convert)
    assert isinstance(inspect.getattr_static(torch.nn.SyncBatchNorm, "convert_sync_batchnorm"), classmethod)
    wrapper = torch.nn.SyncBatchNorm.convert_sync_batchnorm
    original = wrapper.__wrapped__
    assert not hasattr(original, "__wrapped__") and original.__module__ == "torch.nn.modules.batchnorm"
    assert wrapper.__doc__ == original.__doc__ and wrapper.__qualname__ == original.__qualname__
    for follow_wrapped in (True, False):
        signature = inspect.signature(wrapper, follow_wrapped=follow_wrapped)
        assert list(signature.parameters) == ["module", "process_group"]
        assert signature.parameters["process_group"].default is None


# ---------------------------------------------------------------- what convert_batchnorm leaves, and why


class OwnForward(torch.nn.BatchNorm2d):
    """A user's subclass that computes something else."""

    def forward(self, input):
        return super().forward(input) * 2


class OwnMethod(torch.nn.BatchNorm1d):
    """A user's subclass with a method of its own, torch's forward."""

    def describe(self):
        return "mine"


def test_convert_batchnorm_names_what_it_leaves_in_one_warning():
    model = torch.nn.Sequential(
        torch.nn.BatchNorm2d(3),
        OwnForward(3),
        torch.nn.Sequential(OwnMethod(3), OwnForward(3), torch.ao.nn.quantized.BatchNorm2d(3)),
        torch.nn.SyncBatchNorm(3),
        bn_triton.BatchNorm2d(3),
    )
    with pytest.warns(UserWarning, match=r"bn_triton\.convert_batchnorm: left 4 ") as record:
        out = bn_triton.convert_batchnorm(model)
    assert out is model and len(record) == 1
    message = str(record[0].message)
    assert all(f"'{name}'" in message for name in ("1", "2.0", "2.1", "2.2"))
    assert "'3'" not in message and "'4'" not in message
    assert [type(m) for m in (model[1], model[2][0], model[2][1])] == [OwnForward, OwnMethod, OwnForward]
    assert type(model[3]) is torch.nn.SyncBatchNorm
    report = model.conversion_report
    assert report.converted == [("0", "torch.nn.BatchNorm2d -> bn_triton.BatchNorm2d")]
    left = dict(report.left)
    assert list(left) == ["1", "2.0", "2.1", "2.2"]
    assert "subclass of torch.nn.BatchNorm2d" in left["1"] and "defines its own forward" in left["1"]
    assert "subclass of torch.nn.BatchNorm1d" in left["2.0"] and "forward" not in left["2.0"]
    assert "torch.ao.nn.quantized" in left["2.2"]
    kept = dict(report.kept)
    assert list(kept) == ["3", "4"]
    assert "bn_triton.SyncBatchNorm.convert_sync_batchnorm" in kept["3"] and "already bn_triton's" in kept["4"]
    text = str(report)
    assert text.startswith("converted 1 of 7 normalization layers") and "'2.1'" in text


def test_convert_batchnorm_is_silent_when_nothing_is_left():
    shared = torch.nn.BatchNorm2d(3)
    model = torch.nn.Sequential(
        shared,
        torch.nn.Sequential(shared, torch.nn.LazyBatchNorm3d()),
        torch.nn.SyncBatchNorm(3),
        bn_triton.BatchNorm1d(3, activation="relu"),
        bn_triton.SyncBatchNorm(3),
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        bn_triton.convert_batchnorm(model)
    assert model[0] is model[1][0] and type(model[0]) is bn_triton.BatchNorm2d  # shared stays shared
    report = model.conversion_report
    assert [n for n, _ in report.converted] == ["0", "1.1"] and not report.left
    assert [n for n, _ in report.kept] == ["2", "3", "4"]
    assert str(report).startswith("converted 2 of 5 normalization layers")


def test_convert_batchnorm_reports_on_a_layer_passed_directly():
    with pytest.warns(UserWarning, match="the given module"):
        same = bn_triton.convert_batchnorm(OwnForward(3))
    assert type(same) is OwnForward and same.conversion_report.left[0][0] == ""
    new = bn_triton.convert_batchnorm(torch.nn.BatchNorm3d(2))
    assert type(new) is bn_triton.BatchNorm3d and new.conversion_report.converted[0][0] == ""
