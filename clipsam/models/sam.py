"""The frozen SAM of the second stage: building, weights, an embedding cache and the refiner.

- :func:`build_sam` builds ``vit_h`` / ``vit_l`` / ``vit_b`` through segment_anything's own
  registry (``sam_model_registry``) and loads the official checkpoint strictly, or builds the
  ``tiny`` preset (segment_anything's own modeling classes, small sizes, random weights seeded)
  for tests and the demo. Weights resolve as: ``model.sam.checkpoint`` (a local file) ->
  the cache directory -> download (progress bar, sha256 check) -> one :class:`WeightsError`.
- :class:`EmbeddingCache` stores SAM image embeddings on disk, keyed by image content and
  weights, so a second test run with other PPG/CPS settings skips the image encoder.
- :class:`SamRefiner` (the ``ppg_cps`` refiner) runs PPG (:mod:`clipsam.prompting`) and CPS on a
  batch with one encoder pass, calling SAM's prompt encoder and mask decoder sub-modules
  directly, one call per cascade step for the whole batch.

Dimension symbols: B batch, N points, C SAM embedding channels (256; 32 for tiny), h x w SAM's
embedding grid (64 x 64; 16 x 16 for tiny), H x W the evaluation frame, S SAM's square input
side (``image_encoder.img_size``: 1024; 256 for tiny).

Geometry (as ``SamPredictor``): SAM encodes the ORIGINAL image (H0 x W0), its long side resized
to S with the aspect kept (h' x w', in the DataLoader worker) then normalised and zero-padded to
S x S (batched, on the device). PPG prompts made in frame pixels are mapped to original-image
pixels (pixel centre to centre) and then to SAM's input with ``apply_coords``' arithmetic; CPS
boxes are boxes of the previous mask at the original size; masks come back to the frame with
``Sam.postprocess_masks`` (S x S -> crop h' x w' -> H x W) for fusion and metrics.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import os
import time
import warnings
from collections.abc import Mapping
from functools import partial
from pathlib import Path
from typing import Any, Literal

import cv2
import numpy as np
import torch
from segment_anything.build_sam import sam_model_registry
from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer
from torch import nn

from clipsam.cascade import EMPTY_LOGIT, CascadeConfig, CascadeStep, logits_to_boxes
from clipsam.data.transforms import sam_input_size
from clipsam.errors import ConfigError, WeightsError
from clipsam.io import atomic_torch_save
from clipsam.methods.base import RefineBatchOutput, Refiner
from clipsam.prompting import PromptConfig, generate_point_prompts_batched

__all__ = [
    "SAM_CHECKPOINTS",
    "SAM_VARIANTS",
    "BatchCascade",
    "EmbeddingCache",
    "RefineOutput",
    "SamConfig",
    "SamRefiner",
    "build_sam",
    "build_sam_tiny",
    "default_cache_dir",
    "frame_to_original",
    "original_to_input",
    "resolve_checkpoint",
    "sam_input_side",
    "weights_identity",
]

SAM_URL_ROOT = "https://dl.fbaipublicfiles.com/segment_anything/"


@dataclasses.dataclass(frozen=True)
class _Checkpoint:
    filename: str
    sha256: str
    size: int


SAM_CHECKPOINTS: dict[str, _Checkpoint] = {
    "vit_h": _Checkpoint(
        "sam_vit_h_4b8939.pth", "a7bf3b02f3ebf1267aba913ff637d9a2d5c33d3173bb679e46d9f338c26f262e", 2564550879
    ),
    "vit_l": _Checkpoint(
        "sam_vit_l_0b3195.pth", "3adcc4315b642a4d2101128f611684e8734c41232a17c648ed1693702a49a622", 1249524607
    ),
    "vit_b": _Checkpoint(
        "sam_vit_b_01ec64.pth", "ec2df62732614e57411cdcf32a23ffdf28910380d03139ee0f4fcbe91eb8c912", 375042383
    ),
}
"""Official checkpoints (segment-anything README): file name, sha256 and size in bytes.

The sha256 values are those published for the official files by several independent projects
(the hex in the file name is not a sha256 prefix, so torch.hub's ``hash_prefix`` convention does
not apply); a download is checked against the full sha256.
"""

SAM_VARIANTS: tuple[str, ...] = ("vit_h", "vit_l", "vit_b", "tiny")
"""Valid values of ``model.sam.variant``."""

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


@dataclasses.dataclass
class SamConfig:
    """Which SAM and where its weights are (config key ``model.sam``).

    Attributes:
        variant: "vit_h" (the paper's), "vit_l", "vit_b", or "tiny" (random weights, tests/demo).
        checkpoint: a local checkpoint file; None resolves the official file in ``cache_dir``,
            downloading it when missing (and ``download`` is true).
        cache_dir: where official checkpoints are kept; None means ``$CLIPSAM_CACHE/sam`` if that
            environment variable is set, else ``~/.cache/clipsam/sam``.
        embedding_cache_dir: directory of the on-disk image-embedding cache; None disables it.
            ``predict`` uses it only with ``model.evaluation.predict_embedding_cache``.
        embedding_cache_max_gb: size bound of that cache; least recently used entries are
            deleted beyond it. None: unbounded.
        dtype: dtype of the image encoder ("bfloat16" halves its memory; the prompt encoder and
            mask decoder always run in float32).
        seed: seed of the random weights of the "tiny" variant.
        download: allow downloading a missing official checkpoint.
        sdpa_attention: run the image encoder's attention through
            ``F.scaled_dot_product_attention`` with the decomposed relative-position terms as
            its additive mask (:mod:`clipsam.models.sam_attention`; same numbers, faster and
            leaner). False keeps segment_anything's own attention.
        compile: ``torch.compile`` the image encoder (default off: compiling vit_h takes about a
            minute on the first batch, worth it only for long GPU runs).
    """

    variant: Literal["vit_h", "vit_l", "vit_b", "tiny"] = "vit_h"
    checkpoint: str | None = None
    cache_dir: str | None = None
    embedding_cache_dir: str | None = None
    embedding_cache_max_gb: float | None = 20.0
    dtype: Literal["float32", "bfloat16"] = "float32"
    seed: int = 0
    download: bool = True
    sdpa_attention: bool = True
    compile: bool = False

    def __post_init__(self) -> None:
        if self.variant not in SAM_VARIANTS:
            raise ConfigError(f"model.sam.variant={self.variant!r} is unknown; use one of {list(SAM_VARIANTS)}")
        if self.dtype not in _DTYPES:
            raise ConfigError(f"model.sam.dtype={self.dtype!r} is unknown; use one of {list(_DTYPES)}")


def sam_input_side(variant: str) -> int:
    """S, the square input side of a SAM variant's image encoder, without building it."""
    return 256 if variant == "tiny" else 1024


def default_cache_dir() -> Path:
    """``$CLIPSAM_CACHE/sam`` if the variable is set, else ``~/.cache/clipsam/sam``."""
    root = os.environ.get("CLIPSAM_CACHE")
    return Path(root).expanduser() / "sam" if root else Path("~/.cache/clipsam/sam").expanduser()


def _freeze(sam: Sam) -> Sam:
    sam.eval()
    sam.requires_grad_(False)
    return sam


def build_sam_tiny(*, seed: int = 0) -> Sam:
    """The "tiny" preset: segment_anything's modeling classes at toy sizes, random weights.

    Image encoder: ViT, input 256, patch 16, width 64, depth 2, 2 heads, window 4 with global
    attention in block 2, 32 output channels (embedding (32, 16, 16)). Prompt encoder and mask
    decoder as SAM's with transformer width 32 (low-res logits (1, 64, 64)). Weights come from a
    ``torch.manual_seed(seed)`` forked RNG, so the global RNG is untouched.
    """
    img_size, patch, dim = 256, 16, 32
    grid = img_size // patch
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        sam = Sam(
            image_encoder=ImageEncoderViT(
                img_size=img_size,
                patch_size=patch,
                embed_dim=64,
                depth=2,
                num_heads=2,
                mlp_ratio=4,
                out_chans=dim,
                qkv_bias=True,
                norm_layer=partial(nn.LayerNorm, eps=1e-6),
                use_rel_pos=True,
                window_size=4,
                global_attn_indexes=(1,),
            ),
            prompt_encoder=PromptEncoder(
                embed_dim=dim,
                image_embedding_size=(grid, grid),
                input_image_size=(img_size, img_size),
                mask_in_chans=4,
            ),
            mask_decoder=MaskDecoder(
                num_multimask_outputs=3,
                transformer=TwoWayTransformer(depth=2, embedding_dim=dim, mlp_dim=64, num_heads=2),
                transformer_dim=dim,
                iou_head_depth=3,
                iou_head_hidden_dim=dim,
            ),
            pixel_mean=[123.675, 116.28, 103.53],
            pixel_std=[58.395, 57.12, 57.375],
        )
    return _freeze(sam)


def resolve_checkpoint(config: SamConfig) -> Path:
    """The local checkpoint file of ``config``, downloading the official one if needed.

    Order: ``config.checkpoint`` if set (never downloaded); else the official file name in
    ``config.cache_dir`` (or :func:`default_cache_dir`); if missing and ``config.download``,
    download it there with a progress bar and check its sha256.

    Raises:
        WeightsError: the file is missing and cannot be downloaded (offline, download disabled,
            checksum mismatch); the message says where to put the file or which key to set.
    """
    if config.variant == "tiny":
        raise ConfigError("model.sam.variant='tiny' has no checkpoint: it is built with random weights")
    if config.checkpoint:
        path = Path(config.checkpoint).expanduser()
        if not path.is_file():
            raise WeightsError(
                f"SAM checkpoint not found: {path} (model.sam.checkpoint). Point model.sam.checkpoint to "
                f"an existing {config.variant} checkpoint, or unset it to use the cache directory"
            )
        return path
    official = SAM_CHECKPOINTS[config.variant]
    cache_dir = Path(config.cache_dir).expanduser() if config.cache_dir else default_cache_dir()
    path = cache_dir / official.filename
    if path.is_file():
        return path
    url = SAM_URL_ROOT + official.filename
    hint = (
        f"download {url} (sha256 {official.sha256}) to {path}, or set model.sam.checkpoint to a local "
        f"copy of it"
    )
    if not config.download:
        raise WeightsError(f"SAM {config.variant} checkpoint not found at {path} and model.sam.download is false: {hint}")
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
        # Writes to a temporary file and moves it into place only after the sha256 matched.
        torch.hub.download_url_to_file(url, str(path), hash_prefix=official.sha256, progress=True)
    except Exception as err:  # URLError (offline), OSError, RuntimeError (checksum mismatch)
        raise WeightsError(
            f"SAM {config.variant} checkpoint not found at {path} and downloading it failed "
            f"({type(err).__name__}: {err}); {hint}"
        ) from err
    return path


_FILE_SHA256: dict[tuple[str, int, int], str] = {}


def _file_sha256(path: Path) -> str:
    """sha256 of a file, hashed once: memoised by (path, size, mtime) in this process and in a
    ``.<name>.sha256`` file next to it (when that folder is writable), so later runs skip the hash."""
    stat = path.stat()
    memo_key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    if memo_key in _FILE_SHA256:
        return _FILE_SHA256[memo_key]
    sidecar = path.with_name(f".{path.name}.sha256")
    stamp = f"{stat.st_size} {stat.st_mtime_ns} "
    try:
        text = sidecar.read_text()
        if text.startswith(stamp) and len(text.split()) == 3:
            _FILE_SHA256[memo_key] = text.split()[2]
            return _FILE_SHA256[memo_key]
    except OSError:
        pass
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
    _FILE_SHA256[memo_key] = digest.hexdigest()
    try:
        sidecar.write_text(stamp + _FILE_SHA256[memo_key] + "\n")
    except OSError:
        pass  # read-only weights folder: hash again next process
    return _FILE_SHA256[memo_key]


def weights_identity(config: SamConfig, *, pretrained: bool = True) -> str:
    """A string naming the exact weights, used in :class:`EmbeddingCache` keys.

    - "tiny" (or ``pretrained=False``): ``"<variant>:random:seed=<seed>"``;
    - a checkpoint file (the official one in the cache directory or ``model.sam.checkpoint``):
      ``"<variant>:sha256=<sha256 of the file's bytes>"``. The file is always hashed (once; see
      :func:`_file_sha256`), never trusted by its name: other weights saved under the official
      name must not reuse the official weights' cached embeddings. A file under the official
      name whose hash differs from the published one gets a warning.

    The encoder dtype is not part of it (:class:`SamRefiner` adds it to the cache key).
    """
    if config.variant == "tiny" or not pretrained:
        return f"{config.variant}:random:seed={config.seed}"
    path = resolve_checkpoint(config)
    digest = _file_sha256(path)
    official = SAM_CHECKPOINTS[config.variant]
    if path.name == official.filename and digest != official.sha256:
        warnings.warn(
            f"SAM checkpoint {path} has the official {config.variant} file name but not its published sha256 "
            f"({official.sha256[:12]}...): it is not the official file (modified or damaged); using it as is",
            stacklevel=2,
        )
    return f"{config.variant}:sha256={digest}"


def _load_strict(sam: Sam, path: Path, variant: str) -> None:
    """Load a checkpoint file into ``sam``: CPU, ``weights_only=True``, no missing/unexpected keys."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise WeightsError(
            f"cannot read SAM checkpoint {path} ({type(err).__name__}: {err}); the file is incomplete or not a "
            "SAM state dict: delete it to download it again, or fix model.sam.checkpoint"
        ) from err
    if not isinstance(state, Mapping):
        raise WeightsError(f"SAM checkpoint {path} holds a {type(state).__name__}, not a state dict (model.sam.checkpoint)")
    expected = set(sam.state_dict())
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        raise WeightsError(
            f"SAM checkpoint {path} does not match variant {variant!r}: {len(missing)} missing keys "
            f"{missing[:5]}, {len(unexpected)} unexpected keys {unexpected[:5]}; set model.sam.variant to the "
            "checkpoint's variant or model.sam.checkpoint to a checkpoint of this variant"
        )
    try:
        sam.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise WeightsError(
            f"SAM checkpoint {path} does not fit variant {variant!r} ({err}); check model.sam.variant"
        ) from err


def build_sam(config: SamConfig, *, pretrained: bool = True) -> Sam:
    """Build a frozen SAM (eval mode, no gradients) from ``config``.

    Args:
        config: the variant, checkpoint and cache settings.
        pretrained: False builds ``vit_*`` with random weights seeded by ``config.seed`` (for
            benchmarks; never chosen by a config). "tiny" always has random weights.

    Returns:
        ``segment_anything.modeling.Sam``, on the CPU; the image encoder in ``config.dtype``.

    Raises:
        WeightsError: the checkpoint cannot be found, downloaded or loaded strictly.
    """
    if config.variant == "tiny":
        sam = build_sam_tiny(seed=config.seed)
    else:
        path = resolve_checkpoint(config) if pretrained else None
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.seed)
            sam = sam_model_registry[config.variant](checkpoint=None)  # the builder; weights below
        if path is not None:
            _load_strict(sam, path, config.variant)
    sam.image_encoder.to(_DTYPES[config.dtype])
    if config.sdpa_attention:
        from clipsam.models.sam_attention import install_sdpa_attention

        install_sdpa_attention(sam.image_encoder)
    return _freeze(sam)


class EmbeddingCache:
    """On-disk cache of SAM image embeddings.

    A key is the sha256 of the model identity (weights identity, encoder dtype, input side) and
    of what is encoded: the valid (h', w') part of the uint8 SAM input (:meth:`key`). Files are ``<directory>/<key[:2]>/<key>.pt``
    holding ``{"key": str, "embedding": (1, C, h, w) float32}``, written atomically
    (:func:`clipsam.io.atomic_torch_save`) and read with ``torch.load(weights_only=True)``.

    A file that cannot be read, does not hold what its name says, has the wrong shape (when
    ``embedding_shape`` is known) or non-finite values is ignored with a warning and recomputed
    (then overwritten). The cache is a speed-up only: when its folder cannot be written
    (read-only, full disk) it warns once and the run carries on without storing embeddings.

    Args:
        directory: the cache root (``~`` expanded).
        embedding_shape: (1, C, h, w) of a valid entry; None learns it from the first entry
            stored.

    Attributes:
        directory: the cache root.
        hits, misses: lookups served / not served since construction.
        writable: False once a write failed (nothing more is stored).
    """

    def __init__(
        self,
        directory: str | os.PathLike[str],
        *,
        embedding_shape: tuple[int, ...] | None = None,
        max_bytes: int | None = None,
    ) -> None:
        self.directory = Path(os.path.expanduser(os.fspath(directory)))
        self.embedding_shape = tuple(embedding_shape) if embedding_shape is not None else None
        self.hits = 0
        self.misses = 0
        self.writable = True
        # LRU bound: a hit touches its file; above max_bytes the least recently used files go.
        self.max_bytes = int(max_bytes) if max_bytes else None
        self._size: int | None = None  # bytes on disk, scanned once, then tracked

    @staticmethod
    def key(image: torch.Tensor, *, model_id: str) -> str:
        """Cache key of one encoded image.

        Args:
            image: uint8 (3, h', w'), the valid part of SAM's input (the original image resized
                to SAM's long side, before padding).
            model_id: identity of the weights and encoder settings (see :class:`SamRefiner`).

        Returns:
            64 hex characters.
        """
        digest = hashlib.sha256()
        digest.update(model_id.encode())
        digest.update(f"|{tuple(image.shape)}|{image.dtype}|".encode())
        digest.update(image.detach().contiguous().cpu().numpy().tobytes())
        return digest.hexdigest()

    def path(self, key: str) -> Path:
        """The file of ``key``."""
        return self.directory / key[:2] / f"{key}.pt"

    def load(self, key: str) -> torch.Tensor | None:
        """The cached (1, C, h, w) float32 embedding of ``key``, or None (missing, corrupt or invalid)."""
        path = self.path(key)
        try:
            if not path.is_file():
                self.misses += 1
                return None
        except OSError:
            self.misses += 1
            return None
        try:
            entry = torch.load(path, map_location="cpu", weights_only=True)
            if not isinstance(entry, dict) or entry.get("key") != key:
                raise ValueError("the file does not hold this key's entry")
            embedding = entry["embedding"]
            if not isinstance(embedding, torch.Tensor) or embedding.ndim != 4 or embedding.shape[0] != 1:
                raise ValueError("no (1, C, h, w) embedding tensor in it")
            if self.embedding_shape is not None and tuple(embedding.shape) != self.embedding_shape:
                raise ValueError(f"embedding of shape {tuple(embedding.shape)}, expected {self.embedding_shape}")
            if not torch.isfinite(embedding).all():
                raise ValueError("the embedding holds NaN or infinite values")
        except Exception as err:
            warnings.warn(f"ignoring unreadable or invalid SAM embedding cache file {path} ({err}); recomputing it", stacklevel=2)
            self.misses += 1
            return None
        self.hits += 1
        if self.max_bytes:
            with contextlib.suppress(OSError):
                os.utime(path)  # most recently used
        return embedding.to(torch.float32)

    def save(self, key: str, embedding: torch.Tensor) -> None:
        """Store a (1, C, h, w) embedding under ``key`` (atomic write); never raises for a bad disk.

        Above ``max_bytes`` the least recently used entries are deleted."""
        if self.embedding_shape is None:
            self.embedding_shape = tuple(embedding.shape)
        if not self.writable:
            return
        entry = {"key": key, "embedding": embedding.detach().to("cpu", torch.float32).contiguous().clone()}
        path = self.path(key)
        try:
            atomic_torch_save(entry, path)
        except (OSError, RuntimeError) as err:  # torch.save reports some write failures as RuntimeError
            self.writable = False
            reason = getattr(err, "strerror", None) or str(err).splitlines()[0]
            warnings.warn(
                f"SAM embedding cache {self.directory} cannot be written ({reason}); carrying on "
                "without storing embeddings (model.sam.embedding_cache_dir: point it to a writable folder, "
                "or set it empty to turn the cache off)",
                stacklevel=2,
            )
            return
        if self.max_bytes:
            if self._size is None:
                self._size = sum(p.stat().st_size for p in self.directory.glob("*/*.pt"))
            else:
                self._size += path.stat().st_size
            if self._size > self.max_bytes:
                self._evict(keep=path)

    def _evict(self, *, keep: Path) -> None:
        """Delete least recently used entries until the cache holds at most 90 % of ``max_bytes``."""
        assert self.max_bytes is not None
        entries = []
        for p in self.directory.glob("*/*.pt"):
            with contextlib.suppress(OSError):
                st = p.stat()
                entries.append((st.st_mtime_ns, st.st_size, p))
        entries.sort()
        total = sum(size for _, size, _ in entries)
        for _, size, p in entries:
            if total <= 0.9 * self.max_bytes:
                break
            if p == keep:
                continue
            with contextlib.suppress(OSError):
                p.unlink()
                total -= size
        self._size = total


@dataclasses.dataclass
class RefineOutput:
    """What :meth:`SamRefiner.refine` returns for one image.

    Attributes:
        mask: (H, W) bool, the final cascade mask (M_3 with 3 steps) in the frame; all False
            without points.
        mask_probs: (H, W) float32 in [0, 1], sigmoid of the final mask logits (0 without points).
        point_coords: (N, 2) float32, (x, y) frame pixels (positives first).
        point_labels: (N,) int64, 1 positive, 0 negative.
        steps: one :class:`clipsam.cascade.CascadeStep` per decoder call: ``mask_logits`` /
            ``mask`` in the frame, ``box`` in ORIGINAL-image pixels (the box of the previous
            step's mask at the original size, as ``SamPredictor`` would get it).
        timings: seconds per stage: "sam_encoder" (encoder pass or cache load; 0 when the
            embedding was passed in), "ppg", "cascade_step_1" ... for the steps that ran.
        cache_hit: True if the embedding came from the embedding cache, None if there is no cache
            or the embedding was passed in.
        original_logits: (H0, W0) float32, the final mask logits at the original image size
            (what ``SamPredictor.predict(return_logits=True)`` returns); -inf without points.
    """

    mask: torch.Tensor
    mask_probs: torch.Tensor
    point_coords: torch.Tensor
    point_labels: torch.Tensor
    steps: list[CascadeStep]
    timings: dict[str, float]
    cache_hit: bool | None = None
    original_logits: torch.Tensor | None = None


@dataclasses.dataclass
class BatchCascade:
    """The batched cascade's output for R prompt sets (one per image, or per region).

    Attributes:
        frame_logits: (R, H, W) float32 final mask logits in the frame (-inf without points).
        low_res_logits: per step, (R, 1, 4h, 4w) float32 decoder logits (SAM's mask_input).
        boxes: per step, (R, 4) float32 XYXY original-image pixels given to the step, or None
            for steps without a box; ``box_valid`` (R,) bool says which rows had one.
        box_valid: per step, (R,) bool or None.
        has_points: (R,) bool, prompt sets with at least one point.
        seconds: per step, wall seconds.
        ious: per step, (R,) the decoder's predicted IoU of the chosen mask.
    """

    frame_logits: torch.Tensor
    low_res_logits: list[torch.Tensor]
    boxes: list[torch.Tensor | None]
    box_valid: list[torch.Tensor | None]
    has_points: torch.Tensor
    seconds: list[float]
    ious: list[torch.Tensor] = dataclasses.field(default_factory=list)


def frame_to_original(coords: torch.Tensor, frame_size: tuple[int, int], original_sizes: torch.Tensor) -> torch.Tensor:
    """Map (x, y) frame pixel indices to original-image pixel coordinates, pixel centre to centre.

    ``x_orig = (x + 0.5) * W0 / W - 0.5`` (likewise y), SAM's click convention (a click at
    integer x means pixel x, its centre at x + 0.5) kept across the resize.

    Args:
        coords: (R, K, 2) float32 (x, y) in the H x W frame.
        frame_size: (H, W).
        original_sizes: (R, 2) (H0, W0) per row.

    Returns:
        (R, K, 2) float32.
    """
    height, width = frame_size
    scale = torch.stack((original_sizes[:, 1] / width, original_sizes[:, 0] / height), 1).to(coords.device, torch.float64)
    return ((coords.to(torch.float64) + 0.5) * scale[:, None, :] - 0.5).to(torch.float32)


def original_to_input(coords: torch.Tensor, original_sizes: torch.Tensor, input_sizes: torch.Tensor) -> torch.Tensor:
    """SAM's ``ResizeLongestSide.apply_coords``: original pixels -> SAM input pixels, batched.

    The same arithmetic as segment_anything's (float64 product, then float32).

    Args:
        coords: (R, ..., 2) (x, y) original-image pixels.
        original_sizes, input_sizes: (R, 2) (h, w).
    """
    ratio = (input_sizes.to(torch.float64) / original_sizes.to(torch.float64)).flip(1)  # (R, 2) (w'/W0, h'/H0)
    shape = (ratio.shape[0],) + (1,) * (coords.ndim - 2) + (2,)
    return (coords.to(torch.float64) * ratio.to(coords.device).view(shape)).to(torch.float32)


class SamRefiner(Refiner):
    """PPG + CPS with a frozen SAM that encodes the ORIGINAL image (SAM stage contract, design.md).

    SAM sees each image as ``SamPredictor.set_image`` does: the original image, long side resized
    to S = ``image_encoder.img_size`` with the aspect kept, normalised and zero-padded to S x S
    (the resize happens in the DataLoader worker, :func:`clipsam.data.transforms.build_sam_input`;
    normalisation and padding here, batched on the device). PPG works on the frame (the CLIP
    map) with the SAM features of the valid, un-padded part of the embedding; its points are
    mapped frame -> original -> SAM input; CPS boxes are boxes of the previous step's mask at the
    ORIGINAL size (as a ``SamPredictor`` cascade gets them); masks come back to the frame with
    ``Sam.postprocess_masks`` for fusion and metrics.

    The whole stage is batched: one encoder call per batch (cache hits skipped), PPG for the
    batch (:func:`clipsam.prompting.generate_point_prompts_batched`), then per cascade step one
    prompt-encoder and one mask-decoder call for all prompt sets (points padded with SAM's
    label -1; a step-3 batch mixing images with and without a box runs the decoder once on each group of rows).
    SAM stays in eval mode even if a parent module is put in training mode.

    Args:
        sam: a ``segment_anything.modeling.Sam`` (frozen here).
        prompt: PPG settings.
        cascade: CPS settings.
        embedding_cache: optional on-disk cache of image embeddings.
        weights_id: identity of SAM's weights (:func:`weights_identity`); required with a cache so
            embeddings from other weights are never reused.
        compile_encoder: run the image encoder through ``torch.compile`` (``model.sam.compile``).
    """

    name = "ppg_cps"

    def __init__(
        self,
        *,
        sam: Sam,
        prompt: PromptConfig,
        cascade: CascadeConfig,
        embedding_cache: EmbeddingCache | None = None,
        weights_id: str = "",
        compile_encoder: bool = False,
    ) -> None:
        super().__init__()
        if embedding_cache is not None and not weights_id:
            raise ValueError("SamRefiner: pass weights_id=weights_identity(config) when using an embedding cache")
        self.sam = _freeze(sam)
        self.prompt = prompt
        self.cascade = cascade
        self.embedding_cache = embedding_cache
        self.weights_id = weights_id
        self.encoder_calls = 0  # images passed through the image encoder (for tests/benchmarks)
        self.sync_timings = False  # synchronise the device around timed stages (benchmarks)
        # The callable that runs the image encoder (not a registered sub-module: sam owns it).
        self.__dict__["encoder"] = torch.compile(sam.image_encoder) if compile_encoder else sam.image_encoder

    def train(self, mode: bool = True) -> SamRefiner:
        """Keep SAM in eval mode whatever ``mode`` is."""
        super().train(mode)
        self.sam.eval()
        return self

    @property
    def device(self) -> torch.device:
        return self.sam.device

    @property
    def side(self) -> int:
        """S, SAM's square input side (``image_encoder.img_size``)."""
        return int(self.sam.image_encoder.img_size)

    @property
    def model_id(self) -> str:
        """Weights identity + encoder dtype + input side: the model part of cache keys."""
        encoder_dtype = next(self.sam.image_encoder.parameters()).dtype
        return f"{self.weights_id}|{encoder_dtype}|{self.side}"

    def _now(self) -> float:
        if self.sync_timings and self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    # ------------------------------------------------------------------ encoder
    def preprocess(self, sam_images: torch.Tensor, sam_sizes: torch.Tensor) -> torch.Tensor:
        """``Sam.preprocess`` for a batch, on the device: normalise, zero outside the valid part.

        Args:
            sam_images: uint8 (B, 3, S, S), :func:`~clipsam.data.transforms.build_sam_input`.
            sam_sizes: (B, 2) int64 valid (h, w).

        Returns:
            (B, 3, S, S) float32.
        """
        x = sam_images.to(self.device, non_blocking=True).to(torch.float32)
        x = (x - self.sam.pixel_mean) / self.sam.pixel_std
        sizes = sam_sizes.to(self.device, non_blocking=True)
        pos = torch.arange(self.side, device=self.device)
        valid = (pos[None, :, None] < sizes[:, 0, None, None]) & (pos[None, None, :] < sizes[:, 1, None, None])
        return x * valid[:, None].to(x.dtype)

    def _encode(self, sam_images: torch.Tensor, sam_sizes: torch.Tensor) -> torch.Tensor:
        dtype = next(self.sam.image_encoder.parameters()).dtype
        self.encoder_calls += sam_images.shape[0]
        return self.encoder(self.preprocess(sam_images, sam_sizes).to(dtype)).to(torch.float32)

    @torch.no_grad()
    def encode(self, sam_images: torch.Tensor, sam_sizes: torch.Tensor) -> torch.Tensor:
        """SAM image embeddings of a batch of SAM inputs, through the cache when there is one.

        The cache key is the valid (h, w) part of each uint8 input (what is encoded) and the
        model identity; images not in the cache are encoded in one batched call, then stored.

        Returns:
            (B, C, h, w) float32 embeddings of the padded S x S inputs, on SAM's device.
        """
        if sam_images.ndim != 4 or sam_images.shape[1:] != (3, self.side, self.side) or sam_images.dtype != torch.uint8:
            raise ValueError(
                f"sam_images must be uint8 (B, 3, {self.side}, {self.side}) (data.sam_image_size must be SAM's "
                f"input side {self.side}), got {sam_images.dtype} {tuple(sam_images.shape)}"
            )
        cache = self.embedding_cache
        if cache is None:
            return self._encode(sam_images, sam_sizes)
        sizes = sam_sizes.tolist()
        keys = [cache.key(img[:, :h, :w], model_id=self.model_id) for img, (h, w) in zip(sam_images, sizes)]
        found = [cache.load(key) for key in keys]
        todo = [i for i, emb in enumerate(found) if emb is None]
        if todo:
            computed = self._encode(sam_images[todo], sam_sizes[todo])
            for i, emb in zip(todo, computed):
                cache.save(keys[i], emb[None])
                found[i] = emb[None]
        return torch.cat([emb.to(self.device) for emb in found])  # (B, C, h, w)

    def sam_inputs(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """SAM inputs of uint8 (B, 3, H0, W0) original images (host, per image; not the hot path)."""
        from clipsam.data.transforms import build_sam_input

        if images.ndim != 4 or images.shape[1] != 3 or images.dtype != torch.uint8:
            raise ValueError(f"images must be uint8 (B, 3, H, W), got {images.dtype} {tuple(images.shape)}")
        built = [build_sam_input(img.permute(1, 2, 0).cpu().numpy(), self.side) for img in images]
        return torch.stack([b[0] for b in built]), torch.stack([b[1] for b in built])

    @torch.no_grad()
    def embed_images(self, images: torch.Tensor) -> torch.Tensor:
        """SAM image embeddings of ORIGINAL images (as ``SamPredictor.set_image`` computes them).

        Args:
            images: uint8 (B, 3, H0, W0) original images (RGB, 0-255), one size for the batch.

        Returns:
            (B, C, h, w) float32 embeddings (of the padded S x S input) on SAM's device.
        """
        return self.encode(*self.sam_inputs(images))

    # ------------------------------------------------------------------ decoder
    def _decode(
        self,
        embeddings: torch.Tensor,
        points: torch.Tensor,
        labels: torch.Tensor,
        boxes: torch.Tensor | None,
        mask_input: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Prompt encoder + mask decoder for R prompt sets on their own R image embeddings.

        ``MaskDecoder.predict_masks`` runs all prompt sets on ONE image embedding; here row r's
        prompts meet row r's embedding (same sub-modules, same weights, same order of operations).

        Args:
            embeddings: (R, C, h, w); points: (R, K, 2) SAM input pixels; labels: (R, K) (-1 pad);
            boxes: (R, 4) SAM input pixels or None; mask_input: (R, 1, 4h, 4w) logits or None.

        Returns:
            (R, 1, 4h, 4w) low-res logits of the chosen mask and (R,) its predicted IoU.
        """
        encoder, decoder = self.sam.prompt_encoder, self.sam.mask_decoder
        sparse, dense = encoder(points=(points, labels), boxes=boxes, masks=mask_input)
        rows = sparse.shape[0]
        out_tokens = torch.cat([decoder.iou_token.weight, decoder.mask_tokens.weight], 0)
        tokens = torch.cat((out_tokens[None].expand(rows, -1, -1), sparse), 1)
        src = embeddings + dense
        pos = encoder.get_dense_pe().expand(rows, -1, -1, -1)
        b, c, h, w = src.shape
        hs, src = decoder.transformer(src, pos, tokens)
        iou_out = hs[:, 0, :]
        mask_out = hs[:, 1 : 1 + decoder.num_mask_tokens, :]
        upscaled = decoder.output_upscaling(src.transpose(1, 2).reshape(b, c, h, w))
        hyper = torch.stack([mlp(mask_out[:, i, :]) for i, mlp in enumerate(decoder.output_hypernetworks_mlps)], 1)
        b, c, h, w = upscaled.shape
        masks = (hyper @ upscaled.view(b, c, h * w)).view(b, -1, h, w)
        iou = decoder.iou_prediction_head(iou_out)
        if self.cascade.multimask:
            masks, iou = masks[:, 1:], iou[:, 1:]
            best = iou.argmax(1)
            pick = torch.arange(rows, device=masks.device)
            return masks[pick, best][:, None], iou[pick, best]
        return masks[:, :1], iou[:, 0]

    def _postprocess(self, low_res: torch.Tensor, groups: list[tuple[list[int], tuple[int, int], tuple[int, int]]]) -> list[tuple[list[int], torch.Tensor]]:
        """``Sam.postprocess_masks`` per group of rows sharing (input size, target size)."""
        return [(rows, self.sam.postprocess_masks(low_res[rows], inp, out)[:, 0]) for rows, inp, out in groups]

    @staticmethod
    def _groups(keys: list[tuple]) -> list[tuple[list[int], tuple[int, int], tuple[int, int]]]:
        by_key: dict[tuple, list[int]] = {}
        for row, key in enumerate(keys):
            by_key.setdefault(key, []).append(row)
        return [(rows, key[0], key[1]) for key, rows in by_key.items()]

    def run_cascade_batched(
        self,
        embeddings: torch.Tensor,
        point_coords: torch.Tensor,
        point_labels: torch.Tensor,
        *,
        frame_size: tuple[int, int],
        input_sizes: list[tuple[int, int]],
        original_sizes: list[tuple[int, int]],
        skip_empty: bool = False,
    ) -> BatchCascade:
        """CPS for R prompt sets at once (Eq. 8-12), ``cascade.num_steps`` decoder calls.

        Step 1: points; step 2: points + step 1's low-res logits; step 3: points + the box of
        step 2's mask at the ORIGINAL size (:func:`clipsam.cascade.logits_to_boxes`) + step 2's
        logits. A row whose step-2 mask is empty gets no box (points + logits), as
        :func:`clipsam.cascade.run_cascade` does.

        Args:
            embeddings: (R, C, h, w) each row's image embedding.
            point_coords: (R, K, 2) float32 (x, y) frame pixels; point_labels: (R, K) (-1 pad).
            frame_size: (H, W).
            input_sizes: R (h', w') valid SAM-input sizes; original_sizes: R (H0, W0).
            skip_empty: return at once (no decoder call) when no row has a point (one sync).

        Returns:
            A :class:`BatchCascade`; rows without points get -inf frame logits.
        """
        rows = point_coords.shape[0]
        device = embeddings.device
        labels = point_labels.to(device)
        has_points = (labels >= 0).any(1)
        original_t = torch.tensor(original_sizes, dtype=torch.int64).view(rows, 2)
        input_t = torch.tensor(input_sizes, dtype=torch.int64).view(rows, 2)
        original_coords = frame_to_original(point_coords.to(device), frame_size, original_t)
        points = original_to_input(original_coords, original_t, input_t)
        ratio = (input_t.to(torch.float64) / original_t.to(torch.float64)).flip(1).repeat(1, 2).to(device)
        out = BatchCascade(  # frame_logits: set at the end
            frame_logits=torch.empty(0), low_res_logits=[], boxes=[], box_valid=[], has_points=has_points, seconds=[],
        )
        if rows == 0 or (skip_empty and not bool(has_points.any())):
            out.frame_logits = torch.full((rows, *frame_size), EMPTY_LOGIT, dtype=torch.float32, device=device)
            return out
        to_original = self._groups([(tuple(i), tuple(o)) for i, o in zip(input_sizes, original_sizes)])
        to_frame = self._groups([(tuple(i), tuple(frame_size)) for i in input_sizes])
        low_res = None
        for step in range(1, self.cascade.num_steps + 1):
            start = self._now()
            boxes = valid = None
            if step == 3:
                boxes = torch.zeros((rows, 4), dtype=torch.float32, device=device)
                valid = torch.zeros(rows, dtype=torch.bool, device=device)
                for group, logits in self._postprocess(low_res, to_original):
                    group_boxes, group_valid = logits_to_boxes(logits, self.cascade.mask_threshold)
                    boxes[group], valid[group] = group_boxes, group_valid
            mask_input = low_res
            if boxes is None:
                low_res, iou = self._decode(embeddings, points, labels, None, mask_input)
            else:
                boxes_in = (boxes.to(torch.float64) * ratio).to(torch.float32)  # apply_boxes
                boxed = valid.nonzero().squeeze(1)
                count = int(boxed.numel())  # one sync: which decoder calls to make
                if count in (0, rows):  # every row with a box, or none
                    low_res, iou = self._decode(embeddings, points, labels, boxes_in if count else None, mask_input)
                else:  # the rows with a box, then the rows without one
                    unboxed = (~valid).nonzero().squeeze(1)
                    with_box = self._decode(embeddings[boxed], points[boxed], labels[boxed], boxes_in[boxed], mask_input[boxed])
                    without = self._decode(embeddings[unboxed], points[unboxed], labels[unboxed], None, mask_input[unboxed])
                    low_res = with_box[0].new_empty((rows, *with_box[0].shape[1:]))
                    iou = with_box[1].new_empty(rows)
                    for index, (part_logits, part_iou) in ((boxed, with_box), (unboxed, without)):
                        low_res[index], iou[index] = part_logits, part_iou
            out.low_res_logits.append(low_res)
            out.ious.append(iou)
            out.boxes.append(boxes)
            out.box_valid.append(valid)
            out.seconds.append(self._now() - start)
        groups = self._postprocess(low_res, to_frame)
        if len(groups) == 1:  # one SAM input size: the rows are already in order
            frame_logits = groups[0][1]
        else:
            frame_logits = torch.empty((rows, *frame_size), dtype=torch.float32, device=device)
            for group, logits in groups:
                frame_logits[group] = logits
        out.frame_logits = frame_logits.masked_fill_(~has_points[:, None, None], EMPTY_LOGIT)
        return out

    # ------------------------------------------------------------------ PPG + CPS
    def feature_extent(self, embeddings: torch.Tensor, input_sizes: torch.Tensor) -> torch.Tensor:
        """(B, 2) float64 feature cells covered by the valid input: ``(h' * h / S, w' * w / S)``."""
        grid = torch.tensor(embeddings.shape[-2:], dtype=torch.float64)
        return input_sizes.to(torch.float64).cpu() * grid / self.side

    def _region_maps(self, anomaly_maps: torch.Tensor) -> tuple[torch.Tensor, list[int]]:
        """``Map_a`` on each connected component of ``S_a`` (8-connectivity), for ``per_region``.

        Components are ordered by their peak value (highest first) and capped at
        ``cascade.max_regions`` per image; an image without a component keeps its own (empty) map.
        Runs on the host (OpenCV's labelling).

        Returns:
            (R, H, W) maps and the R image indices they belong to.
        """
        maps, owners = [], []
        for b, amap in enumerate(anomaly_maps):
            region = (amap >= self.prompt.threshold).cpu().numpy().astype(np.uint8)
            count, components = cv2.connectedComponents(region, connectivity=8)
            components_t = torch.from_numpy(components).to(amap.device)
            peaks = [(float(amap[components_t == c].max()), c) for c in range(1, count)]
            chosen = [c for _, c in sorted(peaks, key=lambda pc: (-pc[0], pc[1]))[: self.cascade.max_regions]]
            for c in chosen:
                maps.append(torch.where(components_t == c, amap, torch.zeros_like(amap)))
                owners.append(b)
            if not chosen:
                maps.append(amap)
                owners.append(b)
        return torch.stack(maps), owners

    @torch.no_grad()
    def refine_embedded(
        self,
        embeddings: torch.Tensor,
        anomaly_maps: torch.Tensor,
        *,
        input_sizes: list[tuple[int, int]],
        original_sizes: list[tuple[int, int]],
        skip_empty: bool = False,
    ) -> dict:
        """PPG then CPS for a batch whose SAM embeddings are known.

        Args:
            embeddings: (B, C, h, w) float32 SAM embeddings of the originals' SAM inputs.
            anomaly_maps: (B, H, W) float32 in [0, 1], ``Map_a`` in the frame.
            input_sizes: B (h', w') valid SAM-input sizes; original_sizes: B (H0, W0).

        Returns:
            dict: ``mask`` (B, H, W) bool, ``logits`` (B, H, W) float32 frame logits,
            ``coords`` (R, K, 2) / ``labels`` (R, K) frame points, ``owners`` (R image indices),
            ``cascade`` (:class:`BatchCascade`), ``timings``.
        """
        timings: dict[str, float] = {}
        frame = (int(anomaly_maps.shape[1]), int(anomaly_maps.shape[2]))
        amaps = anomaly_maps.to(self.device, torch.float32)
        extent = self.feature_extent(embeddings, torch.tensor(input_sizes, dtype=torch.int64).view(-1, 2))
        if self.cascade.per_region:
            amaps, owners = self._region_maps(amaps)
        else:
            owners = list(range(amaps.shape[0]))
        index = torch.tensor(owners, dtype=torch.int64)
        row_embeddings = embeddings if not self.cascade.per_region else embeddings[index.to(embeddings.device)]
        start = self._now()
        coords, labels = generate_point_prompts_batched(
            amaps, row_embeddings, feature_extent=extent[index].to(self.device), **self.prompt.kwargs()
        )
        timings["ppg"] = self._now() - start
        result = self.run_cascade_batched(
            row_embeddings,
            coords,
            labels,
            frame_size=frame,
            input_sizes=[tuple(input_sizes[o]) for o in owners],
            original_sizes=[tuple(original_sizes[o]) for o in owners],
            skip_empty=skip_empty,
        )
        for step, seconds in enumerate(result.seconds, start=1):
            timings[f"cascade_step_{step}"] = seconds
        logits = result.frame_logits
        if self.cascade.per_region:  # union of the region masks = max of their logits
            merged = torch.full((embeddings.shape[0], *frame), EMPTY_LOGIT, device=logits.device)
            owner = index.to(logits.device).view(-1, 1, 1).expand_as(logits)
            logits = merged.scatter_reduce_(0, owner, logits, "amax", include_self=True)
        return {
            "mask": logits > self.cascade.mask_threshold,
            "logits": logits,
            "coords": coords,
            "labels": labels,
            "owners": owners,
            "cascade": result,
            "timings": timings,
        }

    @torch.no_grad()
    def refine_batch(self, batch: Mapping[str, Any], anomaly_maps: torch.Tensor) -> RefineBatchOutput:
        """The refiner interface: the batch's SAM inputs + the CLIP maps -> masks in the frame.

        Reads ``sam_image`` uint8 (B, 3, S, S), ``sam_size`` (B, 2) and ``original_size`` (B, 2)
        from the batch (the dataset adds them when ``data.sam_image_size`` is set, which
        ``ClipSamModule`` does for test/validate/predict). One host sync reads the sizes.

        Args:
            batch: the DataLoader batch.
            anomaly_maps: (B, H, W) float32 in [0, 1], ``Map_a`` in the frame.

        Returns:
            :class:`~clipsam.methods.base.RefineBatchOutput` with ``mask`` (B, H, W) bool and
            ``mask_probs`` (B, H, W) float32 on ``anomaly_maps``' device, and timings
            ("sam_encoder", "ppg", "cascade_step_k").
        """
        if "sam_image" not in batch or "sam_size" not in batch:
            raise ConfigError(
                "the batch has no 'sam_image'/'sam_size': the SAM stage encodes the original image, which the "
                f"dataset adds when data.sam_image_size is set ({self.side} for this SAM); ClipSamModule sets it "
                "for test/validate/predict, or build the items with clipsam.data.transforms.build_sam_input"
            )
        sam_images, sam_sizes = batch["sam_image"], batch["sam_size"]
        sizes = torch.cat((sam_sizes.reshape(-1, 2), batch["original_size"].reshape(-1, 2).to(sam_sizes.device)), 1).tolist()
        start = self._now()
        embeddings = self.encode(sam_images, sam_sizes)
        encoder_seconds = self._now() - start
        out = self.refine_embedded(
            embeddings,
            anomaly_maps,
            input_sizes=[(s[0], s[1]) for s in sizes],
            original_sizes=[(s[2], s[3]) for s in sizes],
        )
        device = anomaly_maps.device
        return RefineBatchOutput(
            mask=out["mask"].to(device),
            mask_probs=torch.sigmoid(out["logits"]).to(device),
            timings={"sam_encoder": encoder_seconds, **out["timings"]},
        )

    @torch.no_grad()
    def refine(
        self, image: torch.Tensor, anomaly_map: torch.Tensor, *, embedding: torch.Tensor | None = None
    ) -> RefineOutput:
        """PPG then CPS on one image (the batched path on a batch of one).

        Args:
            image: uint8 (3, H0, W0), the ORIGINAL image (RGB, 0-255), any size.
            anomaly_map: (H, W) float32 in [0, 1], the CLIP map ``Map_a`` in the frame.
            embedding: optional precomputed (C, h, w) or (1, C, h, w) embedding of ``image``
                (from :meth:`embed_images`), skipping the encoder and the cache.

        Returns:
            A :class:`RefineOutput`, tensors on ``anomaly_map``'s device.
        """
        if image.ndim != 3 or image.shape[0] != 3 or image.dtype != torch.uint8:
            raise ValueError(f"image must be uint8 (3, H, W), got {image.dtype} {tuple(image.shape)}")
        if anomaly_map.ndim != 2:
            raise ValueError(f"anomaly_map must be (H, W), got {tuple(anomaly_map.shape)}")
        out_device = anomaly_map.device
        original = (int(image.shape[1]), int(image.shape[2]))
        input_size = sam_input_size(*original, self.side)
        timings: dict[str, float] = {}
        cache_hit: bool | None = None
        if embedding is None:
            hits = self.embedding_cache.hits if self.embedding_cache is not None else 0
            start = self._now()
            emb = self.embed_images(image[None])
            timings["sam_encoder"] = self._now() - start
            if self.embedding_cache is not None:
                cache_hit = self.embedding_cache.hits > hits
        else:
            emb = (embedding if embedding.ndim == 4 else embedding[None]).to(self.device, torch.float32)
            timings["sam_encoder"] = 0.0
        out = self.refine_embedded(
            emb, anomaly_map[None], input_sizes=[input_size], original_sizes=[original], skip_empty=True
        )
        timings.update(out["timings"])
        result: BatchCascade = out["cascade"]
        keep = out["labels"] >= 0  # (R, K)
        steps: list[CascadeStep] = []
        for r in range(len(out["owners"])):
            if not bool(result.has_points[r]):
                continue
            for k, low_res in enumerate(result.low_res_logits):
                logits = self._postprocess(low_res[r : r + 1], [([0], input_size, tuple(anomaly_map.shape))])[0][1][0]
                box = result.boxes[k]
                has_box = box is not None and bool(result.box_valid[k][r])
                steps.append(
                    CascadeStep(
                        mask_logits=logits.to(out_device),
                        mask=(logits > self.cascade.mask_threshold).to(out_device),
                        low_res_logits=low_res[r],
                        iou=result.ious[k][r],
                        box=box[r].to(out_device) if has_box else None,
                        used_mask_input=k >= 1,
                        seconds=result.seconds[k],
                    )
                )
        original_logits = None
        if result.low_res_logits:
            per_row = self.sam.postprocess_masks(result.low_res_logits[-1], input_size, original)[:, 0]
            per_row = torch.where(result.has_points[:, None, None], per_row, EMPTY_LOGIT)
            original_logits = per_row.amax(0).to(out_device)
        else:
            original_logits = torch.full(original, EMPTY_LOGIT, device=out_device)
        return RefineOutput(
            mask=out["mask"][0].to(out_device),
            mask_probs=torch.sigmoid(out["logits"][0]).to(out_device),
            point_coords=out["coords"][keep].to(out_device),
            point_labels=out["labels"][keep].to(out_device),
            steps=steps,
            timings=timings,
            cache_hit=cache_hit,
            original_logits=original_logits,
        )
