"""WinCLIP, SDP, SDP+ and AnomalyCLIP end to end through the command line on generated data
(tiny random stand-in models, configs/methods/demo/): fit where the method trains, then test and
predict."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.integration.conftest import REPO, fast_args, run_cli

registry = pytest.importorskip("clipsam.methods")
if not hasattr(registry, "METHODS"):  # the method registry and its Lightning glue live on main
    pytest.skip("clipsam.methods has no method registry in this tree", allow_module_level=True)

TRAINED = {"anomalyclip": "producer.prompts.", "sdp_plus": "producer.linears."}


@pytest.mark.parametrize("method", ["winclip", "sdp", "sdp_plus", "anomalyclip"])
def test_method_runs_end_to_end(method: str, in_tmp_cwd: Path) -> None:
    args = [*fast_args(in_tmp_cwd), "--config", str(REPO / "configs" / "methods" / "demo" / f"{method}.yaml")]
    ckpt_args: list[str] = []
    if method in TRAINED:
        fit = run_cli(["fit", *args])
        ckpt = Path(fit.trainer.checkpoint_callback.last_model_path)
        saved = torch.load(ckpt, map_location="cpu", weights_only=True)
        assert saved["state_dict"] and all(k.startswith(TRAINED[method]) for k in saved["state_dict"]), (
            "only the method's trained parameters are checkpointed"
        )
        ckpt_args = ["--ckpt_path", str(ckpt)]
    test = run_cli(["test", *args, "--model.evaluation.num_overlays=1", *ckpt_args])
    metrics = json.loads((Path(test.trainer.log_dir) / "test_results.json").read_text())
    per_category = metrics["results"]["per_category"]
    assert sorted(per_category) == ["capsule", "mesh", "stripes"]
    for values in per_category.values():
        assert 0.0 <= values["pixel_auroc"] <= 1.0 and 0.0 <= values["image_auroc"] <= 1.0

    predict = run_cli(["predict", *args, *ckpt_args])
    writer = next(cb for cb in predict.trainer.callbacks if type(cb).__name__ == "PredictionWriter")
    masks = sorted((writer.run_dir / "masks").glob("*.png"))
    rows = (writer.run_dir / "predictions.csv").read_text().strip().splitlines()
    assert masks and len(rows) == len(masks) + 1, "one mask and one CSV row per predicted image"
