"""Lightning callbacks and plugins: writing predictions, writing checkpoints atomically.

:class:`PredictionWriter` turns ``ClipSamModule.predict_step`` outputs into files:

```
<predict_dir>/version_N/
  masks/<name>.png      final mask at the image's original size, 0 or 255
  overlays/<name>.png   the image with the anomaly heat map blended in and the mask outlined
  predictions.csv       path, image score, mask and overlay files, one row per image
  skipped.txt           files in the input folder that were not images (if any)
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


def _resize(array: np.ndarray, size_hw: tuple[int, int], *, nearest: bool) -> np.ndarray:
    height, width = size_hw
    interpolation = cv2.INTER_NEAREST if nearest else cv2.INTER_LINEAR
    return cv2.resize(array, (width, height), interpolation=interpolation)


class PredictionWriter(BasePredictionWriter):
    """Write one mask PNG and one overlay PNG per predicted image.

    Args:
        output_dir: root folder; each predict run creates ``output_dir/version_N``.
    """

    def __init__(self, output_dir: str) -> None:
        super().__init__(write_interval="batch")
        self.output_root = Path(output_dir).expanduser()
        self.run_dir: Path | None = None
        self._used_names: set[str] = set()
        self._rows: list[dict[str, Any]] = []

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage != "predict":
            return
        run_dir = ""
        if trainer.is_global_zero:
            run_dir = str(next_version_dir(self.output_root))
            marker = self.output_root / OUTPUT_MARKER
            if not marker.exists():
                marker.write_text("clipsam predict outputs: never read as input by clipsam\n")
            (Path(run_dir) / "INCOMPLETE").write_text("clipsam predict has not finished writing this folder\n")
            # Which adapters made these masks: checkpoint path + sha256 (set by the CLI).
            record = {
                "checkpoint": getattr(pl_module, "checkpoint_record", None),
                "predict_dir": str(getattr(getattr(trainer, "datamodule", None), "predict_dir", "") or ""),
            }
            with atomic_write(Path(run_dir) / "run.json") as tmp:
                tmp.write_text(json.dumps(record, indent=2))
        self.run_dir = Path(trainer.strategy.broadcast(run_dir))
        (self.run_dir / "masks").mkdir(parents=True, exist_ok=True)
        (self.run_dir / "overlays").mkdir(parents=True, exist_ok=True)
        self._used_names = set()
        self._rows = []
        self._finished = False
        skipped = getattr(getattr(trainer, "datamodule", None), "skipped_files", None) or []
        if skipped and trainer.is_global_zero:
            with atomic_write(self.run_dir / "skipped.txt") as tmp:
                tmp.write_text("".join(f"{p}\n" for p in skipped))

    def _unique_name(self, path: str, trainer: Trainer) -> str:
        """File name for an input image: its path below the predict folder, '/' -> '__'.

        ``good/000.png`` and ``hole/000.png`` become ``good__000`` and ``hole__000``; names that
        still collide (or come from outside the folder) get a numeric suffix.
        """
        source = Path(path)
        root = getattr(getattr(trainer, "datamodule", None), "predict_dir", None)
        try:
            relative = source.resolve().relative_to(Path(root).expanduser().resolve()) if root else Path(source.name)
        except ValueError:
            relative = Path(source.name)
        # Unique across processes too: each image is predicted by one process only.
        name = output_name("__".join((*relative.parent.parts, relative.stem)))
        candidate, n = name, 1
        while candidate in self._used_names:
            n += 1
            candidate = output_name(f"{name}_{n}")
        self._used_names.add(candidate)
        return candidate

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
        for i, path in enumerate(prediction["path"]):
            height, width = (int(v) for v in prediction["original_size"][i].tolist())
            original = read_image(path)  # (H, W, 3) uint8, display orientation, scaled by bit depth
            scores = _resize(prediction["scores"][i].float().numpy(), (height, width), nearest=False)
            mask = _resize(prediction["mask"][i].numpy().astype(np.uint8), (height, width), nearest=True) > 0
            name = self._unique_name(path, trainer)
            mask_path = self.run_dir / "masks" / f"{name}.png"
            overlay_path = self.run_dir / "overlays" / f"{name}.png"
            with atomic_write(mask_path) as tmp:
                Image.fromarray((mask * 255).astype(np.uint8)).save(tmp, format="PNG")
            with atomic_write(overlay_path) as tmp:
                Image.fromarray(render_overlay(original, scores, mask)).save(tmp, format="PNG")
            self._rows.append(
                {
                    "path": path,
                    "image_score": float(prediction["image_scores"][i]),
                    "anomalous_pixels": int(mask.sum()),
                    "mask": str(mask_path),
                    "overlay": str(overlay_path),
                }
            )

    def _write_csv(self, path: Path, rows: list[dict[str, Any]]) -> None:
        fields = ["path", "image_score", "anomalous_pixels", "mask", "overlay"]
        with atomic_write(path) as tmp:
            with tmp.open("w", newline="") as handle:
                writer = csv.DictWriter(handle, fieldnames=fields)
                writer.writeheader()
                writer.writerows(rows)

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        """Ctrl+C or an error during predict: keep what was done, say the folder is incomplete."""
        if self.run_dir is None or getattr(self, "_finished", True) or not self.run_dir.is_dir():
            return
        reason = "interrupted (Ctrl+C)" if isinstance(exception, KeyboardInterrupt) else f"failed: {type(exception).__name__}: {exception}"
        done = len(self._rows)
        name = "predictions.csv" if trainer.world_size == 1 else f"predictions_rank{trainer.global_rank}.csv"
        try:
            self._write_csv(self.run_dir / name, self._rows)
            if trainer.is_global_zero:
                (self.run_dir / "INCOMPLETE").write_text(
                    f"clipsam predict {reason} after {done} image(s) (rank {trainer.global_rank}); "
                    f"{name} lists them. Run predict again for the whole folder.\n"
                )
        except OSError:
            pass  # a full or read-only disk: the INCOMPLETE file written at the start stays

    def on_predict_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Write ``predictions.csv`` (under DDP: each process its part, then rank 0 merges)."""
        assert self.run_dir is not None
        write = self._write_csv
        final = self.run_dir / "predictions.csv"
        if trainer.world_size == 1:
            write(final, self._rows)
            total = len(self._rows)
        else:
            part = self.run_dir / f".predictions_rank{trainer.global_rank}.csv"
            write(part, self._rows)
            trainer.strategy.barrier("clipsam_predictions_written")
            total = 0
            if trainer.is_global_zero:
                rows: list[dict[str, Any]] = []
                for rank in range(trainer.world_size):
                    rank_part = self.run_dir / f".predictions_rank{rank}.csv"
                    with rank_part.open(newline="") as handle:
                        rows.extend(csv.DictReader(handle))
                    rank_part.unlink()
                rows.sort(key=lambda row: row["path"])
                write(final, rows)
                total = len(rows)
        self._finished = True
        if trainer.is_global_zero:
            (self.run_dir / "INCOMPLETE").unlink(missing_ok=True)
            print(f"clipsam: wrote {total} masks and overlays to {self.run_dir}")
