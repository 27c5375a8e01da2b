"""`clipsam data ...` (argparse)."""

from __future__ import annotations

from pathlib import Path

from clipsam.data.cli import data_main
from clipsam.data.mvtec import parse_mvtec
from clipsam.data.visa import parse_visa


def test_synth_writes_both_layouts(tmp_path: Path, capsys) -> None:
    argv = ["synth", "--root", str(tmp_path / "s"), "--image-size", "32", "--categories", "disk", "stripes",
            "--num-train-good", "1", "--num-test-good", "1", "--num-test-anomalous", "2", "--no-progress"]
    assert data_main(argv) == 0
    out = capsys.readouterr().out
    assert "2 categories x 4 images" in out and str(tmp_path / "s" / "visa") in out
    assert len(parse_mvtec(tmp_path / "s/mvtec")) == len(parse_visa(tmp_path / "s/visa")) == 6
    assert data_main(argv) == 2  # refuses to overwrite
    assert "already exists" in capsys.readouterr().err
    assert data_main([*argv, "--overwrite", "--layouts", "mvtec"]) == 0


def test_download_reports_errors_in_one_line(tmp_path: Path, capsys, monkeypatch) -> None:
    import clipsam.data.cli as cli
    from clipsam.errors import DatasetError

    def fail(*args, **kwargs):
        raise DatasetError("downloading x failed: check the network")

    monkeypatch.setattr(cli, "download_dataset", fail)
    assert data_main(["download", "mvtec", "--root", str(tmp_path)]) == 2
    assert capsys.readouterr().err.strip() == "clipsam: error: downloading x failed: check the network"
