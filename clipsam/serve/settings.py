"""``clipsam serve`` options: the argument parser and the validated settings."""

from __future__ import annotations

import argparse
import os
import stat
from dataclasses import dataclass
from pathlib import Path

from clipsam.errors import ConfigError
from clipsam.serve.imaging import MAX_PIXELS

__all__ = ["ServeSettings", "build_parser", "parse_settings", "read_token"]

_LOOPBACK = frozenset({"127.0.0.1", "::1", "localhost"})


@dataclass(frozen=True)
class ServeSettings:
    """Everything the service needs besides its backend.

    Attributes:
        host: address to bind (default loopback only).
        port: TCP port; 0 picks a free one (printed at startup).
        token: bearer token every endpoint but ``/health`` and the page's static files requires; None: no auth.
        max_request_mb: largest request body in MiB (413 beyond).
        max_queue: most requests waiting for the model (503 beyond).
        max_batch: most images per backend call.
        batch_wait_ms: how long the worker waits for more requests to fill a batch.
        category: the category used when a request names none (None: the backend's default).
        shutdown_timeout_s: how long a SIGTERM drain waits for answers before closing connections.
        max_pixels: largest image (pixels) decoded; larger ones get 413 (read from the header).
    """

    host: str = "127.0.0.1"
    port: int = 8000
    token: str | None = None
    max_request_mb: float = 20.0
    max_queue: int = 64
    max_batch: int = 8
    batch_wait_ms: float = 5.0
    category: str | None = None
    shutdown_timeout_s: float = 60.0
    max_pixels: int = MAX_PIXELS

    @property
    def max_request_bytes(self) -> int:
        """``max_request_mb`` in bytes."""
        return int(self.max_request_mb * 1024 * 1024)

    @property
    def is_loopback(self) -> bool:
        """Whether only this machine can reach the service."""
        return self.host in _LOOPBACK or self.host.startswith("127.")

    def __post_init__(self) -> None:
        checks = [
            (0 <= self.port <= 65535, f"--port must be 0..65535, got {self.port}"),
            (self.max_request_mb > 0, f"--max-request-mb must be > 0, got {self.max_request_mb}"),
            (self.max_queue >= 1, f"--max-queue must be >= 1, got {self.max_queue}"),
            (self.max_batch >= 1, f"--max-batch must be >= 1, got {self.max_batch}"),
            (self.batch_wait_ms >= 0, f"--batch-wait-ms must be >= 0, got {self.batch_wait_ms}"),
            (self.shutdown_timeout_s > 0, f"shutdown_timeout_s must be > 0, got {self.shutdown_timeout_s}"),
            (self.max_pixels >= 1, f"max_pixels must be >= 1, got {self.max_pixels}"),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)


def read_token(path: str | os.PathLike[str]) -> str:
    """The bearer token in ``path`` (its first line, surrounding whitespace removed).

    Raises:
        ConfigError: the file is missing, unreadable, empty or holds a token with spaces.
    """
    file = Path(path)
    try:
        text = file.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"--token-file {file} does not exist: write the token into it (e.g. `openssl rand -hex 32 > {file}`)") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"--token-file {file} cannot be read ({exc}): give a readable UTF-8 text file") from None
    lines = text.strip().splitlines()
    token = lines[0].strip() if lines else ""
    if not token:
        raise ConfigError(f"--token-file {file} is empty: write the token into it (e.g. `openssl rand -hex 32 > {file}`)")
    if any(ch.isspace() for ch in token) or not token.isprintable():
        raise ConfigError(f"--token-file {file}: the token must be one word of printable characters without spaces")
    return token


def token_file_is_private(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` is readable by its owner only (no group/other permission bits)."""
    return not (os.stat(path).st_mode & (stat.S_IRWXG | stat.S_IRWXO))


def build_parser() -> argparse.ArgumentParser:
    """The ``clipsam serve`` argument parser."""
    defaults = ServeSettings()
    parser = argparse.ArgumentParser(
        prog="clipsam serve",
        description="Serve an exported ONNX bundle over HTTP: POST /segment, GET /health, GET /info, a web page at /.",
    )
    parser.add_argument("--bundle", required=True, help="bundle folder written by `clipsam export --format onnx`")
    parser.add_argument("--host", default=defaults.host, help="address to bind (default %(default)s: this machine only)")
    parser.add_argument("--port", type=int, default=defaults.port, help="TCP port; 0 picks a free one (default %(default)s)")
    parser.add_argument("--token-file", help="file holding a bearer token the API requires (all but /health)")
    parser.add_argument("--max-request-mb", type=float, default=defaults.max_request_mb, help="largest request body in MiB (default %(default)s)")
    parser.add_argument("--max-queue", type=int, default=defaults.max_queue, help="most requests waiting for the model; more get 503 (default %(default)s)")
    parser.add_argument("--max-batch", type=int, default=defaults.max_batch, help="most images per model call (default %(default)s)")
    parser.add_argument("--batch-wait-ms", type=float, default=defaults.batch_wait_ms, help="how long to wait for more requests to fill a batch (default %(default)s)")
    parser.add_argument("--category", help="category used when a request names none (default: the bundle's default)")
    parser.add_argument("--providers", help="comma-separated onnxruntime execution providers (default: the bundle runtime's choice)")
    return parser


def parse_settings(argv: list[str]) -> tuple[argparse.Namespace, ServeSettings]:
    """Parse ``argv``; argparse's own errors exit 2 with usage, invalid values raise ConfigError."""
    args = build_parser().parse_args(argv)
    token = read_token(args.token_file) if args.token_file else None
    settings = ServeSettings(
        host=args.host,
        port=args.port,
        token=token,
        max_request_mb=args.max_request_mb,
        max_queue=args.max_queue,
        max_batch=args.max_batch,
        batch_wait_ms=args.batch_wait_ms,
        category=args.category,
    )
    return args, settings
