"""PPG as clipsam computed it one image at a time before the batched rewrite (reference for tests).

Host-side ``cv2.dilate`` for the ring, per-ring-pixel similarities and a stable sort per image:
the batched :func:`clipsam.prompting.generate_point_prompts_batched` must give the same points in
the same order.
"""

from __future__ import annotations

import cv2
import numpy as np
import torch

from clipsam.prompting import _mean_feature, _pixel_similarity, _stable_topk, structuring_element


def reference_point_prompts(anomaly_map, sam_features, *, num_positive, num_negative, threshold, kernel_shape, kernel_size):
    kernel = structuring_element(kernel_shape, kernel_size).numpy().astype(np.uint8)
    height, width = anomaly_map.shape
    amap = anomaly_map.to(torch.float32)
    region = amap >= threshold
    if not bool(region.any()):
        return torch.zeros((0, 2)), torch.zeros((0,), dtype=torch.int64)
    inside = region.flatten().nonzero().squeeze(1)
    pos_idx = inside[_stable_topk(amap.flatten()[inside], num_positive, largest=True)]
    dilated = torch.from_numpy(cv2.dilate(region.numpy().astype(np.uint8), kernel).astype(bool))
    ring_idx = (dilated & ~region).flatten().nonzero().squeeze(1)
    if num_negative > 0 and ring_idx.numel() > 0:
        mean_a = _mean_feature(sam_features, region)
        similarity = _pixel_similarity(sam_features, mean_a, ring_idx // width, ring_idx % width, (height, width))
        neg_idx = ring_idx[_stable_topk(similarity, num_negative, largest=False)]
    else:
        neg_idx = ring_idx[:0]
    idx = torch.cat((pos_idx, neg_idx))
    coords = torch.stack((idx % width, idx // width), dim=1).to(torch.float32)
    labels = torch.cat((torch.ones_like(pos_idx), torch.zeros_like(neg_idx)))
    return coords, labels
