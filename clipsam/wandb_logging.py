"""W&B runs the way teams use them: names, groups, tags, job types, and the links between runs.

Every ``WandbLogger`` of a ``clipsam fit`` / ``test`` / ``validate`` run is configured here before
its W&B run starts (:func:`configure_wandb`, called by the CLI after the run folder is reserved);
``clipsam predict`` has no logger and opens its own run (:func:`start_predict_run`) when the
config names a ``WandbLogger``. A setting the user gave in the logger's ``init_args`` (``name``,
``group``, ``job_type``, ``id``) is kept; tags are added to the user's.

============  ===========================================================================
name          ``<method>+<refiner> <train>-><test>``, e.g. ``april_gan+ppg_cps mvtec->visa``
              (``none`` for the training set of a training-free method; predict:
              ``-><last two parts of data.predict_dir>``)
job_type      ``fit``, ``test``, ``validate`` or ``predict``
group         ``$CLIPSAM_WANDB_GROUP``; else the benchmark grid a run belongs to (its
              folder under ``clipsam benchmark``'s ``root``); else the fit's: a fit starts its
              group ``fit <run id>``, and a test or predict of its checkpoint joins it
tags          ``method:``, ``refiner:``, ``train:``, ``test:``, ``frame:HxW``, ``protocol:``
              (metric score dtype), ``aupro:`` (when computed), ``job:``
id            a fit's id is kept in its checkpoints (``clipsam_wandb``): ``fit --ckpt_path``
              continues that W&B run; a test records it as ``fit_run`` in its config and summary
============  ===========================================================================
"""

from __future__ import annotations

import os
import random
import re
import secrets
import string
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from lightning.pytorch import Callback

__all__ = [
    "CHECKPOINT_KEY",
    "GROUP_ENV",
    "WandbCheckpointLink",
    "benchmark_group",
    "configure_wandb",
    "dataset_label",
    "pick_examples",
    "predict_wandb_settings",
    "run_identity",
    "start_predict_run",
    "wandb_loggers",
]

GROUP_ENV = "CLIPSAM_WANDB_GROUP"
"""Environment variable naming the W&B group of every run of the command (a grid, a sweep)."""

CHECKPOINT_KEY = "clipsam_wandb"
"""Checkpoint entry holding the fit's W&B run: ``{id, project, name, group, train}``."""

_TAG_LIMIT = 64  # W&B refuses longer tags


# ----------------------------------------------------------------------------- what a run is
def wandb_loggers(trainer: Any) -> list[Any]:
    """The trainer's ``WandbLogger`` instances."""
    from lightning.pytorch.loggers import WandbLogger

    return [logger for logger in getattr(trainer, "loggers", []) or [] if isinstance(logger, WandbLogger)]


def dataset_label(spec: Any) -> str | None:
    """A short name of a dataset spec: its format, ``folder:<root name>`` for a folder, ``/subset``."""
    if spec is None:
        return None
    fmt = str(getattr(spec, "format", "") or "")
    if fmt == "folder":
        fmt = f"folder:{getattr(spec, 'category', None) or Path(str(getattr(spec, 'root', '') or '')).name}"
    subset = getattr(spec, "subset", None)
    return fmt + (f"/{subset}" if subset else "")


def _frame(pipeline: Any) -> str:
    canvas = pipeline.tiling.canvas() if getattr(pipeline, "tiling", None) is not None else None
    height, width = canvas if canvas is not None else (pipeline.image_size, pipeline.image_size)
    return f"{height}x{width}"


def run_identity(
    model: Any, datamodule: Any, subcommand: str, *, fit_record: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """``{name, job_type, tags, train, test}`` of a run of ``subcommand``.

    ``train`` is the fit's training set: from the checkpoint's record when there is one (a test
    names what its adapters were trained on), else ``data.train``; ``none`` for a method that
    does not train.
    """
    pipeline = model.pipeline
    trainable = bool(getattr(pipeline, "trainable", False))
    train = None
    if trainable:
        train = (fit_record or {}).get("train") or dataset_label(getattr(datamodule, "train_spec", None))
    train = train or "none"
    if subcommand == "predict":
        folder = Path(os.path.expanduser(str(getattr(datamodule, "predict_dir", "") or "")))
        test = "/".join(folder.parts[-2:]) or "predict"  # the folder (or file) segmented
    else:
        test = dataset_label(getattr(datamodule, "test_spec", None)) or "none"
    name = f"{pipeline.method}+{pipeline.refiner_name} {train}->{test}"
    evaluation = getattr(model, "eval_config", None)
    tags = [
        f"method:{pipeline.method}",
        f"refiner:{pipeline.refiner_name}",
        f"train:{train}",
        f"test:{test}",
        f"frame:{_frame(pipeline)}",
        f"protocol:{getattr(evaluation, 'metric_score_dtype', 'float32')}",
        f"job:{subcommand}",
    ]
    if evaluation is not None and getattr(evaluation, "aupro", False):
        tags.append(f"aupro:{evaluation.aupro_protocol}")
    return {"name": name, "job_type": subcommand, "tags": [t[:_TAG_LIMIT] for t in tags], "train": train, "test": test}


_ATTEMPT = re.compile(r"^attempt_\d+$")


def benchmark_group(path: str | os.PathLike[str] | None) -> str | None:
    """The grid a ``clipsam benchmark`` command's folder belongs to: ``<root>/cells/<method>/
    <direction>/<ablation>/attempt_N`` or ``<root>/fits/<id>/attempt_N`` -> the root's name."""
    if not path:
        return None
    parts = Path(os.path.expanduser(os.fspath(path))).absolute().parts
    if len(parts) >= 6 and _ATTEMPT.match(parts[-1]) and parts[-5] == "cells":
        return parts[-6]
    if len(parts) >= 4 and _ATTEMPT.match(parts[-1]) and parts[-3] == "fits":
        return parts[-4]
    return None


def _new_id() -> str:
    """A W&B-style run id (8 lowercase letters and digits)."""
    alphabet = string.ascii_lowercase + string.digits
    return "".join(secrets.choice(alphabet) for _ in range(8))


def _group(explicit: Any, folder: Any, fit_record: Mapping[str, Any] | None, own_id: str | None, subcommand: str) -> str | None:
    if explicit:
        return str(explicit)
    env = os.environ.get(GROUP_ENV, "").strip()
    if env:
        return env
    grid = benchmark_group(folder)
    if grid:
        return grid
    if fit_record and fit_record.get("group"):
        return str(fit_record["group"])
    if subcommand == "fit" and own_id:
        return f"fit {own_id}"
    return None


def configure_wandb(
    trainer: Any,
    *,
    model: Any,
    datamodule: Any,
    subcommand: str,
    fit_record: Mapping[str, Any] | None = None,
    resume: bool = False,
) -> dict[str, Any] | None:
    """Name, group, tag and link the W&B runs of this command before they start.

    Args:
        trainer: its ``WandbLogger`` instances are configured (their ``init_args``).
        model: the ``ClipSamModule`` (method, refiner, frame, evaluation settings).
        datamodule: the ``AnomalyDataModule`` (dataset names).
        subcommand: ``fit``, ``test``, ``validate``.
        fit_record: the ``clipsam_wandb`` entry of the checkpoint the run starts from.
        resume: ``fit --ckpt_path``: continue the checkpoint's W&B run (same id).

    Returns:
        the W&B record of this run (``{id, project, name, group, train}``; what a fit's
        checkpoints keep), or None without a ``WandbLogger``.
    """
    record = None
    for logger in wandb_loggers(trainer):
        init = logger._wandb_init
        if init.get("anonymous") is None:
            init.pop("anonymous", None)  # else wandb warns on every run, even with WANDB_SILENT
        identity = run_identity(model, datamodule, subcommand, fit_record=fit_record)
        if not init.get("id"):
            if subcommand == "fit" and resume and fit_record and fit_record.get("id"):
                init["id"] = str(fit_record["id"])  # the same W&B run goes on
                init["resume"] = "allow"
            else:
                init["id"] = _new_id()
            logger._id = init["id"]
        if not init.get("name"):
            init["name"] = identity["name"]
            logger._name = identity["name"]
        init["job_type"] = init.get("job_type") or identity["job_type"]
        init["group"] = _group(init.get("group"), init.get("dir") or logger.save_dir, fit_record, init["id"], subcommand)
        tags = list(init.get("tags") or [])
        init["tags"] = tags + [t for t in identity["tags"] if t not in tags]
        if record is None:
            record = {
                "id": init["id"],
                "project": init.get("project"),
                "name": init["name"],
                "group": init["group"],
                "job_type": init["job_type"],
                "train": identity["train"],
            }
    return record


class WandbCheckpointLink(Callback):
    """Keep the fit's W&B run in every checkpoint it writes (``checkpoint["clipsam_wandb"]``), so
    ``fit --ckpt_path`` continues that run and a test of the checkpoint links to it."""

    def __init__(self, record: Mapping[str, Any]) -> None:
        self.record = {k: (None if v is None else str(v)) for k, v in record.items()}

    def on_save_checkpoint(self, trainer: Any, pl_module: Any, checkpoint: dict[str, Any]) -> None:
        checkpoint[CHECKPOINT_KEY] = dict(self.record)


def link_record(fit_record: Mapping[str, Any] | None, checkpoint_path: str | None) -> dict[str, Any] | None:
    """What a test/predict run's W&B config says about the fit it tests (``fit_run``)."""
    if not fit_record:
        return None
    return {**{k: fit_record.get(k) for k in ("id", "project", "name", "group", "train")}, "checkpoint": checkpoint_path}


# ----------------------------------------------------------------------------- examples
def pick_examples(candidates: Mapping[str, Mapping[str, Any]], cap: int, *, seed: int = 0) -> list[Any]:
    """Up to ``cap`` examples, spread over the categories.

    Args:
        candidates: ``{category: {kind: example}}`` with kinds ``anomalous_best`` (highest
            score), ``anomalous_worst`` (lowest: a missed anomaly), ``normal_worst`` (highest: a
            false alarm), ``normal_best`` (lowest); an example filling two kinds (the only
            anomalous image of a category) is taken once (compared by identity).
        cap: the most examples returned.
        seed: orders the categories (``random.Random(seed)``), so that with a cap below the
            number of categories the ones shown are drawn, not the first in sorted order.

    Returns:
        examples, kind by kind (the order above), each kind across the categories.
    """
    order = sorted(candidates)
    random.Random(seed).shuffle(order)
    picked: list[Any] = []
    for kind in ("anomalous_best", "anomalous_worst", "normal_worst", "normal_best"):
        for category in order:
            example = candidates[category].get(kind)
            if example is None or any(example is p for p in picked):
                continue
            if len(picked) >= cap:
                return picked
            picked.append(example)
    return picked


# ----------------------------------------------------------------------------- predict
def predict_wandb_settings(logger_config: Any) -> dict[str, Any] | None:
    """The ``init_args`` of the first ``WandbLogger`` in a parsed ``trainer.logger`` value (a
    dict, a Namespace or a list of them), or None when the config names none."""
    items = logger_config if isinstance(logger_config, (list, tuple)) else [logger_config]
    for item in items:
        if item is None or isinstance(item, bool):
            continue
        as_dict = dict(vars(item)) if hasattr(item, "__dict__") and not isinstance(item, dict) else item
        if not isinstance(as_dict, Mapping):
            continue
        if str(as_dict.get("class_path", "")).endswith("WandbLogger"):
            init = as_dict.get("init_args") or {}
            init = dict(vars(init)) if hasattr(init, "__dict__") and not isinstance(init, dict) else dict(init)
            return {k: v for k, v in init.items() if v is not None}
    return None


def start_predict_run(
    settings: Mapping[str, Any],
    *,
    run_dir: Path,
    model: Any,
    datamodule: Any,
    fit_record: Mapping[str, Any] | None,
    checkpoint: Mapping[str, Any] | None,
) -> Any:
    """Open the W&B run of a predict (its files in the predict folder); None when wandb fails."""
    import wandb

    identity = run_identity(model, datamodule, "predict", fit_record=fit_record)
    tags = list(settings.get("tags") or [])
    mode = "offline" if settings.get("offline", False) or os.environ.get("WANDB_MODE") in ("offline", "dryrun") else None
    config = {
        "subcommand": "predict",
        "run_dir": str(run_dir),
        "checkpoint": dict(checkpoint) if checkpoint else None,
        "fit_run": link_record(fit_record, (checkpoint or {}).get("path")),
        "predict_dir": str(getattr(datamodule, "predict_dir", "") or ""),
        "method": model.pipeline.method,
        "refiner": model.pipeline.refiner_name,
        "evaluation": {k: getattr(model.eval_config, k) for k in ("mask_source", "thresholds", "predict_image_threshold", "predict_mask_threshold")},
    }
    kwargs = {
        "dir": str(run_dir),
        "project": settings.get("project") or os.environ.get("WANDB_PROJECT") or "lightning_logs",
        "name": settings.get("name") or identity["name"],
        "group": _group(settings.get("group"), None, fit_record, None, "predict"),
        "job_type": settings.get("job_type") or "predict",
        "tags": tags + [t for t in identity["tags"] if t not in tags],
        "config": config,
        "reinit": "finish_previous",
    }
    if settings.get("entity"):
        kwargs["entity"] = settings["entity"]
    if mode:
        kwargs["mode"] = mode
    try:
        return wandb.init(**kwargs)
    except Exception as err:  # noqa: BLE001 - W&B is a report: a failure there must not end a predict
        print(f"clipsam: warning: W&B run not started ({type(err).__name__}: {err}); the predictions are written anyway", file=sys.stderr)
        return None


def log_predict_summary(
    run: Any, rows: Sequence[Mapping[str, Any]], *, skipped: int, status: str, sample: int = 16, seed: int = 0
) -> None:
    """Counts, the label distribution (overall and per category) and a seeded sample of overlays.

    Args:
        run: the W&B run of the predict.
        rows: the rows of predictions.csv written so far.
        skipped: files not segmented.
        status: ``finished`` or why the run stopped.
        sample: overlays logged at most, spread over categories and labels.
        seed: draws the sample.
    """
    import wandb

    counts: dict[str, dict[str, int]] = {}
    for row in rows:
        per = counts.setdefault(str(row["category"]), {"anomalous": 0, "normal": 0})
        per["anomalous" if int(row["label"]) else "normal"] += 1
    anomalous = sum(c["anomalous"] for c in counts.values())
    table = wandb.Table(columns=["category", "images", "anomalous", "normal", "anomalous_fraction"])
    for category, c in sorted(counts.items()):
        total = c["anomalous"] + c["normal"]
        table.add_data(category, total, c["anomalous"], c["normal"], c["anomalous"] / total if total else None)
    scopes: dict[str, int] = {}
    for row in rows:
        scopes[str(row["threshold_scope"])] = scopes.get(str(row["threshold_scope"]), 0) + 1
    summary = {
        "predict/images": len(rows),
        "predict/anomalous": anomalous,
        "predict/normal": len(rows) - anomalous,
        "predict/skipped": skipped,
        "predict/status": status,
        **{f"predict/threshold_scope/{scope}": n for scope, n in scopes.items()},
    }
    payload: dict[str, Any] = {"predict/labels": table}
    by_group: dict[tuple[str, int], list[Mapping[str, Any]]] = {}
    for row in rows:
        by_group.setdefault((str(row["category"]), int(row["label"])), []).append(row)
    rng = random.Random(seed)
    groups = sorted(by_group)
    rng.shuffle(groups)
    for members in by_group.values():
        members.sort(key=lambda r: str(r["path"]))
        rng.shuffle(members)
    chosen: list[Mapping[str, Any]] = []
    while len(chosen) < sample and any(by_group.values()):
        for key in groups:  # round-robin over (category, label)
            if by_group[key] and len(chosen) < sample:
                chosen.append(by_group[key].pop())
    if chosen:
        overlays = wandb.Table(columns=["category", "label", "image_score", "threshold", "path", "overlay"])
        for row in chosen:
            label = "anomalous" if int(row["label"]) else "normal"
            overlays.add_data(row["category"], label, float(row["image_score"]), float(row["threshold"]), row["path"], wandb.Image(str(row["overlay"])))
        payload["predict/overlays"] = overlays
    run.log(payload)
    for key, value in summary.items():
        run.summary[key] = value
