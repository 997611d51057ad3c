"""``python -m bench.e2e``: one training step of a real network, torch's BatchNorm against bn_triton's.

A step is forward, cross-entropy loss, backward and an SGD step (momentum 0.9) on torchvision's
ResNet-50 (``--model``), for four variants of the same model with the same initial weights:

  torch              eager, torch's BatchNorm (cuDNN)
  bn_triton          eager, after ``bn_triton.convert_batchnorm``
  torch_compile      ``torch.compile`` of the torch model
  bn_triton_compile  ``torch.compile`` of the converted model

and two configs (CONFIGS below): ``bf16_cl`` (bf16 autocast, channels_last, batch 128) and
``fp32_nchw`` (fp32, NCHW, batch 64). Each variant runs its warm-up steps (the first one also
compiles), then ``--steps`` steps, each timed with ``time.perf_counter`` between two
``torch.cuda.synchronize`` calls; ``step_ms`` is the median. Inputs are random (never zeros), drawn
before timing from a seeded generator, a few batches used in turn. ``torch.backends.cudnn.benchmark``
is on for every variant. The first step's loss of every variant is compared with torch eager's (same
weights, same first batch): a bn_triton variant outside LOSS_RTOL makes the exit status 1.

Output: ``e2e.csv`` in ``--out`` with the columns ``model,config,variant,batch,step_ms`` (a row for
every variant that ran; ``step_ms`` empty when not timed), and a table of step times with the
speedups torch / bn_triton and torch_compile / bn_triton_compile (> 1: bn_triton faster).
``--budget-s`` starts no new variant after that many seconds (eager variants of every config run
first, then the compiled ones: a compile warm-up of ResNet-50 can take a minute).

torchvision is optional: without it the ResNet-50 step is skipped with a message (exit 0).
Without a CUDA GPU (or with ``--smoke``) this runs a smoke instead: a tiny conv net built here
(``--model tinynet``, no torchvision needed) on tiny inputs, on CPU under Triton's interpreter, two
steps per variant (warm-up and one more), compiled variants with the ``aot_eager`` backend; it checks
the code path and the losses, and no time is meaningful (``step_ms`` is left empty).
"""

import argparse
import copy
import csv
import dataclasses
import gc
import math
import os
import signal
import statistics
import sys
import time

from . import start_smoke

COLUMNS = ("model", "config", "variant", "batch", "step_ms")
VARIANTS = ("torch", "bn_triton", "torch_compile", "bn_triton_compile")
TINY = "tinynet"
NO_TORCHVISION = "torchvision is not installed: pip install torchvision; skipping the end-to-end step"


@dataclasses.dataclass(frozen=True)
class Config:
    name: str
    autocast_bf16: bool
    channels_last: bool
    batch: int


CONFIGS = {
    "bf16_cl": Config("bf16_cl", autocast_bf16=True, channels_last=True, batch=128),
    "fp32_nchw": Config("fp32_nchw", autocast_bf16=False, channels_last=False, batch=64),
}
# First-step loss of a variant against torch eager's, relative. fp32: both sides compute BN in fp32
# (5e-5 seen on an H100). bf16 autocast: every conv output is rounded to bf16 (2^-8) and the rounding
# differs wherever BN's output does by one ulp; 2e-2 is about 5 bf16 ulps of the loss. The smoke's
# allowance is looser: the interpreter converts to bf16 by truncation, not rounding
# (shared/docs/platform-notes.md, "Interpreter fidelity").
LOSS_RTOL = {"bf16_cl": 2e-2, "fp32_nchw": 1e-3}
SMOKE_LOSS_RTOL = {"bf16_cl": 1e-1, "fp32_nchw": 1e-3}
SPEEDUP_PAIRS = (("torch", "bn_triton"), ("torch_compile", "bn_triton_compile"))


def parse_args(argv):
    p = argparse.ArgumentParser(
        prog="python -m bench.e2e", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--model", help=f"a torchvision.models name, or {TINY} (built here) (default resnet50; smoke: {TINY})"
    )
    p.add_argument("--configs", help=f"comma-separated from {', '.join(CONFIGS)} (default all)")
    p.add_argument("--variants", help=f"comma-separated from {', '.join(VARIANTS)} (default all)")
    p.add_argument("--steps", type=int, help="timed steps per variant (default 20; smoke 1)")
    p.add_argument("--warmup", type=int, help="warm-up steps of an eager variant, first included (default 5; smoke 1)")
    p.add_argument(
        "--compile-warmup",
        type=int,
        help="warm-up steps of a compiled variant, the compiling one included (default 3; smoke 1)",
    )
    p.add_argument("--batch", type=int, help="batch size for every config (default: the config's; smoke 2)")
    p.add_argument("--image-size", type=int, help="input height and width (default 224; smoke 8)")
    p.add_argument("--compile-backend", help="torch.compile backend (default inductor; smoke aot_eager)")
    p.add_argument("--compile-mode", help="torch.compile mode (default: torch's default)")
    p.add_argument("--budget-s", type=float, help="start no new variant after this many seconds")
    p.add_argument("--out", help="folder for e2e.csv (default: none written)")
    p.add_argument("--md", help="also write the table as Markdown to this file")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--smoke", action="store_true", help=f"the {TINY} smoke, no timing (the default without a GPU)")
    return p.parse_args(argv)


def parse_list(text, allowed, what) -> list:
    names = [t.strip() for t in text.split(",") if t.strip()]
    bad = [n for n in names if n not in allowed]
    if bad or not names:
        raise ValueError(f"unknown {what} {','.join(bad) or repr(text)}: choose from {', '.join(allowed)}")
    return names


def tiny_net(num_classes: int = 10):
    """A small ResNet-like net with torch BatchNorm layers: stem conv-BN-ReLU, one residual block
    (conv-BN-ReLU-conv-BN, add, ReLU), average pool, then a BatchNorm1d on the features and a linear
    head, so the smoke covers 4-D and 2-D batch norm and BN before an add."""
    import torch
    from torch import nn

    class TinyNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU())
            self.conv1 = nn.Conv2d(8, 8, 3, padding=1, bias=False)
            self.bn1 = nn.BatchNorm2d(8)
            self.conv2 = nn.Conv2d(8, 8, 3, padding=1, bias=False)
            self.bn2 = nn.BatchNorm2d(8)
            self.pool = nn.AdaptiveAvgPool2d(1)
            self.bn_feat = nn.BatchNorm1d(8)
            self.fc = nn.Linear(8, num_classes)

        def forward(self, x):
            x = self.stem(x)
            y = torch.relu(self.bn1(self.conv1(x)))
            x = torch.relu(x + self.bn2(self.conv2(y)))
            return self.fc(self.bn_feat(torch.flatten(self.pool(x), 1)))

    return TinyNet()


def build_model(name: str):
    """(model, number of classes); None where torchvision is missing."""
    if name == TINY:
        return tiny_net(), 10
    try:
        import torchvision.models
    except ImportError:
        return None
    builder = getattr(torchvision.models, name, None)
    if builder is None or not callable(builder):
        raise ValueError(f"torchvision.models has no model {name!r}")
    model = builder()
    return model, model.fc.out_features if hasattr(model, "fc") else 1000


@dataclasses.dataclass
class Result:
    config: str
    variant: str
    batch: int
    step_ms: float | None = None  # median; None when not timed (smoke)
    steps_ms: list = dataclasses.field(default_factory=list)
    first_loss: float | None = None
    seconds: float = 0.0  # wall time of the whole variant, warm-up (compiles) included
    error: str | None = None


class Runner:
    def __init__(self, args, device, smoke: bool, model_name: str, base_model, num_classes: int):
        self.args, self.device, self.smoke = args, device, smoke
        self.model_name, self.base, self.num_classes = model_name, base_model, num_classes
        self.batches: dict = {}

    def sync(self):
        import torch

        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def inputs(self, cfg: Config, batch: int, size: int) -> list:
        """Three batches of random images and labels (seeded, so every variant of a config sees the
        same first batch), made before timing and used in turn."""
        import torch

        if cfg.name not in self.batches:
            gen = torch.Generator().manual_seed(self.args.seed + 1000 * len(self.batches) + 1)
            pool = []
            for _ in range(3):
                x = torch.randn(batch, 3, size, size, generator=gen).to(self.device)
                if cfg.channels_last:
                    x = x.contiguous(memory_format=torch.channels_last)
                t = torch.randint(0, self.num_classes, (batch,), generator=gen).to(self.device)
                pool.append((x, t))
            self.batches[cfg.name] = pool
        return self.batches[cfg.name]

    def run(self, cfg: Config, variant: str, batch: int, size: int, warmup: int, steps: int) -> Result:
        """One variant: fresh copy of the model, warm-up, timed steps; the model, its optimizer and
        (compiled) its graphs are dropped before returning."""
        import torch

        res = Result(cfg.name, variant, batch)
        t_start = time.monotonic()
        try:
            self._train(res, cfg, variant, batch, size, warmup, steps)
        except Exception as exc:  # noqa: BLE001  (reported in the table; a compile failure is not ours)
            first = str(exc).splitlines()[0] if str(exc) else ""
            res.error = f"{type(exc).__name__}: {first}"[:300]
        finally:
            if variant.endswith("_compile"):
                torch._dynamo.reset()
            gc.collect()
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
        res.seconds = time.monotonic() - t_start
        return res

    def _train(self, res: Result, cfg: Config, variant: str, batch: int, size: int, warmup: int, steps: int):
        import torch
        import torch.nn.functional as F

        import bn_triton

        model = copy.deepcopy(self.base).to(self.device)
        if cfg.channels_last:
            model = model.to(memory_format=torch.channels_last)
        if variant.startswith("bn_triton"):
            bn_triton.convert_batchnorm(model)
        model.train()
        fn = model
        if variant.endswith("_compile"):
            kw = {"backend": self.args.compile_backend}
            if self.args.compile_mode:
                kw["mode"] = self.args.compile_mode
            fn = torch.compile(model, **kw)
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        pool = self.inputs(cfg, batch, size)
        autocast = torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=cfg.autocast_bf16)

        def step(i):
            x, t = pool[i % len(pool)]
            with autocast:
                loss = F.cross_entropy(fn(x), t)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            return loss

        res.first_loss = float(step(0).detach())  # same weights and batch for every variant
        for i in range(1, max(warmup, 1)):
            step(i)
        self.sync()
        for i in range(steps):
            t0 = time.perf_counter()
            step(i)
            self.sync()
            res.steps_ms.append((time.perf_counter() - t0) * 1e3)
        if not self.smoke and res.steps_ms:
            res.step_ms = statistics.median(res.steps_ms)


def write_csv(path: str, model: str, results: list) -> None:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(COLUMNS)
        for r in results:
            if r.error is None:
                w.writerow([model, r.config, r.variant, r.batch, "" if r.step_ms is None else f"{r.step_ms:.3f}"])


def loss_checks(results: list, smoke: bool) -> list:
    """(config, variant, first loss, relative difference to torch eager's, allowed, ok) per variant."""
    rtol = SMOKE_LOSS_RTOL if smoke else LOSS_RTOL
    ref = {r.config: r.first_loss for r in results if r.variant == "torch" and r.first_loss is not None}
    out = []
    for r in results:
        if r.variant == "torch" or r.first_loss is None or r.config not in ref:
            continue
        base = ref[r.config]
        rel = abs(r.first_loss - base) / max(abs(base), 1e-12)
        ok = math.isfinite(r.first_loss) and rel <= rtol[r.config]
        out.append((r.config, r.variant, r.first_loss, rel, rtol[r.config], ok))
    return out


def table(
    model: str, results: list, skipped: list, smoke: bool, device_name: str, why: str = "time budget spent"
) -> str:
    by = {(r.config, r.variant): r for r in results}
    lines = [
        f"## One training step of {model} on {device_name} (forward, loss, backward, SGD step)",
        "",
    ]
    if smoke:
        lines += ["Smoke (no GPU or --smoke): the code path and the losses only; no time is meaningful.", ""]
    lines += [
        "| config | variant | batch | step ms | speedup | first loss | warm-up + steps s |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in results:
        speedup = ""
        for base, ours in SPEEDUP_PAIRS:
            b = by.get((r.config, base))
            if r.variant == ours and r.step_ms and b is not None and b.step_ms:
                speedup = f"{b.step_ms / r.step_ms:.2f}x"
        ms = "error" if r.error else ("-" if r.step_ms is None else f"{r.step_ms:.2f}")
        loss = "" if r.first_loss is None else f"{r.first_loss:.5f}"
        lines.append(f"| {r.config} | {r.variant} | {r.batch} | {ms} | {speedup} | {loss} | {r.seconds:.1f} |")
    lines += [
        "",
        "speedup: torch step time / bn_triton step time, eager against eager and compiled against "
        "compiled (> 1: bn_triton faster).",
    ]
    checks = loss_checks(results, smoke)
    if checks:
        lines += ["", "First-step loss against torch eager's (same weights, same batch):", ""]
        for cfg, variant, loss, rel, tol, ok in checks:
            verdict = "ok" if ok else ("DISAGREES" if variant.startswith("bn_triton") else "differs (not ours)")
            lines.append(
                f"- {cfg} {variant}: loss {loss:.6f}, relative difference {rel:.2e} (allowed {tol:g}): {verdict}"
            )
    errors = [r for r in results if r.error]
    if errors:
        lines += ["", "Errors:", ""] + [f"- {r.config} {r.variant}: {r.error}" for r in errors]
    if skipped:
        lines += ["", f"Not run ({why}): " + ", ".join(f"{c} {v}" for c, v in skipped)]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    import torch

    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        configs = parse_list(args.configs, CONFIGS, "config") if args.configs else list(CONFIGS)
        variants = parse_list(args.variants, VARIANTS, "variant") if args.variants else list(VARIANTS)
    except ValueError as exc:
        print(f"python -m bench.e2e: {exc}", file=sys.stderr)
        return 2
    cuda = torch.cuda.is_available()
    smoke = args.smoke or not cuda
    model_name = args.model or (TINY if smoke else "resnet50")
    start_smoke(
        cuda,
        smoke,
        (
            "No CUDA GPU: running the end-to-end smoke on CPU under Triton's interpreter instead",
            "(the code path and the losses only; no time is meaningful, step_ms is left empty).",
        ),
        "--smoke: the code path and the losses only; no time is reported.",
    )

    torch.manual_seed(args.seed)  # the initial weights, shared by every variant
    try:
        built = build_model(model_name)
    except ValueError as exc:
        print(f"python -m bench.e2e: {exc}", file=sys.stderr)
        return 2
    if built is None:
        print(NO_TORCHVISION)
        return 0
    base, num_classes = built

    if args.compile_backend is None:
        args.compile_backend = "aot_eager" if smoke else "inductor"
    steps = args.steps if args.steps is not None else (1 if smoke else 20)
    warmup = args.warmup if args.warmup is not None else (1 if smoke else 5)
    cwarm = args.compile_warmup if args.compile_warmup is not None else (1 if smoke else 3)
    size = args.image_size or (8 if smoke else 224)
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    if cuda and not smoke:
        torch.backends.cudnn.benchmark = True
    device_name = torch.cuda.get_device_name(device) if cuda else "cpu (Triton interpreter)"
    runner = Runner(args, device, smoke, model_name, base, num_classes)

    # Eager variants of every config first (seconds each), then the compiled ones (up to a minute
    # each to compile), config by config so that a budget leaves whole pairs; within a config, in
    # the order given.
    jobs = [(c, v) for c in configs for v in variants if not v.endswith("_compile")]
    jobs += [(c, v) for c in configs for v in variants if v.endswith("_compile")]
    print(
        f"device: {device_name}; model {model_name}; {len(jobs)} runs ({', '.join(configs)} x "
        f"{', '.join(variants)}); {steps} timed steps after {warmup} warm-up (compiled: {cwarm}); "
        f"compile backend {args.compile_backend}" + (f"; budget {args.budget_s:g} s" if args.budget_s else "")
    )

    def on_term(signum, frame):  # `timeout` sends SIGTERM: keep what was measured
        raise KeyboardInterrupt

    try:
        old_handler = signal.signal(signal.SIGTERM, on_term)
    except ValueError:  # not the main thread (a caller's worker): no handler, no partial results
        old_handler = None
    t0 = time.monotonic()
    results, skipped, interrupted = [], [], False
    csv_path = os.path.join(args.out, "e2e.csv") if args.out else None
    if args.out:
        os.makedirs(args.out, exist_ok=True)
    try:
        for i, (cname, variant) in enumerate(jobs):
            if args.budget_s is not None and time.monotonic() - t0 > args.budget_s:
                skipped = jobs[i:]
                break
            cfg = CONFIGS[cname]
            batch = args.batch or (2 if smoke else cfg.batch)
            w = cwarm if variant.endswith("_compile") else warmup
            r = runner.run(cfg, variant, batch, size, w, steps)
            results.append(r)
            status = r.error or ("not timed" if r.step_ms is None else f"{r.step_ms:.2f} ms")
            print(
                f"{time.monotonic() - t0:7.1f}s  {cname:9s} {variant:17s} batch {batch}: {status} "
                f"(first loss {r.first_loss}, {r.seconds:.1f} s)",
                flush=True,
            )
            if csv_path:
                write_csv(csv_path, model_name, results)  # after every run: a timeout keeps the rest
    except KeyboardInterrupt:
        interrupted = True
        done = {(r.config, r.variant) for r in results}
        skipped = [j for j in jobs if j not in done]
    finally:
        if old_handler is not None:
            signal.signal(signal.SIGTERM, old_handler)

    why = "interrupted" if interrupted else "time budget spent"
    text = table(model_name, results, skipped, smoke, device_name, why)
    if interrupted:
        text += "\n(interrupted: partial results)\n"
    if csv_path:
        write_csv(csv_path, model_name, results)
        text += f"\nWrote {csv_path}\n"
    if args.md:
        with open(args.md, "w") as f:
            f.write(text)
    print()
    print(text, end="")
    if interrupted:
        return 130
    ours_bad = [r for r in results if r.variant.startswith("bn_triton") and r.error]
    ours_bad += [c for c in loss_checks(results, smoke) if c[1].startswith("bn_triton") and not c[5]]
    return 1 if ours_bad else 0


if __name__ == "__main__":
    sys.exit(main())
