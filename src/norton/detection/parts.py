"""Which parts of a detector ``norton.decompose`` and ``norton.prune`` act on.

A torchvision R-CNN is a backbone body (the ResNet), an FPN, an RPN head, RoI heads
(box, mask, keypoint) and the predictors that produce its outputs. Compression acts on
the **body** unless asked otherwise with ``detector_parts``::

    norton.decompose(detector, 1)                                          # body only
    norton.prune(detector, images, ratio=0.3, detector_parts=("body", "fpn", "rpn"))
    norton.decompose(detector, 64, method="svd", detector_parts=("box_head",))  # fc6/fc7 low rank

Pruning keeps the output widths of every layer outside the chosen parts (they are
``ignored_layers``), so the predictors' outputs (classes, boxes, masks, keypoints, the
RPN's objectness and deltas) never change, while the *inputs* of the layers after a pruned
part follow it through the dependency graph (the FPN's lateral convs after a pruned body).
Importing this module imports nothing heavy.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, TypeVar

from torch import nn

from norton.errors import UserError
from norton.example_inputs import takes_image_list

# part -> the qualified name of the module it is, in torchvision's R-CNN classes
DETECTOR_PARTS = {
    "body": "backbone.body",
    "fpn": "backbone.fpn",
    "rpn": "rpn.head.conv",
    "box_head": "roi_heads.box_head",
    "mask_head": "roi_heads.mask_head",
    "keypoint_head": "roi_heads.keypoint_head",
}
DEFAULT_PARTS = ("body",)
# auto_compress's sensitivity runs the FPN maps and RPN outputs (norton.detection.features), so it
# can judge the body and the FPN's inner layers; the RPN head and RoI heads are compressed by hand.
AUTO_PARTS = ("body", "fpn")
T = TypeVar("T")


def check_parts(model: nn.Module, parts: Sequence[str] | None) -> tuple[str, ...] | None:
    """The checked parts of a detector (``DEFAULT_PARTS`` for ``None``); ``None`` for any other model."""
    if not takes_image_list(model):
        if parts is not None:
            raise UserError("detector_parts is for torchvision detectors (norton.detection.create_detector); "
                            "for other models choose layers with include= / ignored_layers=")
        return None
    if parts is None:
        return DEFAULT_PARTS
    if isinstance(parts, str):
        parts = (parts,)
    names = dict(model.named_modules())
    for part in parts:
        if part not in DETECTOR_PARTS:
            raise UserError(f"unknown detector part {part!r}; parts: {', '.join(DETECTOR_PARTS)}")
        if names.get(DETECTOR_PARTS[part]) is None:
            raise UserError(f"the detector has no {part} ({DETECTOR_PARTS[part]}): "
                            f"a {type(model).__name__} has no such head")
    if not parts:
        raise UserError(f"detector_parts is empty: name at least one of {', '.join(DETECTOR_PARTS)}")
    return tuple(dict.fromkeys(parts))


def in_parts(name: str, parts: Iterable[str]) -> bool:
    """Whether the module ``name`` lies inside one of ``parts``."""
    prefixes = [DETECTOR_PARTS[part] for part in parts]
    return any(name == prefix or name.startswith(prefix + ".") for prefix in prefixes)


def layers_in_parts(
    model: nn.Module, layers: Mapping[str, T], parts: Sequence[str] | None, what: str
) -> dict[str, T]:
    """``layers`` restricted to a detector's parts (any other model's layers unchanged); for decompose."""
    chosen = check_parts(model, parts)
    if chosen is None:
        return dict(layers)
    kept = {name: layer for name, layer in layers.items() if in_parts(name, chosen)}
    if layers and not kept:
        raise UserError(f"the detector's {', '.join(chosen)} has no layer {what} takes "
                        "(the box head's fc6/fc7 are Linear layers: use method='svd')")
    return kept


def parts_predicate(parts: Sequence[str] | None) -> Callable[[str], bool] | None:
    """Whether a layer name lies inside ``parts``; ``None`` (every layer) for a model that is no detector."""
    if parts is None:
        return None
    return lambda name: in_parts(name, parts)


def parts_macs(model: nn.Module, example_inputs: Any, parts: Sequence[str] | None, *, original: bool = False) -> int:
    """Conv + linear MACs of ``model`` (of its original, before its first norton operation, with ``original``).

    For a detector, of the layers inside ``parts`` only: that is what ``target_macs`` is a fraction
    of, since the RoI heads' cost changes with the number of proposals and is not compressed.
    """
    from norton.complexity import count_complexity
    from norton.plan import original_model

    counted = original_model(model) if original else model
    if parts is None:
        return int(count_complexity(counted, example_inputs=example_inputs).macs)
    rows = count_complexity(counted, example_inputs=example_inputs, per_layer=True).layers
    return int(sum(row.macs for row in rows if in_parts(row.name, parts)))


def outside_parts(model: nn.Module, parts: Sequence[str]) -> list[str]:
    """The largest submodules holding no part: their output widths are kept when pruning."""
    prefixes = [DETECTOR_PARTS[part] for part in parts]
    kept: list[str] = []

    def visit(module: nn.Module, prefix: str) -> None:
        for child_name, child in module.named_children():
            name = f"{prefix}.{child_name}" if prefix else child_name
            if in_parts(name, parts):
                continue
            if any(p.startswith(name + ".") for p in prefixes):
                visit(child, name)  # a part lies below: look closer
            elif any(True for _ in child.parameters()):
                kept.append(name)

    visit(model, "")
    return kept


def detector_scope(
    model: nn.Module, parts: Sequence[str] | None, ignored_layers: Iterable[Any], prune_linear: bool
) -> tuple[list[Any], bool]:
    """``(ignored_layers, prune_linear)`` for pruning ``model``: a detector keeps everything outside ``parts``.

    The box head (fc6/fc7) is not pruned: torch-pruning's walk of the RoI features' flatten
    into fc6's 12,544 inputs takes minutes; make it low-rank with ``decompose(method="svd")``.
    """
    if isinstance(ignored_layers, (str, nn.Module)):
        ignored_layers = [ignored_layers]
    chosen = check_parts(model, parts)
    if chosen is None:
        return list(ignored_layers), prune_linear
    if "box_head" in chosen or prune_linear:
        raise UserError("the box head's fc6/fc7 are not pruned: make them low-rank with "
                        "norton.decompose(detector, rank, method='svd', detector_parts=('box_head',))")
    return [*ignored_layers, *outside_parts(model, chosen)], prune_linear


def with_head_outputs(model: nn.Module, forward: Any) -> Any:
    """``forward`` that also returns a detector's RPN head outputs, so tracing reaches the RPN head.

    The RPN's proposals are made from detached scores (torchvision), so no gradient path
    leads from the detections back to ``rpn.head``; returning its outputs puts it in the
    dependency graph, and marks its objectness and delta layers as outputs (kept).
    """
    if not takes_image_list(model):
        return forward

    def traced_forward(module: nn.Module, inputs: Any) -> Any:
        extra: list[Any] = []
        handle = module.get_submodule("rpn.head").register_forward_hook(lambda _m, _a, out: extra.append(out))
        try:
            return forward(module, inputs), extra
        finally:
            handle.remove()

    return traced_forward
