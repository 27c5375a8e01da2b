"""CPS (clipsam.cascade) with a recording stand-in decoder."""

from __future__ import annotations

import pytest
import torch

from clipsam.cascade import CascadeConfig, mask_to_box, run_cascade
from clipsam.errors import ConfigError

H, W = 8, 10


class RecordingDecoder:
    """Returns the given per-step logits; low-res logits are filled with the step number."""

    def __init__(self, logits):
        self.logits = logits
        self.calls = []

    def __call__(self, point_coords, point_labels, box, mask_input):
        step = len(self.calls) + 1
        self.calls.append({"coords": point_coords, "labels": point_labels, "box": box, "mask_input": mask_input})
        return self.logits[step - 1], torch.full((1, 4, 4), float(step)), torch.tensor(0.5 + step / 10)


def _logits(rows, cols):
    out = torch.full((H, W), -5.0)
    out[rows, cols] = 5.0
    return out


POINTS = torch.tensor([[3.0, 2.0], [9.0, 7.0]])
LABELS = torch.tensor([1, 0])


def test_three_steps_feed_logits_and_the_box_of_step_two():
    step2 = _logits(slice(2, 5), slice(5, 9))  # rows 2-4, columns 5-8
    decoder = RecordingDecoder([_logits(slice(0, 2), slice(0, 2)), step2, _logits(slice(3, 4), slice(6, 7))])
    result = run_cascade(decoder, point_coords=POINTS, point_labels=LABELS, num_steps=3)
    first, second, third = decoder.calls
    assert first["box"] is None and first["mask_input"] is None
    assert second["box"] is None and torch.equal(second["mask_input"], torch.full((1, 4, 4), 1.0))
    assert torch.equal(third["box"], torch.tensor([5.0, 2.0, 8.0, 4.0]))  # XYXY of step 2's mask
    assert torch.equal(third["mask_input"], torch.full((1, 4, 4), 2.0))
    for call in decoder.calls:
        assert torch.equal(call["coords"], POINTS) and torch.equal(call["labels"], LABELS)
    assert [s.used_mask_input for s in result.steps] == [False, True, True]
    assert torch.equal(result.steps[2].box, third["box"])
    assert torch.equal(result.mask, result.steps[2].mask) and int(result.mask.sum()) == 1
    assert torch.equal(result.mask_logits, decoder.logits[2])
    assert result.mask.dtype == torch.bool and result.mask_logits.dtype == torch.float32


@pytest.mark.parametrize("num_steps", [1, 2])
def test_fewer_steps_call_the_decoder_fewer_times(num_steps):
    decoder = RecordingDecoder([_logits(slice(0, 3), slice(0, 3))] * 3)
    result = run_cascade(decoder, point_coords=POINTS, point_labels=LABELS, num_steps=num_steps)
    assert len(decoder.calls) == num_steps == len(result.steps)
    assert all(call["box"] is None for call in decoder.calls)


def test_empty_step_two_mask_skips_the_box():
    empty = torch.full((H, W), -1.0)
    decoder = RecordingDecoder([_logits(slice(0, 1), slice(0, 1)), empty, empty])
    result = run_cascade(decoder, point_coords=POINTS, point_labels=LABELS)
    assert len(decoder.calls) == 3
    assert decoder.calls[2]["box"] is None and torch.equal(decoder.calls[2]["mask_input"], torch.full((1, 4, 4), 2.0))
    assert not result.mask.any()


def test_no_points_gives_an_empty_mask_without_calling_the_decoder():
    decoder = RecordingDecoder([])
    result = run_cascade(
        decoder, point_coords=torch.zeros(0, 2), point_labels=torch.zeros(0, dtype=torch.long), frame_size=(H, W)
    )
    assert decoder.calls == [] and result.steps == []
    assert result.mask.shape == (H, W) and not result.mask.any()
    assert torch.equal(torch.sigmoid(result.mask_logits), torch.zeros(H, W))
    with pytest.raises(ValueError, match="frame_size"):
        run_cascade(decoder, point_coords=torch.zeros(0, 2), point_labels=torch.zeros(0, dtype=torch.long))


def test_invalid_steps_and_points():
    with pytest.raises(ValueError, match="num_steps"):
        run_cascade(RecordingDecoder([]), point_coords=POINTS, point_labels=LABELS, num_steps=4)
    with pytest.raises(ValueError, match="num_steps"):
        run_cascade(RecordingDecoder([]), point_coords=POINTS, point_labels=LABELS, num_steps=0)
    with pytest.raises(ValueError, match="point_coords"):
        run_cascade(RecordingDecoder([]), point_coords=POINTS, point_labels=LABELS[:1])
    with pytest.raises(ConfigError, match=r"model\.refiner_config\.cascade\.num_steps=4"):
        CascadeConfig(num_steps=4)
    with pytest.raises(ConfigError, match=r"model\.refiner_config\.cascade\.max_regions=0"):
        CascadeConfig(max_regions=0)
    config = CascadeConfig()
    assert (config.num_steps, config.multimask, config.mask_threshold) == (3, False, 0.0)


def test_mask_to_box():
    mask = torch.zeros(H, W, dtype=torch.bool)
    assert mask_to_box(mask) is None
    mask[6, 1] = mask[2, 7] = True
    assert mask_to_box(mask).tolist() == [1.0, 2.0, 7.0, 6.0]


def test_batched_boxes_equal_mask_to_box():
    from clipsam.cascade import masks_to_boxes

    gen = torch.Generator().manual_seed(0)
    masks = torch.rand(5, 13, 17, generator=gen) > 0.95
    masks[2] = False  # an empty mask: no box
    masks[3] = False
    masks[3, 12, 16] = True  # a single corner pixel
    boxes, valid = masks_to_boxes(masks)
    assert valid.tolist() == [mask_to_box(m) is not None for m in masks]
    for i, mask in enumerate(masks):
        expected = mask_to_box(mask)
        if expected is not None:
            assert torch.equal(boxes[i], expected)
    assert boxes[3].tolist() == [16.0, 12.0, 16.0, 12.0]


def test_boxes_from_logits_equal_boxes_of_thresholded_masks():
    from clipsam.cascade import logits_to_boxes, masks_to_boxes

    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(6, 21, 9, generator=gen) - 2.0
    logits[1] = -5.0  # nothing above the threshold
    logits[2] = 0.0  # exactly at the threshold: not in the mask (logits > 0)
    logits[3] = -5.0
    logits[3, 20, 0] = 0.5  # one pixel in the bottom-left corner
    logits[4] = float("-inf")  # rows without points in the cascade
    for threshold in (0.0, 1.5):
        boxes, valid = logits_to_boxes(logits, threshold)
        expected_boxes, expected_valid = masks_to_boxes(logits > threshold)
        assert torch.equal(valid, expected_valid) and torch.equal(boxes, expected_boxes)
    assert logits_to_boxes(logits, 0.0)[0][3].tolist() == [0.0, 20.0, 0.0, 20.0]
