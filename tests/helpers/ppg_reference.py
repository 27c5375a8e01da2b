"""PPG as clipsam computed it one image at a time before the batched rewrite (reference for tests).

Host-side ``cv2.dilate`` for the ring, per-ring-pixel similarities (bilinear features sampled
pixel by pixel, :func:`sample_features`; mean over ``S_a`` and cosine by closed forms checked
against it) and a stable sort per image: the batched :func:`clipsam.prompting.generate_point_prompts_batched` must give the same points in
the same order.
"""

from __future__ import annotations

import math

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from clipsam.prompting import _stable_topk, structuring_element

FEATURE_CHUNK = 16384  # pixels sampled at once (bounds memory at 4 x C x 16k floats)


def interpolation_matrix(size: int, grid: int, device: torch.device) -> torch.Tensor:
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


def sample_features(features: torch.Tensor, ys: torch.Tensor, xs: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
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
    for start in range(0, ys.numel(), FEATURE_CHUNK):
        rows = ys[start : start + FEATURE_CHUNK].to(table.device)
        cols = xs[start : start + FEATURE_CHUNK].to(table.device)
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


def mean_feature(features: torch.Tensor, region: torch.Tensor) -> torch.Tensor:
    """Mean over the pixels of ``region`` of their bilinear features (as :func:`sample_features`).

    Bilinear sampling is linear and separable, so the mean is ``sum_cells F * (A^T S B) / |S|``
    with A (H, h), B (W, w) the interpolation matrices: no per-pixel features are formed.

    Args:
        features: (C, h, w) float covering the frame; region: (H, W) bool, not empty.

    Returns:
        (C,) float32.
    """
    _, grid_h, grid_w = features.shape
    height, width = region.shape
    rows = interpolation_matrix(height, grid_h, features.device)  # (H, h)
    cols = interpolation_matrix(width, grid_w, features.device)  # (W, w)
    weights = rows.T @ region.to(features.device, torch.float32) @ cols  # (h, w)
    return torch.einsum("chw,hw->c", features.to(torch.float32), weights) / region.sum().to(torch.float32)


def pixel_similarity(
    features: torch.Tensor,
    target: torch.Tensor,
    ys: torch.Tensor,
    xs: torch.Tensor,
    size: tuple[int, int],
    extent: tuple[float, float] | None = None,
) -> torch.Tensor:
    """Cosine similarity of the bilinear features of frame pixels ``(ys, xs)`` to ``target``.

    The same numbers as ``cosine_similarity(sample_features(...), target)`` without forming the
    (P, C) features: with corner cells a, b (top row) and c, d (bottom row) and bilinear weights
    w, ``f . t = sum_k w_k (F_k . t)`` and ``|f|^2 = sum_k sum_l w_k w_l (F_k . F_l)``, so only
    per-cell dot products (with ``target``, with itself and with its right, lower, lower-right
    neighbours and the anti-diagonal pair) are needed: O(C h w) once, then O(1) per pixel.

    Args:
        features: (C, h, w) float covering the H x W frame; target: (C,) float.
        ys, xs: (P,) int64 pixel rows / columns; size: (H, W).
        extent: feature cells (rows, columns) the frame covers (see
            :func:`generate_point_prompts_batched`); None: the whole grid.

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

    ext_h, ext_w = (float(grid_h), float(grid_w)) if extent is None else (float(extent[0]), float(extent[1]))
    last_h = min(grid_h, max(1, math.ceil(ext_h - 1e-9))) - 1  # last valid cell
    last_w = min(grid_w, max(1, math.ceil(ext_w - 1e-9))) - 1
    sy = ((ys.to(table.device).double() + 0.5) * (ext_h / height) - 0.5).clamp(0, last_h)
    sx = ((xs.to(table.device).double() + 0.5) * (ext_w / width) - 0.5).clamp(0, last_w)
    y0, x0 = sy.floor().long(), sx.floor().long()
    y1, x1 = (y0 + 1).clamp(max=last_h), (x0 + 1).clamp(max=last_w)
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



def reference_point_prompts(anomaly_map, sam_features, *, num_positive, num_negative, threshold, kernel_shape, kernel_size):
    kernel = structuring_element(kernel_shape, kernel_size).numpy().astype(np.uint8)
    height, width = anomaly_map.shape
    amap = anomaly_map.to(torch.float32)
    region = amap >= threshold
    if not bool(region.any()):
        return torch.zeros((0, 2)), torch.zeros((0,), dtype=torch.int64)
    inside = region.flatten().nonzero().squeeze(1)
    pos_idx = inside[_stable_topk(amap.flatten()[inside], num_positive, largest=True)]
    dilated = torch.from_numpy(cv2.dilate(region.numpy().astype(np.uint8), kernel).astype(bool))
    ring_idx = (dilated & ~region).flatten().nonzero().squeeze(1)
    if num_negative > 0 and ring_idx.numel() > 0:
        mean_a = mean_feature(sam_features, region)
        similarity = pixel_similarity(sam_features, mean_a, ring_idx // width, ring_idx % width, (height, width))
        neg_idx = ring_idx[_stable_topk(similarity, num_negative, largest=False)]
    else:
        neg_idx = ring_idx[:0]
    idx = torch.cat((pos_idx, neg_idx))
    coords = torch.stack((idx % width, idx // width), dim=1).to(torch.float32)
    labels = torch.cat((torch.ones_like(pos_idx), torch.zeros_like(neg_idx)))
    return coords, labels
