"""End-to-end throughput of ``clipsam test``: images/s through the LightningModule's own path.

Runs ``Trainer.test`` (the code ``clipsam test`` runs: DataLoader workers decoding PNGs and
building SAM's input, CLIP forward, ``SamRefiner.refine_batch`` (encoder, PPG, cascade), fusion,
per-category metrics) on a synthetic MVTec-layout data set of ``--original-size`` images, with
random weights at the preset's sizes, for each ``--batch-sizes`` value. Reports images/s over
the batches after the first (warm-up), and ms per image of each stage from the module's own
timers (``Pipeline.timings``; with ``--stage-sync``, the device is synchronised around each
SAM stage so GPU stage times are real, at some cost in overlap). Also times one dataset item
with and without SAM's input (the data-loading cost of encoding the original image).

Presets: ``tiny`` (clipsam-tiny CLIP at 512, SAM tiny), ``vit_b`` (ViT-B-16 at 512, SAM vit_b),
``paper`` (ViT-L-14-336 at 518 with 4 adapters, SAM vit_h; bf16 frozen weights in both, the
setting of issue 11's GPU targets). The CPU presets keep ``ClipConfig``'s default (fp32).

Usage:
    python scripts/benchmark_pipeline.py --device cpu --preset tiny [--batch-sizes 1 8 16]
    python scripts/benchmark_pipeline.py --device cuda --preset paper --sam-compile
Writes runs/benchmarks/pipeline_<preset>_<device>.json (``--out``) and prints it.
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

PRESETS = {
    "tiny": {"clip": ("clipsam-tiny", [1, 2, 3, 4]), "frame": 512, "sam": "tiny", "sam_dtype": "float32"},
    "vit_b": {"clip": ("ViT-B-16", [3, 6, 9, 12]), "frame": 512, "sam": "vit_b", "sam_dtype": "float32"},
    # issue 11's GPU setting: bf16 frozen weights in both stages
    "paper": {"clip": ("ViT-L-14-336", [6, 12, 18, 24]), "frame": 518, "sam": "vit_h", "sam_dtype": "bfloat16", "clip_dtype": "bfloat16"},
}


def _module(preset: dict, args: argparse.Namespace):
    from clipsam.cascade import CascadeConfig
    from clipsam.models.clip import ClipConfig
    from clipsam.models.sam import SamConfig, build_sam
    from clipsam.refiners.ppg_cps import SamRefiner
    from clipsam.module import ClipSamModule, EvalConfig
    from clipsam.prompting import PromptConfig

    import dataclasses
    import inspect

    name, layers = preset["clip"]
    # Keys an older clipsam lacks are left out, so the same script measures it (--compare).
    known = {f.name for f in dataclasses.fields(SamConfig)}
    extra = {"sdpa_attention": not args.no_sdpa, "compile": args.sam_compile}
    sam_config = SamConfig(variant=preset["sam"], dtype=preset["sam_dtype"], **{k: v for k, v in extra.items() if k in known})
    module = ClipSamModule(
        clip=ClipConfig(model_name=name, pretrained=None, layers=layers, **({"frozen_dtype": preset["clip_dtype"]} if "clip_dtype" in preset else {})),
        sam=sam_config,
        evaluation=EvalConfig(num_overlays=0),
        image_size=preset["frame"],
    )
    # SAM with random weights at the real sizes (no download); configure_model keeps it.
    kwargs = {"compile_encoder": args.sam_compile} if "compile_encoder" in inspect.signature(SamRefiner).parameters else {}
    refiner = SamRefiner(sam=build_sam(sam_config, pretrained=False), prompt=PromptConfig(), cascade=CascadeConfig(), **kwargs)
    setattr(getattr(module, "pipeline", module), "refiner", refiner)  # older clipsam: the module holds it
    refiner.sync_timings = args.stage_sync
    return module


def _timings_of(module):
    pipeline = getattr(module, "pipeline", None)
    return pipeline.timings if pipeline is not None else module._timings


def _timer_callback():
    from lightning.pytorch.callbacks import Callback

    class Timer(Callback):
        def __init__(self) -> None:
            self.ends: list[float] = []
            self.cpu_ends: list[float] = []
            self.sizes: list[int] = []
            self.first_timings: dict[str, float] = {}
            self.start = 0.0

        def on_test_start(self, trainer, pl_module) -> None:
            self.start = time.perf_counter()

        def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
            if pl_module.device.type == "cuda":
                torch.cuda.synchronize(pl_module.device)
            self.ends.append(time.perf_counter())
            self.cpu_ends.append(time.process_time())
            self.sizes.append(len(batch["path"]))
            if batch_idx == 0:
                self.first_timings = dict(_timings_of(pl_module))

    return Timer()


def run(preset_name: str, batch_size: int, root: Path, args: argparse.Namespace) -> dict:
    import lightning.pytorch as pl

    from clipsam.data.datamodule import AnomalyDataModule, DatasetSpec

    preset = PRESETS[preset_name]
    module = _module(preset, args)
    datamodule = AnomalyDataModule(
        test=DatasetSpec(format="mvtec", root=str(root)),
        image_size=preset["frame"],
        test_batch_size=batch_size,
        num_workers=args.num_workers,
        validation="off",
    )
    timer = _timer_callback()
    with tempfile.TemporaryDirectory() as out_dir:
        trainer = pl.Trainer(
            accelerator=args.device, devices=1, logger=False, enable_progress_bar=False,
            enable_model_summary=False, default_root_dir=out_dir, callbacks=[timer],
            limit_test_batches=args.batches + 1,
        )
        trainer.test(module, datamodule=datamodule, verbose=False)
    timings = _timings_of(module)
    if len(timer.ends) >= 2:
        images = sum(timer.sizes[1:])
        seconds = timer.ends[-1] - timer.ends[0]
        cpu_seconds = timer.cpu_ends[-1] - timer.cpu_ends[0]
        stages = {k: v - timer.first_timings.get(k, 0.0) for k, v in timings.items()}
    else:
        images, seconds, stages = timer.sizes[0], timer.ends[0] - timer.start, dict(timings)
        cpu_seconds = float("nan")
    per_image_ms = {k: round(1000 * v / images, 3) for k, v in stages.items()}
    ppg_cascade = sum(v for k, v in per_image_ms.items() if k == "ppg" or k.startswith("cascade_step_"))
    return {
        "batch_size": batch_size,
        "timed_images": images,
        "images_per_second": round(images / seconds, 3),
        # CPU seconds of this process per image (all its threads; data loading included only
        # with --num-workers 0): robust to other processes on a shared machine, unlike wall time.
        "process_cpu_ms_per_image": round(1000 * cpu_seconds / images, 3),
        "ms_per_image": per_image_ms,
        "ppg_plus_cascade_ms_per_image": round(ppg_cascade, 3),
    }


def data_cost(root: Path, preset_name: str, repeats: int) -> dict:
    """ms per dataset item (decode + frame transform), without and with SAM's input."""
    from clipsam.data.datamodule import AnomalyDataModule, DatasetSpec

    try:
        from clipsam.models.sam import sam_input_side
    except ImportError:  # an older clipsam: SAM's input was made from the frame in the module
        return {}
    datamodule = AnomalyDataModule(test=DatasetSpec(format="mvtec", root=str(root)), image_size=PRESETS[preset_name]["frame"], validation="off")
    datamodule.setup("test")
    dataset = datamodule.test_dataset
    out = {}
    for label, side in (("without_sam_input", None), ("with_sam_input", sam_input_side(PRESETS[preset_name]["sam"]))):
        dataset.sam_side = side
        times = []
        for i in range(min(repeats, len(dataset))):
            start = time.perf_counter()
            dataset[i]
            times.append(time.perf_counter() - start)
        out[label] = round(1000 * statistics.median(times), 3)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--preset", choices=list(PRESETS), default="tiny")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 16])
    parser.add_argument("--batches", type=int, default=3, help="timed batches per batch size (after 1 warm-up batch)")
    parser.add_argument("--original-size", type=int, default=1024, help="side of the synthetic original images")
    parser.add_argument("--num-workers", type=int, default=2)
    parser.add_argument("--stage-sync", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--no-sdpa", action="store_true", help="segment_anything's own attention")
    parser.add_argument("--sam-compile", action="store_true", help="torch.compile SAM's image encoder")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from clipsam.data.synthetic import generate_synthetic
    from clipsam.models.clip import ClipConfig

    needed = max(args.batch_sizes) * (args.batches + 1)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "synth"
        generate_synthetic(
            root, layouts=("mvtec",), categories=["fabric"], image_size=args.original_size,
            num_train_good=1, num_test_good=needed // 2, num_test_anomalous=needed - needed // 2, progress=False,
        )
        results = [run(args.preset, b, root / "mvtec", args) for b in args.batch_sizes]
        loading = data_cost(root / "mvtec", args.preset, repeats=8)
    device_name = torch.cuda.get_device_name(0) if args.device == "cuda" else platform.processor() or "cpu"
    report = {
        "preset": args.preset,
        "device": args.device,
        "device_name": device_name,
        "original_size": args.original_size,
        "frame": PRESETS[args.preset]["frame"],
        "clip_frozen_dtype": PRESETS[args.preset].get("clip_dtype", ClipConfig.frozen_dtype),
        "sam_dtype": PRESETS[args.preset]["sam_dtype"],
        "sdpa_attention": not args.no_sdpa,
        "sam_compile": args.sam_compile,
        "stage_sync": args.stage_sync,
        "num_workers": args.num_workers,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "load_average_1_5_15min_at_end": [round(v, 2) for v in os.getloadavg()],
        "data_ms_per_item": loading,
        "results": results,
    }
    text = json.dumps(report, indent=2)
    print(text)
    out = Path(args.out or f"runs/benchmarks/pipeline_{args.preset}_{args.device}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
