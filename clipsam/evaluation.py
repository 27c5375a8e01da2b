"""Evaluation of a pipeline: per-category metrics, overlays and the run report.

``clipsam test`` and ``clipsam validate`` run the same evaluation on ``data.test``
(:class:`Evaluator`); they differ only in the prefix of the logged keys and the name of the
report files. :class:`EvalConfig` (``model.evaluation``) holds every evaluation and decision
setting.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, Literal

import torch

from clipsam.errors import ConfigError

__all__ = ["EvalConfig", "Evaluator"]


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
        num_overlays: examples written as overlay panels (``overlays/``) and logged to W&B
            (image, ground truth, CLIP map, scores, mask), at most: drawn per category, the
            anomalous images with the highest and the lowest score and the normal images with
            the highest and the lowest, kind by kind across the categories (0: none).
        examples_seed: orders the categories when ``num_overlays`` cannot show them all, and
            breaks ties between equal scores (per image path), so the examples of a run are
            the same on every rerun.
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
            (``model.refiner_config.sam.embedding_cache_dir``); off by default, as predict usually sees each
            image once.
    """

    use_sam: bool = True
    fusion: str = "clip_boost"
    report_clip_baseline: bool = True
    aupro: bool = False
    aupro_protocol: Literal["mvtec", "anomalyclip"] = "mvtec"
    metric_score_dtype: Literal["float32", "float16"] = "float32"
    num_overlays: int = 16
    examples_seed: int = 0
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


    def check(self) -> None:
        """Refuse values no run can use (called when the module is built, before any run folder)."""
        from clipsam.thresholds import THRESHOLD_METHODS

        if self.threshold_method not in THRESHOLD_METHODS:
            raise ConfigError(
                f"model.evaluation.threshold_method={self.threshold_method!r}: choose one of {', '.join(THRESHOLD_METHODS)}"
            )
        if not 0.0 <= float(self.target_fpr) < 1.0:
            raise ConfigError(f"model.evaluation.target_fpr={self.target_fpr} must be in [0, 1)")
        if self.mask_source not in ("sam", "score"):
            raise ConfigError(
                f"model.evaluation.mask_source={self.mask_source!r}: choose 'sam' (SAM's final "
                "mask) or 'score' (fused score above the pixel threshold)"
            )


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


class Evaluator:
    """Metrics, overlays and the report of one test/validate run of a pipeline.

    Args:
        config: the evaluation settings.
        categories: the test categories (the metrics' index).
        device: where the metric states live (they accumulate on the host: ``compute_on_cpu``).
        with_refiner: whether a refiner runs; then, with ``report_clip_baseline`` and a fusion
            other than ``clip``, the producer's map is also scored (the CLIP-only baseline).
        keep_overlays: whether this process keeps overlays (rank 0).
        category_image_scores: the pipeline's per-category image score
            (:meth:`clipsam.pipeline.Pipeline.category_image_scores`), used for the image
            metrics; None keeps the per-image scores.
    """

    def __init__(
        self,
        config: EvalConfig,
        categories: list[str],
        *,
        device: torch.device,
        with_refiner: bool,
        keep_overlays: bool = True,
        category_image_scores: Callable[[torch.Tensor], torch.Tensor | None] | None = None,
    ) -> None:
        from clipsam.metrics.collection import PerCategoryMetrics

        if not categories:
            raise ConfigError("the test dataset has no categories: check data.test")
        self.config = config
        self.categories = list(categories)
        self.keep_overlays = keep_overlays
        dtype = torch.float16 if config.metric_score_dtype == "float16" else torch.float32
        kwargs = {"aupro": config.aupro, "aupro_protocol": config.aupro_protocol, "score_dtype": dtype, "compute_on_cpu": True}
        self.metrics = PerCategoryMetrics(
            self.categories,
            pr_curve_points=config.pr_curve_points,
            threshold_method=config.threshold_method,
            target_fpr=config.target_fpr,
            category_image_scores=category_image_scores,
            **kwargs,
        ).to(device)
        self.clip_metrics = None
        if config.report_clip_baseline and with_refiner and config.fusion != "clip":
            self.clip_metrics = PerCategoryMetrics(self.categories, **kwargs).to(device)
        #: category -> kind -> example (see :meth:`_collect_overlays`)
        self.candidates: dict[str, dict[str, dict[str, Any]]] = {}
        #: the last report's numbers (results, baseline, thresholds), kept when a file could not be written
        self.report: dict[str, Any] | None = None

    @property
    def overlays(self) -> list[dict[str, Any]]:
        """The examples shown: at most ``num_overlays``, spread over the categories, kind by kind
        (:func:`clipsam.wandb_logging.pick_examples`), each with its ``kind``."""
        from clipsam.wandb_logging import pick_examples

        picked = pick_examples(self.candidates, max(0, self.config.num_overlays), seed=self.config.examples_seed)
        for example in picked:
            example["kind"] = next(
                kind for kinds in self.candidates.values() for kind, held in kinds.items() if held is example
            )
        return picked

    def update(self, batch: dict[str, Any], result: dict[str, torch.Tensor]) -> None:
        """Add a segmented batch (the pipeline's output for it) to the metrics and overlays."""
        cat_index = {c: i for i, c in enumerate(self.categories)}
        category_ids = torch.tensor([cat_index[c] for c in batch["category"]])
        # Metric states live in host memory: copy what they need in one go, so the device is
        # synchronised once per batch, not once per check inside update().
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
                **({"image_score_parts": result["image_score_parts"]} if "image_score_parts" in result else {}),
            }
        )
        common = {
            "masks": host["masks"],
            "labels": host["labels"],
            "category_ids": category_ids,
            "sample_ids": host["sample_ids"],
            "has_mask": host["has_mask"],
        }
        self.metrics.update(
            host["scores"], image_scores=host["image_scores"], image_score_parts=host.get("image_score_parts"), **common
        )
        if self.clip_metrics is not None:
            self.clip_metrics.update(host["anomaly_map"], image_scores=host["clip_image_scores"], **common)
        self._collect_overlays(batch, result)

    def _collect_overlays(self, batch: dict[str, Any], result: dict[str, torch.Tensor]) -> None:
        """Keep, per category, the examples worth looking at: the anomalous images with the highest
        (``anomalous_best``) and the lowest (``anomalous_worst``: missed) image score and the
        normal images with the highest (``normal_worst``: a false alarm) and the lowest
        (``normal_best``). Equal scores are ordered by a seeded draw per image path, so the choice
        does not depend on the batch order. Only the images kept are copied."""
        import random

        from clipsam.data.transforms import denormalize

        if self.config.num_overlays <= 0 or not self.keep_overlays:
            return
        seed = self.config.examples_seed
        for i in range(len(batch["path"])):
            label = int(batch["label"][i])
            if label not in (0, 1):
                continue
            path, category = batch["path"][i], batch["category"][i]
            key = (float(result["image_scores"][i]), random.Random(f"{seed}/{path}").random())
            slots = self.candidates.setdefault(category, {})
            example = None
            kinds = (("anomalous_best", True), ("anomalous_worst", False)) if label else (("normal_worst", True), ("normal_best", False))
            for kind, highest in kinds:
                held = slots.get(kind)
                if held is not None and not (key > held["_key"] if highest else key < held["_key"]):
                    continue
                if example is None:
                    example = {
                        "_key": key,
                        "path": path,
                        "category": category,
                        "anomalous": bool(label),
                        "image_score": key[0],
                        "image": denormalize(batch["image"][i]).cpu(),
                        "gt": (batch["mask"][i] > 0.5).cpu(),
                        "clip_map": result["anomaly_map"][i].cpu(),
                        "scores": result["scores"][i].cpu(),
                        "mask": result["mask"][i].cpu(),
                    }
                slots[kind] = example

    def finish(
        self,
        *,
        prefix: str,
        log: Callable[..., None],
        trainer: Any,
        loggers: list[Any],
        global_step: int,
        score_settings: dict[str, Any],
        config: dict[str, Any],
        run_info: dict[str, Any],
        timings: dict[str, float],
    ) -> None:
        """Compute, log (``log`` is the LightningModule's) and write the report; then reset."""
        from clipsam.reporting import display_path, report_test_results

        results = self.metrics.compute()  # synced over ranks: every rank holds the same values
        thresholds = results.pop("thresholds", None)
        if thresholds is not None:
            thresholds["scores"] = score_settings
        baseline = self.clip_metrics.compute() if self.clip_metrics is not None else None
        for key, value in results["mean"].items():
            log(f"{prefix}/{key}", float(value), rank_zero_only=True)
        # Per-category scalars go straight to the loggers (W&B, CSV): through log() they would
        # also fill Lightning's end-of-test console table, which our own table already shows.
        per_category = {
            f"{prefix}/{category}/{key}": value
            for category, values in results["per_category"].items()
            for key, value in values.items()
            if isinstance(value, float)
        }
        if trainer.is_global_zero:
            for logger in loggers:
                logger.log_metrics(per_category, step=global_step)
        if baseline is not None:
            for key, value in baseline["mean"].items():
                log(f"{prefix}_clip_only/{key}", float(value), rank_zero_only=True)
        # trainer.log_dir is a collective under DDP (it broadcasts rank 0's path): every rank must
        # ask for it, not rank 0 alone, or rank 0 waits on a peer that has already finished.
        run_dir = trainer.log_dir or trainer.default_root_dir
        self.report = {"results": results, "baseline": baseline, "thresholds": thresholds}
        if trainer.is_global_zero:
            overlays = self.overlays
            root = getattr(getattr(getattr(trainer, "datamodule", None), "test_spec", None), "root", None)
            for overlay in overlays:  # captions name the file below the dataset root, not a bare 000.png
                overlay["relative_path"] = display_path(overlay["path"], root)
            report_test_results(
                trainer=trainer,
                run_dir=run_dir,
                results=results,
                baseline=baseline,
                overlays=overlays,
                timings=timings,
                config=config,
                stage=prefix,
                run_info=run_info,
                thresholds=thresholds,
            )
        self.metrics.reset()
        if self.clip_metrics is not None:
            self.clip_metrics.reset()
        self.candidates = {}


def run_choices(pipeline: Any, eval_config: EvalConfig) -> dict[str, Any]:
    """The settings a run's scores depend on beyond the method's name, flat ``key: value``.

    The method's image score (``method_config.image_score``) and, with a refiner, the fusion
    and the refiner's open choices (:func:`clipsam.refiners.refiner_choices`, keyed
    ``refiner_config.<key>``).
    """
    from clipsam import refiners

    choices: dict[str, Any] = {}
    image_score = getattr(pipeline.method_config, "image_score", None)
    if image_score is not None:
        choices["method_config.image_score"] = image_score
    if pipeline.refiner_name != "none":
        choices["evaluation.fusion"] = eval_config.fusion
        for key, value in refiners.refiner_choices(pipeline.refiner_name, pipeline.refiner_config).items():
            choices[f"refiner_config.{key}"] = value
    return choices


def run_info(pipeline: Any, eval_config: EvalConfig, trainer: Any) -> dict[str, Any]:
    """What makes test results comparable (``"run"`` in test_results.json; read by ``clipsam compare``).

    ``protocol`` holds every setting that changes how the same maps become metrics; ``choices``
    the open choices the scores depend on (:func:`run_choices`); ``data``
    the dataset specs (``train`` is the auxiliary dataset of trained methods); ``frame`` the
    evaluation frame the maps and masks were scored in, and ``inputs`` what the method and the
    refiner read, built from the original image.
    """
    from clipsam.settings import to_plain

    datamodule = getattr(trainer, "datamodule", None) if trainer is not None else None

    def spec(name: str) -> Any:
        value = getattr(datamodule, name, None)
        return to_plain(value) if dataclasses.is_dataclass(value) else None

    canvas = pipeline.tiling.canvas()
    return {
        "method": pipeline.method,
        "refiner": pipeline.refiner_name,
        "trainable": pipeline.trainable,
        "image_size": pipeline.image_size,
        "frame": list(canvas) if canvas is not None else [pipeline.image_size, pipeline.image_size],
        "inputs": [to_plain(s) for s in pipeline.input_specs(refiner=pipeline.refiner_name != "none")],
        "fusion": eval_config.fusion if pipeline.refiner_name != "none" else "none",
        # Choices a paper leaves open and clipsam takes (each a config key), shown by compare.
        "choices": run_choices(pipeline, eval_config),
        # How maps become metrics: runs that differ here are not comparable.
        "protocol": {
            "metrics": "clipsam.metrics.collection.PerCategoryMetrics",
            "metric_score_dtype": eval_config.metric_score_dtype,
            **({"aupro_protocol": eval_config.aupro_protocol} if eval_config.aupro else {}),
        },
        "data": {"train": spec("train_spec"), "test": spec("test_spec")},
        "checkpoint": getattr(trainer, "ckpt_path", None) if trainer is not None else None,
    }
