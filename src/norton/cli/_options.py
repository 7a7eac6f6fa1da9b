"""Options shared by the ``norton`` commands, defined once, and the small steps that turn them into objects.

A command adds what it needs::

    add_model_options(parser)          # --arch, -r/--rank, -cpr/--compress_rate
    add_ckpt_option(parser)            # --ckpt
    add_data_options(parser)           # --dataset, --data_dir, --batch_size, --workers, --limit, --val_size, --download
    add_training_options(parser)       # --epochs, --lr, --momentum, --weight_decay, --warmup_epochs, ...
    add_distillation_options(parser, teacher_file=...)  # --teacher or --distill, --distill-alpha/-temperature
    add_run_options(parser)            # --device, --seed, --output, --json

and then calls the library with explicit arguments (reading model files:
:func:`norton.serialization.load_model_file`; a whole compression run:
:func:`norton.workflow.run_compression`).
Option spellings follow the NORTON reference (``--data_dir``, ``--batch_size``,
``-cpr``); the dashed forms (``--data-dir``) are accepted too.
"""
from __future__ import annotations

import argparse
from typing import Any

from norton.errors import UserError
from norton.limits import MAX_RANK, check_distillation, check_int
from norton.training import DATASETS
from norton.training.recipes import DISTILL_ALPHA, DISTILL_TEMPERATURE, RECIPES

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
    group.add_argument("--epochs", type=int, default=None, help=f"epochs (CIFAR default {example.epochs})")
    group.add_argument("--lr", type=float, default=None, help=f"peak learning rate (CIFAR default {example.lr})")
    group.add_argument("--momentum", type=float, default=None, help="SGD momentum")
    group.add_argument("--weight_decay", "--weight-decay", "--wd", dest="weight_decay", type=float, default=None,
                       help="weight decay")
    group.add_argument("--warmup_epochs", "--warmup-epochs", dest="warmup_epochs", type=float, default=None,
                       help="linear warm-up epochs before the cosine decay")
    group.add_argument("--label_smoothing", "--label-smoothing", dest="label_smoothing", type=float, default=None,
                       help="label smoothing of the training loss")
    group.add_argument("--amp", action="store_true", help="float16 mixed precision (CUDA only)")
    group.add_argument("--resume", action="store_true", help="continue the run in --output from its last.pt")


def add_distillation_options(parser: argparse.ArgumentParser, *, teacher_file: bool) -> None:
    """``--teacher FILE`` (``teacher_file``) or ``--distill`` (the uncompressed model teaches), with
    ``--distill-alpha`` and ``--distill-temperature`` (docs/training.md, "Knowledge distillation")."""
    group = parser.add_argument_group("knowledge distillation",
                                      "training loss alpha*T^2*KL(teacher || model at T) + (1-alpha)*cross-entropy")
    if teacher_file:
        group.add_argument("--teacher", default=None, metavar="FILE",
                           help="distil from this model file (norton file or training checkpoint, same classes)")
    else:
        group.add_argument("--distill", action="store_true",
                           help="fine-tune every stage with the uncompressed model as teacher")
    group.add_argument("--distill-alpha", "--distill_alpha", dest="distill_alpha", type=float, default=None,
                       metavar="A", help=f"weight of the teacher's term, in [0, 1] (default {DISTILL_ALPHA:g})")
    group.add_argument("--distill-temperature", "--distill_temperature", dest="distill_temperature", type=float,
                       default=None, metavar="T", help=f"softmax temperature, > 0 (default {DISTILL_TEMPERATURE:g})")


def add_run_options(parser: argparse.ArgumentParser, *, output: bool = True, output_help: str | None = None) -> None:
    """``--device``, ``--seed``, ``--json`` and (optionally) ``--output``."""
    parser.add_argument("--device", default="auto", help="auto (CUDA if present), cpu, cuda or cuda:N (default auto)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    if output:
        parser.add_argument("--output", "-o", default=None, metavar="DIR",
                            help=output_help or "output folder (default runs/<arch>-<dataset>)")
    parser.add_argument("--json", action="store_true", help="print one JSON object on stdout")


# --------------------------------------------------------------------------- options -> objects


def plain_args(args: argparse.Namespace) -> dict[str, Any]:
    """The parsed options as plain data (for checkpoints and JSON), without the handler function."""
    return {key: value for key, value in vars(args).items() if key != "func" and not callable(value)}


def print_json(obj: Any) -> None:
    """``obj`` as strict JSON on stdout (NaN as null, other objects by their ``str``)."""
    from norton.report import to_json

    print(to_json(obj, default=str))


# The decomposition methods (norton.decomposition.methods.METHODS), named here without importing torch.
DECOMPOSITION_METHODS = ("cp-filter", "tucker2", "cp-layer", "svd")


def add_decomposition_options(parser: argparse.ArgumentParser, *, rank_required: bool = True) -> None:
    """``--method`` and ``-r/--rank SPEC``: how to decompose, and at which rank (see docs/decompositions.md)."""
    parser.add_argument("--method", choices=DECOMPOSITION_METHODS, default="cp-filter",
                        help="cp-filter (NORTON's CPDBlock, default), tucker2, cp-layer or svd")
    parser.add_argument("-r", "--rank", type=rank_spec_option, required=rank_required, metavar="SPEC",
                        help="rank of every decomposed layer: an int (>= 1), 'vbmf', 'energy:F' (keep fraction F "
                             "of the spectral energy) or 'macs:F' (keep fraction F of each layer's MACs)")


def rank_spec_option(value: str) -> int | str:
    """``-r SPEC``: a whole number becomes an int (bounded later, as ranks are); anything else is a spec string,
    checked when the command runs (:func:`check_rank_spec_option`)."""
    text = value.strip()
    if text.lstrip("-").isdigit():
        return int(text)
    return text


def check_rank_spec_option(value: int | str) -> None:
    """``UserError`` for a spec string the library would refuse (imports the parser, and torch, only for specs)."""
    if isinstance(value, str):
        from norton.decomposition.rank_selection import parse_rank_spec

        parse_rank_spec(value)


def rank_option(value: int) -> int | None:
    """``-r``: 0 means no decomposition (``None``); otherwise a rank within :data:`norton.limits.MAX_RANK`."""
    check_int(value, "-r/--rank", minimum=0, maximum=MAX_RANK)
    return value or None


def finetune_distillation(args: argparse.Namespace) -> dict[str, Any]:
    """The ``FineTune`` fields of ``--distill`` (the uncompressed model teaches), checked."""
    return {"distill": args.distill, **distillation_options(args, switch="--distill", on=args.distill)}


def distillation_options(args: argparse.Namespace, *, switch: str, on: bool) -> dict[str, float]:
    """``{"distill_alpha", "distill_temperature"}`` from the options (defaults filled in), checked;
    a value given without ``switch`` (``--distill`` or ``--teacher``, ``on`` when given) is refused."""
    given = [name for name, value in (("--distill-alpha", args.distill_alpha),
                                      ("--distill-temperature", args.distill_temperature)) if value is not None]
    if given and not on:
        raise UserError(f"{given[0]} applies to knowledge distillation: add {switch} or drop it")
    alpha = DISTILL_ALPHA if args.distill_alpha is None else args.distill_alpha
    temperature = DISTILL_TEMPERATURE if args.distill_temperature is None else args.distill_temperature
    alpha, temperature = check_distillation(alpha, temperature)
    return {"distill_alpha": alpha, "distill_temperature": temperature}
