"""Resume and checkpoint files (issue 6, "Resume" and atomic writes).

A fit interrupted by Ctrl+C during its second epoch resumes from its ``last.ckpt`` with
``--ckpt_path`` and ends with adapters *equal* (bit for bit) to an uninterrupted 2-epoch run's.
The interruption is real: a callback sends SIGINT to the CLI's own process in the middle of
epoch 1, so the run goes down Lightning's KeyboardInterrupt path as a user's Ctrl+C would.

Every checkpoint the runs leave behind is a complete torch file that loads with
``weights_only=True`` and holds the adapters only; a checkpoint write that dies half-way leaves the
previous file intact.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import torch

from tests.helpers.runs import (
    ADAPTER_PREFIX,
    assert_complete_adapter_checkpoint,
    checkpoints,
    clipsam_cli,
    make_odd_synth_root,
    run_args,
)

STEPS_PER_EPOCH = 4  # 15 training images (5 per category), batch 4, drop_last=False


def _callback(class_name: str, **init_args: object) -> str:
    spec = {"class_path": f"tests.helpers.runs.{class_name}", "init_args": init_args}
    return f"--trainer.callbacks+={json.dumps(spec)}"


def _order(path: Path) -> dict[int, list[list[int]]]:
    """Training batches per epoch, as recorded by RecordBatchOrder."""
    epochs: dict[int, list[list[int]]] = {}
    for line in path.read_text().splitlines():
        epoch, _batch, indices = line.split("\t")
        epochs.setdefault(int(epoch), []).append(json.loads(indices))
    return epochs


def _run_dirs(cwd: Path) -> list[Path]:
    return sorted((cwd / "runs" / "demo").glob("version_*"), key=lambda p: int(p.name.split("_")[1]))


@pytest.fixture(scope="module")
def train_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_odd_synth_root(tmp_path_factory.mktemp("resume_data"), layouts=("mvtec",))


def test_interrupted_fit_resumes_to_the_uninterrupted_adapters(train_root: Path, tmp_path: Path) -> None:
    straight, broken = tmp_path / "straight", tmp_path / "interrupted"
    straight.mkdir()
    broken.mkdir()

    # 1. Uninterrupted: 2 epochs.
    clipsam_cli(
        ["fit", *run_args(straight, max_epochs=2), _callback("RecordBatchOrder", path=str(straight / "order.txt"))],
        cwd=straight,
        synth_root=train_root,
    )
    (straight_dir,) = _run_dirs(straight)

    # 2. The same command, Ctrl+C at the second batch of epoch 1 (after epoch 0's checkpoint).
    proc = clipsam_cli(
        [
            "fit",
            *run_args(broken, max_epochs=2),
            _callback("RecordBatchOrder", path=str(broken / "order.txt")),
            _callback("InterruptAt", epoch=1, batch=1),
        ],
        cwd=broken,
        synth_root=train_root,
        check=False,
    )
    assert proc.returncode != 0, "an interrupted fit must not exit with status 0"
    assert "KeyboardInterrupt" in proc.stderr + proc.stdout, proc.stderr[-3000:]
    (broken_dir,) = _run_dirs(broken)
    last = broken_dir / "checkpoints" / "last.ckpt"
    saved = assert_complete_adapter_checkpoint(last)
    assert (saved["epoch"], saved["global_step"]) == (0, STEPS_PER_EPOCH), "last.ckpt is not the end of epoch 0"
    assert [p.name for p in checkpoints(broken_dir)] == [f"epoch=0-step={STEPS_PER_EPOCH}.ckpt", "last.ckpt"]

    # 3. Resume from it with --ckpt_path.
    clipsam_cli(
        [
            "fit",
            *run_args(broken, max_epochs=2),
            "--ckpt_path",
            str(last),
            _callback("RecordBatchOrder", path=str(broken / "order_resumed.txt")),
        ],
        cwd=broken,
        synth_root=train_root,
    )
    first_dir, resumed_dir = _run_dirs(broken)
    assert first_dir == broken_dir
    assert last.is_file(), "resuming must not remove the checkpoint it resumed from"

    # The resumed epoch sees the uninterrupted run's batch order (shuffle seeded per epoch).
    straight_order, resumed_order = _order(straight / "order.txt"), _order(broken / "order_resumed.txt")
    assert sorted(resumed_order) == [1], "the resumed run must start at epoch 1"
    assert straight_order[0] != straight_order[1], "epochs 0 and 1 should be shuffled differently"
    assert resumed_order[1] == straight_order[1], (
        "the resumed epoch 1 does not see the uninterrupted run's batch order (it replays "
        f"{'epoch 0' if resumed_order[1] == straight_order[0] else 'another'} order): the training "
        "shuffle must be a function of (seed, epoch), not of a generator's running state"
    )

    # Same end: epoch, step, adapters bit for bit, and Adam's moments.
    want = assert_complete_adapter_checkpoint(straight_dir / "checkpoints" / "last.ckpt")
    got = assert_complete_adapter_checkpoint(resumed_dir / "checkpoints" / "last.ckpt")
    assert (got["epoch"], got["global_step"]) == (want["epoch"], want["global_step"]) == (1, 2 * STEPS_PER_EPOCH)
    assert want["state_dict"].keys() == got["state_dict"].keys()
    differ = {
        k: float((want["state_dict"][k] - got["state_dict"][k]).abs().max())
        for k in want["state_dict"]
        if not torch.equal(want["state_dict"][k], got["state_dict"][k])
    }
    assert not differ, f"resumed adapters differ from the uninterrupted run's (max abs diff): {differ}"
    for a, b in zip(want["optimizer_states"][0]["state"].values(), got["optimizer_states"][0]["state"].values()):
        assert all(torch.equal(a[k], b[k]) for k in ("exp_avg", "exp_avg_sq")), "Adam state differs"

    # Every checkpoint any of the three runs wrote is complete and adapters-only.
    for run_dir in (straight_dir, first_dir, resumed_dir):
        for ckpt in checkpoints(run_dir):
            assert_complete_adapter_checkpoint(ckpt)


def test_a_checkpoint_write_that_dies_half_way_keeps_the_previous_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The checkpoint IO of the trainer the CLI builds (demo config) writes atomically: a crash in
    the middle of writing leaves the previous checkpoint loadable and no partial file behind."""
    import io

    from clipsam.cli import _build_cli
    from tests.integration.conftest import fast_args

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["clipsam"])  # LightningCLI warns when it sees pytest's argv
    monkeypatch.setenv("CLIPSAM_SYNTH_ROOT", str(tmp_path / "unused"))
    monkeypatch.setenv("WANDB_MODE", "offline")
    cli = _build_cli(fast_args(tmp_path), run=False)  # no subcommand with run=False
    checkpoint_io = cli.trainer.strategy.checkpoint_io

    target = tmp_path / "checkpoints" / "last.ckpt"
    target.parent.mkdir()
    good = {"epoch": 0, "state_dict": {ADAPTER_PREFIX + "0.weight": torch.ones(64, 32)}}
    checkpoint_io.save_checkpoint(good, target)
    before = target.read_bytes()

    from clipsam.callbacks import AtomicCheckpointIO

    assert isinstance(checkpoint_io, AtomicCheckpointIO), "the CLI installs the atomic checkpoint writer"
    real_save = torch.save

    def dies_half_way(obj, file, *args, **kwargs):  # type: ignore[no-untyped-def]
        buffer = io.BytesIO()
        real_save(obj, buffer)
        Path(file).write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
        raise KeyboardInterrupt  # Ctrl+C in the middle of the write

    monkeypatch.setattr(torch, "save", dies_half_way)
    newer = {"epoch": 1, "state_dict": {ADAPTER_PREFIX + "0.weight": torch.full((64, 32), 2.0)}}
    with pytest.raises(KeyboardInterrupt):
        checkpoint_io.save_checkpoint(newer, target)
    monkeypatch.undo()

    assert target.read_bytes() == before, "a half-written checkpoint replaced the previous one"
    assert os.listdir(target.parent) == ["last.ckpt"], "a partial file was left next to the checkpoint"
    loaded = assert_complete_adapter_checkpoint(target)
    assert loaded["epoch"] == 0
