"""MACs and parameters of a torchvision R-CNN, counted part by part with a fixed number of RoIs.

A detector's cost depends on its input *and* on how many proposals and detections the
image produces (the box head runs once per proposal, the mask and keypoint heads once per
detection), so a hooked forward of the whole model gives a different number for each
image and each set of weights. :func:`detector_complexity` counts instead:

* the **body** (ResNet), the **FPN** and the **RPN head** on a zero image of ``size``
  after ``model.transform`` (resize to ``min_size``/``max_size``, pad to a multiple of 32);
* the **box head + box predictor** on ``proposals`` RoIs (default: the RPN's post-NMS
  test count, 1000 in torchvision), inputs ``(proposals, 256, 7, 7)``;
* the **mask / keypoint head + predictor** on ``detections`` RoIs, inputs ``(D, 256, 14, 14)``.

RoIAlign, anchors, NMS and box decoding are not counted (neither ptflops nor thop counts
them). Every part is counted with :func:`norton.complexity.count_conventions` on zero
inputs: the numbers depend on shapes only, never on the weights, and are the same every run.

Protocols (``docs/complexity.md``, "Detectors"):

``"paper"``
    1000 proposals, 1 detection: the README's 134.85G / 134.85G / 137.42G MACs are a
    forward with random weights, in which the box head saw the RPN's 1000 proposals and
    the mask/keypoint heads next to no detections (random class scores: 1/91 is under
    the 0.05 score threshold). Faster R-CNN is reproduced exactly; Mask and Keypoint
    R-CNN within 0.4%.
``"max"``
    1000 proposals and ``box_detections_per_img`` (100) detections: the most a
    torchvision detector computes per image in eval mode.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from norton.complexity import ALIASES, CONVENTIONS, convention_sources, count_conventions
from norton.errors import UserError
from norton.example_inputs import model_device, takes_image_list

PROTOCOLS = ("paper", "max")
PAPER_DETECTIONS = 1
MAX_ROIS = 100_000  # far above torchvision's 1000 proposals / 100 detections; bounds the multiplication
Counts = dict[str, tuple[int, int]]  # convention -> (macs, params) of one part


@dataclass(frozen=True)
class PartComplexity:
    """One part of a detector: its name, how many times it runs (RoIs; 1 for image-level parts), MACs, params."""

    name: str
    runs: int
    macs: int
    params: int


@dataclass(frozen=True)
class DetectorComplexity:
    """Totals of one count (the parts sum to them) and the protocol that fixed the RoI counts."""

    macs: int
    params: int
    convention: str
    image_size: tuple[int, int]  # (H, W) after model.transform: what the body sees
    proposals: int
    detections: int
    protocol: str
    parts: list[PartComplexity] = field(default_factory=list)


def detector_complexity(
    model: nn.Module,
    size: int | Sequence[int] = 800,
    *,
    protocol: str = "paper",
    proposals: int | None = None,
    detections: int | None = None,
    convention: str = "reference",
) -> DetectorComplexity:
    """Count MACs and params of a torchvision R-CNN on one ``size`` image (see the module docstring).

    Args:
        model: a ``GeneralizedRCNN`` (Faster / Mask / Keypoint R-CNN, compressed or not).
        size: the input image side, or ``(H, W)``; ``model.transform`` then resizes it.
        protocol: ``"paper"`` or ``"max"``: the default RoI counts.
        proposals: RoIs through the box head (overrides the protocol's).
        detections: RoIs through the mask / keypoint head (overrides the protocol's).
        convention: as :func:`norton.complexity.count_complexity` (default ``"reference"``,
            the paper's ``min(ptflops, thop)``, taken over the totals).
    """
    convention = ALIASES.get(convention, convention)
    if convention not in CONVENTIONS:
        raise UserError(f"unknown complexity convention {convention!r}; use one of: {', '.join(CONVENTIONS)}")
    if not takes_image_list(model):
        raise UserError(f"detector_complexity counts torchvision R-CNNs, not a {type(model).__name__}: "
                        "use norton.count_complexity for other models")
    if protocol not in PROTOCOLS:
        raise UserError(f"unknown protocol {protocol!r}; use one of: {', '.join(PROTOCOLS)}")
    height, width = _size(size)
    roi_heads: Any = model.roi_heads
    rpn: Any = model.rpn
    default_proposals = int(rpn._post_nms_top_n["testing"])
    default_detections = PAPER_DETECTIONS if protocol == "paper" else int(roi_heads.detections_per_img)
    proposals = _rois(default_proposals if proposals is None else proposals, "proposals")
    detections = _rois(default_detections if detections is None else detections, "detections")

    modes = {module: module.training for module in model.modules()}
    try:
        model.eval()
        with torch.no_grad():
            parts, image_size = _count_parts(model, height, width, proposals, detections)
    finally:
        for module, training in modes.items():
            module.training = training
    totals = {key: (sum(c[key][0] for _, c in parts.values()), sum(c[key][1] for _, c in parts.values()))
              for key in ("conv+linear", "ptflops-modules", "thop")}
    # "reference": min over the two tools' *totals*, MACs and params separately
    macs_key, params_key = convention_sources(convention, totals)
    rows = [PartComplexity(name, runs, counts[macs_key][0], counts[params_key][1])
            for name, (runs, counts) in parts.items()]
    return DetectorComplexity(totals[macs_key][0], totals[params_key][1], convention, image_size,
                              proposals, detections, protocol, rows)


def _count_parts(model: nn.Module, height: int, width: int, proposals: int,
                 detections: int) -> tuple[dict[str, tuple[int, Counts]], tuple[int, int]]:
    """Every part's ``(runs, counts)`` in forward order, the RoI parts' MACs multiplied by their runs."""
    device = model_device(model)
    dtype = next(model.parameters()).dtype
    transform: Any = model.transform
    image_list, _ = transform([torch.zeros(3, height, width, device=device, dtype=dtype)])
    batched: Tensor = image_list.tensors  # (1, 3, H', W'): resized and padded to the size divisor
    backbone: Any = model.backbone
    rpn: Any = model.rpn
    roi_heads: Any = model.roi_heads
    parts: dict[str, tuple[int, Counts]] = {}
    counts, features = _count(backbone.body, batched)
    parts["backbone.body"] = (1, counts)
    counts, pyramid = _count(backbone.fpn, (features,))
    parts["backbone.fpn"] = (1, counts)
    parts["rpn.head"] = (1, _count(rpn.head, (list(pyramid.values()),))[0])
    channels = int(next(iter(pyramid.values())).shape[1])  # the FPN's width as built (pruned: fewer than out_channels)
    heads = [("box", proposals, roi_heads.box_roi_pool)]
    for kind in ("mask", "keypoint"):
        if getattr(roi_heads, f"{kind}_head", None) is not None:
            heads.append((kind, detections, getattr(roi_heads, f"{kind}_roi_pool")))
    for kind, rois, pool in heads:
        # One RoI counted, then multiplied: the cost is linear in the RoIs, and 0 RoIs still count params.
        pooled = torch.zeros(1, channels, *_pair(pool.output_size), device=device, dtype=dtype)
        head, predictor = getattr(roi_heads, f"{kind}_head"), getattr(roi_heads, f"{kind}_predictor")
        counts, hidden = _count(head, pooled)
        parts[f"roi_heads.{kind}_head"] = (rois, _times(counts, rois))
        parts[f"roi_heads.{kind}_predictor"] = (rois, _times(_count(predictor, hidden)[0], rois))
    return parts, (int(batched.shape[-2]), int(batched.shape[-1]))


def _count(module: nn.Module, inputs: Any) -> tuple[Counts, Any]:
    """``module``'s counts and its output, from the one forward the count runs (the body at 800 takes seconds)."""
    outputs: list[Any] = []
    handle = module.register_forward_hook(lambda _module, _inputs, output: outputs.append(output))
    try:
        counts = count_conventions(module, inputs)
    finally:
        handle.remove()
    return counts, outputs[0]


def _times(counts: Counts, rois: int) -> Counts:
    return {key: (macs * rois, params) for key, (macs, params) in counts.items()}


def _pair(value: Any) -> tuple[int, int]:
    if isinstance(value, int):
        return value, value
    return int(value[0]), int(value[1])


def _size(size: int | Sequence[int]) -> tuple[int, int]:
    from norton.limits import check_image_side

    if isinstance(size, int):
        size = (size, size)
    if len(size) != 2:
        raise UserError(f"size must be an int or (height, width), got {size!r}")
    check_image_side(size[0], "image height")
    check_image_side(size[1], "image width")
    return int(size[0]), int(size[1])


def _rois(value: int, name: str) -> int:
    from norton.limits import check_int

    check_int(value, name, minimum=0, maximum=MAX_ROIS)
    return int(value)


def format_complexity(result: DetectorComplexity) -> str:
    """A table of the parts and totals (MACs in G, params in M), with the protocol stated."""
    height, width = result.image_size
    lines = [f"image {height}x{width} after the transform, convention {result.convention}, protocol "
             f"{result.protocol}: {result.proposals} proposals, {result.detections} detections",
             f"{'part':<30} {'runs':>6} {'MACs':>18} {'params':>12}"]
    for part in result.parts:
        lines.append(f"{part.name:<30} {part.runs:>6} {part.macs:>18,} {part.params:>12,}")
    lines.append(f"{'total':<30} {'':>6} {result.macs:>18,} {result.params:>12,}")
    lines.append(f"{'':<30} {'':>6} {result.macs / 1e9:>17.2f}G {result.params / 1e6:>11.2f}M")
    return "\n".join(lines)
