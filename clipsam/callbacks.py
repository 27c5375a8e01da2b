"""Lightning callbacks and plugins: writing predictions, writing checkpoints atomically.

:class:`PredictionWriter` turns ``ClipSamModule.predict_step`` outputs into files:

```
<predict_dir>/version_N/
  masks/<name>.png      final mask at the image's original size, 0 or 255
  overlays/<name>.png   a header (ANOMALOUS/normal, score vs threshold, category, the path below
                        the predict folder), the image with heat only where the pixel score
                        reaches the pixel threshold and the mask outlined, a colour bar and legend
  predictions.csv       one row per image, written as the run goes: absolute paths, category,
                        object name, image score, threshold, label, mask and overlay files
  skipped.txt           input files not segmented, one per line: path <TAB> why (not an image
                        file, undecodable, too large)
  config.yaml           the resolved config of the command
  run.json              the checkpoint used (path, sha256) and the input folder
  INCOMPLETE            only while the run is going or when it did not end normally
```

Each run writes a fresh ``version_N`` directory, so earlier results are never overwritten. Output
names come from the input path below the predict folder; a name longer than the file system
allows (255 bytes with ``.png``) is shortened and made unique with a hash of the full name, and
``predictions.csv`` maps every input path to its files. The output root holds a
``.clipsam-output`` marker, so an output folder placed inside the input folder is never read back
as input (:func:`clipsam.data.folder.list_images` skips it). Ctrl+C, SIGTERM (after the batch in
hand) or an error leave ``predictions.csv`` with the images done so far and an ``INCOMPLETE`` file
saying why. With a ``WandbLogger`` in the config the writer also logs counts, the label
distribution and a sample of overlays to a W&B run in the folder (:mod:`clipsam.wandb_logging`).
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.callbacks import BasePredictionWriter
from lightning.pytorch.plugins.io import TorchCheckpointIO
from PIL import Image

from clipsam.data.samples import read_image
from clipsam.io import (
    atomic_torch_save,
    atomic_write,
    next_version_dir,
    safe_torch_load,
)

__all__ = [
    "OUTPUT_MARKER",
    "AtomicCheckpointIO",
    "ConsoleReport",
    "PredictionWriter",
    "annotated_overlay",
    "colour_bar",
    "heat_map",
    "output_name",
    "prediction_mask_source",
    "render_overlay",
    "report_console",
    "text_block",
    "wrap_text",
    "write_prediction",
]

OUTPUT_MARKER = ".clipsam-output"
"""File in the root of clipsam's predict outputs; folders holding it are never read as input."""

#: Longest output file stem in bytes: 255 (NAME_MAX) minus ".png" minus a margin for suffixes.
MAX_STEM_BYTES = 240


def output_name(name: str, *, max_bytes: int = MAX_STEM_BYTES) -> str:
    """``name`` if it fits in ``max_bytes`` (UTF-8), else its head + "~" + 16 hex of its sha256."""
    raw = name.encode("utf-8")
    if len(raw) <= max_bytes:
        return name
    digest = hashlib.sha256(raw).hexdigest()[:16]
    head = raw[: max_bytes - len(digest) - 1].decode("utf-8", errors="ignore")
    return f"{head}~{digest}"


log = logging.getLogger(__name__)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Checkpoints written to a temp file in the target directory, then renamed over the target.

    Lightning's default writer stages the file in ``$TMPDIR`` and moves it into place, which is
    only a rename when ``$TMPDIR`` and the run directory share a file system; otherwise an
    interrupted copy can leave a truncated ``last.ckpt`` that a later ``--ckpt_path`` run loads.
    Here the temp file always sits next to the target, so the final step is always an atomic
    ``os.replace``. Remote paths (``s3://``...) fall back to Lightning's writer. The ``clipsam``
    CLI installs this plugin by default (``trainer.plugins``).
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        if storage_options is not None or "://" in str(path):
            super().save_checkpoint(checkpoint, path, storage_options=storage_options)
            return
        atomic_torch_save(checkpoint, path)

    def load_checkpoint(self, path: Any, map_location: Any | None = None, weights_only: bool | None = None) -> dict[str, Any]:
        """Load with ``weights_only=True`` always (whatever the caller or the environment asks).

        Raises:
            WeightsError: the file is missing, truncated, or holds more than tensors and plain data.
        """
        if "://" in str(path):
            return super().load_checkpoint(path, map_location=map_location, weights_only=True)
        return safe_torch_load(path, what="checkpoint", map_location=map_location or "cpu")


def heat_map(scores: np.ndarray) -> np.ndarray:
    """JET colour map of scores: (H, W) float in [0, 1] -> (H, W, 3) uint8 RGB."""
    heat = cv2.applyColorMap(np.clip(scores * 255.0, 0, 255).astype(np.uint8), cv2.COLORMAP_JET)
    return cv2.cvtColor(heat, cv2.COLOR_BGR2RGB)


# ----------------------------------------------------------------------------- text on images
_FONT = cv2.FONT_HERSHEY_SIMPLEX
#: Overlays narrower than this many pixels are enlarged by a whole factor (nearest neighbour),
#: so their header and legend stay legible.
MIN_OVERLAY_WIDTH = 480
ANOMALOUS_RGB = (235, 64, 52)
NORMAL_RGB = (80, 200, 120)


def text_scale(width: int) -> tuple[float, int]:
    """Font scale and stroke thickness for text on an image ``width`` pixels wide (never below a
    legible 0.45, about 10 px per character)."""
    scale = float(min(1.6, max(0.45, width / 1100.0)))
    return scale, 1 if scale < 0.9 else 2


def _text_width(text: str, scale: float, thickness: int) -> int:
    return int(cv2.getTextSize(text, _FONT, scale, thickness)[0][0])


def wrap_text(text: str, width: int, *, scale: float, thickness: int = 1) -> list[str]:
    """Lines of ``text`` that each fit in ``width`` pixels at this font size.

    Breaks at spaces; a word wider than a line (a long path) is cut into pieces. Nothing is
    dropped: ``"".join`` of the pieces of every word gives the word back.
    """
    lines: list[str] = []
    current = ""
    for word in text.split(" "):
        candidate = f"{current} {word}" if current else word
        if _text_width(candidate, scale, thickness) <= width:
            current = candidate
            continue
        if current:
            lines.append(current)
        while word and _text_width(word, scale, thickness) > width:
            cut = 1
            while cut < len(word) and _text_width(word[: cut + 1], scale, thickness) <= width:
                cut += 1
            lines.append(word[:cut])
            word = word[cut:]
        current = word
    if current:
        lines.append(current)
    return lines or [""]


def text_block(
    lines: list[tuple[str, tuple[int, int, int]]], width: int, *, scale: float | None = None, background: int = 0
) -> np.ndarray:
    """A (h, width, 3) uint8 strip with each ``(text, rgb)`` wrapped to fit, one below the other."""
    if scale is None:
        scale, thickness = text_scale(width)
    else:
        thickness = 1 if scale < 0.9 else 2
    margin = max(3, int(6 * scale))
    (_, text_h), baseline = cv2.getTextSize("Ag", _FONT, scale, thickness)
    step = text_h + baseline + margin
    wrapped = [(part, colour) for text, colour in lines for part in wrap_text(text, width - 2 * margin, scale=scale, thickness=thickness)]
    strip = np.full((margin + step * len(wrapped), width, 3), background, dtype=np.uint8)
    for i, (part, colour) in enumerate(wrapped):
        y = margin + i * step + text_h
        cv2.putText(strip, part, (margin, y), _FONT, scale, tuple(int(c) for c in colour), thickness, cv2.LINE_AA)
    return strip


def colour_bar(width: int, *, floor: float | None = None, label: str = "pixel score", scale: float | None = None) -> np.ndarray:
    """A legend strip: the JET scale from 0 to 1 (greyed below ``floor``, where no heat is drawn),
    its ends and the floor labelled."""
    if scale is None:
        scale, thickness = text_scale(width)
    else:
        thickness = 1 if scale < 0.9 else 2
    margin = max(3, int(6 * scale))
    (_, text_h), baseline = cv2.getTextSize("0", _FONT, scale, thickness)
    bar_h = max(8, text_h)
    inner = max(2, width - 2 * margin)
    ramp = np.linspace(0.0, 1.0, inner, dtype=np.float32)
    bar = heat_map(np.repeat(ramp[None, :], bar_h, axis=0))
    if floor is not None and floor > 0:
        below = ramp < floor
        bar[:, below] = (bar[:, below].astype(np.float32) * 0.25 + 60).astype(np.uint8)
    strip = np.zeros((margin + bar_h + margin + text_h + baseline + margin, width, 3), dtype=np.uint8)
    strip[margin : margin + bar_h, margin : margin + inner] = bar
    y_text = margin + bar_h + margin + text_h
    white = (255, 255, 255)
    cv2.putText(strip, "0", (margin, y_text), _FONT, scale, white, thickness, cv2.LINE_AA)
    one_w = _text_width("1", scale, thickness)
    cv2.putText(strip, "1", (width - margin - one_w, y_text), _FONT, scale, white, thickness, cv2.LINE_AA)
    middle = label if floor is None else f"{label} >= {floor:.2f}"
    if floor is not None:
        x = margin + round(min(max(floor, 0.0), 1.0) * (inner - 1))
        cv2.line(strip, (x, margin - 2 if margin > 2 else 0), (x, margin + bar_h + 1), white, max(1, thickness))
    mid_w = _text_width(middle, scale, thickness)
    lo, hi = margin + _text_width("0 ", scale, thickness), width - margin - one_w - _text_width(" ", scale, thickness)
    if mid_w <= hi - lo:
        x = (lo + hi - mid_w) // 2
        if floor is not None:  # under the floor tick when there is room
            tick = margin + round(min(max(floor, 0.0), 1.0) * (inner - 1))
            x = int(min(max(tick - mid_w // 2, lo), hi - mid_w))
        cv2.putText(strip, middle, (x, y_text), _FONT, scale, white, thickness, cv2.LINE_AA)
    return strip


def render_overlay(
    image: np.ndarray, scores: np.ndarray, mask: np.ndarray, *, alpha: float = 0.45, floor: float | None = None
) -> np.ndarray:
    """Blend a heat map of ``scores`` into ``image`` where the score reaches ``floor``, and outline ``mask``.

    Args:
        image: (H, W, 3) uint8 RGB.
        scores: (H, W) float in [0, 1], same size as ``image``.
        mask: (H, W) bool, same size as ``image``.
        alpha: weight of the heat map.
        floor: pixels scoring below it keep the photo's own colours (the pixel threshold: only
            what may be anomalous is tinted); None tints every pixel.

    Returns:
        (H, W, 3) uint8 RGB: the photo, heat above the floor, the mask's contour in white with a
        dark edge (visible on light and dark parts).
    """
    heat = cv2.addWeighted(image, 1.0 - alpha, heat_map(scores), alpha, 0.0)
    if floor is None:
        blended = heat
    else:
        blended = np.where((scores >= floor)[..., None], heat, image).astype(np.uint8)
    contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    thickness = max(1, round(max(image.shape[:2]) / 256))
    cv2.drawContours(blended, contours, -1, (0, 0, 0), thickness + 2)
    cv2.drawContours(blended, contours, -1, (255, 255, 255), thickness)
    return blended


def annotated_overlay(
    image: np.ndarray,
    scores: np.ndarray,
    mask: np.ndarray,
    *,
    name: str,
    category: str,
    image_score: float,
    image_threshold: float,
    pixel_threshold: float,
    label: bool,
    threshold_scope: str = "",
) -> np.ndarray:
    """The predict overlay a person reads at a glance (``overlays/<name>.png``).

    A header with the decision (ANOMALOUS / normal, in red / green), the image score against its
    threshold, where the thresholds come from, the category and the file's path below the
    predict folder; the photo with heat only where the pixel score reaches the pixel threshold
    and the mask's outline; a colour bar saying what the colours mean. Text is wrapped, never
    cut. Images narrower than :data:`MIN_OVERLAY_WIDTH` are enlarged by a whole factor.
    """
    canvas = render_overlay(image, scores, mask, floor=float(pixel_threshold))
    factor = max(1, -(-MIN_OVERLAY_WIDTH // max(1, canvas.shape[1])))
    if factor > 1:
        canvas = cv2.resize(canvas, None, fx=factor, fy=factor, interpolation=cv2.INTER_NEAREST)
    width = canvas.shape[1]
    decision = "ANOMALOUS" if label else "normal"
    relation = ">=" if label else "<"
    scope = {"default": " (default threshold, not calibrated)", "global": " (global threshold)"}.get(threshold_scope, "")
    header = text_block(
        [
            (f"{decision}  score {image_score:.3f} {relation} threshold {image_threshold:.3f}{scope}", ANOMALOUS_RGB if label else NORMAL_RGB),
            (f"{category} | {name}", (255, 255, 255)),
        ],
        width,
    )
    pixels = int(np.count_nonzero(mask))
    legend = text_block([(f"heat: pixel score >= pixel threshold {pixel_threshold:.2f}; white outline: mask ({pixels} px)", (200, 200, 200))], width)
    return np.concatenate([header, canvas, colour_bar(width, floor=float(pixel_threshold)), legend], axis=0)


class ConsoleReport(Callback):
    """What a run prints at its end (the test table, predict's summary line), printed after the
    progress bar has finished (its ``teardown``), or when the run stops with an error.

    :func:`report_console` hands out this callback when the trainer has one (the CLI adds it),
    else a console that prints at once.
    """

    def __init__(self) -> None:
        self.pending: list[tuple[tuple[Any, ...], dict[str, Any]]] = []

    def print(self, *objects: Any, **kwargs: Any) -> None:
        self.pending.append((objects, kwargs))

    def flush(self) -> None:
        from clipsam.io import rich_console

        pending, self.pending = self.pending, []
        if pending:
            console = rich_console()
            for objects, kwargs in pending:
                console.print(*objects, **kwargs)

    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self.flush()

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        self.flush()


def report_console(trainer: Any) -> Any:
    """The trainer's :class:`ConsoleReport` (prints after the progress bar), else a Rich console."""
    from clipsam.io import rich_console

    for callback in getattr(trainer, "callbacks", None) or []:
        if isinstance(callback, ConsoleReport):
            return callback
    return rich_console()


def prediction_mask_source(pl_module: Any) -> str:
    """What the written masks are (``predictions.csv``'s ``mask_source``): ``model.evaluation.mask_source``
    ("sam" or "score"), always "score" without a refiner."""
    if getattr(pl_module, "refiner", None) is None:
        return "score"
    return str(getattr(getattr(pl_module, "eval_config", None), "mask_source", "sam"))


def write_prediction(
    run_dir: Path,
    prediction: dict[str, Any],
    i: int,
    *,
    name: str,
    display_name: str,
    mask_source: str,
    bit_depth: int | None = None,
    original: np.ndarray | None = None,
) -> dict[str, Any]:
    """Write ``masks/<name>.png`` and ``overlays/<name>.png`` of image ``i`` of a predict record
    (:func:`clipsam.pipeline.prediction_record`), each atomically, and return its
    ``predictions.csv`` row (:attr:`PredictionWriter.FIELDS`).

    The one writer of ``clipsam predict`` (:class:`PredictionWriter`) and ``clipsam predict
    --watch`` (:mod:`clipsam.watch`), so both write the same files for the same image.

    Args:
        run_dir: the predict folder (``masks/`` and ``overlays/`` are made when missing).
        prediction: the batch's record; ``i`` picks the image.
        name: output file stem (unique in the folder, see :func:`output_name`).
        display_name: the image's path below the input folder, shown in the overlay's header.
        mask_source: the ``mask_source`` column (:func:`prediction_mask_source`).
        bit_depth: ``data.bit_depth`` to read the original with (for the overlay).
        original: the decoded image (uint8 (H0, W0, 3) RGB in display orientation) when the
            caller has it; None reads the file.
    """
    from clipsam.postprocess import to_original_size

    path = prediction["path"][i]
    height, width = (int(v) for v in prediction["original_size"][i].tolist())
    if original is None:
        original = read_image(path, bit_depth=bit_depth)  # (H, W, 3) uint8, display orientation, data.bit_depth
    scores, mask = to_original_size(prediction["scores"][i], prediction["mask"][i], (height, width))
    mask_path = run_dir / "masks" / f"{name}.png"
    overlay_path = run_dir / "overlays" / f"{name}.png"
    overlay = annotated_overlay(
        original,
        scores,
        mask,
        name=display_name,
        category=str(prediction["category"][i]),
        image_score=float(prediction["image_scores"][i]),
        image_threshold=float(prediction["image_thresholds"][i]),
        pixel_threshold=float(prediction["pixel_thresholds"][i]),
        label=bool(prediction["labels"][i]),
        threshold_scope=str(prediction["threshold_scopes"][i]),
    )
    with atomic_write(mask_path) as tmp:
        Image.fromarray((mask * 255).astype(np.uint8)).save(tmp, format="PNG")
    with atomic_write(overlay_path) as tmp:
        Image.fromarray(overlay).save(tmp, format="PNG")
    return {
        "path": os.path.abspath(path),
        "category": prediction["category"][i],
        "object_name": prediction["object_names"][i],
        "image_score": float(prediction["image_scores"][i]),
        "threshold": prediction["image_thresholds"][i],
        "label": int(bool(prediction["labels"][i])),
        "pixel_threshold": prediction["pixel_thresholds"][i],
        "threshold_scope": prediction["threshold_scopes"][i],
        "mask_source": mask_source,
        "anomalous_pixels": int(mask.sum()),
        "mask": os.path.abspath(mask_path),
        "overlay": os.path.abspath(overlay_path),
    }


class PredictionWriter(BasePredictionWriter):
    """Write one mask PNG and one overlay PNG per predicted image.

    Args:
        output_dir: root folder; each predict run creates ``output_dir/version_N``.
    """

    #: Columns of predictions.csv. Paths are absolute. ``label`` is 1 when ``image_score >=
    #: threshold``; ``threshold_scope`` says where the thresholds came from (the category,
    #: "global" or "default" = uncalibrated); ``object_name`` is what the text prompts said.
    FIELDS = (
        "path",
        "category",
        "object_name",
        "image_score",
        "threshold",
        "label",
        "pixel_threshold",
        "threshold_scope",
        "mask_source",
        "anomalous_pixels",
        "mask",
        "overlay",
    )

    def __init__(self, output_dir: str) -> None:
        super().__init__(write_interval="batch")
        self.output_root = Path(output_dir).expanduser()
        self.run_dir: Path | None = None
        self._reserved_by: int | None = None
        self._used_names: set[str] = set()
        self._count = 0
        self._finished = True
        #: ``init_args`` of the config's WandbLogger (set by the CLI): predict then logs its
        #: counts, label distribution and a sample of overlays to a W&B run of its own.
        self.wandb_settings: dict[str, Any] | None = None
        #: the checkpoint's W&B record (``clipsam_wandb``): the predict run joins the fit's group.
        self.fit_wandb: dict[str, Any] | None = None
        self.summary: str | None = None

    def reserve_run_dir(self, trainer: Trainer) -> Path:
        """Create this predict run's ``version_N`` once (the config is saved into it too)."""
        if self.run_dir is None or self._reserved_by != id(trainer):
            self._reserved_by = id(trainer)
            run_dir = ""
            if trainer.is_global_zero:
                run_dir = str(next_version_dir(self.output_root))
                marker = self.output_root / OUTPUT_MARKER
                if not marker.exists():
                    marker.write_text("clipsam predict outputs: never read as input by clipsam\n")
                (Path(run_dir) / "INCOMPLETE").write_text("clipsam predict has not finished writing this folder\n")
            self.run_dir = Path(trainer.strategy.broadcast(run_dir))
        return self.run_dir

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage != "predict":
            return
        run_dir = self.reserve_run_dir(trainer)
        if trainer.is_global_zero:
            # Which adapters made these masks: checkpoint path + sha256 (set by the CLI).
            record = {
                "checkpoint": getattr(pl_module, "checkpoint_record", None),
                "predict_dir": str(getattr(getattr(trainer, "datamodule", None), "predict_dir", "") or ""),
            }
            with atomic_write(run_dir / "run.json") as tmp:
                tmp.write_text(json.dumps(record, indent=2))
        link = getattr(pl_module, "predict_wandb", None) or {}  # set by the CLI
        if link.get("settings") is not None:
            self.wandb_settings, self.fit_wandb = dict(link["settings"]), link.get("fit_run")
        (run_dir / "masks").mkdir(parents=True, exist_ok=True)
        (run_dir / "overlays").mkdir(parents=True, exist_ok=True)
        self._used_names = set()
        self._count = 0
        self._finished = False
        skipped = getattr(getattr(trainer, "datamodule", None), "skipped_files", None) or []
        if skipped and trainer.is_global_zero:
            reasons = getattr(trainer.datamodule, "skip_reasons", {}) or {}
            with atomic_write(run_dir / "skipped.txt") as tmp:
                tmp.write_text("".join(f"{p}\t{reasons.get(p, 'not an image file')}\n" for p in skipped))

    @staticmethod
    def _relative(path: str, trainer: Trainer) -> Path:
        """The image's path below the predict folder (a single file: its name)."""
        source = Path(path)
        root = getattr(getattr(trainer, "datamodule", None), "predict_dir", None)
        base = Path(os.path.expanduser(os.fspath(root))).resolve() if root else None
        try:
            relative = source.resolve().relative_to(base) if base is not None and base.is_dir() else Path(source.name)
        except ValueError:
            relative = Path(source.name)
        return relative if relative.stem else Path(source.name)  # never an empty (hidden) output name

    def _unique_name(self, path: str, trainer: Trainer) -> str:
        """File name for an input image: its path below the predict folder, '/' -> '__'.

        ``good/000.png`` and ``hole/000.png`` become ``good__000`` and ``hole__000``; names that
        still collide (or come from outside the folder) get a numeric suffix. A single image
        given as ``data.predict_dir`` (``photos/astronaut.png``) keeps its own name
        (``astronaut``).
        """
        relative = self._relative(path, trainer)
        # Unique across processes too: each image is predicted by one process only.
        name = output_name("__".join((*relative.parent.parts, relative.stem)))
        candidate, n = name, 1
        while candidate in self._used_names:
            n += 1
            candidate = output_name(f"{name}_{n}")
        self._used_names.add(candidate)
        return candidate

    def _csv_part(self, trainer: Trainer) -> Path:
        assert self.run_dir is not None
        if trainer.world_size == 1:
            return self.run_dir / "predictions.csv"
        return self.run_dir / f".predictions_rank{trainer.global_rank}.csv"

    def _append_rows(self, trainer: Trainer, rows: list[dict[str, Any]]) -> None:
        """Append rows to this process's CSV as the run goes (a crash keeps what was done)."""
        path = self._csv_part(trainer)
        new = not path.exists()
        try:
            with path.open("a", newline="") as handle:
                writer = csv.DictWriter(handle, fieldnames=self.FIELDS)
                if new:
                    writer.writeheader()
                writer.writerows(rows)
                handle.flush()
        except OSError as err:  # a full disk: say which file (a write names none)
            err.filename = err.filename or str(path)
            raise

    def on_predict_batch_start(
        self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        """SIGTERM (a service manager, a batch scheduler): stop before the next batch, with every
        finished image written and listed in predictions.csv (Lightning's own predict loop
        would note the signal and go on to the end)."""
        if getattr(trainer, "received_sigterm", False):
            from lightning.pytorch.utilities.exceptions import SIGTERMException

            raise SIGTERMException()

    def write_on_batch_end(
        self,
        trainer: Trainer,
        pl_module: LightningModule,
        prediction: dict[str, Any],
        batch_indices: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        assert self.run_dir is not None, "PredictionWriter.setup was not called for predict"
        skipped = prediction.get("skipped") or []
        if skipped:
            # Undecodable while predicting: listed in skipped.txt (this process's part under
            # DDP), the run goes on.
            name = "skipped.txt" if trainer.world_size == 1 else f"skipped_rank{trainer.global_rank}.txt"
            with (self.run_dir / name).open("a") as handle:
                handle.writelines(f"{path}\t{' '.join(str(reason).split())}\n" for path, reason in skipped)
            for path, reason in skipped:
                log.warning("skipped %s: %s", path, reason)
        mask_source = prediction_mask_source(pl_module)
        bit_depth = getattr(getattr(trainer, "datamodule", None), "bit_depth", None)
        rows = [
            write_prediction(
                self.run_dir,
                prediction,
                i,
                name=self._unique_name(path, trainer),
                display_name=self._relative(path, trainer).as_posix(),
                mask_source=mask_source,
                bit_depth=bit_depth,
            )
            for i, path in enumerate(prediction["path"])
        ]
        self._append_rows(trainer, rows)
        self._count += len(rows)

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        """Ctrl+C, SIGTERM or an error during predict: the CSV already holds what was done; say
        the folder is incomplete."""
        from lightning.pytorch.utilities.exceptions import SIGTERMException

        if self.run_dir is None or self._finished or not self.run_dir.is_dir():
            return
        if isinstance(exception, KeyboardInterrupt):
            reason = "interrupted (Ctrl+C)"
        elif isinstance(exception, SIGTERMException):
            reason = "stopped by SIGTERM"
        else:
            reason = f"failed: {type(exception).__name__}: {exception}"
        if trainer.is_global_zero and self.wandb_settings is not None and not isinstance(exception, OSError):
            self._log_to_wandb(trainer, pl_module, status=reason)
        try:
            part = self._csv_part(trainer)
            if not part.exists():
                self._append_rows(trainer, [])
            if trainer.is_global_zero:
                (self.run_dir / "INCOMPLETE").write_text(
                    f"clipsam predict {reason} after {self._count} image(s) (rank {trainer.global_rank}); "
                    f"{part.name} lists them. Run predict again for the whole folder.\n"
                )
        except OSError:
            pass  # a full or read-only disk: the INCOMPLETE file written at the start stays

    def on_predict_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Finish ``predictions.csv`` (under DDP: rank 0 merges the per-process parts, sorted)."""
        assert self.run_dir is not None
        final = self.run_dir / "predictions.csv"
        total = self._count
        if trainer.world_size > 1:
            part = self._csv_part(trainer)
            if not part.exists():
                self._append_rows(trainer, [])
            trainer.strategy.barrier("clipsam_predictions_written")
            total = 0
            if trainer.is_global_zero:
                rows: list[dict[str, Any]] = []
                for rank in range(trainer.world_size):
                    rank_part = self.run_dir / f".predictions_rank{rank}.csv"
                    with rank_part.open(newline="") as handle:
                        rows.extend(csv.DictReader(handle))
                rows.sort(key=lambda row: row["path"])
                with atomic_write(final) as tmp:
                    with tmp.open("w", newline="") as handle:
                        writer = csv.DictWriter(handle, fieldnames=self.FIELDS)
                        writer.writeheader()
                        writer.writerows(rows)
                for rank in range(trainer.world_size):
                    (self.run_dir / f".predictions_rank{rank}.csv").unlink()
                    part = self.run_dir / f"skipped_rank{rank}.txt"
                    if part.exists():  # files that failed during the run, per process
                        with (self.run_dir / "skipped.txt").open("a") as handle:
                            handle.write(part.read_text())
                        part.unlink()
                total = len(rows)
        elif not final.exists():
            self._append_rows(trainer, [])
        self._finished = True
        if trainer.is_global_zero:
            (self.run_dir / "INCOMPLETE").unlink(missing_ok=True)
            if self.wandb_settings is not None:
                self._log_to_wandb(trainer, pl_module, status="finished")
            # Printed after the progress bar has finished (ConsoleReport), not above it.
            self.summary = f"clipsam: wrote {total} masks and overlays to {self.run_dir}"
            report_console(trainer).print(self.summary, highlight=False)

    def _log_to_wandb(self, trainer: Trainer, pl_module: LightningModule, *, status: str) -> None:
        """Counts, label distribution and a sample of overlays, in a W&B run of the predict folder
        (a failure there is a warning: the predictions are written either way)."""
        try:
            self._wandb_run(trainer, pl_module, status=status)
        except Exception as err:  # noqa: BLE001 - W&B is a report, never the end of a predict
            log.warning("W&B logging of %s failed (%s: %s); the predictions are written", self.run_dir, type(err).__name__, err)

    def _wandb_run(self, trainer: Trainer, pl_module: LightningModule, *, status: str) -> None:
        from clipsam.wandb_logging import log_predict_summary, start_predict_run

        assert self.run_dir is not None
        final = self.run_dir / "predictions.csv"
        rows: list[dict[str, Any]] = []
        if final.exists():
            with final.open(newline="") as handle:
                rows = list(csv.DictReader(handle))
        run = start_predict_run(
            self.wandb_settings or {},
            run_dir=self.run_dir,
            model=pl_module,
            datamodule=getattr(trainer, "datamodule", None),
            fit_record=self.fit_wandb,
            checkpoint=getattr(pl_module, "checkpoint_record", None),
        )
        if run is None:
            return
        try:
            skipped = len(getattr(getattr(trainer, "datamodule", None), "skipped_files", None) or [])
            log_predict_summary(run, rows, skipped=skipped, status=status)
        finally:
            import wandb

            run.finish(exit_code=0 if status == "finished" else 1)
            # wandb's service process logs into the folder of the run that started it for as long
            # as it lives: stop it, so this predict folder is not written to after the command.
            wandb.teardown()
