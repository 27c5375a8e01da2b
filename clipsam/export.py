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

ONNX (``--format onnx``), one folder::

    clip_stage.onnx      frame images (B, 3, H, W) CLIP-normalised float32 -> anomaly_map
                         (B, H, W) and image_scores (B,), the text features of ``--category``
                         baked in, frozen weights in float32, fixed batch ``--batch_size``
    sam_decoder.onnx     SAM's prompt encoder + mask decoder (segment-anything's SamOnnxModel,
                         inputs and dynamic axes as its scripts/export_onnx_model.py)
    onnx_check.json      max |ONNX - PyTorch| of each graph on random inputs (onnxruntime, CPU)

PPG and the cascade (which prompts to give SAM, three decoder steps) stay Python glue around
these graphs; the SAM image encoder is not exported (as in segment-anything's own script).
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

__all__ = ["export_bundle", "export_onnx", "export_main", "read_bundle"]



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
        bundle_config = {"model": full, "data": {"image_size": module.image_size, "tiling": tiling}}
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
class ClipStageGraph(torch.nn.Module):
    """The map stage for ONNX: frame images -> (anomaly map, image scores), one category.

    Calls the module's own map model (:class:`clipsam.models.clip.ClipAnomalyModel`, same math
    as test/predict); one forward before tracing fills its text-feature cache, so the
    category's text features become constants of the graph.
    """

    def __init__(self, map_model: torch.nn.Module, category: str, image_size: int) -> None:
        super().__init__()
        self.map_model = map_model
        self.category = category
        with torch.no_grad():
            map_model(torch.zeros(1, 3, image_size, image_size), [category])

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.map_model(images, [self.category] * images.shape[0])
        return out.anomaly_map, out.image_scores


def _map_model(module: Any) -> torch.nn.Module:
    """The module's map model: ``clip_model`` (CLIP adapters) or a method plug-in's ``producer``."""
    model = getattr(module, "clip_model", None)
    if model is None:
        model = getattr(module, "producer", None)
    if model is None:
        raise ConfigError("this model has no map stage to export")
    return model


def _onnx_modules() -> tuple[Any, Any]:
    try:
        import onnx
        import onnxruntime
    except ImportError as err:
        raise ConfigError(
            "`clipsam export --format onnx` needs onnx and onnxruntime: pip install 'clipsam[export]'"
        ) from err
    return onnx, onnxruntime


def _export(model: torch.nn.Module, args: tuple, path: Path, **kwargs: Any) -> None:
    # nn.MultiheadAttention's fused inference kernel has no ONNX symbolic: trace the plain path.
    fastpath = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with torch.no_grad():
            torch.onnx.export(model, args, str(path), dynamo=False, **kwargs)
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)


def export_onnx(
    ckpt_path: str | os.PathLike[str] | None,
    config: Any,
    output: str | os.PathLike[str],
    *,
    category: str,
    batch_size: int = 1,
    opset: int = 17,
    overrides: dict[str, Any] | None = None,
    seed: int = 0,
) -> dict[str, Any]:
    """Export the CLIP stage and SAM's prompt encoder + mask decoder, and check both with onnxruntime.

    Returns:
        the check report (also written to ``onnx_check.json``): per graph its file and
        ``max_abs_diff`` between onnxruntime and PyTorch on random inputs.
    """
    import numpy as np

    onnx, ort = _onnx_modules()
    resolved = _resolved(config, overrides)
    with quiet():
        module = build_module(resolved)
    if module.pipeline.reference_count:
        raise ConfigError(
            f"method {module.pipeline.method!r} with k_shot={module.pipeline.reference_count} compares each image with "
            "reference images at run time, which an ONNX graph does not carry: export --format bundle and give "
            "Segmenter.from_bundle(..., references={category: [files]}), or set model.method_config.k_shot=0"
        )
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
    out = _fresh_output(output)
    report: dict[str, Any] = {"category": category, "batch_size": batch_size, "opset": opset, "graphs": {}}
    generator = torch.Generator().manual_seed(seed)
    try:
        # -------- CLIP stage
        inputs = module.pipeline.method_inputs()
        size = inputs[0].size if inputs else module.image_size  # the method's own input
        graph = ClipStageGraph(_map_model(module), category, size).eval()
        images = torch.randn(batch_size, 3, size, size, generator=generator)
        clip_path = out / "clip_stage.onnx"
        with quiet():
            _export(graph, (images,), clip_path, input_names=["images"], output_names=["anomaly_map", "image_scores"], opset_version=opset)
        onnx.checker.check_model(str(clip_path))
        with torch.no_grad():
            ref_map, ref_scores = graph(images)
        session = ort.InferenceSession(str(clip_path), providers=["CPUExecutionProvider"])
        got_map, got_scores = session.run(None, {"images": images.numpy()})
        report["graphs"]["clip_stage"] = {
            "file": str(clip_path),
            "inputs": {"images": [batch_size, 3, size, size]},
            "max_abs_diff": float(max(np.abs(got_map - ref_map.numpy()).max(), np.abs(got_scores - ref_scores.numpy()).max())),
        }
        # -------- SAM prompt encoder + mask decoder
        sam = getattr(module.refiner, "sam", None)
        if sam is not None:
            report["graphs"]["sam_decoder"] = _export_sam_decoder(sam, out / "sam_decoder.onnx", opset, generator, ort, onnx)
        (out / "onnx_check.json").write_text(json.dumps(report, indent=2))
    except BaseException:
        shutil.rmtree(out, ignore_errors=True)
        raise
    return report


def _export_sam_decoder(sam: Any, path: Path, opset: int, generator: torch.Generator, ort: Any, onnx: Any) -> dict[str, Any]:
    """SamOnnxModel export with the inputs, names and dynamic axes of segment-anything's script."""
    import numpy as np
    from segment_anything.utils.onnx import SamOnnxModel

    sam = sam.float().cpu().eval()
    onnx_model = SamOnnxModel(model=sam, return_single_mask=True).eval()
    embed_dim = sam.prompt_encoder.embed_dim
    embed_size = sam.prompt_encoder.image_embedding_size
    mask_input_size = [4 * x for x in embed_size]
    img = sam.image_encoder.img_size
    inputs = {
        "image_embeddings": torch.randn(1, embed_dim, *embed_size, generator=generator),
        "point_coords": torch.randint(0, img, (1, 5, 2), generator=generator).to(torch.float32),
        "point_labels": torch.randint(0, 4, (1, 5), generator=generator).to(torch.float32),
        "mask_input": torch.randn(1, 1, *mask_input_size, generator=generator),
        "has_mask_input": torch.tensor([1], dtype=torch.float32),
        "orig_im_size": torch.tensor([img, img], dtype=torch.float32),
    }
    with quiet():
        _export(
            onnx_model,
            tuple(inputs.values()),
            path,
            input_names=list(inputs),
            output_names=["masks", "iou_predictions", "low_res_masks"],
            dynamic_axes={"point_coords": {1: "num_points"}, "point_labels": {1: "num_points"}},
            opset_version=opset,
            do_constant_folding=True,
        )
    onnx.checker.check_model(str(path))
    with torch.no_grad():
        ref = onnx_model(*inputs.values())
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run(None, {k: v.numpy() for k, v in inputs.items()})
    # Compare the mask logits (low-res) and the IoU predictions; ``masks`` are their upscaling.
    diff = max(float(np.abs(got[1] - ref[1].numpy()).max()), float(np.abs(got[2] - ref[2].numpy()).max()))
    # Another number of points than at export: the dynamic axis works.
    fewer = {**inputs, "point_coords": inputs["point_coords"][:, :3], "point_labels": inputs["point_labels"][:, :3]}
    with torch.no_grad():
        ref = onnx_model(*fewer.values())
    got = session.run(None, {k: v.numpy() for k, v in fewer.items()})
    diff = max(diff, float(np.abs(got[1] - ref[1].numpy()).max()), float(np.abs(got[2] - ref[2].numpy()).max()))
    return {"file": str(path), "max_abs_diff": diff, "compared": ["iou_predictions", "low_res_masks"], "num_points": [5, 3]}


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
        description="Export a trained model: a bundle folder for clipsam.Segmenter, or ONNX graphs "
        "of the CLIP stage and SAM's prompt encoder + mask decoder (checked with onnxruntime).",
    )
    parser.add_argument("--ckpt_path", default=None, help="checkpoint written by `clipsam fit` (trained methods; none for WinCLIP, SDP, SAA)")
    parser.add_argument("--config", required=True, action="append", help="the YAML config (repeatable, merged left to right)")
    parser.add_argument("--format", choices=("bundle", "onnx"), default="bundle", help="what to write (default: bundle)")
    parser.add_argument("--output", required=True, help="a new or empty folder")
    parser.add_argument("--thresholds", default=None, help="bundle: thresholds.json from `clipsam test` (default: model.evaluation.thresholds)")
    parser.add_argument("--category", default=None, help="object category: bundle default; ONNX: the text prompts baked in (required)")
    parser.add_argument("--batch_size", type=int, default=1, help="ONNX: fixed batch size of the CLIP graph (default 1)")
    parser.add_argument("--opset", type=int, default=17, help="ONNX opset (default 17)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key, e.g. model.evaluation.mask_source=score")
    args = parser.parse_args(list(argv))
    overrides = _parse_overrides(args.set)
    if args.format == "bundle":
        out = export_bundle(args.ckpt_path, args.config, args.output, thresholds=args.thresholds, category=args.category, overrides=overrides)
        print(f"clipsam: wrote bundle {out} (load it with clipsam.Segmenter.from_bundle({str(out)!r}))")
        return 0
    if not args.category:
        raise ConfigError("--format onnx needs --category: the object whose text prompts are baked into the graph")
    report = export_onnx(args.ckpt_path, args.config, args.output, category=args.category, batch_size=args.batch_size, opset=args.opset, overrides=overrides)
    for name, graph in report["graphs"].items():
        print(f"clipsam: wrote {graph['file']}  max |onnxruntime - pytorch| = {graph['max_abs_diff']:.3g}")
    print(f"clipsam: check report {Path(args.output) / 'onnx_check.json'}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(export_main(sys.argv[1:]))
