"""The ``clipsam`` (and ``lightning``) command line.

``clipsam fit|validate|test|predict --config configs/X.yaml [--key.sub=value ...]`` is Lightning's
own :class:`~lightning.pytorch.cli.LightningCLI` over :class:`clipsam.module.ClipSamModule` and
:class:`clipsam.data.datamodule.AnomalyDataModule`. Configs are parsed in omegaconf mode, so YAML
files may use ``${oc.env:MVTEC_ROOT,data/mvtec}`` for dataset roots.

``clipsam data synth|download ...`` handles data on disk (see :mod:`clipsam.data.cli`).
``clipsam export --format bundle|onnx ...`` exports a trained model (see :mod:`clipsam.export`).

Errors the user can fix (:class:`clipsam.errors.ClipSamError`) are printed as one line without a
traceback, and the process exits with status 2.
"""

from __future__ import annotations

import difflib
import logging
import os
import re
import sys
import warnings
from pathlib import Path
from typing import Any

import yaml

from lightning.pytorch import LightningModule, Trainer
from jsonargparse import DefaultHelpFormatter
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI, SaveConfigCallback

from clipsam.errors import ClipSamError

__all__ = ["ClipSamCLI", "VersionedSaveConfigCallback", "main"]


class VersionedSaveConfigCallback(SaveConfigCallback):
    """Save the resolved config into the run directory without ever overwriting a file.

    Lightning's callback refuses to start when ``config.yaml`` already exists in ``trainer.log_dir``
    (for instance ``fit`` then ``test`` with a logger-less trainer, which share
    ``default_root_dir``). This one writes ``config.yaml`` if free, else ``config_<stage>.yaml``,
    else ``config_<stage>_<n>.yaml``.
    """

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if self.already_saved:
            return
        if str(getattr(stage, "value", stage)) == "predict":
            self._save_into_predict_dir(trainer)
            return
        log_dir = trainer.log_dir
        if log_dir is not None and trainer.is_global_zero:
            directory = Path(log_dir)
            name = self.config_filename
            candidate = directory / name
            stem, suffix = Path(name).stem, Path(name).suffix
            n = 0
            while candidate.exists():
                n += 1
                candidate = directory / (f"{stem}_{stage}{suffix}" if n == 1 else f"{stem}_{stage}_{n}{suffix}")
            self.config_filename = candidate.name
        # Broadcast the chosen name so all ranks agree, then let Lightning do the writing.
        self.config_filename = trainer.strategy.broadcast(self.config_filename)
        super().setup(trainer, pl_module, stage)

    def _save_into_predict_dir(self, trainer: Trainer) -> None:
        """predict: the config goes into the predictions' own ``version_N`` (one counter per
        command; no logger run directory, no W&B run)."""
        from clipsam.callbacks import PredictionWriter

        writer = next((cb for cb in trainer.callbacks if isinstance(cb, PredictionWriter)), None)
        if writer is not None:
            run_dir = writer.reserve_run_dir(trainer)
            if trainer.is_global_zero:
                self.parser.save(self.config, str(run_dir / "config.yaml"), skip_none=False, overwrite=False, multifile=self.multifile)
        self.already_saved = True

    def save_config(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        """Log the whole resolved config (trainer, model, data) to W&B, so runs compare there.

        Lightning logs the module's hyper-parameters by itself; the data and trainer sections
        (which dataset, which categories, how many epochs) only reach W&B through here.
        """
        from lightning.pytorch.loggers import WandbLogger

        loggers = [logger for logger in trainer.loggers if isinstance(logger, WandbLogger)]
        if not loggers:
            return
        subcommand = str(getattr(stage, "value", stage))  # "fit", "test", ...
        config = yaml.safe_load(self.parser.dump(self.config, skip_none=False))
        for logger in loggers:
            logger.experiment.config.update({"cli": config, "subcommand": subcommand}, allow_val_change=True)


_SPHINX_ROLE = re.compile(r":(?:class|func|meth|mod|attr|data|obj|exc|ref|doc):`~?([^`]+)`")


def clean_help(text: str) -> str:
    """Docstring markup -> plain text for ``--help``: ``:class:`~a.B``` -> ``B``, ````x```` -> ``x``."""
    text = _SPHINX_ROLE.sub(lambda m: m.group(1).rsplit(".", 1)[-1] if "~" in m.group(0) else m.group(1), text)
    return text.replace("``", "")


class _HelpFormatter(DefaultHelpFormatter):
    """jsonargparse's formatter without raw Sphinx markup in the help of each key."""

    def _get_help_string(self, action: Any) -> str:
        return clean_help(super()._get_help_string(action))

    def _format_text(self, text: str) -> str:
        return super()._format_text(clean_help(text))

    def add_text(self, text: str | None) -> None:
        super().add_text(clean_help(text) if isinstance(text, str) else text)

    def start_section(self, heading: str | None) -> None:
        super().start_section(clean_help(heading) if isinstance(heading, str) else heading)


class ClipSamArgumentParser(LightningArgumentParser):
    """Lightning's parser that suggests the closest valid key for a mistyped one."""

    def error(self, message: str, ex: Exception | None = None) -> None:  # type: ignore[override]
        unknown = re.findall(r"--[\w.\-]+", message) if "nrecognized argument" in message else []
        if unknown:
            valid = [opt for action in self._actions for opt in action.option_strings if opt.startswith("--")]
            hints = []
            for arg in unknown:
                close = difflib.get_close_matches(arg, valid, n=1, cutoff=0.75)
                if close:
                    hints.append(f"{arg}: did you mean {close[0]}?")
            if hints:
                message = f"{message}\n" + "\n".join(hints)
        super().error(message, ex)


class ClipSamCLI(LightningCLI):
    """LightningCLI with clipsam's argument links, defaults and messages."""

    def init_parser(self, **kwargs: Any) -> LightningArgumentParser:
        kwargs.setdefault("formatter_class", _HelpFormatter)
        kwargs.setdefault(
            "epilog",
            "more commands: `clipsam data {synth,download} --help` (datasets on disk), "
            "`clipsam export --help` (bundle / ONNX), `clipsam --version`.",
        )
        if self.parser_class is LightningArgumentParser:
            self.parser_class = ClipSamArgumentParser
        return super().init_parser(**kwargs)

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        # One frame size for data, CLIP and SAM prompts: set it once, as data.image_size.
        parser.link_arguments("data.image_size", "model.image_size")
        # Tiled inference: the data cuts nothing, it only sizes the canvas; the model tiles.
        parser.link_arguments("data.tiling", "model.tiling")

    def _prepare_subcommand_parser(self, klass: type, subcommand: str, **kwargs: Any) -> LightningArgumentParser:
        parser = super()._prepare_subcommand_parser(klass, subcommand, **kwargs)
        if subcommand == "predict":
            # Files are the output of predict: keeping every map in memory too grows ~0.8 MB
            # per image. `--return_predictions=true` brings it back.
            parser.set_defaults(return_predictions=False)
        if subcommand in ("test", "validate"):
            # clipsam prints its own per-category table; Lightning's would repeat the means.
            parser.set_defaults(verbose=False)
        return parser

    def after_fit(self) -> None:
        callback = self.trainer.checkpoint_callback
        path = getattr(callback, "last_model_path", "") or getattr(callback, "best_model_path", "")
        if path and self.trainer.is_global_zero:
            print(f"clipsam: checkpoint {path}\n  next: clipsam test --config ... --ckpt_path {path}")

    def before_instantiate_classes(self) -> None:
        # predict writes into model.evaluation.predict_dir/version_N only: no logger run folder
        # and no (empty) W&B run beside it.
        if self.subcommand == "predict":
            self.config["predict"]["trainer"]["logger"] = False

    def _parse_ckpt_path(self) -> None:
        """Keep the user's config when ``--ckpt_path`` is given.

        Lightning 2.6's CLI replaces the ``model`` config with the checkpoint's hyper-parameters.
        For clipsam that would silently undo every test-time setting (PPG kernel, cascade depth,
        fusion: the paper's ablations) in favour of the values at training time. The config
        stays the interface; :meth:`clipsam.module.ClipSamModule.on_load_checkpoint` instead
        checks that the checkpoint's adapters fit the configured backbone and layers, and says
        which keys to change when they don't.
        """

    # Check the dataset of the subcommand before the trainer starts (and before loggers create
    # run directories), so a bad layout is one clear error and nothing is written.
    def _check_data(self, stage: str) -> None:
        self.datamodule.setup(stage)

    def before_fit(self) -> None:
        self._check_data("fit")

    def before_validate(self) -> None:
        self._check_data("validate")

    def before_test(self) -> None:
        self._check_data("test")

    def before_predict(self) -> None:
        self._check_data("predict")


# Lightning warnings that are expected with clipsam's design and would only alarm users.
_EXPECTED_WARNINGS = (
    # The frozen CLIP/SAM stay in eval mode while the adapters train: that is the method.
    r".*module\(s\) in eval mode at the start of training.*",
    # fit has no validation set on purpose (the zero-shot target is never looked at in training).
    r".*Total length of `.*` across ranks is zero.*",
    # test/predict load adapters from a fit run's checkpoint into a new run directory.
    r".*The dirpath has changed from .* won't be reloaded.*",
    # internal deprecation inside Lightning 2.6 itself.
    r".*isinstance\(treespec, LeafSpec\)` is deprecated.*",
)


def _silence_expected_warnings() -> None:
    for pattern in _EXPECTED_WARNINGS:
        warnings.filterwarnings("ignore", message=pattern)
    # Lightning's "💡 Tip: try installing litlogger/litmodels" advertisements, once per command.
    rank_zero_log = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    if not any(isinstance(f, _NoTips) for f in rank_zero_log.filters):
        rank_zero_log.addFilter(_NoTips())


class _NoTips(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "Tip: For seamless" not in str(record.msg)


def _build_cli(args: list[str] | None, *, run: bool = True) -> ClipSamCLI:
    from clipsam.data.datamodule import AnomalyDataModule
    from clipsam.module import ClipSamModule

    _silence_expected_warnings()
    try:
        return ClipSamCLI(
            ClipSamModule,
            AnomalyDataModule,
            save_config_callback=VersionedSaveConfigCallback,
            # Checkpoints are written next to their target and renamed: never half-written.
            trainer_defaults={"plugins": [{"class_path": "clipsam.callbacks.AtomicCheckpointIO"}]},
            parser_kwargs={"parser_mode": "omegaconf", "default_env": False},
            auto_configure_optimizers=False,
            args=args,
            run=run,
        )
    finally:
        # Close the W&B run of this command, so the next command in the same process (the demo,
        # tests) starts its own run instead of silently appending to this one.
        wandb = sys.modules.get("wandb")
        if wandb is not None and getattr(wandb, "run", None) is not None:
            wandb.finish()


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``clipsam`` and ``lightning`` console scripts."""
    args = list(sys.argv[1:] if argv is None else argv)
    os.environ.setdefault("WANDB_SILENT", "true")
    if args[:1] in (["--version"], ["-V"]):
        from clipsam import __version__

        print(f"clipsam {__version__}")
        return 0
    try:
        if args and args[0] == "data":
            from clipsam.data.cli import data_main

            return data_main(args[1:])
        if args and args[0] == "export":
            from clipsam.export import export_main

            return export_main(args[1:])
        # No explicit args from the console script: LightningCLI reads sys.argv itself.
        _build_cli(None if argv is None else args)
    except ClipSamError as err:
        print(f"clipsam: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("clipsam: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
