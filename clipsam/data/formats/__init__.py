"""The registry of dataset formats: ``data.train.format`` / ``data.test.format`` -> parser.

Each dataset family lives in its own module and registers its formats here:

- :mod:`.core`: ``mvtec``, ``visa``, ``folder`` (the parsers of :mod:`clipsam.data.mvtec`,
  :mod:`clipsam.data.visa`, :mod:`clipsam.data.folder`);
- :mod:`.mvtec_family`: ``mpdd``, ``btad``, ``dtd_synthetic``, ``mvtec_ad2``, ``mvtec_loco``
  (MVTec-AD-like folder trees);
- :mod:`.kolektor`: ``ksdd``, ``ksdd2`` (labels from the masks);
- :mod:`.dagm`: ``dagm`` (DAGM 2007, the labelled Class1..Class10 variants);
- :mod:`.medical`: ``isic2016``, ``clinicdb``, ``colondb``, ``kvasir``, ``endo``, ``tn3k``
  (pixel level) and ``headct``, ``brainmri``, ``br35h`` (image level only);
- :mod:`.realiad`: ``real_iad`` (per-view Real-IAD with its json splits).

A :class:`DatasetFormat` carries everything the rest of clipsam needs to know about a format:
the parser, the display name, the environment variable of its root, its official categories,
whether it has pixel-level ground truth, its download key and its licence note. The synthetic
writer of each format (``synth``) writes a small layout the parser reads back, so every format is
tested offline (``clipsam data synth --formats ...``).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from clipsam.data.samples import Sample
from clipsam.errors import ConfigError

__all__ = ["FORMATS", "DatasetFormat", "Parser", "get_format", "register"]

#: ``parse(root, categories=..., split=..., subset=...) -> samples``; files are not opened.
Parser = Callable[..., list[Sample]]


@dataclass(frozen=True)
class DatasetFormat:
    """One value of ``data.*.format``.

    Attributes:
        key: the format key (``"mpdd"``).
        name: display name (``"MPDD"``).
        parse: the parser, ``parse(root: Path, *, categories: list[str] | None, split: str,
            subset: str | None) -> list[Sample]``; raises DatasetError on a wrong layout.
        categories: the official category names (the ones the parser discovers on disk may be
            a subset; the synthetic layouts use the first few).
        level: ``"pixel"`` (masks for anomalous images: pixel and image metrics; usable as
            ``data.train``) or ``"image"`` (labels only: image metrics; pixel metrics are n/a;
            not usable for training, which needs masks).
        env: environment variable the shipped configs read the root from (``MPDD_ROOT``).
        splits: the ``split`` values the format has (``("test",)`` when there is no train split).
        subsets: allowed ``subset`` values (``()``: the format takes no subset).
        subset_help: what ``subset`` selects, for messages and docs.
        download: key in :data:`clipsam.data.download.DATASETS` (a public URL), or None.
        license: licence note shown in docs/datasets.md.
        synth: ``synth(root: Path, source) -> None`` writes a small layout of this format
            (:mod:`clipsam.data.synthetic`); None for ``folder``.
    """

    key: str
    name: str
    parse: Parser
    categories: tuple[str, ...]
    level: Literal["pixel", "image"]
    env: str | None
    splits: tuple[str, ...] = ("train", "test")
    subsets: tuple[str, ...] = ()
    subset_help: str = ""
    download: str | None = None
    license: str = ""
    synth: Callable[..., Any] | None = None

    @property
    def has_masks(self) -> bool:
        """True when anomalous images have pixel ground truth."""
        return self.level == "pixel"

    def parse_root(
        self,
        root: str | os.PathLike[str],
        *,
        categories: Sequence[str] | None = None,
        split: str = "test",
        subset: str | None = None,
        key: str = "data.test",
        options: Mapping[str, Any] | None = None,
    ) -> list[Sample]:
        """Check ``split``/``subset`` against this format, then run its parser on ``root``.

        ``options`` are extra keyword arguments of the parser (the ``folder`` format's
        ``category``/``normal_dir``/``anomalous_dir``/``mask_dir``).
        """
        if split not in self.splits:
            raise ConfigError(
                f"{key}.split is {split!r} but {self.name} has only {' and '.join(repr(s) for s in self.splits)}: "
                f"set {key}.split: {self.splits[-1]}"
            )
        if subset is not None and not self.subsets:
            raise ConfigError(f"{key}.subset is {subset!r} but {self.name} takes no subset: remove it")
        if subset is not None and self.subsets and subset not in self.subsets and "*" not in self.subsets:
            raise ConfigError(
                f"{key}.subset is {subset!r}: {self.name} accepts {', '.join(self.subsets)} ({self.subset_help})"
            )
        base = Path(os.path.expanduser(os.fspath(root)))
        return self.parse(
            base, categories=list(categories) if categories else None, split=split, subset=subset, **(options or {})
        )


#: Every registered format by key (filled by the family modules imported below).
FORMATS: dict[str, DatasetFormat] = {}


def register(fmt: DatasetFormat) -> DatasetFormat:
    """Add ``fmt`` to :data:`FORMATS` (its key must be new)."""
    if fmt.key in FORMATS:
        raise ValueError(f"dataset format {fmt.key!r} is registered twice")
    FORMATS[fmt.key] = fmt
    return fmt


def get_format(key: str, *, config_key: str = "data.test") -> DatasetFormat:
    """The format registered as ``key``.

    Raises:
        ConfigError: unknown key (the message lists the known ones).
    """
    try:
        return FORMATS[key]
    except KeyError:
        raise ConfigError(f"{config_key}.format is {key!r}: use one of {', '.join(FORMATS)}") from None


# Registration order is the order of the docs table and of `clipsam data synth --formats all`.
from clipsam.data.formats import core, mvtec_family, kolektor, dagm, medical, realiad  # noqa: E402,F401,I001
