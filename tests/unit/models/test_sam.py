"""SAM stage (clipsam.models.sam): tiny SAM end to end, embedding cache, weights resolution."""

from __future__ import annotations

import hashlib

import urllib.error

import pytest
import torch

from clipsam.cascade import CascadeConfig, mask_to_box
from clipsam.errors import ConfigError, WeightsError
from clipsam.models import sam as sam_module
from clipsam.models.sam import (
    SAM_CHECKPOINTS,
    EmbeddingCache,
    SamConfig,
    build_sam,
    build_sam_tiny,
    resolve_checkpoint,
    weights_identity,
)
from clipsam.prompting import PromptConfig
from clipsam.refiners.ppg_cps import SamRefiner

FRAME = (64, 48)  # non-square on purpose: (H, W)


@pytest.fixture(scope="module")
def tiny():
    return build_sam_tiny(seed=0)


def _image(seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (3, *FRAME), dtype=torch.uint8, generator=gen)


def _anomaly_map():
    amap = torch.zeros(FRAME)
    amap[20:30, 10:22] = 0.8
    amap[24, 15] = 0.95
    return amap


def _refiner(sam, *, num_steps=3, cache=None, **prompt):
    kwargs = dict(num_positive=3, num_negative=3, threshold=0.5, kernel_size=9)
    kwargs.update(prompt)
    return SamRefiner(
        sam=sam,
        prompt=PromptConfig(**kwargs),
        cascade=CascadeConfig(num_steps=num_steps),
        embedding_cache=cache,
        weights_id="tiny:random:seed=0" if cache is not None else "",
    )


def _count_calls(module):
    calls = []
    handle = module.register_forward_hook(lambda *args: calls.append(1))
    return calls, handle


def test_tiny_sam_is_frozen_seeded_and_leaves_global_rng_alone(tiny):
    assert not tiny.training and not any(p.requires_grad for p in tiny.parameters())
    state = torch.random.get_rng_state()
    again = build_sam_tiny(seed=0)
    assert torch.equal(torch.random.get_rng_state(), state)
    for (name, a), b in zip(tiny.state_dict().items(), again.state_dict().values()):
        assert torch.equal(a, b), name
    other = build_sam_tiny(seed=1)
    assert not torch.equal(tiny.mask_decoder.iou_token.weight, other.mask_decoder.iou_token.weight)


def test_refine_runs_the_three_step_cascade_end_to_end(tiny):
    refiner = _refiner(tiny)
    calls, handle = _count_calls(tiny.mask_decoder.transformer)
    try:
        out = refiner.refine(_image(), _anomaly_map())
    finally:
        handle.remove()
    assert len(calls) == 3 and len(out.steps) == 3
    assert out.mask.shape == FRAME and out.mask.dtype == torch.bool
    assert out.mask_probs.shape == FRAME and out.mask_probs.dtype == torch.float32
    assert 0.0 <= float(out.mask_probs.min()) and float(out.mask_probs.max()) <= 1.0
    assert torch.equal(out.mask, out.steps[-1].mask)
    assert torch.equal(out.mask, out.mask_probs > 0.5)  # sigmoid(logit) > 0.5 <=> logit > 0
    assert out.point_labels.tolist() == [1, 1, 1, 0, 0, 0]
    assert out.point_coords[0].tolist() == [15.0, 24.0]  # the peak, (x, y) in frame pixels
    assert [s.used_mask_input for s in out.steps] == [False, True, True]
    assert out.steps[1].low_res_logits.shape == (1, 64, 64)  # tiny SAM: 4 x its 16 x 16 grid
    expected_box = mask_to_box(out.steps[1].mask)
    assert expected_box is not None  # seed 0 gives a non-empty step-2 mask: step 3 gets a box
    assert torch.equal(out.steps[2].box, expected_box)
    assert set(out.timings) == {"sam_encoder", "ppg", "cascade_step_1", "cascade_step_2", "cascade_step_3"}
    assert out.cache_hit is None


@pytest.mark.parametrize("num_steps", [1, 2])
def test_refine_with_fewer_steps(tiny, num_steps):
    calls, handle = _count_calls(tiny.mask_decoder.transformer)
    try:
        out = _refiner(tiny, num_steps=num_steps).refine(_image(), _anomaly_map())
    finally:
        handle.remove()
    assert len(calls) == num_steps == len(out.steps)
    assert f"cascade_step_{num_steps}" in out.timings and f"cascade_step_{num_steps + 1}" not in out.timings


def test_refine_without_anomaly_skips_the_decoder(tiny):
    calls, handle = _count_calls(tiny.mask_decoder.transformer)
    try:
        out = _refiner(tiny).refine(_image(), torch.zeros(FRAME))
    finally:
        handle.remove()
    assert calls == [] and out.steps == []
    assert not out.mask.any() and torch.equal(out.mask_probs, torch.zeros(FRAME))
    assert out.point_coords.shape == (0, 2)


def test_precomputed_embedding_matches_and_batched_embedding_matches_single(tiny):
    refiner = _refiner(tiny)
    images = torch.stack([_image(0), _image(1)])
    batch = refiner.embed_images(images)
    assert batch.shape == (2, 32, 16, 16)
    single = refiner.embed_images(images[1:])
    assert torch.allclose(batch[1:], single, atol=1e-5)
    direct = refiner.refine(images[0], _anomaly_map())
    given = refiner.refine(images[0], _anomaly_map(), embedding=batch[0])
    assert given.timings["sam_encoder"] == 0.0
    assert torch.allclose(direct.mask_probs, given.mask_probs, atol=1e-5)


def test_embedding_cache_hit_returns_identical_tensors_and_skips_encoder(tiny, tmp_path):
    cache = EmbeddingCache(tmp_path / "emb")
    refiner = _refiner(tiny, cache=cache)
    first = refiner.refine(_image(), _anomaly_map())
    assert first.cache_hit is False and refiner.encoder_calls == 1
    calls, handle = _count_calls(tiny.image_encoder)
    try:
        second = refiner.refine(_image(), _anomaly_map())
    finally:
        handle.remove()
    assert second.cache_hit is True and calls == [] and refiner.encoder_calls == 1
    assert torch.equal(first.mask_probs, second.mask_probs) and torch.equal(first.mask, second.mask)
    sam_input, sam_size = refiner.sam_inputs(_image()[None])
    h, w = sam_size[0].tolist()
    key = cache.key(sam_input[0, :, :h, :w], model_id=refiner.model_id)  # keyed on what is encoded
    assert torch.equal(cache.load(key), refiner.embed_images(_image()[None]).cpu())
    assert cache.key(sam_input[0], model_id=refiner.model_id) != key
    assert cache.key(sam_input[0, :, :h, :w], model_id=refiner.model_id.replace("seed=0", "seed=1")) != key


def test_corrupt_cache_file_is_ignored_and_recomputed(tiny, tmp_path):
    cache = EmbeddingCache(tmp_path)
    refiner = _refiner(tiny, cache=cache)
    reference = refiner.embed_images(_image()[None])
    sam_input, sam_size = refiner.sam_inputs(_image()[None])
    h, w = sam_size[0].tolist()
    key = cache.key(sam_input[0, :, :h, :w], model_id=refiner.model_id)
    path = cache.path(key)
    path.write_bytes(b"not a torch file")
    with pytest.warns(UserWarning, match="unreadable or invalid SAM embedding cache file"):
        again = refiner.embed_images(_image()[None])
    assert refiner.encoder_calls == 2 and torch.equal(again, reference)
    assert torch.equal(cache.load(key), reference)  # rewritten


def test_cache_requires_a_weights_identity(tiny, tmp_path):
    with pytest.raises(ValueError, match="weights_id"):
        SamRefiner(sam=tiny, prompt=PromptConfig(), cascade=CascadeConfig(), embedding_cache=EmbeddingCache(tmp_path))


def test_refiner_keeps_sam_in_eval_mode(tiny):
    refiner = _refiner(tiny).train()
    assert refiner.training and not tiny.training


def test_bfloat16_encoder_runs():
    sam = build_sam(SamConfig(variant="tiny", dtype="bfloat16"))
    assert next(sam.image_encoder.parameters()).dtype == torch.bfloat16
    out = _refiner(sam).refine(_image(), _anomaly_map())
    assert out.mask_probs.dtype == torch.float32 and len(out.steps) == 3


def _offline(*args, **kwargs):
    raise urllib.error.URLError("network is unreachable")


def test_missing_checkpoint_offline_raises_weights_error_with_path(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "download_url_to_file", _offline)
    config = SamConfig(variant="vit_b", cache_dir=str(tmp_path))
    with pytest.raises(WeightsError) as err:
        build_sam(config)
    message = str(err.value)
    assert str(tmp_path / SAM_CHECKPOINTS["vit_b"].filename) in message
    assert "model.sam.checkpoint" in message and "URLError" in message


def test_missing_user_checkpoint_and_disabled_download(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "download_url_to_file", pytest.fail)  # must not be called
    with pytest.raises(WeightsError, match="nowhere.pth"):
        resolve_checkpoint(SamConfig(variant="vit_h", checkpoint=str(tmp_path / "nowhere.pth")))
    with pytest.raises(WeightsError, match="model.sam.download is false"):
        resolve_checkpoint(SamConfig(variant="vit_l", cache_dir=str(tmp_path), download=False))


def test_download_goes_to_the_cache_with_the_full_sha256(tmp_path, monkeypatch):
    seen = {}

    def fake_download(url, dst, hash_prefix=None, progress=True):
        seen.update(url=url, hash_prefix=hash_prefix, progress=progress)
        open(dst, "wb").close()

    monkeypatch.setattr(torch.hub, "download_url_to_file", fake_download)
    monkeypatch.setenv("CLIPSAM_CACHE", str(tmp_path))
    path = resolve_checkpoint(SamConfig(variant="vit_b"))
    assert path == tmp_path / "sam" / "sam_vit_b_01ec64.pth" and path.is_file()
    assert seen == {
        "url": "https://dl.fbaipublicfiles.com/segment_anything/sam_vit_b_01ec64.pth",
        "hash_prefix": SAM_CHECKPOINTS["vit_b"].sha256,
        "progress": True,
    }
    # The identity is the hash of the file's real bytes (here: empty), never the published hash
    # taken on trust from the name; a mismatch with the published hash is reported.
    with pytest.warns(UserWarning, match="not the official file"):
        identity = weights_identity(SamConfig(variant="vit_b"))
    assert identity == f"vit_b:sha256={hashlib.sha256(b'').hexdigest()}"


def test_strict_loading_rejects_missing_and_unexpected_keys(tiny, tmp_path):
    state = tiny.state_dict()
    good = tmp_path / "good.pth"
    torch.save(state, good)
    target = build_sam_tiny(seed=5)
    sam_module._load_strict(target, good, "tiny")
    assert torch.equal(target.mask_decoder.iou_token.weight, tiny.mask_decoder.iou_token.weight)

    missing = dict(state)
    missing.pop("mask_decoder.iou_token.weight")
    torch.save(missing, tmp_path / "missing.pth")
    with pytest.raises(WeightsError, match="1 missing keys.*iou_token"):
        sam_module._load_strict(target, tmp_path / "missing.pth", "tiny")

    torch.save({**state, "extra.weight": torch.zeros(1)}, tmp_path / "extra.pth")
    with pytest.raises(WeightsError, match="1 unexpected keys.*extra.weight"):
        sam_module._load_strict(target, tmp_path / "extra.pth", "tiny")

    (tmp_path / "broken.pth").write_bytes(b"\x00garbage")
    with pytest.raises(WeightsError, match="cannot read SAM checkpoint"):
        sam_module._load_strict(target, tmp_path / "broken.pth", "tiny")


def test_build_vit_b_from_a_wrong_checkpoint_raises(tiny, tmp_path):
    path = tmp_path / "tiny.pth"
    torch.save(tiny.state_dict(), path)
    config = SamConfig(variant="vit_b", checkpoint=str(path))
    with pytest.raises(WeightsError, match="does not match variant 'vit_b'"):
        build_sam(config)
    assert weights_identity(config).startswith("vit_b:sha256=")
    assert weights_identity(SamConfig(variant="tiny", seed=3)) == "tiny:random:seed=3"


def test_config_validation():
    with pytest.raises(ConfigError, match="model.sam.variant"):
        SamConfig(variant="vit_g")
    with pytest.raises(ConfigError, match="model.sam.dtype"):
        SamConfig(dtype="float16")


def test_per_region_runs_one_cascade_per_connected_region(tiny):
    amap = torch.zeros(FRAME)
    amap[5:10, 5:10] = 0.9  # region A, the brighter peak
    amap[7, 7] = 0.99
    amap[30:36, 40:46] = 0.7  # region B, far from A
    image = _image()
    prompt = PromptConfig(num_positive=2, num_negative=2, threshold=0.5, kernel_size=5)

    whole = SamRefiner(sam=tiny, prompt=prompt, cascade=CascadeConfig(num_steps=3)).refine(image, amap)
    assert len(whole.steps) == 3
    positives = whole.point_coords[whole.point_labels == 1]
    assert all(5 <= float(y) < 10 for _, y in positives), "image-level top-k only sees the brighter region"

    per_region = SamRefiner(sam=tiny, prompt=prompt, cascade=CascadeConfig(num_steps=3, per_region=True))
    out = per_region.refine(image, amap)
    assert len(out.steps) == 6, "two regions: two three-step cascades"
    positives = out.point_coords[out.point_labels == 1]
    assert positives.shape[0] == 4
    assert {bool(float(y) >= 30) for _, y in positives} == {False, True}, "each region gets its own positives"
    assert out.mask.shape == FRAME and out.mask_probs.shape == FRAME

    capped = SamRefiner(sam=tiny, prompt=prompt, cascade=CascadeConfig(num_steps=1, per_region=True, max_regions=1))
    out = capped.refine(image, amap)
    assert len(out.steps) == 1
    assert all(float(y) < 10 for _, y in out.point_coords[out.point_labels == 1]), "the highest-peak region is kept"

    empty = per_region.refine(image, torch.zeros(FRAME))
    assert not bool(empty.mask.any()) and empty.point_coords.shape == (0, 2)
