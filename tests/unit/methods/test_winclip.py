"""WinCLIP: window masks, harmonic aggregation and scale fusion on hand-worked cases; window
embeddings against an attention-masked full pass; the producer end to end on the tiny preset."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from clipsam.errors import ConfigError, WeightsError
from clipsam.methods import winclip as W
from clipsam.methods.base import MapOutput


def _config(**overrides) -> W.WinClipConfig:
    base = dict(model_name="clipsam-tiny-240", pretrained=None, input_size=None)
    base.update(overrides)
    return W.WinClipConfig(**base)


@pytest.fixture(scope="module")
def model() -> W.WinClip:
    return W.build(_config(), image_size=64)  # runs at 64 px: a 4 x 4 patch grid


def test_window_masks_by_hand():
    # 3 x 3 grid, 2 x 2 windows at stride 1: four windows, patch indices row-major.
    masks = W.window_masks((3, 3), 2)
    assert masks.tolist() == [[0, 1, 3, 4], [1, 2, 4, 5], [3, 4, 6, 7], [4, 5, 7, 8]]
    # 4 x 4 grid, stride 2: windows at (0,0), (0,2), (2,0), (2,2).
    assert W.window_masks((4, 4), 2, stride=2).tolist() == [[0, 2, 8, 10], [1, 3, 9, 11], [4, 6, 12, 14], [5, 7, 13, 15]]
    # 15 x 15 grid (240 px / 16): 196 windows of 2 x 2 and 169 of 3 x 3 (BASELINES.md).
    assert W.window_masks((15, 15), 2).shape == (4, 196)
    assert W.window_masks((15, 15), 3).shape == (9, 169)
    with pytest.raises(ConfigError, match="does not fit"):
        W.window_masks((2, 2), 3)


def test_harmonic_aggregation_by_hand():
    scores = torch.tensor([[1.0, 0.75, 0.5, 0.25], [0.5, 0.5, 0.5, 0.5]])
    got = W.harmonic_aggregation(scores, W.window_masks((3, 3), 2), (3, 3))
    inv = [1.0, 4 / 3, 2.0, 4.0]  # 1 / score of windows 0..3 (first image)
    covering = [[0], [0, 1], [1], [0, 2], [0, 1, 2, 3], [1, 3], [2], [2, 3], [3]]
    expected = torch.tensor([len(c) / sum(inv[m] for m in c) for c in covering]).reshape(3, 3)
    torch.testing.assert_close(got[0], expected)
    assert expected[1, 1].item() == pytest.approx(0.48)  # 4 / (1 + 4/3 + 2 + 4)
    torch.testing.assert_close(got[1], torch.full((3, 3), 0.5))  # equal scores: their value
    # a zero-score window zeroes the patches it covers (harmonic mean), not the others
    zero = W.harmonic_aggregation(torch.tensor([[0.0, 1.0, 1.0, 1.0]]), W.window_masks((3, 3), 2), (3, 3))
    assert zero[0, 0, 0] == 0 and zero[0, 1, 1] == 0 and zero[0, 2, 2] == 1


def test_fuse_scales_folds_image_score_harmonically():
    m2 = torch.full((1, 2, 2), 0.5)
    m3 = torch.full((1, 2, 2), 0.25)
    s0 = torch.tensor([1.0])
    torch.testing.assert_close(W.fuse_scales([m2, m3], s0), torch.full((1, 2, 2), 3 / (2 + 4 + 1)))
    torch.testing.assert_close(W.fuse_scales([m2, m3], None), torch.full((1, 2, 2), 2 / (2 + 4)))


def test_zero_shot_scores_by_hand():
    text = torch.tensor([[[2.0, 0.0], [0.0, 3.0]]])  # t_n, t_a orthogonal, not unit
    emb = torch.tensor([[[0.0, 5.0], [1.0, 0.0], [1.0, 1.0]]])
    got = W.zero_shot_scores(emb, text, 0.07)
    sig = lambda z: 1 / (1 + math.exp(-z))
    torch.testing.assert_close(got, torch.tensor([[sig(1 / 0.07), sig(-1 / 0.07), 0.5]]))


def test_prompt_ensemble_sizes():
    prompts = W.build_prompts("metal nut")
    assert len(prompts["normal"]) == 7 * 21 and len(prompts["anomalous"]) == 4 * 21
    assert prompts["anomalous"][0] == "a cropped photo of the damaged metal nut."
    assert not any("broken" in p for p in prompts["anomalous"])


def test_window_embedding_equals_masked_full_pass(model):
    """A window's embedding = the class token of a full pass in which every token may only
    attend to the class token and that window's patches (an independent computation)."""
    images = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    image, windows = model.encode(images)
    visual = model.visual
    torch.testing.assert_close(image, model.clip.encode_image(images))
    masks = model.masks[1]  # 3 x 3 windows on the 4 x 4 grid: 4 windows
    for m in range(masks.shape[1]):
        keep = torch.cat([torch.tensor([0]), masks[:, m] + 1])
        allowed = torch.zeros(17, dtype=torch.bool)
        allowed[keep] = True
        attn_mask = torch.zeros(17, 17).masked_fill(~allowed[None, :], float("-inf"))
        x = visual.transformer(visual._embeds(images), attn_mask=attn_mask)
        expected = visual.ln_post(x[:, 0]) @ visual.proj
        torch.testing.assert_close(windows[1][:, m], expected, rtol=1e-4, atol=1e-5)


def test_forward_end_to_end(model):
    images = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    out = model(images, ["metal_nut", "bottle"])
    assert isinstance(out, MapOutput)
    assert out.anomaly_map.shape == (2, 64, 64) and out.anomaly_map.dtype == torch.float32
    assert 0 <= out.anomaly_map.min() and out.anomaly_map.max() <= 1
    # image score = s0 computed from open_clip's own encoders
    text = torch.stack([model.clip.encode_text(model.tokenizer(W.build_prompts(n)[k])).mean(0)
                        for n in ("metal nut",) for k in ("normal", "anomalous")])
    cos = F.normalize(model.clip.encode_image(images[:1]), dim=-1) @ F.normalize(text, dim=-1).t()
    torch.testing.assert_close(out.image_scores[0], (cos / 0.07).softmax(-1)[0, 1], rtol=1e-4, atol=1e-5)
    # the map is the harmonic fusion of the scale maps and s0, upsampled
    fused = W.fuse_scales(list(out.extras["scale_maps"].unbind(1)), out.image_scores)
    up = F.interpolate(fused[:, None], size=(64, 64), mode="bilinear", align_corners=False)[:, 0]
    torch.testing.assert_close(out.anomaly_map, up)
    assert not any(p.requires_grad for p in model.parameters())
    assert model.trainable is False and model.name == "winclip"
    with pytest.raises(NotImplementedError, match="training-free"):
        model.loss(out, {})


def test_resizes_to_its_input_size_and_returns_the_frame():
    model = W.build(_config(input_size=48), image_size=80)
    assert model.grid == (3, 3)
    out = model(torch.randn(1, 3, 80, 80), ["screw"])
    assert out.anomaly_map.shape == (1, 80, 80)


def test_train_mode_keeps_backbone_in_eval(model):
    model.train()
    assert model.training and not model.clip.training
    model.eval()


def test_config_errors():
    with pytest.raises(ConfigError, match="model.method_config.scales"):
        W.WinClipConfig(scales=[])
    with pytest.raises(ConfigError, match="does not fit"):
        W.build(_config(scales=[5]), image_size=64)
    with pytest.raises(ConfigError, match="model.method_config.pretrained=null"):
        W.build(_config(pretrained="laion400m_e31"), image_size=64)


def test_unknown_tag_is_a_weights_error():
    with pytest.raises(WeightsError, match="model.method_config.pretrained"):
        W.build(W.WinClipConfig(pretrained="no_such_tag"), image_size=240)


@pytest.mark.slow
def test_real_architecture_random_weights():
    model = W.build(W.WinClipConfig(pretrained=None), image_size=240)
    assert model.grid == (15, 15) and [m.shape[1] for m in model.masks] == [196, 169]
    out = model(torch.randn(1, 3, 240, 240), ["bottle"])
    assert out.anomaly_map.shape == (1, 240, 240)
