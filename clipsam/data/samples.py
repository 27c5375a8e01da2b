"""The dataset-independent sample record, image/mask readers and layout validation.

Every parser (:mod:`~clipsam.data.mvtec`, :mod:`~clipsam.data.visa`, :mod:`~clipsam.data.folder`)
turns a directory into a list of :class:`Sample`; :func:`validate_samples` then checks the files
*before* any training starts, so a broken dataset fails in seconds with one message naming the
file and the fix instead of crashing a dataloader worker an hour into a run.

Dimension symbols: H x W image as stored on disk.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
from PIL import Image, UnidentifiedImageError

from clipsam.errors import DatasetError

__all__ = [
    "IMAGE_EXTENSIONS",
    "Sample",
    "ValidationMode",
    "is_image_file",
    "read_image",
    "read_mask",
    "validate_samples",
]

#: File suffixes (lower case) treated as images everywhere in clipsam.
IMAGE_EXTENSIONS: frozenset[str] = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp"})

ValidationMode = Literal["full", "headers", "off"]


@dataclass(frozen=True)
class Sample:
    """One image of a dataset and what is known about it.

    Attributes:
        image_path: the image file.
        mask_path: the ground-truth mask file (any non-zero pixel is anomalous), or None for
            normal images and for anomalous images that have no mask (folder datasets).
        label: 0 normal, 1 anomalous, -1 unknown (images to predict on).
        category: category name as on disk (e.g. ``metal_nut``, ``pcb1``).
        defect_type: defect folder name (MVTec-AD), ``"good"`` for normal images, ``"anomaly"``
            for VisA anomalies (the official split file has no defect type), ``"unknown"`` for
            images to predict on.
        mask_threshold: a mask pixel is anomalous when its value is greater than this (0: any
            non-zero value, right for PNG/BMP masks with values 255 or 1/38 (VisA) or defect ids
            (MVTec LOCO); 127 for JPEG-compressed or anti-aliased masks, whose background holds
            small non-zero values). See :func:`read_mask`.
    """

    image_path: Path
    mask_path: Path | None
    label: int
    category: str
    defect_type: str
    mask_threshold: int = 0


def is_image_file(path: Path) -> bool:
    """True when ``path`` has an image suffix (case-insensitive) and is not a hidden file."""
    return path.suffix.lower() in IMAGE_EXTENSIONS and not path.name.startswith(".")


def read_image(path: str | os.PathLike[str]) -> np.ndarray:
    """Decode an image file as RGB.

    Grayscale, palette, 16-bit and RGBA files all become 3-channel RGB (alpha is dropped).

    Args:
        path: image file.

    Returns:
        uint8 (H, W, 3) RGB.

    Raises:
        DatasetError: the file is missing, not an image, truncated or otherwise undecodable.
    """
    try:
        with Image.open(path) as im:
            if im.mode in ("I;16", "I;16B", "I;16L", "I"):
                arr = np.asarray(im, dtype=np.float64)
                scale = 255.0 / max(float(arr.max()), 1.0) if arr.max() > 255 else 1.0
                return np.repeat((arr * scale).round().astype(np.uint8)[..., None], 3, axis=2)
            return np.asarray(im.convert("RGB"), dtype=np.uint8).copy()
    except FileNotFoundError as exc:
        raise DatasetError(f"image file {path} does not exist: check the dataset root and layout") from exc
    except (OSError, UnidentifiedImageError, ValueError, SyntaxError) as exc:
        raise DatasetError(
            f"cannot decode image {path} ({exc}): the file is corrupt or truncated; "
            "re-download or re-extract the dataset, or remove the file"
        ) from exc


def read_mask(path: str | os.PathLike[str], *, threshold: int = 0) -> np.ndarray:
    """Decode a ground-truth mask; a value above ``threshold`` (in any channel) is anomalous.

    VisA masks hold values such as 1 or 38, MVTec-AD masks 0/255: both binarise the same way
    with the default threshold 0. A *folder* of mask files (MVTec LOCO AD keeps one file per
    defect region in ``ground_truth/<type>/<stem>/000.png, 001.png, ...``) is their union.

    Args:
        path: mask file, or a folder of mask files of equal size.
        threshold: values greater than this are anomalous (127 for JPEG masks).

    Returns:
        bool (H, W), True on anomalous pixels.

    Raises:
        DatasetError: the file is missing or undecodable; a mask folder is empty or its files
            differ in size.
    """
    if os.path.isdir(path):
        files = sorted(p for p in Path(path).iterdir() if is_image_file(p))
        if not files:
            raise DatasetError(f"mask folder {path} holds no mask files: re-extract the dataset")
        parts = [read_mask(f, threshold=threshold) for f in files]
        if any(m.shape != parts[0].shape for m in parts):
            raise DatasetError(f"the mask files in {path} differ in size: re-extract the dataset")
        return np.logical_or.reduce(parts)
    try:
        with Image.open(path) as im:
            arr = np.asarray(im)
    except FileNotFoundError as exc:
        raise DatasetError(f"mask file {path} does not exist: check the dataset's ground-truth folder") from exc
    except (OSError, UnidentifiedImageError, ValueError, SyntaxError) as exc:
        raise DatasetError(
            f"cannot decode mask {path} ({exc}): the file is corrupt or truncated; "
            "re-download or re-extract the dataset, or remove the image and its mask"
        ) from exc
    if arr.ndim == 3:
        arr = arr.max(axis=2)
    return arr > threshold


def _probe(path: Path, *, kind: str, full: bool) -> tuple[int, int]:
    """Open ``path`` (decode it fully when ``full``) and return its (width, height).

    A mask folder (MVTec LOCO AD) is probed file by file; its files must share one size.
    """
    if kind == "mask" and path.is_dir():
        files = sorted(p for p in path.iterdir() if is_image_file(p))
        if not files:
            raise DatasetError(f"mask folder {path} holds no mask files: re-extract the dataset or remove its image")
        sizes = {_probe(f, kind=kind, full=full) for f in files}
        if len(sizes) > 1:
            raise DatasetError(f"the mask files in {path} differ in size: re-extract the dataset or remove its image")
        return sizes.pop()
    try:
        with Image.open(path) as im:
            size = im.size
            if full:
                im.load()  # decodes every pixel: raises on truncated JPEG/PNG data
            return size
    except (OSError, UnidentifiedImageError, ValueError, SyntaxError) as exc:
        raise DatasetError(
            f"cannot decode {kind} {path} ({exc}): the file is corrupt or truncated; "
            f"re-download or re-extract the dataset, or remove the file"
            + (" and its image" if kind == "mask" else "")
        ) from exc


def _check_one(sample: Sample, *, require_masks: bool, full: bool) -> str | None:
    """Check one sample; return the problem as a message, or None when it is fine."""
    image = Path(sample.image_path)
    if not image.is_file():
        return f"image file {image} does not exist: check the dataset root and layout"
    if sample.label == 1 and sample.mask_path is None and require_masks:
        return f"anomalous image {image} has no ground-truth mask: add the mask or remove the image"
    try:
        image_size = _probe(image, kind="image", full=full)
        if sample.mask_path is None:
            return None
        mask = Path(sample.mask_path)
        if not (mask.is_file() or mask.is_dir()):
            return (
                f"mask file {mask} for anomalous image {image} does not exist: "
                "add the mask or remove the image"
            )
        mask_size = _probe(mask, kind="mask", full=full)
    except DatasetError as exc:
        return str(exc)
    if mask_size != image_size:
        return (
            f"mask {mask} is {mask_size[0]}x{mask_size[1]} (WxH) but its image {image} is "
            f"{image_size[0]}x{image_size[1]}: masks must have their image's size; fix or remove the pair"
        )
    return None


def validate_samples(
    samples: Sequence[Sample],
    *,
    check: ValidationMode = "full",
    what: str,
    require_masks: bool = True,
    num_threads: int = 4,
) -> None:
    """Check a parsed dataset on disk before any training or evaluation starts.

    Checks, in this order for every sample: the image exists; an anomalous image has a mask
    (when ``require_masks``); the files open (``"headers"``) or decode completely (``"full"``,
    which catches truncated JPEG/PNG files); the mask has its image's size.

    Args:
        samples: the parsed samples.
        check: ``"full"`` decodes every image and mask (thread pool; about 1-2 ms per MVTec
            image per thread), ``"headers"`` only reads file headers and sizes, ``"off"`` only
            checks that the list is non-empty.
        what: what was parsed, for the messages, e.g. ``"MVTec-AD root /data/mvtec, split
            'test'"``.
        require_masks: anomalous images must have a mask (MVTec-AD, VisA); False for folder
            datasets, where masks are optional.
        num_threads: threads decoding files in parallel.

    Raises:
        DatasetError: on the first problem in sample order; the message names the file and the
            fix, and says how many other files have problems.
    """
    if check not in ("full", "headers", "off"):
        raise DatasetError(f"unknown validation mode {check!r}: use 'full', 'headers' or 'off'")
    if len(samples) == 0:
        raise DatasetError(
            f"0 images found in {what}: check the root path, the category names and the split"
        )
    if check == "off":
        return
    full = check == "full"

    def run(sample: Sample) -> str | None:
        return _check_one(sample, require_masks=require_masks, full=full)

    with ThreadPoolExecutor(max_workers=max(1, num_threads)) as pool:
        problems = [p for p in pool.map(run, samples) if p is not None]
    if problems:
        more = f" ({len(problems) - 1} more file(s) in {what} have problems)" if len(problems) > 1 else ""
        raise DatasetError(problems[0] + more)
