"""The frozen SAM of the second stage: building, weights, an embedding cache and the refiner.

- :func:`build_sam` builds ``vit_h`` / ``vit_l`` / ``vit_b`` through segment_anything's own
  registry (``sam_model_registry``) and loads the official checkpoint strictly, or builds the
  ``tiny`` preset (segment_anything's own modeling classes, small sizes, random weights seeded)
  for tests and the demo. Weights resolve as: ``model.sam.checkpoint`` (a local file) ->
  the cache directory -> download (progress bar, sha256 check) -> one :class:`WeightsError`.
- :class:`EmbeddingCache` stores SAM image embeddings on disk, keyed by image content and
  weights, so a second test run with other PPG/CPS settings skips the image encoder.
- :func:`encode_sam_inputs` runs the encoder on a batch of SAM inputs of ORIGINAL images
  (:func:`clipsam.inputs.build_sam_input`), as ``SamPredictor.set_image`` does; every part that
  calls SAM (the ``ppg_cps`` and ``mmr`` refiners, SAA) encodes through it.
- :func:`frame_to_original` / :func:`original_to_input`: prompt geometry between the frame, the
  original image and SAM's input.

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
import warnings
from collections.abc import Mapping
from functools import partial
from pathlib import Path
from typing import Any, Literal

import torch
from segment_anything.build_sam import sam_model_registry
from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer
from torch import nn

from clipsam.errors import ConfigError, WeightsError
from clipsam.io import atomic_torch_save

__all__ = [
    "SAM_CHECKPOINTS",
    "SAM_VARIANTS",
    "EmbeddingCache",
    "SamConfig",
    "decode_mask_tokens",
    "decode_prompts_original",
    "encode_sam_inputs",
    "preprocess_sam_inputs",
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


def preprocess_sam_inputs(sam: Sam, sam_images: torch.Tensor, sam_sizes: torch.Tensor) -> torch.Tensor:
    """``Sam.preprocess`` for a batch, on SAM's device: normalise, zero outside the valid part.

    Args:
        sam: segment_anything ``Sam``.
        sam_images: uint8 (B, 3, S, S), :func:`clipsam.inputs.build_sam_input`.
        sam_sizes: (B, 2) int64 valid (h, w).

    Returns:
        (B, 3, S, S) float32.
    """
    device = sam.pixel_mean.device
    side = int(sam.image_encoder.img_size)
    if sam_images.ndim != 4 or tuple(sam_images.shape[1:]) != (3, side, side) or sam_images.dtype != torch.uint8:
        raise ValueError(
            f"SAM inputs must be uint8 (B, 3, {side}, {side}) (clipsam.inputs.build_sam_input of the original "
            f"image at SAM's side {side}), got {sam_images.dtype} {tuple(sam_images.shape)}"
        )
    x = sam_images.to(device, non_blocking=True).to(torch.float32)
    x = (x - sam.pixel_mean) / sam.pixel_std
    sizes = sam_sizes.to(device, non_blocking=True)
    pos = torch.arange(side, device=device)
    valid = (pos[None, :, None] < sizes[:, 0, None, None]) & (pos[None, None, :] < sizes[:, 1, None, None])
    return x * valid[:, None].to(x.dtype)


@torch.no_grad()
def encode_sam_inputs(sam: Sam, sam_images: torch.Tensor, sam_sizes: torch.Tensor, *, encoder: Any = None) -> torch.Tensor:
    """SAM image embeddings of a batch of SAM inputs (``SamPredictor.set_image``, batched).

    Args:
        sam: segment_anything ``Sam``.
        sam_images: uint8 (B, 3, S, S); sam_sizes: (B, 2) valid (h, w).
        encoder: the callable running ``sam.image_encoder`` (a compiled one); default the encoder.

    Returns:
        (B, C, h, w) float32 on SAM's device.
    """
    dtype = next(sam.image_encoder.parameters()).dtype
    run = encoder if encoder is not None else sam.image_encoder
    return run(preprocess_sam_inputs(sam, sam_images, sam_sizes).to(dtype)).to(torch.float32)


@torch.no_grad()
def decode_prompts_original(
    sam: Sam,
    embedding: torch.Tensor,
    *,
    input_size: tuple[int, int],
    original_size: tuple[int, int],
    output_size: tuple[int, int],
    points: torch.Tensor | None = None,
    boxes: torch.Tensor | None = None,
    multimask_output: bool = True,
) -> torch.Tensor:
    """One batched decoder call for R prompt sets on one encoded ORIGINAL image (``predict_torch``).

    Prompts are in original-image pixels and go to SAM's input with ``apply_coords``' arithmetic
    (:func:`original_to_input`); the masks come back with ``Sam.postprocess_masks`` (S x S ->
    crop to the valid h' x w' -> ``output_size``, e.g. the evaluation frame).

    Args:
        sam: segment_anything ``Sam``.
        embedding: (1, C, h, w) float32, :func:`encode_sam_inputs` of the image.
        input_size: (h', w'), the valid part of SAM's input (``sam_size``).
        original_size: (H0, W0) of the original image.
        output_size: (H, W) of the returned masks.
        points: (R, K, 2) float32 (x, y) original pixels, all positive; or None.
        boxes: (R, 4) float32 XYXY original pixels; or None. At least one of the two.
        multimask_output: SAM's 3-mask output.

    Returns:
        (R, M, H, W) float32 mask probabilities (sigmoid of SAM's logits), M = 3 with
        ``multimask_output`` else 1.
    """
    if points is None and boxes is None:
        raise ValueError("decode_prompts_original needs points, boxes or both")
    device = embedding.device
    rows = int(points.shape[0] if points is not None else boxes.shape[0])  # type: ignore[union-attr]
    originals = torch.tensor([list(original_size)] * rows, dtype=torch.int64)
    inputs = torch.tensor([list(input_size)] * rows, dtype=torch.int64)
    point_input = None
    if points is not None:
        coords = original_to_input(points.to(device, torch.float32), originals, inputs)  # (R, K, 2)
        point_input = (coords, torch.ones(coords.shape[:2], dtype=torch.int64, device=device))
    box_input = None
    if boxes is not None:
        corners = original_to_input(boxes.to(device, torch.float32).reshape(-1, 2, 2), originals, inputs)
        box_input = corners.reshape(-1, 4)
    sparse, dense = sam.prompt_encoder(points=point_input, boxes=box_input, masks=None)
    low_res, _ = sam.mask_decoder(
        image_embeddings=embedding,
        image_pe=sam.prompt_encoder.get_dense_pe(),
        sparse_prompt_embeddings=sparse,
        dense_prompt_embeddings=dense,
        multimask_output=multimask_output,
    )  # (R, M, 4h, 4w)
    logits = sam.postprocess_masks(low_res, tuple(input_size), tuple(output_size))  # (R, M, H, W)
    return torch.sigmoid(logits)


def decode_mask_tokens(sam: Sam, embeddings: torch.Tensor, sparse: torch.Tensor, dense: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """SAM's mask decoder for R prompt sets, row r's prompts on row r's embedding, every mask token.

    ``MaskDecoder.predict_masks`` runs all prompt sets on ONE image embedding; here row r's
    prompts meet row r's embedding (same sub-modules, same weights, same order of operations).

    Args:
        sam: segment_anything ``Sam``.
        embeddings: (R, C, h, w); sparse: (R, T, C) prompt tokens; dense: (R or 1, C, h, w)
            (the prompt encoder's outputs).

    Returns:
        (R, M, 4h, 4w) low-res logits and (R, M) predicted IoU of all M mask tokens (mask 0: the
        single-mask output; 1..3: the multimask candidates).
    """
    encoder, decoder = sam.prompt_encoder, sam.mask_decoder
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
    masks = (hyper @ upscaled.reshape(b, c, h * w)).reshape(b, -1, h, w)
    return masks, decoder.iou_prediction_head(iou_out)
