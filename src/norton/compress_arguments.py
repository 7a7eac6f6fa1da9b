"""The arguments of a compression run, checked without importing torch.

:func:`norton.pipeline.compress` and :func:`norton.workflow.run_compression` take an
order, an amount of pruning (``compress_rate``, ``ratio``, ``target_macs`` or, for
``auto_compress``, ``target_latency``), a rank and a
:class:`FineTune` recipe per stage. Everything about them that needs no model is checked
here, by :mod:`norton.limits`, so a typo on the command line is refused in a fraction of
a second, before torch is even imported, and leaves nothing behind.
"""
from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from norton.errors import UserError
from norton.limits import (
    check_distillation,
    check_epochs,
    check_int,
    check_learning_rate,
    check_rank,
    check_ratios,
    check_round_to,
    check_target_macs,
)
from norton.training.recipes import DISTILL_ALPHA, DISTILL_TEMPERATURE, check_recipe

ORDERS = ("decompose-prune", "prune-decompose", "auto")
AUTO_CRITERION = "l1"  # auto_compress's default criterion, and the compression runs' with order "auto"
PAPER_CRITERION = "pabs"


_MILLISECONDS = re.compile(r"\s*([0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)\s*ms\s*")


def parse_target_latency(value: Any) -> tuple[str, float]:
    """A latency budget: ``("fraction", f)`` for a number in (0, 1) (of the input model's latency),
    ``("ms", t)`` for milliseconds written with their unit (``"12ms"``, ``"12.5 ms"``).

    A bare number of 1 or more is refused: it would be ambiguous (a fraction cannot exceed 1,
    and a number of milliseconds must say so).
    """
    if isinstance(value, str):
        match = _MILLISECONDS.fullmatch(value)
        if match is None:
            try:
                value = float(value)
            except ValueError:
                raise UserError(f"target_latency must be a fraction in (0, 1) or milliseconds such as '12ms', "
                                f"got {value!r}") from None
        else:
            ms = float(match.group(1))
            if not (math.isfinite(ms) and ms > 0):
                raise UserError(f"target_latency in milliseconds must be positive, got {value!r}")
            return "ms", ms
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < 1:
        raise UserError(f"target_latency is a fraction of the model's latency in (0, 1), or milliseconds with "
                        f"their unit such as '12ms'; got {value!r}")
    return "fraction", float(value)


@dataclass
class FineTune:
    """Fine-tuning recipe of one stage (``epochs=0`` skips it).

    With ``distill=True`` the stage distils from the uncompressed input model (its teacher) at
    ``distill_alpha`` and ``distill_temperature`` (:mod:`norton.training.distillation`).
    """

    epochs: int = 1
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 5e-4
    warmup_epochs: float = 0.0
    label_smoothing: float = 0.0
    amp: bool = False
    distill: bool = False
    distill_alpha: float = DISTILL_ALPHA
    distill_temperature: float = DISTILL_TEMPERATURE

    def check(self, stage: str) -> FineTune:
        """``self``, or a one-line ``UserError`` naming ``stage`` for a setting :func:`fit` cannot use.

        The learning rate is checked even with ``epochs=0``: a NaN there is a typo either way.
        """
        check_epochs(self.epochs, f"{stage} fine-tuning epochs", minimum=0)
        check_learning_rate(self.lr, f"{stage} fine-tuning learning rate")
        if not isinstance(self.distill, bool):
            raise UserError(f"{stage} fine-tuning: distill must be True or False, got {self.distill!r}")
        try:
            check_distillation(self.distill_alpha, self.distill_temperature)
        except UserError as error:
            raise UserError(f"{stage} fine-tuning: {error}") from None
        if self.epochs > 0:
            try:
                check_recipe(**asdict(self))
            except UserError as error:
                raise UserError(f"{stage} fine-tuning: {error}") from None
        return self


def resolve_order(
    order: str | None, *, rank: Any, compress_rate: Any, ratio: Any, target_macs: Any, target_latency: Any = None,
) -> str:
    """The order a run takes when none is given: ``"auto"`` for a MACs budget with no rank or any latency
    budget, else NORTON's."""
    if order is not None:
        return order
    if target_latency is not None:
        return "auto"
    if target_macs is not None and rank is None and compress_rate is None and ratio is None:
        return "auto"
    return "decompose-prune"


def resolve_criterion(criterion: str | None, order: str) -> str:
    """The criterion a run uses when none is given: auto_compress's for ``"auto"``, the paper's otherwise."""
    if criterion is not None:
        return criterion
    return AUTO_CRITERION if order == "auto" else PAPER_CRITERION


def check_compress_arguments(
    *,
    rank: Any,
    compress_rate: str | Sequence[float] | None,
    ratio: float | Mapping[str, float] | None,
    target_macs: float | None,
    criterion: str,
    round_to: int | None,
    order: str,
    decompose_finetune: FineTune | None,
    prune_finetune: FineTune | None,
    target_latency: float | str | None = None,
    calibration_distill_steps: int = 0,
    prune_ranks: bool = False,
) -> dict[str, Any]:
    """Check every argument of :func:`compress` that needs no model; returns the pruning amount.

    The amount is ``{}`` (no pruning) or one of ``{"compress_rate": [...]}``,
    ``{"ratio": ...}``, ``{"target_macs": ...}``, ``{"target_latency": ...}`` (as given: ``auto_compress``
    reads it), parsed and bounded by :mod:`norton.limits` (the latency by :func:`parse_target_latency`).
    """
    from norton.compress_rate import parse_compress_rate

    if order not in ORDERS:
        raise UserError(f"order must be one of {', '.join(ORDERS)}, got {order!r}")
    given = {k: v for k, v in (("compress_rate", compress_rate), ("ratio", ratio), ("target_macs", target_macs),
                               ("target_latency", target_latency)) if v is not None}
    if len(given) > 1:
        raise UserError("say how much to prune in one way: compress_rate, ratio, target_macs or target_latency "
                        f"(got {', '.join(given)})")
    if order == "auto":
        if (target_macs is None and target_latency is None) or rank is not None or compress_rate is not None \
                or ratio is not None:
            raise UserError(
                "order 'auto' chooses every layer's width and rank itself: give target_macs or target_latency "
                "only (no rank, ratio or compress_rate)"
            )
        if round_to is not None:
            raise UserError("order 'auto' does not take round_to yet: leave it out, or give a rank to use NORTON's path")
    elif target_latency is not None:
        raise UserError("target_latency is met by auto_compress only: use order 'auto' (the default without a rank)")
    if check_int(calibration_distill_steps, "calibration distillation steps", minimum=0, maximum=1_000_000) \
            and order != "auto":
        raise UserError("calibration distillation steps are part of auto_compress: use them with order 'auto' "
                        "(--target-macs or --target-latency without a rank)")
    amounts: dict[str, Any] = {}
    if target_latency is not None:
        parse_target_latency(target_latency)
        amounts["target_latency"] = target_latency
    if compress_rate is not None:
        amounts["compress_rate"] = parse_compress_rate(compress_rate)
    if ratio is not None:
        amounts["ratio"] = check_ratios(ratio)
    if target_macs is not None:
        amounts["target_macs"] = check_target_macs(target_macs)
    if round_to is not None:
        check_round_to(round_to)
        if compress_rate is not None:
            raise UserError("round_to applies to ratio and target_macs; compress_rate fixes every width itself")
    if prune_ranks and (order == "auto" or ("ratio" not in amounts and "target_macs" not in amounts)
                        or isinstance(ratio, Mapping)):
        raise UserError("prune_ranks prunes the ranks of decomposed layers with a single ratio or target_macs on "
                        "NORTON's path (give a rank); order 'auto' chooses ranks itself")
    if isinstance(rank, int):
        check_rank(rank)
    if rank is None and not amounts:
        raise UserError("nothing to do: give a rank, a compress rate, a ratio or a target")
    (decompose_finetune or FineTune()).check("decompose")
    (prune_finetune or FineTune()).check("prune")
    if amounts and isinstance(criterion, str):
        from norton.pruning.criteria import get_criterion  # the registry (and torch): last

        get_criterion(criterion)
    return amounts


def check_compress_output(output_dir: Path | None, *, resume: bool) -> None:
    """``output_dir`` holds no earlier compression run, unless it is to be resumed."""
    if output_dir is None:
        if resume:
            raise UserError("resume needs the output folder of the run to continue")
        return
    if not resume and any((output_dir / stage).exists() for stage in ("decomposed", "pruned")):
        raise UserError(f"{output_dir} already holds a compression run: pass --resume to continue it "
                        "or choose another --output")
