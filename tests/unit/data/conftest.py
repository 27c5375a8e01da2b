"""Fixtures for the data tests: one synthetic dataset per session (read-only) and fresh copies."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tests.helpers.data import make_synthetic_root


@pytest.fixture(scope="session")
def synth_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A shared synthetic dataset (mvtec/ and visa/): never modify it, use ``synth_copy``."""
    return make_synthetic_root(tmp_path_factory.mktemp("data"))


@pytest.fixture
def synth_copy(synth_root: Path, tmp_path: Path) -> Path:
    """A private copy of the synthetic dataset that a test may break."""
    dest = tmp_path / "synth"
    shutil.copytree(synth_root, dest)
    return dest
