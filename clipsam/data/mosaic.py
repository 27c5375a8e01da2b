"""APRIL-GAN's 2 x 2 mosaic augmentation (config key ``data.train.mosaic_rate``).

APRIL-GAN's ``MVTecDataset`` (dataset.py, ``aug_rate``, 0.2 when training on MVTec-AD) replaces
a training item, with probability ``aug_rate``, by a mosaic of four images of the item's
category: each piece is drawn by picking a defect type of the category uniformly (``good``
included), then an image of that type uniformly; the pieces are pasted in reading order (top
left, top right, bottom left, bottom right) at the first piece's size, with their masks (zeros
for normal pieces); the mosaic then goes through the usual resize to the frame. The drawn
pieces are independent of the item itself.

Here every draw comes from a generator seeded with ``(seed, epoch, index)``, so a run is
reproducible whatever the worker count. The epoch reaches the dataset through
:meth:`Mosaic.set_epoch`, which :class:`clipsam.data.datamodule.EpochSeededRandomSampler`
calls each epoch; it is held in a shared-memory tensor, so dataloader workers (persistent or
not) see it. Under DDP (Lightning's ``DistributedSampler``) the epoch is not forwarded and
every epoch draws the same mosaics for an index. A piece of another size than the first is resized to it (bicubic; masks bilinear
then > 0.5), a case APRIL-GAN never meets (MVTec-AD images of one category share one size).

Dimension symbols: H x W the first piece's size; the mosaic is 2H x 2W.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Sequence

import numpy as np
import torch
from PIL import Image

from clipsam.data.samples import Sample, read_image, read_mask
from clipsam.errors import ConfigError, DatasetError

__all__ = ["Mosaic", "mosaic_2x2"]


def mosaic_2x2(images: Sequence[np.ndarray], masks: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Paste four images and their masks into a 2 x 2 mosaic, in reading order.

    Args:
        images: 4 uint8 (H_i, W_i, 3) RGB images; the first fixes the piece size H x W, the
            others are resized to it if they differ (PIL bicubic).
        masks: 4 masks (H_i, W_i), bool or uint8 {0, 1}, aligned with the images (resized
            bilinearly as 0/255, then > 0.5, when the piece is resized).

    Returns:
        ``(image, mask)``: uint8 (2H, 2W, 3) and uint8 (2H, 2W) in {0, 1}; piece ``i`` occupies
        rows ``(i // 2) * H ...`` and columns ``(i % 2) * W ...``.
    """
    if len(images) != 4 or len(masks) != 4:
        raise ValueError(f"a 2 x 2 mosaic needs 4 images and 4 masks, got {len(images)} and {len(masks)}")
    height, width = images[0].shape[:2]
    out_image = np.zeros((2 * height, 2 * width, 3), dtype=np.uint8)
    out_mask = np.zeros((2 * height, 2 * width), dtype=np.uint8)
    for i, (image, mask) in enumerate(zip(images, masks)):
        if image.shape[:2] != mask.shape[:2]:
            raise ValueError(f"piece {i}: image {image.shape[:2]} and mask {mask.shape[:2]} differ in size")
        binary = (np.asarray(mask) > 0).astype(np.uint8)
        if image.shape[:2] != (height, width):
            image = np.asarray(Image.fromarray(image).resize((width, height), Image.Resampling.BICUBIC))
            resized = Image.fromarray(binary * 255, mode="L").resize((width, height), Image.Resampling.BILINEAR)
            binary = (np.asarray(resized) > 127).astype(np.uint8)
        row, col = divmod(i, 2)
        out_image[row * height : (row + 1) * height, col * width : (col + 1) * width] = image
        out_mask[row * height : (row + 1) * height, col * width : (col + 1) * width] = binary
    return out_image, out_mask


class Mosaic:
    """Decides, per (epoch, index), whether an item becomes a mosaic, and builds it.

    Args:
        samples: The training samples (the dataset's list; pieces are drawn among the samples
            of the item's category).
        rate: Probability of a mosaic per item, in [0, 1] (APRIL-GAN on MVTec-AD: 0.2).
        seed: Seed of the draws.
        image_reader: Decodes an image file to uint8 (H, W, 3) RGB.
        mask_reader: Decodes a mask file to (H, W) bool.
    """

    def __init__(
        self,
        samples: Sequence[Sample],
        rate: float,
        *,
        seed: int = 0,
        image_reader: Callable[..., np.ndarray] = read_image,
        mask_reader: Callable[..., np.ndarray] = read_mask,
    ) -> None:
        if not 0.0 <= rate <= 1.0:
            raise ConfigError(f"data.train.mosaic_rate={rate} must be in [0, 1] (APRIL-GAN on MVTec-AD: 0.2)")
        self.samples = list(samples)
        self.rate = float(rate)
        self.seed = int(seed)
        self._epoch = torch.zeros((), dtype=torch.int64).share_memory_()  # seen by workers
        self.image_reader = image_reader
        self.mask_reader = mask_reader
        # category -> defect type -> sample indices (sorted, so draws do not depend on order)
        groups: dict[str, dict[str, list[int]]] = defaultdict(lambda: defaultdict(list))
        for i, sample in enumerate(self.samples):
            groups[sample.category][sample.defect_type].append(i)
        self._groups = {c: {d: v for d, v in sorted(t.items())} for c, t in groups.items()}

    @property
    def epoch(self) -> int:
        """The epoch of the coming draws."""
        return int(self._epoch)

    def set_epoch(self, epoch: int) -> None:
        """Set the epoch of the coming draws (called by the training sampler each epoch)."""
        self._epoch.fill_(int(epoch))

    def draw(self, index: int) -> list[int] | None:
        """The sample indices of item ``index``'s mosaic this epoch, or None for no mosaic."""
        if self.rate <= 0.0:
            return None
        rng = np.random.default_rng([self.seed, self.epoch, int(index)])
        if rng.random() >= self.rate:
            return None
        types = self._groups[self.samples[index].category]
        names = list(types)
        picked = []
        for _ in range(4):
            members = types[names[int(rng.integers(len(names)))]]
            picked.append(members[int(rng.integers(len(members)))])
        return picked

    def build(self, indices: Sequence[int]) -> tuple[np.ndarray, np.ndarray, bool, int]:
        """Read the four pieces and paste them.

        Returns:
            ``(image, mask, has_mask, label)``: uint8 (2H, 2W, 3), uint8 (2H, 2W) in {0, 1},
            False when an anomalous piece has no mask file, and 1 when any piece is anomalous.
        """
        images, masks, has_mask, label = [], [], True, 0
        for i in indices:
            sample = self.samples[i]
            image = self.image_reader(sample.image_path)
            mask = np.zeros(image.shape[:2], dtype=np.uint8)
            if sample.mask_path is not None:
                gt = self.mask_reader(sample.mask_path)
                if gt.shape != image.shape[:2]:
                    raise DatasetError(
                        f"mask {sample.mask_path} is {gt.shape[1]}x{gt.shape[0]} (WxH) but its image "
                        f"{sample.image_path} is {image.shape[1]}x{image.shape[0]}: fix or remove the pair"
                    )
                mask = gt.astype(np.uint8)
            elif sample.label == 1:
                has_mask = False
            label = max(label, int(sample.label == 1))
            images.append(image)
            masks.append(mask)
        image, mask = mosaic_2x2(images, masks)
        return image, mask, has_mask, label
