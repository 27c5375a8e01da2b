"""data.reference: the reference images of a few-shot method, drawn by a recorded seed from the test
dataset's good training images (or a folder, or listed files); errors name the key."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from clipsam.data.datamodule import AnomalyDataModule, DatasetSpec
from clipsam.data.references import ReferenceConfig, draw_references, folder_pool
from clipsam.errors import ConfigError, DatasetError
from tests.helpers.data import write_image


def _datamodule(root: Path, fmt: str = "mvtec", **reference) -> AnomalyDataModule:
    dm = AnomalyDataModule(
        test=DatasetSpec(format=fmt, root=str(root / fmt), categories=["disk", "fabric"]),
        image_size=32,
        num_workers=0,
        validation="off",
        reference=reference or None,
    )
    dm.setup("test")
    return dm


def test_draw_is_a_function_of_seed_and_category_and_keeps_pool_order():
    pool = [f"/data/good/{i:03d}.png" for i in range(10)]
    first = draw_references(pool, 3, seed=0, category="bottle")
    assert first == draw_references(list(reversed(pool)), 3, seed=0, category="bottle"), "independent of the pool's order"
    assert first == sorted(first, key=str) and len(set(first)) == 3
    # worked out independently: positions of the sorted pool drawn by Random("<seed>/<category>")
    want = sorted(random.Random("0/bottle").sample(range(10), 3))
    assert first == [Path(pool[i]) for i in want]
    seeds = {tuple(draw_references(pool, 3, seed=s, category="bottle")) for s in range(6)}
    assert len(seeds) > 1, "the seed changes the draw"
    assert draw_references(pool[:2], 2, seed=7, category="x") == [Path(p) for p in pool[:2]], "a pool of k is taken whole"


def test_too_small_a_pool_names_the_category_and_the_key():
    with pytest.raises(DatasetError, match=r"data.reference: category 'screw' has 1 good reference image\(s\) in here, fewer than the 2"):
        draw_references(["a.png"], 2, seed=0, category="screw", where="here")


def test_settings_are_checked_with_the_key():
    assert ReferenceConfig() == ReferenceConfig(seed=0, source="train", files=None)
    with pytest.raises(ConfigError, match="data.reference.seed"):
        ReferenceConfig(seed="zero")
    with pytest.raises(ConfigError, match="data.reference.source"):
        ReferenceConfig(source=" ")
    with pytest.raises(ConfigError, match="data.reference.files"):
        ReferenceConfig(files={"disk": []})
    with pytest.raises(ConfigError, match="data.reference.sed"):  # a typo, through the datamodule
        AnomalyDataModule(reference={"sed": 1})


def test_train_source_draws_good_training_images_of_each_test_category(synth_root: Path):
    dm = _datamodule(synth_root)
    files = dm.reference_files(1, stage="test")
    assert sorted(files) == ["disk", "fabric"]
    for category, paths in files.items():
        assert len(paths) == 1 and paths[0].parent == synth_root / "mvtec" / category / "train" / "good"
    assert dm.reference_files(1, stage="test") == files, "the same draw every time"
    both = dm.reference_files(2, stage="test")  # the synthetic root has 2 training images per category
    assert all(len(p) == 2 for p in both.values())
    with pytest.raises(DatasetError, match="category 'disk' has 2 good reference image"):
        dm.reference_files(3, stage="test")
    visa = _datamodule(synth_root, "visa").reference_files(2, stage="test")  # VisA: the csv's train split
    assert all(len(p) == 2 and "Normal" in str(p[0]) for p in visa.values())


def test_folder_source_and_listed_files(synth_root: Path, tmp_path: Path):
    import numpy as np

    refs = tmp_path / "refs"
    for name in ("a.png", "b.png"):
        write_image(refs / "disk" / name, np.zeros((8, 8, 3), np.uint8))
    write_image(refs / "shared.png", np.zeros((8, 8, 3), np.uint8))
    assert folder_pool(refs, "disk")[0] == [refs / "disk" / "a.png", refs / "disk" / "b.png"]
    dm = _datamodule(synth_root, source=str(refs), files={"fabric": [str(tmp_path / "mine.png")]})
    files = dm.reference_files(1, stage="test")
    assert files["disk"][0].parent == refs / "disk"
    assert files["fabric"] == [tmp_path / "mine.png"], "listed files come first"
    with pytest.raises(DatasetError, match="data.reference.source=.*no such folder"):
        _datamodule(synth_root, source=str(tmp_path / "missing")).reference_files(1, stage="test")


def test_train_source_needs_a_training_split(tmp_path: Path):
    from types import SimpleNamespace

    images = SimpleNamespace(samples=[SimpleNamespace(category="part")])  # what is segmented: category "part"
    dm = AnomalyDataModule(image_size=32, num_workers=0)  # no data.test spec (e.g. predict only)
    dm.predict_dataset = images
    with pytest.raises(ConfigError, match="data.reference.source='train'.*data.test is not set"):
        dm.reference_files(1, stage="predict")
    dm = AnomalyDataModule(test=DatasetSpec(format="folder", root=str(tmp_path)), image_size=32)
    dm.test_dataset = images
    with pytest.raises(ConfigError, match="data.reference.source='train': data.test.format 'folder'"):
        dm.reference_files(1, stage="test")
