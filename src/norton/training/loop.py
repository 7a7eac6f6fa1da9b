"""Training loops: ``train_one_epoch``, ``evaluate`` and ``fit`` with checkpoints, resume and DDP.

Plain functions in the style of torchvision's classification reference:

* ``train_one_epoch`` runs SGD over one pass of a loader and returns summed metrics;
* ``evaluate`` returns top-1/top-5 accuracy (percent) and mean loss;
* ``fit`` trains for ``epochs`` with SGD + momentum + weight decay and a per-iteration
  linear warm-up then cosine schedule, selects the best epoch on the validation
  split, writes ``metrics.jsonl``, ``last.pt`` and ``best.pt`` to ``output_dir``,
  resumes from ``last.pt``, and finally evaluates the best model on the test split.

Distributed data parallel: launch with ``torchrun`` and call :func:`init_distributed`
before building the loaders; ``fit`` then wraps the model in DDP (keeping
``model_without_ddp`` for evaluation and saving), sums metric counts over ranks and
saves on rank 0 only.

Checkpoints are dicts of tensors and plain data, loadable with
``torch.load(path, weights_only=True)``; see :func:`load_checkpoint` and docs/training.md.
"""
from __future__ import annotations

import json
import math
import os
import random
import sys
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from norton.errors import UserError
from norton.io import atomic_save, atomic_write_text
from norton.serialization import model_from_state, model_state
from norton.training.data import Loaders

CHECKPOINT_FORMAT = "norton.training_checkpoint"
CHECKPOINT_VERSION = 1

Metrics = dict[str, float]
Callback = Callable[[dict[str, Any]], None]


# --------------------------------------------------------------------------- devices and processes


def resolve_device(spec: str | torch.device = "auto") -> torch.device:
    """``"auto"`` (CUDA if present), ``"cpu"``, ``"cuda"`` or ``"cuda:N"`` -> a ``torch.device``.

    Under ``torchrun``, ``"auto"``/``"cuda"`` mean ``cuda:$LOCAL_RANK``.
    """
    if isinstance(spec, torch.device):
        return spec
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if spec == "auto":
        spec = "cuda" if torch.cuda.is_available() else "cpu"
    if spec == "cpu":
        return torch.device("cpu")
    if spec.startswith("cuda"):
        if not torch.cuda.is_available():
            raise UserError(f"device {spec!r} asked for but CUDA is not available: use --device cpu")
        device = torch.device(spec)
        if device.index is None:
            device = torch.device("cuda", local_rank % torch.cuda.device_count())
        if device.index >= torch.cuda.device_count():
            raise UserError(f"device {spec!r} does not exist: this machine has {torch.cuda.device_count()} GPU(s)")
        return device
    raise UserError(f"unknown device {spec!r}: use auto, cpu, cuda or cuda:N")


@dataclass(frozen=True)
class DistributedContext:
    """Where this process sits in a (possibly one-process) run."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device: str | torch.device = "auto") -> DistributedContext:
    """Join the process group when launched by ``torchrun`` (``WORLD_SIZE > 1``), else do nothing.

    Uses NCCL on CUDA and Gloo on CPU, reading the rendezvous from the environment.
    Call before :func:`norton.training.data.build_loaders`, which shards by rank.
    """
    device = resolve_device(device)
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if world_size <= 1:
        return DistributedContext(rank=0, world_size=1, local_rank=0, device=device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo", init_method="env://")
    return DistributedContext(dist.get_rank(), dist.get_world_size(), local_rank, device)


def cleanup_distributed() -> None:
    """Leave the process group if this process joined one."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _rank_and_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _sum_over_ranks(values: Tensor) -> Tensor:
    if _rank_and_world()[1] > 1:
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
    return values


def seed_everything(seed: int) -> None:
    """Seed torch (CPU and CUDA), Python's ``random`` and NumPy's global generator."""
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed % 2**32)


def _epoch_seed(seed: int, epoch: int, rank: int) -> int:
    # Each epoch's randomness (augmentations, worker seeds, dropout) is a function of
    # (seed, epoch, rank) alone, so a resumed run and an uninterrupted one draw the
    # same numbers, with any number of processes and loader workers.
    return ((seed * 1_000_003 + epoch) * 10_007 + rank) % 2**63


# --------------------------------------------------------------------------- recipes

# Defaults of ``fit`` per dataset group and stage (training from scratch vs fine-tuning
# after decomposition/pruning). The fine-tuning rows are the NORTON reference's
# (prune.py: CIFAR; main_imagenet.py: ImageNet); docs/training.md lists the sources.
RECIPES: dict[tuple[str, str], dict[str, Any]] = {
    ("cifar", "train"): {"epochs": 200, "lr": 0.1, "momentum": 0.9, "weight_decay": 5e-4,
                         "warmup_epochs": 0, "warmup_start_factor": 0.01, "label_smoothing": 0.0},
    ("cifar", "finetune"): {"epochs": 400, "lr": 0.05, "momentum": 0.9, "weight_decay": 5e-4,
                            "warmup_epochs": 5, "warmup_start_factor": 0.01, "label_smoothing": 0.0},
    ("imagenet", "train"): {"epochs": 90, "lr": 0.1, "momentum": 0.9, "weight_decay": 1e-4,
                            "warmup_epochs": 0, "warmup_start_factor": 0.01, "label_smoothing": 0.0},
    ("imagenet", "finetune"): {"epochs": 200, "lr": 0.01, "momentum": 0.99, "weight_decay": 1e-4,
                               "warmup_epochs": 5, "warmup_start_factor": 0.01, "label_smoothing": 0.1},
}


def recipe_for(dataset: str, *, stage: str = "train") -> dict[str, Any]:
    """A copy of the ``fit`` defaults for ``dataset`` (ImageNet, or the CIFAR-sized sets) and ``stage``."""
    if stage not in ("train", "finetune"):
        raise UserError(f"unknown training stage {stage!r}: use train or finetune")
    return dict(RECIPES[("imagenet" if dataset == "imagenet" else "cifar", stage)])


# --------------------------------------------------------------------------- optimiser and schedule


class WarmupCosine:
    """LR factor at optimiser step ``t``: linear from ``start_factor`` to 1 over ``warmup_steps``,
    then cosine from 1 to 0 at ``total_steps``.

    A plain object (not a lambda) so ``LambdaLR.state_dict()`` records its fields.
    """

    def __init__(self, *, total_steps: int, warmup_steps: int = 0, start_factor: float = 0.01) -> None:
        self.total_steps = total_steps
        self.warmup_steps = warmup_steps
        self.start_factor = start_factor

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return self.start_factor + (1.0 - self.start_factor) * step / self.warmup_steps
        progress = (step - self.warmup_steps) / max(1, self.total_steps - self.warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def build_optimizer(
    model: nn.Module, *, lr: float, momentum: float = 0.9, weight_decay: float = 5e-4
) -> torch.optim.SGD:
    """SGD with momentum and weight decay on every parameter (as the reference does)."""
    return torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)


def build_scheduler(
    optimizer: torch.optim.Optimizer,
    *,
    epochs: int,
    steps_per_epoch: int,
    warmup_epochs: float = 0,
    warmup_start_factor: float = 0.01,
) -> torch.optim.lr_scheduler.LambdaLR:
    """Per-iteration :class:`WarmupCosine` schedule; call ``step()`` after every optimiser step."""
    factor = WarmupCosine(
        total_steps=epochs * steps_per_epoch,
        warmup_steps=round(warmup_epochs * steps_per_epoch),
        start_factor=warmup_start_factor,
    )
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


# --------------------------------------------------------------------------- one epoch


def _show_bar(progress: bool) -> bool:
    return progress and _rank_and_world()[0] == 0 and sys.stderr.isatty()


def _topk_hits(logits: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
    """Numbers of top-1 and top-5 hits in a batch (top-``C`` when there are fewer than 5 classes)."""
    k = min(5, logits.shape[1])
    top = logits.topk(k, dim=1).indices  # (B, k)
    hits = top == target[:, None]  # (B, k)
    return hits[:, 0].sum(), hits.any(dim=1).sum()


def _summarise(sums: Tensor, count: int) -> Metrics:
    """This rank's ``sums = (loss_sum, top1_hits, top5_hits)`` over ``count`` images -> means over all ranks."""
    totals = torch.cat([sums, torch.tensor([count], dtype=torch.float64, device=sums.device)])  # (4,)
    loss_sum, top1, top5, count = _sum_over_ranks(totals).tolist()
    if count == 0:
        raise UserError("no images to evaluate: the split is empty (check --limit and --val_size)")
    return {"loss": loss_sum / count, "top1": 100.0 * top1 / count, "top5": 100.0 * top5 / count,
            "samples": int(count)}


def train_one_epoch(
    model: nn.Module,
    loader: DataLoader,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None,
    *,
    device: torch.device | str,
    scaler: torch.amp.GradScaler | None = None,
    label_smoothing: float = 0.0,
    progress: bool = True,
    desc: str = "train",
) -> Metrics:
    """One pass over ``loader``; the scheduler steps after every batch.

    Mixed precision (float16 autocast) runs when ``scaler`` is given and enabled.
    Returns ``{"loss", "top1", "top5", "samples", "lr"}`` over the (augmented)
    training batches, summed over ranks in a distributed run; ``lr`` is the
    learning rate of the last step.
    """
    device = torch.device(device)
    model.train()
    criterion = nn.CrossEntropyLoss(label_smoothing=label_smoothing)
    amp = scaler is not None and scaler.is_enabled()
    sums = torch.zeros(3, dtype=torch.float64, device=device)  # loss_sum, top1 hits, top5 hits
    count = 0
    lr = optimizer.param_groups[0]["lr"]
    bar = tqdm(loader, desc=desc, leave=False, dynamic_ncols=True, disable=not _show_bar(progress))
    for step, (images, target) in enumerate(bar):
        images = images.to(device, non_blocking=True)
        target = target.to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=torch.float16, enabled=amp):
            logits = model(images)
            loss = criterion(logits, target)
        optimizer.zero_grad(set_to_none=True)
        if amp:
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            optimizer.step()
        lr = optimizer.param_groups[0]["lr"]
        if scheduler is not None:
            scheduler.step()
        with torch.no_grad():
            top1, top5 = _topk_hits(logits, target)
            sums += torch.stack([loss.detach().double() * target.shape[0], top1.double(), top5.double()])
            count += target.shape[0]
        if not bar.disable and step % 10 == 0:  # .item() syncs with the GPU: not every step
            bar.set_postfix(loss=f"{loss.item():.3f}", lr=f"{lr:.4g}")
    metrics = _summarise(sums, count)
    metrics["lr"] = lr
    return metrics


@torch.no_grad()
def evaluate(
    model: nn.Module,
    loader: DataLoader,
    *,
    device: torch.device | str,
    amp: bool = False,
    progress: bool = False,
    desc: str = "eval",
) -> Metrics:
    """Top-1/top-5 accuracy (percent) and mean cross-entropy of ``model`` over ``loader``.

    Returns ``{"top1", "top5", "loss", "samples"}``. In a distributed run each rank
    evaluates its shard of ``loader`` (see :func:`norton.training.data.build_loaders`) and the
    counts are summed, so every image counts once. Pass the model without its DDP
    wrapper: shards may differ in length.
    """
    device = torch.device(device)
    model.eval()
    sums = torch.zeros(3, dtype=torch.float64, device=device)  # loss_sum, top1 hits, top5 hits
    count = 0
    for images, target in tqdm(loader, desc=desc, leave=False, dynamic_ncols=True, disable=not _show_bar(progress)):
        images = images.to(device, non_blocking=True)
        target = target.to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=torch.float16, enabled=amp and device.type == "cuda"):
            logits = model(images)
        loss = nn.functional.cross_entropy(logits.float(), target, reduction="sum")
        top1, top5 = _topk_hits(logits, target)
        sums += torch.stack([loss.double(), top1.double(), top5.double()])
        count += target.shape[0]
    return _summarise(sums, count)


# --------------------------------------------------------------------------- checkpoints


def _model_record(model: nn.Module) -> dict[str, Any]:
    """The model as plain data: ``{"architecture", "plan", "state_dict"}`` (docs/design.md).

    Models built by ``create_model`` get :func:`norton.serialization.model_state`'s record,
    which rebuilds them; a plain ``nn.Module`` gets ``architecture=None`` (weights only).
    """
    if getattr(model, "norton_architecture", None) is not None:
        return model_state(model)
    return {"architecture": None, "plan": list(getattr(model, "norton_plan", None) or []),
            "state_dict": model.state_dict()}


def _model_from_record(record: Mapping[str, Any]) -> nn.Module:
    """Rebuild the model described by :func:`_model_record` (in training mode, on the CPU)."""
    if record.get("architecture") is None:
        raise UserError("the checkpoint holds weights without an architecture (a plain nn.Module): "
                        "build the model yourself and load checkpoint['model']['state_dict'] into it")
    return model_from_state(record)


def _plain(value: Any) -> Any:
    """``value`` as JSON-like plain data (what ``torch.load(weights_only=True)`` accepts)."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, torch.device):
        return str(value)
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    return repr(value)


def _rng_state() -> dict[str, Any]:
    """This process's random generator states as tensors and plain numbers."""
    py_version, py_state, py_gauss = random.getstate()
    _, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "python": {"version": py_version, "state": torch.tensor(py_state, dtype=torch.int64), "gauss_next": py_gauss},
        "numpy": {"keys": torch.from_numpy(np_keys.astype(np.int64)), "pos": int(np_pos),
                  "has_gauss": int(np_has_gauss), "cached_gaussian": float(np_gauss)},
    }


def _set_rng_state(state: Mapping[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])
    py = state["python"]
    random.setstate((py["version"], tuple(py["state"].tolist()), py["gauss_next"]))
    npy = state["numpy"]
    np.random.set_state(("MT19937", npy["keys"].numpy().astype(np.uint32), npy["pos"], npy["has_gauss"],
                         npy["cached_gaussian"]))


def load_checkpoint(path: str | os.PathLike, *, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a training checkpoint (``last.pt``/``best.pt``) with ``weights_only=True`` and check its format."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise UserError(f"checkpoint {path} not found: check the path")
    try:
        checkpoint = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as error:  # truncated file, not a torch file, unsafe content
        raise UserError(f"cannot read checkpoint {path} ({type(error).__name__}: "
                        f"{str(error).strip().splitlines()[0] if str(error).strip() else ''})") from error
    if not isinstance(checkpoint, dict) or checkpoint.get("format") != CHECKPOINT_FORMAT:
        raise UserError(f"{path} is not a norton training checkpoint (no format={CHECKPOINT_FORMAT!r} entry)")
    if checkpoint.get("format_version", 0) > CHECKPOINT_VERSION:
        raise UserError(f"{path} was written by a newer norton (format version {checkpoint['format_version']}): "
                        "upgrade norton to read it")
    return checkpoint


def model_from_checkpoint(checkpoint: str | os.PathLike | Mapping[str, Any]) -> nn.Module:
    """The model stored in a training checkpoint, given as a path or as the loaded dict.

    ``best.pt`` holds the best epoch's weights, ``last.pt`` the last epoch's.
    """
    if not isinstance(checkpoint, Mapping):
        checkpoint = load_checkpoint(checkpoint)
    return _model_from_record(checkpoint["model"])


def is_training_checkpoint(obj: Any) -> bool:
    """Whether ``obj`` (a loaded file) is a norton training checkpoint."""
    return isinstance(obj, dict) and obj.get("format") == CHECKPOINT_FORMAT


# --------------------------------------------------------------------------- fit


@dataclass
class FitResult:
    """What :func:`fit` returns; ``to_dict()`` is what ``result.json`` holds.

    ``best_val_top1`` is ``None`` without a validation split (the last epoch is then the best);
    ``test`` is the best model's ``{"top1", "top5", "loss", "samples"}`` on the test split.
    """

    epochs: int
    best_epoch: int
    best_val_top1: float | None
    test: Metrics | None
    history: list[dict[str, Any]] = field(default_factory=list)
    output_dir: str | None = None
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def check_recipe(*, epochs: int, lr: float, momentum: float, weight_decay: float, warmup_epochs: float,
                 warmup_start_factor: float = 0.01, label_smoothing: float = 0.0, **_: Any) -> None:
    """``UserError`` for a training setting :func:`fit` cannot use (checked before any data is loaded)."""
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
        raise UserError(f"epochs must be a whole number >= 1, got {epochs!r}")
    if not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr > 0):
        raise UserError(f"learning rate must be a positive number, got {lr!r}")
    if not 0 <= momentum < 1:
        raise UserError(f"momentum must lie in [0, 1), got {momentum!r}")
    if not (math.isfinite(weight_decay) and weight_decay >= 0):
        raise UserError(f"weight decay must be >= 0, got {weight_decay!r}")
    if not 0 <= warmup_epochs <= epochs:
        raise UserError(f"warmup epochs must lie in [0, epochs={epochs}], got {warmup_epochs!r}")
    if not 0 < warmup_start_factor <= 1:
        raise UserError(f"warmup start factor must lie in (0, 1], got {warmup_start_factor!r}")
    if not 0 <= label_smoothing < 1:
        raise UserError(f"label smoothing must lie in [0, 1), got {label_smoothing!r}")


def _cpu_state(model: nn.Module) -> dict[str, Tensor]:
    return {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}


def _broadcast_buffers(model: nn.Module) -> None:
    # After the last training step each rank's BatchNorm running stats have seen
    # only its own batch; evaluate every shard with rank 0's (the saved) buffers.
    if _rank_and_world()[1] > 1:
        for buffer in model.buffers():
            dist.broadcast(buffer, src=0)


def _format_epoch(record: Mapping[str, Any], epochs: int) -> str:
    line = (f"epoch {record['epoch']}/{epochs}  lr {record['lr']:.4g}  "
            f"train loss {record['train_loss']:.4f} acc {record['train_top1']:.2f}")
    if record["val_top1"] is not None:
        line += (f"  val loss {record['val_loss']:.4f} Acc@1 {record['val_top1']:.2f} Acc@5 {record['val_top5']:.2f}"
                 f"  best {record['best_val_top1']:.2f} (epoch {record['best_epoch']})")
    return line + f"  {record['seconds']:.1f}s"


def fit(
    model: nn.Module,
    loaders: Loaders,
    *,
    epochs: int,
    lr: float,
    momentum: float = 0.9,
    weight_decay: float = 5e-4,
    warmup_epochs: float = 0,
    warmup_start_factor: float = 0.01,
    label_smoothing: float = 0.0,
    amp: bool = False,
    device: str | torch.device = "auto",
    output_dir: str | os.PathLike | None = None,
    resume: bool = False,
    seed: int = 0,
    progress: bool = True,
    verbose: bool = True,
    callbacks: Sequence[Callback] = (),
    args: Mapping[str, Any] | None = None,
) -> FitResult:
    """Train ``model`` on ``loaders.train``, pick the best epoch on ``loaders.val``, test it on ``loaders.test``.

    Args:
        epochs: training epochs (numbered from 1).
        lr, momentum, weight_decay: SGD settings; the learning rate warms up linearly from
            ``warmup_start_factor * lr`` over ``warmup_epochs``, then follows a cosine to 0,
            updated every iteration.
        label_smoothing: for the training loss (evaluation uses plain cross-entropy).
        amp: float16 mixed precision; CUDA only (ignored with a warning on CPU).
        output_dir: where ``metrics.jsonl``, ``last.pt``, ``best.pt`` and ``result.json`` go
            (nothing is written when ``None``). A folder that already holds ``last.pt`` is
            only reused with ``resume=True``.
        resume: continue the run in ``output_dir`` from ``last.pt`` with the same
            optimiser, schedule and random streams: the result equals an uninterrupted run.
        seed: seeds each epoch's randomness from ``(seed, epoch, rank)``.
        progress: tqdm bars (rank 0, only when stderr is a terminal).
        verbose: one summary line per epoch on stderr (rank 0).
        callbacks: called with each epoch's record (the ``metrics.jsonl`` line) on every rank,
            after the checkpoints are written.
        args: plain data stored in the checkpoints under ``"args"`` (e.g. the command line).

    Returns:
        a :class:`FitResult`; ``model`` is left holding the best epoch's weights.
    """
    check_recipe(epochs=epochs, lr=lr, momentum=momentum, weight_decay=weight_decay,
                 warmup_epochs=warmup_epochs, warmup_start_factor=warmup_start_factor,
                 label_smoothing=label_smoothing)
    started = time.perf_counter()
    device = resolve_device(device)
    rank, world = _rank_and_world()
    is_main = rank == 0
    model_without_ddp = model.module if isinstance(model, DistributedDataParallel) else model
    model_without_ddp.to(device)
    train_model: nn.Module = model_without_ddp
    if world > 1:
        device_ids = [device.index] if device.type == "cuda" else None
        train_model = DistributedDataParallel(model_without_ddp, device_ids=device_ids)
    if amp and device.type != "cuda":
        warnings.warn("mixed precision (amp) needs CUDA; training in float32 on the CPU", stacklevel=2)
    amp = amp and device.type == "cuda"

    steps_per_epoch = len(loaders.train)
    if steps_per_epoch == 0:
        raise UserError("the training split is empty: check --limit and --val_size")
    optimizer = build_optimizer(model_without_ddp, lr=lr, momentum=momentum, weight_decay=weight_decay)
    scheduler = build_scheduler(optimizer, epochs=epochs, steps_per_epoch=steps_per_epoch,
                                warmup_epochs=warmup_epochs, warmup_start_factor=warmup_start_factor)
    scaler = torch.amp.GradScaler("cuda", enabled=amp)
    # What must be the same for a resumed run to continue the same schedule.
    recipe = {"epochs": epochs, "lr": lr, "momentum": momentum, "weight_decay": weight_decay,
              "warmup_epochs": warmup_epochs, "warmup_start_factor": warmup_start_factor,
              "label_smoothing": label_smoothing, "amp": amp, "seed": seed,
              "steps_per_epoch": steps_per_epoch, "world_size": world}

    out = Path(output_dir).expanduser() if output_dir is not None else None
    start_epoch, history = 0, []
    best: dict[str, Any] = {"epoch": 0, "val_top1": None}
    best_state: dict[str, Tensor] | None = None
    check_output_dir(out, resume=resume)
    if resume:
        checkpoint = load_checkpoint(out / "last.pt")
        _check_same_recipe(checkpoint["recipe"], recipe, out / "last.pt")
        try:
            model_without_ddp.load_state_dict(checkpoint["model"]["state_dict"])
        except RuntimeError as error:
            raise UserError(f"{out / 'last.pt'} holds a different model than the one given "
                            f"({str(error).splitlines()[0]}): resume with the same --arch/-r/-cpr") from error
        optimizer.load_state_dict(checkpoint["optimizer"])
        scheduler.load_state_dict(checkpoint["scheduler"])
        scaler.load_state_dict(checkpoint["scaler"])
        _set_rng_state(checkpoint["rng"])
        start_epoch, history, best = checkpoint["epoch"], list(checkpoint["history"]), dict(checkpoint["best"])
        best_state = checkpoint["best_state_dict"]
        if best_state is None:  # the last epoch was the best
            best_state = _cpu_state(model_without_ddp)
        if is_main:  # a run killed after writing a metrics line but before last.pt
            _write_jsonl(out / "metrics.jsonl", history)
    if is_main and out is not None and not resume:
        _write_jsonl(out / "metrics.jsonl", [])  # a fresh log, even over a run killed in its first epoch

    for epoch in range(start_epoch + 1, epochs + 1):
        epoch_started = time.perf_counter()
        seed_everything(_epoch_seed(seed, epoch, rank))
        loaders.train_sampler.set_epoch(epoch)
        train = train_one_epoch(train_model, loaders.train, optimizer, scheduler, device=device, scaler=scaler,
                                label_smoothing=label_smoothing, progress=progress, desc=f"epoch {epoch}/{epochs}")
        if not math.isfinite(train["loss"]):
            raise UserError(f"training diverged: the loss is {train['loss']} in epoch {epoch}; lower --lr")
        _broadcast_buffers(model_without_ddp)
        val = evaluate(model_without_ddp, loaders.val, device=device, amp=amp) if loaders.val is not None else None
        improved = val is None or best["val_top1"] is None or val["top1"] > best["val_top1"]
        if improved:
            best = {"epoch": epoch, "val_top1": None if val is None else val["top1"]}
            best_state = _cpu_state(model_without_ddp)
        record = {
            "kind": "epoch", "epoch": epoch, "lr": train["lr"],
            "train_loss": train["loss"], "train_top1": train["top1"], "train_samples": train["samples"],
            **{f"val_{key}": None if val is None else val[key] for key in ("loss", "top1", "top5", "samples")},
            "best_epoch": best["epoch"], "best_val_top1": best["val_top1"],
            "seconds": time.perf_counter() - epoch_started,
        }
        history.append(record)
        if is_main and out is not None:
            _append_jsonl(out / "metrics.jsonl", record)
            common = {"format": CHECKPOINT_FORMAT, "format_version": CHECKPOINT_VERSION, "epoch": epoch,
                      "best": best, "metrics": record, "recipe": recipe, "args": _plain(dict(args or {}))}
            # best.pt first: a crash between the two writes leaves last.pt one epoch
            # behind, and redoing that epoch rewrites best.pt identically.
            if improved:
                atomic_save({**common, "model": _model_record(model_without_ddp)}, out / "best.pt")
            atomic_save({
                **common,
                "model": _model_record(model_without_ddp),
                # The best weights travel with last.pt (unless they are these), so a
                # resume needs only this file.
                "best_state_dict": None if improved else best_state,
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "scaler": scaler.state_dict(),
                "rng": _rng_state(),
                "history": history,
            }, out / "last.pt")
        if is_main and verbose:
            print(_format_epoch(record, epochs), file=sys.stderr, flush=True)
        for callback in callbacks:
            callback(record)

    if best_state is not None:
        model_without_ddp.load_state_dict(best_state)
    test = None
    if loaders.test is not None:
        test = evaluate(model_without_ddp, loaders.test, device=device, amp=amp, progress=progress, desc="test")
    result = FitResult(epochs=epochs, best_epoch=best["epoch"], best_val_top1=best["val_top1"], test=test,
                       history=history, output_dir=None if out is None else str(out),
                       seconds=time.perf_counter() - started)
    if is_main and out is not None:
        if test is not None:
            _append_jsonl(out / "metrics.jsonl", {"kind": "test", "epoch": best["epoch"], "test_loss": test["loss"],
                                                  "test_top1": test["top1"], "test_top5": test["top5"],
                                                  "test_samples": test["samples"]})
        atomic_write_text(json.dumps(result.to_dict(), indent=2) + "\n", out / "result.json")
    return result


def check_output_dir(output_dir: str | os.PathLike | None, *, resume: bool) -> None:
    """``UserError`` unless ``output_dir`` suits a new run (no ``last.pt``) or a resumed one (a ``last.pt``)."""
    if output_dir is None:
        if resume:
            raise UserError("resume needs the output folder of the run to continue")
        return
    last = Path(output_dir).expanduser() / "last.pt"
    if resume and not last.is_file():
        raise UserError(f"nothing to resume: {last} not found; start the run without --resume")
    if not resume and last.exists():
        raise UserError(f"{last.parent} already holds a training run (last.pt): pass --resume to continue it "
                        "or choose another --output")


def _check_same_recipe(saved: Mapping[str, Any], current: Mapping[str, Any], path: Path) -> None:
    for key, value in current.items():
        if saved.get(key) != value:
            raise UserError(f"cannot resume {path}: it was started with {key}={saved.get(key)!r}, "
                            f"now {key}={value!r}; rerun with the original settings or start a new --output")


def _append_jsonl(path: Path, record: Mapping[str, Any]) -> None:
    with open(path, "a") as handle:
        handle.write(json.dumps(record) + "\n")


def _write_jsonl(path: Path, records: Sequence[Mapping[str, Any]]) -> None:
    atomic_write_text("".join(json.dumps(r) + "\n" for r in records), path)
