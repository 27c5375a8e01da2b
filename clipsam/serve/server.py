"""Running the service: ``serve_main`` (``clipsam serve``) and ``run_server`` (any backend).

Lifecycle: bind the port and print the URL; load the model and run one warm-up image on the
worker thread (``/health`` answers 503 meanwhile, 200 after); serve; on SIGTERM or SIGINT stop
accepting connections, answer every request already received or queued, and return 0.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TextIO

from aiohttp import web

from clipsam.errors import ConfigError
from clipsam.serve.app import STATE, check_default_category, make_app, start_worker
from clipsam.serve.batcher import Backend
from clipsam.serve.settings import ServeSettings, parse_settings, token_file_is_private

__all__ = ["load_runtime", "run_server", "serve_main", "service_url"]

log = logging.getLogger("clipsam.serve")


def _configure_logging() -> None:
    """One-line log records on stderr (once per process)."""
    if log.handlers:
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("clipsam serve: %(message)s"))
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False


def service_url(host: str, port: int) -> str:
    """``http://host:port/`` (IPv6 literals in brackets)."""
    shown = f"[{host}]" if ":" in host and not host.startswith("[") else host
    return f"http://{shown}:{port}/"


def load_runtime(bundle: Path, providers: list[str] | None = None) -> Backend:
    """``clipsam.runtime.Runtime.from_bundle(bundle)``, imported only now (no torch needed).

    Raises:
        ConfigError: the runtime's dependencies (onnxruntime) are not installed.
    """
    try:
        from clipsam.runtime import Runtime
    except ImportError as exc:
        raise ConfigError(
            f"clipsam serve needs the ONNX runtime ({exc}): install it with `pip install 'clipsam[serve]'`"
        ) from exc
    # The service decodes each upload as a file (RGB, the bundle's bit depth: decode_image) and
    # hands the runtime RGB arrays, whatever channel order the bundle gives camera arrays.
    return Runtime.from_bundle(bundle, providers=providers, color_order="rgb")


def check_bundle_dir(bundle: Path) -> None:
    """Raise ConfigError unless ``bundle`` is a folder holding ``bundle.json``."""
    if not bundle.is_dir():
        raise ConfigError(f"--bundle {bundle} is not a folder: give the folder `clipsam export --format onnx` wrote")
    if not (bundle / "bundle.json").is_file():
        raise ConfigError(f"--bundle {bundle} has no bundle.json: give the folder `clipsam export --format onnx` wrote")


def _with_category_check(loader: Callable[[], Backend], category: str | None) -> Callable[[], Backend]:
    """``loader`` followed by the check that ``--category`` is one of the backend's."""

    def load() -> Backend:
        started = time.perf_counter()
        backend = loader()
        check_default_category(category, backend)
        log.info("model loaded in %.1f s; running the warm-up image", time.perf_counter() - started)
        return backend

    return load


async def _serve(app: web.Application, settings: ServeSettings, label: str, out: TextIO) -> BaseException | None:
    """Bind, announce, start the worker, wait for a signal (or a fatal load error), drain."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    fatal: list[BaseException] = []
    state = app[STATE]

    def on_fatal(exc: BaseException) -> None:
        fatal.append(exc)
        stop.set()

    def on_signal(name: str) -> None:
        if not stop.is_set():
            log.info("%s: no new connections; answering the %d queued request(s), then exiting", name, state.batcher.queued())
        stop.set()

    state.on_fatal = on_fatal
    state.batcher.on_ready = lambda: log.info("ready")
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal, sig.name)
    runner = web.AppRunner(app, handle_signals=False, access_log=None, shutdown_timeout=settings.shutdown_timeout_s)
    await runner.setup()
    site = web.TCPSite(runner, settings.host, settings.port)
    try:
        await site.start()
    except OSError as exc:
        await runner.cleanup()
        raise ConfigError(
            f"cannot listen on --host {settings.host} --port {settings.port}: {exc.strerror or exc}; "
            "choose another --port (0 picks a free one)"
        ) from None
    port = runner.addresses[0][1]
    print(f"clipsam serve: {service_url(settings.host, port)} (bundle {label}; GET /health is 200 once the model is ready)", file=out, flush=True)
    start_worker(app, loop)
    await stop.wait()
    await runner.cleanup()  # stops the listener, waits for handlers, then drains the worker
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.remove_signal_handler(sig)
    return fatal[0] if fatal else None


def run_server(
    settings: ServeSettings,
    *,
    backend: Backend | None = None,
    loader: Callable[[], Backend] | None = None,
    label: str = "",
    out: TextIO | None = None,
) -> int:
    """Serve ``backend`` (or what ``loader`` builds) until SIGTERM/SIGINT; 0 after a clean drain.

    Raises:
        ConfigError: the port cannot be bound, or ``settings.category`` is unknown.
        Exception: what loading or warming up the model raised (the server stops first).
    """
    _configure_logging()
    if not settings.is_loopback and settings.token is None:
        log.warning("listening on %s without --token-file: anyone who can reach this port can use the model", settings.host)
    if loader is not None:
        loader = _with_category_check(loader, settings.category)
    app = make_app(backend, loader=loader, settings=settings, autostart=False)
    failure = asyncio.run(_serve(app, settings, label or "in-process backend", out or sys.stdout))
    if failure is not None:
        raise failure
    log.info("stopped: every request was answered")
    return 0


def serve_main(argv: list[str]) -> int:
    """``clipsam serve --bundle DIR [options]``: serve an exported ONNX bundle over HTTP.

    Returns 0 after SIGTERM/SIGINT once every received request is answered. Errors the user can
    fix (a missing bundle or token file, a busy port, an unknown ``--category``) raise ConfigError.
    """
    args, settings = parse_settings(argv)
    bundle = Path(args.bundle)
    check_bundle_dir(bundle)
    if args.token_file and not token_file_is_private(args.token_file):
        _configure_logging()
        log.warning("--token-file %s can be read by other users: `chmod 600 %s`", args.token_file, args.token_file)
    providers = [p.strip() for p in args.providers.split(",") if p.strip()] if args.providers else None
    return run_server(settings, loader=lambda: load_runtime(bundle, providers), label=str(bundle))
