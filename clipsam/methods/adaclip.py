"""AdaCLIP (Cao et al., ECCV 2024): hybrid (static + dynamic) learnable prompts in both CLIP
towers and hybrid semantic fusion (HSF) of the image feature, trained on an auxiliary dataset.

Restated from its public reference code, github caoyunkang/AdaCLIP at commit
e27ee32bf19be149795c8c8972d4c3c88cd5a496 (files and lines of that commit), written anew for
open_clip 3.x (batch-first blocks):

1. Input (``method/trainer.py`` 56-66, ``dataset/base_dataset.py`` 100-128): the ORIGINAL image
   squash-resized to 518 by PIL bicubic, CLIP-normalised; masks resized to 518, > 0.5
   (:func:`input_specs`: clipsam's ``pil_bicubic`` input). The auxiliary dataset's TEST split
   trains (``base_dataset.py`` 45), with APRIL-GAN's 2 x 2 mosaics at rate 0.2 on MVTec-AD
   (``dataset/mvtec.py``: ``aug_rate=0.2``; 0 for VisA and the medical sets).
2. Backbone (``method/custom_clip.py`` 608-672, ``method/clip_model.py`` 382-412): ViT-L-14-336
   rebuilt for 518 px from its architecture config (``model_configs/ViT-L-14-336.json``, no
   ``quick_gelu`` entry, so the OpenAI weights run with exact GELU: ``quick_gelu: false``), the
   24 x 24 positional grid resized to 37 x 37 bicubically, align_corners False, no antialias
   (``pos_interpolation: bicubic``). The feature layers are the quarter depths
   ``[d/4, d/2, 3d/4, d]`` (``train.py`` 46-49: 6, 12, 18, 24; ``feature_layers: null``).
3. Static prompts (``method/adaclip.py`` 35-58, ``PromptLayer.__init__``): per tower, one
   (length, width) tensor per prompted layer, N(0, 0.02) (``prompting_length`` 5,
   ``prompting_depth`` 4; ``train.py`` 164-169).
4. Dynamic prompts (``adaclip.py`` 405-414 ``generate_and_set_dynamic_promtps``, 11-33
   ``ProjectLayer``, 387-397): the plain CLIP image embedding e (pooled, projected, not
   normalised; no gradient) goes through ``prompting_length`` linear heads per tower,
   head_j: D -> width, giving (B, length, width) prompts shared by all prompted layers
   (:func:`generate_dynamic_prompts`). Hybrid prompts = dynamic + static of the layer
   (``adaclip.py`` 69-76, 104-111; :func:`hybrid_prompts`).
5. Visual insertion (``adaclip.py`` 98-137 ``forward_visual``, 417-475 ``encode_image``): before
   block 0 the prompt tokens are APPENDED after the class and patch tokens; before blocks
   1 .. depth-1 the last ``length`` tokens are REPLACED by that layer's prompts; later blocks
   keep them in the sequence. The tokens a feature layer hands on exclude them (line 133); the
   image feature is the class token after all blocks, ``ln_post`` and the projection
   (:func:`insert_visual_prompts`, :func:`encode_prompted_image`).
6. Text insertion (``adaclip.py`` 63-96 ``forward_text``, 490-507 ``encode_text``): block 0 sees
   the sentence unchanged; before blocks 1 .. depth-1 the tokens at positions 1 .. length (right
   after [SOS], the sentence's first words: the templates have no placeholders) are REPLACED by
   that layer's prompts (:func:`insert_text_prompts`, :func:`encode_prompted_text`). Both towers
   cast the inserted prompts to float16 (lines 87, 118, 123; ``prompt_fp16``).
7. Text features (``adaclip.py`` 146-230 ``TextEmbebddingLayer``): 7 normal states x 4 templates
   and 5 anomalous states x 4 templates of the category name (``-`` -> space); per state the
   sentences' unit embeddings averaged and renormalised: t = (t_n, t_a) (:func:`state_sentences`,
   :func:`state_text_features`). With dynamic text prompts each image has its own t.
8. Projections (``adaclip.py`` 375-385, 477-488 ``proj_visual_tokens``): per feature layer a
   linear C -> D on the patch tokens (class token dropped), L2-normalised; a linear D -> D on the
   image feature, L2-normalised. These, the prompts and the generators are the trained
   parameters (``trainer.py`` 69-76).
9. Similarity (``adaclip.py`` 509-545): per layer l, logits z_l = 100 p_l t (B, N, 2).
10. HSF (``adaclip.py`` 233-286 ``HybridSemanticFusion``; the code's "upgraded" variant): the
    anomaly probability of each patch, softmax(mean_l z_l)[a]; the top 5 K patches
    (K = ``k_clusters`` 20); K-means (K clusters) on their features of all layers concatenated;
    each cluster's centre = the mean of its members' features over all layers; the fused
    feature = the L2-normalised mean of the K centres (:func:`hsf_feature`,
    :func:`kmeans_labels`). Image feature g = normalise(0.2 fused + 0.8 c) (line 517-521;
    :func:`fuse_image_feature`); image score = softmax(100 g t)[a] (lines 525-527, 540).
11. Maps (lines 529-545): each layer's logits on the h x w grid bilinearly (align_corners True)
    to 518. Test: softmax over (n, a) of the mean of the layers' logits, map = (p_a + 1 - p_n)/2
    (= p_a), then a Gaussian sigma 4 (``trainer.py`` 194). Training: each layer's own softmax.
12. Loss (``trainer.py`` 103-141, ``loss.py``): focal(image probabilities, label) + sum over the
    layers of [focal(layer probabilities, gt) + dice(p_a, gt) + dice(p_n, 1 - gt)]. The
    reference trains with batch 1 and squeezes the mask to (S, S), so its ``BinaryDiceLoss``
    takes each image ROW as a sample: the dice is the mean over rows (``dice_per_row: true``;
    :func:`adaclip_loss`).
13. Schedule (``train.py`` 17, 138-179; ``trainer.py`` 87): seed 111, 5 epochs, batch 1, AdamW
    lr 0.01 betas (0.5, 0.999) (weight decay 0.01, AdamW's default), the forward under CUDA
    float16 autocast (line 567; ``amp``). Train on MVTec-AD (+ ColonDB), test on VisA, and
    VisA (+ ClinicDB) -> MVTec-AD (README, "Corrections"; ``train.sh``).

Differences to the reference (each a key, the reference's value the default, or listed here):

- Batches: the reference refuses batch sizes other than 1 (its dynamic text prompts broadcast
  only over one image); here every image gets its own text features, so any batch gives each
  image the reference's batch-1 result (the loss is then the mean over the batch).
- K-means: a seeded k-means++ + Lloyd in torch (:func:`kmeans_labels`) instead of scikit-learn's
  unseeded ``KMeans(n_init="auto")``; clusters never come back empty (at most the number of
  selected patches). The labels carry no gradient in either.
- Prompt widths: text prompts and the text generator are as wide as the text tower (the
  reference uses the embedding width D; both are 768 for ViT-L-14-336). The reference's unused
  static text prompt of block 0 and the generator of a disabled branch are not created.
- Similarity, HSF and softmaxes run in float32 after the autocast towers (``amp``).
- Not reproduced: the auxiliary medical sets (ColonDB / ClinicDB; the configs train on MVTec-AD
  or VisA alone), and the choice of the best epoch by pixel F1 on the TEST set (``train.py``
  118-127): clipsam keeps the last epoch.

Dimension symbols: B batch, N = h * w patch tokens, C vision width, W text width, D embedding
width, L prompt length, S the model's input side, P sentences.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from clipsam.errors import ConfigError
from clipsam.inputs import InputSpec
from clipsam.losses import dice_loss, focal_loss
from clipsam.methods._openclip import (
    DTYPES,
    FrozenClipMixin,
    build_open_clip,
    check_vit,
    pil_input_specs,
    resize_images,
)
from clipsam.methods.base import MapOutput, MapProducer
from clipsam.models.clip import gaussian_blur

__all__ = [
    "CONFIG",
    "AdaClip",
    "AdaClipConfig",
    "AdaClipParameters",
    "adaclip_loss",
    "build",
    "encode_prompted_image",
    "encode_prompted_text",
    "fuse_image_feature",
    "generate_dynamic_prompts",
    "hsf_feature",
    "hybrid_prompts",
    "insert_text_prompts",
    "insert_visual_prompts",
    "kmeans_labels",
    "state_sentences",
    "state_text_features",
]

_KEY = "model.method_config"

#: ``TextEmbebddingLayer`` (``method/adaclip.py`` 151-160): states and templates.
NORMAL_STATES: tuple[str, ...] = (
    "{}", "flawless {}", "perfect {}", "unblemished {}", "{} without flaw", "{} without defect", "{} without damage",
)  # fmt: skip
ANOMALOUS_STATES: tuple[str, ...] = ("damaged {}", "broken {}", "{} with flaw", "{} with defect", "{} with damage")
TEMPLATES: tuple[str, ...] = (
    "a bad photo of a {}.", "a low resolution photo of the {}.", "a bad photo of the {}.", "a cropped photo of the {}.",
)  # fmt: skip


@dataclass
class AdaClipConfig:
    """AdaCLIP's settings (``model.method_config`` when ``model.method=adaclip``).

    Attributes:
        model_name: open_clip architecture (``ViT-L-14-336``; ``clipsam-tiny-240`` for tests).
        pretrained: open_clip tag (``openai``) or local file; ``None``/``""``: random weights.
        cache_dir: open_clip's weight cache.
        quick_gelu: Build with QuickGELU (False: the reference rebuilds the model from its
            architecture config, which runs the OpenAI weights with exact GELU).
        pos_interpolation: ``"bicubic"`` (the reference: built at the native size, the grid
            resized bicubically without antialias) or ``"open_clip"`` (open_clip's resize).
        input_size: Side the original is squash-resized to (518); ``None``: the frame size.
        feature_layers: 1-based vision blocks whose patch tokens make the maps; ``None``: the
            reference's quarter depths (6, 12, 18, 24 of 24).
        prompting_depth: Prompts go into blocks 0 .. depth-1 of each prompted tower (4).
        prompting_length: Prompt tokens per layer (5).
        prompting_type: ``"S"`` static, ``"D"`` dynamic, ``"SD"`` both (hybrid), ``""`` none.
        prompting_branch: ``"V"`` vision tower, ``"L"`` text tower, ``"VL"`` both, ``""`` none.
        use_hsf: Fuse the clustered anomalous patch features into the image feature (True).
        k_clusters: K of HSF's K-means (20); HSF clusters the top ``5 K`` patches.
        hsf_tokens_per_cluster: The 5 of ``5 K``.
        hsf_alpha: Weight of the clustered feature in the image feature (0.2).
        kmeans_iters: Most Lloyd iterations of the K-means (scikit-learn's default 300).
        logit_scale: The 100 of ``softmax(100 cos)``.
        prompt_fp16: Round the inserted prompts through float16, as the reference's ``.half()``.
        amp: Run the towers and projections under float16 autocast on CUDA, as the reference's
            ``torch.cuda.amp.autocast`` forward (no effect on CPU).
        smoothing_sigma: Gaussian sigma of the test map in input pixels (4; 0 disables).
        image_score: ``"clip_global"``: the reference's softmax(100 g t)[a], also after a refiner;
            ``"max"``: the maximum of the (fused) map.
        dice_per_row: The reference's dice over image rows (its batch-1 mask squeeze); False:
            one dice per image.
        focal_gamma: Focal-loss gamma (2).
        object_name: Object name in the prompts: ``raw`` (the reference: the category name,
            ``-`` -> space), ``category`` or ``generic`` (:func:`clipsam.prompts.object_name_for`).
        frozen_dtype: dtype of the frozen open_clip weights.
        seed: Seed of random weights, of the trained parameters' initialisation and of K-means.
    """

    model_name: str = "ViT-L-14-336"
    pretrained: str | None = "openai"
    cache_dir: str | None = None
    quick_gelu: bool | None = False
    pos_interpolation: Literal["bicubic", "open_clip"] = "bicubic"
    input_size: int | None = 518
    feature_layers: list[int] | None = None
    prompting_depth: int = 4
    prompting_length: int = 5
    prompting_type: str = "SD"
    prompting_branch: str = "VL"
    use_hsf: bool = True
    k_clusters: int = 20
    hsf_tokens_per_cluster: int = 5
    hsf_alpha: float = 0.2
    kmeans_iters: int = 300
    logit_scale: float = 100.0
    prompt_fp16: bool = True
    amp: bool = True
    smoothing_sigma: float = 4.0
    image_score: Literal["clip_global", "max"] = "clip_global"
    dice_per_row: bool = True
    focal_gamma: float = 2.0
    object_name: Literal["raw", "category", "generic"] = "raw"
    frozen_dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    seed: int = 0

    def __post_init__(self) -> None:
        if self.feature_layers is not None:
            self.feature_layers = [int(v) for v in self.feature_layers]
            if not self.feature_layers or any(b <= a for a, b in zip(self.feature_layers, self.feature_layers[1:])):
                raise ConfigError(f"{_KEY}.feature_layers={self.feature_layers}: give increasing 1-based blocks, e.g. [6, 12, 18, 24].")
            if self.feature_layers[0] < 1:
                raise ConfigError(f"{_KEY}.feature_layers={self.feature_layers}: blocks are 1-based.")
        if set(self.prompting_type) - set("SD") or len(set(self.prompting_type)) != len(self.prompting_type):
            raise ConfigError(f"{_KEY}.prompting_type={self.prompting_type!r}: use 'S', 'D', 'SD' or ''.")
        if set(self.prompting_branch) - set("VL") or len(set(self.prompting_branch)) != len(self.prompting_branch):
            raise ConfigError(f"{_KEY}.prompting_branch={self.prompting_branch!r}: use 'V', 'L', 'VL' or ''.")
        if self.prompting_branch and not self.prompting_type:
            raise ConfigError(
                f"{_KEY}.prompting_branch={self.prompting_branch!r} needs a prompting_type ('S', 'D' or 'SD'): "
                "the reference refuses prompted branches without prompts."
            )
        if self.prompting_depth < 1 or self.prompting_length < 1:
            raise ConfigError(f"{_KEY}.prompting_depth and prompting_length must be >= 1.")
        if self.k_clusters < 1 or self.hsf_tokens_per_cluster < 1 or self.kmeans_iters < 1:
            raise ConfigError(f"{_KEY}.k_clusters, hsf_tokens_per_cluster and kmeans_iters must be >= 1.")
        if not 0.0 <= self.hsf_alpha <= 1.0:
            raise ConfigError(f"{_KEY}.hsf_alpha={self.hsf_alpha} must lie in [0, 1].")
        if self.logit_scale <= 0 or self.smoothing_sigma < 0:
            raise ConfigError(f"{_KEY}.logit_scale must be > 0 and smoothing_sigma >= 0.")
        if self.image_score not in ("clip_global", "max"):
            raise ConfigError(f"{_KEY}.image_score={self.image_score!r}: use 'clip_global' or 'max'.")
        if self.object_name not in ("raw", "category", "generic"):
            raise ConfigError(f"{_KEY}.object_name={self.object_name!r}: use 'raw', 'category' or 'generic'.")
        if self.pos_interpolation not in ("bicubic", "open_clip"):
            raise ConfigError(f"{_KEY}.pos_interpolation={self.pos_interpolation!r}: use 'bicubic' or 'open_clip'.")
        if self.frozen_dtype not in DTYPES:
            raise ConfigError(f"{_KEY}.frozen_dtype={self.frozen_dtype!r}: use one of {list(DTYPES)}.")
        if self.input_size is not None and self.input_size < 1:
            raise ConfigError(f"{_KEY}.input_size={self.input_size} must be positive or null.")

    @property
    def visual_prompts(self) -> bool:
        """Whether the vision tower is prompted (``V`` in ``prompting_branch``)."""
        return "V" in self.prompting_branch

    @property
    def text_prompts(self) -> bool:
        """Whether the text tower is prompted (``L`` in ``prompting_branch``)."""
        return "L" in self.prompting_branch


CONFIG = AdaClipConfig


# ---------------------------------------------------------------------- pure pieces
def hybrid_prompts(static: Tensor | None, dynamic: Tensor | None) -> Tensor:
    """One layer's prompts: dynamic + static (``SD``), or either alone (``adaclip.py`` 69-76).

    Args:
        static: (L, W) the layer's static prompts, or None.
        dynamic: (B, L, W) the image's dynamic prompts, or None.

    Returns:
        (B, L, W), or (1, L, W) for static prompts alone.
    """
    if static is None and dynamic is None:
        raise ValueError("hybrid_prompts needs static or dynamic prompts")
    if dynamic is None:
        return static.unsqueeze(0)
    if static is None:
        return dynamic
    return dynamic + static.unsqueeze(0)


def generate_dynamic_prompts(embedding: Tensor, heads: Sequence[nn.Module]) -> Tensor:
    """Dynamic prompts from the image: token j = head_j(e) (``adaclip.py`` 405-414, 11-33).

    Args:
        embedding: (B, D) the plain CLIP image embedding e (pooled, projected, not normalised).
        heads: L linear maps D -> W, one per prompt token.

    Returns:
        (B, L, W).
    """
    return torch.stack([head(embedding) for head in heads], dim=1)


def _as_prompt(context: Tensor, dtype: torch.dtype, fp16: bool) -> Tensor:
    """The prompts as they enter a tower: rounded through float16 (``.half()``) when ``fp16``."""
    return (context.half() if fp16 else context).to(dtype)


def insert_visual_prompts(x: Tensor, context: Tensor, layer: int) -> Tensor:
    """The vision tower's prompts before block ``layer`` (0-based; ``adaclip.py`` 117-126).

    Block 0: the L prompt tokens are appended after the class and patch tokens; later blocks:
    the last L tokens (the previous block's outputs at the prompt positions) are replaced.

    Args:
        x: (B, 1 + N, C) before block 0, else (B, 1 + N + L, C).
        context: (B or 1, L, C) the layer's prompts (broadcast over the batch).
        layer: 0-based block index, < prompting_depth.

    Returns:
        (B, 1 + N + L, C).
    """
    context = context.to(x.dtype).expand(x.shape[0], -1, -1)
    if layer == 0:
        return torch.cat([x, context], dim=1)
    return torch.cat([x[:, : x.shape[1] - context.shape[1]], context], dim=1)


def insert_text_prompts(x: Tensor, context: Tensor) -> Tensor:
    """The text tower's prompts before one of blocks 1 .. depth-1 (``adaclip.py`` 84-88): the L
    tokens after [SOS] are replaced.

    Args:
        x: (P, T, W) token states of P sentences of T tokens.
        context: (P or 1, L, W) the layer's prompts.

    Returns:
        (P, T, W).
    """
    length = context.shape[1]
    context = context.to(x.dtype).expand(x.shape[0], -1, -1)
    return torch.cat([x[:, :1], context, x[:, 1 + length :]], dim=1)


def encode_prompted_image(
    visual: nn.Module,
    images: Tensor,
    contexts: Sequence[Tensor],
    layers: Sequence[int],
    *,
    fp16: bool = False,
) -> tuple[Tensor, list[Tensor]]:
    """open_clip's vision tower with prompts inserted before blocks 0 .. len(contexts)-1.

    Args:
        visual: open_clip ``VisionTransformer`` (batch-first, class-token pooled).
        images: (B, 3, S, S) CLIP-normalised, in the tower's dtype.
        contexts: per prompted block (B or 1, L, C); empty: the plain tower.
        layers: 1-based blocks whose tokens are returned.
        fp16: Round the prompts through float16 (the reference's cast).

    Returns:
        ``(pooled, tokens)``: (B, D) the class token after ``ln_post`` and the projection, and per
        layer (B, 1 + N, C) the block's output WITHOUT the prompt tokens (class token first).
    """
    x = visual._embeds(images)
    count = x.shape[1]
    taps: dict[int, Tensor] = {}
    for index, block in enumerate(visual.transformer.resblocks):
        if index < len(contexts):
            x = insert_visual_prompts(x, _as_prompt(contexts[index], x.dtype, fp16), index)
        x = block(x)
        if index + 1 in layers:
            taps[index + 1] = x[:, :count]
    pooled, _ = visual._pool(x)
    if visual.proj is not None:
        pooled = pooled @ visual.proj
    return pooled, [taps[layer] for layer in layers]


def encode_prompted_text(
    clip_model: nn.Module,
    tokens: Tensor,
    contexts: Sequence[Tensor] = (),
    *,
    fp16: bool = False,
) -> Tensor:
    """open_clip's text tower with prompts replacing positions 1 .. L before blocks 1 .. len(contexts).

    ``contexts[i]`` goes in before block ``i + 1`` (0-based); block 0 sees the sentence as is.

    Args:
        clip_model: open_clip ``CLIP`` (text tower on the model).
        tokens: (P, T) int64 token ids.
        contexts: per prompted block from block 1 on, (P or 1, L, W).
        fp16: Round the prompts through float16 (the reference's cast).

    Returns:
        (P, D) text features, not normalised.
    """
    from open_clip.transformer import text_global_pool

    dtype = clip_model.transformer.get_cast_dtype()
    x = clip_model.token_embedding(tokens).to(dtype) + clip_model.positional_embedding.to(dtype)
    for index, block in enumerate(clip_model.transformer.resblocks):
        if 1 <= index <= len(contexts):
            x = insert_text_prompts(x, _as_prompt(contexts[index - 1], x.dtype, fp16))
        x = block(x, attn_mask=clip_model.attn_mask)
    x = clip_model.ln_final(x)
    pooled = text_global_pool(x, tokens, clip_model.text_pool_type, eos_token_id=getattr(clip_model, "text_eos_id", None))
    projection = clip_model.text_projection
    if isinstance(projection, nn.Linear):
        return projection(pooled)
    return pooled @ projection


def state_sentences(object_name: str) -> tuple[list[str], list[str]]:
    """The normal and anomalous sentences of ``object_name`` (``adaclip.py`` 210-219): for each
    state, each template; ``-`` in the name becomes a space (line 213). 28 and 20 sentences."""
    name = object_name.replace("-", " ")
    normal = [template.format(state.format(name)) for state in NORMAL_STATES for template in TEMPLATES]
    anomalous = [template.format(state.format(name)) for state in ANOMALOUS_STATES for template in TEMPLATES]
    return normal, anomalous


def state_text_features(features: Tensor, normal_count: int) -> Tensor:
    """t = (t_n, t_a) from the sentences' features (``adaclip.py`` 221-228, 205-206): each
    sentence L2-normalised, averaged per state, renormalised.

    Args:
        features: (P, D) the sentences' features, the ``normal_count`` normal ones first.
        normal_count: How many of the P sentences are normal.

    Returns:
        (D, 2) unit columns (normal, anomalous).
    """
    unit = F.normalize(features.float(), dim=-1)
    states = [unit[:normal_count].mean(0), unit[normal_count:].mean(0)]
    return F.normalize(torch.stack(states, dim=1), dim=0)


def kmeans_labels(points: Tensor, clusters: int, *, iters: int = 300, seed: int = 0) -> Tensor:
    """K-means cluster labels as the reference's scikit-learn ``KMeans(n_init="auto")`` computes
    them: greedy k-means++ seeding (each new centre the best of ``2 + int(ln K)`` candidates drawn
    with probability proportional to the squared distance, the one that lowers the total squared
    distance most; seeded here, unseeded in the reference) then Lloyd iterations until no label
    changes (at most ``iters``); an emptied cluster keeps its centre (HSF's ``KMeans``).

    Args:
        points: (M, F) features (no gradient is taken).
        clusters: K, clamped to M.
        iters: Most Lloyd iterations.
        seed: Seed of the k-means++ draws.

    Returns:
        (M,) int64 labels in [0, K), on ``points``' device.
    """
    device = points.device
    x = points.detach().float().cpu()
    count = x.shape[0]
    clusters = max(1, min(int(clusters), count))
    trials = 2 + int(math.log(clusters))
    generator = torch.Generator().manual_seed(int(seed))
    chosen = [int(torch.randint(count, (1,), generator=generator))]
    nearest = ((x - x[chosen[0]]) ** 2).sum(-1)  # squared distance to the closest chosen centre
    for _ in range(1, clusters):
        total = float(nearest.sum())
        weights = nearest / total if total > 0 else torch.ones(count) / count
        candidates = torch.multinomial(weights, trials, replacement=True, generator=generator)  # (T,)
        with_candidate = torch.minimum(nearest[None], torch.cdist(x[candidates], x) ** 2)  # (T, M)
        best = int(with_candidate.sum(1).argmin())  # the candidate lowering the potential most
        chosen.append(int(candidates[best]))
        nearest = with_candidate[best]
    centres = x[chosen].clone()
    labels = torch.cdist(x, centres).argmin(1)
    for _ in range(int(iters)):
        for c in range(clusters):
            members = labels == c
            if bool(members.any()):
                centres[c] = x[members].mean(0)
        updated = torch.cdist(x, centres).argmin(1)
        if torch.equal(updated, labels):
            break
        labels = updated
    return labels.to(device)


def hsf_feature(
    patch_tokens: Sequence[Tensor],
    layer_logits: Sequence[Tensor],
    *,
    k_clusters: int = 20,
    tokens_per_cluster: int = 5,
    iters: int = 300,
    seed: int = 0,
) -> Tensor:
    """Hybrid semantic fusion (``adaclip.py`` 242-286): the clustered anomalous patch feature.

    The patches' anomaly probability softmax(mean_l z_l)[a]; the top ``tokens_per_cluster * K``
    patches; K-means on their features of all layers concatenated; per cluster the mean of its
    members' features over all layers; the normalised mean of those centres.

    Args:
        patch_tokens: per layer (B, N, D) unit patch features.
        layer_logits: per layer (B, N, 2) logits z_l = 100 p_l t.
        k_clusters: K.
        tokens_per_cluster: Patches selected per cluster (5).
        iters, seed: Of :func:`kmeans_labels`.

    Returns:
        (B, D) unit features (differentiable w.r.t. the patch features; the labels are not).
    """
    probs = torch.stack(list(layer_logits), dim=1).mean(1).softmax(-1)[..., 1]  # (B, N)
    count = min(probs.shape[1], int(tokens_per_cluster) * int(k_clusters))
    top = probs.topk(count, dim=1).indices  # (B, k)
    selected = torch.stack(
        [t.gather(1, top.unsqueeze(-1).expand(-1, -1, t.shape[-1])) for t in patch_tokens], dim=1
    )  # (B, L, k, D)
    fused = []
    for b in range(selected.shape[0]):
        members = selected[b]  # (L, k, D)
        stacked = members.permute(1, 0, 2).reshape(count, -1)  # (k, L * D): the layers side by side
        labels = kmeans_labels(stacked, k_clusters, iters=iters, seed=seed)
        centres = [members[:, labels == c].reshape(-1, members.shape[-1]).mean(0) for c in labels.unique()]
        fused.append(torch.stack(centres).mean(0))
    return F.normalize(torch.stack(fused), dim=-1)


def fuse_image_feature(image_feature: Tensor, clustered: Tensor, alpha: float = 0.2) -> Tensor:
    """g = normalise(alpha fused + (1 - alpha) c) (``adaclip.py`` 517-521). Args: (B, D) each."""
    return F.normalize(alpha * clustered + (1.0 - alpha) * image_feature, dim=-1)


def _dice(probs: Tensor, gt: Tensor, per_row: bool) -> Tensor:
    if per_row:  # the reference's (S, S) mask: every image row is one sample of BinaryDiceLoss
        rows = probs.shape[0] * probs.shape[1]
        return dice_loss(probs.reshape(rows, 1, -1), gt.reshape(rows, 1, -1))
    return dice_loss(probs, gt)


def adaclip_loss(
    layer_probs: Tensor,
    masks: Tensor,
    image_probs: Tensor,
    labels: Tensor,
    *,
    focal_gamma: float = 2.0,
    dice_per_row: bool = True,
) -> dict[str, Tensor]:
    """``focal(image probs, label) + sum_l [focal(P_l, gt) + dice(P_l[a], gt) + dice(P_l[n], 1 - gt)]``
    (``method/trainer.py`` 120-135, ``loss.py``).

    Args:
        layer_probs: (B, L, 2, S, S) per-layer softmax over (normal, anomalous).
        masks: (B, S, S) ground truth, > 0.5 anomalous.
        image_probs: (B, 2) softmax of the image logits.
        labels: (B,) image labels, 1 anomalous (> 0.5).
        focal_gamma: Focal gamma (2).
        dice_per_row: Dice over image rows (the reference's batch-1 squeeze), else per image.

    Returns:
        ``{"loss", "image_focal", "focal", "dice"}`` 0-d float32 (only ``loss`` carries gradients).
    """
    gt = (masks > 0.5).float()
    label = (labels.float() > 0.5).float().to(image_probs.device)
    image_focal = focal_loss(image_probs.float()[:, :, None, None], label[:, None, None], gamma=focal_gamma)
    layers = layer_probs.unbind(1)
    focal = sum(focal_loss(p, gt, gamma=focal_gamma) for p in layers)
    dice = sum(_dice(p[:, 1], gt, dice_per_row) + _dice(p[:, 0], 1.0 - gt, dice_per_row) for p in layers)
    loss = image_focal + focal + dice
    return {"loss": loss, "image_focal": image_focal.detach(), "focal": focal.detach(), "dice": dice.detach()}


# ---------------------------------------------------------------------- trained parameters
class AdaClipParameters(nn.Module):
    """Everything AdaCLIP trains (``method/trainer.py`` 69-76).

    Attributes:
        visual_static: ``prompting_depth`` tensors (L, C), vision blocks 0 .. depth-1 (``S`` + ``V``).
        text_static: ``prompting_depth - 1`` tensors (L, W), text blocks 1 .. depth-1 (``S`` + ``L``).
        visual_generator: L linears D -> C (``D`` + ``V``); text_generator: L linears D -> W (``D`` + ``L``).
        patch_projections: one linear C -> D per feature layer; cls_projection: linear D -> D.
    """

    def __init__(self, *, config: AdaClipConfig, vision_width: int, text_width: int, embed_dim: int, num_layers: int) -> None:
        super().__init__()
        static, dynamic = "S" in config.prompting_type, "D" in config.prompting_type
        depth, length = config.prompting_depth, config.prompting_length
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.seed)
            self.visual_static = nn.ParameterList(
                nn.Parameter(torch.randn(length, vision_width) * 0.02) for _ in range(depth if static and config.visual_prompts else 0)
            )
            self.text_static = nn.ParameterList(
                nn.Parameter(torch.randn(length, text_width) * 0.02) for _ in range(depth - 1 if static and config.text_prompts else 0)
            )
            self.visual_generator = nn.ModuleList(
                nn.Linear(embed_dim, vision_width) for _ in range(length if dynamic and config.visual_prompts else 0)
            )
            self.text_generator = nn.ModuleList(
                nn.Linear(embed_dim, text_width) for _ in range(length if dynamic and config.text_prompts else 0)
            )
            self.patch_projections = nn.ModuleList(nn.Linear(vision_width, embed_dim) for _ in range(num_layers))
            self.cls_projection = nn.Linear(embed_dim, embed_dim)

    def layer_prompts(self, static: nn.ParameterList, dynamic: Tensor | None, depth: int) -> list[Tensor]:
        """Per prompted block the hybrid prompts (B or 1, L, width); [] when the tower is unprompted."""
        if not len(static) and dynamic is None:
            return []
        return [hybrid_prompts(static[i] if len(static) else None, dynamic) for i in range(depth)]


# ---------------------------------------------------------------------- the producer
class AdaClip(FrozenClipMixin, MapProducer):
    """AdaCLIP map producer (trains only :attr:`learned`).

    Args:
        clip_model: open_clip ``CLIP`` (class-token ViT) built for ``input_size``.
        tokenizer: Its tokenizer.
        config: The settings.
        input_size: Side the model runs at.
    """

    name = "adaclip"
    trainable = True

    def __init__(self, *, clip_model: nn.Module, tokenizer, config: AdaClipConfig, input_size: int) -> None:
        super().__init__()
        self.config = config
        self.clip = clip_model
        self.tokenizer = tokenizer
        self.visual = check_vit(clip_model, _KEY, config.model_name)
        self.input_size = int(input_size)
        depth = len(self.visual.transformer.resblocks)
        text_depth = len(clip_model.transformer.resblocks)
        quarter = depth // 4
        self.feature_layers = list(config.feature_layers or ([quarter * i for i in range(1, 5)] if quarter else [depth]))
        if self.feature_layers[-1] > depth:
            raise ConfigError(f"{_KEY}.feature_layers={self.feature_layers}: {config.model_name} has {depth} vision blocks.")
        if config.visual_prompts and config.prompting_depth > depth or config.text_prompts and config.prompting_depth > text_depth:
            raise ConfigError(
                f"{_KEY}.prompting_depth={config.prompting_depth} exceeds the blocks of {config.model_name} "
                f"({depth} vision, {text_depth} text)."
            )
        context = int(clip_model.positional_embedding.shape[0])
        if config.text_prompts and config.prompting_length + 2 > context:
            raise ConfigError(f"{_KEY}.prompting_length={config.prompting_length} does not fit the {context}-token text context.")
        self.grid = self._patch_grid(_KEY)
        self.dtype = DTYPES[config.frozen_dtype]
        self._freeze_clip(self.dtype)
        vision_width = int(self.visual.conv1.out_channels)
        text_width = int(clip_model.ln_final.weight.shape[0])
        embed_dim = int(self.visual.output_dim)
        self.learned = AdaClipParameters(
            config=config, vision_width=vision_width, text_width=text_width, embed_dim=embed_dim, num_layers=len(self.feature_layers)
        )

    # ------------------------------------------------------------------ text
    def _sentence_tokens(self, object_name: str, device: torch.device) -> tuple[Tensor, int]:
        cache: dict[str, tuple[Tensor, int]] = self.__dict__.setdefault("_token_cache", {})
        cached = cache.get(object_name)
        if cached is None or cached[0].device != device:
            normal, anomalous = state_sentences(object_name)
            tokens = self.tokenizer(normal + anomalous)
            if bool((tokens[:, -1] != 0).any()):
                raise ConfigError(f"the prompts of {object_name!r} do not fit the {tokens.shape[1]}-token text context")
            cached = cache[object_name] = (tokens.to(device), len(normal))
        return cached

    def _encode_states(self, object_name: str, contexts: Sequence[Tensor], device: torch.device) -> Tensor:
        tokens, normal = self._sentence_tokens(object_name, device)
        feats = encode_prompted_text(self.clip, tokens, contexts, fp16=self.config.prompt_fp16)
        return state_text_features(feats, normal)  # (D, 2)

    def _frozen_states(self, object_name: str, device: torch.device) -> Tensor:
        """(D, 2) of the unprompted text tower, without gradients (cached by the caller)."""
        with torch.inference_mode(False), torch.no_grad(), torch.autocast(device.type, enabled=False):
            return self._encode_states(object_name, [], device).clone()

    def text_features(self, categories: Sequence[str], dynamic: Tensor | None = None) -> Tensor:
        """(B, D, 2) unit text features per image (normal, anomalous).

        Unprompted text tower: computed once per object name and cached (no gradient). Static
        prompts alone: once per object name per call. Dynamic prompts: once per image.

        Args:
            categories: B category names.
            dynamic: (B, L, W) the images' dynamic text prompts, or None.
        """
        device = self._device()
        if not self.config.text_prompts:
            return self._per_category_text(categories, self.config.object_name, self._frozen_states).float()
        depth = self.config.prompting_depth - 1
        names = [self.object_name(c) for c in categories]
        if dynamic is None:
            contexts = self.learned.layer_prompts(self.learned.text_static, None, depth)
            per_name = {name: self._encode_states(name, contexts, device) for name in dict.fromkeys(names)}
            return torch.stack([per_name[name] for name in names])
        out = []
        for b, name in enumerate(names):
            contexts = self.learned.layer_prompts(self.learned.text_static, dynamic[b : b + 1], depth)
            out.append(self._encode_states(name, contexts, device))
        return torch.stack(out)

    # ------------------------------------------------------------------ forward
    def forward(self, images: Tensor, categories: Sequence[str]) -> MapOutput:
        """Args: images (B, 3, H, W) CLIP-normalised; categories: B names (their object names go
        into the text prompts).

        Returns:
            :class:`MapOutput`: ``anomaly_map`` (B, H, W) in [0, 1] (the reference's smoothed
            test map), ``image_scores`` (B,); extras ``layer_probs`` (B, L, 2, S, S) per feature
            layer (the training maps), ``image_probs`` (B, 2), ``raw_map`` (B, S, S) unsmoothed.
        """
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be (B, 3, H, W), got {tuple(images.shape)}")
        if len(categories) != images.shape[0]:
            raise ValueError(f"got {len(categories)} categories for {images.shape[0]} images")
        config, learned = self.config, self.learned
        height, width = self.output_size(images)
        resized = resize_images(images.float(), self.input_size).to(self.dtype)
        device = images.device
        use_amp = bool(config.amp) and device.type == "cuda"
        with torch.autocast(device.type, dtype=torch.float16, enabled=use_amp):
            dynamic_visual = dynamic_text = None
            if len(learned.visual_generator) or len(learned.text_generator):
                with torch.no_grad():
                    embedding = self.clip.encode_image(resized)  # (B, D) e
                embedding = embedding.to(learned.cls_projection.weight.dtype)
                if len(learned.visual_generator):
                    dynamic_visual = generate_dynamic_prompts(embedding, learned.visual_generator)
                if len(learned.text_generator):
                    dynamic_text = generate_dynamic_prompts(embedding, learned.text_generator)
            contexts = learned.layer_prompts(learned.visual_static, dynamic_visual, config.prompting_depth)
            with torch.set_grad_enabled(torch.is_grad_enabled() and bool(contexts)):
                pooled, tokens = encode_prompted_image(self.visual, resized, contexts, self.feature_layers, fp16=config.prompt_fp16)
            text = self.text_features(categories, dynamic_text)  # (B, D, 2)
            patches = [F.normalize(proj(t[:, 1:].to(proj.weight.dtype)), dim=-1) for proj, t in zip(learned.patch_projections, tokens)]
            image_feature = F.normalize(learned.cls_projection(pooled.to(learned.cls_projection.weight.dtype)), dim=-1)
        with torch.autocast(device.type, enabled=False):
            text = text.float()
            patches = [p.float() for p in patches]
            layer_logits = [config.logit_scale * p @ text for p in patches]  # (B, N, 2) each
            image_feature = image_feature.float()
            if config.use_hsf:
                clustered = hsf_feature(
                    patches, layer_logits, k_clusters=config.k_clusters, tokens_per_cluster=config.hsf_tokens_per_cluster,
                    iters=config.kmeans_iters, seed=config.seed,
                )  # fmt: skip
                image_feature = fuse_image_feature(image_feature, clustered, config.hsf_alpha)
            image_logits = config.logit_scale * (image_feature.unsqueeze(1) @ text).squeeze(1)  # (B, 2)
            image_probs = image_logits.softmax(-1)
            size = (self.input_size, self.input_size)
            grids = [z.transpose(1, 2).reshape(z.shape[0], 2, self.grid, self.grid) for z in layer_logits]
            layer_maps = [F.interpolate(g, size=size, mode="bilinear", align_corners=True) for g in grids]
            layer_probs = torch.stack([m.softmax(1) for m in layer_maps], dim=1)  # (B, L, 2, S, S)
            probs = torch.stack(layer_maps, dim=1).mean(1).softmax(1)  # logits averaged, then softmax
            raw_map = (probs[:, 1] + 1.0 - probs[:, 0]) / 2.0
            anomaly_map = gaussian_blur(raw_map.detach(), config.smoothing_sigma)
            if anomaly_map.shape[-2:] != (height, width):
                anomaly_map = F.interpolate(anomaly_map[:, None], size=(height, width), mode="bilinear", align_corners=False)[:, 0]
            anomaly_map = anomaly_map.clamp(0.0, 1.0)
        image_scores = image_probs[:, 1].detach() if config.image_score == "clip_global" else self.score_maps(anomaly_map)
        return MapOutput(
            anomaly_map=anomaly_map,
            image_scores=image_scores,
            extras={"layer_probs": layer_probs, "image_probs": image_probs, "raw_map": raw_map.detach()},
        )

    def fused_image_scores(self, output: MapOutput, scores: Tensor) -> Tensor:
        """``image_score: clip_global``: the reference's image score stays the method's score after
        a refiner; ``max``: the maximum of the fused scores."""
        if self.config.image_score == "clip_global":
            return output.image_scores.float()
        return self.score_maps(scores)

    def loss(self, output: MapOutput, batch: Mapping[str, Any]) -> dict[str, Tensor]:
        """:func:`adaclip_loss` at the input size; needs ``batch["mask"]`` (B, H, W) and ``batch["label"]`` (B,)."""
        layer_probs = output.extras["layer_probs"]
        masks = batch["mask"].float().to(layer_probs.device)
        if masks.shape[-2:] != layer_probs.shape[-2:]:
            masks = F.interpolate(masks[:, None], size=layer_probs.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
        labels = torch.as_tensor(batch["label"], device=layer_probs.device)
        return adaclip_loss(
            layer_probs,
            masks,
            output.extras["image_probs"],
            labels,
            focal_gamma=self.config.focal_gamma,
            dice_per_row=self.config.dice_per_row,
        )


# ---------------------------------------------------------------------- registry hooks
def input_specs(config: AdaClipConfig, *, image_size: int) -> list[InputSpec]:
    """The reference's input: PIL bicubic squash of the original to ``input_size``, CLIP-normalised."""
    return pil_input_specs(config.input_size, image_size=image_size)


def checkpoint_meta(config: AdaClipConfig) -> dict[str, Any]:
    """What the trained prompts and projections depend on: the frozen CLIP (name, weights, the
    seed of random weights) and the feature layers."""
    return {
        "clip_model_name": config.model_name,
        "clip_pretrained": config.pretrained,
        "clip_seed": int(config.seed),
        "feature_layers": None if config.feature_layers is None else list(config.feature_layers),
    }


def check_checkpoint(meta: Mapping[str, Any], state: Mapping[str, Any], config: AdaClipConfig, *, where: str, key: str = _KEY) -> None:
    """Refuse weights trained on another frozen CLIP or other feature layers (they would load
    and give meaningless maps).

    Raises:
        WeightsError: naming the recorded and the configured value and the key to change.
    """
    from clipsam.errors import WeightsError

    if not any(k.startswith("learned.") for k in state):
        raise WeightsError(f"{where} holds no AdaCLIP weights (keys 'producer.learned.*'): pass a checkpoint written by `clipsam fit`")
    recorded = meta.get("clip_model_name")
    if recorded is not None and recorded != config.model_name:
        raise WeightsError(f"{where}: trained for CLIP '{recorded}' but {key}.model_name is '{config.model_name}': set {key}.model_name={recorded}")
    if "clip_pretrained" in meta:
        trained_on, configured = meta.get("clip_pretrained") or None, config.pretrained or None
        if trained_on != configured:
            raise WeightsError(f"{where}: trained on CLIP weights {key}.pretrained={trained_on!r} but {key}.pretrained is {configured!r}")
        if configured is None and "clip_seed" in meta and int(meta["clip_seed"]) != int(config.seed):
            raise WeightsError(f"{where}: trained on random CLIP weights of {key}.seed={meta['clip_seed']}, not {config.seed}")
    layers = None if config.feature_layers is None else list(config.feature_layers)
    if "feature_layers" in meta and meta["feature_layers"] != layers:
        raise WeightsError(f"{where}: trained with {key}.feature_layers={meta['feature_layers']} but this config has {layers}")


def build(config: AdaClipConfig, *, image_size: int) -> AdaClip:
    """Build AdaCLIP (fresh trained parameters, seeded) for frames of side ``image_size``."""
    input_size = int(config.input_size or image_size)
    clip_model, tokenizer = build_open_clip(
        section=_KEY,
        model_name=config.model_name,
        pretrained=config.pretrained,
        image_size=input_size,
        cache_dir=config.cache_dir,
        seed=config.seed,
        quick_gelu=config.quick_gelu,
        # "bicubic": built at its native size, then the grid resized as the reference does
        pos_interpolation="bicubic" if config.pos_interpolation == "bicubic" else "open_clip",
    )
    return AdaClip(clip_model=clip_model, tokenizer=tokenizer, config=config, input_size=input_size)
