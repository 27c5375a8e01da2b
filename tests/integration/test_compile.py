"""``model.clip.compile`` and ``model.sam.compile``: the compiled stages give the same results.

torch.compile (inductor) on the CPU needs a C++ compiler and takes about half a minute for the
tiny models, hence ``slow``. Checks that the compile switches reach the frozen CLIP blocks (with
the SDPA attention installed on them) and SAM's image encoder, and that ``clipsam test`` reports
the same metrics with and without them.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from tests.integration.conftest import fast_args, run_cli

pytestmark = pytest.mark.slow


@pytest.mark.skipif(shutil.which("cc") is None and shutil.which("gcc") is None, reason="inductor needs a C compiler")
def test_compiled_clip_and_sam_report_the_same_metrics(in_tmp_cwd: Path) -> None:
    args = ["test", *fast_args(in_tmp_cwd), "--allow_untrained=true"]
    plain = run_cli(args)
    # its own embedding cache, or the compiled encoder would be skipped for the cached embeddings
    compiled = run_cli(
        [*args, "--model.clip.compile=true", "--model.sam.compile=true", f"--model.sam.embedding_cache_dir={in_tmp_cwd / 'emb_compiled'}"]
    )
    assert compiled.model.refiner.encoder_calls > 0, "the compiled encoder never ran"
    blocks = compiled.model.clip_model.clip.visual.transformer.resblocks
    assert all(block._compiled_call_impl is not None for block in blocks), "model.clip.compile did not compile the blocks"
    assert compiled.model.refiner.encoder is not compiled.model.refiner.sam.image_encoder, "model.sam.compile did not compile the encoder"
    results = [json.loads((Path(run.trainer.log_dir) / "test_results.json").read_text())["results"]["per_category"] for run in (plain, compiled)]
    assert sorted(results[0]) == sorted(results[1]) == ["capsule", "mesh", "stripes"]
    for category, values in results[0].items():
        for key, value in values.items():
            if isinstance(value, float):
                assert abs(results[1][category][key] - value) <= 5e-3, f"{category} {key}: {value} vs {results[1][category][key]}"
