"""Decision thresholds: from anomaly scores to "anomalous / normal" (image) and masks (pixel).

A line needs decisions, not only rankings. This module turns the scores of a labelled set
(``clipsam test``) into two thresholds, one on the image score and one on the pixel score,
by one of two rules:

* ``"f1"``: the F1-optimal threshold on a labelled set (normal and anomalous images): the
  threshold ``t`` maximising F1 of the rule ``score >= t`` (anomalous). Exactly the threshold
  at the maximum of scikit-learn's ``precision_recall_curve`` F1 (the first one, lowest
  threshold, on ties), computed from the same confusion counts as
  :func:`clipsam.metrics.functional.pixel_metrics` (so it agrees with the reported F1-max).
* ``"fpr"``: from normal images only, at a chosen false-positive rate ``target_fpr``: the
  smallest threshold ``t`` such that at most ``floor(target_fpr * n)`` of the ``n`` normal
  scores satisfy ``score >= t`` (for pixels: the pixels of the normal images). It needs no
  anomalous example, which is what a line usually has.

Both return plain floats; the rule is always ``score >= threshold`` means anomalous.

:func:`compute_thresholds` computes both levels per category and pooled over all categories
(``"global"``); :func:`save_thresholds` / :func:`load_thresholds` write and read the
``thresholds.json`` a test run leaves beside ``test_results.json`` (and an exported bundle
carries), and :func:`lookup` picks the threshold for an image's category at predict time.

This module imports numpy and torch only (no Lightning).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from clipsam.errors import ConfigError
from clipsam.results import lookup

__all__ = [
    "RULE",
    "THRESHOLD_METHODS",
    "THRESHOLDS_FILE",
    "check_compatible",
    "compute_thresholds",
    "f1_optimal_threshold",
    "fpr_threshold",
    "load_thresholds",
    "lookup",
    "save_thresholds",
]

THRESHOLD_METHODS: tuple[str, ...] = ("f1", "fpr")
"""Valid values of ``model.evaluation.threshold_method``."""

THRESHOLDS_FILE = "thresholds.json"
"""Name of the thresholds file in a test run directory and in an exported bundle."""

RULE = "anomalous when score >= threshold"
"""The one decision rule of a thresholds file (its ``"rule"`` entry)."""

#: Largest threshold accepted from a file: scores lie in [0, 1]; an ``"fpr"`` threshold above a
#: score of exactly 1 is the next float32 after 1 (nothing is anomalous).
_MAX_THRESHOLD = float(np.nextafter(np.float32(1.0), np.float32(2.0)))

#: Settings that change the scores a threshold applies to: a thresholds file computed under
#: other values would silently give wrong decisions, so :func:`check_compatible` refuses it.
SCORE_KEYS: tuple[str, ...] = ("method", "refiner", "fusion", "image_score", "image_size", "tiling", "reference_count")
#: Values of keys that files written before the key existed were computed under.
_SCORE_KEY_DEFAULTS: dict[str, Any] = {"reference_count": 0}


def _flat(values: Any, name: str) -> np.ndarray:
    if isinstance(values, torch.Tensor):
        values = values.detach().cpu()
        if values.dtype in (torch.float16, torch.bfloat16):
            values = values.float()
        values = values.numpy()
    arr = np.asarray(values).reshape(-1)
    if arr.dtype == np.float16:
        arr = arr.astype(np.float32)
    return arr


def f1_optimal_threshold(scores: Any, labels: Any) -> dict[str, float] | None:
    """The threshold with the highest F1 of ``score >= threshold`` on a labelled set.

    Args:
        scores: float scores of any shape (image scores (N,), or maps (N, H, W)), higher is
            more anomalous.
        labels: 0/1 or bool of the same number of elements (1 anomalous).

    Returns:
        ``{"threshold", "f1", "precision", "recall"}`` (floats), or None when there is no
        anomalous label (F1 is undefined; use :func:`fpr_threshold`). With no normal label the
        lowest anomalous score is returned (F1 1).

    Raises:
        ValueError: shapes differ, empty input, non-binary labels, NaN scores.
    """
    from clipsam.metrics.functional import _threshold_counts

    s = _flat(scores, "scores")
    y = _flat(labels, "labels")
    if s.size != y.size:
        raise ValueError(f"scores and labels must have the same number of elements, got {s.size} and {y.size}")
    if s.size == 0:
        raise ValueError("f1_optimal_threshold needs at least one score")
    y = y.astype(bool) if y.dtype != np.bool_ else y
    if not y.any():
        return None
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        counts = _threshold_counts(s, y, "threshold")
    assert counts is not None
    tp, fp, n_pos = counts["tp"], counts["fp"], counts["n_pos"]
    f1 = 2.0 * tp / (tp + fp + n_pos)  # at each distinct positive value, ascending
    best = int(np.argmax(f1))  # first maximum = lowest threshold, as argmax over sklearn's curve
    return {
        "threshold": float(counts["values"][best]),
        "f1": float(f1[best]),
        "precision": float(tp[best] / (tp[best] + fp[best])),
        "recall": float(tp[best] / n_pos),
    }


def fpr_threshold(normal_scores: Any, target_fpr: float) -> dict[str, float]:
    """The lowest threshold with a false-positive rate of at most ``target_fpr`` on normal data.

    With ``n`` normal scores and ``k = floor(target_fpr * n)`` allowed false positives, the
    threshold is the smallest float32 strictly above the ``(k+1)``-th highest score: at most
    ``k`` normal scores are ``>= threshold``, and no lower threshold keeps that promise.

    Args:
        normal_scores: float scores of normal images (or of their pixels), any shape.
        target_fpr: allowed false-positive rate in [0, 1).

    Returns:
        ``{"threshold", "fpr", "target_fpr", "num_normal"}``: ``fpr`` is the rate measured on
        ``normal_scores`` at the threshold.

    Raises:
        ValueError: empty input, NaN scores, ``target_fpr`` outside [0, 1).
    """
    if not (0.0 <= float(target_fpr) < 1.0) or math.isnan(float(target_fpr)):
        raise ValueError(f"target_fpr must be in [0, 1), got {target_fpr}")
    s = _flat(normal_scores, "normal_scores").astype(np.float32, copy=False)
    n = s.size
    if n == 0:
        raise ValueError("fpr_threshold needs at least one normal score")
    if np.isnan(s).any():
        raise ValueError("normal scores contain NaN")
    k = int(math.floor(float(target_fpr) * n + 1e-9))
    # (k+1)-th highest = element n-1-k of the ascending order; partition avoids a full sort.
    pivot = n - 1 - k
    kth = np.partition(s, pivot)[pivot]
    threshold = np.nextafter(np.float32(kth), np.float32(np.inf))
    fpr = float(np.count_nonzero(s >= threshold)) / n
    return {"threshold": float(threshold), "fpr": fpr, "target_fpr": float(target_fpr), "num_normal": int(n)}


def _level(scores: Any, labels: Any, method: str, target_fpr: float) -> dict[str, float] | None:
    """One level's threshold by ``method``; ``labels`` 0/1 (normal / anomalous) per element."""
    if method == "f1":
        return f1_optimal_threshold(scores, labels)
    normal = _flat(scores, "scores")[~_flat(labels, "labels").astype(bool)]
    if normal.size == 0:
        return None
    return fpr_threshold(normal, target_fpr)


def compute_thresholds(
    groups: Mapping[str, Mapping[str, Any]],
    *,
    method: Literal["f1", "fpr"] = "f1",
    target_fpr: float = 0.01,
    pooled: bool = True,
) -> dict[str, Any]:
    """Image- and pixel-level thresholds per category and pooled.

    Args:
        groups: per category ``{"image_scores": (N,), "labels": (N,) 0/1, "maps": (M, H, W) or
            None, "masks": (M, H, W) bool or None, "map_labels": (M,) 0/1 or None}``. ``maps``
            are the pixel scores of the images that have a ground truth (normal images
            included); for ``"fpr"`` only the pixels of images with ``map_labels == 0`` count.
        method: ``"f1"`` or ``"fpr"`` (module doc).
        target_fpr: allowed false-positive rate for ``"fpr"``.
        pooled: also compute the ``"global"`` entry over all categories together (the
            fallback for a category with no threshold of its own).

    Returns:
        ``{"method", "target_fpr", "image": {"global": {...} | None, "per_category": {...}},
        "pixel": {...}}``; an entry is None when its data cannot define it (no anomalous
        image for ``"f1"``, no normal image for ``"fpr"``).
    """
    if method not in THRESHOLD_METHODS:
        raise ConfigError(f"model.evaluation.threshold_method={method!r}: use one of {', '.join(THRESHOLD_METHODS)}")
    out: dict[str, Any] = {
        "method": method,
        "target_fpr": float(target_fpr) if method == "fpr" else None,
        "rule": RULE,
        "image": {"global": None, "per_category": {}},
        "pixel": {"global": None, "per_category": {}},
    }
    all_img, all_lab, all_maps, all_masks = [], [], [], []
    for name, group in groups.items():
        img = _flat(group["image_scores"], "image_scores")
        lab = _flat(group["labels"], "labels")
        known = lab >= 0
        img, lab = img[known], lab[known].astype(bool)
        if img.size:
            out["image"]["per_category"][name] = _level(img, lab, method, target_fpr)
            all_img.append(img)
            all_lab.append(lab)
        maps, masks = group.get("maps"), group.get("masks")
        if maps is not None and len(maps):
            if method == "fpr":
                map_labels = _flat(group["map_labels"], "map_labels").astype(bool)
                normal = maps[torch.as_tensor(~map_labels)] if isinstance(maps, torch.Tensor) else maps[~map_labels]
                entry = fpr_threshold(normal, target_fpr) if len(normal) else None
                if len(normal):
                    all_maps.append(_flat(normal, "maps"))
            else:
                entry = f1_optimal_threshold(maps, masks)
                all_maps.append(_flat(maps, "maps"))
                all_masks.append(_flat(masks, "masks").astype(bool))
            out["pixel"]["per_category"][name] = entry
    if pooled:
        if all_img:
            out["image"]["global"] = _level(np.concatenate(all_img), np.concatenate(all_lab), method, target_fpr)
        if all_maps:
            maps = np.concatenate(all_maps)
            if method == "fpr":
                out["pixel"]["global"] = fpr_threshold(maps, target_fpr)
            else:
                out["pixel"]["global"] = f1_optimal_threshold(maps, np.concatenate(all_masks))
    return out


def save_thresholds(path: str | os.PathLike[str], thresholds: Mapping[str, Any]) -> Path:
    """Write ``thresholds`` as JSON atomically (group-readable as the umask allows)."""
    from clipsam.io import atomic_write

    target = Path(path)
    with atomic_write(target) as tmp:
        tmp.write_text(json.dumps(thresholds, indent=2))
    return target


def load_thresholds(path: str | os.PathLike[str], *, key: str = "model.evaluation.thresholds") -> dict[str, Any]:
    """Read a thresholds file (``thresholds.json`` of a test run or a bundle, or its folder).

    Every threshold must be a number in [0, 1] (scores lie in [0, 1]), ``method`` one of
    :data:`THRESHOLD_METHODS` and ``rule`` :data:`RULE`: a file edited by hand is refused here,
    when it is loaded, never at the first image.

    Raises:
        ConfigError: missing or malformed file, naming ``key``, the file and the bad entry.
    """
    target = Path(os.path.expanduser(os.fspath(path)))
    if target.is_dir():
        target = target / THRESHOLDS_FILE
    if not target.is_file():
        raise ConfigError(
            f"{key}={path}: no such file: pass the thresholds.json written by `clipsam test` "
            "(beside test_results.json) or an exported bundle folder"
        )
    try:
        data = json.loads(target.read_text())
    except (OSError, ValueError) as err:
        raise ConfigError(f"{key}={target} is not a readable thresholds JSON file ({err})") from err
    if not isinstance(data, dict) or "image" not in data or "pixel" not in data:
        raise ConfigError(f"{key}={target} has no 'image'/'pixel' thresholds: pass a file written by `clipsam test`")
    problem = _problem(data)
    if problem is not None:
        raise ConfigError(
            f"{key}={target}: {problem}; fix the file, or rerun `clipsam test` to write a new thresholds.json"
        )
    return data


def _threshold_problem(entry: Any, where: str) -> str | None:
    """What is wrong with one ``{"threshold": t, ...}`` entry (None: fine, or no entry)."""
    if entry is None:
        return None
    if not isinstance(entry, Mapping) or "threshold" not in entry:
        return f"{where} must be null or an object with a 'threshold', got {entry!r}"
    value = entry["threshold"]
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return f"{where}.threshold is {value!r}, not a number: thresholds are numbers in [0, 1]"
    if not math.isfinite(value) or not 0.0 <= value <= _MAX_THRESHOLD:
        return (
            f"{where}.threshold is {value!r}: thresholds are numbers in [0, 1] (scores lie in [0, 1]; "
            f"{RULE})"
        )
    return None


def _problem(data: Mapping[str, Any]) -> str | None:
    """The first thing in a loaded thresholds file that would give wrong or failing decisions."""
    method = data.get("method")
    if method is not None and method not in THRESHOLD_METHODS:
        return f"method is {method!r}: use one of {', '.join(THRESHOLD_METHODS)}"
    rule = data.get("rule")
    if rule is not None and rule != RULE:
        return f"rule is {rule!r}: clipsam decides by the one rule {RULE!r}"
    target_fpr = data.get("target_fpr")
    if method == "fpr" and not (
        isinstance(target_fpr, (int, float)) and not isinstance(target_fpr, bool) and 0.0 <= target_fpr < 1.0
    ):
        return f"target_fpr is {target_fpr!r}: a false-positive rate in [0, 1)"
    for level in ("image", "pixel"):
        entries = data.get(level)
        if entries is None:
            continue
        if not isinstance(entries, Mapping):
            return f"{level} must be an object with 'global' and 'per_category', got {entries!r}"
        problem = _threshold_problem(entries.get("global"), f"{level}.global")
        if problem is not None:
            return problem
        per_category = entries.get("per_category") or {}
        if not isinstance(per_category, Mapping):
            return f"{level}.per_category must be an object (category -> threshold), got {per_category!r}"
        for category, entry in per_category.items():
            problem = _threshold_problem(entry, f"{level}.per_category.{category}")
            if problem is not None:
                return problem
    scores = data.get("scores")
    if scores is not None and not isinstance(scores, Mapping):
        return f"scores must be an object (the settings the scores came from), got {scores!r}"
    return None


def check_compatible(thresholds: Mapping[str, Any], settings: Mapping[str, Any], *, source: str) -> None:
    """Refuse thresholds computed on other scores than the ones being thresholded.

    Args:
        thresholds: a loaded thresholds file; its ``"scores"`` entry records the settings the
            scores came from (:data:`SCORE_KEYS`).
        settings: the current values of the same keys.
        source: the file, for the message.

    Raises:
        ConfigError: naming every differing key; a file without its ``"scores"`` record (nothing
            to check against: never assumed to fit).
    """
    recorded = thresholds.get("scores")
    if not isinstance(recorded, Mapping) or not recorded:
        raise ConfigError(
            f"thresholds in {source} do not record which scores they were computed on (no 'scores' entry), "
            "so clipsam cannot check that they fit this config: rerun `clipsam test` with this config to "
            "write a new thresholds.json (and re-export the bundle with it)"
        )
    recorded = {**_SCORE_KEY_DEFAULTS, **recorded}
    diff = [
        f"{k}: thresholds {recorded[k]!r} vs config {settings[k]!r}"
        for k in SCORE_KEYS
        if k in recorded and k in settings and recorded[k] != settings[k]
    ]
    if diff:
        raise ConfigError(
            f"thresholds in {source} were computed on other scores ({'; '.join(diff)}): "
            "rerun `clipsam test` with this config to calibrate, or use the config the thresholds came from"
        )


