"""scripts/benchmark_metrics.py on a tiny data set, in-process (no subprocesses)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

SCRIPT = Path(__file__).resolve().parents[3] / "scripts" / "benchmark_metrics.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("benchmark_metrics", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_generate_and_workers_agree(bench, tmp_path):
    info = bench.generate(24, 32, seed=0, out_dir=tmp_path)
    scores = np.load(tmp_path / "scores.npy")
    labels = np.load(tmp_path / "labels.npy")
    assert scores.shape == labels.shape == (24, 32, 32) and scores.dtype == np.float32
    assert 0.0 <= scores.min() and scores.max() <= 1.0
    assert 0.0 < info["positive_fraction"] < 0.2
    assert np.unique(scores).size < scores.size  # ties
    ours = bench.worker("clipsam", tmp_path)
    ref = bench.worker("torchmetrics", tmp_path)
    for k in ("auroc", "f1_max", "ap"):
        assert ours["values"][k] == pytest.approx(ref["values"][k], abs=1e-6)
    assert ours["peak_rss_mb"] > 0
