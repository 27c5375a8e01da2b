"""``clipsam serve``: an HTTP service around an exported ONNX bundle (docs/serve.md).

Imports only the standard library, numpy, Pillow, aiohttp and ``clipsam.errors`` (and
``clipsam.runtime`` when a bundle is loaded), so it runs on a machine without torch
(``pip install 'clipsam[serve]'``).

- :func:`serve_main`: the ``clipsam serve`` command.
- :func:`make_app`: the aiohttp application around any backend with ``segment_batch`` /
  ``info`` / ``categories`` (tests pass :class:`clipsam.serve.fake.FakeBackend`).
- :func:`run_server`: serve a backend until SIGTERM, draining the queue.
"""

from __future__ import annotations

from clipsam.serve.app import make_app
from clipsam.serve.server import run_server, serve_main
from clipsam.serve.settings import ServeSettings

__all__ = ["ServeSettings", "make_app", "run_server", "serve_main"]
