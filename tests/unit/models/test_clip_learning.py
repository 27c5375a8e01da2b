"""Learning really happens: adapters trained on some synthetic categories transfer to others.

The zero-shot protocol in miniature: the tiny preset (random frozen backbone, seeded) has its
adapters trained with ``anomaly_loss`` + Adam(lr 1e-3) on four synthetic categories; the pixel
AUROC (sklearn) of the CLIP map on two held-out categories must rise clearly above that of the
same model with its untrained adapters.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from clipsam.losses import anomaly_loss
from clipsam.models.clip import ClipConfig, build_clip_model

synthetic = pytest.importorskip("clipsam.data.synthetic")
roc_auc_score = pytest.importorskip("sklearn.metrics").roc_auc_score

IMAGE_SIZE = 224
TRAIN_CATEGORIES = ("fabric", "mesh", "disk", "capsule")
HELD_OUT_CATEGORIES = ("stripes", "hexnut")
CLIP_MEAN = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(3, 1, 1)
CLIP_STD = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(3, 1, 1)
STEPS, BATCH = 40, 8
MARGIN = 0.15  # measured 0.596 -> 0.791 (seeds 1, 2: 0.555 -> 0.779, 0.546 -> 0.753)


def _dataset(categories: tuple[str, ...], count: int, seed: int):
    """Anomalous images, cycling categories and defect types: (count,3,H,W), (count,H,W), names."""
    rng = np.random.default_rng(seed)
    images, masks, names = [], [], []
    for i in range(count):
        category = categories[i % len(categories)]
        defect = synthetic.DEFECT_TYPES[(i // len(categories)) % len(synthetic.DEFECT_TYPES)]
        image, mask = synthetic.render_sample(category, defect, rng=rng, image_size=IMAGE_SIZE)
        tensor = torch.from_numpy(image).permute(2, 0, 1).float() / 255.0
        images.append((tensor - CLIP_MEAN) / CLIP_STD)
        masks.append(torch.from_numpy(mask).float())
        names.append(category)
    return torch.stack(images), torch.stack(masks), names


def _pixel_auroc(model, images, masks, names) -> float:
    model.eval()
    with torch.no_grad():
        scores = model(images, names).anomaly_map
    model.train()
    return float(roc_auc_score(masks.flatten().numpy().astype(bool), scores.flatten().numpy()))


def test_adapters_learn_transferable_anomaly_maps():
    config = ClipConfig(model_name="clipsam-tiny", pretrained=None, layers=[1, 2, 3, 4], seed=0)
    model = build_clip_model(config, image_size=IMAGE_SIZE)
    train_x, train_m, train_c = _dataset(TRAIN_CATEGORIES, 64, seed=1)
    test_x, test_m, test_c = _dataset(HELD_OUT_CATEGORIES, 24, seed=2)

    before = _pixel_auroc(model, test_x, test_m, test_c)
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    generator = torch.Generator().manual_seed(0)
    model.train()
    for _ in range(STEPS):
        idx = torch.randint(0, len(train_x), (BATCH,), generator=generator)
        out = model(train_x[idx], [train_c[i] for i in idx])
        loss = anomaly_loss(out.layer_probs, train_m[idx])["loss"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    after = _pixel_auroc(model, test_x, test_m, test_c)

    print(f"held-out pixel AUROC: untrained adapters {before:.3f}, trained {after:.3f}")
    assert after > before + MARGIN, (before, after)
    assert after > 0.7, (before, after)
