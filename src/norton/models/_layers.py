"""Pieces shared by the model families: compress-rate checking, pruned widths, decomposable 3x3 convs."""
from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from norton.compress_rate import parse_compress_rate
from norton.decomposition.cpd_block import CPDBlock
from norton.errors import UserError

CompressRate = str | Sequence[float] | None


def check_rank(rank: object) -> int:
    """``rank`` as an int >= 0 (0: dense convs, R > 0: rank-R CPDBlocks)."""
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 0:
        raise UserError(f"rank must be an integer >= 0 (0 means no decomposition), got {rank!r}")
    return rank


def check_positive(value: object, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise UserError(f"{name} must be a positive integer, got {value!r}")
    return value


def expand_compress_rate(compress_rate: CompressRate, slots: Sequence[str], model: str) -> list[float]:
    """One rate per slot: ``None`` is all zeros; a spec string is parsed; a list is validated.

    Shorter than ``len(slots)`` is an error. Longer is accepted only when the
    extra entries are all 0, so the reference's ``[0.]*100`` ("uncompressed")
    works for every model while a list meant for a deeper model is caught.
    """
    if compress_rate is None:
        return [0.0] * len(slots)
    rates = parse_compress_rate(compress_rate)
    if len(rates) < len(slots):
        raise UserError(
            f"{model} needs {len(slots)} compress rates (one per prunable position), got {len(rates)}; "
            f"see docs/models.md for what each entry truncates"
        )
    extra = rates[len(slots):]
    if any(extra):
        raise UserError(
            f"{model} reads {len(slots)} compress rates but got {len(rates)} with nonzero extra entries "
            f"{sorted(set(r for r in extra if r))}; drop them or use a list for the right model"
        )
    return rates[: len(slots)]


def pruned_width(width: int, rate: float, where: str) -> int:
    """``int(width * (1 - rate))``: the reference's truncation (floor), at least 1 channel."""
    kept = int(width * (1.0 - rate))
    if kept < 1:
        raise UserError(f"compress rate {rate} leaves no channel of {width} at {where}; use a smaller rate")
    return kept


def conv3x3(
    in_channels: int, out_channels: int, *, rank: int, stride: int = 1, bias: bool = False
) -> nn.Module:
    """A padded 3x3 convolution: ``nn.Conv2d`` when ``rank == 0``, else a rank-``rank`` CPDBlock."""
    if rank == 0:
        return nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=bias)
    return CPDBlock(in_channels, out_channels, rank, 3, stride=stride, padding=1, bias=bias)
