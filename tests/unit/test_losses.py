"""Focal and dice losses against hand-computed values and APRIL-GAN's formulas."""

from __future__ import annotations

import math

import pytest
import torch

from clipsam.losses import anomaly_loss, dice_loss, focal_loss


def _april_gan_focal(probs: torch.Tensor, target: torch.Tensor, gamma: float = 2.0) -> torch.Tensor:
    """Transcription of APRIL-GAN's FocalLoss.forward (alpha None, smooth 1e-5, mean)."""
    smooth = 1e-5
    logit = probs.reshape(probs.shape[0], 2, -1).permute(0, 2, 1).reshape(-1, 2)
    idx = target.reshape(-1, 1).long()
    one_hot = torch.zeros(idx.shape[0], 2).scatter_(1, idx, 1)
    one_hot = one_hot.clamp(smooth / (2 - 1), 1.0 - smooth)
    pt = (one_hot * logit).sum(1) + smooth
    return (-1 * torch.ones_like(pt) * (1 - pt) ** gamma * pt.log()).mean()


def _april_gan_dice(p: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    n = t.shape[0]
    pf, tf = p.reshape(n, -1), t.reshape(n, -1)
    eff = (2 * (pf * tf).sum(1) + 1) / (pf.sum(1) + tf.sum(1) + 1)
    return 1 - eff.sum() / n


def test_focal_hand_computed_uniform_probs():
    probs = torch.full((1, 2, 2, 2), 0.5)
    target = torch.zeros(1, 2, 2)
    pt = 0.5 * (1 - 1e-5) + 0.5 * 1e-5 + 1e-5
    expected = -((1 - pt) ** 2) * math.log(pt)
    assert focal_loss(probs, target).item() == pytest.approx(expected, rel=1e-6)


def test_focal_matches_april_gan():
    gen = torch.Generator().manual_seed(0)
    probs = torch.softmax(torch.randn(3, 2, 8, 9, generator=gen), dim=1)
    target = (torch.rand(3, 8, 9, generator=gen) > 0.7).float()
    assert focal_loss(probs, target).item() == pytest.approx(_april_gan_focal(probs, target).item(), rel=1e-6)
    assert focal_loss(probs, target, gamma=0.0).item() == pytest.approx(
        _april_gan_focal(probs, target, gamma=0.0).item(), rel=1e-6
    )


def test_focal_near_zero_for_perfect_prediction():
    target = torch.tensor([[[0.0, 1.0], [1.0, 0.0]]])
    probs = torch.stack((1 - target, target), dim=1)
    assert focal_loss(probs, target).item() < 1e-9


def test_dice_hand_computed_and_april_gan():
    p = torch.full((1, 2, 2), 0.5)
    t = torch.zeros(1, 2, 2)
    assert dice_loss(p, t).item() == pytest.approx(1 - 1 / (2.0 + 1), rel=1e-6)
    gen = torch.Generator().manual_seed(1)
    p = torch.rand(4, 6, 5, generator=gen)
    t = (torch.rand(4, 6, 5, generator=gen) > 0.5).float()
    assert dice_loss(p, t).item() == pytest.approx(_april_gan_dice(p, t).item(), rel=1e-6)
    assert dice_loss(t, t).item() == pytest.approx(0.0, abs=1e-6)


def test_masks_are_binarised_at_half():
    p = torch.rand(2, 4, 4, generator=torch.Generator().manual_seed(2))
    soft = torch.tensor(0.6).expand(2, 4, 4)
    assert dice_loss(p, soft).item() == pytest.approx(dice_loss(p, torch.ones(2, 4, 4)).item())
    assert dice_loss(p, torch.full((2, 4, 4), 255.0)).item() == pytest.approx(dice_loss(p, torch.ones(2, 4, 4)).item())


def test_anomaly_loss_sums_layers_and_backpropagates():
    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(2, 1, 2, 8, 8, generator=gen).repeat(1, 3, 1, 1, 1).requires_grad_(True)
    probs = logits.softmax(dim=2)
    masks = torch.rand(2, 8, 8, generator=gen) > 0.8
    out = anomaly_loss(probs, masks)
    assert set(out) == {"loss", "focal", "dice"}
    one_focal = focal_loss(probs[:, 0], masks)
    one_dice = dice_loss(probs[:, 0, 1], masks)
    assert out["focal"].item() == pytest.approx(3 * one_focal.item(), rel=1e-5)
    assert out["dice"].item() == pytest.approx(3 * one_dice.item(), rel=1e-5)
    assert out["loss"].item() == pytest.approx(out["focal"].item() + out["dice"].item(), rel=1e-6)
    out["loss"].backward()
    assert logits.grad is not None and torch.isfinite(logits.grad).all()


def test_shape_errors():
    with pytest.raises(ValueError, match="B, 2, H, W"):
        focal_loss(torch.rand(1, 3, 4, 4), torch.zeros(1, 4, 4))
    with pytest.raises(ValueError, match="B, L, 2, H, W"):
        anomaly_loss(torch.rand(1, 2, 4, 4), torch.zeros(1, 4, 4))
