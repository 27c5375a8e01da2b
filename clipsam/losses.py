"""Segmentation losses of the CLIP stage (pure torch).

The per-layer loss of APRIL-GAN (the protocol the paper shares with APRIL-GAN and AnomalyCLIP): focal loss
(gamma 2) on the two-channel (normal, anomalous) softmax plus a binary dice loss on the
anomalous channel, summed over the tapped layers.

Dimension symbols: B batch, L tapped layers, H x W image (the evaluation frame).
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["anomaly_loss", "dice_loss", "focal_loss"]

_FOCAL_SMOOTH = 1e-5  # APRIL-GAN's FocalLoss default (label smoothing and log guard)
_DICE_SMOOTH = 1.0  # APRIL-GAN's BinaryDiceLoss


def _binary_target(target: Tensor) -> Tensor:
    """Masks as float {0, 1}: values > 0.5 are anomalous (as APRIL-GAN thresholds them)."""
    return (target > 0.5).to(torch.float32)


def focal_loss(probs: Tensor, target: Tensor, gamma: float = 2.0) -> Tensor:
    """Focal loss on class probabilities, as APRIL-GAN's ``FocalLoss`` (alpha None, smooth 1e-5).

    For each pixel with true class ``t``, the smoothed one-hot ``y`` (entries clamped to
    ``[1e-5, 1 - 1e-5]``) gives ``p_t = sum_c y_c * probs_c + 1e-5`` and the loss
    ``-(1 - p_t) ** gamma * log(p_t)``, averaged over all pixels of the batch.

    Args:
        probs: (B, 2, H, W) float, softmax probabilities over (normal, anomalous), in [0, 1].
        target: (B, H, W) float or bool ground truth; values > 0.5 are anomalous.
        gamma: Focusing parameter (2 in the paper).

    Returns:
        () float32 scalar.
    """
    if probs.dim() != 4 or probs.shape[1] != 2:
        raise ValueError(f"probs must be (B, 2, H, W), got {tuple(probs.shape)}")
    if target.shape != probs.shape[:1] + probs.shape[2:]:
        raise ValueError(f"target must be {tuple(probs.shape[:1] + probs.shape[2:])}, got {tuple(target.shape)}")
    probs = probs.float()
    anomalous = _binary_target(target)
    one_hot = torch.stack((1.0 - anomalous, anomalous), dim=1)  # (B, 2, H, W)
    one_hot = one_hot.clamp(_FOCAL_SMOOTH, 1.0 - _FOCAL_SMOOTH)  # num_class - 1 == 1
    pt = (one_hot * probs).sum(dim=1) + _FOCAL_SMOOTH  # (B, H, W)
    return (-((1.0 - pt) ** gamma) * pt.log()).mean()


def dice_loss(probs_anomalous: Tensor, target: Tensor) -> Tensor:
    """Binary dice loss, as APRIL-GAN's ``BinaryDiceLoss`` (smooth 1, mean over images).

    ``1 - mean_b (2 * sum(p * t) + 1) / (sum(p) + sum(t) + 1)``.

    Args:
        probs_anomalous: (B, H, W) float, probability of "anomalous", in [0, 1].
        target: (B, H, W) float or bool ground truth; values > 0.5 are anomalous.

    Returns:
        () float32 scalar.
    """
    if probs_anomalous.shape != target.shape:
        raise ValueError(
            f"probs_anomalous {tuple(probs_anomalous.shape)} and target {tuple(target.shape)} differ"
        )
    batch = probs_anomalous.shape[0]
    p = probs_anomalous.float().reshape(batch, -1)
    t = _binary_target(target).reshape(batch, -1)
    dice = (2.0 * (p * t).sum(1) + _DICE_SMOOTH) / (p.sum(1) + t.sum(1) + _DICE_SMOOTH)
    return 1.0 - dice.mean()


def anomaly_loss(layer_probs: Tensor, masks: Tensor, *, focal_gamma: float = 2.0) -> dict[str, Tensor]:
    """Training loss of the adapters: focal + dice per tapped layer, summed over layers.

    Args:
        layer_probs: (B, L, 2, H, W) float, per-layer softmax over (normal, anomalous)
            (``ClipOutput.layer_probs``).
        masks: (B, H, W) float or bool ground truth in the same frame; values > 0.5 anomalous.
        focal_gamma: Focal loss gamma.

    Returns:
        ``{"loss": focal + dice, "focal": sum over layers, "dice": sum over layers}``, each a
        () float32 scalar; only ``loss`` needs backpropagating, the others are for logging.
    """
    if layer_probs.dim() != 5 or layer_probs.shape[2] != 2:
        raise ValueError(f"layer_probs must be (B, L, 2, H, W), got {tuple(layer_probs.shape)}")
    focal = layer_probs.new_zeros((), dtype=torch.float32)
    dice = layer_probs.new_zeros((), dtype=torch.float32)
    for layer in range(layer_probs.shape[1]):
        probs = layer_probs[:, layer]  # (B, 2, H, W)
        focal = focal + focal_loss(probs, masks, gamma=focal_gamma)
        dice = dice + dice_loss(probs[:, 1], masks)
    return {"loss": focal + dice, "focal": focal, "dice": dice}
