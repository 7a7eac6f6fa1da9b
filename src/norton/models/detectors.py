"""The detectors in the zoo: ``{fasterrcnn,maskrcnn,keypointrcnn}_{resnet50,CPresnet50,resnet18}_fpn``.

Registered here (cheap: nothing of torchvision is imported until one is built); built by
:func:`norton.detection.models.create_detector`, which records its own architecture.
``create_model(name, num_classes=..., **options)`` passes ``options`` (``backbone=``,
``min_size=``, torchvision's ``rpn_post_nms_top_n_test=``, ...) through.
"""
from __future__ import annotations

from typing import Any

from torch import nn

from norton.errors import UserError
from norton.models._registry import Builder, register_model

DETECTION_DATASET = "coco"  # a registry entry of this dataset is a detector
_KINDS = {"fasterrcnn": 91, "maskrcnn": 91, "keypointrcnn": 2}
_BODIES = ("resnet50", "CPresnet50", "resnet18")


def _builder(name: str) -> Builder:
    def build(*, compress_rate: Any = None, rank: int = 0, num_classes: int | None = None,
              in_channels: int = 3, **options: Any) -> nn.Module:
        if compress_rate is not None or rank or in_channels != 3:
            raise UserError(f"{name} takes no compress_rate, rank or in_channels: compress its backbone "
                            "(backbone=FILE) or the detector itself with norton.decompose / norton.prune")
        from norton.detection.models import create_detector

        return create_detector(name, num_classes=num_classes, **options)

    build.__name__ = build.__qualname__ = name
    build.__doc__ = f"{name}: torchvision's R-CNN with an FPN on a norton ResNet body (norton.detection.models)."
    return build


for _kind, _classes in _KINDS.items():
    for _body in _BODIES:
        _name = f"{_kind}_{_body}_fpn"
        register_model(input_size=800, dataset=DETECTION_DATASET, num_classes=_classes, compress_rate_slots=())(
            _builder(_name)
        )
