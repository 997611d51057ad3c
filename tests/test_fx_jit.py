"""torch.fx sees our layers as leaves (one call_module node each, as torch's own layers); TorchScript is
refused with an error that names what to use instead."""

import pytest
import torch
from torch import nn

import bn_triton
from tests.helpers import make


@pytest.mark.parametrize("activation", [None, "relu"])
def test_symbolic_trace_records_one_leaf_node(activation, device):
    net = nn.Sequential(nn.Conv2d(3, 3, 1), bn_triton.BatchNorm2d(3, activation=activation)).to(device)
    gm = torch.fx.symbolic_trace(net)
    calls = [n for n in gm.graph.nodes if n.op == "call_module"]
    assert [n.target for n in calls] == ["0", "1"], "the layer must be one call_module node, as torch's are"
    x = make((2, 3, 4, 5), torch.float32, device, seed=0)
    torch.testing.assert_close(gm(x), net(x), atol=0, rtol=0)


def test_symbolic_trace_keeps_the_residual(device):
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.bn = bn_triton.BatchNorm1d(4, activation="relu")

        def forward(self, x, r):
            return self.bn(x, residual=r)

    block = Block().to(device)
    gm = torch.fx.symbolic_trace(block)
    (node,) = [n for n in gm.graph.nodes if n.op == "call_module"]
    assert node.target == "bn" and "residual" in node.kwargs
    x, r = make((6, 4), torch.float32, device, seed=1), make((6, 4), torch.float32, device, seed=2)
    torch.testing.assert_close(gm(x, r), block(x, r), atol=0, rtol=0)


def test_sync_batchnorm_is_a_leaf_too(device):
    net = nn.Sequential(bn_triton.SyncBatchNorm(3))
    gm = torch.fx.symbolic_trace(net)
    assert [n.op for n in gm.graph.nodes] == ["placeholder", "call_module", "output"]


@pytest.mark.parametrize("cls", [bn_triton.BatchNorm2d, bn_triton.SyncBatchNorm])
def test_jit_script_says_torchscript_is_not_supported(cls):
    with pytest.raises(RuntimeError, match="does not support TorchScript.*torch.compile"):
        torch.jit.script(nn.Sequential(nn.Conv2d(3, 3, 1), cls(3)))


def test_jit_trace_says_torchscript_is_not_supported(device):
    net = nn.Sequential(nn.Conv2d(3, 3, 1), bn_triton.BatchNorm2d(3)).to(device)
    with pytest.raises(RuntimeError, match="does not support TorchScript.*torch.compile"):
        torch.jit.trace(net, make((2, 3, 4, 4), torch.float32, device, seed=0))


def test_functional_under_jit_trace_says_so(device):
    fn = lambda x: bn_triton.batch_norm(x, None, None, training=True)
    with pytest.raises(RuntimeError, match="does not support TorchScript.*torch.compile"):
        torch.jit.trace(fn, make((4, 3), torch.float32, device, seed=0))
