"""Shared pieces of the open_clip-based comparison methods (WinCLIP, AnomalyCLIP, SDP/SDP+).

* :func:`build_open_clip`: the frozen open_clip model + tokenizer of a method's config section,
  with the weight resolution of :mod:`clipsam.models.clip` (tag -> cache -> download, or a
  local file; never silently random; offline without the weights -> :class:`WeightsError`
  that says where to put them; empty ``pretrained`` -> random weights seeded).
* :func:`value_value_attention`: the v-v self-attention of CLIP Surgery / DPAM / SDP, built
  from a frozen open_clip block's own ``nn.MultiheadAttention`` projections (open_clip >= 2.26
  blocks are batch-first).
* :func:`resize_images`, :func:`encode_sentences`, :class:`FrozenClipMixin`.

Dimension symbols: B batch, N tokens (1 class token + h * w patch tokens), C token width,
D joint embedding width, P prompts.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from types import SimpleNamespace
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from clipsam.errors import ConfigError, WeightsError
from clipsam.models.presets import is_tiny_preset, register_tiny_configs

__all__ = [
    "DTYPES",
    "build_open_clip",
    "check_vit",
    "encode_sentences",
    "pil_input_specs",
    "resize_images",
    "resize_positional_embedding",
    "value_value_attention",
    "vv_residual",
]

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}


def build_open_clip(
    *,
    section: str,
    model_name: str,
    pretrained: str | None,
    image_size: int,
    cache_dir: str | None = None,
    seed: int = 0,
    quick_gelu: bool | None = None,
    pos_interpolation: str = "open_clip",
) -> tuple[nn.Module, Callable[[list[str]], Tensor]]:
    """Create an open_clip model (eval mode, on CPU) and its tokenizer.

    Args:
        section: Config section that holds these keys, for error messages (``"model.winclip"``).
        model_name: open_clip architecture name or a clipsam tiny preset (``clipsam-tiny-240``).
        pretrained: open_clip tag (``"laion400m_e31"``) or a local checkpoint file; ``None`` or
            ``""`` gives random weights seeded with ``seed``.
        image_size: Input side the positional embedding is interpolated to
            (``force_image_size``).
        cache_dir: open_clip's download cache (``None``: its default).
        seed: Seed of random weights.
        quick_gelu: Force QuickGELU; ``None`` follows the pretrained tag.
        pos_interpolation: ``"open_clip"``: the tower is built for ``image_size`` by open_clip
            (pretrained positional embeddings resized bicubically, with antialias);
            ``"bilinear"``: built at its native size, then the positional embedding is resized
            bilinearly (align_corners False, as AnomalyCLIP's code does,
            :func:`resize_positional_embedding`); ``"bicubic"``: built at its native size, then
            resized bicubically without antialias (MuSc's and AdaCLIP's vendored open_clip,
            :func:`resize_pos_embed_bicubic`).

    Returns:
        ``(model, tokenizer)``; the tokenizer maps a list of str to (P, context) int64.

    Raises:
        ConfigError: Unknown architecture, or a preset with a pretrained tag.
        WeightsError: The weights cannot be found or loaded (the message says how to get them).
    """
    import open_clip

    from clipsam.models import clip as clip_stage

    if is_tiny_preset(model_name):
        register_tiny_configs()
        if pretrained and not os.path.isfile(str(pretrained)):
            raise ConfigError(
                f"{section}.model_name={model_name} is a clipsam preset without pretrained tags: set "
                f"{section}.pretrained=null for random weights or to a local file (got {pretrained!r})."
            )
    if not model_name.startswith(("hf-hub:", "local-dir:")) and open_clip.get_model_config(model_name) is None:
        raise ConfigError(
            f"{section}.model_name={model_name!r} is not an open_clip model config "
            "(open_clip.list_models() lists them), e.g. ViT-B-16-plus-240 or ViT-L-14-336."
        )
    if pos_interpolation not in ("open_clip", "bilinear", "bicubic"):
        raise ConfigError(f"{section}.pos_interpolation={pos_interpolation!r}: use 'open_clip', 'bilinear' or 'bicubic'.")
    spec = SimpleNamespace(model_name=model_name, pretrained=pretrained, cache_dir=cache_dir)
    kwargs: dict[str, Any] = {"cache_dir": cache_dir}
    if pos_interpolation == "open_clip":
        kwargs["force_image_size"] = int(image_size)
    if not pretrained:
        if quick_gelu:
            kwargs["force_quick_gelu"] = True
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = clip_stage._quiet_create(open_clip, model_name, None, kwargs)
    else:
        try:
            tag_cfg = clip_stage._resolve_pretrained(open_clip, spec)
        except WeightsError as err:
            raise WeightsError(str(err).replace("model.clip.", f"{section}.")) from err
        if quick_gelu is None:
            quick_gelu = bool(tag_cfg.get("quick_gelu", False))
        if quick_gelu:
            kwargs["force_quick_gelu"] = True
        try:
            model = clip_stage._quiet_create(open_clip, model_name, pretrained, kwargs)
        except Exception as err:  # open_clip raises RuntimeError/FileNotFoundError/OSError
            message = clip_stage._weights_help(spec, f"{type(err).__name__}: {err}")
            raise WeightsError(message.replace("model.clip.", f"{section}.")) from err
    if pos_interpolation == "bilinear":
        resize_positional_embedding(model.visual, int(image_size))
    elif pos_interpolation == "bicubic":
        resize_pos_embed_bicubic(model.visual, int(image_size), key=section)
    model.eval()
    tokenizer = open_clip.get_tokenizer(model_name, cache_dir=cache_dir)
    return model, tokenizer


def resize_positional_embedding(visual: nn.Module, image_size: int) -> None:
    """Resize a ViT's patch positional embedding in place, bilinearly (align_corners False).

    The class token's entry is kept; the (g, g) grid of entries is interpolated to
    (image_size / patch)^2. A no-op at the native size.

    Args:
        visual: open_clip ``VisionTransformer`` with a (1 + g * g, C) ``positional_embedding``.
        image_size: New square input side, a multiple of the patch size.
    """
    patch = visual.patch_size[0] if isinstance(visual.patch_size, (tuple, list)) else int(visual.patch_size)
    if image_size % patch:
        raise ConfigError(f"input size {image_size} is not a multiple of the patch size {patch}")
    new = image_size // patch
    pos = visual.positional_embedding.detach()
    side = int(round((pos.shape[0] - 1) ** 0.5))
    if side == new:
        return
    grid = pos[1:].reshape(1, side, side, -1).permute(0, 3, 1, 2).float()
    grid = F.interpolate(grid, size=(new, new), mode="bilinear", align_corners=False)
    grid = grid.permute(0, 2, 3, 1).reshape(new * new, -1).to(pos.dtype)
    visual.positional_embedding = nn.Parameter(torch.cat([pos[:1], grid]), requires_grad=False)
    visual.grid_size = (new, new)
    visual.image_size = (image_size, image_size)


def check_vit(clip_model: nn.Module, section: str, model_name: str) -> nn.Module:
    """The model's open_clip ``VisionTransformer`` (class-token pooled), or a ConfigError."""
    visual = getattr(clip_model, "visual", None)
    if visual is None or not hasattr(visual, "transformer") or not hasattr(visual, "_embeds"):
        raise ConfigError(
            f"{section}.model_name={model_name!r} has no open_clip VisionTransformer tower: "
            "choose a ViT model (e.g. ViT-B-16-plus-240)."
        )
    if getattr(visual, "pool_type", "tok") != "tok" or getattr(visual, "attn_pool", None) is not None:
        raise ConfigError(
            f"{section}.model_name={model_name!r} does not pool the class token: these methods "
            "need a CLIP ViT with class-token pooling."
        )
    if not getattr(visual.transformer, "batch_first", True):
        raise ConfigError(f"{section}.model_name={model_name!r}: a sequence-first transformer is not supported.")
    return visual


def pil_input_specs(input_size: int | None, *, image_size: int) -> list[Any]:
    """The CLIP-AD / AnomalyCLIP input: PIL's (antialiased) bicubic resize of the ORIGINAL image to
    ``input_size``, squashed, CLIP-normalised; none besides the frame when that is the frame."""
    from clipsam.inputs import InputSpec

    size = int(input_size or image_size)
    if size == int(image_size):
        return []  # exactly the evaluation frame
    return [InputSpec(key="method_image", size=size, resize="pil_bicubic", normalize="clip")]


def resize_images(images: Tensor, size: int) -> Tensor:
    """Squash-resize (B, 3, H, W) images to (B, 3, size, size), bicubic; a no-op at that size.

    The images are already CLIP-normalised; resizing commutes with the per-channel affine
    normalisation, so this equals normalising the resized image (up to bicubic overshoot).
    """
    if images.shape[-2:] == (size, size):
        return images
    return F.interpolate(images, size=(size, size), mode="bicubic", align_corners=False)


def encode_sentences(
    clip_model: nn.Module,
    tokenizer: Callable[[list[str]], Tensor],
    sentences: Sequence[str],
    device: torch.device,
) -> Tensor:
    """Raw (not normalised) text embeddings of ``sentences``: (P, D) float32.

    Runs with gradients off and outside any ``inference_mode`` (the result is cached and later
    used by training steps).
    """
    with torch.inference_mode(False), torch.no_grad(), torch.autocast(device.type, enabled=False):
        tokens = tokenizer(list(sentences)).to(device)
        return clip_model.encode_text(tokens).float().clone()


def value_value_attention(attn: nn.MultiheadAttention, x: Tensor) -> Tensor:
    """v-v self-attention with the projections of a frozen ``nn.MultiheadAttention``.

    Per head h with head width d: ``v_h = x W_v,h + b_v,h``, ``out_h = softmax(v_h v_h^T / sqrt(d)) v_h``;
    the heads are concatenated and passed through ``attn.out_proj``. This is the "v-v
    attention" of CLIP Surgery, AnomalyCLIP's DPAM (``/ 8`` for d = 64) and SDP.

    Args:
        attn: A batch-first ``nn.MultiheadAttention`` with packed ``in_proj_weight`` (3C, C)
            (rows: q, k, v) and optional ``in_proj_bias`` (3C,).
        x: (B, N, C) tokens (already through the block's ``ln_1``).

    Returns:
        (B, N, C), same dtype as ``x``.
    """
    if attn.in_proj_weight is None:
        raise ConfigError("v-v attention needs a packed in_proj_weight (q, k, v of equal width)")
    batch, tokens, width = x.shape
    heads = attn.num_heads
    w_v = attn.in_proj_weight[2 * width :]
    b_v = attn.in_proj_bias[2 * width :] if attn.in_proj_bias is not None else None
    v = F.linear(x, w_v, b_v)  # (B, N, C)
    v = v.reshape(batch, tokens, heads, width // heads).transpose(1, 2)  # (B, heads, N, d)
    scale = (width // heads) ** -0.5
    weights = torch.softmax((v @ v.transpose(-2, -1)) * scale, dim=-1)  # (B, heads, N, N)
    out = (weights @ v).transpose(1, 2).reshape(batch, tokens, width)
    return attn.out_proj(out)


def vv_residual(block: nn.Module, x: Tensor) -> Tensor:
    """One open_clip ``ResidualAttentionBlock``'s v-v branch: ``ls_1(VV(ln_1(x)))``, (B, N, C)."""
    return block.ls_1(value_value_attention(block.attn, block.ln_1(x)))


class FrozenClipMixin:
    """Keeps ``self.clip`` frozen and in eval mode whatever ``.train()`` is called with."""

    clip: nn.Module
    visual: nn.Module
    input_size: int

    def _patch_grid(self, key: str = "model.method_config") -> int:
        """Side of the patch grid at ``input_size``; ConfigError naming ``key`` if it does not divide."""
        patch = self.visual.patch_size
        patch = patch[0] if isinstance(patch, (tuple, list)) else int(patch)
        if self.input_size % patch:
            raise ConfigError(f"{key}.input_size={self.input_size} is not a multiple of the patch size {patch}.")
        return self.input_size // patch

    def _device(self) -> torch.device:
        return self.visual.conv1.weight.device

    def _per_category_text(
        self,
        categories: Sequence[str],
        object_name_mode: str,
        encode_object: Callable[[str, torch.device], Tensor],
        *,
        variant: str = "",
    ) -> Tensor:
        """Stack ``encode_object(object_name, device)`` over the categories, once per object name.

        Results are kept in ``self._text_cache`` (object name, or ``"<object name>|<variant>"``
        for text built with other settings, -> tensor) and recomputed when the model moved to
        another device.
        """
        from clipsam.prompts import object_name_for

        device = self._device()
        cache: dict[str, Tensor] = self.__dict__.setdefault("_text_cache", {})
        out = []
        for category in categories:
            object_name = object_name_for(category, object_name_mode)
            key = f"{object_name}|{variant}" if variant else object_name
            cached = cache.get(key)
            if cached is None or cached.device != device:
                cached = cache[key] = encode_object(object_name, device)
            out.append(cached)
        return torch.stack(out)

    def _freeze_clip(self, dtype: torch.dtype) -> None:
        self.clip.requires_grad_(False)
        self.clip.to(dtype)
        self.clip.eval()

    def train(self, mode: bool = True):  # type: ignore[override]
        nn.Module.train(self, mode)  # type: ignore[arg-type]
        self.clip.eval()
        return self


def resize_pos_embed_bicubic(visual: nn.Module, image_size: int, *, key: str = "model.method_config") -> None:
    """Resize a ViT's positional grid in place as the MuSc / AdaCLIP references' vendored open_clip does.

    Bicubic, align_corners False, NO antialiasing (their ``resize_pos_embed``); the class
    token's entry is kept. A no-op at the native size.

    Raises:
        ConfigError: ``image_size`` is not a multiple of the patch size (names ``key``).
    """
    patch = visual.patch_size[0] if isinstance(visual.patch_size, (tuple, list)) else int(visual.patch_size)
    if image_size % patch:
        raise ConfigError(f"{key}.input_size={image_size} is not a multiple of the patch size {patch}.")
    new = image_size // patch
    pos = visual.positional_embedding.detach()
    side = round((pos.shape[0] - 1) ** 0.5)
    if side != new:
        grid = pos[1:].reshape(1, side, side, -1).permute(0, 3, 1, 2).float()
        grid = F.interpolate(grid, size=(new, new), mode="bicubic", align_corners=False)
        grid = grid.permute(0, 2, 3, 1).reshape(new * new, -1).to(pos.dtype)
        visual.positional_embedding = nn.Parameter(torch.cat([pos[:1], grid]), requires_grad=False)
    visual.grid_size = (new, new)
    visual.image_size = (image_size, image_size)

