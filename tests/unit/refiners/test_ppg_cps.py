"""The ``ppg_cps`` refiner's settings, its recorded open choices, and what its decoder calls are given."""

from __future__ import annotations

import pytest
import torch

from clipsam import refiners
from clipsam.cascade import CascadeConfig
from clipsam.errors import ConfigError
from clipsam.models.sam import SamConfig, build_sam
from clipsam.prompting import PromptConfig
from clipsam.refiners.ppg_cps import PpgCpsConfig, SamRefiner, open_choices


def test_open_choices_are_recorded_with_their_keys():
    assert open_choices(PpgCpsConfig()) == {
        "prompt.threshold": 0.5,
        "prompt.num_positive": 5,
        "prompt.num_negative": 5,
        "prompt.similarity_to": "mean",
        "prompt.feature_sampling": "bilinear",
        "cascade.multimask": False,
    }
    config = PpgCpsConfig(prompt={"similarity_to": "max", "feature_sampling": "nearest"}, cascade={"multimask": True})
    choices = refiners.refiner_choices("ppg_cps", config)
    assert choices["prompt.similarity_to"] == "max" and choices["prompt.feature_sampling"] == "nearest"
    assert choices["cascade.multimask"] is True


def test_bad_settings_name_their_config_path():
    with pytest.raises(ConfigError, match=r"model\.refiner_config\.prompt\.similarity_to='median'"):
        PpgCpsConfig(prompt={"similarity_to": "median"})
    with pytest.raises(ConfigError, match=r"model\.refiner_config\.cascade\.num_steps=5"):
        PpgCpsConfig(cascade={"num_steps": 5})


def test_decoder_calls_get_the_real_points_only_grouped_by_count(monkeypatch):
    """Images with 10, 7, 0 and 5 real points: one call per count and step, never a label -1."""
    sam = build_sam(SamConfig(variant="tiny", seed=1))
    refiner = SamRefiner(sam=sam, prompt=PromptConfig(kernel_size=5), cascade=CascadeConfig(num_steps=2))
    maps = torch.zeros(4, 24, 24)
    ys, xs = torch.meshgrid(torch.arange(24.0), torch.arange(24.0), indexing="ij")
    maps[0] = torch.exp(-((ys - 12) ** 2 + (xs - 12) ** 2) / 20) + 0.01 * torch.rand(24, 24)
    maps[1, 5, 5], maps[1, 5, 6] = 0.9, 0.8  # S_a of two pixels
    maps[3] = 0.9  # S_a everything, no ring
    maps[3, 0, 0] = 0.95
    embeddings = torch.randn(4, 32, 16, 16, generator=torch.Generator().manual_seed(0))
    calls = []
    decode = refiner._decode

    def recording(emb, points, labels, boxes, mask_input):
        calls.append((emb.shape[0], labels.shape[1]))
        assert (labels >= 0).all(), "an empty slot reached SAM"
        return decode(emb, points, labels, boxes, mask_input)

    monkeypatch.setattr(refiner, "_decode", recording)
    out = refiner.refine_embedded(embeddings, maps, input_sizes=[(256, 256)] * 4, original_sizes=[(24, 24)] * 4)
    assert (out["labels"] >= 0).sum(1).tolist() == [10, 7, 0, 5]
    assert sorted(calls) == sorted([(1, 10), (1, 7), (1, 5)] * 2)
    assert out["cascade"].has_points.tolist() == [True, True, False, True]
    assert torch.isneginf(out["logits"][2]).all() and torch.isneginf(out["cascade"].low_res_logits[0][2]).all()
