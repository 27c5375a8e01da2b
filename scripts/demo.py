"""The offline demo behind ``make demo``: generate data, fit, test, predict, report.

Takes about 25 s on 2 idle CPU cores (28 s the first time, which also generates the data; the
time depends on the CPU's speed and on how busy it is) and needs no network: the CLIP and SAM
models are the tiny presets with RANDOM weights, so the numbers only show that every stage of
the pipeline runs.
Each step prints the equivalent ``clipsam`` command.

    python scripts/demo.py [--data-root data/synthetic] [--seed 0]
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CONFIG = "configs/demo.yaml"
BANNER = (
    "NOTE: the demo uses tiny, RANDOMLY INITIALISED CLIP and SAM models (no downloads). Its metrics\n"
    "only show that the pipeline runs end to end; they say nothing about the method's accuracy.\n"
    "Real weights: `clipsam fit --config configs/mvtec.yaml`, then `clipsam test --config configs/mvtec.yaml "
    "--ckpt_path <last.ckpt>` (see README.md)."
)


def _run(args: list[str]):
    from clipsam.cli import _build_cli

    print(f"\n$ clipsam {shlex.join(args)}", flush=True)
    return _build_cli(args)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-root", default=os.environ.get("CLIPSAM_SYNTH_ROOT", "data/synthetic"))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    os.chdir(REPO)
    os.environ["CLIPSAM_SYNTH_ROOT"] = args.data_root
    os.environ.setdefault("WANDB_MODE", "offline")
    os.environ.setdefault("WANDB_SILENT", "true")
    start = time.perf_counter()
    print(BANNER, flush=True)

    from clipsam.data.synthetic import generate_synthetic
    from clipsam.errors import ClipSamError

    try:
        root = Path(args.data_root)
        if (root / "mvtec").is_dir() and (root / "visa").is_dir():
            print(f"\nsynthetic data: reusing {root} (delete it to regenerate)")
        else:
            print(f"\n$ clipsam data synth --root {root} --seed {args.seed}")
            generate_synthetic(root, seed=args.seed)

        fit = _run(["fit", "--config", CONFIG, f"--seed_everything={args.seed}"])
        ckpt = fit.trainer.checkpoint_callback.last_model_path or fit.trainer.checkpoint_callback.best_model_path
        print(f"adapter checkpoint: {ckpt} ({Path(ckpt).stat().st_size / 1e6:.2f} MB)")

        test = _run(["test", "--config", CONFIG, "--ckpt_path", ckpt])
        test_dir = Path(test.trainer.log_dir)

        predict = _run(["predict", "--config", CONFIG, "--ckpt_path", ckpt])
        writer = next(cb for cb in predict.trainer.callbacks if type(cb).__name__ == "PredictionWriter")
    except ClipSamError as err:
        print(f"clipsam: error: {err}", file=sys.stderr)
        return 2

    from clipsam.io import rich_console
    from clipsam.reporting import format_table

    payload = json.loads((test_dir / "test_results.json").read_text())
    console = rich_console()
    console.print()
    console.print(format_table(payload["results"], payload.get("clip_only"), title="clipsam demo (random tiny models)"))
    wandb_runs = sorted((REPO / "runs" / "demo" / "wandb").glob("offline-run-*"))
    console.print(f"run directory (fit):   {Path(fit.trainer.log_dir)}")
    console.print(f"run directory (test):  {test_dir}  (test_results.json, test_results.csv, overlays/)")
    console.print(f"predictions:           {writer.run_dir}  (masks/, overlays/, predictions.csv)")
    if wandb_runs:
        console.print(f"offline W&B run:       {wandb_runs[-1]}  (upload: wandb sync <dir>)")
    console.print(f"demo finished in {time.perf_counter() - start:.0f} s")
    print(BANNER)
    return 0


if __name__ == "__main__":
    sys.exit(main())
