"""``clipsam export --format onnx`` + ``clipsam.runtime``: the whole method without torch.

For april_gan+ppg_cps, winclip+ppg_cps and anomalyclip+mmr on generated images: the runtime runs
in a subprocess where importing torch (and OpenCV, Lightning, open_clip, segment_anything, ...)
fails, and its masks and scores equal the PyTorch path's (``clipsam.Segmenter`` with the same
config and weights): IoU >= 0.999 per image, image and pixel scores within 1e-4.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from tests.integration.conftest import DEMO_CONFIG, REPO, fast_args, run_cli

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

SIZE = 224  # the demo frame (at 64 px, upsampled maps hold near-ties that float rounding can reorder)
WINCLIP = str(REPO / "configs" / "methods" / "demo" / "winclip.yaml")
ANOMALYCLIP = str(REPO / "configs" / "methods" / "demo" / "anomalyclip.yaml")
MMR = str(REPO / "configs" / "refiners" / "mmr.yaml")
MUSC = str(REPO / "configs" / "methods" / "demo" / "musc.yaml")
BLOCKED = (
    "torch", "torchvision", "cv2", "lightning", "pytorch_lightning", "open_clip", "segment_anything",
    "albumentations", "scipy", "sklearn", "transformers", "timm", "wandb",
)  # fmt: skip

RUNNER = textwrap.dedent(
    """
    import importlib.abc, json, sys
    BLOCKED = set(sys.argv[1].split(","))

    class Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in BLOCKED:
                raise ImportError(f"{name} is blocked: clipsam.runtime must not import it")
            return None

    sys.meta_path.insert(0, Block())
    import numpy as np
    from clipsam.runtime import Runtime

    bundle, files, categories, out = sys.argv[2], json.loads(sys.argv[3]), json.loads(sys.argv[4]), sys.argv[5]
    rt = Runtime.from_bundle(bundle)
    results = rt.segment_batch(files[:3], category=categories[:3]) + rt.segment_batch(files[3:], category=categories[3:])
    np.savez(out, **{f"mask{i}": r.mask for i, r in enumerate(results)}, **{f"scores{i}": r.scores for i, r in enumerate(results)},
             image_scores=np.asarray([r.image_score for r in results]), labels=np.asarray([r.label for r in results]))
    loaded = sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED)
    print(json.dumps({"loaded": loaded, "categories": [r.category for r in results]}))
    """
)


def _images(synth_root: Path) -> tuple[list[str], list[str]]:
    files, categories = [], []
    for category in ("stripes", "mesh", "capsule"):
        found = sorted((synth_root / "visa" / category / "Data" / "Images").rglob("*.*"))
        files += [str(p) for p in found[:2] + found[-1:]]
        categories += [category] * 3
    return files, categories


@pytest.fixture(scope="module")
def anomalyclip_ckpt(tmp_path_factory: pytest.TempPathFactory, synth_root: Path) -> Path:
    work = tmp_path_factory.mktemp("anomalyclip_fit")
    old = Path.cwd()
    os.environ["CLIPSAM_SYNTH_ROOT"] = str(synth_root)
    os.chdir(work)
    try:
        args = fast_args(work)
        fit = run_cli(["fit", *args[:2], "--config", ANOMALYCLIP, *args[2:], "--trainer.max_steps=2", "--trainer.logger=false"])
        return Path(fit.trainer.checkpoint_callback.last_model_path).resolve()
    finally:
        os.chdir(old)


def _export(out: Path, configs: list[str], ckpt: Path | None, overrides: dict[str, object]) -> dict:
    from clipsam.export import export_onnx

    return export_onnx(ckpt, configs, out, overrides={"data.image_size": SIZE, **overrides})


def _segmenter(configs: list[str], ckpt: Path | None, overrides: dict[str, object]):
    from clipsam import Segmenter

    return Segmenter.from_config(configs, ckpt, overrides={"data.image_size": SIZE, **overrides})


@pytest.mark.parametrize("pair", ["april_gan+ppg_cps", "winclip+ppg_cps", "anomalyclip+mmr"])
def test_runtime_without_torch_equals_the_pytorch_path(
    pair: str, tmp_path: Path, synth_root: Path, demo_fit_ckpt: Path, request: pytest.FixtureRequest
) -> None:
    os.environ["CLIPSAM_SYNTH_ROOT"] = str(synth_root)
    cache = {"model.refiner_config.sam.embedding_cache_dir": None}
    if pair == "april_gan+ppg_cps":
        configs, ckpt, overrides = [DEMO_CONFIG], demo_fit_ckpt, dict(cache)
    elif pair == "winclip+ppg_cps":
        configs, ckpt, overrides = [DEMO_CONFIG, WINCLIP], None, {"model.refiner": "ppg_cps", **cache}
    else:
        configs, ckpt, overrides = [DEMO_CONFIG, ANOMALYCLIP, MMR], request.getfixturevalue("anomalyclip_ckpt"), {}
    bundle = tmp_path / "bundle"
    manifest = _export(bundle, configs, ckpt, overrides)
    assert f"{manifest['method']}+{manifest['refiner']}" == pair
    assert set(manifest["files"]) >= {"producer.onnx", "sam_encoder.onnx", "sam_decoder.onnx", "image_score.onnx"}
    assert all(diff < 1e-4 for diff in manifest["check"]["max_abs_diff"].values()), manifest["check"]

    files, categories = _images(synth_root)
    out = tmp_path / "runtime.npz"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run(
        [sys.executable, "-c", RUNNER, ",".join(BLOCKED), str(bundle), json.dumps(files), json.dumps(categories), str(out)],
        capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["loaded"] == [] and report["categories"] == categories
    got = np.load(out)

    segmenter = _segmenter(configs, ckpt, overrides)
    want = [segmenter.segment(f, category=c) for f, c in zip(files, categories)]
    masks_seen = 0
    for i, ref in enumerate(want):
        mask = got[f"mask{i}"]
        assert mask.shape == ref.mask.shape
        union = int((mask | ref.mask).sum())
        iou = 1.0 if union == 0 else int((mask & ref.mask).sum()) / union
        assert iou >= 0.999, (files[i], iou)
        masks_seen += int(ref.mask.any())
        np.testing.assert_allclose(got[f"scores{i}"], ref.scores, atol=1e-4)
        assert abs(float(got["image_scores"][i]) - ref.image_score) <= 1e-4
        assert bool(got["labels"][i]) == ref.label
    assert masks_seen > 0  # the comparison saw non-empty masks


def test_bundle_metadata_and_tampering(tmp_path: Path, synth_root: Path, demo_fit_ckpt: Path) -> None:
    from clipsam.errors import WeightsError
    from clipsam.runtime import Runtime

    os.environ["CLIPSAM_SYNTH_ROOT"] = str(synth_root)
    bundle = tmp_path / "bundle"
    manifest = _export(bundle, [DEMO_CONFIG], demo_fit_ckpt, {"model.refiner_config.sam.embedding_cache_dir": None})
    info = json.loads((bundle / "bundle.json").read_text())
    assert info == manifest
    assert info["inputs"]["producer"]["size"] == SIZE and info["inputs"]["sam"]["side"] > 0
    assert set(info["categories"]) == {"stripes", "mesh", "capsule"}  # the demo's test categories
    assert info["categories"]["capsule"]["text"] and info["text_input"]
    assert info["versions"]["torch"] and info["opset"] == 17
    assert info["prompt"]["kind"] == "ppg_cps" and len(info["prompt"]["kernel"]) == info["prompt"]["prompt"]["kernel_size"]
    rt = Runtime.from_bundle(bundle)
    assert rt.categories == ["stripes", "mesh", "capsule"]
    from clipsam.errors import ConfigError

    with pytest.raises(ConfigError, match="not in this bundle"):
        rt.segment(np.zeros((40, 40, 3), np.uint8), category="bottle")
    with open(bundle / "sam_decoder.onnx", "ab") as handle:
        handle.write(b"\0")
    with pytest.raises(WeightsError, match="sam_decoder.onnx changed since export"):
        Runtime.from_bundle(bundle)
    with pytest.raises(ConfigError, match="not an ONNX bundle"):
        Runtime.from_bundle(tmp_path)
    from clipsam import Segmenter

    with pytest.raises(WeightsError, match="is an ONNX bundle"):  # the PyTorch path names the runtime
        Segmenter.from_bundle(bundle)


@pytest.mark.parametrize(
    ("configs", "overrides", "message"),
    [
        ([DEMO_CONFIG, MUSC], {}, "transductive"),
        ([DEMO_CONFIG, WINCLIP], {"model.method_config.k_shot": 1}, "k_shot=1"),
        ([DEMO_CONFIG], {"data.tiling.image_size": 128}, "data.tiling"),
    ],
)
def test_what_cannot_be_exported_is_refused_before_writing(
    tmp_path: Path, synth_root: Path, configs: list[str], overrides: dict, message: str
) -> None:
    from clipsam.errors import ConfigError
    from clipsam.export import export_onnx

    os.environ["CLIPSAM_SYNTH_ROOT"] = str(synth_root)
    out = tmp_path / "bundle"
    with pytest.raises(ConfigError, match=message):
        export_onnx(None, configs, out, overrides={"data.image_size": SIZE, **overrides})
    assert not out.exists()


def test_cli_export_prints_the_checks(tmp_path: Path, synth_root: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from clipsam.cli import main

    os.environ["CLIPSAM_SYNTH_ROOT"] = str(synth_root)
    out = tmp_path / "bundle"
    code = main(
        ["export", "--config", DEMO_CONFIG, "--config", WINCLIP, "--set", f"data.image_size={SIZE}",
         "--format", "onnx", "--output", str(out), "--category", "capsule"]
    )  # fmt: skip
    assert code == 0
    printed = capsys.readouterr().out
    assert "checked producer" in printed and "winclip+none" in printed and "categories: capsule" in printed
    assert json.loads((out / "bundle.json").read_text())["refiner"] == "none"


def test_bundles_carry_the_camera_settings(tmp_path: Path, synth_root: Path) -> None:
    """data.color_order / data.bit_depth travel with both bundle kinds; arguments override them.
    A BGR array then segments as its RGB twin does, with no argument at load."""
    from clipsam import Segmenter
    from clipsam.export import export_bundle
    from clipsam.runtime import Runtime

    os.environ["CLIPSAM_SYNTH_ROOT"] = str(synth_root)
    configs = [DEMO_CONFIG, WINCLIP]
    camera = {"data.color_order": "bgr", "data.bit_depth": 12, "data.image_size": SIZE}
    export_bundle(None, configs, tmp_path / "torch_bundle", overrides=camera)
    segmenter = Segmenter.from_bundle(tmp_path / "torch_bundle")
    assert (segmenter.color_order, segmenter.bit_depth) == ("bgr", 12)
    assert Segmenter.from_bundle(tmp_path / "torch_bundle", color_order="rgb").color_order == "rgb"
    _export(tmp_path / "onnx_bundle", configs, None, camera)
    runtime = Runtime.from_bundle(tmp_path / "onnx_bundle")
    assert (runtime.color_order, runtime.bit_depth) == ("bgr", 12)
    assert Runtime.from_bundle(tmp_path / "onnx_bundle", color_order="rgb", bit_depth=16).bit_depth == 16
    from clipsam.serve.server import load_runtime

    served = load_runtime(tmp_path / "onnx_bundle")  # serve hands the runtime decoded uploads: RGB
    assert (served.color_order, served.bit_depth) == ("rgb", 12)
    from PIL import Image

    rgb = np.asarray(Image.open(_images(synth_root)[0][0]).convert("RGB"))
    as_bgr = runtime.segment(np.ascontiguousarray(rgb[..., ::-1]), category="stripes")
    as_rgb = Runtime.from_bundle(tmp_path / "onnx_bundle", color_order="rgb").segment(rgb, category="stripes")
    np.testing.assert_array_equal(as_bgr.scores, as_rgb.scores)
