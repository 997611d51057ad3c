"""torch.compile(fullgraph=True), torch.export, torch.library.opcheck, and no host syncs.

Compiling is slow (inductor runs a C++ compiler on CPU), so there are few compiles, on one tiny model
that chains BatchNorm2d (momentum=None: the cumulative average torch itself cannot compile),
BatchNorm1d and BatchNorm3d. On a GPU the same tests run on CUDA tensors (``device`` fixture);
CUDA graphs and the sync check are in test_compile_cuda.py.
"""

import copy

import pytest
import torch
import torch._dynamo.testing

import bn_triton
from bench.stub import stubbed_kernels
from bn_triton import functional, ops
from tests.helpers import make

C = 3
SHAPE = (2, C, 2, 4)


class Net(torch.nn.Module):
    """Three of our layers in a row: 2d (cumulative average), 1d with the fused residual add + ReLU on
    a flattened view, 3d without affine parameters on a reshape."""

    def __init__(self):
        super().__init__()
        self.bn2 = bn_triton.BatchNorm2d(C, momentum=None)
        self.bn1 = bn_triton.BatchNorm1d(C, activation="relu")
        self.bn3 = bn_triton.BatchNorm3d(C, momentum=0.3, affine=False)

    def forward(self, x):
        y = self.bn2(x)
        y = self.bn1(y.flatten(2), residual=x.flatten(2))
        return self.bn3(y.view(x.shape[0], C, 2, 2, 2))


def _net(device):
    torch.manual_seed(0)
    net = Net().to(device)
    with torch.no_grad():  # not the default ones and zeros, so that weight and bias matter
        for p in net.parameters():
            p.copy_(torch.randn_like(p))
    return net


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    # Each test counts its own compiles; cached frames from another test would hide a recompile.
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _step(model, x, dy):
    x = x.clone().requires_grad_()
    y = model(x)
    y.backward(dy)
    grads = [x.grad] + [p.grad.clone() for p in model.parameters()]
    with torch.no_grad():  # an optimizer step, so that the next step sees new weights
        for p in model.parameters():
            p -= 0.5 * p.grad
            p.grad = None
    return y.detach(), grads


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_fullgraph_compile_matches_eager(backend, device, torch_bn_forbidden):
    """Two training steps (forward, backward, weight update), then eval: same outputs, gradients,
    running statistics and num_batches_tracked as eager; one graph for training, no recompiles."""
    eager = _net(device)
    model = copy.deepcopy(eager)
    counter = torch._dynamo.testing.CompileCounterWithBackend(backend)
    compiled = torch.compile(model, backend=counter, fullgraph=True)
    # aot_eager runs our very kernels on the very inputs: bitwise equal. Inductor generates the code
    # between our kernels and may give intermediates other strides, which our kernels then read in
    # another order: equal up to rounding.
    tol = dict(atol=0, rtol=0) if backend == "aot_eager" else dict(atol=1e-5, rtol=1e-5)
    for step in range(2):
        x = make(SHAPE, torch.float32, device, offset=step, scale=1 + step, seed=step)
        dy = make((2, C, 2, 2, 2), torch.float32, device, seed=10 + step)
        y_e, g_e = _step(eager, x, dy)
        y_c, g_c = _step(compiled, x, dy)
        torch.testing.assert_close(y_c, y_e, **tol)
        for a, b in zip(g_c, g_e, strict=True):
            torch.testing.assert_close(a, b, **tol)
    assert counter.frame_count == 1, "the second training step recompiled"
    for (name, a), (_, b) in zip(model.named_buffers(), eager.named_buffers(), strict=True):
        torch.testing.assert_close(a, b, **tol, msg=name)
    assert int(model.bn2.num_batches_tracked) == 2
    eager.eval()
    model.eval()
    x = make(SHAPE, torch.float32, device, seed=5)
    torch.testing.assert_close(compiled(x), eager(x), **tol)
    assert counter.frame_count == 2  # eval is its own graph (module.training is guarded on)


def test_dynamic_batch_size(device):
    """A new batch size recompiles once with a symbolic batch (dynamo's automatic dynamic shapes),
    then every further size reuses that graph: the fake implementations work with symbolic shapes."""
    eager = _net(device)
    model = copy.deepcopy(eager)
    counter = torch._dynamo.testing.CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(model, backend=counter, fullgraph=True)
    for n in (2, 4, 6):
        x = make((n, *SHAPE[1:]), torch.float32, device, seed=n)
        torch.testing.assert_close(compiled(x), eager(x), atol=0, rtol=0)
    assert counter.frame_count == 2
    for (name, a), (_, b) in zip(model.named_buffers(), eager.named_buffers(), strict=True):
        torch.testing.assert_close(a, b, atol=0, rtol=0, msg=name)


def test_explain_reports_no_graph_breaks(device):
    net = _net(device)
    x = make(SHAPE, torch.float32, device, seed=0)
    for training in (True, False):
        net.train(training)
        explanation = torch._dynamo.explain(net)(x)
        assert explanation.graph_break_count == 0, explanation.break_reasons
        assert explanation.graph_count == 1


@pytest.mark.parametrize("strict", [False, True], ids=["nonstrict", "strict"])
def test_export_eval_matches_eager(strict, device):
    net = _net(device)
    for step in range(2):  # running statistics that are not the initial zeros and ones
        net(make(SHAPE, torch.float32, device, offset=1, seed=step))
    net.eval()
    x = make(SHAPE, torch.float32, device, seed=3)
    program = torch.export.export(net, (x,), strict=strict)
    # Strict export may nest the autograd.Function's graph in a submodule (wrap_with_set_grad_enabled).
    called = {str(n.target) for gm in program.graph_module.modules() for n in gm.graph.nodes if n.op == "call_function"}
    assert "bn_triton.normalize.default" in called, called
    x2 = make(SHAPE, torch.float32, device, seed=4)
    torch.testing.assert_close(program.module()(x2), net(x2), atol=0, rtol=0)


# ---------------------------------------------------------------- opcheck, every op
def _opcheck_cases(device):
    """A couple of tiny calls per op: opcheck runs each one many times (schema, fake, AOT). The ops
    take detached tensors: BatchNormFunction is their autograd formula (ops.py)."""
    f32 = dict(dtype=torch.float32, device=device)
    x = make((2, C, 4), torch.float32, device, seed=0)
    x_cl = make((2, C, 2, 2), torch.float64, device, layout="channels_last", seed=1)
    w, b = torch.randn(C, **f32), torch.randn(C, **f32)
    rm, rv = torch.randn(C, **f32), torch.rand(C, **f32) + 0.5
    dy = make((2, C, 4), torch.float32, device, seed=2)
    nbt = torch.tensor(3, device=device)
    mean, rstd, var = ops.stats(x, None, None, 0.1, None, 1e-5, True)
    r = make((2, C, 4), torch.float32, device, seed=3)
    y_fused = ops.normalize(x, mean, rstd, w, b, 1e-5, False, r, "relu")
    s1, s2, *_ = ops.grad_sums(dy, x, mean, rstd, w, b, None, None, 1e-5, False, None, False, False, False, False)
    return [
        ("stats", ops.stats, (x, rm.clone(), rv.clone(), 0.1, nbt.clone(), 1e-5, False)),
        ("stats", ops.stats, (x_cl, rm.double(), rv.double(), None, nbt.clone(), 1e-3, True)),
        ("normalize", ops.normalize, (x, mean, rstd, w, b, 1e-5, False, None, None)),
        ("normalize", ops.normalize, (x_cl, rm.double(), rv.double(), None, None, 1e-3, True, None, None)),
        ("normalize", ops.normalize, (x, mean, rstd, w, b, 1e-5, False, r, "relu")),
        ("normalize", ops.normalize, (x, mean, rstd, w, b, 1e-5, False, r, "leaky_relu(0.2)")),
        (
            "grad_sums",
            ops.grad_sums,
            (dy, x, mean, rstd, w, b, None, None, 1e-5, False, None, False, True, True, False),
        ),
        (
            "grad_sums",
            ops.grad_sums,
            (dy, x, mean, rstd, w, b, y_fused, None, 1e-5, False, "relu", True, True, True, True),
        ),
        ("grad_sums", ops.grad_sums, (dy, x, mean, rstd, w, b, None, r, 1e-5, False, "silu", False, True, True, True)),
        (
            "grad_input",
            ops.grad_input,
            (dy, x, mean, rstd, w, s1, s2, b, None, None, 1e-5, True, 0, "hardswish", False, True, False),
        ),
        (
            "grad_input",
            ops.grad_input,
            (dy, x, rm, rv, None, None, None, None, y_fused, None, 1e-5, False, 0, "relu", True, True, True),
        ),
        ("update_running_stats", ops.update_running_stats, (rm.clone(), rv.clone(), mean, var, 0.1, 8, None)),
        ("update_running_stats", ops.update_running_stats, (rm.clone(), rv.clone(), mean, var, None, 8, nbt)),
    ]


@pytest.mark.parametrize("case", range(13))
def test_opcheck(case, device):
    name, op, args = _opcheck_cases(device)[case]
    results = torch.library.opcheck(op, args)
    assert set(results.values()) == {"SUCCESS"}, (name, results)


def test_every_op_has_an_opcheck_case(device):
    """A new op in the bn_triton namespace must get opcheck cases above."""
    registered = {
        name
        for name in dir(torch.ops.bn_triton)
        if isinstance(getattr(torch.ops.bn_triton, name), torch._ops.OpOverloadPacket)
    }
    covered = {name for name, _op, _args in _opcheck_cases(device)}
    assert registered <= covered, registered - covered


# ---------------------------------------------------------------- no host syncs
def test_no_host_reads_in_forward_or_backward(monkeypatch):
    """Forward, backward and the running-stat update run on meta tensors, which hold no data: any
    .item(), float(t), bool(t), .cpu() or .tolist() on a tensor raises. Kernels are stubbed out; the
    launch code around them (layouts, allocation, grids, launch arguments) runs for real."""
    monkeypatch.setattr(functional, "uses_triton", lambda input: True)
    with stubbed_kernels():
        net = _net("meta")
        x = torch.empty(SHAPE, device="meta", requires_grad=True)
        for training in (True, False):
            net.train(training)
            y = net(x)
            assert y.device.type == "meta"
            y.backward(torch.empty_like(y))
    assert x.grad is not None and net.bn2.weight.grad is not None


# ---------------------------------------------------------------- the eager fast path
def _train_then_eval(net, x, dy):
    """Two training steps and an eval forward+backward; every output, gradient and buffer."""
    out = []
    for step in range(2):
        y, grads = _step(net, x + step, dy)
        out += [y, *grads]
    net.eval()
    y, grads = _step(net, x, dy)
    return out + [y, *grads, *net.buffers()]


def test_fast_path_matches_op_path(device, monkeypatch):
    """The eager fast path and the ops run the same code: bitwise-equal outputs, gradients, buffers."""
    x = make(SHAPE, torch.float32, device, seed=0)
    dy = make((2, C, 2, 2, 2), torch.float32, device, seed=1)
    fast = _train_then_eval(_net(device), x, dy)
    monkeypatch.setattr(ops, "plain_eager", lambda *tensors: False)
    slow = _train_then_eval(_net(device), x, dy)
    assert len(fast) == len(slow)
    for a, b in zip(fast, slow, strict=True):
        torch.testing.assert_close(a, b, atol=0, rtol=0)


class _SeenOps(torch.utils._python_dispatch.TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.seen = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.seen.add(func.overloadpacket._qualified_op_name)
        return func(*args, **(kwargs or {}))


def test_eager_skips_the_ops_and_modes_see_them(device, monkeypatch):
    """Plain eager never calls an op (they are made to raise); under a dispatch mode, which stands for
    any tracer or interceptor, every op is called and seen."""
    net = _net(device)
    x = make(SHAPE, torch.float32, device, seed=0)
    dy = make((2, C, 2, 2, 2), torch.float32, device, seed=1)
    with _SeenOps() as mode:
        _step(net, x, dy)
        net.eval()
        _step(net, x, dy)
    names = ("stats", "normalize", "grad_sums", "grad_input")
    assert {f"bn_triton::{n}" for n in names} <= mode.seen, mode.seen

    def forbidden(*args, **kwargs):
        raise AssertionError("an op was called in plain eager mode")

    for name in names:
        monkeypatch.setitem(ops._OPS, name, forbidden)
    net.train()
    _step(net, x, dy)
    net.eval()
    _step(net, x, dy)
    with torch.no_grad():
        net(x)


def test_double_backward_matches_torch(device):
    """create_graph=True through our layer (a gradient penalty) gives torch's second derivatives."""
    x = make((2, C, 4), torch.float64, device, seed=0)
    w = make((C,), torch.float64, device, offset=1.0, seed=1)
    grads = []
    for fn in (bn_triton.batch_norm, torch.nn.functional.batch_norm):
        xi, wi = x.clone().requires_grad_(), w.clone().requires_grad_()
        y = fn(xi, None, None, wi, None, training=True)
        (dx,) = torch.autograd.grad(y.square().sum(), xi, create_graph=True)
        grads.append(torch.autograd.grad(dx.square().sum(), (xi, wi)))
    for ours, theirs in zip(*grads, strict=True):
        torch.testing.assert_close(ours, theirs)
