"""Training loops: ``train_one_epoch``, ``evaluate`` and ``fit`` with checkpoints, resume and DDP.

Plain functions in the style of torchvision's classification reference:

* ``train_one_epoch`` runs SGD over one pass of a loader and returns summed metrics;
* ``evaluate`` returns top-1/top-5 accuracy (percent) and mean loss;
* ``fit`` trains with a :class:`~norton.training.recipes.TrainingRecipe` (SGD + momentum +
  weight decay, a per-iteration linear warm-up then cosine schedule), selects the best
  epoch on the validation split, writes ``metrics.jsonl``, ``last.pt`` and ``best.pt`` to
  ``output_dir``, resumes from ``last.pt``, stops when training diverges, and finally
  evaluates the best model on the test split. Given a ``teacher``, ``fit`` trains with the
  knowledge-distillation loss of :mod:`norton.training.distillation` instead of cross-entropy.

Distributed data parallel: launch with ``torchrun`` and call
:func:`~norton.training.distributed.init_distributed` before building the loaders; ``fit``
then wraps the model in DDP (keeping ``model_without_ddp`` for evaluation and saving),
sums metric counts over ranks and saves on rank 0 only. The checkpoint format is
:mod:`norton.training.checkpoint`'s.
"""
from __future__ import annotations

import math
import os
import sys
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from norton.decomposition.cpd_block import CPDBlock
from norton.deploy.forms import TRAINING_FORMS, forms_restored, set_training_form
from norton.errors import UserError
from norton.io import append_jsonl, atomic_save, write_json, write_jsonl
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
from norton.training.distillation import Distillation, distillation_loss, prepare_teacher
from norton.training.distributed import (
    broadcast_buffers,
    epoch_seed,
    rank_and_world,
    resolve_device,
    seed_everything,
    shows_progress,
    sum_over_ranks,
)
from norton.training.loaders import Loaders
from norton.training.recipes import TrainingRecipe, build_optimizer, build_scheduler, check_recipe

Metrics = dict[str, float]
Callback = Callable[[dict[str, Any]], None]


# --------------------------------------------------------------------------- one epoch


def _topk_hits(logits: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
    """Numbers of top-1 and top-5 hits in a batch (top-``C`` when there are fewer than 5 classes)."""
    k = min(5, logits.shape[1])
    top = logits.topk(k, dim=1).indices  # (B, k)
    hits = top == target[:, None]  # (B, k)
    return hits[:, 0].sum(), hits.any(dim=1).sum()


def _summarise(sums: Tensor, count: int) -> Metrics:
    """This rank's ``sums = (loss_sum, top1_hits, top5_hits)`` over ``count`` images -> means over all ranks."""
    totals = torch.cat([sums, torch.tensor([count], dtype=torch.float64, device=sums.device)])  # (4,)
    loss_sum, top1, top5, total = sum_over_ranks(totals).tolist()
    if total == 0:
        raise UserError("no images to evaluate: the split is empty (check --limit and --val_size)")
    return {"loss": loss_sum / total, "top1": 100.0 * top1 / total, "top5": 100.0 * top5 / total,
            "samples": int(total)}


def train_one_epoch(
    model: nn.Module,
    loader: DataLoader,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None,
    *,
    device: torch.device | str,
    scaler: torch.amp.GradScaler | None = None,
    label_smoothing: float = 0.0,
    distillation: Distillation | None = None,
    progress: bool = True,
    desc: str = "train",
) -> Metrics:
    """One pass over ``loader``; the scheduler steps after every batch.

    Mixed precision (float16 autocast) runs when ``scaler`` is given and enabled.
    With a ``distillation`` (its teacher in eval mode on ``device``: see :func:`fit`), the loss is
    :func:`~norton.training.distillation.distillation_loss`; the teacher runs once per batch, without gradients.
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
    bar = tqdm(loader, desc=desc, leave=False, dynamic_ncols=True, disable=not shows_progress(progress))
    for step, (images, target) in enumerate(bar):
        images = images.to(device, non_blocking=True)
        target = target.to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=torch.float16, enabled=amp):
            if distillation is None:
                logits = model(images)
                loss = criterion(logits, target)
            else:
                with torch.no_grad():
                    teacher_logits = distillation.teacher(images)
                logits = model(images)
                loss = distillation_loss(logits, teacher_logits, target, alpha=distillation.alpha,
                                         temperature=distillation.temperature, label_smoothing=label_smoothing)
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None and amp:
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
    evaluates its shard of ``loader`` (see :func:`norton.training.loaders.build_loaders`) and the
    counts are summed, so every image counts once. Pass the model without its DDP
    wrapper: shards may differ in length. ``model`` is moved to ``device`` (as :func:`fit` does)
    and left in eval mode.
    """
    device = torch.device(device)
    model.to(device).eval()
    sums = torch.zeros(3, dtype=torch.float64, device=device)  # loss_sum, top1 hits, top5 hits
    count = 0
    for images, target in tqdm(loader, desc=desc, leave=False, dynamic_ncols=True, disable=not shows_progress(progress)):
        images = images.to(device, non_blocking=True)
        target = target.to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=torch.float16, enabled=amp and device.type == "cuda"):
            logits = model(images)
        loss = nn.functional.cross_entropy(logits.float(), target, reduction="sum")
        top1, top5 = _topk_hits(logits, target)
        sums += torch.stack([loss.double(), top1.double(), top5.double()])
        count += target.shape[0]
    return _summarise(sums, count)


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


@dataclass
class _Run:
    """The state of one :func:`fit` call: what is trained, with what, and how far it got."""

    model: nn.Module  # without the DDP wrapper: evaluated and saved
    train_model: nn.Module  # the DDP wrapper in a distributed run, else ``model``
    device: torch.device
    recipe: TrainingRecipe  # as run (``amp`` off without CUDA)
    settings: dict[str, Any]  # what a resume must match: the recipe, seed, steps per epoch, world size
    distillation: Distillation | None  # its teacher in eval mode on ``device``, never wrapped in DDP
    optimizer: torch.optim.SGD
    scheduler: torch.optim.lr_scheduler.LambdaLR
    scaler: torch.amp.GradScaler
    out: Path | None  # the run folder; ``None`` writes nothing
    rank: int
    args: dict[str, Any]  # plain data stored in the checkpoints
    epoch: int = 0  # epochs completed
    history: list[dict[str, Any]] = field(default_factory=list)
    best: dict[str, Any] = field(default_factory=lambda: {"epoch": 0, "val_top1": None})
    best_state: dict[str, Tensor] | None = None

    @property
    def log_dir(self) -> Path | None:
        """The folder this process writes to: ``out`` on rank 0, else ``None``."""
        return self.out if self.rank == 0 else None


def fit(
    model: nn.Module,
    loaders: Loaders,
    recipe: TrainingRecipe | None = None,
    *,
    epochs: int | None = None,
    lr: float | None = None,
    momentum: float | None = None,
    weight_decay: float | None = None,
    warmup_epochs: float | None = None,
    warmup_start_factor: float | None = None,
    label_smoothing: float | None = None,
    amp: bool | None = None,
    teacher: nn.Module | None = None,
    distill_alpha: float | None = None,
    distill_temperature: float | None = None,
    device: str | torch.device = "auto",
    output_dir: str | os.PathLike | None = None,
    resume: bool = False,
    seed: int = 0,
    progress: bool = True,
    verbose: bool = True,
    callbacks: Sequence[Callback] = (),
    args: Mapping[str, Any] | None = None,
    training_form: str | None = "dense",
) -> FitResult:
    """Train ``model`` on ``loaders.train``, pick the best epoch on ``loaders.val``, test it on ``loaders.test``.

    Args:
        recipe: the :class:`TrainingRecipe` (e.g. ``recipe_for("cifar10", stage="finetune")``).
        epochs, lr, momentum, weight_decay, warmup_epochs, warmup_start_factor, label_smoothing, amp:
            the recipe's fields; given alone (``epochs`` and ``lr`` at least) they make the recipe,
            given with ``recipe`` they override it. ``amp`` on a CPU is ignored with a warning.
        teacher, distill_alpha, distill_temperature: knowledge distillation (:mod:`norton.training.distillation`):
            the teacher is moved to the model's device, put in eval mode and run once per training batch
            without gradients; the training loss becomes ``distill_alpha * T^2 * KL + (1 - distill_alpha) * CE``
            (the recipe's fields, stored in the checkpoints). Validation and test metrics stay plain.
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
        training_form: how the CPDBlocks still in their written form compute during the run
            (:func:`norton.deploy.forms.set_training_form`). ``"dense"`` rebuilds each block's kernel
            from its factors and runs one conv: the same parameters, state-dict keys and function,
            1.4-7x faster steps on a CPU than the three convs as written (docs/speed.md), chosen
            without timing so that a resumed run computes like the first. Blocks already switched
            (:func:`norton.optimize_for_training`) keep their form; the ones ``fit`` switched are
            switched back when it returns. ``None`` leaves every block as it is.

    Returns:
        a :class:`FitResult`; ``model`` is left holding the best epoch's weights.

    Raises:
        UserError: for a bad recipe or run folder (before anything is trained), and when training
            diverges (a non-finite training or validation loss): the epoch's line is written to
            ``metrics.jsonl`` with ``"kind": "diverged"`` and the checkpoints stay those of the
            epoch before.
    """
    overrides = {"epochs": epochs, "lr": lr, "momentum": momentum, "weight_decay": weight_decay,
                 "warmup_epochs": warmup_epochs, "warmup_start_factor": warmup_start_factor,
                 "label_smoothing": label_smoothing, "amp": amp, "distill_alpha": distill_alpha,
                 "distill_temperature": distill_temperature}
    recipe = _make_recipe(recipe, overrides)
    if training_form is not None and training_form not in TRAINING_FORMS:
        raise UserError(f"unknown training_form {training_form!r}; choose from {', '.join(TRAINING_FORMS)} or None")
    started = time.perf_counter()
    out = Path(output_dir).expanduser() if output_dir is not None else None
    check_output_dir(out, resume=resume)  # before anything is moved or allocated
    with forms_restored(model):  # blocks fit switches are switched back when it returns or fails
        _switch_written_blocks(model, training_form)
        run = _prepare(model, loaders, recipe, device=device, out=out, seed=seed, args=args, teacher=teacher)
        if resume:
            _resume_state(run)
        elif run.log_dir is not None:
            write_jsonl([], run.log_dir / "metrics.jsonl")  # a fresh log, even over a run killed in its first epoch
        for epoch in range(run.epoch + 1, recipe.epochs + 1):
            record = _run_epoch(run, loaders, epoch, progress=progress)
            _save_epoch(run, record)
            if run.rank == 0 and verbose:
                print(_format_epoch(record, recipe.epochs), file=sys.stderr, flush=True)
            for callback in callbacks:
                callback(record)
        return _finish(run, loaders, progress=progress, started=started)


def _switch_written_blocks(model: nn.Module, form: str | None) -> None:
    """Switch every CPDBlock of ``model`` still in its written form to ``form``, in place."""
    if form is None or form == "cpd":
        return
    for block in [m for m in model.modules() if type(m) is CPDBlock]:  # subclasses and switched blocks keep theirs
        set_training_form(block, form)


def _make_recipe(recipe: TrainingRecipe | None, overrides: Mapping[str, Any]) -> TrainingRecipe:
    if recipe is None:
        if overrides["epochs"] is None or overrides["lr"] is None:
            raise UserError("fit needs a recipe, or epochs= and lr= (e.g. fit(model, loaders, epochs=10, lr=0.05))")
        return check_recipe(**{k: v for k, v in overrides.items() if v is not None})
    if not isinstance(recipe, TrainingRecipe):
        raise TypeError(f"recipe must be a TrainingRecipe, got {type(recipe).__name__}")
    return recipe.replace(**overrides)


def _prepare(
    model: nn.Module, loaders: Loaders, recipe: TrainingRecipe, *, device: str | torch.device,
    out: Path | None, seed: int, args: Mapping[str, Any] | None, teacher: nn.Module | None = None,
) -> _Run:
    """Place the model (and teacher), wrap the model for DDP, and build the optimiser, schedule and gradient scaler."""
    steps_per_epoch = len(loaders.train)
    if steps_per_epoch == 0:
        raise UserError("the training split is empty: check --limit and --val_size")
    device = resolve_device(device)
    if recipe.amp and device.type != "cuda":
        warnings.warn("mixed precision (amp) needs CUDA; training in float32 on the CPU", stacklevel=3)
        recipe = recipe.replace(amp=False)
    rank, world = rank_and_world()
    model_without_ddp = model.module if isinstance(model, DistributedDataParallel) else model
    distillation = None if teacher is None else Distillation(
        prepare_teacher(teacher, model_without_ddp, device), recipe.distill_alpha, recipe.distill_temperature)
    model_without_ddp.to(device)
    train_model: nn.Module = model_without_ddp
    if world > 1:
        device_ids = [device.index] if device.type == "cuda" else None
        train_model = DistributedDataParallel(model_without_ddp, device_ids=device_ids)
    optimizer = build_optimizer(model_without_ddp, lr=recipe.lr, momentum=recipe.momentum,
                                weight_decay=recipe.weight_decay)
    scheduler = build_scheduler(optimizer, epochs=recipe.epochs, steps_per_epoch=steps_per_epoch,
                                warmup_epochs=recipe.warmup_epochs, warmup_start_factor=recipe.warmup_start_factor)
    settings = {**recipe.to_dict(), "seed": seed, "steps_per_epoch": steps_per_epoch, "world_size": world}
    if teacher is None:  # a run without a teacher records no distillation settings (as before they existed)
        settings.update(distill_alpha=None, distill_temperature=None)
    return _Run(model=model_without_ddp, train_model=train_model, device=device, recipe=recipe, settings=settings,
                distillation=distillation, optimizer=optimizer, scheduler=scheduler,
                scaler=torch.amp.GradScaler("cuda", enabled=recipe.amp), out=out, rank=rank,
                args=plain(dict(args or {})))


def _resume_state(run: _Run) -> None:
    """Load ``last.pt`` into ``run``: weights, optimiser, schedule, scaler, random streams, history."""
    if run.out is None:
        raise UserError("resume needs the output folder of the run to continue")
    path = run.out / "last.pt"
    checkpoint = load_checkpoint(path)
    distilled = checkpoint["recipe"].get("distill_alpha") is not None
    if distilled != (run.distillation is not None):
        was, now = ("with", "without") if distilled else ("without", "with")
        raise UserError(f"cannot resume {path}: it was trained {was} a teacher (knowledge distillation), now {now}; "
                        "rerun with the original settings or start a new --output")
    check_same_recipe(checkpoint["recipe"], run.settings, path)
    try:
        run.model.load_state_dict(checkpoint["model"]["state_dict"])
    except RuntimeError as error:
        raise UserError(f"{path} holds a different model than the one given "
                        f"({str(error).splitlines()[0]}): resume with the same --arch/-r/-cpr") from error
    run.optimizer.load_state_dict(checkpoint["optimizer"])
    run.scheduler.load_state_dict(checkpoint["scheduler"])
    run.scaler.load_state_dict(checkpoint["scaler"])
    set_rng_state(checkpoint["rng"])
    run.epoch, run.history, run.best = checkpoint["epoch"], list(checkpoint["history"]), dict(checkpoint["best"])
    run.best_state = checkpoint["best_state_dict"]
    if run.best_state is None:  # the last epoch was the best
        run.best_state = cpu_state_dict(run.model)
    if run.log_dir is not None:  # a run killed after writing a metrics line but before last.pt
        write_jsonl(run.history, run.log_dir / "metrics.jsonl")


def _run_epoch(run: _Run, loaders: Loaders, epoch: int, *, progress: bool) -> dict[str, Any]:
    """Train one epoch, validate, update the best epoch; the ``metrics.jsonl`` record of the epoch."""
    started = time.perf_counter()
    recipe = run.recipe
    seed_everything(epoch_seed(run.settings["seed"], epoch, run.rank))
    loaders.train_sampler.set_epoch(epoch)
    train = train_one_epoch(run.train_model, loaders.train, run.optimizer, run.scheduler, device=run.device,
                            scaler=run.scaler, label_smoothing=recipe.label_smoothing, distillation=run.distillation,
                            progress=progress, desc=f"epoch {epoch}/{recipe.epochs}")
    val = None
    if math.isfinite(train["loss"]):
        broadcast_buffers(run.model)
        if loaders.val is not None:
            val = evaluate(run.model, loaders.val, device=run.device, amp=recipe.amp)
    record = {
        "kind": "epoch", "epoch": epoch, "lr": train["lr"],
        "train_loss": train["loss"], "train_loss_kind": "cross_entropy" if run.distillation is None else "distillation",
        "train_top1": train["top1"], "train_samples": train["samples"],
        **{f"val_{key}": None if val is None else val[key] for key in ("loss", "top1", "top5", "samples")},
    }
    reason = _divergence(train, val, run.model)
    if reason is not None:
        _stop_diverged(run, {**record, "kind": "diverged", "seconds": time.perf_counter() - started}, reason)
    improved = val is None or run.best["val_top1"] is None or val["top1"] > run.best["val_top1"]
    if improved:
        run.best = {"epoch": epoch, "val_top1": None if val is None else val["top1"]}
        run.best_state = cpu_state_dict(run.model)
    record.update({"best_epoch": run.best["epoch"], "best_val_top1": run.best["val_top1"],
                   "seconds": time.perf_counter() - started})
    run.history.append(record)
    run.epoch = epoch
    return record


def _divergence(train: Metrics, val: Metrics | None, model: nn.Module) -> str | None:
    """Why training has diverged (a non-finite loss or weight), or ``None`` if it has not."""
    if not math.isfinite(train["loss"]):
        return f"the training loss is {train['loss']}"
    if val is not None:
        return None if math.isfinite(val["loss"]) else f"the validation loss is {val['loss']}"
    # Without a validation split, weights blown up by the last steps would show only in the test.
    bad = next((name for name, p in model.named_parameters() if not bool(torch.isfinite(p).all())), None)
    return None if bad is None else f"parameter {bad} holds non-finite values"


def _stop_diverged(run: _Run, record: dict[str, Any], reason: str) -> None:
    """Log the diverged epoch (non-finite numbers as null) and stop with one line saying what to do."""
    if run.log_dir is not None:
        append_jsonl(record, run.log_dir / "metrics.jsonl")
    again = " and start a new --output" if run.epoch > 0 and run.out is not None else ""
    raise UserError(f"training diverged in epoch {record['epoch']}: {reason}; "
                    f"lower --lr (it is {run.recipe.lr:g}){again}")


def _save_epoch(run: _Run, record: dict[str, Any]) -> None:
    """Append the epoch's line to ``metrics.jsonl`` and write ``best.pt`` (if improved) and ``last.pt``."""
    folder = run.log_dir
    if folder is None:
        return
    improved = run.best["epoch"] == record["epoch"]
    append_jsonl(record, folder / "metrics.jsonl")
    common = {"format": CHECKPOINT_FORMAT, "format_version": CHECKPOINT_VERSION, "epoch": record["epoch"],
              "best": run.best, "metrics": record, "recipe": run.settings, "args": run.args}
    # best.pt first: a crash between the two writes leaves last.pt one epoch
    # behind, and redoing that epoch rewrites best.pt identically.
    if improved:
        atomic_save({**common, "model": model_record(run.model)}, folder / "best.pt")
    atomic_save({
        **common,
        "model": model_record(run.model),
        # The best weights travel with last.pt (unless they are these), so a resume needs only this file.
        "best_state_dict": None if improved else run.best_state,
        "optimizer": run.optimizer.state_dict(),
        "scheduler": run.scheduler.state_dict(),
        "scaler": run.scaler.state_dict(),
        "rng": rng_state(),
        "history": run.history,
    }, folder / "last.pt")


def _finish(run: _Run, loaders: Loaders, *, progress: bool, started: float) -> FitResult:
    """Load the best epoch's weights, test them, write the test line and ``result.json``."""
    if run.best_state is not None:
        run.model.load_state_dict(run.best_state)
    test = None
    if loaders.test is not None:
        test = evaluate(run.model, loaders.test, device=run.device, amp=run.recipe.amp, progress=progress,
                        desc="test")
    result = FitResult(epochs=run.recipe.epochs, best_epoch=run.best["epoch"], best_val_top1=run.best["val_top1"],
                       test=test, history=run.history, output_dir=None if run.out is None else str(run.out),
                       seconds=time.perf_counter() - started)
    if run.log_dir is not None:
        if test is not None:
            append_jsonl({
                "kind": "test", "epoch": run.best["epoch"], "test_loss": test["loss"], "test_top1": test["top1"],
                "test_top5": test["top5"], "test_samples": test["samples"]}, run.log_dir / "metrics.jsonl")
        write_json(result.to_dict(), run.log_dir / "result.json")
    return result


def _format_epoch(record: Mapping[str, Any], epochs: int) -> str:
    line = (f"epoch {record['epoch']}/{epochs}  lr {record['lr']:.4g}  "
            f"train {'KD ' if record.get('train_loss_kind') == 'distillation' else ''}loss {record['train_loss']:.4f} "
            f"acc {record['train_top1']:.2f}")
    if record["val_top1"] is not None:
        line += (f"  val loss {record['val_loss']:.4f} Acc@1 {record['val_top1']:.2f} Acc@5 {record['val_top5']:.2f}"
                 f"  best {record['best_val_top1']:.2f} (epoch {record['best_epoch']})")
    return line + f"  {record['seconds']:.1f}s"


__all__ = ["FitResult", "Metrics", "evaluate", "fit", "train_one_epoch"]
