"""Lightning callbacks and plugins: writing predictions, writing checkpoints atomically.

:class:`PredictionWriter` turns ``ClipSamModule.predict_step`` outputs into files:

```
<predict_dir>/version_N/
  masks/<name>.png      final mask at the image's original size, 0 or 255
  overlays/<name>.png   the image with the anomaly heat map blended in and the mask outlined
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
as input (:func:`clipsam.data.folder.list_images` skips it). Ctrl+C (or an error) leaves
``predictions.csv`` with the images done so far and an ``INCOMPLETE`` file saying why.
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
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import BasePredictionWriter
from lightning.pytorch.plugins.io import TorchCheckpointIO
from PIL import Image

from clipsam.data.samples import read_image
from clipsam.io import atomic_torch_save, atomic_write, next_version_dir, safe_torch_load

__all__ = ["OUTPUT_MARKER", "AtomicCheckpointIO", "PredictionWriter", "heat_map", "output_name", "render_overlay"]

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


def render_overlay(image: np.ndarray, scores: np.ndarray, mask: np.ndarray, *, alpha: float = 0.45) -> np.ndarray:
    """Blend a heat map of ``scores`` into ``image`` and outline ``mask``.

    Args:
        image: (H, W, 3) uint8 RGB.
        scores: (H, W) float in [0, 1], same size as ``image``.
        mask: (H, W) bool, same size as ``image``.
        alpha: weight of the heat map.

    Returns:
        (H, W, 3) uint8 RGB.
    """
    blended = cv2.addWeighted(image, 1.0 - alpha, heat_map(scores), alpha, 0.0)
    contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    thickness = max(1, round(max(image.shape[:2]) / 256))
    cv2.drawContours(blended, contours, -1, (255, 255, 255), thickness)
    return blended


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

    def _unique_name(self, path: str, trainer: Trainer) -> str:
        """File name for an input image: its path below the predict folder, '/' -> '__'.

        ``good/000.png`` and ``hole/000.png`` become ``good__000`` and ``hole__000``; names that
        still collide (or come from outside the folder) get a numeric suffix. A single image
        given as ``data.predict_dir`` (``photos/astronaut.png``) keeps its own name
        (``astronaut``).
        """
        source = Path(path)
        root = getattr(getattr(trainer, "datamodule", None), "predict_dir", None)
        base = Path(os.path.expanduser(os.fspath(root))).resolve() if root else None
        try:
            relative = source.resolve().relative_to(base) if base is not None and base.is_dir() else Path(source.name)
        except ValueError:
            relative = Path(source.name)
        if not relative.stem:  # never an empty (hidden) output name
            relative = Path(source.name)
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
        with path.open("a", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=self.FIELDS)
            if new:
                writer.writeheader()
            writer.writerows(rows)
            handle.flush()

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
        from clipsam.postprocess import to_original_size

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
        mask_source = getattr(getattr(pl_module, "eval_config", None), "mask_source", "sam")
        if getattr(pl_module, "refiner", None) is None:
            mask_source = "score"
        rows = []
        for i, path in enumerate(prediction["path"]):
            height, width = (int(v) for v in prediction["original_size"][i].tolist())
            original = read_image(path)  # (H, W, 3) uint8, display orientation, scaled by bit depth
            scores, mask = to_original_size(prediction["scores"][i], prediction["mask"][i], (height, width))
            name = self._unique_name(path, trainer)
            mask_path = self.run_dir / "masks" / f"{name}.png"
            overlay_path = self.run_dir / "overlays" / f"{name}.png"
            with atomic_write(mask_path) as tmp:
                Image.fromarray((mask * 255).astype(np.uint8)).save(tmp, format="PNG")
            with atomic_write(overlay_path) as tmp:
                Image.fromarray(render_overlay(original, scores, mask)).save(tmp, format="PNG")
            rows.append(
                {
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
            )
        self._append_rows(trainer, rows)
        self._count += len(rows)

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        """Ctrl+C or an error during predict: the CSV already holds what was done; say the folder is incomplete."""
        if self.run_dir is None or self._finished or not self.run_dir.is_dir():
            return
        reason = "interrupted (Ctrl+C)" if isinstance(exception, KeyboardInterrupt) else f"failed: {type(exception).__name__}: {exception}"
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
            print(f"clipsam: wrote {total} masks and overlays to {self.run_dir}")
