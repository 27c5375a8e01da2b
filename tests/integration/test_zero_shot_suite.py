"""scripts/zero_shot_suite.py end to end on generated data: fit once, test several formats, one table."""

from __future__ import annotations

import json
import runpy
from pathlib import Path

import pytest

from clipsam.data.synthetic import SynthSource, generate_formats, generate_synthetic
from tests.integration.conftest import DEMO_CONFIG, REPO


def test_suite_skips_missing_roots_and_reports_one_table(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("WANDB_MODE", "offline")
    data = tmp_path / "data"
    generate_synthetic(data, layouts=["mvtec"], categories=["fabric", "disk"], image_size=32, num_train_good=1,
                       num_test_good=1, num_test_anomalous=2, progress=False)
    roots = generate_formats(data, ["mvtec_loco", "headct"], source=SynthSource(image_size=32, num_test_anomalous=2, num_categories=1))
    suite = tmp_path / "suite.yaml"
    fast = [
        "data.image_size=32", "data.batch_size=4", "data.test_batch_size=4", "data.num_workers=0",
        "data.train.categories=null", "trainer.max_epochs=1", "trainer.enable_progress_bar=false",
        "trainer.logger=false", "model.sam.embedding_cache_dir=", "model.evaluation.num_overlays=0",
        "model.evaluation.use_sam=false", "model.evaluation.fusion=clip", "model.evaluation.report_clip_baseline=false",
    ]
    tests = [
        {"name": "MVTec-AD", "train": "visa", "format": "mvtec", "root": str(data / "mvtec")},
        {"name": "LOCO logical", "train": "mvtec", "format": "mvtec_loco", "subset": "logical", "root": str(roots["mvtec_loco"])},
        {"name": "LOCO structural", "train": "mvtec", "format": "mvtec_loco", "subset": "structural", "root": str(roots["mvtec_loco"])},
        {"name": "HeadCT", "train": "mvtec", "format": "headct", "root": str(roots["headct"])},
        {"name": "Kvasir-SEG", "train": "mvtec", "format": "kvasir", "root": "${oc.env:NO_SUCH_ROOT_VAR,/nonexistent/kvasir}"},
    ]
    suite.write_text(json.dumps({
        "overrides": fast,
        "train": {"mvtec": {"config": DEMO_CONFIG, "root": str(data / "mvtec")},
                  "visa": {"config": DEMO_CONFIG, "root": str(tmp_path / "no_visa")}},
        "tests": tests,
        "means": {"LOCO (mean)": ["LOCO logical", "LOCO structural"]},
    }))
    main = runpy.run_path(str(REPO / "scripts" / "zero_shot_suite.py"))["main"]
    assert main(["--config", str(suite), "--out", str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out
    assert f"skip fit visa: dataset root {tmp_path / 'no_visa'} does not exist" in out
    assert "skip Kvasir-SEG: dataset root /nonexistent/kvasir does not exist" in out
    table = (tmp_path / "out" / "suite_results.csv").read_text().splitlines()
    assert table[0].startswith("dataset,images,P-AUROC")
    rows = {line.split(",")[0]: line.split(",") for line in table[1:]}
    assert rows["MVTec-AD"][1] == "skipped" and rows["Kvasir-SEG"][1] == "skipped"
    assert rows["HeadCT"][2] == "n/a" and rows["HeadCT"][5] != "n/a", "image-level: pixel n/a, image metrics reported"
    results = json.loads((tmp_path / "out" / "suite_results.json").read_text())["tests"]
    logical, structural = (results[k]["mean"]["pixel_auroc"] for k in ("LOCO logical", "LOCO structural"))
    assert rows["LOCO (mean)"][2] == f"{100 * (logical + structural) / 2:.1f}"
