"""`clipsam test` from the command line on every dataset format's generated layout.

One session fixture writes each format's synthetic layout (one category, one normal and one
anomalous image per part, 32 px); each parametrised case runs the demo config's zero-shot test
on it in-process with tiny random models (CLIP only, to stay fast; the full CLIP + SAM path runs
on MVTec LOCO AD, whose masks are folders, and on HeadCT, which has no masks) and checks the metrics file: the format's categories,
its image count, and pixel metrics exactly when the format has masks (image-level formats:
no pixel keys, reported n/a; image metrics present).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from clipsam.data.formats import FORMATS
from clipsam.data.synthetic import SynthSource, generate_formats
from tests.integration.conftest import fast_args, run_cli

CLI_FORMATS = [k for k, f in FORMATS.items() if f.synth is not None]
FULL_PIPELINE = ("mvtec_loco", "headct")
SOURCE = SynthSource(seed=0, image_size=32, num_train_good=1, num_test_good=1, num_test_anomalous=1, num_categories=1)


@pytest.fixture(scope="session")
def format_roots(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return generate_formats(tmp_path_factory.mktemp("formats"), CLI_FORMATS, source=SOURCE)


def _expected_images(key: str) -> int:
    """Test images of the generated layout, worked out from SOURCE (1 good + 1 anomalous)."""
    fmt = FORMATS[key]
    if fmt.level == "pixel" and fmt.categories[0] in ("skin", "colon", "thyroid"):
        return 1  # lesion datasets: anomalous images only
    if key == "ksdd":
        return 3  # no train split: the train_good image is in the test set too
    return 2


@pytest.mark.parametrize("key", CLI_FORMATS)
def test_clipsam_test_runs_on_every_format(key: str, format_roots: dict[str, Path], in_tmp_cwd: Path) -> None:
    fmt = FORMATS[key]
    args = [
        *fast_args(in_tmp_cwd),
        f"--data.test.format={key}",
        f"--data.test.root={format_roots[key]}",
        "--data.test.categories=null",
        "--data.image_size=32",
        "--trainer.logger=false",
        "--model.evaluation.num_overlays=0",
        "--model.evaluation.report_clip_baseline=false",
        "--allow_untrained=true",  # zero-shot data path check: no fit needed
    ]
    if key not in FULL_PIPELINE:
        args += ["--model.evaluation.use_sam=false", "--model.evaluation.fusion=clip"]
    cli = run_cli(["test", *args])
    (path,) = Path(cli.trainer.default_root_dir).rglob("test_results.json")
    results = json.loads(path.read_text())["results"]
    per_category = results["per_category"]
    assert sorted(per_category) == [fmt.categories[0]]
    (values,) = per_category.values()
    assert values["num_images"] == _expected_images(key)
    if fmt.has_masks:
        assert 0.0 <= values["pixel_auroc"] <= 1.0
    else:
        assert not any(k.startswith("pixel_") for k in values), "image-level datasets have no pixel metrics"
        assert "pixel_auroc" not in results["mean"]
        assert 0.0 <= values["image_auroc"] <= 1.0
