"""Issue 22, item 4: ``clipsam predict --watch DIR`` segments image files as they arrive.

- Only complete files are read: one written slowly in chunks is segmented once, whole; one
  renamed from a ``.part`` name is segmented; ``.tmp`` files and hidden files are not.
- Exactly once across ``kill -9`` and a restart: one ``predictions.csv`` row and one state entry
  per file, also for a file whose row was written but whose state entry was not (the kill's
  window) and with a torn last CSV line; the masks equal those of a plain ``clipsam predict``.
- SIGTERM stops between images with exit 143, one line and a consistent state.
- ``--watch_once``; a missing folder or a file given as the folder is one ``clipsam: error:`` line.

The watcher runs as a child process (real signals, a real ``kill -9``) on the demo config with
its tiny random models and the session's 1-epoch checkpoint; scores are thresholded
(``mask_source=score``) so the masks compared are neither empty nor full.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from clipsam.cli import main
from clipsam.errors import ConfigError
from clipsam.watch import STATE_FILE, FolderPoller, _lock
from tests.integration.conftest import DEMO_CONFIG, REPO, run_cli

SETTLE_S = 2.0  # long enough that a test thread pausing between chunks never looks "complete"
INTERVAL_S = 0.1


def _model_args(tmp_path: Path, ckpt: Path, output: Path) -> list[str]:
    return [
        "--config",
        DEMO_CONFIG,
        "--data.image_size=64",
        "--data.num_workers=0",
        "--trainer.enable_progress_bar=false",
        "--model.refiner_config.sam.embedding_cache_dir=",
        # thresholded fused scores: masks with some anomalous pixels, not all (random tiny models)
        "--model.evaluation.mask_source=score",
        "--model.evaluation.predict_mask_threshold=0.1",
        f"--model.evaluation.predict_dir={output}",
        "--ckpt_path",
        str(ckpt),
    ]


def _env(synth_root: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        CLIPSAM_SYNTH_ROOT=str(synth_root),
        WANDB_MODE="offline",
        WANDB_SILENT="true",
        HF_HUB_OFFLINE="1",
        OMP_NUM_THREADS="1",
        MKL_NUM_THREADS="1",
        PYTHONPATH=os.pathsep.join(p for p in (env.get("PYTHONPATH", ""), str(REPO)) if p),
    )
    return env


def _start_watch(args: list[str], folder: Path, cwd: Path, synth_root: Path, *extra: str) -> subprocess.Popen[str]:
    """``clipsam predict ... --watch folder`` as a child process; its output goes to files in ``cwd``."""
    command = [
        sys.executable, "-m", "clipsam.cli", "predict", *args,
        "--watch", str(folder), f"--watch_settle_s={SETTLE_S}", f"--watch_interval_s={INTERVAL_S}", *extra,
    ]  # fmt: skip
    n = len(list(cwd.glob("watch_*.out")))
    return subprocess.Popen(
        command,
        cwd=cwd,
        env=_env(synth_root),
        stdout=(cwd / f"watch_{n}.out").open("w"),
        stderr=(cwd / f"watch_{n}.err").open("w"),
        text=True,
        start_new_session=True,
    )


def _finish(proc: subprocess.Popen[str], cwd: Path, timeout: float = 120.0) -> tuple[int, str, str]:
    """Wait for the child; its exit status, stdout and stderr."""
    try:
        code = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        raise
    n = len(list(cwd.glob("watch_*.out"))) - 1
    return code, (cwd / f"watch_{n}.out").read_text(), (cwd / f"watch_{n}.err").read_text()


def _rows(run_dir: Path) -> list[dict[str, str]]:
    path = run_dir / "predictions.csv"
    if not path.exists():
        return []
    with path.open(newline="") as handle:
        return [row for row in csv.DictReader(handle) if row.get("overlay")]


def _state(run_dir: Path) -> dict[str, dict]:
    return json.loads((run_dir / STATE_FILE).read_text())["files"]


def _wait_for(condition: Callable[[], bool], proc: subprocess.Popen[str], what: str, timeout: float = 90.0) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if condition():
            return
        if proc.poll() is not None:
            raise AssertionError(f"the watcher exited ({proc.returncode}) before {what}")
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    raise AssertionError(f"timed out waiting for {what}")


def _mask(path: str | Path) -> np.ndarray:
    with Image.open(path) as img:
        return np.asarray(img) > 0


@pytest.fixture()
def images(synth_root: Path) -> list[Path]:
    """Generated 128 px test images of the demo's data (good and anomalous)."""
    found = sorted((synth_root / "mvtec").glob("*/test/*/*.png"))
    assert len(found) >= 10
    return found


def _write_slowly(source: Path, target: Path, chunks: int = 30, pause: float = 0.1) -> None:
    """Write ``source`` to ``target`` in ``chunks`` pieces, ``pause`` seconds apart (a slow copy)."""
    data = source.read_bytes()
    step = -(-len(data) // chunks)
    with target.open("wb") as handle:
        for start in range(0, len(data), step):
            handle.write(data[start : start + step])
            handle.flush()
            time.sleep(pause)


# ------------------------------------------------------------------ the folder poller
def test_poller_waits_for_a_settled_file_and_takes_a_renamed_one_at_once(tmp_path: Path, images: list[Path]) -> None:
    folder = tmp_path / "in"
    (folder / "sub").mkdir(parents=True)
    poller = FolderPoller(folder, settle_s=600.0)
    old = folder / "old.png"
    shutil.copy(images[0], old)
    os.utime(old, (time.time() - 3600, time.time() - 3600))  # last written an hour ago: complete
    fresh = folder / "sub" / "fresh.png"
    shutil.copy(images[1], fresh)  # "just written" (whatever the machine's load): may still be growing
    os.utime(fresh, (time.time() + 3600, time.time() + 3600))
    part = folder / "sub" / "renamed.png.part"
    shutil.copy(images[2], part)
    growing = folder / "sub" / "growing.png.part"
    shutil.copy(images[3], growing)
    (folder / ".hidden.png").write_bytes(images[3].read_bytes())
    (folder / "copy.png.tmp").write_bytes(images[3].read_bytes())
    ready, waiting = poller.poll({})
    assert [rel for rel, _ in ready] == ["old.png"] and waiting == 1
    part.rename(folder / "sub" / "renamed.png")  # a rename produces a complete file
    with growing.open("ab") as handle:  # written to after the last poll saw it, then renamed
        handle.write(b"\0")
    os.utime(growing, (time.time() + 3600, time.time() + 3600))
    growing.rename(folder / "sub" / "grown.png")
    ready, waiting = poller.poll({})
    assert [rel for rel, _ in ready] == ["old.png", "sub/renamed.png"] and waiting == 2, "grown.png waits to settle"
    # recorded files are skipped; a failed one comes back only when it changes
    stat = old.stat()
    done = {"old.png": {"status": "done", "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}}
    failed = {"sub/renamed.png": {"status": "failed", "size": 1, "mtime_ns": 1}}
    assert [rel for rel, _ in poller.poll({**done, **failed})[0]] == ["sub/renamed.png"]
    stat = (folder / "sub" / "renamed.png").stat()
    failed = {"sub/renamed.png": {"status": "failed", "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}}
    assert poller.poll({**done, **failed})[0] == []


def test_poller_sees_a_file_unchanged_for_the_settle_time_as_complete(tmp_path: Path, images: list[Path]) -> None:
    folder = tmp_path / "in"
    folder.mkdir()
    poller = FolderPoller(folder, settle_s=0.3)
    future = time.time() + 3600  # an mtime in the future (another machine's clock): only observation counts
    target = folder / "a.png"
    shutil.copy(images[0], target)
    os.utime(target, (future, future))
    assert poller.poll({}) == ([], 1)
    time.sleep(0.35)
    assert [rel for rel, _ in poller.poll({})[0]] == ["a.png"]
    with target.open("ab") as handle:  # it grew: wait again
        handle.write(b"\0")
    os.utime(target, (future + 1, future + 1))
    assert poller.poll({}) == ([], 1)


# ------------------------------------------------------------------ bad input
@pytest.mark.parametrize(
    ("make", "expected"),
    [
        (lambda tmp: tmp / "missing", "the folder does not exist: create it"),
        (lambda tmp: tmp / "file.png", "is a file, not a folder"),
    ],
)
def test_bad_watch_folder_is_one_error_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], images: list[Path], make: Callable[[Path], Path], expected: str
) -> None:
    shutil.copy(images[0], tmp_path / "file.png")
    folder = make(tmp_path)
    code = main(["predict", "--config", DEMO_CONFIG, "--watch", str(folder), "--watch_once"])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1, err
    assert lines[0].startswith("clipsam: error: --watch ") and str(folder) in lines[0] and expected in lines[0], lines[0]


def test_bad_watch_options_are_one_error_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    for args, expected in (
        (["--watch"], "--watch needs the folder to watch"),
        (["--watch", str(tmp_path), "--watch_settle_s=-1"], "--watch_settle_s=-1: give a number of seconds"),
        (["--watch", str(tmp_path), "--watch_once=maybe"], "--watch_once=maybe"),
    ):
        code = main(["predict", "--config", DEMO_CONFIG, *args])
        err = capsys.readouterr().err
        assert code == 2 and err.startswith("clipsam: error: ") and expected in err and err.count("\n") == 1, err


def test_one_process_writes_a_run_folder_at_a_time(tmp_path: Path) -> None:
    held = _lock(tmp_path)
    try:
        with pytest.raises(ConfigError, match="is being written by another `clipsam predict --watch` \\(pid "):
            _lock(tmp_path)
    finally:
        held.close()
    _lock(tmp_path).close()  # released with its holder


def test_watch_once_resumes_its_folder_and_other_settings_get_a_fresh_one(
    tmp_path: Path,
    images: list[Path],
    demo_fit_ckpt: Path,
    synth_root: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("CLIPSAM_SYNTH_ROOT", str(synth_root))
    folder = tmp_path / "in"
    folder.mkdir()
    shutil.copy(images[0], folder / "one.png")
    os.utime(folder / "one.png", (time.time() - 60, time.time() - 60))
    output = tmp_path / "watch_out"
    args = ["predict", *_model_args(tmp_path, demo_fit_ckpt, output), "--watch", str(folder), "--watch_once"]

    def watch(*extra: str) -> str:
        code = main([*args, *extra])
        err = capsys.readouterr().err
        assert code == 0, err[-3000:]
        return err

    assert "(new folder)" in watch()
    assert [r["path"] for r in _rows(output / "version_0")] == [str(folder / "one.png")]
    assert not (output / "version_0" / "INCOMPLETE").exists()
    shutil.copy(images[1], folder / "two.png")
    os.utime(folder / "two.png", (time.time() - 60, time.time() - 60))
    # other thresholds: other masks, so a fresh folder (results of two settings never mix)
    err = watch("--model.evaluation.predict_mask_threshold=0.2")
    assert f"-> {output / 'version_1'} (new folder)" in err, err
    assert len(_rows(output / "version_1")) == 2
    err = watch()  # the first settings again: their folder, only the new file
    assert f"-> {output / 'version_0'} (resuming: 1 file(s) done, 0 failed before)" in err, err
    assert "clipsam: watch: 1 image(s) segmented this run (2 in all, 0 failed)" in err, err
    assert [r["path"] for r in _rows(output / "version_0")] == [str(folder / "one.png"), str(folder / "two.png")]
    assert (output / "version_0" / "config.yaml").is_file() and (output / "version_0" / "run.json").is_file()


# ------------------------------------------------------------------ arriving files, kill -9, restart
def test_watch_segments_each_arriving_file_exactly_once_across_kill_and_restart(
    tmp_path: Path,
    images: list[Path],
    demo_fit_ckpt: Path,
    synth_root: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    folder = tmp_path / "in"
    for sub in ("a", "b", "c", "d"):
        (folder / sub).mkdir(parents=True)
    output = tmp_path / "watch_out"
    args = _model_args(tmp_path, demo_fit_ckpt, output)
    # at start: three images, a non-image file, a temporary file that is never renamed
    shutil.copy(images[0], folder / "a" / "first.png")
    shutil.copy(images[1], folder / "a" / "second.png")
    shutil.copy(images[2], folder / "b" / "third.png")
    (folder / "b" / "notes.txt").write_text("not an image\n")
    (folder / "b" / "upload.png.tmp").write_bytes(images[3].read_bytes())
    proc = _start_watch(args, folder, tmp_path, synth_root)
    run_dir = output / "version_0"
    _wait_for(lambda: len(_rows(run_dir)) == 3, proc, "the images present at start")

    # while running: a slow copy in chunks (never read half-written), a rename, a corrupt file
    writer = threading.Thread(target=_write_slowly, args=(images[4], folder / "c" / "slow.png"))
    writer.start()
    part = folder / "d" / "renamed.png.part"
    shutil.copy(images[5], part)
    time.sleep(3 * INTERVAL_S)  # seen under its temporary name first
    part.rename(folder / "d" / "renamed.png")
    (folder / "d" / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    writer.join()
    _wait_for(lambda: len(_rows(run_dir)) == 5 and len(_state(run_dir)) == 6, proc, "the arriving files")

    # two more files, then kill -9 at once (mid-way: they are not both done)
    shutil.copy(images[6], folder / "a" / "late1.png")
    shutil.copy(images[7], folder / "b" / "late2.png")
    time.sleep(SETTLE_S * 0.8)
    os.killpg(proc.pid, signal.SIGKILL)
    code, out, err = _finish(proc, tmp_path)
    assert code == -signal.SIGKILL
    assert (run_dir / "INCOMPLETE").exists(), "a killed watch keeps its INCOMPLETE marker"
    assert "slow.png" not in (run_dir / "skipped.txt").read_text(), "the slow copy was read half-written"
    warnings = [line for line in err.splitlines() if "clipsam: warning:" in line]
    assert len([line for line in warnings if "corrupt.png" in line]) == 1, err[-3000:]
    assert any(line.startswith("clipsam: warning: skipped ") and "corrupt.png" in line for line in warnings), warnings
    assert len([line for line in warnings if "notes.txt" in line]) == 1, err[-3000:]
    # The kill's worst window: a file's row is in predictions.csv but its state entry is not yet
    # written; and a row cut in the middle. Both must come out as exactly one row per file.
    state = json.loads((run_dir / STATE_FILE).read_text())
    del state["files"]["a/second.png"]
    (run_dir / STATE_FILE).write_text(json.dumps(state))
    with (run_dir / "predictions.csv").open("a") as handle:
        handle.write(f"{folder / 'b' / 'late2.png'},capsule,caps")
    second_mask = (run_dir / "masks" / "a__second.png").read_bytes()

    # the restart runs in this process (a child's start-up costs seconds; only the kill needs one)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("CLIPSAM_SYNTH_ROOT", str(synth_root))
    capsys.readouterr()
    code = main(["predict", *args, "--watch", str(folder), f"--watch_settle_s={SETTLE_S}", f"--watch_interval_s={INTERVAL_S}", "--watch_once"])
    out, err = capsys.readouterr()
    assert code == 0, err[-3000:]
    assert f"-> {run_dir} (resuming: " in err, "the restart resumes the same folder"
    assert sorted(p.name for p in output.iterdir()) == [".clipsam-output", "version_0"]
    assert not (run_dir / "INCOMPLETE").exists(), "--watch_once ended normally"
    assert "corrupt.png" not in err, "a failed file is not retried while it is unchanged"
    assert "a/second.png" in out, "the file segmented but not recorded is segmented again"

    expected = {"a/first.png", "a/second.png", "b/third.png", "c/slow.png", "d/renamed.png", "a/late1.png", "b/late2.png"}
    rows = _rows(run_dir)
    paths = [row["path"] for row in rows]
    assert sorted(paths) == sorted(str(folder / rel) for rel in expected), "one row per file, no more"
    assert len(paths) == len(set(paths))
    files = _state(run_dir)
    assert {rel for rel, e in files.items() if e["status"] == "done"} == expected
    assert {rel for rel, e in files.items() if e["status"] == "failed"} == {"d/corrupt.png"}
    assert (run_dir / "masks" / "a__second.png").read_bytes() == second_mask, "re-segmenting rewrote the same mask"
    assert sorted(p.name for p in (run_dir / "masks").iterdir()) == sorted(Path(r["mask"]).name for r in rows)
    assert not list(run_dir.rglob(".clipsam-*")), "no temporary files left"

    # The same files through a plain `clipsam predict`: the same masks, scores and labels.
    plain_args = _model_args(tmp_path, demo_fit_ckpt, tmp_path / "plain")
    predict = run_cli(["predict", *plain_args, f"--data.predict_dir={folder}"])
    writer_cb = next(cb for cb in predict.trainer.callbacks if type(cb).__name__ == "PredictionWriter")
    plain = {row["path"]: row for row in _rows(writer_cb.run_dir)}
    assert sorted(plain) == sorted(paths)
    anomalous = 0
    for row in rows:
        other = plain[row["path"]]
        watched, predicted = _mask(row["mask"]), _mask(other["mask"])
        assert np.array_equal(watched, predicted), row["path"]
        assert Path(row["mask"]).name == Path(other["mask"]).name
        assert float(row["image_score"]) == pytest.approx(float(other["image_score"]), abs=1e-6)
        assert row["label"] == other["label"] and row["category"] == other["category"]
        anomalous += int(row["anomalous_pixels"])
    assert 0 < anomalous < len(rows) * 128 * 128, "the compared masks are neither all empty nor all full"


# ------------------------------------------------------------------ SIGTERM
def test_sigterm_stops_the_watch_between_images(tmp_path: Path, images: list[Path], demo_fit_ckpt: Path, synth_root: Path) -> None:
    folder = tmp_path / "in"
    folder.mkdir()
    for i, image in enumerate(images[:6]):
        shutil.copy(image, folder / f"{i}.png")
    output = tmp_path / "watch_out"
    proc = _start_watch(_model_args(tmp_path, demo_fit_ckpt, output), folder, tmp_path, synth_root)
    run_dir = output / "version_0"
    _wait_for(lambda: len(_rows(run_dir)) >= 1, proc, "the first image")
    os.killpg(proc.pid, signal.SIGTERM)
    code, _, err = _finish(proc, tmp_path)
    assert code == 143, err[-3000:]
    lines = [line for line in err.splitlines() if line.startswith("clipsam: stopped")]
    assert len(lines) == 1 and "Traceback" not in err, err[-3000:]
    assert lines[0].startswith("clipsam: stopped by SIGTERM: ") and str(run_dir) in lines[0], lines[0]
    rows = _rows(run_dir)
    files = _state(run_dir)
    assert 1 <= len(rows) <= 6 and f"{len(rows)} image(s) segmented this run" in lines[0], lines[0]
    assert sorted(row["path"] for row in rows) == sorted(str(folder / rel) for rel in files), "state and CSV agree"
    for row in rows:
        assert Path(row["mask"]).is_file() and Path(row["overlay"]).is_file()
    assert "SIGTERM" in (run_dir / "INCOMPLETE").read_text()
    assert not list(run_dir.rglob(".clipsam-*")), "no temporary files left"
