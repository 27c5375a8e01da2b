"""PerCategoryMetrics against per-category scikit-learn values."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch

from clipsam.metrics import MetricUndefinedWarning, PerCategoryMetrics, aupro

from .test_functional import sklearn_metrics

CATEGORIES = ["bottle", "cable", "screw"]


def make_data(seed: int = 0, n: int = 18, size: int = 12) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % 2
    masks = torch.zeros(n, size, size, dtype=torch.bool)
    for i in range(n):
        if labels[i]:
            y, x = torch.randint(0, size - 4, (2,), generator=g).tolist()
            masks[i, y : y + 4, x : x + 3] = True
    maps = torch.round((torch.rand(n, size, size, generator=g) + 0.4 * masks) * 20) / 20  # ties
    return {
        "anomaly_maps": maps,
        "masks": masks,
        "image_scores": torch.round(maps.amax(dim=(1, 2)) * 10) / 10,
        "labels": labels,
        "category_ids": torch.arange(n) % 3,
        "sample_ids": torch.arange(n) + 100,
        "has_mask": torch.ones(n, dtype=torch.bool),
    }


def feed(metric: PerCategoryMetrics, data: dict[str, torch.Tensor], batch: int = 4) -> None:
    n = data["labels"].shape[0]
    for i in range(0, n, batch):
        metric.update(**{k: v[i : i + batch] for k, v in data.items()})


def expected(data: dict[str, torch.Tensor], rows_pixel=None) -> dict[str, dict[str, float]]:
    out = {}
    for c, name in enumerate(CATEGORIES):
        sel = (data["category_ids"] == c).numpy()
        psel = sel & data["has_mask"].numpy() if rows_pixel is None else sel & rows_pixel
        im = sklearn_metrics(data["image_scores"].numpy()[sel], data["labels"].numpy()[sel])
        out[name] = {f"image_{k}": v for k, v in im.items()}
        if psel.any():
            px = sklearn_metrics(data["anomaly_maps"].numpy()[psel], data["masks"].numpy()[psel])
            out[name].update({f"pixel_{k}": v for k, v in px.items()})
    return out


def test_per_category_and_mean_equal_sklearn():
    data = make_data()
    metric = PerCategoryMetrics(CATEGORIES)
    feed(metric, data)
    result = metric.compute()
    ref = expected(data)
    assert result["num_images"] == 18
    assert set(result["per_category"]) == set(CATEGORIES)
    for name in CATEGORIES:
        got = result["per_category"][name]
        assert got["num_images"] == 6 and got["num_anomalous"] == 3
        for k, v in ref[name].items():
            assert got[k] == pytest.approx(v, abs=1e-12), (name, k)
    for k in ref["bottle"]:
        assert result["mean"][k] == pytest.approx(np.mean([ref[c][k] for c in CATEGORIES]), abs=1e-12)


def test_duplicated_sample_ids_count_once():
    data = make_data(seed=1)
    once = PerCategoryMetrics(CATEGORIES)
    feed(once, data)
    twice = PerCategoryMetrics(CATEGORIES)
    feed(twice, data)
    # DistributedSampler-style padding: the first images again, in another batch
    feed(twice, {k: v[:5] for k, v in data.items()}, batch=5)
    a, b = once.compute(), twice.compute()
    assert b["num_images"] == 18
    assert a == b


def test_images_without_masks_excluded_from_pixel_metrics():
    data = make_data(seed=2)
    has_mask = torch.ones(18, dtype=torch.bool)
    has_mask[[1, 3, 4]] = False  # categories 1, 0, 1
    has_mask[torch.nonzero(data["category_ids"] == 2).flatten()] = False  # screw: none
    data["has_mask"] = has_mask
    metric = PerCategoryMetrics(CATEGORIES)
    feed(metric, data)
    result = metric.compute()
    ref = expected(data)
    for name in ("bottle", "cable"):
        for k in ("pixel_auroc", "pixel_ap", "pixel_f1_max", "image_auroc"):
            assert result["per_category"][name][k] == pytest.approx(ref[name][k], abs=1e-12)
    screw = result["per_category"]["screw"]
    assert "pixel_auroc" not in screw and "image_auroc" in screw
    assert screw["num_images"] == 6
    assert result["mean"]["pixel_auroc"] == pytest.approx((ref["bottle"]["pixel_auroc"] + ref["cable"]["pixel_auroc"]) / 2)
    assert result["mean"]["image_auroc"] == pytest.approx(np.mean([ref[c]["image_auroc"] for c in CATEGORIES]))


def test_single_class_category_is_nan_warned_and_ignored_in_mean():
    data = make_data(seed=3)
    normal = data["category_ids"] == 0
    data["labels"][normal] = 0
    data["masks"][normal] = False
    metric = PerCategoryMetrics(CATEGORIES)
    feed(metric, data)
    with pytest.warns(MetricUndefinedWarning, match="category 'bottle'"):
        result = metric.compute()
    bottle = result["per_category"]["bottle"]
    assert math.isnan(bottle["pixel_auroc"]) and math.isnan(bottle["image_ap"])
    assert bottle["num_anomalous"] == 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # sklearn's own single-class warnings
        ref = expected(data)
    assert result["mean"]["pixel_auroc"] == pytest.approx((ref["cable"]["pixel_auroc"] + ref["screw"]["pixel_auroc"]) / 2)


def test_missing_category_absent_and_aupro_option():
    data = make_data(seed=4)
    metric = PerCategoryMetrics([*CATEGORIES, "unused"], aupro=True, image=False)
    feed(metric, data)
    result = metric.compute()
    assert set(result["per_category"]) == set(CATEGORIES)
    sel = (data["category_ids"] == 1).numpy()
    assert result["per_category"]["cable"]["pixel_aupro"] == pytest.approx(
        aupro(data["anomaly_maps"][sel], data["masks"][sel])
    )
    assert "image_auroc" not in result["per_category"]["cable"] and "image_auroc" not in result["mean"]
    assert "pixel_aupro" in result["mean"]
    other = PerCategoryMetrics(CATEGORIES, aupro=True, image=False, aupro_protocol="anomalyclip")
    feed(other, data)
    value = other.compute()["per_category"]["cable"]["pixel_aupro"]
    assert value == pytest.approx(aupro(data["anomaly_maps"][sel], data["masks"][sel], protocol="anomalyclip"))
    assert value != pytest.approx(result["per_category"]["cable"]["pixel_aupro"])
    with pytest.raises(ValueError, match="aupro_protocol"):
        PerCategoryMetrics(CATEGORIES, aupro=True, aupro_protocol="cflow")


def test_unknown_labels_ignored_for_image_metrics():
    data = make_data(seed=5)
    metric = PerCategoryMetrics(CATEGORIES, pixel=False)
    data["labels"][0] = -1  # bottle
    feed(metric, data)
    result = metric.compute()
    sel = (data["category_ids"] == 0).numpy() & (data["labels"] >= 0).numpy()
    ref = sklearn_metrics(data["image_scores"].numpy()[sel], data["labels"].numpy()[sel])
    assert result["per_category"]["bottle"]["image_auroc"] == pytest.approx(ref["auroc"])
    assert "pixel_auroc" not in result["per_category"]["bottle"]
    assert metric.maps == []  # nothing stored when no pixel metric is wanted


def test_float16_storage_is_close():
    data = make_data(seed=6)
    metric = PerCategoryMetrics(CATEGORIES, score_dtype=torch.float16)
    feed(metric, data)
    assert metric.maps[0].dtype == torch.float16 and metric.masks[0].dtype == torch.bool
    result = metric.compute()
    ref = expected(data)
    assert result["per_category"]["cable"]["pixel_auroc"] == pytest.approx(ref["cable"]["pixel_auroc"], abs=1e-2)


def test_reset_empties_state():
    data = make_data(seed=7)
    metric = PerCategoryMetrics(CATEGORIES)
    feed(metric, data)
    first = metric.compute()
    metric.reset()
    for name in ("maps", "masks", "image_scores", "labels", "category_ids", "sample_ids", "map_sample_ids"):
        assert getattr(metric, name) == []
    feed(metric, data)
    assert metric.compute() == first


def test_state_after_sync_as_single_tensor():
    """After a DDP sync list states are single concatenated tensors; compute handles both."""
    data = make_data(seed=8)
    metric = PerCategoryMetrics(CATEGORIES)
    feed(metric, data)
    ref = metric.compute()
    for name in metric._defaults:
        setattr(metric, name, torch.cat(getattr(metric, name)))
    metric._computed = None
    assert metric.compute() == ref


def test_bad_updates_raise():
    data = make_data()
    metric = PerCategoryMetrics(CATEGORIES)
    bad = dict(data, category_ids=data["category_ids"] + 5)
    with pytest.raises(ValueError, match="category_ids"):
        metric.update(**bad)
    bad = dict(data, masks=data["masks"].float() * 2)
    with pytest.raises(ValueError, match="masks"):
        metric.update(**bad)
    bad = dict(data, labels=data["labels"][:3])
    with pytest.raises(ValueError, match=r"\(B,\)"):
        metric.update(**bad)
    with pytest.raises(ValueError, match="score_dtype"):
        PerCategoryMetrics(CATEGORIES, score_dtype=torch.int64)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        m = PerCategoryMetrics(CATEGORIES)
        feed(m, data)
        m.compute()


def test_category_image_scores_feed_the_image_metrics_not_the_thresholds():
    """A per-category image score (SDP's min-max sum) replaces the per-image scores in the image
    metrics, computed over each category's de-duplicated images; thresholds keep the per-image
    scores. Expected values: sklearn on the combination computed by hand."""
    from sklearn.metrics import roc_auc_score

    data = make_data(seed=3)
    n = data["labels"].shape[0]
    g = torch.Generator().manual_seed(5)
    parts = torch.rand(n, 2, generator=g, dtype=torch.float64) * torch.tensor([1.0, 10.0], dtype=torch.float64)

    def minmax_sum(p: torch.Tensor) -> torch.Tensor:
        lo, hi = p.min(0).values, p.max(0).values
        return ((p - lo) / (hi - lo)).sum(1) / 2

    plain = PerCategoryMetrics(CATEGORIES, threshold_method="f1")
    feed(plain, data)
    metric = PerCategoryMetrics(CATEGORIES, category_image_scores=minmax_sum, threshold_method="f1")
    feed(metric, {**data, "image_score_parts": parts})
    # the last batch again (DistributedSampler padding): de-duplicated, so nothing changes
    metric.update(**{k: v[-2:] for k, v in {**data, "image_score_parts": parts}.items()})
    result, reference = metric.compute(), plain.compute()
    for c, name in enumerate(CATEGORIES):
        sel = (data["category_ids"] == c).numpy()
        p = parts[sel]
        lo, hi = p.min(0).values, p.max(0).values
        by_hand = (((p - lo) / (hi - lo)).sum(1) / 2).numpy()
        expected_auroc = roc_auc_score(data["labels"].numpy()[sel], by_hand)
        assert result["per_category"][name]["image_auroc"] == pytest.approx(expected_auroc, abs=1e-12)
        assert result["per_category"][name]["pixel_auroc"] == reference["per_category"][name]["pixel_auroc"]
    assert result["thresholds"]["image"] == reference["thresholds"]["image"]
    with pytest.raises(ValueError, match="image_score_parts"):
        metric.update(**{k: v[:2] for k, v in data.items()})
