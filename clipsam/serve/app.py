"""The aiohttp application of ``clipsam serve``: routes, auth, limits and JSON errors.

Routes: ``POST /segment`` (an image -> mask, scores, label), ``GET /health`` (200 once the model
is loaded and warmed up, 503 before), ``GET /info`` (the bundle's metadata), ``GET /`` and
``/static/*`` (the web page). Every error is ``{"error": "one line"}`` with a 4xx/5xx status;
no traceback ever reaches a client (they go to the server's log).
"""

from __future__ import annotations

import asyncio
import functools
import hmac
import logging
import math
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from aiohttp import web

from clipsam.errors import ClipSamError, ConfigError
from clipsam.serve.batcher import Backend, Batcher, Closed, QueueFull
from clipsam.serve.imaging import (
    BadImage,
    ImageTooLarge,
    decode_image,
    mask_boxes,
    png_base64,
    scores_to_uint8,
)
from clipsam.serve.settings import ServeSettings

__all__ = ["STATE", "ServeState", "check_default_category", "make_app", "result_payload", "start_worker"]

log = logging.getLogger("clipsam.serve")

STATIC_DIR = Path(__file__).resolve().parent / "static"
#: Paths served without the bearer token: the health probe and the page's static files (they
#: hold no data; the page asks for the token and sends it with its API calls).
PUBLIC_PATHS = frozenset({"/health", "/"})
PUBLIC_PREFIXES = ("/static/",)
#: Content types accepted as a raw image body.
RAW_TYPES = ("application/octet-stream",)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@dataclass
class ServeState:
    """What the handlers share: settings, the worker and the service's lifecycle flags."""

    settings: ServeSettings
    batcher: Batcher
    draining: bool = False
    failure: BaseException | None = None
    on_fatal: Callable[[BaseException], None] | None = None

    @property
    def backend(self) -> Backend | None:
        """The loaded backend (None while loading)."""
        return self.batcher.backend if self.batcher.ready.is_set() else None


STATE = web.AppKey("clipsam_serve_state", ServeState)


class ApiError(Exception):
    """An answer other than 200: HTTP status and a one-line message."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def error_response(status: int, message: str) -> web.Response:
    """``{"error": message}`` with ``status``; the message is cut to its first line."""
    line = (message.strip().splitlines() or ["error"])[0]
    return web.json_response({"error": line}, status=status)


@web.middleware
async def errors_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Turn every failure into a JSON error; log unexpected ones with their traceback."""
    try:
        return await handler(request)
    except ApiError as exc:
        return error_response(exc.status, exc.message)
    except web.HTTPRequestEntityTooLarge:
        limit = request.app[STATE].settings.max_request_mb
        return error_response(413, f"the request is larger than --max-request-mb {limit:g} MiB")
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        return error_response(exc.status, exc.reason or "error")
    except asyncio.CancelledError:
        raise
    except Exception:
        log.exception("unexpected error answering %s %s", request.method, request.path)
        return error_response(500, "internal server error (the traceback is in the server's log)")


def _is_public(path: str) -> bool:
    return path in PUBLIC_PATHS or path.startswith(PUBLIC_PREFIXES)


@web.middleware
async def auth_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Require ``Authorization: Bearer <token>`` when a token is set (not for public paths)."""
    token = request.app[STATE].settings.token
    if token is None or _is_public(request.path):
        return await handler(request)
    header = request.headers.get("Authorization", "")
    scheme, _, given = header.partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), token.encode()):
        response = error_response(401, "missing or wrong bearer token: send 'Authorization: Bearer <token>'")
        response.headers["WWW-Authenticate"] = 'Bearer realm="clipsam"'
        return response
    return await handler(request)


async def _security_headers(request: web.Request, response: web.StreamResponse) -> None:
    """Headers that keep the page from being framed or sniffed, and load nothing off-site."""
    response.headers.setdefault("X-Content-Type-Options", "nosniff")
    response.headers.setdefault("X-Frame-Options", "DENY")
    response.headers.setdefault("Referrer-Policy", "no-referrer")
    response.headers.setdefault(
        "Content-Security-Policy",
        "default-src 'self'; img-src 'self' data: blob:; style-src 'self'; script-src 'self'; "
        "connect-src 'self'; frame-ancestors 'none'",
    )
    if request.path.startswith("/segment") or request.path in ("/info", "/health"):
        response.headers.setdefault("Cache-Control", "no-store")


# -- handlers -------------------------------------------------------------------------------------


async def health(request: web.Request) -> web.Response:
    """200 ``{"status": "ready", ...}`` once the model has run its warm-up image, 503 before/after.

    The ready answer also counts the requests waiting (``queued``) and the backend calls and
    images served so far (``batches``, ``images``; the warm-up not included).
    """
    state = request.app[STATE]
    if state.failure is not None:
        reason = (str(state.failure).splitlines() or [type(state.failure).__name__])[0]
        return web.json_response({"status": "failed", "error": reason}, status=503)
    if state.draining:
        return web.json_response({"status": "stopping"}, status=503)
    if not state.batcher.ready.is_set():
        return web.json_response({"status": "loading"}, status=503)
    batcher = state.batcher
    return web.json_response({"status": "ready", "queued": batcher.queued(), "batches": batcher.batches, "images": batcher.images})


def _require_backend(state: ServeState) -> Backend:
    backend = state.backend
    if state.draining:
        raise ApiError(503, "the server is shutting down")
    if backend is None:
        raise ApiError(503, "the model is still loading: retry when GET /health says ready")
    return backend


async def info(request: web.Request) -> web.Response:
    """The bundle's metadata (``Runtime.info``) and, under ``"serve"``, the service's settings."""
    state = request.app[STATE]
    backend = _require_backend(state)
    settings = state.settings
    payload = dict(_jsonable(backend.info))
    payload["serve"] = {
        "categories": list(backend.categories),
        "default_category": settings.category,
        "max_request_mb": settings.max_request_mb,
        "max_queue": settings.max_queue,
        "max_batch": settings.max_batch,
        "batch_wait_ms": settings.batch_wait_ms,
        "auth": settings.token is not None,
    }
    return web.json_response(payload)


async def index(request: web.Request) -> web.FileResponse:
    """The web page."""
    return web.FileResponse(STATIC_DIR / "index.html")


def _check_category(category: str | None, backend: Backend) -> str | None:
    """``category`` when the backend knows it (None passes: the default)."""
    if category is None or category == "":
        return None
    known = list(backend.categories)
    if known and category not in known:
        shown = ", ".join(known[:20]) + (", ..." if len(known) > 20 else "")
        raise ApiError(400, f"unknown category {category!r}; this bundle knows: {shown}")
    return category


async def _read_upload(request: web.Request) -> tuple[bytes, str | None]:
    """The image bytes and the form's ``category`` (multipart) of a POST /segment."""
    limit = request.app[STATE].settings.max_request_bytes
    if request.content_length is not None and request.content_length > limit:
        raise ApiError(413, f"the request has {request.content_length} bytes; --max-request-mb allows {limit}")
    ctype = request.content_type
    if ctype == "multipart/form-data":
        form = await request.post()
        field = form.get("image")
        if field is None:
            raise ApiError(400, "the form has no field 'image': send the image as form field 'image'")
        data = field.file.read() if isinstance(field, web.FileField) else str(field).encode("latin-1", "replace")
        category = form.get("category")
        return data, str(category) if category not in (None, "") else None
    if ctype.startswith("image/") or ctype in RAW_TYPES:
        return await request.read(), None
    raise ApiError(
        415,
        f"content type {ctype!r} is not accepted: send the image bytes with Content-Type image/* or "
        "application/octet-stream, or a multipart form with field 'image'",
    )


def _finite(value: Any) -> float | None:
    """A JSON-safe float (None for NaN/inf)."""
    number = float(value)
    return number if math.isfinite(number) else None


def _jsonable(value: Any) -> Any:
    """``value`` with numpy scalars/arrays and paths turned into JSON types."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return _jsonable(value.tolist())
    if isinstance(value, np.generic):
        return _jsonable(value.item())
    if isinstance(value, float):
        return _finite(value)
    if isinstance(value, (str, int, bool)) or value is None:
        return value
    return str(value)


def result_payload(result: Any) -> dict[str, Any]:
    """The JSON answer of one ``RuntimeResult`` (without ``elapsed_ms``)."""
    mask = np.asarray(result.mask, dtype=bool)
    scores = np.asarray(result.scores)
    if mask.ndim != 2 or scores.shape != mask.shape:
        raise RuntimeError(f"the backend returned a mask {mask.shape} and scores {scores.shape}; expected two equal (H0, W0)")
    boxes, num_regions = mask_boxes(mask)
    return {
        "label": bool(result.label),
        "image_score": _finite(result.image_score),
        "image_threshold": _finite(result.image_threshold),
        "pixel_threshold": _finite(result.pixel_threshold),
        "threshold_scope": str(getattr(result, "threshold_scope", "")),
        "category": str(result.category),
        "object_name": str(getattr(result, "object_name", "")),
        "width": int(mask.shape[1]),
        "height": int(mask.shape[0]),
        "mask_png": png_base64(mask.astype(np.uint8) * np.uint8(255)),
        "scores_png": png_base64(scores_to_uint8(scores)),
        "boxes": boxes,
        "num_regions": num_regions,
    }


async def segment(request: web.Request) -> web.Response:
    """POST /segment: decode the upload, queue it for the worker, answer with the result's JSON."""
    started = time.perf_counter()
    state = request.app[STATE]
    backend = _require_backend(state)
    data, form_category = await _read_upload(request)
    category = _check_category(request.query.get("category") or form_category or state.settings.category, backend)
    loop = asyncio.get_running_loop()
    try:
        decode = functools.partial(decode_image, data, max_pixels=state.settings.max_pixels, bit_depth=getattr(backend, "bit_depth", None))
        image = await loop.run_in_executor(None, decode)
    except ImageTooLarge as exc:
        raise ApiError(413, str(exc)) from None
    except BadImage as exc:
        raise ApiError(400, str(exc)) from None
    try:
        future = state.batcher.submit(image, category)
    except QueueFull as exc:
        raise ApiError(503, str(exc)) from None
    except Closed as exc:
        raise ApiError(503, str(exc)) from None
    try:
        result = await future
    except ClipSamError as exc:
        raise ApiError(422, str(exc)) from None
    except Exception:  # noqa: BLE001 - logged by the worker
        raise ApiError(500, "the model failed on this image (the traceback is in the server's log)") from None
    payload = await loop.run_in_executor(None, result_payload, result)
    payload["elapsed_ms"] = round((time.perf_counter() - started) * 1000.0, 3)
    return web.json_response(payload)


# -- the application --------------------------------------------------------------------------------


def make_app(
    backend: Backend | None = None,
    *,
    loader: Callable[[], Backend] | None = None,
    settings: ServeSettings | None = None,
    on_fatal: Callable[[BaseException], None] | None = None,
    autostart: bool = True,
    **overrides: Any,
) -> web.Application:
    """The service as an aiohttp application.

    Args:
        backend: a loaded model with ``segment_batch`` / ``info`` / ``categories`` (tests pass a
            :class:`clipsam.serve.fake.FakeBackend`), or None with ``loader``.
        loader: builds the backend on the worker thread after the server is up (``/health``
            says 503 meanwhile); ``serve_main`` passes ``Runtime.from_bundle``.
        settings: the options; ``overrides`` replace single fields (``make_app(fake, max_batch=4)``).
        on_fatal: called on the event loop when loading or warming up fails (the server stops).
        autostart: start the worker with the application; False: the caller calls
            :func:`start_worker` (``run_server`` does once the port is bound).

    Raises:
        ConfigError: ``settings.category`` is not one of ``backend.categories``.

    The worker starts with the application (``on_startup``) and drains on cleanup: every queued
    request is answered before the worker ends.
    """
    base = settings or ServeSettings()
    if overrides:
        base = ServeSettings(**{**base.__dict__, **overrides})
    if backend is not None:
        check_default_category(base.category, backend)
    app = web.Application(middlewares=[errors_middleware, auth_middleware], client_max_size=base.max_request_bytes)
    state = ServeState(settings=base, batcher=Batcher(backend, loader=loader, max_batch=base.max_batch,
                                                      batch_wait_s=base.batch_wait_ms / 1000.0, max_queue=base.max_queue,
                                                      warmup_category=base.category), on_fatal=on_fatal)
    app[STATE] = state
    app.router.add_get("/health", health)
    app.router.add_get("/info", info)
    app.router.add_post("/segment", segment)
    app.router.add_get("/", index)
    app.router.add_static("/static/", STATIC_DIR, show_index=False, follow_symlinks=False)
    app.on_response_prepare.append(_security_headers)
    if autostart:
        app.on_startup.append(_start_worker)
    app.on_shutdown.append(_begin_drain)
    app.on_cleanup.append(_stop_worker)
    return app


def check_default_category(category: str | None, backend: Backend) -> None:
    """Raise ConfigError when ``--category`` is not one the backend knows."""
    known = list(backend.categories)
    if category is not None and known and category not in known:
        raise ConfigError(f"--category {category!r} is not a category of this bundle; choose one of: {', '.join(known)}")


async def _start_worker(app: web.Application) -> None:
    start_worker(app, asyncio.get_running_loop())


def start_worker(app: web.Application, loop: asyncio.AbstractEventLoop) -> None:
    """Start the worker thread (loading, warm-up, then batches); a failure reaches ``on_fatal`` on ``loop``."""
    state = app[STATE]

    def failed(exc: BaseException) -> None:
        def record() -> None:
            state.failure = exc
            if state.on_fatal is not None:
                state.on_fatal(exc)

        loop.call_soon_threadsafe(record)

    state.batcher.on_failed = failed
    state.batcher.start()


async def _begin_drain(app: web.Application) -> None:
    """New /segment requests get 503 from now on; queued ones are still answered."""
    app[STATE].draining = True


async def _stop_worker(app: web.Application) -> None:
    state = app[STATE]
    await asyncio.get_running_loop().run_in_executor(None, state.batcher.stop, state.settings.shutdown_timeout_s)
