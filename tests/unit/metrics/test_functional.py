"""clipsam.metrics.functional against scikit-learn."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from sklearn.metrics import average_precision_score, precision_recall_curve, roc_auc_score

from clipsam.metrics import MetricUndefinedWarning, aupro, image_metrics, pixel_metrics


def sklearn_metrics(scores, labels) -> dict[str, float]:
    s = np.asarray(scores, dtype=np.float64).ravel()
    y = np.asarray(labels).ravel().astype(int)
    precision, recall, _ = precision_recall_curve(y, s)
    with np.errstate(invalid="ignore", divide="ignore"):
        f1 = np.nan_to_num(2 * precision * recall / (precision + recall))
    return {"auroc": roc_auc_score(y, s), "f1_max": float(f1.max()), "ap": average_precision_score(y, s)}


def assert_close(ours: dict, ref: dict, tol: float = 1e-12) -> None:
    assert set(ours) == {"auroc", "f1_max", "ap"}
    for k in ref:
        assert isinstance(ours[k], float)
        assert ours[k] == pytest.approx(ref[k], abs=tol), k


@pytest.mark.parametrize("decimals", [1, 2, 3, None])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_equals_sklearn_with_ties(decimals, seed):
    rng = np.random.default_rng(seed)
    labels = rng.random(5000) < rng.uniform(0.02, 0.5)
    scores = rng.random(5000) + 0.3 * labels  # informative
    if decimals is not None:
        scores = np.round(scores, decimals)
    scores = scores.astype(np.float32)
    assert_close(pixel_metrics(torch.from_numpy(scores), torch.from_numpy(labels)), sklearn_metrics(scores, labels))
    assert_close(pixel_metrics(scores, labels), sklearn_metrics(scores, labels))


@pytest.mark.parametrize("dtype", [torch.bool, torch.uint8, torch.int32, torch.int64, torch.float32])
def test_label_dtypes(dtype):
    rng = np.random.default_rng(3)
    scores = torch.from_numpy(np.round(rng.random((4, 16, 16)), 1).astype(np.float32))
    labels = torch.from_numpy(rng.random((4, 16, 16)) < 0.2)
    ref = sklearn_metrics(scores.numpy(), labels.numpy())
    assert_close(pixel_metrics(scores, labels.to(dtype)), ref)


def test_multidimensional_and_score_dtypes():
    rng = np.random.default_rng(4)
    scores = torch.rand(3, 2, 20, 20, generator=torch.Generator().manual_seed(0))
    labels = torch.from_numpy(rng.random((3, 2, 20, 20)) < 0.1)
    ref = sklearn_metrics(scores.numpy(), labels.numpy())
    assert_close(pixel_metrics(scores, labels), ref)
    assert_close(pixel_metrics(scores.double(), labels), ref)
    half = scores.half()
    assert_close(pixel_metrics(half, labels), sklearn_metrics(half.float().numpy(), labels.numpy()))
    # labels may have a different shape as long as the sizes match (both are flattened)
    assert_close(pixel_metrics(scores, labels.reshape(-1)), ref)


def test_all_tied_scores():
    labels = np.array([0, 1, 0, 0, 1, 1, 0, 0], dtype=bool)
    scores = np.full(labels.shape, 0.7, dtype=np.float32)
    ours = pixel_metrics(scores, labels)
    assert_close(ours, sklearn_metrics(scores, labels))
    assert ours == {"auroc": 0.5, "f1_max": pytest.approx(2 * 3 / (8 + 3)), "ap": pytest.approx(3 / 8)}


def test_hand_computed():
    # scores sorted descending: 0.9(+) 0.8(-) 0.7(+) 0.6(-)
    scores = torch.tensor([0.6, 0.9, 0.7, 0.8])
    labels = torch.tensor([0, 1, 1, 0])
    out = pixel_metrics(scores, labels)
    assert out["auroc"] == pytest.approx(0.75)  # 3 of 4 pairs ordered
    assert out["ap"] == pytest.approx(0.5 * 1.0 + 0.5 * 2 / 3)
    assert out["f1_max"] == pytest.approx(max(2 * 1 / (1 + 0 + 2), 2 * 2 / (2 + 1 + 2)))


def test_perfect_and_inverted():
    labels = np.array([0, 0, 0, 1, 1])
    scores = np.array([0.1, 0.2, 0.3, 0.8, 0.9], dtype=np.float32)
    assert pixel_metrics(scores, labels) == {"auroc": 1.0, "f1_max": 1.0, "ap": 1.0}
    inv = pixel_metrics(-scores, labels)
    assert_close(inv, sklearn_metrics(-scores, labels))
    assert inv["auroc"] == 0.0


def test_no_positive_is_nan_with_warning():
    scores = np.array([0.1, 0.5, 0.3], dtype=np.float32)
    with pytest.warns(MetricUndefinedWarning, match="no positive"):
        out = pixel_metrics(scores, np.zeros(3, dtype=bool))
    assert all(np.isnan(v) for v in out.values())
    assert set(out) == {"auroc", "f1_max", "ap"}


def test_no_negative_auroc_nan_others_one():
    scores = np.array([0.1, 0.5, 0.3], dtype=np.float32)
    with pytest.warns(MetricUndefinedWarning, match="no negative"):
        out = image_metrics(scores, np.ones(3, dtype=np.int64))
    assert np.isnan(out["auroc"])
    assert out["ap"] == 1.0 and out["f1_max"] == 1.0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert out["ap"] == pytest.approx(average_precision_score(np.ones(3), scores))


def test_two_classes_emit_no_warning():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pixel_metrics(np.array([0.1, 0.2]), np.array([0, 1]))


@pytest.mark.parametrize(
    ("scores", "labels", "match"),
    [
        (np.zeros(4, np.float32), np.zeros(3, bool), "same number of elements"),
        (np.zeros(3, np.float32), np.array([0, 1, 2]), "binary"),
        (np.zeros(3, np.float32), np.array([0, -1, 1]), "binary"),
        (np.zeros(3, np.float32), np.array([0.0, 0.5, 1.0]), "binary"),
        (np.array([0.1, np.nan, 0.3], np.float32), np.array([0, 1, 0]), "NaN"),
        (np.array([0.1, np.nan, 0.3], np.float32), np.array([0, 0, 0]), "NaN"),
        (np.zeros(0, np.float32), np.zeros(0, bool), "empty"),
        (np.zeros(3, bool), np.array([0, 1, 0]), "float"),
    ],
)
def test_bad_inputs_raise(scores, labels, match):
    with pytest.raises(ValueError, match=match):
        pixel_metrics(scores, labels)


def test_does_not_modify_inputs():
    scores = torch.tensor([0.3, 0.1, 0.2, 0.9])
    labels = torch.tensor([True, False, False, True])
    before = scores.clone()
    pixel_metrics(scores, labels)
    assert torch.equal(scores, before)


# --------------------------------------------------------------------------------------------
# AUPRO


def reference_aupro(maps: np.ndarray, masks: np.ndarray, fpr_limit: float) -> float:
    """Brute force: one curve point per distinct score, regions per image (8-connectivity)."""
    from scipy import ndimage

    regions = []
    for m, g in zip(maps, masks):
        lab, n = ndimage.label(g, structure=np.ones((3, 3)))
        regions += [m[lab == i + 1] for i in range(n)]
    bg = maps[~masks]
    fprs, pros = [0.0], [0.0]
    for t in np.unique(maps):
        fprs.append(float(np.mean(bg >= t)))
        pros.append(float(np.mean([np.mean(r >= t) for r in regions])))
    order = np.lexsort((pros, fprs))
    f, p = np.asarray(fprs)[order], np.asarray(pros)[order]
    grid_f = np.append(f[f <= fpr_limit], fpr_limit)
    grid_p = np.append(p[f <= fpr_limit], np.interp(fpr_limit, f, p))
    return float(np.trapezoid(grid_p, grid_f) / fpr_limit)


def test_aupro_matches_brute_force_when_thresholds_cover_all_scores():
    rng = np.random.default_rng(5)
    masks = np.zeros((3, 24, 24), dtype=bool)
    masks[0, 2:8, 2:8] = True
    masks[0, 15:20, 10:22] = True
    masks[1, 5:18, 5:9] = True
    # 17 levels on a 1/16 grid: exactly the thresholds linspace(0, 1, 17) samples
    maps = (np.minimum(rng.integers(0, 17, size=masks.shape) + 4 * masks, 16) / 16).astype(np.float32)
    assert np.unique(maps).size == 17
    ours = aupro(torch.from_numpy(maps), torch.from_numpy(masks), num_thresholds=17)
    assert ours == pytest.approx(reference_aupro(maps, masks, 0.3), abs=1e-9)
    assert 0.0 < ours < 1.0


def _hand_case() -> tuple[np.ndarray, np.ndarray]:
    """One 4 x 4 image: region A = two diagonal pixels (one region with 8-connectivity, two with
    4), region B = one pixel; 13 normal pixels, two of them scored 1 and 2.

    Thresholds fall into three classes: ``>= 1`` (PRO 1, FPR 2/13), ``>= 2`` (A half covered, B
    covered: PRO 0.75, FPR 1/13), ``>= 3`` (A half, B not: PRO 0.25, FPR 0).
    """
    masks = np.zeros((1, 4, 4), dtype=bool)
    maps = np.zeros((1, 4, 4), dtype=np.float32)
    masks[0, 0, 0] = masks[0, 1, 1] = masks[0, 3, 3] = True
    maps[0, 0, 0], maps[0, 1, 1], maps[0, 3, 3] = 3, 1, 2
    maps[0, 0, 3], maps[0, 2, 0] = 2, 1
    return maps, masks


def test_aupro_mvtec_protocol_by_hand_with_8_connected_regions():
    maps, masks = _hand_case()
    # Curve from (0, 0): (0, 0.25), (1/13, 0.75), (2/13, 1), flat at 1 up to FPR 0.3.
    area = (1 / 13) * (0.25 + 0.75) / 2 + (1 / 13) * (0.75 + 1) / 2 + (0.3 - 2 / 13) * 1.0
    assert aupro(maps, masks, protocol="mvtec") == pytest.approx(area / 0.3, abs=1e-12)
    # With 4-connectivity A would be two regions: PRO 1/3 and 2/3 instead of 0.25 and 0.75.
    area4 = (1 / 13) * (1 / 3 + 2 / 3) / 2 + (1 / 13) * (2 / 3 + 1) / 2 + (0.3 - 2 / 13)
    assert aupro(maps, masks) != pytest.approx(area4 / 0.3, abs=1e-6)


def test_aupro_anomalyclip_protocol_by_hand():
    maps, masks = _hand_case()
    # np.arange(0, 3, 0.015): 200 thresholds, 67 in [0, 1), 67 in [1, 2), 66 in [2, 3); with
    # ``score > t`` they give the three classes above. All FPRs are below 0.3; renormalised by
    # the largest (2/13) they become 1, 0.5 and 0: area 0.5 * (1 + 0.75) / 2 + 0.5 * (0.75 + 0.25) / 2.
    assert aupro(maps, masks, protocol="anomalyclip") == pytest.approx(0.6875, abs=1e-12)
    # Strict ">": a threshold equal to a score leaves that pixel out. Scores 0 and 1 only: the
    # first threshold (0) already excludes the zeros, so every threshold gives the same point and
    # the FPR cannot be renormalised.
    with pytest.warns(MetricUndefinedWarning, match="anomalyclip"):
        assert np.isnan(aupro(np.minimum(maps, 1), masks, protocol="anomalyclip"))
    # FPR >= 0.3 points are dropped: map every normal pixel to 1 except one -> FPR 12/13 at the
    # ">= 1" class, so only the ">= 2" and ">= 3" classes remain: area 1 * (0.75 + 0.25) / 2.
    high = maps.copy()
    high[~masks] = 1
    high[0, 0, 3] = 2
    high[0, 0, 1] = 0
    assert aupro(high, masks, protocol="anomalyclip") == pytest.approx(0.5, abs=1e-12)
    with pytest.raises(ValueError, match="protocol"):
        aupro(maps, masks, protocol="cflow")


def test_aupro_anomalyclip_protocol_matches_a_direct_loop():
    from scipy import ndimage

    rng = np.random.default_rng(2)
    masks = np.zeros((2, 20, 20), dtype=bool)
    masks[0, 3:9, 4:7] = True
    masks[0, 12, 12] = masks[0, 13, 13] = True
    masks[1, 10:18, 2:15] = True
    maps = (rng.random(masks.shape) + 0.6 * masks).astype(np.float32)
    lo, hi = maps.min(), maps.max()
    fprs, pros = [], []
    regions = [(i, lab == k + 1) for i, g in enumerate(masks) for lab, n in [ndimage.label(g, np.ones((3, 3)))] for k in range(n)]
    for t in np.arange(lo, hi, (hi - lo) / 200):
        pred = maps > t
        pros.append(np.mean([pred[i][r].mean() for i, r in regions]))
        fprs.append((pred & ~masks).sum() / (~masks).sum())
    fprs, pros = np.array(fprs), np.array(pros)
    keep = fprs < 0.3
    x = (fprs[keep] - fprs[keep].min()) / (fprs[keep].max() - fprs[keep].min())
    expected = abs(np.trapezoid(pros[keep], x))
    assert aupro(torch.from_numpy(maps), torch.from_numpy(masks), protocol="anomalyclip") == pytest.approx(expected, abs=1e-12)


def test_aupro_perfect_and_tied():
    masks = np.zeros((2, 10, 10), dtype=bool)
    masks[0, 2:5, 2:5] = True
    assert aupro(masks.astype(np.float32), masks) == pytest.approx(1.0)
    # one tied score: the curve is the diagonal, area to 0.3 is 0.3^2 / 2, normalised 0.15
    assert aupro(np.zeros((2, 10, 10), np.float32), masks) == pytest.approx(0.15)


def test_aupro_undefined_and_bad_inputs():
    with pytest.warns(MetricUndefinedWarning, match="no anomalous region"):
        assert np.isnan(aupro(np.zeros((1, 4, 4)), np.zeros((1, 4, 4), bool)))
    with pytest.raises(ValueError, match="same shape"):
        aupro(np.zeros((1, 4, 4)), np.zeros((1, 4, 5), bool))
    with pytest.raises(ValueError, match="fpr_limit"):
        aupro(np.zeros((1, 4, 4)), np.zeros((1, 4, 4), bool), fpr_limit=0.0)


def test_pr_curve_points_match_sklearn_and_thin_out() -> None:
    from sklearn.metrics import precision_recall_curve

    from clipsam.metrics import pr_curve

    rng = np.random.default_rng(7)
    labels = rng.random(5000) < 0.2
    scores = np.round(rng.random(5000) + labels * 0.3, 2).astype(np.float32)
    exact = pr_curve(torch.from_numpy(scores), torch.from_numpy(labels), max_points=None)
    precision, recall, thresholds = precision_recall_curve(labels, scores)
    # our thresholds are the distinct positive scores: each is one of sklearn's points
    lookup = {float(t): (p, r) for p, r, t in zip(precision[:-1], recall[:-1], thresholds)}
    for r, p, t in zip(exact["recall"], exact["precision"], exact["threshold"]):
        assert lookup[t] == pytest.approx((p, r), abs=1e-12)
    thin = pr_curve(scores, labels, max_points=20)
    assert 2 <= len(thin["recall"]) <= 20
    assert thin["recall"][0] == exact["recall"][0] and thin["recall"][-1] == exact["recall"][-1]
    assert pr_curve(scores, np.zeros_like(labels)) is None
