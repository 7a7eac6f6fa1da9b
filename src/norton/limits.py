"""One place for amounts and limits: every number a user or a file hands norton is checked here.

Each check returns the value in its canonical type or raises :class:`~norton.errors.UserError`
with one line that names the argument, what it got and what it accepts. The limits
bound what would otherwise be allocated blindly (a rank of ten million, a 100,000-pixel
image side, a model with a billion classes read from a file), so a mistake fails in
microseconds with a message instead of minutes later in the allocator.

Amounts (the *how much* of pruning) have one meaning everywhere:

* ``ratio``: the fraction of filters removed from a layer, in ``[0, 1)``;
* ``target_macs``: the fraction of the *original* model's MACs the result keeps, in
  ``(0, 1]`` (the original is the model before its first norton operation).
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from norton.errors import RankAboveLayerError, UserError

# A CP rank above C_in * k (the rank of the filter unfolded along its input channels)
# never lowers the error; this global cap holds for records read before any layer is known.
MAX_RANK = 65_536
# Image side (pixels) for MACs counts and example inputs; 8K images are plenty for CNNs.
MAX_INPUT_SIDE = 8_192
# Elements of one example input (C * H * W): 3 x 4096 x 4096 fits, a 100k-side image does not.
MAX_INPUT_ELEMENTS = 3 * 4_096 * 4_096
# Entries of a compress-rate list ("[0.1]*N"): the deepest zoo network needs a few hundred.
MAX_COMPRESS_RATE_ENTRIES = 10_000
# Classes of a classifier head (ImageNet-21k has 21,841) and channels of an input image.
MAX_CLASSES = 100_000
MAX_IN_CHANNELS = 1_024
# Width multiple of ``round_to``: widths beyond this exist in no CNN.
MAX_ROUND_TO = 4_096
# Channel indices a prune record may list in all: a ResNet-152 lists ~100k; a million
# bounds what a file can make norton allocate.
MAX_RECORD_INDICES = 1_000_000
# Images per batch (an example input, a timing batch, a data loader's batch).
MAX_BATCH_SIZE = 65_536
# Timing repetitions and warm-up runs.
MAX_REPEATS = 10_000
# Iterative pruning steps and training epochs.
MAX_STEPS = 10_000
MAX_EPOCHS = 100_000


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_int(value: Any, name: str, *, minimum: int = 1, maximum: int | None = None) -> int:
    """``value`` as an int in ``[minimum, maximum]``; bools and floats are refused."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise UserError(f"{name} must be a whole number, got {value!r}")
    if value < minimum or (maximum is not None and value > maximum):
        bound = f">= {minimum}" if maximum is None else f"in [{minimum}, {maximum:,}]"
        raise UserError(f"{name} must be {bound}, got {value:,}")
    return value


def check_finite(value: Any, name: str, *, minimum: float | None = None, positive: bool = False) -> float:
    """``value`` as a finite float (``> 0`` with ``positive``, ``>= minimum`` with ``minimum``)."""
    if not _is_number(value) or not math.isfinite(value):
        raise UserError(f"{name} must be a finite number, got {value!r}")
    if positive and value <= 0:
        raise UserError(f"{name} must be positive, got {value!r}")
    if minimum is not None and value < minimum:
        raise UserError(f"{name} must be >= {minimum}, got {value!r}")
    return float(value)


def check_ratio(value: Any, name: str = "ratio") -> float:
    """A fraction of filters to remove: ``[0, 1)``."""
    if not _is_number(value) or not 0 <= value < 1:
        raise UserError(f"{name} is the fraction of filters removed and must lie in [0, 1), got {value!r}")
    return float(value)


def check_ratios(value: Any, name: str = "ratio") -> float | dict[str, float]:
    """One ratio, or ``{layer name or pattern: ratio}``."""
    if isinstance(value, Mapping):
        return {str(key): check_ratio(item, f"{name} for {key!r}") for key, item in value.items()}
    return check_ratio(value, name)


def check_target_macs(value: Any, name: str = "target_macs") -> float:
    """The fraction of the original model's MACs to keep: ``(0, 1]``."""
    if not _is_number(value) or not 0 < value <= 1:
        raise UserError(
            f"{name} is the fraction of the original model's MACs to keep and must lie in (0, 1], got {value!r}"
        )
    return float(value)


def check_rank(value: Any, name: str = "rank", *, in_channels: int | None = None,
               kernel_size: Sequence[int] | None = None) -> int:
    """A CP rank: a positive int, at most ``C_in * max(k_h, k_w)`` when the layer is known."""
    rank = check_int(value, name, minimum=1, maximum=MAX_RANK)
    if in_channels is not None and kernel_size is not None:
        bound = in_channels * max(kernel_size)
        if rank > bound:
            raise RankAboveLayerError(
                f"{name} {rank:,} is above {bound:,} = C_in x k ({in_channels} x {max(kernel_size)}) of a "
                f"{kernel_size[0]}x{kernel_size[1]} conv: a higher CP rank never lowers the error; use <= {bound}"
            )
    return rank


def check_round_to(value: Any, name: str = "round_to") -> int:
    return check_int(value, name, minimum=1, maximum=MAX_ROUND_TO)


def check_input_size(value: Any, name: str = "input_size") -> tuple[int, ...]:
    """``(C, H, W)`` or ``(N, C, H, W)`` of positive ints, one sample at most ``MAX_INPUT_ELEMENTS``."""
    try:
        shape = tuple(value)
    except TypeError:
        raise UserError(f"{name} must be a tuple of ints like (3, 32, 32), got {value!r}") from None
    if len(shape) < 2 or any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in shape):
        raise UserError(f"{name} must be positive ints like (3, 32, 32) or (1, 3, 32, 32), got {value!r}")
    sample = shape[1:] if len(shape) == 4 else shape
    elements = math.prod(sample)
    if max(sample[1:], default=0) > MAX_INPUT_SIDE or elements > MAX_INPUT_ELEMENTS:
        raise UserError(
            f"{name} {value!r} is too large: at most {MAX_INPUT_SIDE:,} pixels a side and "
            f"{MAX_INPUT_ELEMENTS:,} values per image"
        )
    return shape


def check_image_side(value: Any, name: str = "--input-size") -> int:
    """One image side in pixels, ``[1, MAX_INPUT_SIDE]``."""
    return check_int(value, name, minimum=1, maximum=MAX_INPUT_SIDE)


def check_batch_size(value: Any, name: str = "batch size") -> int:
    return check_int(value, name, minimum=1, maximum=MAX_BATCH_SIZE)


def check_repeats(value: Any, name: str = "repeats", *, minimum: int = 1) -> int:
    return check_int(value, name, minimum=minimum, maximum=MAX_REPEATS)


def check_epochs(value: Any, name: str = "epochs", *, minimum: int = 0) -> int:
    return check_int(value, name, minimum=minimum, maximum=MAX_EPOCHS)


def check_learning_rate(value: Any, name: str = "learning rate") -> float:
    return check_finite(value, name, positive=True)


def check_architecture_kwargs(kwargs: Mapping[str, Any], name: str = "architecture") -> None:
    """Bounds on the builder arguments a file (or a caller) hands ``create_model``, before anything is built."""
    bounded = {
        "num_classes": (1, MAX_CLASSES), "in_channels": (1, MAX_IN_CHANNELS), "rank": (0, MAX_RANK),
    }
    for key, (low, high) in bounded.items():
        if kwargs.get(key) is not None:
            check_int(kwargs[key], f"{name} argument {key}", minimum=low, maximum=high)
    rates = kwargs.get("compress_rate")
    if isinstance(rates, (list, tuple)) and len(rates) > MAX_COMPRESS_RATE_ENTRIES:
        raise UserError(
            f"{name} argument compress_rate has {len(rates):,} entries; at most {MAX_COMPRESS_RATE_ENTRIES:,}"
        )


def check_split_options(*, limit: int | None = None, val_size: int | None = None) -> None:
    """``UserError`` for a ``limit`` below 1 or a negative ``val_size`` (``None``: the default)."""
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise UserError(f"limit must be a positive number of images, got {limit}")
    if val_size is not None and (isinstance(val_size, bool) or not isinstance(val_size, int) or val_size < 0):
        raise UserError(f"val_size must be 0 or a positive number of images, got {val_size}")


def check_loader_options(*, batch_size: int, workers: int = 0) -> None:
    """``UserError`` unless ``1 <= batch_size <= MAX_BATCH_SIZE`` and ``workers >= 0`` (whole numbers)."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise UserError(f"batch_size must be at least 1, got {batch_size}")
    check_batch_size(batch_size, "batch_size")  # and at most MAX_BATCH_SIZE
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 0:
        raise UserError(f"workers must be 0 or more, got {workers}")


def check_distillation(alpha: Any, temperature: Any) -> tuple[float, float]:
    """Knowledge distillation's ``alpha`` (the weight of the teacher's term) in ``[0, 1]`` and ``temperature > 0``."""
    if not _is_number(alpha) or not 0 <= alpha <= 1:
        raise UserError(f"distillation alpha is the weight of the teacher's term and must lie in [0, 1], got {alpha!r}")
    return float(alpha), check_finite(temperature, "distillation temperature", positive=True)
