"""Datasets of the user's own images: a labelled folder, or a plain folder to predict on.

Labelled folder layout (defaults; every folder name is an argument)::

    <root>/good/**/*.png|jpg|...         normal images (label 0)
    <root>/anomalous/**/*.png|jpg|...    anomalous images (label 1); a sub-folder name becomes
                                         the defect type, images directly inside get "anomalous"
    <root>/masks/**/<stem>.png           optional masks (``<stem>.png`` or ``<stem>_mask.png``; any
                                         non-zero pixel is anomalous), matched to an anomalous
                                         image by its path below ``anomalous/``
                                         (``masks/scratch/000.png`` for ``anomalous/scratch/000.png``)
                                         or, when the name is unique, by file name alone

anomalib's folder layout is recognised too: ``abnormal/`` for the anomalous images and
``mask/`` for the masks are used when ``anomalous/`` and ``masks/`` are absent (the defaults
``"auto"``); every name can also be set explicitly (``data.test.normal_dir`` etc.). Sub-folders
of the root that none of these names match are listed in a warning: they are not read.

Masks are optional: without a ``masks`` folder only image-level results exist (anomalous images
get ``mask_path=None`` and the dataset reports ``has_mask=False``). When the masks folder exists,
every anomalous image must have a mask (a half-annotated set would silently skew pixel metrics).
Two anomalous images with one file name in different sub-folders (``anomalous/scratch/000.png``,
``anomalous/dent/000.png``) need mirrored masks (``masks/scratch/000.png``, ``masks/dent/000.png``):
one ``masks/000.png`` for both is refused, never given to both. A mask given for a normal image
(``masks/good/<name>.png``, or the image's name when no anomalous image uses it) must be all zero.
"""

from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path

from clipsam.data.samples import Sample, is_image_file, read_mask
from clipsam.errors import DatasetError

__all__ = ["list_images", "parse_folder"]

_OUTPUT_MARKER = ".clipsam-output"  # clipsam.callbacks.OUTPUT_MARKER (not imported: no cycle)

log = logging.getLogger(__name__)


def list_images(folder: str | os.PathLike[str], *, recursive: bool = True) -> tuple[list[Path], list[Path]]:
    """Split the files of ``folder`` into images and everything else.

    Symlinked sub-folders are followed (each real folder once, so a link loop ends). Folders
    holding clipsam's predict-output marker (``.clipsam-output``, see
    :class:`clipsam.callbacks.PredictionWriter`) are not read: an output folder inside the input
    folder is never taken as input; they are named in one warning.

    Args:
        folder: the directory to list.
        recursive: descend into sub-folders (default), skipping hidden folders.

    Returns:
        ``(images, skipped)``: image files by suffix (:data:`~clipsam.data.samples.IMAGE_EXTENSIONS`,
        case-insensitive), and the other files (hidden files included), both sorted by path.

    Raises:
        DatasetError: ``folder`` does not exist or is not a directory.
    """
    base = Path(os.path.expanduser(os.fspath(folder)))
    if not base.is_dir():
        raise DatasetError(f"image folder {base} does not exist or is not a directory: check the path")
    images: list[Path] = []
    skipped: list[Path] = []
    outputs: list[Path] = []
    seen: set[str] = set()
    for dirpath, dirnames, filenames in os.walk(base, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in seen:  # a symlink loop, or two links to one folder: read it once
            dirnames[:] = []
            continue
        seen.add(real)
        if _OUTPUT_MARKER in filenames:
            outputs.append(Path(dirpath))
            dirnames[:] = []
            continue
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".")) if recursive else []
        for name in filenames:
            path = Path(dirpath) / name
            (images if is_image_file(path) else skipped).append(path)
    if outputs:
        warnings.warn(
            f"not reading clipsam output folder(s) inside {base} as input: {', '.join(map(str, outputs))}",
            stacklevel=2,
        )
    return sorted(images), sorted(skipped)


def _key(path: Path, folder: Path) -> str:
    """``path`` below ``folder`` without its suffix (and a mask's ``_mask``), '/'-separated."""
    relative = path.relative_to(folder).with_suffix("")
    name = relative.name[: -len("_mask")] if relative.name.endswith("_mask") and relative.name != "_mask" else relative.name
    return relative.with_name(name).as_posix() if name else relative.as_posix()


def _mask_index(mask_root: Path) -> dict[str, Path]:
    """Masks by their path below ``mask_root`` without suffix (``scratch/000`` for
    ``masks/scratch/000.png`` or ``masks/scratch/000_mask.png``)."""
    index: dict[str, Path] = {}
    for path in list_images(mask_root)[0]:
        key = _key(path, mask_root)
        if key in index:
            raise DatasetError(f"two masks for image {key!r}: {index[key]} and {path}: keep one")
        index[key] = path
    return index


def _stem(key: str) -> str:
    return key.rsplit("/", 1)[-1]


def _match_masks(
    base: Path, images: list[Path], anomalous: Path, masks: dict[str, Path], dirs: tuple[str, str, str]
) -> dict[Path, Path]:
    """The mask of every anomalous image: the mask at the same path below the masks folder
    (``masks/scratch/000.png`` or ``masks/anomalous/scratch/000.png`` for
    ``anomalous/scratch/000.png``), else the one mask with the image's file name, when no other
    image or mask shares that name (masks below ``masks/<normal_dir>/`` are the normal images').

    Raises:
        DatasetError: an image without a mask; two anomalous images that would share one mask;
            an image whose name matches several masks.
    """
    normal_dir, anomalous_dir, mask_dir = (Path(d).as_posix() for d in dirs)
    by_stem: dict[str, list[Path]] = {}
    for key, mask in masks.items():
        if not key.startswith(f"{normal_dir}/"):
            by_stem.setdefault(_stem(key), []).append(mask)
    keys = {image: _key(image, anomalous) for image in images}
    exact: dict[Path, Path] = {}
    for image, key in keys.items():
        mask = masks.get(key) or masks.get(f"{anomalous_dir}/{key}")
        if mask is not None:
            exact[image] = mask
    claimed = set(exact.values())
    fallback: dict[Path, list[Path]] = {}  # image -> candidate masks found by file name
    for image, key in keys.items():
        if image not in exact:
            fallback[image] = [m for m in by_stem.get(_stem(key), []) if m not in claimed]
    matched = dict(exact)
    mirror = f"mirror the sub-folders of {anomalous_dir}/ under {mask_dir}/"
    for image, candidates in fallback.items():
        key = keys[image]
        if not candidates:
            raise DatasetError(
                f"anomalous image {image} has no mask in {base / mask_dir} (expected "
                f"{mask_dir}/{key}.png, {_stem(key)}.png or {_stem(key)}_mask.png): add it, or remove the "
                "masks folder for image-level results only"
            )
        if len(candidates) > 1:
            raise DatasetError(
                f"anomalous image {image} has no mask at {base / mask_dir / key}.png and its file name matches "
                f"several masks ({', '.join(map(str, candidates))}): {mirror} ({mask_dir}/{key}.png)"
            )
        others = [other for other, found in fallback.items() if other != image and found == candidates]
        if others:
            other = others[0]
            raise DatasetError(
                f"anomalous images {image} and {other} have the same file name and would both get the mask "
                f"{candidates[0]}: {mirror} ({mask_dir}/{key}.png and {mask_dir}/{keys[other]}.png), "
                "or give the images distinct names"
            )
        matched[image] = candidates[0]
    return matched


def _check_normal_masks(
    normal_images: list[Path], normal: Path, masks: dict[str, Path], used: set[Path], normal_dir: str
) -> None:
    """A mask given for a normal image must be all zero (a normal image has no anomalous pixel).

    A mask belongs to a normal image when it sits at ``masks/<normal_dir>/<path>`` or, unused by
    the anomalous images, has the normal image's path below the masks folder.

    Raises:
        DatasetError: naming the mask, its image and the fix.
    """
    for image in normal_images:
        key = _key(image, normal)
        for candidate in (f"{Path(normal_dir).as_posix()}/{key}", key):
            mask = masks.get(candidate)
            if mask is None or mask in used:
                continue
            if read_mask(mask).any():
                raise DatasetError(
                    f"mask {mask} marks anomalous pixels but its image {image} is in {normal_dir}/ (normal): "
                    f"move the image to the anomalous folder, or delete the mask (normal images need none)"
                )


#: Names tried, in order, for ``anomalous_dir="auto"`` and ``mask_dir="auto"``.
AUTO_ANOMALOUS_DIRS: tuple[str, ...] = ("anomalous", "abnormal")
AUTO_MASK_DIRS: tuple[str, ...] = ("masks", "mask")


def _auto(base: Path, name: str | None, candidates: tuple[str, ...]) -> str | None:
    if name != "auto":
        return name
    return next((c for c in candidates if (base / c).is_dir()), candidates[0])


def parse_folder(
    root: str | os.PathLike[str],
    *,
    category: str | None = None,
    normal_dir: str = "good",
    anomalous_dir: str = "auto",
    mask_dir: str | None = "auto",
) -> list[Sample]:
    """List the samples of a labelled folder of the user's images (layout in the module doc).

    Args:
        root: the dataset folder.
        category: the object name used in the text prompts; defaults to ``root``'s folder name.
        normal_dir: sub-folder of normal images, relative to ``root``.
        anomalous_dir: sub-folder of anomalous images, relative to ``root``; ``"auto"`` uses
            ``anomalous/`` or, when only it exists, anomalib's ``abnormal/``.
        mask_dir: sub-folder of masks, relative to ``root``; ``"auto"`` uses ``masks/`` or
            anomalib's ``mask/``; None (or a missing folder) means no masks.

    Returns:
        normal samples then anomalous ones, each sorted by path.

    Raises:
        DatasetError: missing root; neither image folder exists; two masks for one image; a masks
            folder exists but an anomalous image has no mask; two anomalous images that would share
            one mask; a mask with anomalous pixels for a normal image.
    """
    base = Path(os.path.expanduser(os.fspath(root)))
    if not base.is_dir():
        raise DatasetError(f"image folder dataset root {base} does not exist: check data.*.root")
    name = category or base.resolve().name
    anomalous_dir = _auto(base, anomalous_dir, AUTO_ANOMALOUS_DIRS) or "anomalous"
    mask_dir = _auto(base, mask_dir, AUTO_MASK_DIRS)
    used = {Path(d).parts[0] for d in (normal_dir, anomalous_dir, mask_dir) if d}
    ignored = sorted(p.name for p in base.iterdir() if p.is_dir() and not p.name.startswith(".") and p.name not in used)
    if ignored:
        log.warning(
            "folder dataset %s: sub-folder(s) %s are not read (normal: %s/, anomalous: %s/, masks: %s/); "
            "set data.*.normal_dir / anomalous_dir / mask_dir to use them",
            base, ", ".join(ignored), normal_dir, anomalous_dir, mask_dir,
        )
    normal, anomalous = base / normal_dir, base / anomalous_dir
    if not normal.is_dir() and not anomalous.is_dir():
        raise DatasetError(
            f"folder dataset {base} has neither {normal_dir}/ (normal images) nor "
            f"{anomalous_dir}/ (anomalous images): create them, or use `predict` on a plain folder"
        )
    masks = _mask_index(base / mask_dir) if mask_dir is not None and (base / mask_dir).is_dir() else None
    normal_images = list_images(normal)[0] if normal.is_dir() else []
    anomalous_images = list_images(anomalous)[0] if anomalous.is_dir() else []
    matched: dict[Path, Path] = {}
    if masks is not None:
        assert mask_dir is not None
        matched = _match_masks(base, anomalous_images, anomalous, masks, (normal_dir, anomalous_dir, mask_dir))
        _check_normal_masks(normal_images, normal, masks, set(matched.values()), normal_dir)
    samples = [Sample(p, None, 0, name, "good") for p in normal_images]
    for path in anomalous_images:
        defect = path.parent.name if path.parent != anomalous else "anomalous"
        samples.append(Sample(path, matched.get(path), 1, name, defect))
    return samples
