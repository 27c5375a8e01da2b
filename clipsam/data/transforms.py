"""Image/mask transforms (albumentations) into the evaluation frame, and their inverse.

Every image is resized to ``image_size`` x ``image_size`` (the frame, see docs/design.md) with
bicubic interpolation (as CLIP's preprocessing), its mask with nearest-neighbour so it stays
binary, then normalised with CLIP's mean/std and turned into a tensor. Augmentations are off by
default (the protocol trains without them) and apply identically to image and mask.

Dimension symbols: B batch, H x W frame (``image_size`` x ``image_size``).
"""

from __future__ import annotations

from dataclasses import dataclass

import albumentations as A
import cv2
import torch
from albumentations.pytorch import ToTensorV2

__all__ = ["CLIP_MEAN", "CLIP_STD", "AugmentConfig", "build_transform", "denormalize"]

#: open_clip's OPENAI_DATASET_MEAN / OPENAI_DATASET_STD (RGB, for pixel values in [0, 1]).
CLIP_MEAN: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)


@dataclass
class AugmentConfig:
    """Training augmentations; every one is off (probability or strength 0) by default.

    Attributes:
        hflip: probability of a horizontal flip.
        vflip: probability of a vertical flip.
        rotate90: probability of a rotation by a random multiple of 90 degrees.
        brightness: colour-jitter brightness strength (factor drawn from [1-b, 1+b]).
        contrast: colour-jitter contrast strength.
        saturation: colour-jitter saturation strength.
        hue: colour-jitter hue shift, in [0, 0.5].
        color_jitter_p: probability of applying the colour jitter when any strength is > 0.
    """

    hflip: float = 0.0
    vflip: float = 0.0
    rotate90: float = 0.0
    brightness: float = 0.0
    contrast: float = 0.0
    saturation: float = 0.0
    hue: float = 0.0
    color_jitter_p: float = 0.5

    def transforms(self) -> list[A.BasicTransform]:
        """The albumentations transforms this config switches on (empty when all are off)."""
        out: list[A.BasicTransform] = []
        if self.hflip > 0:
            out.append(A.HorizontalFlip(p=self.hflip))
        if self.vflip > 0:
            out.append(A.VerticalFlip(p=self.vflip))
        if self.rotate90 > 0:
            out.append(A.RandomRotate90(p=self.rotate90))
        if max(self.brightness, self.contrast, self.saturation, self.hue) > 0:
            out.append(
                A.ColorJitter(
                    brightness=(1 - self.brightness, 1 + self.brightness),
                    contrast=(1 - self.contrast, 1 + self.contrast),
                    saturation=(1 - self.saturation, 1 + self.saturation),
                    hue=(-self.hue, self.hue),
                    p=self.color_jitter_p,
                )
            )
        return out


def build_transform(
    image_size: int | tuple[int, int],
    *,
    augment: AugmentConfig | None = None,
    seed: int | None = None,
) -> A.Compose:
    """The transform from a decoded image (and mask) to frame tensors.

    Call it as ``transform(image=image, mask=mask)`` with image uint8 (H0, W0, 3) RGB and mask
    uint8 (H0, W0) in {0, 1}; it returns ``image`` float32 (3, H, W) CLIP-normalised and
    ``mask`` uint8 (H, W) in {0, 1}, H = W = ``image_size``.

    Args:
        image_size: side of the square frame in pixels, or (height, width) (the canvas of
            tiled inference, :mod:`clipsam.tiling`).
        augment: training augmentations, applied after the resize; None means none.
        seed: seed of albumentations' random source (only matters with augmentations).
    """
    height, width = (image_size, image_size) if isinstance(image_size, int) else (int(image_size[0]), int(image_size[1]))
    if height <= 0 or width <= 0:
        raise ValueError(f"image_size must be positive, got {image_size}")
    steps: list[A.BasicTransform] = [
        A.Resize(height, width, interpolation=cv2.INTER_CUBIC, mask_interpolation=cv2.INTER_NEAREST)
    ]
    if augment is not None:
        steps += augment.transforms()
    steps += [A.Normalize(mean=CLIP_MEAN, std=CLIP_STD, max_pixel_value=255.0), ToTensorV2()]
    return A.Compose(steps, seed=seed)


def denormalize(image: torch.Tensor) -> torch.Tensor:
    """Invert the CLIP normalisation of :func:`build_transform`.

    Args:
        image: float (3, H, W) or (B, 3, H, W), CLIP-normalised.

    Returns:
        uint8 tensor of the same layout, RGB in [0, 255], on the same device.
    """
    if image.ndim not in (3, 4) or image.shape[-3] != 3:
        raise ValueError(f"expected (3, H, W) or (B, 3, H, W), got shape {tuple(image.shape)}")
    mean = torch.tensor(CLIP_MEAN, dtype=torch.float32, device=image.device).view(3, 1, 1)
    std = torch.tensor(CLIP_STD, dtype=torch.float32, device=image.device).view(3, 1, 1)
    pixels = (image.float() * std + mean) * 255.0
    return pixels.round().clamp(0, 255).to(torch.uint8)
