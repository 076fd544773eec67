"""How a server process is configured: one frozen object, built from flags or environment.

Uvicorn starts extra workers by importing ``server.app:app_from_env`` in fresh processes,
so everything a worker needs travels in environment variables; ``pollinate serve`` sets
them from its flags before it starts uvicorn. Secrets (the admin token) only ever come
from the environment.

The device protocol (``server/routers/federations.py``) adds two: ``POLLINATE_ENROL_TOKEN``
(when set, enrolling a device needs it as a bearer token) and ``POLLINATE_MAX_UPDATE_BYTES``
(the largest update body a device may post; the only route allowed past the 64 KiB cap).

Monitoring (``server/routers/monitoring.py``, docs/monitoring.md) adds
``POLLINATE_TELEMETRY_RATE`` (telemetry and feedback batches a minute per source address,
whatever client id the batch claims, in each worker; default 60) and ``POLLINATE_MONITOR_INTERVAL`` (seconds between two
alert and guardrail checks of one model after accepted batches; default 10).

The web client defaults to the one that ships with Pollinate (``server/web_assets.py`` finds
it, installed or in a checkout); ``POLLINATE_WEB_CLIENT=DIR`` serves another folder and
``POLLINATE_WEB_CLIENT=off`` none (``web_client`` is then None).

Hostile clients (issue 19; docs/deployment.md says when to change each):
``POLLINATE_TRUSTED_PROXIES`` (addresses or networks whose ``X-Forwarded-For`` is believed:
``server/addresses.py``; default none), ``POLLINATE_HEADER_TIMEOUT`` (seconds a client has to
send a request's headers; default 10), ``POLLINATE_BODY_TIMEOUT`` (seconds a request body may
stall between two reads; default 30), ``POLLINATE_MAX_UPLOADS`` (request bodies being read at
once per worker; more are refused with 503; default 256), ``POLLINATE_ENROL_RATE`` (device
enrolments a minute per address; default 30), ``POLLINATE_MONITOR_AUTH`` (``open``: anyone may
send telemetry and feedback; ``device``: only enrolled devices, with their token; default
open) and ``POLLINATE_OPENAPI_ADMIN`` (1: the admin routes are in ``/openapi.json`` too).

Server-side predict (``server/predict.py``) adds ``POLLINATE_PREDICT_CACHE`` (answers kept in
each worker's LRU cache; 0 turns it off; default 10,000, at most 64 MiB of answers),
``POLLINATE_PREDICT_WINDOW_MS`` (how long concurrent requests for one version are gathered
into one interpreter run; default 2 ms, 0: no waiting) and ``POLLINATE_PREDICT_MAX_BATCH``
(a gathered batch runs as soon as it has this many examples; default 256).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from core.errors import InvalidInput
from server.addresses import ENV_TRUSTED_PROXIES, parse_trusted
from server.web_assets import OFF as WEB_CLIENT_OFF
from server.web_assets import default_web_client

REPO = Path(__file__).resolve().parents[1]

ENV_HOME = "POLLINATE_HOME"
ENV_ADMIN_TOKEN = "POLLINATE_ADMIN_TOKEN"
ENV_CORS_ORIGINS = "POLLINATE_CORS_ORIGINS"
ENV_OFFLOAD = "POLLINATE_OFFLOAD"
ENV_WEB_CLIENT = "POLLINATE_WEB_CLIENT"
ENV_ENROL_TOKEN = "POLLINATE_ENROL_TOKEN"
ENV_MAX_UPDATE_BYTES = "POLLINATE_MAX_UPDATE_BYTES"
ENV_TELEMETRY_RATE = "POLLINATE_TELEMETRY_RATE"
ENV_MONITOR_INTERVAL = "POLLINATE_MONITOR_INTERVAL"
ENV_PREDICT_CACHE = "POLLINATE_PREDICT_CACHE"
ENV_PREDICT_WINDOW_MS = "POLLINATE_PREDICT_WINDOW_MS"
ENV_PREDICT_MAX_BATCH = "POLLINATE_PREDICT_MAX_BATCH"
ENV_HEADER_TIMEOUT = "POLLINATE_HEADER_TIMEOUT"
ENV_BODY_TIMEOUT = "POLLINATE_BODY_TIMEOUT"
ENV_MAX_UPLOADS = "POLLINATE_MAX_UPLOADS"
ENV_ENROL_RATE = "POLLINATE_ENROL_RATE"
ENV_MONITOR_AUTH = "POLLINATE_MONITOR_AUTH"
ENV_OPENAPI_ADMIN = "POLLINATE_OPENAPI_ADMIN"

OFFLOAD_MODES = ("nginx",)
# Admin bodies are a version number and a percent: anything near this size is an attack.
MAX_BODY_BYTES = 64 * 1024
# A device update is the model's weights as float32: 32 MiB takes 8M parameters (the digits
# CNN is ~0.1 MB, MobileNetV2 ~14 MB) and bounds what one request can make a worker buffer.
MAX_UPDATE_BYTES = 32 * 1024 * 1024
# nginx serves the store's objects/ folder under this internal prefix (server/nginx/).
OFFLOAD_PREFIX = "/_pollinate_blobs/"
# Telemetry and feedback batches a minute per source address (a page flushes every 100 predictions).
TELEMETRY_RATE = 60.0
# Seconds between two alert/guardrail checks of one model (each reads every window of it).
MONITOR_INTERVAL_S = 10.0
# Predict answers cached per worker (their bytes are bounded too: server/predict.py).
PREDICT_CACHE_ENTRIES = 10_000
# Concurrent predict requests for one version are gathered this long into one interpreter run.
PREDICT_WINDOW_MS = 2.0
# A gathered batch runs at once when it holds this many examples.
PREDICT_MAX_BATCH = 256
# A client that has not sent a whole request head this long after it started is cut off.
HEADER_TIMEOUT_S = 10.0
# A request body that makes no progress for this long is given up (the client is cut off).
BODY_TIMEOUT_S = 30.0
# Request bodies read at once per worker; past this a new upload gets 503 with Retry-After.
MAX_UPLOADS = 256
# Device enrolments a minute per address (a minute's worth of burst).
ENROL_RATE = 30.0
# Who may send telemetry and feedback: anyone ("open") or enrolled devices only ("device").
MONITOR_AUTH_MODES = ("open", "device")


@dataclass(frozen=True)
class ServerConfig:
    """Everything one server process needs; immutable once the app is built."""

    home: Path
    admin_token: str | None = None
    cors_origins: tuple[str, ...] = ("*",)
    offload: str | None = None
    web_client: Path | None = field(default_factory=default_web_client)  # None: no demo page
    max_body_bytes: int = MAX_BODY_BYTES
    enrol_token: str | None = None  # None: anyone may enrol a device
    max_update_bytes: int = MAX_UPDATE_BYTES
    telemetry_rate: float = TELEMETRY_RATE  # batches a minute per source address (server/addresses.py)
    monitor_interval_s: float = MONITOR_INTERVAL_S
    predict_cache_entries: int = PREDICT_CACHE_ENTRIES  # 0: no cache
    predict_window_ms: float = PREDICT_WINDOW_MS
    predict_max_batch: int = PREDICT_MAX_BATCH
    trusted_proxies: tuple[str, ...] = ()  # networks whose X-Forwarded-For is believed
    header_timeout_s: float = HEADER_TIMEOUT_S
    body_timeout_s: float = BODY_TIMEOUT_S
    max_uploads: int = MAX_UPLOADS
    enrol_rate: float = ENROL_RATE  # enrolments a minute per address
    monitor_auth: str = "open"  # "device": telemetry and feedback need an enrolled device's token
    openapi_admin: bool = False  # the admin routes in /openapi.json too

    def __post_init__(self) -> None:
        if self.offload is not None and self.offload not in OFFLOAD_MODES:
            raise ValueError(f"unknown offload mode {self.offload!r}: use one of {', '.join(OFFLOAD_MODES)}")
        if self.max_update_bytes < 1:
            raise InvalidInput(f"{ENV_MAX_UPDATE_BYTES} must be at least 1 byte, got {self.max_update_bytes}")
        if not self.telemetry_rate > 0:
            raise InvalidInput(f"{ENV_TELEMETRY_RATE} must be a positive number of batches a minute,"
                               f" got {self.telemetry_rate}")
        if not self.monitor_interval_s >= 0:
            raise InvalidInput(f"{ENV_MONITOR_INTERVAL} must be 0 or more seconds, got {self.monitor_interval_s}")
        if self.predict_cache_entries < 0:
            raise InvalidInput(f"{ENV_PREDICT_CACHE} must be 0 or more answers, got {self.predict_cache_entries}")
        if not 0 <= self.predict_window_ms <= 1000:
            raise InvalidInput(f"{ENV_PREDICT_WINDOW_MS} must be 0 to 1000 milliseconds, got {self.predict_window_ms}")
        if self.predict_max_batch < 1:
            raise InvalidInput(f"{ENV_PREDICT_MAX_BATCH} must be at least 1 example, got {self.predict_max_batch}")
        object.__setattr__(self, "trusted_proxies", parse_trusted(self.trusted_proxies))
        for name, value in ((ENV_HEADER_TIMEOUT, self.header_timeout_s), (ENV_BODY_TIMEOUT, self.body_timeout_s)):
            if not 0 < value <= 3600:
                raise InvalidInput(f"{name} must be more than 0 and at most 3600 seconds, got {value}")
        if self.max_uploads < 1:
            raise InvalidInput(f"{ENV_MAX_UPLOADS} must be at least 1, got {self.max_uploads}")
        if not self.enrol_rate > 0:
            raise InvalidInput(f"{ENV_ENROL_RATE} must be a positive number of enrolments a minute, got {self.enrol_rate}")
        if self.monitor_auth not in MONITOR_AUTH_MODES:
            raise InvalidInput(f"{ENV_MONITOR_AUTH} must be one of {', '.join(MONITOR_AUTH_MODES)},"
                               f" got {self.monitor_auth!r}")

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> ServerConfig:
        env = os.environ if environ is None else environ
        origins = tuple(o.strip() for o in env.get(ENV_CORS_ORIGINS, "*").split(",") if o.strip())
        web_client = (env.get(ENV_WEB_CLIENT) or "").strip()
        return cls(
            home=Path(env.get(ENV_HOME) or ".pollinate"),
            admin_token=env.get(ENV_ADMIN_TOKEN) or None,
            cors_origins=origins or ("*",),
            offload=env.get(ENV_OFFLOAD) or None,
            web_client=None if web_client.lower() == WEB_CLIENT_OFF else Path(web_client) if web_client else default_web_client(),
            enrol_token=env.get(ENV_ENROL_TOKEN) or None,
            max_update_bytes=_byte_count(env.get(ENV_MAX_UPDATE_BYTES), MAX_UPDATE_BYTES),
            telemetry_rate=_number(env, ENV_TELEMETRY_RATE, TELEMETRY_RATE),
            monitor_interval_s=_number(env, ENV_MONITOR_INTERVAL, MONITOR_INTERVAL_S),
            predict_cache_entries=_whole(env, ENV_PREDICT_CACHE, PREDICT_CACHE_ENTRIES),
            predict_window_ms=_number(env, ENV_PREDICT_WINDOW_MS, PREDICT_WINDOW_MS),
            predict_max_batch=_whole(env, ENV_PREDICT_MAX_BATCH, PREDICT_MAX_BATCH),
            trusted_proxies=parse_trusted(env.get(ENV_TRUSTED_PROXIES)),
            header_timeout_s=_number(env, ENV_HEADER_TIMEOUT, HEADER_TIMEOUT_S),
            body_timeout_s=_number(env, ENV_BODY_TIMEOUT, BODY_TIMEOUT_S),
            max_uploads=_whole(env, ENV_MAX_UPLOADS, MAX_UPLOADS),
            enrol_rate=_number(env, ENV_ENROL_RATE, ENROL_RATE),
            monitor_auth=(env.get(ENV_MONITOR_AUTH) or "open").strip().lower(),
            openapi_admin=(env.get(ENV_OPENAPI_ADMIN) or "").strip().lower() in ("1", "true", "yes", "on"),
        )

    def to_env(self) -> dict[str, str]:
        """The variables that rebuild this config in a worker (the token is left to the caller)."""
        env = {
            ENV_HOME: str(self.home),
            ENV_CORS_ORIGINS: ",".join(self.cors_origins),
            ENV_OFFLOAD: self.offload or "",
            ENV_WEB_CLIENT: str(self.web_client) if self.web_client is not None else WEB_CLIENT_OFF,
            ENV_MAX_UPDATE_BYTES: str(self.max_update_bytes),
            ENV_TELEMETRY_RATE: repr(self.telemetry_rate),
            ENV_MONITOR_INTERVAL: repr(self.monitor_interval_s),
            ENV_PREDICT_CACHE: str(self.predict_cache_entries),
            ENV_PREDICT_WINDOW_MS: repr(self.predict_window_ms),
            ENV_PREDICT_MAX_BATCH: str(self.predict_max_batch),
            ENV_TRUSTED_PROXIES: ",".join(self.trusted_proxies),
            ENV_HEADER_TIMEOUT: repr(self.header_timeout_s),
            ENV_BODY_TIMEOUT: repr(self.body_timeout_s),
            ENV_MAX_UPLOADS: str(self.max_uploads),
            ENV_ENROL_RATE: repr(self.enrol_rate),
            ENV_MONITOR_AUTH: self.monitor_auth,
            ENV_OPENAPI_ADMIN: "1" if self.openapi_admin else "",
        }
        return env


def _byte_count(value: str | None, default: int) -> int:
    """A size from the environment: a whole number of bytes (one clear error otherwise)."""
    if value is None or not value.strip():
        return default
    try:
        return int(value.strip())
    except ValueError:
        raise InvalidInput(f"{ENV_MAX_UPDATE_BYTES} must be a whole number of bytes, got {value!r}") from None


def _number(env: Mapping[str, str], name: str, default: float) -> float:
    """A finite number from the environment (one clear error otherwise)."""
    value = (env.get(name) or "").strip()
    if not value:
        return default
    try:
        number = float(value)
    except ValueError:
        number = float("nan")
    if number != number or number in (float("inf"), float("-inf")):
        raise InvalidInput(f"{name} must be a number, got {value!r}")
    return number


def _whole(env: Mapping[str, str], name: str, default: int) -> int:
    """A whole number from the environment (one clear error otherwise)."""
    value = (env.get(name) or "").strip()
    if not value:
        return default
    try:
        return int(value)
    except ValueError:
        raise InvalidInput(f"{name} must be a whole number, got {value!r}") from None
