"""Reporting at the end of ``clipsam test``: console table, JSON/CSV files, W&B.

Everything goes to the run directory (``trainer.log_dir``, a fresh ``version_N`` per run):

```
test_results.json     per-category and mean metrics, the CLIP-only baseline, timings, config,
                      "checkpoint": {"path", "sha256", "untrained_adapters"} of the adapters used,
                      and a "run" block (method, refiner, frame, metric protocol, data) that
                      `clipsam compare` reads
test_results.csv      one row per category (+ "mean"), the table printed on the console
thresholds.json       image- and pixel-level decision thresholds (model.evaluation.threshold_method),
                      per category and pooled; `predict` reads it via model.evaluation.thresholds
overlays/*.png   image | ground truth | CLIP map | final scores | final mask, per logged image
```

With a :class:`~lightning.pytorch.loggers.WandbLogger` (offline by default in the shipped configs)
the same numbers go to W&B: scalars with per-category keys (logged by the module), a
``metrics/per_category`` table, an ``examples`` table with the overlay panels, and a
``pr_curve/<category>`` line plot per category when the results carry PR-curve points.
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from clipsam.callbacks import heat_map, output_name
from clipsam.io import atomic_write, next_version_dir, rich_console
from clipsam.metric_names import COLUMN_TITLES, METRIC_COLUMNS

__all__ = ["format_table", "overlay_caption", "report_test_results", "write_metrics_files", "render_panel"]


def _fmt(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    if isinstance(value, float):
        return f"{100.0 * value:.1f}"
    return str(value)


def _columns(results: dict[str, Any]) -> list[str]:
    present: set[str] = set(results.get("mean", {}))
    for values in results.get("per_category", {}).values():
        present.update(values)
    return [c for c in METRIC_COLUMNS if c in present]


def _metric_rows(
    results: dict[str, Any], baseline: dict[str, Any] | None, *, baseline_label: str
) -> tuple[list[str], list[list[Any]]]:
    """Metric keys and raw rows ``[name, num_images, *values]``: categories, "mean", baseline.

    The one source of the console table, the CSV file and the W&B table.
    """
    columns = _columns(results)
    rows: list[list[Any]] = [
        [category, values.get("num_images"), *(values.get(c) for c in columns)]
        for category, values in results.get("per_category", {}).items()
    ]
    rows.append(["mean", results.get("num_images"), *(results["mean"].get(c) for c in columns)])
    if baseline is not None:
        rows.append([baseline_label, None, *(baseline["mean"].get(c) for c in columns)])
    return columns, rows


def table_rows(results: dict[str, Any], baseline: dict[str, Any] | None = None) -> tuple[list[str], list[list[str]]]:
    """Header and rows (strings, metrics in percent) of the per-category table."""
    columns, rows = _metric_rows(results, baseline, baseline_label="CLIP only")
    header = ["category", "images", *(COLUMN_TITLES[c] for c in columns)]
    return header, [[name, "" if n is None else str(n), *(_fmt(v) for v in values)] for name, n, *values in rows]


def format_table(results: dict[str, Any], baseline: dict[str, Any] | None = None, *, title: str = "clipsam test") -> Any:
    """A :class:`rich.table.Table` of the per-category metrics (percent)."""
    from rich.table import Table

    header, rows = table_rows(results, baseline)
    table = Table(title=title, caption="pixel (P-) and image (I-) metrics in percent; n/a: undefined (one class only)")
    for i, name in enumerate(header):
        table.add_column(name, justify="left" if i == 0 else "right")
    for row in rows:
        table.add_row(*row, end_section=row[0] in ("mean",) and baseline is not None)
    return table


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, torch.Tensor):
        return _jsonable(value.tolist())
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    if isinstance(value, float) and math.isnan(value):
        return None
    return value


def write_metrics_files(
    run_dir: Path, payload: dict[str, Any], results: dict[str, Any], baseline: dict[str, Any] | None, *, stem: str = "test_results"
) -> dict[str, Path]:
    """Write ``<stem>.json`` and ``<stem>.csv`` atomically into ``run_dir``."""
    run_dir.mkdir(parents=True, exist_ok=True)
    json_path, csv_path = run_dir / f"{stem}.json", run_dir / f"{stem}.csv"
    with atomic_write(json_path) as tmp:
        tmp.write_text(json.dumps(_jsonable(payload), indent=2, sort_keys=False))
    columns, rows = _metric_rows(results, baseline, baseline_label="mean_clip_only")
    with atomic_write(csv_path) as tmp:
        with tmp.open("w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["category", "num_images", *columns])
            writer.writerows(_jsonable(rows))  # NaN (undefined) -> empty cell
    return {"json": json_path, "csv": csv_path}


def overlay_caption(overlay: dict[str, Any], thresholds: dict[str, Any] | None = None) -> str:
    """``file | category | score S | threshold T | label`` for a panel (threshold: the
    category's image threshold from ``thresholds``, when known)."""
    from clipsam.thresholds import lookup

    parts = [Path(overlay["path"]).name, overlay["category"]]
    if "image_score" in overlay:
        parts.append(f"score {overlay['image_score']:.3f}")
        if thresholds:
            threshold, _ = lookup(thresholds, "image", overlay["category"], float("nan"))
            if threshold == threshold:  # not NaN
                parts.append(f"threshold {threshold:.3f}")
                parts.append("anomalous" if overlay["image_score"] >= threshold else "normal")
    if "anomalous" in overlay:
        parts.append(f"truth: {'anomalous' if overlay['anomalous'] else 'normal'}")
    return " | ".join(parts)


def _caption_strip(text: str, width: int) -> np.ndarray:
    """A black (h, width, 3) strip with ``text`` in white, scaled to fit."""
    import cv2

    height = max(14, width // 40)
    strip = np.zeros((height, width, 3), dtype=np.uint8)
    scale = height / 30.0
    (text_w, _), _ = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, scale, 1)
    if text_w > width - 4:
        scale *= (width - 4) / text_w
    cv2.putText(strip, text, (2, int(height * 0.75)), cv2.FONT_HERSHEY_SIMPLEX, scale, (255, 255, 255), 1, cv2.LINE_AA)
    return strip


def render_panel(overlay: dict[str, Any], caption: str | None = None) -> np.ndarray:
    """One row: image | ground truth | CLIP map | final scores | final mask, (H, 5W, 3) uint8,
    with ``caption`` in a strip above it when given."""
    image = overlay["image"].permute(1, 2, 0).numpy().astype(np.uint8)
    gt = np.repeat(overlay["gt"].numpy().astype(np.uint8)[..., None] * 255, 3, axis=2)
    clip_map = heat_map(overlay["clip_map"].float().numpy())
    scores = heat_map(overlay["scores"].float().numpy())
    mask = np.repeat(overlay["mask"].numpy().astype(np.uint8)[..., None] * 255, 3, axis=2)
    panel = np.concatenate([image, gt, clip_map, scores, mask], axis=1)
    if caption:
        panel = np.concatenate([_caption_strip(caption, panel.shape[1]), panel], axis=0)
    return panel


def _wandb_logger(trainer: Any) -> Any:
    from lightning.pytorch.loggers import WandbLogger

    for logger in getattr(trainer, "loggers", []):
        if isinstance(logger, WandbLogger):
            return logger
    return None


def report_test_results(
    *,
    trainer: Any,
    results: dict[str, Any],
    baseline: dict[str, Any] | None,
    overlays: list[dict[str, Any]],
    timings: dict[str, float],
    config: dict[str, Any],
    stage: str = "test",
    run_dir: str | Path | None = None,
    run_info: dict[str, Any] | None = None,
    thresholds: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Print the table and write every report of a test (or validate) run (rank 0 only).

    Files are named after ``stage``: ``test_results.json`` / ``validate_results.json``.
    ``run_info`` (method, refiner, frame, metric protocol, data; see
    :meth:`clipsam.module.ClipSamModule.run_info`) is stored as the payload's ``"run"`` block.

    With ``thresholds`` (:func:`clipsam.thresholds.compute_thresholds` output) they go into the
    JSON under ``"thresholds"`` and into ``thresholds.json`` beside it.

    Returns:
        dict of the written paths ("json", "csv", "overlays", "thresholds" when given, and
        "wandb" when a W&B run exists).
    """
    # Under DDP the caller passes run_dir, asked for on every rank: trainer.log_dir broadcasts,
    # so calling it here (rank 0 only) would hang or crash.
    run_dir = Path(run_dir if run_dir is not None else (trainer.log_dir or trainer.default_root_dir))
    num_images = int(results.get("num_images", 0)) or 1
    # Which adapters produced these numbers: path + sha256 of the checkpoint (set by the CLI), or
    # "untrained_adapters": true for --allow_untrained runs.
    module = getattr(trainer, "lightning_module", None)
    checkpoint = getattr(module, "checkpoint_record", None)
    payload = {
        "checkpoint": checkpoint,
        "results": results,
        "clip_only": baseline,
        "timings_seconds_per_image": {k: v / num_images for k, v in timings.items()},
        "thresholds": thresholds,
        "config": config,
    }
    if run_info is not None:
        payload["run"] = run_info
    if (run_dir / f"{stage}_results.json").exists():
        # A directory shared between runs (no versioned logger, e.g. fast_dev_run or
        # trainer.logger=false): never overwrite an earlier report, use a fresh sub-directory.
        run_dir = next_version_dir(run_dir / f"{stage}_reports")
    paths: dict[str, Any] = write_metrics_files(run_dir, payload, results, baseline, stem=f"{stage}_results")
    if thresholds is not None:
        from clipsam.thresholds import THRESHOLDS_FILE, save_thresholds

        paths["thresholds"] = save_thresholds(run_dir / THRESHOLDS_FILE, _jsonable(thresholds))

    overlay_dir = run_dir / "overlays"
    panels = []
    for i, overlay in enumerate(overlays):
        overlay["caption"] = overlay_caption(overlay, thresholds)
        panel = render_panel(overlay, overlay["caption"])
        overlay_dir.mkdir(parents=True, exist_ok=True)
        # Shortened (with a hash) when an image name is near the 255-byte limit.
        stem = f"{i:03d}_{overlay['category']}_{Path(overlay['path']).stem}"
        path = overlay_dir / f"{output_name(stem)}.png"
        with atomic_write(path) as tmp:
            Image.fromarray(panel).save(tmp, format="PNG")
        panels.append((overlay, panel))
    paths["overlays"] = overlay_dir

    console = rich_console()
    console.print(format_table(results, baseline, title=f"clipsam {stage}"))
    if checkpoint and checkpoint.get("untrained_adapters"):
        console.print("[bold red]UNTRAINED adapters (--allow_untrained): these numbers say nothing about the method[/]")
    elif checkpoint and checkpoint.get("path"):
        digest = checkpoint.get("sha256") or ""
        console.print(f"checkpoint: {checkpoint['path']}" + (f"  (sha256 {digest[:12]}...)" if digest else ""))
    console.print(f"metrics: {paths['json']}  {paths['csv']}")
    if "thresholds" in paths:
        console.print(f"thresholds: {paths['thresholds']}  (use with --model.evaluation.thresholds=...)")
    if panels:
        console.print(f"overlays: {overlay_dir}  (image | ground truth | CLIP map | final scores | final mask)")

    wandb_logger = _wandb_logger(trainer)
    if wandb_logger is not None:
        paths["wandb"] = _log_to_wandb(wandb_logger, results, baseline, panels)
        console.print(f"W&B run: {paths['wandb']}")
    return paths


def _log_to_wandb(logger: Any, results: dict[str, Any], baseline: dict[str, Any] | None, panels: list[tuple[dict[str, Any], np.ndarray]]) -> str:
    import wandb

    run = logger.experiment
    columns, rows = _metric_rows(results, None, baseline_label="")
    table = wandb.Table(columns=["category", "num_images", *columns], data=_jsonable(rows))
    payload: dict[str, Any] = {"metrics/per_category": table}
    if panels:
        examples = wandb.Table(columns=["category", "path", "panel (image | gt | CLIP map | scores | mask)"])
        for overlay, panel in panels:
            examples.add_data(overlay["category"], overlay["path"], wandb.Image(panel))
        payload["examples"] = examples
        payload["overlays"] = [
            wandb.Image(panel, caption=o.get("caption") or f"{o['category']}: {Path(o['path']).name}") for o, panel in panels
        ]
    for category, values in results.get("per_category", {}).items():
        curve = values.get("pixel_pr_curve")
        if curve:
            recall, precision = curve["recall"], curve["precision"]
            data = [[r, p] for r, p in zip(recall, precision)]
            pr_table = wandb.Table(data=data, columns=["recall", "precision"])
            payload[f"pr_curve/{category}"] = wandb.plot.line(pr_table, "recall", "precision", title=f"PR curve: {category}")
    run.log(payload)
    return str(getattr(run, "dir", "") or logger.save_dir)
