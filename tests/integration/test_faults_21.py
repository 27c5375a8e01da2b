"""Issue 21 through the real CLI (in-process, tiny demo models): each fault is one
``clipsam: error: ...`` line naming the file or key, exit status 2, no traceback, and no run
folder; predict on a single file names its outputs after the file.

The unit-level checks of the same fixes: tests/unit/test_reliability_21.py.
"""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from clipsam.cli import main
from tests.integration.conftest import REPO, fast_args, run_cli


def _error(args: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    """Run the CLI expecting exit status 2 and one `clipsam: error:` line; return the line."""
    try:
        code = main(args)
    except SystemExit as exit_:
        code = exit_.code
    err = capsys.readouterr().err
    assert code == 2, err[-3000:]
    lines = [line for line in err.splitlines() if line.startswith("clipsam: error: ")]
    assert len(lines) == 1 and "Traceback" not in err and "usage:" not in err, err[-3000:]
    return lines[0]


def _nothing_written(cwd: Path) -> None:
    for name in ("runs", "predict_out", "outputs", "lightning_logs"):
        assert not (cwd / name).exists(), f"a run folder was created: {sorted((cwd / name).rglob('*'))[:5]}"


def test_predict_on_one_file_names_the_outputs_after_it(in_tmp_cwd: Path, synth_root: Path) -> None:
    photos = in_tmp_cwd / "photos"
    photos.mkdir()
    image = photos / "astronaut.png"
    shutil.copy(min((synth_root / "mvtec" / "capsule" / "test").rglob("*.png")), image)
    cli = run_cli(["predict", *fast_args(in_tmp_cwd), f"--data.predict_dir={image}", "--allow_untrained=true"])
    writer = next(cb for cb in cli.trainer.callbacks if type(cb).__name__ == "PredictionWriter")
    assert sorted(p.name for p in (writer.run_dir / "masks").iterdir()) == ["astronaut.png"]
    assert sorted(p.name for p in (writer.run_dir / "overlays").iterdir()) == ["astronaut.png"]
    with (writer.run_dir / "predictions.csv").open() as handle:
        (row,) = list(csv.DictReader(handle))
    assert row["path"] == str(image)
    assert Path(row["mask"]) == writer.run_dir / "masks" / "astronaut.png" and Path(row["mask"]).is_file()
    assert Path(row["overlay"]) == writer.run_dir / "overlays" / "astronaut.png"


def test_ambiguous_folder_masks_are_refused_before_the_run(in_tmp_cwd: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = in_tmp_cwd / "parts"
    image = np.full((32, 32, 3), 90, np.uint8)
    for folder in ("good", "anomalous/scratch", "anomalous/dent", "masks"):
        (root / folder).mkdir(parents=True)
    for name in ("good/000.png", "anomalous/scratch/000.png", "anomalous/dent/000.png"):
        Image.fromarray(image).save(root / name)
    mask = np.zeros((32, 32), np.uint8)
    mask[8:16, 8:16] = 255
    Image.fromarray(mask).save(root / "masks" / "000.png")
    data = ["--data.test.format=folder", f"--data.test.root={root}", "--data.test.categories=null"]
    line = _error(["test", *fast_args(in_tmp_cwd), *data, "--allow_untrained=true"], capsys)
    assert "anomalous/scratch/000.png" in line and "anomalous/dent/000.png" in line and "mirror" in line, line
    _nothing_written(in_tmp_cwd)


@pytest.mark.parametrize(
    ("content", "words"),
    [
        ('{"image": {"global": {"threshold": NaN}, "per_category": {}}, "pixel": {"global": null, "per_category": {}}}',
         "image.global.threshold is nan"),
        ('{"image": {"global": {"threshold": "high"}, "per_category": {}}, "pixel": {"global": null, "per_category": {}}}',
         "image.global.threshold is 'high'"),
        (('{"rule": "anomalous when score < threshold", "image": {"global": null, "per_category": {}}, '
          '"pixel": {"global": {"threshold": 0.5}, "per_category": {}}}'), "rule is"),
        ('{"image": {"global": {"threshold": 0.5}, "per_category": {}}, "pixel": {"global": null, "per_category": {}}}',
         "no 'scores' entry"),
    ],
)  # fmt: skip
def test_bad_thresholds_files_are_refused_before_the_run(
    in_tmp_cwd: Path, capsys: pytest.CaptureFixture[str], content: str, words: str
) -> None:
    path = in_tmp_cwd / "thresholds.json"
    path.write_text(content)
    line = _error(["test", *fast_args(in_tmp_cwd), f"--model.evaluation.thresholds={path}", "--allow_untrained=true"], capsys)
    assert str(path) in line and words in line, line
    _nothing_written(in_tmp_cwd)


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("--data.num_workers=-1", "data.num_workers=-1"),
        ("--trainer.max_epochs=-5", "trainer.max_epochs=-5"),
        ("--trainer.max_epochs=0", "trainer.max_epochs=0"),
    ],
)
def test_run_settings_are_refused_before_any_run_folder(
    in_tmp_cwd: Path, capsys: pytest.CaptureFixture[str], override: str, key: str
) -> None:
    line = _error(["fit", *fast_args(in_tmp_cwd), override], capsys)
    assert key in line, line
    _nothing_written(in_tmp_cwd)


def test_a_cache_variable_naming_a_file_is_named(
    in_tmp_cwd: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    blocker = in_tmp_cwd / "not_a_folder"
    blocker.write_text("")
    monkeypatch.setenv("CLIPSAM_CACHE", str(blocker))
    monkeypatch.setenv("MVTEC_ROOT", str(in_tmp_cwd / "mvtec"))
    monkeypatch.setenv("VISA_ROOT", str(in_tmp_cwd / "visa"))
    line = _error(["test", "--config", str(REPO / "configs" / "mvtec.yaml"), "--allow_untrained=true"], capsys)
    assert f"CLIPSAM_CACHE={blocker}" in line and "not a folder" in line, line
    _nothing_written(in_tmp_cwd)


def test_a_yaml_error_names_the_file_and_line(in_tmp_cwd: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = in_tmp_cwd / "mine.yaml"
    bad.write_text("trainer:\n  max_epochs: 1\nmodel:\n  evaluation: {fusion: clip_boost\n")
    line = _error(["fit", *fast_args(in_tmp_cwd), "--config", str(bad)], capsys)
    assert line.startswith(f"clipsam: error: {bad}: ") and "line 5" in line, line
    _nothing_written(in_tmp_cwd)


def test_compare_on_generated_visa_shows_no_paper_number(
    in_tmp_cwd: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = in_tmp_cwd / "run"
    run.mkdir()
    payload = {
        "results": {
            "mean": {"pixel_auroc": 0.654, "pixel_f1_max": 0.05, "pixel_ap": 0.017},
            "per_category": {c: {"pixel_auroc": 0.654, "pixel_f1_max": 0.05, "pixel_ap": 0.017, "num_images": 12}
                             for c in ("stripes", "mesh", "capsule")},
        },
        "run": {"method": "april_gan", "refiner": "ppg_cps", "fusion": "clip_boost", "image_size": 224, "protocol": {},
                "data": {"test": {"format": "visa", "root": "data/synthetic/visa", "split": "test",
                                  "categories": ["stripes", "mesh", "capsule"]}}},
    }  # fmt: skip
    (run / "test_results.json").write_text(json.dumps(payload))
    assert main(["compare", str(run), "--no-per-category"]) == 0
    out = capsys.readouterr().out
    assert "65.4" in out and "(94.8)" not in out, out
    assert out.count("no paper number beside runs on other data") == 1, out
