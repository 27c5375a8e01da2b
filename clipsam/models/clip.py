"""CLIP stage: a frozen open_clip model, linear adapters on tapped layers, the anomaly map.

the paper's CLIP stage and the protocol it shares with APRIL-GAN and AnomalyCLIP (APRIL-GAN's recipe, read
from its released train.py / test.py):

1. the frozen visual tower runs on the frame image; the residual-stream tokens after the
   configured transformer blocks are taken (open_clip's ``forward_intermediates``, no hooks)
   and the class token dropped;
2. one trainable ``nn.Linear`` per tapped layer maps the patch tokens (token width, e.g. 1024
   for ViT-L) to the joint embedding width D (768 for ViT-L);
3. the L2-normalised adapted tokens are compared with the prompt-ensemble text features of the
   image's category: logits ``logit_scale * token . text`` over (normal, anomalous). With
   ``upsample="logits"`` (APRIL-GAN) the 2-channel logits are upsampled bilinearly
   (align_corners=True) to the frame and the softmax is taken there; with ``"probs"``
   (AnomalyCLIP) the softmax is taken on the patch grid and the probabilities are upsampled.
   The same per-layer probabilities feed the training loss and the test map;
4. the anomalous channel is combined over layers (mean by default, APRIL-GAN sums), optionally
   smoothed with a Gaussian (AnomalyCLIP: sigma 4; APRIL-GAN: none), and reduced to an image
   score: a reduction of the map, or (``image_score="clip_global"``, both references) the
   zero-shot CLS score ``softmax(logit_scale * cos(image feature, text))[anomalous]``.

Only the adapters train; the open_clip model is frozen and stays in eval mode.

Precision (``ClipConfig.frozen_dtype``): only the weights of the visual tower's attention and
MLP layers are cast to ``frozen_dtype``; the patch embedding, every LayerNorm, the final
projection and the residual stream stay float32 (a LayerNorm computes in float32 and hands its
output to the next sublayer in that sublayer's dtype; the sublayer's output is added to the
float32 residual stream). The text tower runs in float32 (it runs once per object name). No
autocast: CPU bf16 autocast of ``nn.MultiheadAttention`` is pathologically slow at batch >= 2.
Adapters, similarities, softmax and maps are float32 with autocast disabled, so Lightning's
``precision`` does not change this stage; use ``precision="32-true"``. How far bf16 weights
move the map: docs/benchmarks.md (``scripts/benchmark_precision.py``).

Dimension symbols: B batch, L tapped layers, D joint embedding width, C token width,
H x W frame image, h x w patch grid (H / patch, W / patch), N = h * w patch tokens.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from clipsam.errors import ConfigError, WeightsError
from clipsam.fusion import image_scores
from clipsam.models.presets import is_tiny_preset, register_tiny_configs
from clipsam.prompts import OBJECT_NAME_MODES, build_prompts, object_name_for

__all__ = [
    "ClipAnomalyModel",
    "ClipConfig",
    "ClipOutput",
    "build_clip_model",
    "gaussian_blur",
    "global_image_scores",
    "set_frozen_precision",
    "upsample_layer_probs",
]

_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}


@dataclass
class ClipConfig:
    """Everything that defines the CLIP stage (config section ``model.clip``).

    docs/usage.md ("Fidelity: the paper configs and the APRIL-GAN profile") lists, per key, the
    value of the paper configs, of ``configs/methods/april_gan_*.yaml`` and where each comes from.

    Attributes:
        model_name: open_clip architecture name (``open_clip.list_models()``) or a clipsam
            preset (``"clipsam-tiny"``, random weights only).
        pretrained: open_clip pretrained tag (e.g. ``"openai"``) or a local checkpoint file;
            ``None`` or ``""`` gives random weights seeded with ``seed``. A tag never silently
            falls back to random weights: missing weights raise :class:`WeightsError`.
        layers: Tapped transformer blocks, 1-based and increasing, as APRIL-GAN counts them
            (``[6, 12, 18, 24]`` for ViT-L-14-336; ``[1, 2, 3, 4]`` for ``clipsam-tiny``).
        cache_dir: Where open_clip caches downloaded weights (``None``: its default, i.e. the
            Hugging Face cache or ``~/.cache/clip``).
        object_name: The object name written into the prompts. ``"raw"`` is the category name
            exactly as on disk (``metal_nut``, ``pcb1``), as APRIL-GAN's prompt_ensemble.py
            writes it; ``"category"`` (clipsam's choice) cleans it into words (``metal_nut`` ->
            "metal nut", ``pcb1`` -> "pcb"); ``"generic"`` writes "object" for all categories.
        upsample: What is upsampled from the patch grid to the frame. ``"logits"`` (default,
            APRIL-GAN's train.py and test.py): the 2-channel logits ``logit_scale * token .
            text``, bilinearly with align_corners=True, then the softmax over the 2 channels;
            ``"probs"`` (AnomalyCLIP): the softmax on the patch grid, then the probabilities.
            Used by the training loss and the test map alike.
        layer_combine: ``"mean"`` of the per-layer anomalous probabilities keeps the map in
            [0, 1]; ``"sum"`` (APRIL-GAN's test code) ranks pixels identically but ranges over
            [0, L], which breaks the [0, 1] contract of ``anomaly_map`` (the SAM stage needs
            it); only for the CLIP stage alone (the APRIL-GAN profile).
        smoothing_sigma: Standard deviation in frame pixels of the Gaussian applied to the
            combined map; 0 disables. APRIL-GAN applies none; 4 is AnomalyCLIP's test.py
            (``gaussian_filter(sigma=4)``) and clipsam's default, a choice where the paper is
            silent. Kernel radius ``round(4 * sigma)``, symmetric padding (as
            ``scipy.ndimage.gaussian_filter``).
        image_score: The image score. ``"clip_global"`` (APRIL-GAN and AnomalyCLIP, zero-shot):
            ``softmax(logit_scale * cos(CLS image feature, text features))[anomalous]``, the
            class token after ``ln_post`` and the projection (no adapter); in test/predict it
            is also the image score of the full method (SAM refines pixels, not the image
            decision). ``"max"``, ``"mean"``, ``"topk_mean"`` (mean of the top
            ``topk_fraction`` of pixels) reduce the pixel map (the CLIP map, and in
            test/predict the fused scores).
        topk_fraction: Fraction of pixels averaged by ``image_score="topk_mean"``.
        frozen_dtype: dtype of the weights of the visual tower's attention and MLP layers (99%
            of its parameters). LayerNorms, the residual stream, the patch embedding, the final
            projection and the text tower always stay float32 (module docstring).
            ``"float32"`` (default) is exact; ``"bfloat16"`` is 1.5-5x faster on CPUs with
            AVX512-BF16/AMX and on GPUs, and moves the map by the amount measured in
            docs/benchmarks.md; ``"float16"`` for GPUs without bf16.
        quick_gelu: Override the activation of the built architecture. ``None`` follows the
            pretrained tag (OpenAI tags use QuickGELU, the activation their weights were
            trained with, which the plain ``ViT-L-14-336`` config does not say); ``True`` when
            ``pretrained`` is a local copy of OpenAI weights. ``False`` is the APRIL-GAN-exact
            switch: its open_clip fork builds ViT-L-14-336 at 518 with plain GELU although the
            weights were trained with QuickGELU, and its released numbers come from that build.
        seed: Seed of the random frozen weights (when ``pretrained`` is empty) and of the
            adapter initialisation.
        logit_scale: Temperature of the patch-text and image-text similarities (APRIL-GAN: 100).
        sdpa_attention: Run the frozen visual tower's self-attention through
            ``F.scaled_dot_product_attention`` (:mod:`clipsam.models.clip_attention`): the same
            numbers as open_clip's ``nn.MultiheadAttention`` (tested to 1e-5), about 4x faster
            on the CPU in float32. ``False``: open_clip's own attention.
        compile: ``torch.compile`` each frozen visual transformer block in place
            (``nn.Module.compile``; weights and state-dict keys unchanged). Default off: the
            first batch then compiles for tens of seconds (ViT-L on a GPU), worth it only for
            long test runs.
    """

    model_name: str = "ViT-L-14-336"
    pretrained: str | None = "openai"
    layers: list[int] = field(default_factory=lambda: [6, 12, 18, 24])
    cache_dir: str | None = None
    object_name: Literal["category", "raw", "generic"] = "category"
    upsample: Literal["logits", "probs"] = "logits"
    layer_combine: Literal["mean", "sum"] = "mean"
    smoothing_sigma: float = 4.0
    image_score: Literal["max", "mean", "topk_mean", "clip_global"] = "max"
    topk_fraction: float = 0.01
    frozen_dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    quick_gelu: bool | None = None
    seed: int = 0
    logit_scale: float = 100.0
    sdpa_attention: bool = True
    compile: bool = False

    def __post_init__(self) -> None:
        self.layers = [int(v) for v in self.layers]
        if not self.layers or any(v < 1 for v in self.layers):
            raise ConfigError(
                f"model.clip.layers={self.layers}: give 1-based transformer block indices, "
                "e.g. [6, 12, 18, 24] for ViT-L-14-336."
            )
        if any(b <= a for a, b in zip(self.layers, self.layers[1:])):
            raise ConfigError(f"model.clip.layers={self.layers} must be strictly increasing.")
        _check_choice("object_name", self.object_name, OBJECT_NAME_MODES)
        _check_choice("upsample", self.upsample, ("logits", "probs"))
        _check_choice("layer_combine", self.layer_combine, ("mean", "sum"))
        _check_choice("image_score", self.image_score, CLIP_IMAGE_SCORES)
        _check_choice("frozen_dtype", self.frozen_dtype, tuple(_DTYPES))
        if self.smoothing_sigma < 0:
            raise ConfigError(
                f"model.clip.smoothing_sigma={self.smoothing_sigma} must be >= 0 (0 disables)."
            )
        if not 0 < self.topk_fraction <= 1:
            raise ConfigError(f"model.clip.topk_fraction={self.topk_fraction} must be in (0, 1].")


CLIP_IMAGE_SCORES: tuple[str, ...] = ("max", "mean", "topk_mean", "clip_global")
"""Valid ``model.clip.image_score`` values: the map reductions of
:func:`clipsam.fusion.image_scores` plus ``"clip_global"`` (the CLS zero-shot score)."""


def _check_choice(key: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"model.clip.{key}={value!r} is not a choice: use one of {list(choices)}.")


@dataclass
class ClipOutput:
    """Result of :meth:`ClipAnomalyModel.forward`.

    Attributes:
        layer_probs: (B, L, 2, H, W) float32, per tapped layer the probabilities over
            (normal, anomalous) on the frame (:func:`upsample_layer_probs`, ``ClipConfig.
            upsample``); sums to 1 over dim 2. Used by the loss.
        anomaly_map: (B, H, W) float32, ``Map_a``: anomalous channel combined over layers, then
            smoothed; in [0, 1] with ``layer_combine="mean"``.
        image_scores: (B,) float32, ``ClipConfig.image_score``: the CLS zero-shot score
            (``"clip_global"``) or the map's reduction.
    """

    layer_probs: Tensor
    anomaly_map: Tensor
    image_scores: Tensor


def gaussian_blur(maps: Tensor, sigma: float) -> Tensor:
    """Separable Gaussian filter with symmetric padding, as ``scipy.ndimage.gaussian_filter``.

    Args:
        maps: (B, H, W) float32.
        sigma: Standard deviation in pixels; radius ``round(4 * sigma)`` (scipy's truncate=4).

    Returns:
        (B, H, W) float32, same range as the input (the kernel sums to 1).

    Each 1-D pass is a weighted sum of 2r + 1 shifted views of the padded maps: on the CPU a
    single-channel ``conv2d`` goes through im2col and is about 6x slower for the same sums.
    """
    if sigma <= 0:
        return maps
    radius = int(4.0 * sigma + 0.5)
    offsets = torch.arange(-radius, radius + 1, dtype=torch.float64)
    kernel = torch.exp(-0.5 * (offsets / sigma) ** 2)
    weights = (kernel / kernel.sum()).to(maps.dtype).tolist()
    x = maps
    for dim in (2, 1):  # along W, then along H
        size = x.shape[dim]
        padded = _pad_symmetric(x, radius, dim)
        out = padded.narrow(dim, 0, size) * weights[0]
        for offset in range(1, 2 * radius + 1):
            out.add_(padded.narrow(dim, offset, size), alpha=weights[offset])
        x = out
    return x


def _pad_symmetric(x: Tensor, radius: int, dim: int) -> Tensor:
    """Pad ``radius`` samples on both sides of ``dim`` as scipy's 'reflect' (d c b a | a b c d)."""
    size = x.shape[dim]
    index = torch.arange(-radius, size + radius, device=x.device) % (2 * size)
    index = torch.where(index >= size, 2 * size - 1 - index, index)
    return x.index_select(dim, index)


def upsample_layer_probs(
    logits: Tensor, grid_size: tuple[int, int], frame_size: tuple[int, int], mode: str = "logits"
) -> Tensor:
    """Per-layer patch logits -> (normal, anomalous) probabilities on the frame.

    ``mode="logits"`` (APRIL-GAN): bilinear upsampling (align_corners=True) of the 2-channel
    logits, then the softmax over the channels at every frame pixel. ``mode="probs"``
    (AnomalyCLIP): the softmax on the patch grid, then bilinear upsampling of the
    probabilities. Both sum to 1 over the channels; they differ between patch centres.

    Args:
        logits: (B, N, 2) float32, ``logit_scale * token . text`` per patch, N = h * w in
            row-major grid order.
        grid_size: (h, w) patch grid.
        frame_size: (H, W) frame.
        mode: ``"logits"`` or ``"probs"``.

    Returns:
        (B, 2, H, W) float32 probabilities.
    """
    if mode not in ("logits", "probs"):
        raise ValueError(f"mode must be 'logits' or 'probs', got {mode!r}")
    batch = logits.shape[0]
    grid = logits.transpose(1, 2).reshape(batch, 2, grid_size[0], grid_size[1])  # (B, 2, h, w)
    if mode == "logits":
        up = F.interpolate(grid, size=frame_size, mode="bilinear", align_corners=True)
        return up.softmax(dim=1)
    return F.interpolate(grid.softmax(dim=1), size=frame_size, mode="bilinear", align_corners=True)


def global_image_scores(image_features: Tensor, text: Tensor, logit_scale: float = 100.0) -> Tensor:
    """Zero-shot image score from the CLS image feature, as APRIL-GAN's and AnomalyCLIP's test.py.

    ``softmax(logit_scale * cos(image feature, text feature of each class))[anomalous]``.

    Args:
        image_features: (B, D) float, the visual tower's pooled output (class token after
            ``ln_post``, times ``proj``); normalised here.
        text: (B, D, 2) float32, unit columns (normal, anomalous) per image.
        logit_scale: Temperature (100 in both references).

    Returns:
        (B,) float32 in [0, 1].
    """
    feats = F.normalize(image_features.float(), dim=-1)
    logits = logit_scale * torch.einsum("bd,bdc->bc", feats, text.float())
    return logits.softmax(dim=-1)[:, 1]


class MixedPrecisionLayerNorm(nn.LayerNorm):
    """A LayerNorm computed in float32 whose output goes to the next sublayer in ``out_dtype``.

    Replaces ``ln_1`` / ``ln_2`` of a residual block whose attention and MLP weights are in a
    low-precision dtype: the residual stream (the input here) stays float32, the normalisation
    and its affine parameters are float32, and only the sublayer's input is rounded. The
    sublayer's low-precision output is then added to the float32 stream (type promotion).

    Args:
        source: The LayerNorm to replace (its parameters are copied as float32).
        out_dtype: dtype of the next sublayer's weights.
    """

    def __init__(self, source: nn.LayerNorm, out_dtype: torch.dtype) -> None:
        super().__init__(
            source.normalized_shape,
            eps=source.eps,
            elementwise_affine=source.elementwise_affine,
            bias=source.bias is not None,
            device=source.weight.device if source.weight is not None else None,
            dtype=torch.float32,
        )
        with torch.no_grad():
            if source.weight is not None:
                self.weight.copy_(source.weight.float())
            if source.bias is not None:
                self.bias.copy_(source.bias.float())
        self.out_dtype = out_dtype

    def forward(self, x: Tensor) -> Tensor:
        weight = self.weight.float() if self.weight is not None else None
        bias = self.bias.float() if self.bias is not None else None
        y = F.layer_norm(x.float(), self.normalized_shape, weight, bias, self.eps)
        return y.to(self.out_dtype)


def set_frozen_precision(clip_model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """Cast a frozen open_clip model for inference: block weights in ``dtype``, the rest float32.

    Everything becomes float32, then the ``attn`` and ``mlp`` sublayers of every visual
    residual block are cast to ``dtype`` and their ``ln_1`` / ``ln_2`` replaced by
    :class:`MixedPrecisionLayerNorm`. The patch embedding, ``ln_pre``, ``ln_post``, ``proj``,
    the residual stream and the whole text tower stay float32. With ``dtype=float32`` this is
    just ``clip_model.float()``.

    Args:
        clip_model: An open_clip ``CLIP`` with a ``VisionTransformer`` visual tower (in place).
        dtype: dtype of the blocks' attention and MLP weights.

    Returns:
        ``clip_model``.
    """
    clip_model.float()
    if dtype == torch.float32:
        return clip_model
    for block in clip_model.visual.transformer.resblocks:
        for name in ("attn", "mlp"):
            getattr(block, name).to(dtype)
        for name in ("ln_1", "ln_2"):
            norm = getattr(block, name)
            if isinstance(norm, nn.LayerNorm) and not isinstance(norm, MixedPrecisionLayerNorm):
                setattr(block, name, MixedPrecisionLayerNorm(norm, dtype))
    return clip_model


class ClipAnomalyModel(nn.Module):
    """Frozen open_clip model + per-layer linear adapters -> per-pixel anomaly probabilities.

    Knows nothing of Lightning. The frozen model is built outside (:func:`build_clip_model`)
    and passed in; this class freezes it, casts its visual blocks to ``config.frozen_dtype``
    (:func:`set_frozen_precision`: LayerNorms and residual stream stay float32), and keeps it
    in eval mode whatever ``.train()`` is called with. Text features of the prompt ensemble are
    computed once per object name (on first use) and cached on the model, not per batch.

    Args:
        clip_model: An open_clip ``CLIP`` whose ``visual`` is an open_clip
            ``VisionTransformer`` (any size), already holding its weights.
        tokenizer: open_clip tokenizer of that model: list of str -> (P, context) int64.
        config: The stage's configuration.
        image_size: Frame side length H = W the visual tower was built for.
    """

    def __init__(
        self,
        *,
        clip_model: nn.Module,
        tokenizer: Callable[[list[str]], Tensor],
        config: ClipConfig,
        image_size: int,
    ) -> None:
        super().__init__()
        visual = getattr(clip_model, "visual", None)
        if visual is None or not hasattr(visual, "forward_intermediates") or not hasattr(visual, "transformer"):
            raise ConfigError(
                f"model.clip.model_name={config.model_name!r} has no open_clip VisionTransformer "
                "tower with forward_intermediates: choose a ViT model (e.g. ViT-L-14-336)."
            )
        num_blocks = len(visual.transformer.resblocks)
        bad = [v for v in config.layers if v > num_blocks]
        if bad:
            raise ConfigError(
                f"model.clip.layers={config.layers}: {config.model_name} has {num_blocks} "
                f"transformer blocks, so {bad} do not exist (indices are 1-based)."
            )
        self.config = config
        self.image_size = int(image_size)
        self.frozen_dtype = _DTYPES[config.frozen_dtype]
        self.patch_size = _as_pair(visual.patch_size)
        token_width = int(visual.transformer.width)
        embed_dim = int(_embed_dim(clip_model))

        self.clip = clip_model
        self.clip.requires_grad_(False)
        set_frozen_precision(self.clip, self.frozen_dtype)
        if config.sdpa_attention:
            from clipsam.models.clip_attention import install_sdpa_attention

            install_sdpa_attention(self.clip.visual)
        self.clip.eval()
        self.tokenizer = tokenizer

        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.seed)
            self.adapters = nn.ModuleList(nn.Linear(token_width, embed_dim) for _ in config.layers)

        self._take_indices = [v - 1 for v in config.layers]
        self._text_cache: dict[str, Tensor] = {}  # object name -> (D, 2) float32

    # ------------------------------------------------------------------ modes and state
    def train(self, mode: bool = True) -> ClipAnomalyModel:
        """Set train mode on the adapters; the frozen open_clip model always stays in eval."""
        super().train(mode)
        self.clip.eval()
        return self

    @property
    def adapter_shapes(self) -> list[tuple[int, int]]:
        """(in_features, out_features) per tapped layer, e.g. [(1024, 768)] * 4 for ViT-L."""
        return [(a.in_features, a.out_features) for a in self.adapters]

    def adapter_state_dict(self) -> dict[str, Tensor]:
        """The trainable weights only: ``{"<i>.weight": (D, C), "<i>.bias": (D,)}``, detached CPU copies.

        For ViT-L-14-336 with 4 layers this is 4 x (1024 x 768 + 768) float32 = 12.6 MB.
        """
        return {k: v.detach().cpu().clone() for k, v in self.adapters.state_dict().items()}

    def load_adapter_state_dict(self, state: dict[str, Tensor], strict: bool = True) -> None:
        """Load adapter weights saved by :meth:`adapter_state_dict`.

        Args:
            state: ``{"<i>.weight": (D, C), "<i>.bias": (D,)}`` tensors.
            strict: Raise on missing or unexpected keys (shape mismatches always raise).

        Raises:
            WeightsError: The checkpoint was trained with another backbone, layer list or
                embedding width, or keys are missing/unexpected with ``strict``.
        """
        expected = self.adapters.state_dict()
        ckpt_shapes = _adapter_shapes_of(state)
        mismatched = [k for k, v in state.items() if k in expected and tuple(v.shape) != tuple(expected[k].shape)]
        if mismatched:
            got = _describe_shapes(ckpt_shapes)
            need = _describe_shapes(self.adapter_shapes)
            raise WeightsError(
                f"checkpoint adapters map {got} but model.clip.model_name={self.config.model_name} "
                f"needs {need}: the checkpoint was trained with another backbone; set "
                "model.clip.model_name (and layers) to the ones it was trained with."
            )
        missing = sorted(set(expected) - set(state))
        unexpected = sorted(set(state) - set(expected))
        if strict and (missing or unexpected):
            raise WeightsError(
                f"checkpoint has {len(ckpt_shapes)} adapters ({sorted(state)[:8]}...) but "
                f"model.clip.layers={self.config.layers} needs {len(self.adapters)}: missing "
                f"{missing}, unexpected {unexpected}; set model.clip.layers to the ones it was "
                "trained with."
            )
        self.adapters.load_state_dict(state, strict=False)

    # ------------------------------------------------------------------ text features
    def clear_text_cache(self) -> None:
        """Forget cached text features (e.g. after changing the tokenizer or text weights)."""
        self._text_cache.clear()

    def text_features(self, categories: Sequence[str], device: torch.device | None = None) -> Tensor:
        """Prompt-ensemble text features of each category, from the per-object-name cache.

        Args:
            categories: B category names as on disk.
            device: Where the result lives (default: the model's device).

        Returns:
            (B, D, 2) float32, columns (normal, anomalous), each unit-norm.
        """
        device = device or self._device()
        feats = []
        for category in categories:
            name = object_name_for(category, self.config.object_name)
            cached = self._text_cache.get(name)
            if cached is None:
                cached = self._encode_object(name)
            if cached.device != device:
                cached = cached.to(device)
            self._text_cache[name] = cached
            feats.append(cached)
        return torch.stack(feats, dim=0)

    def _encode_object(self, object_name: str) -> Tensor:
        """Encode the 245 + 175 prompts of one object name: (D, 2) float32, unit columns."""
        prompts = build_prompts(object_name)
        sentences = prompts["normal"] + prompts["anomalous"]
        device = self._device()
        # Normal tensors even when called under torch.inference_mode (Lightning's validation):
        # the cache is reused by training steps, which save it for backward.
        with torch.inference_mode(False), torch.no_grad(), _no_autocast(device):
            tokens = self.tokenizer(sentences).to(device)  # (P, context) int64
            emb = self.clip.encode_text(tokens).float()  # (P, D)
            emb = F.normalize(emb, dim=-1)
            n = len(prompts["normal"])
            classes = [emb[:n].mean(0), emb[n:].mean(0)]
            feats = F.normalize(torch.stack(classes, dim=1), dim=0)  # (D, 2)
        return feats.clone()

    # ------------------------------------------------------------------ forward
    def patch_tokens(self, images: Tensor) -> list[Tensor]:
        """Frozen residual-stream patch tokens of the tapped layers (no class token).

        Args:
            images: (B, 3, H, W) float32, CLIP-normalised frame images.

        Returns:
            L tensors (B, N, C) float32, N = h * w patch tokens in row-major grid order.
        """
        return self.encode_image(images, with_global=False)[0]

    def encode_image(self, images: Tensor, *, with_global: bool) -> tuple[list[Tensor], Tensor | None]:
        """Tapped patch tokens and, when asked, the pooled image feature of the frozen tower.

        Args:
            images: (B, 3, H, W) float32, CLIP-normalised frame images.
            with_global: Also run the remaining blocks and return the pooled, projected class
                token (``ln_post`` then ``proj``) used by ``image_score="clip_global"``.

        Returns:
            (L tensors (B, N, C) float32, (B, D) float32 or None).
        """
        stem_dtype = self.clip.visual.conv1.weight.dtype
        with torch.no_grad(), _no_autocast(images.device):
            out = self.clip.visual.forward_intermediates(
                images.to(stem_dtype),
                indices=self._take_indices,
                stop_early=not with_global,
                intermediates_only=not with_global,
                output_fmt="NLC",
            )
        tokens = [t.float() for t in out["image_intermediates"]]
        pooled = out["image_features"].float() if with_global else None
        return tokens, pooled

    def forward(self, images: Tensor, categories: Sequence[str]) -> ClipOutput:
        """Per-layer anomaly probabilities, the combined map and image scores.

        Args:
            images: (B, 3, H, W) float32, CLIP-normalised; H and W multiples of the patch size.
            categories: B category names (the object name of the prompts comes from these).

        Returns:
            :class:`ClipOutput` with (B, L, 2, H, W), (B, H, W) and (B,) float32 tensors.
        """
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be (B, 3, H, W), got {tuple(images.shape)}")
        batch, _, height, width = images.shape
        if len(categories) != batch:
            raise ValueError(f"got {len(categories)} categories for {batch} images")
        ph, pw = self.patch_size
        if height % ph or width % pw:
            raise ConfigError(
                f"image size {height}x{width} is not a multiple of the patch size {ph}x{pw} of "
                f"model.clip.model_name={self.config.model_name}: set data.image_size accordingly."
            )
        grid = (height // ph, width // pw)
        with_global = self.config.image_score == "clip_global"

        tokens, pooled = self.encode_image(images, with_global=with_global)
        text = self.text_features(categories, device=images.device)  # (B, D, 2)
        layer_probs = []
        with _no_autocast(images.device):
            for adapter, layer_tokens in zip(self.adapters, tokens):
                feats = F.normalize(adapter(layer_tokens), dim=-1)  # (B, N, D)
                logits = self.config.logit_scale * torch.bmm(feats, text)  # (B, N, 2)
                layer_probs.append(upsample_layer_probs(logits, grid, (height, width), self.config.upsample))
            stacked = torch.stack(layer_probs, dim=1)  # (B, L, 2, H, W)
            anomalous = stacked[:, :, 1]  # (B, L, H, W)
            combined = anomalous.mean(1) if self.config.layer_combine == "mean" else anomalous.sum(1)
            anomaly_map = gaussian_blur(combined, self.config.smoothing_sigma)
            if self.config.layer_combine == "mean":
                anomaly_map = anomaly_map.clamp(0.0, 1.0)
            if pooled is not None:
                image_scores = global_image_scores(pooled, text, self.config.logit_scale)
            else:
                image_scores = self._image_scores(anomaly_map)
        return ClipOutput(layer_probs=stacked, anomaly_map=anomaly_map, image_scores=image_scores)

    def _image_scores(self, anomaly_map: Tensor) -> Tensor:
        return image_scores(anomaly_map, method=self.config.image_score, topk_fraction=self.config.topk_fraction)

    def _device(self) -> torch.device:
        return self.adapters[0].weight.device


# ---------------------------------------------------------------------- building
def build_clip_model(config: ClipConfig, *, image_size: int) -> ClipAnomalyModel:
    """Build the frozen open_clip model for ``config`` and wrap it with fresh adapters.

    The architecture comes from open_clip's config registry (clipsam's tiny presets are
    registered on demand), with ``force_image_size=image_size`` so the positional embedding is
    interpolated to the frame. Weights load through open_clip's own pretrained mechanism
    (tag -> cache -> download, or a local file). Nothing downloads when the Hugging Face hub is
    offline (``HF_HUB_OFFLINE=1``): a missing cache raises at once.

    Args:
        config: The stage's configuration.
        image_size: Frame side length (e.g. 518); a multiple of the model's patch size.

    Returns:
        The model on CPU, adapters in train mode, frozen parts in eval mode.

    Raises:
        ConfigError: Unknown model name, layers out of range, preset with a pretrained tag.
        WeightsError: The pretrained weights cannot be found or loaded.
    """
    import open_clip

    name = config.model_name
    if is_tiny_preset(name):
        register_tiny_configs()
        if config.pretrained and not os.path.isfile(str(config.pretrained)):
            raise ConfigError(
                f"model.clip.model_name={name} is a clipsam preset without pretrained tags: set "
                f"model.clip.pretrained=null for random weights or to a local file "
                f"(got {config.pretrained!r})."
            )
    has_schema = name.startswith(("hf-hub:", "local-dir:"))
    if not has_schema and open_clip.get_model_config(name) is None:
        raise ConfigError(
            f"model.clip.model_name={name!r} is not an open_clip model config. Available ViTs "
            f"include: {[m for m in open_clip.list_models() if m.startswith('ViT')][:12]} ... "
            "(open_clip.list_models() lists all)."
        )

    kwargs: dict[str, Any] = {"force_image_size": image_size, "cache_dir": config.cache_dir}
    quick_gelu = config.quick_gelu
    if not config.pretrained:
        if quick_gelu:
            kwargs["force_quick_gelu"] = True
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.seed)
            clip_model = _quiet_create(open_clip, name, None, kwargs)
    else:
        checkpoint = _resolve_pretrained(open_clip, config)
        if quick_gelu is None:
            quick_gelu = bool(checkpoint.get("quick_gelu", False))
        if quick_gelu:
            kwargs["force_quick_gelu"] = True
        try:
            clip_model = _quiet_create(open_clip, name, config.pretrained, kwargs)
        except Exception as err:  # open_clip raises RuntimeError/FileNotFoundError/OSError
            raise WeightsError(_weights_help(config, f"{type(err).__name__}: {err}")) from err

    tokenizer = open_clip.get_tokenizer(name, cache_dir=config.cache_dir)
    return ClipAnomalyModel(clip_model=clip_model, tokenizer=tokenizer, config=config, image_size=image_size)


def _quiet_create(open_clip: Any, name: str, pretrained: str | None, kwargs: dict[str, Any]) -> nn.Module:
    """``open_clip.create_model`` with its root-logger chatter silenced.

    open_clip logs random initialisation as a warning and a failed download as an error on the
    root logger; the failure is re-raised by the caller as one :class:`WeightsError` that says
    what to do, so the log line would only repeat it.
    """
    root = logging.getLogger()
    level = root.level
    root.setLevel(max(level, logging.ERROR) if pretrained is None else max(level, logging.CRITICAL))
    try:
        return open_clip.create_model(name, pretrained=pretrained or None, **kwargs)
    finally:
        root.setLevel(level)


def _resolve_pretrained(open_clip: Any, config: ClipConfig) -> dict[str, Any]:
    """Check ``config.pretrained`` is a known tag or a file before creating anything.

    Returns:
        The open_clip pretrained config of the tag ({} for a local file or a schema name).

    Raises:
        WeightsError: Unknown tag and no such file; or offline with the weights not cached.
    """
    pretrained = str(config.pretrained)
    name = config.model_name
    if name.startswith(("hf-hub:", "local-dir:")):
        return {}
    if os.path.isfile(pretrained):
        return {}
    cfg = open_clip.get_pretrained_cfg(name, pretrained)
    if not cfg:
        tags = open_clip.list_pretrained_tags_by_model(name)
        raise WeightsError(
            f"model.clip.pretrained={pretrained!r} is neither a pretrained tag of {name} "
            f"(available: {tags or 'none'}) nor an existing file: fix the tag, or give the "
            "path of a local checkpoint file."
        )
    if _hub_offline() and not cfg.get("hf_hub") and cfg.get("url"):
        # URL-only tags would try urllib; fail fast offline unless open_clip's cache has the file.
        cache = config.cache_dir or os.path.expanduser("~/.cache/clip")
        if not os.path.isfile(os.path.join(cache, os.path.basename(cfg["url"]))):
            raise WeightsError(_weights_help(config, "HF_HUB_OFFLINE is set and the file is not cached"))
    return cfg


def _hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in {"1", "true", "yes", "on"}


def _weights_help(config: ClipConfig, reason: str) -> str:
    cache = config.cache_dir or "the default Hugging Face cache"
    return (
        f"cannot load pretrained weights model.clip.model_name={config.model_name} "
        f"model.clip.pretrained={config.pretrained!r} from {cache} ({reason.splitlines()[0][:300]}). "
        "To get them: run once on a machine with internet access (open_clip downloads and caches "
        "them), then copy the cache and set model.clip.cache_dir to it; or set "
        "model.clip.pretrained to the path of a local checkpoint file."
    )


def _as_pair(value: Any) -> tuple[int, int]:
    if isinstance(value, (tuple, list)):
        return int(value[0]), int(value[1])
    return int(value), int(value)


def _embed_dim(clip_model: nn.Module) -> int:
    visual = clip_model.visual
    proj = getattr(visual, "proj", None)
    if isinstance(proj, Tensor):
        return int(proj.shape[1])
    output_dim = getattr(visual, "output_dim", None)
    if output_dim is None:
        raise ConfigError("cannot determine the joint embedding width of this open_clip model.")
    return int(output_dim)


def _adapter_shapes_of(state: dict[str, Tensor]) -> list[tuple[int, int]]:
    weights = sorted((k for k in state if k.endswith(".weight")), key=lambda k: int(k.split(".")[0]))
    return [(int(state[k].shape[1]), int(state[k].shape[0])) for k in weights if state[k].dim() == 2]


def _describe_shapes(shapes: list[tuple[int, int]]) -> str:
    unique = sorted(set(shapes))
    text = ", ".join(f"{i}->{o}" for i, o in unique) or "nothing"
    return f"{text} ({len(shapes)} layers)"


def _no_autocast(device: torch.device) -> torch.autocast:
    """Autocast disabled for ``device``'s type (CPU bf16 autocast of attention is pathologically slow)."""
    return torch.autocast(device_type=device.type, enabled=False)
