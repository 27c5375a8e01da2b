"""PPG (clipsam.prompting): hand-built maps and features whose answers are worked out on paper, and
random ones against an independent numpy/cv2 implementation of the equations."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch

from clipsam.errors import ConfigError
from clipsam.prompting import (
    PromptConfig,
    anomaly_ring,
    generate_point_prompts,
    structuring_element,
)
from tests.helpers.ppg_reference import (
    mean_feature,
    pixel_similarity,
    reference_point_prompts,
    sample_features,
)
from tests.unit.models import sam_stage_reference as numpy_reference


def _ppg(amap, feats, **overrides):
    kwargs = {"num_positive": 3, "num_negative": 0, "threshold": 0.5, "kernel_shape": "rect", "kernel_size": 3}
    kwargs.update(overrides)
    return generate_point_prompts(amap, feats, **kwargs)


def test_square_anomaly_positives_are_the_peaks_in_xy_order():
    amap = torch.zeros(10, 12)
    amap[3:6, 4:7] = 0.6  # S_a: rows 3-5, columns 4-6
    amap[4, 5] = 0.95
    amap[3, 6] = 0.9
    amap[5, 4] = 0.8
    coords, labels = _ppg(amap, torch.ones(4, 10, 12), num_positive=3)
    assert coords.dtype == torch.float32 and labels.dtype == torch.int64
    assert coords.tolist() == [[5.0, 4.0], [6.0, 3.0], [4.0, 5.0]]  # (x, y), descending score
    assert labels.tolist() == [1, 1, 1]


def test_positive_ties_follow_raster_order_and_stay_inside_region():
    amap = torch.zeros(8, 8)
    amap[2:4, 3:5] = 0.7  # 4 equal pixels
    coords, labels = _ppg(amap, torch.ones(2, 8, 8), num_positive=10)
    assert coords.tolist() == [[3.0, 2.0], [4.0, 2.0], [3.0, 3.0], [4.0, 3.0]]  # only S_a, raster order
    assert labels.tolist() == [1, 1, 1, 1]


def test_non_square_map_does_not_swap_x_and_y():
    amap = torch.zeros(6, 15)
    amap[1, 12] = 1.0
    coords, _ = _ppg(amap, torch.ones(2, 6, 15), num_positive=1)
    assert coords.tolist() == [[12.0, 1.0]]


def test_negatives_are_the_ring_pixels_least_like_the_mean_anomaly_feature():
    amap = torch.zeros(11, 11)
    amap[4:7, 4:7] = 0.9  # S_a: the 3x3 centre; rect 3 ring = the 16 pixels of the 5x5 border
    feats = torch.zeros(2, 11, 11)
    feats[0] = 1.0  # every pixel (1, 0): cosine 1 to the anomaly's mean
    feats[:, 4:7, 4:7] = torch.tensor([1.0, 0.0])[:, None, None]
    feats[:, 4, 4] = torch.tensor([1.0, 1.0])  # inside: pulls the mean towards (1, 1/9)
    feats[:, 4, 5] = torch.tensor([1.0, -1.0])  # ... and back: mean exactly (1, 0)
    feats[:, 3, 5] = torch.tensor([0.0, 1.0])  # ring (x=5, y=3): orthogonal, cosine 0
    feats[:, 7, 3] = torch.tensor([-1.0, 0.0])  # ring (x=3, y=7): opposite, cosine -1
    feats[:, 5, 7] = torch.tensor([1.0, 1.0])  # ring (x=7, y=5): cosine 0.707
    feats[:, 0, 0] = torch.tensor([-1.0, 0.0])  # outside the ring: never a negative
    coords, labels = _ppg(amap, feats, num_positive=0, num_negative=3, kernel_shape="rect", kernel_size=3)
    assert coords.tolist() == [[3.0, 7.0], [5.0, 3.0], [7.0, 5.0]]  # ascending similarity
    assert labels.tolist() == [0, 0, 0]


def test_negatives_use_the_mean_feature_not_any_single_pixel():
    amap = torch.zeros(9, 9)
    amap[4, 3:5] = 0.9  # two anomaly pixels with features (1, 0) and (0, 1): mean (0.5, 0.5)
    feats = torch.ones(2, 9, 9)  # (1, 1) everywhere: cosine 1 to the mean
    feats[:, 4, 3] = torch.tensor([1.0, 0.0])
    feats[:, 4, 4] = torch.tensor([0.0, 1.0])
    feats[:, 3, 4] = torch.tensor([1.0, -1.0])  # cosine 0 to the mean, 0.707 to pixel (x=3, y=4)
    coords, labels = _ppg(amap, feats, num_positive=0, num_negative=1)
    assert coords.tolist() == [[4.0, 3.0]] and labels.tolist() == [0]


def test_points_come_positives_first_then_negatives():
    amap = torch.zeros(9, 9)
    amap[4, 4] = 0.9
    coords, labels = _ppg(amap, torch.ones(2, 9, 9), num_positive=2, num_negative=2)
    assert labels.tolist() == [1, 0, 0]  # one S_a pixel; 8 ring pixels with equal features
    assert coords.tolist() == [[4.0, 4.0], [3.0, 3.0], [4.0, 3.0]]  # ties: raster order


@pytest.mark.parametrize(("shape", "ring_size"), [("ellipse", 16), ("rect", 24), ("cross", 8)])
def test_ring_size_for_each_kernel_shape(shape, ring_size):
    # 5x5 kernels: ellipse has 17 ones (1, 5, 5, 5, 1), rect 25, cross 9; the centre pixel is S_a.
    amap = torch.zeros(11, 11)
    amap[5, 5] = 1.0
    ring = anomaly_ring(amap >= 0.5, structuring_element(shape, 5))
    assert int(ring.sum()) == ring_size
    coords, labels = _ppg(amap, torch.ones(3, 11, 11), num_positive=0, num_negative=100, kernel_shape=shape, kernel_size=5)
    assert labels.numel() == ring_size  # fewer ring pixels than asked: all of them
    expected = cv2.getStructuringElement({"ellipse": cv2.MORPH_ELLIPSE, "rect": cv2.MORPH_RECT, "cross": cv2.MORPH_CROSS}[shape], (5, 5))
    for x, y in coords.int().tolist():
        assert expected[y - 5 + 2, x - 5 + 2] == 1 and (x, y) != (5, 5)


@pytest.mark.parametrize("shape", ["ellipse", "rect", "cross"])
@pytest.mark.parametrize("size", [1, 3, 4, 20, 25])
def test_ring_matches_cv2_dilate(shape, size):
    rng = np.random.default_rng(size)
    region = rng.random((40, 53)) > 0.97
    region[0, 0] = region[39, 52] = region[20, 0] = True  # touch the borders
    kernel = cv2.getStructuringElement({"ellipse": cv2.MORPH_ELLIPSE, "rect": cv2.MORPH_RECT, "cross": cv2.MORPH_CROSS}[shape], (size, size))
    expected = cv2.dilate(region.astype(np.uint8), kernel).astype(bool) & ~region
    ring = anomaly_ring(torch.from_numpy(region), structuring_element(shape, size))
    assert torch.equal(ring, torch.from_numpy(expected))


def test_empty_region_returns_empty_tensors():
    amap = torch.full((7, 9), 0.3)
    coords, labels = _ppg(amap, torch.ones(2, 7, 9), threshold=0.5, num_negative=4)
    assert coords.shape == (0, 2) and coords.dtype == torch.float32
    assert labels.shape == (0,) and labels.dtype == torch.int64


def test_region_covering_everything_has_no_negatives():
    _coords, labels = _ppg(torch.ones(4, 5), torch.ones(2, 4, 5), num_positive=2, num_negative=3)
    assert labels.tolist() == [1, 1]


def test_features_are_sampled_at_pixel_centres():
    feats = torch.arange(4, dtype=torch.float32)[None, None, :].expand(1, 3, 4).clone()  # value = column
    full = torch.randn(5, 6, 7)
    exact = sample_features(full, torch.tensor([0, 5, 2]), torch.tensor([6, 0, 3]), (6, 7))
    assert torch.equal(exact, full[:, [0, 5, 2], [6, 0, 3]].T)
    # Frame 8 px wide on a 4-cell grid: pixel x's centre is at cell (x + 0.5) / 2 - 0.5.
    xs = torch.tensor([1, 3, 4, 7])
    got = sample_features(feats, torch.zeros(4, dtype=torch.long), xs, (3, 8))[:, 0]
    assert torch.allclose(got, torch.tensor([0.25, 1.25, 1.75, 3.0]))  # border-clamped at the right edge


def test_prompt_config_defaults_and_validation():
    config = PromptConfig()
    assert (config.kernel_shape, config.kernel_size) == ("ellipse", 25)
    assert (config.num_positive, config.num_negative, config.threshold) == (5, 5, 0.5)
    assert (config.similarity_to, config.feature_sampling) == ("mean", "bilinear")
    assert set(config.kwargs()) == {
        "num_positive", "num_negative", "threshold", "kernel_shape", "kernel_size", "similarity_to", "feature_sampling",
    }
    with pytest.raises(ConfigError, match=r"model\.refiner_config\.prompt\.kernel_shape='disk'"):
        PromptConfig(kernel_shape="disk")
    with pytest.raises(ConfigError, match=r"model\.refiner_config\.prompt\.kernel_size=0"):
        PromptConfig(kernel_size=0)
    with pytest.raises(ConfigError, match=r"model\.refiner_config\.prompt\.threshold=1\.5"):
        PromptConfig(threshold=1.5)
    with pytest.raises(ConfigError, match=r"model\.refiner_config\.prompt\.num_positive=-1"):
        PromptConfig(num_positive=-1)
    with pytest.raises(ConfigError, match=r"model\.refiner_config\.prompt\.similarity_to='median'.*'mean', 'max'"):
        PromptConfig(similarity_to="median")
    with pytest.raises(ConfigError, match=r"model\.refiner_config\.prompt\.feature_sampling='bicubic'"):
        PromptConfig(feature_sampling="bicubic")
    for bad in ({"similarity_to": "median"}, {"feature_sampling": "bicubic"}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            generate_point_prompts(torch.ones(3, 3), torch.ones(1, 3, 3), num_positive=1, num_negative=1,
                                   threshold=0.5, kernel_shape="rect", kernel_size=3, **bad)
    with pytest.raises(ValueError, match="kernel_shape"):
        generate_point_prompts(torch.ones(3, 3), torch.ones(1, 3, 3), num_positive=1, num_negative=1,
                               threshold=0.5, kernel_shape="disk", kernel_size=3)


@pytest.mark.parametrize(("frame", "grid"), [((13, 17), (13, 17)), ((40, 52), (7, 9)), ((518, 518), (64, 64))])
def test_ring_similarity_equals_cosine_of_interpolated_features(frame, grid):
    gen = torch.Generator().manual_seed(1)
    feats = torch.randn(16, *grid, generator=gen)
    target = torch.randn(16, generator=gen)
    ys = torch.randint(0, frame[0], (300,), generator=gen)
    xs = torch.randint(0, frame[1], (300,), generator=gen)
    ys[:2], xs[:2] = torch.tensor([0, frame[0] - 1]), torch.tensor([0, frame[1] - 1])  # clamped borders
    expected = torch.nn.functional.cosine_similarity(sample_features(feats, ys, xs, frame), target[None], dim=1)
    assert torch.allclose(pixel_similarity(feats, target, ys, xs, frame), expected, atol=1e-5)


def test_mean_feature_equals_mean_of_interpolated_features():
    gen = torch.Generator().manual_seed(2)
    feats = torch.randn(8, 6, 5, generator=gen)
    region = torch.rand(30, 22, generator=gen) > 0.6
    ys, xs = torch.nonzero(region, as_tuple=True)
    expected = sample_features(feats, ys, xs, (30, 22)).mean(0)
    assert torch.allclose(mean_feature(feats, region), expected, atol=1e-5)


def test_stable_topk_matches_a_stable_sort():
    from clipsam.prompting import _stable_topk

    gen = torch.Generator().manual_seed(3)
    values = torch.randint(0, 5, (200,), generator=gen).float()  # many ties
    for k in (0, 1, 7, 40, 200, 300):
        for largest in (True, False):
            expected = torch.sort(values, descending=largest, stable=True).indices[:k]
            assert torch.equal(_stable_topk(values, k, largest=largest), expected)


# --------------------------------------------------------------------------- batched PPG
from clipsam.prompting import dilate, generate_point_prompts_batched


def _blob_maps(batch, size, seed):
    gen = torch.Generator().manual_seed(seed)
    height, width = size
    ys, xs = torch.meshgrid(torch.arange(height).float(), torch.arange(width).float(), indexing="ij")
    maps = []
    for i in range(batch):
        cy, cx = torch.rand(2, generator=gen) * torch.tensor([height, width])
        blob = torch.exp(-((ys - cy) ** 2 + (xs - cx) ** 2) / (2 * (height / 6) ** 2))
        noisy = blob + 0.05 * torch.rand(size, generator=gen)
        maps.append(noisy.clamp(0, 1) if i % 3 else torch.zeros(size))  # every third map: empty S_a
    return torch.stack(maps)


@pytest.mark.parametrize(
    "size, grid, shape, ksize",
    [((40, 40), (40, 40), "ellipse", 9), ((37, 53), (8, 12), "ellipse", 25), ((48, 32), (16, 16), "rect", 20), ((30, 30), (7, 7), "cross", 5)],
)
@pytest.mark.parametrize("strategy", ["dense", "compact"])
def test_batched_ppg_equals_the_per_image_reference(size, grid, shape, ksize, strategy):
    """Same points, same order, as the one-image-at-a-time PPG (cv2 ring, per-pixel similarity)."""
    maps = _blob_maps(4, size, seed=ksize)
    gen = torch.Generator().manual_seed(1)
    feats = torch.randn(4, 6, *grid, generator=gen)
    kwargs = {"num_positive": 4, "num_negative": 5, "threshold": 0.6, "kernel_shape": shape, "kernel_size": ksize}
    coords, labels = generate_point_prompts_batched(maps, feats, strategy=strategy, **kwargs)
    assert coords.shape == (4, 9, 2) and labels.shape == (4, 9)
    for i in range(4):
        ref_coords, ref_labels = reference_point_prompts(maps[i], feats[i], **kwargs)
        keep = labels[i] >= 0
        torch.testing.assert_close(coords[i][keep], ref_coords, rtol=0, atol=0)
        torch.testing.assert_close(labels[i][keep], ref_labels, rtol=0, atol=0)
        one_coords, _one_labels = generate_point_prompts(maps[i], feats[i], **kwargs)
        torch.testing.assert_close(one_coords, ref_coords, rtol=0, atol=0)
        # empty slots: positives first (slots 0..3), negatives after (4..8), -1 at the end of each
        pos, neg = labels[i, :4], labels[i, 4:]
        assert set(pos.tolist()) <= {1, -1} and set(neg.tolist()) <= {0, -1}
        assert (coords[i][~keep] == 0).all()
    assert (labels[0] == -1).all(), "an empty S_a gives only empty slots"


@pytest.mark.parametrize("strategy", ["dense", "compact"])
def test_empty_slots_when_region_and_ring_are_small(strategy):
    amap = torch.zeros(1, 12, 12)
    amap[0, 5, 5] = 0.9  # S_a: one pixel; ring of a 3x3 rect: 8 pixels
    coords, labels = generate_point_prompts_batched(
        amap, torch.randn(1, 4, 12, 12), num_positive=3, num_negative=10, threshold=0.5, kernel_shape="rect",
        kernel_size=3, strategy=strategy,
    )
    assert labels[0].tolist() == [1, -1, -1] + [0] * 8 + [-1, -1]
    assert coords[0, 0].tolist() == [5.0, 5.0]


@pytest.mark.parametrize("shape, ksize", [("ellipse", 25), ("ellipse", 6), ("rect", 20), ("cross", 7)])
def test_device_dilation_equals_cv2_on_random_masks(shape, ksize):
    gen = torch.Generator().manual_seed(ksize)
    masks = torch.rand(3, 41, 57, generator=gen) > 0.97
    kernel = structuring_element(shape, ksize)
    out = dilate(masks, kernel, backend="torch")  # the accelerator path, run on the CPU here
    assert torch.equal(dilate(masks, kernel, backend="cv2"), out)
    for i in range(3):
        expected = cv2.dilate(masks[i].numpy().astype(np.uint8), kernel.numpy().astype(np.uint8)).astype(bool)
        assert np.array_equal(out[i].numpy(), expected)


def test_dense_and_compact_strategies_agree_with_a_padded_embedding_extent():
    """The SAM case: features of a non-square image padded in a square grid (fractional extent)."""
    maps = _blob_maps(3, (50, 50), seed=7)
    feats = torch.randn(3, 8, 16, 16, generator=torch.Generator().manual_seed(2))
    extent = torch.tensor([[10.4, 16.0], [16.0, 7.3], [16.0, 16.0]], dtype=torch.float64)
    kwargs = {"num_positive": 3, "num_negative": 6, "threshold": 0.6, "kernel_shape": "ellipse", "kernel_size": 11}
    dense = generate_point_prompts_batched(maps, feats, feature_extent=extent, strategy="dense", **kwargs)
    compact = generate_point_prompts_batched(maps, feats, feature_extent=extent, strategy="compact", **kwargs)
    assert torch.equal(dense[0], compact[0]) and torch.equal(dense[1], compact[1])
    # cells past the extent (padding) never matter
    changed = feats.clone()
    changed[0, :, 11:] = 1e3
    changed[1, :, :, 8:] = -1e3
    again = generate_point_prompts_batched(maps, changed, feature_extent=extent, strategy="dense", **kwargs)
    assert torch.equal(again[0], dense[0])


@pytest.mark.parametrize("shape, ksize", [("rect", 20), ("ellipse", 25), ("cross", 4)])
def test_compact_windows_at_the_frame_borders_give_the_reference_points(shape, ksize):
    """S_a touching each border and a corner: the window around dilate(S_a) is clipped to the frame.

    Even kernel sizes put the anchor off centre (k // 2), so the ring is wider on one side.
    """
    height, width = 33, 47
    maps = torch.zeros(5, height, width)
    gen = torch.Generator().manual_seed(ksize)
    noise = 0.3 * torch.rand(5, height, width, generator=gen)
    maps[0, :4, 10:20] = 0.8  # top border
    maps[1, -3:, 30:] = 0.8  # bottom-right corner
    maps[2, 12:18, :2] = 0.8  # left border
    maps[3, 5:9, -1:] = 0.8  # right border, one column
    maps[4, 16, 23] = 0.8  # one pixel in the middle
    maps = maps + noise * (maps > 0)
    feats = torch.randn(5, 6, 9, 13, generator=gen)
    kwargs = {"num_positive": 3, "num_negative": 7, "threshold": 0.5, "kernel_shape": shape, "kernel_size": ksize}
    coords, labels = generate_point_prompts_batched(maps, feats, strategy="compact", **kwargs)
    dense = generate_point_prompts_batched(maps, feats, strategy="dense", **kwargs)
    assert torch.equal(coords, dense[0]) and torch.equal(labels, dense[1])
    for i in range(5):
        ref_coords, ref_labels = reference_point_prompts(maps[i], feats[i], **kwargs)
        keep = labels[i] >= 0
        assert torch.equal(coords[i][keep], ref_coords) and torch.equal(labels[i][keep], ref_labels)
        assert (labels[i] == 0).sum() == min(7, int(anomaly_ring(maps[i] >= 0.5, structuring_element(shape, ksize)).sum()))


# --------------------------------------------------------------------------- the open choices
def test_max_similarity_compares_with_the_most_similar_anomaly_pixel():
    """S_a features (1, 0), (1, 0), (0, 1): the mean is (2/3, 1/3).

    Ring pixel X = (0, 1) equals an anomaly pixel (max 1) but is far from the mean (0.447); ring
    pixel Y = (1, 1) is close to the mean (0.949) but at 45 degrees from every anomaly pixel
    (max 0.707); the other ring pixels, (1, 0), have 0.894 and 1.
    """
    amap = torch.zeros(9, 9)
    amap[4, 3:6] = 0.9
    feats = torch.zeros(2, 9, 9)
    feats[0] = 1.0
    feats[:, 4, 5] = torch.tensor([0.0, 1.0])
    feats[:, 3, 4] = torch.tensor([0.0, 1.0])  # X (x=4, y=3)
    feats[:, 5, 4] = torch.tensor([1.0, 1.0])  # Y (x=4, y=5)
    mean, best = (_ppg(amap, feats, num_positive=0, num_negative=1, similarity_to=target)[0].tolist()
                  for target in ("mean", "max"))
    assert mean == [[4.0, 3.0]] and best == [[4.0, 5.0]]


def test_nearest_sampling_reads_the_cell_holding_the_pixel_centre():
    from clipsam.prompting import _interpolation_matrices

    # 8 pixels on 4 cells: the centre of pixel x is at cell coordinate (x + 0.5) / 2
    nearest = _interpolation_matrices(8, 4, torch.tensor([4.0]), "nearest")[0]
    assert nearest.argmax(1).tolist() == [0, 0, 1, 1, 2, 2, 3, 3] and torch.equal(nearest.sum(1), torch.ones(8))
    # 2.5 valid cells (a padded embedding): centres at (x + 0.5) * 2.5 / 8, cell 3 never read
    padded = _interpolation_matrices(8, 4, torch.tensor([2.5]), "nearest")[0]
    assert padded.argmax(1).tolist() == [0, 0, 0, 1, 1, 1, 2, 2]
    bilinear = _interpolation_matrices(8, 4, torch.tensor([4.0]), "bilinear")[0]
    assert torch.allclose(bilinear @ torch.arange(4.0), torch.tensor([0.0, 0.25, 0.75, 1.25, 1.75, 2.25, 2.75, 3.0]))


def _numpy_case(kind, seed, size):
    """Map_a (H, W) float32 for the comparison with the numpy implementation."""
    rng = np.random.default_rng(seed)
    height, width = size
    ys, xs = np.mgrid[:height, :width].astype(np.float32)
    cy, cx = rng.random(2) * np.array([height, width])
    blob = np.exp(-((ys - cy) ** 2 + (xs - cx) ** 2) / (2 * (height / 6) ** 2))
    noise = rng.random(size).astype(np.float32)
    if kind == "blob":  # distinct values
        return np.clip(0.9 * blob + 0.08 * noise, 0, 1).astype(np.float32)
    if kind == "ties":  # Map_a in steps of 0.1: positives tie, raster order decides
        return np.round(np.clip(blob + 0.08 * noise, 0, 1) * 10).astype(np.float32) / 10
    if kind == "two-pixels":  # S_a smaller than k
        amap = 0.4 * noise
        amap[int(cy), int(cx)], amap[int(cy) // 2, int(cx) // 2] = 0.9, 0.7
        return amap
    assert kind == "small-ring"  # everything but three pixels: a ring of 3 < k
    amap = 0.65 + 0.3 * noise
    amap[-1, -3:] = 0.2
    return amap


NUMPY_SETTINGS = [  # frame, feature grid, valid cells (None: all), kernel
    ((30, 36), (30, 36), None, ("ellipse", 7)),
    ((37, 53), (8, 12), None, ("rect", 4)),
    ((40, 40), (16, 16), (10.4, 16.0), ("cross", 5)),
    ((44, 40), (16, 16), (16.0, 7.3), ("ellipse", 11)),
]


@pytest.mark.parametrize("feature_sampling", ["bilinear", "nearest"])
@pytest.mark.parametrize("similarity_to", ["mean", "max"])
@pytest.mark.parametrize("kind", ["blob", "ties", "two-pixels", "small-ring"])
def test_ppg_equals_an_independent_numpy_implementation(kind, similarity_to, feature_sampling):
    """Both strategies and the one-image form give the numpy/cv2 implementation's points, in its order."""
    loose = 0
    for seed, (size, grid, extent, (shape, ksize)) in enumerate(NUMPY_SETTINGS):
        amap = _numpy_case(kind, seed, size)
        feats = np.random.default_rng(100 + seed).standard_normal((6, *grid)).astype(np.float32)
        kwargs = {
            "num_positive": 4, "num_negative": 5, "threshold": 0.6, "kernel_shape": shape, "kernel_size": ksize,
            "similarity_to": similarity_to, "feature_sampling": feature_sampling,
        }
        expected, expected_labels, ring = numpy_reference.ppg(amap, feats, extent, **kwargs)
        positives = int((expected_labels == 1).sum())
        assert positives == (2 if kind == "two-pixels" else 4)
        if kind == "small-ring":
            assert (expected_labels == 0).sum() == 3
        extent_t = None if extent is None else torch.tensor([extent], dtype=torch.float64)
        for strategy in ("dense", "compact"):
            coords, labels = generate_point_prompts_batched(
                torch.from_numpy(amap)[None], torch.from_numpy(feats)[None], feature_extent=extent_t,
                strategy=strategy, **kwargs,
            )
            keep = labels[0] >= 0
            loose += numpy_reference.assert_same_points(
                coords[0][keep].numpy(), labels[0][keep].numpy(), expected, expected_labels, ring
            )
        if extent is None:
            coords, labels = generate_point_prompts(torch.from_numpy(amap), torch.from_numpy(feats), **kwargs)
            numpy_reference.assert_same_points(coords.numpy(), labels.numpy(), expected, expected_labels, ring)
    # identical points wherever the similarities are apart; only "max" meets similarities within
    # rounding (a ring pixel next to S_a reads almost the same feature as its neighbour: cosine ~1)
    assert loose == 0 or similarity_to == "max"
