"""``clipsam benchmark``: the grid's cells, shared fits, and resuming (finished cells are not rerun).

The resume test runs real ``clipsam test`` commands in-process on a tiny training-free method
(``Bright`` of test_methods.py, registered with monkeypatch), so it takes seconds.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import yaml

from clipsam import methods as registry
from clipsam.benchmark import inprocess_runner, load_grid, plan_cells, run_benchmark
from clipsam.errors import ConfigError
from tests.helpers.data import make_synthetic_root

REPO = Path(__file__).resolve().parents[2]


def _grid(tmp_path: Path, content: dict, name: str = "grid.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(content))
    return path


def test_fits_are_shared_across_refiners_and_test_only_ablations(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(REPO)
    grid = load_grid(
        _grid(
            tmp_path,
            {
                "root": str(tmp_path / "bench"),
                "configs": ["configs/demo.yaml"],
                "methods": {"ag": {"method": "april_gan", "refiner": "none"}, "ours": {"method": "april_gan", "refiner": "ppg_cps"}},
                "ablations": {
                    "default": {},
                    "rect20": {"configs": ["configs/ablations/kernel_rect20.yaml"], "test_only": True},
                    "lr": {"overrides": {"model.optimizer.lr": 0.01}},
                },
            },
        )
    )
    cells = {c.name: c for c in plan_cells(grid)}
    assert sorted(cells) == sorted(f"{m}/default/{a}" for m in ("ag", "ours") for a in ("default", "rect20", "lr"))
    shared = cells["ag/default/default"].fit_hash()
    assert cells["ours/default/default"].fit_hash() == shared, "the refiner does not change the fit"
    assert cells["ours/default/rect20"].fit_hash() == shared, "a test-only ablation reuses the fit"
    assert cells["ag/default/lr"].fit_hash() != shared, "a training ablation gets its own fit"
    assert len({c.test_hash() for c in cells.values()}) == len(cells)
    assert cells["ours/default/default"].test_overrides["model.refiner"] == "ppg_cps"


def test_grid_errors_name_the_file_and_key(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(REPO)
    with pytest.raises(ConfigError, match=r"grid.yaml: methods.x: model.method='winclp' is not a method"):
        load_grid(_grid(tmp_path, {"methods": {"x": {"method": "winclp"}}}))
    with pytest.raises(ConfigError, match=r"unknown keys \['config'\]"):
        load_grid(_grid(tmp_path, {"methods": {"x": {"method": "april_gan", "config": []}}}))
    grid = load_grid(_grid(tmp_path, {"methods": {"x": {"method": "april_gan", "configs": ["configs/methods/none_{direction}.yaml"]}}}))
    with pytest.raises(ConfigError, match="cell x/default/default names config .*none_default.yaml, which does not exist"):
        plan_cells(grid)


def test_benchmark_resumes_finished_cells_and_reruns_changed_ones(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setitem(registry.METHODS, "bright", registry.MethodSpec("tests.unit.test_methods"))
    monkeypatch.setattr(sys, "argv", ["clipsam"])
    root = make_synthetic_root(tmp_path, categories=("stripes", "mesh"), layouts=("visa",), image_size=32,
                               num_test_good=1, num_test_anomalous=2)  # fmt: skip
    monkeypatch.setenv("CLIPSAM_SYNTH_ROOT", str(root))
    monkeypatch.chdir(tmp_path)
    ablation = tmp_path / "scale3.yaml"
    ablation.write_text("model:\n  method_config: {scale: 3.0}\n")
    content = {
        "root": str(tmp_path / "bench"),
        "configs": [str(REPO / "configs" / "demo.yaml")],
        "overrides": {"data.image_size": 32, "data.test_batch_size": 4, "data.num_workers": 0,
                      "data.test.categories": ["stripes", "mesh"], "model.evaluation.num_overlays": 0,
                      "trainer.enable_progress_bar": False},  # fmt: skip
        "methods": {"bright": {"method": "bright", "refiner": "none"}},
        "directions": {"visa": {}},
        "ablations": {"default": {}, "scale3": {"configs": [str(ablation)]}},
    }
    grid_path = _grid(tmp_path, content)
    calls: list[list[str]] = []

    def runner(args: list[str], log: Path) -> int:
        calls.append(args)
        return inprocess_runner(args, log)

    first = run_benchmark(load_grid(grid_path), runner=runner)
    assert [a[0] for a in calls] == ["test", "test"], "a training-free method is only tested"
    assert [r.label for r in first.rows] == ["bright", "bright [scale3]"]
    assert first.flagged == []
    assert (tmp_path / "bench" / "compare.csv").is_file() and (tmp_path / "bench" / "compare.md").is_file()

    calls.clear()
    second = run_benchmark(load_grid(grid_path), runner=runner)
    assert calls == [], "finished cells are not rerun"
    assert [r.runs["visa"].path for r in second.rows] == [r.runs["visa"].path for r in first.rows]
    assert "finished earlier, not rerun" in capsys.readouterr().out

    ablation.write_text("model:\n  method_config: {scale: 5.0}\n")  # the cell's config changed
    third = run_benchmark(load_grid(grid_path), runner=runner)
    assert len(calls) == 1 and str(ablation) in calls[0]
    rows = {r.label: r.runs["visa"].path for r in third.rows}
    assert rows["bright"] == first.rows[0].runs["visa"].path
    assert rows["bright [scale3]"].parent.name == "attempt_2", "rerun into a fresh folder, the old one kept"
    assert first.rows[1].runs["visa"].path.is_file()


@pytest.mark.parametrize("grid", ["demo.yaml", "paper_table.yaml", "paper_ablations.yaml"])
def test_shipped_grids_plan_their_cells(grid: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every shipped grid parses, names registered methods and config files that exist."""
    monkeypatch.chdir(REPO)
    cells = plan_cells(load_grid(REPO / "configs" / "benchmark" / grid))
    if grid == "paper_ablations.yaml":
        assert len({c.fit_hash() for c in cells}) == 1, "test-time ablations share one fit"
        assert len({c.test_hash() for c in cells}) == len(cells) == 5
        return
    assert {c.direction.name for c in cells} == {"mvtec", "visa"}, "both directions of the paper"
    assert {c.method.refiner for c in cells if c.method.method == "april_gan"} == {"none", "ppg_cps"}


def test_cells_differing_only_in_refiner_or_evaluation_share_one_fit(monkeypatch: pytest.MonkeyPatch) -> None:
    """demo.yaml's anomalyclip and anomalyclip_mmr (other refiner and fusion) train once per direction."""
    monkeypatch.chdir(REPO)
    cells = {c.name: c for c in plan_cells(load_grid(REPO / "configs" / "benchmark" / "demo.yaml"))}
    for direction in ("mvtec", "visa"):
        plain, refined = cells[f"anomalyclip/{direction}/default"], cells[f"anomalyclip_mmr/{direction}/default"]
        assert plain.fit_hash() == refined.fit_hash()
        assert plain.test_hash() != refined.test_hash()
        assert refined.test_overrides["model.refiner"] == "mmr"
        assert refined.test_overrides["model.evaluation.fusion"] == "mean"
        assert not any(k.startswith("model.evaluation.") for k in refined.fit_overrides)


def test_a_failing_or_silent_command_stops_the_cell_with_its_log(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(registry.METHODS, "bright", registry.MethodSpec("tests.unit.test_methods"))
    monkeypatch.setenv("CLIPSAM_SYNTH_ROOT", str(tmp_path / "data"))
    monkeypatch.chdir(tmp_path)
    content = {
        "root": str(tmp_path / "bench"),
        "configs": [str(REPO / "configs" / "demo.yaml")],
        "methods": {"bright": {"method": "bright", "refiner": "none"}},
        "directions": {"visa": {}},
    }

    def failing(args: list[str], log: Path) -> int:
        log.parent.mkdir(parents=True, exist_ok=True)
        log.write_text("loading\nTraceback ...\nRuntimeError: boom\n")
        return 3

    with pytest.raises(ConfigError, match=r"(?s)`clipsam test` exited 3; its log is .*_test\.log\. Last lines:.*RuntimeError: boom"):
        run_benchmark(load_grid(_grid(tmp_path, content)), runner=failing)
    with pytest.raises(ConfigError, match=r"`clipsam test` wrote no test_results\.json under .*attempt_\d+; see .*_test\.log"):
        run_benchmark(load_grid(_grid(tmp_path, content)), runner=lambda args, log: 0)
