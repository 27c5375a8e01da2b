"""The catalogue of bad input: each case is one clear error (exit 2, no traceback) or a defined
behaviour, and nothing the user had is lost or overwritten."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from clipsam.cli import main
from tests.integration.conftest import fast_args, run_cli


def _tree_digest(root: Path) -> dict[str, str]:
    """sha256 of every file below ``root``, except the W&B service's own debug logs
    (``wandb/*/logs/debug*.log``): wandb's background process may add its shutdown lines after
    the command returned; they are W&B's diagnostics, not a result of the run."""
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file() and not (p.parent.name == "logs" and p.name.startswith("debug") and "wandb" in p.parts)
    }


def _run_expecting_error(args: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    code = main(args)
    err = capsys.readouterr().err
    assert code == 2, err
    errors = [line for line in err.splitlines() if line.startswith("clipsam: error: ")]
    assert len(errors) == 1, err
    assert "Traceback" not in err
    return errors[0]


@pytest.fixture(scope="module")
def adapters_ckpt(demo_fit_ckpt: Path) -> Path:
    """Adapters fitted once (1 epoch, tiny preset) for the tests that need a checkpoint."""
    return demo_fit_ckpt


@pytest.fixture()
def broken_copy(tmp_path: Path, synth_root: Path) -> Path:
    """A private copy of the generated MVTec-layout data that a test may damage."""
    dst = tmp_path / "broken" / "mvtec"
    shutil.copytree(synth_root / "mvtec", dst)
    return dst


# ---------------------------------------------------------------------------- config errors
def test_unknown_config_key_is_reported_by_lightningcli(in_tmp_cwd: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", *fast_args(in_tmp_cwd), "--model.bogus_key=1"])
    assert exit_info.value.code == 2
    assert "bogus_key" in capsys.readouterr().err
    assert not (in_tmp_cwd / "runs").exists()


@pytest.mark.parametrize("option", ["--model.method_config.bogus_key=1", "--model.clip.bogus_key=1", "--model.refiner_config.prompt.bogus_key=1"])
def test_unknown_method_or_refiner_setting_is_one_line_naming_it(option: str, in_tmp_cwd: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["fit", *fast_args(in_tmp_cwd), option]) == 2
    err = capsys.readouterr().err
    named = "model.refiner_config.prompt.bogus_key" if "refiner" in option else "model.method_config.bogus_key"
    assert f"clipsam: error: {named}: not a setting" in err and "Traceback" not in err
    assert not (in_tmp_cwd / "runs").exists()


def test_wrong_type_is_reported_by_lightningcli(in_tmp_cwd: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", *fast_args(in_tmp_cwd), "--data.batch_size=many"])
    assert exit_info.value.code == 2
    assert "batch_size" in capsys.readouterr().err


def test_unknown_fusion_method_names_the_key_and_choices(in_tmp_cwd: Path, capsys: pytest.CaptureFixture[str]) -> None:
    err = _run_expecting_error(["test", *fast_args(in_tmp_cwd), "--model.evaluation.fusion=average"], capsys)
    assert "model.evaluation.fusion" in err and "clip_boost" in err


# ---------------------------------------------------------------------------- data errors
def test_missing_dataset_root(in_tmp_cwd: Path, capsys: pytest.CaptureFixture[str]) -> None:
    err = _run_expecting_error(["fit", *fast_args(in_tmp_cwd), "--data.train.root=/nonexistent/mvtec"], capsys)
    assert "/nonexistent/mvtec" in err
    assert not (in_tmp_cwd / "runs").exists(), "no run directory for a run that never started"


def test_corrupt_image(in_tmp_cwd: Path, broken_copy: Path, capsys: pytest.CaptureFixture[str]) -> None:
    victim = sorted((broken_copy / "disk" / "test" / "hole").glob("*.png"))[0]
    victim.write_bytes(b"this is not a png")
    err = _run_expecting_error(["fit", *fast_args(in_tmp_cwd), f"--data.train.root={broken_copy}"], capsys)
    assert str(victim) in err
    assert not (in_tmp_cwd / "runs").exists()


def test_truncated_image(in_tmp_cwd: Path, broken_copy: Path, capsys: pytest.CaptureFixture[str]) -> None:
    victim = sorted((broken_copy / "fabric" / "test" / "stain").glob("*.png"))[0]
    data = victim.read_bytes()
    victim.write_bytes(data[: len(data) // 2])
    err = _run_expecting_error(["fit", *fast_args(in_tmp_cwd), f"--data.train.root={broken_copy}"], capsys)
    assert str(victim) in err


def test_mask_of_another_size(in_tmp_cwd: Path, broken_copy: Path, capsys: pytest.CaptureFixture[str]) -> None:
    mask = sorted((broken_copy / "hexnut" / "ground_truth" / "scratch").glob("*_mask.png"))[0]
    Image.fromarray(np.zeros((17, 23), dtype=np.uint8)).save(mask)
    err = _run_expecting_error(["fit", *fast_args(in_tmp_cwd), f"--data.train.root={broken_copy}"], capsys)
    assert str(mask) in err


def test_image_without_its_mask(in_tmp_cwd: Path, broken_copy: Path, capsys: pytest.CaptureFixture[str]) -> None:
    mask = sorted((broken_copy / "disk" / "ground_truth" / "hole").glob("*_mask.png"))[0]
    mask.unlink()
    err = _run_expecting_error(["fit", *fast_args(in_tmp_cwd), f"--data.train.root={broken_copy}"], capsys)
    assert mask.name.replace("_mask", "") in err


def test_unknown_category(in_tmp_cwd: Path, capsys: pytest.CaptureFixture[str]) -> None:
    err = _run_expecting_error(["fit", *fast_args(in_tmp_cwd), "--data.train.categories=[fabric,teapot]"], capsys)
    assert "teapot" in err and "fabric" in err


# ---------------------------------------------------------------------------- weights errors
def test_checkpoint_from_another_backbone(in_tmp_cwd: Path, adapters_ckpt: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ckpt = torch.load(adapters_ckpt, map_location="cpu", weights_only=True)
    ckpt["state_dict"] = {k: torch.zeros(v.shape[0] + 8, *v.shape[1:]) if v.ndim == 2 else v for k, v in ckpt["state_dict"].items()}
    ckpt["clipsam"]["clip_model_name"] = "ViT-B-16"
    other = in_tmp_cwd / "other_backbone.ckpt"
    torch.save(ckpt, other)
    before = _tree_digest(in_tmp_cwd)
    err = _run_expecting_error(["test", *fast_args(in_tmp_cwd), "--ckpt_path", str(other)], capsys)
    assert "ViT-B-16" in err and "clipsam-tiny" in err
    assert _tree_digest(in_tmp_cwd).items() >= before.items(), "existing files were changed"


def test_checkpoint_with_other_tapped_layers(in_tmp_cwd: Path, adapters_ckpt: Path, capsys: pytest.CaptureFixture[str]) -> None:
    err = _run_expecting_error(["test", *fast_args(in_tmp_cwd), "--model.clip.layers=[1,2]", "--ckpt_path", str(adapters_ckpt)], capsys)
    assert "adapter" in err.lower()


def test_missing_sam_checkpoint(in_tmp_cwd: Path, adapters_ckpt: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = in_tmp_cwd / "nowhere" / "sam_vit_b_01ec64.pth"
    err = _run_expecting_error(
        [
            "test",
            *fast_args(in_tmp_cwd),
            "--model.sam.variant=vit_b",
            f"--model.sam.checkpoint={missing}",
            "--ckpt_path",
            str(adapters_ckpt),
        ],
        capsys,
    )
    assert str(missing) in err and "model.sam.checkpoint" in err
    assert not (in_tmp_cwd / "runs").exists(), "checked before any run folder exists"


def test_offline_without_cached_clip_weights(in_tmp_cwd: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cache = in_tmp_cwd / "empty_cache"
    err = _run_expecting_error(
        [
            "fit",
            *fast_args(in_tmp_cwd),
            "--model.clip.model_name=ViT-B-16",
            "--model.clip.pretrained=openai",
            "--model.clip.layers=[3,6,9,12]",
            f"--model.clip.cache_dir={cache}",
        ],
        capsys,
    )
    assert "ViT-B-16" in err and "model.clip" in err


# ---------------------------------------------------------------------------- predict outputs
def _predict(in_tmp_cwd: Path, folder: Path, ckpt: Path, *extra: str):
    cli = run_cli(["predict", *fast_args(in_tmp_cwd), f"--data.predict_dir={folder}", "--ckpt_path", str(ckpt), *extra])
    return next(cb for cb in cli.trainer.callbacks if type(cb).__name__ == "PredictionWriter")


def test_predict_never_overwrites_and_skips_non_images(in_tmp_cwd: Path, adapters_ckpt: Path, synth_root: Path) -> None:
    folder = in_tmp_cwd / "my_images"
    shutil.copytree(synth_root / "mvtec" / "capsule" / "test" / "hole", folder)
    (folder / "notes.txt").write_text("not an image")
    (folder / "broken.json").write_text("{}")
    images = sorted(p for p in folder.iterdir() if p.suffix == ".png")

    first = _predict(in_tmp_cwd, folder, adapters_ckpt)
    first_digest = _tree_digest(first.run_dir)
    assert len(list((first.run_dir / "masks").glob("*.png"))) == len(images)
    skipped = (first.run_dir / "skipped.txt").read_text()
    assert "notes.txt" in skipped and "broken.json" in skipped

    second = _predict(in_tmp_cwd, folder, adapters_ckpt)
    assert second.run_dir != first.run_dir, "a second run writes a fresh version directory"
    assert _tree_digest(first.run_dir) == first_digest, "the first run's results were changed"
    assert (folder / "notes.txt").read_text() == "not an image", "input files are never touched"


@pytest.mark.parametrize("size", [(1, 1), (10000, 10000)])
def test_predict_on_tiny_and_huge_images(in_tmp_cwd: Path, adapters_ckpt: Path, size: tuple[int, int]) -> None:
    folder = in_tmp_cwd / f"images_{size[0]}"
    folder.mkdir()
    rng = np.random.default_rng(0)
    if size == (1, 1):
        array = rng.integers(0, 255, (1, 1, 3), dtype=np.uint8)
    else:
        array = np.full((*size, 3), 128, dtype=np.uint8)
        array[4000:4200, 5000:5300] = 20  # a dark blotch
    Image.fromarray(array).save(folder / "image.png")
    writer = _predict(in_tmp_cwd, folder, adapters_ckpt)
    with Image.open(writer.run_dir / "masks" / "image.png") as mask:
        assert mask.size == (size[1], size[0])
    assert (writer.run_dir / "overlays" / "image.png").is_file()


def test_reports_never_overwrite_without_a_versioned_logger(in_tmp_cwd: Path, adapters_ckpt: Path) -> None:
    """With trainer.logger=false each test run still gets its own version_N under
    default_root_dir (reserved by the CLI): the second report never touches the first."""
    args = ["test", *fast_args(in_tmp_cwd), "--trainer.logger=false", "--ckpt_path", str(adapters_ckpt)]
    run_cli(args)
    first = in_tmp_cwd / "runs" / "demo" / "version_0" / "test_results.json"
    before = first.read_bytes()
    run_cli(args)
    assert first.read_bytes() == before
    assert (in_tmp_cwd / "runs" / "demo" / "version_1" / "test_results.json").is_file()
    assert (in_tmp_cwd / "runs" / "demo" / "version_1" / "config.yaml").is_file()


def test_true_half_precision_is_refused_with_the_fast_path_named(in_tmp_cwd: Path, capsys: pytest.CaptureFixture[str]) -> None:
    err = _run_expecting_error(["fit", *fast_args(in_tmp_cwd), "--trainer.precision=bf16-true"], capsys)
    assert "trainer.precision=32-true" in err and "model.method_config.frozen_dtype" in err
