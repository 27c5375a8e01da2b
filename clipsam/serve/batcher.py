"""One worker thread that feeds concurrent requests to the backend in batches.

Requests (decoded images) go into a bounded queue; the worker takes the first waiting one, then
whatever else arrives within ``batch_wait_s`` (up to ``max_batch`` images), and runs ONE
``backend.segment_batch`` call on them, so an accelerator sees batches while a lone request
waits at most ``batch_wait_s``. Every queued request is answered exactly once: with its own
result, or with the error of its own image (a batch that fails is retried image by image so one
bad image does not fail its neighbours).

The worker also loads the backend (when given a loader) and runs the warm-up image, so all model
calls happen on one thread.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from clipsam.errors import ClipSamError

__all__ = ["WARMUP_SIZE", "Backend", "Batcher", "Closed", "QueueFull"]

log = logging.getLogger("clipsam.serve")

#: Side of the synthetic warm-up image (a mid-gray square with a little noise).
WARMUP_SIZE = 256


class Backend(Protocol):
    """What the service needs of a model: ``clipsam.runtime.Runtime`` or a test double."""

    info: dict
    categories: list[str]

    def segment_batch(self, images: list, *, category: str | list[str] | None = None) -> list: ...


class QueueFull(Exception):
    """The request queue holds ``max_queue`` requests already."""


class Closed(Exception):
    """The worker is stopping (the server drains its queue) and takes no new request."""


@dataclass
class _Job:
    """One queued request: the image, its category and where its answer goes."""

    image: np.ndarray
    category: str | None
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future
    queued_at: float = field(default_factory=time.perf_counter)


_STOP = object()


def _deliver(job: _Job, result: Any = None, error: BaseException | None = None) -> None:
    """Hand a result or an error to the job's future on its event loop (once; a cancelled future is skipped)."""

    def settle() -> None:
        if job.future.done():
            return
        if error is not None:
            job.future.set_exception(error)
        else:
            job.future.set_result(result)

    try:
        job.loop.call_soon_threadsafe(settle)
    except RuntimeError:  # the loop is closed: nobody is waiting any more
        pass


def _warmup_image() -> np.ndarray:
    """A deterministic uint8 (S, S, 3) image for the warm-up call."""
    rng = np.random.default_rng(0)
    return np.clip(128 + rng.normal(0, 8, (WARMUP_SIZE, WARMUP_SIZE, 3)), 0, 255).astype(np.uint8)


class Batcher:
    """The worker thread, its bounded queue and the readiness state.

    Args:
        backend: the model, or None when ``loader`` builds it on the worker thread.
        loader: builds the backend (``Runtime.from_bundle``); called once, first, on the worker.
        max_batch: most images per ``segment_batch`` call.
        batch_wait_s: how long the worker waits for more requests after the first of a batch.
        max_queue: most requests waiting (not yet taken by the worker); more raise :class:`QueueFull`.
        warmup_category: category of the warm-up image (None: the backend's first category).
        on_ready / on_failed: called (on the worker thread) once the warm-up has run, or with the
            exception that stopped loading or warming up.
    """

    def __init__(
        self,
        backend: Backend | None = None,
        *,
        loader: Callable[[], Backend] | None = None,
        max_batch: int = 8,
        batch_wait_s: float = 0.005,
        max_queue: int = 64,
        warmup_category: str | None = None,
        on_ready: Callable[[], None] | None = None,
        on_failed: Callable[[BaseException], None] | None = None,
    ) -> None:
        if backend is None and loader is None:
            raise ValueError("Batcher needs a backend or a loader")
        self.backend = backend
        self._loader = loader
        self.max_batch = max(1, int(max_batch))
        self.batch_wait_s = max(0.0, float(batch_wait_s))
        self.max_queue = max(1, int(max_queue))
        self.warmup_category = warmup_category
        self.on_ready = on_ready
        self.on_failed = on_failed
        self._queue: queue.Queue = queue.Queue()
        self._lock = threading.Lock()
        self._closed = False
        self._slots = threading.BoundedSemaphore(self.max_queue)
        self._thread = threading.Thread(target=self._run, name="clipsam-serve-worker", daemon=True)
        self.ready = threading.Event()
        self.failure: BaseException | None = None
        self.batches = 0
        self.images = 0

    # -- the event-loop side ------------------------------------------------------------------

    def start(self) -> None:
        """Start the worker (it loads and warms up the backend first)."""
        self._thread.start()

    def queued(self) -> int:
        """Requests waiting for the worker (not counting the batch it is running)."""
        return self._queue.qsize()

    def submit(self, image: np.ndarray, category: str | None) -> asyncio.Future:
        """Queue one image; the returned future gets its result object (or its error).

        Raises:
            QueueFull: ``max_queue`` requests are waiting already.
            Closed: :meth:`stop` was called.
        """
        loop = asyncio.get_running_loop()
        job = _Job(image=image, category=category, loop=loop, future=loop.create_future())
        with self._lock:
            if self._closed:
                raise Closed("the server is shutting down")
            if not self._slots.acquire(blocking=False):
                raise QueueFull(f"the request queue is full ({self.max_queue} waiting); retry later")
            self._queue.put(job)
        return job.future

    def stop(self, timeout: float | None = None) -> None:
        """Answer every queued request, then end the worker (blocks up to ``timeout`` s)."""
        with self._lock:
            if not self._closed:
                self._closed = True
                self._queue.put(_STOP)
        if self._thread.is_alive():
            self._thread.join(timeout)

    # -- the worker thread ----------------------------------------------------------------------

    def _run(self) -> None:
        try:
            if self.backend is None:
                self.backend = self._loader()  # type: ignore[misc]
            self.backend.segment_batch([_warmup_image()], category=self._warmup_category())
        except BaseException as exc:  # noqa: BLE001 - reported to the server, which stops
            self.failure = exc
            if self.on_failed is not None:  # the owner reports it (run_server raises it)
                self.on_failed(exc)
            else:
                log.error("loading or warming up the model failed: %s", exc)
            self._fail_all_queued(exc)
            return
        self.ready.set()
        if self.on_ready is not None:
            self.on_ready()
        while True:
            batch, stop = self._collect()
            if batch:
                self._run_batch(batch)
            if stop:
                return

    def _warmup_category(self) -> str | None:
        """``warmup_category``, else the backend's first category (a bundle of several has no default)."""
        if self.warmup_category is not None:
            return self.warmup_category
        known = list(self.backend.categories)  # type: ignore[union-attr]
        return known[0] if known else None

    def _take(self, timeout: float | None) -> Any:
        """Next queue item (blocking up to ``timeout``; None: forever); frees its queue slot."""
        item = self._queue.get(timeout=timeout) if timeout is None or timeout > 0 else self._queue.get_nowait()
        if item is not _STOP:
            self._slots.release()
        return item

    def _collect(self) -> tuple[list[_Job], bool]:
        """The next batch: the first waiting job, then more until ``max_batch`` or the wait ends."""
        first = self._take(None)
        if first is _STOP:
            return [], True
        batch = [first]
        deadline = time.perf_counter() + self.batch_wait_s
        while len(batch) < self.max_batch:
            try:
                item = self._take(deadline - time.perf_counter())
            except queue.Empty:
                break
            if item is _STOP:
                return batch, True
            batch.append(item)
        return batch, False

    def _segment(self, jobs: list[_Job]) -> list:
        """One backend call for ``jobs`` (one category for all when they agree)."""
        names = [job.category for job in jobs]
        if all(name is None for name in names):
            category: str | list[str] | None = None
        elif len(set(names)) == 1:
            category = names[0]
        else:
            category = names  # type: ignore[assignment]
        results = self.backend.segment_batch([job.image for job in jobs], category=category)  # type: ignore[union-attr]
        if len(results) != len(jobs):
            raise RuntimeError(f"the backend returned {len(results)} results for {len(jobs)} images")
        return list(results)

    def _run_batch(self, batch: list[_Job]) -> None:
        """Answer every job of ``batch``; jobs without a category and with one run as separate calls."""
        live = [job for job in batch if not job.future.done()]  # a client that went away
        groups = [[j for j in live if j.category is None], [j for j in live if j.category is not None]]
        for jobs in groups:
            if not jobs:
                continue
            try:
                results = self._segment(jobs)
            except Exception as exc:
                if len(jobs) == 1:
                    # a ClipSamError is the user's to fix (one line); anything else is a bug (traceback)
                    log.warning("segmenting one image failed: %s", exc, exc_info=not isinstance(exc, ClipSamError))
                    _deliver(jobs[0], error=exc)
                    continue
                for job in jobs:
                    self._run_batch([job])
                continue
            self.batches += 1
            self.images += len(jobs)
            for job, result in zip(jobs, results):
                _deliver(job, result=result)

    def _fail_all_queued(self, exc: BaseException) -> None:
        """Answer every waiting job with ``exc`` (the model never became ready)."""
        while True:
            try:
                item = self._take(0)
            except queue.Empty:
                return
            if item is not _STOP:
                _deliver(item, error=exc)
