"""Parsers (MVTec-AD, VisA, folder) and layout validation."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from clipsam.data.folder import list_images, parse_folder
from clipsam.data.mvtec import MVTEC_CATEGORIES, parse_mvtec
from clipsam.data.samples import Sample, read_image, read_mask, validate_samples
from clipsam.data.visa import VISA_CATEGORIES, parse_visa
from clipsam.errors import DatasetError
from tests.helpers.data import write_image


def test_category_constants() -> None:
    assert len(MVTEC_CATEGORIES) == 15 and "metal_nut" in MVTEC_CATEGORIES
    assert len(VISA_CATEGORIES) == 12 and "pipe_fryum" in VISA_CATEGORIES


def _key(s: Sample) -> tuple:
    return (s.category, s.label, s.defect_type)


def test_both_layouts_parse_to_the_same_samples(synth_root: Path) -> None:
    mvtec = parse_mvtec(synth_root / "mvtec")
    visa = parse_visa(synth_root / "visa")
    assert sorted(map(_key, mvtec)) == sorted(map(_key, visa))
    assert {s.category for s in mvtec} == {"disk", "fabric", "mesh"}
    assert sum(s.label for s in mvtec) == 3 * 4 and len(mvtec) == 3 * 6
    validate_samples(mvtec, what="mvtec")
    validate_samples(visa, what="visa")
    # identical masks after binarisation, pairing images by (category, defect)
    m_masks = {(s.category, s.defect_type): read_mask(s.mask_path) for s in mvtec if s.label}
    v_masks = {(s.category, s.defect_type): read_mask(s.mask_path) for s in visa if s.label}
    assert m_masks.keys() == v_masks.keys()
    for key, mask in m_masks.items():
        assert mask.any() and np.array_equal(mask, v_masks[key]), key
    train_m = parse_mvtec(synth_root / "mvtec", split="train")
    train_v = parse_visa(synth_root / "visa", split="train")
    assert len(train_m) == len(train_v) == 3 * 2 and all(s.label == 0 for s in train_m + train_v)


def test_category_selection(synth_root: Path) -> None:
    assert {s.category for s in parse_mvtec(synth_root / "mvtec", categories=["disk"])} == {"disk"}
    assert {s.category for s in parse_visa(synth_root / "visa", categories=["mesh"])} == {"mesh"}


def test_visa_non_binary_mask_values_are_anomalous(tmp_path: Path) -> None:
    for value in (1, 38, 255):
        arr = np.zeros((8, 8), np.uint8)
        arr[2:4, 3:5] = value
        mask = read_mask(write_image(tmp_path / f"m{value}.png", arr))
        assert mask.dtype == bool and mask.sum() == 4


def test_grayscale_images_load_as_three_channels(synth_root: Path) -> None:
    path = synth_root / "mvtec/mesh/train/good/000.png"
    assert Image.open(path).mode == "L"
    image = read_image(path)
    assert image.shape == (48, 48, 3) and image.dtype == np.uint8


# ---------------------------------------------------------------------------- bad layouts
def test_missing_root(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match=r"nowhere.*clipsam data download mvtec"):
        parse_mvtec(tmp_path / "nowhere")
    with pytest.raises(DatasetError, match=r"nowhere.*clipsam data download visa"):
        parse_visa(tmp_path / "nowhere")


def test_unknown_category_lists_available(synth_root: Path) -> None:
    with pytest.raises(DatasetError, match=r"'bolt'.*available: disk, fabric, mesh"):
        parse_mvtec(synth_root / "mvtec", categories=["bolt"])
    with pytest.raises(DatasetError, match=r"'bolt'.*available: disk, fabric, mesh"):
        parse_visa(synth_root / "visa", categories=["bolt"])


def test_missing_category_folder(synth_copy: Path) -> None:
    shutil.rmtree(synth_copy / "mvtec/disk")
    with pytest.raises(DatasetError, match=str(synth_copy / "mvtec/bottle")):
        parse_mvtec(synth_copy / "mvtec", categories=["bottle"])
    shutil.rmtree(synth_copy / "visa/disk")
    with pytest.raises(DatasetError, match=str(synth_copy / "visa/disk")):
        parse_visa(synth_copy / "visa")


def test_missing_visa_split_file(synth_copy: Path) -> None:
    (synth_copy / "visa/split_csv/1cls.csv").unlink()
    with pytest.raises(DatasetError, match=r"split_csv/1cls.csv does not exist"):
        parse_visa(synth_copy / "visa")


def test_image_without_mask(synth_copy: Path) -> None:
    mask = synth_copy / "mvtec/fabric/ground_truth/hole/000_mask.png"
    mask.unlink()
    with pytest.raises(DatasetError, match=str(mask)):
        validate_samples(parse_mvtec(synth_copy / "mvtec"), what="x", check="headers")


def test_mask_of_another_size(synth_copy: Path) -> None:
    mask = synth_copy / "mvtec/disk/ground_truth/stain/000_mask.png"
    write_image(mask, np.zeros((30, 40), np.uint8))
    with pytest.raises(DatasetError, match=r"40x30.*disk/test/stain/000.png.*48x48"):
        validate_samples(parse_mvtec(synth_copy / "mvtec"), what="x")


def test_corrupt_image(synth_copy: Path) -> None:
    bad = synth_copy / "visa/fabric/Data/Images/Normal/0000.JPG"
    bad.write_bytes(b"this is not a jpeg")
    with pytest.raises(DatasetError, match=rf"{bad}.*corrupt"):
        validate_samples(parse_visa(synth_copy / "visa", split="train"), what="x", check="headers")


@pytest.mark.parametrize("name", ["mvtec/fabric/test/good/000.png", "visa/fabric/Data/Images/Anomaly/000.JPG"])
def test_truncated_image(synth_copy: Path, name: str) -> None:
    bad = synth_copy / name
    data = bad.read_bytes()
    bad.write_bytes(data[: len(data) // 2])
    samples = parse_mvtec(synth_copy / "mvtec") + parse_visa(synth_copy / "visa")
    validate_samples(samples, what="x", check="headers")  # the header alone is intact
    with pytest.raises(DatasetError, match=rf"{bad}.*truncated"):
        validate_samples(samples, what="x", check="full")
    with pytest.raises(DatasetError, match=str(bad)):
        read_image(bad)


def test_empty_split(tmp_path: Path) -> None:
    (tmp_path / "mvtec/widget/test/good").mkdir(parents=True)
    samples = parse_mvtec(tmp_path / "mvtec")
    with pytest.raises(DatasetError, match=r"0 images found in MVTec root /x"):
        validate_samples(samples, what="MVTec root /x")


def test_validation_reports_the_first_problem_and_the_count(synth_copy: Path) -> None:
    for name in ("000", "001"):
        (synth_copy / f"mvtec/mesh/test/good/{name}.png").write_bytes(b"")
    with pytest.raises(DatasetError, match=r"mesh/test/good/000.png.*1 more file"):
        validate_samples(parse_mvtec(synth_copy / "mvtec"), what="x")


# -------------------------------------------------------------------------------- folder
def _folder(tmp_path: Path, *, masks: bool) -> Path:
    root = tmp_path / "bottles"
    img = np.full((16, 20, 3), 100, np.uint8)
    write_image(root / "good/a.png", img)
    write_image(root / "good/b.jpg", img)
    write_image(root / "anomalous/c.png", img)
    write_image(root / "anomalous/crack/d.png", img)
    if masks:
        write_image(root / "masks/c.png", np.zeros((16, 20), np.uint8))
        write_image(root / "masks/d_mask.png", np.zeros((16, 20), np.uint8))
    return root


def test_folder_with_masks(tmp_path: Path) -> None:
    samples = parse_folder(_folder(tmp_path, masks=True))
    assert [(s.label, s.defect_type, s.category) for s in samples] == [
        (0, "good", "bottles"), (0, "good", "bottles"), (1, "anomalous", "bottles"), (1, "crack", "bottles")
    ]
    assert [s.mask_path.name for s in samples if s.label] == ["c.png", "d_mask.png"]
    validate_samples(samples, what="x", require_masks=False)


def test_folder_without_masks(tmp_path: Path) -> None:
    samples = parse_folder(_folder(tmp_path, masks=False), category="bottle")
    assert all(s.mask_path is None for s in samples) and {s.category for s in samples} == {"bottle"}
    validate_samples(samples, what="x", require_masks=False)
    with pytest.raises(DatasetError, match="has no ground-truth mask"):
        validate_samples(samples, what="x", require_masks=True)


def test_folder_partial_masks_and_bad_root(tmp_path: Path) -> None:
    root = _folder(tmp_path, masks=True)
    (root / "masks/c.png").unlink()
    with pytest.raises(DatasetError, match=r"anomalous/c.png has no mask"):
        parse_folder(root)
    with pytest.raises(DatasetError, match="neither good/"):
        parse_folder(root / "masks")


def test_list_images_skips_other_files(tmp_path: Path) -> None:
    write_image(tmp_path / "x.PNG", np.zeros((4, 4), np.uint8))
    write_image(tmp_path / "sub/y.jpeg", np.zeros((4, 4), np.uint8))
    (tmp_path / "notes.txt").write_text("hi")
    (tmp_path / ".DS_Store").write_bytes(b"")
    images, skipped = list_images(tmp_path)
    assert [p.name for p in images] == ["y.jpeg", "x.PNG"]  # sorted by path: sub/ first
    assert [p.name for p in skipped] == [".DS_Store", "notes.txt"]
    assert [p.name for p in list_images(tmp_path, recursive=False)[0]] == ["x.PNG"]
