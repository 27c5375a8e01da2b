"""APRIL-GAN's 2 x 2 mosaic: image/mask alignment, draws, determinism, the data key."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from clipsam.data.datamodule import AnomalyDataModule, DatasetSpec, EpochSeededRandomSampler
from clipsam.data.dataset import AnomalyDataset
from clipsam.data.mosaic import Mosaic, mosaic_2x2
from clipsam.data.mvtec import parse_mvtec
from clipsam.data.samples import read_image, read_mask
from clipsam.data.transforms import build_transform, denormalize
from clipsam.errors import ConfigError


def _piece(value: int, box: tuple[int, int, int, int], size=(6, 8)) -> tuple[np.ndarray, np.ndarray]:
    image = np.full((*size, 3), value, np.uint8)
    mask = np.zeros(size, np.uint8)
    r0, r1, c0, c1 = box
    mask[r0:r1, c0:c1] = 1
    image[mask.astype(bool)] = 255
    return image, mask


def test_mosaic_2x2_keeps_each_mask_on_its_image():
    pieces = [_piece(10, (0, 2, 0, 2)), _piece(60, (1, 3, 5, 8)), _piece(110, (4, 6, 0, 1)), _piece(160, (2, 4, 2, 6))]
    image, mask = mosaic_2x2([p[0] for p in pieces], [p[1] for p in pieces])
    assert image.shape == (12, 16, 3) and mask.shape == (12, 16) and mask.dtype == np.uint8
    for i, (piece_image, piece_mask) in enumerate(pieces):
        row, col = divmod(i, 2)
        window = (slice(row * 6, row * 6 + 6), slice(col * 8, col * 8 + 8))
        assert np.array_equal(image[window], piece_image)
        assert np.array_equal(mask[window], piece_mask)
    assert np.array_equal(mask.astype(bool), image[..., 0] == 255)  # defect pixels exactly under the mask


def test_mosaic_2x2_resizes_a_piece_of_another_size_to_the_first():
    small = _piece(10, (0, 6, 0, 8))
    big = _piece(200, (0, 12, 0, 16), size=(12, 16))  # all-anomalous piece, twice the size
    image, mask = mosaic_2x2([small[0], big[0], small[0], small[0]], [small[1], big[1], small[1], small[1]])
    assert image.shape == (12, 16, 3)
    expected = np.asarray(Image.fromarray(big[0]).resize((8, 6), Image.Resampling.BICUBIC))
    assert np.array_equal(image[:6, 8:], expected)
    assert mask[:6, 8:].all()


@pytest.fixture(scope="module")
def samples(synth_root: Path):
    return parse_mvtec(synth_root / "mvtec", split="test")


def test_dataset_mosaic_item_is_the_four_drawn_images_with_their_masks(samples):
    mosaic = Mosaic(samples, 1.0, seed=3)
    dataset = AnomalyDataset(samples, build_transform(64), mosaic=mosaic)
    index = 5
    pieces = mosaic.draw(index)
    assert pieces is not None and len(pieces) == 4
    assert {samples[i].category for i in pieces} == {samples[index].category}
    images = [read_image(samples[i].image_path) for i in pieces]
    masks = [
        read_mask(samples[i].mask_path).astype(np.uint8) if samples[i].mask_path else np.zeros(images[0].shape[:2], np.uint8)
        for i in pieces
    ]
    stitched = np.concatenate([np.concatenate(images[:2], axis=1), np.concatenate(images[2:], axis=1)], axis=0)
    stitched_mask = np.concatenate([np.concatenate(masks[:2], axis=1), np.concatenate(masks[2:], axis=1)], axis=0)
    item = dataset[index]
    expected_image = np.asarray(Image.fromarray(stitched).resize((64, 64), Image.Resampling.BICUBIC))
    expected_mask = np.asarray(Image.fromarray(stitched_mask * 255, mode="L").resize((64, 64), Image.Resampling.BILINEAR)) > 127
    got = denormalize(item["image"]).permute(1, 2, 0).numpy().astype(int)
    assert np.abs(got - expected_image).max() <= 1
    assert np.array_equal(item["mask"].numpy().astype(bool), expected_mask)
    assert int(item["label"]) == int(any(samples[i].label == 1 for i in pieces))
    assert tuple(item["original_size"].tolist()) == stitched.shape[:2]
    assert int(item["index"]) == index


def test_mosaic_draws_are_deterministic_per_seed_epoch_and_index(samples):
    a, b, c = Mosaic(samples, 0.2, seed=0), Mosaic(samples, 0.2, seed=0), Mosaic(samples, 0.2, seed=1)
    draws_a = [a.draw(i) for i in range(len(samples))]
    assert draws_a == [b.draw(i) for i in range(len(samples))]
    assert draws_a != [c.draw(i) for i in range(len(samples))]
    b.set_epoch(1)
    assert b.epoch == 1 and draws_a != [b.draw(i) for i in range(len(samples))]
    # about 20 % of the items become mosaics
    many = Mosaic(samples * 40, 0.2, seed=0)
    rate = np.mean([many.draw(i) is not None for i in range(len(many.samples))])
    assert 0.15 < rate < 0.25
    assert all(Mosaic(samples, 0.0).draw(i) is None for i in range(len(samples)))


def test_sampler_forwards_the_epoch_to_the_mosaic(samples):
    dataset = AnomalyDataset(samples, build_transform(32), mosaic=Mosaic(samples, 0.5, seed=0))
    sampler = EpochSeededRandomSampler(dataset, seed=0)
    sampler.set_epoch(4)
    assert dataset.mosaic.epoch == 4


def test_mosaic_rate_is_a_train_key(synth_root: Path):
    with pytest.raises(ConfigError, match="mosaic_rate"):
        Mosaic([], 1.5)
    dm = AnomalyDataModule(
        train=DatasetSpec(format="mvtec", root=str(synth_root / "mvtec"), mosaic_rate=0.2),
        test=DatasetSpec(format="visa", root=str(synth_root / "visa"), mosaic_rate=0.2),
        image_size=32,
        num_workers=0,
    )
    dm.setup("fit")
    assert dm.train_dataset.mosaic is not None and dm.train_dataset.mosaic.rate == 0.2
    with pytest.raises(ConfigError, match="data.test.mosaic_rate"):
        dm.setup("test")
    batch = next(iter(dm.train_dataloader()))
    assert batch["image"].shape[1:] == (3, 32, 32) and torch.all((batch["mask"] == 0) | (batch["mask"] == 1))
