"""MuSc (transductive) under DDP: ``clipsam test`` on 2 CPU processes (gloo) equals 1 process.

Issue 23. Under DDP every process takes one batch per category holding its shard of the
category (blocks of ``encode_batch`` images dealt in turn, a padding duplicate where a process
gets no block: :mod:`clipsam.data.category_batches`); MuSc encodes its own images, gathers the
features of the whole category across the processes and scores the whole category
(:meth:`clipsam.methods.musc.MuSc.score_category_shard`).

The data (generated, MVTec layout, 64 px) has test categories of 5, 4 and 2 images and the runs
use ``encode_batch=2``, so with 2 processes the 5-image category is interleaved (process 0 holds
images 0, 1, 4 and process 1 images 2, 3: the gather must restore the order), the 4-image one is
split in halves and the 2-image one is one block, so process 1 gets a padding duplicate. Each run
is a child process (Lightning re-launches the script for rank 1), as in ``test_distributed.py``.
The fast checks at the top (one process) pin the sampler's dealing, Lightning's re-creation of
the sampler, the refusal of padded ``predict`` runs and the shard path without processes.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from lightning.pytorch import Callback, LightningModule, Trainer

from tests.helpers.runs import REPO, clipsam_cli, make_odd_synth_root, run_args

MUSC_DEMO = str(REPO / "configs" / "methods" / "demo" / "musc.yaml")
DDP = ["--trainer.strategy=ddp", "--trainer.devices=2", "--trainer.accelerator=cpu"]
SIZES = {"stripes": 5, "mesh": 4, "capsule": 2}  # test images per category (after the removals below)
ENCODE_BATCH = 2


class RecordMuscOutputs(Callback):
    """Save every test row this process scores to ``dir/rank<R>.pt``: dataset index, padding flag,
    category, the producer's map and image score (wraps the module's ``inference``)."""

    def __init__(self, dir: str) -> None:
        self.dir = dir
        self.rows: list[dict[str, Any]] = []

    def on_test_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        original: Callable[[dict[str, Any]], dict[str, torch.Tensor]] = pl_module.inference

        def recording(batch: dict[str, Any]) -> dict[str, torch.Tensor]:
            result = original(batch)
            pad = batch.get("category_pad", torch.zeros(len(batch["category"]), dtype=torch.bool))
            self.rows.append(
                {
                    "index": batch["index"].cpu(),
                    "pad": pad.cpu(),
                    "category": list(batch["category"]),
                    "map": result["anomaly_map"].detach().cpu(),
                    "score": result["image_scores"].detach().cpu(),
                }
            )
            return result

        pl_module.inference = recording  # type: ignore[method-assign]

    def on_test_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        Path(self.dir).mkdir(parents=True, exist_ok=True)
        torch.save(self.rows, Path(self.dir) / f"rank{trainer.global_rank}.pt")
        del pl_module.inference  # the class's method again


@pytest.fixture(scope="module")
def musc_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Generated MVTec-layout data; test categories trimmed to 5, 4 and 2 images."""
    root = make_odd_synth_root(tmp_path_factory.mktemp("musc_ddp_data"), layouts=("mvtec",))
    mvtec = root / "mvtec"
    for relative in (
        "mesh/test/good/001.png",
        "capsule/test/good/001.png",
        "capsule/test/scratch/000.png",
        "capsule/ground_truth/scratch/000_mask.png",
        "capsule/test/stain/000.png",
        "capsule/ground_truth/stain/000_mask.png",
    ):
        (mvtec / relative).unlink()
    return root


def _test_run(cwd: Path, root: Path, extra: list[str]) -> tuple[dict[str, Any], list[list[dict[str, Any]]]]:
    """``clipsam test`` with the demo MuSc config; returns the report and each rank's recorded rows."""
    cwd.mkdir()
    record = cwd / "record"
    callback = {"class_path": f"{__name__}.RecordMuscOutputs", "init_args": {"dir": str(record)}}
    clipsam_cli(
        [
            "test",
            *run_args(cwd),
            "--config",
            MUSC_DEMO,
            f"--model.method_config.encode_batch={ENCODE_BATCH}",
            "--model.evaluation.num_overlays=0",
            "--data.test.format=mvtec",
            f"--data.test.root={root / 'mvtec'}",
            f"--trainer.callbacks+={json.dumps(callback)}",
            *extra,
        ],
        cwd=cwd,
        synth_root=root,
        timeout=180.0,
    )
    (run_dir,) = sorted((cwd / "runs" / "demo").glob("version_*"))
    report = json.loads((run_dir / "test_results.json").read_text())
    ranks = sorted(record.glob("rank*.pt"))
    return report, [torch.load(p, weights_only=True) for p in ranks]


def _per_image(rows: list[dict[str, Any]]) -> dict[int, tuple[str, bool, torch.Tensor, torch.Tensor]]:
    """index -> (category, padding, map, score) of one rank's rows; an index twice on one rank fails."""
    out: dict[int, tuple[str, bool, torch.Tensor, torch.Tensor]] = {}
    for batch in rows:
        for i, index in enumerate(batch["index"].tolist()):
            assert index not in out, f"image {index} scored twice by one process"
            out[index] = (batch["category"][i], bool(batch["pad"][i]), batch["map"][i], batch["score"][i])
    return out


def _numbers(value: Any, name: str = "") -> dict[str, float]:
    """Every number of a results dict, flattened: {"a/b/3": value}."""
    if isinstance(value, dict):
        items: Any = value.items()
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


# ---------------------------------------------------------------------- fast checks, one process
@pytest.mark.parametrize("processes", [1, 2, 3])
@pytest.mark.parametrize("block", [1, 2, 4])
def test_sampler_deals_every_image_once_and_pads_empty_shards(processes: int, block: int) -> None:
    from clipsam.data.category_batches import CategoryBatchSampler, pad_key, split_key

    labels = ["b", "a", "b", "c", "a", "b", "a", "b", "b", "a", "c"]  # a: 4, b: 5, c: 2 images, mixed order
    groups = {c: [i for i, label in enumerate(labels) if label == c] for c in sorted(set(labels))}
    samplers = [CategoryBatchSampler(labels, num_replicas=processes, rank=r, block=block) for r in range(processes)]
    batches = [list(sampler) for sampler in samplers]
    assert all(len(sampler) == len(groups) == len(rank_batches) for sampler, rank_batches in zip(samplers, batches))
    for position, (category, indices) in enumerate(groups.items()):
        shards = [[split_key(k) for k in rank_batches[position]] for rank_batches in batches]
        assert all(shards), "every process takes part in every category"
        assert {labels[i] for shard in shards for i, _ in shard} == {category}
        real = [i for shard in shards for i, pad in shard if not pad]
        assert sorted(real) == indices, f"{category}: every image once"
        blocks = [indices[s : s + block] for s in range(0, len(indices), block)]
        for rank, shard in enumerate(shards):
            mine = [i for k, part in enumerate(blocks) if k % processes == rank for i in part]
            assert shard == ([(i, False) for i in mine] or [(indices[0], True)]), (category, rank, shard)
        padded = any(pad for shard in shards for _, pad in shard)
        assert padded == (category in samplers[0].padded_categories()) == (len(blocks) < processes)
    if processes == 1:  # one process: whole categories in dataset order, no padding keys
        assert batches[0] == list(groups.values())
    assert split_key(pad_key(7)) == (7, True) and split_key(7) == (7, False)


@pytest.mark.parametrize("mode", ["test", "predict"])
def test_lightning_keeps_the_shards_when_it_injects_its_distributed_sampler(mode: str) -> None:
    """Lightning 2.x (``_update_dataloader``) re-creates a ``BatchSampler`` subclass built inside a
    dataloader hook, with its own ``DistributedSampler`` as ``sampler``: the shards must not change."""
    from lightning.fabric.utilities.data import _replace_dunder_methods
    from lightning.pytorch.trainer.states import RunningStage
    from lightning.pytorch.utilities.data import _update_dataloader
    from torch.utils.data import BatchSampler, DataLoader
    from torch.utils.data.distributed import DistributedSampler

    from clipsam.data.category_batches import CategoryBatchSampler, CategoryShardDataset

    labels = ["a", "a", "a", "b", "b", "a"]  # a: blocks [0, 1] [2, 5]; b: one block [3, 4]
    items = [{"index": torch.tensor(i), "category": c} for i, c in enumerate(labels)]
    with _replace_dunder_methods(DataLoader, "dataset"), _replace_dunder_methods(BatchSampler):
        loader = DataLoader(
            CategoryShardDataset(items),  # type: ignore[arg-type]
            batch_sampler=CategoryBatchSampler(labels, num_replicas=2, rank=1, block=2),
        )
    stage = RunningStage.PREDICTING if mode == "predict" else RunningStage.TESTING
    injected = DistributedSampler(loader.dataset, num_replicas=2, rank=1, shuffle=False)
    updated = _update_dataloader(loader, injected, mode=stage)
    assert updated is not loader, "Lightning re-created the loader (the path this test is about)"
    got = [(b["index"].tolist(), b["category_pad"].tolist(), b["category"]) for b in updated]
    # process 1: a's second block; b has one block (process 0's), so a padding copy of image 3
    assert got == [([2, 5], [False, False], ["a", "a"]), ([3], [True], ["b"])]


def test_predict_with_more_processes_than_blocks_is_refused() -> None:
    """A padding duplicate would be written twice by ``predict`` (``test`` counts it once): refused."""
    from types import SimpleNamespace

    from clipsam.data.datamodule import AnomalyDataModule
    from clipsam.errors import ConfigError

    datamodule = AnomalyDataModule(num_workers=0)
    datamodule.set_category_batches(True, block=2)
    datamodule.trainer = SimpleNamespace(world_size=3, global_rank=2)  # type: ignore[assignment]
    dataset = SimpleNamespace(samples=[SimpleNamespace(category=c) for c in ["a"] * 6 + ["b"] * 3])
    assert len(list(datamodule._category_sampler(dataset, "test"))) == 2  # test: padding is fine
    with pytest.raises(ConfigError, match=r"category 'b' has 3 image\(s\), dealt in 2 block\(s\) of 2: predict with at most 2"):
        datamodule._category_sampler(dataset, "predict")


def test_shard_scoring_without_processes_is_whole_category_scoring() -> None:
    """Without torch.distributed the gathers are no-ops: the shard path on a whole category (plus a
    padding row) gives ``score_category``'s numbers exactly, the padding row its image's row."""
    from clipsam.methods.musc import MuscConfig, build, gather_objects, gather_rows

    config = MuscConfig(model_name="clipsam-tiny-240", pretrained=None, input_size=None, feature_layers=[0, 1, 2, 3], encode_batch=2)
    model = build(config, image_size=64)
    images = torch.randn(5, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    whole = model.score_category(images, "x")
    batch = torch.cat([images, images[3:4]])
    shard = model.score_category_shard(batch, [10, 11, 12, 13, 14, 13], "x", pad=[False] * 5 + [True])
    rows = torch.tensor([0, 1, 2, 3, 4, 3])
    assert torch.equal(shard.anomaly_map, whole.anomaly_map[rows])
    assert torch.equal(shard.image_scores, whole.image_scores[rows])
    assert torch.equal(shard.extras["patch_scores"], whole.extras["patch_scores"][rows])
    x = torch.arange(6.0).reshape(3, 2)
    assert gather_objects("v") == ["v"] and gather_rows([x], [3])[0] is x
    with pytest.raises(RuntimeError, match="padding rows of indices \\[99\\]"):
        model.score_category_shard(images[:3], [1, 2, 99], "x", pad=[False, False, True])


# ---------------------------------------------------------------------- clipsam test, 1 vs 2 processes
def test_musc_test_on_two_processes_equals_one(musc_root: Path, tmp_path: Path) -> None:
    one_report, one_ranks = _test_run(tmp_path / "one", musc_root, [])
    two_report, two_ranks = _test_run(tmp_path / "two", musc_root, DDP)
    assert len(one_ranks) == 1 and len(two_ranks) == 2
    total = sum(SIZES.values())

    # one process: one batch per category, each whole
    assert [len(b["index"]) for b in one_ranks[0]] == [SIZES[c] for c in sorted(SIZES)]
    single = _per_image(one_ranks[0])
    assert sorted(single) == list(range(total)) and not any(pad for _, pad, _, _ in single.values())

    # two processes: one batch per category on each, in the same order
    for rank_rows in two_ranks:
        assert [b["category"][0] for b in rank_rows] == sorted(SIZES)
        assert all(len(set(b["category"])) == 1 for b in rank_rows)
    shards = [_per_image(rows) for rows in two_ranks]
    real = [index for shard in shards for index, (_, pad, _, _) in shard.items() if not pad]
    assert sorted(real) == list(range(total)), "every image exactly once over the processes (padding aside)"
    padded = [(rank, index) for rank, shard in enumerate(shards) for index, (_, pad, _, _) in shard.items() if pad]
    capsule_first = min(i for i, (c, _, _, _) in single.items() if c == "capsule")
    assert padded == [(1, capsule_first)], f"expected one padding duplicate (capsule, on process 1), got {padded}"
    stripes = sorted(i for i, (c, _, _, _) in single.items() if c == "stripes")
    held = [sorted(set(stripes) & set(shard)) for shard in shards]
    assert held == [[stripes[0], stripes[1], stripes[4]], [stripes[2], stripes[3]]], f"stripes not dealt in blocks of 2: {held}"

    # the same maps and image scores, image by image (the padding duplicate included)
    max_map = max_score = 0.0
    for shard in shards:
        for index, (category, _, got_map, got_score) in shard.items():
            want_category, _, want_map, want_score = single[index]
            assert category == want_category
            max_map = max(max_map, float((got_map - want_map).abs().max()))
            max_score = max(max_score, float((got_score - want_score).abs()))
    print(f"1 vs 2 processes: max |map difference| {max_map:.3g}, max |image score difference| {max_score:.3g}")
    # Exactly equal: the backbone passes hold the same images (blocks of encode_batch) and the
    # gathered features are scored in the same order, so the float operations are the same.
    assert max_map == 0.0 and max_score == 0.0, (max_map, max_score)

    # the metrics count every image once and agree
    for report in (one_report, two_report):
        per_category = report["results"]["per_category"]
        assert {c: v["num_images"] for c, v in per_category.items()} == SIZES
        assert report["results"]["num_images"] == total
    a, b = _numbers(one_report["results"]), _numbers(two_report["results"])
    assert a.keys() == b.keys()
    bad = {k: (a[k], b[k]) for k in a if not (math.isnan(a[k]) and math.isnan(b[k])) and abs(a[k] - b[k]) > 1e-6}
    assert not bad, f"metrics differ between 1 and 2 processes: {bad}"


def test_memory_bound_counts_the_whole_category_under_ddp(musc_root: Path, tmp_path: Path) -> None:
    """``max_category_gib`` bounds the WHOLE category on every process: a bound between the
    estimates for 4 and 5 images refuses stripes (5 images), although no process holds more than
    3 of them; the run stops with one error line (no process is left waiting in a gather)."""
    from clipsam.methods.musc import MuscConfig, build, estimate_category_bytes

    chunk_mb = 0.001  # the distance block no longer dominates the estimate
    model = build(MuscConfig(model_name="clipsam-tiny-240", pretrained=None, input_size=None, feature_layers=[0, 1, 2, 3]), image_size=64)

    def estimate(images: int) -> int:
        return estimate_category_bytes(
            images, model.grid[0] * model.grid[1], model.width, 4, chunk_bytes=chunk_mb * 2**20, map_pixels=2 * 64 * 64
        )

    bound = (estimate(4) + estimate(5)) / 2 / 2**30
    cwd = tmp_path / "bounded"
    cwd.mkdir()
    proc = clipsam_cli(
        [
            "test",
            *run_args(cwd),
            "--config",
            MUSC_DEMO,
            f"--model.method_config.encode_batch={ENCODE_BATCH}",
            f"--model.method_config.distance_chunk_mb={chunk_mb}",
            f"--model.method_config.max_category_gib={bound!r}",
            "--model.evaluation.num_overlays=0",
            "--data.test.format=mvtec",
            f"--data.test.root={musc_root / 'mvtec'}",
            *DDP,
        ],
        cwd=cwd,
        synth_root=musc_root,
        timeout=180.0,
        check=False,
    )
    errors = [line for line in proc.stderr.splitlines() if line.startswith("clipsam: error:")]
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert errors and len(set(errors)) == 1, errors  # the same line (each process may print it)
    assert "category 'stripes' has 5 images" in errors[0] and "max_category_gib" in errors[0], errors[0]
