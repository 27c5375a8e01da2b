"""What predict accepts as input: one file, a folder, a dataset root; bad files are skipped."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from clipsam.data.datamodule import AnomalyDataModule
from clipsam.data.samples import read_image, set_max_image_pixels, validate_samples, Sample
from clipsam.errors import DatasetError
from tests.helpers.data import write_image


@pytest.fixture()
def restore_pil_limit():
    old = Image.MAX_IMAGE_PIXELS
    yield
    Image.MAX_IMAGE_PIXELS = old


def _dm(path: Path, **kwargs) -> AnomalyDataModule:
    dm = AnomalyDataModule(predict_dir=str(path), image_size=32, num_workers=0, **kwargs)
    dm.setup("predict")
    return dm


def test_a_single_image_file_is_accepted(tmp_path: Path) -> None:
    image = write_image(tmp_path / "part" / "a.png", np.zeros((20, 30, 3), np.uint8))
    write_image(tmp_path / "part" / "b.png", np.zeros((20, 30, 3), np.uint8))
    dm = _dm(image)
    assert [s.image_path for s in dm.predict_dataset.samples] == [image]
    assert dm.predict_dataset.samples[0].category == "part"
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(DatasetError, match="not an image"):
        _dm(tmp_path / "notes.txt")


def test_undecodable_files_are_skipped_with_their_reason(tmp_path: Path) -> None:
    good = write_image(tmp_path / "ok.png", np.zeros((8, 8, 3), np.uint8))
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    dm = _dm(tmp_path)
    assert [s.image_path for s in dm.predict_dataset.samples] == [good]
    assert dm.skipped_files == [tmp_path / "broken.png"]
    assert "cannot decode" in dm.skip_reasons[tmp_path / "broken.png"]


def test_a_dataset_root_does_not_segment_its_masks(tmp_path: Path) -> None:
    root = tmp_path / "bottle"
    write_image(root / "test" / "crack" / "000.png", np.zeros((8, 8, 3), np.uint8))
    write_image(root / "ground_truth" / "crack" / "000_mask.png", np.zeros((8, 8), np.uint8))
    write_image(root / "masks" / "001.png", np.zeros((8, 8), np.uint8))
    dm = _dm(root)
    assert [s.image_path.name for s in dm.predict_dataset.samples] == ["000.png"]
    assert "ground_truth" not in str(dm.predict_dataset.samples[0].image_path)


def test_too_large_images_name_the_file_and_the_key(tmp_path: Path, restore_pil_limit) -> None:
    path = write_image(tmp_path / "line_scan.png", np.zeros((100, 300, 3), np.uint8))
    set_max_image_pixels(10_000)  # 30 000 pixels is above the limit
    with pytest.raises(DatasetError) as err:
        read_image(path)
    assert str(path) in str(err.value) and "data.max_image_pixels" in str(err.value)
    with pytest.raises(DatasetError, match="data.max_image_pixels"):
        validate_samples([Sample(path, None, 0, "x", "good")], what="test", check="headers")
    set_max_image_pixels(None)  # no limit
    assert read_image(path).shape == (100, 300, 3)
    # through the datamodule key: predict skips it with that reason instead of crashing
    write_image(tmp_path / "small.png", np.zeros((10, 10, 3), np.uint8))
    dm = _dm(tmp_path, max_image_pixels=10_000)
    assert [s.image_path.name for s in dm.predict_dataset.samples] == ["small.png"]
    assert "data.max_image_pixels" in dm.skip_reasons[path]


def test_folder_dataset_recognises_the_anomalib_layout_and_names(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    from clipsam.data.datamodule import DatasetSpec, parse_spec

    root = tmp_path / "screws"
    write_image(root / "good" / "n0.png", np.zeros((8, 8, 3), np.uint8))
    write_image(root / "abnormal" / "a0.png", np.zeros((8, 8, 3), np.uint8))
    mask = np.zeros((8, 8), np.uint8)
    mask[2:4, 2:4] = 255
    write_image(root / "mask" / "a0.png", mask)
    write_image(root / "extra" / "x.png", np.zeros((8, 8, 3), np.uint8))
    with caplog.at_level("WARNING"):
        samples, _, _ = parse_spec(DatasetSpec(format="folder", root=str(root), category="screw"))
    assert [(s.image_path.name, s.label, s.category) for s in samples] == [("n0.png", 0, "screw"), ("a0.png", 1, "screw")]
    assert samples[1].mask_path == root / "mask" / "a0.png"
    assert "extra" in caplog.text, "ignored sub-folders are named in a warning"
    # explicit names
    samples, _, _ = parse_spec(
        DatasetSpec(format="folder", root=str(root), normal_dir="extra", anomalous_dir="abnormal", mask_dir=None)
    )
    assert [(s.image_path.name, s.label, s.mask_path) for s in samples] == [("x.png", 0, None), ("a0.png", 1, None)]


def test_files_that_fail_while_predicting_become_skip_markers(tmp_path: Path) -> None:
    ok = write_image(tmp_path / "ok.png", np.zeros((8, 8, 3), np.uint8))
    bad = tmp_path / "late.png"
    write_image(bad, np.zeros((8, 8, 3), np.uint8))
    dm = _dm(tmp_path)
    bad.write_bytes(b"\x89PNG\r\n\x1a\n truncated after setup")  # breaks after validation
    batches = list(dm.predict_dataloader())
    assert len(batches) == 1
    (batch,) = batches
    assert batch["path"] == [str(ok)] and batch["image"].shape[0] == 1
    assert [path for path, _ in batch["skipped"]] == [str(bad)]
    assert "cannot decode" in batch["skipped"][0][1]
