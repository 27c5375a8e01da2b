"""Builders of the registered refiners (``model.refiner``), from the module's config sections.

``ppg_cps`` is the seed method's SAM stage, :class:`clipsam.models.sam.SamRefiner` (PPG point
prompts, Eq. 5-7, then the CPS cascade, Eq. 8-12) on a frozen SAM built from ``model.sam``.
"""

from __future__ import annotations

from typing import Any

from clipsam.cascade import CascadeConfig
from clipsam.prompting import PromptConfig

__all__ = ["build_ppg_cps"]


def build_ppg_cps(
    *, sam: Any, prompt: PromptConfig, cascade: CascadeConfig, use_embedding_cache: bool = True, **_: Any
) -> Any:
    """Frozen SAM (``model.sam``) + PPG (``model.prompt``) + CPS (``model.cascade``).

    Args:
        sam: :class:`clipsam.models.sam.SamConfig` (variant, checkpoint, dtype, embedding cache).
        prompt: PPG settings.
        cascade: CPS settings.
        use_embedding_cache: False skips ``sam.embedding_cache_dir`` (predict does, unless
            ``model.evaluation.predict_embedding_cache``); its size is bounded by
            ``sam.embedding_cache_max_gb`` (least recently used entries go first).
        **_: sections other refiners read (ignored here).

    Returns:
        a :class:`clipsam.models.sam.SamRefiner`.
    """
    from clipsam.models.sam import EmbeddingCache, SamRefiner, build_sam, weights_identity

    model = build_sam(sam)
    cache = None
    if sam.embedding_cache_dir and use_embedding_cache:
        # Entries of another shape (other weights under the same key, damage) are recomputed.
        shape = (1, model.prompt_encoder.embed_dim, *model.prompt_encoder.image_embedding_size)
        max_gb = sam.embedding_cache_max_gb
        cache = EmbeddingCache(
            sam.embedding_cache_dir, embedding_shape=shape, max_bytes=int(max_gb * 1e9) if max_gb else None
        )
    return SamRefiner(
        sam=model,
        prompt=prompt,
        cascade=cascade,
        embedding_cache=cache,
        weights_id=weights_identity(sam),
        compile_encoder=sam.compile,
    )
