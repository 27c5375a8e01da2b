"""A tiny numpy backend with the ``clipsam.runtime.Runtime`` interface, for tests and benchmarks.

It thresholds brightness: a pixel's score is its gray value / 255, the mask is
``score >= pixel_threshold`` and the image score is the maximum pixel score. It needs no model,
so the service's HTTP side can be tested and timed without a bundle (``scripts/benchmark_serve.py
--fake``). It is NOT an anomaly detector.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from clipsam.results import SegmentResult

__all__ = ["FakeBackend", "FakeResult"]


FakeResult = SegmentResult  # the fields of clipsam.runtime's results


class FakeBackend:
    """Brightness thresholding behind ``segment_batch`` / ``info`` / ``categories``.

    Args:
        categories: the categories it accepts (the first is the default).
        pixel_threshold / image_threshold: decision thresholds on scores in [0, 1].
        delay_s: seconds each ``segment_batch`` call sleeps (a stand-in for model time).
        per_image_s: further seconds per image of a call.
        gate: when given, every call waits for this event first (tests hold the worker with it;
            ``entered`` is set when a call reaches the gate).
        fail_on_category: a category whose images raise ``RuntimeError`` (tests of error isolation).
    """

    def __init__(
        self,
        categories: tuple[str, ...] = ("bottle", "screw"),
        *,
        pixel_threshold: float = 0.5,
        image_threshold: float = 0.5,
        delay_s: float = 0.0,
        per_image_s: float = 0.0,
        gate: threading.Event | None = None,
        fail_on_category: str | None = None,
    ) -> None:
        self.categories = list(categories)
        self.pixel_threshold = float(pixel_threshold)
        self.image_threshold = float(image_threshold)
        self.delay_s = delay_s
        self.per_image_s = per_image_s
        self.gate = gate
        self.fail_on_category = fail_on_category
        self.entered = threading.Event()  # set when a call starts (before the gate)
        self.batch_sizes: list[int] = []
        self.calls: list[list[str]] = []
        self._lock = threading.Lock()
        self.info: dict[str, Any] = {
            "format": "fake",
            "method": "brightness",
            "refiner": "none",
            "categories": list(categories),
            "thresholds": {"pixel": self.pixel_threshold, "image": self.image_threshold, "scope": "global"},
        }

    def _resolve(self, category: str | None) -> str:
        if category is None:
            return self.categories[0]
        if category not in self.categories:
            raise ValueError(f"unknown category {category!r}")
        return category

    def _segment_one(self, image: Any, category: str) -> FakeResult:
        if category == self.fail_on_category:
            raise RuntimeError(f"fake failure for category {category}")
        if isinstance(image, (str, Path)):
            image = Image.open(image)
        pixels = np.asarray(image.convert("RGB") if isinstance(image, Image.Image) else image, dtype=np.float32)
        scores = (pixels.mean(axis=2) / np.float32(255.0)).astype(np.float32)
        image_score = float(scores.max())
        return FakeResult(
            mask=scores >= self.pixel_threshold,
            scores=scores,
            anomaly_map=scores,
            image_score=image_score,
            label=image_score >= self.image_threshold,
            image_threshold=self.image_threshold,
            pixel_threshold=self.pixel_threshold,
            threshold_scope="global",
            category=category,
            object_name=category,
        )

    def segment_batch(self, images: list, *, category: str | list[str] | None = None) -> list[FakeResult]:
        """Segment ``images``; ``category`` is one name for all, one per image, or None (the default)."""
        self.entered.set()
        if self.gate is not None:
            self.gate.wait()
        names = category if isinstance(category, list) else [category] * len(images)
        if len(names) != len(images):
            raise ValueError(f"{len(names)} categories for {len(images)} images")
        resolved = [self._resolve(name) for name in names]
        with self._lock:
            self.batch_sizes.append(len(images))
            self.calls.append(resolved)
        if self.delay_s or self.per_image_s:
            time.sleep(self.delay_s + self.per_image_s * len(images))
        return [self._segment_one(image, name) for image, name in zip(images, resolved)]

    def segment(self, image: Any, *, category: str | None = None) -> FakeResult:
        """One image (``Runtime.segment``)."""
        return self.segment_batch([image], category=category)[0]
