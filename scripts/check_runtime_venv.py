"""The ONNX runtime in a fresh virtual environment without torch, against the PyTorch path.

1. creates a venv (``--venv``, default ``runs/runtime_venv``) and installs ``.[runtime]`` into it
   (numpy, Pillow, onnxruntime: no torch), timing the install and measuring the venv's size;
2. runs ``clipsam.runtime.Runtime`` there on every image of ``--images`` (a folder, recursive);
3. runs ``clipsam.Segmenter`` here (this interpreter, with torch) with the same config and weights;
4. prints and writes JSON (``--output``, default ``runs/benchmarks/runtime_venv.json``): per
   image IoU of the masks and |difference| of the image scores, the worst of each, the runtime's
   images/s, whether torch was importable in the venv.

Usage (the demo)::

    clipsam export --ckpt_path runs/demo/version_0/checkpoints/last.ckpt --config configs/demo.yaml \\
        --format onnx --output exports/demo_onnx
    python scripts/check_runtime_venv.py --bundle exports/demo_onnx --config configs/demo.yaml \\
        --ckpt_path runs/demo/version_0/checkpoints/last.ckpt --images data/synthetic/visa
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RUNNER = """
import json, sys, time
import numpy as np
from clipsam.runtime import Runtime
files, cats, out = json.loads(sys.argv[2]), json.loads(sys.argv[3]), sys.argv[4]
rt = Runtime.from_bundle(sys.argv[1])
start = time.perf_counter()
results = []
for i in range(0, len(files), 8):
    results += rt.segment_batch(files[i:i + 8], category=cats[i:i + 8])
seconds = time.perf_counter() - start
np.savez(out, scores=np.asarray([r.image_score for r in results]), **{f"mask{i}": r.mask for i, r in enumerate(results)})
try:
    import torch  # noqa: F401
    has_torch = True
except ImportError:
    has_torch = False
print(json.dumps({"seconds": seconds, "torch_importable": has_torch}))
"""


MASK_FOLDERS = {"masks", "ground_truth", "gt"}


def _category(path: Path, root: Path, known: list[str]) -> str | None:
    """The first folder of ``path`` under ``root`` that names a bundle category, or None."""
    for part in path.relative_to(root).parts:
        if part in known:
            return part
    return None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bundle", required=True, help="an ONNX bundle (clipsam export --format onnx)")
    parser.add_argument("--config", action="append", required=True, help="the config(s) the bundle was exported from")
    parser.add_argument("--ckpt_path", default=None, help="the checkpoint it was exported from (trained methods)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="the same overrides as at export")
    parser.add_argument("--images", required=True, help="a folder of images (recursive)")
    parser.add_argument("--venv", default="runs/runtime_venv")
    parser.add_argument("--output", default="runs/benchmarks/runtime_venv.json")
    args = parser.parse_args()

    import numpy as np
    import yaml

    bundle = json.loads((Path(args.bundle) / "bundle.json").read_text())
    known = list(bundle["categories"])
    root = Path(args.images)
    found = sorted(
        p.resolve() for p in root.rglob("*")
        if p.suffix.lower() in {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"}
        and not MASK_FOLDERS & {part.lower() for part in p.relative_to(root).parts}
    )  # fmt: skip
    root = root.resolve()
    pairs = [(p, _category(p, root, known)) for p in found]
    files = [p for p, c in pairs if c is not None]
    categories = [c for _, c in pairs if c is not None]
    if not files:
        print(f"check_runtime_venv: no images of the bundle's categories ({', '.join(known)}) under {root}", file=sys.stderr)
        return 2

    venv = Path(args.venv)
    python = venv / "bin" / "python"
    start = time.perf_counter()
    if not python.exists():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    subprocess.run([str(python), "-m", "pip", "install", "--quiet", f"{REPO}[runtime]"], check=True)
    install_seconds = time.perf_counter() - start
    size = sum(f.stat().st_size for f in venv.rglob("*") if f.is_file() and not f.is_symlink())

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "runtime.npz"
        done = subprocess.run(
            [str(python), "-c", RUNNER, str(Path(args.bundle).resolve()), json.dumps([str(f) for f in files]), json.dumps(categories), str(out)],
            capture_output=True, text=True, cwd=tmp,
        )  # fmt: skip
        if done.returncode != 0:
            print(f"check_runtime_venv: the runtime failed in {venv}:\n{done.stderr[-3000:]}", file=sys.stderr)
            return 1
        venv_report = json.loads(done.stdout.strip().splitlines()[-1])
        got = np.load(out)
        from clipsam import Segmenter

        overrides = {k: yaml.safe_load(v) for k, v in (s.split("=", 1) for s in args.set)}
        segmenter = Segmenter.from_config(args.config, args.ckpt_path, overrides=overrides)
        rows = []
        for i, (file, category) in enumerate(zip(files, categories)):
            ref = segmenter.segment(str(file), category=category)
            mask = got[f"mask{i}"]
            union = int((mask | ref.mask).sum())
            iou = 1.0 if union == 0 else int((mask & ref.mask).sum()) / union
            rows.append({"image": str(file), "category": category, "iou": iou, "score_diff": abs(float(got["scores"][i]) - ref.image_score)})
    report = {
        "bundle": str(args.bundle),
        "method": f"{bundle['method']}+{bundle['refiner']}",
        "images": len(files),
        "skipped_other_categories": len(found) - len(files),
        "worst_iou": min(r["iou"] for r in rows),
        "worst_image_score_diff": max(r["score_diff"] for r in rows),
        "runtime_images_per_s": len(files) / venv_report["seconds"],
        "torch_importable_in_venv": venv_report["torch_importable"],
        "venv_install_seconds": install_seconds,
        "venv_mb": size / 2**20,
        "per_image": rows,
    }
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(report, indent=2))
    print(json.dumps({k: v for k, v in report.items() if k != "per_image"}, indent=2))
    ok = report["worst_iou"] >= 0.999 and report["worst_image_score_diff"] <= 1e-4 and not report["torch_importable_in_venv"]
    return 0 if ok else 1


if __name__ == "__main__":
    os.environ.setdefault("WANDB_MODE", "offline")
    sys.exit(main())
