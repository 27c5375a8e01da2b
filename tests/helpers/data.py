"""Test helpers for data: small synthetic datasets on disk and hand-made image files.

Other tests import these, e.g.::

    from tests.helpers.data import make_synthetic_root
    root = make_synthetic_root(tmp_path)            # root/mvtec and root/visa
    spec = DatasetSpec(format="mvtec", root=str(root / "mvtec"))
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from clipsam.data.synthetic import generate_synthetic

__all__ = ["hash_tree", "make_synthetic_root", "write_image"]


def make_synthetic_root(
    tmp_path: Path,
    *,
    categories: Sequence[str] = ("fabric", "mesh", "disk"),
    layouts: Sequence[str] = ("mvtec", "visa"),
    image_size: int = 48,
    num_train_good: int = 2,
    num_test_good: int = 2,
    num_test_anomalous: int = 4,
    seed: int = 0,
    name: str = "synth",
) -> Path:
    """Write a small synthetic dataset under ``tmp_path/name`` and return that folder.

    The folder holds ``mvtec/`` and/or ``visa/`` (see :mod:`clipsam.data.synthetic`). With the
    defaults: 3 categories (one texture, the grayscale mesh, one object), per category 2 train
    normal images and a test split of 2 normal + 4 anomalous images (one per defect type).
    """
    root = Path(tmp_path) / name
    generate_synthetic(
        root,
        layouts=layouts,
        categories=categories,
        image_size=image_size,
        num_train_good=num_train_good,
        num_test_good=num_test_good,
        num_test_anomalous=num_test_anomalous,
        seed=seed,
        progress=False,
    )
    return root


def write_image(path: Path, array: np.ndarray) -> Path:
    """Save a uint8 (H, W) or (H, W, 3) array as an image file (format from the suffix)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.asarray(array, dtype=np.uint8)).save(path)
    return path


def hash_tree(root: Path) -> dict[str, str]:
    """sha256 of every file under ``root``, keyed by its path relative to ``root``."""
    root = Path(root)
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }
