"""UMCI map producer of the ClipSAM reconstruction ("ClipSAM-rec"): strip and multi-scale interaction.

ClipSAM (arXiv 2401.12665) released no code and its method section was not available here. Its
abstract says UMCI "makes the text features and the features of several CLIP layers interact, at
the row/column (strip) level and at the multi-scale level"; this module is the reconstruction of
every choice a config key. Report it as "ClipSAM-rec".

Per tapped layer l of the frozen CLIP visual tower (patch tokens ``X_l``, (B, N, C)):

- ``V = Linear_l(X_l)`` on the h x w grid, (B, D, h, w) -- the APRIL-GAN adapter's place;
- strip: the row means ``V.mean(w)`` (B, h, D) and column means ``V.mean(h)`` (B, w, D) are queries
  of a multi-head cross-attention (``num_heads``, 8) whose keys and values are the ensemble text
  features ``T`` (B, 2, D) (normal, anomalous); row results are broadcast along each row, column
  results along each column, and summed -- :func:`strip_interaction`;
- scale: average pooling with kernels ``scales`` ({1, 3, 5}, stride 1, same padding), concatenated
  on channels, a 1x1 convolution back to D -- :func:`multiscale_pool`;
- ``F = V + strip + scale``; ``P = softmax(logit_scale * <F/|F|, T>)`` over (normal, anomalous),
  brought to the frame as the CLIP stage does (``clip.upsample``); Map_a = the anomalous
  probability combined over layers (``clip.layer_combine``), smoothed (``clip.smoothing_sigma``);
  the image score is ``clip.image_score`` (``clip_global``: the CLS zero-shot score).

Trained like APRIL-GAN: focal + dice per layer, summed (:func:`clipsam.losses.anomaly_loss`).
Only the UMCI parameters train; the open_clip model is the frozen backbone of
:func:`clipsam.models.clip.build_clip_model` (composed, not subclassed).

Dimension symbols: B batch, L tapped layers, C token width, D joint embedding width,
h x w patch grid, H x W frame, N = h * w.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from clipsam.errors import ConfigError
from clipsam.fusion import image_scores
from clipsam.losses import anomaly_loss
from clipsam.methods.base import MapOutput, MapProducer
from clipsam.models.clip import (
    ClipAnomalyModel,
    ClipConfig,
    build_clip_model,
    gaussian_blur,
    global_image_scores,
    upsample_layer_probs,
)

__all__ = [
    "CONFIG",
    "UmciConfig",
    "UmciLayer",
    "UmciProducer",
    "build",
    "multiscale_pool",
    "strip_interaction",
]


@dataclasses.dataclass
class UmciConfig:
    """Settings of ClipSAM-rec's UMCI (``model.method_config`` of umci).

    Attributes:
        clip: the frozen backbone, tapped layers, prompts, smoothing, image score and logit
            scale (the keys of ``model.clip``; its adapters are not used).
        num_heads: heads of the strip cross-attention (the reconstruction's choice: 8); must divide D.
        strip: switch the strip (row/column) interaction on.
        scale: switch the multi-scale interaction on.
        scales: average-pooling kernel sizes of the multi-scale branch (odd, stride 1,
            same padding, padded cells not counted).
        zero_init: initialise the output projections of both branches to zero, so training
            starts from ``F = V`` (the APRIL-GAN adapter) and learns the interactions (our choice).
        focal_gamma: focal-loss gamma of the per-layer loss.
        seed: seed of the UMCI parameters' initialisation.
    """

    clip: ClipConfig = dataclasses.field(default_factory=ClipConfig)
    num_heads: int = 8
    strip: bool = True
    scale: bool = True
    scales: list[int] = dataclasses.field(default_factory=lambda: [1, 3, 5])
    zero_init: bool = True
    focal_gamma: float = 2.0
    seed: int = 0

    def __post_init__(self) -> None:
        if isinstance(self.clip, Mapping):
            self.clip = ClipConfig(**self.clip)
        self.scales = [int(k) for k in self.scales]
        if self.num_heads < 1:
            raise ConfigError(f"model.method_config.num_heads={self.num_heads} must be >= 1")
        if not self.scales or any(k < 1 or k % 2 == 0 for k in self.scales):
            raise ConfigError(f"model.method_config.scales={self.scales} must be a non-empty list of odd kernel sizes")


CONFIG = UmciConfig


# ---------------------------------------------------------------------- pure parts
def strip_interaction(
    values: Tensor, text: Tensor, row_attention: nn.MultiheadAttention, column_attention: nn.MultiheadAttention
) -> Tensor:
    """Strip interaction: row and column means of V cross-attend to the text, broadcast back.

    Args:
        values: (B, D, h, w) float32, V on the patch grid.
        text: (B, 2, D) float32, the (normal, anomalous) text features T.
        row_attention: ``batch_first`` attention (D, heads) for the h row means.
        column_attention: ``batch_first`` attention (D, heads) for the w column means.

    Returns:
        (B, D, h, w) float32: ``rows[:, :, i] + cols[:, :, j]`` at grid cell (i, j).
    """
    rows = values.mean(dim=3).transpose(1, 2)  # (B, h, D)
    cols = values.mean(dim=2).transpose(1, 2)  # (B, w, D)
    row_out, _ = row_attention(rows, text, text, need_weights=False)  # (B, h, D)
    col_out, _ = column_attention(cols, text, text, need_weights=False)  # (B, w, D)
    return row_out.transpose(1, 2)[:, :, :, None] + col_out.transpose(1, 2)[:, :, None, :]  # (B, D, h, w)


def multiscale_pool(values: Tensor, scales: Sequence[int], fuse: nn.Conv2d) -> Tensor:
    """Multi-scale interaction: stride-1 average pools of V, concatenated, 1x1 convolution.

    Args:
        values: (B, D, h, w) float32.
        scales: odd kernel sizes k; each pool has padding k // 2 and ignores padded cells.
        fuse: 1x1 convolution from ``len(scales) * D`` to D channels.

    Returns:
        (B, D, h, w) float32.
    """
    pooled = [
        F.avg_pool2d(values, kernel_size=k, stride=1, padding=k // 2, count_include_pad=False) for k in scales
    ]
    return fuse(torch.cat(pooled, dim=1))  # (B, D, h, w)


class UmciLayer(nn.Module):
    """UMCI of one tapped layer: tokens (B, N, C) + text (B, 2, D) -> features F (B, D, h, w).

    Args:
        token_width: C.
        embed_dim: D.
        config: the UMCI settings.
    """

    def __init__(self, *, token_width: int, embed_dim: int, config: UmciConfig) -> None:
        super().__init__()
        if embed_dim % config.num_heads:
            raise ConfigError(
                f"model.method_config.num_heads={config.num_heads} does not divide the embedding width {embed_dim}"
            )
        self.config = config
        self.value = nn.Linear(token_width, embed_dim)
        self.row_attention = nn.MultiheadAttention(embed_dim, config.num_heads, batch_first=True) if config.strip else None
        self.column_attention = (
            nn.MultiheadAttention(embed_dim, config.num_heads, batch_first=True) if config.strip else None
        )
        self.fuse = nn.Conv2d(len(config.scales) * embed_dim, embed_dim, kernel_size=1) if config.scale else None
        if config.zero_init:
            for layer in (
                self.row_attention.out_proj if self.row_attention is not None else None,
                self.column_attention.out_proj if self.column_attention is not None else None,
                self.fuse,
            ):
                if layer is not None:
                    nn.init.zeros_(layer.weight)
                    nn.init.zeros_(layer.bias)

    def forward(self, tokens: Tensor, text: Tensor, grid: tuple[int, int]) -> Tensor:
        """Args: tokens (B, N, C) float32 row-major; text (B, 2, D); grid (h, w). Returns (B, D, h, w)."""
        batch = tokens.shape[0]
        values = self.value(tokens).transpose(1, 2).reshape(batch, -1, *grid)  # (B, D, h, w)
        out = values
        if self.row_attention is not None and self.column_attention is not None:
            out = out + strip_interaction(values, text, self.row_attention, self.column_attention)
        if self.fuse is not None:
            out = out + multiscale_pool(values, self.config.scales, self.fuse)
        return out


class UmciProducer(MapProducer):
    """ClipSAM-rec's UMCI map producer over a frozen CLIP backbone.

    Args:
        backbone: a :class:`ClipAnomalyModel` (its open_clip model, taps and text features are
            used; its own adapters are frozen and unused).
        config: the UMCI settings.
    """

    name = "umci"
    trainable = True

    def __init__(self, *, backbone: ClipAnomalyModel, config: UmciConfig) -> None:
        super().__init__()
        self.backbone = backbone
        self.backbone.requires_grad_(False)
        self.config = config
        token_width, embed_dim = backbone.adapter_shapes[0]
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.seed)
            self.layers = nn.ModuleList(
                UmciLayer(token_width=token_width, embed_dim=embed_dim, config=config) for _ in config.clip.layers
            )

    def train(self, mode: bool = True) -> UmciProducer:
        """Train mode for the UMCI layers; the backbone's frozen model stays in eval."""
        super().train(mode)
        self.backbone.train(False)
        return self

    def forward(self, images: Tensor, categories: Sequence[str]) -> MapOutput:
        """Per-layer probabilities, Map_a and image scores.

        Args:
            images: (B, 3, H, W) float32, CLIP-normalised frame; H, W multiples of the patch.
            categories: B category names.

        Returns:
            :class:`MapOutput`: anomaly_map (B, H, W) in [0, 1], image_scores (B,), extras
            ``{"layer_probs": (B, L, 2, H, W)}``.
        """
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be (B, 3, H, W), got {tuple(images.shape)}")
        batch, _, height, width = images.shape
        if len(categories) != batch:
            raise ValueError(f"got {len(categories)} categories for {batch} images")
        ph, pw = self.backbone.patch_size
        if height % ph or width % pw:
            raise ConfigError(
                f"image size {height}x{width} is not a multiple of the patch size {ph}x{pw} of "
                f"model.method_config.clip.model_name={self.config.clip.model_name}: set data.image_size accordingly"
            )
        grid = (height // ph, width // pw)
        clip_cfg = self.config.clip
        with_global = clip_cfg.image_score == "clip_global"
        tokens, pooled = self.backbone.encode_image(images, with_global=with_global)  # L x (B, N, C), (B, D)
        text = self.backbone.text_features(categories, device=images.device)  # (B, D, 2)
        layer_probs = []
        with torch.autocast(device_type=images.device.type, enabled=False):
            for layer, layer_tokens in zip(self.layers, tokens):
                feats = F.normalize(layer(layer_tokens, text.transpose(1, 2), grid), dim=1)  # (B, D, h, w)
                logits = clip_cfg.logit_scale * torch.einsum("bdhw,bdk->bhwk", feats, text)  # (B, h, w, 2)
                layer_probs.append(
                    upsample_layer_probs(logits.flatten(1, 2), grid, (height, width), clip_cfg.upsample)
                )  # (B, 2, H, W)
            stacked = torch.stack(layer_probs, dim=1)  # (B, L, 2, H, W)
            anomalous = stacked[:, :, 1]  # (B, L, H, W)
            combined = anomalous.mean(1) if clip_cfg.layer_combine == "mean" else anomalous.sum(1)
            anomaly_map = gaussian_blur(combined, clip_cfg.smoothing_sigma)
            if clip_cfg.layer_combine == "mean":
                anomaly_map = anomaly_map.clamp(0.0, 1.0)
            if pooled is not None:
                scores = global_image_scores(pooled, text, clip_cfg.logit_scale)
            else:
                scores = self.score_maps(anomaly_map)
        return MapOutput(anomaly_map=anomaly_map, image_scores=scores, extras={"layer_probs": stacked})

    def score_maps(self, maps: Tensor) -> Tensor:
        """(B, H, W) pixel scores -> (B,) image scores by ``clip.image_score`` (also for fused maps).

        ``clip_global`` is not a reduction of a map: fused maps are then reduced by the maximum
        (the CLS score itself is :attr:`MapOutput.image_scores`).
        """
        cfg = self.config.clip
        method = "max" if cfg.image_score == "clip_global" else cfg.image_score
        return image_scores(maps, method=method, topk_fraction=cfg.topk_fraction)

    def loss(self, output: MapOutput, batch: Mapping[str, Any]) -> dict[str, Tensor]:
        """APRIL-GAN's loss: focal + dice per layer on ``batch["mask"]`` (B, H, W), summed."""
        return anomaly_loss(output.extras["layer_probs"], batch["mask"], focal_gamma=self.config.focal_gamma)


def build(config: UmciConfig, *, image_size: int) -> UmciProducer:
    """Build the frozen backbone of ``config.clip`` (weights as the CLIP stage resolves them) and UMCI."""
    return UmciProducer(backbone=build_clip_model(config.clip, image_size=image_size), config=config)
