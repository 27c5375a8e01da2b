"""SDPA attention in SAM's image encoder equals segment_anything's own attention."""

from __future__ import annotations

import pytest
import torch

from clipsam.models.sam import build_sam_tiny
from clipsam.models.sam_attention import install_sdpa_attention, sdpa_attention_forward, uninstall_sdpa_attention
from segment_anything.modeling.image_encoder import Attention


def _randomise(module: torch.nn.Module, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.3)


@pytest.mark.parametrize(
    "tokens, rel_input, use_rel_pos",
    [((4, 4), (4, 4), True), ((14, 14), (14, 14), True), ((16, 16), (16, 16), True), ((6, 9), (6, 9), True), ((5, 5), None, False)],
    ids=["window4", "window14", "global16", "rectangular", "no_rel_pos"],
)
def test_sdpa_forward_equals_segment_anything_attention(tokens, rel_input, use_rel_pos):
    attn = Attention(dim=48, num_heads=3, qkv_bias=True, use_rel_pos=use_rel_pos, input_size=rel_input)
    _randomise(attn, seed=sum(tokens))
    x = torch.randn(2, *tokens, 48, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = attn(x)
        got = sdpa_attention_forward(attn, x)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)


def test_installed_on_one_model_only_and_the_encoder_output_is_unchanged():
    sam = build_sam_tiny(seed=0)
    _randomise(sam.image_encoder, seed=3)  # rel-pos tables are zeros at init: make them matter
    other = build_sam_tiny(seed=0)
    x = torch.randn(2, 3, 256, 256, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = sam.image_encoder(x)
        assert install_sdpa_attention(sam) == 2  # one windowed block, one global block
        got = sam.image_encoder(x)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
    assert all("forward" not in vars(m) for m in other.modules() if isinstance(m, Attention))
    assert Attention.forward is not sdpa_attention_forward  # the class is untouched
    assert uninstall_sdpa_attention(sam) == 2
    assert all("forward" not in vars(m) for m in sam.modules() if isinstance(m, Attention))
