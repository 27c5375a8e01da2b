"""Datasets: parsing and validation, transforms, the DataModule, synthetic data and downloads.

- :mod:`~clipsam.data.samples`: :class:`Sample`, the image/mask readers :func:`read_image` and
  :func:`read_mask` (public: every clipsam path reads images through them), :func:`validate_samples`;
- :mod:`~clipsam.data.mvtec`, :mod:`~clipsam.data.visa`, :mod:`~clipsam.data.folder`: parsers;
- :mod:`~clipsam.data.formats`: the format registry (``FORMATS``), one module per dataset family;
- :mod:`~clipsam.data.transforms`: resize to the frame + CLIP normalisation, :func:`denormalize`;
- :mod:`~clipsam.data.dataset`: :class:`AnomalyDataset` (the Data contract of docs/design.md);
- :mod:`~clipsam.data.datamodule`: :class:`AnomalyDataModule`, :class:`DatasetSpec`;
- :mod:`~clipsam.data.references`: :class:`ReferenceConfig` (``data.reference``), how a few-shot
  method's reference images are drawn;
- :mod:`~clipsam.data.synthetic`: :func:`render_sample`, :func:`generate_synthetic`;
- :mod:`~clipsam.data.download`: :func:`download_dataset`, :func:`detect_layout`.
"""

from clipsam.data.datamodule import AnomalyDataModule, DatasetSpec
from clipsam.data.dataset import AnomalyDataset
from clipsam.data.download import detect_layout, download_dataset
from clipsam.data.folder import list_images, parse_folder
from clipsam.data.formats import FORMATS, DatasetFormat, get_format
from clipsam.data.mvtec import MVTEC_CATEGORIES, parse_mvtec
from clipsam.data.references import ReferenceConfig
from clipsam.data.samples import Sample, read_image, read_mask, validate_samples
from clipsam.data.synthetic import (
    DEFECT_TYPES,
    SYNTH_CATEGORIES,
    SynthSource,
    generate_formats,
    generate_synthetic,
    render_sample,
)
from clipsam.data.transforms import (
    CLIP_MEAN,
    CLIP_STD,
    AugmentConfig,
    build_transform,
    denormalize,
)
from clipsam.data.visa import VISA_CATEGORIES, parse_visa

__all__ = [
    "CLIP_MEAN",
    "CLIP_STD",
    "DEFECT_TYPES",
    "FORMATS",
    "MVTEC_CATEGORIES",
    "SYNTH_CATEGORIES",
    "VISA_CATEGORIES",
    "AnomalyDataModule",
    "AnomalyDataset",
    "AugmentConfig",
    "DatasetFormat",
    "DatasetSpec",
    "ReferenceConfig",
    "Sample",
    "SynthSource",
    "build_transform",
    "denormalize",
    "detect_layout",
    "download_dataset",
    "generate_formats",
    "generate_synthetic",
    "get_format",
    "list_images",
    "parse_folder",
    "parse_mvtec",
    "parse_visa",
    "read_image",
    "read_mask",
    "render_sample",
    "validate_samples",
]
