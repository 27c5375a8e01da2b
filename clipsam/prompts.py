"""Text prompt ensemble for the CLIP stage (pure Python).

The ensemble is the one APRIL-GAN, AnomalyCLIP and the paper share (the paper, "The protocol
the baselines share"): every state word of a class ("normal" or "anomalous") filled with the
object name, then put into each of the 35 CLIP photo templates. The text encoder averages the
L2-normalised embeddings of one class and normalises the mean again (see
:mod:`clipsam.models.clip`); this module only builds the strings.

    7 normal states x 35 templates = 245 normal prompts
    5 anomalous states x 35 templates = 175 anomalous prompts
"""

from __future__ import annotations

import re
from typing import Literal

from clipsam.errors import ConfigError

__all__ = [
    "ANOMALOUS_STATES",
    "NORMAL_STATES",
    "TEMPLATES",
    "OBJECT_NAME_MODES",
    "build_prompts",
    "object_name_for",
]

OBJECT_NAME_MODES: tuple[str, ...] = ("category", "raw", "generic")
"""Valid values of ``model.clip.object_name`` (see :func:`object_name_for`)."""

NORMAL_STATES: tuple[str, ...] = (
    "{}",
    "flawless {}",
    "perfect {}",
    "unblemished {}",
    "{} without flaw",
    "{} without defect",
    "{} without damage",
)
"""State words of the "normal" class; ``{}`` is the object name."""

ANOMALOUS_STATES: tuple[str, ...] = (
    "damaged {}",
    "broken {}",
    "{} with flaw",
    "{} with defect",
    "{} with damage",
)
"""State words of the "anomalous" class; ``{}`` is the object name."""

TEMPLATES: tuple[str, ...] = (
    "a bad photo of a {}.",
    "a low resolution photo of the {}.",
    "a bad photo of the {}.",
    "a cropped photo of the {}.",
    "a bright photo of a {}.",
    "a dark photo of the {}.",
    "a photo of my {}.",
    "a photo of the cool {}.",
    "a close-up photo of a {}.",
    "a black and white photo of the {}.",
    "a bright photo of the {}.",
    "a cropped photo of a {}.",
    "a jpeg corrupted photo of a {}.",
    "a blurry photo of the {}.",
    "a photo of the {}.",
    "a good photo of the {}.",
    "a photo of one {}.",
    "a close-up photo of the {}.",
    "a photo of a {}.",
    "a low resolution photo of a {}.",
    "a photo of a large {}.",
    "a blurry photo of a {}.",
    "a jpeg corrupted photo of the {}.",
    "a good photo of a {}.",
    "a photo of the small {}.",
    "a photo of the large {}.",
    "a black and white photo of a {}.",
    "a dark photo of a {}.",
    "a photo of a cool {}.",
    "a photo of a small {}.",
    "there is a {} in the scene.",
    "there is the {} in the scene.",
    "this is a {} in the scene.",
    "this is the {} in the scene.",
    "this is one {} in the scene.",
)
"""The 35 CLIP photo templates of APRIL-GAN's ``prompt_ensemble.py``, in its order."""

GENERIC_OBJECT_NAME = "object"
"""Object name used for every category when ``object_name="generic"``."""

_TRAILING_DIGITS = re.compile(r"\d+$")


def object_name_for(category: str, mode: Literal["category", "raw", "generic"] = "category") -> str:
    """Turn a dataset category name into the object name written in the prompts.

    - ``"raw"``: the category name exactly as on disk (``metal_nut``, ``pcb1``), as
      APRIL-GAN's prompt_ensemble.py writes it (its dataset's ``cls_name`` is the folder name).
    - ``"category"`` (clipsam's choice, not APRIL-GAN's): underscores and hyphens become
      spaces and a trailing index is dropped (VisA numbers its variants): ``metal_nut`` ->
      ``"metal nut"``, ``pcb1`` -> ``"pcb"``, ``macaroni2`` -> ``"macaroni"``.
    - ``"generic"``: ``"object"`` for every category.

    Args:
        category: Category name as on disk (e.g. ``"metal_nut"``).
        mode: One of :data:`OBJECT_NAME_MODES` (config key ``model.clip.object_name``).

    Returns:
        The object name (``"category"``: lower case, words separated by single spaces).

    Raises:
        ConfigError: ``mode`` is not one of the choices.
    """
    if mode == "generic":
        return GENERIC_OBJECT_NAME
    if mode == "raw":
        return category
    if mode != "category":
        raise ConfigError(
            f"model.clip.object_name={mode!r} is not a choice: use one of {list(OBJECT_NAME_MODES)}."
        )
    name = category.strip().replace("_", " ").replace("-", " ").lower()
    name = _TRAILING_DIGITS.sub("", name).strip()
    name = " ".join(name.split())
    return name or GENERIC_OBJECT_NAME


def build_prompts(object_name: str) -> dict[str, list[str]]:
    """All prompts of the ensemble for one object name.

    Args:
        object_name: Object name written into the states (see :func:`object_name_for`).

    Returns:
        ``{"normal": [...245 strings], "anomalous": [...175 strings]}``, state-major
        (all templates of the first state, then the second state ...), as APRIL-GAN orders them.
    """
    return {
        "normal": [t.format(s.format(object_name)) for s in NORMAL_STATES for t in TEMPLATES],
        "anomalous": [
            t.format(s.format(object_name)) for s in ANOMALOUS_STATES for t in TEMPLATES
        ],
    }
