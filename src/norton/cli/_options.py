"""Options shared by the ``norton`` commands, defined once, and the small steps that turn them into objects.

A command adds what it needs::

    add_model_options(parser)          # --arch, -r/--rank, -cpr/--compress_rate
    add_ckpt_option(parser)            # --ckpt
    add_data_options(parser)           # --dataset, --data_dir, --batch_size, --workers, --limit, --val_size, --download
    add_training_options(parser)       # --epochs, --lr, --momentum, --weight_decay, --warmup_epochs, ...
    add_run_options(parser)            # --device, --seed, --output, --json

and then calls :func:`build_splits`, :func:`load_model_file`, :func:`training_recipe`, ...
Option spellings follow the NORTON reference (``--data_dir``, ``--batch_size``,
``-cpr``); the dashed forms (``--data-dir``) are accepted too.
"""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from norton.errors import UserError
from norton.serialization import load, load_reference_checkpoint
from norton.training.data import DATASETS, DataSplits, build_datasets
from norton.training.loop import RECIPES, is_training_checkpoint, model_from_checkpoint, recipe_for

# --------------------------------------------------------------------------- options


def add_arch_option(parser: argparse.ArgumentParser, *, required: bool = False, help: str | None = None) -> None:
    parser.add_argument("--arch", required=required, metavar="NAME",
                        help=help or "model name from the zoo (vgg_16_bn, resnet_56, ...; see docs/models.md) "
                                     "or torchvision.<name>")


def add_model_options(parser: argparse.ArgumentParser, *, arch_required: bool = False) -> None:
    """``--arch``, ``-r/--rank`` and ``-cpr/--compress_rate``: a zoo model as the reference names it."""
    add_arch_option(parser, required=arch_required)
    parser.add_argument("-r", "--rank", type=int, default=0,
                        help="CP rank of the decomposed convolutions (0: none; default 0)")
    parser.add_argument("-cpr", "--compress_rate", "--compress-rate", dest="compress_rate", default=None,
                        metavar="SPEC", help="per-layer compress rates, e.g. '[0.]+[0.1]*2+[0.4]*5' (default: none)")


def add_ckpt_option(parser: argparse.ArgumentParser, *, required: bool = False, help: str | None = None) -> None:
    parser.add_argument("--ckpt", required=required, metavar="PATH",
                        help=help or "model file: a norton file, a training checkpoint (best.pt), or the "
                                     "authors' released {'state_dict': ...} file together with --arch/-r/-cpr")


def add_data_options(parser: argparse.ArgumentParser, *, batch_size: int = 256) -> None:
    """Which images, from where, how many at a time."""
    group = parser.add_argument_group("data")
    group.add_argument("--dataset", choices=DATASETS, default=None,
                       help="default: the model's own (cifar10 or imagenet; a training checkpoint's dataset)")
    group.add_argument("--data_dir", "--data-dir", dest="data_dir", default=None, metavar="DIR",
                       help="where the dataset's files are (default ~/data; Fashion-MNIST also "
                            "/usr/share/datasets/fashion-mnist); see docs/training.md")
    group.add_argument("--batch_size", "--batch-size", dest="batch_size", type=int, default=batch_size,
                       help=f"images per batch and process (default {batch_size})")
    group.add_argument("--workers", type=int, default=2, help="data-loading worker processes (default 2)")
    group.add_argument("--limit", type=int, default=None, metavar="N",
                       help="use at most N images of each split (quick runs)")
    group.add_argument("--val_size", "--val-size", dest="val_size", type=int, default=None, metavar="N",
                       help="training images held out for model selection (default 5000 on CIFAR and "
                            "Fashion-MNIST, 10000 on ImageNet; 0: none)")
    group.add_argument("--download", action="store_true",
                       help="download CIFAR or Fashion-MNIST into --data_dir if missing (needs the internet)")


def add_training_options(parser: argparse.ArgumentParser, *, stage: str = "train") -> None:
    """SGD recipe; ``None`` defaults are filled from the dataset's recipe (see :func:`training_recipe`)."""
    example = RECIPES[("cifar", stage)]
    group = parser.add_argument_group("training", f"defaults: the {stage} recipe of the dataset (docs/training.md)")
    group.add_argument("--epochs", type=int, default=None, help=f"epochs (CIFAR default {example['epochs']})")
    group.add_argument("--lr", type=float, default=None, help=f"peak learning rate (CIFAR default {example['lr']})")
    group.add_argument("--momentum", type=float, default=None, help="SGD momentum")
    group.add_argument("--weight_decay", "--weight-decay", "--wd", dest="weight_decay", type=float, default=None,
                       help="weight decay")
    group.add_argument("--warmup_epochs", "--warmup-epochs", dest="warmup_epochs", type=float, default=None,
                       help="linear warm-up epochs before the cosine decay")
    group.add_argument("--label_smoothing", "--label-smoothing", dest="label_smoothing", type=float, default=None,
                       help="label smoothing of the training loss")
    group.add_argument("--amp", action="store_true", help="float16 mixed precision (CUDA only)")
    group.add_argument("--resume", action="store_true", help="continue the run in --output from its last.pt")


def add_run_options(parser: argparse.ArgumentParser, *, output: bool = True, output_help: str | None = None) -> None:
    """``--device``, ``--seed``, ``--json`` and (optionally) ``--output``."""
    parser.add_argument("--device", default="auto", help="auto (CUDA if present), cpu, cuda or cuda:N (default auto)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    if output:
        parser.add_argument("--output", "-o", default=None, metavar="DIR",
                            help=output_help or "output folder (default runs/<arch>-<dataset>)")
    parser.add_argument("--json", action="store_true", help="print one JSON object on stdout")


# --------------------------------------------------------------------------- options -> objects


def default_dataset(arch: str | None) -> str:
    """The dataset an architecture is built for: its registry entry's, ImageNet for torchvision models."""
    if arch is None:
        return "cifar10"
    if arch.startswith("torchvision."):
        return "imagenet"
    from norton.models import get_model_entry

    return get_model_entry(arch).dataset


def build_splits(args: argparse.Namespace, dataset: str) -> DataSplits:
    """The data named by :func:`add_data_options` (``args.seed`` chooses the validation images)."""
    return build_datasets(dataset, args.data_dir, limit=args.limit, val_size=args.val_size, seed=args.seed,
                          download=args.download)


def training_recipe(args: argparse.Namespace, dataset: str, *, stage: str = "train") -> dict[str, Any]:
    """``fit`` keyword arguments: the dataset's recipe, overridden by the options given.

    Unless ``--warmup_epochs`` is given, the warm-up lasts at most a tenth of the epochs.
    """
    recipe = recipe_for(dataset, stage=stage)
    for key in ("epochs", "lr", "momentum", "weight_decay", "warmup_epochs", "label_smoothing"):
        if getattr(args, key, None) is not None:
            recipe[key] = getattr(args, key)
    if getattr(args, "warmup_epochs", None) is None:  # the recipe's warm-up, shortened for short runs
        recipe["warmup_epochs"] = min(recipe["warmup_epochs"], recipe["epochs"] / 10)
    recipe["amp"] = bool(getattr(args, "amp", False))
    return recipe


def plain_args(args: argparse.Namespace) -> dict[str, Any]:
    """The parsed options as plain data (for checkpoints and JSON), without the handler function."""
    return {key: value for key, value in vars(args).items() if key != "func" and not callable(value)}


def print_json(obj: Any) -> None:
    print(json.dumps(obj, indent=2, default=str))


def check_model_fits(model: nn.Module, splits: DataSplits) -> None:
    """``UserError`` unless ``model`` maps one image of ``splits`` to ``splits.num_classes`` scores."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            scores = model(torch.zeros(1, *splits.input_size, device=device))
    except RuntimeError as error:
        raise UserError(f"the model does not take {splits.name} images {splits.input_size}: "
                        f"{str(error).splitlines()[0]}") from error
    finally:
        model.train(was_training)
    if scores.ndim != 2 or scores.shape[1] != splits.num_classes:
        raise UserError(f"the model gives {tuple(scores.shape[1:])} scores per image but {splits.name} has "
                        f"{splits.num_classes} classes: pass the --dataset it was trained on")


def load_model_file(
    path: str | os.PathLike,
    *,
    arch: str | None = None,
    rank: int = 0,
    compress_rate: str | None = None,
) -> tuple[nn.Module, dict[str, Any]]:
    """``(model, training_args)`` from ``path``: a training checkpoint, a ``norton.save`` file, or (with
    ``arch``) the authors' released ``{"state_dict": ...}`` checkpoint of ``create_model(arch, rank=, compress_rate=)``.

    ``training_args`` say what the model was trained with: a training checkpoint's ``args``, a
    norton file's ``metadata`` (e.g. ``{"dataset": ...}``), ``{}`` for the authors' files.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise UserError(f"checkpoint {path} not found: check --ckpt")
    if arch is not None:
        return load_reference_checkpoint(path, arch, rank, compress_rate), {}
    content = _read(path)
    if is_training_checkpoint(content):
        return model_from_checkpoint(content), dict(content.get("args") or {})
    if isinstance(content, dict) and "state_dict" in content and "format" not in content:
        raise UserError(f"{path} holds a bare state_dict (the reference's format): describe its model with "
                        "--arch, -r and -cpr")
    metadata = content.get("metadata") if isinstance(content, dict) else None
    return load(path), dict(metadata) if isinstance(metadata, dict) else {}


def _read(path: Path) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # not a torch file, truncated, or holds objects other than tensors and plain data
        first = str(error).strip().splitlines()[0][:160] if str(error).strip() else ""
        raise UserError(f"cannot read {path} as a checkpoint ({type(error).__name__}: {first}); "
                        "is it a model file written by norton or torch.save?") from error
