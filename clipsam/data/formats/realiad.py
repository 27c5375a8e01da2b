"""Real-IAD (Wang et al., CVPR 2024): 30 categories, 5 camera views, read from its json splits.

Layout of the release (licence by request, no public URL; anomalib's ``realiad`` datamodule
reads the same tree)::

    <root>/realiad_1024/<cat>/OK/S0001/<cat>_0001_OK_C1_<time>.jpg              (or realiad_512,
    <root>/realiad_1024/<cat>/NG/<defect>/S0002/<cat>_0002_NG_C3_<time>.jpg      realiad_256,
    <root>/realiad_1024/<cat>/NG/<defect>/S0002/<cat>_0002_NG_C3_<time>_mask.png realiad_raw)
    <root>/realiad_jsons/<subset>/<cat>.json    {"train": [...], "test": [...]}, each entry
                                                {"anomaly_class": "OK" | defect, "image_path",
                                                 "mask_path"} relative to realiad_<res>/<cat>/

Per view: every camera view (C1..C5) of a sample is one image and one :class:`Sample`; the
view is in the file name. ``subset`` picks the json set: ``realiad_jsons`` (default, the
multi-view split), ``realiad_jsons_sv`` (single view) or ``realiad_jsons_fuiad_<r>``
(fully-unsupervised splits with noise ratio r). ``categories`` picks the categories (the
json files of that set), which keeps a run on this 150k-image dataset to a subset. The image
folder is the first of realiad_1024, realiad_512, realiad_256, realiad_raw present. Masks are
0/255 PNGs (threshold 0).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import json
import logging
from pathlib import Path

import numpy as np

from clipsam.data.formats import DatasetFormat, register
from clipsam.data.formats.common import check_root, resolve_categories
from clipsam.data.samples import Sample, save_image
from clipsam.errors import DatasetError

if TYPE_CHECKING:  # the synthetic writers get a source; formats never import the generator
    from clipsam.data.synthetic import SynthSource

__all__ = ["REALIAD_CATEGORIES", "REALIAD_SUBSETS"]

log = logging.getLogger(__name__)

REALIAD_CATEGORIES = (
    "audiojack", "bottle_cap", "button_battery", "end_cap", "eraser", "fire_hood", "mint", "mounts", "pcb",
    "phone_battery", "plastic_nut", "plastic_plug", "porcelain_doll", "regulator", "rolled_strip_base",
    "sim_card_set", "switch", "tape", "terminalblock", "toothbrush", "toy", "toy_brick", "transistor1", "u_block",
    "usb", "usb_adaptor", "vcpill", "wooden_beads", "woodstick", "zipper",
)  # fmt: skip
REALIAD_SUBSETS = (
    "realiad_jsons", "realiad_jsons_sv", "realiad_jsons_fuiad_0.0", "realiad_jsons_fuiad_0.1",
    "realiad_jsons_fuiad_0.2", "realiad_jsons_fuiad_0.4",
)  # fmt: skip
RESOLUTIONS = ("1024", "512", "256", "raw")
_REQUEST = (
    "Real-IAD is distributed on request (licence agreement): apply at https://realiad4ad.github.io/Real-IAD/, "
    "then extract realiad_<resolution>.zip and realiad_jsons.zip into one folder and set data.test.root "
    "(or REALIAD_ROOT) to it"
)


def _resolve(base: Path, category: str, rel: str) -> Path:
    """Json paths are relative to realiad_<res>/<cat>/; some copies include the category."""
    parts = Path(rel).parts
    return base / rel if parts and parts[0] == category else base / category / rel


def _parse_realiad(root: Path, *, categories, split, subset) -> list[Sample]:
    check_root(root, "Real-IAD", fix=_REQUEST)
    subset = subset or "realiad_jsons"
    json_dir = next((d for d in (root / "realiad_jsons" / subset, root / subset) if d.is_dir()), None)
    if json_dir is None:
        raise DatasetError(f"Real-IAD json folder {root / 'realiad_jsons' / subset} is missing: extract realiad_jsons.zip into {root}")
    image_root = next((root / f"realiad_{r}" for r in RESOLUTIONS if (root / f"realiad_{r}").is_dir()), None)
    if image_root is None:
        raise DatasetError(f"no realiad_1024/, realiad_512/, realiad_256/ or realiad_raw/ folder in {root}: {_REQUEST}")
    log.info("Real-IAD: images from %s, splits from %s", image_root, json_dir)
    present = sorted(p.stem for p in json_dir.glob("*.json"))
    chosen = resolve_categories(root, present, categories, name="Real-IAD", official=REALIAD_CATEGORIES,
                                expected=f"{json_dir.name}/<category>.json")
    samples: list[Sample] = []
    for category in chosen:
        path = json_dir / f"{category}.json"
        try:
            meta = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise DatasetError(f"Real-IAD split file {path} is not valid json ({exc}): re-extract realiad_jsons.zip") from exc
        if not isinstance(meta, dict) or split not in meta:
            raise DatasetError(f"Real-IAD split file {path} has no {split!r} list: use the official realiad_jsons")
        for i, entry in enumerate(meta[split]):
            try:
                cls, rel = entry["anomaly_class"], entry["image_path"]
            except (KeyError, TypeError):
                raise DatasetError(f"Real-IAD split file {path}: {split}[{i}] lacks anomaly_class or image_path") from None
            label = 0 if cls == "OK" else 1
            mask = _resolve(image_root, category, entry["mask_path"]) if label and entry.get("mask_path") else None
            samples.append(Sample(_resolve(image_root, category, rel), mask, label, category, "good" if label == 0 else cls))
    return samples


def _synth_realiad(root: Path, src: SynthSource) -> None:
    image_root = root / "realiad_256"
    for category, synth in src.categories(REALIAD_CATEGORIES):
        meta: dict[str, list[dict[str, str | None]]] = {"train": [], "test": []}
        sid = 0
        for part in ("train_good", "test_good", "test_anomalous"):
            for item in src.items(synth, part):
                sid += 1
                view = f"C{1 + item.index % 5}"
                if item.defect is None:
                    rel = f"OK/S{sid:04d}/{category}_{sid:04d}_OK_{view}_20240101000000.jpg"
                    entry = {"category": category, "anomaly_class": "OK", "image_path": rel, "mask_path": None}
                else:
                    stem = f"NG/{item.defect}/S{sid:04d}/{category}_{sid:04d}_NG_{view}_20240101000000"
                    rel = f"{stem}.jpg"
                    save_image(item.mask.astype(np.uint8) * 255, image_root / category / f"{stem}_mask.png")
                    entry = {"category": category, "anomaly_class": item.defect, "image_path": rel,
                             "mask_path": f"{stem}_mask.png"}
                save_image(item.image, image_root / category / rel)
                meta["train" if part == "train_good" else "test"].append(entry)
        out = root / "realiad_jsons" / "realiad_jsons" / f"{category}.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({"meta": {"prefix": "", "normal_class": "OK"}, **meta}, indent=1), encoding="utf-8")


register(
    DatasetFormat(
        key="real_iad", name="Real-IAD", parse=_parse_realiad, categories=REALIAD_CATEGORIES, level="pixel",
        env="REALIAD_ROOT", subsets=REALIAD_SUBSETS, subset_help="the json split set under realiad_jsons/",
        license="CC BY-NC-SA 4.0, by request; https://realiad4ad.github.io/Real-IAD/", synth=_synth_realiad,
    )
)
