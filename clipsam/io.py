"""Small file-system helpers shared by the package: atomic writes and versioned directories.

Checkpoints, caches and reports are written through :func:`atomic_write` (temp file in the same
directory, then ``os.replace``) so an interrupted run never leaves a half-written file that a
later run would load. Output directories come from :func:`next_version_dir` so that nothing a
user already has is overwritten.
"""

from __future__ import annotations

import contextlib
import os
import re
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

__all__ = ["atomic_write", "atomic_torch_save", "next_version_dir"]


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success rename it onto ``path``.

    On an exception the temporary file is removed and ``path`` is left as it was.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    # mkstemp creates 0600; the result should be readable as the umask says, like open() files.
    os.chmod(tmp, 0o666 & ~_umask())
    try:
        yield tmp
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            tmp.unlink()


def _umask() -> int:
    """The process umask (read by setting and restoring it)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_torch_save(obj: Any, path: str | os.PathLike[str]) -> None:
    """``torch.save`` that never leaves a partial file at ``path``."""
    with atomic_write(path) as tmp:
        torch.save(obj, tmp)


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
