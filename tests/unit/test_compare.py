"""``clipsam compare``: rows from hand-written test_results.json files, flags for runs that differ."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import pytest

from clipsam.compare import PAPER_TEST_SETS, build_comparison, collect_runs, comparison_csv_rows, comparison_markdown, load_run, paper_row
from clipsam.errors import ConfigError

VISA = {"format": "visa", "root": "/data/visa", "categories": None, "split": "test"}
MVTEC = {"format": "mvtec", "root": "/data/mvtec", "categories": None, "split": "test"}


def _report(
    directory: Path,
    *,
    method: str,
    refiner: str,
    test: dict[str, Any],
    per_category: dict[str, dict[str, float]],
    image_size: int = 518,
    dtype: str = "float32",
    images: int = 10,
) -> Path:
    """A test_results.json as ``clipsam test`` writes it (means are over categories)."""
    keys = list(next(iter(per_category.values())))
    mean = {k: sum(v[k] for v in per_category.values()) / len(per_category) for k in keys}
    payload = {
        "results": {
            "mean": mean,
            "num_images": images * len(per_category),
            "per_category": {c: {**v, "num_images": images} for c, v in per_category.items()},
        },
        "clip_only": None,
        "timings_seconds_per_image": {},
        "config": {"method": method},
        "run": {
            "method": method,
            "refiner": refiner,
            "fusion": "clip_boost" if refiner != "none" else "none",
            "image_size": image_size,
            "protocol": {"metrics": "clipsam.metrics.collection.PerCategoryMetrics", "metric_score_dtype": dtype},
            "data": {"train": MVTEC if test is VISA else VISA, "test": test},
        },
    }
    directory.mkdir(parents=True)
    (directory / "test_results.json").write_text(json.dumps(payload))
    return directory


def _metrics(auroc: float, f1: float, ap: float) -> dict[str, float]:
    return {"pixel_auroc": auroc, "pixel_f1_max": f1, "pixel_ap": ap}


def test_rows_are_methods_with_category_means_and_the_papers_numbers(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # These small hand-written reports stand for the paper's full test sets (paper numbers are
    # shown only beside runs on exactly those: tests/unit/test_reliability_21.py).
    monkeypatch.setitem(PAPER_TEST_SETS, "visa", ("VisA", frozenset({"pcb1", "candle"}), 20))
    monkeypatch.setitem(PAPER_TEST_SETS, "mvtec", ("MVTec-AD", frozenset({"bottle"}), 10))
    _report(tmp_path / "a" / "version_0", method="april_gan", refiner="none", test=VISA,
            per_category={"pcb1": _metrics(0.9, 0.3, 0.2), "candle": _metrics(0.8, 0.1, 0.1)})  # fmt: skip
    _report(tmp_path / "b" / "version_0", method="april_gan", refiner="ppg_cps", test=VISA,
            per_category={"pcb1": _metrics(0.95, 0.4, 0.3), "candle": _metrics(0.85, 0.2, 0.2)})  # fmt: skip
    _report(tmp_path / "c" / "version_3", method="april_gan", refiner="ppg_cps", test=MVTEC,
            per_category={"bottle": _metrics(0.7, 0.5, 0.4)})  # fmt: skip
    runs = collect_runs([str(tmp_path / "*")])  # a glob of run folders, searched recursively
    comparison = build_comparison(runs)

    assert [r.label for r in comparison.rows] == ["april_gan", "april_gan + ppg_cps"]
    assert comparison.datasets == ["visa", "mvtec"]
    assert comparison.flagged == []
    header, lines = comparison_csv_rows(comparison)
    by_key = {(line[0], line[4], line[7]): dict(zip(header, line)) for line in lines}
    plain = by_key[("april_gan", "visa", "mean")]
    assert plain["pixel_auroc"] == pytest.approx(85.0) and plain["pixel_f1_max"] == pytest.approx(20.0)
    assert plain["paper_pixel_auroc"] == 94.2, "APRIL-GAN's VisA AUROC in the paper"
    ours_mvtec = by_key[("april_gan + ppg_cps", "mvtec", "mean")]
    assert ours_mvtec["paper_pixel_ap"] == 46.4 and ours_mvtec["pixel_ap"] == pytest.approx(40.0)
    assert by_key[("april_gan + ppg_cps", "visa", "candle")]["pixel_auroc"] == pytest.approx(85.0)
    assert by_key[("april_gan + ppg_cps", "visa", "candle")]["paper_pixel_auroc"] is None

    markdown = comparison_markdown(comparison)
    assert "| april_gan | 85.0 (94.2) | 20.0 (32.3) | 15.0 (25.7) |" in markdown
    assert "| candle | 80.0 / 10.0 / 10.0 | 85.0 / 20.0 / 20.0 |" in markdown


def test_runs_in_another_frame_protocol_or_data_are_flagged_not_mixed(tmp_path: Path) -> None:
    per_category = {"pcb1": _metrics(0.9, 0.3, 0.2)}
    paths = [
        _report(tmp_path / "a", method="april_gan", refiner="none", test=VISA, per_category=per_category),
        _report(tmp_path / "b", method="april_gan", refiner="ppg_cps", test=VISA, per_category=per_category),
        _report(tmp_path / "c", method="winclip", refiner="none", test=VISA, per_category=per_category, image_size=240),
        _report(tmp_path / "d", method="sdp", refiner="none", test=VISA, per_category=per_category, dtype="float16"),
        _report(tmp_path / "e", method="anomalyclip", refiner="none", test={**VISA, "root": "/other/visa"},
                per_category=per_category),  # fmt: skip
        _report(tmp_path / "f", method="april_gan", refiner="none", test=VISA, per_category=per_category, images=3),
    ]
    comparison = build_comparison([load_run(p) for p in paths])
    flags = {(label, dataset): reason for label, dataset, reason in comparison.flagged}
    assert flags[("winclip", "visa")] == "frame 240 vs 518 of the other runs"
    assert "metric_score_dtype 'float16' vs 'float32'" in flags[("sdp", "visa")]
    assert "root '/other/visa' vs '/data/visa'" in flags[("anomalyclip", "visa")]
    # a second april_gan run on VisA stays its own row, flagged as a duplicate and for its data
    dup = [reason for label, _, reason in comparison.flagged if label == "april_gan (2)"]
    assert dup[0] == "duplicate of row 'april_gan' on visa" and "images" in dup[1]
    assert ("april_gan", "visa") not in flags and ("april_gan + ppg_cps", "visa") not in flags
    rows = {r.label: r for r in comparison.rows}
    assert rows["april_gan"].runs["visa"].path == paths[0] / "test_results.json"
    assert "winclip !" in comparison_markdown(comparison)


def test_old_reports_without_run_block_are_read_and_flagged(tmp_path: Path) -> None:
    path = tmp_path / "old" / "test_results.json"
    path.parent.mkdir()
    path.write_text(json.dumps({
        "results": {"mean": {"pixel_auroc": 0.5, "pixel_f1_max": 0.1, "pixel_ap": None}, "per_category": {}},
        "config": {"evaluation": {"use_sam": False}, "image_size": 224},
    }))  # fmt: skip
    run = load_run(path.parent)
    assert (run.method, run.refiner, run.image_size, run.mean["pixel_ap"]) == ("april_gan", "none", 224, None)
    assert build_comparison([run]).flagged[0][2].startswith("old report without a 'run' block")


def test_missing_or_foreign_files_are_config_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="matches no test_results.json"):
        collect_runs([str(tmp_path / "nothing*")])
    (tmp_path / "x.json").write_text("{}")
    with pytest.raises(ConfigError, match="x.json: not a clipsam test report"):
        load_run(tmp_path / "x.json")


def test_cli_writes_csv_and_markdown_and_never_overwrites(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from clipsam.cli import main

    _report(tmp_path / "run", method="april_gan", refiner="ppg_cps", test=VISA, per_category={"pcb1": _metrics(0.9, 0.3, 0.2)})
    out_csv, out_md = tmp_path / "cmp.csv", tmp_path / "cmp.md"
    assert main(["compare", str(tmp_path / "run"), "--csv", str(out_csv), "--markdown", str(out_md)]) == 0
    assert "april_gan + ppg_cps" in capsys.readouterr().out
    rows = list(csv.DictReader(out_csv.open()))
    assert [(r["label"], r["category"], r["pixel_auroc"]) for r in rows] == [
        ("april_gan + ppg_cps", "mean", "90.0"),
        ("april_gan + ppg_cps", "pcb1", "90.0"),
    ]
    assert main(["compare", str(tmp_path / "run"), "--csv", str(out_csv)]) == 2
    assert "cmp.csv exists" in capsys.readouterr().err


def test_paper_rows() -> None:
    assert paper_row("april_gan", "ppg_cps") == "this method"
    assert paper_row("winclip", "none") == "WinCLIP"
    assert paper_row("sdp", "none") is None  # SDP is not in the paper's table


def test_the_open_choices_of_each_run_are_shown(tmp_path: Path) -> None:
    """run.choices (the settings a paper leaves open, recorded by clipsam test) reach the
    Markdown settings table and the CSV's choices column; old reports show none."""
    run_dir = _report(tmp_path / "ours", method="april_gan", refiner="ppg_cps", test=VISA, per_category={"pcb1": _metrics(0.9, 0.5, 0.4)})
    path = run_dir / "test_results.json"
    payload = json.loads(path.read_text())
    payload["run"]["choices"] = {"refiner_config.prompt.threshold": 0.5, "evaluation.fusion": "clip_boost"}
    path.write_text(json.dumps(payload))
    plain = _report(tmp_path / "plain", method="winclip", refiner="none", test=VISA, per_category={"pcb1": _metrics(0.8, 0.4, 0.3)})
    comparison = build_comparison(collect_runs([str(run_dir), str(plain)]))
    markdown = comparison_markdown(comparison)
    assert "evaluation.fusion=clip_boost; refiner_config.prompt.threshold=0.5" in markdown
    header, lines = comparison_csv_rows(comparison)
    column = header.index("choices")
    by_label = {line[0]: line[column] for line in lines}
    assert by_label == {"april_gan + ppg_cps": "evaluation.fusion=clip_boost; refiner_config.prompt.threshold=0.5", "winclip": ""}


def test_musc_rows_show_muscs_own_reported_numbers(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """MuSc is not in the paper: its numbers are its README's (pixel AUROC 97.3 on MVTec-AD, 98.8 on
    VisA), shown beside musc runs with their source named; AdaCLIP has no reported row."""
    monkeypatch.setitem(PAPER_TEST_SETS, "visa", ("VisA", frozenset({"pcb1"}), 10))
    monkeypatch.setitem(PAPER_TEST_SETS, "mvtec", ("MVTec-AD", frozenset({"bottle"}), 10))
    per = {"pixel_auroc": 0.9, "pixel_f1_max": 0.3, "pixel_ap": 0.2, "image_auroc": 0.8}
    _report(tmp_path / "v", method="musc", refiner="none", test=VISA, per_category={"pcb1": per})
    _report(tmp_path / "m", method="musc", refiner="none", test=MVTEC, per_category={"bottle": per})
    _report(tmp_path / "a", method="adaclip", refiner="none", test=VISA, per_category={"pcb1": per})
    comparison = build_comparison(collect_runs([str(tmp_path / "*")]))
    assert paper_row("musc", "none") == "MuSc" and paper_row("adaclip", "none") is None
    header, lines = comparison_csv_rows(comparison)
    means = {(line[0], line[4]): dict(zip(header, line)) for line in lines if line[7] == "mean"}
    assert means[("musc", "mvtec")]["paper_pixel_auroc"] == 97.3 and means[("musc", "visa")]["paper_pixel_auroc"] == 98.8
    assert means[("musc", "visa")]["paper_pixel_f1_max"] == 48.8 and means[("musc", "visa")]["paper_pixel_ap"] == 45.1
    assert means[("adaclip", "visa")]["paper_pixel_auroc"] is None
    markdown = comparison_markdown(comparison)
    assert "| musc | 90.0 (98.8) | 30.0 (48.8) | 20.0 (45.1) | 80.0 (92.8) |" in markdown  # image AUROC too
    assert "MuSc: xrli-U/MuSc README.md" in markdown


def test_few_shot_runs_with_other_reference_images_are_flagged(tmp_path: Path) -> None:
    per_category = {"pcb1": _metrics(0.9, 0.3, 0.2), "candle": _metrics(0.8, 0.2, 0.1)}
    drawn = {"pcb1": ["good/001.png"], "candle": ["good/007.png"]}

    def few_shot(name: str, files: dict[str, list[str]], k: int = 1) -> Path:
        path = _report(tmp_path / name, method="winclip", refiner="none", test=VISA, per_category=per_category, image_size=240)
        payload = json.loads((path / "test_results.json").read_text())
        payload["run"]["references"] = {"seed": 0, "source": "train", "count": k, "files": files}
        (path / "test_results.json").write_text(json.dumps(payload))
        return path

    paths = [
        few_shot("a", drawn),
        few_shot("b", drawn),
        few_shot("c", {**drawn, "candle": ["good/003.png"]}),  # another draw
        few_shot("d", {c: [*f, "good/009.png"] for c, f in drawn.items()}, k=2),
        _report(tmp_path / "z", method="winclip", refiner="none", test=VISA, per_category=per_category, image_size=240),
    ]
    comparison = build_comparison([load_run(p) for p in paths])
    flags = {(label, dataset): reason for label, dataset, reason in comparison.flagged}
    assert flags[("winclip (3)", "visa")] == "reference images differ from the other few-shot runs: other files for candle"
    assert flags[("winclip (4)", "visa")] == "reference images differ from the other few-shot runs: k=2 vs k=1"
    same_or_zero_shot = [r for label, _, r in comparison.flagged if label in ("winclip", "winclip (2)", "winclip (5)")]
    assert not any("reference images" in reason for reason in same_or_zero_shot)
