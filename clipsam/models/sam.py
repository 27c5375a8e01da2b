"""The frozen SAM of the second stage: building, weights, an embedding cache and the refiner.

- :func:`build_sam` builds ``vit_h`` / ``vit_l`` / ``vit_b`` through segment_anything's own
  registry (``sam_model_registry``) and loads the official checkpoint strictly, or builds the
  ``tiny`` preset (segment_anything's own modeling classes, small sizes, random weights seeded)
  for tests and the demo. Weights resolve as: ``model.sam.checkpoint`` (a local file) ->
  the cache directory -> download (progress bar, sha256 check) -> one :class:`WeightsError`.
- :class:`EmbeddingCache` stores SAM image embeddings on disk, keyed by image content and
  weights, so a second test run with other PPG/CPS settings skips the image encoder.
- :class:`SamRefiner` runs PPG (:mod:`clipsam.prompting`) and CPS (:mod:`clipsam.cascade`) on one
  frame image with one encoder pass, calling SAM's prompt encoder and mask decoder directly
  (as ``SamPredictor.predict_torch`` does).

Dimension symbols: B batch, N points, C SAM embedding channels (256; 32 for tiny), h x w SAM's
embedding grid (64 x 64; 16 x 16 for tiny), H x W the evaluation frame, S SAM's square input
side (``image_encoder.img_size``: 1024; 256 for tiny).

Geometry: the frame image goes through SAM's ``ResizeLongestSide(S)`` (as
``SamPredictor.set_image``), is normalised and padded to S x S by ``Sam.preprocess``; prompts in
frame pixels go through the same transform's ``apply_coords_torch`` / ``apply_boxes_torch``;
masks come back to the frame with ``Sam.postprocess_masks``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import math
import os
import time
import warnings
from collections.abc import Mapping
from functools import partial
from pathlib import Path
from typing import Literal

import cv2
import numpy as np
import torch
from segment_anything.build_sam import sam_model_registry
from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer
from segment_anything.utils.transforms import ResizeLongestSide
from torch import nn

from clipsam.cascade import CascadeConfig, CascadeResult, CascadeStep, run_cascade
from clipsam.errors import ConfigError, WeightsError
from clipsam.io import atomic_torch_save
from clipsam.prompting import PromptConfig, generate_point_prompts

__all__ = [
    "SAM_CHECKPOINTS",
    "SAM_VARIANTS",
    "EmbeddingCache",
    "RefineOutput",
    "SamConfig",
    "SamRefiner",
    "build_sam",
    "build_sam_tiny",
    "default_cache_dir",
    "resolve_checkpoint",
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
    """

    variant: Literal["vit_h", "vit_l", "vit_b", "tiny"] = "vit_h"
    checkpoint: str | None = None
    cache_dir: str | None = None
    embedding_cache_dir: str | None = None
    embedding_cache_max_gb: float | None = 20.0
    dtype: Literal["float32", "bfloat16"] = "float32"
    seed: int = 0
    download: bool = True

    def __post_init__(self) -> None:
        if self.variant not in SAM_VARIANTS:
            raise ConfigError(f"model.sam.variant={self.variant!r} is unknown; use one of {list(SAM_VARIANTS)}")
        if self.dtype not in _DTYPES:
            raise ConfigError(f"model.sam.dtype={self.dtype!r} is unknown; use one of {list(_DTYPES)}")


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
    return _freeze(sam)


class EmbeddingCache:
    """On-disk cache of SAM image embeddings.

    A key is the sha256 of the model identity (weights identity, encoder dtype, input side) and
    of the frame image's shape and bytes (:meth:`key`). Files are ``<directory>/<key[:2]>/<key>.pt``
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
        """Cache key of one frame image.

        Args:
            image: uint8 (3, H, W) frame image.
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
        mask: (H, W) bool, the final cascade mask (M_3 with 3 steps); all False without points.
        mask_probs: (H, W) float32 in [0, 1], sigmoid of the final mask logits (0 without points).
        point_coords: (N, 2) float32, (x, y) frame pixels (positives first).
        point_labels: (N,) int64, 1 positive, 0 negative.
        steps: one :class:`clipsam.cascade.CascadeStep` per decoder call (masks, boxes, logits).
        timings: seconds per stage: "sam_encoder" (encoder pass or cache load; 0 when the
            embedding was passed in), "ppg", "cascade_step_1" ... for the steps that ran.
        cache_hit: True if the embedding came from the embedding cache, None if there is no cache
            or the embedding was passed in.
    """

    mask: torch.Tensor
    mask_probs: torch.Tensor
    point_coords: torch.Tensor
    point_labels: torch.Tensor
    steps: list[CascadeStep]
    timings: dict[str, float]
    cache_hit: bool | None = None


class SamRefiner(nn.Module):
    """PPG + CPS with a frozen SAM on frame images (the SAM stage contract of docs/design.md).

    Stateless between calls: each :meth:`refine` encodes (or loads) its image's embedding once
    and reuses it for PPG and every cascade step. SAM stays in eval mode even if a parent module
    is put in training mode.

    Args:
        sam: a ``segment_anything.modeling.Sam`` (frozen here).
        prompt: PPG settings.
        cascade: CPS settings.
        embedding_cache: optional on-disk cache of image embeddings.
        weights_id: identity of SAM's weights (:func:`weights_identity`); required with a cache so
            embeddings from other weights are never reused.
    """

    def __init__(
        self,
        *,
        sam: Sam,
        prompt: PromptConfig,
        cascade: CascadeConfig,
        embedding_cache: EmbeddingCache | None = None,
        weights_id: str = "",
    ) -> None:
        super().__init__()
        if embedding_cache is not None and not weights_id:
            raise ValueError("SamRefiner: pass weights_id=weights_identity(config) when using an embedding cache")
        self.sam = _freeze(sam)
        self.prompt = prompt
        self.cascade = cascade
        self.embedding_cache = embedding_cache
        self.weights_id = weights_id
        self.transform = ResizeLongestSide(sam.image_encoder.img_size)
        self.encoder_calls = 0  # images passed through the image encoder (for tests/benchmarks)

    def train(self, mode: bool = True) -> SamRefiner:
        """Keep SAM in eval mode whatever ``mode`` is."""
        super().train(mode)
        self.sam.eval()
        return self

    @property
    def device(self) -> torch.device:
        return self.sam.device

    @property
    def model_id(self) -> str:
        """Weights identity + encoder dtype + input side: the model part of cache keys."""
        encoder_dtype = next(self.sam.image_encoder.parameters()).dtype
        return f"{self.weights_id}|{encoder_dtype}|{self.sam.image_encoder.img_size}"

    def input_size(self, frame_size: tuple[int, int]) -> tuple[int, int]:
        """(h, w) of the frame after ``ResizeLongestSide``, before padding to S x S."""
        return self.transform.get_preprocess_shape(frame_size[0], frame_size[1], self.transform.target_length)

    def _encode(self, images: torch.Tensor) -> torch.Tensor:
        """Run the image encoder. images: uint8 (B, 3, H, W) -> (B, C, h, w) float32."""
        inputs = []
        for image in images:
            resized = self.transform.apply_image(image.permute(1, 2, 0).cpu().numpy())  # (h', w', 3) uint8
            inputs.append(torch.as_tensor(resized).permute(2, 0, 1))
        x = torch.stack(inputs).to(self.device, torch.float32)  # (B, 3, h', w')
        x = self.sam.preprocess(x)  # (B, 3, S, S) normalised, zero-padded
        dtype = next(self.sam.image_encoder.parameters()).dtype
        self.encoder_calls += images.shape[0]
        return self.sam.image_encoder(x.to(dtype)).to(torch.float32)

    @torch.no_grad()
    def embed_images(self, images: torch.Tensor) -> torch.Tensor:
        """SAM image embeddings of a batch of frame images, through the cache when there is one.

        Images not in the cache are encoded in one batched encoder call, then stored.

        Args:
            images: uint8 (B, 3, H, W) frame images (RGB, 0-255).

        Returns:
            (B, C, h, w) float32 embeddings (of the padded S x S input) on SAM's device.
        """
        if images.ndim != 4 or images.shape[1] != 3 or images.dtype != torch.uint8:
            raise ValueError(f"images must be uint8 (B, 3, H, W), got {images.dtype} {tuple(images.shape)}")
        cache = self.embedding_cache
        if cache is None:
            return self._encode(images)
        keys = [cache.key(image, model_id=self.model_id) for image in images]
        found = [cache.load(key) for key in keys]
        todo = [i for i, emb in enumerate(found) if emb is None]
        if todo:
            computed = self._encode(images[todo])
            for i, emb in zip(todo, computed):
                cache.save(keys[i], emb[None])
                found[i] = emb[None]
        return torch.cat([emb.to(self.device) for emb in found])  # (B, C, h, w)

    def _region_maps(self, anomaly_map: torch.Tensor) -> list[torch.Tensor]:
        """``Map_a`` restricted to each connected component of ``S_a`` (8-connectivity).

        Components are ordered by their peak value (highest first) and capped at
        ``cascade.max_regions``. Each returned map is ``Map_a`` on one component and 0 elsewhere,
        so PPG on it sees that region alone as ``S_a``.
        """
        region = (anomaly_map >= self.prompt.threshold).cpu().numpy().astype(np.uint8)
        count, components = cv2.connectedComponents(region, connectivity=8)
        if count <= 1:
            return []
        components_t = torch.from_numpy(components).to(anomaly_map.device)  # (H, W) int32
        peaks = [(float(anomaly_map[components_t == c].max()), c) for c in range(1, count)]
        chosen = [c for _, c in sorted(peaks, key=lambda pc: (-pc[0], pc[1]))[: self.cascade.max_regions]]
        return [torch.where(components_t == c, anomaly_map, torch.zeros_like(anomaly_map)) for c in chosen]

    def _valid_features(self, embedding: torch.Tensor, input_size: tuple[int, int]) -> torch.Tensor:
        """Crop a (C, h, w) embedding to the cells covering the un-padded input (the frame).

        For a square frame this is the whole grid. Otherwise the partially covered last row or
        column is kept (ceil), a misalignment of less than one cell.
        """
        side = self.sam.image_encoder.img_size
        grid_h, grid_w = embedding.shape[-2:]
        valid_h = min(grid_h, math.ceil(input_size[0] * grid_h / side))
        valid_w = min(grid_w, math.ceil(input_size[1] * grid_w / side))
        return embedding[:, :valid_h, :valid_w]

    @torch.no_grad()
    def refine(
        self, image: torch.Tensor, anomaly_map: torch.Tensor, *, embedding: torch.Tensor | None = None
    ) -> RefineOutput:
        """PPG then CPS on one frame image.

        Args:
            image: uint8 (3, H, W) frame image (RGB, 0-255).
            anomaly_map: (H, W) float32 in [0, 1], the CLIP map ``Map_a`` of the same frame.
            embedding: optional precomputed (C, h, w) or (1, C, h, w) embedding of ``image``
                (from :meth:`embed_images`), skipping the encoder and the cache.

        Returns:
            A :class:`RefineOutput`, tensors on ``anomaly_map``'s device.
        """
        if image.ndim != 3 or image.shape[0] != 3 or image.dtype != torch.uint8:
            raise ValueError(f"image must be uint8 (3, H, W), got {image.dtype} {tuple(image.shape)}")
        if anomaly_map.shape != image.shape[1:]:
            raise ValueError(
                f"anomaly_map {tuple(anomaly_map.shape)} must have the image's frame size {tuple(image.shape[1:])}"
            )
        out_device = anomaly_map.device
        frame = (int(image.shape[1]), int(image.shape[2]))
        timings: dict[str, float] = {}

        start = time.perf_counter()
        cache_hit: bool | None = None
        if embedding is None:
            hits = self.embedding_cache.hits if self.embedding_cache is not None else 0
            emb = self.embed_images(image[None])
            if self.embedding_cache is not None:
                cache_hit = self.embedding_cache.hits > hits
        else:
            emb = (embedding if embedding.ndim == 4 else embedding[None]).to(self.device, torch.float32)
        timings["sam_encoder"] = time.perf_counter() - start if embedding is None else 0.0

        input_size = self.input_size(frame)
        features = self._valid_features(emb[0], input_size)  # (C, h_valid, w_valid)
        amap = anomaly_map.to(self.device)

        def decode(point_coords, point_labels, box, mask_input):
            points = self.transform.apply_coords_torch(point_coords, frame)[None]  # (1, N, 2) input px
            boxes = None if box is None else self.transform.apply_boxes_torch(box[None], frame)  # (1, 4)
            masks_in = None if mask_input is None else mask_input[None]  # (1, 1, 4h, 4w)
            sparse, dense = self.sam.prompt_encoder(points=(points, point_labels[None]), boxes=boxes, masks=masks_in)
            low_res, iou = self.sam.mask_decoder(
                image_embeddings=emb,
                image_pe=self.sam.prompt_encoder.get_dense_pe(),
                sparse_prompt_embeddings=sparse,
                dense_prompt_embeddings=dense,
                multimask_output=self.cascade.multimask,
            )  # (1, M, 4h, 4w), (1, M)
            best = int(iou[0].argmax()) if self.cascade.multimask else 0
            low_res = low_res[:, best : best + 1]  # (1, 1, 4h, 4w)
            logits = self.sam.postprocess_masks(low_res, input_size, frame)  # (1, 1, H, W)
            return logits[0, 0], low_res[0], iou[0, best]

        def cascade(region_map: torch.Tensor) -> tuple[CascadeResult, torch.Tensor, torch.Tensor]:
            start = time.perf_counter()
            coords, labels = generate_point_prompts(region_map, features, **self.prompt.kwargs())
            timings["ppg"] = timings.get("ppg", 0.0) + time.perf_counter() - start
            result = run_cascade(
                decode,
                point_coords=coords,
                point_labels=labels,
                num_steps=self.cascade.num_steps,
                mask_threshold=self.cascade.mask_threshold,
                frame_size=frame,
            )
            return result, coords, labels

        if self.cascade.per_region:
            results = [cascade(region_map) for region_map in self._region_maps(amap)]
        else:
            results = [cascade(amap)]
        if not results:  # per_region with an empty S_a: one (empty) cascade defines the output
            results = [cascade(amap)]
        result = results[0][0]
        if len(results) > 1:  # union of the region masks, max of their logits
            result = CascadeResult(
                mask=torch.stack([r.mask for r, _, _ in results]).any(0),
                mask_logits=torch.stack([r.mask_logits for r, _, _ in results]).amax(0),
                steps=[step for r, _, _ in results for step in r.steps],
            )
        coords = torch.cat([c for _, c, _ in results])
        labels = torch.cat([lab for _, _, lab in results])
        steps_per_cascade = max(1, len(results[0][0].steps))
        for i, step in enumerate(result.steps):
            key = f"cascade_step_{i % steps_per_cascade + 1}"
            timings[key] = timings.get(key, 0.0) + step.seconds
        return RefineOutput(
            mask=result.mask.to(out_device),
            mask_probs=torch.sigmoid(result.mask_logits).to(out_device),
            point_coords=coords.to(out_device),
            point_labels=labels.to(out_device),
            steps=result.steps,
            timings=timings,
            cache_hit=cache_hit,
        )
