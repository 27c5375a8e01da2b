"""ClipSamModule glue: what trains, what a checkpoint holds, and that it round-trips."""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch

from clipsam.data.datamodule import AnomalyDataModule, DatasetSpec
from clipsam.errors import ConfigError
from clipsam.models.clip import ClipConfig
from clipsam.models.sam import SamConfig
from clipsam.module import ClipSamModule, EvalConfig
from tests.helpers.data import make_synthetic_root

IMAGE_SIZE = 64


def _module(**kwargs) -> ClipSamModule:
    return ClipSamModule(
        clip=ClipConfig(model_name="clipsam-tiny", pretrained=None, layers=[1, 2, 3, 4]),
        sam=SamConfig(variant="tiny"),
        image_size=IMAGE_SIZE,
        **kwargs,
    )


@pytest.fixture(scope="module")
def datamodule(tmp_path_factory: pytest.TempPathFactory) -> AnomalyDataModule:
    root = make_synthetic_root(tmp_path_factory.mktemp("data"), categories=("fabric", "disk"), layouts=("mvtec",))
    return AnomalyDataModule(
        train=DatasetSpec(format="mvtec", root=str(root / "mvtec")),
        test=DatasetSpec(format="mvtec", root=str(root / "mvtec")),
        image_size=IMAGE_SIZE,
        batch_size=4,
        test_batch_size=4,
        num_workers=0,
    )


def _trainer(tmp_path: Path, **kwargs) -> pl.Trainer:
    return pl.Trainer(
        accelerator="cpu",
        devices=1,
        max_epochs=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
        **kwargs,
    )


def test_frozen_parts_are_built_lazily_and_only_adapters_train() -> None:
    module = _module()
    assert module.clip_model is None, "no backbone is built before configure_model"
    module.configure_model()
    trainable = {name for name, p in module.named_parameters() if p.requires_grad}
    assert trainable and all(name.startswith("pipeline.producer.model.adapters.") for name in trainable)
    optimizer = module.configure_optimizers()
    optimised = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert optimised == {id(p) for p in module.clip_model.adapters.parameters()}
    assert optimizer.defaults["lr"] == 1e-3 and optimizer.defaults["betas"] == (0.5, 0.999)


def test_unknown_fusion_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="model.evaluation.fusion"):
        _module(evaluation=EvalConfig(fusion="average"))


def test_checkpoint_holds_adapters_only_and_round_trips(tmp_path: Path, datamodule: AnomalyDataModule) -> None:
    pl.seed_everything(0)
    module = _module()
    trainer = _trainer(tmp_path)
    trainer.fit(module, datamodule=datamodule)
    ckpt_path = tmp_path / "adapters.ckpt"
    trainer.save_checkpoint(ckpt_path)

    saved = torch.load(ckpt_path, map_location="cpu", weights_only=True)  # loads with weights_only
    assert set(saved["state_dict"]) == {f"producer.model.adapters.{k}" for k in module.clip_model.adapter_state_dict()}
    assert saved["clipsam"]["clip_model_name"] == "clipsam-tiny"
    assert saved["optimizer_states"], "optimizer state is kept for resuming"
    backbone_bytes = sum(p.numel() * p.element_size() for p in module.clip_model.parameters())
    assert ckpt_path.stat().st_size < backbone_bytes, "the frozen backbone must not be in the checkpoint"

    restored = ClipSamModule.load_from_checkpoint(ckpt_path)  # rebuilds the frozen CLIP from hparams
    restored.configure_model()  # idempotent
    for key, value in module.clip_model.adapter_state_dict().items():
        assert torch.equal(restored.clip_model.adapter_state_dict()[key], value)

    images = torch.randn(2, 3, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(1))
    module.eval()
    restored.eval()
    with torch.no_grad():
        a = module.clip_model(images, ["fabric", "disk"]).anomaly_map
        b = restored.clip_model(images, ["fabric", "disk"]).anomaly_map
    assert torch.equal(a, b), "a checkpoint round-trips to identical maps"


def test_interrupted_checkpoint_write_leaves_previous_file_intact(
    tmp_path: Path, datamodule: AnomalyDataModule, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Lightning writes checkpoints in an fsspec transaction (temp file, then rename): a crash
    during the write never leaves a half-written file where a later run would load it."""
    import fsspec.implementations.local as local

    module = _module()
    trainer = _trainer(tmp_path)
    trainer.fit(module, datamodule=datamodule)
    path = tmp_path / "last.ckpt"
    trainer.save_checkpoint(path)
    before = path.read_bytes()

    real_write = local.LocalFileOpener.write

    def write_half_then_die(self, data):  # type: ignore[no-untyped-def]
        real_write(self, bytes(data)[: len(data) // 2])
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(local.LocalFileOpener, "write", write_half_then_die)
    with pytest.raises(OSError, match="simulated"):
        trainer.save_checkpoint(path)
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert not [p for p in tmp_path.iterdir() if p.name != "last.ckpt" and "ckpt" in p.name and p.stat().st_size < len(before)]
    torch.load(path, map_location="cpu", weights_only=True)


def test_atomic_checkpoint_io_never_leaves_a_partial_file(
    tmp_path: Path, datamodule: AnomalyDataModule, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The CLI's default plugin: temp file beside the target, then os.replace."""
    import io as _io

    from clipsam.callbacks import AtomicCheckpointIO

    module = _module()
    trainer = _trainer(tmp_path, plugins=[AtomicCheckpointIO()])
    trainer.fit(module, datamodule=datamodule)
    path = tmp_path / "last.ckpt"
    trainer.save_checkpoint(path)
    before = path.read_bytes()

    real_save = torch.save

    def save_half_then_die(obj, target, *args, **kwargs):  # type: ignore[no-untyped-def]
        buffer = _io.BytesIO()
        real_save(obj, buffer)
        Path(target).write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
        raise KeyboardInterrupt  # Ctrl+C half-way through the write

    monkeypatch.setattr(torch, "save", save_half_then_die)
    with pytest.raises(KeyboardInterrupt):
        trainer.save_checkpoint(path)
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir() if "ckpt" in p.name) == ["last.ckpt"], "temp file left behind"


def test_clip_global_is_the_image_score_of_the_method_and_aupro_protocol_is_checked() -> None:
    module = ClipSamModule(
        clip=ClipConfig(model_name="clipsam-tiny", pretrained=None, layers=[1, 2, 3, 4], image_score="clip_global"),
        sam=SamConfig(variant="tiny"),
        evaluation=EvalConfig(use_sam=False),
        image_size=IMAGE_SIZE,
    )
    module.configure_model()
    images = torch.randn(2, 3, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        result = module.pipeline.segment({"image": images, "category": ["disk", "fabric"]})
        expected = module.clip_model(images, ["disk", "fabric"]).image_scores
    torch.testing.assert_close(result["image_scores"], expected)
    torch.testing.assert_close(result["clip_image_scores"], expected)
    assert not torch.allclose(result["image_scores"], result["scores"].flatten(1).amax(1))
    with pytest.raises(ConfigError, match="model.evaluation.aupro_protocol"):
        EvalConfig(aupro_protocol="cflow")
