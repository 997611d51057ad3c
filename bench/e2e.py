"""``python -m bench.e2e``: one training step of a real network, torch's BatchNorm against bn_triton's.

A step is forward, cross-entropy loss, backward and an SGD step (momentum 0.9) on torchvision's
ResNet-50, or any torchvision classifier named by ``--model`` (SILU_MODEL, efficientnet_b0: 33 of its
49 BatchNorms feed a SiLU), for variants of the same model with the same initial weights (VARIANTS):
``torch`` (eager, cuDNN's BatchNorm), ``bn_triton`` (eager, after ``bn_triton.convert_batchnorm``),
``bn_triton_fused`` (eager, after ``bn_triton.fuse``: BN -> activation and BN -> add -> activation run
as our fused layers: ReLU in ResNet-50, SiLU in EfficientNet), ``torch_compile`` and
``bn_triton_compile`` (``torch.compile`` of the first two), and
``torch_graph``, ``bn_triton_graph`` and ``bn_triton_fused_graph``: the three eager models with the
whole step captured once in a CUDA graph (``torch.cuda.graphs``: warm-up on a side stream, static
input and target tensors) and replayed, one launch per step; without CUDA these are skipped, with
the reason in the table. Two configs (CONFIGS below): ``bf16_cl`` (bf16 autocast, channels_last,
batch 128) and ``fp32_nchw`` (fp32, NCHW, batch 64). ``step_ms`` is the median of ``--steps`` steps
after the warm-up (the first warm-up step also compiles), each between two
``torch.cuda.synchronize``; cuDNN benchmark mode is on. Every variant's first-step loss is compared
with torch eager's (same weights, same first batch): a bn_triton variant outside LOSS_RTOL, or
failing, makes the exit status 1.

``launches``: the kernels of one training step, counted on one more step after the timed ones (in
the smoke, its last step). On a GPU, the profiler's CUDA kernel events (a graph's kernels too: one
replay launches them all). On CPU, bn_triton's kernel launches (``bn_triton.launch.LAUNCHES``) plus
the aten ops torch's profiler records outside any other aten op and outside our launches (whose
interpreter runs torch ops of its own), each counted once, views and allocations left out.

Output: a table of step times, speedups (BASELINE's step time / the variant's: bn_triton and
bn_triton_fused against torch, bn_triton_compile against torch_compile, the graph variants against
torch_graph; > 1: bn_triton faster), launches, and what ``bn_triton.fuse`` fused; with ``--out``,
``e2e.csv`` (COLUMNS: ``model,config,variant,batch,step_ms,launches``), one row per variant that ran.
``--budget-s`` starts no new variant after that many seconds; SIGTERM or Ctrl-C keeps the rows so far.
torchvision is optional: without it the step is skipped with a message (exit 0). Without a CUDA
GPU (or with ``--smoke``) a smoke runs instead: ``tinynet``, built here, on tiny inputs on CPU
under Triton's interpreter, compiled variants with ``aot_eager``; it checks the code path and the
losses, and no time is meaningful (``step_ms`` is left empty).
"""

import argparse
import collections
import copy
import csv
import dataclasses
import gc
import math
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn

from . import sigterm_as_interrupt, start_smoke
from .suite import parse_list

COLUMNS = ("model", "config", "variant", "batch", "step_ms", "launches")
VARIANTS = (
    "torch",
    "bn_triton",
    "bn_triton_fused",
    "torch_compile",
    "bn_triton_compile",
    "torch_graph",
    "bn_triton_graph",
    "bn_triton_fused_graph",
)
TINY = "tinynet"
SILU_MODEL = "efficientnet_b0"  # the SiLU network bench/gpu_check.sh runs after ResNet-50
NO_TORCHVISION = "torchvision is not installed: pip install torchvision; skipping the end-to-end step"

Config = collections.namedtuple("Config", "autocast_bf16 channels_last batch")
CONFIGS = {
    "bf16_cl": Config(autocast_bf16=True, channels_last=True, batch=128),
    "fp32_nchw": Config(autocast_bf16=False, channels_last=False, batch=64),
}
# First-step loss of a variant against torch eager's, relative. fp32: both sides compute BN in fp32
# (5e-5 seen on an H100). bf16 autocast: every conv output is rounded to bf16 (2^-8) and the rounding
# differs wherever BN's output does by one ulp; 2e-2 is about 5 bf16 ulps of the loss. The smoke's
# allowance is looser: the interpreter converts to bf16 by truncation, not rounding
# (shared/docs/platform-notes.md, "Interpreter fidelity").
LOSS_RTOL = {"bf16_cl": 2e-2, "fp32_nchw": 1e-3}
SMOKE_LOSS_RTOL = {"bf16_cl": 1e-1, "fp32_nchw": 1e-3}
BASELINE = {  # speedup = the baseline's ms / the variant's
    "bn_triton": "torch",
    "bn_triton_fused": "torch",
    "bn_triton_compile": "torch_compile",
    "bn_triton_graph": "torch_graph",
    "bn_triton_fused_graph": "torch_graph",
}
NO_CUDA_GRAPHS = "CUDA graphs need a CUDA GPU"
# Aten ops that launch no kernel of their own (views, allocations, metadata): on CPU an op counts if
# it, or an op it calls, is not one of these (aten::to converts, or returns its input).
NO_KERNEL_OPS = frozenset(
    f"aten::{name}"
    for name in (
        "empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided", "detach", "alias", "view",
        "_unsafe_view", "reshape", "_reshape_alias", "as_strided", "t", "transpose", "permute", "expand",
        "squeeze", "unsqueeze", "flatten", "unflatten", "select", "slice", "set_", "resize_", "lift_fresh",
        "to", "contiguous",
    )
)  # fmt: skip
KERNEL_RANGE = "bn_triton kernel"  # the profiler range around each of our launches (CPU count)


def parse_args(argv):
    p = argparse.ArgumentParser(
        prog="python -m bench.e2e", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--model",
        help=f"a torchvision.models name, e.g. resnet50 or {SILU_MODEL} (SiLU), or {TINY} (default resnet50; "
        f"smoke: {TINY})",
    )
    p.add_argument("--configs", help=f"comma-separated from {', '.join(CONFIGS)} (default all)")
    p.add_argument("--variants", help=f"comma-separated from {', '.join(VARIANTS)} (default all)")
    p.add_argument("--steps", type=int, help="timed steps per variant (default 20; smoke 1)")
    p.add_argument("--warmup", type=int, help="warm-up steps of an eager variant, first included (default 5; smoke 1)")
    p.add_argument("--compile-warmup", type=int, help="warm-up steps of a compiled variant (default 3; smoke 1)")
    p.add_argument("--batch", type=int, help="batch size for every config (default: the config's; smoke 2)")
    p.add_argument("--budget-s", type=float, help="start no new variant after this many seconds")
    p.add_argument("--out", help="folder for e2e.csv (default: none written)")
    p.add_argument("--md", help="also write the table as Markdown to this file")
    p.add_argument("--smoke", action="store_true", help=f"the {TINY} smoke, no timing (the default without a GPU)")
    return p.parse_args(argv)


class TinyNet(nn.Module):
    """A small ResNet-like net with torch BatchNorm layers: stem conv-BN-ReLU, one residual block
    (conv-BN-ReLU-conv-BN, add, ReLU), an EfficientNet-like conv-BN-SiLU, average pool, then a
    BatchNorm1d on the features and a linear head, so the smoke covers 4-D and 2-D batch norm, and
    bn_triton.fuse its patterns: BN -> ReLU (stem, bn1), BN -> add -> ReLU (bn2) and BN -> SiLU
    (bn3); bn_feat feeds the head and stays unfused."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU())
        self.conv1 = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(8)
        self.conv3 = nn.Conv2d(8, 8, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(8)
        self.act3 = nn.SiLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.bn_feat = nn.BatchNorm1d(8)
        self.fc = nn.Linear(8, 10)

    def forward(self, x):
        x = self.stem(x)
        y = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(x + self.bn2(self.conv2(y)))
        x = self.act3(self.bn3(self.conv3(x)))
        return self.fc(self.bn_feat(torch.flatten(self.pool(x), 1)))


def build_model(name: str):
    """(model, number of classes); None where torchvision is missing."""
    if name == TINY:
        return TinyNet(), 10
    try:
        import torchvision.models
    except ImportError:
        return None
    builder = getattr(torchvision.models, name, None)
    if not callable(builder):
        raise ValueError(f"torchvision.models has no model {name!r}")
    return builder(), 1000  # torchvision's classifiers default to ImageNet's 1000 classes


@dataclasses.dataclass
class Result:
    config: str
    variant: str
    batch: int
    step_ms: float | None = None  # median; None when not timed (smoke)
    first_loss: float | None = None
    seconds: float = 0.0  # wall time of the whole variant, warm-up (compiles) included
    error: str | None = None
    launches: int | None = None  # kernels in one training step (module docstring)
    skipped: str | None = None  # why the variant cannot run here
    fusion: str | None = None  # bn_triton.fuse's report (the fused variants)


def run_variant(res: Result, base, num_classes: int, device, smoke: bool, steps: int, warmup: int, size: int):
    """One variant into res; an exception becomes its error (reported in the table: a compile
    failure is not ours). The variant's memory is given back before the next one starts."""
    if res.variant.endswith("_graph") and device.type != "cuda":
        res.skipped = NO_CUDA_GRAPHS
        return res
    t_start = time.monotonic()
    try:
        _train(res, base, num_classes, device, smoke, steps, warmup, size)
    except Exception as exc:  # noqa: BLE001
        res.error = f"{type(exc).__name__}: {(str(exc).splitlines() or [''])[0]}"[:300]
    finally:  # _train's model, optimizer and compiled graphs are unreferenced now
        if "_compile" in res.variant:
            torch._dynamo.reset()
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    res.seconds = time.monotonic() - t_start
    return res


def _train(res: Result, base, num_classes: int, device, smoke: bool, steps: int, warmup: int, size: int):
    """A fresh copy of the model, warm-up (the first step's loss kept), timed steps, one counted step."""
    cfg = CONFIGS[res.config]
    memory_format = torch.channels_last if cfg.channels_last else torch.contiguous_format
    graph = res.variant.endswith("_graph")
    # Random images (never zeros) drawn before timing, a few batches used in turn; seeded, so every
    # variant of a config starts from the same first batch.
    gen = torch.Generator(device).manual_seed(1)
    xs = torch.randn(3, res.batch, 3, size, size, generator=gen, device=device)
    ts = torch.randint(0, num_classes, (3, res.batch), generator=gen, device=device)
    pool = [(x.contiguous(memory_format=memory_format), t) for x, t in zip(xs, ts, strict=True)]
    # A captured graph cannot replay autocast's cache of casted weights (torch.cuda.graphs' advice).
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.autocast_bf16, cache_enabled=not graph)
    sync = torch.cuda.synchronize if device.type == "cuda" else lambda: None
    model = _model(res, base, device, memory_format, pool[0][0], autocast)
    fn = torch.compile(model, backend="aot_eager" if smoke else "inductor") if "_compile" in res.variant else model
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

    def step(i):
        x, t = pool[i % len(pool)]
        with autocast:
            loss = F.cross_entropy(fn(x), t)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    if graph:
        step = _captured_step(res, fn, opt, pool, autocast, warmup)
    else:
        res.first_loss = float(step(0).detach())  # same weights and batch for every variant
        for i in range(1, max(warmup, 1)):
            step(i)
    sync()
    timed = max(steps - 1, 0) if smoke else steps  # the smoke times nothing: its last step is the counted one
    times = []
    for i in range(timed):
        t0 = time.perf_counter()
        step(i)
        sync()
        times.append((time.perf_counter() - t0) * 1e3)
    if times and not smoke:
        res.step_ms = statistics.median(times)
    res.launches = count_launches(lambda: step(timed), device)


def _model(res: Result, base, device, memory_format, example, autocast):
    """The variant's copy of the model: torch's, converted, or fused (its report kept in res)."""
    import bn_triton  # not at the top: on CPU, start_smoke switches Triton's interpreter on first

    model = copy.deepcopy(base).to(device, memory_format=memory_format).train()
    if res.variant.startswith("bn_triton_fused"):
        with autocast:  # the shapes and dtypes that the adds see in the step
            model = bn_triton.fuse(model, example)
        res.fusion = str(model.fusion_report)
    elif res.variant.startswith("bn_triton"):
        bn_triton.convert_batchnorm(model)
    return model


def _captured_step(res: Result, fn, opt, pool, autocast, warmup: int):
    """The whole step in a CUDA graph, by torch.cuda.graphs' recipe: warm-up steps on a side stream
    (the first one's loss kept, as every variant's), one capture on static input and target tensors;
    then a step copies its batch into them and replays the graph."""
    static_x, static_t = (t.clone() for t in pool[0])

    def body():
        with autocast:
            loss = F.cross_entropy(fn(static_x), static_t)
        loss.backward()
        opt.step()
        return loss

    def load(i):
        x, t = pool[i % len(pool)]
        static_x.copy_(x)
        static_t.copy_(t)

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for i in range(max(warmup, 3)):  # the optimizer's state exists and every kernel is compiled
            load(i)
            loss = body()
            if i == 0:
                res.first_loss = float(loss.detach())
            opt.zero_grad(set_to_none=True)  # so that the captured backward allocates .grad in the graph's pool
    torch.cuda.current_stream().wait_stream(side)
    cuda_graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(cuda_graph):
        static_loss = body()

    def replay(i):
        load(i)
        cuda_graph.replay()
        return static_loss

    return replay


def count_launches(step, device) -> int:
    """The kernels that ``step()`` launches (module docstring: how, on a GPU and on CPU)."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    from bn_triton import launch

    from .impls import _quietly
    from .stub import stubbed_kernels

    if device.type == "cuda":
        prof = profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA])
        _quietly(prof.start)
        try:
            step()
            torch.cuda.synchronize()
        finally:
            _quietly(prof.stop)
        kernels = [e for e in prof.events() if e.device_type == DeviceType.CUDA]
        return sum(1 for e in kernels if not e.name.startswith(("Memcpy", "Memset")))
    before = launch.LAUNCHES.copy()
    prof = profile(activities=[ProfilerActivity.CPU])
    with stubbed_kernels(on_launch=_launch_in_range):
        _quietly(prof.start)
        try:
            step()
        finally:
            _quietly(prof.stop)
    return sum((launch.LAUNCHES - before).values()) + _cpu_kernels(prof.events())


def _launch_in_range(launch) -> None:
    """One of our launches, run for real, inside a profiler range: the torch ops that the interpreter
    runs meanwhile are its own, not the step's."""
    with torch.profiler.record_function(KERNEL_RANGE):
        launch.kernel[launch.grid](*launch.args, **launch.kwargs)


def _cpu_kernels(events) -> int:
    """Aten ops called outside any other aten op, our ops and our launches, that compute something."""

    def outside(e):
        p = e.cpu_parent
        while p is not None:
            if p.name.startswith(("aten::", "bn_triton::")) or p.name == KERNEL_RANGE:
                return False
            p = p.cpu_parent
        return True

    def computes(e):
        return e.name not in NO_KERNEL_OPS or any(computes(c) for c in e.cpu_children)

    return sum(1 for e in events if e.name.startswith("aten::") and outside(e) and computes(e))


def write_csv(path: str, model: str, results: list) -> None:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(COLUMNS)
        for r in (r for r in results if r.error is None and r.skipped is None):
            step_ms = "" if r.step_ms is None else f"{r.step_ms:.3f}"
            w.writerow([model, r.config, r.variant, r.batch, step_ms, "" if r.launches is None else r.launches])


def loss_checks(results: list, smoke: bool) -> list:
    """(config, variant, first loss, relative difference to torch eager's, allowed, ok) per variant."""
    rtol = SMOKE_LOSS_RTOL if smoke else LOSS_RTOL
    ref = {r.config: r.first_loss for r in results if r.variant == "torch" and r.first_loss is not None}
    out = []
    for r in results:
        if r.variant != "torch" and r.first_loss is not None and r.config in ref:
            rel = abs(r.first_loss - ref[r.config]) / max(abs(ref[r.config]), 1e-12)
            ok = math.isfinite(r.first_loss) and rel <= rtol[r.config]
            out.append((r.config, r.variant, r.first_loss, rel, rtol[r.config], ok))
    return out


def table(model: str, results: list, skipped: list, smoke: bool, device_name: str, why="time budget spent") -> str:
    ms = {(r.config, r.variant): r.step_ms for r in results}
    lines = [f"## One training step of {model} on {device_name} (forward, loss, backward, SGD step)", ""]
    if smoke:
        lines += ["Smoke (no GPU or --smoke): the code path and the losses only; no time is meaningful.", ""]
    lines += [
        "| config | variant | batch | step ms | speedup | launches | first loss | warm-up + steps s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        base = ms.get((r.config, BASELINE.get(r.variant)))
        speedup = f"{base / r.step_ms:.2f}x" if base and r.step_ms else ""
        step = "skipped" if r.skipped else "error" if r.error else ("-" if r.step_ms is None else f"{r.step_ms:.2f}")
        loss = "" if r.first_loss is None else f"{r.first_loss:.5f}"
        launches = "" if r.launches is None else str(r.launches)
        row = [r.config, r.variant, r.batch, step, speedup, launches, loss, "" if r.skipped else f"{r.seconds:.1f}"]
        lines.append("| " + " | ".join(str(c) for c in row) + " |")
    lines += [
        "",
        "speedup: the baseline's step time / the variant's (> 1: bn_triton faster): bn_triton and bn_triton_fused "
        "against torch, bn_triton_compile against torch_compile, the graph variants against torch_graph.",
        "launches: kernels in one training step (on a GPU the profiler's CUDA kernels; on CPU our launches "
        "plus torch's aten ops: see the module docstring).",
    ]
    fusions = collections.defaultdict(list)
    for r in results:
        if r.fusion is not None and r.config not in fusions[r.fusion]:
            fusions[r.fusion].append(r.config)
    if fusions:
        lines += ["", "bn_triton.fuse (the bn_triton_fused variants):", ""]
        lines += [f"- {', '.join(configs)}: {report}" for report, configs in fusions.items()]
    checks = loss_checks(results, smoke)
    if checks:
        lines += ["", "First-step loss against torch eager's (same weights, same batch):", ""]
    for cfg, variant, loss, rel, tol, ok in checks:
        verdict = "ok" if ok else ("DISAGREES" if variant.startswith("bn_triton") else "differs (not ours)")
        lines.append(f"- {cfg} {variant}: loss {loss:.6f}, relative difference {rel:.2e} (allowed {tol:g}): {verdict}")
    errors = [f"- {r.config} {r.variant}: {r.error}" for r in results if r.error]
    if errors:
        lines += ["", "Errors:", ""] + errors
    reasons = collections.defaultdict(list)
    for r in results:
        if r.skipped:
            reasons[r.skipped].append(f"{r.config} {r.variant}")
    for reason, runs in reasons.items():
        lines += ["", f"Skipped ({reason}): " + ", ".join(runs)]
    if skipped:
        lines += ["", f"Not run ({why}): " + ", ".join(f"{c} {v}" for c, v in skipped)]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    cuda = torch.cuda.is_available()
    smoke = args.smoke or not cuda
    model_name = args.model or (TINY if smoke else "resnet50")
    torch.manual_seed(0)  # the initial weights, shared by every variant
    try:
        configs = parse_list(args.configs or ",".join(CONFIGS), CONFIGS, "config")
        variants = parse_list(args.variants or ",".join(VARIANTS), VARIANTS, "variant")
        if not configs or not variants:
            raise ValueError("--configs and --variants take at least one name")
    except ValueError as exc:
        print(f"python -m bench.e2e: {exc}", file=sys.stderr)
        return 2
    # Before the model: torchvision imports triton, whose own @triton.jit functions must be made
    # with the interpreter on already.
    start_smoke(
        cuda,
        smoke,
        ("No CUDA GPU: running the end-to-end smoke on CPU under Triton's interpreter instead.",),
        "--smoke: the code path and the losses only; no time is reported.",
    )
    try:
        built = build_model(model_name)
    except ValueError as exc:
        print(f"python -m bench.e2e: {exc}", file=sys.stderr)
        return 2
    if built is None:
        print(NO_TORCHVISION)
        return 0

    def pick(value, default, smoke_default):
        return value if value is not None else (smoke_default if smoke else default)

    steps, warmup, cwarm = pick(args.steps, 20, 1), pick(args.warmup, 5, 1), pick(args.compile_warmup, 3, 1)
    batch, size = pick(args.batch, None, 2), 8 if smoke else 224  # batch None: the config's
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    torch.backends.cudnn.benchmark = cuda and not smoke
    device_name = torch.cuda.get_device_name(device) if cuda else "cpu (Triton interpreter)"

    # Eager variants of every config first (seconds each), then the compiled ones (up to a minute
    # each to compile), config by config so that a budget leaves whole pairs; within a config, in
    # the order given.
    jobs = [(c, v) for c in configs for v in variants if "_compile" not in v]
    jobs += [(c, v) for c in configs for v in variants if "_compile" in v]
    print(
        f"device: {device_name}; model {model_name}; {len(jobs)} runs; {steps} timed steps after {warmup} warm-up "
        f"(compiled: {cwarm})" + (f"; budget {args.budget_s:g} s" if args.budget_s is not None else "")
    )
    csv_path = os.path.join(args.out, "e2e.csv") if args.out else None
    if args.out:
        os.makedirs(args.out, exist_ok=True)
    results, why, t0 = [], "time budget spent", time.monotonic()
    with sigterm_as_interrupt():  # `timeout` sends SIGTERM: keep what was measured
        try:
            for cname, variant in jobs:
                if args.budget_s is not None and time.monotonic() - t0 > args.budget_s:
                    break
                w = cwarm if "_compile" in variant else warmup
                r = Result(cname, variant, batch or CONFIGS[cname].batch)
                results.append(run_variant(r, *built, device, smoke, steps, w, size))
                status = r.skipped or r.error or ("not timed" if r.step_ms is None else f"{r.step_ms:.2f} ms")
                print(
                    f"{time.monotonic() - t0:7.1f}s  {cname:9s} {variant:21s} batch {r.batch}: {status} "
                    f"(first loss {r.first_loss}, {r.launches} launches, {r.seconds:.1f} s)",
                    flush=True,
                )
                if csv_path:
                    write_csv(csv_path, model_name, results)  # after every run: a timeout keeps the rest
        except KeyboardInterrupt:
            why = "interrupted"
    done = {(r.config, r.variant) for r in results}
    text = table(model_name, results, [j for j in jobs if j not in done], smoke, device_name, why)
    if why == "interrupted":
        text += "\n(interrupted: partial results)\n"
    if csv_path:
        write_csv(csv_path, model_name, results)
        text += f"\nWrote {csv_path}\n"
    if args.md:
        with open(args.md, "w") as f:
            f.write(text)
    print("\n" + text, end="")
    if why == "interrupted":
        return 130
    failed = [r.variant for r in results if r.error] + [c[1] for c in loss_checks(results, smoke) if not c[5]]
    return 1 if any(v.startswith("bn_triton") for v in failed) else 0


if __name__ == "__main__":
    sys.exit(main())
