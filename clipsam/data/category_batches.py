"""Whole-category batches for transductive methods (MuSc scores each image against the others).

:class:`CategoryBatchSampler` yields one batch per category, categories in sorted order.
``AnomalyDataModule`` uses it for validate/test/predict when the pipeline asks for it
(``Pipeline.configure_batching``; a method's ``inference_batching`` hook returning
``"category"``); ``data.test_batch_size`` is then not used.

- One process: each batch holds ALL the images of its category, in dataset order.
- DDP (``num_replicas`` processes): every process takes one batch per category, in the same
  category order, holding ITS SHARD of that category: the category's images (dataset order) are
  cut into blocks of ``block`` images and block k goes to process ``k % num_replicas``. The
  method gathers the shards across processes (MuSc: ``clipsam.methods.musc.gather_rows``) and
  scores the whole category. With ``block`` equal to the method's backbone batch (MuSc's
  ``encode_batch``, its ``category_block`` hook) every backbone pass of a process holds exactly
  the images of one backbone pass of a single process, so the features are the same numbers.
- A process with no block of a category (fewer blocks than processes) still takes part in that
  step: its batch is ONE padding image, a duplicate of the category's first image, encoded in the
  sampler as ``-1 - index`` (:func:`pad_key`). :class:`CategoryShardDataset` decodes the keys and
  marks every item with ``category_pad`` (True for the padding duplicate), which the method
  leaves out of the gather. The duplicate carries its image's dataset ``index``, and its result is
  that image's own (the same row of the category's scoring), so the metrics, which keep the
  first row of every ``index`` (as for Lightning's padding ``DistributedSampler``), count every
  image once whichever copy they keep.

The sampler subclasses :class:`~torch.utils.data.BatchSampler` and takes ``sampler`` /
``batch_size`` / ``drop_last`` keywords only so that Lightning can re-instantiate it when it
injects its ``DistributedSampler`` under DDP (``lightning.pytorch.utilities.data
._update_dataloader``: for a ``BatchSampler`` subclass built inside a ``*_dataloader`` hook it
re-creates the object from its saved arguments with ``sampler`` replaced). The injected sampler
is ignored: the sharding is fixed by ``num_replicas`` / ``rank`` / ``block``, which survive the
re-instantiation.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import torch
from torch.utils.data import BatchSampler, Dataset, SequentialSampler

__all__ = ["PAD_KEY", "CategoryBatchSampler", "CategoryShardDataset", "pad_key", "split_key"]

#: batch key of a DDP category shard: (B,) bool, True for a padding duplicate (no image of its own)
PAD_KEY = "category_pad"


def pad_key(index: int) -> int:
    """The sampler key of a padding duplicate of dataset item ``index``: ``-1 - index`` (< 0)."""
    if index < 0:
        raise ValueError(f"dataset index {index} must be >= 0")
    return -1 - int(index)


def split_key(key: int) -> tuple[int, bool]:
    """``(dataset index, is padding)`` of a sampler key (:func:`pad_key` undone)."""
    key = int(key)
    return (key, False) if key >= 0 else (-1 - key, True)


class CategoryBatchSampler(BatchSampler):
    """One batch per category (sorted names): all its images, or under DDP this process's shard.

    Args:
        categories: the category of each dataset item (``len(dataset)`` names).
        num_replicas: number of processes sharing the categories (1: whole categories).
        rank: this process, ``0 <= rank < num_replicas``.
        block: images per block; blocks are dealt to the processes in turn (module docstring).
        sampler: accepted for Lightning's re-instantiation and kept as ``self.sampler``; it does
            not change the batches.
        batch_size: accepted for the same reason; not used (a batch is a category or a shard).
        drop_last: accepted for the same reason; nothing is ever dropped.

    Raises:
        ValueError: ``num_replicas`` < 1, ``rank`` outside ``[0, num_replicas)`` or ``block`` < 1.
    """

    def __init__(
        self,
        categories: Sequence[str],
        *,
        num_replicas: int = 1,
        rank: int = 0,
        block: int = 1,
        sampler: Iterable[int] | None = None,
        batch_size: int | None = None,
        drop_last: bool = False,
    ) -> None:
        # BatchSampler.__init__ is not called: its checks are about a fixed batch size.
        if int(num_replicas) < 1 or not 0 <= int(rank) < int(num_replicas):
            raise ValueError(f"rank {rank} of {num_replicas} processes: need num_replicas >= 1 and 0 <= rank < num_replicas")
        if int(block) < 1:
            raise ValueError(f"block must be >= 1, got {block}")
        self.num_replicas = int(num_replicas)
        self.rank = int(rank)
        self.block = int(block)
        self.groups: dict[str, list[int]] = {}
        for index, category in enumerate(categories):
            self.groups.setdefault(str(category), []).append(index)
        self.sampler = sampler if sampler is not None else SequentialSampler(range(len(categories)))
        self.batch_size = batch_size
        self.drop_last = False

    def shard(self, indices: Sequence[int]) -> list[int]:
        """This process's keys of a category whose dataset indices are ``indices`` (dataset order).

        The blocks ``k % num_replicas == rank`` in order; when there is none, one padding key
        (:func:`pad_key`) of ``indices[0]``.
        """
        if not indices:
            raise ValueError("a category without images has no batch")
        size = self.block
        blocks = [list(indices[start : start + size]) for start in range(0, len(indices), size)]
        mine = [index for k, part in enumerate(blocks) if k % self.num_replicas == self.rank for index in part]
        return mine or [pad_key(indices[0])]

    def padded_categories(self) -> list[str]:
        """Categories (sorted) for which some process gets only a padding image (fewer blocks than
        processes); always empty for one process."""
        return [c for c in sorted(self.groups) if -(-len(self.groups[c]) // self.block) < self.num_replicas]

    def __iter__(self) -> Iterator[list[int]]:
        for category in sorted(self.groups):
            yield self.shard(self.groups[category])

    def __len__(self) -> int:
        return len(self.groups)


class CategoryShardDataset(Dataset):
    """The items of ``dataset`` by :class:`CategoryBatchSampler` key, each marked with
    :data:`PAD_KEY` (a 0-d bool tensor: True for a padding duplicate). Used under DDP only.

    Args:
        dataset: a map-style dataset whose items are dicts (an item that is not a dict, such as
            a skip marker's, is returned as it is).
    """

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, key: int) -> Any:
        index, pad = split_key(key)
        item = self.dataset[index]
        if isinstance(item, dict):
            item = {**item, PAD_KEY: torch.tensor(pad, dtype=torch.bool)}
        return item
