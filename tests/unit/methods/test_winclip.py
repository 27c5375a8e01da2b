"""WinCLIP: window masks, harmonic aggregation and scale fusion on hand-worked cases; window
embeddings against an attention-masked full pass; the producer end to end on the tiny preset;
the object name anomalib writes (the category verbatim); WinCLIP+ (few-shot): the visual
association score, the few-shot map and its fusion by hand, and the producer with references."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from clipsam.errors import ConfigError, WeightsError
from clipsam.methods import winclip as W
from clipsam.methods.base import MapOutput


def _config(**overrides) -> W.WinClipConfig:
    base = {"model_name": "clipsam-tiny-240", "pretrained": None, "input_size": None}
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
    # 15 x 15 grid (240 px / 16): 196 windows of 2 x 2 and 169 of 3 x 3 (anomalib's WinCLIP).
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
                        for n in ("metal_nut",) for k in ("normal", "anomalous")])
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


# ---------------------------------------------------------------------- the object name
def test_default_prompts_write_the_category_verbatim(model):
    """anomalib writes the category as on disk ("a cropped photo of the metal_nut."); the old
    default ``category`` wrote "metal nut" (and "pcb" for pcb1)."""
    assert W.WinClipConfig().object_name == "raw"
    prompts = model.prompts("metal_nut")
    assert prompts["normal"][0] == "a cropped photo of the metal_nut."
    assert all("metal_nut" in p for p in prompts["normal"] + prompts["anomalous"])
    assert model.object_name("pcb1") == "pcb1"
    text = model.text_embeddings(["metal_nut"])[0]
    want = torch.stack([model.clip.encode_text(model.tokenizer(prompts[k])).mean(0) for k in ("normal", "anomalous")])
    torch.testing.assert_close(text, want)


# ---------------------------------------------------------------------- WinCLIP+ (few-shot)
def test_visual_association_scores_by_hand():
    # anomalib's docstring example of visual_association_score, worked out: f0 = (1,0,0) meets
    # r1 = (1,1,0)/sqrt2 at cos 1/sqrt2 -> (1 - 0.7071) / 2 = 0.1464; f1 = (0,1,0) equals r0 -> 0
    f = torch.tensor([[[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]])
    refs = torch.tensor([[[0.0, 1.0, 0.0], [1.0, 1.0, 0.0]]])  # (K=1, N=2, D): any position counts
    got = W.visual_association_scores(f, refs)
    torch.testing.assert_close(got, torch.tensor([[(1 - 2**-0.5) / 2, 0.0]]))
    # a reference equal to the query (at ANOTHER position, scaled) gives 0; opposite gives 1
    torch.testing.assert_close(W.visual_association_scores(torch.tensor([[[0.0, 2.0, 0.0]]]), refs), torch.zeros(1, 1))
    torch.testing.assert_close(W.visual_association_scores(torch.tensor([[[0.0, -1.0, 0.0]]]), refs[:, :1]), torch.ones(1, 1))
    # the minimum over references: cos 0 -> 0.5, cos 0.6 -> 0.2, cos -0.8 -> 0.9: 0.2
    refs3 = torch.tensor([[0.0, 1.0], [0.6, 0.8], [-0.8, 0.6]])
    torch.testing.assert_close(W.visual_association_scores(torch.tensor([[[1.0, 0.0]]]), refs3), torch.tensor([[0.2]]))
    # a feature that equals a reference up to rounding is exactly 0, never a negative distance
    e = torch.randn(1, 5, 7, generator=torch.Generator().manual_seed(3))
    assert W.visual_association_scores(e, e[0] * 3.0).min() == 0.0


def test_few_shot_map_and_fusion_by_hand():
    patch = torch.tensor([[[0.1, 0.2], [0.3, 0.4]]])
    m2 = torch.tensor([[[0.2, 0.2], [0.2, 0.8]]])
    m3 = torch.tensor([[[0.3, 0.5], [0.0, 0.6]]])
    few = W.few_shot_map(patch, [m2, m3])  # arithmetic mean of the patch level and the scales
    torch.testing.assert_close(few, torch.tensor([[[0.2, 0.3], [0.5 / 3, 0.6]]]))
    zero = torch.full((1, 2, 2), 0.4)
    fused, image = W.fuse_few_shot(zero, few, torch.tensor([0.3]))
    torch.testing.assert_close(fused, torch.tensor([[[0.3, 0.35], [(0.4 + 0.5 / 3) / 2, 0.5]]]))
    torch.testing.assert_close(image, torch.tensor([(0.3 + 0.6) / 2]))  # (s0 + max M_fs) / 2


@pytest.fixture(scope="module")
def few_shot_model() -> W.WinClip:
    return W.build(_config(k_shot=2), image_size=64)  # the same seeded weights as ``model``


def test_few_shot_forward_against_its_parts(model, few_shot_model):
    gen = torch.Generator().manual_seed(5)
    refs = torch.randn(2, 3, 64, 64, generator=gen)
    query = torch.randn(1, 3, 64, 64, generator=gen)
    few_shot_model.set_references("screw", {"image": refs})
    assert few_shot_model.references["screw"].count == 2
    images = torch.cat([refs[1:], query])  # the second reference itself, then a new image
    out = few_shot_model(images, ["screw", "screw"])
    zero = model(images, ["screw", "screw"])  # zero-shot with the same weights
    torch.testing.assert_close(out.extras["zero_shot_scores"], zero.image_scores)
    # a reference image is its own nearest reference everywhere: M_fs = 0, so map = M / 2, score = s0 / 2
    assert out.extras["few_shot_map"][0].abs().max() < 1e-6  # 0 up to float32 rounding of the batched pass
    torch.testing.assert_close(out.anomaly_map[0], zero.anomaly_map[0] / 2)
    torch.testing.assert_close(out.image_scores[0], zero.image_scores[0] / 2)
    # the new image: M_fs from the encoder's patch tokens and windows, as anomalib computes it
    _, windows, patches = model.encode_with_patches(query)
    _, ref_windows, ref_patches = model.encode_with_patches(refs)
    levels = [W.visual_association_scores(patches, ref_patches).reshape(1, 4, 4)]
    for w, r, m in zip(windows, ref_windows, model.masks):
        levels.append(W.harmonic_aggregation(W.visual_association_scores(w, r), m, model.grid))
    few = sum(levels) / len(levels)
    torch.testing.assert_close(out.extras["few_shot_map"][1], few[0])
    torch.testing.assert_close(out.image_scores[1], (zero.image_scores[1] + few.max()) / 2)
    up = F.interpolate(((out.extras["zero_shot_map"][1:] + few) / 2)[:, None], size=(64, 64), mode="bilinear", align_corners=False)
    torch.testing.assert_close(out.anomaly_map[1], up[0, 0].clamp(0, 1))
    # patch embeddings are the full pass's tokens after ln_post, not projected (width C, not D)
    assert patches.shape == (1, 16, model.visual.transformer.width)


def test_few_shot_needs_references_of_the_category(few_shot_model):
    with pytest.raises(ConfigError, match="k_shot=2 needs good reference images of category 'bottle'.*data.reference"):
        few_shot_model(torch.zeros(1, 3, 64, 64), ["bottle"])


def test_k_shot_is_the_reference_count():
    from clipsam import methods

    assert methods.method_reference_count("winclip", W.WinClipConfig()) == 0
    assert methods.method_reference_count("winclip", W.WinClipConfig(k_shot=4)) == 4
    assert methods.method_reference_count("april_gan", methods.method_config("april_gan")) == 0  # no hook: none
    for bad in (-1, 1.5, True):
        with pytest.raises(ConfigError, match="model.method_config.k_shot"):
            W.WinClipConfig(k_shot=bad)
