"""The direct launch path (bn_triton/_launcher.py), checked and timed without a GPU.

    python -m bench.direct_launch [--calls N]

On the installed Triton, for the launches of a training forward and backward and an eval forward
(32x64x14x14 fp32, NCHW, as on an H100): the CUDA driver is replaced by a stand-in, so that Triton's
own ``fn[grid](...)`` really binds, specializes and compiles each kernel for sm_90 and calls its
compiled kernel's launcher (Triton's own Python ``CudaLauncher.__call__``), whose final C call is
recorded instead of made. Then the same ``Launch`` goes direct, and its C call is recorded too. Per
launch it prints and checks:

* that the direct C call gets exactly the arguments Triton's own path gives it (the launch metadata
  and hook slots, which an empty hook chain makes no-ops, as None);
* the Python calls from the plan's ``launch(...)`` to that C call (at most 2);
* the Python time per direct launch, the C call excluded (a few microseconds: a Python call).

Exit status 0 when every launch passes, 1 when one fails, 0 with a line saying why where the
installed Triton has no direct path. Run it in venvs with other Tritons to check those versions.
"""

import argparse
import os
import sys
import time
import types
from unittest import mock

os.environ["TRITON_INTERPRET"] = "0"  # compiled kernels (JITFunctions), before bn_triton is imported

import torch  # noqa: E402

from bench import counts  # noqa: E402

CHECK_FILE = __file__  # its stand-ins' Python is not counted
SHAPE = (32, 64, 14, 14)


class _Recorder:
    """Stands in for the C launcher: keeps the arguments of each call."""

    def __init__(self):
        self.calls = []

    def __call__(self, *args):
        self.calls.append(args)


def _fake_driver(recorder: _Recorder):
    """A CUDA driver for Triton that compiles for sm_90 and launches into ``recorder``."""
    from triton.backends.compiler import GPUTarget
    from triton.backends.nvidia import driver as nvidia

    class Launcher(nvidia.CudaLauncher):
        def __init__(self, src, metadata):  # no C module built: its launch is the recorder
            self.launch = recorder
            self.num_ctas = 1
            self.global_scratch_size = metadata.global_scratch_size
            self.global_scratch_align = metadata.global_scratch_align
            self.profile_scratch_size = metadata.profile_scratch_size
            self.profile_scratch_align = metadata.profile_scratch_align
            self.launch_cooperative_grid = metadata.launch_cooperative_grid
            self.launch_pdl = metadata.launch_pdl
            self.gsan_enabled = False
            self.arg_annotations, self.kernel_signature = "arg_annotations", "kernel_signature"

    utils = types.SimpleNamespace(
        load_binary=lambda name, kernel, shared, device: ("module", "function", 32, 0, 1024),
        get_device_properties=lambda device: {"max_shared_mem": 232448, "multiprocessor_count": 132},
    )
    return types.SimpleNamespace(
        get_current_device=lambda: 0,
        get_current_stream=lambda device: 0,
        get_current_target=lambda: GPUTarget("cuda", 90, 32),
        launcher_cls=Launcher,
        utils=utils,
    )


def _launches(device) -> list:
    """(name, Launch, pointers) for a training forward + backward and an eval forward."""
    from bn_triton import launch

    x = torch.randn(SHAPE)
    x_, geom = launch.canonical(x)
    C = SHAPE[1]
    acc, f32, i32 = torch.float32, torch.float32, torch.int32
    w, b, rm, rv = (torch.randn(C) for _ in range(4))
    mean, rstd, sums = torch.zeros(C), torch.ones(C), torch.zeros(2, C)
    out = []
    rs = dict(RUNNING_MEAN=rm, RUNNING_VAR=rv)
    stats = launch.stats(
        geom, device, launch.dtypes(X=f32, PART=acc, COUNTER=i32, MEAN=acc, RSTD=acc, **rs), 1e-5,
        launch.RunningSpec(1, 1, 0.1),
    )  # fmt: skip
    parts, tickets = torch.empty(stats.parts), torch.zeros(stats.tickets, dtype=i32)
    out.append(("stats", stats, dict(X=x_, PART=parts, COUNTER=tickets, MEAN=mean, RSTD=rstd, **rs)))
    normalize = dict(X=x_, Y=torch.empty_like(x_), MEAN=mean, SCALE=rstd, W=w, B=b)
    norm = launch.normalize(geom, device, launch.dtypes(**normalize), 1e-5, False, None)
    out.append(("normalize", norm, normalize))
    grad_sums = dict(DY=x_, X=x_, MEAN=mean, SCALE=rstd, SUM_DY=sums[0], SUM_DY_XHAT=sums[1], DW=w, DB=b, W=w)
    gs = launch.grad_sums(
        geom, device, launch.dtypes(PART=acc, COUNTER=i32, **grad_sums), 1e-5, False, None, False
    )  # fmt: skip
    out.append(("grad_sums", gs, dict(PART=torch.empty(gs.parts), COUNTER=tickets, **grad_sums)))
    grad_input = dict(DY=x_, X=x_, DX=torch.empty_like(x_), MEAN=mean, SCALE=rstd, W=w, SUM_DY=sums[0],
                      SUM_DY_XHAT=sums[1])  # fmt: skip
    gi = launch.grad_input(geom, device, launch.dtypes(**grad_input), 1e-5, True, 0, None, False)
    out.append(("grad_input", gi, grad_input))
    evaluate = dict(X=x_, Y=torch.empty_like(x_), MEAN=rm, SCALE=rv, W=w, B=b)
    ev = launch.normalize(geom, device, launch.dtypes(**evaluate), 1e-5, True, None)
    out.append(("eval normalize", ev, evaluate))
    return out


def _same(triton_call: tuple, direct_call: tuple, form_3_8: bool) -> list:
    """Where the direct C call differs from Triton's own, but for the launch metadata and hooks
    (Triton's: its metadata and two empty hook chains; the direct path's: None)."""
    slots = (8, 9, 10) if form_3_8 else (10, 11, 12)
    diffs = []
    if len(triton_call) != len(direct_call):
        return [f"{len(direct_call)} arguments, Triton passes {len(triton_call)}"]
    for i, (t, d) in enumerate(zip(triton_call, direct_call, strict=True)):
        if i in slots:
            if d is not None or (i != slots[0] and getattr(t, "calls", None)):
                diffs.append(f"slot {i}: {d!r}, Triton's {t!r}")
        elif not (t is d or (type(t) is type(d) and t == d)):
            diffs.append(f"slot {i}: {d!r}, Triton's {t!r}")
    return diffs


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--calls", type=int, default=20000, help="direct launches per timing loop")
    args = p.parse_args(argv)
    import triton
    from triton.runtime.driver import driver

    from bn_triton import _config, _launcher

    if not _launcher.ENABLED:
        print(f"no direct path for triton {triton.__version__}: its launches take Triton's own (correct, slower)")
        return 0
    recorder = _Recorder()
    device = torch.device("cuda", 0)
    patches = [
        mock.patch.object(driver, "_active", _fake_driver(recorder)),
        mock.patch.object(torch._C, "_cuda_getDevice", lambda: 0, create=True),
        mock.patch.object(torch._C, "_cuda_getCurrentRawStream", lambda index: 0, create=True),
        mock.patch.object(torch.cuda, "current_device", lambda: 0),
        mock.patch.object(_config, "sm_count", lambda index: 132),
        mock.patch.object(_config, "l2_bytes", lambda index: 50 * 2**20),
    ]
    for patch in patches:
        patch.start()
    failures = 0
    print(f"direct launches, triton {triton.__version__}, {'x'.join(map(str, SHAPE))} fp32 on a stand-in sm_90 GPU:")
    print(f"  {'launch':16s} {'C call':>10s} {'Python calls':>13s} {'us / launch':>12s}")
    try:
        _config._cuda_target.cache_clear()
        for name, ln, pointers in _launches(device):
            ln(**pointers)  # Triton's own path: binds, compiles, launches through its CudaLauncher
            direct_before = _launcher.DIRECT_LAUNCHES[0]
            calls = counts.python_calls(lambda ln=ln, pointers=pointers: ln(**pointers), excluded=(CHECK_FILE,))
            if _launcher.DIRECT_LAUNCHES[0] != direct_before + 1:
                print(f"  {name:16s} did not take the direct path")
                failures += 1
                continue
            triton_call, direct_call = recorder.calls[-2], recorder.calls[-1]
            diffs = _same(triton_call, direct_call, ln.form_3_8)
            t0 = time.perf_counter()
            for _ in range(args.calls):
                ln(**pointers)
            us = (time.perf_counter() - t0) / args.calls * 1e6
            ok = not diffs and calls <= 2
            failures += not ok
            print(f"  {name:16s} {'same' if not diffs else 'DIFFERS':>10s} {calls:13d} {us:12.2f}")
            for d in diffs:
                print(f"      {d}")
    finally:
        for patch in reversed(patches):
            patch.stop()
        _config._cuda_target.cache_clear()
    print("ok" if not failures else f"{failures} launch(es) failed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
