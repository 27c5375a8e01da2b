"""Fusion: the CLIP map and SAM's final mask become the pixel scores that metrics rank.

Pixel AUROC and AP rank pixels, so a binary SAM mask alone ranks poorly (two values, many ties);
the paper does not say how M_3 and Map_a are combined, so the combination is a config choice
(``model.evaluation.fusion``). Every method takes and returns values in [0, 1]:

==============  ==========================================================================
method          score per pixel
==============  ==========================================================================
``clip``        ``Map_a``: the CLIP-stage baseline (the SAM stage ignored)
``sam``         ``p``: SAM's mask probability (sigmoid of M_3's logits)
``product``     ``Map_a * p``: both must agree
``mean``        ``(Map_a + p) / 2``
``max``         ``max(Map_a, p)``
``clip_boost``  ``(Map_a + mask) / 2``: every pixel inside SAM's binary mask ranks at or
                above every pixel outside, and Map_a orders pixels within each side (default)
``clip_masked`` ``Map_a * mask``: Map_a inside SAM's mask, 0 outside
==============  ==========================================================================

Default ``clip_boost``: it keeps CLIP's full ranking (AUROC on an image with an empty SAM mask is
exactly CLIP's) while SAM's boundary decides which pixels rank first, which is what F1-max and AP
reward. Dimension symbols: H x W the evaluation frame.
"""

from __future__ import annotations

import math

import torch

__all__ = ["DEFAULT_FUSION", "FUSION_METHODS", "IMAGE_SCORE_METHODS", "fuse_scores", "image_scores"]

FUSION_METHODS: tuple[str, ...] = ("clip", "sam", "product", "mean", "max", "clip_boost", "clip_masked")
"""The valid values of ``method`` (config key ``model.evaluation.fusion``)."""

DEFAULT_FUSION = "clip_boost"
"""The documented default fusion."""


def fuse_scores(
    anomaly_map: torch.Tensor,
    mask_probs: torch.Tensor,
    mask: torch.Tensor,
    *,
    method: str = DEFAULT_FUSION,
) -> torch.Tensor:
    """Combine the CLIP anomaly map with SAM's final mask into pixel scores.

    Args:
        anomaly_map: (H, W) float in [0, 1], ``Map_a`` in the frame.
        mask_probs: (H, W) float in [0, 1], sigmoid of SAM's final mask logits in the frame.
        mask: (H, W) bool, SAM's final binary mask (M_3).
        method: one of :data:`FUSION_METHODS` (see the module docstring).

    Returns:
        (H, W) float32 pixel scores in [0, 1] (inputs are clamped to [0, 1] first).

    Raises:
        ValueError: unknown method or shapes that differ.
    """
    if method not in FUSION_METHODS:
        raise ValueError(f"fusion method {method!r} is not one of {list(FUSION_METHODS)}")
    if not (anomaly_map.shape == mask_probs.shape == mask.shape) or anomaly_map.ndim != 2:
        raise ValueError(
            "anomaly_map, mask_probs and mask must all be (H, W), got "
            f"{tuple(anomaly_map.shape)}, {tuple(mask_probs.shape)}, {tuple(mask.shape)}"
        )
    amap = anomaly_map.to(torch.float32).clamp(0.0, 1.0)
    probs = mask_probs.to(device=amap.device, dtype=torch.float32).clamp(0.0, 1.0)
    inside = mask.to(device=amap.device, dtype=torch.bool)
    if method == "clip":
        out = amap.clone()
    elif method == "sam":
        out = probs.clone()
    elif method == "product":
        out = amap * probs
    elif method == "mean":
        out = (amap + probs) / 2
    elif method == "max":
        out = torch.maximum(amap, probs)
    elif method == "clip_boost":
        out = (amap + inside.to(torch.float32)) / 2
    else:  # clip_masked
        out = amap * inside.to(torch.float32)
    return out.clamp_(0.0, 1.0)


IMAGE_SCORE_METHODS: tuple[str, ...] = ("max", "mean", "topk_mean")
"""The valid values of ``method`` of :func:`image_scores` (config key ``model.clip.image_score``)."""


def image_scores(maps: torch.Tensor, *, method: str = "max", topk_fraction: float = 0.01) -> torch.Tensor:
    """Reduce pixel score maps to one anomaly score per image.

    Used for the CLIP map and for the fused scores alike, so image metrics of the CLIP-only
    baseline and of the full method are computed the same way.

    Args:
        maps: (B, H, W) float pixel scores.
        method: "max" (default), "mean", or "topk_mean" (mean of the top ``topk_fraction`` of
            the pixels, at least one).
        topk_fraction: fraction of pixels averaged by "topk_mean", in (0, 1].

    Returns:
        (B,) float image scores.
    """
    flat = maps.flatten(1)  # (B, H * W)
    if method == "max":
        return flat.amax(dim=1)
    if method == "mean":
        return flat.mean(dim=1)
    if method == "topk_mean":
        k = max(1, math.ceil(topk_fraction * flat.shape[1]))
        return flat.topk(k, dim=1).values.mean(dim=1)
    raise ValueError(f"image score method must be one of {IMAGE_SCORE_METHODS}, got {method!r}")
