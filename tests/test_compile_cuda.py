"""CUDA only: CUDA graphs (torch.compile mode="reduce-overhead") and no host syncs, on a real GPU.

Skipped without CUDA. bench/gpu_check.sh runs it with the rest of the suite; inductor on CUDA is
covered there by test_compile.py, whose tests take the ``device`` fixture.
"""

import copy

import pytest
import torch
import torch._dynamo.utils

from bn_triton import ops
from tests.helpers import make
from tests.test_compile import SHAPE, C, _net, _step

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

DY_SHAPE = (2, C, 2, 2, 2)


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    yield
    torch._dynamo.reset()


def test_cuda_graphs_match_eager():
    """mode="reduce-overhead": training steps (the first ones warm up and record, the later ones
    replay the graph), then eval; same outputs, gradients and buffers as eager, and inductor did not
    skip CUDA graphs (it would for a host sync, a CPU tensor or an unsupported input mutation)."""
    eager = _net("cuda")
    model = copy.deepcopy(eager)
    compiled = torch.compile(model, mode="reduce-overhead", fullgraph=True)
    tol = dict(atol=1e-5, rtol=1e-5)
    for step in range(4):
        x = make(SHAPE, torch.float32, "cuda", offset=step, scale=1 + step, seed=step)
        dy = make(DY_SHAPE, torch.float32, "cuda", seed=10 + step)
        y_e, g_e = _step(eager, x, dy)
        y_c, g_c = _step(compiled, x, dy)  # compared before the next replay overwrites them
        torch.testing.assert_close(y_c, y_e, **tol)
        for a, b in zip(g_c, g_e, strict=True):
            torch.testing.assert_close(a, b, **tol)
    for (name, a), (_, b) in zip(model.named_buffers(), eager.named_buffers(), strict=True):
        torch.testing.assert_close(a, b, **tol, msg=name)
    assert int(model.bn2.num_batches_tracked) == 4
    eager.eval()
    model.eval()
    with torch.no_grad():
        for step in range(3):
            x = make(SHAPE, torch.float32, "cuda", seed=20 + step)
            torch.testing.assert_close(compiled(x), eager(x), **tol)
    skips = torch._dynamo.utils.counters["inductor"]["cudagraph_skips"]
    assert skips == 0, f"inductor skipped CUDA graphs {skips} time(s); run with TORCH_LOGS=perf_hints to see why"


@pytest.mark.parametrize("route", ["fast", "ops"])
def test_no_host_sync_in_eager_forward_backward(route, monkeypatch):
    """torch.cuda.set_sync_debug_mode("error") makes any synchronizing call raise: training steps
    (momentum=None included) and eval, forward and backward, by the eager fast path and (where ops.py
    still has a separate one) by the custom ops."""
    if route == "ops":
        if not hasattr(ops, "_plain_eager"):
            pytest.skip("ops.py has one route (no separate eager fast path): covered by route 'fast'")
        monkeypatch.setattr(ops, "_plain_eager", lambda *tensors: False)
    net = _net("cuda")
    xs = [make(SHAPE, torch.float32, "cuda", seed=s) for s in range(3)]  # host-to-device copies sync:
    dy = make(DY_SHAPE, torch.float32, "cuda", seed=9)  # make every input before the check starts
    _step(net, xs[0], dy)  # first calls compile the kernels (Triton's compile may sync)
    net.eval()
    _step(net, xs[0], dy)
    net.train()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        _step(net, xs[1], dy)
        _step(net, xs[2], dy)
        net.eval()
        _step(net, xs[1], dy)
        with torch.no_grad():
            net(xs[2])
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert int(net.bn2.num_batches_tracked) == 3
