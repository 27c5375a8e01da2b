"""SDP / SDP+: feature surgery and DBSCAN on given vectors, the staged v-v path against a direct
computation from open_clip's own intermediates, and both producers end to end on the tiny preset."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
import torch.nn.functional as F

from clipsam.errors import ConfigError
from clipsam.methods import sdp as S
from clipsam.methods._openclip import vv_residual

TINY = dict(model_name="clipsam-tiny-240", pretrained=None, input_size=None, layers=[1, 2, 3, 4],
            dbscan_eps=1.5, dbscan_min_samples=5)


@pytest.fixture(scope="module")
def plus() -> S.SdpPlus:
    return S.build_plus(S.SdpPlusConfig(**TINY), image_size=64)


def test_feature_surgery_on_given_vectors():
    features = torch.tensor([[[1.0, 0.0], [0.6, 0.8], [0.0, 1.0]]])  # class token, two patches
    text = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])  # columns t_n = e1, t_a = e2
    got = S.feature_surgery(features, text)
    p_n, p_a = math.e / (1 + math.e), 1 / (1 + math.e)  # softmax([1, 0])
    w_n, w_a = 2 * p_n, 2 * p_a  # p / mean(p)
    for i, (c_n, c_a) in enumerate([(1.0, 0.0), (0.6, 0.8), (0.0, 1.0)]):
        mean = (w_n * c_n + w_a * c_a) / 2
        assert got[0, i, 0].item() == pytest.approx(w_n * c_n - mean, abs=1e-6)
        assert got[0, i, 1].item() == pytest.approx(w_a * c_a - mean, abs=1e-6)
    torch.testing.assert_close(got.sum(-1), torch.zeros(1, 3))  # redundancy removed per token


def test_default_stage_starts():
    assert S.default_stage_starts(12) == [1, 4, 7, 10]
    assert S.default_stage_starts(24) == [1, 7, 13, 19]
    assert S.default_stage_starts(4) == [1, 2, 3, 4]


def test_dbscan_class_vector_takes_the_largest_cluster():
    big = F.normalize(torch.tensor([[1.0, 0.0, 0.0], [0.99, 0.05, 0.0], [0.98, 0.0, 0.05]]), dim=-1)
    small = F.normalize(torch.tensor([[0.0, 1.0, 0.0], [0.05, 0.99, 0.0]]), dim=-1)
    outlier = torch.tensor([[0.0, 0.0, 1.0]])
    data = torch.cat([small, big, outlier])
    got = S.dbscan_class_vector(data, eps=0.2, min_samples=2)
    torch.testing.assert_close(got, F.normalize(big.mean(0), dim=0))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fallback = S.dbscan_class_vector(data, eps=0.01, min_samples=2)
    assert any("no cluster" in str(w.message) for w in caught)
    torch.testing.assert_close(fallback, F.normalize(data.mean(0), dim=0))


def test_staged_path_equals_direct_computation(plus):
    visual = plus.visual
    images = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    surgery, original = S.staged_vv_forward(visual, images, [2, 4], [1, 3])
    inter = visual.forward_intermediates(
        images, indices=4, intermediates_only=True, output_fmt="NLC", output_extra_tokens=True
    )
    o = [visual._embeds(images)] + [
        torch.cat([c, t], dim=1) for c, t in zip(inter["image_intermediates_prefix"], inter["image_intermediates"])
    ]  # o_0 .. o_4, class token first
    blocks = visual.transformer.resblocks
    for got, b in zip(original, [2, 4]):
        torch.testing.assert_close(got, o[b], rtol=1e-5, atol=1e-5)
    s2 = vv_residual(blocks[0], o[0]) + vv_residual(blocks[1], o[1])  # stage from block 1
    s4 = vv_residual(blocks[2], o[2]) + vv_residual(blocks[3], o[3])  # reset at block 3
    for got, s, b in zip(surgery, [s2, s4], [2, 4]):
        expected = visual.ln_post(torch.cat([o[b][:, :1], s[:, 1:]], dim=1)) @ visual.proj
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    # the reference's in-place aliasing: taps but the last get the next block's attention output
    _, aliased = S.staged_vv_forward(visual, images, [2, 4], [1, 3], reference_aliasing=True)
    attn3 = blocks[2].ls_1(blocks[2].attention(q_x=blocks[2].ln_1(o[2])))
    torch.testing.assert_close(aliased[0], o[2] + attn3, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(aliased[1], o[4], rtol=1e-5, atol=1e-5)


def test_category_minmax_image_scores_by_hand():
    text = torch.tensor([0.2, 0.4, 0.3, 0.9, 0.1])
    mmax = torch.tensor([1.0, 3.0, 2.0, 5.0, 5.0])
    got = S.category_minmax_image_scores(text, mmax, ["a", "a", "a", "b", "b"])
    # a: text -> 0, 1, .5; max -> 0, 1, .5 ; b: text -> 1, 0; max -> equal values -> 0, 0
    torch.testing.assert_close(got, torch.tensor([0.0, 1.0, 0.5, 0.5, 0.0]))


def test_sdp_end_to_end_map_is_the_affine_image_of_the_reference_map():
    model = S.build(S.SdpConfig(**TINY), image_size=64)
    out = model(torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1)), ["bottle", "bottle"])
    assert out.anomaly_map.shape == (2, 64, 64) and 0 <= out.anomaly_map.min() and out.anomaly_map.max() <= 1
    torch.testing.assert_close(out.anomaly_map, (out.extras["raw_map"] + 4) / 8)  # T = 4 taps
    unit_max = (out.extras["image_score_map_max"] + 4) / 8
    torch.testing.assert_close(out.image_scores, (out.extras["image_score_text"] + unit_max) / 2)
    assert model.trainable is False and model.name == "sdp"
    assert not any(p.requires_grad for p in model.parameters())


def test_sdp_plus_trains_only_its_linear_layers_and_the_loss_decreases(plus):
    model = plus
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"linears.{i}.{k}" for i in range(4) for k in ("weight", "bias")}
    assert model.linears[0].in_features == 64 and model.linears[0].out_features == 48  # width -> embed
    images = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    masks = torch.zeros(2, 64, 64)
    masks[0, 16:40, 16:40] = 1
    batch = {"image": images, "mask": masks, "category": ["bottle"] * 2}
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(6):
        out = model(images, batch["category"])
        loss = model.loss(out, batch)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    probs = out.extras["layer_probs"]
    assert probs.shape == (2, 4, 2, 64, 64)
    torch.testing.assert_close(probs.sum(2), torch.ones(2, 4, 64, 64))
    # map = affine image of SDP raw + sum of the layer maps, with T = 4 taps and L = 4 layers
    torch.testing.assert_close(out.anomaly_map, (out.extras["raw_map"] + 4) / 12, rtol=1e-5, atol=1e-6)
    assert model.name == "sdp_plus" and model.trainable
    state = model.trainable_state_dict()
    assert set(state) == trainable


def test_resizes_to_input_size_and_loss_resizes_the_mask():
    model = S.build_plus(S.SdpPlusConfig(**{**TINY, "input_size": 48}), image_size=80)
    out = model(torch.randn(1, 3, 80, 80), ["screw"])
    assert out.anomaly_map.shape == (1, 80, 80) and out.extras["layer_probs"].shape[-1] == 48
    assert torch.isfinite(model.loss(out, {"mask": torch.ones(1, 80, 80)})["loss"])


def test_config_errors():
    with pytest.raises(ConfigError, match="stage_starts"):
        S.SdpConfig(stage_starts=[2, 5])
    with pytest.raises(ConfigError, match="image_score"):
        S.SdpConfig(image_score="min")
    with pytest.raises(ConfigError, match="do not exist"):
        S.build(S.SdpConfig(**{**TINY, "layers": [3, 6]}), image_size=64)


@pytest.mark.slow
@pytest.mark.parametrize("builder,cfg", [(S.build, S.SdpConfig), (S.build_plus, S.SdpPlusConfig)])
def test_real_architecture_random_weights(builder, cfg):
    model = builder(cfg(pretrained=None), image_size=240)
    assert model.stage_starts == [1, 4, 7, 10] and model.grid == 15
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # random text embeddings may form no DBSCAN cluster
        out = model(torch.randn(1, 3, 240, 240), ["bottle"])
    assert out.anomaly_map.shape == (1, 240, 240)
    if cfg is S.SdpPlusConfig:
        assert model.linears[0].in_features == 896 and model.linears[0].out_features == 640


def test_defaults_are_the_reference_profile():
    """CLIP-AD's code: in-place tap aliasing, float16 class vectors, per-category min-max image
    score, the category name verbatim (5bcc1b0 had aliasing off, float32 text, a per-batch mean)."""
    config = S.SdpConfig()
    assert (config.reference_aliasing, config.text_fp16, config.image_score, config.object_name) == (
        True, True, "category_minmax", "raw")
    assert (config.fit_dbscan_eps, config.fit_dbscan_min_samples) == (None, None)


def test_text_fp16_rounds_the_cluster_mean_in_float16():
    g = torch.Generator().manual_seed(0)
    data = F.normalize(torch.randn(40, 16, generator=g) * 0.05 + torch.ones(16), dim=-1)
    mean = data.mean(0)
    half = mean.half()
    expected = (half / half.norm()).float()
    got = S.dbscan_class_vector(data, eps=1.0, min_samples=2, fp16=True)
    assert torch.equal(got, expected)  # the reference's cast, bit for bit
    assert torch.equal(got.half().float(), got)  # float16-representable
    unrounded = S.dbscan_class_vector(data, eps=1.0, min_samples=2, fp16=False)
    assert not torch.equal(got, unrounded)
    torch.testing.assert_close(unrounded, F.normalize(mean, dim=0))


def test_fit_uses_the_training_dataset_dbscan_settings(monkeypatch):
    """SDP+ fit builds its class vectors with fit_dbscan_* (CLIP-AD train.py: the TRAINING
    dataset's name), test with dbscan_*; the two are cached apart."""
    model = S.build_plus(S.SdpPlusConfig(**{**TINY, "fit_dbscan_eps": 0.7, "fit_dbscan_min_samples": 3}), image_size=64)
    seen = []
    real = S.dbscan_class_vector

    def spy(embeddings, *, eps, min_samples, fp16=False):
        seen.append((eps, min_samples))
        return real(embeddings, eps=eps, min_samples=min_samples, fp16=fp16)

    monkeypatch.setattr(S, "dbscan_class_vector", spy)
    model.train()
    assert model.dbscan_settings() == (0.7, 3)
    model.text_features(["bottle"])
    model.eval()
    assert model.dbscan_settings() == (1.5, 5)
    model.text_features(["bottle"])
    model.train()
    model.text_features(["bottle"])  # cached: no new DBSCAN
    assert seen == [(0.7, 3), (0.7, 3), (1.5, 5), (1.5, 5)]


def test_loss_binarises_the_resized_mask():
    """CLIP-AD resizes the mask to the input size as PIL does (antialiased bilinear) and
    thresholds it at 0.5 (5bcc1b0: torch bilinear without antialiasing)."""
    from clipsam.losses import dice_loss, focal_loss

    model = S.build_plus(S.SdpPlusConfig(**{**TINY, "input_size": 48}), image_size=80)
    out = model(torch.randn(1, 3, 80, 80, generator=torch.Generator().manual_seed(4)), ["screw"])
    mask = torch.zeros(1, 80, 80)
    mask[0, 10:47, 21:60] = 1  # edges fall between input pixels: the resize gives fractions
    mask[0, 50:70, 14] = 1  # a one-pixel scratch: kept by point sampling, thinned by PIL's filter
    small = F.interpolate(mask[:, None], size=(48, 48), mode="bilinear", align_corners=False, antialias=True)[:, 0]
    assert ((small > 0) & (small < 1)).any()
    binary = (small > 0.5).float()
    probs = out.extras["layer_probs"]
    expected = sum(focal_loss(probs[:, i], binary) + dice_loss(probs[:, i, 1], binary) for i in range(4))
    got = model.loss(out, {"mask": mask})["loss"]
    torch.testing.assert_close(got, expected)
    plain = F.interpolate(mask[:, None], size=(48, 48), mode="bilinear", align_corners=False)[:, 0]
    assert not torch.equal(plain > 0.5, small > 0.5)
    old = sum(focal_loss(probs[:, i], plain) + dice_loss(probs[:, i, 1], plain) for i in range(4))
    assert abs(float((got - old).detach())) > 1e-6


def test_category_image_scores_follow_the_setting():
    model = S.build(S.SdpConfig(**TINY), image_size=64)
    out = model(torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(6)), ["a"] * 3)
    parts = out.extras["image_score_parts"]
    assert parts.shape == (3, 2)
    torch.testing.assert_close(parts[:, 0], out.extras["image_score_text"])
    torch.testing.assert_close(parts[:, 1], out.extras["image_score_map_max"])
    expected = S.category_minmax_image_scores(parts[:, 0], parts[:, 1], ["a"] * 3)
    torch.testing.assert_close(model.category_image_scores(parts), expected)
    model.config.image_score = "mean"
    assert model.category_image_scores(parts) is None
