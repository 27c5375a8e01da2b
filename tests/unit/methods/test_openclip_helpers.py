"""The shared v-v attention of DPAM / SDP against nn.MultiheadAttention, and weight errors."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from clipsam.errors import ConfigError, WeightsError
from clipsam.methods._openclip import build_open_clip, value_value_attention


def _mha(width: int = 12, heads: int = 3, seed: int = 0) -> nn.MultiheadAttention:
    torch.manual_seed(seed)
    mha = nn.MultiheadAttention(width, heads, batch_first=True)
    with torch.no_grad():
        mha.in_proj_weight.normal_()
        mha.in_proj_bias.normal_()
    return mha.eval()


def test_vv_attention_equals_mha_with_value_weights_as_query_and_key():
    """softmax(v v^T / sqrt(d)) v is ordinary attention whose q and k projections are the v one."""
    mha = _mha()
    x = torch.randn(2, 5, 12)
    got = value_value_attention(mha, x)
    oracle = _mha()
    with torch.no_grad():
        w, b = oracle.in_proj_weight, oracle.in_proj_bias
        w[:12], w[12:24] = w[24:].clone(), w[24:].clone()
        b[:12], b[12:24] = b[24:].clone(), b[24:].clone()
    expected = oracle(x, x, x, need_weights=False)[0]
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_vv_attention_direct_per_head():
    mha = _mha(width=8, heads=2, seed=3)
    x = torch.randn(1, 4, 8)
    v = x @ mha.in_proj_weight[16:].t() + mha.in_proj_bias[16:]
    heads = []
    for h in range(2):
        vh = v[0, :, 4 * h : 4 * h + 4]
        heads.append(torch.softmax(vh @ vh.t() / 2.0, dim=-1) @ vh)  # sqrt(4) = 2
    expected = mha.out_proj(torch.cat(heads, dim=-1))[None]
    torch.testing.assert_close(value_value_attention(mha, x), expected, rtol=1e-5, atol=1e-6)


def test_build_errors_name_the_key():
    with pytest.raises(ConfigError, match="model.method_config.model_name"):
        build_open_clip(section="model.method_config", model_name="no-such-model", pretrained=None, image_size=240)
    with pytest.raises(WeightsError, match="model.method_config.pretrained"):
        build_open_clip(section="model.method_config", model_name="ViT-B-16-plus-240", pretrained="nope", image_size=240)


def test_offline_without_cached_weights_says_where_to_put_them(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(WeightsError, match="cache_dir|local checkpoint"):
        build_open_clip(
            section="model.method_config",
            model_name="ViT-B-16-plus-240",
            pretrained="laion400m_e31",
            image_size=240,
            cache_dir=str(tmp_path),
        )


def test_bilinear_positional_embedding_resize():
    """AnomalyCLIP's way to 518: the native grid of position entries interpolated bilinearly."""
    import torch.nn.functional as F

    native, _ = build_open_clip(section="s", model_name="clipsam-tiny-240", pretrained=None, image_size=240)
    resized, _ = build_open_clip(
        section="s", model_name="clipsam-tiny-240", pretrained=None, image_size=96, pos_interpolation="bilinear"
    )
    pos = native.visual.positional_embedding.detach()  # (1 + 15 * 15, 64), same seed
    grid = pos[1:].reshape(1, 15, 15, 64).permute(0, 3, 1, 2)
    expected = F.interpolate(grid, size=(6, 6), mode="bilinear", align_corners=False).permute(0, 2, 3, 1).reshape(36, 64)
    got = resized.visual.positional_embedding.detach()
    torch.testing.assert_close(got[0], pos[0])
    torch.testing.assert_close(got[1:], expected)
    assert resized.visual.grid_size == (6, 6)
    assert resized.visual(torch.randn(1, 3, 96, 96)).shape == (1, 48)
    # open_clip's own path sizes the tower for the input too (bicubic resize)
    other, _ = build_open_clip(section="s", model_name="clipsam-tiny-240", pretrained=None, image_size=96)
    assert other.visual.positional_embedding.shape == got.shape
    with pytest.raises(ConfigError, match="pos_interpolation"):
        build_open_clip(section="s", model_name="clipsam-tiny-240", pretrained=None, image_size=96, pos_interpolation="nearest")
