"""Synthetic industrial anomaly data: a pure renderer and an on-disk generator.

This machine and CI have no network for the real datasets, so every test and the offline demo
run on data made here. Six categories (three textures, three objects) share four defect kinds
whose *visual signature* is the same everywhere, so a model trained on some categories can find
the defects on the others (the zero-shot setting in miniature):

=================  ===========================================================================
defect             signature
=================  ===========================================================================
``scratch``        a thin bright or dark curve (a quadratic Bezier, 1-3 px wide at 256 px)
``hole``           a near-black irregular blob
``stain``          a strongly coloured, semi-transparent irregular blotch
``missing_part``   a chunk of the object replaced by background (textures: a flat cut-out)
=================  ===========================================================================

Masks are exact by construction: the defect's mask is drawn first (no anti-aliasing) and the
defect is painted through it, so ``mask`` is True on precisely the pixels the defect changed.
The light sensor noise added last touches every pixel and is not part of any defect.

On disk (:func:`generate_synthetic`) the same images are written in BOTH layouts::

    <root>/mvtec/<cat>/train/good/000.png
    <root>/mvtec/<cat>/test/good/000.png
    <root>/mvtec/<cat>/test/<defect>/000.png
    <root>/mvtec/<cat>/ground_truth/<defect>/000_mask.png      0/255; "mesh" images are grayscale
    <root>/visa/<cat>/Data/Images/Normal/0000.JPG              train goods first, then test goods
    <root>/visa/<cat>/Data/Images/Anomaly/000.JPG
    <root>/visa/<cat>/Data/Masks/Anomaly/000.png               NOT binary (:data:`VISA_MASK_VALUES`)
    <root>/visa/split_csv/1cls.csv                             object,split,label,image,mask,defect

Dimension symbols: H x W image (``image_size`` x ``image_size``).
"""

from __future__ import annotations

import csv
import math
import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from clipsam.data.samples import save_image  # re-exported: where it always was
from clipsam.errors import DatasetError

__all__ = [
    "DEFECT_TYPES",
    "GRAYSCALE_CATEGORIES",
    "OBJECT_CATEGORIES",
    "SYNTH_CATEGORIES",
    "TEXTURE_CATEGORIES",
    "VISA_MASK_VALUES",
    "SynthItem",
    "SynthSource",
    "generate_formats",
    "generate_synthetic",
    "render_sample",
    "save_image",
]

TEXTURE_CATEGORIES: tuple[str, ...] = ("fabric", "stripes", "mesh")
OBJECT_CATEGORIES: tuple[str, ...] = ("disk", "hexnut", "capsule")
SYNTH_CATEGORIES: tuple[str, ...] = ("fabric", "stripes", "mesh", "disk", "hexnut", "capsule")
#: Categories rendered (and saved in the MVTec layout) as grayscale, like MVTec's grid/screw.
GRAYSCALE_CATEGORIES: tuple[str, ...] = ("mesh",)
DEFECT_TYPES: tuple[str, ...] = ("scratch", "hole", "stain", "missing_part")

# Stain colours (RGB): saturated, far from every category's base colours.
_STAIN_COLORS = np.array(
    [[200, 30, 30], [40, 160, 40], [40, 60, 210], [220, 160, 0], [170, 40, 170]], dtype=np.float32
)


# --------------------------------------------------------------------------------------------
# The renderer
# --------------------------------------------------------------------------------------------
def render_sample(
    category: str,
    defect: str | None,
    *,
    rng: np.random.Generator,
    image_size: int = 256,
) -> tuple[np.ndarray, np.ndarray]:
    """Render one synthetic image and its exact defect mask, in memory.

    Pure: the result depends only on the arguments (and consumes ``rng``).

    Args:
        category: one of :data:`SYNTH_CATEGORIES`.
        defect: one of :data:`DEFECT_TYPES`, or None for a normal (defect-free) image.
        rng: the random source; pass ``np.random.default_rng(seed)`` for a reproducible image.
        image_size: side S of the square image in pixels (>= 32).

    Returns:
        ``(image, mask)``: image uint8 (H, W, 3) RGB with H = W = ``image_size`` (grayscale
        categories have three equal channels); mask bool (H, W), True on defect pixels, all
        False when ``defect`` is None and never empty otherwise.

    Raises:
        ValueError: unknown category or defect, or ``image_size`` < 32.
    """
    if category not in SYNTH_CATEGORIES:
        raise ValueError(f"unknown synthetic category {category!r}; available: {', '.join(SYNTH_CATEGORIES)}")
    if defect is not None and defect not in DEFECT_TYPES:
        raise ValueError(f"unknown defect type {defect!r}; available: {', '.join(DEFECT_TYPES)}")
    if image_size < 32:
        raise ValueError(f"image_size must be >= 32, got {image_size}")
    s = int(image_size)

    if category in TEXTURE_CATEGORIES:
        image = _TEXTURES[category](s, rng)  # (H, W, 3) float32 in [0, 255]
        region = np.ones((s, s), dtype=bool)
        background = None
    else:
        image, region, background = _OBJECTS[category](s, rng)

    mask = np.zeros((s, s), dtype=bool)
    if defect is not None:
        for _ in range(50):  # resample until the defect has a visible size inside the region
            mask = _DEFECT_MASKS[defect](s, region, rng)
            if mask.sum() >= max(12, (s * s) // 4000):
                break
        image = _paint_defect(image, mask, defect, background, rng)

    if category in GRAYSCALE_CATEGORIES:
        gray = image @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
        image = np.repeat(gray[..., None], 3, axis=2)
    noise = rng.normal(0.0, 2.0, size=(s, s, 1)).astype(np.float32)
    image = np.clip(image + noise, 0, 255).round().astype(np.uint8)
    return image, mask


# --------------------------------------------------------------------------------------------
# Textures: (S, rng) -> float32 (H, W, 3) in [0, 255]
# --------------------------------------------------------------------------------------------
def _grid(s: int) -> tuple[np.ndarray, np.ndarray]:
    ys, xs = np.mgrid[0:s, 0:s].astype(np.float32)
    return ys, xs


def _smooth_noise(s: int, rng: np.random.Generator, *, scale: float, amplitude: float) -> np.ndarray:
    """Low-frequency noise, float32 (H, W), zero-mean-ish, |values| about ``amplitude``."""
    cells = max(2, int(s / scale))
    coarse = rng.normal(0.0, 1.0, size=(cells, cells)).astype(np.float32)
    return cv2.resize(coarse, (s, s), interpolation=cv2.INTER_CUBIC) * amplitude


def _fabric(s: int, rng: np.random.Generator) -> np.ndarray:
    ys, xs = _grid(s)
    base = np.array([150, 130, 100], dtype=np.float32) + rng.uniform(-15, 15, size=3).astype(np.float32)
    period = s / rng.uniform(28, 36)
    phase = rng.uniform(0, 2 * math.pi, size=2)
    warp = np.sin(2 * math.pi * xs / period + phase[0])
    weft = np.sin(2 * math.pi * ys / period + phase[1])
    weave = np.where((np.floor(xs / period) + np.floor(ys / period)) % 2 == 0, warp, weft)
    shade = 1.0 + 0.12 * weave + _smooth_noise(s, rng, scale=s / 6, amplitude=0.04)
    fibre = rng.normal(0.0, 6.0, size=(s, s)).astype(np.float32)
    return base[None, None, :] * shade[..., None] + fibre[..., None]


def _stripes(s: int, rng: np.random.Generator) -> np.ndarray:
    ys, xs = _grid(s)
    angle = math.radians(rng.uniform(-8, 8))
    period = s / rng.uniform(10, 14)
    t = xs * math.cos(angle) + ys * math.sin(angle) + rng.uniform(0, period)
    stripe = (np.floor(t / (period / 2)) % 2).astype(np.float32)[..., None]
    color_a = np.array([60, 90, 140], dtype=np.float32) + rng.uniform(-10, 10, size=3).astype(np.float32)
    color_b = np.array([190, 195, 205], dtype=np.float32) + rng.uniform(-10, 10, size=3).astype(np.float32)
    image = color_a * stripe + color_b * (1.0 - stripe)
    return image + _smooth_noise(s, rng, scale=s / 5, amplitude=5.0)[..., None]


def _mesh(s: int, rng: np.random.Generator) -> np.ndarray:
    ys, xs = _grid(s)
    period = s / rng.uniform(12, 16)
    width = max(1.0, period * 0.22)
    off = rng.uniform(0, period, size=2)
    dx = np.abs(((xs + off[0]) % period) - period / 2)
    dy = np.abs(((ys + off[1]) % period) - period / 2)
    wire = np.clip(width - np.minimum(dx, dy), 0.0, 1.0)
    value = 40.0 + 150.0 * wire + _smooth_noise(s, rng, scale=s / 4, amplitude=8.0)
    return np.repeat(value[..., None], 3, axis=2)


_TEXTURES = {"fabric": _fabric, "stripes": _stripes, "mesh": _mesh}


# --------------------------------------------------------------------------------------------
# Objects: (S, rng) -> (image float32 (H,W,3), object region bool (H,W), background float32 (H,W,3))
# --------------------------------------------------------------------------------------------
def _background(s: int, rng: np.random.Generator, color: tuple[int, int, int]) -> np.ndarray:
    base = np.array(color, dtype=np.float32) + rng.uniform(-8, 8, size=3).astype(np.float32)
    return base[None, None, :] + _smooth_noise(s, rng, scale=s / 3, amplitude=6.0)[..., None]


def _compose(background: np.ndarray, region: np.ndarray, foreground: np.ndarray) -> np.ndarray:
    return np.where(region[..., None], foreground, background)


def _disk(s: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    ys, xs = _grid(s)
    background = _background(s, rng, (30, 30, 35))
    cx, cy = s / 2 + rng.uniform(-0.04, 0.04, size=2) * s
    radius = s * rng.uniform(0.34, 0.40)
    r = np.hypot(xs - cx, ys - cy) / radius
    region = r <= 1.0
    metal = np.array([165, 168, 172], dtype=np.float32) + rng.uniform(-10, 10, size=3).astype(np.float32)
    shade = 1.0 - 0.15 * r + 0.08 * np.sin(r * 9 * math.pi)  # concentric machining rings
    foreground = metal[None, None, :] * shade[..., None]
    return _compose(background, region, foreground), region, background


def _hexnut(s: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    background = _background(s, rng, (215, 215, 210))
    cx, cy = s / 2 + rng.uniform(-0.04, 0.04, size=2) * s
    radius = s * rng.uniform(0.33, 0.39)
    turn = rng.uniform(0, math.pi / 3)
    angles = turn + np.arange(6) * math.pi / 3
    corners = np.stack([cx + radius * np.cos(angles), cy + radius * np.sin(angles)], axis=1)  # (6, 2) x, y
    region_u8 = np.zeros((s, s), dtype=np.uint8)
    cv2.fillPoly(region_u8, [np.round(corners).astype(np.int32)], 1)
    cv2.circle(region_u8, (round(cx), round(cy)), round(radius * 0.42), 0, thickness=-1)
    region = region_u8.astype(bool)
    ys, xs = _grid(s)
    brass = np.array([185, 150, 70], dtype=np.float32) + rng.uniform(-10, 10, size=3).astype(np.float32)
    shade = 1.0 + 0.12 * np.cos(np.arctan2(ys - cy, xs - cx) * 6 - turn * 6)  # facets
    foreground = brass[None, None, :] * shade[..., None]
    return _compose(background, region, foreground), region, background


def _capsule(s: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    ys, xs = _grid(s)
    background = _background(s, rng, (235, 235, 235))
    cx, cy = s / 2 + rng.uniform(-0.04, 0.04, size=2) * s
    angle = rng.uniform(-0.25, 0.25)
    half_len, rad = s * rng.uniform(0.26, 0.30), s * rng.uniform(0.13, 0.16)
    u = (xs - cx) * math.cos(angle) + (ys - cy) * math.sin(angle)  # along the axis
    v = -(xs - cx) * math.sin(angle) + (ys - cy) * math.cos(angle)
    dist = np.hypot(np.clip(np.abs(u) - half_len, 0, None), v)
    region = dist <= rad
    cap = np.array([95, 95, 105], dtype=np.float32) + rng.uniform(-5, 5, size=3).astype(np.float32)
    body = np.array([200, 120, 40], dtype=np.float32) + rng.uniform(-10, 10, size=3).astype(np.float32)
    color = np.where((u < 0)[..., None], cap, body)
    shade = 1.0 + 0.25 * (1.0 - np.clip(np.abs(v) / rad, 0, 1) ** 2) - 0.1
    foreground = color * shade[..., None]
    return _compose(background, region, foreground), region, background


_OBJECTS = {"disk": _disk, "hexnut": _hexnut, "capsule": _capsule}


# --------------------------------------------------------------------------------------------
# Defect masks: (S, region bool (H,W), rng) -> bool (H,W) inside region
# --------------------------------------------------------------------------------------------
def _pick_point(region: np.ndarray, rng: np.random.Generator, *, margin: int) -> tuple[int, int]:
    """A random (x, y) pixel of ``region`` at least ``margin`` px from the image border."""
    s = region.shape[0]
    inner = np.zeros_like(region)
    inner[margin : s - margin, margin : s - margin] = region[margin : s - margin, margin : s - margin]
    ys, xs = np.nonzero(inner if inner.any() else region)
    k = int(rng.integers(len(xs)))
    return int(xs[k]), int(ys[k])


def _blob(s: int, center: tuple[int, int], radius: float, rng: np.random.Generator) -> np.ndarray:
    """An irregular filled blob (smoothed radial noise polygon), bool (H, W)."""
    n = 24
    angles = np.linspace(0, 2 * math.pi, n, endpoint=False) + rng.uniform(0, 2 * math.pi)
    wobble = rng.normal(0.0, 0.25, size=n)
    wobble = (wobble + np.roll(wobble, 1) + np.roll(wobble, -1)) / 3  # smooth the outline
    stretch = rng.uniform(0.6, 1.0)  # elongation
    radii = radius * np.clip(1.0 + wobble, 0.45, 1.6)
    pts = np.stack([radii * np.cos(angles), stretch * radii * np.sin(angles)], axis=1)
    rot = rng.uniform(0, math.pi)
    rmat = np.array([[math.cos(rot), -math.sin(rot)], [math.sin(rot), math.cos(rot)]])
    pts = pts @ rmat.T + np.array(center)
    out = np.zeros((s, s), dtype=np.uint8)
    cv2.fillPoly(out, [np.round(pts).astype(np.int32)], 1)
    return out.astype(bool)


def _scratch_mask(s: int, region: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    x0, y0 = _pick_point(region, rng, margin=s // 10)
    length = s * rng.uniform(0.18, 0.40)
    theta = rng.uniform(0, 2 * math.pi)
    p0 = np.array([x0, y0], dtype=np.float64)
    p2 = p0 + length * np.array([math.cos(theta), math.sin(theta)])
    bend = rng.uniform(-0.35, 0.35) * length
    p1 = (p0 + p2) / 2 + bend * np.array([-math.sin(theta), math.cos(theta)])
    t = np.linspace(0.0, 1.0, 40)[:, None]
    curve = (1 - t) ** 2 * p0 + 2 * (1 - t) * t * p1 + t**2 * p2  # quadratic Bezier
    width = max(1, round(s * rng.uniform(0.005, 0.012)))
    out = np.zeros((s, s), dtype=np.uint8)
    cv2.polylines(out, [np.round(curve).astype(np.int32)], False, 1, thickness=width, lineType=cv2.LINE_8)
    return out.astype(bool) & region


def _hole_mask(s: int, region: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    center = _pick_point(region, rng, margin=s // 8)
    return _blob(s, center, s * rng.uniform(0.03, 0.08), rng) & region


def _stain_mask(s: int, region: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    center = _pick_point(region, rng, margin=s // 8)
    return _blob(s, center, s * rng.uniform(0.05, 0.12), rng) & region


def _missing_part_mask(s: int, region: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    if region.all():  # texture: a cut-out anywhere
        center = _pick_point(region, rng, margin=s // 8)
        return _blob(s, center, s * rng.uniform(0.05, 0.10), rng)
    # object: a bite centred on the object's outline, so a chunk of the edge is gone
    outline = region & ~cv2.erode(region.astype(np.uint8), np.ones((3, 3), np.uint8)).astype(bool)
    center = _pick_point(outline, rng, margin=s // 8)
    return _blob(s, center, s * rng.uniform(0.07, 0.13), rng) & region


_DEFECT_MASKS = {
    "scratch": _scratch_mask,
    "hole": _hole_mask,
    "stain": _stain_mask,
    "missing_part": _missing_part_mask,
}


def _paint_defect(
    image: np.ndarray,
    mask: np.ndarray,
    defect: str,
    background: np.ndarray | None,
    rng: np.random.Generator,
) -> np.ndarray:
    """Paint ``defect`` on ``image`` (float32 (H,W,3)) through ``mask`` (bool (H,W))."""
    out = image.copy()
    m = mask[..., None]
    if defect == "scratch":
        # bright or dark, whichever contrasts more with what it crosses
        local = float(image[mask].mean()) if mask.any() else 128.0
        value = 20.0 if local > 128 else 245.0
        out = np.where(m, value, out)
    elif defect == "hole":
        s = image.shape[0]
        depth = 12.0 + _smooth_noise(s, rng, scale=s / 16, amplitude=4.0)[..., None]
        out = np.where(m, depth, out)
    elif defect == "stain":
        # one of the two palette colours that contrast most with the stained surface, in colour
        # and in luminance (so the stain also shows on grayscale categories)
        local = image[mask].mean(axis=0) if mask.any() else image.reshape(-1, 3).mean(axis=0)
        luma = np.array([0.299, 0.587, 0.114], dtype=np.float32)
        contrast = np.linalg.norm(_STAIN_COLORS - local, axis=1) + 2 * np.abs((_STAIN_COLORS - local) @ luma)
        color = _STAIN_COLORS[np.argsort(-contrast)[int(rng.integers(2))]]
        alpha = rng.uniform(0.7, 0.85)
        out = np.where(m, (1 - alpha) * image + alpha * color, out)
    elif defect == "missing_part":
        if background is None:  # texture: a flat cut-out showing a bright backing (holes are dark)
            fill = np.full_like(image, 235.0 if float(image.mean()) < 170 else 60.0)
        else:
            fill = background
        out = np.where(m, fill, out)
    return out.astype(np.float32)


# --------------------------------------------------------------------------------------------
# The on-disk generator
# --------------------------------------------------------------------------------------------
#: Mask value per defect in the VisA layout: non-binary, like real VisA masks (1, 38, ...).
VISA_MASK_VALUES: dict[str, int] = {"scratch": 1, "hole": 38, "stain": 2, "missing_part": 4}
_SPLIT_CODES = {"train_good": 0, "test_good": 1, "test_anomalous": 2}
LAYOUTS: tuple[str, ...] = ("mvtec", "visa")


def sample_rng(seed: int, category: str, part: str, index: int) -> np.random.Generator:
    """The random source of one generated image: a function of (seed, category, part, index) only.

    Args:
        seed: the generator seed.
        category: one of :data:`SYNTH_CATEGORIES`.
        part: ``"train_good"``, ``"test_good"`` or ``"test_anomalous"``.
        index: position within the part.
    """
    key = [int(seed), SYNTH_CATEGORIES.index(category), _SPLIT_CODES[part], int(index)]
    return np.random.default_rng(np.random.SeedSequence(key))


def _prepare_layout_dir(path: Path, *, overwrite: bool) -> None:
    if path.exists() and any(path.iterdir()):
        if not overwrite:
            raise DatasetError(
                f"{path} already exists and is not empty: pick another --root, delete it, "
                "or pass overwrite=True (--overwrite) to replace it"
            )
        shutil.rmtree(path)
    path.mkdir(parents=True, exist_ok=True)


def _save_png(array: np.ndarray, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path, format="PNG")


def _save_jpg(array: np.ndarray, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path, format="JPEG", quality=95)


def generate_synthetic(
    root: str | os.PathLike[str],
    *,
    layouts: Sequence[str] = LAYOUTS,
    categories: Sequence[str] | None = None,
    image_size: int = 256,
    num_train_good: int = 4,
    num_test_good: int = 4,
    num_test_anomalous: int = 8,
    seed: int = 0,
    progress: bool = True,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Write a synthetic dataset in the MVTec-AD and/or VisA layout (see the module doc).

    Deterministic: the same arguments give byte-identical files. Each image draws from its own
    random source (:func:`sample_rng`), so an image does not depend on which other categories or
    layouts are generated. Anomalous image ``i`` has defect ``DEFECT_TYPES[i % 4]``; both
    layouts hold the same images (VisA's are JPEG-compressed) and the same masks.

    Args:
        root: output folder; the layouts go to ``root/mvtec`` and ``root/visa``.
        layouts: which layouts to write (``"mvtec"``, ``"visa"``).
        categories: subset of :data:`SYNTH_CATEGORIES`; None means all six.
        image_size: side of the square images in pixels.
        num_train_good: normal images per category in the train split.
        num_test_good: normal images per category in the test split.
        num_test_anomalous: anomalous images per category in the test split.
        seed: the seed everything derives from.
        progress: show a tqdm progress bar.
        overwrite: replace existing non-empty layout folders instead of refusing.

    Returns:
        ``{"root": Path, "layouts": {layout: Path}, "categories": [str], "counts": {category:
        {"train_good": n, "test_good": n, "test_anomalous": n}}, "num_files": int}``.

    Raises:
        DatasetError: a layout folder exists and is not empty (without ``overwrite``).
        ValueError: unknown layout or category, negative counts.
    """
    unknown = [x for x in layouts if x not in LAYOUTS]
    if unknown or not layouts:
        raise ValueError(f"unknown layout(s) {unknown or list(layouts)}; choose from {', '.join(LAYOUTS)}")
    chosen = list(SYNTH_CATEGORIES if categories is None else dict.fromkeys(categories))
    bad = [c for c in chosen if c not in SYNTH_CATEGORIES]
    if bad:
        raise ValueError(f"unknown synthetic category {bad[0]!r}; available: {', '.join(SYNTH_CATEGORIES)}")
    if min(num_train_good, num_test_good, num_test_anomalous) < 0:
        raise ValueError("image counts must be >= 0")

    base = Path(os.path.expanduser(os.fspath(root)))
    dirs = {layout: base / layout for layout in dict.fromkeys(layouts)}
    for path in dirs.values():
        if path.exists() and any(path.iterdir()) and not overwrite:
            _prepare_layout_dir(path, overwrite=False)  # raises before anything is written
    for path in dirs.values():
        _prepare_layout_dir(path, overwrite=overwrite)

    parts = (("train_good", num_train_good), ("test_good", num_test_good), ("test_anomalous", num_test_anomalous))
    total = len(chosen) * (num_train_good + num_test_good + num_test_anomalous)
    csv_rows: list[list[str]] = []
    num_files = 0
    with tqdm(total=total, desc="synthetic data", unit="img", disable=not progress) as bar:
        for category in chosen:
            gray = category in GRAYSCALE_CATEGORIES
            defect_counter: dict[str, int] = {}
            normal_counter = 0
            for part, count in parts:
                for index in range(count):
                    defect = DEFECT_TYPES[index % len(DEFECT_TYPES)] if part == "test_anomalous" else None
                    image, mask = render_sample(
                        category, defect, rng=sample_rng(seed, category, part, index), image_size=image_size
                    )
                    if "mvtec" in dirs:
                        cat_dir = dirs["mvtec"] / category
                        stored = image[..., 0] if gray else image  # (H, W) for grayscale categories
                        if defect is None:
                            split = "train" if part == "train_good" else "test"
                            _save_png(stored, cat_dir / split / "good" / f"{index:03d}.png")
                            num_files += 1
                        else:
                            k = defect_counter.get(defect, 0)
                            _save_png(stored, cat_dir / "test" / defect / f"{k:03d}.png")
                            mask_path = cat_dir / "ground_truth" / defect / f"{k:03d}_mask.png"
                            _save_png(mask.astype(np.uint8) * 255, mask_path)
                            num_files += 2
                    if "visa" in dirs:
                        split = "train" if part == "train_good" else "test"
                        if defect is None:
                            rel = f"{category}/Data/Images/Normal/{normal_counter:04d}.JPG"
                            _save_jpg(image, dirs["visa"] / rel)
                            csv_rows.append([category, split, "normal", rel, "", ""])
                            num_files += 1
                        else:
                            rel = f"{category}/Data/Images/Anomaly/{index:03d}.JPG"
                            rel_mask = f"{category}/Data/Masks/Anomaly/{index:03d}.png"
                            _save_jpg(image, dirs["visa"] / rel)
                            _save_png(mask.astype(np.uint8) * VISA_MASK_VALUES[defect], dirs["visa"] / rel_mask)
                            csv_rows.append([category, split, "anomaly", rel, rel_mask, defect])
                            num_files += 2
                    if defect is None:
                        normal_counter += 1
                    else:
                        defect_counter[defect] = defect_counter.get(defect, 0) + 1
                    bar.update(1)
    if "visa" in dirs:
        split_csv = dirs["visa"] / "split_csv" / "1cls.csv"
        split_csv.parent.mkdir(parents=True, exist_ok=True)
        with split_csv.open("w", newline="", encoding="utf-8") as handle:
            writer = csv.writer(handle, lineterminator="\n")
            writer.writerow(["object", "split", "label", "image", "mask", "defect"])
            writer.writerows(csv_rows)
        num_files += 1
    counts = {c: {part: n for part, n in parts} for c in chosen}
    return {"root": base, "layouts": dirs, "categories": chosen, "counts": counts, "num_files": num_files}


# --------------------------------------------------------------------------------------------
# Every other dataset format: small synthetic layouts written by each format's own writer
# --------------------------------------------------------------------------------------------
_PARTS = ("train_good", "test_good", "test_anomalous")


@dataclass(frozen=True)
class SynthItem:
    """One rendered image of a synthetic layout.

    Attributes:
        index: position within its part (0-based).
        defect: defect type, or None for a normal image.
        image: uint8 (H, W, 3) RGB.
        mask: bool (H, W), True on defect pixels (all False for normal images).
    """

    index: int
    defect: str | None
    image: np.ndarray
    mask: np.ndarray


@dataclass(frozen=True)
class SynthSource:
    """What a format's synthetic writer draws from: rendered images, deterministic per seed.

    A writer maps the format's first ``num_categories`` official category names onto synthetic
    categories (:meth:`categories`) and asks for the images of each part (:meth:`items`).
    Image ``i`` of a part is the same for every format (:func:`sample_rng`), so two layouts of
    the same seed hold the same pictures.

    Attributes:
        seed: the seed everything derives from.
        image_size: side of the square images.
        num_train_good: normal images per category in ``train_good``.
        num_test_good: normal images per category in ``test_good``.
        num_test_anomalous: anomalous images per category in ``test_anomalous`` (defect ``i % 4``).
        num_categories: how many of the format's official categories are written.
    """

    seed: int = 0
    image_size: int = 64
    num_train_good: int = 1
    num_test_good: int = 1
    num_test_anomalous: int = 1
    num_categories: int = 2

    def categories(self, official: Sequence[str]) -> list[tuple[str, str]]:
        """``(official name, synthetic category)`` pairs for the first ``num_categories`` names."""
        names = list(official)[: max(1, self.num_categories)]
        return [(name, SYNTH_CATEGORIES[i % len(SYNTH_CATEGORIES)]) for i, name in enumerate(names)]

    def count(self, part: str) -> int:
        """Number of images in ``part`` (``train_good``, ``test_good``, ``test_anomalous``)."""
        return {"train_good": self.num_train_good, "test_good": self.num_test_good, "test_anomalous": self.num_test_anomalous}[part]

    def items(self, synth_category: str, part: str) -> list[SynthItem]:
        """The rendered images of one part of one synthetic category."""
        out = []
        for index in range(self.count(part)):
            defect = DEFECT_TYPES[index % len(DEFECT_TYPES)] if part == "test_anomalous" else None
            image, mask = render_sample(
                synth_category, defect, rng=sample_rng(self.seed, synth_category, part, index), image_size=self.image_size
            )
            out.append(SynthItem(index, defect, image, mask))
        return out


def generate_formats(
    root: str | os.PathLike[str],
    formats: Sequence[str],
    *,
    source: SynthSource | None = None,
    overwrite: bool = False,
) -> dict[str, Path]:
    """Write a small synthetic layout of each format in ``formats`` into ``root/<format>``.

    ``mvtec`` and ``visa`` use :func:`generate_synthetic`'s writer; every other format its own
    writer (``DatasetFormat.synth`` in :mod:`clipsam.data.formats`). The layouts are read back
    by the formats' parsers (tests/unit/data/test_formats.py).

    Args:
        root: output folder.
        formats: format keys (see ``clipsam.data.formats.FORMATS``; ``folder`` has no writer).
        source: image counts, size, seed and number of categories; default :class:`SynthSource`.
        overwrite: replace existing non-empty format folders instead of refusing.

    Returns:
        ``{format: folder}``; use the folder as ``data.*.root``.

    Raises:
        DatasetError: a format folder exists and is not empty (without ``overwrite``).
        ValueError: unknown format, or one without a synthetic writer.
    """
    from clipsam.data.formats import FORMATS

    src = source or SynthSource()
    base = Path(os.path.expanduser(os.fspath(root)))
    chosen = list(dict.fromkeys(formats))
    for key in chosen:
        if key not in FORMATS:
            raise ValueError(f"unknown format {key!r}; available: {', '.join(FORMATS)}")
        if FORMATS[key].synth is None and key not in LAYOUTS:
            raise ValueError(f"format {key!r} has no synthetic writer")
    for key in chosen:  # refuse before anything is written
        path = base / key
        if path.exists() and any(path.iterdir()) and not overwrite:
            _prepare_layout_dir(path, overwrite=False)
    out: dict[str, Path] = {}
    for key in chosen:
        if key in LAYOUTS:
            cats = [c for _, c in src.categories(SYNTH_CATEGORIES)]
            generate_synthetic(
                base, layouts=[key], categories=cats, image_size=src.image_size, num_train_good=src.num_train_good,
                num_test_good=src.num_test_good, num_test_anomalous=src.num_test_anomalous, seed=src.seed,
                progress=False, overwrite=overwrite,
            )
        else:
            _prepare_layout_dir(base / key, overwrite=overwrite)
            FORMATS[key].synth(base / key, src)
        out[key] = base / key
    return out
