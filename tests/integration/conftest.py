"""Fixtures for end-to-end CLI runs on generated data with tiny random models."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
DEMO_CONFIG = str(REPO / "configs" / "demo.yaml")


@pytest.fixture(scope="session")
def synth_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Synthetic data in both layouts, small, generated once per session."""
    from clipsam.data.synthetic import generate_synthetic

    root = tmp_path_factory.mktemp("synthetic")
    generate_synthetic(
        root,
        image_size=128,
        num_train_good=2,
        num_test_good=2,
        num_test_anomalous=4,
        seed=0,
        progress=False,
    )
    return root


@pytest.fixture()
def in_tmp_cwd(tmp_path: Path, synth_root: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Run in an empty working directory with CLIPSAM_SYNTH_ROOT pointing at the generated data."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("CLIPSAM_SYNTH_ROOT", str(synth_root))
    monkeypatch.setenv("WANDB_MODE", "offline")
    return tmp_path


def fast_args(tmp_path: Path) -> list[str]:
    """Overrides that keep a demo-config run to seconds: small frames, no workers, 1 epoch."""
    return [
        "--config",
        DEMO_CONFIG,
        "--data.image_size=64",
        "--data.batch_size=4",
        "--data.test_batch_size=4",
        "--data.num_workers=0",
        "--trainer.max_epochs=1",
        "--trainer.enable_progress_bar=false",
        f"--model.refiner_config.sam.embedding_cache_dir={tmp_path / 'emb_cache'}",
        f"--model.evaluation.predict_dir={tmp_path / 'predict_out'}",
    ]


def run_cli(args: list[str]):
    """Run the CLI in-process and return the LightningCLI object."""
    from clipsam.cli import _build_cli

    os.environ.setdefault("WANDB_MODE", "offline")
    return _build_cli(args)


@pytest.fixture(scope="session")
def demo_fit_ckpt(tmp_path_factory: pytest.TempPathFactory, synth_root: Path) -> Path:
    """last.ckpt (with optimiser state) of ONE 1-epoch fit on the demo config (tiny models,
    64 px), shared by the test modules that only need a trained checkpoint to load or resume."""
    work = tmp_path_factory.mktemp("demo_fit")
    old = Path.cwd()
    os.environ["CLIPSAM_SYNTH_ROOT"] = str(synth_root)
    os.chdir(work)
    try:
        fit = run_cli(["fit", *fast_args(work)])
        return Path(fit.trainer.checkpoint_callback.last_model_path).resolve()
    finally:
        os.chdir(old)
