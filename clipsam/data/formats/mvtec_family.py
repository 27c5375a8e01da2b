"""MVTec-AD-like folder trees: MPDD, BTAD, DTD-Synthetic, MVTec AD 2, MVTec LOCO AD.

Layouts (as published; anomalib's datamodules and AnomalyCLIP's ``generate_dataset_json`` read
the same trees)::

    MPDD           <cat>/train/good/*.png  <cat>/test/{good,<defect>}/*.png
                   <cat>/ground_truth/<defect>/<stem>_mask.png                     0/255
    BTAD           <cat>/train/ok/*  <cat>/test/{ok,ko}/*  (.bmp or .png)
                   <cat>/ground_truth/ko/<stem>.png (or .bmp)                       0/255
                   categories 01, 02, 03; the zip extracts to BTech_Dataset_transformed/,
                   which is found when the root is its parent
    DTD-Synthetic  <cat>/train/good  <cat>/test/{good,bad}
                   <cat>/ground_truth/bad/<stem>_mask.png (or <stem>.png)
    MVTec AD 2     <cat>/train/good  <cat>/validation/good
                   <cat>/test_public/{good,bad}  <cat>/test_public/ground_truth/bad/<stem>_mask.png
                   (test_private* have no ground truth and are not read)
    MVTec LOCO AD  <cat>/train/good  <cat>/validation/good
                   <cat>/test/{good,logical_anomalies,structural_anomalies}
                   <cat>/ground_truth/<type>/<stem>/000.png, 001.png, ...   one file per defect
                   region; values are defect ids (not 0/255): the union of the files, any
                   non-zero pixel, is the mask

Every mask here is binarised "any non-zero pixel is anomalous" (threshold 0). Grayscale images
(MPDD and MVTec AD 2 have some) load as 3-channel RGB.

MVTec LOCO AD: ``subset: logical`` keeps normal + logical anomalies, ``subset: structural``
normal + structural anomalies, no subset both. The benchmark protocol reports logical and
structural separately and their mean (scripts/zero_shot_suite.py runs both subsets).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import logging
from pathlib import Path

import numpy as np

from clipsam.data.formats import DatasetFormat, register
from clipsam.data.formats.common import parse_mvtec_like
from clipsam.data.samples import Sample, save_image

if TYPE_CHECKING:  # the synthetic writers get a source; formats never import the generator
    from clipsam.data.synthetic import SynthSource

__all__ = [
    "BTAD_CATEGORIES",
    "DTD_CATEGORIES",
    "LOCO_CATEGORIES",
    "MPDD_CATEGORIES",
    "MVTEC_AD2_CATEGORIES",
]

log = logging.getLogger(__name__)

_CC = "CC BY-NC-SA 4.0 (non-commercial use only)"

MPDD_CATEGORIES = ("bracket_black", "bracket_brown", "bracket_white", "connector", "metal_plate", "tubes")
BTAD_CATEGORIES = ("01", "02", "03")
DTD_CATEGORIES = (
    "Blotchy_099",
    "Fibrous_183",
    "Marbled_078",
    "Matted_069",
    "Mesh_114",
    "Perforated_037",
    "Stratified_154",
    "Woven_001",
    "Woven_068",
    "Woven_104",
    "Woven_125",
    "Woven_127",
)
MVTEC_AD2_CATEGORIES = ("can", "fabric", "fruit_jelly", "rice", "sheet_metal", "vial", "wallplugs", "walnuts")
LOCO_CATEGORIES = ("breakfast_box", "juice_bottle", "pushpins", "screw_bag", "splicing_connectors")
LOCO_SUBSETS = {"logical": ("logical_anomalies",), "structural": ("structural_anomalies",)}


# ------------------------------------------------------------------------------------ parsers
def _parse_mpdd(root: Path, *, categories, split, subset) -> list[Sample]:
    return parse_mvtec_like(
        root, name="MPDD", categories=categories, split=split, official=MPDD_CATEGORIES,
        fix="download MPDD by hand (`clipsam data download mpdd` says where)",
    )


def _parse_btad(root: Path, *, categories, split, subset) -> list[Sample]:
    nested = root / "BTech_Dataset_transformed"
    if nested.is_dir() and not any((root / c).is_dir() for c in BTAD_CATEGORIES):
        log.info("BTAD: reading %s (the folder the official zip extracts to)", nested)
        root = nested
    return parse_mvtec_like(
        root, name="BTAD", categories=categories, split=split, official=BTAD_CATEGORIES, good="ok",
        mask_patterns=("{stem}.png", "{stem}.bmp"),
        fix=f"run `clipsam data download btad --root {root}`",
    )


def _parse_dtd(root: Path, *, categories, split, subset) -> list[Sample]:
    return parse_mvtec_like(
        root, name="DTD-Synthetic", categories=categories, split=split, official=DTD_CATEGORIES,
        mask_patterns=("{stem}_mask.png", "{stem}.png"),
        fix="download DTD-Synthetic by hand (`clipsam data download dtd_synthetic` says where)",
    )


def _parse_ad2(root: Path, *, categories, split, subset) -> list[Sample]:
    return parse_mvtec_like(
        root, name="MVTec AD 2", categories=categories, split=split, official=MVTEC_AD2_CATEGORIES,
        test_dir="test_public", mask_dir=lambda cat, defect: cat / "test_public" / "ground_truth" / defect,
        fix=f"run `clipsam data download mvtec_ad2 --root {root}`",
    )


def _parse_loco(root: Path, *, categories, split, subset) -> list[Sample]:
    return parse_mvtec_like(
        root, name="MVTec LOCO AD", categories=categories, split=split, official=LOCO_CATEGORIES,
        mask_is_folder=True, defects=LOCO_SUBSETS.get(subset) if subset else None,
        fix=f"run `clipsam data download mvtec_loco --root {root}`",
    )


# ---------------------------------------------------------------------------- synthetic writers
def _write_tree(
    root: Path,
    src: SynthSource,
    official: tuple[str, ...],
    *,
    good: str = "good",
    defect_folder=lambda defect, i: defect,
    suffix=lambda category_index: ".png",
    test_dir: str = "test",
    mask_file=lambda cat_dir, test_dir, folder, stem: cat_dir / "ground_truth" / folder / f"{stem}_mask.png",
    gray: bool = False,
    validation: bool = False,
) -> None:
    """Write an MVTec-like tree; ``mask_file`` returns where the mask of an image goes."""
    for ci, (category, synth) in enumerate(src.categories(official)):
        cat_dir = root / category
        ext = suffix(ci)
        parts = [("train_good", cat_dir / "train" / good), ("test_good", cat_dir / test_dir / good)]
        for part, folder in parts:
            for item in src.items(synth, part):
                save_image(item.image[..., 0] if gray else item.image, folder / f"{item.index:03d}{ext}")
        if validation:
            for item in src.items(synth, "train_good"):
                save_image(item.image, cat_dir / "validation" / good / f"{item.index:03d}{ext}")
        for item in src.items(synth, "test_anomalous"):
            folder = defect_folder(item.defect, item.index)
            stem = f"{item.index:03d}"
            save_image(item.image[..., 0] if gray else item.image, cat_dir / test_dir / folder / f"{stem}{ext}")
            mask_path = mask_file(cat_dir, test_dir, folder, stem)
            if mask_path is not None:
                save_image(item.mask.astype(np.uint8) * 255, mask_path)


def _synth_mpdd(root: Path, src: SynthSource) -> None:
    _write_tree(root, src, MPDD_CATEGORIES)


def _synth_btad(root: Path, src: SynthSource) -> None:
    # 01 and 03 are .bmp, 02 .png (as in the release); masks .png named like their image
    _write_tree(
        root / "BTech_Dataset_transformed", src, BTAD_CATEGORIES, good="ok",
        defect_folder=lambda defect, i: "ko", suffix=lambda ci: ".png" if ci == 1 else ".bmp",
        mask_file=lambda cat_dir, test_dir, folder, stem: cat_dir / "ground_truth" / folder / f"{stem}.png",
    )


def _synth_dtd(root: Path, src: SynthSource) -> None:
    _write_tree(root, src, DTD_CATEGORIES, defect_folder=lambda defect, i: "bad")


def _synth_ad2(root: Path, src: SynthSource) -> None:
    _write_tree(
        root, src, MVTEC_AD2_CATEGORIES, defect_folder=lambda defect, i: "bad", test_dir="test_public",
        mask_file=lambda cat_dir, test_dir, folder, stem: cat_dir / test_dir / "ground_truth" / folder / f"{stem}_mask.png",
        validation=True,
    )


def _synth_loco(root: Path, src: SynthSource) -> None:
    # even anomalous images are "logical", odd ones "structural"; each mask is split into two
    # files (left and right half) holding defect-id values 21 and 37 instead of 255
    def folder(defect: str | None, i: int) -> str:
        return "logical_anomalies" if i % 2 == 0 else "structural_anomalies"

    _write_tree(root, src, LOCO_CATEGORIES, defect_folder=folder, mask_file=lambda *a: None, validation=True)
    for category, synth in src.categories(LOCO_CATEGORIES):
        for item in src.items(synth, "test_anomalous"):
            gt = root / category / "ground_truth" / folder(item.defect, item.index) / f"{item.index:03d}"
            half = item.mask.shape[1] // 2
            left, right = item.mask.copy(), item.mask.copy()
            left[:, half:] = False
            right[:, :half] = False
            save_image(left.astype(np.uint8) * 21, gt / "000.png")
            save_image(right.astype(np.uint8) * 37, gt / "001.png")


# -------------------------------------------------------------------------------- registration
register(
    DatasetFormat(
        key="mpdd", name="MPDD", parse=_parse_mpdd, categories=MPDD_CATEGORIES, level="pixel", env="MPDD_ROOT",
        license=_CC + "; https://github.com/stepanje/MPDD", synth=_synth_mpdd,
    )
)
register(
    DatasetFormat(
        key="btad", name="BTAD", parse=_parse_btad, categories=BTAD_CATEGORIES, level="pixel", env="BTAD_ROOT",
        download="btad", license=_CC + "; https://avires.dimi.uniud.it/papers/btad/", synth=_synth_btad,
    )
)
register(
    DatasetFormat(
        key="dtd_synthetic", name="DTD-Synthetic", parse=_parse_dtd, categories=DTD_CATEGORIES, level="pixel",
        env="DTD_SYNTHETIC_ROOT",
        license="research use (built on the Describable Textures Dataset; Aota et al., WACV 2023)",
        synth=_synth_dtd,
    )
)
register(
    DatasetFormat(
        key="mvtec_ad2", name="MVTec AD 2", parse=_parse_ad2, categories=MVTEC_AD2_CATEGORIES, level="pixel",
        env="MVTEC_AD2_ROOT", download="mvtec_ad2",
        license=_CC + "; https://www.mvtec.com/company/research/datasets/mvtec-ad-2", synth=_synth_ad2,
    )
)
register(
    DatasetFormat(
        key="mvtec_loco", name="MVTec LOCO AD", parse=_parse_loco, categories=LOCO_CATEGORIES, level="pixel",
        env="MVTEC_LOCO_ROOT", subsets=tuple(LOCO_SUBSETS),
        subset_help="logical or structural anomalies (with all normal images); unset: both",
        download="mvtec_loco",
        license=_CC + "; https://www.mvtec.com/company/research/datasets/mvtec-loco", synth=_synth_loco,
    )
)
