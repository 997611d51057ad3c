"""The eager route's plans (bn_triton/eager.py, functional.py): the host work per call, counted with
the kernels stubbed (bench/counts.py); the plan cache's bounds and threads; tickets per stream; and
no kernel specialization per batch size.

Targets per call (Python calls, tensor allocations with float32 parameters), on NCHW,
channels_last and 2-D inputs, with and without the fused epilogue: training forward <= 25 and <= 3
(y and one workspace), eval forward <= 12 and 1, forward + backward <= 50 and <= 7, a module's
forward + backward <= 60. An empty autograd.Function with three inputs makes 8 calls forward and
about 35 forward + backward in the same harness (bench/overhead.py --stub prints both).
"""

import contextlib
import threading

import pytest
import torch

import bn_triton
from bench import counts, stub
from bn_triton import _config, functional, launch
from tests.helpers import make

LIMITS = dict(train=(25, 3), eval=(12, 1), fwd_bwd=(50, 7), module=(60, 7))
INPUTS = {
    "NCHW": lambda: make((16, 32, 7, 7), torch.float32, "cpu", seed=0),
    "channels_last": lambda: make((16, 32, 7, 7), torch.float32, "cpu", "channels_last", seed=0),
    "2-D": lambda: make((16, 32), torch.float32, "cpu", seed=0),
}
ACTIVATIONS = ["relu", "relu6", "leaky_relu(0.2)", "elu(0.5)", "silu", "hardswish", "gelu", "gelu_tanh", "mish"]
FUSED = {
    "plain": {},
    "relu": dict(activation="relu"),
    "residual+relu": dict(activation="relu", residual=True),
    "silu": dict(activation="silu"),
    "residual+leaky_relu": dict(activation="leaky_relu(0.1)", residual=True),
}


def _calls(layout: str, fused: dict) -> dict:
    """The four counted calls for one input, with their grad mode."""
    x = INPUTS[layout]().requires_grad_()
    C = x.shape[1]
    w, b = torch.randn(C, requires_grad=True), torch.randn(C, requires_grad=True)
    rm, rv = torch.zeros(C), torch.ones(C)
    r = torch.randn_like(x).requires_grad_() if fused.get("residual") else None
    kw = dict(activation=fused.get("activation"), residual=r)
    wrt = (x, w, b) if r is None else (x, w, b, r)
    dy = torch.randn_like(x)
    fwd = lambda training: bn_triton.batch_norm(x, rm, rv, w, b, training, **kw)
    m = (bn_triton.BatchNorm2d if x.dim() == 4 else bn_triton.BatchNorm1d)(C, activation=kw["activation"])
    mwrt = (x, m.weight, m.bias) if r is None else (x, m.weight, m.bias, r)
    return dict(
        train=(lambda: fwd(True), True),
        eval=(lambda: fwd(False), False),
        fwd_bwd=(lambda: torch.autograd.grad(fwd(True), wrt, dy), True),
        module=(lambda: torch.autograd.grad(m(x, residual=r), mwrt, dy), True),
    )


@pytest.mark.parametrize("fused", FUSED.values(), ids=FUSED.keys())
@pytest.mark.parametrize("layout", INPUTS)
@pytest.mark.parametrize("path", ["split", "single_pass"])
def test_python_calls_and_allocations_per_call(layout, fused, path, monkeypatch):
    monkeypatch.setattr(_config, "SINGLE_PASS", path == "single_pass")
    with stub.stubbed_kernels():
        for name, (fn, grad) in _calls(layout, fused).items():
            with torch.set_grad_enabled(grad):
                fn()  # the first call of the signature plans it
                calls, allocs = counts.python_calls(fn), counts.allocations(fn)
            max_calls, max_allocs = LIMITS[name]
            assert calls <= max_calls, f"{name}: {calls} Python calls (at most {max_calls})"
            if not fused:  # the common path; a residual's backward also writes d(residual)
                assert allocs <= max_allocs, f"{name}: {allocs} allocations (at most {max_allocs})"


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("residual", [False, True], ids=["", "residual"])
def test_every_activation_within_the_budgets(activation, residual):
    """Each activation is data in one table: its calls, on NCHW, count as the others' do."""
    with stub.stubbed_kernels():
        for name, (fn, grad) in _calls("NCHW", dict(activation=activation, residual=residual)).items():
            with torch.set_grad_enabled(grad):
                fn()
                calls = counts.python_calls(fn)
            assert calls <= LIMITS[name][0], f"{name}: {calls} Python calls (at most {LIMITS[name][0]})"


def test_the_count_of_an_empty_function_is_what_the_docstring_says():
    """Guard for the harness: the empty Function's own counts (the floor the limits are set against)."""
    x, w = torch.randn(4, 3, requires_grad=True), torch.randn(3, requires_grad=True)
    dy = torch.randn(4, 3)
    assert counts.python_calls(lambda: counts.EmptyFunction.apply(x, w, w)) == 8
    assert 30 <= counts.python_calls(lambda: torch.autograd.grad(counts.EmptyFunction.apply(x, w, w), (x, w), dy)) <= 40


# ---------------------------------------------------------------- the cache
def test_the_plan_cache_is_bounded(monkeypatch):
    """A model whose batch size changes every step: plans are built for each size, and the oldest
    dropped, never more than PLANS_MAX of them (each launch builder is bounded the same way)."""
    monkeypatch.setattr(functional, "PLANS_MAX", 8)
    with stub.stubbed_kernels():
        for n in range(2, 40):
            bn_triton.batch_norm(torch.randn(n, 3), torch.zeros(3), torch.ones(3), training=True)
            assert len(functional._PLANS) <= 8
    assert launch.stats.cache_info().maxsize == launch.PLANS_PER_KIND


def test_a_plan_is_reused_and_gives_the_same_results(device):
    x = make((4, 3, 5), torch.float32, device, seed=1)
    rm, rv = torch.zeros(3, device=device), torch.ones(3, device=device)
    y1 = bn_triton.batch_norm(x, rm.clone(), rv.clone(), training=True)
    n = len(functional._PLANS)
    y2 = bn_triton.batch_norm(x, rm.clone(), rv.clone(), training=True)
    assert len(functional._PLANS) == n, "the second call of a signature plans nothing new"
    torch.testing.assert_close(y1, y2, atol=0, rtol=0)


def test_threads_calling_at_once_get_their_own_results(device):
    """nn.DataParallel runs its replicas in threads: plans built and used by several threads at once.
    On CPU the kernels are stubbed (Triton's interpreter keeps one launch's state globally, so it
    runs one launch at a time): the plans and their outputs' shapes are what is checked there."""
    shapes = [(4, 3, 5), (6, 3, 5), (4, 5), (3, 3, 2, 2)] * 2
    xs = [make(s, torch.float32, device, seed=i) for i, s in enumerate(shapes)]
    expected = [bn_triton.batch_norm(x, None, None, training=True) for x in xs]
    results, errors = {}, []

    def work(i):
        try:
            for _ in range(20):
                results[i] = bn_triton.batch_norm(xs[i], None, None, training=True)
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    with stub.stubbed_kernels() if device == "cpu" else contextlib.nullcontext():
        threads = [threading.Thread(target=work, args=(i,)) for i in range(len(xs))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert not errors, errors
    for i, y in enumerate(expected):
        if device == "cpu":
            assert results[i].shape == y.shape and results[i].stride() == y.stride()
        else:
            torch.testing.assert_close(results[i], y, atol=0, rtol=0)


def test_kernels_specialize_on_a_few_batch_sizes_not_on_each(h100):
    """As on an H100, for 300 batch sizes: the launches differ in their constexprs (tile choices) and
    in the divisibility of their ints only, a handful of compiled kernels per kernel (Triton's own
    specialization, computed here by its binder for sm_90), never one per size."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    backend = make_backend(GPUTarget("cuda", 90, 32))
    f32, i32 = torch.float32, torch.int32
    d = launch.dtypes
    builds = (
        (launch.stats, d(X=f32, PART=f32, COUNTER=i32, MEAN=f32, RSTD=f32, RUNNING_MEAN=f32, RUNNING_VAR=f32),
         (1e-5, launch.RunningSpec(1, 1))),
        (launch.normalize, d(X=f32, Y=f32, MEAN=f32, SCALE=f32, W=f32, B=f32), (1e-5, False, None)),
        (
            launch.grad_sums,
            d(DY=f32, X=f32, MEAN=f32, SCALE=f32, PART=f32, COUNTER=i32, SUM_DY=f32, SUM_DY_XHAT=f32, DW=f32,
              DB=f32, W=f32),
            (1e-5, False, None, False),
        ),
        (launch.grad_input, d(DY=f32, X=f32, DX=f32, MEAN=f32, SCALE=f32, W=f32, SUM_DY=f32, SUM_DY_XHAT=f32),
         (1e-5, True, 0, None, False)),
    )  # fmt: skip
    keys: dict = {}
    for n in range(1, 301):
        _, geom = launch.canonical(torch.empty((n, 64, 14, 14), device="meta"))
        for build, types, rest in builds:
            ln = build(geom, h100, types, *rest)
            given = {name: torch.empty(16, dtype=t, device="meta") for name, t in types}
            pointers = ln.order({**ln.absent, **given})
            fn = _jit(ln.fn)
            binder = create_function_from_signature(fn.signature, fn.params, backend)
            _, spec, _ = binder(*pointers, *ln.tail, **ln.options)
            keys.setdefault(ln.name, set()).add(str(spec))
    assert all(len(k) <= 24 for k in keys.values()), {name: len(k) for name, k in keys.items()}


def _jit(kernel):
    """The JITFunction a GPU would compile for ``kernel`` (under the interpreter: from its function
    and decorator options)."""
    from triton.runtime.jit import JITFunction

    if isinstance(kernel, JITFunction):
        return kernel
    return JITFunction(kernel.fn, **kernel.kwargs)


# ---------------------------------------------------------------- tickets
def test_tickets_are_per_stream_and_fresh_inside_a_graph_capture(monkeypatch):
    """Two streams never share the tickets of their reductions; a CUDA-graph capture gets tickets of
    its own, zeroed in the graph. Checked with stand-ins for torch's current-stream queries."""
    stream = [1]
    capturing = [False]
    monkeypatch.setattr(torch._C, "_cuda_getCurrentRawStream", lambda index: stream[0], raising=False)
    monkeypatch.setattr(torch._C, "_cuda_isCurrentStreamCapturing", lambda: capturing[0])
    zeros = torch.zeros
    monkeypatch.setattr(torch, "zeros", lambda n, dtype, device: zeros(n, dtype=dtype))  # no CUDA here
    monkeypatch.setattr(launch, "_TICKETS", {})
    cuda = torch.device("cuda", 0)
    a = launch.tickets(cuda, 10)
    assert launch.tickets(cuda, 10) is a, "one buffer per stream, reused"
    stream[0] = 2
    b = launch.tickets(cuda, 10)
    assert b is not a and launch.tickets(cuda, 10) is b
    capturing[0] = True
    c, d = launch.tickets(cuda, 3), launch.tickets(cuda, 3)
    assert c is not d and all(c is not t and d is not t for t in launch._TICKETS.values())
    assert int(c.count_nonzero()) == int(d.count_nonzero()) == 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="two CUDA streams need a GPU")
def test_two_streams_at_once_give_the_serial_results():
    """Reductions on two streams at the same time: each stream has its own tickets, so neither
    merge sees the other's arrivals. Bitwise the results of the same calls one after another."""
    torch.manual_seed(0)
    xs = [torch.randn(64, 256, 28, 28, device="cuda") * (i + 1) for i in range(2)]
    dys = [torch.randn_like(x) for x in xs]

    def step(x, dy):
        xg = x.clone().requires_grad_()
        y = bn_triton.batch_norm(xg, None, None, training=True)
        y.backward(dy)
        return y, xg.grad

    serial = [step(x, dy) for x, dy in zip(xs, dys, strict=True)]
    streams = [torch.cuda.Stream() for _ in xs]
    torch.cuda.synchronize()
    out = [None, None]
    for _ in range(10):  # several rounds, so that the two streams' launches overlap
        for i, (s, x, dy) in enumerate(zip(streams, xs, dys, strict=True)):
            with torch.cuda.stream(s):
                out[i] = step(x, dy)
    torch.cuda.synchronize()
    for (y, dx), (y_s, dx_s) in zip(out, serial, strict=True):
        torch.testing.assert_close(y, y_s, atol=0, rtol=0)
        torch.testing.assert_close(dx, dx_s, atol=0, rtol=0)


# ---------------------------------------------------------------- what a plan's key holds
class _Subclass(torch.Tensor):
    """A tensor subclass that adds nothing: its values are a plain tensor's."""


def _misaligned(t: torch.Tensor) -> torch.Tensor:
    """t's values in t's strides, starting 4 bytes past a 16-byte boundary (storage offset 1)."""
    base = torch.empty(t.numel() + 1, dtype=t.dtype, device=t.device)[1:]
    return base.as_strided(t.shape, t.stride()).copy_(t).requires_grad_(t.requires_grad)


def _transposed(t: torch.Tensor) -> torch.Tensor:
    """t's values, in other strides than its own (the same shape)."""
    if t.dim() < 2:
        return torch.empty(2 * t.numel(), dtype=t.dtype, device=t.device)[::2].copy_(t).requires_grad_(t.requires_grad)
    return t.detach().transpose(0, -1).contiguous().transpose(0, -1).requires_grad_(t.requires_grad)


# One change of each attribute a tensor argument has: a call with it must do what it does on a
# fresh process, whatever was planned before.
ATTRIBUTES = {
    "shape_fewer_rows_same_strides": lambda t: t.detach()[:1].requires_grad_(t.requires_grad) if t.dim() > 1 else None,
    "shape_other": lambda t: t.detach()[:-1].requires_grad_(t.requires_grad),
    "strides": _transposed,
    "dtype": lambda t: t.detach().double().requires_grad_(t.requires_grad),
    "device": lambda t: torch.empty_like(t, device="meta").requires_grad_(t.requires_grad),
    "storage_offset_alignment": _misaligned,
    "requires_grad": lambda t: t.detach().clone().requires_grad_(not t.requires_grad),
    "layout": lambda t: t.detach().to_sparse(),
    "subclass": lambda t: t.detach().as_subclass(_Subclass).requires_grad_(t.requires_grad),
    "negative_bit": lambda t: torch._neg_view(t.detach().neg()).requires_grad_(t.requires_grad),
}
ARGUMENTS = ("input", "running_mean", "running_var", "weight", "bias", "residual")


def _call_args(device) -> dict:
    """A planned call's arguments, fresh tensors each time (the same values)."""
    g = torch.Generator().manual_seed(7)
    x = torch.randn(4, 3, 5, generator=g).to(device).requires_grad_()
    w, b = (torch.randn(3, generator=g).to(device).requires_grad_() for _ in range(2))
    rm, rv = torch.randn(3, generator=g).to(device), torch.rand(3, generator=g).to(device) + 0.5
    r = torch.randn(4, 3, 5, generator=g).to(device).requires_grad_()
    return dict(input=x, running_mean=rm, running_var=rv, weight=w, bias=b, residual=r)


def _outcome(args: dict, training: bool, activation) -> tuple:
    """(output, running statistics, gradients) of one call and its backward, or the exception's type."""
    try:
        y = bn_triton.batch_norm(**args, training=training, activation=activation)
        wrt = [t for t in args.values() if t.requires_grad]
        grads = torch.autograd.grad(y, wrt, torch.ones_like(y)) if wrt and y.requires_grad else ()
    except Exception as e:  # noqa: BLE001 - the outcome is the exception's type
        return type(e)
    values = (y, args["running_mean"], args["running_var"], *grads)
    return tuple(v.detach().to_dense() if v.layout != torch.strided else v.detach() for v in values)


def _same_outcome(got, want, what: str) -> None:
    if isinstance(want, type) or isinstance(got, type):
        assert got is want, f"{what}: {got} after a planned call, {want} on a fresh one"
        return
    assert len(got) == len(want), what
    for g, w in zip(got, want, strict=True):
        if w.device.type == "meta":
            assert g.device.type == "meta" and g.shape == w.shape and g.dtype == w.dtype, what
        else:
            torch.testing.assert_close(g, w, atol=0, rtol=0, equal_nan=True, msg=lambda m: f"{what}: {m}")


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("name", ARGUMENTS)
def test_a_plan_never_serves_a_call_it_does_not_fit(name, training, device):
    """Every attribute of every tensor argument, changed after a planned call: the call does exactly
    what it does when nothing was planned (its result, or its error), never what the plan did."""
    for attribute, change in ATTRIBUTES.items():
        args = _call_args(device)
        changed = change(args[name])
        if changed is None:
            continue

        def run(replace=True, change=change):
            a = _call_args(device)
            if replace:
                a[name] = change(a[name])
            return _outcome(a, training, "relu")

        launch.clear_plans()
        fresh = run()
        launch.clear_plans()
        run(replace=False), run(replace=False)  # planned, and served by the plan
        _same_outcome(run(), fresh, f"{name}: {attribute}")


def test_a_plan_never_serves_another_counter(device):
    """A module's num_batches_tracked in another dtype or on another device, after a planned call: the
    call does what it does when nothing was planned."""
    changes = {
        "dtype": lambda t: t.double(),
        "device": lambda t: torch.empty_like(t, device="meta"),
        "shape": lambda t: t.view(1),
        "subclass": lambda t: t.as_subclass(_Subclass),
    }
    x = make((4, 3, 5), torch.float32, device, seed=8)

    def run(change):
        m = bn_triton.BatchNorm1d(3, momentum=None).to(device)
        if change is not None:
            m.num_batches_tracked = change(m.num_batches_tracked.detach().clone())
        try:
            m(x), m(x)
        except Exception as e:  # noqa: BLE001
            return type(e)
        return (m.running_mean.detach(), m.running_var.detach(), m.num_batches_tracked.detach())

    for attribute, change in changes.items():
        launch.clear_plans()
        fresh = run(change)
        launch.clear_plans()
        run(None)
        _same_outcome(run(change), fresh, f"num_batches_tracked: {attribute}")
