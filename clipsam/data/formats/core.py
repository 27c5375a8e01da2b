"""The original formats: MVTec-AD, VisA and a labelled image folder.

Their parsers live in :mod:`clipsam.data.mvtec`, :mod:`clipsam.data.visa` and
:mod:`clipsam.data.folder`; their synthetic writer is :func:`clipsam.data.synthetic.
generate_synthetic` (``synth`` is None here: :func:`~clipsam.data.synthetic.generate_formats`
calls it directly).
"""

from __future__ import annotations

from pathlib import Path

from clipsam.data.folder import parse_folder
from clipsam.data.formats import DatasetFormat, register
from clipsam.data.mvtec import MVTEC_CATEGORIES, parse_mvtec
from clipsam.data.samples import Sample
from clipsam.data.visa import VISA_CATEGORIES, parse_visa

__all__: list[str] = []

_CC_BY_NC_SA = "CC BY-NC-SA 4.0 (non-commercial use only)"


def _mvtec(root: Path, *, categories, split, subset) -> list[Sample]:
    return parse_mvtec(root, categories=categories, split=split)


def _visa(root: Path, *, categories, split, subset) -> list[Sample]:
    return parse_visa(root, categories=categories, split=split)


def _folder(root: Path, *, categories, split, subset, **options) -> list[Sample]:
    return parse_folder(root, **options)


register(
    DatasetFormat(
        key="mvtec",
        name="MVTec-AD",
        parse=_mvtec,
        categories=MVTEC_CATEGORIES,
        level="pixel",
        env="MVTEC_ROOT",
        download="mvtec",
        license=_CC_BY_NC_SA + "; https://www.mvtec.com/company/research/datasets/mvtec-ad",
    )
)
register(
    DatasetFormat(
        key="visa",
        name="VisA",
        parse=_visa,
        categories=VISA_CATEGORIES,
        level="pixel",
        env="VISA_ROOT",
        download="visa",
        license="CC BY-NC-SA 4.0 (as anomalib states it); https://github.com/amazon-science/spot-diff",
    )
)
register(
    DatasetFormat(
        key="folder",
        name="image folder",
        parse=_folder,
        categories=(),
        level="pixel",
        env=None,
        license="your own images",
    )
)
