"""``clipsam predict --watch DIR``: segment image files as they arrive in a folder.

``clipsam predict --config ... [--ckpt_path ...] --watch DIR`` builds the model once (the same
config, checkpoint and checks as ``clipsam predict``) and then polls ``DIR`` (recursively, stdlib
only) for image files, writing for each one what ``clipsam predict`` writes for it (its mask, its
overlay and its ``predictions.csv`` row, by the same writer:
:func:`clipsam.callbacks.write_prediction`).

Options (all other options are ``clipsam predict``'s):

- ``--watch DIR``: the folder to watch (its sub-folders too; hidden folders, files whose names
  start with ``.`` or end in ``.tmp``/``.part``/``.crdownload``, and clipsam's own output folders
  are not read).
- ``--watch_settle_s S`` (default 0.5): a file is segmented once it is complete: its size and
  mtime have not changed for ``S`` seconds (it was last modified ``S`` seconds ago, or two polls
  ``S`` seconds apart saw the same size and mtime), or it was renamed from an ignored temporary
  name (``x.png.part`` -> ``x.png``) that the previous poll saw with the same size and mtime: a
  rename produces a complete file.
- ``--watch_interval_s S`` (default 0.5): seconds between two looks at the folder.
- ``--watch_once``: segment what is there (waiting for files still being written), then exit 0
  (tests, cron).

Where the results go: ``model.evaluation.predict_dir/version_N/`` as for ``clipsam predict``
(``masks/``, ``overlays/``, ``predictions.csv``, ``skipped.txt``, ``config.yaml``, ``run.json``,
``INCOMPLETE`` while it runs), plus :data:`STATE_FILE`. A restart of the same watch (same folder,
same model settings and checkpoint) resumes the newest ``version_N`` that watched it; other
settings get a fresh ``version_N``, so results of two models are never mixed and nothing is
overwritten.

Exactly once, across restarts and ``kill -9``: for each file, its outputs are written (each
atomically), then its ``predictions.csv`` row is appended (flushed and fsynced), then the state
file is rewritten atomically (temp file, fsync, ``os.replace``, fsync of the folder) with the
file's relative path, size and mtime_ns. A file in the state is never segmented again (a file
changed after it was segmented is reported once per run, not segmented again). A file segmented
but not yet recorded (killed between its row and the state) is segmented again on restart: its
outputs are rewritten with the same content and its row, already in ``predictions.csv``, is not
appended twice. A file that cannot be decoded is one warning line and recorded as failed (listed
in ``skipped.txt``); it is tried again only when its size or mtime changes.

SIGTERM and SIGINT (Ctrl+C) stop between images: the image in hand is finished and recorded, then
the command prints one line saying what was kept and exits with 143 (SIGTERM) or 130 (SIGINT); a
second Ctrl+C stops at once. One process writes a folder at a time (a lock file).
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import datetime
import errno
import fcntl
import hashlib
import json
import os
import signal
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from clipsam.errors import ConfigError, DatasetError

__all__ = [
    "IGNORED_SUFFIXES",
    "STATE_FILE",
    "WATCH_HELP",
    "FolderPoller",
    "WatchOptions",
    "WatchState",
    "split_watch_args",
    "watch_main",
]

STATE_FILE = "watch_state.json"
"""The state file in the run folder: every file segmented (or failed), by its path below DIR."""

LOCK_FILE = ".watch.lock"
"""Held (``flock``) by the process writing the run folder."""

STATE_FORMAT = "clipsam-watch-state"
STATE_VERSION = 1

#: Names of files still being written by their producer: ignored until renamed.
IGNORED_SUFFIXES = (".tmp", ".part", ".crdownload")

#: What ``clipsam predict --watch DIR --help`` prints.
WATCH_HELP = """usage: clipsam predict --config CONFIG [--ckpt_path CKPT] [--key.sub=value ...] --watch DIR
                       [--watch_settle_s 0.5] [--watch_interval_s 0.5] [--watch_once]

Segment image files as they arrive in DIR (and its sub-folders): masks, overlays and
predictions.csv rows as `clipsam predict` writes them, each file exactly once, also across
restarts (watch_state.json in the output folder model.evaluation.predict_dir/version_N).

  --watch DIR            the folder to watch
  --watch_settle_s S     a file is read once its size and mtime stay unchanged for S seconds
                         (default 0.5); files named .* or *.tmp / *.part / *.crdownload are
                         read only after they are renamed
  --watch_interval_s S   seconds between two looks at the folder (default 0.5)
  --watch_once           segment what is there, then exit

SIGTERM / Ctrl+C stop after the image in hand (exit 143 / 130). `clipsam predict --help` lists
every other option.
"""

#: Values ``--watch_once=...`` and the other boolean spellings accept.
_TRUE = ("true", "1", "yes", "on")
_FALSE = ("false", "0", "no", "off")


# ----------------------------------------------------------------------------- options
@dataclasses.dataclass
class WatchOptions:
    """The ``--watch*`` options of ``clipsam predict``.

    Attributes:
        directory: the watched folder, absolute (``~`` expanded, symlinks kept).
        settle_s: seconds a file's size and mtime must stay unchanged before it is segmented.
        interval_s: seconds between two polls of the folder.
        once: segment what is there, then exit.
    """

    directory: Path
    settle_s: float = 0.5
    interval_s: float = 0.5
    once: bool = False


def _option_value(args: Sequence[str], i: int) -> tuple[str, str | None, int]:
    """``(name, value, next index)`` of ``--name=value`` or ``--name value`` at ``args[i]``."""
    arg = args[i]
    if "=" in arg:
        name, value = arg.split("=", 1)
        return name, value, i + 1
    if i + 1 < len(args) and not args[i + 1].startswith("--"):
        return arg, args[i + 1], i + 2
    return arg, None, i + 1


def _seconds(name: str, value: str | None, *, minimum: float) -> float:
    try:
        seconds = float(value) if value is not None else float("nan")
    except ValueError:
        seconds = float("nan")
    if not seconds >= minimum or seconds == float("inf"):
        raise ConfigError(f"{name}={value}: give a number of seconds >= {minimum:g} (e.g. {name}=0.5)")
    return seconds


def split_watch_args(args: Sequence[str]) -> tuple[WatchOptions, list[str], str | None]:
    """Take the watch options and ``--ckpt_path`` out of ``clipsam predict``'s arguments.

    Returns:
        ``(options, rest, ckpt_path)``: ``rest`` is what the predict config parser reads.

    Raises:
        ConfigError: ``--watch`` without a folder, a bad number of seconds, a bad ``--watch_once``.
    """
    directory: str | None = None
    settle, interval, once = 0.5, 0.5, False
    ckpt_path: str | None = None
    rest: list[str] = []
    i = 0
    while i < len(args):
        arg = args[i]
        name = arg.split("=", 1)[0]
        if name == "--watch":
            _, directory, i = _option_value(args, i)
            if not directory:
                raise ConfigError("--watch needs the folder to watch: --watch DIR")
        elif name == "--watch_settle_s":
            _, value, i = _option_value(args, i)
            settle = _seconds(name, value, minimum=0.0)
        elif name == "--watch_interval_s":
            _, value, i = _option_value(args, i)
            interval = _seconds(name, value, minimum=0.01)
        elif name == "--watch_once":
            if "=" in arg:
                value = arg.split("=", 1)[1].strip().lower()
                if value not in _TRUE + _FALSE:
                    raise ConfigError(f"--watch_once={value}: use --watch_once (or --watch_once=true / false)")
                once = value in _TRUE
            else:
                once = True
            i += 1
        elif name == "--ckpt_path":
            _, ckpt_path, i = _option_value(args, i)
        else:
            rest.append(arg)
            i += 1
    if directory is None:
        raise ConfigError("--watch needs the folder to watch: --watch DIR")
    return WatchOptions(Path(os.path.abspath(os.path.expanduser(directory))), settle, interval, once), rest, ckpt_path


def check_watch_dir(directory: Path) -> None:
    """The watched folder exists, is a folder and can be listed.

    Raises:
        ConfigError: naming the path and the fix.
    """
    if not directory.exists():
        raise ConfigError(
            f"--watch {directory}: the folder does not exist: create it (mkdir -p {directory}) or pass the folder "
            "the images arrive in"
        )
    if not directory.is_dir():
        raise ConfigError(
            f"--watch {directory} is a file, not a folder: pass the folder the images arrive in "
            f"(one image: clipsam predict --data.predict_dir {directory})"
        )
    if not os.access(directory, os.R_OK | os.X_OK):
        raise ConfigError(f"--watch {directory}: the folder cannot be read (permission denied): make it readable for this user")


# ----------------------------------------------------------------------------- state
def _fsync_dir(folder: Path) -> None:
    """Make a rename in ``folder`` durable (a no-op where folders cannot be opened)."""
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _write_durably(path: Path, text: str) -> None:
    """Write ``text`` to a temp file next to ``path``, fsync it, rename it onto ``path``, fsync the folder."""
    from clipsam.io import atomic_write

    with atomic_write(path) as tmp, tmp.open("w") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    _fsync_dir(path.parent)


class WatchState:
    """:data:`STATE_FILE`: what a watch run folder has done, by file path below the watched folder.

    ``{"format", "version", "watch_dir", "settings", "files": {rel: {"status": "done"|"failed",
    "size", "mtime_ns", "name" (done: the output stem) | "reason" (failed)}}}``; rewritten
    atomically and durably after each file (:meth:`record`).
    """

    def __init__(self, path: Path, watch_dir: Path, settings: dict[str, Any], files: dict[str, dict[str, Any]] | None = None) -> None:
        self.path = path
        self.watch_dir = watch_dir
        self.settings = settings
        self.files: dict[str, dict[str, Any]] = dict(files or {})

    @staticmethod
    def read(path: Path) -> dict[str, Any] | None:
        """The state file's content, or None when it is missing or not a watch state."""
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            return None
        if not isinstance(data, dict) or data.get("format") != STATE_FORMAT or not isinstance(data.get("files"), dict):
            return None
        return data

    @classmethod
    def load(cls, path: Path, watch_dir: Path, settings: dict[str, Any]) -> WatchState:
        """The state in ``path`` (an empty one when there is none yet).

        Raises:
            ConfigError: the file exists but is not a readable watch state.
        """
        if not path.exists():
            return cls(path, watch_dir, settings)
        data = cls.read(path)
        if data is None:
            raise ConfigError(
                f"{path} is not a readable clipsam watch state (edited or damaged?): restore it, or move the folder "
                "away to start a fresh one (every file is then segmented again)"
            )
        return cls(path, watch_dir, settings, data["files"])

    def save(self) -> None:
        record = {
            "format": STATE_FORMAT,
            "version": STATE_VERSION,
            "watch_dir": str(self.watch_dir),
            "settings": self.settings,
            "files": self.files,
        }
        _write_durably(self.path, json.dumps(record, indent=1, sort_keys=True) + "\n")

    def record(self, rel: str, entry: dict[str, Any]) -> None:
        """Record one file (``entry``: status, size, mtime_ns, ...) and save at once."""
        self.files[rel] = entry
        self.save()

    @property
    def used_names(self) -> set[str]:
        return {str(e["name"]) for e in self.files.values() if e.get("status") == "done" and e.get("name")}

    def counts(self) -> tuple[int, int]:
        """``(done, failed)`` files recorded."""
        done = sum(1 for e in self.files.values() if e.get("status") == "done")
        return done, len(self.files) - done


# ----------------------------------------------------------------------------- polling
def is_ignored_name(name: str) -> bool:
    """A name the watch does not read (yet): hidden, or a temporary download/copy name."""
    return name.startswith(".") or name.lower().endswith(IGNORED_SUFFIXES)


@dataclasses.dataclass
class _Seen:
    key: tuple[int, int]  # (size, mtime_ns)
    since: float  # time.monotonic() when this key was first seen
    renamed: bool = False  # renamed from a temporary name seen earlier, unchanged since: complete


class FolderPoller:
    """Finds the complete image files below a folder, one poll at a time (stdlib only).

    Args:
        directory: the watched folder.
        settle_s: see :class:`WatchOptions`.
        skip_folders: sub-folder names whose files are not inputs (predict's mask folders).
    """

    def __init__(self, directory: Path, settle_s: float, *, skip_folders: frozenset[str] = frozenset()) -> None:
        self.directory = directory
        self.settle_s = settle_s
        self.skip_folders = skip_folders
        self._seen: dict[str, _Seen] = {}
        #: (device, inode) -> (size, mtime_ns) of the temporary-named files at the last poll
        self._temp_inodes: dict[tuple[int, int], tuple[int, int]] = {}
        self._warned: set[str] = set()
        #: files found that are not image files (reported once each)
        self.not_images: list[str] = []

    def _walk(self) -> Iterator[tuple[str, os.stat_result, bool]]:
        """``(path below the folder, stat, ignored name)`` of every file, folders once each."""
        from clipsam.callbacks import OUTPUT_MARKER

        seen_dirs: set[str] = set()
        for dirpath, dirnames, filenames in os.walk(self.directory, followlinks=True):
            real = os.path.realpath(dirpath)
            if real in seen_dirs or OUTPUT_MARKER in filenames:  # a link loop; clipsam's own outputs
                dirnames[:] = []
                continue
            seen_dirs.add(real)
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            base = Path(dirpath)
            relative_dir = base.relative_to(self.directory)
            if self.skip_folders & set(relative_dir.parts):
                continue
            for name in filenames:
                try:
                    stat = (base / name).stat()
                except OSError:  # gone (renamed, deleted) since the listing
                    continue
                yield (relative_dir / name).as_posix(), stat, is_ignored_name(name)

    def poll(self, done: dict[str, dict[str, Any]]) -> tuple[list[tuple[str, os.stat_result]], int]:
        """Look at the folder once.

        Args:
            done: the state's files (skipped: done ones always, failed ones until they change).

        Returns:
            ``(ready, waiting)``: the complete files to segment now, sorted by path, with their
            stat; how many other image files are still being written.
        """
        from clipsam.data.samples import is_image_file

        now_wall, now_mono = time.time(), time.monotonic()
        temp_inodes: dict[tuple[int, int], tuple[int, int]] = {}
        ready: list[tuple[str, os.stat_result]] = []
        waiting = 0
        present: set[str] = set()
        for rel, stat, ignored in self._walk():
            inode = (stat.st_dev, stat.st_ino)
            key = (stat.st_size, stat.st_mtime_ns)
            if ignored:
                temp_inodes[inode] = key
                continue
            if not is_image_file(Path(rel)):
                if rel not in self._warned:
                    self._warned.add(rel)
                    self.not_images.append(rel)
                continue
            present.add(rel)
            entry = done.get(rel)
            if entry is not None:
                if (entry.get("size"), entry.get("mtime_ns")) == key:
                    continue
                if entry.get("status") == "done":
                    if f"changed:{rel}" not in self._warned:
                        self._warned.add(f"changed:{rel}")
                        print(
                            f"clipsam: warning: {self.directory / rel} changed after it was segmented: not segmented "
                            "again (give the new image a new name)",
                            file=sys.stderr,
                            flush=True,
                        )
                    continue
                # failed before and changed since: try again once it is complete
            seen = self._seen.get(rel)
            if seen is None or seen.key != key:
                seen = self._seen[rel] = _Seen(key, now_mono)
            # Renamed from a temporary name seen at the last poll, unchanged since (same inode, size
            # and mtime_ns: never a new file that happens to reuse a deleted temp file's inode).
            seen.renamed = seen.renamed or self._temp_inodes.get(inode) == key
            quiet_for = now_wall - stat.st_mtime_ns / 1e9
            if seen.renamed or quiet_for >= self.settle_s or now_mono - seen.since >= self.settle_s:
                ready.append((rel, stat))
            else:
                waiting += 1
        self._temp_inodes = temp_inodes
        for rel in list(self._seen):
            if rel not in present:
                del self._seen[rel]
        return sorted(ready, key=lambda item: item[0]), waiting

    def forget(self, rel: str) -> None:
        """Watch ``rel`` from scratch (it changed while it was read)."""
        self._seen.pop(rel, None)


# ----------------------------------------------------------------------------- signals
class StopSignals:
    """SIGTERM and SIGINT set :attr:`received` instead of stopping at once (a second SIGINT
    raises ``KeyboardInterrupt``); the previous handlers come back on exit."""

    def __init__(self) -> None:
        self.received: str | None = None
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: Any) -> None:
        name = signal.Signals(signum).name
        if self.received == "SIGINT" and name == "SIGINT":
            raise KeyboardInterrupt
        if self.received is None:
            self.received = name
            if name == "SIGINT":
                print("clipsam: finishing the image in hand, then stopping (Ctrl+C again stops at once)", file=sys.stderr, flush=True)

    def __enter__(self) -> StopSignals:
        for signum in (signal.SIGTERM, signal.SIGINT):
            try:
                self._previous[signum] = signal.signal(signum, self._handle)
            except ValueError:  # not the main thread: the caller's handlers stay
                pass
        return self

    def __exit__(self, *exc: object) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)

    def sleep(self, seconds: float) -> None:
        """Sleep up to ``seconds``, waking early when a stop signal arrives."""
        end = time.monotonic() + seconds
        while self.received is None:
            left = end - time.monotonic()
            if left <= 0:
                return
            time.sleep(min(left, 0.05))


# ----------------------------------------------------------------------------- run folder
def _lock(run_dir: Path) -> Any:
    """Hold the run folder's lock file for this process (released when the process ends).

    Raises:
        ConfigError: another process holds it.
    """
    handle = (run_dir / LOCK_FILE).open("a+")
    try:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as err:
        handle.seek(0)
        holder = handle.read().strip() or "another process"
        handle.close()
        if err.errno in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
            raise ConfigError(
                f"{run_dir} is being written by another `clipsam predict --watch` ({holder}): stop that one first, "
                "or set another model.evaluation.predict_dir"
            ) from None
        raise
    handle.seek(0)
    handle.truncate()
    handle.write(f"pid {os.getpid()}\n")
    handle.flush()
    return handle


def _find_run_dir(output_root: Path, watch_dir: Path, settings: dict[str, Any]) -> Path | None:
    """The newest ``version_N`` below ``output_root`` that watched ``watch_dir`` with ``settings``."""
    if not output_root.is_dir():
        return None
    candidates = []
    for child in output_root.iterdir():
        if child.name.startswith("version_") and child.name[len("version_") :].isdigit() and child.is_dir():
            candidates.append((int(child.name[len("version_") :]), child))
    for _, child in sorted(candidates, reverse=True):
        data = WatchState.read(child / STATE_FILE)
        if data is not None and data.get("watch_dir") == str(watch_dir) and data.get("settings") == settings:
            return child
    return None


def _settings(cli: Any, ckpt_sha256: str | None) -> dict[str, Any]:
    """What decides a watch's outputs: the model section (less its output folder), the data
    settings that change the images, the precision, and the checkpoint's sha256. A restart with
    the same resumes the folder; other settings start a fresh one."""
    import yaml

    dumped = yaml.safe_load(cli.parser.dump(cli.config, skip_none=False)) or {}
    model = dumped.get("model") or {}
    evaluation = model.get("evaluation")
    if isinstance(evaluation, dict):
        evaluation.pop("predict_dir", None)
    data = dumped.get("data") or {}
    keys = ("image_size", "tiling", "predict_category", "bit_depth", "color_order", "max_image_pixels", "sam_image_size")
    summary = {
        "model": model,
        "data": {key: data.get(key) for key in keys},
        "precision": str((dumped.get("trainer") or {}).get("precision")),
    }
    thresholds = evaluation.get("thresholds") if isinstance(evaluation, dict) else None
    if thresholds and Path(os.path.expanduser(str(thresholds))).is_file():  # the file's content decides too
        from clipsam.runs import file_sha256

        summary["thresholds_sha256"] = file_sha256(Path(os.path.expanduser(str(thresholds))))
    digest = hashlib.sha256(json.dumps(summary, sort_keys=True, default=str).encode()).hexdigest()
    return {"config_sha256": digest, "checkpoint_sha256": ckpt_sha256}


# ----------------------------------------------------------------------------- the watcher
class Watcher:
    """Segment the complete image files of a folder, each exactly once per run folder.

    Args:
        module: a :class:`~clipsam.module.ClipSamModule` with its models built, adapters and
            thresholds loaded, on ``device``, in eval mode.
        options: the watch options.
        run_dir: the run folder (locked by this process).
        state: its :class:`WatchState`.
        device: where the module runs.
        category: ``data.predict_category`` (None: each file's parent folder name, as predict).
        bit_depth: ``data.bit_depth``.
        forward_context: a context manager factory around the forward (the trainer precision's).
        skip_folders: see :class:`FolderPoller`.
    """

    def __init__(
        self,
        module: Any,
        options: WatchOptions,
        run_dir: Path,
        state: WatchState,
        *,
        device: Any,
        category: str | None,
        bit_depth: int | None,
        forward_context: Any = contextlib.nullcontext,
        skip_folders: frozenset[str] = frozenset(),
    ) -> None:
        from clipsam.callbacks import PredictionWriter, prediction_mask_source

        self.module = module
        self.options = options
        self.run_dir = run_dir
        self.state = state
        self.device = device
        self.category = category
        self.bit_depth = bit_depth
        self.forward_context = forward_context
        self.poller = FolderPoller(options.directory, options.settle_s, skip_folders=skip_folders)
        self.mask_source = prediction_mask_source(module)
        self.fields = PredictionWriter.FIELDS
        self.csv_path = run_dir / "predictions.csv"
        self.csv_paths = self._read_csv_paths()
        self.segmented = 0  # this run
        self.failed = 0  # this run

    # ------------------------------------------------------------------ predictions.csv
    def _read_csv_paths(self) -> set[str]:
        """The ``path`` column of predictions.csv; a torn last line (a kill mid-write) is cut off
        first (its file is not in the state, so it is segmented again and its row rewritten)."""
        raw = self.csv_path.read_bytes() if self.csv_path.exists() else b""
        if raw and not raw.endswith(b"\n"):
            raw = raw[: raw.rfind(b"\n") + 1]
            with self.csv_path.open("r+b") as handle:
                handle.truncate(len(raw))
                handle.flush()
                os.fsync(handle.fileno())
        if not raw.strip():
            with self.csv_path.open("w", newline="") as handle:
                csv.DictWriter(handle, fieldnames=self.fields).writeheader()
                handle.flush()
                os.fsync(handle.fileno())
            return set()
        with self.csv_path.open(newline="") as handle:
            return {row["path"] for row in csv.DictReader(handle) if row.get("path")}

    def _append_row(self, row: dict[str, Any]) -> None:
        """Append one row, flushed and fsynced (a row already there is not written twice)."""
        if row["path"] in self.csv_paths:
            return
        try:
            with self.csv_path.open("a", newline="") as handle:
                csv.DictWriter(handle, fieldnames=self.fields).writerow(row)
                handle.flush()
                os.fsync(handle.fileno())
        except OSError as err:  # a full disk: say which file
            err.filename = err.filename or str(self.csv_path)
            raise
        self.csv_paths.add(row["path"])

    # ------------------------------------------------------------------ one file
    def _output_name(self, rel: str) -> str:
        """The output stem of ``rel`` as predict names it (path below the folder, '/' -> '__'),
        made unique against the names already recorded."""
        from clipsam.callbacks import output_name

        relative = Path(rel)
        name = output_name("__".join((*relative.parent.parts, relative.stem)))
        used = self.state.used_names
        candidate, n = name, 1
        while candidate in used:
            n += 1
            candidate = output_name(f"{name}_{n}")
        return candidate

    def _fail(self, rel: str, stat: os.stat_result, reason: str) -> None:
        reason = " ".join(reason.split())
        path = self.options.directory / rel
        print(f"clipsam: warning: skipped {path}: {reason}", file=sys.stderr, flush=True)
        with (self.run_dir / "skipped.txt").open("a") as handle:
            handle.write(f"{path}\t{reason}\n")
        self.state.record(rel, {"status": "failed", "size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "reason": reason})
        self.failed += 1

    def process(self, rel: str, stat: os.stat_result) -> bool:
        """Segment one complete file, write its outputs and row, then record it.

        Returns:
            False when the file changed while it was read (it is watched again), else True.
        """
        import torch

        from clipsam.callbacks import write_prediction
        from clipsam.data.samples import read_image
        from clipsam.loading import quiet
        from clipsam.pipeline import prediction_record

        path = self.options.directory / rel
        try:
            original = read_image(path, bit_depth=self.bit_depth)
        except DatasetError as err:
            try:
                after = path.stat()
            except OSError:
                self.poller.forget(rel)  # gone while read: nothing to record
                return False
            if (after.st_size, after.st_mtime_ns) != (stat.st_size, stat.st_mtime_ns):
                self.poller.forget(rel)
                return False
            self._fail(rel, stat, str(err))
            return True
        try:
            after = path.stat()
        except OSError:
            self.poller.forget(rel)
            return False
        if (after.st_size, after.st_mtime_ns) != (stat.st_size, stat.st_mtime_ns):
            self.poller.forget(rel)  # still being written after all: wait until it settles
            return False
        category = self.category or path.parent.name
        pipeline = self.module.pipeline
        batch = pipeline.make_batch([original], [category], paths=[str(path)])
        batch = {k: v.to(self.device) if isinstance(v, torch.Tensor) and k != "original_size" else v for k, v in batch.items()}
        with torch.inference_mode(), self.forward_context(), quiet():
            record = prediction_record(batch, self.module.decide(batch, self.module.inference(batch)))
        name = self._output_name(rel)
        row = write_prediction(
            self.run_dir,
            record,
            0,
            name=name,
            display_name=rel,
            mask_source=self.mask_source,
            bit_depth=self.bit_depth,
            original=original,
        )
        self._append_row(row)
        self.state.record(rel, {"status": "done", "size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "name": name})
        self.segmented += 1
        decision = "ANOMALOUS" if int(row["label"]) else "normal"
        print(f"clipsam: {rel}: {decision} (score {float(row['image_score']):.3f}) -> masks/{name}.png", flush=True)
        return True

    # ------------------------------------------------------------------ the loop
    def run(self, signals: StopSignals) -> None:
        """Poll and segment until a stop signal (or, with ``once``, until nothing is left)."""
        reported = 0
        while signals.received is None:
            ready, waiting = self.poller.poll(self.state.files)
            for rel in self.poller.not_images[reported:]:
                print(f"clipsam: warning: not an image file, not segmented: {self.options.directory / rel}", file=sys.stderr, flush=True)
            reported = len(self.poller.not_images)
            changed = False
            for rel, stat in ready:
                if signals.received is not None:
                    return
                if not self.process(rel, stat):
                    changed = True
            if self.options.once and not ready and not waiting and not changed:
                return
            if not ready or changed:
                signals.sleep(self.options.interval_s)


# ----------------------------------------------------------------------------- entry point
def _build(rest: list[str], ckpt_path: str | None, options: WatchOptions) -> tuple[Any, Any, Any, Any]:
    """Parse the predict arguments with clipsam's CLI and build the model as predict does.

    Returns:
        ``(cli, module, checkpoint choice, device)``.
    """
    from clipsam import runs
    from clipsam.lightning_cli import build_cli
    from clipsam.loading import load_checkpoint, quiet
    from clipsam.model_config import check_precision

    # The logger is predict's business only when it writes W&B: a watch writes files only.
    cli = build_cli([*rest, "--trainer.logger=false"], run=False)
    module, trainer = cli.model, cli.trainer
    module.check_stage("predict")
    pipeline = module.pipeline
    if pipeline.batching == "category":
        raise ConfigError(
            f"model.method={module.method} scores each image against the other images of its category, so it "
            "cannot segment images one by one as they arrive: use clipsam predict on the whole folder"
        )
    if pipeline.reference_count:
        raise ConfigError(
            f"model.method={module.method} needs good reference images per category, which --watch does not draw: "
            "use clipsam predict, or clipsam.Segmenter with references="
        )
    runs.check_output_folders(trainer, module, "predict", predict_input=str(options.directory))
    ckpt = runs.resolve_ckpt_path(
        ckpt_path,
        subcommand="predict",
        allow_untrained=bool(cli.config.get("allow_untrained", False)),
        trainer=trainer,
        model=module,
    )
    module.checkpoint_record = ckpt.record()
    runs.check_sam_weights(module, "predict")
    check_precision(str(trainer.precision))
    with quiet():
        module.configure_model()
        # predict sees each image once: no embedding cache unless asked for (as predict).
        pipeline.build_refiner(use_embedding_cache=bool(module.eval_config.predict_embedding_cache))
        if ckpt.path is not None:
            module.on_load_checkpoint(load_checkpoint(Path(ckpt.path)))
        module.load_thresholds()
    device = trainer.strategy.root_device
    module.to(device).eval()
    return cli, module, ckpt, device


def _open_run_dir(cli: Any, module: Any, options: WatchOptions, settings: dict[str, Any], ckpt: Any) -> tuple[Path, Any, bool]:
    """Resume the watch's run folder or reserve a fresh ``version_N``; lock it.

    Returns:
        ``(run_dir, lock handle, resumed)``.
    """
    from clipsam.callbacks import OUTPUT_MARKER
    from clipsam.io import next_version_dir

    output_root = Path(os.path.expanduser(module.eval_config.predict_dir)).absolute()
    run_dir = _find_run_dir(output_root, options.directory, settings)
    resumed = run_dir is not None
    if run_dir is None:
        run_dir = next_version_dir(output_root)
    marker = output_root / OUTPUT_MARKER
    if not marker.exists():
        marker.write_text("clipsam predict outputs: never read as input by clipsam\n")
    lock = _lock(run_dir)
    started = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    (run_dir / "INCOMPLETE").write_text(
        f"clipsam predict --watch {options.directory} started {started} (pid {os.getpid()}) and is running or did not "
        f"stop cleanly; {STATE_FILE} lists the files done: run the same command again to go on\n"
    )
    if not resumed:
        cli.parser.save(cli.config, str(run_dir / "config.yaml"), skip_none=False, overwrite=False)
        from clipsam.io import atomic_write

        record = {"checkpoint": ckpt.record(), "predict_dir": str(options.directory), "watch": True}
        with atomic_write(run_dir / "run.json") as tmp:
            tmp.write_text(json.dumps(record, indent=2))
    (run_dir / "masks").mkdir(exist_ok=True)
    (run_dir / "overlays").mkdir(exist_ok=True)
    return run_dir, lock, resumed


def watch_main(args: list[str]) -> int:
    """``clipsam predict ... --watch DIR``: see the module docstring.

    Exit status (through :func:`clipsam.lightning_cli.run`): 0 after ``--watch_once``; 143 on
    SIGTERM and 130 on SIGINT, after the image in hand, with one line saying what was kept; 2 for
    an error the user can fix (the folder missing or a file, every ``clipsam predict`` check).
    """
    from clipsam import runs
    from clipsam.data.datamodule import AnomalyDataModule

    if "-h" in args or "--help" in args:
        print(WATCH_HELP, end="")
        return 0
    options, rest, ckpt_path = split_watch_args(args)
    check_watch_dir(options.directory)
    with StopSignals() as signals:
        cli, module, ckpt, device = _build(rest, ckpt_path, options)
        if signals.received is not None:  # while the model was built: nothing is written yet
            raise runs.Stopped(signals.received, "before any image was segmented; nothing was written")
        settings = _settings(cli, ckpt.sha256)
        run_dir, lock, resumed = _open_run_dir(cli, module, options, settings, ckpt)
        try:
            state = WatchState.load(run_dir / STATE_FILE, options.directory, settings)
            if not state.path.exists():
                state.save()
            done, failed = state.counts()
            resume = f"resuming: {done} file(s) done, {failed} failed before" if resumed else "new folder"
            print(f"clipsam: watching {options.directory} -> {run_dir} ({resume})", file=sys.stderr, flush=True)
            datamodule = cli.datamodule
            watcher = Watcher(
                module,
                options,
                run_dir,
                state,
                device=device,
                category=getattr(datamodule, "predict_category", None),
                bit_depth=getattr(datamodule, "bit_depth", None),
                forward_context=cli.trainer.precision_plugin.forward_context,
                skip_folders=AnomalyDataModule.MASK_FOLDERS,
            )
            watcher.run(signals)
        except BaseException as err:
            reason = "interrupted (Ctrl+C)" if isinstance(err, KeyboardInterrupt) else f"failed: {runs.one_line(err)}"
            with contextlib.suppress(OSError):
                (run_dir / "INCOMPLETE").write_text(f"clipsam predict --watch {reason}; run the same command again to go on\n")
            raise
        finally:
            lock.close()
        done, failed = state.counts()
        kept = (
            f"{watcher.segmented} image(s) segmented this run ({done} in all, {failed} failed), written to {run_dir} "
            f"and listed in its predictions.csv and {STATE_FILE}"
        )
        if signals.received is not None:
            with contextlib.suppress(OSError):
                (run_dir / "INCOMPLETE").write_text(
                    f"clipsam predict --watch stopped by {signals.received}: {kept}; run the same command again to go on\n"
                )
            raise runs.Stopped(signals.received, f"{kept}; run the same command again to go on")
        (run_dir / "INCOMPLETE").unlink(missing_ok=True)
        print(f"clipsam: watch: {kept}", file=sys.stderr, flush=True)
    return 0
