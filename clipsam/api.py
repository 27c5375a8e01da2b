"""The Python API: ``from clipsam import Segmenter``.

A :class:`Segmenter` holds one trained model (the CLIP adapters of a ``clipsam fit`` checkpoint,
or an exported bundle) with its frozen CLIP and SAM, and segments images in memory::

    from clipsam import Segmenter

    seg = Segmenter.from_checkpoint("runs/demo/version_0/checkpoints/last.ckpt",
                                    config="configs/demo.yaml",
                                    thresholds="runs/demo/version_1/thresholds.json")
    result = seg.segment("part_0042.png", category="capsule")
    result.mask          # (H0, W0) bool, at the image's size and orientation
    result.scores        # (H0, W0) float32 fused pixel scores in [0, 1]
    result.anomaly_map   # (H0, W0) float32 CLIP map Map_a in [0, 1]
    result.image_score, result.label

    seg = Segmenter.from_bundle("exports/capsule")   # written by `clipsam export --format bundle`

    # a training-free method needs no checkpoint: configs stack as --config stacks them
    seg = Segmenter.from_config(["configs/demo.yaml", "configs/methods/demo/winclip.yaml"])

    # a few-shot method (WinCLIP+: model.method_config.k_shot = k) needs k good images per category
    seg = Segmenter.from_config(["configs/mvtec.yaml", "configs/methods/winclip_plus_mvtec.yaml"],
                                references={"pcb1": ["good_0001.JPG"]})
    seg.set_references("candle", [np.asarray(good_image)])   # add or replace a category's
    seg.references   # {"candle": ["<array 0>"], "pcb1": ["good_0001.JPG"]}

It runs the same :class:`clipsam.pipeline.Pipeline` as ``clipsam test`` and ``clipsam predict``
(its inputs built from the original image by :meth:`~clipsam.pipeline.Pipeline.make_batch`, then
:meth:`~clipsam.pipeline.Pipeline.forward` and :meth:`~clipsam.pipeline.Pipeline.decide`) and the
resize of :func:`clipsam.postprocess.to_original_size`, so its masks and scores are those of
``clipsam predict`` with the same config, checkpoint and thresholds. It writes no files (the SAM
embedding cache is off) and needs no Trainer.

Dimension symbols: H x W the frame (``data.image_size``), H0 x W0 the image.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Union

import numpy as np
import torch

from clipsam.errors import ConfigError
from clipsam.results import SegmentResult
from clipsam.loading import (
    apply_overrides,
    build_module,
    load_checkpoint,
    load_config,
    quiet,
    read_bundle,
    set_dotted,
)

__all__ = ["ImageInput", "SegmentResult", "Segmenter", "load_config"]  # load_config: clipsam.loading

ImageInput = Union[str, os.PathLike, np.ndarray, "PIL.Image.Image"]  # noqa: F821


# ---------------------------------------------------------------------------------- config
def _resolve_device(device: str | torch.device | None) -> torch.device:
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device={device!r} but CUDA is not available: use device='cpu'")
    return dev


# ---------------------------------------------------------------------------------- segmenter
class Segmenter:
    """Segment images with a clipsam model, in memory.

    Build one with :meth:`from_config` (config files, plus a ``clipsam fit`` checkpoint for a
    trained method), :meth:`from_checkpoint` (the same, checkpoint first) or :meth:`from_bundle`
    (``clipsam export --format bundle``); :meth:`load` picks by the path.

    Args:
        module: a :class:`~clipsam.module.ClipSamModule` with its models built and adapters loaded.
        device: "cpu", "cuda", "cuda:1" or "auto".
        category: default category (object name source) of images given as arrays or PIL
            images, and of files when set (else a file's parent folder name, as ``predict``).
        batch_size: images per forward in :meth:`segment_batch`.
        color_order: channel order of numpy arrays given to :meth:`segment`: ``"rgb"`` or
            ``"bgr"`` (what OpenCV's ``cv2.imread`` and ``VideoCapture`` give); None: the
            config's ``data.color_order`` (default ``"rgb"``). Files and PIL images are always RGB.
        bit_depth: significant bits of 16-bit files and uint16 arrays (12 for 12-bit cameras);
            None: the config's ``data.bit_depth`` (default: the file's, 16 for uint16 arrays).

    A method that needs good reference images per category (few-shot, e.g. WinCLIP+ with
    ``model.method_config.k_shot``) gets them with ``references=`` of the constructors or
    :meth:`set_references`; segmenting a category without them raises a ``ConfigError``.
    """

    def __init__(
        self,
        module: Any,
        *,
        device: str | torch.device | None = "cpu",
        category: str | None = None,
        batch_size: int = 8,
        color_order: str | None = None,
        bit_depth: int | None = None,
    ) -> None:
        from clipsam.data.samples import check_bit_depth, check_color_order

        self.device = _resolve_device(device)
        self.module = module.to(self.device).eval()
        self.pipeline = module.pipeline
        self.category = category
        self.batch_size = max(1, int(batch_size))
        self.color_order = check_color_order(color_order if color_order is not None else "rgb")
        self.bit_depth = check_bit_depth(bit_depth)

    # ------------------------------------------------------------------ constructors
    @classmethod
    def from_checkpoint(
        cls,
        ckpt_path: str | os.PathLike[str],
        config: str | os.PathLike[str] | Sequence[str | os.PathLike[str]] | Mapping[str, Any],
        *,
        thresholds: str | os.PathLike[str] | None = None,
        overrides: Mapping[str, Any] | None = None,
        device: str | torch.device | None = "cpu",
        category: str | None = None,
        batch_size: int = 8,
        references: Mapping[str, Sequence[ImageInput]] | None = None,
        color_order: str | None = None,
        bit_depth: int | None = None,
    ) -> Segmenter:
        """Load the adapters of ``ckpt_path`` into the model that ``config`` describes.

        Args:
            ckpt_path: a checkpoint written by ``clipsam fit``.
            config: the YAML config(s) (as for ``--config``), or a resolved config mapping.
            thresholds: a ``thresholds.json`` from ``clipsam test`` (overrides
                ``model.evaluation.thresholds``).
            overrides: dotted keys, e.g. ``{"model.evaluation.mask_source": "score"}``.
            device, category, batch_size, color_order, bit_depth: see the class.
            references: see :meth:`from_config`.

        Raises:
            WeightsError: missing/unreadable checkpoint, or adapters that do not fit the config.
            ConfigError: bad config.
        """
        return cls.from_config(
            config,
            ckpt_path,
            thresholds=thresholds,
            overrides=overrides,
            device=device,
            category=category,
            batch_size=batch_size,
            references=references,
            color_order=color_order,
            bit_depth=bit_depth,
        )

    @classmethod
    def from_config(
        cls,
        configs: str | os.PathLike[str] | Sequence[str | os.PathLike[str]] | Mapping[str, Any],
        ckpt_path: str | os.PathLike[str] | None = None,
        *,
        thresholds: str | os.PathLike[str] | None = None,
        overrides: Mapping[str, Any] | None = None,
        device: str | torch.device | None = "cpu",
        category: str | None = None,
        batch_size: int = 8,
        references: Mapping[str, Sequence[ImageInput]] | None = None,
        color_order: str | None = None,
        bit_depth: int | None = None,
    ) -> Segmenter:
        """The model ``configs`` describe; trained weights from ``ckpt_path`` when the method trains.

        Args:
            configs: one YAML path or a list stacked in order (as ``--config`` stacks them), or
                a resolved config mapping.
            ckpt_path: a ``clipsam fit`` checkpoint; required for a trained method (APRIL-GAN,
                AnomalyCLIP, SDP+, UMCI), refused for a training-free one (WinCLIP, SDP, SAA).
            thresholds: a ``thresholds.json`` from ``clipsam test`` (overrides
                ``model.evaluation.thresholds``).
            overrides: dotted keys, e.g. ``{"model.evaluation.mask_source": "score"}``.
            device, category, batch_size, color_order, bit_depth: see the class (None: the
                config's ``data.color_order`` / ``data.bit_depth``).
            references: ``{category: [image, ...]}``, the good reference images of a method that
                needs them (WinCLIP+: exactly ``k_shot`` per category; paths, arrays or PIL
                images as :meth:`segment` takes them); see :meth:`set_references`.

        Raises:
            WeightsError: missing/unreadable checkpoint, or weights that do not fit the config.
            ConfigError: bad config; a checkpoint missing for a trained method or given for a
                training-free one; references for a method that takes none, or not as many as
                it needs.
        """
        resolved = apply_overrides(load_config(configs), overrides)
        if thresholds is not None:
            set_dotted(resolved, "model.evaluation.thresholds", os.fspath(thresholds))
        path = Path(os.fspath(ckpt_path)) if ckpt_path is not None else None
        return cls._from_resolved(
            resolved, path, device=device, category=category, batch_size=batch_size, references=references,
            color_order=color_order, bit_depth=bit_depth,
        )  # fmt: skip

    @classmethod
    def from_bundle(
        cls,
        bundle: str | os.PathLike[str],
        *,
        overrides: Mapping[str, Any] | None = None,
        device: str | torch.device | None = "cpu",
        category: str | None = None,
        batch_size: int = 8,
        references: Mapping[str, Sequence[ImageInput]] | None = None,
        color_order: str | None = None,
        bit_depth: int | None = None,
    ) -> Segmenter:
        """Load a bundle written by ``clipsam export --format bundle`` (see :mod:`clipsam.export`);
        ``references``, ``color_order`` and ``bit_depth`` as for :meth:`from_config` (None: the
        ``data.color_order`` / ``data.bit_depth`` the bundle was exported with)."""
        resolved, weights, default_category = read_bundle(bundle)
        resolved = apply_overrides(resolved, overrides)
        return cls._from_resolved(
            resolved, weights, device=device, category=category or default_category, batch_size=batch_size, references=references,
            color_order=color_order, bit_depth=bit_depth,
        )  # fmt: skip

    @classmethod
    def load(cls, path: str | os.PathLike[str], config: Any = None, **kwargs: Any) -> Segmenter:
        """:meth:`from_bundle` for a folder, :meth:`from_checkpoint` (needs ``config``) for a file."""
        if Path(os.fspath(path)).is_dir():
            return cls.from_bundle(path, **kwargs)
        if config is None:
            raise ConfigError(f"{path} is a checkpoint: pass its config too (Segmenter.load(ckpt, config='configs/x.yaml'))")
        return cls.from_checkpoint(path, config, **kwargs)

    @classmethod
    def _from_resolved(
        cls,
        resolved: dict[str, Any],
        ckpt_path: Path | None,
        *,
        references: Mapping[str, Sequence[ImageInput]] | None = None,
        color_order: str | None = None,
        bit_depth: int | None = None,
        **kwargs: Any,
    ) -> Segmenter:
        from clipsam.data.samples import check_bit_depth, check_color_order

        data = resolved.get("data") or {}
        if "init_args" in data:  # `data: {class_path: ..., init_args: {...}}` form
            data = data.get("init_args") or {}
        # The camera settings first: a bad value fails before any model is built.
        color_order = check_color_order(color_order if color_order is not None else data.get("color_order") or "rgb")
        bit_depth = check_bit_depth(bit_depth if bit_depth is not None else data.get("bit_depth"))
        with quiet():
            module = build_module(resolved)
            if module.needs_checkpoint and ckpt_path is None:
                raise ConfigError(
                    f"model.method={module.method} is trained: pass ckpt_path (a checkpoint written by `clipsam fit`)"
                )
            if not module.needs_checkpoint and ckpt_path is not None:
                raise ConfigError(f"model.method={module.method} is training-free: it takes no checkpoint, drop ckpt_path")
            checkpoint = load_checkpoint(ckpt_path) if ckpt_path is not None else None
            sam_config = getattr(module.refiner_config, "sam", None)
            if sam_config is not None:  # in-memory use: no embedding cache files are written
                sam_config.embedding_cache_dir = None
            module.build_inference_models()
            if checkpoint is not None:
                module.on_load_checkpoint(checkpoint)  # validates the weights against the config, loads them
            module.load_thresholds()  # fail now (not at the first image) on a bad thresholds file
        segmenter = cls(module, color_order=color_order, bit_depth=bit_depth, **kwargs)
        for category, images in (references or {}).items():
            segmenter.set_references(category, images)
        return segmenter

    # ------------------------------------------------------------------ reference images
    @property
    def references(self) -> dict[str, list[str]]:
        """The reference images held, by category: their paths (``<array i>`` / ``<image i>`` for
        in-memory images)."""
        return {c: list(names) for c, names in self.pipeline.reference_names.items()}

    @torch.no_grad()
    def set_references(self, category: str, images: Sequence[ImageInput]) -> None:
        """Give a few-shot method its good reference images of ``category`` (replacing earlier ones).

        They are decoded as :meth:`segment` decodes images and built as ``clipsam test`` builds
        the references it draws (:meth:`clipsam.pipeline.Pipeline.set_references`).

        Args:
            category: the category they are normal images of (as passed to :meth:`segment`).
            images: exactly as many as the method needs (WinCLIP+: ``k_shot``): paths, numpy
                arrays or PIL images.

        Raises:
            ConfigError: the method takes no references, or not that many.
        """
        if isinstance(images, (str, os.PathLike, np.ndarray)) or not isinstance(images, Sequence):
            raise TypeError(f"set_references takes a list of images for category {category!r}, got {type(images).__name__}")
        decoded, names = [], []
        for i, image in enumerate(images):
            array, _, path = self._prepare(image, category)
            decoded.append(array)
            names.append(path or f"<{'array' if isinstance(image, np.ndarray) else 'image'} {i}>")
        with quiet():
            self.pipeline.set_references(category, decoded, names=names)

    # ------------------------------------------------------------------ inference
    def _prepare(self, image: Any, category: str | None) -> tuple[np.ndarray, str, str | None]:
        """Decode an input to uint8 (H0, W0, 3) RGB; pick its category."""
        from PIL import Image, ImageOps

        from clipsam.data.samples import array_to_rgb, read_image

        path = None
        if isinstance(image, (str, os.PathLike)):
            path = os.fspath(image)
            array = read_image(path, bit_depth=self.bit_depth)  # the reader every clipsam dataset uses
            default = Path(path).parent.name
        elif isinstance(image, Image.Image):
            array = np.asarray(ImageOps.exif_transpose(image).convert("RGB"), dtype=np.uint8)
            default = "object"
        elif isinstance(image, np.ndarray):
            # data.color_order: OpenCV hands over BGR; uint16 arrays scale by data.bit_depth.
            array = array_to_rgb(image, color_order=self.color_order, bit_depth=self.bit_depth)
            default = "object"
        else:
            raise TypeError(f"segment() takes a path, a numpy array or a PIL image, got {type(image).__name__}")
        return array, category or self.category or default, path

    @torch.no_grad()
    def segment_batch(self, images: Sequence[ImageInput], *, category: str | None = None) -> list[SegmentResult]:
        """Segment several images (in batches of ``batch_size``); see :meth:`segment`."""
        from clipsam.postprocess import to_original_size

        results: list[SegmentResult] = []
        items = list(images)
        for start in range(0, len(items), self.batch_size):
            chunk = [self._prepare(img, category) for img in items[start : start + self.batch_size]]
            sizes = [array.shape[:2] for array, _, _ in chunk]
            # The frame and every input the method and refiner declared, from the originals.
            batch = self.pipeline.make_batch([a for a, _, _ in chunk], [c for _, c, _ in chunk], paths=[p or "" for _, _, p in chunk])
            batch = {k: v.to(self.device) if isinstance(v, torch.Tensor) and k != "original_size" else v for k, v in batch.items()}
            with quiet():
                out = self.module.decide(batch, self.module.inference(batch))
            for i, (_, cat, path) in enumerate(chunk):
                scores, mask = to_original_size(out["scores"][i], out["mask"][i], sizes[i])
                amap, _ = to_original_size(out["anomaly_map"][i], out["mask"][i], sizes[i])
                results.append(
                    SegmentResult(
                        mask=mask,
                        scores=scores,
                        anomaly_map=amap,
                        image_score=float(out["image_scores"][i]),
                        label=bool(out["labels"][i]),
                        image_threshold=float(out["image_thresholds"][i]),
                        pixel_threshold=float(out["pixel_thresholds"][i]),
                        threshold_scope=out["threshold_scopes"][i],
                        category=cat,
                        object_name=out["object_names"][i],
                        path=path,
                    )
                )
        return results

    def segment(self, image: ImageInput, *, category: str | None = None) -> SegmentResult:
        """Segment one image.

        Args:
            image: a file path, a numpy array (uint8 (H, W, 3) in ``color_order``, (H, W) gray,
                (H, W, 4) with alpha, uint16 scaled by ``bit_depth``, or float in [0, 1]) or a PIL
                image (EXIF orientation applied).
            category: category name for the text prompts and per-category thresholds (default:
                the Segmenter's, else a file's parent folder name, else "object").

        Returns:
            :class:`SegmentResult` at the image's size.
        """
        return self.segment_batch([image], category=category)[0]
