"""SAM stage parity with segment_anything's own ``SamPredictor`` on ORIGINAL, non-square images.

The reference for every number here is segment_anything: ``SamPredictor.set_image`` on the
original image and ``SamPredictor.predict`` with the prompts in original-image coordinates,
chained through :func:`clipsam.cascade.run_cascade` (mask_input = previous low-res logits, box =
the previous mask's box at the original size). Tiny preset, fp32.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from clipsam.cascade import CascadeConfig, run_cascade
from clipsam.data.transforms import build_sam_input
from clipsam.fusion import fuse_scores
from clipsam.models.sam import SamConfig, build_sam, frame_to_original
from clipsam.refiners.ppg_cps import SamRefiner
from clipsam.prompting import PromptConfig
from segment_anything import SamPredictor

FRAME = (48, 48)  # the square evaluation frame (squashed)


@pytest.fixture(scope="module")
def sam():
    return build_sam(SamConfig(variant="tiny", seed=2))


def _original(height, width, seed):
    """A non-square RGB image with a bright blob (H0, W0, 3) uint8, and its blob in frame pixels."""
    gen = torch.Generator().manual_seed(seed)
    image = torch.randint(40, 120, (height, width, 3), dtype=torch.uint8, generator=gen)
    ys, xs = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
    cy, cx = height * 0.4, width * 0.6
    blob = ((ys - cy) / (height / 6)) ** 2 + ((xs - cx) / (width / 6)) ** 2 < 1
    image[blob] = torch.tensor([230, 200, 60], dtype=torch.uint8)
    return image.numpy()


def _frame_map(seed):
    gen = torch.Generator().manual_seed(seed)
    ys, xs = torch.meshgrid(torch.arange(FRAME[0]).float(), torch.arange(FRAME[1]).float(), indexing="ij")
    amap = torch.exp(-((ys - 0.4 * FRAME[0]) ** 2 + (xs - 0.6 * FRAME[1]) ** 2) / (2 * 6.0**2))
    return (amap + 0.05 * torch.rand(FRAME, generator=gen)).clamp(0, 1)


def _refiner(sam, num_steps=3):
    prompt = PromptConfig(num_positive=3, num_negative=3, threshold=0.5, kernel_size=9)
    return SamRefiner(sam=sam, prompt=prompt, cascade=CascadeConfig(num_steps=num_steps))


def _predictor_cascade(predictor, coords, labels, num_steps=3):
    """SamPredictor, step by step: the reference cascade in original-image coordinates."""

    def decode(point_coords, point_labels, box, mask_input):
        logits, iou, low_res = predictor.predict(
            point_coords=point_coords.numpy(),
            point_labels=point_labels.numpy(),
            box=None if box is None else box.numpy(),
            mask_input=None if mask_input is None else mask_input.numpy(),
            multimask_output=False,
            return_logits=True,
        )
        return torch.from_numpy(logits[0]), torch.from_numpy(low_res), torch.tensor(iou[0])

    return run_cascade(decode, point_coords=coords, point_labels=labels, num_steps=num_steps)


@pytest.mark.parametrize("size", [(90, 150), (140, 70)], ids=["landscape", "portrait"])
def test_cascade_equals_sam_predictor_step_by_step(sam, size):
    original = _original(*size, seed=size[0])
    refiner = _refiner(sam)
    sam_image, sam_size = build_sam_input(original, refiner.side)
    embedding = refiner.encode(sam_image[None], sam_size[None])

    predictor = SamPredictor(sam)
    predictor.set_image(original)
    assert predictor.input_size == tuple(sam_size.tolist())
    torch.testing.assert_close(embedding, predictor.features, rtol=0, atol=1e-5)

    # Given prompts in frame pixels: two positives on the blob, one negative, one padding slot.
    frame_coords = torch.tensor([[[28.0, 19.0], [30.0, 21.0], [5.0, 40.0], [0.0, 0.0]]])
    labels = torch.tensor([[1, 1, 0, -1]])
    ours = refiner.run_cascade_batched(
        embedding, frame_coords, labels, frame_size=FRAME,
        input_sizes=[tuple(sam_size.tolist())], original_sizes=[size],
    )
    original_coords = frame_to_original(frame_coords, FRAME, torch.tensor([size]))[0]
    expected_x = (28.0 + 0.5) * size[1] / FRAME[1] - 0.5
    assert abs(float(original_coords[0, 0]) - expected_x) < 1e-4  # pixel centre to pixel centre
    reference = _predictor_cascade(predictor, original_coords, labels[0])

    assert len(ours.low_res_logits) == len(reference.steps) == 3
    for step, (low_res, ref) in enumerate(zip(ours.low_res_logits, reference.steps), start=1):
        torch.testing.assert_close(low_res[0], ref.low_res_logits, rtol=0, atol=1e-4, msg=f"step {step}")
        at_original = sam.postprocess_masks(low_res, refiner_input(sam_size), size)[0, 0] > 0
        assert torch.equal(at_original, ref.mask), f"step {step}: mask at the original size"
        if ref.box is not None:
            assert bool(ours.box_valid[step - 1][0])
            torch.testing.assert_close(ours.boxes[step - 1][0], ref.box, rtol=0, atol=0)
    assert reference.steps[2].box is not None, "the test needs a non-empty step-2 mask"
    assert reference.steps[2].mask.any() and not reference.steps[2].mask.all()

    # Back to the frame: Sam.postprocess_masks with the frame as the target size.
    frame_logits = sam.postprocess_masks(
        torch.from_numpy(predictor.predict(
            point_coords=original_coords.numpy(), point_labels=labels[0].numpy(),
            box=reference.steps[2].box.numpy(), mask_input=reference.steps[1].low_res_logits.numpy(),
            multimask_output=False, return_logits=True,
        )[2])[None],
        refiner_input(sam_size), FRAME,
    )[0, 0]
    torch.testing.assert_close(ours.frame_logits[0], frame_logits, rtol=0, atol=1e-4)


def refiner_input(sam_size):
    return tuple(int(v) for v in sam_size.tolist())


def test_refine_batch_equals_per_image_refine_and_predictor_masks(sam):
    """Two originals of different sizes in one batch: the batched path = one image at a time."""
    refiner = _refiner(sam)
    sizes = [(90, 150), (120, 80)]
    originals = [_original(*s, seed=i) for i, s in enumerate(sizes)]
    built = [build_sam_input(o, refiner.side) for o in originals]
    maps = torch.stack([_frame_map(0), _frame_map(1)])
    batch = {
        "sam_image": torch.stack([b[0] for b in built]),
        "sam_size": torch.stack([b[1] for b in built]),
        "original_size": torch.tensor(sizes),
    }
    out = refiner.refine_batch(batch, maps)
    assert out.mask.shape == (2, *FRAME) and out.mask.dtype == torch.bool
    assert out.mask_probs.dtype == torch.float32
    assert set(out.timings) == {"sam_encoder", "ppg", "cascade_step_1", "cascade_step_2", "cascade_step_3"}
    for i, original in enumerate(originals):
        single = refiner.refine(torch.from_numpy(original).permute(2, 0, 1), maps[i])
        assert torch.equal(single.mask, out.mask[i])
        torch.testing.assert_close(single.mask_probs, out.mask_probs[i], rtol=0, atol=1e-5)
        for method in ("clip_boost", "mean", "product"):
            batched = fuse_scores(maps[i], out.mask_probs[i], out.mask[i], method=method)
            per_image = fuse_scores(maps[i], single.mask_probs, single.mask, method=method)
            assert float((batched - per_image).abs().max()) <= 1e-5
        # the per-image result is SamPredictor's cascade with the same (PPG) prompts
        predictor = SamPredictor(sam)
        predictor.set_image(original)
        coords = frame_to_original(single.point_coords[None], FRAME, torch.tensor([sizes[i]]))[0]
        reference = _predictor_cascade(predictor, coords, single.point_labels)
        torch.testing.assert_close(single.original_logits, reference.mask_logits, rtol=0, atol=1e-4)
        assert torch.equal(single.original_logits > 0, reference.mask)
        assert single.steps[-1].box is None or torch.equal(single.steps[-1].box, reference.steps[-1].box)
    assert out.mask.any(), "the test needs a non-empty mask"


def test_ppg_features_cover_only_the_valid_part_of_the_embedding(sam):
    """Changing the padded cells of the embedding does not move PPG's points."""
    refiner = _refiner(sam, num_steps=1)
    original = _original(60, 150, seed=3)  # h' = 102 of 256: most of the embedding is padding
    sam_image, sam_size = build_sam_input(original, refiner.side)
    embedding = refiner.encode(sam_image[None], sam_size[None])
    amap = _frame_map(2)[None]
    kwargs = dict(input_sizes=[refiner_input(sam_size)], original_sizes=[(60, 150)])
    first = refiner.refine_embedded(embedding, amap, **kwargs)
    valid_rows = int(np.ceil(int(sam_size[0]) * embedding.shape[-2] / refiner.side))
    changed = embedding.clone()
    changed[:, :, valid_rows:] = torch.randn_like(changed[:, :, valid_rows:]) * 100
    second = refiner.refine_embedded(changed, amap, **kwargs)
    assert torch.equal(first["coords"], second["coords"]) and torch.equal(first["labels"], second["labels"])
    assert (first["labels"] == 0).sum() == 3


def test_step3_decodes_rows_with_and_without_a_box_apart(sam, monkeypatch):
    """A batch whose step-2 masks give a box for some rows only: each row gets its own step 3.

    Row 1 is made box-less (as if its step-2 mask were empty); its step 3 must be the decoder on
    points + step-2 logits, the other rows' the decoder with their boxes, as one row at a time.
    """
    import clipsam.refiners.ppg_cps as sam_module
    from clipsam.models.sam import original_to_input

    refiner = _refiner(sam)
    sizes = [(90, 150), (120, 80), (100, 100)]
    built = [build_sam_input(_original(*s, seed=i), refiner.side) for i, s in enumerate(sizes)]
    embeddings = refiner.encode(torch.stack([b[0] for b in built]), torch.stack([b[1] for b in built]))
    input_sizes = [refiner_input(b[1]) for b in built]
    coords = torch.tensor([[[28.0, 19.0], [30.0, 21.0], [5.0, 40.0]]] * 3)
    labels = torch.tensor([[1, 1, 0]] * 3)
    real = sam_module.logits_to_boxes
    groups = []  # one call per (input size, original size) group: here one row each, in order

    def row_1_without_box(logits, threshold):
        boxes, valid = real(logits, threshold)
        groups.append(valid.shape[0])
        if len(groups) == 2:
            valid = torch.zeros_like(valid)
        return boxes * valid[:, None], valid

    monkeypatch.setattr(sam_module, "logits_to_boxes", row_1_without_box)
    calls = []
    decode = refiner._decode

    def recording(emb, points, point_labels, boxes, mask_input):
        calls.append((emb.shape[0], boxes is not None))
        return decode(emb, points, point_labels, boxes, mask_input)

    monkeypatch.setattr(refiner, "_decode", recording)
    out = refiner.run_cascade_batched(embeddings, coords, labels, frame_size=FRAME, input_sizes=input_sizes, original_sizes=sizes)
    assert groups == [1, 1, 1] and calls == [(3, False), (3, False), (2, True), (1, False)]
    assert out.box_valid[2].tolist() == [True, False, True]

    # The reference: the whole batch through the decoder with and without the boxes, row by row.
    original_t, input_t = torch.tensor(sizes), torch.tensor(input_sizes)
    points = original_to_input(frame_to_original(coords, FRAME, original_t), original_t, input_t)
    ratio = (input_t.double() / original_t.double()).flip(1).repeat(1, 2)
    boxes_in = (out.boxes[2].double() * ratio).float()
    with_box, _ = decode(embeddings, points, labels, boxes_in, out.low_res_logits[1])
    without_box, _ = decode(embeddings, points, labels, None, out.low_res_logits[1])
    for row, expected in ((0, with_box), (1, without_box), (2, with_box)):
        torch.testing.assert_close(out.low_res_logits[2][row], expected[row], rtol=0, atol=1e-5)
