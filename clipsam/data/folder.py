"""Datasets of the user's own images: a labelled folder, or a plain folder to predict on.

Labelled folder layout (defaults; every folder name is an argument)::

    <root>/good/**/*.png|jpg|...         normal images (label 0)
    <root>/anomalous/**/*.png|jpg|...    anomalous images (label 1); a sub-folder name becomes
                                         the defect type, images directly inside get "anomalous"
    <root>/masks/**/<stem>.png           optional masks, matched to anomalous images by file stem
                                         (``<stem>.png`` or ``<stem>_mask.png``); any non-zero
                                         pixel is anomalous

anomalib's folder layout is recognised too: ``abnormal/`` for the anomalous images and
``mask/`` for the masks are used when ``anomalous/`` and ``masks/`` are absent (the defaults
``"auto"``); every name can also be set explicitly (``data.test.normal_dir`` etc.). Sub-folders
of the root that none of these names match are listed in a warning: they are not read.

Masks are optional: without a ``masks`` folder only image-level results exist (anomalous images
get ``mask_path=None`` and the dataset reports ``has_mask=False``). When the masks folder exists,
every anomalous image must have a mask (a half-annotated set would silently skew pixel metrics).
"""

from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path

from clipsam.data.samples import Sample, is_image_file
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


def _mask_index(mask_root: Path) -> dict[str, Path]:
    index: dict[str, Path] = {}
    for path in list_images(mask_root)[0]:
        stem = path.stem[: -len("_mask")] if path.stem.endswith("_mask") else path.stem
        if stem in index:
            raise DatasetError(
                f"two masks for image stem {stem!r}: {index[stem]} and {path}: keep one"
            )
        index[stem] = path
    return index


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
        DatasetError: missing root; neither image folder exists; two masks for one stem; a masks
            folder exists but an anomalous image has no mask.
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
    samples: list[Sample] = []
    if normal.is_dir():
        samples += [Sample(p, None, 0, name, "good") for p in list_images(normal)[0]]
    if anomalous.is_dir():
        for path in list_images(anomalous)[0]:
            defect = path.parent.name if path.parent != anomalous else "anomalous"
            mask = None
            if masks is not None:
                mask = masks.get(path.stem)
                if mask is None:
                    raise DatasetError(
                        f"anomalous image {path} has no mask in {base / mask_dir} (expected "
                        f"{path.stem}.png or {path.stem}_mask.png): add it, or remove the masks "
                        "folder for image-level results only"
                    )
            samples.append(Sample(path, mask, 1, name, defect))
    return samples
