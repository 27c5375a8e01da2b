"""MMR refiner of the ClipSAM reconstruction ("ClipSAM-rec"): multi-level prompts per region.

ClipSAM (arXiv 2401.12665) released no code and its method section was not available here; this
is a *reconstruction* from its abstract ("MMR takes points and boxes from CLIP's localisation as
multi-level prompts for SAM, then merges the resulting masks"), every choice a config key
(see docs/usage.md). Report its results as "ClipSAM-rec", never "ClipSAM".

Per frame image:

1. ``S_a = Map_a >= tau`` (:attr:`MmrConfig.threshold`);
2. 8-connected components of ``S_a``, dropping those smaller than ``min_area`` pixels, at most
   ``max_regions`` kept (highest peak of ``Map_a`` first) -- :func:`connected_regions`;
3. per component its bounding box and the ``top_k`` pixels of highest ``Map_a`` inside it --
   :func:`region_prompts`;
4. SAM with ``multimask_output=True`` for each prompt combination of ``prompt_sets``
   (points, box, points + box): 3 x 3 = 9 masks per component -- :func:`decode_prompts`;
5. the sigmoid probabilities of a component's masks are averaged, then the maximum is taken
   over components -- :func:`merge_region_probs`; the binary mask is ``probs > mask_threshold``.

The pipeline then fuses ``Map_a`` with the probabilities; the reconstruction uses
``model.evaluation.fusion: mean`` (``(Map_a + p) / 2``, :func:`clipsam.fusion.fuse_scores`).

SAM encodes the ORIGINAL image as ``SamPredictor.set_image`` does (its input is declared by
:func:`input_specs` and built by :func:`clipsam.inputs.build_sam_input`); the prompts, made in
the frame, are mapped to original-image pixels and then to SAM's input, and the masks come back
to the frame with ``Sam.postprocess_masks`` (:func:`clipsam.models.sam.decode_prompts_original`).

Dimension symbols: B batch, H x W the evaluation frame, R regions of one image, K = top_k
points, M masks of one region (9 with the defaults), C x h x w SAM's image embedding.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Mapping, Sequence
from typing import Any

import cv2
import numpy as np
import torch
from segment_anything.modeling import Sam
from torch import Tensor

from clipsam.cascade import mask_to_box
from clipsam.errors import ConfigError
from clipsam.inputs import InputSpec, build_sam_input, sam_input_size, sam_input_spec
from clipsam.models.sam import (
    SamConfig,
    build_sam,
    decode_prompts_original,
    encode_sam_inputs,
    frame_to_original,
    sam_input_side,
)
from clipsam.refiners.base import RefineBatchOutput, Refiner
from clipsam.settings import from_mapping

__all__ = [
    "CONFIG",
    "PROMPT_SETS",
    "MmrConfig",
    "MmrRefiner",
    "RegionPrompts",
    "build",
    "connected_regions",
    "decode_prompts",
    "encode_frames",
    "frame_prompts_to_original",
    "input_specs",
    "merge_region_probs",
    "region_prompts",
]

PROMPT_SETS: tuple[str, ...] = ("points", "box", "points_box")
"""Valid entries of :attr:`MmrConfig.prompt_sets`: which prompts go into one SAM call."""


@dataclasses.dataclass
class MmrConfig:
    """Settings of the MMR refiner (``model.refiner_config``; ClipSAM-rec's choices).

    Attributes:
        threshold: tau, ``S_a = Map_a >= tau`` on the [0, 1] map (the reconstruction's choice: 0.5).
        min_area: components of ``S_a`` with fewer pixels (in the frame) are dropped.
            Our choice: 16 pixels (a 4 x 4 patch), so single-pixel noise gets no prompt.
        max_regions: at most this many components are prompted, highest ``Map_a`` peak first
            (bounds SAM calls on noisy maps); 0 means no cap.
        top_k: k, the number of highest-``Map_a`` pixels of a component used as positive points
            (the reconstruction's choice: 1).
        prompt_sets: the prompt combinations, one SAM call each: ``"points"`` (the top-k
            points), ``"box"`` (the component's bounding box), ``"points_box"`` (both).
        multimask_output: SAM's 3-mask output per call (True: 3 masks per call, 9 per region).
        mask_threshold: probability above which a pixel is in the binary mask (0.5 = SAM's
            logit threshold 0).

        sam: which SAM (variant, checkpoint, dtype); the deprecated ``model.sam`` section fills it
            in older configs.
    """

    threshold: float = 0.5
    min_area: int = 16
    max_regions: int = 16
    top_k: int = 1
    prompt_sets: list[str] = dataclasses.field(default_factory=lambda: list(PROMPT_SETS))
    multimask_output: bool = True
    mask_threshold: float = 0.5
    sam: SamConfig = dataclasses.field(default_factory=SamConfig)

    def __post_init__(self) -> None:
        if not isinstance(self.sam, SamConfig):
            self.sam = from_mapping(SamConfig, self.sam, key="model.refiner_config.sam")
        self.prompt_sets = list(self.prompt_sets)
        if not 0.0 <= self.threshold <= 1.0:
            raise ConfigError(f"model.refiner_config.threshold={self.threshold} must be in [0, 1]")
        if self.min_area < 1:
            raise ConfigError(f"model.refiner_config.min_area={self.min_area} must be >= 1 pixel")
        if self.max_regions < 0:
            raise ConfigError(f"model.refiner_config.max_regions={self.max_regions} must be >= 0 (0: no cap)")
        if self.top_k < 1:
            raise ConfigError(f"model.refiner_config.top_k={self.top_k} must be >= 1")
        bad = [p for p in self.prompt_sets if p not in PROMPT_SETS]
        if bad or not self.prompt_sets:
            raise ConfigError(
                f"model.refiner_config.prompt_sets={self.prompt_sets} must be a non-empty list of {list(PROMPT_SETS)}"
            )
        if not 0.0 <= self.mask_threshold <= 1.0:
            raise ConfigError(f"model.refiner_config.mask_threshold={self.mask_threshold} must be in [0, 1]")


CONFIG = MmrConfig


# ---------------------------------------------------------------------- pure prompt generation
def connected_regions(
    anomaly_map: Tensor, *, threshold: float, min_area: int, max_regions: int = 0
) -> list[Tensor]:
    """The 8-connected components of ``S_a = Map_a >= threshold`` that are large enough.

    Args:
        anomaly_map: (H, W) float in [0, 1], ``Map_a`` in the frame.
        threshold: tau.
        min_area: components with fewer pixels are dropped.
        max_regions: keep at most this many (0: all).

    Returns:
        R (H, W) bool masks on ``anomaly_map``'s device, ordered by their peak ``Map_a``
        (highest first; ties by cv2's label order, i.e. raster order of the first pixel).
    """
    if anomaly_map.ndim != 2:
        raise ValueError(f"anomaly_map must be (H, W), got {tuple(anomaly_map.shape)}")
    region = (anomaly_map >= threshold).cpu().numpy().astype(np.uint8)
    count, labels = cv2.connectedComponents(region, connectivity=8)
    labels_t = torch.from_numpy(labels.astype(np.int64)).to(anomaly_map.device)  # (H, W)
    found = []
    for label in range(1, count):
        mask = labels_t == label
        if int(mask.sum()) < min_area:
            continue
        found.append((float(anomaly_map[mask].max()), label, mask))
    found.sort(key=lambda item: (-item[0], item[1]))
    if max_regions > 0:
        found = found[:max_regions]
    return [mask for _, _, mask in found]


@dataclasses.dataclass
class RegionPrompts:
    """The prompts of one region, in frame pixels.

    Attributes:
        points: (K, 2) float32, (x, y) = (column, row) integer pixel indices of the K highest
            ``Map_a`` pixels of the region (highest first), SAM's click convention.
        box: (4,) float32 XYXY, inclusive pixel indices of the region's extent.
    """

    points: Tensor
    box: Tensor


def region_prompts(anomaly_map: Tensor, region: Tensor, *, top_k: int) -> RegionPrompts:
    """Bounding box and top-k points of one region.

    Args:
        anomaly_map: (H, W) float, ``Map_a``.
        region: (H, W) bool, a non-empty component of ``S_a``.
        top_k: K; fewer points if the region has fewer pixels.

    Returns:
        :class:`RegionPrompts`; ties in ``Map_a`` go to the earlier pixel in raster order.
    """
    if region.shape != anomaly_map.shape:
        raise ValueError(f"region {tuple(region.shape)} and anomaly_map {tuple(anomaly_map.shape)} differ")
    box = mask_to_box(region)
    if box is None:
        raise ValueError("region is empty: it has no prompts")
    width = anomaly_map.shape[1]
    idx = torch.nonzero(region.flatten(), as_tuple=True)[0]  # raster order
    values = anomaly_map.flatten()[idx].to(torch.float32)
    order = torch.sort(values, descending=True, stable=True).indices[:top_k]
    chosen = idx[order]
    points = torch.stack((chosen % width, chosen // width), dim=1).to(torch.float32)  # (K, 2) (x, y)
    return RegionPrompts(points=points, box=box)


def merge_region_probs(region_probs: Sequence[Tensor], frame_size: tuple[int, int]) -> Tensor:
    """Merge the masks of all regions: mean over a region's masks, then max over regions.

    Args:
        region_probs: R tensors (M, H, W) float in [0, 1], the mask probabilities of each region.
        frame_size: (H, W), the size of the result when there are no regions.

    Returns:
        (H, W) float32; all zeros when ``region_probs`` is empty.
    """
    if not region_probs:
        return torch.zeros(frame_size, dtype=torch.float32)
    per_region = torch.stack([p.to(torch.float32).mean(0) for p in region_probs])  # (R, H, W)
    return per_region.amax(0)


# ---------------------------------------------------------------------- SAM calls
@torch.no_grad()
def encode_frames(sam: Sam, images: Tensor) -> Tensor:
    """SAM embeddings of uint8 (B, 3, H, W) images taken as the ORIGINAL images (``set_image``, batched).

    Returns:
        (B, C, h, w) float32 on SAM's device.
    """
    side = int(sam.image_encoder.img_size)
    built = [build_sam_input(image.permute(1, 2, 0).cpu().numpy(), side) for image in images]
    return encode_sam_inputs(sam, torch.stack([b[0] for b in built]), torch.stack([b[1] for b in built]))


def frame_prompts_to_original(
    points: Tensor | None, boxes: Tensor | None, frame_size: tuple[int, int], original_size: tuple[int, int]
) -> tuple[Tensor | None, Tensor | None]:
    """Frame-pixel points (R, K, 2) and XYXY boxes (R, 4) -> original-image pixels (centre to centre)."""
    rows = int(points.shape[0] if points is not None else boxes.shape[0])  # type: ignore[union-attr]
    originals = torch.tensor([list(original_size)] * rows, dtype=torch.float64)
    out_points = None if points is None else frame_to_original(points, frame_size, originals)
    out_boxes = None
    if boxes is not None:
        out_boxes = frame_to_original(boxes.reshape(-1, 2, 2), frame_size, originals).reshape(-1, 4)
    return out_points, out_boxes


@torch.no_grad()
def decode_prompts(
    sam: Sam,
    embedding: Tensor,
    frame_size: tuple[int, int],
    *,
    points: Tensor | None,
    boxes: Tensor | None,
    multimask_output: bool = True,
    original_size: tuple[int, int] | None = None,
    input_size: tuple[int, int] | None = None,
) -> Tensor:
    """One batched SAM decoder call for R prompt sets made in the frame, on one encoded image.

    Args:
        sam: segment_anything ``Sam``.
        embedding: (1, C, h, w) float32 embedding of the ORIGINAL image.
        frame_size: (H, W) of the frame the prompts are in (and the masks come back to).
        points: (R, K, 2) float32 (x, y) frame pixels, all positive; or None.
        boxes: (R, 4) float32 XYXY frame pixels; or None. At least one of the two.
        multimask_output: SAM's 3-mask output.
        original_size: (H0, W0) of the encoded image; None: the frame itself was encoded.
        input_size: (h', w') valid part of SAM's input; None: computed from ``original_size``.

    Returns:
        (R, M, H, W) float32 mask probabilities in the frame, M = 3 with ``multimask_output``.
    """
    if points is None and boxes is None:
        raise ValueError("decode_prompts needs points, boxes or both")
    original = tuple(original_size) if original_size is not None else tuple(frame_size)
    if input_size is None:
        input_size = sam_input_size(original[0], original[1], int(sam.image_encoder.img_size))
    points_o, boxes_o = frame_prompts_to_original(points, boxes, frame_size, original)  # type: ignore[arg-type]
    return decode_prompts_original(
        sam,
        embedding,
        input_size=tuple(input_size),
        original_size=original,  # type: ignore[arg-type]
        output_size=tuple(frame_size),
        points=points_o,
        boxes=boxes_o,
        multimask_output=multimask_output,
    )


def input_specs(config: MmrConfig) -> list[InputSpec]:
    """SAM's input of the original image, at the side of ``config.sam.variant``."""
    return [sam_input_spec(sam_input_side(config.sam.variant))]


# ---------------------------------------------------------------------- the refiner
class MmrRefiner(Refiner):
    """ClipSAM-rec's MMR: per-region box + point prompts, 9 SAM masks each, merged.

    Args:
        sam: a frozen segment_anything ``Sam`` (kept in eval mode).
        config: the MMR settings.
    """

    name = "mmr"

    def __init__(self, *, sam: Sam, config: MmrConfig) -> None:
        super().__init__()
        self.sam = sam.eval().requires_grad_(False)
        self.config = config

    def train(self, mode: bool = True) -> MmrRefiner:
        """Keep SAM in eval mode whatever ``mode`` is."""
        super().train(mode)
        self.sam.eval()
        return self

    @torch.no_grad()
    def refine_image(
        self,
        embedding: Tensor,
        anomaly_map: Tensor,
        *,
        original_size: tuple[int, int] | None = None,
        input_size: tuple[int, int] | None = None,
    ) -> tuple[Tensor, list[RegionPrompts]]:
        """MMR on one image whose SAM embedding is known.

        Args:
            embedding: (1, C, h, w) float32 SAM embedding of the original image.
            anomaly_map: (H, W) float32 in [0, 1], ``Map_a`` in the frame.
            original_size: (H0, W0) of the encoded image (None: the frame itself was encoded).
            input_size: (h', w') valid part of SAM's input (None: from ``original_size``).

        Returns:
            ((H, W) float32 merged mask probabilities on ``anomaly_map``'s device, the prompts
            of each region).
        """
        cfg = self.config
        frame = (int(anomaly_map.shape[0]), int(anomaly_map.shape[1]))
        regions = connected_regions(
            anomaly_map, threshold=cfg.threshold, min_area=cfg.min_area, max_regions=cfg.max_regions
        )
        if not regions:
            return torch.zeros(frame, dtype=torch.float32, device=anomaly_map.device), []
        prompts = [region_prompts(anomaly_map, region, top_k=cfg.top_k) for region in regions]
        k = min(p.points.shape[0] for p in prompts)  # equal K across regions for one batched call
        points = torch.stack([p.points[:k] for p in prompts])  # (R, K, 2)
        boxes = torch.stack([p.box for p in prompts])  # (R, 4)
        calls = {"points": (points, None), "box": (None, boxes), "points_box": (points, boxes)}
        probs = [
            decode_prompts(
                self.sam,
                embedding,
                frame,
                points=calls[s][0],
                boxes=calls[s][1],
                multimask_output=cfg.multimask_output,
                original_size=original_size,
                input_size=input_size,
            )
            for s in cfg.prompt_sets
        ]  # each (R, M, H, W)
        stacked = torch.cat(probs, dim=1)  # (R, sets * M, H, W)
        merged = merge_region_probs(list(stacked), frame)
        return merged.to(anomaly_map.device), prompts

    def refine_batch(self, batch: Mapping[str, Any], anomaly_maps: Tensor) -> RefineBatchOutput:
        """MMR on a batch (one encoder pass for the batch).

        Args:
            batch: needs ``sam_image`` uint8 (B, 3, S, S), ``sam_size`` (B, 2) and
                ``original_size`` (B, 2): SAM's input of the original images (:func:`input_specs`).
            anomaly_maps: (B, H, W) float32 in [0, 1], in the frame.

        Returns:
            :class:`RefineBatchOutput` with (B, H, W) bool mask and float32 probabilities.
        """
        if "sam_image" not in batch or "sam_size" not in batch:
            raise ConfigError(
                "the batch has no 'sam_image'/'sam_size': MMR encodes the original image, built by "
                "clipsam.inputs.build_sam_input (run it through clipsam.pipeline.Pipeline, which declares it)"
            )
        sam_images, sam_sizes = batch["sam_image"], batch["sam_size"]
        if sam_images.shape[0] != anomaly_maps.shape[0]:
            raise ValueError(f"anomaly_maps {tuple(anomaly_maps.shape)} do not match the batch of {sam_images.shape[0]} images")
        sizes = torch.cat((sam_sizes.reshape(-1, 2).cpu(), batch["original_size"].reshape(-1, 2).cpu()), 1).tolist()
        timings: dict[str, float] = {}
        start = time.perf_counter()
        embeddings = encode_sam_inputs(self.sam, sam_images, sam_sizes)  # (B, C, h, w)
        timings["sam_encoder"] = time.perf_counter() - start
        start = time.perf_counter()
        probs = torch.stack(
            [
                self.refine_image(emb[None], amap.float(), input_size=(s[0], s[1]), original_size=(s[2], s[3]))[0]
                for emb, amap, s in zip(embeddings, anomaly_maps, sizes)
            ]
        )  # (B, H, W)
        timings["mmr_decoder"] = time.perf_counter() - start
        return RefineBatchOutput(mask=probs > self.config.mask_threshold, mask_probs=probs, timings=timings)


def build(config: MmrConfig | None = None, *, sam: SamConfig | None = None, use_embedding_cache: bool = True) -> MmrRefiner:
    """Build the refiner: SAM from ``sam`` (default ``config.sam``), MMR from ``config``.

    ``use_embedding_cache`` is accepted for the refiner interface; MMR keeps no cache.
    """
    config = config or MmrConfig()
    return MmrRefiner(sam=build_sam(sam or config.sam), config=config)
