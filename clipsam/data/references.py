"""Reference images of few-shot methods (``data.reference``): where they come from, how they are drawn.

A method whose module declares ``reference_count(config) = k > 0`` (WinCLIP+ with ``k_shot``)
needs k good images of each test category. :class:`ReferenceConfig` says where they come from;
:func:`draw_references` picks k of a pool by a recorded seed, the same k on every run and every
process; the run report (``run.references`` in test_results.json) records the seed and the files.

    data:
      reference:
        seed: 0            # which k images are drawn
        source: train      # the test dataset's good TRAINING images of each category (default),
                           # or a folder: <folder>/<category>/ when it exists, else <folder> itself
        files: null        # or {category: [path, ...]}: the pool of that category, listed

The pool of a category is sorted by path, then k distinct positions are drawn with
``random.Random(f"{seed}/{category}")`` (a string seed: the same draw in every Python process)
and returned in pool order. A pool of exactly k images is taken whole.
"""

from __future__ import annotations

import os
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from clipsam.errors import ConfigError, DatasetError

__all__ = ["TRAIN_SOURCE", "ReferenceConfig", "draw_references", "folder_pool"]

#: ``data.reference.source`` value meaning: the test dataset's good training images.
TRAIN_SOURCE = "train"


@dataclass
class ReferenceConfig:
    """Where the reference images of a few-shot method come from (``data.reference``).

    Only read when the method needs references (``reference_count(config) > 0``).

    Attributes:
        seed: seeds the draw of the k images per category (:func:`draw_references`).
        source: ``"train"`` (default): the good images of the TRAINING split of ``data.test``'s
            dataset (same format and root), category by category (as anomalib draws WinCLIP+'s
            references from the training images); or a folder of good images:
            ``<folder>/<category>/`` when it exists, else the folder itself for every category.
        files: ``{category: [path, ...]}``: the pool of those categories, instead of ``source``
            (give exactly k files to choose the references yourself); None: none.
    """

    seed: int = 0
    source: str = TRAIN_SOURCE
    files: dict[str, list[str]] | None = None

    def __post_init__(self) -> None:
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ConfigError(f"data.reference.seed={self.seed!r}: give an integer")
        if not isinstance(self.source, str) or not self.source.strip():
            raise ConfigError(
                f"data.reference.source={self.source!r}: give 'train' (the test dataset's good training images) "
                "or a folder of good images"
            )
        if self.files is not None:
            if not isinstance(self.files, Mapping) or not all(
                isinstance(c, str) and isinstance(v, (list, tuple)) and v and all(isinstance(f, (str, os.PathLike)) for f in v)
                for c, v in self.files.items()
            ):
                raise ConfigError(
                    f"data.reference.files={self.files!r}: give a mapping of category -> non-empty list of image paths"
                )
            self.files = {str(c): [os.fspath(f) for f in v] for c, v in self.files.items()}


def draw_references(pool: Sequence[str | os.PathLike[str]], count: int, *, seed: int, category: str, where: str = "") -> list[Path]:
    """``count`` images of ``pool``, drawn by ``seed`` (deterministic; module doc).

    Args:
        pool: the candidate image files of one category (any order; duplicates count once).
        count: k, how many to draw.
        seed: ``data.reference.seed``.
        category: the category (part of the draw's seed, so categories draw independently).
        where: where the pool came from, for the message.

    Returns:
        k paths, in the pool's sorted order.

    Raises:
        DatasetError: the pool holds fewer than k images.
    """
    ordered = sorted({Path(os.fspath(p)) for p in pool}, key=str)
    if len(ordered) < count:
        source = f" in {where}" if where else ""
        raise DatasetError(
            f"data.reference: category {category!r} has {len(ordered)} good reference image(s){source}, fewer than "
            f"the {count} the method needs: add images, set data.reference.source/files, or lower the count "
            "(WinCLIP+: model.method_config.k_shot)"
        )
    picked = sorted(random.Random(f"{seed}/{category}").sample(range(len(ordered)), count))
    return [ordered[i] for i in picked]


def folder_pool(folder: str | os.PathLike[str], category: str) -> tuple[list[Path], str]:
    """The good images of ``category`` in a reference folder: ``<folder>/<category>/`` when it
    exists, else ``<folder>`` (recursively, image files only).

    Returns:
        ``(images, where)``: the files and the folder they came from (for messages).

    Raises:
        DatasetError: the folder does not exist.
    """
    from clipsam.data.folder import list_images

    base = Path(os.path.expanduser(os.fspath(folder)))
    if not base.is_dir():
        raise DatasetError(f"data.reference.source={os.fspath(folder)}: no such folder of good reference images")
    sub = base / category
    where = sub if sub.is_dir() else base
    images, _ = list_images(where)
    return images, str(where)
