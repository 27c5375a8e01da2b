"""clipsam.runtime's numpy operations against the operations of the PyTorch path they replace
(PyTorch, OpenCV, Pillow, segment_anything, clipsam's own torch functions)."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from clipsam.runtime import ops, refine


@pytest.mark.parametrize(("shape", "size"), [((7, 9), (16, 16)), ((64, 48), (30, 50)), ((256, 256), (1024, 1024)), ((5, 5), (5, 5))])
def test_resize_bilinear_is_torch_interpolate(shape: tuple[int, int], size: tuple[int, int]) -> None:
    x = np.random.default_rng(0).standard_normal((2, *shape)).astype(np.float32)
    want = F.interpolate(torch.from_numpy(x)[None], size=size, mode="bilinear", align_corners=False)[0].numpy()
    np.testing.assert_allclose(ops.resize_bilinear(x, *size), want, atol=2e-6)


@pytest.mark.parametrize(("shape", "size"), [((50, 70), (224, 224)), ((300, 200), (97, 131)), ((33, 33), (240, 240))])
def test_cv2_resizes(shape: tuple[int, int], size: tuple[int, int]) -> None:
    rng = np.random.default_rng(1)
    scores = rng.random(shape).astype(np.float32)
    want = cv2.resize(scores, (size[1], size[0]), interpolation=cv2.INTER_LINEAR)
    # OpenCV's own rounding of the source index differs in a few rows: within 2e-5 of it
    np.testing.assert_allclose(ops.cv2_linear_resize(scores, *size), want, atol=2e-5)
    mask = (rng.random(shape) > 0.7).astype(np.uint8)
    want_mask = cv2.resize(mask, (size[1], size[0]), interpolation=cv2.INTER_NEAREST)
    np.testing.assert_array_equal(ops.cv2_nearest_resize(mask, *size), want_mask)


@pytest.mark.parametrize(("shape", "size"), [((100, 80), 64), ((40, 60), 96), ((64, 64), 64)])
def test_antialiased_bicubic_is_torch(shape: tuple[int, int], size: int) -> None:
    image = np.random.default_rng(2).integers(0, 256, (*shape, 3), dtype=np.uint8)
    pixels = torch.from_numpy(image).permute(2, 0, 1).float()[None] / 255.0
    want = pixels if shape == (size, size) else F.interpolate(pixels, size=(size, size), mode="bicubic", antialias=True)
    np.testing.assert_allclose(ops.antialiased_bicubic(image, size), want[0].numpy(), atol=2e-5)


def test_normalisations_are_the_frame_transform_and_normalize_clip() -> None:
    from clipsam.data.transforms import build_transform
    from clipsam.inputs import CLIP_MEAN, CLIP_STD, normalize_clip

    image = np.random.default_rng(3).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    frame = build_transform(32)(image=image, mask=np.zeros((32, 32), np.uint8))["image"].numpy()
    np.testing.assert_allclose(ops.normalize(image, list(CLIP_MEAN), list(CLIP_STD), "albumentations"), frame, atol=1e-6)
    want = normalize_clip(torch.from_numpy(image).permute(2, 0, 1).float() / 255.0).numpy()
    np.testing.assert_allclose(ops.normalize(image, list(CLIP_MEAN), list(CLIP_STD), "clipsam"), want, atol=1e-6)


@pytest.mark.parametrize("shape", [(48, 64), (64, 48), (20, 20)])
def test_sam_input_is_build_sam_input(shape: tuple[int, int]) -> None:
    from clipsam.inputs import build_sam_input

    image = np.random.default_rng(4).integers(0, 256, (*shape, 3), dtype=np.uint8)
    got, size = ops.sam_input(image, 64)
    want, want_size = build_sam_input(image, 64)
    np.testing.assert_array_equal(got, want.numpy())
    np.testing.assert_array_equal(size, want_size.numpy())


@pytest.mark.parametrize(("shape", "size"), [("ellipse", 25), ("rect", 20), ("cross", 7), ("ellipse", 4)])
def test_dilate_is_cv2(shape: str, size: int) -> None:
    from clipsam.prompting import structuring_element

    kernel = structuring_element(shape, size).numpy()
    mask = np.random.default_rng(5).random((60, 50)) > 0.97
    mask[0, 0] = mask[-1, -1] = True  # the borders
    want = cv2.dilate(mask.astype(np.uint8), kernel.astype(np.uint8)) > 0
    np.testing.assert_array_equal(ops.dilate(mask, kernel), want)


def test_connected_components_are_cv2s() -> None:
    """The same 8-connected components as OpenCV (its numbering follows its block scan; ours the
    raster order of each component's first pixel, which only orders regions of equal peak)."""
    mask = np.random.default_rng(6).random((40, 50)) > 0.6
    count, labels = ops.connected_components(mask)
    want_count, want = cv2.connectedComponents(mask.astype(np.uint8), connectivity=8)
    assert count == want_count
    pairs = set(zip(labels.ravel().tolist(), want.ravel().tolist()))
    assert len(pairs) == count  # one OpenCV label per label of ours: the same partition
    assert (0, 0) in pairs


@pytest.mark.parametrize("similarity_to", ["mean", "max"])
@pytest.mark.parametrize("sampling", ["bilinear", "nearest"])
@pytest.mark.parametrize("extent", [(16.0, 16.0), (12.0, 16.0)])
def test_ppg_is_generate_point_prompts(similarity_to: str, sampling: str, extent: tuple[float, float]) -> None:
    from clipsam.prompting import generate_point_prompts_batched, structuring_element

    rng = np.random.default_rng(7)
    for trial in range(4):
        amap = rng.random((40, 40)).astype(np.float32) * 0.6
        amap[10:16, 20:27] += 0.5  # one anomaly, and (trial 3) a second
        if trial == 3:
            amap[30:33, 3:6] += 0.6
        amap = np.clip(amap, 0, 1)
        features = rng.standard_normal((8, 16, 16)).astype(np.float32)
        prompt = {
            "num_positive": 3, "num_negative": 4, "threshold": 0.7 if trial else 0.99, "kernel_shape": "ellipse",
            "kernel_size": 7, "similarity_to": similarity_to, "feature_sampling": sampling,
        }  # fmt: skip
        kernel = structuring_element("ellipse", 7).numpy()
        got = refine.ppg(amap, features, extent, prompt, kernel)
        want = generate_point_prompts_batched(
            torch.from_numpy(amap)[None], torch.from_numpy(features)[None],
            feature_extent=torch.tensor([extent], dtype=torch.float64), **prompt,
        )  # fmt: skip
        np.testing.assert_array_equal(got[1], want[1][0].numpy())
        np.testing.assert_array_equal(got[0], want[0][0].numpy())


def test_fusion_is_fuse_scores() -> None:
    from clipsam.fusion import FUSION_METHODS, fuse_scores

    rng = np.random.default_rng(8)
    amap, probs = rng.random((9, 9)).astype(np.float32), rng.random((9, 9)).astype(np.float32)
    mask = probs > 0.5
    for method in FUSION_METHODS:
        want = fuse_scores(torch.from_numpy(amap), torch.from_numpy(probs), torch.from_numpy(mask), method=method).numpy()
        np.testing.assert_allclose(refine.fuse_scores(amap, probs, mask, method), want, atol=1e-7, err_msg=method)


def test_postprocess_logits_is_sam_postprocess_masks() -> None:
    from segment_anything.modeling import Sam

    low = np.random.default_rng(9).standard_normal((1, 64, 64)).astype(np.float32)

    class _Encoder:
        img_size = 256

    sam = Sam.__new__(Sam)  # postprocess_masks reads only image_encoder.img_size
    object.__setattr__(sam, "_modules", {})
    sam.__dict__["image_encoder"] = _Encoder()
    want = Sam.postprocess_masks(sam, torch.from_numpy(low)[None], (192, 256), (150, 200))[0].numpy()
    np.testing.assert_allclose(refine.postprocess_logits(low, 256, (192, 256), (150, 200)), want, atol=1e-5)


@pytest.mark.parametrize("resize", ["torch_bicubic", "pil_bicubic"])
def test_the_producer_inputs_are_build_inputs(resize: str) -> None:
    """What the runtime feeds a producer equals clipsam.inputs.build_input for the same spec."""
    from clipsam.inputs import CLIP_MEAN, CLIP_STD, InputSpec, build_input

    image = np.random.default_rng(10).integers(0, 256, (90, 70, 3), dtype=np.uint8)
    want = build_input(image, InputSpec(key="method_image", size=48, resize=resize))["method_image"].numpy()
    if resize == "torch_bicubic":
        got = ops.normalize_unit(ops.antialiased_bicubic(image, 48), list(CLIP_MEAN), list(CLIP_STD))
    else:
        got = ops.normalize(ops.pil_resize(image, 48, 48), list(CLIP_MEAN), list(CLIP_STD), "clipsam")
    np.testing.assert_allclose(got, want, atol=1e-4)
