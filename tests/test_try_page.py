"""The try-it page (/try/{name}) and hybrid serving in real Chromium.

A store with delivery-eta and digits trained by `pollinate train`, a real `pollinate serve`,
and Debian's headless chromium (tests/web_helpers/browser.py):

- /try/delivery-eta renders a field per column named by the column (numbers with the training
  range from the manifest's monitoring grid, a select over the city vocabulary); filled in and
  submitted, it predicts in the browser, the server's answer beside it, and the prediction
  equals what POST /v1/models/delivery-eta/predict answers for the same row (<= 1e-4);
- with the model files blocked (Playwright's route) or tampered with (sha256 fails), the page's
  client (mode 'auto') answers from the server and says so;
- the index page lists the served models with links to their try-it pages; an image model's
  page (digits) leads to the drawing pad.

Screenshots go to test-artifacts/try/.
"""

from __future__ import annotations

import httpx
import pytest

from tests.conftest import REPO
from tests.web_helpers.browser import chromium_context, missing_requirements

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(bool(missing_requirements()), reason="; ".join(missing_requirements()) or "ok")]

ARTIFACTS = REPO / "test-artifacts" / "try"
READY = "[data-testid=status][data-state=ready]"
ROW = {"distance_km": 3.2, "hour": 19, "weekday": 5, "prep_time_min": 14.5, "courier_load": 1.4, "city": "london"}
MODEL_FILES = "**/v1/models/*/versions/*/files/tfjs-*/**"


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    from tests.conftest import cli_json
    from tests.server_helpers.live import LiveServer

    home = tmp_path_factory.mktemp("try-page") / "store"
    cli_json("train", "--dataset", "delivery-eta", "--epochs", "3", "--seed", "0", home=home)
    cli_json("train", "--dataset", "digits", "--epochs", "1", "--seed", "0", home=home)
    logs = tmp_path_factory.mktemp("try-page-logs")
    with LiveServer(home, log=logs / "serve.log") as live:
        manifest = httpx.get(f"{live.url}/v1/models/delivery-eta/manifest", timeout=30).json()
        yield {"url": live.url, "manifest": manifest}


def server_prediction(url: str, row: dict) -> float:
    answer = httpx.post(f"{url}/v1/models/delivery-eta/predict", params={"channel": "stable"}, json={"rows": [row]},
                        timeout=60)
    assert answer.status_code == 200, answer.text
    return float(answer.json()["outputs"][0][0])


def fill(page, row: dict) -> None:
    for column, value in row.items():
        field = page.locator(f"[name={column}]")
        if field.evaluate("e => e.tagName.toLowerCase()") == "select":
            field.select_option(str(value))
        else:
            field.fill(str(value))


def predict(page) -> None:
    page.get_by_test_id("prediction").evaluate("e => { e.dataset.value = ''; }")
    page.get_by_test_id("predict-button").click()
    page.wait_for_function("document.querySelector('[data-testid=prediction]').dataset.value !== ''", timeout=30_000)


def test_delivery_eta_try_page_predicts_like_the_server(served, tmp_path):
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    url, manifest = served["url"], served["manifest"]
    outside: list[str] = []
    with chromium_context(tmp_path / "profile") as (context, messages):
        page = context.new_page()
        page.on("request", lambda r: outside.append(r.url) if not r.url.startswith(url) else None)
        page.goto(f"{url}/try/delivery-eta")
        page.wait_for_selector(READY, timeout=60_000)
        assert page.get_by_test_id("mode").get_attribute("data-mode") == "local"

        # one named field per column: numbers with the training range, a select per category
        grid = {f["name"]: f for f in manifest["monitoring"]["features"]}
        for column in manifest["input"]["preprocessing"]["columns"]:
            field = page.locator(f"[name={column['name']}]")
            assert field.count() == 1, column["name"]
            if column["type"] == "categorical":
                assert field.evaluate("e => e.tagName.toLowerCase()") == "select"
                assert field.locator("option").evaluate_all("os => os.map(o => o.value)") == column["vocabulary"]
            else:
                assert field.get_attribute("type") == "number"
                edges = grid[column["name"]]["edges"]
                assert float(field.get_attribute("min")) == pytest.approx(edges[0], abs=1e-3)
                assert float(field.get_attribute("max")) == pytest.approx(edges[-1], abs=1e-3)
        assert page.locator("[name=hour]").get_attribute("step") == "1"

        fill(page, ROW)
        predict(page)
        expected = server_prediction(url, ROW)
        shown = page.get_by_test_id("prediction")
        assert shown.get_attribute("data-path") == "local"
        assert abs(float(shown.get_attribute("data-value")) - expected) <= 1e-4
        assert abs(float(page.get_by_test_id("prediction-server").get_attribute("data-value")) - expected) <= 1e-4
        assert float(page.get_by_test_id("prediction-diff").get_attribute("data-value")) <= 1e-4
        assert page.get_by_test_id("path").inner_text() == "this browser"
        page.screenshot(path=str(ARTIFACTS / "delivery-eta.png"), full_page=True)

        # another row, the server switched off: the browser alone answers
        other = {**ROW, "city": "amsterdam", "distance_km": 8.5, "hour": 12}
        page.get_by_test_id("also-server").uncheck()
        fill(page, other)
        predict(page)
        assert abs(float(shown.get_attribute("data-value")) - server_prediction(url, other)) <= 1e-4
        assert page.get_by_test_id("prediction-server").inner_text().startswith("–")

        # a value the encoder refuses (the browser's own validation off) names its column
        page.locator("form").evaluate("f => { f.noValidate = true; }")
        page.locator("[name=courier_load]").fill("")
        page.get_by_test_id("predict-button").click()
        error = page.get_by_test_id("error")
        error.wait_for(state="visible", timeout=10_000)
        assert '"courier_load"' in error.inner_text()
        assert page.locator("[name=courier_load]").get_attribute("aria-invalid") == "true"
    assert not messages, messages
    assert not outside, outside


@pytest.mark.parametrize("how", ["blocked", "tampered"])
def test_hybrid_mode_falls_back_to_the_server_when_the_model_cannot_load(served, tmp_path, how):
    url = served["url"]

    def block(route):
        route.abort()

    def tamper(route):
        response = route.fetch()
        body = bytearray(response.body())
        body[len(body) // 2] ^= 0x01
        route.fulfill(response=response, body=bytes(body))

    with chromium_context(tmp_path / "profile") as (context, messages):
        context.route(MODEL_FILES, block if how == "blocked" else tamper)
        page = context.new_page()
        page.goto(f"{url}/try/delivery-eta")
        page.wait_for_selector(READY, timeout=60_000)
        mode = page.get_by_test_id("mode")
        assert mode.get_attribute("data-mode") == "server"
        assert "cannot load" in mode.inner_text()
        if how == "tampered":
            assert "sha256" in mode.inner_text()
        fill(page, ROW)
        predict(page)
        shown = page.get_by_test_id("prediction")
        assert shown.get_attribute("data-path") == "server"
        assert abs(float(shown.get_attribute("data-value")) - server_prediction(url, ROW)) <= 1e-5
        assert page.get_by_test_id("path").inner_text().startswith("the server: this browser cannot load the model")
        assert page.get_by_test_id("prediction-local").inner_text().startswith("–")
        client = page.evaluate("({mode: tryPage.client.mode, requested: tryPage.client.requestedMode, "
                               "fallback: tryPage.client.fallback, files: tryPage.client.model})")
        assert client["mode"] == "server" and client["requested"] == "auto" and client["files"] is None
        assert client["fallback"]["code"] == ("network" if how == "blocked" else "integrity")
        page.screenshot(path=str(ARTIFACTS / f"fallback-{how}.png"), full_page=True)
    # a blocked request is logged by the browser; nothing else may be
    assert not [m for m in messages if "net::ERR_FAILED" not in m], messages


def test_index_lists_the_models_and_digits_keeps_its_canvas(served, tmp_path):
    url = served["url"]
    page_html = httpx.get(f"{url}/try/delivery-eta", timeout=30)
    assert page_html.status_code == 200 and '<base href="/web_client/try/">' in page_html.text
    assert httpx.get(f"{url}/try/", timeout=30, follow_redirects=False).headers["location"] == "/web_client/#models"
    assert httpx.get(f"{url}/try/Not%20a%20name", timeout=30).status_code == 404
    with chromium_context(tmp_path / "profile") as (context, messages):
        page = context.new_page()
        page.goto(f"{url}/web_client/?sw=0&poll=0")
        page.wait_for_selector("[data-testid=model-list][data-state=ready]", timeout=30_000)
        links = page.get_by_test_id("model-list").locator("a")
        assert sorted(links.evaluate_all("as => as.map(a => a.getAttribute('href'))")) == ["/try/delivery-eta", "/try/digits"]
        page.get_by_test_id("try-digits").click()
        page.wait_for_selector(READY, timeout=30_000)
        assert page.get_by_test_id("image-model").is_visible()
        assert page.get_by_test_id("canvas-link").get_attribute("href") == "/web_client/?model=digits"
        assert not page.locator("#try-form").is_visible()
        page.get_by_test_id("canvas-link").click()
        page.wait_for_selector("[data-testid=draw-canvas]", timeout=30_000)
        page.goto(f"{url}/try/no-such-model")
        page.get_by_test_id("error").wait_for(state="visible", timeout=30_000)
        assert "No model named" in page.get_by_test_id("error").inner_text()
    # the unknown model's manifest answers 404, which the browser logs
    assert not [m for m in messages if "404" not in m], messages
