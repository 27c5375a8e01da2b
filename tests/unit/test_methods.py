"""Methods as plug-ins: the registry, the glue's refusals, and producer -> refiner -> fusion.

A tiny training-free producer and a tiny refiner are defined here (registered with monkeypatch),
so the glue is tested on maps whose fused scores are worked out by hand.
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest
import torch

from clipsam import methods as registry
from clipsam.errors import ConfigError, WeightsError
from clipsam.methods.base import MapOutput, MapProducer
from clipsam.refiners.base import RefineBatchOutput, Refiner
from clipsam.models.clip import ClipConfig
from clipsam.models.sam import SamConfig
from clipsam.module import ClipSamModule, EvalConfig

IMAGE_SIZE = 32


# ---------------------------------------------------------------------- a tiny training-free method
@dataclasses.dataclass
class BrightConfig:
    """Map = brightness of the (normalised) red channel squashed by a sigmoid."""

    scale: float = 1.0


class Bright(MapProducer):
    name = "bright"
    trainable = False

    def __init__(self, config: BrightConfig) -> None:
        super().__init__()
        self.config = config

    def forward(self, images: torch.Tensor, categories: Sequence[str]) -> MapOutput:
        amap = torch.sigmoid(self.config.scale * images[:, 0])  # (B, H, W)
        return MapOutput(anomaly_map=amap, image_scores=torch.full((images.shape[0],), 0.25))


CONFIG = BrightConfig


def build(config: BrightConfig, *, image_size: int) -> Bright:
    return Bright(config)


class Threshold(Refiner):
    """mask = map >= 0.5, probabilities 0.9 inside and 0.1 outside."""

    name = "threshold"

    def refine_batch(self, batch: Mapping[str, Any], anomaly_maps: torch.Tensor) -> RefineBatchOutput:
        mask = anomaly_maps >= 0.5
        return RefineBatchOutput(mask=mask, mask_probs=torch.where(mask, 0.9, 0.1), timings={"threshold": 0.0})


@pytest.fixture()
def bright(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(registry.METHODS, "bright", registry.MethodSpec(__name__))


def _april_gan(**kwargs: Any) -> ClipSamModule:
    return ClipSamModule(
        clip=ClipConfig(model_name="clipsam-tiny", pretrained=None, layers=[1, 2, 3, 4]),
        sam=SamConfig(variant="tiny"),
        image_size=IMAGE_SIZE,
        **kwargs,
    )


# ---------------------------------------------------------------------- registry
def test_unknown_method_and_refiner_are_config_errors_listing_the_choices() -> None:
    with pytest.raises(ConfigError, match="model.method=.wincilp.*april_gan, winclip, anomalyclip, sdp, sdp_plus, umci, saa, saa_plus"):
        ClipSamModule(method="wincilp")
    with pytest.raises(ConfigError, match="model.refiner=.sam.*ppg_cps, mmr, none"):
        ClipSamModule(refiner="sam")


def test_method_config_is_validated_against_the_methods_dataclass(bright: None) -> None:
    module = ClipSamModule(method="bright", method_config={"scale": 3.0}, refiner="none")
    assert module.method_config == BrightConfig(scale=3.0)
    assert module.hparams["method_config"] == {"scale": 3.0}
    with pytest.raises(ConfigError, match=r"model\.method_config\.scael: not a setting of BrightConfig; valid keys under model\.method_config: scale"):
        ClipSamModule(method="bright", method_config={"scael": 3.0})
    assert ClipSamModule(method_config={"layers": [1]}).method_config.layers == [1]  # april_gan's settings too


def test_registered_method_without_its_module_is_a_config_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(registry.METHODS, "ghost", registry.MethodSpec("clipsam.methods.ghost_method"))
    with pytest.raises(ConfigError, match="model.method='ghost' is registered but its module clipsam.methods.ghost_method"):
        ClipSamModule(method="ghost")


def test_use_sam_is_an_alias_of_the_refiner() -> None:
    assert ClipSamModule().refiner_name == "ppg_cps"
    assert ClipSamModule(evaluation=EvalConfig(use_sam=False)).refiner_name == "none"
    assert ClipSamModule(refiner="none").refiner_name == "none"
    with pytest.raises(ConfigError, match="model.refiner=ppg_cps but model.evaluation.use_sam=false"):
        ClipSamModule(refiner="ppg_cps", evaluation=EvalConfig(use_sam=False))


# ---------------------------------------------------------------------- training-free methods
def test_fit_is_refused_for_a_training_free_method(bright: None, tmp_path: Path) -> None:
    import lightning.pytorch as pl

    module = ClipSamModule(method="bright", refiner="none", image_size=IMAGE_SIZE)
    assert module.trainable is False
    trainer = pl.Trainer(accelerator="cpu", max_epochs=1, logger=False, enable_progress_bar=False, default_root_dir=tmp_path)
    with pytest.raises(ConfigError, match="model.method=bright is training-free: there is nothing to fit"):
        trainer.fit(module, train_dataloaders=[{"image": torch.zeros(1, 3, IMAGE_SIZE, IMAGE_SIZE)}])
    assert list(tmp_path.iterdir()) == [], "nothing may be written for a refused fit"


def test_cli_fit_of_a_training_free_method_exits_2_before_any_run_folder(
    bright: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from clipsam.cli import main

    config = Path(__file__).resolve().parents[2] / "configs" / "demo.yaml"
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["clipsam"])  # LightningCLI warns when it sees pytest's argv
    monkeypatch.setenv("CLIPSAM_SYNTH_ROOT", str(tmp_path / "no_data_needed"))
    code = main(["fit", "--config", str(config), "--model.method=bright", "--model.refiner=none"])
    assert code == 2
    assert "clipsam: error: model.method=bright is training-free" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == [], "no run folder may be created"


# ---------------------------------------------------------------------- producer -> refiner -> fusion
def _batch() -> dict[str, Any]:
    red = torch.tensor([[-2.0, 0.0], [1.0, 3.0]]).repeat_interleave(2, 0).repeat_interleave(2, 1)  # (4, 4)
    image = torch.zeros(1, 3, 4, 4)
    image[0, 0] = red
    return {"image": image, "category": ["x"]}


def test_segment_without_refiner_uses_the_producers_map_and_image_score(bright: None) -> None:
    module = ClipSamModule(method="bright", refiner="none", image_size=4)
    module.configure_model()
    out = module.pipeline.segment(_batch())
    expected = torch.sigmoid(_batch()["image"][:, 0])
    assert torch.equal(out["scores"], expected)
    assert torch.equal(out["mask"], expected >= 0.5)
    assert out["image_scores"].tolist() == [0.25], "without a refiner the producer's own image score is kept"


def test_segment_with_a_refiner_fuses_its_mask_and_reduces_the_fused_map(bright: None) -> None:
    module = ClipSamModule(method="bright", refiner="none", image_size=4, evaluation=EvalConfig(fusion="clip_boost"))
    module.configure_model()
    module.pipeline.refiner = Threshold()
    out = module.pipeline.segment(_batch())
    amap = torch.sigmoid(_batch()["image"][:, 0])
    # clip_boost: (Map_a + M) / 2 with M = (Map_a >= 0.5); sigmoid(-2) < 0.5 <= sigmoid(0).
    expected = (amap + (amap >= 0.5).float()) / 2
    assert torch.allclose(out["scores"], expected)
    assert out["image_scores"].item() == pytest.approx((torch.sigmoid(torch.tensor(3.0)).item() + 1) / 2)
    assert module.pipeline.timings["threshold"] == 0.0


# ---------------------------------------------------------------------- checkpoints
def test_checkpoint_of_another_method_is_refused_naming_both(bright: None) -> None:
    module = ClipSamModule(method="bright", refiner="none")
    ckpt = {"state_dict": {"producer.model.adapters.0.weight": torch.zeros(2, 2)}, "clipsam": {"method": "april_gan"}}
    with pytest.raises(WeightsError, match="trained with model.method=april_gan but this config runs model.method=bright"):
        module.on_load_checkpoint(ckpt)
    legacy = {"state_dict": {"clip_model.adapters.0.weight": torch.zeros(2, 2)}, "clipsam": {"clip_model_name": "x"}}
    with pytest.raises(WeightsError, match="model.method=april_gan but this config runs model.method=bright"):
        module.on_load_checkpoint(legacy)
    other = _april_gan()
    with pytest.raises(WeightsError, match="trained with model.method=bright but this config runs model.method=april_gan"):
        other.on_load_checkpoint({"state_dict": {}, "clipsam": {"method": "bright"}})


def test_checkpoint_written_before_methods_existed_loads_as_april_gan() -> None:
    module = _april_gan()
    module.configure_model()
    old = module.clip_model.adapter_state_dict()
    legacy_state = {f"clip_model.adapters.{k}": v + 1.0 for k, v in old.items()}
    checkpoint = {"state_dict": dict(legacy_state), "clipsam": {"clip_model_name": "clipsam-tiny", "layers": [1, 2, 3, 4]}}
    module.on_load_checkpoint(checkpoint)
    for key, value in module.clip_model.adapter_state_dict().items():
        assert torch.equal(value, old[key] + 1.0)
    # renamed to the module's own keys, so Lightning's load finds them too
    assert set(checkpoint["state_dict"]) == {f"pipeline.producer.model.adapters.{k}" for k in old}

