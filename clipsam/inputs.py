"""Model inputs from the decoded ORIGINAL image: the one place every model input is built.

Each method and refiner declares what it reads (an :class:`InputSpec`: size, resize filter and
antialiasing, normalisation); :func:`build_inputs` makes every declared input from the uint8
original, the way the method's reference code makes it, never from another input. The dataset
(test/predict items), :class:`clipsam.Segmenter`, ``clipsam export`` and tiled inference all
call it.

Resizes (``InputSpec.resize``):

- ``"pil_bicubic"``: PIL's bicubic resize of the uint8 image (antialiased; what torchvision's
  ``Resize`` does on a PIL image), squashed to size x size. APRIL-GAN's, AnomalyCLIP's and the
  SDP fork's preprocessing.
- ``"torch_bicubic"``: the image as float in [0, 1], then ``F.interpolate(mode="bicubic",
  antialias=True)`` to size x size, no clamping. What torchvision's v2 ``Resize`` does on a
  float tensor (anomalib's WinCLIP pre-processor).
- ``"sam"``: SAM's input, as ``SamPredictor.set_image`` builds it: the long side resized to
  ``size`` with segment_anything's ``ResizeLongestSide`` (aspect kept), zero-padded at the
  bottom and right to size x size, uint8 (normalisation happens on the device, batched). It
  comes with ``<size_key>`` = (h, w) of the valid part.

Normalisations (``InputSpec.normalize``): ``"clip"`` (OpenAI CLIP mean/std on [0, 1] pixels,
float32) or ``"none"`` (uint8 kept).

Dimension symbols: H0 x W0 the original image, S an input's side.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence
from typing import Literal

import numpy as np
import torch

from clipsam.errors import ConfigError

__all__ = [
    "CLIP_MEAN",
    "CLIP_STD",
    "RESIZES",
    "InputSpec",
    "build_input",
    "build_inputs",
    "build_sam_input",
    "collect_specs",
    "normalize_clip",
    "sam_input_size",
    "sam_input_spec",
]

#: open_clip's OPENAI_DATASET_MEAN / OPENAI_DATASET_STD (RGB, for pixel values in [0, 1]).
CLIP_MEAN: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)

RESIZES: tuple[str, ...] = ("pil_bicubic", "torch_bicubic", "sam")


@dataclasses.dataclass(frozen=True)
class InputSpec:
    """One model input, built from the original image.

    Attributes:
        key: the batch key the input is stored under (``"method_image"``, ``"sam_image"``).
        size: the square side S.
        resize: ``"pil_bicubic"``, ``"torch_bicubic"`` or ``"sam"`` (see the module doc).
        normalize: ``"clip"`` or ``"none"``.
        size_key: for ``resize="sam"``: the key of the valid (h, w) part (``"sam_size"``).
    """

    key: str
    size: int
    resize: Literal["pil_bicubic", "torch_bicubic", "sam"] = "pil_bicubic"
    normalize: Literal["clip", "none"] = "clip"
    size_key: str | None = None

    def __post_init__(self) -> None:
        if self.resize not in RESIZES:
            raise ConfigError(f"input {self.key!r}: resize={self.resize!r} is not one of {', '.join(RESIZES)}")
        if self.normalize not in ("clip", "none"):
            raise ConfigError(f"input {self.key!r}: normalize={self.normalize!r} is not 'clip' or 'none'")
        if int(self.size) < 1:
            raise ConfigError(f"input {self.key!r}: size={self.size} must be positive")
        if self.key in ("image", "mask"):
            raise ConfigError(f"input key {self.key!r} is reserved for the evaluation frame")


def sam_input_spec(side: int) -> InputSpec:
    """SAM's input of the original image (``sam_image`` uint8 + ``sam_size``), side S."""
    return InputSpec(key="sam_image", size=int(side), resize="sam", normalize="none", size_key="sam_size")


def collect_specs(groups: Iterable[Sequence[InputSpec]]) -> list[InputSpec]:
    """Join the inputs of a producer and a refiner; one key must mean one input.

    Raises:
        ConfigError: two parts ask for the same key with different settings (e.g. SAA's SAM and
            the refiner's SAM of other input sides).
    """
    out: dict[str, InputSpec] = {}
    for group in groups:
        for spec in group:
            seen = out.get(spec.key)
            if seen is not None and seen != spec:
                raise ConfigError(
                    f"two parts of this pipeline need input {spec.key!r} built differently ({seen} vs {spec}): "
                    "use the same SAM variant for the method and the refiner"
                )
            out[spec.key] = spec
    return list(out.values())


def sam_input_size(height: int, width: int, side: int) -> tuple[int, int]:
    """(h, w) of an image whose long side is resized to ``side``, aspect kept.

    The rounding of segment_anything's ``ResizeLongestSide.get_preprocess_shape`` (what
    ``SamPredictor.set_image`` uses): ``int(x * side / max(height, width) + 0.5)``.
    """
    scale = side * 1.0 / max(height, width)
    return int(height * scale + 0.5), int(width * scale + 0.5)


def _check_image(image: np.ndarray) -> None:
    if not isinstance(image, np.ndarray) or image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        shape = getattr(image, "shape", None)
        raise ValueError(f"image must be a uint8 (H, W, 3) RGB array, got {getattr(image, 'dtype', type(image))} {shape}")


def build_sam_input(image: np.ndarray, side: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The original image as SAM's image encoder sees it, before normalisation.

    Exactly what ``SamPredictor.set_image`` feeds its encoder, up to the normalisation: the
    long side resized to ``side`` with the aspect kept (``ResizeLongestSide.apply_image``: PIL
    bilinear, antialiased), then zero-padded at the bottom and right to ``side`` x ``side``.

    Args:
        image: uint8 (H0, W0, 3) RGB, the original image.
        side: SAM's input side ``image_encoder.img_size`` (1024; 256 for the tiny preset).

    Returns:
        ``(sam_image, sam_size)``: uint8 (3, side, side), zero outside the valid part, and int64
        (2,) = (h, w) of the valid part.
    """
    from segment_anything.utils.transforms import ResizeLongestSide

    _check_image(image)
    resized = ResizeLongestSide(side).apply_image(image)  # (h, w, 3) uint8
    height, width = resized.shape[:2]
    out = torch.zeros((3, side, side), dtype=torch.uint8)
    out[:, :height, :width] = torch.from_numpy(np.ascontiguousarray(resized)).permute(2, 0, 1)
    return out, torch.tensor([height, width], dtype=torch.int64)


def normalize_clip(pixels: torch.Tensor) -> torch.Tensor:
    """(3, H, W) float pixels in [0, 1] -> CLIP-normalised float32."""
    mean = torch.tensor(CLIP_MEAN, dtype=torch.float32).view(3, 1, 1)
    std = torch.tensor(CLIP_STD, dtype=torch.float32).view(3, 1, 1)
    return (pixels.to(torch.float32) - mean) / std


def build_input(image: np.ndarray, spec: InputSpec) -> dict[str, torch.Tensor]:
    """One input of ``spec`` from the uint8 (H0, W0, 3) RGB original.

    Returns:
        ``{spec.key: tensor}`` (float32 (3, S, S) when normalised, uint8 otherwise), plus
        ``{spec.size_key: (2,) int64}`` for SAM inputs.
    """
    _check_image(image)
    side = int(spec.size)
    if spec.resize == "sam":
        sam_image, sam_size = build_sam_input(image, side)
        out = {spec.key: sam_image if spec.normalize == "none" else normalize_clip(sam_image.float() / 255.0)}
        out[spec.size_key or f"{spec.key}_size"] = sam_size
        return out
    if spec.resize == "pil_bicubic":
        from PIL import Image

        resized = image
        if image.shape[:2] != (side, side):
            resized = np.asarray(Image.fromarray(image).resize((side, side), Image.Resampling.BICUBIC))
        chw = torch.from_numpy(np.ascontiguousarray(resized)).permute(2, 0, 1)  # uint8 (3, S, S)
        if spec.normalize == "none":
            return {spec.key: chw}
        return {spec.key: normalize_clip(chw.float() / 255.0)}
    # torch_bicubic: float in [0, 1], antialiased bicubic, no clamping (torchvision v2 on tensors)
    pixels = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).to(torch.float32) / 255.0
    if tuple(pixels.shape[-2:]) != (side, side):
        pixels = torch.nn.functional.interpolate(
            pixels[None], size=(side, side), mode="bicubic", align_corners=False, antialias=True
        )[0]
    if spec.normalize == "none":
        return {spec.key: (pixels * 255.0).round().clamp(0, 255).to(torch.uint8)}
    return {spec.key: normalize_clip(pixels)}


def build_inputs(image: np.ndarray, specs: Sequence[InputSpec]) -> dict[str, torch.Tensor]:
    """Every input of ``specs`` from the same uint8 original (see :func:`build_input`)."""
    out: dict[str, torch.Tensor] = {}
    for spec in specs:
        out.update(build_input(image, spec))
    return out
