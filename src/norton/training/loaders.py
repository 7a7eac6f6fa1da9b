"""Data loaders over :class:`~norton.training.datasets.DataSplits`, sharded over ranks under ``torchrun``.

Training batches come from a ``DistributedSampler`` whose order is a permutation
seeded by ``(seed, epoch)``, so a resumed run sees the same batches. Evaluation
uses :class:`ShardSampler`, which never pads, so every image counts exactly once.
"""
from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler

from norton.limits import check_loader_options
from norton.training.datasets import DataSplits
from norton.training.distributed import rank_and_world


@dataclass(frozen=True)
class Loaders:
    """Data loaders of one :class:`DataSplits`; ``train_sampler.set_epoch`` reshuffles."""

    train: DataLoader
    val: DataLoader | None
    test: DataLoader
    train_sampler: DistributedSampler


class ShardSampler(Sampler[int]):
    """Indices ``rank, rank + world, ...`` of ``range(n)``: every sample on exactly one rank, no padding.

    For evaluation, where ``DistributedSampler``'s padding would count some images twice.
    """

    def __init__(self, n: int, *, rank: int = 0, world_size: int = 1) -> None:
        self.n, self.rank, self.world_size = n, rank, world_size

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.rank, self.n, self.world_size))

    def __len__(self) -> int:
        return len(range(self.rank, self.n, self.world_size))


def build_loaders(
    splits: DataSplits,
    *,
    batch_size: int,
    workers: int = 0,
    seed: int = 0,
    pin_memory: bool = False,
    eval_batch_size: int | None = None,
) -> Loaders:
    """Loaders for ``splits``; sharded over ranks when ``torch.distributed`` is initialised.

    The training order is a permutation seeded by ``(seed, epoch)`` (call
    ``loaders.train_sampler.set_epoch(epoch)``), so it is the same after a resume.
    """
    check_loader_options(batch_size=batch_size, workers=workers)
    rank, world = rank_and_world()
    sampler: DistributedSampler = DistributedSampler(splits.train, num_replicas=world, rank=rank, shuffle=True, seed=seed)
    # A last training batch of one image breaks BatchNorm ("Expected more than 1 value per channel").
    drop_last = len(sampler) > batch_size and len(sampler) % batch_size == 1
    train = DataLoader(splits.train, batch_size=batch_size, sampler=sampler, drop_last=drop_last,
                       num_workers=workers, pin_memory=pin_memory)

    def eval_loader(dataset: Dataset) -> DataLoader:
        shard = ShardSampler(len(dataset), rank=rank, world_size=world)  # type: ignore[arg-type]  # map-style
        return DataLoader(dataset, batch_size=eval_batch_size or batch_size, sampler=shard,
                          num_workers=workers, pin_memory=pin_memory)

    val = None if splits.val is None else eval_loader(splits.val)
    return Loaders(train=train, val=val, test=eval_loader(splits.test), train_sampler=sampler)
