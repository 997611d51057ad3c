"""Run the suite: inputs, a correctness check of every implementation, then timing.

Per case (a shape in one dtype and layout) and workload (suite.WORKLOADS): seeded inputs
(make_inputs); a float64 reference of the training and eval outputs (reference); every
implementation computes the same outputs once, which also compiles and warms it up, and one whose
error is past the allowance (twice torch eager's own error plus a per-dtype floor) is reported
wrong for the passes it feeds and never timed (check); then for each pass of each implementation:
the backend that actually ran (profiler), the peak extra memory of one call, the wall time
(``triton.testing.do_bench``: median, 20% and 80% quantiles), the host time (enqueue_ms) and the
device time (cuda_graph_ms). In smoke mode (CPU, Triton interpreter) nothing is timed.
"""

import dataclasses
import functools
import math
import time
from collections.abc import Callable
from typing import NamedTuple

import torch

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
# An activation input p = BN(x) + residual within KINK_BAND * eps * (|BN(x)| + |residual| + |mean *
# scale|) of a kink (eps of the input's dtype) may land on either side of it in a correct
# implementation: each term is rounded at most twice at that precision (itself, then the sum), and
# the statistics that BN(x) subtracts carry their own rounding; 4 covers both.
KINK_BAND = 4
# Where an activation's derivative jumps (bn_triton/activations.py names): a side taken wrongly there
# changes the gradient by a whole jump (ReLU: all of dy; Hardswish: dy / 2). ELU's derivative jumps
# at 0 unless alpha = 1; SiLU, GELU and Mish are smooth.
KINKS = {"relu": (0.0,), "relu6": (0.0, 6.0), "leaky_relu": (0.0,), "hardswish": (-3.0, 3.0)}
PASS_MODE = {"train_fwd": "train", "bwd": "train", "fwd_bwd": "train", "eval_fwd": "eval"}
GRADS = ("dx", "dweight", "dbias", "dresidual")  # of x, weight, bias (and residual)


class Inputs(NamedTuple):
    x: torch.Tensor
    dy: torch.Tensor
    weight: torch.Tensor
    bias: torch.Tensor
    running_mean: torch.Tensor
    running_var: torch.Tensor
    residual: torch.Tensor | None = None

    def double(self) -> "Inputs":
        return Inputs(*(None if t is None else t.double() for t in self))


@dataclasses.dataclass
class Settings:
    device: torch.device
    timing: bool  # False: smoke (check and detect backends only)
    warmup_ms: int = 25
    rep_ms: int = 100
    copy_gbps: float | None = None
    deadline: float | None = None  # time.monotonic() after which no new case starts
    # Injectable timers (tests run the timing path on CPU with them). timer: f -> (median, 20%, 80%)
    # wall ms, default do_bench. host_timer: f -> ms, default enqueue_ms. device_timer:
    # build -> ms, where build() makes f; default cuda_graph_ms on CUDA, none elsewhere.
    timer: Callable | None = None
    host_timer: Callable | None = None
    device_timer: Callable | None = None
    calls: int = 30  # back-to-back calls of the host and device times


def do_bench(f: Callable, warmup_ms: int, rep_ms: int) -> tuple:
    import triton.testing

    return tuple(triton.testing.do_bench(f, warmup=warmup_ms, rep=rep_ms, quantiles=[0.5, 0.2, 0.8]))


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


def make_inputs(case: Case, device, residual: bool = False) -> Inputs:
    """Deterministic inputs; per-channel mean in [-2, 2] and scale in [0.5, 2] so that statistics
    errors show; weight near 1 and bias near 0, in float32 (as BatchNorm keeps them under AMP)."""
    g = torch.Generator(device=device).manual_seed(0)
    dims, C = case.shape.dims, case.shape.dims[1]
    per_channel = (1, C) + (1,) * (len(dims) - 2)
    shift = torch.linspace(-2.0, 2.0, C, device=device).view(per_channel)
    scale = torch.linspace(0.5, 2.0, C, device=device).flip(0).view(per_channel)
    fmt = torch.contiguous_format
    if case.layout == "channels_last":
        fmt = torch.channels_last if len(dims) == 4 else torch.channels_last_3d
    randn = functools.partial(torch.randn, generator=g, device=device, dtype=torch.float32)
    big = lambda t: t.to(case.dtype).contiguous(memory_format=fmt)
    x, dy = big(randn(dims) * scale + shift), big(randn(dims))
    weight, bias, running_mean = 1.0 + 0.1 * randn(C), 0.1 * randn(C), 0.1 * randn(C)
    running_var = 0.5 + torch.rand(C, generator=g, device=device)
    r = big(randn(dims)) if residual else None
    return Inputs(x, dy, weight, bias, running_mean, running_var, r)


def _args(inp: Inputs, training: bool) -> tuple:
    """Fresh arguments of one call, (x, running_mean, running_var, weight, bias, training, residual),
    and what the backward differentiates: (x, weight, bias) and the residual, leaves in training."""

    def leaf(t):
        return None if t is None else t.detach().clone().requires_grad_(training)

    x, w, b, r = inp.x.detach().requires_grad_(training), leaf(inp.weight), leaf(inp.bias), leaf(inp.residual)
    args = (x, inp.running_mean.clone(), inp.running_var.clone(), w, b, training, r)
    return args, (x, w, b) + (() if r is None else (r,))


def run_train(fn: Callable, inp: Inputs) -> dict:
    """Training forward (running stats updated) and backward for x, weight, bias (and residual)."""
    args, wrt = _args(inp, True)
    with torch.enable_grad():
        y = fn(*args)
        grads = torch.autograd.grad(y, wrt, inp.dy)
    return dict(y=y.detach(), running_mean=args[1], running_var=args[2], **dict(zip(GRADS, grads, strict=False)))


def run_eval(fn: Callable, inp: Inputs) -> dict:
    with torch.no_grad():
        return dict(y=fn(*_args(inp, False)[0]))


def kinks(activation) -> tuple:
    """The inputs where ``activation`` (a canonical name, or None) has a kink (KINKS)."""
    name, _, param = (activation or "").partition("(")
    if name == "elu":
        return () if float(param.rstrip(")")) == 1.0 else (0.0,)
    return KINKS.get(name, ())


def reference(inp: Inputs, activation=None) -> dict:
    """Float64 results (torch's composition on float64 copies): the anchor of every check. For an
    activation with kinks, also its input p = BN(x) + residual, the kink nearest each element and
    which elements lie within rounding of it, and the statistics that give back g = d(p)."""
    d = inp.double()
    fn = impls_mod.with_activation(impls_mod.torch_bn, activation)
    ref = {"train": run_train(fn, d), "eval": run_eval(fn, d)}
    points = kinks(activation)
    if points:
        dims = [0, *range(2, d.x.dim())]
        mean, var = d.x.mean(dims, keepdim=True), d.x.var(dims, unbiased=False, keepdim=True)
        scale = d.weight.view(mean.shape) * (var + impls_mod.EPS).rsqrt()
        z = (d.x - mean) * scale + d.bias.view(mean.shape)
        r = torch.zeros_like(z) if d.residual is None else d.residual
        p, info = z + r, torch.finfo(inp.x.dtype)
        band = KINK_BAND * info.eps * (z.abs() + r.abs() + (mean * scale).abs()) + info.tiny
        kink = torch.tensor(points, dtype=p.dtype, device=p.device)
        kink = kink[(p.unsqueeze(-1) - kink).abs().argmin(-1)]
        xhat = (d.x - mean) * (var + impls_mod.EPS).rsqrt()
        ref["kinks"] = dict(
            inputs=d, activation=activation, pre=p, kink=kink, near=(p - kink).abs() <= band, scale=scale, xhat=xhat
        )
    return ref


def rel_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """max |out - ref| / max |ref|."""
    return (out.double() - ref).abs().max().item() / max(ref.abs().max().item(), 1e-30)


def act_grad(v: torch.Tensor, activation) -> torch.Tensor:
    """act'(v), torch's (kinks included), by autograd."""
    from bn_triton import activations

    with torch.enable_grad():
        v = v.detach().requires_grad_(True)
        return torch.autograd.grad(activations.apply(v, activation).sum(), v)[0]


def pre_grad(outputs: dict, kref: dict) -> torch.Tensor:
    """An implementation's g = dy * act'(p), the gradient at the activation's input: its d(residual)
    where the workload has a residual; else from its dx, dweight and dbias, since batch norm's
    backward dx = scale * (g - mean(g) - xhat * mean(g * xhat)), dbias = sum(g), dweight =
    sum(g * xhat) (per channel) give g = dx / scale + (dbias + xhat * dweight) / count."""
    if "dresidual" in outputs:
        return outputs["dresidual"].double()
    xhat, scale = kref["xhat"], kref["scale"]
    dweight, dbias = (outputs[n].double().view(scale.shape) for n in ("dweight", "dbias"))
    return outputs["dx"].double() / scale + (dbias + xhat * dweight) / (xhat.numel() // xhat.shape[1])


def errors(outputs: dict, ref: dict, mode: str) -> tuple:
    """({output: relative error}, kink flips: None but for the training outputs of an activation
    with kinks). A flip is an element whose activation input p lies within rounding of a kink and
    whose gradient g (pre_grad) is nearer dy * act' on the kink's other side (at p mirrored across
    it) than float64's dy * act'(p): the implementation took the other side. There the outputs are
    compared with float64 computed with the implementation's sides (ReLU: its mask); every other
    element, flipped or not, is compared as is."""
    expected, flips, kref = ref[mode], None, ref.get("kinks")
    if mode == "train" and kref is not None:
        d, act, pre = kref["inputs"], kref["activation"], kref["pre"]
        mirror = 2 * kref["kink"] - pre
        g = pre_grad(outputs, kref)
        same, other = d.dy * act_grad(pre, act), d.dy * act_grad(mirror, act)
        flipped = kref["near"] & ((g - other).abs() < (g - same).abs())
        flips = int(flipped.sum().item())
        if flips:  # float64 with the act' of the mirrored input where flipped, the same values
            shift = torch.where(flipped, mirror - pre, 0.0)

            def fn(x, rm, rv, w, b, training, r=None):
                from bn_triton import activations

                p = impls_mod.torch_bn(x, rm, rv, w, b, training, r)
                v = p + shift
                return activations.apply(v, act) + (activations.apply(p, act) - activations.apply(v, act)).detach()

            expected = run_train(fn, d)
    return {n: rel_error(outputs[n], expected[n]) for n in expected}, flips


def verdict(errs: dict, torch_errs: dict, dtype: torch.dtype) -> tuple:
    """(ok, worst ratio-to-allowance, name of the worst output)."""
    ratios = {k: e / (ERROR_RATIO * torch_errs[k] + ERROR_FLOOR[dtype]) for k, e in errs.items()}
    worst = max(ratios, key=ratios.get)
    return ratios[worst] <= 1.0, ratios[worst], worst


def pass_callable(fn: Callable, pass_name: str, inp: Inputs) -> Callable:
    """The callable timed for one pass; built the same way for every implementation."""
    args, wrt = _args(inp, pass_name != "eval_fwd")
    if pass_name == "bwd":
        y = fn(*args)
        return lambda: torch.autograd.grad(y, wrt, inp.dy, retain_graph=True)
    if pass_name == "fwd_bwd":
        return lambda: torch.autograd.grad(fn(*args), wrt, inp.dy)
    if pass_name in ("train_fwd", "eval_fwd"):
        return lambda: fn(*args)
    raise ValueError(f"unknown pass {pass_name!r}")


def peak_extra_mb(f: Callable, device: torch.device) -> float:
    """Memory one call allocates beyond what was allocated before it (outputs, saved tensors,
    workspaces), in MiB; CUDA only."""
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
    return traffic.copy_gbps(nbytes, do_bench(lambda: dst.copy_(src), warmup_ms, rep_ms)[0])


def make_row(case: Case, impl: str, pass_name: str, workload: Workload = PLAIN, **fields) -> dict:
    """A CSV row: every column (None where nothing was measured), the case's, then ``fields``."""
    dims = case.shape.dims
    nbytes = traffic.model_bytes(pass_name, dims, case.dtype, workload.traffic)
    row = dict.fromkeys(CSV_COLUMNS)
    row.update(impl=impl, dtype=case.dtype_name, layout=case.layout, shape=case.shape.name, backend="", note="")
    row.update(dims="x".join(map(str, dims)), model_bytes=nbytes, status="")
    row.update(fields, **{"pass": workload.prefix + pass_name})
    return row


def _short(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}".replace("\n", " ")[:300]


def _time(f: Callable, build: Callable, settings: Settings, nbytes: int) -> dict:
    """Peak memory, wall, host and device time of one pass; the device time is NaN (with the reason
    in the note) when it cannot be measured, say when a CUDA graph cannot capture the call."""
    cuda, bw = settings.device.type == "cuda", settings.copy_gbps
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    timer = settings.timer or (lambda f: do_bench(f, settings.warmup_ms, settings.rep_ms))
    host_timer = settings.host_timer or (lambda f: enqueue_ms(f, settings.calls, sync))
    device_timer = settings.device_timer or (lambda b: cuda_graph_ms(b, settings.calls) if cuda else math.nan)
    fields = dict(peak_mem_mb=peak_extra_mb(f, settings.device) if cuda else None, status="ok")
    med, p20, p80 = timer(f)
    fields.update(ms=med, ms_p20=p20, ms_p80=p80, gbps=traffic.gbps(nbytes, med), host_ms=host_timer(f))
    if bw:
        fields["pct_copy_bw"] = fields["gbps"] / bw
    try:
        fields["device_ms"] = device_timer(build)
        if bw and fields["device_ms"] > 0:  # NaN where no CUDA graph: not > 0
            fields["device_pct_copy_bw"] = traffic.gbps(nbytes, fields["device_ms"]) / bw
    except Exception as exc:  # never fatal: the row keeps its other times
        fields.update(device_ms=math.nan, note=f"device time not measured: {_short(exc)}")
        sync()
    return fields


def check(case: Case, impl_names, inp: Inputs, modes, say: Callable, activation=None) -> dict:
    """{name: (Impl, {mode: (ok, worst ratio, worst output, flips)}), or the error it raised}: each
    implementation's outputs against float64, judged by torch eager's own error (default flags)."""
    ref = reference(inp, activation)

    def errs_of(impl) -> dict:  # {mode: (errors, flips)}
        with impl.active():
            return {m: errors((run_train if m == "train" else run_eval)(impl.fn, inp), ref, m) for m in modes}

    torch_errs, checks = errs_of(impls_mod.make_impl("cudnn", activation)), {}
    for name in impl_names:
        say(f"check {name}")
        try:
            impl = impls_mod.make_impl(name, activation)
            errs = errs_of(impl)
            checks[name] = impl, {m: verdict(e, torch_errs[m][0], case.dtype) + (f,) for m, (e, f) in errs.items()}
        except Exception as exc:  # a crash is reported, and the other implementations still run
            checks[name] = _short(exc)
    return checks


def _measure(checked, pass_name: str, inp: Inputs, settings: Settings, nbytes: int) -> dict:
    """The fields of one row: what the check found, then (if correct) the backend and times."""
    if isinstance(checked, str):
        return dict(status="error", note=checked)
    impl, verdicts = checked
    ok, worst, worst_name, flips = verdicts[PASS_MODE[pass_name]]
    fields = dict(err_ratio=worst, mask_flips=flips)
    if not ok:
        note = f"{worst_name} error is {worst:.3g}x the allowance ({ERROR_RATIO:g}x torch's + floor)"
        return dict(fields, status="wrong", note=note)
    try:
        with impl.active(), torch.set_grad_enabled(pass_name != "eval_fwd"):
            build = functools.partial(pass_callable, impl.fn, pass_name, inp)
            f = build()
            fields.update(backend=impls_mod.detect_backend(f), status="checked")
            if settings.timing:
                fields.update(_time(f, build, settings, nbytes))
        return fields
    except Exception as exc:
        return dict(status="error", note=_short(exc))


def run_case(
    case: Case, impl_names, passes, settings: Settings, rows: list, progress: Callable = None, workload=PLAIN
) -> None:
    """Check every implementation against float64 and (unless smoke) time those that pass; append
    one row per pass and implementation to ``rows``."""
    inp = make_inputs(case, settings.device, residual=workload.residual)
    say = lambda text: progress and progress(f"{workload.prefix}{case.label} {text}")
    checks = check(case, impl_names, inp, sorted({PASS_MODE[p] for p in passes}), say, workload.activation)
    for pass_name in passes:
        for name in impl_names:
            say(f"{pass_name} {name}")
            row = make_row(case, name, pass_name, workload)
            rows.append(dict(row, **_measure(checks[name], pass_name, inp, settings, row["model_bytes"])))
            if settings.device.type == "cuda":  # what the pass held (its callable, graph) is freed
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
