"""What the server does with field telemetry besides storing it: limit it, and act on it.

``server/routers/monitoring.py`` takes telemetry and feedback batches (docs/monitoring.md)
and hands each accepted one's model to :meth:`Watcher.accepted`. The watcher then checks
that model's alerts and guardrails (``Monitor.check_alerts`` and ``Monitor.enforce``) in a
worker thread, at most once every ``monitor_interval_s`` per model and always after the
last batch (a batch that lands during the quiet time schedules the check for its end), so
a flood of batches costs one check, never a blocked event loop. Each new alert is POSTed as
JSON to the model's configured webhook (stdlib urllib, short timeout; a failure is logged
and counted, never raised) and starts the configured retraining command once, detached.

Who sent a batch is decided here, never by the body: the rate limit is a token bucket
(``server/limits.py``) per source address (``server/addresses.py``: the TCP peer, or the
right-most untrusted X-Forwarded-For hop behind a trusted proxy) and route, in each worker
process: ``telemetry_rate`` batches a minute with a minute's worth of burst, whatever
``client_id`` the sender writes (a rotating one gets nothing more). A device token
(``Authorization: Bearer``) names the enrolled device; with ``monitor_auth = "device"`` one is
required. The (address, device) pair goes with the batch to the monitor, whose guardrails
weigh no source over its share.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import math
import os
import subprocess
import threading
import time
import urllib.request

import anyio.to_thread

from registry import Store
from registry.edge import EdgeRefusal
from server import metrics
from server.addresses import ClientAddress
from server.limits import RateLimiter, retry_after  # noqa: F401 - retry_after: the routers' import

log = logging.getLogger("pollinate.server.monitoring")

# A webhook that does not answer within this many seconds is counted as failed.
WEBHOOK_TIMEOUT_S = 5.0
WEBHOOK_SCHEMES = ("http://", "https://")


def post_json(url: str, payload: dict, timeout: float = WEBHOOK_TIMEOUT_S) -> None:
    """POST ``payload`` as JSON; raises on anything but a 2xx answer."""
    if not url.startswith(WEBHOOK_SCHEMES):
        raise ValueError(f"webhook {url!r} is not an http(s) URL")
    data = json.dumps(payload, sort_keys=True, default=str).encode("utf-8")
    request = urllib.request.Request(url, data=data, method="POST", headers={
        "Content-Type": "application/json", "User-Agent": "pollinate-monitor"})
    with urllib.request.urlopen(request, timeout=timeout) as answer:  # noqa: S310 (scheme checked above)
        answer.read()


def start_detached(argv: list[str], env: dict[str, str]) -> subprocess.Popen:
    """Start ``argv`` in its own session, outputs discarded; a thread reaps it when it ends."""
    process = subprocess.Popen([str(a) for a in argv], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL, start_new_session=True, close_fds=True,
                               env={**os.environ, **env})
    threading.Thread(target=process.wait, name=f"retrain-{process.pid}", daemon=True).start()
    return process


def alert_kind(alert: dict) -> str:
    for key in ("kind", "type", "metric"):
        value = alert.get(key)
        if isinstance(value, str) and value:
            return value[:32]
    return "alert"


MAX_TOKEN = 512  # characters of a bearer token worth looking up (enrolment gives 43)
MAX_KNOWN_TOKENS = 65_536  # device tokens remembered per process (then forgotten all at once)


def bearer_token(scope) -> str | None:
    """The token of an ``Authorization: Bearer <token>`` header (None without one)."""
    for key, value in scope.get("headers") or ():
        if key == b"authorization":
            scheme, _, token = value.decode("latin-1").strip().partition(" ")
            if scheme.lower() == "bearer" and token.strip():
                return token.strip()
            return None
    return None


class Watcher:
    """One per process: the Monitor, who is sending (address, device), the rate limiter and the
    scheduled checks of each model."""

    def __init__(self, store: Store, *, rate_per_minute: float, interval_s: float,
                 trusted_proxies: tuple[str, ...] = (), monitor_auth: str = "open", edge=None):
        from registry.monitoring import Monitor  # numpy: only when monitoring is used

        self.store = store
        self.monitor = Monitor(store)
        self.limiter = RateLimiter(rate_per_minute)
        self.address = ClientAddress(trusted_proxies)
        self.devices_only = monitor_auth == "device"
        self.edge = edge  # registry.edge.EdgeStore: whose tokens name enrolled devices
        self._tokens: dict[str, tuple[str, str]] = {}  # token sha256 -> (device id, model), once verified
        self.interval_s = interval_s
        self._last: dict[str, float] = {}  # model -> monotonic time its last check started
        self._scheduled: set[str] = set()
        self._tasks: set[asyncio.Task] = set()
        self.started: list[subprocess.Popen] = []  # retraining commands (for tests and shutdown logs)

    # ------------------------------------------------------------------ who is sending

    async def device(self, model: str, token: str | None) -> str | None:
        """The enrolled device of ``model`` that ``token`` belongs to, or None (no token, a
        token of no device of this model, or no device registry). A verified token is
        remembered (device tokens are never reissued to another device), so a device's
        batches after its first cost no store read; others are looked up in a worker thread."""
        if not token or len(token) > MAX_TOKEN or self.edge is None:
            return None
        digest = hashlib.sha256(token.encode("utf-8", "replace")).hexdigest()
        known = self._tokens.get(digest)
        if known is None:
            try:
                device_id = await anyio.to_thread.run_sync(self.edge.authenticate, model, token)
            except EdgeRefusal:  # a token of no device (of this model): not a device
                return None
            if len(self._tokens) >= MAX_KNOWN_TOKENS:
                self._tokens.clear()
            known = self._tokens[digest] = (device_id, model)
        return known[0] if known[1] == model else None

    # ------------------------------------------------------------------ scheduling

    def accepted(self, model: str) -> None:
        """A batch for ``model`` was stored: check it now, or when its quiet time ends."""
        if model in self._scheduled:
            return
        delay = max(0.0, self._last.get(model, -math.inf) + self.interval_s - time.monotonic())
        self._scheduled.add(model)
        task = asyncio.get_running_loop().create_task(self._check_later(model, delay))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _check_later(self, model: str, delay: float) -> None:
        try:
            if delay > 0:
                await asyncio.sleep(delay)
        finally:
            self._scheduled.discard(model)  # batches from now on schedule the next check
        self._last[model] = time.monotonic()
        try:
            await anyio.to_thread.run_sync(self.check, model)
        except Exception:
            log.exception("checking the alerts and guardrails of %r failed", model)

    # ------------------------------------------------------------------ one check (worker thread)

    def check(self, model: str) -> dict:
        """Alerts and guardrails of ``model`` now; new alerts are sent and acted on."""
        alerts = self.monitor.check_alerts(model)
        rollbacks = self.monitor.enforce(model)
        try:
            metrics.set_monitor_gauges(model, self.monitor.report(model))
        except Exception:
            log.exception("reading the monitoring report of %r failed", model)
        for rollback in rollbacks:
            metrics.count_rollback(model, str(rollback.get("channel", "")))
            log.warning("guardrail rolled back %s: %s", model, rollback)
        if alerts or rollbacks:
            self._act(model, alerts, rollbacks)
        return {"alerts": alerts, "rollbacks": rollbacks}

    def _act(self, model: str, alerts: list[dict], rollbacks: list[dict]) -> None:
        config = self.monitor.config(model) or {}
        webhook = config.get("webhook")
        command = config.get("retrain_command")
        events = [{"event": "alert", "model": model, "alert": a} for a in alerts]
        events += [{"event": "rollback", "model": model, "rollback": r} for r in rollbacks]
        for alert in alerts:
            metrics.count_alert(model, alert_kind(alert))
            log.warning("monitoring alert for %s: %s", model, alert)
        if webhook:
            for event in events:
                try:
                    post_json(webhook, event)
                except Exception as exc:  # a webhook's trouble is never the server's
                    metrics.count_webhook(model, False)
                    log.warning("webhook %s refused the %s of %s: %s", webhook, event["event"], model, exc)
                else:
                    metrics.count_webhook(model, True)
        if command:
            for alert in alerts:
                try:
                    self.started.append(start_detached(list(command), {
                        "POLLINATE_MODEL": model,
                        "POLLINATE_ALERT": json.dumps(alert, sort_keys=True, default=str),
                        "POLLINATE_HOME": str(self.store.home),
                    }))
                except (OSError, ValueError, TypeError) as exc:
                    metrics.count_retrain(model, False)
                    log.warning("the retraining command of %s could not start: %s", model, exc)
                else:
                    metrics.count_retrain(model, True)
