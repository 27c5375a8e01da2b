"""ClipSamModule: the Lightning hooks around a :class:`clipsam.pipeline.Pipeline`.

The module owns no computation of its own: the pipeline (map producer chosen by
``model.method``, refiner chosen by ``model.refiner``, fusion, tiling, decisions) does the work
for ``fit``, ``validate``, ``test`` and ``predict`` alike; :class:`clipsam.evaluation.Evaluator`
scores and reports; :mod:`clipsam.checkpoints` says what a checkpoint holds and checks it.

- ``fit``: only what the producer says is trainable trains (Adam, the producer's loss). A
  training-free method refuses ``fit``. The refiner is never built during fit.
- ``test`` / ``validate``: pipeline -> per-category metrics, reported as a table, JSON/CSV in the
  run directory and W&B (see :mod:`clipsam.reporting`).
- ``predict``: the same pipeline; :class:`clipsam.callbacks.PredictionWriter` writes one mask PNG
  and one overlay PNG per image.

Frozen backbones are built in :meth:`configure_model`: validating a config never loads weights.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from lightning.pytorch import LightningModule

from clipsam import checkpoints
from clipsam.cascade import CascadeConfig
from clipsam.errors import ConfigError
from clipsam.evaluation import EvalConfig, Evaluator, run_info
from clipsam.methods import DEFAULT_METHOD
from clipsam.model_config import OptimizerConfig, check_precision, resolve_model_settings
from clipsam.models.clip import ClipConfig
from clipsam.models.sam import SamConfig
from clipsam.pipeline import Pipeline, prediction_record
from clipsam.prompting import PromptConfig
from clipsam.settings import from_mapping, to_plain
from clipsam.tiling import TilingConfig

__all__ = ["ClipSamModule", "EvalConfig", "OptimizerConfig"]

_EVAL_STAGES = ("test", "validate", "predict")


class ClipSamModule(LightningModule):
    """A map producer + a refiner; by default CLIP adapters + frozen SAM with PPG and CPS (arXiv 2510.11028).

    Args:
        method: the map producer, a name of :data:`clipsam.methods.METHODS`.
        method_config: the method's settings (its dataclass's keys; validated here, an unknown key
            is an error naming ``model.method_config.<key>``); None: its defaults.
        refiner: ``ppg_cps`` (frozen SAM, PPG + CPS), ``mmr`` (ClipSAM-rec's multi-level mask
            refinement) or ``none``; None follows the deprecated ``evaluation.use_sam``.
        refiner_config: the refiner's settings (validated here, errors name
            ``model.refiner_config.<key>``); None: its defaults. ``none`` ignores it.
        optimizer: Adam settings for the trainable parameters.
        evaluation: fusion, reports, thresholds and predict outputs.
        image_size: the evaluation frame; linked from ``data.image_size`` by the CLI.
        tiling: tiled inference for large images; linked from ``data.tiling`` by the CLI.
        clip, sam, prompt, cascade, focal_gamma: deprecated aliases of APRIL-GAN's
            ``method_config`` and of the SAM refiners' ``refiner_config`` keys (:mod:`clipsam.model_config`).
    """

    def __init__(
        self,
        *,
        method: str = DEFAULT_METHOD,
        method_config: dict[str, Any] | None = None,
        refiner: str | None = None,
        refiner_config: dict[str, Any] | None = None,
        optimizer: OptimizerConfig = OptimizerConfig(),
        evaluation: EvalConfig = EvalConfig(),
        image_size: int = 518,
        tiling: TilingConfig | None = None,
        clip: ClipConfig | None = None,
        sam: SamConfig | None = None,
        prompt: PromptConfig | None = None,
        cascade: CascadeConfig | None = None,
        focal_gamma: float | None = None,
    ) -> None:
        super().__init__()
        self.optimizer_config: OptimizerConfig = from_mapping(OptimizerConfig, optimizer, key="model.optimizer")
        self.eval_config: EvalConfig = from_mapping(EvalConfig, evaluation, key="model.evaluation")
        self.eval_config.check()
        settings = resolve_model_settings(
            method=method,
            method_config=method_config,
            refiner=refiner,
            refiner_config=refiner_config,
            use_sam=self.eval_config.use_sam,
            clip=clip,
            sam=sam,
            prompt=prompt,
            cascade=cascade,
            focal_gamma=focal_gamma,
        )
        self.method_key = settings.method_key
        self.pipeline = Pipeline(
            method=settings.method,
            method_config=settings.method_config,
            refiner=settings.refiner,
            refiner_config=settings.refiner_config,
            image_size=int(image_size),
            fusion=self.eval_config.fusion,
            mask_threshold=self.eval_config.predict_mask_threshold,
            tiling=from_mapping(TilingConfig, tiling, key="data.tiling"),
        )
        self._thresholds: dict[str, Any] | None = None
        self.load_thresholds()  # a missing or incompatible thresholds file fails before any run folder
        self.save_hyperparameters(
            {
                "method": settings.method,
                "method_config": to_plain(settings.method_config),
                "refiner": settings.refiner,
                "refiner_config": to_plain(settings.refiner_config),
                "optimizer": to_plain(self.optimizer_config),
                "evaluation": to_plain(self.eval_config),
                "image_size": int(image_size),
                "tiling": to_plain(self.pipeline.tiling),
            }
        )
        self.strict_loading = False  # frozen parts are missing from checkpoints on purpose
        self._pending_state: dict[str, torch.Tensor] | None = None
        self.evaluator: Evaluator | None = None

    # ------------------------------------------------------------------ what the pipeline says
    method = property(lambda self: self.pipeline.method)
    method_config = property(lambda self: self.pipeline.method_config)
    refiner_name = property(lambda self: self.pipeline.refiner_name)
    refiner_config = property(lambda self: self.pipeline.refiner_config)
    trainable = property(lambda self: self.pipeline.trainable)
    needs_checkpoint = property(lambda self: self.pipeline.trainable)  # test/predict need fitted weights
    image_size = property(lambda self: self.pipeline.image_size)
    tiling = property(lambda self: self.pipeline.tiling)
    producer = property(lambda self: self.pipeline.producer)
    refiner = property(lambda self: self.pipeline.refiner)
    clip_model = property(lambda self: getattr(self.pipeline.producer, "model", None))

    def check_stage(self, stage: str) -> None:
        """Refuse a stage this method cannot run; called by the CLI before any run folder exists."""
        self.pipeline.check_stage(stage)

    def score_settings(self) -> dict[str, Any]:
        return self.pipeline.score_settings()

    def load_thresholds(self) -> dict[str, Any] | None:
        """Read ``model.evaluation.thresholds`` once (None when unset); refuse other scores."""
        from clipsam.thresholds import check_compatible, load_thresholds

        source = self.eval_config.thresholds
        if source and self._thresholds is None:
            thresholds = load_thresholds(source)
            check_compatible(thresholds, self.score_settings(), source=str(source))
            self._thresholds = thresholds
        return self._thresholds if source else None

    # ------------------------------------------------------------------ building
    def setup(self, stage: str) -> None:
        self.check_stage(stage)
        check_precision(str(self.trainer.precision))
        datamodule = getattr(self.trainer, "datamodule", None)
        if datamodule is not None and hasattr(datamodule, "set_model_inputs"):
            datamodule.set_model_inputs(self.pipeline.input_specs(refiner=stage in _EVAL_STAGES))
        self.pipeline.prepare_data(datamodule, stage)  # references, whole-category batches

    def configure_model(self) -> None:
        """Build the producer (always) and the refiner (test/validate/predict only), once."""
        self.pipeline.build_producer()
        if self._pending_state is not None:
            self.pipeline.producer.load_trainable_state_dict(self._pending_state)
            self._pending_state = None
        stage = self._stage()
        if stage in _EVAL_STAGES:
            # predict sees each image once: an embedding cache there only fills the disk, unless asked for.
            self.pipeline.build_refiner(use_embedding_cache=stage != "predict" or self.eval_config.predict_embedding_cache)

    def build_inference_models(self) -> None:
        """Build every model for inference without a Trainer (:class:`clipsam.Segmenter`, export)."""
        self.configure_model()
        self.pipeline.build_refiner(use_embedding_cache=False)

    def _stage(self) -> str | None:
        trainer = self._trainer
        return None if trainer is None or trainer.state.stage is None else str(trainer.state.stage.value)

    # ------------------------------------------------------------------ checkpoints
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoints.strip_checkpoint(checkpoint, self.pipeline, self.optimizer_config)

    def check_checkpoint(self, checkpoint: Mapping[str, Any], *, path: Any = None) -> None:
        """Refuse a checkpoint of another method or of other frozen weights (:mod:`clipsam.checkpoints`)."""
        checkpoints.check_checkpoint(checkpoint, self.pipeline, path=path, method_key=self.method_key)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Validate the checkpoint, then load the producer's trained state (resuming ``fit``
        trains with the configured optimiser settings; a change is reported on stderr)."""
        checkpoints.upgrade_legacy(checkpoint)
        self.check_checkpoint(checkpoint)
        checkpoints.apply_optimizer_config(checkpoint, self.optimizer_config)
        trained = checkpoints.producer_state(checkpoint)
        checkpoints.to_module_keys(checkpoint)  # so Lightning's own loading finds them too
        if self.pipeline.producer is not None:
            self.pipeline.producer.load_trainable_state_dict(trained)  # WeightsError on any mismatch
        else:
            self._pending_state = trained

    # ------------------------------------------------------------------ training
    def configure_optimizers(self) -> torch.optim.Optimizer:
        params = [p for p in self.pipeline.build_producer().parameters() if p.requires_grad]
        if not params:
            raise ConfigError(f"model.method={self.method} has no trainable parameters: there is nothing to fit")
        return self.optimizer_config.build(params)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        producer = self.pipeline.build_producer()
        losses = producer.loss(producer.forward_batch(batch), batch)  # {"loss": ..., e.g. "focal", "dice"}
        batch_size = batch["image"].shape[0]
        self.log("train/loss", losses["loss"], prog_bar=True, batch_size=batch_size)
        for key, value in losses.items():
            if key != "loss":
                self.log(f"train/{key}", value, batch_size=batch_size)
        return losses["loss"]

    # ------------------------------------------------------------------ inference
    def inference(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        """The pipeline on a batch (tiled when ``data.tiling`` is on)."""
        return self.pipeline(batch)

    def decide(self, batch: dict[str, Any], result: dict[str, torch.Tensor]) -> dict[str, Any]:
        """Thresholds, labels and the written mask (:meth:`clipsam.pipeline.Pipeline.decide`)."""
        config = self.eval_config
        return self.pipeline.decide(
            batch,
            result,
            thresholds=self.load_thresholds(),
            image_threshold=config.predict_image_threshold,
            pixel_threshold=config.predict_mask_threshold,
            mask_source=config.mask_source,
        )

    def run_info(self) -> dict[str, Any]:
        return {**run_info(self.pipeline, self.eval_config, self._trainer), **self.pipeline.reference_report()}

    # ------------------------------------------------------------------ test / validate
    def _eval_start(self) -> None:
        datamodule = getattr(self.trainer, "datamodule", None)
        categories = list(getattr(datamodule, "test_categories", []) or [])
        self.evaluator = Evaluator(
            self.eval_config,
            categories,
            device=self.device,
            with_refiner=self.pipeline.refiner is not None,
            keep_overlays=self.trainer.is_global_zero,
            category_image_scores=self.pipeline.category_image_scores(),
        )
        self.pipeline.timings = {}

    def _eval_end(self, prefix: str) -> None:
        assert self.evaluator is not None
        self.evaluator.finish(
            prefix=prefix,
            log=self.log,
            trainer=self.trainer,
            loggers=self.loggers,
            global_step=self.global_step,
            score_settings=self.score_settings(),
            config={**dict(self.hparams), "image_score": getattr(self.method_config, "image_score", None)},
            run_info=self.run_info(),
            timings=self.pipeline.timings,
        )

    def on_test_start(self) -> None:
        self._eval_start()

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self.evaluator.update(batch, self.inference(batch))

    def on_test_epoch_end(self) -> None:
        self._eval_end("test")

    def on_validation_start(self) -> None:
        self._eval_start()

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self.evaluator.update(batch, self.inference(batch))

    def on_validation_epoch_end(self) -> None:
        self._eval_end("validate")

    # ------------------------------------------------------------------ predict
    def predict_step(self, batch: dict[str, Any], batch_idx: int, dataloader_idx: int = 0) -> dict[str, Any]:
        if not batch["path"]:  # every file of this batch failed to decode (see PredictionWriter)
            return {"path": [], "skipped": list(batch.get("skipped", []))}
        return prediction_record(batch, self.decide(batch, self.inference(batch)))

    def configure_callbacks(self) -> list[Any]:
        from clipsam.callbacks import PredictionWriter

        return [PredictionWriter(self.eval_config.predict_dir)]
