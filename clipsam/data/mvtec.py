"""MVTec-AD layout parser.

Layout (Bergmann et al., CVPR 2019)::

    <root>/<category>/train/good/*.png
    <root>/<category>/test/good/*.png
    <root>/<category>/test/<defect>/*.png
    <root>/<category>/ground_truth/<defect>/<stem>_mask.png     masks 0/255

Some categories (grid, screw, zipper) are grayscale; they load as 3-channel RGB
(:func:`clipsam.data.samples.read_image`). The generator in :mod:`clipsam.data.synthetic` writes the
same layout with its own category names, so category folders are discovered, not assumed.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

from clipsam.data.samples import Sample, is_image_file
from clipsam.errors import DatasetError

__all__ = ["MVTEC_CATEGORIES", "list_categories", "parse_mvtec"]

MVTEC_CATEGORIES: tuple[str, ...] = (
    "bottle",
    "cable",
    "capsule",
    "carpet",
    "grid",
    "hazelnut",
    "leather",
    "metal_nut",
    "pill",
    "screw",
    "tile",
    "toothbrush",
    "transistor",
    "wood",
    "zipper",
)

_GOOD = "good"


def list_categories(root: str | os.PathLike[str]) -> list[str]:
    """Category folders under an MVTec-layout ``root`` (those with a ``train`` or ``test`` folder), sorted."""
    base = Path(root)
    return sorted(
        p.name for p in base.iterdir() if p.is_dir() and ((p / "test").is_dir() or (p / "train").is_dir())
    )


def _resolve_categories(root: Path, categories: Sequence[str] | None) -> list[str]:
    present = list_categories(root)
    if categories is None:
        if not present:
            raise DatasetError(
                f"no MVTec-AD category folders (with train/ or test/ inside) found in {root}: "
                "point the root at the folder that holds bottle/, cable/, ..., or run "
                f"`clipsam data download mvtec --root {root}`"
            )
        return present
    chosen = list(dict.fromkeys(categories))
    for name in chosen:
        if name in present:
            continue
        if name in MVTEC_CATEGORIES or (root / name).exists():
            raise DatasetError(
                f"MVTec-AD category folder {root / name} is missing (or has no train/ or test/ folder): "
                f"re-extract the dataset or drop {name!r} from the categories"
            )
        raise DatasetError(
            f"unknown category {name!r} in {root}: available: {', '.join(present) or '(none)'}"
        )
    return chosen


def _images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and is_image_file(p))


def parse_mvtec(
    root: str | os.PathLike[str],
    *,
    categories: Sequence[str] | None = None,
    split: Literal["train", "test"] = "test",
) -> list[Sample]:
    """List the samples of an MVTec-AD layout directory.

    Files are not opened here; run :func:`clipsam.data.samples.validate_samples` on the result.
    An anomalous image's mask path is where the mask should be (``ground_truth/<defect>/
    <stem>_mask.png``) even when that file is missing, so validation can name it.

    Args:
        root: the folder holding the category folders.
        categories: category folder names to read; None reads every category folder present.
        split: ``"train"`` (normal images only) or ``"test"`` (normal and anomalous, with masks).

    Returns:
        samples sorted by category, then defect type (``good`` included), then file name.

    Raises:
        DatasetError: missing root, unknown category (the message lists the available ones),
            missing category folder, or a category without the split folder.
    """
    if split not in ("train", "test"):
        raise DatasetError(f"unknown split {split!r} for MVTec-AD {root}: use 'train' or 'test'")
    base = Path(os.path.expanduser(os.fspath(root)))
    if not base.is_dir():
        raise DatasetError(
            f"MVTec-AD root {base} does not exist: set the dataset root (or the MVTEC_ROOT "
            f"environment variable), or run `clipsam data download mvtec --root {base}`"
        )
    samples: list[Sample] = []
    for category in _resolve_categories(base, categories):
        split_dir = base / category / split
        if not split_dir.is_dir():
            raise DatasetError(
                f"MVTec-AD split folder {split_dir} is missing: re-extract the dataset or drop "
                f"{category!r} from the categories"
            )
        for defect_dir in sorted(p for p in split_dir.iterdir() if p.is_dir()):
            defect = defect_dir.name
            for image in _images(defect_dir):
                if defect == _GOOD:
                    samples.append(Sample(image, None, 0, category, _GOOD))
                else:
                    mask = base / category / "ground_truth" / defect / f"{image.stem}_mask.png"
                    samples.append(Sample(image, mask, 1, category, defect))
    return samples
