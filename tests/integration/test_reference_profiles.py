"""Each comparison system's shipped config is its reference's computation: what
``clipsam fit/test --print_config`` shows for configs/methods/<method>_<dataset>.yaml stacked on
its base config. Every value below is the reference code's (docs/usage.md, "Fidelity")."""

from __future__ import annotations

from typing import Any

import pytest
import yaml

from clipsam.cli import main
from tests.integration.conftest import REPO

SDP_COMMON = {
    "model.method_config.reference_aliasing": True,
    "model.method_config.text_fp16": True,
    "model.method_config.image_score": "category_minmax",
    "model.method_config.object_name": "raw",
    "model.method_config.input_size": 240,
    "data.image_size": 240,
}
ANOMALYCLIP_COMMON = {
    "model.method_config.segmentation_layers": [24],
    "model.method_config.deep_prompt_fp16": True,
    "model.method_config.input_size": 518,
    "model.evaluation.aupro": True,
    "model.evaluation.aupro_protocol": "anomalyclip",
    "data.train.mosaic_rate": 0.0,
    "data.image_size": 518,
    "data.batch_size": 8,
    "trainer.max_epochs": 15,
    "seed_everything": 111,
}
SAA_COMMON = {
    "model.method_config.channel_order": "bgr",
    "model.method_config.object_comma": True,
    "data.image_size": 400,
}
WINCLIP_COMMON = {
    "model.method_config.object_name": "raw",
    "model.method_config.resize": "torch_bicubic",
    "model.method_config.input_size": 240,
    "model.method_config.k_shot": 0,
    "data.image_size": 240,
}
PROFILES: dict[tuple[str, str, str], dict[str, Any]] = {
    ("test", "mvtec", "winclip_mvtec"): WINCLIP_COMMON,
    ("test", "visa", "winclip_visa"): WINCLIP_COMMON,
    ("test", "mvtec", "winclip_plus_mvtec"): {**WINCLIP_COMMON, "model.method_config.k_shot": 1, "data.reference.seed": 0},
    ("test", "mvtec", "sdp_mvtec"): {**SDP_COMMON, "model.method_config.dbscan_eps": 1.5, "model.method_config.dbscan_min_samples": 25},
    ("test", "visa", "sdp_visa"): {**SDP_COMMON, "model.method_config.dbscan_eps": 0.5, "model.method_config.dbscan_min_samples": 15},
    ("fit", "mvtec", "sdp_plus_mvtec"): {
        **SDP_COMMON,
        "model.method_config.dbscan_eps": 1.5,
        "model.method_config.dbscan_min_samples": 25,
        "model.method_config.fit_dbscan_eps": 0.5,
        "model.method_config.fit_dbscan_min_samples": 15,
        "model.method_config.smoothing_sigma": 2.0,
        "data.train.mosaic_rate": 0.0,
        "data.batch_size": 8,
        "trainer.max_epochs": 5,
        "model.optimizer.lr": 0.0001,
        "model.optimizer.betas": [0.9, 0.999],
        "seed_everything": 42,
    },
    ("fit", "visa", "sdp_plus_visa"): {
        **SDP_COMMON,
        "model.method_config.dbscan_eps": 0.5,
        "model.method_config.dbscan_min_samples": 15,
        "model.method_config.fit_dbscan_eps": 1.5,
        "model.method_config.fit_dbscan_min_samples": 25,
        "model.method_config.smoothing_sigma": 8.0,
        "data.train.mosaic_rate": 0.0,
    },
    ("fit", "mvtec", "anomalyclip_mvtec"): ANOMALYCLIP_COMMON,
    ("fit", "visa", "anomalyclip_visa"): ANOMALYCLIP_COMMON,
    ("test", "mvtec", "saa_plus_mvtec"): SAA_COMMON,
    ("test", "visa", "saa_visa"): SAA_COMMON,
}


def _get(config: dict[str, Any], dotted: str) -> Any:
    value: Any = config
    for part in dotted.split("."):
        assert isinstance(value, dict) and part in value, f"{dotted}: no {part!r} in the printed config"
        value = value[part]
    return value


@pytest.mark.parametrize(("command", "base", "method_config"), sorted(PROFILES))
def test_print_config_shows_the_reference_settings(
    command: str, base: str, method_config: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(REPO)
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--config", f"configs/{base}.yaml", "--config", f"configs/methods/{method_config}.yaml", "--print_config"])
    assert exit_info.value.code == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    differing = {
        key: (_get(printed, key), want) for key, want in PROFILES[(command, base, method_config)].items() if _get(printed, key) != want
    }
    assert not differing, f"configs/methods/{method_config}.yaml: (printed, reference) {differing}"
