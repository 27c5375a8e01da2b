"""Issue 21, W&B the way teams use it: names, groups, tags, job types, the fit's id in its
checkpoints (a resumed fit continues its W&B run, a test links to it), thresholds and the
decision rule, predict's counts and overlays, examples drawn per category.

Everything is read back from the OFFLINE run files: the ``run-<id>.wandb`` records (W&B's
LevelDB-style log of ``wandb.proto.wandb_internal_pb2.Record`` messages) and the run's
``files/media`` tables. The commands run in-process on small generated data with the demo's
tiny random models.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[2]
DEMO = str(REPO / "configs" / "demo.yaml")


# ------------------------------------------------------------------ reading an offline run
def _records(path: Path) -> Iterator[bytes]:
    """The raw records of a ``.wandb`` file: a 7-byte header (``:W&B``, magic, version), then
    32 KiB blocks of chunks, each ``crc32 (4) | length (2, LE) | type (1)`` + data; types
    FULL 1, FIRST 2, MIDDLE 3, LAST 4."""
    data = path.read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a W&B run file"
    pos, block, pending = 7, 32768, b""
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if kind == 0 and length == 0:  # block padding
            pos += left
            continue
        chunk = data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind == 1:
            yield chunk
        elif kind == 2:
            pending = chunk
        elif kind == 3:
            pending += chunk
        elif kind == 4:
            yield pending + chunk
            pending = b""


def _items(update: Any) -> dict[str, Any]:
    return {(item.key or ".".join(item.nested_key)): json.loads(item.value_json) for item in update}


def read_run(run_dir: Path) -> dict[str, Any]:
    """An offline run: its RunRecord fields, merged config, history keys, summary, tables."""
    from wandb.proto import wandb_internal_pb2 as pb

    (wandb_file,) = run_dir.glob("run-*.wandb")
    out: dict[str, Any] = {"config": {}, "history": {}, "summary": {}, "run": None}
    for raw in _records(wandb_file):
        record = pb.Record()
        record.ParseFromString(raw)
        kind = record.WhichOneof("record_type")
        if kind == "run":
            run = record.run
            out["run"] = {
                "id": run.run_id,
                "name": run.display_name,
                "group": run.run_group,
                "job_type": run.job_type,
                "tags": list(run.tags),
                "project": run.project,
            }
            out["config"].update(_items(run.config.update))
        elif kind == "config":
            out["config"].update(_items(record.config.update))
        elif kind == "history":
            out["history"].update(_items(record.history.item))
        elif kind == "summary":
            out["summary"].update({k: v for k, v in _items(record.summary.update).items() if k})
    out["tables"] = {}
    for table in (run_dir / "files" / "media" / "table").rglob("*.table.json"):
        key = table.relative_to(run_dir / "files" / "media" / "table").as_posix().rsplit("_", 2)[0]
        out["tables"][key] = json.loads(table.read_text())
    return out


def wandb_runs(folder: Path) -> list[Path]:
    return sorted(folder.rglob("offline-run-*"), key=lambda p: p.name)


# ------------------------------------------------------------------ the runs
@pytest.fixture(scope="module")
def flow(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """fit (1 epoch) -> fit resumed (2nd epoch) -> test -> predict, W&B offline, in one folder."""
    from clipsam.cli import _build_cli
    from clipsam.data.synthetic import generate_synthetic

    root = tmp_path_factory.mktemp("wandb_flow")
    data = root / "synthetic"
    generate_synthetic(data, image_size=64, num_train_good=1, num_test_good=2, num_test_anomalous=3, seed=0, progress=False)
    saved = {k: os.environ.get(k) for k in ("CLIPSAM_SYNTH_ROOT", "WANDB_MODE", "WANDB_SILENT")}
    os.environ.update(CLIPSAM_SYNTH_ROOT=str(data), WANDB_MODE="offline", WANDB_SILENT="true")
    old = Path.cwd()
    os.chdir(root)
    common = [
        "--config", DEMO, "--data.image_size=64", "--data.batch_size=4", "--data.test_batch_size=4",
        "--data.num_workers=0", "--trainer.enable_progress_bar=false",
        f"--model.refiner_config.sam.embedding_cache_dir={root / 'cache'}",
        f"--model.evaluation.predict_dir={root / 'predict_out'}",
    ]  # fmt: skip
    try:
        fit = _build_cli(["fit", *common, "--trainer.max_epochs=1"])
        last = Path(fit.trainer.checkpoint_callback.last_model_path).resolve()
        fit_runs = wandb_runs(root / "runs" / "demo" / "wandb")
        resumed = _build_cli(["fit", *common, "--trainer.max_epochs=2", "--ckpt_path", str(last)])
        resumed_last = Path(resumed.trainer.checkpoint_callback.last_model_path).resolve()
        _build_cli(["test", *common, "--ckpt_path", str(resumed_last)])
        _build_cli(["predict", *common, "--ckpt_path", str(resumed_last)])
    finally:
        os.chdir(old)
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    runs = [read_run(p) for p in wandb_runs(root / "runs" / "demo" / "wandb")]
    by_job: dict[str, list[dict[str, Any]]] = {}
    for run in runs:
        by_job.setdefault(run["run"]["job_type"], []).append(run)
    (predict_dir,) = wandb_runs(root / "predict_out")
    return {
        "root": root,
        "last": last,
        "resumed_last": resumed_last,
        "first_fit": read_run(fit_runs[0]),
        "fits": by_job.get("fit", []),
        "test": by_job["test"][0],
        "predict": read_run(predict_dir),
        "predict_dir": predict_dir,
    }


NAME = "april_gan+ppg_cps mvtec->visa"


def test_fit_runs_are_named_grouped_tagged_and_typed(flow: dict[str, Any]) -> None:
    run = flow["first_fit"]["run"]
    assert run["name"] == NAME
    assert run["job_type"] == "fit"
    assert run["group"] == f"fit {run['id']}"
    for tag in ("method:april_gan", "refiner:ppg_cps", "train:mvtec", "test:visa", "frame:64x64", "protocol:float32", "job:fit"):
        assert tag in run["tags"], run["tags"]
    config = flow["first_fit"]["config"]
    assert config["subcommand"] == "fit" and config["wandb_run"]["id"] == run["id"]
    assert any(key.startswith("train/loss") for key in flow["first_fit"]["history"])


def test_the_checkpoint_keeps_the_fit_run_and_a_resume_continues_it(flow: dict[str, Any]) -> None:
    import torch

    first = flow["first_fit"]["run"]
    saved = torch.load(flow["last"], map_location="cpu", weights_only=True)
    assert saved["clipsam_wandb"]["id"] == first["id"]
    assert saved["clipsam_wandb"]["group"] == first["group"] and saved["clipsam_wandb"]["train"] == "mvtec"
    fits = flow["fits"]
    assert len(fits) == 2, "the resumed fit writes a second offline file of the SAME run"
    assert {f["run"]["id"] for f in fits} == {first["id"]}
    resumed = next(f for f in fits if f["config"].get("resumed_from"))
    assert resumed["config"]["resumed_from"] == str(flow["last"])
    again = torch.load(flow["resumed_last"], map_location="cpu", weights_only=True)
    assert again["clipsam_wandb"]["id"] == first["id"]


def test_a_test_run_joins_its_fit_and_logs_thresholds_and_the_rule(flow: dict[str, Any]) -> None:
    test = flow["test"]
    run = test["run"]
    fit_id = flow["first_fit"]["run"]["id"]
    assert run["name"] == NAME and run["job_type"] == "test" and run["id"] != fit_id
    assert run["group"] == f"fit {fit_id}", "a test of a checkpoint is grouped with its fit"
    assert "job:test" in run["tags"] and "test:visa" in run["tags"]
    assert test["config"]["fit_run"]["id"] == fit_id
    assert test["config"]["fit_run"]["checkpoint"] == str(flow["resumed_last"])
    assert test["summary"]["fit_run_id"] == fit_id
    decision = test["config"]["decision"]
    assert decision["rule"] == "anomalous when score >= threshold" and decision["method"] == "f1"
    assert set(decision["scores"]) >= {"image_size"}
    for key in ("thresholds/image/global", "thresholds/pixel/global", "thresholds/image/capsule", "test/mesh/pixel_auroc"):
        assert key in test["history"], sorted(test["history"])[:40]
    thresholds = test["tables"]["thresholds"]
    assert thresholds["columns"][:3] == ["level", "scope", "threshold"]
    assert {(row[0], row[1]) for row in thresholds["data"]} >= {("image", "global"), ("pixel", "capsule")}
    assert test["tables"]["metrics/per_category"]["columns"][0] == "category"


def test_examples_are_drawn_per_category(flow: dict[str, Any]) -> None:
    table = flow["test"]["tables"]["examples"]
    rows = [dict(zip(table["columns"], row)) for row in table["data"]]
    assert len(rows) == 6, "configs/demo.yaml: num_overlays 6"
    assert {r["category"] for r in rows} == {"stripes", "mesh", "capsule"}, "every category, not the first one's images"
    kinds = {(r["category"], r["kind"]) for r in rows}
    for category in ("stripes", "mesh", "capsule"):
        assert (category, "anomalous, highest score") in kinds and (category, "anomalous, lowest score") in kinds
    assert all("/" in r["path"] for r in rows), "paths below the dataset root, not a bare file name"


def test_predict_logs_counts_labels_and_overlays_in_its_folder(flow: dict[str, Any]) -> None:
    predict = flow["predict"]
    run = predict["run"]
    fit_id = flow["first_fit"]["run"]["id"]
    assert run["job_type"] == "predict" and run["name"] == "april_gan+ppg_cps mvtec->capsule/test"
    assert run["group"] == f"fit {fit_id}" and "job:predict" in run["tags"]
    assert run["project"] == "clipsam-demo", "the WandbLogger of the config gives its settings"
    assert predict["config"]["fit_run"]["id"] == fit_id
    assert flow["predict_dir"].parent.parent.name == "version_0", "the W&B run lives in the predict folder"
    summary = predict["summary"]
    assert summary["predict/images"] == summary["predict/anomalous"] + summary["predict/normal"] > 0
    assert summary["predict/status"] == "finished" and summary["predict/skipped"] == 0
    labels = predict["tables"]["predict/labels"]
    assert labels["columns"][:4] == ["category", "images", "anomalous", "normal"]
    assert sum(row[1] for row in labels["data"]) == summary["predict/images"]
    overlays = predict["tables"]["predict/overlays"]
    assert 0 < len(overlays["data"]) <= 16 and overlays["columns"][-1] == "overlay"


def test_no_wandb_warning_reaches_the_console(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]) -> None:
    """The anonymous-setting warning wandb printed on every run despite WANDB_SILENT."""
    from lightning.pytorch.loggers import WandbLogger

    from clipsam.wandb_logging import configure_wandb

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    logger = WandbLogger(save_dir=str(tmp_path), project="p", offline=True)
    trainer = type("T", (), {"loggers": [logger]})()
    configure_wandb(trainer, model=_module(), datamodule=_datamodule(tmp_path), subcommand="test")
    capfd.readouterr()
    logger.experiment.finish()
    err = capfd.readouterr().err
    assert "wandb: WARNING" not in err, err


# ------------------------------------------------------------------ groups without a CLI run
def _module() -> Any:
    from clipsam.loading import build_module, load_config

    return build_module(load_config(DEMO))


def _datamodule(tmp_path: Path) -> Any:
    from clipsam.data.datamodule import AnomalyDataModule, DatasetSpec

    return AnomalyDataModule(train=DatasetSpec(format="mvtec", root=str(tmp_path)), test=DatasetSpec(format="folder", root=str(tmp_path / "parts")))


def test_benchmark_grid_and_environment_groups(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from lightning.pytorch.loggers import WandbLogger

    from clipsam.wandb_logging import benchmark_group, configure_wandb

    assert benchmark_group("runs/benchmark/paper_table/cells/clipsam/visa/default/attempt_2") == "paper_table"
    assert benchmark_group("runs/benchmark/demo/fits/april_gan-mvtec-1a2b3c4d/attempt_1") == "demo"
    assert benchmark_group("runs/demo/version_3") is None

    def configured(save_dir: Path, **init: Any) -> dict[str, Any]:
        logger = WandbLogger(save_dir=str(save_dir), project="clipsam-benchmark", offline=True, **init)
        trainer = type("T", (), {"loggers": [logger]})()
        configure_wandb(trainer, model=_module(), datamodule=_datamodule(tmp_path), subcommand="test", fit_record={"id": "abc", "group": "fit abc", "train": "mvtec"})
        return logger._wandb_init

    cell = tmp_path / "grid" / "cells" / "m" / "visa" / "default" / "attempt_1"
    init = configured(cell, name="m/visa/default")
    assert init["group"] == "grid" and init["name"] == "m/visa/default", "the benchmark's own name is kept"
    assert init["job_type"] == "test" and "test:folder:parts" in init["tags"] and "train:mvtec" in init["tags"]
    assert configured(tmp_path / "elsewhere")["group"] == "fit abc", "a test joins the fit it tests"
    assert configured(tmp_path / "elsewhere")["name"] == "april_gan+ppg_cps mvtec->folder:parts"
    monkeypatch.setenv("CLIPSAM_WANDB_GROUP", "sweep-7")
    assert configured(cell)["group"] == "sweep-7"
    assert configured(cell, group="mine")["group"] == "mine", "a group the user set wins"


def test_predict_opens_no_wandb_run_without_a_wandb_logger(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import numpy as np
    from PIL import Image

    from clipsam.cli import main

    folder = tmp_path / "photos"
    folder.mkdir()
    Image.fromarray(np.full((40, 40, 3), 90, np.uint8)).save(folder / "a.png")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("WANDB_MODE", "offline")
    args = [
        "predict", "--config", DEMO, "--data.image_size=64", "--data.num_workers=0", f"--data.predict_dir={folder}",
        f"--model.evaluation.predict_dir={tmp_path / 'out'}", "--model.refiner_config.sam.embedding_cache_dir=",
        "--allow_untrained=true", "--trainer.enable_progress_bar=false",
    ]  # fmt: skip
    csv_only = '[{"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"save_dir": "runs"}}]'
    assert main([*args, f"--trainer.logger={csv_only}"]) == 0
    run = tmp_path / "out" / "version_0"
    assert (run / "predictions.csv").is_file() and not (run / "wandb").exists()
    assert not (tmp_path / "runs").exists(), "predict has no logger run folder"
