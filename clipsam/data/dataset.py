"""The torch Dataset over parsed samples; its items follow the Data contract of docs/design.md.

Dimension symbols: H x W frame (``image_size`` x ``image_size``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from clipsam.data.mosaic import Mosaic
from clipsam.data.samples import Sample, read_image, read_mask
from clipsam.errors import DatasetError
from clipsam.inputs import InputSpec, build_inputs

__all__ = ["AnomalyDataset"]


class AnomalyDataset(Dataset):
    """Samples -> frame tensors.

    Each item is a dict:

    - ``image`` float32 (3, H, W): CLIP-normalised frame image;
    - ``mask`` float32 (H, W) in {0, 1}: ground truth; zeros for normal images and for images
      without a mask;
    - ``has_mask`` bool (0-d tensor): False for an anomalous image without a mask, and for every
      image when ``has_labels`` is False;
    - ``label`` int64 (0-d): 0 normal, 1 anomalous, -1 unknown (``has_labels`` False);
    - ``category`` str; ``path`` str (image file);
    - ``index`` int64 (0-d): position in this dataset;
    - ``original_size`` int64 (2,): (height, width) of the file on disk;
    - one key per model input of ``inputs`` (what the method and the refiner declared, e.g.
      ``method_image`` at the method's own size and filter, ``sam_image`` + ``sam_size``), each
      built from the ORIGINAL image by :func:`clipsam.inputs.build_inputs`.

    ``torch.utils.data.default_collate`` batches these (strings become lists of str).

    Args:
        samples: the parsed samples.
        transform: albumentations-style callable, ``transform(image=uint8 (H0,W0,3),
            mask=uint8 (H0,W0)) -> {"image": (3,H,W) float32, "mask": (H,W)}``
            (:func:`clipsam.data.transforms.build_transform`).
        has_labels: False for images to predict on: labels are -1 and masks are not read.
        has_masks: False for image-level-only datasets (HeadCT, BrainMRI, Br35H): no image has
            a ground truth, so ``has_mask`` is False everywhere and pixel metrics are not
            computed (reported as n/a) instead of being computed on the normal images alone.
        mosaic: APRIL-GAN's 2 x 2 mosaic augmentation (:class:`clipsam.data.mosaic.Mosaic`)
            for training; None (default) for none. A mosaic item keeps its ``index`` and
            ``path`` (of the item it replaces); its ``original_size`` is the mosaic's.
        inputs: the model inputs items carry besides the frame (:class:`clipsam.inputs.InputSpec`);
            the datamodule sets them from the pipeline (:meth:`AnomalyDataModule.set_model_inputs`).
        bit_depth: ``data.bit_depth``, the significant bits of images stored with more than 8
            bits (12-bit camera data in 16-bit PNGs: 12); None: the file's
            (:func:`clipsam.data.samples.read_image`).
    """

    def __init__(
        self,
        samples: Sequence[Sample],
        transform: Callable[..., dict[str, Any]],
        *,
        has_labels: bool = True,
        has_masks: bool = True,
        mosaic: Mosaic | None = None,
        inputs: Sequence[InputSpec] = (),
        bit_depth: int | None = None,
    ) -> None:
        self.samples = list(samples)
        self.transform = transform
        self.has_labels = has_labels
        self.has_masks = has_masks
        self.mosaic = mosaic
        self.inputs = list(inputs)
        self.bit_depth = bit_depth

    def set_epoch(self, epoch: int) -> None:
        """Forwarded by the training sampler: the epoch of the mosaic draws."""
        if self.mosaic is not None:
            self.mosaic.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict[str, Any]:
        sample = self.samples[index]
        image = read_image(sample.image_path, bit_depth=self.bit_depth)  # (H0, W0, 3) uint8
        height, width = image.shape[:2]
        has_mask = self.has_labels and self.has_masks and (sample.label == 0 or sample.mask_path is not None)
        mask = np.zeros((height, width), dtype=np.uint8)
        if self.has_labels and sample.mask_path is not None:
            gt = read_mask(sample.mask_path, threshold=sample.mask_threshold)  # (H0, W0) bool
            if gt.shape != (height, width):
                raise DatasetError(
                    f"mask {sample.mask_path} is {gt.shape[1]}x{gt.shape[0]} (WxH) but its image "
                    f"{sample.image_path} is {width}x{height}: fix or remove the pair"
                )
            mask = gt.astype(np.uint8)
        label = sample.label if self.has_labels else -1
        pieces = self.mosaic.draw(index) if self.mosaic is not None and self.has_labels else None
        if pieces is not None:
            image, mask, has_mask, label = self.mosaic.build(pieces)
            has_mask = has_mask and self.has_masks
            height, width = image.shape[:2]
        out = self.transform(image=image, mask=mask)
        frame = out["image"]
        frame_mask = torch.as_tensor(out["mask"]).to(torch.float32)  # (H, W) in {0, 1}
        item = {
            "image": frame.to(torch.float32),
            "mask": frame_mask,
            "has_mask": torch.tensor(has_mask, dtype=torch.bool),
            "label": torch.tensor(label, dtype=torch.int64),
            "category": sample.category,
            "path": str(sample.image_path),
            "index": torch.tensor(index, dtype=torch.int64),
            "original_size": torch.tensor([height, width], dtype=torch.int64),
        }
        if self.inputs:
            item.update(build_inputs(image, self.inputs))
        return item
