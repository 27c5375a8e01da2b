"""numpy forms of the image operations clipsam's PyTorch path uses (no torch, no OpenCV).

Each function names the PyTorch / OpenCV / Pillow operation it reproduces; the tests compare
them with those operations (``tests/unit/test_runtime_ops.py``).

Dimension symbols: H0 x W0 the original image, H x W the frame, S an input's side.
"""

from __future__ import annotations

import math

import numpy as np
from PIL import Image

__all__ = [
    "antialiased_bicubic",
    "bilinear_matrix",
    "connected_components",
    "cv2_linear_resize",
    "cv2_nearest_resize",
    "dilate",
    "normalize",
    "normalize_unit",
    "pil_resize",
    "resize_bilinear",
    "sam_input",
    "sigmoid",
]


def pil_resize(image: np.ndarray, height: int, width: int, resample: int = Image.Resampling.BICUBIC) -> np.ndarray:
    """Pillow's resize of a uint8 (H0, W0, 3) image (antialiased), unchanged when already that size."""
    if image.shape[:2] == (height, width):
        return image
    return np.asarray(Image.fromarray(image).resize((width, height), resample))


def normalize(pixels: np.ndarray, mean: list[float], std: list[float], formula: str = "clipsam") -> np.ndarray:
    """uint8 (H, W, 3) -> float32 (3, H, W) normalised.

    ``"clipsam"``: ``(v / 255 - mean) / std`` (:func:`clipsam.inputs.normalize_clip`);
    ``"albumentations"``: ``(v - 255 mean) / (255 std)`` (the frame transform's ``A.Normalize``).
    """
    values = pixels.astype(np.float32).transpose(2, 0, 1)
    if formula == "albumentations":
        m = np.asarray(mean, dtype=np.float32).reshape(3, 1, 1)
        s = np.asarray(std, dtype=np.float32).reshape(3, 1, 1)
        return ((values - m * np.float32(255.0)) * (np.float32(1.0) / (s * np.float32(255.0)))).astype(np.float32)
    return normalize_unit(values / np.float32(255.0), mean, std)


def normalize_unit(pixels: np.ndarray, mean: list[float], std: list[float]) -> np.ndarray:
    """float (3, H, W) in [0, 1] -> ``(v - mean) / std`` float32 (:func:`clipsam.inputs.normalize_clip`)."""
    m = np.asarray(mean, dtype=np.float32).reshape(3, 1, 1)
    s = np.asarray(std, dtype=np.float32).reshape(3, 1, 1)
    return ((pixels - m) / s).astype(np.float32)


def _cubic(x: np.ndarray, a: float = -0.5) -> np.ndarray:
    x = np.abs(x)
    return np.where(
        x < 1.0,
        ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0,
        np.where(x < 2.0, (((x - 5.0) * x + 8.0) * x - 4.0) * a, 0.0),
    )


def _aa_weights(in_size: int, out_size: int) -> np.ndarray:
    """(out, in) weights of the antialiased bicubic resize (PyTorch's ``antialias=True`` bicubic,
    Pillow's algorithm: support 2 * scale when shrinking, a = -0.5, weights normalised)."""
    scale = in_size / out_size
    support = 2.0 * scale if scale >= 1.0 else 2.0
    inv = 1.0 / scale if scale >= 1.0 else 1.0
    out = np.zeros((out_size, in_size), dtype=np.float64)
    for i in range(out_size):
        center = scale * (i + 0.5)
        lo = max(int(center - support + 0.5), 0)
        hi = min(int(center + support + 0.5), in_size)
        taps = np.arange(lo, hi)
        w = _cubic((taps - center + 0.5) * inv)
        total = w.sum()
        out[i, lo:hi] = w / total if total != 0 else w
    return out


def antialiased_bicubic(image: np.ndarray, size: int) -> np.ndarray:
    """uint8 (H0, W0, 3) -> float32 (3, S, S) in [0, 1], unclamped: ``F.interpolate(v / 255,
    mode="bicubic", antialias=True)`` (torchvision v2 ``Resize`` on a float tensor)."""
    pixels = image.astype(np.float32).transpose(2, 0, 1) / np.float32(255.0)
    if pixels.shape[1:] == (size, size):
        return pixels
    rows = _aa_weights(pixels.shape[1], size).astype(np.float32)
    cols = _aa_weights(pixels.shape[2], size).astype(np.float32)
    return ((rows @ pixels) @ cols.T).astype(np.float32)


def bilinear_matrix(in_size: int, out_size: int, convention: str = "torch") -> np.ndarray:
    """(out, in) float32 weights of a bilinear resize along one axis, no antialiasing.

    ``"torch"``: ``F.interpolate(mode="bilinear", align_corners=False)`` on float32 data: scale
    ``in / out`` and the source index ``(dst + 0.5) * scale - 0.5`` in float32, clamped at 0.
    ``"cv2"``: OpenCV's ``INTER_LINEAR``: the source index in float64, then float32. Both take
    the two neighbours, the last one repeated at the border.
    """
    dst = np.arange(out_size)
    if convention == "torch":
        scale = np.float32(in_size) / np.float32(out_size)
        # one rounding of scale * (dst + 0.5) - 0.5 (PyTorch's kernels compile it to a fused multiply-add)
        src = ((dst + 0.5) * np.float64(scale) - 0.5).astype(np.float32)
        src = np.maximum(src, np.float32(0.0))
    elif convention == "cv2":
        src = ((dst + 0.5) * (1.0 / (out_size / in_size)) - 0.5).astype(np.float32)
        src = np.maximum(src, np.float32(0.0))
    else:
        raise ValueError(f"convention must be 'torch' or 'cv2', got {convention!r}")
    i0 = np.minimum(np.floor(src).astype(np.int64), in_size - 1)
    i1 = np.minimum(i0 + 1, in_size - 1)
    lam = np.clip(src - i0.astype(np.float32), 0.0, 1.0).astype(np.float32)
    out = np.zeros((out_size, in_size), dtype=np.float32)
    rows = np.arange(out_size)
    np.add.at(out, (rows, i0), np.float32(1.0) - lam)
    np.add.at(out, (rows, i1), lam)
    return out


def resize_bilinear(maps: np.ndarray, height: int, width: int, convention: str = "torch") -> np.ndarray:
    """(..., h, w) float32 -> (..., height, width), :func:`bilinear_matrix` on both axes."""
    if maps.shape[-2:] == (height, width):
        return maps.astype(np.float32)
    rows = bilinear_matrix(maps.shape[-2], height, convention)
    cols = bilinear_matrix(maps.shape[-1], width, convention)
    return ((rows @ maps.astype(np.float32)) @ cols.T).astype(np.float32)


def cv2_linear_resize(values: np.ndarray, height: int, width: int) -> np.ndarray:
    """``cv2.resize(values, (width, height), interpolation=cv2.INTER_LINEAR)`` of a float32 (H, W) map."""
    return resize_bilinear(values, height, width, "cv2")


def cv2_nearest_resize(mask: np.ndarray, height: int, width: int) -> np.ndarray:
    """``cv2.resize(mask, (width, height), interpolation=cv2.INTER_NEAREST)``: source index
    ``floor(dst * in / out)`` on each axis."""
    in_h, in_w = mask.shape
    ys = np.minimum(np.floor(np.arange(height) * (1.0 / (height / in_h))).astype(np.int64), in_h - 1)
    xs = np.minimum(np.floor(np.arange(width) * (1.0 / (width / in_w))).astype(np.int64), in_w - 1)
    return mask[ys[:, None], xs[None, :]]


def sam_input_size(height: int, width: int, side: int) -> tuple[int, int]:
    """segment_anything's ``ResizeLongestSide.get_preprocess_shape``."""
    scale = side * 1.0 / max(height, width)
    return int(height * scale + 0.5), int(width * scale + 0.5)


def sam_input(image: np.ndarray, side: int) -> tuple[np.ndarray, np.ndarray]:
    """SAM's input of the original (``SamPredictor.set_image`` up to the normalisation): the long
    side resized to ``side`` (Pillow bilinear), zero-padded to ``side`` x ``side``.

    Returns:
        uint8 (3, S, S) and int64 (2,) = (h', w') of the valid part.
    """
    height, width = sam_input_size(image.shape[0], image.shape[1], side)
    resized = pil_resize(image, height, width, Image.Resampling.BILINEAR)
    out = np.zeros((3, side, side), dtype=np.uint8)
    out[:, :height, :width] = resized.transpose(2, 0, 1)
    return out, np.asarray([height, width], dtype=np.int64)


def sigmoid(x: np.ndarray) -> np.ndarray:
    """float32 logistic function (-inf -> 0)."""
    with np.errstate(over="ignore"):
        return (1.0 / (1.0 + np.exp(-x.astype(np.float32)))).astype(np.float32)


def dilate(mask: np.ndarray, kernel: np.ndarray) -> np.ndarray:
    """``cv2.dilate(mask, kernel)`` of a bool (H, W) mask: anchor ``k // 2``, outside = background."""
    size_y, size_x = kernel.shape
    ay, ax = size_y // 2, size_x // 2
    height, width = mask.shape
    padded = np.zeros((height + size_y - 1, width + size_x - 1), dtype=bool)
    padded[ay : ay + height, ax : ax + width] = mask
    out = np.zeros_like(mask)
    for i, j in zip(*np.nonzero(kernel)):
        # out(y, x) |= in(y + i - ay, x + j - ax) = padded(y + i, x + j)
        out |= padded[i : i + height, j : j + width]
    return out


def connected_components(mask: np.ndarray) -> tuple[int, np.ndarray]:
    """8-connected components of a bool (H, W) mask, as ``cv2.connectedComponents(..., 8)``
    numbers them: 0 background, then 1, 2, ... in the raster order of each component's first pixel.

    Returns:
        ``(count including the background, int32 labels (H, W))``.
    """
    height, width = mask.shape
    labels = np.zeros((height, width), dtype=np.int32)
    current = 0
    for y0, x0 in zip(*np.nonzero(mask)):  # raster order
        if labels[y0, x0]:
            continue
        current += 1
        labels[y0, x0] = current
        stack = [(int(y0), int(x0))]
        while stack:
            y, x = stack.pop()
            for dy in (-1, 0, 1):
                for dx in (-1, 0, 1):
                    ny, nx = y + dy, x + dx
                    if 0 <= ny < height and 0 <= nx < width and mask[ny, nx] and not labels[ny, nx]:
                        labels[ny, nx] = current
                        stack.append((ny, nx))
    return current + 1, labels


def stable_order(values: np.ndarray, *, descending: bool) -> np.ndarray:
    """Indices sorting ``values``, ties by position (``torch.sort(..., stable=True)``)."""
    keys = -values.astype(np.float64) if descending else values.astype(np.float64)
    return np.argsort(keys, kind="stable")


def ceil_minus(value: float) -> int:
    """``ceil(value - 1e-9)`` (the last valid feature cell of PPG's sampling, see prompting.py)."""
    return int(math.ceil(value - 1e-9))
