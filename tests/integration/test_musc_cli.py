"""MuSc (transductive) through the command line on the generated demo data: ``clipsam test``
batches each category whole, so every image is scored against all the other test images of its
category, exactly as ``MuSc.score_category`` on that category alone."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.integration.conftest import REPO, fast_args, run_cli

MUSC_DEMO = str(REPO / "configs" / "methods" / "demo" / "musc.yaml")


def test_musc_test_scores_whole_categories(in_tmp_cwd: Path) -> None:
    args = [*fast_args(in_tmp_cwd), "--config", MUSC_DEMO, "--data.test_batch_size=2"]
    cli = run_cli(["test", *args, "--model.evaluation.num_overlays=0"])
    datamodule, module = cli.datamodule, cli.model
    assert datamodule.category_batches, "the pipeline asked for whole-category batches"
    loader = datamodule.test_dataloader()
    batches = list(loader)
    categories = sorted({s.category for s in datamodule.test_dataset.samples})
    assert [b["category"][0] for b in batches] == categories  # one batch per category, data.test_batch_size unused
    for batch in batches:
        assert set(batch["category"]) == {batch["category"][0]}
        expected = sum(s.category == batch["category"][0] for s in datamodule.test_dataset.samples)
        assert len(batch["category"]) == expected
    # the result of the run equals the producer on each whole category
    producer = module.pipeline.build_producer()
    with torch.no_grad():
        whole = producer.score_category(batches[0][producer.input_key], batches[0]["category"][0])
        via_pipeline = module.pipeline(batches[0])
    torch.testing.assert_close(via_pipeline["anomaly_map"], whole.anomaly_map)
    torch.testing.assert_close(via_pipeline["image_scores"], whole.image_scores)
    report = json.loads((Path(cli.trainer.log_dir) / "test_results.json").read_text())
    assert sorted(report["results"]["per_category"]) == categories


def test_musc_refuses_tiling_in_one_line(in_tmp_cwd: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from clipsam.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["test", *fast_args(in_tmp_cwd), "--config", MUSC_DEMO, "--allow_untrained=true",
              "--model.tiling.image_size=128"])  # fmt: skip
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err and err[-1].startswith("clipsam: error:") and "model.tiling" in err[-1], err
