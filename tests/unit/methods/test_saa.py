"""SAA / SAA+ (clipsam.methods.saa): the pipeline's steps on hand-built inputs, then end to end with tiny models."""

from __future__ import annotations

import json
import math

import cv2
import pytest
import torch

from clipsam.methods import saa
from clipsam.methods.saa import (
    SaaConfig,
    boxes_to_pixels,
    category_properties,
    cross_object_saliency,
    filter_boxes,
    merge_masks,
    rescore,
    self_similarity_saliency,
)
from clipsam.errors import ConfigError

WORDS = {10: "black", 11: "hole", 12: "carpet", 13: "."}


def _decode(ids):
    return " ".join(WORDS[i] for i in ids)


def test_filter_boxes_by_score_area_and_phrase():
    # caption "[CLS] black hole . carpet [SEP]" -> ids; T = 8 positions (last two padded: prob 0)
    ids = [101, 10, 11, 13, 12, 102]
    probs = torch.zeros(5, 8)
    probs[0, [0, 1, 2]] = torch.tensor([0.9, 0.4, 0.3])  # phrase "black hole" (position 0 is skipped)
    probs[1, 4] = 0.5  # phrase "carpet": dropped by the filter word
    probs[2, 1] = 0.09  # best probability 0.09 <= 0.1: dropped
    probs[3, 2] = 0.6  # too large: area 0.25 is not < 0.25
    probs[4, [1, 2]] = torch.tensor([0.05, 0.2])  # phrase "hole" only (0.05 <= text threshold)
    boxes = torch.tensor(
        [[0.5, 0.5, 0.2, 0.2], [0.3, 0.3, 0.1, 0.1], [0.5, 0.5, 0.1, 0.1], [0.5, 0.5, 0.5, 0.5], [0.2, 0.7, 0.4, 0.5]]
    )
    kept, scores, phrases = filter_boxes(
        probs, boxes, ids, box_threshold=0.1, text_threshold=0.1, max_area=0.25, filter_word="carpet", decode=_decode
    )
    assert phrases == ["black hole", "hole"]
    assert torch.equal(kept, boxes[[0, 4]])
    assert torch.allclose(scores, torch.tensor([0.9, 0.2]))  # the best token probability, position 0 included
    # without a filter word the "carpet" box stays; a zero-area box never does
    boxes[1, 2] = 0.0
    kept, _, phrases = filter_boxes(probs, boxes, ids, box_threshold=0.1, text_threshold=0.1, max_area=1.0, decode=_decode)
    assert phrases == ["black hole", "hole", "hole"]  # queries 0, 3, 4; query 1 has area 0
    empty = filter_boxes(probs, boxes, ids, box_threshold=0.95, text_threshold=0.1, max_area=1.0)
    assert empty[0].shape == (0, 4) and empty[1].shape == (0,) and empty[2] == []


def test_boxes_to_pixels():
    got = boxes_to_pixels(torch.tensor([[0.5, 0.5, 0.5, 0.25], [0.1, 0.2, 0.2, 0.4]]), (40, 80))
    assert torch.allclose(got, torch.tensor([[20.0, 15.0, 60.0, 25.0], [0.0, 0.0, 16.0, 16.0]]))


def test_rescore_by_hand():
    masks = torch.zeros(3, 2, 2, dtype=torch.bool)
    masks[0, 0, :] = True  # saliency 0.2, 0.4 -> mean 0.3
    masks[1, 1, 1] = True  # saliency 1.0
    saliency = torch.tensor([[0.2, 0.4], [0.0, 1.0]])
    scores = torch.tensor([0.5, 0.25, 0.8])
    got = rescore(masks, scores, saliency, exponent=3.0)
    expected = torch.tensor([0.5 * math.exp(0.9), 0.25 * math.exp(3.0), 0.8])  # empty mask keeps c
    assert torch.allclose(got, expected)
    assert torch.equal(rescore(masks, scores, None, exponent=3.0), scores)


def test_merge_masks_by_hand():
    masks = torch.tensor([[[1, 1, 0]], [[0, 1, 1]], [[0, 0, 1]]], dtype=torch.bool)  # (3, 1, 3)
    scores = torch.tensor([0.6, 0.9, 0.3])
    # all: pixel 0: 0.6 / 2; pixel 1: (0.6 + 0.9) / 3; pixel 2: (0.9 + 0.3) / 3
    assert torch.allclose(merge_masks(masks, scores, top_k=None), torch.tensor([[0.3, 0.5, 0.4]]))
    # top 2 = masks 1 (0.9) and 0 (0.6): pixel 2 has only mask 1 -> 0.9 / 2
    assert torch.allclose(merge_masks(masks, scores, top_k=2), torch.tensor([[0.3, 0.5, 0.45]]))
    assert torch.allclose(merge_masks(masks, scores, top_k=1), torch.tensor([[0.0, 0.45, 0.45]]))
    assert not merge_masks(torch.zeros(0, 2, 3, dtype=torch.bool), torch.zeros(0), top_k=5).any()


def test_self_similarity_saliency_by_hand():
    e1, e2 = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    feats = torch.stack([e1, e1, e2], dim=1).view(2, 1, 3)  # (C=2, h=1, w=3)
    # dissimilarity rows [0, 0, .5], [0, 0, .5], [.5, .5, 0]; top 2 means .25, .25, .5
    for chunk in (1, 2, 1024):
        got = self_similarity_saliency(feats, top_n=2, chunk=chunk)
        assert torch.allclose(got, torch.tensor([[0.25, 0.25, 0.5]]))
    assert torch.allclose(self_similarity_saliency(feats, top_n=400), torch.tensor([[1 / 6, 1 / 6, 1 / 3]]))


def test_cross_object_saliency_by_hand():
    e1, e2 = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    mixed = (e1 + e2) / math.sqrt(2.0)
    feats = torch.stack([e1, e2, e1, mixed, e2], dim=1).view(2, 1, 5)
    masks = torch.tensor([[[1, 1, 0, 0, 0]], [[0, 0, 1, 1, 0]]], dtype=torch.bool)  # two objects; location 4 in none
    got = cross_object_saliency(feats, masks, chunk=1)
    half = 0.5 * (1 - 1 / math.sqrt(2.0))
    assert torch.allclose(got, torch.tensor([[0.0, half, 0.0, half, 0.0]]), atol=1e-6)
    # a location in both objects is compared with neither's shared locations; max over objects
    overlap = torch.tensor([[[1, 1, 1, 0, 0]], [[0, 0, 1, 1, 0]]], dtype=torch.bool)
    got = cross_object_saliency(feats, overlap)
    # object 0 = {0,1,2} vs {3}: e1 -> half, e2 -> half, e1 -> half; object 1 = {2,3} vs {0,1}: 0, half
    assert torch.allclose(got, torch.tensor([[half, half, half, half, 0.0]]), atol=1e-6)
    same = torch.tensor([[[1, 1, 0, 0, 0]], [[1, 1, 0, 0, 0]]], dtype=torch.bool)  # no other locations
    assert torch.allclose(cross_object_saliency(feats, same), torch.tensor([[0.5, 0.5, 0.0, 0.0, 0.0]]))


def test_category_properties_tables_and_fallback(tmp_path):
    cfg = SaaConfig()
    carpet = category_properties("carpet", cfg)
    assert carpet.source == "mvtec_ad" and (carpet.objects, carpet.max_masks, carpet.max_defect_area) == (1, 5, 0.9)
    assert carpet.prompts[:3] == (("defect on carpet", "carpet"), ("damage on carpet", "carpet"), ("flaw on carpet", "carpet"))
    assert carpet.prompts[3] == ("black hole", "carpet") and len(carpet.prompts) == 6
    pcb1 = category_properties("pcb1", cfg)
    assert pcb1.source == "visa" and pcb1.object_word == "printed_circuit_board" and pcb1.max_masks == 1
    assert category_properties("capsules", cfg).objects == 20
    other = category_properties("widget", SaaConfig(fallback_max_masks=3))
    assert other.source == "fallback" and other.object_word == "widget"
    assert (other.objects, other.max_masks, other.max_defect_area) == (1, 3, 1.0)
    assert [p[0] for p in other.prompts] == ["defect on widget", "damage on widget", "flaw on widget"]
    vanilla = category_properties("carpet", SaaConfig(prompt_source="fixed"))
    assert vanilla.prompts == (("anomaly", ""),) and vanilla.max_masks == 5
    own = tmp_path / "mine.json"
    own.write_text(json.dumps({
        "general_prompts": ["crack in {object}"],
        "categories": {"widget": {"object": "gadget", "objects": 2, "max_masks": 4, "max_defect_area": 0.5, "prompts": [["dent", "gadget"]]}},
    }))
    mine = category_properties("widget", SaaConfig(property_tables=[str(own), "mvtec_ad"]))
    assert mine.prompts == (("crack in widget", "widget"), ("dent", "gadget")) and mine.objects == 2
    with pytest.raises(ConfigError, match="property_tables"):
        category_properties("carpet", SaaConfig(property_tables=["nope"]))
    bad = tmp_path / "bad.json"
    bad.write_text("{}")
    with pytest.raises(ConfigError, match="not a property table"):
        category_properties("carpet", SaaConfig(property_tables=[str(bad)]))


def test_every_packaged_category_is_complete():
    for table, count in (("mvtec_ad", 15), ("visa", 12)):
        categories = saa._load_table(table)["categories"]
        assert len(categories) == count
        for entry in categories.values():
            assert entry["objects"] >= 1 and entry["max_masks"] >= 1 and 0 < entry["max_defect_area"] <= 1
            assert entry["prompts"] and all(len(p) == 2 for p in entry["prompts"])


def test_config_errors_name_the_key():
    with pytest.raises(ConfigError, match="model.method_config.channel_order"):
        SaaConfig(channel_order="hsv")
    with pytest.raises(ConfigError, match="model.method_config.fixed_prompts"):
        SaaConfig(prompt_source="fixed", fixed_prompts=[["", "x"]])
    cfg = SaaConfig(detector={"model": "tiny"}, sam={"variant": "tiny"})
    assert cfg.detector.model == "tiny" and cfg.sam.variant == "tiny"
    assert saa.CONFIG is SaaConfig


# ---------------------------------------------------------------------- end to end with tiny models
FRAME = (48, 64)


def _tiny_config(**overrides) -> SaaConfig:
    kwargs = dict(
        detector={"model": "tiny", "min_size": 64, "max_size": 128},
        sam={"variant": "tiny"},
        saliency_backbone="resnet10t",
        saliency_pretrained=False,
        saliency_single_size=64,
        saliency_multi_size=128,
        prompt_source="fixed",
        fixed_prompts=[["defect", ""]],
    )
    kwargs.update(overrides)
    return SaaConfig(**kwargs)


@pytest.fixture(scope="module")
def tiny_saa():
    return saa.build(_tiny_config())


def _image(seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (3, *FRAME), dtype=torch.uint8, generator=gen)


def _normalise(images: torch.Tensor) -> torch.Tensor:
    from clipsam.data.transforms import CLIP_MEAN, CLIP_STD

    return (images.float() / 255.0 - torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)) / torch.tensor(CLIP_STD).view(1, 3, 1, 1)


def test_saa_plus_end_to_end_matches_its_steps(tiny_saa):
    """The producer's map = the steps composed by hand, with SAM's masks from SamPredictor; the
    reference's defaults: object word with its comma, SAM and the saliency fed BGR."""
    from segment_anything import SamPredictor

    image = _image(0)
    cfg = tiny_saa.config
    det = tiny_saa.detector
    thresholds = dict(box_threshold=0.1, text_threshold=0.1, decode=det.decode)
    assert (cfg.object_comma, cfg.channel_order) == (True, "bgr")
    probs, boxes, ids = det(image, "widget,")  # the object pass: the fallback object word, n_obj 1
    objects, _, _ = filter_boxes(probs, boxes, ids, max_area=1.0, **thresholds)
    largest = float((objects[:, 2] * objects[:, 3]).max()) if len(objects) else 1.0
    probs, boxes, ids = det(image, "defect")
    defects, scores, _ = filter_boxes(probs, boxes, ids, max_area=largest * 1.0, **thresholds)
    assert len(defects) > 1  # measured: the tiny random detector keeps several boxes

    predictor = SamPredictor(tiny_saa.sam)
    predictor.set_image(image.flip(0).permute(1, 2, 0).numpy())  # BGR, as the reference's cv2 image
    masks = torch.stack([
        torch.from_numpy(predictor.predict(box=box.numpy(), multimask_output=False)[0][0])
        for box in boxes_to_pixels(defects, FRAME)
    ])
    feats = saa.saliency_features(tiny_saa.saliency_backbone, image.flip(0), 64)
    sal = self_similarity_saliency(feats, top_n=400).numpy()

    sal = torch.from_numpy(cv2.resize(sal, (FRAME[1], FRAME[0]), interpolation=cv2.INTER_LINEAR))
    expected = merge_masks(masks, rescore(masks, scores, sal, exponent=3.0), top_k=5) / math.exp(3.0)

    out = tiny_saa(_normalise(torch.stack([image, _image(1)])), ["widget", "widget"])
    assert out.anomaly_map.shape == (2, *FRAME) and out.image_scores.shape == (2,)
    assert torch.allclose(out.anomaly_map[0], expected, atol=1e-5)
    assert out.anomaly_map[0].max() > 0
    assert float(out.anomaly_map.min()) >= 0.0 and float(out.anomaly_map.max()) <= 1.0
    assert torch.allclose(out.image_scores, out.anomaly_map.flatten(1).amax(1))
    assert cfg.saliency and not tiny_saa.trainable and not any(p.requires_grad for p in tiny_saa.parameters())
    with pytest.raises(NotImplementedError, match="training-free"):
        tiny_saa.loss(out, {})


def test_saa_vanilla_is_the_pipeline_with_parts_off(tiny_saa):
    defaults = saa.CONFIG_VANILLA()
    assert (defaults.prompt_source, defaults.area_filter, defaults.saliency, defaults.top_k) == ("fixed", False, False, False)
    assert defaults.fixed_prompts == [["anomaly", ""]]
    cfg = saa.SaaVanillaConfig(detector={"model": "tiny", "min_size": 64, "max_size": 128}, sam={"variant": "tiny"})
    vanilla = saa.SaaProducer(detector=tiny_saa.detector, sam=tiny_saa.sam, saliency_backbone=None, config=cfg)
    image = _image(2)
    calls = []
    original = vanilla.detector.forward
    vanilla.detector.forward = lambda img, text: calls.append(text) or original(img, text)
    try:
        got = vanilla.anomaly_map(image, "carpet")
    finally:
        del vanilla.detector.forward
    assert calls == ["anomaly"]  # no object pass
    probs, boxes, ids = tiny_saa.detector(image, "anomaly")
    kept, scores, _ = filter_boxes(probs, boxes, ids, box_threshold=0.1, text_threshold=0.1, max_area=math.inf)
    from clipsam.inputs import build_sam_input
    from clipsam.models.sam import encode_sam_inputs

    # SAM gets BGR (the reference's cv2 image; channel_order's default)
    sam_image, sam_size = build_sam_input(image.flip(0).permute(1, 2, 0).numpy(), vanilla.sam.image_encoder.img_size)
    embedding = encode_sam_inputs(vanilla.sam, sam_image[None], sam_size[None])
    masks = vanilla._masks(embedding, kept, FRAME, FRAME, tuple(sam_size.tolist())).cpu()
    assert torch.allclose(got, merge_masks(masks, scores, top_k=None))  # every mask, s_i = c_i
    assert vanilla.map_scale == 1.0


def test_channel_order_switch_feeds_sam_and_saliency_bgr(tiny_saa, monkeypatch):
    seen = {}
    from clipsam.inputs import build_sam_input

    real_encode, real_features = saa.encode_sam_inputs, saa.saliency_features
    monkeypatch.setattr(
        saa, "encode_sam_inputs", lambda sam, images, sizes: seen.setdefault("sam", images.clone()) is None or real_encode(sam, images, sizes)
    )
    monkeypatch.setattr(
        saa, "saliency_features", lambda bb, img, size: seen.setdefault("wrn", img.clone()) is None or real_features(bb, img, size)
    )
    image = _image(3)
    for order, expected in (("rgb", image), ("bgr", image.flip(0))):
        seen.clear()
        producer = saa.SaaProducer(
            detector=tiny_saa.detector, sam=tiny_saa.sam, saliency_backbone=tiny_saa.saliency_backbone,
            config=_tiny_config(channel_order=order),
        )
        producer.anomaly_map(image, "widget")
        sam_expected = build_sam_input(expected.permute(1, 2, 0).numpy(), tiny_saa.sam.image_encoder.img_size)[0]
        assert torch.equal(seen["sam"][0], sam_expected) and torch.equal(seen["wrn"], expected), order


def test_missing_weights_are_one_clear_error(tmp_path, monkeypatch):
    from clipsam.errors import WeightsError

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(WeightsError, match=r"model.method_config.detector.model='IDEA-Research/grounding-dino-tiny'.*'tiny'"):
        saa.build_detector(saa.DetectorConfig(cache_dir=str(tmp_path / "empty")))
    with pytest.raises(WeightsError, match="model.method_config.saliency_pretrained to a local checkpoint file"):
        saa.build_saliency_backbone(SaaConfig(saliency_pretrained=str(tmp_path / "missing.pth")))


def test_saliency_backbone_loads_a_local_checkpoint(tmp_path):
    import timm

    torch.manual_seed(5)
    full = timm.create_model("resnet10t", pretrained=False)
    path = tmp_path / "resnet10t.pth"
    torch.save(full.state_dict(), path)
    backbone = saa.build_saliency_backbone(SaaConfig(saliency_backbone="resnet10t", saliency_pretrained=str(path)))
    assert torch.equal(backbone.state_dict()["conv1.0.weight"], full.state_dict()["conv1.0.weight"])
    assert not backbone.training and not any(p.requires_grad for p in backbone.parameters())
