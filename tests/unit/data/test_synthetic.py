"""Synthetic data: the in-memory renderer and the on-disk generator."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
from PIL import Image

from clipsam.data.synthetic import (
    DEFECT_TYPES,
    GRAYSCALE_CATEGORIES,
    SYNTH_CATEGORIES,
    VISA_MASK_VALUES,
    generate_synthetic,
    render_sample,
)
from clipsam.errors import DatasetError
from tests.helpers.data import hash_tree, make_synthetic_root


@pytest.mark.parametrize("category", SYNTH_CATEGORIES)
def test_render_normal_has_empty_mask(category: str) -> None:
    image, mask = render_sample(category, None, rng=np.random.default_rng(0), image_size=64)
    assert image.shape == (64, 64, 3) and image.dtype == np.uint8
    assert mask.shape == (64, 64) and mask.dtype == bool and not mask.any()
    if category in GRAYSCALE_CATEGORIES:
        assert (image[..., 0] == image[..., 1]).all() and (image[..., 1] == image[..., 2]).all()


@pytest.mark.parametrize("category", SYNTH_CATEGORIES)
@pytest.mark.parametrize("defect", DEFECT_TYPES)
def test_render_defect_is_visible_with_exact_mask(category: str, defect: str) -> None:
    for seed in range(3):
        image, mask = render_sample(category, defect, rng=np.random.default_rng(seed), image_size=96)
        assert mask.dtype == bool and 0 < mask.sum() < 0.25 * mask.size
        # visible: the defect differs from the pixels just around it
        ring = cv2.dilate(mask.astype(np.uint8), np.ones((7, 7), np.uint8)).astype(bool) & ~mask
        inside = image[mask].astype(float).mean(axis=0)
        around = image[ring].astype(float).mean(axis=0)
        assert np.abs(inside - around).max() > 15, (category, defect, seed, inside, around)


def test_render_is_pure_and_varied() -> None:
    a = render_sample("hexnut", "hole", rng=np.random.default_rng(5), image_size=64)
    b = render_sample("hexnut", "hole", rng=np.random.default_rng(5), image_size=64)
    c = render_sample("hexnut", "hole", rng=np.random.default_rng(6), image_size=64)
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
    assert not np.array_equal(a[1], c[1])  # defects move between samples


def test_render_rejects_unknown_names() -> None:
    with pytest.raises(ValueError, match="available"):
        render_sample("bottle", None, rng=np.random.default_rng(0))
    with pytest.raises(ValueError, match="scratch"):
        render_sample("disk", "crack", rng=np.random.default_rng(0))


def test_generator_is_deterministic_per_seed(tmp_path) -> None:
    kwargs = dict(
        categories=("stripes", "capsule"), image_size=40, num_train_good=1, num_test_good=1, num_test_anomalous=2
    )
    first = hash_tree(make_synthetic_root(tmp_path, name="a", **kwargs))
    again = hash_tree(make_synthetic_root(tmp_path, name="b", **kwargs))
    other = hash_tree(make_synthetic_root(tmp_path, name="c", seed=1, **kwargs))
    assert first == again
    assert first.keys() == other.keys()
    images = [k for k in first if k.endswith((".png", ".JPG")) and "mask" not in k.lower()]
    assert all(first[k] != other[k] for k in images)


def test_generator_images_do_not_depend_on_other_categories(tmp_path, synth_root) -> None:
    alone = make_synthetic_root(tmp_path, categories=("disk",), layouts=("mvtec",))
    full = hash_tree(synth_root / "mvtec")
    for rel, digest in hash_tree(alone / "mvtec").items():
        assert full[rel] == digest, rel


def test_generator_layout_files(synth_root) -> None:
    mesh = Image.open(synth_root / "mvtec/mesh/test/good/000.png")
    assert mesh.mode == "L"  # grayscale like MVTec's grid/screw
    mask = np.asarray(Image.open(synth_root / "mvtec/disk/ground_truth/hole/000_mask.png"))
    assert set(np.unique(mask)) == {0, 255}
    visa_mask = np.asarray(Image.open(synth_root / "visa/disk/Data/Masks/Anomaly/001.png"))
    assert set(np.unique(visa_mask)) == {0, VISA_MASK_VALUES["hole"]}  # index 1 -> hole -> 38
    lines = (synth_root / "visa/split_csv/1cls.csv").read_text().splitlines()
    assert lines[0].startswith("object,split,label,image,mask")
    assert len(lines) == 1 + 3 * (2 + 2 + 4)


def test_generator_refuses_to_overwrite(tmp_path) -> None:
    root = make_synthetic_root(tmp_path, categories=("fabric",), layouts=("mvtec",), num_test_anomalous=1)
    with pytest.raises(DatasetError, match=str(root / "mvtec")):
        make_synthetic_root(tmp_path, categories=("fabric",), layouts=("mvtec",), num_test_anomalous=1)
    result = generate_synthetic(
        root, layouts=("mvtec",), categories=("disk",), image_size=32, num_train_good=1,
        num_test_good=0, num_test_anomalous=0, progress=False, overwrite=True,
    )
    assert sorted(p.name for p in (root / "mvtec").iterdir()) == ["disk"]  # stale files removed
    assert result["num_files"] == 1
