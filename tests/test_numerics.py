"""Numerical promises: split reductions merge exactly enough, stay stable at large offsets, are
bitwise deterministic, and keep a NaN inside its own channel."""

import numpy as np
import pytest
import torch

import bn_triton
from bn_triton import _config, launch, ops, reference
from tests.helpers import assert_close, make, np64


@pytest.fixture
def many_splits(monkeypatch):
    """Tiny tiles and many reduction programs, so every channel is merged from several partials."""
    monkeypatch.setattr(_config, "TILE_ELEMS_INTERPRETER", 32)
    monkeypatch.setattr(_config, "TILE_ELEMS_GPU", 32)
    monkeypatch.setattr(_config, "INTERPRETER_PROGRAMS", 14)  # uneven: 5 tiles over 4 splits, 19 over 14
    monkeypatch.setattr(_config, "PROGRAMS_PER_SM", 1)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_split_reduction_merges_partials(layout, many_splits, device):
    x = make((5, 3, 6, 5), torch.float32, device, layout, offset=3.0, scale=2.0, seed=21)
    x_, geom = launch.canonical(x)
    cfg = _config.launch_config(geom, x_.device)
    assert 1 < cfg.num_splits <= cfg.num_tiles
    xg = x.clone().requires_grad_()
    y = bn_triton.batch_norm(xg, None, None, training=True)
    dy = make(x.shape, torch.float32, device, seed=22)
    y.backward(dy)
    y_ref, _, _ = reference.forward(np64(x))
    dx_ref, _, _ = reference.backward(np64(dy), np64(x))
    assert_close(y, y_ref, torch.float32, what="y")
    assert_close(xg.grad, dx_ref, torch.float32, scale=4, what="dx")


def test_launch_config_fills_the_gpu_at_small_c(h100):
    """At C=64 one program per channel leaves most of a 132-SM GPU idle; the split must not, and
    it must not overshoot one wave of PROGRAMS_PER_SM programs per SM either."""
    geom = _config.Geometry(
        R=256, C=64, S=112 * 112, stride_r=64 * 112 * 112, stride_c=112 * 112, channels_contig=False
    )
    cfg = _config.launch_config(geom, h100)
    wave = 132 * _config.PROGRAMS_PER_SM
    assert wave - cfg.num_c_blocks < cfg.num_c_blocks * cfg.num_splits <= wave
    cl = _config.Geometry(R=256 * 56 * 56, C=64, S=1, stride_r=64, stride_c=1, channels_contig=True)
    cfg = _config.launch_config(cl, h100)
    wave = 132 * _config.PROGRAMS_PER_SM
    assert wave - cfg.num_c_blocks < cfg.num_c_blocks * cfg.num_splits <= wave


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_variance_at_large_mean_offset(layout, many_splits, device):
    """A mean of 1e4 with std 1 in fp32: E[x^2] - E[x]^2 would lose every digit; we must not."""
    x = make((4, 2, 8, 8), torch.float32, device, layout, offset=1e4, seed=23)
    _, mean_ref, var_ref = reference.forward(np64(x))
    mean, rstd, var = ops.step("stats", x, None, None, 0.0, None, 1e-5, True)
    np.testing.assert_allclose(np64(var), var_ref, rtol=1e-3)
    np.testing.assert_allclose(np64(mean), mean_ref, rtol=1e-6)
    rm, rv = torch.zeros(2, device=device), torch.ones(2, device=device)
    y = bn_triton.batch_norm(x, rm, rv, training=True, momentum=1.0)
    np.testing.assert_allclose(np64(rv), var_ref * x.numel() / 2 / (x.numel() / 2 - 1), rtol=1e-3)
    # The normalized output keeps its digits too: (x - mean) is exact near the mean.
    y_ref, _, _ = reference.forward(np64(x))
    np.testing.assert_allclose(np64(y), y_ref, atol=1e-3)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_bitwise_deterministic(layout, many_splits, device):
    x = make((6, 3, 5, 7), torch.float16, device, layout, offset=1.0, seed=24)
    w = make((3,), torch.float32, device, offset=1.0, seed=25)
    b = make((3,), torch.float32, device, seed=26)
    dy = make(x.shape, torch.float16, device, seed=27)
    results = []
    for _ in range(2):
        xg, wg, bg = (t.clone().requires_grad_() for t in (x, w, b))
        rm, rv = torch.zeros(3, device=device), torch.ones(3, device=device)
        y = bn_triton.batch_norm(xg, rm, rv, wg, bg, training=True)
        y.backward(dy)
        results.append([y, xg.grad, wg.grad, bg.grad, rm, rv])
    for a, b in zip(*results, strict=True):
        assert torch.equal(a, b)


def test_nan_stays_in_its_channel(device):
    x = make((4, 3, 5), torch.float32, device, seed=28)
    x[1, 1, 2] = float("nan")
    rm, rv = torch.zeros(3, device=device), torch.ones(3, device=device)
    y = bn_triton.batch_norm(x, rm, rv, training=True)
    assert torch.isnan(y[:, 1]).all()
    assert torch.isfinite(y[:, 0]).all() and torch.isfinite(y[:, 2]).all()
    assert torch.isnan(rm[1]) and torch.isfinite(rm[[0, 2]]).all() and torch.isfinite(rv[[0, 2]]).all()


@pytest.mark.parametrize("S", [1050, 1088], ids=["row-longer-than-a-tile", "tile-divides-the-row"])
def test_long_rows_split_into_tiles(S, device):
    """Rows longer than MAX_BLOCK_S: tiles that divide S (per-row counts), or a partial last tile
    along S (per-element counts): both against the float64 reference, forward and backward."""
    x = make((2, 2, S), torch.float32, device, offset=3.0, seed=27).requires_grad_()
    dy = make((2, 2, S), torch.float32, device, seed=28)
    y = bn_triton.batch_norm(x, None, None, training=True)
    y.backward(dy)
    y_ref, _, _ = reference.forward(np64(x))
    dx_ref, _, _ = reference.backward(np64(dy), np64(x), np.ones(2), 1e-5)
    np.testing.assert_allclose(np64(y), y_ref, atol=2e-5)
    np.testing.assert_allclose(np64(x.grad), dx_ref, atol=2e-5)


@pytest.mark.parametrize(
    "shape,layout", [((16, 8, 16, 16), "channels_last"), ((8, 4, 2, 16, 16), "channels_last_3d")], ids=["2d", "3d"]
)
def test_channels_last_sums_round_as_contiguous_ones(shape, layout, device):
    """A channels_last tile holds 4096 rows of a few channels: its per-channel sums run down the
    row axis. Summed one row after another (NumPy's order for that axis, under the interpreter)
    grad bias lost 15-25x the digits of NCHW's (2e-4 against 8e-6 on 4096 values); as a tree, as on
    a GPU, each sum and statistic is within a small factor of NCHW's error against float64."""
    x = make(shape, torch.float32, device, offset=1.0, scale=2.0, seed=31)
    dy64 = make(shape, torch.float32, device, seed=32).double()
    w = make(shape[1:2], torch.float32, device, offset=1.0, scale=0.2, seed=33)
    dims = [0, *range(2, len(shape))]
    x64 = x.double()
    mean, var = x64.mean(dims), x64.var(dims, unbiased=False)
    per_channel = (1, -1, *[1] * (len(shape) - 2))
    xhat = (x64 - mean.view(per_channel)) / torch.sqrt(var + 1e-5).view(per_channel)
    truth = {"dw": (dy64 * xhat).sum(dims), "db": dy64.sum(dims), "rm": mean, "rv": x64.var(dims)}
    errors = {}
    for fmt in ("contiguous", layout):
        xi = make(shape, torch.float32, device, fmt, offset=1.0, scale=2.0, seed=31).requires_grad_()
        wi, bi = w.clone().requires_grad_(), torch.zeros_like(w).requires_grad_()
        rm, rv = torch.zeros_like(w), torch.ones_like(w)
        y = bn_triton.batch_norm(xi, rm, rv, wi, bi, training=True, momentum=1.0)
        y.backward(make(shape, torch.float32, device, fmt, seed=32))
        got = {"dw": wi.grad / w, "db": bi.grad, "rm": rm, "rv": rv}
        errors[fmt] = {k: float((got[k].double() - truth[k]).abs().max()) for k in truth}
    for k, contiguous_error in errors["contiguous"].items():
        assert errors[layout][k] <= 4 * contiguous_error + 1e-7, (k, errors)


@pytest.mark.parametrize("fmt", [torch.contiguous_format, torch.channels_last], ids=["NCHW", "channels_last"])
@pytest.mark.parametrize("param_dtype", [torch.float16, torch.float32], ids=["fp16_params", "fp32_params"])
def test_half_input_with_a_million_values_per_channel_does_not_overflow(param_dtype, fmt, device):
    """PyTorch's test_batchnorm_half_overflow, with 2 channels instead of 80: 10^6 float16 values per
    channel, whose plain sums would overflow float16, give torch's float32 results (output and dx)."""
    torch.manual_seed(0)
    size = (4, 2, 500, 500)
    x = torch.randn(size, dtype=torch.half).contiguous(memory_format=fmt).to(device).requires_grad_()
    bn = bn_triton.BatchNorm2d(2).to(device, param_dtype)
    ref_x = x.detach().cpu().float().requires_grad_()
    ref = torch.nn.BatchNorm2d(2)
    ref.load_state_dict(bn.float().state_dict())
    bn.to(param_dtype)
    y, y_ref = bn(x), ref(ref_x)
    assert not y.isinf().any() and not y.isnan().any()
    torch.testing.assert_close(y.cpu().float(), y_ref, atol=1e-3, rtol=1e-3)
    if param_dtype != torch.half:
        dy = torch.empty(size).uniform_(0, 1).half().contiguous(memory_format=fmt)
        y.backward(dy.to(device))
        y_ref.backward(dy.float())
        assert not x.grad.isinf().any() and not x.grad.isnan().any()
        torch.testing.assert_close(x.grad.cpu().float(), ref_x.grad, atol=1e-3, rtol=1e-3)
