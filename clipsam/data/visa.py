"""VisA layout parser, read in place from the official split file.

Layout of the extracted ``VisA_20220922.tar`` (Zou et al., ECCV 2022)::

    <root>/split_csv/1cls.csv                        columns: object,split,label,image,mask
    <root>/<category>/Data/Images/Normal/*.JPG
    <root>/<category>/Data/Images/Anomaly/*.JPG
    <root>/<category>/Data/Masks/Anomaly/*.png       NOT binary: values such as 1 or 38

``image`` and ``mask`` in the csv are paths relative to ``<root>``; ``label`` is ``normal`` or
``anomaly``; ``split`` is ``train`` or ``test``. Nothing is converted or copied: masks are
binarised at load time (any non-zero value is anomalous, :func:`clipsam.data.samples.read_mask`).

The official file has no defect type, so VisA anomalies get ``defect_type="anomaly"``. An optional
sixth column ``defect`` (not in the official file; clipsam's synthetic generator writes it) gives
the defect type when present.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

from clipsam.data.samples import Sample
from clipsam.errors import DatasetError

__all__ = ["VISA_CATEGORIES", "VISA_SPLIT_FILE", "parse_visa"]

VISA_CATEGORIES: tuple[str, ...] = (
    "candle",
    "capsules",
    "cashew",
    "chewinggum",
    "fryum",
    "macaroni1",
    "macaroni2",
    "pcb1",
    "pcb2",
    "pcb3",
    "pcb4",
    "pipe_fryum",
)
VISA_SPLIT_FILE = "split_csv/1cls.csv"
_COLUMNS = ("object", "split", "label", "image", "mask")
_LABELS = {"normal": 0, "anomaly": 1}


def _read_rows(csv_path: Path) -> list[dict[str, str]]:
    try:
        with csv_path.open(newline="", encoding="utf-8") as handle:
            reader = csv.DictReader(handle)
            fields = [f.strip() for f in (reader.fieldnames or [])]
            missing = [c for c in _COLUMNS if c not in fields]
            if missing:
                raise DatasetError(
                    f"VisA split file {csv_path} lacks column(s) {', '.join(missing)} "
                    f"(expected {','.join(_COLUMNS)}): use the official split_csv/1cls.csv"
                )
            reader.fieldnames = fields
            return [{k: (v or "").strip() for k, v in row.items() if k is not None} for row in reader]
    except UnicodeDecodeError as exc:
        raise DatasetError(
            f"VisA split file {csv_path} is not a text csv file: use the official split_csv/1cls.csv"
        ) from exc


def parse_visa(
    root: str | os.PathLike[str],
    *,
    categories: Sequence[str] | None = None,
    split: Literal["train", "test"] = "test",
    split_file: str = VISA_SPLIT_FILE,
) -> list[Sample]:
    """List the samples of a VisA directory from its split file.

    Files are not opened here; run :func:`clipsam.data.samples.validate_samples` on the result.

    Args:
        root: the extracted VisA folder (holding ``split_csv/`` and the category folders).
        categories: ``object`` names to read; None reads every object in the split file.
        split: the csv ``split`` value to keep (``"train"`` or ``"test"``).
        split_file: the split csv, relative to ``root`` (or absolute).

    Returns:
        samples sorted by category, then label, then image path.

    Raises:
        DatasetError: missing root, split file or category folder; a malformed csv row; an
            unknown category (the message lists the available ones).
    """
    if split not in ("train", "test"):
        raise DatasetError(f"unknown split {split!r} for VisA {root}: use 'train' or 'test'")
    base = Path(os.path.expanduser(os.fspath(root)))
    if not base.is_dir():
        raise DatasetError(
            f"VisA root {base} does not exist: set the dataset root (or the VISA_ROOT environment "
            f"variable), or run `clipsam data download visa --root {base}`"
        )
    csv_path = base / os.path.expanduser(split_file)
    if not csv_path.is_file():
        raise DatasetError(
            f"VisA split file {csv_path} does not exist: the root must be the extracted "
            f"VisA_20220922 folder (it contains {VISA_SPLIT_FILE}), or run "
            f"`clipsam data download visa --root {base}`"
        )
    rows = _read_rows(csv_path)
    available = sorted({row["object"] for row in rows})
    if categories is None:
        chosen = available
    else:
        chosen = list(dict.fromkeys(categories))
        unknown = [c for c in chosen if c not in available]
        if unknown:
            raise DatasetError(
                f"unknown category {unknown[0]!r} in VisA split file {csv_path}: "
                f"available: {', '.join(available) or '(none)'}"
            )
    for category in chosen:
        if not (base / category).is_dir():
            raise DatasetError(
                f"VisA category folder {base / category} is missing: re-extract the dataset or "
                f"drop {category!r} from the categories"
            )
    wanted = set(chosen)
    samples: list[Sample] = []
    for line, row in enumerate(rows, start=2):
        if row["object"] not in wanted or row["split"] != split:
            continue
        label = _LABELS.get(row["label"])
        if label is None:
            raise DatasetError(
                f"VisA split file {csv_path} line {line}: label {row['label']!r} is neither "
                "'normal' nor 'anomaly': use the official split_csv/1cls.csv"
            )
        if not row["image"]:
            raise DatasetError(f"VisA split file {csv_path} line {line} has an empty image path")
        mask = base / row["mask"] if row["mask"] else None
        if label == 0:
            mask, defect = None, "good"
        else:
            defect = row.get("defect") or "anomaly"
        samples.append(Sample(base / row["image"], mask, label, row["object"], defect))
    samples.sort(key=lambda s: (s.category, s.label, str(s.image_path)))
    return samples
