"""MMR refiner of the ClipSAM reconstruction ("ClipSAM-rec"): multi-level prompts per region.

ClipSAM (arXiv 2401.12665) released no code and its method section was not available here; this
is a *reconstruction* from its abstract ("MMR takes points and boxes from CLIP's localisation as
multi-level prompts for SAM, then merges the resulting masks"), every choice a config key
(../shared/BASELINES.md, section 3). Report its results as "ClipSAM-rec", never "ClipSAM".

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

The LightningModule then fuses ``Map_a`` with the probabilities; the reconstruction uses
``model.evaluation.fusion: mean`` (``(Map_a + p) / 2``, :func:`clipsam.fusion.fuse_scores`).

SAM is called exactly as ``SamPredictor.predict_torch`` does (ResizeLongestSide on the frame
image, ``Sam.preprocess``, prompt encoder, mask decoder, ``Sam.postprocess_masks``); the SAM
calls live in :func:`encode_frames` and :func:`decode_prompts` only.

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
from segment_anything.utils.transforms import ResizeLongestSide
from torch import Tensor

from clipsam.cascade import mask_to_box
from clipsam.errors import ConfigError
from clipsam.methods.base import RefineBatchOutput, Refiner
from clipsam.models.sam import SamConfig, build_sam

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
    "merge_region_probs",
    "region_prompts",
]

PROMPT_SETS: tuple[str, ...] = ("points", "box", "points_box")
"""Valid entries of :attr:`MmrConfig.prompt_sets`: which prompts go into one SAM call."""


@dataclasses.dataclass
class MmrConfig:
    """Settings of the MMR refiner (config section ``model.mmr``; ClipSAM-rec's choices).

    Attributes:
        threshold: tau, ``S_a = Map_a >= tau`` on the [0, 1] map (BASELINES.md: 0.5).
        min_area: components of ``S_a`` with fewer pixels (in the frame) are dropped.
            Our choice: 16 pixels (a 4 x 4 patch), so single-pixel noise gets no prompt.
        max_regions: at most this many components are prompted, highest ``Map_a`` peak first
            (bounds SAM calls on noisy maps); 0 means no cap.
        top_k: k, the number of highest-``Map_a`` pixels of a component used as positive points
            (BASELINES.md: 1).
        prompt_sets: the prompt combinations, one SAM call each: ``"points"`` (the top-k
            points), ``"box"`` (the component's bounding box), ``"points_box"`` (both).
        multimask_output: SAM's 3-mask output per call (True: 3 masks per call, 9 per region).
        mask_threshold: probability above which a pixel is in the binary mask (0.5 = SAM's
            logit threshold 0).

    Which SAM is used is not part of this section: it is the module's ``model.sam``.
    """

    threshold: float = 0.5
    min_area: int = 16
    max_regions: int = 16
    top_k: int = 1
    prompt_sets: list[str] = dataclasses.field(default_factory=lambda: list(PROMPT_SETS))
    multimask_output: bool = True
    mask_threshold: float = 0.5

    def __post_init__(self) -> None:
        self.prompt_sets = list(self.prompt_sets)
        if not 0.0 <= self.threshold <= 1.0:
            raise ConfigError(f"model.mmr.threshold={self.threshold} must be in [0, 1]")
        if self.min_area < 1:
            raise ConfigError(f"model.mmr.min_area={self.min_area} must be >= 1 pixel")
        if self.max_regions < 0:
            raise ConfigError(f"model.mmr.max_regions={self.max_regions} must be >= 0 (0: no cap)")
        if self.top_k < 1:
            raise ConfigError(f"model.mmr.top_k={self.top_k} must be >= 1")
        bad = [p for p in self.prompt_sets if p not in PROMPT_SETS]
        if bad or not self.prompt_sets:
            raise ConfigError(
                f"model.mmr.prompt_sets={self.prompt_sets} must be a non-empty list of {list(PROMPT_SETS)}"
            )
        if not 0.0 <= self.mask_threshold <= 1.0:
            raise ConfigError(f"model.mmr.mask_threshold={self.mask_threshold} must be in [0, 1]")


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
    """SAM image embeddings of frame images (as ``SamPredictor.set_image``, batched).

    Args:
        sam: segment_anything ``Sam``.
        images: uint8 (B, 3, H, W) frame images, RGB 0-255.

    Returns:
        (B, C, h, w) float32 on SAM's device.
    """
    transform = ResizeLongestSide(sam.image_encoder.img_size)
    resized = [
        torch.as_tensor(transform.apply_image(image.permute(1, 2, 0).cpu().numpy())).permute(2, 0, 1)
        for image in images
    ]  # B x (3, h', w') uint8
    x = sam.preprocess(torch.stack(resized).to(sam.device, torch.float32))  # (B, 3, S, S)
    dtype = next(sam.image_encoder.parameters()).dtype
    return sam.image_encoder(x.to(dtype)).to(torch.float32)


@torch.no_grad()
def decode_prompts(
    sam: Sam,
    embedding: Tensor,
    frame_size: tuple[int, int],
    *,
    points: Tensor | None,
    boxes: Tensor | None,
    multimask_output: bool = True,
) -> Tensor:
    """One batched SAM decoder call for R prompt sets on one image (as ``predict_torch``).

    Args:
        sam: segment_anything ``Sam``.
        embedding: (1, C, h, w) float32, :func:`encode_frames` of the image.
        frame_size: (H, W) of the frame image that was encoded.
        points: (R, K, 2) float32 (x, y) frame pixels, all positive; or None.
        boxes: (R, 4) float32 XYXY frame pixels; or None. At least one of the two.
        multimask_output: SAM's 3-mask output.

    Returns:
        (R, M, H, W) float32 mask probabilities (sigmoid of SAM's logits) in the frame,
        M = 3 with ``multimask_output`` else 1.
    """
    if points is None and boxes is None:
        raise ValueError("decode_prompts needs points, boxes or both")
    transform = ResizeLongestSide(sam.image_encoder.img_size)
    input_size = transform.get_preprocess_shape(frame_size[0], frame_size[1], transform.target_length)
    device = embedding.device
    point_input = None
    if points is not None:
        coords = transform.apply_coords_torch(points.to(device, torch.float32), frame_size)  # (R, K, 2)
        labels = torch.ones(coords.shape[:2], dtype=torch.int64, device=device)  # (R, K)
        point_input = (coords, labels)
    box_input = None if boxes is None else transform.apply_boxes_torch(boxes.to(device, torch.float32), frame_size)
    sparse, dense = sam.prompt_encoder(points=point_input, boxes=box_input, masks=None)
    low_res, _ = sam.mask_decoder(
        image_embeddings=embedding,
        image_pe=sam.prompt_encoder.get_dense_pe(),
        sparse_prompt_embeddings=sparse,
        dense_prompt_embeddings=dense,
        multimask_output=multimask_output,
    )  # (R, M, 4h, 4w)
    logits = sam.postprocess_masks(low_res, input_size, frame_size)  # (R, M, H, W)
    return torch.sigmoid(logits)


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
    def refine_image(self, embedding: Tensor, anomaly_map: Tensor) -> tuple[Tensor, list[RegionPrompts]]:
        """MMR on one image whose SAM embedding is known.

        Args:
            embedding: (1, C, h, w) float32 SAM embedding of the frame image.
            anomaly_map: (H, W) float32 in [0, 1], ``Map_a``.

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
                self.sam, embedding, frame, points=calls[s][0], boxes=calls[s][1], multimask_output=cfg.multimask_output
            )
            for s in cfg.prompt_sets
        ]  # each (R, M, H, W)
        stacked = torch.cat(probs, dim=1)  # (R, sets * M, H, W)
        merged = merge_region_probs(list(stacked), frame)
        return merged.to(anomaly_map.device), prompts

    def refine_batch(self, batch: Mapping[str, Any], anomaly_maps: Tensor) -> RefineBatchOutput:
        """MMR on a batch (one encoder pass for the batch).

        Args:
            batch: needs ``image`` (B, 3, H, W) float32 CLIP-normalised frame images.
            anomaly_maps: (B, H, W) float32 in [0, 1].

        Returns:
            :class:`RefineBatchOutput` with (B, H, W) bool mask and float32 probabilities.
        """
        from clipsam.data.transforms import denormalize

        images = denormalize(batch["image"])  # (B, 3, H, W) uint8
        if images.shape[0] != anomaly_maps.shape[0] or images.shape[-2:] != anomaly_maps.shape[-2:]:
            raise ValueError(
                f"anomaly_maps {tuple(anomaly_maps.shape)} do not match the images {tuple(images.shape)}"
            )
        timings: dict[str, float] = {}
        start = time.perf_counter()
        embeddings = encode_frames(self.sam, images)  # (B, C, h, w)
        timings["sam_encoder"] = time.perf_counter() - start
        start = time.perf_counter()
        probs = torch.stack(
            [self.refine_image(emb[None], amap.float())[0] for emb, amap in zip(embeddings, anomaly_maps)]
        )  # (B, H, W)
        timings["mmr_decoder"] = time.perf_counter() - start
        return RefineBatchOutput(mask=probs > self.config.mask_threshold, mask_probs=probs, timings=timings)


def build(config: MmrConfig | None = None, *, sam: SamConfig | None = None) -> MmrRefiner:
    """Build the refiner: SAM from ``sam`` (default :class:`SamConfig`, i.e. vit_h), MMR from ``config``."""
    return MmrRefiner(sam=build_sam(sam or SamConfig()), config=config or MmrConfig())


def build_mmr(*, sam: SamConfig, mmr: MmrConfig | Mapping[str, Any] | None = None, **_: Any) -> MmrRefiner:
    """Registry builder (``clipsam.methods.build_refiner("mmr", sam=..., mmr=...)``).

    Args:
        sam: the module's ``model.sam`` section.
        mmr: the ``model.mmr`` section (a mapping of :class:`MmrConfig` keys, or one); None: defaults.
        **_: sections other refiners read (ignored here).

    Raises:
        ConfigError: a key :class:`MmrConfig` does not have.
    """
    if mmr is None or isinstance(mmr, MmrConfig):
        return build(mmr, sam=sam)
    names = {f.name for f in dataclasses.fields(MmrConfig)}
    unknown = sorted(set(mmr) - names)
    if unknown:
        raise ConfigError(f"model.mmr has keys {unknown} that MmrConfig does not know; valid keys: {sorted(names)}")
    return build(MmrConfig(**dict(mmr)), sam=sam)
