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

It runs the LightningModule's own inference path (:meth:`clipsam.module.ClipSamModule._segment`
then :meth:`~clipsam.module.ClipSamModule.decide`) and the resize of
:func:`clipsam.postprocess.to_original_size`, so its masks and scores are those of
``clipsam predict`` with the same config, checkpoint and thresholds. It writes no files (the SAM
embedding cache is off) and needs no Trainer.

Dimension symbols: H x W the frame (``data.image_size``), H0 x W0 the image.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import warnings
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Union

import numpy as np
import torch

from clipsam.errors import ConfigError, WeightsError

__all__ = ["SegmentResult", "Segmenter", "load_config", "ImageInput"]

ImageInput = Union[str, os.PathLike, np.ndarray, "PIL.Image.Image"]  # noqa: F821


@dataclasses.dataclass
class SegmentResult:
    """What :meth:`Segmenter.segment` returns for one image.

    Attributes:
        mask: (H0, W0) bool, the decided mask (``model.evaluation.mask_source``) at the image's
            size, in the orientation of the image as given (files: display orientation).
        scores: (H0, W0) float32 fused pixel scores in [0, 1] (what the pixel threshold applies to).
        anomaly_map: (H0, W0) float32 CLIP anomaly map Map_a in [0, 1].
        image_score: the image's anomaly score.
        label: True when ``image_score >= image_threshold`` (anomalous).
        image_threshold: the image threshold used.
        pixel_threshold: the pixel threshold used (for the mask when ``mask_source="score"``).
        threshold_scope: where the thresholds came from: the category, "global" or "default"
            (uncalibrated fallback ``model.evaluation.predict_*_threshold``).
        category: the category the image was segmented as.
        object_name: the object name written in the text prompts.
        path: the file, for path inputs; None otherwise.
    """

    mask: np.ndarray
    scores: np.ndarray
    anomaly_map: np.ndarray
    image_score: float
    label: bool
    image_threshold: float
    pixel_threshold: float
    threshold_scope: str
    category: str
    object_name: str
    path: str | None = None


# ---------------------------------------------------------------------------------- config
def load_config(config: str | os.PathLike[str] | Sequence[str | os.PathLike[str]] | Mapping[str, Any]) -> dict[str, Any]:
    """Read one or more clipsam YAML configs (merged left to right, like repeated ``--config``).

    ``${oc.env:VAR,default}`` interpolations resolve as on the command line.

    Returns:
        the resolved config as plain dicts.

    Raises:
        ConfigError: a missing or unreadable file.
    """
    from omegaconf import OmegaConf

    if isinstance(config, Mapping):
        return OmegaConf.to_container(OmegaConf.create(dict(config)), resolve=True)  # type: ignore[return-value]
    files = [config] if isinstance(config, (str, os.PathLike)) else list(config)
    merged = OmegaConf.create({})
    for file in files:
        path = Path(os.path.expanduser(os.fspath(file)))
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist: pass the YAML used with `clipsam fit/test`")
        try:
            merged = OmegaConf.merge(merged, OmegaConf.load(path))
        except Exception as err:  # omegaconf/yaml parse errors
            raise ConfigError(f"cannot read config file {path}: {err}") from err
    return OmegaConf.to_container(merged, resolve=True)  # type: ignore[return-value]


def _set_dotted(config: dict[str, Any], key: str, value: Any) -> None:
    node = config
    parts = key.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value


def build_module(config: Mapping[str, Any]) -> Any:
    """A :class:`~clipsam.module.ClipSamModule` from a resolved config (``model`` + ``data.image_size``)."""
    from clipsam.module import ClipSamModule

    model = dict(config.get("model") or {})
    if "class_path" in model:  # `model: {class_path: ..., init_args: {...}}` form
        model = dict(model.get("init_args") or {})
    image_size = (config.get("data") or {}).get("image_size", model.pop("image_size", 518))
    model.pop("image_size", None)
    tiling = (config.get("data") or {}).get("tiling")
    if tiling is not None:
        model["tiling"] = tiling
    try:
        return ClipSamModule(**model, image_size=int(image_size))
    except TypeError as err:
        raise ConfigError(f"the config's model section does not fit ClipSamModule: {err}") from err


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """No warning flood: library warnings and INFO logs are silenced while models build/run."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(max(level, logging.ERROR))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        root.setLevel(level)


def _resolve_device(device: str | torch.device | None) -> torch.device:
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device={device!r} but CUDA is not available: use device='cpu'")
    return dev


# ---------------------------------------------------------------------------------- segmenter
class Segmenter:
    """Segment images with a trained clipsam model, in memory.

    Build one with :meth:`from_checkpoint` (a ``clipsam fit`` checkpoint plus its config) or
    :meth:`from_bundle` (``clipsam export --format bundle``); :meth:`load` picks by the path.

    Args:
        module: a :class:`~clipsam.module.ClipSamModule` with its models built and adapters loaded.
        device: "cpu", "cuda", "cuda:1" or "auto".
        category: default category (object name source) of images given as arrays or PIL
            images, and of files when set (else a file's parent folder name, as ``predict``).
        batch_size: images per forward in :meth:`segment_batch`.
    """

    def __init__(self, module: Any, *, device: str | torch.device | None = "cpu", category: str | None = None, batch_size: int = 8) -> None:
        from clipsam.data.transforms import build_transform

        self.device = _resolve_device(device)
        self.module = module.to(self.device).eval()
        self.category = category
        self.batch_size = max(1, int(batch_size))
        canvas = module.tiling.canvas()  # tiled inference: images go to the canvas, not the frame
        self.transform = build_transform(canvas if canvas is not None else module.image_size)

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
    ) -> Segmenter:
        """Load the adapters of ``ckpt_path`` into the model that ``config`` describes.

        Args:
            ckpt_path: a checkpoint written by ``clipsam fit``.
            config: the YAML config(s) (as for ``--config``), or a resolved config mapping.
            thresholds: a ``thresholds.json`` from ``clipsam test`` (overrides
                ``model.evaluation.thresholds``).
            overrides: dotted keys, e.g. ``{"model.evaluation.mask_source": "score"}``.
            device, category, batch_size: see the class.

        Raises:
            WeightsError: missing/unreadable checkpoint, or adapters that do not fit the config.
            ConfigError: bad config.
        """
        resolved = load_config(config)
        for key, value in (overrides or {}).items():
            _set_dotted(resolved, key, value)
        if thresholds is not None:
            _set_dotted(resolved, "model.evaluation.thresholds", os.fspath(thresholds))
        return cls._from_resolved(resolved, Path(os.fspath(ckpt_path)), device=device, category=category, batch_size=batch_size)

    @classmethod
    def from_bundle(
        cls,
        bundle: str | os.PathLike[str],
        *,
        overrides: Mapping[str, Any] | None = None,
        device: str | torch.device | None = "cpu",
        category: str | None = None,
        batch_size: int = 8,
    ) -> Segmenter:
        """Load a bundle written by ``clipsam export --format bundle`` (see :mod:`clipsam.export`)."""
        from clipsam.export import read_bundle

        resolved, weights, default_category = read_bundle(bundle)
        for key, value in (overrides or {}).items():
            _set_dotted(resolved, key, value)
        return cls._from_resolved(resolved, weights, device=device, category=category or default_category, batch_size=batch_size)

    @classmethod
    def load(cls, path: str | os.PathLike[str], config: Any = None, **kwargs: Any) -> Segmenter:
        """:meth:`from_bundle` for a folder, :meth:`from_checkpoint` (needs ``config``) for a file."""
        if Path(os.fspath(path)).is_dir():
            return cls.from_bundle(path, **kwargs)
        if config is None:
            raise ConfigError(f"{path} is a checkpoint: pass its config too (Segmenter.load(ckpt, config='configs/x.yaml'))")
        return cls.from_checkpoint(path, config, **kwargs)

    @classmethod
    def _from_resolved(cls, resolved: dict[str, Any], ckpt_path: Path, **kwargs: Any) -> Segmenter:
        # In-memory use: no embedding cache files are written.
        _set_dotted(resolved, "model.sam.embedding_cache_dir", None)
        checkpoint = _load_checkpoint(ckpt_path)
        with _quiet():
            module = build_module(resolved)
            module.build_inference_models()
            module.on_load_checkpoint(checkpoint)  # validates adapters against the config, loads them
            module.load_thresholds()  # fail now (not at the first image) on a bad thresholds file
        return cls(module, **kwargs)

    # ------------------------------------------------------------------ inference
    def _prepare(self, image: Any, category: str | None) -> tuple[np.ndarray, str, str | None]:
        """Decode an input to uint8 (H0, W0, 3) RGB; pick its category."""
        from PIL import Image, ImageOps

        from clipsam.data.samples import read_image

        path = None
        if isinstance(image, (str, os.PathLike)):
            path = os.fspath(image)
            array = read_image(path)  # the reader every clipsam dataset uses
            default = Path(path).parent.name
        elif isinstance(image, Image.Image):
            array = np.asarray(ImageOps.exif_transpose(image).convert("RGB"), dtype=np.uint8)
            default = "object"
        elif isinstance(image, np.ndarray):
            array = image
            if array.ndim == 2:
                array = np.repeat(array[..., None], 3, axis=2)
            if array.ndim != 3 or array.shape[2] not in (3, 4):
                raise ValueError(f"image arrays must be (H, W), (H, W, 3) RGB or (H, W, 4) RGBA, got shape {image.shape}")
            array = array[..., :3]
            if array.dtype != np.uint8:
                if np.issubdtype(array.dtype, np.floating) and array.size and float(np.nanmax(array)) <= 1.0:
                    array = np.clip(np.round(array * 255.0), 0, 255).astype(np.uint8)
                else:
                    raise ValueError(f"image arrays must be uint8 (or float in [0, 1]), got {array.dtype}")
            array = np.ascontiguousarray(array)
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
            frames, sizes = [], []
            for array, _, _ in chunk:
                out = self.transform(image=array, mask=np.zeros(array.shape[:2], dtype=np.uint8))
                frames.append(out["image"].to(torch.float32))
                sizes.append(array.shape[:2])
            n = len(chunk)
            batch = {
                "image": torch.stack(frames).to(self.device),
                "category": [c for _, c, _ in chunk],
                "path": [p or "" for _, _, p in chunk],
                "original_size": torch.tensor(sizes, dtype=torch.int64),
                "index": torch.arange(n),
                "label": torch.full((n,), -1, dtype=torch.int64),
                "has_mask": torch.zeros(n, dtype=torch.bool),
                "mask": torch.zeros(n, *frames[0].shape[-2:]),
            }
            side = self.module.sam_input_side()
            if side is not None:  # SAM encodes the original image, as in test/predict
                from clipsam.data.transforms import build_sam_input

                built = [build_sam_input(array, side) for array, _, _ in chunk]
                batch["sam_image"] = torch.stack([b[0] for b in built]).to(self.device)
                batch["sam_size"] = torch.stack([b[1] for b in built]).to(self.device)
            with _quiet():
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
            image: a file path, a numpy array (uint8 (H, W, 3) RGB, (H, W) gray, or float in
                [0, 1]) or a PIL image (EXIF orientation applied).
            category: category name for the text prompts and per-category thresholds (default:
                the Segmenter's, else a file's parent folder name, else "object").

        Returns:
            :class:`SegmentResult` at the image's size.
        """
        return self.segment_batch([image], category=category)[0]


def _load_checkpoint(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise WeightsError(f"checkpoint {path} does not exist: pass a file written by `clipsam fit` (checkpoints/last.ckpt)")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise WeightsError(f"cannot load checkpoint {path} ({type(err).__name__}: {str(err).splitlines()[0][:200]}): "
                           "pass an intact file written by `clipsam fit`") from err
