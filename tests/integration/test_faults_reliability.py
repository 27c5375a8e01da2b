"""Fault catalogue, part 2 (issue 9): no silent wrong result, no lost run, no code from a
checkpoint, one clean error for everything a user can fix.

Each test runs the real CLI (in-process, or as a child process where a signal or a second
process is involved) with the tiny demo models; one checkpoint is fitted per module. What the
user sees for each case is listed in docs/usage.md ("What you see when something goes wrong").
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import shutil
import subprocess
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from clipsam.cli import main
from tests.helpers.runs import clipsam_cli, make_odd_synth_root, run_args
from tests.integration.conftest import fast_args, run_cli
from tests.unit.test_reliability import crafted_checkpoint


def _error(args: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    """Run the CLI expecting one `clipsam: error:` line and exit status 2; return the line."""
    code = main(args)
    err = capsys.readouterr().err
    assert code == 2, err[-3000:]
    lines = [line for line in err.splitlines() if line.startswith("clipsam: error: ")]
    assert len(lines) == 1 and "Traceback" not in err, err[-3000:]
    return lines[0]


def _nothing_written(cwd: Path) -> None:
    assert not (cwd / "runs").exists(), f"a run folder was created: {list((cwd / 'runs').rglob('*'))[:5]}"
    assert not (cwd / "predict_out").exists()


@pytest.fixture(scope="module")
def trained(demo_fit_ckpt: Path) -> Path:
    """last.ckpt of one 1-epoch fit (tiny models, 64 px), with optimiser state."""
    return demo_fit_ckpt


# ------------------------------------------------------------------ silent wrong results
def test_evaluation_without_adapters_is_refused(in_tmp_cwd: Path, capsys: pytest.CaptureFixture[str]) -> None:
    for command in ("test", "predict", "validate"):
        line = _error([command, *fast_args(in_tmp_cwd)], capsys)
        assert "--ckpt_path" in line and "--allow_untrained=true" in line, line
    for keyword in ("last", "best"):
        line = _error(["test", *fast_args(in_tmp_cwd), "--ckpt_path", keyword], capsys)
        assert f"--ckpt_path {keyword}" in line and "last.ckpt" in line, line
    _nothing_written(in_tmp_cwd)


def test_results_name_the_checkpoint_and_untrained_runs_say_so(
    in_tmp_cwd: Path, trained: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    blocker = in_tmp_cwd / "cache_is_a_file"
    blocker.write_text("")  # an unusable embedding cache: warn and carry on without it
    # One test category and no overlays keep the two runs short.
    args = [
        *fast_args(in_tmp_cwd),
        f"--model.sam.embedding_cache_dir={blocker}",
        "--data.test.categories=[capsule]",
        "--model.evaluation.num_overlays=0",
    ]
    test = run_cli(["test", *args, "--ckpt_path", str(trained)])
    run_dir = Path(test.trainer.log_dir)
    payload = json.loads((run_dir / "test_results.json").read_text())
    assert payload["checkpoint"] == {
        "path": str(trained),
        "sha256": hashlib.sha256(trained.read_bytes()).hexdigest(),
        "untrained_adapters": False,
    }
    assert not (run_dir / "INCOMPLETE").exists()
    # The W&B run's config got it too (W&B's own log of config updates of the offline run).
    wandb_log = next((in_tmp_cwd / "runs" / "demo" / "wandb").glob("offline-run-*/logs/debug.log"))
    assert f"'sha256': '{payload['checkpoint']['sha256']}'" in wandb_log.read_text()

    untrained = run_cli(["test", *args, "--allow_untrained=true", "--model.evaluation.use_sam=false"])
    payload = json.loads((Path(untrained.trainer.log_dir) / "test_results.json").read_text())
    assert payload["checkpoint"]["untrained_adapters"] is True and payload["checkpoint"]["path"] is None
    assert "UNTRAINED" in capsys.readouterr().out


def test_two_fits_started_together_get_separate_complete_runs(tmp_path: Path) -> None:
    root = make_odd_synth_root(tmp_path, layouts=("mvtec",))
    results: list[subprocess.CompletedProcess[str]] = []

    def fit() -> None:
        results.append(clipsam_cli(["fit", *run_args(tmp_path)], cwd=tmp_path, synth_root=root))

    threads = [threading.Thread(target=fit) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(results) == 2
    runs = sorted((tmp_path / "runs" / "demo").glob("version_*"))
    assert [r.name for r in runs] == ["version_0", "version_1"]
    for run in runs:
        assert sorted(p.name for p in run.iterdir()) == ["checkpoints", "config.yaml", "hparams.yaml", "metrics.csv"]
        assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["epoch=0-step=4.ckpt", "last.ckpt"]
        with (run / "metrics.csv").open() as handle:
            steps = [row["step"] for row in csv.DictReader(handle) if row.get("train/loss")]
        assert steps == ["0", "1", "2", "3"], f"{run}: metrics of one run only, in order"


def test_checkpoints_on_other_frozen_weights_are_refused(
    in_tmp_cwd: Path, trained: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    saved = torch.load(trained, map_location="cpu", weights_only=True)
    saved["clipsam"]["clip_pretrained"] = "laion2b_s32b_b82k"
    other = in_tmp_cwd / "other_weights.ckpt"
    torch.save(saved, other)
    line = _error(["test", *fast_args(in_tmp_cwd), "--ckpt_path", str(other)], capsys)
    assert "laion2b_s32b_b82k" in line and "None" in line and "model.method_config.pretrained" in line  # --model.clip is folded into it (with a note)
    line = _error(["test", *fast_args(in_tmp_cwd), "--model.clip.seed=7", "--ckpt_path", str(trained)], capsys)
    assert "model.method_config.seed=0" in line and "seed is 7" in line
    _nothing_written(in_tmp_cwd)


def test_resume_with_another_lr_trains_with_it_and_records_it(in_tmp_cwd: Path, trained: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = [*fast_args(in_tmp_cwd), "--trainer.max_epochs=2", "--model.optimizer.lr=0.02"]
    fit = run_cli(["fit", *args, "--ckpt_path", str(trained)])
    assert "model.optimizer.lr=0.02 (the checkpoint had 0.001)" in capsys.readouterr().err
    assert fit.trainer.optimizers[0].param_groups[0]["lr"] == 0.02
    resumed = torch.load(fit.trainer.checkpoint_callback.last_model_path, map_location="cpu", weights_only=True)
    assert resumed["optimizer_states"][0]["param_groups"][0]["lr"] == 0.02
    assert resumed["hyper_parameters"]["optimizer"]["lr"] == 0.02 == resumed["clipsam"]["optimizer"]["lr"]


def test_a_requested_category_without_images_is_named(
    in_tmp_cwd: Path, synth_root: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = in_tmp_cwd / "data" / "mvtec"
    shutil.copytree(synth_root / "mvtec", data)
    for image in (data / "hexnut" / "test").rglob("*.png"):
        image.unlink()
    line = _error(["fit", *fast_args(in_tmp_cwd), f"--data.train.root={data}"], capsys)
    assert "'hexnut' has no images" in line
    _nothing_written(in_tmp_cwd)


# ------------------------------------------------------------------ security
def test_a_crafted_checkpoint_never_runs_code(
    in_tmp_cwd: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    marker = in_tmp_cwd / "code_ran"
    evil = crafted_checkpoint(in_tmp_cwd / "evil.ckpt", marker)
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    line = _error(["test", *fast_args(in_tmp_cwd), "--ckpt_path", str(evil)], capsys)
    assert not marker.exists(), "the checkpoint ran code"
    assert str(evil) in line and "weights_only=False" not in line
    _nothing_written(in_tmp_cwd)


# ------------------------------------------------------------------ predict: names, formats, folders, Ctrl+C
def test_predict_long_names_16_bit_symlinks_and_output_inside_input(in_tmp_cwd: Path, trained: Path) -> None:
    folder = in_tmp_cwd / "images"
    folder.mkdir()
    rng = np.random.default_rng(0)
    plain = rng.integers(60, 200, (40, 40, 3), dtype=np.uint8)
    long_name = "n" * 245 + ".png"  # 249 characters: valid, near the 255-byte limit
    Image.fromarray(plain).save(folder / long_name)
    Image.fromarray(np.full((40, 40), 20000, dtype=np.uint16)).save(folder / "sixteen.png")
    elsewhere = in_tmp_cwd / "elsewhere"
    elsewhere.mkdir()
    Image.fromarray(plain).save(elsewhere / "linked_image.png")
    os.symlink(elsewhere, folder / "linked")
    out = folder / "predictions"  # the output folder inside the input folder
    args = ["predict", *fast_args(in_tmp_cwd), f"--data.predict_dir={folder}", f"--model.evaluation.predict_dir={out}", "--ckpt_path", str(trained)]

    counts = []
    for _ in range(2):
        writer = next(cb for cb in run_cli(args).trainer.callbacks if type(cb).__name__ == "PredictionWriter")
        with (writer.run_dir / "predictions.csv").open() as handle:
            rows = {Path(row["path"]).name: row for row in csv.DictReader(handle)}
        counts.append(len(rows))
        assert not (writer.run_dir / "INCOMPLETE").exists()
    assert counts == [3, 3], "outputs are never read back as input; symlinked folders are read"
    run_record = json.loads((writer.run_dir / "run.json").read_text())
    assert run_record["checkpoint"]["sha256"] == hashlib.sha256(trained.read_bytes()).hexdigest()
    assert set(rows) == {long_name, "sixteen.png", "linked_image.png"}
    for row in rows.values():
        assert Path(row["mask"]).is_file() and Path(row["overlay"]).is_file()
        assert len(Path(row["overlay"]).name.encode()) <= 255
    overlay = np.asarray(Image.open(rows["sixteen.png"]["overlay"]))
    assert overlay.mean() < 200, "a 16-bit image (20000 -> 78 of 255) must not turn white"


def test_ctrl_c_during_predict_exits_130_and_marks_the_folder(tmp_path: Path, trained: Path, synth_root: Path) -> None:
    folder = tmp_path / "many"
    folder.mkdir()
    for i, image in enumerate(sorted((synth_root / "mvtec" / "capsule" / "test").rglob("*.png"))[:6]):
        shutil.copy(image, folder / f"{i}.png")
    spec = {"class_path": "tests.helpers.runs.InterruptPredictAt", "init_args": {"batch": 1}}
    proc = clipsam_cli(
        ["predict", *run_args(tmp_path), f"--data.predict_dir={folder}", f"--trainer.callbacks+={json.dumps(spec)}", "--ckpt_path", str(trained)],
        cwd=tmp_path,
        synth_root=synth_root,
        check=False,
    )
    assert proc.returncode == 130, proc.stderr[-3000:]
    run = tmp_path / "predict_out" / "version_0"
    assert "interrupted" in (run / "INCOMPLETE").read_text()
    with (run / "predictions.csv").open() as handle:
        assert len(list(csv.DictReader(handle))) == 3  # the first batch (test_batch_size=3) was written
    # predict has one folder (issue 14): its own version_N holds the marker; no logger run folder.
    assert not list((tmp_path / "runs" / "demo").glob("version_*"))


# ------------------------------------------------------------------ clean errors, nothing written
def test_bad_checkpoint_paths_are_one_line_each(in_tmp_cwd: Path, trained: Path, capsys: pytest.CaptureFixture[str]) -> None:
    empty = in_tmp_cwd / "empty.ckpt"
    empty.write_bytes(b"")
    truncated = in_tmp_cwd / "truncated.ckpt"
    truncated.write_bytes(trained.read_bytes()[: trained.stat().st_size // 2])
    folder = in_tmp_cwd / "a_folder"
    folder.mkdir()
    cases = {
        in_tmp_cwd / "missing.ckpt": "does not exist",
        empty: "empty",
        truncated: "truncated",
        folder: "is a folder",
    }
    for path, words in cases.items():
        line = _error(["test", *fast_args(in_tmp_cwd), "--ckpt_path", str(path)], capsys)
        assert str(path) in line and words in line, line
    _nothing_written(in_tmp_cwd)


def test_parse_time_and_output_folder_errors(
    in_tmp_cwd: Path, trained: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    line = _error(["fit", *fast_args(in_tmp_cwd), "--data.image_size=100"], capsys)
    assert "data.image_size=100" in line and "patch size 16" in line and "96 or 112" in line
    a_file = in_tmp_cwd / "a_file"
    a_file.write_text("mine")
    line = _error(["predict", *fast_args(in_tmp_cwd), f"--model.evaluation.predict_dir={a_file}", "--ckpt_path", str(trained)], capsys)
    assert "model.evaluation.predict_dir" in line and "existing file" in line
    images = in_tmp_cwd / "images"
    images.mkdir()
    line = _error(["predict", *fast_args(in_tmp_cwd), f"--data.predict_dir={images}", f"--model.evaluation.predict_dir={images}", "--ckpt_path", str(trained)], capsys)
    assert "is (or contains) the input folder" in line
    line = _error(["fit", *fast_args(in_tmp_cwd), "--trainer.logger=false", f"--trainer.default_root_dir={a_file}/runs"], capsys)
    assert "trainer.default_root_dir" in line and "existing file" in line
    assert a_file.read_text() == "mine"
    _nothing_written(in_tmp_cwd)

    import pwd

    monkeypatch.delenv("HOME")

    def unknown_user(uid: int):
        raise KeyError(uid)

    monkeypatch.setattr(pwd, "getpwuid", unknown_user)
    line = _error(["fit", *fast_args(in_tmp_cwd), "--data.train.root=~/mvtec"], capsys)
    assert "data.train.root" in line and "HOME is not set" in line


def _mount_tmpfs(target: Path, options: str) -> None:
    target.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(target)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({done.stderr.decode().strip()})")


@pytest.mark.parametrize("kind", ["read-only", "full"])
def test_read_only_and_full_output_disks(
    tmp_path: Path, synth_root: Path, kind: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    disk = tmp_path / "disk"
    if kind == "read-only" and os.geteuid() != 0:
        disk.mkdir()
        disk.chmod(0o555)
    else:
        _mount_tmpfs(disk, "ro,size=256k" if kind == "read-only" else "size=256k")
    try:
        if kind == "full":
            with (disk / "filler").open("wb", buffering=0) as handle, pytest.raises(OSError):
                while True:
                    handle.write(b"\0" * 65536)
        monkeypatch.chdir(disk)
        monkeypatch.setenv("CLIPSAM_SYNTH_ROOT", str(synth_root))
        line = _error(["fit", *fast_args(disk)], capsys)
        expected = "No space left on device" if kind == "full" else ("read-only file system" if os.geteuid() == 0 else "permission denied")
        assert expected in line and str(disk) in line, line
        assert not (disk / "runs").exists()
    finally:
        monkeypatch.chdir(tmp_path)
        if os.path.ismount(disk):
            subprocess.run(["umount", str(disk)], check=False)
        else:
            disk.chmod(0o755)


def test_dataloader_worker_error_is_the_worker_line_and_the_run_is_marked(
    in_tmp_cwd: Path, synth_root: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = in_tmp_cwd / "data" / "mvtec"
    shutil.copytree(synth_root / "mvtec", data)
    victim = sorted((data / "disk" / "test" / "good").glob("*.png"))[0]
    victim.write_bytes(victim.read_bytes()[:-200])  # the header is intact: only decoding fails
    line = _error(
        ["fit", *fast_args(in_tmp_cwd), f"--data.train.root={data}", "--data.train.categories=[disk]", "--data.validation=headers", "--data.num_workers=1"],
        capsys,
    )
    assert str(victim) in line and "DataLoader worker" in line and "Original Traceback" not in line
    markers = list((in_tmp_cwd / "runs" / "demo").glob("version_*/INCOMPLETE"))
    assert markers and "failed" in markers[0].read_text()


def test_synth_arguments_are_checked_before_folders_exist(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    new_root = tmp_path / "synth"
    for bad in (["--image-size", "8"], ["--num-test-good", "-1"]):
        assert main(["data", "synth", "--root", str(new_root), "--no-progress", *bad]) == 2
        assert not new_root.exists()
    a_file = tmp_path / "a_file"
    a_file.write_text("mine")
    assert main(["data", "synth", "--root", str(a_file), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "--image-size 8" in err and "existing file" in err and "Traceback" not in err
    assert a_file.read_text() == "mine"
