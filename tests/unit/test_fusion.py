"""Fusion (clipsam.fusion): range and ordering properties of every method."""

from __future__ import annotations

import pytest
import torch

from clipsam.fusion import DEFAULT_FUSION, FUSION_METHODS, fuse_scores


@pytest.fixture
def inputs():
    gen = torch.Generator().manual_seed(0)
    amap = torch.rand(16, 20, generator=gen)
    probs = torch.rand(16, 20, generator=gen)
    mask = probs > 0.5
    return amap, probs, mask


@pytest.mark.parametrize("method", FUSION_METHODS)
def test_every_method_is_float32_in_unit_range(inputs, method):
    out = fuse_scores(*inputs, method=method)
    assert out.shape == (16, 20) and out.dtype == torch.float32
    assert float(out.min()) >= 0.0 and float(out.max()) <= 1.0


def test_method_definitions(inputs):
    amap, probs, mask = inputs
    assert torch.equal(fuse_scores(amap, probs, mask, method="clip"), amap)
    assert torch.equal(fuse_scores(amap, probs, mask, method="sam"), probs)
    product = fuse_scores(amap, probs, mask, method="product")
    assert torch.all(product <= torch.minimum(amap, probs) + 1e-7)
    mean = fuse_scores(amap, probs, mask, method="mean")
    assert torch.all(mean >= torch.minimum(amap, probs) - 1e-7) and torch.all(mean <= torch.maximum(amap, probs) + 1e-7)
    assert torch.equal(fuse_scores(amap, probs, mask, method="max"), torch.maximum(amap, probs))
    masked = fuse_scores(amap, probs, mask, method="clip_masked")
    assert torch.all(masked[~mask] == 0) and torch.equal(masked[mask], amap[mask])


def test_clip_boost_ranks_sam_region_first_and_keeps_clip_order(inputs):
    amap, probs, mask = inputs
    out = fuse_scores(amap, probs, mask, method="clip_boost")
    assert float(out[mask].min()) >= float(out[~mask].max())
    for side in (mask, ~mask):  # within each side, the order is Map_a's
        assert torch.equal(torch.argsort(out[side], stable=True), torch.argsort(amap[side], stable=True))
    empty = torch.zeros_like(mask)
    assert torch.equal(torch.argsort(fuse_scores(amap, probs, empty, method="clip_boost")), torch.argsort(amap))


def test_default_and_errors(inputs):
    amap, probs, mask = inputs
    assert DEFAULT_FUSION in FUSION_METHODS
    assert torch.equal(fuse_scores(amap, probs, mask), fuse_scores(amap, probs, mask, method=DEFAULT_FUSION))
    with pytest.raises(ValueError, match="not one of"):
        fuse_scores(amap, probs, mask, method="median")
    with pytest.raises(ValueError, match="must all be"):
        fuse_scores(amap, probs[:, :5], mask, method="mean")


def test_image_scores_reductions_by_hand():
    from clipsam.fusion import image_scores

    maps = torch.tensor([[[0.0, 0.2], [0.4, 1.0]], [[0.5, 0.5], [0.5, 0.5]]])  # (2, 2, 2)
    assert image_scores(maps, method="max").tolist() == [1.0, 0.5]
    assert torch.allclose(image_scores(maps, method="mean"), torch.tensor([0.4, 0.5]))
    # top 50 % of 4 pixels = the 2 highest: (1.0 + 0.4) / 2
    assert torch.allclose(image_scores(maps, method="topk_mean", topk_fraction=0.5), torch.tensor([0.7, 0.5]))
    # at least one pixel
    assert image_scores(maps, method="topk_mean", topk_fraction=1e-9).tolist() == [1.0, 0.5]
    with pytest.raises(ValueError, match="image score method"):
        image_scores(maps, method="median")
