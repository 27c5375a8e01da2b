"""The one pipeline: every entry point computes the same thing; each method reads its own input.

- a checkpoint written by clipsam 5bcc1b0 (before the redesign) loads, with its old-style config
  and with today's, and gives the outputs that version gave (bit for bit);
- the dataset (test/predict), ``Segmenter`` and an exported bundle give identical masks and scores
  for a trained and a training-free method with each refiner;
- WinCLIP's and SDP's inputs are made from the ORIGINAL image (one resize, the reference's);
  MMR's and SAA's SAM embeddings equal ``SamPredictor.set_image`` of the original;
- a typo in any method's or refiner's settings is refused at construction, named as written.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from clipsam import methods, refiners
from clipsam.errors import ConfigError
from clipsam.inputs import CLIP_MEAN, CLIP_STD, InputSpec, build_inputs, build_sam_input, sam_input_spec
from clipsam.module import ClipSamModule

REPO = Path(__file__).resolve().parents[2]
FIXTURE = REPO / "tests" / "fixtures" / "v5bcc1b0"
DEMO = REPO / "configs" / "demo.yaml"
WINCLIP_DEMO = REPO / "configs" / "methods" / "demo" / "winclip.yaml"


def _normalise(pixels01: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor(CLIP_MEAN).view(3, 1, 1)
    std = torch.tensor(CLIP_STD).view(3, 1, 1)
    return (pixels01 - mean) / std


def _original(seed: int = 0, size: tuple[int, int] = (150, 210)) -> np.ndarray:
    """A smooth non-square RGB image (bicubic overshoot stays realistic)."""
    gen = np.random.default_rng(seed)
    small = gen.integers(0, 256, (size[0] // 10, size[1] // 10, 3), dtype=np.uint8)
    return np.asarray(Image.fromarray(small).resize((size[1], size[0]), Image.Resampling.BILINEAR))


# ---------------------------------------------------------------------- backward compatibility
@pytest.mark.parametrize("refiner", ["none", "ppg_cps"])
@pytest.mark.parametrize("config", ["demo_config.yaml", "today"])
def test_checkpoint_of_5bcc1b0_loads_and_gives_its_outputs(refiner: str, config: str) -> None:
    """tests/fixtures/v5bcc1b0: a tiny fit checkpoint, an image and Segmenter's outputs, all written
    by the code at 5bcc1b0 (make_fixture.py there); the old config uses model.clip / model.sam."""
    from clipsam import Segmenter

    cfg = FIXTURE / "demo_config.yaml" if config != "today" else DEMO
    seg = Segmenter.from_checkpoint(
        FIXTURE / "april_gan_tiny.ckpt", cfg, overrides={"data.image_size": 64, "model.refiner": refiner}, category="fabric"
    )
    got = seg.segment(np.load(FIXTURE / "image.npy"))
    want = torch.load(FIXTURE / "expected.pt")[refiner]
    assert torch.equal(torch.from_numpy(got.anomaly_map), want["anomaly_map"])
    assert torch.equal(torch.from_numpy(got.scores), want["scores"])
    assert torch.equal(torch.from_numpy(got.mask), want["mask"])
    assert got.image_score == pytest.approx(float(want["image_score"]), abs=0)


def test_old_hparams_build_the_same_module() -> None:
    """hparams of a 5bcc1b0 checkpoint (model.clip, model.sam, ... filled) rebuild an equal config."""
    hparams = torch.load(FIXTURE / "april_gan_tiny.ckpt", weights_only=True)["hyper_parameters"]
    module = ClipSamModule(**hparams)
    assert module.method == "april_gan" and module.refiner_name == "ppg_cps"
    assert module.method_config.model_name == "clipsam-tiny" and list(module.method_config.layers) == [1, 2, 3, 4]
    assert module.refiner_config.sam.variant == "tiny"


# ---------------------------------------------------------------------- each method owns its input
def test_winclip_and_sdp_inputs_are_one_resize_of_the_original(tmp_path: Path) -> None:
    """SDP: PIL's antialiased bicubic of the original to 240; WinCLIP: anomalib's (float, antialiased
    bicubic), or PIL's with resize=pil_bicubic; never a resize of another method's frame."""
    from clipsam.data.dataset import AnomalyDataset
    from clipsam.data.samples import Sample
    from clipsam.data.transforms import build_transform

    original = _original()
    path = tmp_path / "part.png"
    Image.fromarray(original).save(path)
    pil_240 = _normalise(torch.from_numpy(np.asarray(Image.open(path).convert("RGB").resize((240, 240), Image.Resampling.BICUBIC))).permute(2, 0, 1).float() / 255)
    float_img = torch.from_numpy(original).permute(2, 0, 1).float()[None] / 255
    torch_240 = _normalise(F.interpolate(float_img, size=(240, 240), mode="bicubic", align_corners=False, antialias=True)[0])

    sdp = methods.method_config("sdp", {"input_size": 240})
    winclip = methods.method_config("winclip", {"input_size": 240})
    winclip_pil = methods.method_config("winclip", {"input_size": 240, "resize": "pil_bicubic"})
    for name, config, want in (("sdp", sdp, pil_240), ("winclip", winclip, torch_240), ("winclip", winclip_pil, pil_240)):
        specs = methods.method_inputs(name, config, image_size=64)  # the evaluation frame is 64
        assert [s.key for s in specs] == ["method_image"]
        dataset = AnomalyDataset([Sample(path, None, -1, "part", "unknown")], build_transform(64), has_labels=False, inputs=specs)
        item = dataset[0]
        assert item["image"].shape[-1] == 64  # the frame the maps are scored in
        assert (item["method_image"] - want).abs().max() < 1e-6, name
    # anomalib's pre-processor is not PIL's: bicubic overshoot is not clamped on floats
    assert (torch_240 - pil_240).abs().max() > 1e-3


def test_mmr_and_saa_encode_the_original_as_sam_predictor() -> None:
    from segment_anything import SamPredictor

    from clipsam.models.sam import SamConfig, build_sam, encode_sam_inputs, sam_input_side

    side = sam_input_side("tiny")
    mmr = refiners.refiner_config("mmr", {"sam": {"variant": "tiny"}})
    saa = methods.method_config("saa_plus", {"sam": {"variant": "tiny"}})
    assert refiners.refiner_inputs("mmr", mmr) == [sam_input_spec(side)]
    assert methods.method_inputs("saa_plus", saa, image_size=64) == [sam_input_spec(side)]
    sam = build_sam(SamConfig(variant="tiny"))
    original = _original(1)
    predictor = SamPredictor(sam)
    predictor.set_image(original)
    built = build_inputs(original, [sam_input_spec(side)])
    assert torch.equal(built["sam_image"], build_sam_input(original, side)[0])
    ours = encode_sam_inputs(sam, built["sam_image"][None], built["sam_size"][None])
    torch.testing.assert_close(ours, predictor.features, atol=1e-5, rtol=1e-5)


def test_mmr_masks_come_from_the_original_image() -> None:
    """MMR reads sam_image (the original), not the frame: another original, another mask."""
    from clipsam.refiners.mmr import MmrConfig, build

    refiner = build(MmrConfig(sam={"variant": "tiny"}, threshold=0.5, min_area=1))
    amap = torch.zeros(1, 32, 32)
    amap[0, 8:20, 10:24] = 0.9
    outs = []
    for seed in (0, 1):
        inputs = build_inputs(_original(seed, (90, 120)), [sam_input_spec(refiner.sam.image_encoder.img_size)])
        batch = {"sam_image": inputs["sam_image"][None], "sam_size": inputs["sam_size"][None], "original_size": torch.tensor([[90, 120]])}
        outs.append(refiner.refine_batch(batch, amap).mask_probs)
    assert outs[0].shape == (1, 32, 32)
    assert not torch.equal(outs[0], outs[1])
    with pytest.raises(ConfigError, match="sam_image"):
        refiner.refine_batch({"image": torch.zeros(1, 3, 32, 32)}, amap)


def test_input_specs_are_checked() -> None:
    with pytest.raises(ConfigError, match="resize"):
        InputSpec(key="x", size=8, resize="nearest")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="reserved"):
        InputSpec(key="image", size=8)


# ---------------------------------------------------------------------- one shape of configuration
@pytest.mark.parametrize("name", list(methods.METHODS))
def test_a_typo_in_any_method_config_is_refused_at_construction(name: str) -> None:
    with pytest.raises(ConfigError, match=r"model\.method_config\.not_a_setting"):
        ClipSamModule(method=name, method_config={"not_a_setting": 1})


@pytest.mark.parametrize("name", [n for n in refiners.REFINERS if n != "none"])
def test_a_typo_in_any_refiner_config_is_refused_at_construction(name: str) -> None:
    with pytest.raises(ConfigError, match=r"model\.refiner_config\.not_a_setting"):
        ClipSamModule(refiner=name, refiner_config={"not_a_setting": 1})
    with pytest.raises(ConfigError, match=r"model\.refiner_config\.sam\.varient"):
        ClipSamModule(refiner=name, refiner_config={"sam": {"varient": "tiny"}})


def test_legacy_sections_are_aliases(capsys: pytest.CaptureFixture[str]) -> None:
    old = ClipSamModule(clip={"model_name": "clipsam-tiny", "layers": [1, 2]}, sam={"variant": "tiny"}, cascade={"num_steps": 2}, focal_gamma=3.0)
    assert old.method_config.model_name == "clipsam-tiny" and old.method_config.focal_gamma == 3.0
    assert old.refiner_config.sam.variant == "tiny" and old.refiner_config.cascade.num_steps == 2
    assert "deprecated" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="model.clip and model.method_config are both set"):
        ClipSamModule(clip={"model_name": "x"}, method_config={"model_name": "y"})
    # another method's settings never leak: SDP's object name is its own ("raw")
    sdp = ClipSamModule(method="sdp", clip={"object_name": "category"})
    assert sdp.method_config.object_name == "raw"


def test_stacked_configs_merge_key_by_key_and_a_method_switch_drops_old_settings(tmp_path: Path) -> None:
    from clipsam.loading import load_config

    ablation = tmp_path / "ablation.yaml"
    ablation.write_text("model:\n  refiner_config:\n    cascade:\n      num_steps: 1\n")
    merged = load_config([DEMO, ablation])["model"]
    assert merged["refiner_config"]["sam"]["variant"] == "tiny"  # kept from the base config
    assert merged["refiner_config"]["cascade"] == {"num_steps": 1}
    switched = load_config([DEMO, WINCLIP_DEMO])["model"]
    assert switched["method"] == "winclip" and "layers" not in switched["method_config"]


# ---------------------------------------------------------------------- every entry point, one computation
def _demo_datamodule(root: Path, specs: list[InputSpec]):
    from clipsam.data.datamodule import AnomalyDataModule

    dm = AnomalyDataModule(predict_dir=str(root), image_size=64, num_workers=0, test_batch_size=4, predict_category="part")
    dm.setup("predict")
    dm.set_model_inputs(specs)
    return dm


@pytest.mark.parametrize("refiner", ["none", "ppg_cps", "mmr"])
@pytest.mark.parametrize("method", ["april_gan", "winclip"])
def test_dataset_segmenter_and_bundle_give_identical_results(tmp_path: Path, method: str, refiner: str) -> None:
    """The dataset's items (what test and predict run on), Segmenter.from_config and a bundle."""
    from clipsam import Segmenter
    from clipsam.export import export_bundle

    images = tmp_path / "images"
    images.mkdir()
    for i in range(2):  # originals at the frame size: Segmenter's resize back is then exact
        Image.fromarray(_original(i, (64, 64))).save(images / f"{i}.png")
    configs = [DEMO] if method == "april_gan" else [DEMO, WINCLIP_DEMO]
    ckpt = FIXTURE / "april_gan_tiny.ckpt" if method == "april_gan" else None
    overrides = {"data.image_size": 64, "model.refiner": refiner, "model.evaluation.mask_source": "sam"}
    if refiner == "mmr":
        overrides["model.evaluation.fusion"] = "mean"
    seg = Segmenter.from_config(configs, ckpt, overrides=overrides, category="part")

    dm = _demo_datamodule(images, seg.pipeline.input_specs())
    batch = next(iter(dm.predict_dataloader()))
    with torch.no_grad():
        from_data = seg.module.decide(batch, seg.module.inference(batch))
    paths = list(batch["path"])
    direct = seg.segment_batch(paths, category="part")
    bundle = export_bundle(ckpt, configs, tmp_path / "bundle", overrides=overrides, category="part")
    bundled = Segmenter.from_bundle(bundle).segment_batch(paths)
    for i, (a, b) in enumerate(zip(direct, bundled)):
        assert np.array_equal(a.scores, from_data["scores"][i].numpy())
        assert np.array_equal(a.mask, from_data["mask"][i].numpy())
        assert a.image_score == float(from_data["image_scores"][i])
        assert np.array_equal(a.scores, b.scores) and np.array_equal(a.mask, b.mask) and a.image_score == b.image_score


def test_training_free_segmenter_from_config_without_checkpoint() -> None:
    """The issue's example: a training-free method needs no checkpoint anywhere."""
    from clipsam import Segmenter

    seg = Segmenter.from_config([str(DEMO), str(WINCLIP_DEMO)], overrides={"data.image_size": 64})
    rgb = _original(3, (45, 70))
    result = seg.segment(rgb)
    assert result.mask.shape == (45, 70) and result.scores.shape == (45, 70)
    with pytest.raises(ConfigError, match="training-free"):
        Segmenter.from_config([DEMO, WINCLIP_DEMO], FIXTURE / "april_gan_tiny.ckpt")
    with pytest.raises(ConfigError, match="pass ckpt_path"):
        Segmenter.from_config([DEMO])
