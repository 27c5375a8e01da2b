"""The public readers clipsam.data.read_image / read_mask: orientation, bit depth, alpha, formats.

Expected values are worked out by hand from the pixels written (and PIL's documented EXIF
transposition for orientation 6: rotate 90 degrees clockwise for display).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from clipsam.data import read_image, read_mask
from clipsam.data.samples import Sample, validate_samples
from clipsam.errors import DatasetError


def _with_orientation(path: Path, array: np.ndarray, orientation: int) -> Path:
    image = Image.fromarray(array)
    exif = Image.Exif()
    exif[0x0112] = orientation
    image.save(path, exif=exif.tobytes())
    return path


def test_exif_orientation_gives_the_display_orientation(tmp_path: Path) -> None:
    stored = np.zeros((2, 3, 3), dtype=np.uint8)  # H=2, W=3 as stored
    stored[0, 0] = (255, 0, 0)  # red at the stored top-left
    path = _with_orientation(tmp_path / "rotated.png", stored, 6)
    image = read_image(path)
    # Orientation 6: the viewer rotates 90 degrees clockwise -> H=3, W=2, stored top-left -> top-right.
    assert image.shape == (3, 2, 3)
    assert image[0, 1].tolist() == [255, 0, 0] and image.sum() == 255
    # A mask stored the same way turns the same way, so image and mask stay aligned.
    mask_stored = np.zeros((2, 3), dtype=np.uint8)
    mask_stored[0, 0] = 255
    mask = read_mask(_with_orientation(tmp_path / "rotated_mask.png", mask_stored, 6))
    assert mask.shape == (3, 2) and mask[0, 1] and mask.sum() == 1
    # Validation compares display sizes too: a (3 x 2) upright mask fits the rotated image.
    upright = tmp_path / "upright_mask.png"
    Image.fromarray(np.zeros((3, 2), dtype=np.uint8)).save(upright)
    validate_samples([Sample(path, upright, 1, "c", "d")], what="x", check="full")


def test_sixteen_bit_is_scaled_by_bit_depth_not_by_the_image_maximum(tmp_path: Path) -> None:
    values = np.full((4, 4), 8000, dtype=np.uint16)
    Image.fromarray(values).save(tmp_path / "plain.png")
    values[0, 0] = 32000  # one hot pixel
    Image.fromarray(values).save(tmp_path / "hot.png")
    plain, hot = read_image(tmp_path / "plain.png"), read_image(tmp_path / "hot.png")
    assert plain.shape == (4, 4, 3) and plain.dtype == np.uint8
    assert (plain == 31).all()  # round(8000 / 257) = round(31.13)
    assert (hot[1:, 1:] == 31).all(), "one hot pixel must not change the other pixels"
    assert (hot[0, 0] == 125).all()  # round(32000 / 257) = round(124.5) -> 125 (half up)
    assert (read_image(tmp_path / "plain.png", sixteen_bit="shift") == 8000 >> 8).all()


def test_float_tiff_in_unit_range(tmp_path: Path) -> None:
    values = np.array([[0.0, 0.5], [1.0, 2.0]], dtype=np.float32)
    Image.fromarray(values).save(tmp_path / "float.tif")
    image = read_image(tmp_path / "float.tif")
    assert image[..., 0].tolist() == [[0, 128], [255, 255]]  # 0.5 * 255 = 127.5 -> 128; 2.0 clipped
    values[0, 0] = np.nan
    Image.fromarray(values).save(tmp_path / "nan.tif")
    with pytest.raises(DatasetError, match="nan.tif"):
        read_image(tmp_path / "nan.tif")


def test_rgba_mask_alpha_is_transparency_not_anomaly(tmp_path: Path) -> None:
    rgba = np.zeros((4, 4, 4), dtype=np.uint8)
    rgba[..., 3] = 255  # opaque black background
    rgba[1:3, 1:3] = (255, 255, 255, 255)  # a white 2x2 defect
    rgba[0, 3] = (255, 255, 255, 0)  # white but fully transparent: not anomalous
    Image.fromarray(rgba, mode="RGBA").save(tmp_path / "mask.png")
    mask = read_mask(tmp_path / "mask.png")
    expected = np.zeros((4, 4), dtype=bool)
    expected[1:3, 1:3] = True
    assert np.array_equal(mask, expected)


def test_palette_and_visa_value_masks(tmp_path: Path) -> None:
    values = np.array([[0, 1], [38, 0]], dtype=np.uint8)  # VisA-style non-binary values
    Image.fromarray(values).save(tmp_path / "visa.png")
    assert read_mask(tmp_path / "visa.png").tolist() == [[False, True], [True, False]]
    palette = Image.fromarray(np.array([[0, 1], [1, 0]], dtype=np.uint8), mode="P")
    palette.putpalette([255, 255, 255, 0, 0, 0] + [0] * 762)  # index 0 is WHITE, index 1 black
    palette.save(tmp_path / "palette.png")
    # Colour decides, not the index: index 0 (white) is anomalous, index 1 (black) is not.
    assert read_mask(tmp_path / "palette.png").tolist() == [[True, False], [False, True]]


def test_jpeg_masks_are_refused_with_the_file_named(tmp_path: Path) -> None:
    Image.fromarray(np.zeros((8, 8), dtype=np.uint8)).save(tmp_path / "m.jpg")
    with pytest.raises(DatasetError, match=r"m\.jpg.*PNG"):
        read_mask(tmp_path / "m.jpg")
    image = tmp_path / "i.png"
    Image.fromarray(np.zeros((8, 8, 3), dtype=np.uint8)).save(image)
    with pytest.raises(DatasetError, match=r"m\.jpg"):  # refused at validation, before any run
        validate_samples([Sample(image, tmp_path / "m.jpg", 1, "c", "d")], what="x", check="headers")
