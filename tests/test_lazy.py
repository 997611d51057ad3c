"""LazyBatchNorm1d/2d/3d: torch's lazy semantics, then our BatchNorm1d/2d/3d; and convert_batchnorm
on torch's lazy layers."""

import warnings

import pytest
import torch
from torch.nn.parameter import UninitializedBuffer, UninitializedParameter

import bn_triton
from tests.helpers import make

RANKS = {
    1: (bn_triton.LazyBatchNorm1d, torch.nn.LazyBatchNorm1d, bn_triton.BatchNorm1d, (4, 3, 5)),
    2: (bn_triton.LazyBatchNorm2d, torch.nn.LazyBatchNorm2d, bn_triton.BatchNorm2d, (2, 3, 4, 5)),
    3: (bn_triton.LazyBatchNorm3d, torch.nn.LazyBatchNorm3d, bn_triton.BatchNorm3d, (2, 3, 2, 3, 4)),
}


def _assert_same_state(actual, expected):
    a, e = actual.state_dict(), expected.state_dict()
    assert list(a) == list(e)
    for k, v in a.items():
        torch.testing.assert_close(v, e[k], atol=2e-5, rtol=2e-5, msg=k)


@pytest.mark.parametrize("rank", RANKS)
def test_lazy_layer_becomes_ours_at_its_first_forward(rank, device):
    ours_cls, torch_cls, becomes, shape = RANKS[rank]
    assert ours_cls.cls_to_become is becomes and issubclass(ours_cls, torch_cls)
    kwargs = dict(eps=1e-3, momentum=None)
    ours, theirs = ours_cls(**kwargs, device=device), torch_cls(**kwargs, device=device)
    assert isinstance(ours.weight, UninitializedParameter) and isinstance(ours.running_mean, UninitializedBuffer)
    assert ours.state_dict().keys() == theirs.state_dict().keys()
    for step in range(2):
        x = make(shape, torch.float32, device, seed=step)
        torch.testing.assert_close(ours(x), theirs(x), atol=2e-5, rtol=2e-5)
        assert type(ours) is becomes and type(theirs) is torch_cls.cls_to_become
        assert ours.num_features == 3 and ours.eps == 1e-3 and ours.momentum is None
        _assert_same_state(ours, theirs)
    ours.eval()
    theirs.eval()
    x = make(shape, torch.float32, device, seed=5)
    torch.testing.assert_close(ours(x), theirs(x), atol=2e-5, rtol=2e-5)


def test_lazy_layer_with_fused_activation_and_residual(device):
    """The first call may take a residual: relu(BN(x) + residual) from the start."""
    ours = bn_triton.LazyBatchNorm2d(activation="relu", device=device)
    plain = torch.nn.BatchNorm2d(3, device=device)
    x, r = (make((2, 3, 4, 5), torch.float32, device, seed=s) for s in (0, 1))
    torch.testing.assert_close(ours(x, residual=r), torch.relu(plain(x) + r), atol=2e-5, rtol=2e-5)
    assert type(ours) is bn_triton.BatchNorm2d and ours.activation == "relu"
    assert "activation='relu'" in repr(ours)
    _assert_same_state(ours, plain)


def test_lazy_layer_loads_a_state_dict_and_refuses_unknown_activation():
    source = torch.nn.BatchNorm2d(6)
    for t in source.state_dict().values():
        t.add_(2)
    lazy = bn_triton.LazyBatchNorm2d()
    lazy.load_state_dict(source.state_dict())  # torch's lazy load hook materializes the tensors
    assert lazy.weight.shape == (6,) and not isinstance(lazy.running_var, UninitializedBuffer)
    _assert_same_state(lazy, source)
    with pytest.raises(ValueError):
        bn_triton.LazyBatchNorm2d(activation="not an activation")


def test_convert_batchnorm_makes_torchs_lazy_layers_ours(device):
    """An unmaterialized torch lazy layer becomes our lazy layer holding its very (uninitialized)
    tensors, materialized in place at the first forward; a materialized one is torch's BatchNorm
    (its cls_to_become) and is converted as such."""

    def build():  # twice: an uninitialized tensor cannot be deep-copied
        torch.manual_seed(0)
        layers = torch.nn.Conv2d(3, 4, 1), torch.nn.LazyBatchNorm2d(momentum=0.2), torch.nn.Flatten()
        return torch.nn.Sequential(*layers, torch.nn.LazyBatchNorm1d()).to(device)

    model, twin = build(), build()
    lazy = model[1]
    params, buffers = dict(lazy._parameters), dict(lazy._buffers)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = bn_triton.convert_batchnorm(model)
    assert out is model
    assert type(model[1]) is bn_triton.LazyBatchNorm2d and type(model[3]) is bn_triton.LazyBatchNorm1d
    assert model[1].momentum == 0.2 and model[1].training
    assert all(model[1]._parameters[k] is v for k, v in params.items())
    assert all(model[1]._buffers[k] is v for k, v in buffers.items())
    assert [n for n, _ in model.conversion_report.converted] == ["1", "3"]
    x = make((2, 3, 2, 2), torch.float32, device, seed=1)
    torch.testing.assert_close(model(x), twin(x), atol=2e-5, rtol=2e-5)
    assert type(model[1]) is bn_triton.BatchNorm2d and type(model[3]) is bn_triton.BatchNorm1d
    assert model[1].weight is params["weight"] and model[1].running_var is buffers["running_var"]
    _assert_same_state(model, twin)
    # Materialized, torch's layers are BatchNorm*d: converted as torch's BatchNorm*d are.
    assert type(twin[1]) is torch.nn.BatchNorm2d
    bn_triton.convert_batchnorm(twin)
    assert type(twin[1]) is bn_triton.BatchNorm2d and type(twin[3]) is bn_triton.BatchNorm1d


def test_convert_batchnorm_takes_a_lazy_layer_that_loaded_a_state_dict(device):
    """Loading materializes a lazy layer's tensors, its class changes at the first forward only:
    converted then, it computes what torch's does."""
    source = torch.nn.BatchNorm2d(3)
    for t in source.state_dict().values():
        t.add_(1)
    lazy, twin = torch.nn.LazyBatchNorm2d().to(device), torch.nn.LazyBatchNorm2d().to(device)
    for layer in (lazy, twin):
        layer.load_state_dict(source.state_dict())
    weight = lazy.weight
    ours = bn_triton.convert_batchnorm(lazy)
    assert type(ours) is bn_triton.LazyBatchNorm2d and ours.weight is weight
    x = make((2, 3, 4, 4), torch.float32, device, seed=0)
    torch.testing.assert_close(ours(x), twin(x), atol=2e-5, rtol=2e-5)
    assert type(ours) is bn_triton.BatchNorm2d and ours.weight is weight
    _assert_same_state(ours, twin)
