"""Test overlays: anomalous examples chosen across the whole run, panels captioned."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import torch

from clipsam.module import ClipSamModule
from clipsam.reporting import overlay_caption, render_panel


def _batch(labels: list[int], start: int) -> tuple[dict, dict]:
    n = len(labels)
    batch = {
        "path": [f"/data/img_{start + i}.png" for i in range(n)],
        "category": ["capsule"] * n,
        "label": torch.tensor(labels),
        "image": torch.zeros(n, 3, 8, 8),
        "mask": torch.zeros(n, 8, 8),
    }
    result = {
        "image_scores": torch.linspace(0.1, 0.9, n),
        "anomaly_map": torch.zeros(n, 8, 8),
        "scores": torch.zeros(n, 8, 8),
        "mask": torch.zeros(n, 8, 8, dtype=torch.bool),
    }
    return batch, result


def test_overlays_draw_best_and_worst_examples_over_the_whole_run() -> None:
    """Examples per category over the whole run (anomalies arriving late included): with three
    slots, the highest- and lowest-scoring anomalous image and the worst false alarm."""
    from clipsam.evaluation import EvalConfig, Evaluator

    evaluator = Evaluator(EvalConfig(num_overlays=3), ["x"], device=torch.device("cpu"), with_refiner=True)
    for step, labels in enumerate([[0, 0], [0, 0], [1, 0], [1, 1]]):  # anomalies arrive late
        evaluator._collect_overlays(*_batch(labels, 2 * step))
    kinds = {o["kind"] for o in evaluator.overlays}
    assert kinds == {"anomalous_best", "anomalous_worst", "normal_worst"}
    assert any(o["path"].endswith("img_7.png") for o in evaluator.overlays)


def test_panel_captions_name_file_category_score_threshold() -> None:
    overlay = {
        "path": "/data/part_7.png",
        "category": "capsule",
        "anomalous": True,
        "image_score": 0.8125,
        "image": torch.zeros(3, 40, 40, dtype=torch.uint8),
        "gt": torch.zeros(40, 40, dtype=torch.bool),
        "clip_map": torch.zeros(40, 40),
        "scores": torch.zeros(40, 40),
        "mask": torch.zeros(40, 40, dtype=torch.bool),
    }
    thresholds = {"image": {"global": {"threshold": 0.5}, "per_category": {"capsule": {"threshold": 0.75}}}}
    caption = overlay_caption(overlay, thresholds)
    assert caption == "part_7.png | capsule | score 0.812 | threshold 0.750 | anomalous | truth: anomalous"
    plain = render_panel(overlay)
    captioned = render_panel(overlay, caption)
    assert plain.shape == (40, 200, 3)
    assert captioned.shape[1] == 200 and captioned.shape[0] > 40
    assert np.array_equal(captioned[-40:], plain) and captioned[: captioned.shape[0] - 40].any(), "text drawn above"
