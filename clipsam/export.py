"""``clipsam export``: a self-contained bundle for :class:`clipsam.Segmenter`, and ONNX graphs.

Bundle (``--format bundle``), one folder::

    bundle.json      format marker, default category, sha256 of weights.pt, what each file is
    config.yaml      the resolved model config (+ data.image_size) the weights were loaded into
    weights.pt       the trainable weights only (CLIP adapters) with their checkpoint metadata
                     (``torch.load(weights_only=True)``-safe, no optimizer state)
    thresholds.json  the decision thresholds (when given or set in the config)
    versions.json    clipsam, torch, open_clip, segment-anything, Python versions at export

The frozen CLIP and SAM weights are not copied (1-2.5 GB): they load from the same caches or
files as for ``clipsam test`` (``model.clip.pretrained``/``cache_dir``, ``model.sam.checkpoint``/
``cache_dir``); random tiny presets need nothing.

ONNX (``--format onnx``): the whole method, graphs + ``bundle.json``, for
:mod:`clipsam.runtime` (onnxruntime + numpy + Pillow, no torch) and ``clipsam serve``; see
:mod:`clipsam.onnx_export` for the files.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from clipsam.errors import ConfigError
from clipsam.loading import (
    BUNDLE_FORMAT,
    BUNDLE_VERSION,
    apply_overrides,
    build_module,
    load_checkpoint,
    load_config,
    quiet,
    read_bundle,
    sha256,
)

__all__ = ["export_bundle", "export_main", "export_onnx", "read_bundle"]



def _versions() -> dict[str, str]:
    from importlib import metadata

    import clipsam

    out = {"clipsam": clipsam.__version__, "python": platform.python_version()}
    for dist in ("torch", "open_clip_torch", "segment-anything", "lightning"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:  # pragma: no cover
            out[dist] = "not installed"
    return out


def _checkpoint_for(module: Any, ckpt_path: str | os.PathLike[str] | None) -> dict[str, Any] | None:
    """The checkpoint a trained method needs (None for a training-free one, which takes none)."""
    if ckpt_path is None:
        if module.needs_checkpoint:
            raise ConfigError(
                f"model.method={module.method} is trained: pass --ckpt_path (a checkpoint written by `clipsam fit`)"
            )
        return None
    if not module.needs_checkpoint:
        raise ConfigError(
            f"model.method={module.method} is training-free: it has no trained weights, drop --ckpt_path"
        )
    return load_checkpoint(Path(os.fspath(ckpt_path)))


def _fresh_output(output: str | os.PathLike[str]) -> Path:
    """The output folder, created; refuse a non-empty one (nothing a user has is overwritten)."""
    out = Path(os.path.expanduser(os.fspath(output)))
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConfigError(f"--output {out} exists and is not an empty folder: choose a new folder")
    out.mkdir(parents=True, exist_ok=True)
    return out


def camera_settings(resolved: dict[str, Any]) -> dict[str, Any]:
    """``data.color_order`` and ``data.bit_depth`` of a resolved config (checked; defaults
    ``"rgb"`` and None): what a bundle carries so that arrays from the same camera read alike."""
    from clipsam.data.samples import check_bit_depth, check_color_order

    data = resolved.get("data") or {}
    if "init_args" in data:  # `data: {class_path: ..., init_args: {...}}` form
        data = data.get("init_args") or {}
    return {
        "color_order": check_color_order(data.get("color_order") or "rgb"),
        "bit_depth": check_bit_depth(data.get("bit_depth")),
    }


def _resolved(config: Any, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    return apply_overrides(load_config(config), overrides)


def export_bundle(
    ckpt_path: str | os.PathLike[str] | None,
    config: Any,
    output: str | os.PathLike[str],
    *,
    thresholds: str | os.PathLike[str] | None = None,
    category: str | None = None,
    overrides: dict[str, Any] | None = None,
) -> Path:
    """Write a bundle folder (module doc).

    The checkpoint is checked against the config (backbone, layers) as ``clipsam test`` does;
    the frozen models are not built here. A training-free method (WinCLIP, SDP, SAA) needs no
    checkpoint: its bundle holds the config (method and settings) and no weights file.

    Args:
        ckpt_path: a ``clipsam fit`` checkpoint; None for a training-free method.
        config: its YAML config(s) or a resolved mapping.
        output: a new (or empty) folder.
        thresholds: a ``thresholds.json`` (default: ``model.evaluation.thresholds`` of the config).
        category: default category of the bundle's Segmenter (object name, thresholds).
        overrides: dotted config keys.

    Returns:
        the bundle folder.

    Raises:
        WeightsError / ConfigError: the checkpoint does not fit the config, bad thresholds, a
            non-empty output folder. Nothing is left behind on error.
    """
    from clipsam.thresholds import THRESHOLDS_FILE, check_compatible, load_thresholds, save_thresholds

    resolved = _resolved(config, overrides)
    model = resolved.setdefault("model", {})
    evaluation = model.setdefault("evaluation", {})
    if thresholds is not None:
        evaluation["thresholds"] = os.fspath(thresholds)
    with quiet():
        module = build_module(resolved)
    checkpoint = _checkpoint_for(module, ckpt_path)
    if checkpoint is not None:
        # Validate the checkpoint against the config without building the frozen models (on a
        # copy: loading renames the keys to the module's).
        module.on_load_checkpoint({**checkpoint, "state_dict": dict(checkpoint["state_dict"])})
    thresholds_data = None
    if evaluation.get("thresholds"):
        thresholds_data = load_thresholds(evaluation["thresholds"])
        check_compatible(thresholds_data, module.score_settings(), source=str(evaluation["thresholds"]))
    out = _fresh_output(output)
    try:
        weights = out / "weights.pt"
        if checkpoint is not None:
            # `clipsam fit` checkpoints already hold the trainable weights only (the module's
            # on_save_checkpoint drops the frozen parts): keep exactly those, without optimizer state.
            torch.save({"state_dict": dict(checkpoint["state_dict"]), "clipsam": checkpoint.get("clipsam", {})}, weights)
        if thresholds_data is not None:
            save_thresholds(out / THRESHOLDS_FILE, thresholds_data)
            evaluation["thresholds"] = THRESHOLDS_FILE  # relative to the bundle
        else:
            evaluation["thresholds"] = None
        # Every key with its value (defaults included), so a later clipsam with other defaults
        # rebuilds the same model.
        full = dict(module.hparams)
        full.pop("image_size", None)
        tiling = full.pop("tiling", None)
        full["evaluation"] = {**full["evaluation"], "thresholds": evaluation["thresholds"]}
        sam = (full.get("refiner_config") or {}).get("sam")
        if isinstance(sam, dict):  # in-memory use writes no embedding cache
            full["refiner_config"] = {**full["refiner_config"], "sam": {**sam, "embedding_cache_dir": None}}
        bundle_config = {"model": full, "data": {"image_size": module.image_size, "tiling": tiling, **camera_settings(resolved)}}
        import yaml

        (out / "config.yaml").write_text(yaml.safe_dump(bundle_config, sort_keys=False))
        (out / "versions.json").write_text(json.dumps(_versions(), indent=2))
        manifest = {
            "format": BUNDLE_FORMAT,
            "version": BUNDLE_VERSION,
            "category": category,
            "method": module.method,
            "refiner": module.refiner_name,
            "weights_sha256": sha256(weights) if checkpoint is not None else None,
            "source_checkpoint": os.path.abspath(os.fspath(ckpt_path)) if ckpt_path is not None else None,
            "files": {
                "config.yaml": "resolved model config",
                "weights.pt": "trainable weights of the method" if checkpoint is not None else None,
                "thresholds.json": "decision thresholds" if thresholds_data is not None else None,
                "versions.json": "library versions at export",
            },
        }
        (out / "bundle.json").write_text(json.dumps(manifest, indent=2))
    except BaseException:
        shutil.rmtree(out, ignore_errors=True)
        raise
    return out


# ---------------------------------------------------------------------------------- ONNX
def _export_categories(resolved: dict[str, Any], categories: Sequence[str] | None) -> list[str]:
    """The categories whose text goes into the bundle: the given ones, else the config's test
    categories and its predict category."""
    if categories:
        return list(dict.fromkeys(str(c) for c in categories))
    data = resolved.get("data") or {}
    found = list((data.get("test") or {}).get("categories") or [])
    if data.get("predict_category"):
        found.append(data["predict_category"])
    found = list(dict.fromkeys(str(c) for c in found))
    if not found:
        raise ConfigError(
            "--format onnx needs the categories whose text prompts the bundle carries: pass --category NAME "
            "(repeatable), or set data.test.categories in the config"
        )
    return found


def export_onnx(
    ckpt_path: str | os.PathLike[str] | None,
    config: Any,
    output: str | os.PathLike[str],
    *,
    category: str | None = None,
    categories: Sequence[str] | None = None,
    thresholds: str | os.PathLike[str] | None = None,
    batch_size: int | None = None,
    opset: int = 17,
    overrides: dict[str, Any] | None = None,
    seed: int = 0,
) -> dict[str, Any]:
    """Export the whole method as ONNX graphs + ``bundle.json`` for :mod:`clipsam.runtime`.

    See :mod:`clipsam.onnx_export` for the files. Every graph is checked with onnxruntime
    against PyTorch on seeded random inputs (two batch sizes; the decoder also against
    segment_anything's own prompt encoder + mask decoder); the figures are in ``bundle.json``
    under ``check``.

    Args:
        ckpt_path: a ``clipsam fit`` checkpoint; None for a training-free method.
        config: YAML config(s) or a resolved mapping.
        output: a new (or empty) folder.
        category / categories: the categories whose text features the bundle carries (default:
            the config's test categories and ``data.predict_category``).
        thresholds: a ``thresholds.json`` (default: ``model.evaluation.thresholds``).
        batch_size: ignored (the graphs have a dynamic batch axis); kept for old scripts.
        opset: ONNX opset.
        overrides: dotted config keys.
        seed: seed of the check inputs.

    Returns:
        the ``bundle.json`` content.

    Raises:
        ConfigError: a part that has no ONNX form (named), a non-empty output folder, missing
            onnx/onnxruntime. Nothing is left behind on error.
    """
    from clipsam.onnx_export import export_method_onnx, onnx_modules, refuse_unexportable
    from clipsam.thresholds import check_compatible, load_thresholds

    onnx_modules()
    resolved = _resolved(config, overrides)
    evaluation = resolved.setdefault("model", {}).setdefault("evaluation", {})
    if thresholds is not None:
        evaluation["thresholds"] = os.fspath(thresholds)
    wanted = _export_categories(resolved, [*([category] if category else []), *(categories or [])])
    with quiet():
        module = build_module(resolved)
    refuse_unexportable(module)
    with quiet():
        # ONNX graphs run in float32 (onnxruntime's CPU kernels); the check compares float32 to float32.
        if hasattr(module.method_config, "frozen_dtype"):
            module.method_config.frozen_dtype = "float32"
        sam_config = getattr(module.refiner_config, "sam", None)
        if sam_config is not None:
            sam_config.dtype = "float32"
            sam_config.embedding_cache_dir = None
        checkpoint = _checkpoint_for(module, ckpt_path)
        module.build_inference_models()
        if checkpoint is not None:
            module.on_load_checkpoint(checkpoint)
    module.eval()
    thresholds_data = None
    if evaluation.get("thresholds"):
        thresholds_data = load_thresholds(evaluation["thresholds"])
        check_compatible(thresholds_data, module.score_settings(), source=str(evaluation["thresholds"]))
    out = _fresh_output(output)
    try:
        import onnx

        versions = {**_versions(), "onnx": onnx.__version__}
        source = {
            "checkpoint": os.path.abspath(os.fspath(ckpt_path)) if ckpt_path is not None else None,
            "overrides": overrides or {},
        }
        with quiet():
            return export_method_onnx(
                module, out, categories=wanted, thresholds=thresholds_data, opset=opset, seed=seed, versions=versions, source=source,
                camera=camera_settings(resolved),
            )
    except BaseException:
        shutil.rmtree(out, ignore_errors=True)
        raise


# ---------------------------------------------------------------------------------- CLI
def _parse_overrides(pairs: Sequence[str]) -> dict[str, Any]:
    import yaml

    out: dict[str, Any] = {}
    for pair in pairs:
        if "=" not in pair:
            raise ConfigError(f"--set {pair!r}: use KEY=VALUE, e.g. --set model.evaluation.mask_source=score")
        key, value = pair.split("=", 1)
        out[key.strip()] = yaml.safe_load(value)
    return out


def export_main(argv: Sequence[str]) -> int:
    """``clipsam export [--ckpt_path CKPT] --config CFG --format {bundle,onnx} --output DIR``."""
    parser = argparse.ArgumentParser(
        prog="clipsam export",
        description="Export a trained model: a bundle folder for clipsam.Segmenter, or the whole method as "
        "ONNX graphs + bundle.json for clipsam.runtime and `clipsam serve` (checked with onnxruntime).",
    )
    parser.add_argument("--ckpt_path", default=None, help="checkpoint written by `clipsam fit` (trained methods; none for WinCLIP, SDP, SAA)")
    parser.add_argument("--config", required=True, action="append", help="the YAML config (repeatable, merged left to right)")
    parser.add_argument("--format", choices=("bundle", "onnx"), default="bundle", help="what to write (default: bundle)")
    parser.add_argument("--output", required=True, help="a new or empty folder")
    parser.add_argument("--thresholds", default=None, help="bundle: thresholds.json from `clipsam test` (default: model.evaluation.thresholds)")
    parser.add_argument("--category", action="append", default=None, help="bundle: the default category; ONNX: a category whose text the bundle carries (repeatable; default: the config's test categories)")
    parser.add_argument("--batch_size", type=int, default=None, help=argparse.SUPPRESS)  # the ONNX graphs have a dynamic batch
    parser.add_argument("--opset", type=int, default=17, help="ONNX opset (default 17)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key, e.g. model.evaluation.mask_source=score")
    args = parser.parse_args(list(argv))
    overrides = _parse_overrides(args.set)
    if args.format == "bundle":
        if args.category and len(args.category) > 1:
            raise ConfigError(f"--format bundle takes one --category (the default category), got {args.category}")
        category = args.category[0] if args.category else None
        out = export_bundle(args.ckpt_path, args.config, args.output, thresholds=args.thresholds, category=category, overrides=overrides)
        print(f"clipsam: wrote bundle {out} (load it with clipsam.Segmenter.from_bundle({str(out)!r}))")
        return 0
    manifest = export_onnx(args.ckpt_path, args.config, args.output, categories=args.category, thresholds=args.thresholds, opset=args.opset, overrides=overrides)
    for name, diff in manifest["check"]["max_abs_diff"].items():
        print(f"clipsam: checked {name:<32} max |onnxruntime - pytorch| = {diff:.3g}")
    print(
        f"clipsam: wrote ONNX bundle {args.output} ({manifest['method']}+{manifest['refiner']}, "
        f"categories: {', '.join(manifest['categories'])}); run it with clipsam.runtime.Runtime.from_bundle({str(args.output)!r}) "
        f"or `clipsam serve --bundle {args.output}`"
    )
    return 0

if __name__ == "__main__":  # pragma: no cover
    sys.exit(export_main(sys.argv[1:]))
