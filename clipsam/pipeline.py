"""The one computation every entry point runs: producer -> refiner -> fusion -> scores -> decision.

:class:`Pipeline` is a plain ``nn.Module`` (no Lightning). ``clipsam fit/validate/test/predict``
(through :class:`clipsam.module.ClipSamModule`), :class:`clipsam.Segmenter` and
``clipsam export`` all call it; none of them has its own copy of any step:

- :meth:`Pipeline.input_specs`: the model inputs the method and the refiner read, built from the
  ORIGINAL image by :func:`clipsam.inputs.build_inputs` (the dataset does it in its workers;
  :meth:`Pipeline.make_batch` for in-memory images; :meth:`Pipeline.forward` per tile);
- :meth:`Pipeline.segment`: the producer's map in the evaluation frame (``Map_a``), the
  refiner's mask, the fused pixel scores and the image scores;
- :meth:`Pipeline.forward`: :meth:`segment`, tiled when ``tiling`` is on;
- :meth:`Pipeline.decide`: thresholds, labels and the written mask;
- :meth:`Pipeline.set_references`: a category's good reference images, for a method whose module
  declares ``reference_count(config) > 0`` (few-shot: WinCLIP+); built like test images and
  handed to the producer (:meth:`~clipsam.methods.base.MapProducer.set_references`).

Dimension symbols: B batch, H x W the evaluation frame (``image_size`` x ``image_size``).
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from clipsam import methods, refiners
from clipsam.errors import ConfigError
from clipsam.inputs import InputSpec, build_inputs, collect_specs
from clipsam.settings import to_plain
from clipsam.tiling import TilingConfig

__all__ = ["Pipeline", "prediction_record"]

_RESULT_KEYS = ("anomaly_map", "scores", "mask", "image_scores", "clip_image_scores")


class Pipeline(nn.Module):
    """A map producer + a refiner + the fusion, on validated settings.

    The frozen models are built on demand (:meth:`build_producer`, :meth:`build_refiner`), so a
    config can be checked and printed without loading weights.

    Args:
        method: a name of :data:`clipsam.methods.METHODS`.
        method_config: its settings dataclass (:func:`clipsam.methods.method_config`).
        refiner: a name of :data:`clipsam.refiners.REFINERS`.
        refiner_config: its settings dataclass (None for ``none``).
        image_size: the evaluation frame side (``data.image_size``).
        fusion: how the refiner's mask and the map become pixel scores (:func:`clipsam.fusion.fuse_scores`).
        mask_threshold: the mask without a refiner: ``Map_a >= mask_threshold``.
        tiling: tiled inference (:mod:`clipsam.tiling`); None: off.
    """

    def __init__(
        self,
        *,
        method: str,
        method_config: Any,
        refiner: str,
        refiner_config: Any,
        image_size: int,
        fusion: str = "clip_boost",
        mask_threshold: float = 0.5,
        tiling: TilingConfig | None = None,
    ) -> None:
        super().__init__()
        from clipsam.fusion import FUSION_METHODS

        if fusion not in FUSION_METHODS:
            raise ConfigError(f"model.evaluation.fusion={fusion!r} is not a fusion method; choose one of {', '.join(FUSION_METHODS)}")
        self.method = str(method)
        self.method_spec = methods.get_method(self.method)
        self.method_config = method_config
        self.refiner_name = str(refiner)
        self.refiner_config = refiner_config
        self.image_size = int(image_size)
        self.fusion = fusion
        self.mask_threshold = float(mask_threshold)
        self.tiling = tiling if tiling is not None else TilingConfig()
        self.tiling.check(self.image_size)
        self.producer: nn.Module | None = None  # clipsam.methods.base.MapProducer
        self.refiner: nn.Module | None = None  # clipsam.refiners.base.Refiner
        self.timings: dict[str, float] = {}
        #: good reference images per category the method needs (0: none; its ``reference_count`` hook)
        self.reference_count = methods.method_reference_count(self.method, self.method_config)
        #: category -> names (paths) of the reference images the producer holds
        self.reference_names: dict[str, list[str]] = {}
        #: category -> files drawn by :meth:`draw_references`, not yet handed to the producer
        self.pending_references: dict[str, list[Any]] = {}
        #: how they were drawn (``data.reference``'s seed and source), for the run report
        self.reference_settings: dict[str, Any] = {}
        #: "category": validate/test/predict batches hold whole categories (a transductive
        #: method, its ``inference_batching`` hook); "image": any batches
        self.batching = methods.method_batching(self.method, self.method_config, image_size=self.image_size)
        if self.batching == "category" and self.tiling.canvas() is not None:
            raise ConfigError(
                f"model.method={self.method} scores each image against the other images of its category, "
                "which the tiles of one image are not: turn model.tiling off for this method"
            )

    # ------------------------------------------------------------------ what it needs
    @property
    def trainable(self) -> bool:
        """Whether the method trains (from the registry, before anything is built)."""
        return self.method_spec.trainable

    def method_inputs(self) -> list[InputSpec]:
        """The inputs the method reads besides the frame (the first is its ``forward`` input)."""
        return methods.method_inputs(self.method, self.method_config, image_size=self.image_size)

    def input_specs(self, *, refiner: bool = True) -> list[InputSpec]:
        """Every input the method (and, with ``refiner``, the refiner) reads besides the frame."""
        groups = [self.method_inputs()]
        if refiner and self.refiner_name != "none":
            groups.append(refiners.refiner_inputs(self.refiner_name, self.refiner_config))
        return collect_specs(groups)

    def score_settings(self) -> dict[str, Any]:
        """The settings the pixel and image scores depend on (recorded with thresholds)."""
        return {
            "method": self.method,
            "refiner": self.refiner_name,
            "fusion": self.fusion,
            "image_score": getattr(self.method_config, "image_score", None),
            "image_size": self.image_size,
            "tiling": to_plain(self.tiling),
            "reference_count": self.reference_count,
        }

    def check_stage(self, stage: str) -> None:
        """Refuse a stage this method cannot run (``fit`` of a training-free method)."""
        if stage == "fit" and not self.trainable:
            raise ConfigError(
                f"model.method={self.method} is training-free: there is nothing to fit. Run "
                f"`clipsam test` with the same config (no --ckpt_path needed), or choose a trained "
                f"method ({', '.join(n for n, spec in methods.METHODS.items() if spec.trainable)})"
            )

    # ------------------------------------------------------------------ building
    def build_producer(self) -> nn.Module:
        """Build the method's producer once (frozen backbones, fresh trainable parts)."""
        if self.producer is None:
            producer = methods.build_producer(self.method, self.method_config, image_size=self.image_size)
            if bool(producer.trainable) != self.trainable:
                raise TypeError(
                    f"clipsam.methods.METHODS[{self.method!r}].trainable={self.trainable} disagrees with "
                    f"{type(producer).__name__}.trainable={producer.trainable} (a registry bug)"
                )
            self.producer = producer
        return self.producer

    def build_refiner(self, *, use_embedding_cache: bool = True) -> nn.Module | None:
        """Build the refiner once (None for ``none``)."""
        if self.refiner is None and self.refiner_name != "none":
            self.refiner = refiners.build_refiner(self.refiner_name, self.refiner_config, use_embedding_cache=use_embedding_cache)
        return self.refiner

    # ------------------------------------------------------------------ inputs
    def frame_transform(self) -> Any:
        """The frame (or, with tiling, canvas) transform of test/predict images."""
        from clipsam.data.transforms import build_transform

        canvas = self.tiling.canvas()
        return build_transform(canvas if canvas is not None else self.image_size)

    def make_batch(self, images: Sequence[np.ndarray], categories: Sequence[str], *, paths: Sequence[str] | None = None) -> dict[str, Any]:
        """A batch from decoded uint8 (H0, W0, 3) RGB originals, as the dataset makes its items.

        The frame (the canvas with tiling) and every declared input come from the original
        (:func:`clipsam.inputs.build_inputs`; with tiling the inputs are built per tile).
        """
        specs = [] if self.tiling.canvas() is not None else self.input_specs()
        return _originals_batch(images, categories, paths, self.frame_transform(), specs)

    # ------------------------------------------------------------------ reference images
    def set_references(self, category: str, images: Sequence[np.ndarray], *, names: Sequence[str] | None = None) -> None:
        """Give the method its good reference images of ``category`` (replacing earlier ones).

        They are built as test images are (the frame and the method's declared inputs from each
        ORIGINAL, :func:`clipsam.inputs.build_inputs`; whole images, also with tiling), moved to
        the producer's device and handed to
        :meth:`~clipsam.methods.base.MapProducer.set_references`.

        Args:
            category: the category (as in ``batch["category"]``).
            images: exactly :attr:`reference_count` decoded uint8 (H0, W0, 3) RGB originals.
            names: one name per image for the run report (paths); default ``<image i>``.

        Raises:
            ConfigError: the method takes no references, or the number of images is not the one
                it needs.
        """
        count = self.reference_count
        if not count:
            raise ConfigError(f"model.method={self.method} takes no reference images (its reference_count is 0)")
        if len(images) != count:
            raise ConfigError(
                f"model.method={self.method} needs {count} reference image(s) per category and got {len(images)} "
                f"for category {category!r}: give exactly {count} (the method's settings fix it, e.g. model.method_config.k_shot)"
            )
        names = [str(n) for n in names] if names is not None else [f"<image {i}>" for i in range(len(images))]
        if len(names) != len(images):
            raise ValueError(f"got {len(names)} names for {len(images)} reference images")
        from clipsam.data.transforms import build_transform

        batch = _originals_batch(images, [category] * len(images), names, build_transform(self.image_size), self.method_inputs())
        producer = self.build_producer()
        device = _device_of(producer)
        batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
        producer.set_references(category, batch)
        self.reference_names[category] = names

    def load_references(self, files: Mapping[str, Sequence[Any]]) -> None:
        """:meth:`set_references` from image files: ``{category: [path, ...]}`` (read as every
        dataset image is, :func:`clipsam.data.read_image`); the paths are the recorded names."""
        from clipsam.data.samples import read_image

        for category, paths in files.items():
            self.set_references(category, [read_image(p) for p in paths], names=[str(p) for p in paths])

    def prepare_data(self, datamodule: Any, stage: str) -> None:
        """What the method asks of the data before ``stage`` runs (``ClipSamModule.setup``): whole-
        category batches for a transductive method (:meth:`configure_batching`) and the reference
        images of a few-shot one (:meth:`draw_references`)."""
        self.configure_batching(datamodule, stage)
        self.draw_references(datamodule, stage)

    def configure_batching(self, datamodule: Any, stage: str) -> None:
        """Make validate/test/predict batches whole categories when the method needs them (under
        DDP each process's shard of every category, dealt in blocks of the method's optional
        ``category_block(config, *, image_size)`` hook, default 1:
        :mod:`clipsam.data.category_batches`).

        Raises:
            ConfigError: the datamodule cannot batch by category (not clipsam's).
        """
        if self.batching != "category" or stage == "fit":
            return
        if datamodule is None or not hasattr(datamodule, "set_category_batches"):
            raise ConfigError(
                f"model.method={self.method} scores each image against the other images of its category: run it "
                "with clipsam's AnomalyDataModule, which batches whole categories (this datamodule cannot)"
            )
        hook = methods.method_hook(self.method, "category_block")
        block = int(hook(self.method_config, image_size=self.image_size)) if hook is not None else 1
        datamodule.set_category_batches(True, block=block)

    def draw_references(self, datamodule: Any, stage: str) -> None:
        """``clipsam test/validate/predict`` (``ClipSamModule.setup``): have the datamodule draw the
        method's references of every category ``stage`` segments (``data.reference``,
        :meth:`clipsam.data.datamodule.AnomalyDataModule.reference_files`), before any batch.

        The files are read and handed to the producer at the first :meth:`segment` (on the
        producer's device). Nothing happens for ``fit`` or a method without references.

        Raises:
            ConfigError: the datamodule cannot draw references (not clipsam's), or
                ``data.reference`` cannot be read (see ``reference_files``).
        """
        count = self.reference_count
        if not count or stage == "fit":
            return
        if datamodule is None or not hasattr(datamodule, "reference_files"):
            raise ConfigError(
                f"model.method={self.method} needs {count} good reference image(s) per category, drawn by "
                "data.reference: run it with clipsam's AnomalyDataModule (this datamodule provides none)"
            )
        self.pending_references = datamodule.reference_files(count, stage=stage)
        settings = getattr(datamodule, "reference", None)
        self.reference_settings = {"seed": getattr(settings, "seed", None), "source": getattr(settings, "source", None)}

    def check_references(self, categories: Sequence[str]) -> None:
        """Refuse to segment a category without its reference images (when the method needs them).

        Raises:
            ConfigError: naming the category, ``data.reference`` and the Segmenter's way to give them.
        """
        if not self.reference_count:
            return
        missing = sorted(set(categories) - set(self.reference_names))
        if missing:
            raise ConfigError(
                f"model.method={self.method} needs {self.reference_count} good reference image(s) of category "
                f"{missing[0]!r} and has none: `clipsam test/validate/predict` draw them by data.reference "
                f"(default: the test dataset's good training images); Segmenter takes them as "
                f"Segmenter.from_config(..., references={{{missing[0]!r}: [images]}}) or segmenter.set_references()"
            )

    def reference_report(self) -> dict[str, Any]:
        """``{"references": {seed, source, count, files}}`` for the run report (``run`` in
        test_results.json) when the method takes references: how they were drawn, ``count`` per
        category and the files (names) used, by category; ``{}`` otherwise."""
        if not self.reference_count:
            return {}
        names = {**{c: [str(p) for p in files] for c, files in self.pending_references.items()}, **self.reference_names}
        files = {c: list(n) for c, n in sorted(names.items())}
        return {"references": {**self.reference_settings, "count": self.reference_count, "files": files}}

    def _tile_inputs(self, tiles: torch.Tensor) -> dict[str, torch.Tensor]:
        """The declared inputs of frame-sized tiles (a tile is an image of its own)."""
        from clipsam.data.transforms import denormalize

        specs = self.input_specs(refiner=self.refiner is not None)
        if not specs:
            return {}
        pixels = denormalize(tiles).permute(0, 2, 3, 1).cpu().numpy()  # (T, F, F, 3) uint8
        built = [build_inputs(np.ascontiguousarray(tile), specs) for tile in pixels]
        out = {key: torch.stack([b[key] for b in built]).to(tiles.device) for key in built[0]}
        out["original_size"] = torch.tensor([list(tiles.shape[-2:])] * tiles.shape[0], device=tiles.device)
        return out

    # ------------------------------------------------------------------ the computation
    def _add_time(self, key: str, seconds: float) -> None:
        self.timings[key] = self.timings.get(key, 0.0) + float(seconds)

    def segment(self, batch: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        """Producer -> refiner -> fusion on a batch (frame-sized images).

        Returns:
            dict with ``anomaly_map`` (B, H, W) the producer's map in [0, 1] (Map_a), ``scores``
            (B, H, W) fused pixel scores in [0, 1], ``mask`` (B, H, W) bool final mask,
            ``image_scores`` (B,) and ``clip_image_scores`` (B,) (the producer's own); without a
            refiner also ``image_score_parts`` (B, P) when the producer returns them (for
            :meth:`category_image_scores`).
        """
        from clipsam.fusion import fuse_scores

        producer = self.build_producer()
        if self.pending_references:  # drawn in setup; read and encoded once, on the producer's device
            pending, self.pending_references = self.pending_references, {}
            self.load_references(pending)
        self.check_references(batch["category"])
        t0 = time.perf_counter()
        out = producer.forward_batch(batch)
        self._add_time("clip_forward", time.perf_counter() - t0)
        anomaly_map = out.anomaly_map.float()  # (B, H, W) Map_a
        producer_scores = out.image_scores.float()  # (B,)
        if self.refiner is None:
            result = {
                "anomaly_map": anomaly_map,
                "scores": anomaly_map,
                "mask": anomaly_map >= self.mask_threshold,
                "image_scores": producer_scores,
                "clip_image_scores": producer_scores,
            }
            if "image_score_parts" in out.extras:  # (B, P), for category_image_scores
                result["image_score_parts"] = out.extras["image_score_parts"].float()
            return result
        refined = self.refiner.refine_batch(batch, anomaly_map)  # reads the inputs it declared
        for key, seconds in refined.timings.items():
            self._add_time(key, seconds)
        t1 = time.perf_counter()
        mask = refined.mask.to(anomaly_map.device)
        probs = refined.mask_probs.to(anomaly_map.device)
        scores = torch.stack([fuse_scores(a, p, m, method=self.fusion) for a, p, m in zip(anomaly_map, probs, mask)])
        self._add_time("fusion", time.perf_counter() - t1)
        return {
            "anomaly_map": anomaly_map,
            "scores": scores,
            "mask": mask,
            "image_scores": producer.fused_image_scores(out, scores),
            "clip_image_scores": producer_scores,
        }

    def forward(self, batch: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        """:meth:`segment`, tiled when ``tiling`` is on (test, predict, Segmenter, export).

        With tiling, ``batch["image"]`` is the (B, 3, Hc, Wc) canvas: it is cut into frame-sized
        tiles (run in chunks of B tiles), each tile's inputs are built from its pixels, and the
        tile outputs are stitched back (:mod:`clipsam.tiling`: maps averaged where tiles overlap,
        masks joined). An image's score is the maximum of its tiles' scores. Same keys and
        meanings as :meth:`segment`, at canvas size.
        """
        from clipsam.tiling import split_tiles, stitch_tiles

        images = batch["image"]
        if self.tiling.canvas() is None or tuple(images.shape[-2:]) == (self.image_size, self.image_size):
            return self.segment(batch)
        tiles, positions = split_tiles(images, self.image_size, int(self.tiling.overlap))
        per_image = len(positions)
        categories = [c for c in batch["category"] for _ in positions]
        chunk = max(1, images.shape[0])
        parts: dict[str, list[torch.Tensor]] = {k: [] for k in _RESULT_KEYS}
        score_parts: list[torch.Tensor] = []
        for start in range(0, tiles.shape[0], chunk):
            tile_batch: dict[str, Any] = {"image": tiles[start : start + chunk], "category": categories[start : start + chunk]}
            tile_batch.update(self._tile_inputs(tile_batch["image"]))
            out = self.segment(tile_batch)
            for key, collected in parts.items():
                collected.append(out[key])
            if "image_score_parts" in out:
                score_parts.append(out["image_score_parts"])
        size = tuple(images.shape[-2:])
        joined = {key: torch.cat(values) for key, values in parts.items()}
        extra = {}
        if score_parts:  # an image's parts: the maximum over its tiles, as its score
            stacked = torch.cat(score_parts)
            extra["image_score_parts"] = stacked.view(-1, per_image, stacked.shape[-1]).amax(1)
        return {
            **extra,
            "anomaly_map": stitch_tiles(joined["anomaly_map"], positions, size),
            "scores": stitch_tiles(joined["scores"], positions, size),
            "mask": stitch_tiles(joined["mask"], positions, size, reduce="any"),
            "image_scores": joined["image_scores"].view(-1, per_image).amax(1),
            "clip_image_scores": joined["clip_image_scores"].view(-1, per_image).amax(1),
        }

    def category_image_scores(self) -> Callable[[torch.Tensor], torch.Tensor | None] | None:
        """The producer's per-category image score (:meth:`MapProducer.category_image_scores`)
        for ``clipsam test``'s image metrics, or None: without a refiner only (with one, the
        image score is the fused map's) and only when the method defines one."""
        from clipsam.methods.base import MapProducer

        producer = self.build_producer()
        if self.refiner_name != "none" or type(producer).category_image_scores is MapProducer.category_image_scores:
            return None
        return producer.category_image_scores

    def decide(
        self,
        batch: Mapping[str, Any],
        result: Mapping[str, torch.Tensor],
        *,
        thresholds: Mapping[str, Any] | None,
        image_threshold: float,
        pixel_threshold: float,
        mask_source: str = "sam",
    ) -> dict[str, Any]:
        """Thresholds, labels and the written mask for a segmented batch (predict, Segmenter).

        Args:
            batch: the batch (``category`` picks per-category thresholds).
            result: :meth:`forward`'s output.
            thresholds: a loaded ``thresholds.json`` (None: the defaults below).
            image_threshold / pixel_threshold: the defaults without a thresholds file.
            mask_source: ``"sam"`` (the refiner's mask) or ``"score"`` (fused score >= the pixel
                threshold); without a refiner the mask is always the score's.

        Returns:
            ``result`` plus ``mask`` (B, H, W) bool, ``labels`` (B,) bool (image score >= image
            threshold), ``image_thresholds`` and ``pixel_thresholds`` (lists of float),
            ``threshold_scopes`` (the category, "global" or "default") and ``object_names``
            (what the method's prompts say, from the method).
        """
        from clipsam.thresholds import lookup

        categories = list(batch["category"])
        image_t, pixel_t, scopes = [], [], []
        for category in categories:
            t_img, scope = lookup(thresholds, "image", category, image_threshold)
            t_pix, _ = lookup(thresholds, "pixel", category, pixel_threshold)
            image_t.append(t_img)
            pixel_t.append(t_pix)
            scopes.append(scope)
        scores = result["scores"]
        if mask_source == "score" or self.refiner_name == "none":
            limits = torch.tensor(pixel_t, dtype=scores.dtype, device=scores.device).view(-1, 1, 1)
            mask = scores >= limits
        else:
            mask = result["mask"]
        image_limits = torch.tensor(image_t, dtype=torch.float32, device=scores.device)
        producer = self.build_producer()
        return {
            **result,
            "mask": mask,
            "labels": result["image_scores"].float() >= image_limits,
            "image_thresholds": image_t,
            "pixel_thresholds": pixel_t,
            "threshold_scopes": scopes,
            "object_names": [producer.object_name(c) for c in categories],
        }


def _originals_batch(
    images: Sequence[np.ndarray], categories: Sequence[str], paths: Sequence[str] | None, transform: Any, specs: Sequence[InputSpec]
) -> dict[str, Any]:
    """A batch of decoded uint8 (H0, W0, 3) RGB originals: ``transform``'s frame and ``specs``' inputs."""
    frames, extras = [], []
    for array in images:
        frames.append(transform(image=array, mask=np.zeros(array.shape[:2], dtype=np.uint8))["image"].to(torch.float32))
        extras.append(build_inputs(array, specs))
    n = len(frames)
    batch: dict[str, Any] = {
        "image": torch.stack(frames),
        "category": list(categories),
        "path": list(paths) if paths is not None else [""] * n,
        "original_size": torch.tensor([list(a.shape[:2]) for a in images], dtype=torch.int64),
        "index": torch.arange(n),
        "label": torch.full((n,), -1, dtype=torch.int64),
        "has_mask": torch.zeros(n, dtype=torch.bool),
        "mask": torch.zeros(n, *frames[0].shape[-2:]),
    }
    for key in extras[0] if extras else []:
        batch[key] = torch.stack([e[key] for e in extras])
    return batch


def _device_of(module: nn.Module) -> torch.device:
    """The device of a module's first parameter or buffer (CPU when it has none)."""
    tensor = next(itertools.chain(module.parameters(), module.buffers()), None)
    return tensor.device if tensor is not None else torch.device("cpu")


def prediction_record(batch: Mapping[str, Any], decided: Mapping[str, Any]) -> dict[str, Any]:
    """What ``predict`` hands its writer for a decided batch (host tensors, scores in half precision)."""
    return {
        "skipped": list(batch.get("skipped", [])),
        "path": list(batch["path"]),
        "category": list(batch["category"]),
        "original_size": batch["original_size"].cpu(),
        "scores": decided["scores"].to(torch.float16).cpu(),  # (B, H, W), half to keep memory low
        "mask": decided["mask"].cpu(),
        "image_scores": decided["image_scores"].cpu(),
        "labels": decided["labels"].cpu(),
        "image_thresholds": decided["image_thresholds"],
        "pixel_thresholds": decided["pixel_thresholds"],
        "threshold_scopes": decided["threshold_scopes"],
        "object_names": decided["object_names"],
    }
