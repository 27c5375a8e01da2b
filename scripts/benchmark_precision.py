"""How far the CLIP anomaly map moves with the precision of the frozen tower.

Builds the real architecture (default ``ViT-L-14-336`` at a 518 frame, layers 6/12/18/24) with
RANDOM weights (nothing can be downloaded here), one set of weights for every mode, and runs
``ClipAnomalyModel`` on a few generated images (clipsam.data.synthetic, resized by the data
pipeline's own transform) in each mode:

- ``fp32``: everything float32 (the reference);
- ``bf16``: clipsam's ``frozen_dtype: bfloat16``: attention and MLP weights of the visual
  blocks in bf16, LayerNorms, residual stream, stem, projection and text tower float32;
- ``bf16_pure``: the whole open_clip model cast to bf16 (clipsam before this change: the
  residual stream and the LayerNorms in bf16 too);
- ``autocast_bf16`` / ``autocast_fp16``: float32 weights with the whole stage (text encoder,
  tower, adapters and similarities) under ``torch.autocast`` of that dtype, as APRIL-GAN's and
  AnomalyCLIP's code run on GPU with fp16 (``torch.cuda.amp.autocast``). On CPU, fp16 autocast
  may be unsupported or slow; it is skipped with a note if it fails.

The map is the paper config's (mean of the layers, logits-first upsampling, Gaussian sigma 4)
and the image score the CLS zero-shot score. Reported against ``fp32``: the largest and the
mean absolute difference of the anomaly map, the Spearman rank correlation of all pixel scores
pooled over the images (and the lowest per image), the largest difference of the image score,
and seconds per image (one image per call). Random weights do not have the large activation
outliers of the trained OpenAI weights, so the real differences can be larger: read these
numbers as a lower bound.

Usage:
    python scripts/benchmark_precision.py [--images 3] [--model ViT-L-14-336] [--image-size 518]
        [--layers 6 12 18 24] [--categories 1] [--modes fp32 bf16 bf16_pure autocast_bf16 autocast_fp16]
        [--device cpu] [--out runs/benchmarks/precision.json]
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import platform
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from scipy.stats import spearmanr

import clipsam.models.clip as clip_module
from clipsam.data.synthetic import render_sample
from clipsam.data.transforms import build_transform
from clipsam.models.clip import ClipAnomalyModel, ClipConfig, build_clip_model

CATEGORIES = ("capsule", "fabric", "hexnut", "disk", "mesh", "stripes")
DEFECTS = (None, "scratch", "stain", "hole", "missing_part")


@contextlib.contextmanager
def _autocast_everywhere(dtype: torch.dtype, device_type: str) -> Iterator[None]:
    """Run the whole stage under autocast (the model disables it internally otherwise)."""
    original = clip_module._no_autocast
    clip_module._no_autocast = lambda device: torch.autocast(device_type=device.type, dtype=dtype)
    try:
        with torch.autocast(device_type=device_type, dtype=dtype):
            yield
    finally:
        clip_module._no_autocast = original


def _images(count: int, size: int, categories: int) -> tuple[torch.Tensor, list[str]]:
    transform = build_transform(size)
    images, cats = [], []
    for i in range(count):
        category = CATEGORIES[i % categories]
        defect = DEFECTS[i % len(DEFECTS)]
        image, mask = render_sample(category, defect, rng=np.random.default_rng(i), image_size=700)
        images.append(transform(image=image, mask=mask.astype(np.uint8))["image"])
        cats.append(category)
    return torch.stack(images), cats


def _run(model: ClipAnomalyModel, images: torch.Tensor, cats: list[str], context) -> tuple[np.ndarray, np.ndarray, float]:
    maps, scores, seconds = [], [], []
    device = next(model.adapters.parameters()).device
    with torch.no_grad():
        for i in range(images.shape[0]):
            image = images[i : i + 1].to(device)
            with context():
                start = time.perf_counter()
                out = model(image, cats[i : i + 1])
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                seconds.append(time.perf_counter() - start)
            maps.append(out.anomaly_map.float().cpu().numpy()[0])
            scores.append(float(out.image_scores[0]))
    return np.stack(maps), np.array(scores), float(np.median(seconds[1:] or seconds))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="ViT-L-14-336")
    parser.add_argument("--layers", type=int, nargs="+", default=[6, 12, 18, 24])
    parser.add_argument("--image-size", type=int, default=518)
    parser.add_argument("--images", type=int, default=3)
    parser.add_argument(
        "--categories", type=int, default=1, help="distinct object names (each costs 420 text-encoder passes per mode)"
    )
    parser.add_argument("--modes", nargs="+", default=["fp32", "bf16", "bf16_pure", "autocast_bf16", "autocast_fp16"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu", help="cpu or cuda (the references' fp16 autocast needs a GPU)")
    parser.add_argument("--out", default="runs/benchmarks/precision.json")
    args = parser.parse_args()
    device = torch.device(args.device)

    base = dict(
        model_name=args.model,
        pretrained=None,
        layers=args.layers,
        seed=args.seed,
        image_score="clip_global",
        smoothing_sigma=4.0,
        upsample="logits",
    )
    images, cats = _images(args.images, args.image_size, min(args.categories, len(CATEGORIES)))
    t0 = time.perf_counter()
    reference = build_clip_model(ClipConfig(**base, frozen_dtype="float32"), image_size=args.image_size).eval().to(device)
    print(f"built {args.model} at {args.image_size} in {time.perf_counter() - t0:.0f} s", flush=True)

    def variant(mode: str) -> tuple[ClipAnomalyModel, object]:
        if mode == "fp32":
            return reference, contextlib.nullcontext
        if mode == "bf16":
            model = copy.deepcopy(reference)
            model.config = ClipConfig(**base, frozen_dtype="bfloat16")
            model.frozen_dtype = torch.bfloat16
            clip_module.set_frozen_precision(model.clip, torch.bfloat16)
            return model, contextlib.nullcontext  # the text tower stays float32: same text cache
        if mode == "bf16_pure":
            model = copy.deepcopy(reference)
            model.clip.to(torch.bfloat16)
            model.clear_text_cache()
            return model, contextlib.nullcontext
        if mode.startswith("autocast_"):
            dtype = {"autocast_bf16": torch.bfloat16, "autocast_fp16": torch.float16}[mode]
            model = copy.deepcopy(reference)
            model.clear_text_cache()
            return model, lambda: _autocast_everywhere(dtype, device.type)
        raise SystemExit(f"unknown mode {mode!r}")

    results: dict[str, dict] = {}
    ref_maps = ref_scores = None
    for mode in ["fp32", *[m for m in args.modes if m != "fp32"]]:
        model, context = variant(mode)
        try:
            if mode.startswith("autocast_"):
                with context():
                    model.text_features(sorted(set(cats)))  # text under autocast, as the references
            maps, scores, seconds = _run(model, images, cats, context)
        except Exception as err:  # e.g. fp16 autocast unsupported on this CPU
            results[mode] = {"skipped": f"{type(err).__name__}: {str(err)[:200]}"}
            print(f"{mode}: skipped ({results[mode]['skipped']})", flush=True)
            continue
        if mode == "fp32":
            ref_maps, ref_scores = maps, scores
        diff = np.abs(maps - ref_maps)
        row = {
            "map_max_abs_diff": float(diff.max()),
            "map_mean_abs_diff": float(diff.mean()),
            "pixel_spearman": float(spearmanr(maps.ravel(), ref_maps.ravel())[0]),
            "pixel_spearman_min_per_image": float(
                min(spearmanr(m.ravel(), r.ravel())[0] for m, r in zip(maps, ref_maps))
            ),
            "image_score_max_abs_diff": float(np.abs(scores - ref_scores).max()),
            "map_range": [float(maps.min()), float(maps.max())],
            "seconds_per_image": round(seconds, 2),
        }
        results[mode] = row
        print(mode, json.dumps(row), flush=True)
        if model is not reference:
            del model

    payload = {
        "model": args.model,
        "image_size": args.image_size,
        "layers": args.layers,
        "images": args.images,
        "weights": "random (open_clip init, seed %d)" % args.seed,
        "torch": torch.__version__,
        "machine": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "results": results,
    }
    Path(os.path.dirname(args.out) or ".").mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(payload, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
