"""PPG: Co-Feature Point Prompt Generation (METHOD.md, Eq. 1-7).

CLIP says where the anomaly is, SAM's own features say which nearby pixels surely are
background. Given the CLIP anomaly map ``Map_a`` and the SAM image-encoder features ``F``:

- ``S_a = Map_a >= threshold``                  the "extreme anomaly" region;
- ``R_a = S_a * Map_a``, ``P_h = Topk(R_a)``    positives: the highest pixels inside ``S_a`` (1-2);
- ``N_a = dilate(S_a) - S_a``                   the ring around it (3);
- ``Map_s = cos(F(N_a), mean F(S_a))``          ring features vs the anomaly's mean feature (4-6);
- ``P_l = Lowestk(Map_s)``                      negatives: the ring pixels least like it (7).

Dimension symbols: H x W the anomaly map (the evaluation frame), C SAM feature channels,
h x w SAM's feature grid, K returned points.

Coordinate convention: a point is the integer pixel index ``(x, y) = (column, row)`` of the
anomaly map, float32, the convention of SAM's clicks (SAM's prompt encoder adds 0.5 itself to
reach the pixel centre). Points are given in the anomaly map's frame; the caller maps them to
SAM's input frame with SAM's ``ResizeLongestSide.apply_coords``.

Torch and OpenCV (the structuring element and the dilation of the ring); no Lightning, no
segment_anything.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from clipsam.errors import ConfigError

__all__ = [
    "KERNEL_SHAPES",
    "PromptConfig",
    "anomaly_ring",
    "generate_point_prompts",
    "structuring_element",
]

KernelShape = Literal["ellipse", "rect", "cross"]

KERNEL_SHAPES: dict[str, int] = {
    "ellipse": cv2.MORPH_ELLIPSE,
    "rect": cv2.MORPH_RECT,
    "cross": cv2.MORPH_CROSS,
}
"""Kernel shape name -> OpenCV morphology shape (``cv2.getStructuringElement``)."""

_FEATURE_CHUNK = 16384  # pixels sampled at once (bounds memory at 4 x C x 16k floats)


@dataclasses.dataclass
class PromptConfig:
    """PPG settings (config key ``model.prompt``).

    The paper gives the dilation kernel (ellipse, 25 x 25; its ablation also runs rect 20 and
    cross 25) but not the number of points nor the threshold of ``S_a``; those defaults are
    ours:

    Attributes:
        num_positive: k of ``Topk`` (Eq. 2), positive points. Our choice: 5, a few clicks
            spread over the peak as in SAM's interactive use; the paper does not give it.
        num_negative: k of ``Lowestk`` (Eq. 7), negative points. Our choice: 5 (as many
            negatives as positives).
        threshold: ``S_a = Map_a >= threshold`` on the [0, 1] CLIP map. Our choice: 0.5, the
            point where the per-pixel softmax says "anomalous" is more likely than "normal";
            higher values give smaller, surer regions (the paper only says "extreme").
        kernel_shape: dilation kernel for the ring ``N_a``: "ellipse" (paper), "rect", "cross",
            the shapes of ``cv2.getStructuringElement``.
        kernel_size: kernel width = height in pixels of the anomaly map (paper: 25).
    """

    num_positive: int = 5
    num_negative: int = 5
    threshold: float = 0.5
    kernel_shape: KernelShape = "ellipse"
    kernel_size: int = 25

    def __post_init__(self) -> None:
        if self.kernel_shape not in KERNEL_SHAPES:
            raise ConfigError(
                f"model.prompt.kernel_shape={self.kernel_shape!r} is not a kernel shape; "
                f"use one of {sorted(KERNEL_SHAPES)}"
            )
        if int(self.kernel_size) < 1:
            raise ConfigError(f"model.prompt.kernel_size={self.kernel_size} must be >= 1 (pixels)")
        if int(self.num_positive) < 0 or int(self.num_negative) < 0:
            raise ConfigError(
                f"model.prompt.num_positive={self.num_positive} and model.prompt.num_negative="
                f"{self.num_negative} must be >= 0"
            )
        if not 0.0 <= float(self.threshold) <= 1.0:
            raise ConfigError(f"model.prompt.threshold={self.threshold} must be in [0, 1] (Map_a's range)")

    def kwargs(self) -> dict[str, object]:
        """The keyword arguments of :func:`generate_point_prompts`."""
        return dataclasses.asdict(self)


def structuring_element(kernel_shape: str, kernel_size: int) -> torch.Tensor:
    """The dilation kernel, exactly ``cv2.getStructuringElement(shape, (k, k))``.

    Args:
        kernel_shape: "ellipse", "rect" or "cross".
        kernel_size: k, width = height in pixels.

    Returns:
        (k, k) bool kernel; its anchor is OpenCV's default, ``(k // 2, k // 2)``.
    """
    if kernel_shape not in KERNEL_SHAPES:
        raise ValueError(f"kernel_shape must be one of {sorted(KERNEL_SHAPES)}, got {kernel_shape!r}")
    if kernel_size < 1:
        raise ValueError(f"kernel_size must be >= 1, got {kernel_size}")
    element = cv2.getStructuringElement(KERNEL_SHAPES[kernel_shape], (kernel_size, kernel_size))
    return torch.from_numpy(element).bool()


def anomaly_ring(region: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    """``N_a = dilate(S_a) - S_a`` (Eq. 3), by ``cv2.dilate`` with its default anchor.

    The (H, W) mask makes a round trip through host memory (one byte per pixel).

    Args:
        region: (H, W) bool, ``S_a``.
        kernel: (k, k) bool structuring element (see :func:`structuring_element`).

    Returns:
        (H, W) bool ring on ``region``'s device: pixels reached by the dilation that are not in
        ``region``. Outside the map counts as background (OpenCV's default border for dilation).
    """
    if not bool(region.any()):
        return torch.zeros_like(region, dtype=torch.bool)
    source = region.detach().cpu().numpy().astype(np.uint8)
    dilated = cv2.dilate(source, kernel.cpu().numpy().astype(np.uint8))
    return torch.from_numpy(dilated.astype(bool)).to(region.device) & ~region


def _interpolation_matrix(size: int, grid: int, device: torch.device) -> torch.Tensor:
    """(size, grid) float32 bilinear weights of grid cells at the centres of ``size`` pixels.

    Pixel ``x`` sits at grid coordinate ``(x + 0.5) * grid / size - 0.5``, clamped to
    ``[0, grid - 1]`` (border), computed in float64: equal sizes give the identity.
    """
    src = ((torch.arange(size, dtype=torch.float64, device=device) + 0.5) * (grid / size) - 0.5).clamp(0, grid - 1)
    i0 = src.floor().long()
    i1 = (i0 + 1).clamp(max=grid - 1)
    w1 = src - i0
    matrix = torch.zeros((size, grid), dtype=torch.float64, device=device)
    rows = torch.arange(size, device=device)
    matrix.index_put_((rows, i0), 1 - w1, accumulate=True)
    matrix.index_put_((rows, i1), w1, accumulate=True)
    return matrix.to(torch.float32)


def _sample_features(features: torch.Tensor, ys: torch.Tensor, xs: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Features at the centres of frame pixels ``(ys, xs)`` by bilinear interpolation.

    Frame pixel ``x`` (of W) has its centre at feature-grid coordinate ``(x + 0.5) * w / W - 0.5``
    (clamped to the grid: border padding), the sampling of ``grid_sample(..., align_corners=False,
    padding_mode="border")`` and ``F.interpolate(..., mode="bilinear", align_corners=False)``. The
    coordinates are computed in float64, so equal resolutions give exactly ``features[:, y, x]``.

    Args:
        features: (C, h, w) float, covering the H x W frame exactly.
        ys, xs: (P,) int64 pixel rows / columns in the H x W frame.
        size: (H, W) of the frame.

    Returns:
        (P, C) float32 features.
    """
    height, width = size
    channels, grid_h, grid_w = features.shape
    table = features.to(torch.float32).permute(1, 2, 0).reshape(grid_h * grid_w, channels)  # (h*w, C)
    out = []
    for start in range(0, ys.numel(), _FEATURE_CHUNK):
        rows = ys[start : start + _FEATURE_CHUNK].to(table.device)
        cols = xs[start : start + _FEATURE_CHUNK].to(table.device)
        sy = ((rows.double() + 0.5) * (grid_h / height) - 0.5).clamp(0, grid_h - 1)  # (P,) grid rows
        sx = ((cols.double() + 0.5) * (grid_w / width) - 0.5).clamp(0, grid_w - 1)
        y0, x0 = sy.floor().long(), sx.floor().long()
        y1, x1 = (y0 + 1).clamp(max=grid_h - 1), (x0 + 1).clamp(max=grid_w - 1)
        wy, wx = (sy - y0).to(torch.float32)[:, None], (sx - x0).to(torch.float32)[:, None]
        top = table[y0 * grid_w + x0] * (1 - wx) + table[y0 * grid_w + x1] * wx  # (P, C)
        bottom = table[y1 * grid_w + x0] * (1 - wx) + table[y1 * grid_w + x1] * wx
        out.append(top * (1 - wy) + bottom * wy)
    if not out:
        return table.new_zeros((0, channels))
    return torch.cat(out)


def _mean_feature(features: torch.Tensor, region: torch.Tensor) -> torch.Tensor:
    """Mean over the pixels of ``region`` of their bilinear features (as :func:`_sample_features`).

    Bilinear sampling is linear and separable, so the mean is ``sum_cells F * (A^T S B) / |S|``
    with A (H, h), B (W, w) the interpolation matrices: no per-pixel features are formed.

    Args:
        features: (C, h, w) float covering the frame; region: (H, W) bool, not empty.

    Returns:
        (C,) float32.
    """
    _, grid_h, grid_w = features.shape
    height, width = region.shape
    rows = _interpolation_matrix(height, grid_h, features.device)  # (H, h)
    cols = _interpolation_matrix(width, grid_w, features.device)  # (W, w)
    weights = rows.T @ region.to(features.device, torch.float32) @ cols  # (h, w)
    return torch.einsum("chw,hw->c", features.to(torch.float32), weights) / region.sum().to(torch.float32)


def _pixel_similarity(
    features: torch.Tensor, target: torch.Tensor, ys: torch.Tensor, xs: torch.Tensor, size: tuple[int, int]
) -> torch.Tensor:
    """Cosine similarity of the bilinear features of frame pixels ``(ys, xs)`` to ``target``.

    The same numbers as ``cosine_similarity(_sample_features(...), target)`` without forming the
    (P, C) features: with corner cells a, b (top row) and c, d (bottom row) and bilinear weights
    w, ``f . t = sum_k w_k (F_k . t)`` and ``|f|^2 = sum_k sum_l w_k w_l (F_k . F_l)``, so only
    per-cell dot products (with ``target``, with itself and with its right, lower, lower-right
    neighbours and the anti-diagonal pair) are needed: O(C h w) once, then O(1) per pixel.

    Args:
        features: (C, h, w) float covering the H x W frame; target: (C,) float.
        ys, xs: (P,) int64 pixel rows / columns; size: (H, W).

    Returns:
        (P,) float32 cosine similarities.
    """
    height, width = size
    table = features.to(torch.float32)
    _, grid_h, grid_w = table.shape

    def pad(dots: torch.Tensor) -> torch.Tensor:  # neighbour dots are missing on the last row/col
        return F.pad(dots, (0, grid_w - dots.shape[1], 0, grid_h - dots.shape[0]))

    to_target = torch.einsum("chw,c->hw", table, target.to(torch.float32))  # F_k . t
    self_dot = (table * table).sum(0)  # |F_k|^2
    right = pad((table[:, :, :-1] * table[:, :, 1:]).sum(0))  # F[y, x] . F[y, x+1]
    down = pad((table[:, :-1, :] * table[:, 1:, :]).sum(0))  # F[y, x] . F[y+1, x]
    diag = pad((table[:, :-1, :-1] * table[:, 1:, 1:]).sum(0))  # F[y, x] . F[y+1, x+1]
    anti = pad((table[:, :-1, 1:] * table[:, 1:, :-1]).sum(0))  # F[y, x+1] . F[y+1, x]

    sy = ((ys.to(table.device).double() + 0.5) * (grid_h / height) - 0.5).clamp(0, grid_h - 1)
    sx = ((xs.to(table.device).double() + 0.5) * (grid_w / width) - 0.5).clamp(0, grid_w - 1)
    y0, x0 = sy.floor().long(), sx.floor().long()
    y1, x1 = (y0 + 1).clamp(max=grid_h - 1), (x0 + 1).clamp(max=grid_w - 1)
    wy, wx = (sy - y0).to(torch.float32), (sx - x0).to(torch.float32)
    # A clamped corner (x1 == x0 or y1 == y0) only happens where its weight is 0.
    wa, wb, wc, wd = (1 - wy) * (1 - wx), (1 - wy) * wx, wy * (1 - wx), wy * wx
    a, b, c, d = (y0, x0), (y0, x1), (y1, x0), (y1, x1)
    dot = wa * to_target[a] + wb * to_target[b] + wc * to_target[c] + wd * to_target[d]
    norm2 = (
        wa * wa * self_dot[a] + wb * wb * self_dot[b] + wc * wc * self_dot[c] + wd * wd * self_dot[d]
        + 2 * (wa * wb * right[a] + wc * wd * right[c] + wa * wc * down[a] + wb * wd * down[b])
        + 2 * (wa * wd * diag[a] + wb * wc * anti[a])
    )
    norms = norm2.clamp_min(0).sqrt() * target.to(torch.float32).norm()
    return dot / norms.clamp_min(1e-8)


def _stable_topk(values: torch.Tensor, k: int, *, largest: bool) -> torch.Tensor:
    """Indices of the k largest (or smallest) values, ties broken by position (earlier first).

    Same answer as ``torch.sort(values, descending=largest, stable=True).indices[:k]`` in O(n):
    ``topk`` finds the k-th value, then only the candidates reaching it (all ties included) are
    sorted stably.
    """
    if k <= 0 or values.numel() == 0:
        return torch.zeros(0, dtype=torch.int64, device=values.device)
    if k < values.numel():
        kth = torch.topk(values, k, largest=largest, sorted=True).values[-1]
        candidates = torch.nonzero(values >= kth if largest else values <= kth).flatten()  # ascending
    else:
        candidates = torch.arange(values.numel(), device=values.device)
    order = torch.sort(values[candidates], descending=largest, stable=True).indices[:k]
    return candidates[order]


def generate_point_prompts(
    anomaly_map: torch.Tensor,
    sam_features: torch.Tensor,
    *,
    num_positive: int,
    num_negative: int,
    threshold: float,
    kernel_shape: str,
    kernel_size: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Positive and negative point prompts from the CLIP map and SAM's features (Eq. 1-7).

    Positives are the ``num_positive`` highest pixels of ``S_a * Map_a``, inside ``S_a`` only
    (fewer if ``S_a`` is smaller). Negatives are the ``num_negative`` pixels of the ring
    ``N_a = dilate(S_a) - S_a`` whose SAM feature has the lowest cosine similarity to the MEAN
    SAM feature over ``S_a`` (fewer if the ring is smaller). No spacing or suppression is
    applied: neighbouring pixels may both be chosen.

    Ties are broken deterministically by raster order (row-major, the smaller ``y * W + x``
    first): the sorts are stable over pixels listed in raster order.

    Feature alignment: ``sam_features`` must cover exactly the anomaly map's frame (for SAM,
    the caller crops the padded 64 x 64 embedding to the valid region of its input first). Each
    frame pixel's feature is read at the pixel centre by bilinear interpolation (the sampling of
    ``grid_sample`` with ``align_corners=False`` and border padding: pixel ``x`` of W sits at
    grid coordinate ``(x + 0.5) * w / W - 0.5``); when ``(h, w) == (H, W)`` this is exactly
    ``sam_features[:, y, x]``. SAM's 64 x 64 grid on a 518 x 518 frame is thus upsampled
    bilinearly, like SAM's own mask upsampling.

    Args:
        anomaly_map: (H, W) float in [0, 1], ``Map_a`` in the evaluation frame.
        sam_features: (C, h, w) float, SAM image-encoder features covering the same frame.
        num_positive: number of positive points (k of Eq. 2), >= 0.
        num_negative: number of negative points (k of Eq. 7), >= 0.
        threshold: ``S_a = anomaly_map >= threshold``.
        kernel_shape: dilation kernel shape, "ellipse", "rect" or "cross" (OpenCV's shapes).
        kernel_size: kernel width = height in anomaly-map pixels.

    Returns:
        ``(coords, labels)``: coords (K, 2) float32, (x, y) integer pixel indices of the anomaly
        map (x = column, y = row); labels (K,) int64, 1 positive, 0 negative. Positives come
        first in descending score, then negatives in ascending similarity. When ``S_a`` is empty
        (nothing reaches the threshold) both are empty: (0, 2) and (0,). All on
        ``anomaly_map``'s device.

    Raises:
        ValueError: on wrong shapes, negative counts or an unknown kernel shape.
    """
    if anomaly_map.ndim != 2:
        raise ValueError(f"anomaly_map must be (H, W), got shape {tuple(anomaly_map.shape)}")
    if sam_features.ndim != 3:
        raise ValueError(f"sam_features must be (C, h, w), got shape {tuple(sam_features.shape)}")
    if num_positive < 0 or num_negative < 0:
        raise ValueError(f"num_positive and num_negative must be >= 0, got {num_positive}, {num_negative}")
    kernel = structuring_element(kernel_shape, int(kernel_size))

    device = anomaly_map.device
    height, width = anomaly_map.shape
    amap = anomaly_map.detach().to(torch.float32)
    region = amap >= threshold  # (H, W) bool, S_a
    empty = (torch.zeros((0, 2), dtype=torch.float32, device=device), torch.zeros((0,), dtype=torch.int64, device=device))
    if not bool(region.any()):
        return empty

    # Eq. 1-2: positives among S_a's pixels, listed in raster order; stable top-k.
    inside = region.flatten().nonzero().squeeze(1)  # (P,) raster indices of S_a
    scores = amap.flatten()[inside]  # R_a on S_a
    pos_idx = inside[_stable_topk(scores, num_positive, largest=True)]

    # Eq. 3-7: negatives on the ring, by cosine similarity to the mean anomaly feature.
    ring = anomaly_ring(region, kernel.to(device))
    ring_idx = ring.flatten().nonzero().squeeze(1)  # (Q,) raster indices of N_a
    if num_negative > 0 and ring_idx.numel() > 0:
        feats = sam_features.detach()
        mean_a = _mean_feature(feats, region)  # (C,) mean of F over S_a
        # (Q,) Map_s: cosine similarity of each ring pixel's feature to the mean.
        similarity = _pixel_similarity(feats, mean_a, ring_idx // width, ring_idx % width, (height, width)).to(device)
        neg_idx = ring_idx[_stable_topk(similarity, num_negative, largest=False)]
    else:
        neg_idx = ring_idx[:0]

    idx = torch.cat((pos_idx, neg_idx))
    coords = torch.stack((idx % width, idx // width), dim=1).to(torch.float32)  # (K, 2) (x, y)
    labels = torch.cat(
        (torch.ones_like(pos_idx, dtype=torch.int64), torch.zeros_like(neg_idx, dtype=torch.int64))
    )
    return coords, labels
