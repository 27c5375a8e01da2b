"""The frozen CLIP tower's self-attention through ``F.scaled_dot_product_attention``.

open_clip's residual blocks call ``nn.MultiheadAttention(x, x, x, need_weights=False)``. In
eval mode PyTorch routes that to its fused ``_native_multi_head_attention``, which on the CPU
forms the whole (N x N) attention matrix in float32: for the 1025 tokens of a 512-px frame it
is about 4x slower than ``scaled_dot_product_attention`` (a flash kernel) on the same weights,
and the attention dominates the CLIP stage at these sizes (docs/benchmarks.md). The numbers are
the same, ``softmax(q k^T / sqrt(d)) v`` with q, k, v from ``in_proj`` and the heads merged by
``out_proj``, up to float rounding (tested at 1e-5 against ``nn.MultiheadAttention``).

:func:`install_sdpa_attention` sets ``forward`` on the ``nn.MultiheadAttention`` instances of
ONE module tree (an instance attribute: other models and the class are untouched; weights and
state-dict keys stay open_clip's). A call the fast form does not cover (separate key/value
tensors, ``need_weights=True``, a key padding mask, a boolean mask, ``bias_k``/``add_zero_attn``,
separate q/k/v projection weights) goes to ``nn.MultiheadAttention.forward`` unchanged.

Shapes: B batch, N tokens, E embedding width, n heads, d = E / n head width.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from clipsam.models.forward_swap import install_forward, uninstall_forward

__all__ = ["install_sdpa_attention", "mha_sdpa_forward", "uninstall_sdpa_attention"]


def _fast_form_applies(
    module: nn.MultiheadAttention,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    key_padding_mask: torch.Tensor | None,
    need_weights: bool,
    attn_mask: torch.Tensor | None,
) -> bool:
    return (
        query is key
        and key is value
        and query.dim() == 3
        and key_padding_mask is None
        and not need_weights
        and (attn_mask is None or (attn_mask.dim() == 2 and attn_mask.is_floating_point()))
        and module._qkv_same_embed_dim
        and module.bias_k is None
        and module.bias_v is None
        and not module.add_zero_attn
    )


def mha_sdpa_forward(
    self: nn.MultiheadAttention,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    key_padding_mask: torch.Tensor | None = None,
    need_weights: bool = True,
    attn_mask: torch.Tensor | None = None,
    average_attn_weights: bool = True,
    is_causal: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``nn.MultiheadAttention.forward`` (self-attention) by ``scaled_dot_product_attention``.

    Same signature and return value as ``nn.MultiheadAttention.forward``; arguments outside the
    fast form (module docstring) are passed to it.

    Args:
        self: the ``nn.MultiheadAttention``.
        query, key, value: the same (B, N, E) tensor (``batch_first``) or (N, B, E).
        attn_mask: None or an additive float (N, N) mask.

    Returns:
        ``(output, None)``: output shaped like ``query``.
    """
    if not _fast_form_applies(self, query, key, value, key_padding_mask, need_weights, attn_mask):
        return nn.MultiheadAttention.forward(
            self, query, key, value, key_padding_mask=key_padding_mask, need_weights=need_weights,
            attn_mask=attn_mask, average_attn_weights=average_attn_weights, is_causal=is_causal,
        )
    x = query if self.batch_first else query.transpose(0, 1)  # (B, N, E)
    batch, tokens, width = x.shape
    qkv = F.linear(x, self.in_proj_weight, self.in_proj_bias)  # (B, N, 3E)
    q, k, v = qkv.view(batch, tokens, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)  # (B, n, N, d)
    out = F.scaled_dot_product_attention(
        q, k, v,
        attn_mask=None if attn_mask is None else attn_mask.to(q.dtype),
        dropout_p=self.dropout if self.training else 0.0,
        is_causal=is_causal and attn_mask is None,
    )
    out = F.linear(out.transpose(1, 2).reshape(batch, tokens, width), self.out_proj.weight, self.out_proj.bias)
    return (out if self.batch_first else out.transpose(0, 1)), None


def install_sdpa_attention(model: nn.Module) -> int:
    """Make every ``nn.MultiheadAttention`` in ``model`` use :func:`mha_sdpa_forward`.

    Returns:
        The number of attention modules changed.
    """
    return install_forward(model, nn.MultiheadAttention, mha_sdpa_forward)


def uninstall_sdpa_attention(model: nn.Module) -> int:
    """Undo :func:`install_sdpa_attention` (the class's own ``forward`` again)."""
    return uninstall_forward(model, nn.MultiheadAttention)
