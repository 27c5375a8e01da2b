"""WinCLIP+ (few-shot) through the command line on generated data: ``clipsam test`` draws k good
training images per test category by ``data.reference`` and its report lists them."""

from __future__ import annotations

import json
from pathlib import Path

from tests.integration.conftest import REPO, fast_args, run_cli

WINCLIP_DEMO = str(REPO / "configs" / "methods" / "demo" / "winclip.yaml")


def test_winclip_plus_test_reports_its_reference_files(in_tmp_cwd: Path, synth_root: Path) -> None:
    args = [*fast_args(in_tmp_cwd), "--config", WINCLIP_DEMO, "--model.method_config.k_shot=1", "--data.reference.seed=3"]
    test = run_cli(["test", *args])
    report = json.loads((Path(test.trainer.log_dir) / "test_results.json").read_text())
    references = report["run"]["references"]
    assert references["seed"] == 3 and references["source"] == "train" and references["count"] == 1
    categories = sorted(report["results"]["per_category"])
    assert sorted(references["files"]) == categories == ["capsule", "mesh", "stripes"]
    # drawn from the test dataset's (VisA layout) good training images, one per category
    train = {c: set() for c in categories}
    for row in (synth_root / "visa" / "split_csv" / "1cls.csv").read_text().splitlines()[1:]:
        obj, split, label, image = row.split(",")[:4]
        if split == "train" and label == "normal" and obj in train:
            train[obj].add(str(synth_root / "visa" / image))
    for category, files in references["files"].items():
        assert len(files) == 1 and files[0] in train[category], (category, files)
    assert report["config"]["method_config"]["k_shot"] == 1
