"""APRIL-GAN (the seed method's CLIP stage) as a map producer: ``model.method: april_gan``.

A frozen open_clip ViT with one trained linear adapter per tapped layer
(:class:`clipsam.models.clip.ClipAnomalyModel`, unchanged); this file only puts it behind the
:class:`~clipsam.methods.base.MapProducer` interface:

- :meth:`AprilGan.forward` returns ``Map_a`` (B, H, W) and the image scores, with the per-layer
  probabilities in ``extras["layer_probs"]`` (B, L, 2, H, W) for the loss;
- :meth:`AprilGan.loss` is focal + dice per tapped layer, summed over layers
  (:func:`clipsam.losses.anomaly_loss`);
- the trainable state is the adapters only (``model.adapters.*``).

Its settings are :class:`AprilGanConfig` (``model.method_config``): the keys of
:class:`clipsam.models.clip.ClipConfig` plus ``focal_gamma``. The deprecated ``model.clip`` and
``model.focal_gamma`` keys still fill it. Checkpoints record the frozen CLIP the adapters were
trained on (:func:`checkpoint_meta`) and refuse another one (:func:`check_checkpoint`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

from torch import Tensor

from clipsam.methods.base import MapOutput, MapProducer
from clipsam.models.clip import ClipAnomalyModel, ClipConfig

__all__ = ["CONFIG", "AprilGan", "AprilGanConfig", "build", "check_checkpoint", "checkpoint_meta"]


@dataclasses.dataclass
class AprilGanConfig(ClipConfig):
    """APRIL-GAN's settings: the CLIP stage (:class:`~clipsam.models.clip.ClipConfig`) and the loss.

    Attributes:
        focal_gamma: gamma of the focal loss (2 in the paper).
    """

    focal_gamma: float = 2.0


CONFIG = AprilGanConfig

ADAPTER_KEY_PREFIX = "model.adapters."


class AprilGan(MapProducer):
    """Trainable map producer around a :class:`ClipAnomalyModel`.

    Args:
        model: the CLIP model with its adapters (frozen backbone, trainable adapters).
        focal_gamma: gamma of the focal loss (2 in the paper; ``model.focal_gamma``).
    """

    name = "april_gan"
    trainable = True
    onnx_exportable = True
    onnx_text = "model.text_features"  # (B, D, 2) prompt-ensemble text features per category

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


def build(config: AprilGanConfig, *, image_size: int, focal_gamma: float | None = None) -> AprilGan:
    """Build the frozen CLIP and fresh adapters (:func:`clipsam.models.clip.build_clip_model`)."""
    from clipsam.models.clip import build_clip_model

    gamma = float(getattr(config, "focal_gamma", 2.0) if focal_gamma is None else focal_gamma)
    producer = AprilGan(build_clip_model(config, image_size=image_size), focal_gamma=gamma)
    if config.compile:
        for block in producer.model.clip.visual.transformer.resblocks:
            block.compile()
    return producer


def checkpoint_meta(config: ClipConfig) -> dict[str, Any]:
    """What the adapters depend on, recorded in ``checkpoint["clipsam"]``: the CLIP backbone, its
    pretrained tag (or file), the seed of random frozen weights and the tapped layers."""
    return {
        "clip_model_name": config.model_name,
        "clip_pretrained": config.pretrained,
        "clip_seed": int(config.seed),
        "layers": list(config.layers),
    }


def check_checkpoint(
    meta: Mapping[str, Any], state: Mapping[str, Any], config: ClipConfig, *, where: str, key: str = "model.method_config"
) -> None:
    """Refuse adapters trained on other frozen CLIP weights (they load and give meaningless maps).

    Compared: backbone name, pretrained weights (tag or file), the seed of random frozen weights
    (when ``pretrained`` is empty), tapped layers.

    Args:
        meta: ``checkpoint["clipsam"]``; state: the checkpoint's ``state_dict`` (producer keys
            without the ``producer.`` prefix); config: this run's settings; where: the checkpoint,
            for messages; key: where the settings were written (``model.clip`` in older configs).

    Raises:
        WeightsError: naming the recorded and the configured value and the key to change.
    """
    from clipsam.errors import WeightsError

    if not any(k.startswith(ADAPTER_KEY_PREFIX) for k in state):
        raise WeightsError(
            f"{where} holds no CLIP adapter weights (keys 'producer.model.adapters.*'): "
            "pass a checkpoint written by `clipsam fit` (runs/<name>/version_N/checkpoints/*.ckpt)"
        )
    trained_with = meta.get("clip_model_name")
    if trained_with is not None and trained_with != config.model_name:
        raise WeightsError(
            f"{where}: adapters were trained for CLIP backbone '{trained_with}' but {key}.model_name is "
            f"'{config.model_name}': use the config the checkpoint was trained with, or a checkpoint trained for this backbone"
        )
    if "clip_pretrained" in meta:
        recorded, configured = meta.get("clip_pretrained") or None, config.pretrained or None
        if recorded != configured:
            raise WeightsError(
                f"{where}: adapters were trained on frozen CLIP weights {key}.pretrained={recorded!r} "
                f"but {key}.pretrained is {configured!r}: adapters only fit the weights they were "
                f"trained on; set {key}.pretrained={recorded!r} or use a checkpoint trained on {configured!r}"
            )
        if configured is None and "clip_seed" in meta and int(meta["clip_seed"]) != int(config.seed):
            raise WeightsError(
                f"{where}: adapters were trained on random frozen CLIP weights with {key}.seed="
                f"{meta['clip_seed']} but {key}.seed is {config.seed}: other seed, other "
                f"weights; set {key}.seed={meta['clip_seed']}"
            )
    trained_layers = meta.get("layers")
    if trained_layers is not None and list(trained_layers) != list(config.layers):
        raise WeightsError(
            f"{where}: adapters were trained on CLIP layers {list(trained_layers)} but "
            f"{key}.layers is {list(config.layers)}: set {key}.layers to the layers the checkpoint was trained with"
        )
