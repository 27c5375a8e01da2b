"""The paper's real architectures, with random weights (the weights cannot be downloaded here).

Marked ``slow`` (about a minute on 2 CPU cores): run with ``make test-all``. They check that the
default config builds ViT-L-14-336 at 518 x 518 (positional embedding interpolated to a 37 x 37
grid) with the APRIL-GAN adapters, and that SAM vit_h runs PPG and the three-step cascade on a
518 x 518 frame.
"""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.slow


def test_vit_l_14_336_at_518_with_four_adapters() -> None:
    from clipsam.models.clip import ClipConfig, build_clip_model

    model = build_clip_model(ClipConfig(pretrained=None), image_size=518)
    assert model.adapter_shapes == [(1024, 768)] * 4
    adapter_bytes = sum(v.numel() * v.element_size() for v in model.adapter_state_dict().values())
    assert 12e6 < adapter_bytes < 13e6  # "about 13 MB"
    with torch.no_grad():
        out = model(torch.randn(1, 3, 518, 518), ["metal_nut"])
    assert out.layer_probs.shape == (1, 4, 2, 518, 518)
    assert out.anomaly_map.shape == (1, 518, 518)
    assert 0.0 <= float(out.anomaly_map.min()) <= float(out.anomaly_map.max()) <= 1.0


def test_sam_vit_h_runs_ppg_and_the_cascade_on_a_518_frame() -> None:
    from clipsam.cascade import CascadeConfig
    from clipsam.models.sam import SamConfig, build_sam
    from clipsam.refiners.ppg_cps import SamRefiner
    from clipsam.prompting import PromptConfig

    sam = build_sam(SamConfig(variant="vit_h"), pretrained=False)  # random weights, same classes
    refiner = SamRefiner(sam=sam, prompt=PromptConfig(), cascade=CascadeConfig())
    image = torch.randint(0, 256, (3, 518, 518), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    anomaly_map = torch.zeros(518, 518)
    anomaly_map[200:260, 300:340] = 0.9
    out = refiner.refine(image, anomaly_map)
    assert len(out.steps) == 3
    assert out.steps[2].box is not None or not bool(out.steps[1].mask.any())
    assert out.mask.shape == (518, 518) and out.mask_probs.shape == (518, 518)
    assert int((out.point_labels == 1).sum()) == 5 and int((out.point_labels == 0).sum()) == 5
