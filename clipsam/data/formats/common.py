"""Helpers the format parsers share: category resolution, mask lookup, MVTec-like trees.

Every helper raises :class:`~clipsam.errors.DatasetError` with the folder it looked in and the
fix, so a wrong root or a half-extracted archive is reported in one line.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

from clipsam.data.samples import Sample, is_image_file
from clipsam.errors import DatasetError

__all__ = [
    "check_root",
    "find_mask",
    "image_files",
    "parse_mvtec_like",
    "resolve_categories",
]


def check_root(root: Path, name: str, *, fix: str) -> None:
    """Raise when the dataset root is missing or not a folder.

    Args:
        root: the dataset root.
        name: display name of the dataset.
        fix: how to obtain the dataset (a download command or where to get it).
    """
    if not root.is_dir():
        raise DatasetError(f"{name} root {root} does not exist or is not a folder: {fix}")


def image_files(folder: Path) -> list[Path]:
    """Image files directly inside ``folder`` (suffix, case-insensitive), sorted; [] when missing."""
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.is_file() and is_image_file(p))


def resolve_categories(
    root: Path,
    present: Sequence[str],
    requested: Sequence[str] | None,
    *,
    name: str,
    official: Sequence[str],
    expected: str,
) -> list[str]:
    """The categories to read: all present ones, or the requested ones (each must be present).

    Args:
        root: the dataset root (for messages).
        present: category folders found on disk, sorted.
        requested: ``data.*.categories``; None means all present.
        name: dataset display name.
        official: the dataset's official category names (a missing official one is reported as
            missing, anything else as unknown).
        expected: what a category folder looks like, e.g. ``"<category>/test/"``.

    Raises:
        DatasetError: nothing present, or a requested category is missing or unknown.
    """
    if requested is None:
        if not present:
            raise DatasetError(
                f"no {name} category folders ({expected}) found in {root}: point the root at the "
                f"folder that holds {', '.join(official[:3])}, ..."
            )
        return list(present)
    chosen = list(dict.fromkeys(requested))
    for category in chosen:
        if category in present:
            continue
        if category in official:
            raise DatasetError(
                f"{name} category {category!r} is missing in {root} (expected {expected}): re-extract the "
                f"dataset or drop {category!r} from the categories"
            )
        raise DatasetError(f"unknown {name} category {category!r} in {root}: available: {', '.join(present) or '(none)'}")
    return chosen


def find_mask(folder: Path, stem: str, patterns: Sequence[str]) -> Path:
    """The first existing ``folder / pattern.format(stem=stem)``; else the first candidate.

    Returning the first candidate when none exists lets :func:`~clipsam.data.samples.
    validate_samples` name the expected file.
    """
    candidates = [folder / p.format(stem=stem) for p in patterns]
    for path in candidates:
        if path.exists():
            return path
    return candidates[0]


def parse_mvtec_like(
    root: Path,
    *,
    name: str,
    categories: Sequence[str] | None,
    split: str,
    official: Sequence[str],
    fix: str,
    good: str = "good",
    train_dir: str = "train",
    test_dir: str = "test",
    mask_dir: Callable[[Path, str], Path] | None = None,
    mask_patterns: Sequence[str] = ("{stem}_mask.png",),
    mask_threshold: int = 0,
    mask_is_folder: bool = False,
    defects: Sequence[str] | None = None,
) -> list[Sample]:
    """Parse an MVTec-AD-like tree: ``<category>/<train_dir>/<good>/``, ``<category>/<test_dir>/<defect>/``.

    Args:
        root: the folder holding the category folders.
        name: dataset display name (messages).
        categories: categories to read; None reads every category folder with ``test_dir``.
        split: ``"train"`` (normal images of ``train_dir``) or ``"test"``.
        official: official category names.
        fix: how to obtain the dataset (messages).
        good: folder name of normal images (``good``; BTAD: ``ok``).
        train_dir, test_dir: split folder names (MVTec AD 2: ``test_public``).
        mask_dir: ``mask_dir(category_dir, defect) -> folder`` of that defect's masks; default
            ``<category>/ground_truth/<defect>``.
        mask_patterns: mask file names tried in order, ``{stem}`` is the image stem.
        mask_threshold: :attr:`Sample.mask_threshold` of the anomalous samples.
        mask_is_folder: the mask is the folder ``mask_dir/<stem>`` of mask files (MVTec LOCO).
        defects: keep only these defect folders (and ``good``); None keeps all.

    Returns:
        samples sorted by category, defect folder, file name.
    """
    check_root(root, name, fix=fix)
    folder = train_dir if split == "train" else test_dir
    present = sorted(p.name for p in root.iterdir() if p.is_dir() and (p / test_dir).is_dir())
    chosen = resolve_categories(
        root, present, categories, name=name, official=official, expected=f"<category>/{test_dir}/"
    )
    samples: list[Sample] = []
    for category in chosen:
        split_dir = root / category / folder
        if not split_dir.is_dir():
            raise DatasetError(
                f"{name} split folder {split_dir} is missing: re-extract the dataset or drop {category!r} "
                "from the categories"
            )
        for defect_dir in sorted(p for p in split_dir.iterdir() if p.is_dir()):
            defect = defect_dir.name
            if defect == "ground_truth" or (defects is not None and defect != good and defect not in defects):
                continue
            for image in image_files(defect_dir):
                if defect == good:
                    samples.append(Sample(image, None, 0, category, "good"))
                    continue
                if split == "train":
                    continue  # train folders hold normal images only
                gt = mask_dir(root / category, defect) if mask_dir else root / category / "ground_truth" / defect
                mask = gt / image.stem if mask_is_folder else find_mask(gt, image.stem, mask_patterns)
                samples.append(Sample(image, mask, 1, category, defect, mask_threshold))
    return samples
