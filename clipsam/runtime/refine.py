"""The refiners' glue in numpy around the exported SAM decoder: PPG + CPS (``ppg_cps``) and MMR.

The same steps, in the same order and with the same coordinate arithmetic, as
:mod:`clipsam.prompting`, :mod:`clipsam.refiners.ppg_cps` and :mod:`clipsam.refiners.mmr`
(read those docstrings for the equations); ``tests/integration/test_runtime.py`` compares the
masks with the PyTorch path.

``decode(embedding, coords, labels, mask_input)`` is the exported ``sam_decoder.onnx`` on one
image: (C, h, w) embedding, (N, 2) SAM-input pixels with SAM's labels (-1 padding, 0 / 1
clicks, 2 / 3 box corners), (1, 4h, 4w) logits or None -> (M, 4h, 4w) logits, (M,) IoU.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from clipsam.runtime.ops import (
    ceil_minus,
    connected_components,
    dilate,
    resize_bilinear,
    sigmoid,
    stable_order,
)

__all__ = ["fuse_scores", "mmr", "postprocess_logits", "ppg", "ppg_cps"]

Decoder = Callable[[np.ndarray, np.ndarray, np.ndarray, "np.ndarray | None"], "tuple[np.ndarray, np.ndarray]"]


# ---------------------------------------------------------------------------------- coordinates
def frame_to_original(coords: np.ndarray, frame: tuple[int, int], original: tuple[int, int]) -> np.ndarray:
    """(..., 2) (x, y) frame pixels -> original pixels, centre to centre (float64 then float32)."""
    scale = np.asarray([original[1] / frame[1], original[0] / frame[0]], dtype=np.float64)
    return ((coords.astype(np.float64) + 0.5) * scale - 0.5).astype(np.float32)


def original_to_input(coords: np.ndarray, original: tuple[int, int], input_size: tuple[int, int]) -> np.ndarray:
    """SAM's ``ResizeLongestSide.apply_coords`` (float64 product, then float32)."""
    ratio = np.asarray([input_size[1] / original[1], input_size[0] / original[0]], dtype=np.float64)
    return (coords.astype(np.float64) * ratio).astype(np.float32)


def postprocess_logits(low_res: np.ndarray, side: int, input_size: tuple[int, int], target: tuple[int, int]) -> np.ndarray:
    """``Sam.postprocess_masks``: (..., 4h, 4w) -> S x S -> crop (h', w') -> ``target``, bilinear."""
    up = resize_bilinear(low_res, side, side)
    return resize_bilinear(up[..., : input_size[0], : input_size[1]], target[0], target[1])


def _box_of(mask: np.ndarray) -> np.ndarray | None:
    """Inclusive XYXY float32 box of a bool (H, W) mask, or None when empty."""
    rows, cols = mask.any(1), mask.any(0)
    if not rows.any():
        return None
    ys, xs = np.flatnonzero(rows), np.flatnonzero(cols)
    return np.asarray([xs[0], ys[0], xs[-1], ys[-1]], dtype=np.float32)


# ---------------------------------------------------------------------------------- PPG (Eq. 1-7)
def _interpolation_matrix(size: int, grid: int, extent: float, sampling: str) -> np.ndarray:
    """(size, grid) float32 weights reading the feature grid at pixel centres (prompting.py's
    ``_interpolation_matrices``: float64, border-clamped to the valid cells)."""
    last = float(min(max(ceil_minus(extent), 1), grid) - 1)
    centre = (np.arange(size, dtype=np.float64) + 0.5) * (extent / size)
    out = np.zeros((size, grid), dtype=np.float64)
    rows = np.arange(size)
    if sampling == "nearest":
        out[rows, np.minimum(np.floor(centre), last).astype(np.int64)] = 1.0
        return out.astype(np.float32)
    src = np.minimum(np.maximum(centre - 0.5, 0.0), last)
    i0 = np.floor(src)
    i1 = np.minimum(i0 + 1, last)
    w1 = src - i0
    np.add.at(out, (rows, i0.astype(np.int64)), 1 - w1)
    np.add.at(out, (rows, i1.astype(np.int64)), w1)
    return out.astype(np.float32)


def _pixel_features(features: np.ndarray, flat: np.ndarray, width: int, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """(P, C) sampled features of the raster indices ``flat``."""
    half = features @ cols.T  # (C, h, W)
    picked = half[:, :, flat % width]  # (C, h, P)
    return np.einsum("chp,ph->pc", picked, rows[flat // width], optimize=True).astype(np.float32)


def ppg(
    anomaly_map: np.ndarray, features: np.ndarray, extent: tuple[float, float], prompt: dict[str, Any], kernel: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Point prompts of one image: positives (highest Map_a in S_a), negatives (ring pixels least
    like the anomaly's SAM feature).

    Args:
        anomaly_map: (H, W) float32 Map_a; features: (C, h, w) SAM embedding; extent: feature
            cells (rows, cols) the frame covers; prompt: PPG settings; kernel: (k, k) bool.

    Returns:
        ``(coords, labels)``: (K, 2) float32 (x, y) frame pixels and (K,) int64 (1, 0, -1 empty).
    """
    num_pos, num_neg = int(prompt["num_positive"]), int(prompt["num_negative"])
    height, width = anomaly_map.shape
    coords = np.zeros((num_pos + num_neg, 2), dtype=np.float32)
    labels = np.full(num_pos + num_neg, -1, dtype=np.int64)
    region = anomaly_map >= np.float32(prompt["threshold"])  # S_a
    inside = np.flatnonzero(region)
    if inside.size == 0:
        return coords, labels
    chosen = [(inside[stable_order(anomaly_map.ravel()[inside], descending=True)[:num_pos]], 0, 1)]  # P_h (Eq. 1-2)
    if num_neg > 0:
        ring = np.flatnonzero(dilate(region, kernel) & ~region)  # N_a (Eq. 3)
        if ring.size:
            grid_h, grid_w = features.shape[1:]
            rows = _interpolation_matrix(height, grid_h, extent[0], prompt["feature_sampling"])
            cols = _interpolation_matrix(width, grid_w, extent[1], prompt["feature_sampling"])
            ring_feats = _pixel_features(features, ring, width, rows, cols)  # (Pn, C)
            ring_norm = np.linalg.norm(ring_feats.astype(np.float64), axis=1)
            if prompt["similarity_to"] == "max":
                anomaly = _pixel_features(features, inside, width, rows, cols)
                norms = np.maximum(ring_norm[:, None] * np.linalg.norm(anomaly.astype(np.float64), axis=1)[None], 1e-8)
                similarity = ((ring_feats.astype(np.float64) @ anomaly.T.astype(np.float64)) / norms).max(1)
            else:
                weights = rows.T.astype(np.float64) @ region.astype(np.float64) @ cols.astype(np.float64)  # (h, w)
                mean = np.tensordot(features.astype(np.float64), weights, axes=([1, 2], [0, 1])) / inside.size  # mean F(S_a) (Eq. 4-5)
                norms = np.maximum(ring_norm * np.linalg.norm(mean), 1e-8)
                similarity = (ring_feats.astype(np.float64) @ mean) / norms  # Map_s (Eq. 6)
            similarity = similarity.astype(np.float32)
            chosen.append((ring[stable_order(similarity, descending=False)[:num_neg]], num_pos, 0))  # P_l (Eq. 7)
    for idx, first, label in chosen:
        for slot, i in enumerate(idx.tolist(), start=first):
            coords[slot] = (i % width, i // width)
            labels[slot] = label
    return coords, labels


# ---------------------------------------------------------------------------------- CPS (Eq. 8-12)
def cascade(
    decode: Decoder,
    embedding: np.ndarray,
    coords: np.ndarray,
    labels: np.ndarray,
    *,
    frame: tuple[int, int],
    input_size: tuple[int, int],
    original: tuple[int, int],
    side: int,
    settings: dict[str, Any],
) -> np.ndarray:
    """The cascade of one prompt set: step 1 points, step 2 + logits, step 3 + the box of step 2's
    mask at the original size. Returns (H, W) float32 frame logits (-inf without points)."""
    real = labels >= 0
    if not real.any():
        return np.full(frame, -np.inf, dtype=np.float32)
    order = np.argsort(~real, kind="stable")  # real points first, order kept
    points = original_to_input(frame_to_original(coords[order], frame, original), original, input_size)[: int(real.sum())]
    point_labels = labels[order][: int(real.sum())].astype(np.float32)
    ratio = np.asarray([input_size[1] / original[1], input_size[0] / original[0]] * 2, dtype=np.float64)
    threshold = float(settings["mask_threshold"])
    low_res: np.ndarray | None = None
    for step in range(1, int(settings["num_steps"]) + 1):
        box = None
        if step == 3 and low_res is not None:
            box = _box_of(postprocess_logits(low_res, side, input_size, original)[0] > threshold)
        if box is not None:
            box_in = (box.astype(np.float64) * ratio).astype(np.float32)
            step_coords = np.concatenate([points, box_in.reshape(2, 2)])
            step_labels = np.concatenate([point_labels, np.asarray([2.0, 3.0], dtype=np.float32)])
        else:  # SAM appends its padding point when there is no box
            step_coords = np.concatenate([points, np.zeros((1, 2), dtype=np.float32)])
            step_labels = np.concatenate([point_labels, np.asarray([-1.0], dtype=np.float32)])
        masks, iou = decode(embedding, step_coords, step_labels, low_res)
        pick = 1 + int(np.argmax(iou[1:])) if settings["multimask"] else 0
        low_res = masks[pick : pick + 1]
    return postprocess_logits(low_res, side, input_size, frame)[0]


def _region_maps(anomaly_map: np.ndarray, threshold: float, max_regions: int) -> list[np.ndarray]:
    """``cascade.per_region``: Map_a on each 8-connected component of S_a, highest peak first."""
    count, components = connected_components(anomaly_map >= np.float32(threshold))
    peaks = [(float(anomaly_map[components == c].max()), c) for c in range(1, count)]
    chosen = [c for _, c in sorted(peaks, key=lambda pc: (-pc[0], pc[1]))[:max_regions]]
    if not chosen:
        return [anomaly_map]
    return [np.where(components == c, anomaly_map, np.float32(0.0)).astype(np.float32) for c in chosen]


def ppg_cps(
    decode: Decoder,
    embedding: np.ndarray,
    anomaly_map: np.ndarray,
    *,
    input_size: tuple[int, int],
    original: tuple[int, int],
    side: int,
    info: dict[str, Any],
) -> tuple[np.ndarray, np.ndarray]:
    """PPG then CPS on one image. Returns (H, W) bool mask and float32 mask probabilities."""
    prompt, settings = info["prompt"], info["cascade"]
    kernel = np.asarray(info["kernel"], dtype=bool)
    frame = (int(anomaly_map.shape[0]), int(anomaly_map.shape[1]))
    grid = embedding.shape[1:]
    extent = (input_size[0] * grid[0] / side, input_size[1] * grid[1] / side)
    maps = _region_maps(anomaly_map, prompt["threshold"], int(settings["max_regions"])) if settings["per_region"] else [anomaly_map]
    logits = None
    for amap in maps:
        coords, labels = ppg(amap, embedding, extent, prompt, kernel)
        row = cascade(decode, embedding, coords, labels, frame=frame, input_size=input_size, original=original, side=side, settings=settings)
        logits = row if logits is None else np.maximum(logits, row)
    return logits > np.float32(settings["mask_threshold"]), sigmoid(logits)


# ---------------------------------------------------------------------------------- MMR
def mmr(
    decode: Decoder,
    embedding: np.ndarray,
    anomaly_map: np.ndarray,
    *,
    input_size: tuple[int, int],
    original: tuple[int, int],
    side: int,
    info: dict[str, Any],
) -> tuple[np.ndarray, np.ndarray]:
    """ClipSAM-rec's MMR on one image: per region box + top-k points, 3 prompt sets, merged."""
    frame = (int(anomaly_map.shape[0]), int(anomaly_map.shape[1]))
    count, components = connected_components(anomaly_map >= np.float32(info["threshold"]))
    found = []
    for label in range(1, count):
        region = components == label
        if int(region.sum()) < int(info["min_area"]):
            continue
        found.append((float(anomaly_map[region].max()), label, region))
    found.sort(key=lambda item: (-item[0], item[1]))
    if int(info["max_regions"]) > 0:
        found = found[: int(info["max_regions"])]
    if not found:
        probs = np.zeros(frame, dtype=np.float32)
        return probs > np.float32(info["mask_threshold"]), probs
    width = frame[1]
    prompts = []
    for _, _, region in found:
        idx = np.flatnonzero(region)
        top = idx[stable_order(anomaly_map.ravel()[idx].astype(np.float32), descending=True)[: int(info["top_k"])]]
        points = np.stack([top % width, top // width], 1).astype(np.float32)
        prompts.append((points, _box_of(region)))
    k = min(p.shape[0] for p, _ in prompts)
    multimask = bool(info["multimask_output"])
    per_region = []
    for points, box in prompts:
        pts_in = original_to_input(frame_to_original(points[:k], frame, original), original, input_size)
        box_in = original_to_input(frame_to_original(box.reshape(2, 2), frame, original), original, input_size)
        region_probs = []
        for prompt_set in info["prompt_sets"]:
            if prompt_set == "points":
                coords = np.concatenate([pts_in, np.zeros((1, 2), dtype=np.float32)])
                labels = np.concatenate([np.ones(k, dtype=np.float32), [-1.0]]).astype(np.float32)
            elif prompt_set == "box":
                coords, labels = box_in, np.asarray([2.0, 3.0], dtype=np.float32)
            else:
                coords = np.concatenate([pts_in, box_in])
                labels = np.concatenate([np.ones(k, dtype=np.float32), [2.0, 3.0]]).astype(np.float32)
            masks, _ = decode(embedding, coords, labels, None)
            masks = masks[1:] if multimask else masks[:1]
            region_probs.append(sigmoid(postprocess_logits(masks, side, input_size, frame)))
        per_region.append(np.concatenate(region_probs).astype(np.float32).mean(0))
    probs = np.stack(per_region).max(0).astype(np.float32)
    return probs > np.float32(info["mask_threshold"]), probs


# ---------------------------------------------------------------------------------- fusion
def fuse_scores(anomaly_map: np.ndarray, probs: np.ndarray, mask: np.ndarray, method: str) -> np.ndarray:
    """:func:`clipsam.fusion.fuse_scores` in numpy."""
    amap = np.clip(anomaly_map.astype(np.float32), 0.0, 1.0)
    p = np.clip(probs.astype(np.float32), 0.0, 1.0)
    inside = mask.astype(np.float32)
    table = {
        "clip": lambda: amap.copy(),
        "sam": lambda: p.copy(),
        "product": lambda: amap * p,
        "mean": lambda: (amap + p) / np.float32(2.0),
        "max": lambda: np.maximum(amap, p),
        "clip_boost": lambda: (amap + inside) / np.float32(2.0),
        "clip_masked": lambda: amap * inside,
    }
    if method not in table:
        raise ValueError(f"fusion method {method!r} is not one of {sorted(table)}")
    return np.clip(table[method](), 0.0, 1.0).astype(np.float32)
