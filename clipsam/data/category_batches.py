"""Whole-category batches for transductive methods (MuSc scores each image against the others).

:class:`CategoryBatchSampler` yields, for each category in sorted order, the dataset indices of
ALL its images as one batch. ``AnomalyDataModule`` uses it for validate/test/predict when the
pipeline asks for it (``Pipeline.configure_batching``; a method's ``inference_batching`` hook
returning ``"category"``); ``data.test_batch_size`` is then not used.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

from torch.utils.data import Sampler

__all__ = ["CategoryBatchSampler"]


class CategoryBatchSampler(Sampler[list[int]]):
    """One batch per category: the indices of all its images, in dataset order.

    Args:
        categories: the category of each dataset item (``len(dataset)`` names).
    """

    def __init__(self, categories: Sequence[str]) -> None:
        self.groups: dict[str, list[int]] = {}
        for index, category in enumerate(categories):
            self.groups.setdefault(str(category), []).append(index)

    def __iter__(self) -> Iterator[list[int]]:
        for category in sorted(self.groups):
            yield list(self.groups[category])

    def __len__(self) -> int:
        return len(self.groups)
