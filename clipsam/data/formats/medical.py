"""Medical datasets of the zero-shot protocol (AnomalyCLIP, AdaCLIP): pixel and image level.

Pixel level: every image shows a lesion and has a mask (no normal images, so image-level
metrics are undefined, reported n/a; pixel metrics are the result). Layouts as published::

    isic2016   ISBI2016_ISIC_Part1_Test_Data/ISIC_<id>.jpg                   (split: test)
               ISBI2016_ISIC_Part1_Test_GroundTruth/ISIC_<id>_Segmentation.png
               ISBI2016_ISIC_Part1_Training_Data/, ..._Training_GroundTruth/ (split: train)
    clinicdb   Original/<n>.tif + "Ground Truth"/<n>.tif   (the Kaggle copy: PNG/Original,
               PNG/Ground Truth or TIF/...; the PraNet copy: images/ + masks/)
    colondb    images/<n>.png + masks/<n>.png   (also Original/ + "Ground Truth"/)
    kvasir     Kvasir-SEG: images/<id>.jpg + masks/<id>.jpg    JPEG masks
    endo       images/ + masks/   (EndoTect 2020 segmentation set)
    tn3k       test-image/<n>.jpg + test-mask/<n>.jpg          (split: test)
               trainval-image/ + trainval-mask/                 (split: train)   JPEG masks

Images and masks pair by file stem (a mask may add ``_Segmentation`` or ``_mask``). Masks are
binarised at **value > 127** (:attr:`Sample.mask_threshold`): JPEG masks (Kvasir-SEG, TN3K) and
anti-aliased ones (the PNG copies of CVC-ClinicDB) hold small non-zero values on the background
that "any non-zero" would call lesion.

Image level only (no masks; pixel metrics n/a)::

    headct     labels.csv (id, hemorrhage) + head_ct/<id:03d>.png          grayscale CT
    brainmri   yes/ + no/   (or brain_tumor_dataset/yes, brain_tumor_dataset/no)
    br35h      yes/ + no/   (Br35H 2020; the unlabelled pred/ folder is not read)

The MVTec-like conversions of AdaCLIP/AnomalyCLIP (``<cat>/test/{good,<defect>}``, masks in
``<cat>/ground_truth/<defect>/``) are read as well, when the root holds one.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import csv
from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np

from clipsam.data.formats import DatasetFormat, register
from clipsam.data.formats.common import check_root, image_files, parse_mvtec_like, resolve_categories
from clipsam.data.samples import Sample, save_image
from clipsam.errors import DatasetError

if TYPE_CHECKING:  # the synthetic writers get a source; formats never import the generator
    from clipsam.data.synthetic import SynthSource

__all__ = ["MEDICAL_THRESHOLD"]

#: Mask values above this are lesion in the medical pixel-level datasets.
MEDICAL_THRESHOLD = 127
_STRIP = ("_Segmentation", "_segmentation", "_mask", "_GT")


def _converted(root: Path, name: str, category: str, categories, split, *, masks: bool) -> list[Sample] | None:
    """An AdaCLIP/AnomalyCLIP MVTec-like conversion in ``root`` (else None).

    These datasets have one category, so exactly one ``<cat>/test/`` folder is a conversion;
    several (an industrial dataset given by mistake) are not.
    """
    cats = [p for p in root.iterdir() if p.is_dir() and (p / "test").is_dir()]
    if len(cats) != 1:
        return None
    fix = "point the root at the converted dataset"
    samples = parse_mvtec_like(
        root, name=name, categories=categories, split=split, official=(category,), fix=fix,
        mask_patterns=("{stem}_mask.png", "{stem}.png", "{stem}_Segmentation.png"), mask_threshold=MEDICAL_THRESHOLD,
    )
    if not masks:
        samples = [Sample(s.image_path, None, s.label, s.category, s.defect_type) for s in samples]
    return samples


def _pairs(
    root: Path,
    *,
    name: str,
    category: str,
    categories,
    split: str,
    layouts: dict[str, Sequence[tuple[str, str]]],
    fix: str,
) -> list[Sample]:
    """Images + masks in two parallel folders; the first layout present for ``split`` wins."""
    check_root(root, name, fix=fix)
    converted = _converted(root, name, category, categories, split, masks=True)
    if converted is not None:
        return converted
    resolve_categories(root, (category,), categories, name=name, official=(category,), expected="")
    candidates = layouts.get(split, ())
    found = next(((root / i, root / m) for i, m in candidates if (root / i).is_dir() and (root / m).is_dir()), None)
    if found is None:
        expected = " or ".join(f"{i}/ + {m}/" for i, m in candidates) or "(none)"
        content = ", ".join(sorted(p.name for p in root.iterdir())[:10]) or "(empty)"
        raise DatasetError(
            f"{name} root {root} has no image and mask folders for split {split!r} (expected {expected}); "
            f"it contains: {content}. Point the root at the extracted dataset; {fix}"
        )
    image_dir, mask_dir = found
    index: dict[str, Path] = {}
    for mask in image_files(mask_dir):
        stem = mask.stem
        for suffix in _STRIP:
            if stem.endswith(suffix):
                stem = stem[: -len(suffix)]
                break
        index[stem] = mask
    samples = []
    for image in image_files(image_dir):
        mask = index.get(image.stem)
        if mask is None:
            raise DatasetError(
                f"{name} image {image} has no mask in {mask_dir} (expected {image.stem}.png, "
                f"{image.stem}_Segmentation.png or {image.stem}_mask.png): add it or remove the image"
            )
        samples.append(Sample(image, mask, 1, category, "lesion", MEDICAL_THRESHOLD))
    return samples


def _image_level(root: Path, *, name: str, category: str, categories, split: str, fix: str) -> list[Sample]:
    """``yes/`` (anomalous) and ``no/`` (normal) folders, optionally one level down."""
    check_root(root, name, fix=fix)
    converted = _converted(root, name, category, categories, split, masks=False)
    if converted is not None:
        return converted
    resolve_categories(root, (category,), categories, name=name, official=(category,), expected="")
    base = next((b for b in (root, root / "brain_tumor_dataset") if (b / "yes").is_dir() and (b / "no").is_dir()), None)
    if base is None:
        raise DatasetError(f"{name} root {root} has no yes/ and no/ folders: point the root at the extracted dataset; {fix}")
    return [Sample(p, None, 0, category, "good") for p in image_files(base / "no")] + [
        Sample(p, None, 1, category, "tumor") for p in image_files(base / "yes")
    ]


# ------------------------------------------------------------------------------------ parsers
def _parse_isic(root, *, categories, split, subset):
    part = {"test": "Test", "train": "Training"}
    layouts = {s: [(f"ISBI2016_ISIC_Part1_{p}_Data", f"ISBI2016_ISIC_Part1_{p}_GroundTruth")] for s, p in part.items()}
    return _pairs(root, name="ISIC 2016", category="skin", categories=categories, split=split, layouts=layouts,
                  fix=f"run `clipsam data download isic2016 --root {root} --allow-unverified`")


_CVC = [("images", "masks"), ("Original", "Ground Truth"), ("PNG/Original", "PNG/Ground Truth"),
        ("TIF/Original", "TIF/Ground Truth")]


def _parse_clinicdb(root, *, categories, split, subset):
    return _pairs(root, name="CVC-ClinicDB", category="colon", categories=categories, split=split,
                  layouts={"test": _CVC}, fix="download CVC-ClinicDB by hand (`clipsam data download clinicdb` says where)")


def _parse_colondb(root, *, categories, split, subset):
    return _pairs(root, name="CVC-ColonDB", category="colon", categories=categories, split=split,
                  layouts={"test": _CVC}, fix="download CVC-ColonDB by hand (`clipsam data download colondb` says where)")


def _parse_kvasir(root, *, categories, split, subset):
    nested = root / "Kvasir-SEG"
    if nested.is_dir() and not (root / "images").is_dir():
        root = nested  # the zip extracts to Kvasir-SEG/
    return _pairs(root, name="Kvasir-SEG", category="colon", categories=categories, split=split,
                  layouts={"test": [("images", "masks")]},
                  fix=f"run `clipsam data download kvasir --root {root} --allow-unverified`")


def _parse_endo(root, *, categories, split, subset):
    return _pairs(root, name="Endo", category="colon", categories=categories, split=split,
                  layouts={"test": [("images", "masks")]}, fix="download Endo by hand (`clipsam data download endo` says where)")


def _parse_tn3k(root, *, categories, split, subset):
    layouts = {"test": [("test-image", "test-mask")], "train": [("trainval-image", "trainval-mask")]}
    return _pairs(root, name="TN3K", category="thyroid", categories=categories, split=split, layouts=layouts,
                  fix="download TN3K by hand (`clipsam data download tn3k` says where)")


def _parse_headct(root, *, categories, split, subset):
    name, fix = "HeadCT", "download HeadCT by hand (`clipsam data download headct` says where)"
    check_root(root, name, fix=fix)
    converted = _converted(root, name, "brain", categories, split, masks=False)
    if converted is not None:
        return converted
    resolve_categories(root, ("brain",), categories, name=name, official=("brain",), expected="")
    labels = root / "labels.csv"
    images = next((d for d in (root / "head_ct" / "head_ct", root / "head_ct") if d.is_dir()), None)
    if not labels.is_file() or images is None:
        raise DatasetError(f"HeadCT root {root} needs labels.csv and head_ct/<id>.png: point the root at the extracted dataset; {fix}")
    with labels.open(newline="", encoding="utf-8") as handle:
        rows = [[c.strip() for c in row] for row in csv.reader(handle) if row]
    header = [h.lower() for h in rows[0]]
    if "id" not in header or "hemorrhage" not in header:
        raise DatasetError(f"HeadCT labels file {labels} must have the columns id and hemorrhage, found {rows[0]}")
    samples = []
    for line, row in enumerate(rows[1:], start=2):
        try:
            ident, label = int(row[header.index("id")]), int(row[header.index("hemorrhage")])
        except (ValueError, IndexError):
            raise DatasetError(f"HeadCT labels file {labels} line {line} is not 'id,hemorrhage' integers: {row}") from None
        if label not in (0, 1):
            raise DatasetError(f"HeadCT labels file {labels} line {line}: hemorrhage is {label}, not 0 or 1")
        samples.append(Sample(images / f"{ident:03d}.png", None, label, "brain", "hemorrhage" if label else "good"))
    return samples


def _parse_brainmri(root, *, categories, split, subset):
    return _image_level(root, name="BrainMRI", category="brain", categories=categories, split=split,
                        fix="download BrainMRI by hand (`clipsam data download brainmri` says where)")


def _parse_br35h(root, *, categories, split, subset):
    return _image_level(root, name="Br35H", category="brain", categories=categories, split=split,
                        fix="download Br35H by hand (`clipsam data download br35h` says where)")


# ---------------------------------------------------------------------------- synthetic writers
def _lesions(src: SynthSource, official: tuple[str, ...]):
    (_, synth), = src.categories(official)
    return src.items(synth, "test_anomalous")


def _soft(mask: np.ndarray) -> np.ndarray:
    """The mask at 255 with a one-pixel ring of value 64 around it, like an anti-aliased edge.

    Binarised at > 127 it is ``mask`` again; "any non-zero" would grow it by the ring.
    """
    ring = cv2.dilate(mask.astype(np.uint8), np.ones((3, 3), np.uint8)).astype(bool) & ~mask
    return (mask.astype(np.uint8) * 255) + (ring.astype(np.uint8) * 64)


def _write_pairs(root: Path, src: SynthSource, image_dir: str, mask_dir: str, *, image_name, mask_name, soft=False):
    for item in _lesions(src, ("lesion",)):
        save_image(item.image, root / image_dir / image_name(item.index))
        save_image(_soft(item.mask) if soft else item.mask.astype(np.uint8) * 255, root / mask_dir / mask_name(item.index))


def _synth_isic(root, src):
    for part in ("Test", "Training"):
        _write_pairs(root, src, f"ISBI2016_ISIC_Part1_{part}_Data", f"ISBI2016_ISIC_Part1_{part}_GroundTruth",
                     image_name=lambda i: f"ISIC_{i:07d}.jpg", mask_name=lambda i: f"ISIC_{i:07d}_Segmentation.png")


def _synth_clinicdb(root, src):  # TIFF files, anti-aliased masks
    _write_pairs(root, src, "Original", "Ground Truth", image_name=lambda i: f"{i + 1}.tif",
                 mask_name=lambda i: f"{i + 1}.tif", soft=True)


def _synth_colondb(root, src):
    _write_pairs(root, src, "images", "masks", image_name=lambda i: f"{i + 1}.png", mask_name=lambda i: f"{i + 1}.png")


def _synth_kvasir(root, src):  # JPEG masks, inside the zip's Kvasir-SEG/ folder
    _write_pairs(root / "Kvasir-SEG", src, "images", "masks", image_name=lambda i: f"cju{i:05d}.jpg",
                 mask_name=lambda i: f"cju{i:05d}.jpg")


def _synth_endo(root, src):
    _write_pairs(root, src, "images", "masks", image_name=lambda i: f"e{i:03d}.jpg", mask_name=lambda i: f"e{i:03d}.png")


def _synth_tn3k(root, src):
    for part in ("test", "trainval"):
        _write_pairs(root, src, f"{part}-image", f"{part}-mask", image_name=lambda i: f"{i:04d}.jpg",
                     mask_name=lambda i: f"{i:04d}.jpg")


def _synth_yes_no(root: Path, src: SynthSource, *, nested: bool) -> None:
    (_, synth), = src.categories(("brain",))
    base = root / "brain_tumor_dataset" if nested else root
    for item in src.items(synth, "test_good"):
        save_image(item.image, base / "no" / f"no{item.index}.jpg")
    for item in src.items(synth, "test_anomalous"):
        save_image(item.image, base / "yes" / f"y{item.index}.jpg")


def _synth_headct(root: Path, src: SynthSource) -> None:
    (_, synth), = src.categories(("brain",))
    rows, k = [], 0
    for part, label in (("test_good", 0), ("test_anomalous", 1)):
        for item in src.items(synth, part):
            save_image(item.image[..., 0], root / "head_ct" / f"{k:03d}.png")  # grayscale
            rows.append(f"{k},{label}")
            k += 1
    (root / "labels.csv").write_text("id, hemorrhage\n" + "\n".join(rows) + "\n", encoding="utf-8")


# -------------------------------------------------------------------------------- registration
def _reg(key, name, parse, category, level, *, env, splits=("test",), download=None, license, synth):
    register(DatasetFormat(key=key, name=name, parse=parse, categories=(category,), level=level, env=env,
                           splits=splits, download=download, license=license, synth=synth))


_reg("isic2016", "ISIC 2016", _parse_isic, "skin", "pixel", env="ISIC_ROOT", splits=("train", "test"),
     download="isic2016", license="ISIC Archive terms of use (per-image licences); https://challenge.isic-archive.com/data/#2016",
     synth=_synth_isic)
_reg("clinicdb", "CVC-ClinicDB", _parse_clinicdb, "colon", "pixel", env="CLINICDB_ROOT",
     license="research use, cite Bernal et al. 2015; https://polyp.grand-challenge.org/CVCClinicDB/",
     synth=_synth_clinicdb)
_reg("colondb", "CVC-ColonDB", _parse_colondb, "colon", "pixel", env="COLONDB_ROOT",
     license="research use, cite Bernal et al. 2012; http://vi.cvc.uab.es/colon-qa/cvccolondb/", synth=_synth_colondb)
_reg("kvasir", "Kvasir-SEG", _parse_kvasir, "colon", "pixel", env="KVASIR_ROOT", download="kvasir",
     license="research and educational use, cite Jha et al. 2020; https://datasets.simula.no/kvasir-seg/",
     synth=_synth_kvasir)
_reg("endo", "Endo (EndoTect 2020)", _parse_endo, "colon", "pixel", env="ENDO_ROOT",
     license="research use, cite Hicks et al. 2021 (EndoTect challenge); https://endotect.com/", synth=_synth_endo)
_reg("tn3k", "TN3K", _parse_tn3k, "thyroid", "pixel", env="TN3K_ROOT", splits=("train", "test"),
     license="research use, cite Gong et al. 2021 (TRFE-Net); https://github.com/haifangong/TRFE-Net-for-thyroid-nodule-segmentation",
     synth=_synth_tn3k)
_reg("headct", "HeadCT", _parse_headct, "brain", "image", env="HEADCT_ROOT",
     license="see the Kaggle page (felipekitamura/head-ct-hemorrhage)", synth=_synth_headct)
_reg("brainmri", "BrainMRI", _parse_brainmri, "brain", "image", env="BRAINMRI_ROOT",
     license="see the Kaggle page (navoneel/brain-mri-images-for-brain-tumor-detection)",
     synth=lambda root, src: _synth_yes_no(root, src, nested=True))
_reg("br35h", "Br35H", _parse_br35h, "brain", "image", env="BR35H_ROOT",
     license="see the Kaggle page (ahmedhamada0/brain-tumor-detection)",
     synth=lambda root, src: _synth_yes_no(root, src, nested=False))
