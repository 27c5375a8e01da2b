"""Stacking config files the one way: `clipsam fit/test --config A --config B` and ``Segmenter.from_config``.

Rules (:func:`merge_configs`), applied left to right:

- mappings merge key by key, at every depth: ``model.refiner_config: {cascade: {num_steps: 1}}``
  in an ablation file changes that one setting and keeps the base file's ``sam`` and ``prompt``;
- lists and plain values replace;
- ``model.method_config`` belongs to ``model.method``: a later layer that switches the method
  drops the earlier method's settings (they mean nothing to another method); the same for
  ``model.refiner`` and ``model.refiner_config``, except its ``sam`` (which SAM to run), which the
  SAM refiners (``ppg_cps``, ``mmr``) share.

Deprecated sections (``model.clip``, ``model.focal_gamma``, ``model.sam``, ``model.prompt``,
``model.cascade``, in files or as ``--model.sam.<key>`` options) merge like the others and are
folded into the new shape at the end (:func:`fold_legacy`), with a one-line note: ``clip`` and
``focal_gamma`` into APRIL-GAN's ``method_config``, ``sam`` into the SAM refiners'
``refiner_config`` and ``prompt`` / ``cascade`` into ``ppg_cps``'s; for a method or refiner
without such settings they are dropped, with a note.

On the command line, ``--model.method_config.<key>=<value>`` and
``--model.refiner_config.<key>=<value>`` (any depth) are merged the same way, their values read
as YAML (``--model.refiner_config.cascade.num_steps=1`` is the integer 1).
"""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from clipsam.errors import ConfigError

__all__ = ["fill_settings", "fold_legacy", "load_config_files", "merge_configs", "set_dotted", "stack_cli_args"]

#: deprecated model keys -> (the settings they now live in, the key there; None: the whole mapping)
LEGACY_KEYS = {
    "clip": ("method_config", None),
    "focal_gamma": ("method_config", "focal_gamma"),
    "sam": ("refiner_config", "sam"),
    "prompt": ("refiner_config", "prompt"),
    "cascade": ("refiner_config", "cascade"),
}

#: model keys whose value belongs to another key: (owner, settings).
OWNED = (("method", "method_config"), ("refiner", "refiner_config"))
SUBCOMMANDS = ("fit", "validate", "test", "predict")
_DEFAULTS = {"method": "april_gan", "refiner": "ppg_cps"}  # clipsam.methods / clipsam.refiners defaults


def _model(config: Mapping[str, Any]) -> Mapping[str, Any]:
    model = config.get("model") if isinstance(config, Mapping) else None
    if isinstance(model, Mapping) and "init_args" in model:
        model = model.get("init_args")
    return model if isinstance(model, Mapping) else {}


def _deep_merge(base: Any, layer: Any) -> Any:
    if isinstance(base, Mapping) and isinstance(layer, Mapping):
        out = dict(base)
        for key, value in layer.items():
            out[key] = _deep_merge(base[key], value) if key in base else value
        return out
    return layer


def merge_configs(layers: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Merge config mappings left to right (see the module doc for the rules)."""
    merged: dict[str, Any] = {}
    for layer in layers:
        layer = dict(layer or {})
        base_model, new_model = _model(merged), _model(layer)
        if base_model and new_model:
            pruned = dict(base_model)
            for owner, settings in OWNED:
                if owner in new_model and new_model[owner] != base_model.get(owner, _DEFAULTS[owner]):
                    old = pruned.pop(settings, None)  # another method's / refiner's settings
                    if owner == "refiner" and isinstance(old, Mapping) and "sam" in old:
                        pruned[settings] = {"sam": old["sam"]}  # which SAM is shared by the SAM refiners
            merged = {**merged, "model": pruned}
        merged = _deep_merge(merged, layer)
    return fold_legacy(merged)


def _takes(owner: str, name: str, key: str | None) -> bool:
    """Whether method/refiner ``name`` has the deprecated section ``key`` among its settings."""
    from clipsam import refiners
    from clipsam.model_config import LEGACY_CLIP_METHOD

    if owner == "method_config":
        return name == LEGACY_CLIP_METHOD
    if name not in refiners.REFINERS or name == "none":
        return False
    return key == "sam" and refiners.REFINERS[name].uses_sam or (key in ("prompt", "cascade") and name == "ppg_cps")


def fold_legacy(config: dict[str, Any]) -> dict[str, Any]:
    """Move the deprecated model sections into ``method_config`` / ``refiner_config`` (module doc)."""
    from clipsam.model_config import deprecation_note

    model = config.get("model") if isinstance(config, Mapping) else None
    if not isinstance(model, Mapping) or "init_args" in model or not any(k in model for k in LEGACY_KEYS):
        return config
    model = dict(model)
    names = {"method_config": model.get("method", _DEFAULTS["method"]), "refiner_config": model.get("refiner", _DEFAULTS["refiner"])}
    if model.get("refiner") is None and (model.get("evaluation") or {}).get("use_sam") is False:
        names["refiner_config"] = "none"
    for old, (settings, key) in LEGACY_KEYS.items():
        if old not in model:
            continue
        value = model.pop(old)
        if value is None:
            continue
        name = names[settings]
        if not _takes(settings, name, key if key != "focal_gamma" else None):
            deprecation_note(f"model.{old} ignored: model.{settings.split('_')[0]}={name} has no such settings")
            continue
        layer = value if key is None else {key: value}
        if key is None and not isinstance(value, Mapping):
            raise ConfigError(f"model.{old} must be a mapping of settings, got {value!r}")
        model[settings] = _deep_merge(model.get(settings) or {}, layer)
        deprecation_note(f"model.{old} is deprecated: write it as model.{settings}{'.' + key if key else ''}")
    return {**config, "model": model}


def _has_interpolation(value: Any) -> bool:
    if isinstance(value, Mapping):
        return any(_has_interpolation(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return any(_has_interpolation(v) for v in value)
    return isinstance(value, str) and "${" in value


def fill_settings(config: dict[str, Any]) -> dict[str, Any]:
    """Write every setting of the configured method and refiner, defaults included, validated.

    So ``--print_config`` and a run's ``config.yaml`` list the full settings, and a wrong key fails
    here, before Lightning starts. Settings holding an unresolved ``${...}`` are validated later,
    when the module is built.

    Raises:
        ConfigError: an unknown method/refiner or setting, named as ``model.method_config.<key>``.
    """
    from clipsam import methods, refiners
    from clipsam.settings import to_plain

    model = config.get("model") if isinstance(config, Mapping) else None
    if not isinstance(model, Mapping) or "init_args" in model:
        return config
    model = dict(model)
    method = model.get("method") or _DEFAULTS["method"]
    if not _has_interpolation(model.get("method_config")):
        model["method_config"] = to_plain(methods.method_config(method, model.get("method_config")))
    refiner = model.get("refiner")
    if refiner is None:
        use_sam = (model.get("evaluation") or {}).get("use_sam", True)
        refiner = _DEFAULTS["refiner"] if use_sam is not False else "none"
    if refiner == "none" or refiners.get_refiner(refiner).module == "":
        model.pop("refiner_config", None)
    elif not _has_interpolation(model.get("refiner_config")):
        model["refiner_config"] = to_plain(refiners.refiner_config(refiner, model.get("refiner_config")))
    return {**config, "model": model}


def load_config_files(files: Sequence[str | os.PathLike[str]]) -> dict[str, Any]:
    """Read YAML configs and merge them (interpolations such as ``${oc.env:...}`` kept unresolved).

    Raises:
        ConfigError: a missing or unreadable file, named.
    """
    from omegaconf import OmegaConf

    layers = []
    for file in files:
        path = Path(os.path.expanduser(os.fspath(file)))
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist: pass the YAML used with `clipsam fit/test`")
        try:
            loaded = OmegaConf.to_container(OmegaConf.load(path), resolve=False)
        except Exception as err:  # omegaconf/yaml parse errors
            raise ConfigError(f"cannot read config file {path}: {err}") from err
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, Mapping):
            raise ConfigError(f"config file {path} must hold a mapping of sections (trainer, model, data), got {type(loaded).__name__}")
        layers.append(loaded)
    return merge_configs(layers)


def _split_option(args: list[str], i: int) -> tuple[str, str | None, int]:
    """(name, value or None, next index) of the option at ``args[i]`` (``--k=v`` or ``--k v``)."""
    arg = args[i]
    if "=" in arg:
        name, value = arg.split("=", 1)
        return name, value, i + 1
    if i + 1 < len(args) and not args[i + 1].startswith("--"):
        return arg, args[i + 1], i + 2
    return arg, None, i + 1


def set_dotted(config: dict[str, Any], dotted: str, value: Any) -> None:
    """``config[a][b][c] = value`` for ``dotted="a.b.c"`` (missing or non-mapping levels become mappings)."""
    node = config
    parts = dotted.split(".")
    for part in parts[:-1]:
        child = node.get(part)
        if not isinstance(child, dict):
            child = node[part] = {}
        node = child
    node[parts[-1]] = value


def stack_cli_args(args: Sequence[str]) -> list[str]:
    """Rewrite ``clipsam SUBCOMMAND`` arguments so stacked configs follow :func:`merge_configs`.

    Every ``--config FILE`` and every ``--model.method_config.*`` / ``--model.refiner_config.*``
    option is merged (in order) into one temporary YAML file passed as a single ``--config``;
    the other arguments are kept as given. Arguments without any of these come back unchanged.
    """
    import yaml

    args = list(args)
    if not args or (args[0] not in SUBCOMMANDS and not args[0].startswith("--")):
        return args  # another command (data, compare, ...), or --help of the whole CLI
    start = 1 if args[0] in SUBCOMMANDS else 0  # without a subcommand: ClipSamCLI(run=False)
    layers: list[dict[str, Any]] = []
    rest: list[str] = args[:start]
    touched = False
    i = start
    while i < len(args):
        arg = args[i]
        if arg == "--config" or arg.startswith("--config="):
            name, value, i = _split_option(args, i)
            if value is None:
                raise ConfigError("--config needs a YAML file: --config configs/demo.yaml")
            layers.append(load_config_files([value]))
            touched = True
            continue
        owned = ("--model.method", "--model.refiner", "--model.method_config", "--model.refiner_config", "--model.focal_gamma")
        legacy = tuple(f"--model.{k}" for k in LEGACY_KEYS)
        if arg.startswith(("--model.method_config.", "--model.refiner_config.", *(f"{k}." for k in legacy))) or arg.split("=", 1)[0] in owned + legacy:
            name, value, i = _split_option(args, i)
            if value is None:
                raise ConfigError(f"{name} needs a value: {name}=<value>")
            layer: dict[str, Any] = {}
            set_dotted(layer, name[2:], yaml.safe_load(value) if value != "" else None)
            layers.append(layer)
            touched = True
            continue
        rest.append(arg)
        i += 1
    if not touched:
        return args
    merged = fill_settings(merge_configs(layers))
    folder = Path(tempfile.mkdtemp(prefix="clipsam-config-"))
    atexit.register(shutil.rmtree, folder, True)
    path = folder / "stacked.yaml"
    path.write_text(yaml.safe_dump(merged, sort_keys=False))
    return [*rest[:start], "--config", str(path), *rest[start:]]
