"""APRIL-GAN (the seed method's CLIP stage) as a map producer: ``model.method: april_gan``.

A frozen open_clip ViT with one trained linear adapter per tapped layer
(:class:`clipsam.models.clip.ClipAnomalyModel`, unchanged); this file only puts it behind the
:class:`~clipsam.methods.base.MapProducer` interface:

- :meth:`AprilGan.forward` returns ``Map_a`` (B, H, W) and the image scores, with the per-layer
  probabilities in ``extras["layer_probs"]`` (B, L, 2, H, W) for the loss;
- :meth:`AprilGan.loss` is focal + dice per tapped layer, summed over layers
  (:func:`clipsam.losses.anomaly_loss`, METHOD.md);
- the trainable state is the adapters only (``model.adapters.*``).

Its config is :class:`clipsam.models.clip.ClipConfig`, the ``model.clip`` section.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from torch import Tensor

from clipsam.methods.base import MapOutput, MapProducer
from clipsam.models.clip import ClipAnomalyModel, ClipConfig

__all__ = ["CONFIG", "AprilGan", "build"]

CONFIG = ClipConfig

ADAPTER_KEY_PREFIX = "model.adapters."


class AprilGan(MapProducer):
    """Trainable map producer around a :class:`ClipAnomalyModel`.

    Args:
        model: the CLIP model with its adapters (frozen backbone, trainable adapters).
        focal_gamma: gamma of the focal loss (2 in the paper; ``model.focal_gamma``).
    """

    name = "april_gan"
    trainable = True

    def __init__(self, model: ClipAnomalyModel, *, focal_gamma: float = 2.0) -> None:
        super().__init__()
        self.model = model
        self.focal_gamma = float(focal_gamma)

    @property
    def config(self) -> ClipConfig:
        return self.model.config

    def forward(self, images: Tensor, categories: Sequence[str]) -> MapOutput:
        """Args: images (B, 3, H, W) float32 CLIP-normalised frame; categories: B names."""
        out = self.model(images, categories)
        return MapOutput(
            anomaly_map=out.anomaly_map.float(),  # (B, H, W) Map_a
            image_scores=out.image_scores.float(),  # (B,) Map_a reduced by model.clip.image_score
            extras={"layer_probs": out.layer_probs},  # (B, L, 2, H, W)
        )

    def loss(self, output: MapOutput, batch: Mapping[str, Any]) -> dict[str, Tensor]:
        """Focal + dice on each tapped layer's probabilities against ``batch["mask"]`` (B, H, W)."""
        from clipsam.losses import anomaly_loss

        return anomaly_loss(output.extras["layer_probs"], batch["mask"], focal_gamma=self.focal_gamma)

    def score_maps(self, maps: Tensor) -> Tensor:
        """(B, H, W) maps -> (B,) with ``model.clip.image_score`` / ``topk_fraction`` (as for ``Map_a``);
        the maximum when the image score is the CLS token's (``clip_global``), which is no reduction."""
        from clipsam.fusion import image_scores

        method = "max" if self.config.image_score == "clip_global" else self.config.image_score
        return image_scores(maps, method=method, topk_fraction=self.config.topk_fraction)

    def fused_image_scores(self, output: MapOutput, scores: Tensor) -> Tensor:
        """Image scores after refinement: the CLS zero-shot score (``image_score="clip_global"``)
        stays the image score of the whole method; otherwise the fused scores reduced as ``Map_a``."""
        if self.config.image_score == "clip_global":
            return output.image_scores.float()
        return self.score_maps(scores)

    def trainable_state_dict(self) -> dict[str, Tensor]:
        """The adapters: ``{"model.adapters.<i>.weight": (D, C), "model.adapters.<i>.bias": (D,)}``."""
        return {ADAPTER_KEY_PREFIX + k: v for k, v in self.model.adapter_state_dict().items()}

    def load_trainable_state_dict(self, state: Mapping[str, Tensor]) -> None:
        """Load adapters; :class:`~clipsam.errors.WeightsError` names the backbone/layers that differ."""
        from clipsam.errors import WeightsError

        stray = sorted(k for k in state if not k.startswith(ADAPTER_KEY_PREFIX))
        if stray:
            raise WeightsError(f"checkpoint keys {stray[:4]} are not APRIL-GAN adapter weights ('model.adapters.*')")
        self.model.load_adapter_state_dict({k[len(ADAPTER_KEY_PREFIX) :]: v for k, v in state.items()})


def build(config: ClipConfig, *, image_size: int, focal_gamma: float = 2.0) -> AprilGan:
    """Build the frozen CLIP and fresh adapters (:func:`clipsam.models.clip.build_clip_model`)."""
    from clipsam.models.clip import build_clip_model

    return AprilGan(build_clip_model(config, image_size=image_size), focal_gamma=focal_gamma)
