"""clipsam's WinCLIP against anomalib 2.7.0's WinClipModel (zero-shot) on a tiny random CLIP.

Golden file: ``winclip_tiny.pt`` (README section "winclip_tiny.pt"). clipsam runs method
``winclip`` on the file's ViT-B-16-plus-240-shaped architecture through a ``local-dir:`` folder,
with its DEFAULT prompt and input settings (``object_name: raw``: anomalib writes ``metal_nut``
verbatim; ``resize: torch_bicubic``: anomalib's pre-processor) and a 240 frame.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from tests.parity.helpers import (
    check_close,
    check_equal,
    check_weights_loaded,
    file_path_input,
    write_bytes,
    write_local_dir,
)

SOURCE = "winclip_tiny.pt"
FRAME = 240
# README, "Measured agreement and tolerance".
ATOL_EMBEDDING = 1e-5
ATOL_MAP = 2e-6  # scores and maps
ATOL_FILE_PATH = 1e-3  # maps and scores through read_image + build_transform(240)
# Not in the README: clipsam's WinCLIP input (input_specs: torch_bicubic from the original, as
# anomalib's pre-processor) measured 1.4e-6 on the input and 4.8e-7 on the maps.
ATOL_METHOD_INPUT = 1e-5


@pytest.fixture(scope="module")
def gold(golden_file) -> dict[str, Any]:
    return golden_file(SOURCE)


@pytest.fixture(scope="module")
def producer(gold, tmp_path_factory: pytest.TempPathFactory):
    from clipsam.methods import build_producer, method_config

    model_name = write_local_dir(tmp_path_factory.mktemp("winclip_local_dir"), gold["model_cfg"], gold["state_dict"])
    config = method_config(
        "winclip",
        {
            "model_name": model_name,
            "pretrained": None,
            "input_size": 240,
            "scales": [2, 3],
            "temperature": 0.07,
            "use_image_score": True,
            "frozen_dtype": "float32",
        },
    )
    assert (config.object_name, config.resize, config.k_shot) == ("raw", "torch_bicubic", 0), "the defaults are anomalib's"
    return build_producer("winclip", config, image_size=FRAME).eval()


@pytest.fixture(scope="module")
def forwards(gold, producer) -> dict[str, Any]:
    """clipsam's forward pass on the file's ``input``, once per class name."""
    with torch.no_grad():
        return {name: producer(gold["input"], [name] * gold["input"].shape[0]) for name in gold["class_names"]}


def test_weights_and_windows(gold, producer) -> None:
    """The local-dir route loads the file's weights, and clipsam's windows are anomalib's."""
    from clipsam.methods.winclip import window_masks

    check_weights_loaded(SOURCE, producer.clip.state_dict(), gold["state_dict"])
    assert list(producer.grid) == list(gold["grid"]), f"{SOURCE}: patch grid {producer.grid} != {gold['grid']}"
    for kernel, expected in zip(gold["scales"], gold["window_masks"]):
        check_equal(SOURCE, f"window_masks {kernel}x{kernel}", window_masks(producer.grid, kernel), expected)


@pytest.mark.parametrize("class_name", ["bottle", "metal_nut"])
def test_text_embeddings(gold, producer, class_name: str) -> None:
    from clipsam.methods.winclip import build_prompts

    out = gold["outputs"][class_name]
    object_name = producer.object_name(class_name)
    assert object_name == out["object_name"], f"{SOURCE}: object name {object_name!r} != {out['object_name']!r}"
    prompts = build_prompts(object_name)
    counts = [len(prompts["normal"]), len(prompts["anomalous"])]
    assert counts == list(out["n_prompts"]), f"{SOURCE}: prompt counts {counts} != {out['n_prompts']}"
    text = producer.text_embeddings([class_name])[0]
    check_close(SOURCE, f"{class_name}: text_embeddings (t_n, t_a)", text, out["text_embeddings"], ATOL_EMBEDDING)


def test_image_and_window_embeddings(gold, producer) -> None:
    image, windows = producer.encode(gold["input"])
    check_close(SOURCE, "image_embedding", image, gold["image_embedding"], ATOL_EMBEDDING)
    check_close(SOURCE, "window_embeddings_2x2", windows[0], gold["window_embeddings_2x2"], ATOL_EMBEDDING)
    check_close(SOURCE, "window_embeddings_3x3", windows[1], gold["window_embeddings_3x3"], ATOL_EMBEDDING)


@pytest.mark.parametrize("class_name", ["bottle", "metal_nut"])
def test_forward_scores_and_maps(gold, forwards, class_name: str) -> None:
    from clipsam.methods.winclip import fuse_scales

    out = gold["outputs"][class_name]
    result = forwards[class_name]
    check_close(SOURCE, f"{class_name}: image_score (s0)", result.image_scores, out["image_score"], ATOL_MAP)
    check_close(SOURCE, f"{class_name}: scale_maps (M_2, M_3)", result.extras["scale_maps"], out["scale_maps"], ATOL_MAP)
    check_close(SOURCE, f"{class_name}: pixel_map (anomaly_map)", result.anomaly_map, out["pixel_map"], ATOL_MAP)
    scale_maps = result.extras["scale_maps"]
    fused = fuse_scales([scale_maps[:, 0], scale_maps[:, 1]], result.image_scores)
    check_close(SOURCE, f"{class_name}: fused_map (M_2, M_3, s0)", fused, out["fused_map"], ATOL_MAP)


def test_file_path(gold, producer, tmp_path: Path) -> None:
    """PNG bytes -> read_image -> build_transform(240) (PIL bicubic on uint8): close, not bit-level."""
    frames = []
    for name in gold["image_names"]:
        image, _ = file_path_input(write_bytes(tmp_path, f"{name}.png", gold["png"][name]), FRAME)
        frames.append(image)
    images = torch.cat(frames)
    with torch.no_grad():
        for class_name in gold["class_names"]:
            out = gold["outputs"][class_name]
            result = producer(images, [class_name] * images.shape[0])
            check_close(SOURCE, f"file path: {class_name}: image_score", result.image_scores, out["image_score"], ATOL_FILE_PATH)
            check_close(
                SOURCE, f"file path: {class_name}: scale_maps", result.extras["scale_maps"], out["scale_maps"], ATOL_FILE_PATH
            )
            check_close(SOURCE, f"file path: {class_name}: pixel_map", result.anomaly_map, out["pixel_map"], ATOL_FILE_PATH)


def test_method_input_path(gold, producer, tmp_path: Path) -> None:
    """PNG bytes -> read_image -> WinCLIP's own input (``input_specs``: float, antialiased bicubic,
    as anomalib's pre-processor), the input the pipeline feeds it: parity at the ``input`` tolerance."""
    from clipsam.data.samples import read_image
    from clipsam.inputs import build_inputs
    from clipsam.methods import method_inputs

    specs = method_inputs("winclip", producer.config, image_size=FRAME)
    assert [(s.key, s.size, s.resize) for s in specs] == [("method_image", 240, "torch_bicubic")], specs
    images = torch.stack(
        [
            build_inputs(read_image(write_bytes(tmp_path, f"{name}.png", gold["png"][name])), specs)["method_image"]
            for name in gold["image_names"]
        ]
    )
    check_close(SOURCE, "method input path: input", images, gold["input"], ATOL_METHOD_INPUT)
    with torch.no_grad():
        for class_name in gold["class_names"]:
            out = gold["outputs"][class_name]
            result = producer(images, [class_name] * images.shape[0])
            check_close(SOURCE, f"method input path: {class_name}: image_score", result.image_scores, out["image_score"], ATOL_MAP)
            check_close(
                SOURCE, f"method input path: {class_name}: scale_maps", result.extras["scale_maps"], out["scale_maps"], ATOL_MAP
            )
            check_close(SOURCE, f"method input path: {class_name}: pixel_map", result.anomaly_map, out["pixel_map"], ATOL_MAP)
