"""Names of the reported metrics: their column order and short titles (pure, no torch).

Shared by the test report (:mod:`clipsam.reporting`) and the run comparison
(:mod:`clipsam.compare`, which stays light to import).
"""

from __future__ import annotations

__all__ = ["COLUMN_TITLES", "METRIC_COLUMNS"]

METRIC_COLUMNS = (
    "pixel_auroc",
    "pixel_f1_max",
    "pixel_ap",
    "pixel_aupro",
    "image_auroc",
    "image_f1_max",
    "image_ap",
)
"""Column order of the reports; keys missing from the results are skipped."""

COLUMN_TITLES = {
    "pixel_auroc": "P-AUROC",
    "pixel_f1_max": "P-F1max",
    "pixel_ap": "P-AP",
    "pixel_aupro": "P-AUPRO",
    "image_auroc": "I-AUROC",
    "image_f1_max": "I-F1max",
    "image_ap": "I-AP",
}
"""Short column titles: they keep the table readable in an 80-column terminal."""
