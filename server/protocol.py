"""uvicorn's HTTP protocol with read timeouts: a client must send its request's head within
``POLLINATE_HEADER_TIMEOUT`` seconds and may not let its body stall for longer than
``POLLINATE_BODY_TIMEOUT`` between two reads.

uvicorn closes a keep-alive connection that stays idle, but nothing else: a connection that
sends half a request head, or a head that promises a body and then stalls, is held open for
ever, with its task, its buffers and (for an upload) a slot of the upload cap. An attacker
held 6,000 of them open. This is the class ``server/serving.py`` passes to uvicorn as
``http=`` (by import path, so every worker of ``--workers N`` loads it too); the timeouts come
from the environment, as the rest of a worker's config does (``server/config.py``).

One timer per connection, armed when a request's first byte arrives (or when the connection
opens) and re-armed only when it fires early: the hot path pays for a float assignment per
body read, nothing more (benchmarks/results/edge_ingest.md). When a timeout passes, a client
that sent part of a request gets ``408`` with a JSON ``detail`` (unless its answer has begun)
and the connection is closed; the app sees the client leave (``http.disconnect``), as if it
had hung up. Time the app itself spends not reading (uvicorn stops reading a body the app
has not consumed yet) is not the client's: the body timer waits while reading is paused.

A head over ``MAX_HEAD_BYTES`` gets ``431`` (httptools sets no bound of its own; nginx's is
32 KiB by default).
"""

from __future__ import annotations

import json
import os
from asyncio import TimerHandle

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from server.config import BODY_TIMEOUT_S, ENV_BODY_TIMEOUT, ENV_HEADER_TIMEOUT, HEADER_TIMEOUT_S

MAX_HEAD_BYTES = 64 * 1024

IDLE, HEAD, BODY = 0, 1, 2


def _seconds(name: str, default: float) -> float:
    """A timeout from the environment (``ServerConfig`` validated it before uvicorn started)."""
    try:
        value = float(os.environ.get(name) or default)
    except ValueError:
        return default
    return value if 0 < value <= 3600 else default


def _refusal(status: int, phrase: bytes, detail: str) -> bytes:
    body = json.dumps({"detail": detail}).encode()
    return (b"HTTP/1.1 %d %s\r\ncontent-type: application/json\r\ncontent-length: %d\r\nconnection: close\r\n\r\n"
            % (status, phrase, len(body))) + body


class TimedHttpToolsProtocol(HttpToolsProtocol):
    """``HttpToolsProtocol`` plus the header and body read timeouts and the head size bound."""

    header_timeout_s: float | None = None  # read from the environment on first use, per process
    body_timeout_s: float | None = None

    def connection_made(self, transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        cls = type(self)
        if cls.header_timeout_s is None:
            cls.header_timeout_s = _seconds(ENV_HEADER_TIMEOUT, HEADER_TIMEOUT_S)
            cls.body_timeout_s = _seconds(ENV_BODY_TIMEOUT, BODY_TIMEOUT_S)
        self._phase = HEAD  # the first request's head is due from now
        self._started = False  # a byte of the current request arrived
        self._head_bytes = 0
        self._since = self.loop.time()
        self._timer: TimerHandle | None = self.loop.call_later(cls.header_timeout_s, self._check)

    def connection_lost(self, exc: Exception | None) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self._phase == HEAD and self._started and not self.transport.is_closing():
            # this read ended inside a head: count it (a read that completed a head is not counted)
            self._head_bytes += len(data)
            if self._head_bytes > MAX_HEAD_BYTES:
                self._close(_refusal(431, b"Request Header Fields Too Large",
                                     f"the request head is over {MAX_HEAD_BYTES} bytes"))

    # parser callbacks

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._phase = HEAD
        self._started = True
        self._head_bytes = 0
        now = self._since = self.loop.time()
        self._arm(now, self.header_timeout_s)

    def on_headers_complete(self) -> None:
        super().on_headers_complete()
        self._phase = BODY
        now = self._since = self.loop.time()
        self._arm(now, self.body_timeout_s)

    def on_body(self, body: bytes) -> None:
        super().on_body(body)
        self._since = self.loop.time()

    def on_message_complete(self) -> None:
        super().on_message_complete()
        self._phase = IDLE
        self._started = False

    # the timer

    def _arm(self, now: float, limit: float) -> None:
        """Make sure the timer fires by ``now + limit`` (one armed later re-checks itself)."""
        timer = self._timer
        if timer is None or timer.when() > now + limit:
            if timer is not None:
                timer.cancel()
            self._timer = self.loop.call_later(limit, self._check)

    def _check(self) -> None:
        self._timer = None
        if self._phase == IDLE or self.transport.is_closing():
            return  # between requests uvicorn's keep-alive timeout applies
        limit = self.header_timeout_s if self._phase == HEAD else self.body_timeout_s
        now = self.loop.time()
        if self._phase == BODY and self.flow is not None and self.flow.read_paused:
            self._since = now  # the app is not reading yet: the wait is ours, not the client's
        left = self._since + limit - now
        if left > 0:
            self._timer = self.loop.call_later(left, self._check)
            return
        if self._phase == HEAD and not self._started:
            self.transport.close()  # connected and sent nothing: hang up, as on an idle keep-alive
            return
        what = "request head" if self._phase == HEAD else "request body"
        self._close(_refusal(408, b"Request Timeout", f"the {what} did not arrive within {limit:g} s"))

    def _close(self, answer: bytes) -> None:
        """Answer (unless the app's answer has begun) and hang up; the app sees a disconnect."""
        cycle = self.cycle  # in the head phase: the previous request's, if any
        if self._phase == HEAD:
            answer_now = cycle is None or cycle.response_complete
        else:
            answer_now = cycle is not None and not cycle.response_started
        if answer_now:
            self.transport.write(answer)
        if cycle is not None and self._phase == BODY and not cycle.response_complete:
            cycle.disconnected = True  # the app's receive() returns http.disconnect, its sends are dropped
            cycle.message_event.set()
        self._phase = IDLE
        self.transport.close()
