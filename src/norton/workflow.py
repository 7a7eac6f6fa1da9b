"""A compression run from files to files: what ``norton compress``, ``decompose``, ``prune`` and ``demo`` do.

:func:`run_compression` reads a model file (or trains a baseline of a zoo architecture),
builds the data, runs :func:`norton.pipeline.compress`, times the baseline and the
compressed model on the CPU, and leaves in ``output_dir``:

* ``baseline/`` (when the baseline is trained here), ``decomposed/``, ``pruned/``: the stage folders;
* ``compressed.pt``: the final model (:func:`norton.load` reads it);
* ``summary.json``, ``summary.txt``, ``report.png``: the report.

Every argument is checked first, before a file is read, data is loaded or a model
is trained, so a typo costs nothing and leaves nothing behind that blocks the
corrected rerun.
"""
from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

from norton.compress_arguments import (
    FineTune,
    check_compress_arguments,
    check_compress_output,
    resolve_criterion,
    resolve_order,
)
from norton.errors import UserError
from norton.limits import check_epochs, check_int, check_learning_rate, check_loader_options, check_split_options
from norton.training import DATASETS

if TYPE_CHECKING:  # torch is imported once the arguments are checked: a typo costs no import time
    import torch
    from torch import nn

    from norton.training.datasets import DataSplits

Log = Callable[[str], None]


def default_dataset(arch: str | None) -> str:
    """The dataset an architecture is built for: its registry entry's, ImageNet for torchvision models."""
    if arch is None:
        return "cifar10"
    if arch.startswith("torchvision."):
        return "imagenet"
    from norton.models import get_model_entry

    return get_model_entry(arch).dataset


def check_model_fits(model: nn.Module, splits: DataSplits) -> None:
    """``UserError`` unless ``model`` maps one image of ``splits`` to ``splits.num_classes`` scores."""
    import torch

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
                        f"{splits.num_classes} classes: pass the dataset it was trained on")


def run_compression(
    *,
    output_dir: str | os.PathLike,
    model_file: str | os.PathLike | None = None,
    arch: str | None = None,
    dataset: str | None = None,
    data_dir: str | os.PathLike | None = None,
    limit: int | None = None,
    val_size: int | None = None,
    download: bool = False,
    train_limit: int | None = None,
    splits: DataSplits | None = None,
    batch_size: int = 128,
    workers: int = 2,
    rank: int | tuple[int, int] | str | None = None,
    compress_rate: str | Sequence[float] | None = None,
    ratio: float | Mapping[str, float] | None = None,
    target_macs: float | None = None,
    target_latency: float | str | None = None,
    criterion: str | None = None,
    round_to: int | None = None,
    order: str | None = None,
    decompose_method: str = "cp-filter",
    baseline_epochs: int | None = None,
    baseline_lr: float = 0.1,
    decompose_finetune: FineTune | None = None,
    prune_finetune: FineTune | None = None,
    resume: bool = False,
    device: str | torch.device = "auto",
    seed: int = 0,
    progress: bool = True,
    measure_latency: bool = True,
    title: str = "norton compress",
    log: Log | None = print,
    calibration_distill_steps: int = 0,
    prune_ranks: bool = False,
) -> dict[str, Any]:
    """Compress the model in ``model_file`` (or a baseline of ``arch`` trained here) and write a report.

    Args:
        output_dir: the run's folder (stage folders, ``compressed.pt``, the report).
        model_file: a trained model: a norton file or a training checkpoint. Without it,
            ``arch`` is trained for ``baseline_epochs`` (default 1) at ``baseline_lr`` first.
        dataset, data_dir, limit, val_size, download: the data (:func:`norton.build_datasets`);
            ``dataset`` defaults to the one the file was trained on, else the architecture's.
        train_limit: use at most this many training images (``limit`` cuts every split;
            this keeps the validation and test splits whole, so accuracies stay comparable).
        splits: ready-made data instead (``dataset`` ... ``train_limit`` are then unused).
        batch_size, workers: of the data loaders.
        rank, compress_rate, ratio, target_macs, criterion, round_to, order, decompose_method,
        decompose_finetune, prune_finetune, calibration_distill_steps, prune_ranks: as in
            :func:`norton.pipeline.compress`
            (``target_macs`` is a fraction of the original model's MACs; a ``FineTune(distill=True)``
            stage distils from the model read from ``model_file``, or the baseline trained here).
        resume: continue a killed run in ``output_dir``.
        measure_latency: time both models on the CPU (batch 1 and 32) for the report.
        title: the command named in the summary.
        log: where progress lines go (``None``: nowhere).

    Returns the summary written to ``summary.json`` (its ``stages`` are the records of
    :func:`~norton.pipeline.compress`), with ``files``: the report's paths.
    """
    started = time.perf_counter()
    say: Log = log or (lambda message: None)
    # ------------------------------------------------ every argument, before any work
    if model_file is None and arch is None:
        raise UserError("give a model file (a trained baseline) or an architecture to train here first")
    if model_file is not None and not Path(model_file).expanduser().is_file():
        raise UserError(f"checkpoint {Path(model_file).expanduser()} not found: check the path")
    epochs = 1 if baseline_epochs is None else check_epochs(baseline_epochs, "baseline_epochs", minimum=1)
    check_learning_rate(baseline_lr, "baseline learning rate")
    check_loader_options(batch_size=batch_size, workers=workers)
    check_split_options(limit=limit, val_size=val_size)
    if train_limit is not None:
        check_int(train_limit, "train_limit")
    if dataset is not None and splits is None and dataset not in DATASETS:
        raise UserError(f"unknown dataset {dataset!r}; choose from {', '.join(DATASETS)}")
    order = resolve_order(order, rank=rank, compress_rate=compress_rate, ratio=ratio, target_macs=target_macs,
                          target_latency=target_latency)
    criterion = resolve_criterion(criterion, order)
    # Last of the checks: a pruning criterion is looked up in its registry, which imports torch.
    amounts = check_compress_arguments(
        rank=rank, compress_rate=compress_rate, ratio=ratio, target_macs=target_macs, criterion=criterion,
        round_to=round_to, order=order, decompose_finetune=decompose_finetune, prune_finetune=prune_finetune,
        target_latency=target_latency, calibration_distill_steps=calibration_distill_steps, prune_ranks=prune_ranks,
    )
    output = Path(output_dir).expanduser()
    check_compress_output(output, resume=resume)
    # Only now the library (and torch) is imported.
    import torch

    from norton.models import create_model
    from norton.pipeline import check_rank_fits, compress
    from norton.report import write_report
    from norton.serialization import load_model_file, save
    from norton.training.checkpoint import check_output_dir
    from norton.training.datasets import build_datasets
    from norton.training.distributed import resolve_device, seed_everything
    from norton.training.loaders import build_loaders
    from norton.training.loop import fit

    if model_file is None and not resume:
        check_output_dir(output / "baseline", resume=False)
    device = resolve_device(device)
    seed_everything(seed)

    # ------------------------------------------------ the model and the data
    model: nn.Module | None = None
    trained_with: dict[str, Any] = {}
    if model_file is not None:
        model, trained_with = load_model_file(model_file)
        check_rank_fits(model, rank)  # before the data is loaded
    else:
        assert arch is not None  # checked above: no model file means an architecture
        with torch.device("meta"):  # shapes only, no memory: the rank check before the data is loaded
            check_rank_fits(create_model(arch), rank)
    name = arch or (getattr(model, "norton_architecture", None) or {}).get("name")
    if splits is None:
        dataset = dataset or trained_with.get("dataset") or default_dataset(name)
        splits = build_datasets(dataset, data_dir, limit=limit, val_size=val_size, seed=seed, download=download)
        splits = _limit_training(splits, train_limit, seed)
    if model is None:
        assert arch is not None
        model = create_model(arch, num_classes=splits.num_classes, in_channels=splits.in_channels)
        check_rank_fits(model, rank)  # in_channels may differ from the default
    check_model_fits(model, splits)
    loaders = build_loaders(splits, batch_size=batch_size, workers=workers, seed=seed,
                            pin_memory=device.type == "cuda")
    if model_file is None:
        say(f"training the baseline {name} on {splits.name} for {epochs} epoch(s) ...")
        folder = output / "baseline"
        fit(model, loaders, epochs=epochs, lr=baseline_lr, device=device, output_dir=folder,
            resume=resume and (folder / "last.pt").exists(), seed=seed, progress=progress,
            verbose=log is not None, args={"stage": "baseline", "arch": name, "dataset": splits.name})
        model.to("cpu")

    # ------------------------------------------------ compress, time, save, report
    result = compress(
        model, loaders, input_size=splits.input_size, rank=rank, criterion=criterion, round_to=round_to,
        order=order, decompose_method=decompose_method, decompose_finetune=decompose_finetune,
        prune_finetune=prune_finetune, output_dir=output,
        resume=resume, device=device, seed=seed, progress=progress, log=say,
        calibration_distill_steps=calibration_distill_steps, prune_ranks=prune_ranks, **amounts,
    )
    if measure_latency:
        say("measuring CPU latency (batch 1 and 32) of the baseline and the compressed model ...")
        latency = _latency(model, result.model, splits.input_size)
        for stage, which in ((result.stages[0], "baseline"), (result.stages[-1], "compressed")):
            stage["latency_ms"], stage["latency_ms_batch32"] = latency[1][which], latency[32][which]
    final_path = save(result.model, output / "compressed.pt", dataset=splits.name, stages=result.stages)
    summary: dict[str, Any] = {
        "command": title, "arch": name, "dataset": splits.name, "rank": rank, "compress_rate": compress_rate,
        "ratio": ratio, "target_macs": target_macs, "target_latency": target_latency, "criterion": criterion, "round_to": round_to, "order": order,
        "decompose_method": decompose_method, "calibration_distill_steps": calibration_distill_steps,
        "prune_ranks": prune_ranks,
        "decompose_finetune": asdict(decompose_finetune or FineTune()),
        "prune_finetune": asdict(prune_finetune or FineTune()),
        "output": str(output), "model": str(final_path), "seconds": time.perf_counter() - started,
        "stages": result.stages,
    }
    paths = write_report(output, result.stages, channels=result.channels,
                         extra={k: v for k, v in summary.items() if k != "stages"})
    summary["files"] = {kind: str(path) for kind, path in paths.items()}
    return summary


def _limit_training(splits: DataSplits, limit: int | None, seed: int) -> DataSplits:
    """Keep ``limit`` training images (chosen by ``seed``); validation and test stay whole."""
    size = len(splits.train)  # type: ignore[arg-type]  # the datasets norton builds are map-style, with a length
    if limit is None or limit >= size:
        return splits
    import torch
    from torch.utils.data import Subset

    keep = torch.randperm(size, generator=torch.Generator().manual_seed(seed))[:limit]
    return dataclasses.replace(splits, train=Subset(splits.train, keep.tolist()))


def _latency(baseline: nn.Module, compressed: nn.Module, input_size: Sequence[int]) -> dict[int, dict[str, float]]:
    """Median CPU latency (ms) of both models, each in its fastest inference form, at batch 1 and 32."""
    from norton.deploy.benchmark import compare_models

    timings = compare_models({"baseline": baseline, "compressed": compressed}, input_size, batch_sizes=(1, 32),
                             device="cpu", optimize=True, repeats=20, memory=False)
    return {batch: {name: t.latency.median_ms for name, t in row.items()} for batch, row in timings.items()}
