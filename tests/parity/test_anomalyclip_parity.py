"""clipsam's AnomalyCLIP against zqhang/AnomalyCLIP@45ed4dd (test.py outputs, one train.py step).

Golden file: ``anomalyclip_tiny.pt`` (README section "anomalyclip_tiny.pt"): a tiny random CLIP in
OpenAI layout (24 vision blocks of width 64 and patch 14, 12 text blocks, QuickGELU, one head per
tower), the seeded prompt-learner parameters, the astronaut photo at 518 and an ellipse mask.
clipsam runs method ``anomalyclip`` with configs/methods/anomalyclip_mvtec.yaml's method_config,
only the architecture swapped for a ``local-dir:`` folder, in a 518 frame.
"""

from __future__ import annotations

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

SOURCE = "anomalyclip_tiny.pt"
FRAME = 518
METHOD_YAML = "configs/methods/anomalyclip_mvtec.yaml"
TAPS = (6, 12, 18, 24)
# README, "Measured differences" (suggested tolerances).
ATOL = 1e-5  # text, tokens, global feature, map, score, losses, logits
ATOL_MAP4 = 2e-5
ATOL_GRAD_CTX = 1e-3
REL_GRAD_DEEP = 1e-3  # per deep prompt: max abs diff <= 1e-3 x max abs golden gradient (measured <= 3.5e-4 with deep_prompt_fp16)
ATOL_AFTER_STEP = 1e-6
ATOL_INPUT = 1e-6  # file path: read_image + FrameTransform(518) vs `image` (measured 2.4e-7)

# The README's list of the yaml's method_config values the golden run used.
README_SETTINGS = {
    "input_size": 518,
    "pos_interpolation": "bilinear",
    "n_ctx": 12,
    "deep_prompt_depth": 9,
    "deep_prompt_length": 4,
    "dpam_start": 6,
    "segmentation_layers": [24],
    "deep_prompt_fp16": True,
    "temperature": 0.07,
    "smoothing_sigma": 4.0,
    "map_loss_weight": 4.0,
    "frozen_dtype": "float32",
    "focal_gamma": 2.0,
    "object_word": "object",
    "anomalous_state": "damaged {}",
}


def _deep_name(index: int) -> str:
    return f"compound_prompts_text.{index}"


def _prompt_params(producer) -> dict[str, torch.Tensor]:
    """clipsam's prompt parameters under the reference's names (reference shapes)."""
    prompts = producer.prompts
    out = {"ctx_pos": prompts.ctx_normal[None, None], "ctx_neg": prompts.ctx_anomalous[None, None]}
    out.update({_deep_name(i): p for i, p in enumerate(prompts.deep)})
    return out


def _prompt_grads(producer) -> dict[str, torch.Tensor]:
    prompts = producer.prompts
    out = {"ctx_pos": prompts.ctx_normal.grad[None, None], "ctx_neg": prompts.ctx_anomalous.grad[None, None]}
    out.update({_deep_name(i): p.grad for i, p in enumerate(prompts.deep)})
    return out


@pytest.fixture(scope="module")
def gold(golden_file) -> dict[str, Any]:
    return golden_file(SOURCE)


@pytest.fixture(scope="module")
def full_state_dict(gold) -> dict[str, torch.Tensor]:
    """clip_state_dict plus the rebuilt token embedding (zeros except the 7 rows the prompts use)."""
    state = dict(gold["clip_state_dict"])
    rows = gold["token_embedding_rows"]
    embedding = torch.zeros(gold["architecture"]["vocab_size"], rows.shape[1], dtype=rows.dtype)
    embedding[gold["token_embedding_ids"]] = rows
    state["token_embedding.weight"] = embedding
    return state


@pytest.fixture(scope="module")
def make_producer(gold, full_state_dict, tmp_path_factory: pytest.TempPathFactory) -> Callable[[], Any]:
    """Builds a fresh AnomalyCLIP producer with the golden weights and prompts."""
    from clipsam.methods import build_producer, method_config
    from clipsam.settings import to_plain

    model_name = write_local_dir(
        tmp_path_factory.mktemp("anomalyclip_local_dir"), gold["open_clip_config_json"], full_state_dict
    )
    base = yaml_section(METHOD_YAML, "model", "method_config")
    config = method_config("anomalyclip", {**base, "model_name": model_name, "pretrained": None})
    settings = {key: getattr(config, key) for key in README_SETTINGS}
    assert settings == README_SETTINGS, f"{METHOD_YAML} no longer holds the golden run's settings: {settings}"
    run = gold["settings"]  # the reference run's own values
    pairs = {
        "input_size / image_size": (config.input_size, run["image_size"]),
        "segmentation_layers / features_list (test.sh)": (config.segmentation_layers, list(run["features_list_test_sh"])),
        "smoothing_sigma / sigma": (config.smoothing_sigma, run["sigma"]),
        "temperature": (config.temperature, run["temperature"]),
        "map_loss_weight / lambda": (config.map_loss_weight, run["lambda"]),
        "n_ctx": (config.n_ctx, run["n_ctx"]),
        "deep_prompt_depth / depth": (config.deep_prompt_depth, run["depth"]),
        "deep_prompt_length / t_n_ctx": (config.deep_prompt_length, run["t_n_ctx"]),
    }
    differing = {key: value for key, value in pairs.items() if value[0] != value[1]}
    assert not differing, f"{SOURCE}: clipsam settings differ from the reference run's (clipsam, reference): {differing}"

    def make(**overrides):
        chosen = method_config("anomalyclip", {**to_plain(config), **overrides}) if overrides else config
        producer = build_producer("anomalyclip", chosen, image_size=FRAME)
        init = gold["prompt_init"]
        with torch.no_grad():
            producer.prompts.ctx_normal.copy_(init["ctx_pos"][0, 0])
            producer.prompts.ctx_anomalous.copy_(init["ctx_neg"][0, 0])
            assert len(producer.prompts.deep) == 8, "expected 8 deep prompts (text blocks 2..9)"
            for index, deep in enumerate(producer.prompts.deep):
                deep.copy_(init[_deep_name(index)])
        return producer

    return make


@pytest.fixture(scope="module")
def producer(make_producer):
    return make_producer().eval()


@pytest.fixture(scope="module")
def dpam_taps(gold, producer) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """clipsam's ``dpam_forward(visual, image, 6, L)`` for L = 6, 12, 18, 24."""
    from clipsam.methods.anomalyclip import dpam_forward

    with torch.no_grad():
        return {layer: dpam_forward(producer.visual, gold["image"], 6, layer) for layer in TAPS}


def test_weights_and_tokens(gold, full_state_dict, producer) -> None:
    """The local-dir folder gives the file's weights (the positional embedding is resized to 37 x 37
    bilinearly, so it is checked apart) and clipsam's prompt token ids are the reference's."""
    state = producer.clip.state_dict()
    check_weights_loaded(SOURCE, state, {k: v for k, v in full_state_dict.items() if k != "visual.positional_embedding"})
    pos = state["visual.positional_embedding"]
    assert pos.shape == (1 + 37 * 37, 64), f"{SOURCE}: positional embedding not resized to 37 x 37: {tuple(pos.shape)}"
    check_equal(SOURCE, "positional_embedding class entry", pos[0], full_state_dict["visual.positional_embedding"][0])
    check_equal(SOURCE, "tokenized_prompts", producer.prompts.tokens, gold["tokenized_prompts"].long())
    assert type(producer.clip.transformer.resblocks[0].mlp.gelu).__name__ == "QuickGELU", f"{SOURCE}: QuickGELU expected"


def test_text_features(gold, producer) -> None:
    with torch.no_grad():
        text = producer.text_features().t()
    check_close(SOURCE, "text_features", text, gold["text_features"], ATOL)


def test_patch_tokens_and_global_feature(gold, dpam_taps) -> None:
    for index, layer in enumerate(TAPS):
        check_close(SOURCE, f"patch_tokens L{layer}", dpam_taps[layer][0], gold["patch_tokens"][:, index], ATOL)
    check_close(SOURCE, "image_feature_raw", dpam_taps[24][1], gold["image_feature_raw"], ATOL)


def test_forward_map_and_score(gold, producer) -> None:
    with torch.no_grad():
        out = producer(gold["image"], ["bottle"])
    check_close(SOURCE, "map_raw (extras probs[:, 1])", out.extras["probs"][:, 1], gold["map_raw"], ATOL)
    check_close(SOURCE, "map (anomaly_map)", out.anomaly_map, gold["map"], ATOL)
    check_close(SOURCE, "image_score", out.image_scores, gold["image_score"], ATOL)


def test_map4_python_default_layers(gold, make_producer) -> None:
    """test.py's Python default features_list [6, 12, 18, 24], run by clipsam itself with
    ``segmentation_layers: [6, 12, 18, 24]``: the four layer maps summed (map4_raw), then the
    Gaussian (map4, the reference's raw scale; clipsam's anomaly_map is it divided by 4)."""
    producer = make_producer(segmentation_layers=list(TAPS)).eval()
    with torch.no_grad():
        out = producer(gold["image"], ["bottle"])
    check_close(SOURCE, "map4_raw (layer_probs summed)", out.extras["layer_probs"][:, :, 1].sum(1), gold["map4_raw"], ATOL_MAP4)
    check_close(SOURCE, "map4 (extras raw_map)", out.extras["raw_map"], gold["map4"], ATOL_MAP4)
    check_close(SOURCE, "map4 / 4 (anomaly_map)", out.anomaly_map, gold["map4"] / 4, ATOL_MAP4)
    check_close(SOURCE, "image_score (features_list [6, 12, 18, 24])", out.image_scores, gold["image_score"], ATOL)


def test_file_path(gold, producer, tmp_path: Path) -> None:
    """PNG bytes -> read_image / read_mask -> FrameTransform(518) reproduces `image` and `mask`."""
    image, mask = file_path_input(
        write_bytes(tmp_path, "astronaut.png", gold["image_png"]), FRAME, write_bytes(tmp_path, "mask.png", gold["mask_png"])
    )
    check_close(SOURCE, "file path: image", image, gold["image"], ATOL_INPUT)
    check_equal(SOURCE, "file path: mask", mask, gold["mask"])
    with torch.no_grad():
        out = producer(image, ["bottle"])
    check_close(SOURCE, "file path: map_raw", out.extras["probs"][:, 1], gold["map_raw"], ATOL)
    check_close(SOURCE, "file path: map", out.anomaly_map, gold["map"], ATOL)
    check_close(SOURCE, "file path: image_score", out.image_scores, gold["image_score"], ATOL)


def test_one_training_step(gold, make_producer) -> None:
    """train.py's step: batch [image, mirrored], labels [1, 0], masks [mask, zeros]; Adam lr 1e-3
    betas (0.5, 0.999) over the prompts, as configure_optimizers builds it from the yaml."""
    from clipsam.losses import dice_loss
    from clipsam.model_config import OptimizerConfig

    producer = make_producer().train()
    optimizer_config = OptimizerConfig(**yaml_section(METHOD_YAML, "model", "optimizer"))
    adam = (optimizer_config.lr, tuple(optimizer_config.betas), optimizer_config.weight_decay)
    expected = (gold["settings"]["adam_lr"], tuple(gold["settings"]["adam_betas"]), 0.0)
    assert adam == expected, f"{METHOD_YAML}: optimizer {adam} is not the golden run's {expected}"
    params = [p for p in producer.parameters() if p.requires_grad]
    assert len(params) == 10, f"expected the 10 prompt tensors to be trainable, got {len(params)}"
    optimizer = torch.optim.Adam(params, lr=adam[0], betas=adam[1], weight_decay=adam[2])

    image = gold["image"]
    images = torch.cat([image, image.flip(-1)])
    masks = torch.stack([gold["mask"][0].float(), torch.zeros(FRAME, FRAME)])
    batch = {"image": images, "mask": masks, "label": gold["train_labels"], "category": ["bottle", "bottle"]}
    optimizer.zero_grad()
    out = producer(images, batch["category"])
    losses = producer.loss(out, batch)
    losses["loss"].backward()

    probs = out.extras["probs"].detach()
    gt = (masks > 0.5).float()
    check_close(SOURCE, "train_loss_focal", losses["focal"], gold["train_loss_focal"], ATOL)
    check_close(SOURCE, "train dice_a + dice_n", losses["dice"], gold["train_loss_dice_anomalous"] + gold["train_loss_dice_normal"], ATOL)
    check_close(SOURCE, "train_loss_dice_anomalous (dice_loss)", dice_loss(probs[:, 1], gt), gold["train_loss_dice_anomalous"], ATOL)
    check_close(SOURCE, "train_loss_dice_normal (dice_loss)", dice_loss(probs[:, 0], 1.0 - gt), gold["train_loss_dice_normal"], ATOL)
    check_close(SOURCE, "train_loss_map", 4.0 * (losses["focal"] + losses["dice"]), gold["train_loss_map"], ATOL)
    check_close(SOURCE, "train_loss_image_ce", losses["image_ce"], gold["train_loss_image_ce"], ATOL)
    check_close(SOURCE, "train_loss_total", losses["loss"].detach(), gold["train_loss_total"], ATOL)
    check_close(SOURCE, "train_image_logits", out.extras["image_logits"], gold["train_image_logits"], ATOL)

    grads = _prompt_grads(producer)
    for name in ("ctx_pos", "ctx_neg"):
        check_close(SOURCE, f"train_grads {name}", grads[name], gold["train_grads"][name], ATOL_GRAD_CTX)
    for index in range(8):
        name = _deep_name(index)
        expected = gold["train_grads"][name]
        bound = REL_GRAD_DEEP * float(expected.abs().max())
        check_close(SOURCE, f"train_grads {name} (1e-3 x max |grad|)", grads[name], expected, bound)

    optimizer.step()
    for name, value in _prompt_params(producer).items():
        check_close(SOURCE, f"train_params_after_step {name}", value, gold["train_params_after_step"][name], ATOL_AFTER_STEP)
