"""clipsam: zero-shot industrial anomaly segmentation with CLIP adapters and a cascaded SAM.

Implements "Enhancing Zero-Shot Anomaly Detection: CLIP-SAM Collaboration with Cascaded Prompts"
(arXiv 2510.11028) as a PyTorch Lightning framework.
"""

__version__ = "0.1.0"
