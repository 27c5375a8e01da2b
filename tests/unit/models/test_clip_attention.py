"""The frozen CLIP tower's attention through SDPA equals open_clip's ``nn.MultiheadAttention``."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from clipsam.models.clip import ClipConfig, build_clip_model
from clipsam.models.clip_attention import install_sdpa_attention, mha_sdpa_forward, uninstall_sdpa_attention


def _attention(batch_first: bool, seed: int = 0) -> nn.MultiheadAttention:
    torch.manual_seed(seed)
    attn = nn.MultiheadAttention(48, 4, batch_first=batch_first).eval()
    with torch.no_grad():
        attn.in_proj_bias.normal_(0, 0.5)  # zeros at init: make the biases matter
        attn.out_proj.bias.normal_(0, 0.5)
    return attn


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("with_mask", [False, True])
def test_sdpa_forward_equals_multihead_attention(batch_first, with_mask):
    attn = _attention(batch_first)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(3, 37, 48, generator=gen)
    if not batch_first:
        x = x.transpose(0, 1).contiguous()  # (N, B, E)
    mask = torch.randn(37, 37, generator=gen) if with_mask else None  # additive float mask
    with torch.no_grad():
        expected, _ = attn(x, x, x, need_weights=False, attn_mask=mask)
        got, weights = mha_sdpa_forward(attn, x, x, x, need_weights=False, attn_mask=mask)
    assert weights is None and got.shape == expected.shape
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)


def test_calls_outside_the_fast_form_go_to_multihead_attention():
    attn = _attention(True)
    x = torch.randn(2, 9, 48)
    other = torch.randn(2, 9, 48)
    causal = torch.triu(torch.ones(9, 9, dtype=torch.bool), 1)  # bool: True = masked out
    with torch.no_grad():
        out, weights = mha_sdpa_forward(attn, x, x, x, need_weights=True)
        assert weights is not None and weights.shape == (2, 9, 9)  # the attention weights, as asked
        torch.testing.assert_close(out, attn(x, x, x)[0], rtol=0, atol=0)
        torch.testing.assert_close(mha_sdpa_forward(attn, x, other, other, need_weights=False)[0], attn(x, other, other, need_weights=False)[0], rtol=0, atol=0)
        torch.testing.assert_close(
            mha_sdpa_forward(attn, x, x, x, need_weights=False, attn_mask=causal)[0],
            attn(x, x, x, need_weights=False, attn_mask=causal)[0], rtol=0, atol=0,
        )


@pytest.mark.parametrize("frozen_dtype, atol", [("float32", 1e-5), ("bfloat16", 2e-2)])
def test_clip_stage_output_is_unchanged_by_sdpa_attention(frozen_dtype, atol):
    """The whole CLIP stage (tiny preset at 64 px, 17 tokens) with and without the SDPA form."""
    images = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    outputs = []
    for sdpa in (False, True):
        config = ClipConfig(model_name="clipsam-tiny", pretrained=None, layers=[1, 2, 3, 4], frozen_dtype=frozen_dtype, sdpa_attention=sdpa)
        model = build_clip_model(config, image_size=64).eval()
        attentions = [m for m in model.clip.visual.modules() if isinstance(m, nn.MultiheadAttention)]
        assert len(attentions) == 4 and all(("forward" in vars(m)) == sdpa for m in attentions)
        assert all("forward" not in vars(m) for m in model.clip.transformer.modules()), "the text tower keeps its own"
        with torch.no_grad():
            outputs.append(model(images, ["capsule", "screw"]))
    off, on = outputs
    torch.testing.assert_close(on.anomaly_map, off.anomaly_map, rtol=0, atol=atol)
    torch.testing.assert_close(on.layer_probs, off.layer_probs, rtol=0, atol=atol)
    if frozen_dtype == "float32":
        assert float((on.anomaly_map - off.anomaly_map).abs().max()) <= 1e-6


def test_install_changes_one_model_only_and_uninstall_restores_it():
    model = nn.Sequential(_attention(True), _attention(True, seed=1))
    other = _attention(True)
    assert install_sdpa_attention(model) == 2
    assert "forward" not in vars(other) and nn.MultiheadAttention.forward is not mha_sdpa_forward
    assert uninstall_sdpa_attention(model) == 2
    assert all("forward" not in vars(m) for m in model)
