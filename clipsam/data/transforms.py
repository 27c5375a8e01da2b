"""Image/mask transforms into the evaluation frame, and their inverse.

Every image is squash-resized to ``image_size`` x ``image_size`` (the frame, see docs/design.md)
as APRIL-GAN's and AnomalyCLIP's preprocessing does it: PIL's bicubic resize, which is
antialiased (torchvision's ``Resize(..., antialias=True)`` on a PIL image calls it), on the
uint8 image. OpenCV's ``INTER_CUBIC`` does not antialias and differs by about 10 grey levels on
average on a textured 1024 -> 518 image. The mask is resized as the references resize theirs:
the 0/255 mask bilinearly with PIL, then ``> 0.5`` of 255 (nearest-neighbour would lose or
shift thin defects). Then albumentations applies the training augmentations (off by default;
identical on image and mask), CLIP's mean/std normalisation and the tensor conversion.

Dimension symbols: B batch, H x W frame (``image_size`` x ``image_size``).
"""

from __future__ import annotations

from dataclasses import dataclass

from typing import Any

import albumentations as A
import numpy as np
import torch
from albumentations.pytorch import ToTensorV2
from PIL import Image

# Built in clipsam.inputs (the one place model inputs are made); re-exported for existing imports.
from clipsam.inputs import CLIP_MEAN, CLIP_STD, build_sam_input, sam_input_size

__all__ = [
    "CLIP_MEAN",
    "CLIP_STD",
    "AugmentConfig",
    "FrameTransform",
    "build_sam_input",
    "build_transform",
    "denormalize",
    "resize_image",
    "resize_mask",
    "sam_input_size",
]



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


def _hw(size: int | tuple[int, int] | list[int]) -> tuple[int, int]:
    """(height, width) of a square side or an (H, W) pair (the canvas of tiled inference)."""
    if isinstance(size, int):
        return (size, size)
    return (int(size[0]), int(size[1]))


def resize_image(image: np.ndarray, size: int | tuple[int, int]) -> np.ndarray:
    """Squash-resize an RGB image to ``size`` x ``size`` (or (H, W)) with PIL's antialiased bicubic filter.

    The same pixels as torchvision's ``Resize((size, size), InterpolationMode.BICUBIC)`` on a
    PIL image (APRIL-GAN's and open_clip's preprocessing).

    Args:
        image: uint8 (H0, W0, 3) RGB.
        size: Side of the frame.

    Returns:
        uint8 (size, size, 3) RGB.
    """
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"image must be uint8 (H, W, 3), got {image.dtype} {image.shape}")
    height, width = _hw(size)
    if image.shape[:2] == (height, width):
        return image
    resized = Image.fromarray(image).resize((width, height), Image.Resampling.BICUBIC)
    return np.asarray(resized)


def resize_mask(mask: np.ndarray, size: int | tuple[int, int]) -> np.ndarray:
    """Resize a binary mask as the references do: 0/255 bilinearly with PIL, then ``> 0.5``.

    APRIL-GAN and AnomalyCLIP resize the 0/255 mask with torchvision's ``Resize`` (bilinear,
    PIL) and threshold ``ToTensor()`` of it at 0.5, i.e. a resized value of at least 128.

    Args:
        mask: (H0, W0) bool or uint8 {0, 1}.
        size: Side of the frame.

    Returns:
        uint8 (size, size) in {0, 1}.
    """
    if mask.ndim != 2:
        raise ValueError(f"mask must be (H, W), got shape {mask.shape}")
    binary = (np.asarray(mask) > 0).astype(np.uint8)
    height, width = _hw(size)
    if binary.shape == (height, width):
        return binary
    resized = Image.fromarray(binary * 255, mode="L").resize((width, height), Image.Resampling.BILINEAR)
    return (np.asarray(resized) > 127).astype(np.uint8)


class FrameTransform:
    """Decoded image (and mask) -> frame tensors: PIL resize, then albumentations.

    Call it as ``transform(image=image, mask=mask)`` with image uint8 (H0, W0, 3) RGB and mask
    uint8 (H0, W0) in {0, 1}; it returns ``image`` float32 (3, H, W) CLIP-normalised and
    ``mask`` uint8 (H, W) in {0, 1}, H = W = ``image_size``.

    Args:
        image_size: Side of the square frame in pixels.
        augment: Training augmentations, applied after the resize; None means none.
        seed: Seed of albumentations' random source (only matters with augmentations).
    """

    def __init__(self, image_size: int | tuple[int, int], *, augment: AugmentConfig | None = None, seed: int | None = None) -> None:
        if min(_hw(image_size)) <= 0:
            raise ValueError(f"image_size must be positive, got {image_size}")
        self.image_size = image_size if isinstance(image_size, int) else _hw(image_size)
        steps: list[A.BasicTransform] = list(augment.transforms()) if augment is not None else []
        steps += [A.Normalize(mean=CLIP_MEAN, std=CLIP_STD, max_pixel_value=255.0), ToTensorV2()]
        self.compose = A.Compose(steps, seed=seed)

    def __call__(self, *, image: np.ndarray, mask: np.ndarray) -> dict[str, Any]:
        frame = resize_image(image, self.image_size)
        frame_mask = resize_mask(mask, self.image_size)
        return self.compose(image=frame, mask=frame_mask)


def build_transform(
    image_size: int | tuple[int, int],
    *,
    augment: AugmentConfig | None = None,
    seed: int | None = None,
) -> FrameTransform:
    """The transform from a decoded image (and mask) to frame tensors (:class:`FrameTransform`).

    Args:
        image_size: side of the square frame in pixels, or (height, width) (the canvas of
            tiled inference, :mod:`clipsam.tiling`).
        augment: training augmentations, applied after the resize; None means none.
        seed: seed of albumentations' random source (only matters with augmentations).
    """
    return FrameTransform(image_size, augment=augment, seed=seed)


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
