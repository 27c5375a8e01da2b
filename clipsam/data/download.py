"""Download, verify and extract the real datasets, with the standard library.

The URLs and sha256 sums of MVTec-AD, VisA, BTAD, KolektorSDD, MVTec AD 2 and MVTec LOCO AD are
the ones anomalib uses (``DOWNLOAD_INFO`` in ``src/anomalib/data/datamodules/image/*.py`` and
``src/anomalib/data/datasets/image/mvtec_loco.py``). KolektorSDD2, Kvasir-SEG and ISIC 2016 have
public URLs but no published checksum: they download only with ``allow_unverified=True``
(``--allow-unverified``), and the sha256 of what arrived is logged. Every other format has no
direct public URL (a form, a licence request or a Kaggle/Google-Drive page): ``clipsam data
download <name>`` prints where to get it (:data:`MANUAL`). A download goes to ``<file>.part``
and resumes from its size with an HTTP ``Range`` request; the finished file is checked against its
sha256 (a mismatch keeps the file, renamed ``<file>.sha256-mismatch``, and raises); the archive
is extracted with tarfile's ``data`` filter (no absolute paths, no ``..``, no device files; zip
members are checked the same way), and the format's parser checks that what came out is the
dataset asked for. VisA is read in place
(:mod:`clipsam.data.visa`), nothing is converted.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tarfile
import urllib.error
import zipfile
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from tqdm.auto import tqdm

from clipsam.errors import ClipSamError, DatasetError

__all__ = [
    "DATASETS",
    "MANUAL",
    "DownloadInfo",
    "RemoteFile",
    "detect_layout",
    "download_dataset",
    "download_file",
    "download_instructions",
    "extract_archive",
    "find_dataset_root",
    "sha256sum",
]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RemoteFile:
    """One more archive of a dataset (e.g. ISIC 2016's ground-truth zip).

    Attributes:
        url: archive URL.
        filename: archive file name on disk.
        sha256: expected sha256 hex digest; None when no public source gives one.
    """

    url: str
    filename: str
    sha256: str | None = None


@dataclass(frozen=True)
class DownloadInfo:
    """Where a dataset archive lives and how to check it.

    Attributes:
        name: human-readable dataset name.
        url: archive URL.
        filename: archive file name on disk (``.zip`` or a tar archive).
        sha256: expected sha256 hex digest; None when no public source gives one: the
            download then needs ``allow_unverified`` and is not checked.
        extra: further archives extracted into the same folder.
        source: where the URL and checksum come from.
        page: the dataset's page (licence, citation).
    """

    name: str
    url: str
    filename: str
    sha256: str | None
    extra: tuple[RemoteFile, ...] = ()
    source: str = "anomalib"
    page: str = ""


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
    "btad": DownloadInfo(
        name="BTAD",
        url="https://avires.dimi.uniud.it/papers/btad/btad.zip",
        filename="btad.zip",
        sha256="461c9387e515bfed41ecaae07c50cf6b10def647b36c9e31d239ab2736b10d2a",
    ),
    "ksdd": DownloadInfo(
        name="KolektorSDD",
        url="https://go.vicos.si/kolektorsdd",
        filename="KolektorSDD.zip",
        sha256="65dc621693418585de9c4467d1340ea7958a6181816f0dc2883a1e8b61f9d4dc",
    ),
    "mvtec_ad2": DownloadInfo(
        name="MVTec AD 2",
        url="https://www.mydrive.ch/shares/150997/701c90d3aea6588f404936e32a674602/download/"
        "466712769-1743429042/mvtec_ad_2.tar.gz",
        filename="mvtec_ad_2.tar.gz",
        sha256="c0ded99ef32bfc8e352d52beb44515e5b292b8598cb963aadfa91ca0763505e4",
    ),
    "mvtec_loco": DownloadInfo(
        name="MVTec LOCO AD",
        url="https://www.mydrive.ch/shares/48237/1b9106ccdfbb09a0c414bd49fe44a14a/download/430647091-1646842701"
        "/mvtec_loco_anomaly_detection.tar.xz",
        filename="mvtec_loco_anomaly_detection.tar.xz",
        sha256="9e7c84dba550fd2e59d8e9e231c929c45ba737b6b6a6d3814100f54d63aae687",
    ),
    # Public URLs without a published sha256: downloaded only with allow_unverified.
    "ksdd2": DownloadInfo(
        name="KolektorSDD2",
        url="https://go.vicos.si/kolektorsdd2",
        filename="KolektorSDD2.zip",
        sha256=None,
        source="the dataset page",
        page="https://www.vicos.si/resources/kolektorsdd2/",
    ),
    "kvasir": DownloadInfo(
        name="Kvasir-SEG",
        url="https://datasets.simula.no/downloads/kvasir-seg.zip",
        filename="kvasir-seg.zip",
        sha256=None,
        source="the dataset page",
        page="https://datasets.simula.no/kvasir-seg/",
    ),
    "isic2016": DownloadInfo(
        name="ISIC 2016 (Part 1, test)",
        url="https://isic-challenge-data.s3.amazonaws.com/2016/ISBI2016_ISIC_Part1_Test_Data.zip",
        filename="ISBI2016_ISIC_Part1_Test_Data.zip",
        sha256=None,
        extra=(
            RemoteFile(
                "https://isic-challenge-data.s3.amazonaws.com/2016/ISBI2016_ISIC_Part1_Test_GroundTruth.zip",
                "ISBI2016_ISIC_Part1_Test_GroundTruth.zip",
            ),
        ),
        source="the challenge page",
        page="https://challenge.isic-archive.com/data/#2016",
    ),
}

#: Formats with no direct public URL: where to get them and how to lay them out.
MANUAL: dict[str, str] = {
    "mpdd": "MPDD is shared from a OneDrive folder linked at https://github.com/stepanje/MPDD: download it and "
    "extract so that ROOT/bracket_black/, ROOT/connector/, ... exist",
    "dtd_synthetic": "DTD-Synthetic (Aota et al., WACV 2023) is shared via Google Drive/Kaggle: get it from the "
    "authors' release linked in the AnomalyCLIP README (https://github.com/zqhang/AnomalyCLIP) and extract "
    "so that ROOT/Woven_001/train/good/ exists",
    "dagm": "DAGM 2007 needs the labelled release (Class1 .. Class10 with Train/Label and Test/Label): get it from "
    "https://hci.iwr.uni-heidelberg.de/content/weakly-supervised-learning-industrial-optical-inspection (or its "
    "Zenodo copy) and extract so that ROOT/Class1/Test/Label/ exists",
    "clinicdb": "CVC-ClinicDB is distributed by its authors on request (https://polyp.grand-challenge.org/CVCClinicDB/); "
    "copies with images/ + masks/ ship with PraNet's test data. Extract so that ROOT/Original/ + ROOT/'Ground Truth'/ "
    "or ROOT/images/ + ROOT/masks/ exist",
    "colondb": "CVC-ColonDB: use the images/ + masks/ copy in PraNet's TestDataset "
    "(https://github.com/DengPingFan/PraNet) and point the root at it",
    "endo": "Endo is the EndoTect 2020 segmentation set (https://endotect.com/, via HyperKvasir): put the images in "
    "ROOT/images/ and the masks in ROOT/masks/",
    "tn3k": "TN3K is linked from https://github.com/haifangong/TRFE-Net-for-thyroid-nodule-segmentation "
    "(Google Drive): extract so that ROOT/test-image/ and ROOT/test-mask/ exist",
    "headct": "HeadCT is on Kaggle (https://www.kaggle.com/datasets/felipekitamura/head-ct-hemorrhage; a Kaggle "
    "account is needed): extract so that ROOT/labels.csv and ROOT/head_ct/000.png exist",
    "brainmri": "BrainMRI is on Kaggle (https://www.kaggle.com/datasets/navoneel/brain-mri-images-for-brain-tumor-detection): "
    "extract so that ROOT/yes/ and ROOT/no/ (or ROOT/brain_tumor_dataset/yes, no) exist",
    "br35h": "Br35H is on Kaggle (https://www.kaggle.com/datasets/ahmedhamada0/brain-tumor-detection): extract so "
    "that ROOT/yes/ and ROOT/no/ exist",
    "real_iad": "Real-IAD is distributed on request under a licence agreement: apply at "
    "https://realiad4ad.github.io/Real-IAD/, then extract realiad_<resolution>.zip and realiad_jsons.zip into ROOT "
    "so that ROOT/realiad_1024/ (or _512, _256) and ROOT/realiad_jsons/realiad_jsons/ exist",
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


def _extract_zip(archive: Path, out: Path, *, progress: bool) -> None:
    with zipfile.ZipFile(archive) as zf:
        members = zf.infolist()
        for member in members:  # check everything before writing anything
            name = member.filename.replace("\\", "/")
            parts = [p for p in name.split("/") if p]
            if name.startswith("/") or ".." in parts or (parts and ":" in parts[0]):
                raise DatasetError(
                    f"{archive} holds an unsafe member {member.filename!r} (absolute path or '..'): "
                    "not extracted; check where the archive came from"
                )
            if (member.external_attr >> 16) & 0o170000 == 0o120000:
                raise DatasetError(f"{archive} holds a symbolic link {member.filename!r}: not extracted")
        for member in tqdm(members, desc=f"extracting {archive.name}", unit="file", disable=not progress):
            zf.extract(member, out)


def extract_archive(archive: str | os.PathLike[str], dest: str | os.PathLike[str], *, progress: bool = True) -> Path:
    """Extract a tar archive (any compression) or a zip into ``dest``, refusing unsafe members.

    Tar archives use tarfile's ``data`` filter; zip members are checked first (no absolute
    path, no ``..``, no symbolic link) and nothing is written when one fails.

    Raises:
        DatasetError: the archive is unreadable or holds unsafe members (absolute paths,
            ``..``, links out of ``dest``, device files).
    """
    out = Path(dest)
    out.mkdir(parents=True, exist_ok=True)
    if zipfile.is_zipfile(archive):
        try:
            _extract_zip(Path(archive), out, progress=progress)
        except (zipfile.BadZipFile, OSError) as exc:
            raise DatasetError(
                f"cannot extract {archive} into {out} ({exc}): delete the archive and download it again"
            ) from exc
        return out
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


def find_dataset_root(name: str, root: str | os.PathLike[str]) -> Path | None:
    """``root`` or its only sub-folder when it parses as format ``name``; else None.

    Archives often extract into one folder (``KolektorSDD/``, ``Kvasir-SEG/``), so the folder
    to use as ``data.*.root`` may be one level down.
    """
    from clipsam.data.formats import FORMATS

    base = Path(os.path.expanduser(os.fspath(root)))
    if not base.is_dir():
        return None
    fmt = FORMATS[name]
    subs = [p for p in base.iterdir() if p.is_dir() and not p.name.startswith(".")]
    for candidate in [base, *subs]:
        try:
            if fmt.parse_root(candidate, split=fmt.splits[-1]):
                return candidate
        except ClipSamError:
            continue
    return None


def download_instructions(name: str) -> str:
    """What ``clipsam data download NAME`` says for a format it cannot fetch by itself."""
    from clipsam.data.formats import FORMATS

    if name in MANUAL:
        return f"{FORMATS[name].name} has no direct public download: {MANUAL[name]}; then set data.test.root to ROOT"
    info = DATASETS[name]
    return (
        f"{info.name} is downloaded from {info.url} ({info.source}: {info.page}), which publishes no sha256, so the "
        "download cannot be verified: pass --allow-unverified to download it anyway (its sha256 is logged)"
    )


def download_dataset(
    name: str,
    root: str | os.PathLike[str],
    *,
    progress: bool = True,
    keep_archive: bool = True,
    allow_unverified: bool = False,
    opener: Opener | None = None,
) -> Path:
    """Download, verify and extract a dataset into ``root``, then check its layout.

    Does nothing when ``root`` (or its only sub-folder) already holds the dataset's layout.

    Args:
        name: a key of :data:`DATASETS` (``"mvtec"``, ``"visa"``, ``"btad"``, ...).
        root: the folder the dataset is extracted into (the archives are stored there too).
        progress: show progress bars.
        keep_archive: keep the archives after extraction.
        allow_unverified: download datasets whose sha256 no public source gives.
        opener: passed to :func:`download_file`.

    Returns:
        the folder to use as ``data.*.root``: ``root``, or the folder the archive created in it.

    Raises:
        DatasetError: a format without a direct download (the message says where to get it),
            an unverifiable download without ``allow_unverified``, a download/checksum/
            extraction failure, or the extracted folder is not the expected layout.
    """
    from clipsam.data.formats import FORMATS

    if name in MANUAL:
        raise DatasetError(download_instructions(name))
    if name not in DATASETS:
        known = sorted({*DATASETS, *MANUAL})
        raise DatasetError(f"unknown dataset {name!r}: available: {', '.join(known)}")
    info = DATASETS[name]
    if info.sha256 is None and not allow_unverified:
        raise DatasetError(download_instructions(name))
    base = Path(os.path.expanduser(os.fspath(root)))
    found = find_dataset_root(name, base) if name in FORMATS else None
    if found is not None:
        log.info("%s already present in %s", info.name, found)
        return found
    files = [RemoteFile(info.url, info.filename, info.sha256), *info.extra]
    archives = [
        download_file(f.url, base / f.filename, sha256=f.sha256, progress=progress, opener=opener) for f in files
    ]
    for archive in archives:
        extract_archive(archive, base, progress=progress)
    found = find_dataset_root(name, base)
    if found is None:
        hint = ""
        try:
            hint = f" (it holds a {detect_layout(base)} layout)"
        except DatasetError:
            pass
        raise DatasetError(
            f"{', '.join(map(str, archives))} extracted into {base} do not hold a {info.name} layout{hint}: "
            f"delete {base} and download again, or lay it out as docs/datasets.md shows"
        )
    if not keep_archive:
        for archive in archives:
            archive.unlink()
    return found
