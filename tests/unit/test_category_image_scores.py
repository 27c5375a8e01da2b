"""A reference that scores images relative to their category (SDP's per-category min-max):
``clipsam test`` computes it over each whole category; a single image keeps its own score."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

from clipsam.evaluation import EvalConfig, Evaluator
from clipsam.methods.sdp import category_minmax_image_scores
from clipsam.module import ClipSamModule

TINY_SDP = {
    "model_name": "clipsam-tiny-240",
    "pretrained": None,
    "input_size": None,
    "layers": [1, 2, 3, 4],
    "dbscan_eps": 1.5,
    "dbscan_min_samples": 5,
}


def _originals(n: int, seed: int = 0) -> list[np.ndarray]:
    gen = np.random.default_rng(seed)
    return [gen.integers(0, 256, (40 + 4 * i, 56, 3), dtype=np.uint8) for i in range(n)]


@pytest.fixture(scope="module")
def sdp_module() -> ClipSamModule:
    return ClipSamModule(method="sdp", method_config=TINY_SDP, refiner="none", image_size=64)


def test_test_metrics_use_the_category_minmax_score(sdp_module: ClipSamModule) -> None:
    pipeline = sdp_module.pipeline
    combine = pipeline.category_image_scores()
    assert combine is not None
    categories = ["a", "a", "a", "b", "b", "b"]
    batch = pipeline.make_batch(_originals(6), categories)
    batch["label"] = torch.tensor([0, 1, 1, 1, 0, 0])
    batch["index"] = torch.arange(6)
    with torch.no_grad():
        result = pipeline(batch)
    parts = result["image_score_parts"]
    assert parts.shape == (6, 2)
    evaluator = Evaluator(EvalConfig(), ["a", "b"], device=torch.device("cpu"), with_refiner=False, category_image_scores=combine)
    for start in (0, 3):  # two batches: the min-max spans both
        rows = slice(start, start + 3)
        evaluator.update({k: (v[rows] if isinstance(v, (torch.Tensor, list)) else v) for k, v in batch.items()},
                         {k: v[rows] for k, v in result.items()})
    metrics = evaluator.metrics.compute()["per_category"]
    by_hand = category_minmax_image_scores(parts[:, 0], parts[:, 1], categories).numpy()
    labels = batch["label"].numpy()
    for name, rows in (("a", slice(0, 3)), ("b", slice(3, 6))):
        assert metrics[name]["image_auroc"] == pytest.approx(roc_auc_score(labels[rows], by_hand[rows]))
    # the per-image score (predict, Segmenter, thresholds) is the mean stand-in, not the category's
    unit_max = (parts[:, 1] + 4) / 8
    torch.testing.assert_close(result["image_scores"], ((parts[:, 0] + unit_max) / 2).clamp(0, 1))


def test_no_category_score_with_a_refiner_or_another_setting() -> None:
    refined = ClipSamModule(
        method="sdp", method_config=TINY_SDP, refiner="ppg_cps", refiner_config={"sam": {"variant": "tiny"}}, image_size=64
    )
    assert refined.pipeline.category_image_scores() is None  # the fused map's score stands
    mean = ClipSamModule(method="sdp", method_config={**TINY_SDP, "image_score": "mean"}, refiner="none", image_size=64)
    combine = mean.pipeline.category_image_scores()
    assert combine is None or combine(torch.rand(3, 2)) is None
    april = ClipSamModule(method="april_gan", method_config={"model_name": "clipsam-tiny-240", "pretrained": None, "layers": [1, 2, 3, 4]}, refiner="none", image_size=64)
    assert april.pipeline.category_image_scores() is None
