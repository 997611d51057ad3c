"""Run the suite: inputs, a correctness check of every implementation, then timing.

Per case (a shape in one dtype and layout):
 1. inputs: x with a different mean and scale per channel, dy, weight, bias, running stats; none
    is zeros, all deterministic (seeded);
 2. a float64 reference (torch's batch_norm on float64 copies) of the training outputs (y, updated
    running stats, dx, dweight, dbias) and of the eval output;
 3. every implementation computes the same outputs once (this also compiles and warms it up); an
    output whose error against the reference is more than twice torch eager's own error plus a
    small per-dtype floor marks that implementation wrong for the passes it feeds, and a wrong
    implementation is reported as such and never timed;
 4. each pass of each implementation: the backend that actually ran (profiler), the peak extra
    memory of one call, then ``triton.testing.do_bench`` (median, 20% and 80% quantiles).
In smoke mode (CPU, Triton interpreter) steps 1-3 and the backend detection run, nothing is timed.
"""

import dataclasses
import time
from collections.abc import Callable

import torch

from bench import impls as impls_mod
from bench import traffic
from bench.suite import Case

# Error floors, as a fraction of the largest reference value, for when torch's own error happens to
# be tiny: about 2^-9 of the output for bf16 (8 bits of mantissa), 2^-11 for fp16, and for fp32 the
# rounding of sums over millions of values. A wrong formula errs by O(1) of the output.
ERROR_FLOOR = {torch.float32: 1e-4, torch.float16: 5e-3, torch.bfloat16: 2e-2}
# Allowed error relative to torch eager's own error against the float64 reference (flash-attn's rule).
ERROR_RATIO = 2.0

TRAIN_OUTPUTS = ("y", "running_mean", "running_var", "dx", "dweight", "dbias")
PASS_MODE = {"train_fwd": "train", "bwd": "train", "fwd_bwd": "train", "eval_fwd": "eval"}


@dataclasses.dataclass
class Inputs:
    x: torch.Tensor
    dy: torch.Tensor
    weight: torch.Tensor
    bias: torch.Tensor
    running_mean: torch.Tensor
    running_var: torch.Tensor


@dataclasses.dataclass
class Settings:
    device: torch.device
    timing: bool  # False: smoke (check and detect backends only)
    warmup_ms: int = 25
    rep_ms: int = 100
    copy_gbps: float | None = None
    deadline: float | None = None  # time.monotonic() after which no new case starts
    compile_backend: str = "inductor"
    # f -> (median, 20%, 80%) in ms; None: triton.testing.do_bench. Tests pass a wall-clock timer to
    # run the timing path on CPU.
    timer: Callable | None = None


def do_bench_timer(warmup_ms: int, rep_ms: int) -> Callable:
    import triton.testing

    def timer(f):
        return tuple(triton.testing.do_bench(f, warmup=warmup_ms, rep=rep_ms, quantiles=[0.5, 0.2, 0.8]))

    return timer


def memory_format(case: Case):
    if case.layout != "channels_last":
        return torch.contiguous_format
    return torch.channels_last if len(case.shape.dims) == 4 else torch.channels_last_3d


def make_inputs(case: Case, device, seed: int = 0) -> Inputs:
    """Deterministic inputs; per-channel mean in [-2, 2] and scale in [0.5, 2] so that statistics
    errors show; weight near 1 and bias near 0, in float32 (as BatchNorm keeps them under AMP)."""
    g = torch.Generator(device=device).manual_seed(seed)
    dims = case.shape.dims
    C = dims[1]
    per_channel = (1, C) + (1,) * (len(dims) - 2)
    shift = torch.linspace(-2.0, 2.0, C, device=device).view(per_channel)
    scale = torch.linspace(0.5, 2.0, C, device=device).flip(0).view(per_channel)
    fmt = memory_format(case)

    def randn(*size):
        return torch.randn(*size, generator=g, device=device, dtype=torch.float32)

    x = (randn(dims) * scale + shift).to(case.dtype).contiguous(memory_format=fmt)
    dy = randn(dims).to(case.dtype).contiguous(memory_format=fmt)
    weight = 1.0 + 0.1 * randn(C)
    bias = 0.1 * randn(C)
    running_mean = 0.1 * randn(C)
    running_var = 0.5 + torch.rand(C, generator=g, device=device)
    return Inputs(x, dy, weight, bias, running_mean, running_var)


def _leaves(inp: Inputs, requires_grad: bool):
    x = inp.x.detach().requires_grad_(requires_grad)
    w = inp.weight.detach().clone().requires_grad_(requires_grad)
    b = inp.bias.detach().clone().requires_grad_(requires_grad)
    return x, w, b, inp.running_mean.clone(), inp.running_var.clone()


def run_train(fn: Callable, inp: Inputs) -> dict:
    """Training forward (running stats updated) and backward for x, weight and bias."""
    x, w, b, rm, rv = _leaves(inp, True)
    with torch.enable_grad():
        y = fn(x, rm, rv, w, b, True)
        dx, dw, db = torch.autograd.grad(y, (x, w, b), inp.dy)
    return dict(y=y.detach(), running_mean=rm, running_var=rv, dx=dx, dweight=dw, dbias=db)


def run_eval(fn: Callable, inp: Inputs) -> dict:
    x, w, b, rm, rv = _leaves(inp, False)
    with torch.no_grad():
        return dict(y=fn(x, rm, rv, w, b, False))


def reference(inp: Inputs) -> dict:
    """Float64 results (torch's batch_norm on float64 copies): the anchor of every check."""
    # (not dataclasses.astuple: it deep-copies every tensor first)
    ref_inp = Inputs(**{f.name: getattr(inp, f.name).double() for f in dataclasses.fields(inp)})
    return {"train": run_train(impls_mod.torch_bn, ref_inp), "eval": run_eval(impls_mod.torch_bn, ref_inp)}


def rel_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """max |out - ref| / max |ref|."""
    scale = ref.abs().max().item()
    return (out.double() - ref).abs().max().item() / max(scale, 1e-30)


def errors(outputs: dict, ref: dict) -> dict:
    return {k: rel_error(outputs[k], ref[k]) for k in ref}


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
    x, w, b, rm, rv = _leaves(inp, pass_name != "eval_fwd")
    dy = inp.dy
    if pass_name == "train_fwd":
        return lambda: fn(x, rm, rv, w, b, True)
    if pass_name == "eval_fwd":
        return lambda: fn(x, rm, rv, w, b, False)
    if pass_name == "bwd":
        y = fn(x, rm, rv, w, b, True)
        return lambda: torch.autograd.grad(y, (x, w, b), dy, retain_graph=True)
    if pass_name == "fwd_bwd":
        return lambda: torch.autograd.grad(fn(x, rm, rv, w, b, True), (x, w, b), dy)
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
    import triton.testing

    src = torch.randn(nbytes // 4, device=device)
    dst = torch.empty_like(src)
    ms = triton.testing.do_bench(lambda: dst.copy_(src), warmup=warmup_ms, rep=rep_ms, quantiles=[0.5])
    ms = ms[0] if isinstance(ms, (list, tuple)) else ms
    return traffic.copy_gbps(nbytes, ms)


def _row(case: Case, impl: str, pass_name: str, **fields) -> dict:
    row = {"impl": impl, "pass": pass_name}
    row.update(
        dtype=case.dtype_name,
        layout=case.layout,
        shape=case.shape.name,
        dims="x".join(str(d) for d in case.shape.dims),
        ms=None,
        ms_p20=None,
        ms_p80=None,
        gbps=None,
        pct_copy_bw=None,
        model_bytes=traffic.model_bytes(pass_name, case.shape.dims, case.dtype),
        peak_mem_mb=None,
        backend="",
        status="",
        err_ratio=None,
        note="",
    )
    row.update(fields)
    return row


def _short(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}".replace("\n", " ")
    return text[:300]


def run_case(case: Case, impl_names, passes, settings: Settings, rows: list, progress: Callable = None) -> None:
    """Check and (unless smoke) time every implementation on one case; append rows to ``rows``."""
    inp = make_inputs(case, settings.device)
    make = lambda name: impls_mod.make_impl(name, settings.compile_backend)
    check_and_time(case, inp, reference(inp), make, impl_names, passes, settings, rows, progress)


def check_and_time(
    case: Case,
    inp,
    ref,
    make_impl: Callable,
    impl_names,
    passes,
    settings: Settings,
    rows: list,
    progress: Callable = None,
    row: Callable = None,
    label: str = "",
) -> None:
    """Check every implementation against ``ref`` (float64) and time those that pass.

    ``make_impl(name)`` builds an implementation; ``row`` builds a CSV row (default ``_row``; the
    fused rows pass their own, with their pass names and byte model); ``label`` prefixes progress.
    """
    row = row or _row
    dev = settings.device
    timer = settings.timer or do_bench_timer(settings.warmup_ms, settings.rep_ms)
    modes = sorted({PASS_MODE[p] for p in passes})
    runners = {"train": run_train, "eval": run_eval}

    # torch eager (default flags) against float64: the yardstick for everyone's error.
    yard = make_impl("cudnn")
    with yard.active():
        torch_errs = {m: errors(runners[m](yard.fn, inp), ref[m]) for m in modes}

    impls, checks = {}, {}
    for name in impl_names:
        if progress:
            progress(f"{label}{case.label} check {name}")
        try:
            impl = make_impl(name)
            with impl.active():
                for m in modes:
                    errs = errors(runners[m](impl.fn, inp), ref[m])
                    checks[name, m] = verdict(errs, torch_errs[m], case.dtype)
            impls[name] = impl
        except Exception as exc:  # a crash is reported, and the other implementations still run
            checks[name, "error"] = _short(exc)
    del ref

    for pass_name in passes:
        mode = PASS_MODE[pass_name]
        for name in impl_names:
            if (name, "error") in checks:
                rows.append(row(case, name, pass_name, status="error", note=checks[name, "error"]))
                continue
            ok, worst, worst_name = checks[name, mode]
            if not ok:
                note = f"{worst_name} error is {worst:.3g}x the allowance ({ERROR_RATIO:g}x torch's + floor)"
                rows.append(row(case, name, pass_name, status="wrong", err_ratio=worst, note=note))
                continue
            if progress:
                progress(f"{label}{case.label} {pass_name} {name}")
            impl = impls[name]
            try:
                with impl.active(), torch.set_grad_enabled(pass_name != "eval_fwd"):
                    f = pass_callable(impl.fn, pass_name, inp)
                    backend = impls_mod.detect_backend(f)
                    fields = dict(backend=backend, err_ratio=worst, status="checked")
                    if settings.timing:
                        fields["peak_mem_mb"] = peak_extra_mb(f, dev)
                        med, p20, p80 = timer(f)
                        nbytes = row(case, name, pass_name)["model_bytes"]
                        fields.update(ms=med, ms_p20=p20, ms_p80=p80, gbps=traffic.gbps(nbytes, med), status="ok")
                        if settings.copy_gbps:
                            fields["pct_copy_bw"] = traffic.fraction_of(fields["gbps"], settings.copy_gbps)
                    del f
                rows.append(row(case, name, pass_name, **fields))
            except Exception as exc:
                rows.append(row(case, name, pass_name, status="error", note=_short(exc)))
            if dev.type == "cuda":
                torch.cuda.empty_cache()
    del impls, inp
    if dev.type == "cuda":
        torch.cuda.empty_cache()


def run_suite(cases, impl_names, passes, settings: Settings, rows: list, progress: Callable = None) -> None:
    """All cases in order; past the deadline, the remaining cases are recorded as skipped."""
    for i, case in enumerate(cases):
        if settings.deadline is not None and time.monotonic() > settings.deadline:
            for pass_name in passes:
                for name in impl_names:
                    rows.append(_row(case, name, pass_name, status="skipped", note="time budget spent"))
            continue

        def step(text, _i=i):
            if progress:
                progress(f"[{_i + 1}/{len(cases)}] {text}")

        start = len(rows)
        try:
            run_case(case, impl_names, passes, settings, rows, step)
        except Exception as exc:  # inputs or reference failed (e.g. out of memory): the case errs
            del rows[start:]
            for pass_name in passes:
                for name in impl_names:
                    rows.append(_row(case, name, pass_name, status="error", note=_short(exc)))
            if settings.device.type == "cuda":
                torch.cuda.empty_cache()
