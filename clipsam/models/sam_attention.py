"""SAM's image-encoder attention through ``F.scaled_dot_product_attention``.

segment_anything's ``Attention.forward`` forms the full (HW x HW) attention matrix, adds the
decomposed relative-position terms (MViTv2) and applies softmax by hand. The same numbers come
out of PyTorch's fused kernel when those terms are passed as its additive mask:

``softmax(scale * q k^T + B) v`` with ``B[(i, j), (k, l)] = q_ij . R_h[i, k] + q_ij . R_w[j, l]``

where ``R_h`` / ``R_w`` are segment_anything's own ``get_rel_pos`` tables (unscaled q, as in
``add_decomposed_rel_pos``). :func:`install_sdpa_attention` swaps ``forward`` on the
``Attention`` instances of ONE model (an instance attribute, so other models and the
segment_anything class are untouched); weights and module names stay segment_anything's, so
checkpoints load as before. :func:`uninstall_sdpa_attention` restores the original method.

Shapes: B batch (times windows), H x W tokens of a window (14 x 14 for vit_h) or of the whole
grid (64 x 64, global blocks), n heads, d head width.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from segment_anything.modeling.image_encoder import Attention, get_rel_pos
from torch import nn

from clipsam.models.forward_swap import install_forward, uninstall_forward

__all__ = ["install_sdpa_attention", "sdpa_attention_forward", "uninstall_sdpa_attention"]


def sdpa_attention_forward(self: Attention, x: torch.Tensor) -> torch.Tensor:
    """``Attention.forward`` of segment_anything, computed by ``scaled_dot_product_attention``.

    Args:
        self: a ``segment_anything.modeling.image_encoder.Attention``.
        x: (B, H, W, dim) tokens.

    Returns:
        (B, H, W, dim), equal to the original forward up to float rounding.
    """
    batch, height, width, _ = x.shape
    heads = self.num_heads
    qkv = self.qkv(x).reshape(batch, height * width, 3, heads, -1).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)  # (B, n, HW, d)
    bias = None
    if self.use_rel_pos:
        rel_h = get_rel_pos(height, height, self.rel_pos_h)  # (H, H, d)
        rel_w = get_rel_pos(width, width, self.rel_pos_w)  # (W, W, d)
        grid_q = q.reshape(batch, heads, height, width, -1)
        term_h = torch.einsum("bnhwc,hkc->bnhwk", grid_q, rel_h)  # (B, n, H, W, H)
        term_w = torch.einsum("bnhwc,wkc->bnhwk", grid_q, rel_w)  # (B, n, H, W, W)
        bias = (term_h[..., :, None] + term_w[..., None, :]).reshape(
            batch, heads, height * width, height * width
        )
        bias = bias.to(q.dtype)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=self.scale)  # (B, n, HW, d)
    out = out.permute(0, 2, 1, 3).reshape(batch, height, width, -1)
    return self.proj(out)


def install_sdpa_attention(model: nn.Module) -> int:
    """Make every segment_anything ``Attention`` in ``model`` use :func:`sdpa_attention_forward`.

    Returns:
        The number of attention modules changed.
    """
    return install_forward(model, Attention, sdpa_attention_forward)


def uninstall_sdpa_attention(model: nn.Module) -> int:
    """Undo :func:`install_sdpa_attention` (the class's own ``forward`` again)."""
    return uninstall_forward(model, Attention)
