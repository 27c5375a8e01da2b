"""``clipsam benchmark --config GRID.yaml``: a grid of fit/test runs, resumable, ending with ``compare``.

The grid (YAML) crosses three axes; every cell is ``clipsam fit`` (trained methods only) then
``clipsam test`` through the ordinary CLI, one command after the other::

    name: paper_table
    root: runs/benchmark/paper_table      # cells, fits, logs and the compare table go here
    configs: [configs/mvtec.yaml]         # every command (may use {method}, {direction}, {ablation})
    overrides: {data.image_size: 518}     # every command; dotted keys
    wandb: false                          # also log each run to an offline W&B run
    synthetic_data: null                  # a folder: generate clipsam's synthetic data there if missing
                                          # ($CLIPSAM_SYNTH_ROOT, when set, wins)
    methods:                              # rows
      april_gan: {method: april_gan, refiner: none}
      clipsam:   {method: april_gan, refiner: ppg_cps, configs: [...], overrides: {...}}
    directions:                           # columns (the test dataset)
      mvtec: {configs: [configs/mvtec.yaml]}
      visa:  {configs: [configs/visa.yaml]}
    ablations:                            # optional; default one ablation named "default"
      default: {}
      kernel_rect20: {configs: [configs/ablations/kernel_rect20.yaml], test_only: true}

Config order of a command: ``configs``, the direction's, the method's, the ablation's, then
``overrides`` in the same order, then the benchmark's own run-folder settings.

**Resumable.** A fit is identified by the hash of everything that reaches ``clipsam fit`` (config
file contents, overrides, method; not the refiner, not ``test_only`` ablations), so methods that
differ only in their refiner, and test-time ablations, share one fit. A cell is finished when its
``cell.json`` names a ``test_results.json`` that exists and its hash (the test command's configs,
overrides and the fit's hash) is unchanged: it is not rerun. A changed cell is rerun into a fresh
``attempt_N`` folder; nothing is overwritten.

**Interrupted.** While a cell's test runs, ``cell.json`` names its attempt as *running*, never as
results. Ctrl+C, SIGTERM or SIGHUP stop the running command with the benchmark and leave
``INCOMPLETE`` in its attempt folder; ``clipsam compare`` skips such folders and attempts their
``cell.json`` does not name (superseded or unfinished), so a rerun never shows up twice. A test
that finished after the benchmark itself was killed (``kill -9``) is recorded by the next run
instead of being run again.

Layout under ``root``::

    fits/<method>-<direction>-<hash>/attempt_N/checkpoints/last.ckpt, fit.json, fit_N.log
    cells/<method>/<direction>/<ablation>/attempt_N/test_results.json, cell.json, test_N.log
    compare.csv, compare.md
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import fnmatch
import hashlib
import itertools
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from clipsam.errors import ConfigError

__all__ = [
    "Cell",
    "Grid",
    "inprocess_runner",
    "load_grid",
    "main",
    "plan_cells",
    "run_benchmark",
    "select_cells",
    "subprocess_runner",
]

Runner = Callable[[list[str], Path], int]
"""(clipsam CLI arguments, log file) -> exit status."""

_ENTRY_KEYS = {"configs", "overrides", "method", "refiner", "test_only"}
_GRID_KEYS = {"name", "root", "configs", "overrides", "wandb", "synthetic_data", "methods", "directions", "ablations"}


@dataclasses.dataclass
class Entry:
    """One value of an axis: configs and overrides it adds (methods also name the method)."""

    name: str
    configs: list[str] = dataclasses.field(default_factory=list)
    overrides: dict[str, Any] = dataclasses.field(default_factory=dict)
    method: str | None = None
    refiner: str | None = None
    test_only: bool = False


@dataclasses.dataclass
class Grid:
    """A parsed grid file (see the module docstring). Paths are relative to ``base_dir``."""

    name: str
    root: Path
    base_dir: Path
    configs: list[str]
    overrides: dict[str, Any]
    wandb: bool
    synthetic_data: str | None
    methods: list[Entry]
    directions: list[Entry]
    ablations: list[Entry]


@dataclasses.dataclass
class Cell:
    """One fit/test pair of the grid."""

    method: Entry
    direction: Entry
    ablation: Entry
    trainable: bool
    fit_configs: list[Path]
    fit_overrides: dict[str, Any]
    test_configs: list[Path]
    test_overrides: dict[str, Any]

    @property
    def name(self) -> str:
        return f"{self.method.name}/{self.direction.name}/{self.ablation.name}"

    def fit_hash(self) -> str:
        return _hash(self.fit_configs, self.fit_overrides)

    def test_hash(self) -> str:
        return _hash(self.test_configs, self.test_overrides, self.fit_hash() if self.trainable else "")


def _hash(configs: Sequence[Path], overrides: Mapping[str, Any], extra: str = "") -> str:
    digest = hashlib.sha256()
    for path in configs:
        digest.update(path.read_bytes())
        digest.update(b"\0")
    digest.update(json.dumps(overrides, sort_keys=True, default=str).encode())
    digest.update(extra.encode())
    return digest.hexdigest()[:16]


def _entries(grid_path: Path, data: Any, axis: str, *, required: bool) -> list[Entry]:
    if data is None:
        if required:
            raise ConfigError(f"{grid_path}: '{axis}' is missing; give at least one entry")
        return [Entry("default")]
    if not isinstance(data, Mapping) or not data:
        raise ConfigError(f"{grid_path}: '{axis}' must be a non-empty mapping of name -> settings")
    entries = []
    for name, settings in data.items():
        settings = settings or {}
        if not isinstance(settings, Mapping):
            raise ConfigError(f"{grid_path}: {axis}.{name} must be a mapping")
        unknown = sorted(set(settings) - _ENTRY_KEYS)
        if unknown:
            raise ConfigError(f"{grid_path}: {axis}.{name} has unknown keys {unknown}; valid: {sorted(_ENTRY_KEYS)}")
        entry = Entry(str(name), **{k: v for k, v in settings.items()})
        entry.configs = [str(c) for c in (entry.configs or [])]
        entry.overrides = dict(entry.overrides or {})
        if axis == "methods":
            from clipsam.methods import get_method
            from clipsam.refiners import get_refiner

            if not entry.method:
                raise ConfigError(f"{grid_path}: methods.{name} needs 'method' (e.g. april_gan)")
            try:
                get_method(entry.method)
                get_refiner(entry.refiner or "none")
            except ConfigError as err:
                raise ConfigError(f"{grid_path}: methods.{name}: {err}") from None
        elif entry.method or entry.refiner:
            raise ConfigError(f"{grid_path}: {axis}.{name}: only 'methods' entries set method/refiner")
        entries.append(entry)
    return entries


def load_grid(path: str | Path) -> Grid:
    """Parse and check a grid file. Raises :class:`ConfigError` naming the file and the key."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"--config {path}: no such grid file")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML ({err})") from None
    unknown = sorted(set(data) - _GRID_KEYS)
    if unknown:
        raise ConfigError(f"{path}: unknown keys {unknown}; valid: {sorted(_GRID_KEYS)}")
    name = str(data.get("name") or path.stem)
    base_dir = Path.cwd()
    return Grid(
        name=name,
        root=Path(os.path.expandvars(str(data.get("root") or f"runs/benchmark/{name}"))),
        base_dir=base_dir,
        configs=[str(c) for c in data.get("configs") or []],
        overrides=dict(data.get("overrides") or {}),
        wandb=bool(data.get("wandb", False)),
        synthetic_data=data.get("synthetic_data"),
        methods=_entries(path, data.get("methods"), "methods", required=True),
        directions=_entries(path, data.get("directions"), "directions", required=False),
        ablations=_entries(path, data.get("ablations"), "ablations", required=False),
    )


def _resolve(grid: Grid, names: Sequence[str], where: str, fields: Mapping[str, str]) -> list[Path]:
    paths = []
    for raw in names:
        path = Path(os.path.expandvars(raw.format(**fields)))
        path = path if path.is_absolute() else grid.base_dir / path
        if not path.is_file():
            raise ConfigError(f"grid {grid.name}: {where} names config {path}, which does not exist")
        paths.append(path)
    return paths


_TEST_ONLY_KEYS = ("model.evaluation.", "model.refiner")
"""Override keys that only affect test (dropped from a cell's fit, and so from its fit hash)."""


def plan_cells(grid: Grid) -> list[Cell]:
    """Every cell of the grid with its fit and test configs (checked to exist)."""
    from clipsam.methods import get_method

    cells = []
    for method, direction, ablation in itertools.product(grid.methods, grid.directions, grid.ablations):
        fields = {"method": method.method, "direction": direction.name, "ablation": ablation.name}
        where = f"cell {method.name}/{direction.name}/{ablation.name}"
        shared = [*grid.configs, *direction.configs, *method.configs]
        base = {**grid.overrides, **direction.overrides, **method.overrides, "model.method": method.method}
        fit_configs = _resolve(grid, [*shared, *([] if ablation.test_only else ablation.configs)], where, fields)
        fit_overrides = dict(base) if ablation.test_only else {**base, **ablation.overrides}
        # Evaluation and refiner settings never change what fit trains: cells that differ only
        # there share one fit (their test still gets them).
        fit_overrides = {k: v for k, v in fit_overrides.items() if not k.startswith(_TEST_ONLY_KEYS)}
        test_configs = _resolve(grid, [*shared, *ablation.configs], where, fields)
        test_overrides = {**base, **ablation.overrides}
        if method.refiner:
            test_overrides["model.refiner"] = method.refiner
        cells.append(
            Cell(
                method=method,
                direction=direction,
                ablation=ablation,
                trainable=get_method(method.method).trainable,
                fit_configs=fit_configs,
                fit_overrides=fit_overrides,
                test_configs=test_configs,
                test_overrides=test_overrides,
            )
        )
    return cells


def _nested(overrides: Mapping[str, Any]) -> dict[str, Any]:
    """{"a.b": 1} -> {"a": {"b": 1}} (a config file the CLI stacks last)."""
    out: dict[str, Any] = {}
    for key, value in overrides.items():
        node = out
        *parents, leaf = str(key).split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return out


def _next_attempt(directory: Path) -> Path:
    n = 1
    while (directory / f"attempt_{n}").exists():
        n += 1
    return directory / f"attempt_{n}"


def _command(
    stage: str, configs: Sequence[Path], overrides: Mapping[str, Any], attempt: Path, *, wandb: bool, run_name: str
) -> list[str]:
    """CLI arguments of one command; its settings file is written next to ``attempt``."""
    loggers: list[dict[str, Any]] = [
        {
            "class_path": "lightning.pytorch.loggers.CSVLogger",
            "init_args": {"save_dir": str(attempt.parent), "name": "", "version": attempt.name},
        }
    ]
    if wandb:
        loggers.append(
            {
                "class_path": "lightning.pytorch.loggers.WandbLogger",
                "init_args": {"save_dir": str(attempt), "project": "clipsam-benchmark", "name": run_name, "offline": True},
            }
        )
    settings = _nested(overrides)
    trainer = settings.setdefault("trainer", {})
    trainer["default_root_dir"] = str(attempt)
    trainer["logger"] = loggers
    settings_file = attempt.parent / f"{attempt.name}_{stage}.yaml"
    settings_file.parent.mkdir(parents=True, exist_ok=True)
    settings_file.write_text(yaml.safe_dump(settings, sort_keys=False))
    args = [stage]
    for path in [*configs, settings_file]:
        args += ["--config", str(path)]
    return args


def subprocess_runner(args: list[str], log: Path) -> int:
    """Run ``python -m clipsam.cli ARGS`` in a child process, output to ``log``."""
    env = dict(os.environ)
    env.setdefault("WANDB_MODE", "offline")
    with log.open("w") as handle:
        proc = subprocess.run([sys.executable, "-m", "clipsam.cli", *args], stdout=handle, stderr=subprocess.STDOUT, env=env)
    return proc.returncode


def inprocess_runner(args: list[str], log: Path) -> int:
    """Run the CLI in this process (faster: no interpreter start per command), output to ``log``."""
    import contextlib

    from clipsam.lightning_cli import run

    with log.open("w") as handle, contextlib.redirect_stdout(handle), contextlib.redirect_stderr(handle):
        return run(args)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _write_json(path: Path, payload: Mapping[str, Any]) -> None:
    from clipsam.io import atomic_write

    with atomic_write(path) as tmp:
        tmp.write_text(json.dumps(payload, indent=2))


def _newest(directory: Path, pattern: str, since: float) -> list[Path]:
    """Files matching ``pattern`` under ``directory`` written after ``since``, newest last."""
    found = [p for p in directory.rglob(pattern) if p.is_file() and p.stat().st_mtime >= since]
    return sorted(found, key=lambda p: p.stat().st_mtime)


def _find_checkpoint(attempt: Path, since: float) -> Path | None:
    """The fit's checkpoint: ``last.ckpt`` if written, else the newest ``*.ckpt`` of this attempt."""
    for root in (attempt, attempt.parent):  # the attempt folder, or wherever the loggers put it
        found = _newest(root, "*.ckpt", since)
        last = [p for p in found if p.name == "last.ckpt"]
        if last or found:
            return (last or found)[-1]
    return None


def _find_results(attempt: Path, since: float) -> Path | None:
    """The ``test_results.json`` the test command just wrote."""
    for root in (attempt, attempt.parent):
        found = _newest(root, "test_results.json", since)
        if found:
            return found[-1]
    return None


def _run_step(
    cell: Cell, stage: str, args: list[str], log: Path, attempt: Path, runner: Runner, what: str,
    find: Callable[[Path, float], Path | None],
) -> tuple[Path, float]:
    """Run ``clipsam <stage>`` for the cell and find what it wrote (``find``), with its seconds.

    Raises:
        ConfigError: the command failed (with the last lines of its log) or wrote no ``what``.
    """
    start, since = time.perf_counter(), time.time() - 1.0
    try:
        code = runner(args, log)
    except KeyboardInterrupt:
        _mark_interrupted(attempt, stage)
        raise
    if code == 130:  # the command was interrupted (Ctrl+C reached it first): stop the benchmark too
        _mark_interrupted(attempt, stage)
        raise KeyboardInterrupt
    if code != 0:
        tail = log.read_text().strip().splitlines()[-8:] if log.is_file() else []
        raise ConfigError(
            f"benchmark cell {cell.name}: `clipsam {stage}` exited {code}; its log is {log}. Last lines:\n  "
            + "\n  ".join(tail)
        )
    found = find(attempt, since)
    if found is None:
        raise ConfigError(f"benchmark cell {cell.name}: `clipsam {stage}` wrote no {what} under {attempt}; see {log}")
    return found, time.perf_counter() - start


INCOMPLETE_MARKER = "INCOMPLETE"  # clipsam.runs.INCOMPLETE_MARKER (not imported: runs pulls in Lightning)


def _mark_interrupted(attempt: Path, stage: str) -> None:
    """The benchmark stopped while ``clipsam <stage>`` ran in ``attempt``: whatever the command
    wrote there is not a finished cell (``clipsam compare`` skips folders holding this marker)."""
    if not attempt.is_dir():
        return
    try:
        (attempt / INCOMPLETE_MARKER).write_text(
            f"clipsam benchmark was interrupted during `clipsam {stage}` of this attempt; its files are not a "
            "finished cell. Run the benchmark again to redo it.\n"
        )
    except OSError:
        pass  # a full or read-only disk: the command's own marker (if any) stays


def _ensure_fit(grid: Grid, cell: Cell, runner: Runner, say: Callable[[str], None]) -> Path:
    """The checkpoint of the cell's fit; runs ``clipsam fit`` only if no finished fit has its hash."""
    digest = cell.fit_hash()
    directory = grid.root / "fits" / f"{cell.method.method}-{cell.direction.name}-{digest[:8]}"
    state = _read_json(directory / "fit.json")
    ckpt = Path(state["checkpoint"]) if state.get("hash") == digest and state.get("checkpoint") else None
    if ckpt is not None and ckpt.is_file():
        say(f"  fit   {cell.method.method}/{cell.direction.name}: done ({ckpt})")
        return ckpt
    attempt = _next_attempt(directory)
    args = _command("fit", cell.fit_configs, cell.fit_overrides, attempt, wandb=grid.wandb, run_name=f"{cell.name}/fit")
    log = directory / f"{attempt.name}_fit.log"
    say(f"  fit   {cell.method.method}/{cell.direction.name}: clipsam {' '.join(args)}")
    found, seconds = _run_step(cell, "fit", args, log, attempt, runner, "checkpoint", _find_checkpoint)
    _write_json(directory / "fit.json", {"hash": digest, "checkpoint": str(found), "seconds": seconds})
    return found


def _cell_dir(grid: Grid, cell: Cell) -> Path:
    return grid.root / "cells" / cell.method.name / cell.direction.name / cell.ablation.name


def cell_results(grid: Grid, cell: Cell) -> Path | None:
    """The cell's test_results.json if the cell is finished with its current hash, else None."""
    state = _read_json(_cell_dir(grid, cell) / "cell.json")
    results = Path(state["results"]) if state.get("hash") == cell.test_hash() and state.get("results") else None
    return results if results is not None and results.is_file() else None


def _adopt_finished_attempt(grid: Grid, cell: Cell) -> Path | None:
    """An attempt whose test finished after the benchmark itself was stopped (killed between the
    command's end and ``cell.json``): recorded now instead of being run again.

    Only the attempt ``cell.json`` names as running, with the cell's current hash, holding a
    ``test_results.json`` and no ``INCOMPLETE`` marker, is adopted.
    """
    directory = _cell_dir(grid, cell)
    state = _read_json(directory / "cell.json")
    running = state.get("running")
    if not running or state.get("hash") != cell.test_hash():
        return None
    attempt = Path(running)
    results = attempt / "test_results.json"
    if not results.is_file() or (attempt / INCOMPLETE_MARKER).exists():
        return None
    _write_json(
        directory / "cell.json",
        {"hash": cell.test_hash(), "results": str(results), "checkpoint": state.get("checkpoint"),
         "seconds": None, "adopted": True},
    )  # fmt: skip
    return results


def _run_cell(grid: Grid, cell: Cell, runner: Runner, say: Callable[[str], None]) -> Path:
    done = cell_results(grid, cell)
    if done is not None:
        say(f"cell {cell.name}: finished earlier, not rerun ({done})")
        return done
    adopted = _adopt_finished_attempt(grid, cell)
    if adopted is not None:
        say(f"cell {cell.name}: its test finished after the benchmark stopped; recorded, not rerun ({adopted})")
        return adopted
    say(f"cell {cell.name}:")
    ckpt = _ensure_fit(grid, cell, runner, say) if cell.trainable else None
    directory = _cell_dir(grid, cell)
    attempt = _next_attempt(directory)
    # Until the test ends, cell.json names the attempt as running (never as results), so neither
    # a rerun nor `clipsam compare` takes what an interrupted command left as a finished cell.
    _write_json(
        directory / "cell.json",
        {"hash": cell.test_hash(), "results": None, "running": str(attempt),
         "checkpoint": None if ckpt is None else str(ckpt)},
    )  # fmt: skip
    args = _command("test", cell.test_configs, cell.test_overrides, attempt, wandb=grid.wandb, run_name=cell.name)
    if ckpt is not None:
        args += ["--ckpt_path", str(ckpt)]
    log = directory / f"{attempt.name}_test.log"
    say(f"  test  clipsam {' '.join(args)}")
    results, seconds = _run_step(cell, "test", args, log, attempt, runner, "test_results.json", _find_results)
    _write_json(
        directory / "cell.json",
        {"hash": cell.test_hash(), "results": str(results), "checkpoint": None if ckpt is None else str(ckpt),
         "seconds": seconds},
    )  # fmt: skip
    return results


def _prepare_data(grid: Grid, say: Callable[[str], None]) -> None:
    if not grid.synthetic_data:
        return
    root = Path(os.environ.get("CLIPSAM_SYNTH_ROOT") or os.path.expanduser(str(grid.synthetic_data)))
    os.environ["CLIPSAM_SYNTH_ROOT"] = str(root)
    if (root / "mvtec").is_dir() and (root / "visa").is_dir():
        say(f"synthetic data: reusing {root}")
        return
    from clipsam.data.synthetic import generate_synthetic

    say(f"synthetic data: generating {root} (clipsam data synth --root {root})")
    generate_synthetic(root, seed=0)


def select_cells(cells: Sequence[Cell], only: Sequence[str]) -> list[Cell]:
    """The cells whose name (method/direction/ablation) matches one of the ``only`` globs (all without).

    Raises:
        ConfigError: the globs match no cell (the message lists the cells).
    """
    chosen = [c for c in cells if not only or any(fnmatch.fnmatch(c.name, pattern) for pattern in only)]
    if not chosen:
        raise ConfigError(f"--only {list(only)} matches no cell; cells: {[c.name for c in cells]}")
    return chosen


def run_benchmark(
    grid: Grid,
    *,
    runner: Runner = subprocess_runner,
    only: Sequence[str] = (),
    say: Callable[[str], None] | None = None,
) -> Any:
    """Run every unfinished cell (matching ``only`` globs, if given), then compare all finished cells.

    Returns:
        the :class:`clipsam.compare.Comparison` of the finished cells (also written to
        ``root/compare.csv`` and ``root/compare.md`` and printed).
    """
    from clipsam.compare import build_comparison, load_run, print_comparison, write_outputs

    say = say or (lambda line: print(line, flush=True))
    cells = plan_cells(grid)
    chosen = select_cells(cells, only)
    grid.root.mkdir(parents=True, exist_ok=True)
    _prepare_data(grid, say)
    first_ablation = grid.ablations[0].name
    for cell in chosen:
        _run_cell(grid, cell, runner, say)
    runs = []
    for cell in cells:
        results = cell_results(grid, cell)
        if results is None:
            continue
        run = load_run(results)
        ablated = cell.ablation.name != first_ablation
        run.name = cell.method.name + (f" [{cell.ablation.name}]" if ablated else "")
        run.with_paper = not ablated
        runs.append(run)
    comparison = build_comparison(runs)
    write_outputs(comparison, csv_path=grid.root / "compare.csv", markdown_path=grid.root / "compare.md", overwrite=True)
    print_comparison(comparison)
    say(f"compare table: {grid.root / 'compare.csv'}  {grid.root / 'compare.md'}")
    if grid.wandb:
        from clipsam.compare import log_to_wandb

        say(f"W&B (offline): {log_to_wandb(comparison, project='clipsam-benchmark', directory=grid.root / 'wandb')}")
    return comparison


def main(argv: Sequence[str]) -> int:
    """``clipsam benchmark --config GRID.yaml [--only GLOB] [--dry-run]``."""
    parser = argparse.ArgumentParser(prog="clipsam benchmark", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, type=Path, help="the grid file (configs/benchmark/*.yaml)")
    parser.add_argument("--only", action="append", default=[], help="run only cells whose name method/direction/ablation matches this glob")
    parser.add_argument("--dry-run", action="store_true", help="list the cells and whether they are finished; run nothing")
    parser.add_argument(
        "--in-process", action="store_true", help="run the commands in this process (faster; a crash ends the benchmark)"
    )
    args = parser.parse_args(list(argv))
    grid = load_grid(args.config)
    if args.dry_run:
        for cell in select_cells(plan_cells(grid), args.only):
            done = cell_results(grid, cell)
            steps = f"fit {cell.fit_hash()[:8]} (shared by cells with this id) + test" if cell.trainable else "test only"
            print(f"{cell.name}: {steps}, " + (f"finished ({done})" if done else "to run"))
        return 0
    with _terminate_as_interrupt():
        run_benchmark(grid, only=args.only, runner=inprocess_runner if args.in_process else subprocess_runner)
    return 0


@contextlib.contextmanager
def _terminate_as_interrupt() -> Iterator[None]:
    """SIGTERM / SIGHUP stop the benchmark like Ctrl+C: the running command is stopped with it
    (never left running on its own) and its attempt is marked ``INCOMPLETE``."""
    def interrupt(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    previous = {}
    for name in ("SIGTERM", "SIGHUP"):
        number = getattr(signal, name, None)
        if number is None:
            continue
        try:
            previous[number] = signal.signal(number, interrupt)
        except ValueError:  # not the main thread: leave the handlers alone
            pass
    try:
        yield
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)
