"""Download, verify and extract the real datasets (MVTec-AD, VisA), with the standard library.

The URLs and sha256 sums are the ones anomalib uses (``DOWNLOAD_INFO`` in
``src/anomalib/data/datamodules/image/{mvtecad,visa}.py``). A download goes to ``<file>.part``
and resumes from its size with an HTTP ``Range`` request; the finished file is checked against its
sha256 (a mismatch keeps the file, renamed ``<file>.sha256-mismatch``, and raises); the archive
is extracted with tarfile's ``data`` filter (no absolute paths, no ``..``, no device files), and
:func:`detect_layout` checks that what came out is the dataset asked for. VisA is read in place
(:mod:`clipsam.data.visa`), nothing is converted.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tarfile
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from tqdm.auto import tqdm

from clipsam.errors import DatasetError

__all__ = [
    "DATASETS",
    "DownloadInfo",
    "detect_layout",
    "download_dataset",
    "download_file",
    "extract_archive",
    "sha256sum",
]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DownloadInfo:
    """Where a dataset archive lives and how to check it.

    Attributes:
        name: human-readable dataset name.
        url: archive URL.
        filename: archive file name on disk.
        sha256: expected sha256 hex digest; None skips the check with a warning.
    """

    name: str
    url: str
    filename: str
    sha256: str | None


DATASETS: dict[str, DownloadInfo] = {
    "mvtec": DownloadInfo(
        name="MVTec-AD",
        url="https://www.mydrive.ch/shares/38536/3830184030e49fe74747669442f0f282/"
        "download/420938113-1629952094/mvtec_anomaly_detection.tar.xz",
        filename="mvtec_anomaly_detection.tar.xz",
        sha256="cf4313b13603bec67abb49ca959488f7eedce2a9f7795ec54446c649ac98cd3d",
    ),
    "visa": DownloadInfo(
        name="VisA",
        url="https://amazon-visual-anomaly.s3.us-west-2.amazonaws.com/VisA_20220922.tar",
        filename="VisA_20220922.tar",
        sha256="2eb8690c803ab37de0324772964100169ec8ba1fa3f7e94291c9ca673f40f362",
    ),
}

Opener = Callable[[urllib.request.Request], Any]


def sha256sum(path: str | os.PathLike[str], *, chunk_size: int = 1 << 20) -> str:
    """Hex sha256 digest of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()


def _verify(path: Path, expected: str | None) -> None:
    if expected is None:
        log.warning("no sha256 known for %s; its sha256 is %s (not verified)", path, sha256sum(path))
        return
    actual = sha256sum(path)
    if actual != expected.lower():
        bad = path.with_name(path.name + ".sha256-mismatch")
        os.replace(path, bad)
        raise DatasetError(
            f"sha256 of {path} is {actual}, expected {expected}: the download is corrupt or the "
            f"file changed upstream; it was kept as {bad} — delete it and download again"
        )


def download_file(
    url: str,
    dest: str | os.PathLike[str],
    *,
    sha256: str | None = None,
    progress: bool = True,
    chunk_size: int = 1 << 20,
    opener: Opener | None = None,
) -> Path:
    """Download ``url`` to ``dest``, resuming a partial ``dest.part``, then check its sha256.

    An existing ``dest`` whose sha256 matches is reused without any request. The server must
    answer a ``Range`` request with 206 to resume; any other answer restarts from byte 0.

    Args:
        url: http(s) or file URL.
        dest: final file path.
        sha256: expected hex digest; None skips the check (with a warning giving the digest).
        progress: show a tqdm progress bar (bytes).
        chunk_size: read size in bytes.
        opener: ``opener(request) -> response`` (default ``urllib.request.urlopen``); tests
            pass a fake.

    Returns:
        ``dest`` as a Path.

    Raises:
        DatasetError: network error, or sha256 mismatch (the bad file is kept, renamed).
    """
    target = Path(dest)
    target.parent.mkdir(parents=True, exist_ok=True)
    if target.is_file():
        _verify(target, sha256)
        return target
    part = target.with_name(target.name + ".part")
    open_url = opener or urllib.request.urlopen
    start = part.stat().st_size if part.is_file() else 0
    request = urllib.request.Request(url, headers={"User-Agent": "clipsam"})
    if start:
        request.add_header("Range", f"bytes={start}-")
    try:
        try:
            response = open_url(request)
        except urllib.error.HTTPError as exc:
            if exc.code != 416 or not start:  # 416: the part file is already complete
                raise
            response = None
        if response is not None:
            with response:
                status = getattr(response, "status", None) or response.getcode()
                resumed = start > 0 and status == 206
                if start and not resumed:
                    log.info("server ignored the Range request for %s: restarting from byte 0", url)
                    start = 0
                length = response.headers.get("Content-Length") if response.headers else None
                total = start + int(length) if length is not None else None
                with (
                    open(part, "ab" if resumed else "wb") as out,
                    tqdm(
                        total=total, initial=start, unit="B", unit_scale=True, desc=target.name, disable=not progress
                    ) as bar,
                ):
                    while chunk := response.read(chunk_size):
                        out.write(chunk)
                        bar.update(len(chunk))
    except (urllib.error.URLError, OSError) as exc:
        raise DatasetError(
            f"downloading {url} to {part} failed ({exc}): check the network and run the same "
            "command again to resume"
        ) from exc
    os.replace(part, target)
    _verify(target, sha256)
    return target


def extract_archive(archive: str | os.PathLike[str], dest: str | os.PathLike[str], *, progress: bool = True) -> Path:
    """Extract a tar archive (any compression) into ``dest`` with tarfile's safe ``data`` filter.

    Raises:
        DatasetError: the archive is unreadable or holds unsafe members (absolute paths,
            ``..``, links out of ``dest``, device files).
    """
    out = Path(dest)
    out.mkdir(parents=True, exist_ok=True)
    try:
        with tarfile.open(archive, mode="r:*") as tar:
            members = tar.getmembers()
            for member in tqdm(members, desc=f"extracting {Path(archive).name}", unit="file", disable=not progress):
                tar.extract(member, out, filter="data")
    except (tarfile.TarError, OSError) as exc:
        raise DatasetError(
            f"cannot extract {archive} into {out} ({exc}): delete the archive and download it again"
        ) from exc
    return out


def detect_layout(root: str | os.PathLike[str]) -> Literal["mvtec", "visa"]:
    """Which dataset layout ``root`` holds.

    VisA: ``root/split_csv/1cls.csv`` exists. MVTec-AD: some sub-folder has ``test/`` and
    ``ground_truth/`` (or ``train/good/``).

    Raises:
        DatasetError: neither layout is found (the message lists what ``root`` contains).
    """
    base = Path(os.path.expanduser(os.fspath(root)))
    if not base.is_dir():
        raise DatasetError(f"dataset root {base} does not exist")
    if (base / "split_csv" / "1cls.csv").is_file():
        return "visa"
    for sub in base.iterdir():
        if sub.is_dir() and (
            ((sub / "test").is_dir() and (sub / "ground_truth").is_dir()) or (sub / "train" / "good").is_dir()
        ):
            return "mvtec"
    content = ", ".join(sorted(p.name for p in base.iterdir())[:10]) or "(empty)"
    raise DatasetError(
        f"{base} holds neither an MVTec-AD layout (<category>/test, <category>/ground_truth) nor a "
        f"VisA layout (split_csv/1cls.csv); it contains: {content}. Point the root at the extracted dataset"
    )


def download_dataset(
    name: Literal["mvtec", "visa"],
    root: str | os.PathLike[str],
    *,
    progress: bool = True,
    keep_archive: bool = True,
    opener: Opener | None = None,
) -> Path:
    """Download, verify and extract a dataset into ``root``, then check its layout.

    Does nothing when ``root`` already holds the dataset's layout.

    Args:
        name: ``"mvtec"`` or ``"visa"``.
        root: the folder the dataset is extracted into (the archive is stored there too).
        progress: show progress bars.
        keep_archive: keep the verified archive after extraction.
        opener: passed to :func:`download_file`.

    Returns:
        ``root`` as a Path; use it as ``data.*.root``.

    Raises:
        DatasetError: unknown name, download/checksum/extraction failure, or the extracted
            folder is not the expected layout.
    """
    if name not in DATASETS:
        raise DatasetError(f"unknown dataset {name!r}: available: {', '.join(DATASETS)}")
    info = DATASETS[name]
    base = Path(os.path.expanduser(os.fspath(root)))
    if base.is_dir():
        try:
            if detect_layout(base) == name:
                log.info("%s already present in %s", info.name, base)
                return base
        except DatasetError:
            pass
    archive = download_file(info.url, base / info.filename, sha256=info.sha256, progress=progress, opener=opener)
    extract_archive(archive, base, progress=progress)
    found = detect_layout(base)
    if found != name:
        raise DatasetError(f"{archive} extracted into {base} holds a {found} layout, not {info.name}")
    if not keep_archive:
        archive.unlink()
    return base
