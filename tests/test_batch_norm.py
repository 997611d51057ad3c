"""bn_triton.batch_norm against the float64 reference and torch: every rank, layout and dtype.

Pruning: the full cross product of rank x layout x dtype x train/eval x affine x param dtype is too
slow for the interpreter. Every (rank, layout, dtype) triple runs in training and eval with affine
parameters in the input's dtype; affine off and float32 parameters (the AMP case) run on one shape
per layout, since they change only per-channel loads, not tiling.
"""

import pytest
import torch
import torch.nn.functional as F

import bn_triton
from bn_triton import launch, reference
from tests.helpers import SHAPES, TOL, assert_close, layouts_for, make, np64

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
CASES = [(rank, layout) for rank in SHAPES for layout in layouts_for(rank)]


def _params(C, dtype, device, affine=True):
    if not affine:
        return None, None
    w = make((C,), dtype, device, scale=0.5, offset=1.0)
    b = make((C,), dtype, device, scale=0.5)
    return w, b


def _check_train(x, w, b, device, torch_bn_forbidden, eps=1e-5):
    dtype = x.dtype
    C = x.shape[1]
    pdtype = w.dtype if w is not None else torch.float32  # the per-channel tensors share one dtype
    rm = make((C,), pdtype, device, scale=0.1)
    rv = make((C,), pdtype, device, scale=0.1, offset=1.0)
    rm0, rv0 = rm.clone(), rv.clone()
    xg = x.detach().requires_grad_()
    wg = w.detach().requires_grad_() if w is not None else None
    bg = b.detach().requires_grad_() if b is not None else None
    stats_launches = lambda: launch.LAUNCHES["stats"] + launch.LAUNCHES["forward"]  # split or single pass
    before = stats_launches()
    y = bn_triton.batch_norm(xg, rm, rv, wg, bg, training=True, momentum=0.1, eps=eps)
    assert stats_launches() == before + 1, "our statistics kernel did not run"
    assert y.shape == x.shape and y.dtype == dtype
    if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
        assert y.is_contiguous(memory_format=torch.channels_last)
    dy = make(x.shape, dtype, device, seed=1)
    y.backward(dy)

    y_ref, mean_ref, var_ref = reference.forward(
        np64(x), None if w is None else np64(w), None if b is None else np64(b), eps
    )
    dx_ref, dw_ref, db_ref = reference.backward(np64(dy), np64(x), None if w is None else np64(w), eps)
    m = x.numel() // C
    rm_ref, rv_ref = reference.running_stats(np64(rm0), np64(rv0), mean_ref, var_ref, m, 0.1)
    assert_close(y, y_ref, dtype, what="y")
    assert_close(xg.grad, dx_ref, dtype, scale=4, what="dx")
    # dweight/dbias are sums over m values: their error grows with m (fp32 accumulation, rounded inputs).
    if w is not None:
        assert_close(wg.grad, dw_ref, w.dtype, scale=m, what="dweight")
        assert_close(bg.grad, db_ref, b.dtype, scale=m, what="dbias")
    assert_close(rm, rm_ref, dtype, what="running_mean")
    assert_close(rv, rv_ref, dtype, what="running_var")
    # Second opinion: torch's own batch_norm on the same input (float32 math on CPU).
    with torch_bn_forbidden.allowed():
        xt = x.detach().float().cpu().requires_grad_()
        yt = F.batch_norm(
            xt,
            None,
            None,
            None if w is None else w.float().cpu(),
            None if b is None else b.float().cpu(),
            True,
            0.1,
            eps,
        )
        yt.backward(dy.float().cpu())
    torch.testing.assert_close(y.float().cpu(), yt, **TOL[dtype])
    torch.testing.assert_close(xg.grad.float().cpu(), xt.grad, atol=TOL[dtype]["atol"] * 4, rtol=TOL[dtype]["rtol"])


def _check_eval(x, w, b, device, torch_bn_forbidden, eps=1e-5):
    dtype = x.dtype
    C = x.shape[1]
    pdtype = w.dtype if w is not None else dtype
    rm = make((C,), pdtype, device, scale=0.3)
    rv = make((C,), pdtype, device, scale=0.2, offset=1.0)
    rm0, rv0 = rm.clone(), rv.clone()
    xg = x.detach().requires_grad_()
    wg = w.detach().requires_grad_() if w is not None else None
    bg = b.detach().requires_grad_() if b is not None else None
    y = bn_triton.batch_norm(xg, rm, rv, wg, bg, training=False, eps=eps)
    dy = make(x.shape, dtype, device, seed=2)
    y.backward(dy)
    y_ref = reference.eval_forward(
        np64(x), np64(rm), np64(rv), None if w is None else np64(w), None if b is None else np64(b), eps
    )
    dx_ref = reference.eval_backward(np64(dy), np64(rv), None if w is None else np64(w), eps)
    assert_close(y, y_ref, dtype, what="y")
    assert_close(xg.grad, dx_ref, dtype, scale=4, what="dx")
    if w is not None:
        import numpy as np

        xhat = (np64(x) - np64(rm).reshape((1, -1) + (1,) * (x.dim() - 2))) / np.sqrt(
            np64(rv).reshape((1, -1) + (1,) * (x.dim() - 2)) + eps
        )
        axes = (0,) + tuple(range(2, x.dim()))
        m = x.numel() // C
        assert_close(wg.grad, (np64(dy) * xhat).sum(axes), w.dtype, scale=m, what="dweight")
        assert_close(bg.grad, np64(dy).sum(axes), b.dtype, scale=m, what="dbias")
    assert torch.equal(rm, rm0) and torch.equal(rv, rv0), "eval must not touch the running stats"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("rank,layout", CASES)
def test_train_matches_reference(rank, layout, dtype, device, torch_bn_forbidden):
    x = make(SHAPES[rank], dtype, device, layout, offset=0.5, scale=2.0, seed=rank)
    w, b = _params(x.shape[1], dtype, device)
    _check_train(x, w, b, device, torch_bn_forbidden)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("rank,layout", CASES)
def test_eval_matches_reference(rank, layout, dtype, device, torch_bn_forbidden):
    x = make(SHAPES[rank], dtype, device, layout, offset=-0.5, scale=1.5, seed=10 + rank)
    w, b = _params(x.shape[1], dtype, device)
    _check_eval(x, w, b, device, torch_bn_forbidden)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_float32_params_with_half_input(layout, training, dtype, device, torch_bn_forbidden):
    """The AMP case: half-precision activations, float32 weight, bias and running stats."""
    x = make(SHAPES[4], dtype, device, layout, offset=1.0, seed=3)
    w, b = _params(x.shape[1], torch.float32, device)
    check = _check_train if training else _check_eval
    check(x, w, b, device, torch_bn_forbidden)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("rank,layout", [(2, "contiguous"), (4, "channels_last"), (5, "contiguous")])
def test_affine_off(rank, layout, training, device, torch_bn_forbidden):
    x = make(SHAPES[rank], torch.float32, device, layout, seed=4)
    check = _check_train if training else _check_eval
    check(x, None, None, device, torch_bn_forbidden)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_gradcheck_float64(layout, training, device):
    x = make((3, 2, 3, 2), torch.float64, device, layout, seed=5).requires_grad_()
    w = make((2,), torch.float64, device, offset=1.0, seed=6).requires_grad_()
    b = make((2,), torch.float64, device, seed=7).requires_grad_()
    rm = make((2,), torch.float64, device, scale=0.1, seed=8)
    rv = make((2,), torch.float64, device, scale=0.1, offset=1.0, seed=9)

    def fn(x, w, b):
        return bn_triton.batch_norm(x, None if training else rm, None if training else rv, w, b, training=training)

    assert torch.autograd.gradcheck(fn, (x, w, b))


@pytest.mark.parametrize("mask", [(1, 0, 0), (0, 1, 0), (0, 0, 1), (1, 1, 0), (0, 1, 1), (1, 0, 1), (1, 1, 1)])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_needs_input_grad(mask, training, device):
    """Every combination of requires_grad: the right grads, and no dx work when dx is not needed."""
    x0 = make(SHAPES[3], torch.float32, device, seed=11)
    w0 = make((4,), torch.float32, device, offset=1.0, seed=12)
    b0 = make((4,), torch.float32, device, seed=13)
    x, w, b = (t.clone().requires_grad_(bool(r)) for t, r in zip((x0, w0, b0), mask, strict=True))
    rm, rv = torch.zeros(4, device=device), torch.ones(4, device=device)
    y = bn_triton.batch_norm(x, rm, rv, w, b, training=training)
    dy = make(SHAPES[3], torch.float32, device, seed=14)
    dx_launches = lambda: launch.LAUNCHES["grad_input"] + launch.LAUNCHES["backward"]  # split or single pass
    before = dx_launches()
    y.backward(dy)
    assert (dx_launches() > before) == bool(mask[0]), "the dx pass runs exactly when dx is wanted"
    if training:
        dx_ref, dw_ref, db_ref = reference.backward(np64(dy), np64(x0), np64(w0))
    else:
        dx_ref = reference.eval_backward(np64(dy), np64(rv), np64(w0))
        _, dw_ref, db_ref = None, None, np64(dy).sum((0, 2))
        dw_ref = (np64(dy) * np64(x0)).sum((0, 2))  # running mean 0, var 1 (eps aside)
    for t, ref, on, name in ((x, dx_ref, mask[0], "dx"), (w, dw_ref, mask[1], "dw"), (b, db_ref, mask[2], "db")):
        if on:
            assert_close(t.grad, ref, torch.float32, scale=30, what=name)
        else:
            assert t.grad is None


def test_empty_batch_matches_torch(device):
    x = torch.randn(0, 3, 4, device=device, requires_grad=True)
    rm, rv = torch.zeros(3, device=device), torch.ones(3, device=device)
    y = bn_triton.batch_norm(x, rm, rv, training=True)
    assert y.shape == x.shape
    y.sum().backward()
    assert x.grad.shape == x.shape
    assert torch.equal(rm, torch.zeros(3, device=device)) and torch.equal(rv, torch.ones(3, device=device))


def test_cpu_fallback_without_interpreter(monkeypatch):
    """CPU tensors without TRITON_INTERPRET go to torch's batch_norm, so models still run on CPU."""
    import bn_triton.functional as fn

    monkeypatch.setattr(fn, "interpreting", lambda: False)
    x = torch.randn(4, 3, 5)
    before = launch.LAUNCHES["stats"]
    y = bn_triton.batch_norm(x, None, None, training=True)
    assert launch.LAUNCHES["stats"] == before
    torch.testing.assert_close(y, F.batch_norm(x, None, None, training=True))
