"""AnomalyDataModule: fit/test/predict on generated data in both layouts."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch

from clipsam.data.datamodule import AnomalyDataModule, DatasetSpec
from clipsam.errors import ConfigError, DatasetError
from tests.helpers.data import write_image


def _dm(root: Path, **kwargs) -> AnomalyDataModule:
    defaults = dict(
        train=DatasetSpec(format="mvtec", root=str(root / "mvtec")),
        test=DatasetSpec(format="visa", root=str(root / "visa")),
        image_size=32,
        batch_size=4,
        test_batch_size=5,
        num_workers=0,
    )
    return AnomalyDataModule(**{**defaults, **kwargs})


def test_fit_and_test_on_the_two_layouts(synth_root: Path) -> None:
    dm = _dm(synth_root)
    dm.setup("fit")
    assert len(dm.train_dataset) == 3 * (2 + 4)  # the TEST split of the auxiliary dataset
    batch = next(iter(dm.train_dataloader()))
    assert batch["image"].shape == (4, 3, 32, 32) and batch["mask"].shape == (4, 32, 32)
    assert isinstance(batch["category"], list) and isinstance(batch["path"][0], str)
    with pytest.raises(RuntimeError, match="setup"):
        _ = dm.test_categories
    assert dm.val_dataloader() == []  # no validation on the zero-shot target during fit
    dm.setup("test")
    assert len(dm.test_dataset) == 3 * (2 + 4)
    assert dm.test_categories == ["disk", "fabric", "mesh"]
    sizes = [len(b["path"]) for b in dm.test_dataloader()]
    assert sizes == [5, 5, 5, 3]


def test_train_shuffle_is_seeded_and_test_is_ordered(synth_root: Path) -> None:
    def order(seed: int) -> list[str]:
        dm = _dm(synth_root, seed=seed, validation="off")
        dm.setup("fit")
        return [p for b in dm.train_dataloader() for p in b["path"]]

    assert order(0) == order(0) and order(0) != order(1)
    dm = _dm(synth_root, validation="off")
    dm.setup("test")
    paths = [p for b in dm.test_dataloader() for p in b["path"]]
    assert paths == [str(s.image_path) for s in dm.test_dataset.samples]


def test_categories_and_train_split(synth_root: Path) -> None:
    dm = _dm(
        synth_root,
        train=DatasetSpec(format="visa", root=str(synth_root / "visa"), categories=["disk"], split="train"),
        test=DatasetSpec(format="mvtec", root=str(synth_root / "mvtec"), categories=["mesh", "fabric"]),
    )
    dm.setup("fit")
    dm.setup("validate")
    assert len(dm.train_dataset) == 2 and dm.train_categories == ["disk"]
    assert dm.test_categories == ["fabric", "mesh"]
    assert len(next(iter(dm.val_dataloader()))["path"]) == 5


def test_predict_skips_and_lists_non_image_files(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    folder = tmp_path / "my_parts"
    for name in ("a.png", "b.JPG", "sub/c.png"):
        write_image(folder / name, np.full((10, 12, 3), 50, np.uint8))
    (folder / "readme.txt").write_text("notes")
    (folder / "sub/data.csv").write_text("1,2")
    dm = AnomalyDataModule(predict_dir=str(folder), image_size=16, num_workers=0)
    with caplog.at_level(logging.WARNING, logger="clipsam.data.datamodule"):
        dm.setup("predict")
    assert len(dm.predict_dataset) == 3
    assert sorted(p.name for p in dm.skipped_files) == ["data.csv", "readme.txt"]
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "readme.txt" in warnings[0] and "data.csv" in warnings[0]
    batch = next(iter(dm.predict_dataloader()))
    assert batch["label"].tolist() == [-1, -1, -1] and not batch["has_mask"].any()
    assert batch["category"] == ["my_parts", "my_parts", "sub"]


def test_predict_empty_folder(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(DatasetError, match=rf"0 images found in {tmp_path}"):
        AnomalyDataModule(predict_dir=str(tmp_path)).setup("predict")


def test_missing_spec_and_root_errors(tmp_path: Path, synth_root: Path) -> None:
    with pytest.raises(ConfigError, match=r"data.train is not set: `clipsam fit`"):
        AnomalyDataModule(test=DatasetSpec(format="visa", root="x")).setup("fit")
    with pytest.raises(ConfigError, match=r"data.test is not set: `clipsam test`"):
        AnomalyDataModule().setup("test")
    with pytest.raises(ConfigError, match="data.predict_dir is not set"):
        AnomalyDataModule().setup("predict")
    missing = tmp_path / "mvtec"
    dm = AnomalyDataModule(train=DatasetSpec(format="mvtec", root=str(missing)))
    with pytest.raises(DatasetError, match=rf"{missing} does not exist: set data.train.root or the MVTEC_ROOT"):
        dm.setup("fit")
    with pytest.raises(ConfigError, match="data.test.root is empty"):
        AnomalyDataModule(test=DatasetSpec(format="visa", root=" ")).setup("test")


def test_home_is_expanded(synth_root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(synth_root))
    dm = AnomalyDataModule(test=DatasetSpec(format="mvtec", root="~/mvtec"), image_size=16, validation="headers")
    dm.setup("test")
    assert len(dm.test_dataset) == 18


def test_folder_format(tmp_path: Path) -> None:
    root = tmp_path / "widgets"
    write_image(root / "good/a.png", np.zeros((8, 8, 3), np.uint8))
    write_image(root / "anomalous/b.png", np.zeros((8, 8, 3), np.uint8))
    dm = AnomalyDataModule(test=DatasetSpec(format="folder", root=str(root)), image_size=8, num_workers=0)
    dm.setup("test")
    batch = next(iter(dm.test_dataloader()))
    assert batch["label"].tolist() == [0, 1] and batch["has_mask"].tolist() == [True, False]
    assert dm.test_categories == ["widgets"]


def test_works_with_jsonargparse(synth_root: Path) -> None:
    jsonargparse = pytest.importorskip("jsonargparse")
    parser = jsonargparse.ArgumentParser()
    parser.add_class_arguments(AnomalyDataModule, "data")
    cfg = parser.parse_args(
        [
            "--data.train.format=mvtec", f"--data.train.root={synth_root / 'mvtec'}",
            "--data.test.format=visa", f"--data.test.root={synth_root / 'visa'}",
            "--data.test.categories=[disk]", "--data.image_size=16", "--data.augment.hflip=0.5",
        ]
    )
    dm = parser.instantiate_classes(cfg).data
    assert isinstance(dm.test_spec, DatasetSpec) and dm.test_spec.categories == ["disk"]
    assert dm.augment.hflip == 0.5 and dm.image_size == 16
    dm.setup("test")
    assert dm.test_categories == ["disk"]
    assert torch.is_tensor(dm.test_dataset[0]["image"])
