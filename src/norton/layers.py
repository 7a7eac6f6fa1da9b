"""What each layer of a (compressed) model is now: dense or decomposed, at which rank, how wide.

``norton info --layers`` prints this table. It is read from the model itself (the
blocks in it and their shapes), so it says the same for a model compressed by
:func:`norton.auto_compress`, by hand, or rebuilt by :func:`norton.load`; widths are
compared with the model before its first norton operation when that is known.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from torch import nn

from norton.decomposition.cpd_block import CPDBlock
from norton.decomposition.methods import BLOCK_TYPES

_METHOD_OF_BLOCK = {
    "CPDBlock": "cp-filter",
    "Tucker2Conv": "tucker2",
    "LayerCPConv": "cp-layer",
    "SpatialSVDConv": "svd",
    "LowRankConv1x1": "svd",
    "LowRankLinear": "svd",
}


@dataclass(frozen=True)
class LayerSummary:
    """One compressible layer: its method (``"dense"`` or a decomposition), rank and widths."""

    name: str
    method: str
    rank: Any  # None for dense layers, an int, or [R1, R2] for Tucker-2
    in_channels: int
    out_channels: int
    original_out_channels: int | None  # None when the original is unknown or has no such layer

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _widths(module: nn.Module) -> tuple[int, int] | None:
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    inputs, outputs = getattr(module, "in_channels", None), getattr(module, "out_channels", None)
    return (int(inputs), int(outputs)) if inputs is not None and outputs is not None else None


def layer_summaries(model: nn.Module) -> list[LayerSummary]:
    """Every decomposed block and every dense conv / linear outside blocks, in model order."""
    from norton.plan import original_model

    try:
        original = dict(original_model(model).named_modules())
    except Exception:  # noqa: BLE001 - the original is a nicety here: without it, widths stand alone
        original = {}
    inside: set[str] = set()
    rows = []
    for name, module in model.named_modules():
        if any(name.startswith(prefix + ".") for prefix in inside):
            continue
        if isinstance(module, BLOCK_TYPES):
            inside.add(name)
            method = _METHOD_OF_BLOCK.get(type(module).__name__, type(module).__name__)
            rank: Any = module.rank if not isinstance(module, CPDBlock) else int(module.rank)
            rank = list(rank) if isinstance(rank, tuple) else int(rank)
        elif isinstance(module, (nn.Conv2d, nn.Linear)):
            method, rank = "dense", None
        else:
            continue
        widths = _widths(module)
        if widths is None:
            continue
        before = _widths(original[name]) if name in original else None
        rows.append(LayerSummary(name, method, rank, widths[0], widths[1], before[1] if before else None))
    return rows


def format_layer_table(rows: list[LayerSummary]) -> str:
    """A fixed-width table: layer, method, rank, in -> out (of the original's out)."""
    lines = [f"{'layer':<28} {'method':<10} {'rank':>7}  {'in':>5} -> {'out':<5} {'of':>5}"]
    for row in rows:
        rank = "-" if row.rank is None else "x".join(map(str, row.rank)) if isinstance(row.rank, list) else str(row.rank)
        of = "" if row.original_out_channels is None else str(row.original_out_channels)
        lines.append(f"{row.name:<28} {row.method:<10} {rank:>7}  {row.in_channels:>5} -> {row.out_channels:<5} {of:>5}")
    return "\n".join(lines)
