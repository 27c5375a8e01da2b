"""Anomaly metrics: exact pure functions and a per-category torchmetrics ``Metric``."""

from clipsam.metrics.collection import PerCategoryMetrics
from clipsam.metrics.functional import (
    AUPRO_PROTOCOLS,
    MetricUndefinedWarning,
    aupro,
    image_metrics,
    pixel_metrics,
    pr_curve,
)

__all__ = [
    "AUPRO_PROTOCOLS",
    "MetricUndefinedWarning", "PerCategoryMetrics", "aupro", "image_metrics", "pixel_metrics", "pr_curve"]
