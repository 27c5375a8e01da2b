"""SDP and SDP+ (CLIP-AD, Chen et al., arXiv 2311.00453): staged v-v path, feature surgery.

Restated from its public reference code (from ByChelsea/CLIP-AD; written anew for
open_clip 3.x, whose blocks are batch-first):

SDP (training-free), at ``input_size`` (240 for ViT-B-16-plus-240, a 15 x 15 grid):

1. text: 9 normal and 10 anomalous states x 22 templates, each embedding L2-normalised; the
   class vector is the mean of the largest DBSCAN cluster, L2-normalised
   (:func:`dbscan_class_vector`; ``dbscan_eps`` / ``dbscan_min_samples`` are config keys: the
   reference switches 0.5 / 15 to 1.5 / 25 when the dataset is named "visa");
2. staged dual path (:func:`staged_vv_forward`): the original path o_b is CLIP unchanged; block
   b also applies the v-v attention to ln_1(o_{b-1}); at the stage starts (blocks 1, 4, 7, 10 of
   12: every ``depth // 4`` blocks, the reference's L/4) the v-v path is reset to that output,
   otherwise the output is added (no FFN). At the taps (3, 6, 9, 12) the v-v tokens get o_b's
   class token, then ln_post and the projection;
3. feature surgery per tap (:func:`feature_surgery`), summed over the taps; the anomalous
   channel without the class token, reshaped to the grid, bilinear to ``input_size``, Gaussian
   (sigma 8);
4. image score (``image_score: category_minmax``, the reference's): per category, the min-max
   normalised text score ``softmax(100 F_cls . t)[a]`` (F_cls = the last tap's class embedding)
   plus the min-max normalised map maximum (CLIP-AD ``util/metrics.py``), halved to [0, 1]
   (:func:`category_minmax_image_scores`). That needs every image of a category: the producer
   returns both raw scores as ``extras["image_score_parts"]`` and :meth:`Sdp.category_image_scores`
   combines them when ``clipsam test`` has seen the whole category. A single image (predict,
   :class:`clipsam.Segmenter`, decision thresholds) gets the per-image stand-in, the mean of the
   text score and the map maximum; ``"mean"``, ``"text"`` and ``"map_max"`` use that per-image
   score for the metrics as well.

SDP+: four ``Linear(width -> embed)`` on the ORIGINAL path's tap tokens (no ln_post/proj,
class token dropped); ``map_l = softmax(100 cos(linear_l(o), t))[a]``, the logits bilinear
(align_corners True) to ``input_size``; trained with focal + dice per layer
(:meth:`SdpPlus.loss`); test map = SDP map + sum_l map_l, then the Gaussian (sigma 8 MVTec,
2 VisA in the reference).

The map in [0, 1]: the surgery score of the anomalous class is ``(w_a c_a - w_n c_n) / 2`` with
``w_a + w_n = 2`` and cosines ``c`` in [-1, 1], so it lies in [-1, 1] per tap and the raw SDP map
in [-T, T] (T taps); SDP+ adds L maps in [0, 1]. ``anomaly_map`` is the raw map mapped affinely
onto [0, 1] (``(raw + T) / (2T)``, SDP+ ``(raw + T) / (2T + L)``): strictly increasing and the
same for every image, so every pixel metric (AUROC, AP, F1-max, AUPRO) equals the reference's.

``reference_aliasing`` (default True, the reference's): CLIP-AD's code adds block b+1's
attention output IN PLACE to the tensor it stored as o_b's tap, so its "original" tap tokens (and
the class token swapped into the v-v taps) at every tap but the last are
``o_b + attn_{b+1}(ln_1(o_b))`` rather than o_b. ``False`` implements the method as the paper
describes it (SDP+ map 0.074 apart on the tiny parity model).

``text_fp16`` (default True, the reference's): CLIP-AD casts each DBSCAN class vector to float16
and normalises it in float16; without that rounding the class vectors differ by 2e-4, the text
score by 3e-3 and the SDP+ map by 6e-3 on the tiny parity model.

SDP+ training (CLIP-AD ``train.py``): the class vectors come from the TRAINING dataset's DBSCAN
settings (``fit_dbscan_eps`` / ``fit_dbscan_min_samples``: 0.5 / 15 for MVTec-AD, 1.5 / 25 for
VisA), the test's from ``dbscan_eps`` / ``dbscan_min_samples``; ground-truth masks are resized to
the input size and binarised at 0.5 (:meth:`SdpPlus.loss`).

Dimension symbols: B batch, T taps, N = 1 + h * w tokens, C token width, D embedding width,
S the model's input side.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
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
    encode_sentences,
    pil_input_specs,
    resize_images,
    vv_residual,
)
from clipsam.methods.base import MapOutput, MapProducer
from clipsam.models.clip import gaussian_blur
from clipsam.prompts import OBJECT_NAME_MODES

__all__ = [
    "ANOMALOUS_STATES",
    "CONFIG",
    "CONFIG_PLUS",
    "NORMAL_STATES",
    "TEMPLATES",
    "Sdp",
    "SdpConfig",
    "SdpPlus",
    "SdpPlusConfig",
    "build",
    "build_plus",
    "build_prompts",
    "category_minmax_image_scores",
    "dbscan_class_vector",
    "default_stage_starts",
    "feature_surgery",
    "staged_vv_forward",
]

NORMAL_STATES: tuple[str, ...] = (
    "flawless {}",
    "perfect {}",
    "unblemished {}",
    "{} without flaw",
    "{} without defect",
    "{} without damage",
    "{} without scratch",
    "{} without crack",
    "{} without contamination",
)
"""SDP's 9 normal states."""

ANOMALOUS_STATES: tuple[str, ...] = (
    "damaged {}",
    "imperfect {}",
    "blemished {}",
    "broken {}",
    "{} with flaw",
    "{} with defect",
    "{} with damage",
    "{} with scratch",
    "{} with crack",
    "{} with contamination",
)
"""SDP's 10 anomalous states."""

TEMPLATES: tuple[str, ...] = (
    "a cropped photo of the {}.",
    "a cropped photo of a {}.",
    "a close-up photo of a {}.",
    "a close-up photo of the {}.",
    "a bright photo of a {}.",
    "a bright photo of the {}.",
    "a dark photo of the {}.",
    "a dark photo of a {}.",
    "a jpeg corrupted photo of a {}.",
    "a jpeg corrupted photo of the {}.",
    "a blurry photo of the {}.",
    "a blurry photo of a {}.",
    "a photo of the {}.",
    "a photo of a {}.",
    "a photo of a large {}.",
    "a photo of the small {}.",
    "a photo of the large {}.",
    "a photo of a small {}.",
    "a photo of the {} for visual inspection.",
    "a photo of a {} for visual inspection.",
    "a photo of the {} for anomaly detection.",
    "a photo of a {} for anomaly detection.",
)
"""SDP's 22 templates, in CLIP-AD's order."""

_KEY = "model.method_config"
IMAGE_SCORES = ("category_minmax", "mean", "text", "map_max")


@dataclass
class SdpConfig:
    """SDP's settings (``model.method_config`` when ``model.method=sdp``).

    Attributes:
        model_name: open_clip architecture (``ViT-B-16-plus-240``; ``clipsam-tiny-240`` for tests).
        pretrained: open_clip tag or local file; ``None``/``""`` gives random weights (tests, demo).
        cache_dir: open_clip's weight cache (``None``: its default).
        input_size: Side the frame is squash-resized to (240); ``None`` runs at the frame size.
        layers: Tapped blocks, 1-based, increasing ([3, 6, 9, 12]; ``[1, 2, 3, 4]`` for the tiny preset).
        stage_starts: Blocks (1-based) where the v-v path restarts; must contain 1. ``None``:
            every ``depth // 4`` blocks from 1 (1, 4, 7, 10 for 12 blocks), as the reference's L/4.
        dbscan_eps: DBSCAN radius on the unit text embeddings (reference: 0.5 MVTec, 1.5 VisA).
        dbscan_min_samples: DBSCAN core size (reference: 15 MVTec, 25 VisA).
        smoothing_sigma: Gaussian sigma in pixels of the input size (8; 0 disables).
        fit_dbscan_eps: DBSCAN radius of the class vectors while training (SDP+; the training
            dataset's setting in the reference); ``None``: ``dbscan_eps``.
        fit_dbscan_min_samples: DBSCAN core size while training; ``None``: ``dbscan_min_samples``.
        image_score: ``"category_minmax"`` (the reference's: per category, min-max of the text
            score plus min-max of the map maximum; module doc, step 4), ``"mean"`` of the text
            score and the unit map maximum per image, ``"text"`` or ``"map_max"``.
        text_logit_scale: Scale of the image (class-token) text logits (100).
        object_name: The prompts' class name (:func:`clipsam.prompts.object_name_for`): ``"raw"``
            (the category as on disk, ``metal_nut``, ``pcb1``: CLIP-AD's), ``"category"`` or
            ``"generic"``.
        reference_aliasing: Reproduce CLIP-AD's in-place aliasing of the tap tokens (module doc;
            True, the reference's; False, the paper's description).
        text_fp16: Round each class vector to float16 and normalise it in float16, as CLIP-AD's
            prompt ensemble does (True, the reference's).
        frozen_dtype: dtype of the frozen open_clip weights.
        seed: Seed of random weights (and of SDP+'s linear layers).
    """

    model_name: str = "ViT-B-16-plus-240"
    pretrained: str | None = "laion400m_e31"
    cache_dir: str | None = None
    input_size: int | None = 240
    layers: list[int] = field(default_factory=lambda: [3, 6, 9, 12])
    stage_starts: list[int] | None = None
    dbscan_eps: float = 0.5
    dbscan_min_samples: int = 15
    fit_dbscan_eps: float | None = None
    fit_dbscan_min_samples: int | None = None
    smoothing_sigma: float = 8.0
    image_score: Literal["category_minmax", "mean", "text", "map_max"] = "category_minmax"
    text_logit_scale: float = 100.0
    object_name: Literal["category", "raw", "generic"] = "raw"
    reference_aliasing: bool = True
    text_fp16: bool = True
    frozen_dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    seed: int = 0

    def __post_init__(self) -> None:
        self.layers = [int(v) for v in self.layers]
        if not self.layers or self.layers[0] < 1 or any(b <= a for a, b in zip(self.layers, self.layers[1:])):
            raise ConfigError(f"{_KEY}.layers={self.layers}: give increasing 1-based blocks, e.g. [3, 6, 9, 12].")
        if self.stage_starts is not None:
            self.stage_starts = sorted({int(v) for v in self.stage_starts})
            if not self.stage_starts or self.stage_starts[0] != 1:
                raise ConfigError(
                    f"{_KEY}.stage_starts={self.stage_starts} must contain 1 (the v-v path starts at block 1); "
                    "null gives the reference's L/4 stages."
                )
        for eps_key, samples_key in (("dbscan_eps", "dbscan_min_samples"), ("fit_dbscan_eps", "fit_dbscan_min_samples")):
            eps, samples = getattr(self, eps_key), getattr(self, samples_key)
            if (eps is not None and eps <= 0) or (samples is not None and samples < 1):
                raise ConfigError(f"{_KEY}.{eps_key}={eps} must be > 0 and {_KEY}.{samples_key}={samples} >= 1.")
        if self.smoothing_sigma < 0:
            raise ConfigError(f"{_KEY}.smoothing_sigma={self.smoothing_sigma} must be >= 0 (0 disables).")
        for key, value, choices in (
            ("image_score", self.image_score, IMAGE_SCORES),
            ("object_name", self.object_name, OBJECT_NAME_MODES),
            ("frozen_dtype", self.frozen_dtype, tuple(DTYPES)),
        ):
            if value not in choices:
                raise ConfigError(f"{_KEY}.{key}={value!r} is not a choice: use one of {list(choices)}.")
        if self.input_size is not None and self.input_size < 1:
            raise ConfigError(f"{_KEY}.input_size={self.input_size} must be positive or null.")


@dataclass
class SdpPlusConfig(SdpConfig):
    """SDP+'s settings (``model.method_config`` when ``model.method=sdp_plus``): SDP's keys and

    Attributes:
        logit_scale: Scale of the linear layers' patch-text logits (100).
        focal_gamma: Focal-loss gamma (2).

    Training itself (Adam lr 1e-4, batch 8, 5 epochs, seed 42 in the reference) is set in the
    optimizer / trainer / data sections.
    """

    logit_scale: float = 100.0
    focal_gamma: float = 2.0


CONFIG = SdpConfig
CONFIG_PLUS = SdpPlusConfig


# ---------------------------------------------------------------------- pure helpers
def build_prompts(object_name: str) -> dict[str, list[str]]:
    """SDP's ensemble for one object name: 198 normal and 220 anomalous sentences, state-major."""
    return {
        "normal": [t.format(s.format(object_name)) for s in NORMAL_STATES for t in TEMPLATES],
        "anomalous": [t.format(s.format(object_name)) for s in ANOMALOUS_STATES for t in TEMPLATES],
    }


def dbscan_class_vector(embeddings: Tensor, *, eps: float, min_samples: int, fp16: bool = False) -> Tensor:
    """Class vector = L2-normalised mean of the largest DBSCAN cluster of the prompt embeddings.

    Ties go to the lowest cluster label (as ``np.argmax`` of the counts). When DBSCAN finds no
    cluster (all points noise; the reference crashes there) the mean of all embeddings is used
    and a warning says so.

    Args:
        embeddings: (P, D) L2-normalised prompt embeddings of one class.
        eps: DBSCAN radius (Euclidean).
        min_samples: DBSCAN core-point size.
        fp16: cast the cluster mean to float16 and divide it by its float16 norm, as CLIP-AD's
            prompt ensemble does (the result is float16-representable).

    Returns:
        (D,) float32, unit norm.
    """
    import numpy as np
    from sklearn.cluster import DBSCAN

    data = embeddings.detach().float().cpu().numpy()
    labels = DBSCAN(eps=eps, min_samples=min_samples).fit(data).labels_
    clustered = labels[labels >= 0]
    if clustered.size == 0:
        warnings.warn(
            f"DBSCAN (eps={eps}, min_samples={min_samples}) found no cluster among {len(data)} prompt "
            "embeddings; using the mean of all of them (raise model.method_config.dbscan_eps)",
            stacklevel=2,
        )
        chosen = data
    else:
        chosen = data[labels == int(np.argmax(np.bincount(clustered)))]
    mean = torch.from_numpy(chosen.mean(axis=0))  # (D,) float32, CPU (the rounding below is CPU's)
    if fp16:
        half = mean.half()
        return (half / half.norm()).float().to(embeddings.device)
    return F.normalize(mean, dim=0).to(embeddings.device)


def feature_surgery(features: Tensor, text: Tensor) -> Tensor:
    """CLIP feature surgery: class-weighted similarities minus their mean over classes.

    ``p = softmax_k(F_cls . t_k)`` (no temperature), ``w_k = p_k / mean_k' p_k'``,
    ``S_ik = w_k F_i . t_k - mean_k' (w_k' F_i . t_k')``.

    Args:
        features: (B, N, D) L2-normalised tokens, the class token first.
        text: (B, D, K) L2-normalised class vectors (K = 2: normal, anomalous).

    Returns:
        (B, N, K) float32 (the class token's row included).
    """
    features, text = features.float(), text.float()
    probs = torch.bmm(features[:, :1], text).softmax(-1)  # (B, 1, K)
    weights = probs / probs.mean(-1, keepdim=True)  # (B, 1, K)
    weighted = torch.bmm(features, text) * weights  # (B, N, K)
    return weighted - weighted.mean(-1, keepdim=True)


def default_stage_starts(depth: int) -> list[int]:
    """The reference's stage starts generalised: every ``max(1, depth // 4)`` blocks from 1.

    ``default_stage_starts(12) == [1, 4, 7, 10]``, ``default_stage_starts(24) == [1, 7, 13, 19]``.
    """
    step = max(1, depth // 4)
    return list(range(1, depth + 1, step))


def staged_vv_forward(
    visual: nn.Module,
    images: Tensor,
    layers: Sequence[int],
    stage_starts: Sequence[int],
    *,
    reference_aliasing: bool = False,
) -> tuple[list[Tensor], list[Tensor]]:
    """Run the dual path of SDP through an open_clip ``VisionTransformer``.

    Original path: ``o_b = block_b(o_{b-1})`` unchanged. v-v path: ``r_b = ls_1(VV_b(ln_1(o_{b-1})))``;
    ``s_b = r_b`` at a stage start, else ``s_{b-1} + r_b``.

    Args:
        visual: open_clip ``VisionTransformer`` (batch-first, class-token pooled).
        images: (B, 3, S, S) CLIP-normalised, at the tower's input size, in its dtype.
        layers: Tapped blocks, 1-based, increasing.
        stage_starts: Blocks where the v-v path restarts (contains 1).
        reference_aliasing: See the module docstring.

    Returns:
        ``(surgery, original)``: per tap, the v-v tokens with o_b's class token through ln_post and
        the projection, (B, N, D); and the original path's tokens o_b, (B, N, C).
    """
    blocks = visual.transformer.resblocks
    starts = set(stage_starts)
    last = max(layers) + (1 if reference_aliasing else 0)
    x = visual._embeds(images)  # o_0, (B, N, C)
    s: Tensor | None = None
    vv_taps: dict[int, Tensor] = {}
    ori_taps: dict[int, Tensor] = {}
    for b, block in enumerate(blocks, start=1):
        if b > last:
            break
        residual = vv_residual(block, x)
        s = residual if (b in starts or s is None) else s + residual
        attn_out = block.ls_1(block.attention(q_x=block.ln_1(x)))
        if reference_aliasing and (b - 1) in ori_taps:
            ori_taps[b - 1] = ori_taps[b - 1] + attn_out  # the reference's in-place `x_ori += ...`
        mid = x + attn_out
        x = mid + block.ls_2(block.mlp(block.ln_2(mid)))
        if b in layers:
            vv_taps[b], ori_taps[b] = s, x
    surgery = []
    for b in layers:
        tokens = torch.cat([ori_taps[b][:, :1], vv_taps[b][:, 1:]], dim=1)
        tokens = visual.ln_post(tokens)
        surgery.append(tokens @ visual.proj)
    return surgery, [ori_taps[b] for b in layers]


def category_minmax_image_scores(
    text_scores: Tensor, map_max: Tensor, categories: Sequence[str], eps: float = 1e-12
) -> Tensor:
    """The reference's image score over a whole test set: per category,
    ``minmax(text score) + minmax(map maximum)``, halved to [0, 1].

    Args:
        text_scores: (M,) ``extras["image_score_text"]`` of all M test images.
        map_max: (M,) ``extras["image_score_map_max"]``.
        categories: M category names.

    Returns:
        (M,) float32 in [0, 1] (the reference's sum / 2: the same ranking).
    """
    out = torch.zeros_like(text_scores, dtype=torch.float32)
    names = list(categories)
    for name in sorted(set(names)):
        idx = torch.tensor([i for i, c in enumerate(names) if c == name], device=text_scores.device)
        total = torch.zeros(len(idx), device=text_scores.device)
        for values in (text_scores[idx].float(), map_max[idx].float()):
            total = total + (values - values.min()) / (values.max() - values.min()).clamp_min(eps)
        out[idx] = total / 2
    return out


# ---------------------------------------------------------------------- producers
class Sdp(FrozenClipMixin, MapProducer):
    """SDP (training-free) map producer.

    Args:
        clip_model: open_clip ``CLIP`` with a class-token ViT tower built for ``input_size``.
        tokenizer: Its tokenizer.
        config: The settings.
        input_size: Side the model runs at.
    """

    name = "sdp"
    trainable = False

    def __init__(self, *, clip_model: nn.Module, tokenizer, config: SdpConfig, input_size: int) -> None:
        super().__init__()
        self.config = config
        self.clip = clip_model
        self.visual = check_vit(clip_model, _KEY, config.model_name)
        self.tokenizer = tokenizer
        self.input_size = int(input_size)
        depth = len(self.visual.transformer.resblocks)
        bad = [v for v in config.layers if v > depth]
        if bad:
            raise ConfigError(f"{_KEY}.layers={config.layers}: {config.model_name} has {depth} blocks, so {bad} do not exist.")
        self.stage_starts = list(config.stage_starts) if config.stage_starts is not None else default_stage_starts(depth)
        self.grid = self._patch_grid(_KEY)
        self.dtype = DTYPES[config.frozen_dtype]
        self._freeze_clip(self.dtype)

    def dbscan_settings(self) -> tuple[float, int]:
        """(eps, min_samples) of the class vectors now: the fit settings in train mode (SDP+)."""
        eps, samples = self.config.dbscan_eps, self.config.dbscan_min_samples
        if self.training:
            eps = self.config.fit_dbscan_eps if self.config.fit_dbscan_eps is not None else eps
            samples = self.config.fit_dbscan_min_samples if self.config.fit_dbscan_min_samples is not None else samples
        return float(eps), int(samples)

    def text_features(self, categories: Sequence[str]) -> Tensor:
        """(B, D, 2) float32 unit class vectors (normal, anomalous) from the DBSCAN-cleaned ensemble."""
        eps, samples = self.dbscan_settings()

        def encode(object_name: str, device: torch.device) -> Tensor:
            prompts = build_prompts(object_name)
            vectors = []
            for key in ("normal", "anomalous"):
                emb = F.normalize(encode_sentences(self.clip, self.tokenizer, prompts[key], device), dim=-1)
                vectors.append(dbscan_class_vector(emb, eps=eps, min_samples=samples, fp16=self.config.text_fp16))
            return torch.stack(vectors, dim=1)

        # Vectors of other DBSCAN settings than the test's are cached under their own key.
        test_settings = (float(self.config.dbscan_eps), int(self.config.dbscan_min_samples))
        variant = "" if (eps, samples) == test_settings else f"dbscan={eps}/{samples}"
        return self._per_category_text(categories, self.config.object_name, encode, variant=variant)

    def category_image_scores(self, parts: Tensor) -> Tensor | None:
        """The reference's image scores of ONE category's images from their ``image_score_parts``.

        Args:
            parts: (M, 2) float, ``extras["image_score_parts"]`` (text score, raw map maximum) of
                all M test images of the category.

        Returns:
            (M,) in [0, 1] with ``image_score: category_minmax``
            (:func:`category_minmax_image_scores`), else None (the per-image scores stand).
        """
        if self.config.image_score != "category_minmax":
            return None
        return category_minmax_image_scores(parts[:, 0], parts[:, 1], ["category"] * parts.shape[0])

    def _features(self, images: Tensor) -> tuple[list[Tensor], list[Tensor]]:
        with torch.no_grad(), torch.autocast(images.device.type, enabled=False):
            surgery, original = staged_vv_forward(
                self.visual,
                images.to(self.dtype),
                self.config.layers,
                self.stage_starts,
                reference_aliasing=self.config.reference_aliasing,
            )
        return [t.float() for t in surgery], [t.float() for t in original]

    def _surgery_map(self, surgery: list[Tensor], text: Tensor) -> tuple[Tensor, Tensor]:
        """Raw SDP map (B, S, S) in [-T, T] (not smoothed) and the text image score (B,)."""
        feats = [F.normalize(t, dim=-1) for t in surgery]
        score = sum(feature_surgery(f, text) for f in feats)[:, 1:, 1]  # (B, h*w)
        grid = score.reshape(-1, 1, self.grid, self.grid)
        raw = F.interpolate(grid, size=(self.input_size, self.input_size), mode="bilinear", align_corners=False)
        cls = feats[-1][:, :1]  # (B, 1, D)
        text_score = (self.config.text_logit_scale * torch.bmm(cls, text)).softmax(-1)[:, 0, 1]
        return raw[:, 0], text_score

    def _finish(self, raw: Tensor, low: float, high: float, text_score: Tensor, frame: tuple[int, int], extras: dict[str, Any]) -> MapOutput:
        smooth = gaussian_blur(raw, self.config.smoothing_sigma)  # (B, S, S), raw scale
        map_max = smooth.flatten(1).amax(1)
        unit = ((smooth - low) / (high - low)).clamp(0.0, 1.0)
        if unit.shape[-2:] != frame:
            unit = F.interpolate(unit[:, None], size=frame, mode="bilinear", align_corners=False)[:, 0]
        unit_max = ((map_max - low) / (high - low)).clamp(0.0, 1.0)
        if self.config.image_score == "text":
            scores = text_score
        elif self.config.image_score == "map_max":
            scores = unit_max
        else:  # "mean"; also category_minmax's per-image stand-in
            scores = (text_score + unit_max) / 2
        extras.update(
            image_score_text=text_score,
            image_score_map_max=map_max,
            image_score_parts=torch.stack([text_score, map_max], dim=1),  # (B, 2)
            raw_map=smooth,
        )
        return MapOutput(anomaly_map=unit.clamp(0.0, 1.0), image_scores=scores.clamp(0.0, 1.0), extras=extras)

    def _check(self, images: Tensor, categories: Sequence[str]) -> None:
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be (B, 3, H, W), got {tuple(images.shape)}")
        if len(categories) != images.shape[0]:
            raise ValueError(f"got {len(categories)} categories for {images.shape[0]} images")

    def forward(self, images: Tensor, categories: Sequence[str]) -> MapOutput:
        """Args: images (B, 3, H, W) CLIP-normalised frame; categories: B names.

        Returns:
            :class:`MapOutput`: ``anomaly_map`` (B, H, W) in [0, 1], ``image_scores`` (B,); extras
            ``image_score_text`` / ``image_score_map_max`` (B,), ``image_score_parts`` (B, 2) (both,
            for :meth:`category_image_scores`) and ``raw_map`` (B, S, S), the reference's map.
        """
        self._check(images, categories)
        text = self.text_features(categories)
        surgery, _ = self._features(resize_images(images.float(), self.input_size))
        raw, text_score = self._surgery_map(surgery, text)
        taps = float(len(self.config.layers))
        return self._finish(raw, -taps, taps, text_score, self.output_size(images), {})


class SdpPlus(Sdp):
    """SDP+: SDP plus one trained ``Linear(width -> embed)`` per tap on the original tokens."""

    name = "sdp_plus"
    trainable = True

    def __init__(self, *, clip_model: nn.Module, tokenizer, config: SdpPlusConfig, input_size: int) -> None:
        super().__init__(clip_model=clip_model, tokenizer=tokenizer, config=config, input_size=input_size)
        width = int(self.visual.transformer.width)
        embed = int(self.visual.proj.shape[1])
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.seed)
            self.linears = nn.ModuleList(nn.Linear(width, embed) for _ in config.layers)

    def layer_probs(self, original: list[Tensor], text: Tensor) -> Tensor:
        """Per tap softmax over (normal, anomalous) of the linear layers: (B, L, 2, S, S) float32."""
        probs = []
        for linear, tokens in zip(self.linears, original):
            feats = F.normalize(linear(tokens[:, 1:]), dim=-1)  # (B, h*w, D)
            logits = self.config.logit_scale * torch.bmm(feats, text)  # (B, h*w, 2)
            logits = logits.transpose(1, 2).reshape(-1, 2, self.grid, self.grid)
            logits = F.interpolate(logits, size=(self.input_size,) * 2, mode="bilinear", align_corners=True)
            probs.append(logits.softmax(1))
        return torch.stack(probs, dim=1)

    def forward(self, images: Tensor, categories: Sequence[str]) -> MapOutput:
        """As :meth:`Sdp.forward`; ``extras["layer_probs"]`` (B, L, 2, S, S) feeds :meth:`loss`."""
        self._check(images, categories)
        text = self.text_features(categories)
        surgery, original = self._features(resize_images(images.float(), self.input_size))
        with torch.autocast(images.device.type, enabled=False):
            layer_probs = self.layer_probs(original, text)
            raw, text_score = self._surgery_map(surgery, text)
            raw = raw + layer_probs[:, :, 1].sum(1)
        taps, n_linear = float(len(self.config.layers)), float(len(self.linears))
        return self._finish(raw, -taps, taps + n_linear, text_score, self.output_size(images), {"layer_probs": layer_probs})

    def loss(self, output: MapOutput, batch: Mapping[str, Any]) -> dict[str, Tensor]:
        """Focal + dice per tap, summed (CLIP-AD's ``train.py``), at the model's input size.

        Args:
            output: This producer's output for ``batch["image"]``.
            batch: Needs ``mask`` (B, H, W): resized to the input size (antialiased bilinear, as
                PIL) when the frame differs, then binarised at 0.5 as the reference does.

        Returns:
            ``{"loss", "focal", "dice"}`` 0-d float32.
        """
        probs = output.extras["layer_probs"]  # (B, L, 2, S, S)
        masks = batch["mask"].float()
        if masks.shape[-2:] != probs.shape[-2:]:
            # The reference's masks are resized to the input size, then binarised at 0.5.
            masks = F.interpolate(masks[:, None], size=probs.shape[-2:], mode="bilinear", align_corners=False, antialias=True)[:, 0]
        masks = (masks > 0.5).float()
        focal = sum(focal_loss(probs[:, i], masks, gamma=self.config.focal_gamma) for i in range(probs.shape[1]))
        dice = sum(dice_loss(probs[:, i, 1], masks) for i in range(probs.shape[1]))
        return {"loss": focal + dice, "focal": focal.detach(), "dice": dice.detach()}


def input_specs(config: SdpConfig, *, image_size: int) -> list[InputSpec]:
    """The reference's input (:func:`clipsam.methods._openclip.pil_input_specs`)."""
    return pil_input_specs(config.input_size, image_size=image_size)


def _build(cls: type[Sdp], config: SdpConfig, image_size: int) -> Sdp:
    input_size = int(config.input_size or image_size)
    clip_model, tokenizer = build_open_clip(
        section=_KEY,
        model_name=config.model_name,
        pretrained=config.pretrained,
        image_size=input_size,
        cache_dir=config.cache_dir,
        seed=config.seed,
    )
    return cls(clip_model=clip_model, tokenizer=tokenizer, config=config, input_size=input_size)


def build(config: SdpConfig, *, image_size: int) -> Sdp:
    """Build SDP for frames of side ``image_size``."""
    return _build(Sdp, config, image_size)


def build_plus(config: SdpPlusConfig, *, image_size: int) -> SdpPlus:
    """Build SDP+ (fresh linear layers, seeded) for frames of side ``image_size``."""
    if not isinstance(config, SdpPlusConfig):
        raise ConfigError(f"sdp_plus needs an SdpPlusConfig, got {type(config).__name__}")
    return _build(SdpPlus, config, image_size)  # type: ignore[return-value]
