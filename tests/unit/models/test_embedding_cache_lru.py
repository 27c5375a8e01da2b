"""The SAM embedding cache stays under its size bound, dropping the least recently used entries."""

from __future__ import annotations

import os
import time

import torch

from clipsam.models.sam import EmbeddingCache


def test_lru_eviction_by_bytes(tmp_path) -> None:
    emb = torch.zeros(1, 4, 16, 16)  # 4 KiB of float32 + torch file overhead
    probe = EmbeddingCache(tmp_path / "probe")
    probe.save("aa" + "0" * 62, emb)
    entry = probe.path("aa" + "0" * 62).stat().st_size
    cache = EmbeddingCache(tmp_path / "cache", max_bytes=int(3.5 * entry))  # room for 3 entries
    keys = [f"{i:02d}" + "0" * 62 for i in range(5)]
    for i, key in enumerate(keys[:3]):
        cache.save(key, emb + i)
        os.utime(cache.path(key), ns=(time.time_ns() - (10 - i) * 10**9,) * 2)  # distinct ages
    assert cache.load(keys[0]) is not None  # key 0 becomes the most recently used
    cache.save(keys[3], emb + 3)  # over the bound: the least recently used (key 1) goes first
    present = [k for k in keys if cache.path(k).is_file()]
    assert keys[1] not in present and keys[0] in present and keys[3] in present
    total = sum(p.stat().st_size for p in (tmp_path / "cache").glob("*/*.pt"))
    assert total <= 3.5 * entry
    unbounded = EmbeddingCache(tmp_path / "free")
    for key in keys:
        unbounded.save(key, emb)
    assert all(unbounded.path(k).is_file() for k in keys)
