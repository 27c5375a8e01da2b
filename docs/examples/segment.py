"""Segment images from Python with a trained clipsam model (notebook-style: run cell by cell).

    python docs/examples/segment.py CHECKPOINT CONFIG [THRESHOLDS] IMAGE [IMAGE ...]
    python docs/examples/segment.py BUNDLE_DIR IMAGE [IMAGE ...]

CHECKPOINT is a `clipsam fit` checkpoint and CONFIG its YAML; THRESHOLDS (optional) the
thresholds.json that `clipsam test` wrote; BUNDLE_DIR a folder from `clipsam export --format
bundle`. The test suite runs this file (tests/integration/test_production.py).
"""

# %% Load the model once: from a checkpoint + config, or from an exported bundle.
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from clipsam import Segmenter

args = sys.argv[1:]
if Path(args[0]).is_dir():  # an exported bundle carries its config and thresholds
    segmenter = Segmenter.from_bundle(args[0], device="auto")
    images = args[1:]
else:
    ckpt, config, rest = args[0], args[1], args[2:]
    thresholds = rest.pop(0) if rest and rest[0].endswith(".json") else None
    segmenter = Segmenter.from_checkpoint(ckpt, config, thresholds=thresholds, device="auto")
    images = rest

# %% One image: a path, a numpy array (H, W, 3) uint8 RGB, or a PIL image.
result = segmenter.segment(images[0])
print(f"{images[0]}: score {result.image_score:.3f}, threshold {result.image_threshold:.3f} "
      f"({result.threshold_scope}) -> {'ANOMALOUS' if result.label else 'normal'}")
print(f"mask {result.mask.shape} {result.mask.dtype}, {int(result.mask.sum())} anomalous pixels; "
      f"anomaly map in [{result.anomaly_map.min():.2f}, {result.anomaly_map.max():.2f}]")

# %% Arrays work the same; the mask always has the input's size.
array = np.asarray(Image.open(images[0]).convert("RGB"))
same = segmenter.segment(array, category=result.category)
assert same.mask.shape == array.shape[:2]

# %% Many images: batched, one result per image, nothing written to disk.
for path, res in zip(images, segmenter.segment_batch(images)):
    print(f"{Path(path).name}: label {int(res.label)} score {res.image_score:.3f} pixels {int(res.mask.sum())}")
