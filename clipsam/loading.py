"""Reading what a model is made from, for the API and ``clipsam export``: configs, checkpoints, bundles.

Configs stack as ``--config`` stacks them on the command line (:mod:`clipsam.config_stack`);
``${oc.env:VAR,default}`` interpolations resolve as there.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import warnings
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from clipsam.config_stack import set_dotted  # re-exported: the API's and export's dotted overrides
from clipsam.errors import ConfigError, WeightsError

__all__ = [
    "BUNDLE_FORMAT",
    "BUNDLE_VERSION",
    "build_module",
    "load_checkpoint",
    "load_config",
    "quiet",
    "read_bundle",
    "set_dotted",
    "sha256",
]

BUNDLE_FORMAT = "clipsam-bundle"
BUNDLE_VERSION = 1


def load_config(config: str | os.PathLike[str] | Sequence[str | os.PathLike[str]] | Mapping[str, Any]) -> dict[str, Any]:
    """Read one or more clipsam YAML configs, stacked left to right like repeated ``--config``.

    Returns:
        the resolved config as plain dicts.

    Raises:
        ConfigError: a missing or unreadable file.
    """
    from omegaconf import OmegaConf

    from clipsam.config_stack import load_config_files

    if isinstance(config, Mapping):
        merged: Any = dict(config)
    else:
        files = [config] if isinstance(config, (str, os.PathLike)) else list(config)
        merged = load_config_files(files)
    try:
        return OmegaConf.to_container(OmegaConf.create(merged), resolve=True)  # type: ignore[return-value]
    except Exception as err:  # an interpolation that does not resolve
        raise ConfigError(f"cannot resolve the config: {err}") from err


def apply_overrides(config: dict[str, Any], overrides: Mapping[str, Any] | None) -> dict[str, Any]:
    """Dotted overrides stacked on ``config`` (a method or refiner switch drops the old settings)."""
    from clipsam.config_stack import merge_configs

    layers: list[dict[str, Any]] = [config]
    for key, value in (overrides or {}).items():
        layer: dict[str, Any] = {}
        set_dotted(layer, key, value)
        layers.append(layer)
    return merge_configs(layers)


def build_module(config: Mapping[str, Any]) -> Any:
    """A :class:`~clipsam.module.ClipSamModule` from a resolved config (``model`` + ``data.image_size``)."""
    from clipsam.module import ClipSamModule

    model = dict(config.get("model") or {})
    if "class_path" in model:  # `model: {class_path: ..., init_args: {...}}` form
        model = dict(model.get("init_args") or {})
    image_size = (config.get("data") or {}).get("image_size", model.pop("image_size", 518))
    model.pop("image_size", None)
    tiling = (config.get("data") or {}).get("tiling")
    if tiling is not None:
        model["tiling"] = tiling
    try:
        return ClipSamModule(**model, image_size=int(image_size))
    except TypeError as err:
        raise ConfigError(f"the config's model section does not fit ClipSamModule: {err}") from err


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """No warning flood: library warnings and INFO logs are silenced while models build/run."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(max(level, logging.ERROR))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        root.setLevel(level)


def load_checkpoint(path: Path) -> dict[str, Any]:
    """``torch.load(weights_only=True)`` of a checkpoint; one :class:`WeightsError` when it cannot be read."""
    if not path.is_file():
        raise WeightsError(f"checkpoint {path} does not exist: pass a file written by `clipsam fit` (checkpoints/last.ckpt)")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise WeightsError(
            f"cannot load checkpoint {path} ({type(err).__name__}: {str(err).splitlines()[0][:200]}): "
            "pass an intact file written by `clipsam fit`"
        ) from err


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def read_bundle(bundle: str | os.PathLike[str]) -> tuple[dict[str, Any], Path | None, str | None]:
    """Read a bundle folder written by ``clipsam export --format bundle``.

    Returns:
        ``(config, weights_path, category)``: the resolved config (thresholds path made
        absolute), the weights file (None for a training-free method), the default category.

    Raises:
        WeightsError: not a bundle folder; ``bundle.json`` or ``config.yaml`` missing, unreadable
            or of the wrong shape; weights.pt or the thresholds file missing, or weights.pt
            altered since export (each names the file).
    """
    import yaml

    root = Path(os.path.expanduser(os.fspath(bundle)))
    export_hint = "re-export it with `clipsam export --format bundle`"
    if not root.exists():
        raise WeightsError(f"bundle folder {root} does not exist: check the path (a folder written by `clipsam export --format bundle`)")
    if not root.is_dir():
        raise WeightsError(f"bundle {root} is a file, not a folder: pass the folder written by `clipsam export --format bundle`")
    manifest_path = root / "bundle.json"
    if not manifest_path.is_file():
        raise WeightsError(f"{root} is not a clipsam bundle (no bundle.json): write one with `clipsam export --format bundle`")
    try:
        manifest = json.loads(manifest_path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise WeightsError(f"{manifest_path} is not readable JSON ({_first_line(err)}): {export_hint}") from None
    if not isinstance(manifest, dict):
        raise WeightsError(
            f"{manifest_path} holds a JSON {type(manifest).__name__}, not the bundle's description (an object): {export_hint}"
        )
    version = manifest.get("version", 0)
    if manifest.get("format") == "clipsam-onnx-bundle":
        raise WeightsError(
            f"{root} is an ONNX bundle (`clipsam export --format onnx`): run it with "
            f"clipsam.runtime.Runtime.from_bundle({str(root)!r}) or `clipsam serve --bundle {root}`; "
            "clipsam.Segmenter reads `clipsam export --format bundle` folders"
        )
    if manifest.get("format") != BUNDLE_FORMAT or not isinstance(version, int) or isinstance(version, bool) or version > BUNDLE_VERSION:
        raise WeightsError(
            f"{manifest_path}: unsupported bundle format {manifest.get('format')!r} version {version!r} "
            f"(this clipsam reads {BUNDLE_FORMAT!r} up to version {BUNDLE_VERSION}): {export_hint}"
        )
    weights: Path | None = root / "weights.pt"
    if manifest.get("weights_sha256") is None:
        weights = None  # a training-free method: nothing trained to store
    elif not weights.is_file() or sha256(weights) != manifest.get("weights_sha256"):
        raise WeightsError(f"{weights} is missing or differs from the one exported (sha256 mismatch): re-export the bundle")
    config_path = root / "config.yaml"
    if not config_path.is_file():
        raise WeightsError(f"{config_path} is missing: the bundle needs its config; {export_hint}")
    try:
        config = yaml.safe_load(config_path.read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as err:
        raise WeightsError(f"{config_path} is not readable YAML ({_first_line(err)}): {export_hint}") from None
    if not isinstance(config, dict) or not isinstance(config.get("model", {}), dict):
        raise WeightsError(f"{config_path} does not hold a clipsam config (a mapping with a 'model' section): {export_hint}")
    model = config.setdefault("model", {})
    evaluation = model.setdefault("evaluation", {})
    if not isinstance(evaluation, dict):
        raise WeightsError(f"{config_path}: model.evaluation must be a mapping, got {evaluation!r}: {export_hint}")
    if evaluation.get("thresholds"):
        thresholds = root / str(evaluation["thresholds"])
        if not thresholds.is_file():
            raise WeightsError(
                f"{thresholds} is missing: the bundle's config.yaml names it (model.evaluation.thresholds); "
                f"{export_hint}, or set model.evaluation.thresholds to null there for the default thresholds"
            )
        evaluation["thresholds"] = str(thresholds)
    return config, weights, manifest.get("category")


def _first_line(err: BaseException) -> str:
    """An error's message on one line (YAML errors span several: the problem and where)."""
    mark = getattr(err, "problem_mark", None)
    problem = getattr(err, "problem", None)
    if problem and mark is not None:
        return f"{problem} at line {mark.line + 1}, column {mark.column + 1}"
    return " ".join(str(err).split()) or type(err).__name__
