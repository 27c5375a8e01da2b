"""WinCLIP (Jeong et al., CVPR 2023): training-free window scores, harmonic aggregation; WinCLIP+
(few-shot) when ``k_shot`` reference images of the category are given.

Restated from its public reference code (anomalib 2.x's re-implementation, ``src/anomalib/models/
image/winclip/``, is the default; written anew here for open_clip 3.x, whose transformer is
batch-first).

Zero-shot (``k_shot: 0``, the default):

1. the ORIGINAL image is squash-resized to ``input_size`` (240 for ViT-B-16-plus-240, a 15 x 15
   patch grid) as anomalib's pre-processor does it (``lightning_model.py``,
   ``WinClip.configure_pre_processor``): as float in [0, 1], bicubic with antialiasing
   (torchvision v2 ``Resize``), then CLIP's normalisation (:func:`input_specs`, built by
   :mod:`clipsam.inputs`; ``resize: pil_bicubic`` for PIL on uint8 instead);
2. text (``torch_model.py``, ``WinClipModel._collect_text_embeddings``): each state of 7 normal /
   4 anomalous states filled with the object name (the category name verbatim, as anomalib
   writes it: ``metal_nut`` stays ``metal_nut``; ``object_name``) and put into 21 templates;
   t_n and t_a are the means of each set's raw (not normalised) text embeddings;
3. ``ascore(e) = softmax([cos(e, t_n), cos(e, t_a)] / T)[1]`` (T = 0.07; ``utils.py``,
   ``class_scores``); the image score is s0 = ascore(class embedding of the full image);
4. for each window scale k (2 and 3), every k x k window of patches at stride 1 is embedded
   from the class token plus that window's patch tokens only (taken after the positional
   embedding; ln_pre is per token, so selecting after it is the same), through the
   transformer, ln_post, class-token pooling and the projection
   (``WinClipModel._get_window_embeddings``);
5. ``M_k(i, j)`` = harmonic mean of ascore over the windows of scale k covering patch (i, j)
   (:func:`harmonic_aggregation`; ``utils.py``, ``harmonic_aggregation``);
6. ``M = (K + 1) / (sum_k 1 / M_k + 1 / s0)`` (K scales; 3 / (1/M_2 + 1/M_3 + 1/s0)), with s0
   a constant map (:func:`fuse_scales`; ``WinClipModel._compute_zero_shot_scores``).

Few-shot, WinCLIP+ (``k_shot: k > 0``; the paper's Sec. 4 and anomalib's ``WinClipModel``):

7. at setup, the k good reference images of a category go through the same input path and
   encoder (``WinClipModel.setup`` -> ``_collect_visual_embeddings`` -> ``encode_image``); kept
   per category (:meth:`WinClip.set_references`): their patch embeddings (the transformer's
   patch tokens after ln_post, NOT projected: width C) and their window embeddings of every
   scale (projected: width D);
8. visual association score of a query feature f against the references' features R of the
   same level, every position of every reference image (``utils.py``,
   ``visual_association_score``; the paper's Eq. 4): ``min_{r in R} (1 - cos(f, r)) / 2``
   (:func:`visual_association_scores`);
9. few-shot map (``WinClipModel._compute_few_shot_scores``): the patch level's scores on the
   grid, and for each window scale the harmonic aggregation of its window scores (step 5);
   ``M_fs`` = the arithmetic mean of these K + 1 maps (:func:`few_shot_map`);
10. (``WinClipModel.forward``) map ``= (M + M_fs) / 2``; image score ``= (s0 + max M_fs) / 2``,
    the maximum over the patch grid (:func:`fuse_few_shot`).

Finally the map is upsampled bilinearly (align_corners False) from the patch grid to the frame.
No smoothing.

Differences to anomalib: the grid is upsampled once, straight to the frame (anomalib upsamples
to its 240 input; in a 240 frame the two are the same). anomalib takes the first k images of the
training dataloader (or a ``few_shot_source`` folder) as references; clipsam draws k good
training images of the test category by a recorded seed (``data.reference``,
:mod:`clipsam.data.references`) and builds them with the same input path as the test images.

Dimension symbols: B batch, h x w patch grid, W_k windows of scale k, C token width, D embedding
width, R reference features.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from clipsam.errors import ConfigError
from clipsam.inputs import InputSpec
from clipsam.methods._openclip import (
    DTYPES,
    FrozenClipMixin,
    build_open_clip,
    check_vit,
    encode_sentences,
    resize_images,
)
from clipsam.methods.base import MapOutput, MapProducer
from clipsam.prompts import NORMAL_STATES as _APRIL_GAN_NORMAL_STATES
from clipsam.prompts import OBJECT_NAME_MODES

__all__ = [
    "ANOMALOUS_STATES",
    "CONFIG",
    "NORMAL_STATES",
    "TEMPLATES",
    "WinClip",
    "WinClipConfig",
    "build",
    "build_prompts",
    "few_shot_map",
    "fuse_few_shot",
    "fuse_scales",
    "harmonic_aggregation",
    "input_specs",
    "reference_count",
    "visual_association_scores",
    "window_masks",
    "zero_shot_scores",
]

NORMAL_STATES: tuple[str, ...] = _APRIL_GAN_NORMAL_STATES
"""WinCLIP's 7 normal states (``{}`` is the object name): the same as APRIL-GAN's."""

ANOMALOUS_STATES: tuple[str, ...] = (
    "damaged {}",
    "{} with flaw",
    "{} with defect",
    "{} with damage",
)
"""WinCLIP's 4 anomalous states (no "broken", unlike the APRIL-GAN ensemble)."""

TEMPLATES: tuple[str, ...] = (
    "a cropped photo of the {}.",
    "a close-up photo of a {}.",
    "a close-up photo of the {}.",
    "a bright photo of a {}.",
    "a bright photo of the {}.",
    "a dark photo of the {}.",
    "a dark photo of a {}.",
    "a jpeg corrupted photo of the {}.",
    "a jpeg corrupted photo of the {}.",  # listed twice in anomalib's list; kept (it weighs the mean)
    "a blurry photo of the {}.",
    "a blurry photo of a {}.",
    "a photo of a {}.",
    "a photo of the {}.",
    "a photo of a small {}.",
    "a photo of the small {}.",
    "a photo of a large {}.",
    "a photo of the large {}.",
    "a photo of the {} for visual inspection.",
    "a photo of a {} for visual inspection.",
    "a photo of the {} for anomaly detection.",
    "a photo of a {} for anomaly detection.",
)
"""The 21 templates of anomalib's WinCLIP prompt ensemble, in its order."""


@dataclass
class WinClipConfig:
    """WinCLIP's settings (``model.method_config`` when ``model.method=winclip``).

    Attributes:
        model_name: open_clip architecture (``ViT-B-16-plus-240``; ``clipsam-tiny-240`` for tests).
        pretrained: open_clip tag (``laion400m_e31``, as anomalib) or a local checkpoint file;
            ``None``/``""`` gives random weights seeded with ``seed`` (tests, demo).
        cache_dir: open_clip's weight cache (``None``: its default).
        input_size: Side the original image is squash-resized to before the model (240);
            ``None``: the frame size. Must be a multiple of the patch size.
        resize: How the original becomes the input: ``"torch_bicubic"`` (anomalib: float
            image, antialiased bicubic, no clamping) or ``"pil_bicubic"`` (PIL on uint8).
        scales: Window sides k in patches (stride 1), each at most the patch grid side.
        temperature: T of ``softmax(cos / T)`` (0.07; caoyunkang's reproduction uses 0.01).
        use_image_score: Fold s0 into the map as one more harmonic term (anomalib); ``False``
            averages only the window scales harmonically.
        object_name: How the category becomes the prompts' class name
            (:func:`clipsam.prompts.object_name_for`): ``"raw"`` (default: the category name
            verbatim, as anomalib writes it: "a cropped photo of the metal_nut."),
            ``"category"`` (clipsam's cleaning, not anomalib's: ``metal_nut`` -> "metal nut",
            ``pcb1`` -> "pcb") or ``"generic"`` ("object").
        k_shot: Number of good reference images per category (WinCLIP+). 0 (default):
            zero-shot. k > 0: the map and image score also use the visual association with the
            references' patch and window embeddings (module doc, steps 7-10); ``clipsam
            test/validate/predict`` draws them by ``data.reference``, :class:`clipsam.Segmenter`
            takes them as ``references=`` (the WinCLIP paper reports k = 1, 2, 4).
        frozen_dtype: dtype of the frozen open_clip weights (``float32`` for reference numbers).
        window_batch: How many window sequences go through the transformer at once (memory knob,
            no effect on the result).
        seed: Seed of random weights.
    """

    model_name: str = "ViT-B-16-plus-240"
    pretrained: str | None = "laion400m_e31"
    cache_dir: str | None = None
    input_size: int | None = 240
    resize: Literal["torch_bicubic", "pil_bicubic"] = "torch_bicubic"
    scales: list[int] = field(default_factory=lambda: [2, 3])
    temperature: float = 0.07
    use_image_score: bool = True
    object_name: Literal["category", "raw", "generic"] = "raw"
    k_shot: int = 0
    frozen_dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    window_batch: int = 4096
    seed: int = 0

    def __post_init__(self) -> None:
        self.scales = [int(k) for k in self.scales]
        if not self.scales or any(k < 1 for k in self.scales):
            raise ConfigError(f"model.method_config.scales={self.scales}: give window sides >= 1 (e.g. [2, 3]).")
        if self.temperature <= 0:
            raise ConfigError(f"model.method_config.temperature={self.temperature} must be > 0.")
        if self.frozen_dtype not in DTYPES:
            raise ConfigError(f"model.method_config.frozen_dtype={self.frozen_dtype!r}: use one of {list(DTYPES)}.")
        if self.object_name not in OBJECT_NAME_MODES:
            raise ConfigError(f"model.method_config.object_name={self.object_name!r}: use one of {list(OBJECT_NAME_MODES)}.")
        if self.input_size is not None and self.input_size < 1:
            raise ConfigError(f"model.method_config.input_size={self.input_size} must be positive or null.")
        if self.resize not in ("torch_bicubic", "pil_bicubic"):
            raise ConfigError(f"model.method_config.resize={self.resize!r}: use 'torch_bicubic' or 'pil_bicubic'.")
        if self.window_batch < 1:
            raise ConfigError(f"model.method_config.window_batch={self.window_batch} must be >= 1.")
        if isinstance(self.k_shot, bool) or not isinstance(self.k_shot, int) or self.k_shot < 0:
            raise ConfigError(
                f"model.method_config.k_shot={self.k_shot!r}: give the number of reference images per category "
                "(0: zero-shot; WinCLIP+ uses 1, 2 or 4)."
            )


CONFIG = WinClipConfig


# ---------------------------------------------------------------------- pure helpers
def build_prompts(object_name: str) -> dict[str, list[str]]:
    """WinCLIP's ensemble for one object name: 147 normal and 84 anomalous sentences, state-major."""
    return {
        "normal": [t.format(s.format(object_name)) for s in NORMAL_STATES for t in TEMPLATES],
        "anomalous": [t.format(s.format(object_name)) for s in ANOMALOUS_STATES for t in TEMPLATES],
    }


def window_masks(grid: tuple[int, int], kernel: int, stride: int = 1) -> Tensor:
    """Patch indices of every sliding window over a patch grid.

    Windows are ordered row-major by their top-left patch; patch (i, j) has index ``i * w + j``.

    Args:
        grid: (h, w) patch grid.
        kernel: Window side k in patches.
        stride: Step between windows in patches.

    Returns:
        (k * k, W_k) int64: column m lists the k * k patch indices of window m, row-major inside
        the window. E.g. ``window_masks((3, 3), 2)`` has columns [0,1,3,4], [1,2,4,5], [3,4,6,7],
        [4,5,7,8].

    Raises:
        ConfigError: The window does not fit the grid.
    """
    height, width = grid
    if kernel > height or kernel > width:
        raise ConfigError(
            f"model.method_config.scales: a {kernel}x{kernel} window does not fit the {height}x{width} patch "
            "grid; use smaller scales or a larger input_size."
        )
    tops = torch.arange(0, height - kernel + 1, stride)
    lefts = torch.arange(0, width - kernel + 1, stride)
    offsets = (torch.arange(kernel)[:, None] * width + torch.arange(kernel)[None, :]).reshape(-1)  # (k*k,)
    starts = (tops[:, None] * width + lefts[None, :]).reshape(-1)  # (W_k,)
    return offsets[:, None] + starts[None, :]


def harmonic_aggregation(window_scores: Tensor, masks: Tensor, grid: tuple[int, int]) -> Tensor:
    """Per patch, the harmonic mean of the scores of the windows that cover it (M_k).

    ``M(p) = n_p / sum_{m covers p} 1 / s_m``; a window with score 0 makes its patches 0;
    a patch no window covers gets 0.

    Args:
        window_scores: (B, W_k) scores in (0, 1].
        masks: (k * k, W_k) patch indices per window (:func:`window_masks`).
        grid: (h, w) patch grid.

    Returns:
        (B, h, w), same dtype as ``window_scores``.
    """
    batch = window_scores.shape[0]
    cells = grid[0] * grid[1]
    index = masks.to(window_scores.device).reshape(-1)  # (k*k*W_k,), window-major per row
    inverse = (1.0 / window_scores).unsqueeze(1).expand(batch, masks.shape[0], masks.shape[1])
    inverse = inverse.reshape(batch, -1)
    if torch.onnx.is_in_onnx_export():  # ONNX has no index_add with repeated indices: the same sum as a product
        incidence = F.one_hot(masks.to(window_scores.device).long(), cells).sum(0).to(window_scores.dtype)  # (W_k, cells)
        total = (1.0 / window_scores) @ incidence
        count = incidence.sum(0)
    else:
        total = window_scores.new_zeros(batch, cells).index_add_(1, index, inverse)
        count = torch.bincount(index, minlength=cells).to(window_scores.dtype)
    harmonic = torch.where(count > 0, count / total, torch.zeros_like(total))
    return harmonic.nan_to_num(nan=0.0).reshape(batch, *grid)


def fuse_scales(scale_maps: Sequence[Tensor], image_scores: Tensor | None) -> Tensor:
    """Harmonic mean over the scale maps and, if given, the image score as a constant map.

    ``M = (K + 1) / (sum_k 1 / M_k + 1 / s0)`` (WinCLIP with K = 2: 3 / (1/M_2 + 1/M_3 + 1/s0)).

    Args:
        scale_maps: K maps (B, h, w) in [0, 1].
        image_scores: (B,) s0, or ``None`` to fuse the scale maps only.

    Returns:
        (B, h, w); 0 wherever one of the terms is 0.
    """
    terms = list(scale_maps)
    if image_scores is not None:
        terms.append(image_scores.view(-1, 1, 1).expand_as(terms[0]))
    inverse = sum(1.0 / t for t in terms)
    return (len(terms) / inverse).nan_to_num(nan=0.0)


def zero_shot_scores(embeddings: Tensor, text: Tensor, temperature: float) -> Tensor:
    """ascore: ``softmax([cos(e, t_n), cos(e, t_a)] / T)[1]``.

    Args:
        embeddings: (B, ..., D) image, window or patch embeddings.
        text: (B, 2, D) per image (t_n, t_a); need not be normalised.
        temperature: T.

    Returns:
        (B, ...) probability of "anomalous".
    """
    e = F.normalize(embeddings.float(), dim=-1)
    t = F.normalize(text.float(), dim=-1)
    lead = e.shape[1:-1]
    cos = torch.einsum("bnd,bcd->bnc", e.reshape(e.shape[0], -1, e.shape[-1]), t)
    return (cos / temperature).softmax(-1)[..., 1].reshape(e.shape[0], *lead)


def visual_association_scores(embeddings: Tensor, references: Tensor) -> Tensor:
    """The visual association score (WinCLIP Eq. 4): ``min_r (1 - cos(f, r)) / 2``.

    Every query feature against EVERY reference feature (all positions of all reference
    images, as anomalib's ``visual_association_score`` flattens them), not the same position.

    Args:
        embeddings: (B, N, D) query features f (patch or window embeddings).
        references: (R, D) or (K, N', D) reference features of the same level.

    Returns:
        (B, N) float32 in [0, 1]; 0 where a reference feature points the same way as f.
    """
    f = F.normalize(embeddings.float(), dim=-1)
    r = F.normalize(references.float().reshape(-1, embeddings.shape[-1]), dim=-1)  # (R, D)
    cos = f @ r.t()  # (B, N, R)
    # clamp: a feature equal to a reference can round to cos = 1 + 1e-7, a negative distance
    # that would break the harmonic aggregation; exact 0 there, as the formula says
    return (1.0 - cos).amin(dim=-1).clamp_min(0.0) / 2.0


def few_shot_map(patch_scores: Tensor, scale_maps: Sequence[Tensor]) -> Tensor:
    """M_fs: the arithmetic mean of the patch level's association map and the window scales'.

    Args:
        patch_scores: (B, h, w) association scores of the patch embeddings.
        scale_maps: per window scale, (B, h, w) harmonic aggregations of its window scores.

    Returns:
        (B, h, w): ``(patch + sum_k M_fs_k) / (K + 1)``.
    """
    return torch.stack([patch_scores, *scale_maps]).mean(dim=0)


def fuse_few_shot(zero_shot: Tensor, few_shot: Tensor, image_scores: Tensor) -> tuple[Tensor, Tensor]:
    """WinCLIP+: the zero-shot and few-shot maps averaged; the image score likewise.

    Args:
        zero_shot: (B, h, w) the zero-shot map M (:func:`fuse_scales`).
        few_shot: (B, h, w) M_fs (:func:`few_shot_map`).
        image_scores: (B,) s0.

    Returns:
        ``((M + M_fs) / 2 (B, h, w), (s0 + max_{h,w} M_fs) / 2 (B,))``.
    """
    return (zero_shot + few_shot) / 2.0, (image_scores + few_shot.flatten(1).amax(dim=1)) / 2.0


@dataclass
class ReferenceEmbeddings:
    """One category's reference features (module doc, step 7).

    Attributes:
        patches: (K * h * w, C) patch tokens after ln_post (not projected).
        windows: per scale, (K * W_k, D) window embeddings.
        count: K, the number of reference images.
    """

    patches: Tensor
    windows: list[Tensor]
    count: int


# ---------------------------------------------------------------------- the producer
class WinClip(FrozenClipMixin, MapProducer):
    """WinCLIP map producer (training-free): zero-shot, or WinCLIP+ with ``k_shot`` references.

    With ``config.k_shot > 0`` every category it is asked about needs its reference images
    first (:meth:`set_references`; :class:`clipsam.pipeline.Pipeline` feeds them).

    Args:
        clip_model: open_clip ``CLIP`` with a class-token ViT tower built for ``input_size``.
        tokenizer: Its tokenizer.
        config: The settings.
        input_size: Side the model runs at (the frame side when ``config.input_size`` is None).
    """

    name = "winclip"
    trainable = False
    onnx_exportable = True  # zero-shot only: export refuses k_shot > 0 (references)
    onnx_text = "text_embeddings"  # (B, 2, D) (t_n, t_a) per category

    def __init__(self, *, clip_model: nn.Module, tokenizer, config: WinClipConfig, input_size: int) -> None:
        super().__init__()
        self.config = config
        self.clip = clip_model
        self.visual = check_vit(clip_model, "model.method_config", config.model_name)
        self.tokenizer = tokenizer
        self.input_size = int(input_size)
        side = self._patch_grid()
        self.grid = (side, side)
        self.masks = [window_masks(self.grid, k) for k in config.scales]  # checks the scales fit
        self.dtype = DTYPES[config.frozen_dtype]
        self._freeze_clip(self.dtype)
        self.references: dict[str, ReferenceEmbeddings] = {}  # category -> its reference features (k_shot > 0)

    def prompts(self, category: str) -> dict[str, list[str]]:
        """The sentences encoded for ``category``: :func:`build_prompts` of its object name."""
        return build_prompts(self.object_name(category))

    def text_embeddings(self, categories: Sequence[str]) -> Tensor:
        """(B, 2, D) float32: (t_n, t_a), the raw-mean text embeddings of each category's ensemble."""

        def encode(object_name: str, device: torch.device) -> Tensor:
            prompts = build_prompts(object_name)
            normal = encode_sentences(self.clip, self.tokenizer, prompts["normal"], device).mean(0)
            anomalous = encode_sentences(self.clip, self.tokenizer, prompts["anomalous"], device).mean(0)
            return torch.stack([normal, anomalous])

        return self._per_category_text(categories, self.config.object_name, encode)

    def _encode_tokens(self, tokens: Tensor) -> Tensor:
        """Token sequences (S, 1 + n, C) (class token first) -> pooled projected embeddings (S, D)."""
        x = self.visual.transformer(tokens)
        pooled, _ = self.visual._pool(x)
        if self.visual.proj is not None:
            pooled = pooled @ self.visual.proj
        return pooled.float()

    def encode(self, images: Tensor) -> tuple[Tensor, list[Tensor]]:
        """Image and window embeddings: :meth:`encode_with_patches` without the patch tokens."""
        image, windows, _ = self.encode_with_patches(images)
        return image, windows

    def encode_with_patches(self, images: Tensor) -> tuple[Tensor, list[Tensor], Tensor]:
        """Image, window and patch embeddings (anomalib's ``WinClipModel.encode_image``).

        Args:
            images: (B, 3, S, S) at the model's input size, CLIP-normalised.

        Returns:
            ``(image (B, D), [windows (B, W_k, D) per scale], patches (B, h * w, C))``, float32;
            the patch tokens are the full pass's, after ln_post, not projected.
        """
        batch = images.shape[0]
        with torch.no_grad(), torch.autocast(images.device.type, enabled=False):
            tokens = self.visual._embeds(images.to(self.dtype))  # (B, 1 + h*w, C), after ln_pre
            pooled, patch_tokens = self.visual._pool(self.visual.transformer(tokens))  # (B, C), (B, h*w, C)
            image = (pooled @ self.visual.proj if self.visual.proj is not None else pooled).float()
            cls, patches = tokens[:, :1], tokens[:, 1:]
            windows = []
            for masks in self.masks:
                masks = masks.to(images.device)
                count, n_windows = masks.shape
                picked = patches[:, masks.t().reshape(-1)]  # (B, W_k * k*k, C)
                picked = picked.reshape(batch * n_windows, count, -1)
                seqs = torch.cat([cls.repeat_interleave(n_windows, dim=0), picked], dim=1)
                if seqs.shape[0] <= self.config.window_batch:  # one chunk (also what an ONNX trace keeps)
                    encoded = self._encode_tokens(seqs)
                else:
                    encoded = torch.cat([self._encode_tokens(c) for c in seqs.split(self.config.window_batch)])
                windows.append(encoded.reshape(batch, n_windows, -1))
        return image, windows, patch_tokens.float()

    def set_references(self, category: str, inputs: Mapping[str, Tensor]) -> None:
        """Encode and keep ``category``'s good reference images (module doc, step 7).

        Args:
            category: the category they are references of.
            inputs: a batch of the K reference images, built from their originals as the test
                images are (:meth:`clipsam.pipeline.Pipeline.set_references`); reads
                ``inputs[input_key]`` (K, 3, S, S) CLIP-normalised.
        """
        if self.input_key not in inputs:
            raise KeyError(f"method {self.name!r} reads its references from inputs[{self.input_key!r}], which is missing")
        images = inputs[self.input_key]
        if images.dim() != 4 or images.shape[0] < 1:
            raise ValueError(f"reference images of {category!r} must be (K >= 1, 3, H, W), got {tuple(images.shape)}")
        resized = resize_images(images.float().to(self._device()), self.input_size)
        _, windows, patches = self.encode_with_patches(resized)
        self.references[category] = ReferenceEmbeddings(
            patches=patches.reshape(-1, patches.shape[-1]),
            windows=[w.reshape(-1, w.shape[-1]) for w in windows],
            count=int(images.shape[0]),
        )

    def _few_shot_maps(self, patches: Tensor, windows: Sequence[Tensor], categories: Sequence[str]) -> Tensor:
        """M_fs (B, h, w) of each image against its category's references (steps 8-9)."""
        out = patches.new_zeros(patches.shape[0], *self.grid)
        for category in dict.fromkeys(categories):
            refs = self.references.get(category)
            if refs is None:
                raise ConfigError(
                    f"model.method=winclip with model.method_config.k_shot={self.config.k_shot} needs good reference "
                    f"images of category {category!r} and has none: `clipsam test/validate/predict` draws them by "
                    "data.reference; Segmenter takes them as references={category: [images]} or set_references()"
                )
            rows = torch.tensor([i for i, c in enumerate(categories) if c == category], device=patches.device)
            patch_level = visual_association_scores(patches[rows], refs.patches.to(patches.device))
            scale_maps = [
                harmonic_aggregation(visual_association_scores(w[rows], ref.to(w.device)), m, self.grid)
                for w, ref, m in zip(windows, refs.windows, self.masks)
            ]
            out[rows] = few_shot_map(patch_level.reshape(-1, *self.grid), scale_maps)
        return out

    def forward(self, images: Tensor, categories: Sequence[str]) -> MapOutput:
        """Args: images (B, 3, H, W) CLIP-normalised frame; categories: B names.

        Returns:
            :class:`MapOutput` with ``anomaly_map`` (B, H, W) in [0, 1] and ``image_scores`` (B,)
            (s0; with ``k_shot`` (s0 + max M_fs) / 2); ``extras["scale_maps"]``: the zero-shot
            M_k on the patch grid, (B, K, h, w); with ``k_shot`` also ``extras["zero_shot_map"]``
            M and ``extras["few_shot_map"]`` M_fs, (B, h, w), and ``extras["zero_shot_scores"]`` s0.
        """
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be (B, 3, H, W), got {tuple(images.shape)}")
        if len(categories) != images.shape[0]:
            raise ValueError(f"got {len(categories)} categories for {images.shape[0]} images")
        height, width = self.output_size(images)
        text = self.text_embeddings(categories)  # (B, 2, D)
        image, windows, patches = self.encode_with_patches(resize_images(images.float(), self.input_size))
        s0 = zero_shot_scores(image.unsqueeze(1), text, self.config.temperature)[:, 0]  # (B,)
        scale_maps = [
            harmonic_aggregation(zero_shot_scores(w, text, self.config.temperature), m, self.grid)
            for w, m in zip(windows, self.masks)
        ]
        fused = fuse_scales(scale_maps, s0 if self.config.use_image_score else None)  # (B, h, w)
        extras: dict[str, Tensor] = {"scale_maps": torch.stack(scale_maps, dim=1)}
        image_scores = s0
        if self.config.k_shot:
            few = self._few_shot_maps(patches, windows, categories)  # (B, h, w) M_fs
            extras.update(zero_shot_map=fused, few_shot_map=few, zero_shot_scores=s0)
            fused, image_scores = fuse_few_shot(fused, few, s0)
        anomaly_map = F.interpolate(fused.unsqueeze(1), size=(height, width), mode="bilinear", align_corners=False)
        return MapOutput(anomaly_map=anomaly_map.squeeze(1).clamp(0.0, 1.0), image_scores=image_scores, extras=extras)


def input_specs(config: WinClipConfig, *, image_size: int) -> list[InputSpec]:
    """WinCLIP's input: the original image at ``input_size`` with ``resize``, CLIP-normalised."""
    size = int(config.input_size or image_size)
    if config.resize == "pil_bicubic" and size == int(image_size):
        return []  # exactly the evaluation frame
    return [InputSpec(key="method_image", size=size, resize=config.resize, normalize="clip")]


def reference_count(config: WinClipConfig) -> int:
    """How many good reference images per category the method needs: ``k_shot`` (0: none)."""
    return int(config.k_shot)


def build(config: WinClipConfig, *, image_size: int) -> WinClip:
    """Build WinCLIP for frames of side ``image_size`` (weights resolved as :mod:`clipsam.models.clip`)."""
    input_size = int(config.input_size or image_size)
    clip_model, tokenizer = build_open_clip(
        section="model.method_config",
        model_name=config.model_name,
        pretrained=config.pretrained,
        image_size=input_size,
        cache_dir=config.cache_dir,
        seed=config.seed,
    )
    return WinClip(clip_model=clip_model, tokenizer=tokenizer, config=config, input_size=input_size)
