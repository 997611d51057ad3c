"""What gets measured: shapes, dtype/layout configurations, passes, workloads.

Suite v1 is fixed so that numbers compare over time; change it only by adding a v2 next to it.
"""

import dataclasses
from collections.abc import Callable

import torch

from . import traffic

SUITE_VERSION = "v1"

# ResNet-50's BatchNorm2d layers as (C, H=W) at batch 256: the stem, then each stage's widths.
RESNET50_BATCH = 256
RESNET50_BN = [
    (64, 112), (64, 56), (256, 56), (128, 56), (128, 28), (512, 28),
    (256, 28), (256, 14), (1024, 14), (512, 14), (512, 7), (2048, 7),
]  # fmt: skip
# BatchNorm1d on (N, C): many rows/medium C, very many rows/few C, few rows/wide C.
BN1D = [(8192, 1024), (65536, 256), (2048, 4096)]

PASSES = ("train_fwd", "eval_fwd", "bwd", "fwd_bwd")

# --quick: the two ends of ResNet-50 (large maps/few channels, small maps/many channels) and one
# BatchNorm1d shape, in the two configurations training mostly uses; runs in about 2 minutes on an
# H100, most of it torch.compile compiling (two graphs per case).
QUICK_SHAPES = ("64@56", "2048@7", "8192x1024")
QUICK_CONFIGS = ("fp32-nchw", "bf16-cl")


@dataclasses.dataclass(frozen=True)
class Shape:
    name: str
    dims: tuple


@dataclasses.dataclass(frozen=True)
class Config:
    """A dtype and a memory layout; the layout applies to inputs with spatial dimensions only."""

    dtype: torch.dtype
    channels_last: bool


_DTYPE_KEYS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# Keys: dtype-layout, the layout "nchw" (contiguous) or "cl" (channels_last).
CONFIGS = {
    k: Config(_DTYPE_KEYS[k.split("-")[0]], k.endswith("-cl"))
    for k in ("fp32-nchw", "bf16-cl", "fp16-cl", "fp32-cl", "bf16-nchw", "fp16-nchw")
}
DEFAULT_CONFIGS = ("fp32-nchw", "bf16-cl", "fp16-cl")

DTYPE_NAMES = {d: str(d).removeprefix("torch.") for d in _DTYPE_KEYS.values()}  # in the rows: "bfloat16"


@dataclasses.dataclass(frozen=True)
class Case:
    """One input to benchmark: a shape in a dtype and an actual memory layout."""

    shape: Shape
    dtype: torch.dtype
    # "NCHW" (contiguous 4-D), "contiguous" (other ranks), "channels_last" (4-D/5-D), or "NC" (2-D:
    # no spatial layout to choose)
    layout: str

    @property
    def dtype_name(self) -> str:
        return DTYPE_NAMES[self.dtype]

    @property
    def label(self) -> str:
        return f"{self.dtype_name}/{self.layout} {self.shape.name}"


def _resnet_shape(c: int, hw: int) -> Shape:
    return Shape(f"{c}@{hw}", (RESNET50_BATCH, c, hw, hw))


SUITE_V1 = [_resnet_shape(c, hw) for c, hw in RESNET50_BN] + [Shape(f"{n}x{c}", (n, c)) for n, c in BN1D]
SUITE_BY_NAME = {s.name: s for s in SUITE_V1}

# The CPU smoke (Triton interpreter): tiny, odd sizes; three cases cover both kernel layouts,
# all three dtypes and a 2-D input, and keep torch.compile's CPU compile time low.
SMOKE_SHAPE_4D = Shape("4x6x5x5", (4, 6, 5, 5))
SMOKE_SHAPE_2D = Shape("24x10", (24, 10))
SMOKE_CONFIGS = (("fp32-nchw", "bf16-cl"), ("fp16-nchw",))  # of the 4-D shape, of the 2-D shape


def smoke_cases(workload=None) -> list:
    """The smoke's cases, or those of ``workload``: the ones it applies to, or its own smoke config."""
    if workload is not None and workload.smoke_config is not None:
        return make_cases([SMOKE_SHAPE_4D], [workload.smoke_config])
    cases = make_cases([SMOKE_SHAPE_4D], SMOKE_CONFIGS[0]) + make_cases([SMOKE_SHAPE_2D], SMOKE_CONFIGS[1])
    return cases if workload is None else [c for c in cases if workload.applies(c)]


def parse_shape(token: str) -> Shape:
    """'C@HW' (ResNet-style, N=256), a suite name, or explicit dims 'NxC' / 'NxCxL' / 'NxCxHxW'."""
    token = token.strip()
    if token in SUITE_BY_NAME:
        return SUITE_BY_NAME[token]
    if "@" in token:
        c, hw = token.split("@")
        return _resnet_shape(int(c), int(hw))
    dims = token.lower().split("x")
    if len(dims) < 2 or not all(d.isdigit() and int(d) > 0 for d in dims):
        raise ValueError(f"bad shape {token!r}: use C@HW (batch {RESNET50_BATCH}) or NxC[xHxW], all positive")
    return Shape(token.lower(), tuple(map(int, dims)))


def parse_list(value: str, allowed, what: str) -> list:
    items = [v.strip() for v in value.split(",") if v.strip()]
    for item in items:
        if item not in allowed:
            raise ValueError(f"unknown {what} {item!r}; choose from {', '.join(allowed)}")
    return items


def layout_of(shape: Shape, channels_last: bool) -> str:
    rank = len(shape.dims)
    if rank == 2:
        return "NC"
    if channels_last and rank in (4, 5):  # torch has channels_last formats for 4-D and 5-D only
        return "channels_last"
    return "NCHW" if rank == 4 else "contiguous"


def make_cases(shapes, config_keys) -> list:
    """Cross shapes with configurations. 2-D shapes have no layout to choose: each runs once per
    dtype, with layout 'NC', however many layouts of that dtype were asked for (likewise 3-D
    shapes, which have no channels_last format)."""
    cases = [Case(s, CONFIGS[k].dtype, layout_of(s, CONFIGS[k].channels_last)) for k in config_keys for s in shapes]
    return list(dict.fromkeys(cases))  # in order, each once


@dataclasses.dataclass(frozen=True)
class Workload:
    """One kind of row: what every implementation computes, act(BN(x) + residual), and on which cases.

    ``activation`` is a canonical activation of bn_triton/activations.py (None: BN alone); with
    ``residual`` the runner passes one (x's dtype and layout, requiring grad: a block's identity
    input). impls.py binds both into every implementation: bn_triton computes them in its fused
    epilogue, torch's rows as BN, then the add, then the activation (impls.torch_bn)."""

    prefix: str  # of the pass names in the rows
    traffic: dict  # pass -> bytes as a multiple of the tensor's (traffic.py)
    residual: bool
    activation: str | None = None
    applies: Callable = lambda case: True  # which cases get this workload's rows
    # The one smoke config (suite.CONFIGS key, on SMOKE_SHAPE_4D) the smoke runs it on; None: every
    # smoke case it applies to.
    smoke_config: str | None = None


def _conv_net(case) -> bool:
    """The 4-D (N, C, H, W) cases: where conv nets put BN -> activation."""
    return len(case.shape.dims) == 4


PLAIN = Workload("", traffic.TRAFFIC_FACTOR, residual=False)
# BN -> add -> ReLU, a ResNet block's end.
FUSED = Workload("fused_", traffic.FUSED_TRAFFIC_FACTOR, residual=True, activation="relu", applies=_conv_net)
# BN -> SiLU (EfficientNet, YOLO) and BN -> Hardswish (MobileNetV3), no residual. The smoke runs each
# on one case, between them both kernel layouts and both precisions: on both of its 4-D cases each
# the smoke took 37 s instead of 22 s on a 2-core machine (each case compiles two torch.compile
# graphs on CPU).
SILU = Workload(
    "silu_", traffic.SILU_TRAFFIC_FACTOR, residual=False, activation="silu", applies=_conv_net, smoke_config="fp32-nchw"
)
HARDSWISH = Workload(
    "hardswish_",
    traffic.HARDSWISH_TRAFFIC_FACTOR,
    residual=False,
    activation="hardswish",
    applies=_conv_net,
    smoke_config="bf16-cl",
)
WORKLOADS = (PLAIN, FUSED, SILU, HARDSWISH)  # in the order they run
