"""Transforms and AnomalyDataset items (the Data contract of docs/design.md)."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from PIL import Image

from clipsam.inputs import sam_input_spec
from clipsam.data.dataset import AnomalyDataset
from clipsam.data.mvtec import parse_mvtec
from clipsam.data.samples import Sample
from clipsam.data.transforms import (
    CLIP_MEAN,
    CLIP_STD,
    AugmentConfig,
    build_transform,
    denormalize,
    resize_image,
    resize_mask,
)
from clipsam.errors import DatasetError
from tests.helpers.data import write_image

CONTRACT = {
    "image": (torch.float32, (3, 32, 32)),
    "mask": (torch.float32, (32, 32)),
    "has_mask": (torch.bool, ()),
    "label": (torch.int64, ()),
    "index": (torch.int64, ()),
    "original_size": (torch.int64, (2,)),
}


def test_clip_constants_match_open_clip() -> None:
    assert CLIP_MEAN == (0.48145466, 0.4578275, 0.40821073)
    assert CLIP_STD == (0.26862954, 0.26130258, 0.27577711)


def test_item_matches_the_data_contract(synth_root: Path) -> None:
    samples = parse_mvtec(synth_root / "mvtec")
    dataset = AnomalyDataset(samples, build_transform(32))
    assert len(dataset) == len(samples)
    for index in (0, len(samples) - 1):
        item = dataset[index]
        assert set(item) == set(CONTRACT) | {"category", "path"}
        for key, (dtype, shape) in CONTRACT.items():
            assert item[key].dtype == dtype and tuple(item[key].shape) == shape, key
        assert isinstance(item["category"], str) and item["path"] == str(samples[index].image_path)
        assert set(item["mask"].unique().tolist()) <= {0.0, 1.0}
        assert item["original_size"].tolist() == [48, 48] and item["index"].item() == index
    anomalous = dataset[[s.label for s in samples].index(1)]
    assert anomalous["label"].item() == 1 and anomalous["has_mask"].item() and anomalous["mask"].sum() > 0
    normal = dataset[0]
    assert normal["label"].item() == 0 and normal["has_mask"].item() and normal["mask"].sum() == 0


def test_predict_items_and_missing_masks(tmp_path: Path) -> None:
    path = write_image(tmp_path / "gray.png", np.full((20, 30), 77, np.uint8))  # grayscale, not square
    dataset = AnomalyDataset([Sample(path, None, -1, "x", "unknown")], build_transform(16), has_labels=False)
    item = dataset[0]
    assert item["image"].shape == (3, 16, 16) and item["label"].item() == -1 and not item["has_mask"].item()
    assert item["original_size"].tolist() == [20, 30]
    no_mask = AnomalyDataset([Sample(path, None, 1, "x", "anomalous")], build_transform(16))[0]
    assert not no_mask["has_mask"].item() and no_mask["mask"].sum() == 0


def test_decode_error_names_the_file(tmp_path: Path) -> None:
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"\x89PNG broken")
    with pytest.raises(DatasetError, match=str(bad)):
        AnomalyDataset([Sample(bad, None, 0, "x", "good")], build_transform(16))[0]


def test_mask_resize_is_bilinear_then_thresholded_and_aligned() -> None:
    image = np.zeros((40, 40, 3), np.uint8)
    mask = np.zeros((40, 40), np.uint8)
    mask[10:20, 20:30] = 1
    out = build_transform(20)(image=image, mask=mask)
    expected = np.zeros((20, 20), np.uint8)
    expected[5:10, 10:15] = 1
    assert np.array_equal(np.asarray(out["mask"]), expected)


def _textured(height: int, width: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, size=(height // 8, width // 8, 3)).astype(np.uint8)
    image = np.asarray(Image.fromarray(coarse).resize((width, height), Image.Resampling.NEAREST)).astype(np.int16)
    return np.clip(image + rng.integers(-40, 41, size=image.shape), 0, 255).astype(np.uint8)


def test_image_resize_is_pil_antialiased_bicubic() -> None:
    # APRIL-GAN: torchvision Resize((518, 518), BICUBIC) on the PIL image == PIL's resize.
    image = _textured(1024, 768)
    expected = np.asarray(Image.fromarray(image).resize((518, 518), Image.Resampling.BICUBIC))
    got = resize_image(image, 518)
    assert got.dtype == np.uint8 and np.array_equal(got, expected)
    tensor = build_transform(518)(image=image, mask=np.zeros((1024, 768), np.uint8))["image"]
    assert np.abs(denormalize(tensor).permute(1, 2, 0).numpy().astype(int) - expected).max() <= 1  # rounding
    # cv2's cubic without antialiasing is not the same image.
    assert np.abs(cv2.resize(image, (518, 518), interpolation=cv2.INTER_CUBIC).astype(int) - expected).mean() > 2


def test_mask_resize_matches_pil_bilinear_of_the_0_255_mask() -> None:
    rng = np.random.default_rng(3)
    mask = np.zeros((700, 900), np.uint8)
    mask[100:103, 50:800] = 1  # a 3-px scratch: nearest would drop or shift it at 700 -> 518
    mask[rng.integers(0, 700, 400), rng.integers(0, 900, 400)] = 1
    pil = Image.fromarray(mask * 255, mode="L").resize((518, 518), Image.Resampling.BILINEAR)
    expected = (np.asarray(pil).astype(np.float32) / 255.0 > 0.5).astype(np.uint8)  # ToTensor > 0.5
    assert np.array_equal(resize_mask(mask, 518), expected)
    assert np.array_equal(np.asarray(build_transform(518)(image=np.zeros((700, 900, 3), np.uint8), mask=mask)["mask"]), expected)
    assert expected[70:80, 100:400].all(axis=1).any()  # the scratch survives as a line


def test_denormalize_inverts_normalisation() -> None:
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, size=(16, 16, 3), dtype=np.uint8)
    tensor = build_transform(16)(image=image, mask=np.zeros((16, 16), np.uint8))["image"]
    back = denormalize(tensor)
    assert back.dtype == torch.uint8 and back.shape == (3, 16, 16)
    # a 1:1 bicubic resize is the identity, so only rounding remains
    assert (back.permute(1, 2, 0).int() - torch.from_numpy(image).int()).abs().max() <= 1
    batch = denormalize(tensor[None].repeat(2, 1, 1, 1))
    assert batch.shape == (2, 3, 16, 16) and torch.equal(batch[1], back)


def test_augmentations_off_by_default_and_flip_masks_with_images() -> None:
    assert AugmentConfig().transforms() == []
    image = np.zeros((8, 8, 3), np.uint8)
    image[:, :4] = 255
    mask = np.zeros((8, 8), np.uint8)
    mask[:, :4] = 1
    out = build_transform(8, augment=AugmentConfig(hflip=1.0), seed=0)(image=image, mask=mask)
    assert np.asarray(out["mask"])[:, 4:].all() and not np.asarray(out["mask"])[:, :4].any()
    assert (denormalize(out["image"])[:, :, 4:] > 200).all()


def test_sam_input_is_the_original_resized_as_sam_predictor_does(tmp_path: Path) -> None:
    """``sam_image`` = SamPredictor's input before normalisation: long side to S, PIL, zero pad."""
    from segment_anything.utils.transforms import ResizeLongestSide

    gen = np.random.default_rng(0)
    original = gen.integers(0, 256, (30, 50, 3), dtype=np.uint8)
    path = write_image(tmp_path / "rgb.png", original)
    plain = AnomalyDataset([Sample(path, None, -1, "x", "unknown")], build_transform(16), has_labels=False)
    assert "sam_image" not in plain[0], "without sam_side the items stay as before"
    dataset = AnomalyDataset([Sample(path, None, -1, "x", "unknown")], build_transform(16), has_labels=False, inputs=[sam_input_spec(64)])
    item = dataset[0]
    expected = ResizeLongestSide(64).apply_image(original)  # what SamPredictor.set_image encodes
    assert item["sam_size"].tolist() == [38, 64] == list(expected.shape[:2])
    assert item["sam_image"].shape == (3, 64, 64) and item["sam_image"].dtype == torch.uint8
    assert np.array_equal(item["sam_image"][:, :38, :].permute(1, 2, 0).numpy(), expected)
    assert int(item["sam_image"][:, 38:, :].abs().sum()) == 0  # zero padding below
