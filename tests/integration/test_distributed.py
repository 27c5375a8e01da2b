"""Scale-out through Lightning's own DDP strategy (gloo, 2 CPU processes), driven by the CLI.

Issue 6, "Distributed": ``clipsam test`` with 2 processes gives the same per-category metrics as
with 1 process, and no image is counted twice or dropped. The data has 15 test images (5 per
category), an odd number, so the ``DistributedSampler`` really pads rank 1 with a repeated image
and ``PerCategoryMetrics`` must drop it again (it de-duplicates by the dataset ``index``).

Each CLI run is a child process (Lightning re-launches the script for rank 1) in its own working
directory, so each writes exactly one ``runs/demo/version_0``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.helpers.runs import (
    TEST_CATEGORIES,
    assert_complete_adapter_checkpoint,
    checkpoints,
    clipsam_cli,
    count_test_images,
    make_odd_synth_root,
    run_args,
)

DDP = ["--trainer.strategy=ddp", "--trainer.devices=2", "--trainer.accelerator=cpu"]
TOL = 1e-6


def _record_indices(folder: Path) -> str:
    spec = {"class_path": "tests.helpers.runs.RecordTestIndices", "init_args": {"dir": str(folder)}}
    return f"--trainer.callbacks+={json.dumps(spec)}"


def _only_run_dir(cwd: Path) -> Path:
    runs = sorted((cwd / "runs" / "demo").glob("version_*"))
    assert len(runs) == 1, f"expected one run directory under {cwd / 'runs/demo'}, found {[r.name for r in runs]}"
    return runs[0]


@pytest.fixture(scope="module")
def odd_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_odd_synth_root(tmp_path_factory.mktemp("ddp_data"))


@pytest.fixture(scope="module")
def ddp_fit(tmp_path_factory: pytest.TempPathFactory, odd_root: Path) -> Path:
    """``clipsam fit`` for 1 epoch with 2 DDP processes; returns its run directory."""
    cwd = tmp_path_factory.mktemp("ddp_fit")
    clipsam_cli(["fit", *run_args(cwd), *DDP], cwd=cwd, synth_root=odd_root)
    return _only_run_dir(cwd)


def test_random_adapters_do_not_depend_on_the_global_rng() -> None:
    """Adapters (and the random tiny CLIP) come from ``model.clip.seed`` alone, so every rank and
    every run builds the same ones whatever happened to the global RNG before."""
    from clipsam.models.clip import ClipConfig, build_clip_model

    config = ClipConfig(model_name="clipsam-tiny", pretrained=None, layers=[1, 2, 3, 4])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        first = build_clip_model(config, image_size=64).adapters.state_dict()
        torch.manual_seed(2)
        torch.rand(10)
        second = build_clip_model(config, image_size=64).adapters.state_dict()
    assert first.keys() == second.keys() and first
    assert all(torch.equal(first[k], second[k]) for k in first)


def test_ddp_fit_writes_one_run_with_complete_checkpoints(ddp_fit: Path, odd_root: Path) -> None:
    found = checkpoints(ddp_fit)
    # save_top_k=1 + save_last: one epoch checkpoint and last.ckpt, written once (by rank 0).
    # 15 training images over 2 ranks -> 8 per rank -> 2 steps of batch 4.
    assert [p.name for p in found] == ["epoch=0-step=2.ckpt", "last.ckpt"], found
    states = [assert_complete_adapter_checkpoint(p) for p in found]
    assert all(s["epoch"] == 0 and s["global_step"] == 2 for s in states)
    first, last = (s["state_dict"] for s in states)
    assert all(torch.equal(first[k], last[k]) for k in first), "last.ckpt differs from the epoch checkpoint"
    assert (ddp_fit / "config.yaml").is_file()


def _numbers(value: Any, name: str = "") -> dict[str, float]:
    """Flatten every number of a results dict, lists (PR curves) included: {"a/b/3": value}."""
    if isinstance(value, dict):
        items = value.items()
    elif isinstance(value, (list, tuple)):
        items = enumerate(value)
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        return {name: float(value)}
    else:
        return {}
    out: dict[str, float] = {}
    for key, item in items:
        out.update(_numbers(item, f"{name}/{key}" if name else str(key)))
    return out


def _assert_same_numbers(one: dict[str, Any], two: dict[str, Any], what: str) -> None:
    a, b = _numbers(one), _numbers(two)
    assert a.keys() == b.keys(), f"{what}: different keys {sorted(a.keys() ^ b.keys())}"
    bad = {
        k: (a[k], b[k])
        for k in a
        if not (math.isnan(a[k]) and math.isnan(b[k])) and not abs(a[k] - b[k]) <= TOL
    }
    assert not bad, f"{what}: 1 process vs 2 processes differ: {bad}"


def test_ddp_test_matches_one_process(ddp_fit: Path, odd_root: Path, tmp_path: Path) -> None:
    ckpt = ddp_fit / "checkpoints" / "last.ckpt"
    on_disk = count_test_images(odd_root)
    total = sum(on_disk.values())
    assert on_disk == {c: 5 for c in TEST_CATEGORIES}
    assert total % 2 == 1, "the total must be odd so that the 2-rank sampler pads"

    runs: dict[int, dict[str, Any]] = {}
    seen: dict[int, list[list[int]]] = {}
    for devices, extra in ((1, []), (2, DDP)):
        cwd = tmp_path / f"test_{devices}proc"
        cwd.mkdir()
        record = tmp_path / f"indices_{devices}proc"
        clipsam_cli(
            ["test", *run_args(cwd), *extra, "--ckpt_path", str(ckpt), _record_indices(record)],
            cwd=cwd,
            synth_root=odd_root,
        )
        report = json.loads((_only_run_dir(cwd) / "test_results.json").read_text())
        runs[devices] = report
        seen[devices] = [
            [int(x) for x in (record / f"rank{r}.txt").read_text().split()] for r in range(devices)
        ]

    # The sampler really padded: 2 ranks saw 16 rows (8 each) for 15 images, one image twice.
    one_rank, two_ranks = seen[1], seen[2]
    assert sorted(one_rank[0]) == list(range(total))
    assert [len(r) for r in two_ranks] == [math.ceil(total / 2)] * 2
    rows = two_ranks[0] + two_ranks[1]
    assert sorted(set(rows)) == list(range(total)), "an image was dropped under DDP"
    assert len(rows) == total + 1, "expected exactly one padded (repeated) image"

    # ... and the metric counted every image once: the counts match the files on disk.
    for devices, report in runs.items():
        per_category = report["results"]["per_category"]
        counts = {c: v["num_images"] for c, v in per_category.items()}
        assert counts == on_disk, f"{devices} process(es): images per category {counts}, on disk {on_disk}"
        assert report["results"]["num_images"] == total
        assert all(v["num_anomalous"] == 3 for v in per_category.values())

    _assert_same_numbers(runs[1]["results"], runs[2]["results"], "full method")
    assert runs[1]["clip_only"] is not None
    _assert_same_numbers(runs[1]["clip_only"], runs[2]["clip_only"], "CLIP-only baseline")


def test_ddp_predict_writes_every_image_once(tmp_path: Path, odd_root: Path, ddp_fit: Path) -> None:
    """Predict with 2 processes: each image of the folder gets exactly one mask and overlay, and
    one merged predictions.csv lists them all."""
    folder = odd_root / "mvtec" / "capsule" / "test"
    images = sorted(p for p in folder.rglob("*.png"))
    ckpt = ddp_fit / "checkpoints" / "last.ckpt"
    out = tmp_path / "predict_out"
    clipsam_cli(
        ["predict", *run_args(tmp_path), *DDP, f"--data.predict_dir={folder}", "--ckpt_path", str(ckpt)],
        cwd=tmp_path,
        synth_root=odd_root,
    )
    (run_dir,) = sorted(out.glob("version_*"))
    masks = sorted(p.name for p in (run_dir / "masks").iterdir())
    expected = sorted("__".join((*p.relative_to(folder).parent.parts, p.stem)) + ".png" for p in images)
    assert masks == expected
    assert sorted(p.name for p in (run_dir / "overlays").iterdir()) == expected
    rows = (run_dir / "predictions.csv").read_text().splitlines()
    assert len(rows) == 1 + len(images)
    assert not list(run_dir.glob(".predictions_rank*")), "per-process parts are merged and removed"
