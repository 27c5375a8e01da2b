"""The ``ppg_cps`` refiner: the seed method's SAM stage (PPG point prompts, then the CPS cascade).

A frozen SAM encodes the ORIGINAL image as ``SamPredictor.set_image`` does (its input is built by
:func:`clipsam.inputs.build_sam_input`, declared by :func:`input_specs`); Point Prompt Generation
(:mod:`clipsam.prompting`, Eq. 5-7) makes points from the CLIP map in the frame, and Cascaded
Prompts (:mod:`clipsam.cascade`, Eq. 8-12) refine the mask over the decoder steps.

Settings: :class:`PpgCpsConfig` (``model.refiner_config``): ``sam`` (which SAM), ``prompt``
(PPG) and ``cascade`` (CPS).

Dimension symbols: B batch, N points, C SAM embedding channels, h x w SAM's embedding grid,
H x W the evaluation frame, S SAM's square input side.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Mapping
from typing import Any

import cv2
import numpy as np
import torch
from segment_anything.modeling import Sam

from clipsam.cascade import EMPTY_LOGIT, CascadeConfig, CascadeStep, logits_to_boxes
from clipsam.errors import ConfigError
from clipsam.inputs import InputSpec, build_sam_input, sam_input_size, sam_input_spec
from clipsam.models.sam import (
    EmbeddingCache,
    SamConfig,
    _freeze,
    build_sam,
    decode_mask_tokens,
    encode_sam_inputs,
    frame_to_original,
    original_to_input,
    preprocess_sam_inputs,
    sam_input_side,
    weights_identity,
)
from clipsam.prompting import PromptConfig, generate_point_prompts_batched
from clipsam.refiners.base import RefineBatchOutput, Refiner
from clipsam.settings import from_mapping

__all__ = ["CONFIG", "BatchCascade", "PpgCpsConfig", "RefineOutput", "SamRefiner", "build", "input_specs", "open_choices"]


@dataclasses.dataclass
class PpgCpsConfig:
    """Settings of the ``ppg_cps`` refiner (``model.refiner_config``).

    Attributes:
        sam: which SAM (variant, checkpoint, dtype, embedding cache); the paper's is ``vit_h``.
        prompt: Point Prompt Generation: points per image, threshold, dilation kernel.
        cascade: Cascaded Prompts: decoder steps and what each step is given.
    """

    sam: SamConfig = dataclasses.field(default_factory=SamConfig)
    prompt: PromptConfig = dataclasses.field(default_factory=PromptConfig)
    cascade: CascadeConfig = dataclasses.field(default_factory=CascadeConfig)

    def __post_init__(self) -> None:
        for name, cls in (("sam", SamConfig), ("prompt", PromptConfig), ("cascade", CascadeConfig)):
            if not isinstance(getattr(self, name), cls):
                setattr(self, name, from_mapping(cls, getattr(self, name), key=f"model.refiner_config.{name}"))


CONFIG = PpgCpsConfig


def open_choices(config: PpgCpsConfig) -> dict[str, Any]:
    """The settings the paper leaves open and clipsam takes, as ``key: value`` under ``model.refiner_config``.

    Recorded in every run report (``run.choices``) so that runs with other choices are not
    compared as equals: the threshold of ``S_a``, the numbers of points, what the ring is
    compared with, how SAM's feature grid is read, and single- or multi-mask decoding.
    """
    prompt, cascade = config.prompt, config.cascade
    return {
        "prompt.threshold": prompt.threshold,
        "prompt.num_positive": prompt.num_positive,
        "prompt.num_negative": prompt.num_negative,
        "prompt.similarity_to": prompt.similarity_to,
        "prompt.feature_sampling": prompt.feature_sampling,
        "cascade.multimask": cascade.multimask,
    }


def input_specs(config: PpgCpsConfig) -> list[InputSpec]:
    """SAM's input of the original image, at the side of ``config.sam.variant``."""
    return [sam_input_spec(sam_input_side(config.sam.variant))]


def build(config: PpgCpsConfig, *, use_embedding_cache: bool = True) -> SamRefiner:
    """Frozen SAM (``config.sam``) + PPG (``config.prompt``) + CPS (``config.cascade``).

    Args:
        config: the refiner's settings.
        use_embedding_cache: False skips ``sam.embedding_cache_dir`` (predict does, unless
            ``model.evaluation.predict_embedding_cache``); its size is bounded by
            ``sam.embedding_cache_max_gb`` (least recently used entries go first).
    """
    sam = config.sam
    model = build_sam(sam)
    cache = None
    if sam.embedding_cache_dir and use_embedding_cache:
        # Entries of another shape (other weights under the same key, damage) are recomputed.
        shape = (1, model.prompt_encoder.embed_dim, *model.prompt_encoder.image_embedding_size)
        max_gb = sam.embedding_cache_max_gb
        cache = EmbeddingCache(sam.embedding_cache_dir, embedding_shape=shape, max_bytes=int(max_gb * 1e9) if max_gb else None)
    return SamRefiner(
        sam=model,
        prompt=config.prompt,
        cascade=config.cascade,
        embedding_cache=cache,
        weights_id=weights_identity(sam),
        compile_encoder=sam.compile,
    )


@dataclasses.dataclass
class RefineOutput:
    """What :meth:`SamRefiner.refine` returns for one image.

    Attributes:
        mask: (H, W) bool, the final cascade mask (M_3 with 3 steps) in the frame; all False
            without points.
        mask_probs: (H, W) float32 in [0, 1], sigmoid of the final mask logits (0 without points).
        point_coords: (N, 2) float32, (x, y) frame pixels (positives first).
        point_labels: (N,) int64, 1 positive, 0 negative.
        steps: one :class:`clipsam.cascade.CascadeStep` per decoder call: ``mask_logits`` /
            ``mask`` in the frame, ``box`` in ORIGINAL-image pixels (the box of the previous
            step's mask at the original size, as ``SamPredictor`` would get it).
        timings: seconds per stage: "sam_encoder" (encoder pass or cache load; 0 when the
            embedding was passed in), "ppg", "cascade_step_1" ... for the steps that ran.
        cache_hit: True if the embedding came from the embedding cache, None if there is no cache
            or the embedding was passed in.
        original_logits: (H0, W0) float32, the final mask logits at the original image size
            (what ``SamPredictor.predict(return_logits=True)`` returns); -inf without points.
    """

    mask: torch.Tensor
    mask_probs: torch.Tensor
    point_coords: torch.Tensor
    point_labels: torch.Tensor
    steps: list[CascadeStep]
    timings: dict[str, float]
    cache_hit: bool | None = None
    original_logits: torch.Tensor | None = None


@dataclasses.dataclass
class BatchCascade:
    """The batched cascade's output for R prompt sets (one per image, or per region).

    Attributes:
        frame_logits: (R, H, W) float32 final mask logits in the frame (-inf without points).
        low_res_logits: per step, (R, 1, 4h, 4w) float32 decoder logits (SAM's mask_input).
        boxes: per step, (R, 4) float32 XYXY original-image pixels given to the step, or None
            for steps without a box; ``box_valid`` (R,) bool says which rows had one.
        box_valid: per step, (R,) bool or None.
        has_points: (R,) bool, prompt sets with at least one point.
        seconds: per step, wall seconds.
        ious: per step, (R,) the decoder's predicted IoU of the chosen mask.
    """

    frame_logits: torch.Tensor
    low_res_logits: list[torch.Tensor]
    boxes: list[torch.Tensor | None]
    box_valid: list[torch.Tensor | None]
    has_points: torch.Tensor
    seconds: list[float]
    ious: list[torch.Tensor] = dataclasses.field(default_factory=list)


class SamRefiner(Refiner):
    """PPG + CPS with a frozen SAM that encodes the ORIGINAL image (SAM stage contract, design.md).

    SAM sees each image as ``SamPredictor.set_image`` does: the original image, long side resized
    to S = ``image_encoder.img_size`` with the aspect kept, normalised and zero-padded to S x S
    (the resize happens in the DataLoader worker, :func:`clipsam.inputs.build_sam_input`;
    normalisation and padding here, batched on the device). PPG works on the frame (the CLIP
    map) with the SAM features of the valid, un-padded part of the embedding; its points are
    mapped frame -> original -> SAM input; CPS boxes are boxes of the previous step's mask at the
    ORIGINAL size (as a ``SamPredictor`` cascade gets them); masks come back to the frame with
    ``Sam.postprocess_masks`` for fusion and metrics.

    The whole stage is batched: one encoder call per batch (cache hits skipped), PPG for the
    batch (:func:`clipsam.prompting.generate_point_prompts_batched`), then per cascade step one
    prompt-encoder and one mask-decoder call for all prompt sets with the same number of real
    points (and, at step 3, with or without a box). SAM sees only the real points of each image,
    as a ``SamPredictor`` call with them: fewer pixels in ``S_a`` or its ring than k give fewer
    points, never filler points.
    SAM stays in eval mode even if a parent module is put in training mode.

    Args:
        sam: a ``segment_anything.modeling.Sam`` (frozen here).
        prompt: PPG settings.
        cascade: CPS settings.
        embedding_cache: optional on-disk cache of image embeddings.
        weights_id: identity of SAM's weights (:func:`weights_identity`); required with a cache so
            embeddings from other weights are never reused.
        compile_encoder: run the image encoder through ``torch.compile`` (``model.sam.compile``).
    """

    name = "ppg_cps"

    def __init__(
        self,
        *,
        sam: Sam,
        prompt: PromptConfig,
        cascade: CascadeConfig,
        embedding_cache: EmbeddingCache | None = None,
        weights_id: str = "",
        compile_encoder: bool = False,
    ) -> None:
        super().__init__()
        if embedding_cache is not None and not weights_id:
            raise ValueError("SamRefiner: pass weights_id=weights_identity(config) when using an embedding cache")
        self.sam = _freeze(sam)
        self.prompt = prompt
        self.cascade = cascade
        self.embedding_cache = embedding_cache
        self.weights_id = weights_id
        self.encoder_calls = 0  # images passed through the image encoder (for tests/benchmarks)
        self.sync_timings = False  # synchronise the device around timed stages (benchmarks)
        # The callable that runs the image encoder (not a registered sub-module: sam owns it).
        self.__dict__["encoder"] = torch.compile(sam.image_encoder) if compile_encoder else sam.image_encoder

    def train(self, mode: bool = True) -> SamRefiner:
        """Keep SAM in eval mode whatever ``mode`` is."""
        super().train(mode)
        self.sam.eval()
        return self

    @property
    def device(self) -> torch.device:
        return self.sam.device

    @property
    def side(self) -> int:
        """S, SAM's square input side (``image_encoder.img_size``)."""
        return int(self.sam.image_encoder.img_size)

    @property
    def model_id(self) -> str:
        """Weights identity + encoder dtype + input side: the model part of cache keys."""
        encoder_dtype = next(self.sam.image_encoder.parameters()).dtype
        return f"{self.weights_id}|{encoder_dtype}|{self.side}"

    def _now(self) -> float:
        if self.sync_timings and self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    # ------------------------------------------------------------------ encoder
    def preprocess(self, sam_images: torch.Tensor, sam_sizes: torch.Tensor) -> torch.Tensor:
        """``Sam.preprocess`` for a batch (:func:`clipsam.models.sam.preprocess_sam_inputs`)."""
        return preprocess_sam_inputs(self.sam, sam_images, sam_sizes)

    def _encode(self, sam_images: torch.Tensor, sam_sizes: torch.Tensor) -> torch.Tensor:
        self.encoder_calls += sam_images.shape[0]
        return encode_sam_inputs(self.sam, sam_images, sam_sizes, encoder=self.encoder)

    def encode(self, sam_images: torch.Tensor, sam_sizes: torch.Tensor) -> torch.Tensor:
        """SAM image embeddings of a batch of SAM inputs, through the cache when there is one.

        The cache key is the valid (h, w) part of each uint8 input (what is encoded) and the
        model identity; images not in the cache are encoded in one batched call, then stored.

        Returns:
            (B, C, h, w) float32 embeddings of the padded S x S inputs, on SAM's device.
        """
        if sam_images.ndim != 4 or sam_images.shape[1:] != (3, self.side, self.side) or sam_images.dtype != torch.uint8:
            raise ValueError(
                f"sam_images must be uint8 (B, 3, {self.side}, {self.side}) (data.sam_image_size must be SAM's "
                f"input side {self.side}), got {sam_images.dtype} {tuple(sam_images.shape)}"
            )
        cache = self.embedding_cache
        if cache is None:
            return self._encode(sam_images, sam_sizes)
        sizes = sam_sizes.tolist()
        keys = [cache.key(img[:, :h, :w], model_id=self.model_id) for img, (h, w) in zip(sam_images, sizes)]
        found = [cache.load(key) for key in keys]
        todo = [i for i, emb in enumerate(found) if emb is None]
        if todo:
            computed = self._encode(sam_images[todo], sam_sizes[todo])
            for i, emb in zip(todo, computed):
                cache.save(keys[i], emb[None])
                found[i] = emb[None]
        return torch.cat([emb.to(self.device) for emb in found])  # (B, C, h, w)

    def sam_inputs(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """SAM inputs of uint8 (B, 3, H0, W0) original images (host, per image; not the hot path)."""
        if images.ndim != 4 or images.shape[1] != 3 or images.dtype != torch.uint8:
            raise ValueError(f"images must be uint8 (B, 3, H, W), got {images.dtype} {tuple(images.shape)}")
        built = [build_sam_input(img.permute(1, 2, 0).cpu().numpy(), self.side) for img in images]
        return torch.stack([b[0] for b in built]), torch.stack([b[1] for b in built])

    @torch.no_grad()
    def embed_images(self, images: torch.Tensor) -> torch.Tensor:
        """SAM image embeddings of ORIGINAL images (as ``SamPredictor.set_image`` computes them).

        Args:
            images: uint8 (B, 3, H0, W0) original images (RGB, 0-255), one size for the batch.

        Returns:
            (B, C, h, w) float32 embeddings (of the padded S x S input) on SAM's device.
        """
        return self.encode(*self.sam_inputs(images))

    # ------------------------------------------------------------------ decoder
    def _decode(
        self,
        embeddings: torch.Tensor,
        points: torch.Tensor,
        labels: torch.Tensor,
        boxes: torch.Tensor | None,
        mask_input: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Prompt encoder + mask decoder for R prompt sets on their own R image embeddings.

        Row r's prompts meet row r's embedding (:func:`clipsam.models.sam.decode_mask_tokens`).

        Args:
            embeddings: (R, C, h, w); points: (R, N, 2) SAM input pixels; labels: (R, N), the real
            points only (1 / 0: SAM adds its own padding point when ``boxes`` is None);
            boxes: (R, 4) SAM input pixels or None; mask_input: (R, 1, 4h, 4w) logits or None.

        Returns:
            (R, 1, 4h, 4w) low-res logits of the chosen mask and (R,) its predicted IoU.
        """
        sparse, dense = self.sam.prompt_encoder(points=(points, labels), boxes=boxes, masks=mask_input)
        masks, iou = decode_mask_tokens(self.sam, embeddings, sparse, dense)
        rows = masks.shape[0]
        if self.cascade.multimask:
            masks, iou = masks[:, 1:], iou[:, 1:]
            best = iou.argmax(1)
            pick = torch.arange(rows, device=masks.device)
            return masks[pick, best][:, None], iou[pick, best]
        return masks[:, :1], iou[:, 0]

    def _postprocess(
        self, low_res: torch.Tensor, groups: list[tuple[list[int], tuple[int, int], tuple[int, int]]]
    ) -> list[tuple[list[int], torch.Tensor]]:
        """``Sam.postprocess_masks`` per group of rows sharing (input size, target size)."""
        return [(rows, self.sam.postprocess_masks(low_res[rows], inp, out)[:, 0]) for rows, inp, out in groups]

    @staticmethod
    def _groups(rows: list[int], keys: list[tuple]) -> list[tuple[list[int], tuple[int, int], tuple[int, int]]]:
        """``rows`` grouped by their (input size, target size) ``keys``."""
        by_key: dict[tuple, list[int]] = {}
        for row, key in zip(rows, keys):
            by_key.setdefault(key, []).append(row)
        return [(group, key[0], key[1]) for key, group in by_key.items()]

    @staticmethod
    def _real_points(points: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
        """Each row's real points (label >= 0) moved to its first slots, their order kept.

        Args:
            points: (R, K, 2); labels: (R, K), -1 for an empty slot.

        Returns:
            ``(points, labels, counts)``: reordered (R, K, 2) and (R, K), and the real points of
            each row (one host sync).
        """
        real = labels >= 0
        order = torch.sort((~real).to(torch.int32), dim=1, stable=True).indices  # (R, K) real slots first
        points = torch.gather(points, 1, order[..., None].expand(-1, -1, 2))
        return points, torch.gather(labels, 1, order), real.sum(1).tolist()

    def run_cascade_batched(
        self,
        embeddings: torch.Tensor,
        point_coords: torch.Tensor,
        point_labels: torch.Tensor,
        *,
        frame_size: tuple[int, int],
        input_sizes: list[tuple[int, int]],
        original_sizes: list[tuple[int, int]],
        skip_empty: bool = False,
    ) -> BatchCascade:
        """CPS for R prompt sets at once (Eq. 8-12), ``cascade.num_steps`` decoder calls.

        Step 1: points; step 2: points + step 1's low-res logits; step 3: points + the box of
        step 2's mask at the ORIGINAL size (:func:`clipsam.cascade.logits_to_boxes`) + step 2's
        logits. A row whose step-2 mask is empty gets no box (points + logits), as
        :func:`clipsam.cascade.run_cascade` does.

        Each row gives SAM its real points only (labels 0 / 1; empty slots, label -1, are
        dropped), so a row computes what ``SamPredictor.predict(point_coords=<its real points>,
        point_labels=..., box=..., mask_input=...)`` computes: SAM's prompt encoder appends its
        own padding point when there is no box, and an extra "not a point" token would change
        the masks. Rows are therefore decoded in groups of equal real-point count (and, at step
        3, with or without a box): one prompt-encoder + mask-decoder call per group and step.

        Args:
            embeddings: (R, C, h, w) each row's image embedding.
            point_coords: (R, K, 2) float32 (x, y) frame pixels; point_labels: (R, K) int64, 1
                positive, 0 negative, -1 empty slot (anywhere in the row).
            frame_size: (H, W).
            input_sizes: R (h', w') valid SAM-input sizes; original_sizes: R (H0, W0).
            skip_empty: return at once (no decoder call) when no row has a point.

        Returns:
            A :class:`BatchCascade`; rows without points are not decoded: -inf low-res and frame
            logits, predicted IoU 0, no box.
        """
        rows = point_coords.shape[0]
        device = embeddings.device
        original_t = torch.tensor(original_sizes, dtype=torch.int64).view(rows, 2)
        input_t = torch.tensor(input_sizes, dtype=torch.int64).view(rows, 2)
        original_coords = frame_to_original(point_coords.to(device), frame_size, original_t)
        points, labels, counts = self._real_points(
            original_to_input(original_coords, original_t, input_t), point_labels.to(device)
        )
        active = [r for r, count in enumerate(counts) if count > 0]
        has_points = torch.tensor([count > 0 for count in counts], dtype=torch.bool, device=device)
        ratio = (input_t.to(torch.float64) / original_t.to(torch.float64)).flip(1).repeat(1, 2).to(device)
        out = BatchCascade(  # frame_logits: set at the end
            frame_logits=torch.empty(0), low_res_logits=[], boxes=[], box_valid=[], has_points=has_points, seconds=[],
        )
        if rows == 0 or (skip_empty and not active):
            out.frame_logits = torch.full((rows, *frame_size), EMPTY_LOGIT, dtype=torch.float32, device=device)
            return out
        to_original = self._groups(active, [(tuple(input_sizes[r]), tuple(original_sizes[r])) for r in active])
        to_frame = self._groups(active, [(tuple(input_sizes[r]), tuple(frame_size)) for r in active])
        low_res: torch.Tensor | None = None
        for step in range(1, self.cascade.num_steps + 1):
            start = self._now()
            boxes = valid = boxes_in = None
            boxed = [False] * rows
            if step == 3:
                boxes = torch.zeros((rows, 4), dtype=torch.float32, device=device)
                valid = torch.zeros(rows, dtype=torch.bool, device=device)
                for group, logits in self._postprocess(low_res, to_original):
                    index = torch.tensor(group, dtype=torch.int64, device=device)
                    boxes[index], valid[index] = logits_to_boxes(logits, self.cascade.mask_threshold)
                boxes_in = (boxes.to(torch.float64) * ratio).to(torch.float32)  # apply_boxes
                boxed = valid.tolist()  # one sync: which decoder calls to make
            calls: dict[tuple[int, bool], list[int]] = {}
            for r in active:
                calls.setdefault((counts[r], bool(boxed[r])), []).append(r)
            low_res, iou = self._decode_groups(embeddings, points, labels, boxes_in, low_res, calls, rows)
            out.low_res_logits.append(low_res)
            out.ious.append(iou)
            out.boxes.append(boxes)
            out.box_valid.append(valid)
            out.seconds.append(self._now() - start)
        groups = self._postprocess(low_res, to_frame)
        if len(groups) == 1 and len(groups[0][0]) == rows:  # every row, one SAM input size: already in order
            out.frame_logits = groups[0][1]
        else:
            out.frame_logits = torch.full((rows, *frame_size), EMPTY_LOGIT, dtype=torch.float32, device=device)
            for group, logits in groups:
                out.frame_logits[torch.tensor(group, dtype=torch.int64, device=device)] = logits
        return out

    def _decode_groups(
        self,
        embeddings: torch.Tensor,
        points: torch.Tensor,
        labels: torch.Tensor,
        boxes: torch.Tensor | None,
        mask_input: torch.Tensor | None,
        calls: dict[tuple[int, bool], list[int]],
        rows: int,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One cascade step: a :meth:`_decode` call per group of rows with N real points (and a box or not).

        Args:
            embeddings: (R, C, h, w); points: (R, K, 2) SAM input pixels, real points first;
            labels: (R, K); boxes: (R, 4) SAM input pixels or None; mask_input: (R, 1, 4h, 4w)
            or None; calls: (N, with box) -> the rows decoded together; rows: R.

        Returns:
            (R, 1, 4h, 4w) low-res logits (-inf for rows in no group) and (R,) predicted IoU (0 there).
        """
        if len(calls) == 1:
            ((count, with_box), group), = calls.items()
            if len(group) == rows:  # the whole batch in one call: no gathering
                return self._decode(
                    embeddings, points[:, :count], labels[:, :count], boxes if with_box else None, mask_input
                )
        device = embeddings.device
        low_res = torch.full(
            (rows, 1, *self.sam.prompt_encoder.mask_input_size), EMPTY_LOGIT, dtype=torch.float32, device=device
        )
        iou = torch.zeros(rows, dtype=torch.float32, device=device)
        for (count, with_box), group in calls.items():
            index = torch.tensor(group, dtype=torch.int64, device=device)
            low_res[index], iou[index] = self._decode(
                embeddings[index],
                points[index, :count],
                labels[index, :count],
                boxes[index] if with_box else None,
                mask_input[index] if mask_input is not None else None,
            )
        return low_res, iou

    # ------------------------------------------------------------------ PPG + CPS
    def feature_extent(self, embeddings: torch.Tensor, input_sizes: torch.Tensor) -> torch.Tensor:
        """(B, 2) float64 feature cells covered by the valid input: ``(h' * h / S, w' * w / S)``."""
        grid = torch.tensor(embeddings.shape[-2:], dtype=torch.float64)
        return input_sizes.to(torch.float64).cpu() * grid / self.side

    def _region_maps(self, anomaly_maps: torch.Tensor) -> tuple[torch.Tensor, list[int]]:
        """``Map_a`` on each connected component of ``S_a`` (8-connectivity), for ``per_region``.

        Components are ordered by their peak value (highest first) and capped at
        ``cascade.max_regions`` per image; an image without a component keeps its own (empty) map.
        Runs on the host (OpenCV's labelling).

        Returns:
            (R, H, W) maps and the R image indices they belong to.
        """
        maps, owners = [], []
        for b, amap in enumerate(anomaly_maps):
            region = (amap >= self.prompt.threshold).cpu().numpy().astype(np.uint8)
            count, components = cv2.connectedComponents(region, connectivity=8)
            components_t = torch.from_numpy(components).to(amap.device)
            peaks = [(float(amap[components_t == c].max()), c) for c in range(1, count)]
            chosen = [c for _, c in sorted(peaks, key=lambda pc: (-pc[0], pc[1]))[: self.cascade.max_regions]]
            for c in chosen:
                maps.append(torch.where(components_t == c, amap, torch.zeros_like(amap)))
                owners.append(b)
            if not chosen:
                maps.append(amap)
                owners.append(b)
        return torch.stack(maps), owners

    @torch.no_grad()
    def refine_embedded(
        self,
        embeddings: torch.Tensor,
        anomaly_maps: torch.Tensor,
        *,
        input_sizes: list[tuple[int, int]],
        original_sizes: list[tuple[int, int]],
        skip_empty: bool = False,
    ) -> dict:
        """PPG then CPS for a batch whose SAM embeddings are known.

        Args:
            embeddings: (B, C, h, w) float32 SAM embeddings of the originals' SAM inputs.
            anomaly_maps: (B, H, W) float32 in [0, 1], ``Map_a`` in the frame.
            input_sizes: B (h', w') valid SAM-input sizes; original_sizes: B (H0, W0).

        Returns:
            dict: ``mask`` (B, H, W) bool, ``logits`` (B, H, W) float32 frame logits,
            ``coords`` (R, K, 2) / ``labels`` (R, K) frame points, ``owners`` (R image indices),
            ``cascade`` (:class:`BatchCascade`), ``timings``.
        """
        timings: dict[str, float] = {}
        frame = (int(anomaly_maps.shape[1]), int(anomaly_maps.shape[2]))
        amaps = anomaly_maps.to(self.device, torch.float32)
        extent = self.feature_extent(embeddings, torch.tensor(input_sizes, dtype=torch.int64).view(-1, 2))
        if self.cascade.per_region:
            amaps, owners = self._region_maps(amaps)
        else:
            owners = list(range(amaps.shape[0]))
        index = torch.tensor(owners, dtype=torch.int64)
        row_embeddings = embeddings if not self.cascade.per_region else embeddings[index.to(embeddings.device)]
        start = self._now()
        coords, labels = generate_point_prompts_batched(
            amaps, row_embeddings, feature_extent=extent[index].to(self.device), **self.prompt.kwargs()
        )
        timings["ppg"] = self._now() - start
        result = self.run_cascade_batched(
            row_embeddings,
            coords,
            labels,
            frame_size=frame,
            input_sizes=[tuple(input_sizes[o]) for o in owners],
            original_sizes=[tuple(original_sizes[o]) for o in owners],
            skip_empty=skip_empty,
        )
        for step, seconds in enumerate(result.seconds, start=1):
            timings[f"cascade_step_{step}"] = seconds
        logits = result.frame_logits
        if self.cascade.per_region:  # union of the region masks = max of their logits
            merged = torch.full((embeddings.shape[0], *frame), EMPTY_LOGIT, device=logits.device)
            owner = index.to(logits.device).view(-1, 1, 1).expand_as(logits)
            logits = merged.scatter_reduce_(0, owner, logits, "amax", include_self=True)
        return {
            "mask": logits > self.cascade.mask_threshold,
            "logits": logits,
            "coords": coords,
            "labels": labels,
            "owners": owners,
            "cascade": result,
            "timings": timings,
        }

    @torch.no_grad()
    def refine_batch(self, batch: Mapping[str, Any], anomaly_maps: torch.Tensor) -> RefineBatchOutput:
        """The refiner interface: the batch's SAM inputs + the CLIP maps -> masks in the frame.

        Reads ``sam_image`` uint8 (B, 3, S, S), ``sam_size`` (B, 2) and ``original_size`` (B, 2)
        from the batch (the dataset adds them when ``data.sam_image_size`` is set, which
        ``ClipSamModule`` does for test/validate/predict). One host sync reads the sizes.

        Args:
            batch: the DataLoader batch.
            anomaly_maps: (B, H, W) float32 in [0, 1], ``Map_a`` in the frame.

        Returns:
            :class:`~clipsam.methods.base.RefineBatchOutput` with ``mask`` (B, H, W) bool and
            ``mask_probs`` (B, H, W) float32 on ``anomaly_maps``' device, and timings
            ("sam_encoder", "ppg", "cascade_step_k").
        """
        if "sam_image" not in batch or "sam_size" not in batch:
            raise ConfigError(
                "the batch has no 'sam_image'/'sam_size': the SAM stage encodes the original image, built by "
                f"clipsam.inputs.build_sam_input at SAM's side {self.side}; run it through clipsam.pipeline.Pipeline "
                "(which declares the input to the data side) or add the keys yourself"
            )
        sam_images, sam_sizes = batch["sam_image"], batch["sam_size"]
        sizes = torch.cat((sam_sizes.reshape(-1, 2), batch["original_size"].reshape(-1, 2).to(sam_sizes.device)), 1).tolist()
        start = self._now()
        embeddings = self.encode(sam_images, sam_sizes)
        encoder_seconds = self._now() - start
        out = self.refine_embedded(
            embeddings,
            anomaly_maps,
            input_sizes=[(s[0], s[1]) for s in sizes],
            original_sizes=[(s[2], s[3]) for s in sizes],
        )
        device = anomaly_maps.device
        return RefineBatchOutput(
            mask=out["mask"].to(device),
            mask_probs=torch.sigmoid(out["logits"]).to(device),
            timings={"sam_encoder": encoder_seconds, **out["timings"]},
        )

    @torch.no_grad()
    def refine(
        self, image: torch.Tensor, anomaly_map: torch.Tensor, *, embedding: torch.Tensor | None = None
    ) -> RefineOutput:
        """PPG then CPS on one image (the batched path on a batch of one).

        Args:
            image: uint8 (3, H0, W0), the ORIGINAL image (RGB, 0-255), any size.
            anomaly_map: (H, W) float32 in [0, 1], the CLIP map ``Map_a`` in the frame.
            embedding: optional precomputed (C, h, w) or (1, C, h, w) embedding of ``image``
                (from :meth:`embed_images`), skipping the encoder and the cache.

        Returns:
            A :class:`RefineOutput`, tensors on ``anomaly_map``'s device.
        """
        if image.ndim != 3 or image.shape[0] != 3 or image.dtype != torch.uint8:
            raise ValueError(f"image must be uint8 (3, H, W), got {image.dtype} {tuple(image.shape)}")
        if anomaly_map.ndim != 2:
            raise ValueError(f"anomaly_map must be (H, W), got {tuple(anomaly_map.shape)}")
        out_device = anomaly_map.device
        original = (int(image.shape[1]), int(image.shape[2]))
        input_size = sam_input_size(*original, self.side)
        timings: dict[str, float] = {}
        cache_hit: bool | None = None
        if embedding is None:
            hits = self.embedding_cache.hits if self.embedding_cache is not None else 0
            start = self._now()
            emb = self.embed_images(image[None])
            timings["sam_encoder"] = self._now() - start
            if self.embedding_cache is not None:
                cache_hit = self.embedding_cache.hits > hits
        else:
            emb = (embedding if embedding.ndim == 4 else embedding[None]).to(self.device, torch.float32)
            timings["sam_encoder"] = 0.0
        out = self.refine_embedded(
            emb, anomaly_map[None], input_sizes=[input_size], original_sizes=[original], skip_empty=True
        )
        timings.update(out["timings"])
        result: BatchCascade = out["cascade"]
        keep = out["labels"] >= 0  # (R, K)
        steps: list[CascadeStep] = []
        for r in range(len(out["owners"])):
            if not bool(result.has_points[r]):
                continue
            for k, low_res in enumerate(result.low_res_logits):
                logits = self._postprocess(low_res[r : r + 1], [([0], input_size, tuple(anomaly_map.shape))])[0][1][0]
                box = result.boxes[k]
                has_box = box is not None and bool(result.box_valid[k][r])
                steps.append(
                    CascadeStep(
                        mask_logits=logits.to(out_device),
                        mask=(logits > self.cascade.mask_threshold).to(out_device),
                        low_res_logits=low_res[r],
                        iou=result.ious[k][r],
                        box=box[r].to(out_device) if has_box else None,
                        used_mask_input=k >= 1,
                        seconds=result.seconds[k],
                    )
                )
        original_logits = None
        if result.low_res_logits:
            per_row = self.sam.postprocess_masks(result.low_res_logits[-1], input_size, original)[:, 0]
            per_row = torch.where(result.has_points[:, None, None], per_row, EMPTY_LOGIT)
            original_logits = per_row.amax(0).to(out_device)
        else:
            original_logits = torch.full(original, EMPTY_LOGIT, device=out_device)
        return RefineOutput(
            mask=out["mask"][0].to(out_device),
            mask_probs=torch.sigmoid(out["logits"][0]).to(out_device),
            point_coords=out["coords"][keep].to(out_device),
            point_labels=out["labels"][keep].to(out_device),
            steps=steps,
            timings=timings,
            cache_hit=cache_hit,
            original_logits=original_logits,
        )
