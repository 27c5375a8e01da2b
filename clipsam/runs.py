"""What the CLI checks before a run starts, and the run directory it reserves.

:class:`clipsam.cli.ClipSamCLI` calls these in order, so that every problem a user can fix is one
:class:`~clipsam.errors.ClipSamError` raised before any run folder, config copy or W&B run exists:

1. :func:`check_home_paths`, :func:`check_image_size`, :func:`check_run_settings`,
   :func:`check_cache_variable` (right after parsing);
2. :func:`check_output_folders`, the dataset (``datamodule.setup``), :func:`resolve_ckpt_path`
   (after instantiation, before the trainer runs);
3. :func:`reserve_run_dir`: a fresh ``version_N`` made with ``mkdir`` (never ``exist_ok``),
   handed to every logger, checkpoint callback and the config saver; it holds an ``INCOMPLETE``
   marker until :func:`mark_run` removes it at the normal end of the run (or writes why the run
   stopped: failed, interrupted). A run killed with ``kill -9`` keeps the marker.
"""

from __future__ import annotations

import dataclasses
import datetime
import errno
import hashlib
import os
import re
import sys
import tempfile
from pathlib import Path
from typing import Any

from clipsam.errors import ClipSamError, ConfigError, WeightsError
from clipsam.io import next_version_dir, safe_torch_load

__all__ = [
    "CACHE_ENV",
    "INCOMPLETE_MARKER",
    "RUN_DIR_ENV",
    "CheckpointChoice",
    "Stopped",
    "check_cache_variable",
    "check_home_paths",
    "check_image_size",
    "check_output_folders",
    "check_run_settings",
    "check_sam_weights",
    "disk_error_message",
    "file_sha256",
    "mark_run",
    "one_line",
    "refuse_unsafe_torch_load_override",
    "reserve_run_dir",
    "resolve_ckpt_path",
    "user_message",
]

INCOMPLETE_MARKER = "INCOMPLETE"
"""File in a run directory while the run has not ended normally (its text says why)."""

RUN_DIR_ENV = "CLIPSAM_RUN_DIR"
"""Rank 0 hands its reserved run directory to the DDP ranks it launches through this variable."""

EVAL_SUBCOMMANDS = ("test", "validate", "predict")


# ----------------------------------------------------------------------------- messages
def one_line(err: BaseException) -> str:
    """The first line of an exception's message, with its type when the message is empty."""
    text = str(err).strip().splitlines()
    return text[0] if text else type(err).__name__


def user_message(err: ClipSamError) -> str:
    """The message of a clipsam error; for one raised in a DataLoader worker, the worker's line.

    PyTorch re-raises a worker's exception in the main process with the worker's whole
    traceback as the message ("Caught DatasetError in DataLoader worker process 0. Original
    Traceback ..."): the user needs its last line only.
    """
    message = str(err)
    if "Original Traceback" not in message:
        return message
    worker = re.search(r"worker process (\d+)", message)
    lines = [line for line in message.strip().splitlines() if line.strip()]
    last = lines[-1].strip() if lines else message
    last = re.sub(r"^[\w.]*(ClipSamError|ConfigError|DatasetError|WeightsError):\s*", "", last)
    where = f" (in DataLoader worker {worker.group(1)})" if worker else " (in a DataLoader worker)"
    return last + where


class Stopped(BaseException):
    """A run stopped by a signal from outside (a service manager's or batch scheduler's SIGTERM).

    Not an error and not Ctrl+C: :func:`clipsam.lightning_cli.run` prints one line, ``clipsam:
    stopped by SIGTERM ...`` (what was kept and where), and exits with 128 + the signal's number
    (143 for SIGTERM), as a shell reports a process ended by that signal.

    Args:
        signal_name: e.g. ``"SIGTERM"``.
        detail: what was kept, e.g. ``"runs/x/version_3 is marked INCOMPLETE"``.
    """

    def __init__(self, signal_name: str, detail: str = "") -> None:
        import signal

        self.signal_name = signal_name
        self.detail = detail
        self.status = 128 + int(getattr(signal, signal_name, 15))
        super().__init__(f"stopped by {signal_name}" + (f": {detail}" if detail else ""))


_DISK_FULL = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)}
_NOT_WRITABLE = {errno.EROFS, errno.EACCES, errno.EPERM}


def disk_error_message(err: OSError, *, key: str | None = None) -> str | None:
    """One line for a full or read-only disk (None for other OS errors: those are bugs)."""
    where = f" ({key})" if key else ""
    target = err.filename or "an output file"
    if err.errno in _DISK_FULL:
        kept = ""
        if str(target).endswith(".ckpt"):
            # clipsam writes checkpoints to a temporary file and renames it: the old one stays whole.
            kept = "; the checkpoint was not saved and any earlier file of that name is intact"
        return (
            f"No space left on device while writing {target}{where}{kept}: free some space on that disk, "
            "or point the outputs (trainer.default_root_dir, the loggers' save_dir, a ModelCheckpoint's "
            "dirpath, model.evaluation.predict_dir) to another disk"
        )
    if err.errno == errno.EIO:
        return (
            f"cannot write {target}{where}: {err.strerror or 'input/output error'}; check that the disk has space "
            "(and quota) left and works, or point the outputs to another disk"
        )
    if err.errno in _NOT_WRITABLE:
        reason = "read-only file system" if err.errno == errno.EROFS else "permission denied"
        return (
            f"cannot write {target}{where}: {reason}; choose a writable folder "
            "(trainer.default_root_dir, the loggers' save_dir, model.evaluation.predict_dir)"
        )
    return None


def refuse_unsafe_torch_load_override() -> None:
    """Drop ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD`` from this process's environment, with a warning.

    clipsam passes ``weights_only=True`` to every ``torch.load`` it makes (that wins over the
    variable); dropping it also covers loads inside libraries that rely on PyTorch's default.
    """
    value = os.environ.get("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD")
    if value is not None and value.strip().lower() in ("1", "y", "yes", "true"):
        del os.environ["TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"]
        print(
            "clipsam: warning: ignoring TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD: clipsam loads checkpoints "
            "and caches as tensors and plain data only, never code",
            file=sys.stderr,
        )


# ----------------------------------------------------------------------------- parse-time checks
def _walk(value: Any, key: str):
    """(dotted key, leaf value) of a parsed config (jsonargparse Namespaces, dicts, lists)."""
    if hasattr(value, "__dict__") and type(value).__name__ == "Namespace":
        for name, child in vars(value).items():
            yield from _walk(child, f"{key}.{name}" if key else name)
    elif isinstance(value, dict):
        for name, child in value.items():
            yield from _walk(child, f"{key}.{name}" if key else str(name))
    elif isinstance(value, (list, tuple)):
        for i, child in enumerate(value):
            yield from _walk(child, f"{key}[{i}]")
    else:
        yield key, value


def check_home_paths(config: Any) -> None:
    """Every ``~`` path in the config can be expanded (HOME set, or the user known to the system).

    Raises:
        ConfigError: naming the key, when ``~`` cannot be expanded.
    """
    for key, value in _walk(config, ""):
        if isinstance(value, str) and value.startswith("~"):
            if os.path.expanduser(value).startswith("~"):
                home = "HOME is not set" if "HOME" not in os.environ else "the home directory is unknown"
                raise ConfigError(
                    f"{key}={value!r} starts with '~' but {home}, so it cannot be expanded: set HOME, "
                    "or give an absolute path"
                )


def _patch_size(model_name: str) -> int | None:
    """The CLIP vision tower's patch size from open_clip's config registry (None if unknown)."""
    if not model_name or model_name.startswith(("hf-hub:", "local-dir:")):
        return None
    try:
        import open_clip

        from clipsam.models.presets import is_tiny_preset, register_tiny_configs

        if is_tiny_preset(model_name):
            register_tiny_configs()
        cfg = open_clip.get_model_config(model_name)
    except Exception:  # the model build reports unknown names with its own clear error
        return None
    if not cfg:
        return None
    patch = cfg.get("vision_cfg", {}).get("patch_size")
    if isinstance(patch, (list, tuple)):
        patch = patch[0]
    return int(patch) if patch else None


def _get(config: Any, dotted: str) -> Any:
    value = config
    for part in dotted.split("."):
        if value is None:
            return None
        value = value.get(part) if isinstance(value, dict) else getattr(value, part, None)
    return value


def _reads_frame(config: Any) -> bool:
    """Whether the configured method reads the evaluation frame itself (its patch grid must fit it)."""
    from clipsam import methods

    name = _get(config, "model.method") or methods.DEFAULT_METHOD
    if name not in methods.METHODS:
        return False
    module = methods.get_method(name).module
    import importlib

    return getattr(importlib.import_module(module), "input_specs", None) is None


def check_image_size(config: Any) -> None:
    """``data.image_size`` is a positive multiple of the CLIP patch size (before any model is built).

    Raises:
        ConfigError: naming both keys and the nearest valid sizes.
    """
    size = _get(config, "data.image_size")
    if not _reads_frame(config):
        return  # a method with its own input size checks that size itself
    key, name = next(
        ((k, _get(config, k)) for k in ("model.method_config.model_name", "model.method_config.clip.model_name", "model.clip.model_name") if _get(config, k)),
        ("model.method_config.model_name", None),
    )
    if not isinstance(size, int) or not isinstance(name, str):
        return
    if size <= 0:
        raise ConfigError(f"data.image_size must be positive, got {size}")
    patch = _patch_size(name)
    if patch and size % patch:
        lower = max(patch, size // patch * patch)
        raise ConfigError(
            f"data.image_size={size} is not a multiple of the patch size {patch} of "
            f"{key}={name}: use {lower} or {lower + patch}"
        )


def check_run_settings(config: Any, subcommand: str) -> None:
    """Trainer and data numbers Lightning or PyTorch would refuse only after the run folder exists
    (or, for ``max_epochs=0``, accept and train nothing).

    Raises:
        ConfigError: naming the key, the value and what to use.
    """
    workers = _get(config, "data.num_workers")
    if isinstance(workers, int) and not isinstance(workers, bool) and workers < 0:
        raise ConfigError(
            f"data.num_workers={workers} is negative: use 0 (load in the main process) or the number of "
            "worker processes (e.g. 2)"
        )
    for key in ("max_epochs", "max_steps"):
        value = _get(config, f"trainer.{key}")
        if not isinstance(value, int) or isinstance(value, bool):
            continue
        if value < -1:
            raise ConfigError(
                f"trainer.{key}={value} is negative: use a positive number (or -1 for no limit"
                + (", with trainer.max_steps)" if key == "max_epochs" else ")")
            )
        if value == 0 and subcommand == "fit":
            raise ConfigError(
                f"trainer.{key}=0 trains nothing (no checkpoint would be written): use 1 or more"
            )


CACHE_ENV = "CLIPSAM_CACHE"
"""Environment variable of clipsam's cache root (SAM weights in ``$CLIPSAM_CACHE/sam``)."""


def _blocking_file(path: str) -> Path | None:
    """The existing file that keeps ``path`` from being (or becoming) a folder, if any."""
    target = Path(os.path.expanduser(path)).absolute()
    for probe in (target, *target.parents):
        if probe.exists():
            return None if probe.is_dir() else probe
    return None


def check_cache_variable(config: Any = None, *, sam_default: bool = False) -> None:
    """``$CLIPSAM_CACHE``, when something uses it, is (or can become) a folder.

    Args:
        config: a parsed config; its paths below ``$CLIPSAM_CACHE`` (``${oc.env:CLIPSAM_CACHE}``
            in configs/mvtec.yaml) use the variable.
        sam_default: the SAM weights are looked up in ``$CLIPSAM_CACHE/sam`` (no
            ``model.refiner_config.sam.checkpoint`` / ``cache_dir``).

    Raises:
        ConfigError: naming the variable, the file in the way and what uses it.
    """
    value = os.environ.get(CACHE_ENV, "")
    if not value:
        return
    blocker = _blocking_file(value)
    if blocker is None:
        return
    prefix = os.path.expanduser(value).rstrip("/") + "/"
    users = []
    if config is not None:
        users = [
            key for key, leaf in _walk(config, "")
            if isinstance(leaf, str) and (os.path.expanduser(leaf) + "/").startswith(prefix)
        ]
    if sam_default:
        users.append("the SAM weights ($CLIPSAM_CACHE/sam)")
    if not users:
        return
    raise ConfigError(
        f"environment variable {CACHE_ENV}={value}: {blocker} is an existing file, not a folder, and "
        f"{', '.join(users)} {'uses' if len(users) == 1 else 'use'} it: point {CACHE_ENV} to a folder, or unset it"
    )


# ----------------------------------------------------------------------------- output folders
def _probe_writable(folder: Path, key: str) -> None:
    """Write and delete a 4 KiB file in ``folder``; a full or read-only disk -> ConfigError."""
    try:
        fd, name = tempfile.mkstemp(prefix=".clipsam-probe-", dir=folder)
        try:
            os.write(fd, b"\0" * 4096)
            os.fsync(fd)
        finally:
            os.close(fd)
            os.unlink(name)
    except OSError as err:
        if err.filename is None:
            err.filename = str(folder)
        message = disk_error_message(err, key=key)
        if message is None:
            raise
        raise ConfigError(message.replace(f"writing {err.filename}", f"writing to {folder}")) from err


def check_output_folder(path: str | os.PathLike[str], key: str) -> None:
    """``path`` is a folder (or can become one) on a writable disk with some space left.

    Raises:
        ConfigError: ``path`` (or a parent) is an existing file; the disk is read-only or full.
    """
    target = Path(os.path.expanduser(os.fspath(path))).absolute()
    probe = target
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    if probe.exists() and not probe.is_dir():
        raise ConfigError(
            f"{key}={os.fspath(path)}: {probe} is an existing file, not a folder; choose a folder path "
            "(nothing was written)"
        )
    _probe_writable(probe, key)


def _output_folders(trainer: Any, model: Any, subcommand: str) -> list[tuple[str, str]]:
    from lightning.pytorch.callbacks import ModelCheckpoint

    folders: list[tuple[str, str]] = []
    if trainer.loggers:
        for i, logger in enumerate(trainer.loggers):
            save_dir = getattr(logger, "save_dir", None)
            if save_dir:
                folders.append((f"trainer.logger[{i}] save_dir", save_dir))
    else:
        folders.append(("trainer.default_root_dir", trainer.default_root_dir))
    for callback in trainer.callbacks:
        if isinstance(callback, ModelCheckpoint) and callback.dirpath and subcommand == "fit":
            folders.append(("ModelCheckpoint dirpath", callback.dirpath))
    eval_config = getattr(model, "eval_config", None)
    if subcommand == "predict" and eval_config is not None:
        folders.append(("model.evaluation.predict_dir", eval_config.predict_dir))
    return folders


def check_output_folders(trainer: Any, model: Any, subcommand: str, *, predict_input: str | None = None) -> None:
    """Every folder this subcommand writes to is usable (see :func:`check_output_folder`).

    For predict, the output root may lie inside the input folder (it is skipped as input), but
    must not be the input folder or contain it: the next predict would find no images.
    """
    for key, folder in _output_folders(trainer, model, subcommand):
        check_output_folder(folder, key)
    eval_config = getattr(model, "eval_config", None)
    if subcommand == "predict" and predict_input and eval_config is not None:
        out = Path(os.path.expanduser(eval_config.predict_dir)).resolve()
        inp = Path(os.path.expanduser(predict_input)).resolve()
        if inp == out or out in inp.parents:
            raise ConfigError(
                f"model.evaluation.predict_dir={eval_config.predict_dir} is (or contains) the input folder "
                f"data.predict_dir={predict_input}: choose an output folder outside it, or a sub-folder of it"
            )


# ----------------------------------------------------------------------------- checkpoints
_FILE_SHA256: dict[tuple[str, int, int], str] = {}


def file_sha256(path: str | os.PathLike[str]) -> str:
    """sha256 of a file, memoised per process by (resolved path, size, mtime)."""
    file = Path(path)
    stat = file.stat()
    memo_key = (str(file.resolve()), stat.st_size, stat.st_mtime_ns)
    if memo_key not in _FILE_SHA256:
        digest = hashlib.sha256()
        with file.open("rb") as handle:
            for block in iter(lambda: handle.read(1 << 22), b""):
                digest.update(block)
        _FILE_SHA256[memo_key] = digest.hexdigest()
    return _FILE_SHA256[memo_key]


@dataclasses.dataclass
class CheckpointChoice:
    """The checkpoint a run starts from, as recorded in test_results.json and the W&B config.

    Attributes:
        path: absolute path of the file (None: no checkpoint); a remote URL or Lightning keyword
            (``hpc``) is kept as given.
        sha256: of the file (None when there is no local file).
        untrained: True when test/validate/predict runs with untrained adapters on purpose
            (``--allow_untrained=true``).
    """

    path: str | None
    sha256: str | None = None
    untrained: bool = False
    wandb: dict[str, Any] | None = None
    """The fit's W&B run kept in the checkpoint (``clipsam_wandb``: id, project, name, group)."""
    resumable: bool = False
    """The checkpoint holds the optimiser and loop state (``fit --ckpt_path`` resumes from it)."""

    def record(self) -> dict[str, Any]:
        return {"path": self.path, "sha256": self.sha256, "untrained_adapters": self.untrained}


def _keyword(value: str, subcommand: str, trainer: Any) -> str | None:
    """Resolve ``last``/``best`` for a fresh process: only a fixed ModelCheckpoint dirpath can."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    if value == "last":
        for callback in trainer.callbacks:
            if isinstance(callback, ModelCheckpoint) and callback.dirpath:
                candidates = sorted(Path(callback.dirpath).glob("last*.ckpt"), key=lambda p: p.stat().st_mtime)
                if candidates:
                    return str(candidates[-1])
    example = "runs/<name>/version_N/checkpoints/last.ckpt"
    raise ConfigError(
        f"--ckpt_path {value}: there is no '{value}' checkpoint to resolve in this new `clipsam {subcommand}` "
        f"run (each run gets a fresh run directory); pass the file written by `clipsam fit`, e.g. "
        f"--ckpt_path {example}"
    )


def resolve_ckpt_path(
    value: str | None, *, subcommand: str, allow_untrained: bool, trainer: Any, model: Any
) -> CheckpointChoice:
    """Check ``--ckpt_path`` completely before the run starts.

    - test/validate/predict without a checkpoint are refused (random adapters give numbers that
      look normal and mean nothing) unless ``--allow_untrained=true``, or the model says it has
      nothing to train (``model.needs_checkpoint`` False: training-free methods);
    - ``best``/``last`` must resolve to a file;
    - the file must exist, be a non-empty file, load weights-only, and fit the configured model
      (:meth:`clipsam.module.ClipSamModule.check_checkpoint`).

    Raises:
        ConfigError, WeightsError: one line naming the path and the fix.
    """
    if value is None or str(value).strip() == "":
        needs = getattr(model, "needs_checkpoint", True)
        if subcommand in EVAL_SUBCOMMANDS and bool(needs() if callable(needs) else needs):
            if not allow_untrained:
                raise ConfigError(
                    f"`clipsam {subcommand}` needs --ckpt_path: without it the CLIP adapters are randomly "
                    "initialised and the results mean nothing. Pass the checkpoint written by `clipsam fit` "
                    "(--ckpt_path runs/<name>/version_N/checkpoints/last.ckpt), or --allow_untrained=true "
                    "to run untrained adapters on purpose"
                )
            return CheckpointChoice(None, untrained=True)
        return CheckpointChoice(None)
    text = str(value)
    if text in ("best", "last"):
        text = _keyword(text, subcommand, trainer) or text
    elif text in ("hpc", "registry") or "://" in text:
        return CheckpointChoice(text)
    if text.startswith("~") and os.path.expanduser(text).startswith("~"):
        raise ConfigError(f"--ckpt_path {text} starts with '~' but HOME is not set: give an absolute path")
    path = Path(os.path.expanduser(text)).absolute()
    if not path.exists():
        raise WeightsError(f"checkpoint file {path} does not exist (--ckpt_path): check the path")
    if path.is_dir():
        inside = sorted(path.rglob("*.ckpt"))[:3]
        hint = f", e.g. {inside[0]}" if inside else ""
        raise WeightsError(f"--ckpt_path {path} is a folder: pass the .ckpt file{hint}")
    if path.stat().st_size == 0:
        raise WeightsError(
            f"checkpoint file {path} is empty (0 bytes; an interrupted copy?): pass a complete checkpoint "
            "written by `clipsam fit`"
        )
    checkpoint = safe_torch_load(path, what="checkpoint")
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        raise WeightsError(
            f"{path} is not a Lightning checkpoint (no 'state_dict'): pass a checkpoint written by `clipsam fit`"
        )
    check = getattr(model, "check_checkpoint", None)
    if check is not None:
        check(checkpoint, path=path)
    if subcommand == "fit" and "optimizer_states" not in checkpoint:
        raise WeightsError(
            f"{path} holds weights only (no optimiser or loop state), so `clipsam fit` cannot resume from it: "
            "pass the run's last.ckpt"
        )
    link = checkpoint.get("clipsam_wandb")
    return CheckpointChoice(
        str(path),
        sha256=file_sha256(path),
        wandb=dict(link) if isinstance(link, dict) else None,
        resumable="optimizer_states" in checkpoint,
    )


def check_sam_weights(model: Any, subcommand: str) -> None:
    """test/validate/predict with SAM: its checkpoint file is found (or downloaded) now.

    Raises:
        WeightsError: the file is missing and cannot be downloaded (the message names the key).
    """
    if subcommand not in EVAL_SUBCOMMANDS or getattr(model, "refiner_name", "none") == "none":
        return
    sam_config = getattr(getattr(model, "refiner_config", None), "sam", None)  # ppg_cps and mmr run a SAM
    if sam_config is not None and sam_config.variant != "tiny":
        from clipsam.models.sam import resolve_checkpoint

        check_cache_variable(sam_default=not sam_config.checkpoint and not sam_config.cache_dir)

        resolve_checkpoint(sam_config)


# ----------------------------------------------------------------------------- run directory
def _is_launched_rank() -> bool:
    """True in a DDP rank that Lightning's launcher started (not the rank-0 process itself)."""
    return os.environ.get("LOCAL_RANK", "0") != "0" or os.environ.get("NODE_RANK", "0") != "0"


def _hand_to_logger(logger: Any, run_dir: Path, *, primary: bool) -> None:
    from lightning.pytorch.loggers import WandbLogger

    if isinstance(logger, WandbLogger):
        # W&B keeps its own folder (offline-run-<time>-<id>, never shared) unless it is the only
        # logger; the run directory is recorded in its config (VersionedSaveConfigCallback).
        if primary:
            logger._save_dir = str(run_dir)
            logger._wandb_init["dir"] = str(run_dir)
        return
    if not hasattr(logger, "_version"):
        return
    if primary:
        logger._version = run_dir.name  # root_dir / "version_N" == run_dir
        return
    # Secondary CSV/TensorBoard loggers write into the same run directory.
    for attr in ("_save_dir", "_root_dir"):
        if hasattr(logger, attr):
            setattr(logger, attr, str(run_dir.parent))
    logger._name = ""
    logger._version = run_dir.name


def reserve_run_dir(trainer: Any, *, subcommand: str, checkpoint: dict[str, Any] | None = None) -> Path:
    """Reserve this run's ``version_N`` atomically and hand it to loggers and checkpoint callbacks.

    The folder is ``<first CSV/TensorBoard logger's root>/version_N`` (or
    ``trainer.default_root_dir/version_N`` with W&B alone), created with ``mkdir`` without
    ``exist_ok`` (:func:`clipsam.io.next_version_dir`), so two runs started at the same moment get
    two folders. Every logger and every ``ModelCheckpoint`` without its own ``dirpath`` writes
    there. A logger whose ``version`` the user set keeps it. Without loggers
    (``trainer.logger=false``) the folder is ``trainer.default_root_dir/version_N`` and becomes
    the trainer's root directory (so ``trainer.log_dir`` is the run directory).

    DDP: rank 0 reserves and passes the folder to the ranks it launches (:data:`RUN_DIR_ENV`).
    """
    from lightning.pytorch.callbacks import ModelCheckpoint
    from lightning.pytorch.loggers import WandbLogger

    loggers = list(trainer.loggers)
    versioned = [lg for lg in loggers if hasattr(lg, "_version") and not isinstance(lg, WandbLogger)]
    primary = versioned[0] if versioned else (loggers[0] if loggers else None)
    inherited = os.environ.get(RUN_DIR_ENV)
    if _is_launched_rank() and inherited:
        run_dir = Path(inherited)
    elif versioned and primary._version is not None:
        run_dir = Path(primary.log_dir)  # a version the user chose: theirs to reuse
        run_dir.mkdir(parents=True, exist_ok=True)
    else:
        root = Path(primary.root_dir) if versioned else Path(trainer.default_root_dir)
        run_dir = next_version_dir(root).absolute()
    if not _is_launched_rank():
        os.environ[RUN_DIR_ENV] = str(run_dir)
        started = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
        (run_dir / INCOMPLETE_MARKER).write_text(
            f"clipsam {subcommand} started {started} (pid {os.getpid()}) and has not ended normally yet\n"
            f"command: {' '.join(sys.argv)}\n"
        )
    for logger in loggers:
        _hand_to_logger(logger, run_dir, primary=logger is primary)
    if not loggers:
        # trainer.logger=false: the run directory becomes the trainer's root, so reports,
        # checkpoints and the config copy of this run still land in their own folder.
        trainer._default_root_dir = str(run_dir)
    for callback in trainer.callbacks:
        if isinstance(callback, ModelCheckpoint) and callback.dirpath is None:
            callback.dirpath = str(run_dir / "checkpoints")
    return run_dir


def mark_run(run_dir: Path | None, status: str | None) -> None:
    """End of a run: remove the INCOMPLETE marker (``status`` None) or write why it stopped."""
    if run_dir is None or _is_launched_rank():
        return
    marker = run_dir / INCOMPLETE_MARKER
    try:
        if status is None:
            marker.unlink(missing_ok=True)
        else:
            ended = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
            marker.write_text(f"{status}\nended {ended}\n")
    except OSError:
        pass  # a full or read-only disk: the marker written at the start stays
