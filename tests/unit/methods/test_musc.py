"""MuSc: LNAMD, mutual scoring, the combination, upsampling and RsCIN on hand-worked cases; the
producer end to end on the tiny preset (shape, range, determinism, permutation equivariance,
per-category scoring of a mixed batch, the single-image and memory refusals)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml

from clipsam.errors import ConfigError
from clipsam.methods import musc as M
from clipsam.methods._openclip import build_open_clip
from clipsam.settings import from_mapping

ROOT = Path(__file__).resolve().parents[3]
TINY = {"model_name": "clipsam-tiny-240", "pretrained": None, "input_size": None, "feature_layers": [0, 1, 2, 3]}


@pytest.fixture(scope="module")
def model() -> M.MuSc:
    return M.build(M.MuscConfig(**TINY), image_size=64)  # runs at 64 px: a 4 x 4 patch grid


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.randn(6, 3, 64, 64, generator=torch.Generator().manual_seed(3))


# ---------------------------------------------------------------------- LNAMD
def test_layer_norm_is_one_norm_over_the_whole_block():
    tokens = torch.randn(2, 6, 3, generator=torch.Generator().manual_seed(0)) * 4 + 1
    got = M.layer_norm_tokens(tokens)
    # independent: torch's LayerNorm over (C, h, w) on the channels-first grid (h, w) = (2, 3)
    grid = tokens.transpose(1, 2).reshape(2, 3, 2, 3)
    expected = torch.nn.LayerNorm([3, 2, 3])(grid).reshape(2, 3, 6).transpose(1, 2)
    torch.testing.assert_close(got, expected.detach())
    torch.testing.assert_close(got.mean(dim=(1, 2)), torch.zeros(2), atol=1e-6, rtol=0)


def test_neighbourhood_mean_by_hand():
    grid3 = torch.arange(1.0, 10.0).reshape(1, 1, 3, 3)  # 1..9 row-major
    assert torch.equal(M.neighbourhood_mean(grid3, 1), grid3)  # r = 1: identity
    r3 = M.neighbourhood_mean(grid3, 3)[0, 0]
    assert r3[1, 1].item() == pytest.approx(45 / 9)  # the whole grid
    assert r3[0, 0].item() == pytest.approx((1 + 2 + 4 + 5) / 9)  # zero padding counts
    assert r3[0, 1].item() == pytest.approx((1 + 2 + 3 + 4 + 5 + 6) / 9)
    assert r3[2, 2].item() == pytest.approx((5 + 6 + 8 + 9) / 9)
    grid4 = torch.arange(1.0, 17.0).reshape(1, 1, 4, 4)  # 1..16
    r5 = M.neighbourhood_mean(grid4, 5)[0, 0]
    assert r5[0, 0].item() == pytest.approx((1 + 2 + 3 + 5 + 6 + 7 + 9 + 10 + 11) / 25)
    assert r5[1, 1].item() == pytest.approx(sum(range(1, 17)) / 25)  # rows/cols -1..3 cover all
    assert r5[3, 3].item() == pytest.approx((6 + 7 + 8 + 10 + 11 + 12 + 14 + 15 + 16) / 25)
    with pytest.raises(ConfigError, match="r_list"):
        M.neighbourhood_mean(grid3, 2)


def test_lnamd_equals_unfold_and_channel_pooling():
    """The reference's route: unfold r x r (zero padding), then pool each channel's flattened
    r * r block to one value (adaptive 1-d average over C * r * r -> C), then unit length."""
    m, c, h, w = 2, 5, 4, 4
    tokens = torch.randn(m, h * w, c, generator=torch.Generator().manual_seed(1))
    normed = F.layer_norm(tokens, (h * w, c)).transpose(1, 2).reshape(m, c, h, w)
    for r in (1, 3, 5):
        cols = F.unfold(normed, kernel_size=r, padding=(r - 1) // 2)  # (M, C*r*r, L), channel-major
        flat = cols.transpose(1, 2).reshape(m * h * w, 1, c * r * r)
        pooled = F.adaptive_avg_pool1d(flat, c).reshape(m, h * w, c)
        expected = pooled / pooled.norm(dim=-1, keepdim=True)
        got = M.lnamd(tokens, (h, w), r)
        torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(got.norm(dim=-1), torch.ones(m, h * w))
    # r = 1: only the block LayerNorm and the unit length
    torch.testing.assert_close(M.lnamd(tokens, (h, w), 1), F.normalize(M.layer_norm_tokens(tokens), dim=-1))


# ---------------------------------------------------------------------- MSM
def test_topmin_bounds():
    assert M.topmin_bounds(199, 0.0, 0.3) == (0, 59)  # int(199 * 0.3)
    assert M.topmin_bounds(10, 0.1, 0.5) == (1, 5)
    assert M.topmin_bounds(10, 0.5, 0.1) == (1, 5)  # swapped as the reference
    assert M.topmin_bounds(10, 0.0, 3) == (0, 3)  # >= 1: a count
    assert M.topmin_bounds(2, 0.0, 0.3) == (0, 1)  # reference: empty mean (NaN); here one image
    assert M.topmin_bounds(2, 0.0, 7) == (0, 2)  # at most the other images
    assert M.topmin_bounds(4, 0.9, 0.95) == (2, 3)  # int(3.6) = int(3.8) = 3: keep one value


# Three images, two 1-d patches each; nearest distance of (image i, patch p) to image j:
#   img0 [0, 10]:  p0 -> img1 1, img2 3;   p1 -> img1 3, img2 6
#   img1 [1, 13]:  p0 -> img0 1, img2 2;   p1 -> img0 3, img2 9
#   img2 [3, 4]:   p0 -> img0 3, img1 2;   p1 -> img0 4, img1 3
Z3 = torch.tensor([[[0.0], [10.0]], [[1.0], [13.0]], [[3.0], [4.0]]])


def test_nearest_patch_distances_by_hand():
    got = M.nearest_patch_distances(Z3, Z3)  # (3, 2, 3), self included here
    expected = torch.tensor(
        [[[0, 1, 3], [0, 3, 6]], [[1, 0, 2], [3, 0, 9]], [[3, 2, 0], [4, 3, 0]]], dtype=torch.float32
    )
    torch.testing.assert_close(got, expected)


def test_mutual_scores_by_hand():
    smallest = M.mutual_scores(Z3, 0.0, 0.3)  # int(2 * 0.3) = 0 -> one image, the nearest
    torch.testing.assert_close(smallest, torch.tensor([[1.0, 3.0], [1.0, 3.0], [2.0, 3.0]]))
    both = M.mutual_scores(Z3, 0.0, 2)  # a count: both other images
    torch.testing.assert_close(both, torch.tensor([[2.0, 4.5], [1.5, 6.0], [2.5, 3.5]]))
    second = M.mutual_scores(Z3, 1, 2)  # ranks 1..1: the farther image
    torch.testing.assert_close(second, torch.tensor([[3.0, 6.0], [2.0, 9.0], [3.0, 4.0]]))
    with pytest.raises(ValueError, match="at least 2"):
        M.mutual_scores(Z3[:1])


def test_mutual_scores_chunking_changes_nothing():
    z = F.normalize(torch.randn(7, 9, 5, generator=torch.Generator().manual_seed(2)), dim=-1)
    whole = M.mutual_scores(z, 0.0, 0.5, chunk_bytes=2**30)
    for chunk in (1, 9 * 9 * 4 * 3, 9 * 9 * 4 * 7 * 2):  # one pair, three references, two queries
        torch.testing.assert_close(M.mutual_scores(z, 0.0, 0.5, chunk_bytes=chunk), whole)


# ---------------------------------------------------------------------- combination, upsampling
def test_average_scores_layers_then_degrees():
    a = torch.full((1, 2), 1.0)
    b = torch.full((1, 2), 3.0)
    c = torch.full((1, 2), 8.0)
    # r1: layers (1, 3) -> 2; r2: layers (8, 8) -> 8; mean over r -> 5
    torch.testing.assert_close(M.average_scores([[a, b], [c, c]]), torch.full((1, 2), 5.0))


def test_upsample_is_bilinear_align_corners():
    scores = torch.tensor([[0.0, 1.0, 2.0, 3.0]])  # grid [[0, 1], [2, 3]]
    got = M.upsample_scores(scores, (2, 2), 3)[0]
    torch.testing.assert_close(got, torch.tensor([[0.0, 0.5, 1.0], [1.0, 1.5, 2.0], [2.0, 2.5, 3.0]]))


# ---------------------------------------------------------------------- RsCIN
W3 = torch.tensor([[1.0, 0.8, 0.1], [0.8, 1.0, 0.3], [0.1, 0.3, 1.0]])


def test_rscin_by_hand():
    raw = torch.tensor([2.0, 3.0, 4.0])  # min-max -> s = [0, 0.5, 1]
    s = [0.0, 0.5, 1.0]
    torch.testing.assert_close(M.rscin_from_similarity(raw, W3, [1]), torch.tensor(s))  # k = 1: itself
    k2 = [0.8 * 0.5 / 1.8, 0.5 / 1.8, (0.3 * 0.5 + 1.0) / 1.3]  # each row keeps its 2 largest
    torch.testing.assert_close(M.rscin_from_similarity(raw, W3, [2]), torch.tensor(k2))
    k3 = [(0.8 * 0.5 + 0.1) / 1.9, (0.5 + 0.3) / 2.1, (0.3 * 0.5 + 1.0) / 1.4]
    torch.testing.assert_close(M.rscin_from_similarity(raw, W3, [3]), torch.tensor(k3))
    torch.testing.assert_close(M.rscin_from_similarity(raw, W3, [9]), torch.tensor(k3))  # k clamped to M
    mean = [(a + b) / 2 for a, b in zip(s, k2)]
    torch.testing.assert_close(M.rscin_from_similarity(raw, W3, [1, 2]), torch.tensor(mean))
    torch.testing.assert_close(M.rscin_from_similarity(raw, W3, [0, 2]), raw)  # 0: RsCIN off
    torch.testing.assert_close(M.rscin_from_similarity(torch.full((3,), 0.7), W3, [1, 2]), torch.zeros(3))


def test_rscin_builds_the_graph_from_class_tokens():
    cls = F.normalize(torch.randn(4, 6, generator=torch.Generator().manual_seed(5)), dim=-1)
    raw = torch.tensor([0.3, 0.9, 0.1, 0.5])
    torch.testing.assert_close(M.rscin(raw, cls, [1, 2, 3]), M.rscin_from_similarity(raw, cls @ cls.T, [1, 2, 3]))


def test_estimate_category_bytes_by_hand():
    # tokens 2*1*4*3*4 = 96, LNAMD 3*2*4*3*4 = 288, distance 3 * max(0, 4*4*4) = 192, maps 2*2*10*4 = 160
    assert M.estimate_category_bytes(2, 4, 3, 1, chunk_bytes=0, map_pixels=10) == 96 + 288 + 192 + 160


# ---------------------------------------------------------------------- config and build
def test_defaults_are_the_reference():
    cfg = M.MuscConfig()
    assert (cfg.model_name, cfg.pretrained, cfg.input_size) == ("ViT-L-14-336", "openai", 518)
    assert cfg.feature_layers == [5, 11, 17, 23] and cfg.r_list == [1, 3, 5]
    assert (cfg.topmin_min, cfg.topmin_max) == (0.0, 0.3) and cfg.rscin_k == [1, 2, 3]
    assert cfg.quick_gelu is False and cfg.pos_interpolation == "bicubic"
    with pytest.raises(ConfigError, match="r_list"):
        M.MuscConfig(r_list=[1, 2])
    with pytest.raises(ConfigError, match="topmin_max"):
        M.MuscConfig(topmin_max=-1)
    with pytest.raises(ConfigError, match="max_category_gib"):
        M.MuscConfig(max_category_gib=0)


def test_shipped_configs_validate():
    for name, k in (("musc_mvtec.yaml", [1, 8, 9]), ("musc_visa.yaml", [1, 2, 3]), ("demo/musc.yaml", None)):
        section = yaml.safe_load((ROOT / "configs" / "methods" / name).read_text())["model"]
        assert section["method"] == "musc" and section["refiner"] == "none"
        cfg = from_mapping(M.MuscConfig, section["method_config"], key="model.method_config")
        if k is not None:
            assert cfg.rscin_k == k and cfg.input_size == 518 and cfg.model_name == "ViT-L-14-336"


def test_input_specs():
    assert M.input_specs(M.MuscConfig(), image_size=518) == []  # the reference's 518 is the frame
    (spec,) = M.input_specs(M.MuscConfig(), image_size=256)
    assert (spec.key, spec.size, spec.resize, spec.normalize) == ("method_image", 518, "pil_bicubic", "clip")


def test_declares_whole_category_batches():
    assert M.inference_batching(M.MuscConfig(), image_size=518) == "category"


def test_positional_grid_resized_bicubic_without_antialias(model):
    native, _ = build_open_clip(
        section="t", model_name="clipsam-tiny-240", pretrained=None, image_size=240, pos_interpolation="bilinear"
    )
    pos = native.visual.positional_embedding.detach()
    grid = pos[1:].reshape(1, 15, 15, -1).permute(0, 3, 1, 2)
    expected = F.interpolate(grid, size=(4, 4), mode="bicubic", align_corners=False).permute(0, 2, 3, 1).reshape(16, -1)
    got = model.visual.positional_embedding.detach()
    torch.testing.assert_close(got[0], pos[0])
    torch.testing.assert_close(got[1:], expected)
    assert model.grid == (4, 4) and not any(p.requires_grad for p in model.parameters())


def test_feature_layers_beyond_the_model_refused(model):
    with pytest.raises(ConfigError, match=r"feature_layers=\[4\].*blocks 0..3"):
        M.MuSc(clip_model=model.clip, config=M.MuscConfig(**{**TINY, "feature_layers": [4]}), input_size=64)


# ---------------------------------------------------------------------- the producer
def test_score_category_shape_range_determinism(model, images):
    out = model.score_category(images, "bottle")
    assert out.anomaly_map.shape == (6, 64, 64) and out.image_scores.shape == (6,)
    assert out.extras["patch_scores"].shape == (6, 4, 4) and out.extras["max_scores"].shape == (6,)
    assert 0.0 <= out.anomaly_map.min() and out.anomaly_map.max() <= 1.0
    assert 0.0 <= out.image_scores.min() and out.image_scores.max() <= 1.0
    assert torch.isfinite(out.anomaly_map).all() and torch.isfinite(out.image_scores).all()
    # the map is the reference's (distance) grid / 2, upsampled; its maximum is the reference's ac score
    grid = out.extras["patch_scores"].flatten(1)
    torch.testing.assert_close(out.anomaly_map, M.upsample_scores(grid, (4, 4), 64) / 2)
    torch.testing.assert_close(out.extras["max_scores"], grid.amax(1))  # 64 px: grid corners land on pixels
    again = model.score_category(images, "bottle")
    assert torch.equal(again.anomaly_map, out.anomaly_map) and torch.equal(again.image_scores, out.image_scores)


def test_score_category_is_the_composition_of_the_steps(model, images):
    taps, cls = model.encode(images)
    per_r = [[M.mutual_scores(M.lnamd(t, (4, 4), r), 0.0, 0.3) for t in taps] for r in (1, 3, 5)]
    grid = M.average_scores(per_r)
    out = model.score_category(images)
    torch.testing.assert_close(out.extras["patch_scores"].flatten(1), grid)
    torch.testing.assert_close(out.image_scores, M.rscin(grid.amax(1), cls, [1, 2, 3]).clamp(0, 1))


def test_permuting_the_images_permutes_the_outputs(model, images):
    out = model.score_category(images)
    perm = torch.tensor([3, 0, 5, 1, 4, 2])
    moved = model.score_category(images[perm])
    torch.testing.assert_close(moved.anomaly_map, out.anomaly_map[perm], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(moved.image_scores, out.image_scores[perm], atol=1e-5, rtol=1e-5)


def test_forward_scores_each_category_within_the_batch(model, images):
    categories = ["a", "b", "a", "b", "a", "b"]
    out = model(images, categories)
    assert out.anomaly_map.shape == (6, 64, 64)
    for name, rows in (("a", [0, 2, 4]), ("b", [1, 3, 5])):
        alone = model.score_category(images[rows], name)
        torch.testing.assert_close(out.anomaly_map[rows], alone.anomaly_map)
        torch.testing.assert_close(out.image_scores[rows], alone.image_scores)
    # the frame the registry sets is honoured (maps returned at 96 while the model runs at 64)
    model.frame_size = 96
    try:
        assert model(images, ["a"] * 6).anomaly_map.shape == (6, 96, 96)
    finally:
        model.frame_size = None


def test_single_image_category_refused_in_one_line(model, images):
    with pytest.raises(ConfigError, match="category 'b' has 1 image") as err:
        model(images[:3], ["a", "a", "b"])
    assert "\n" not in str(err.value)
    with pytest.raises(ConfigError, match="at least 2"):
        model.score_category(images[:1], "a")


def test_memory_bound_refused_in_one_line(model, images, monkeypatch):
    monkeypatch.setattr(model.config, "max_category_gib", 1e-6)
    with pytest.raises(ConfigError, match=r"category 'screw' has 6 images.*model\.method_config\.max_category_gib") as err:
        model(images, ["screw"] * 6)
    assert "\n" not in str(err.value)
