"""Benchmark the SAM stage: per-image time of SAM's encoder, PPG, each cascade step and fusion.

Random weights (no download): the ``tiny`` preset and ``vit_b`` (segment_anything's
``build_sam_vit_b`` without a checkpoint), on synthetic frame images (default 518 x 518, the
paper's frame) with a synthetic CLIP map (a Gaussian blob, so PPG always finds a region). The
CLIP forward is timed too when ``clipsam.models.clip`` is importable: ``clipsam-tiny`` next to the
tiny SAM and ``ViT-B-16`` (random weights) next to vit_b, at the frame size rounded down to
their patch size 16 (518 -> 512; ``--no-clip`` skips it). The paper's ViT-L-14-336 is timed by
``scripts/benchmark_clip.py``.

Each preset runs twice over the same images with an empty on-disk embedding cache: the cold run
encodes every image, the warm run is served from the cache (a second test run with other PPG/CPS
settings). Both go one image at a time (``SamRefiner.refine``, the Python API's path). Then the
batched path that ``clipsam test`` runs (``SamRefiner.refine_embedded``: PPG and each cascade step
once for the whole batch) is timed on ``--batch-size`` images whose embeddings are computed
beforehand: "PPG + cascade" there is the wall time of the whole call per image. Goals printed at
the end:

- PPG + all cascade steps <= 5 % of the vit_b encoder time;
- the cached rerun of the SAM stage >= 5x faster than the cold run.

Figures are wall times on a shared CPU: the JSON records the load average, since other processes
on the same cores slow multi-threaded PyTorch operations a lot (``--threads 1`` pins PyTorch to
one thread).

Usage:
    python scripts/benchmark_sam.py [--out runs/benchmarks/sam.json] [--image-size 518] [--presets tiny]
        [--batch-size 16] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch

from clipsam.cascade import CascadeConfig
from clipsam.fusion import DEFAULT_FUSION, fuse_scores
from clipsam.data.transforms import sam_input_size
from clipsam.models.sam import EmbeddingCache, SamConfig, build_sam, weights_identity
from clipsam.refiners.ppg_cps import SamRefiner
from clipsam.prompting import PromptConfig

DEFAULT_IMAGES = {"tiny": 4, "vit_b": 2}
DEFAULT_BATCH = {"tiny": 16, "vit_b": 2}
CLIP_MODELS = {"tiny": ("clipsam-tiny", [1, 2, 3, 4]), "vit_b": ("ViT-B-16", [3, 6, 9, 12])}


def synthetic(num: int, size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 (B, 3, S, S) noisy images with a bright square and (B, S, S) blob maps in [0, 1]."""
    gen = torch.Generator().manual_seed(seed)
    images = torch.randint(60, 120, (num, 3, size, size), dtype=torch.uint8, generator=gen)
    ys, xs = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    maps = []
    for i in range(num):
        cy, cx = (torch.rand(2, generator=gen) * 0.5 + 0.25) * size
        r = size / 12
        images[i, :, int(cy - r) : int(cy + r), int(cx - r) : int(cx + r)] = 220
        maps.append(torch.exp(-((ys - cy) ** 2 + (xs - cx) ** 2) / (2 * (1.5 * r) ** 2)))
    return images, torch.stack(maps).float()


def clip_timer(preset: str, size: int):
    """A function timing one CLIP forward on one normalised image, or None if unavailable."""
    try:
        from clipsam.models.clip import ClipConfig, build_clip_model
    except ImportError:
        return None
    name, layers = CLIP_MODELS[preset]
    model = build_clip_model(ClipConfig(model_name=name, pretrained=None, layers=layers), image_size=size)
    model.eval()

    def run(image: torch.Tensor) -> float:
        x = image[None, :, :size, :size].float() / 255.0  # normalisation does not change the cost
        start = time.perf_counter()
        with torch.no_grad():
            model(x, ["object"])
        return time.perf_counter() - start

    run(torch.zeros(3, size, size, dtype=torch.uint8))  # warm-up (text features, allocations)
    return run


def time_batched(refiner: SamRefiner, batch_size: int, size: int, repeats: int) -> dict:
    """Per-image ms of ``refine_embedded`` (PPG + cascade for a batch), median of ``repeats`` calls."""
    images, maps = synthetic(batch_size, size, seed=1)
    embeddings = refiner.embed_images(images)  # not timed
    input_sizes = [sam_input_size(size, size, refiner.side)] * batch_size
    original_sizes = [(size, size)] * batch_size

    def call() -> dict[str, float]:
        start = time.perf_counter()
        out = refiner.refine_embedded(embeddings, maps, input_sizes=input_sizes, original_sizes=original_sizes)
        return {**out["timings"], "ppg_plus_cascade": time.perf_counter() - start}

    call()  # warm-up
    rows = [call() for _ in range(repeats)]
    return {
        "batch_size": batch_size,
        "repeats": repeats,
        "median_ms_per_image": {k: round(statistics.median(r[k] for r in rows) / batch_size * 1000, 4) for k in rows[0]},
    }


def run_preset(preset: str, num_images: int, size: int, with_clip: bool, batch_size: int, repeats: int) -> dict:
    config = SamConfig(variant=preset)
    start = time.perf_counter()
    sam = build_sam(config, pretrained=False)
    build_seconds = time.perf_counter() - start
    images, maps = synthetic(num_images, size, seed=0)
    clip_size = size - size % 16  # the CLIP models here have patch 16 (518 -> 512)
    timer = clip_timer(preset, clip_size) if with_clip else None
    with tempfile.TemporaryDirectory() as cache_dir:
        refiner = SamRefiner(
            sam=sam,
            prompt=PromptConfig(),
            cascade=CascadeConfig(num_steps=3),
            embedding_cache=EmbeddingCache(cache_dir),
            weights_id=weights_identity(config, pretrained=False),
        )
        # Warm-up of PPG and the decoder on a fake embedding (the encoder is not warmed up).
        grid = sam.prompt_encoder.image_embedding_size
        fake = torch.zeros(sam.prompt_encoder.embed_dim, *grid)
        refiner.refine(images[0], maps[0], embedding=fake)
        runs = {}
        for run in ("cold", "cached"):
            per_image = []
            for image, amap in zip(images, maps):
                start = time.perf_counter()
                out = refiner.refine(image, amap)
                sam_total = time.perf_counter() - start
                start = time.perf_counter()
                fuse_scores(amap, out.mask_probs, out.mask, method=DEFAULT_FUSION)
                row = dict(out.timings)
                row["fusion"] = time.perf_counter() - start
                row["sam_stage_total"] = sam_total
                row["cache_hit"] = out.cache_hit
                row["num_points"] = int(out.point_labels.numel())
                if timer is not None and run == "cold":
                    row["clip_forward"] = timer(image)
                per_image.append(row)
            runs[run] = per_image
        batched = time_batched(refiner, batch_size, size, repeats) if batch_size > 0 else None
    stages = [k for k, v in runs["cold"][0].items() if isinstance(v, float)]
    median = {run: {k: statistics.median(r[k] for r in rows) for k in stages if k in rows[0]} for run, rows in runs.items()}
    cold, warm = median["cold"], median["cached"]
    prompt_and_cascade = cold["ppg"] + sum(v for k, v in cold.items() if k.startswith("cascade_step_"))
    return {
        "preset": preset,
        "clip_model": CLIP_MODELS[preset][0] if timer is not None else None,
        "clip_image_size": clip_size if timer is not None else None,
        "num_images": num_images,
        "build_seconds": round(build_seconds, 3),
        "median_seconds": {run: {k: round(v, 5) for k, v in m.items()} for run, m in median.items()},
        "per_image": runs,
        "ppg_plus_cascade_seconds": round(prompt_and_cascade, 5),
        "ppg_plus_cascade_fraction_of_encoder": round(prompt_and_cascade / cold["sam_encoder"], 5),
        "cached_speedup": round(cold["sam_stage_total"] / warm["sam_stage_total"], 2),
        "batched": batched,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/benchmarks/sam.json")
    parser.add_argument("--image-size", type=int, default=518)
    parser.add_argument("--presets", nargs="+", default=list(DEFAULT_IMAGES), choices=list(DEFAULT_IMAGES))
    parser.add_argument("--images", type=int, default=None, help="images per preset (default: tiny 4, vit_b 2)")
    parser.add_argument("--no-clip", action="store_true", help="do not time the CLIP forward")
    parser.add_argument(
        "--batch-size", type=int, default=None, help="images in the batched measure (default: tiny 16, vit_b 2; 0 skips it)"
    )
    parser.add_argument("--repeats", type=int, default=5, help="timed calls of the batched measure (median)")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: PyTorch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    results = [
        run_preset(
            p, args.images or DEFAULT_IMAGES[p], args.image_size, with_clip=not args.no_clip,
            batch_size=DEFAULT_BATCH[p] if args.batch_size is None else args.batch_size, repeats=args.repeats,
        )
        for p in args.presets
    ]
    goals = {}
    for result in results:
        med = result["median_seconds"]["cold"]
        line = ", ".join(f"{k} {v * 1000:.1f} ms" for k, v in med.items())
        print(f"[{result['preset']}] cold median per image: {line}")
        print(
            f"[{result['preset']}] PPG + cascade = {result['ppg_plus_cascade_fraction_of_encoder'] * 100:.2f} % of "
            f"the encoder; cached rerun {result['cached_speedup']}x faster"
        )
        if result["batched"] is not None:
            batched = result["batched"]["median_ms_per_image"]
            line = ", ".join(f"{k} {v:.2f} ms" for k, v in batched.items())
            print(f"[{result['preset']}] batched ({result['batched']['batch_size']} images), per image: {line}")
        if result["preset"] == "vit_b":
            goals = {
                "ppg_plus_cascade_le_5pct_of_vit_b_encoder": result["ppg_plus_cascade_fraction_of_encoder"] <= 0.05,
                "cached_rerun_ge_5x": result["cached_speedup"] >= 5.0,
            }
    for name, ok in goals.items():
        print(f"goal {name}: {'met' if ok else 'NOT met'}")
    report = {
        "image_size": args.image_size,
        "fusion": DEFAULT_FUSION,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "load_average_1_5_15min_at_end": [round(v, 2) for v in os.getloadavg()],
        "platform": platform.platform(),
        "goals": goals,
        "results": results,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
