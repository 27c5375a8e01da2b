"""Run the zero-shot suite: fit once per auxiliary dataset, test on every other dataset, one table.

    python scripts/zero_shot_suite.py --config configs/benchmark/zero_shot_suite.yaml
        [--ckpt mvtec=PATH ...]   reuse a fit instead of training
        [--only NAME_OR_FORMAT ...] run only these tests
        [--set key=value ...]     extra overrides for every fit and test (appended to `overrides`)
        [--out DIR]               where suite_results.{json,csv} go (default runs/zero_shot_suite)

The suite file (configs/benchmark/zero_shot_suite.yaml) lists the fits (``train``: name ->
LightningCLI config + dataset root) and the tests (``tests``: name, which fit, format, root,
optional subset); ``${oc.env:VAR,default}`` in roots resolves like in the configs. A fit or test
whose root does not exist is skipped with one line; a test whose fit was skipped too. A dataset
whose layout is broken prints clipsam's one-line error and the suite goes on. The table has one
row per dataset (plus the ``means`` rows, e.g. MVTec LOCO's logical/structural mean); pixel
metrics of image-level datasets and image metrics of lesion-only datasets are n/a.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

COLUMNS = ("pixel_auroc", "pixel_aupro", "pixel_ap", "image_auroc", "image_ap")
TITLES = {"pixel_auroc": "P-AUROC", "pixel_aupro": "P-AUPRO", "pixel_ap": "P-AP", "image_auroc": "I-AUROC", "image_ap": "I-AP"}


def _from_grid(grid: dict[str, Any]) -> dict[str, Any]:
    """A ``clipsam benchmark`` grid (directions x test-only ablations) as a suite.

    Each direction is one fit (its configs, no root check: a missing root is clipsam's one-line
    error); each ablation whose overrides set ``data.test.format`` is one test per direction.
    Methods are not crossed here (the configs' own method runs).
    """
    overrides = [f"{k}={'null' if v is None else v}" for k, v in (grid.get("overrides") or {}).items()]
    train = {name: {"config": (d.get("configs") or [None])[0], "root": None} for name, d in grid["directions"].items()}
    tests = []
    for direction in train:
        for name, ablation in (grid.get("ablations") or {}).items():
            ov = ablation.get("overrides") or {}
            if "data.test.format" not in ov:
                continue
            label = name if len(train) == 1 else f"{name} ({direction})"
            tests.append({"name": label, "train": direction, "format": ov["data.test.format"],
                          "root": ov.get("data.test.root"), "subset": ov.get("data.test.subset")})
    return {"overrides": overrides, "train": train, "tests": tests, "means": grid.get("means") or {}}


def load_suite(path: str | Path) -> dict[str, Any]:
    """Read and resolve a suite file (``${oc.env:...}`` included) into plain containers.

    Also reads a ``clipsam benchmark`` grid file (``directions`` + test-only ``ablations`` that
    set ``data.test.*``), see :func:`_from_grid`.
    """
    conf = OmegaConf.load(path)
    suite = OmegaConf.to_container(conf, resolve=True)
    if "directions" in suite:
        suite = _from_grid(suite)
    for key in ("train", "tests"):
        if key not in suite:
            raise SystemExit(f"zero_shot_suite: {path} lacks the {key!r} section")
    for test in suite["tests"]:
        if test.get("train") not in suite["train"]:
            raise SystemExit(f"zero_shot_suite: test {test.get('name')!r} names an unknown fit {test.get('train')!r}")
    return suite


def _newest(folder: Path, pattern: str, since: float) -> Path | None:
    found = [p for p in folder.rglob(pattern) if p.stat().st_mtime >= since]
    return max(found, key=lambda p: p.stat().st_mtime) if found else None


def _run(args: list[str]) -> Any | None:
    """One clipsam command in-process; a clipsam error prints one line and gives None."""
    from clipsam.cli import _build_cli
    from clipsam.errors import ClipSamError

    try:
        return _build_cli(args)
    except ClipSamError as err:
        print(f"  clipsam: error: {err}")
        return None


def run_fit(name: str, spec: dict[str, Any], overrides: list[str]) -> Path | None:
    """Fit the adapters of one auxiliary dataset; the last checkpoint, or None when skipped."""
    root_args: list[str] = []
    if spec.get("root") is not None:
        root = Path(str(spec["root"])).expanduser()
        if not root.is_dir():
            print(f"skip fit {name}: dataset root {root} does not exist")
            return None
        root_args = [f"--data.train.root={root}"]
    print(f"fit {name} ({spec['config']})")
    cli = _run(["fit", "--config", spec["config"], *root_args, *overrides])
    if cli is None:
        return None
    ckpt = cli.trainer.checkpoint_callback.last_model_path if cli.trainer.checkpoint_callback else ""
    return Path(ckpt) if ckpt else None


def run_test(test: dict[str, Any], config: str, ckpt: Path | None, overrides: list[str]) -> dict[str, Any] | None:
    """Test one dataset zero-shot; its mean metrics, or None when skipped or failed."""
    root = Path(str(test["root"])).expanduser()
    if not root.is_dir():
        print(f"skip {test['name']}: dataset root {root} does not exist")
        return None
    print(f"test {test['name']} ({test['format']}) on {root}")
    args = ["test", "--config", config, f"--data.test.format={test['format']}", f"--data.test.root={root}"]
    args += ["--data.test.categories=null", f"--data.test.subset={test.get('subset') or 'null'}"]
    if ckpt is not None:
        args += ["--ckpt_path", str(ckpt)]
    start = time.time()
    cli = _run([*args, *overrides])
    if cli is None:
        return None
    path = _newest(Path(cli.trainer.default_root_dir), "test_results.json", start)
    if path is None:
        print(f"  no test_results.json was written under {cli.trainer.default_root_dir}")
        return None
    results = json.loads(path.read_text())["results"]
    return {"mean": results["mean"], "num_images": results.get("num_images"), "file": str(path)}


def _fmt(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return f"{100.0 * value:.1f}"


def build_table(rows: dict[str, dict[str, Any] | None], means: dict[str, list[str]]) -> list[list[str]]:
    """Header + one row per dataset (skipped ones say so) + the ``means`` rows."""
    table = [["dataset", "images", *(TITLES[c] for c in COLUMNS)]]
    for name, row in rows.items():
        if row is None:
            table.append([name, "skipped", *("" for _ in COLUMNS)])
        else:
            table.append([name, str(row["num_images"]), *(_fmt(row["mean"].get(c)) for c in COLUMNS)])
    for name, parts in means.items():
        got = [rows.get(p) for p in parts]
        if any(r is None for r in got):
            continue
        values = []
        for c in COLUMNS:
            vals = [r["mean"].get(c) for r in got]
            ok = [v for v in vals if v is not None and not math.isnan(v)]
            values.append(_fmt(sum(ok) / len(ok)) if len(ok) == len(vals) else "n/a")
        table.append([name, "", *values])
    return table


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="configs/benchmark/zero_shot_suite.yaml")
    parser.add_argument("--ckpt", nargs="+", default=[], metavar="FIT=PATH", help="reuse checkpoints instead of fitting")
    parser.add_argument("--only", nargs="+", default=None, metavar="NAME", help="tests to run (names or format keys)")
    parser.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE", help="overrides for every fit and test")
    parser.add_argument("--out", default="runs/zero_shot_suite", help="folder of suite_results.json/.csv")
    args = parser.parse_args(argv)

    suite = load_suite(args.config)
    overrides = [f"--{o.lstrip('-')}" for o in [*suite.get("overrides", []), *args.set]]
    tests = [t for t in suite["tests"] if args.only is None or t["name"] in args.only or t["format"] in args.only]
    ckpts: dict[str, Path | None] = {}
    for item in args.ckpt:
        name, _, path = item.partition("=")
        ckpts[name] = Path(path)
    rows: dict[str, dict[str, Any] | None] = {}
    for fit in dict.fromkeys(t["train"] for t in tests):
        if fit not in ckpts:
            ckpts[fit] = run_fit(fit, suite["train"][fit], overrides)
            if ckpts[fit] is None:
                print(f"skip every test trained on {fit}: no checkpoint")
    for test in tests:
        ckpt = ckpts.get(test["train"])
        rows[test["name"]] = None if ckpt is None else run_test(test, suite["train"][test["train"]]["config"], ckpt, overrides)

    table = build_table(rows, suite.get("means", {}))
    widths = [max(len(r[i]) for r in table) for i in range(len(table[0]))]
    print()
    for k, row in enumerate(table):
        print("  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths))))
        if k == 0:
            print("  ".join("-" * w for w in widths))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "suite_results.json").write_text(json.dumps({"tests": rows, "means": suite.get("means", {})}, indent=2))
    with (out / "suite_results.csv").open("w", newline="") as handle:
        csv.writer(handle).writerows(table)
    print(f"\nsuite results: {out / 'suite_results.json'}  {out / 'suite_results.csv'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
