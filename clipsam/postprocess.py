"""From the evaluation frame back to the image: the one resize that predict and the API share.

``clipsam predict`` (:class:`clipsam.callbacks.PredictionWriter`) and
:class:`clipsam.Segmenter` both call :func:`to_original_size`, so the mask a user gets from the
Python API is the mask the command line writes, pixel for pixel.

Dimension symbols: H x W the frame, H0 x W0 the image as decoded (display orientation).
"""

from __future__ import annotations

import cv2
import numpy as np
import torch

__all__ = ["to_original_size"]


def to_original_size(
    scores: torch.Tensor | np.ndarray, mask: torch.Tensor | np.ndarray, size_hw: tuple[int, int]
) -> tuple[np.ndarray, np.ndarray]:
    """Resize a frame's pixel scores (bilinear) and mask (nearest) to the image's size.

    Args:
        scores: (H, W) float pixel scores in the frame (any float dtype).
        mask: (H, W) bool mask in the frame.
        size_hw: (H0, W0) of the image.

    Returns:
        ``(scores, mask)``: (H0, W0) float32 and (H0, W0) bool numpy arrays.
    """
    if isinstance(scores, torch.Tensor):
        scores = scores.detach().float().cpu().numpy()
    if isinstance(mask, torch.Tensor):
        mask = mask.detach().cpu().numpy()
    height, width = int(size_hw[0]), int(size_hw[1])
    out_scores = cv2.resize(np.asarray(scores, dtype=np.float32), (width, height), interpolation=cv2.INTER_LINEAR)
    out_mask = cv2.resize(np.asarray(mask).astype(np.uint8), (width, height), interpolation=cv2.INTER_NEAREST) > 0
    return out_scores, out_mask
