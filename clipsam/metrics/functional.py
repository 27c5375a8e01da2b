"""Exact, lean anomaly-detection metrics (pure functions).

Pixel-level and image-level AUROC, F1-max and AP, computed exactly (as scikit-learn) without
sorting every score together with an int64 index and without a float64 copy of the scores, plus
the threshold-sampled per-region-overlap metric AUPRO.

Dimension symbols: N images, H x W the evaluation frame, P positive and Q negative samples.

The exact method:
    The scores are split into positives and negatives (boolean indexing) and each part is sorted
    in place in its own dtype (float32 for float32 maps). Then

    * AUROC is the Mann-Whitney statistic with half credit for ties: for every positive score
      ``v``, ``#neg < v + 0.5 * #neg == v`` (two ``searchsorted`` into the sorted negatives),
      summed in int64, divided by ``P * Q``. This is exactly the area under sklearn's ROC curve.
    * AP and F1-max only change at the distinct *positive* values: between two of them the true
      positives are constant and the false positives can only fall as the threshold rises, and
      recall only changes at positive values. For each distinct positive value ``v`` (threshold
      rule ``score >= v`` is positive), ``TP = #pos >= v`` and ``FP = #neg >= v``; then
      ``AP = sum (count_v / P) * TP / (TP + FP)`` (sklearn's step-wise average precision) and
      ``F1-max = max 2 TP / (TP + FP + P)`` (the maximum F1 over sklearn's precision-recall
      curve). Only these small per-positive arrays are float64.

Undefined values:
    With a single class present the metrics that need both classes are undefined. They are
    returned as ``NaN`` and a :class:`MetricUndefinedWarning` names the case; nothing crashes
    and no ``NaN`` is silent:

    * no positive (all labels 0): ``auroc``, ``ap`` and ``f1_max`` are all ``NaN`` (there is
      nothing to find, so no metric measures anything);
    * no negative (all labels 1): ``auroc`` is ``NaN``; ``ap`` and ``f1_max`` are ``1.0``
      (precision is 1 at every threshold, as in sklearn).

This module imports torch, numpy and scipy only.
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np
import torch
from scipy import ndimage

__all__ = ["AUPRO_PROTOCOLS", "MetricUndefinedWarning", "aupro", "image_metrics", "pixel_metrics", "pr_curve"]


class MetricUndefinedWarning(UserWarning):
    """A metric is undefined for the given labels (one class only) and was returned as NaN."""


# ---------------------------------------------------------------------------------------------
# input conversion


def _to_numpy(x: Any, name: str) -> np.ndarray:
    """Return a numpy view (no copy when possible) of a tensor or array-like."""
    if isinstance(x, torch.Tensor):
        x = x.detach()
        if x.device.type != "cpu":
            x = x.cpu()
        if x.dtype in (torch.float16, torch.bfloat16):
            x = x.float()  # exact: both are subsets of float32
        if x.is_complex():
            raise ValueError(f"{name} must be real, got dtype {x.dtype}")
        return x.numpy()
    if isinstance(x, np.ndarray):
        return x
    try:
        return np.asarray(x)
    except Exception as e:  # pragma: no cover - defensive
        raise ValueError(f"{name} must be a tensor or array, got {type(x).__name__}") from e


def _scores_1d(scores: Any, name: str = "scores") -> np.ndarray:
    s = _to_numpy(scores, name).reshape(-1)
    if s.dtype == np.float16:
        s = s.astype(np.float32)  # exact
    if s.dtype == np.bool_ or not (
        np.issubdtype(s.dtype, np.floating) or np.issubdtype(s.dtype, np.integer)
    ):
        raise ValueError(f"{name} must be a float (or integer) tensor, got dtype {s.dtype}")
    return s


def _labels_1d(labels: Any, name: str = "labels") -> np.ndarray:
    """Return labels as a 1-D bool array; raise ValueError unless every value is 0 or 1."""
    y = _to_numpy(labels, name).reshape(-1)
    if y.dtype == np.bool_:
        return y
    if not (np.issubdtype(y.dtype, np.integer) or np.issubdtype(y.dtype, np.floating)):
        raise ValueError(f"{name} must be a bool or integer tensor of 0/1, got dtype {y.dtype}")
    if y.size:
        lo, hi = y.min(), y.max()
        if np.issubdtype(y.dtype, np.floating):
            ok = lo >= 0 and hi <= 1 and not np.any((y != 0) & (y != 1))
        else:
            ok = lo >= 0 and hi <= 1
        if not ok:
            raise ValueError(
                f"{name} must be binary (0/1 or bool); found values in [{lo}, {hi}]. "
                "Binarise masks first (e.g. mask > 0 for VisA, mask == 255 for MVTec)."
            )
    if y.dtype.itemsize == 1 and np.issubdtype(y.dtype, np.integer):
        return y.view(np.bool_)  # 0/1 bytes are valid bools: no copy
    return y != 0


# ---------------------------------------------------------------------------------------------
# exact binary metrics


def _threshold_counts(scores: Any, labels: Any, level: str) -> dict[str, Any] | None:
    """Confusion counts at every distinct positive score, from two in-place sorts.

    Returns None when there is no positive label (after warning); else a dict with ``values``
    (distinct positive scores, ascending), ``count_eq`` (#positives equal to each), ``tp`` and
    ``fp`` (#positives / #negatives >= each value, float64), ``neg_lt`` (#negatives < each
    value), the sorted negatives ``neg`` and the class sizes ``n_pos``, ``n_neg``. Between two
    distinct positive values TP is constant and FP can only fall as the threshold rises, so
    these thresholds carry every value AP and F1-max can take.
    """
    s = _scores_1d(scores)
    y = _labels_1d(labels)
    if s.shape != y.shape:
        raise ValueError(
            f"scores and labels must have the same number of elements, got {s.size} and {y.size} "
            f"(shapes {tuple(np.shape(scores))} and {tuple(np.shape(labels))})"
        )
    if s.size == 0:
        raise ValueError(f"{level} metrics need at least one score, got an empty tensor")

    pos = s[y]  # copies: P values
    neg = s[~y]  # Q values
    pos.sort(kind="quicksort")
    neg.sort(kind="quicksort")
    # NaN sorts last: checking the maxima is a free NaN check.
    if (pos.size and np.isnan(pos[-1])) or (neg.size and np.isnan(neg[-1])):
        raise ValueError(f"{level} scores contain NaN")
    n_pos, n_neg = pos.size, neg.size

    if n_pos == 0:
        warnings.warn(
            f"{level} metrics are undefined: no positive label among {n_neg} samples "
            "(all labels 0); auroc, ap and f1_max are NaN",
            MetricUndefinedWarning,
            stacklevel=4,
        )
        return None

    # distinct positive values v (ascending), how many positives equal v, and #pos >= v
    starts = np.flatnonzero(np.concatenate(([True], pos[1:] != pos[:-1])))
    values = pos[starts]
    count_eq = np.diff(np.append(starts, n_pos))
    tp = (n_pos - starts).astype(np.float64)
    del pos
    neg_lt = np.searchsorted(neg, values, side="left")  # #neg < v
    fp = (n_neg - neg_lt).astype(np.float64)  # #neg >= v
    return {
        "values": values,
        "count_eq": count_eq,
        "tp": tp,
        "fp": fp,
        "neg_lt": neg_lt,
        "neg": neg,
        "n_pos": n_pos,
        "n_neg": n_neg,
    }


def _binary_metrics(scores: Any, labels: Any, level: str) -> dict[str, float]:
    counts = _threshold_counts(scores, labels, level)
    if counts is None:
        return {"auroc": float("nan"), "f1_max": float("nan"), "ap": float("nan")}
    tp, fp, n_pos, n_neg = counts["tp"], counts["fp"], counts["n_pos"], counts["n_neg"]
    count_eq, neg_lt = counts["count_eq"], counts["neg_lt"]
    ap = float(np.sum(count_eq / n_pos * (tp / (tp + fp))))
    f1_max = float(np.max(2.0 * tp / (tp + fp + n_pos)))

    if n_neg == 0:
        warnings.warn(
            f"{level} AUROC is undefined: no negative label among {n_pos} samples "
            "(all labels 1); auroc is NaN, ap and f1_max are 1.0",
            MetricUndefinedWarning,
            stacklevel=3,
        )
        auroc = float("nan")
    else:
        neg_le = np.searchsorted(counts["neg"], counts["values"], side="right")  # #neg <= v
        # twice the Mann-Whitney U, exact in int64 (<= 2 P Q)
        u2 = 2 * int(np.dot(count_eq, neg_lt)) + int(np.dot(count_eq, neg_le - neg_lt))
        auroc = u2 / (2.0 * n_pos * n_neg)
    return {"auroc": auroc, "f1_max": f1_max, "ap": ap}


def pr_curve(
    scores: torch.Tensor | np.ndarray, labels: torch.Tensor | np.ndarray, *, max_points: int | None = 200
) -> dict[str, list[float]] | None:
    """Precision-recall curve at the distinct positive scores, for plots (W&B, reports).

    The points are exact (the same thresholds :func:`pixel_metrics` uses); with ``max_points``
    they are thinned to at most that many, evenly spaced in recall, always keeping the first
    and last point. Returns None when there is no positive label.

    Returns:
        ``{"recall": [...], "precision": [...], "threshold": [...]}``, recall descending
        (threshold ascending).
    """
    counts = _threshold_counts(scores, labels, "pr-curve")
    if counts is None:
        return None
    tp, fp = counts["tp"], counts["fp"]
    recall = tp / counts["n_pos"]
    precision = tp / (tp + fp)
    threshold = counts["values"].astype(np.float64)
    if max_points is not None and recall.size > max_points:
        targets = np.linspace(recall[-1], recall[0], max_points)
        # recall is non-increasing in the threshold: search on the reversed (ascending) array.
        idx = recall.size - 1 - np.searchsorted(recall[::-1], targets, side="left")
        idx = np.unique(np.clip(idx, 0, recall.size - 1))
        recall, precision, threshold = recall[idx], precision[idx], threshold[idx]
    return {"recall": recall.tolist(), "precision": precision.tolist(), "threshold": threshold.tolist()}


def pixel_metrics(scores: torch.Tensor | np.ndarray, labels: torch.Tensor | np.ndarray) -> dict:
    """Exact pixel-level AUROC, F1-max and AP.

    Args:
        scores: float tensor or array of any shape (e.g. N x H x W anomaly maps), flattened;
            higher means more anomalous. float32 maps are never copied to float64.
        labels: bool or integer (0/1) tensor or array with the same number of elements;
            1/True is anomalous (float masks holding only 0.0/1.0 are accepted too).

    Returns:
        ``{"auroc": float, "f1_max": float, "ap": float}``:
        ``auroc`` equals sklearn's ``roc_auc_score`` (ties get half credit), ``ap`` equals
        sklearn's step-wise ``average_precision_score`` and ``f1_max`` is the maximum F1 over
        sklearn's ``precision_recall_curve`` (threshold rule ``score >= t``).
        With one class only, undefined values are ``NaN`` and a
        :class:`MetricUndefinedWarning` is emitted: all labels 0 gives ``NaN`` for all three;
        all labels 1 gives ``auroc`` ``NaN`` and ``ap`` = ``f1_max`` = 1.0.

    Raises:
        ValueError: on a size mismatch, non-binary labels, NaN scores or empty input.
    """
    return _binary_metrics(scores, labels, "pixel")


def image_metrics(scores: torch.Tensor | np.ndarray, labels: torch.Tensor | np.ndarray) -> dict:
    """Exact image-level AUROC, F1-max and AP; same contract as :func:`pixel_metrics`.

    Args:
        scores: (N,) float image anomaly scores.
        labels: (N,) bool or integer image labels, 1/True anomalous.

    Returns:
        ``{"auroc": float, "f1_max": float, "ap": float}`` (see :func:`pixel_metrics`, including
        the single-class rule).
    """
    return _binary_metrics(scores, labels, "image")


# ---------------------------------------------------------------------------------------------
# AUPRO


AUPRO_PROTOCOLS: tuple[str, ...] = ("mvtec", "anomalyclip")
"""Valid ``protocol`` values of :func:`aupro` (config key ``model.evaluation.aupro_protocol``)."""

_ANOMALYCLIP_STEPS = 200


def aupro(
    anomaly_maps: torch.Tensor | np.ndarray,
    masks: torch.Tensor | np.ndarray,
    *,
    fpr_limit: float = 0.3,
    num_thresholds: int = 1000,
    protocol: str = "mvtec",
) -> float:
    """Area under the per-region-overlap (PRO) curve up to ``fpr_limit``, normalised.

    Ground-truth regions are the 8-connected components of each image's mask (as the MVTec AD
    evaluation's ``scipy.ndimage.label`` with a 3 x 3 structure, anomalib's connected
    components, and ``skimage.measure.label`` in APRIL-GAN's and AnomalyCLIP's code). At a
    threshold ``t``, PRO is the mean over all regions (of all images) of the region's covered
    fraction and FPR the fraction of normal pixels (of all images) predicted anomalous.

    ``protocol="mvtec"`` (the MVTec AD evaluation, anomalib): ``score >= t`` is anomalous;
    ``num_thresholds`` thresholds evenly spaced from the minimum to the maximum score; the
    PRO-over-FPR curve, completed by (0, 0), is integrated with the trapezoid rule up to
    ``fpr_limit`` (linear interpolation at the limit) and divided by ``fpr_limit``. The curve is
    threshold-sampled, so the value approximates the exact one (exact when every distinct
    score is a threshold).

    ``protocol="anomalyclip"`` (``cal_pro_score`` of AnomalyCLIP's metrics.py and APRIL-GAN's
    test.py, so numbers compare with their tables): thresholds ``np.arange(min, max, (max -
    min) / 200)`` in the maps' dtype (``num_thresholds`` is ignored); ``score > t`` (strict) is
    anomalous; only the curve points with FPR strictly below ``fpr_limit`` are kept, their FPRs
    min-max renormalised to [0, 1], and the area under the PRO curve over them taken with the
    trapezoid rule (no (0, 0) point, no interpolation at the limit).

    Args:
        anomaly_maps: N x H x W float scores (a single H x W map is also accepted).
        masks: N x H x W bool or integer (0/1) ground truth, same shape.
        fpr_limit: upper FPR integration limit in (0, 1].
        num_thresholds: number of sampled thresholds (>= 2), ``protocol="mvtec"`` only.
        protocol: ``"mvtec"`` or ``"anomalyclip"``.

    Returns:
        AUPRO in [0, 1]; ``NaN`` with a :class:`MetricUndefinedWarning` when the masks have no
        anomalous region or no normal pixel (or, ``"anomalyclip"``, fewer than two distinct
        FPRs below the limit, where the reference divides by zero).

    Raises:
        ValueError: on a shape mismatch, non-binary masks, NaN scores or bad arguments.
    """
    if protocol not in AUPRO_PROTOCOLS:
        raise ValueError(f"AUPRO protocol must be one of {list(AUPRO_PROTOCOLS)}, got {protocol!r}")
    if not 0.0 < fpr_limit <= 1.0:
        raise ValueError(f"fpr_limit must be in (0, 1], got {fpr_limit}")
    if num_thresholds < 2:
        raise ValueError(f"num_thresholds must be >= 2, got {num_thresholds}")
    maps = _to_numpy(anomaly_maps, "anomaly_maps")
    gts = _to_numpy(masks, "masks")
    if maps.shape != gts.shape:
        raise ValueError(f"anomaly_maps and masks must have the same shape, got {maps.shape} and {gts.shape}")
    if maps.ndim == 2:
        maps, gts = maps[None], gts[None]
    if maps.ndim != 3 or maps.size == 0:
        raise ValueError(f"anomaly_maps must be N x H x W and non-empty, got shape {maps.shape}")
    gts = _labels_1d(gts, "masks").reshape(gts.shape)
    maps = _scores_1d(maps, "anomaly_maps").reshape(maps.shape)
    lo, hi = maps.min(), maps.max()
    if np.isnan(lo) or np.isnan(hi):
        raise ValueError("anomaly_maps contain NaN")

    if protocol == "mvtec":
        thresholds = np.linspace(float(lo), float(hi), num_thresholds)
        side = "right"  # bin b = number of thresholds <= score; score >= t_k iff b > k
    else:
        if hi == lo:
            warnings.warn(
                "AUPRO (anomalyclip protocol) is undefined for a constant map; returning NaN",
                MetricUndefinedWarning,
                stacklevel=2,
            )
            return float("nan")
        thresholds = np.arange(lo, hi, (hi - lo) / _ANOMALYCLIP_STEPS)  # in the maps' dtype
        side = "left"  # bin b = number of thresholds < score; score > t_k iff b > k
    nb = thresholds.size + 1
    bg_hist = np.zeros(nb, dtype=np.int64)
    region_hists: list[np.ndarray] = []
    region_sizes: list[np.ndarray] = []
    structure = np.ones((3, 3), dtype=bool)  # 8-connectivity
    for score_map, gt in zip(maps, gts):
        bins = np.searchsorted(thresholds, score_map.ravel(), side=side)
        gt_flat = gt.ravel()
        bg_hist += np.bincount(bins[~gt_flat], minlength=nb)
        if not gt_flat.any():
            continue
        regions, n_regions = ndimage.label(gt, structure=structure)
        r = regions.ravel()[gt_flat] - 1  # region index per anomalous pixel, 0-based
        h = np.bincount(r * nb + bins[gt_flat], minlength=n_regions * nb).reshape(n_regions, nb)
        region_hists.append(h)
        region_sizes.append(h.sum(axis=1))

    n_bg = int(bg_hist.sum())
    if not region_hists or n_bg == 0:
        case = "no anomalous region" if not region_hists else "no normal pixel"
        warnings.warn(f"AUPRO is undefined: the masks have {case}; returning NaN", MetricUndefinedWarning, stacklevel=2)
        return float("nan")

    def _count_positive(hist: np.ndarray) -> np.ndarray:
        # samples predicted anomalous at threshold t_k, k = 0..K-1: the sum over bins b > k
        tail = np.cumsum(hist[..., ::-1], axis=-1)[..., ::-1]
        return tail[..., 1:]

    fpr = _count_positive(bg_hist) / n_bg  # (K,), non-increasing in k
    hists = np.concatenate(region_hists)
    sizes = np.concatenate(region_sizes).astype(np.float64)
    pro = (_count_positive(hists) / sizes[:, None]).mean(axis=0)  # (K,)

    if protocol == "anomalyclip":
        keep = fpr < fpr_limit
        x, yv = fpr[keep], pro[keep]
        if x.size < 2 or x.max() == x.min():
            warnings.warn(
                f"AUPRO (anomalyclip protocol) is undefined: fewer than two distinct FPRs below {fpr_limit}; "
                "returning NaN",
                MetricUndefinedWarning,
                stacklevel=2,
            )
            return float("nan")
        x = (x - x.min()) / (x.max() - x.min())
        # x is monotonic (non-increasing in the threshold): the trapezoid area up to its sign
        return float(abs(np.sum((x[1:] - x[:-1]) * (yv[1:] + yv[:-1]) / 2.0)))

    # ascending FPR, completed by (0, 0); ties in FPR ordered by PRO (vertical segments)
    fpr = np.concatenate(([0.0], fpr[::-1]))
    pro = np.concatenate(([0.0], pro[::-1]))
    order = np.lexsort((pro, fpr))
    fpr, pro = fpr[order], pro[order]
    keep = fpr <= fpr_limit
    x, yv = fpr[keep], pro[keep]
    if x[-1] < fpr_limit and keep.sum() < fpr.size:
        i = int(keep.sum())  # first point beyond the limit
        x0, x1, y0, y1 = fpr[i - 1], fpr[i], pro[i - 1], pro[i]
        y_lim = y0 + (y1 - y0) * (fpr_limit - x0) / (x1 - x0)
        x, yv = np.append(x, fpr_limit), np.append(yv, y_lim)
    area = float(np.sum((x[1:] - x[:-1]) * (yv[1:] + yv[:-1]) / 2.0))
    return area / fpr_limit
