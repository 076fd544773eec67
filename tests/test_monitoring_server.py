"""Telemetry, feedback and the monitor's view over HTTP, against a real `pollinate serve`.

A store with real files: digits v1 and v2 whose profiles are computed on scikit-learn's
handwritten digits (a stand-in "model" that predicts the true class with noise, no
TensorFlow), and a model without a profile. Telemetry batches are what a client computes
(``registry.profile.observe``) on held-out digits; a flood, malformed and oversized bodies are
refused and leave the aggregates as they were; the manifest carries the grid; a new alert
reaches a webhook (a tiny ``http.server`` on 127.0.0.1) and starts the retraining command once;
a worse candidate under a guardrail is rolled back by the server on its own.
"""

from __future__ import annotations

import json
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import httpx
import numpy as np
import pytest

from tests.server_helpers.live import LiveServer

LABELS = [str(d) for d in range(10)]
INPUT_SPEC = {"shape": [8, 8, 1], "dtype": "float32",
              "preprocessing": {"kind": "image", "layout": "HWC", "height": 8, "width": 8, "channels": 1,
                                "scale": 1 / 16, "offset": 0.0}}
RATE = 30  # telemetry batches a minute per client in these servers
INTERVAL_S = 0.2  # seconds between two alert checks of a model


# ---------------------------------------------------------------------------- data and store


def digits() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    data = load_digits()
    return (data.images / 16.0).astype(np.float32)[..., None], data.target


def outputs_for(y: np.ndarray, accuracy: float, seed: int) -> np.ndarray:
    """Probabilities of a stand-in classifier that is right `accuracy` of the time."""
    rng = np.random.default_rng(seed)
    predicted = np.where(rng.random(len(y)) < accuracy, y, rng.integers(0, 10, len(y)))
    probs = rng.random((len(y), 10)) * 0.2
    probs[np.arange(len(y)), predicted] += 1.0 + rng.random(len(y))
    return probs / probs.sum(axis=1, keepdims=True)


def publish_monitored(store, model: str = "digits", seed: int = 0) -> int:
    """A version with a real profile of the training half of the digits."""
    from registry import Lineage
    from registry.profile import build_profile

    x, y = digits()
    train = slice(0, 1200)
    profile = build_profile(x[train], outputs_for(y[train], 0.95, seed), INPUT_SPEC, LABELS, "classification")
    record = store.publish(
        model, lineage=Lineage("central", hyperparameters={"seed": seed}),
        artifacts={"tflite-float32": {"model.tflite": bytes([seed]) * 1000},
                   "profile": {"profile.json": json.dumps(profile).encode()}},
        metrics={"accuracy": 0.95}, input_spec=INPUT_SPEC, labels=LABELS,
    )
    return record.version


def monitored_store(home: Path) -> dict:
    """digits v1, v2 (profiles; stable -> v1 with v2 as its shadow), plain v1 (no profile)."""
    from registry import Lineage, Store
    from registry.monitoring import Monitor

    store = Store(home)
    v1, v2 = publish_monitored(store, seed=1), publish_monitored(store, seed=2)
    store.set_channel("digits", "stable", v1)
    Monitor(store).set_shadow("digits", "stable", v2)
    store.publish("plain", lineage=Lineage("central"), artifacts={"tflite-float32": {"model.tflite": b"x" * 100}},
                  metrics={}, input_spec=INPUT_SPEC, labels=LABELS)
    return {"home": home, "versions": (v1, v2)}


def grid_of(home: Path, version: int) -> dict:
    from registry import Store
    from registry.profile import grid

    return grid(json.loads(Store(home).artifact_path("digits", version, "profile", "profile.json").read_bytes()))


def batch(home: Path, version: int, start: int, n: int, *, shift: int = 0, client_id: str | None = None,
          accuracy: float = 0.95) -> dict:
    """A client's telemetry body for held-out digits [start, start+n) (shifted right by `shift` pixels)."""
    from registry.profile import observe

    x, y = digits()
    x, y = x[1200 + start:1200 + start + n], y[1200 + start:1200 + start + n]
    if shift:
        x = np.roll(x, shift, axis=2)
        x[:, :, :shift] = 0
    body = observe(x, outputs_for(y, accuracy, start), grid_of(home, version), INPUT_SPEC)
    body.update(version=version, errors=0, latency_ms=[0, n, 0, 0, 0, 0, 0, 0, 0, 0, 0])
    if client_id:
        body["client_id"] = client_id
    return body


# ---------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    root = tmp_path_factory.mktemp("monitoring-server")
    made = monitored_store(root / "store")
    # the tests play several addresses through X-Forwarded-For, believed from 127.0.0.1 only:
    # rate limits are per address (issue 19), so each test sends from addresses of its own
    env = {"POLLINATE_TELEMETRY_RATE": str(RATE), "POLLINATE_MONITOR_INTERVAL": str(INTERVAL_S),
           "POLLINATE_WEB_CLIENT": "off", "POLLINATE_TRUSTED_PROXIES": "127.0.0.1"}
    with LiveServer(made["home"], log=root / "serve.log", env=env) as live:
        yield {**made, "url": live.url, "log": root / "serve.log"}


def post(served, model: str, route: str, body, headers: dict | None = None, *, address: str | None = None,
         **kwargs) -> httpx.Response:
    """POST a body; `address`: the client address a trusted proxy (127.0.0.1) reports for it."""
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    forwarded = {"X-Forwarded-For": address} if address else {}
    return httpx.post(f"{served['url']}/v1/models/{model}/{route}", content=content,
                      headers={"Content-Type": "application/json", **forwarded, **(headers or {})}, timeout=30,
                      **kwargs)


def report(served, model: str = "digits") -> dict:
    answer = httpx.get(f"{served['url']}/v1/models/{model}/monitor", timeout=30)
    assert answer.status_code == 200, answer.text
    return answer.json()["report"]


def version_numbers(served, version: int) -> dict:
    return report(served)["versions"].get(str(version)) or {}


# ---------------------------------------------------------------------------- the manifest


def test_manifest_carries_the_grid_and_the_shadow(served):
    v1, v2 = served["versions"]
    stable = httpx.get(f"{served['url']}/v1/models/digits/manifest", timeout=10).json()
    expected = {**grid_of(served["home"], v1), "telemetry_url": "/v1/models/digits/telemetry",
                "feedback_url": "/v1/models/digits/feedback"}
    assert stable["monitoring"] == expected
    assert [f["name"] for f in stable["monitoring"]["features"]][:5] == [
        "ink_mass", "coverage", "centroid_x", "centroid_y", "spread"]
    for feature in stable["monitoring"]["features"]:  # deciles: up to 10 bins (equal deciles merge)
        assert 2 <= len(feature["edges"]) <= 11 and feature["edges"] == sorted(set(feature["edges"]))
    assert stable["shadow"] == {"version": v2, "manifest": f"/v1/models/digits/versions/{v2}/manifest"}
    assert "profile" not in stable["export"]["delivered"]

    fixed = httpx.get(f"{served['url']}/v1/models/digits/versions/{v2}/manifest", timeout=10).json()
    assert fixed["monitoring"]["features"] == grid_of(served["home"], v2)["features"]
    assert "shadow" not in fixed  # a fixed version is no channel's
    plain = httpx.get(f"{served['url']}/v1/models/plain/manifest", timeout=10).json()
    assert "monitoring" not in plain and "shadow" not in plain


# ---------------------------------------------------------------------------- telemetry


def test_telemetry_batches_merge_into_the_versions_window(served):
    v1, _ = served["versions"]
    before = version_numbers(served, v1).get("predictions", 0)
    first = batch(served["home"], v1, 0, 40, client_id="merge-a")
    second = batch(served["home"], v1, 40, 60, client_id="merge-b")
    answers = [post(served, "digits", "telemetry", b, address="198.51.100.1") for b in (first, second)]
    for answer in answers:
        assert answer.status_code == 202, answer.text
        assert answer.json()["accepted"] is True
        assert answer.json()["window"].endswith(":00:00Z")
    assert version_numbers(served, v1)["predictions"] == before + 100


def test_every_refusal_is_4xx_with_a_detail_and_stores_nothing(served):
    v1, _ = served["versions"]
    good = batch(served["home"], v1, 100, 20, client_id="refusals")
    before = report(served)
    long_histogram = {**good, "features": {**good["features"], "ink_mass": good["features"]["ink_mass"] + [0]}}
    negative = json.loads(json.dumps(good))
    negative["features"]["coverage"][0] = -1
    over = json.loads(json.dumps(good))
    over["features"]["spread"][0] += good["predictions"] + 1
    cases = {
        "not JSON": (b"{not json", 422),
        "not an object": ([1, 2, 3], 422),
        "unknown version": ({**good, "version": 99}, 422),
        "histogram of the wrong length": (long_histogram, 422),
        "negative count": (negative, 422),
        "counts over predictions": (over, 422),
        "floats that could hold an input": ({**good, "features": {**good["features"], "ink_mass": [0.5] * 10}}, 422),
        "a long string": ({**good, "note": "x" * 200}, 422),
        "too many predictions": ({**good, "predictions": 10_001}, 422),
    }
    for what, (body, status) in cases.items():
        answer = post(served, "digits", "telemetry", body, address="198.51.100.2")
        assert answer.status_code == status, (what, answer.text)
        assert isinstance(answer.json()["detail"], str) and answer.json()["detail"], what

    unknown = post(served, "nosuchmodel", "telemetry", good, address="198.51.100.2")
    assert unknown.status_code == 404 and "nosuchmodel" in unknown.json()["detail"]
    huge = post(served, "digits", "telemetry", json.dumps({**good, "pad": "x" * 70_000}).encode(),
                address="198.51.100.2")
    assert huge.status_code == 413 and "detail" in huge.json()
    for what, body in {"no label": {"version": v1, "prediction": "7"},
                       "unknown label": {"version": v1, "prediction": "7", "label": "seven"},
                       "unknown prediction id": {"prediction_id": "never-sent", "label": "1"}}.items():
        answer = post(served, "digits", "feedback", body, address="198.51.100.2")
        assert answer.status_code in (404, 422), (what, answer.text)
        assert answer.json()["detail"], what

    after = report(served)
    assert after["versions"] == before["versions"], "a refused batch changed the aggregates"


def test_a_flood_gets_429_and_leaves_the_aggregates_intact(served):
    """The flood comes from one address with a new client_id on every post (the limit is the
    address's: issue 19); another address is not held back by it."""
    v1, _ = served["versions"]
    body = batch(served["home"], v1, 200, 10)
    before = version_numbers(served, v1).get("predictions", 0)
    statuses, retry = [], []
    started = time.monotonic()
    with httpx.Client(timeout=30, headers={"X-Forwarded-For": "198.51.100.3"}) as client:
        for i in range(RATE + 20):
            answer = client.post(f"{served['url']}/v1/models/digits/telemetry", json={**body, "client_id": f"fl-{i}"})
            statuses.append(answer.status_code)
            if answer.status_code == 429:
                retry.append(int(answer.headers["Retry-After"]))
                assert "retry" in answer.json()["detail"]
    refilled = (time.monotonic() - started) * RATE / 60
    accepted = statuses.count(202)
    assert set(statuses) == {202, 429}
    assert RATE <= accepted <= RATE + 1 + refilled  # a minute's burst, and what refilled while sending
    assert min(retry) >= 1
    assert version_numbers(served, v1)["predictions"] == before + 10 * accepted
    # another address is not held back by the flooder
    assert post(served, "digits", "telemetry", {**body, "client_id": "patient"},
                address="198.51.100.4").status_code == 202
    metrics = httpx.get(f"{served['url']}/metrics", timeout=10).text
    refused = [line for line in metrics.splitlines() if line.startswith("pollinate_monitor_refusals_total{")
               and 'reason="rate_limited"' in line and 'route="telemetry"' in line]
    assert refused and float(refused[0].rsplit(" ", 1)[1]) >= statuses.count(429)


# ---------------------------------------------------------------------------- feedback


def test_feedback_yields_field_accuracy_with_an_interval(served):
    _, v2 = served["versions"]
    right = [{"version": v2, "prediction": str(d % 10), "label": str(d % 10), "client_id": f"fb-{d}"} for d in range(16)]
    wrong = [{"version": v2, "prediction": "1", "label": "7", "client_id": f"fb-w{d}"} for d in range(4)]
    for body in right + wrong:
        answer = post(served, "digits", "feedback", body, address="198.51.100.5")
        assert answer.status_code == 202, answer.text
    accuracy = version_numbers(served, v2)["field_accuracy"]
    assert accuracy["n"] == 20 and accuracy["value"] == pytest.approx(0.8)
    assert accuracy["low"] < 0.8 < accuracy["high"]

    # a late label joins the prediction a client listed in `recent`
    late = batch(served["home"], v2, 300, 5, client_id="late-label")
    late["recent"] = [{"id": "pred-0001", "prediction": "3", "confidence": 0.9}]
    assert post(served, "digits", "telemetry", late, address="198.51.100.5").status_code == 202
    assert post(served, "digits", "feedback", {"prediction_id": "pred-0001", "label": "3"},
                address="198.51.100.5").status_code == 202
    assert version_numbers(served, v2)["field_accuracy"]["n"] == 21


# ---------------------------------------------------------------------------- alerts: webhook, retraining


class Hook(BaseHTTPRequestHandler):
    received: list[dict] = []

    def do_POST(self):  # noqa: N802 (http.server's name)
        length = int(self.headers.get("Content-Length") or 0)
        Hook.received.append(json.loads(self.rfile.read(length)))
        self.send_response(204)
        self.end_headers()

    def log_message(self, *args):
        pass


@pytest.fixture
def webhook():
    Hook.received = []
    server = HTTPServer(("127.0.0.1", 0), Hook)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/alerts", Hook.received
    finally:
        server.shutdown()
        server.server_close()


def wait_for(condition, timeout: float = 20.0, what: str = ""):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def test_drift_alert_reaches_the_webhook_and_starts_retraining_once(tmp_path, webhook):
    from registry import Store
    from registry.monitoring import Monitor

    url, received = webhook
    home = tmp_path / "store"
    made = monitored_store(home)
    v1, _ = made["versions"]
    marker = tmp_path / "retrained.txt"
    retrain = [sys.executable, "-c",
               "import os, sys; open(sys.argv[1], 'a').write(os.environ['POLLINATE_MODEL'] + '\\n')", str(marker)]
    Monitor(Store(home)).configure("digits", webhook=url, retrain_command=retrain)
    env = {"POLLINATE_TELEMETRY_RATE": "600", "POLLINATE_MONITOR_INTERVAL": str(INTERVAL_S),
           "POLLINATE_WEB_CLIENT": "off"}
    with LiveServer(home, log=tmp_path / "serve.log", env=env) as live:
        target = {"url": live.url}
        for i in range(5):  # 250 digits shifted right by 3 pixels: the centroid moves
            answer = post(target, "digits", "telemetry", batch(home, v1, 50 * i, 50, shift=3, client_id="drifting"))
            assert answer.status_code == 202, answer.text
        events = wait_for(lambda: [e for e in received if e.get("event") == "alert"], what="the webhook's alert")
        assert events[0]["model"] == "digits"
        assert "drift" in json.dumps(events[0]["alert"])
        wait_for(lambda: marker.is_file() and marker.read_text().strip(), what="the retraining command")
        time.sleep(1.0)  # more batches, more checks: the same raised alert is not sent again
        for i in range(2):
            post(target, "digits", "telemetry", batch(home, v1, 250 + 50 * i, 50, shift=3, client_id="drifting"))
        time.sleep(4 * INTERVAL_S + 1.0)
        alerts = [e for e in received if e.get("event") == "alert"]
        assert len(marker.read_text().splitlines()) == len(alerts), "one retraining command per alert"
        assert len({json.dumps(e["alert"], sort_keys=True) for e in alerts}) == len(alerts)
        metrics = httpx.get(f"{live.url}/metrics", timeout=10).text
        assert 'pollinate_monitor_alerts_total{' in metrics
        drift = [line for line in metrics.splitlines() if line.startswith("pollinate_monitor_drift{")
                 and 'feature="centroid_x"' in line and f'version="{v1}"' in line]
        assert drift and float(drift[0].rsplit(" ", 1)[1]) >= 0.2
        assert 'pollinate_monitor_webhooks_total{model="digits",outcome="ok"}' in metrics
        assert 'pollinate_monitor_telemetry_predictions_total{model="digits"}' in metrics


def test_a_worse_candidate_under_a_guardrail_is_rolled_back_by_the_server(tmp_path):
    from registry import Store
    from registry.monitoring import Monitor

    home = tmp_path / "store"
    made = monitored_store(home)
    v1, v2 = made["versions"]
    store = Store(home)
    store.set_channel("digits", "stable", v2, rollout_percent=50)
    Monitor(store).set_guardrails("digits", "stable", ["field_accuracy"], alpha=0.05, min_samples=100)
    env = {"POLLINATE_TELEMETRY_RATE": "100000", "POLLINATE_MONITOR_INTERVAL": str(INTERVAL_S),
           "POLLINATE_WEB_CLIENT": "off", "POLLINATE_TRUSTED_PROXIES": "127.0.0.1"}
    with LiveServer(home, log=tmp_path / "serve.log", env=env) as live, httpx.Client(timeout=30) as client:
        def feedback(version: int, right: bool, address: str) -> None:
            answer = client.post(f"{live.url}/v1/models/digits/feedback",
                                 json={"version": version, "prediction": "4", "label": "4" if right else "9"},
                                 headers={"X-Forwarded-For": address})
            assert answer.status_code == 202, answer.text

        for i in range(120):  # from 20 addresses: no single source decides (issue 19)
            feedback(v1, right=i % 10 != 0, address=f"203.0.113.{i % 20}")  # 90 %
            feedback(v2, right=i % 10 < 6, address=f"203.0.113.{i % 20}")  # 60 %
        state = wait_for(lambda: (s := store.get_channel("digits", "stable")) and s.candidate_version is None and s,
                         what="the rollback")
        assert state.version == v1
        last = store.channel_history("digits", "stable")[-1]
        assert last["action"] == "rollback" and "field_accuracy" in (last.get("reason") or "")


# ---------------------------------------------------------------------------- dashboard plumbing


def test_monitor_view_and_dashboard_files(served):
    view = httpx.get(f"{served['url']}/v1/models/digits/monitor?bucket=day", timeout=10).json()
    assert view["model"] == "digits" and view["bucket"] == "day"
    assert set(view) >= {"report", "timeline", "channels", "history"}
    assert view["channels"]["stable"]["shadow_version"] == served["versions"][1]
    assert httpx.get(f"{served['url']}/v1/models/nosuch/monitor", timeout=10).status_code == 404
    assert httpx.get(f"{served['url']}/v1/models/digits/monitor?bucket=week", timeout=10).status_code == 422

    page = httpx.get(f"{served['url']}/dashboard?model=digits", timeout=10)
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert 'data-testid="dashboard"' in page.text
    script = httpx.get(f"{served['url']}/dashboard/dashboard.js", timeout=10)
    assert script.status_code == 200 and "javascript" in script.headers["content-type"]
    for text in (page.text, script.text):  # nothing outside this server
        assert "https://" not in text and "http://" not in text.replace("http://www.w3.org/2000/svg", "")
    assert httpx.get(f"{served['url']}/dashboard/secrets.txt", timeout=10).status_code == 404
    assert httpx.get(f"{served['url']}/dashboard/..%2Fpollinate.js", timeout=10).status_code == 404


def test_telemetry_commits_keep_the_catalog_while_a_channel_move_renews_it(tmp_path):
    """Telemetry and feedback commit to the store's SQLite file many times a second; the
    server's manifest cache must survive them and still see a promote at once."""
    from registry import Store
    from registry.monitoring import Monitor
    from server.catalog import Catalog

    made = monitored_store(tmp_path / "store")
    v1, v2 = made["versions"]
    catalog = Catalog(Store(made["home"]))
    first = catalog.snapshot()
    writer = Store(made["home"])
    Monitor(writer).ingest_telemetry("digits", batch(made["home"], v1, 0, 50))
    Monitor(writer).ingest_feedback("digits", {"version": v1, "prediction": "3", "label": "3"})
    assert catalog.snapshot() is first
    writer.set_channel("digits", "stable", v2)
    renewed = catalog.snapshot()
    assert renewed is not first and renewed.marker != first.marker
    Monitor(writer).set_shadow("digits", "stable", None)  # the manifest's shadow block changes too
    assert catalog.snapshot() is not renewed


# ---------------------------------------------------------------------------- the shortcut


def test_the_shortcut_answers_as_the_router_would(tmp_path, served):
    """server/shortcuts.py answers telemetry and feedback POSTs before FastAPI's router:
    through the whole app (the shortcut) and through the router alone (the declared routes),
    the same requests get the same status, detail and headers (202, 422, 404, 429 with
    Retry-After); on the wire the outer middleware still adds CORS headers and labels the
    requests with the route's template in /metrics."""
    import asyncio
    from contextlib import AsyncExitStack

    from server.app import create_app
    from server.config import ServerConfig

    made = monitored_store(tmp_path / "store")
    v1, _ = made["versions"]
    app = create_app(ServerConfig(home=made["home"], web_client=None, telemetry_rate=2, monitor_interval_s=0))
    good = batch(made["home"], v1, 0, 10)

    async def call(asgi, model: str, route: str, body, address: str) -> tuple[int, dict, bytes]:
        content = body if isinstance(body, bytes) else json.dumps(body).encode()
        scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
                 "path": f"/v1/models/{model}/{route}", "raw_path": b"", "root_path": "", "query_string": b"",
                 "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(content)).encode())],
                 "server": ("127.0.0.1", 80), "client": (address, 1), "app": app}
        sent: list[dict] = []
        pieces = iter([{"type": "http.request", "body": content, "more_body": False}])

        async def receive() -> dict:
            return next(pieces, {"type": "http.disconnect"})

        async def send(message: dict) -> None:
            sent.append(message)

        async with AsyncExitStack() as stack:  # what FastAPI's own middleware gives its routes
            await asgi({**scope, "fastapi_middleware_astack": stack}, receive, send)
        return sent[0]["status"], dict(sent[0]["headers"]), b"".join(m.get("body", b"") for m in sent[1:])

    def cases(who: int) -> list[tuple[str, str, object, str]]:
        """Each way sends from addresses of its own (rate limits are per address): the rate
        limiter (one per app) sees the same history."""
        return [
            ("digits", "telemetry", {**good, "client_id": "ok"}, f"10.{who}.0.1"),  # 202
            ("digits", "telemetry", b"{not json", f"10.{who}.0.2"),  # 422
            ("digits", "telemetry", {**good, "version": 99}, f"10.{who}.0.3"),  # 422 from the monitor
            ("nosuchmodel", "telemetry", good, f"10.{who}.0.4"),  # 404
            *[("digits", "telemetry", {**good, "client_id": f"flood-{i}"}, f"10.{who}.0.5")
              for i in range(3)],  # 202, 202, 429: a new client_id changes nothing
            ("digits", "feedback", {"version": v1, "prediction": "7", "label": "7"}, f"10.{who}.0.1"),
            ("digits", "feedback", [1, 2], f"10.{who}.0.2"),  # 422
            ("digits", "feedback", {"version": v1, "prediction": "7", "label": "seven"}, f"10.{who}.0.3"),
            ("nosuchmodel", "feedback", {"version": 1, "prediction": "7", "label": "7"}, f"10.{who}.0.4"),
            *[("digits", "feedback", {"version": v1, "prediction": "7", "label": "7", "client_id": f"flood-{i}"},
               f"10.{who}.0.5") for i in range(3)],
        ]

    async def both() -> list:
        answers = []
        for fast_case, routed_case in zip(cases(1), cases(2), strict=True):
            answers.append((await call(app, *fast_case), await call(app.router, *routed_case)))
        return answers

    answers = asyncio.run(both())
    statuses = [fast[0] for fast, _ in answers]
    assert statuses == [202, 422, 422, 404, 202, 202, 429] * 2, statuses
    for fast, routed in answers:
        assert fast[0] == routed[0], (fast, routed)
        for header in (b"content-type", b"cache-control", b"retry-after"):
            assert fast[1].get(header) == routed[1].get(header), (header, fast, routed)
        fast_body, routed_body = json.loads(fast[2]), json.loads(routed[2])
        if fast[0] == 202:  # the same answer, in the same UTC hour unless one just ended between the two
            assert fast_body.keys() == routed_body.keys() == {"accepted", "window"}
            assert fast_body["accepted"] is routed_body["accepted"] is True
        else:
            assert fast_body == routed_body, (fast, routed)
            assert isinstance(fast_body["detail"], str) and fast_body["detail"]
        if fast[0] == 429:
            assert int(fast[1][b"retry-after"]) >= 1 and "retry" in fast_body["detail"]
        assert fast[1][b"content-type"] == b"application/json" and fast[1][b"cache-control"] == b"no-store"

    # over the wire: CORS on answers and refusals, metrics under the routes' templates
    origin = {"Origin": "https://app.example"}
    ok = post(served, "digits", "telemetry", {**batch(served["home"], v1, 300, 5), "client_id": "shortcut-wire"},
              headers=origin, address="198.51.100.6")
    refused = post(served, "nosuchmodel", "feedback", {"version": 1, "prediction": "7", "label": "7"}, headers=origin,
                   address="198.51.100.6")
    assert (ok.status_code, refused.status_code) == (202, 404), (ok.text, refused.text)
    for response in (ok, refused):
        assert response.headers["access-control-allow-origin"] == "*"
        assert response.headers["cache-control"] == "no-store"
    lines = httpx.get(f"{served['url']}/metrics", timeout=10).text.splitlines()
    for template, status in (("/v1/models/{name}/telemetry", "202"), ("/v1/models/{name}/feedback", "404")):
        assert any(line.startswith("pollinate_http_requests_total{") and f'route="{template}"' in line
                   and 'method="POST"' in line and f'status="{status}"' in line for line in lines), template
