"""clipsam: zero-shot industrial anomaly segmentation with CLIP adapters and a cascaded SAM.

Implements "Enhancing Zero-Shot Anomaly Detection: CLIP-SAM Collaboration with Cascaded Prompts"
(arXiv 2510.11028) as a PyTorch Lightning framework.
"""

__version__ = "0.1.0"

__all__ = ["Segmenter", "SegmentResult", "__version__"]


def __getattr__(name: str):  # lazy: `import clipsam` stays light (no torch/Lightning import)
    if name in ("Segmenter", "SegmentResult"):
        from clipsam import api

        return getattr(api, name)
    raise AttributeError(f"module 'clipsam' has no attribute {name!r}")
