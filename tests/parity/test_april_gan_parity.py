"""clipsam's APRIL-GAN profile against ByChelsea/VAND-APRIL-GAN@f13b8a6 (test.py, one train.py step).

Golden file: ``april_gan_tiny.pt`` (README section "april_gan_tiny.pt"): a tiny random CLIP
shaped for 518 px (24 vision blocks of width 64 with 4 heads, patch 14; text width 32), its
adapters and the astronaut photo. clipsam runs method ``april_gan`` with configs/mvtec.yaml's and
configs/methods/april_gan_mvtec.yaml's method_config, only the architecture swapped for a
``local-dir:`` folder, ``seed: 1`` (the reference's adapter initialisation), in a 518 frame;
with clipsam's SDPA attention and with open_clip's own (both measured in the README).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from tests.parity.helpers import (
    check_close,
    check_equal,
    check_weights_loaded,
    file_path_input,
    write_bytes,
    write_local_dir,
    yaml_section,
)

SOURCE = "april_gan_tiny.pt"
FRAME = 518
BASE_YAML = "configs/mvtec.yaml"
METHOD_YAML = "configs/methods/april_gan_mvtec.yaml"
# README, "Measured differences" (suggested tolerances).
ATOL_TEXT = 1e-6
ATOL_TOKENS = 2e-5
ATOL_IMAGE_FEATURE = 1e-5
ATOL_LOGITS = 2e-4
ATOL_MAP = 5e-5
ATOL_SCORE = 5e-6
ATOL_INPUT = 1e-6
ATOL_LOSS = 1e-5
ATOL_GRAD = 2e-5
ATOL_AFTER_STEP = 1e-6

README_SETTINGS = {
    "layers": [6, 12, 18, 24],
    "object_name": "raw",
    "upsample": "logits",
    "layer_combine": "sum",
    "smoothing_sigma": 0.0,
    "image_score": "clip_global",
    "frozen_dtype": "float32",
    "quick_gelu": False,
    "logit_scale": 100.0,
    "compile": False,
    "seed": 1,
}


def _clipsam_name(reference_name: str) -> str:
    """``fc.<i>.<param>`` (APRIL-GAN) -> ``model.adapters.<i>.<param>`` (clipsam's trainable state)."""
    return "model.adapters." + reference_name.removeprefix("fc.")


@pytest.fixture(scope="module")
def gold(golden_file) -> dict[str, Any]:
    return golden_file(SOURCE)


@pytest.fixture(scope="module")
def make_producer(gold, tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Any]:
    """``make_producer(sdpa_attention=True)``: a fresh APRIL-GAN producer with the golden weights."""
    from clipsam.methods import build_producer, method_config

    model_name = write_local_dir(
        tmp_path_factory.mktemp("april_gan_local_dir"), json.loads(gold["model_cfg_json"]), gold["state_dict"]
    )
    base = {**yaml_section(BASE_YAML, "model", "method_config"), **yaml_section(METHOD_YAML, "model", "method_config")}

    def make(sdpa_attention: bool = True):
        values = {**base, "model_name": model_name, "pretrained": None, "seed": 1, "sdpa_attention": sdpa_attention}
        config = method_config("april_gan", values)
        settings = {key: getattr(config, key) for key in README_SETTINGS}
        assert settings == README_SETTINGS, f"{BASE_YAML} + {METHOD_YAML} no longer hold the golden run's settings: {settings}"
        return build_producer("april_gan", config, image_size=FRAME)

    return make


@pytest.fixture(scope="module")
def sdpa_producer(make_producer):
    """The producer with clipsam's default SDPA attention (never trained here)."""
    return make_producer(sdpa_attention=True).eval()


@pytest.fixture(scope="module", params=[True, False], ids=["sdpa", "open_clip_attention"])
def producer(request, make_producer):
    if request.param:
        return request.getfixturevalue("sdpa_producer")
    return make_producer(sdpa_attention=False).eval()


def test_weights_and_adapter_init(gold, sdpa_producer) -> None:
    """The local-dir folder gives the file's weights; ``seed: 1`` gives the reference's adapters."""
    producer = sdpa_producer
    check_weights_loaded(SOURCE, producer.model.clip.state_dict(), gold["state_dict"])
    state = producer.trainable_state_dict()
    assert sorted(state) == sorted(_clipsam_name(k) for k in gold["adapters_init"]), sorted(state)
    for name, value in gold["adapters_init"].items():
        check_equal(SOURCE, f"adapters_init {name} (seed 1)", state[_clipsam_name(name)], value)


def test_text_features(gold, producer) -> None:
    check_close(SOURCE, "text_features", producer.model.text_features(["bottle"])[0], gold["text_features"], ATOL_TEXT)


def test_tokens_image_feature_and_layer_logits(gold, producer, request) -> None:
    variant = request.node.callspec.id
    with torch.no_grad():
        tokens, pooled = producer.model.encode_image(gold["input"], with_global=True)
        text = producer.model.text_features(["bottle"])  # (1, D, 2)
        for index, layer in enumerate(gold["features_list"].tolist()):
            check_close(SOURCE, f"[{variant}] tokens tap {layer} (patches)", tokens[index][0], gold["tokens"][index, 1:], ATOL_TOKENS)
            feats = F.normalize(producer.model.adapters[index](tokens[index]), dim=-1)
            logits = producer.config.logit_scale * torch.bmm(feats, text)
            check_close(SOURCE, f"[{variant}] layer_logits tap {layer}", logits[0], gold["layer_logits"][index], ATOL_LOGITS)
    check_close(SOURCE, f"[{variant}] image_features_raw", pooled, gold["image_features_raw"], ATOL_IMAGE_FEATURE)


def test_forward_map_and_score(gold, producer, request) -> None:
    variant = request.node.callspec.id
    with torch.no_grad():
        out = producer(gold["input"], [gold["object_name"]])
    check_close(SOURCE, f"[{variant}] anomaly_map", out.anomaly_map[0], gold["anomaly_map"], ATOL_MAP)
    check_close(SOURCE, f"[{variant}] image_score", out.image_scores[0], gold["image_score"], ATOL_SCORE)


def test_file_path(gold, producer, tmp_path: Path, request) -> None:
    """PNG bytes -> read_image -> build_transform(518) reproduces `input`, and the outputs follow."""
    variant = request.node.callspec.id
    image, _ = file_path_input(write_bytes(tmp_path, "astronaut.png", gold["image_png"]), FRAME)
    check_close(SOURCE, "file path: input", image, gold["input"], ATOL_INPUT)
    with torch.no_grad():
        out = producer(image, [gold["object_name"]])
    check_close(SOURCE, f"[{variant}] file path: anomaly_map", out.anomaly_map[0], gold["anomaly_map"], ATOL_MAP)
    check_close(SOURCE, f"[{variant}] file path: image_score", out.image_scores[0], gold["image_score"], ATOL_SCORE)


def test_one_training_step(gold, make_producer) -> None:
    """train.py's step: batch [input, mirrored], masks train_masks; Adam over the adapters with the
    yaml's optimizer (lr 1e-3, betas (0.5, 0.999)), as configure_optimizers builds it."""
    from clipsam.model_config import OptimizerConfig

    producer = make_producer().train()
    producer.load_trainable_state_dict({_clipsam_name(k): v for k, v in gold["adapters_init"].items()})
    optimizer_values = {**yaml_section(BASE_YAML, "model", "optimizer"), **yaml_section(METHOD_YAML, "model", "optimizer")}
    optimizer_config = OptimizerConfig(**optimizer_values)
    adam = (optimizer_config.lr, tuple(optimizer_config.betas), optimizer_config.weight_decay)
    assert adam == (1e-3, (0.5, 0.999), 0.0), f"{BASE_YAML} + {METHOD_YAML}: optimizer {adam} is not the golden run's"
    params = [p for p in producer.parameters() if p.requires_grad]
    assert len(params) == 8, f"expected the 4 adapters (8 tensors) to be trainable, got {len(params)}"
    optimizer = torch.optim.Adam(params, lr=adam[0], betas=adam[1], weight_decay=adam[2])

    images = torch.cat([gold["input"], gold["input"].flip(-1)])
    batch = {"image": images, "mask": gold["train_masks"].float(), "category": [gold["object_name"]] * 2}
    optimizer.zero_grad()
    out = producer(images, batch["category"])
    losses = producer.loss(out, batch)
    losses["loss"].backward()
    check_close(SOURCE, "train_loss", losses["loss"].detach(), gold["train_loss"], ATOL_LOSS)
    check_close(SOURCE, "train focal (sum over taps)", losses["focal"].detach(), gold["train_focal_per_layer"].sum(), ATOL_LOSS)
    check_close(SOURCE, "train dice (sum over taps)", losses["dice"].detach(), gold["train_dice_per_layer"].sum(), ATOL_LOSS)

    named = dict(producer.named_parameters())
    for name, expected in gold["train_grads"].items():
        check_close(SOURCE, f"train_grads {name}", named[_clipsam_name(name)].grad, expected, ATOL_GRAD)
    optimizer.step()
    for name, expected in gold["adapters_after_step"].items():
        check_close(SOURCE, f"adapters_after_step {name}", named[_clipsam_name(name)].detach(), expected, ATOL_AFTER_STEP)
