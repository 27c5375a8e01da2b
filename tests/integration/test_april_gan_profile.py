"""The APRIL-GAN profiles stack on the paper configs, carry every APRIL-GAN setting, and run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.integration.conftest import REPO, run_cli

DIRECTIONS = {"mvtec": ("mvtec", "visa", 0.2), "visa": ("visa", "mvtec", 0.0)}


def _instantiate(*configs: str):
    from clipsam.cli import ClipSamCLI
    from clipsam.data.datamodule import AnomalyDataModule
    from clipsam.module import ClipSamModule

    args = [a for c in configs for a in ("--config", c)]
    cli = ClipSamCLI(
        ClipSamModule,
        AnomalyDataModule,
        parser_kwargs={"parser_mode": "omegaconf"},
        auto_configure_optimizers=False,
        args=args,
        run=False,
    )
    return cli.model, cli.datamodule


@pytest.mark.parametrize("direction", sorted(DIRECTIONS))
def test_profile_stacks_on_the_paper_config(direction: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(REPO)
    train_format, test_format, mosaic = DIRECTIONS[direction]
    paper, paper_data = _instantiate(f"configs/{direction}.yaml")
    module, data = _instantiate(f"configs/{direction}.yaml", f"configs/methods/april_gan_{direction}.yaml")

    clip = module.method_config
    assert (clip.model_name, clip.pretrained, clip.layers) == ("ViT-L-14-336", "openai", [6, 12, 18, 24])
    assert clip.quick_gelu is False and clip.object_name == "raw" and clip.upsample == "logits"
    assert clip.layer_combine == "sum" and clip.smoothing_sigma == 0.0 and clip.image_score == "clip_global"
    assert module.refiner_name == "none" and module.eval_config.fusion == "clip"
    assert module.eval_config.aupro and module.eval_config.aupro_protocol == "anomalyclip"
    assert data.batch_size == 8 and data.image_size == 518
    assert data.train_spec.format == train_format and data.train_spec.split == "test"
    assert data.train_spec.mosaic_rate == mosaic
    assert data.test_spec.format == test_format
    assert module.optimizer_config.lr == 1e-3 and tuple(module.optimizer_config.betas) == (0.5, 0.999)

    # The paper config keeps the paper's settings and takes the fidelity fixes.
    pc = paper.method_config
    assert paper_data.batch_size == 16 and paper.refiner_name == "ppg_cps"
    assert pc.quick_gelu is None and pc.object_name == "category" and pc.layer_combine == "mean"
    assert pc.upsample == "logits" and pc.image_score == "clip_global" and pc.frozen_dtype == "float32"
    assert paper_data.train_spec.mosaic_rate == mosaic


@pytest.mark.parametrize("direction", sorted(DIRECTIONS))
def test_profile_runs_clipsam_test_on_generated_data(direction: str, in_tmp_cwd: Path, synth_root: Path) -> None:
    train_format, test_format, _ = DIRECTIONS[direction]
    run = run_cli(
        [
            "test",
            "--config",
            str(REPO / "configs" / f"{direction}.yaml"),
            "--config",
            str(REPO / "configs" / "methods" / f"april_gan_{direction}.yaml"),
            "--model.clip.model_name=clipsam-tiny",
            "--model.clip.pretrained=null",
            "--model.clip.layers=[1, 2, 3, 4]",
            f"--data.train.root={synth_root / train_format}",
            f"--data.test.root={synth_root / test_format}",
            "--data.test.categories=[capsule, mesh]",
            "--data.image_size=64",
            "--data.test_batch_size=4",
            "--data.num_workers=0",
            "--trainer.accelerator=cpu",
            "--trainer.enable_progress_bar=false",
            "--allow_untrained=true",  # a pipeline check: no fitted adapters on purpose
        ]
    )
    report = json.loads((Path(run.trainer.log_dir) / "test_results.json").read_text())
    assert report["config"]["image_score"] == "clip_global"
    assert report["config"]["method_config"]["object_name"] == "raw"
    assert report["clip_only"] is None  # the CLIP stage is the method
    per_category = report["results"]["per_category"]
    assert sorted(per_category) == ["capsule", "mesh"]
    for values in per_category.values():
        assert 0.0 <= values["pixel_auroc"] <= 1.0 and 0.0 <= values["pixel_aupro"] <= 1.0
        assert 0.0 <= values["image_auroc"] <= 1.0
