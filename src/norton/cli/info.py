"""``norton info``: what a model file holds (architecture, compression plan, metadata, MACs, params)."""
from __future__ import annotations

import argparse
from typing import Any

from norton.cli import _options as options


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "info",
        help="show what a model file or training checkpoint holds",
        description="Print the architecture, the compression plan (decomposition ranks, pruned layers), "
        "the metadata and the MACs/params of a norton model file or training checkpoint.",
    )
    options.add_ckpt_option(parser, required=True, help="a norton model file or training checkpoint")
    parser.add_argument("--input-size", "--input_size", dest="input_size", type=int, default=None,
                        help="image side for MACs (default: the architecture's or the dataset's)")
    parser.add_argument("--layers", action="store_true",
                        help="also print every layer: dense or decomposed (method, rank) and its width")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    info = describe(args.ckpt, input_size=args.input_size, layers=args.layers)
    if args.json:
        options.print_json(info)
        return 0
    print(f"file:          {info['file']} ({info['kind']})")
    print(f"architecture:  {info['architecture'].get('name')}  {info['architecture'].get('kwargs')}")
    for step in info["plan"]:
        print(f"plan:          {step}")
    if not info["plan"]:
        print("plan:          (none: the architecture as built)")
    print(f"input:         {tuple(info['input_size'])}")
    print(f"MACs:          {info['macs']:,}")
    print(f"params:        {info['params']:,}")
    for key, value in info["metadata"].items():
        print(f"{key + ':':<14} {value}")
    if args.layers:
        from norton.layers import LayerSummary, format_layer_table

        print()
        print(format_layer_table([LayerSummary(**row) for row in info["layers"]]))
    return 0


def describe(path: str, *, input_size: int | None = None, layers: bool = False) -> dict[str, Any]:
    """Plain-data description of a model file, as ``norton info --json`` prints it."""
    from norton.limits import check_image_side

    if input_size is not None:  # before torch is imported and the file read: a 100,000-pixel side would not fit
        check_image_side(input_size)
    from norton.complexity import count_complexity
    from norton.plan import describe_plan, plan_of
    from norton.serialization import read_model_file
    loaded = read_model_file(path)
    model = loaded.model
    architecture = dict(getattr(model, "norton_architecture", None) or {})
    side = input_size or _default_side(architecture.get("name"), loaded.trained_with.get("dataset"))
    channels = int(architecture.get("kwargs", {}).get("in_channels") or 3)
    complexity = count_complexity(model, (channels, side, side))
    metadata = {k: v for k, v in loaded.trained_with.items() if _is_small(v)}
    metadata.update({k: v for k, v in loaded.details.items() if _is_small(v)})
    extra: dict[str, Any] = {}
    if layers:
        from norton.layers import layer_summaries

        extra["layers"] = [row.as_dict() for row in layer_summaries(model)]
    return {
        **extra,
        "file": str(path), "kind": loaded.kind, "architecture": architecture,
        "plan": describe_plan(plan_of(model)),
        "input_size": [channels, side, side], "macs": int(complexity.macs), "params": int(complexity.params),
        "metadata": metadata,
    }


def _default_side(arch: str | None, dataset: str | None) -> int:
    if dataset == "imagenet":
        return 224
    if dataset in ("cifar10", "cifar100", "fashion-mnist", "synthetic"):
        return 32
    if arch and not arch.startswith("torchvision."):
        from norton.models import get_model_entry

        return get_model_entry(arch).input_size
    return 224


def _is_small(value: Any) -> bool:
    return isinstance(value, (str, int, float, bool, type(None))) or (
        isinstance(value, (list, dict)) and len(repr(value)) < 400
    )
