"""The monitoring dashboard in real Chromium: a model's field accuracy and drift, drawn.

A store with digits v1 and v2 (real profiles of scikit-learn's digits, see
tests/test_monitoring_server.py), six hours of telemetry and feedback merged through the
monitor (the last three hours on digits shifted right, so their drift climbs), a real
`pollinate serve`, and /dashboard in Debian's headless chromium: the page draws the field
accuracy per hour with its interval, the drift of every feature per hour with the alert
threshold, the telemetry volume, the channels with the shadow version and the alerts, with
no console error and nothing fetched from outside the server. Screenshots go to
test-artifacts/dashboard/.
"""

from __future__ import annotations

import time

import pytest

from tests.conftest import REPO
from tests.server_helpers.live import LiveServer
from tests.test_monitoring_server import batch, monitored_store
from tests.web_helpers.browser import chromium_context, missing_browser

pytestmark = pytest.mark.skipif(bool(missing_browser()), reason="; ".join(missing_browser()) or "ok")

ARTIFACTS = REPO / "test-artifacts" / "dashboard"
HOURS = 6
READY = "[data-testid=dashboard][data-state=ready]"


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    from registry import Store
    from registry.monitoring import Monitor

    root = tmp_path_factory.mktemp("dashboard")
    made = monitored_store(root / "store")
    v1, _ = made["versions"]
    monitor = Monitor(Store(made["home"]))
    now = time.time()
    for hour in range(HOURS):
        at = now - (HOURS - 1 - hour) * 3600
        shift = 3 if hour >= HOURS - 3 else 0
        monitor.ingest_telemetry("digits", batch(made["home"], v1, 60 * hour, 60, shift=shift), now=at)
        for i in range(30):  # accuracy falls from 90 % as the inputs drift
            right = i < (27 if hour < HOURS - 3 else 18)
            monitor.ingest_feedback("digits", {"version": v1, "prediction": "5", "label": "5" if right else "8"},
                                    now=at)
    monitor.check_alerts("digits")
    held = publish_held(Store(made["home"]), parent=v1)
    with LiveServer(made["home"], log=root / "serve.log", env={"POLLINATE_WEB_CLIENT": "off"}) as live:
        yield {**made, "url": live.url, "held": held}


def publish_held(store, parent: int) -> int:
    """A federated round the acceptance gate held (federated/acceptance.py writes this verdict
    into the lineage; its channel did not move)."""
    from registry import Lineage

    reason = "accuracy 0.1000 is 81.4 points under the last accepted 0.9140 (round 2): more than 2.0"
    gate = {"passed": False, "metric": "accuracy", "value": 0.1, "reference": 0.914, "reference_round": 2,
            "threshold": 0.02, "reason": reason}
    record = store.publish("digits", lineage=Lineage("federated", parent_version=parent, round=3,
                                                     extra={"gate": gate, "federation": {"channel": "canary"}}),
                           artifacts={"tflite-float32": {"model.tflite": b"held" * 100}}, metrics={"accuracy": 0.1},
                           input_spec={"shape": [8, 8, 1], "dtype": "float32"}, labels=[str(i) for i in range(10)])
    return record.version


def test_dashboard_draws_field_accuracy_and_drift(served, tmp_path):
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    v1, v2 = served["versions"]
    outside: list[str] = []
    with chromium_context(tmp_path / "profile") as (context, messages):
        page = context.new_page()
        page.on("request", lambda r: outside.append(r.url) if not r.url.startswith(served["url"]) else None)
        page.goto(f"{served['url']}/dashboard?model=digits")
        page.wait_for_selector(READY, timeout=30_000)
        section = page.get_by_test_id("model-digits")
        assert section.is_visible()

        accuracy = section.get_by_test_id("plot-accuracy")
        assert accuracy.evaluate("e => e.tagName.toLowerCase()") == "svg"
        assert int(accuracy.get_attribute("data-points")) == HOURS
        assert accuracy.locator("circle").count() == HOURS
        assert accuracy.get_by_test_id("plot-accuracy-band").count() == 1  # the Wilson interval
        heights = accuracy.locator("circle").evaluate_all("cs => cs.map(c => Number(c.getAttribute('cy')))")
        assert heights[-1] > heights[0], "the accuracy line falls (SVG y grows downwards)"

        drift = section.get_by_test_id("plot-drift")
        series = set(drift.locator("polyline").evaluate_all("ls => ls.map(l => l.dataset.series)"))
        assert {"ink_mass", "centroid_x", "cols_0"} <= series
        assert drift.get_by_test_id("plot-drift-threshold").count() == 1
        centroid = drift.locator("circle[data-series=centroid_x]").evaluate_all(
            "cs => cs.map(c => Number(c.getAttribute('cy')))")
        assert len(centroid) == HOURS and max(centroid[-3:]) < min(centroid[:3]), "the shifted hours drift higher"

        assert section.get_by_test_id("plot-volume").locator("rect").count() == HOURS
        assert f"{v2}" == section.get_by_test_id("channels").get_by_test_id("shadow").inner_text().strip()
        assert "%" in section.get_by_test_id("versions").get_by_test_id("field-accuracy").first.inner_text()
        assert "drift" in section.get_by_test_id("alerts").inner_text().lower()
        holds = section.get_by_test_id("gate-holds")  # the round the acceptance gate held, and why
        assert holds.locator(f"li[data-version='{served['held']}']").count() == 1
        assert "canary not moved" in holds.inner_text() and "81.4 points under" in holds.inner_text()
        page.screenshot(path=str(ARTIFACTS / "digits.png"), full_page=True)

        page.goto(f"{served['url']}/dashboard")  # every model
        page.wait_for_selector(READY, timeout=30_000)
        assert page.get_by_test_id("model-digits").is_visible() and page.get_by_test_id("model-plain").is_visible()
        assert "No telemetry" in page.get_by_test_id("model-plain").inner_text()
        page.get_by_test_id("bucket").select_option("day")
        page.wait_for_selector(READY, timeout=30_000)
        assert page.get_by_test_id("model-digits").get_by_test_id("plot-volume").locator("rect").count() in (1, 2)
        page.screenshot(path=str(ARTIFACTS / "all-models.png"), full_page=True)
    assert not messages, messages
    assert not outside, outside
