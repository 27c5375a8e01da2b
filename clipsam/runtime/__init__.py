"""``clipsam.runtime``: run an ONNX bundle with onnxruntime + numpy + Pillow only (no torch).

A line PC installs ``pip install 'clipsam[runtime]'`` (no torch, no Lightning) and runs what
``clipsam export --format onnx`` wrote::

    from clipsam.runtime import Runtime

    rt = Runtime.from_bundle("exports/capsule_onnx")
    result = rt.segment("part_0042.png", category="capsule")
    result.mask, result.label, result.image_score, result.anomaly_map, result.scores

The same public shape as :class:`clipsam.Segmenter` (``segment`` / ``segment_batch`` and a
result with the same fields). The computation is the PyTorch path's: the producer graph for
Map_a, SAM's encoder and decoder graphs, and PPG + CPS (or MMR), the fusion, the thresholds and
the resize to the original in numpy (:mod:`clipsam.runtime.refine`, :mod:`clipsam.runtime.ops`).
``tests/integration/test_runtime.py`` pins the agreement with the PyTorch path.

Execution providers: onnxruntime's (``providers=["CUDAExecutionProvider", "CPUExecutionProvider"]``
with ``onnxruntime-gpu``); default CPU.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from clipsam.errors import ConfigError, WeightsError
from clipsam.results import SegmentResult, lookup
from clipsam.runtime import ops, refine

__all__ = ["ONNX_BUNDLE_FORMAT", "Runtime", "RuntimeResult", "SegmentResult", "is_onnx_bundle"]

ONNX_BUNDLE_FORMAT = "clipsam-onnx-bundle"
SUPPORTED_VERSION = 1


RuntimeResult = SegmentResult
"""What :meth:`Runtime.segment` returns for one image: :class:`clipsam.results.SegmentResult`
(the same class as ``clipsam.SegmentResult``)."""


def is_onnx_bundle(path: str | os.PathLike[str]) -> bool:
    """True when ``path`` is a folder with an ONNX bundle's ``bundle.json``."""
    manifest = Path(path) / "bundle.json"
    try:
        return json.loads(manifest.read_text()).get("format") == ONNX_BUNDLE_FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class Runtime:
    """An exported ONNX bundle, ready to segment images (see the module docstring).

    Args:
        folder: the bundle folder; manifest: its ``bundle.json``; sessions: onnxruntime sessions
            by graph name; thresholds: the loaded ``thresholds.json`` or None; category: default
            category; color_order: channel order of numpy arrays (``"rgb"`` or ``"bgr"``).
    """

    def __init__(
        self,
        folder: Path,
        manifest: dict[str, Any],
        sessions: dict[str, Any],
        thresholds: dict[str, Any] | None,
        *,
        category: str | None = None,
        color_order: str = "rgb",
        bit_depth: int | None = None,
    ) -> None:
        self.folder = folder
        self.manifest = manifest
        self.sessions = sessions
        self.thresholds = thresholds
        self.category = category
        self.color_order = color_order
        self.bit_depth = bit_depth
        self.texts = {
            name: np.load(folder / entry["text"]) for name, entry in manifest["categories"].items() if entry.get("text")
        }
        self._inputs = {name: {i.name for i in s.get_inputs()} for name, s in sessions.items()}

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_bundle(
        cls,
        path: str | os.PathLike[str],
        *,
        providers: Sequence[str] | None = None,
        category: str | None = None,
        color_order: str | None = None,
        bit_depth: int | None = None,
        verify: bool = True,
    ) -> Runtime:
        """Load a bundle written by ``clipsam export --format onnx``.

        Args:
            path: the bundle folder.
            providers: onnxruntime execution providers (default: CPU).
            category: default category of images given as arrays (else a file's parent folder
                name when the bundle has it, else the bundle's only category).
            color_order: ``"rgb"`` or ``"bgr"`` for numpy arrays (files are always RGB); None: the
                exported config's ``data.color_order``.
            bit_depth: significant bits of 16-bit files / uint16 arrays; None: the exported
                config's ``data.bit_depth`` (else the file's, 16).
            verify: check each file's sha256 against ``bundle.json``.

        Raises:
            ConfigError: not an ONNX bundle, a newer format, onnxruntime missing.
            WeightsError: a file missing or changed since export (named).
        """
        folder = Path(path)
        manifest_path = folder / "bundle.json"
        if not manifest_path.is_file():
            raise ConfigError(f"{folder} is not an ONNX bundle (no bundle.json): write one with `clipsam export --format onnx --output {folder}`")
        try:
            manifest = json.loads(manifest_path.read_text())
        except ValueError as err:
            raise ConfigError(f"{manifest_path} is not valid JSON ({err}): export the bundle again") from None
        if not isinstance(manifest, dict) or manifest.get("format") != ONNX_BUNDLE_FORMAT:
            kind = manifest.get("format") if isinstance(manifest, dict) else None
            raise ConfigError(
                f"{folder} is not an ONNX bundle (bundle.json format {kind!r}): a PyTorch bundle loads with "
                "clipsam.Segmenter.from_bundle; export ONNX with `clipsam export --format onnx`"
            )
        if int(manifest.get("version", 0)) > SUPPORTED_VERSION:
            raise ConfigError(f"{manifest_path}: bundle version {manifest.get('version')} is newer than this clipsam reads ({SUPPORTED_VERSION}): upgrade clipsam")
        if verify:
            for name, digest in (manifest.get("files") or {}).items():
                file = folder / name
                if not file.is_file():
                    raise WeightsError(f"{file} is missing from the bundle: export it again")
                if _sha256(file) != digest:
                    raise WeightsError(f"{file} changed since export (sha256 differs from bundle.json): export the bundle again")
        try:
            import onnxruntime as ort
        except ImportError:
            raise ConfigError("clipsam.runtime needs onnxruntime: pip install 'clipsam[runtime]'") from None
        options = ort.SessionOptions()
        options.log_severity_level = 3
        chosen = list(providers) if providers else ["CPUExecutionProvider"]
        sessions = {
            file.stem: ort.InferenceSession(str(file), sess_options=options, providers=chosen)
            for file in sorted(folder.glob("*.onnx"))
        }
        thresholds = None
        if manifest.get("thresholds"):
            thresholds = json.loads((folder / manifest["thresholds"]).read_text())
        from clipsam.data.samples import check_bit_depth, check_color_order

        inputs = manifest.get("inputs") or {}
        color_order = check_color_order(color_order if color_order is not None else inputs.get("color_order") or "rgb", key="color_order")
        bit_depth = check_bit_depth(bit_depth if bit_depth is not None else inputs.get("bit_depth"), key="bit_depth")
        return cls(folder, manifest, sessions, thresholds, category=category, color_order=color_order, bit_depth=bit_depth)

    @property
    def info(self) -> dict[str, Any]:
        """The bundle's metadata (``bundle.json``)."""
        return self.manifest

    @property
    def categories(self) -> list[str]:
        """The categories the bundle carries text features (and object names) for."""
        return list(self.manifest["categories"])

    # ------------------------------------------------------------------ inputs
    def _decode(self, image: Any) -> tuple[np.ndarray, str | None]:
        from clipsam.data.samples import array_to_rgb, read_image

        if isinstance(image, (str, os.PathLike)):
            return read_image(os.fspath(image), bit_depth=self.bit_depth), os.fspath(image)
        if isinstance(image, np.ndarray):
            return array_to_rgb(image, color_order=self.color_order, bit_depth=self.bit_depth), None
        from PIL import Image, ImageOps

        if isinstance(image, Image.Image):
            return np.asarray(ImageOps.exif_transpose(image).convert("RGB"), dtype=np.uint8), None
        raise TypeError(f"segment() takes a path, a numpy array or a PIL image, got {type(image).__name__}")

    def _category(self, given: str | None, path: str | None) -> str:
        known = self.manifest["categories"]
        text_free = not self.manifest.get("text_input")
        for candidate in (given, self.category):
            if candidate is not None:
                if candidate not in known and not text_free:
                    raise ConfigError(
                        f"category {candidate!r} is not in this bundle ({', '.join(known)}): export it with "
                        f"`clipsam export --format onnx --category {candidate} ...`"
                    )
                return candidate
        if path is not None and Path(path).parent.name in known:
            return Path(path).parent.name
        if len(known) == 1 or text_free:
            return next(iter(known))
        raise ConfigError(f"which category is this image? pass category= (this bundle has {', '.join(known)})")

    def _producer_input(self, image: np.ndarray) -> np.ndarray:
        spec = self.manifest["inputs"]["producer"]
        mean, std = self.manifest["inputs"]["clip_mean"], self.manifest["inputs"]["clip_std"]
        size = int(spec["size"])
        if spec["resize"] == "torch_bicubic":
            return ops.normalize_unit(ops.antialiased_bicubic(image, size), mean, std)
        if spec["resize"] != "pil_bicubic":
            raise ConfigError(f"bundle.json: producer input resize {spec['resize']!r} is not supported by this runtime")
        return ops.normalize(ops.pil_resize(image, size, size), mean, std, spec.get("normalize_formula", "clipsam"))

    def _run(self, name: str, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        wanted = self._inputs[name]
        return self.sessions[name].run(None, {k: v for k, v in feeds.items() if k in wanted})

    def _decoder(self, embedding: np.ndarray, coords: np.ndarray, labels: np.ndarray, mask_input: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
        low = self.manifest["inputs"]["sam"]["mask_input_size"]
        feeds = {
            "embeddings": embedding[None].astype(np.float32),
            "point_coords": coords[None].astype(np.float32),
            "point_labels": labels[None].astype(np.float32),
            "mask_input": (mask_input if mask_input is not None else np.zeros((1, *low), dtype=np.float32))[None].astype(np.float32),
            "has_mask_input": np.asarray([0.0 if mask_input is None else 1.0], dtype=np.float32),
        }
        masks, iou = self._run("sam_decoder", feeds)
        return masks[0], iou[0]

    # ------------------------------------------------------------------ inference
    def segment_batch(self, images: Sequence[Any], *, category: str | Sequence[str] | None = None) -> list[RuntimeResult]:
        """Segment several images in one batch through each graph; see :meth:`segment`.

        Args:
            images: paths, numpy arrays or PIL images.
            category: one category for all, one per image, or None (see :meth:`segment`).
        """
        items = list(images)
        if not items:
            return []
        categories = [category] * len(items) if category is None or isinstance(category, str) else list(category)
        if len(categories) != len(items):
            raise ValueError(f"got {len(categories)} categories for {len(items)} images")
        decoded = [self._decode(image) for image in items]
        cats = [self._category(c, path) for c, (_, path) in zip(categories, decoded)]
        manifest = self.manifest
        feeds = {"images": np.stack([self._producer_input(array) for array, _ in decoded])}
        if manifest.get("text_input"):
            feeds["text"] = np.stack([self.texts[c] for c in cats]).astype(np.float32)
        if manifest["inputs"].get("producer_batch") == 1:  # a graph exported for one image at a time
            parts = [self._run("producer", {k: v[i : i + 1] for k, v in feeds.items()}) for i in range(len(items))]
            anomaly_maps = np.concatenate([p[0] for p in parts])
            producer_scores = np.concatenate([p[1] for p in parts])
        else:
            anomaly_maps, producer_scores = self._run("producer", feeds)
        refiner = manifest["refiner"]
        evaluation = manifest["evaluation"]
        if refiner == "none":
            scores_all = anomaly_maps.astype(np.float32)
            masks = scores_all >= np.float32(evaluation["mask_threshold"])
            image_scores = producer_scores.astype(np.float32)
        else:
            sam = manifest["inputs"]["sam"]
            side = int(sam["side"])
            built = [ops.sam_input(array, side) for array, _ in decoded]
            (embeddings,) = self._run(
                "sam_encoder", {"sam_image": np.stack([b[0] for b in built]), "sam_size": np.stack([b[1] for b in built])}
            )
            run = refine.mmr if manifest["prompt"]["kind"] == "mmr" else refine.ppg_cps
            masks_list, scores_list = [], []
            for i, (array, _) in enumerate(decoded):
                size = (int(built[i][1][0]), int(built[i][1][1]))
                mask, probs = run(
                    self._decoder, embeddings[i], anomaly_maps[i].astype(np.float32),
                    input_size=size, original=array.shape[:2], side=side, info=manifest["prompt"],
                )
                masks_list.append(mask)
                scores_list.append(refine.fuse_scores(anomaly_maps[i], probs, mask, evaluation["fusion"]))
            masks = np.stack(masks_list)
            scores_all = np.stack(scores_list)
            (image_scores,) = self._run("image_score", {"producer_scores": producer_scores.astype(np.float32), "scores": scores_all})
        results = []
        for i, ((array, path), cat) in enumerate(zip(decoded, cats)):
            image_t, scope = lookup(self.thresholds, "image", cat, evaluation["default_image_threshold"])
            pixel_t, _ = lookup(self.thresholds, "pixel", cat, evaluation["default_pixel_threshold"])
            frame_mask = masks[i]
            if evaluation["mask_source"] == "score" or refiner == "none":
                frame_mask = scores_all[i] >= np.float32(pixel_t)
            height, width = array.shape[:2]
            entry = manifest["categories"].get(cat) or {}
            results.append(
                SegmentResult(
                    mask=ops.cv2_nearest_resize(frame_mask.astype(np.uint8), height, width) > 0,
                    scores=ops.cv2_linear_resize(scores_all[i], height, width),
                    anomaly_map=ops.cv2_linear_resize(anomaly_maps[i].astype(np.float32), height, width),
                    image_score=float(image_scores[i]),
                    label=bool(np.float32(image_scores[i]) >= np.float32(image_t)),
                    image_threshold=image_t,
                    pixel_threshold=pixel_t,
                    threshold_scope=scope,
                    category=cat,
                    object_name=entry.get("object_name", cat),
                    path=path,
                )
            )
        return results

    def segment(self, image: Any, *, category: str | None = None) -> RuntimeResult:
        """Segment one image.

        Args:
            image: a file path, a numpy array (uint8 (H, W, 3) in ``color_order``, (H, W) gray,
                (H, W, 4), uint16 by ``bit_depth``, float in [0, 1]) or a PIL image.
            category: the category (text prompts, thresholds); default: the runtime's, else a
                file's parent folder name when the bundle has it, else the bundle's only one.
        """
        return self.segment_batch([image], category=category)[0]

    def warmup(self) -> None:
        """Run one blank image through every graph (the first call allocates)."""
        size = int(self.manifest["inputs"]["frame"]["size"])
        self.segment(np.zeros((size, size, 3), dtype=np.uint8), category=self.category or self.categories[0])
