"""The interface every method (map producer) of clipsam implements.

A *map producer* turns images into a per-pixel anomaly map in the evaluation frame and image
scores (APRIL-GAN's adapters, WinCLIP, AnomalyCLIP, SDP, SAA, ...). The refiners' interface is
:mod:`clipsam.refiners.base`; :class:`clipsam.pipeline.Pipeline` combines one of each with
:func:`clipsam.fusion.fuse_scores`. None of them knows about Lightning, nor about the others.

Dimension symbols: B batch, H x W the evaluation frame (``data.image_size``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

__all__ = ["MapOutput", "MapProducer"]


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
    #: the batch key :meth:`forward_batch` reads (``image``: the frame); set by the registry from
    #: the method's ``input_specs`` (:func:`clipsam.methods.input_key`).
    input_key: str = "image"
    #: side of the evaluation frame the maps are returned in; set by the registry from
    #: ``image_size`` (None: the input's own size, for producers built directly).
    frame_size: int | None = None
    #: ``clipsam export --format onnx`` (:mod:`clipsam.onnx_export`) may export this producer: its
    #: map depends on the category only through :attr:`onnx_text` (or not at all), and
    #: :meth:`fused_image_scores` reads no extras.
    onnx_exportable: ClassVar[bool] = False
    #: dotted attribute path of the function that returns the per-image text features for a
    #: list of categories (e.g. ``"text_embeddings"``); the ONNX graph takes them as an input.
    #: None: the map does not depend on the category (object-agnostic prompts).
    onnx_text: ClassVar[str | None] = None

    def output_size(self, images: Tensor) -> tuple[int, int]:
        """(H, W) of the returned maps: the evaluation frame (or ``images``' size when unset)."""
        if self.frame_size:
            return (int(self.frame_size), int(self.frame_size))
        return (int(images.shape[-2]), int(images.shape[-1]))

    def forward(self, images: Tensor, categories: Sequence[str]) -> MapOutput:  # pragma: no cover
        """Args: images (B, 3, S, S) float32, the method's input (CLIP-normalised); categories: B names."""
        raise NotImplementedError

    def forward_batch(self, batch: Mapping[str, Any]) -> MapOutput:
        """The producer on a batch: ``forward(batch[input_key], batch["category"])``.

        A method that reads more than one input (SAA: the frame and SAM's input of the original)
        overrides this.
        """
        if self.input_key not in batch:
            raise KeyError(
                f"method {self.name!r} reads batch[{self.input_key!r}] (built from the original image by "
                "clipsam.inputs.build_inputs), which this batch lacks: run it through clipsam.pipeline.Pipeline"
            )
        return self(batch[self.input_key], list(batch["category"]))

    def object_name(self, category: str) -> str:
        """The object name written in this method's text prompts for ``category``.

        Default: the method's ``config.object_name`` mode (:func:`clipsam.prompts.object_name_for`);
        ``category`` itself for a method without such a setting.
        """
        from clipsam.prompts import object_name_for

        mode = getattr(getattr(self, "config", None), "object_name", None)
        return object_name_for(category, mode) if mode else category

    def set_references(self, category: str, inputs: Mapping[str, Tensor]) -> None:
        """Take the reference images of ``category`` (a method whose module declares
        ``reference_count(config) > 0``: few-shot, or any method that needs context of a category).

        :class:`clipsam.pipeline.Pipeline` calls it once per category before that category's
        images are segmented (``clipsam test/validate/predict``: drawn by ``data.reference``;
        :class:`clipsam.Segmenter`: given by the user), and again to replace them.

        Args:
            category: the category the images belong to (as in ``batch["category"]``).
            inputs: a batch of the K reference images built from their originals as test images
                are (:func:`clipsam.inputs.build_inputs`): ``image`` (K, 3, H, W) the frame and each
                input the method declared (``input_key``), on the producer's device.
        """
        raise NotImplementedError(f"method {self.name!r} takes no reference images")

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

    def category_image_scores(self, parts: Tensor) -> Tensor | None:
        """Image scores computed over a whole category (the protocol of some references).

        A producer whose reference scores an image relative to the other test images of its
        category (SDP: per-category min-max) returns (B, P) ``extras["image_score_parts"]`` and
        overrides this; ``clipsam test`` calls it once per category with the parts of all its
        images and uses the result for the image metrics. Per-image uses (predict, Segmenter,
        thresholds) keep ``MapOutput.image_scores``.

        Args:
            parts: (M, P) the ``image_score_parts`` of one category's M images.

        Returns:
            (M,) image scores, or None (default): the per-image scores stand.
        """
        return None

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
