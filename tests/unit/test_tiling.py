"""Tiled inference helpers (clipsam.tiling): hand-worked tile layouts and stitching."""

from __future__ import annotations

import pytest
import torch

from clipsam.errors import ConfigError
from clipsam.tiling import TilingConfig, split_tiles, stitch_tiles, tile_starts


def test_tile_starts_hand_cases() -> None:
    assert tile_starts(128, 64, 0) == [0, 64]
    assert tile_starts(100, 64, 0) == [0, 36]  # last tile flush with the border
    assert tile_starts(160, 64, 16) == [0, 48, 96]  # stride 48; 96 + 64 = 160 exactly
    assert tile_starts(170, 64, 16) == [0, 48, 96, 106]
    assert tile_starts(64, 64, 10) == [0]
    with pytest.raises(ValueError):
        tile_starts(50, 64, 0)
    with pytest.raises(ValueError):
        tile_starts(128, 64, 64)


def test_split_then_stitch_is_identity_and_overlaps_average() -> None:
    images = torch.arange(2 * 1 * 6 * 8, dtype=torch.float32).reshape(2, 1, 6, 8)
    tiles, positions = split_tiles(images, 4, 2)
    assert positions == [(0, 0), (0, 2), (0, 4), (2, 0), (2, 2), (2, 4)]
    assert tiles.shape == (12, 1, 4, 4)
    assert torch.equal(tiles[7, 0], images[1, 0, 0:4, 2:6])  # image 1, tile 1
    assert torch.equal(stitch_tiles(tiles[:, 0], positions, (6, 8)), images[:, 0])
    # constant tiles 0, 1, 2, ...: a pixel covered by tiles 0 and 1 gets 0.5
    values = torch.arange(6, dtype=torch.float32).view(6, 1, 1).expand(6, 4, 4)
    stitched = stitch_tiles(values, positions, (6, 8))[0]
    assert stitched[0, 0] == 0 and stitched[0, 2] == 0.5 and stitched[0, 3] == 0.5
    assert stitched[2, 2] == pytest.approx((0 + 1 + 3 + 4) / 4)
    assert stitched[5, 7] == 5


def test_stitched_masks_are_the_union() -> None:
    positions = [(0, 0), (0, 2)]
    masks = torch.zeros(2, 4, 4, dtype=torch.bool)
    masks[0, 1, 3] = True  # overlap column 3, only tile 0 sees it
    masks[1, 0, 3] = True  # tile 1's column 1 = canvas column 3
    out = stitch_tiles(masks, positions, (4, 6), reduce="any")
    assert out.dtype == torch.bool and out.shape == (1, 4, 6)
    assert out[0, 1, 3] and out[0, 0, 5] and int(out.sum()) == 2


def test_tiling_config_checks() -> None:
    assert TilingConfig().canvas() is None
    assert TilingConfig(image_size=128).canvas() == (128, 128)
    with pytest.raises(ConfigError, match="data.tiling.image_size"):
        TilingConfig(image_size=[32, 128]).check(64)
    with pytest.raises(ConfigError, match="data.tiling.overlap"):
        TilingConfig(image_size=[128, 128], overlap=64).check(64)
