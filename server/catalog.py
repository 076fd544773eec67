"""The server's cached view of the store, rebuilt whenever the store changes.

Manifest requests are the hot path (every client revalidates its channel's manifest on
start), and a resolved, rendered manifest only changes when someone writes to the store.
So the catalog keeps a *snapshot* — the models with their channels, the version records
it has loaded and the manifests it has rendered — tagged with SQLite's
``PRAGMA data_version`` read on one long-lived connection. That pragma costs about 2 µs
and changes whenever any other connection (another worker, ``pollinate models promote``,
the exporter, a federated round) commits, so every request checks it and a write is seen
by the very next request, in every worker, with no shared memory and no TTL. Telemetry,
feedback and device updates commit to the same file many times a second without changing
what a manifest shows, so when the pragma moves the catalog also reads the store's
``catalog_generation`` counter (bumped by triggers only when models, versions, artifacts or
channels change: registry/store.py) and keeps its snapshot while that counter stays put.

Order matters: the marker is read *before* the store, so a snapshot may hold data newer
than its marker but never older; the next request then sees a new marker and reloads.

A channel a client names must exist, with one exception: ``stable`` (what a client gets
when it names none) falls back to the newest version while it is unset, so a fresh store
serves its first model with no setup (``cohort: "latest"`` says so). Any other channel that
is not set is 404: a typo (``?channel=stabel``) or a guessed name must not hand out the
newest version, which nobody reviewed. A channel a rollback unset is not set either.

Everything here runs on the event-loop thread (the marker connection is only meaningful
within that one connection); store reads on a cache miss go to a worker thread, and
concurrent misses for the same key share one load.
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import anyio.to_thread

from registry import ArtifactFile, ChannelState, NotFound, Store, VersionRecord
from registry.channels import choose
from registry.outcome import export_outcome
from server.blobs import Blob
from server.manifest import RenderedManifest, build_manifest, read_grid

# Artifact lookups are cached for good (attached files never change); this bounds memory.
MAX_CACHED_FILES = 100_000
# Rendered manifests kept per snapshot (a few KB each); past this they are rendered per request.
MAX_RENDERED = 4096
# The channel a client gets when it names none, and the only one that stands for the newest
# version while it is unset (module docstring).
DEFAULT_CHANNEL = "stable"


@dataclass(frozen=True)
class ModelInfo:
    """One model as a snapshot sees it: its newest version and its set channels."""

    name: str
    latest_version: int
    versions: int
    channels: dict[str, ChannelState]


@dataclass
class Snapshot:
    """Everything loaded while the store's marker had one value."""

    marker: int
    models: dict[str, ModelInfo] | None = None
    records: dict[tuple[str, int], VersionRecord] = field(default_factory=dict)
    rendered: dict[tuple, RenderedManifest] = field(default_factory=dict)
    listings: dict[str, list[VersionRecord]] = field(default_factory=dict)
    pending: dict[tuple, asyncio.Future] = field(default_factory=dict)


@dataclass(frozen=True)
class Resolved:
    """A manifest chosen for one request, and the channel label metrics may use for it."""

    manifest: RenderedManifest
    channel_label: str  # the channel when it is set, "(latest)" otherwise: bounded label values


class Catalog:
    """Resolves channels and renders manifests from a snapshot of the store."""

    def __init__(self, store: Store):
        self.store = store
        self._marker_db: sqlite3.Connection | None = None
        self._data_version: int | None = None
        self._generation = 0
        self._snapshot: Snapshot | None = None
        self._files: dict[tuple[str, int, str, str], ArtifactFile] = {}
        self._outcomes: dict[tuple, dict] = {}

    # ------------------------------------------------------------------ freshness

    def _marker(self) -> int:
        if self._marker_db is None:
            self._marker_db = sqlite3.connect(
                self.store.db_path, isolation_level=None, check_same_thread=False, timeout=5.0
            )
        data_version = self._marker_db.execute("PRAGMA data_version").fetchone()[0]
        if data_version != self._data_version:
            self._data_version = data_version
            row = self._marker_db.execute("SELECT n FROM catalog_generation WHERE id = 1").fetchone()
            self._generation = row[0] if row is not None else -data_version
        return self._generation

    def snapshot(self) -> Snapshot:
        """The current snapshot; a new, empty one when the store changed since the last."""
        marker = self._marker()
        snap = self._snapshot
        if snap is None or snap.marker != marker:
            snap = self._snapshot = Snapshot(marker)
        return snap

    async def _load(self, snap: Snapshot, key: tuple, load: Callable[[], Any]) -> Any:
        """Run ``load`` in a thread once per key and snapshot, however many requests wait."""
        waiting = snap.pending.get(key)
        if waiting is not None:
            return await asyncio.shield(waiting)
        future = asyncio.get_running_loop().create_future()
        snap.pending[key] = future
        try:
            value = await anyio.to_thread.run_sync(load)
        except BaseException as exc:
            if isinstance(exc, Exception):
                future.set_exception(exc)
                future.exception()  # mark retrieved: nobody may be waiting
            else:  # cancelled (shutdown): the waiters give up too
                future.cancel()
            raise
        else:
            future.set_result(value)
            return value
        finally:
            snap.pending.pop(key, None)

    # ------------------------------------------------------------------ models

    async def models(self, snap: Snapshot | None = None) -> dict[str, ModelInfo]:
        snap = snap or self.snapshot()
        if snap.models is None:
            snap.models = await self._load(snap, ("models",), self._read_models)
        return snap.models

    def _read_models(self) -> dict[str, ModelInfo]:
        return {
            m["name"]: ModelInfo(
                name=m["name"],
                latest_version=m["latest_version"],
                versions=m["versions"],
                channels={c: ChannelState(**s) for c, s in m["channels"].items()},
            )
            for m in self.store.list_models()
        }

    async def model(self, name: str, snap: Snapshot | None = None) -> ModelInfo:
        info = (await self.models(snap)).get(name)
        if info is None:
            raise NotFound(f"no model named {name!r}")
        return info

    # ------------------------------------------------------------------ versions

    async def record(self, model: str, version: int, snap: Snapshot | None = None) -> VersionRecord:
        snap = snap or self.snapshot()
        key = (model, version)
        record = snap.records.get(key)
        if record is None:
            info = await self.model(model, snap)
            if not 1 <= version <= info.latest_version:
                raise NotFound(f"model {model!r} has no version {version}")
            record = await self._load(snap, ("record", *key), lambda: self.store.get_version(model, version))
            snap.records[key] = record
        return record

    async def records(self, model: str) -> list[VersionRecord]:
        """Every version of a model (for listings), loaded once per snapshot."""
        snap = self.snapshot()
        await self.model(model, snap)
        records = snap.listings.get(model)
        if records is None:
            records = await self._load(snap, ("records", model), lambda: self.store.list_versions(model))
            snap.listings[model] = records
            for r in records:
                snap.records.setdefault((model, r.version), r)
        return records

    def _render(self, snap: Snapshot, record: VersionRecord, channel: str | None, cohort: str | None) -> RenderedManifest:
        key = (record.model, record.version, channel, cohort)
        rendered = snap.rendered.get(key)
        if rendered is None:
            info = (snap.models or {}).get(record.model)
            state = info.channels.get(channel) if info is not None and channel is not None else None
            rendered = RenderedManifest.of(build_manifest(
                record, channel, cohort, export_outcome=self._outcome(record),
                monitoring=read_grid(self.store, record), shadow_version=getattr(state, "shadow_version", None)))
            # Clients name channels and cohorts: the cache must not grow with whatever they send.
            if len(snap.rendered) < MAX_RENDERED:
                snap.rendered[key] = rendered
        return rendered

    def _outcome(self, record: VersionRecord) -> dict:
        """What a version delivered and refused (from its export reports) and each TF.js
        model's kind. Attached files never change, so the answer is cached for good per set
        of formats (a later `pollinate export` attaching more makes a new key)."""
        key = (record.model, record.version, tuple(sorted(record.artifacts)))
        outcome = self._outcomes.get(key)
        if outcome is None:
            outcome = export_outcome(self.store, record)
            if len(self._outcomes) < MAX_CACHED_FILES:
                self._outcomes[key] = outcome
        return outcome

    async def version_manifest(self, model: str, version: int) -> RenderedManifest:
        snap = self.snapshot()
        return self._render(snap, await self.record(model, version, snap), None, None)

    def cached_channel_manifest(self, model: str, channel: str, client_id: str | None) -> Resolved | None:
        """The answer when the current snapshot already has it, without awaiting anything;
        None when something must be loaded (or the model is unknown: the slow path says so)."""
        snap = self.snapshot()
        if snap.models is None:
            return None
        info = snap.models.get(model)
        if info is None:
            return None
        chosen = self._choose(info, channel, client_id)
        if chosen is None:
            return None  # the slow path says 404
        version, cohort, label = chosen
        rendered = snap.rendered.get((model, version, channel, cohort))
        return None if rendered is None else Resolved(rendered, label)

    async def channel_manifest(self, model: str, channel: str, client_id: str | None) -> Resolved:
        """The manifest this client should run: the channel's version, the rollout
        candidate when the client's cohort has it, or the newest version when the channel
        is ``stable`` and unset (as :meth:`registry.Store.resolve`); NotFound for any other
        channel that is not set."""
        snap = self.snapshot()
        info = await self.model(model, snap)
        chosen = self._choose(info, channel, client_id)
        if chosen is None:
            named = ", ".join(sorted(info.channels)) or "none yet"
            raise NotFound(f"model {model!r} has no channel {channel!r} (its channels: {named})")
        version, cohort, label = chosen
        record = await self.record(model, version, snap)
        return Resolved(self._render(snap, record, channel, cohort), label)

    @staticmethod
    def _choose(info: ModelInfo, channel: str, client_id: str | None) -> tuple[int, str, str] | None:
        state = info.channels.get(channel)
        if state is None:
            if channel != DEFAULT_CHANNEL:
                return None
            return info.latest_version, "latest", "(latest)"
        version, cohort = choose(state, client_id)
        return version, cohort, channel

    # ------------------------------------------------------------------ files

    def cached_artifact(self, model: str, version: int, fmt: str, name: str) -> ArtifactFile | None:
        """A file looked up before (only names that exist are ever cached)."""
        return self._files.get((model, version, fmt, name))

    def blob(self, artifact: ArtifactFile) -> Blob:
        path = self.store.objects / artifact.sha256[:2] / artifact.sha256
        return Blob(artifact.sha256, artifact.size, path, artifact.name)

    async def artifact(self, model: str, version: int, fmt: str, name: str) -> ArtifactFile:
        """A stored file's address. Attached files never change, so hits are kept for good."""
        key = (model, version, fmt, name)
        found = self._files.get(key)
        if found is not None:
            return found
        record = await self.record(model, version)
        for f in record.artifacts.get(fmt, ()):
            if f.name == name:
                if len(self._files) >= MAX_CACHED_FILES:
                    self._files.clear()
                self._files[key] = f
                return f
        if fmt not in record.artifacts:
            raise NotFound(f"model {model!r} version {version} has no format {fmt!r}")
        raise NotFound(f"model {model!r} version {version} has no file {fmt}/{name}")
