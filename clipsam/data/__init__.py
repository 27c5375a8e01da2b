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

# Lazy: importing one module of this package (e.g. the torch-free image reader of
# clipsam.data.samples, which clipsam.runtime uses) does not import the others (torch, albumentations).
_EXPORTS: dict[str, str] = {
    "AnomalyDataModule": "clipsam.data.datamodule",
    "DatasetSpec": "clipsam.data.datamodule",
    "AnomalyDataset": "clipsam.data.dataset",
    "detect_layout": "clipsam.data.download",
    "download_dataset": "clipsam.data.download",
    "list_images": "clipsam.data.folder",
    "parse_folder": "clipsam.data.folder",
    "FORMATS": "clipsam.data.formats",
    "DatasetFormat": "clipsam.data.formats",
    "get_format": "clipsam.data.formats",
    "MVTEC_CATEGORIES": "clipsam.data.mvtec",
    "parse_mvtec": "clipsam.data.mvtec",
    "ReferenceConfig": "clipsam.data.references",
    "Sample": "clipsam.data.samples",
    "read_image": "clipsam.data.samples",
    "read_mask": "clipsam.data.samples",
    "validate_samples": "clipsam.data.samples",
    "DEFECT_TYPES": "clipsam.data.synthetic",
    "SYNTH_CATEGORIES": "clipsam.data.synthetic",
    "SynthSource": "clipsam.data.synthetic",
    "generate_formats": "clipsam.data.synthetic",
    "generate_synthetic": "clipsam.data.synthetic",
    "render_sample": "clipsam.data.synthetic",
    "CLIP_MEAN": "clipsam.data.transforms",
    "CLIP_STD": "clipsam.data.transforms",
    "AugmentConfig": "clipsam.data.transforms",
    "build_transform": "clipsam.data.transforms",
    "denormalize": "clipsam.data.transforms",
    "VISA_CATEGORIES": "clipsam.data.visa",
    "parse_visa": "clipsam.data.visa",
}


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'clipsam.data' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(module), name)


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
