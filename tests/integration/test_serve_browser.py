"""``clipsam serve``'s web page in a real browser (Playwright driving Debian's Chromium).

Uploads an image, waits for the answer, checks the label/score text and the overlay canvas's
pixels, then moves the threshold slider and checks that the mask follows the scores. Needs
``/usr/bin/chromium`` (``apt-get install chromium``) and the ``playwright`` pip package; it never
downloads a browser. A screenshot goes to the test's tmp_path and, when ``CLIPSAM_ARTIFACTS`` is
set, into that folder too.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

CHROMIUM = Path("/usr/bin/chromium")
if not CHROMIUM.exists():
    pytest.skip(f"{CHROMIUM} is absent: install it with `apt-get install chromium` to run the page test", allow_module_level=True)
pytest.importorskip("aiohttp")
sync_api = pytest.importorskip("playwright.sync_api", reason="the playwright pip package is not installed")

from clipsam.serve import make_app
from clipsam.serve.background import BackgroundServer
from clipsam.serve.fake import FakeBackend

LAUNCH_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
TOKEN = "browser-test-token"
# The test image: dark, with a rectangle whose left half is 160 (score 0.627) and right half 240
# (score 0.941). At the fake's pixel threshold 0.5 both halves are the mask; at 200/255 only the right.
WIDTH, HEIGHT = 120, 80
LEFT = (slice(20, 60), slice(30, 60))  # rows, columns: 40 x 30 pixels of 160
RIGHT = (slice(20, 60), slice(60, 90))  # 40 x 30 pixels of 240


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    with sync_api.sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=LAUNCH_ARGS)
        try:
            yield chromium
        finally:
            chromium.close()


@pytest.fixture()
def test_image(tmp_path: Path) -> Path:
    pixels = np.full((HEIGHT, WIDTH, 3), 30, dtype=np.uint8)
    pixels[LEFT] = 160
    pixels[RIGHT] = 240
    path = tmp_path / "part_0001.png"
    Image.fromarray(pixels).save(path)
    return path


def save_artefact(page: Any, tmp_path: Path, name: str) -> Path:
    """Screenshot into tmp_path, copied to $CLIPSAM_ARTIFACTS when set."""
    shot = tmp_path / name
    page.screenshot(path=str(shot), full_page=True)
    target = os.environ.get("CLIPSAM_ARTIFACTS")
    if target:
        Path(target).mkdir(parents=True, exist_ok=True)
        shutil.copy(shot, Path(target) / name)
    return shot


OVERLAY_PIXELS = """() => {
  const canvas = document.getElementById('overlay');
  const data = canvas.getContext('2d').getImageData(0, 0, canvas.width, canvas.height).data;
  let tinted = 0, contour = 0;
  for (let p = 0; p < data.length; p += 4) {
    const [r, g, b] = [data[p], data[p + 1], data[p + 2]];
    if (r === 255 && g === 215 && b === 0) contour++;
    else if (r > g + 40 && r > b + 40) tinted++;
  }
  return {width: canvas.width, height: canvas.height, tinted, contour, counted: Number(canvas.dataset.maskPixels)};
}"""


def set_slider(page: Any, level: int) -> None:
    page.eval_on_selector(
        "#threshold",
        "(el, v) => { el.value = String(v); el.dispatchEvent(new Event('input', {bubbles: true})); }",
        level,
    )


def upload_and_wait(page: Any, image: Path) -> None:
    page.set_input_files("#file", str(image))
    page.wait_for_selector("body[data-state=done]", timeout=15_000)


def test_upload_shows_overlay_label_score_and_the_slider_rethresholds(browser: Any, test_image: Path, tmp_path: Path) -> None:
    backend = FakeBackend()
    with BackgroundServer(make_app(backend)) as server:
        page = browser.new_page()
        errors: list[str] = []
        page.on("pageerror", lambda exc: errors.append(str(exc)))
        page.goto(server.url)
        page.wait_for_function("() => document.getElementById('health').textContent === 'model ready'", timeout=15_000)
        assert page.is_hidden("#token-row")  # no token needed here
        upload_and_wait(page, test_image)

        assert page.inner_text("#label") == "ANOMALOUS"
        assert "image score 0.941 (threshold 0.500)" in page.inner_text("#score")
        assert "1 region(s)" in page.inner_text("#score")
        both_halves = 2 * 40 * 30
        at_server = page.evaluate(OVERLAY_PIXELS)
        assert (at_server["width"], at_server["height"]) == (WIDTH, HEIGHT)
        assert at_server["counted"] == both_halves
        assert at_server["contour"] > 0 and at_server["tinted"] + at_server["contour"] == both_halves
        assert page.input_value("#threshold") == str(round(0.5 * 255))
        assert page.inner_text("#threshold-value") == "0.500 (bundle)"
        save_artefact(page, tmp_path, "serve_page_server_threshold.png")

        set_slider(page, 200)
        right_half = page.evaluate(OVERLAY_PIXELS)
        assert right_half["counted"] == 40 * 30 and right_half["tinted"] + right_half["contour"] == 40 * 30
        assert "0.784" in page.inner_text("#threshold-value")

        page.focus("#threshold")
        page.keyboard.press("End")  # 255: above every score of the image
        assert page.evaluate(OVERLAY_PIXELS)["counted"] == 0
        page.click("#threshold-reset")
        assert page.evaluate(OVERLAY_PIXELS)["counted"] == both_halves
        set_slider(page, 200)
        save_artefact(page, tmp_path, "serve_page_slider.png")
        assert errors == []
        page.close()
    assert backend.batch_sizes[1:] == [1]  # the page sent one request


def test_the_page_asks_for_the_token_and_then_works(browser: Any, test_image: Path, tmp_path: Path) -> None:
    with BackgroundServer(make_app(FakeBackend(categories=("bottle", "screw")), token=TOKEN)) as server:
        page = browser.new_page()
        page.goto(server.url)
        page.wait_for_selector("#token-row:not([hidden])", timeout=15_000)
        page.set_input_files("#file", str(test_image))
        page.wait_for_selector("body[data-state=error]", timeout=15_000)
        assert "bearer token" in page.inner_text("#status")
        page.fill("#token", TOKEN)
        page.click("#token-save")
        page.wait_for_function("() => document.getElementById('category').options.length === 3", timeout=15_000)
        page.select_option("#category", "screw")
        upload_and_wait(page, test_image)
        assert "screw" in page.inner_text("#score")
        save_artefact(page, tmp_path, "serve_page_token.png")
        page.close()


def test_the_demo_onnx_bundle_in_the_page(browser: Any, tmp_path: Path, synth_root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`clipsam serve` on the demo's exported bundle (WinCLIP + PPG/CPS, the runtime, no fake):
    the page shows the runtime's label and score and its mask as the overlay."""
    pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    from clipsam.export import export_onnx
    from clipsam.runtime import Runtime
    from clipsam.serve.server import load_runtime

    repo = Path(__file__).resolve().parents[2]
    monkeypatch.setenv("CLIPSAM_SYNTH_ROOT", str(synth_root))
    bundle = tmp_path / "bundle"
    configs = [str(repo / "configs" / "demo.yaml"), str(repo / "configs" / "methods" / "demo" / "winclip.yaml")]
    export_onnx(None, configs, bundle, overrides={"data.image_size": 224, "model.refiner": "ppg_cps",
                                                  "model.refiner_config.sam.embedding_cache_dir": None})  # fmt: skip
    runtime = Runtime.from_bundle(bundle)
    candidates = sorted((synth_root / "visa" / "capsule" / "Data" / "Images" / "Anomaly").glob("*.*"))
    image, expected = next((p, r) for p in candidates if (r := runtime.segment(p, category="capsule")).mask.any())
    with BackgroundServer(make_app(loader=lambda: load_runtime(bundle), category="capsule")) as server:
        page = browser.new_page()
        errors: list[str] = []
        page.on("pageerror", lambda exc: errors.append(str(exc)))
        page.goto(server.url)
        page.wait_for_function("() => document.getElementById('health').textContent === 'model ready'", timeout=60_000)
        upload_and_wait(page, image)
        assert page.inner_text("#label") == ("ANOMALOUS" if expected.label else "NORMAL")
        assert f"image score {expected.image_score:.3f}" in page.inner_text("#score")
        overlay = page.evaluate(OVERLAY_PIXELS)
        assert (overlay["height"], overlay["width"]) == expected.mask.shape
        assert overlay["counted"] == int(expected.mask.sum()) > 0  # the runtime's mask, drawn
        assert overlay["contour"] > 0
        save_artefact(page, tmp_path, "serve_page_demo_bundle.png")
        assert errors == []
        page.close()
