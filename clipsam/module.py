"""ClipSamModule: the Lightning glue around a map producer (the method) and a refiner.

The module owns no math of its own: the anomaly map comes from the map producer chosen by
``model.method`` (:mod:`clipsam.methods`; ``april_gan``, the default, is the seed's CLIP adapters
:class:`clipsam.models.clip.ClipAnomalyModel`), the refinement from the refiner chosen by
``model.refiner`` (``ppg_cps``: :class:`clipsam.models.sam.SamRefiner`, the point prompts (PPG)
and the cascade (CPS); ``none``), the fusion from :func:`clipsam.fusion.fuse_scores`, the
metrics from :class:`clipsam.metrics.collection.PerCategoryMetrics`.

Stages:
- ``fit``: only what the producer says is trainable trains (Adam, the producer's loss; for
  ``april_gan`` focal + dice per tapped layer, METHOD.md). A training-free method refuses ``fit``.
  The refiner is never built during fit.
- ``test``: map -> refinement -> fused pixel scores -> per-category metrics, reported as
  a table, JSON/CSV in the run directory and W&B (see :mod:`clipsam.reporting`).
- ``predict``: the same pipeline; :class:`clipsam.callbacks.PredictionWriter` writes one mask PNG
  and one overlay PNG per image.

Frozen backbones are built in :meth:`configure_model` (not in ``__init__``), so printing or
validating a config never loads weights. Checkpoints hold the adapter weights and the
hyper-parameters only (a few MB for ViT-L, not 1.7 GB); loading one rebuilds the frozen parts from
the config.

Checkpoints hold the producer's trainable state (``producer.*`` keys) and the method's name; a
checkpoint never loads into another method.

Shapes: B batch, H x W the frame (``image_size`` x ``image_size``), L tapped layers.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Mapping
from typing import Any, Literal

import torch
from lightning.pytorch import LightningModule

from clipsam.errors import ConfigError, WeightsError
from clipsam import methods as registry
from clipsam.methods import DEFAULT_METHOD
from clipsam.models.clip import ClipConfig
from clipsam.models.sam import SamConfig
from clipsam.prompting import PromptConfig
from clipsam.cascade import CascadeConfig
from clipsam.fusion import FUSION_METHODS
from clipsam.tiling import TilingConfig

__all__ = ["ClipSamModule", "OptimizerConfig", "EvalConfig"]

PRODUCER_PREFIX = "producer."
# April-GAN adapters inside the producer, and where checkpoints written before model.method
# existed kept them (they load as april_gan checkpoints).
ADAPTER_PREFIX = "producer.model.adapters."
LEGACY_ADAPTER_PREFIX = "clip_model.adapters."


@dataclasses.dataclass
class OptimizerConfig:
    """Adam for the adapters (METHOD.md: Adam, lr 1e-3, batch 16).

    Attributes:
        lr: learning rate.
        betas: Adam's (beta1, beta2). METHOD.md names no betas; the default (0.5, 0.999) is
            APRIL-GAN's train.py, the protocol the paper builds on.
        weight_decay: L2 penalty (0 in the paper).
    """

    lr: float = 1e-3
    betas: tuple[float, float] = (0.5, 0.999)
    weight_decay: float = 0.0


@dataclasses.dataclass
class EvalConfig:
    """How test/predict turn the two stages into pixel scores and reports.

    Attributes:
        use_sam: deprecated alias of ``model.refiner``, kept so existing configs work: with
            ``model.refiner`` unset, True means ``ppg_cps`` and False means ``none``. Setting
            it False together with ``model.refiner: ppg_cps`` is an error.
        fusion: how the refiner's mask and the producer's map become pixel scores: clip, sam,
            product, mean, max, clip_boost or clip_masked (:func:`clipsam.fusion.fuse_scores`). The
            paper does not spell this out; the default "clip_boost" is (Map_a + M_3) / 2: pixels
            inside SAM's final mask rank first, the CLIP map orders pixels within each side.
            "clip" is the CLIP-stage baseline (SAM ignored).
        report_clip_baseline: also compute the CLIP-only metrics in the same run, so the
            report shows the SAM stage's gain (doubles the score memory of the metric).
        aupro: also compute pixel AUPRO (FPR limit 0.3, 8-connected regions).
        aupro_protocol: "mvtec" (MVTec AD evaluation, anomalib: 1000 thresholds, ``>=``, curve
            from (0, 0) integrated to 0.3) or "anomalyclip" (AnomalyCLIP's and APRIL-GAN's
            code: 200 thresholds, strict ``>``, FPR renormalised below 0.3), so numbers compare
            with the tables they come from; see :func:`clipsam.metrics.functional.aupro`.
        metric_score_dtype: storage dtype of the accumulated scores ("float32" exact;
            "float16" halves memory, approximate).
        num_overlays: images logged as overlays (image, ground truth, CLIP map, SAM mask).
        pr_curve_points: points of the per-category pixel PR curve kept for the report and
            W&B (exact points, thinned; 0 disables).
        predict_dir: root folder of predict outputs; each run writes a fresh ``version_N``.
        predict_mask_threshold: pixel threshold on the fused score used when no thresholds file
            gives one (``thresholds``): the written mask with ``mask_source="score"`` or with
            SAM off.
        predict_image_threshold: image-score threshold of the ``label`` column of
            predictions.csv when no thresholds file gives one.
        threshold_method: how ``clipsam test`` calibrates the decision thresholds it writes to
            ``thresholds.json`` and ``test_results.json``: ``"f1"`` (F1-optimal on the labelled
            test set) or ``"fpr"`` (from the normal images only, at ``target_fpr``); see
            :mod:`clipsam.thresholds`.
        target_fpr: allowed false-positive rate of ``threshold_method="fpr"`` (image level:
            fraction of normal images flagged; pixel level: fraction of their pixels).
        thresholds: a ``thresholds.json`` written by ``clipsam test`` (or an exported bundle
            folder) that ``predict`` and :class:`clipsam.Segmenter` decide with: per-category
            thresholds, else the pooled ("global") ones. None: the two ``predict_*_threshold``
            defaults (uncalibrated).
        mask_source: where the written mask comes from: ``"sam"`` (SAM's final cascade mask,
            M_3) or ``"score"`` (fused pixel score >= the pixel threshold). With SAM off the
            mask is always the score above the pixel threshold.
        predict_embedding_cache: let ``predict`` use the SAM embedding cache
            (``model.sam.embedding_cache_dir``); off by default, as predict usually sees each
            image once.
    """

    use_sam: bool = True
    fusion: str = "clip_boost"
    report_clip_baseline: bool = True
    aupro: bool = False
    aupro_protocol: Literal["mvtec", "anomalyclip"] = "mvtec"
    metric_score_dtype: Literal["float32", "float16"] = "float32"
    num_overlays: int = 8
    pr_curve_points: int = 100
    predict_dir: str = "outputs/predict"
    predict_mask_threshold: float = 0.5
    predict_image_threshold: float = 0.5
    threshold_method: Literal["f1", "fpr"] = "f1"
    target_fpr: float = 0.01
    thresholds: str | None = None
    mask_source: Literal["sam", "score"] = "sam"
    predict_embedding_cache: bool = False

    def __post_init__(self) -> None:
        if self.aupro_protocol not in ("mvtec", "anomalyclip"):
            raise ConfigError(
                f"model.evaluation.aupro_protocol={self.aupro_protocol!r}: use 'mvtec' or 'anomalyclip'"
            )


def _as_dataclass(cls: type, value: Any) -> Any:
    """Accept a dataclass instance, a mapping (from a checkpoint's hparams) or None."""
    if value is None:
        return cls()
    if isinstance(value, cls):
        return value
    if isinstance(value, Mapping):
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(value) - names)
        if unknown:
            raise ConfigError(f"unknown keys {unknown} for {cls.__name__}; valid keys: {sorted(names)}")
        return cls(**value)
    raise ConfigError(f"expected {cls.__name__} or a mapping, got {type(value).__name__}")


def _to_host(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Copy device tensors to host memory with non-blocking copies and ONE synchronisation."""
    on_device = [t.device for t in tensors.values() if t.device.type != "cpu"]
    if not on_device:
        return tensors
    if on_device[0].type != "cuda":  # other accelerators: blocking copies are the safe choice
        return {k: v.to("cpu") for k, v in tensors.items()}
    out = {k: v.to("cpu", non_blocking=True) for k, v in tensors.items()}
    torch.cuda.current_stream(on_device[0]).synchronize()
    return out


def _to_plain(value: Any) -> Any:
    """Dataclasses -> dicts, tuples -> lists: hparams that load with torch.load(weights_only=True)."""
    if dataclasses.is_dataclass(value):
        return {f.name: _to_plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, (list, tuple)):
        return [_to_plain(v) for v in value]
    if isinstance(value, Mapping):
        return {k: _to_plain(v) for k, v in value.items()}
    return value


class ClipSamModule(LightningModule):
    """A map producer + a refiner; by default CLIP adapters + frozen SAM with PPG and CPS (arXiv 2510.11028).

    Args:
        method: the map producer, a name of :data:`clipsam.methods.METHODS` (``april_gan``,
            ``winclip``, ``anomalyclip``, ``sdp``, ``sdp_plus``).
        method_config: the settings of ``method`` as a mapping of its config dataclass's keys
            (validated, unknown keys are an error); None takes the method's defaults. Not used
            by ``april_gan``, whose section is ``clip``.
        refiner: ``ppg_cps`` (frozen SAM, PPG + CPS: sections ``sam``, ``prompt``, ``cascade``),
            ``mmr`` (ClipSAM-rec's multi-level mask refinement on ``sam``) or ``none``; None
            follows the deprecated ``evaluation.use_sam``.
        refiner_config: the refiner's own settings as a mapping (e.g. ``MmrConfig`` keys for
            ``mmr``), validated by its builder; None: its defaults. ``ppg_cps`` takes none (its
            sections are ``prompt`` and ``cascade``).
        clip: the ``april_gan`` method's CLIP stage (backbone, tapped layers, map combination).
        sam: the SAM variant and checkpoint.
        prompt: Point Prompt Generation (PPG) settings: k, threshold, dilation kernel.
        cascade: Cascaded Prompts (CPS) settings: number of decoder steps.
        optimizer: Adam settings for the trainable parameters.
        evaluation: fusion, reports and predict outputs.
        focal_gamma: focal-loss gamma of ``april_gan`` (2 in the paper).
        image_size: the frame size; linked from ``data.image_size`` by the CLI.
        tiling: tiled inference for large images (:mod:`clipsam.tiling`); linked from
            ``data.tiling`` by the CLI. Off by default.
    """

    def __init__(
        self,
        *,
        method: str = DEFAULT_METHOD,
        method_config: dict[str, Any] | None = None,
        refiner: str | None = None,
        refiner_config: dict[str, Any] | None = None,
        clip: ClipConfig = ClipConfig(),
        sam: SamConfig = SamConfig(),
        prompt: PromptConfig = PromptConfig(),
        cascade: CascadeConfig = CascadeConfig(),
        optimizer: OptimizerConfig = OptimizerConfig(),
        evaluation: EvalConfig = EvalConfig(),
        focal_gamma: float = 2.0,
        image_size: int = 518,
        tiling: TilingConfig | None = None,
    ) -> None:
        super().__init__()
        self.clip_config: ClipConfig = _as_dataclass(ClipConfig, clip)
        self.sam_config: SamConfig = _as_dataclass(SamConfig, sam)
        self.prompt_config: PromptConfig = _as_dataclass(PromptConfig, prompt)
        self.cascade_config: CascadeConfig = _as_dataclass(CascadeConfig, cascade)
        self.optimizer_config: OptimizerConfig = _as_dataclass(OptimizerConfig, optimizer)
        self.eval_config: EvalConfig = _as_dataclass(EvalConfig, evaluation)
        if self.eval_config.fusion not in FUSION_METHODS:
            raise ConfigError(
                f"model.evaluation.fusion={self.eval_config.fusion!r} is not a fusion method; "
                f"choose one of {', '.join(FUSION_METHODS)}"
            )
        self.method = str(method)
        self.method_spec = registry.get_method(self.method)
        if self.method == "april_gan":
            if method_config:
                raise ConfigError(
                    "model.method_config is set but model.method=april_gan takes its settings from "
                    "model.clip: move the keys there"
                )
            self.method_config = self.clip_config
        else:
            self.method_config = registry.method_config(self.method, method_config)
        self.refiner_name = self._resolve_refiner(refiner, self.eval_config.use_sam)
        if refiner_config and self.refiner_name == "ppg_cps":
            raise ConfigError(
                "model.refiner_config is set but model.refiner=ppg_cps takes its settings from "
                "model.prompt and model.cascade: move the keys there"
            )
        self.refiner_config = dict(refiner_config) if refiner_config else None
        from clipsam.thresholds import THRESHOLD_METHODS

        if self.eval_config.threshold_method not in THRESHOLD_METHODS:
            raise ConfigError(
                f"model.evaluation.threshold_method={self.eval_config.threshold_method!r}: choose one of "
                f"{', '.join(THRESHOLD_METHODS)}"
            )
        if not 0.0 <= float(self.eval_config.target_fpr) < 1.0:
            raise ConfigError(f"model.evaluation.target_fpr={self.eval_config.target_fpr} must be in [0, 1)")
        if self.eval_config.mask_source not in ("sam", "score"):
            raise ConfigError(
                f"model.evaluation.mask_source={self.eval_config.mask_source!r}: choose 'sam' (SAM's final "
                "mask) or 'score' (fused score above the pixel threshold)"
            )
        self._thresholds: dict[str, Any] | None = None
        self.focal_gamma = float(focal_gamma)
        self.image_size = int(image_size)
        self.tiling: TilingConfig = _as_dataclass(TilingConfig, tiling)
        self.tiling.check(self.image_size)
        # A missing thresholds file, or one calibrated on other scores, fails at parse time,
        # before any model is built or run folder created.
        self.load_thresholds()
        self.save_hyperparameters(
            {
                "method": self.method,
                "method_config": None if self.method == "april_gan" else _to_plain(self.method_config),
                "refiner": refiner,
                "refiner_config": _to_plain(self.refiner_config),
                "clip": _to_plain(self.clip_config),
                "sam": _to_plain(self.sam_config),
                "prompt": _to_plain(self.prompt_config),
                "cascade": _to_plain(self.cascade_config),
                "optimizer": _to_plain(self.optimizer_config),
                "evaluation": _to_plain(self.eval_config),
                "focal_gamma": self.focal_gamma,
                "image_size": self.image_size,
                "tiling": _to_plain(self.tiling),
            }
        )
        # Frozen parts are missing from checkpoints on purpose; we check the trained state ourselves.
        self.strict_loading = False
        self.producer: torch.nn.Module | None = None  # clipsam.methods.base.MapProducer
        self.refiner: torch.nn.Module | None = None  # clipsam.methods.base.Refiner
        self._pending_trainable_state: dict[str, torch.Tensor] | None = None
        self._categories: list[str] = []
        self.test_metrics: torch.nn.Module | None = None
        self.clip_metrics: torch.nn.Module | None = None
        self._overlays: list[dict[str, Any]] = []
        self._timings: dict[str, float] = {}

    @staticmethod
    def _resolve_refiner(refiner: str | None, use_sam: bool) -> str:
        """``model.refiner``, or the deprecated ``model.evaluation.use_sam`` when it is unset."""
        if refiner is None:
            return "ppg_cps" if use_sam else "none"
        registry.get_refiner(refiner)
        if refiner != "none" and not use_sam:
            raise ConfigError(
                f"model.refiner={refiner} but model.evaluation.use_sam=false (its deprecated alias) "
                "turns the refiner off: drop model.evaluation.use_sam, or set model.refiner=none"
            )
        return refiner

    @property
    def trainable(self) -> bool:
        """Whether ``model.method`` trains (known from the registry, before anything is built)."""
        return self.method_spec.trainable

    @property
    def clip_model(self) -> torch.nn.Module | None:
        """The ``april_gan`` producer's :class:`~clipsam.models.clip.ClipAnomalyModel` (None until built)."""
        return getattr(self.producer, "model", None) if self.method == "april_gan" else None

    def check_stage(self, stage: str) -> None:
        """Refuse a stage this method cannot run; called by the CLI before any run folder exists."""
        if stage == "fit" and not self.trainable:
            raise ConfigError(
                f"model.method={self.method} is training-free: there is nothing to fit. Run "
                f"`clipsam test` with the same config (no --ckpt_path needed), or choose a trained "
                f"method ({', '.join(n for n, spec in registry.METHODS.items() if spec.trainable)})"
            )

    # ------------------------------------------------------------------ building
    def setup(self, stage: str) -> None:
        self.check_stage(stage)
        precision = str(self.trainer.precision)
        if precision in ("bf16-true", "16-true", "64-true", "transformer-engine", "transformer-engine-float16"):
            raise ConfigError(
                f"trainer.precision={precision} would cast the trainable adapters too: use "
                "trainer.precision=32-true (the adapters train in fp32) and choose the dtype of the "
                "frozen models with model.clip.frozen_dtype and model.sam.dtype (bfloat16 is the "
                "fast path on CPU and GPU)"
            )
        if self.refiner_name == "ppg_cps" and stage in ("test", "validate", "predict"):
            self._request_sam_inputs()

    def sam_input_side(self) -> int | None:
        """S when the refiner reads SAM's input of the original image (``sam_image``), else None."""
        from clipsam.models.sam import sam_input_side

        return sam_input_side(self.sam_config.variant) if self.refiner_name == "ppg_cps" else None

    def _request_sam_inputs(self) -> None:
        """Make the datamodule add SAM's input (the original image at SAM's size) to test items."""
        side = self.sam_input_side()
        assert side is not None
        datamodule = getattr(self.trainer, "datamodule", None)
        if datamodule is None or not hasattr(datamodule, "set_sam_image_size"):
            return
        if datamodule.sam_image_size is None:
            datamodule.set_sam_image_size(side)
        elif int(datamodule.sam_image_size) != side:
            raise ConfigError(
                f"data.sam_image_size={datamodule.sam_image_size} but SAM {self.sam_config.variant!r} encodes "
                f"{side} x {side} inputs: set data.sam_image_size to {side} or leave it null"
            )

    def configure_model(self) -> None:
        """Build the producer (always) and the refiner (test/validate/predict only), once."""
        if self.producer is None:
            self.producer = self._build_producer()
            if self._pending_trainable_state is not None:
                self.producer.load_trainable_state_dict(self._pending_trainable_state)
                self._pending_trainable_state = None
            if self.method == "april_gan" and self.clip_config.compile:
                for block in self.clip_model.clip.visual.transformer.resblocks:
                    block.compile()
        stage = self._stage()
        if self.refiner is None and self.refiner_name != "none" and stage in ("test", "validate", "predict"):
            self.refiner = self._build_refiner()

    def _build_producer(self) -> torch.nn.Module:
        extra = {"focal_gamma": self.focal_gamma} if self.method == "april_gan" else {}
        producer = registry.build_producer(self.method, self.method_config, image_size=self.image_size, **extra)
        if bool(producer.trainable) != self.trainable:
            raise TypeError(
                f"clipsam.methods.METHODS[{self.method!r}].trainable={self.trainable} disagrees with "
                f"{type(producer).__name__}.trainable={producer.trainable} (a registry bug)"
            )
        return producer

    def build_inference_models(self) -> None:
        """Build the frozen models for inference without a Trainer (:class:`clipsam.Segmenter`,
        ``clipsam export``): the producer always, the refiner unless ``model.refiner`` is none."""
        self.configure_model()
        if self.refiner is None and self.refiner_name != "none":
            self.refiner = self._build_refiner()

    def _build_refiner(self) -> torch.nn.Module | None:
        # predict sees each image once: an embedding cache there only fills the disk, unless asked for.
        use_cache = self._stage() != "predict" or bool(self.eval_config.predict_embedding_cache)
        return registry.build_refiner(
            self.refiner_name,
            refiner_config=self.refiner_config,
            use_embedding_cache=use_cache,
            sam=self.sam_config,
            prompt=self.prompt_config,
            cascade=self.cascade_config,
        )

    def _stage(self) -> str | None:
        trainer = self._trainer
        if trainer is None or trainer.state.stage is None:
            return None
        return str(trainer.state.stage.value)

    # ------------------------------------------------------------------ checkpoints
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Keep only the producer's trainable state (frozen parts are rebuilt from the config).

        ``checkpoint["clipsam"]`` records the method, the trained shapes and the optimiser settings
        actually used (so a resume with other settings is visible); for ``april_gan`` also what the
        adapters depend on: the CLIP backbone, its pretrained tag (or file), the seed of random
        frozen weights and the tapped layers.
        """
        assert self.producer is not None
        keep = {PRODUCER_PREFIX + k for k in self.producer.trainable_state_dict()}
        state = checkpoint["state_dict"]
        checkpoint["state_dict"] = {k: v for k, v in state.items() if k in keep}
        checkpoint["clipsam"] = {
            "method": self.method,
            "trainable_shapes": {k: list(v.shape) for k, v in checkpoint["state_dict"].items()},
            "optimizer": _to_plain(self.optimizer_config),
        }
        if self.method == "april_gan":
            checkpoint["clipsam"].update(
                {
                    "clip_model_name": self.clip_config.model_name,
                    "clip_pretrained": self.clip_config.pretrained,
                    "clip_seed": int(self.clip_config.seed),
                    "layers": list(self.clip_config.layers),
                    "adapter_shapes": {
                        k: list(v.shape) for k, v in checkpoint["state_dict"].items() if k.startswith(ADAPTER_PREFIX)
                    },
                }
            )

    @staticmethod
    def _upgrade_legacy(checkpoint: dict[str, Any]) -> None:
        """Checkpoints written before model.method existed hold April-GAN adapters under
        ``clip_model.adapters.*``: rename them in place so Lightning's own loading finds them too."""
        state = checkpoint.get("state_dict", {}) or {}
        if "method" in (checkpoint.get("clipsam", {}) or {}):
            return
        for key in [k for k in state if k.startswith(LEGACY_ADAPTER_PREFIX)]:
            state[ADAPTER_PREFIX + key[len(LEGACY_ADAPTER_PREFIX) :]] = state.pop(key)

    @property
    def needs_checkpoint(self) -> bool:
        """Whether test/validate/predict need fitted weights (``--ckpt_path``).

        True while the method has trainable parts (the CLIP adapters); a training-free method
        returns False, and the CLI then runs it without a checkpoint.
        """
        return self.trainable

    def check_checkpoint(self, checkpoint: Mapping[str, Any], *, path: Any = None) -> None:
        """Refuse a checkpoint of another method, or adapters that do not belong to this config's CLIP.

        The method must be the configured one (checkpoints without a recorded method are
        ``april_gan``). For ``april_gan``: adapters map the frozen backbone's features, so
        trained on other frozen weights they load without error and give meaningless maps.
        Compared: backbone name, pretrained weights (tag or file), the seed of random frozen
        weights (when ``pretrained`` is empty), tapped layers. The CLI calls this before any run
        folder exists; :meth:`on_load_checkpoint` again.

        Raises:
            WeightsError: naming the recorded and the configured value and the key to change.
        """
        where = f"checkpoint {path}" if path is not None else "the checkpoint"
        state = checkpoint.get("state_dict", {}) or {}
        meta = checkpoint.get("clipsam", {}) or {}
        trained_method = meta.get("method", "april_gan")
        if trained_method != self.method:
            raise WeightsError(
                f"{where} was trained with model.method={trained_method} but this config runs "
                f"model.method={self.method}: use a checkpoint of {self.method}, or set "
                f"model.method={trained_method} (and its settings)"
            )
        if self.method != "april_gan":
            return  # the producer's load_trainable_state_dict checks keys and shapes
        if not any(k.startswith((ADAPTER_PREFIX, LEGACY_ADAPTER_PREFIX)) for k in state):
            raise WeightsError(
                f"{where} holds no CLIP adapter weights (keys 'producer.model.adapters.*'): "
                "pass a checkpoint written by `clipsam fit` (runs/<name>/version_N/checkpoints/*.ckpt)"
            )
        trained_with = meta.get("clip_model_name")
        if trained_with is not None and trained_with != self.clip_config.model_name:
            raise WeightsError(
                f"{where}: adapters were trained for CLIP backbone '{trained_with}' but "
                f"model.clip.model_name is '{self.clip_config.model_name}': use the config the "
                "checkpoint was trained with, or a checkpoint trained for this backbone"
            )
        if "clip_pretrained" in meta:
            recorded, configured = meta.get("clip_pretrained") or None, self.clip_config.pretrained or None
            if recorded != configured:
                raise WeightsError(
                    f"{where}: adapters were trained on frozen CLIP weights model.clip.pretrained={recorded!r} "
                    f"but model.clip.pretrained is {configured!r}: adapters only fit the weights they were "
                    f"trained on; set model.clip.pretrained={recorded!r} or use a checkpoint trained on {configured!r}"
                )
            if configured is None and "clip_seed" in meta and int(meta["clip_seed"]) != int(self.clip_config.seed):
                raise WeightsError(
                    f"{where}: adapters were trained on random frozen CLIP weights with model.clip.seed="
                    f"{meta['clip_seed']} but model.clip.seed is {self.clip_config.seed}: other seed, other "
                    f"weights; set model.clip.seed={meta['clip_seed']}"
                )
        trained_layers = meta.get("layers")
        if trained_layers is not None and list(trained_layers) != list(self.clip_config.layers):
            raise WeightsError(
                f"{where}: adapters were trained on CLIP layers {list(trained_layers)} but "
                f"model.clip.layers is {list(self.clip_config.layers)}: set model.clip.layers to "
                "the layers the checkpoint was trained with"
            )

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Validate the checkpoint against this config before Lightning loads it.

        When ``fit`` resumes, the optimiser settings of the config (``model.optimizer``: lr,
        betas, weight decay) are written into the restored optimiser state, so the run trains
        with what its config and hparams.yaml say; a change is reported on stderr.
        """
        self._upgrade_legacy(checkpoint)
        self.check_checkpoint(checkpoint)
        state = checkpoint.get("state_dict", {})
        trained = {k[len(PRODUCER_PREFIX) :]: v for k, v in state.items() if k.startswith(PRODUCER_PREFIX)}
        self._apply_optimizer_config(checkpoint)
        if self.producer is not None:
            # Raises WeightsError on any key/shape mismatch.
            self.producer.load_trainable_state_dict(trained)
        else:
            self._pending_trainable_state = trained

    def _apply_optimizer_config(self, checkpoint: dict[str, Any]) -> None:
        """Resume: the configured lr/betas/weight decay replace those in the saved optimiser state."""
        import sys

        opt = self.optimizer_config
        wanted = {"lr": float(opt.lr), "betas": tuple(float(b) for b in opt.betas), "weight_decay": float(opt.weight_decay)}
        changed: dict[str, tuple[Any, Any]] = {}
        for optimizer_state in checkpoint.get("optimizer_states", []) or []:
            for group in optimizer_state.get("param_groups", []):
                for key, value in wanted.items():
                    if key not in group:
                        continue
                    old = tuple(group[key]) if isinstance(group[key], (list, tuple)) else group[key]
                    if old != value:
                        changed[key] = (old, value)
                    group[key] = value
                if "initial_lr" in group:
                    group["initial_lr"] = wanted["lr"]
        if changed:
            said = ", ".join(f"model.optimizer.{k}={new} (the checkpoint had {old})" for k, (old, new) in changed.items())
            print(f"clipsam: resuming with {said}", file=sys.stderr)

    # ------------------------------------------------------------------ training
    def configure_optimizers(self) -> torch.optim.Optimizer:
        assert self.producer is not None
        params = [p for p in self.producer.parameters() if p.requires_grad]
        if not params:
            raise ConfigError(f"model.method={self.method} has no trainable parameters: there is nothing to fit")
        opt = self.optimizer_config
        return torch.optim.Adam(params, lr=opt.lr, betas=tuple(opt.betas), weight_decay=opt.weight_decay)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        assert self.producer is not None
        out = self.producer(batch["image"], batch["category"])
        losses = self.producer.loss(out, batch)  # {"loss": ..., e.g. "focal", "dice"}
        batch_size = batch["image"].shape[0]
        self.log("train/loss", losses["loss"], prog_bar=True, batch_size=batch_size)
        for key, value in losses.items():
            if key != "loss":
                self.log(f"train/{key}", value, batch_size=batch_size)
        return losses["loss"]

    # ------------------------------------------------------------------ inference
    def _segment(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        """Producer -> refiner -> fusion on a batch.

        Returns:
            dict with ``anomaly_map`` (B, H, W) the producer's map in [0, 1] (Map_a), ``scores``
            (B, H, W) fused pixel scores in [0, 1], ``mask`` (B, H, W) bool final mask,
            ``image_scores`` (B,) and ``clip_image_scores`` (B,) (the producer's own).
        """
        from clipsam.fusion import fuse_scores

        assert self.producer is not None
        t0 = time.perf_counter()
        out = self.producer(batch["image"], batch["category"])
        self._add_time("clip_forward", time.perf_counter() - t0)
        anomaly_map = out.anomaly_map.float()  # (B, H, W) Map_a
        producer_scores = out.image_scores.float()  # (B,)
        if self.refiner is None:
            scores = anomaly_map
            mask = anomaly_map >= self.eval_config.predict_mask_threshold
            image_scores = producer_scores
        else:
            # The refiner reads what it needs from the batch (SAM's input of the original image).
            refined = self.refiner.refine_batch(batch, anomaly_map)
            for key, seconds in refined.timings.items():
                self._add_time(key, seconds)
            t1 = time.perf_counter()
            mask = refined.mask.to(anomaly_map.device)
            probs = refined.mask_probs.to(anomaly_map.device)
            scores = torch.stack(
                [fuse_scores(a, p, m, method=self.eval_config.fusion) for a, p, m in zip(anomaly_map, probs, mask)]
            )
            self._add_time("fusion", time.perf_counter() - t1)
            image_scores = self.producer.fused_image_scores(out, scores)
        return {
            "anomaly_map": anomaly_map,
            "scores": scores,
            "mask": mask,
            "image_scores": image_scores,
            "clip_image_scores": producer_scores,  # the producer's own (april_gan: model.clip.image_score of Map_a / the CLS token)
        }

    def inference(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        """:meth:`_segment`, tiled when ``model.tiling`` is on (test, predict and Segmenter).

        With tiling, ``batch["image"]`` is the (B, 3, Hc, Wc) canvas: it is cut into frame-sized
        tiles (run in chunks of B tiles), and the tile outputs are stitched back
        (:mod:`clipsam.tiling`: maps averaged where tiles overlap, masks joined). A tile is an
        image of its own for the refiner: SAM encodes the tile (its frame pixels, long side to
        SAM's input size), not the original image. An image's score is the maximum of its
        tiles' scores (anomalous if any tile is). Same keys and meanings as :meth:`_segment`,
        at canvas size.
        """
        from clipsam.tiling import split_tiles, stitch_tiles

        images = batch["image"]
        if self.tiling.canvas() is None or tuple(images.shape[-2:]) == (self.image_size, self.image_size):
            return self._segment(batch)
        tiles, positions = split_tiles(images, self.image_size, int(self.tiling.overlap))
        per_image = len(positions)
        categories = [c for c in batch["category"] for _ in positions]
        chunk = max(1, images.shape[0])
        parts: dict[str, list[torch.Tensor]] = {k: [] for k in ("anomaly_map", "scores", "mask", "image_scores", "clip_image_scores")}
        for start in range(0, tiles.shape[0], chunk):
            tile_batch = {"image": tiles[start : start + chunk], "category": categories[start : start + chunk]}
            if self.refiner is not None:
                tile_batch.update(self._tile_sam_inputs(tile_batch["image"]))
            out = self._segment(tile_batch)
            for key in parts:
                parts[key].append(out[key])
        size = tuple(images.shape[-2:])
        joined = {key: torch.cat(values) for key, values in parts.items()}
        return {
            "anomaly_map": stitch_tiles(joined["anomaly_map"], positions, size),
            "scores": stitch_tiles(joined["scores"], positions, size),
            "mask": stitch_tiles(joined["mask"], positions, size, reduce="any"),
            "image_scores": joined["image_scores"].view(-1, per_image).amax(1),
            "clip_image_scores": joined["clip_image_scores"].view(-1, per_image).amax(1),
        }

    def _tile_sam_inputs(self, tiles: torch.Tensor) -> dict[str, torch.Tensor]:
        """SAM's input keys (``sam_image``, ``sam_size``, ``original_size``) for frame-sized tiles."""
        from clipsam.data.transforms import build_sam_input, denormalize

        side = self.sam_input_side()
        if side is None:  # this refiner reads the frame image itself
            return {}
        pixels = denormalize(tiles).permute(0, 2, 3, 1).cpu().numpy()  # (T, H, W, 3) uint8
        built = [build_sam_input(tile, side) for tile in pixels]
        return {
            "sam_image": torch.stack([b[0] for b in built]).to(tiles.device),
            "sam_size": torch.stack([b[1] for b in built]).to(tiles.device),
            "original_size": torch.tensor([list(tiles.shape[-2:])] * tiles.shape[0], device=tiles.device),
        }

    def _add_time(self, key: str, seconds: float) -> None:
        self._timings[key] = self._timings.get(key, 0.0) + float(seconds)

    # ------------------------------------------------------------------ test / validate
    # ``clipsam test`` and ``clipsam validate`` run the same evaluation on ``data.test``; they
    # differ only in the prefix of the logged keys and the name of the report files.
    def _eval_start(self) -> None:
        from clipsam.metrics.collection import PerCategoryMetrics

        datamodule = getattr(self.trainer, "datamodule", None)
        categories = list(getattr(datamodule, "test_categories", []) or [])
        if not categories:
            raise ConfigError("the test dataset has no categories: check data.test")
        self._categories = categories
        dtype = torch.float16 if self.eval_config.metric_score_dtype == "float16" else torch.float32
        # Maps accumulate in host memory even on GPU (compute_on_cpu); states sync under DDP.
        kwargs = {
            "aupro": self.eval_config.aupro,
            "aupro_protocol": self.eval_config.aupro_protocol,
            "score_dtype": dtype,
            "compute_on_cpu": True,
        }
        self.test_metrics = PerCategoryMetrics(
            categories,
            pr_curve_points=self.eval_config.pr_curve_points,
            threshold_method=self.eval_config.threshold_method,
            target_fpr=self.eval_config.target_fpr,
            **kwargs,
        ).to(self.device)
        self.clip_metrics = None
        if self.eval_config.report_clip_baseline and self.refiner is not None and self.eval_config.fusion != "clip":
            self.clip_metrics = PerCategoryMetrics(categories, **kwargs).to(self.device)
        self._overlays = []
        self._timings = {}

    def _eval_step(self, batch: dict[str, Any]) -> None:
        result = self.inference(batch)
        cat_index = {c: i for i, c in enumerate(self._categories)}
        category_ids = torch.tensor([cat_index[c] for c in batch["category"]])
        # Metric states live in host memory (compute_on_cpu): copy what they need in one go,
        # so the device is synchronised once per batch, not once per check inside update().
        host = _to_host(
            {
                "scores": result["scores"],
                "image_scores": result["image_scores"],
                "anomaly_map": result["anomaly_map"],
                "clip_image_scores": result["clip_image_scores"],
                "masks": batch["mask"] > 0.5,
                "labels": batch["label"],
                "sample_ids": batch["index"],
                "has_mask": batch["has_mask"],
            }
        )
        common = {
            "masks": host["masks"],
            "labels": host["labels"],
            "category_ids": category_ids,
            "sample_ids": host["sample_ids"],
            "has_mask": host["has_mask"],
        }
        assert self.test_metrics is not None
        self.test_metrics.update(host["scores"], image_scores=host["image_scores"], **common)
        if self.clip_metrics is not None:
            self.clip_metrics.update(host["anomaly_map"], image_scores=host["clip_image_scores"], **common)
        self._collect_overlays(batch, result)

    def _collect_overlays(self, batch: dict[str, Any], result: dict[str, torch.Tensor]) -> None:
        """Keep up to ``num_overlays`` examples over the whole run, anomalous ones first.

        An anomalous image arriving when the budget is full replaces a kept normal one, so a run
        whose first batches are all normal still shows anomalies.
        """
        from clipsam.data.transforms import denormalize

        budget = self.eval_config.num_overlays
        if budget <= 0 or not self.trainer.is_global_zero:
            return
        for i in range(len(batch["path"])):
            anomalous = int(batch["label"][i]) == 1
            if len(self._overlays) >= budget:
                normal = [k for k, o in enumerate(self._overlays) if not o["anomalous"]]
                if not anomalous or not normal:
                    continue
                self._overlays.pop(normal[-1])
            self._overlays.append(
                {
                    "path": batch["path"][i],
                    "category": batch["category"][i],
                    "anomalous": anomalous,
                    "image_score": float(result["image_scores"][i]),
                    "image": denormalize(batch["image"][i]).cpu(),
                    "gt": (batch["mask"][i] > 0.5).cpu(),
                    "clip_map": result["anomaly_map"][i].cpu(),
                    "scores": result["scores"][i].cpu(),
                    "mask": result["mask"][i].cpu(),
                }
            )

    def _eval_end(self, prefix: str) -> None:
        from clipsam.reporting import report_test_results

        assert self.test_metrics is not None
        results = self.test_metrics.compute()  # synced over ranks: every rank holds the same values
        thresholds = results.pop("thresholds", None)
        if thresholds is not None:
            thresholds["scores"] = self.score_settings()
        baseline = self.clip_metrics.compute() if self.clip_metrics is not None else None
        for key, value in results["mean"].items():
            self.log(f"{prefix}/{key}", float(value), rank_zero_only=True)
        # Per-category scalars go straight to the loggers (W&B, CSV): through self.log they would
        # also fill Lightning's end-of-test console table, which our own table already shows.
        per_category = {
            f"{prefix}/{category}/{key}": value
            for category, values in results["per_category"].items()
            for key, value in values.items()
            if isinstance(value, float)
        }
        if self.trainer.is_global_zero:
            for logger in self.loggers:
                logger.log_metrics(per_category, step=self.global_step)
        if baseline is not None:
            for key, value in baseline["mean"].items():
                self.log(f"{prefix}_clip_only/{key}", float(value), rank_zero_only=True)
        # trainer.log_dir is a collective under DDP (it broadcasts rank 0's path): every rank must
        # ask for it, not rank 0 alone, or rank 0 waits on a peer that has already finished.
        run_dir = self.trainer.log_dir or self.trainer.default_root_dir
        if self.trainer.is_global_zero:
            report_test_results(
                trainer=self.trainer,
                run_dir=run_dir,
                results=results,
                baseline=baseline,
                overlays=self._overlays,
                timings=self._timings,
                config={**dict(self.hparams), "image_score": self.clip_config.image_score},
                stage=prefix,
                run_info=self.run_info(),
                thresholds=thresholds,
            )
        self.test_metrics.reset()
        if self.clip_metrics is not None:
            self.clip_metrics.reset()
        self._overlays = []

    def run_info(self) -> dict[str, Any]:
        """What makes test results comparable (``"run"`` in test_results.json; read by ``clipsam compare``).

        ``protocol`` holds every setting that changes how the same maps become metrics; ``data``
        the dataset specs (``train`` is the auxiliary dataset of trained methods).
        """
        datamodule = getattr(self._trainer, "datamodule", None) if self._trainer is not None else None

        def spec(name: str) -> Any:
            value = getattr(datamodule, name, None)
            return _to_plain(value) if dataclasses.is_dataclass(value) else None

        return {
            "method": self.method,
            "refiner": self.refiner_name,
            "trainable": self.trainable,
            "image_size": self.image_size,
            "fusion": self.eval_config.fusion if self.refiner_name != "none" else "none",
            # How maps become metrics: runs that differ here are not comparable.
            "protocol": {
                "metrics": "clipsam.metrics.collection.PerCategoryMetrics",
                "metric_score_dtype": self.eval_config.metric_score_dtype,
            },
            "data": {"train": spec("train_spec"), "test": spec("test_spec")},
            "checkpoint": getattr(self._trainer, "ckpt_path", None) if self._trainer is not None else None,
        }

    def on_test_start(self) -> None:
        self._eval_start()

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._eval_step(batch)

    def on_test_epoch_end(self) -> None:
        self._eval_end("test")

    def on_validation_start(self) -> None:
        self._eval_start()

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._eval_step(batch)

    def on_validation_epoch_end(self) -> None:
        self._eval_end("validate")

    # ------------------------------------------------------------------ decisions / predict
    def score_settings(self) -> dict[str, Any]:
        """The settings the pixel and image scores depend on (recorded with thresholds)."""
        return {
            "method": self.method,
            "refiner": self.refiner_name,
            "fusion": self.eval_config.fusion,
            "image_score": self.clip_config.image_score,
            "image_size": self.image_size,
            "tiling": _to_plain(self.tiling),
        }

    def load_thresholds(self) -> dict[str, Any] | None:
        """Read ``model.evaluation.thresholds`` once (None when unset); refuse other scores."""
        from clipsam.thresholds import check_compatible, load_thresholds

        source = self.eval_config.thresholds
        if not source:
            return None
        if self._thresholds is None:
            thresholds = load_thresholds(source)
            check_compatible(thresholds, self.score_settings(), source=str(source))
            self._thresholds = thresholds
        return self._thresholds

    def decide(self, batch: dict[str, Any], result: dict[str, torch.Tensor]) -> dict[str, Any]:
        """Thresholds, labels and the written mask for a segmented batch (predict, Segmenter).

        Args:
            batch: the batch (``category`` is used to pick per-category thresholds).
            result: :meth:`_segment`'s output.

        Returns:
            ``result`` plus ``mask`` (B, H, W) bool from ``model.evaluation.mask_source``,
            ``labels`` (B,) bool (image score >= image threshold), ``image_thresholds`` and
            ``pixel_thresholds`` (lists of float), ``threshold_scopes`` (where each came from:
            the category, "global" or "default") and ``object_names`` (what the prompts said).
        """
        from clipsam.prompts import object_name_for
        from clipsam.thresholds import lookup

        thresholds = self.load_thresholds()
        config = self.eval_config
        categories = list(batch["category"])
        image_t, pixel_t, scopes = [], [], []
        for category in categories:
            t_img, scope = lookup(thresholds, "image", category, config.predict_image_threshold)
            t_pix, _ = lookup(thresholds, "pixel", category, config.predict_mask_threshold)
            image_t.append(t_img)
            pixel_t.append(t_pix)
            scopes.append(scope)
        scores = result["scores"]
        if config.mask_source == "score" or self.refiner is None:
            limits = torch.tensor(pixel_t, dtype=scores.dtype, device=scores.device).view(-1, 1, 1)
            mask = scores >= limits
        else:
            mask = result["mask"]
        image_limits = torch.tensor(image_t, dtype=torch.float32, device=scores.device)
        return {
            **result,
            "mask": mask,
            "labels": result["image_scores"].float() >= image_limits,
            "image_thresholds": image_t,
            "pixel_thresholds": pixel_t,
            "threshold_scopes": scopes,
            "object_names": [object_name_for(c, self.clip_config.object_name) for c in categories],
        }

    def predict_step(self, batch: dict[str, Any], batch_idx: int, dataloader_idx: int = 0) -> dict[str, Any]:
        if not batch["path"]:  # every file of this batch failed to decode (see PredictionWriter)
            return {"path": [], "skipped": list(batch.get("skipped", []))}
        result = self.decide(batch, self.inference(batch))
        return {
            "skipped": list(batch.get("skipped", [])),
            "path": list(batch["path"]),
            "category": list(batch["category"]),
            "original_size": batch["original_size"].cpu(),
            "scores": result["scores"].to(torch.float16).cpu(),  # (B, H, W), half to keep memory low
            "mask": result["mask"].cpu(),
            "image_scores": result["image_scores"].cpu(),
            "labels": result["labels"].cpu(),
            "image_thresholds": result["image_thresholds"],
            "pixel_thresholds": result["pixel_thresholds"],
            "threshold_scopes": result["threshold_scopes"],
            "object_names": result["object_names"],
        }

    def configure_callbacks(self) -> list[Any]:
        from clipsam.callbacks import PredictionWriter

        return [PredictionWriter(self.eval_config.predict_dir)]
