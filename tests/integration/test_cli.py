"""End to end through the command line: configs parse, fit -> test -> predict on generated data."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from clipsam.cli import main
from tests.integration.conftest import DEMO_CONFIG, REPO, fast_args, run_cli

# configs/benchmark/ holds grid and suite files (lists of runs), not LightningCLI configs;
# configs/methods/ files stack on a base config like the ablations.
CONFIGS = sorted(
    str(p.relative_to(REPO)) for p in (REPO / "configs").rglob("*.yaml") if "benchmark" not in p.relative_to(REPO).parts
)
BASE_CONFIGS = [c for c in CONFIGS if not c.startswith(("configs/ablations/", "configs/methods/", "configs/refiners/"))]
ABLATIONS = [c for c in CONFIGS if c.startswith("configs/ablations/")]
REFINERS = [c for c in CONFIGS if c.startswith("configs/refiners/")]


@pytest.mark.parametrize("config", BASE_CONFIGS)
def test_every_base_config_prints(config: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(REPO)
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", config, "--print_config"])
    assert exit_info.value.code == 0
    printed = capsys.readouterr().out
    assert "model:" in printed and "data:" in printed and "trainer:" in printed
    if config.endswith("mvtec.yaml"):
        # The paper's settings are named in the resolved config.
        for expected in ("ViT-L-14-336", "openai", "vit_h", "ellipse", "kernel_size: 25", "num_steps: 3", "max_epochs: 3", "lr: 0.001", "batch_size: 16", "image_size: 518"):
            assert expected in printed, expected


@pytest.mark.parametrize("ablation", ABLATIONS)
def test_every_ablation_instantiates_on_a_base_config(ablation: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each ablation stacks on the base config and its key reaches the module (no weights loaded)."""
    monkeypatch.chdir(REPO)
    from clipsam.cli import ClipSamCLI
    from clipsam.data.datamodule import AnomalyDataModule
    from clipsam.module import ClipSamModule

    cli = ClipSamCLI(
        ClipSamModule,
        AnomalyDataModule,
        parser_kwargs={"parser_mode": "omegaconf"},
        auto_configure_optimizers=False,
        args=["--config", "configs/visa.yaml", "--config", ablation],
        run=False,
    )
    module = cli.model
    text = Path(REPO / ablation).read_text()
    if "kernel_shape" in text:
        shape = text.split("kernel_shape:")[1].split()[0]
        size = int(text.split("kernel_size:")[1].split()[0])
        assert module.refiner_config.prompt.kernel_shape == shape
        assert module.refiner_config.prompt.kernel_size == size
    if "num_steps" in text:
        assert module.refiner_config.cascade.num_steps == int(text.split("num_steps:")[1].split()[0])
    if module.refiner_name != "none":  # the ablation changed one key and kept the base config's SAM
        assert module.refiner_config.sam.variant == "vit_h"
    if "refiner: none" in text:
        assert module.refiner_name == "none"
    assert module.clip_model is None, "frozen backbones must not be built at instantiation"


def test_fit_test_predict_end_to_end(in_tmp_cwd: Path, synth_root: Path) -> None:
    args = fast_args(in_tmp_cwd)
    fit = run_cli(["fit", *args])
    ckpt = Path(fit.trainer.checkpoint_callback.last_model_path)
    assert ckpt.is_file()
    saved = torch.load(ckpt, map_location="cpu", weights_only=True)
    assert saved["state_dict"], "adapters missing from the checkpoint"
    assert all(k.startswith("producer.model.adapters.") for k in saved["state_dict"]), "frozen weights leaked into the checkpoint"
    fit_dir = Path(fit.trainer.log_dir)
    assert (fit_dir / "config.yaml").is_file()

    test = run_cli(["test", *args, "--ckpt_path", str(ckpt)])
    test_dir = Path(test.trainer.log_dir)
    assert test_dir != fit_dir, "a test run must get its own version directory"
    metrics = json.loads((test_dir / "test_results.json").read_text())
    per_category = metrics["results"]["per_category"]
    assert sorted(per_category) == ["capsule", "mesh", "stripes"]
    for values in per_category.values():
        assert 0.0 <= values["pixel_auroc"] <= 1.0
        assert values["num_images"] == 2 + 4  # test good + test anomalous of the generated category
    assert (test_dir / "test_results.csv").read_text().startswith("category")
    assert any((test_dir / "overlays").glob("*.png"))
    assert metrics["clip_only"] is not None, "the CLIP-only baseline is reported next to the full method"
    wandb_runs = list((in_tmp_cwd / "runs" / "demo" / "wandb").glob("offline-run-*"))
    assert wandb_runs, "an offline W&B run directory is left behind"
    media = [run / "files" / "media" for run in wandb_runs if (run / "files" / "media").is_dir()]
    assert len(media) == 1, "exactly the test run logs tables and images"
    (table_file,) = (media[0] / "table" / "metrics").glob("per_category*.table.json")
    table = json.loads(table_file.read_text())
    assert [row[0] for row in table["data"]] == ["capsule", "mesh", "stripes", "mean"]
    assert "pixel_auroc" in table["columns"]
    assert len(list((media[0] / "table" / "pr_curve").glob("*.table.json"))) == 3, "one PR curve per category"
    assert list((media[0] / "images").glob("*.png")), "overlay panels are logged as images"

    validate = run_cli(["validate", *args, "--ckpt_path", str(ckpt)])
    validate_results = json.loads((Path(validate.trainer.log_dir) / "validate_results.json").read_text())
    assert validate_results["results"]["mean"] == metrics["results"]["mean"], "validate evaluates data.test like test"

    predict = run_cli(["predict", *args, "--ckpt_path", str(ckpt)])
    writer = next(cb for cb in predict.trainer.callbacks if type(cb).__name__ == "PredictionWriter")
    inputs = sorted(p for p in (synth_root / "mvtec" / "capsule" / "test").rglob("*") if p.is_file())
    masks = sorted((writer.run_dir / "masks").glob("*.png"))
    overlays = sorted((writer.run_dir / "overlays").glob("*.png"))
    assert len(masks) == len(overlays) == len([p for p in inputs if p.suffix.lower() in (".png", ".jpg", ".jpeg")])
    from PIL import Image

    with Image.open(inputs[0]) as original, Image.open(masks[0]) as mask:
        assert mask.size == original.size, "masks are written at the original image size"


def test_missing_dataset_root_is_one_clear_error(in_tmp_cwd: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["fit", *fast_args(in_tmp_cwd), "--data.train.root=/nonexistent/mvtec"])
    err = capsys.readouterr().err
    assert code == 2
    assert "/nonexistent/mvtec" in err and "Traceback" not in err
    assert not (in_tmp_cwd / "runs" / "demo" / "version_0" / "checkpoints").exists()


@pytest.mark.parametrize("script", ["clipsam", "lightning"])
def test_console_scripts_are_the_same_lightningcli(script: str) -> None:
    """`lightning fit --config ...` (the user's habit) and `clipsam fit ...` are one entry point."""
    import subprocess
    import sys

    exe = Path(sys.executable).parent / script
    assert exe.is_file(), f"console script {script} is not installed next to {sys.executable}"
    out = subprocess.run(
        [str(exe), "fit", "--config", "configs/demo.yaml", "--print_config"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    assert "clipsam.module.ClipSamModule" in out.stdout or "clipsam-tiny" in out.stdout


def test_data_synth_subcommand_writes_both_layouts(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = tmp_path / "synth"
    args = ["data", "synth", "--root", str(root), "--image-size", "32", "--categories", "disk", "--no-progress"]
    assert main(args) == 0
    assert (root / "mvtec" / "disk" / "test").is_dir()
    assert (root / "visa" / "split_csv" / "1cls.csv").is_file()
    # a second run refuses to overwrite what is there
    assert main(args) == 2
    assert "clipsam: error:" in capsys.readouterr().err


@pytest.mark.parametrize("refiner", REFINERS)
@pytest.mark.parametrize("method", ["configs/methods/april_gan_visa.yaml", "configs/methods/winclip_visa.yaml", "configs/methods/sdp_visa.yaml"])
def test_every_refiner_config_stacks_on_every_map_producer(refiner: str, method: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """configs/refiners/*.yaml combine with any CLIP-based producer: the refiner and fusion reach the module."""
    import yaml

    monkeypatch.chdir(REPO)
    from clipsam.cli import ClipSamCLI
    from clipsam.data.datamodule import AnomalyDataModule
    from clipsam.module import ClipSamModule

    cli = ClipSamCLI(
        ClipSamModule,
        AnomalyDataModule,
        parser_kwargs={"parser_mode": "omegaconf"},
        auto_configure_optimizers=False,
        args=["--config", "configs/visa.yaml", "--config", method, "--config", refiner],
        run=False,
    )
    expected = yaml.safe_load(Path(REPO / refiner).read_text())["model"]
    method_name = yaml.safe_load(Path(REPO / method).read_text())["model"].get("method", "april_gan")
    assert cli.model.method == method_name
    assert cli.model.refiner_name == expected["refiner"]
    assert cli.model.eval_config.fusion == expected["evaluation"]["fusion"]


METHOD_CONFIGS = sorted(
    c for c in CONFIGS if c.startswith("configs/methods/") and c.count("/") == 2 and c.endswith(("_mvtec.yaml", "_visa.yaml"))
)


@pytest.mark.parametrize("method_config", METHOD_CONFIGS)
def test_every_method_config_instantiates_on_its_base_config(method_config: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """configs/methods/<method>_<direction>.yaml stacks on configs/<direction>.yaml; method, refiner
    and the method's own settings (validated against its config dataclass) reach the module."""
    import yaml

    monkeypatch.chdir(REPO)
    from clipsam.cli import ClipSamCLI
    from clipsam.data.datamodule import AnomalyDataModule
    from clipsam.module import ClipSamModule

    direction = method_config.rsplit("_", 1)[1].removesuffix(".yaml")
    cli = ClipSamCLI(
        ClipSamModule,
        AnomalyDataModule,
        parser_kwargs={"parser_mode": "omegaconf"},
        auto_configure_optimizers=False,
        args=["--config", f"configs/{direction}.yaml", "--config", method_config],
        run=False,
    )
    model = yaml.safe_load(Path(REPO / method_config).read_text())["model"]
    assert cli.model.method == model.get("method", "april_gan")
    assert cli.model.refiner_name == model.get("refiner", "ppg_cps")
    assert cli.model.producer is None, "frozen backbones must not be built at instantiation"
