"""Downloads without network: checksum, resume, extraction, layout detection."""

from __future__ import annotations

import hashlib
import io
import re
import tarfile
import urllib.error
import urllib.request
from dataclasses import replace
from pathlib import Path

import pytest

from clipsam.data.download import (
    DATASETS,
    detect_layout,
    download_dataset,
    download_file,
    extract_archive,
    sha256sum,
)
from clipsam.errors import DatasetError

PAYLOAD = bytes(range(256)) * 40  # 10240 bytes
DIGEST = hashlib.sha256(PAYLOAD).hexdigest()


class _Response(io.BytesIO):
    def __init__(self, data: bytes, status: int) -> None:
        super().__init__(data)
        self.status = status
        self.headers = {"Content-Length": str(len(data))}

    def getcode(self) -> int:
        return self.status


class RangeServer:
    """A fake ``urlopen`` that serves PAYLOAD and honours ``Range: bytes=N-`` (or ignores it)."""

    def __init__(self, payload: bytes = PAYLOAD, *, honour_range: bool = True) -> None:
        self.payload, self.honour_range = payload, honour_range
        self.ranges: list[str | None] = []

    def __call__(self, request: urllib.request.Request) -> _Response:
        header = request.get_header("Range")
        self.ranges.append(header)
        if header and self.honour_range:
            start = int(re.fullmatch(r"bytes=(\d+)-", header).group(1))
            return _Response(self.payload[start:], 206)
        return _Response(self.payload, 200)


def test_known_datasets_have_anomalib_urls_and_hashes() -> None:
    assert DATASETS["mvtec"].url.endswith("mvtec_anomaly_detection.tar.xz")
    assert DATASETS["visa"].url.endswith("VisA_20220922.tar")
    verified = {k for k, info in DATASETS.items() if info.sha256 is not None}
    # the checksums anomalib publishes; the others have none and are marked as such
    assert verified == {"mvtec", "visa", "btad", "ksdd", "mvtec_ad2", "mvtec_loco"}
    assert all(re.fullmatch(r"[0-9a-f]{64}", DATASETS[k].sha256) for k in verified)
    assert all(DATASETS[k].source != "anomalib" and DATASETS[k].page for k in set(DATASETS) - verified)


def test_resume_appends_to_the_part_file(tmp_path: Path) -> None:
    dest = tmp_path / "archive.tar"
    (tmp_path / "archive.tar.part").write_bytes(PAYLOAD[:3000])
    server = RangeServer()
    download_file("https://example.invalid/a.tar", dest, sha256=DIGEST, progress=False, opener=server)
    assert server.ranges == ["bytes=3000-"]
    assert dest.read_bytes() == PAYLOAD and not (tmp_path / "archive.tar.part").exists()
    download_file("https://example.invalid/a.tar", dest, sha256=DIGEST, progress=False, opener=server)
    assert len(server.ranges) == 1  # a verified file is reused without a request


def test_server_ignoring_range_restarts(tmp_path: Path) -> None:
    dest = tmp_path / "archive.tar"
    (tmp_path / "archive.tar.part").write_bytes(b"garbage")
    server = RangeServer(honour_range=False)
    download_file("https://example.invalid/a.tar", dest, sha256=DIGEST, progress=False, opener=server)
    assert dest.read_bytes() == PAYLOAD


def test_file_url_download(tmp_path: Path) -> None:
    source = tmp_path / "src.bin"
    source.write_bytes(PAYLOAD)
    dest = download_file(source.as_uri(), tmp_path / "out" / "copy.bin", sha256=DIGEST, progress=False)
    assert sha256sum(dest) == DIGEST


def test_checksum_mismatch_keeps_the_bad_file(tmp_path: Path) -> None:
    source = tmp_path / "src.bin"
    source.write_bytes(PAYLOAD)
    dest = tmp_path / "copy.bin"
    with pytest.raises(DatasetError, match=r"sha256 of .*copy.bin is .*expected 0{64}.*copy.bin.sha256-mismatch"):
        download_file(source.as_uri(), dest, sha256="0" * 64, progress=False)
    assert not dest.exists() and (tmp_path / "copy.bin.sha256-mismatch").read_bytes() == PAYLOAD


def test_network_error_says_how_to_resume(tmp_path: Path) -> None:
    def offline(request):
        raise urllib.error.URLError("no network")

    with pytest.raises(DatasetError, match="run the same command again to resume"):
        download_file("https://example.invalid/a.tar", tmp_path / "a.tar", opener=offline, progress=False)


def _tar_of(folder: Path, archive: Path) -> Path:
    with tarfile.open(archive, "w") as tar:
        for path in sorted(folder.iterdir()):
            tar.add(path, arcname=path.name)
    return archive


def test_detect_layout(synth_root: Path, tmp_path: Path) -> None:
    assert detect_layout(synth_root / "mvtec") == "mvtec"
    assert detect_layout(synth_root / "visa") == "visa"
    (tmp_path / "junk").mkdir()
    with pytest.raises(DatasetError, match=r"neither an MVTec-AD layout.*contains: junk"):
        detect_layout(tmp_path)


def test_download_dataset_end_to_end_offline(synth_root: Path, tmp_path: Path, monkeypatch) -> None:
    archive = _tar_of(synth_root / "visa", tmp_path / "visa.tar")
    payload = archive.read_bytes()
    info = DATASETS["visa"]
    monkeypatch.setitem(DATASETS, "visa", replace(info, sha256=hashlib.sha256(payload).hexdigest()))
    root = download_dataset("visa", tmp_path / "VisA", progress=False, opener=RangeServer(payload))
    assert detect_layout(root) == "visa" and (root / "split_csv/1cls.csv").is_file()
    assert (root / "VisA_20220922.tar").is_file()
    # already there: no request at all
    assert download_dataset("visa", root, progress=False, opener=None) == root
    # an archive of the wrong dataset is reported
    wrong = _tar_of(synth_root / "visa", tmp_path / "wrong.tar").read_bytes()
    info = DATASETS["mvtec"]
    monkeypatch.setitem(DATASETS, "mvtec", replace(info, sha256=hashlib.sha256(wrong).hexdigest()))
    with pytest.raises(DatasetError, match=r"not hold a MVTec-AD layout \(it holds a visa layout\)"):
        download_dataset("mvtec", tmp_path / "M", progress=False, opener=RangeServer(wrong))


def test_extraction_rejects_unsafe_members(tmp_path: Path) -> None:
    archive = tmp_path / "evil.tar"
    with tarfile.open(archive, "w") as tar:
        data = b"pwned"
        member = tarfile.TarInfo("../outside.txt")
        member.size = len(data)
        tar.addfile(member, io.BytesIO(data))
    with pytest.raises(DatasetError, match="cannot extract"):
        extract_archive(archive, tmp_path / "out", progress=False)
    assert not (tmp_path / "outside.txt").exists()
