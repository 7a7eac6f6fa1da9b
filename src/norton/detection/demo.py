"""``norton detect demo``: a small detector trained, compressed with NORTON, fine-tuned and compared, offline.

Stages, each leaving its files in ``out_dir`` so that a second run reuses what is finished
(a killed training run resumes from its ``last.pt``):

1. ``data/``: the Fashion-MNIST detection set (:func:`norton.detection.demo_data.make_demo_data`);
2. ``baseline.pt``: a Faster R-CNN with a ResNet-18 FPN on 128-px images, trained from scratch
   (:func:`norton.detection.train.train_detector`, run folder ``baseline/``);
3. ``compressed-init.pt``: its backbone body compressed the NORTON way, filter-wise CP
   decomposition (:func:`norton.decompose`) then structured pruning by the paper's ``pabs``
   criterion (:func:`norton.prune`); the FPN's inputs follow the pruned widths;
4. ``compressed.pt``: that model fine-tuned (run folder ``finetune/``);
5. ``results.json``: COCO AP/AR on the validation images, MACs and params
   (:func:`norton.detection.complexity.detector_complexity`, the ``paper`` protocol) and FPS on
   this device of both; ``side_by_side/``: both detectors' outputs side by side, as PNG frames
   and a GIF (:func:`norton.detection.visualize.side_by_side`); ``summary.json``.

``quick=True`` runs the same stages on a handful of 64-px images for a test (seconds).
"""
from __future__ import annotations

import copy
import dataclasses
import json
import os
import shutil
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from norton.errors import UserError

Log = Callable[[str], None]


@dataclass(frozen=True)
class DemoSettings:
    """What the demo does; stored in ``demo.json`` so a rerun with other settings is refused."""

    train_images: int
    val_images: int
    canvas: int  # image side: the detector's min_size and max_size too (no resize)
    batch_size: int
    baseline_epochs: int
    baseline_lr: float
    finetune_epochs: int
    finetune_lr: float
    warmup_iters: int
    rank: int  # CP rank of every decomposed body convolution
    prune_ratio: float  # fraction of the body's filters removed after the decomposition
    frames: int  # validation images in the GIF and the FPS measurement
    parts: tuple[str, ...] = ("body",)  # detector parts compressed (norton.detection.parts); the body is pruned
    svd_rank: int = 64  # rank of the box head's fc6/fc7 when "box_head" is among the parts
    cp_iterations: int = 100  # CP-ALS iterations per layer
    model: str = "fasterrcnn_resnet18_fpn"
    # Few proposals and RoIs: the box head (a 12544 x 1024 matrix per RoI) would otherwise dominate on a CPU.
    detector_options: dict[str, Any] = field(default_factory=lambda: {
        "rpn_pre_nms_top_n_train": 600, "rpn_post_nms_top_n_train": 300, "rpn_pre_nms_top_n_test": 300,
        "rpn_post_nms_top_n_test": 100, "box_batch_size_per_image": 64, "box_detections_per_img": 20})


# At 128 px the body is 16% of the detector's MACs, so the demo compresses the FPN, the RPN head and the
# box head too; measured (docs/detection.md): body alone + 1 epoch AP 30.1 at 0.85x MACs, 1.05x FPS; all
# four parts + 4 epochs AP 30.1 at 0.15x MACs, 1.78x FPS, 8.5 min on 2 idle cores.
FULL = DemoSettings(train_images=400, val_images=100, canvas=128, batch_size=8, baseline_epochs=3, baseline_lr=0.01,
                    finetune_epochs=4, finetune_lr=0.01, warmup_iters=50, rank=2, prune_ratio=0.5, frames=12,
                    parts=("body", "fpn", "rpn", "box_head"))
QUICK = DemoSettings(train_images=8, val_images=4, canvas=64, batch_size=4, baseline_epochs=1, baseline_lr=0.01,
                     finetune_epochs=1, finetune_lr=0.005, warmup_iters=1, rank=2, prune_ratio=0.5, frames=2,
                     cp_iterations=5)
COMPRESSIBLE_PARTS = ("body", "fpn", "rpn", "box_head")
FPS_IMAGES = 4  # FPS: median of 3 timed passes over this many validation images, batch 1
STAGES = ("baseline", "compressed")


def run_detection_demo(
    out_dir: str | os.PathLike = "runs/detect-demo",
    *,
    quick: bool = False,
    device: str = "auto",
    progress: bool = True,
    fashion_mnist_dir: str | os.PathLike | None = None,
    parts: Sequence[str] | None = None,
    overrides: Mapping[str, Any] | None = None,
    log: Log | None = print,
) -> dict[str, Any]:
    """Run (or finish) the demo in ``out_dir``; returns the summary written to ``summary.json``.

    ``parts``: the detector parts to compress (default all four; ``--quick`` and the paper: ``("body",)``): ``body``,
    ``fpn`` and ``rpn`` are CP-decomposed at the same rank, ``box_head`` (fc6, fc7) gets a rank-64 SVD;
    only the body is pruned. ``overrides``: other :class:`DemoSettings` fields (``baseline_epochs=6``, ...);
    ``None`` values are ignored.
    """
    started = time.perf_counter()
    say: Log = log or (lambda message: None)
    settings = QUICK if quick else FULL
    if parts is not None:
        if isinstance(parts, str) or not parts or any(part not in COMPRESSIBLE_PARTS for part in parts):
            raise UserError(f"parts must be some of {', '.join(COMPRESSIBLE_PARTS)}, got {parts!r}")
        settings = dataclasses.replace(settings, parts=tuple(dict.fromkeys(parts)))
    settings = _override(settings, overrides or {})
    out = Path(out_dir).expanduser()
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file: give a folder for the demo")
    _check_settings(out, settings)
    import torch

    from norton.detection.coco import coco_datasets, detection_loader
    from norton.io import write_json
    from norton.training.distributed import resolve_device, seed_everything

    device_ = resolve_device(device)
    write_json({"settings": dataclasses.asdict(settings)}, out / "demo.json")
    data = _demo_data(out, settings, fashion_mnist_dir, say)
    train_set, val_set = coco_datasets(data, kind="boxes")
    train_loader = detection_loader(train_set, batch_size=settings.batch_size, train=True, seed=0)
    val_loader = detection_loader(val_set, batch_size=settings.batch_size, train=False)
    names = list(train_set.category_names)
    seed_everything(0)

    baseline, new_baseline = _baseline(out, settings, train_set.num_classes, train_loader, val_loader, names,
                                       device_, progress, say)
    compressed, new_compressed = _compressed(out, settings, baseline, train_loader, val_loader, names, device_,
                                             progress, say)
    images = [val_set[i][0] for i in range(min(settings.frames, len(val_set)))]
    stale = [name for name, new in (("baseline", new_baseline), ("compressed", new_compressed)) if new]
    results = _results(out, {"baseline": baseline, "compressed": compressed}, val_loader, images, settings,
                       device_, say, stale=stale)
    gif = _side_by_side(out, baseline, compressed, images, names, say, redraw=bool(stale))
    summary = {"command": "norton detect demo" + (" --quick" if quick else ""), "output": str(out),
               "device": str(device_), "torch_threads": torch.get_num_threads(),
               "settings": dataclasses.asdict(settings), "results": results,
               "files": {"baseline": str(out / "baseline.pt"), "compressed": str(out / "compressed.pt"),
                         "gif": gif, "data": str(data)},
               "seconds": time.perf_counter() - started}
    write_json(summary, out / "summary.json")
    return summary


def _override(settings: DemoSettings, overrides: Mapping[str, Any]) -> DemoSettings:
    """``settings`` with ``overrides`` (checked: whole numbers >= 1, a positive finite lr)."""
    from norton.limits import check_int, check_learning_rate

    known = {f.name for f in dataclasses.fields(DemoSettings)}
    changes = {key: value for key, value in overrides.items() if value is not None}
    for key, value in changes.items():
        if key not in known:
            raise UserError(f"the demo has no setting {key!r}; settings: {', '.join(sorted(known))}")
        if key.endswith("_lr"):
            check_learning_rate(value, key)
        elif key in ("train_images", "val_images", "batch_size", "baseline_epochs", "finetune_epochs", "frames"):
            check_int(value, key, maximum=1_000_000)
    return dataclasses.replace(settings, **changes)


def _check_settings(out: Path, settings: DemoSettings) -> None:
    """A folder holding a demo made with other settings (``--quick`` or not) is refused, not mixed."""
    from norton.io import json_text

    path = out / "demo.json"
    if not path.is_file():
        return
    saved = read_json(path).get("settings")
    if saved != json.loads(json_text(dataclasses.asdict(settings))):  # as it reads back (tuples become lists)
        raise UserError(f"{out} holds a demo run with other settings (--quick or not, or an older norton): "
                        "pass another --out or delete the folder")


def read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise UserError(f"{path} is damaged ({error}): delete it and rerun the demo") from None


def _demo_data(out: Path, settings: DemoSettings, fashion_mnist_dir: Any, say: Log) -> Path:
    """``out/data`` (written once: into a temporary folder, then renamed, so a killed run leaves none)."""
    from norton.detection.demo_data import make_demo_data

    data = out / "data"
    if (data / "annotations" / "instances_val2017.json").is_file():
        return data
    say(f"writing the demo data ({settings.train_images} training, {settings.val_images} validation images) ...")
    partial = out / "data.partial"
    shutil.rmtree(partial, ignore_errors=True)
    make_demo_data(partial, fashion_mnist_dir=fashion_mnist_dir, train_images=settings.train_images,
                   val_images=settings.val_images, canvas=settings.canvas)
    shutil.rmtree(data, ignore_errors=True)
    partial.rename(data)
    return data


def _train(model: Any, run_dir: Path, settings: DemoSettings, epochs: int, lr: float, train_loader: Any,
           val_loader: Any, names: list[str], device: Any, progress: bool) -> None:
    from norton.detection.train import train_detector

    train_detector(model, train_loader, val_loader, epochs=epochs, lr=lr, warmup_iters=settings.warmup_iters,
                   checkpoint_dir=run_dir, resume=(run_dir / "last.pt").is_file(), progress=progress,
                   device=device, verbose=progress, args={"stage": run_dir.name, "category_names": names})


def _baseline(out: Path, settings: DemoSettings, num_classes: int, train_loader: Any, val_loader: Any,
              names: list[str], device: Any, progress: bool, say: Log) -> tuple[Any, bool]:
    """The baseline detector and whether it was (re)made by this call."""
    import norton
    from norton.detection.models import create_detector

    path = out / "baseline.pt"
    if path.is_file():
        return norton.load(path).to(device), False
    model = create_detector(settings.model, num_classes=num_classes, min_size=settings.canvas,
                            max_size=settings.canvas, **settings.detector_options)
    say(f"training the baseline {settings.model} for {settings.baseline_epochs} epoch(s) ...")
    _train(model, out / "baseline", settings, settings.baseline_epochs, settings.baseline_lr, train_loader,
           val_loader, names, device, progress)
    norton.save(model, path, stage="baseline", category_names=names, dataset="detect-demo")
    return model, True


def _compressed(out: Path, settings: DemoSettings, baseline: Any, train_loader: Any, val_loader: Any,
                names: list[str], device: Any, progress: bool, say: Log) -> tuple[Any, bool]:
    """The compressed, fine-tuned detector and whether it was (re)made by this call."""
    import norton
    from norton.detection.models import detector_example_inputs

    path, initial = out / "compressed.pt", out / "compressed-init.pt"
    if path.is_file():
        return norton.load(path).to(device), False
    if initial.is_file():
        model = norton.load(initial).to(device)
    else:
        conv_parts = tuple(part for part in settings.parts if part != "box_head")
        say(f"compressing the {', '.join(settings.parts)}: CP rank {settings.rank}, then pruning "
            f"{settings.prune_ratio:.0%} of the body's filters (pabs) ...")
        model = copy.deepcopy(baseline).to("cpu")
        if conv_parts:
            norton.decompose(model, settings.rank, progress=progress, detector_parts=conv_parts,
                             n_iter_max=settings.cp_iterations)
        if "box_head" in settings.parts:
            norton.decompose(model, settings.svd_rank, method="svd", progress=progress, detector_parts=("box_head",))
        if "body" in settings.parts:
            norton.prune(model, detector_example_inputs(model, settings.canvas), ratio=settings.prune_ratio,
                         criterion="pabs")
        norton.save(model, initial, stage="compressed before fine-tuning", category_names=names,
                    dataset="detect-demo")
        model.to(device)
    say(f"fine-tuning the compressed detector for {settings.finetune_epochs} epoch(s) ...")
    _train(model, out / "finetune", settings, settings.finetune_epochs, settings.finetune_lr, train_loader,
           val_loader, names, device, progress)
    norton.save(model, path, stage="compressed", category_names=names, dataset="detect-demo")
    return model, True


def _results(out: Path, models: Mapping[str, Any], val_loader: Any, images: list[Any], settings: DemoSettings,
             device: Any, say: Log, stale: list[str]) -> dict[str, dict[str, Any]]:
    """AP/AR, MACs, params and FPS of each model; cached in ``results.json`` (FPS is measured once),
    except for the ``stale`` models (made by this run)."""
    from norton.detection.complexity import detector_complexity
    from norton.detection.evaluate import evaluate_detector
    from norton.detection.visualize import measure_fps
    from norton.io import write_json

    path = out / "results.json"
    results: dict[str, dict[str, Any]] = read_json(path) if path.is_file() else {}
    results = {name: row for name, row in results.items() if name not in stale}
    for name, model in models.items():
        if name in results:
            continue
        say(f"evaluating the {name} detector (AP on {len(val_loader.dataset)} images, FPS on {device}) ...")
        metrics = evaluate_detector(model, val_loader, progress=False)
        complexity = detector_complexity(model, settings.canvas)
        fps = measure_fps(model, [image.to(device) for image in images[:FPS_IMAGES]], warmup=1, repeats=3)
        results[name] = {"metrics": metrics, "macs": complexity.macs, "params": complexity.params,
                         "fps": fps, "device": str(device)}
        write_json(results, path)
    return results


def _side_by_side(out: Path, baseline: Any, compressed: Any, images: list[Any], names: list[str], say: Log, *,
                  redraw: bool) -> str | None:
    from norton.detection.visualize import side_by_side

    folder = out / "side_by_side"
    existing = sorted(folder.glob("*.gif")) if folder.is_dir() else []
    if existing and not redraw:
        return str(existing[0])
    say(f"drawing {len(images)} validation images side by side (baseline left, compressed right) ...")
    result = side_by_side(baseline, compressed, images, category_names=names, out_dir=folder)
    gif = result.get("gif") if isinstance(result, Mapping) else None
    return None if gif is None else str(gif)


def format_summary(summary: Mapping[str, Any]) -> str:
    """The demo's table: AP, AP50, AP75, AR100, MACs, params and FPS of the baseline and the compressed model."""
    results = summary["results"]
    header = f"| {'model':<10} | {'AP':>5} | {'AP50':>5} | {'AP75':>5} | {'AR100':>5} | {'MACs':>8} | {'params':>7} | {'FPS':>6} |"
    lines = [header, "|------------|-------|-------|-------|-------|----------|---------|--------|"]
    for name in STAGES:
        row = results[name]
        box = row["metrics"]["bbox"]
        lines.append(f"| {name:<10} | {box['AP']:>5.1f} | {box['AP50']:>5.1f} | {box['AP75']:>5.1f} | "
                     f"{box['AR100']:>5.1f} | {row['macs'] / 1e9:>7.3f}G | {row['params'] / 1e6:>6.2f}M | "
                     f"{row['fps']:>6.1f} |")
    base, comp = results["baseline"], results["compressed"]
    lines.append(f"MACs {comp['macs'] / base['macs']:.2f}x, params {comp['params'] / base['params']:.2f}x, "
                 f"FPS {comp['fps'] / base['fps']:.2f}x of the baseline (FPS on {base['device']}, "
                 f"{summary['torch_threads']} threads; MACs at {summary['settings']['canvas']} px, "
                 "docs/complexity.md's paper protocol)")
    files = summary["files"]
    lines.append(f"saved {files['baseline']}, {files['compressed']}" + (f", {files['gif']}" if files["gif"] else "")
                 + f"; this run took {summary['seconds'] / 60:.1f} minutes")
    return "\n".join(lines)


__all__ = ["FULL", "QUICK", "DemoSettings", "format_summary", "run_detection_demo"]
