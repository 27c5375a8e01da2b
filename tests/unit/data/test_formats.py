"""Every dataset format: its generated layout parses to the expected samples; odd cases behave.

The layouts come from each format's synthetic writer (:func:`generate_formats`). Expected
counts are worked out from the source below: 2 categories x (1 train normal, 1 test normal,
2 test anomalous), except where a dataset's layout differs (noted at each case). Masks are
compared with the renderer's exact masks (:func:`render_sample`).
"""

from __future__ import annotations

import json
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from clipsam.data.datamodule import AnomalyDataModule, DatasetSpec, parse_spec
from clipsam.data.download import DATASETS, MANUAL, download_dataset, extract_archive
from clipsam.data.formats import FORMATS
from clipsam.data.samples import read_image, read_mask, validate_samples
from clipsam.data.synthetic import DEFECT_TYPES, SynthSource, generate_formats, render_sample, sample_rng
from clipsam.errors import ConfigError, DatasetError
from clipsam.metrics.collection import PerCategoryMetrics
from tests.helpers.data import hash_tree

SOURCE = SynthSource(seed=0, image_size=32, num_train_good=1, num_test_good=1, num_test_anomalous=2, num_categories=2)
SYNTH_FORMATS = [k for k, f in FORMATS.items() if f.synth is not None]
LESION = ("isic2016", "clinicdb", "colondb", "kvasir", "endo", "tn3k")
IMAGE_LEVEL = ("headct", "brainmri", "br35h")
ONE_CATEGORY = ("ksdd", "ksdd2", *LESION, *IMAGE_LEVEL)


@pytest.fixture(scope="module")
def roots(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Every format's layout, generated once (read-only: copy before breaking one)."""
    return generate_formats(tmp_path_factory.mktemp("formats"), [*SYNTH_FORMATS, "mvtec", "visa"], source=SOURCE)


def _rendered_masks(key: str) -> list[bytes]:
    """The exact masks of the anomalous images the writer drew for ``key``."""
    official = FORMATS[key].categories if key not in ("mvtec", "visa") else ("x", "y")
    out = []
    for _, synth in SOURCE.categories(official):
        for i in range(SOURCE.num_test_anomalous):
            defect = DEFECT_TYPES[i % len(DEFECT_TYPES)]
            _, mask = render_sample(synth, defect, rng=sample_rng(SOURCE.seed, synth, "test_anomalous", i), image_size=32)
            out.append(mask.tobytes())
    return sorted(out)


def _expected(key: str, split: str) -> tuple[int, int]:
    """(images, anomalous images) of the generated layout, by hand from SOURCE."""
    if key in LESION:
        return 2, 2  # lesion datasets hold only anomalous images (one category, 2 lesions)
    if key in IMAGE_LEVEL:
        return 3, 2  # 1 normal + 2 anomalous, one category
    if key == "ksdd":
        return 4, 2  # no split: train normal + test normal + 2 anomalous
    if key == "ksdd2":
        return (1, 0) if split == "train" else (3, 2)
    return (2, 0) if split == "train" else (6, 4)  # 2 categories


@pytest.mark.parametrize("key", [*SYNTH_FORMATS, "mvtec", "visa"])
def test_every_generated_layout_parses_to_the_expected_samples(key: str, roots: dict[str, Path]) -> None:
    fmt = FORMATS[key]
    for split in fmt.splits:
        samples = fmt.parse_root(roots[key], split=split)
        validate_samples(samples, what=key, require_masks=fmt.has_masks)
        assert (len(samples), sum(s.label for s in samples)) == _expected(key, split), split
        names = [c for c, _ in SOURCE.categories(fmt.categories)] if key not in ("mvtec", "visa") else ["fabric", "stripes"]
        assert sorted({s.category for s in samples}) == sorted(names[:1] if key in ONE_CATEGORY else names)
        if key in IMAGE_LEVEL:
            assert all(s.mask_path is None for s in samples)
    if not fmt.has_masks:
        return
    test = [s for s in fmt.parse_root(roots[key], split="test") if s.label == 1]
    masks = sorted(read_mask(s.mask_path, threshold=s.mask_threshold).tobytes() for s in test)
    assert masks == _rendered_masks(key), "binarised masks equal the rendered masks"


def test_generation_is_deterministic(tmp_path: Path) -> None:
    keys = ["mvtec_loco", "kvasir", "real_iad"]
    a = generate_formats(tmp_path / "a", keys, source=SOURCE)
    b = generate_formats(tmp_path / "b", keys, source=SOURCE)
    for key in keys:
        assert hash_tree(a[key]) == hash_tree(b[key])
    with pytest.raises(DatasetError, match="already exists and is not empty"):
        generate_formats(tmp_path / "a", ["kvasir"], source=SOURCE)


@pytest.mark.parametrize("key", ["dagm", "ksdd", "headct"])
def test_grayscale_files_load_as_three_equal_channels(key: str, roots: dict[str, Path]) -> None:
    sample = FORMATS[key].parse_root(roots[key], split="test")[0]
    with Image.open(sample.image_path) as im:
        assert im.mode == "L"
    rgb = read_image(sample.image_path)
    assert rgb.shape[2] == 3 and np.array_equal(rgb[..., 0], rgb[..., 1]) and np.array_equal(rgb[..., 0], rgb[..., 2])


def test_loco_masks_are_the_union_of_non_binary_files(roots: dict[str, Path]) -> None:
    anomalous = [s for s in FORMATS["mvtec_loco"].parse_root(roots["mvtec_loco"]) if s.label]
    folder = anomalous[0].mask_path
    assert folder.is_dir() and sorted(p.name for p in folder.iterdir()) == ["000.png", "001.png"]
    values = {int(v) for f in folder.iterdir() for v in np.unique(np.asarray(Image.open(f)))}
    assert values == {0, 21, 37}, "defect-id values, not 0/255"
    union = read_mask(folder)
    left, right = read_mask(folder / "000.png"), read_mask(folder / "001.png")
    assert np.array_equal(union, left | right) and union.sum() > max(left.sum(), right.sum())


@pytest.mark.parametrize("key", ["kvasir", "tn3k", "clinicdb"])
def test_lossy_and_antialiased_masks_need_the_127_threshold(key: str, roots: dict[str, Path]) -> None:
    for sample in FORMATS[key].parse_root(roots[key]):
        assert sample.mask_threshold == 127
        strict = read_mask(sample.mask_path, threshold=127)
        if sample.mask_path.suffix == ".jpg":
            # "any non-zero" on a JPEG would count its compression noise: refused, not misread
            with pytest.raises(DatasetError, match="is a JPEG"):
                read_mask(sample.mask_path)
            continue
        loose = read_mask(sample.mask_path)
        assert loose.sum() > strict.sum(), "any-non-zero would count the soft edge as lesion"


def test_loco_subsets_split_logical_and_structural(roots: dict[str, Path]) -> None:
    fmt = FORMATS["mvtec_loco"]
    both = fmt.parse_root(roots["mvtec_loco"])
    logical = fmt.parse_root(roots["mvtec_loco"], subset="logical")
    structural = fmt.parse_root(roots["mvtec_loco"], subset="structural")
    # anomalous image 0 of each category is logical, image 1 structural; normals in both
    assert {s.defect_type for s in logical} == {"good", "logical_anomalies"}
    assert {s.defect_type for s in structural} == {"good", "structural_anomalies"}
    assert len(logical) == len(structural) == 4 and len(both) == 6
    with pytest.raises(ConfigError, match="accepts logical, structural"):
        fmt.parse_root(roots["mvtec_loco"], subset="semantic")
    with pytest.raises(ConfigError, match="takes no subset"):
        FORMATS["mpdd"].parse_root(roots["mpdd"], subset="logical")


def test_missing_masks_are_named(roots: dict[str, Path], tmp_path: Path) -> None:
    mpdd = Path(shutil.copytree(roots["mpdd"], tmp_path / "mpdd"))
    victim = next(mpdd.rglob("*_mask.png"))
    victim.unlink()
    with pytest.raises(DatasetError, match=str(victim)):
        validate_samples(FORMATS["mpdd"].parse_root(mpdd), what="mpdd")
    colon = Path(shutil.copytree(roots["colondb"], tmp_path / "colondb"))
    (colon / "masks" / "1.png").unlink()
    with pytest.raises(DatasetError, match=r"images/1\.png has no mask in .*masks"):
        FORMATS["colondb"].parse_root(colon)
    loco = Path(shutil.copytree(roots["mvtec_loco"], tmp_path / "loco"))
    folder = next(p for p in loco.rglob("ground_truth/*/*") if p.is_dir())
    for f in folder.iterdir():
        f.unlink()
    with pytest.raises(DatasetError, match="holds no mask files"):
        validate_samples(FORMATS["mvtec_loco"].parse_root(loco), what="loco")


def test_wrong_roots_and_splits_are_one_clear_error(roots: dict[str, Path], tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match=r"no MPDD category folders .* found in"):
        FORMATS["mpdd"].parse_root(roots["mpdd"].parent / "btad")
    with pytest.raises(DatasetError, match="has no image and mask folders.*it contains"):
        FORMATS["kvasir"].parse_root(roots["mpdd"])
    with pytest.raises(DatasetError, match="has no yes/ and no/ folders"):
        FORMATS["br35h"].parse_root(roots["mpdd"])
    with pytest.raises(ConfigError, match=r"data.test.split is 'train' but KolektorSDD has only 'test'"):
        parse_spec(DatasetSpec(format="ksdd", root=str(roots["ksdd"]), split="train"))
    with pytest.raises(ConfigError, match="use one of mvtec, visa, folder, mpdd"):
        parse_spec(DatasetSpec(format="mvtec2", root=str(tmp_path)))
    with pytest.raises(DatasetError, match=r"MPDD root .* does not exist: set data.test.root or the MPDD_ROOT"):
        parse_spec(DatasetSpec(format="mpdd", root=str(tmp_path / "nope")))
    with pytest.raises(DatasetError, match="unknown MPDD category 'bottle'"):
        FORMATS["mpdd"].parse_root(roots["mpdd"], categories=["bottle"])
    with pytest.raises(DatasetError, match="MPDD category 'tubes' is missing"):
        FORMATS["mpdd"].parse_root(roots["mpdd"], categories=["tubes"])


def test_dagm_label_without_image_is_reported(roots: dict[str, Path], tmp_path: Path) -> None:
    dagm = Path(shutil.copytree(roots["dagm"], tmp_path / "dagm"))
    image = next(p for p in (dagm / "Class1" / "Test").glob("*.PNG") if (p.parent / "Label" / f"{p.stem}_label.PNG").exists())
    image.unlink()
    with pytest.raises(DatasetError, match=f"has no image {image.with_suffix('')}"):
        FORMATS["dagm"].parse_root(dagm)


def test_real_iad_category_subset_and_path_variants(roots: dict[str, Path], tmp_path: Path) -> None:
    fmt = FORMATS["real_iad"]
    one = fmt.parse_root(roots["real_iad"], categories=["bottle_cap"])
    assert {s.category for s in one} == {"bottle_cap"} and len(one) == 3
    assert all("_C" in s.image_path.name for s in one), "per view: the camera is in the file name"
    # a json whose paths include the category folder resolves to the same files
    root = Path(shutil.copytree(roots["real_iad"], tmp_path / "riad"))
    path = root / "realiad_jsons" / "realiad_jsons" / "bottle_cap.json"
    meta = json.loads(path.read_text())
    for entry in meta["test"]:
        entry["image_path"] = "bottle_cap/" + entry["image_path"]
    path.write_text(json.dumps(meta))
    again = fmt.parse_root(root, categories=["bottle_cap"])
    assert [s.image_path.relative_to(root) for s in again] == [s.image_path.relative_to(roots["real_iad"]) for s in one]
    with pytest.raises(DatasetError, match=r"realiad_jsons_sv is missing: extract realiad_jsons.zip"):
        fmt.parse_root(root, subset="realiad_jsons_sv")
    with pytest.raises(DatasetError, match="distributed on request"):
        fmt.parse_root(tmp_path / "absent")


def test_image_level_datasets_have_no_masks_anywhere(roots: dict[str, Path]) -> None:
    dm = AnomalyDataModule(test=DatasetSpec(format="headct", root=str(roots["headct"])), image_size=16, num_workers=0)
    dm.setup("test")
    items = [dm.test_dataset[i] for i in range(len(dm.test_dataset))]
    assert [int(it["label"]) for it in items] == [0, 1, 1]
    assert not any(bool(it["has_mask"]) for it in items), "normal images too: pixel metrics would use them alone"
    # the metrics then report image metrics only: no pixel keys (shown as n/a), no crash
    metric = PerCategoryMetrics(["brain"])
    batch = torch.utils.data.default_collate(items)
    metric.update(
        torch.rand(3, 16, 16), batch["mask"] > 0.5, image_scores=torch.tensor([0.1, 0.9, 0.8]), labels=batch["label"],
        category_ids=torch.zeros(3, dtype=torch.long), sample_ids=batch["index"], has_mask=batch["has_mask"],
    )
    result = metric.compute()
    assert result["per_category"]["brain"]["image_auroc"] == 1.0
    assert not any(k.startswith("pixel") for k in result["mean"])
    with pytest.raises(ConfigError, match="HeadCT has image labels only, and training needs pixel masks"):
        AnomalyDataModule(train=DatasetSpec(format="headct", root=str(roots["headct"]))).setup("fit")


def test_every_format_is_documented_and_downloadable_or_explained() -> None:
    docs = (Path(__file__).resolve().parents[3] / "docs" / "datasets.md").read_text()
    for key, fmt in FORMATS.items():
        assert f"`{key}`" in docs, f"docs/datasets.md lacks {key}"
        if key != "folder":
            assert key in DATASETS or key in MANUAL, key
            assert fmt.license and fmt.env


def test_manual_and_unverified_downloads_explain_themselves(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="Real-IAD has no direct public download: Real-IAD is distributed on request"):
        download_dataset("real_iad", tmp_path)
    with pytest.raises(DatasetError, match="publishes no sha256.*--allow-unverified"):
        download_dataset("kvasir", tmp_path)
    assert not any(tmp_path.iterdir()), "nothing is downloaded"


def test_unverified_zip_download_extracts_and_finds_the_layout(roots: dict[str, Path], tmp_path: Path) -> None:
    archive = tmp_path / "kvasir-seg.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for path in sorted(roots["kvasir"].rglob("*")):
            zf.write(path, path.relative_to(roots["kvasir"]).as_posix())
    payload = archive.read_bytes()

    class Server:
        def __call__(self, request):
            import io

            response = io.BytesIO(payload)
            response.status, response.headers, response.getcode = 200, {"Content-Length": str(len(payload))}, lambda: 200
            return response

    root = download_dataset("kvasir", tmp_path / "data", progress=False, allow_unverified=True, opener=Server())
    assert len(FORMATS["kvasir"].parse_root(root)) == 2
    assert (tmp_path / "data" / "kvasir-seg.zip").is_file()


def test_zip_extraction_rejects_unsafe_members(tmp_path: Path) -> None:
    archive = tmp_path / "evil.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("ok.txt", b"fine")
        zf.writestr("../outside.txt", b"pwned")
    with pytest.raises(DatasetError, match="unsafe member '../outside.txt'"):
        extract_archive(archive, tmp_path / "out", progress=False)
    assert not (tmp_path / "outside.txt").exists() and not (tmp_path / "out" / "ok.txt").exists()


def test_synth_cli_writes_the_named_formats(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from clipsam.data.cli import data_main

    args = ["synth", "--root", str(tmp_path / "s"), "--formats", "dagm", "br35h", "--image-size", "32",
            "--num-train-good", "1", "--num-test-good", "1", "--num-test-anomalous", "1", "--num-categories", "1"]
    assert data_main(args) == 0
    assert sorted(p.name for p in (tmp_path / "s").iterdir()) == ["br35h", "dagm"]
    assert len(FORMATS["dagm"].parse_root(tmp_path / "s" / "dagm")) == 2
    assert "format: dagm" in capsys.readouterr().out
    assert data_main(args) == 2, "a second run does not overwrite"


def test_mask_folder_with_files_of_different_sizes_is_refused(roots: dict[str, Path], tmp_path: Path) -> None:
    loco = Path(shutil.copytree(roots["mvtec_loco"], tmp_path / "loco"))
    folder = next(p for p in loco.rglob("ground_truth/*/*") if p.is_dir())
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(folder / "002.png")
    with pytest.raises(DatasetError, match=f"the mask files in {folder} differ in size"):
        validate_samples(FORMATS["mvtec_loco"].parse_root(loco), what="loco")
    with pytest.raises(DatasetError, match="differ in size"):
        read_mask(folder)


def test_data_cli_lists_formats_and_explains_manual_downloads(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from clipsam.data.cli import data_main

    assert data_main(["list"]) == 0
    listed = [line.split()[0] for line in capsys.readouterr().out.splitlines()]
    assert listed == list(FORMATS)
    assert data_main(["download", "mpdd", "--root", str(tmp_path / "m")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("clipsam: error: MPDD has no direct public download") and "github.com/stepanje/MPDD" in err
    assert not (tmp_path / "m").exists()
