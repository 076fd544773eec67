"""The demo page in a real browser: Debian's headless chromium, driven by Playwright.

A store with two real digits versions (trained by the CLI, exported to TF.js), a real
`pollinate serve`, the page at /web_client/: it must predict what the Keras model predicts
for the same test-split digit drawn on its canvas, switch to a newly promoted version
without a reload, and keep predicting after the server is gone (service worker + IndexedDB).
Screenshots go to test-artifacts/web_client/.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import REPO, cli_json, run_cli, stored_once
from tests.server_helpers.live import LiveServer
from tests.web_helpers.browser import chromium_context, missing_requirements

# Training two versions (~35 s) and a browser per test: well over 30 s.
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(bool(missing_requirements()), reason="; ".join(missing_requirements()) or "ok"),
]

ARTIFACTS = REPO / "test-artifacts" / "web_client"
# Enough test digits to mean something, few enough to stay quick; all confidently classified
# by Keras, so 8-bit canvas rounding (≤ 1/255 of the range per pixel) cannot flip a label.
DIGITS_PER_PAGE = 6


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> dict:
    """digits v1 (seed 0) and v2 (seed 1), both exported to TF.js by `pollinate train`."""
    def build(home: Path) -> None:  # as the node tests' prepareStore() builds it, before it promotes
        for seed in ("0", "1"):
            cli_json("train", "--dataset", "digits", "--epochs", "3", "--seed", seed, home=home)

    home = stored_once("digits-v1-v2", tmp_path_factory.mktemp("web") / "store", build)
    return {"home": home, "logs": tmp_path_factory.mktemp("web-logs")}


@pytest.fixture(scope="module")
def keras_models(store):
    """The stored Keras file of each version, loaded (the reference the page must match)."""
    import shutil
    import tempfile

    import keras

    from registry import Store

    registry = Store(store["home"])
    models = {}
    for version in (1, 2):
        source = registry.artifact_path("digits", version, "keras", "model.keras")
        folder = Path(tempfile.mkdtemp())
        shutil.copy(source, folder / "model.keras")  # keras wants the .keras suffix
        models[version] = keras.saving.load_model(folder / "model.keras")
    return models


@pytest.fixture(scope="module")
def test_digits(keras_models) -> list[dict]:
    """Test-split digits (raw 0..16) that v1 and v2 both classify with probability ≥ 0.9."""
    from training.datasets.digits import load_digits

    data = load_digits()
    pixels = np.rint(data.x_test[..., 0] * 16).astype(int)
    probs = {v: m.predict(data.x_test, verbose=0) for v, m in keras_models.items()}
    chosen = []
    for i in range(len(pixels)):
        if all(p[i].max() >= 0.9 for p in probs.values()):
            chosen.append({"index": i, "label": str(int(data.y_test[i])), "pixels": pixels[i].reshape(-1).tolist(),
                           "keras": {v: str(int(p[i].argmax())) for v, p in probs.items()}})
        if len(chosen) == DIGITS_PER_PAGE:
            return chosen
    raise AssertionError("too few confidently classified test digits")


def keras_probabilities(model, model_input: list[float]) -> np.ndarray:
    x = np.asarray(model_input, dtype=np.float32).reshape(1, 8, 8, 1)
    return model.predict(x, verbose=0)[0]


def promote(store, version: int) -> None:
    run_cli("models", "promote", "digits", str(version), "--channel", "stable", home=store["home"], check=True)


@pytest.fixture
def server(store, request):
    promote(store, 1)
    live = LiveServer(store["home"], log=store["logs"] / f"{request.node.name}.log")
    with live:
        yield live


@pytest.fixture
def browser(tmp_path):
    with chromium_context(tmp_path / "profile") as (context, messages):
        yield context, messages


def open_page(context, url: str, query: str = ""):
    page = context.new_page()
    page.goto(f"{url}/web_client/{query}")
    page.wait_for_function("window.pollinate !== undefined")
    info = page.evaluate("window.pollinate.ready")
    return page, info


def draw_and_predict(page, pixels: list[int]) -> dict:
    """Paint an 8×8 digit on the canvas through the page's test hook, press Predict, read the page."""
    page.evaluate("window.pollinate.clear()")
    page.evaluate("values => window.pollinate.drawPixels(values)", pixels)
    page.get_by_test_id("predict-button").click()
    page.wait_for_function("window.pollinate.lastResult !== null")
    result = page.evaluate("""() => {
        const r = window.pollinate.lastResult;
        return {label: r.label, top: r.top, version: r.version, backend: r.backend,
                probabilities: r.probabilities, modelInput: Array.from(r.modelInput)};
    }""")
    result["shown"] = page.get_by_test_id("prediction").text_content().strip()
    result["top3"] = page.get_by_test_id("probabilities").locator("li").evaluate_all(
        "items => items.map(li => li.dataset.label)")
    return result


def check_like_keras(result: dict, digit: dict, keras_model, version: int) -> None:
    # the label the page shows is the Keras model's label for the same test-split digit
    assert result["shown"] == digit["keras"][version], (digit, result)
    assert result["label"] == digit["keras"][version]
    assert result["version"] == version
    # the page's model input is the digit (canvas round trip within 1/255 of the range), scaled 1/16
    assert np.allclose(np.asarray(result["modelInput"]) * 16, digit["pixels"], atol=16 / 255 + 1e-4)
    # and on that exact input TF.js computes what Keras computes
    expected = keras_probabilities(keras_model, result["modelInput"])
    assert np.allclose(result["probabilities"], expected, atol=1e-4), (result["probabilities"], expected.tolist())
    assert result["top3"] == [str(i) for i in np.argsort(-expected, kind="stable")[:3]]


def screenshot(page, name: str) -> None:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / name), full_page=True)


# default: webgl → wasm → cpu, passing over software WebGL (headless chromium has only
# SwiftShader, so wasm); webgl forced: SwiftShader's WebGL must compute the same.
@pytest.mark.parametrize("backend", [None, "webgl", "cpu"], ids=["default", "webgl", "cpu"])
def test_drawn_test_digits_get_the_keras_models_label(server, browser, test_digits, keras_models, backend):
    context, messages = browser
    page, info = open_page(context, server.url, f"?poll=0&backend={backend}" if backend else "?poll=0")
    assert info["version"] == 1 and info["lineage"]["source"] == "central"
    shown_backend = page.get_by_test_id("backend").text_content().strip()
    assert shown_backend == (backend or page.evaluate("window.pollinate.client.backend"))
    assert shown_backend in ("webgl", "wasm", "cpu")
    assert page.get_by_test_id("model-version").text_content().strip() == "v1"
    for digit in test_digits:
        check_like_keras(draw_and_predict(page, digit["pixels"]), digit, keras_models[1], 1)
    assert "ms" in page.locator("#inference-time").text_content()
    assert page.locator("#model-lineage").text_content().startswith("central training")
    screenshot(page, f"prediction-{backend or 'default'}.png")
    assert not [m for m in messages if m.startswith("pageerror")], messages


def test_freehand_mouse_and_touch_strokes_reach_the_model(server, browser):
    context, messages = browser
    page, _ = open_page(context, server.url, "?poll=0")
    canvas = page.get_by_test_id("draw-canvas")
    box = canvas.bounding_box()

    def at(fx: float, fy: float) -> tuple[float, float]:
        return box["x"] + fx * box["width"], box["y"] + fy * box["height"]

    # mouse: a ring ("0"); the page predicts when the pen lifts
    ring = [at(0.5 + 0.2 * math.sin(t / 24 * 2 * math.pi), 0.5 - 0.32 * math.cos(t / 24 * 2 * math.pi)) for t in range(25)]
    page.mouse.move(*ring[0])
    page.mouse.down()
    for point in ring[1:]:
        page.mouse.move(*point, steps=4)
    page.mouse.up()
    page.wait_for_function("window.pollinate.lastResult !== null")
    grid = np.asarray(page.evaluate("window.pollinate.input()")).reshape(8, 8)
    assert grid[0].any() and grid[7].any(), "the drawing fills the 8×8 height"
    assert grid[3:5, 3:5].sum() < grid.sum() / 8, "the ring's hole stays light"
    assert page.get_by_test_id("prediction").get_attribute("data-label") in [str(d) for d in range(10)]
    assert page.get_by_test_id("probabilities").locator("li").count() == 3
    screenshot(page, "freehand-mouse.png")

    # touch: Clear (from the keyboard), then a vertical stroke ("1") with touch events
    page.get_by_test_id("clear-button").focus()
    page.keyboard.press("Enter")
    assert page.evaluate("window.pollinate.input()") is None
    assert page.get_by_test_id("prediction").text_content().strip() == "–"
    cdp = context.new_cdp_session(page)
    x, y0 = at(0.5, 0.15)
    cdp.send("Input.dispatchTouchEvent", {"type": "touchStart", "touchPoints": [{"x": x, "y": y0}]})
    for k in range(1, 21):
        cdp.send("Input.dispatchTouchEvent", {"type": "touchMove", "touchPoints": [{"x": x, "y": y0 + k * 0.035 * box["height"]}]})
    cdp.send("Input.dispatchTouchEvent", {"type": "touchEnd", "touchPoints": []})
    page.wait_for_function("window.pollinate.lastResult !== null")
    grid = np.asarray(page.evaluate("window.pollinate.input()")).reshape(8, 8)
    assert grid[0].any() and grid[7].any()
    assert grid[:, :2].sum() == 0 and grid[:, 6:].sum() == 0, "a centred vertical stroke"
    screenshot(page, "freehand-touch.png")
    assert not [m for m in messages if m.startswith("pageerror")], messages


def test_page_switches_to_a_newly_promoted_version(server, store, browser, test_digits, keras_models):
    context, messages = browser
    page, info = open_page(context, server.url, "?poll=300")
    assert info["version"] == 1
    notice = page.get_by_test_id("update-notice")
    assert notice.is_hidden()
    digit = test_digits[0]
    check_like_keras(draw_and_predict(page, digit["pixels"]), digit, keras_models[1], 1)
    page.evaluate("window.sameDocument = true")

    promote(store, 2)
    page.wait_for_function("document.querySelector('[data-testid=model-version]').textContent === 'v2'", timeout=20_000)
    assert notice.is_visible()
    assert "Updated to v2" in notice.text_content()
    # the page re-ran the drawn digit on the new version without a reload
    page.wait_for_function("window.pollinate.lastResult && window.pollinate.lastResult.version === 2")
    assert page.get_by_test_id("prediction").get_attribute("data-version") == "2"
    assert page.evaluate("window.pollinate.client.lastDispose.version") == 1
    assert page.evaluate("window.sameDocument") is True, "switched without a reload"
    check_like_keras(draw_and_predict(page, digit["pixels"]), digit, keras_models[2], 2)
    screenshot(page, "updated.png")
    assert not [m for m in messages if m.startswith("pageerror")], messages


def test_page_works_offline_after_the_first_load(server, browser, test_digits, keras_models):
    context, messages = browser
    page, info = open_page(context, server.url, "?poll=0")
    assert info["version"] == 1
    assert page.evaluate("window.pollinate.offlineReady") is True
    assert page.evaluate("window.pollinate.client.lastLoad.source") == "network"

    # online reload: IndexedDB has the model, the manifest costs a 304, no file is downloaded
    page.reload()
    page.wait_for_function("window.pollinate !== undefined")
    page.evaluate("window.pollinate.ready")
    load = page.evaluate("window.pollinate.client.lastLoad")
    assert (load["manifestStatus"], load["source"], load["downloads"]) == (304, "cache", [])
    assert page.evaluate("window.pollinate.client.fetchLog.map(e => [e.kind, e.status])") == [["manifest", 304]]
    assert "manifest revalidated (304)" in page.locator("#model-source").text_content()

    server.stop()
    page.reload()
    page.wait_for_function("window.pollinate !== undefined")
    info = page.evaluate("window.pollinate.ready")
    assert info["version"] == 1
    load = page.evaluate("window.pollinate.client.lastLoad")
    assert load["manifestStatus"] == "offline" and load["source"] == "cache" and load["downloads"] == []
    assert page.evaluate("navigator.serviceWorker.controller !== null"), "the page came from the service worker"
    for digit in test_digits[:3]:
        check_like_keras(draw_and_predict(page, digit["pixels"]), digit, keras_models[1], 1)
    assert "Offline" in page.locator("#status-chip").text_content()
    screenshot(page, "offline.png")
    assert not [m for m in messages if m.startswith("pageerror")], messages
