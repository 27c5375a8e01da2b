"""The SAM stage computed without clipsam: PPG from its equations (numpy + cv2), CPS as SamPredictor calls.

Nothing here imports clipsam: the tests compare clipsam's SAM stage with these functions.

PPG (the paper's Eq. 1-7), with the choices the paper leaves open spelled out as arguments:

- ``S_a = Map_a >= threshold``;
- positives: the k pixels of ``S_a`` with the highest ``Map_a``;
- ``N_a = dilate(S_a, kernel) - S_a`` with ``cv2.dilate``;
- SAM's features read at each frame pixel's centre: the valid cells of the (padded) embedding,
  ``extent`` of them along each axis, stretched over the frame; pixel ``x`` of W has its centre at
  cell coordinate ``u = (x + 0.5) * extent / W``; "bilinear" interpolates between cell centres
  at ``u - 0.5`` (clamped to the valid cells), "nearest" takes cell ``floor(u)``;
- negatives: the k ring pixels whose feature has the lowest cosine similarity to the mean
  feature of ``S_a`` ("mean") or to its most similar pixel ("max");
- ties (equal values) go to the pixel first in raster order.

CPS (Eq. 8-12) on one image, in original-image pixels: ``SamPredictor.predict`` with the points,
then with the previous low-res logits as ``mask_input``, then also with the box of the previous
mask (its pixels at the original size, inclusive corners).
"""

from __future__ import annotations

import math

import cv2
import numpy as np
import torch
from segment_anything import SamPredictor

KERNELS = {"ellipse": cv2.MORPH_ELLIPSE, "rect": cv2.MORPH_RECT, "cross": cv2.MORPH_CROSS}


def _axis_weights(size: int, cells: int, extent: float, sampling: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per pixel of an axis: the two cells read and the weight of the second one."""
    last = min(cells, math.ceil(extent)) - 1  # the last cell that covers part of the valid input
    centre = (np.arange(size, dtype=np.float64) + 0.5) * (extent / size)
    if sampling == "nearest":
        cell = np.minimum(np.floor(centre), last).astype(np.int64)
        return cell, cell, np.zeros(size)
    assert sampling == "bilinear", sampling
    pos = np.clip(centre - 0.5, 0, last)
    first = np.floor(pos).astype(np.int64)
    second = np.minimum(first + 1, last)
    return first, second, pos - first


def frame_features(
    features: np.ndarray, frame: tuple[int, int], extent: tuple[float, float], sampling: str = "bilinear"
) -> np.ndarray:
    """(H, W, C) float64: SAM's (C, h, w) features read at the centres of the frame's pixels."""
    feats = np.asarray(features, dtype=np.float64).transpose(1, 2, 0)  # (h, w, C)
    y0, y1, wy = _axis_weights(frame[0], feats.shape[0], extent[0], sampling)
    x0, x1, wx = _axis_weights(frame[1], feats.shape[1], extent[1], sampling)
    wy, wx = wy[:, None, None], wx[None, :, None]
    top = feats[y0][:, x0] * (1 - wx) + feats[y0][:, x1] * wx
    bottom = feats[y1][:, x0] * (1 - wx) + feats[y1][:, x1] * wx
    return top * (1 - wy) + bottom * wy


def _cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(P, Q) cosine similarities of the rows of a (P, C) and b (Q, C)."""
    norms = np.linalg.norm(a, axis=1)[:, None] * np.linalg.norm(b, axis=1)[None]
    return a @ b.T / np.maximum(norms, 1e-8)


def ppg(
    amap: np.ndarray,
    features: np.ndarray,
    extent: tuple[float, float] | None = None,
    *,
    num_positive: int,
    num_negative: int,
    threshold: float,
    kernel_shape: str,
    kernel_size: int,
    similarity_to: str = "mean",
    feature_sampling: str = "bilinear",
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """PPG on one image.

    Args:
        amap: (H, W) float32 ``Map_a``; features: (C, h, w) SAM features; extent: valid cells
            (rows, columns) of the features, None for all of them.

    Returns:
        ``(coords, labels, ring)``: (N, 2) float32 (x, y) frame pixels, positives first; (N,)
        int64, 1 / 0; (R, 3) float64 rows (x, y, similarity) of every ring pixel in the order of
        Eq. 7 (to judge near-ties; empty without negatives).
    """
    height, width = amap.shape
    if extent is None:
        extent = (float(features.shape[1]), float(features.shape[2]))
    region = amap >= threshold
    ys, xs = np.nonzero(region)  # raster order
    order = np.lexsort((ys * width + xs, -amap[ys, xs].astype(np.float64)))[:num_positive]
    points = [(xs[i], ys[i], 1) for i in order]
    kernel = cv2.getStructuringElement(KERNELS[kernel_shape], (kernel_size, kernel_size))
    ring = cv2.dilate(region.astype(np.uint8), kernel).astype(bool) & ~region
    ring_table = np.zeros((0, 3))
    if num_negative > 0 and ring.any():
        feats = frame_features(features, (height, width), extent, feature_sampling)
        ry, rx = np.nonzero(ring)
        inside, outside = feats[region], feats[ry, rx]
        if similarity_to == "mean":
            sim = _cosine(outside, inside.mean(0)[None])[:, 0]
        else:
            assert similarity_to == "max", similarity_to
            sim = _cosine(outside, inside).max(1)
        order = np.lexsort((ry * width + rx, sim))
        ring_table = np.stack([rx[order], ry[order], sim[order]], 1).astype(np.float64)
        points += [(rx[i], ry[i], 0) for i in order[:num_negative]]
    coords = np.array([[x, y] for x, y, _ in points], dtype=np.float32).reshape(-1, 2)
    labels = np.array([label for _, _, label in points], dtype=np.int64)
    return coords, labels, ring_table


def assert_same_points(coords, labels, expected_coords, expected_labels, ring, *, tol: float = 1e-5) -> int:
    """PPG's points equal the reference's, up to the order of near-tied negatives.

    Positives (exact float32 ``Map_a`` values) must match exactly. The j-th negative must be
    the reference's j-th, or, where similarities lie within ``tol`` of each other (features equal
    in exact arithmetic, whose order rests on rounding), a ring pixel whose similarity is within
    ``tol`` of the reference's j-th.

    Returns:
        how many negatives matched only up to a near-tie (0: the points are identical).
    """
    coords, labels = np.asarray(coords), np.asarray(labels)
    assert np.array_equal(labels, expected_labels), (labels, expected_labels)
    positives = labels == 1
    assert np.array_equal(coords[positives], expected_coords[positives]), (coords, expected_coords)
    lookup = {(int(x), int(y)): s for x, y, s in ring}
    got = [(int(x), int(y)) for x, y in coords[~positives]]
    assert len(set(got)) == len(got) and all(p in lookup for p in got), got
    loose = 0
    for j, (point, expected) in enumerate(zip(got, expected_coords[~positives])):
        if point != (int(expected[0]), int(expected[1])):
            assert abs(lookup[point] - ring[j, 2]) <= tol, (j, point, lookup[point], ring[j])
            loose += 1
    return loose


def frame_to_original(coords: np.ndarray, frame: tuple[int, int], original: tuple[int, int]) -> np.ndarray:
    """(x, y) frame pixels -> original pixels, pixel centre to pixel centre (float64)."""
    scale = np.array([original[1] / frame[1], original[0] / frame[0]])
    return (np.asarray(coords, dtype=np.float64) + 0.5) * scale - 0.5


def mask_box(mask: np.ndarray) -> np.ndarray | None:
    """XYXY inclusive pixel corners of a (H, W) bool mask, None when empty."""
    ys, xs = np.nonzero(mask)
    if ys.size == 0:
        return None
    return np.array([xs.min(), ys.min(), xs.max(), ys.max()], dtype=np.float64)


def predictor_cascade(
    predictor: SamPredictor,
    coords: np.ndarray,
    labels: np.ndarray,
    *,
    num_steps: int = 3,
    multimask: bool = False,
    mask_threshold: float = 0.0,
) -> list[dict]:
    """CPS with ``SamPredictor.predict``; prompts in original pixels; [] without points.

    Returns:
        per step: ``logits`` (H0, W0), ``mask`` (H0, W0) bool, ``low_res`` (4h, 4w), ``iou``
        (float) of the kept mask (the best predicted IoU with ``multimask``), ``box`` given
        to the step (XYXY original pixels) or None.
    """
    steps: list[dict] = []
    if len(labels) == 0:
        return steps
    mask_input = box = None
    for step in range(1, num_steps + 1):
        if step == 3:
            box = mask_box(steps[-1]["mask"])
        logits, ious, low_res = predictor.predict(
            point_coords=coords,
            point_labels=labels,
            box=box,
            mask_input=mask_input,
            multimask_output=multimask,
            return_logits=True,
        )
        best = int(np.argmax(ious)) if multimask else 0
        steps.append({
            "logits": logits[best],
            "mask": logits[best] > mask_threshold,
            "low_res": low_res[best],
            "iou": float(ious[best]),
            "box": box,
        })
        mask_input = low_res[best][None]
    return steps


def low_res_to(sam, low_res: np.ndarray, input_size: tuple[int, int], size: tuple[int, int]) -> np.ndarray:
    """SAM's own upsampling (``Sam.postprocess_masks``) of (4h, 4w) low-res logits to ``size``."""
    with torch.no_grad():
        out = sam.postprocess_masks(torch.from_numpy(np.asarray(low_res))[None, None], tuple(input_size), tuple(size))
    return out[0, 0].numpy()
