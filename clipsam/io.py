"""Small file-system helpers shared by the package: atomic writes and versioned directories.

Checkpoints, caches and reports are written through :func:`atomic_write` (temp file in the same
directory, then ``os.replace``) so an interrupted run never leaves a half-written file that a
later run would load. Output directories come from :func:`next_version_dir` so that nothing a
user already has is overwritten.
"""

from __future__ import annotations

import contextlib
import errno
import os
import pickle
import re
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from clipsam.errors import WeightsError

__all__ = ["atomic_torch_save", "atomic_write", "next_version_dir", "rich_console", "safe_torch_load"]

#: Width of clipsam's console output when stdout is not a terminal and ``COLUMNS`` is unset
#: (Rich would use 80 and break long lines, paths included, mid-word).
PIPE_WIDTH = 200


def rich_console(**kwargs: Any) -> Any:
    """A Rich console that never breaks a line inside a path.

    ``soft_wrap=True``: printed text is never cut into lines by Rich (a terminal wraps long lines
    itself, so a copied path stays whole). When stdout is not a terminal (a log file, a pipe, CI)
    and ``COLUMNS`` is unset, tables are laid out for :data:`PIPE_WIDTH` columns instead of Rich's
    80. ``COLUMNS`` or an explicit ``width`` wins.
    """
    import sys

    from rich.console import Console

    kwargs.setdefault("soft_wrap", True)
    if "width" not in kwargs and not os.environ.get("COLUMNS"):
        stream = kwargs.get("file") or sys.stdout
        isatty = getattr(stream, "isatty", None)
        if not (callable(isatty) and isatty()):
            kwargs["width"] = PIPE_WIDTH
    return Console(**kwargs)


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success rename it onto ``path``.

    On an exception the temporary file is removed and ``path`` is left as it was. The temporary
    name is short (``.clipsam-XXXXXXXX.tmp``, not derived from ``path``), so a target whose name
    is already near the file system's 255-byte limit can still be written. An ``OSError`` that
    names no file or the temporary one (a write on a full disk names none) is re-raised naming
    ``path``, so the user learns which output could not be written.
    """
    target = Path(path)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=".clipsam-", suffix=".tmp", dir=target.parent)
    except OSError as err:
        _naming(err, target)
        raise
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        # mkstemp creates 0600; the result should be readable as the umask says, like open() files.
        os.chmod(tmp, 0o666 & ~_umask())
        yield tmp
        os.replace(tmp, target)
    except OSError as err:
        _naming(err, target, tmp)
        raise
    finally:
        if tmp.exists():
            with contextlib.suppress(OSError):
                tmp.unlink()


def _naming(err: OSError, target: Path, tmp: Path | None = None) -> OSError:
    """``err``, naming ``target`` when it named no file or the temporary one."""
    if err.filename is None or (tmp is not None and str(err.filename) == str(tmp)):
        err.filename = str(target)
    return err


def _umask() -> int:
    """The process umask (read by setting and restoring it)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_torch_save(obj: Any, path: str | os.PathLike[str]) -> None:
    """``torch.save`` that never leaves a partial file at ``path``.

    A failing write is one ``OSError`` naming ``path``, never torch's ``RuntimeError: [enforce
    fail at inline_container.cc] unexpected pos`` traceback: the write's own ``OSError`` when
    torch wrote through Python (its cause), ``ENOSPC`` when the disk is (nearly) full, else
    ``EIO`` saying what torch reported.

    Raises:
        OSError: naming ``path``.
    """
    with atomic_write(path) as tmp:
        try:
            torch.save(obj, tmp)
        except RuntimeError as err:
            cause = _os_error_in(err)
            if cause is not None:
                raise OSError(cause.errno, cause.strerror or str(cause), str(path)) from err
            message = str(err)
            if not any(word in message.lower() for word in ("write", "inline_container", "unexpected pos")):
                raise
            if _nearly_full(tmp.parent):
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path)) from err
            first = next((line.strip() for line in message.splitlines() if line.strip()), "")
            raise OSError(errno.EIO, f"torch could not write the file ({first[:200]})", str(path)) from err


def _os_error_in(err: BaseException) -> OSError | None:
    """The OSError behind ``err`` (its cause or context chain), if any."""
    seen = set()
    current: BaseException | None = err
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, OSError):
            return current
        current = current.__cause__ or current.__context__
    return None


def _nearly_full(folder: Path) -> bool:
    try:
        stats = os.statvfs(folder)
    except OSError:
        return False
    return stats.f_bavail * stats.f_frsize < (1 << 20)


def _load_failure(err: BaseException) -> str:
    """Why a weights-only load failed, in words; never PyTorch's advice to disable the check."""
    text = str(err)
    unsupported = re.search(r"Unsupported global: GLOBAL ([\w.]+)", text)
    if isinstance(err, pickle.UnpicklingError) or unsupported:
        found = f" ({unsupported.group(1)})" if unsupported else ""
        return (
            f"it holds Python objects other than tensors and plain data{found}, which clipsam never "
            "loads because loading them can run code"
        )
    if isinstance(err, EOFError) or any(
        marker in text for marker in ("PytorchStreamReader", "zip archive", "central directory", "unexpected EOF")
    ):
        return "the file is truncated or not a PyTorch file"
    first = next((line for line in text.splitlines() if line.strip() and "weights_only" not in line), "")
    return f"{type(err).__name__}: {first}" if first else type(err).__name__


def safe_torch_load(path: str | os.PathLike[str], *, what: str = "checkpoint", map_location: Any = "cpu") -> Any:
    """``torch.load(path, weights_only=True)`` with one clear :class:`WeightsError` on failure.

    ``weights_only=True`` is passed explicitly, so ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD`` in the
    environment cannot turn it off: a crafted file never runs code.

    Raises:
        WeightsError: the file is missing, truncated, or holds more than tensors and plain data.
    """
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except FileNotFoundError as err:
        raise WeightsError(f"{what} file {path} does not exist") from err
    except IsADirectoryError as err:
        raise WeightsError(f"{what} path {path} is a folder: pass the file") from err
    except Exception as err:
        raise WeightsError(
            f"cannot load {what} {path} safely: {_load_failure(err)}; pass a {what} written by clipsam "
            "(`clipsam fit` writes runs/<name>/version_N/checkpoints/*.ckpt)"
        ) from err


_VERSION_RE = re.compile(r"^version_(\d+)$")


def next_version_dir(root: str | os.PathLike[str], *, create: bool = True) -> Path:
    """Return ``root/version_N`` with N one more than the largest existing version.

    The directory is created with ``exist_ok=False`` (retrying on a race), so two runs never
    share one and nothing earlier is overwritten.
    """
    base = Path(root)
    base.mkdir(parents=True, exist_ok=True)
    while True:
        versions = [int(m.group(1)) for p in base.iterdir() if (m := _VERSION_RE.match(p.name))]
        candidate = base / f"version_{max(versions, default=-1) + 1}"
        if not create:
            return candidate
        try:
            candidate.mkdir(parents=False, exist_ok=False)
            return candidate
        except FileExistsError:
            continue
