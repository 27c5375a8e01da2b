"""MMR refiner of ClipSAM-rec (clipsam.refiners.mmr): prompts on a known map, merging, SAM end to end."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from segment_anything import SamPredictor

from clipsam.inputs import build_sam_input
from clipsam.errors import ConfigError
from clipsam.refiners import mmr
from clipsam.refiners.mmr import MmrConfig, MmrRefiner, connected_regions, merge_region_probs, region_prompts
from clipsam.models.sam import SamConfig, build_sam_tiny

FRAME = (32, 40)  # (H, W)


def _known_map() -> torch.Tensor:
    """Three blobs above tau = 0.5.

    A: rows 4-9, cols 5-12 at 0.7 (48 px), peak 0.9 at (row 6, col 8), a 0.85 at (row 8, col 11).
    B: two 3x3 blocks touching only at a corner, rows 20-22 x cols 20-22 at 0.6 and rows 23-25 x
       cols 23-25 at 0.8 (one 8-connected component of 18 px; two 4-connected ones).
    C: 2x2 at 0.95, rows 28-29, cols 2-3 (4 px).
    Everything else 0.2; one pixel at exactly 0.5 next to A (row 10, col 5) belongs to A.
    """
    amap = torch.full(FRAME, 0.2)
    amap[4:10, 5:13] = 0.7
    amap[6, 8] = 0.9
    amap[8, 11] = 0.85
    amap[10, 5] = 0.5
    amap[20:23, 20:23] = 0.6
    amap[23:26, 23:26] = 0.8
    amap[28:30, 2:4] = 0.95
    return amap


def test_connected_regions_on_a_known_map():
    amap = _known_map()
    regions = connected_regions(amap, threshold=0.5, min_area=5)
    assert [int(r.sum()) for r in regions] == [49, 18]  # A (+ the pixel at tau) then B; C dropped
    assert bool(regions[0][10, 5]) and bool(regions[0][6, 8])
    assert bool(regions[1][22, 22]) and bool(regions[1][23, 23])
    # min_area 4 keeps C, whose peak 0.95 ranks it first
    sizes = [int(r.sum()) for r in connected_regions(amap, threshold=0.5, min_area=4)]
    assert sizes == [4, 49, 18]
    # the cap keeps the highest peaks
    capped = connected_regions(amap, threshold=0.5, min_area=4, max_regions=2)
    assert [int(r.sum()) for r in capped] == [4, 49]
    # tau above everything but C and A's peaks
    assert [int(r.sum()) for r in connected_regions(amap, threshold=0.86, min_area=1)] == [4, 1]
    assert connected_regions(torch.zeros(FRAME), threshold=0.5, min_area=1) == []


def test_region_prompts_box_and_top_k_points():
    amap = _known_map()
    region_a, region_b = connected_regions(amap, threshold=0.5, min_area=5)
    prompts = region_prompts(amap, region_a, top_k=2)
    assert prompts.points.tolist() == [[8.0, 6.0], [11.0, 8.0]]  # (x, y), highest first
    assert prompts.box.tolist() == [5.0, 4.0, 12.0, 10.0]  # XYXY inclusive; row 10 from the tau pixel
    assert prompts.points.dtype == torch.float32 and prompts.box.dtype == torch.float32
    prompts_b = region_prompts(amap, region_b, top_k=2)
    # ties at 0.8: raster order, (row 23, col 23) then (row 23, col 24)
    assert prompts_b.points.tolist() == [[23.0, 23.0], [24.0, 23.0]]
    assert prompts_b.box.tolist() == [20.0, 20.0, 25.0, 25.0]
    single = torch.zeros(FRAME, dtype=torch.bool)
    single[3, 7] = True
    assert region_prompts(amap, single, top_k=5).points.tolist() == [[7.0, 3.0]]  # K capped by size
    with pytest.raises(ValueError, match="empty"):
        region_prompts(amap, torch.zeros(FRAME, dtype=torch.bool), top_k=1)


def test_merge_region_probs_mean_then_max():
    r1 = torch.tensor([[[0.2, 0.9]], [[0.4, 0.1]]])  # (M=2, H=1, W=2): mean [0.3, 0.5]
    r2 = torch.tensor([[[1.0, 0.0]], [[0.0, 0.6]]])  # mean [0.5, 0.3]
    merged = merge_region_probs([r1, r2], (1, 2))
    assert torch.allclose(merged, torch.tensor([[0.5, 0.5]]))
    assert torch.allclose(merge_region_probs([r1], (1, 2)), torch.tensor([[0.3, 0.5]]))
    empty = merge_region_probs([], (3, 4))
    assert empty.shape == (3, 4) and empty.dtype == torch.float32 and not empty.any()


def test_config_errors_name_the_key():
    with pytest.raises(ConfigError, match="model.refiner_config.prompt_sets"):
        MmrConfig(prompt_sets=["points", "mask"])
    with pytest.raises(ConfigError, match="model.refiner_config.top_k"):
        MmrConfig(top_k=0)
    assert mmr.CONFIG is MmrConfig


@pytest.fixture(scope="module")
def tiny_sam():
    return build_sam_tiny(seed=0)


def _image(seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (3, *FRAME), dtype=torch.uint8, generator=gen)


def _sam_batch(images_uint8: torch.Tensor, side: int = 256) -> dict[str, torch.Tensor]:
    """The batch keys MMR reads: SAM's input of each ORIGINAL image (here: the frame itself)."""
    built = [build_sam_input(img.permute(1, 2, 0).numpy(), side) for img in images_uint8]
    return {
        "sam_image": torch.stack([b[0] for b in built]),
        "sam_size": torch.stack([b[1] for b in built]),
        "original_size": torch.tensor([list(images_uint8.shape[-2:])] * images_uint8.shape[0]),
    }


def test_refine_matches_sam_predictor_on_the_nine_prompt_combinations(tiny_sam):
    """Per region: SamPredictor.predict for points, box, points + box (3 masks each)."""
    image = _image(1)
    amap = _known_map()
    cfg = MmrConfig(min_area=5, top_k=2)
    refiner = MmrRefiner(sam=tiny_sam, config=cfg)
    out = refiner.refine_batch(_sam_batch(image[None]), amap[None])

    predictor = SamPredictor(tiny_sam)
    predictor.set_image(image.permute(1, 2, 0).numpy())
    expected = []
    for region in connected_regions(amap, threshold=0.5, min_area=5):
        p = region_prompts(amap, region, top_k=2)
        pts, box = p.points.numpy(), p.box.numpy()
        logits = [
            predictor.predict(point_coords=pts, point_labels=[1, 1], multimask_output=True, return_logits=True)[0],
            predictor.predict(box=box, multimask_output=True, return_logits=True)[0],
            predictor.predict(
                point_coords=pts, point_labels=[1, 1], box=box, multimask_output=True, return_logits=True
            )[0],
        ]  # 3 x (3, H, W)
        expected.append(torch.sigmoid(torch.from_numpy(np.concatenate(logits))).mean(0))
    expected_probs = torch.stack(expected).amax(0)
    assert out.mask_probs.shape == (1, *FRAME) and out.mask_probs.dtype == torch.float32
    assert torch.allclose(out.mask_probs[0], expected_probs, atol=1e-5)
    assert torch.equal(out.mask[0], expected_probs > 0.5)
    assert out.mask.dtype == torch.bool
    assert set(out.timings) == {"sam_encoder", "mmr_decoder"}


def test_refine_batch_empty_map_and_one_prompt_set(tiny_sam):
    images = torch.stack([_image(2), _image(3)])
    amaps = torch.stack([torch.full(FRAME, 0.1), _known_map()])
    full = MmrRefiner(sam=tiny_sam, config=MmrConfig(min_area=5)).refine_batch(_sam_batch(images), amaps)
    assert not full.mask[0].any() and not full.mask_probs[0].any()  # no region: nothing prompted
    assert full.mask_probs[1].max() > 0
    boxes_only = MmrRefiner(sam=tiny_sam, config=MmrConfig(min_area=5, prompt_sets=["box"])).refine_batch(_sam_batch(images), amaps)
    assert not torch.allclose(boxes_only.mask_probs[1], full.mask_probs[1])  # the prompt sets matter
    with pytest.raises(ValueError, match="do not match"):
        MmrRefiner(sam=tiny_sam, config=MmrConfig()).refine_batch(_sam_batch(images), amaps[:1])


def test_build_uses_the_configured_sam():
    from clipsam.refiners import build_refiner

    refiner = build_refiner("mmr", {"sam": {"variant": "tiny", "seed": 0}, "top_k": 3})
    assert isinstance(refiner, MmrRefiner) and refiner.name == "mmr" and refiner.config.top_k == 3
    reference = build_sam_tiny(seed=0)
    assert all(torch.equal(a, b) for a, b in zip(refiner.sam.state_dict().values(), reference.state_dict().values()))
    assert mmr.build(sam=SamConfig(variant="tiny")).config == MmrConfig()
    with pytest.raises(ConfigError, match="model.refiner_config.tau"):
        build_refiner("mmr", {"sam": {"variant": "tiny"}, "tau": 0.3})
    assert not any(p.requires_grad for p in refiner.parameters())
    refiner.train()
    assert not refiner.sam.training
