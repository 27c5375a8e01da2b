"""The baselines' tiny models run single-threaded: their tensors are far too small to gain from
intra-op threads, and on a shared 2-core machine two threads per process thrash (measured:
the tiny text tower took 1.8 s with 2 threads and 0.3 s with 1 under load)."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
