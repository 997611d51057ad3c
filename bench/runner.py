"""Run the suite: inputs, a correctness check of every implementation, then timing.

Per case (a shape in one dtype and layout) and workload (suite.PLAIN, suite.FUSED):
 1. inputs: x with a different mean and scale per channel, dy, weight, bias, running stats (and the
    residual); none is zeros, all deterministic (seeded);
 2. a float64 reference (torch on float64 copies) of the training outputs (y, updated running stats,
    dx, dweight, dbias, and d(residual)) and of the eval output;
 3. every implementation computes the same outputs once (this also compiles and warms it up); an
    output whose error against the reference is more than twice torch eager's own error plus a small
    per-dtype floor marks that implementation wrong for the passes it feeds, and a wrong
    implementation is reported as such and never timed;
 4. each pass of each implementation: the backend that actually ran (profiler), the peak extra
    memory of one call, the wall time (``triton.testing.do_bench``: median, 20% and 80% quantiles),
    the host time (enqueue_ms) and the device time (cuda_graph_ms).
In smoke mode (CPU, Triton interpreter) steps 1-3 and the backend detection run, nothing is timed.
"""

import dataclasses
import functools
import math
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from . import impls as impls_mod
from . import traffic
from .report import CSV_COLUMNS
from .suite import PLAIN, Case, Workload

# Error floors, as a fraction of the largest reference value, for when torch's own error happens to
# be tiny: about 2^-9 of the output for bf16 (8 bits of mantissa), 2^-11 for fp16, and for fp32 the
# rounding of sums over millions of values. A wrong formula errs by O(1) of the output.
ERROR_FLOOR = {torch.float32: 1e-4, torch.float16: 5e-3, torch.bfloat16: 2e-2}
# Allowed error relative to torch eager's own error against the float64 reference (flash-attn's rule).
ERROR_RATIO = 2.0
# A ReLU input p = BN(x) + residual within RELU_BAND * eps * (|BN(x)| + |residual| + |mean * scale|)
# of 0 (eps of the input's dtype) may land on either side of 0 in a correct implementation: each term
# is rounded at most twice at that precision (itself, then the sum), and the statistics that BN(x)
# subtracts carry their own rounding; 4 covers both.
RELU_BAND = 4
PASS_MODE = {"train_fwd": "train", "bwd": "train", "fwd_bwd": "train", "eval_fwd": "eval"}


@dataclasses.dataclass
class Inputs:
    x: torch.Tensor
    dy: torch.Tensor
    weight: torch.Tensor
    bias: torch.Tensor
    running_mean: torch.Tensor
    running_var: torch.Tensor
    residual: torch.Tensor | None = None

    def double(self) -> "Inputs":
        return Inputs(**{f.name: _map(getattr(self, f.name), torch.Tensor.double) for f in dataclasses.fields(self)})


def _map(t, fn):
    return None if t is None else fn(t)


@dataclasses.dataclass
class Settings:
    device: torch.device
    timing: bool  # False: smoke (check and detect backends only)
    warmup_ms: int = 25
    rep_ms: int = 100
    copy_gbps: float | None = None
    deadline: float | None = None  # time.monotonic() after which no new case starts
    compile_backend: str = "inductor"
    # Injectable timers (tests run the timing path on CPU with them). timer: f -> (median, 20%, 80%)
    # wall ms, default do_bench. host_timer: f -> ms, default enqueue_ms. device_timer:
    # build -> ms, where build() makes f; default cuda_graph_ms on CUDA, none elsewhere.
    timer: Callable | None = None
    host_timer: Callable | None = None
    device_timer: Callable | None = None
    calls: int = 30  # back-to-back calls of the host and device times


def do_bench_timer(warmup_ms: int, rep_ms: int) -> Callable:
    import triton.testing

    def timer(f):
        return tuple(triton.testing.do_bench(f, warmup=warmup_ms, rep=rep_ms, quantiles=[0.5, 0.2, 0.8]))

    return timer


def enqueue_ms(f: Callable, calls: int = 30, sync: Callable = lambda: None) -> float:
    """Host time per call: ``calls`` back-to-back calls, nothing synchronized between them (after a
    warm-up call and a sync), divided by ``calls``. The queue is drained after the clock stops."""
    f()
    sync()
    t0 = time.perf_counter()
    for _ in range(calls):
        f()
    elapsed = time.perf_counter() - t0
    sync()
    return elapsed / calls * 1e3


def cuda_graph_ms(build: Callable, reps: int = 30, cuda=torch.cuda) -> float:
    """Device time per call: ``f = build()`` captured once in a CUDA graph and replayed ``reps``
    times between two CUDA events. f is built and warmed up on the capture stream, so that what its
    backward needs (the bwd pass's forward) was recorded on that stream too."""
    stream = cuda.Stream()
    stream.wait_stream(cuda.current_stream())
    with cuda.stream(stream):
        f = build()
        for _ in range(3):
            f()
    graph = cuda.CUDAGraph()
    with cuda.graph(graph, stream=stream):
        f()
    cuda.current_stream().wait_stream(stream)
    graph.replay()
    start, end = cuda.Event(enable_timing=True), cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        graph.replay()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / reps


def make_inputs(case: Case, device, residual: bool = False, seed: int = 0) -> Inputs:
    """Deterministic inputs; per-channel mean in [-2, 2] and scale in [0.5, 2] so that statistics
    errors show; weight near 1 and bias near 0, in float32 (as BatchNorm keeps them under AMP)."""
    g = torch.Generator(device=device).manual_seed(seed)
    dims = case.shape.dims
    C = dims[1]
    per_channel = (1, C) + (1,) * (len(dims) - 2)
    shift = torch.linspace(-2.0, 2.0, C, device=device).view(per_channel)
    scale = torch.linspace(0.5, 2.0, C, device=device).flip(0).view(per_channel)
    fmt = torch.contiguous_format
    if case.layout == "channels_last":
        fmt = torch.channels_last if len(dims) == 4 else torch.channels_last_3d

    def randn(*size):
        return torch.randn(*size, generator=g, device=device, dtype=torch.float32)

    def big(t):
        return t.to(case.dtype).contiguous(memory_format=fmt)

    x, dy = big(randn(dims) * scale + shift), big(randn(dims))
    weight, bias, running_mean = 1.0 + 0.1 * randn(C), 0.1 * randn(C), 0.1 * randn(C)
    running_var = 0.5 + torch.rand(C, generator=g, device=device)
    r = big(randn(dims)) if residual else None
    return Inputs(x, dy, weight, bias, running_mean, running_var, r)


def _leaves(inp: Inputs, requires_grad: bool) -> tuple:
    """Fresh leaves (x, running_mean, running_var, weight, bias, residual) of one run."""

    def leaf(t):
        return _map(t, lambda t: t.detach().clone().requires_grad_(requires_grad))

    x = inp.x.detach().requires_grad_(requires_grad)
    return x, inp.running_mean.clone(), inp.running_var.clone(), leaf(inp.weight), leaf(inp.bias), leaf(inp.residual)


def run_train(fn: Callable, inp: Inputs) -> dict:
    """Training forward (running stats updated) and backward for x, weight, bias (and residual)."""
    x, rm, rv, w, b, r = _leaves(inp, True)
    with torch.enable_grad():
        y = fn(x, rm, rv, w, b, True, r)
        grads = torch.autograd.grad(y, (x, w, b) + ((r,) if r is not None else ()), inp.dy)
    out = dict(y=y.detach(), running_mean=rm, running_var=rv, dx=grads[0], dweight=grads[1], dbias=grads[2])
    if r is not None:
        out["dresidual"] = grads[3]
    return out


def run_eval(fn: Callable, inp: Inputs) -> dict:
    x, rm, rv, w, b, r = _leaves(inp, False)
    with torch.no_grad():
        return dict(y=fn(x, rm, rv, w, b, False, r))


def masked_backward(d: Inputs, mask: torch.Tensor) -> dict:
    """Float64 gradients of relu(BN(x) + residual) with the ReLU's mask given."""
    x, _, _, w, b, _ = _leaves(d, True)
    g = d.dy * mask
    with torch.enable_grad():
        z = F.batch_norm(x, None, None, w, b, True, 0.0, impls_mod.EPS)
        dx, dw, db = torch.autograd.grad(z, (x, w, b), g)
    return dict(dx=dx, dweight=dw, dbias=db, dresidual=g)


def reference(inp: Inputs) -> dict:
    """Float64 results (torch on float64 copies): the anchor of every check. With a residual, also
    the ReLU's mask and which of its inputs p = BN(x) + residual lie within rounding of 0."""
    d = inp.double()
    ref = {"train": run_train(impls_mod.torch_bn, d), "eval": run_eval(impls_mod.torch_bn, d)}
    if d.residual is not None:
        dims = [0] + list(range(2, d.x.dim()))
        mean, var = d.x.mean(dims, keepdim=True), d.x.var(dims, unbiased=False, keepdim=True)
        shape = mean.shape
        scale = d.weight.view(shape) * (var + impls_mod.EPS).rsqrt()
        z = (d.x - mean) * scale + d.bias.view(shape)
        p = z + d.residual
        info = torch.finfo(inp.x.dtype)
        band = RELU_BAND * info.eps * (z.abs() + d.residual.abs() + (mean * scale).abs()) + info.tiny
        ref["relu"] = dict(inputs=d, mask=p > 0, near_zero=p.abs() <= band)
    return ref


def rel_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """max |out - ref| / max |ref|."""
    scale = ref.abs().max().item()
    return (out.double() - ref).abs().max().item() / max(scale, 1e-30)


def errors(outputs: dict, ref: dict, mode: str) -> tuple:
    """({output: relative error}, ReLU mask flips). A flip is an element where the implementation's
    ReLU mask (read from its d(residual) = dy * mask) differs from the float64 one while the ReLU's
    input lies within rounding of 0: there its gradients are compared with the float64 gradients
    under the implementation's mask. Every other element, flipped or not, is compared as is."""
    expected, flips = ref[mode], 0
    relu = ref.get("relu")
    if mode == "train" and relu is not None:
        d = relu["inputs"]
        ours = torch.where(d.dy != 0, outputs["dresidual"] != 0, relu["mask"])
        flipped = (ours != relu["mask"]) & relu["near_zero"]
        flips = int(flipped.sum().item())
        if flips:
            expected = dict(expected, **masked_backward(d, relu["mask"] ^ flipped))
    return {k: rel_error(outputs[k], expected[k]) for k in expected}, flips


def verdict(errs: dict, torch_errs: dict, dtype: torch.dtype) -> tuple:
    """(ok, worst ratio-to-allowance, name of the worst output)."""
    worst, worst_name = 0.0, ""
    for k, e in errs.items():
        allowed = ERROR_RATIO * torch_errs[k] + ERROR_FLOOR[dtype]
        if e / allowed >= worst:
            worst, worst_name = e / allowed, k
    return worst <= 1.0, worst, worst_name


def pass_callable(fn: Callable, pass_name: str, inp: Inputs) -> Callable:
    """The callable timed for one pass; built the same way for every implementation."""
    x, rm, rv, w, b, r = _leaves(inp, pass_name != "eval_fwd")
    wrt = (x, w, b) + ((r,) if r is not None else ())
    if pass_name == "train_fwd":
        return lambda: fn(x, rm, rv, w, b, True, r)
    if pass_name == "eval_fwd":
        return lambda: fn(x, rm, rv, w, b, False, r)
    if pass_name == "bwd":
        y = fn(x, rm, rv, w, b, True, r)
        return lambda: torch.autograd.grad(y, wrt, inp.dy, retain_graph=True)
    if pass_name == "fwd_bwd":
        return lambda: torch.autograd.grad(fn(x, rm, rv, w, b, True, r), wrt, inp.dy)
    raise ValueError(f"unknown pass {pass_name!r}")


def peak_extra_mb(f: Callable, device: torch.device) -> float | None:
    """Memory one call allocates beyond what was allocated before it (outputs, saved tensors,
    workspaces), in MiB; None off CUDA."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    f()
    torch.cuda.synchronize(device)
    return (torch.cuda.max_memory_allocated(device) - base) / 2**20


def measure_copy_gbps(device: torch.device, nbytes: int = 1 << 30, warmup_ms: int = 25, rep_ms: int = 100) -> float:
    """Device-to-device copy bandwidth (read + write) of a ``nbytes`` copy: the reference line."""
    src = torch.randn(nbytes // 4, device=device)
    dst = torch.empty_like(src)
    return traffic.copy_gbps(nbytes, do_bench_timer(warmup_ms, rep_ms)(lambda: dst.copy_(src))[0])


def make_row(case: Case, impl: str, pass_name: str, workload: Workload = PLAIN, **fields) -> dict:
    row = dict.fromkeys(CSV_COLUMNS)
    row.update(
        impl=impl,
        dtype=case.dtype_name,
        layout=case.layout,
        shape=case.shape.name,
        dims="x".join(str(d) for d in case.shape.dims),
        model_bytes=traffic.model_bytes(pass_name, case.shape.dims, case.dtype, workload.traffic),
        backend="",
        status="",
        note="",
    )
    row.update(fields, **{"pass": workload.prefix + pass_name})
    return row


def _short(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}".replace("\n", " ")[:300]


def _time(f: Callable, build: Callable, settings: Settings, nbytes: int) -> dict:
    """Peak memory, wall, host and device time of one pass; the device time is NaN (with the reason
    in the note) when it cannot be measured, say when a CUDA graph cannot capture the call."""
    cuda = settings.device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    timer = settings.timer or do_bench_timer(settings.warmup_ms, settings.rep_ms)
    host_timer = settings.host_timer or (lambda f: enqueue_ms(f, settings.calls, sync))
    device_timer = settings.device_timer or (lambda b: cuda_graph_ms(b, settings.calls) if cuda else math.nan)
    fields = dict(peak_mem_mb=peak_extra_mb(f, settings.device), status="ok")
    med, p20, p80 = timer(f)
    fields.update(ms=med, ms_p20=p20, ms_p80=p80, gbps=traffic.gbps(nbytes, med), host_ms=host_timer(f))
    if settings.copy_gbps:
        fields["pct_copy_bw"] = fields["gbps"] / settings.copy_gbps
    try:
        fields["device_ms"] = device_timer(build)
        if settings.copy_gbps and fields["device_ms"] > 0:  # NaN where no CUDA graph: not > 0
            fields["device_pct_copy_bw"] = traffic.gbps(nbytes, fields["device_ms"]) / settings.copy_gbps
    except Exception as exc:  # never fatal: the row keeps its other times
        fields.update(device_ms=math.nan, note=f"device time not measured: {_short(exc)}")
        if cuda:
            torch.cuda.synchronize()
    return fields


def run_case(
    case: Case, impl_names, passes, settings: Settings, rows: list, progress: Callable = None, workload=PLAIN
) -> None:
    """Check every implementation against float64 and (unless smoke) time those that pass; append
    one row per pass and implementation to ``rows``."""
    dev = settings.device
    inp = make_inputs(case, dev, residual=workload.residual)
    ref = reference(inp)
    label = f"{workload.prefix}{case.label}"
    modes = sorted({PASS_MODE[p] for p in passes})
    runners = {"train": run_train, "eval": run_eval}

    def row(name, pass_name, **fields):
        return make_row(case, name, pass_name, workload, **fields)

    # torch eager (default flags) against float64: the yardstick for everyone's error.
    yard = impls_mod.make_impl("cudnn")
    with yard.active():
        torch_errs = {m: errors(runners[m](yard.fn, inp), ref, m)[0] for m in modes}

    impls, checks = {}, {}
    for name in impl_names:
        if progress:
            progress(f"{label} check {name}")
        try:
            impl = impls_mod.make_impl(name, settings.compile_backend)
            with impl.active():
                for m in modes:
                    errs, flips = errors(runners[m](impl.fn, inp), ref, m)
                    checks[name, m] = verdict(errs, torch_errs[m], case.dtype) + (flips,)
            impls[name] = impl
        except Exception as exc:  # a crash is reported, and the other implementations still run
            checks[name, "error"] = _short(exc)
    del ref

    for pass_name in passes:
        mode = PASS_MODE[pass_name]
        for name in impl_names:
            if (name, "error") in checks:
                rows.append(row(name, pass_name, status="error", note=checks[name, "error"]))
                continue
            ok, worst, worst_name, flips = checks[name, mode]
            flips = flips if mode == "train" and workload.residual else None
            if not ok:
                note = f"{worst_name} error is {worst:.3g}x the allowance ({ERROR_RATIO:g}x torch's + floor)"
                rows.append(row(name, pass_name, status="wrong", err_ratio=worst, mask_flips=flips, note=note))
                continue
            if progress:
                progress(f"{label} {pass_name} {name}")
            impl = impls[name]
            try:
                with impl.active(), torch.set_grad_enabled(pass_name != "eval_fwd"):
                    build = functools.partial(pass_callable, impl.fn, pass_name, inp)
                    f = build()
                    fields = dict(backend=impls_mod.detect_backend(f), err_ratio=worst, mask_flips=flips)
                    fields["status"] = "checked"
                    if settings.timing:
                        nbytes = traffic.model_bytes(pass_name, case.shape.dims, case.dtype, workload.traffic)
                        fields.update(_time(f, build, settings, nbytes))
                    del f
                rows.append(row(name, pass_name, **fields))
            except Exception as exc:
                rows.append(row(name, pass_name, status="error", note=_short(exc)))
            if dev.type == "cuda":
                torch.cuda.empty_cache()


def run_suite(
    cases, impl_names, passes, settings: Settings, rows: list, progress: Callable = None, workload=PLAIN
) -> None:
    """All cases the workload applies to, in order; past the deadline, the rest are recorded as skipped."""
    cases = [c for c in cases if workload.applies(c)]
    for i, case in enumerate(cases):
        fill = [make_row(case, n, p, workload) for p in passes for n in impl_names]
        if settings.deadline is not None and time.monotonic() > settings.deadline:
            rows.extend(dict(r, status="skipped", note="time budget spent") for r in fill)
            continue
        start = len(rows)
        try:
            step = progress and (lambda text, _i=i: progress(f"[{_i + 1}/{len(cases)}] {text}"))
            run_case(case, impl_names, passes, settings, rows, step, workload)
        except Exception as exc:  # inputs or reference failed (e.g. out of memory): the case errs
            del rows[start:]
            rows.extend(dict(r, status="error", note=_short(exc)) for r in fill)
        if settings.device.type == "cuda":
            torch.cuda.empty_cache()
