"""Training a detector: the torchvision detection reference's recipe, resumable, with DDP and progress bars.

:func:`train_detector` trains a torchvision R-CNN (``model(images, targets)`` returns a dict of
losses) the way ``references/detection/train.py`` does by default:

* SGD, momentum 0.9, weight decay 1e-4, lr 0.02 for 16 images per step, scaled linearly
  with the images per step (batch size x processes): ``lr = 0.02 * batch * world / 16``;
* a linear warm-up over the first ``min(warmup_iters, steps_per_epoch - 1)`` iterations from
  ``1e-3 * lr`` (the reference warms up during the first epoch only);
* the lr times 0.1 after epochs 16 and 22 of 26. Asked for ``E != 26`` epochs without
  explicit ``lr_steps``, the steps move with the schedule's length:
  ``max(1, round(16 * E / 26))`` and ``max(1, round(22 * E / 26))`` (12 epochs: 7 and 10).

One :class:`DetectionSchedule` (a ``LambdaLR`` factor, stepped every iteration) holds the
warm-up and the steps, so a resume restores it exactly. The best epoch is the one with the
highest validation AP (``evaluate_detector``: box AP, keypoint AP for keypoint R-CNN); without a
validation loader it is the last. Checkpoints are :mod:`norton.training.checkpoint`'s format
(``last.pt``, ``best.pt``, ``metrics.jsonl`` in ``checkpoint_dir``), so ``norton evaluate``,
``norton.load``-style readers and ``--resume`` work on them as on a classifier's.
"""
from __future__ import annotations

import math
import os
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from norton.errors import UserError
from norton.io import append_jsonl, atomic_save, write_jsonl
from norton.limits import check_epochs, check_finite, check_int, check_learning_rate
from norton.training.checkpoint import (
    CHECKPOINT_FORMAT,
    CHECKPOINT_VERSION,
    check_output_dir,
    check_same_recipe,
    cpu_state_dict,
    load_checkpoint,
    model_record,
    plain,
    rng_state,
    set_rng_state,
)
from norton.training.distributed import (
    broadcast_buffers,
    epoch_seed,
    rank_and_world,
    resolve_device,
    seed_everything,
    shows_progress,
)

# The reference's defaults (torchvision references/detection/train.py).
REFERENCE_LR = 0.02  # for REFERENCE_BATCH images per step
REFERENCE_BATCH = 16
REFERENCE_EPOCHS = 26
REFERENCE_STEPS = (16, 22)
LR_GAMMA = 0.1
WARMUP_FACTOR = 1e-3


# --------------------------------------------------------------------------- the recipe


def reference_lr(images_per_step: int) -> float:
    """The reference's learning rate for ``images_per_step`` (batch size x processes): 0.02 per 16 images."""
    return REFERENCE_LR * images_per_step / REFERENCE_BATCH


def scaled_lr_steps(epochs: int) -> tuple[int, ...]:
    """The reference's steps (16, 22 of 26 epochs) moved to a schedule of ``epochs``; at least epoch 1."""
    return tuple(max(1, round(step * epochs / REFERENCE_EPOCHS)) for step in REFERENCE_STEPS)


class DetectionSchedule:
    """LR factor at iteration ``t`` (counted from 0 over the whole run): warm-up times steps.

    ``warmup(t) = f + (1 - f) * min(t, W) / W`` (``W = warmup_iters``, 1 when ``W = 0``) and
    ``steps(t) = gamma ** #{m in milestones : m <= t // steps_per_epoch}``: the lr drops when
    epoch ``m + 1`` (counted from 1) starts, as ``MultiStepLR(milestones)`` stepped per epoch does.
    A plain object, not a lambda, so ``LambdaLR.state_dict()`` records its fields.
    """

    def __init__(self, *, steps_per_epoch: int, milestones: Sequence[int], warmup_iters: int,
                 warmup_factor: float = WARMUP_FACTOR, gamma: float = LR_GAMMA) -> None:
        self.steps_per_epoch = steps_per_epoch
        self.milestones = [int(m) for m in milestones]
        self.warmup_iters = warmup_iters
        self.warmup_factor = warmup_factor
        self.gamma = gamma

    def __call__(self, step: int) -> float:
        warm = 1.0
        if self.warmup_iters > 0 and step < self.warmup_iters:
            warm = self.warmup_factor + (1.0 - self.warmup_factor) * step / self.warmup_iters
        epoch = step // self.steps_per_epoch  # counted from 0
        return warm * self.gamma ** sum(1 for m in self.milestones if m <= epoch)


def build_detection_scheduler(
    optimizer: torch.optim.Optimizer, *, steps_per_epoch: int, milestones: Sequence[int], warmup_iters: int,
    warmup_factor: float = WARMUP_FACTOR,
) -> torch.optim.lr_scheduler.LambdaLR:
    """The per-iteration :class:`DetectionSchedule`; the warm-up is capped at one epoch, as the reference's is."""
    warmup = min(warmup_iters, steps_per_epoch - 1)
    factor = DetectionSchedule(steps_per_epoch=steps_per_epoch, milestones=milestones, warmup_iters=max(0, warmup),
                               warmup_factor=warmup_factor)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def images_per_batch(loader: DataLoader) -> int | None:
    """The loader's batch size (plain or grouped batch sampler), or ``None`` when it does not say."""
    size = getattr(loader, "batch_size", None) or getattr(loader.batch_sampler, "batch_size", None)
    return int(size) if isinstance(size, int) else None


# --------------------------------------------------------------------------- one epoch


def _to_device(images: Sequence[Tensor], targets: Sequence[Mapping[str, Any]], device: torch.device
               ) -> tuple[list[Tensor], list[dict[str, Any]]]:
    moved = [image.to(device, non_blocking=True) for image in images]
    return moved, [{k: v.to(device, non_blocking=True) if isinstance(v, Tensor) else v for k, v in t.items()}
                   for t in targets]


def train_one_epoch_detector(
    model: nn.Module,
    loader: DataLoader,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    *,
    device: torch.device,
    scaler: torch.amp.GradScaler | None = None,
    progress: bool = True,
    desc: str = "train",
    lr_hint: float | None = None,
) -> dict[str, float]:
    """One pass over ``loader``; the scheduler steps after every batch.

    Returns the mean of each loss term (``loss_classifier``, ``loss_box_reg``, ... and their sum
    ``loss``) over this rank's batches, and ``lr`` of the last step. A non-finite loss stops at once
    with a ``UserError`` naming the epoch's iteration and the terms (nothing is stepped with it).
    """
    model.train()
    amp = scaler is not None and scaler.is_enabled()
    sums: dict[str, float] = {}
    batches = 0
    lr = optimizer.param_groups[0]["lr"]
    bar = tqdm(loader, desc=desc, leave=False, dynamic_ncols=True, disable=not shows_progress(progress))
    for step, (images, targets) in enumerate(bar):
        images, targets = _to_device(images, targets, device)
        with torch.autocast(device.type, dtype=torch.float16, enabled=amp):
            loss_dict = model(images, targets)
            loss = sum(loss_dict.values())
        values = {key: float(value.detach()) for key, value in loss_dict.items()}
        total = float(loss.detach())
        if not math.isfinite(total):
            terms = ", ".join(f"{key} {value:.4g}" for key, value in values.items())
            raise UserError(f"training diverged at iteration {step + 1} of {desc}: the loss is {total} ({terms}); "
                            f"lower --lr (it is {lr_hint if lr_hint is not None else lr:g})")
        optimizer.zero_grad(set_to_none=True)
        if amp:
            assert scaler is not None
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            optimizer.step()
        lr = optimizer.param_groups[0]["lr"]
        scheduler.step()
        for key, value in {**values, "loss": total}.items():
            sums[key] = sums.get(key, 0.0) + value
        batches += 1
        if not bar.disable:
            bar.set_postfix(loss=f"{total:.3f}", lr=f"{lr:.3g}")
    if batches == 0:
        raise UserError("the training loader gave no batches: the training split is empty")
    return {**{key: value / batches for key, value in sums.items()}, "lr": lr}


# --------------------------------------------------------------------------- the run


def primary_ap(metrics: Mapping[str, Mapping[str, float]]) -> float:
    """The AP that chooses the best epoch: keypoint AP for a keypoint R-CNN, else box AP."""
    return float(metrics["keypoints"]["AP"] if "keypoints" in metrics else metrics["bbox"]["AP"])


def _set_epoch(loader: DataLoader, epoch: int) -> None:
    """Reshuffle (distributed) samplers for ``epoch``, wherever the loader keeps one."""
    for part in (loader.sampler, loader.batch_sampler, getattr(loader.batch_sampler, "sampler", None)):
        set_epoch = getattr(part, "set_epoch", None)
        if callable(set_epoch):
            set_epoch(epoch)


def check_train_arguments(*, epochs: Any, lr: Any, momentum: Any, weight_decay: Any, lr_steps: Any,
                          warmup_iters: Any) -> tuple[int, tuple[int, ...]]:
    """``(epochs, lr_steps)`` checked (one line each), before any model is moved or data read."""
    epochs = check_epochs(epochs, "epochs", minimum=1)
    if lr is not None:
        check_learning_rate(lr, "learning rate")
    if check_finite(momentum, "momentum", minimum=0) >= 1:
        raise UserError(f"momentum must lie in [0, 1), got {momentum!r}")
    check_finite(weight_decay, "weight decay", minimum=0)
    check_int(warmup_iters, "warmup_iters", minimum=0)
    steps = scaled_lr_steps(epochs) if lr_steps is None else tuple(lr_steps)
    for step in steps:
        check_int(step, "lr step", minimum=1, maximum=epochs)
    if list(steps) != sorted(steps):
        raise UserError(f"lr_steps must be increasing epochs, got {list(steps)}")
    return epochs, steps


def train_detector(
    model: nn.Module,
    train_loader: DataLoader,
    val_loader: DataLoader | None = None,
    *,
    epochs: int = REFERENCE_EPOCHS,
    lr: float | None = None,
    momentum: float = 0.9,
    weight_decay: float = 1e-4,
    lr_steps: Sequence[int] | None = None,
    warmup_iters: int = 1000,
    amp: bool = False,
    checkpoint_dir: str | os.PathLike | None = None,
    resume: bool = False,
    progress: bool = True,
    device: str | torch.device | None = None,
    seed: int = 0,
    verbose: bool = True,
    args: Mapping[str, Any] | None = None,
) -> list[dict[str, Any]]:
    """Train a torchvision detector with the reference's recipe; returns the per-epoch history.

    Args:
        lr: default ``0.02 * batch * world / 16`` (the batch size read from ``train_loader``).
        lr_steps: epochs (counted from 1 as "after epoch m") where the lr is multiplied by 0.1;
            default the reference's 16 and 22 of 26, scaled to ``epochs`` (module docstring).
        warmup_iters: linear warm-up iterations from ``1e-3 * lr``, at most one epoch.
        amp: float16 autocast with a gradient scaler; CUDA only (a one-line error on the CPU,
            where float16 training is not supported and bfloat16 detection ops are not all there).
        checkpoint_dir: where ``metrics.jsonl``, ``last.pt`` and ``best.pt`` go (nothing written when ``None``).
        resume: continue from ``checkpoint_dir/last.pt`` (same settings; a different model or recipe is
            refused with one line naming the difference).
        device: ``None``/``"auto"``: CUDA if present (``cuda:$LOCAL_RANK`` under torchrun).
        seed: each epoch's randomness comes from ``(seed, epoch, rank)`` so a resumed run repeats an
            uninterrupted one.
        args: plain data stored in the checkpoints (the command line).

    Under ``torchrun`` (after :func:`norton.training.distributed.init_distributed`, with loaders from
    :func:`norton.detection.coco.detection_loader`, which shard by rank) the model is wrapped in DDP,
    every rank validates its shard and rank 0 writes the checkpoints.
    ``model`` is left holding the best epoch's weights, on ``device``.
    """
    epochs, steps = check_train_arguments(epochs=epochs, lr=lr, momentum=momentum, weight_decay=weight_decay,
                                          lr_steps=lr_steps, warmup_iters=warmup_iters)
    out = Path(checkpoint_dir).expanduser() if checkpoint_dir is not None else None
    check_output_dir(out, resume=resume)
    device = resolve_device("auto" if device is None else device)
    if amp and device.type != "cuda":
        raise UserError(f"--amp (float16 mixed precision) needs a CUDA device, this run is on {device}: drop --amp")
    steps_per_epoch = len(train_loader)
    if steps_per_epoch == 0:
        raise UserError("the training split is empty: no batches to train on")
    rank, world = rank_and_world()
    if lr is None:
        batch = images_per_batch(train_loader)
        if batch is None:
            raise UserError("the loader does not say its batch size: pass lr= (the reference uses 0.02 per 16 images)")
        lr = reference_lr(batch * world)
    model_without_ddp = model.module if isinstance(model, DistributedDataParallel) else model
    model_without_ddp.to(device)
    train_model: nn.Module = model_without_ddp
    if world > 1:
        train_model = DistributedDataParallel(model_without_ddp,
                                              device_ids=[device.index] if device.type == "cuda" else None)
    params = [p for p in model_without_ddp.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    scheduler = build_detection_scheduler(optimizer, steps_per_epoch=steps_per_epoch, milestones=steps,
                                          warmup_iters=warmup_iters)
    scaler = torch.amp.GradScaler("cuda", enabled=amp)
    settings = {"epochs": epochs, "lr": lr, "momentum": momentum, "weight_decay": weight_decay,
                "lr_steps": list(steps), "warmup_iters": warmup_iters, "amp": amp, "seed": seed,
                "steps_per_epoch": steps_per_epoch, "world_size": world}
    history: list[dict[str, Any]] = []
    best: dict[str, Any] = {"epoch": 0, "val_ap": None}
    best_state: dict[str, Tensor] | None = None
    start = 0
    log_dir = out if rank == 0 else None
    if resume:
        assert out is not None  # check_output_dir refuses resume without a folder
        path = out / "last.pt"
        checkpoint = load_checkpoint(path)
        check_same_recipe(checkpoint["recipe"], settings, path)
        _check_same_model(model_without_ddp, checkpoint["model"]["state_dict"], path)
        model_without_ddp.load_state_dict(checkpoint["model"]["state_dict"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        scheduler.load_state_dict(checkpoint["scheduler"])
        scaler.load_state_dict(checkpoint["scaler"])
        set_rng_state(checkpoint["rng"])
        start, history, best = checkpoint["epoch"], list(checkpoint["history"]), dict(checkpoint["best"])
        best_state = checkpoint["best_state_dict"] or cpu_state_dict(model_without_ddp)
        if log_dir is not None:
            write_jsonl(history, log_dir / "metrics.jsonl")
    elif log_dir is not None:
        write_jsonl([], log_dir / "metrics.jsonl")
    saved_args = plain(dict(args or {}))
    for epoch in range(start + 1, epochs + 1):
        started = time.perf_counter()
        seed_everything(epoch_seed(seed, epoch, rank))
        _set_epoch(train_loader, epoch)
        train = train_one_epoch_detector(train_model, train_loader, optimizer, scheduler, device=device,
                                         scaler=scaler, progress=progress, desc=f"epoch {epoch}/{epochs}", lr_hint=lr)
        val = _validate(model_without_ddp, val_loader, progress=progress)
        val_ap = None if val is None else primary_ap(val)
        improved = val_ap is None or best["val_ap"] is None or val_ap > best["val_ap"]
        if improved:
            best = {"epoch": epoch, "val_ap": val_ap}
            best_state = cpu_state_dict(model_without_ddp)
        record = {"kind": "epoch", "epoch": epoch, "lr": train.pop("lr"), "train_loss": train.pop("loss"),
                  **{f"train_{key}": value for key, value in train.items()}, "val": val, "val_ap": val_ap,
                  "best_epoch": best["epoch"], "best_val_ap": best["val_ap"], "seconds": time.perf_counter() - started}
        history.append(record)
        if log_dir is not None:
            _save_epoch(log_dir, model_without_ddp, record, improved=improved, best=best, best_state=best_state,
                        optimizer=optimizer, scheduler=scheduler, scaler=scaler, settings=settings,
                        history=history, args=saved_args)
        if rank == 0 and verbose:
            print(format_epoch(record, epochs), file=sys.stderr, flush=True)
    if best_state is not None:
        model_without_ddp.load_state_dict(best_state)
    return history


def _check_same_model(model: nn.Module, state: Mapping[str, Any], path: Path) -> None:
    """``UserError`` naming the first entry where ``state`` does not fit ``model`` (before anything is loaded)."""
    expected = model.state_dict()
    for key, tensor in expected.items():
        got = state.get(key)
        if not isinstance(got, Tensor) or got.shape != tensor.shape:
            found = "missing" if got is None else tuple(got.shape) if isinstance(got, Tensor) else type(got).__name__
            raise UserError(f"{path} holds a different model than the one given ({key}: {found} in the checkpoint, "
                            f"{tuple(tensor.shape)} in the model): resume with the same --model")
    extra = next((key for key in state if key not in expected), None)
    if extra is not None:
        raise UserError(f"{path} holds a different model than the one given (it has {extra}, the model does not): "
                        "resume with the same --model")


def _validate(model: nn.Module, loader: DataLoader | None, *, progress: bool) -> dict[str, dict[str, float]] | None:
    """COCO metrics of ``model`` on ``loader``: under torchrun every rank scores its shard (rank 0's
    BatchNorm statistics, the saved ones) and ``evaluate_detector`` gathers the results."""
    if loader is None:
        return None
    from norton.detection.evaluate import evaluate_detector

    broadcast_buffers(model)
    return evaluate_detector(model, loader, progress=shows_progress(progress))


def _save_epoch(folder: Path, model: nn.Module, record: dict[str, Any], *, improved: bool, best: dict[str, Any],
                best_state: dict[str, Tensor] | None, optimizer: torch.optim.Optimizer,
                scheduler: torch.optim.lr_scheduler.LambdaLR, scaler: torch.amp.GradScaler,
                settings: dict[str, Any], history: list[dict[str, Any]], args: Any) -> None:
    """``metrics.jsonl`` line, ``best.pt`` (if improved) then ``last.pt``: the classification loop's format."""
    append_jsonl(record, folder / "metrics.jsonl")
    common = {"format": CHECKPOINT_FORMAT, "format_version": CHECKPOINT_VERSION, "epoch": record["epoch"],
              "best": best, "metrics": plain(record), "recipe": settings, "args": args}
    if improved:  # first: a crash between the writes leaves last.pt one epoch behind, redone identically
        atomic_save({**common, "model": model_record(model)}, folder / "best.pt")
    atomic_save({**common, "model": model_record(model), "best_state_dict": None if improved else best_state,
                 "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                 "scaler": scaler.state_dict(), "rng": rng_state(), "history": plain(history)}, folder / "last.pt")


def format_epoch(record: Mapping[str, Any], epochs: int) -> str:
    """One line per epoch: lr, the training loss, the validation AP and the best so far."""
    line = f"epoch {record['epoch']}/{epochs}  lr {record['lr']:.4g}  train loss {record['train_loss']:.4f}"
    if record["val_ap"] is not None:
        line += f"  val AP {record['val_ap']:.2f}  best {record['best_val_ap']:.2f} (epoch {record['best_epoch']})"
    return line + f"  {record['seconds']:.1f}s"


__all__ = ["DetectionSchedule", "build_detection_scheduler", "reference_lr", "scaled_lr_steps", "train_detector",
           "train_one_epoch_detector"]
