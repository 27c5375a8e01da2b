"""CLIP stage on the tiny preset: freezing, shapes/ranges, text cache, adapter checkpoints, errors."""

from __future__ import annotations

import copy
import dataclasses
import io
import os
import time

import numpy as np
import pytest
import torch
from scipy import ndimage

from clipsam.errors import ConfigError, WeightsError
from clipsam.models.clip import (
    ClipAnomalyModel,
    ClipConfig,
    ClipOutput,
    MixedPrecisionLayerNorm,
    build_clip_model,
    gaussian_blur,
    global_image_scores,
    upsample_layer_probs,
)

IMAGE_SIZE = 64  # 4 x 4 patch grid with the tiny preset's 16-px patches


def _config(**overrides) -> ClipConfig:
    base = dict(model_name="clipsam-tiny", pretrained=None, layers=[1, 2, 3, 4], frozen_dtype="float32")
    base.update(overrides)
    return ClipConfig(**base)


def _build(**overrides) -> ClipAnomalyModel:
    return build_clip_model(_config(**overrides), image_size=IMAGE_SIZE)


def _images(batch: int = 2, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, 3, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def shared() -> ClipAnomalyModel:
    return _build()


@pytest.fixture
def model(shared) -> ClipAnomalyModel:
    """A private copy of the shared tiny model (text cache included), safe to mutate."""
    return copy.deepcopy(shared)


def _variant(model: ClipAnomalyModel, **changes) -> ClipAnomalyModel:
    """The same weights with other map options (they are read from the config at forward)."""
    variant = copy.deepcopy(model)
    variant.config = dataclasses.replace(model.config, **changes)
    return variant


def test_only_adapters_require_grad(model):
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"adapters.{i}.{k}" for i in range(4) for k in ("weight", "bias")}
    assert all(not p.requires_grad for p in model.clip.parameters())
    assert model.adapter_shapes == [(64, 64)] * 4


def test_frozen_model_stays_in_eval_mode(model):
    model.train()
    assert model.training and model.adapters.training
    assert not model.clip.training
    assert not any(m.training for m in model.clip.modules())
    parent = torch.nn.ModuleDict({"clip": model})
    parent.train()
    assert not model.clip.training
    model.eval()


def test_no_hooks_left_registered(model):
    model(_images(1), ["disk"])
    for module in model.modules():
        assert not module._forward_hooks and not module._forward_pre_hooks


def test_output_shapes_ranges_and_dtypes(model):
    out = model(_images(2), ["metal_nut", "pcb1"])
    assert isinstance(out, ClipOutput)
    assert out.layer_probs.shape == (2, 4, 2, IMAGE_SIZE, IMAGE_SIZE)
    assert out.anomaly_map.shape == (2, IMAGE_SIZE, IMAGE_SIZE)
    assert out.image_scores.shape == (2,)
    for t in (out.layer_probs, out.anomaly_map, out.image_scores):
        assert t.dtype == torch.float32
    torch.testing.assert_close(out.layer_probs.sum(dim=2), torch.ones(2, 4, IMAGE_SIZE, IMAGE_SIZE))
    assert out.anomaly_map.min() >= 0 and out.anomaly_map.max() <= 1
    torch.testing.assert_close(out.image_scores, out.anomaly_map.flatten(1).amax(1))


def test_bfloat16_blocks_keep_layernorm_and_residual_stream_in_float32():
    bf16 = _build(frozen_dtype="bfloat16")
    visual = bf16.clip.visual
    for block in visual.transformer.resblocks:
        assert block.attn.in_proj_weight.dtype == torch.bfloat16
        assert block.mlp.c_fc.weight.dtype == torch.bfloat16
        assert isinstance(block.ln_1, MixedPrecisionLayerNorm) and block.ln_1.weight.dtype == torch.float32
    for p in (visual.conv1.weight, visual.positional_embedding, visual.ln_pre.weight, visual.ln_post.weight, visual.proj):
        assert p.dtype == torch.float32
    assert all(p.dtype == torch.float32 for p in bf16.clip.transformer.parameters())  # text tower
    # The residual stream itself is float32 between blocks.
    out = visual.forward_intermediates(_images(1), indices=[0, 1, 2, 3], intermediates_only=True, output_fmt="NLC")
    assert all(t.dtype == torch.float32 for t in out["image_intermediates"])

    # One block by hand: LayerNorm in float32, sublayer input rounded to bf16, bf16 sublayer,
    # its output added to the float32 stream.
    block = visual.transformer.resblocks[1]
    x = torch.randn(2, 17, 64, generator=torch.Generator().manual_seed(1))

    def ln(norm, t):
        return torch.nn.functional.layer_norm(t, norm.normalized_shape, norm.weight, norm.bias, norm.eps)

    with torch.no_grad():
        h = ln(block.ln_1, x).to(torch.bfloat16)
        expected = x + block.attn(h, h, h, need_weights=False)[0]
        expected = expected + block.mlp(ln(block.ln_2, expected).to(torch.bfloat16))
        got = block(x)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, expected, rtol=0, atol=0)

    fp32 = _build(frozen_dtype="float32")
    images = _images(2)
    a, b = fp32(images, ["disk", "disk"]), bf16(images, ["disk", "disk"])
    assert b.layer_probs.dtype == torch.float32 and b.anomaly_map.dtype == torch.float32
    assert b.anomaly_map.min() >= 0 and b.anomaly_map.max() <= 1
    assert (a.anomaly_map - b.anomaly_map).abs().max() < 0.05


def test_upsampling_logits_then_softmax_by_hand():
    # 2 x 2 grid -> 3 x 3 frame, align_corners=True: corners are the patches, the centre is the
    # mean of the four; logits first: softmax of the mean logits; probs first: mean of softmaxes.
    logits = torch.tensor([[[0.0, 4.0], [0.0, 0.0], [2.0, 0.0], [0.0, -6.0]]])  # (1, N=4, 2)
    up = upsample_layer_probs(logits, (2, 2), (3, 3), "logits")
    assert up.shape == (1, 2, 3, 3)
    centre = torch.tensor([0.5, -0.5])  # mean logits (normal, anomalous)
    torch.testing.assert_close(up[0, :, 1, 1], centre.softmax(0))
    torch.testing.assert_close(up[0, 1, 0, 0], torch.sigmoid(torch.tensor(4.0)))
    torch.testing.assert_close(up[0, 1, 0, 1], torch.sigmoid(torch.tensor(2.0)))  # mean of (4, 0) minus mean of (0, 0)
    probs = upsample_layer_probs(logits, (2, 2), (3, 3), "probs")
    torch.testing.assert_close(probs[0, :, 1, 1], logits[0].softmax(-1).mean(0))
    assert not torch.allclose(probs[0, :, 1, 1], up[0, :, 1, 1])
    torch.testing.assert_close(up.sum(1), torch.ones(1, 3, 3))


@pytest.mark.parametrize("mode", ["logits", "probs"])
def test_forward_uses_the_configured_upsampling(model, mode):
    variant = _variant(model, upsample=mode, smoothing_sigma=0.0)
    images, cats = _images(2), ["disk", "pcb1"]
    out = variant(images, cats)
    tokens = variant.patch_tokens(images)
    text = variant.text_features(cats)
    for layer, (adapter, t) in enumerate(zip(variant.adapters, tokens)):
        logits = 100.0 * torch.bmm(torch.nn.functional.normalize(adapter(t), dim=-1), text)  # (B, 16, 2)
        grid = logits.transpose(1, 2).reshape(2, 2, 4, 4)
        if mode == "logits":
            expected = torch.nn.functional.interpolate(grid, size=(IMAGE_SIZE, IMAGE_SIZE), mode="bilinear", align_corners=True).softmax(1)
        else:
            expected = torch.nn.functional.interpolate(grid.softmax(1), size=(IMAGE_SIZE, IMAGE_SIZE), mode="bilinear", align_corners=True)
        torch.testing.assert_close(out.layer_probs[:, layer], expected)
    torch.testing.assert_close(out.anomaly_map, out.layer_probs[:, :, 1].mean(1))


def test_clip_global_image_score_is_the_cls_zero_shot_score(model):
    variant = _variant(model, image_score="clip_global")
    images, cats = _images(2), ["disk", "capsule"]
    out = variant(images, cats)
    with torch.no_grad():
        cls = variant.clip.encode_image(images)  # open_clip's own path: ln_post(CLS) @ proj
    cls = cls / cls.norm(dim=-1, keepdim=True)
    text = variant.text_features(cats)
    expected = torch.stack([(100.0 * cls[i] @ text[i]).softmax(-1)[1] for i in range(2)])
    torch.testing.assert_close(out.image_scores, expected)
    torch.testing.assert_close(global_image_scores(cls * 3.0, text), expected)  # scale-free
    # The maps are those of the map-reduction path.
    torch.testing.assert_close(out.anomaly_map, model(images, cats).anomaly_map)


def test_map_options(model):
    images, cats = _images(1), ["disk"]
    raw = _variant(model, smoothing_sigma=0.0)(images, cats)
    combined = raw.layer_probs[:, :, 1].mean(1)
    torch.testing.assert_close(raw.anomaly_map, combined)
    smooth = _variant(model, smoothing_sigma=4.0)(images, cats)
    torch.testing.assert_close(smooth.anomaly_map, gaussian_blur(combined, 4.0))
    summed = _variant(model, smoothing_sigma=0.0, layer_combine="sum")(images, cats)
    torch.testing.assert_close(summed.anomaly_map, raw.layer_probs[:, :, 1].sum(1))
    mean_score = _variant(model, image_score="mean")(images, cats)
    torch.testing.assert_close(mean_score.image_scores, mean_score.anomaly_map.mean((1, 2)))
    topk = _variant(model, image_score="topk_mean", topk_fraction=0.01)(images, cats)
    k = int(np.ceil(0.01 * IMAGE_SIZE * IMAGE_SIZE))
    torch.testing.assert_close(topk.image_scores, topk.anomaly_map.flatten(1).topk(k, 1).values.mean(1))


def test_gaussian_blur_matches_scipy():
    maps = torch.rand(2, 21, 30, generator=torch.Generator().manual_seed(0))
    for sigma in (1.0, 4.0, 9.0):  # 9: radius 36 exceeds the image size
        expected = np.stack([ndimage.gaussian_filter(m.double().numpy(), sigma) for m in maps])
        np.testing.assert_allclose(gaussian_blur(maps, sigma).numpy(), expected, atol=1e-6)
    assert gaussian_blur(maps, 0.0) is maps


def test_text_features_computed_once_per_category(model):
    model.clear_text_cache()
    calls = {"tokenize": 0, "encode": 0, "prompts": []}
    tokenizer, encode_text = model.tokenizer, model.clip.encode_text

    def counting_tokenizer(texts):
        calls["tokenize"] += 1
        calls["prompts"].append(len(texts))
        return tokenizer(texts)

    def counting_encode(tokens):
        calls["encode"] += 1
        return encode_text(tokens)

    model.tokenizer = counting_tokenizer
    model.clip.encode_text = counting_encode
    for _ in range(3):
        model(_images(3), ["disk", "capsule", "disk"])
    assert calls["tokenize"] == 2 and calls["encode"] == 2
    assert calls["prompts"] == [245 + 175] * 2
    feats = model.text_features(["disk"])
    assert feats.shape == (1, 64, 2)
    torch.testing.assert_close(feats.norm(dim=1), torch.ones(1, 2))
    assert calls["encode"] == 2

    generic = _variant(model, object_name="generic")
    generic.clear_text_cache()
    count = {"n": 0}
    inner = generic.clip.encode_text

    def count_generic(tokens):
        count["n"] += 1
        return inner(tokens)

    generic.clip.encode_text = count_generic
    generic(_images(2), ["disk", "capsule"])
    generic(_images(2), ["fabric", "mesh"])
    assert count["n"] == 1


def test_text_cache_filled_under_inference_mode_still_trains(model):
    model.clear_text_cache()
    with torch.inference_mode():
        model(_images(1), ["disk"])  # e.g. Lightning's sanity-check validation fills the cache
    out = model(_images(1), ["disk"])
    anomaly_loss_value = out.layer_probs[:, :, 1].mean()
    anomaly_loss_value.backward()
    assert model.adapters[0].weight.grad is not None


def test_only_adapters_change_after_adam_step(model):
    from clipsam.losses import anomaly_loss

    model.train()
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    masks = torch.zeros(2, IMAGE_SIZE, IMAGE_SIZE)
    masks[:, 20:40, 10:30] = 1
    out = model(_images(2), ["disk", "capsule"])
    anomaly_loss(out.layer_probs, masks)["loss"].backward()
    optimizer.step()
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == {f"adapters.{i}.{k}" for i in range(4) for k in ("weight", "bias")}
    assert not model.clip.training


def test_adapter_state_dict_round_trips_to_identical_maps(tmp_path):
    trained = _build(seed=1)
    with torch.no_grad():
        for p in trained.adapters.parameters():
            p.add_(0.05 * torch.randn_like(p))
    path = tmp_path / "adapters.pt"
    torch.save(trained.adapter_state_dict(), path)
    fresh = _build(seed=1)
    before = fresh(_images(2), ["disk", "hexnut"]).anomaly_map
    fresh.load_adapter_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    images = _images(2)
    expected = trained(images, ["disk", "hexnut"])
    got = fresh(images, ["disk", "hexnut"])
    assert torch.equal(got.anomaly_map, expected.anomaly_map)
    assert torch.equal(got.layer_probs, expected.layer_probs)
    assert not torch.equal(before, got.anomaly_map)
    assert set(trained.adapter_state_dict()) == {f"{i}.{k}" for i in range(4) for k in ("weight", "bias")}


def test_loading_adapters_of_another_width_raises(model):
    foreign = {}
    for i in range(4):
        foreign[f"{i}.weight"] = torch.zeros(512, 768)
        foreign[f"{i}.bias"] = torch.zeros(512)
    with pytest.raises(WeightsError, match=r"768->512.*model.clip.model_name=clipsam-tiny needs 64->64.*another backbone"):
        model.load_adapter_state_dict(foreign)
    three = {k: v for k, v in model.adapter_state_dict().items() if not k.startswith("3.")}
    with pytest.raises(WeightsError, match="model.clip.layers"):
        model.load_adapter_state_dict(three)
    model.load_adapter_state_dict(three, strict=False)  # partial load allowed when asked


def test_checkpoint_sizes_for_vit_l_and_tiny(model):
    # ViT-L-14-336: token width 1024 -> embed 768, 4 tapped layers, float32.
    n_params = 4 * (1024 * 768 + 768)
    adapter_bytes = 4 * n_params
    assert adapter_bytes == 12_595_200  # ~12.6 MB: "about 13 MB"
    assert 12e6 < adapter_bytes < 13.5e6
    resume_bytes = 3 * adapter_bytes  # weights + Adam exp_avg + exp_avg_sq
    assert resume_bytes < 50e6

    # The same accounting holds for a real serialised training state of the tiny preset.
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    out = model(_images(1), ["disk"])
    out.layer_probs[:, :, 1].mean().backward()
    optimizer.step()
    tiny_params = sum(p.numel() for p in model.adapters.parameters())
    assert tiny_params == 4 * (64 * 64 + 64)
    buffer = io.BytesIO()
    torch.save({"adapters": model.adapter_state_dict(), "optimizer": optimizer.state_dict()}, buffer)
    payload = 3 * 4 * tiny_params
    assert payload <= buffer.getbuffer().nbytes < payload + 20_000  # + pickle/zip overhead only


def test_random_weights_are_seeded():
    a, b, c = _build(seed=3), _build(seed=3), _build(seed=4)
    wa, wb, wc = (m.clip.visual.conv1.weight for m in (a, b, c))
    assert torch.equal(wa, wb) and not torch.equal(wa, wc)
    state = torch.get_rng_state()
    _build(seed=5)
    assert torch.equal(state, torch.get_rng_state())  # global RNG untouched


def test_local_weights_file_loads_through_open_clip(tmp_path):
    source = _build(seed=7)
    path = tmp_path / "tiny.pt"
    torch.save(source.clip.state_dict(), path)
    loaded = _build(seed=8, pretrained=str(path))
    for (name, p), q in zip(source.clip.state_dict().items(), loaded.clip.state_dict().values()):
        assert torch.equal(p, q), name


def test_offline_pretrained_without_cache_raises_quickly(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.perf_counter()
    with pytest.raises(WeightsError) as info:
        build_clip_model(
            ClipConfig(model_name="ViT-B-16", pretrained="openai", layers=[3, 6, 9, 12], cache_dir=str(tmp_path)),
            image_size=224,
        )
    assert time.perf_counter() - start < 20
    message = str(info.value)
    assert "model.clip.cache_dir" in message and "model.clip.pretrained" in message
    assert "internet" in message


def test_config_errors(tmp_path):
    with pytest.raises(WeightsError, match="not-a-tag"):
        build_clip_model(ClipConfig(model_name="ViT-B-16", pretrained="not-a-tag", layers=[1]), image_size=224)
    with pytest.raises(ConfigError, match="model.clip.model_name"):
        build_clip_model(ClipConfig(model_name="ViT-Nope-99", pretrained=None, layers=[1]), image_size=224)
    with pytest.raises(ConfigError, match="model.clip.pretrained=null"):
        build_clip_model(_config(pretrained="openai"), image_size=IMAGE_SIZE)
    with pytest.raises(ConfigError, match="4 transformer blocks"):
        _build(layers=[2, 5])
    with pytest.raises(ConfigError, match="model.clip.layers"):
        _config(layers=[0, 1])
    with pytest.raises(ConfigError, match="strictly increasing"):
        _config(layers=[2, 1])
    with pytest.raises(ConfigError, match="model.clip.frozen_dtype"):
        _config(frozen_dtype="int8")
    with pytest.raises(ConfigError, match="model.clip.layer_combine"):
        _config(layer_combine="max")
    with pytest.raises(ConfigError, match="model.clip.upsample"):
        _config(upsample="nearest")
    with pytest.raises(ConfigError, match="model.clip.image_score.*clip_global"):
        _config(image_score="cls")
    with pytest.raises(ConfigError, match="model.clip.object_name"):
        _config(object_name="cleaned")
    with pytest.raises(ConfigError, match="patch size"):
        _build()(torch.zeros(1, 3, 60, 60), ["disk"])


def test_presets_register_lazily():
    import open_clip

    from clipsam.models.presets import register_tiny_configs

    assert "clipsam-tiny" in register_tiny_configs()
    assert "clipsam-tiny" in open_clip.list_models()
    assert os.path.isfile(os.path.join(os.path.dirname(__file__), "..", "..", "..", "clipsam", "models", "model_configs", "clipsam-tiny.json"))
