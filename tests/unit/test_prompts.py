"""Prompt ensemble: counts and wording of the paper's prompt ensemble, object names from category names."""

from __future__ import annotations

import pytest

from clipsam.errors import ConfigError
from clipsam.prompts import ANOMALOUS_STATES, NORMAL_STATES, TEMPLATES, build_prompts, object_name_for


def test_ensemble_counts_match_method():
    assert len(NORMAL_STATES) == 7
    assert len(ANOMALOUS_STATES) == 5
    assert len(TEMPLATES) == 35
    assert len(set(TEMPLATES)) == 35
    prompts = build_prompts("metal nut")
    assert set(prompts) == {"normal", "anomalous"}
    assert len(prompts["normal"]) == 245
    assert len(prompts["anomalous"]) == 175
    assert len(set(prompts["normal"])) == 245
    assert len(set(prompts["anomalous"])) == 175


def test_states_and_templates_wording():
    assert NORMAL_STATES == (
        "{}", "flawless {}", "perfect {}", "unblemished {}",
        "{} without flaw", "{} without defect", "{} without damage",
    )
    assert ANOMALOUS_STATES == ("damaged {}", "broken {}", "{} with flaw", "{} with defect", "{} with damage")
    assert TEMPLATES[0] == "a bad photo of a {}."
    assert "a photo of a {}." in TEMPLATES
    assert "a cropped photo of the {}." in TEMPLATES
    assert TEMPLATES[-1] == "this is one {} in the scene."
    assert all(t.count("{}") == 1 for t in TEMPLATES)


def test_prompt_strings_are_state_major():
    prompts = build_prompts("capsule")
    assert prompts["normal"][0] == "a bad photo of a capsule."
    assert prompts["normal"][35] == "a bad photo of a flawless capsule."
    assert prompts["anomalous"][0] == "a bad photo of a damaged capsule."
    assert prompts["anomalous"][-1] == "this is one capsule with damage in the scene."


@pytest.mark.parametrize(
    ("category", "expected"),
    [
        ("metal_nut", "metal nut"),
        ("pcb1", "pcb"),
        ("pcb4", "pcb"),
        ("macaroni2", "macaroni"),
        ("pipe_fryum", "pipe fryum"),
        ("bottle", "bottle"),
        ("Screw", "screw"),
    ],
)
def test_object_name_for_category(category, expected):
    assert object_name_for(category) == expected


def test_object_name_raw_is_the_folder_name_as_april_gan_writes_it():
    # APRIL-GAN's prompt_ensemble.py formats its dataset's cls_name (the folder name) unchanged.
    for category in ("metal_nut", "pcb1", "macaroni2", "pipe_fryum"):
        assert object_name_for(category, "raw") == category
    assert build_prompts(object_name_for("metal_nut", "raw"))["anomalous"][0] == "a bad photo of a damaged metal_nut."


def test_object_name_generic_and_bad_mode():
    assert object_name_for("metal_nut", "generic") == "object"
    with pytest.raises(ConfigError, match="model.clip.object_name"):
        object_name_for("metal_nut", "class")  # type: ignore[arg-type]
