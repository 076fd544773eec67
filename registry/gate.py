"""Versions the acceptance gate held, read back from the store.

A federated round worse than the last accepted one (federated/acceptance.py) is published
for inspection but moves no channel; its lineage carries the verdict (`extra.gate`:
passed, metric, value, reference, reference_round, threshold, reason). This module reads
those verdicts for whoever shows them: `pollinate models history` interleaves the holds with
the channel moves, and the server or the dashboard lists a model's held versions with why.

Stdlib only, like the rest of the store.
"""

from __future__ import annotations

from registry.store import Store, VersionRecord


def verdict_of(record: VersionRecord) -> dict | None:
    """The gate's verdict recorded with a version (None: the version never met the gate)."""
    gate = record.lineage.extra.get("gate") if isinstance(record.lineage.extra, dict) else None
    return gate if isinstance(gate, dict) else None


def is_held(record: VersionRecord) -> bool:
    gate = verdict_of(record)
    return gate is not None and gate.get("passed") is False


def held_versions(store: Store, model: str) -> list[dict]:
    """The model's held versions, oldest first: {version, round, created_at, parent_version,
    channel, metric, value, reference, reference_round, threshold, reason}. Raises NotFound
    for an unknown model."""
    out = []
    for record in store.list_versions(model):
        if not is_held(record):
            continue
        gate = verdict_of(record) or {}
        federation = record.lineage.extra.get("federation") or {}
        out.append({
            "version": record.version, "round": record.lineage.round, "created_at": record.created_at,
            "parent_version": record.lineage.parent_version,
            "channel": federation.get("channel") if isinstance(federation, dict) else None,
            **{k: gate.get(k) for k in ("metric", "value", "reference", "reference_round", "threshold", "reason")},
        })
    return out


def history_with_holds(store: Store, model: str, channel: str | None = None) -> list[dict]:
    """The channel moves (Store.channel_history) and the held versions in one list, in time
    order: a hold is a row with action "held", the version, the channel it did not move and
    the reason. With `channel`, only that channel's moves and holds."""
    moves = store.channel_history(model, channel)
    holds = [{"action": "held", "channel": h["channel"], "version": h["version"], "candidate_version": None,
              "rollout_percent": None, "at": h["created_at"], "reason": h["reason"], "round": h["round"]}
             for h in held_versions(store, model) if channel is None or h["channel"] == channel]
    # both timestamps are the store's UTC ISO strings: they sort as text; a move and a hold
    # at the same millisecond keep the move first (stable sort)
    return sorted(moves + holds, key=lambda row: row["at"] or "")
