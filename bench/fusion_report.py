"""``python -m bench.fusion_report``: what ``bn_triton.fuse`` and ``bn_triton.convert_batchnorm`` make of
the models people train (MODELS: torchvision's and timm's), measured live.

Each model is built with random weights (nothing is downloaded), fused with an example input of
EXAMPLE_SHAPE (shapes propagate on fake tensors: no kernel runs, about a second a model), then
converted by ``convert_batchnorm``. One row a model: its BatchNorm layers, how many of them are ours
after ``convert_batchnorm`` and in the fused model, how many fused, by kind (the activation's
canonical string; "add+act" for BN -> add -> act, "add" for BN -> add alone), and why the rest were
left (``--reasons``). ``--markdown`` prints the table as markdown (docs/fusion.md holds one).
torchvision and timm are optional: the models of a library that cannot be imported are named as
skipped, with the reason, and the exit status stays 0.
"""

import argparse
import collections
import dataclasses
import importlib
import sys

# (label, library, name, keyword arguments): torchvision's through torchvision.models.get_model,
# timm's through timm.create_model, each with random weights.
MODELS = (
    ("torchvision mobilenet_v2", "torchvision", "mobilenet_v2", {}),
    ("torchvision mobilenet_v3_large", "torchvision", "mobilenet_v3_large", {}),
    ("torchvision efficientnet_b0", "torchvision", "efficientnet_b0", {}),
    ("torchvision mnasnet0_5", "torchvision", "mnasnet0_5", {}),
    ("torchvision resnet18", "torchvision", "resnet18", {}),
    ("torchvision resnet50", "torchvision", "resnet50", {}),
    ("torchvision regnet_y_400mf", "torchvision", "regnet_y_400mf", {}),
    ("timm resnet50", "timm", "resnet50", {}),
    ("timm efficientnet_b0", "timm", "efficientnet_b0", {}),
    ("timm mobilenetv3_large_100", "timm", "mobilenetv3_large_100", {}),
    ("timm regnety_002", "timm", "regnety_002", {}),
    ("timm cspdarknet53", "timm", "cspdarknet53", {}),
    ("timm cspresnet50", "timm", "cspresnet50", {}),
)
EXAMPLE_SHAPE = (2, 3, 224, 224)


def library(name: str):
    """The library's module, or the reason it cannot be imported (a string)."""
    try:
        return importlib.import_module(name)
    except Exception as exc:  # noqa: BLE001 - a broken install is reported as a missing one
        return f"{name} is not importable here ({type(exc).__name__}: {exc})"


def build(lib, library_name: str, name: str, kwargs: dict):
    """The model, with random weights."""
    if library_name == "torchvision":
        return lib.models.get_model(name, weights=None, **kwargs)
    return lib.create_model(name, pretrained=False, **kwargs)


@dataclasses.dataclass
class Row:
    """One model: its BatchNorm layers; how many are ours after convert_batchnorm and in the fused
    model; the fused layers' kinds; the others as (name, reason)."""

    model: str
    batchnorms: int
    converted: int
    ours_in_fused: int
    kinds: collections.Counter
    left: list

    @property
    def fused(self) -> int:
        return sum(self.kinds.values())


def measure(label: str, model, example) -> Row:
    """``fuse(model, example)`` (which leaves the model as it is), then ``convert_batchnorm(model)``
    (in place)."""
    from torch.nn.modules.batchnorm import _BatchNorm

    import bn_triton

    def counts(m):
        layers = [x for x in m.modules() if isinstance(x, _BatchNorm)]
        return len(layers), sum(type(x).__module__.startswith("bn_triton.") for x in layers)

    batchnorms, _ = counts(model)
    fused = bn_triton.fuse(model, example)
    report = fused.fusion_report
    _, ours_in_fused = counts(fused)
    _, converted = counts(bn_triton.convert_batchnorm(model))
    kinds = collections.Counter(kind for _, kind in report.fused)
    return Row(label, batchnorms, converted, ours_in_fused, kinds, list(report.left))


def kinds_text(kinds: collections.Counter) -> str:
    return ", ".join(f"{n} {kind}" for kind, n in kinds.most_common())


def table(rows: list, markdown: bool) -> str:
    head = ("model", "BatchNorms", "converted", "fused", "by kind")
    body = [(r.model, str(r.batchnorms), _converted(r), str(r.fused), kinds_text(r.kinds) or "-") for r in rows]
    if markdown:
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        return "\n".join(lines + ["| " + " | ".join(cells) + " |" for cells in body])
    widths = [max(len(cells[i]) for cells in [head, *body]) for i in range(len(head))]
    return "\n".join(
        "  ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)).rstrip() for cells in [head, *body]
    )


def _converted(row: Row) -> str:
    """convert_batchnorm's count; the fused model's beside it where they differ."""
    same = row.converted == row.ours_in_fused
    return str(row.converted) if same else f"{row.converted} ({row.ours_in_fused} in the fused model)"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m bench.fusion_report", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--markdown", action="store_true", help="the table as markdown")
    p.add_argument("--reasons", action="store_true", help="after the table, why each model's other layers were left")
    p.add_argument("--models", help="comma-separated labels' last words (e.g. resnet50,mnasnet0_5); default all")
    args = p.parse_args(argv)
    import torch

    wanted = set(args.models.split(",")) if args.models else None
    libs, rows, skipped = {}, [], []
    for label, library_name, name, kwargs in MODELS:
        if wanted is not None and name not in wanted:
            continue
        lib = libs.setdefault(library_name, library(library_name))
        if isinstance(lib, str):
            skipped.append((label, lib))
            continue
        torch.manual_seed(0)
        model = build(lib, library_name, name, kwargs)
        rows.append(measure(label, model, torch.randn(EXAMPLE_SHAPE)))
        print(f"measured {label}", file=sys.stderr, flush=True)
    versions = [f"torch {torch.__version__}"]
    versions += [f"{n} {m.__version__}" for n, m in libs.items() if not isinstance(m, str)]
    print(f"bn_triton.fuse on {EXAMPLE_SHAPE} example inputs ({', '.join(versions)})")
    if rows:
        print(table(rows, args.markdown))
    if args.reasons:
        for r in rows:
            if r.left:
                print(f"\n{r.model}: left {len(r.left)}")
                print("\n".join(f"  {name}: {reason}" for name, reason in r.left))
    by_reason = collections.defaultdict(list)
    for label, why in skipped:
        by_reason[why].append(label)
    for why, labels in by_reason.items():
        print(f"skipped {', '.join(labels)}: {why}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
