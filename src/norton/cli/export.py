"""``norton export``: write a model as ONNX or TorchScript, checked against eager PyTorch.

    norton export --ckpt runs/r56/best.pt --format onnx
    norton export --arch resnet_56 -r 7 -cpr "[0.]+[0.12]*2+[0.4]*27" --format torchscript --output r56.pt
    runs/r56/best.onnx (onnx opset 17): matches eager PyTorch at batch 1, 3 (max relative difference 3.1e-07)

The model comes from ``--ckpt`` (a norton file, a training checkpoint, or with
``--arch/-r/-cpr`` the authors' released checkpoint) or, without ``--ckpt``, is
built from ``--arch/-r/-cpr`` with random weights. A mismatch between the
exported file and eager PyTorch exits 1 and writes no file; a model whose own outputs
are NaN or inf (e.g. a diverged checkpoint) is refused in one line, as is an
``--output`` that would overwrite the ``--ckpt`` file.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch
from torch import nn

from norton.cli import _options as options
from norton.errors import UserError
from norton.limits import check_image_side
from norton.plan import plan_of
from norton.serialization import load_model_file

FORMATS = {"onnx": ".onnx", "torchscript": ".torchscript.pt"}


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "export",
        help="export a model to ONNX or TorchScript (checked against eager PyTorch)",
        description="Export a checkpoint (or a zoo model built from --arch/-r/-cpr) to ONNX (opset >= 17, "
        "dynamic batch) or TorchScript. The file is run on random inputs at batch 1 and 3 and compared with "
        "eager PyTorch (max relative difference <= 1e-4) before it is written.",
    )
    add_model_source_options(parser)
    parser.add_argument("--format", default="onnx", metavar="{onnx,torchscript}",
                        help="onnx (default) or torchscript")
    parser.add_argument("--output", "-o", default=None, metavar="PATH",
                        help="output file (default: the checkpoint's path, or ./<arch>, with .onnx / .torchscript.pt)")
    parser.add_argument("--batch_size", "--batch-size", dest="batch_size", type=int, default=1,
                        help="batch size of the example input (and of --optimize's measurements); default 1")
    parser.add_argument("--optimize", action="store_true",
                        help="first run norton.optimize_for_inference (fold BatchNorm, fastest CPDBlock forms)")
    parser.add_argument("--opset", type=int, default=17, help="ONNX opset, at least 17 (default 17)")
    parser.add_argument("--static-batch", action="store_true", help="fix the ONNX batch size to --batch-size")
    parser.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    parser.set_defaults(func=run)


def add_model_source_options(parser: argparse.ArgumentParser) -> None:
    """``--ckpt`` and/or ``--arch/-r/-cpr``, and ``--input-size`` (shared with ``norton benchmark``)."""
    options.add_ckpt_option(parser)
    options.add_model_options(parser)
    parser.add_argument("--input-size", "--input_size", dest="input_size", type=int, default=None, metavar="PIXELS",
                        help="side of the square input images (default: the architecture's, 32 or 224)")


def load_model(args: argparse.Namespace) -> nn.Module:
    """The model named by ``--ckpt`` (with ``--arch/-r/-cpr`` for the authors' files) or built from ``--arch``."""
    if args.ckpt is not None:
        model, _ = load_model_file(args.ckpt, arch=args.arch, rank=args.rank,
                                           compress_rate=args.compress_rate)
        return model
    if args.arch is None:
        raise UserError("nothing to load: give --ckpt PATH, or --arch NAME (with -r/-cpr) for a zoo model")
    from norton.models import create_model

    return create_model(args.arch, compress_rate=args.compress_rate, rank=args.rank)


def input_shape(model: nn.Module, input_size: int | None) -> tuple[int, int, int]:
    """``(C, H, W)`` of one input image: ``--input-size`` or the architecture's own size."""
    architecture = getattr(model, "norton_architecture", None) or {}
    name = architecture.get("name")
    channels = int((architecture.get("kwargs") or {}).get("in_channels", 3))
    if input_size is not None:
        side = check_image_side(input_size, "--input-size")
        return (channels, side, side)
    if name is None:
        raise UserError("cannot tell this model's input size: pass --input-size PIXELS")
    if name.startswith("torchvision."):
        return (channels, 224, 224)
    from norton.models import get_model_entry

    side = get_model_entry(name).input_size
    return (channels, side, side)


def default_output(args: argparse.Namespace, model: nn.Module | None) -> Path:
    """``--output``, else the checkpoint's path or ``./<arch>`` with the format's suffix."""
    if args.output:
        return Path(args.output).expanduser()
    suffix = FORMATS[args.format]
    if args.ckpt is not None:
        path = Path(args.ckpt).expanduser()
        return path.with_name(path.name.removesuffix(path.suffix) + suffix)
    name = (getattr(model, "norton_architecture", None) or {}).get("name") or args.arch or "model"
    return Path(name.replace("torchvision.", "") + suffix)


def _same_file(a: Path, b: Path) -> bool:
    if a.resolve() == b.resolve():
        return True
    try:
        return os.path.samefile(a, b)  # hard links and other aliases
    except OSError:  # one of them does not exist
        return False


def check_output_is_not_input(args: argparse.Namespace) -> None:
    """Refuse, before anything is loaded, an output path that is the ``--ckpt`` file itself."""
    if args.ckpt is None:
        return
    ckpt, output = Path(args.ckpt).expanduser(), default_output(args, None)
    if _same_file(ckpt, output):
        raise UserError(f"--output {output} would overwrite the input checkpoint {ckpt}; choose another --output")


def run(args: argparse.Namespace) -> int:
    from norton.deploy.export import ExportCheckError, export_onnx, export_torchscript

    if args.format not in FORMATS:
        raise UserError(f"unknown --format {args.format!r}: use onnx or torchscript")
    if args.batch_size < 1:
        raise UserError(f"--batch-size must be a positive integer, got {args.batch_size}")
    if args.input_size is not None:
        check_image_side(args.input_size, "--input-size")
    check_output_is_not_input(args)
    model = load_model(args).cpu().eval()
    shape = input_shape(model, args.input_size)
    example = torch.randn(args.batch_size, *shape)
    if args.optimize:
        from norton.deploy.optimize import optimize_for_inference

        # Forms are timed in the runtime that will run the file: ONNX Runtime's fusions differ from PyTorch's.
        model = optimize_for_inference(model, example, runtime="onnxruntime" if args.format == "onnx" else "torch")
    output = default_output(args, model)
    try:
        if args.format == "onnx":
            result = export_onnx(model, output, example, opset=args.opset, dynamic_batch=not args.static_batch)
        else:
            result = export_torchscript(model, output, example)
    except ExportCheckError as error:
        print(f"norton export: error: {str(error).splitlines()[0]}", file=sys.stderr)
        return 1
    if args.json:
        options.print_json({
            "path": str(result.path), "format": result.format, "opset": result.opset,
            "checked_batch_sizes": list(result.checked_batch_sizes),
            "max_relative_difference": result.max_relative_difference, "optimized": bool(args.optimize),
            # what optimize_for_inference chose: {"forms": {layer: form}, "fold_bn": [...], "memory_format": ...}
            "optimize": plan_of(model)[-1] if args.optimize else None,
            "input_shape": [args.batch_size, *shape],
        })
    else:
        print(result.summary())
    return 0
