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
overlays/*.png   image | ground truth | CLIP map | final scores | final mask, per example, under a
                 header (file path below the dataset root, category, score, threshold, decision,
                 truth, which example it is) and a colour bar; wrapped, never cut
```

Examples are drawn per category (:meth:`clipsam.evaluation.Evaluator` keeps, per category, the
anomalous images with the highest and the lowest score and the normal images with the highest
and the lowest; :func:`clipsam.wandb_logging.pick_examples` spreads ``num_overlays`` of them
over the categories, seeded by ``examples_seed``).

The console table is printed before any file is written: when the disk is full the numbers are
still on the console (with the full metrics as JSON) and the error names the file.

With a :class:`~lightning.pytorch.loggers.WandbLogger` (offline by default in the shipped configs)
the same numbers go to W&B: scalars with per-category keys (logged by the module), a
``metrics/per_category`` table, an ``examples`` table with the overlay panels (category, kind,
truth, score, threshold, decision), the decision ``thresholds`` (a table, ``thresholds/...``
scalars and ``decision`` in the config: rule, method, target FPR, scores), and a
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

from clipsam.callbacks import (
    colour_bar,
    heat_map,
    output_name,
    report_console,
    text_block,
    text_scale,
    wrap_text,
)
from clipsam.errors import ClipSamError
from clipsam.io import atomic_write, next_version_dir
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


#: What each kind of example shows (captions, the W&B examples table).
EXAMPLE_KINDS = {
    "anomalous_best": "anomalous, highest score",
    "anomalous_worst": "anomalous, lowest score",
    "normal_worst": "normal, highest score",
    "normal_best": "normal, lowest score",
}


def display_path(path: str | Path, root: str | Path | None = None) -> str:
    """``path`` below ``root`` (the dataset root), else its last three parts: enough to find the
    file (``capsule/test/crack/000.png``, never a bare ``000.png``)."""
    file = Path(path)
    if root:
        try:
            return file.resolve().relative_to(Path(root).expanduser().resolve()).as_posix()
        except (ValueError, OSError):
            pass
    return Path(*file.parts[-3:]).as_posix() if len(file.parts) > 1 else file.name


def overlay_caption(overlay: dict[str, Any], thresholds: dict[str, Any] | None = None) -> str:
    """``file | category | score S | threshold T | label | truth: ... | kind`` for a panel
    (threshold: the category's image threshold from ``thresholds``, when known). The file is the
    overlay's ``relative_path`` (below the dataset root) when it has one, else the file name."""
    from clipsam.thresholds import lookup

    parts = [overlay.get("relative_path") or Path(overlay["path"]).name, overlay["category"]]
    if "image_score" in overlay:
        parts.append(f"score {overlay['image_score']:.3f}")
        if thresholds:
            threshold, _ = lookup(thresholds, "image", overlay["category"], float("nan"))
            if threshold == threshold:  # not NaN
                parts.append(f"threshold {threshold:.3f}")
                parts.append("anomalous" if overlay["image_score"] >= threshold else "normal")
    if "anomalous" in overlay:
        parts.append(f"truth: {'anomalous' if overlay['anomalous'] else 'normal'}")
    if overlay.get("kind") in EXAMPLE_KINDS:
        parts.append(f"example: {EXAMPLE_KINDS[overlay['kind']]}")
    return " | ".join(parts)


#: Titles of the panel columns, in order.
PANEL_TITLES = ("image", "ground truth", "CLIP map", "final scores", "final mask")


def _column_titles(width: int, columns: int, scale: float) -> np.ndarray:
    """One strip with each column's title centred (wrapped inside its column, never cut)."""
    import cv2

    thickness = 1 if scale < 0.9 else 2
    (_, text_h), baseline = cv2.getTextSize("Ag", cv2.FONT_HERSHEY_SIMPLEX, scale, thickness)
    step = text_h + baseline + 2
    column = width // columns
    wrapped = [wrap_text(title, column - 4, scale=scale, thickness=thickness) for title in PANEL_TITLES[:columns]]
    strip = np.zeros((4 + step * max(len(w) for w in wrapped), width, 3), dtype=np.uint8)
    for c, lines in enumerate(wrapped):
        for i, line in enumerate(lines):
            line_w = cv2.getTextSize(line, cv2.FONT_HERSHEY_SIMPLEX, scale, thickness)[0][0]
            x = c * column + max(2, (column - line_w) // 2)
            cv2.putText(strip, line, (x, 2 + i * step + text_h), cv2.FONT_HERSHEY_SIMPLEX, scale, (220, 220, 220), thickness, cv2.LINE_AA)
    return strip


def render_panel(overlay: dict[str, Any], caption: str | None = None) -> np.ndarray:
    """One row: image | ground truth | CLIP map | final scores | final mask, (H, 5W, 3) uint8.

    With ``caption``: above the row, the caption (wrapped to the panel's width, never cut; the
    decision in red or green), the column titles and the colour bar of the two maps.
    """
    image = overlay["image"].permute(1, 2, 0).numpy().astype(np.uint8)
    gt = np.repeat(overlay["gt"].numpy().astype(np.uint8)[..., None] * 255, 3, axis=2)
    clip_map = heat_map(overlay["clip_map"].float().numpy())
    scores = heat_map(overlay["scores"].float().numpy())
    mask = np.repeat(overlay["mask"].numpy().astype(np.uint8)[..., None] * 255, 3, axis=2)
    panel = np.concatenate([image, gt, clip_map, scores, mask], axis=1)
    if caption:
        width = panel.shape[1]
        scale, _ = text_scale(width)
        anomalous = overlay.get("anomalous")
        colour = (255, 255, 255) if anomalous is None else ((235, 64, 52) if anomalous else (80, 200, 120))
        header = [
            text_block([(caption, colour)], width, scale=scale),
            _column_titles(width, 5, scale),
            colour_bar(width, label="CLIP map and scores", scale=scale),
        ]
        panel = np.concatenate([*header, panel], axis=0)
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
    # The numbers reach the console first: a full disk below must not lose them. The console
    # prints after the progress bar has finished (clipsam.callbacks.ConsoleReport).
    console = report_console(trainer)
    console.print(format_table(results, baseline, title=f"clipsam {stage}"))
    if checkpoint and checkpoint.get("untrained_adapters"):
        console.print("[bold red]UNTRAINED adapters (--allow_untrained): these numbers say nothing about the method[/]")
    elif checkpoint and checkpoint.get("path"):
        digest = checkpoint.get("sha256") or ""
        console.print(f"checkpoint: {checkpoint['path']}" + (f"  (sha256 {digest[:12]}...)" if digest else ""), highlight=False)
    try:
        paths, panels = _write_reports(run_dir, payload, results, baseline, overlays, thresholds, stage)
    except OSError as err:
        from clipsam.runs import disk_error_message

        message = disk_error_message(err)
        if message is None:
            raise
        console.print(
            f"clipsam: the {stage} metrics above could not be saved ({err.strerror or err} while writing "
            f"{err.filename}); in full:",
            highlight=False,
        )
        console.print(json.dumps(_jsonable(_metrics_record(results, baseline, thresholds))), markup=False, highlight=False)
        raise ClipSamError(
            f"{message}. The {stage} metrics were computed: they are printed above (a table and JSON) and kept "
            "in memory (trainer.lightning_module.evaluator.report); rerun the test to save them"
        ) from err
    console.print(f"metrics: {paths['json']}  {paths['csv']}", highlight=False)
    if "thresholds" in paths:
        console.print(f"thresholds: {paths['thresholds']}  (use with --model.evaluation.thresholds=...)", highlight=False)
    if panels:
        console.print(f"overlays: {paths['overlays']}  (image | ground truth | CLIP map | final scores | final mask)", highlight=False)

    wandb_logger = _wandb_logger(trainer)
    if wandb_logger is not None:
        paths["wandb"] = _log_to_wandb(wandb_logger, results, baseline, panels, thresholds)
        console.print(f"W&B run: {paths['wandb']}", highlight=False)
    return paths


def _metrics_record(results: dict[str, Any], baseline: dict[str, Any] | None, thresholds: dict[str, Any] | None) -> dict[str, Any]:
    """The numbers of a test run without the curves: what the console shows when the files cannot be written."""
    scalars = (float, int, type(None))
    record: dict[str, Any] = {
        "mean": results.get("mean"),
        "per_category": {
            c: {k: v for k, v in values.items() if isinstance(v, scalars)} for c, values in results.get("per_category", {}).items()
        },
        "num_images": results.get("num_images"),
    }
    if baseline is not None:
        record["clip_only"] = baseline.get("mean")
    if thresholds is not None:
        record["thresholds"] = {
            level: {
                "global": (thresholds.get(level) or {}).get("global"),
                "per_category": {c: (v or {}).get("threshold") for c, v in ((thresholds.get(level) or {}).get("per_category") or {}).items()},
            }
            for level in ("image", "pixel")
        }
    return record


def _write_reports(
    run_dir: Path,
    payload: dict[str, Any],
    results: dict[str, Any],
    baseline: dict[str, Any] | None,
    overlays: list[dict[str, Any]],
    thresholds: dict[str, Any] | None,
    stage: str,
) -> tuple[dict[str, Any], list[tuple[dict[str, Any], np.ndarray]]]:
    """The report files: ``<stage>_results.json/.csv``, ``thresholds.json``, ``overlays/*.png``."""
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
    return paths, panels


def _threshold_rows(thresholds: dict[str, Any]) -> list[list[Any]]:
    """``[level, scope, threshold, f1, precision, recall, fpr]`` per threshold (global first)."""
    rows = []
    for level in ("image", "pixel"):
        entry = thresholds.get(level) or {}
        scoped = [("global", entry.get("global"))] + sorted((entry.get("per_category") or {}).items())
        for scope, value in scoped:
            if isinstance(value, dict) and value.get("threshold") is not None:
                rows.append([level, scope, *(value.get(k) for k in ("threshold", "f1", "precision", "recall", "fpr"))])
    return rows


def _log_to_wandb(
    logger: Any,
    results: dict[str, Any],
    baseline: dict[str, Any] | None,
    panels: list[tuple[dict[str, Any], np.ndarray]],
    thresholds: dict[str, Any] | None = None,
) -> str:
    import wandb

    from clipsam.thresholds import lookup

    run = logger.experiment
    columns, rows = _metric_rows(results, None, baseline_label="")
    table = wandb.Table(columns=["category", "num_images", *columns], data=_jsonable(rows))
    payload: dict[str, Any] = {"metrics/per_category": table}
    if thresholds:
        # The decision: what predict and Segmenter will use with this thresholds.json.
        run.config.update(
            {"decision": _jsonable({k: thresholds.get(k) for k in ("rule", "method", "target_fpr", "scores")})},
            allow_val_change=True,
        )
        threshold_rows = _threshold_rows(thresholds)
        payload["thresholds"] = wandb.Table(
            columns=["level", "scope", "threshold", "f1", "precision", "recall", "fpr"], data=_jsonable(threshold_rows)
        )
        for level, scope, value, *_ in threshold_rows:
            payload[f"thresholds/{level}/{scope}"] = float(value)
    if panels:
        examples = wandb.Table(
            columns=["category", "kind", "truth", "image_score", "threshold", "decision", "path", "panel (image | gt | CLIP map | scores | mask)"]
        )
        for overlay, panel in panels:
            threshold = lookup(thresholds, "image", overlay["category"], float("nan"))[0] if thresholds else float("nan")
            score = overlay.get("image_score")
            known = not math.isnan(threshold)
            decision = ("anomalous" if score >= threshold else "normal") if score is not None and known else None
            examples.add_data(
                overlay["category"],
                EXAMPLE_KINDS.get(overlay.get("kind", ""), overlay.get("kind")),
                "anomalous" if overlay.get("anomalous") else "normal",
                score,
                threshold if known else None,
                decision,
                overlay.get("relative_path") or overlay["path"],
                wandb.Image(panel),
            )
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
