"""Kolektor surface-defect datasets: KolektorSDD and KolektorSDD2 (labels come from the masks).

Layouts of the official zips (https://www.vicos.si/resources/kolektorsdd/ and .../kolektorsdd2/;
anomalib's ``kolektor`` datamodule reads the first the same way)::

    KolektorSDD    <root>/kos01 .. kos50/Part0.jpg .. Part7.jpg     grayscale, about 500 x 1250
                   <root>/kosNN/PartK_label.bmp                      0/255, all zero on good parts
    KolektorSDD2   <root>/{train,test}/<id>.png                      colour, about 230 x 630
                   <root>/{train,test}/<id>_GT.png                   0/255, all zero on good images

An image is anomalous when its mask has a non-zero pixel, so the parser reads every mask once
(a few hundred small files). KolektorSDD has no train/test split: every image is in ``test``
(zero-shot use). Both are one category (the name used in the text prompts):
``commutator`` (KolektorSDD, electrical commutators) and ``surface`` (KolektorSDD2).
The MVTec-like conversions of AnomalyCLIP/AdaCLIP (``<cat>/test/{good,defect}``,
``<cat>/ground_truth/defect/<stem>_mask.png``) are read too.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from pathlib import Path

import numpy as np

from clipsam.data.formats import DatasetFormat, register
from clipsam.data.formats.common import check_root, image_files, parse_mvtec_like, resolve_categories
from clipsam.data.samples import Sample, read_mask, save_image
from clipsam.errors import DatasetError

if TYPE_CHECKING:  # the synthetic writers get a source; formats never import the generator
    from clipsam.data.synthetic import SynthSource

__all__ = ["KSDD2_CATEGORIES", "KSDD_CATEGORIES"]

KSDD_CATEGORIES = ("commutator",)
KSDD2_CATEGORIES = ("surface",)
_CC = "CC BY-NC-SA 4.0 (non-commercial use only)"


def _labelled(image: Path, mask: Path, category: str) -> Sample:
    if not mask.is_file():
        raise DatasetError(f"label file {mask} for image {image} does not exist: re-extract the dataset")
    anomalous = bool(read_mask(mask).any())
    return Sample(image, mask if anomalous else None, int(anomalous), category, "defect" if anomalous else "good")


def _converted(root: Path, name: str, official, categories, split, fix) -> list[Sample] | None:
    """The MVTec-like conversion (one ``<cat>/test`` + ``<cat>/ground_truth``), when ``root`` holds one."""
    if sum((p / "test").is_dir() and (p / "ground_truth").is_dir() for p in root.iterdir() if p.is_dir()) == 1:
        return parse_mvtec_like(root, name=name, categories=categories, split=split, official=official, fix=fix,
                                mask_patterns=("{stem}_mask.png", "{stem}.png"))
    return None


def _parse_ksdd(root: Path, *, categories, split, subset) -> list[Sample]:
    fix = f"run `clipsam data download ksdd --root {root}`"
    check_root(root, "KolektorSDD", fix=fix)
    converted = _converted(root, "KolektorSDD", KSDD_CATEGORIES, categories, split, fix)
    if converted is not None:
        return converted
    resolve_categories(root, KSDD_CATEGORIES, categories, name="KolektorSDD", official=KSDD_CATEGORIES, expected="kosNN/")
    items = sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith("kos"))
    if not items:
        raise DatasetError(f"no kos01..kos50 folders in {root}: point the root at the extracted KolektorSDD folder; {fix}")
    samples = []
    for item in items:
        for image in image_files(item):
            if image.stem.endswith("_label"):
                continue
            samples.append(_labelled(image, item / f"{image.stem}_label.bmp", KSDD_CATEGORIES[0]))
    return samples


def _parse_ksdd2(root: Path, *, categories, split, subset) -> list[Sample]:
    fix = f"run `clipsam data download ksdd2 --root {root} --allow-unverified`"
    check_root(root, "KolektorSDD2", fix=fix)
    converted = _converted(root, "KolektorSDD2", KSDD2_CATEGORIES, categories, split, fix)
    if converted is not None:
        return converted
    resolve_categories(root, KSDD2_CATEGORIES, categories, name="KolektorSDD2", official=KSDD2_CATEGORIES, expected="train/, test/")
    folder = root / split
    if not folder.is_dir():
        raise DatasetError(f"KolektorSDD2 folder {folder} is missing: the root must hold train/ and test/; {fix}")
    return [
        _labelled(image, folder / f"{image.stem}_GT.png", KSDD2_CATEGORIES[0])
        for image in image_files(folder)
        if not image.stem.endswith("_GT")
    ]


def _parts(src: SynthSource, synth: str):
    for part in ("train_good", "test_good", "test_anomalous"):
        yield from ((part, item) for item in src.items(synth, part))


def _synth_ksdd(root: Path, src: SynthSource) -> None:
    # one kos folder per part; grayscale JPEG images, BMP labels (zero on good images)
    (_, synth), = src.categories(KSDD_CATEGORIES)
    for k, (part, item) in enumerate(_parts(src, synth)):
        folder = root / f"kos{1 + k // 4:02d}"
        save_image(item.image[..., 0], folder / f"Part{k % 4}.jpg")
        save_image(item.mask.astype(np.uint8) * 255, folder / f"Part{k % 4}_label.bmp")


def _synth_ksdd2(root: Path, src: SynthSource) -> None:
    (_, synth), = src.categories(KSDD2_CATEGORIES)
    for k, (part, item) in enumerate(_parts(src, synth)):
        folder = root / ("train" if part == "train_good" else "test")
        save_image(item.image, folder / f"{10000 + k}.png")
        save_image(item.mask.astype(np.uint8) * 255, folder / f"{10000 + k}_GT.png")


register(
    DatasetFormat(
        key="ksdd", name="KolektorSDD", parse=_parse_ksdd, categories=KSDD_CATEGORIES, level="pixel",
        env="KSDD_ROOT", splits=("test",), download="ksdd",
        license=_CC + "; https://www.vicos.si/resources/kolektorsdd/", synth=_synth_ksdd,
    )
)
register(
    DatasetFormat(
        key="ksdd2", name="KolektorSDD2", parse=_parse_ksdd2, categories=KSDD2_CATEGORIES, level="pixel",
        env="KSDD2_ROOT", download="ksdd2",
        license=_CC + "; https://www.vicos.si/resources/kolektorsdd2/", synth=_synth_ksdd2,
    )
)
