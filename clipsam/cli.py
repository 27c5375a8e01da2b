"""The ``clipsam`` (and ``lightning``) command line.

``clipsam fit|validate|test|predict --config configs/X.yaml [--key.sub=value ...]`` is Lightning's
own CLI over :class:`clipsam.module.ClipSamModule` and
:class:`clipsam.data.datamodule.AnomalyDataModule` (:mod:`clipsam.lightning_cli`). Configs are
parsed in omegaconf mode, so YAML files may use ``${oc.env:MVTEC_ROOT,data/mvtec}``; stacked
``--config`` files merge key by key (:mod:`clipsam.config_stack`).

``clipsam data synth|download ...`` handles data on disk (see :mod:`clipsam.data.cli`).
``clipsam compare RUN...`` compares the test results of runs (:mod:`clipsam.compare`);
``clipsam benchmark --config GRID.yaml`` runs a grid of fit/test cells (:mod:`clipsam.benchmark`).
``clipsam export --format bundle|onnx ...`` exports a model (see :mod:`clipsam.export`).
``clipsam serve --bundle DIR`` serves an ONNX bundle over HTTP (:mod:`clipsam.serve`); it runs
without torch (``pip install 'clipsam[serve]'``), so this module imports the training stack only
for the commands that need it.

Errors the user can fix (:class:`clipsam.errors.ClipSamError`) are printed as one line without a
traceback, and the process exits with status 2.
"""

from __future__ import annotations

import difflib
import os
import sys

import importlib.util

__all__ = ["COMMANDS", "ClipSamCLI", "VersionedSaveConfigCallback", "_build_cli", "build_cli", "clean_help", "main", "top_level_help"]

#: Every ``clipsam`` command with its one-line summary (``clipsam --help``), in the order shown.
COMMANDS: dict[str, str] = {
    "fit": "train the CLIP adapters on data.train (writes checkpoints/last.ckpt)",
    "test": "evaluate on data.test: per-category metrics, thresholds.json, overlays",
    "validate": "the same evaluation as test (validate_results.*)",
    "predict": "segment your own images (a folder or one file): masks, overlays, predictions.csv",
    "compare": "the test results of several runs in one table, beside the paper's numbers",
    "benchmark": "run a grid of fit/test cells (resumable), then compare them",
    "data": "datasets on disk: synth (generated), download (MVTec-AD, VisA, ...), list (formats)",
    "export": "export a model: a bundle folder for clipsam.Segmenter, or the whole method as ONNX",
    "serve": "serve an ONNX bundle over HTTP: JSON API and a web page (no torch needed)",
}

#: Commands that run without torch (the runtime install, ``pip install 'clipsam[serve]'``).
_TORCH_FREE_COMMANDS = ("serve",)

_LIGHTNING_CLI_NAMES = ("ClipSamCLI", "VersionedSaveConfigCallback", "_build_cli", "build_cli", "clean_help", "run")


def __getattr__(name: str):  # lazy: `clipsam serve` must not import torch/Lightning
    if name in _LIGHTNING_CLI_NAMES:
        from clipsam import lightning_cli

        return getattr(lightning_cli, name)
    raise AttributeError(f"module 'clipsam.cli' has no attribute {name!r}")


def _missing_training_stack() -> str | None:
    """The one-line error when this install lacks torch/Lightning (a runtime-only install), else None."""
    missing = [name for name in ("torch", "lightning") if importlib.util.find_spec(name) is None]
    if not missing:
        return None
    return (
        f"this command needs the training stack ({', '.join(missing)} not installed): "
        "pip install 'clipsam[full]' (this install can run `clipsam serve` and clipsam.runtime)"
    )


def _serve(args: list[str]) -> int:
    """``clipsam serve``: torch-free, with the same one-line errors as the other commands."""
    from clipsam.errors import ClipSamError
    from clipsam.serve import serve_main

    try:
        return int(serve_main(args) or 0)
    except ClipSamError as err:
        print(f"clipsam: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("clipsam: interrupted", file=sys.stderr)
        return 130

#: Commands clipsam runs itself (the others are Lightning's CLI): command -> (module, function).
_OWN_COMMANDS = {
    "data": ("clipsam.data.cli", "data_main"),
    "compare": ("clipsam.compare", "main"),
    "benchmark": ("clipsam.benchmark", "main"),
    "export": ("clipsam.export", "export_main"),
}


def top_level_help() -> str:
    """What ``clipsam --help`` prints: every command with its one-line summary."""
    width = max(map(len, COMMANDS)) + 2
    lines = [
        "usage: clipsam COMMAND [options]",
        "",
        "Zero-shot industrial anomaly segmentation: CLIP adapters + a cascaded SAM (PyTorch Lightning).",
        "",
        "commands:",
        *(f"  {name:<{width}}{summary}" for name, summary in COMMANDS.items()),
        "",
        "options:",
        "  -h, --help     this list",
        "  -V, --version  clipsam's version",
        "",
        "`clipsam COMMAND --help` lists the options of one command (e.g. `clipsam test --help`,",
        "`clipsam data synth --help`, `clipsam export --help`).",
        "",
        "examples:",
        "  clipsam fit  --config configs/demo.yaml",
        "  clipsam test --config configs/demo.yaml --ckpt_path runs/demo/version_0/checkpoints/last.ckpt",
        "  clipsam predict --config configs/demo.yaml --ckpt_path ... --data.predict_dir photos/",
    ]
    return "\n".join(lines) + "\n"


def _unknown_command(name: str) -> str:
    """One line for a command that does not exist, with the closest of all commands."""
    close = difflib.get_close_matches(name, list(COMMANDS), n=1, cutoff=0.5)
    hint = f": did you mean `clipsam {close[0]}`?" if close else ""
    return f"unknown command {name!r}{hint} (`clipsam --help` lists every command: {', '.join(COMMANDS)})"


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``clipsam`` and ``lightning`` console scripts (exit status: see
    :func:`clipsam.lightning_cli.run`)."""
    args = list(sys.argv[1:] if argv is None else argv)
    os.environ.setdefault("WANDB_SILENT", "true")
    if args[:1] in (["--version"], ["-V"]):
        from clipsam import __version__

        print(f"clipsam {__version__}")
        return 0
    if not args or args[0] in ("-h", "--help"):
        print(top_level_help(), end="")
        if not args:
            print("clipsam: error: no command given: choose one of the commands above", file=sys.stderr)
            return 2
        raise SystemExit(0)  # as argparse's --help
    if not args[0].startswith("-") and args[0] not in COMMANDS:
        print(f"clipsam: error: {_unknown_command(args[0])}", file=sys.stderr)
        return 2
    if args[0] in _TORCH_FREE_COMMANDS:
        return _serve(args[1:])
    missing = _missing_training_stack()
    if missing is not None:
        print(f"clipsam: error: {missing}", file=sys.stderr)
        return 2
    from clipsam import runs
    from clipsam.lightning_cli import run

    runs.refuse_unsafe_torch_load_override()
    if args[0] in _OWN_COMMANDS:
        import importlib

        module, name = _OWN_COMMANDS[args[0]]
        return run(args[1:], getattr(importlib.import_module(module), name))
    if args[0] == "predict" and any(a == "--watch" or a.startswith("--watch=") for a in args[1:]):
        # `clipsam predict --watch DIR`: segment image files as they arrive (clipsam.watch)
        from clipsam.watch import watch_main

        return run(args[1:], watch_main)
    # No explicit args from the console script: LightningCLI reads sys.argv itself.
    return run(None if argv is None else args)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
