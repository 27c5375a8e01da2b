"""clipsam's SDP and SDP+ against ByChelsea/CLIP-AD@f004973 (test.py, test_ft.py, util/metrics.py,
one train.py step).

Golden file: ``sdp_tiny.pt`` (README section "sdp_tiny.pt"): a tiny random CLIP shaped like
ViT-B-16-plus-240 (12 vision blocks of width 64 with 4 heads, patch 16, a 15 x 15 grid), SDP+'s
linear layers and the astronaut photo at 240. clipsam runs methods ``sdp`` / ``sdp_plus`` with
configs/methods/sdp_mvtec.yaml / sdp_plus_mvtec.yaml as the base and the README's values
(MVTec DBSCAN 0.5 / 15, sigma 8, ``reference_aliasing: true``, ``seed: 1``), in a 240 frame.

Text: the reference casts each DBSCAN class vector to float16 and normalises it in float16;
clipsam's profile does the same (``text_fp16: true``), so its own class vectors are checked
against the reference's ``text_features`` and the whole default computation (clipsam's own text,
nothing injected) against the reference's maps and scores. The step-by-step checks put the
reference's ``text_features`` into clipsam's per-object text cache ("ref text"), as the README's
tolerances assume; ``text_fp16: false`` gives the float32 cluster mean, normalised.
"""

from __future__ import annotations

import json
import math
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

SOURCE = "sdp_tiny.pt"
FRAME = 240
OBJECT = "bottle"
SDP_YAML = "configs/methods/sdp_mvtec.yaml"
PLUS_YAML = "configs/methods/sdp_plus_mvtec.yaml"
BASE_YAML = "configs/mvtec.yaml"
# README, "Measured differences" (suggested tolerances, "ref text" column).
ATOL_TEXT = 1e-6  # clipsam's own class vectors vs the normalised float32 cluster mean
ATOL_TOKENS = 1e-5
ATOL_SDP_MAP = 1e-6
ATOL_SCORE = 5e-6
ATOL_PLUS_LOGITS = 2e-4
ATOL_PLUS_MAP = 5e-5
ATOL_LOSS = 1e-5
ATOL_GRAD = 1e-5
ATOL_AFTER_STEP = 1e-6
ATOL_INPUT = 1e-6  # file path at 240 (measured 2.4e-7; the same reader and resize as april_gan_tiny.pt)

README_SETTINGS = {
    "input_size": 240,
    "layers": [3, 6, 9, 12],
    "stage_starts": None,
    "dbscan_eps": 0.5,
    "dbscan_min_samples": 15,
    "smoothing_sigma": 8.0,
    "image_score": "category_minmax",
    "text_logit_scale": 100.0,
    "object_name": "raw",
    "reference_aliasing": True,
    "text_fp16": True,
    "frozen_dtype": "float32",
    "seed": 1,
}
README_PLUS_SETTINGS = {"logit_scale": 100.0, "focal_gamma": 2.0}
# Settings the shipped configs (and the method's defaults) must already hold: not overridden here.
PROFILE_KEYS = ("reference_aliasing", "text_fp16", "image_score", "object_name", "layers", "input_size")


def _linear_name(reference_name: str) -> str:
    """``fc.<i>.<param>`` (CLIP-AD) -> ``<i>.<param>`` of ``SdpPlus.linears``."""
    return reference_name.removeprefix("fc.")


def use_text(producer, text: torch.Tensor) -> None:
    """Put (D, 2) class vectors into the producer's per-object text cache for ``bottle``."""
    producer.__dict__.setdefault("_text_cache", {})[OBJECT] = text.clone()


@pytest.fixture(scope="module")
def gold(golden_file) -> dict[str, Any]:
    return golden_file(SOURCE)


@pytest.fixture(scope="module")
def make_producer(gold, tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Any]:
    """``make_producer("sdp" | "sdp_plus")``: a fresh producer with the golden weights."""
    from clipsam.methods import build_producer, method_config

    model_name = write_local_dir(tmp_path_factory.mktemp("sdp_local_dir"), json.loads(gold["model_cfg_json"]), gold["state_dict"])

    def make(method: str):
        base = yaml_section(SDP_YAML if method == "sdp" else PLUS_YAML, "model", "method_config")
        overrides = {key: value for key, value in README_SETTINGS.items() if key not in PROFILE_KEYS}
        expected = dict(README_SETTINGS)
        if method == "sdp_plus":
            overrides.update(README_PLUS_SETTINGS)
            expected.update(README_PLUS_SETTINGS)
        config = method_config(method, {**base, **overrides, "model_name": model_name, "pretrained": None})
        settings = {key: getattr(config, key) for key in expected}
        assert settings == expected, f"{method}: settings differ from the golden run's: {settings}"
        return build_producer(method, config, image_size=FRAME)

    return make


@pytest.fixture(scope="module")
def sdp(make_producer):
    return make_producer("sdp").eval()


@pytest.fixture(scope="module")
def plus(make_producer):
    return make_producer("sdp_plus").eval()


@pytest.fixture(scope="module")
def ref_text(gold) -> torch.Tensor:
    """The reference's float16-rounded class vectors (D, 2)."""
    return gold["text_features"].float()


@pytest.fixture(scope="module")
def own_text(sdp) -> torch.Tensor:
    """clipsam's own DBSCAN class vectors (D, 2), computed once with an empty text cache."""
    sdp.__dict__.setdefault("_text_cache", {}).clear()
    with torch.no_grad():
        return sdp.text_features([OBJECT])[0].clone()


@pytest.fixture(scope="module")
def features(gold, sdp) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """clipsam's taps on ``input``: (surgery, original)."""
    return sdp._features(gold["input"])


def test_weights_stages_and_linear_init(gold, sdp, plus) -> None:
    check_weights_loaded(SOURCE, sdp.clip.state_dict(), gold["state_dict"])
    assert sdp.stage_starts == [1, 4, 7, 10], f"{SOURCE}: stage starts {sdp.stage_starts} != [1, 4, 7, 10]"
    assert list(sdp.config.layers) == gold["features_list"].tolist()
    state = plus.linears.state_dict()
    assert sorted(state) == sorted(_linear_name(k) for k in gold["linear_init"]), sorted(state)
    for name, value in gold["linear_init"].items():
        check_equal(SOURCE, f"linear_init {name} (seed 1)", state[_linear_name(name)], value)


def test_dbscan_labels_and_own_text(gold, sdp, own_text, make_producer) -> None:
    """clipsam's prompt embeddings cluster as the reference's; its class vectors are the
    reference's float16 ones (``text_fp16``, the default), or with ``text_fp16: false`` the
    float32 cluster means, normalised."""
    from sklearn.cluster import DBSCAN

    from clipsam.methods._openclip import encode_sentences
    from clipsam.methods.sdp import build_prompts

    prompts = build_prompts(OBJECT)
    assert (len(prompts["normal"]), len(prompts["anomalous"])) == (198, 220)
    for key, golden_key in (("normal", "dbscan_labels_normal"), ("anomalous", "dbscan_labels_anomalous")):
        emb = F.normalize(encode_sentences(sdp.clip, sdp.tokenizer, prompts[key], torch.device("cpu")), dim=-1)
        labels = DBSCAN(eps=gold["dbscan_eps"], min_samples=gold["dbscan_min_samples"]).fit(emb.numpy()).labels_
        check_equal(SOURCE, f"{golden_key} (sklearn on clipsam's embeddings)", torch.as_tensor(labels).long(), gold[golden_key])
    check_close(SOURCE, "own text (text_fp16) vs text_features", own_text, gold["text_features"], ATOL_TEXT)
    float32 = make_producer("sdp")
    float32.config.text_fp16 = False
    with torch.no_grad():
        unrounded = float32.text_features([OBJECT])[0]
    check_close(SOURCE, "own text (text_fp16 false) vs normalised text_cluster_mean", unrounded, F.normalize(gold["text_cluster_mean"], dim=0), ATOL_TEXT)


def test_default_profile_with_own_text(gold, make_producer) -> None:
    """The shipped profile end to end, clipsam's own text (nothing injected): SDP and SDP+ maps
    and raw scores at the "ref text" tolerances (5bcc1b0's defaults: SDP+ map 0.074 apart)."""
    for name, map_key, atol in (("sdp", "sdp", ATOL_SDP_MAP), ("sdp_plus", "plus", ATOL_PLUS_MAP)):
        producer = make_producer(name).eval()
        with torch.no_grad():
            out = producer(gold["input"], [OBJECT])
        check_close(SOURCE, f"{map_key}_map (own text, default profile)", out.extras["raw_map"][0], gold[f"{map_key}_map"], atol)
        check_close(SOURCE, f"{map_key}_text_score (own text)", out.extras["image_score_text"][0], gold[f"{map_key}_text_score"], ATOL_SCORE)
        check_close(SOURCE, f"{map_key}_map_max (own text)", out.extras["image_score_map_max"][0], gold[f"{map_key}_map_max"], ATOL_SCORE)


def test_surgery_and_ori_tokens(gold, features) -> None:
    surgery, original = features
    for index, layer in enumerate(gold["features_list"].tolist()):
        check_close(SOURCE, f"surgery_tokens tap {layer}", surgery[index][0], gold["surgery_tokens"][index], ATOL_TOKENS)
        check_close(SOURCE, f"ori_tokens tap {layer} (aliased)", original[index][0], gold["ori_tokens"][index], ATOL_TOKENS)


def test_sdp_maps_and_scores(gold, sdp, features, ref_text) -> None:
    from clipsam.methods.sdp import category_minmax_image_scores

    use_text(sdp, ref_text)
    with torch.no_grad():
        raw, text_score = sdp._surgery_map(features[0], ref_text[None])
        out = sdp(gold["input"], [OBJECT])
    check_close(SOURCE, "sdp_map_unsmoothed (_surgery_map)", raw[0], gold["sdp_map_unsmoothed"], ATOL_SDP_MAP)
    check_close(SOURCE, "sdp_map (extras raw_map)", out.extras["raw_map"][0], gold["sdp_map"], ATOL_SDP_MAP)
    check_close(SOURCE, "sdp_text_score (_surgery_map)", text_score[0], gold["sdp_text_score"], ATOL_SCORE)
    check_close(SOURCE, "sdp_text_score (extras image_score_text)", out.extras["image_score_text"][0], gold["sdp_text_score"], ATOL_SCORE)
    check_close(SOURCE, "sdp_map_max (extras image_score_map_max)", out.extras["image_score_map_max"][0], gold["sdp_map_max"], ATOL_SCORE)
    # util/metrics on a category of one image is 0 / 0 = NaN; clipsam clamps it to 0 (README).
    single = 2 * category_minmax_image_scores(out.extras["image_score_text"], out.extras["image_score_map_max"], [OBJECT])
    assert math.isnan(gold["sdp_image_score_metrics"]), "the reference's single-image score is NaN"
    assert single.tolist() == [0.0], f"{SOURCE}: clipsam's single-image category score {single.tolist()} != [0]"


def test_plus_maps_and_scores(gold, plus, features, ref_text) -> None:
    use_text(plus, ref_text)
    surgery, original = features
    text = ref_text[None]
    with torch.no_grad():
        for index, (linear, tokens) in enumerate(zip(plus.linears, original)):
            logits = plus.config.logit_scale * torch.bmm(F.normalize(linear(tokens[:, 1:]), dim=-1), text)
            check_close(SOURCE, f"plus_layer_logits tap {index}", logits[0], gold["plus_layer_logits"][index], ATOL_PLUS_LOGITS)
        ft_map = plus.layer_probs(original, text)[:, :, 1].sum(1)
        raw, _ = plus._surgery_map(surgery, text)
        out = plus(gold["input"], [OBJECT])
    check_close(SOURCE, "plus_ft_map (layer_probs)", ft_map[0], gold["plus_ft_map"], ATOL_PLUS_MAP)
    check_close(SOURCE, "plus_map_unsmoothed", (raw + ft_map)[0], gold["plus_map_unsmoothed"], ATOL_PLUS_MAP)
    check_close(SOURCE, "plus_map (extras raw_map)", out.extras["raw_map"][0], gold["plus_map"], ATOL_PLUS_MAP)
    check_close(SOURCE, "plus_text_score", out.extras["image_score_text"][0], gold["plus_text_score"], ATOL_SCORE)
    check_close(SOURCE, "plus_map_max", out.extras["image_score_map_max"][0], gold["plus_map_max"], ATOL_SCORE)
    assert math.isnan(gold["plus_image_score_metrics"]), "the reference's single-image score is NaN"


def test_pair_scores(gold, sdp, plus, ref_text, own_text) -> None:
    """A category of two images [input, mirrored] as one batch: the raw scores (ref text) and
    util/metrics' per-category image scores (clipsam's category_minmax x 2; with either text)."""
    from clipsam.methods.sdp import category_minmax_image_scores

    images = torch.cat([gold["input"], gold["input"].flip(-1)])
    categories = [OBJECT, OBJECT]
    for label, text in (("ref text", ref_text), ("own text", own_text)):
        for name, producer in (("sdp", sdp), ("plus", plus)):
            use_text(producer, text)
            with torch.no_grad():
                out = producer(images, categories)
            text_score, map_max = out.extras["image_score_text"], out.extras["image_score_map_max"]
            if label == "ref text":
                check_close(SOURCE, f"pair_{name}_text_score", text_score, gold[f"pair_{name}_text_score"], ATOL_SCORE)
                check_close(SOURCE, f"pair_{name}_map_max", map_max, gold[f"pair_{name}_map_max"], ATOL_SCORE)
            metrics = 2 * category_minmax_image_scores(text_score, map_max, categories)
            check_equal(SOURCE, f"pair_{name}_image_score_metrics ({label})", metrics, gold[f"pair_{name}_image_score_metrics"])


def test_file_path(gold, sdp, plus, ref_text, tmp_path: Path) -> None:
    """PNG bytes -> read_image -> build_transform(240) reproduces `input` (a 240 frame: no resize
    inside the producer), and the maps and scores follow (ref text)."""
    image, _ = file_path_input(write_bytes(tmp_path, "astronaut.png", gold["image_png"]), FRAME)
    check_close(SOURCE, "file path: input", image, gold["input"], ATOL_INPUT)
    use_text(sdp, ref_text)
    use_text(plus, ref_text)
    with torch.no_grad():
        out_sdp = sdp(image, [OBJECT])
        out_plus = plus(image, [OBJECT])
    check_close(SOURCE, "file path: sdp_map", out_sdp.extras["raw_map"][0], gold["sdp_map"], ATOL_SDP_MAP)
    check_close(SOURCE, "file path: sdp_text_score", out_sdp.extras["image_score_text"][0], gold["sdp_text_score"], ATOL_SCORE)
    check_close(SOURCE, "file path: sdp_map_max", out_sdp.extras["image_score_map_max"][0], gold["sdp_map_max"], ATOL_SCORE)
    check_close(SOURCE, "file path: plus_map", out_plus.extras["raw_map"][0], gold["plus_map"], ATOL_PLUS_MAP)
    check_close(SOURCE, "file path: plus_map_max", out_plus.extras["image_score_map_max"][0], gold["plus_map_max"], ATOL_SCORE)


def test_one_training_step(gold, make_producer, ref_text) -> None:
    """train.py's step (ref text): batch [input, mirrored], masks train_masks; Adam lr 1e-4,
    betas (0.9, 0.999) over the linear layers, as the yaml stack sets it."""
    from clipsam.model_config import OptimizerConfig

    producer = make_producer("sdp_plus").train()
    use_text(producer, ref_text)
    optimizer_values = {**yaml_section(BASE_YAML, "model", "optimizer"), **yaml_section(PLUS_YAML, "model", "optimizer")}
    optimizer_config = OptimizerConfig(**optimizer_values)
    adam = (optimizer_config.lr, tuple(optimizer_config.betas), optimizer_config.weight_decay)
    assert adam == (gold["train_lr"], (0.9, 0.999), 0.0), f"{PLUS_YAML}: optimizer {adam} is not the golden run's"
    params = [p for p in producer.parameters() if p.requires_grad]
    assert len(params) == 8, f"expected the 4 linear layers (8 tensors) to be trainable, got {len(params)}"
    optimizer = torch.optim.Adam(params, lr=adam[0], betas=adam[1], weight_decay=adam[2])

    images = torch.cat([gold["input"], gold["input"].flip(-1)])
    batch = {"image": images, "mask": gold["train_masks"].float(), "category": [OBJECT, OBJECT]}
    optimizer.zero_grad()
    out = producer(images, batch["category"])
    losses = producer.loss(out, batch)
    losses["loss"].backward()
    check_close(SOURCE, "train_loss", losses["loss"].detach(), gold["train_loss"], ATOL_LOSS)
    check_close(SOURCE, "train focal (sum over taps)", losses["focal"], gold["train_focal_per_layer"].sum(), ATOL_LOSS)
    check_close(SOURCE, "train dice (sum over taps)", losses["dice"], gold["train_dice_per_layer"].sum(), ATOL_LOSS)

    named = dict(producer.linears.named_parameters())
    for name, expected in gold["train_grads"].items():
        check_close(SOURCE, f"train_grads {name}", named[_linear_name(name)].grad, expected, ATOL_GRAD)
    optimizer.step()
    for name, expected in gold["linear_after_step"].items():
        check_close(SOURCE, f"linear_after_step {name}", named[_linear_name(name)].detach(), expected, ATOL_AFTER_STEP)
