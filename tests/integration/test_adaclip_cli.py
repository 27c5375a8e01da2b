"""AdaCLIP through the command line on the generated demo data (tiny random CLIP and SAM):
``clipsam fit`` writes only AdaCLIP's trained parameters, and ``clipsam test`` with that
checkpoint runs under every refiner (none, ppg_cps, mmr)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch

from tests.integration.conftest import REPO, fast_args, run_cli

ADACLIP_DEMO = str(REPO / "configs" / "methods" / "demo" / "adaclip.yaml")
REFINERS = ("none", "ppg_cps", "mmr")


@pytest.fixture(scope="module")
def adaclip_ckpt(tmp_path_factory: pytest.TempPathFactory, synth_root: Path) -> Path:
    """last.ckpt of one 1-epoch AdaCLIP fit on the demo data (64 px frames)."""
    import os

    work = tmp_path_factory.mktemp("adaclip_fit")
    old = Path.cwd()
    os.environ["CLIPSAM_SYNTH_ROOT"] = str(synth_root)
    os.environ.setdefault("WANDB_MODE", "offline")
    os.chdir(work)
    try:
        fit = run_cli(["fit", *fast_args(work), "--config", ADACLIP_DEMO, "--model.optimizer.name=adamw",
                       "--model.optimizer.weight_decay=0.01"])  # fmt: skip
        return Path(fit.trainer.checkpoint_callback.last_model_path).resolve()
    finally:
        os.chdir(old)


def test_fit_checkpoints_only_adaclips_trained_parameters(adaclip_ckpt: Path) -> None:
    saved = torch.load(adaclip_ckpt, map_location="cpu", weights_only=True)
    keys = set(saved["state_dict"])
    assert keys and all(k.startswith("producer.learned.") for k in keys), sorted(keys)[:5]
    # static prompts of both towers (4 vision blocks, text blocks 1-3), both generators, the projections
    for part in ("visual_static.3", "text_static.2", "visual_generator.4.weight", "text_generator.4.weight",
                 "patch_projections.3.weight", "cls_projection.weight"):  # fmt: skip
        assert f"producer.learned.{part}" in keys, part
    assert "producer.learned.text_static.3" not in keys  # the text tower's block 0 is never prompted
    group = saved["optimizer_states"][0]["param_groups"][0]  # the reference's AdamW, decoupled decay
    assert group["decoupled_weight_decay"] is True and group["weight_decay"] == 0.01
    meta = saved["clipsam"]
    assert meta["method"] == "adaclip" and meta["clip_model_name"] == "clipsam-tiny-240" and meta["clip_pretrained"] is None


def test_test_runs_under_every_refiner(adaclip_ckpt: Path, in_tmp_cwd: Path) -> None:
    """The same checkpoint under none / ppg_cps / mmr: every category scored; AdaCLIP's image score
    (``image_score: clip_global``) is the method's own whatever the refiner, so the image metrics
    of the three runs agree."""
    results: dict[str, dict] = {}
    started = time.monotonic()
    for refiner in REFINERS:
        args = [*fast_args(in_tmp_cwd), "--config", ADACLIP_DEMO, "--config", str(REPO / "configs" / "refiners" / f"{refiner}.yaml")]
        test = run_cli(["test", *args, "--model.evaluation.num_overlays=0", "--ckpt_path", str(adaclip_ckpt)])
        assert test.model.method == "adaclip" and test.model.refiner_name == refiner
        report = json.loads((Path(test.trainer.log_dir) / "test_results.json").read_text())
        assert report["run"]["method"] == "adaclip" and report["run"]["refiner"] == refiner
        results[refiner] = report["results"]["per_category"]
    assert time.monotonic() - started < 240
    for refiner, per_category in results.items():
        assert sorted(per_category) == ["capsule", "mesh", "stripes"], refiner
        for values in per_category.values():
            assert 0.0 <= values["pixel_auroc"] <= 1.0 and 0.0 <= values["image_auroc"] <= 1.0
    for category, values in results["none"].items():
        for refiner in ("ppg_cps", "mmr"):
            assert results[refiner][category]["image_auroc"] == pytest.approx(values["image_auroc"], abs=1e-9), (refiner, category)
