"""The dataset-independent sample record, image/mask readers and layout validation.

Every parser (:mod:`~clipsam.data.mvtec`, :mod:`~clipsam.data.visa`, :mod:`~clipsam.data.folder`)
turns a directory into a list of :class:`Sample`; :func:`validate_samples` then checks the files
*before* any training starts, so a broken dataset fails in seconds with one message naming the
file and the fix instead of crashing a dataloader worker an hour into a run.

Dimension symbols: H x W image as stored on disk.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Literal

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from clipsam.errors import ConfigError, DatasetError

__all__ = [
    "save_image",
    "BIT_DEPTH_KEY",
    "COLOR_ORDERS",
    "COLOR_ORDER_KEY",
    "IMAGE_EXTENSIONS",
    "LOSSY_MASK_EXTENSIONS",
    "SIXTEEN_BIT_SCALING",
    "Sample",
    "ValidationMode",
    "array_to_rgb",
    "check_bit_depth",
    "check_color_order",
    "check_mask_format",
    "image_bit_depth",
    "image_size",
    "is_image_file",
    "read_image",
    "read_mask",
    "scale_to_uint8",
    "set_image_bit_depth",
    "set_max_image_pixels",
    "split_valid",
    "validate_samples",
]

#: File suffixes (lower case) treated as images everywhere in clipsam.
IMAGE_EXTENSIONS: frozenset[str] = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp"})

ValidationMode = Literal["full", "headers", "off"]


@dataclass(frozen=True)
class Sample:
    """One image of a dataset and what is known about it.

    Attributes:
        image_path: the image file.
        mask_path: the ground-truth mask file (any non-zero pixel is anomalous), or None for
            normal images and for anomalous images that have no mask (folder datasets).
        label: 0 normal, 1 anomalous, -1 unknown (images to predict on).
        category: category name as on disk (e.g. ``metal_nut``, ``pcb1``).
        defect_type: defect folder name (MVTec-AD), ``"good"`` for normal images, ``"anomaly"``
            for VisA anomalies (the official split file has no defect type), ``"unknown"`` for
            images to predict on.
        mask_threshold: a mask pixel is anomalous when its value is greater than this (0: any
            non-zero value, right for PNG/BMP masks with values 255 or 1/38 (VisA) or defect ids
            (MVTec LOCO); 127 for JPEG-compressed or anti-aliased masks, whose background holds
            small non-zero values). See :func:`read_mask`.
    """

    image_path: Path
    mask_path: Path | None
    label: int
    category: str
    defect_type: str
    mask_threshold: int = 0


def is_image_file(path: Path) -> bool:
    """True when ``path`` has an image suffix (case-insensitive) and is not a hidden file."""
    return path.suffix.lower() in IMAGE_EXTENSIONS and not path.name.startswith(".")


#: Mask file suffixes refused by :func:`read_mask`: lossy compression turns a 0/255 mask into
#: noise around every edge (and sometimes everywhere), which would silently change pixel metrics.
LOSSY_MASK_EXTENSIONS: frozenset[str] = frozenset({".jpg", ".jpeg", ".jpe", ".jfif"})


#: Config key that raises PIL's decompression-bomb limit (named in the error).
MAX_PIXELS_KEY = "data.max_image_pixels"


def _too_large(path: str | os.PathLike[str], exc: Exception) -> DatasetError:
    """The error for an image above PIL's decompression-bomb limit, naming the file and the key."""
    limit = Image.MAX_IMAGE_PIXELS
    return DatasetError(
        f"image {path} is too large to decode safely ({exc}); the limit is "
        f"{MAX_PIXELS_KEY}={2 * limit if limit else None} pixels: raise {MAX_PIXELS_KEY} "
        "(null: no limit) if you trust the file; for small defects on large images see data.tiling"
    )


#: How images stored with more than 8 bits become 8-bit: ``"divide"`` maps v -> round(v * 255 / max)
#: with max = 2**bit_depth - 1 (16-bit: round(v / 257); 0 -> 0, max -> 255, the whole range),
#: ``"shift"`` maps v -> v >> (bit_depth - 8) (drop the low bits). Both depend on the bit depth
#: only, never on an image's content (one hot pixel must not darken the whole image).
SIXTEEN_BIT_SCALING = "divide"

#: Config key of the bit depth of images stored with more than 8 bits per sample (named in errors).
BIT_DEPTH_KEY = "data.bit_depth"
#: Config key of the channel order of image arrays handed to clipsam (named in errors).
COLOR_ORDER_KEY = "data.color_order"
#: Channel orders of image arrays: ``rgb`` (PIL, imageio, scikit-image) or ``bgr`` (OpenCV, most camera SDKs).
COLOR_ORDERS = ("rgb", "bgr")

_BIT_DEPTH: int | None = None  # data.bit_depth of the running command (set_image_bit_depth)

_EXIF_ORIENTATION = 0x0112
_TRANSPOSED_ORIENTATIONS = frozenset({5, 6, 7, 8})  # 90/270 degree rotations swap width and height
_WIDE_MODES = frozenset({"I;16", "I;16B", "I;16L", "I;16N", "I"})  # one channel, more than 8 bits


def check_bit_depth(value: Any, *, key: str = BIT_DEPTH_KEY) -> int | None:
    """``data.bit_depth``: None (from the file) or an integer from 8 to 16.

    Raises:
        ConfigError: naming the key, the value and what to use.
    """
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not 8 <= value <= 16:
        raise ConfigError(
            f"{key}={value!r} is not a bit depth: use the number of bits your camera writes, from 8 to 16 "
            "(e.g. 12 for 12-bit data stored in 16-bit PNG/TIFF files), or null to take it from the file"
        )
    return int(value)


def check_color_order(value: Any, *, key: str = COLOR_ORDER_KEY) -> str:
    """``data.color_order``: ``"rgb"`` or ``"bgr"`` (case-insensitive).

    Raises:
        ConfigError: naming the key and the choices.
    """
    order = str(value).lower() if isinstance(value, str) else value
    if order not in COLOR_ORDERS:
        raise ConfigError(
            f"{key}={value!r}: use 'rgb' (PIL, imageio) or 'bgr' (OpenCV's cv2.imread / VideoCapture, most camera SDKs)"
        )
    return str(order)


def set_image_bit_depth(bit_depth: int | None) -> None:
    """Apply ``data.bit_depth`` to this process: what :func:`read_image` uses when its caller
    passes no ``bit_depth`` (the datamodule sets it, so reference images and every other read
    of the command follow the config)."""
    global _BIT_DEPTH
    _BIT_DEPTH = check_bit_depth(bit_depth)


def image_bit_depth() -> int | None:
    """This process's ``data.bit_depth`` (None: from the file)."""
    return _BIT_DEPTH


def _orientation(im: Image.Image) -> int:
    """EXIF orientation from the file header only (PNG: an eXIf chunk before the pixel data)."""
    try:
        if im.format == "PNG":
            raw = im.info.get("exif")
            if not raw:
                return 1
            exif = Image.Exif()
            exif.load(raw)
            return int(exif.get(_EXIF_ORIENTATION, 1))
        return int(im.getexif().get(_EXIF_ORIENTATION, 1))
    except Exception:  # a damaged EXIF block: the decode check reports real damage
        return 1


def _depth_message(path: Any, peak: int, depth: int, key: str) -> str:
    return (
        f"image {path} holds values up to {peak}, above the {depth}-bit maximum {(1 << depth) - 1} "
        f"of {key}={depth}: set {key} to the bit depth the camera wrote (e.g. 16), or null to take it from the file"
    )


def scale_to_uint8(
    values: np.ndarray, *, bit_depth: int | None, path: Any, sixteen_bit: str = SIXTEEN_BIT_SCALING, key: str = BIT_DEPTH_KEY
) -> np.ndarray:
    """Integer samples of more than 8 bits -> uint8, by the bit depth (never by the content).

    ``bit_depth`` None is the storage depth (16); a configured depth (e.g. 12: values up to 4095)
    scales by 255 / (2**depth - 1), and a value above its maximum is an error naming ``key``.
    """
    depth = 16 if bit_depth is None else int(bit_depth)
    top = (1 << depth) - 1
    values = values.astype(np.int64)
    if bit_depth is None:
        values = np.clip(values, 0, top)  # Pillow's "I" mode: 32-bit ints in the 16-bit range
    else:
        peak = int(values.max()) if values.size else 0
        if peak > top:
            raise DatasetError(_depth_message(path, peak, depth, key))
        values = np.clip(values, 0, top)
    if sixteen_bit == "shift":
        return (values >> (depth - 8)).astype(np.uint8)
    return ((values * 255 + top // 2) // top).astype(np.uint8)  # round(v * 255 / top)


def _to_uint8(arr: np.ndarray, mode: str, path: str | os.PathLike[str], *, sixteen_bit: str, bit_depth: int | None) -> np.ndarray:
    """One channel-last array of a non-8-bit mode -> uint8, scaled by bit depth (not content)."""
    if mode == "F":  # 32-bit float: the [0, 1] convention (float TIFFs)
        if not np.isfinite(arr).all():
            raise DatasetError(
                f"image {path} holds NaN or infinite pixel values: fix or remove the file"
            )
        return (np.clip(arr, 0.0, 1.0) * 255.0).round().astype(np.uint8)
    # "I;16*" and "I" (Pillow's 32-bit int mode, in which it opens some 16-bit files): 16-bit range.
    return scale_to_uint8(arr, bit_depth=bit_depth, path=path, sixteen_bit=sixteen_bit)


def _raw_mode(im: Image.Image) -> str:
    """The decoder's raw mode of the first tile ("RGB;16B" for a 48-bit PNG), or ""."""
    try:
        args = im.tile[0][3] if im.tile else None
    except (IndexError, TypeError):
        return ""
    if isinstance(args, tuple):
        args = args[0] if args else None
    return args if isinstance(args, str) else ""


def _image_label(path: str | os.PathLike[str] | BinaryIO) -> str:
    """How messages name an image: its path, or ``<in-memory image>`` for a file object."""
    return os.fspath(path) if isinstance(path, (str, os.PathLike)) else "<in-memory image>"


def _wide_colour(path: str | os.PathLike[str] | BinaryIO, im: Image.Image) -> np.ndarray | None:
    """A 16-bit-per-channel colour image (48/64-bit PNG or TIFF) as uint16 (H, W, 3) RGB in
    display orientation; None for any other image.

    Pillow decodes these to 8 bits by dropping the low byte (v >> 8), whatever ``data.bit_depth``
    says, so 12-bit colour data (values up to 4095) would come out nearly black; OpenCV reads
    all 16 bits.
    """
    if im.mode not in ("RGB", "RGBA") or ";16" not in _raw_mode(im):
        return None
    try:
        import cv2
    except ImportError:  # clipsam.runtime's install (numpy + Pillow) has no OpenCV
        raise DatasetError(
            f"image {_image_label(path)} has 16 bits per colour channel, which Pillow reads as 8: reading all "
            "its bits needs OpenCV (pip install opencv-python-headless), or save it with 8 bits per channel"
        ) from None
    if isinstance(path, (str, os.PathLike)):
        data = np.fromfile(os.fspath(path), dtype=np.uint8)
    else:
        path.seek(0)
        data = np.frombuffer(path.read(), dtype=np.uint8)
    decoded = cv2.imdecode(data, cv2.IMREAD_UNCHANGED)
    if decoded is None or decoded.dtype != np.uint16 or decoded.ndim != 3 or decoded.shape[2] < 3:
        return None  # OpenCV cannot read it: Pillow's 8-bit decode stays
    rgb = decoded[..., 2::-1]  # BGR(A) -> RGB, alpha dropped
    method = {
        2: Image.Transpose.FLIP_LEFT_RIGHT,
        3: Image.Transpose.ROTATE_180,
        4: Image.Transpose.FLIP_TOP_BOTTOM,
        5: Image.Transpose.TRANSPOSE,
        6: Image.Transpose.ROTATE_270,
        7: Image.Transpose.TRANSVERSE,
        8: Image.Transpose.ROTATE_90,
    }.get(_orientation(im))
    if method is not None:  # as ImageOps.exif_transpose, channel by channel (Pillow has no 48-bit mode)
        rgb = np.stack([np.asarray(Image.fromarray(np.ascontiguousarray(rgb[..., c])).transpose(method)) for c in range(3)], axis=2)
    return np.ascontiguousarray(rgb)


def read_image(
    path: str | os.PathLike[str] | BinaryIO, *, sixteen_bit: str = SIXTEEN_BIT_SCALING, bit_depth: int | None = None
) -> np.ndarray:
    """Decode an image file as 8-bit RGB in display orientation (the one public image reader).

    - EXIF orientation is applied (``PIL.ImageOps.exif_transpose``), so the array is what image
      viewers show and what masks drawn on the upright image are aligned with.
    - 8-bit grayscale, palette, RGBA (alpha dropped), CMYK... become RGB as Pillow converts them.
    - Images stored with more than 8 bits per sample (16-bit grayscale ``I;16``/``I``, 48/64-bit
      colour PNG and TIFF) are scaled by the bit depth, never by the image's own maximum:
      ``sixteen_bit="divide"`` (default, :data:`SIXTEEN_BIT_SCALING`) gives
      round(v * 255 / (2**bit_depth - 1)), ``"shift"`` gives v >> (bit_depth - 8). The bit depth
      is ``bit_depth`` (``data.bit_depth``: e.g. 12 for 12-bit camera data stored in 16-bit
      files, values up to 4095), else the process's :func:`image_bit_depth`, else the file's
      (16). A value above the configured depth's maximum is an error naming ``data.bit_depth``.
      8-bit files are read as they are.
    - 32-bit float images (``F``, e.g. float TIFFs) are taken as intensities in [0, 1]: v * 255,
      values outside clipped; NaN/inf is an error.

    Every clipsam path that reads an image uses this: datasets, the predict writer, overlays.

    Args:
        path: image file, or a binary file object holding one (an upload).
        sixteen_bit: ``"divide"`` or ``"shift"``, see above.
        bit_depth: significant bits of images stored with more than 8 bits (8 to 16); None:
            :func:`image_bit_depth` (``data.bit_depth`` of the running command), else the file's.

    Returns:
        uint8 (H, W, 3) RGB, H x W in display orientation.

    Raises:
        DatasetError: the file is missing, not an image, truncated or otherwise undecodable, or
            holds values above the configured bit depth.
    """
    if sixteen_bit not in ("divide", "shift"):
        raise ValueError(f"sixteen_bit must be 'divide' or 'shift', got {sixteen_bit!r}")
    depth = check_bit_depth(bit_depth, key="bit_depth") if bit_depth is not None else _BIT_DEPTH
    label = _image_label(path)
    try:
        with Image.open(path) as im:
            wide = _wide_colour(path, im)
            if wide is not None:
                return scale_to_uint8(wide, bit_depth=depth, path=label, sixteen_bit=sixteen_bit)
            im = ImageOps.exif_transpose(im)
            if im.mode in _WIDE_MODES or im.mode == "F":
                arr = _to_uint8(np.asarray(im), im.mode, label, sixteen_bit=sixteen_bit, bit_depth=depth)
                return np.repeat(arr[..., None], 3, axis=2)
            return np.asarray(im.convert("RGB"), dtype=np.uint8).copy()
    except DatasetError:
        raise  # already names the image and the fix
    except FileNotFoundError as exc:
        # Read by datasets, the predict writer and Segmenter.segment: say nothing about datasets.
        raise DatasetError(f"image file {label} does not exist: check the path") from exc
    except Image.DecompressionBombError as exc:
        raise _too_large(label, exc) from exc
    except (OSError, UnidentifiedImageError, ValueError, SyntaxError) as exc:
        raise DatasetError(
            f"cannot decode image {label} ({exc}): the file is corrupt or truncated; "
            "re-download or re-extract the dataset, or remove the file"
        ) from exc


def array_to_rgb(
    image: np.ndarray, *, color_order: str = "rgb", bit_depth: int | None = None, what: str = "image array"
) -> np.ndarray:
    """An image array handed to clipsam (``Segmenter``) -> uint8 (H, W, 3) RGB.

    Args:
        image: (H, W) gray, (H, W, 3) or (H, W, 4) in ``color_order``; uint8, uint16 (scaled by
            ``bit_depth``, default 16, as :func:`read_image` scales files), or float in [0, 1].
        color_order: ``"rgb"`` or ``"bgr"`` (``data.color_order``: OpenCV's ``cv2.imread`` and
            ``VideoCapture`` give BGR); the 4th channel (alpha) is dropped.
        bit_depth: significant bits of uint16 arrays (``data.bit_depth``; 12 for 12-bit cameras).
        what: how the array is named in errors.

    Raises:
        ValueError: a shape or dtype clipsam does not take.
        DatasetError: uint16 values above the configured bit depth.
    """
    order = check_color_order(color_order)
    array = image
    if array.ndim == 2:
        array = np.repeat(array[..., None], 3, axis=2)
    if array.ndim != 3 or array.shape[2] not in (3, 4):
        raise ValueError(f"image arrays must be (H, W), (H, W, 3) RGB/BGR or (H, W, 4) RGBA/BGRA, got shape {image.shape}")
    if array.shape[0] < 1 or array.shape[1] < 1:
        raise ValueError(f"the image array is empty (shape {image.shape}): pass an image at least 1 x 1 pixels")
    array = array[..., :3]
    if order == "bgr":
        array = array[..., ::-1]
    if array.dtype == np.uint8:
        pass
    elif array.dtype == np.uint16:
        array = scale_to_uint8(array, bit_depth=bit_depth, path=what)
    elif np.issubdtype(array.dtype, np.floating) and array.size and float(np.nanmax(array)) <= 1.0:
        array = np.clip(np.round(np.nan_to_num(array) * 255.0), 0, 255).astype(np.uint8)
    else:
        raise ValueError(f"image arrays must be uint8, uint16 (data.bit_depth) or float in [0, 1], got {array.dtype}")
    return np.ascontiguousarray(array)


def check_mask_format(path: str | os.PathLike[str], *, threshold: int = 0) -> None:
    """Refuse lossy mask formats (JPEG) read with "any non-zero" binarisation.

    A JPEG mask binarised at ``threshold`` 0 turns its compression noise into anomaly; formats
    whose official masks are JPEG (Kvasir-SEG, TN3K) declare ``Sample.mask_threshold`` 127,
    which reads them back exactly (tests/unit/data/test_formats.py), and are accepted.

    Raises:
        DatasetError: naming the file and the fix (save the masks as PNG).
    """
    if threshold <= 0 and Path(path).suffix.lower() in LOSSY_MASK_EXTENSIONS:
        raise DatasetError(
            f"mask {path} is a JPEG: lossy compression adds noise around (and inside) the anomaly, "
            "which would silently change the pixel metrics; save ground-truth masks as PNG (lossless)"
        )


def read_mask(path: str | os.PathLike[str], *, threshold: int = 0) -> np.ndarray:
    """Decode a ground-truth mask (the one public mask reader): colour channels, alpha as transparency.

    A pixel is anomalous when any colour channel is above ``threshold`` (default 0: non-zero;
    VisA masks hold values such as 1 or 38, MVTec-AD masks 0/255: both binarise the same way)
    and it is not fully transparent. The alpha channel never makes a pixel anomalous: an RGBA
    mask with an opaque black background is all normal except its coloured pixels. Palette masks
    are read through their palette. EXIF orientation is applied, as by :func:`read_image`. Lossy
    formats (JPEG) are refused at threshold 0. A *folder* of mask files (MVTec LOCO AD keeps one
    file per defect region in ``ground_truth/<type>/<stem>/000.png, 001.png, ...``) is their union.

    Args:
        path: mask file, or a folder of mask files of equal size.
        threshold: values greater than this are anomalous (127 for JPEG masks).

    Returns:
        bool (H, W), True on anomalous pixels, H x W in display orientation.

    Raises:
        DatasetError: the file is missing, undecodable, or a JPEG read at threshold 0; a mask
            folder is empty or its files differ in size.
    """
    if os.path.isdir(path):
        files = sorted(p for p in Path(path).iterdir() if is_image_file(p))
        if not files:
            raise DatasetError(f"mask folder {path} holds no mask files: re-extract the dataset")
        parts = [read_mask(f, threshold=threshold) for f in files]
        if any(m.shape != parts[0].shape for m in parts):
            raise DatasetError(f"the mask files in {path} differ in size: re-extract the dataset")
        return np.logical_or.reduce(parts)
    check_mask_format(path, threshold=threshold)
    try:
        with Image.open(path) as im:
            im = ImageOps.exif_transpose(im)
            mode = im.mode
            if mode == "P":
                im = im.convert("RGBA" if "transparency" in im.info else "RGB")
                mode = im.mode
            elif mode == "PA":
                im = im.convert("RGBA")
                mode = im.mode
            arr = np.asarray(im)
    except FileNotFoundError as exc:
        raise DatasetError(f"mask file {path} does not exist: check the dataset's ground-truth folder") from exc
    except (OSError, UnidentifiedImageError, ValueError, SyntaxError) as exc:
        raise DatasetError(
            f"cannot decode mask {path} ({exc}): the file is corrupt or truncated; "
            "re-download or re-extract the dataset, or remove the image and its mask"
        ) from exc
    if arr.ndim == 2:
        return arr > threshold
    if mode in ("LA", "RGBA", "La", "RGBa"):
        colour, alpha = arr[..., :-1], arr[..., -1]
        return (colour > threshold).any(axis=2) & (alpha != 0)
    return (arr > threshold).any(axis=2)


def image_size(path: str | os.PathLike[str]) -> tuple[int, int]:
    """(width, height) of an image file in display orientation (EXIF applied), from its header."""
    with Image.open(path) as im:
        width, height = im.size
        if _orientation(im) in _TRANSPOSED_ORIENTATIONS:
            return height, width
        return width, height


def _probe(path: Path, *, kind: str, full: bool) -> tuple[int, int]:
    """Open ``path`` (decode it fully when ``full``) and return its (width, height), display orientation.

    A mask folder (MVTec LOCO AD) is probed file by file; its files must share one size.
    """
    if kind == "mask" and path.is_dir():
        files = sorted(p for p in path.iterdir() if is_image_file(p))
        if not files:
            raise DatasetError(f"mask folder {path} holds no mask files: re-extract the dataset or remove its image")
        sizes = {_probe(f, kind=kind, full=full) for f in files}
        if len(sizes) > 1:
            raise DatasetError(f"the mask files in {path} differ in size: re-extract the dataset or remove its image")
        return sizes.pop()
    try:
        with Image.open(path) as im:
            size = im.size
            if _orientation(im) in _TRANSPOSED_ORIENTATIONS:
                size = (size[1], size[0])  # display orientation, as read_image/read_mask return
            if full:
                im.load()  # decodes every pixel: raises on truncated JPEG/PNG data
            return size
    except Image.DecompressionBombError as exc:
        raise _too_large(path, exc) from exc
    except (OSError, UnidentifiedImageError, ValueError, SyntaxError) as exc:
        raise DatasetError(
            f"cannot decode {kind} {path} ({exc}): the file is corrupt or truncated; "
            f"re-download or re-extract the dataset, or remove the file"
            + (" and its image" if kind == "mask" else "")
        ) from exc


def _check_one(sample: Sample, *, require_masks: bool, full: bool) -> str | None:
    """Check one sample; return the problem as a message, or None when it is fine."""
    image = Path(sample.image_path)
    if not image.is_file():
        return f"image file {image} does not exist: check the dataset root and layout"
    if sample.label == 1 and sample.mask_path is None and require_masks:
        return f"anomalous image {image} has no ground-truth mask: add the mask or remove the image"
    try:
        image_size = _probe(image, kind="image", full=full)
        if sample.mask_path is None:
            return None
        mask = Path(sample.mask_path)
        if not (mask.is_file() or mask.is_dir()):
            return (
                f"mask file {mask} for anomalous image {image} does not exist: "
                "add the mask or remove the image"
            )
        check_mask_format(mask, threshold=sample.mask_threshold)
        mask_size = _probe(mask, kind="mask", full=full)
    except DatasetError as exc:
        return str(exc)
    if mask_size != image_size:
        return (
            f"mask {mask} is {mask_size[0]}x{mask_size[1]} (WxH) but its image {image} is "
            f"{image_size[0]}x{image_size[1]}: masks must have their image's size; fix or remove the pair"
        )
    return None


def set_max_image_pixels(max_pixels: int | None) -> None:
    """Apply ``data.max_image_pixels``: images above it are refused (PIL's decompression-bomb check).

    PIL refuses images above twice ``Image.MAX_IMAGE_PIXELS`` and warns above it; clipsam sets
    ``MAX_IMAGE_PIXELS`` to half the configured limit and silences the warning, so the key is the
    one limit there is. None disables the check.
    """
    import warnings

    Image.MAX_IMAGE_PIXELS = None if not max_pixels else max(1, int(max_pixels) // 2)
    warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)


def split_valid(
    samples: Sequence[Sample], *, check: ValidationMode = "full", num_threads: int = 4
) -> tuple[list[Sample], list[tuple[Sample, str]]]:
    """Check samples like :func:`validate_samples`, but return the bad ones instead of raising.

    For images to predict on: one undecodable file must not end a run of thousands.

    Returns:
        ``(good, bad)``: the samples that passed, and ``(sample, problem)`` for the others.
    """
    if check == "off":
        return list(samples), []
    full = check == "full"

    def run(sample: Sample) -> str | None:
        return _check_one(sample, require_masks=False, full=full)

    with ThreadPoolExecutor(max_workers=max(1, num_threads)) as pool:
        problems = list(pool.map(run, samples))
    good = [s for s, p in zip(samples, problems) if p is None]
    bad = [(s, p) for s, p in zip(samples, problems) if p is not None]
    return good, bad


def validate_samples(
    samples: Sequence[Sample],
    *,
    check: ValidationMode = "full",
    what: str,
    require_masks: bool = True,
    num_threads: int = 4,
    categories: Sequence[str] | None = None,
) -> None:
    """Check a parsed dataset on disk before any training or evaluation starts.

    Checks, in this order for every sample: the image exists; an anomalous image has a mask
    (when ``require_masks``); the files open (``"headers"``) or decode completely (``"full"``,
    which catches truncated JPEG/PNG files); the mask has its image's size.

    Args:
        samples: the parsed samples.
        check: ``"full"`` decodes every image and mask (thread pool; about 1-2 ms per MVTec
            image per thread), ``"headers"`` only reads file headers and sizes, ``"off"`` only
            checks that the list is non-empty.
        what: what was parsed, for the messages, e.g. ``"MVTec-AD root /data/mvtec, split
            'test'"``.
        require_masks: anomalous images must have a mask (MVTec-AD, VisA); False for folder
            datasets, where masks are optional.
        num_threads: threads decoding files in parallel.
        categories: the categories the user asked for (None: whatever was found). Each must
            have at least one sample: a requested category with no images would otherwise vanish
            from the per-category table and the mean without a word.

    Raises:
        DatasetError: on the first problem in sample order; the message names the file and the
            fix, and says how many other files have problems.
    """
    if check not in ("full", "headers", "off"):
        raise DatasetError(f"unknown validation mode {check!r}: use 'full', 'headers' or 'off'")
    if len(samples) == 0:
        raise DatasetError(
            f"0 images found in {what}: check the root path, the category names and the split"
        )
    if categories:
        found = {s.category for s in samples}
        empty = [c for c in dict.fromkeys(categories) if c not in found]
        if empty:
            raise DatasetError(
                f"category {empty[0]!r} has no images in {what}"
                + (f" (nor do {', '.join(map(repr, empty[1:]))})" if len(empty) > 1 else "")
                + ": add its images, or drop it from the categories"
            )
    if check == "off":
        return
    full = check == "full"

    def run(sample: Sample) -> str | None:
        return _check_one(sample, require_masks=require_masks, full=full)

    with ThreadPoolExecutor(max_workers=max(1, num_threads)) as pool:
        problems = [p for p in pool.map(run, samples) if p is not None]
    if problems:
        more = f" ({len(problems) - 1} more file(s) in {what} have problems)" if len(problems) > 1 else ""
        raise DatasetError(problems[0] + more)


def save_image(array: np.ndarray, path: Path) -> Path:
    """Write ``array`` (uint8 (H, W) or (H, W, 3)) to ``path``; the suffix picks the codec.

    JPEG is written at quality 95; PNG, BMP and TIFF are lossless. Parent folders are created.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    codec = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".bmp": "BMP", ".tif": "TIFF", ".tiff": "TIFF"}
    fmt = codec[path.suffix.lower()]
    Image.fromarray(array).save(path, format=fmt, **({"quality": 95} if fmt == "JPEG" else {}))
    return path
