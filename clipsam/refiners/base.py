"""The refiner interface: a batch and an anomaly map -> a mask (PPG + CPS with SAM, MMR, ...).

A refiner never knows which method made the map; the pipeline (:class:`clipsam.pipeline.Pipeline`)
gives it the batch (with the inputs it declared, e.g. ``sam_image``) and the producer's map in
the evaluation frame.

Dimension symbols: B batch, H x W the evaluation frame.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, ClassVar

from torch import Tensor, nn

__all__ = ["RefineBatchOutput", "Refiner"]


@dataclasses.dataclass
class RefineBatchOutput:
    """What a refiner returns for a batch.

    Attributes:
        mask: (B, H, W) bool, the refined mask in the frame.
        mask_probs: (B, H, W) float32 in [0, 1], per-pixel probability of the refined mask.
        timings: seconds spent per stage (e.g. "sam_encoder", "ppg", "cascade_step_1").
    """

    mask: Tensor
    mask_probs: Tensor
    timings: dict[str, float] = dataclasses.field(default_factory=dict)


class Refiner(nn.Module):
    """Base class of the refiners: batch + anomaly map -> mask.

    ``batch`` is the DataLoader batch (the Data contract of docs/design.md: ``image``,
    ``category``, ``original_size`` and any key the refiner's data transform adds); the refiner
    reads what it needs from it.
    """

    name: ClassVar[str] = ""

    def refine_batch(self, batch: Mapping[str, Any], anomaly_maps: Tensor) -> RefineBatchOutput:  # pragma: no cover
        """Args: anomaly_maps (B, H, W) float32 in [0, 1], the producer's maps in the frame."""
        raise NotImplementedError
