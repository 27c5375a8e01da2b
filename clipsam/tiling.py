"""Tiled inference for large images: split into frame-sized tiles, run both stages, stitch back.

Every image is normally squashed to the square frame (``data.image_size``), so an 8000 x 6000
image with a 30-pixel defect becomes 518 x 518 and the defect a few pixels. With
``data.tiling`` set, images are resized to a larger *canvas* (``data.tiling.image_size``) that
is cut into tiles of the frame size with ``overlap`` pixels of overlap (the last tile in each
direction is moved flush with the border, as anomalib's tiler); CLIP and SAM run on every tile
(in one batch), and the tile maps are stitched back onto the canvas:

* scores and anomaly maps: the mean of the tiles covering a pixel;
* masks: the union (a pixel is in the mask when any covering tile's mask has it).

Image scores are then computed from the stitched maps by the configured reduction, so a tiled
run reports and thresholds exactly like an untiled one, at canvas resolution.

Dimension symbols: B batch, T tiles per image, F the frame (tile) side, Hc x Wc the canvas.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch

from clipsam.errors import ConfigError

__all__ = ["TilingConfig", "split_tiles", "stitch_tiles", "tile_starts"]


@dataclasses.dataclass
class TilingConfig:
    """Config key ``data.tiling`` (linked to ``model.tiling``).

    Attributes:
        image_size: canvas (height, width) images are resized to before tiling, each at least
            the frame (``data.image_size``); e.g. [1036, 1036] for 2 x 2 tiles of 518. A single
            int means a square canvas. None disables tiling (the default).
        overlap: pixels shared by neighbouring tiles, in [0, frame).
    """

    image_size: list[int] | int | None = None
    overlap: int = 0

    def canvas(self) -> tuple[int, int] | None:
        """(Hc, Wc), or None when tiling is off."""
        if self.image_size is None:
            return None
        size = self.image_size
        if isinstance(size, int):
            return (size, size)
        if len(size) != 2:
            raise ConfigError(f"data.tiling.image_size must be an int or [height, width], got {size}")
        return (int(size[0]), int(size[1]))

    def check(self, frame: int) -> None:
        """Raise ConfigError unless the canvas and overlap fit the frame size."""
        canvas = self.canvas()
        if canvas is None:
            return
        if min(canvas) < frame:
            raise ConfigError(f"data.tiling.image_size={list(canvas)} is smaller than the frame data.image_size={frame}: use at least the frame")
        if not 0 <= int(self.overlap) < frame:
            raise ConfigError(f"data.tiling.overlap={self.overlap} must be in [0, data.image_size={frame})")


def tile_starts(length: int, tile: int, overlap: int) -> list[int]:
    """Start offsets of tiles of side ``tile`` covering ``[0, length)``.

    Tiles step by ``tile - overlap``; the last one is moved flush with the end, so every tile
    lies inside and together they cover everything (neighbours overlap by at least ``overlap``).

    Raises:
        ValueError: ``tile > length``, or ``overlap`` not in [0, tile).
    """
    if tile > length:
        raise ValueError(f"tile {tile} is larger than the image side {length}")
    if not 0 <= overlap < tile:
        raise ValueError(f"overlap {overlap} must be in [0, {tile})")
    stride = tile - overlap
    starts = list(range(0, length - tile + 1, stride))
    if starts[-1] + tile < length:
        starts.append(length - tile)
    return starts


def split_tiles(images: torch.Tensor, tile: int, overlap: int) -> tuple[torch.Tensor, list[tuple[int, int]]]:
    """Cut (B, C, Hc, Wc) images into (B * T, C, tile, tile) tiles, image-major, row-major.

    Returns:
        ``(tiles, positions)`` with ``positions`` the T (top, left) offsets of one image's tiles.
    """
    _, _, height, width = images.shape
    positions = [(y, x) for y in tile_starts(height, tile, overlap) for x in tile_starts(width, tile, overlap)]
    tiles = torch.stack([images[:, :, y : y + tile, x : x + tile] for y, x in positions], dim=1)  # (B, T, C, F, F)
    return tiles.flatten(0, 1), positions


def stitch_tiles(
    tiles: torch.Tensor, positions: Sequence[tuple[int, int]], size_hw: tuple[int, int], *, reduce: str = "mean"
) -> torch.Tensor:
    """Put (B * T, F, F) tile maps back onto (B, Hc, Wc) canvases.

    Args:
        tiles: tile maps in :func:`split_tiles` order (float, or bool for ``reduce="any"``).
        positions: the (top, left) of each of the T tiles of one image.
        size_hw: (Hc, Wc).
        reduce: ``"mean"`` (average of the covering tiles) or ``"any"`` (union of bool masks).

    Returns:
        (B, Hc, Wc) float32 for "mean", bool for "any".
    """
    num = len(positions)
    if tiles.shape[0] % num:
        raise ValueError(f"{tiles.shape[0]} tiles is not a multiple of {num} tiles per image")
    batch, side_h, side_w = tiles.shape[0] // num, tiles.shape[-2], tiles.shape[-1]
    per_image = tiles.reshape(batch, num, side_h, side_w)
    height, width = size_hw
    if reduce == "any":
        out = torch.zeros(batch, height, width, dtype=torch.bool, device=tiles.device)
        for t, (y, x) in enumerate(positions):
            out[:, y : y + side_h, x : x + side_w] |= per_image[:, t].bool()
        return out
    if reduce != "mean":
        raise ValueError(f"reduce must be 'mean' or 'any', got {reduce!r}")
    total = torch.zeros(batch, height, width, dtype=torch.float32, device=tiles.device)
    count = torch.zeros(height, width, dtype=torch.float32, device=tiles.device)
    for t, (y, x) in enumerate(positions):
        total[:, y : y + side_h, x : x + side_w] += per_image[:, t].float()
        count[y : y + side_h, x : x + side_w] += 1
    return total / count
