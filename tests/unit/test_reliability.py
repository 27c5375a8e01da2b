"""Reliability mechanisms on their own: weights-only loading, atomic writes with long names, the
embedding cache's validation and read-only fallback, image listing, resume settings."""

from __future__ import annotations

import hashlib
import os
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from clipsam.callbacks import OUTPUT_MARKER, AtomicCheckpointIO, output_name
from clipsam.data.folder import list_images
from clipsam.errors import WeightsError
from clipsam.io import atomic_torch_save, atomic_write, safe_torch_load
from clipsam.models.sam import EmbeddingCache


class _CreatesFile:
    """Unpickling this calls open(path, "w"): a file appears if the pickle's code ran."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def crafted_checkpoint(path: Path, marker: Path) -> Path:
    """A .ckpt that looks like a Lightning checkpoint and runs code when unpickled unsafely."""
    torch.save({"state_dict": {"clip_model.adapters.0.weight": torch.zeros(2, 2)}, "payload": _CreatesFile(marker)}, path)
    return path


def test_weights_only_holds_even_when_the_environment_forces_it_off(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    marker = tmp_path / "code_ran"
    ckpt = crafted_checkpoint(tmp_path / "evil.ckpt", marker)
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    for load in (lambda: AtomicCheckpointIO().load_checkpoint(ckpt), lambda: safe_torch_load(ckpt)):
        with pytest.raises(WeightsError) as info:
            load()
        assert not marker.exists(), "the checkpoint ran code"
        message = str(info.value)
        assert str(ckpt) in message and "weights_only=False" not in message and "code" in message, message
    assert not marker.exists()


def test_truncated_and_empty_checkpoints_are_weights_errors(tmp_path: Path) -> None:
    good = tmp_path / "good.ckpt"
    torch.save({"state_dict": {"a": torch.ones(1000)}}, good)
    data = good.read_bytes()
    (tmp_path / "half.ckpt").write_bytes(data[: len(data) // 2])
    with pytest.raises(WeightsError, match="truncated"):
        AtomicCheckpointIO().load_checkpoint(tmp_path / "half.ckpt")
    assert torch.equal(AtomicCheckpointIO().load_checkpoint(good)["state_dict"]["a"], torch.ones(1000))


def test_atomic_write_handles_names_at_the_file_system_limit(tmp_path: Path) -> None:
    target = tmp_path / ("x" * 251 + ".png")  # 255 bytes: the longest valid name
    with atomic_write(target) as tmp:
        tmp.write_bytes(b"data")
    assert target.read_bytes() == b"data"
    assert [p.name for p in tmp_path.iterdir()] == [target.name]


def test_output_names_are_shortened_with_a_hash_and_stay_unique() -> None:
    short = "good__000"
    assert output_name(short) == short
    a, b = "a" * 300, "a" * 299 + "b"
    assert len(output_name(a).encode()) <= 240 and output_name(a) != output_name(b)
    assert output_name(a).endswith(hashlib.sha256(a.encode()).hexdigest()[:16])
    multibyte = "é" * 200  # 400 bytes in UTF-8
    assert len(output_name(multibyte).encode()) <= 240


def _entry(cache: EmbeddingCache, key: str, tensor: torch.Tensor) -> None:
    atomic_torch_save({"key": key, "embedding": tensor}, cache.path(key))


def test_cache_entries_of_the_wrong_shape_or_not_finite_are_recomputed(tmp_path: Path) -> None:
    cache = EmbeddingCache(tmp_path, embedding_shape=(1, 4, 2, 2))
    good, wrong, nan = "a" * 64, "b" * 64, "c" * 64
    _entry(cache, good, torch.ones(1, 4, 2, 2))
    _entry(cache, wrong, torch.ones(1, 8, 2, 2))
    _entry(cache, nan, torch.full((1, 4, 2, 2), float("nan")))
    assert torch.equal(cache.load(good), torch.ones(1, 4, 2, 2))
    for key in (wrong, nan):
        with pytest.warns(UserWarning, match="recomputing"):
            assert cache.load(key) is None
    assert (cache.hits, cache.misses) == (1, 2)


def test_unwritable_cache_warns_once_and_carries_on(tmp_path: Path) -> None:
    blocker = tmp_path / "cache_is_a_file"
    blocker.write_text("not a folder")  # mkdir below it fails, for root as for anyone
    cache = EmbeddingCache(blocker)
    with pytest.warns(UserWarning, match="cannot be written") as record:
        cache.save("d" * 64, torch.ones(1, 2, 2, 2))
        cache.save("e" * 64, torch.ones(1, 2, 2, 2))
    assert len([w for w in record if "cannot be written" in str(w.message)]) == 1
    assert cache.load("d" * 64) is None and not cache.writable


def test_full_cache_disk_warns_once_and_carries_on(tmp_path: Path) -> None:
    import subprocess

    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(disk)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip("cannot mount a small tmpfs here")
    try:
        with (disk / "filler").open("wb", buffering=0) as handle, pytest.raises(OSError):
            while True:
                handle.write(b"\0" * 4096)
        cache = EmbeddingCache(disk / "cache")
        with pytest.warns(UserWarning, match="cannot be written"):
            cache.save("f" * 64, torch.ones(1, 32, 16, 16))
        assert not cache.writable
        assert not list(disk.rglob("*.pt")) and not list(disk.rglob(".clipsam-*")), "no entry, no temp file left"
    finally:
        subprocess.run(["umount", str(disk)], check=False)


def test_list_images_follows_symlinked_folders_and_skips_clipsam_outputs(tmp_path: Path) -> None:
    real = tmp_path / "elsewhere"
    real.mkdir()
    Image.fromarray(np.zeros((4, 4, 3), dtype=np.uint8)).save(real / "a.png")
    folder = tmp_path / "input"
    folder.mkdir()
    Image.fromarray(np.zeros((4, 4, 3), dtype=np.uint8)).save(folder / "b.png")
    os.symlink(real, folder / "linked")
    os.symlink(folder, folder / "loop")  # a loop must end
    out = folder / "predictions"
    (out / "version_0" / "overlays").mkdir(parents=True)
    (out / OUTPUT_MARKER).write_text("")
    Image.fromarray(np.zeros((4, 4, 3), dtype=np.uint8)).save(out / "version_0" / "overlays" / "b.png")
    with pytest.warns(UserWarning, match="not reading clipsam output"):
        images, _ = list_images(folder)
    assert sorted(p.relative_to(folder).as_posix() for p in images) == ["b.png", "linked/a.png"]


def test_resume_applies_the_configured_optimiser_settings() -> None:
    from clipsam.module import ClipSamModule

    module = ClipSamModule(optimizer={"lr": 0.01, "betas": [0.9, 0.99], "weight_decay": 0.0})
    checkpoint = {"optimizer_states": [{"state": {}, "param_groups": [{"lr": 0.001, "betas": (0.5, 0.999), "weight_decay": 0.0, "params": [0]}]}]}
    from clipsam.checkpoints import apply_optimizer_config

    apply_optimizer_config(checkpoint, module.optimizer_config)
    group = checkpoint["optimizer_states"][0]["param_groups"][0]
    assert group["lr"] == 0.01 and group["betas"] == (0.9, 0.99)


def test_checkpoint_on_other_frozen_weights_is_refused() -> None:
    from clipsam.module import ClipSamModule

    module = ClipSamModule(clip={"model_name": "clipsam-tiny", "pretrained": None, "layers": [1, 2, 3, 4], "seed": 0})
    base = {"state_dict": {"clip_model.adapters.0.weight": torch.zeros(1)}}
    meta = {"clip_model_name": "clipsam-tiny", "clip_pretrained": "openai", "layers": [1, 2, 3, 4]}
    with pytest.raises(WeightsError, match=r"'openai'.*None"):
        module.check_checkpoint({**base, "clipsam": meta})
    with pytest.raises(WeightsError, match=r"seed=3.*seed is 0"):
        module.check_checkpoint({**base, "clipsam": {**meta, "clip_pretrained": None, "clip_seed": 3}})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        module.check_checkpoint({**base, "clipsam": {**meta, "clip_pretrained": None, "clip_seed": 0}})


def test_test_report_overlays_with_long_image_names(tmp_path: Path) -> None:
    from types import SimpleNamespace

    from clipsam.reporting import report_test_results

    size = 8
    overlay = {
        "path": str(tmp_path / ("n" * 245 + ".png")),  # a valid 249-character name
        "category": "capsule",
        "image": torch.zeros(3, size, size, dtype=torch.uint8),
        "gt": torch.zeros(size, size, dtype=torch.bool),
        "clip_map": torch.zeros(size, size),
        "scores": torch.zeros(size, size),
        "mask": torch.zeros(size, size, dtype=torch.bool),
    }
    results = {"mean": {"pixel_auroc": 0.5}, "per_category": {"capsule": {"pixel_auroc": 0.5, "num_images": 1}}, "num_images": 1}
    trainer = SimpleNamespace(loggers=[], lightning_module=None)
    paths = report_test_results(
        trainer=trainer, results=results, baseline=None, overlays=[overlay], timings={}, config={}, run_dir=tmp_path / "run"
    )
    written = list(paths["overlays"].glob("*.png"))
    assert len(written) == 1 and len(written[0].name.encode()) <= 255
