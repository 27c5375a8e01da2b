"""``clipsam export --format onnx``: the whole method as ONNX graphs + a ``bundle.json`` for
:mod:`clipsam.runtime` (onnxruntime + numpy + Pillow, no torch).

Folder::

    bundle.json          everything the runtime needs (below), sha256 of every file
    producer.onnx        the method's input (B, 3, S, S) float32 [+ text (B, ...) float32]
                         -> anomaly_map (B, H, W) Map_a, image_scores (B,); dynamic batch
    text/<category>.npy  the text features of each exported category (methods whose prompts name
                         the object; an object-agnostic method such as AnomalyCLIP has none)
    image_score.onnx     (refiner on) producer image scores (B,) + fused scores (B, H, W) -> the
                         method's image scores (B,) (:meth:`MapProducer.fused_image_scores`)
    sam_encoder.onnx     SAM input uint8 (B, 3, S, S) + valid size (B, 2) -> embeddings (B, C, h, w)
                         (normalisation and padding inside, as ``SamPredictor.set_image``)
    sam_decoder.onnx     embeddings (R, C, h, w), point_coords (R, N, 2) SAM-input pixels,
                         point_labels (R, N) (-1 padding, 0 negative, 1 positive, 2/3 box
                         corners), mask_input (R, 1, 4h, 4w), has_mask_input (R,) -> low-res
                         logits of every mask token (R, M, 4h, 4w) and their predicted IoU (R, M);
                         dynamic R and N (SAM's own ONNX export has the point axis dynamic)
    thresholds.json      the decision thresholds (when given or set in the config)

``bundle.json`` holds: the format marker and version; method and refiner with their resolved
settings; the inputs (how the producer's input, the frame and SAM's input are made from the
original image: size, resize filter, normalisation); the categories with their object names and
text files; PPG's kernel (the exact structuring element), the cascade / MMR settings, the fusion
and mask source; the thresholds and the default thresholds; clipsam / torch / onnx / opset
versions; the sha256 of every file; and the export check (max |onnxruntime - PyTorch| of each
graph on the export's sample inputs).

Which pairs export: a method exports when its producer declares ``onnx_exportable`` (its map
depends on the category only through the text features named by ``onnx_text``, or not at all);
refiners ``none``, ``ppg_cps`` and ``mmr``. Anything else (SAA's detector, MuSc's transductive
scoring, few-shot references, tiling) is refused with one line naming the part, before any file
is written.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from clipsam.errors import ConfigError

__all__ = [
    "ONNX_BUNDLE_FORMAT",
    "ONNX_BUNDLE_VERSION",
    "ImageScoreGraph",
    "ProducerGraph",
    "SamDecoderGraph",
    "SamEncoderGraph",
    "export_method_onnx",
    "onnx_modules",
    "refuse_unexportable",
]

ONNX_BUNDLE_FORMAT = "clipsam-onnx-bundle"
ONNX_BUNDLE_VERSION = 1
EXPORTABLE_REFINERS = ("none", "ppg_cps", "mmr")


# ---------------------------------------------------------------------------------- graphs
def _resolve(obj: Any, dotted: str) -> tuple[Any, str]:
    parts = dotted.split(".")
    for part in parts[:-1]:
        obj = getattr(obj, part)
    return obj, parts[-1]


class ProducerGraph(nn.Module):
    """The map producer with its text features as a graph input (or none, object-agnostic).

    The producer's text function (``producer.onnx_text``, a dotted attribute path returning
    per-image text features for a list of categories) is replaced, while the graph runs, by one
    that returns the ``text`` input; everything else is the producer's own forward.
    """

    def __init__(self, producer: nn.Module) -> None:
        super().__init__()
        self.producer = producer
        self.text_path: str | None = getattr(producer, "onnx_text", None)

    def text_table(self, categories: list[str]) -> dict[str, np.ndarray]:
        """Each category's text features (what the text function returns for it, batch row 0)."""
        if self.text_path is None:
            return {}
        owner, name = _resolve(self.producer, self.text_path)
        function = getattr(owner, name)
        with torch.no_grad():
            return {c: function([c])[0].detach().float().cpu().numpy() for c in categories}

    def forward(self, images: Tensor, text: Tensor | None = None) -> tuple[Tensor, Tensor]:
        categories = ["onnx"] * images.shape[0]
        if self.text_path is None:
            out = self.producer(images, categories)
        else:
            owner, name = _resolve(self.producer, self.text_path)
            owner.__dict__[name] = lambda *args, **kwargs: text
            try:
                out = self.producer(images, categories)
            finally:
                del owner.__dict__[name]
        return out.anomaly_map.float(), out.image_scores.float()


class ImageScoreGraph(nn.Module):
    """:meth:`MapProducer.fused_image_scores` of the fused pixel scores (with a refiner)."""

    def __init__(self, producer: nn.Module) -> None:
        super().__init__()
        self.producer = producer

    def forward(self, producer_scores: Tensor, scores: Tensor) -> Tensor:
        from clipsam.methods.base import MapOutput

        output = MapOutput(anomaly_map=scores, image_scores=producer_scores, extras={})
        return self.producer.fused_image_scores(output, scores).float()


class SamEncoderGraph(nn.Module):
    """SAM's image encoder on uint8 inputs: ``Sam.preprocess`` (normalise, zero padding) inside."""

    def __init__(self, sam: nn.Module) -> None:
        super().__init__()
        self.sam = sam

    def forward(self, sam_image: Tensor, sam_size: Tensor) -> Tensor:
        from clipsam.models.sam import encode_sam_inputs

        return encode_sam_inputs(self.sam, sam_image, sam_size)


class SamDecoderGraph(nn.Module):
    """SAM's prompt encoder + mask decoder, row r's prompts on row r's embedding, every mask token.

    Points carry SAM's labels: -1 the padding point SAM appends when there is no box, 0 / 1
    negative / positive clicks, 2 / 3 the top-left / bottom-right box corners (SAM embeds a box
    as these two corners, after the points). The arithmetic is the prompt encoder's: coordinates
    + 0.5, divided by the input side, the random Fourier encoding, then the label's embedding
    (padding: the "not a point" embedding alone). ``has_mask_input`` 0 gives the "no mask"
    embedding, 1 the downscaled ``mask_input``.
    """

    def __init__(self, sam: nn.Module) -> None:
        super().__init__()
        self.sam = sam

    def forward(
        self, embeddings: Tensor, point_coords: Tensor, point_labels: Tensor, mask_input: Tensor, has_mask_input: Tensor
    ) -> tuple[Tensor, Tensor]:
        encoder = self.sam.prompt_encoder
        height, width = encoder.input_image_size
        coords = point_coords + 0.5
        coords = torch.stack((coords[..., 0] / width, coords[..., 1] / height), -1)
        sparse = encoder.pe_layer._pe_encoding(coords)  # (R, N, C)
        labels = point_labels[..., None]
        sparse = torch.where(labels == -1, torch.zeros_like(sparse), sparse)
        sparse = sparse + (labels == -1).to(sparse.dtype) * encoder.not_a_point_embed.weight
        for index, embedding in enumerate(encoder.point_embeddings):
            sparse = sparse + (labels == index).to(sparse.dtype) * embedding.weight
        has = has_mask_input.view(-1, 1, 1, 1)
        dense = has * encoder.mask_downscaling(mask_input) + (1 - has) * encoder.no_mask_embed.weight.reshape(1, -1, 1, 1)
        from clipsam.models.sam import decode_mask_tokens

        return decode_mask_tokens(self.sam, embeddings, sparse, dense)


# ---------------------------------------------------------------------------------- checks
def refuse_unexportable(module: Any) -> None:
    """One ConfigError naming the part that an ONNX bundle cannot carry (before any file is written)."""
    pipeline = module.pipeline
    if pipeline.reference_count:
        raise ConfigError(
            f"method {pipeline.method!r} with k_shot={pipeline.reference_count} compares each image with reference "
            "images at run time, which an ONNX graph does not carry: export --format bundle and give "
            "Segmenter.from_bundle(..., references={category: [files]}), or set model.method_config.k_shot=0"
        )
    if pipeline.tiling.canvas() is not None:
        raise ConfigError("data.tiling is on: the ONNX runtime runs one frame per image; export without data.tiling.image_size")
    if pipeline.refiner_name not in EXPORTABLE_REFINERS:
        raise ConfigError(
            f"model.refiner={pipeline.refiner_name!r} has no ONNX export (exportable refiners: {', '.join(EXPORTABLE_REFINERS)})"
        )
    if pipeline.batching == "category":
        raise ConfigError(
            f"method {pipeline.method!r} scores each image against the other images of its category (transductive): "
            "an ONNX graph of one image cannot carry that; use clipsam test / Segmenter"
        )


def _refuse_producer(producer: nn.Module, method: str) -> None:
    if not getattr(producer, "onnx_exportable", False):
        raise ConfigError(
            f"method {method!r} has no ONNX export (its map producer is not declared exportable: e.g. SAA's "
            "Grounding DINO detector, MuSc's transductive scoring); export --format bundle and use clipsam.Segmenter"
        )


def _max_diff(a: Any, b: Any) -> float:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    finite = np.isfinite(a) & np.isfinite(b)
    if not np.array_equal(np.isfinite(a), np.isfinite(b)):
        return float("inf")
    return float(np.abs(a[finite] - b[finite]).max()) if finite.any() else 0.0


def onnx_modules() -> tuple[Any, Any]:
    """``(onnx, onnxruntime)``, or one ConfigError naming the extra to install."""
    try:
        import onnx
        import onnxruntime
    except ImportError as err:
        raise ConfigError(
            "`clipsam export --format onnx` needs onnx and onnxruntime: pip install 'clipsam[export]'"
        ) from err
    return onnx, onnxruntime


def _export_graph(model: nn.Module, args: tuple, path: Path, names: list[str], outputs: list[str], dynamic: dict, opset: int) -> None:
    from clipsam.loading import quiet

    # nn.MultiheadAttention's fused inference kernel has no ONNX symbolic: trace the plain path.
    fastpath = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with quiet(), torch.no_grad():
            torch.onnx.export(
                model, args, str(path), dynamo=False, input_names=names, output_names=outputs,
                dynamic_axes=dynamic, opset_version=opset, do_constant_folding=True,
            )  # fmt: skip
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)


def _check(session: Any, model: nn.Module, inputs: dict[str, Tensor]) -> float:
    with torch.no_grad():
        ref = model(*inputs.values())
    ref = ref if isinstance(ref, tuple) else (ref,)
    wanted = {i.name for i in session.get_inputs()}  # an input the graph ignores is dropped by the exporter
    got = session.run(None, {k: v.numpy() for k, v in inputs.items() if k in wanted})
    return max(_max_diff(g, r.numpy()) for g, r in zip(got, ref))


# ---------------------------------------------------------------------------------- export
def export_method_onnx(
    module: Any,
    out: Path,
    *,
    categories: list[str],
    thresholds: dict[str, Any] | None,
    opset: int,
    seed: int,
    versions: dict[str, str],
    source: dict[str, Any],
    camera: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Write the graphs, text features and ``bundle.json`` of ``module`` into the empty folder ``out``.

    Args:
        module: a :class:`~clipsam.module.ClipSamModule` with its models built, weights loaded,
            in eval mode and float32.
        out: the (new, empty) bundle folder.
        categories: the categories whose text features the bundle carries.
        thresholds: a loaded thresholds file or None.
        opset: ONNX opset.
        seed: seed of the random check inputs.
        versions: library versions at export.
        source: provenance (checkpoint path, configs).
        camera: ``data.color_order`` / ``data.bit_depth`` the runtime applies to arrays and
            16-bit files by default.

    Returns:
        the ``bundle.json`` content.
    """
    import onnx
    import onnxruntime as ort

    from clipsam.inputs import InputSpec
    from clipsam.loading import sha256

    pipeline = module.pipeline
    producer = pipeline.build_producer()
    _refuse_producer(producer, pipeline.method)
    refiner = pipeline.refiner
    generator = torch.Generator().manual_seed(seed)
    providers = ["CPUExecutionProvider"]
    files: dict[str, str] = {}
    check: dict[str, float] = {}
    frame = int(pipeline.image_size)

    # -------- producer
    specs = pipeline.method_inputs()
    spec: InputSpec | None = next((s for s in specs if s.key == producer.input_key), None)
    size = spec.size if spec is not None else frame
    graph = ProducerGraph(producer).eval()
    table = graph.text_table(categories)
    images = torch.randn(2, 3, size, size, generator=generator)
    inputs: dict[str, Tensor] = {"images": images}
    if graph.text_path is not None:
        first = torch.from_numpy(table[categories[0]])
        inputs["text"] = torch.stack([first, torch.from_numpy(table[categories[-1]])])
    dynamic = {name: {0: "batch"} for name in inputs}
    dynamic.update(anomaly_map={0: "batch"}, image_scores={0: "batch"})
    path = out / "producer.onnx"
    single = {k: v[:1] for k, v in inputs.items()}
    producer_batch: int | None = None  # None: dynamic batch axis
    _export_graph(graph, tuple(inputs.values()), path, list(inputs), ["anomaly_map", "image_scores"], dynamic, opset)
    onnx.checker.check_model(str(path))
    session = ort.InferenceSession(str(path), providers=providers)
    check["producer"] = _check(session, graph, inputs)
    try:  # another batch size than at export
        check["producer"] = max(check["producer"], _check(session, graph, single))
    except Exception:  # noqa: BLE001 - onnxruntime's errors have no common base; re-export below
        check["producer"] = float("inf")
    if not check["producer"] <= 1e-3:
        # The trace baked the batch size into a shape (e.g. a chunked loop over windows): export
        # the graph for one image; the runtime runs it image by image.
        producer_batch = 1
        _export_graph(graph, tuple(single.values()), path, list(single), ["anomaly_map", "image_scores"], {}, opset)
        onnx.checker.check_model(str(path))
        session = ort.InferenceSession(str(path), providers=providers)
        check["producer"] = _check(session, graph, single)
    text_dir = out / "text"
    text_files: dict[str, str | None] = {}
    if table:
        text_dir.mkdir()
        for index, (category, features) in enumerate(table.items()):
            name = f"text/{index:03d}.npy"
            np.save(out / name, features.astype(np.float32))
            text_files[category] = name
    with torch.no_grad():
        map_out = graph(*single.values())[0]
    map_size = [int(map_out.shape[-2]), int(map_out.shape[-1])]

    # -------- image score of the fused map
    if refiner is not None:
        score_graph = ImageScoreGraph(producer).eval()
        score_inputs = {"producer_scores": torch.rand(2, generator=generator), "scores": torch.rand(2, *map_size, generator=generator)}
        path = out / "image_score.onnx"
        _export_graph(
            score_graph, tuple(score_inputs.values()), path, list(score_inputs), ["image_scores"],
            {"producer_scores": {0: "batch"}, "scores": {0: "batch"}, "image_scores": {0: "batch"}}, opset,
        )
        onnx.checker.check_model(str(path))
        check["image_score"] = _check(ort.InferenceSession(str(path), providers=providers), score_graph, score_inputs)

    # -------- SAM
    sam = getattr(refiner, "sam", None)
    sam_info: dict[str, Any] | None = None
    if sam is not None:
        sam = sam.float().cpu().eval()
        side = int(sam.image_encoder.img_size)
        encoder = SamEncoderGraph(sam).eval()
        enc_inputs = {
            "sam_image": torch.randint(0, 256, (1, 3, side, side), generator=generator, dtype=torch.uint8),
            "sam_size": torch.tensor([[side, side * 3 // 4]], dtype=torch.int64),
        }
        path = out / "sam_encoder.onnx"
        _export_graph(
            encoder, tuple(enc_inputs.values()), path, list(enc_inputs), ["embeddings"],
            {"sam_image": {0: "batch"}, "sam_size": {0: "batch"}, "embeddings": {0: "batch"}}, opset,
        )
        onnx.checker.check_model(str(path))
        check["sam_encoder"] = _check(ort.InferenceSession(str(path), providers=providers), encoder, enc_inputs)
        decoder = SamDecoderGraph(sam).eval()
        embed_dim = sam.prompt_encoder.embed_dim
        grid = list(sam.prompt_encoder.image_embedding_size)
        low = list(sam.prompt_encoder.mask_input_size)

        def dec_inputs(rows: int, points: int) -> dict[str, Tensor]:
            return {
                "embeddings": torch.randn(rows, embed_dim, *grid, generator=generator),
                "point_coords": torch.randint(0, side, (rows, points, 2), generator=generator).to(torch.float32),
                "point_labels": torch.randint(-1, 4, (rows, points), generator=generator).to(torch.float32),
                "mask_input": torch.randn(rows, 1, *low, generator=generator),
                "has_mask_input": torch.tensor([1.0, 0.0][:rows] + [1.0] * max(0, rows - 2)),
            }

        sample = dec_inputs(2, 5)
        path = out / "sam_decoder.onnx"
        _export_graph(
            decoder, tuple(sample.values()), path, list(sample), ["low_res_masks", "iou_predictions"],
            {
                "embeddings": {0: "rows"}, "point_coords": {0: "rows", 1: "num_points"}, "point_labels": {0: "rows", 1: "num_points"},
                "mask_input": {0: "rows"}, "has_mask_input": {0: "rows"}, "low_res_masks": {0: "rows"}, "iou_predictions": {0: "rows"},
            },
            opset,
        )
        onnx.checker.check_model(str(path))
        session = ort.InferenceSession(str(path), providers=providers)
        check["sam_decoder"] = max(_check(session, decoder, sample), _check(session, decoder, dec_inputs(3, 2)))
        # The decoder graph against segment_anything's own prompt encoder + mask decoder.
        check["sam_decoder_vs_segment_anything"] = _decoder_vs_segment_anything(sam, decoder, generator)
        sam_info = {
            "side": side,
            "pixel_mean": [float(v) for v in sam.pixel_mean.flatten()],
            "pixel_std": [float(v) for v in sam.pixel_std.flatten()],
            "embedding_grid": grid,
            "mask_input_size": low,
            "mask_threshold": float(sam.mask_threshold),
        }

    # -------- bundle.json
    if thresholds is not None:
        from clipsam.thresholds import THRESHOLDS_FILE, save_thresholds

        save_thresholds(out / THRESHOLDS_FILE, thresholds)
    for file in sorted(out.rglob("*")):
        if file.is_file():
            files[file.relative_to(out).as_posix()] = sha256(file)
    config = module.eval_config
    manifest: dict[str, Any] = {
        "format": ONNX_BUNDLE_FORMAT,
        "version": ONNX_BUNDLE_VERSION,
        "method": pipeline.method,
        "refiner": pipeline.refiner_name,
        "method_config": _plain(pipeline.method_config),
        "refiner_config": _plain(pipeline.refiner_config),
        "inputs": {
            "producer": (
                {"key": "image", "size": frame, "resize": "pil_bicubic", "normalize": "clip", "normalize_formula": "albumentations"}
                if spec is None
                else {"key": spec.key, "size": int(spec.size), "resize": spec.resize, "normalize": spec.normalize, "normalize_formula": "clipsam"}
            ),
            "frame": {"size": frame, "resize": "pil_bicubic"},
            "producer_batch": producer_batch,
            "color_order": (camera or {}).get("color_order", "rgb"),
            "bit_depth": (camera or {}).get("bit_depth"),
            "map_size": map_size,
            "sam": sam_info,
            "clip_mean": [0.48145466, 0.4578275, 0.40821073],
            "clip_std": [0.26862954, 0.26130258, 0.27577711],
        },
        "categories": {c: {"object_name": producer.object_name(c), "text": text_files.get(c)} for c in categories},
        "text_input": graph.text_path is not None,
        "prompt": _prompt_info(refiner),
        "evaluation": {
            "fusion": pipeline.fusion,
            "mask_source": config.mask_source,
            "mask_threshold": float(pipeline.mask_threshold),
            "default_image_threshold": float(config.predict_image_threshold),
            "default_pixel_threshold": float(config.predict_mask_threshold),
        },
        "thresholds": "thresholds.json" if thresholds is not None else None,
        "score_settings": _plain(pipeline.score_settings()),
        "opset": opset,
        "versions": versions,
        "source": source,
        "check": {"max_abs_diff": check, "inputs": "random, seeded", "seed": seed},
        "files": files,
    }
    (out / "bundle.json").write_text(json.dumps(manifest, indent=2))
    return manifest


def _decoder_vs_segment_anything(sam: nn.Module, decoder: SamDecoderGraph, generator: torch.Generator) -> float:
    """max |graph - segment_anything| on points + padding point, and on points + box + mask input."""
    side = int(sam.image_encoder.img_size)
    emb = torch.randn(1, sam.prompt_encoder.embed_dim, *sam.prompt_encoder.image_embedding_size, generator=generator)
    points = torch.randint(0, side, (1, 3, 2), generator=generator).to(torch.float32)
    labels = torch.tensor([[1, 0, 1]])
    box = torch.tensor([[10.0, 12.0, side * 0.6, side * 0.7]])
    low = torch.randn(1, 1, *sam.prompt_encoder.mask_input_size, generator=generator)
    worst = 0.0
    with torch.no_grad():
        for use_box in (False, True):
            sparse, dense = sam.prompt_encoder(points=(points, labels), boxes=box if use_box else None, masks=low if use_box else None)
            ref, ref_iou = sam.mask_decoder(
                image_embeddings=emb, image_pe=sam.prompt_encoder.get_dense_pe(),
                sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense, multimask_output=True,
            )
            if use_box:
                coords = torch.cat((points, box.view(1, 2, 2)), 1)
                labs = torch.cat((labels.float(), torch.tensor([[2.0, 3.0]])), 1)
            else:
                coords = torch.cat((points, torch.zeros(1, 1, 2)), 1)
                labs = torch.cat((labels.float(), torch.tensor([[-1.0]])), 1)
            got, got_iou = decoder(emb, coords, labs, low if use_box else torch.zeros_like(low), torch.tensor([1.0 if use_box else 0.0]))
            worst = max(worst, _max_diff(got[:, 1:], ref), _max_diff(got_iou[:, 1:], ref_iou))
    return worst


def _prompt_info(refiner: Any) -> dict[str, Any] | None:
    """What the runtime's numpy PPG / cascade / MMR needs: the settings and PPG's exact kernel."""
    if refiner is None:
        return None
    config = refiner.config if hasattr(refiner, "config") else None
    if getattr(refiner, "name", None) == "mmr" or type(refiner).__name__ == "MmrRefiner":
        return {"kind": "mmr", **_plain(config)}
    from clipsam.prompting import structuring_element

    prompt = refiner.prompt
    kernel = structuring_element(prompt.kernel_shape, int(prompt.kernel_size)).to(torch.uint8).tolist()
    return {"kind": "ppg_cps", "prompt": _plain(prompt), "cascade": _plain(refiner.cascade), "kernel": kernel}


def _plain(value: Any) -> Any:
    """Dataclasses / tensors / paths -> JSON-ready values."""
    import dataclasses

    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, Tensor):
        return value.tolist()
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)
