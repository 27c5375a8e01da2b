"""Benchmark the CLIP stage: images/s of ``ClipAnomalyModel.forward`` per frozen dtype and batch.

Random weights (no download): the tiny preset ``clipsam-tiny`` and ``ViT-B-16``, at one image
size (default 224; ``--image-size 518`` for the paper's frame). Each measurement runs the full
stage (frozen tower in the given dtype, adapters, text features cached beforehand, upsampling,
Gaussian smoothing) in eval mode under ``torch.no_grad``, after one warm-up call, for at least
``--min-seconds`` per dtype (and at least 3 calls); the float32 and bfloat16 models are called
alternately and the figure is the median call time, so other processes sharing the CPU slow
both alike. The model's forward disables autocast, so Lightning's precision
setting cannot change these numbers; the frozen dtype is the only precision knob.

Usage:
    python scripts/benchmark_clip.py [--out runs/benchmarks/clip.json] [--image-size 224]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch

from clipsam.models.clip import ClipConfig, build_clip_model

MODELS = {"clipsam-tiny": [1, 2, 3, 4], "ViT-B-16": [3, 6, 9, 12]}


def measure(models: dict, images, categories, *, min_seconds: float) -> dict[str, dict]:
    """Median call time per model, calls interleaved so CPU contention hits every dtype alike."""
    times: dict[str, list[float]] = {key: [] for key in models}
    with torch.no_grad():
        for model in models.values():
            model(images, categories)  # warm-up
        while sum(map(sum, times.values())) < min_seconds * len(models) or min(map(len, times.values())) < 3:
            for key, model in models.items():
                start = time.perf_counter()
                model(images, categories)
                times[key].append(time.perf_counter() - start)
            if min(map(len, times.values())) >= 50:
                break
    result = {}
    for key, values in times.items():
        median = statistics.median(values)
        result[key] = {
            "images_per_s": round(images.shape[0] / median, 3),
            "seconds_per_batch_median": round(median, 4),
            "calls": len(values),
        }
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/benchmarks/clip.json")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--models", nargs="+", default=list(MODELS))
    parser.add_argument("--min-seconds", type=float, default=3.0)
    args = parser.parse_args()

    load_before = os.getloadavg()[0]
    results = []
    for name in args.models:
        models = {}
        for dtype in ("float32", "bfloat16"):
            config = ClipConfig(model_name=name, pretrained=None, layers=MODELS[name], frozen_dtype=dtype)
            models[dtype] = build_clip_model(config, image_size=args.image_size).eval()
            models[dtype].text_features(["object"])  # cached: not part of the per-image cost
        for batch in args.batches:
            gen = torch.Generator().manual_seed(0)
            images = torch.randn(batch, 3, args.image_size, args.image_size, generator=gen)
            timed = measure(models, images, ["object"] * batch, min_seconds=args.min_seconds)
            for dtype, figures in timed.items():
                row = {"model": name, "frozen_dtype": dtype, "batch": batch, "image_size": args.image_size, **figures}
                print(json.dumps(row), flush=True)
                results.append(row)
        del models
    report = {
        "benchmark": "clip_stage_forward",
        "weights": "random (pretrained=None)",
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu": platform.processor() or platform.machine(),
        "stage": "ClipAnomalyModel.forward, eval, no_grad, text features cached, sigma 4 smoothing",
        "cpu_count": os.cpu_count(),
        "loadavg_1min_before_after": [round(load_before, 2), round(os.getloadavg()[0], 2)],
        "results": results,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
