"""Image decoding and result encoding for ``clipsam serve`` (numpy and Pillow only).

Dimension symbols: H0 x W0 the uploaded (original) image.
"""

from __future__ import annotations

import base64
import io

import numpy as np
from PIL import Image, UnidentifiedImageError

__all__ = [
    "MAX_BOXES",
    "MAX_PIXELS",
    "BadImage",
    "ImageTooLarge",
    "decode_image",
    "mask_boxes",
    "png_base64",
    "png_bytes",
    "scores_to_uint8",
]

#: The largest image (pixels) the service decodes; larger uploads are refused with 413 before
#: their pixels are decoded (a 20 MB PNG can hold gigapixels of a single colour).
MAX_PIXELS = 50_000_000

#: At most this many boxes are returned (the largest regions first); ``num_regions`` is the total.
MAX_BOXES = 1000

#: Pillow modes holding more than 8 bits per sample (16-bit grayscale) and float images.


class BadImage(ValueError):
    """The request body is not an image Pillow can decode; the message is one line for the client."""


class ImageTooLarge(ValueError):
    """The image has more pixels than :data:`MAX_PIXELS`."""


def decode_image(data: bytes, *, max_pixels: int = MAX_PIXELS, bit_depth: int | None = None) -> np.ndarray:
    """Decode uploaded bytes to uint8 (H0, W0, 3) RGB in display orientation, with clipsam's one
    image reader (:func:`clipsam.data.samples.read_image`: EXIF orientation, 16-bit and float
    samples scaled by ``bit_depth``, the bundle's ``data.bit_depth``), as the file would read.

    Raises:
        BadImage: empty, not an image, truncated or otherwise undecodable.
        ImageTooLarge: more than ``max_pixels`` pixels (checked from the header, before decoding).
    """
    from clipsam.data.samples import read_image
    from clipsam.errors import DatasetError

    if not data:
        raise BadImage("the request holds no image: send the image bytes as the body or as form field 'image'")
    try:
        with Image.open(io.BytesIO(data)) as im:  # the header only: the size before any decoding
            width, height = im.size
    except UnidentifiedImageError as exc:
        raise BadImage("the body is not an image Pillow can read (PNG, JPEG, BMP, TIFF, WebP...)") from exc
    except Image.DecompressionBombError as exc:
        raise ImageTooLarge(f"the image has too many pixels ({exc})") from exc
    except (OSError, ValueError, SyntaxError, EOFError) as exc:
        raise BadImage(f"the image could not be decoded: {_first_line(exc)}") from exc
    if width * height > max_pixels:
        raise ImageTooLarge(f"the image is {width} x {height} pixels; the limit is {max_pixels} pixels")
    if width < 1 or height < 1:
        raise BadImage(f"the image is {width} x {height} pixels")
    try:
        return read_image(io.BytesIO(data), bit_depth=bit_depth)
    except DatasetError as exc:
        cause = exc.__cause__
        if isinstance(cause, Image.DecompressionBombError):
            raise ImageTooLarge(f"the image has too many pixels ({cause})") from exc
        raise BadImage(f"the image could not be decoded: {_first_line(cause or exc)}") from exc


def _first_line(exc: BaseException) -> str:
    return (str(exc).splitlines() or [type(exc).__name__])[0]


def png_bytes(gray: np.ndarray) -> bytes:
    """PNG file of a uint8 (H0, W0) array (mode L, fast compression)."""
    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(gray, dtype=np.uint8), mode="L").save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


def png_base64(gray: np.ndarray) -> str:
    """Base64 (ASCII) of :func:`png_bytes`."""
    return base64.b64encode(png_bytes(gray)).decode("ascii")


def scores_to_uint8(scores: np.ndarray) -> np.ndarray:
    """Fused pixel scores in [0, 1] -> uint8 ``round(255 * s)`` (clipped; NaN -> 0).

    A client re-thresholds these at ``t`` with ``value >= round(255 * t)``: exact up to the
    1/255 quantisation step.
    """
    values = np.nan_to_num(np.asarray(scores, dtype=np.float32), nan=0.0, posinf=1.0, neginf=0.0)
    return np.rint(np.clip(values, 0.0, 1.0) * 255.0).astype(np.uint8)


def _row_runs(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Horizontal runs of True: (row, first column, last column + 1), in raster order."""
    height, width = mask.shape
    padded = np.zeros((height, width + 2), dtype=np.int8)
    padded[:, 1:-1] = mask
    step = np.diff(padded, axis=1)
    rows, starts = np.nonzero(step == 1)
    _, ends = np.nonzero(step == -1)
    return rows, starts, ends


def _find(parent: list[int], i: int) -> int:
    """Root of ``i`` with path halving."""
    while parent[i] != i:
        parent[i] = parent[parent[i]]
        i = parent[i]
    return i


def _union_touching_runs(rows: np.ndarray, starts: np.ndarray, ends: np.ndarray) -> list[int]:
    """Union-find parents joining runs of adjacent rows that touch (8-connectivity).

    Runs ``[s, e)`` of rows ``r - 1`` and ``r`` touch when ``s_above <= e_below`` and
    ``s_below <= e_above`` (a shared column or a diagonal neighbour).
    """
    parent = list(range(len(rows)))
    row_values, row_first = np.unique(rows, return_index=True)
    bounds = list(row_first) + [len(rows)]
    for k in range(1, len(row_values)):
        if row_values[k] != row_values[k - 1] + 1:
            continue
        j, j_end = int(bounds[k - 1]), int(bounds[k])  # runs of the row above
        i, i_end = int(bounds[k]), int(bounds[k + 1])  # runs of this row
        while i < i_end and j < j_end:
            if starts[j] <= ends[i] and starts[i] <= ends[j]:
                a, b = _find(parent, i), _find(parent, j)
                if a != b:
                    parent[max(a, b)] = min(a, b)
            if ends[j] < ends[i]:
                j += 1
            else:
                i += 1
    return parent


def mask_boxes(mask: np.ndarray, *, max_boxes: int = MAX_BOXES) -> tuple[list[list[int]], int]:
    """Bounding boxes of the 8-connected regions of a bool (H0, W0) mask.

    Returns:
        ``(boxes, num_regions)``: boxes ``[x0, y0, x1, y1]`` with INCLUSIVE pixel indices (as
        ``clipsam.cascade.mask_to_box``), largest region (pixel count) first, ties in raster
        order of the region's first pixel; at most ``max_boxes`` of them. ``num_regions`` counts
        all regions.
    """
    rows, starts, ends = _row_runs(np.asarray(mask, dtype=bool))
    if len(rows) == 0:
        return [], 0
    parent = _union_touching_runs(rows, starts, ends)
    roots = np.fromiter((_find(parent, i) for i in range(len(rows))), dtype=np.int64, count=len(rows))
    unique, label = np.unique(roots, return_inverse=True)  # roots are each region's first run
    count = len(unique)
    x0 = np.full(count, np.iinfo(np.int64).max)
    y0 = np.full(count, np.iinfo(np.int64).max)
    x1 = np.full(count, -1)
    y1 = np.full(count, -1)
    area = np.zeros(count, dtype=np.int64)
    np.minimum.at(x0, label, starts)
    np.minimum.at(y0, label, rows)
    np.maximum.at(x1, label, ends - 1)
    np.maximum.at(y1, label, rows)
    np.add.at(area, label, ends - starts)
    order = np.argsort(-area, kind="stable")[:max_boxes]
    boxes = [[int(x0[k]), int(y0[k]), int(x1[k]), int(y1[k])] for k in order]
    return boxes, count
