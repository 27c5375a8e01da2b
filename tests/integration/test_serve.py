"""``clipsam serve``: the HTTP API on a fake numpy backend (no model, no network, loopback only).

The backend (:class:`clipsam.serve.fake.FakeBackend`) thresholds brightness, so every answer is
known in advance: a bright square in the upload is the mask and its box. Tests that need the
worker busy hold it with the fake's ``gate`` and read the queue depth from the server's state.
"""

from __future__ import annotations

import base64
import http.client
import io
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("aiohttp")

from clipsam.errors import ConfigError
from clipsam.serve import ServeSettings, make_app, run_server, serve_main
from clipsam.serve.background import BackgroundServer
from clipsam.serve.fake import FakeBackend
from clipsam.serve.imaging import BadImage, ImageTooLarge, decode_image, mask_boxes

REPO = Path(__file__).resolve().parents[2]
TOKEN = "s3cret-token-for-tests"


# -- helpers ------------------------------------------------------------------------------------------


def square_image(width: int = 64, height: int = 48, box: tuple[int, int, int, int] = (10, 8, 19, 15), value: int = 230) -> np.ndarray:
    """Dark uint8 RGB image with one bright rectangle, ``box`` = inclusive (x0, y0, x1, y1)."""
    image = np.full((height, width, 3), 20, dtype=np.uint8)
    x0, y0, x1, y1 = box
    image[y0 : y1 + 1, x0 : x1 + 1] = value
    return image


def png(image: np.ndarray, **params: Any) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG", **params)
    return buffer.getvalue()


def multipart(fields: dict[str, tuple[str | None, bytes]]) -> tuple[bytes, str]:
    """A multipart/form-data body: ``{name: (filename or None, bytes)}`` -> (body, content type)."""
    boundary = uuid.uuid4().hex
    parts = []
    for name, (filename, data) in fields.items():
        disposition = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename else "")
        head = f"--{boundary}\r\nContent-Disposition: {disposition}\r\n"
        head += "Content-Type: application/octet-stream\r\n\r\n" if filename else "\r\n"
        parts.append(head.encode() + data + b"\r\n")
    return b"".join(parts) + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


def call(url: str, method: str, path: str, body: bytes | None = None, headers: dict[str, str] | None = None, timeout: float = 30.0) -> tuple[int, Any]:
    """One HTTP request on a fresh connection -> (status, parsed JSON or text)."""
    host, port = url.split("//")[1].rstrip("/").rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=timeout)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        response = conn.getresponse()
        raw = response.read()
        ctype = response.getheader("Content-Type", "")
        return response.status, json.loads(raw) if ctype.startswith("application/json") else raw.decode("utf-8", "replace")
    finally:
        conn.close()


def post_image(url: str, data: bytes, *, query: str = "", headers: dict[str, str] | None = None) -> tuple[int, Any]:
    return call(url, "POST", "/segment" + query, data, {"Content-Type": "image/png", **(headers or {})})


def decode_png(b64: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))))


def wait_for(predicate: Callable[[], bool], timeout: float = 10.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.005)


def wait_ready(url: str, timeout: float = 10.0) -> None:
    wait_for(lambda: call(url, "GET", "/health")[0] == 200, timeout, "GET /health 200")


@pytest.fixture()
def serve() -> Iterator[Callable[..., BackgroundServer]]:
    """Start servers on free loopback ports (ready before returned unless ``ready=False``)."""
    servers: list[BackgroundServer] = []

    def start(backend: Any = None, *, ready: bool = True, **settings: Any) -> BackgroundServer:
        server = BackgroundServer(make_app(backend if backend is not None else FakeBackend(), **settings)).start()
        servers.append(server)
        if ready:
            wait_ready(server.url)
        return server

    yield start
    for server in servers:
        server.stop()


def hold_worker(backend: FakeBackend) -> threading.Event:
    """Make the backend's next calls wait for the returned event (after the warm-up)."""
    gate = threading.Event()
    backend.entered.clear()
    backend.gate = gate
    return gate


def assert_one_line_error(status: int, body: Any, expected_status: int) -> None:
    assert status == expected_status, body
    assert isinstance(body, dict) and set(body) == {"error"}, body
    assert body["error"] and "\n" not in body["error"] and "Traceback" not in body["error"]


# -- the API ------------------------------------------------------------------------------------------


def test_segment_raw_body_answers_mask_scores_boxes_and_label(serve) -> None:
    server = serve()
    image = square_image(box=(10, 8, 19, 15))
    image[30:33, 40:45] = 255  # a second region
    status, body = post_image(server.url, png(image))
    assert status == 200, body
    assert set(body) >= {"label", "image_score", "image_threshold", "pixel_threshold", "category", "mask_png", "boxes",
                         "scores_png", "width", "height", "elapsed_ms"}
    assert (body["width"], body["height"]) == (64, 48)
    assert body["label"] is True and body["image_score"] == pytest.approx(1.0)
    assert body["image_threshold"] == 0.5 and body["pixel_threshold"] == 0.5
    assert body["category"] == "bottle"  # the backend's default
    assert body["boxes"] == [[10, 8, 19, 15], [40, 30, 44, 32]]  # largest region first, inclusive
    assert body["num_regions"] == 2
    mask = decode_png(body["mask_png"])
    scores = decode_png(body["scores_png"])
    expected_scores = np.rint(image.mean(axis=2) / 255.0 * 255.0).astype(np.uint8)
    assert mask.shape == scores.shape == (48, 64) and mask.dtype == scores.dtype == np.uint8
    np.testing.assert_array_equal(mask, np.where(image.mean(axis=2) >= 127.5, 255, 0))
    np.testing.assert_array_equal(scores, expected_scores)
    assert 0 < body["elapsed_ms"] < 10_000


def test_segment_multipart_form_and_category_choice(serve) -> None:
    server = serve(FakeBackend(categories=("bottle", "screw", "cable")), category="screw")
    image = png(square_image())
    form, ctype = multipart({"image": ("part.png", image), "category": (None, b"cable")})
    status, body = call(server.url, "POST", "/segment", form, {"Content-Type": ctype})
    assert status == 200 and body["category"] == "cable" and body["boxes"] == [[10, 8, 19, 15]]
    status, body = call(server.url, "POST", "/segment?category=bottle", form, {"Content-Type": ctype})
    assert status == 200 and body["category"] == "bottle"  # the query wins over the form
    status, body = post_image(server.url, image)
    assert status == 200 and body["category"] == "screw"  # --category is the default
    status, body = post_image(server.url, png(np.full((8, 8, 3), 10, np.uint8)), headers={"Content-Type": "application/octet-stream"})
    assert status == 200 and body["label"] is False and body["boxes"] == [] and body["num_regions"] == 0


def test_info_and_page(serve) -> None:
    server = serve(max_batch=3)
    status, info = call(server.url, "GET", "/info")
    assert status == 200
    assert info["method"] == "brightness" and info["categories"] == ["bottle", "screw"]
    assert info["serve"]["categories"] == ["bottle", "screw"] and info["serve"]["max_batch"] == 3
    assert info["serve"]["auth"] is False
    status, page = call(server.url, "GET", "/")
    assert status == 200 and "/static/app.js" in page and 'id="threshold"' in page
    status, script = call(server.url, "GET", "/static/app.js")
    assert status == 200 and "scores_png" in script
    for name in ("index.html", "app.js", "style.css"):  # no CDN, nothing off-site
        text = (REPO / "clipsam" / "serve" / "static" / name).read_text()
        assert "http://" not in text and "https://" not in text and "//cdn" not in text, name
    assert call(server.url, "GET", "/static/../app.py")[0] in (403, 404)


@pytest.mark.parametrize(
    ("body", "ctype", "query", "status"),
    [
        (b"", "image/png", "", 400),
        (b"this is not an image", "image/png", "", 400),
        ("truncated", "image/png", "", 400),
        ("image", "application/json", "", 415),
        ("image", "text/plain", "", 415),
        ("image", "application/x-www-form-urlencoded", "", 415),
        ("image", "image/png", "?category=no-such-category", 400),
        ("form-without-image", None, "", 400),
    ],
)
def test_bad_input_is_a_4xx_json_line_and_the_server_keeps_serving(serve, body, ctype, query, status) -> None:
    server = serve()
    good = png(square_image())
    headers = {"Content-Type": ctype} if ctype else {}
    if body == "truncated":
        body = good[: len(good) // 2]
    elif body == "image":
        body = good
    elif body == "form-without-image":
        body, headers["Content-Type"] = multipart({"picture": ("a.png", good)})
    got, answer = call(server.url, "POST", "/segment" + query, body, headers)
    assert_one_line_error(got, answer, status)
    assert post_image(server.url, good)[0] == 200


def test_wrong_routes_and_methods_are_json_errors(serve) -> None:
    server = serve()
    assert_one_line_error(*call(server.url, "GET", "/segment"), 405)
    assert_one_line_error(*call(server.url, "GET", "/no-such-page"), 404)


def test_a_failing_image_fails_alone_not_its_batch(serve) -> None:
    backend = FakeBackend(fail_on_category="screw")
    server = serve(backend, max_batch=8, batch_wait_ms=1)
    gate = hold_worker(backend)
    image = png(square_image())
    with ThreadPoolExecutor(4) as pool:
        first = pool.submit(post_image, server.url, image)
        wait_for(backend.entered.is_set, what="the worker to take the first request")
        rest = [pool.submit(post_image, server.url, image, query=q) for q in ("?category=screw", "", "?category=bottle")]
        wait_for(lambda: server.state.batcher.queued() == 3, what="3 queued requests")
        gate.set()
        answers = [first.result(), *(f.result() for f in rest)]
    assert [a[0] for a in answers] == [200, 500, 200, 200]
    assert_one_line_error(*answers[1], 500)
    assert backend.batch_sizes[-1] == 1  # the failed batch was retried image by image


def test_backend_clipsam_error_is_422(serve) -> None:
    class Refusing(FakeBackend):
        def segment_batch(self, images, *, category=None):
            if len(images) == 1 and images[0].shape[0] == 5:
                raise ConfigError("image is 5 pixels high; the bundle needs at least 32")
            return super().segment_batch(images, category=category)

    server = serve(Refusing())
    status, body = post_image(server.url, png(np.zeros((5, 40, 3), np.uint8)))
    assert_one_line_error(status, body, 422)
    assert "at least 32" in body["error"]


# -- auth and limits ----------------------------------------------------------------------------------


def test_bearer_token_guards_everything_but_health_and_the_page(serve) -> None:
    server = serve(token=TOKEN)
    image = png(square_image())
    assert call(server.url, "GET", "/health")[0] == 200
    assert call(server.url, "GET", "/")[0] == 200  # static page: no data; it asks for the token
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": TOKEN}, {"Authorization": f"Basic {TOKEN}"}):
        assert_one_line_error(*call(server.url, "GET", "/info", headers=headers), 401)
        assert_one_line_error(*post_image(server.url, image, headers=headers), 401)
    good = {"Authorization": f"Bearer {TOKEN}"}
    status, info = call(server.url, "GET", "/info", headers=good)
    assert status == 200 and info["serve"]["auth"] is True
    assert post_image(server.url, image, headers=good)[0] == 200


def test_request_size_and_pixel_limits_are_413(serve) -> None:
    server = serve(max_request_mb=0.01, max_pixels=100 * 100)  # 10 KiB bodies, 10k-pixel images
    rng = np.random.default_rng(0)
    noisy = png(rng.integers(0, 255, (60, 60, 3), dtype=np.uint8))  # ~11 KB, incompressible
    assert len(noisy) > 0.01 * 1024 * 1024
    assert_one_line_error(*post_image(server.url, noisy), 413)
    form, ctype = multipart({"image": ("big.png", noisy)})
    assert_one_line_error(*call(server.url, "POST", "/segment", form, {"Content-Type": ctype}), 413)
    chunked = http.client.HTTPConnection(*server.url.split("//")[1].rstrip("/").rsplit(":", 1), timeout=30)
    try:  # no Content-Length: the limit applies while reading
        chunked.request("POST", "/segment", body=iter([noisy[i : i + 4096] for i in range(0, len(noisy), 4096)]),
                        headers={"Content-Type": "image/png"}, encode_chunked=True)
        response = chunked.getresponse()
        assert_one_line_error(response.status, json.loads(response.read()), 413)
    finally:
        chunked.close()
    wide = png(np.zeros((10, 1001, 3), np.uint8))  # small file, too many pixels
    status, body = post_image(server.url, wide)
    assert_one_line_error(status, body, 413)
    assert "1001 x 10" in body["error"]
    assert post_image(server.url, png(square_image()))[0] == 200


def test_full_queue_is_503_and_queued_requests_are_still_answered(serve) -> None:
    backend = FakeBackend()
    server = serve(backend, max_queue=2, max_batch=1, batch_wait_ms=0)
    gate = hold_worker(backend)
    images = [png(square_image(box=(i, i, i + 3, i + 3))) for i in range(3)]
    with ThreadPoolExecutor(3) as pool:
        running = pool.submit(post_image, server.url, images[0])
        wait_for(backend.entered.is_set, what="the worker to take the first request")
        queued = [pool.submit(post_image, server.url, data) for data in images[1:]]
        wait_for(lambda: server.state.batcher.queued() == 2, what="2 queued requests")
        status, body = post_image(server.url, png(square_image()))
        assert_one_line_error(status, body, 503)
        assert "queue is full" in body["error"]
        gate.set()
        answers = [running.result(), *(f.result() for f in queued)]
    assert [a[0] for a in answers] == [200, 200, 200]
    assert [a[1]["boxes"] for a in answers] == [[[i, i, i + 3, i + 3]] for i in range(3)]


def test_concurrent_requests_reach_the_backend_as_one_batch(serve) -> None:
    backend = FakeBackend()
    server = serve(backend, max_batch=8, batch_wait_ms=50)
    gate = hold_worker(backend)
    boxes = [(2 * i, 3, 2 * i + 1, 6) for i in range(6)]
    with ThreadPoolExecutor(6) as pool:
        first = pool.submit(post_image, server.url, png(square_image(box=boxes[0])))
        wait_for(backend.entered.is_set, what="the worker to take the first request")
        rest = [pool.submit(post_image, server.url, png(square_image(box=b))) for b in boxes[1:]]
        wait_for(lambda: server.state.batcher.queued() == 5, what="5 queued requests")
        gate.set()
        answers = [first.result(), *(f.result() for f in rest)]
    assert backend.batch_sizes[1:] == [1, 5]  # warm-up, the held one, then the 5 together
    assert [a[1]["boxes"] for a in answers] == [[list(b)] for b in boxes]


# -- lifecycle -----------------------------------------------------------------------------------------


def test_health_is_503_until_the_warmup_image_has_run(serve) -> None:
    gate = threading.Event()
    backend = FakeBackend(gate=gate)
    server = serve(backend, ready=False)
    wait_for(backend.entered.is_set, what="the warm-up call")
    status, body = call(server.url, "GET", "/health")
    assert (status, body) == (503, {"status": "loading"})
    assert_one_line_error(*post_image(server.url, png(square_image())), 503)
    assert_one_line_error(*call(server.url, "GET", "/info"), 503)
    gate.set()
    wait_ready(server.url)
    assert call(server.url, "GET", "/health")[1] == {"status": "ready", "queued": 0, "batches": 0, "images": 0}
    assert backend.batch_sizes == [1]  # the warm-up image
    assert post_image(server.url, png(square_image()))[0] == 200
    assert call(server.url, "GET", "/health")[1] == {"status": "ready", "queued": 0, "batches": 1, "images": 1}


def test_a_model_that_fails_to_load_is_reported_and_stops_the_server() -> None:
    failures: list[BaseException] = []

    def loader() -> FakeBackend:
        raise ConfigError("bundle /x/bundle.json: unsupported format 9; re-export it")

    app = make_app(loader=loader, on_fatal=failures.append)
    with BackgroundServer(app) as server:
        wait_for(lambda: bool(failures), what="on_fatal")
        status, body = call(server.url, "GET", "/health")
    assert status == 503 and body["status"] == "failed" and "unsupported format 9" in body["error"]
    assert isinstance(failures[0], ConfigError)


def test_run_server_raises_the_load_error_after_stopping() -> None:
    def loader() -> FakeBackend:
        raise ConfigError("bundle /x: onnxruntime is missing; pip install 'clipsam[serve]'")

    out = io.StringIO()
    with pytest.raises(ConfigError, match="onnxruntime is missing"):
        run_server(ServeSettings(port=0), loader=loader, out=out)
    assert out.getvalue().startswith("clipsam serve: http://127.0.0.1:")


def test_load_8_clients_x_25_requests_each_answered_once_with_its_own_result(serve) -> None:
    backend = FakeBackend()
    server = serve(backend, max_batch=8, batch_wait_ms=2, max_queue=64)

    def client(c: int) -> list[tuple[int, int, Any]]:
        out = []
        for r in range(25):
            i = 25 * c + r  # unique per request: the width and the square's place
            box = (i % 50, (i // 50) * 5, i % 50 + 2, (i // 50) * 5 + 2)
            status, body = post_image(server.url, png(square_image(width=60 + i, height=24, box=box)))
            out.append((i, status, (body["width"], body["boxes"]) if status == 200 else body))
        return out

    started = time.perf_counter()
    with ThreadPoolExecutor(8) as pool:
        results = [row for rows in pool.map(client, range(8)) for row in rows]
    elapsed = time.perf_counter() - started
    assert len(results) == 200 and sorted(i for i, _, _ in results) == list(range(200))
    for i, status, answer in results:
        box = [i % 50, (i // 50) * 5, i % 50 + 2, (i // 50) * 5 + 2]
        assert (status, answer) == (200, (60 + i, [box])), i
    assert sum(backend.batch_sizes) == 200 + 1  # every image ran exactly once (+ the warm-up)
    assert elapsed < 30


def _fake_bundle_script(bundle: Path, token_file: Path, per_image_s: float) -> str:
    """``python -c`` code: serve_main on a fake bundle, the runtime swapped for the fake backend."""
    return (
        "import sys\n"
        "import clipsam.serve.server as server\n"
        "from clipsam.serve.fake import FakeBackend\n"
        f"server.load_runtime = lambda bundle, providers: FakeBackend(per_image_s={per_image_s})\n"
        f"sys.exit(server.serve_main(['--bundle', {str(bundle)!r}, '--port', '0', '--max-batch', '1',"
        f" '--token-file', {str(token_file)!r}]))\n"
    )


def test_sigterm_stops_accepting_answers_every_queued_request_and_exits_0(tmp_path: Path) -> None:
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    (bundle / "bundle.json").write_text("{}")
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    token_file.chmod(0o600)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-c", _fake_bundle_script(bundle, token_file, 0.15)], cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        line = proc.stdout.readline()
        assert line.startswith("clipsam serve: http://127.0.0.1:"), line + proc.stderr.read()
        url = line.split()[2]
        wait_ready(url, timeout=30)
        auth = {"Authorization": f"Bearer {TOKEN}"}
        boxes = [(3 * i, 2, 3 * i + 1, 4) for i in range(5)]
        with ThreadPoolExecutor(5) as pool:
            futures = [pool.submit(post_image, url, png(square_image(box=b)), headers=auth) for b in boxes]
            wait_for(lambda: call(url, "GET", "/health")[1].get("queued", 0) >= 3, what="3 queued requests")
            proc.send_signal(signal.SIGTERM)
            answers = [f.result() for f in futures]

            def refused() -> bool:
                try:
                    call(url, "GET", "/health", timeout=1)
                except (ConnectionError, OSError):
                    return True
                return False

            wait_for(refused, what="the listener to close")
        assert [a[0] for a in answers] == [200] * 5
        assert [a[1]["boxes"] for a in answers] == [[list(b)] for b in boxes]
        assert proc.wait(timeout=30) == 0
        err = proc.stderr.read()
        assert "SIGTERM" in err and "stopped: every request was answered" in err and "Traceback" not in err
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


# -- options ---------------------------------------------------------------------------------------------


def test_serve_main_option_errors_are_config_errors(tmp_path: Path) -> None:
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    with pytest.raises(ConfigError, match="--bundle .* is not a folder"):
        serve_main(["--bundle", str(tmp_path / "missing")])
    with pytest.raises(ConfigError, match="has no bundle.json"):
        serve_main(["--bundle", str(bundle)])
    with pytest.raises(ConfigError, match="--token-file .* does not exist"):
        serve_main(["--bundle", str(bundle), "--token-file", str(tmp_path / "nope")])
    (tmp_path / "empty").write_text("\n")
    with pytest.raises(ConfigError, match="--token-file .* is empty"):
        serve_main(["--bundle", str(bundle), "--token-file", str(tmp_path / "empty")])
    for option, value in (("--max-batch", "0"), ("--max-queue", "0"), ("--max-request-mb", "0"), ("--port", "70000")):
        with pytest.raises(ConfigError, match=option):
            serve_main(["--bundle", str(bundle), option, value])
    with pytest.raises(ConfigError, match="--category 'nut' is not a category"):
        make_app(FakeBackend(), category="nut")


def test_python_m_entry_prints_one_line_and_exits_2(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "clipsam.serve", "--bundle", str(tmp_path / "missing")],
                          capture_output=True, text=True, cwd=REPO, timeout=60, check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("clipsam: error: --bundle") and len(proc.stderr.strip().splitlines()) == 1


def test_a_busy_port_is_a_config_error() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(ConfigError, match=f"--port {port}"):
            run_server(ServeSettings(port=port), backend=FakeBackend(), out=io.StringIO())


def test_the_serve_package_imports_without_torch() -> None:
    code = (
        "import sys\n"
        "for name in ('torch', 'torchvision', 'lightning', 'cv2', 'open_clip', 'scipy'):\n"
        "    sys.modules[name] = None  # any import of them raises ImportError\n"
        "import clipsam.serve, clipsam.serve.server, clipsam.serve.fake, clipsam.serve.background, clipsam.serve.__main__\n"
        "clipsam.serve.make_app(clipsam.serve.fake.FakeBackend())\n"
        "print(sorted(m for m in sys.modules if m.startswith('clipsam')))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=60, check=False)
    assert proc.returncode == 0, proc.stderr
    loaded = eval(proc.stdout)
    assert all(m in ("clipsam", "clipsam.errors", "clipsam.results") or m.startswith("clipsam.serve") for m in loaded), loaded


# -- imaging ------------------------------------------------------------------------------------------------


def _flood_fill_boxes(mask: np.ndarray) -> list[list[int]]:
    """Reference: 8-connected regions by flood fill -> sorted inclusive boxes."""
    seen = np.zeros_like(mask)
    boxes = []
    for y0, x0 in zip(*np.nonzero(mask)):
        if seen[y0, x0]:
            continue
        stack, xs, ys = [(y0, x0)], [], []
        seen[y0, x0] = True
        while stack:
            y, x = stack.pop()
            xs.append(x)
            ys.append(y)
            for dy in (-1, 0, 1):
                for dx in (-1, 0, 1):
                    ny, nx = y + dy, x + dx
                    if 0 <= ny < mask.shape[0] and 0 <= nx < mask.shape[1] and mask[ny, nx] and not seen[ny, nx]:
                        seen[ny, nx] = True
                        stack.append((ny, nx))
        boxes.append([int(min(xs)), int(min(ys)), int(max(xs)), int(max(ys))])
    return sorted(boxes)


def test_mask_boxes_match_a_flood_fill() -> None:
    rng = np.random.default_rng(0)
    for _ in range(200):
        mask = rng.random(tuple(rng.integers(1, 24, 2))) < rng.random()
        boxes, count = mask_boxes(mask)
        assert sorted(boxes) == _flood_fill_boxes(mask) and count == len(boxes)
    diagonal = np.eye(5, dtype=bool)  # touching corners are one region (8-connectivity)
    assert mask_boxes(diagonal) == ([[0, 0, 4, 4]], 1)
    many = np.zeros((3, 9), dtype=bool)
    many[1, ::2] = True
    assert mask_boxes(many, max_boxes=2) == ([[0, 1, 0, 1], [2, 1, 2, 1]], 5)


def test_decode_image_modes_orientation_and_refusals() -> None:
    sixteen = np.array([[0, 65535, 257 * 100]], dtype=np.uint16)
    buffer = io.BytesIO()
    Image.fromarray(sixteen).save(buffer, format="PNG")
    np.testing.assert_array_equal(decode_image(buffer.getvalue())[..., 0], [[0, 255, 100]])
    rgba = np.zeros((2, 3, 4), np.uint8)
    rgba[..., 0] = 200
    assert decode_image(png(rgba)).shape == (2, 3, 3)
    upright = Image.fromarray(square_image(width=30, height=20))
    exif = upright.getexif()
    exif[0x0112] = 6  # stored rotated: viewers turn it 90 degrees clockwise
    buffer = io.BytesIO()
    upright.save(buffer, format="JPEG", exif=exif.tobytes())
    assert decode_image(buffer.getvalue()).shape == (30, 20, 3)
    with pytest.raises(BadImage):
        decode_image(b"")
    with pytest.raises(BadImage):
        decode_image(b"GIF89a not really")
    with pytest.raises(ImageTooLarge):
        decode_image(png(np.zeros((10, 10, 3), np.uint8)), max_pixels=99)


def test_uploads_decode_as_files_do_with_the_bundles_bit_depth(tmp_path: Path) -> None:
    """One image reader: an upload reads as the same file read by clipsam (12-bit data in a
    16-bit PNG: 4095 is white with the bundle's data.bit_depth 12, dark without it)."""
    from clipsam.data.samples import read_image

    twelve = np.array([[0, 4095, 2048]], dtype=np.uint16)
    path = tmp_path / "camera.png"
    Image.fromarray(twelve).save(path)
    data = path.read_bytes()
    np.testing.assert_array_equal(decode_image(data, bit_depth=12), read_image(path, bit_depth=12))
    assert decode_image(data, bit_depth=12)[0, :, 0].tolist() == [0, 255, 128]
    np.testing.assert_array_equal(decode_image(data), read_image(path))
    with pytest.raises(BadImage, match="could not be decoded"):
        decode_image(data, bit_depth=10)  # 4095 is above 10 bits: refused, not clipped


# -- a real bundle (slow: exports one first) ---------------------------------------------------------------


@pytest.mark.slow
def test_a_real_onnx_bundle_answers_as_the_runtime_does(tmp_path: Path, synth_root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Export the demo's WinCLIP + PPG/CPS as ONNX, serve it, and compare with ``Runtime.segment``."""
    pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    from clipsam.export import export_onnx
    from clipsam.runtime import Runtime
    from clipsam.serve.imaging import scores_to_uint8
    from clipsam.serve.server import load_runtime

    monkeypatch.setenv("CLIPSAM_SYNTH_ROOT", str(synth_root))
    bundle = tmp_path / "bundle"
    configs = [str(REPO / "configs" / "demo.yaml"), str(REPO / "configs" / "methods" / "demo" / "winclip.yaml")]
    export_onnx(None, configs, bundle, overrides={"data.image_size": 224, "model.refiner": "ppg_cps",
                                                  "model.refiner_config.sam.embedding_cache_dir": None})
    runtime = Runtime.from_bundle(bundle)
    files = {c: max((synth_root / "visa" / c / "Data" / "Images").rglob("*.*")) for c in ("capsule", "mesh")}
    with BackgroundServer(make_app(loader=lambda: load_runtime(bundle), max_batch=4, batch_wait_ms=50)) as server:
        wait_ready(server.url, timeout=120)
        status, info = call(server.url, "GET", "/info")
        assert status == 200 and info["method"] == "winclip" and info["serve"]["categories"] == runtime.categories
        with ThreadPoolExecutor(2) as pool:  # together: one batch of two categories
            answers = dict(zip(files, pool.map(lambda c: post_image(server.url, files[c].read_bytes(), query=f"?category={c}"), files)))
        status, body = post_image(server.url, files["mesh"].read_bytes())  # several categories, none named
        assert_one_line_error(status, body, 422)
    for category, (status, body) in answers.items():
        assert status == 200, body
        expected = runtime.segment(decode_image(files[category].read_bytes()), category=category)
        assert body["category"] == category and body["label"] == expected.label
        assert body["image_score"] == pytest.approx(expected.image_score, abs=1e-5)
        np.testing.assert_array_equal(decode_png(body["mask_png"]) > 0, expected.mask)
        np.testing.assert_array_equal(decode_png(body["scores_png"]), scores_to_uint8(expected.scores))
