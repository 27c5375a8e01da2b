"""AnomalyCLIP: DPAM's dual path and the deep-prompt text tower against direct computations with
open_clip's own blocks, the loss on a hand-worked case, prompts-only training on the tiny preset."""

from __future__ import annotations

import math

import pytest
import torch

from clipsam.errors import ConfigError
from clipsam.losses import focal_loss
from clipsam.methods import anomalyclip as A
from clipsam.methods._openclip import vv_residual

TINY = dict(model_name="clipsam-tiny-240", pretrained=None, input_size=None, deep_prompt_depth=4, dpam_start=2)


@pytest.fixture(scope="module")
def model() -> A.AnomalyClip:
    return A.build(A.AnomalyClipConfig(**TINY), image_size=64)


def _intermediates(visual, images):
    inter = visual.forward_intermediates(images, intermediates_only=True, output_fmt="NLC", output_extra_tokens=True)
    return [visual._embeds(images)] + [
        torch.cat([c, t], dim=1) for c, t in zip(inter["image_intermediates_prefix"], inter["image_intermediates"])
    ]


def test_dpam_dual_path_equals_direct_computation(model):
    visual = model.visual
    images = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    o = _intermediates(visual, images)  # o_0 .. o_4
    blocks = visual.transformer.resblocks
    patch, global_feat = A.dpam_forward(visual, images, start=2, segmentation_layer=4)
    # s = o_1 + VV_2(ln_1(o_1)) + VV_3(ln_1(o_2)) + VV_4(ln_1(o_3)): inputs from the ORIGINAL path
    s = o[1] + vv_residual(blocks[1], o[1]) + vv_residual(blocks[2], o[2]) + vv_residual(blocks[3], o[3])
    torch.testing.assert_close(patch, visual.ln_post(s) @ visual.proj, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(global_feat, o[4][:, 0] @ visual.proj, rtol=1e-5, atol=1e-5)  # no ln_post
    assert not torch.allclose(global_feat, model.clip.encode_image(images), atol=1e-3)  # encode_image has it
    # a shallower segmentation layer stops the v-v sum there; the global feature still uses all blocks
    patch3, global3 = A.dpam_forward(visual, images, start=2, segmentation_layer=3)
    s3 = o[1] + vv_residual(blocks[1], o[1]) + vv_residual(blocks[2], o[2])
    torch.testing.assert_close(patch3, visual.ln_post(s3) @ visual.proj, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(global3, global_feat)


def test_learned_text_without_deep_prompts_equals_encode_text(model):
    clip = model.clip
    tokens = model.prompts.tokens
    got = A.encode_learned_text(clip, clip.token_embedding(tokens), tokens)
    torch.testing.assert_close(got, clip.encode_text(tokens), rtol=1e-5, atol=1e-5)


def test_deep_prompts_replace_tokens_before_blocks_two_on(model):
    clip = model.clip
    tokens = model.prompts.tokens
    deep = [torch.randn(4, 64, generator=torch.Generator().manual_seed(i)) for i in range(2)]
    got = A.encode_learned_text(clip, clip.token_embedding(tokens), tokens, deep)
    x = clip.token_embedding(tokens) + clip.positional_embedding
    for index, block in enumerate(clip.transformer.resblocks):
        if index in (1, 2):  # before text blocks 2 and 3 (1-based)
            x = x.clone()
            x[:, 1:5] = deep[index - 1]
        x = block(x, attn_mask=clip.attn_mask)
    x = clip.ln_final(x)
    expected = x[torch.arange(2), tokens.argmax(-1)] @ clip.text_projection
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_prompt_layout(model):
    tokens = model.prompts.tokens
    assert tokens[0, 0] == tokens[1, 0]  # [SOS]
    assert len(set(tokens[0, 1:13].tolist())) == 1  # 12 placeholder tokens replaced by the context
    assert model.prompts.embeddings().shape == (2, 32, 64)
    assert len(model.prompts.deep) == 3 and model.prompts.deep[0].shape == (4, 64)  # blocks 2..4


def test_loss_by_hand():
    probs = torch.full((1, 2, 2, 2), 0.5)
    gt = torch.zeros(1, 2, 2)
    out = A.anomalyclip_loss(probs, gt, torch.zeros(1, 2), torch.tensor([0]))
    focal = focal_loss(probs, gt)
    pt = 0.5 + 1e-5  # smoothed one-hot . probs + 1e-5
    assert focal.item() == pytest.approx(-(1 - pt) ** 2 * math.log(pt), rel=1e-4)
    dice_a = 1 - 1 / (2 + 0 + 1)  # (2 * 0 + 1) / (sum p 2 + sum gt 0 + 1)
    dice_n = 1 - (2 * 2 + 1) / (2 + 4 + 1)  # p_n against 1 - gt
    expected = 4 * (focal.item() + dice_a + dice_n) + math.log(2)
    assert out["loss"].item() == pytest.approx(expected, rel=1e-5)


def test_only_prompts_train_and_the_loss_decreases():
    model = A.build(A.AnomalyClipConfig(**TINY), image_size=64)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"prompts.ctx_normal", "prompts.ctx_anomalous", "prompts.deep.0", "prompts.deep.1", "prompts.deep.2"}
    assert set(model.trainable_state_dict()) == trainable
    images = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    masks = torch.zeros(2, 64, 64)
    masks[0, 8:40, 8:40] = 1
    batch = {"image": images, "mask": masks, "label": torch.tensor([1, 0]), "category": ["a", "b"]}
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=3e-3, betas=(0.5, 0.999))
    model.train()
    assert not model.clip.training
    losses = []
    for _ in range(8):
        out = model(images, batch["category"])
        loss = model.loss(out, batch)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    assert all(p.grad is None for p in model.clip.parameters())
    assert out.anomaly_map.shape == (2, 64, 64) and 0 <= out.anomaly_map.min() and out.anomaly_map.max() <= 1
    # the trained prompts load into a fresh model and give the same maps
    fresh = A.build(A.AnomalyClipConfig(**TINY), image_size=64)
    fresh.load_trainable_state_dict(model.trainable_state_dict())
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(fresh(images, ["a", "b"]).anomaly_map, model(images, ["a", "b"]).anomaly_map)


def test_resizes_to_input_size():
    model = A.build(A.AnomalyClipConfig(**{**TINY, "input_size": 48}), image_size=80)
    out = model(torch.randn(1, 3, 80, 80), ["x"])
    assert out.anomaly_map.shape == (1, 80, 80) and out.extras["probs"].shape == (1, 2, 48, 48)


def test_config_errors():
    with pytest.raises(ConfigError, match="deep_prompt_depth"):
        A.build(A.AnomalyClipConfig(**{**TINY, "deep_prompt_depth": 9}), image_size=64)
    with pytest.raises(ConfigError, match="segmentation_layers"):
        A.build(A.AnomalyClipConfig(**{**TINY, "dpam_start": 4, "segmentation_layers": [3]}), image_size=64)
    with pytest.raises(ConfigError, match="segmentation_layers"):
        A.build(A.AnomalyClipConfig(**{**TINY, "segmentation_layers": [4, 2]}), image_size=64)
    with pytest.raises(ConfigError, match="disagree"):
        A.AnomalyClipConfig(segmentation_layer=24, segmentation_layers=[6, 24])
    assert A.AnomalyClipConfig(segmentation_layer=12).segmentation_layers == [12]  # the old key still works
    with pytest.raises(ConfigError, match="text context"):
        A.build(A.AnomalyClipConfig(**{**TINY, "n_ctx": 40}), image_size=64)


@pytest.mark.slow
def test_real_architecture_random_weights():
    model = A.build(A.AnomalyClipConfig(pretrained=None), image_size=518)
    assert model.grid == 37 and model.segmentation_layers == [24]
    assert model.prompts.ctx_normal.shape == (12, 768) and len(model.prompts.deep) == 8
    out = model(torch.randn(1, 3, 518, 518), ["bottle"])
    assert out.anomaly_map.shape == (1, 518, 518)


def test_defaults_are_the_shipped_scripts():
    """train.sh / test.sh: one segmentation layer (the last); the deep prompts cast to float16."""
    config = A.AnomalyClipConfig()
    assert config.segmentation_layers is None and config.deep_prompt_fp16 is True
    assert A.build(A.AnomalyClipConfig(**TINY), image_size=64).segmentation_layers == [4]


def test_several_segmentation_layers_sum_their_maps_and_losses():
    """[2, 4]: raw map = Gaussian(sum of the layers' p_a), anomaly_map = raw / 2; the loss is
    lambda x the per-layer map terms summed, plus the image CE once (train.py)."""
    from clipsam.losses import dice_loss
    from clipsam.models.clip import gaussian_blur

    model = A.build(A.AnomalyClipConfig(**{**TINY, "segmentation_layers": [2, 4]}), image_size=64)
    single = A.build(A.AnomalyClipConfig(**TINY), image_size=64)
    images = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        out = model(images, ["x", "x"])
        last = single(images, ["x", "x"])
    layer_probs = out.extras["layer_probs"]
    assert layer_probs.shape == (2, 2, 2, 64, 64)
    torch.testing.assert_close(layer_probs[:, 1], last.extras["probs"])  # layer 4 = the single-layer model's
    raw = gaussian_blur(layer_probs[:, 0, 1] + layer_probs[:, 1, 1], model.config.smoothing_sigma)
    torch.testing.assert_close(out.extras["raw_map"], raw)
    torch.testing.assert_close(out.anomaly_map, (raw / 2).clamp(0, 1))
    torch.testing.assert_close(out.image_scores, last.image_scores)

    masks = torch.zeros(2, 64, 64)
    masks[0, 10:30, 20:40] = 1
    batch = {"mask": masks, "label": torch.tensor([1, 0])}
    losses = model.loss(out, batch)
    gt = masks
    map_terms = sum(
        focal_loss(layer_probs[:, i], gt) + dice_loss(layer_probs[:, i, 1], gt) + dice_loss(layer_probs[:, i, 0], 1 - gt)
        for i in range(2)
    )
    image_ce = torch.nn.functional.cross_entropy(out.extras["image_logits"], batch["label"])
    torch.testing.assert_close(losses["loss"], 4.0 * map_terms + image_ce)


def test_deep_prompt_fp16_rounds_the_spliced_prompts():
    """Forward: the same as feeding float16-rounded prompts in float32; backward: each sentence's
    gradient rounded to float16 before the two sentences are summed."""
    model = A.build(A.AnomalyClipConfig(**TINY), image_size=64)
    prompts = model.prompts
    deep = [p.detach().clone() * 7.3 + 0.01 for p in prompts.deep]  # values float16 cannot hold
    rounded = [d.half().float() for d in deep]
    assert any(not torch.equal(d, r) for d, r in zip(deep, rounded))
    args = (model.clip, prompts.embeddings().detach(), prompts.tokens)
    with torch.no_grad():
        cast = A.encode_learned_text(*args, deep, deep_prompt_fp16=True)
        by_hand = A.encode_learned_text(*args, rounded, deep_prompt_fp16=False)
        plain = A.encode_learned_text(*args, deep, deep_prompt_fp16=False)
    torch.testing.assert_close(cast, by_hand, rtol=0, atol=0)
    assert not torch.equal(cast, plain)
    leaf = deep[0].clone().requires_grad_(True)
    A.encode_learned_text(*args, [leaf, *deep[1:]], deep_prompt_fp16=True).sum().backward()
    grad = leaf.grad
    assert torch.equal(grad.half().float(), grad)  # the gradient passed through float16
