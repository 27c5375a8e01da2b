"""What segmenting one image gives, and how a threshold is picked for it (torch-free).

Shared by :class:`clipsam.Segmenter` (the PyTorch path), :class:`clipsam.runtime.Runtime` (the
ONNX runtime) and ``clipsam serve``, so the three return the same fields and decide alike.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import numpy as np

__all__ = ["SegmentResult", "lookup"]


@dataclasses.dataclass
class SegmentResult:
    """What segmenting one image gives: :meth:`clipsam.Segmenter.segment`,
    :meth:`clipsam.runtime.Runtime.segment` and ``clipsam serve`` (its JSON fields).

    Attributes:
        mask: (H0, W0) bool, the decided mask (``model.evaluation.mask_source``) at the image's
            size, in the orientation of the image as given (files: display orientation).
        scores: (H0, W0) float32 fused pixel scores in [0, 1] (what the pixel threshold applies to).
        anomaly_map: (H0, W0) float32 CLIP anomaly map Map_a in [0, 1].
        image_score: the image's anomaly score.
        label: True when ``image_score >= image_threshold`` (anomalous).
        image_threshold: the image threshold used.
        pixel_threshold: the pixel threshold used (for the mask when ``mask_source="score"``).
        threshold_scope: where the thresholds came from: the category, "global" or "default"
            (uncalibrated fallback ``model.evaluation.predict_*_threshold``).
        category: the category the image was segmented as.
        object_name: the object name written in the text prompts.
        path: the file, for path inputs; None otherwise.
    """

    mask: np.ndarray
    scores: np.ndarray
    anomaly_map: np.ndarray
    image_score: float
    label: bool
    image_threshold: float
    pixel_threshold: float
    threshold_scope: str
    category: str
    object_name: str
    path: str | None = None


def lookup(thresholds: Mapping[str, Any] | None, level: str, category: str, default: float) -> tuple[float, str]:
    """The threshold of ``level`` ("image" or "pixel") for ``category``.

    Returns:
        ``(threshold, scope)`` where scope says where it came from: the category name, ``"global"``
        (pooled over the calibration categories) or ``"default"`` (no thresholds file, or no
        usable entry: ``default`` is used).
    """
    if thresholds:
        entries = thresholds.get(level) or {}
        entry = (entries.get("per_category") or {}).get(category)
        if entry:
            return float(entry["threshold"]), category
        entry = entries.get("global")
        if entry:
            return float(entry["threshold"]), "global"
    return float(default), "default"
