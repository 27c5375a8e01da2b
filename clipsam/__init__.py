"""clipsam: zero-shot industrial anomaly segmentation with CLIP adapters and a cascaded SAM.

Implements "Enhancing Zero-Shot Anomaly Detection: CLIP-SAM Collaboration with Cascaded Prompts"
(arXiv 2510.11028) as a PyTorch Lightning framework.
"""

import os as _os

# albumentations asks PyPI for its latest version when it is first imported (a network call at
# import time, and a warning when offline). clipsam never wants that; a user's own setting wins.
_os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
del _os

__version__ = "0.1.0"

__all__ = ["Segmenter", "SegmentResult", "__version__"]


def __getattr__(name: str):  # lazy: `import clipsam` stays light (no torch/Lightning import)
    if name in ("Segmenter", "SegmentResult"):
        from clipsam import api

        return getattr(api, name)
    raise AttributeError(f"module 'clipsam' has no attribute {name!r}")
