"""SAA / SAA+ and ClipSAM-rec (UMCI + MMR) through the CLI on generated data, offline, tiny models.

Needs the registry entries ``umci``, ``saa_plus``, ``saa`` (methods) and ``mmr`` (refiner) in
:mod:`clipsam.methods`; skipped with that reason until they are registered.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from clipsam import methods as registry
from clipsam.errors import ClipSamError
from tests.integration.conftest import fast_args, run_cli

_NEEDED = {"umci", "saa_plus", "saa"} <= set(getattr(registry, "METHODS", {})) and "mmr" in getattr(
    registry, "REFINERS", {}
)
pytestmark = pytest.mark.skipif(not _NEEDED, reason="umci / saa_plus / saa / mmr are not registered in clipsam.methods")

CLIPSAM_REC = """
model:
  method: umci
  refiner: mmr
  method_config:
    clip: {model_name: clipsam-tiny, pretrained: null, layers: [1, 2, 3, 4], frozen_dtype: float32}
  evaluation:
    fusion: mean
"""

SAA_TINY = """
model:
  method: %s
  refiner: none
  method_config:
    detector: {model: tiny, min_size: 64, max_size: 128}
    sam: {variant: tiny}
    saliency_backbone: resnet10t
    saliency_pretrained: false
    saliency_single_size: 64
    saliency_multi_size: 128
"""


def _config(tmp: Path, name: str, text: str) -> list[str]:
    path = tmp / f"{name}.yaml"
    path.write_text(text)
    return ["--config", str(path)]


def _per_category(run_dir: Path) -> dict:
    return json.loads((run_dir / "test_results.json").read_text())["results"]["per_category"]


def test_clipsam_rec_fits_tests_and_predicts(in_tmp_cwd: Path) -> None:
    args = [*fast_args(in_tmp_cwd), *_config(in_tmp_cwd, "clipsam_rec", CLIPSAM_REC)]
    fit = run_cli(["fit", *args])
    ckpt = Path(fit.trainer.checkpoint_callback.last_model_path)
    state = torch.load(ckpt, map_location="cpu", weights_only=True)["state_dict"]
    assert state and all(".layers." in k for k in state), "only UMCI's parameters are checkpointed"
    test = run_cli(["test", *args, "--ckpt_path", str(ckpt)])
    per_category = _per_category(Path(test.trainer.log_dir))
    assert sorted(per_category) == ["capsule", "mesh", "stripes"]
    assert all(0.0 <= v["pixel_auroc"] <= 1.0 for v in per_category.values())
    predict = run_cli(["predict", *args, "--ckpt_path", str(ckpt)])
    writer = next(cb for cb in predict.trainer.callbacks if type(cb).__name__ == "PredictionWriter")
    assert list((writer.run_dir / "masks").glob("*.png"))


@pytest.mark.parametrize("method", ["saa_plus", pytest.param("saa", marks=pytest.mark.slow)])
def test_saa_tests_and_predicts_and_refuses_fit(in_tmp_cwd: Path, method: str) -> None:
    args = [*fast_args(in_tmp_cwd), *_config(in_tmp_cwd, method, SAA_TINY % method)]
    test = run_cli(["test", *args])
    per_category = _per_category(Path(test.trainer.log_dir))
    assert sorted(per_category) == ["capsule", "mesh", "stripes"]
    predict = run_cli(["predict", *args])
    writer = next(cb for cb in predict.trainer.callbacks if type(cb).__name__ == "PredictionWriter")
    assert list((writer.run_dir / "masks").glob("*.png"))
    with pytest.raises((ClipSamError, SystemExit), match="training-free|2"):
        run_cli(["fit", *args])
