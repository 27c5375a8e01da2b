"""The LightningDataModule of the cross-dataset protocol: fit reads one dataset, test another.

One config serves zero-shot evaluation::

    data:
      train: {format: mvtec, root: ${oc.env:MVTEC_ROOT,data/mvtec}}     # fit: auxiliary dataset
      test:  {format: visa,  root: ${oc.env:VISA_ROOT,data/visa}}       # test/validate: target
      image_size: 518

As in the paper, the fit stage trains on the auxiliary dataset's TEST split (only it has anomalies
and masks), so :class:`DatasetSpec` defaults to ``split="test"`` for both stages. ``predict``
reads a plain folder of the user's images (``predict_dir``).

Every stage parses and validates its dataset in ``setup`` (:func:`clipsam.data.samples.
validate_samples`), so a broken layout fails before the first step with one message naming the
file. During ``fit`` the test dataset is not read: no validation on the zero-shot target.

A few-shot method (one whose module declares ``reference_count(config) > 0``) also gets k good
reference images per test category, drawn by ``data.reference`` (:mod:`clipsam.data.references`;
:meth:`AnomalyDataModule.reference_files`).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader, RandomSampler, default_collate

# Imported here, not lazily: Lightning re-instantiates a BatchSampler subclass under DDP only
# when the class exists while the *_dataloader hook runs (it patches the subclasses' __init__).
from clipsam.data.category_batches import CategoryBatchSampler, CategoryShardDataset
from clipsam.data.dataset import AnomalyDataset
from clipsam.data.folder import list_images
from clipsam.data.formats import get_format
from clipsam.data.mosaic import Mosaic
from clipsam.data.references import (
    TRAIN_SOURCE,
    ReferenceConfig,
    draw_references,
    folder_pool,
)
from clipsam.data.samples import (
    Sample,
    ValidationMode,
    check_bit_depth,
    check_color_order,
    is_image_file,
    read_image,
    set_image_bit_depth,
    set_max_image_pixels,
    split_valid,
    validate_samples,
)
from clipsam.data.transforms import AugmentConfig, build_transform
from clipsam.errors import ConfigError, DatasetError
from clipsam.inputs import InputSpec
from clipsam.settings import from_mapping
from clipsam.tiling import TilingConfig

__all__ = ["AnomalyDataModule", "DatasetSpec", "EpochSeededRandomSampler", "parse_spec"]

log = logging.getLogger(__name__)


@dataclass
class DatasetSpec:
    """Which dataset a stage reads.

    Attributes:
        format: a key of :data:`clipsam.data.formats.FORMATS`: ``"mvtec"`` (MVTec-AD layout),
            ``"visa"`` (VisA with ``split_csv/1cls.csv``), ``"folder"`` (``good/``,
            ``anomalous/``, optional ``masks/``; see :mod:`clipsam.data.folder`), or one of the
            benchmark datasets (``mpdd``, ``btad``, ``ksdd``, ``ksdd2``, ``dagm``,
            ``dtd_synthetic``, ``mvtec_ad2``, ``mvtec_loco``, ``isic2016``, ``clinicdb``,
            ``colondb``, ``kvasir``, ``endo``, ``tn3k``, ``headct``, ``brainmri``, ``br35h``,
            ``real_iad``; docs/datasets.md lists layouts and categories).
        root: dataset folder; ``~`` is expanded. In YAML configs use
            ``${oc.env:MVTEC_ROOT,data/mvtec}`` (each format has its variable, e.g. MPDD_ROOT).
        categories: category names to read; None reads all present (folder: ignored, the
            category is the root's folder name).
        split: ``"test"`` (default: normal + anomalous images with masks, used for training too,
            per the protocol) or ``"train"`` (normal images only). Ignored for ``folder``;
            formats without a train split accept only ``"test"``.
        subset: a format-specific selection: MVTec LOCO AD ``"logical"`` or ``"structural"``
            (None: both anomaly types), Real-IAD the json split set (``"realiad_jsons"``,
            ``"realiad_jsons_sv"``, ...). Other formats take none.
        category: ``folder`` only: the category (object) name of the images, used in the text
            prompts and reports; None uses the root's folder name.
        normal_dir: ``folder`` only: sub-folder of normal images.
        anomalous_dir: ``folder`` only: sub-folder of anomalous images; ``"auto"`` finds
            ``anomalous/`` or anomalib's ``abnormal/``.
        mask_dir: ``folder`` only: sub-folder of masks; ``"auto"`` finds ``masks/`` or
            anomalib's ``mask/``; null: no masks.
        mosaic_rate: ``data.train`` only: probability that a training item is replaced by a
            2 x 2 mosaic of four images of its category with their masks (APRIL-GAN's
            ``aug_rate``: 0.2 when training on MVTec-AD, none on VisA; see
            :mod:`clipsam.data.mosaic`). 0 disables.
    """

    format: str
    root: str
    categories: list[str] | None = None
    split: Literal["train", "test"] = "test"
    subset: str | None = None
    category: str | None = None
    normal_dir: str = "good"
    anomalous_dir: str = "auto"
    mask_dir: str | None = "auto"
    mosaic_rate: float = 0.0


def parse_spec(spec: DatasetSpec, *, key: str = "data.test") -> tuple[list[Sample], bool, str]:
    """Parse the dataset a spec names, through the format registry.

    Args:
        spec: the dataset spec.
        key: its config key, for messages (``"data.train"`` or ``"data.test"``).

    Returns:
        ``(samples, require_masks, what)``: the samples, whether anomalous images must have
        masks (False for folder datasets and image-level formats), and a description for
        validation messages.

    Raises:
        ConfigError: unknown format, empty root, a split or subset the format lacks, or an
            image-level format used for training.
        DatasetError: the root does not exist, or the parser's own layout errors.
    """
    fmt = get_format(spec.format, config_key=key)
    if not str(spec.root).strip():
        env = f" (or the {fmt.env} environment variable)" if fmt.env else ""
        raise ConfigError(f"{key}.root is empty: set it{env} to the {fmt.name} folder")
    if key == "data.train" and not fmt.has_masks:
        raise ConfigError(
            f"{key}.format is {spec.format!r}: {fmt.name} has image labels only, and training needs "
            "pixel masks; train on a pixel-level dataset (mvtec, visa, ...) and test on it instead"
        )
    root = Path(os.path.expanduser(str(spec.root)))
    if not root.is_dir():
        hint = f" or the {fmt.env} environment variable" if fmt.env else ""
        fetch = f", or run `clipsam data download {spec.format} --root {root}`" if fmt.download or fmt.env else ""
        raise DatasetError(f"{fmt.name} root {root} does not exist: set {key}.root{hint}{fetch}")
    options = _folder_options(spec, key=key)
    samples = fmt.parse_root(
        root, categories=spec.categories, split=spec.split, subset=spec.subset, key=key, options=options
    )
    what = f"{fmt.name} root {root}" + ("" if spec.format == "folder" else f", split {spec.split!r}")
    if spec.subset:
        what += f", subset {spec.subset!r}"
    if spec.categories:
        what += f", categories {', '.join(spec.categories)}"
    return samples, fmt.has_masks and spec.format != "folder", what


_FOLDER_DEFAULTS = {"category": None, "normal_dir": "good", "anomalous_dir": "auto", "mask_dir": "auto"}


def _folder_options(spec: DatasetSpec, *, key: str) -> dict[str, Any]:
    """The ``folder``-only keys of ``spec`` for the parser; refused on any other format."""
    options = {name: getattr(spec, name) for name in _FOLDER_DEFAULTS}
    if spec.format == "folder":
        return options
    changed = [name for name, default in _FOLDER_DEFAULTS.items() if options[name] != default]
    if changed:
        raise ConfigError(
            f"{key}.{changed[0]} is set but applies to format 'folder' only ({key}.format is "
            f"{spec.format!r}): remove it"
        )
    return {}


class EpochSeededRandomSampler(RandomSampler):
    """A random order that is a pure function of ``(seed, epoch)``.

    A ``RandomSampler`` with a seeded generator draws each epoch's order from the generator's
    running state, so a fit resumed from a checkpoint (fresh generator) would replay epoch 0's
    order at epoch 1. Lightning calls :meth:`set_epoch` at the start of every training epoch,
    also after a resume, so here epoch ``e`` always sees the same order. Under DDP Lightning
    replaces this sampler (a ``RandomSampler``) with a ``DistributedSampler`` seeded from
    ``seed_everything``, which is resume-safe in the same way.
    """

    def __init__(self, data_source: AnomalyDataset, seed: int = 0) -> None:
        super().__init__(data_source)
        self.seed = int(seed)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)
        set_dataset_epoch = getattr(self.data_source, "set_epoch", None)
        if set_dataset_epoch is not None:  # the mosaic draws follow the epoch too
            set_dataset_epoch(self.epoch)

    def __iter__(self):  # type: ignore[override]
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        yield from torch.randperm(len(self.data_source), generator=generator).tolist()


class AnomalyDataModule(LightningDataModule):
    """Data for fit (``train`` spec), validate/test (``test`` spec) and predict (``predict_dir``).

    Args:
        train: dataset the adapters train on (``clipsam fit``).
        test: dataset evaluated zero-shot (``clipsam test`` / ``validate``).
        predict_dir: folder of images to predict on (searched recursively; non-image files are
            skipped and listed in one warning).
        image_size: side of the square frame every image is resized to.
        batch_size: training batch size.
        test_batch_size: batch size of validate/test/predict.
        num_workers: dataloader worker processes.
        augment: training augmentations (None: none; test/predict never augment).
        validation: how thoroughly files are checked in ``setup`` (``"full"`` decodes all,
            ``"headers"`` reads sizes only, ``"off"``).
        seed: seeds the training shuffle and augmentations.
        predict_category: object name for predict images (used in the text prompts); None uses
            each image's parent folder name.
        sam_image_size: side S of SAM's input, checked against the model's SAM; None (default):
            the model's own. Items carry every model input the pipeline declares (the method's
            own input, SAM's input of the ORIGINAL image), built in the DataLoader workers
            (:meth:`set_model_inputs`, called by ``ClipSamModule.setup``).
        tiling: tiled inference for validate/test/predict (:mod:`clipsam.tiling`): images are
            resized to ``tiling.image_size`` (the canvas) and cut into frame-sized tiles; None
            or ``image_size: null`` is off. Training always uses the frame.
        max_image_pixels: images with more pixels are refused with an error naming the file
            (PIL's decompression-bomb protection; the default is PIL's own limit); None: no limit.
        reference: where a few-shot method's good reference images come from and the seed
            that draws them (:class:`clipsam.data.references.ReferenceConfig`; default: the
            test dataset's good training images, seed 0). Read only for such a method.
        bit_depth: significant bits of images stored with more than 8 bits per sample (8 to
            16): 12 for 12-bit camera data in 16-bit PNG/TIFF files (values up to 4095, scaled
            by 255/4095); None (default): the file's own (16-bit files: round(v / 257)). Every
            read of the command follows it: datasets, predict, overlays, reference images.
            8-bit files are read as they are; a value above the depth's maximum is an error.
        color_order: channel order of image ARRAYS handed to :class:`clipsam.Segmenter`
            (``"rgb"``, default, or ``"bgr"``: OpenCV's ``cv2.imread`` and ``VideoCapture``,
            most camera SDKs). Files are always decoded as RGB, whatever their format.
    """

    def __init__(
        self,
        *,
        train: DatasetSpec | None = None,
        test: DatasetSpec | None = None,
        predict_dir: str | None = None,
        image_size: int = 518,
        batch_size: int = 16,
        test_batch_size: int = 8,
        num_workers: int = 2,
        augment: AugmentConfig | None = None,
        validation: Literal["full", "headers", "off"] = "full",
        seed: int = 0,
        predict_category: str | None = None,
        sam_image_size: int | None = None,
        tiling: TilingConfig | None = None,
        max_image_pixels: int | None = 178_956_970,
        reference: ReferenceConfig | None = None,
        bit_depth: int | None = None,
        color_order: Literal["rgb", "bgr"] = "rgb",
    ) -> None:
        super().__init__()
        if image_size <= 0:
            raise ConfigError(f"data.image_size must be positive, got {image_size}")
        if batch_size <= 0 or test_batch_size <= 0:
            raise ConfigError("data.batch_size and data.test_batch_size must be positive")
        if validation not in ("full", "headers", "off"):
            raise ConfigError(f"data.validation is {validation!r}: use 'full', 'headers' or 'off'")
        self.train_spec = train
        self.test_spec = test
        self.predict_dir = predict_dir
        self.image_size = image_size
        self.batch_size = batch_size
        self.test_batch_size = test_batch_size
        self.num_workers = num_workers
        self.augment = augment
        self.validation: ValidationMode = validation
        self.seed = seed
        self.predict_category = predict_category
        if sam_image_size is not None and sam_image_size <= 0:
            raise ConfigError(f"data.sam_image_size must be positive or null, got {sam_image_size}")
        self.sam_image_size = sam_image_size
        self.tiling = tiling if tiling is not None else TilingConfig()
        self.tiling.check(image_size)
        self.max_image_pixels = max_image_pixels
        set_max_image_pixels(max_image_pixels)
        self.bit_depth = check_bit_depth(bit_depth)
        self.color_order = check_color_order(color_order)
        set_image_bit_depth(self.bit_depth)  # reference images and the overlays read with it too
        self.reference: ReferenceConfig = from_mapping(ReferenceConfig, reference, key="data.reference")
        self.model_inputs: list[InputSpec] = []
        self.skip_reasons: dict[Path, str] = {}
        self.skipped_files: list[Path] = []
        self.train_dataset: AnomalyDataset | None = None
        self.test_dataset: AnomalyDataset | None = None
        self.predict_dataset: AnomalyDataset | None = None

    # ---------------------------------------------------------------------------------- setup
    def setup(self, stage: str) -> None:
        """Parse and validate the dataset of ``stage`` (fit, validate, test or predict).

        Idempotent: a stage whose dataset is already built is not parsed again (the CLI checks
        the data before the trainer starts, then the trainer calls ``setup`` once more).
        """
        built = {"fit": self.train_dataset, "validate": self.test_dataset, "test": self.test_dataset, "predict": self.predict_dataset}
        if built.get(stage) is not None:
            return
        if stage == "fit":
            self.train_dataset = self._build(self.train_spec, "data.train", "fit", augment=self.augment)
        elif stage in ("validate", "test"):
            self.test_dataset = self._build(self.test_spec, "data.test", stage, augment=None, size=self._eval_size())
        elif stage == "predict":
            self.predict_dataset = self._build_predict()
        else:
            raise ConfigError(f"unknown stage {stage!r}: use fit, validate, test or predict")

    def _eval_size(self) -> int | tuple[int, int]:
        """Size of test/predict images: the tiling canvas when tiling, else the frame."""
        canvas = self.tiling.canvas()
        return canvas if canvas is not None else self.image_size

    def _build(
        self,
        spec: DatasetSpec | None,
        key: str,
        command: str,
        *,
        augment: AugmentConfig | None,
        size: int | tuple[int, int] | None = None,
    ) -> AnomalyDataset:
        if spec is None:
            need = "a training dataset" if command == "fit" else "a dataset to evaluate"
            raise ConfigError(f"{key} is not set: `clipsam {command}` needs {need}")
        if spec.mosaic_rate and command != "fit":
            raise ConfigError(
                f"{key}.mosaic_rate={spec.mosaic_rate}: the mosaic augmentation is for training only; "
                f"set it on data.train and remove it from {key}"
            )
        samples, require_masks, what = parse_spec(spec, key=key)
        validate_samples(
            samples,
            check=self.validation,
            what=what,
            require_masks=require_masks,
            categories=spec.categories if spec.format != "folder" else None,
        )
        transform = build_transform(size or self.image_size, augment=augment, seed=self.seed)
        has_masks = get_format(spec.format, config_key=key).has_masks
        if not has_masks:
            log.info("%s is image-level only: image metrics are computed, pixel metrics are n/a", what)
        reader = functools.partial(read_image, bit_depth=self.bit_depth)
        mosaic = Mosaic(samples, spec.mosaic_rate, seed=self.seed, image_reader=reader) if spec.mosaic_rate else None
        return AnomalyDataset(
            samples, transform, has_masks=has_masks, mosaic=mosaic, inputs=self._inputs_for(command), bit_depth=self.bit_depth
        )

    #: Sub-folders of a dataset root that hold ground truth, not images to segment.
    MASK_FOLDERS = frozenset({"ground_truth", "masks", "mask"})

    def _build_predict(self) -> AnomalyDataset:
        if not self.predict_dir:
            raise ConfigError("data.predict_dir is not set: `clipsam predict` needs a folder of images or an image file")
        folder = Path(os.path.expanduser(self.predict_dir))
        self.skip_reasons = {}
        if folder.is_file():
            if not is_image_file(folder):
                raise DatasetError(f"data.predict_dir={folder} is a file but not an image (.png/.jpg/...): pass an image or a folder")
            images, self.skipped_files = [folder], []
        else:
            images, self.skipped_files = list_images(folder)
            # A dataset root (MVTec ground_truth/, folder-dataset masks/): masks are not inputs.
            masks = [p for p in images if self.MASK_FOLDERS & set(p.relative_to(folder).parent.parts)]
            if masks:
                images = [p for p in images if p not in set(masks)]
                log.warning("not segmenting %d mask file(s) under %s (folders named %s)", len(masks), folder, "/".join(sorted(self.MASK_FOLDERS)))
        if self.skipped_files:
            listed = ", ".join(str(p) for p in self.skipped_files[:20])
            more = f" and {len(self.skipped_files) - 20} more" if len(self.skipped_files) > 20 else ""
            log.warning("skipping %d non-image file(s) in %s: %s%s", len(self.skipped_files), folder, listed, more)
        if not images:
            raise DatasetError(
                f"0 images found in {folder} (data.predict_dir): put .png/.jpg/... files there"
            )
        samples = [Sample(p, None, -1, self.predict_category or p.parent.name, "unknown") for p in images]
        # One undecodable (or too large) file must not end the run: skip it and say so.
        samples, bad = split_valid(samples, check=self.validation)
        for sample, problem in bad:
            self.skipped_files.append(Path(sample.image_path))
            self.skip_reasons[Path(sample.image_path)] = problem
            log.warning("skipping %s", problem)
        if not samples:
            raise DatasetError(f"no decodable image in {folder} (data.predict_dir): {bad[0][1]}")
        return AnomalyDataset(
            samples, build_transform(self._eval_size()), has_labels=False, inputs=self._inputs_for("predict"), bit_depth=self.bit_depth
        )

    def _inputs_for(self, command: str) -> list[InputSpec]:
        """The model inputs items of ``command`` carry. With tiling (validate/test/predict) the
        pipeline builds them per tile from the canvas, so items carry none."""
        if command != "fit" and self.tiling.canvas() is not None:
            return []
        if command == "fit":  # refiners never run in fit: SAM's input is not needed there
            return [s for s in self.model_inputs if s.resize != "sam"]
        return list(self.model_inputs)

    def set_model_inputs(self, specs: Sequence[InputSpec]) -> None:
        """Make items carry the model inputs the pipeline declared (:mod:`clipsam.inputs`).

        Applies to datasets already built too (call it before their dataloaders iterate).

        Raises:
            ConfigError: ``data.sam_image_size`` differs from the SAM input side the model needs,
                or training augmentations are on while the method reads an input of its own
                (they apply to the frame only).
        """
        specs = list(specs)
        for spec in specs:
            if spec.resize == "sam" and self.sam_image_size is not None and int(self.sam_image_size) != int(spec.size):
                raise ConfigError(
                    f"data.sam_image_size={self.sam_image_size} but the model's SAM encodes {spec.size} x {spec.size} "
                    f"inputs: set data.sam_image_size to {spec.size} or leave it null"
                )
        own = [s.key for s in specs if s.resize != "sam"]
        if own and self.augment is not None and self.augment.transforms():
            raise ConfigError(
                f"data.augment is on, but the method reads its own input ({', '.join(own)}, built from the original "
                "image) while augmentations apply to the frame only: turn data.augment off for this method"
            )
        self.model_inputs = specs
        for name, dataset in (("fit", self.train_dataset), ("test", self.test_dataset), ("predict", self.predict_dataset)):
            if dataset is not None:
                dataset.inputs = self._inputs_for(name)

    def set_sam_image_size(self, side: int | None) -> None:
        """Make validate/test/predict items carry SAM's input of side ``side`` (``sam_image``, ``sam_size``)."""
        from clipsam.inputs import sam_input_spec

        others = [s for s in self.model_inputs if s.key != "sam_image"]
        self.sam_image_size = side
        self.set_model_inputs(others + ([sam_input_spec(side)] if side else []))

    # ------------------------------------------------------------------------------ accessors
    @property
    def test_categories(self) -> list[str]:
        """Sorted category names of the test dataset (available after ``setup("test")``)."""
        if self.test_dataset is None:
            raise RuntimeError("test_categories is available after datamodule.setup('test') or setup('validate')")
        return sorted({s.category for s in self.test_dataset.samples})

    @property
    def train_categories(self) -> list[str]:
        """Sorted category names of the training dataset (available after ``setup("fit")``)."""
        if self.train_dataset is None:
            raise RuntimeError("train_categories is available after datamodule.setup('fit')")
        return sorted({s.category for s in self.train_dataset.samples})

    # ------------------------------------------------------------------------- reference images
    def stage_categories(self, stage: str) -> list[str]:
        """Sorted categories of the images ``stage`` segments (test/validate: the test dataset;
        predict: ``predict_category`` or each image's parent folder name)."""
        if stage == "predict":
            if self.predict_dataset is None:
                raise RuntimeError("stage_categories('predict') is available after datamodule.setup('predict')")
            return sorted({s.category for s in self.predict_dataset.samples})
        return self.test_categories

    def reference_files(self, count: int, *, stage: str = "test") -> dict[str, list[Path]]:
        """The ``count`` good reference images of every category ``stage`` segments, drawn by
        ``data.reference`` (:func:`clipsam.data.references.draw_references`).

        Raises:
            ConfigError: ``source: train`` without a training split to read (no ``data.test``,
                a ``folder`` dataset, a format without one).
            DatasetError: a category with fewer than ``count`` good images, a missing folder.
        """
        config = self.reference
        listed = config.files or {}
        categories = self.stage_categories(stage)
        from_train = [c for c in categories if c not in listed] if config.source == TRAIN_SOURCE else []
        train_pool, train_where = self._train_references(from_train) if from_train else ({}, "")
        out: dict[str, list[Path]] = {}
        for category in categories:
            if category in listed:
                pool, where = listed[category], f"data.reference.files[{category!r}]"
            elif config.source == TRAIN_SOURCE:
                pool, where = train_pool.get(category, []), train_where
            else:
                pool, where = folder_pool(config.source, category)
            out[category] = draw_references(pool, count, seed=config.seed, category=category, where=where)
        return out

    def _train_references(self, categories: Sequence[str]) -> tuple[dict[str, list[Path]], str]:
        """Good images of the training split of ``data.test``'s dataset, by category."""
        hint = "set data.reference.source to a folder of good images, or list them in data.reference.files"
        spec = self.test_spec
        if spec is None:
            raise ConfigError(f"data.reference.source='train' reads data.test's training images, but data.test is not set: {hint}")
        if spec.format == "folder":
            raise ConfigError(
                "data.reference.source='train': data.test.format 'folder' has no training split (its good images are "
                f"test images): {hint}"
            )
        train = dataclasses.replace(spec, split="train", categories=list(categories), mosaic_rate=0.0)
        try:
            samples, _, what = parse_spec(train, key="data.test")
        except (ConfigError, DatasetError) as err:
            raise type(err)(f"data.reference.source='train' reads the good training images of data.test's dataset: {err}; or {hint}") from None
        pool: dict[str, list[Path]] = defaultdict(list)
        for sample in samples:
            if sample.label == 0:
                pool[sample.category].append(Path(sample.image_path))
        return pool, what

    # ---------------------------------------------------------------------------- dataloaders
    def _loader(self, dataset: AnomalyDataset | None, stage: str, *, batch_size: int, shuffle: bool) -> DataLoader:
        if dataset is None:
            raise RuntimeError(f"call datamodule.setup({stage!r}) before asking for its dataloader")
        if self.category_batches and stage != "fit":
            sampler = self._category_sampler(dataset, stage)
            return DataLoader(
                CategoryShardDataset(dataset) if sampler.num_replicas > 1 else dataset,
                batch_sampler=sampler,
                num_workers=self.num_workers,
                persistent_workers=self.num_workers > 0,
                collate_fn=default_collate,
                pin_memory=torch.cuda.is_available(),
            )
        # The shuffle order depends on (seed, epoch) only, so a resumed fit sees the same order.
        sampler = EpochSeededRandomSampler(dataset, seed=self.seed) if shuffle else None
        return DataLoader(
            dataset,
            batch_size=batch_size,
            shuffle=False,
            sampler=sampler,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            collate_fn=default_collate,
            drop_last=False,
            # Page-locked batches let Lightning's non-blocking host-to-device copies overlap.
            pin_memory=torch.cuda.is_available(),
        )

    # ------------------------------------------------------------- whole-category batches
    #: validate/test/predict batches hold whole categories (:meth:`set_category_batches`)
    category_batches: bool = False
    #: under DDP, a category is dealt to the processes in blocks of this many images
    category_block: int = 1

    def set_category_batches(self, enabled: bool = True, *, block: int = 1) -> None:
        """Make validate/test/predict batches whole categories (a transductive method:
        ``Pipeline.configure_batching``); ``data.test_batch_size`` is then not used.

        One process: one batch per category holding all its images. DDP: every process takes
        one batch per category (same order everywhere) holding its shard of the category, blocks
        of ``block`` images dealt to the processes in turn, a padding duplicate where a process
        gets no block; items carry ``category_pad``, and the method gathers the shards
        (:mod:`clipsam.data.category_batches`).

        Args:
            enabled: turn whole-category batches on (or off).
            block: images per block under DDP (the method's ``category_block`` hook; MuSc: its
                ``encode_batch``, so that each process's backbone passes hold the same images as
                one process's).

        Raises:
            ConfigError: ``block`` < 1.
        """
        if int(block) < 1:
            raise ConfigError(f"whole-category batches: block must be >= 1, got {block}")
        self.category_batches = bool(enabled)
        self.category_block = int(block)

    def _category_sampler(self, dataset: AnomalyDataset, stage: str) -> CategoryBatchSampler:
        """The category batches of ``dataset`` for this process (its rank of the trainer's
        ``world_size``; one process without a trainer).

        Raises:
            ConfigError: ``predict`` under DDP with a category that has fewer blocks than
                processes: the padding duplicate would be written twice (a test only counts it once).
        """
        trainer = getattr(self, "trainer", None)  # LightningDataModule.trainer (None outside a run)
        world_size = int(getattr(trainer, "world_size", 1) or 1) if trainer is not None else 1
        rank = int(getattr(trainer, "global_rank", 0) or 0) if trainer is not None else 0
        sampler = CategoryBatchSampler(
            [s.category for s in dataset.samples], num_replicas=world_size, rank=rank, block=self.category_block
        )
        padded = sampler.padded_categories()
        if stage == "predict" and padded:
            category = padded[0]
            count = len(sampler.groups[category])
            blocks = -(-count // sampler.block)
            raise ConfigError(
                f"predict with {world_size} processes gives each process a share of every category, but category "
                f"{category!r} has {count} image(s), dealt in {blocks} block(s) of {sampler.block}: predict with at "
                f"most {blocks} process(es) (trainer.devices x trainer.num_nodes)"
            )
        return sampler

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_dataset, "fit", batch_size=self.batch_size, shuffle=True)

    def val_dataloader(self) -> DataLoader | list:
        # ``validate`` evaluates the test spec; during ``fit`` (no test dataset set up) there is
        # no validation loop: looking at the zero-shot target while training would break it.
        if self.test_dataset is None:
            return []
        return self._loader(self.test_dataset, "validate", batch_size=self.test_batch_size, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.test_dataset, "test", batch_size=self.test_batch_size, shuffle=False)

    def predict_dataloader(self) -> DataLoader:
        if self.predict_dataset is None:
            raise RuntimeError("call datamodule.setup('predict') before asking for its dataloader")
        # A file that fails to decode while predicting (validation off, or changed since setup)
        # is skipped and reported, not the end of the run.
        if self.category_batches:
            sampler = self._category_sampler(self.predict_dataset, "predict")
            items = _SkipUndecodable(self.predict_dataset)
            return DataLoader(
                CategoryShardDataset(items) if sampler.num_replicas > 1 else items,
                batch_sampler=sampler,
                num_workers=self.num_workers,
                persistent_workers=self.num_workers > 0,
                collate_fn=collate_skipping,
            )
        return DataLoader(
            _SkipUndecodable(self.predict_dataset),
            batch_size=self.test_batch_size,
            shuffle=False,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            collate_fn=collate_skipping,
            drop_last=False,
        )


class _SkipUndecodable(torch.utils.data.Dataset):
    """Items of ``dataset``; an item that raises :class:`DatasetError` becomes a skip marker."""

    def __init__(self, dataset: AnomalyDataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict:
        try:
            return self.dataset[index]
        except DatasetError as err:
            return {"_skipped": str(self.dataset.samples[index].image_path), "_reason": str(err)}


def collate_skipping(items: list[dict]) -> dict:
    """``default_collate`` of the good items, plus ``skipped``: [(path, reason)] of the others
    (a batch of only skipped files has ``skipped`` and an empty ``path`` list)."""
    good = [item for item in items if "_skipped" not in item]
    skipped = [(item["_skipped"], item["_reason"]) for item in items if "_skipped" in item]
    batch = default_collate(good) if good else {"path": []}
    batch["skipped"] = skipped
    return batch
