"""Faster / Mask / Keypoint R-CNN with an FPN on a norton ResNet body (torchvision's detection classes).

``create_detector("fasterrcnn_resnet50_fpn", backbone=...)`` takes the body from nothing
(random init), a norton file of a ResNet-50 (dense, decomposed, pruned: what ``norton.save``
wrote), a torchvision-format ResNet-50 state dict, or a module. The FPN's input widths are
*read* from the body (one tiny forward through ``layer1..4``), so a pruned body needs no
configuration. A compressed body keeps plain, trainable BatchNorm and every layer trains.

How to rebuild a detector is plain data in ``model.norton_architecture``::

    {"name": "fasterrcnn_resnet50_fpn",
     "kwargs": {"num_classes": 91, "min_size": 800, "max_size": 1333, "trainable_layers": 5,
                "backbone": {"architecture": {"name": "torchvision.resnet50", "kwargs": {...}},
                             "plan": [...]},      # the body's own decompose/prune records
                ...torchvision options (rpn_post_nms_top_n_test, ...)}}

so :func:`norton.load` builds the body, replays *its* plan on the classifier it came from,
wraps it, and then replays the detector's own plan (``norton.prune(detector, ...)``).
"""
from __future__ import annotations

import inspect
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from norton.errors import UserError

DETECTOR_KINDS = ("fasterrcnn", "maskrcnn", "keypointrcnn")
DEPTHS = {"resnet50": 50, "CPresnet50": 50, "resnet18": 18}
# The body architectures each depth accepts (norton zoo names).
BODY_ARCHITECTURES = {50: ("torchvision.resnet50", "resnet_50"), 18: ("torchvision.resnet18",)}
BLOCKS = {50: (3, 4, 6, 3), 18: (2, 2, 2, 2)}
DEFAULT_CLASSES = {"fasterrcnn": 91, "maskrcnn": 91, "keypointrcnn": 2}
FPN_WIDTH = 256
RETURN_LAYERS = {"layer1": "0", "layer2": "1", "layer3": "2", "layer4": "3"}
# Arguments norton itself handles; any other keyword goes to torchvision's class.
OWN_ARGUMENTS = ("num_classes", "num_keypoints", "backbone", "min_size", "max_size", "trainable_layers")


def detector_names() -> tuple[str, ...]:
    """Every detector name: ``{kind}_{resnet50,CPresnet50,resnet18}_fpn``."""
    return tuple(f"{kind}_{depth}_fpn" for kind in DETECTOR_KINDS for depth in DEPTHS)


def parse_name(name: Any) -> tuple[str, int]:
    """``(kind, depth)`` of a detector name; ``UserError`` listing the names for anything else."""
    if isinstance(name, str) and name in detector_names():
        kind, depth, _ = name.split("_")
        return kind, DEPTHS[depth]
    raise UserError(f"unknown detector {name!r}; available: {', '.join(detector_names())}")


def is_detector(model: nn.Module) -> bool:
    """Whether ``model`` is a torchvision R-CNN (``GeneralizedRCNN``: takes a list of images)."""
    from norton.example_inputs import takes_image_list

    return takes_image_list(model)


def detector_example_inputs(model: nn.Module, size: int | tuple[int, int] = 800) -> list[Tensor]:
    """``[torch.rand(3, H, W)]`` on the model's device: one image, the form detectors take."""
    from norton.example_inputs import model_device
    from norton.limits import check_image_side

    height, width = (size, size) if isinstance(size, int) else size
    check_image_side(height, "image height")
    check_image_side(width, "image width")
    generator = torch.Generator().manual_seed(0)
    return [torch.rand(3, height, width, generator=generator).to(model_device(model))]


# ------------------------------------------------------------------ building
def create_detector(
    name: str,
    *,
    num_classes: int | None = None,
    num_keypoints: int = 17,
    backbone: str | os.PathLike | nn.Module | Mapping[str, Any] | None = None,
    min_size: int = 800,
    max_size: int = 1333,
    trainable_layers: int = 5,
    **detector_kwargs: Any,
) -> nn.Module:
    """A torchvision R-CNN with an FPN on a (compressed) ResNet body; see the module docstring.

    Args:
        name: ``{fasterrcnn,maskrcnn,keypointrcnn}_{resnet50,CPresnet50,resnet18}_fpn``
            (``CPresnet50`` is the reference's name for the same ResNet-50 detector).
        num_classes: including background; default 91 (keypoint R-CNN: 2).
        num_keypoints: keypoints per instance (keypoint R-CNN only).
        backbone: ``None`` (random init), a path to a norton file of the ResNet or a
            torchvision-format state dict, a module (its norton record is kept), or the
            ``{"architecture", "plan"}`` record a saved detector carries.
        min_size, max_size: ``GeneralizedRCNNTransform``'s resize bounds.
        trainable_layers: how many of ``layer4, layer3, layer2, layer1, conv1`` train (5: all).
        detector_kwargs: torchvision options (``rpn_post_nms_top_n_test=...``), plain numbers only.
    """
    from norton.limits import check_architecture_kwargs, check_image_side, check_int

    kind, depth = parse_name(name)
    num_classes = DEFAULT_CLASSES[kind] if num_classes is None else num_classes
    check_architecture_kwargs({"num_classes": num_classes}, name)
    check_int(num_keypoints, "num_keypoints", minimum=1, maximum=1000)
    check_image_side(min_size, "min_size")
    check_image_side(max_size, "max_size")
    check_int(trainable_layers, "trainable_layers", minimum=0, maximum=5)
    if kind != "keypointrcnn" and num_keypoints != 17:
        raise UserError(f"{name} predicts no keypoints: num_keypoints is for keypointrcnn_* detectors")
    check_detector_options(kind, detector_kwargs)
    body, record = _body(backbone, depth, name)

    from torchvision.models import detection
    from torchvision.models.detection.backbone_utils import BackboneWithFPN
    from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

    widths = body_widths(body)
    features = BackboneWithFPN(body, dict(RETURN_LAYERS), widths, FPN_WIDTH, extra_blocks=LastLevelMaxPool())
    _freeze(features.body, trainable_layers)
    options: dict[str, Any] = {"min_size": min_size, "max_size": max_size, **detector_kwargs}
    if kind == "fasterrcnn":
        model = detection.FasterRCNN(features, num_classes=num_classes, **options)
    elif kind == "maskrcnn":
        model = detection.MaskRCNN(features, num_classes=num_classes, **options)
    else:
        model = detection.KeypointRCNN(features, num_classes=num_classes, num_keypoints=num_keypoints, **options)
    kwargs: dict[str, Any] = {"num_classes": num_classes, "min_size": min_size, "max_size": max_size,
                              "trainable_layers": trainable_layers, "backbone": record, **detector_kwargs}
    if kind == "keypointrcnn":
        kwargs["num_keypoints"] = num_keypoints
    object.__setattr__(model, "norton_architecture", {"name": name, "kwargs": kwargs})
    return model


def body_widths(body: nn.Module) -> list[int]:
    """Output channels of ``layer1..4``, read by one tiny forward (so pruned widths need no config)."""
    from torchvision.models._utils import IntermediateLayerGetter

    getter = IntermediateLayerGetter(body, dict(RETURN_LAYERS))
    modes = {module: module.training for module in body.modules()}
    parameter = next(body.parameters())
    try:
        body.eval()
        with torch.no_grad():
            outputs = getter(torch.zeros(1, 3, 64, 64, device=parameter.device, dtype=parameter.dtype))
    finally:
        for module, training in modes.items():
            module.training = training
    return [int(outputs[key].shape[1]) for key in RETURN_LAYERS.values()]


def check_detector_options(kind: str, options: Mapping[str, Any]) -> None:
    """``UserError`` for a keyword the torchvision class does not take or a value a file cannot record."""
    from torchvision.models import detection

    cls = {"fasterrcnn": detection.FasterRCNN, "maskrcnn": detection.MaskRCNN,
           "keypointrcnn": detection.KeypointRCNN}[kind]
    accepted = set(inspect.signature(cls).parameters) - {"backbone", "kwargs", "num_classes", "num_keypoints"}
    for key, value in options.items():
        if key not in accepted:
            raise UserError(f"{cls.__name__} takes no option {key!r}; it takes {', '.join(sorted(accepted))}")
        if not _plain(value):
            raise UserError(f"detector option {key}={type(value).__name__} must be plain numbers or text "
                            "(norton.save records it); build such a detector with torchvision directly")


def check_detector_architecture(name: str, kwargs: Mapping[str, Any]) -> None:
    """A saved detector's architecture arguments, checked before anything is built."""
    kind, _ = parse_name(name)
    options = {key: value for key, value in kwargs.items() if key not in OWN_ARGUMENTS}
    check_detector_options(kind, options)
    record = kwargs.get("backbone")
    if record is not None and not (isinstance(record, Mapping) and set(record) == {"architecture", "plan"}):
        raise UserError(f"architecture {name!r}: backbone must be {{'architecture', 'plan'}}, got {str(record)[:60]}")


def _plain(value: Any) -> bool:
    if isinstance(value, (list, tuple)):
        return all(_plain(item) for item in value)
    return value is None or isinstance(value, (bool, int, float, str))


# --------------------------------------------------------------------- bodies
def _body(backbone: Any, depth: int, name: str) -> tuple[nn.Module, dict[str, Any]]:
    """The body classifier and its ``{"architecture", "plan"}`` record (how to rebuild it)."""
    from norton.models import create_model
    from norton.plan import plan_of
    from norton.serialization import build_from_plan

    if backbone is None:
        body = create_model(BODY_ARCHITECTURES[depth][0])
    elif isinstance(backbone, Mapping):
        if set(backbone) != {"architecture", "plan"}:
            raise UserError(f"backbone record must be {{'architecture', 'plan'}}, got keys {sorted(backbone)}")
        _check_body_name(backbone["architecture"], depth, name, "the backbone record")
        body = build_from_plan(backbone["architecture"], backbone["plan"])
    elif isinstance(backbone, nn.Module):
        body = _adopt_module(backbone, depth, name)
    elif isinstance(backbone, (str, os.PathLike)):
        body = _read_body_file(Path(backbone).expanduser(), depth, name)
    else:
        raise UserError(f"backbone must be a file path, a module or None, got {type(backbone).__name__}")
    architecture: Mapping[str, Any] = getattr(body, "norton_architecture", {})
    _check_body_name(architecture, depth, name, "the backbone")
    _check_resnet(body, depth, name)
    return body, {"architecture": dict(architecture), "plan": plan_of(body)}


def _check_body_name(architecture: Any, depth: int, name: str, what: str) -> None:
    body_name = architecture.get("name") if isinstance(architecture, Mapping) else None
    if body_name not in BODY_ARCHITECTURES[depth]:
        raise UserError(f"{what} is a {body_name!r}, not a ResNet-{depth}: {name} takes "
                        f"{' or '.join(BODY_ARCHITECTURES[depth])} bodies")


def _check_resnet(body: nn.Module, depth: int, name: str) -> None:
    stages = [getattr(body, f"layer{i}", None) for i in range(1, 5)]
    sizes = tuple(len(stage) if isinstance(stage, nn.Sequential) else -1 for stage in stages)
    if sizes != BLOCKS[depth]:
        raise UserError(f"the backbone of {name} must be a ResNet-{depth} (layer1..4 of {BLOCKS[depth]} blocks)")


def _adopt_module(module: nn.Module, depth: int, name: str) -> nn.Module:
    """A module with a norton record as is; a plain torchvision ResNet gets the record of its zoo twin."""
    if getattr(module, "norton_architecture", None) is not None:
        return module
    from norton.models import create_model

    zoo = BODY_ARCHITECTURES[depth][0]
    fc = getattr(module, "fc", None)
    twin = create_model(zoo, num_classes=fc.out_features if isinstance(fc, nn.Linear) else 1000)
    if _shapes(twin.state_dict()) != _shapes(module.state_dict()):
        raise UserError(f"the backbone module is not a dense {zoo} and has no norton record to rebuild it: "
                        "load it with norton.load, or build it with norton.create_model")
    object.__setattr__(module, "norton_architecture", twin.norton_architecture)
    return module


def _read_body_file(path: Path, depth: int, name: str) -> nn.Module:
    """A norton file / training checkpoint (its model) or a torchvision-format state dict."""
    from norton.io import read_torch_file
    from norton.models import create_model
    from norton.serialization import file_kind, read_model_file

    if not path.is_file():
        raise UserError(f"backbone file {path} not found: check the path")
    content = read_torch_file(path)
    kind = file_kind(content)
    if kind in ("norton model file", "training checkpoint"):
        return read_model_file(path).model.train()
    if kind != "reference checkpoint":
        raise UserError(f"{path} is neither a norton model file nor a torchvision-format ResNet-{depth} state dict")
    state = content["state_dict"] if isinstance(content.get("state_dict"), Mapping) else content
    state = {key.removeprefix("module."): value for key, value in state.items()}
    zoo = BODY_ARCHITECTURES[depth][0]
    fc = state.get("fc.weight")
    body = create_model(zoo, num_classes=int(fc.shape[0]) if isinstance(fc, Tensor) else 1000)
    expected = _shapes(body.state_dict())
    got = _shapes(state)
    wrong = [key for key, shape in expected.items() if got.get(key) != shape and not key.startswith("fc.")]
    if wrong:
        raise UserError(f"{path} is not a torchvision-format ResNet-{depth} state dict ({wrong[0]!r} is "
                        f"{got.get(wrong[0], 'missing')}, expected {expected[wrong[0]]}); for a compressed "
                        f"ResNet-{depth} pass the norton file norton.save wrote")
    body.load_state_dict({key: value for key, value in state.items() if key in expected}, strict=False)
    return body


def _shapes(state: Mapping[str, Any]) -> dict[str, tuple[int, ...]]:
    return {key: tuple(value.shape) for key, value in state.items() if isinstance(value, Tensor)}


def _freeze(body: nn.Module, trainable_layers: int) -> None:
    """torchvision's convention: the last ``trainable_layers`` of ``layer4 .. conv1`` train."""
    trainable = ["layer4", "layer3", "layer2", "layer1", "conv1"][:trainable_layers]
    if trainable_layers == 5:
        trainable.append("bn1")
    for key, parameter in body.named_parameters():
        parameter.requires_grad_(any(key.startswith(layer) for layer in trainable))
