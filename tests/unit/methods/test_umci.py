"""UMCI map producer of ClipSAM-rec (clipsam.methods.umci): shapes, trainable set, learning, the branches by hand."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from clipsam.errors import ConfigError
from clipsam.methods import umci
from clipsam.methods.umci import UmciConfig, UmciLayer, UmciProducer, multiscale_pool, strip_interaction
from clipsam.models.clip import ClipConfig

IMAGE_SIZE = 64  # clipsam-tiny, patch 16: a 4 x 4 grid


def _config(**overrides) -> UmciConfig:
    clip = ClipConfig(model_name="clipsam-tiny", pretrained=None, layers=[1, 2, 3, 4], seed=0, smoothing_sigma=1.0, frozen_dtype="float32"
    )
    return UmciConfig(clip=clip, **overrides)


@pytest.fixture(scope="module")
def producer() -> UmciProducer:
    return umci.build(_config(), image_size=IMAGE_SIZE)


def _batch(seed: int = 0, batch: int = 2):
    gen = torch.Generator().manual_seed(seed)
    images = torch.randn(batch, 3, IMAGE_SIZE, IMAGE_SIZE, generator=gen)
    masks = torch.zeros(batch, IMAGE_SIZE, IMAGE_SIZE)
    masks[0, 8:30, 20:44] = 1.0
    return images, masks, ["bottle", "metal_nut"][:batch]


def test_forward_shapes_and_ranges(producer):
    images, _, names = _batch()
    out = producer(images, names)
    assert out.anomaly_map.shape == (2, IMAGE_SIZE, IMAGE_SIZE) and out.anomaly_map.dtype == torch.float32
    assert out.image_scores.shape == (2,)
    probs = out.extras["layer_probs"]
    assert probs.shape == (2, 4, 2, IMAGE_SIZE, IMAGE_SIZE)
    assert torch.allclose(probs.sum(2), torch.ones(2, 4, IMAGE_SIZE, IMAGE_SIZE), atol=1e-5)
    assert 0.0 <= float(out.anomaly_map.min().detach()) and float(out.anomaly_map.max().detach()) <= 1.0
    assert torch.allclose(out.image_scores, out.anomaly_map.flatten(1).amax(1))  # image_score "max"
    with pytest.raises(ConfigError, match="patch size"):
        producer(torch.zeros(1, 3, 60, 60), ["bottle"])


def test_only_umci_parameters_train(producer):
    trainable = {name for name, p in producer.named_parameters() if p.requires_grad}
    assert trainable and all(name.startswith("layers.") for name in trainable)
    assert trainable == set(producer.trainable_state_dict())
    assert not any(p.requires_grad for p in producer.backbone.parameters())
    expected = {f"layers.{i}.{part}" for i in range(4) for part in (
        "value.weight", "value.bias", "fuse.weight", "fuse.bias",
        "row_attention.in_proj_weight", "row_attention.in_proj_bias",
        "row_attention.out_proj.weight", "row_attention.out_proj.bias",
        "column_attention.in_proj_weight", "column_attention.in_proj_bias",
        "column_attention.out_proj.weight", "column_attention.out_proj.bias",
    )}
    assert trainable == expected
    producer.train()
    assert producer.layers.training and not producer.backbone.clip.training
    producer.eval()


def test_loss_decreases_on_a_tiny_batch(producer):
    model = copy.deepcopy(producer).train()
    images, masks, names = _batch(seed=3)
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    losses = []
    for _ in range(4):
        loss = model.loss(model(images, names), {"mask": masks})
        assert set(loss) == {"loss", "focal", "dice"}
        optimizer.zero_grad()
        loss["loss"].backward()
        optimizer.step()
        losses.append(loss["loss"].item())
    assert losses[-1] < 0.8 * losses[0], losses  # measured 5.67 -> 3.58 (lr 1e-3, 4 steps)
    # the zero-initialised branches received gradients and moved away from zero
    assert model.layers[0].fuse.weight.abs().sum() > 0
    assert model.layers[0].row_attention.out_proj.weight.abs().sum() > 0


def test_strip_interaction_against_a_direct_computation():
    torch.manual_seed(0)
    dim, heads, h, w = 16, 8, 3, 5
    rows_attn = nn.MultiheadAttention(dim, heads, batch_first=True)
    cols_attn = nn.MultiheadAttention(dim, heads, batch_first=True)
    values = torch.randn(2, dim, h, w)
    text = torch.randn(2, 2, dim)

    def attend(attn: nn.MultiheadAttention, queries: torch.Tensor, kv: torch.Tensor) -> torch.Tensor:
        wq, wk, wv = attn.in_proj_weight.chunk(3)
        bq, bk, bv = attn.in_proj_bias.chunk(3)
        q, k, v = queries @ wq.T + bq, kv @ wk.T + bk, kv @ wv.T + bv  # (Q, D), (2, D), (2, D)
        dh = dim // heads
        outs = []
        for head in range(heads):
            sl = slice(head * dh, (head + 1) * dh)
            weights = torch.softmax(q[:, sl] @ k[:, sl].T / math.sqrt(dh), dim=-1)  # (Q, 2)
            outs.append(weights @ v[:, sl])
        return torch.cat(outs, dim=1) @ attn.out_proj.weight.T + attn.out_proj.bias  # (Q, D)

    got = strip_interaction(values, text, rows_attn, cols_attn)
    assert got.shape == (2, dim, h, w)
    for b in range(2):
        row_means = values[b].mean(dim=2).T  # (h, D)
        col_means = values[b].mean(dim=1).T  # (w, D)
        rows = attend(rows_attn, row_means, text[b])  # (h, D)
        cols = attend(cols_attn, col_means, text[b])  # (w, D)
        for i in range(h):
            for j in range(w):
                assert torch.allclose(got[b, :, i, j], rows[i] + cols[j], atol=1e-5)


def test_multiscale_pool_by_hand():
    values = torch.arange(9, dtype=torch.float32).view(1, 1, 3, 3)  # [[0,1,2],[3,4,5],[6,7,8]]
    fuse = nn.Conv2d(3, 1, kernel_size=1)
    with torch.no_grad():
        fuse.weight.copy_(torch.tensor([1.0, 10.0, 100.0]).view(1, 3, 1, 1))  # k=1, k=3, k=5 channels
        fuse.bias.fill_(0.5)
    out = multiscale_pool(values, [1, 3, 5], fuse)
    # corner (0, 0): k=1 -> 0; k=3 -> mean(0,1,3,4) = 2; k=5 -> mean of all 9 = 4
    assert out[0, 0, 0, 0].item() == pytest.approx(0 + 10 * 2 + 100 * 4 + 0.5)
    # centre (1, 1): k=1 -> 4; k=3 -> 4; k=5 -> 4
    assert out[0, 0, 1, 1].item() == pytest.approx(4 + 40 + 400 + 0.5)
    # edge (0, 1): k=3 -> mean(0,1,2,3,4,5) = 2.5
    assert out[0, 0, 0, 1].item() == pytest.approx(1 + 25 + 400 + 0.5)


def test_zero_init_starts_from_v_and_switches_drop_branches():
    tokens = torch.randn(2, 16, 32)
    text = torch.randn(2, 2, 16)
    layer = UmciLayer(token_width=32, embed_dim=16, config=UmciConfig(num_heads=8))
    v = layer.value(tokens).transpose(1, 2).reshape(2, 16, 4, 4)
    assert torch.allclose(layer(tokens, text, (4, 4)), v)
    noisy = UmciLayer(token_width=32, embed_dim=16, config=UmciConfig(num_heads=8, zero_init=False))
    v2 = noisy.value(tokens).transpose(1, 2).reshape(2, 16, 4, 4)
    assert not torch.allclose(noisy(tokens, text, (4, 4)), v2)
    bare = UmciLayer(token_width=32, embed_dim=16, config=UmciConfig(strip=False, scale=False, zero_init=False))
    assert {n for n, _ in bare.named_parameters()} == {"value.weight", "value.bias"}
    with pytest.raises(ConfigError, match="num_heads"):
        UmciLayer(token_width=32, embed_dim=12, config=UmciConfig(num_heads=8))
    with pytest.raises(ConfigError, match="model.method_config.scales"):
        UmciConfig(scales=[2])
    assert umci.CONFIG is UmciConfig
    assert UmciConfig(clip={"model_name": "clipsam-tiny", "pretrained": None, "layers": [1]}).clip.layers == [1]


def test_clip_global_image_score_and_upsampling_follow_the_clip_keys(producer):
    from clipsam.models.clip import global_image_scores

    images, _, names = _batch()
    model = copy.deepcopy(producer).eval()
    model.config.clip.image_score = "clip_global"
    with torch.no_grad():
        out = model(images, names)
        _, pooled = model.backbone.encode_image(images, with_global=True)
        expected = global_image_scores(pooled, model.backbone.text_features(names), model.config.clip.logit_scale)
    assert torch.allclose(out.image_scores, expected)
    assert torch.allclose(model.score_maps(out.anomaly_map), out.anomaly_map.flatten(1).amax(1))  # fused maps: max
    model.config.clip.image_score = "max"
    model.config.clip.upsample = "probs"
    with torch.no_grad():
        probs_mode = model(images, names).extras["layer_probs"]
        model.config.clip.upsample = "logits"
        logits_mode = model(images, names).extras["layer_probs"]
    assert torch.allclose(probs_mode.sum(2), torch.ones_like(probs_mode[:, :, 0]), atol=1e-5)
    assert not torch.allclose(probs_mode, logits_mode)  # between patch centres the two differ
