"""Issue 21, overlays a person reads at a glance: heat only above the pixel threshold, the mask's
outline, the decision with score and threshold, the file's path, a colour bar; headers wrapped,
never cut; test examples drawn per category; predict's summary printed after its progress bar.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from PIL import Image

from clipsam.callbacks import (
    ANOMALOUS_RGB,
    MIN_OVERLAY_WIDTH,
    ConsoleReport,
    annotated_overlay,
    render_overlay,
    text_block,
    wrap_text,
)
from clipsam.reporting import display_path, overlay_caption, render_panel

REPO = Path(__file__).resolve().parents[2]
CAPTION = (
    "capsule/Data/Images/Anomaly/000.JPG | capsule | score 0.761 | threshold 0.194 | anomalous | "
    "truth: anomalous | example: anomalous, highest score"
)


# ------------------------------------------------------------------ text never cut
@pytest.mark.parametrize("width", [60, 160, 320, 2000])
def test_wrapped_lines_fit_and_keep_every_character(width: int) -> None:
    text = CAPTION + " " + "a_very_long_folder_name_without_any_space" * 3
    for scale in (0.45, 1.0):
        lines = wrap_text(text, width, scale=scale)
        for line in lines:
            assert cv2.getTextSize(line, cv2.FONT_HERSHEY_SIMPLEX, scale, 1)[0][0] <= width or len(line) == 1, line
        assert "".join(lines).replace(" ", "") == text.replace(" ", ""), "nothing dropped"


def test_a_panel_header_is_wrapped_not_cut() -> None:
    side = 32  # a 160-px-wide panel: the caption needs several lines
    overlay = {
        "path": "/data/visa/capsule/Data/Images/Anomaly/000.JPG",
        "relative_path": "capsule/Data/Images/Anomaly/000.JPG",
        "category": "capsule",
        "anomalous": True,
        "image_score": 0.761,
        "kind": "anomalous_best",
        "image": torch.zeros(3, side, side, dtype=torch.uint8),
        "gt": torch.zeros(side, side, dtype=torch.bool),
        "clip_map": torch.zeros(side, side),
        "scores": torch.zeros(side, side),
        "mask": torch.zeros(side, side, dtype=torch.bool),
    }
    thresholds = {"image": {"global": {"threshold": 0.5}, "per_category": {"capsule": {"threshold": 0.194}}}}
    caption = overlay_caption(overlay, thresholds)
    assert caption == CAPTION, "the folder, the decision, the truth and which example"
    panel = render_panel(overlay, caption)
    plain = render_panel(overlay)
    header = panel[: panel.shape[0] - side]
    assert np.array_equal(panel[-side:], plain) and panel.shape[1] == 5 * side
    strip = text_block([(caption, (255, 255, 255))], 5 * side)
    assert strip.shape[0] >= 4 * 10, "several lines"
    margin = 2
    assert not strip[:, -margin:].any(), "no text runs into the right edge (cut)"
    assert header.shape[0] > strip.shape[0], "column titles and the colour bar below the caption"
    red = (np.abs(header[: strip.shape[0]].astype(int) - np.array(ANOMALOUS_RGB)).sum(axis=2) < 60).sum()
    assert red > 10, "an anomalous example's caption is red"


def test_paths_below_the_dataset_root_not_bare_names(tmp_path: Path) -> None:
    root = tmp_path / "mvtec"
    image = root / "capsule" / "test" / "crack" / "000.png"
    assert display_path(image, root) == "capsule/test/crack/000.png"
    assert display_path(image, tmp_path / "elsewhere") == "test/crack/000.png"
    assert display_path("000.png") == "000.png"


# ------------------------------------------------------------------ predict overlays
def _scene() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    image = np.full((60, 80, 3), 128, np.uint8)
    image[..., 1] = np.arange(80, dtype=np.uint8)[None, :]
    scores = np.full((60, 80), 0.1, np.float32)
    scores[20:40, 30:50] = 0.9
    mask = scores > 0.5
    return image, scores, mask


def test_heat_only_above_the_floor_and_the_mask_outlined() -> None:
    image, scores, mask = _scene()
    out = render_overlay(image, scores, mask, floor=0.5)
    calm = scores < 0.5
    ring = cv2.dilate(mask.astype(np.uint8), np.ones((7, 7), np.uint8)).astype(bool) & ~mask
    assert np.array_equal(out[calm & ~ring], image[calm & ~ring]), "below the floor the photo keeps its colours"
    inside = mask & ~cv2.dilate((~mask).astype(np.uint8), np.ones((7, 7), np.uint8)).astype(bool)
    assert not np.array_equal(out[inside], image[inside]), "above the floor it is tinted"
    edge = mask & cv2.dilate((~mask).astype(np.uint8), np.ones((3, 3), np.uint8)).astype(bool)
    assert (out[edge] == 255).all(axis=1).mean() > 0.5, "the mask's outline is drawn in white"
    tinted_everywhere = render_overlay(image, scores, mask)  # no floor: the old behaviour
    assert not np.array_equal(tinted_everywhere[calm & ~ring], image[calm & ~ring])


def test_the_predict_overlay_says_label_score_threshold_and_path() -> None:
    image, scores, mask = _scene()
    out = annotated_overlay(
        image, scores, mask, name="lot_7/part_0042.png", category="capsule",
        image_score=0.81, image_threshold=0.64, pixel_threshold=0.5, label=True, threshold_scope="capsule",
    )  # fmt: skip
    factor = -(-MIN_OVERLAY_WIDTH // 80)
    assert out.shape[1] == 80 * factor, "a small image is enlarged by a whole factor so the text is legible"
    photo = cv2.resize(render_overlay(image, scores, mask, floor=0.5), None, fx=factor, fy=factor, interpolation=cv2.INTER_NEAREST)
    rows = [y for y in range(out.shape[0] - photo.shape[0] + 1) if np.array_equal(out[y : y + photo.shape[0]], photo)]
    assert len(rows) == 1, "the photo appears once, whole, between the header and the legend"
    top, bottom = rows[0], rows[0] + photo.shape[0]
    header, legend = out[:top], out[bottom:]
    assert header.shape[0] > 20 and legend.shape[0] > 20
    red = (np.abs(header.astype(int) - np.array(ANOMALOUS_RGB)).sum(axis=2) < 60).sum()
    assert red > 20, "ANOMALOUS in red"
    assert (legend.reshape(-1, 3).std(axis=0) > 0).all(), "a colour bar below the photo"
    normal = annotated_overlay(
        image, scores, mask, name="x.png", category="capsule", image_score=0.2, image_threshold=0.64,
        pixel_threshold=0.5, label=False,
    )  # fmt: skip
    assert (np.abs(normal[:top].astype(int) - np.array(ANOMALOUS_RGB)).sum(axis=2) < 60).sum() == 0, "normal is not red"


# ------------------------------------------------------------------ examples per category
def _batch(category: str, labels: list[int], scores: list[float], start: int) -> tuple[dict, dict]:
    n = len(labels)
    batch = {
        "path": [f"/data/{category}/img_{start + i}.png" for i in range(n)],
        "category": [category] * n,
        "label": torch.tensor(labels),
        "image": torch.zeros(n, 3, 8, 8),
        "mask": torch.zeros(n, 8, 8),
    }
    result = {
        "image_scores": torch.tensor(scores),
        "anomaly_map": torch.zeros(n, 8, 8),
        "scores": torch.zeros(n, 8, 8),
        "mask": torch.zeros(n, 8, 8, dtype=torch.bool),
    }
    return batch, result


def _evaluator(cap: int):
    from clipsam.evaluation import EvalConfig, Evaluator

    return Evaluator(EvalConfig(num_overlays=cap), ["a", "b", "c"], device=torch.device("cpu"), with_refiner=True)


def test_examples_are_drawn_per_category_best_and_worst() -> None:
    evaluator = _evaluator(12)
    batches = [
        _batch("a", [1, 1, 1, 0, 0, 0], [0.9, 0.2, 0.5, 0.1, 0.8, 0.3], 0),
        _batch("b", [1, 1, 0, 0], [0.7, 0.6, 0.05, 0.65], 0),
        _batch("c", [1, 0], [0.4, 0.3], 0),
    ]
    for batch in batches:
        evaluator._collect_overlays(*batch)
    picked = {(o["category"], o["kind"]): Path(o["path"]).name for o in evaluator.overlays}
    assert picked[("a", "anomalous_best")] == "img_0.png" and picked[("a", "anomalous_worst")] == "img_1.png"
    assert picked[("a", "normal_worst")] == "img_4.png" and picked[("a", "normal_best")] == "img_3.png"
    assert picked[("b", "normal_worst")] == "img_3.png", "a false alarm is shown"
    assert ("c", "anomalous_best") in picked and ("c", "anomalous_worst") not in picked, "one image is shown once"
    assert len(evaluator.overlays) == 10  # a: 4, b: 4, c: its one anomalous and one normal image


def test_a_cap_spreads_the_examples_over_the_categories_the_same_way_every_time() -> None:
    runs = []
    for order in (1, -1):
        evaluator = _evaluator(3)
        batches = [_batch(c, [1, 1, 0, 0], [0.9, 0.2, 0.1, 0.8], 0) for c in ("a", "b", "c")][::order]
        for batch in batches:
            evaluator._collect_overlays(*batch)
        runs.append([(o["category"], o["kind"]) for o in evaluator.overlays])
    assert runs[0] == runs[1], "seeded: the batch order does not change what is shown"
    assert sorted(c for c, _ in runs[0]) == ["a", "b", "c"] and {k for _, k in runs[0]} == {"anomalous_best"}


# ------------------------------------------------------------------ predict prints after its progress bar
def test_console_report_waits_for_the_end_of_the_run(capsys: pytest.CaptureFixture[str]) -> None:
    report = ConsoleReport()
    report.print("clipsam: wrote 3 masks and overlays to /x")
    assert capsys.readouterr().out == ""
    report.teardown(None, None, "predict")  # type: ignore[arg-type]
    assert "clipsam: wrote 3 masks" in capsys.readouterr().out


def test_predict_prints_its_result_after_the_progress_bar(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    from clipsam.cli import main

    folder = tmp_path / "photos"
    folder.mkdir()
    for i in range(3):
        Image.fromarray(np.full((40, 40, 3), 60 * i, np.uint8)).save(folder / f"{i}.png")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("WANDB_MODE", "offline")
    code = main([
        "predict", "--config", str(REPO / "configs" / "demo.yaml"), "--data.image_size=64", "--data.num_workers=0",
        f"--data.predict_dir={folder}", f"--model.evaluation.predict_dir={tmp_path / 'out'}",
        "--model.refiner_config.sam.embedding_cache_dir=", "--allow_untrained=true", "--trainer.enable_progress_bar=true",
    ])  # fmt: skip
    out = capsys.readouterr().out
    assert code == 0, out[-2000:]
    assert "Predicting" in out and "clipsam: wrote 3 masks" in out, out[-2000:]
    assert out.index("Predicting") < out.index("clipsam: wrote 3 masks"), out[-2000:]
