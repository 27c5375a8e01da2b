"""Issue 21, camera inputs: the channel order of arrays (``data.color_order``) and the bit depth
of 16-bit files and arrays (``data.bit_depth``), through read_image, the datasets (test and
predict), Segmenter and the CLI's one-line errors.

OpenCV (``cv2.imread``, ``VideoCapture``) and most camera SDKs hand over BGR arrays; industrial
cameras often store 12-bit data (values up to 4095) in 16-bit PNGs, which read by the 16-bit
range are nearly black.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

from clipsam.data import samples
from clipsam.data.samples import array_to_rgb, read_image
from clipsam.errors import ConfigError, DatasetError

REPO = Path(__file__).resolve().parents[2]
DEMO = REPO / "configs" / "demo.yaml"
WINCLIP_DEMO = REPO / "configs" / "methods" / "demo" / "winclip.yaml"


def _photo(height: int = 48, width: int = 64) -> np.ndarray:
    """An RGB photo whose channels differ (a red part on a blue-green background, a dark defect)."""
    rng = np.random.default_rng(0)
    image = np.zeros((height, width, 3), np.uint8)
    image[...] = (30, 120, 200)
    image[10:38, 12:52] = (210, 40, 30)
    image[20:26, 30:36] = (20, 20, 20)
    return np.clip(image.astype(int) + rng.integers(-8, 9, image.shape), 0, 255).astype(np.uint8)


def _twelve_bit(image: np.ndarray) -> np.ndarray:
    """8-bit values as a 12-bit camera writes them: v * 4095 / 255, in uint16."""
    return np.round(image.astype(np.float64) * 4095 / 255).astype(np.uint16)


# ------------------------------------------------------------------ read_image
def test_twelve_bit_gray_png_reads_right_with_bit_depth(tmp_path: Path) -> None:
    gray = _photo()[..., 0]
    path = tmp_path / "camera.png"
    Image.fromarray(_twelve_bit(gray)).save(path)  # a 16-bit PNG holding values up to 4095
    assert read_image(path).max() <= 16, "read by the 16-bit range: nearly black (the bug's symptom)"
    scaled = read_image(path, bit_depth=12)
    assert np.array_equal(scaled[..., 0], gray) and np.array_equal(scaled[..., 0], scaled[..., 2])


def test_sixteen_bit_colour_png_keeps_all_its_bits(tmp_path: Path) -> None:
    rgb = _photo()
    path = tmp_path / "camera_rgb.png"
    cv2.imwrite(str(path), _twelve_bit(rgb)[..., ::-1])  # 48-bit PNG (Pillow alone reads v >> 8)
    assert np.array_equal(read_image(path, bit_depth=12), rgb)
    sixteen = rgb.astype(np.uint16) * 257
    cv2.imwrite(str(path), sixteen[..., ::-1])
    assert np.array_equal(read_image(path), rgb), "a full-range 16-bit colour image, by the file's depth"
    assert np.array_equal(read_image(path, sixteen_bit="shift"), rgb)


def test_sixteen_bit_colour_follows_exif_orientation(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    rgb = _photo()
    path = tmp_path / "rotated.png"
    cv2.imwrite(str(path), _twelve_bit(rgb)[..., ::-1])
    monkeypatch.setattr(samples, "_orientation", lambda im: 6)  # "rotate 90 degrees clockwise to display"
    assert np.array_equal(read_image(path, bit_depth=12), np.rot90(rgb, -1))


def test_values_above_the_bit_depth_are_an_error_naming_the_key(tmp_path: Path) -> None:
    path = tmp_path / "full_range.png"
    Image.fromarray(np.full((8, 8), 40000, np.uint16)).save(path)
    with pytest.raises(DatasetError, match=r"full_range\.png holds values up to 40000.*data\.bit_depth=12"):
        read_image(path, bit_depth=12)
    assert read_image(path).max() == round(40000 / 257), "by the file's own depth it reads"


def test_eight_bit_files_are_read_as_they_are(tmp_path: Path) -> None:
    path = tmp_path / "plain.png"
    Image.fromarray(_photo()).save(path)
    assert np.array_equal(read_image(path, bit_depth=12), _photo())


@pytest.mark.parametrize("value", [7, 17, 12.5, "12", True])
def test_bad_bit_depths_are_refused(value: object) -> None:
    with pytest.raises(ConfigError, match=r"data\.bit_depth"):
        samples.check_bit_depth(value)


def test_bad_colour_orders_are_refused() -> None:
    with pytest.raises(ConfigError, match=r"data\.color_order='rbg'.*'bgr'"):
        samples.check_color_order("rbg")
    assert samples.check_color_order("BGR") == "bgr"


def test_arrays_in_bgr_and_twelve_bit_arrays() -> None:
    rgb = _photo()
    assert np.array_equal(array_to_rgb(rgb[..., ::-1], color_order="bgr"), rgb)
    bgra = np.concatenate([rgb[..., ::-1], np.full(rgb.shape[:2] + (1,), 255, np.uint8)], axis=2)
    assert np.array_equal(array_to_rgb(bgra, color_order="bgr"), rgb)
    assert np.array_equal(array_to_rgb(_twelve_bit(rgb), bit_depth=12), rgb)
    with pytest.raises(DatasetError, match="data.bit_depth=12"):
        array_to_rgb(rgb.astype(np.uint16) * 257, bit_depth=12)


# ------------------------------------------------------------------ datasets (test and predict)
def test_the_datamodule_reads_twelve_bit_data_for_test_and_predict(tmp_path: Path) -> None:
    from clipsam.data.datamodule import AnomalyDataModule, DatasetSpec

    def folder(root: Path, writer) -> Path:
        for sub in ("good", "anomalous"):
            (root / sub).mkdir(parents=True)
            writer(root / sub / "000.png")
        return root

    eight = folder(tmp_path / "eight" / "part", lambda p: Image.fromarray(_photo()).save(p))
    twelve = folder(tmp_path / "twelve" / "part", lambda p: cv2.imwrite(str(p), _twelve_bit(_photo())[..., ::-1]))
    try:
        items = {}
        for name, root, depth in (("eight", eight, None), ("twelve", twelve, 12)):
            dm = AnomalyDataModule(
                test=DatasetSpec(format="folder", root=str(root), mask_dir=None), predict_dir=str(root), image_size=32, num_workers=0, bit_depth=depth
            )
            dm.setup("test")
            dm.setup("predict")
            items[name] = (dm.test_dataset[0]["image"], dm.predict_dataset[0]["image"])
        assert np.allclose(items["eight"][0], items["twelve"][0]) and np.allclose(items["eight"][1], items["twelve"][1])
        assert samples.image_bit_depth() == 12, "the command's other reads (references, overlays) follow it"
    finally:
        samples.set_image_bit_depth(None)
    with pytest.raises(ConfigError, match=r"data\.bit_depth=20"):
        AnomalyDataModule(bit_depth=20)
    with pytest.raises(ConfigError, match=r"data\.color_order"):
        AnomalyDataModule(color_order="brg")  # type: ignore[arg-type]


# ------------------------------------------------------------------ Segmenter
@pytest.fixture(scope="module")
def segmenters():
    from clipsam import Segmenter

    configs = [str(DEMO), str(WINCLIP_DEMO)]
    base = {"data.image_size": 64}
    rgb = Segmenter.from_config(configs, overrides=base)
    bgr = Segmenter.from_config(configs, overrides={**base, "data.color_order": "bgr", "data.bit_depth": 12})
    return rgb, bgr


def test_segmenter_takes_opencv_bgr_arrays_with_color_order_bgr(segmenters) -> None:
    rgb_seg, bgr_seg = segmenters
    photo = _photo()
    assert bgr_seg.color_order == "bgr" and bgr_seg.bit_depth == 12
    expected = rgb_seg.segment(photo, category="part")
    from_bgr = bgr_seg.segment(np.ascontiguousarray(photo[..., ::-1]), category="part")
    assert np.array_equal(from_bgr.scores, expected.scores) and from_bgr.image_score == expected.image_score
    swapped = rgb_seg.segment(np.ascontiguousarray(photo[..., ::-1]), category="part")
    assert not np.array_equal(swapped.scores, expected.scores), "a BGR array taken as RGB segments another image"


def test_segmenter_reads_twelve_bit_files_and_arrays_with_bit_depth(segmenters, tmp_path: Path) -> None:
    rgb_seg, bgr_seg = segmenters
    photo = _photo()
    plain, camera = tmp_path / "plain.png", tmp_path / "camera.png"
    Image.fromarray(photo).save(plain)
    cv2.imwrite(str(camera), _twelve_bit(photo)[..., ::-1])
    expected = rgb_seg.segment(plain, category="part")
    assert np.array_equal(bgr_seg.segment(camera, category="part").scores, expected.scores)
    from_array = bgr_seg.segment(np.ascontiguousarray(_twelve_bit(photo)[..., ::-1]), category="part")
    assert np.array_equal(from_array.scores, expected.scores)


def test_segmenter_refuses_a_bad_colour_order_before_building() -> None:
    from clipsam import Segmenter

    with pytest.raises(ConfigError, match=r"data\.color_order"):
        Segmenter.from_config([str(DEMO), str(WINCLIP_DEMO)], overrides={"data.color_order": "hsv"})


def test_the_cli_refuses_a_bad_bit_depth_in_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    from clipsam.cli import main

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("WANDB_MODE", "offline")
    try:
        code = main(["test", "--config", str(DEMO), "--data.bit_depth=20", "--allow_untrained=true"])
    except SystemExit as exit_:
        code = exit_.code
    err = capsys.readouterr().err
    assert code == 2, err[-2000:]
    lines = [line for line in err.splitlines() if line.startswith("clipsam: error: ")]
    assert len(lines) == 1 and "data.bit_depth=20" in lines[0] and "Traceback" not in err, err[-2000:]
    assert not (tmp_path / "runs").exists()


def test_an_empty_array_is_one_clear_error() -> None:
    """segment() on a (0, 0, 3) array: a ValueError saying the image is empty (was a
    ZeroDivisionError / resize RuntimeError deep inside)."""
    import numpy as np
    import pytest

    from clipsam.data.samples import array_to_rgb

    for shape in ((0, 0, 3), (0, 5), (7, 0, 3)):
        with pytest.raises(ValueError, match="empty"):
            array_to_rgb(np.zeros(shape, dtype=np.uint8))
