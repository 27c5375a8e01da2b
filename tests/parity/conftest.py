"""Fixtures of the parity tests: the golden files (skipped, one line naming the missing path, when
absent; ``CLIPSAM_PARITY_DIR`` overrides the folder) and, with ``-v``, a summary of every measured
difference at the end of the run."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from tests.parity.helpers import MEASURED, load_golden


@pytest.fixture(scope="session")
def golden_file() -> Callable[[str], dict[str, Any]]:
    """``golden_file(name)``: the loaded golden file, read once per session; skips when missing."""
    cache: dict[str, dict[str, Any]] = {}

    def get(name: str) -> dict[str, Any]:
        if name not in cache:
            cache[name] = load_golden(name)
        return cache[name]

    return get


def pytest_terminal_summary(terminalreporter: Any) -> None:
    """With ``-v``: one line per compared output, the measured max abs difference and the tolerance."""
    if not MEASURED or terminalreporter.verbosity < 1:
        return
    terminalreporter.section("parity: max abs difference vs tolerance")
    for (source, what), (diff, atol) in sorted(MEASURED.items()):
        flag = "" if diff <= atol else "  EXCEEDS"
        terminalreporter.write_line(f"{source:20s} {what:60s} {diff:10.3g}  tol {atol:8.3g}{flag}")
