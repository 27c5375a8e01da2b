"""The SAM stage (PPG + CPS) against segment_anything's ``SamPredictor`` on ORIGINAL, non-square images.

The reference side never calls clipsam: ``SamPredictor.set_image`` on the original image, PPG
written from the equations in numpy/cv2 on ``predictor.features``, then ``SamPredictor.predict``
step by step (``mask_input`` = the previous low-res logits, the box of the previous mask computed
in numpy at the original size), with the real points only (:mod:`sam_stage_reference`).
clipsam's side is ``SamRefiner.refine`` / ``refine_embedded`` / ``refine_batch`` from the image
and the CLIP map.

Models (random weights, fp32): "b", vit_b's geometry (1024 input, 256 x 64 x 64 embedding, the
prompt encoder and mask decoder every SAM variant has) with a one-block image encoder, built by
segment_anything's own builder; clipsam's "tiny" preset (256 input, 16 x 16 grid); the real
``vit_b`` encoder under the ``slow`` marker.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from segment_anything import SamPredictor, sam_model_registry
from segment_anything.build_sam import _build_sam

from clipsam.cascade import CascadeConfig
from clipsam.inputs import build_sam_input
from clipsam.models.sam import SamConfig, build_sam
from clipsam.prompting import PromptConfig
from clipsam.refiners.ppg_cps import SamRefiner
from tests.unit.models import sam_stage_reference as ref

FRAME = (40, 48)  # the evaluation frame (the CLIP map), squashed from the original
PROMPT = {"num_positive": 5, "num_negative": 5, "threshold": 0.5, "kernel_shape": "ellipse", "kernel_size": 9}
LOGIT_ATOL = 1e-5


def _seeded(build, seed):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build().eval()


@pytest.fixture(scope="module")
def models():
    return {
        "b": _seeded(
            lambda: _build_sam(
                encoder_embed_dim=64, encoder_depth=1, encoder_num_heads=2, encoder_global_attn_indexes=[]
            ),
            seed=0,
        ),
        "tiny": build_sam(SamConfig(variant="tiny", seed=2)),
    }


# ---------------------------------------------------------------------------------- inputs
def _original(height, width, seed):
    """(H0, W0, 3) uint8: noise with a bright, noisy blob at (0.4 H0, 0.6 W0).

    No flat areas: equal SAM features would make equal similarities, whose order then rests on
    rounding.
    """
    rng = np.random.default_rng(seed)
    image = rng.integers(40, 120, (height, width, 3), dtype=np.uint8)
    ys, xs = np.mgrid[:height, :width]
    blob = ((ys - 0.4 * height) / (height / 6)) ** 2 + ((xs - 0.6 * width) / (width / 6)) ** 2 < 1
    image[blob] = np.array([200, 170, 40], dtype=np.uint8) + rng.integers(0, 50, (int(blob.sum()), 3), dtype=np.uint8)
    return image


def _noise(seed):
    return np.random.default_rng(seed).random(FRAME).astype(np.float32)


def _blob_map(seed, centre=(0.4, 0.6)):
    """Map_a: a Gaussian peak plus noise, all values distinct."""
    ys, xs = np.mgrid[: FRAME[0], : FRAME[1]].astype(np.float32)
    peak = np.exp(-((ys - centre[0] * FRAME[0]) ** 2 + (xs - centre[1] * FRAME[1]) ** 2) / (2 * 5.0**2))
    return np.clip(0.9 * peak + 0.08 * _noise(seed), 0, 1).astype(np.float32)


def _two_pixel_map(seed):
    """S_a of two pixels: 2 positives (fewer than k), a full ring."""
    amap = 0.4 * _noise(seed)
    amap[15, 30], amap[16, 31] = 0.9, 0.8
    return amap


def _ring_of_two_map(seed):
    """S_a is everything but two corner pixels: its ring is those two (2 negatives)."""
    amap = 0.55 + 0.4 * _noise(seed)
    amap[0, 0] = amap[0, 1] = 0.1
    return amap


def _everything_map(seed):
    """S_a is the whole frame: no ring, positives only."""
    return 0.5 + 0.5 * _noise(seed)


def _empty_map(seed):
    return 0.45 * _noise(seed)


# ---------------------------------------------------------------------------------- the two sides
def _reference(sam, original, amap, prompt, *, multimask=False, mask_threshold=0.0, num_steps=3):
    """PPG points and the SamPredictor cascade, with no clipsam code."""
    predictor = SamPredictor(sam)
    predictor.set_image(original)
    side = sam.image_encoder.img_size
    grid = predictor.features.shape[-2:]
    extent = (predictor.input_size[0] * grid[0] / side, predictor.input_size[1] * grid[1] / side)
    coords, labels, ring = ref.ppg(amap, predictor.features[0].numpy(), extent, **prompt)
    at_original = ref.frame_to_original(coords, FRAME, original.shape[:2])
    steps = ref.predictor_cascade(
        predictor, at_original, labels, num_steps=num_steps, multimask=multimask, mask_threshold=mask_threshold
    )
    return {"coords": coords, "labels": labels, "ring": ring, "steps": steps,
            "input_size": predictor.input_size, "features": predictor.features}


def _refiner(sam, prompt, **cascade):
    return SamRefiner(sam=sam, prompt=PromptConfig(**prompt), cascade=CascadeConfig(**cascade))


def _chw(original):
    return torch.from_numpy(original).permute(2, 0, 1).contiguous()


def _iou(a, b):
    union = np.logical_or(a, b).sum()
    return 1.0 if union == 0 else float(np.logical_and(a, b).sum() / union)


def _assert_no_near_ties(ring, k):
    """The reference's order of the first k + 1 ring pixels is not decided by rounding.

    Exact ties (pixels reading the same feature cell with "nearest") are fine: both sides give
    them to the pixel first in raster order.
    """
    gaps = np.diff(ring[: k + 1, 2])
    assert not ((gaps > 0) & (gaps <= 1e-5)).any(), "near-tie in the ring similarities: pick another seed"


def _compare_steps(sam, ours_low_res, ours_boxes, ours_ious, reference, original_size, mask_threshold):
    """Per step: low-res logits, predicted IoU, box, logits and mask at the original size and in the frame.

    Returns:
        per step, the largest absolute logit difference (low-res, original, frame) and the mask IoU.
    """
    input_size = reference["input_size"]
    report = []
    assert len(ours_low_res) == len(reference["steps"])
    for step, (low, box, iou, theirs) in enumerate(zip(ours_low_res, ours_boxes, ours_ious, reference["steps"]), 1):
        low = np.asarray(low, dtype=np.float32).reshape(theirs["low_res"].shape)
        low_diff = float(np.abs(low - theirs["low_res"]).max())
        assert low_diff <= LOGIT_ATOL, f"step {step}: low-res logits {low_diff}"
        assert abs(float(iou) - theirs["iou"]) <= LOGIT_ATOL, f"step {step}: predicted IoU"
        if theirs["box"] is None:
            assert box is None, f"step {step}: a box where SamPredictor had none"
        else:
            assert box is not None and np.array_equal(np.asarray(box, dtype=np.float64), theirs["box"]), (
                f"step {step}: box {box} != {theirs['box']}"
            )
        at_original = ref.low_res_to(sam, low, input_size, original_size)
        original_diff = float(np.abs(at_original - theirs["logits"]).max())
        assert original_diff <= LOGIT_ATOL, f"step {step}: logits at the original size {original_diff}"
        iou_original = _iou(at_original > mask_threshold, theirs["mask"])
        assert iou_original == 1.0, f"step {step}: mask IoU {iou_original} at the original size"
        report.append({"low_res": low_diff, "original": original_diff, "iou": iou_original})
    return report


def _check_refine(sam, original, amap, prompt, *, multimask=False, mask_threshold=0.0, reference=None):
    """clipsam's ``refine`` from the image and the map = the reference, point by point and step by step."""
    if reference is None:
        reference = _reference(sam, original, amap, prompt, multimask=multimask, mask_threshold=mask_threshold)
    refiner = _refiner(sam, prompt, multimask=multimask, mask_threshold=mask_threshold)
    # SAM's input and embedding are set_image's (refine(image) encodes with embed_images too)
    embedding = refiner.embed_images(_chw(original)[None])
    assert float((embedding - reference["features"]).abs().max()) <= 1e-5
    out = refiner.refine(_chw(original), torch.from_numpy(amap), embedding=embedding)
    # PPG: the same points, in the same order
    assert np.array_equal(out.point_coords.numpy(), reference["coords"]), (out.point_coords, reference["coords"])
    assert np.array_equal(out.point_labels.numpy(), reference["labels"])
    _assert_no_near_ties(reference["ring"], prompt["num_negative"])
    # CPS: every decoder step
    report = _compare_steps(
        sam,
        [s.low_res_logits.numpy() for s in out.steps],
        [None if s.box is None else s.box.numpy() for s in out.steps],
        [s.iou for s in out.steps],
        reference,
        original.shape[:2],
        mask_threshold,
    )
    last = reference["steps"][-1]
    final_diff = float(np.abs(out.original_logits.numpy() - last["logits"]).max())
    assert final_diff <= LOGIT_ATOL
    # in the frame: SAM's upsampling of the last low-res logits to the frame
    frame_logits = ref.low_res_to(sam, last["low_res"], reference["input_size"], FRAME)
    assert float(np.abs(out.steps[-1].mask_logits.numpy() - frame_logits).max()) <= LOGIT_ATOL
    assert _iou(out.mask.numpy(), frame_logits > mask_threshold) == 1.0
    return out, reference, report


# ---------------------------------------------------------------------------------- single images
CASES = {
    # id: (original (H0, W0), map, prompt overrides, expected labels)
    "landscape": ((60, 90), lambda: _blob_map(0), {}, [1] * 5 + [0] * 5),
    "portrait": ((90, 60), lambda: _blob_map(1, centre=(0.6, 0.3)), {}, [1] * 5 + [0] * 5),
    "two-pixel-region": ((60, 90), lambda: _two_pixel_map(4), {}, [1, 1, 0, 0, 0, 0, 0]),
    "ring-of-two": ((90, 60), lambda: _ring_of_two_map(5), {}, [1, 1, 1, 1, 1, 0, 0]),
    "empty-ring": ((60, 90), lambda: _everything_map(6), {}, [1, 1, 1, 1, 1]),
    "max-nearest": (
        (90, 60), lambda: _blob_map(7), {"similarity_to": "max", "feature_sampling": "nearest"}, [1] * 5 + [0] * 5
    ),
}
FAST_B_CASES = ("landscape", "portrait", "two-pixel-region")  # ~0.6 s a case on 2 cores; the rest: slow


def _model_params(cases, fast_b=()):
    """(model, case) pairs: every case on "tiny", on "b" only ``fast_b`` unless -m slow."""
    params = [pytest.param("tiny", case, id=f"tiny-{case}") for case in cases]
    params += [
        pytest.param("b", case, id=f"b-{case}", marks=() if case in fast_b else pytest.mark.slow) for case in cases
    ]
    return params


@pytest.mark.parametrize(("model", "case"), _model_params(CASES, FAST_B_CASES))
def test_refine_equals_ppg_and_sam_predictor(models, model, case):
    size, make_map, overrides, labels = CASES[case]
    sam = models[model]
    original = _original(*size, seed=sum(size))
    out, reference, _ = _check_refine(sam, original, make_map(), {**PROMPT, **overrides})
    assert out.point_labels.tolist() == labels
    assert reference["steps"][2]["box"] is not None, "the case needs a step-2 mask (and a box)"


def _step2_logits(sam, original, amap):
    return _reference(sam, original, amap, PROMPT, num_steps=2)["steps"][1]["logits"]


@pytest.mark.parametrize(("model", "box"), _model_params(["one-pixel", "border"]))
def test_tight_boxes(models, model, box):
    """Step 2's mask reduced (by the mask threshold) to one pixel, or reaching the image border."""
    sam = models[model]
    original = _original(90, 60, seed=8)
    amap = _blob_map(8, centre=(0.5, 0.4))
    logits = _step2_logits(sam, original, amap)
    values = np.sort(logits.ravel())[::-1]
    if box == "one-pixel":
        assert values[0] - values[1] > 1e-4
        threshold = float((values[0] + values[1]) / 2)
    else:
        border = np.concatenate([logits[0], logits[-1], logits[:, 0], logits[:, -1]]).max()
        below = values[values < border]
        assert border - below[0] > 1e-4
        threshold = float((border + below[0]) / 2)
    _, reference, _ = _check_refine(sam, original, amap, PROMPT, mask_threshold=threshold)
    x0, y0, x1, y1 = reference["steps"][2]["box"]
    if box == "one-pixel":
        assert (x0, y0) == (x1, y1)
    else:
        assert min(x0, y0) == 0 or x1 == original.shape[1] - 1 or y1 == original.shape[0] - 1


@pytest.mark.parametrize("model", [pytest.param("tiny"), pytest.param("b", marks=pytest.mark.slow)])
def test_multimask_keeps_the_best_predicted_iou_at_each_step(models, model):
    sam = models[model]
    original = _original(60, 90, seed=9)
    _, reference, _ = _check_refine(sam, original, _blob_map(9), PROMPT, multimask=True)
    assert reference["steps"][2]["box"] is not None


# ---------------------------------------------------------------------------------- batches
BATCH = [  # original size, map: 10, 7, 0, 5 and 10 real points
    ((60, 90), lambda: _blob_map(10)),
    ((90, 60), lambda: _two_pixel_map(11)),
    ((60, 90), lambda: _empty_map(12)),
    ((90, 60), lambda: _everything_map(13)),
    ((60, 90), lambda: _blob_map(14, centre=(0.3, 0.3))),
]


@pytest.mark.parametrize(("model", "threshold"), _model_params(["zero", "mixed-boxes"]))
def test_batch_of_images_with_different_point_counts(models, model, threshold):
    """One batch mixing 10, 7, 0 and 5 real points and two original shapes = one SamPredictor per image.

    "mixed-boxes": the mask threshold lies between the step-2 maxima of the two 10-point images,
    so one of them has no step-2 mask and no box at step 3.
    """
    sam = models[model]
    originals = [_original(*size, seed=20 + i) for i, (size, _) in enumerate(BATCH)]
    maps = [make() for _, make in BATCH]
    mask_threshold = 0.0
    if threshold == "mixed-boxes":
        peaks = sorted(float(_step2_logits(sam, originals[i], maps[i]).max()) for i in (0, 4))
        assert peaks[1] - peaks[0] > 1e-4
        mask_threshold = (peaks[0] + peaks[1]) / 2
    references = [_reference(sam, o, m, PROMPT, mask_threshold=mask_threshold) for o, m in zip(originals, maps)]
    assert [len(r["labels"]) for r in references] == [10, 7, 0, 5, 10]

    refiner = _refiner(sam, PROMPT, mask_threshold=mask_threshold)
    built = [build_sam_input(o, refiner.side) for o in originals]
    batch = {
        "sam_image": torch.stack([b[0] for b in built]),
        "sam_size": torch.stack([b[1] for b in built]),
        "original_size": torch.tensor([o.shape[:2] for o in originals]),
    }
    embeddings = refiner.encode(batch["sam_image"], batch["sam_size"])
    out = refiner.refine_embedded(
        embeddings,
        torch.from_numpy(np.stack(maps)),
        input_sizes=[tuple(b[1].tolist()) for b in built],
        original_sizes=[o.shape[:2] for o in originals],
    )
    cascade = out["cascade"]
    for i, reference in enumerate(references):
        keep = out["labels"][i] >= 0
        assert np.array_equal(out["coords"][i][keep].numpy(), reference["coords"])
        assert np.array_equal(out["labels"][i][keep].numpy(), reference["labels"])
        if not reference["steps"]:  # no points: not decoded, nothing segmented
            assert not bool(cascade.has_points[i]) and not out["mask"][i].any()
            assert torch.isneginf(out["logits"][i]).all()
            continue
        boxes = [None if b is None or not bool(v[i]) else b[i].numpy() for b, v in zip(cascade.boxes, cascade.box_valid)]
        _compare_steps(sam, [low[i] for low in cascade.low_res_logits], boxes, [s[i] for s in cascade.ious],
                       reference, originals[i].shape[:2], mask_threshold)
        frame_logits = ref.low_res_to(sam, reference["steps"][-1]["low_res"], reference["input_size"], FRAME)
        assert float(np.abs(out["logits"][i].numpy() - frame_logits).max()) <= LOGIT_ATOL
        assert _iou(out["mask"][i].numpy(), frame_logits > mask_threshold) == 1.0
    has_box = [r["steps"][2]["box"] is not None for r in references if r["steps"]]
    if threshold == "zero":
        assert all(has_box)
    else:  # the two 10-point images: one with a box at step 3, one without
        assert has_box[0] != has_box[-1]

    # the refiner interface: the same masks and probabilities
    result = refiner.refine_batch(batch, torch.from_numpy(np.stack(maps)))
    assert torch.equal(result.mask, out["mask"])
    torch.testing.assert_close(result.mask_probs, torch.sigmoid(out["logits"]), rtol=0, atol=0)


def test_ppg_features_cover_only_the_valid_part_of_the_embedding(models):
    """Changing the padded cells of the embedding does not move PPG's points."""
    sam = models["tiny"]
    refiner = _refiner(sam, PROMPT, num_steps=1)
    original = _original(60, 150, seed=3)  # h' = 102 of 256: most of the embedding is padding
    sam_image, sam_size = build_sam_input(original, refiner.side)
    embedding = refiner.encode(sam_image[None], sam_size[None])
    amap = torch.from_numpy(_blob_map(2))[None]
    kwargs = {"input_sizes": [tuple(sam_size.tolist())], "original_sizes": [(60, 150)]}
    first = refiner.refine_embedded(embedding, amap, **kwargs)
    valid_rows = int(np.ceil(int(sam_size[0]) * embedding.shape[-2] / refiner.side))
    changed = embedding.clone()
    changed[:, :, valid_rows:] = torch.randn_like(changed[:, :, valid_rows:]) * 100
    second = refiner.refine_embedded(changed, amap, **kwargs)
    assert torch.equal(first["coords"], second["coords"]) and torch.equal(first["labels"], second["labels"])
    assert (first["labels"] == 0).sum() == 5


@pytest.mark.slow
def test_vit_b_with_fewer_points_than_k():
    """The real vit_b encoder (random weights): S_a of two pixels, landscape original."""
    sam = _seeded(lambda: sam_model_registry["vit_b"](), seed=0)
    original = _original(60, 90, seed=30)
    out, _, _ = _check_refine(sam, original, _two_pixel_map(30), PROMPT)
    assert out.point_labels.tolist() == [1, 1, 0, 0, 0, 0, 0]
