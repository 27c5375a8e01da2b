"""Per-category anomaly metrics as a torchmetrics ``Metric`` (DDP-synced, memory-bounded).

Dimension symbols: B batch, H x W the evaluation frame.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from torchmetrics import Metric

from clipsam.metrics.functional import (
    AUPRO_PROTOCOLS,
    MetricUndefinedWarning,
    aupro,
    image_metrics,
    pixel_metrics,
    pr_curve,
)

__all__ = ["PerCategoryMetrics"]

_PIXEL_KEYS = ("pixel_auroc", "pixel_f1_max", "pixel_ap")
_IMAGE_KEYS = ("image_auroc", "image_f1_max", "image_ap")


def _chunks(state: list[torch.Tensor] | torch.Tensor) -> list[torch.Tensor]:
    """A list state is a list of per-batch tensors, or one tensor after a DDP sync."""
    if isinstance(state, torch.Tensor):
        return [state]
    return list(state)


def _cat_small(state: list[torch.Tensor] | torch.Tensor) -> np.ndarray:
    chunks = _chunks(state)
    if not chunks:
        return np.zeros(0, dtype=np.int64)
    return torch.cat([c.reshape(-1).cpu() for c in chunks]).numpy()


def _cat_rows(state: list[torch.Tensor] | torch.Tensor) -> np.ndarray:
    """Concatenate (B, P) row chunks to an (M, P) array."""
    chunks = _chunks(state)
    if not chunks:
        return np.zeros((0, 0), dtype=np.float64)
    return torch.cat([c.cpu() for c in chunks]).numpy()


def _first_occurrence(sample_ids: np.ndarray) -> np.ndarray:
    """Boolean keep-mask selecting the first row of every distinct sample id."""
    keep = np.zeros(sample_ids.shape[0], dtype=bool)
    if sample_ids.size:
        keep[np.unique(sample_ids, return_index=True)[1]] = True
    return keep


class PerCategoryMetrics(Metric):
    """Pixel and image AUROC / F1-max / AP (and optionally AUPRO) per category and their mean.

    Every value is exact (see :mod:`clipsam.metrics.functional`) except AUPRO, which is
    threshold-sampled. States are list states reduced with ``"cat"``, so under DDP every rank
    gathers all images before :meth:`compute`. Images are de-duplicated by ``sample_id`` at
    compute time (``DistributedSampler`` pads the last batch with repeated images): each image
    counts once. Pixel metrics use only images whose ``has_mask`` is True; a category with no
    such image has no pixel keys. Image metrics use images whose label is 0 or 1 (label -1,
    unknown, is ignored).

    Memory: anomaly maps of images with a mask are stored as ``score_dtype`` (float32 by default;
    float16 halves the memory but rounds the scores, so values are then approximate) and masks
    as bool; nothing is stored for images without a mask. :meth:`compute` concatenates one
    category's pixels at a time, so the peak is the stored maps plus a few times the largest
    category. On GPU pass ``compute_on_cpu=True`` to keep the stored maps in host memory.

    Args:
        categories: category names; ``category_ids`` index into this sequence.
        pixel: compute pixel-level AUROC, F1-max and AP.
        image: compute image-level AUROC, F1-max and AP.
        aupro: also compute pixel-level AUPRO (FPR limit 0.3, threshold-sampled).
        score_dtype: dtype of the stored maps, torch.float32 (exact) or torch.float16.
        pr_curve_points: when > 0, each category also gets ``pixel_pr_curve`` (recall,
            precision, threshold lists thinned to this many points) for plots.
        threshold_method: when set (``"f1"`` or ``"fpr"``), :meth:`compute` also returns
            ``"thresholds"``: image- and pixel-level decision thresholds per category and pooled
            (:func:`clipsam.thresholds.compute_thresholds`). Keeps every category's maps alive
            until the end of :meth:`compute` (peak memory about twice the stored maps).
        target_fpr: the false-positive rate of ``threshold_method="fpr"``.
        category_image_scores: when set, ``update`` takes (B, P) ``image_score_parts`` and the
            image metrics of each category use ``category_image_scores(parts of all its images)``
            (a reference that scores images relative to their category, e.g. SDP's per-category
            min-max); None from it keeps the per-image scores. Decision thresholds always use the
            per-image ``image_scores`` (what a single image gets at predict time).
        **kwargs: passed to :class:`torchmetrics.Metric` (e.g. ``compute_on_cpu``).
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def __init__(
        self,
        categories: Sequence[str],
        *,
        pixel: bool = True,
        image: bool = True,
        aupro: bool = False,
        aupro_protocol: str = "mvtec",
        score_dtype: torch.dtype = torch.float32,
        pr_curve_points: int = 0,
        threshold_method: str | None = None,
        target_fpr: float = 0.01,
        category_image_scores: Callable[[torch.Tensor], torch.Tensor | None] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if isinstance(categories, str) or len(categories) == 0:
            raise ValueError(f"categories must be a non-empty sequence of names, got {categories!r}")
        if len(set(categories)) != len(categories):
            raise ValueError(f"categories must be distinct, got {list(categories)}")
        if score_dtype not in (torch.float32, torch.float16):
            raise ValueError(f"score_dtype must be torch.float32 or torch.float16, got {score_dtype}")
        if aupro_protocol not in AUPRO_PROTOCOLS:
            raise ValueError(f"aupro_protocol must be one of {list(AUPRO_PROTOCOLS)}, got {aupro_protocol!r}")
        self.aupro_protocol = aupro_protocol
        self.categories = list(categories)
        self.pixel = pixel
        self.image = image
        self.aupro = aupro
        self.score_dtype = score_dtype
        self.pr_curve_points = int(pr_curve_points)
        self.threshold_method = threshold_method
        self.target_fpr = float(target_fpr)
        self.category_image_scores = category_image_scores
        # one row per image
        for name in ("image_scores", "labels", "category_ids", "sample_ids"):
            self.add_state(name, default=[], dist_reduce_fx="cat")
        if category_image_scores is not None:
            self.add_state("image_score_parts", default=[], dist_reduce_fx="cat")
        # one row per image with a mask (only when pixel metrics are wanted)
        for name in ("maps", "masks", "map_category_ids", "map_sample_ids"):
            self.add_state(name, default=[], dist_reduce_fx="cat")

    @property
    def _store_maps(self) -> bool:
        return self.pixel or self.aupro

    def update(
        self,
        anomaly_maps: torch.Tensor,
        masks: torch.Tensor,
        image_scores: torch.Tensor,
        labels: torch.Tensor,
        category_ids: torch.Tensor,
        sample_ids: torch.Tensor,
        has_mask: torch.Tensor,
        image_score_parts: torch.Tensor | None = None,
    ) -> None:
        """Add one batch.

        Args:
            anomaly_maps: B x H x W float pixel scores (higher is more anomalous).
            masks: B x H x W bool or 0/1 ground truth (ignored where ``has_mask`` is False).
            image_scores: (B,) float image scores.
            labels: (B,) int64 image labels, 0 normal, 1 anomalous, -1 unknown.
            category_ids: (B,) int64 indices into ``categories``.
            sample_ids: (B,) int64 dataset indices, unique per image (used to de-duplicate).
            has_mask: (B,) bool, True where ``masks`` is a real ground truth.
            image_score_parts: (B, P) float, needed with ``category_image_scores``.
        """
        b = image_scores.shape[0] if image_scores.ndim else -1
        if image_scores.ndim != 1 or any(t.shape != (b,) for t in (labels, category_ids, sample_ids, has_mask)):
            raise ValueError(
                "image_scores, labels, category_ids, sample_ids and has_mask must all be (B,), got "
                f"{[tuple(t.shape) for t in (image_scores, labels, category_ids, sample_ids, has_mask)]}"
            )
        if category_ids.numel() and (int(category_ids.min()) < 0 or int(category_ids.max()) >= len(self.categories)):
            raise ValueError(
                f"category_ids must be in [0, {len(self.categories)}), got {category_ids.tolist()} "
                f"(categories: {self.categories})"
            )
        if self.category_image_scores is not None:
            if image_score_parts is None or image_score_parts.ndim != 2 or image_score_parts.shape[0] != b:
                raise ValueError(
                    "this metric scores images per category: pass image_score_parts (B, P) with "
                    f"B={b}, got {None if image_score_parts is None else tuple(image_score_parts.shape)}"
                )
            self.image_score_parts.append(image_score_parts.detach().to(torch.float64))
        self.image_scores.append(image_scores.detach().to(torch.float64))
        self.labels.append(labels.detach().to(torch.int64))
        self.category_ids.append(category_ids.detach().to(torch.int64))
        self.sample_ids.append(sample_ids.detach().to(torch.int64))

        if not self._store_maps:
            return
        if anomaly_maps.ndim != 3 or anomaly_maps.shape[0] != b or masks.shape != anomaly_maps.shape:
            raise ValueError(
                f"anomaly_maps and masks must both be (B, H, W) with B={b}, got "
                f"{tuple(anomaly_maps.shape)} and {tuple(masks.shape)}"
            )
        keep = has_mask.detach().to(device=anomaly_maps.device, dtype=torch.bool)
        if not bool(keep.any()):
            return
        maps = anomaly_maps.detach()[keep]
        if bool(torch.isnan(maps).any()):
            raise ValueError("anomaly_maps contain NaN")
        m = masks.detach()[keep]
        if m.dtype != torch.bool:
            if bool(((m != 0) & (m != 1)).any()):
                raise ValueError("masks must be bool or 0/1; binarise them in the data pipeline")
            m = m != 0
        self.maps.append(maps.to(self.score_dtype))
        self.masks.append(m)
        self.map_category_ids.append(category_ids.detach().to(keep.device, torch.int64)[keep])
        self.map_sample_ids.append(sample_ids.detach().to(keep.device, torch.int64)[keep])

    def _category_pixels(self, rows: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """Concatenate the stored maps/masks of the given global map rows (one category)."""
        maps, masks, start = [], [], 0
        for m_chunk, g_chunk in zip(_chunks(self.maps), _chunks(self.masks)):
            n = m_chunk.shape[0]
            local = rows[(rows >= start) & (rows < start + n)] - start
            if local.size:
                idx = torch.as_tensor(local, device=m_chunk.device)
                maps.append(m_chunk[idx].cpu())
                masks.append(g_chunk[idx].cpu())
            start += n
        return torch.cat(maps), torch.cat(masks)

    def compute(self) -> dict[str, Any]:
        """Metrics per category and their mean.

        Returns:
            ``{"per_category": {name: {"pixel_auroc", "pixel_f1_max", "pixel_ap",
            "image_auroc", "image_f1_max", "image_ap", ["pixel_aupro"], "num_images",
            "num_anomalous"}}, "mean": {metric: plain mean over categories, NaN values
            ignored}, "num_images": int}``. Only categories with at least one image appear;
            undefined values (one class only) are NaN and warned about with the category name.
        """
        cat_ids = _cat_small(self.category_ids)
        keep = _first_occurrence(_cat_small(self.sample_ids))
        cat_ids = cat_ids[keep]
        scores = _cat_small(self.image_scores)[keep]
        labels = _cat_small(self.labels)[keep]
        parts = _cat_rows(self.image_score_parts)[keep] if self.category_image_scores is not None else None

        if self._store_maps:
            map_cats = _cat_small(self.map_category_ids)
            map_keep = _first_occurrence(_cat_small(self.map_sample_ids))
        per_category: dict[str, dict[str, Any]] = {}
        groups: dict[str, dict[str, Any]] = {}
        if self.threshold_method and self._store_maps:
            label_of = dict(zip(_cat_small(self.sample_ids).tolist(), _cat_small(self.labels).tolist()))
            map_ids = _cat_small(self.map_sample_ids)
        for c, name in enumerate(self.categories):
            sel = cat_ids == c
            if not sel.any():
                continue
            out: dict[str, Any] = {}
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always", MetricUndefinedWarning)
                if self._store_maps:
                    rows = np.flatnonzero(map_keep & (map_cats == c))
                    if rows.size:
                        maps, masks = self._category_pixels(rows)
                        if self.pixel:
                            values = pixel_metrics(maps, masks)
                            out.update({f"pixel_{k}": values[k] for k in ("auroc", "f1_max", "ap")})
                            if self.pr_curve_points > 0:
                                curve = pr_curve(maps, masks, max_points=self.pr_curve_points)
                                if curve is not None:
                                    out["pixel_pr_curve"] = curve
                        if self.aupro:
                            out["pixel_aupro"] = aupro(maps, masks, protocol=self.aupro_protocol)
                        if self.threshold_method:
                            map_labels = np.array([label_of[int(i)] for i in map_ids[rows]])
                            groups[name] = {"maps": maps, "masks": masks, "map_labels": map_labels}
                        del maps, masks
                if self.image:
                    metric_scores = scores
                    if parts is not None:
                        combined = self.category_image_scores(torch.from_numpy(parts[sel]))
                        if combined is not None:
                            metric_scores = scores.copy()
                            metric_scores[sel] = np.asarray(combined, dtype=np.float64)
                    known = sel & (labels >= 0)
                    if known.any():
                        values = image_metrics(metric_scores[known], labels[known])
                        out.update({f"image_{k}": values[k] for k in ("auroc", "f1_max", "ap")})
            for w in caught:
                if issubclass(w.category, MetricUndefinedWarning):
                    warnings.warn(f"category {name!r}: {w.message}", MetricUndefinedWarning, stacklevel=2)
                else:  # pragma: no cover - re-emit anything else unchanged
                    warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
            if self.threshold_method:
                groups.setdefault(name, {}).update(image_scores=scores[sel], labels=labels[sel])
            out["num_images"] = int(sel.sum())
            out["num_anomalous"] = int((labels[sel] == 1).sum())
            per_category[name] = out

        # Only float-valued keys are averaged (not the PR curve).
        all_keys = (*_PIXEL_KEYS, "pixel_aupro", *_IMAGE_KEYS)
        metric_keys = [k for k in all_keys if any(k in v for v in per_category.values())]
        mean: dict[str, float] = {}
        for k in metric_keys:
            vals = [v[k] for v in per_category.values() if k in v and not math.isnan(v[k])]
            mean[k] = float(np.mean(vals)) if vals else float("nan")
        result: dict[str, Any] = {"per_category": per_category, "mean": mean, "num_images": int(keep.sum())}
        if self.threshold_method:
            from clipsam.thresholds import compute_thresholds

            result["thresholds"] = compute_thresholds(
                groups, method=self.threshold_method, target_fpr=self.target_fpr  # type: ignore[arg-type]
            )
        return result
