"""Anomaly metrics: exact pure functions and a per-category torchmetrics ``Metric``."""

from clipsam.metrics.collection import PerCategoryMetrics
from clipsam.metrics.functional import MetricUndefinedWarning, aupro, image_metrics, pixel_metrics, pr_curve

__all__ = ["MetricUndefinedWarning", "PerCategoryMetrics", "aupro", "image_metrics", "pixel_metrics", "pr_curve"]
