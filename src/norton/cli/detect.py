"""``norton detect``: detection (Faster / Mask / Keypoint R-CNN) from data to a compressed detector.

    norton detect make-demo-data data/detect-demo
    norton detect train --model fasterrcnn_resnet18_fpn --data data/detect-demo --epochs 12 --out runs/frcnn
    torchrun --nproc_per_node=8 -m norton.cli.main detect train --model fasterrcnn_resnet50_fpn --data ~/coco
    norton detect evaluate --checkpoint runs/frcnn/best.pt --data data/detect-demo
    norton detect compress --model runs/frcnn/best.pt --data data/detect-demo --target-macs 0.5 --out runs/frcnn-auto
    norton detect visualize --baseline a.pt --compressed b.pt --input images/ --out frames/
    norton detect demo

Each subcommand checks its options before importing torch; every mistake is one line and exit code 2
(``norton.cli.main``). docs/detection.md is the user's page.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from norton.errors import UserError
from norton.limits import check_image_side, check_int, check_loader_options

KINDS = {"fasterrcnn": "boxes", "maskrcnn": "masks", "keypointrcnn": "keypoints"}
DEMO_SETTINGS = ("train_images", "baseline_epochs", "finetune_epochs", "batch_size", "baseline_lr", "finetune_lr")


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "detect",
        help="detection: make demo data, train, evaluate, compress, visualize, demo",
        description="Faster / Mask / Keypoint R-CNN on a (compressed) ResNet backbone, COCO-format data "
                    "(docs/detection.md).",
    )
    commands = parser.add_subparsers(dest="detect_command", metavar="SUBCOMMAND")
    _register_make_demo_data(commands)
    _register_train(commands)
    _register_evaluate(commands)
    _register_compress(commands)
    _register_visualize(commands)
    _register_demo(commands)
    parser.set_defaults(func=lambda args: _missing_subcommand(parser))


def _missing_subcommand(parser: argparse.ArgumentParser) -> int:
    parser.print_help(sys.stderr)
    return 2


def _add_device(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default="auto", help="auto (CUDA if present), cpu, cuda or cuda:N (default auto)")


def _add_loader(parser: argparse.ArgumentParser, batch_size: int) -> None:
    parser.add_argument("--batch-size", "--batch_size", dest="batch_size", type=int, default=batch_size,
                        help=f"images per batch and process (default {batch_size})")
    parser.add_argument("--workers", type=int, default=2, help="data-loading worker processes (default 2)")


def _data_root(value: str) -> Path:
    root = Path(value).expanduser()
    if not root.is_dir():
        raise UserError(f"--data {root} is not a folder: give the COCO-layout folder (train2017/, val2017/, "
                        "annotations/), e.g. one written by norton detect make-demo-data")
    return root


def _kind_of(model_name: str) -> str:
    """The dataset kind a detector trains on: boxes, masks or keypoints."""
    return KINDS.get(model_name.split("_")[0], "boxes")


# --------------------------------------------------------------------------- make-demo-data


def _register_make_demo_data(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "make-demo-data", help="write the Fashion-MNIST detection set (COCO layout)",
        description="Write a small COCO-format detection set made of real Fashion-MNIST glyphs on larger canvases "
                    "(boxes, masks, keypoints) to OUT: train2017/, val2017/, annotations/.")
    parser.add_argument("out", metavar="OUT", help="folder to write")
    parser.add_argument("--train-images", dest="train_images", type=int, default=1500, help="default 1500")
    parser.add_argument("--val-images", dest="val_images", type=int, default=300, help="default 300")
    parser.add_argument("--canvas", type=int, default=128, help="image side in pixels (default 128)")
    parser.add_argument("--fashion-mnist", dest="fashion_mnist", default=None, metavar="DIR",
                        help="Fashion-MNIST idx files (default /usr/share/datasets/fashion-mnist)")
    parser.add_argument("--seed", type=int, default=0)
    parser.set_defaults(func=run_make_demo_data)


def run_make_demo_data(args: argparse.Namespace) -> int:
    check_int(args.train_images, "--train-images")
    check_int(args.val_images, "--val-images")
    check_image_side(args.canvas, "--canvas")
    from norton.detection.demo_data import make_demo_data

    out = make_demo_data(args.out, fashion_mnist_dir=args.fashion_mnist, train_images=args.train_images,
                         val_images=args.val_images, canvas=args.canvas, seed=args.seed)
    print(f"wrote {args.train_images} training and {args.val_images} validation images to {out}")
    return 0


# --------------------------------------------------------------------------- train


def _register_train(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "train", help="train a detector (the torchvision reference's recipe)",
        description="Train --model on the COCO-layout --data with the torchvision detection reference's recipe "
                    "(SGD, lr 0.02 per 16 images, warm-up, lr x0.1 after epochs 16 and 22 of 26, scaled to "
                    "--epochs). Picks the best epoch on val2017's AP; writes last.pt, best.pt, metrics.jsonl to "
                    "--out. Several GPUs: torchrun --nproc_per_node=N -m norton.cli.main detect train ...")
    parser.add_argument("--model", required=True, metavar="NAME",
                        help="fasterrcnn_resnet50_fpn, maskrcnn_resnet50_fpn, keypointrcnn_resnet50_fpn, "
                             "the *_CPresnet50_fpn aliases or the *_resnet18_fpn ones")
    parser.add_argument("--data", required=True, metavar="ROOT", help="COCO layout: train2017/, val2017/, annotations/")
    parser.add_argument("--backbone", default=None, metavar="FILE",
                        help="the body: a norton file of a (compressed) ResNet, or a torchvision-format state dict")
    parser.add_argument("--epochs", type=int, default=26, help="default 26 (the reference's)")
    _add_loader(parser, batch_size=2)
    parser.add_argument("--lr", type=float, default=None, help="default 0.02 x batch x processes / 16")
    parser.add_argument("--lr-steps", dest="lr_steps", type=int, nargs="+", default=None, metavar="EPOCH",
                        help="epochs after which the lr drops 10x (default 16 22 of 26, scaled to --epochs)")
    parser.add_argument("--warmup-iters", dest="warmup_iters", type=int, default=1000,
                        help="linear warm-up iterations, at most one epoch (default 1000)")
    parser.add_argument("--min-size", dest="min_size", type=int, default=800, help="resize: shorter side (default 800)")
    parser.add_argument("--max-size", dest="max_size", type=int, default=1333, help="resize: longer side (default 1333)")
    parser.add_argument("--amp", action="store_true", help="float16 mixed precision (CUDA only)")
    parser.add_argument("--out", default=None, metavar="DIR", help="run folder (default runs/<model>)")
    parser.add_argument("--resume", action="store_true", help="continue the run in --out from its last.pt")
    _add_device(parser)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")
    parser.set_defaults(func=run_train)


def run_train(args: argparse.Namespace) -> int:
    from norton.detection.train import check_train_arguments

    epochs, _ = check_train_arguments(epochs=args.epochs, lr=args.lr, momentum=0.9, weight_decay=1e-4,
                                      lr_steps=args.lr_steps, warmup_iters=args.warmup_iters)
    check_loader_options(batch_size=args.batch_size, workers=args.workers)
    check_image_side(args.min_size, "--min-size")
    check_image_side(args.max_size, "--max-size")
    root = _data_root(args.data)
    from norton.detection.models import parse_name
    from norton.training.checkpoint import check_output_dir

    parse_name(args.model)
    out = Path(args.out or f"runs/{args.model}").expanduser()
    check_output_dir(out, resume=args.resume)
    if args.backbone is not None and not Path(args.backbone).expanduser().is_file():
        raise UserError(f"--backbone {args.backbone} not found: check the path")
    from norton.training.distributed import resolve_device

    if args.amp and resolve_device(args.device).type != "cuda":
        raise UserError("--amp (float16 mixed precision) needs a CUDA device: drop --amp on the CPU")

    from norton.detection.coco import coco_datasets, detection_loader
    from norton.detection.models import create_detector
    from norton.detection.train import train_detector
    from norton.training.distributed import cleanup_distributed, init_distributed, seed_everything

    context = init_distributed(args.device)
    try:
        seed_everything(args.seed)  # the same initial weights on every rank
        kind = _kind_of(args.model)
        train_set, val_set = coco_datasets(root, kind=kind)
        options: dict[str, Any] = {"num_classes": train_set.num_classes, "backbone": args.backbone,
                                   "min_size": args.min_size, "max_size": args.max_size}
        if kind == "keypoints":
            options["num_keypoints"] = train_set.num_keypoints
        model = create_detector(args.model, **options)
        train_loader = detection_loader(train_set, batch_size=args.batch_size, train=True, workers=args.workers,
                                        seed=args.seed)
        val_loader = detection_loader(val_set, batch_size=args.batch_size, train=False, workers=args.workers)
        record = {key: value for key, value in vars(args).items() if key != "func"}
        record.update(data=str(root), kind=kind, category_names=list(train_set.category_names))
        history = train_detector(model, train_loader, val_loader, epochs=epochs, lr=args.lr, lr_steps=args.lr_steps,
                                 warmup_iters=args.warmup_iters, amp=args.amp, checkpoint_dir=out,
                                 resume=args.resume, progress=args.progress, device=context.device, seed=args.seed,
                                 args=record)
    finally:
        cleanup_distributed()
    if context.is_main:
        last = history[-1]
        print(f"{args.model}: {len(history)} epochs; best epoch {last['best_epoch']}, validation AP "
              f"{last['best_val_ap']:.2f}")
        print(f"saved {out}/best.pt, {out}/last.pt, {out}/metrics.jsonl")
    return 0


# --------------------------------------------------------------------------- evaluate


def _register_evaluate(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "evaluate", help="COCO AP/AR of a detector, with MACs and params",
        description="COCO AP and AR (boxes; masks for Mask R-CNN; keypoints for Keypoint R-CNN) of the detector in "
                    "--checkpoint (a norton file or a training checkpoint) on --data's val2017, printed as the "
                    "NORTON README's table with MACs (the 'paper' protocol of docs/complexity.md) and params.")
    parser.add_argument("--checkpoint", required=True, metavar="FILE", help="norton file or best.pt")
    parser.add_argument("--data", required=True, metavar="ROOT", help="COCO layout: val2017/, annotations/")
    parser.add_argument("--size", type=int, default=800,
                        help="image side at which MACs are counted, before the model's resize (default 800)")
    _add_loader(parser, batch_size=2)
    _add_device(parser)
    parser.add_argument("--json", default=None, metavar="FILE", help="also write the metrics as JSON to FILE")
    parser.set_defaults(func=run_evaluate)


def _read_detector(path: str, option: str) -> tuple[Any, dict[str, Any]]:
    """The detector in a model file and what it was trained with; one line for anything else."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise UserError(f"{option} {file} not found: check the path")
    from norton.detection.models import is_detector
    from norton.serialization import load_model_file

    model, trained_with = load_model_file(file)
    if not is_detector(model):
        raise UserError(f"{option} {file} holds a {type(model).__name__}, not a detector: "
                        "give a file written by norton detect train / norton.save of a detector")
    return model, trained_with


def run_evaluate(args: argparse.Namespace) -> int:
    check_loader_options(batch_size=args.batch_size, workers=args.workers)
    check_image_side(args.size, "--size")
    root = _data_root(args.data)
    model, _ = _read_detector(args.checkpoint, "--checkpoint")
    from norton.detection.coco import coco_datasets, detection_loader
    from norton.detection.complexity import detector_complexity
    from norton.detection.evaluate import evaluate_detector, format_metrics
    from norton.io import write_json
    from norton.training.distributed import resolve_device

    name = model.norton_architecture["name"]
    _, val_set = coco_datasets(root, kind=_kind_of(name))
    loader = detection_loader(val_set, batch_size=args.batch_size, train=False, workers=args.workers)
    model.to(resolve_device(args.device))
    metrics = evaluate_detector(model, loader)
    complexity = detector_complexity(model, args.size)
    print(f"{name} on {root} val ({len(val_set)} images):")
    print(format_metrics(metrics, extra={"MACs": f"{complexity.macs / 1e9:.2f}G",
                                         "Params": f"{complexity.params / 1e6:.2f}M"}))
    if args.json is not None:
        write_json({"checkpoint": str(args.checkpoint), "model": name, "data": str(root), "metrics": metrics,
                    "macs": complexity.macs, "params": complexity.params, "macs_protocol": complexity.protocol,
                    "macs_size": args.size}, Path(args.json).expanduser())
    return 0


# --------------------------------------------------------------------------- compress


def _register_compress(commands: argparse._SubParsersAction) -> None:
    from norton.cli.compress import CRITERIA_HELP, add_round_to_option
    from norton.compress_arguments import ORDERS
    from norton.detection.parts import DETECTOR_PARTS

    parser = commands.add_parser(
        "compress", help="compress a trained detector: decompose, prune or auto_compress, each fine-tuned",
        description="Compress the detector in --model (a norton file or best.pt of norton detect train) with "
                    "norton.compress: decompose at -r and/or prune (--ratio, --target-macs), or auto_compress "
                    "(--target-macs alone), each stage fine-tuned on --data's train2017 and scored by COCO AP on "
                    "val2017. --target-macs is a fraction of the compressed parts' MACs. Writes each stage's "
                    "folder, compressed.pt and summary.json to --out; resumable with --resume.")
    parser.add_argument("--model", required=True, metavar="FILE", help="the trained detector (norton file or best.pt)")
    parser.add_argument("--data", required=True, metavar="ROOT", help="COCO layout: train2017/, val2017/, annotations/")
    parser.add_argument("-r", "--rank", type=int, default=None, help="CP rank of the decomposition (none: no decomposition)")
    parser.add_argument("--method", default="cp-filter", help="decomposition: cp-filter (default), tucker2, cp-layer, svd")
    how = parser.add_mutually_exclusive_group()
    how.add_argument("--ratio", type=float, default=None, help="fraction of filters removed from every prunable layer")
    how.add_argument("--target-macs", "--target_macs", dest="target_macs", type=float, default=None,
                     help="fraction of the compressed parts' MACs to keep, in (0, 1); alone it runs auto_compress")
    parser.add_argument("--criterion", default=None, help=CRITERIA_HELP)
    add_round_to_option(parser)
    parser.add_argument("--order", default=None, choices=ORDERS, help="as for norton compress (default: auto with "
                        "--target-macs alone, else decompose-prune)")
    parser.add_argument("--parts", default="body", metavar="LIST",
                        help=f"comma-separated detector parts to compress: {', '.join(DETECTOR_PARTS)} "
                             "(default body; auto takes body and fpn)")
    parser.add_argument("--decompose-epochs", dest="decompose_epochs", type=int, default=1,
                        help="fine-tuning epochs after decomposition (default 1; 0 skips)")
    parser.add_argument("--prune-epochs", dest="prune_epochs", type=int, default=1,
                        help="fine-tuning epochs after pruning or auto compression (default 1; 0 skips)")
    parser.add_argument("--lr", type=float, default=0.001,
                        help="peak fine-tuning learning rate (default 0.001: a compressed detector starts close to "
                             "the original; docs/detection.md measured 0.01 costing 5 AP points)")
    parser.add_argument("--size", type=int, default=800,
                        help="image side at which MACs are counted, before the model's resize (default 800)")
    _add_loader(parser, batch_size=2)
    parser.add_argument("--out", default=None, metavar="DIR", help="run folder (default runs/detect-compress-<model>)")
    parser.add_argument("--resume", action="store_true", help="continue the run in --out")
    _add_device(parser)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")
    parser.set_defaults(func=run_compress)


def run_compress(args: argparse.Namespace) -> int:
    from norton.compress_arguments import FineTune, check_compress_output

    check_loader_options(batch_size=args.batch_size, workers=args.workers)
    check_image_side(args.size, "--size")
    parts = tuple(part.strip() for part in args.parts.split(",") if part.strip())
    recipes = {stage: FineTune(epochs=getattr(args, f"{stage}_epochs"), lr=args.lr).check(stage)
               for stage in ("decompose", "prune")}
    root = _data_root(args.data)
    out = Path(args.out or f"runs/detect-compress-{Path(args.model).stem}").expanduser()
    check_compress_output(out, resume=args.resume)
    model, _ = _read_detector(args.model, "--model")
    from norton.detection.coco import coco_datasets, detection_loader
    from norton.detection.parts import check_parts
    from norton.io import write_json
    from norton.pipeline import compress
    from norton.serialization import save
    from norton.training.loaders import Loaders

    check_parts(model, parts)
    name = model.norton_architecture["name"]
    train_set, val_set = coco_datasets(root, kind=_kind_of(name))
    train_loader = detection_loader(train_set, batch_size=args.batch_size, train=True, workers=args.workers,
                                    seed=args.seed)
    val_loader = detection_loader(val_set, batch_size=args.batch_size, train=False, workers=args.workers)
    # val2017 chooses the best fine-tuning epoch and scores each stage: COCO has no labelled test split
    loaders = Loaders(train=train_loader, val=val_loader, test=val_loader, train_sampler=None)  # type: ignore[arg-type]
    result = compress(
        model, loaders, input_size=(3, args.size, args.size), rank=args.rank, ratio=args.ratio,
        target_macs=args.target_macs, criterion=args.criterion, round_to=args.round_to, order=args.order,
        decompose_method=args.method, decompose_finetune=recipes["decompose"], prune_finetune=recipes["prune"],
        output_dir=out, resume=args.resume, device=args.device, seed=args.seed, progress=args.progress,
        log=lambda message: print(message, flush=True), detector_parts=parts,
    )
    path = save(result.model, out / "compressed.pt", stages=result.stages,
                category_names=list(train_set.category_names))
    write_json({"model": str(args.model), "data": str(root), "parts": list(parts), "stages": result.stages,
                "compressed": str(path)}, out / "summary.json")
    print(format_stages(result.stages))
    print(f"saved {path} and {out / 'summary.json'}")
    return 0


def format_stages(stages: Any) -> str:
    """AP, AP50, AR100, MACs and params of every stage of a detector's compression."""
    lines = [f"| {'stage':<10} | {'AP':>5} | {'AP50':>5} | {'AR100':>5} | {'MACs':>8} | {'params':>7} |",
             "|------------|-------|-------|-------|----------|---------|"]
    for stage in stages:
        box = stage["coco"].get("keypoints", stage["coco"]["bbox"])
        lines.append(f"| {stage['name']:<10} | {box['AP']:5.1f} | {box['AP50']:5.1f} | "
                     f"{box.get('AR100', box.get('AR', 0.0)):5.1f} | {stage['macs'] / 1e9:7.2f}G | "
                     f"{stage['params'] / 1e6:6.2f}M |")
    return "\n".join(lines)


# --------------------------------------------------------------------------- visualize


def _register_visualize(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "visualize", help="baseline vs compressed detections side by side (PNG frames + GIF)",
        description="Run both detectors on every image of --input (a folder of images, or a video) and write "
                    "frames with boxes, class names and scores (masks, keypoints), baseline left and compressed "
                    "right, each with its FPS measured on this device, plus an animated GIF, to --out.")
    parser.add_argument("--baseline", required=True, metavar="FILE", help="the baseline detector (model file)")
    parser.add_argument("--compressed", required=True, metavar="FILE", help="the compressed detector (model file)")
    parser.add_argument("--input", required=True, metavar="DIR_OR_VIDEO", help="folder of images or a video file")
    parser.add_argument("--out", required=True, metavar="DIR", help="folder for the frames and the GIF")
    parser.add_argument("--limit", type=int, default=None, metavar="N", help="at most N images / frames")
    _add_device(parser)
    parser.set_defaults(func=run_visualize)


def run_visualize(args: argparse.Namespace) -> int:
    if args.limit is not None:
        check_int(args.limit, "--limit")
    source = Path(args.input).expanduser()
    if not source.exists():
        raise UserError(f"--input {source} not found: give a folder of images or a video file")
    baseline, trained_with = _read_detector(args.baseline, "--baseline")
    compressed, _ = _read_detector(args.compressed, "--compressed")
    from norton.detection.visualize import side_by_side
    from norton.training.distributed import resolve_device

    device = resolve_device(args.device)
    result = side_by_side(baseline.to(device), compressed.to(device), source,
                          category_names=trained_with.get("category_names"), out_dir=Path(args.out).expanduser(),
                          max_frames=args.limit)
    fps = ", ".join(f"{name} {value:.1f} FPS" for name, value in result["fps"].items())
    print(f"{len(result['frames'])} frames ({fps} on {result['device']})")
    print(f"wrote {result['gif']} and the frames beside it")
    return 0


# --------------------------------------------------------------------------- demo


def _register_demo(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "demo", help="train, compress and compare a small detector offline, in minutes on a CPU",
        description="Make the Fashion-MNIST detection set, train a small Faster R-CNN (ResNet-18 FPN, 128-px "
                    "images), compress its backbone body (NORTON: CP decomposition + pruning), fine-tune, and "
                    "print AP, AP50, AP75, AR100, MACs, params and FPS of both; saves both models and a "
                    "side-by-side GIF in --out. A second run reuses the finished stages.")
    parser.add_argument("--out", "-o", default="runs/detect-demo", help="folder (default runs/detect-demo)")
    parser.add_argument("--quick", action="store_true", help="a tiny version (seconds; for tests)")
    parser.add_argument("--parts", nargs="+", default=None, choices=("body", "fpn", "rpn", "box_head"),
                        help="detector parts to compress (default: all four; --quick: body): body/fpn/rpn "
                             "CP-decomposed, box_head by a rank-64 SVD; the body is also pruned")
    group = parser.add_argument_group("settings", "defaults: docs/detection.md (a folder keeps the settings it was "
                                                  "started with)")
    group.add_argument("--train-images", dest="train_images", type=int, default=None, help="default 400")
    group.add_argument("--baseline-epochs", dest="baseline_epochs", type=int, default=None, help="default 3")
    group.add_argument("--finetune-epochs", dest="finetune_epochs", type=int, default=None, help="default 4")
    group.add_argument("--batch-size", "--batch_size", dest="batch_size", type=int, default=None, help="default 8")
    group.add_argument("--lr", dest="baseline_lr", type=float, default=None, help="baseline lr (default 0.01: 0.02 x 8 / 16, the reference's scaling)")
    group.add_argument("--finetune-lr", dest="finetune_lr", type=float, default=None, help="default 0.01")
    parser.add_argument("--fashion-mnist", dest="fashion_mnist", default=None, metavar="DIR",
                        help="Fashion-MNIST idx files (default /usr/share/datasets/fashion-mnist)")
    _add_device(parser)
    parser.add_argument("--json", action="store_true", help="print the summary as JSON")
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")
    parser.set_defaults(func=run_demo)


def run_demo(args: argparse.Namespace) -> int:
    from norton.detection.demo import format_summary, run_detection_demo
    from norton.io import json_text

    summary = run_detection_demo(args.out, quick=args.quick, device=args.device, progress=args.progress,
                                 fashion_mnist_dir=args.fashion_mnist, parts=args.parts,
                                 overrides={key: getattr(args, key) for key in DEMO_SETTINGS},
                                 log=(lambda message: None) if args.json else _say)
    print(json_text(summary, indent=2, default=str) if args.json else format_summary(summary))
    return 0


def _say(message: str) -> None:
    print(f"norton detect demo: {message}", file=sys.stderr, flush=True)
