"""Decision thresholds (clipsam.thresholds) against scikit-learn and hand-worked cases."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from sklearn.metrics import f1_score, precision_recall_curve

from clipsam.errors import ConfigError
from clipsam.metrics.collection import PerCategoryMetrics
from clipsam.thresholds import (
    check_compatible,
    compute_thresholds,
    f1_optimal_threshold,
    fpr_threshold,
    load_thresholds,
    lookup,
    save_thresholds,
)


def _sklearn_best(scores: np.ndarray, labels: np.ndarray) -> tuple[float, float]:
    precision, recall, thresholds = precision_recall_curve(labels, scores)
    with np.errstate(invalid="ignore", divide="ignore"):
        f1 = np.where(precision + recall > 0, 2 * precision * recall / (precision + recall), 0.0)[:-1]
    best = int(np.argmax(f1))
    return float(thresholds[best]), float(f1[best])


def test_f1_threshold_hand_case() -> None:
    # scores  0.1 0.2 0.3 0.4 0.5 0.6 ; labels 0 0 1 0 1 1
    # t=0.5: TP 2 FP 0 -> F1 = 4/5 = 0.8 ; t=0.3: TP 3 FP 1 -> F1 = 6/7 = 0.857 (best);
    # t=0.6: TP 1 -> F1 = 2/4 = 0.5
    scores = np.array([0.1, 0.2, 0.3, 0.4, 0.5, 0.6], dtype=np.float32)
    labels = np.array([0, 0, 1, 0, 1, 1])
    out = f1_optimal_threshold(scores, labels)
    assert out is not None
    assert out["threshold"] == pytest.approx(0.3)
    assert out["f1"] == pytest.approx(6 / 7)
    assert out["precision"] == pytest.approx(3 / 4)
    assert out["recall"] == pytest.approx(1.0)


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_f1_threshold_matches_sklearn_pr_curve(seed: int) -> None:
    rng = np.random.default_rng(seed)
    labels = rng.random(500) < 0.3
    scores = (rng.normal(size=500) + 1.2 * labels).astype(np.float32)
    scores[:50] = np.round(scores[:50], 1)  # some ties
    out = f1_optimal_threshold(torch.from_numpy(scores), torch.from_numpy(labels))
    threshold, f1 = _sklearn_best(scores, labels.astype(int))
    assert out["threshold"] == pytest.approx(threshold)
    assert out["f1"] == pytest.approx(f1)
    # the rule score >= threshold has exactly that F1
    assert f1_score(labels, scores >= out["threshold"]) == pytest.approx(out["f1"])


def test_f1_threshold_undefined_without_anomalies() -> None:
    assert f1_optimal_threshold(np.array([0.1, 0.9]), np.array([0, 0])) is None


def test_fpr_threshold_hand_cases() -> None:
    normal = np.array([0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0], dtype=np.float32)
    # 10% of 10 = 1 false positive allowed: just above the 2nd highest (0.9), so only 1.0 fires
    out = fpr_threshold(normal, 0.1)
    assert np.float32(0.9) < out["threshold"] <= np.nextafter(np.float32(0.9), np.float32(2))
    assert out["fpr"] == pytest.approx(0.1)
    # FPR 0: above every normal score
    zero = fpr_threshold(normal, 0.0)
    assert zero["threshold"] > 1.0 and zero["fpr"] == 0.0
    # 25% of 10 -> floor 2 allowed
    out = fpr_threshold(normal, 0.25)
    assert (normal >= out["threshold"]).sum() == 2
    # ties: 3 equal maxima and FPR 0.1 -> only 0 can be allowed below the tie
    tied = np.array([0.0] * 7 + [0.5] * 3, dtype=np.float32)
    out = fpr_threshold(tied, 0.1)
    assert out["fpr"] == 0.0 and out["threshold"] > 0.5
    with pytest.raises(ValueError):
        fpr_threshold(normal, 1.0)


def test_fpr_threshold_is_the_lowest_with_that_promise() -> None:
    rng = np.random.default_rng(0)
    normal = rng.random(10_000).astype(np.float32)
    for target in (0.001, 0.01, 0.05):
        out = fpr_threshold(normal, target)
        assert (normal >= out["threshold"]).mean() <= target
        # the next float32 below the threshold exceeds the target
        lower = np.nextafter(np.float32(out["threshold"]), np.float32(-1))
        assert (normal >= lower).mean() > target


def _batch_metric(method: str, **kwargs) -> tuple[PerCategoryMetrics, dict]:
    rng = np.random.default_rng(0)
    metric = PerCategoryMetrics(["a", "b"], threshold_method=method, **kwargs)
    data = {"a": {"maps": [], "masks": [], "img": [], "lab": []}, "b": {"maps": [], "masks": [], "img": [], "lab": []}}
    idx = 0
    for step in range(3):
        labels = torch.tensor([0, 1, 1, 0])
        masks = torch.zeros(4, 8, 8, dtype=torch.bool)
        masks[1, 2:5, 2:5] = True
        masks[2, 4:7, 1:3] = True
        maps = torch.from_numpy(rng.random((4, 8, 8)).astype(np.float32)) * 0.7 + 0.3 * masks
        img = maps.flatten(1).amax(1)
        cats = torch.tensor([0, 0, 1, 1]) if step < 2 else torch.tensor([1, 1, 0, 0])
        metric.update(maps, masks, img, labels, cats, torch.arange(idx, idx + 4), torch.ones(4, dtype=torch.bool))
        for i in range(4):
            name = "ab"[int(cats[i])]
            data[name]["maps"].append(maps[i].numpy())
            data[name]["masks"].append(masks[i].numpy())
            data[name]["img"].append(float(img[i]))
            data[name]["lab"].append(int(labels[i]))
        idx += 4
    return metric, data


def test_metric_collection_returns_f1_thresholds_matching_sklearn() -> None:
    metric, data = _batch_metric("f1")
    out = metric.compute()["thresholds"]
    for name in "ab":
        maps, masks = np.stack(data[name]["maps"]), np.stack(data[name]["masks"])
        t, _ = _sklearn_best(maps.ravel(), masks.ravel().astype(int))
        assert out["pixel"]["per_category"][name]["threshold"] == pytest.approx(t)
        t, _ = _sklearn_best(np.array(data[name]["img"]), np.array(data[name]["lab"]))
        assert out["image"]["per_category"][name]["threshold"] == pytest.approx(t)
    all_maps = np.concatenate([np.stack(data[n]["maps"]) for n in "ab"])
    all_masks = np.concatenate([np.stack(data[n]["masks"]) for n in "ab"])
    t, _ = _sklearn_best(all_maps.ravel(), all_masks.ravel().astype(int))
    assert out["pixel"]["global"]["threshold"] == pytest.approx(t)


def test_metric_collection_fpr_uses_normal_images_only() -> None:
    metric, data = _batch_metric("fpr", target_fpr=0.05)
    out = metric.compute()["thresholds"]
    for name in "ab":
        normal_maps = np.stack([m for m, lab in zip(data[name]["maps"], data[name]["lab"]) if lab == 0])
        expected = fpr_threshold(normal_maps, 0.05)["threshold"]
        assert out["pixel"]["per_category"][name]["threshold"] == expected
        normal_img = [s for s, lab in zip(data[name]["img"], data[name]["lab"]) if lab == 0]
        assert out["image"]["per_category"][name]["threshold"] == fpr_threshold(np.array(normal_img), 0.05)["threshold"]


def test_save_load_lookup_and_compatibility(tmp_path) -> None:
    groups = {"cap": {"image_scores": np.array([0.1, 0.9]), "labels": np.array([0, 1]), "maps": None}}
    th = compute_thresholds(groups, method="f1")
    th["scores"] = {"refiner": "ppg_cps", "fusion": "clip_boost", "image_score": "max", "image_size": 64}
    path = save_thresholds(tmp_path / "thresholds.json", th)
    loaded = load_thresholds(tmp_path)  # a folder holding thresholds.json is accepted
    assert loaded == json.loads(path.read_text())
    assert lookup(loaded, "image", "cap", 0.5) == (pytest.approx(0.9), "cap")
    assert lookup(loaded, "image", "other", 0.5) == (pytest.approx(0.9), "global")
    assert lookup(loaded, "pixel", "cap", 0.42) == (0.42, "default")
    assert lookup(None, "image", "cap", 0.5) == (0.5, "default")
    check_compatible(loaded, {"refiner": "ppg_cps", "fusion": "clip_boost"}, source="x")
    with pytest.raises(ConfigError, match="fusion"):
        check_compatible(loaded, {"refiner": "ppg_cps", "fusion": "clip"}, source="x")
    with pytest.raises(ConfigError, match="refiner"):
        check_compatible(loaded, {"refiner": "none", "fusion": "clip_boost"}, source="x")
    with pytest.raises(ConfigError, match="no such file"):
        load_thresholds(tmp_path / "missing.json")



def test_thresholds_of_zero_shot_scores_are_refused_for_a_few_shot_run():
    """WinCLIP+ (k_shot > 0) scores differ from the zero-shot ones; a file written before the
    reference count was recorded was computed with none."""
    from clipsam.errors import ConfigError
    from clipsam.thresholds import check_compatible

    settings = {"method": "winclip", "refiner": "none", "fusion": "clip_boost", "image_score": None,
                "image_size": 240, "tiling": None, "reference_count": 1}
    old_file = {"scores": {k: v for k, v in settings.items() if k != "reference_count"}}
    with pytest.raises(ConfigError, match="reference_count: thresholds 0 vs config 1"):
        check_compatible(old_file, settings, source="thresholds.json")
    check_compatible({"scores": dict(settings)}, settings, source="thresholds.json")
