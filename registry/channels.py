"""Channels: named pointers to a model's versions, with staged rollouts and rollback.

A channel (``stable``, ``canary``, …) points at one version. A staged rollout keeps that
version for most clients and gives a *candidate* version to a percentage of them, chosen
by a stable hash so a client never flips between versions from one request to the next
and raising the percentage only adds clients.

Every move is appended to ``channel_history``; the history doubles as the rollback stack
(promote pushes, rollback pops), so rollback needs no state besides what an auditor reads.

The functions here run inside a transaction that :class:`registry.store.Store` opens;
they never open or commit one themselves.
"""

from __future__ import annotations

import hashlib
import math
import re
import sqlite3
from dataclasses import asdict, dataclass

from core.errors import InvalidInput

CHANNEL_NAME = re.compile(r"[a-z0-9_-]{1,32}")

# Buckets are hundredths of a percent: a rollout can be as fine as 0.01 %.
BUCKETS = 10_000

SCHEMA = """
CREATE TABLE IF NOT EXISTS channels (
    model             TEXT NOT NULL,
    channel           TEXT NOT NULL,
    version           INTEGER NOT NULL,
    candidate_version INTEGER,
    rollout_percent   REAL,
    updated_at        TEXT NOT NULL,
    PRIMARY KEY (model, channel),
    FOREIGN KEY (model, version) REFERENCES versions (model, version),
    FOREIGN KEY (model, candidate_version) REFERENCES versions (model, version)
);
CREATE TABLE IF NOT EXISTS channel_history (
    id                INTEGER PRIMARY KEY AUTOINCREMENT,
    model             TEXT NOT NULL,
    channel           TEXT NOT NULL,
    action            TEXT NOT NULL CHECK (action IN ('promote', 'rollout', 'rollback')),
    version           INTEGER,
    candidate_version INTEGER,
    rollout_percent   REAL,
    undoes            INTEGER REFERENCES channel_history (id),
    at                TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS channel_history_by_channel ON channel_history (model, channel, id);
CREATE TRIGGER IF NOT EXISTS channel_history_no_update BEFORE UPDATE ON channel_history
BEGIN SELECT RAISE(ABORT, 'channel_history is append-only'); END;
CREATE TRIGGER IF NOT EXISTS channel_history_no_delete BEFORE DELETE ON channel_history
BEGIN SELECT RAISE(ABORT, 'channel_history is append-only'); END;
"""

# Added by schema 4 (monitoring): a channel's shadow version, and why a move was made (a
# guardrail's rollback says which metric failed). Side tables rather than new columns, so the
# migration is plain CREATE ... IF NOT EXISTS and channel_history stays append-only.
SHADOW_SCHEMA = """
CREATE TABLE IF NOT EXISTS channel_shadows (
    model          TEXT NOT NULL,
    channel        TEXT NOT NULL,
    shadow_version INTEGER NOT NULL,
    updated_at     TEXT NOT NULL,
    PRIMARY KEY (model, channel),
    FOREIGN KEY (model, shadow_version) REFERENCES versions (model, version)
);
CREATE TABLE IF NOT EXISTS channel_history_reasons (
    history_id INTEGER PRIMARY KEY REFERENCES channel_history (id),
    reason     TEXT NOT NULL
);
"""


@dataclass(frozen=True)
class ChannelState:
    """Where a channel points now: its version, and the candidate staged for a cohort."""

    model: str
    channel: str
    version: int | None
    candidate_version: int | None
    rollout_percent: float | None
    updated_at: str
    shadow_version: int | None = None  # run silently beside the served version (docs/monitoring.md §4)

    def to_dict(self) -> dict:
        return asdict(self)


def check_channel_name(channel: object) -> str:
    """Channel names end up in URLs and CLI arguments, so they stay short and plain."""
    if not isinstance(channel, str) or not CHANNEL_NAME.fullmatch(channel):
        raise InvalidInput(f"bad channel name {channel!r}: use 1-32 of a-z 0-9 _ -")
    return channel


def check_percent(percent: object) -> float | None:
    """None means a full promote; otherwise a number in (0, 100]."""
    if percent is None:
        return None
    if isinstance(percent, bool) or not isinstance(percent, (int, float)):
        raise InvalidInput(f"rollout percent must be a number in (0, 100], got {percent!r}")
    value = float(percent)
    if not math.isfinite(value) or not 0 < value <= 100:
        raise InvalidInput(f"rollout percent must be in (0, 100], got {percent!r}")
    return value


def cohort_bucket(model: str, channel: str, client_id: str) -> float:
    """A client's place in 0.00–99.99, the same in every process and on every machine.

    First 8 bytes of sha256("model\\0channel\\0client_id"), read big-endian, mod 10 000,
    divided by 100. Hashing the channel too keeps canary and stable cohorts independent.
    """
    digest = hashlib.sha256(f"{model}\0{channel}\0{client_id}".encode()).digest()
    return (int.from_bytes(digest[:8], "big") % BUCKETS) / 100


def in_candidate_cohort(model: str, channel: str, client_id: str, percent: float) -> bool:
    """Bucket below percent: raising percent only ever adds clients."""
    return cohort_bucket(model, channel, client_id) < percent


def choose(state: ChannelState, client_id: str | None) -> tuple[int, str]:
    """The version one client runs on this channel, and why ("candidate" or "channel")."""
    if (
        state.candidate_version is not None
        and state.rollout_percent is not None
        and client_id
        and in_candidate_cohort(state.model, state.channel, client_id, state.rollout_percent)
    ):
        return state.candidate_version, "candidate"
    return state.version, "channel"


_STATE_QUERY = (
    "SELECT c.channel, c.version, c.candidate_version, c.rollout_percent, c.updated_at, s.shadow_version"
    " FROM channels c LEFT JOIN channel_shadows s ON s.model = c.model AND s.channel = c.channel"
    " WHERE c.model = ?"
)


def read_state(db: sqlite3.Connection, model: str, channel: str) -> ChannelState | None:
    row = db.execute(_STATE_QUERY + " AND c.channel = ?", (model, channel)).fetchone()
    if row is None:
        return None
    return ChannelState(model, channel, row[1], row[2], row[3], row[4], row[5])


def read_states(db: sqlite3.Connection, model: str) -> dict[str, ChannelState]:
    rows = db.execute(_STATE_QUERY + " ORDER BY c.channel", (model,)).fetchall()
    return {r[0]: ChannelState(model, r[0], r[1], r[2], r[3], r[4], r[5]) for r in rows}


def set_shadow(db: sqlite3.Connection, model: str, channel: str, version: int | None, now: str) -> ChannelState:
    """Name (or clear, with None) the channel's shadow version; the caller checked that it
    exists. The channel must be set: a shadow runs beside what the channel serves."""
    current = read_state(db, model, channel)
    if current is None:
        raise InvalidInput(f"channel {channel!r} of model {model!r} is not set: promote a version first")
    if version is None:
        db.execute("DELETE FROM channel_shadows WHERE model = ? AND channel = ?", (model, channel))
    else:
        db.execute(
            "INSERT INTO channel_shadows (model, channel, shadow_version, updated_at) VALUES (?, ?, ?, ?)"
            " ON CONFLICT (model, channel) DO UPDATE SET shadow_version = excluded.shadow_version,"
            " updated_at = excluded.updated_at",
            (model, channel, version, now),
        )
    return read_state(db, model, channel)


def move(
    db: sqlite3.Connection,
    model: str,
    channel: str,
    version: int,
    percent: float | None,
    now: str,
    reason: str | None = None,
) -> ChannelState:
    """Promote ``version`` fully, or stage it for ``percent`` of clients; record the move.

    The caller has checked that ``version`` exists.
    """
    current = read_state(db, model, channel)
    if percent is None or percent >= 100:
        new = ChannelState(model, channel, version, None, None, now)
        action = "promote"
    else:
        if current is None:
            raise InvalidInput(
                f"channel {channel!r} of model {model!r} has no version yet:"
                " promote a version fully first"
            )
        if version == current.version:
            raise InvalidInput(
                f"version {version} is already what channel {channel!r} serves; stage another version"
            )
        new = ChannelState(model, channel, current.version, version, percent, now)
        action = "rollout"
    _write_state(db, new)
    _append(db, model, channel, action, new, None, now, reason)
    return read_state(db, model, channel)


def rollback(
    db: sqlite3.Connection, model: str, channel: str, now: str, reason: str | None = None
) -> ChannelState | None:
    """Undo the newest move still in effect; None when that leaves the channel unset.

    The channel's state always equals what the newest effective move set (or unset when
    none is left), so popping a move restores the one beneath it exactly.
    """
    rows = db.execute(
        "SELECT id, action, version, candidate_version, rollout_percent, undoes"
        " FROM channel_history WHERE model = ? AND channel = ? ORDER BY id",
        (model, channel),
    ).fetchall()
    undone = {r[5] for r in rows if r[1] == "rollback"}
    effective = [r for r in rows if r[1] != "rollback" and r[0] not in undone]
    if not effective:
        raise InvalidInput(f"channel {channel!r} of model {model!r} has no move to roll back")
    top = effective[-1]
    if len(effective) >= 2:
        below = effective[-2]
        restored: ChannelState | None = ChannelState(model, channel, below[2], below[3], below[4], now)
        _write_state(db, restored)
    else:
        restored = None
        db.execute("DELETE FROM channels WHERE model = ? AND channel = ?", (model, channel))
        db.execute("DELETE FROM channel_shadows WHERE model = ? AND channel = ?", (model, channel))
    _append(db, model, channel, "rollback", restored, top[0], now, reason)
    return None if restored is None else read_state(db, model, channel)


def history(db: sqlite3.Connection, model: str, channel: str | None) -> list[dict]:
    """Every move, oldest first; ``reason`` is None unless the move was given one."""
    query = (
        "SELECT h.action, h.channel, h.version, h.candidate_version, h.rollout_percent, h.at, r.reason"
        " FROM channel_history h LEFT JOIN channel_history_reasons r ON r.history_id = h.id"
        " WHERE h.model = ?"
    )
    params: tuple = (model,)
    if channel is not None:
        query += " AND h.channel = ?"
        params += (channel,)
    keys = ("action", "channel", "version", "candidate_version", "rollout_percent", "at", "reason")
    return [dict(zip(keys, row)) for row in db.execute(query + " ORDER BY h.id", params)]


def _write_state(db: sqlite3.Connection, state: ChannelState) -> None:
    db.execute(
        "INSERT INTO channels (model, channel, version, candidate_version, rollout_percent, updated_at)"
        " VALUES (?, ?, ?, ?, ?, ?)"
        " ON CONFLICT (model, channel) DO UPDATE SET version = excluded.version,"
        " candidate_version = excluded.candidate_version,"
        " rollout_percent = excluded.rollout_percent, updated_at = excluded.updated_at",
        (state.model, state.channel, state.version, state.candidate_version,
         state.rollout_percent, state.updated_at),
    )


def _append(
    db: sqlite3.Connection,
    model: str,
    channel: str,
    action: str,
    state: ChannelState | None,
    undoes: int | None,
    now: str,
    reason: str | None = None,
) -> None:
    cursor = db.execute(
        "INSERT INTO channel_history"
        " (model, channel, action, version, candidate_version, rollout_percent, undoes, at)"
        " VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
        (
            model,
            channel,
            action,
            state.version if state else None,
            state.candidate_version if state else None,
            state.rollout_percent if state else None,
            undoes,
            now,
        ),
    )
    if reason:
        db.execute("INSERT INTO channel_history_reasons (history_id, reason) VALUES (?, ?)",
                   (cursor.lastrowid, reason))
