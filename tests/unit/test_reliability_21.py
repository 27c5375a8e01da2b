"""Issue 21, reliability and UX (unit level): output names of a single predicted file, ambiguous
folder masks, thresholds and bundles edited by hand, run settings refused before a run folder,
CLIPSAM_CACHE, no network at import, one-line YAML and parser errors, the top-level help, Rich
output that never breaks a path, paper numbers only beside the paper's data, interrupted
benchmark cells.

The same faults through the real CLI: tests/integration/test_faults_21.py.
"""

from __future__ import annotations

import io
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import yaml

from clipsam.errors import ConfigError, DatasetError, WeightsError
from tests.helpers.data import write_image

REPO = Path(__file__).resolve().parents[2]
DEMO_CONFIG = REPO / "configs" / "demo.yaml"


# ------------------------------------------------------------------ 1. predict output names
def _writer_name(predict_dir: Path, image: Path) -> str:
    from clipsam.callbacks import PredictionWriter

    writer = PredictionWriter(str(predict_dir.parent / "out"))
    trainer = SimpleNamespace(datamodule=SimpleNamespace(predict_dir=str(predict_dir)))
    return writer._unique_name(str(image), trainer)  # type: ignore[arg-type]


def test_a_single_predicted_file_keeps_its_own_name(tmp_path: Path) -> None:
    photo = write_image(tmp_path / "photos" / "astronaut.png", np.zeros((8, 8, 3), np.uint8))
    assert _writer_name(photo, photo) == "astronaut"
    # a folder still names outputs by the path below it
    nested = write_image(tmp_path / "photos" / "good" / "000.png", np.zeros((8, 8, 3), np.uint8))
    assert _writer_name(tmp_path / "photos", nested) == "good__000"


# ------------------------------------------------------------------ 2. folder dataset masks
def _labelled(tmp_path: Path) -> Path:
    root = tmp_path / "parts"
    image = np.full((16, 16, 3), 90, np.uint8)
    write_image(root / "good" / "000.png", image)
    write_image(root / "anomalous" / "scratch" / "000.png", image)
    write_image(root / "anomalous" / "dent" / "000.png", image)
    return root


def _mask(value: int) -> np.ndarray:
    mask = np.zeros((16, 16), np.uint8)
    mask[4:8, 4:8] = value
    return mask


def test_one_mask_for_two_anomalous_images_of_one_name_is_refused(tmp_path: Path) -> None:
    from clipsam.data.folder import parse_folder

    root = _labelled(tmp_path)
    write_image(root / "masks" / "000.png", _mask(255))
    with pytest.raises(DatasetError) as info:
        parse_folder(root)
    message = str(info.value)
    assert "anomalous/dent/000.png" in message and "anomalous/scratch/000.png" in message, message
    assert "masks/000.png" in message and "mirror the sub-folders" in message, message
    assert "\n" not in message


def test_mirrored_masks_go_to_their_own_images(tmp_path: Path) -> None:
    from clipsam.data.folder import parse_folder

    root = _labelled(tmp_path)
    write_image(root / "masks" / "scratch" / "000.png", _mask(255))
    write_image(root / "masks" / "dent" / "000_mask.png", _mask(255))
    masks = {s.image_path.parent.name: Path(s.mask_path).relative_to(root).as_posix() for s in parse_folder(root) if s.label}
    assert masks == {"scratch": "masks/scratch/000.png", "dent": "masks/dent/000_mask.png"}


def test_a_mask_with_anomalous_pixels_for_a_good_image_is_refused(tmp_path: Path) -> None:
    from clipsam.data.folder import parse_folder

    root = _labelled(tmp_path)
    write_image(root / "masks" / "scratch" / "000.png", _mask(255))
    write_image(root / "masks" / "dent" / "000.png", _mask(255))
    write_image(root / "masks" / "good" / "000.png", _mask(0))  # all zero: fine
    assert len(parse_folder(root)) == 3
    write_image(root / "masks" / "good" / "000.png", _mask(255))
    with pytest.raises(DatasetError, match=r"masks/good/000.png marks anomalous pixels but its image .*good/000.png"):
        parse_folder(root)


# ------------------------------------------------------------------ 3. thresholds edited by hand
SCORES = {"method": "april_gan", "refiner": "ppg_cps", "fusion": "clip_boost", "image_score": "max", "image_size": 64}


def _thresholds(**changes: Any) -> dict[str, Any]:
    data: dict[str, Any] = {
        "method": "f1",
        "target_fpr": None,
        "rule": "anomalous when score >= threshold",
        "image": {"global": {"threshold": 0.5}, "per_category": {"capsule": {"threshold": 0.25}}},
        "pixel": {"global": {"threshold": 0.4}, "per_category": {"capsule": None}},
        "scores": dict(SCORES),
    }
    for dotted, value in changes.items():
        node = data
        *parents, leaf = dotted.split("__")
        for part in parents:
            node = node[part]
        node[leaf] = value
    return data


@pytest.mark.parametrize(
    ("change", "where"),
    [
        ({"image__per_category__capsule": {"threshold": float("nan")}}, "image.per_category.capsule.threshold is nan"),
        ({"image__global": {"threshold": float("inf")}}, "image.global.threshold is inf"),
        ({"pixel__global": {"threshold": -0.1}}, "pixel.global.threshold is -0.1"),
        ({"pixel__global": {"threshold": 1.5}}, "pixel.global.threshold is 1.5"),
        ({"image__global": {"threshold": "high"}}, "image.global.threshold is 'high', not a number"),
        ({"image__global": {"value": 0.5}}, "image.global must be null or an object with a 'threshold'"),
        ({"rule": "anomalous when score <= threshold"}, "rule is 'anomalous when score <= threshold'"),
        ({"method": "otsu"}, "method is 'otsu'"),
    ],
)
def test_bad_threshold_files_are_refused_when_loaded(tmp_path: Path, change: dict[str, Any], where: str) -> None:
    from clipsam.thresholds import load_thresholds

    path = tmp_path / "thresholds.json"
    path.write_text(json.dumps(_thresholds(**change)))  # NaN / Infinity as Python's json writes them
    with pytest.raises(ConfigError) as info:
        load_thresholds(path)
    message = str(info.value)
    assert message.startswith(f"model.evaluation.thresholds={path}: ") and where in message, message
    assert "\n" not in message


def test_valid_threshold_files_still_load(tmp_path: Path) -> None:
    from clipsam.thresholds import load_thresholds

    path = tmp_path / "thresholds.json"
    data = _thresholds(pixel__global={"threshold": 1.0000001192092896})  # an "fpr" threshold above scores of 1
    path.write_text(json.dumps(data))
    assert load_thresholds(path) == data


def test_thresholds_without_their_scores_record_are_refused(tmp_path: Path) -> None:
    from clipsam.thresholds import check_compatible

    data = _thresholds()
    del data["scores"]
    with pytest.raises(ConfigError, match=r"thresholds in bundle/thresholds.json do not record which scores"):
        check_compatible(data, SCORES, source="bundle/thresholds.json")
    check_compatible(_thresholds(), SCORES, source="x")


def test_a_bad_threshold_fails_when_the_model_is_built_not_at_segment(tmp_path: Path) -> None:
    from clipsam.loading import build_module, load_config

    path = tmp_path / "thresholds.json"
    path.write_text(json.dumps(_thresholds(image__global={"threshold": "high"})))
    config = load_config([DEMO_CONFIG, REPO / "configs" / "methods" / "demo" / "winclip.yaml"])
    config["model"].setdefault("evaluation", {})["thresholds"] = str(path)
    with pytest.raises(ConfigError, match=r"image.global.threshold is 'high'"):
        build_module(config)


# ------------------------------------------------------------------ 4. bundles edited by hand
def _bundle(tmp_path: Path) -> Path:
    root = tmp_path / "bundle"
    root.mkdir(parents=True)
    manifest = {"format": "clipsam-bundle", "version": 1, "category": None, "weights_sha256": None}
    (root / "bundle.json").write_text(json.dumps(manifest))
    (root / "config.yaml").write_text(yaml.safe_dump({"model": {"method": "winclip", "evaluation": {"thresholds": None}}}))
    return root


def test_hand_edited_bundles_are_one_clear_error_naming_the_file(tmp_path: Path) -> None:
    from clipsam.loading import read_bundle

    assert read_bundle(_bundle(tmp_path / "ok"))[1] is None

    def refused(root: Path) -> str:
        with pytest.raises(WeightsError) as info:
            read_bundle(root)
        message = str(info.value)
        assert "dataset" not in message and "\n" not in message, message
        return message

    root = _bundle(tmp_path / "list")
    (root / "bundle.json").write_text("[]")
    assert f"{root / 'bundle.json'} holds a JSON list" in refused(root)
    root = _bundle(tmp_path / "no_config")
    (root / "config.yaml").unlink()
    assert f"{root / 'config.yaml'} is missing" in refused(root)
    root = _bundle(tmp_path / "bad_yaml")
    (root / "config.yaml").write_text("model: [\n")
    assert f"{root / 'config.yaml'} is not readable YAML" in refused(root)
    root = _bundle(tmp_path / "no_thresholds")
    (root / "config.yaml").write_text(yaml.safe_dump({"model": {"evaluation": {"thresholds": "thresholds.json"}}}))
    assert f"{root / 'thresholds.json'} is missing" in refused(root)
    assert f"bundle folder {tmp_path / 'nowhere'} does not exist: check the path" in refused(tmp_path / "nowhere")


def test_a_missing_image_is_not_called_a_dataset_problem(tmp_path: Path) -> None:
    from clipsam.data.samples import read_image

    with pytest.raises(DatasetError) as info:
        read_image(tmp_path / "part.png")
    assert str(info.value) == f"image file {tmp_path / 'part.png'} does not exist: check the path"


# ------------------------------------------------------------------ 5, 6. run settings, CLIPSAM_CACHE
@pytest.mark.parametrize(
    ("config", "subcommand", "key"),
    [
        ({"data": {"num_workers": -1}}, "test", "data.num_workers=-1"),
        ({"trainer": {"max_epochs": -5}}, "fit", "trainer.max_epochs=-5"),
        ({"trainer": {"max_epochs": 0}}, "fit", "trainer.max_epochs=0 trains nothing"),
        ({"trainer": {"max_steps": 0}}, "fit", "trainer.max_steps=0 trains nothing"),
    ],
)
def test_run_settings_that_would_fail_later_are_refused(config: dict, subcommand: str, key: str) -> None:
    from clipsam.runs import check_run_settings

    with pytest.raises(ConfigError, match=re.escape(key)):
        check_run_settings(config, subcommand)


def test_run_settings_that_work_pass() -> None:
    from clipsam.runs import check_run_settings

    check_run_settings({"data": {"num_workers": 0}, "trainer": {"max_epochs": -1, "max_steps": -1}}, "fit")
    check_run_settings({"trainer": {"max_epochs": 0}}, "test")  # test runs no epoch


def test_a_cache_variable_naming_a_file_is_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from clipsam.runs import check_cache_variable

    blocker = tmp_path / "cache"
    blocker.write_text("")
    monkeypatch.setenv("CLIPSAM_CACHE", str(blocker))
    config = {"model": {"refiner_config": {"sam": {"embedding_cache_dir": f"{blocker}/sam_embeddings"}}}}
    with pytest.raises(ConfigError) as info:
        check_cache_variable(config)
    message = str(info.value)
    assert f"CLIPSAM_CACHE={blocker}" in message and "model.refiner_config.sam.embedding_cache_dir" in message, message
    with pytest.raises(ConfigError, match=r"CLIPSAM_CACHE=.*the SAM weights \(\$CLIPSAM_CACHE/sam\) uses it"):
        check_cache_variable(sam_default=True)
    check_cache_variable({"data": {"root": str(tmp_path)}})  # nothing uses the variable: no error
    monkeypatch.setenv("CLIPSAM_CACHE", str(tmp_path / "folder"))
    check_cache_variable(config, sam_default=True)


# ------------------------------------------------------------------ 7. no network at import
def test_importing_clipsam_makes_no_network_connection() -> None:
    probe = (
        "import socket\n"
        "attempts = []\n"
        "def refuse(*args, **kwargs):\n"
        "    attempts.append(args[1:] or args)\n"
        "    raise OSError('network blocked by the test')\n"
        "socket.socket.connect = lambda self, address: refuse(self, address)\n"
        "socket.socket.connect_ex = lambda self, address: refuse(self, address)\n"
        "socket.getaddrinfo = refuse\n"
        "socket.create_connection = refuse\n"
        "import clipsam, clipsam.cli, clipsam.data.transforms, albumentations\n"
        "print('ATTEMPTS', len(attempts), attempts[:3])\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "NO_ALBUMENTATIONS_UPDATE"}
    proc = subprocess.run([sys.executable, "-c", probe], check=False, capture_output=True, text=True, cwd=REPO, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "ATTEMPTS 0 []" in proc.stdout, proc.stdout + proc.stderr[-2000:]
    assert "Error fetching version info" not in proc.stderr and "check for updates" not in proc.stderr, proc.stderr[-2000:]
    # a user's own setting is kept
    user = subprocess.run(
        [sys.executable, "-c", "import os, clipsam; print(os.environ['NO_ALBUMENTATIONS_UPDATE'])"],
        check=False, capture_output=True, text=True, cwd=REPO, env={**env, "NO_ALBUMENTATIONS_UPDATE": "0"}, timeout=120,
    )  # fmt: skip
    assert user.stdout.strip() == "0"


# ------------------------------------------------------------------ 8, 9. one-line errors, the top-level help
def _one_error(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    from clipsam.cli import main

    try:
        code = main(argv)
    except SystemExit as exit_:
        code = exit_.code
    err = capsys.readouterr().err
    assert code == 2, err[-3000:]
    lines = [line for line in err.splitlines() if line.startswith("clipsam: error: ")]
    assert len(lines) == 1 and "Traceback" not in err and "usage:" not in err, err[-3000:]
    assert len(err.strip().splitlines()) <= 2, err[-3000:]
    return lines[0]


def test_a_yaml_error_in_a_config_file_is_one_line_naming_the_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  method: april_gan\ndata:\n  image_size: [64\n  batch_size: 2\n")
    line = _one_error(["test", "--config", str(bad)], capsys)
    assert f"{bad}: " in line and "at line 5" in line, line
    line = _one_error(["test", "--config", str(DEMO_CONFIG), f"--data={bad}"], capsys)
    assert f"{bad}: " in line and "at line 5" in line, line
    duplicate = tmp_path / "duplicate.yaml"
    duplicate.write_text("data:\n  image_size: 64\ndata:\n  batch_size: 2\n")
    line = _one_error(["test", "--config", str(duplicate)], capsys)
    assert f"{duplicate}: " in line and "duplicate key data at line 3" in line, line
    line = _one_error(["test", "--config", str(DEMO_CONFIG), "--model.method_config.layers=[1,2"], capsys)
    assert "--model.method_config.layers=[1,2 is not a YAML value" in line, line


def test_parser_errors_are_one_line_with_the_suggestion(capsys: pytest.CaptureFixture[str]) -> None:
    line = _one_error(["test", "--config", str(DEMO_CONFIG), "--model.evaluation.fusin=clip"], capsys)
    assert "did you mean --model.evaluation.fusion?" in line and "clipsam test --help" in line, line


def test_top_level_help_lists_every_command_with_a_summary(capsys: pytest.CaptureFixture[str]) -> None:
    from clipsam.cli import COMMANDS, main

    with pytest.raises(SystemExit) as info:
        main(["--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert "Lightning Trainer command line tool" not in out
    for command in ("fit", "validate", "test", "predict", "compare", "benchmark", "data", "export"):
        assert re.search(rf"^  {command} +\S.*$", out, re.MULTILINE), command
        assert COMMANDS[command] in out
    for line in out.splitlines():  # every summary is whole (no sentence cut mid-way)
        assert len(line) <= 100, line


def test_a_mistyped_command_suggests_the_closest_of_all(capsys: pytest.CaptureFixture[str]) -> None:
    assert "did you mean `clipsam compare`?" in _one_error(["comapre", "runs"], capsys)
    assert "did you mean `clipsam benchmark`?" in _one_error(["benchmrk"], capsys)
    assert "did you mean `clipsam export`?" in _one_error(["exprot"], capsys)


# ------------------------------------------------------------------ 10. Rich output never breaks a path
def test_console_output_keeps_long_paths_whole_when_not_a_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    from clipsam.io import rich_console

    monkeypatch.delenv("COLUMNS", raising=False)
    path = "/runs/" + "/".join(["a_rather_long_folder_name"] * 6) + "/thresholds.json"
    buffer = io.StringIO()
    console = rich_console(file=buffer)
    console.print(f"thresholds: {path}  (use with --model.evaluation.thresholds=...)")
    assert path in buffer.getvalue()


def test_clipsam_makes_no_rich_console_of_its_own() -> None:
    offenders = [
        str(file.relative_to(REPO))
        for folder in ("clipsam", "scripts")
        for file in (REPO / folder).rglob("*.py")
        if "Console(" in file.read_text() and file != REPO / "clipsam" / "io.py"
    ]
    assert offenders == [], "use clipsam.io.rich_console()"


# ------------------------------------------------------------------ 11. paper numbers only beside the paper's data
def _report(directory: Path, *, fmt: str, images: dict[str, int], subset: Any = None, root: str = "/data") -> Path:
    per_category = {c: {"pixel_auroc": 0.9, "pixel_f1_max": 0.3, "pixel_ap": 0.2, "num_images": n} for c, n in images.items()}
    payload = {
        "results": {"mean": {"pixel_auroc": 0.9, "pixel_f1_max": 0.3, "pixel_ap": 0.2}, "per_category": per_category},
        "run": {
            "method": "april_gan", "refiner": "ppg_cps", "fusion": "clip_boost", "image_size": 518,
            "protocol": {"metrics": "x"},
            "data": {"test": {"format": fmt, "root": root, "categories": list(images), "split": "test", "subset": subset}},
        },
    }  # fmt: skip
    directory.mkdir(parents=True)
    (directory / "test_results.json").write_text(json.dumps(payload))
    return directory


VISA_IMAGES = {
    "candle": 200, "capsules": 160, "cashew": 150, "chewinggum": 150, "fryum": 150, "macaroni1": 200,
    "macaroni2": 200, "pcb1": 200, "pcb2": 200, "pcb3": 201, "pcb4": 201, "pipe_fryum": 150,
}  # fmt: skip


def test_paper_numbers_only_beside_runs_on_the_papers_test_sets(tmp_path: Path) -> None:
    from clipsam.compare import (
        PAPER_TEST_SETS,
        build_comparison,
        comparison_markdown,
        load_run,
        print_comparison,
    )
    from clipsam.data.mvtec import MVTEC_CATEGORIES
    from clipsam.data.visa import VISA_CATEGORIES
    from clipsam.io import rich_console

    real = build_comparison([load_run(_report(tmp_path / "real", fmt="visa", images=VISA_IMAGES))])
    assert "| april_gan + ppg_cps | 90.0 (94.8) | 30.0 (36.5) | 20.0 (28.0) |" in comparison_markdown(real)
    assert real.without_paper == []

    generated = build_comparison([load_run(_report(tmp_path / "synth", fmt="visa", images={"stripes": 12, "mesh": 12, "capsule": 12}))])
    subset = build_comparison([load_run(_report(tmp_path / "subset", fmt="visa", images={"pcb1": 200}))])
    for comparison in (generated, subset):
        markdown = comparison_markdown(comparison)
        assert "| april_gan + ppg_cps | 90.0 | 30.0 | 20.0 |" in markdown, markdown
        assert "(94.8)" not in markdown
        assert markdown.count("no paper number beside runs on other data") == 1
        buffer = io.StringIO()
        print_comparison(comparison, per_category=False, console=rich_console(file=buffer))
        assert buffer.getvalue().count("no paper number beside runs on other data") == 1
    assert "3 categories, 36 images" in generated.without_paper[0][2]
    assert "12 categories, 2162 images" in generated.without_paper[0][2]

    assert PAPER_TEST_SETS["mvtec"][1] == set(MVTEC_CATEGORIES) and PAPER_TEST_SETS["visa"][1] == set(VISA_CATEGORIES)
    assert sum(VISA_IMAGES.values()) == PAPER_TEST_SETS["visa"][2]


# ------------------------------------------------------------------ 12. interrupted benchmark cells
class _Killed(BaseException):
    """The benchmark process killed (kill -9) right after its command ended."""


def _grid(tmp_path: Path, methods: dict[str, Any] | None = None) -> Path:
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump({
        "root": str(tmp_path / "bench"),
        "configs": [str(DEMO_CONFIG)],
        "methods": methods or {"winclip": {"method": "winclip", "refiner": "none"}},
        "directions": {"visa": {}},
    }))  # fmt: skip
    return path


def _fake_test(args: list[str], *, then: BaseException | None = None) -> int:
    """What `clipsam test` leaves in its attempt folder, then (optionally) an interruption."""
    last = len(args) - 1 - args[::-1].index("--config")  # the benchmark's own settings come last
    settings = yaml.safe_load(Path(args[last + 1]).read_text())
    attempt = Path(settings["trainer"]["default_root_dir"])
    _report(attempt, fmt="visa", images={"stripes": 12})
    if then is not None:
        raise then
    return 0


def test_an_interrupted_benchmark_cell_is_marked_and_never_compared_twice(tmp_path: Path) -> None:
    from clipsam.benchmark import cell_results, load_grid, plan_cells, run_benchmark
    from clipsam.compare import build_comparison, collect_runs

    grid_path = _grid(tmp_path)
    with pytest.raises(KeyboardInterrupt):  # Ctrl+C after the command wrote its results
        run_benchmark(load_grid(grid_path), runner=lambda args, log: _fake_test(args, then=KeyboardInterrupt()), say=lambda _: None)
    cell_dir = tmp_path / "bench" / "cells" / "winclip" / "visa" / "default"
    assert (cell_dir / "attempt_1" / "test_results.json").is_file()
    assert "interrupted" in (cell_dir / "attempt_1" / "INCOMPLETE").read_text()
    grid = load_grid(grid_path)
    assert cell_results(grid, plan_cells(grid)[0]) is None
    with pytest.raises(ConfigError, match="did not finish"):
        collect_runs([str(cell_dir / "attempt_1")])

    run_benchmark(load_grid(grid_path), runner=lambda args, log: _fake_test(args), say=lambda _: None)
    skipped: list[str] = []
    runs = collect_runs([str(tmp_path / "bench")], skipped=skipped)
    assert [r.path.parent.name for r in runs] == ["attempt_2"]
    assert len(build_comparison(runs).rows) == 1, "no duplicate row"
    assert len(skipped) == 1 and "attempt_1" in skipped[0] and "INCOMPLETE" in skipped[0]


def test_a_test_that_finished_after_the_benchmark_was_killed_is_recorded_not_rerun(tmp_path: Path) -> None:
    from clipsam.benchmark import load_grid, run_benchmark
    from clipsam.compare import collect_runs

    grid_path = _grid(tmp_path)
    with pytest.raises(_Killed):
        run_benchmark(load_grid(grid_path), runner=lambda args, log: _fake_test(args, then=_Killed()), say=lambda _: None)
    calls: list[list[str]] = []
    lines: list[str] = []
    comparison = run_benchmark(load_grid(grid_path), runner=lambda args, log: calls.append(args) or 0, say=lines.append)
    assert calls == [] and any("recorded, not rerun" in line for line in lines), lines
    assert [r.runs["visa"].path.parent.name for r in comparison.rows] == ["attempt_1"]
    assert len(collect_runs([str(tmp_path / "bench")])) == 1


def test_dry_run_lists_only_the_chosen_cells(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from clipsam.benchmark import main

    grid_path = _grid(tmp_path, {"winclip": {"method": "winclip", "refiner": "none"}, "sdp": {"method": "sdp", "refiner": "none"}})
    assert main(["--config", str(grid_path), "--dry-run", "--only", "sdp/*"]) == 0
    out = capsys.readouterr().out
    assert "sdp/visa/default" in out and "winclip" not in out, out
    with pytest.raises(ConfigError, match=r"--only \['nothing'\] matches no cell"):
        main(["--config", str(grid_path), "--dry-run", "--only", "nothing"])


def test_sigterm_stops_the_benchmark_like_ctrl_c() -> None:
    from clipsam.benchmark import _terminate_as_interrupt

    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(KeyboardInterrupt), _terminate_as_interrupt():
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)  # the handler interrupts the wait
    assert signal.getsignal(signal.SIGTERM) == before
