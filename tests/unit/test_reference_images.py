"""The reference-image hook (a method's ``reference_count(config)`` > 0, its producer's
``set_references``) through Pipeline and Segmenter, with WinCLIP+ on the tiny demo model."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from clipsam import Segmenter
from clipsam.errors import ConfigError
from tests.helpers.data import write_image

REPO = Path(__file__).resolve().parents[2]
CONFIGS = [REPO / "configs" / "demo.yaml", REPO / "configs" / "methods" / "demo" / "winclip.yaml"]


def _image(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (40, 56, 3), dtype=np.uint8)


def _segmenter(k_shot: int, **kwargs) -> Segmenter:
    overrides = {"data.image_size": 64, "model.method_config.k_shot": k_shot}
    return Segmenter.from_config(CONFIGS, overrides=overrides, **kwargs)


@pytest.fixture(scope="module")
def zero_shot() -> Segmenter:
    return _segmenter(0)


@pytest.fixture(scope="module")
def one_shot() -> Segmenter:
    return _segmenter(1, references={"capsule": [_image(1)]})


def test_segmenter_takes_references_and_uses_them(zero_shot: Segmenter, one_shot: Segmenter) -> None:
    assert one_shot.pipeline.reference_count == 1 and one_shot.references == {"capsule": ["<array 0>"]}
    # the reference image itself: every patch and window has its twin among the references, so
    # M_fs = 0 and WinCLIP+ halves the zero-shot map and score ((M + 0) / 2, (s0 + 0) / 2)
    plus, zero = one_shot.segment(_image(1), category="capsule"), zero_shot.segment(_image(1), category="capsule")
    assert plus.image_score == pytest.approx(zero.image_score / 2, abs=1e-6)
    np.testing.assert_allclose(plus.anomaly_map, zero.anomaly_map / 2, atol=1e-6)
    # another image: the few-shot part moves it
    other = one_shot.segment(_image(2), category="capsule")
    assert other.image_score != pytest.approx(zero_shot.segment(_image(2), category="capsule").image_score / 2, abs=1e-6)


def test_a_category_without_references_is_refused_by_name(one_shot: Segmenter) -> None:
    with pytest.raises(ConfigError, match=r"needs 1 good reference image\(s\) of category 'mesh'.*data.reference.*set_references"):
        one_shot.segment(_image(3), category="mesh")


def test_set_references_reads_files_checks_the_count_and_replaces(one_shot: Segmenter, zero_shot: Segmenter, tmp_path: Path) -> None:
    path = write_image(tmp_path / "good_000.png", _image(4))
    one_shot.set_references("stripes", [path])
    assert one_shot.references["stripes"] == [str(path)]
    from_file = one_shot.segment(_image(4), category="stripes")
    one_shot.set_references("stripes", [_image(4)])  # the same pixels in memory: the same result
    assert one_shot.references["stripes"] == ["<array 0>"]
    np.testing.assert_array_equal(one_shot.segment(_image(4), category="stripes").anomaly_map, from_file.anomaly_map)
    with pytest.raises(ConfigError, match=r"needs 1 reference image\(s\) per category and got 2 for category 'stripes'"):
        one_shot.set_references("stripes", [_image(4), _image(5)])
    with pytest.raises(ConfigError, match="takes no reference images"):
        zero_shot.set_references("stripes", [_image(4)])
    with pytest.raises(TypeError, match="a list of images"):
        one_shot.set_references("stripes", _image(4))


def test_pipeline_records_the_references_for_the_report(one_shot: Segmenter) -> None:
    record = one_shot.pipeline.reference_report()["references"]
    assert record["count"] == 1 and record["files"]["capsule"] == ["<array 0>"]
    assert one_shot.pipeline.score_settings()["reference_count"] == 1


def test_onnx_export_of_a_few_shot_method_is_refused_before_writing(tmp_path) -> None:
    """An ONNX graph cannot carry WinCLIP+'s reference images: one line, nothing written."""
    from clipsam.errors import ConfigError
    from clipsam.export import export_onnx

    repo = Path(__file__).resolve().parents[2]
    configs = [str(repo / "configs" / "demo.yaml"), str(repo / "configs" / "methods" / "demo" / "winclip.yaml")]
    out = tmp_path / "onnx"
    with pytest.raises(ConfigError, match="k_shot=1 .* ONNX graph does not carry"):
        export_onnx(None, configs, out, category="capsule", overrides={"model.method_config.k_shot": 1, "data.image_size": 64})
    assert not out.exists()
