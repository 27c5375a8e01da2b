"""``clipsam fit|validate|test|predict``: Lightning's CLI with clipsam's checks and run folders.

``clipsam fit|validate|test|predict --config configs/X.yaml [--key.sub=value ...]`` is Lightning's
own :class:`~lightning.pytorch.cli.LightningCLI` over :class:`clipsam.module.ClipSamModule` and
:class:`clipsam.data.datamodule.AnomalyDataModule`. Configs are parsed in omegaconf mode, so YAML
files may use ``${oc.env:MVTEC_ROOT,data/mvtec}`` for dataset roots.

Stacked ``--config`` files (and ``--model.method_config.*`` / ``--model.refiner_config.*``
options) merge key by key before Lightning parses them (:mod:`clipsam.config_stack`).
:func:`run` is the error-handling entry point shared by :mod:`clipsam.cli` and
:mod:`clipsam.benchmark`: errors the user can fix (:class:`clipsam.errors.ClipSamError`) are
printed as one line without a traceback, and the process exits with status 2.
"""

from __future__ import annotations

import difflib
import logging
import re
import sys
import warnings
from pathlib import Path
from typing import Any

import yaml
from jsonargparse import DefaultHelpFormatter
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.cli import (
    LightningArgumentParser,
    LightningCLI,
    SaveConfigCallback,
)

from clipsam.errors import ClipSamError, ConfigError

__all__ = ["ClipSamCLI", "VersionedSaveConfigCallback", "build_cli", "run"]


class VersionedSaveConfigCallback(SaveConfigCallback):
    """Save the resolved config into the run directory without ever overwriting a file.

    Lightning's callback refuses to start when ``config.yaml`` already exists in ``trainer.log_dir``
    (for instance ``fit`` then ``test`` with a logger-less trainer, which share
    ``default_root_dir``). This one writes ``config.yaml`` if free, else ``config_<stage>.yaml``,
    else ``config_<stage>_<n>.yaml``.
    """

    run_dir: Path | None = None
    """The run directory the CLI reserved (None: ``trainer.log_dir``, as in Lightning)."""

    wandb_extra: dict[str, Any] | None = None
    """Added to the W&B config and summary: ``fit_run`` (the fit a test tests), ``resumed_from``."""

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if self.already_saved:
            return
        if str(getattr(stage, "value", stage)) == "predict":
            self._save_into_predict_dir(trainer)
            return
        log_dir = str(self.run_dir) if self.run_dir is not None else trainer.log_dir
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
        if self.run_dir is None:
            super().setup(trainer, pl_module, stage)
            return
        # Lightning's setup writes to trainer.log_dir; write to the reserved run directory instead.
        if trainer.is_global_zero:
            config_path = self.run_dir / self.config_filename
            self.parser.save(self.config, str(config_path), skip_none=False, overwrite=False, multifile=self.multifile)
            self.save_config(trainer, pl_module, stage)
            self.already_saved = True
        self.already_saved = trainer.strategy.broadcast(self.already_saved)

    def _save_into_predict_dir(self, trainer: Trainer) -> None:
        """predict: the config goes into the predictions' own ``version_N`` (one counter per
        command; no logger run directory; a W&B run of its own only with a WandbLogger in the config)."""
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
        record = {"cli": config, "subcommand": subcommand}
        # Which adapters this run used (path + sha256), and where its files are.
        record["checkpoint"] = getattr(pl_module, "checkpoint_record", None)
        record["run_dir"] = str(self.run_dir) if self.run_dir is not None else trainer.log_dir
        extra = dict(self.wandb_extra or {})
        record.update(extra)
        for logger in loggers:
            logger.experiment.config.update(record, allow_val_change=True)
            fit_run = extra.get("fit_run") or {}
            if fit_run.get("id"):  # the fit this run tests, findable in the runs table too
                logger.experiment.summary["fit_run_id"] = fit_run["id"]


_SPHINX_ROLE = re.compile(r":(?:class|func|meth|mod|attr|data|obj|exc|ref|doc):`~?([^`]+)`")


def clean_help(text: str) -> str:
    """Docstring markup -> plain text for ``--help``: ``:class:`~a.B``` -> ``B``, ````x```` -> ``x``."""
    text = _SPHINX_ROLE.sub(lambda m: m.group(1).rsplit(".", 1)[-1] if "~" in m.group(0) else m.group(1), text)
    return text.replace("``", "")


class _HelpFormatter(DefaultHelpFormatter):
    """jsonargparse's formatter without raw Sphinx markup in the help of each key."""

    def _get_help_string(self, action: Any) -> str:
        text = clean_help(super()._get_help_string(action))
        dest = str(getattr(action, "dest", ""))
        if dest.endswith("model.method_config") or dest.endswith("model.refiner_config"):
            from clipsam.settings_help import settings_listing

            text += "\n" + settings_listing("method" if dest.endswith("method_config") else "refiner")
        return text

    def _format_text(self, text: str) -> str:
        return super()._format_text(clean_help(text))

    def add_text(self, text: str | None) -> None:
        super().add_text(clean_help(text) if isinstance(text, str) else text)

    def start_section(self, heading: str | None) -> None:
        super().start_section(clean_help(heading) if isinstance(heading, str) else heading)


def yaml_problem(err: BaseException) -> str:
    """A YAML parse error on one line: ``<problem> at line N, column M`` (lines count from 1)."""
    mark = getattr(err, "problem_mark", None) or getattr(err, "context_mark", None)
    problem = getattr(err, "problem", None) or getattr(err, "context", None)
    if problem and mark is not None:
        return f"{problem} at line {mark.line + 1}, column {mark.column + 1}"
    return " ".join(str(err).split())


def check_yaml_file(path: str) -> None:
    """A ``--config`` file that is not valid YAML: one line naming the file and the problem.

    Missing files are left to the config loader, which names them too.

    Raises:
        ConfigError: ``<file>: <problem> at line N, column M``.
    """
    file = Path(path).expanduser()
    if not file.is_file():
        return
    try:
        yaml.safe_load(file.read_text())
    except UnicodeDecodeError as err:
        raise ConfigError(f"{file}: not a text (YAML) file ({err.reason} at byte {err.start}): pass a YAML config") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{file}: not valid YAML: {yaml_problem(err)}; fix the file") from None


def _condense(message: str) -> str:
    """A jsonargparse error on one line; a config file that does not load names the file and the
    YAML problem with its line."""
    unable = re.search(r"Unable to load config '([^']+)'", message)
    if unable:
        try:
            check_yaml_file(unable.group(1))
        except ClipSamError as err:
            key = re.match(r'Parser key "([^"]+)"', message.strip())
            return str(err) + (f" (given as --{key.group(1)})" if key else "")
    return " ".join(message.split())


class ClipSamArgumentParser(LightningArgumentParser):
    """Lightning's parser with one-line errors and the closest valid key for a mistyped one.

    jsonargparse prints the whole usage (over a hundred lines) before each error; here an error
    is one ``clipsam: error: ...`` line (exit status 2), with where to find the options.
    """

    def error(self, message: str, ex: Exception | None = None) -> None:  # type: ignore[override]
        unknown = re.findall(r"--[\w.\-]+", message) if "nrecognized argument" in message else []
        hints = []
        if unknown:
            valid = [opt for action in self._actions for opt in action.option_strings if opt.startswith("--")]
            for arg in unknown:
                close = difflib.get_close_matches(arg, valid, n=1, cutoff=0.75)
                if close:
                    hints.append(f"{arg}: did you mean {close[0]}?")
        try:
            from jsonargparse._common import debug_mode_active
        except ImportError:  # another jsonargparse layout: no debug mode to respect

            def debug_mode_active() -> bool:
                return False

        if not self.exit_on_error or debug_mode_active():
            super().error(message + "".join(f"\n{hint}" for hint in hints), ex)
        self._logger.error(message)
        parser = getattr(ex, "subcommand_parser", None) or self
        words = parser.prog.replace(" [options]", "").split()
        command = " ".join(["clipsam", *words[1:]])  # argv[0] may be lightning, __main__.py, ...
        line = _condense(message) + "".join(f"; {hint}" for hint in hints)
        sys.stderr.write(f"clipsam: error: {line} (`{command} --help` lists every option)\n")
        raise SystemExit(2)


def _check_config_args(args: list[str]) -> None:
    """Every ``--config FILE`` is valid YAML (one line naming the file and the line otherwise)."""
    for i, arg in enumerate(args):
        if arg in ("--config", "-c") and i + 1 < len(args):
            check_yaml_file(args[i + 1])
        elif arg.startswith("--config="):
            check_yaml_file(arg.split("=", 1)[1])


def _bad_yaml_option(args: list[str]) -> str | None:
    """The first ``--key=value`` (or ``--key value``) whose value YAML cannot parse."""
    for i, arg in enumerate(args):
        if not arg.startswith("--"):
            continue
        name, value = arg.split("=", 1) if "=" in arg else (arg, args[i + 1] if i + 1 < len(args) else None)
        if value is None:
            continue
        try:
            yaml.safe_load(value)
        except yaml.YAMLError:
            return f"{name}={value}"
    return None


class ClipSamCLI(LightningCLI):
    """LightningCLI with clipsam's argument links, defaults, checks and run-directory handling.

    Before anything is written, :meth:`_run_subcommand` checks everything a user can get wrong
    (paths, ``~`` without a home directory, ``data.image_size`` against the patch size, output
    folders, the dataset, the checkpoint); each problem is one :class:`ClipSamError`. Only then
    is the run directory reserved (:func:`clipsam.runs.reserve_run_dir`) and handed to every
    logger, checkpoint callback and the config saver, so two runs started together never share
    one. The run directory holds an ``INCOMPLETE`` marker until the run ends normally.
    ``predict`` has one folder only, its ``model.evaluation.predict_dir/version_N`` (the
    PredictionWriter's, with its own ``INCOMPLETE`` marker): no logger run folder; with a
    ``WandbLogger`` in the config, the writer logs counts and overlays to a W&B run in that folder.
    """

    def __init__(self, *pos: Any, args: Any = None, **kwargs: Any) -> None:
        # Stacked --config files merge key by key (clipsam.config_stack) before Lightning parses.
        from clipsam.config_stack import stack_cli_args

        given = list(sys.argv[1:]) if args is None else args
        if isinstance(given, list):
            _check_config_args(given)
            try:
                stacked = stack_cli_args(given)
            except yaml.YAMLError as err:  # a --model.method_config.<key>=<value> that is not YAML
                raise ConfigError(f"{_bad_yaml_option(given) or 'an option value'} is not a YAML value: {yaml_problem(err)}") from None
            except ConfigError as err:  # a config file YAML reads but the config loader refuses (a duplicate key)
                mark = getattr(err.__cause__, "problem_mark", None)
                if mark is None or not getattr(mark, "name", None):
                    raise
                raise ConfigError(f"{mark.name}: not a valid config: {yaml_problem(err.__cause__)}; fix the file") from None
            if stacked != given:
                args = stacked
        super().__init__(*pos, args=args, **kwargs)

    def init_parser(self, **kwargs: Any) -> LightningArgumentParser:
        kwargs.setdefault("formatter_class", _HelpFormatter)
        kwargs.setdefault(
            "epilog",
            "every command (compare, benchmark, data, export, ...): `clipsam --help`; "
            "`clipsam data {synth,download,list} --help` (datasets on disk), "
            "`clipsam export --help` (bundle / ONNX), `clipsam serve --help`, `clipsam --version`; "
            "`clipsam predict ... --watch DIR` segments files as they arrive (`clipsam predict --watch DIR --help`).",
        )
        if self.parser_class is LightningArgumentParser:
            self.parser_class = ClipSamArgumentParser
        return super().init_parser(**kwargs)

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        # One frame size for data, CLIP and SAM prompts: set it once, as data.image_size.
        parser.link_arguments("data.image_size", "model.image_size")
        # Tiled inference: the data cuts nothing, it only sizes the canvas; the model tiles.
        parser.link_arguments("data.tiling", "model.tiling")

        parser.add_argument(
            "--allow_untrained",
            type=bool,
            default=False,
            help=(
                "test/validate/predict without --ckpt_path, i.e. with randomly initialised CLIP "
                "adapters (refused by default: the numbers would mean nothing)"
            ),
        )

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


    def _parse_ckpt_path(self) -> None:
        """Keep the user's config when ``--ckpt_path`` is given.

        Lightning 2.6's CLI replaces the ``model`` config with the checkpoint's hyper-parameters.
        For clipsam that would silently undo every test-time setting (PPG kernel, cascade depth,
        fusion: the paper's ablations) in favour of the values at training time. The config
        stays the interface; :meth:`clipsam.module.ClipSamModule.check_checkpoint` instead
        checks that the checkpoint's adapters fit the configured backbone and layers, and says
        which keys to change when they don't.
        """

    def before_instantiate_classes(self) -> None:
        from clipsam import runs

        subcommand = str(self.subcommand)
        config = self.config.get(subcommand, self.config)
        runs.check_home_paths(config)
        runs.check_image_size(config)
        runs.check_run_settings(config, subcommand)
        runs.check_cache_variable(config)
        # predict writes into model.evaluation.predict_dir/version_N only: no logger run folder
        # and no (empty) W&B run beside it; a configured WandbLogger's settings go to the
        # PredictionWriter, which logs counts and overlays to a W&B run in that folder.
        self._predict_wandb = None
        if subcommand == "predict":
            from clipsam.wandb_logging import predict_wandb_settings

            self._predict_wandb = predict_wandb_settings(config["trainer"].get("logger"))
            config["trainer"]["logger"] = False

    def _run_subcommand(self, subcommand: str) -> None:
        from clipsam import runs

        # 1. Every check that can fail, before any folder, config copy or W&B run exists.
        # A training-free method cannot fit: say so before the data is read or anything written.
        self.model.check_stage(subcommand)
        runs.check_output_folders(
            self.trainer, self.model, subcommand, predict_input=getattr(self.datamodule, "predict_dir", None)
        )
        self.datamodule.setup(subcommand)
        ckpt = runs.resolve_ckpt_path(
            self.config_init[subcommand].get("ckpt_path"),
            subcommand=subcommand,
            allow_untrained=bool(self.config_init[subcommand].get("allow_untrained", False)),
            trainer=self.trainer,
            model=self.model,
        )
        self.config_init[subcommand]["ckpt_path"] = ckpt.path
        self.model.checkpoint_record = ckpt.record()
        runs.check_sam_weights(self.model, subcommand)
        from clipsam.callbacks import ConsoleReport, PredictionWriter

        if not any(isinstance(cb, ConsoleReport) for cb in self.trainer.callbacks):
            # Reports print after the progress bar has finished, not above it.
            self.trainer.callbacks.append(ConsoleReport())
        if subcommand == "predict":
            # One folder per predict: the PredictionWriter's version_N (config, run.json,
            # INCOMPLETE marker, outputs; the writer marks an interrupted run itself).
            # Read by the PredictionWriter (a model callback, made when the run starts).
            self.model.predict_wandb = {"settings": self._predict_wandb, "fit_run": ckpt.wandb}
            try:
                super()._run_subcommand(subcommand)
            except SystemExit as exit_:
                if _sigterm(exit_, self.trainer):
                    writer = next((cb for cb in self.trainer.callbacks if isinstance(cb, PredictionWriter)), None)
                    done = f"{writer._count} image(s) written to {writer.run_dir} and listed in its predictions.csv; " if writer and writer.run_dir else ""
                    raise runs.Stopped("SIGTERM", f"{done}its INCOMPLETE file says so; run predict again for the rest") from exit_
                if str(getattr(self.trainer.state.status, "value", "")) == "interrupted":
                    raise KeyboardInterrupt from exit_
                raise
            return
        # 2. The run directory, reserved atomically and handed to loggers and callbacks.
        run_dir = runs.reserve_run_dir(self.trainer, subcommand=subcommand, checkpoint=ckpt.record())
        self._configure_wandb(subcommand, ckpt)
        for callback in self.trainer.callbacks:
            if isinstance(callback, VersionedSaveConfigCallback):
                callback.run_dir = run_dir
        try:
            super()._run_subcommand(subcommand)
        except SystemExit as exit_:
            if _sigterm(exit_, self.trainer):
                runs.mark_run(run_dir, "stopped by SIGTERM")
                callback = self.trainer.checkpoint_callback
                last = getattr(callback, "last_model_path", "") or getattr(callback, "best_model_path", "")
                resume = f"; resume with --ckpt_path {last}" if subcommand == "fit" and last else ""
                raise runs.Stopped("SIGTERM", f"{run_dir} is marked INCOMPLETE{resume}") from exit_
            # Lightning answers Ctrl+C with sys.exit(1) after its graceful shutdown.
            if str(getattr(self.trainer.state.status, "value", "")) == "interrupted":
                runs.mark_run(run_dir, "interrupted (Ctrl+C)")
                raise KeyboardInterrupt from exit_
            runs.mark_run(run_dir, f"exited with status {exit_.code}")
            raise
        except BaseException as err:
            runs.mark_run(run_dir, "interrupted (Ctrl+C)" if isinstance(err, KeyboardInterrupt) else f"failed: {runs.one_line(err)}")
            raise
        runs.mark_run(run_dir, None)

    def _configure_wandb(self, subcommand: str, ckpt: Any) -> None:
        """Name, group, tag and link this command's W&B runs (:mod:`clipsam.wandb_logging`)."""
        from clipsam.wandb_logging import (
            WandbCheckpointLink,
            configure_wandb,
            link_record,
        )

        resume = subcommand == "fit" and ckpt.path is not None and ckpt.resumable
        record = configure_wandb(
            self.trainer, model=self.model, datamodule=self.datamodule, subcommand=subcommand, fit_record=ckpt.wandb, resume=resume
        )
        if record is None:
            return
        extra: dict[str, Any] = {"wandb_run": record}
        if subcommand == "fit":
            self.trainer.callbacks.append(WandbCheckpointLink(record))
            if resume:
                extra["resumed_from"] = ckpt.path
        else:
            extra["fit_run"] = link_record(ckpt.wandb, ckpt.path)
        for callback in self.trainer.callbacks:
            if isinstance(callback, VersionedSaveConfigCallback):
                callback.wandb_extra = extra


def _sigterm(exit_: SystemExit, trainer: Any) -> bool:
    """Whether the run ended because the process received SIGTERM (Lightning's SIGTERMException)."""
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    return isinstance(exit_, SIGTERMException) or bool(getattr(trainer, "received_sigterm", False))


# Lightning warnings that are expected with clipsam's design and would only alarm users.
_EXPECTED_WARNINGS = (
    # clipsam passes the command line rewritten by clipsam.config_stack (stacked --config files).
    r".*LightningCLI's args parameter is intended to run from within Python.*",
    # The frozen CLIP/SAM stay in eval mode while the adapters train: that is the method.
    r".*module\(s\) in eval mode at the start of training.*",
    # fit has no validation set on purpose (the zero-shot target is never looked at in training).
    r".*Total length of `.*` across ranks is zero.*",
    # test/predict load adapters from a fit run's checkpoint into a new run directory.
    r".*The dirpath has changed from .* won't be reloaded.*",
    # the run directory is reserved (and holds the INCOMPLETE marker) before the CSV logger starts.
    r".*Experiment logs directory .* exists and is not empty.*",
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


def build_cli(args: list[str] | None, *, run: bool = True) -> ClipSamCLI:
    """The CLI for ``args`` (None: ``sys.argv``), run unless ``run`` is False."""
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
            # wandb's service process keeps logging into the folder of the run that started it:
            # stop it, so no earlier run folder is written to by a later command.
            wandb.teardown()


_build_cli = build_cli  # the name scripts and tests used


def run(args: list[str] | None, command: Any = None) -> int:
    """Run ``command(args)`` (default: the Lightning CLI) and turn user errors into exit status 2.

    Exit status: 0 done; 2 an error the user can fix, printed as one ``clipsam: error: ...``
    line (a :class:`ClipSamError`, also when raised inside a DataLoader worker; a full or
    read-only disk); 130 interrupted (Ctrl+C); 143 stopped by SIGTERM (a service manager, a
    batch scheduler), one ``clipsam: stopped by SIGTERM ...`` line saying what was kept;
    anything else is a bug and keeps its traceback.
    """
    from clipsam import runs

    try:
        if command is None:
            build_cli(args)
            return 0
        return int(command(args) or 0)
    except ClipSamError as err:
        print(f"clipsam: error: {runs.user_message(err)}", file=sys.stderr)
        return 2
    except OSError as err:
        message = runs.disk_error_message(err)
        if message is None:
            raise
        print(f"clipsam: error: {message}", file=sys.stderr)
        return 2
    except runs.Stopped as stop:
        print(f"clipsam: {stop}", file=sys.stderr)
        return stop.status
    except KeyboardInterrupt:
        print("clipsam: interrupted", file=sys.stderr)
        return 130
