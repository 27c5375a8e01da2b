"""Shared pieces of the parity tests (tests/parity): where the golden files live, how a golden
file's architecture becomes a clipsam method, clipsam's own file path, and the comparison that
names what it compares and records the difference it measured.

The golden files are outputs of the reference implementations' own code on tiny random CLIP
models; ``/work/shared/parity/README.md`` (next to them) describes every key, the settings that
reproduce them in clipsam and the tolerance of each output. They are never regenerated here.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

__all__ = [
    "MEASURED",
    "PARITY_ENV",
    "REPO",
    "check_close",
    "check_equal",
    "check_weights_loaded",
    "file_path_input",
    "golden_path",
    "load_golden",
    "parity_dir",
    "write_bytes",
    "write_local_dir",
    "yaml_section",
]

REPO = Path(__file__).resolve().parents[2]
"""The repository root (tests/parity/helpers.py -> the checkout)."""

PARITY_ENV = "CLIPSAM_PARITY_DIR"
"""Environment variable that overrides where the golden files are."""

MEASURED: dict[tuple[str, str], tuple[float, float]] = {}
"""(golden file, output) -> (measured max abs difference, tolerance); printed at the end of the run."""


def parity_dir() -> Path:
    """The golden folder: ``$CLIPSAM_PARITY_DIR``, else ``../shared/parity`` next to the checkout."""
    override = os.environ.get(PARITY_ENV, "").strip()
    if override:
        return Path(override).expanduser()
    return REPO.parent / "shared" / "parity"


def golden_path(name: str) -> Path:
    """Path of golden file ``name``; skips the test (one line naming the missing path) when absent."""
    folder = parity_dir()
    if not folder.is_dir():
        pytest.skip(f"parity golden folder not found: {folder} (set {PARITY_ENV})")
    path = folder / name
    if not path.is_file():
        pytest.skip(f"parity golden file not found: {path}")
    return path


def load_golden(name: str) -> dict[str, Any]:
    """``torch.load(..., weights_only=True)`` of golden file ``name`` (skips when it is missing)."""
    return torch.load(golden_path(name), map_location="cpu", weights_only=True)


# ---------------------------------------------------------------------- building
def write_local_dir(folder: Path, config: Mapping[str, Any] | str, state_dict: Mapping[str, torch.Tensor]) -> str:
    """Write an open_clip ``local-dir:`` folder and return the ``model_name`` that loads it.

    Args:
        folder: Where to write (created).
        config: The ``open_clip_config.json`` content: a JSON string, or a mapping (a bare model
            config is wrapped as ``{"model_cfg": ...}``).
        state_dict: The weights, saved as ``open_clip_pytorch_model.bin``.
    """
    folder.mkdir(parents=True, exist_ok=True)
    if isinstance(config, str):
        text = config
    else:
        content = dict(config) if "model_cfg" in config else {"model_cfg": dict(config)}
        text = json.dumps(content)
    (folder / "open_clip_config.json").write_text(text, encoding="utf-8")
    torch.save(dict(state_dict), folder / "open_clip_pytorch_model.bin")
    return f"local-dir:{folder}"


def yaml_section(path: str | Path, *keys: str) -> dict[str, Any]:
    """A nested mapping of a repository YAML file (``{}`` where a key is absent)."""
    import yaml

    with open(REPO / path, encoding="utf-8") as handle:
        node: Any = yaml.safe_load(handle) or {}
    for key in keys:
        node = (node or {}).get(key) or {}
    return dict(node)


def write_bytes(folder: Path, name: str, data: torch.Tensor) -> Path:
    """Write a 1-D uint8 tensor (a PNG file's bytes) to ``folder / name``."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_bytes(data.cpu().numpy().astype(np.uint8).tobytes())
    return path


def file_path_input(image_path: Path, size: int, mask_path: Path | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """clipsam's own file path: ``read_image`` (and ``read_mask``), then ``build_transform(size)``.

    Returns:
        ``(image (1, 3, size, size) float32 CLIP-normalised, mask (1, size, size) uint8 {0, 1})``;
        the mask is all zeros without ``mask_path``.
    """
    from clipsam.data.samples import read_image, read_mask
    from clipsam.data.transforms import build_transform

    image = read_image(image_path)
    if mask_path is not None:
        mask = read_mask(mask_path).astype(np.uint8)
    else:
        mask = np.zeros(image.shape[:2], dtype=np.uint8)
    out = build_transform(size)(image=image, mask=mask)
    return out["image"].float().unsqueeze(0), torch.as_tensor(np.asarray(out["mask"])).unsqueeze(0)


# ---------------------------------------------------------------------- comparing
def _as_tensor(value: Any) -> torch.Tensor:
    return value.detach().cpu() if isinstance(value, torch.Tensor) else torch.as_tensor(value)


def check_close(source: str, what: str, actual: Any, expected: Any, atol: float) -> float:
    """Assert ``max |actual - expected| <= atol`` (no relative term); record and return the difference.

    Args:
        source: The golden file (for the message and the summary).
        what: The output compared (named in the assertion message).
        actual: clipsam's value.
        expected: The golden value.
        atol: The README's tolerance for this output.
    """
    got = _as_tensor(actual).double()
    want = _as_tensor(expected).double()
    assert got.shape == want.shape, f"{source}: {what}: clipsam shape {tuple(got.shape)} != golden {tuple(want.shape)}"
    assert torch.isfinite(got).all(), f"{source}: {what}: clipsam gave non-finite values"
    diff = float((got - want).abs().max()) if got.numel() else 0.0
    MEASURED[(source, what)] = (diff, float(atol))
    torch.testing.assert_close(
        got,
        want,
        rtol=0.0,
        atol=float(atol),
        msg=lambda detail: f"{source}: {what}: max abs diff {diff:.3g} > atol {atol:g}\n{detail}",
    )
    return diff


def check_equal(source: str, what: str, actual: Any, expected: Any) -> None:
    """Assert exact equality (values and shape); recorded with tolerance 0."""
    got = _as_tensor(actual)
    want = _as_tensor(expected)
    assert got.shape == want.shape, f"{source}: {what}: clipsam shape {tuple(got.shape)} != golden {tuple(want.shape)}"
    if got.is_floating_point() or want.is_floating_point():
        diff = float((got.double() - want.double()).abs().max()) if got.numel() else 0.0
    else:
        diff = float((got.long() != want.long()).sum())
    MEASURED[(source, what)] = (diff, 0.0)
    assert diff == 0, f"{source}: {what}: not equal (max abs diff / differing entries: {diff:.3g})"


def check_weights_loaded(source: str, state: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Tensor]) -> None:
    """Every golden weight is in ``state`` with the same shape and the same values (one check)."""
    missing = sorted(set(expected) - set(state))
    assert not missing, f"{source}: weights missing from the built model: {missing[:5]}"
    worst, worst_key = 0.0, ""
    for key, value in expected.items():
        got = state[key].detach().cpu()
        assert got.shape == value.shape, f"{source}: weight {key}: shape {tuple(got.shape)} != golden {tuple(value.shape)}"
        diff = float((got.double() - value.double()).abs().max()) if value.numel() else 0.0
        if diff > worst:
            worst, worst_key = diff, key
    MEASURED[(source, f"weights loaded ({len(expected)} tensors)")] = (worst, 0.0)
    assert worst == 0, f"{source}: built weights differ from the golden state dict (max abs diff {worst:.3g} at {worst_key})"
