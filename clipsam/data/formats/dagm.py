"""DAGM 2007 (weakly supervised industrial optical inspection), the labelled class variants.

Layout of the labelled release (Class1 .. Class10; AnomalyCLIP's ``generate_dataset_json/DAGM.py``
reads the same tree)::

    <root>/Class<N>/Train/<id>.PNG              grayscale 512 x 512
    <root>/Class<N>/Train/Label/<id>_label.PNG  0/255 ellipse around the defect
    <root>/Class<N>/Test/<id>.PNG
    <root>/Class<N>/Test/Label/<id>_label.PNG
    (Labels.txt files are not needed: an image is anomalous when it has a label file)

``split: test`` reads ``Test/`` (normal and defective images); ``split: train`` the normal images
of ``Train/``. Folders of the older unlabelled release (``Class<N>_def``) are not categories and
are skipped. The weak labels are ellipses, coarser than the defects: pixel metrics on DAGM are
lower than on datasets with tight masks.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from pathlib import Path

import numpy as np

from clipsam.data.formats import DatasetFormat, register
from clipsam.data.formats.common import check_root, image_files, resolve_categories
from clipsam.data.samples import Sample, save_image
from clipsam.errors import DatasetError

if TYPE_CHECKING:  # the synthetic writers get a source; formats never import the generator
    from clipsam.data.synthetic import SynthSource

__all__ = ["DAGM_CATEGORIES"]

DAGM_CATEGORIES = tuple(f"Class{i}" for i in range(1, 11))
_FOLDERS = {"train": "Train", "test": "Test"}


def _parse_dagm(root: Path, *, categories, split, subset) -> list[Sample]:
    fix = "download DAGM 2007 by hand (`clipsam data download dagm` says where)"
    check_root(root, "DAGM 2007", fix=fix)
    present = sorted(
        (p.name for p in root.iterdir() if p.is_dir() and p.name in DAGM_CATEGORIES and (p / "Test").is_dir()),
        key=lambda name: int(name[5:]),
    )
    chosen = resolve_categories(root, present, categories, name="DAGM 2007", official=DAGM_CATEGORIES, expected="Class<N>/Test/")
    samples: list[Sample] = []
    for category in chosen:
        folder = root / category / _FOLDERS[split]
        if not folder.is_dir():
            raise DatasetError(f"DAGM 2007 folder {folder} is missing: re-extract the dataset or drop {category!r}")
        labels = {p.stem[: -len("_label")]: p for p in image_files(folder / "Label") if p.stem.endswith("_label")}
        stems = {p.stem for p in image_files(folder)}
        orphans = sorted(set(labels) - stems)
        if orphans:
            raise DatasetError(
                f"label {labels[orphans[0]]} has no image {folder / orphans[0]}.PNG: re-extract the dataset"
            )
        for image in image_files(folder):
            mask = labels.get(image.stem)
            if mask is None:
                samples.append(Sample(image, None, 0, category, "good"))
            elif split == "test":
                samples.append(Sample(image, mask, 1, category, "defect"))
    return samples


def _synth_dagm(root: Path, src: SynthSource) -> None:
    for category, synth in src.categories(DAGM_CATEGORIES):
        k = 0
        for part in ("train_good", "test_good", "test_anomalous"):
            folder = root / category / ("Train" if part == "train_good" else "Test")
            for item in src.items(synth, part):
                k += 1
                save_image(item.image[..., 0], folder / f"{k:04d}.PNG")  # grayscale, upper-case suffix
                if item.defect is not None:
                    save_image(item.mask.astype(np.uint8) * 255, folder / "Label" / f"{k:04d}_label.PNG")


register(
    DatasetFormat(
        key="dagm", name="DAGM 2007", parse=_parse_dagm, categories=DAGM_CATEGORIES, level="pixel", env="DAGM_ROOT",
        license="free for research (DAGM/GNSS 2007 competition terms); "
        "https://hci.iwr.uni-heidelberg.de/content/weakly-supervised-learning-industrial-optical-inspection",
        synth=_synth_dagm,
    )
)
