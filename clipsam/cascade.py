"""CPS: Cascaded Prompts for SAM over a mask-decoder callable (the paper, Eq. 8-12).

Three calls of SAM's light mask decoder on one image embedding:

1. ``M1, logit1 = Dec(F, P)``                   points only (Eq. 9);
2. ``M2, logit2 = Dec(F, P, logit1)``           points + step 1's low-res logits as mask prompt (10);
3. ``M3 = Dec(F, P, box(M2), logit2)``          points + box of M2 + step 2's low-res logits (11-12).

The decoder is any callable with the signature of :data:`DecodeFn`, so the cascade is tested
with a recording stand-in; :class:`clipsam.models.sam.SamRefiner` supplies SAM's prompt encoder
+ mask decoder.

Dimension symbols: N points, H x W the evaluation frame (where masks and boxes live).
Boxes are XYXY in frame pixels with inclusive integer corners ``(x_min, y_min, x_max, y_max)``
of the mask's pixels, as ``segment_anything.utils.amg.batched_mask_to_box`` gives them (SAM's
prompt encoder adds 0.5 to reach pixel centres).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable

import torch

from clipsam.errors import ConfigError

__all__ = ["CascadeConfig", "CascadeResult", "CascadeStep", "DecodeFn", "logits_to_boxes", "mask_to_box", "masks_to_boxes", "run_cascade"]

DecodeFn = Callable[
    [torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None],
    tuple[torch.Tensor, torch.Tensor, torch.Tensor],
]
"""``decode(point_coords, point_labels, box, mask_input) -> (mask_logits, low_res_logits, iou)``.

- point_coords: (N, 2) float32, (x, y) frame pixels; point_labels: (N,) int64 (1 pos, 0 neg);
- box: (4,) float32 XYXY frame pixels, or None;
- mask_input: low-res logits of a previous call (SAM: (1, 256, 256)), or None;
- returns mask_logits (H, W) float32 at frame resolution, low_res_logits (SAM: (1, 256, 256))
  and iou: the decoder's predicted mask quality (scalar tensor).
"""

EMPTY_LOGIT = float("-inf")
"""Logit of every pixel when there is nothing to segment (no points): sigmoid gives exactly 0."""


@dataclasses.dataclass
class CascadeConfig:
    """CPS settings (config key ``model.refiner_config.cascade``).

    Attributes:
        num_steps: decoder calls, 1 (points only), 2 (+ logits) or 3 (+ box; the paper's
            method). The paper's cascade ablation is num_steps 1 / 2 / 3.
        multimask: ask SAM's decoder for its 3 candidate masks and keep the one with the best
            predicted IoU at every step (SAM's advice for ambiguous prompts; that mask's
            low-res logits feed the next step). The paper does not specify; clipsam's choice:
            False, one mask, SAM's advice for several points.
        mask_threshold: logit threshold of the binary masks (SAM's ``mask_threshold``, 0.0).
        per_region: run one cascade per connected component of ``S_a`` (PPG on that region
            alone) and take the union of the masks and the max of their probabilities, instead
            of one cascade per image. The paper runs one per image (default False); this helps
            images with several separate defects.
        max_regions: with ``per_region``, at most this many regions (highest ``Map_a`` peak
            first), bounding the decoder calls per image.

    Fixed (not keys; the paper does not specify, clipsam's choices): the box of step 3 is the
    bounding box of step 2's binary mask at the ORIGINAL image size (what a ``SamPredictor``
    user gets back and would box), inclusive pixel corners; when that mask is empty, step 3
    runs with points + logits only.
    """

    num_steps: int = 3
    multimask: bool = False
    mask_threshold: float = 0.0
    per_region: bool = False
    max_regions: int = 8

    def __post_init__(self) -> None:
        if self.num_steps not in (1, 2, 3):
            raise ConfigError(f"model.refiner_config.cascade.num_steps={self.num_steps} must be 1, 2 or 3")
        if self.max_regions < 1:
            raise ConfigError(f"model.refiner_config.cascade.max_regions={self.max_regions} must be >= 1")


@dataclasses.dataclass
class CascadeStep:
    """One decoder call of the cascade.

    Attributes:
        mask_logits: (H, W) float32 mask logits in the frame.
        mask: (H, W) bool, ``mask_logits > mask_threshold``.
        low_res_logits: the decoder's low-res logits (SAM: (1, 256, 256)), the next step's mask prompt.
        iou: scalar tensor, the decoder's predicted IoU.
        box: (4,) float32 XYXY frame pixels given to this call, or None.
        used_mask_input: whether the previous step's low-res logits were given to this call.
        seconds: wall time of the call.
    """

    mask_logits: torch.Tensor
    mask: torch.Tensor
    low_res_logits: torch.Tensor
    iou: torch.Tensor
    box: torch.Tensor | None
    used_mask_input: bool
    seconds: float


@dataclasses.dataclass
class CascadeResult:
    """The cascade's output.

    Attributes:
        mask: (H, W) bool, the last step's mask (M_3 with 3 steps); all False without points.
        mask_logits: (H, W) float32, the last step's logits; :data:`EMPTY_LOGIT` without points.
        steps: one :class:`CascadeStep` per decoder call (empty without points).
    """

    mask: torch.Tensor
    mask_logits: torch.Tensor
    steps: list[CascadeStep]


def mask_to_box(mask: torch.Tensor) -> torch.Tensor | None:
    """Bounding box of a mask (Eq. 11, ``F_location``).

    Args:
        mask: (H, W) bool.

    Returns:
        (4,) float32 XYXY ``(x_min, y_min, x_max, y_max)``, inclusive pixel indices of the
        mask's pixels, or None when the mask is empty.
    """
    ys, xs = torch.nonzero(mask, as_tuple=True)
    if ys.numel() == 0:
        return None
    return torch.stack((xs.min(), ys.min(), xs.max(), ys.max())).to(torch.float32)


def run_cascade(
    decode: DecodeFn,
    *,
    point_coords: torch.Tensor,
    point_labels: torch.Tensor,
    num_steps: int = 3,
    mask_threshold: float = 0.0,
    frame_size: tuple[int, int] | None = None,
) -> CascadeResult:
    """Run CPS: ``num_steps`` decoder calls, each fed by the previous one (Eq. 8-12).

    Step 1 gets the points only; step 2 the points and step 1's low-res logits as mask prompt;
    step 3 the points, the box of step 2's binary mask and step 2's low-res logits. When step
    2's mask is empty its box does not exist and step 3 runs with points + logits only (its
    ``box`` is None).

    Args:
        decode: the decoder callable (see :data:`DecodeFn`).
        point_coords: (N, 2) float32, (x, y) frame pixels (P = Concat(P_h, P_l), Eq. 8).
        point_labels: (N,) int64, 1 positive, 0 negative.
        num_steps: 1, 2 or 3.
        mask_threshold: logit threshold of the binary masks (SAM: 0.0).
        frame_size: (H, W), needed only to return the empty result when there are no points.

    Returns:
        A :class:`CascadeResult`. With N = 0 the decoder is not called: the mask is all False
        and the logits are :data:`EMPTY_LOGIT` (frame_size must then be given).

    Raises:
        ValueError: num_steps not in {1, 2, 3}, mismatched points/labels, or no points and no
            frame_size.
    """
    if num_steps not in (1, 2, 3):
        raise ValueError(f"num_steps must be 1, 2 or 3, got {num_steps}")
    if point_coords.ndim != 2 or point_coords.shape[1] != 2 or point_labels.shape != point_coords.shape[:1]:
        raise ValueError(
            f"point_coords must be (N, 2) and point_labels (N,), got {tuple(point_coords.shape)} "
            f"and {tuple(point_labels.shape)}"
        )
    if point_coords.shape[0] == 0:
        if frame_size is None:
            raise ValueError("no points: pass frame_size=(H, W) to get the empty result")
        empty = torch.zeros(frame_size, dtype=torch.bool, device=point_coords.device)
        logits = torch.full(frame_size, EMPTY_LOGIT, dtype=torch.float32, device=point_coords.device)
        return CascadeResult(mask=empty, mask_logits=logits, steps=[])

    steps: list[CascadeStep] = []
    for step in range(1, num_steps + 1):
        mask_input = steps[-1].low_res_logits if step >= 2 else None
        box = mask_to_box(steps[-1].mask) if step == 3 else None
        start = time.perf_counter()
        mask_logits, low_res, iou = decode(point_coords, point_labels, box, mask_input)
        seconds = time.perf_counter() - start
        mask_logits = mask_logits.to(torch.float32)
        steps.append(
            CascadeStep(
                mask_logits=mask_logits,
                mask=mask_logits > mask_threshold,
                low_res_logits=low_res,
                iou=iou,
                box=box,
                used_mask_input=mask_input is not None,
                seconds=seconds,
            )
        )
    return CascadeResult(mask=steps[-1].mask, mask_logits=steps[-1].mask_logits, steps=steps)


def masks_to_boxes(masks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Bounding boxes of a batch of masks (Eq. 11, ``F_location``) without a host sync.

    Args:
        masks: (N, H, W) bool.

    Returns:
        ``(boxes, valid)``: (N, 4) float32 XYXY inclusive pixel indices as :func:`mask_to_box`
        (zeros for an empty mask) and (N,) bool, False for empty masks.
    """
    return _boxes_of_occupied(masks.any(2), masks.any(1))


def logits_to_boxes(logits: torch.Tensor, threshold: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``masks_to_boxes(logits > threshold)`` without forming the masks.

    A row (column) holds a pixel above ``threshold`` exactly when its maximum is above it, so two
    max-reductions replace the comparison and the two any-reductions over every pixel.

    Args:
        logits: (N, H, W) float, no NaN; threshold: the mask threshold.

    Returns:
        As :func:`masks_to_boxes`.
    """
    return _boxes_of_occupied(logits.amax(2) > threshold, logits.amax(1) > threshold)


def _boxes_of_occupied(rows: torch.Tensor, cols: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """XYXY boxes from which rows (N, H) and columns (N, W) hold a mask pixel."""
    height, width = rows.shape[1], cols.shape[1]
    y_min = rows.to(torch.uint8).argmax(1)
    y_max = height - 1 - rows.flip(1).to(torch.uint8).argmax(1)
    x_min = cols.to(torch.uint8).argmax(1)
    x_max = width - 1 - cols.flip(1).to(torch.uint8).argmax(1)
    valid = rows.any(1)
    boxes = torch.stack((x_min, y_min, x_max, y_max), 1).to(torch.float32)
    return boxes * valid[:, None], valid
