"""The accelerator paths of the SAM stage equal the CPU paths (marker ``gpu``; skipped without CUDA).

What runs only on an accelerator in ``clipsam test``: the dense PPG strategy (the CPU picks the
compact one), the torch dilation (the CPU uses OpenCV), the SDPA attention kernels, the batched
cascade on the device and the whole ``Trainer.test`` loop with a CUDA accelerator. Each is
compared with the CPU computation the rest of the suite checks against its references.

Run: ``pytest -m gpu tests/gpu`` on a machine with CUDA (``scripts/device_check.sh`` runs it
with the benchmarks). ``CLIPSAM_GPU_TESTS_ON_CPU=1`` runs the same comparisons with the CPU as
the "device", which checks the tests themselves on a machine without a GPU.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

from clipsam.cascade import CascadeConfig
from clipsam.data.transforms import build_sam_input
from clipsam.models.sam import SamConfig, build_sam
from clipsam.refiners.ppg_cps import SamRefiner
from clipsam.prompting import PromptConfig, dilate, generate_point_prompts_batched, structuring_element

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def device() -> torch.device:
    if torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = False  # fp32 comparisons: no TF32 matrix products
        torch.backends.cudnn.allow_tf32 = False
        return torch.device("cuda")
    if os.environ.get("CLIPSAM_GPU_TESTS_ON_CPU") == "1":
        return torch.device("cpu")
    pytest.skip("needs a CUDA device (or CLIPSAM_GPU_TESTS_ON_CPU=1 for a dry run on the CPU)")


def _blob_maps(batch: int, size: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    ys, xs = torch.meshgrid(torch.arange(size).float(), torch.arange(size).float(), indexing="ij")
    maps = []
    for i in range(batch):
        cy, cx = (torch.rand(2, generator=gen) * 0.8 + 0.1) * size
        blob = torch.exp(-((ys - cy) ** 2 + (xs - cx) ** 2) / (2 * (size / 8) ** 2))
        maps.append((blob + 0.05 * torch.rand(size, size, generator=gen)).clamp(0, 1) if i % 4 != 3 else torch.zeros(size, size))
    return torch.stack(maps)


def test_dense_ppg_on_the_device_equals_compact_ppg_on_the_cpu(device):
    """The accelerator's PPG picks the same points, in the same order, as the CPU's."""
    maps = _blob_maps(8, 130, seed=0)
    feats = torch.randn(8, 32, 16, 16, generator=torch.Generator().manual_seed(1))
    extent = torch.tensor([[16.0, 16.0], [9.5, 16.0], [16.0, 11.25], [16.0, 16.0]] * 2, dtype=torch.float64)
    kwargs = dict(num_positive=5, num_negative=5, threshold=0.5, kernel_shape="ellipse", kernel_size=25)
    cpu = generate_point_prompts_batched(maps, feats, feature_extent=extent, strategy="compact", **kwargs)
    on_device = generate_point_prompts_batched(
        maps.to(device), feats.to(device), feature_extent=extent.to(device), strategy="auto" if device.type == "cuda" else "dense", **kwargs
    )
    assert on_device[0].device.type == device.type
    assert torch.equal(on_device[0].cpu(), cpu[0]) and torch.equal(on_device[1].cpu(), cpu[1])
    assert (cpu[1] == 0).any() and (cpu[1] == 1).any(), "the test needs positives and negatives"


@pytest.mark.parametrize("shape, size", [("ellipse", 25), ("rect", 20), ("cross", 7)])
def test_dilation_on_the_device_equals_opencv(device, shape, size):
    masks = torch.rand(4, 97, 131, generator=torch.Generator().manual_seed(size)) > 0.995
    kernel = structuring_element(shape, size)
    expected = dilate(masks, kernel, backend="cv2")
    got = dilate(masks.to(device), kernel, backend="torch")
    assert got.device.type == device.type and torch.equal(got.cpu(), expected)


def test_sam_stage_on_the_device_equals_the_cpu(device):
    """Encoder (SDPA attention), PPG and the batched cascade on the device against the CPU."""
    sam_cpu = build_sam(SamConfig(variant="tiny", seed=2))
    sam_dev = build_sam(SamConfig(variant="tiny", seed=2)).to(device)
    prompt = PromptConfig(num_positive=3, num_negative=3, threshold=0.5, kernel_size=9)
    refiners = [SamRefiner(sam=s, prompt=prompt, cascade=CascadeConfig(num_steps=3)) for s in (sam_cpu, sam_dev)]
    sizes = [(90, 150), (120, 80), (100, 100)]
    gen = torch.Generator().manual_seed(0)
    originals = [torch.randint(40, 200, (h, w, 3), dtype=torch.uint8, generator=gen).numpy() for h, w in sizes]
    built = [build_sam_input(np.ascontiguousarray(o), refiners[0].side) for o in originals]
    batch = {
        "sam_image": torch.stack([b[0] for b in built]),
        "sam_size": torch.stack([b[1] for b in built]),
        "original_size": torch.tensor(sizes),
    }
    maps = _blob_maps(3, 48, seed=4)
    out_cpu = refiners[0].refine_batch(batch, maps)
    out_dev = refiners[1].refine_batch({k: v.to(device) for k, v in batch.items()}, maps.to(device))
    assert out_dev.mask.device.type == device.type
    torch.testing.assert_close(out_dev.mask_probs.cpu(), out_cpu.mask_probs, rtol=0, atol=1e-3)
    agreement = (out_dev.mask.cpu() == out_cpu.mask).float().mean()
    assert float(agreement) >= 0.999, f"masks agree on {float(agreement):.4%} of the pixels"
    assert out_cpu.mask.any(), "the test needs a non-empty mask"


def test_clipsam_test_runs_on_the_device(device, tmp_path, monkeypatch):
    """``clipsam test`` of the demo config with the accelerator: the whole loop, metrics written."""
    import json

    pytest.importorskip("wandb", reason="the demo config logs to W&B (not carried to the GPU machine)")
    pytest.importorskip("jsonargparse")

    from clipsam.data.synthetic import generate_synthetic
    from tests.integration.conftest import fast_args, run_cli

    root = tmp_path / "synth"
    generate_synthetic(root, image_size=96, num_train_good=1, num_test_good=2, num_test_anomalous=3, seed=0, progress=False)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("CLIPSAM_SYNTH_ROOT", str(root))
    accelerator = "gpu" if device.type == "cuda" else "cpu"
    test = run_cli(["test", *fast_args(tmp_path), f"--trainer.accelerator={accelerator}", "--trainer.devices=1", "--allow_untrained=true"])
    metrics = json.loads((Path(test.trainer.log_dir) / "test_results.json").read_text())
    per_category = metrics["results"]["per_category"]
    assert sorted(per_category) == ["capsule", "mesh", "stripes"]
    assert all(0.0 <= values["pixel_auroc"] <= 1.0 for values in per_category.values())
