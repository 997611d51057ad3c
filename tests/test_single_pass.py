"""The single-pass kernels (kernels/single_pass.py): training forward and backward in one launch each.

Where one program owns a channel block, they run the split kernels' own code on one split, so their
results must be bitwise those of the split path with one split per block: checked for every dtype,
every (rank, layout) and the fused epilogues, with the running statistics (momentum and cumulative)
and every gradient. Then against the float64 reference, and the rule that decides where they run
on a GPU.
"""

import numpy as np
import pytest
import torch

import bn_triton
from bn_triton import _config, launch, reference
from tests.helpers import SHAPES, assert_close, layouts_for, make, np64, single_pass

DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64]
RANK_LAYOUTS = [(rank, layout) for rank in SHAPES for layout in layouts_for(rank)]


def _step(x, r, activation, momentum, seed):
    """A module's training forward and backward (dx, dweight, dbias, dresidual), with its buffers."""
    C = x.shape[1]
    cls = {2: bn_triton.BatchNorm1d, 3: bn_triton.BatchNorm1d, 4: bn_triton.BatchNorm2d}.get(
        x.dim(), bn_triton.BatchNorm3d
    )
    m = cls(C, momentum=momentum, activation=activation, device=x.device, dtype=x.dtype)
    with torch.no_grad():
        m.weight.copy_(make((C,), x.dtype, x.device, offset=1.0, seed=seed))
        m.bias.copy_(make((C,), x.dtype, x.device, seed=seed + 1))
        m.running_mean.copy_(make((C,), x.dtype, x.device, scale=0.1, seed=seed + 2))
    m.num_batches_tracked.fill_(2)
    leaves = [t.detach().requires_grad_() for t in (x, r) if t is not None]
    y = m(leaves[0], residual=leaves[1] if r is not None else None)
    dy = make(x.shape, x.dtype, x.device, seed=seed + 3)
    grads = torch.autograd.grad(y, [*leaves, m.weight, m.bias], dy)
    return [y, *grads, m.running_mean, m.running_var, m.num_batches_tracked]


def _both_paths(x, r, activation, momentum, monkeypatch, seed=30):
    """The split path and the single-pass path on the same input, each with one split per block."""
    monkeypatch.setattr(_config, "INTERPRETER_PROGRAMS", 1)
    out = {}
    for single in (False, True):
        monkeypatch.setattr(_config, "SINGLE_PASS", single)
        launch.clear_plans()
        assert single_pass(x) == single
        launch.LAUNCHES.clear()
        out[single] = _step(x, r, activation, momentum, seed)
        assert (launch.LAUNCHES["forward"] == 1 and launch.LAUNCHES["backward"] == 1) == single
        assert launch.LAUNCHES["stats"] == (0 if single else 1)
    return out[False], out[True]


def _bitwise(split, single):
    """Bitwise equal under the interpreter (the same operations in the same order). Compiled for a
    GPU, the two kernels may contract the same arithmetic differently (FMA): within 2 ulps there."""
    names = ["y", "dx", "dresidual", "dweight", "dbias", "running_mean", "running_var", "num_batches"]
    if len(split) == 7:  # no residual
        names.remove("dresidual")
    for name, a, b in zip(names, split, single, strict=True):
        assert a.dtype == b.dtype and a.stride() == b.stride(), name
        if a.device.type == "cpu":
            assert torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8)), f"{name} differs"
        elif a.is_floating_point():
            ulp = torch.finfo(a.dtype).eps * a.abs().max().clamp(min=1)
            torch.testing.assert_close(a, b, atol=2 * ulp.item(), rtol=0, msg=name)
        else:
            assert torch.equal(a, b), name


@pytest.mark.parametrize("rank,layout", RANK_LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
def test_bitwise_equal_to_the_split_path(rank, layout, dtype, device, monkeypatch):
    x = make(SHAPES[rank], dtype, device, layout=layout, seed=rank)
    _bitwise(*_both_paths(x, None, None, 0.1, monkeypatch))


@pytest.mark.parametrize("rank,layout", RANK_LAYOUTS)
@pytest.mark.parametrize("fusion", ["relu", "add", "add_relu"])
def test_bitwise_equal_with_the_fused_epilogue(rank, layout, fusion, device, monkeypatch):
    """float32 in every (rank, layout); the cumulative average (momentum None) on the way."""
    x = make(SHAPES[rank], torch.float32, device, layout=layout, seed=10 + rank)
    r = make(SHAPES[rank], torch.float32, device, seed=20 + rank) if fusion.startswith("add") else None
    activation = "relu" if fusion.endswith("relu") else None
    _bitwise(*_both_paths(x, r, activation, None, monkeypatch))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_bitwise_equal_with_residual_relu_in_half(dtype, device, monkeypatch):
    """The ReLU mask from the rounded output, and d(residual) stored in the half dtype."""
    x = make((2, 6, 3, 5), dtype, device, layout="channels_last", seed=41)
    r = make(x.shape, dtype, device, seed=42)
    _bitwise(*_both_paths(x, r, "relu", 0.1, monkeypatch))


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
def test_matches_float64_reference(dtype, device, monkeypatch):
    """Against the reference on a shape with several tiles per channel in both kernels, under the
    interpreter (small tiles) and on a GPU (6400 values per channel: 2 tiles of 4096, 4 of 2048)."""
    monkeypatch.setattr(_config, "SINGLE_PASS", True)
    monkeypatch.setattr(_config, "TILE_ELEMS_INTERPRETER", 512)
    monkeypatch.setattr(_config, "INTERPRETER_PROGRAMS", 1)
    x = make((64, 5, 100), dtype, device, offset=3.0, seed=50).requires_grad_()
    w = make((5,), dtype, device, offset=1.0, seed=51).requires_grad_()
    b = make((5,), dtype, device, seed=52).requires_grad_()
    rm, rv = torch.zeros(5, dtype=dtype, device=device), torch.ones(5, dtype=dtype, device=device)
    _, geom = launch.canonical(x)
    assert single_pass(x) or device == "cuda"  # on a GPU 5 channels get split reductions
    monkeypatch.setattr(launch, "single_pass", lambda geom, device, itemsize: True)  # on every device
    assert launch.launch_config(geom, x.device).num_tiles > 1
    assert _config.single_pass_config(geom, x.device).num_tiles > 1
    launch.LAUNCHES.clear()
    y = bn_triton.batch_norm(x, rm, rv, w, b, training=True, momentum=0.1, eps=1e-5)
    dy = make(x.shape, dtype, device, seed=53)
    y.backward(dy)
    assert dict(launch.LAUNCHES) == {"forward": 1, "backward": 1}
    y_ref, mean_ref, var_ref = reference.forward(np64(x), np64(w), np64(b), eps=1e-5)
    dx_ref, dw_ref, db_ref = reference.backward(np64(dy), np64(x), np64(w), eps=1e-5)
    m = x.numel() // 5
    assert_close(y, y_ref, dtype, what="y")
    assert_close(x.grad, dx_ref, dtype, scale=10, what="dx")
    assert_close(w.grad, dw_ref, dtype, scale=m, what="dweight")
    assert_close(b.grad, db_ref, dtype, scale=m, what="dbias")
    assert_close(rm, 0.1 * mean_ref, dtype, what="running_mean")
    assert_close(rv, 0.9 + 0.1 * var_ref * m / (m - 1), dtype, what="running_var")


def test_repeated_calls_are_bitwise_identical(device, monkeypatch):
    monkeypatch.setattr(_config, "SINGLE_PASS", True)
    monkeypatch.setattr(_config, "INTERPRETER_PROGRAMS", 1)
    x = make((4, 8, 6, 6), torch.float32, device, seed=60)
    runs = [_step(x, None, "relu", 0.1, 61) for _ in range(2)]
    _bitwise(*runs)


# ---------------------------------------------------------------- where it runs on a GPU
@pytest.mark.parametrize(
    "shape,dtype,channels_last,expected",
    [
        ((256, 2048, 7, 7), torch.float32, False, True),  # 396 blocks x 12544 x 2 x 4 B = 40 MB <= 50 MB
        ((256, 512, 7, 7), torch.float32, False, True),
        ((256, 1024, 14, 14), torch.bfloat16, False, False),  # 396 x 50176 x 2 x 2 B = 79 MB: past L2
        ((256, 64, 56, 56), torch.float32, False, False),  # 64 blocks: the reductions are split
        ((256, 2048, 7, 7), torch.bfloat16, True, False),  # channels_last: 16 blocks of 128 channels
        ((8192, 1024), torch.float32, False, False),
    ],
)
def test_gpu_rule(shape, dtype, channels_last, expected, h100, monkeypatch):
    """One split per channel block, and the resident programs' blocks of x and dy within L2; then
    forward tiles of SINGLE_PASS_TILE_ELEMS_GPU values."""
    x = torch.empty(shape, dtype=dtype, device="meta")
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    _, geom = launch.canonical(x)
    assert _config.single_pass(geom, h100, x.element_size()) == expected
    cfg = _config.single_pass_config(geom, h100)
    assert cfg.block_r * cfg.block_c * cfg.block_s <= _config.SINGLE_PASS_TILE_ELEMS_GPU
    monkeypatch.setattr(_config, "SINGLE_PASS", False)
    assert not _config.single_pass(geom, h100, x.element_size())
    monkeypatch.setattr(_config, "SINGLE_PASS", True)  # forced: wherever one split per block is all
    one_split = _config.launch_config(geom, h100).num_splits == 1
    assert _config.single_pass(geom, h100, x.element_size()) == one_split


@pytest.mark.skipif(torch.cuda.is_available(), reason="the interpreter's default")
def test_interpreter_takes_the_split_path_unless_asked(device, monkeypatch):
    """The suite's default: the split path, which most inputs take on a GPU."""
    x = make((4, 8, 6), torch.float32, device, seed=71)
    assert not single_pass(x)
    monkeypatch.setattr(_config, "SINGLE_PASS", True)
    assert single_pass(x)


def test_traced_graphs_keep_the_split_path(device, monkeypatch):
    """Under a dispatch mode (tracing), the ops are the split path's four, even where eager takes one pass."""
    monkeypatch.setattr(_config, "SINGLE_PASS", True)
    from torch.utils._python_dispatch import TorchDispatchMode

    class Record(TorchDispatchMode):
        ops: list = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops.append(str(func.overloadpacket))
            return func(*args, **(kwargs or {}))

    x = make((4, 8, 6), torch.float32, device, seed=70).requires_grad_()
    assert single_pass(x)
    with Record() as rec:
        bn_triton.batch_norm(x, None, None, training=True).sum().backward()
    assert [o for o in rec.ops if o.startswith("bn_triton.")] == [
        "bn_triton.stats",
        "bn_triton.normalize",
        "bn_triton.grad_sums",
        "bn_triton.grad_input",
    ]
    np.testing.assert_equal(x.grad.shape, x.shape)
