"""Helpers for whole CLI runs in child processes: data with odd counts, the command, checkpoints.

Used by the distributed and resume integration tests::

    from tests.helpers.runs import clipsam_cli, make_odd_synth_root, run_args

    root = make_odd_synth_root(tmp_path)            # 5 test images per category (odd)
    proc = clipsam_cli(["test", *run_args(tmp_path)], cwd=tmp_path, synth_root=root)

A child process is the honest way to run DDP (Lightning re-launches the script once per extra
rank) and to interrupt a run (Lightning answers Ctrl+C with ``sys.exit(1)`` and ignores SIGINT
from then on, which must not happen to the pytest process).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer

from clipsam.data.synthetic import generate_synthetic

__all__ = [
    "InterruptAt",
    "InterruptPredictAt",
    "RecordBatchOrder",
    "RecordTestIndices",
    "adapter_state",
    "assert_complete_adapter_checkpoint",
    "checkpoints",
    "clipsam_cli",
    "count_test_images",
    "make_odd_synth_root",
    "run_args",
]

REPO = Path(__file__).resolve().parents[2]
DEMO_CONFIG = REPO / "configs" / "demo.yaml"
TRAIN_CATEGORIES = ("fabric", "disk", "hexnut")  # data.train of configs/demo.yaml
TEST_CATEGORIES = ("stripes", "mesh", "capsule")  # data.test of configs/demo.yaml
ADAPTER_PREFIX = "producer.model.adapters."


def make_odd_synth_root(
    tmp_path: Path,
    *,
    num_test_good: int = 2,
    num_test_anomalous: int = 3,
    image_size: int = 64,
    layouts: Sequence[str] = ("mvtec", "visa"),
) -> Path:
    """Generated data for configs/demo.yaml with an odd number of test images per category.

    With the defaults every category has 5 test images, so the demo's 3 train categories give
    15 training images and its 3 test categories 15 test images: an odd total, so a 2-rank
    ``DistributedSampler`` must pad with a repeated image. ``layouts=("mvtec",)`` is enough for
    ``fit`` alone (the demo trains on the MVTec layout).
    """
    root = tmp_path / "synth_odd"
    generate_synthetic(
        root,
        layouts=tuple(layouts),
        categories=[*TRAIN_CATEGORIES, *TEST_CATEGORIES],
        image_size=image_size,
        num_train_good=1,
        num_test_good=num_test_good,
        num_test_anomalous=num_test_anomalous,
        seed=0,
        progress=False,
    )
    return root


def count_test_images(synth_root: Path) -> dict[str, int]:
    """Test images per demo test category (VisA layout), counted from the files on disk.

    VisA keeps train and test images in the same folders and names the split in
    ``split_csv/1cls.csv``: a file counts when the CSV puts it in the test split and it exists.
    """
    visa = synth_root / "visa"
    rows = [line.split(",") for line in (visa / "split_csv" / "1cls.csv").read_text().splitlines()[1:]]
    return {
        category: sum(1 for row in rows if row[0] == category and row[1] == "test" and (visa / row[3]).is_file())
        for category in TEST_CATEGORIES
    }


def run_args(tmp_path: Path, *, max_epochs: int = 1, extra: Sequence[str] = ()) -> list[str]:
    """Demo-config overrides for a run of a few seconds (64 px frames, batch 4, no workers).

    The SAM embedding cache is off so that two runs never share state through it.
    """
    return [
        "--config",
        str(DEMO_CONFIG),
        "--data.image_size=64",
        "--data.batch_size=4",
        "--data.test_batch_size=3",
        "--data.num_workers=0",
        f"--trainer.max_epochs={max_epochs}",
        "--trainer.enable_progress_bar=false",
        "--model.refiner_config.sam.embedding_cache_dir=",
        f"--model.evaluation.predict_dir={tmp_path / 'predict_out'}",
        *extra,
    ]


def clipsam_cli(
    args: Sequence[str], *, cwd: Path, synth_root: Path, timeout: float = 240.0, check: bool = True
) -> subprocess.CompletedProcess[str]:
    """Run ``python -m clipsam.cli ARGS`` in a child process (offline W&B, 1 torch thread per rank).

    Raises:
        AssertionError: with the tail of the output when ``check`` and the exit status is not 0.
    """
    env = dict(os.environ)
    env.update(
        CLIPSAM_SYNTH_ROOT=str(synth_root),
        WANDB_MODE="offline",
        WANDB_SILENT="true",
        HF_HUB_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
        # 2 cores: one thread per process keeps 2 DDP ranks from oversubscribing the machine, and
        # keeps 1-process and 2-process runs on the same (single-threaded) kernels.
        OMP_NUM_THREADS="1",
        MKL_NUM_THREADS="1",
        # Lets the child import tests.helpers.runs (the callbacks below) by class path.
        PYTHONPATH=os.pathsep.join(p for p in (env.get("PYTHONPATH", ""), str(REPO)) if p),
    )
    for name in ("PL_GLOBAL_SEED", "LOCAL_RANK", "NODE_RANK", "WORLD_SIZE", "MASTER_PORT"):
        env.pop(name, None)  # never inherit a distributed setup from the caller
    # Own session: on a timeout the whole group (the CLI and any DDP rank it launched) is killed.
    child = subprocess.Popen(
        [sys.executable, "-m", "clipsam.cli", *args],
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        stdout, stderr = child.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(child.pid, signal.SIGKILL)
        stdout, stderr = child.communicate()
        raise AssertionError(
            f"clipsam {args[0]} did not finish in {timeout:.0f} s (a DDP hang?)\n--- stderr (tail)\n{stderr[-6000:]}"
        ) from None
    proc = subprocess.CompletedProcess(child.args, child.returncode, stdout, stderr)
    if check and proc.returncode != 0:
        raise AssertionError(
            f"clipsam {args[0]} exited with {proc.returncode}\n--- stdout (tail)\n"
            f"{proc.stdout[-3000:]}\n--- stderr (tail)\n{proc.stderr[-6000:]}"
        )
    return proc


def adapter_state(ckpt: Path) -> dict[str, torch.Tensor]:
    """The state_dict of a checkpoint, loaded the safe way (``weights_only=True``)."""
    saved = torch.load(ckpt, map_location="cpu", weights_only=True)
    return saved["state_dict"]


def assert_complete_adapter_checkpoint(ckpt: Path) -> dict[str, Any]:
    """A checkpoint file is a complete torch file, safe to load, holding the adapters only.

    Returns:
        the loaded checkpoint.
    """
    assert ckpt.is_file() and ckpt.stat().st_size > 0, f"{ckpt} is missing or empty"
    saved = torch.load(ckpt, map_location="cpu", weights_only=True)  # raises on a truncated file
    state = saved["state_dict"]
    assert state, f"{ckpt}: no adapter weights"
    leaked = sorted(k for k in state if not k.startswith(ADAPTER_PREFIX))
    assert not leaked, f"{ckpt}: frozen weights leaked into the checkpoint: {leaked[:5]}"
    assert all(torch.isfinite(v).all() for v in state.values()), f"{ckpt}: non-finite adapter weights"
    stray = sorted(p.name for p in ckpt.parent.iterdir() if not p.name.endswith(".ckpt"))
    assert not stray, f"{ckpt.parent}: stray (temporary?) files next to the checkpoints: {stray}"
    return saved


def checkpoints(run_dir: Path) -> list[Path]:
    """The ``*.ckpt`` files of a run directory, sorted by name."""
    return sorted((run_dir / "checkpoints").glob("*.ckpt"))


class InterruptAt(Callback):
    """Press Ctrl+C on this process at the start of training batch ``batch`` of epoch ``epoch``.

    The signal is real (``SIGINT`` to the own pid), so the run goes down Lightning's own
    KeyboardInterrupt path, exactly as when a user interrupts ``clipsam fit``.
    """

    def __init__(self, epoch: int = 1, batch: int = 1) -> None:
        self.epoch = epoch
        self.batch = batch

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        if trainer.current_epoch == self.epoch and batch_idx == self.batch:
            os.kill(os.getpid(), signal.SIGINT)  # KeyboardInterrupt at the next bytecode


class RecordBatchOrder(Callback):
    """Append ``epoch <tab> dataset indices`` of every training batch to ``path`` (order check)."""

    def __init__(self, path: str) -> None:
        self.path = path

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(f"{trainer.current_epoch}\t{batch_idx}\t{batch['index'].tolist()}\n")


class RecordTestIndices(Callback):
    """Append the dataset ``index`` of every test image this rank evaluates to ``dir/rank<R>.txt``."""

    def __init__(self, dir: str) -> None:
        self.dir = dir

    def on_test_batch_start(
        self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        Path(self.dir).mkdir(parents=True, exist_ok=True)
        with open(Path(self.dir) / f"rank{trainer.global_rank}.txt", "a", encoding="utf-8") as f:
            f.writelines(f"{i}\n" for i in batch["index"].tolist())


class InterruptPredictAt(Callback):
    """Press Ctrl+C on this process at the start of predict batch ``batch`` (a real SIGINT)."""

    def __init__(self, batch: int = 1) -> None:
        self.batch = batch

    def on_predict_batch_start(
        self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        if batch_idx == self.batch:
            os.kill(os.getpid(), signal.SIGINT)
