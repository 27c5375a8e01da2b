"""SAA and SAA+ (Cao et al., arXiv 2305.10724): training-free Grounding DINO + SAM anomaly maps.

Restated from the public reference code
(caoyunkang/Segment-Any-Anomaly, ``SAA/model.py``); our own code. Per frame image:

1. **Text-guided box proposals.** Grounding DINO (Hugging Face ``GroundingDinoForObjectDetection``)
   runs on the RGB image (shorter side ``detector.min_size``, ImageNet normalisation) with the
   caption ``text.lower().strip() + "."``. From the raw ``logits`` (sigmoid) and ``pred_boxes``
   (normalised cx, cy, w, h) a box is kept when its best token probability is > ``box_threshold``
   and its normalised area w * h is in (``min_area``, ``max_area``); its phrase is the tokens
   with probability > ``text_threshold`` (decoded by the tokenizer); a box whose phrase
   contains the prompt's filter word is dropped. Its score c is the best token probability
   -- :func:`filter_boxes`.
2. **Objects** (``area_filter``): the object word with ``max_area = 1 / n_obj``; the largest kept
   area A (1 if none). **Defects**: every (text, filter word) prompt with
   ``max_area = A * theta`` (no limit with ``area_filter`` off).
3. **SAM** turns every kept box into a mask (one box prompt, a single mask).
4. **Saliency** (``saliency``): WideResNet-50-2 layers 1-3, upsampled to layer 1's grid,
   concatenated and L2-normalised. One object: at ``saliency_single_size`` (256), each location's
   mean of its ``saliency_top_n`` (400) largest ``0.5 (1 - cos)`` to all locations
   (:func:`self_similarity_saliency`). Several objects: at ``saliency_multi_size`` (1024),
   ``0.5 (1 - max cos)`` of each object's locations against the other objects' locations, max
   over objects (:func:`cross_object_saliency`). Resized to the frame.
5. **Rescoring** ``s_i = c_i * exp(rescore_exponent * mean saliency over m_i)``
   (:func:`rescore`); the ``k_mask`` best (``top_k``); the map
   ``sum(s_i m_i) / (1 + sum(m_i))`` (:func:`merge_masks`).

SAA (vanilla) is this pipeline with ``prompt_source: fixed`` (the single prompt "anomaly"),
``area_filter``, ``saliency`` and ``top_k`` off (every mask, ``s_i = c_i``).

SAM encodes the ORIGINAL image as ``SamPredictor.set_image`` does (:func:`input_specs`); the
box proposals are normalised, so they map to the original's pixels exactly, and the masks come
back to the frame with ``Sam.postprocess_masks``.

The reference's own choices are the defaults: SAM and the WRN get a BGR image
(``channel_order: bgr``; ``rgb`` is clipsam's option), the object word keeps the trailing comma
of the reference's property strings (``object_comma``), and the shipped configs score in a
400 x 400 frame as the reference evaluates (``data.image_size: 400``). Differences that remain,
each documented: the detector and the saliency read the frame image (the squashed original at
``data.image_size``), not the original resolution; the map is divided by the constant
``exp(rescore_exponent)`` (``s_i <= exp(rescore_exponent)`` because the saliency is in [0, 1]; 1
without saliency) so it lies in [0, 1] -- a constant factor changes no ranking, like the
reference's per-category min-max, which changes no per-category metric (AUROC, AP, F1-max and the
threshold-sampled AUPRO are invariant to a per-category affine map); ground-truth masks are
resized as for every method (bilinear, then > 0.5; the reference: nearest-neighbour); when a
category with several objects has fewer than two object masks the single-object saliency is
used (the reference fails there).

Per-category inputs are package data (``clipsam/methods/data/{mvtec_ad,visa}.json``); a
category found in none of ``property_tables`` uses the general prompts with the fallback
properties (``fallback_objects`` 1, ``fallback_max_masks`` 5, ``fallback_max_defect_area`` 1).

Dimension symbols: B batch, H x W frame, Q detector queries, T text positions (256), N masks,
C feature channels, h x w feature grid.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import cv2
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from clipsam.errors import ConfigError, WeightsError
from clipsam.fusion import image_scores
from clipsam.methods.base import MapOutput, MapProducer
from clipsam.inputs import InputSpec, sam_input_spec
from clipsam.models.sam import SamConfig, build_sam, decode_prompts_original, encode_sam_inputs, sam_input_side

__all__ = [
    "CONFIG",
    "CONFIG_VANILLA",
    "DATA_DIR",
    "CategoryProperties",
    "DetectorConfig",
    "GroundingDinoDetector",
    "SaaConfig",
    "SaaProducer",
    "SaaVanillaConfig",
    "boxes_to_pixels",
    "build",
    "build_detector",
    "build_saliency_backbone",
    "build_vanilla",
    "category_properties",
    "cross_object_saliency",
    "filter_boxes",
    "merge_masks",
    "rescore",
    "saliency_features",
    "self_similarity_saliency",
]

DATA_DIR = Path(__file__).parent / "data"
"""Package data: the per-category tables and the tiny detector's vocabulary."""

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
TINY_VOCAB = DATA_DIR / "bert_vocab_tiny.txt"


# ---------------------------------------------------------------------- configuration
@dataclasses.dataclass
class DetectorConfig:
    """The Grounding DINO of SAA (config section ``model.method_config.detector``).

    Attributes:
        model: a Hugging Face model id (``"IDEA-Research/grounding-dino-tiny"``, the Swin-T
            model of the reference), a local directory saved with ``save_pretrained``, or
            ``"tiny"``: a toy architecture of the same classes with random weights and a small
            vocabulary shipped with clipsam (offline tests and the demo).
        revision: hub revision of ``model``.
        cache_dir: Hugging Face cache directory (None: its default).
        download: allow downloading from the hub; False reads the local cache only.
        min_size: shorter image side fed to the detector (reference: 800).
        max_size: longest side limit (reference: 1333).
        seed: seed of the "tiny" random weights.
    """

    model: str = "IDEA-Research/grounding-dino-tiny"
    revision: str | None = None
    cache_dir: str | None = None
    download: bool = True
    min_size: int = 800
    max_size: int = 1333
    seed: int = 0


@dataclasses.dataclass
class SaaConfig:
    """Everything that defines SAA / SAA+ (``model.method_config`` of saa / saa_plus).

    Attributes:
        detector: the Grounding DINO.
        sam: the SAM (keys of ``model.sam``; the reference uses ``vit_h``).
        saliency_backbone: timm model of the saliency features (``wide_resnet50_2``).
        saliency_pretrained: True loads timm's default pretrained weights (through the HF hub
            cache), a string is a local checkpoint file, False gives random weights (tests).
        saliency_layers: timm ``out_indices`` of the saliency features (reference: 1, 2, 3).
        box_threshold: a box needs a token probability above this (reference: 0.1).
        text_threshold: tokens above this form the box's phrase (reference: 0.1).
        prompt_source: ``"table"`` (SAA+: general + per-category prompts) or ``"fixed"``
            (``fixed_prompts``; SAA vanilla).
        fixed_prompts: (text, filter word) pairs of ``prompt_source: fixed``; an empty filter
            word filters nothing.
        property_tables: package tables (``"mvtec_ad"``, ``"visa"``) or JSON files in the same
            format, searched in order for the category.
        fallback_objects: n_obj of a category in no table.
        fallback_max_masks: k_mask of a category in no table.
        fallback_max_defect_area: theta of a category in no table.
        object_comma: append "," to the object word, as the reference's property strings do
            (its parser keeps the comma, e.g. "carpet,"); True, the reference's.
        area_filter: the object pass and the area limits (off in SAA vanilla).
        saliency: the saliency rescoring (off in SAA vanilla: ``s_i = c_i``).
        top_k: keep only the ``k_mask`` best masks (off in SAA vanilla: every mask).
        rescore_exponent: the 3 of ``exp(3 * mean saliency)``.
        saliency_top_n: the N largest dissimilarities averaged per location (400).
        saliency_single_size: image side for the single-object saliency (256).
        saliency_multi_size: image side for the multi-object saliency (1024).
        saliency_chunk: locations per block of the similarity computation (bounds memory).
        channel_order: ``"bgr"`` or ``"rgb"``: the channel order SAM and the saliency backbone
            get (``"bgr"``, the reference's: it reads images with OpenCV and hands them on
            unchanged; the detector always gets RGB).
        image_score: reduction of the map to the image score (reference: max).
    """

    detector: DetectorConfig = dataclasses.field(default_factory=DetectorConfig)
    sam: SamConfig = dataclasses.field(default_factory=SamConfig)
    saliency_backbone: str = "wide_resnet50_2"
    saliency_pretrained: bool | str = True
    saliency_layers: list[int] = dataclasses.field(default_factory=lambda: [1, 2, 3])
    box_threshold: float = 0.1
    text_threshold: float = 0.1
    prompt_source: Literal["table", "fixed"] = "table"
    fixed_prompts: list[list[str]] = dataclasses.field(default_factory=lambda: [["anomaly", ""]])
    property_tables: list[str] = dataclasses.field(default_factory=lambda: ["mvtec_ad", "visa"])
    fallback_objects: int = 1
    fallback_max_masks: int = 5
    fallback_max_defect_area: float = 1.0
    object_comma: bool = True
    area_filter: bool = True
    saliency: bool = True
    top_k: bool = True
    rescore_exponent: float = 3.0
    saliency_top_n: int = 400
    saliency_single_size: int = 256
    saliency_multi_size: int = 1024
    saliency_chunk: int = 1024
    channel_order: Literal["rgb", "bgr"] = "bgr"
    image_score: Literal["max", "mean", "topk_mean"] = "max"

    def __post_init__(self) -> None:
        if isinstance(self.detector, Mapping):
            self.detector = DetectorConfig(**self.detector)
        if isinstance(self.sam, Mapping):
            self.sam = SamConfig(**self.sam)
        self.fixed_prompts = [list(p) for p in self.fixed_prompts]
        self.property_tables = list(self.property_tables)
        self.saliency_layers = [int(v) for v in self.saliency_layers]
        if self.prompt_source not in ("table", "fixed"):
            raise ConfigError(f"model.method_config.prompt_source={self.prompt_source!r} must be 'table' or 'fixed'")
        if self.prompt_source == "fixed" and (
            not self.fixed_prompts or any(len(p) != 2 or not p[0].strip() for p in self.fixed_prompts)
        ):
            raise ConfigError(
                f"model.method_config.fixed_prompts={self.fixed_prompts} must be [text, filter word] pairs with a non-empty text"
            )
        if self.channel_order not in ("rgb", "bgr"):
            raise ConfigError(f"model.method_config.channel_order={self.channel_order!r} must be 'rgb' or 'bgr'")
        for key in ("box_threshold", "text_threshold"):
            if not 0.0 <= getattr(self, key) < 1.0:
                raise ConfigError(f"model.method_config.{key}={getattr(self, key)} must be in [0, 1)")
        if self.fallback_objects < 1 or self.fallback_max_masks < 1 or self.fallback_max_defect_area <= 0:
            raise ConfigError(
                "model.method_config.fallback_objects and fallback_max_masks must be >= 1 and fallback_max_defect_area > 0"
            )
        if self.saliency_top_n < 1 or self.saliency_chunk < 1:
            raise ConfigError("model.method_config.saliency_top_n and saliency_chunk must be >= 1")
        if self.image_score not in ("max", "mean", "topk_mean"):
            raise ConfigError(f"model.method_config.image_score={self.image_score!r} must be max, mean or topk_mean")


@dataclasses.dataclass
class SaaVanillaConfig(SaaConfig):
    """SAA (vanilla): :class:`SaaConfig` with the SAA+ parts off by default.

    The single prompt "anomaly", no object pass or area limits, no saliency, every mask kept
    (``s_i = c_i``). Every key of :class:`SaaConfig` still works.
    """

    prompt_source: Literal["table", "fixed"] = "fixed"
    area_filter: bool = False
    saliency: bool = False
    top_k: bool = False


CONFIG = SaaConfig
CONFIG_VANILLA = SaaVanillaConfig


# ---------------------------------------------------------------------- per-category inputs
@dataclasses.dataclass(frozen=True)
class CategoryProperties:
    """SAA+'s inputs for one category.

    Attributes:
        object_word: what the detector looks for to find the object(s).
        objects: n_obj (object boxes larger than 1 / n_obj of the image are dropped).
        max_masks: k_mask, how many defect masks are kept.
        max_defect_area: theta, the largest defect box area relative to the largest object box.
        prompts: (text, filter word) pairs, general ones first.
        source: the table the entry came from, or "fallback".
    """

    object_word: str
    objects: int
    max_masks: int
    max_defect_area: float
    prompts: tuple[tuple[str, str], ...]
    source: str


@functools.lru_cache(maxsize=32)
def _load_table(name: str) -> dict[str, Any]:
    path = DATA_DIR / f"{name}.json" if (DATA_DIR / f"{name}.json").is_file() else Path(name).expanduser()
    if not path.is_file():
        packaged = sorted(p.stem for p in DATA_DIR.glob("*.json"))
        raise ConfigError(
            f"model.method_config.property_tables: {name!r} is neither a packaged table ({packaged}) nor a JSON file"
        )
    try:
        table = json.loads(path.read_text())
        table["categories"].items()
        table["general_prompts"]
    except (ValueError, KeyError, AttributeError, TypeError) as err:
        raise ConfigError(
            f"model.method_config.property_tables: {path} is not a property table (needs 'general_prompts' and "
            f"'categories'; see clipsam/methods/data/mvtec_ad.json): {err}"
        ) from err
    return table


GENERAL_PROMPTS: tuple[str, ...] = ("defect on {object}", "damage on {object}", "flaw on {object}")
"""General prompts of a category in no table (the tables carry their own copy)."""


def category_properties(category: str, config: SaaConfig) -> CategoryProperties:
    """The prompts and properties of ``category`` (first table that has it, else the fallback).

    General prompts are formatted with the category name as on disk, which is also their filter
    word (as the reference). With ``prompt_source: fixed`` the prompts are ``fixed_prompts``.
    """
    entry, general, source = None, list(GENERAL_PROMPTS), "fallback"
    for name in config.property_tables:
        table = _load_table(name)
        if category in table["categories"]:
            entry, general, source = table["categories"][category], list(table["general_prompts"]), name
            break
    if config.prompt_source == "fixed":
        prompts = tuple((text, word) for text, word in config.fixed_prompts)
    else:
        prompts = tuple((g.format(object=category), category) for g in general)
        if entry is not None:
            prompts += tuple((text, word) for text, word in entry["prompts"])
    if entry is None:
        return CategoryProperties(
            object_word=category,
            objects=config.fallback_objects,
            max_masks=config.fallback_max_masks,
            max_defect_area=config.fallback_max_defect_area,
            prompts=prompts,
            source=source,
        )
    return CategoryProperties(
        object_word=str(entry["object"]),
        objects=int(entry["objects"]),
        max_masks=int(entry["max_masks"]),
        max_defect_area=float(entry["max_defect_area"]),
        prompts=prompts,
        source=source,
    )


# ---------------------------------------------------------------------- pure steps
def filter_boxes(
    probs: Tensor,
    boxes: Tensor,
    input_ids: Sequence[int],
    *,
    box_threshold: float,
    text_threshold: float,
    max_area: float,
    min_area: float = 0.0,
    filter_word: str = "",
    decode: Callable[[list[int]], str] | None = None,
) -> tuple[Tensor, Tensor, list[str]]:
    """Keep the detector's boxes by score, area and phrase (SAA's ``bbox_suppression``).

    Args:
        probs: (Q, T) float, sigmoid of the detector's logits (0 at padded text positions).
        boxes: (Q, 4) float, normalised (cx, cy, w, h) in [0, 1].
        input_ids: the caption's token ids (length <= T; position 0 is the class token).
        box_threshold: keep a box only if ``max_t probs > box_threshold``.
        text_threshold: the phrase is the tokens (after position 0) with ``probs > text_threshold``.
        max_area: keep only ``w * h < max_area``.
        min_area: keep only ``w * h > min_area``.
        filter_word: drop a box whose phrase contains this (empty: drop nothing).
        decode: token ids -> text (the tokenizer's ``decode``); needed when ``filter_word`` is set.

    Returns:
        (boxes (K, 4) cxcywh, scores (K,) = best token probability, phrases K strings), in
        query order.
    """
    scores = probs.max(dim=1).values  # (Q,)
    area = boxes[:, 2] * boxes[:, 3]
    keep = (scores > box_threshold) & (area < max_area) & (area > min_area)
    kept_boxes, kept_scores, phrases = [], [], []
    ids = list(input_ids)
    for q in torch.nonzero(keep).flatten().tolist():
        positions = [t for t in range(1, len(ids)) if float(probs[q, t]) > text_threshold]
        phrase = decode([ids[t] for t in positions]) if decode is not None else ""
        if filter_word and filter_word in phrase:
            continue
        kept_boxes.append(boxes[q])
        kept_scores.append(scores[q])
        phrases.append(phrase)
    if not kept_boxes:
        return boxes.new_zeros((0, 4)), probs.new_zeros((0,)), []
    return torch.stack(kept_boxes), torch.stack(kept_scores), phrases


def boxes_to_pixels(boxes: Tensor, frame_size: tuple[int, int]) -> Tensor:
    """Normalised (cx, cy, w, h) -> XYXY pixels of an H x W image: (K, 4) float32."""
    height, width = frame_size
    scale = boxes.new_tensor([width, height, width, height], dtype=torch.float32)
    cx, cy, w, h = (boxes.to(torch.float32) * scale).unbind(-1)
    return torch.stack((cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2), dim=-1)


def self_similarity_saliency(features: Tensor, *, top_n: int, chunk: int = 1024) -> Tensor:
    """Single-object saliency: each location's mean of its ``top_n`` largest ``0.5 (1 - cos)``.

    Args:
        features: (C, h, w) float, unit-norm along C.
        top_n: N (capped at h * w); the location itself (dissimilarity 0) counts among all.
        chunk: rows of the (hw, hw) similarity computed at once.

    Returns:
        (h, w) float32 in [0, 1].
    """
    channels, height, width = features.shape
    flat = features.reshape(channels, -1).to(torch.float32)  # (C, hw)
    n = min(top_n, flat.shape[1])
    out = []
    for start in range(0, flat.shape[1], chunk):
        dissim = 0.5 * (1.0 - flat[:, start : start + chunk].T @ flat)  # (chunk, hw)
        out.append(dissim.topk(n, dim=1).values.mean(dim=1))
    return torch.cat(out).reshape(height, width)


def cross_object_saliency(features: Tensor, object_masks: Tensor, *, chunk: int = 1024) -> Tensor:
    """Multi-object saliency: ``0.5 (1 - max cos)`` of an object's locations vs the others'.

    Args:
        features: (C, h, w) float, unit-norm along C.
        object_masks: (R, h, w) bool object masks on the feature grid, R >= 2.
        chunk: locations of one object compared at once.

    Returns:
        (h, w) float32: per location the max over the objects containing it; 0 outside all
        objects. Locations of object r are compared with the other objects' locations that
        are not in r; with none left their score is 0.5 (cosine 0, as the reference's zeroed
        features give).
    """
    channels, height, width = features.shape
    flat = features.reshape(channels, -1).to(torch.float32)  # (C, hw)
    masks = object_masks.reshape(object_masks.shape[0], -1)  # (R, hw)
    out = torch.zeros(height * width, dtype=torch.float32, device=features.device)
    for r in range(masks.shape[0]):
        own = masks[r]
        others = masks[torch.arange(masks.shape[0], device=masks.device) != r].any(0) & ~own
        locations = torch.nonzero(own).flatten()
        if locations.numel() == 0:
            continue
        if not others.any():
            scores = torch.full((locations.numel(),), 0.5, device=features.device)
        else:
            other_feats = flat[:, others]  # (C, n_other)
            scores = torch.cat(
                [
                    0.5 * (1.0 - (flat[:, locations[s : s + chunk]].T @ other_feats).amax(dim=1))
                    for s in range(0, locations.numel(), chunk)
                ]
            )
        out[locations] = torch.maximum(out[locations], scores)
    return out.reshape(height, width)


def rescore(masks: Tensor, scores: Tensor, saliency: Tensor | None, *, exponent: float) -> Tensor:
    """``s_i = c_i * exp(exponent * mean(saliency[m_i]))``; ``s_i = c_i`` for an empty mask or no saliency.

    Args:
        masks: (N, H, W) bool.
        scores: (N,) float, the detector scores c_i.
        saliency: (H, W) float in [0, 1], or None.
        exponent: 3 in SAA+.

    Returns:
        (N,) float32.
    """
    scores = scores.to(torch.float32)
    if saliency is None or masks.shape[0] == 0:
        return scores.clone()
    flat = masks.reshape(masks.shape[0], -1).to(torch.float32)  # (N, HW)
    area = flat.sum(1)
    mean_sal = (flat @ saliency.reshape(-1).to(torch.float32)) / area.clamp(min=1)
    return torch.where(area > 0, scores * torch.exp(exponent * mean_sal), scores)


def merge_masks(masks: Tensor, scores: Tensor, *, top_k: int | None) -> Tensor:
    """The SAA map ``sum(s_i m_i) / (1 + sum(m_i))`` over the ``top_k`` best masks.

    Args:
        masks: (N, H, W) bool.
        scores: (N,) float s_i.
        top_k: keep the k highest-scored masks (None: all).

    Returns:
        (H, W) float32; zeros when N = 0.
    """
    if masks.shape[0] == 0:
        return torch.zeros(masks.shape[1:], dtype=torch.float32, device=masks.device)
    if top_k is not None and top_k < masks.shape[0]:
        chosen = torch.argsort(scores, descending=True, stable=True)[:top_k]
        masks, scores = masks[chosen], scores[chosen]
    m = masks.to(torch.float32)
    return (m * scores.to(torch.float32)[:, None, None]).sum(0) / (1.0 + m.sum(0))


def saliency_features(backbone: nn.Module, image: Tensor, size: int) -> Tensor:
    """WRN features for the saliency: resized square image -> (C, h, w) unit-norm along C.

    Args:
        backbone: timm ``features_only`` model (its outputs are upsampled to the first one's grid,
            nearest, and concatenated).
        image: uint8 (3, H, W) in the channel order given to the backbone.
        size: the square side the image is resized to (bilinear, as ``cv2.resize``).

    Returns:
        (C, size / 4, size / 4) float32 for WRN layers 1-3.
    """
    array = cv2.resize(image.permute(1, 2, 0).cpu().numpy(), (size, size), interpolation=cv2.INTER_LINEAR)
    device = next(backbone.parameters()).device
    x = torch.from_numpy(array).to(device).permute(2, 0, 1).float()[None] / 255.0  # (1, 3, size, size)
    mean = torch.tensor(IMAGENET_MEAN, device=device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=device).view(1, 3, 1, 1)
    with torch.no_grad():
        feats = backbone((x - mean) / std)
    first = feats[0].shape[-2:]
    stacked = torch.cat([feats[0]] + [F.interpolate(f, size=first, mode="nearest") for f in feats[1:]], dim=1)
    return F.normalize(stacked[0].float(), dim=0)


# ---------------------------------------------------------------------- detector
class GroundingDinoDetector(nn.Module):
    """Grounding DINO through transformers: one caption on one image -> raw probabilities and boxes.

    Args:
        model: ``GroundingDinoForObjectDetection``.
        processor: ``GroundingDinoProcessor`` (image processor + BERT tokenizer).
    """

    def __init__(self, *, model: nn.Module, processor: Any) -> None:
        super().__init__()
        self.model = model.eval().requires_grad_(False)
        self.processor = processor

    def train(self, mode: bool = True) -> GroundingDinoDetector:
        super().train(mode)
        self.model.eval()
        return self

    @staticmethod
    def caption(text: str) -> str:
        """The reference's caption: lower case, stripped, ending with '.'."""
        text = text.lower().strip()
        return text if text.endswith(".") else text + "."

    def decode(self, token_ids: list[int]) -> str:
        """Token ids -> text (the tokenizer's decode; the phrase of a box)."""
        return self.processor.tokenizer.decode(token_ids)

    @torch.no_grad()
    def forward(self, image: Tensor, text: str) -> tuple[Tensor, Tensor, list[int]]:
        """Args: image uint8 (3, H, W) RGB; text the prompt.

        Returns:
            (probs (Q, T) float32 sigmoid of the logits, boxes (Q, 4) normalised cxcywh,
            input ids of the caption).
        """
        inputs = self.processor(
            images=image.permute(1, 2, 0).cpu().numpy(), text=self.caption(text), return_tensors="pt"
        )
        device = next(self.model.parameters()).device
        inputs = {k: v.to(device) for k, v in inputs.items()}
        out = self.model(**inputs)
        return out.logits[0].sigmoid().float(), out.pred_boxes[0].float(), inputs["input_ids"][0].tolist()


def _tiny_detector(config: DetectorConfig) -> GroundingDinoDetector:
    from transformers import (
        BertConfig,
        BertTokenizer,
        GroundingDinoConfig,
        GroundingDinoForObjectDetection,
        GroundingDinoProcessor,
        SwinConfig,
    )

    tokenizer = BertTokenizer(str(TINY_VOCAB))
    model_config = GroundingDinoConfig(
        backbone_config=SwinConfig(
            embed_dim=16,
            depths=[1, 1, 1, 1],
            num_heads=[1, 1, 1, 1],
            window_size=4,
            out_features=["stage2", "stage3", "stage4"],
        ),
        text_config=BertConfig(
            vocab_size=tokenizer.vocab_size,
            hidden_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=64,
        ),
        d_model=64,  # its input projections use GroupNorm(32 groups): 2 channels a group, so a 1x1 level works
        encoder_layers=1,
        decoder_layers=2,  # transformers ties the box heads of decoder layers >= 1 to layer 0's
        encoder_ffn_dim=128,
        decoder_ffn_dim=128,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        encoder_n_points=2,
        decoder_n_points=2,
        num_queries=20,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        model = GroundingDinoForObjectDetection(model_config)
    processor = GroundingDinoProcessor(image_processor=_image_processor(config), tokenizer=tokenizer)
    return GroundingDinoDetector(model=model, processor=processor)


def _image_processor(config: DetectorConfig) -> Any:
    from transformers import GroundingDinoImageProcessor

    return GroundingDinoImageProcessor(
        size={"shortest_edge": config.min_size, "longest_edge": config.max_size},
        image_mean=list(IMAGENET_MEAN),
        image_std=list(IMAGENET_STD),
    )


def build_detector(config: DetectorConfig) -> GroundingDinoDetector:
    """Build the detector: ``"tiny"`` offline, else ``from_pretrained`` (hub id or local directory).

    Raises:
        WeightsError: transformers is missing, or the weights cannot be found or downloaded.
    """
    try:
        import transformers  # noqa: F401
    except ImportError as err:
        raise WeightsError(
            "SAA needs Hugging Face transformers for Grounding DINO: pip install 'transformers>=5.20,<6'"
        ) from err
    if config.model == "tiny":
        return _tiny_detector(config)
    from transformers import AutoTokenizer, GroundingDinoForObjectDetection, GroundingDinoProcessor

    offline = not config.download or os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in {"1", "true", "yes"}
    kwargs = {"revision": config.revision, "cache_dir": config.cache_dir, "local_files_only": offline}
    try:
        model = GroundingDinoForObjectDetection.from_pretrained(config.model, **kwargs)
        tokenizer = AutoTokenizer.from_pretrained(config.model, **kwargs)
    except Exception as err:  # OSError / HF errors when offline or the id is wrong
        raise WeightsError(
            f"cannot load Grounding DINO model.method_config.detector.model={config.model!r} ({type(err).__name__}: "
            f"{str(err).splitlines()[0][:300]}). Run once online so the Hugging Face cache holds it (set "
            "model.method_config.detector.cache_dir to share it), point model.method_config.detector.model to a local directory "
            "saved with save_pretrained, or use 'tiny' for random weights"
        ) from err
    processor = GroundingDinoProcessor(image_processor=_image_processor(config), tokenizer=tokenizer)
    return GroundingDinoDetector(model=model, processor=processor)


def build_saliency_backbone(config: SaaConfig) -> nn.Module:
    """The timm features-only backbone of the saliency (frozen, eval).

    Raises:
        WeightsError: pretrained weights cannot be loaded (offline without the HF cache, bad file).
    """
    import timm

    pretrained = config.saliency_pretrained
    kwargs: dict[str, Any] = {"features_only": True, "out_indices": tuple(config.saliency_layers)}
    try:
        if isinstance(pretrained, str):
            if not Path(pretrained).expanduser().is_file():
                raise FileNotFoundError(pretrained)
            backbone = timm.create_model(
                config.saliency_backbone, pretrained=True, pretrained_cfg_overlay={"file": pretrained}, **kwargs
            )
        else:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(0)
                backbone = timm.create_model(config.saliency_backbone, pretrained=bool(pretrained), **kwargs)
    except Exception as err:
        raise WeightsError(
            f"cannot build the saliency backbone model.method_config.saliency_backbone={config.saliency_backbone!r} "
            f"with saliency_pretrained={pretrained!r} ({type(err).__name__}: {str(err).splitlines()[0][:300]}). "
            "Run once online so timm caches the weights, or set model.method_config.saliency_pretrained to a local "
            "checkpoint file (or false for random weights)"
        ) from err
    return backbone.eval().requires_grad_(False)


# ---------------------------------------------------------------------- the producer
class SaaProducer(MapProducer):
    """SAA / SAA+ as a training-free map producer.

    Args:
        detector: the Grounding DINO wrapper.
        sam: a segment_anything ``Sam`` (frozen).
        saliency_backbone: timm features-only model, or None when ``config.saliency`` is off.
        config: the settings.
    """

    name = "saa"
    trainable = False

    def __init__(
        self, *, detector: GroundingDinoDetector, sam: nn.Module, saliency_backbone: nn.Module | None, config: SaaConfig
    ) -> None:
        super().__init__()
        if config.saliency and saliency_backbone is None:
            raise ConfigError("model.method_config.saliency is on but no saliency backbone was given")
        self.detector = detector
        self.sam = sam.eval().requires_grad_(False)
        self.saliency_backbone = saliency_backbone
        self.config = config
        self.requires_grad_(False)

    def train(self, mode: bool = True) -> SaaProducer:
        super().train(mode)
        for module in (self.detector, self.sam, self.saliency_backbone):
            if module is not None:
                module.eval()
        return self

    def _proposals(
        self, image: Tensor, prompts: Sequence[tuple[str, str]], *, max_area: float
    ) -> tuple[Tensor, Tensor]:
        """Kept boxes (K, 4) normalised cxcywh and scores (K,) over all prompts."""
        boxes, scores = [], []
        for text, word in prompts:
            probs, pred, ids = self.detector(image, text)
            kept, kept_scores, _ = filter_boxes(
                probs,
                pred,
                ids,
                box_threshold=self.config.box_threshold,
                text_threshold=self.config.text_threshold,
                max_area=max_area,
                filter_word=word,
                decode=self.detector.decode,
            )
            boxes.append(kept)
            scores.append(kept_scores)
        return torch.cat(boxes), torch.cat(scores)

    def _masks(
        self, embedding: Tensor, boxes: Tensor, frame: tuple[int, int], original: tuple[int, int], input_size: tuple[int, int]
    ) -> Tensor:
        """SAM masks (K, H, W) bool in the frame of normalised boxes, one box prompt and a single mask each.

        The boxes are scaled to the ORIGINAL image's pixels (what SAM encoded, ``original``);
        ``input_size`` is the valid part of SAM's input.
        """
        if boxes.shape[0] == 0:
            return torch.zeros((0, *frame), dtype=torch.bool, device=embedding.device)
        pixels = boxes_to_pixels(boxes, original).to(embedding.device)
        probs = decode_prompts_original(
            self.sam,
            embedding,
            input_size=input_size,
            original_size=original,
            output_size=frame,
            boxes=pixels,
            multimask_output=False,
        )
        return probs[:, 0] > 0.5  # logits > 0

    def _saliency(self, image: Tensor, object_masks: Tensor, objects: int) -> Tensor:
        """(H, W) float32 saliency in [0, 1] of one image (in the backbone's channel order)."""
        cfg = self.config
        frame = (int(image.shape[1]), int(image.shape[2]))
        nonempty = object_masks[object_masks.flatten(1).any(1)] if object_masks.numel() else object_masks
        if objects > 1 and nonempty.shape[0] >= 2:
            feats = saliency_features(self.saliency_backbone, image, cfg.saliency_multi_size)
            grid = feats.shape[-2:]
            small = F.interpolate(nonempty[:, None].float(), size=grid, mode="nearest")[:, 0] > 0.5
            sal = cross_object_saliency(feats, small.to(feats.device), chunk=cfg.saliency_chunk)
        else:
            feats = saliency_features(self.saliency_backbone, image, cfg.saliency_single_size)
            sal = self_similarity_saliency(feats, top_n=cfg.saliency_top_n, chunk=cfg.saliency_chunk)
        resized = cv2.resize(sal.cpu().numpy(), (frame[1], frame[0]), interpolation=cv2.INTER_LINEAR)
        return torch.from_numpy(resized).clamp(0.0, 1.0)

    @torch.no_grad()
    def anomaly_map(
        self,
        image: Tensor,
        category: str,
        *,
        sam_image: Tensor | None = None,
        sam_size: Tensor | None = None,
        original_size: tuple[int, int] | None = None,
    ) -> Tensor:
        """The SAA map of one image before scaling: (H, W) float32 >= 0 in the frame.

        Args:
            image: uint8 (3, H, W) RGB frame image (the detector's and the saliency's input).
            category: its category (selects prompts and properties).
            sam_image: uint8 (3, S, S) SAM input of the ORIGINAL image
                (:func:`clipsam.inputs.build_sam_input`), ``sam_size`` its valid (h, w) and
                ``original_size`` (H0, W0); None: the frame is taken as the original.
        """
        cfg = self.config
        frame = (int(image.shape[1]), int(image.shape[2]))
        props = category_properties(category, cfg)
        model_image = image.flip(0) if cfg.channel_order == "bgr" else image  # what the WRN sees
        if sam_image is None:
            from clipsam.inputs import build_sam_input

            side = int(self.sam.image_encoder.img_size)
            sam_image, sam_size = build_sam_input(image.permute(1, 2, 0).cpu().numpy(), side)
            original_size = frame
        assert sam_size is not None and original_size is not None
        sam_pixels = sam_image.flip(0) if cfg.channel_order == "bgr" else sam_image  # what SAM sees
        embedding = encode_sam_inputs(self.sam, sam_pixels[None], sam_size.reshape(1, 2))  # (1, C, h, w)
        original = (int(original_size[0]), int(original_size[1]))
        input_size = (int(sam_size.reshape(-1)[0]), int(sam_size.reshape(-1)[1]))

        object_masks = torch.zeros((0, *frame), dtype=torch.bool)
        defect_max_area = math.inf
        if cfg.area_filter:
            word = props.object_word + ("," if cfg.object_comma else "")
            boxes, _ = self._proposals(image, [(word, "")], max_area=1.0 / props.objects)
            largest = float((boxes[:, 2] * boxes[:, 3]).max()) if boxes.shape[0] else 1.0
            defect_max_area = largest * props.max_defect_area
            if cfg.saliency and props.objects > 1:
                object_masks = self._masks(embedding, boxes, frame, original, input_size).cpu()

        boxes, scores = self._proposals(image, props.prompts, max_area=defect_max_area)
        masks = self._masks(embedding, boxes, frame, original, input_size).cpu()
        scores = scores.cpu()
        saliency = self._saliency(model_image, object_masks, props.objects) if cfg.saliency else None
        rescored = rescore(masks, scores, saliency, exponent=cfg.rescore_exponent)
        return merge_masks(masks, rescored, top_k=props.max_masks if cfg.top_k else None)

    @property
    def map_scale(self) -> float:
        """The constant the raw map is divided by: ``exp(rescore_exponent)`` with saliency, else 1."""
        return math.exp(self.config.rescore_exponent) if self.config.saliency else 1.0

    def score_maps(self, maps: Tensor) -> Tensor:
        """(B, H, W) pixel scores -> (B,) image scores by ``image_score`` (reference: max)."""
        return image_scores(maps, method=self.config.image_score)

    def forward(self, images: Tensor, categories: Sequence[str]) -> MapOutput:
        """Args: images (B, 3, H, W) float32 CLIP-normalised frame; categories B names.

        Returns:
            :class:`MapOutput` with anomaly_map (B, H, W) in [0, 1] and image_scores (B,).
        """
        from clipsam.data.transforms import denormalize

        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be (B, 3, H, W), got {tuple(images.shape)}")
        if len(categories) != images.shape[0]:
            raise ValueError(f"got {len(categories)} categories for {images.shape[0]} images")
        uint8 = denormalize(images)
        maps = torch.stack([self.anomaly_map(img, cat) for img, cat in zip(uint8, categories)])
        maps = (maps / self.map_scale).clamp(0.0, 1.0).to(images.device)
        return MapOutput(anomaly_map=maps, image_scores=self.score_maps(maps))

    def forward_batch(self, batch: Mapping[str, Any]) -> MapOutput:
        """SAA on a batch: the detector and the saliency read the frame (``image``), SAM the
        original image (``sam_image``, ``sam_size``, ``original_size``; :func:`input_specs`)."""
        from clipsam.data.transforms import denormalize

        images, categories = batch["image"], list(batch["category"])
        if "sam_image" not in batch:
            raise KeyError("SAA reads batch['sam_image'] (SAM's input of the original image): run it through clipsam.pipeline.Pipeline")
        uint8 = denormalize(images)
        sizes = batch["original_size"].reshape(-1, 2).tolist()
        maps = torch.stack(
            [
                self.anomaly_map(img, cat, sam_image=sam_img, sam_size=sam_size, original_size=(size[0], size[1]))
                for img, cat, sam_img, sam_size, size in zip(uint8, categories, batch["sam_image"], batch["sam_size"], sizes)
            ]
        )
        maps = (maps / self.map_scale).clamp(0.0, 1.0).to(images.device)
        return MapOutput(anomaly_map=maps, image_scores=self.score_maps(maps))


def input_specs(config: SaaConfig, *, image_size: int) -> list[InputSpec]:
    """SAM's input of the original image (the detector and the saliency read the frame)."""
    return [sam_input_spec(sam_input_side(config.sam.variant))]


def build(config: SaaConfig, *, image_size: int | None = None) -> SaaProducer:
    """Build SAA+ (or SAA, by the config's switches) from ``config`` (any frame; ``image_size`` unused)."""
    del image_size
    return SaaProducer(
        detector=build_detector(config.detector),
        sam=build_sam(config.sam),
        saliency_backbone=build_saliency_backbone(config) if config.saliency else None,
        config=config,
    )


def build_vanilla(config: SaaVanillaConfig, *, image_size: int | None = None) -> SaaProducer:
    """Build SAA (vanilla) from ``config`` (registry builder of ``CONFIG_VANILLA``)."""
    return build(config, image_size=image_size)
