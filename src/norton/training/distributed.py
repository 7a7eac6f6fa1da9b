"""Devices, processes and random seeds: where this process runs and what it shares with the others.

Launched by ``torchrun``, a process joins the group with :func:`init_distributed`
(NCCL on CUDA, Gloo on CPU); a plain ``python`` run is a group of one and every
helper here degrades to a no-op. Randomness is reseeded per epoch from
``(seed, epoch, rank)`` (:func:`epoch_seed`), which is what makes a resumed run equal
an uninterrupted one.
"""
from __future__ import annotations

import os
import random
import sys
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn

from norton.errors import UserError


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
        try:
            device = torch.device(spec)
        except RuntimeError:
            raise UserError(f"unknown device {spec!r}: use auto, cpu, cuda or cuda:N") from None
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
    Call before :func:`norton.training.loaders.build_loaders`, which shards by rank.
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


def rank_and_world() -> tuple[int, int]:
    """``(rank, world_size)`` of this process; ``(0, 1)`` outside a process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def shows_progress(progress: bool) -> bool:
    """Whether a progress bar is drawn: asked for, on rank 0 only, and on a terminal."""
    return progress and rank_and_world()[0] == 0 and sys.stderr.isatty()


def sum_over_ranks(values: Tensor) -> Tensor:
    """``values`` summed over all ranks, in place (unchanged in a one-process run)."""
    if rank_and_world()[1] > 1:
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
    return values


def broadcast_buffers(model: nn.Module) -> None:
    """Copy rank 0's buffers (BatchNorm running stats) to every rank.

    After the last training step each rank's running stats have seen only its own
    batches; evaluating every shard with rank 0's (the saved) buffers keeps the
    metrics those of the model that is saved.
    """
    if rank_and_world()[1] > 1:
        for buffer in model.buffers():
            dist.broadcast(buffer, src=0)


def seed_everything(seed: int) -> None:
    """Seed torch (CPU and CUDA), Python's ``random`` and NumPy's global generator."""
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed % 2**32)


def epoch_seed(seed: int, epoch: int, rank: int) -> int:
    """The seed of one epoch on one rank.

    Each epoch's randomness (augmentations, worker seeds, dropout) is a function of
    ``(seed, epoch, rank)`` alone, so a resumed run and an uninterrupted one draw the
    same numbers, with any number of processes and loader workers.
    """
    return ((seed * 1_000_003 + epoch) * 10_007 + rank) % 2**63
