"""Prometheus metrics: what was asked, how fast it was answered, what was sent.

Labels are route *templates* (``/v1/models/{name}/manifest``), methods and status codes,
never raw paths or anything a client chooses, so the number of series stays bounded
however the server is probed. Manifests are also counted per model, version and channel
(an unset channel counts as ``(latest)``, a fixed-version manifest as ``(fixed)``): that is how an operator watches a staged rollout.

The device protocol counts accepted updates (and their bytes) per model, the wall time they
spent in each phase of their acceptance (summed: divide by the updates), and refusals per
model and reason (``registry/edge.py`` REFUSALS). A model label only ever names a model the
store has: a request for one it does not know is counted under ``(unknown)``.

Monitoring (docs/monitoring.md) counts telemetry batches and the predictions they report,
feedback, and refusals per model, route (telemetry, feedback) and reason; after each check of
a model's alerts it sets ``pollinate_monitor_drift`` (PSI per model, version and feature; the
predictions count as feature ``prediction``) and ``pollinate_monitor_field_accuracy`` from
the model's report, and counts new alerts, webhook deliveries and retraining commands started.
Feature names come from the version's profile (a bounded set per model), never from a client.

Server-side predict (server/predict.py) counts answers per model, version and cache result
(``hit``, ``miss``), the interpreter runs with the requests and examples each gathered
(micro-batching: requests per run above 1 means concurrent requests shared a run), and
refusals per model and reason (``invalid``, ``no_artifact``).

With several uvicorn workers each process counts on its own; ``pollinate serve`` then
sets ``PROMETHEUS_MULTIPROC_DIR`` before any worker imports ``prometheus_client``, every
worker writes its counters to files there, and ``/metrics`` adds them up, so whichever
worker answers the scrape reports the whole server.
"""

from __future__ import annotations

import os
import time

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.multiprocess import MultiProcessCollector
from starlette.types import ASGIApp, Message, Receive, Scope, Send

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"

METHODS = {"GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"}
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)

REQUESTS = Counter(
    "pollinate_http_requests", "HTTP requests answered, by route template.", ["method", "route", "status"]
)
LATENCY = Histogram(
    "pollinate_http_request_duration_seconds",
    "Time from request to the last byte handed to the server, by route template.",
    ["method", "route"],
    buckets=LATENCY_BUCKETS,
)
BYTES_SENT = Counter("pollinate_http_response_bytes", "Response body bytes sent by this service.", ["route"])
OFFLOADED_BYTES = Counter(
    "pollinate_offloaded_bytes", "Bytes of files handed to nginx with X-Accel-Redirect (not sent by us)."
)
MANIFESTS = Counter(
    "pollinate_manifests_served",
    "Manifests answered (200 with a body, 304 revalidated), by model, version and channel.",
    ["model", "version", "channel", "status"],
)

EDGE_UPDATES = Counter(
    "pollinate_edge_updates", "Device updates accepted (202), by model.", ["model"]
)
EDGE_UPDATE_BYTES = Counter(
    "pollinate_edge_update_bytes", "Body bytes of accepted device updates, by model.", ["model"]
)
# Where an accepted update's time goes, summed over updates (divide by pollinate_edge_updates_total):
# reading its body (admission included), waiting for the committer, the checks and the durable
# append (with the others of its batch), syncing a new segment's folder (and the segment where
# the kernel has no RWF_DSYNC), the SQLite commit, waking the route (registry/edge.py GroupCommit).
EDGE_PHASES = ("read", "queue", "check_append", "sync", "commit", "wake")
EDGE_UPDATE_SECONDS = Counter(
    "pollinate_edge_update_seconds", "Wall seconds accepted device updates spent in each phase, summed.", ["phase"]
)
EDGE_REFUSALS = Counter(
    "pollinate_edge_refusals", "Device protocol requests refused, by model and reason.", ["model", "reason"]
)
EDGE_ENROLMENTS = Counter(
    "pollinate_edge_enrolments", "Devices enrolled, by model and kind.", ["model", "kind"]
)
UNKNOWN_MODEL = "(unknown)"

MONITOR_BATCHES = Counter(
    "pollinate_monitor_telemetry_batches", "Telemetry batches accepted (202), by model.", ["model"]
)
MONITOR_PREDICTIONS = Counter(
    "pollinate_monitor_telemetry_predictions", "Predictions reported by accepted telemetry batches, by model.",
    ["model"],
)
MONITOR_FEEDBACK = Counter("pollinate_monitor_feedback", "Feedback items accepted (202), by model.", ["model"])
MONITOR_REFUSALS = Counter(
    "pollinate_monitor_refusals",
    "Telemetry and feedback refused, by model, route and reason (not_found, invalid, rate_limited).",
    ["model", "route", "reason"],
)
# Gauges: each worker sets them after its own checks; summed over workers they would be wrong,
# so the scrape keeps the most recent value.
MONITOR_DRIFT = Gauge(
    "pollinate_monitor_drift", "PSI of the field data against the version's training profile, by feature.",
    ["model", "version", "feature"], multiprocess_mode="mostrecent",
)
MONITOR_FIELD_ACCURACY = Gauge(
    "pollinate_monitor_field_accuracy", "Share of feedback where the prediction was the label, by version.",
    ["model", "version"], multiprocess_mode="mostrecent",
)
MONITOR_ALERTS = Counter("pollinate_monitor_alerts", "New monitoring alerts, by model and kind.", ["model", "kind"])
MONITOR_WEBHOOKS = Counter(
    "pollinate_monitor_webhooks", "Alerts POSTed to the configured webhook, by model and outcome (ok, failed).",
    ["model", "outcome"],
)
MONITOR_RETRAINS = Counter(
    "pollinate_monitor_retrains", "Retraining commands started for alerts, by model and outcome (started, failed).",
    ["model", "outcome"],
)
MONITOR_ROLLBACKS = Counter(
    "pollinate_monitor_rollbacks", "Candidates rolled back by a guardrail, by model and channel.", ["model", "channel"]
)

PREDICT_ANSWERS = Counter(
    "pollinate_predict_answers", "Predict requests answered, by model, version and cache result (hit, miss).",
    ["model", "version", "cache"],
)
PREDICT_RUNS = Counter(
    "pollinate_predict_runs", "Interpreter runs of the predict route (one per gathered batch), by model.", ["model"]
)
PREDICT_EXAMPLES = Counter(
    "pollinate_predict_examples", "Examples the predict route's interpreter runs computed, by model.", ["model"]
)
PREDICT_BATCH_REQUESTS = Histogram(
    "pollinate_predict_batch_requests", "Requests gathered into one interpreter run (micro-batching).",
    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256),
)
PREDICT_REFUSALS = Counter(
    "pollinate_predict_refusals", "Predict requests refused, by model and reason (invalid, no_artifact).",
    ["model", "reason"],
)

UNMATCHED = "unmatched"
# `*_created` timestamps double the exposition and nobody graphs them.
disable_created_metrics()


def exposition() -> tuple[bytes, str]:
    """The metrics text, summed over every worker when running multiprocess."""
    if os.environ.get(MULTIPROC_ENV):
        registry = CollectorRegistry()
        MultiProcessCollector(registry)
        return generate_latest(registry), CONTENT_TYPE_LATEST
    return generate_latest(REGISTRY), CONTENT_TYPE_LATEST


def count_predict(model: str, version: int, cache: str) -> None:
    PREDICT_ANSWERS.labels(model, str(version), cache).inc()


def count_predict_run(model: str, requests: int, examples: int) -> None:
    PREDICT_RUNS.labels(model).inc()
    PREDICT_EXAMPLES.labels(model).inc(examples)
    PREDICT_BATCH_REQUESTS.observe(requests)


def count_predict_refusal(model: str, reason: str) -> None:
    PREDICT_REFUSALS.labels(model, reason).inc()


def count_manifest(model: str, version: int, channel: str, status: int) -> None:
    MANIFESTS.labels(model, str(version), channel, str(status)).inc()


_edge_update_series: dict[str, tuple] = {}  # model -> its two children (labels() takes a lock and builds a key)
_edge_phase_series = [EDGE_UPDATE_SECONDS.labels(phase) for phase in EDGE_PHASES]


def count_edge_update(model: str, body_bytes: int, started: float | None = None, times: list[float] | None = None,
                      answered: float | None = None) -> None:
    """An accepted update; with its perf_counter() times (the route's start, then the store's:
    queued, batch started, checked and appended, synced, committed; the route's answer), the
    time it spent in each of EDGE_PHASES."""
    series = _edge_update_series.get(model)
    if series is None:
        series = _edge_update_series[model] = (EDGE_UPDATES.labels(model), EDGE_UPDATE_BYTES.labels(model))
    series[0].inc()
    series[1].inc(body_bytes)
    if started is not None and times is not None and answered is not None and len(times) == 5:
        stamps = (started, *times, answered)
        for counter, begin, end in zip(_edge_phase_series, stamps, stamps[1:]):
            counter.inc(max(end - begin, 0.0))


def count_edge_refusal(model: str | None, reason: str) -> None:
    """`model` None: the request named a model the store does not have."""
    EDGE_REFUSALS.labels(model or UNKNOWN_MODEL, reason).inc()


def count_edge_enrolment(model: str, kind: str) -> None:
    EDGE_ENROLMENTS.labels(model, kind).inc()


def count_telemetry(model: str, predictions: int) -> None:
    MONITOR_BATCHES.labels(model).inc()
    if predictions > 0:
        MONITOR_PREDICTIONS.labels(model).inc(predictions)


def count_feedback(model: str) -> None:
    MONITOR_FEEDBACK.labels(model).inc()


def count_monitor_refusal(model: str | None, route: str, reason: str) -> None:
    """`model` None: the request named a model the store does not have."""
    MONITOR_REFUSALS.labels(model or UNKNOWN_MODEL, route, reason).inc()


def count_alert(model: str, kind: str) -> None:
    MONITOR_ALERTS.labels(model, kind).inc()


def count_webhook(model: str, ok: bool) -> None:
    MONITOR_WEBHOOKS.labels(model, "ok" if ok else "failed").inc()


def count_retrain(model: str, started: bool) -> None:
    MONITOR_RETRAINS.labels(model, "started" if started else "failed").inc()


def count_rollback(model: str, channel: str) -> None:
    MONITOR_ROLLBACKS.labels(model, channel).inc()


def set_monitor_gauges(model: str, report: dict) -> None:
    """Drift (PSI) per version and feature, field accuracy per version, from a Monitor.report."""
    for version, numbers in (report.get("versions") or {}).items():
        for feature, scores in (numbers.get("drift") or {}).items():
            psi = scores.get("psi") if isinstance(scores, dict) else None
            if isinstance(psi, (int, float)):
                MONITOR_DRIFT.labels(model, str(version), feature).set(psi)
        accuracy = numbers.get("field_accuracy")
        value = accuracy.get("value") if isinstance(accuracy, dict) else None
        if isinstance(value, (int, float)):
            MONITOR_FIELD_ACCURACY.labels(model, str(version)).set(value)


class MetricsMiddleware:
    """Times and counts every HTTP request (pure ASGI: no per-request task or copy)."""

    def __init__(self, app: ASGIApp):
        self.app = app
        self._children: dict[tuple, tuple] = {}

    def _series(self, method: str, route: str, status: int) -> tuple:
        key = (method, route, status)
        children = self._children.get(key)
        if children is None:
            children = self._children[key] = (
                REQUESTS.labels(method, route, str(status)),
                LATENCY.labels(method, route),
                BYTES_SENT.labels(route),
            )
        return children

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500
        sent = 0

        async def counting_send(message: Message) -> None:
            nonlocal status, sent
            if message["type"] == "http.response.start":
                status = message["status"]
            elif message["type"] == "http.response.body":
                sent += len(message.get("body", b""))
            await send(message)

        try:
            await self.app(scope, receive, counting_send)
        finally:
            route = getattr(scope.get("route"), "path", None) or UNMATCHED
            method = scope["method"] if scope["method"] in METHODS else "OTHER"
            requests, latency, bytes_sent = self._series(method, route, status)
            requests.inc()
            latency.observe(time.perf_counter() - started)
            if sent:
                bytes_sent.inc(sent)
