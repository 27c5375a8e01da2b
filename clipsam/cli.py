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

Errors the user can fix (:class:`clipsam.errors.ClipSamError`) are printed as one line without a
traceback, and the process exits with status 2.
"""

from __future__ import annotations

import os
import sys

from clipsam.lightning_cli import ClipSamCLI, VersionedSaveConfigCallback, _build_cli, build_cli, clean_help, run

__all__ = ["ClipSamCLI", "VersionedSaveConfigCallback", "_build_cli", "build_cli", "clean_help", "main"]


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``clipsam`` and ``lightning`` console scripts (exit status: see
    :func:`clipsam.lightning_cli.run`)."""
    from clipsam import runs

    args = list(sys.argv[1:] if argv is None else argv)
    os.environ.setdefault("WANDB_SILENT", "true")
    if args[:1] in (["--version"], ["-V"]):
        from clipsam import __version__

        print(f"clipsam {__version__}")
        return 0
    runs.refuse_unsafe_torch_load_override()
    commands = {
        "data": ("clipsam.data.cli", "data_main"),
        "compare": ("clipsam.compare", "main"),
        "benchmark": ("clipsam.benchmark", "main"),
        "export": ("clipsam.export", "export_main"),
    }
    if args and args[0] in commands:
        import importlib

        module, name = commands[args[0]]
        return run(args[1:], getattr(importlib.import_module(module), name))
    # No explicit args from the console script: LightningCLI reads sys.argv itself.
    return run(None if argv is None else args)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
