"""Field monitoring: telemetry and feedback aggregates, drift, field accuracy, alerts,
shadow versions and guardrails (docs/monitoring.md; issue 13).

Devices send counts on the bins of their version's profile grid (registry/profile.py), never
an input. A batch is validated whole against the grid, then *added* into the aggregate of
its (model, version, UTC hour) window in one transaction: batches commute, a refused batch
changes nothing, and the store only ever holds sums, window totals and, for 7 days, the
random ids of recent predictions (with their predicted label and confidence) so that a
late label can join its prediction.

Tables (schema 4; the channel side tables are registry/channels.py's ``SHADOW_SCHEMA``):

    monitor_windows   per (model, version, window): batches, predictions, errors, feedback,
                      correct (classification), abs/squared error sums (regression)
    monitor_counts    per (model, version, window, series, bin): a histogram count
                      series: "feature:<name>", "prediction:classes|confidence|values",
                      "latency_ms", "shadow:<v>:latency_ms"
    monitor_shadow    per (model, version, window, shadow version): compared, agreed
    monitor_recent    prediction ids a late label may refer to (expire after 7 days)
    monitor_alerts    raised alerts (cleared_at once the condition no longer holds)
    monitor_config    per model: thresholds, webhook, retraining command (JSON)
    monitor_guardrails per (model, channel): metrics, alpha, min_samples

Schema 6 (issue 19, hostile senders):

    monitor_batches   the ids of batches already counted, so that a retried batch is counted
                      once (kept BATCH_TTL_S, as long as a client may retry)
    guardrail_tallies per rollout, version, metric and source: what a guardrail weighs —
                      only items received since the rollout began, and per source, so that
                      no single address or device holds more than a bounded share of it
                      (registry/source_share.py)

Every value is checked before it is added: a regression value outside the version's
training range (with a margin) or the model's configured bounds is refused, so a sum can
never become infinite; reading stays safe on a store that already holds one (such a window's
feedback is left out and named, and ``purge`` removes windows).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import math
import re
import sqlite3
import threading
import time
from collections.abc import Mapping
from concurrent.futures import Future
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING

from core.errors import InvalidInput, NotFound, PollinateError
from registry import channels, source_share
from registry.answers import answer
from registry.source_share import DEFAULT_SHARE

if TYPE_CHECKING:
    from registry.store import Store


class _Lazy:
    """registry.profile (and numpy) imported on first use: the store imports this module for
    its schema, and `import registry` stays light for the CLI and the server."""

    def __getattr__(self, name: str):
        from registry import profile

        value = getattr(profile, name)
        setattr(self, name, value)  # found once: later lookups are plain attribute reads
        return value


P = _Lazy()

SCHEMA = """
CREATE TABLE IF NOT EXISTS monitor_windows (
    model       TEXT NOT NULL,
    version     INTEGER NOT NULL,
    window      TEXT NOT NULL,            -- the UTC hour, "2026-12-02T14:00:00Z"
    batches     INTEGER NOT NULL DEFAULT 0,
    predictions INTEGER NOT NULL DEFAULT 0,
    errors      INTEGER NOT NULL DEFAULT 0,
    feedback    INTEGER NOT NULL DEFAULT 0,
    correct     INTEGER NOT NULL DEFAULT 0,
    abs_error   REAL NOT NULL DEFAULT 0,  -- regression feedback: sum |prediction - label|
    sq_error    REAL NOT NULL DEFAULT 0,  -- and sum (prediction - label)^2
    PRIMARY KEY (model, version, window)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS monitor_counts (
    model   TEXT NOT NULL,
    version INTEGER NOT NULL,
    window  TEXT NOT NULL,
    series  TEXT NOT NULL,
    bin     INTEGER NOT NULL,
    count   INTEGER NOT NULL,
    PRIMARY KEY (model, version, window, series, bin)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS monitor_shadow (
    model          TEXT NOT NULL,
    version        INTEGER NOT NULL,
    window         TEXT NOT NULL,
    shadow_version INTEGER NOT NULL,
    compared       INTEGER NOT NULL,
    agreed         INTEGER NOT NULL,
    PRIMARY KEY (model, version, window, shadow_version)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS monitor_recent (
    model       TEXT NOT NULL,
    id          TEXT NOT NULL,
    version     INTEGER NOT NULL,
    prediction  TEXT NOT NULL,   -- a label, or a regression value as text
    confidence  REAL,
    expires_at  REAL NOT NULL,   -- unix seconds
    PRIMARY KEY (model, id)
);
CREATE INDEX IF NOT EXISTS monitor_recent_expiry ON monitor_recent (expires_at);
CREATE TABLE IF NOT EXISTS monitor_alerts (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    model       TEXT NOT NULL,
    version     INTEGER NOT NULL,
    kind        TEXT NOT NULL,   -- "drift", "field_accuracy", "field_mae"
    subject     TEXT NOT NULL,   -- the feature ("prediction" for the predictions) or the metric
    value       REAL NOT NULL,
    threshold   REAL NOT NULL,
    message     TEXT NOT NULL,
    raised_at   TEXT NOT NULL,
    cleared_at  TEXT
);
CREATE INDEX IF NOT EXISTS monitor_alerts_open ON monitor_alerts (model, cleared_at);
CREATE TABLE IF NOT EXISTS monitor_config (
    model  TEXT PRIMARY KEY,
    config TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS monitor_guardrails (
    model       TEXT NOT NULL,
    channel     TEXT NOT NULL,
    metrics     TEXT NOT NULL,   -- JSON list
    alpha       REAL NOT NULL,
    min_samples INTEGER NOT NULL,
    PRIMARY KEY (model, channel)
);
""" + channels.SHADOW_SCHEMA

# Schema 6 (issue 19): a batch's id, kept for as long as a client may retry it, so that a
# retried batch is counted once; and the guardrail's own tallies, counted per rollout (only
# what arrived after the rollout began) and per source (address, and device when the sender
# showed an enrolled device's token), so that no single source decides a rollback.
SCHEMA_6 = """
-- monitor_batches has no index on expires_at: a second B-tree per batch cost more than the
-- hourly sweep's scan (BATCH_SWEEP_S)
CREATE TABLE IF NOT EXISTS monitor_batches (
    model      TEXT NOT NULL,
    kind       TEXT NOT NULL,   -- "telemetry" or "feedback"
    batch_id   TEXT NOT NULL,
    window     TEXT NOT NULL,   -- the window it was counted in (a retry is told which)
    expires_at REAL NOT NULL,   -- unix seconds
    PRIMARY KEY (model, kind, batch_id)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS guardrail_tallies (
    model     TEXT NOT NULL,
    channel   TEXT NOT NULL,
    rollout   INTEGER NOT NULL,  -- the channel_history id of the move that started the rollout
    version   INTEGER NOT NULL,
    metric    TEXT NOT NULL,     -- field_accuracy, error_rate, agreement
    address   TEXT NOT NULL,     -- a pseudonym of the sender's source address (server/addresses.py)
    device    TEXT NOT NULL,     -- the enrolled device that sent it, '' when anonymous
    successes INTEGER NOT NULL,
    trials    INTEGER NOT NULL,
    PRIMARY KEY (model, channel, rollout, version, metric, address, device)
) WITHOUT ROWID;
"""

MAX_PREDICTIONS = 10_000
MAX_RECENT = 100
MAX_STRING = 64
RECENT_TTL_S = 7 * 24 * 3600
PREDICTION_ID = re.compile(r"[A-Za-z0-9_.:-]{1,64}")
# A batch's id (docs/monitoring.md): 16-64 of A-Z a-z 0-9 _ -, e.g. a random UUID's 32 hex
# digits. Kept as long as pollinate.js keeps an unsent batch in its queue (7 days), the same
# as ``recent`` ids (which cost a hundred rows a batch; this costs one).
BATCH_ID = re.compile(r"[A-Za-z0-9_-]{16,64}")
BATCH_TTL_S = 7 * 24 * 3600
# Expired batch ids are deleted at most this often: one DELETE that scans the table (about 0.1 s
# per million ids on a laptop; the table is not indexed by expiry, which would cost every batch)
BATCH_SWEEP_S = 3600.0
_CLAIM_BATCH = (
    "INSERT INTO monitor_batches (model, kind, batch_id, window, expires_at) VALUES (?, ?, ?, ?, ?)"
    " ON CONFLICT (model, kind, batch_id) DO UPDATE SET window = excluded.window, expires_at = excluded.expires_at"
    " WHERE expires_at < ?")  # a live id is left alone (0 rows changed: a duplicate); an expired one is taken
# A regression value (a prediction or a label) may lie this many widths of the training range
# beyond either end of it (the profile's prediction edges: the training targets' min and max).
VALUE_MARGIN = 1.0
MAX_EXCLUDED_SHOWN = 20  # windows a report names as left out (non-finite sums of an old store)
GUARDRAIL_METRICS = ("field_accuracy", "error_rate", "agreement")
TELEMETRY_KEYS = {"version", "client_id", "batch_id", "predictions", "errors", "latency_ms", "features",
                  "prediction", "shadow", "recent"}
FEEDBACK_KEYS = {"version", "prediction", "label", "prediction_id", "client_id", "batch_id"}
RECENT_KEYS = {"id", "prediction", "confidence"}
_INT = {int}

DEFAULTS: dict = {
    "psi": 0.2,              # drift alert: PSI at or above this on a feature or the predictions...
    "js": 0.1,               # ...or Jensen-Shannon at or above this...
    "min_predictions": 200,  # ...with at least this many predictions in the period
    "min_accuracy": None,    # field accuracy below this raises an alert (None: off)
    "max_mae": None,         # field MAE above this raises an alert (None: off)
    "min_feedback": 30,      # accuracy/MAE alerts need this many feedback items
    "alert_hours": 24,       # check_alerts looks at this many hours back from now
    "webhook": None,         # alerts are POSTed here as JSON (the server's job)
    "retrain_command": None,  # argv run once per alert (the server's or CLI's job)
    "min_value": None,       # regression: values below this are refused (None: the training range's margin)
    "max_value": None,       # regression: values above this are refused (None: likewise)
    "guardrail_share": DEFAULT_SHARE,  # the most of a guardrail's count one address or device may hold
}


# --------------------------------------------------------------------------- time


_hour: tuple[float, float, str] = (math.inf, -math.inf, "")  # (start, end, label) of the last hour asked for


def window_of(now: float) -> str:
    """The UTC hour holding ``now`` (unix seconds), as "YYYY-MM-DDTHH:00:00Z". Ingestion asks
    for the current hour with every batch: the last hour's span and label are kept (one
    strftime an hour, not one per batch)."""
    global _hour
    start, end, label = _hour
    if start <= now < end:
        return label
    moment = datetime.fromtimestamp(now, UTC)
    label = moment.strftime("%Y-%m-%dT%H:00:00Z")
    start = moment.replace(minute=0, second=0, microsecond=0).timestamp()
    _hour = (start, start + 3600.0, label)
    return label


_RELATIVE = re.compile(r"(\d+(?:\.\d+)?)\s*([mhdw])")


def parse_time(value: object, *, now: float | None = None) -> float | None:
    """None, unix seconds, a datetime, an ISO time ("2026-12-01", "2026-12-01T10:00Z") or a
    span back from now ("90m", "24h", "7d", "2w") → unix seconds."""
    if value is None:
        return None
    if isinstance(value, bool):
        raise InvalidInput(f"bad time {value!r}")
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, datetime):
        return (value if value.tzinfo else value.replace(tzinfo=UTC)).timestamp()
    if not isinstance(value, str):
        raise InvalidInput(f"bad time {value!r}: use an ISO time or a span such as 7d")
    text = value.strip()
    match = _RELATIVE.fullmatch(text)
    if match:
        unit = {"m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}[match.group(2)]
        return (time.time() if now is None else now) - float(match.group(1)) * unit
    try:
        parsed = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise InvalidInput(f"bad time {value!r}: use an ISO time (2026-12-01T10:00Z) or a span (7d, 24h)") from None
    return (parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)).timestamp()


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def _bucket(window: str, bucket: str) -> str:
    if bucket == "hour":
        return window
    if bucket == "day":
        return window[:10]
    if bucket == "month":
        return window[:7]
    raise InvalidInput(f"bucket must be hour, day or month, got {bucket!r}")


# --------------------------------------------------------------------------- validation


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _count(value: object, what: str, limit: int = MAX_PREDICTIONS) -> int:
    if not _is_int(value) or value < 0:
        raise InvalidInput(f"{what} must be a non-negative integer, got {_show(value)}")
    if value > limit:
        raise InvalidInput(f"{what} must be at most {limit}, got {value}")
    return value


def _show(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _histogram(value: object, bins: int, what: str, at_most: int, at_most_what: str = "predictions") -> list[int]:
    if not isinstance(value, list):
        raise InvalidInput(f"{what} must be a list of {bins} counts")
    if len(value) != bins:
        raise InvalidInput(f"{what} must have exactly {bins} bins (the version's grid), got {len(value)}")
    if set(map(type, value)) == _INT and min(value) >= 0 and max(value) <= MAX_PREDICTIONS:
        counts = value  # plain non-negative ints (what JSON gives): checked without a call per count
    else:
        counts = [_count(v, f"{what} counts") for v in value]
    total = sum(counts)
    if total > at_most:
        raise InvalidInput(f"{what} counts sum to {total}, more than {at_most_what} ({at_most})")
    return counts


def _short_string(value: object, what: str) -> str:
    if not isinstance(value, str) or not value:
        raise InvalidInput(f"{what} must be a non-empty string")
    if len(value) > MAX_STRING:
        raise InvalidInput(f"{what} must be at most {MAX_STRING} characters")
    return value


def _object(body: object, keys: set[str], what: str) -> Mapping:
    if not isinstance(body, Mapping):
        raise InvalidInput(f"{what} must be a JSON object")
    unknown = sorted(str(k) for k in body if k not in keys)
    if unknown:
        shown = ", ".join(_show(k) for k in unknown[:5])
        raise InvalidInput(f"{what}: unknown field(s) {shown} (allowed: {', '.join(sorted(keys))})")
    return body


def _finite(value: object, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise InvalidInput(f"{what} must be a finite number, got {_show(value)}")
    return float(value)


# --------------------------------------------------------------------------- the monitor


class Monitor:
    """Reads and writes the monitoring tables of one store; safe to share between threads."""

    def __init__(self, store: Store, *, synchronous: str = "NORMAL"):
        self.store = store
        self._profiles: dict[tuple[str, int], dict] = {}
        self._plans: dict[tuple[str, int], _Plan] = {}
        self._lock = threading.Lock()
        self._committer = _Committer(self, synchronous)
        self._swept_batches = -math.inf  # when expired batch ids were last deleted (committer thread)
        self._rails: dict[str, tuple[int, list[_Rail]]] = {}  # model -> (data_version, rails): committer thread

    # ------------------------------------------------------------------ profiles

    def profile(self, model: str, version: int) -> dict | None:
        """The version's profile.json (None without a profile artifact). Versions are
        immutable, so a found profile is cached; a missing one is looked up again (it may be
        attached later with `pollinate models profile`)."""
        key = (model, version)
        with self._lock:
            cached = self._profiles.get(key)
        if cached is not None:
            return cached
        record = self.store.get_version(model, version)  # NotFound for an unknown model/version
        files = record.artifacts.get(P.PROFILE_FORMAT) or []
        if not any(f.name == P.PROFILE_FILE for f in files):
            return None
        path = self.store.artifact_path(model, version, P.PROFILE_FORMAT, P.PROFILE_FILE)
        loaded = json.loads(path.read_text())
        with self._lock:
            self._profiles[key] = loaded
        return loaded

    def grid(self, model: str, version: int) -> dict | None:
        """The manifest's ``monitoring`` block (less its URLs) for a version, or None."""
        loaded = self.profile(model, version)
        return None if loaded is None else P.grid(loaded)

    def _versions(self, db, model: str) -> set[int]:
        rows = db.execute("SELECT version FROM versions WHERE model = ?", (model,)).fetchall()
        if not rows:
            raise NotFound(f"no model named {model!r}")
        return {r[0] for r in rows}

    def _require_model(self, model: str) -> set[int]:
        from registry.store import check_model_name

        if not isinstance(model, str):
            raise NotFound(f"no model named {model!r}")
        check_model_name(model)
        with self.store._read() as db:
            return self._versions(db, model)

    def _grid_for(self, model: str, version: object, versions: set[int]) -> tuple[int, dict]:
        if not _is_int(version) or version < 1:
            raise InvalidInput(f"version must be a positive integer, got {_show(version)}")
        if version not in versions:
            raise InvalidInput(f"model {model!r} has no version {version}")
        loaded = self.profile(model, version)
        if loaded is None:
            raise InvalidInput(f"{model} v{version} has no monitoring profile: attach one with"
                               f" `pollinate models profile {model}@{version}`")
        return version, loaded

    # ------------------------------------------------------------------ telemetry

    def _plan(self, model: str, version: int, loaded: dict) -> _Plan:
        """What a batch of this version is checked against, worked out once (versions are immutable)."""
        key = (model, version)
        plan = self._plans.get(key)
        if plan is None or plan.profile is not loaded:
            plan = self._plans[key] = _Plan(loaded)
        return plan

    def _check_telemetry(self, group: _Group, model: str, body: Mapping, versions: set[int]) -> dict:
        """The batch, validated whole against its version's grid (InvalidInput otherwise)."""
        if "version" not in body or "predictions" not in body:
            raise InvalidInput("telemetry needs 'version' and 'predictions'")
        version, loaded = self._grid_for(model, body["version"], versions)
        plan = self._plan(model, version, loaded)
        if "client_id" in body:
            _short_string(body["client_id"], "client_id")
        n = _count(body["predictions"], "predictions")
        batch = {"version": version, "predictions": n, "errors": _count(body.get("errors", 0), "errors"),
                 "series": {}, "shadow": None, "recent": []}
        if batch["errors"] > n:
            raise InvalidInput(f"errors ({batch['errors']}) is more than predictions ({n})")
        if "latency_ms" in body:
            batch["series"]["latency_ms"] = _histogram(body["latency_ms"], plan.latency_bins, "latency_ms", n)
        features = body.get("features", {})
        if not isinstance(features, Mapping):
            raise InvalidInput("features must be an object {feature: counts}")
        for name, counts in features.items():
            bins = plan.features.get(name) if isinstance(name, str) else None
            if bins is None:
                raise InvalidInput(f"features: unknown feature {_show(name)} (the grid has "
                                   f"{', '.join(sorted(plan.features))})")
            batch["series"][plan.feature_series[name]] = _histogram(counts, bins, f"features.{name}", n)
        if "prediction" in body:
            prediction = _object(body["prediction"], set(plan.prediction), "prediction")
            for key, counts in prediction.items():
                batch["series"][f"prediction:{key}"] = _histogram(counts, plan.prediction[key], f"prediction.{key}", n)
        if "shadow" in body:
            shadow = _object(body["shadow"], {"version", "compared", "agreed", "latency_ms"}, "shadow")
            shadow_version = shadow.get("version")
            if not _is_int(shadow_version) or shadow_version not in versions:
                raise InvalidInput(f"shadow.version must be a version of {model!r}, got {_show(shadow_version)}")
            compared = _count(shadow.get("compared", 0), "shadow.compared")
            agreed = _count(shadow.get("agreed", 0), "shadow.agreed")
            if compared > n:
                raise InvalidInput(f"shadow.compared ({compared}) is more than predictions ({n})")
            if agreed > compared:
                raise InvalidInput(f"shadow.agreed ({agreed}) is more than shadow.compared ({compared})")
            batch["shadow"] = (shadow_version, compared, agreed)
            if "latency_ms" in shadow:
                batch["series"][f"shadow:{shadow_version}:latency_ms"] = _histogram(
                    shadow["latency_ms"], plan.latency_bins, "shadow.latency_ms", compared, "shadow.compared")
        if "recent" in body:
            batch["recent"] = self._check_recent(body["recent"], loaded["prediction"],
                                                 group.bounds(model, version, loaded))
        return batch

    @staticmethod
    def _check_recent(recent: object, grid_prediction: Mapping, bounds: tuple[float, float] | None) -> list[tuple]:
        if not isinstance(recent, list) or len(recent) > MAX_RECENT:
            raise InvalidInput(f"recent must be a list of at most {MAX_RECENT} predictions")
        rows, seen = [], set()
        labels = None if grid_prediction["task"] == P.REGRESSION else set(grid_prediction["labels"])
        for item in recent:
            if not (isinstance(item, dict) and item.keys() <= RECENT_KEYS):
                item = _object(item, RECENT_KEYS, "recent item")  # the refusal, with what is wrong
            pid = item.get("id")
            if not isinstance(pid, str) or not PREDICTION_ID.fullmatch(pid):
                raise InvalidInput("recent id must be 1-64 of A-Z a-z 0-9 _ . : -")
            if pid in seen:
                raise InvalidInput(f"recent id {pid!r} appears twice")
            seen.add(pid)
            if "prediction" not in item:
                raise InvalidInput("a recent item needs its prediction")
            prediction = item["prediction"]
            if labels is None or not (isinstance(prediction, str) and prediction in labels):
                prediction = _prediction_text(prediction, grid_prediction, "recent prediction", bounds)
            confidence = item.get("confidence")
            if confidence is not None and not (type(confidence) is float and 0 <= confidence <= 1):
                confidence = _finite(confidence, "recent confidence")
                if not 0 <= confidence <= 1:
                    raise InvalidInput("recent confidence must be in [0, 1]")
            rows.append((pid, prediction, confidence))
        return rows

    def value_bounds(self, model: str, version: int) -> tuple[float, float] | None:
        """The (low, high) a regression version's predictions and labels must lie in (None for
        a classifier or a version without a profile): the model's configured ``min_value`` /
        ``max_value``, else the training range widened by VALUE_MARGIN of its width each way."""
        loaded = self.profile(model, version)
        if loaded is None:
            return None
        return _value_bounds(loaded["prediction"], self.config(model))

    # ------------------------------------------------------------------ ingestion (one committer)

    def ingest_telemetry(self, model: str, body: dict, *, now: float | None = None,
                         source: tuple[str, str] | None = None) -> dict:
        """Validate one batch and add it into its (model, version, hour) window; returns once
        committed (see :class:`_Committer`). ``source`` is (address, device id or ""): who sent
        it, as far as the server can tell (None: this process, one source of its own); a
        guardrail weighs each source at most its share."""
        return self._submit("telemetry", model, body, now, source=source).result()

    def ingest_feedback(self, model: str, body: dict, *, now: float | None = None,
                        source: tuple[str, str] | None = None) -> dict:
        """One user correction: ``{"version", "prediction", "label"}`` or
        ``{"prediction_id", "label"}`` (the prediction sent earlier in ``recent``; joined
        once, then forgotten). Counted in the window of its arrival; returns once committed."""
        return self._submit("feedback", model, body, now, source=source).result()

    async def ingest_telemetry_async(self, model: str, body: dict, *, now: float | None = None,
                                     source: tuple[str, str] | None = None) -> dict:
        """:meth:`ingest_telemetry` for an event loop: the loop never blocks, and is woken once
        per committed group of batches, not once per batch."""
        return await self._submit("telemetry", model, body, now, asyncio.get_running_loop(), source)

    async def ingest_feedback_async(self, model: str, body: dict, *, now: float | None = None,
                                    source: tuple[str, str] | None = None) -> dict:
        """:meth:`ingest_feedback` for an event loop."""
        return await self._submit("feedback", model, body, now, asyncio.get_running_loop(), source)

    def _submit(self, kind: str, model: str, body: object, now: float | None,
                loop: asyncio.AbstractEventLoop | None = None, source: tuple[str, str] | None = None):
        from registry.store import check_model_name

        if not isinstance(model, str):
            raise NotFound(f"no model named {model!r}")
        check_model_name(model)
        pending = _Pending(kind, model, body, time.time() if now is None else float(now), loop,
                           ("", "") if source is None else source)
        self._committer.submit(pending)
        return pending.future

    def _rails_now(self, db: sqlite3.Connection, model: str, data_version: int) -> list[_Rail]:
        """The guardrails watching a rollout of ``model``, read again only when another
        connection has committed since (SQLite's ``data_version`` on the committer's own
        connection: the channels are never written by it, so an unchanged version means
        unchanged channels). One worker under load reads them once, not once per group."""
        cached = self._rails.get(model)
        if cached is not None and cached[0] == data_version:
            return cached[1]
        rails = [_Rail(channel, rollout, version, candidate, shadow, frozenset(json.loads(metrics)))
                 for channel, metrics, version, candidate, shadow, rollout in db.execute(_RAILS_QUERY, (model,))
                 if rollout is not None]
        self._rails[model] = (data_version, rails)
        return rails

    def _apply(self, db: sqlite3.Connection, group: list[_Pending]) -> tuple[dict, dict, dict]:
        """Check and apply a group of batches inside one write transaction: each refused one
        alone (it wrote nothing: every check comes before its first write), the others' counts
        added up in memory first (they commute) and written once per row. Recent ids and batch
        ids are written (and a feedback's id consumed) in queue order, so a later item of the
        group sees them. Returns (results, refusals, the group's guardrail tallies): the
        committer writes tallies a second at a time (see :class:`_Committer`)."""
        results: dict[_Pending, dict] = {}
        failed: dict[_Pending, BaseException] = {}
        context = _Group(self, db)
        merged = _Merged()
        group = [p for p in group if p.kind != _FLUSH]
        if not group:
            return results, failed, {}
        now = max(p.now for p in group)
        if now - self._swept_batches >= BATCH_SWEEP_S:
            db.execute("DELETE FROM monitor_batches WHERE expires_at < ?", (now,))
            self._swept_batches = now
        for pending in group:
            claimed = None
            try:
                versions = context.versions(pending.model)
                body = _object(pending.body, TELEMETRY_KEYS if pending.kind == "telemetry" else FEEDBACK_KEYS,
                               pending.kind)
                batch_id = body.get("batch_id")
                if batch_id is not None:
                    if not isinstance(batch_id, str) or not BATCH_ID.fullmatch(batch_id):
                        raise InvalidInput("batch_id must be 16-64 of A-Z a-z 0-9 _ - (e.g. a random UUID's hex)")
                    # claimed first (one statement): a retry is known before anything else, even a
                    # feedback whose prediction_id its first sending used up
                    key = (pending.model, pending.kind, batch_id)
                    if db.execute(_CLAIM_BATCH, (*key, window_of(pending.now), pending.now + BATCH_TTL_S,
                                                 pending.now)).rowcount == 0:
                        counted = db.execute("SELECT window FROM monitor_batches WHERE model = ? AND kind = ?"
                                             " AND batch_id = ?", key).fetchone()
                        results[pending] = {"accepted": True, "duplicate": True, "window": counted[0]}
                        continue
                    claimed = key
                if pending.kind == "telemetry":
                    results[pending] = self._apply_telemetry(db, context, pending, body, versions, merged)
                else:
                    results[pending] = self._apply_feedback(db, context, pending, body, versions, merged)
            except sqlite3.Error:
                raise  # the transaction itself is in doubt: the whole group fails, nothing is stored
            except Exception as exc:  # refused (or a bug in a check): that item alone fails, having written nothing
                if claimed is not None:  # a refused batch does not use up its id
                    db.execute("DELETE FROM monitor_batches WHERE model = ? AND kind = ? AND batch_id = ?", claimed)
                failed[pending] = exc
        merged.write(db)
        return results, failed, merged.tallies

    def _apply_telemetry(self, db, context: _Group, pending: _Pending, body: Mapping, versions: set[int],
                         merged: _Merged) -> dict:
        model, now = pending.model, pending.now
        batch = self._check_telemetry(context, model, body, versions)
        window = window_of(now)
        version = batch["version"]
        if batch["recent"]:
            if merged.expired_before is None or merged.expired_before < now:
                db.execute("DELETE FROM monitor_recent WHERE expires_at < ?", (now,))
                merged.expired_before = now
            _insert_rows(
                db, "monitor_recent (model, id, version, prediction, confidence, expires_at)",
                [(model, pid, version, pred, conf, now + RECENT_TTL_S) for pid, pred, conf in batch["recent"]],
                " ON CONFLICT (model, id) DO UPDATE SET version = excluded.version,"
                " prediction = excluded.prediction, confidence = excluded.confidence,"
                " expires_at = excluded.expires_at")
        # merged last: nothing below can fail, so a batch is either all in or not at all
        totals = merged.window((model, version, window))
        totals[0] += 1
        totals[1] += batch["predictions"]
        totals[2] += batch["errors"]
        for series, counts in batch["series"].items():
            merged.add_counts((model, version, window, series), counts)
        if batch["shadow"] is not None:
            shadow_version, compared, agreed = batch["shadow"]
            pair = merged.shadow.setdefault((model, version, window, shadow_version), [0, 0])
            pair[0] += compared
            pair[1] += agreed
        for rail in context.rails(model):
            if version != rail.candidate and version != rail.version:
                continue
            n = batch["predictions"]
            if n and "error_rate" in rail.metrics:
                merged.tally(rail, model, version, "error_rate", pending.source, n - batch["errors"], n)
            if batch["shadow"] is not None and "agreement" in rail.metrics:
                shadow_version, compared, agreed = batch["shadow"]
                if compared and (rail.shadow is None or rail.shadow == shadow_version):
                    merged.tally(rail, model, version, "agreement", pending.source, agreed, compared)
        return {"accepted": True, "window": window}

    def _apply_feedback(self, db, context: _Group, pending: _Pending, body: Mapping, versions: set[int],
                        merged: _Merged) -> dict:
        model, now = pending.model, pending.now
        if "client_id" in body:
            _short_string(body["client_id"], "client_id")
        if "label" not in body:
            raise InvalidInput("feedback needs a 'label'")
        pid = body.get("prediction_id")
        if pid is not None:
            if "version" in body or "prediction" in body:
                raise InvalidInput("feedback with a prediction_id takes its version and prediction from it:"
                                   " send only prediction_id and label")
            if not isinstance(pid, str) or not PREDICTION_ID.fullmatch(pid):
                raise InvalidInput("prediction_id must be 1-64 of A-Z a-z 0-9 _ . : -")
            row = db.execute(
                "SELECT version, prediction FROM monitor_recent WHERE model = ? AND id = ? AND expires_at >= ?",
                (model, pid, now)).fetchone()
            if row is None:
                raise InvalidInput(f"unknown or expired prediction_id {pid!r} (ids are kept for 7 days)")
            version, prediction_text = row
            _, loaded = self._grid_for(model, version, versions)
            bounds = context.bounds(model, version, loaded)
        else:
            if "version" not in body or "prediction" not in body:
                raise InvalidInput("feedback needs 'version', 'prediction' and 'label' (or 'prediction_id' and 'label')")
            version, loaded = self._grid_for(model, body["version"], versions)
            bounds = context.bounds(model, version, loaded)
            prediction_text = _prediction_text(body["prediction"], loaded["prediction"], "prediction", bounds)
        label_text = _prediction_text(body["label"], loaded["prediction"], "label", bounds)
        window = window_of(now)
        if loaded["prediction"]["task"] == P.REGRESSION:
            error = float(prediction_text) - float(label_text)
            if not math.isfinite(error * error):  # a prediction stored before the bounds (an old store)
                raise InvalidInput(f"prediction_id {pid!r} holds a value out of range: it cannot be scored")
            delta = (0, abs(error), error * error)
        else:
            delta = (int(prediction_text == label_text), 0.0, 0.0)
        if pid is not None:  # the last check and the first write: the id is answered once
            gone = db.execute("DELETE FROM monitor_recent WHERE model = ? AND id = ?", (model, pid)).rowcount
            if not gone:
                raise InvalidInput(f"prediction_id {pid!r} was already answered")
        totals = merged.window((model, version, window))
        totals[3] += 1
        totals[4] += delta[0]
        totals[5] += delta[1]
        totals[6] += delta[2]
        for rail in context.rails(model):
            if "field_accuracy" in rail.metrics and version in (rail.candidate, rail.version):
                merged.tally(rail, model, version, "field_accuracy", pending.source, delta[0], 1)
        return {"accepted": True, "window": window}

    # ------------------------------------------------------------------ reading

    def _aggregate(self, db, model: str, version: int | None, since: float | None, until: float | None,
                   group_by_bucket: str | None = None) -> dict:
        """{(version, bucket): {"totals": {...}, "series": {series: {bin: count}}, "shadow": {v: [c, a]}}}."""
        where, params = "model = ?", [model]
        if version is not None:
            where += " AND version = ?"
            params.append(version)
        if since is not None:
            where += " AND window >= ?"
            params.append(window_of(since))
        if until is not None:
            where += " AND window <= ?"
            params.append(window_of(until))
        out: dict[tuple[int, str], dict] = {}

        def slot(v: int, window: str) -> dict:
            key = (v, _bucket(window, group_by_bucket) if group_by_bucket else "")
            if key not in out:
                out[key] = {"totals": dict.fromkeys(
                    ("batches", "predictions", "errors", "feedback", "correct", "abs_error", "sq_error"), 0),
                    "series": {}, "shadow": {}, "excluded": []}
            return out[key]

        for v, window, *values in db.execute(
            "SELECT version, window, batches, predictions, errors, feedback, correct, abs_error, sq_error"
            f" FROM monitor_windows WHERE {where}", params):
            entry = slot(v, window)
            totals = entry["totals"]
            if not all(isinstance(x, (int, float)) and math.isfinite(x) and x >= 0 for x in values):
                # a sum no check of today lets through (a store written before the value bounds):
                # the window's feedback is left out and named, its volume still counts
                entry["excluded"].append(window)
                values = [*values[:3], 0, 0, 0.0, 0.0]
                values = [x if isinstance(x, (int, float)) and math.isfinite(x) and x >= 0 else 0 for x in values]
            for key, value in zip(("batches", "predictions", "errors", "feedback", "correct", "abs_error",
                                   "sq_error"), values):
                totals[key] += value
        for v, window, series, b, c in db.execute(
            f"SELECT version, window, series, bin, count FROM monitor_counts WHERE {where}", params):
            bins = slot(v, window)["series"].setdefault(series, {})
            bins[b] = bins.get(b, 0) + c
        for v, window, sv, compared, agreed in db.execute(
            f"SELECT version, window, shadow_version, compared, agreed FROM monitor_shadow WHERE {where}", params):
            pair = slot(v, window)["shadow"].setdefault(sv, [0, 0])
            pair[0] += compared
            pair[1] += agreed
        return out

    def _summarise(self, model: str, version: int, agg: dict, config: dict) -> dict:
        totals = agg["totals"]
        loaded = self.profile(model, version)
        summary: dict = {"predictions": totals["predictions"], "errors": totals["errors"],
                         "feedback": totals["feedback"], "batches": totals["batches"]}
        regression = loaded is not None and loaded["prediction"]["task"] == P.REGRESSION
        n = totals["feedback"]
        if regression:
            summary["field_mae"] = _mae(totals["abs_error"], totals["sq_error"], n)
        else:
            summary["field_accuracy"] = _accuracy(totals["correct"], n)
        latency = agg["series"].get("latency_ms")
        edges = loaded["latency_ms_edges"] if loaded else P.LATENCY_MS_EDGES
        summary["latency_ms"] = {"p50": _quantile(latency, edges, 0.5), "p95": _quantile(latency, edges, 0.95)}
        summary["shadow"] = None
        if agg["shadow"]:
            shadow_version, (compared, agreed) = max(agg["shadow"].items(), key=lambda kv: kv[1][0])
            shadow_latency = agg["series"].get(f"shadow:{shadow_version}:latency_ms")
            low, high = P.wilson(agreed, compared)
            summary["shadow"] = {
                "version": shadow_version, "compared": compared, "agreed": agreed,
                "agreement": agreed / compared if compared else None, "low": low, "high": high,
                "latency_ms": {"p50": _quantile(shadow_latency, edges, 0.5),
                               "p95": _quantile(shadow_latency, edges, 0.95)},
            }
        summary["drift"] = self._drift(loaded, agg["series"], totals["predictions"], config) if loaded else {}
        if agg.get("excluded"):
            excluded = sorted(agg["excluded"])
            summary["excluded_windows"] = excluded[:MAX_EXCLUDED_SHOWN]
            summary["note"] = (f"feedback of {len(excluded)} window(s) left out: their sums are not finite numbers"
                               " (written before values were bounded); remove them with `pollinate monitor purge`")
        return summary

    @staticmethod
    def _drift(loaded: dict, series: dict, predictions: int, config: dict) -> dict:
        """PSI and JS per feature and for the predictions over the summed windows."""
        reference = loaded["reference"]
        enough = predictions >= (config["min_predictions"] or 0)
        out = {}

        import numpy as np

        def entry(observed: dict | None, ref: list) -> dict:
            counts = np.zeros(len(ref), dtype=np.int64)
            for b, c in (observed or {}).items():
                if 0 <= b < len(ref):
                    counts[b] += c
            psi, js = P.psi(counts, ref), P.js_divergence(counts, ref)
            return {"psi": round(psi, 6), "js": round(js, 6), "n": int(counts.sum()),
                    "alert": bool(enough and counts.sum() > 0 and (psi >= config["psi"] or js >= config["js"]))}

        for feature in loaded["features"]:
            name = feature["name"]
            if f"feature:{name}" in series:
                out[name] = entry(series[f"feature:{name}"], reference["features"][name])
        key = "values" if loaded["prediction"]["task"] == P.REGRESSION else "classes"
        if f"prediction:{key}" in series:
            out["prediction"] = entry(series[f"prediction:{key}"], reference["prediction"][key])
        return out

    def report(self, model: str, *, version: int | None = None, since: object = None, until: object = None) -> dict:
        """What `pollinate monitor --json` prints: per version the volume, feedback, field
        accuracy (or MAE) with its interval, errors, latency, shadow agreement and drift over
        the period; the alerts raised in it (or still open); the channels."""
        versions = self._require_model(model)
        if version is not None and version not in versions:
            raise NotFound(f"model {model!r} has no version {version}")
        since_ts, until_ts = parse_time(since), parse_time(until)
        config = self.config(model)
        with self.store._read() as db:
            aggregates = self._aggregate(db, model, version, since_ts, until_ts)
            states = channels.read_states(db, model)
            alerts = self._alerts(db, model, version, since_ts)
        out_versions = {}
        for (v, _), agg in sorted(aggregates.items()):
            out_versions[str(v)] = self._summarise(model, v, agg, config)
        return json_safe({
            "model": model,
            "since": _iso(since_ts) if since_ts is not None else None,
            "until": _iso(until_ts) if until_ts is not None else None,
            "versions": out_versions,
            "alerts": alerts,
            "channels": {c: s.to_dict() for c, s in states.items()},
        })

    def timeline(self, model: str, *, version: int | None = None, since: object = None,
                 bucket: str = "hour") -> dict:
        """Per version, per hour/day/month: predictions, errors, feedback, field accuracy (or
        MAE) and the largest feature PSI — how a version ages in the field."""
        _bucket("2000-01-01T00:00:00Z", bucket)
        self._require_model(model)
        config = self.config(model)
        with self.store._read() as db:
            aggregates = self._aggregate(db, model, version, parse_time(since), None, bucket)
        out: dict[str, list] = {}
        for (v, b), agg in sorted(aggregates.items()):
            summary = self._summarise(model, v, agg, config)
            drift = summary["drift"]
            feature_psi = [d["psi"] for name, d in drift.items() if name != "prediction"]
            row = {"bucket": b, "predictions": summary["predictions"], "errors": summary["errors"],
                   "feedback": summary["feedback"],
                   "drift": max(feature_psi) if feature_psi else None,
                   "prediction_drift": drift.get("prediction", {}).get("psi")}
            for key in ("field_accuracy", "field_mae"):
                if key in summary:
                    row[key] = summary[key]
            out.setdefault(str(v), []).append(row)
        return json_safe({"model": model, "bucket": bucket, "versions": out})

    # ------------------------------------------------------------------ alerts

    @staticmethod
    def _alerts(db, model: str, version: int | None, since: float | None) -> list[dict]:
        query = ("SELECT id, version, kind, subject, value, threshold, message, raised_at, cleared_at"
                 " FROM monitor_alerts WHERE model = ?")
        params: list = [model]
        if version is not None:
            query += " AND version = ?"
            params.append(version)
        if since is not None:
            query += " AND (cleared_at IS NULL OR raised_at >= ?)"
            params.append(_iso(since))
        keys = ("id", "version", "kind", "subject", "value", "threshold", "message", "raised_at", "cleared_at")
        return [{"model": model, **dict(zip(keys, row))} for row in db.execute(query + " ORDER BY id", params)]

    def alerts(self, model: str, *, open_only: bool = False) -> list[dict]:
        self._require_model(model)
        with self.store._read() as db:
            rows = self._alerts(db, model, None, None)
        rows = json_safe(rows)
        return [a for a in rows if a["cleared_at"] is None] if open_only else rows

    def check_alerts(self, model: str, *, now: float | None = None) -> list[dict]:
        """Evaluate drift and field accuracy/MAE over the last ``alert_hours``; record and
        return the alerts that are NEW (one still raised is not repeated); clear those whose
        condition no longer holds. Nothing but the store changes."""
        now = time.time() if now is None else float(now)
        self._require_model(model)
        config = self.config(model)
        since = now - config["alert_hours"] * 3600
        with self.store._read() as db:
            aggregates = self._aggregate(db, model, None, since, now)
        raised: dict[tuple[int, str, str], tuple[float, float, str]] = {}
        for (v, _), agg in aggregates.items():
            summary = self._summarise(model, v, agg, config)
            for subject, d in summary["drift"].items():
                if d["alert"]:
                    which = "PSI" if d["psi"] >= config["psi"] else "JS"
                    value, threshold = (d["psi"], config["psi"]) if which == "PSI" else (d["js"], config["js"])
                    raised[(v, "drift", subject)] = (value, threshold, (
                        f"{model} v{v}: {subject} drifted ({which} {value:.3f} >= {threshold:g}"
                        f" over {summary['predictions']} predictions in {config['alert_hours']:g} h)"))
            accuracy = summary.get("field_accuracy")
            if (config["min_accuracy"] is not None and accuracy and accuracy["n"] >= config["min_feedback"]
                    and accuracy["value"] < config["min_accuracy"]):
                raised[(v, "field_accuracy", "field_accuracy")] = (accuracy["value"], config["min_accuracy"], (
                    f"{model} v{v}: field accuracy {accuracy['value']:.3f} (95% {accuracy['low']:.3f}-"
                    f"{accuracy['high']:.3f}, n={accuracy['n']}) below {config['min_accuracy']:g}"))
            mae = summary.get("field_mae")
            if (config["max_mae"] is not None and mae and mae["n"] >= config["min_feedback"]
                    and mae["value"] > config["max_mae"]):
                raised[(v, "field_mae", "field_mae")] = (mae["value"], config["max_mae"], (
                    f"{model} v{v}: field MAE {mae['value']:.4g} (n={mae['n']}) above {config['max_mae']:g}"))
        stamp = _iso(now)
        new: list[dict] = []
        with self.store._write() as db:
            open_rows = db.execute(
                "SELECT id, version, kind, subject FROM monitor_alerts WHERE model = ? AND cleared_at IS NULL",
                (model,)).fetchall()
            still_open = set()
            for alert_id, v, kind, subject in open_rows:
                if (v, kind, subject) in raised:
                    still_open.add((v, kind, subject))
                else:
                    db.execute("UPDATE monitor_alerts SET cleared_at = ? WHERE id = ?", (stamp, alert_id))
            for (v, kind, subject), (value, threshold, message) in sorted(raised.items()):
                if (v, kind, subject) in still_open:
                    continue
                cursor = db.execute(
                    "INSERT INTO monitor_alerts (model, version, kind, subject, value, threshold, message, raised_at)"
                    " VALUES (?, ?, ?, ?, ?, ?, ?, ?)", (model, v, kind, subject, value, threshold, message, stamp))
                new.append({"id": cursor.lastrowid, "model": model, "version": v, "kind": kind, "subject": subject,
                            "value": value, "threshold": threshold, "message": message, "raised_at": stamp,
                            "cleared_at": None})
        return new

    # ------------------------------------------------------------------ configuration

    def config(self, model: str) -> dict:
        """The model's monitoring settings, defaults filled in."""
        with self.store._read() as db:
            row = db.execute("SELECT config FROM monitor_config WHERE model = ?", (model,)).fetchone()
        return {**DEFAULTS, **(json.loads(row[0]) if row else {})}

    def configure(self, model: str, **settings: object) -> dict:
        """Change some settings (None resets one to its default); returns them all."""
        self._require_model(model)
        unknown = sorted(set(settings) - set(DEFAULTS))
        if unknown:
            raise InvalidInput(f"unknown monitoring setting(s) {', '.join(unknown)} (known: {', '.join(DEFAULTS)})")
        checked = {key: _check_setting(key, value) for key, value in settings.items()}
        with self.store._write() as db:
            row = db.execute("SELECT config FROM monitor_config WHERE model = ?", (model,)).fetchone()
            current = json.loads(row[0]) if row else {}
            for key, value in checked.items():
                if value is None:
                    current.pop(key, None)
                else:
                    current[key] = value
            low, high = current.get("min_value"), current.get("max_value")
            if low is not None and high is not None and not low < high:
                raise InvalidInput(f"min_value ({low:g}) must be below max_value ({high:g})")
            db.execute("INSERT INTO monitor_config (model, config) VALUES (?, ?)"
                       " ON CONFLICT (model) DO UPDATE SET config = excluded.config", (model, json.dumps(current)))
        return {**DEFAULTS, **current}

    # ------------------------------------------------------------------ shadow and guardrails

    def set_shadow(self, model: str, channel: str, version: int | None):
        """Name the channel's shadow version (None clears it); returns the ChannelState."""
        return self.store.set_shadow(model, channel, version)

    def set_guardrails(self, model: str, channel: str, metrics: list[str], *, alpha: float = 0.05,
                       min_samples: int = 100) -> dict:
        """Watch the channel's staged candidate on these metrics (an empty list removes them)."""
        channels.check_channel_name(channel)
        self._require_model(model)
        if isinstance(metrics, str) or not all(m in GUARDRAIL_METRICS for m in metrics):
            raise InvalidInput(f"guardrail metrics must be among {', '.join(GUARDRAIL_METRICS)}, got {metrics!r}")
        alpha = _finite(alpha, "alpha")
        if not 0 < alpha < 1:
            raise InvalidInput("alpha must be in (0, 1)")
        if not _is_int(min_samples) or min_samples < 1:
            raise InvalidInput("min_samples must be a positive integer")
        metrics = sorted(set(metrics), key=GUARDRAIL_METRICS.index)
        with self.store._write() as db:
            if metrics:
                db.execute("INSERT INTO monitor_guardrails (model, channel, metrics, alpha, min_samples)"
                           " VALUES (?, ?, ?, ?, ?) ON CONFLICT (model, channel) DO UPDATE SET"
                           " metrics = excluded.metrics, alpha = excluded.alpha, min_samples = excluded.min_samples",
                           (model, channel, json.dumps(metrics), alpha, min_samples))
            else:
                db.execute("DELETE FROM monitor_guardrails WHERE model = ? AND channel = ?", (model, channel))
        return {"channel": channel, "metrics": metrics, "alpha": alpha, "min_samples": min_samples}

    def guardrails(self, model: str) -> dict[str, dict]:
        with self.store._read() as db:
            rows = db.execute("SELECT channel, metrics, alpha, min_samples FROM monitor_guardrails WHERE model = ?",
                              (model,)).fetchall()
        return {c: {"channel": c, "metrics": json.loads(m), "alpha": a, "min_samples": s} for c, m, a, s in rows}

    def enforce(self, model: str, *, now: float | None = None) -> list[dict]:
        """Roll back every staged candidate significantly worse than its channel's version.

        Per channel with a candidate and guardrails, each metric is a rate compared with a
        one-sided two-proportion z-test (the candidate's rate lower, p < alpha, at least
        min_samples on each side): field_accuracy = correct / feedback; error_rate = 1 -
        errors / predictions (the share of predictions without an error); agreement = agreed /
        compared with the channel's shadow version.

        Only what arrived since the rollout began counts (the tallies ingestion keeps under the
        id of the channel's newest move), and sources, not items, are weighed
        (registry/source_share.py): no source (an address, with the enrolled devices seen at it)
        holds more than the model's ``guardrail_share`` of either side, and each rate's variance
        is computed across sources, so a decision needs at least 1/share distinct sources on
        each side and one source can never make it, whatever it sends. The rollback goes
        through the store with the reason in the history. Tallies of rollouts that are over are
        deleted.
        """
        self._require_model(model)
        rails = self.guardrails(model)
        share = float(self.config(model).get("guardrail_share") or DEFAULT_SHARE)
        rolled: list[dict] = []
        if rails:
            self._committer.flush()  # this process's tallies of the last second, written
        for channel, rail in sorted(rails.items()):
            # capped counts are never above what was received: read the sources only for the
            # metrics whose received counts could reach min_samples on both sides
            tallies, state, _ = self._tallies(model, channel, rail["metrics"], rail["min_samples"])
            if state is None or state.candidate_version is None:
                continue
            for metric in rail["metrics"]:
                candidate = _side(tallies, state.candidate_version, metric, share)
                base = _side(tallies, state.version, metric, share)
                if candidate.trials < rail["min_samples"] or base.trials < rail["min_samples"]:
                    continue
                p = source_share.p_worse(candidate, base)
                if p >= rail["alpha"]:
                    continue
                reason = (f"guardrail {metric}: candidate v{state.candidate_version} {candidate.rate:.3f}"
                          f" (n={candidate.trials:.0f} from {candidate.sources} sources) vs v{state.version}"
                          f" {base.rate:.3f} (n={base.trials:.0f} from {base.sources} sources) since the rollout"
                          f" began, no source over {share:.0%}; one-sided p={p:.2g} < {rail['alpha']:g}")
                self.store.rollback(model, channel, reason=reason)
                rolled.append({"channel": channel, "candidate": state.candidate_version, "version": state.version,
                               "metric": metric, "p": p, "reason": reason,
                               "candidate_n": candidate.trials, "version_n": base.trials,
                               "sources": [candidate.sources, base.sources]})
                break
        self._forget_tallies(model)
        return rolled

    def _tallies(self, model: str, channel: str, metrics: list[str] | None = None, min_samples: float = 0
                 ) -> tuple[dict, channels.ChannelState | None, int | None]:
        """{(version, metric, address, device): (successes, trials)} of the channel's current
        rollout, its state and the rollout's id, read together. With ``metrics``, only those
        whose received counts reach ``min_samples`` on both sides are read source by source."""
        with self.store._read() as db:
            state = channels.read_state(db, model, channel)
            rollout = db.execute("SELECT MAX(id) FROM channel_history WHERE model = ? AND channel = ?",
                                 (model, channel)).fetchone()[0]
            where, params = "model = ? AND channel = ? AND rollout = ?", [model, channel, rollout]
            if metrics is not None and state is not None and state.candidate_version is not None:
                received = {(v, m): n for v, m, n in db.execute(
                    f"SELECT version, metric, SUM(trials) FROM guardrail_tallies WHERE {where}"
                    " GROUP BY version, metric", params)}
                metrics = [m for m in metrics if min(received.get((state.candidate_version, m), 0),
                                                     received.get((state.version, m), 0)) >= min_samples]
                if not metrics:
                    return {}, state, rollout
                where += f" AND metric IN ({', '.join('?' * len(metrics))})"
                params += metrics
            rows = db.execute(f"SELECT version, metric, address, device, successes, trials FROM guardrail_tallies"
                              f" WHERE {where}", params).fetchall()
        return {(v, m, a, d): (s, n) for v, m, a, d, s, n in rows}, state, rollout

    def guardrail_status(self, model: str) -> dict[str, dict]:
        """Per channel with guardrails and a candidate: each metric's bounded counts since the
        rollout began (what ``enforce`` would weigh now), for reports and dashboards."""
        self._require_model(model)
        share = float(self.config(model).get("guardrail_share") or DEFAULT_SHARE)
        out: dict[str, dict] = {}
        self._committer.flush()
        for channel, rail in sorted(self.guardrails(model).items()):
            tallies, state, rollout = self._tallies(model, channel)
            if state is None or state.candidate_version is None:
                continue
            metrics = {}
            for metric in rail["metrics"]:
                sides = {}
                for role, v in (("candidate", state.candidate_version), ("version", state.version)):
                    side = _side(tallies, v, metric, share)
                    sides[role] = {"version": v, "rate": side.rate, "n": side.trials, "received": side.received,
                                   "sources": side.sources}
                candidate, base = _side(tallies, state.candidate_version, metric, share), _side(
                    tallies, state.version, metric, share)
                sides["p_worse"] = source_share.p_worse(candidate, base)
                metrics[metric] = sides
            out[channel] = {"rollout": rollout, "share": share, "min_samples": rail["min_samples"],
                            "alpha": rail["alpha"], "metrics": metrics}
        return json_safe(out)

    def _forget_tallies(self, model: str) -> None:
        """Delete the tallies of rollouts that are over (a later move of the channel, or no
        candidate any more): they can never count again."""
        keep = ("SELECT c.channel, (SELECT MAX(h.id) FROM channel_history h WHERE h.model = c.model"
                " AND h.channel = c.channel) FROM channels c WHERE c.model = ? AND c.candidate_version IS NOT NULL")
        with self.store._read() as db:
            current = dict(db.execute(keep, (model,)).fetchall())
            # the (channel, rollout) pairs present, one index probe each (not a scan of every row)
            present, after = [], ("", -1)
            while True:
                row = db.execute("SELECT channel, rollout FROM guardrail_tallies WHERE model = ? AND"
                                 " (channel, rollout) > (?, ?) ORDER BY channel, rollout LIMIT 1",
                                 (model, *after)).fetchone()
                if row is None:
                    break
                present.append(row)
                after = row
        stale = [(c, r) for c, r in present if current.get(c) != r]
        if stale:
            with self.store._write() as db:
                db.executemany("DELETE FROM guardrail_tallies WHERE model = ? AND channel = ? AND rollout = ?",
                               [(model, c, r) for c, r in stale])

    # ------------------------------------------------------------------ purge

    def purge(self, model: str, *, since: object, until: object = None, version: int | None = None,
              dry_run: bool = False) -> dict:
        """Remove a model's monitoring windows (totals, histograms, shadow pairs) from the hour
        holding ``since`` to the hour holding ``until`` (None: every later one), of ``version``
        or of every version; returns what was (or, ``dry_run``, would be) removed. Alerts stay
        (the next check clears those whose condition is gone); guardrail tallies stay (they
        hold counts only, per rollout: a new rollout starts afresh)."""
        versions = self._require_model(model)
        if version is not None and (not _is_int(version) or version not in versions):
            raise InvalidInput(f"model {model!r} has no version {_show(version)}")
        since_ts, until_ts = parse_time(since), parse_time(until)
        if since_ts is None:
            raise InvalidInput("purge needs --since (an ISO time or a span back such as 7d): the first hour to remove")
        if until_ts is not None and until_ts < since_ts:
            raise InvalidInput("--until is before --since: nothing to remove")
        where, params = "model = ? AND window >= ?", [model, window_of(since_ts)]
        if until_ts is not None:
            where += " AND window <= ?"
            params.append(window_of(until_ts))
        if version is not None:
            where += " AND version = ?"
            params.append(version)
        with self.store._write() as db:
            windows = db.execute(
                "SELECT version, window, batches, predictions, feedback, abs_error, sq_error FROM monitor_windows"
                f" WHERE {where} ORDER BY version, window", params).fetchall()
            counts = db.execute(f"SELECT COUNT(*) FROM monitor_counts WHERE {where}", params).fetchone()[0]
            shadow = db.execute(f"SELECT COUNT(*) FROM monitor_shadow WHERE {where}", params).fetchone()[0]
            if not dry_run:
                for table in ("monitor_windows", "monitor_counts", "monitor_shadow"):
                    db.execute(f"DELETE FROM {table} WHERE {where}", params)
        rows = [{"version": v, "window": w, "batches": b, "predictions": n, "feedback": f,
                 "finite": all(isinstance(x, (int, float)) and math.isfinite(x) for x in (a, q))}
                for v, w, b, n, f, a, q in windows]
        return {"model": model, "version": version, "since": window_of(since_ts),
                "until": window_of(until_ts) if until_ts is not None else None, "dry_run": bool(dry_run),
                "removed": {"windows": len(rows), "histogram_rows": counts, "shadow_rows": shadow,
                            "batches": sum(r["batches"] for r in rows),
                            "predictions": sum(r["predictions"] for r in rows),
                            "feedback": sum(r["feedback"] for r in rows)},
                "windows": rows}


# --------------------------------------------------------------------------- ingestion plumbing


class _Plan:
    """A version's grid as the checks use it: bins per feature, per prediction series, latency."""

    __slots__ = ("profile", "latency_bins", "features", "feature_series", "prediction")

    def __init__(self, loaded: dict):
        self.profile = loaded
        self.latency_bins = len(loaded["latency_ms_edges"]) - 1
        self.features = {f["name"]: P.bins_of(f) for f in loaded["features"]}
        self.feature_series = {name: f"feature:{name}" for name in self.features}
        grid_prediction = loaded["prediction"]
        if grid_prediction["task"] == P.REGRESSION:
            self.prediction = {"values": len(grid_prediction["edges"]) - 1}
        else:
            self.prediction = {"classes": len(grid_prediction["labels"]),
                               "confidence": len(grid_prediction["confidence_edges"]) - 1}


class _Pending:
    """One telemetry or feedback body queued for the committer, and how its sender hears back:
    a concurrent future (a thread waits on it) or an asyncio future of ``loop``."""

    __slots__ = ("kind", "model", "body", "now", "loop", "future", "source")

    def __init__(self, kind: str, model: str, body: object, now: float, loop: asyncio.AbstractEventLoop | None,
                 source: tuple[str, str] = ("", "")):
        self.kind, self.model, self.body, self.now, self.loop = kind, model, body, now, loop
        self.source = source  # (address, device id or ""): who sent it, for the guardrails (never stored as is)
        if loop is None:
            self.future = Future()
            self.future.set_running_or_notify_cancel()  # in the committer's hands: it cannot be called off
        else:
            self.future = loop.create_future()  # made on the loop's own thread


class _Rail:
    """A guardrail watching a staged rollout now: what ingestion tallies for it."""

    __slots__ = ("channel", "rollout", "version", "candidate", "shadow", "metrics")

    def __init__(self, channel: str, rollout: int, version: int, candidate: int, shadow: int | None,
                 metrics: frozenset[str]):
        self.channel, self.rollout, self.version, self.candidate = channel, rollout, version, candidate
        self.shadow, self.metrics = shadow, metrics


# The guardrails of a model with a staged candidate, each with the id of the channel's newest
# move (channel_history): the rollout began with it, so only what arrives after it is tallied.
_RAILS_QUERY = (
    "SELECT g.channel, g.metrics, c.version, c.candidate_version, s.shadow_version,"
    " (SELECT MAX(h.id) FROM channel_history h WHERE h.model = g.model AND h.channel = g.channel)"
    " FROM monitor_guardrails g JOIN channels c ON c.model = g.model AND c.channel = g.channel"
    " LEFT JOIN channel_shadows s ON s.model = g.model AND s.channel = g.channel"
    " WHERE g.model = ? AND c.candidate_version IS NOT NULL")


class _Group:
    """What one committed group reads once per model, inside its transaction: the model's
    versions, the guardrails watching a rollout, its settings (for value bounds)."""

    __slots__ = ("monitor", "db", "_versions", "_rails", "_configs", "_bounds", "_data_version")

    def __init__(self, monitor: Monitor, db: sqlite3.Connection):
        self.monitor, self.db = monitor, db
        self._data_version: int | None = None
        self._versions: dict[str, set[int]] = {}
        self._rails: dict[str, list[_Rail]] = {}
        self._configs: dict[str, dict] = {}
        self._bounds: dict[tuple[str, int], tuple[float, float] | None] = {}

    def versions(self, model: str) -> set[int]:
        found = self._versions.get(model)
        if found is None:
            found = self._versions[model] = self.monitor._versions(self.db, model)
        return found

    def rails(self, model: str) -> list[_Rail]:
        found = self._rails.get(model)
        if found is None:
            if self._data_version is None:
                self._data_version = self.db.execute("PRAGMA data_version").fetchone()[0]
            found = self._rails[model] = self.monitor._rails_now(self.db, model, self._data_version)
        return found

    def bounds(self, model: str, version: int, loaded: Mapping) -> tuple[float, float] | None:
        if loaded["prediction"]["task"] != P.REGRESSION:
            return None
        key = (model, version)
        if key not in self._bounds:
            config = self._configs.get(model)
            if config is None:
                row = self.db.execute("SELECT config FROM monitor_config WHERE model = ?", (model,)).fetchone()
                config = self._configs[model] = {**DEFAULTS, **(json.loads(row[0]) if row else {})}
            self._bounds[key] = _value_bounds(loaded["prediction"], config)
        return self._bounds[key]


class _Merged:
    """The accepted items of one group, added up: window totals, histogram counts, shadow pairs
    and the guardrails' tallies."""

    __slots__ = ("windows", "counts", "shadow", "expired_before", "tallies")

    def __init__(self):
        # (model, version, window) -> [batches, predictions, errors, feedback, correct, abs_error, sq_error]
        self.windows: dict[tuple, list] = {}
        self.counts: dict[tuple, list[int]] = {}  # (model, version, window, series) -> counts per bin
        self.shadow: dict[tuple, list[int]] = {}  # (model, version, window, shadow version) -> [compared, agreed]
        self.expired_before: float | None = None  # recent ids that expired before this are deleted
        # (model, channel, rollout, version, metric, address, device) -> [successes, trials]
        self.tallies: dict[tuple, list[int]] = {}

    def tally(self, rail: _Rail, model: str, version: int, metric: str, source: tuple[str, str],
              successes: int, trials: int) -> None:
        pair = self.tallies.setdefault((model, rail.channel, rail.rollout, version, metric, *_source_key(source)),
                                       [0, 0])
        pair[0] += successes
        pair[1] += trials

    def window(self, key: tuple) -> list:
        totals = self.windows.get(key)
        if totals is None:
            totals = self.windows[key] = [0, 0, 0, 0, 0, 0.0, 0.0]
        return totals

    def add_counts(self, key: tuple, counts: list[int]) -> None:
        summed = self.counts.get(key)
        self.counts[key] = list(counts) if summed is None else [a + b for a, b in zip(summed, counts)]

    def write(self, db: sqlite3.Connection) -> None:
        """One statement per table: the counts' rows go in as one JSON array (json_each), so
        SQLite adds them all in one call (one release of the GIL, not one per row)."""
        if self.windows:
            db.executemany(
                "INSERT INTO monitor_windows (model, version, window, batches, predictions, errors, feedback,"
                " correct, abs_error, sq_error) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
                " ON CONFLICT (model, version, window) DO UPDATE SET batches = batches + excluded.batches,"
                " predictions = predictions + excluded.predictions, errors = errors + excluded.errors,"
                " feedback = feedback + excluded.feedback, correct = correct + excluded.correct,"
                " abs_error = abs_error + excluded.abs_error, sq_error = sq_error + excluded.sq_error",
                [(*key, *totals) for key, totals in self.windows.items()])
        if self.counts:
            rows = [(*key, i, c) for key, counts in self.counts.items() for i, c in enumerate(counts) if c]
            _insert_rows(db, "monitor_counts (model, version, window, series, bin, count)", rows,
                         " ON CONFLICT (model, version, window, series, bin) DO UPDATE SET"
                         " count = count + excluded.count")
        if self.shadow:
            db.executemany(
                "INSERT INTO monitor_shadow (model, version, window, shadow_version, compared, agreed)"
                " VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (model, version, window, shadow_version) DO UPDATE"
                " SET compared = compared + excluded.compared, agreed = agreed + excluded.agreed",
                [(*key, compared, agreed) for key, (compared, agreed) in self.shadow.items()])


def _write_tallies(db: sqlite3.Connection, tallies: dict) -> None:
    """Add the guardrails' tallies {(model, channel, rollout, version, metric, address, device):
    [successes, trials]} into the store."""
    db.executemany(
        "INSERT INTO guardrail_tallies (model, channel, rollout, version, metric, address, device,"
        " successes, trials) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (model, channel, rollout,"
        " version, metric, address, device) DO UPDATE SET successes = successes + excluded.successes,"
        " trials = trials + excluded.trials",
        [(*key, successes, trials) for key, (successes, trials) in tallies.items()])


def _add_tallies(into: dict, more: dict) -> None:
    for key, (successes, trials) in more.items():
        pair = into.setdefault(key, [0, 0])
        pair[0] += successes
        pair[1] += trials


def _insert_rows(db: sqlite3.Connection, into: str, rows: list[tuple], upsert: str) -> None:
    """``INSERT INTO <into> ... <upsert>`` of many rows in one statement, the rows passed as
    one JSON array read by json_each (values keep their types: JSON integers, reals, strings
    and null). Without SQLite's JSON functions, one statement per row."""
    if not rows:
        return
    columns = into[into.index("(") + 1:into.index(")")].count(",") + 1
    if _has_json(db):
        picks = ", ".join(f"json_extract(value, '$[{i}]')" for i in range(columns))
        # "WHERE true": an INSERT ... SELECT needs a WHERE before its ON CONFLICT (SQLite's parser)
        db.execute(f"INSERT INTO {into} SELECT {picks} FROM json_each(?) WHERE true{upsert}",
                   (json.dumps(rows, separators=(",", ":")),))
    else:
        db.executemany(f"INSERT INTO {into} VALUES ({', '.join('?' * columns)}){upsert}", rows)


_JSON_FUNCTIONS: list[bool] = []  # whether this process's SQLite has json_each (checked once)


def _has_json(db: sqlite3.Connection) -> bool:
    if not _JSON_FUNCTIONS:
        try:
            found = db.execute("SELECT json_extract(value, '$[0]') FROM json_each('[[1]]')").fetchone()[0] == 1
        except sqlite3.Error:
            found = False
        _JSON_FUNCTIONS.append(found)
    return _JSON_FUNCTIONS[0]


class _Committer:
    """Telemetry and feedback that arrive together share one SQLite transaction, on one thread
    with one long-lived connection (the same shape as registry/edge.py ``GroupCommit``).

    Opening a connection per call, one fsync'd transaction per post and one UPSERT per
    (series, bin) per batch held ingestion to ~100 batches a second. Here each sender queues
    its body and waits; the committer takes everything queued, checks each item in order
    inside one ``BEGIN IMMEDIATE`` transaction (a refused one wrote nothing), adds the accepted
    ones' counts up in memory (counts commute), writes each touched row once, commits, and only
    then answers every sender — an event loop once per group. So an answer still means
    committed, and a refusal still means nothing changed.

    Durability: the connection runs ``synchronous = NORMAL`` by default. In WAL mode a commit
    is then written to the log (in the OS's page cache) but not fsync'd: it survives the
    server being killed (kill -9, a crash), not a power cut or a kernel crash, which may lose
    the last moments of telemetry (never corrupt the store). ``synchronous = "FULL"`` fsyncs
    each group's commit instead. The thread stops when idle and starts with the next body.
    One per Monitor; across processes SQLite's write lock still serialises."""

    IDLE_S = 10.0
    MAX_GROUP = 1024
    # Guardrail tallies (one row per source, rollout, version and metric: a row per sender in a
    # big fleet) are added up here and written at most this often, in the transaction of a
    # group (or one of their own when none comes), not with every group: each group wrote as
    # many scattered rows as it had senders. A tally is written only once the batches it
    # counts are committed; a server killed within the second loses that second's tallies (a
    # guardrail then weighs a few items less; never one twice). Monitor.enforce flushes first.
    TALLY_FLUSH_S = 1.0
    # The log is copied into the database (a checkpoint: writes and an fsync) by a thread of its
    # own every CHECKPOINT_S while the committer runs, so commits do not wait for it; the
    # committer checkpoints itself (what is left) only past WAL_PAGES, which bounds the log.
    CHECKPOINT_S = 0.5
    WAL_PAGES = 4000

    def __init__(self, monitor: Monitor, synchronous: str = "NORMAL"):
        if synchronous not in ("NORMAL", "FULL"):
            raise ValueError(f"synchronous must be NORMAL or FULL, got {synchronous!r}")
        self.monitor = monitor
        self.synchronous = synchronous
        self._cond = threading.Condition(threading.Lock())
        self._queue: list[_Pending] = []
        self._thread: threading.Thread | None = None
        self._db: sqlite3.Connection | None = None  # only the committer thread uses it
        self._tallies: dict = {}  # committed groups' tallies not written yet (committer thread)
        self._tallies_due = 0.0   # monotonic time by which they are written

    def submit(self, pending: _Pending) -> None:
        with self._cond:
            self._queue.append(pending)
            if self._thread is None:
                self._thread = threading.Thread(target=self._serve, name="pollinate-monitor-commit", daemon=True)
                self._thread.start()
            else:
                self._cond.notify()

    def flush(self) -> None:
        """Write the tallies not written yet now (and wait for it): a guardrail about to weigh
        them in this process sees every committed batch."""
        if self._tallies:
            pending = _Pending(_FLUSH, "", None, time.time(), None)
            self.submit(pending)
            with contextlib.suppress(PollinateError):
                pending.future.result()

    def _serve(self) -> None:
        stop = threading.Event()
        threading.Thread(target=self._checkpoints, args=(stop,), name="pollinate-monitor-checkpoint",
                         daemon=True).start()
        while True:
            with self._cond:
                if not self._queue:
                    wait = (self.IDLE_S if not self._tallies
                            else max(0.0, self._tallies_due - time.monotonic()))
                    self._cond.wait(wait)
                if self._queue:
                    group, self._queue = self._queue[:self.MAX_GROUP], self._queue[self.MAX_GROUP:]
                elif self._tallies:
                    group = []  # nothing came: the tallies are written on their own
                else:
                    self._thread = None
                    db, self._db = self._db, None
                    break
            try:
                self._commit(group)
            except BaseException as exc:  # noqa: BLE001 - whatever happens, every sender hears of it
                _answer(group, {p: PollinateError(f"the monitoring commit failed: {exc}") for p in group}, {})
        stop.set()
        if db is not None:  # outside the lock: closing the last connection may checkpoint (an fsync)
            with contextlib.suppress(sqlite3.Error):
                db.close()

    def _connection(self) -> sqlite3.Connection:
        if self._db is None:
            from registry.store import BUSY_TIMEOUT_S  # registry.store imports this module

            db = sqlite3.connect(self.monitor.store.db_path, timeout=BUSY_TIMEOUT_S, isolation_level=None,
                                 check_same_thread=False)
            db.execute(f"PRAGMA busy_timeout = {int(BUSY_TIMEOUT_S * 1000)}")
            db.execute("PRAGMA foreign_keys = ON")
            db.execute(f"PRAGMA synchronous = {self.synchronous}")
            db.execute(f"PRAGMA wal_autocheckpoint = {self.WAL_PAGES}")
            self.monitor._rails.clear()  # cached against the old connection's data_version
            self._db = db
        return self._db

    def _checkpoints(self, stop: threading.Event) -> None:
        """Passive checkpoints (never blocking a writer) until ``stop``; errors are retried."""
        from registry.store import BUSY_TIMEOUT_S

        db = None
        try:
            while not stop.wait(self.CHECKPOINT_S):
                try:
                    if db is None:
                        db = sqlite3.connect(self.monitor.store.db_path, timeout=BUSY_TIMEOUT_S,
                                             isolation_level=None, check_same_thread=False)
                    db.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
                except sqlite3.Error:
                    with contextlib.suppress(sqlite3.Error):
                        db is not None and db.close()
                    db = None
        finally:
            if db is not None:
                with contextlib.suppress(sqlite3.Error):
                    db.close()

    def _close(self) -> None:
        db, self._db = self._db, None
        if db is not None:
            with contextlib.suppress(sqlite3.Error):
                db.close()

    def _commit(self, group: list[_Pending]) -> None:
        results: dict = {}
        failed: dict = {}
        try:
            db = self._connection()
            db.execute("BEGIN IMMEDIATE")
            try:
                results, failed, tallies = self.monitor._apply(db, group)
                flushing = bool(self._tallies or tallies) and (
                    not group or time.monotonic() >= self._tallies_due or any(p.kind == _FLUSH for p in group))
                if flushing:
                    written = {key: list(pair) for key, pair in self._tallies.items()}
                    _add_tallies(written, tallies)
                    _write_tallies(db, written)
            except BaseException:
                with contextlib.suppress(sqlite3.Error):  # SQLite may have rolled back already
                    db.execute("ROLLBACK")
                raise
            db.execute("COMMIT")
            # committed: the tallies were written, or wait for the next write
            if flushing:
                self._tallies = {}
            elif tallies:
                if not self._tallies:
                    self._tallies_due = time.monotonic() + self.TALLY_FLUSH_S
                _add_tallies(self._tallies, tallies)
            for pending in group:
                if pending.kind == _FLUSH:
                    results[pending] = {}
        except BaseException as exc:  # the transaction rolled back: nothing in it was recorded
            if isinstance(exc, sqlite3.Error):
                self._close()  # start afresh next time
            message = (f"the store at {self.monitor.store.home} is unavailable: {exc}"
                       if isinstance(exc, sqlite3.Error) else f"the monitoring commit failed: {exc}")
            failed = {p: failed[p] if p in failed else PollinateError(message) for p in group}
            results = {}
            if not isinstance(exc, Exception):
                _answer(group, failed, results)
                raise
        _answer(group, failed, results)


_FLUSH = "flush"  # a _Pending that asks the committer to write its tallies now (no body)


def _answer(group: list[_Pending], failed: dict, results: dict) -> None:
    answer(group, failed, results, what="monitoring")


# --------------------------------------------------------------------------- helpers


def _prediction_text(value: object, grid_prediction: Mapping, what: str,
                     bounds: tuple[float, float] | None = None) -> str:
    """A class label (one of the grid's labels) or a regression value (finite, inside
    ``bounds``), as stored text."""
    if grid_prediction["task"] == P.REGRESSION:
        number = _finite(value, what)
        if bounds is not None and not bounds[0] <= number <= bounds[1]:
            raise InvalidInput(f"{what} {_show(value)} is outside [{bounds[0]:.6g}, {bounds[1]:.6g}], the range this"
                               " version's values can take (its training range with a margin, or the model's"
                               " configured min_value/max_value)")
        return repr(number)
    if not isinstance(value, str) or value not in grid_prediction["labels"]:
        raise InvalidInput(f"{what} must be one of the labels {grid_prediction['labels']}, got {_show(value)}")
    return value


def _value_bounds(grid_prediction: Mapping, config: Mapping) -> tuple[float, float] | None:
    """(low, high) of a regression version's values: the configured min_value/max_value where
    set, else the training targets' range (the prediction grid's first and last edge) widened
    by VALUE_MARGIN of its width on each side. None for a classifier."""
    if grid_prediction.get("task") != P.REGRESSION:
        return None
    edges = grid_prediction["edges"]
    low, high = float(edges[0]), float(edges[-1])
    width = high - low if high > low else max(abs(high), 1.0)
    low, high = low - VALUE_MARGIN * width, high + VALUE_MARGIN * width
    if config.get("min_value") is not None:
        low = float(config["min_value"])
    if config.get("max_value") is not None:
        high = float(config["max_value"])
    return low, high


def _side(tallies: Mapping, version: int, metric: str, share: float) -> source_share.Side:
    """One side of a guardrail's comparison, weighed source by source."""
    return source_share.weigh([(a, d, s, n) for (v, m, a, d), (s, n) in tallies.items()
                               if v == version and m == metric], share)


def _source_key(source: tuple[str, str]) -> tuple[str, str]:
    """(address pseudonym, device id) of a sender, as tallies keep it. The address is stored as
    the first 16 hex digits of its sha256: the store never holds a sender's address, only a
    stable stand-in for as long as a rollout's tallies are kept. Worked out only for items a
    guardrail tallies."""
    address, device = source
    pseudonym = hashlib.sha256(str(address).encode()).hexdigest()[:16] if address else ""
    return pseudonym, str(device or "")[:64]


def _accuracy(correct: int, n: int) -> dict | None:
    if not n:
        return None
    low, high = P.wilson(correct, n)
    return {"value": correct / n, "low": low, "high": high, "n": n}


def _mae(abs_sum: float, sq_sum: float, n: int) -> dict | None:
    """Mean absolute error with a normal-approximation 95 % interval (None when there is no
    feedback, or the sums overflow: never an infinite number in a report)."""
    if not n:
        return None
    mae = abs_sum / n
    variance = max(0.0, sq_sum / n - mae * mae) * (n / (n - 1) if n > 1 else 1.0)
    half = 1.96 * math.sqrt(variance / n)
    if not (math.isfinite(mae) and math.isfinite(half)):
        return None
    return {"value": mae, "low": max(0.0, mae - half), "high": mae + half, "n": n}


def json_safe(value: object) -> object:
    """``value`` with every non-finite float replaced by None, so that it is valid JSON (a
    report must never be the reason a request fails: alerts raised on an old store may hold
    an infinite value)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def _quantile(bins: dict | None, edges: list, q: float) -> float | None:
    """A latency quantile from a histogram, linear inside its bin."""
    if not bins:
        return None
    import numpy as np

    counts = np.zeros(len(edges) - 1)
    for b, c in bins.items():
        if 0 <= b < len(counts):
            counts[b] += c
    total = counts.sum()
    if total <= 0:
        return None
    target = q * total
    cumulative = 0.0
    for i, c in enumerate(counts):
        if c and cumulative + c >= target:
            share = (target - cumulative) / c
            return round(float(edges[i] + share * (edges[i + 1] - edges[i])), 3)
        cumulative += c
    return float(edges[-1])


def _check_setting(key: str, value: object) -> object:
    if value is None:
        return None
    if key in ("psi", "js", "min_accuracy", "max_mae", "alert_hours"):
        number = _finite(value, key)
        if number < 0 or (key in ("js", "min_accuracy") and number > 1) or (key == "alert_hours" and number == 0):
            raise InvalidInput(f"{key} is out of range: {value!r}")
        return number
    if key in ("min_value", "max_value"):
        return _finite(value, key)
    if key == "guardrail_share":
        share = _finite(value, key)
        if not 0 < share <= 1:
            raise InvalidInput(f"guardrail_share must be in (0, 1] (the most of a guardrail's count one source"
                               f" may hold), got {value!r}")
        return share
    if key in ("min_predictions", "min_feedback"):
        if not _is_int(value) or value < 0:
            raise InvalidInput(f"{key} must be a non-negative integer")
        return value
    if key == "webhook":
        if not isinstance(value, str) or not re.match(r"https?://[^\s]+$", value) or len(value) > 2000:
            raise InvalidInput("webhook must be an http:// or https:// URL")
        return value
    if key == "retrain_command":
        if isinstance(value, str):
            import shlex

            value = shlex.split(value)
        if not isinstance(value, list) or not value or not all(isinstance(a, str) for a in value):
            raise InvalidInput("retrain_command must be a non-empty command line (a list of arguments)")
        return value
    raise InvalidInput(f"unknown monitoring setting {key}")


def hours_ago(hours: float, now: float | None = None) -> float:
    """Unix seconds ``hours`` before now (tests and benchmarks place windows in the past)."""
    base = datetime.fromtimestamp(time.time() if now is None else now, UTC)
    return (base - timedelta(hours=hours)).timestamp()
