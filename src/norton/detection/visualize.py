"""Pictures of detections: boxes with class names and scores, translucent masks, keypoint skeletons.

:func:`draw_detections` draws one detection (or ground-truth) dict on one image with
torchvision's ``draw_bounding_boxes`` / ``draw_segmentation_masks`` / ``draw_keypoints``;
:func:`side_by_side` runs a baseline and a compressed detector on the same images and writes
each frame (baseline left, compressed right, each titled with its name and the FPS measured on
this device) as a PNG, and all of them as an animated GIF; :func:`measure_fps` is the timing.
Inputs are a list of images, a folder of images or a video file (PyAV, ``pip install av``).
"""
from __future__ import annotations

import importlib.util
import statistics
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from norton.deploy.timing import synchronize
from norton.errors import UserError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff")
# COCO's person skeleton (keypoint indices, 0-based), as torchvision's keypoint R-CNN predicts them.
COCO_SKELETON = [(15, 13), (13, 11), (16, 14), (14, 12), (11, 12), (5, 11), (6, 12), (5, 6), (5, 7), (6, 8),
                 (7, 9), (8, 10), (1, 2), (0, 1), (0, 2), (1, 3), (2, 4), (3, 5), (4, 6)]
TITLE_HEIGHT = 24  # pixels of the title bar above each panel
MAX_FRAMES = 10_000


def label_color(label: int) -> tuple[int, int, int]:
    """A fixed, well-spread colour per class label (the same class has the same colour in both panels)."""
    hue = (int(label) * 0.618033988749895) % 1.0  # golden-ratio steps spread neighbouring labels apart
    import colorsys

    red, green, blue = colorsys.hsv_to_rgb(hue, 0.75, 1.0)
    return int(red * 255), int(green * 255), int(blue * 255)


def to_uint8(image: Tensor) -> Tensor:
    """A ``(3, H, W)`` image as uint8 on the CPU (floats are read as [0, 1])."""
    if image.ndim != 3 or image.shape[0] not in (1, 3):
        raise UserError(f"an image must be (3, H, W), got shape {tuple(image.shape)}")
    image = image.detach().cpu()
    if image.dtype != torch.uint8:
        image = (image.float().clamp(0, 1) * 255).round().to(torch.uint8)
    return image.expand(3, -1, -1).contiguous()


def draw_detections(
    image: Tensor,
    detection: dict[str, Tensor],
    *,
    category_names: Sequence[str] | None = None,
    score_threshold: float = 0.5,
    skeleton: Sequence[tuple[int, int]] | None = None,
    mask_alpha: float = 0.5,
    box_width: int = 2,
) -> Tensor:
    """Draw one detection dict (a model's output or a target) on ``image``; returns uint8 ``(3, H, W)``.

    Args:
        image: ``(3, H, W)``, float in [0, 1] or uint8.
        detection: ``boxes (D, 4)`` xyxy, ``labels (D,)``; optionally ``scores (D,)`` (detections
            under ``score_threshold`` are not drawn; a target has none and is drawn whole),
            ``masks`` ``(D, 1, H, W)`` probabilities or ``(D, H, W)`` 0/1, ``keypoints (D, P, 3)``
            (x, y, visibility: points with visibility 0 are not drawn).
        category_names: index = label; the label number is written when absent.
        skeleton: keypoint pairs joined by lines; default COCO's person skeleton for 17 keypoints.
    """
    from torchvision.utils import draw_bounding_boxes, draw_keypoints, draw_segmentation_masks

    canvas = to_uint8(image)
    height, width = canvas.shape[-2:]
    boxes = detection.get("boxes")
    if boxes is None:
        raise UserError("a detection needs 'boxes' (D, 4); got keys " + ", ".join(sorted(detection)))
    boxes = boxes.detach().cpu().float().reshape(-1, 4)
    labels = detection.get("labels", torch.zeros(len(boxes), dtype=torch.int64)).detach().cpu()
    scores = detection.get("scores")
    keep = torch.ones(len(boxes), dtype=torch.bool) if scores is None else scores.detach().cpu() >= score_threshold
    if not keep.any():
        return canvas
    boxes, labels = boxes[keep], labels[keep]
    colors = [label_color(int(label)) for label in labels]
    masks = detection.get("masks")
    if masks is not None:
        masks = masks.detach().cpu()[keep]
        masks = masks[:, 0] if masks.ndim == 4 else masks  # (D, 1, H, W) probabilities -> (D, H, W)
        if masks.shape[-2:] != (height, width):
            raise UserError(f"masks are {tuple(masks.shape[-2:])}, the image is {(height, width)}: "
                            "draw a detection on the image it was computed on")
        canvas = draw_segmentation_masks(canvas, masks > 0.5, alpha=mask_alpha, colors=colors)
    texts = [_caption(int(label), category_names) for label in labels]
    if scores is not None:
        texts = [f"{text} {score:.2f}" for text, score in zip(texts, scores.detach().cpu()[keep].tolist(), strict=True)]
    canvas = draw_bounding_boxes(canvas, boxes, labels=texts, colors=colors, width=box_width)
    keypoints = detection.get("keypoints")
    if keypoints is not None:
        keypoints = keypoints.detach().cpu().float()[keep]
        pairs = list(skeleton) if skeleton is not None else COCO_SKELETON if keypoints.shape[1] == 17 else None
        for points, color in zip(keypoints, colors, strict=True):  # one colour per instance: one call each
            visible = points[:, 2] > 0 if points.shape[-1] == 3 else None
            canvas = draw_keypoints(canvas, points[None, :, :2], connectivity=pairs, colors=color,
                                    radius=3, width=2, visibility=None if visible is None else visible[None])
    return canvas


def _caption(label: int, category_names: Sequence[str] | None) -> str:
    if category_names is not None and 0 <= label < len(category_names):
        return str(category_names[label])
    return str(label)


# ------------------------------------------------------------------ timing
@torch.no_grad()
def measure_fps(model: nn.Module, images: Sequence[Tensor], *, warmup: int = 2, repeats: int = 5,
                batch_size: int = 1) -> float:
    """Images per second of ``model`` on ``images`` (on the model's device): the median of ``repeats``.

    Each repeat runs every image, ``batch_size`` at a time, in eval mode under ``no_grad``,
    after ``warmup`` untimed repeats; CUDA is synchronised around each timed repeat.
    """
    from norton.example_inputs import model_device
    from norton.limits import check_batch_size, check_repeats

    check_repeats(repeats)
    check_repeats(warmup, "warmup", minimum=0)
    check_batch_size(batch_size)
    if not images:
        raise UserError("measure_fps needs at least one image")
    device = model_device(model)
    images = [image.to(device) for image in images]
    batches = [list(images[i:i + batch_size]) for i in range(0, len(images), batch_size)]
    modes = {module: module.training for module in model.modules()}
    times = []
    try:
        model.eval()
        for step in range(warmup + repeats):
            synchronize(device)
            start = time.perf_counter()
            for batch in batches:
                model(batch)
            synchronize(device)
            if step >= warmup:
                times.append(time.perf_counter() - start)
    finally:
        for module, training in modes.items():
            module.training = training
    return len(images) / statistics.median(times)


# ------------------------------------------------------------------ inputs
def load_images(source: str | Path | Sequence[Tensor], *, max_frames: int | None = None) -> list[Tensor]:
    """Float ``(3, H, W)`` images in [0, 1] from a list, a folder of images (sorted by name) or a video file."""
    from norton.limits import check_int

    if max_frames is not None:
        check_int(max_frames, "max_frames", minimum=1, maximum=MAX_FRAMES)
    limit = max_frames or MAX_FRAMES
    if not isinstance(source, (str, Path)):
        images = [to_uint8(image).float() / 255 if image.dtype == torch.uint8 else image for image in source]
        return list(images)[:limit]
    path = Path(source).expanduser()
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise UserError(f"{path} holds no image ({', '.join(IMAGE_SUFFIXES)}): give a folder of images or a video")
        return [_read_image(file) for file in files[:limit]]
    if not path.is_file():
        raise UserError(f"{path} not found: give a folder of images or a video file")
    if path.suffix.lower() in IMAGE_SUFFIXES:
        return [_read_image(path)]
    return _read_video(path, limit)


def _read_image(path: Path) -> Tensor:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as picture:
            rgb = picture.convert("RGB")
    except (UnidentifiedImageError, OSError) as error:
        raise UserError(f"cannot read image {path}: {error}") from None
    return _from_pil(rgb)


def _from_pil(picture: Any) -> Tensor:
    from torchvision.transforms.functional import pil_to_tensor

    return pil_to_tensor(picture).float() / 255  # (3, H, W) in [0, 1]


def _read_video(path: Path, limit: int) -> list[Tensor]:
    if importlib.util.find_spec("av") is None:
        raise UserError(f"reading the video {path.name} needs PyAV: pip install av (or pass a folder of images)")
    import av

    av_error = getattr(av, "FFmpegError", None) or av.AVError  # the error base of PyAV >= 9, then older ones
    frames = []
    try:
        with av.open(str(path)) as container:
            for frame in container.decode(video=0):
                frames.append(_from_pil(frame.to_image()))
                if len(frames) >= limit:
                    break
    except av_error as error:
        raise UserError(f"cannot read video {path}: {error}") from None
    if not frames:
        raise UserError(f"{path} holds no video frame")
    return frames


# ------------------------------------------------------------------ side by side
def titled(panel: Tensor, title: str) -> Any:
    """``panel`` (uint8 ``(3, H, W)``) as a PIL image with a black title bar of ``TITLE_HEIGHT`` above it."""
    from PIL import Image, ImageDraw
    from torchvision.transforms.functional import to_pil_image

    picture = to_pil_image(panel)
    out = Image.new("RGB", (picture.width, picture.height + TITLE_HEIGHT))
    out.paste(picture, (0, TITLE_HEIGHT))
    ImageDraw.Draw(out).text((4, 4), title, fill=(255, 255, 255))
    return out


def side_by_side(
    baseline: nn.Module,
    compressed: nn.Module,
    images: str | Path | Sequence[Tensor],
    *,
    category_names: Sequence[str] | None = None,
    out_dir: str | Path,
    fps_device: str | torch.device | None = None,
    names: tuple[str, str] = ("baseline", "compressed"),
    score_threshold: float = 0.5,
    warmup: int = 1,
    repeats: int = 3,
    frame_ms: int = 500,
    max_frames: int | None = None,
) -> dict[str, Any]:
    """Baseline left, compressed right, on every image: ``frame_0000.png, ...`` and ``side_by_side.gif``.

    Each panel is titled ``"<name>  <FPS> FPS (<device>)"``, measured by :func:`measure_fps` on
    the first frame (batch 1) on ``fps_device`` (default: the baseline's device; both models are
    moved there). A frame is ``2 W`` wide and ``H + TITLE_HEIGHT`` high; the GIF pads smaller
    frames to the largest. Returns ``{"frames": [paths], "gif": path, "fps": {name: fps}, "device": str}``.
    """
    from norton.example_inputs import model_device

    if len(names) != 2 or names[0] == names[1]:
        raise UserError(f"names must be two different panel titles, got {names!r}")
    frames_in = load_images(images, max_frames=max_frames)
    if not frames_in:
        raise UserError("side_by_side needs at least one image")
    device = torch.device(fps_device) if fps_device is not None else model_device(baseline)
    out = Path(out_dir).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    models = dict(zip(names, (baseline.to(device), compressed.to(device)), strict=True))
    fps = {name: measure_fps(model, frames_in[:1], warmup=warmup, repeats=repeats) for name, model in models.items()}
    pictures, paths = [], []
    for index, image in enumerate(frames_in):
        panels = []
        for name, model in models.items():
            detection = _detect(model, image.to(device))
            drawn = draw_detections(image, detection, category_names=category_names, score_threshold=score_threshold)
            panels.append(titled(drawn, f"{name}  {fps[name]:.1f} FPS ({device.type})"))
        frame = _concatenate(panels)
        path = out / f"frame_{index:04d}.png"
        frame.save(path, format="PNG")
        pictures.append(frame)
        paths.append(path)
    gif = out / "side_by_side.gif"
    _write_gif(gif, pictures, frame_ms)
    return {"frames": paths, "gif": gif, "fps": fps, "device": str(device)}


@torch.no_grad()
def _detect(model: nn.Module, image: Tensor) -> dict[str, Tensor]:
    was_training = model.training
    try:
        model.eval()
        return model([image])[0]
    finally:
        model.train(was_training)


def _concatenate(panels: list[Any]) -> Any:
    from PIL import Image

    frame = Image.new("RGB", (sum(p.width for p in panels), max(p.height for p in panels)))
    left = 0
    for panel in panels:
        frame.paste(panel, (left, 0))
        left += panel.width
    return frame


def _write_gif(path: Path, pictures: list[Any], frame_ms: int) -> None:
    """An animated GIF of ``pictures``, each padded (black, top-left) to the largest frame."""
    from PIL import Image

    size = (max(p.width for p in pictures), max(p.height for p in pictures))
    padded = []
    for picture in pictures:
        canvas = Image.new("RGB", size)
        canvas.paste(picture, (0, 0))
        padded.append(canvas)
    padded[0].save(path, format="GIF", save_all=True, append_images=padded[1:], duration=frame_ms, loop=0)
