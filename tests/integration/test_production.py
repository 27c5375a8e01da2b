"""The line user's path: fit -> test (calibrate thresholds) -> predict / Segmenter -> export.

One tiny fit and one test run are shared by the module (generated 64 px images, random tiny
CLIP and SAM); each test then checks one promise of issue 14.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import runpy
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from clipsam.cli import main
from tests.integration.conftest import DEMO_CONFIG, REPO, run_cli

SIZE = 64  # generated images are 64 x 64 and so is the frame: no resize between them


def _args(root: Path) -> list[str]:
    return [
        "--config",
        DEMO_CONFIG,
        f"--data.image_size={SIZE}",
        "--data.batch_size=4",
        "--data.test_batch_size=3",
        "--data.num_workers=0",
        "--trainer.max_epochs=1",
        "--trainer.enable_progress_bar=false",
        "--model.sam.embedding_cache_dir=",
        f"--model.evaluation.predict_dir={root / 'predict_out'}",
    ]


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A fit checkpoint and a test run with thresholds.json, in a private working directory."""
    from tests.helpers.runs import make_odd_synth_root

    root = tmp_path_factory.mktemp("prod")
    synth = make_odd_synth_root(root, image_size=SIZE)
    old_cwd, old_env = os.getcwd(), os.environ.get("CLIPSAM_SYNTH_ROOT")
    os.chdir(root)
    os.environ["CLIPSAM_SYNTH_ROOT"] = str(synth)
    try:
        with contextlib.redirect_stdout(io.StringIO()) as fit_out:
            fit = run_cli(["fit", *_args(root)])
        ckpt = Path(fit.trainer.checkpoint_callback.last_model_path)
        assert f"clipsam: checkpoint {ckpt}" in fit_out.getvalue(), "fit says where its checkpoint is"
        test = run_cli(["test", *_args(root), "--ckpt_path", str(ckpt)])
        test_dir = Path(test.trainer.log_dir)
        yield {"root": root, "synth": synth, "ckpt": ckpt, "test_dir": test_dir, "args": _args(root)}
    finally:
        os.chdir(old_cwd)
        if old_env is None:
            os.environ.pop("CLIPSAM_SYNTH_ROOT", None)
        else:
            os.environ["CLIPSAM_SYNTH_ROOT"] = old_env


def _config(trained: dict) -> dict:
    """The demo config as the CLI saw it (64 px frame), for the Python API."""
    from clipsam.api import load_config

    os.environ["CLIPSAM_SYNTH_ROOT"] = str(trained["synth"])
    config = load_config(DEMO_CONFIG)
    config["data"]["image_size"] = SIZE
    return config


def _predict(trained: dict, *extra: str) -> Path:
    os.chdir(trained["root"])
    runs_before = sorted((trained["root"] / "runs" / "demo").glob("version_*"))
    wandb_before = sorted((trained["root"] / "runs" / "demo" / "wandb").glob("offline-run-*"))
    predict = run_cli(["predict", *trained["args"], "--ckpt_path", str(trained["ckpt"]), *extra])
    writer = next(cb for cb in predict.trainer.callbacks if type(cb).__name__ == "PredictionWriter")
    # One version counter per command: no logger run folder, no W&B run, the config in the
    # predictions' own folder; predictions are not also kept in memory.
    assert sorted((trained["root"] / "runs" / "demo").glob("version_*")) == runs_before
    assert sorted((trained["root"] / "runs" / "demo" / "wandb").glob("offline-run-*")) == wandb_before
    assert (writer.run_dir / "config.yaml").is_file()
    assert predict.config["predict"]["return_predictions"] is False
    return writer.run_dir


def _rows(run_dir: Path) -> list[dict[str, str]]:
    with (run_dir / "predictions.csv").open(newline="") as handle:
        return list(csv.DictReader(handle))


def _written_mask(path: str) -> np.ndarray:
    with Image.open(path) as img:
        return np.asarray(img) > 0


def test_test_run_calibrates_thresholds(trained: dict) -> None:
    test_dir = trained["test_dir"]
    thresholds = json.loads((test_dir / "thresholds.json").read_text())
    report = json.loads((test_dir / "test_results.json").read_text())
    assert report["thresholds"] == thresholds, "test_results.json reports the thresholds it wrote"
    assert thresholds["method"] == "f1" and thresholds["scores"]["fusion"] == "clip_boost"
    for category, values in report["results"]["per_category"].items():
        # The F1 at the stored threshold is the F1-max the report states (same scores, exact).
        assert thresholds["pixel"]["per_category"][category]["f1"] == pytest.approx(values["pixel_f1_max"])
        assert thresholds["image"]["per_category"][category]["f1"] == pytest.approx(values["image_f1_max"])
    assert thresholds["image"]["global"] is not None and thresholds["pixel"]["global"] is not None


def test_predict_decides_with_the_thresholds(trained: dict) -> None:
    thresholds_file = trained["test_dir"] / "thresholds.json"
    thresholds = json.loads(thresholds_file.read_text())
    run_dir = _predict(
        trained,
        f"--model.evaluation.thresholds={thresholds_file}",
        "--model.evaluation.mask_source=score",
        "--data.predict_category=capsule",
    )
    rows = _rows(run_dir)
    assert rows and set(rows[0]) >= {"path", "label", "threshold", "category", "object_name", "pixel_threshold"}
    expected_image = thresholds["image"]["per_category"]["capsule"]["threshold"]
    expected_pixel = thresholds["pixel"]["per_category"]["capsule"]["threshold"]
    from clipsam import Segmenter

    seg = Segmenter.from_checkpoint(
        trained["ckpt"], _config(trained), thresholds=thresholds_file, overrides={"model.evaluation.mask_source": "score"}
    )
    for row in rows:
        for key in ("path", "mask", "overlay"):
            assert os.path.isabs(row[key]), f"{key} path is not absolute: {row[key]}"
        assert row["category"] == "capsule" and row["object_name"] == "capsule"
        assert float(row["threshold"]) == pytest.approx(expected_image)
        assert float(row["pixel_threshold"]) == pytest.approx(expected_pixel)
        assert row["label"] == str(int(float(row["image_score"]) >= float(row["threshold"])))
        result = seg.segment(row["path"], category="capsule")
        # mask_source=score: the mask is the fused score above the pixel threshold (frame = image size)
        assert np.array_equal(result.mask, result.scores >= expected_pixel)
        assert np.array_equal(_written_mask(row["mask"]), result.mask)
        assert int(row["anomalous_pixels"]) == int(result.mask.sum())


def test_segmenter_masks_equal_predict_masks(trained: dict) -> None:
    """Same checkpoint, config and thresholds: the API's masks are the files predict writes."""
    from clipsam import Segmenter

    cache = trained["root"] / "predict_embedding_cache"
    # SAM's final mask (default mask_source), default thresholds; the embedding cache is set
    # but predict leaves it off by default.
    run_dir = _predict(trained, f"--model.sam.embedding_cache_dir={cache}")
    assert not cache.exists() or not any(cache.rglob("*.pt")), "predict used the embedding cache by default"
    rows = _rows(run_dir)
    seg = Segmenter.from_checkpoint(trained["ckpt"], _config(trained), batch_size=2)
    results = seg.segment_batch([row["path"] for row in rows], category="capsule")
    for row, result in zip(rows, results):
        assert np.array_equal(_written_mask(row["mask"]), result.mask), row["path"]
        assert result.image_score == pytest.approx(float(row["image_score"]), abs=1e-6)
        assert result.label == bool(int(row["label"]))
        assert result.mask.shape == result.anomaly_map.shape == (SIZE, SIZE)
    # the same image as an array and as a PIL image
    with Image.open(rows[0]["path"]) as img:
        array = np.asarray(img.convert("RGB"))
        from_pil = seg.segment(img, category="capsule")
    assert np.array_equal(seg.segment(array, category="capsule").mask, results[0].mask)
    assert np.array_equal(from_pil.mask, results[0].mask)


def test_segmenter_returns_masks_at_the_original_size(trained: dict, tmp_path: Path) -> None:
    from clipsam import Segmenter

    seg = Segmenter.from_checkpoint(trained["ckpt"], _config(trained), category="capsule")
    rng = np.random.default_rng(0)
    wide = rng.integers(0, 255, (37, 90, 3), dtype=np.uint8)
    result = seg.segment(wide)
    assert result.mask.shape == result.scores.shape == result.anomaly_map.shape == (37, 90)
    assert result.mask.dtype == bool and result.scores.dtype == np.float32
    assert not list(tmp_path.iterdir()), "nothing written"


def test_thresholds_from_other_scores_are_refused(trained: dict, capsys: pytest.CaptureFixture[str]) -> None:
    os.chdir(trained["root"])
    code = main(
        [
            "predict",
            *trained["args"],
            "--ckpt_path",
            str(trained["ckpt"]),
            f"--model.evaluation.thresholds={trained['test_dir'] / 'thresholds.json'}",
            "--model.evaluation.fusion=clip",
        ]
    )
    assert code == 2
    assert "fusion" in capsys.readouterr().err


def test_bundle_round_trip(trained: dict, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from clipsam import Segmenter
    from clipsam.errors import WeightsError

    os.environ["CLIPSAM_SYNTH_ROOT"] = str(trained["synth"])
    bundle = tmp_path / "bundle"
    thresholds = trained["test_dir"] / "thresholds.json"
    args = ["export", "--ckpt_path", str(trained["ckpt"]), "--config", DEMO_CONFIG, "--set", f"data.image_size={SIZE}"]
    assert main([*args, "--format", "bundle", "--output", str(bundle), "--thresholds", str(thresholds), "--category", "capsule"]) == 0
    assert {p.name for p in bundle.iterdir()} == {"bundle.json", "config.yaml", "weights.pt", "thresholds.json", "versions.json"}
    saved = torch.load(bundle / "weights.pt", map_location="cpu", weights_only=True)
    trained_state = torch.load(trained["ckpt"], map_location="cpu", weights_only=True)["state_dict"]
    assert saved["state_dict"].keys() == trained_state.keys(), "the bundle holds the trainable weights"
    assert all(torch.equal(saved["state_dict"][k], v) for k, v in trained_state.items())
    assert "optimizer_states" not in saved

    images = sorted(str(p) for p in (trained["synth"] / "mvtec" / "capsule" / "test").rglob("*.png"))
    direct = Segmenter.from_checkpoint(trained["ckpt"], _config(trained), thresholds=thresholds, category="capsule")
    loaded = Segmenter.from_bundle(bundle)
    for a, b in zip(direct.segment_batch(images), loaded.segment_batch(images)):
        assert np.array_equal(a.mask, b.mask)
        assert a.image_score == b.image_score and a.label == b.label
        assert b.threshold_scope == "capsule"

    # An existing, non-empty output folder is never written into.
    assert main([*args, "--format", "bundle", "--output", str(bundle)]) == 2
    assert "not an empty folder" in capsys.readouterr().err
    # A bundle whose weights changed after export is refused.
    torch.save({"state_dict": {}, "clipsam": {}}, bundle / "weights.pt")
    with pytest.raises(WeightsError, match="sha256"):
        Segmenter.from_bundle(bundle)


def test_onnx_export_matches_pytorch(trained: dict, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    os.environ["CLIPSAM_SYNTH_ROOT"] = str(trained["synth"])
    out = tmp_path / "onnx"
    code = main(
        [
            "export", "--ckpt_path", str(trained["ckpt"]), "--config", DEMO_CONFIG, "--set", f"data.image_size={SIZE}",
            "--format", "onnx", "--output", str(out), "--category", "capsule",
        ]
    )  # fmt: skip
    assert code == 0
    printed = capsys.readouterr().out
    assert "checked producer" in printed and "checked sam_decoder" in printed and "clipsam serve --bundle" in printed
    manifest = json.loads((out / "bundle.json").read_text())
    # Stated tolerance: 1e-4 absolute on maps/scores in [0, 1] and on SAM's mask logits (float32).
    assert set(manifest["check"]["max_abs_diff"]) == {"producer", "image_score", "sam_encoder", "sam_decoder", "sam_decoder_vs_segment_anything"}
    assert max(manifest["check"]["max_abs_diff"].values()) < 1e-4
    assert list(manifest["categories"]) == ["capsule"]


def test_documented_example_runs(trained: dict, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    config = trained["root"] / "example.yaml"
    import yaml

    config.write_text(yaml.safe_dump(_config(trained)))
    images = sorted(str(p) for p in (trained["synth"] / "mvtec" / "capsule" / "test").rglob("*.png"))[:2]
    thresholds = str(trained["test_dir"] / "thresholds.json")
    monkeypatch.setattr(sys, "argv", ["segment.py", str(trained["ckpt"]), str(config), thresholds, *images])
    runpy.run_path(str(REPO / "docs" / "examples" / "segment.py"), run_name="__main__")
    printed = capsys.readouterr().out
    assert "threshold" in printed and "anomalous pixels" in printed
    assert all(Path(p).name in printed for p in images)


@pytest.mark.slow  # two more Segmenters and 8 forwards; the tile/stitch math is in tests/unit/test_tiling.py
def test_tiled_inference_runs_both_stages_per_tile(trained: dict) -> None:
    """A 128 x 128 image on a 128 x 128 canvas, 64 px tiles without overlap: each quadrant of
    the stitched result is the untiled result of that quadrant (no resize anywhere)."""
    from clipsam import Segmenter

    config = _config(trained)
    plain = Segmenter.from_checkpoint(trained["ckpt"], config, category="capsule")
    config["data"]["tiling"] = {"image_size": [2 * SIZE, 2 * SIZE], "overlap": 0}
    tiled = Segmenter.from_checkpoint(trained["ckpt"], config, category="capsule")
    paths = sorted((trained["synth"] / "mvtec" / "capsule" / "test").rglob("*.png"))[:4]
    quads = [np.asarray(Image.open(p).convert("RGB")) for p in paths]
    big = np.concatenate([np.concatenate(quads[:2], axis=1), np.concatenate(quads[2:], axis=1)], axis=0)
    whole = tiled.segment(big)
    assert whole.mask.shape == (2 * SIZE, 2 * SIZE)
    for k, part in enumerate(plain.segment_batch(quads)):
        y, x = (k // 2) * SIZE, (k % 2) * SIZE
        np.testing.assert_allclose(whole.anomaly_map[y : y + SIZE, x : x + SIZE], part.anomaly_map, atol=1e-5)
        assert np.array_equal(whole.mask[y : y + SIZE, x : x + SIZE], part.mask)
    # the image score is the configured reduction (max) of the stitched scores
    assert whole.image_score == pytest.approx(float(whole.scores.max()), abs=1e-6)


def test_predict_skips_a_file_that_fails_while_running(trained: dict, tmp_path: Path) -> None:
    """With validation off a broken file reaches the dataloader: it is skipped and listed, the
    other images are written, predictions.csv holds them."""
    folder = tmp_path / "line"
    images = sorted((trained["synth"] / "mvtec" / "capsule" / "test").rglob("*.png"))[:2]
    folder.mkdir()
    for i, path in enumerate(images):
        (folder / f"{i}.png").write_bytes(path.read_bytes())
    (folder / "2_broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    run_dir = _predict(trained, f"--data.predict_dir={folder}", "--data.validation=off")
    assert sorted(p.name for p in (run_dir / "masks").iterdir()) == ["0.png", "1.png"]
    assert [row["path"] for row in _rows(run_dir)] == [str(folder / "0.png"), str(folder / "1.png")]
    skipped = (run_dir / "skipped.txt").read_text().splitlines()
    assert len(skipped) == 1 and skipped[0].startswith(f"{folder / '2_broken.png'}\t") and "cannot decode" in skipped[0]
