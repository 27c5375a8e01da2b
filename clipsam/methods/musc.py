"""MuSc (Li et al., ICLR 2024): training-free, transductive zero-shot anomaly segmentation.

MuSc has no text and no training: every test image is scored against the OTHER unlabelled
test images of its category. Normal patches find close matches in most other images, an
anomalous patch finds close matches in few of them. The computation is therefore over a whole
category at once (:meth:`MuSc.score_category`); :meth:`MuSc.forward` applies it to each
category present in a batch, so a batch that holds a whole category gives the reference's
numbers, and a category with a single image in the batch cannot be scored (error). Under DDP
each process holds a shard of the category (:mod:`clipsam.data.category_batches`):
:meth:`MuSc.score_category_shard` runs the backbone on the process's own images, gathers the
tokens of the whole category from all processes (:func:`gather_rows`, in dataset order) and
scores the whole category on every process, keeping its own rows: one process's result.

Restated from the public reference code (github xrli-U/MuSc; file and function named per step):

1. Input (``datasets/mvtec.py`` with the ``preprocess`` of ``models/musc.py::MuSc.load_backbone``,
   open_clip's ``image_transform``): the ORIGINAL image squash-resized to ``img_resize`` = 518
   by PIL bicubic, CLIP-normalised (:func:`input_specs`; at a 518 frame this is the frame).
2. Backbone (``MuSc.load_backbone``, vendored open_clip ``factory.create_model``): CLIP
   ViT-L-14-336 / openai built for 518 px; for a size other than the native one the reference
   rebuilds the model from its architecture config, which resizes the positional grid
   bicubically without antialiasing (``model.resize_pos_embed``: :func:`resize_pos_embed_bicubic`)
   and which, lacking a ``quick_gelu`` entry, runs the OpenAI weights with exact GELU
   (``quick_gelu: false``). Patch tokens are the residual stream after the blocks
   ``feature_layers`` + 1 (``transformer.Transformer.forward``'s ``out_layers``), width C, no
   ``ln_post``/projection; the class token is the usual pooled, projected image embedding,
   L2-normalised (``MuSc.make_category_data``). The reference runs this under CUDA autocast.
3. LNAMD (``models/modules/_LNAMD.py::LNAMD._embed``), per tapped layer and per degree r:
   (a) drop the class token, lay the tokens on the h x w grid and normalise each image's
   whole (C, h, w) block with one parameter-free LayerNorm (:func:`layer_norm_tokens`);
   (b) cut r x r neighbourhoods (unfold, stride 1, zero padding (r - 1) / 2) and reduce each
   channel's r * r values to their mean by an adaptive 1-d average pool over the flattened
   (C, r, r) block (``MeanMapper``): the zero-padded r x r box mean, divisor always r^2
   (:func:`neighbourhood_mean`; r = 1 is the identity);
   (c) L2-normalise each aggregated patch feature (``MuSc.make_category_data``). Together:
   :func:`lnamd`.
4. MSM (``models/modules/_MSM.py::MSM`` / ``compute_scores_fast``), per layer and r: for image
   i and patch p, the Euclidean distance to the nearest patch of each other image j
   (``torch.cdist`` then the minimum over j's patches; :func:`nearest_patch_distances`), then
   the mean of the values ranked k_min .. k_max - 1 in ascending order over the M - 1 other
   images, with k = int((M - 1) * fraction) for a fraction < 1 and an absolute count
   otherwise (``topmin_min`` = 0, ``topmin_max`` = 0.3: the mean of the smallest 30 %;
   :func:`topmin_bounds`, :func:`interval_mean`). :func:`mutual_scores` does both in chunks.
5. Combination (``MuSc.make_category_data``): the mean over the layers for each r, then the
   mean over r (:func:`average_scores`).
6. Upsampling (``MuSc.make_category_data``): the h x w grid bilinearly (align_corners True) to
   the image size; no smoothing (:func:`upsample_scores`).
7. Image score (``MuSc.make_category_data`` + ``models/modules/_RsCIN.py::RsCIN`` / ``MMO``):
   the maximum of each upsampled map, min-max normalised over the category, then refined with
   the class-token similarity graph W = c c^T: for each k of ``rscin_k`` keep the k largest
   entries of every row of W (the rest set to 0), row-normalise and average the normalised
   scores with those weights; the final score is the mean over the k (:func:`rscin`,
   :func:`rscin_from_similarity`). ``rscin_k``: [1, 2, 3] for MVTec-AD (and others), [1, 8, 9]
   for VisA; a 0 in the list turns RsCIN off (the raw maxima are the scores).

Differences to the reference, each kept small and documented:

- Maps are returned in [0, 1] as the reference's map / 2 (2 = the largest distance between
  unit vectors): a fixed monotone rescale, every metric unchanged. Image scores are RsCIN's
  (in [0, 1] already; clamped). ``extras`` keep the reference's own numbers.
- A small category: the reference takes the mean of an empty set (NaN) when
  int((M - 1) * topmin_max) is 0 (fewer than 5 images at 0.3) and fails when a k of RsCIN
  exceeds M; here at least one other image is averaged and k is clamped to M. A category whose
  maxima are all equal gets image score 0 (the reference's min-max is 0 / 0).
- LNAMD, MSM and RsCIN run in float32 (the reference's class tokens come out of autocast in
  float16); ``amp`` runs only the backbone under float16 autocast, on CUDA.
- The grid is upsampled straight to the evaluation frame; the image score is the maximum of the
  grid upsampled to ``input_size``, as the reference (which evaluates at 518).
- Only open_clip ViT backbones (the reference also runs DINO / DINOv2); ``divide_num`` (the
  reference's split of a category into random subsets, 1 by default) is not offered: feed the
  subsets as separate batches.

Dimension symbols: M images of one category, B batch, L = h * w patches, C token width,
D joint embedding width, R degrees r, Y tapped layers, S input side, H x W the frame.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from clipsam.data.category_batches import PAD_KEY
from clipsam.errors import ConfigError
from clipsam.inputs import InputSpec
from clipsam.methods._openclip import (
    FrozenClipMixin,
    build_open_clip,
    check_vit,
    pil_input_specs,
    resize_images,
    resize_pos_embed_bicubic,
)
from clipsam.methods.base import MapOutput, MapProducer

__all__ = [
    "CONFIG",
    "MuSc",
    "MuscConfig",
    "average_scores",
    "build",
    "category_block",
    "estimate_category_bytes",
    "gather_objects",
    "gather_rows",
    "inference_batching",
    "input_specs",
    "interval_mean",
    "layer_norm_tokens",
    "lnamd",
    "mutual_scores",
    "nearest_patch_distances",
    "neighbourhood_mean",
    "resize_pos_embed_bicubic",
    "rscin",
    "rscin_from_similarity",
    "topmin_bounds",
    "upsample_scores",
]

_KEY = "model.method_config"
_GIB = float(2**30)
_MAX_DISTANCE = 2.0  # the largest Euclidean distance between two unit vectors


@dataclass
class MuscConfig:
    """MuSc's settings (``model.method_config`` when ``model.method=musc``); defaults are the
    reference's (``configs/musc.yaml``, ``scripts/musc.sh``).

    Attributes:
        model_name: open_clip ViT architecture (``ViT-L-14-336``; ``clipsam-tiny-240`` for tests).
        pretrained: open_clip tag (``openai``) or a local checkpoint file; ``None``/``""`` gives
            random weights seeded with ``seed`` (tests, demo).
        cache_dir: open_clip's weight cache (``None``: its default).
        input_size: Side the ORIGINAL image is squash-resized to (PIL bicubic) before the model
            (the reference's ``img_resize``, 518: a 37 x 37 grid with patch 14); ``None``: the
            frame size. Must be a multiple of the patch size.
        feature_layers: Tapped blocks, 0-based as the reference's ``feature_layers`` (the output
            of block i + 1 counted from 1): [5, 11, 17, 23] for a 24-block ViT-L.
        r_list: LNAMD aggregation degrees r (odd), [1, 3, 5].
        topmin_min: Lower end of MSM's interval mean over the other images (a fraction of M - 1
            below 1, else a count): 0.
        topmin_max: Upper end (fraction below 1, else a count): 0.3, the smallest 30 %.
        rscin_k: RsCIN's neighbourhood sizes k; the image score is the mean over them. [1, 2, 3]
            (MVTec-AD and the reference's default), [1, 8, 9] for VisA; any 0 turns RsCIN off.
        quick_gelu: Build with QuickGELU. The reference rebuilds ViT-L-14-336 for 518 px from
            the architecture config, which has no ``quick_gelu`` entry, so its OpenAI weights run
            with exact GELU: ``false``. ``null`` follows the pretrained tag (QuickGELU for openai).
        pos_interpolation: How the positional grid is resized to ``input_size``: ``"bicubic"``
            (the reference's vendored open_clip: bicubic, align_corners False, no antialias) or
            ``"open_clip"`` (installed open_clip's ``force_image_size``: antialiased bicubic).
        amp: Run the frozen backbone under float16 autocast on CUDA (the reference's
            ``torch.cuda.amp.autocast``); no effect on CPU. LNAMD, MSM and RsCIN are float32.
        encode_batch: Images per backbone pass (the reference's scripts use 4); no effect on
            the result. Under DDP also the block of images a category is dealt to the processes
            in (:func:`category_block`), so that their passes hold the same images as one process's.
        distance_chunk_mb: Memory of one block of pairwise patch distances in MSM (MiB); no
            effect on the result, bounds the peak.
        max_category_gib: Refuse a category whose estimated working memory (stored tokens of all
            its images, LNAMD buffers, one distance block, maps:
            :func:`estimate_category_bytes`) exceeds this many GiB; ``None``: no bound. Under DDP
            the whole category counts: every process holds all its tokens.
        seed: Seed of random weights.
    """

    model_name: str = "ViT-L-14-336"
    pretrained: str | None = "openai"
    cache_dir: str | None = None
    input_size: int | None = 518
    feature_layers: list[int] = field(default_factory=lambda: [5, 11, 17, 23])
    r_list: list[int] = field(default_factory=lambda: [1, 3, 5])
    topmin_min: float = 0.0
    topmin_max: float = 0.3
    rscin_k: list[int] = field(default_factory=lambda: [1, 2, 3])
    quick_gelu: bool | None = False
    pos_interpolation: Literal["bicubic", "open_clip"] = "bicubic"
    amp: bool = True
    encode_batch: int = 4
    distance_chunk_mb: float = 1024.0
    max_category_gib: float | None = 48.0
    seed: int = 0

    def __post_init__(self) -> None:
        self.feature_layers = [int(v) for v in self.feature_layers]
        self.r_list = [int(v) for v in self.r_list]
        self.rscin_k = [int(v) for v in self.rscin_k]
        if not self.feature_layers or any(v < 0 for v in self.feature_layers):
            raise ConfigError(f"{_KEY}.feature_layers={self.feature_layers}: give 0-based block indices (e.g. [5, 11, 17, 23]).")
        if len(set(self.feature_layers)) != len(self.feature_layers):
            raise ConfigError(f"{_KEY}.feature_layers={self.feature_layers} lists a block twice.")
        if not self.r_list or any(r < 1 or r % 2 == 0 for r in self.r_list):
            raise ConfigError(f"{_KEY}.r_list={self.r_list}: give odd degrees >= 1 (e.g. [1, 3, 5]).")
        if not self.rscin_k or any(k < 0 for k in self.rscin_k):
            raise ConfigError(f"{_KEY}.rscin_k={self.rscin_k}: give sizes >= 1 (or 0 to turn RsCIN off).")
        for name in ("topmin_min", "topmin_max"):
            value = float(getattr(self, name))
            if not math.isfinite(value) or value < 0:
                raise ConfigError(f"{_KEY}.{name}={value} must be >= 0 (a fraction below 1, else a count).")
            setattr(self, name, value)
        if self.pos_interpolation not in ("bicubic", "open_clip"):
            raise ConfigError(f"{_KEY}.pos_interpolation={self.pos_interpolation!r}: use 'bicubic' or 'open_clip'.")
        if self.input_size is not None and int(self.input_size) < 1:
            raise ConfigError(f"{_KEY}.input_size={self.input_size} must be positive or null.")
        if int(self.encode_batch) < 1:
            raise ConfigError(f"{_KEY}.encode_batch={self.encode_batch} must be >= 1.")
        if not float(self.distance_chunk_mb) > 0:
            raise ConfigError(f"{_KEY}.distance_chunk_mb={self.distance_chunk_mb} must be > 0.")
        if self.max_category_gib is not None and not float(self.max_category_gib) > 0:
            raise ConfigError(f"{_KEY}.max_category_gib={self.max_category_gib} must be > 0 or null.")


CONFIG = MuscConfig


# ---------------------------------------------------------------------- pure functions
def layer_norm_tokens(tokens: Tensor, eps: float = 1e-5) -> Tensor:
    """LNAMD's normalisation: one parameter-free LayerNorm over each image's whole token block.

    ``x' = (x - mean(x)) / sqrt(var(x) + eps)`` with mean and (biased) variance over all L * C
    values of an image (the reference's ``LayerNorm([C, h, w])``, fresh, so weight 1, bias 0).

    Args:
        tokens: (M, L, C) patch tokens of one layer (class token removed).

    Returns:
        (M, L, C) float32.
    """
    return F.layer_norm(tokens.float(), tuple(tokens.shape[-2:]), eps=eps)


def neighbourhood_mean(grid: Tensor, r: int) -> Tensor:
    """LNAMD's aggregation of degree r: the zero-padded r x r box mean per channel, stride 1.

    ``z(i, j) = (1 / r^2) * sum_{|a|, |b| <= (r - 1) / 2} x(i + a, j + b)`` with x = 0 outside the
    grid (the divisor is always r^2, as unfold + adaptive pooling does it). r = 1: the identity.

    Args:
        grid: (M, C, h, w).
        r: Odd degree >= 1.

    Returns:
        (M, C, h, w), same dtype.
    """
    if r < 1 or r % 2 == 0:
        raise ConfigError(f"{_KEY}.r_list: degree {r} must be odd and >= 1.")
    if r == 1:
        return grid
    return F.avg_pool2d(grid, kernel_size=r, stride=1, padding=(r - 1) // 2, count_include_pad=True)


def lnamd(tokens: Tensor, grid: tuple[int, int], r: int) -> Tensor:
    """Z_r of one layer: LayerNorm over the block, r x r neighbourhood mean, unit length per patch.

    Args:
        tokens: (M, L, C) patch tokens, L = h * w row-major.
        grid: (h, w).
        r: Odd degree.

    Returns:
        (M, L, C) float32, each row of unit L2 norm.
    """
    m, n, c = tokens.shape
    h, w = grid
    if n != h * w:
        raise ValueError(f"{n} tokens do not fill a {h} x {w} grid")
    x = layer_norm_tokens(tokens).transpose(1, 2).reshape(m, c, h, w)
    z = neighbourhood_mean(x, r).reshape(m, c, n).transpose(1, 2)
    return F.normalize(z, dim=-1)


def topmin_bounds(others: int, topmin_min: float, topmin_max: float) -> tuple[int, int]:
    """(k_min, k_max): MSM averages the ascending-sorted values ranked k_min .. k_max - 1.

    Each end is ``int(others * v)`` for a fraction v < 1, else the count ``int(v)``; the ends are
    swapped when reversed (as the reference). Unlike the reference (an empty mean, NaN), at least
    one value is averaged, and k_max is at most ``others``.

    Args:
        others: M - 1, the number of other images.
        topmin_min: Lower end.
        topmin_max: Upper end.
    """
    if others < 1:
        raise ValueError("mutual scoring needs at least one other image")

    def count(v: float) -> int:
        return int(others * v) if v < 1 else int(v)

    low, high = count(topmin_min), count(topmin_max)
    if high < low:
        low, high = high, low
    high = min(max(high, 1), others)
    low = min(low, high - 1)
    return low, high


def interval_mean(values: Tensor, k_min: int, k_max: int) -> Tensor:
    """Mean of the values ranked k_min .. k_max - 1 (ascending) along the last dimension.

    Args:
        values: (..., n) with n >= k_max (+inf entries sort last and are never reached when
            k_max does not exceed the finite count).

    Returns:
        (...) the interval mean.
    """
    ranked = values.sort(dim=-1).values[..., k_min:k_max]
    return ranked.mean(dim=-1)


def nearest_patch_distances(query: Tensor, reference: Tensor) -> Tensor:
    """For each query patch, its distance to the nearest patch of each reference image.

    ``d(i, p, j) = min_q || Z_i[p] - Z_j[q] ||_2`` (``torch.cdist``, as the reference).

    Args:
        query: (Q, L, C) images i.
        reference: (J, L', C) images j.

    Returns:
        (Q, L, J).
    """
    q, n, c = query.shape
    j, n_ref, _ = reference.shape
    dist = torch.cdist(query.reshape(1, q * n, c), reference.reshape(1, j * n_ref, c))[0]  # (Q*L, J*L')
    return dist.view(q, n, j, n_ref).amin(dim=-1)


def mutual_scores(z: Tensor, topmin_min: float = 0.0, topmin_max: float = 0.3, *, chunk_bytes: float = 2**30) -> Tensor:
    """MSM: each patch's interval mean, over the OTHER images, of its nearest-patch distance.

    ``a(i, p) = mean_{k_min <= rank < k_max} sort_{j != i} d(i, p, j)`` with d of
    :func:`nearest_patch_distances` and the bounds of :func:`topmin_bounds` for M - 1 others.
    Computed in blocks of query and reference images so that one block of pairwise patch
    distances stays within ``chunk_bytes`` (at least one image pair per block).

    Args:
        z: (M, L, C) aggregated features of one layer and degree, M >= 2.
        topmin_min: Lower end (fraction or count).
        topmin_max: Upper end.
        chunk_bytes: Bound on one (query patches x reference patches) float32 distance block.

    Returns:
        (M, L) float32.
    """
    m, n, _ = z.shape
    if m < 2:
        raise ValueError(f"mutual scoring needs at least 2 images, got {m}")
    k_min, k_max = topmin_bounds(m - 1, topmin_min, topmin_max)
    pair = float(n) * float(n) * 4.0
    per_query_row = pair * m
    if per_query_row <= chunk_bytes:
        q_step, r_step = max(1, int(chunk_bytes // per_query_row)), m
    else:
        q_step, r_step = 1, max(1, int(chunk_bytes // pair))
    out = z.new_empty(m, n, dtype=torch.float32)
    z = z.float()
    for q0 in range(0, m, q_step):
        q1 = min(m, q0 + q_step)
        near = z.new_empty(q1 - q0, n, m)
        for r0 in range(0, m, r_step):
            r1 = min(m, r0 + r_step)
            near[:, :, r0:r1] = nearest_patch_distances(z[q0:q1], z[r0:r1])
        own = torch.arange(q0, q1, device=z.device)
        near[torch.arange(q1 - q0, device=z.device), :, own] = float("inf")  # exclude the image itself
        out[q0:q1] = interval_mean(near, k_min, k_max)
    return out


def average_scores(scores: Sequence[Sequence[Tensor]]) -> Tensor:
    """The reference's combination: mean over the layers for each degree r, then over r.

    Args:
        scores: R lists of Y tensors (M, L) (``scores[r][layer]``).

    Returns:
        (M, L).
    """
    per_r = [torch.stack(list(layers)).mean(dim=0) for layers in scores]
    return torch.stack(per_r).mean(dim=0)


def upsample_scores(scores: Tensor, grid: tuple[int, int], size: tuple[int, int] | int) -> Tensor:
    """Patch-grid scores to pixels: bilinear, align_corners True, no smoothing (the reference).

    Args:
        scores: (M, L) with L = h * w.
        grid: (h, w).
        size: Output (H, W) or side.

    Returns:
        (M, H, W).
    """
    size = (int(size), int(size)) if isinstance(size, int) else (int(size[0]), int(size[1]))
    maps = scores.reshape(scores.shape[0], 1, *grid)
    return F.interpolate(maps, size=size, mode="bilinear", align_corners=True)[:, 0]


def rscin_from_similarity(scores: Tensor, similarity: Tensor, k_list: Sequence[int]) -> Tensor:
    """RsCIN on a given similarity graph W (M, M).

    ``s = (a - min a) / (max a - min a)`` (0 when all equal); for each k: ``W_k`` keeps the k
    largest entries of every row of W (others 0; k clamped to M), ``s_k = D_k^-1 W_k s`` with
    D_k the row sums; the result is the mean of the s_k. A 0 in ``k_list`` returns ``scores``
    unchanged (RsCIN off).

    Args:
        scores: (M,) image scores a.
        similarity: (M, M) W.
        k_list: Neighbourhood sizes.

    Returns:
        (M,) float32.
    """
    scores = scores.float()
    if 0 in list(k_list):
        return scores
    m = scores.shape[0]
    span = scores.max() - scores.min()
    s = (scores - scores.min()) / span if span > 0 else torch.zeros_like(scores)
    w = similarity.float()
    refined = []
    for k in k_list:
        keep = w.topk(min(int(k), m), dim=1).indices
        w_k = torch.zeros_like(w).scatter_(1, keep, w.gather(1, keep))
        refined.append((w_k @ s) / w_k.sum(dim=1))
    return torch.stack(refined).mean(dim=0)


def rscin(scores: Tensor, class_tokens: Tensor, k_list: Sequence[int]) -> Tensor:
    """RsCIN with W = c c^T of the (unit) class embeddings c (M, D) (:func:`rscin_from_similarity`)."""
    c = class_tokens.float()
    return rscin_from_similarity(scores, c @ c.T, k_list)


def estimate_category_bytes(
    num_images: int, patches: int, width: int, num_layers: int, *, chunk_bytes: float, map_pixels: int
) -> int:
    """Estimated peak working memory of :meth:`MuSc.score_category` for M images, in bytes.

    Stored tokens (M * Y * L * C), three LNAMD buffers (M * L * C each), one distance block
    (cdist needs about three times its output) and the maps (two (M, H, W) float32), float32.
    """
    m, n, c = int(num_images), int(patches), int(width)
    tokens = m * int(num_layers) * n * c * 4
    lnamd_buffers = 3 * m * n * c * 4
    distance = 3 * max(float(chunk_bytes), n * n * 4.0)
    maps = 2 * m * int(map_pixels) * 4
    return int(tokens + lnamd_buffers + distance + maps)


# ---------------------------------------------------------------------- across processes (DDP)
def _distributed() -> bool:
    """Whether torch.distributed runs with more than one process."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def gather_objects(value: Any) -> list[Any]:
    """Every process's ``value`` (picklable), in rank order (``all_gather_object``).

    A collective: every process must call it. ``[value]`` when torch.distributed is not
    initialised or runs one process.
    """
    if not _distributed():
        return [value]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, value)
    return out


def gather_rows(tensors: Sequence[Tensor], counts: Sequence[int]) -> list[Tensor]:
    """Each tensor's rows of every process, concatenated in rank order (rank 0's rows first).

    A collective (``all_gather``; the rows are zero-padded to the largest count for it and the
    padding dropped again): every process calls it with the same number of tensors, of the same
    dtype and trailing shape, in the same order. One tensor is gathered at a time, so the peak
    is about twice one gathered tensor on top of the inputs. Unchanged (a new list) when
    torch.distributed is not initialised or runs one process.

    Args:
        tensors: this process's tensors, each (counts[rank], ...).
        counts: the number of rows of every process, in rank order (:func:`gather_objects`).

    Returns:
        per tensor (sum(counts), ...).
    """
    if not _distributed():
        return list(tensors)
    world, rank = dist.get_world_size(), dist.get_rank()
    if len(counts) != world:
        raise ValueError(f"{len(counts)} row counts for {world} processes")
    rows = max(int(n) for n in counts)
    out = []
    for tensor in tensors:
        if tensor.shape[0] != int(counts[rank]):
            raise ValueError(f"process {rank} holds {tensor.shape[0]} rows, its count says {counts[rank]}")
        padded = tensor.new_zeros(rows, *tensor.shape[1:])
        padded[: tensor.shape[0]] = tensor
        parts = [torch.empty_like(padded) for _ in range(world)]
        dist.all_gather(parts, padded)
        out.append(torch.cat([part[: int(n)] for part, n in zip(parts, counts)]))
        del parts, padded
    return out


# ---------------------------------------------------------------------- the producer
class MuSc(FrozenClipMixin, MapProducer):
    """MuSc map producer (training-free, transductive over a category).

    Category-level API: :meth:`score_category` scores the M >= 2 test images of ONE category
    together (the reference's protocol). :meth:`forward` on a batch runs it once per category
    present in the batch; each image is scored against the other images of its category IN THAT
    BATCH, so the reference's numbers need batches that hold whole categories. A category with a
    single image in the batch cannot be scored (:class:`~clipsam.errors.ConfigError`). A DDP
    shard batch (``category_pad`` present: one category, this process's share) goes through
    :meth:`forward_batch` to :meth:`score_category_shard`, which gathers the whole category.

    Args:
        clip_model: open_clip ``CLIP`` with a class-token ViT tower sized for ``input_size``.
        config: The settings.
        input_size: Side the model runs at.
    """

    name = "musc"
    trainable = False

    def __init__(self, *, clip_model: nn.Module, config: MuscConfig, input_size: int) -> None:
        super().__init__()
        self.config = config
        self.clip = clip_model
        self.visual = check_vit(clip_model, _KEY, config.model_name)
        self.input_size = int(input_size)
        side = self._patch_grid()
        self.grid = (side, side)
        depth = len(self.visual.transformer.resblocks)
        bad = [v for v in config.feature_layers if v >= depth]
        if bad:
            raise ConfigError(
                f"{_KEY}.feature_layers={config.feature_layers}: {config.model_name} has blocks 0..{depth - 1} "
                f"(0-based), {bad} do not exist."
            )
        self.width = int(self.visual.conv1.out_channels)
        self._freeze_clip(torch.float32)

    # -- backbone
    def encode(self, images: Tensor) -> tuple[list[Tensor], Tensor]:
        """Patch tokens of the tapped blocks and unit class embeddings.

        Args:
            images: (B, 3, S, S) at ``input_size``, CLIP-normalised.

        Returns:
            ``([tokens (B, L, C) float32 per feature layer], class (B, D) float32 unit)``.
        """
        wanted = set(self.config.feature_layers)
        device = images.device
        use_amp = bool(self.config.amp) and device.type == "cuda"
        with torch.no_grad(), torch.autocast(device.type, dtype=torch.float16, enabled=use_amp):
            x = self.visual._embeds(images.float())
            taps: dict[int, Tensor] = {}
            for index, block in enumerate(self.visual.transformer.resblocks):
                x = block(x)
                if index in wanted:
                    taps[index] = x[:, 1:].float()
            pooled, _ = self.visual._pool(x)
            if self.visual.proj is not None:
                pooled = pooled @ self.visual.proj
        return [taps[v] for v in self.config.feature_layers], F.normalize(pooled.float(), dim=-1)

    def check_category_memory(self, num_images: int, category: str, frame: tuple[int, int]) -> int:
        """Estimated bytes of scoring ``num_images`` together; one-line ConfigError above the bound.

        Under DDP ``num_images`` is the whole category: every process holds all its features.
        """
        side = self.input_size
        need = estimate_category_bytes(
            num_images,
            self.grid[0] * self.grid[1],
            self.width,
            len(self.config.feature_layers),
            chunk_bytes=float(self.config.distance_chunk_mb) * 2**20,
            map_pixels=frame[0] * frame[1] + side * side,
        )
        bound = self.config.max_category_gib
        if bound is not None and need > float(bound) * _GIB:
            where = " on every process (each scores the whole category)" if _distributed() else ""
            raise ConfigError(
                f"musc: category {category!r} has {num_images} images, whose transductive scoring needs an "
                f"estimated {need / _GIB:.2f} GiB{where} > {_KEY}.max_category_gib={bound}: raise it, or split the "
                "category into smaller batches (each then scored on its own)"
            )
        return need

    def _check_category(self, num_images: int, category: str, frame: tuple[int, int]) -> None:
        """At least 2 images, and the memory bound (:meth:`check_category_memory`)."""
        if num_images < 2:
            raise ConfigError(
                f"musc scores each image against the other test images of its category: category {category!r} "
                f"has {num_images} image(s) here; give it at least 2 in the same batch (clipsam test: whole categories)"
            )
        self.check_category_memory(num_images, category, frame)

    # -- the category-level computation
    def _encode_category(self, images: Tensor) -> tuple[list[Tensor], Tensor]:
        """The backbone on M images, ``encode_batch`` at a time from the first (M may be 0).

        Args:
            images: (M, 3, S, S) at ``input_size``.

        Returns:
            ``([tokens (M, L, C) float32 per feature layer], class (M, D) float32 unit)``.
        """
        m, step = int(images.shape[0]), int(self.config.encode_batch)
        tokens = [images.new_empty(m, self.grid[0] * self.grid[1], self.width) for _ in self.config.feature_layers]
        proj = self.visual.proj
        classes = images.new_empty(m, int(proj.shape[1]) if proj is not None else self.width)
        for start in range(0, m, step):
            taps, cls = self.encode(images[start : start + step])
            for store, tap in zip(tokens, taps):
                store[start : start + tap.shape[0]] = tap
            classes[start : start + cls.shape[0]] = cls
        return tokens, classes

    def _score_encoded(self, tokens: list[Tensor], class_tokens: Tensor, frame: tuple[int, int]) -> MapOutput:
        """Steps 3-7 (LNAMD, MSM, combination, upsampling, RsCIN) on ONE whole category's features.

        Args:
            tokens: per feature layer (M, L, C); the list is emptied as the layers are used.
            class_tokens: (M, D) unit class embeddings.
            frame: (H, W) of the returned maps.
        """
        cfg = self.config
        m = int(class_tokens.shape[0])
        chunk = float(cfg.distance_chunk_mb) * 2**20
        per_r = []
        for r in cfg.r_list:
            per_layer = []
            for layer_tokens in tokens:
                z = lnamd(layer_tokens, self.grid, r)
                per_layer.append(mutual_scores(z, cfg.topmin_min, cfg.topmin_max, chunk_bytes=chunk))
                del z
            per_r.append(per_layer)
        tokens.clear()
        patch_scores = average_scores(per_r)  # (M, L), the reference's units
        at_input = upsample_scores(patch_scores, self.grid, self.input_size)
        max_scores = at_input.flatten(1).amax(dim=1)  # the reference's ac_score
        image_scores = rscin(max_scores, class_tokens, cfg.rscin_k)
        if 0 in cfg.rscin_k:
            image_scores = image_scores / _MAX_DISTANCE  # raw maxima, on the map's [0, 1] scale
        maps = at_input if tuple(frame) == (self.input_size, self.input_size) else upsample_scores(patch_scores, self.grid, frame)
        return MapOutput(
            anomaly_map=(maps / _MAX_DISTANCE).clamp(0.0, 1.0),
            image_scores=image_scores.clamp(0.0, 1.0),
            extras={"patch_scores": patch_scores.reshape(m, *self.grid), "max_scores": max_scores},
        )

    def score_category(self, images: Tensor, category: str = "", *, frame: tuple[int, int] | None = None) -> MapOutput:
        """Score the M test images of ONE category against each other (the reference's protocol).

        Args:
            images: (M, 3, S, S) CLIP-normalised, M >= 2 (resized to ``input_size`` if needed).
            category: Its name (for messages).
            frame: (H, W) of the returned maps (default: :meth:`output_size` of ``images``).

        Returns:
            :class:`MapOutput`: ``anomaly_map`` (M, H, W) in [0, 1] (the reference's map / 2),
            ``image_scores`` (M,) RsCIN's; ``extras["patch_scores"]`` (M, h, w) the reference's
            grid scores and ``extras["max_scores"]`` (M,) the reference's map maxima before RsCIN.

        Raises:
            ConfigError: fewer than 2 images, or the memory bound ``max_category_gib``.
        """
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be (M, 3, S, S), got {tuple(images.shape)}")
        frame = frame or self.output_size(images)
        self._check_category(int(images.shape[0]), category, frame)
        with torch.no_grad(), torch.autocast(images.device.type, enabled=False):
            tokens, class_tokens = self._encode_category(resize_images(images.float(), self.input_size))
            return self._score_encoded(tokens, class_tokens, frame)

    def score_category_shard(
        self,
        images: Tensor,
        indices: Tensor | Sequence[int],
        category: str = "",
        *,
        pad: Tensor | Sequence[bool] | None = None,
        frame: tuple[int, int] | None = None,
    ) -> MapOutput:
        """This process's share of ONE category under DDP, scored against the WHOLE category.

        Every process calls this once per category, in the same category order (a collective;
        :class:`clipsam.data.category_batches.CategoryBatchSampler` gives each process one batch
        per category). Steps: the processes exchange (category, dataset indices of their own
        images) (:func:`gather_objects`); the whole category's size M is checked (at least 2, the
        memory bound) on every process alike; each process runs the backbone on ITS images only
        (``encode_batch`` at a time), then the per-layer patch tokens and class tokens of all
        processes are gathered (:func:`gather_rows`) and put in ascending dataset index, the
        order of the category's single-process batch; every process then scores the whole
        category as :meth:`score_category` and keeps the rows of its batch. With
        ``category_block`` images per sampler block the backbone passes hold the same images as
        one process's, so the result is one process's, number for number (on the same hardware).
        Without torch.distributed (or with one process) it is :meth:`score_category` on the
        non-padding rows.

        Args:
            images: (B, 3, S, S) CLIP-normalised, this process's images of the category.
            indices: (B,) their dataset indices (``batch["index"]``): distinct over the
                non-padding rows of all processes; their ascending order is the category's order.
            category: Its name: the same on every process (checked).
            pad: (B,) True for a padding duplicate (``batch["category_pad"]``): left out of the
                gather; its result is the row of its own index. None: no padding.
            frame: (H, W) of the returned maps (default: :meth:`output_size` of ``images``).

        Returns:
            :class:`MapOutput` of the B rows (as :meth:`score_category`).

        Raises:
            ConfigError: the whole category has fewer than 2 images, or the memory bound.
            RuntimeError: the processes hold different categories, an index on two processes,
                or a padding row whose index no process holds.
        """
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be (B, 3, S, S), got {tuple(images.shape)}")
        batch = int(images.shape[0])
        keys = [int(i) for i in (indices.tolist() if isinstance(indices, Tensor) else indices)]
        is_pad = [False] * batch if pad is None else [bool(v) for v in (pad.tolist() if isinstance(pad, Tensor) else pad)]
        if len(keys) != batch or len(is_pad) != batch:
            raise ValueError(f"got {len(keys)} indices and {len(is_pad)} padding flags for {batch} images")
        own = [row for row in range(batch) if not is_pad[row]]
        # Every check below reads only what all processes exchanged here, so every process
        # raises alike (one raising alone would leave the others waiting in the next collective).
        shards = gather_objects(
            (str(category), [keys[row] for row in own], [keys[row] for row in range(batch) if is_pad[row]])
        )
        names = sorted({name for name, _, _ in shards})
        if len(names) != 1:
            raise RuntimeError(
                f"musc: the processes hold different categories in this step ({names}): every process must take "
                "one batch per category in the same order (clipsam's CategoryBatchSampler)"
            )
        counts = [len(shard_keys) for _, shard_keys, _ in shards]
        gathered_keys = [key for _, shard_keys, _ in shards for key in shard_keys]  # rank order
        if len(set(gathered_keys)) != len(gathered_keys):
            raise RuntimeError(f"musc: category {category!r}: an image is held by two processes (indices {gathered_keys})")
        position = {key: p for p, key in enumerate(sorted(gathered_keys))}
        missing = sorted({key for _, _, pad_keys in shards for key in pad_keys if key not in position})
        if missing:
            raise RuntimeError(f"musc: category {category!r}: padding rows of indices {missing} that no process holds")
        frame = frame or self.output_size(images)
        self._check_category(len(gathered_keys), category, frame)
        device = images.device
        with torch.no_grad(), torch.autocast(device.type, enabled=False):
            mine = images[torch.tensor(own, dtype=torch.long, device=device)]
            tokens, class_tokens = self._encode_category(resize_images(mine.float(), self.input_size))
            del mine
            # The gather's transient buffers (about two copies of one layer's tokens) stay within
            # the LNAMD buffers that estimate_category_bytes counts and that are not alive yet.
            gathered = gather_rows([*tokens, class_tokens], counts)
            del tokens, class_tokens
            order = torch.tensor(sorted(range(len(gathered_keys)), key=gathered_keys.__getitem__), device=device)
            for i in range(len(gathered)):  # one at a time: the old copy is freed before the next
                gathered[i] = gathered[i].index_select(0, order)
            class_tokens = gathered.pop()
            whole = self._score_encoded(gathered, class_tokens, frame)
            rows = torch.tensor([position[key] for key in keys], dtype=torch.long, device=device)
            return MapOutput(
                anomaly_map=whole.anomaly_map.index_select(0, rows),
                image_scores=whole.image_scores.index_select(0, rows),
                extras={name: value.index_select(0, rows) for name, value in whole.extras.items()},
            )

    def forward(self, images: Tensor, categories: Sequence[str]) -> MapOutput:
        """Score a batch transductively within each category present in it.

        Every image is scored against the other images of ITS category in THIS batch
        (:meth:`score_category` per category); results come back in batch order. A batch holding
        all test images of a category gives the reference's result for it.

        Args:
            images: (B, 3, S, S) CLIP-normalised method input.
            categories: B category names.

        Returns:
            :class:`MapOutput` (B, H, W) maps in [0, 1], (B,) image scores, extras as
            :meth:`score_category` (batch order).

        Raises:
            ConfigError: a category with a single image in the batch, or the memory bound.
        """
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be (B, 3, S, S), got {tuple(images.shape)}")
        if len(categories) != images.shape[0]:
            raise ValueError(f"got {len(categories)} categories for {images.shape[0]} images")
        groups: dict[str, list[int]] = {}
        for index, category in enumerate(categories):
            groups.setdefault(str(category), []).append(index)
        lonely = [c for c, rows in groups.items() if len(rows) < 2]
        if lonely:
            raise ConfigError(
                f"musc scores each image against the other test images of its category (transductive): category "
                f"{lonely[0]!r} has 1 image in this batch; give each category at least 2 images per batch "
                "(clipsam test: whole categories per batch)"
            )
        frame = self.output_size(images)
        batch = images.shape[0]
        anomaly_map = images.new_empty(batch, *frame, dtype=torch.float32)
        image_scores = images.new_empty(batch, dtype=torch.float32)
        patch_scores = images.new_empty(batch, *self.grid, dtype=torch.float32)
        max_scores = images.new_empty(batch, dtype=torch.float32)
        for category, rows in groups.items():
            index = torch.tensor(rows, device=images.device)
            out = self.score_category(images[index], category, frame=frame)
            anomaly_map[index] = out.anomaly_map
            image_scores[index] = out.image_scores
            patch_scores[index] = out.extras["patch_scores"]
            max_scores[index] = out.extras["max_scores"]
        return MapOutput(
            anomaly_map=anomaly_map,
            image_scores=image_scores,
            extras={"patch_scores": patch_scores, "max_scores": max_scores},
        )

    def forward_batch(self, batch: Mapping[str, Any]) -> MapOutput:
        """:meth:`forward` on a batch; a DDP category shard (a batch with ``category_pad``, from
        :class:`clipsam.data.category_batches.CategoryShardDataset`) goes to
        :meth:`score_category_shard` instead, which gathers the category across processes.

        Raises:
            ValueError: a shard batch holding more than one category.
        """
        if PAD_KEY not in batch:
            return super().forward_batch(batch)
        if self.input_key not in batch:
            return super().forward_batch(batch)  # the base class's error naming the missing input
        categories = sorted({str(c) for c in batch["category"]})
        if len(categories) != 1:
            raise ValueError(f"a DDP category shard holds one category, this batch holds {categories}")
        images = batch[self.input_key]
        return self.score_category_shard(
            images, batch["index"], categories[0], pad=batch[PAD_KEY], frame=self.output_size(images)
        )


# ---------------------------------------------------------------------- registry hooks
def input_specs(config: MuscConfig, *, image_size: int) -> list[InputSpec]:
    """The reference's input: PIL bicubic squash of the original to ``input_size``, CLIP-normalised
    (none besides the frame when that is the frame)."""
    return pil_input_specs(config.input_size, image_size=image_size)


def inference_batching(config: MuscConfig, *, image_size: int) -> str:
    """How validate/test/predict must batch this method's images: ``"category"``, i.e. one batch
    per category holding ALL its test images (any batch size setting ignored), no tiling; under
    DDP one batch per category on every process holding its shard, the shards gathered by
    :meth:`MuSc.score_category_shard`. MuSc is transductive (:class:`MuSc`); with ordinary
    batches each image is scored only against its batch mates of the same category."""
    return "category"


def category_block(config: MuscConfig, *, image_size: int) -> int:
    """Images per block when a category is dealt to the processes under DDP: ``encode_batch``, so
    that every backbone pass of a process holds the images of one single-process pass and the
    gathered features are the single-process numbers (:mod:`clipsam.data.category_batches`)."""
    return int(config.encode_batch)


def build(config: MuscConfig, *, image_size: int) -> MuSc:
    """Build MuSc for frames of side ``image_size`` (weights resolved as :mod:`clipsam.models.clip`)."""
    input_size = int(config.input_size or image_size)
    clip_model, _ = build_open_clip(
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
    return MuSc(clip_model=clip_model, config=config, input_size=input_size)
