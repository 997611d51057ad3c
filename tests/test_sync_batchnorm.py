"""SyncBatchNorm: several ranks must give what one BatchNorm gives over the concatenated batch.

Multi-process tests spawn 2 or 3 ranks with gloo (torch.multiprocessing, a ``file://`` store, a short
timeout); each rank builds the same global batch from a seed, runs its own slice through
SyncBatchNorm and checks its slice of the float64 reference (``bn_triton.reference``) itself, so a
failure shows up as that rank's traceback. Process start and imports cost seconds per spawn, so each
spawn runs many cases in a row; the interpreter (TRITON_INTERPRET, set by conftest.py) is inherited.
"""

import copy
import datetime
import os
import re
import tempfile

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import bn_triton
from bn_triton import reference

# A hung collective fails the test instead of the suite. Generous: on a loaded 2-core machine a
# spawned rank took 8 s to import torch, and the rendezvous waits for the slowest one.
TIMEOUT = datetime.timedelta(seconds=60)
EPS = 1e-5


# ---------------------------------------------------------------- spawning
def _entry(rank, world, init_method, device, fn):
    dist.init_process_group("gloo", init_method=init_method, rank=rank, world_size=world, timeout=TIMEOUT)
    try:
        fn(rank, world, device)
    finally:
        dist.destroy_process_group()


def _spawn(fn, world, device="cpu"):
    with tempfile.TemporaryDirectory() as tmp:
        init_method = "file://" + os.path.join(tmp, "store")
        mp.spawn(_entry, args=(world, init_method, device, fn), nprocs=world, join=True)


# ---------------------------------------------------------------- one case, run on every rank
def _close(actual, expected, atol, rtol, what, equal_nan=False):
    torch.testing.assert_close(
        actual.detach().to("cpu", torch.float64),
        expected.detach().to("cpu", torch.float64)
        if isinstance(expected, torch.Tensor)
        else torch.as_tensor(np.asarray(expected), dtype=torch.float64),
        atol=atol,
        rtol=rtol,
        equal_nan=equal_nan,
        msg=lambda m: f"rank {dist.get_rank()}, {what}: {m}",
    )


# atol and rtol of y and dx against float64, by input dtype (fp16: rounding of the output, 2^-11
# relative on values up to ~4; fp32: accumulation; fp64 inputs accumulate, and sum, in fp64).
TOL = {torch.float16: 4e-3, torch.float32: 2e-5, torch.float64: 1e-10}


def _check_case(
    rank,
    device,
    counts,
    tail,
    layout="contiguous",
    steps=1,
    offset=0.0,
    dtype=torch.float32,
    atol=None,
    grad_atol=1e-4,
    **kwargs,
):
    """SyncBatchNorm on this rank's slice of a global batch of sum(counts) samples of shape ``tail``,
    for ``steps`` training steps, then one eval step: y, dx, summed dweight/dbias, running stats.
    Weight, bias and running statistics are float32 (the AMP case for fp16 inputs), float64 for
    float64 inputs (the per-channel tensors share the input's dtype or float32)."""
    C = tail[0]
    atol = TOL[dtype] if atol is None else atol
    rtol = TOL[dtype]
    gen = torch.Generator().manual_seed(1234)
    pdtype = torch.float64 if dtype == torch.float64 else torch.float32
    mod = bn_triton.SyncBatchNorm(C, eps=EPS, **kwargs).to(device, pdtype)
    w = b = None
    if mod.affine:  # float32 values, so that the float64 reference sees exactly the layer's weights
        w, b = torch.randn(C, generator=gen).double(), torch.randn(C, generator=gen).double()
        with torch.no_grad():
            mod.weight.copy_(w)
            mod.bias.copy_(b)
    rm, rv = np.zeros(C), np.ones(C)
    start, stop = sum(counts[:rank]), sum(counts[: rank + 1])
    for step in range(steps):
        X = (torch.randn((sum(counts), *tail), generator=gen, dtype=torch.float64) * 2 + offset).to(dtype)
        dY = torch.randn(X.shape, generator=gen, dtype=torch.float64).to(dtype)
        x = X[start:stop].to(device)
        if layout == "channels_last":
            x = x.contiguous(memory_format=torch.channels_last)
        x.requires_grad_(True)
        y = mod(x)
        y.backward(dY[start:stop].to(device))

        Xd, dYd = X.double().numpy(), dY.double().numpy()
        y_ref, mean, var = reference.forward(Xd, w, b, EPS)
        dx_ref, dw_ref, db_ref = reference.backward(dYd, Xd, w, EPS)
        what = f"{layout} {dtype} counts={counts} step {step}"
        assert y.dtype == x.grad.dtype == dtype, what
        _close(y, y_ref[start:stop], atol, rtol, f"y, {what}")
        _close(x.grad, dx_ref[start:stop], atol, rtol, f"dx, {what}")
        if layout == "channels_last" and x.numel():
            assert y.is_contiguous(memory_format=torch.channels_last), what
        if mod.affine:
            grads = torch.stack([mod.weight.grad, mod.bias.grad])
            dist.all_reduce(grads)  # weight/bias grads stay local: their sum is the global grad
            _close(grads[0], dw_ref, grad_atol, 2e-5, f"sum of dweight, {what}")
            _close(grads[1], db_ref, grad_atol, 2e-5, f"sum of dbias, {what}")
            mod.weight.grad = mod.bias.grad = None
        if mod.track_running_stats:
            momentum = 1.0 / (step + 1) if mod.momentum is None else mod.momentum
            rm, rv = reference.running_stats(rm, rv, mean, var, X.numel() // C, momentum)
            _close(mod.running_mean, rm, 1e-4, 1e-5, f"running_mean, {what}")
            _close(mod.running_var, rv, 1e-4, 1e-5, f"running_var, {what}")
            assert int(mod.num_batches_tracked) == step + 1
    if mod.track_running_stats and stop > start:  # eval: local, with the (synchronized) running stats
        mod.eval()
        x = X[start:stop].to(device)
        # The buffers (float32, checked above) are the reference's running statistics here.
        rm, rv = (t.detach().cpu().double().numpy() for t in (mod.running_mean, mod.running_var))
        _close(mod(x), reference.eval_forward(X.double().numpy()[start:stop], rm, rv, w, b, EPS), atol, rtol, "eval")


def _expect_error(fn, exc, match):
    # Not pytest.raises: its failure is a BaseException, which a spawned process reports as a bare
    # exit code without the traceback.
    try:
        fn()
    except exc as e:
        assert re.search(match, str(e)), f"rank {dist.get_rank()}: {exc.__name__}({e}) does not match {match!r}"
        return
    raise AssertionError(f"rank {dist.get_rank()}: expected {exc.__name__} matching {match!r}; nothing was raised")


def _check_bad_input(rank, world, device):
    """An invalid input on one rank (or all): every rank raises, nothing hangs, no state moves."""
    mod = bn_triton.SyncBatchNorm(3).to(device)
    good = torch.randn(2, 3, 4, device=device)
    bad_1d = torch.randn(3, device=device)
    # Rank 0 holds a 1-D input: its own error is torch's; the others are told another rank failed.
    if rank == 0:
        _expect_error(lambda: mod(bad_1d), ValueError, r"expected at least 2D input \(got 1D input\)")
    else:
        _expect_error(lambda: mod(good), RuntimeError, r"input on 1 other rank\(s\)")
    # The last rank holds the wrong number of channels.
    if rank == world - 1:
        _expect_error(lambda: mod(torch.randn(2, 4, 4, device=device)), RuntimeError, "should contain 4 elements not 3")
    else:
        _expect_error(lambda: mod(good), RuntimeError, "input on 1 other rank")
    # Every rank invalid: each raises its own error.
    _expect_error(lambda: mod(bad_1d), ValueError, "expected at least 2D input")
    assert int(mod.num_batches_tracked) == 0
    torch.testing.assert_close(mod.running_mean, torch.zeros(3, device=device))
    torch.testing.assert_close(mod.running_var, torch.ones(3, device=device))
    # The ranks are still in step: a valid call completes everywhere.
    mod(good).sum().backward()
    assert int(mod.num_batches_tracked) == 1
    # A layer copied on rank 0 only synchronizes with the originals elsewhere: a step's statistics
    # depend on nothing but that step's inputs.
    layer = copy.deepcopy(mod) if rank == 0 else mod
    layer(good).sum().backward()
    assert int(layer.num_batches_tracked) == 2


def _check_ddp_step(rank, world, device):
    """One DDP training step of a converted model equals one step over the concatenated batch."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    counts = (3, 2)
    torch.manual_seed(0)  # the same initial model on every rank
    model = torch.nn.Sequential(
        torch.nn.Conv2d(2, 3, 1, bias=False), torch.nn.BatchNorm2d(3), torch.nn.ReLU(), torch.nn.Conv2d(3, 2, 1)
    )
    ref = copy.deepcopy(model).double()  # torch's own BN in float64: the second opinion
    model = bn_triton.SyncBatchNorm.convert_sync_batchnorm(model).to(device)
    assert isinstance(model[1], bn_triton.SyncBatchNorm)
    if device == "cpu":
        # DDP refuses torch.nn.SyncBatchNorm (which ours subclasses, for isinstance checks) in CPU
        # modules because torch's cannot run on CPU; ours can (Triton's interpreter), so lift that
        # guard in this test process. On a GPU nothing is patched.
        DDP._passing_sync_batchnorm_handle = lambda self, module: None
    ddp = DDP(model, device_ids=None if device == "cpu" else [torch.device(device).index or 0])
    lr = 0.5
    opt = torch.optim.SGD(ddp.parameters(), lr=lr)
    ref_opt = torch.optim.SGD(ref.parameters(), lr=lr / world)  # DDP averages the ranks' grads

    gen = torch.Generator().manual_seed(7)
    X = torch.randn(sum(counts), 2, 3, 5, generator=gen)
    T = torch.randn(sum(counts), 2, 3, 5, generator=gen)
    start, stop = sum(counts[:rank]), sum(counts[: rank + 1])
    opt.zero_grad()
    (ddp(X[start:stop].to(device)) * T[start:stop].to(device)).sum().backward()
    opt.step()
    ref_opt.zero_grad()
    (ref(X.double()) * T.double()).sum().backward()
    ref_opt.step()
    for (name, p), q in zip(model.named_parameters(), ref.parameters(), strict=True):
        _close(p.grad * world, q.grad, 1e-4, 1e-4, f"DDP grad of {name}")
        _close(p, q, 1e-5, 1e-5, f"DDP parameter {name} after the step")
    _close(model[1].running_mean, ref[1].running_mean, 1e-5, 1e-5, "DDP running_mean")
    _close(model[1].running_var, ref[1].running_var, 1e-5, 1e-5, "DDP running_var")


def _check_fused_epilogue(rank, device):
    """activation="relu" and a residual (the plain layers' fused epilogue) on the synchronized path."""
    counts, C = (2, 1), 3
    gen = torch.Generator().manual_seed(5)
    X, R, dY = (torch.randn(sum(counts), C, 4, generator=gen) for _ in range(3))
    w, b = torch.randn(C, generator=gen), torch.randn(C, generator=gen)
    mod = bn_triton.SyncBatchNorm(C, activation="relu").to(device)
    with torch.no_grad():
        mod.weight.copy_(w)
        mod.bias.copy_(b)
    sl = slice(sum(counts[:rank]), sum(counts[: rank + 1]))
    x, r = (t[sl].to(device).requires_grad_(True) for t in (X, R))
    y = mod(x, r)
    y.backward(dY[sl].to(device))
    Xd = X.double().numpy()
    z = reference.forward(Xd, w.double().numpy(), b.double().numpy(), EPS)[0] + R.double().numpy()
    dz = dY.double().numpy() * (z > 0)
    dx_ref = reference.backward(dz, Xd, w.double().numpy(), EPS)[0]
    _close(y, np.maximum(z[sl], 0), 2e-5, 2e-5, "y with relu and residual")
    _close(x.grad, dx_ref[sl], 2e-5, 2e-5, "dx with relu and residual")
    _close(r.grad, dz[sl], 0, 0, "d residual")


def _check_compiled(rank, device):
    """torch.compile runs the synchronized part eagerly (a graph break): same numbers as eager."""
    mods = [bn_triton.SyncBatchNorm(3).to(device) for _ in range(2)]
    x = torch.randn(2 + rank, 3, 4, device=device)
    xs = [x.clone().requires_grad_(True) for _ in range(2)]
    ys = [torch.compile(mods[0], backend="aot_eager")(xs[0]), mods[1](xs[1])]
    for y in ys:
        y.backward(torch.ones_like(y))
    assert torch.equal(ys[0], ys[1]) and torch.equal(xs[0].grad, xs[1].grad)
    assert torch.equal(mods[0].running_var, mods[1].running_var)


def _world2(rank, world, device):
    # Uneven batches, momentum=None, two steps.
    _check_case(rank, device, (3, 2), (3, 5, 4), steps=2, momentum=None)
    # fp16 input with float32 weights and buffers (autocast's BatchNorm).
    _check_case(rank, device, (2, 1), (3, 7), dtype=torch.float16, grad_atol=1e-2)
    # channels_last, one sample on rank 0, data offset by 1e4: no E[x^2] cancellation in the local
    # statistics nor in the merge: running_var keeps its tight tolerance. y, dx and dweight are limited
    # by the fp32 rounding of the mean (ulp(1e4)/2 = 5e-4, times rstd = 0.5, times sum |dy| for dw),
    # as with the plain BatchNorm.
    _check_case(rank, device, (1, 2), (4, 3, 3), "channels_last", steps=2, offset=1e4, atol=2e-3, grad_atol=1e-2)
    # float64 data offset by 1e6 (std 2), both steps to 1e-9: each rank's (mean, M2) and their merge
    # keep the float64 digits at any offset. Weight grads are stored in float32.
    _check_case(
        rank,
        device,
        (1, 2),
        (4, 3, 3),
        "channels_last",
        steps=2,
        offset=1e6,
        dtype=torch.float64,
        atol=1e-9,
        grad_atol=1e-5,
    )
    _check_fused_epilogue(rank, device)
    _check_compiled(rank, device)
    _check_bad_input(rank, world, device)
    _check_ddp_step(rank, world, device)


def _world3(rank, world, device):
    # One empty rank, in the middle.
    _check_case(rank, device, (2, 0, 1), (3, 4, 5))
    # channels_last, the empty rank first, neither weights nor running statistics.
    _check_case(rank, device, (0, 2, 1), (3, 3, 3), "channels_last", affine=False, track_running_stats=False)
    # (N, C) inputs with one value per channel on two ranks: fine, the global batch has two.
    _check_case(rank, device, (1, 0, 1), (5,))
    # float64 inputs: statistics and both collectives in float64, to 1e-10.
    _check_case(rank, device, (1, 2, 0), (2, 3, 3), dtype=torch.float64, grad_atol=1e-9)
    # A global batch of one value per channel: every rank raises torch's error, nothing moves.
    mod = bn_triton.SyncBatchNorm(5).to(device)
    x = torch.randn(1 if rank == 0 else 0, 5, device=device)
    _expect_error(lambda: mod(x), ValueError, "Expected more than 1 value per channel when training")
    assert int(mod.num_batches_tracked) == 0
    # Every rank empty: empty outputs, running statistics kept, num_batches_tracked counts (torch's BN).
    x = torch.randn(0, 5, 2, device=device, requires_grad=True)
    mod(x).sum().backward()
    assert x.grad.shape == x.shape and int(mod.num_batches_tracked) == 1
    torch.testing.assert_close(mod.running_var, torch.ones(5, device=device))


# Without a GPU: CPU tensors under the interpreter. With one GPU: every rank on cuda:0 with gloo
# (CUDA tensors; NCCL would need one GPU per rank), our kernels compiled, not interpreted.
def test_two_ranks_gloo(device):
    _spawn(_world2, 2, device)


def test_three_ranks_gloo_with_an_empty_rank(device):
    _spawn(_world3, 3, device)


# ---------------------------------------------------------------- a bad batch leaves no trace
def _finite_or_nan(t):
    t = t.detach().to("cpu", torch.float64)
    return torch.where(torch.isfinite(t), t, torch.nan)


def _check_after_bad_batch(rank, device, counts, tail, spoilt, dtype=torch.float32, **kwargs):
    """Training steps whose global batch ``spoilt[step]`` changes, as (sample, channel, value) or
    None, each against torch's BatchNorm in float64 over the same global batches. A step's statistics
    come from its own batch alone, so every step after a spoilt one is exact. In a step whose global
    batch holds a non-finite value in channel c, channel c's y, dx, dweight and dbias are not compared
    (NaN in both); running statistics are, with non-finite values as NaN (torch's stay non-finite in
    that channel for good too). fp16 inputs have float32 weights and buffers (autocast's BatchNorm)."""
    C = tail[0]
    pdtype = torch.float64 if dtype == torch.float64 else torch.float32
    gen = torch.Generator().manual_seed(11)
    mod = bn_triton.SyncBatchNorm(C, eps=EPS, **kwargs).to(device, pdtype)
    ref = torch.nn.BatchNorm1d(C, eps=EPS, **kwargs).double()
    with torch.no_grad():
        mod.weight.copy_(torch.randn(C, generator=gen))
        mod.bias.copy_(torch.randn(C, generator=gen))
        ref.weight.copy_(mod.weight)
        ref.bias.copy_(mod.bias)
    start, stop = sum(counts[:rank]), sum(counts[: rank + 1])
    atol = rtol = TOL[dtype]
    grad_atol = {torch.float16: 1e-2, torch.float32: 1e-4, torch.float64: 1e-9}[dtype]
    for step, spoil in enumerate(spoilt):
        X = torch.randn((sum(counts), *tail), generator=gen, dtype=torch.float64) * 2
        if spoil is not None:
            sample, channel, value = spoil
            X[(sample, channel) + (0,) * (len(tail) - 1)] = value
        X = X.to(dtype)  # fp16: 7e4 overflows to Inf, as under autocast
        dY = torch.randn(X.shape, generator=gen, dtype=torch.float64).to(dtype)
        x = X[start:stop].to(device).requires_grad_(True)
        y = mod(x)
        y.backward(dY[start:stop].to(device))
        xr = X.double().requires_grad_(True)
        yr = ref(xr)
        yr.backward(dY.double())

        what = f"{dtype} counts={counts} step {step} after {spoilt[:step]}"
        keep = torch.isfinite(X.double()).transpose(0, 1).reshape(C, -1).all(1)
        _close(y[:, keep], yr[start:stop][:, keep], atol, rtol, f"y, {what}")
        _close(x.grad[:, keep], xr.grad[start:stop][:, keep], atol, rtol, f"dx, {what}")
        grads = torch.stack([mod.weight.grad, mod.bias.grad])
        dist.all_reduce(grads)
        _close(grads[0][keep], ref.weight.grad[keep], grad_atol, 2e-5, f"sum of dweight, {what}")
        _close(grads[1][keep], ref.bias.grad[keep], grad_atol, 2e-5, f"sum of dbias, {what}")
        mod.weight.grad = mod.bias.grad = ref.weight.grad = ref.bias.grad = None
        for name in ("running_mean", "running_var"):
            ours, theirs = (_finite_or_nan(getattr(m, name)) for m in (mod, ref))
            _close(ours, theirs, 1e-4, 1e-5, f"{name}, {what}", equal_nan=True)
        assert int(mod.num_batches_tracked) == int(ref.num_batches_tracked) == step + 1, what


def _nonfinite_batches(rank, world, device):
    counts = (3, 2) if world == 2 else (2, 0, 1)
    # An Inf in channel 1 on the first rank, then a NaN in channel 2 on the last, then clean steps.
    spoilt = [None, (0, 1, float("inf")), (-1, 2, float("nan")), None, None]
    _check_after_bad_batch(rank, device, counts, (3, 5), spoilt)
    # fp16 (autocast): a value past fp16's range (65504) is an Inf, momentum=None (cumulative).
    spoilt = [None, (0, 1, 7e4), (-1, 2, float("nan")), None]
    _check_after_bad_batch(rank, device, counts, (3, 5), spoilt, dtype=torch.float16, momentum=None)


def _outlier_batches(rank, world, device):
    counts = (3, 2) if world == 2 else (2, 0, 1)
    # One huge but finite value in channel 1. 1e20 in float64 only: in float32 its square overflows,
    # and that step's variance is Inf in the plain BatchNorm too.
    for dtype, value in ((torch.float32, 1e12), (torch.float64, 1e12), (torch.float64, 1e20)):
        _check_after_bad_batch(rank, device, counts, (3, 5), [None, (0, 1, value), None, None], dtype=dtype)


@pytest.mark.parametrize("world", [2, 3])
def test_nonfinite_batch_leaves_later_steps_exact(device, world):
    _spawn(_nonfinite_batches, world, device)


@pytest.mark.parametrize("world", [2, 3])
def test_outlier_batch_leaves_later_steps_exact(device, world):
    _spawn(_outlier_batches, world, device)


# ---------------------------------------------------------------- single process
def _pair(cls, C, **kwargs):
    gen = torch.Generator().manual_seed(3)
    a, b = cls(C, **kwargs), bn_triton.BatchNorm2d(C, **kwargs)
    if a.affine:
        with torch.no_grad():
            a.weight.copy_(torch.randn(C, generator=gen))
            a.bias.copy_(torch.randn(C, generator=gen))
            b.weight.copy_(a.weight)
            b.bias.copy_(a.bias)
    return a, b


def _same_as_plain(sync, plain, device):
    """Training steps then eval: SyncBatchNorm gives exactly what our plain BatchNorm gives."""
    sync, plain = sync.to(device), plain.to(device)
    for step in range(3):
        if step == 2:
            sync.eval()
            plain.eval()
        x = torch.randn(2, sync.num_features, 3, 5, device=device).contiguous(memory_format=torch.channels_last)
        xs, xp = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
        ys, yp = sync(xs), plain(xp)
        ys.backward(torch.ones_like(ys))
        yp.backward(torch.ones_like(yp))
        assert torch.equal(ys, yp) and torch.equal(xs.grad, xp.grad)
    for (name, t), u in zip(sync.state_dict().items(), plain.state_dict().values(), strict=True):
        assert torch.equal(t, u), name


def test_no_process_group_is_plain_batchnorm(device, torch_bn_forbidden):
    assert not dist.is_initialized()
    _same_as_plain(*_pair(bn_triton.SyncBatchNorm, 3, momentum=None), device)


def test_world_of_one_is_plain_batchnorm(device, torch_bn_forbidden, monkeypatch, tmp_path):
    if dist.is_initialized():
        pytest.skip("a process group is already initialised in this process")

    def no_collective(*args, **kwargs):
        raise AssertionError("a world of one must not run a collective")

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1, timeout=TIMEOUT)
    try:
        for name in ("all_gather", "all_reduce"):
            monkeypatch.setattr(dist, name, no_collective)
        _same_as_plain(*_pair(bn_triton.SyncBatchNorm, 4), device)
    finally:
        dist.destroy_process_group()


def test_errors_match_torch(device):
    ours, theirs = bn_triton.SyncBatchNorm(3).to(device), torch.nn.SyncBatchNorm(3).to(device)
    for bad in (torch.randn(3, device=device), torch.randn(2, 0, 4, device=device)):
        with pytest.raises(ValueError) as expected:
            theirs(bad)
        with pytest.raises(ValueError, match=re.escape(str(expected.value))):
            ours(bad)


def test_convert_sync_batchnorm_keeps_state():
    group = object()  # stands in for a process group: stored, not used outside training
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 1),
        torch.nn.BatchNorm2d(4),
        torch.nn.Sequential(torch.nn.SyncBatchNorm(4, momentum=None), bn_triton.BatchNorm1d(5, affine=False)),
        bn_triton.SyncBatchNorm(6, track_running_stats=False),
        torch.nn.BatchNorm3d(2, eps=1e-3),
    )
    for i, bn in enumerate(m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)):
        if bn.affine:
            torch.nn.init.uniform_(bn.weight)
            torch.nn.init.uniform_(bn.bias)
        if bn.track_running_stats:
            bn.running_mean.uniform_()
            bn.running_var.uniform_(1, 2)
            bn.num_batches_tracked.fill_(i + 3)
    model[2][0].eval()
    before = {k: (id(v), v.clone()) for k, v in model.state_dict(keep_vars=True).items()}
    params = {k: p for k, p in model.named_parameters()}
    old = [
        (m.eps, m.momentum, m.affine, m.track_running_stats, m.training) for m in model.modules() if hasattr(m, "eps")
    ]

    out = bn_triton.SyncBatchNorm.convert_sync_batchnorm(model, process_group=group)
    assert out is model
    converted = [m for m in out.modules() if hasattr(m, "eps")]
    assert all(type(m) is bn_triton.SyncBatchNorm and m.process_group is group for m in converted)
    assert [(m.eps, m.momentum, m.affine, m.track_running_stats, m.training) for m in converted] == old
    after = out.state_dict(keep_vars=True)
    assert list(after) == list(before)
    for k, v in after.items():
        assert id(v) == before[k][0] and torch.equal(v, before[k][1]), k
    assert all(p is params[k] for k, p in out.named_parameters())
    assert all(m.weight.device.type != "meta" for m in converted if m.affine)
    # Our layers' fused ReLU comes along (dropping it would change the model).
    fused = bn_triton.SyncBatchNorm.convert_sync_batchnorm(bn_triton.BatchNorm2d(3, activation="relu"))
    assert fused.activation == "relu"
    # A layer itself: a new SyncBatchNorm with the same tensors, as torch's convert does.
    bn = torch.nn.BatchNorm1d(3)
    new = bn_triton.SyncBatchNorm.convert_sync_batchnorm(bn)
    assert type(new) is bn_triton.SyncBatchNorm and new.weight is bn.weight and new.running_var is bn.running_var
    # Same state_dict keys as torch's SyncBatchNorm, so checkpoints load either way.
    assert list(new.state_dict()) == list(torch.nn.SyncBatchNorm(3).state_dict())
