"""``clipsam compare RUN...``: the test results of several runs in one table, methods as rows.

Each run is a ``test_results.json`` written by ``clipsam test`` (a run folder, the file itself, or
a folder searched recursively). A row is a method + refiner (``april_gan + ppg_cps`` is the seed
method); columns are, per test dataset, the pixel AUROC / F1-max / AP (and AUPRO and image
metrics where every run has them), category means, with the paper's reported numbers beside them
(:data:`PAPER_RESULTS`). Per-category tables follow.

Runs are only comparable on the same data, in the same frame, under the same metric protocol.
Runs that differ from the others of their dataset column in any of these are *flagged* (a ``!``
in the table and a note saying what differs); they are never silently averaged together.

Everything here is pure (no Lightning): :func:`load_run`, :func:`build_comparison`,
:func:`comparison_csv_rows`, :func:`comparison_markdown`; :func:`main` is the command.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import glob
import io
import json
import math
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from clipsam.errors import ConfigError
from clipsam.metric_names import COLUMN_TITLES

__all__ = [
    "PAPER_RESULTS",
    "PAPER_ROW_SOURCES",
    "PAPER_SOURCE",
    "PAPER_TEST_SETS",
    "Comparison",
    "RunResult",
    "build_comparison",
    "collect_runs",
    "comparison_csv_rows",
    "comparison_markdown",
    "load_run",
    "main",
    "paper_data_problem",
    "paper_row",
]

RESULTS_FILE = "test_results.json"

PIXEL_METRICS = ("pixel_auroc", "pixel_f1_max", "pixel_ap")
OPTIONAL_METRICS = ("pixel_aupro", "image_auroc", "image_f1_max", "image_ap")

PAPER_SOURCE = (
    "arXiv 2510.11028, zero-shot pixel-level results table (the paper's reported numbers); "
    "the column is the TEST dataset (MVTec = trained on VisA, tested on MVTec-AD)"
)
# Percent. None: not reported. Keys are the paper's row names; :func:`paper_row` maps clipsam rows.
PAPER_RESULTS: dict[str, dict[str, dict[str, float | None]]] = {
    "WinCLIP": {
        "mvtec": {"pixel_auroc": 85.1, "pixel_f1_max": 31.7, "pixel_ap": None},
        "visa": {"pixel_auroc": 79.6, "pixel_f1_max": 14.8, "pixel_ap": None},
    },
    "APRIL-GAN": {
        "mvtec": {"pixel_auroc": 87.6, "pixel_f1_max": 43.3, "pixel_ap": 40.8},
        "visa": {"pixel_auroc": 94.2, "pixel_f1_max": 32.3, "pixel_ap": 25.7},
    },
    "AnomalyCLIP": {
        "mvtec": {"pixel_auroc": 91.1, "pixel_f1_max": 39.1, "pixel_ap": 34.5},
        "visa": {"pixel_auroc": 95.5, "pixel_f1_max": 28.3, "pixel_ap": 21.3},
    },
    "SAA+": {
        "mvtec": {"pixel_auroc": 73.2, "pixel_f1_max": 37.8, "pixel_ap": 28.8},
        "visa": {"pixel_auroc": 74.0, "pixel_f1_max": 27.1, "pixel_ap": 22.4},
    },
    "ClipSAM": {
        "mvtec": {"pixel_auroc": 92.3, "pixel_f1_max": 47.8, "pixel_ap": 45.9},
        "visa": {"pixel_auroc": 95.6, "pixel_f1_max": 33.1, "pixel_ap": 26.0},
    },
    "this method": {
        "mvtec": {"pixel_auroc": 89.5, "pixel_f1_max": 48.8, "pixel_ap": 46.4},
        "visa": {"pixel_auroc": 94.8, "pixel_f1_max": 36.5, "pixel_ap": 28.0},
    },
    # Not in the paper: MuSc's own reported numbers (:data:`PAPER_ROW_SOURCES`), zero-shot on the
    # full test sets; PRO-segm as pixel_aupro.
    "MuSc": {
        "mvtec": {
            "pixel_auroc": 97.3, "pixel_f1_max": 62.6, "pixel_ap": 62.7, "pixel_aupro": 93.8,
            "image_auroc": 97.8, "image_f1_max": 97.5, "image_ap": 99.1,
        },
        "visa": {
            "pixel_auroc": 98.8, "pixel_f1_max": 48.8, "pixel_ap": 45.1, "pixel_aupro": 92.7,
            "image_auroc": 92.8, "image_f1_max": 89.5, "image_ap": 93.5,
        },
    },
}
#: Rows of :data:`PAPER_RESULTS` whose numbers come from their own reference, not the paper.
#: AdaCLIP has none: its README (caoyunkang/AdaCLIP @ e27ee32) shows its results only as images.
PAPER_ROW_SOURCES: dict[str, str] = {
    "MuSc": "xrli-U/MuSc README.md @ b76b93d ('Compare with SOTA k-shot methods', MuSc(ours) 0-shot rows)",
}
_PAPER_ROWS = {
    ("winclip", "none"): "WinCLIP",
    ("april_gan", "none"): "APRIL-GAN",
    ("anomalyclip", "none"): "AnomalyCLIP",
    ("april_gan", "ppg_cps"): "this method",
    ("saa_plus", "none"): "SAA+",
    # ClipSAM released no code: clipsam's umci + mmr is a reconstruction (ClipSAM-rec); the paper's
    # ClipSAM number is shown beside it for reference, never as its result.
    ("umci", "mmr"): "ClipSAM",
    ("musc", "none"): "MuSc",  # MuSc's own README, not the paper (PAPER_ROW_SOURCES)
}


#: The test sets the paper's numbers are on: test-data format -> (name, categories, test images).
#: A run gets the paper's number beside it only when its recorded test data is exactly this set
#: (every category, every test image): a subset or generated data in the same layout does not.
PAPER_TEST_SETS: dict[str, tuple[str, frozenset[str], int]] = {
    "mvtec": (
        "MVTec-AD",
        frozenset({
            "bottle", "cable", "capsule", "carpet", "grid", "hazelnut", "leather", "metal_nut", "pill", "screw",
            "tile", "toothbrush", "transistor", "wood", "zipper",
        }),
        1725,
    ),
    "visa": (
        "VisA",
        frozenset({
            "candle", "capsules", "cashew", "chewinggum", "fryum", "macaroni1", "macaroni2", "pcb1", "pcb2", "pcb3",
            "pcb4", "pipe_fryum",
        }),
        2162,
    ),
}  # fmt: skip


def paper_data_problem(run: RunResult) -> str | None:
    """Why the paper's numbers do not apply to ``run``'s test data (None: the full real test set).

    Read from the run's recorded data identity (``run.data.test`` of the report: format, split,
    subset, and the number of test images per category).
    """
    spec = PAPER_TEST_SETS.get(run.dataset)
    if spec is None:
        return f"the paper reports no {run.dataset} numbers"
    name, categories, total = spec
    images = {c: n for c, n in (run.data.get("images") or {}).items() if isinstance(n, int)}
    if not images:
        return "its test data is not recorded (an old report)"
    count = sum(images.values())
    what = f"{len(images)} {'category' if len(images) == 1 else 'categories'}, {count} images"
    if run.data.get("split") not in (None, "test"):
        return f"split {run.data.get('split')!r}, not {name}'s test split"
    if run.data.get("subset"):
        return f"a subset of the test data ({what})"
    if set(images) != categories or count != total:
        return f"{what} ({', '.join(sorted(images)[:4])}{', ...' if len(images) > 4 else ''}), not {name}'s test set ({len(categories)} categories, {total} images)"
    return None


def paper_row(method: str, refiner: str) -> str | None:
    """The paper's row name for a clipsam method + refiner, or None if the paper has none."""
    return _PAPER_ROWS.get((method, refiner))


@dataclasses.dataclass
class RunResult:
    """One test run, as read from its ``test_results.json``.

    Attributes:
        path: the JSON file.
        method, refiner, fusion: what produced the scores.
        dataset: test dataset key (its format: ``mvtec``, ``visa``, ``folder``); the column.
        train: auxiliary (training) dataset format, None if unknown.
        image_size: the evaluation frame side, None if unknown.
        protocol: metric settings (see ``ClipSamModule.run_info``); {} if unknown.
        data: identity of the test data (format, root, split, categories, images per category).
        mean: metric -> value in [0, 1] (None: undefined).
        per_category: category -> metric -> value.
        notes: what could not be read (old files without a ``run`` block).
        name: row label chosen by the caller (``clipsam benchmark`` names rows after its grid);
            None: ``method`` or ``method + refiner``.
        with_paper: show the paper's numbers beside this run (False for ablation rows).
        choices: the open choices the scores depend on (``run.choices`` of the report: image
            score, fusion, the refiner's PPG / cascade settings), ``key -> value``.
        references: a few-shot run's reference images (``run.references``: seed, source,
            count, files by category); None for a zero-shot run.
    """

    path: Path
    method: str
    refiner: str
    fusion: str
    dataset: str
    train: str | None
    image_size: int | None
    protocol: dict[str, Any]
    data: dict[str, Any]
    mean: dict[str, float | None]
    per_category: dict[str, dict[str, float | None]]
    notes: list[str] = dataclasses.field(default_factory=list)
    name: str | None = None
    with_paper: bool = True
    choices: dict[str, Any] = dataclasses.field(default_factory=dict)
    references: dict[str, Any] | None = None

    @property
    def label(self) -> str:
        """Row label: ``name``, else the method, with its refiner when there is one."""
        if self.name:
            return self.name
        return self.method if self.refiner == "none" else f"{self.method} + {self.refiner}"


def _number(value: Any) -> float | None:
    if isinstance(value, (int, float)) and not isinstance(value, bool) and not math.isnan(float(value)):
        return float(value)
    return None


def load_run(path: str | Path) -> RunResult:
    """Read one ``test_results.json`` (or the one in folder ``path``).

    Files written before the ``run`` block existed are read from their ``config`` block (method
    ``april_gan``, refiner from ``evaluation.use_sam``, frame from ``image_size``); their data is
    unknown, which :func:`build_comparison` flags.

    Raises:
        ConfigError: the file is missing or is not a clipsam test report.
    """
    path = Path(path)
    if path.is_dir():
        path = path / RESULTS_FILE
    if not path.is_file():
        raise ConfigError(f"{path}: no {RESULTS_FILE} here; pass run folders written by `clipsam test`")
    try:
        payload = json.loads(path.read_text())
        results = payload["results"]
        mean, per_category = dict(results["mean"]), dict(results.get("per_category", {}))
    except (ValueError, KeyError, TypeError) as err:
        raise ConfigError(f"{path}: not a clipsam test report ({type(err).__name__}: {err})") from None
    run = payload.get("run") or {}
    config = payload.get("config") or {}
    notes: list[str] = []
    if run:
        method, refiner = str(run.get("method", "april_gan")), str(run.get("refiner", "none"))
        fusion = str(run.get("fusion", "none"))
        image_size = run.get("image_size")
        protocol = dict(run.get("protocol") or {})
        data = dict((run.get("data") or {}).get("test") or {})
        train_spec = (run.get("data") or {}).get("train") or {}
        train = train_spec.get("format")
        choices = dict(run.get("choices") or {})
        references = run.get("references") or None
    else:
        notes.append("old report without a 'run' block: data and protocol unknown")
        evaluation = config.get("evaluation") or {}
        method = str(config.get("method", "april_gan"))
        refiner = str(config.get("refiner") or ("ppg_cps" if evaluation.get("use_sam", True) else "none"))
        fusion = str(evaluation.get("fusion", "none")) if refiner != "none" else "none"
        image_size = config.get("image_size")
        protocol, data, train, choices, references = {}, {}, None, {}, None
    data = {**data, "images": {c: v.get("num_images") for c, v in per_category.items() if isinstance(v, dict)}}
    return RunResult(
        path=path,
        method=method,
        refiner=refiner,
        fusion=fusion,
        dataset=str(data.get("format") or "unknown"),
        train=train,
        image_size=None if image_size is None else int(image_size),
        protocol=protocol,
        data=data,
        mean={k: _number(v) for k, v in mean.items()},
        per_category={
            c: {k: _number(v) for k, v in values.items() if not isinstance(v, (dict, list))}
            for c, values in per_category.items()
            if isinstance(values, dict)
        },
        notes=notes,
        choices=choices,
        references=dict(references) if isinstance(references, dict) else None,
    )


INCOMPLETE_MARKER = "INCOMPLETE"  # clipsam.runs.INCOMPLETE_MARKER (not imported: runs pulls in Lightning)


def _unfinished(report: Path) -> str | None:
    """Why the run of ``report`` is not a finished result (None: it is).

    - its folder holds ``INCOMPLETE`` (the run, or the benchmark running it, did not end normally);
    - it is an attempt of a ``clipsam benchmark`` cell (``<cell>/attempt_N/``, ``<cell>/cell.json``)
      that the cell's ``cell.json`` does not name as its results (superseded, or still running).
    """
    marker = report.parent / INCOMPLETE_MARKER
    if marker.is_file():
        try:
            reason = marker.read_text().strip().splitlines()[0]
        except (OSError, IndexError, UnicodeDecodeError):
            reason = "no reason recorded"
        return f"the run did not finish ({INCOMPLETE_MARKER}: {reason})"
    cell = report.parent.parent / "cell.json"
    if report.parent.name.startswith("attempt_") and cell.is_file():
        try:
            state = json.loads(cell.read_text())
        except (OSError, ValueError):
            return None
        named = state.get("results") if isinstance(state, dict) else None
        if not named or Path(named).resolve() != report.resolve():
            return f"a benchmark attempt its cell does not record as finished ({cell})"
    return None


def collect_runs(patterns: Iterable[str], *, skipped: list[str] | None = None) -> list[RunResult]:
    """Runs named by ``patterns``: files, run folders, globs, or folders searched recursively.

    Unfinished runs (:func:`_unfinished`) found by a search or a glob are left out (their reasons
    appended to ``skipped``); named one by one, such a run is refused.

    Raises:
        ConfigError: a pattern matches no report; a run named directly did not finish.
    """
    files: list[Path] = []
    for pattern in patterns:
        matches = sorted(glob.glob(str(Path(pattern).expanduser()), recursive=True)) or [pattern]
        named = len(matches) == 1 and not glob.has_magic(pattern)
        found: list[Path] = []
        left_out: list[str] = []
        for match in map(Path, matches):
            if match.is_file() or (match / RESULTS_FILE).is_file():
                report = match if match.is_file() else match / RESULTS_FILE
                problem = _unfinished(report)
                if problem is not None and named:
                    raise ConfigError(f"{report}: {problem}: pass a finished run, or run it again")
                if problem is not None:
                    left_out.append(f"{report}: {problem}")
                    continue
                found.append(report)
            elif match.is_dir():
                for report in sorted(match.rglob(RESULTS_FILE)):
                    problem = _unfinished(report)
                    if problem is None:
                        found.append(report)
                    else:
                        left_out.append(f"{report}: {problem}")
        if not found:
            why = f" that finished (left out: {'; '.join(left_out)})" if left_out else ""
            raise ConfigError(f"{pattern}: matches no {RESULTS_FILE}{why}; pass run folders written by `clipsam test`")
        files.extend(found)
        if skipped is not None:
            skipped.extend(left_out)
    unique = list(dict.fromkeys(p.resolve() for p in files))
    return [load_run(p) for p in unique]


@dataclasses.dataclass
class Row:
    """One row of the comparison: a method + refiner, its runs per dataset."""

    label: str
    method: str
    refiner: str
    paper: str | None
    runs: dict[str, RunResult]  # dataset -> run
    flags: dict[str, list[str]]  # dataset -> what differs from the other runs of that dataset


@dataclasses.dataclass
class Comparison:
    """What :func:`build_comparison` returns: rows, the datasets (columns) and the metric keys."""

    rows: list[Row]
    datasets: list[str]
    metrics: list[str]

    @property
    def flagged(self) -> list[tuple[str, str, str]]:
        """(row label, dataset, reason) for every flag."""
        return [(r.label, d, f) for r in self.rows for d, fs in r.flags.items() for f in fs]

    @property
    def without_paper(self) -> list[tuple[str, str, str]]:
        """(row label, dataset, why) for every run of a paper row whose data is not the paper's."""
        out = []
        for row in self.rows:
            for dataset, run in row.runs.items():
                if row.paper is not None and dataset in PAPER_TEST_SETS:
                    problem = paper_data_problem(run)
                    if problem is not None:
                        out.append((row.label, dataset, problem))
        return out


def _majority(values: Sequence[Any]) -> Any:
    counts = Counter(json.dumps(v, sort_keys=True) for v in values)
    best = counts.most_common(1)[0][0]
    return json.loads(best)


def _data_identity(run: RunResult) -> dict[str, Any]:
    # "images" (category -> number of test images) says which categories were read: a spec
    # listing all categories and one reading all present (categories: null) are the same data.
    keys = ("format", "root", "split", "images")
    return {k: run.data.get(k) for k in keys}


def _describe_difference(mine: dict[str, Any], ref: dict[str, Any]) -> str:
    keys = [k for k in sorted(set(mine) | set(ref)) if mine.get(k) != ref.get(k)]
    return ", ".join(f"{k} {mine.get(k)!r} vs {ref.get(k)!r}" for k in keys)


def _reference_draw(run: RunResult) -> dict[str, Any] | None:
    """What a few-shot run's scores depend on in its reference images: k and the files per category."""
    if not run.references:
        return None
    return {"k": run.references.get("count"), "files": run.references.get("files") or {}}


def _describe_draws(mine: dict[str, Any], ref: dict[str, Any]) -> str:
    if mine["k"] != ref["k"]:
        return f"k={mine['k']} vs k={ref['k']}"
    files, other = mine["files"], ref["files"]
    differ = sorted(c for c in set(files) | set(other) if files.get(c) != other.get(c))
    return f"other files for {', '.join(differ[:3])}{' ...' if len(differ) > 3 else ''}"


def build_comparison(runs: Sequence[RunResult]) -> Comparison:
    """Rows (one per method + refiner) and flags for runs that are not comparable.

    Within each dataset column the most common frame, metric protocol and data identity is the
    reference; a run that differs gets a flag naming the difference. Few-shot runs are also
    flagged when their reference images differ from those of the other few-shot runs (another k,
    or other files drawn). Two runs of the same row and dataset both stay, as ``label`` and
    ``label (2)``, flagged as duplicates.
    """
    if not runs:
        raise ConfigError("no runs to compare")
    datasets = list(dict.fromkeys(r.dataset for r in runs))
    reference: dict[str, dict[str, Any]] = {}
    for dataset in datasets:
        of = [r for r in runs if r.dataset == dataset]
        reference[dataset] = {
            "frame": _majority([r.image_size for r in of]),
            "protocol": _majority([r.protocol for r in of]),
            "data": _majority([_data_identity(r) for r in of]),
            "draw": _majority([d for d in map(_reference_draw, of) if d is not None]) if any(r.references for r in of) else None,
        }
    rows: dict[str, Row] = {}
    for run in runs:
        label = run.label
        n = 1
        while label in rows and run.dataset in rows[label].runs:
            n += 1
            label = f"{run.label} ({n})"
        row = rows.setdefault(
            label,
            Row(label, run.method, run.refiner, paper_row(run.method, run.refiner) if run.with_paper else None, {}, {}),
        )
        row.runs[run.dataset] = run
        flags: list[str] = []
        ref = reference[run.dataset]
        if n > 1:
            flags.append(f"duplicate of row {run.label!r} on {run.dataset}")
        if run.image_size != ref["frame"]:
            flags.append(f"frame {run.image_size} vs {ref['frame']} of the other runs")
        if run.protocol != ref["protocol"]:
            flags.append(f"metric protocol differs: {_describe_difference(run.protocol, ref['protocol'])}")
        identity = _data_identity(run)
        if identity != ref["data"]:
            flags.append(f"test data differs: {_describe_difference(identity, ref['data'])}")
        draw = _reference_draw(run)
        if draw is not None and ref["draw"] is not None and draw != ref["draw"]:
            flags.append(f"reference images differ from the other few-shot runs: {_describe_draws(draw, ref['draw'])}")
        flags.extend(run.notes)
        if flags:
            row.flags[run.dataset] = flags
    present = {k for r in runs for k, v in r.mean.items() if v is not None}
    metrics = [*PIXEL_METRICS, *(m for m in OPTIONAL_METRICS if m in present)]
    return Comparison(rows=list(rows.values()), datasets=datasets, metrics=metrics)


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100.0 * value:.1f}"


def _paper(row: Row, dataset: str, metric: str) -> float | None:
    run = row.runs.get(dataset)
    if row.paper is None or run is None or paper_data_problem(run) is not None:
        return None
    return PAPER_RESULTS[row.paper].get(dataset, {}).get(metric)


def _paper_note(comparison: Comparison) -> str | None:
    """One sentence saying which runs get no paper number and why (None: every run that could has one)."""
    missing = comparison.without_paper
    if not missing:
        return None
    sets = "; ".join(f"{name}: {len(cats)} categories, {total} test images" for name, cats, total in PAPER_TEST_SETS.values())
    runs = "; ".join(f"{label} on {dataset}: {why}" for label, dataset, why in missing)
    return f"no paper number beside runs on other data than the paper's full test sets ({sets}): {runs}"


def comparison_csv_rows(comparison: Comparison) -> tuple[list[str], list[list[Any]]]:
    """Long format: one line per row x dataset x category ("mean" first), values in percent.

    Columns: label, method, refiner, fusion, dataset, train, image_size, category, every metric,
    ``paper_<metric>`` for the pixel metrics, flags, choices (``key=value; ...``), run (the JSON
    path).
    """
    header = [
        "label", "method", "refiner", "fusion", "dataset", "train", "image_size", "category",
        *comparison.metrics, *(f"paper_{m}" for m in PIXEL_METRICS), "flags", "choices", "run",
    ]  # fmt: skip
    lines: list[list[Any]] = []
    for row in comparison.rows:
        for dataset in comparison.datasets:
            run = row.runs.get(dataset)
            if run is None:
                continue
            categories = [("mean", run.mean), *run.per_category.items()]
            for category, values in categories:
                paper = [_paper(row, dataset, m) if category == "mean" else None for m in PIXEL_METRICS]
                lines.append(
                    [
                        row.label, row.method, row.refiner, run.fusion, dataset, run.train, run.image_size, category,
                        *(None if values.get(m) is None else round(100.0 * values[m], 4) for m in comparison.metrics),
                        *paper, "; ".join(row.flags.get(dataset, [])), _choices_text(run), str(run.path),
                    ]
                )  # fmt: skip
    return header, lines


def summary_table(comparison: Comparison, dataset: str) -> tuple[list[str], list[list[str]]]:
    """Main table of one test dataset: a line per row, each metric's category mean as ``ours (paper)``."""
    header = ["method", *(COLUMN_TITLES[m] for m in comparison.metrics)]
    lines = []
    for row in comparison.rows:
        run = row.runs.get(dataset)
        if run is None:
            continue
        cells = [row.label + (" !" if row.flags.get(dataset) else "")]
        for metric in comparison.metrics:
            value, paper = _pct(run.mean.get(metric)), _paper(row, dataset, metric)
            cells.append(value if paper is None else f"{value} ({paper:.1f})")
        lines.append(cells)
    return header, lines


def category_table(comparison: Comparison, dataset: str) -> tuple[list[str], list[list[str]]]:
    """Per-category table of one dataset: categories as rows, rows of the comparison as columns,
    cells ``AUROC / F1-max / AP`` (pixel, percent)."""
    rows = [r for r in comparison.rows if dataset in r.runs]
    categories = list(dict.fromkeys(c for r in rows for c in r.runs[dataset].per_category))
    header = ["category", *(r.label for r in rows)]
    lines = []
    for category in [*categories, "mean"]:
        cells = [category]
        for row in rows:
            run = row.runs[dataset]
            values = run.mean if category == "mean" else run.per_category.get(category, {})
            cells.append(" / ".join(_pct(values.get(m)) for m in PIXEL_METRICS) if values else "")
        lines.append(cells)
    return header, lines


def _choices_text(run: RunResult) -> str:
    return "; ".join(f"{key}={value}" for key, value in sorted(run.choices.items()))


def choices_table(comparison: Comparison) -> tuple[list[str], list[list[str]]]:
    """The open choices behind each row's numbers (one line per row and dataset that has any)."""
    header = ["method", "dataset", "clipsam's choices (config keys under model.)"]
    lines = []
    for row in comparison.rows:
        for dataset in comparison.datasets:
            run = row.runs.get(dataset)
            if run is not None and run.choices:
                lines.append([row.label, dataset, _choices_text(run)])
    return header, lines


def _markdown_table(header: list[str], lines: list[list[str]]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(cells) + " |" for cells in lines]
    return "\n".join(out)


def _notes(comparison: Comparison) -> list[str]:
    return [f"{label} on {dataset}: {reason}" for label, dataset, reason in comparison.flagged]


def _sources_text() -> str:
    """:data:`PAPER_SOURCE`, then the rows whose reported numbers come from elsewhere."""
    others = "; ".join(f"{row}: {source}" for row, source in PAPER_ROW_SOURCES.items())
    return f"{PAPER_SOURCE}; {others}" if others else PAPER_SOURCE


def comparison_markdown(comparison: Comparison) -> str:
    """The main table, the per-category tables and the flags, as Markdown."""
    parts = ["Mean over categories, percent; the paper's reported value in parentheses.", "", f"Paper numbers: {_sources_text()}."]
    paper_note = _paper_note(comparison)
    if paper_note:
        parts += ["", f"Note: {paper_note}."]
    for dataset in comparison.datasets:
        parts += ["", f"## Test dataset {dataset}", "", _markdown_table(*summary_table(comparison, dataset))]
    notes = _notes(comparison)
    if notes:
        parts += ["", "**Not comparable (flagged `!`):**", "", *(f"- {n}" for n in notes)]
    header, choice_lines = choices_table(comparison)
    if choice_lines:
        parts += ["", "## Settings the papers leave open (clipsam's choices)", "", _markdown_table(header, choice_lines)]
    for dataset in comparison.datasets:
        parts += ["", f"## {dataset}: pixel AUROC / F1-max / AP per category", "", _markdown_table(*category_table(comparison, dataset))]
    return "\n".join(parts) + "\n"


def print_comparison(comparison: Comparison, *, per_category: bool = True, console: Any = None) -> None:
    """The same tables on the console (rich)."""
    from rich.table import Table

    from clipsam.io import rich_console

    console = console or rich_console()

    def show(title: str, header: list[str], lines: list[list[str]], caption: str | None = None) -> None:
        table = Table(title=title, caption=caption)
        for i, name in enumerate(header):
            table.add_column(name, justify="left" if i == 0 else "right")
        for cells in lines:
            table.add_row(*cells)
        console.print(table)

    for dataset in comparison.datasets:
        show(
            f"clipsam compare, test dataset {dataset}: mean over categories (percent; paper in parentheses)",
            *summary_table(comparison, dataset),
            caption=f"paper: arXiv 2510.11028 ({', '.join(PAPER_ROW_SOURCES)}: their own READMEs); '!': not comparable, see below",
        )
    paper_note = _paper_note(comparison)
    if paper_note:
        console.print(f"note: {paper_note}", markup=False, highlight=False)
    for note in _notes(comparison):
        console.print(f"[bold yellow]! {note}[/]")
    header, choice_lines = choices_table(comparison)
    if choice_lines:
        show("settings the papers leave open (clipsam's choices)", header, choice_lines)
    if per_category:
        for dataset in comparison.datasets:
            show(f"{dataset}: pixel AUROC / F1-max / AP per category", *category_table(comparison, dataset))


def write_outputs(comparison: Comparison, *, csv_path: Path | None, markdown_path: Path | None, overwrite: bool = False) -> None:
    """Write the CSV (long format) and Markdown files; refuse to overwrite unless asked."""
    from clipsam.io import atomic_write

    for path in (csv_path, markdown_path):
        if path is not None and path.exists() and not overwrite:
            raise ConfigError(f"{path} exists: choose another file, or pass --overwrite")
    if csv_path is not None:
        header, lines = comparison_csv_rows(comparison)
        buffer = io.StringIO()
        writer = csv.writer(buffer)
        writer.writerow(header)
        writer.writerows(lines)
        csv_path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_write(csv_path) as tmp:
            tmp.write_text(buffer.getvalue())
    if markdown_path is not None:
        markdown_path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_write(markdown_path) as tmp:
            tmp.write_text(comparison_markdown(comparison))


def log_to_wandb(comparison: Comparison, *, project: str, directory: Path) -> str:
    """Log the long-format table as ``compare/runs`` (and the main table) to an OFFLINE W&B run."""
    import wandb

    directory.mkdir(parents=True, exist_ok=True)
    header, lines = comparison_csv_rows(comparison)
    run = wandb.init(project=project, dir=str(directory), mode="offline", job_type="compare", reinit=True)
    try:
        payload = {"compare/runs": wandb.Table(columns=header, data=lines)}
        for dataset in comparison.datasets:
            summary_header, summary_lines = summary_table(comparison, dataset)
            payload[f"compare/{dataset}"] = wandb.Table(columns=summary_header, data=summary_lines)
        run.log(payload)
        return str(run.dir)
    finally:
        run.finish()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="clipsam compare",
        description="Compare the test results of clipsam runs: methods as rows, per dataset pixel "
        "AUROC / F1-max / AP (+ AUPRO and image metrics where present), with the paper's numbers.",
    )
    parser.add_argument("runs", nargs="+", help="run folders, test_results.json files, globs, or folders to search")
    parser.add_argument("--csv", type=Path, default=None, help="write the long-format table here")
    parser.add_argument("--markdown", type=Path, default=None, help="write the Markdown tables here")
    parser.add_argument("--overwrite", action="store_true", help="replace existing --csv/--markdown files")
    parser.add_argument("--no-per-category", action="store_true", help="print the main table only")
    parser.add_argument("--wandb", metavar="PROJECT", default=None, help="also log the tables to an offline W&B run")
    parser.add_argument("--wandb-dir", type=Path, default=Path("runs/compare"), help="folder of the offline W&B run")
    return parser


def main(argv: Sequence[str]) -> int:
    """``clipsam compare``; errors raise :class:`ConfigError` (the CLI prints them, exit 2)."""
    args = build_parser().parse_args(list(argv))
    skipped: list[str] = []
    comparison = build_comparison(collect_runs(args.runs, skipped=skipped))
    write_outputs(comparison, csv_path=args.csv, markdown_path=args.markdown, overwrite=args.overwrite)
    print_comparison(comparison, per_category=not args.no_per_category)
    for line in skipped:
        print(f"left out (not a finished run): {line}")
    for path in (args.csv, args.markdown):
        if path is not None:
            print(f"written: {path}")
    if args.wandb:
        print(f"W&B (offline): {log_to_wandb(comparison, project=args.wandb, directory=args.wandb_dir)}")
    return 0
