"""CUDA only: what only a real GPU shows. Skipped without CUDA; bench/gpu_check.sh runs them.

* Inputs past 2**31 elements, in both layouts (a contiguous (1, 3, 2**30) bf16
  training forward crashed with an illegal memory access, its channel offset computed in int32):
  training forward, running stats, backward and eval forward, checked against a float64 reference
  computed chunk by chunk (per-channel sums on the GPU, never a float64 copy of the whole tensor),
  then y and dx spot-checked on slices: the first and last elements of every channel and the
  elements around flat offset 2**31.
* float64 on the GPU: running stats and dx to 1e-12, which fp32 scalars (1/m,
  momentum, eps, m/(m-1)) passed to a float64 kernel cannot reach.
* Launch counts from the profiler: a training forward with running stats is at
  most 2 kernels, a backward at most 2, an eval forward 1, and every kernel on the path is ours (no
  torch fill, copy or elementwise kernel) when the input is contiguous or channels_last.

The large tests hold up to ~26 GB of GPU memory each; a file lock runs them one at a time when
pytest-xdist workers share the GPU.
"""

import contextlib
import fcntl
import importlib
import os
import pkgutil
import sys
import tempfile

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import bn_triton
from bn_triton import reference
from tests.helpers import TOL, make, np64

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

EPS = 1e-5
MOMENTUM = 0.1
CHUNK = 2**26  # elements per reference block: 512 MiB in float64
SPOT = 4096  # elements per spot-checked slice
BOUNDARY = 2**31  # the flat offset int32 cannot hold


# ---------------------------------------------------------------------------------------------
# Inputs past 2**31 elements


@contextlib.contextmanager
def _one_large_test_at_a_time():
    path = os.path.join(tempfile.gettempdir(), "bn_triton_gpu_large.lock")
    with open(path, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            torch.cuda.empty_cache()
            yield
        finally:
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            fcntl.flock(f, fcntl.LOCK_UN)


def _sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def _rows(t: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """A view of t as (N, C, S) (spatial-contiguous) or (R, C) (channels-contiguous): never a copy."""
    c = t.shape[1]
    if t.dim() == 2:
        return t.view(-1, c), True
    if t.is_contiguous():
        return t.view(t.shape[0], c, -1), False
    return t.permute(0, *range(2, t.dim()), 1).view(-1, c), True  # channels_last(_3d)


@torch.no_grad()
def _channel_sums(fn, *tensors) -> torch.Tensor:
    """Per-channel float64 sums of fn(*blocks, c) over tensors of one shape and layout, a block at a
    time. c indexes per-channel vectors: an int (spatial-contiguous blocks are one channel's) or a
    slice over all channels (channels-contiguous blocks are (rows, C))."""
    views = [_rows(t) for t in tensors]
    v0, rowwise = views[0]
    out = torch.zeros(v0.shape[1], dtype=torch.float64, device=v0.device)
    if rowwise:
        step = max(1, CHUNK // v0.shape[1])
        for r0 in range(0, v0.shape[0], step):
            out += fn(*(v[r0 : r0 + step].double() for v, _ in views), slice(None)).sum(0)
    else:
        n, c, s = v0.shape
        for i in range(n):
            for j in range(c):
                for s0 in range(0, s, CHUNK):
                    out[j] += fn(*(v[i, j, s0 : s0 + CHUNK].double() for v, _ in views), j).sum()
    return out


def _spots(t: torch.Tensor) -> list:
    """Index tuples into _rows(t) for the slices to check, and the channel index of each."""
    v, rowwise = _rows(t)
    if rowwise:
        r = v.shape[0]
        b = BOUNDARY // v.shape[1]  # the row holding flat offset BOUNDARY
        rows = [slice(0, SPOT), slice(r - SPOT, r), slice(max(b - SPOT // 2, 0), min(b + SPOT // 2, r))]
        return [((rs,), slice(None)) for rs in rows]
    n, c, s = v.shape
    out = []
    for j in range(c):
        out += [((0, j, slice(0, SPOT)), j), ((n - 1, j, slice(s - SPOT, s)), j)]
    i, rest = divmod(BOUNDARY, c * s)  # the channel holding flat offset BOUNDARY
    j, k = divmod(rest, s)
    out.append(((i, j, slice(max(k - SPOT // 2, 0), min(k + SPOT // 2, s))), j))
    return out


@torch.no_grad()
def _check_spots(name, actual, expected_fn, t_for_layout, *inputs):
    """Compare actual on every spot with expected_fn(*float64 input blocks, c) at bf16 tolerance."""
    tol = TOL[torch.bfloat16]
    views = [_rows(t)[0] for t in (actual, *inputs)]
    for idx, c in _spots(t_for_layout):
        got = views[0][idx].double()
        want = expected_fn(*(v[idx].double() for v in views[1:]), c)
        torch.testing.assert_close(got, want, **tol, msg=lambda m, idx=idx: f"{name} at {idx}: {m}")


def _make_large(shape, memory_format, device):
    """bf16 x (channel c offset by c, scale 2) and dy (correlated with x, mean 0.25: large, well
    conditioned dweight/dbias sums), made in place in bf16: no float32 temporaries of this size."""
    gen = torch.Generator(device=device).manual_seed(0)
    c = shape[1]
    offsets = torch.arange(c, device=device, dtype=torch.bfloat16).view(1, c, *([1] * (len(shape) - 2)))
    x = torch.randn(shape, device=device, dtype=torch.bfloat16, generator=gen)
    dy = torch.randn(shape, device=device, dtype=torch.bfloat16, generator=gen)
    if memory_format is not None:
        x = x.contiguous(memory_format=memory_format)  # a copy, then the original is freed
        dy = dy.contiguous(memory_format=memory_format)
    x.mul_(2).add_(offsets)
    dy.mul_(0.5).add_(x, alpha=0.25).add_(0.25)
    return x, dy


LARGE = {
    # int32 channel offsets crashed here: contiguous, (C - 1) * spatial = 2**31
    "ncl_contiguous_3x2^30": ((1, 3, 2**30), None),
    # channels_last past 2**31 elements: row offsets r * C pass 2**31
    "nchw_channels_last_33x64x1024x1024": ((33, 64, 1024, 1024), torch.channels_last),
    # 2-D (N, C): channel-contiguous rows, 2**31 + 192 elements
    "nc_2d_2^25+3x64": ((2**25 + 3, 64), None),
}


@needs_cuda
@pytest.mark.parametrize("case", list(LARGE))
def test_past_2_31_elements_matches_float64(case):
    shape, memory_format = LARGE[case]
    numel = int(np.prod(shape))
    assert numel > 2**31
    need = 4.2 * numel * 2  # x, y, dy, dx in bf16, and slack
    with _one_large_test_at_a_time():
        free, _ = torch.cuda.mem_get_info()
        if free < need:
            pytest.skip(f"needs {need / 2**30:.0f} GiB of free GPU memory, {free / 2**30:.0f} GiB free")
        _check_large(shape, memory_format, "cuda")


@pytest.mark.parametrize("case", ["ncl_contiguous", "nchw_channels_last", "nc_2d"])
def test_large_input_check_in_miniature(case, device, monkeypatch):
    """The same check on small inputs (blocks, spots and the 'boundary' scaled down), on any device:
    it proves the chunked reference and the spot indexing, so a GPU failure above is the kernels'."""
    shape, memory_format = {
        "ncl_contiguous": ((2, 3, 100), None),
        "nchw_channels_last": ((3, 4, 5, 7), torch.channels_last),
        "nc_2d": ((101, 6), None),
    }[case]
    mod = sys.modules[__name__]
    monkeypatch.setattr(mod, "CHUNK", 64)
    monkeypatch.setattr(mod, "SPOT", 16)
    monkeypatch.setattr(mod, "BOUNDARY", int(np.prod(shape)) * 2 // 3)
    _check_large(shape, memory_format, device)


def _check_large(shape, memory_format, device):
    numel = int(np.prod(shape))
    x, dy = _make_large(shape, memory_format, device)
    c = shape[1]
    m = numel // c
    gen = torch.Generator().manual_seed(1)
    w = (torch.rand(c, generator=gen, dtype=torch.float64) + 0.5).float().to(device)
    b = torch.randn(c, generator=gen, dtype=torch.float64).float().to(device)
    rm = torch.randn(c, generator=gen, dtype=torch.float64).float().to(device)
    rv = (torch.rand(c, generator=gen, dtype=torch.float64) + 0.5).float().to(device)
    rm0, rv0 = rm.double(), rv.double()

    # float64 reference statistics, chunk by chunk
    mean = _channel_sums(lambda xb, i: xb, x) / m
    var = _channel_sums(lambda xb, i: (xb - mean[i]) ** 2, x) / m
    rstd = (var + EPS).rsqrt()
    w64, b64 = w.double(), b.double()
    sum_dy = _channel_sums(lambda g, i: g, dy)
    sum_dy_xhat = _channel_sums(lambda g, xb, i: g * (xb - mean[i]) * rstd[i], dy, x)

    x.requires_grad_(True)
    wp, bp = w.clone().requires_grad_(True), b.clone().requires_grad_(True)
    y = bn_triton.batch_norm(x, rm, rv, wp, bp, training=True, momentum=MOMENTUM, eps=EPS)
    _sync(device)  # an illegal address shows here
    assert y.shape == x.shape and y.dtype == torch.bfloat16 and y.stride() == x.stride()
    _check_spots("y", y, lambda xb, i: (xb - mean[i]) * rstd[i] * w64[i] + b64[i], x, x.detach())
    torch.testing.assert_close(rm.double(), (1 - MOMENTUM) * rm0 + MOMENTUM * mean, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(rv.double(), (1 - MOMENTUM) * rv0 + MOMENTUM * var * m / (m - 1), atol=1e-5, rtol=1e-5)

    y.backward(dy)
    _sync(device)
    del y
    dx = x.grad
    assert dx.stride() == x.stride()
    # sums over up to ~1e9 values from fp32 partials: rtol 1e-4 of sums of order 1e8-1e9 (dy is
    # correlated with x and has a mean, so neither sum is a small difference of large terms)
    torch.testing.assert_close(bp.grad.double(), sum_dy, atol=0, rtol=1e-4)
    torch.testing.assert_close(wp.grad.double(), sum_dy_xhat, atol=0, rtol=1e-4)

    def dx_ref(g, xb, i):
        xhat = (xb - mean[i]) * rstd[i]
        return w64[i] * rstd[i] * (g - sum_dy[i] / m - xhat * sum_dy_xhat[i] / m)

    _check_spots("dx", dx, dx_ref, x, dy, x.detach())
    del dx
    x.grad = None

    with torch.no_grad():
        ye = bn_triton.batch_norm(x, rm, rv, w, b, training=False, eps=EPS)
    _sync(device)
    rm64, rs64 = rm.double(), (rv.double() + EPS).rsqrt()
    _check_spots("eval y", ye, lambda xb, i: (xb - rm64[i]) * rs64[i] * w64[i] + b64[i], x, x.detach())


# ---------------------------------------------------------------------------------------------
# float64 precision


@needs_cuda
def test_float64_running_stats_and_dx_to_1e_12():
    """Momentum 0.1 on running_mean = 1000: torch's error is 0, fp32 scalars give ~2e-5. dx and y
    against the NumPy float64 reference to 1e-12 relative; inputs far from 0 (mean 3, scale 2)."""
    shape, c = (8, 4, 5, 7), 4
    x = make(shape, torch.float64, "cuda", offset=3.0, scale=2.0, seed=0).requires_grad_(True)
    dy = make(shape, torch.float64, "cuda", seed=1)
    gen = torch.Generator().manual_seed(2)
    w = (torch.rand(c, generator=gen, dtype=torch.float64) + 0.5).cuda().requires_grad_(True)
    b = torch.randn(c, generator=gen, dtype=torch.float64).cuda().requires_grad_(True)
    rm = torch.full((c,), 1000.0, dtype=torch.float64, device="cuda")
    rv = torch.full((c,), 3.0, dtype=torch.float64, device="cuda")
    rm_t, rv_t = rm.clone(), rv.clone()

    y = bn_triton.batch_norm(x, rm, rv, w, b, training=True, momentum=MOMENTUM, eps=EPS)
    F.batch_norm(x.detach(), rm_t, rv_t, w.detach(), b.detach(), True, MOMENTUM, EPS)
    assert (rm - rm_t).abs().max().item() < 1e-12, f"running_mean off by {(rm - rm_t).abs().max().item():.3g}"
    assert (rv - rv_t).abs().max().item() < 1e-12, f"running_var off by {(rv - rv_t).abs().max().item():.3g}"

    y_ref, _, _ = reference.forward(np64(x), np64(w), np64(b), eps=EPS)
    y.backward(dy)
    dx_ref, dw_ref, db_ref = reference.backward(np64(dy), np64(x), np64(w), eps=EPS)
    for name, got, want in (
        ("y", y, y_ref),
        ("dx", x.grad, dx_ref),
        ("dweight", w.grad, dw_ref),
        ("dbias", b.grad, db_ref),
    ):
        rel = np.abs(np64(got) - want).max() / np.abs(want).max()
        assert rel < 1e-12, f"{name}: relative error {rel:.3g}"


# ---------------------------------------------------------------------------------------------
# Launch counts, from the profiler


def _our_kernel_names() -> set:
    """Function names of every Triton kernel in bn_triton.kernels (its submodules included),
    unwrapping autotune/heuristics wrappers: the names the profiler shows for our launches."""
    from triton.runtime.jit import JITFunction

    pkg = importlib.import_module("bn_triton.kernels")
    mods = [pkg] + [importlib.import_module(f"{pkg.__name__}.{m.name}") for m in pkgutil.iter_modules(pkg.__path__)]
    names = set()
    for mod in mods:
        for obj in vars(mod).values():
            k = obj
            for _ in range(5):
                if isinstance(k, JITFunction) or not hasattr(k, "fn"):
                    break
                k = k.fn
            if isinstance(k, JITFunction):
                names.add(k.fn.__name__)
    assert names, "found no Triton kernels in bn_triton.kernels"
    return names


def _cuda_kernels(fn) -> list:
    """Names of the GPU activities (kernels, memsets, memcpys) that fn enqueues."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return [e.name for e in prof.events() if e.device_type == DeviceType.CUDA]


LAUNCH_CASES = {
    "nchw_fp32": ((8, 16, 14, 14), torch.float32, "contiguous"),
    "channels_last_bf16": ((8, 32, 14, 14), torch.bfloat16, "channels_last"),
    "nc_fp32": ((64, 32), torch.float32, "contiguous"),
    "ncl_fp16": ((4, 16, 50), torch.float16, "contiguous"),
}


@needs_cuda
@pytest.mark.parametrize("case", list(LAUNCH_CASES))
def test_launch_counts_from_the_profiler(case):
    shape, dtype, layout = LAUNCH_CASES[case]
    c = shape[1]
    ours = _our_kernel_names()
    x = make(shape, dtype, "cuda", layout, offset=1.0, seed=0).requires_grad_(True)
    dy = make(shape, dtype, "cuda", layout, seed=1)
    w = torch.rand(c, device="cuda").add_(0.5).requires_grad_(True)
    b = torch.randn(c, device="cuda").requires_grad_(True)
    rm, rv = torch.zeros(c, device="cuda"), torch.ones(c, device="cuda")
    state = {}

    def train_fwd():
        state["y"] = bn_triton.batch_norm(x, rm, rv, w, b, training=True, momentum=MOMENTUM, eps=EPS)

    def bwd():
        state["y"].backward(dy)

    def eval_fwd():
        with torch.no_grad():
            bn_triton.batch_norm(x, rm, rv, w, b, training=False, eps=EPS)

    for _ in range(2):  # compile and warm every kernel first
        train_fwd()
        bwd()
        eval_fwd()
        x.grad = w.grad = b.grad = None
    torch.cuda.synchronize()

    seen = {}
    for name, fn, limit in (("training forward", train_fwd, 2), ("backward", bwd, 2), ("eval forward", eval_fwd, 1)):
        kernels = _cuda_kernels(fn)
        seen[name] = kernels
        foreign = [k for k in kernels if k not in ours]
        assert not foreign, f"{case} {name}: torch kernels on the path: {foreign} (all: {kernels})"
        assert 1 <= len(kernels) <= limit, f"{case} {name}: {len(kernels)} launches (at most {limit}): {kernels}"
    x.grad = w.grad = b.grad = None
