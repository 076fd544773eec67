"""Limits on what one client may make the server do: body sizes, and rates (token buckets).

Refuse request bodies bigger than the admin routes could ever need (413).

Most bodies this service accepts are small JSON (a channel move, a device enrolment), so a
small cap costs nothing and keeps a client from making a worker buffer megabytes. The
declared ``Content-Length`` is checked first; a chunked body is counted as it arrives,
buffered up to the cap and replayed to the app, so the app never sees a partial body.

Routes that take big bodies (a device's model update) are ``exempt``: they stream the body
themselves against their own limit (``server/routers/federations.py``), so that a refusal
can name the task it was for and be counted.
"""

from __future__ import annotations

import math
import re
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

BODY_METHODS = {"POST", "PUT", "PATCH", "DELETE"}


async def _too_large(send: Send, limit: int) -> None:
    body = b'{"detail":"request body too large: at most %d bytes"}' % limit
    await send({
        "type": "http.response.start",
        "status": 413,
        "headers": [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
            (b"connection", b"close"),
        ],
    })
    await send({"type": "http.response.body", "body": body})


class BodyLimitMiddleware:
    def __init__(self, app: ASGIApp, max_bytes: int, exempt: re.Pattern[str] | None = None):
        self.app = app
        self.max_bytes = max_bytes
        self.exempt = exempt

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (scope["type"] != "http" or scope["method"] not in BODY_METHODS
                or (self.exempt is not None and self.exempt.match(scope["path"]))):
            await self.app(scope, receive, send)
            return
        for key, value in scope["headers"]:
            if key == b"content-length":
                try:
                    declared = int(value)
                except ValueError:
                    declared = self.max_bytes + 1
                if declared > self.max_bytes:
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
        body = b"".join(chunks)
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
