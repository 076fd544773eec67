"""Limits on what one client may make the server do: body sizes and shapes, uploads in
flight, and rates (token buckets).

``BodyLimitMiddleware`` refuses request bodies bigger than the admin routes could ever need
(413). Most bodies this service accepts are small JSON (a channel move, a device enrolment,
telemetry), so a small cap costs nothing and keeps a client from making a worker buffer
megabytes. The declared ``Content-Length`` is checked first; a chunked body is counted as it
arrives, buffered up to the cap and replayed to the app, so the app never sees a partial
body. Holding the whole body, it also checks its JSON shape once, before any route parses
it (``server/json_bounds.py``: depth, items, string lengths; 422).

Routes that take big bodies (a device's model update) are ``exempt``: they stream the body
themselves against their own limit (``server/routers/federations.py``), so that a refusal
can name the task it was for and be counted.

The same middleware bounds the requests with a body that one worker serves at once
(``POLLINATE_MAX_UPLOADS``): a client that opens thousands of uploads and stalls them holds
each only until the body read timeout (``server/protocol.py``) closes it, and the ones past
the cap are refused at once (503 with ``Retry-After``), so they cost neither memory nor a slot
that an honest device needs.
"""

from __future__ import annotations

import json
import math
import re
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server import json_bounds

BODY_METHODS = {"POST", "PUT", "PATCH", "DELETE"}
# Seconds a client refused by the upload cap is asked to wait: uploads finish in
# milliseconds, and stalled ones are closed by the body timeout.
UPLOAD_RETRY_AFTER_S = 2


async def _refuse(send: Send, status: int, detail: str, reason: str, extra: tuple = ()) -> None:
    """A JSON refusal ``{"detail", "reason"}`` (the device protocol's shape, which is also
    the ErrorOut every other route documents) that closes the connection: the rest of the
    body, if any, is never read."""
    body = json.dumps({"detail": detail, "reason": reason}).encode()
    await send({
        "type": "http.response.start",
        "status": status,
        "headers": [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
            (b"connection", b"close"),
            *extra,
        ],
    })
    await send({"type": "http.response.body", "body": body})


async def _too_large(send: Send, limit: int) -> None:
    await _refuse(send, 413, f"request body too large: at most {limit} bytes", "too_large")


class BodyLimitMiddleware:
    """The size cap and JSON bounds of every body (but the ``exempt`` routes'), and the cap on
    requests with a body in flight (``max_uploads``; exempt routes included): one middleware,
    one pass over the headers (the hot POSTs pay for one layer, not two)."""

    def __init__(self, app: ASGIApp, max_bytes: int, exempt: re.Pattern[str] | None = None,
                 max_uploads: int | None = None):
        self.app = app
        self.max_bytes = max_bytes
        self.exempt = exempt
        self.max_uploads = max_uploads
        self.active = 0  # requests with a body being served now

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] not in BODY_METHODS:
            await self.app(scope, receive, send)
            return
        declared = None
        chunked = False
        for key, value in scope["headers"]:
            if key == b"content-length":
                if declared is None:
                    try:
                        declared = int(value)
                    except ValueError:
                        declared = self.max_bytes + 1  # not a length: refused as too large unless exempt
            elif key == b"transfer-encoding":
                chunked = True
        if not declared and not chunked:  # no body: nothing to cap or check
            await self.app(scope, receive, send)
            return
        if self.max_uploads is not None and self.active >= self.max_uploads:
            await _refuse(send, 503, f"this server is receiving {self.max_uploads} uploads already:"
                          f" retry in {UPLOAD_RETRY_AFTER_S} s", "busy",
                          ((b"retry-after", str(UPLOAD_RETRY_AFTER_S).encode()),))
            return
        self.active += 1
        try:
            if self.exempt is not None and self.exempt.match(scope["path"]):
                await self.app(scope, receive, send)
            else:
                await self._bounded(scope, receive, send, declared)
        finally:
            self.active -= 1

    async def _bounded(self, scope: Scope, receive: Receive, send: Send, declared: int | None) -> None:
        if declared is not None and declared > self.max_bytes:
            await _too_large(send, self.max_bytes)
            return
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                await _too_large(send, self.max_bytes)
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        wrong = json_bounds.problem(body)
        if wrong is not None:
            await _refuse(send, 422, wrong, "json_bounds")
            return
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


# Clients remembered by the rate limiter; past this the least recently seen are forgotten
# (a forgotten client starts again with a full bucket: a bound on memory, not on abuse).
MAX_TRACKED_CLIENTS = 100_000


class RateLimiter:
    """Token buckets: ``per_minute`` tokens a minute, at most ``burst`` saved up."""

    def __init__(self, per_minute: float, burst: float | None = None, *, max_keys: int = MAX_TRACKED_CLIENTS,
                 clock: Callable[[], float] = time.monotonic):
        self.rate = per_minute / 60.0  # tokens a second
        self.burst = max(1.0, per_minute if burst is None else burst)
        self.max_keys = max_keys
        self.clock = clock
        self._buckets: OrderedDict[Any, tuple[float, float]] = OrderedDict()  # key -> (tokens, at)
        self._lock = threading.Lock()

    def take(self, key: Any) -> float:
        """0 when ``key`` may go now (a token is spent), else the seconds until it may."""
        now = self.clock()
        with self._lock:
            tokens, at = self._buckets.pop(key, (self.burst, now))
            tokens = min(self.burst, tokens + (now - at) * self.rate)
            wait = 0.0
            if tokens >= 1.0:
                tokens -= 1.0
            else:
                wait = (1.0 - tokens) / self.rate
            self._buckets[key] = (tokens, now)
            while len(self._buckets) > self.max_keys:
                self._buckets.popitem(last=False)
            return wait


def retry_after(wait_s: float) -> str:
    """``Retry-After`` in whole seconds, at least 1."""
    return str(max(1, math.ceil(wait_s)))
