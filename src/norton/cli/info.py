"""``norton info``: what a model file holds (architecture, compression plan, metadata, MACs, params)."""
from __future__ import annotations

import argparse
from collections import Counter
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
    parser.add_argument("--input-size", dest="input_size", type=int, default=None,
                        help="image side for MACs (default: the architecture's or the dataset's)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    info = describe(args.ckpt, input_size=args.input_size)
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
    return 0


def describe(path: str, *, input_size: int | None = None) -> dict[str, Any]:
    """Plain-data description of a model file, as ``norton info --json`` prints it."""
    import torch

    from norton.complexity import count_complexity

    model, trained_with = options.load_model_file(path)
    content = torch.load(path, map_location="cpu", weights_only=True)
    kind = "training checkpoint" if options.is_training_checkpoint(content) else "norton model file"
    architecture = dict(getattr(model, "norton_architecture", None) or {})
    dataset = trained_with.get("dataset") or (content.get("metadata") or {}).get("dataset")
    side = input_size or _default_side(architecture.get("name"), dataset)
    complexity = count_complexity(model, (3, side, side))
    metadata = {k: v for k, v in (content.get("metadata") or {}).items() if _is_small(v)}
    if options.is_training_checkpoint(content):
        metadata.update(epoch=content.get("epoch"), best=content.get("best"))
    return {
        "file": str(path), "kind": kind, "architecture": architecture,
        "plan": [_summarise(step) for step in getattr(model, "norton_plan", [])],
        "input_size": [3, side, side], "macs": int(complexity.macs), "params": int(complexity.params),
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


def _summarise(step: dict[str, Any]) -> str:
    op = step.get("op")
    if op == "decompose":
        ranks = Counter(step["ranks"].values())
        return f"decompose {len(step['ranks'])} layers (ranks: " + ", ".join(f"{r}x{n}" for r, n in sorted(ranks.items())) + ")"
    if op == "prune":
        removed = step.get("removed", {})
        total = sum(len(v) for v in removed.values())
        return f"prune {total} output channels in {len(removed)} layers (criterion {step.get('criterion', '?')})"
    return f"{op}: {', '.join(sorted(k for k in step if k != 'op'))}"


def _is_small(value: Any) -> bool:
    return isinstance(value, (str, int, float, bool, type(None))) or (
        isinstance(value, (list, dict)) and len(repr(value)) < 400
    )
