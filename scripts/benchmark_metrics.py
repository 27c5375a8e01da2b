"""Benchmark clipsam's exact pixel metrics against torchmetrics' exact ones.

Synthetic anomaly maps shaped like the VisA test set at 256 x 256 (2162 maps, 141.7M pixels,
about 3% anomalous pixels; smooth float32 scores with blobs and noise, a third of the maps
quantised to 1/255 steps so scores tie) are written once to a temporary directory. Each measured
part then runs in its own subprocess, which loads the arrays and reports its wall time and its
own peak RSS (``VmHWM``), so peaks never mix:

* ``clipsam``: ``clipsam.metrics.pixel_metrics(scores, labels)`` on all pixels;
* ``torchmetrics``: ``BinaryAUROC``, ``BinaryAveragePrecision`` and
  ``BinaryPrecisionRecallCurve`` with ``thresholds=None`` (exact), updated batch by batch as in a
  test loop (the same batch tensors are given to the three metrics; targets as uint8), then
  computed; F1-max is the maximum of ``2 P R / (P + R)`` over the PR curve;
* ``clipsam_collection`` (information only): ``PerCategoryMetrics`` over 12 categories, updated
  batch by batch and computed (pixel + image metrics).

The peak RSS includes the loaded inputs (about 0.7 GB at full scale). Results are printed and
written as JSON.

Usage:
    python scripts/benchmark_metrics.py                  # full size, runs/benchmarks/metrics.json
    python scripts/benchmark_metrics.py --scale 0.05     # a quick, smaller variant
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

NUM_MAPS = 2162  # VisA test split
NUM_CATEGORIES = 12
BATCH = 32


def generate(num_maps: int, size: int, seed: int, out_dir: Path) -> dict:
    """Write scores.npy (float32 N x H x W in [0, 1]) and labels.npy (bool) to ``out_dir``."""
    import torch
    import torch.nn.functional as F

    rng = np.random.default_rng(seed)
    scores = np.lib.format.open_memmap(out_dir / "scores.npy", mode="w+", dtype=np.float32, shape=(num_maps, size, size))
    labels = np.lib.format.open_memmap(out_dir / "labels.npy", mode="w+", dtype=np.bool_, shape=(num_maps, size, size))
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    anomalous = rng.random(num_maps) < 0.55  # VisA: about 1200 of 2162 test images are anomalous
    chunk = 64
    for start in range(0, num_maps, chunk):
        n = min(chunk, num_maps - start)
        low = torch.from_numpy(rng.random((n, 1, 8, 8), dtype=np.float32))
        smooth = F.interpolate(low, size=(size, size), mode="bicubic", align_corners=False)[:, 0].numpy()
        s = 0.25 + 0.2 * smooth + 0.08 * rng.standard_normal((n, size, size), dtype=np.float32)
        m = np.zeros((n, size, size), dtype=bool)
        for i in range(n):
            if not anomalous[start + i]:
                continue
            for _ in range(rng.integers(1, 3)):
                cy, cx = rng.random(2)
                ry, rx = rng.uniform(0.05, 0.19, size=2)
                d2 = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2
                m[i] |= d2 <= 1.0
                s[i] += rng.uniform(0.1, 0.5) * np.exp(-0.7 * d2)  # signal bleeds past the region
        np.clip(s, 0.0, 1.0, out=s)  # torchmetrics applies a sigmoid to scores outside [0, 1]
        quantised = rng.random(n) < 1 / 3
        s[quantised] = np.round(s[quantised] * 255) / 255
        scores[start : start + n] = s
        labels[start : start + n] = m
    info = {"num_maps": num_maps, "size": size, "pixels": int(labels.size), "positive_fraction": float(labels.mean())}
    scores.flush()
    labels.flush()
    del scores, labels
    return info


def _peak_rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    import resource  # pragma: no cover - non-Linux fallback

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def worker(kind: str, data_dir: Path) -> dict:
    """Run one measured part in this (fresh) process and return its figures."""
    import torch

    scores = np.load(data_dir / "scores.npy")
    labels = np.load(data_dir / "labels.npy")
    rss_loaded = _peak_rss_mb()
    out: dict = {}
    if kind == "clipsam":
        from clipsam.metrics import pixel_metrics

        t0 = time.perf_counter()
        values = pixel_metrics(torch.from_numpy(scores), torch.from_numpy(labels))
        out["seconds"] = time.perf_counter() - t0
    elif kind == "torchmetrics":
        from torchmetrics.classification import BinaryAUROC, BinaryAveragePrecision, BinaryPrecisionRecallCurve

        metrics = [
            BinaryAUROC(thresholds=None),
            BinaryAveragePrecision(thresholds=None),
            BinaryPrecisionRecallCurve(thresholds=None),
        ]
        t0 = time.perf_counter()
        for i in range(0, scores.shape[0], BATCH):
            preds = torch.from_numpy(scores[i : i + BATCH].copy())  # a fresh batch, as from a model
            target = torch.from_numpy(labels[i : i + BATCH].view(np.uint8).copy())
            for m in metrics:
                m.update(preds, target)
        out["update_seconds"] = time.perf_counter() - t0
        auroc = float(metrics[0].compute())
        ap = float(metrics[1].compute())
        precision, recall, _ = metrics[2].compute()
        f1 = torch.nan_to_num(2 * precision.double() * recall.double() / (precision.double() + recall.double()))
        values = {"auroc": auroc, "f1_max": float(f1.max()), "ap": ap}
        out["seconds"] = time.perf_counter() - t0
    elif kind == "clipsam_collection":
        from clipsam.metrics import PerCategoryMetrics

        n = scores.shape[0]
        categories = [f"category_{c:02d}" for c in range(NUM_CATEGORIES)]
        category_of = np.repeat(np.arange(NUM_CATEGORIES), -(-n // NUM_CATEGORIES))[:n]
        metric = PerCategoryMetrics(categories)
        t0 = time.perf_counter()
        for i in range(0, n, BATCH):
            maps = torch.from_numpy(scores[i : i + BATCH].copy())
            masks = torch.from_numpy(labels[i : i + BATCH].copy())
            b = maps.shape[0]
            metric.update(
                anomaly_maps=maps,
                masks=masks,
                image_scores=maps.amax(dim=(1, 2)),
                labels=masks.flatten(1).any(dim=1).long(),
                category_ids=torch.from_numpy(category_of[i : i + b]),
                sample_ids=torch.arange(i, i + b),
                has_mask=torch.ones(b, dtype=torch.bool),
            )
        out["update_seconds"] = time.perf_counter() - t0
        result = metric.compute()
        out["seconds"] = time.perf_counter() - t0
        values = {k: result["mean"][f"pixel_{k}"] for k in ("auroc", "f1_max", "ap")}
        out["note"] = "mean over 12 categories (not comparable with the all-pixel values)"
    else:
        raise ValueError(f"unknown worker {kind!r}")
    out.update(values=values, peak_rss_mb=_peak_rss_mb(), rss_after_loading_inputs_mb=rss_loaded)
    return out


def run_worker(kind: str, data_dir: Path) -> dict:
    cmd = [sys.executable, __file__, "--worker", kind, "--data", str(data_dir)]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"worker {kind} failed:\n{proc.stderr}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["process_seconds"] = time.perf_counter() - t0
    return result


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scale", type=float, default=1.0, help="fraction of the 2162 VisA test maps (default 1)")
    parser.add_argument("--size", type=int, default=256, help="map side in pixels (default 256)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("runs/benchmarks/metrics.json"))
    parser.add_argument("--skip-collection", action="store_true", help="do not time PerCategoryMetrics")
    parser.add_argument(
        "--skip-torchmetrics",
        action="store_true",
        help="time clipsam only (e.g. --size 518: the full VisA test set at the default frame, "
        "where torchmetrics exact would need ~25 GB)",
    )
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--data", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.worker:
        print(json.dumps(worker(args.worker, args.data)))
        return {}

    num_maps = max(NUM_CATEGORIES, round(NUM_MAPS * args.scale))
    with tempfile.TemporaryDirectory(prefix="clipsam-bench-") as tmp:
        t0 = time.perf_counter()
        data = generate(num_maps, args.size, args.seed, Path(tmp))
        data["generation_seconds"] = time.perf_counter() - t0
        print(f"data: {data['num_maps']} maps of {args.size}x{args.size} = {data['pixels'] / 1e6:.1f}M pixels, "
              f"{100 * data['positive_fraction']:.2f}% positive")
        kinds = ["clipsam"] + ([] if args.skip_torchmetrics else ["torchmetrics"])
        kinds += [] if args.skip_collection else ["clipsam_collection"]
        results = {}
        for kind in kinds:
            results[kind] = run_worker(kind, Path(tmp))
            r = results[kind]
            print(f"{kind:>20}: {r['seconds']:7.2f} s  peak RSS {r['peak_rss_mb'] / 1024:5.2f} GB  {r['values']}")

    machine = {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()}
    if args.skip_torchmetrics:
        report = {"data": data, "machine": machine, "results": results}
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {args.out}")
        return report
    ours, ref = results["clipsam"], results["torchmetrics"]
    diff = {k: abs(ours["values"][k] - ref["values"][k]) for k in ("auroc", "f1_max", "ap")}
    report = {
        "data": data,
        "machine": machine,
        "results": results,
        "speedup_vs_torchmetrics_exact": ref["seconds"] / ours["seconds"],
        "peak_rss_ratio": ref["peak_rss_mb"] / ours["peak_rss_mb"],
        "max_abs_diff": diff,
        "goals": {
            "speedup_at_least_5x": ref["seconds"] / ours["seconds"] >= 5,
            "clipsam_peak_rss_at_most_3gb": ours["peak_rss_mb"] <= 3 * 1024,
            "values_equal_to_1e-6": max(diff.values()) <= 1e-6,
        },
    }
    print(f"speed-up {report['speedup_vs_torchmetrics_exact']:.1f}x, peak RSS {ours['peak_rss_mb']:.0f} MB vs "
          f"{ref['peak_rss_mb']:.0f} MB, max |diff| {max(diff.values()):.2e}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")
    return report


if __name__ == "__main__":
    main()
