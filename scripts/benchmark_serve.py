"""Latency and throughput of ``clipsam serve`` on loopback: N clients x M requests.

Starts the service in a subprocess (``python -m clipsam.serve --bundle DIR``, or with ``--fake``
the numpy brightness backend of ``clipsam.serve.fake``, which measures the HTTP side alone:
upload, decoding, batching, PNG encoding of the answer), waits for ``GET /health`` to say ready,
then runs ``--clients`` threads that each send ``--requests`` ``POST /segment`` requests over one
keep-alive connection, every request a distinct generated image (``--image-size``, PNG, encoded
before the clock starts). Reports p50/p90/p99/max latency in ms (client-side, request sent to
answer parsed), images/s over the whole run, the errors, the mean batch size the backend saw
(from ``/health``'s counters), and the machine. SIGTERM ends the server; its exit status is
recorded (0: it drained cleanly).

Usage:
    python scripts/benchmark_serve.py --fake [--clients 8 --requests 25]
    python scripts/benchmark_serve.py --bundle exports/mvtec_onnx --clients 4 --requests 50 --max-batch 8
Writes runs/benchmarks/serve_<fake|bundle>.json (``--out``) and prints it.
"""

from __future__ import annotations

import argparse
import http.client
import io
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]

FAKE_SERVER = """
import sys
from clipsam.serve import ServeSettings, run_server
from clipsam.serve.fake import FakeBackend
settings = ServeSettings(port=0, max_batch={max_batch}, batch_wait_ms={batch_wait_ms}, max_queue={max_queue})
sys.exit(run_server(settings, backend=FakeBackend(delay_s={delay_s}, per_image_s={per_image_s}), label="fake"))
"""


def _server_command(args: argparse.Namespace) -> list[str]:
    """The subprocess that serves: the real bundle, or the fake backend."""
    if args.fake:
        code = FAKE_SERVER.format(max_batch=args.max_batch, batch_wait_ms=args.batch_wait_ms, max_queue=args.max_queue,
                                  delay_s=args.fake_call_ms / 1000.0, per_image_s=args.fake_per_image_ms / 1000.0)
        return [sys.executable, "-c", code]
    command = [sys.executable, "-m", "clipsam.serve", "--bundle", str(args.bundle), "--port", "0",
               "--max-batch", str(args.max_batch), "--batch-wait-ms", str(args.batch_wait_ms), "--max-queue", str(args.max_queue)]
    if args.category:
        command += ["--category", args.category]
    if args.providers:
        command += ["--providers", args.providers]
    return command


def _images(count: int, size: int) -> list[bytes]:
    """``count`` distinct PNGs of ``size`` x ``size``: noise plus one bright square placed by index."""
    rng = np.random.default_rng(0)
    out = []
    for i in range(count):
        pixels = rng.integers(0, 120, (size, size, 3), dtype=np.uint8)
        side = max(2, size // 8)
        x, y = (i * 7) % (size - side), (i * 13) % (size - side)
        pixels[y : y + side, x : x + side] = 230
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, format="PNG")
        out.append(buffer.getvalue())
    return out


def _get_json(host: str, port: int, path: str) -> tuple[int, Any]:
    conn = http.client.HTTPConnection(host, port, timeout=10)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        return response.status, json.loads(response.read() or b"null")
    finally:
        conn.close()


def _wait_ready(host: str, port: int, proc: subprocess.Popen, timeout: float) -> float:
    """Seconds until ``/health`` is 200 (the model loaded and warmed up)."""
    started = time.perf_counter()
    while time.perf_counter() - started < timeout:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited with status {proc.returncode}: {proc.stderr.read()}")
        try:
            if _get_json(host, port, "/health")[0] == 200:
                return time.perf_counter() - started
        except OSError:
            pass
        time.sleep(0.05)
    raise SystemExit(f"the server was not ready within {timeout} s")


def _client(host: str, port: int, images: list[bytes], first: int, count: int, query: str) -> tuple[list[float], list[str]]:
    """``count`` requests on one keep-alive connection -> (latencies in ms, error lines)."""
    latencies: list[float] = []
    errors: list[str] = []
    conn = http.client.HTTPConnection(host, port, timeout=120)
    try:
        for k in range(count):
            body = images[(first + k) % len(images)]
            started = time.perf_counter()
            try:
                conn.request("POST", "/segment" + query, body=body, headers={"Content-Type": "image/png"})
                response = conn.getresponse()
                payload = json.loads(response.read())
            except (OSError, http.client.HTTPException, ValueError) as exc:
                errors.append(f"{type(exc).__name__}: {exc}")
                conn.close()
                conn = http.client.HTTPConnection(host, port, timeout=120)
                continue
            if response.status == 200:
                latencies.append((time.perf_counter() - started) * 1000.0)
            else:
                errors.append(f"{response.status}: {payload.get('error')}")
    finally:
        conn.close()
    return latencies, errors


def _percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    return round(float(np.percentile(np.asarray(values), q)), 3)


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Start the server, run the clients, stop the server; the report."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH", "")]))}
    proc = subprocess.Popen(_server_command(args), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=REPO)
    try:
        line = proc.stdout.readline()
        if "http://" not in line:
            raise SystemExit(f"the server did not start: {line}{proc.stderr.read()}")
        url = line.split()[2]
        host, port = url.split("//")[1].rstrip("/").rsplit(":", 1)
        ready_s = _wait_ready(host, int(port), proc, args.ready_timeout)
        _, info = _get_json(host, int(port), "/info")
        total = args.clients * args.requests
        images = _images(min(total, args.distinct_images), args.image_size)
        query = f"?category={args.category}" if args.category else ""
        _client(host, int(port), images, 0, args.warmup, query)  # not timed: connections, caches
        before = _get_json(host, int(port), "/health")[1]
        load_before = os.getloadavg()[0]
        started = time.perf_counter()
        with ThreadPoolExecutor(args.clients) as pool:
            parts = list(pool.map(lambda c: _client(host, int(port), images, c * args.requests, args.requests, query), range(args.clients)))
        wall = time.perf_counter() - started
        after = _get_json(host, int(port), "/health")[1]
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        try:
            server_rc = proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            proc.kill()
            server_rc = proc.wait()
    latencies = [ms for lat, _ in parts for ms in lat]
    errors = [e for _, errs in parts for e in errs]
    batches = after["batches"] - before["batches"]
    served = after["images"] - before["images"]
    return {
        "benchmark": "serve_loopback",
        "backend": "fake (numpy brightness threshold)" if args.fake else {k: info.get(k) for k in ("method", "refiner", "format", "versions") if k in info},
        "bundle": None if args.fake else str(args.bundle),
        "clients": args.clients,
        "requests_per_client": args.requests,
        "requests": total,
        "ok": len(latencies),
        "errors": len(errors),
        "error_examples": sorted(set(errors))[:5],
        "image_size": args.image_size,
        "image_png_bytes_mean": round(statistics.fmean(len(b) for b in images)),
        "settings": {"max_batch": args.max_batch, "batch_wait_ms": args.batch_wait_ms, "max_queue": args.max_queue,
                     **({"fake_call_ms": args.fake_call_ms, "fake_per_image_ms": args.fake_per_image_ms} if args.fake else {})},
        "latency_ms": {"p50": _percentile(latencies, 50), "p90": _percentile(latencies, 90), "p99": _percentile(latencies, 99),
                       "mean": round(statistics.fmean(latencies), 3) if latencies else None,
                       "max": round(max(latencies), 3) if latencies else None},
        "images_per_s": round(len(latencies) / wall, 2),
        "wall_s": round(wall, 3),
        "mean_batch_size": round(served / batches, 2) if batches else None,
        "server_ready_s": round(ready_s, 3),
        "server_exit_status": server_rc,
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                    "cpu": platform.processor() or platform.machine(),
                    "loadavg_1min_before_after": [round(load_before, 2), round(os.getloadavg()[0], 2)]},
        "note": "client and server share this machine's CPUs; the clients are Python threads",
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--bundle", type=Path, help="bundle folder written by `clipsam export --format onnx`")
    source.add_argument("--fake", action="store_true", help="the numpy brightness backend: times the HTTP side alone")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--requests", type=int, default=25, help="requests per client")
    parser.add_argument("--image-size", type=int, default=256, help="side of the generated square images")
    parser.add_argument("--distinct-images", type=int, default=64, help="how many different images the requests cycle through")
    parser.add_argument("--warmup", type=int, default=4, help="untimed requests first")
    parser.add_argument("--max-batch", type=int, default=8)
    parser.add_argument("--batch-wait-ms", type=float, default=5.0)
    parser.add_argument("--max-queue", type=int, default=64)
    parser.add_argument("--category", help="category of every request (default: the bundle's)")
    parser.add_argument("--providers", help="onnxruntime providers for --bundle (comma-separated)")
    parser.add_argument("--fake-call-ms", type=float, default=0.0, help="with --fake: simulated model time per backend call (batching amortises it)")
    parser.add_argument("--fake-per-image-ms", type=float, default=0.0, help="with --fake: simulated model time per image")
    parser.add_argument("--ready-timeout", type=float, default=600.0, help="seconds to wait for /health")
    parser.add_argument("--out", "--output", dest="out", type=Path, help="JSON report (default runs/benchmarks/serve_<fake|bundle>.json)")
    args = parser.parse_args()
    report = run(args)
    out = args.out or Path("runs/benchmarks") / f"serve_{'fake' if args.fake else 'bundle'}.json"
    print(json.dumps(report, indent=2))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
