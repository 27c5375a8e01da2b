"""PPG: Co-Feature Point Prompt Generation (the paper, Eq. 1-7).

CLIP says where the anomaly is, SAM's own features say which nearby pixels surely are
background. Given the CLIP anomaly map ``Map_a`` and the SAM image-encoder features ``F``:

- ``S_a = Map_a >= threshold``                  the "extreme anomaly" region;
- ``R_a = S_a * Map_a``, ``P_h = Topk(R_a)``    positives: the highest pixels inside ``S_a`` (1-2);
- ``N_a = dilate(S_a) - S_a``                   the ring around it (3);
- ``Map_s = cos(F(N_a), mean F(S_a))``          ring features vs the anomaly's mean feature (4-6);
- ``P_l = Lowestk(Map_s)``                      negatives: the ring pixels least like it (7).

The paper leaves open the threshold of ``S_a``, the number of points, what "similarity to the
anomaly's features" compares with (here the mean feature of ``S_a``; ``similarity_to="max"``
takes the best match over its pixels) and how SAM's coarse feature grid is read at a frame pixel
(here bilinearly at the pixel centre; ``feature_sampling="nearest"`` takes the cell holding it):
each is a key of :class:`PromptConfig`.

Dimension symbols: H x W the anomaly map (the evaluation frame), C SAM feature channels,
h x w SAM's feature grid, K returned points.

Coordinate convention: a point is the integer pixel index ``(x, y) = (column, row)`` of the
anomaly map, float32, the convention of SAM's clicks (SAM's prompt encoder adds 0.5 itself to
reach the pixel centre). Points are given in the anomaly map's frame; the caller maps them to
SAM's input frame with SAM's ``ResizeLongestSide.apply_coords``.

Torch, and OpenCV for the structuring element and the dilation of host tensors (on an
accelerator the dilation runs on the device); no Lightning, no segment_anything. :func:`generate_point_prompts_batched` is the batched, device-side
form used by the SAM stage; :func:`generate_point_prompts` is its one-image form.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Literal

import cv2
import torch
import torch.nn.functional as F

from clipsam.errors import ConfigError

__all__ = [
    "FEATURE_SAMPLINGS",
    "KERNEL_SHAPES",
    "SIMILARITY_TARGETS",
    "PromptConfig",
    "anomaly_ring",
    "dilate",
    "generate_point_prompts",
    "generate_point_prompts_batched",
    "structuring_element",
]

KernelShape = Literal["ellipse", "rect", "cross"]
SimilarityTarget = Literal["mean", "max"]
FeatureSampling = Literal["bilinear", "nearest"]

SIMILARITY_TARGETS: tuple[str, ...] = ("mean", "max")
"""What a ring pixel's feature is compared with (:attr:`PromptConfig.similarity_to`)."""

FEATURE_SAMPLINGS: tuple[str, ...] = ("bilinear", "nearest")
"""How SAM's feature grid is read at a frame pixel (:attr:`PromptConfig.feature_sampling`)."""

KERNEL_SHAPES: dict[str, int] = {
    "ellipse": cv2.MORPH_ELLIPSE,
    "rect": cv2.MORPH_RECT,
    "cross": cv2.MORPH_CROSS,
}
"""Kernel shape name -> OpenCV morphology shape (``cv2.getStructuringElement``)."""


@dataclasses.dataclass
class PromptConfig:
    """PPG settings (config key ``model.refiner_config.prompt``).

    The paper gives the dilation kernel (ellipse, 25 x 25; its ablation also runs rect 20 and
    cross 25). The other settings are open in the paper; each default is clipsam's choice.

    Attributes:
        num_positive: k of ``Topk`` (Eq. 2), positive points. The paper does not specify;
            clipsam's choice: 5, a few clicks spread over the peak as in SAM's interactive use.
        num_negative: k of ``Lowestk`` (Eq. 7), negative points. The paper does not specify;
            clipsam's choice: 5 (as many negatives as positives). With fewer pixels in ``S_a``
            (or in the ring) than k, only the pixels there become points: SAM gets the real
            points only, never filler points.
        threshold: ``S_a = Map_a >= threshold`` on the [0, 1] CLIP map. The paper does not
            specify (it only says "extreme"); clipsam's choice: 0.5, the point where the
            per-pixel softmax says "anomalous" is more likely than "normal". Higher values give
            smaller, surer regions.
        kernel_shape: dilation kernel for the ring ``N_a``: "ellipse" (paper), "rect", "cross",
            the shapes of ``cv2.getStructuringElement``.
        kernel_size: kernel width = height in pixels of the anomaly map (paper: 25).
        similarity_to: what each ring pixel's SAM feature is compared with (cosine similarity,
            Eq. 6). The paper does not specify; clipsam's choice: "mean", the mean feature over
            ``S_a``. "max": the highest cosine to any single pixel of ``S_a`` (a ring pixel
            like some part of the anomaly is not a negative); it costs O(|N_a| |S_a| C) per image.
        feature_sampling: how SAM's coarse feature grid (64 x 64 for the 1024 input) is read at a
            frame pixel. The paper does not specify; clipsam's choice: "bilinear" at the pixel
            centre (the grid point ``(x + 0.5) * w / W - 0.5``, border-clamped, as
            ``grid_sample(align_corners=False)``). "nearest": the feature cell that holds the
            pixel centre, cell ``floor((x + 0.5) * w / W)``.

    Fixed (not keys): a point is the integer pixel index of the frame and reaches the original
    image centre to centre, ``x_orig = (x + 0.5) * W0 / W - 0.5`` (SAM's clicks name pixels,
    whose centres SAM's prompt encoder puts at ``x + 0.5``); the paper does not specify,
    clipsam's choice.
    """

    num_positive: int = 5
    num_negative: int = 5
    threshold: float = 0.5
    kernel_shape: KernelShape = "ellipse"
    kernel_size: int = 25
    similarity_to: SimilarityTarget = "mean"
    feature_sampling: FeatureSampling = "bilinear"

    def __post_init__(self) -> None:
        key = "model.refiner_config.prompt"
        if self.kernel_shape not in KERNEL_SHAPES:
            raise ConfigError(
                f"{key}.kernel_shape={self.kernel_shape!r} is not a kernel shape; use one of {sorted(KERNEL_SHAPES)}"
            )
        if int(self.kernel_size) < 1:
            raise ConfigError(f"{key}.kernel_size={self.kernel_size} must be >= 1 (pixels)")
        if int(self.num_positive) < 0 or int(self.num_negative) < 0:
            raise ConfigError(
                f"{key}.num_positive={self.num_positive} and {key}.num_negative={self.num_negative} must be >= 0"
            )
        if not 0.0 <= float(self.threshold) <= 1.0:
            raise ConfigError(f"{key}.threshold={self.threshold} must be in [0, 1] (Map_a's range)")
        if self.similarity_to not in SIMILARITY_TARGETS:
            raise ConfigError(
                f"{key}.similarity_to={self.similarity_to!r}: use one of {list(SIMILARITY_TARGETS)} "
                "(the mean feature of S_a, or the best match over its pixels)"
            )
        if self.feature_sampling not in FEATURE_SAMPLINGS:
            raise ConfigError(
                f"{key}.feature_sampling={self.feature_sampling!r}: use one of {list(FEATURE_SAMPLINGS)}"
            )

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


def _row_intervals(kernel: torch.Tensor) -> list[tuple[int, int, int]] | None:
    """(row, first column, last column) of each non-empty kernel row, or None if a row has a gap."""
    element = kernel.detach().cpu().bool()
    rows = []
    for i in range(element.shape[0]):
        cols = torch.nonzero(element[i]).flatten().tolist()
        if not cols:
            continue
        if cols[-1] - cols[0] + 1 != len(cols):
            return None
        rows.append((i, cols[0], cols[-1]))
    return rows


def dilate(masks: torch.Tensor, kernel: torch.Tensor, *, backend: str = "auto") -> torch.Tensor:
    """Binary dilation of a batch of masks, as ``cv2.dilate`` computes it.

    ``out(y, x) = max over kernel cells (i, j) of in(y + i - a, x + j - a)`` with OpenCV's
    default anchor ``a = k // 2`` and outside the mask counting as background.

    Backends: "torch" runs on the masks' device with no host round trip: the kernels of
    :func:`structuring_element` have one run of ones per row, so the dilation is a 1-D max-pool
    per distinct row run followed by a max over shifted rows (a kernel with gaps in a row falls
    back to a convolution). "cv2" calls ``cv2.dilate`` per mask (host memory). "auto" (default)
    uses cv2 for CPU tensors (already in host memory, and fastest there) and torch otherwise.

    Args:
        masks: (B, H, W) or (H, W) bool.
        kernel: (k, k) bool structuring element.
        backend: "auto", "torch" or "cv2".

    Returns:
        bool tensor shaped like ``masks``, on its device.
    """
    if backend not in ("auto", "torch", "cv2"):
        raise ValueError(f"backend must be 'auto', 'torch' or 'cv2', got {backend!r}")
    squeeze = masks.ndim == 2
    batch = masks[None] if squeeze else masks
    if backend == "cv2" or (backend == "auto" and batch.device.type == "cpu"):
        element = kernel.detach().cpu().numpy().astype("uint8")
        host = batch.detach().cpu().contiguous().numpy().view("uint8")
        out = torch.stack([torch.from_numpy(cv2.dilate(m, element)) for m in host]).to(batch.device).bool()
        return out[0] if squeeze else out
    x = batch.to(torch.float32)[:, None]  # (B, 1, H, W)
    size = int(kernel.shape[0])
    anchor = size // 2
    height, width = x.shape[-2:]
    intervals = _row_intervals(kernel)
    padded = F.pad(x, (anchor, size - 1 - anchor, anchor, size - 1 - anchor))  # (B, 1, H+k-1, W+k-1)
    if intervals is None:
        out = F.conv2d(padded, kernel.to(x.device, torch.float32)[None, None]) > 0.5
    elif not intervals:
        out = torch.zeros_like(x, dtype=torch.bool)
    else:
        runs: dict[tuple[int, int], torch.Tensor] = {}  # (B, 1, H+k-1, W): max over columns x+j0-a .. x+j1-a
        for _, j0, j1 in intervals:
            if (j0, j1) not in runs:
                window = padded[..., j0 : j1 + width]
                runs[(j0, j1)] = F.max_pool2d(window, (1, j1 - j0 + 1), stride=1) if j1 > j0 else window
        acc = None
        for i, j0, j1 in intervals:
            shifted = runs[(j0, j1)][..., i : i + height, :]  # rows y + i - a
            acc = shifted.clone() if acc is None else torch.maximum(acc, shifted, out=acc)
        out = acc > 0.5
    out = out[:, 0]
    return out[0] if squeeze else out


def anomaly_ring(region: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    """``N_a = dilate(S_a) - S_a`` (Eq. 3), the dilation of ``cv2.dilate`` (:func:`dilate`).

    Args:
        region: (H, W) or (B, H, W) bool, ``S_a``.
        kernel: (k, k) bool structuring element (see :func:`structuring_element`).

    Returns:
        bool ring shaped like ``region``, on its device: pixels reached by the dilation that
        are not in ``region``. Outside the map counts as background (OpenCV's default border).
    """
    return dilate(region, kernel) & ~region


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


_INT64_MIN = -(2**63)
_INT64_MAX = 2**63 - 1


def _order_key(values: torch.Tensor) -> torch.Tensor:
    """int32 keys ordered as the float32 ``values`` (``-0.0`` equals ``0.0``; no NaN).

    A float's bits read as int32 are ordered for non-negative floats and reversed for negative
    ones; flipping the 31 magnitude bits of the negative ones makes the whole range ordered.
    """
    bits = (values.to(torch.float32) + 0.0).contiguous().view(torch.int32)
    return bits ^ ((bits >> 31) & 0x7FFFFFFF)


def _sort_keys(values: torch.Tensor, tiebreak: torch.Tensor) -> torch.Tensor:
    """int64 ``key(values) * 2^32 + tiebreak``: one exact key, no ties (tiebreak < 2^32, unique)."""
    return (_order_key(values).to(torch.int64) << 32) | tiebreak


def _interpolation_matrices(size: int, grid: int, extent: torch.Tensor, sampling: str = "bilinear") -> torch.Tensor:
    """(B, size, grid) float32 weights of the grid cells read at the centres of ``size`` pixels.

    Pixel ``x``'s centre sits at grid coordinate ``u = (x + 0.5) * extent / size`` (cell ``i``
    spans ``[i, i + 1)``), in float64. "bilinear" interpolates between the cell centres around
    ``s = u - 0.5``, clamped to ``[0, ceil(extent) - 1]`` (border padding at the edge of the valid
    cells; ``extent == grid == size`` gives the identity). "nearest" takes the one cell holding the
    centre, ``floor(u)`` clamped alike.

    Args:
        size: pixels along the axis; grid: cells along the axis;
        extent: (B,) float64, how many cells the pixels cover (``grid`` when the features cover
            the frame exactly; less when the embedding is padded).
        sampling: "bilinear" or "nearest".
    """
    extent = extent.to(torch.float64)
    last = (torch.ceil(extent - 1e-9).clamp(1, grid) - 1)[:, None]  # (B, 1) last valid cell
    pos = torch.arange(size, dtype=torch.float64, device=extent.device)
    centre = (pos[None] + 0.5) * (extent[:, None] / size)  # (B, size) in cell units
    matrix = torch.zeros((extent.shape[0], size, grid), dtype=torch.float64, device=extent.device)
    if sampling == "nearest":
        cell = torch.minimum(centre.floor(), last)
        matrix.scatter_(2, cell.long()[..., None], 1.0)
        return matrix.to(torch.float32)
    if sampling != "bilinear":
        raise ValueError(f"feature_sampling must be one of {list(FEATURE_SAMPLINGS)}, got {sampling!r}")
    src = torch.minimum((centre - 0.5).clamp_min(0), last)  # (B, size)
    i0 = src.floor()
    i1 = torch.minimum(i0 + 1, last)
    w1 = src - i0
    matrix.scatter_add_(2, i0.long()[..., None], (1 - w1)[..., None])
    matrix.scatter_add_(2, i1.long()[..., None], w1[..., None])
    return matrix.to(torch.float32)


def _frame_interpolation(
    feature_extent: torch.Tensor | None,
    batch: int,
    frame: tuple[int, int],
    grid: tuple[int, int],
    device: torch.device,
    sampling: str = "bilinear",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per image, the feature extent and the sampling weights of frame rows and columns.

    Args:
        feature_extent: (B, 2) cells covered (see :func:`generate_point_prompts_batched`), or
            None for the whole ``grid``.
        batch: B; frame: (H, W); grid: (h, w) feature cells; device: where to build them;
        sampling: "bilinear" or "nearest" (:func:`_interpolation_matrices`).

    Returns:
        ``(extent, rows, cols)``: (B, 2) float64, (B, H, h) and (B, W, w) float32
        (:func:`_interpolation_matrices`).
    """
    if feature_extent is None:
        extent = torch.tensor([grid], dtype=torch.float64, device=device).expand(batch, 2)
    else:
        extent = feature_extent.detach().to(device, torch.float64)
    rows = _interpolation_matrices(frame[0], grid[0], extent[:, 0], sampling)
    cols = _interpolation_matrices(frame[1], grid[1], extent[:, 1], sampling)
    return extent, rows, cols


def _region_mean_feature(
    features: torch.Tensor, region: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, count: torch.Tensor | int
) -> torch.Tensor:
    """``mean F(S_a)`` (Eq. 4-5): the mean bilinear feature over the pixels of ``region``.

    Bilinear sampling is linear and separable, so the sum over ``S_a`` of the pixels' features is
    ``sum_cells F * (A^T S B)``: no per-pixel features are formed.

    Args:
        features: (B, C, h, w) float32; region: (B, H, W) bool; rows: (B, H, h); cols: (B, W, w);
        count: pixels of ``region`` per image, (B,) float32 or an int (B = 1).

    Returns:
        (B, C) float32.
    """
    weights = rows.transpose(1, 2) @ region.to(torch.float32) @ cols  # (B, h, w)
    total = torch.einsum("bchw,bhw->bc", features, weights)
    return total / (count[:, None] if isinstance(count, torch.Tensor) else count)


def _ring_similarity(
    features: torch.Tensor, target: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor
) -> torch.Tensor:
    """Cosine similarity of every frame pixel's bilinear feature to ``target``, batched.

    A pixel's feature is ``f = sum_k w_k F_k`` over its four corner cells, so ``f . t = sum_k w_k
    (F_k . t)`` and ``|f|^2 = sum_k sum_l w_k w_l (F_k . F_l)``: only per-cell dot products (with
    ``target``, with itself, with the right, lower and diagonal neighbours) are needed, spread to
    all pixels by the separable interpolation matrices: with ``A`` (H, h) and ``B`` (W, w), ``f . t = A (F . t) B^T`` and
    ``|f|^2 = A2 self B2^T + 2 (A2 right BB^T + AA down B2^T + AA (diag + anti) BB^T)``, where
    ``A2 = A * A`` and ``AA[y, k] = A[y, k] A[y, k + 1]`` (likewise for B).

    Args:
        features: (B, C, h, w) float32; target: (B, C) float32;
        rows: (B, H, h) and cols: (B, W, w) interpolation matrices.

    Returns:
        (B, H, W) float32.
    """
    table = features

    def pad(dots: torch.Tensor) -> torch.Tensor:
        return F.pad(dots, (0, table.shape[3] - dots.shape[2], 0, table.shape[2] - dots.shape[1]))

    to_target = torch.einsum("bchw,bc->bhw", table, target)
    self_dot = (table * table).sum(1)
    right = pad((table[:, :, :, :-1] * table[:, :, :, 1:]).sum(1))
    down = pad((table[:, :, :-1, :] * table[:, :, 1:, :]).sum(1))
    cross = pad((table[:, :, :-1, :-1] * table[:, :, 1:, 1:]).sum(1) + (table[:, :, :-1, 1:] * table[:, :, 1:, :-1]).sum(1))

    def pairs(matrix: torch.Tensor) -> torch.Tensor:  # M[., k] * M[., k + 1]
        return F.pad(matrix[..., :-1] * matrix[..., 1:], (0, 1))

    rows2, cols2 = rows * rows, cols * cols
    rows_pair, cols_pair = pairs(rows), pairs(cols)
    cols2_t, cols_pair_t = cols2.transpose(1, 2), cols_pair.transpose(1, 2)
    dot = rows @ (to_target @ cols.transpose(1, 2))
    # Two (H x 2h) @ (2h x W) products instead of four: group the terms by their row factor.
    by_rows2 = self_dot @ cols2_t + 2 * (right @ cols_pair_t)  # (B, h, W)
    by_rows_pair = 2 * (down @ cols2_t + cross @ cols_pair_t)
    norm2 = torch.cat((rows2, rows_pair), 2) @ torch.cat((by_rows2, by_rows_pair), 1)
    norms = norm2.clamp_min(0).sqrt() * target.norm(dim=1)[:, None, None]
    return dot / norms.clamp_min(1e-8)


_PIXEL_CHUNK = 512  # frame pixels whose features are formed at once
_PAIR_CHUNK = 1 << 22  # (ring pixel, anomaly pixel) cosines formed at once


def _pixel_features(table: torch.Tensor, flat: torch.Tensor, width: int, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """Sampled features of frame pixels: ``f(y, x) = sum_ij rows[y, i] cols[x, j] F[:, i, j]``.

    Args:
        table: (C, h, w) float32 features; flat: (P,) int64 raster indices ``y * width + x``;
        width: W; rows: (H, h) and cols: (W, w) sampling weights (:func:`_interpolation_matrices`).

    Returns:
        (P, C) float32.
    """
    half = torch.einsum("chw,xw->chx", table, cols)  # (C, h, W)
    out = [
        torch.einsum("chp,ph->pc", half[:, :, chunk % width], rows[chunk // width])
        for chunk in flat.split(_PIXEL_CHUNK)
    ]
    return torch.cat(out) if out else table.new_zeros((0, table.shape[0]))


def _max_similarity(
    table: torch.Tensor, inside: torch.Tensor, ring: torch.Tensor, width: int, rows: torch.Tensor, cols: torch.Tensor
) -> torch.Tensor:
    """``similarity_to="max"``: per ring pixel, its highest cosine to the feature of any pixel of ``S_a``.

    The cosine is ``u . v / max(|u| |v|, 1e-8)``, as for the mean target (:func:`_ring_similarity`).

    Args:
        table: (C, h, w) float32; inside: (Pa,) and ring: (Pn,) int64 raster indices of ``S_a``
            and ``N_a``; width: W; rows: (H, h), cols: (W, w) sampling weights.

    Returns:
        (Pn,) float32, aligned with ``ring``.
    """
    anomaly = _pixel_features(table, inside, width, rows, cols)  # (Pa, C)
    ring_feats = _pixel_features(table, ring, width, rows, cols)  # (Pn, C)
    anomaly_norm, ring_norm = anomaly.norm(dim=1), ring_feats.norm(dim=1)
    step = max(1, _PAIR_CHUNK // max(1, anomaly.shape[0]))
    out = []
    for start in range(0, ring_feats.shape[0], step):
        dots = ring_feats[start : start + step] @ anomaly.T  # (chunk, Pa)
        norms = (ring_norm[start : start + step, None] * anomaly_norm[None]).clamp_min(1e-8)
        out.append((dots / norms).amax(1))
    return torch.cat(out) if out else ring_feats.new_zeros(0)


def _crop_bounds(regions: torch.Tensor, kernel_size: int) -> list[tuple[int, int, int, int] | None]:
    """Per image, the window ``(y0, y1, x0, x1)`` of the frame that holds ``dilate(S_a)``, or None.

    A pixel of ``S_a`` in row y reaches rows ``y - (k - 1 - a) .. y + a`` under the dilation
    (anchor ``a = k // 2``; columns alike), so the bounding box of ``S_a`` grown by those margins
    and clipped to the frame holds ``S_a``, its ring and every pixel the dilation reads. None
    when ``S_a`` is empty. One host transfer for the batch.
    """
    before, after = kernel_size - 1 - kernel_size // 2, kernel_size // 2
    columns = []
    for axis in (2, 1):  # rows (any over the columns), then columns
        present = regions.any(axis)  # (B, H) or (B, W)
        length = present.shape[1]
        index = torch.arange(length, device=regions.device)
        first = torch.where(present, index, length).amin(1)
        last = torch.where(present, index, -1).amax(1)
        columns += [(first - before).clamp_min(0), (last + after + 1).clamp_max(length), first <= last]
    table = torch.stack(columns, 1).tolist()  # (B, 6): y0, y1, has rows, x0, x1, has columns
    return [(y0, y1, x0, x1) if ok else None for y0, y1, ok, x0, x1, _ in table]


def _cell_window(start: int, stop: int, size: int, extent: float, grid: int) -> tuple[int, int]:
    """Feature cells ``[c0, c1)`` holding every cell the pixels ``start .. stop - 1`` weigh.

    Pixel ``x`` of ``size`` reads cells ``floor(s)`` and ``floor(s) + 1`` at ``s = (x + 0.5) *
    extent / size - 0.5`` (:func:`_interpolation_matrices`). One spare cell on each side absorbs
    rounding: a cell that no pixel of the window weighs adds nothing to any sum.
    """
    low = math.floor((start + 0.5) * extent / size - 0.5)
    high = math.floor((stop - 1 + 0.5) * extent / size - 0.5) + 1
    return max(0, low - 1), min(grid, high + 2)


def _ppg_compact(
    amaps: torch.Tensor,
    regions: torch.Tensor,
    sam_features: torch.Tensor,
    feature_extent: torch.Tensor | None,
    kernel: torch.Tensor,
    *,
    num_positive: int,
    num_negative: int,
    similarity_to: str,
    feature_sampling: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The "compact" strategy of :func:`generate_point_prompts_batched` (same output layout).

    Image by image, on the window of the frame that holds ``dilate(S_a)`` (:func:`_crop_bounds`)
    and on the feature cells that window weighs (:func:`_cell_window`): the quantities of the
    dense strategy at a cost that follows the size of the anomaly, not of the frame. A window's
    raster order is the frame's raster order restricted to it, so ties resolve alike.

    Args: amaps (B, H, W) float32 ``Map_a``; regions (B, H, W) bool ``S_a``; the rest as the caller.
    """
    device = amaps.device
    batch, height, width = amaps.shape
    slots = num_positive + num_negative
    coords = [[[0.0, 0.0] for _ in range(slots)] for _ in range(batch)]
    labels = [[-1] * slots for _ in range(batch)]
    windows = _crop_bounds(regions, int(kernel.shape[0]))
    if num_negative > 0 and any(w is not None for w in windows):
        feats = sam_features.detach().to(device, torch.float32)
        grid_h, grid_w = feats.shape[-2:]
        extent, all_rows, all_cols = _frame_interpolation(
            feature_extent, batch, (height, width), (grid_h, grid_w), device, feature_sampling
        )
        extents = extent.tolist()
    for b, window in enumerate(windows):
        if window is None:  # S_a empty: empty slots only
            continue
        y0, y1, x0, x1 = window
        crop_width = x1 - x0
        region = regions[b, y0:y1, x0:x1]
        inside = region.flatten().nonzero().squeeze(1)  # S_a in the window's raster order
        # Eq. 1-2: P_h = Topk(S_a * Map_a)
        chosen = [(inside[_stable_topk(amaps[b, y0:y1, x0:x1].flatten()[inside], num_positive, largest=True)], 0, 1)]
        if num_negative > 0:
            ring = (dilate(region, kernel) & ~region).flatten()  # Eq. 3: N_a in the window
            ring_idx = ring.nonzero().squeeze(1)
            if ring_idx.numel() > 0:
                c0, c1 = _cell_window(y0, y1, height, extents[b][0], grid_h)
                d0, d1 = _cell_window(x0, x1, width, extents[b][1], grid_w)
                rows = all_rows[b : b + 1, y0:y1, c0:c1]  # (1, Hc, hc)
                cols = all_cols[b : b + 1, x0:x1, d0:d1]  # (1, Wc, wc)
                table = feats[b : b + 1, :, c0:c1, d0:d1]  # (1, C, hc, wc)
                if similarity_to == "max":  # Eq. 6 against every pixel of S_a
                    ring_sim = _max_similarity(table[0], inside, ring_idx, crop_width, rows[0], cols[0])
                else:
                    mean_a = _region_mean_feature(table, region[None], rows, cols, inside.numel())  # mean F(S_a)
                    ring_sim = _ring_similarity(table, mean_a, rows, cols).flatten()[ring_idx]  # Eq. 6: Map_s
                # Eq. 7: P_l = Lowestk(Map_s) on N_a
                chosen.append((ring_idx[_stable_topk(ring_sim, num_negative, largest=False)], num_positive, 0))
        for idx, first_slot, label in chosen:
            for slot, i in enumerate(idx.tolist(), start=first_slot):
                coords[b][slot] = [float(x0 + i % crop_width), float(y0 + i // crop_width)]
                labels[b][slot] = label
    return (
        torch.tensor(coords, dtype=torch.float32).view(batch, slots, 2).to(device),
        torch.tensor(labels, dtype=torch.int64).view(batch, slots).to(device),
    )


def generate_point_prompts_batched(
    anomaly_maps: torch.Tensor,
    sam_features: torch.Tensor,
    *,
    num_positive: int,
    num_negative: int,
    threshold: float,
    kernel_shape: str,
    kernel_size: int,
    similarity_to: str = "mean",
    feature_sampling: str = "bilinear",
    feature_extent: torch.Tensor | None = None,
    strategy: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """PPG (Eq. 1-7) for a batch, on the tensors' device, with no loop over pixels (dense: no host sync).

    The same points in the same order as :func:`generate_point_prompts` per image, laid out in
    fixed slots so a batch is one tensor: slots ``[0, num_positive)`` hold the positives (highest
    ``Map_a`` in ``S_a`` first), slots ``[num_positive, K)`` the negatives (lowest ``Map_s`` on the
    ring first), K = num_positive + num_negative. A slot without a point (``S_a`` or the ring
    smaller than k, or ``S_a`` empty) is empty: label -1 and coordinates (0, 0). Empty slots are
    a layout device only; the SAM stage drops them and gives SAM the real points alone (an empty
    slot is NOT SAM's padding point: SAM embeds those as "not a point", which changes its masks).
    Ties go to the smaller raster index (an exact int64 sort key: float bits, then index).

    Args:
        anomaly_maps: (B, H, W) float in [0, 1], ``Map_a`` in the frame.
        sam_features: (B, C, h, w) float, SAM image-encoder features.
        num_positive, num_negative, threshold, kernel_shape, kernel_size, similarity_to,
            feature_sampling: as :func:`generate_point_prompts`.
        feature_extent: (B, 2) float, how many feature cells (rows, columns) the frame covers:
            frame pixel ``x`` of W sits at grid coordinate ``(x + 0.5) * extent_w / W - 0.5``,
            clamped to the valid cells ``[0, ceil(extent_w) - 1]``. None means (h, w): the
            features cover the frame exactly. For SAM's padded embedding of an image resized to
            (h', w') in an S x S input, the extent is ``(h' * h / S, w' * w / S)``.
        strategy: "dense" computes every quantity for every frame pixel of the whole batch
            (batched tensor ops, no host sync: the accelerator path); "compact" works image by
            image on the window around ``dilate(S_a)`` and the feature cells it reads (one host
            sync per batch; the fast path in host memory, 2-4x faster than dense on the CPU
            whatever the size of ``S_a``); "auto" (default) picks "compact" for CPU tensors and
            "dense" otherwise. Same points; the similarities may differ in the last float bit
            between the two. ``similarity_to="max"`` works image by image in both (one host
            sync per image in "dense").

    Returns:
        ``(coords, labels)``: (B, K, 2) float32 (x, y) frame pixel indices and (B, K) int64
        (1 positive, 0 negative, -1 empty slot), on ``anomaly_maps``' device.
    """
    if anomaly_maps.ndim != 3:
        raise ValueError(f"anomaly_maps must be (B, H, W), got shape {tuple(anomaly_maps.shape)}")
    if sam_features.ndim != 4 or sam_features.shape[0] != anomaly_maps.shape[0]:
        raise ValueError(
            f"sam_features must be (B, C, h, w) with the maps' batch size, got {tuple(sam_features.shape)}"
        )
    if num_positive < 0 or num_negative < 0:
        raise ValueError(f"num_positive and num_negative must be >= 0, got {num_positive}, {num_negative}")
    if strategy not in ("auto", "dense", "compact"):
        raise ValueError(f"strategy must be 'auto', 'dense' or 'compact', got {strategy!r}")
    if similarity_to not in SIMILARITY_TARGETS:
        raise ValueError(f"similarity_to must be one of {list(SIMILARITY_TARGETS)}, got {similarity_to!r}")
    if feature_sampling not in FEATURE_SAMPLINGS:
        raise ValueError(f"feature_sampling must be one of {list(FEATURE_SAMPLINGS)}, got {feature_sampling!r}")
    kernel = structuring_element(kernel_shape, int(kernel_size))
    device = anomaly_maps.device
    batch, height, width = anomaly_maps.shape
    pixels = height * width
    amap = anomaly_maps.detach().to(torch.float32)
    region = amap >= threshold  # (B, H, W) S_a
    if strategy == "auto":
        # Index lists pay per pixel of the window around S_a, dense pays per frame pixel but needs no
        # host sync: on the CPU compact is faster whatever the size of S_a (docs/benchmarks.md).
        strategy = "compact" if device.type == "cpu" else "dense"
    if strategy == "compact":
        return _ppg_compact(
            amap,
            region,
            sam_features,
            feature_extent,
            kernel,
            num_positive=num_positive,
            num_negative=num_negative,
            similarity_to=similarity_to,
            feature_sampling=feature_sampling,
        )
    index = torch.arange(pixels, dtype=torch.int64, device=device)

    # Eq. 1-2: P_h = Topk(S_a * Map_a): larger score first, then smaller raster index.
    pos_key = _sort_keys(amap.reshape(batch, pixels), (2**32 - 1) - index)
    pos_key.masked_fill_(~region.reshape(batch, pixels), _INT64_MIN)
    k_pos = min(num_positive, pixels)
    pos_val, pos_idx = torch.topk(pos_key, k_pos, dim=1, largest=True, sorted=True)
    pos_ok = pos_val != _INT64_MIN

    # Eq. 3-7: P_l = Lowestk(Map_s) on the ring N_a.
    k_neg = min(num_negative, pixels)
    if k_neg > 0:
        ring = anomaly_ring(region, kernel)  # (B, H, W)
        feats = sam_features.detach().to(device, torch.float32)
        _, _, grid_h, grid_w = feats.shape
        _, rows, cols = _frame_interpolation(
            feature_extent, batch, (height, width), (grid_h, grid_w), device, feature_sampling
        )
        if similarity_to == "max":  # per image: the pairs (ring pixel, S_a pixel) differ in number
            similarity = torch.full((batch, pixels), math.inf, dtype=torch.float32, device=device)
            for b in range(batch):
                inside = region[b].flatten().nonzero().squeeze(1)
                ring_idx = ring[b].flatten().nonzero().squeeze(1)
                if inside.numel() and ring_idx.numel():
                    similarity[b, ring_idx] = _max_similarity(feats[b], inside, ring_idx, width, rows[b], cols[b])
        else:
            count = region.reshape(batch, pixels).sum(1).clamp_min(1).to(torch.float32)
            mean_a = _region_mean_feature(feats, region, rows, cols, count)  # mean F over S_a
            similarity = _ring_similarity(feats, mean_a, rows, cols)  # (B, H, W) Map_s
        neg_key = _sort_keys(similarity.reshape(batch, pixels), index)
        neg_key.masked_fill_(~ring.reshape(batch, pixels), _INT64_MAX)
        neg_val, neg_idx = torch.topk(neg_key, k_neg, dim=1, largest=False, sorted=True)
        neg_ok = neg_val != _INT64_MAX
    else:
        neg_idx = torch.zeros((batch, 0), dtype=torch.int64, device=device)
        neg_ok = torch.zeros((batch, 0), dtype=torch.bool, device=device)

    def slots(idx: torch.Tensor, ok: torch.Tensor, label: int, count: int) -> tuple[torch.Tensor, torch.Tensor]:
        idx = torch.where(ok, idx, torch.zeros_like(idx))
        coords = torch.stack((idx % width, idx // width), dim=2).to(torch.float32)
        labels = torch.where(ok, torch.full_like(idx, label), torch.full_like(idx, -1))
        missing = count - idx.shape[1]  # k larger than the number of pixels
        if missing:
            coords = F.pad(coords, (0, 0, 0, missing))
            labels = F.pad(labels, (0, missing), value=-1)
        return coords, labels

    pos_coords, pos_labels = slots(pos_idx, pos_ok, 1, num_positive)
    neg_coords, neg_labels = slots(neg_idx, neg_ok, 0, num_negative)
    return torch.cat((pos_coords, neg_coords), 1), torch.cat((pos_labels, neg_labels), 1)


def generate_point_prompts(
    anomaly_map: torch.Tensor,
    sam_features: torch.Tensor,
    *,
    num_positive: int,
    num_negative: int,
    threshold: float,
    kernel_shape: str,
    kernel_size: int,
    similarity_to: str = "mean",
    feature_sampling: str = "bilinear",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Positive and negative point prompts from the CLIP map and SAM's features (Eq. 1-7).

    Positives are the ``num_positive`` highest pixels of ``S_a * Map_a``, inside ``S_a`` only
    (fewer if ``S_a`` is smaller). Negatives are the ``num_negative`` pixels of the ring
    ``N_a = dilate(S_a) - S_a`` whose SAM feature has the lowest cosine similarity to the MEAN
    SAM feature over ``S_a`` (``similarity_to="mean"``; "max": to the most similar pixel of
    ``S_a``), fewer if the ring is smaller. No spacing or suppression is applied: neighbouring
    pixels may both be chosen.

    Ties are broken deterministically by raster order (row-major, the smaller ``y * W + x``
    first): the sorts are stable over pixels listed in raster order.

    Feature alignment: ``sam_features`` must cover exactly the anomaly map's frame (for SAM,
    the caller crops the padded 64 x 64 embedding to the valid region of its input first). Each
    frame pixel's feature is read at the pixel centre by bilinear interpolation (the sampling of
    ``grid_sample`` with ``align_corners=False`` and border padding: pixel ``x`` of W sits at
    grid coordinate ``(x + 0.5) * w / W - 0.5``); when ``(h, w) == (H, W)`` this is exactly
    ``sam_features[:, y, x]``. SAM's 64 x 64 grid on a 518 x 518 frame is thus upsampled
    bilinearly, like SAM's own mask upsampling (``feature_sampling="bilinear"``; "nearest"
    reads the cell holding the pixel centre, ``floor((x + 0.5) * w / W)``).

    Computed by :func:`generate_point_prompts_batched` on a batch of one (its empty slots
    dropped).

    Args:
        anomaly_map: (H, W) float in [0, 1], ``Map_a`` in the evaluation frame.
        sam_features: (C, h, w) float, SAM image-encoder features covering the same frame.
        num_positive: number of positive points (k of Eq. 2), >= 0.
        num_negative: number of negative points (k of Eq. 7), >= 0.
        threshold: ``S_a = anomaly_map >= threshold``.
        kernel_shape: dilation kernel shape, "ellipse", "rect" or "cross" (OpenCV's shapes).
        kernel_size: kernel width = height in anomaly-map pixels.
        similarity_to: "mean" or "max" (:attr:`PromptConfig.similarity_to`).
        feature_sampling: "bilinear" or "nearest" (:attr:`PromptConfig.feature_sampling`).

    Returns:
        ``(coords, labels)``: coords (K, 2) float32, (x, y) integer pixel indices of the anomaly
        map (x = column, y = row); labels (K,) int64, 1 positive, 0 negative. Positives come
        first in descending score, then negatives in ascending similarity. When ``S_a`` is empty
        (nothing reaches the threshold) both are empty: (0, 2) and (0,). All on
        ``anomaly_map``'s device.

    Raises:
        ValueError: on wrong shapes, negative counts, an unknown kernel shape, similarity target
            or feature sampling.
    """
    if anomaly_map.ndim != 2:
        raise ValueError(f"anomaly_map must be (H, W), got shape {tuple(anomaly_map.shape)}")
    if sam_features.ndim != 3:
        raise ValueError(f"sam_features must be (C, h, w), got shape {tuple(sam_features.shape)}")
    if num_positive < 0 or num_negative < 0:
        raise ValueError(f"num_positive and num_negative must be >= 0, got {num_positive}, {num_negative}")
    coords, labels = generate_point_prompts_batched(
        anomaly_map[None],
        sam_features[None],
        num_positive=num_positive,
        num_negative=num_negative,
        threshold=threshold,
        kernel_shape=kernel_shape,
        kernel_size=kernel_size,
        similarity_to=similarity_to,
        feature_sampling=feature_sampling,
    )
    keep = labels[0] >= 0  # valid slots come first within the positives and the negatives
    return coords[0][keep], labels[0][keep]
