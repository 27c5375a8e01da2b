"""Tiny open_clip model configs for tests and the demo.

The presets are ordinary open_clip architecture configs (JSON files in
``clipsam/models/model_configs/``), built by ``open_clip.create_model`` into the same
``CLIP`` / ``VisionTransformer`` classes as the real models, always with random weights seeded
from ``ClipConfig.seed``. They make every code path of the CLIP stage run offline in seconds.

====================  =====  =====  =====  ======  =====  ======  =================
name                  image  patch  width  layers  embed  text    tapped layers
====================  =====  =====  =====  ======  =====  ======  =================
``clipsam-tiny``      224    16     64     4       64     64 x 2  ``[1, 2, 3, 4]``
``clipsam-tiny-240``  240    16     64     4       48     64 x 4  ``[1, 2, 3, 4]``
====================  =====  =====  =====  ======  =====  ======  =================

``clipsam-tiny-240`` is the tiny stand-in of the ``ViT-B-16-plus-240`` family (WinCLIP, SDP):
240-px input, a token width (64) that differs from the joint embedding width (48) as 896 vs
640 does in the real model, and 4 text layers so that AnomalyCLIP's deep text prompts have
layers to go into.

(text: width x layers, context 32 tokens, which holds the longest ensemble prompt; 1-based
block indices as :class:`~clipsam.models.clip.ClipConfig`
counts them.) Any ``image_size`` divisible by the patch size works (the positional embedding is
sized by ``force_image_size``).

The configs are registered with open_clip lazily by :func:`register_tiny_configs`, which
:func:`clipsam.models.clip.build_clip_model` calls when asked for a preset name; importing this
module changes nothing.
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["CONFIG_DIR", "TINY_PRESETS", "is_tiny_preset", "register_tiny_configs"]

CONFIG_DIR = Path(__file__).parent / "model_configs"
"""Directory of the preset JSON files (shipped as package data)."""

TINY_PRESETS: dict[str, dict[str, list[int]]] = {
    "clipsam-tiny": {"layers": [1, 2, 3, 4]},
    "clipsam-tiny-240": {"layers": [1, 2, 3, 4]},
}
"""Preset name -> documented defaults (the tapped layers to use with it)."""


def is_tiny_preset(model_name: str) -> bool:
    """Whether ``model_name`` is one of clipsam's presets (and so has no pretrained weights)."""
    return model_name in TINY_PRESETS


def register_tiny_configs() -> list[str]:
    """Register the preset JSON files with open_clip, once (idempotent).

    Returns:
        The preset names, now known to ``open_clip.list_models()``.
    """
    import open_clip

    known = set(open_clip.list_models())
    missing = [name for name in TINY_PRESETS if name not in known]
    for name in missing:
        open_clip.add_model_config(CONFIG_DIR / f"{name}.json")
    return list(TINY_PRESETS)
