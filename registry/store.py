"""The model store: versions with lineage, content-addressed artifacts, and channels.

Layout under ``home``::

    registry.sqlite            metadata (WAL, so readers never wait for a writer)
    objects/<sha[:2]>/<sha256> artifact bytes, written once, read-only afterwards
    tmp/                       blobs being written; renamed into objects/ when complete

Publishing is two phases so that a reader never sees half a version, whatever happens
to the writer: first every file is streamed into ``tmp/``, hashed, fsynced and renamed
to its content address (an existing blob is simply reused); then one ``BEGIN IMMEDIATE``
transaction allocates the version number and inserts the version with all its artifact
rows. A writer killed between the phases leaves only orphan blobs, which nothing points
to and which are harmless.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import sqlite3
import tempfile
import time
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Union

from core.errors import InvalidInput, NotFound, PollinateError
from registry import channels, edge, monitoring
from registry.channels import ChannelState

PathOrBytes = Union[str, os.PathLike, bytes, bytearray, memoryview]

MODEL_NAME = re.compile(r"[a-z0-9][a-z0-9_.-]{0,63}")
FORMAT_NAME = re.compile(r"[a-z0-9][a-z0-9-]{0,31}")
SHA256_HEX = re.compile(r"[0-9a-f]{64}")
SOURCES = ("central", "federated")

BUSY_TIMEOUT_S = 30.0
CHUNK = 1 << 20
# A temp blob this old belongs to a writer that died; younger ones may be in flight.
STALE_TMP_S = 24 * 3600
# The store's schema version, kept in SQLite's `PRAGMA user_version`. Opening a store runs
# the migrations from its version up to this one, in one transaction (an older store is
# upgraded in place, or left exactly as it was if anything fails); a store written by a
# newer Pollinate is refused with a clear error, never read with the wrong schema.
SCHEMA_VERSION = 6

SCHEMA = """
CREATE TABLE IF NOT EXISTS models (
    name         TEXT PRIMARY KEY,
    last_version INTEGER NOT NULL,   -- the counter: numbers are never reused, even after a delete
    created_at   TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS versions (
    model      TEXT NOT NULL REFERENCES models (name),
    version    INTEGER NOT NULL,
    created_at TEXT NOT NULL,
    lineage    TEXT NOT NULL,
    metrics    TEXT NOT NULL,
    input_spec TEXT NOT NULL,
    labels     TEXT,
    PRIMARY KEY (model, version)
);
CREATE TABLE IF NOT EXISTS artifacts (
    model   TEXT NOT NULL,
    version INTEGER NOT NULL,
    format  TEXT NOT NULL,
    name    TEXT NOT NULL,
    sha256  TEXT NOT NULL,
    size    INTEGER NOT NULL,
    PRIMARY KEY (model, version, format, name),
    FOREIGN KEY (model, version) REFERENCES versions (model, version)
);
CREATE INDEX IF NOT EXISTS artifacts_by_sha ON artifacts (sha256);
CREATE TRIGGER IF NOT EXISTS versions_immutable BEFORE UPDATE ON versions
BEGIN SELECT RAISE(ABORT, 'versions are immutable'); END;
CREATE TRIGGER IF NOT EXISTS artifacts_immutable BEFORE UPDATE ON artifacts
BEGIN SELECT RAISE(ABORT, 'artifacts are immutable'); END;
""" + channels.SCHEMA

# The tables whose rows a manifest or a listing shows. Every insert, update or delete on them
# bumps `catalog_generation.n` in the same transaction, so the server (server/catalog.py)
# tells "what it shows changed" from "something was committed" (telemetry, feedback and device
# updates commit to this file many times a second) without reading the tables themselves.
CATALOG_TABLES = ("models", "versions", "artifacts", "channels", "channel_shadows")
CATALOG_GENERATION = """
CREATE TABLE IF NOT EXISTS catalog_generation (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    n  INTEGER NOT NULL
);
INSERT OR IGNORE INTO catalog_generation (id, n) VALUES (1, 0);
""" + "".join(
    f"CREATE TRIGGER IF NOT EXISTS catalog_{table}_{op.lower()} AFTER {op} ON {table}\n"
    f"BEGIN UPDATE catalog_generation SET n = n + 1 WHERE id = 1; END;\n"
    for table in CATALOG_TABLES for op in ("INSERT", "UPDATE", "DELETE"))


# Each migration takes a store from version N to N + 1. Version 1 is the first release's
# schema (the tables above); every later change is appended here, never edited in place.
MIGRATIONS: dict[int, str] = {
    # 1 → 2: a record of every schema change, so an upgraded store says where it came from.
    1: """
CREATE TABLE IF NOT EXISTS schema_history (
    version     INTEGER PRIMARY KEY,   -- the schema version reached
    from_version INTEGER NOT NULL,     -- 0 for a store created at this version
    applied_at  TEXT NOT NULL
);
""",
    # 2 → 3: edge federation (devices, tasks, accepted updates, refusal counts): registry/edge.py
    2: edge.SCHEMA,
    # 3 → 4: field monitoring (telemetry and feedback aggregates, alerts, guardrails, shadow
    # versions, reasons of channel moves): registry/monitoring.py
    3: monitoring.SCHEMA,
    # 4 → 5: a counter that moves only when what a manifest or listing shows moves (see
    # CATALOG_GENERATION): the server's cache no longer resets on every telemetry batch or
    # device update, which commit to this same file.
    4: CATALOG_GENERATION,
    # 5 → 6: hostile clients (issue 19): device refusals counted per federation
    # (registry/edge.py), retried telemetry/feedback batches recognised by their id and
    # guardrail tallies per rollout and per source (registry/monitoring.py)
    5: edge.SCHEMA_6 + monitoring.SCHEMA_6,
}


# --------------------------------------------------------------------------- records


@dataclass(frozen=True)
class Lineage:
    """Where a version came from: enough to reproduce it or to explain it to a client."""

    source: str  # "central" or "federated"
    parent_version: int | None = None
    round: int | None = None
    dataset_fingerprint: str | None = None
    hyperparameters: dict = field(default_factory=dict)
    extra: dict = field(default_factory=dict)  # e.g. strategy, clients, examples (federated)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping) -> Lineage:
        """Build from JSON (CLI, manifests); unknown keys are refused, not silently dropped."""
        if not isinstance(data, Mapping):
            raise InvalidInput(f"lineage must be an object, got {type(data).__name__}")
        known = {"source", "parent_version", "round", "dataset_fingerprint", "hyperparameters", "extra"}
        unknown = sorted(set(data) - known)
        if unknown:
            raise InvalidInput(f"unknown lineage field(s): {', '.join(map(str, unknown))}")
        if "source" not in data:
            raise InvalidInput("lineage needs a source ('central' or 'federated')")
        return cls(**{k: data[k] for k in known if k in data})


@dataclass(frozen=True)
class ArtifactFile:
    """One file of one format: its name inside the format and its content address."""

    name: str
    sha256: str
    size: int

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class VersionRecord:
    """A published version, exactly as readers see it (never partially)."""

    model: str
    version: int
    created_at: str
    lineage: Lineage
    metrics: dict
    input_spec: dict
    labels: list | None
    artifacts: dict[str, list[ArtifactFile]]  # format -> files sorted by name

    def to_dict(self) -> dict:
        return {
            "model": self.model,
            "version": self.version,
            "created_at": self.created_at,
            "lineage": self.lineage.to_dict(),
            "metrics": self.metrics,
            "input_spec": self.input_spec,
            "labels": self.labels,
            "artifacts": {
                fmt: [f.to_dict() for f in files] for fmt, files in self.artifacts.items()
            },
        }


# --------------------------------------------------------------------------- validation


def check_model_name(model: object) -> str:
    """Lower-case only so that "Digits" and "digits" can never be two models."""
    if not isinstance(model, str) or not MODEL_NAME.fullmatch(model):
        raise InvalidInput(
            f"bad model name {model!r}: use 1-64 of a-z 0-9 _ . - starting with a letter or digit"
        )
    return model


def check_format_name(fmt: object) -> str:
    if not isinstance(fmt, str) or not FORMAT_NAME.fullmatch(fmt):
        raise InvalidInput(
            f"bad format name {fmt!r}: use 1-32 of a-z 0-9 - starting with a letter or digit"
        )
    return fmt


def check_file_name(name: object) -> str:
    """File names become URL path segments and download names: a plain name, nothing more."""
    if not isinstance(name, str) or not name or len(name) > 255:
        raise InvalidInput(f"bad file name {name!r}: it must be 1-255 characters")
    if "/" in name or "\\" in name or ".." in name or name == ".":
        raise InvalidInput(f"bad file name {name!r}: no '/', '\\' or '..'")
    if any(ord(c) < 32 or ord(c) == 127 for c in name):
        raise InvalidInput(f"bad file name {name!r}: no control characters")
    return name


def check_version_number(version: object, what: str = "version") -> int:
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise InvalidInput(f"{what} must be a positive integer, got {version!r}")
    return version


def _json_default(value: object) -> object:
    """numpy scalars and arrays (metrics straight from Keras) without importing numpy."""
    if hasattr(value, "tolist"):
        return value.tolist()
    if isinstance(value, (set, frozenset, tuple)):
        return list(value)
    raise TypeError(f"{type(value).__name__} is not JSON")


def _to_json(value: object, what: str) -> str:
    try:
        return json.dumps(value, default=_json_default, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise InvalidInput(f"{what} must be plain JSON (finite numbers, string keys): {exc}") from None


def _json_object(value: object, what: str) -> str:
    if value is None:
        value = {}
    if not isinstance(value, Mapping):
        raise InvalidInput(f"{what} must be a dict, got {type(value).__name__}")
    return _to_json(dict(value), what)


def _check_lineage(lineage: object) -> tuple[Lineage, str]:
    """Validated lineage and its JSON; the returned Lineage holds the stored (JSON) values."""
    if not isinstance(lineage, Lineage):
        raise InvalidInput(f"lineage must be a Lineage, got {type(lineage).__name__}")
    if lineage.source not in SOURCES:
        raise InvalidInput(f"lineage source must be 'central' or 'federated', got {lineage.source!r}")
    if lineage.parent_version is not None:
        check_version_number(lineage.parent_version, "lineage parent_version")
    if lineage.round is not None and (
        isinstance(lineage.round, bool) or not isinstance(lineage.round, int) or lineage.round < 0
    ):
        raise InvalidInput(f"lineage round must be a non-negative integer, got {lineage.round!r}")
    if lineage.dataset_fingerprint is not None and not isinstance(lineage.dataset_fingerprint, str):
        raise InvalidInput("lineage dataset_fingerprint must be a string")
    for what in ("hyperparameters", "extra"):
        if not isinstance(getattr(lineage, what), Mapping):
            raise InvalidInput(f"lineage {what} must be a dict")
    text = _to_json(lineage.to_dict(), "lineage")
    return Lineage(**json.loads(text)), text


@dataclass(frozen=True)
class _Source:
    """One file to store: where its bytes come from, before anything is written."""

    format: str
    name: str
    data: bytes | None
    path: Path | None


def _plan_artifacts(artifacts: object, *, allow_empty: bool) -> list[_Source]:
    """Check every format, name and source file before a single byte is written."""
    if not isinstance(artifacts, Mapping):
        raise InvalidInput("artifacts must be a dict {format: {file name: path or bytes}}")
    if not artifacts and not allow_empty:
        raise InvalidInput("no artifacts given")
    plan = []
    for fmt, files in artifacts.items():
        check_format_name(fmt)
        if not isinstance(files, Mapping) or not files:
            raise InvalidInput(f"format {fmt!r} needs a non-empty dict {{file name: path or bytes}}")
        for name, source in files.items():
            check_file_name(name)
            if isinstance(source, (bytes, bytearray, memoryview)):
                plan.append(_Source(fmt, name, bytes(source), None))
            elif isinstance(source, (str, os.PathLike)):
                path = Path(source)
                if not path.is_file():
                    raise InvalidInput(f"{fmt}/{name}: {path} is not a file")
                if not os.access(path, os.R_OK):
                    raise InvalidInput(f"{fmt}/{name}: {path} is not readable")
                plan.append(_Source(fmt, name, None, path))
            else:
                raise InvalidInput(f"{fmt}/{name}: give a path or bytes, not {type(source).__name__}")
    return sorted(plan, key=lambda s: (s.format, s.name))


def _check_reason(reason: object) -> str | None:
    if reason is None:
        return None
    if not isinstance(reason, str) or len(reason) > 1000:
        raise InvalidInput("a channel move's reason must be a string of at most 1000 characters")
    return reason or None


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _fsync_dir(path: Path) -> None:
    """Make a rename durable: the directory entry is data too."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# --------------------------------------------------------------------------- the store


class Store:
    """A model store rooted at ``home``; safe to use from several processes at once.

    Each operation opens its own short-lived SQLite connection, so a Store can be shared
    by threads and survives a fork; WAL lets readers run while one writer commits.
    """

    def __init__(self, home: str | os.PathLike):
        self.home = Path(home)
        self.db_path = self.home / "registry.sqlite"
        self.objects = self.home / "objects"
        self.tmp = self.home / "tmp"
        try:
            for folder in (self.home, self.objects, self.tmp):
                folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise PollinateError(f"cannot create the store at {self.home}: {exc.strerror}") from None
        self._init_schema()
        self._sweep_tmp()

    def __repr__(self) -> str:
        return f"Store({str(self.home)!r})"

    # ------------------------------------------------------------------ sqlite plumbing

    def _connect(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.db_path, timeout=BUSY_TIMEOUT_S, isolation_level=None)
        db.execute(f"PRAGMA busy_timeout = {int(BUSY_TIMEOUT_S * 1000)}")
        db.execute("PRAGMA foreign_keys = ON")
        # FULL: a publish that returned survives a power cut, not only a crash.
        db.execute("PRAGMA synchronous = FULL")
        return db

    @contextlib.contextmanager
    def _transaction(self, mode: str) -> Iterator[sqlite3.Connection]:
        """``IMMEDIATE`` for writes (take the write lock up front: no upgrade deadlocks),
        ``DEFERRED`` for reads (one consistent snapshot across several SELECTs)."""
        db = self._connect()
        try:
            db.execute(f"BEGIN {mode}")
            try:
                yield db
            except BaseException:
                with contextlib.suppress(sqlite3.Error):  # SQLite may have rolled back already
                    db.execute("ROLLBACK")
                raise
            db.execute("COMMIT")
        except sqlite3.OperationalError as exc:
            # Only after busy_timeout: another process held the write lock for 30 s.
            raise PollinateError(f"the store at {self.home} is unavailable: {exc}") from None
        finally:
            db.close()

    def _write(self) -> contextlib.AbstractContextManager[sqlite3.Connection]:
        return self._transaction("IMMEDIATE")

    def _read(self) -> contextlib.AbstractContextManager[sqlite3.Connection]:
        return self._transaction("DEFERRED")

    def _init_schema(self) -> None:
        """Create or migrate the schema; retried because two processes may open a new home together."""
        deadline = time.monotonic() + BUSY_TIMEOUT_S
        while True:
            try:
                db = self._connect()
                try:
                    db.execute("PRAGMA journal_mode = WAL")  # persistent: stored in the file
                    db.execute("BEGIN IMMEDIATE")
                    try:
                        _upgrade(db, self.db_path)
                    except BaseException:
                        db.execute("ROLLBACK")
                        raise
                    db.execute("COMMIT")
                finally:
                    db.close()
                return
            except sqlite3.DatabaseError as exc:
                if "locked" not in str(exc) or time.monotonic() > deadline:
                    raise PollinateError(f"cannot open {self.db_path}: {exc}") from None
                time.sleep(0.05)

    def schema_version(self) -> int:
        """The schema version of this store (after the migrations run on open)."""
        db = self._connect()
        try:
            return int(db.execute("PRAGMA user_version").fetchone()[0])
        finally:
            db.close()

    def schema_history(self) -> list[dict]:
        """Every schema version this store has been at: how it was created, then each upgrade."""
        with self._read() as db:
            rows = db.execute("SELECT version, from_version, applied_at FROM schema_history ORDER BY version")
            return [{"version": v, "from_version": f, "applied_at": at} for v, f, at in rows]

    def _sweep_tmp(self) -> None:
        cutoff = time.time() - STALE_TMP_S
        with contextlib.suppress(OSError):
            for entry in os.scandir(self.tmp):
                with contextlib.suppress(OSError):
                    if entry.stat().st_mtime < cutoff:
                        os.unlink(entry.path)

    # ------------------------------------------------------------------ blobs

    def blob_path(self, sha256: str) -> Path:
        """Where the bytes with this sha256 are stored; NotFound if no such blob."""
        if not isinstance(sha256, str) or not SHA256_HEX.fullmatch(sha256):
            raise InvalidInput(f"bad sha256 {sha256!r}: 64 lower-case hex digits expected")
        path = self._blob_location(sha256)
        if not path.is_file():
            raise NotFound(f"no stored file with sha256 {sha256}")
        return path

    def _blob_location(self, sha256: str) -> Path:
        return self.objects / sha256[:2] / sha256

    def _store_blob(self, source: _Source) -> tuple[str, int]:
        """Stream into tmp/, hash, fsync, rename to the content address; reuse if present."""
        fd, tmp_name = tempfile.mkstemp(dir=self.tmp, prefix="blob-")
        digest, size = hashlib.sha256(), 0
        try:
            with os.fdopen(fd, "wb") as out:
                if source.data is not None:
                    out.write(source.data)
                    digest.update(source.data)
                    size = len(source.data)
                else:
                    try:
                        src = open(source.path, "rb")  # noqa: SIM115 - errors differ by side
                    except OSError as exc:
                        raise InvalidInput(f"cannot read {source.path}: {exc.strerror}") from None
                    with src:
                        while chunk := src.read(CHUNK):
                            out.write(chunk)
                            digest.update(chunk)
                            size += len(chunk)
                out.flush()
                os.fsync(out.fileno())
            sha = digest.hexdigest()
            final = self._blob_location(sha)
            if final.is_file() and final.stat().st_size == size:
                os.unlink(tmp_name)
                return sha, size
            final.parent.mkdir(exist_ok=True)
            os.chmod(tmp_name, 0o444)
            os.replace(tmp_name, final)
            _fsync_dir(final.parent)
            return sha, size
        except BaseException as exc:
            with contextlib.suppress(OSError):
                os.unlink(tmp_name)
            if isinstance(exc, OSError):
                raise PollinateError(f"cannot write to the store at {self.home}: {exc.strerror}") from None
            raise

    def _store_all(self, plan: list[_Source]) -> dict[str, list[ArtifactFile]]:
        stored: dict[str, list[ArtifactFile]] = {}
        for source in plan:
            sha, size = self._store_blob(source)
            stored.setdefault(source.format, []).append(ArtifactFile(source.name, sha, size))
        return stored

    # ------------------------------------------------------------------ versions

    def publish(
        self,
        model: str,
        *,
        lineage: Lineage,
        artifacts: Mapping[str, Mapping[str, PathOrBytes]],
        metrics: dict | None = None,
        input_spec: dict | None = None,
        labels: list | None = None,
    ) -> VersionRecord:
        """Store a new version; its number is allocated only when everything is on disk."""
        check_model_name(model)
        lineage, lineage_json = _check_lineage(lineage)
        metrics_json = _json_object(metrics, "metrics")
        spec_json = _json_object(input_spec, "input_spec")
        if labels is not None and not isinstance(labels, (list, tuple)):
            raise InvalidInput(f"labels must be a list, got {type(labels).__name__}")
        labels_json = None if labels is None else _to_json(list(labels), "labels")
        plan = _plan_artifacts(artifacts, allow_empty=True)
        if lineage.parent_version is not None:
            # Checked now so a bad parent writes nothing; checked again in the transaction.
            with self._read() as db:
                self._require_version(db, model, lineage.parent_version, "lineage parent_version")

        stored = self._store_all(plan)
        created_at = _now()
        with self._write() as db:
            db.execute(
                "INSERT OR IGNORE INTO models (name, last_version, created_at) VALUES (?, 0, ?)",
                (model, created_at),
            )
            version = db.execute("SELECT last_version FROM models WHERE name = ?", (model,)).fetchone()[0] + 1
            if lineage.parent_version is not None:
                self._require_version(db, model, lineage.parent_version, "lineage parent_version")
            db.execute("UPDATE models SET last_version = ? WHERE name = ?", (version, model))
            db.execute(
                "INSERT INTO versions (model, version, created_at, lineage, metrics, input_spec, labels)"
                " VALUES (?, ?, ?, ?, ?, ?, ?)",
                (model, version, created_at, lineage_json, metrics_json, spec_json, labels_json),
            )
            self._insert_artifacts(db, model, version, stored)
        return VersionRecord(
            model=model,
            version=version,
            created_at=created_at,
            lineage=lineage,
            metrics=json.loads(metrics_json),
            input_spec=json.loads(spec_json),
            labels=None if labels_json is None else json.loads(labels_json),
            artifacts=stored,
        )

    def add_artifacts(
        self, model: str, version: int, artifacts: Mapping[str, Mapping[str, PathOrBytes]]
    ) -> VersionRecord:
        """Attach new formats to a version (the exporter's job); attached formats never change."""
        check_model_name(model)
        check_version_number(version)
        plan = _plan_artifacts(artifacts, allow_empty=False)
        with self._read() as db:
            self._require_version(db, model, version)
            self._refuse_attached(db, model, version, {s.format for s in plan})

        stored = self._store_all(plan)
        with self._write() as db:
            self._require_version(db, model, version)
            self._refuse_attached(db, model, version, set(stored))
            self._insert_artifacts(db, model, version, stored)
            return self._load(db, model, version)[0]

    def get_version(self, model: str, version: int | None = None) -> VersionRecord:
        """One version; ``None`` means the newest."""
        check_model_name(model)
        if version is not None:
            check_version_number(version)
        with self._read() as db:
            if version is None:
                version = self._latest(db, model)
            else:
                self._require_version(db, model, version)
            return self._load(db, model, version)[0]

    def list_versions(self, model: str) -> list[VersionRecord]:
        check_model_name(model)
        with self._read() as db:
            self._require_model(db, model)
            return self._load(db, model, None)

    def list_models(self) -> list[dict]:
        with self._read() as db:
            rows = db.execute(
                "SELECT model, MAX(version), COUNT(*) FROM versions GROUP BY model ORDER BY model"
            ).fetchall()
            return [
                {
                    "name": name,
                    "latest_version": latest,
                    "versions": count,
                    "channels": {
                        ch: state.to_dict() for ch, state in channels.read_states(db, name).items()
                    },
                }
                for name, latest, count in rows
            ]

    def artifact_path(self, model: str, version: int, format: str, name: str) -> Path:
        """The stored bytes of one file of one format of one version."""
        check_model_name(model)
        check_version_number(version)
        check_format_name(format)
        check_file_name(name)
        with self._read() as db:
            row = db.execute(
                "SELECT sha256 FROM artifacts WHERE model = ? AND version = ? AND format = ? AND name = ?",
                (model, version, format, name),
            ).fetchone()
            if row is None:
                self._require_version(db, model, version)
                raise NotFound(f"model {model!r} version {version} has no file {format}/{name}")
        return self._blob_location(row[0])

    def verify(self) -> list[str]:
        """Re-hash every blob a version points to; one line per problem, [] when healthy."""
        problems: list[str] = []
        with self._read() as db:
            check = db.execute("PRAGMA quick_check").fetchall()
            rows = db.execute(
                "SELECT model, version, format, name, sha256, size FROM artifacts"
                " ORDER BY model, version, format, name"
            ).fetchall()
            orphans = db.execute(
                "SELECT a.model, a.version FROM artifacts a LEFT JOIN versions v"
                " ON a.model = v.model AND a.version = v.version WHERE v.version IS NULL"
            ).fetchall()
        if check != [("ok",)]:
            problems += [f"database: {r[0]}" for r in check]
        problems += [f"{m} v{v}: artifact rows without a version" for m, v in sorted(set(orphans))]
        verdicts: dict[tuple[str, int], str | None] = {}
        for model, version, fmt, name, sha, size in rows:
            key = (sha, size)
            if key not in verdicts:
                verdicts[key] = self._check_blob(sha, size)
            if verdicts[key]:
                problems.append(f"{model} v{version} {fmt}/{name}: {verdicts[key]}")
        return problems

    def _check_blob(self, sha: str, size: int) -> str | None:
        path = self._blob_location(sha)
        try:
            actual_size = path.stat().st_size
            if actual_size != size:
                return f"blob {sha} has {actual_size} bytes, expected {size}"
            digest = hashlib.sha256()
            with open(path, "rb") as f:
                while chunk := f.read(CHUNK):
                    digest.update(chunk)
        except FileNotFoundError:
            return f"blob {sha} is missing"
        except OSError as exc:
            return f"blob {sha} is unreadable: {exc.strerror}"
        if digest.hexdigest() != sha:
            return f"blob {sha} is corrupt (content hashes to {digest.hexdigest()})"
        return None

    # ------------------------------------------------------------------ channels

    def set_channel(
        self, model: str, channel: str, version: int, rollout_percent: float | None = None,
        *, reason: str | None = None,
    ) -> ChannelState:
        """Point a channel at ``version`` (None or 100 %) or stage it for some clients;
        ``reason`` is kept with the move in the channel's history."""
        check_model_name(model)
        channels.check_channel_name(channel)
        check_version_number(version)
        percent = channels.check_percent(rollout_percent)
        reason = _check_reason(reason)
        with self._write() as db:
            self._require_version(db, model, version)
            return channels.move(db, model, channel, version, percent, _now(), reason)

    def rollback(self, model: str, channel: str, *, reason: str | None = None) -> ChannelState:
        """Undo the channel's last move still in effect (``reason``: why, kept in the history).

        Returns the restored state; when the channel did not exist before that move it is
        now unset, and the returned state has ``version`` None.
        """
        check_model_name(model)
        channels.check_channel_name(channel)
        reason = _check_reason(reason)
        with self._write() as db:
            self._require_model(db, model)
            now = _now()
            restored = channels.rollback(db, model, channel, now, reason)
        return restored or ChannelState(model, channel, None, None, None, now)

    def set_shadow(self, model: str, channel: str, version: int | None) -> ChannelState:
        """Name the version that runs silently beside the channel's (None clears it)."""
        check_model_name(model)
        channels.check_channel_name(channel)
        if version is not None:
            check_version_number(version)
        with self._write() as db:
            if version is None:
                self._require_model(db, model)
            else:
                self._require_version(db, model, version)
            return channels.set_shadow(db, model, channel, version, _now())

    def get_channel(self, model: str, channel: str) -> ChannelState | None:
        """The channel's state, or None when it is unset."""
        check_model_name(model)
        channels.check_channel_name(channel)
        with self._read() as db:
            self._require_model(db, model)
            return channels.read_state(db, model, channel)

    def list_channels(self, model: str) -> dict[str, ChannelState]:
        """Every channel of a model that is set, by name."""
        check_model_name(model)
        with self._read() as db:
            self._require_model(db, model)
            return channels.read_states(db, model)

    def channel_history(self, model: str, channel: str | None = None) -> list[dict]:
        """Every move of the model's channels (or of one channel), oldest first."""
        check_model_name(model)
        if channel is not None:
            channels.check_channel_name(channel)
        with self._read() as db:
            self._require_model(db, model)
            return channels.history(db, model, channel)

    def resolve(
        self, model: str, channel: str = "stable", client_id: str | None = None
    ) -> tuple[int, str]:
        """The version a client should run and why: "channel", "candidate", or "latest"
        (the channel is unset, so the newest version stands in). Without a client id
        (None or "") a client gets the channel's main version, never the candidate."""
        check_model_name(model)
        channels.check_channel_name(channel)
        if client_id is not None and not isinstance(client_id, str):
            raise InvalidInput(f"client id must be a string, got {type(client_id).__name__}")
        with self._read() as db:
            state = channels.read_state(db, model, channel)
            if state is None:
                return self._latest(db, model), "latest"
        return channels.choose(state, client_id)

    # ------------------------------------------------------------------ row helpers

    @staticmethod
    def _require_model(db: sqlite3.Connection, model: str) -> None:
        if db.execute("SELECT 1 FROM versions WHERE model = ? LIMIT 1", (model,)).fetchone() is None:
            raise NotFound(f"no model named {model!r}")

    def _require_version(self, db: sqlite3.Connection, model: str, version: int, what: str = "") -> None:
        row = db.execute("SELECT 1 FROM versions WHERE model = ? AND version = ?", (model, version)).fetchone()
        if row is None:
            if not what:
                self._require_model(db, model)
            suffix = f" ({what})" if what else ""
            raise NotFound(f"model {model!r} has no version {version}{suffix}")

    def _latest(self, db: sqlite3.Connection, model: str) -> int:
        row = db.execute("SELECT MAX(version) FROM versions WHERE model = ?", (model,)).fetchone()
        if row[0] is None:
            raise NotFound(f"no model named {model!r}")
        return row[0]

    @staticmethod
    def _refuse_attached(db: sqlite3.Connection, model: str, version: int, formats: set[str]) -> None:
        rows = db.execute(
            "SELECT DISTINCT format FROM artifacts WHERE model = ? AND version = ?", (model, version)
        ).fetchall()
        clash = sorted(formats & {r[0] for r in rows})
        if clash:
            raise InvalidInput(
                f"model {model!r} version {version} already has format(s) {', '.join(clash)};"
                " attached artifacts are immutable"
            )

    @staticmethod
    def _insert_artifacts(
        db: sqlite3.Connection, model: str, version: int, stored: dict[str, list[ArtifactFile]]
    ) -> None:
        db.executemany(
            "INSERT INTO artifacts (model, version, format, name, sha256, size) VALUES (?, ?, ?, ?, ?, ?)",
            [(model, version, fmt, f.name, f.sha256, f.size) for fmt, files in stored.items() for f in files],
        )

    @staticmethod
    def _load(db: sqlite3.Connection, model: str, version: int | None) -> list[VersionRecord]:
        """Versions with their artifacts, read inside the caller's snapshot."""
        where, params = ("model = ?", (model,)) if version is None else (
            "model = ? AND version = ?", (model, version))
        files: dict[int, dict[str, list[ArtifactFile]]] = {}
        for v, fmt, name, sha, size in db.execute(
            f"SELECT version, format, name, sha256, size FROM artifacts WHERE {where}"
            " ORDER BY version, format, name",
            params,
        ):
            files.setdefault(v, {}).setdefault(fmt, []).append(ArtifactFile(name, sha, size))
        return [
            VersionRecord(
                model=model,
                version=v,
                created_at=created_at,
                lineage=Lineage(**json.loads(lineage)),
                metrics=json.loads(metrics),
                input_spec=json.loads(spec),
                labels=None if labels is None else json.loads(labels),
                artifacts=files.get(v, {}),
            )
            for v, created_at, lineage, metrics, spec, labels in db.execute(
                f"SELECT version, created_at, lineage, metrics, input_spec, labels FROM versions"
                f" WHERE {where} ORDER BY version",
                params,
            )
        ]


def _upgrade(db: sqlite3.Connection, db_path: Path) -> None:
    """Bring the schema inside the open transaction `db` to SCHEMA_VERSION (or refuse)."""
    found = int(db.execute("PRAGMA user_version").fetchone()[0])
    if found > SCHEMA_VERSION:
        raise PollinateError(
            f"{db_path} has store schema version {found}, newer than this Pollinate understands "
            f"({SCHEMA_VERSION}): upgrade Pollinate to open it (nothing was changed)")
    if found == SCHEMA_VERSION:
        return
    now = _now()
    if found == 0:
        tables = {row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        if tables:  # every store Pollinate ever wrote has a version: this file is something else
            raise PollinateError(f"{db_path} is not a Pollinate store (tables {', '.join(sorted(tables))},"
                                 " no schema version): use another --home")
        for statement in _statements(SCHEMA) + [s for v in sorted(MIGRATIONS) for s in _statements(MIGRATIONS[v])]:
            db.execute(statement)
        db.execute("INSERT INTO schema_history VALUES (?, 0, ?)", (SCHEMA_VERSION, now))
    else:
        for version in range(found, SCHEMA_VERSION):
            for statement in _statements(MIGRATIONS[version]):
                db.execute(statement)
            db.execute("INSERT INTO schema_history VALUES (?, ?, ?)", (version + 1, version, now))
    db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")


def _statements(script: str) -> list[str]:
    """Split the schema for execute(): executescript() would commit our open transaction."""
    statements, buffer = [], ""
    for line in script.splitlines(keepends=True):
        buffer += line
        if sqlite3.complete_statement(buffer):
            statements.append(buffer.strip())
            buffer = ""
    return [s for s in statements if s]
