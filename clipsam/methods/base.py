"""The two interfaces every method of clipsam is built from.

A *map producer* turns frame images into a per-pixel anomaly map and image scores (APRIL-GAN's
adapters, WinCLIP, AnomalyCLIP, SDP, ...). A *refiner* turns a batch and a map into a mask and
per-pixel mask probabilities (PPG + CPS with SAM, ...). The LightningModule combines one of each
with :func:`clipsam.fusion.fuse_scores`; neither knows about Lightning, nor about the other.

Dimension symbols: B batch, H x W the evaluation frame (``data.image_size``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

__all__ = ["MapOutput", "MapProducer", "RefineBatchOutput", "Refiner"]


@dataclasses.dataclass
class MapOutput:
    """What a map producer returns for a batch.

    Attributes:
        anomaly_map: (B, H, W) float32 in [0, 1], the per-pixel anomaly map in the frame
            (``Map_a`` for the seed method).
        image_scores: (B,) float32 in [0, 1], the producer's own image-level anomaly score.
        extras: whatever the producer's :meth:`MapProducer.loss` needs (e.g. per-layer
            probabilities); never read by the LightningModule.
    """

    anomaly_map: Tensor
    image_scores: Tensor
    extras: dict[str, Any] = dataclasses.field(default_factory=dict)


class MapProducer(nn.Module):
    """Base class of the anomaly-map producers (one file per method under ``clipsam/methods/``).

    Subclasses set :attr:`name` and :attr:`trainable`, build their frozen backbones from their
    own config dataclass (never downloading in ``__init__`` unless asked to build pretrained
    weights), and implement :meth:`forward`; trainable producers also implement :meth:`loss`.
    Trainable parameters are exactly those with ``requires_grad``; checkpoints hold only them
    (:meth:`trainable_state_dict`).
    """

    name: ClassVar[str] = ""
    trainable: ClassVar[bool] = False

    def forward(self, images: Tensor, categories: Sequence[str]) -> MapOutput:  # pragma: no cover
        """Args: images (B, 3, H, W) float32, CLIP-normalised frame; categories: B names."""
        raise NotImplementedError

    def loss(self, output: MapOutput, batch: Mapping[str, Any]) -> dict[str, Tensor]:
        """Training loss: a dict with at least ``"loss"`` (0-d). Only for trainable producers."""
        raise NotImplementedError(f"method {self.name!r} is training-free: it has no loss")

    def score_maps(self, maps: Tensor) -> Tensor:
        """Reduce (B, H, W) pixel-score maps to (B,) image scores (default: the maximum).

        A method with a configured reduction (mean, top-k mean) overrides this.
        """
        return maps.flatten(1).amax(dim=1)

    def fused_image_scores(self, output: MapOutput, scores: Tensor) -> Tensor:
        """Image scores (B,) of the final pixel scores (B, H, W) after a refiner and the fusion.

        Default: :meth:`score_maps` of the fused scores. A method overrides it when its image
        score is not a reduction of the map (e.g. keeps ``output.image_scores``, a CLS zero-shot
        score). Without a refiner the LightningModule reports ``output.image_scores`` unchanged.
        """
        return self.score_maps(scores)

    def trainable_state_dict(self) -> dict[str, Tensor]:
        """The trained parameters only (what a checkpoint stores), keyed by parameter name."""
        return {k: v.detach() for k, v in self.named_parameters() if v.requires_grad}

    def load_trainable_state_dict(self, state: Mapping[str, Tensor]) -> None:
        """Load :meth:`trainable_state_dict` output; raise ``WeightsError`` on any mismatch."""
        from clipsam.errors import WeightsError

        own = self.trainable_state_dict()
        missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
        wrong = [k for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
        if missing or unexpected or wrong:
            raise WeightsError(
                f"checkpoint does not fit method {self.name!r}: missing {missing}, unexpected "
                f"{unexpected}, wrong shape {wrong}; use a checkpoint trained with this config"
            )
        params = dict(self.named_parameters())
        with torch.no_grad():
            for key, value in state.items():
                params[key].copy_(value)


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
