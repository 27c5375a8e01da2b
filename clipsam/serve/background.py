"""Run the service on a background thread of this process (tests, notebooks, benchmarks).

``with BackgroundServer(make_app(backend)) as server: urllib.request.urlopen(server.url + "health")``
binds a port (0: a free one), starts the worker, and on exit stops accepting, answers every
queued request and ends the worker, as a SIGTERM does for ``clipsam serve``.
"""

from __future__ import annotations

import asyncio
import threading
from types import TracebackType

from aiohttp import web

from clipsam.serve.app import STATE, ServeState

__all__ = ["BackgroundServer"]


class BackgroundServer:
    """An aiohttp application served from a daemon thread with its own event loop.

    Args:
        app: from :func:`clipsam.serve.make_app` (with ``autostart=True``, the default).
        host / port: where to listen (port 0: a free one; :attr:`url` says which).
        shutdown_timeout_s: how long :meth:`stop` waits for in-flight answers.
    """

    def __init__(self, app: web.Application, *, host: str = "127.0.0.1", port: int = 0, shutdown_timeout_s: float = 30.0) -> None:
        self.app = app
        self.host = host
        self.port = port
        self.shutdown_timeout_s = shutdown_timeout_s
        self.url = ""
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._started = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="clipsam-serve-http", daemon=True)

    @property
    def state(self) -> ServeState:
        """The application's shared state (settings, batcher, flags)."""
        return self.app[STATE]

    def start(self, timeout: float = 30.0) -> BackgroundServer:
        """Start serving; returns once the port is bound (the model may still be loading)."""
        self._thread.start()
        if not self._started.wait(timeout):
            raise TimeoutError(f"the server did not bind within {timeout} s")
        if self._error is not None:
            raise self._error
        return self

    def stop(self, timeout: float = 60.0) -> None:
        """Stop accepting, answer what is queued, end the worker and the thread."""
        if self._loop is not None and self._stop is not None and self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(timeout)

    def __enter__(self) -> BackgroundServer:
        return self.start()

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None, tb: TracebackType | None) -> None:
        self.stop()

    def _run(self) -> None:
        try:
            asyncio.run(self._serve())
        except BaseException as exc:  # noqa: BLE001 - handed to start()
            self._error = exc
            self._started.set()

    async def _serve(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        runner = web.AppRunner(self.app, handle_signals=False, access_log=None, shutdown_timeout=self.shutdown_timeout_s)
        await runner.setup()
        try:
            site = web.TCPSite(runner, self.host, self.port)
            await site.start()
            self.port = runner.addresses[0][1]
            shown = f"[{self.host}]" if ":" in self.host else self.host
            self.url = f"http://{shown}:{self.port}/"
            self._started.set()
            await self._stop.wait()
        finally:
            await runner.cleanup()
