"""Comparison systems that are not CLIP-adapter map producers (SAA / SAA+ in :mod:`clipsam.baselines.saa`).

Importing this package imports nothing heavy; each module builds its models only when asked.
"""
