"""Issue 21, stops: SIGTERM and a full disk end a run with one line, keeping what was done.

- SIGTERM (a service manager, a batch scheduler) stops ``predict`` before its next batch: every
  finished image is written and listed in predictions.csv, the folder says INCOMPLETE, exit 143
  with one ``clipsam: stopped by SIGTERM`` line. ``fit`` names the signal (not "Ctrl+C").
- A full disk (a write raising ``OSError(ENOSPC)``): ``test`` prints its metrics before the
  error (table and JSON); ``fit`` saving a checkpoint and ``predict`` writing a mask name the
  file in one ``clipsam: error:`` line, never a torch ``inline_container.cc`` traceback.

SIGTERM is a real signal to a child process (the pytest process must keep its own handlers);
the disk faults run in-process with a monkeypatched write.
"""

from __future__ import annotations

import csv
import errno
import io
import json
import os
import signal
from pathlib import Path
from typing import Any

import pytest
from lightning.pytorch import Callback, LightningModule, Trainer
from PIL import Image

from clipsam.cli import main
from tests.helpers.runs import clipsam_cli, run_args
from tests.integration.conftest import fast_args


class SigtermAt(Callback):
    """Send SIGTERM to this process at the start of predict batch ``predict_batch`` or of training
    batch ``train_batch`` (a real signal: Lightning's own handler sees it)."""

    def __init__(self, predict_batch: int = -1, train_batch: int = -1) -> None:
        self.predict_batch = predict_batch
        self.train_batch = train_batch

    def on_predict_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        if batch_idx == self.predict_batch:
            os.kill(os.getpid(), signal.SIGTERM)

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        if batch_idx == self.train_batch:
            os.kill(os.getpid(), signal.SIGTERM)


def _sigterm_at(**init_args: int) -> str:
    spec = {"class_path": f"{__name__}.SigtermAt", "init_args": init_args}
    return f"--trainer.callbacks+={json.dumps(spec)}"


@pytest.fixture(scope="module")
def trained(demo_fit_ckpt: Path) -> Path:
    """last.ckpt of one 1-epoch fit (tiny models, 64 px)."""
    return demo_fit_ckpt


def _one_line(err: str, prefix: str) -> str:
    lines = [line for line in err.splitlines() if line.startswith(prefix)]
    assert len(lines) == 1 and "Traceback" not in err, err[-4000:]
    return lines[0]


def _main(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    try:
        code = main(args)
    except SystemExit as exit_:
        code = exit_.code
    out, err = capsys.readouterr()
    return int(code or 0), out, err


# ------------------------------------------------------------------ SIGTERM
def test_sigterm_stops_predict_after_the_batch_in_hand(tmp_path: Path, trained: Path, synth_root: Path) -> None:
    folder = tmp_path / "photos"
    folder.mkdir()
    for i, image in enumerate(sorted((synth_root / "mvtec" / "capsule" / "test").rglob("*.png"))[:9]):
        Image.open(image).save(folder / f"{i}.png")
    proc = clipsam_cli(
        ["predict", *run_args(tmp_path), f"--data.predict_dir={folder}", _sigterm_at(predict_batch=1), "--ckpt_path", str(trained)],
        cwd=tmp_path,
        synth_root=synth_root,
        check=False,
    )
    assert proc.returncode == 143, proc.stderr[-3000:]
    line = _one_line(proc.stderr, "clipsam: ")
    assert line.startswith("clipsam: stopped by SIGTERM") and "Ctrl+C" not in line, line
    run = tmp_path / "predict_out" / "version_0"
    assert "3 image(s)" in line and str(run) in line, line
    assert "SIGTERM" in (run / "INCOMPLETE").read_text()
    with (run / "predictions.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 3, "the batch in hand (test_batch_size=3) is finished, the next one is not started"
    for row in rows:
        assert Path(row["mask"]).is_file() and Path(row["overlay"]).is_file()
    written = sorted(p.name for p in (run / "masks").iterdir())
    assert written == sorted(Path(r["mask"]).name for r in rows), "every written mask is listed, nothing half-written"
    assert not [p for p in run.rglob(".clipsam-*")], "no temporary files left"


def test_sigterm_during_fit_is_named_not_ctrl_c(tmp_path: Path, synth_root: Path) -> None:
    proc = clipsam_cli(
        ["fit", *run_args(tmp_path, max_epochs=3), _sigterm_at(train_batch=1)],
        cwd=tmp_path,
        synth_root=synth_root,
        check=False,
    )
    assert proc.returncode == 143, proc.stderr[-3000:]
    line = _one_line(proc.stderr, "clipsam: ")
    assert line.startswith("clipsam: stopped by SIGTERM") and "interrupted" not in line, line
    (run_dir,) = sorted((tmp_path / "runs" / "demo").glob("version_*"))
    assert str(run_dir) in line
    marker = (run_dir / "INCOMPLETE").read_text()
    assert "SIGTERM" in marker and "Ctrl+C" not in marker, marker


# ------------------------------------------------------------------ a full disk
class _FullDisk(io.RawIOBase):
    """A file whose writes fail with ENOSPC once ``room`` bytes are written."""

    def __init__(self, room: int = 256) -> None:
        self.room = room

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        size = len(memoryview(data))
        if size > self.room:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.room -= size
        return size


def test_disk_full_while_fit_saves_a_checkpoint_names_the_file(
    in_tmp_cwd: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import torch

    real_save = torch.save

    def save_to_a_full_disk(obj: Any, target: Any, *args: Any, **kwargs: Any) -> None:
        real_save(obj, _FullDisk(), *args, **kwargs)  # torch's own writer, the disk fills up

    monkeypatch.setattr(torch, "save", save_to_a_full_disk)
    code, _, err = _main(["fit", *fast_args(in_tmp_cwd)], capsys)
    assert code == 2, err[-3000:]
    line = _one_line(err, "clipsam: error: ")
    assert "No space left on device" in line and ".ckpt" in line and "checkpoints" in line, line
    assert "inline_container" not in err and "RuntimeError" not in err, err[-3000:]
    (run_dir,) = sorted((in_tmp_cwd / "runs" / "demo").glob("version_*"))
    assert str(run_dir / "checkpoints") in line, line
    assert "failed" in (run_dir / "INCOMPLETE").read_text()
    assert not list((run_dir / "checkpoints").glob("*")), "no partial checkpoint or temporary file"


def test_disk_full_during_test_prints_the_metrics_and_names_the_file(
    in_tmp_cwd: Path, trained: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    real = Path.write_text

    def full(self: Path, *args: Any, **kwargs: Any) -> int:
        if self.name.startswith(".clipsam-") and self.parent.name.startswith("version_"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))  # a write names no file
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Path, "write_text", full)
    code, out, err = _main(["test", *fast_args(in_tmp_cwd), "--ckpt_path", str(trained)], capsys)
    assert code == 2, err[-3000:]
    line = _one_line(err, "clipsam: error: ")
    assert "No space left on device" in line and "test_results.json" in line and "printed above" in line, line
    # The numbers are on the console: the table, and every metric as JSON.
    assert "P-AUROC" in out and "mean" in out, out[-3000:]
    json_line = out.splitlines()[out.splitlines().index(next(x for x in out.splitlines() if "could not be saved" in x)) + 1]
    record = json.loads(json_line)
    assert set(record["per_category"]) == {"stripes", "mesh", "capsule"}
    assert 0.0 <= record["mean"]["pixel_auroc"] <= 1.0
    assert record["thresholds"]["image"]["per_category"]


def test_disk_full_during_predict_names_the_file(
    in_tmp_cwd: Path, trained: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    real = Image.Image.save

    def full(self: Image.Image, fp: Any, *args: Any, **kwargs: Any) -> None:
        if isinstance(fp, (str, os.PathLike)) and Path(fp).parent.name == "masks":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real(self, fp, *args, **kwargs)

    monkeypatch.setattr(Image.Image, "save", full)
    code, _, err = _main(["predict", *fast_args(in_tmp_cwd), "--ckpt_path", str(trained)], capsys)
    assert code == 2, err[-3000:]
    line = _one_line(err, "clipsam: error: ")
    run = in_tmp_cwd / "predict_out" / "version_0"
    named = line.split("No space left on device while writing ", 1)[-1].split(":", 1)[0]
    assert "No space left on device" in line and Path(named).parent == run / "masks" and named.endswith(".png"), line
    assert "failed" in (run / "INCOMPLETE").read_text()


@pytest.mark.parametrize(("nearly_full", "words"), [(True, "No space left on device"), (False, "torch could not write the file")])
def test_a_checkpoint_write_torch_reports_as_runtime_error_is_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, nearly_full: bool, words: str
) -> None:
    """A real full disk under torch's C++ writer: torch says only ``RuntimeError: [enforce fail at
    inline_container.cc] unexpected pos``; clipsam names the file and the fix."""
    import torch

    import clipsam.io
    from clipsam.runs import disk_error_message

    def failing(obj: Any, target: Any, *args: Any, **kwargs: Any) -> None:
        Path(target).write_bytes(b"PK\x03\x04 half")
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")

    monkeypatch.setattr(torch, "save", failing)
    monkeypatch.setattr(clipsam.io, "_nearly_full", lambda folder: nearly_full)
    target = tmp_path / "checkpoints" / "last.ckpt"
    with pytest.raises(OSError) as caught:
        clipsam.io.atomic_torch_save({"a": 1}, target)
    message = disk_error_message(caught.value)
    assert message is not None and str(target) in message and words in message, message
    assert not list(target.parent.iterdir()), "no partial file"
