"""Edge rounds in the store: enrolled devices, open tasks and the updates devices sent.

An *edge gateway* (a Flower SuperNode, see ``federated/gateway.py``) turns a Flower round
into a *task* that devices (browsers, phones) fetch over HTTP from ``pollinate serve``
(``server/routers/federations.py``). Both processes meet here, in the store, so that either
can be killed with -9 and restarted without losing an accepted update or counting one twice:

- a device's token is stored as its sha256, never in clear;
- an update is accepted in two steps, together with the others that arrived meanwhile
  (``GroupCommit``, one committer thread per process): their float32 deltas are appended to
  this process's *segment* of their task (``registry/edge_log.py``: one file per task and
  writer, one write per batch, as durable as the mode below when it returns); then one
  ``BEGIN IMMEDIATE`` transaction checks that each task is still open and each device has
  not contributed to it, and inserts the rows naming (segment, offset, length). The 202 goes
  out only after the commit, so a batch costs at most two disk syncs (``power``; none in
  ``process``) however many updates it holds. A writer
  killed before the commit leaves bytes no row points to (the device gets no 202 and may
  retry); one killed after it has counted the update exactly once (the primary key is
  (task, device));
- a gateway that restarts in the middle of a round re-opens the *same* task (keyed by
  federation, round and gateway name) and finds every update accepted so far.

Layout under the store's home::

    edge/<task_id>/base.f32            the task's base weights (flat little-endian float32)
    edge/<task_id>/<writer>.seg        updates appended by one EdgeStore (one server process):
                                       float32 local − base, each at a 4 KiB-aligned offset
    edge/<task_id>/<device_id>.f32     an update recorded by an earlier layout (one file each)

How durable "accepted" is, is a setting (``POLLINATE_EDGE_DURABILITY``, read by each
EdgeStore, so the server and the gateway both follow it): ``process`` (the default) makes an
accepted update survive the kill -9 of the process that accepted it — its bytes are
write()'d to the segment (the kernel holds them) before a SQLite commit with
``synchronous=NORMAL`` (a committed WAL transaction survives the process) — with no disk
wait; ``power`` makes it survive a power cut too: the segment write is synced (O_DIRECT +
RWF_DSYNC, the folder's fsync) and the commit is ``synchronous=FULL``, two disk waits per
batch. The issue asks for the first (a gateway or server killed and restarted); a power
cut in ``process`` mode may lose the last updates accepted before it (their rows roll
back with the WAL; in this mode a row whose segment bytes did not reach the disk — a missing
or short segment — is skipped when read back, and logged).

The functions never import TensorFlow (nor numpy until they handle values: the store imports
this module for its schema): the server uses them. The validation rules (length,
finite values, L2-norm bound or clipping, example count) live here so that the server and
the gateway apply the same ones.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import math
import os
import secrets
import shutil
import sqlite3
import threading
import time
import uuid
from concurrent.futures import Future
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

from core.errors import InvalidInput, NotFound, PollinateError
from registry.answers import answer
from registry.edge_log import BufferPool, SegmentLog, Span, UpdateBody, datasync, fsync_dir, read_span

if TYPE_CHECKING:
    import numpy as np

log = logging.getLogger("pollinate.edge")

SCHEMA = """
CREATE TABLE IF NOT EXISTS edge_devices (
    device_id    TEXT PRIMARY KEY,
    model        TEXT NOT NULL,
    token_sha256 TEXT NOT NULL UNIQUE,
    kind         TEXT NOT NULL,
    enrolled_at  TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS edge_tasks (
    task_id      TEXT PRIMARY KEY,
    model        TEXT NOT NULL,
    federation   TEXT NOT NULL,
    round        INTEGER NOT NULL,
    gateway      TEXT NOT NULL,
    base_version INTEGER,
    config       TEXT NOT NULL,   -- {"epochs", "batch_size", "learning_rate"}
    weights      TEXT NOT NULL,   -- [{"name", "shape", "dtype"}, ...] in get_weights() order
    size         INTEGER NOT NULL, -- values in the flat vector
    deadline     REAL NOT NULL,    -- unix seconds
    min_updates  INTEGER NOT NULL,
    norm_bound   REAL NOT NULL,    -- L2 bound on an update; 0 = none
    clip         INTEGER NOT NULL, -- 1: clip updates over the bound instead of refusing them
    state        TEXT NOT NULL CHECK (state IN ('open', 'closed')),
    opened_at    REAL NOT NULL,
    closed_at    REAL,
    outcome      TEXT             -- what the gateway answered Flower with (JSON), once closed
);
CREATE UNIQUE INDEX IF NOT EXISTS edge_tasks_by_round ON edge_tasks (federation, round, gateway);
CREATE INDEX IF NOT EXISTS edge_tasks_open ON edge_tasks (model, state);
CREATE TABLE IF NOT EXISTS edge_updates (
    task_id     TEXT NOT NULL REFERENCES edge_tasks (task_id),
    device_id   TEXT NOT NULL REFERENCES edge_devices (device_id),
    examples    INTEGER NOT NULL,
    norm        REAL NOT NULL,
    clipped     INTEGER NOT NULL,
    received_at REAL NOT NULL,
    segment        TEXT,          -- the file in edge/<task_id>/ holding the delta (NULL: <device_id>.f32)
    segment_offset INTEGER,       -- where the delta starts in it
    segment_bytes  INTEGER,       -- its length: 4 x the task's size
    PRIMARY KEY (task_id, device_id)
);
CREATE TABLE IF NOT EXISTS edge_refusals (
    model   TEXT NOT NULL,
    round   INTEGER NOT NULL,  -- 0 when no task could be named
    reason  TEXT NOT NULL,
    count   INTEGER NOT NULL,
    PRIMARY KEY (model, round, reason)
);
"""

# Schema 6: refusals are counted per federation, so two federations of one model (one after
# the other, or side by side) each report their own. Counts from before are kept under
# federation '' (no task could tell which federation they were for).
SCHEMA_6 = """
CREATE TABLE IF NOT EXISTS edge_refusal_counts (
    model      TEXT NOT NULL,
    federation TEXT NOT NULL,  -- '' when the refusal could name no task
    round      INTEGER NOT NULL, -- 0 when no task could be named
    reason     TEXT NOT NULL,
    count      INTEGER NOT NULL,
    PRIMARY KEY (model, federation, round, reason)
);
INSERT OR IGNORE INTO edge_refusal_counts (model, federation, round, reason, count)
    SELECT model, '', round, reason, count FROM edge_refusals;
DROP TABLE IF EXISTS edge_refusals;
"""

DEVICE_KINDS = ("browser", "phone", "device", "simulated")
# Wire value types (little-endian); numpy is imported where values are handled, so that
# opening a store (registry.store imports this module for its schema) never loads it.
DTYPES = {"float32": "<f4", "float16": "<f2"}
ITEMSIZE = {"float32": 4, "float16": 2}
# Refusal reasons: the HTTP status each gets, and the word /metrics and /status count it under.
REFUSALS = {
    "unauthorized": 401,
    "unknown_model": 404,
    "unknown_task": 404,
    "stale": 409,
    "duplicate": 409,
    "too_large": 413,
    "wrong_length": 422,
    "non_finite": 422,
    "norm": 422,
    "bad_examples": 422,
    "bad_dtype": 422,
    "bad_enrolment": 422,
    "rate_limited": 429,
}
MAX_EXAMPLES = 10_000_000
# What a 202 survives (module docstring): the process's kill -9, or a power cut too.
ENV_DURABILITY = "POLLINATE_EDGE_DURABILITY"
DURABILITY_MODES = ("process", "power")
DEFAULT_DURABILITY = "process"
# How long the server trusts a task it read to be still open, to admit updates without a
# read (a closed one is refused at commit anyway); how many devices and tasks it remembers;
# for how many tasks it remembers which devices it recorded (to refuse a repeat early).
TASK_FRESH_S = 1.0
MAX_REMEMBERED = 100_000
RECENT_TASKS = 16


class EdgeRefusal(PollinateError):
    """A device request the protocol refuses: `reason` is one of REFUSALS, `status` its HTTP code."""

    def __init__(self, reason: str, detail: str, retry_after_s: float | None = None):
        super().__init__(detail)
        self.reason = reason
        self.status = REFUSALS[reason]
        self.detail = detail
        self.retry_after_s = retry_after_s  # a 429: when the client may try again


@dataclass(frozen=True)
class EdgeTask:
    task_id: str
    model: str
    federation: str
    round: int
    gateway: str
    base_version: int | None
    config: dict
    weights: list[dict]
    size: int
    deadline: float
    min_updates: int
    norm_bound: float
    clip: bool
    state: str
    opened_at: float
    accepted: int = 0
    outcome: dict | None = None

    @property
    def open(self) -> bool:
        return self.state == "open"

    def to_device(self) -> dict:
        """The task as the protocol's GET .../task answers it."""
        return {
            "task_id": self.task_id, "round": self.round, "base_version": self.base_version,
            "deadline": iso_utc(self.deadline),
            "config": dict(self.config), "weights": [dict(w) for w in self.weights],
            "size": self.size, "norm_bound": self.norm_bound or None,
        }

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Update:
    device_id: str
    examples: int
    norm: float
    clipped: bool
    delta: np.ndarray = field(repr=False)


def weights_spec(arrays: list[np.ndarray], names: list[str] | None = None) -> list[dict]:
    """[{name, shape, dtype}] for a Keras `get_weights()` list (names: the variables' paths)."""
    import numpy as np

    names = names or [f"weight_{i}" for i in range(len(arrays))]
    return [{"name": str(n), "shape": [int(d) for d in np.shape(a)], "dtype": str(np.asarray(a).dtype)}
            for n, a in zip(names, arrays)]


def flat_size(spec: list[dict]) -> int:
    return int(sum(math.prod(w["shape"]) for w in spec))


def check_update_params(dtype: object, examples: object) -> int:
    """The query of an update POST (`dtype`, `examples`): the example count, or EdgeRefusal.
    Cheap, so the server runs it before it reads a body that would be refused anyway."""
    if dtype not in DTYPES:
        raise EdgeRefusal("bad_dtype", f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    if examples is None:
        raise EdgeRefusal("bad_examples", "examples is missing: ?examples=N, the number of examples trained on")
    try:
        count = int(str(examples))
    except (TypeError, ValueError):
        raise EdgeRefusal("bad_examples", f"examples must be a whole number of training examples, got {examples!r}") from None
    if not 1 <= count <= MAX_EXAMPLES:
        raise EdgeRefusal("bad_examples", f"examples must be between 1 and {MAX_EXAMPLES}, got {count}")
    return count


def parse_update(task: EdgeTask, body: bytes, *, dtype: str = "float32", examples: object = None) -> tuple[np.ndarray, float, bool]:
    """Check one device update against its task; returns (delta as float32, its L2 norm before
    clipping, clipped?) or raises EdgeRefusal. The same rules run in the server and the gateway."""
    import numpy as np

    check_update_params(dtype, examples)
    check_length(task, len(body), dtype)
    delta = np.frombuffer(body, DTYPES[dtype])  # float32: a view of the body, no copy
    if dtype != "float32":
        delta = delta.astype(np.float32)
    norm, over = check_values(task, delta)
    if over:
        delta = (delta * np.float32(task.norm_bound / norm)).astype(np.float32)
    return delta, norm, over


def check_length(task: EdgeTask, nbytes: int, dtype: str) -> None:
    expected = task.size * ITEMSIZE[dtype]
    if nbytes != expected:
        raise EdgeRefusal("wrong_length", f"the update has {nbytes} bytes; this task takes {task.size} {dtype} "
                                          f"values ({expected} bytes), the arrays of `weights` concatenated in order")


def check_values(task: EdgeTask, delta: np.ndarray) -> tuple[float, bool]:
    """(L2 norm, over the bound and to be clipped?) of float32 values, or EdgeRefusal
    'non_finite' / 'norm'."""
    import numpy as np

    norm = l2_norm(delta)
    if not math.isfinite(norm):  # a NaN or an infinity makes the sum of squares one too
        bad = int((~np.isfinite(delta)).sum())
        raise EdgeRefusal("non_finite", f"the update holds {bad} NaN or infinite value(s)")
    if task.norm_bound > 0 and norm > task.norm_bound:
        if not task.clip:
            raise EdgeRefusal("norm", f"the update's L2 norm {norm:.4g} is over this task's bound {task.norm_bound:.4g}")
        return norm, True
    return norm, False


def l2_norm(values: np.ndarray, chunk: int = 1 << 16) -> float:
    """The L2 norm of float32 values: each cache-sized slice's sum of squares in float32
    (einsum: SIMD, no temporary, no BLAS — np.dot's threads stall for milliseconds on a busy
    machine), the slices summed in float64. 0.4 ms for a million values, within ~1e-6 of the
    exact norm. If a float32 square overflows, the exact float64 sum decides, so the result
    is finite exactly when every value is."""
    import numpy as np

    if values.size <= chunk:  # one slice (the digits CNN's 38,282 values): no loop
        total = float(np.einsum("i,i->", values, values))
        if math.isfinite(total):
            return math.sqrt(total)
    total = 0.0
    for start in range(0, values.size, chunk):
        part = values[start:start + chunk]
        total += float(np.einsum("i,i->", part, part))
    if math.isfinite(total):
        return math.sqrt(total)
    total = 0.0
    for start in range(0, values.size, chunk):
        part = values[start:start + chunk].astype(np.float64)
        total += float(np.sum(part * part))
    return math.sqrt(total)


def durability_mode(value: str | None = None) -> str:
    """`value`, else ``POLLINATE_EDGE_DURABILITY``, else the default: 'process' or 'power'."""
    mode = (value if value is not None else os.environ.get(ENV_DURABILITY) or DEFAULT_DURABILITY).strip().lower()
    if mode not in DURABILITY_MODES:
        raise InvalidInput(f"{ENV_DURABILITY} must be one of {', '.join(DURABILITY_MODES)}, got {mode!r}")
    return mode


def _no_token() -> EdgeRefusal:
    return EdgeRefusal("unauthorized", "a device token is needed: Authorization: Bearer <token> (enrol first)")


def _wrong_token(model: str) -> EdgeRefusal:
    return EdgeRefusal("unauthorized", f"this token does not belong to a device enrolled for {model!r}")


def _no_task(task_id: str, model: str) -> EdgeRefusal:
    return EdgeRefusal("unknown_task", f"no task {task_id!r} for {model!r}: fetch the current one with GET .../task")


def _duplicate(task: EdgeTask) -> EdgeRefusal:
    return EdgeRefusal("duplicate", f"this device already sent its update for task {task.task_id}")


def _hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def _fsync_write(path: Path, data) -> None:
    """Write bytes (or a contiguous array's buffer) and make them durable before returning."""
    with open(path, "wb") as handle:
        handle.write(memoryview(data).cast("B"))
        handle.flush()
        _datasync(handle.fileno())


_datasync = getattr(os, "fdatasync", os.fsync)  # the data and the size; not the access times


class EdgeStore:
    """The edge half of a Store (same SQLite file, same home).

    It remembers what cannot change once read — models (never deleted), devices (a token
    always names the same device of the same model), a task's model, size, bound and deadline,
    and a task that is closed — so that the server admits an update without a store read or a
    thread hop (``admit_known``). Whether a task is still open it trusts for ``TASK_FRESH_S``
    only, and only to refuse early: the write transaction checks it again."""

    def __init__(self, store, durability: str | None = None):
        self.store = store
        self.durability = durability_mode(durability)
        self.root = Path(store.home) / "edge"
        self.root.mkdir(parents=True, exist_ok=True)
        self._log = SegmentLog(self.root, sync=self.durability == "power")
        self._commits = GroupCommit(store, self._log, synchronous="FULL" if self.durability == "power" else "NORMAL")
        self._readers = threading.local()
        self._buffers = BufferPool()
        self._models: set[str] = set()
        self._devices: dict[str, tuple[str, str]] = {}  # token sha256 -> (device id, model)
        self._tasks: dict[str, tuple[float, EdgeTask]] = {}  # task id -> (read at, task)
        self._contributed: dict[str, set[str]] = {}  # task id -> devices this process recorded
        self._remembering = threading.Lock()
        self._upgrade_v3()

    def _upgrade_v3(self) -> None:
        """Stores made before updates went to segments (same schema version, never released)
        lack the three segment columns: add them (NULL: the update is a file of its own)."""
        with self._read() as db:
            columns = {row[1] for row in db.execute("PRAGMA table_info(edge_updates)")}
        if "segment" in columns:
            return
        with self._prompt_write() as db:
            columns = {row[1] for row in db.execute("PRAGMA table_info(edge_updates)")}
            for name, kind in (("segment", "TEXT"), ("segment_offset", "INTEGER"), ("segment_bytes", "INTEGER")):
                if name not in columns:
                    db.execute(f"ALTER TABLE edge_updates ADD COLUMN {name} {kind}")

    @contextlib.contextmanager
    def _read(self):
        """A read transaction on this thread's own connection, kept open: the device routes read
        on every request, and opening a connection (and closing the last one, which makes
        SQLite checkpoint) costs more than the reads."""
        db = getattr(self._readers, "db", None)
        if db is None:
            db = self._readers.db = _connect(self.store)
        try:
            db.execute("BEGIN")
            try:
                yield db
            finally:
                db.execute("COMMIT")  # read-only: ends the snapshot
        except sqlite3.Error as exc:
            self._readers.db = None
            with contextlib.suppress(sqlite3.Error):
                db.close()
            raise PollinateError(f"the store at {self.store.home} is unavailable: {exc}") from None

    @contextlib.contextmanager
    def _prompt_write(self):
        """A write transaction for the gateway's own moves (open, close). It asks for the lock
        every half millisecond instead of with SQLite's backoff (1 … 100 ms): while a server
        commits batch after batch of updates, the lock is free only for moments, and a round
        must close on time however many devices are posting."""
        from registry.store import BUSY_TIMEOUT_S  # registry.store imports this module

        db = _connect(self.store)
        try:
            db.execute("PRAGMA busy_timeout = 0")
            deadline = time.monotonic() + BUSY_TIMEOUT_S
            while True:
                try:
                    db.execute("BEGIN IMMEDIATE")
                    break
                except sqlite3.OperationalError as exc:
                    if "locked" not in str(exc) or time.monotonic() > deadline:
                        raise
                    time.sleep(0.0005)
            try:
                yield db
            except BaseException:
                with contextlib.suppress(sqlite3.Error):
                    db.execute("ROLLBACK")
                raise
            db.execute("COMMIT")
        except sqlite3.Error as exc:
            raise PollinateError(f"the store at {self.store.home} is unavailable: {exc}") from None
        finally:
            db.close()

    # ------------------------------------------------------------------ devices

    def require_model(self, model: str) -> str:
        """`model` if the store has a version of it, else EdgeRefusal('unknown_model') (404).
        The server checks this first, so that counters only ever name models that exist."""
        from registry.store import check_model_name  # registry.store imports this module

        try:
            check_model_name(model)
            with self._read() as db:
                self.store._require_model(db, model)
        except (InvalidInput, NotFound):
            raise EdgeRefusal("unknown_model", f"no model named {model!r}") from None
        return model

    def enrol(self, model: str, kind: str = "device") -> tuple[str, str]:
        """A new device for `model`: (device_id, token). The token is shown once, stored hashed."""
        if kind not in DEVICE_KINDS:
            kind = "device"
        device_id = uuid.uuid4().hex
        token = secrets.token_urlsafe(32)
        with self._read() as db:
            self.store._require_model(db, model)  # models are never deleted: still there below
        self._commits.run(lambda db, _batch, _span: db.execute(
            "INSERT INTO edge_devices VALUES (?, ?, ?, ?, ?)", (device_id, model, _hash_token(token), kind, _iso_now())))
        self._remember_device(_hash_token(token), (device_id, model))
        return device_id, token

    def authenticate(self, model: str, token: str | None) -> str:
        """The device id a bearer token belongs to, or EdgeRefusal('unauthorized')."""
        if not token:
            raise _no_token()
        digest = _hash_token(token)
        with self._read() as db:
            row = db.execute("SELECT device_id, model FROM edge_devices WHERE token_sha256 = ?", (digest,)).fetchone()
        if row is not None:
            self._remember_device(digest, row)  # a device asks for its task, then posts its update
        if row is None or row[1] != model:
            raise _wrong_token(model)
        return row[0]

    def device_kinds(self, device_ids: list[str]) -> dict[str, str]:
        if not device_ids:
            return {}
        with self._read() as db:
            marks = ",".join("?" * len(device_ids))
            return dict(db.execute(f"SELECT device_id, kind FROM edge_devices WHERE device_id IN ({marks})", device_ids))

    # ------------------------------------------------------------------ tasks

    def open_task(self, model: str, *, federation: str, round: int, gateway: str, base_version: int | None,
                  config: dict, weights: list[dict], base: np.ndarray, deadline: float, min_updates: int,
                  norm_bound: float, clip: bool = False) -> EdgeTask:
        """Open the task for (federation, round, gateway), or return it if it exists (a gateway that
        restarted mid-round resumes its task and every update accepted so far). Older open tasks of
        the same gateway are closed: their updates are stale."""
        import numpy as np

        base = np.ascontiguousarray(base, dtype="<f4").reshape(-1)
        if base.size != flat_size(weights):
            raise PollinateError(f"base weights hold {base.size} values, the spec {flat_size(weights)}")
        existing = self._task_of_round(model, federation, round, gateway)
        if existing is not None:
            return existing
        task_id = uuid.uuid4().hex
        folder = self.root / task_id
        folder.mkdir(parents=True, exist_ok=True)
        scratch = folder / f".base.{os.getpid()}.tmp"
        _fsync_write(scratch, base.tobytes())
        os.replace(scratch, folder / "base.f32")
        now = time.time()
        try:
            with self._prompt_write() as db:
                db.execute("UPDATE edge_tasks SET state = 'closed', closed_at = ? "
                           "WHERE model = ? AND gateway = ? AND state = 'open'", (now, model, gateway))
                db.execute(
                    "INSERT INTO edge_tasks (task_id, model, federation, round, gateway, base_version, config, weights,"
                    " size, deadline, min_updates, norm_bound, clip, state, opened_at)"
                    " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, 'open', ?)",
                    (task_id, model, federation, int(round), gateway, base_version, json.dumps(config),
                     json.dumps(weights), int(base.size), float(deadline), int(min_updates), float(norm_bound),
                     int(bool(clip)), now))
        except PollinateError:
            raise
        except sqlite3.IntegrityError:  # another process of the same gateway opened it first
            shutil.rmtree(folder, ignore_errors=True)
            return self._task_of_round(model, federation, round, gateway)
        return self.get_task(task_id)

    def _task_of_round(self, model: str, federation: str, round: int, gateway: str) -> EdgeTask | None:
        with self._read() as db:
            row = db.execute("SELECT task_id FROM edge_tasks WHERE federation = ? AND round = ? AND gateway = ?",
                             (federation, round, gateway)).fetchone()
        if row is None:
            return None
        task = self.get_task(row[0])
        if task.model != model:  # two models named the same federation: never hand one the other's task
            raise PollinateError(f"federation {federation!r} round {round} of gateway {gateway!r} is a task of "
                                 f"model {task.model!r}, not {model!r}: give each model its own federation name")
        return task

    def get_task(self, task_id: str) -> EdgeTask:
        with self._read() as db:
            row = db.execute(f"SELECT {_TASK_COLUMNS} FROM edge_tasks t WHERE task_id = ?", (str(task_id),)).fetchone()
        if row is None:
            raise NotFound(f"no task {task_id!r}")
        return _task(row)

    def task_for(self, model: str, device_id: str, now: float | None = None) -> EdgeTask | None:
        """The open task this device should work on: one it has not contributed to, before its
        deadline, the one with the fewest updates so far (several gateways share the devices)."""
        now = time.time() if now is None else now
        with self._read() as db:
            rows = db.execute(
                f"SELECT {_TASK_COLUMNS} FROM edge_tasks t WHERE model = ? AND state = 'open' AND deadline > ?"
                " AND NOT EXISTS (SELECT 1 FROM edge_updates u WHERE u.task_id = t.task_id AND u.device_id = ?)",
                (model, now, device_id)).fetchall()
        tasks = [_task(r) for r in rows]
        if not tasks:
            return None
        # newest round first; then the least served gateway; ties spread devices by a stable hash
        tasks.sort(key=lambda t: (-t.round, t.accepted, hashlib.sha256((device_id + t.gateway).encode()).digest()))
        return tasks[0]

    def base_path(self, task_id: str) -> Path:
        return self.root / task_id / "base.f32"

    def base_weights(self, task_id: str) -> np.ndarray:
        import numpy as np

        return np.fromfile(self.base_path(task_id), dtype="<f4")

    def update_body(self, task: EdgeTask, dtype: str = "float32") -> UpdateBody:
        """Page-aligned memory to read a body for `task` into (``accept`` takes it); the
        caller releases it once the answer is known."""
        return UpdateBody(self._buffers, task.size * ITEMSIZE.get(dtype, 4), capacity=task.size * 4)

    def accept(self, task_id: str, device_id: str, body, *, dtype: str = "float32",
               examples: object = None, now: float | None = None,
               task: EdgeTask | None = None) -> tuple[EdgeTask, Update]:
        """Validate and durably record one update (the whole protocol POST); EdgeRefusal otherwise.
        Every refusal that names a task is counted against its round. `task`: the task as the
        caller just read it (saves a read; its state is checked again in the write). `body`:
        bytes, or an :meth:`update_body` (then the returned delta is a view of its memory,
        valid until it is released; clipping scales it in place)."""
        if task is None or task.task_id != task_id:
            try:
                task = self.get_task(task_id)
            except NotFound:
                raise EdgeRefusal("unknown_task", f"no task {task_id!r}: fetch the current one with GET .../task") from None
        own = not isinstance(body, UpdateBody)
        if own:
            body = UpdateBody.of(self._buffers, body, capacity=task.size * 4)
        try:
            try:
                update = self._check(task, device_id, body, dtype, examples)
                accepted, update = self._record(task, update, body, now).future.result()
            except EdgeRefusal as refusal:
                self.count_refusal(task.model, refusal.reason, task.round, task.federation)
                raise
            self._recorded(task, device_id)
            if own:  # the caller keeps no buffer: give it values of its own
                update = replace(update, delta=update.delta.copy())
        finally:
            if own:
                body.release()
        # `accepted` was counted inside the transaction that recorded this update
        return replace(task, accepted=accepted), update

    async def accept_async(self, task: EdgeTask, device_id: str, body: UpdateBody, *, dtype: str = "float32",
                           examples: object = None) -> tuple[int, Update, list[float]]:
        """``accept`` for an event loop (the server's update route): the checks, the append,
        fdatasync and commit run on the store's committer thread, together with whatever else
        arrived meanwhile, and the loop is woken once the batch is durable. No thread of the
        pool is held while it waits, and the loop itself does no numpy: numpy lets go of the
        GIL, and on a busy machine getting it back from the committer can take milliseconds."""
        loop = asyncio.get_running_loop()
        pending = self._record(task, None, body, None, loop=loop,
                               check=lambda: self._check(task, device_id, body, dtype, examples))
        try:
            accepted, update = await pending.future
        except EdgeRefusal as refusal:
            with contextlib.suppress(PollinateError):
                await self._commits.submit(_refusal_count(task.model, refusal.reason, task.round, task.federation),
                                           loop=loop).future
            raise
        self._recorded(task, device_id)
        return accepted, update, pending.times

    def _check(self, task: EdgeTask, device_id: str, body: UpdateBody, dtype: str, examples: object,
               now: float | None = None) -> Update:
        """Every check of an update that needs no store (CPU only); its values, widened to
        float32 and clipped in place in the body's memory."""
        import numpy as np

        self._check_open(task, time.time() if now is None else now)
        count = check_update_params(dtype, examples)
        check_length(task, body.length, dtype)
        delta = np.frombuffer(body.memory, "<f4", count=task.size)  # writable: the body's own memory
        if dtype != "float32":  # widen in place, from a copy of the narrow values
            np.copyto(delta, np.frombuffer(body.memory, DTYPES[dtype], count=task.size).copy())
        norm, clipped = check_values(task, delta)
        if clipped:
            delta *= np.float32(task.norm_bound / norm)
        if device_id in self._contributed.get(task.task_id, ()):
            raise _duplicate(task)
        return Update(device_id, count, norm, clipped, delta)

    def _record(self, task: EdgeTask, update: Update | None, body: UpdateBody, now: float | None,
                check=None, loop: asyncio.AbstractEventLoop | None = None) -> _Pending:
        """Queue the update for the committer: checked (``check``, when `update` is None),
        appended, made durable and counted in one transaction with the others of its batch.
        The future's result: (the task's count, the update)."""
        now = time.time() if now is None else now
        checked = [update]

        def prepare() -> None:
            checked[0] = check()

        def record(db: sqlite3.Connection, batch: dict, span: Span) -> tuple[int, Update]:
            update = checked[0]
            device_id = update.device_id
            state = batch.get(("state", task.task_id))
            if state is None:
                state = batch[("state", task.task_id)] = db.execute(
                    "SELECT state FROM edge_tasks WHERE task_id = ?", (task.task_id,)).fetchone()[0]
            if state != "open":
                self._forget_task(task.task_id)
                raise EdgeRefusal("stale", f"task {task.task_id} (round {task.round}) closed while this update "
                                           "arrived: fetch the current task")
            inserted = db.execute("INSERT OR IGNORE INTO edge_updates VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                                  (task.task_id, device_id, update.examples, update.norm, int(update.clipped), now,
                                   span.name, span.offset, span.nbytes)).rowcount
            if not inserted:  # the primary key (task, device) is taken
                raise _duplicate(task)
            count = batch.get(("count", task.task_id))  # the task's rows so far, this one included
            if count is None:
                count = int(db.execute("SELECT COUNT(*) FROM edge_updates WHERE task_id = ?",
                                       (task.task_id,)).fetchone()[0])
            else:
                count += 1
            batch[("count", task.task_id)] = count
            return count, update

        return self._commits.submit(record, append=(task.task_id, body, task.size * 4),
                                    prepare=prepare if update is None else None, loop=loop)

    def _recorded(self, task: EdgeTask, device_id: str) -> None:
        with self._remembering:
            self._contributed.setdefault(task.task_id, set()).add(device_id)
            while len(self._contributed) > RECENT_TASKS:  # the oldest task first (insertion order)
                del self._contributed[next(iter(self._contributed))]

    def _forget_task(self, task_id: str) -> None:
        """This task is closed for good: remember that, and forget which devices it had. (Its
        segment's offset counter stays: a fresh one would write over recorded updates.)"""
        cached = self._tasks.get(task_id)
        if cached is not None and cached[1].open:
            self._tasks[task_id] = (cached[0], replace(cached[1], state="closed"))
        with self._remembering:
            self._contributed.pop(task_id, None)

    def admit(self, model: str, token: str | None, task_id: str) -> tuple[str, EdgeTask]:
        """(device id, task) for a device request that names a task, in one read: EdgeRefusal
        'unknown_model', then 'unauthorized', then 'unknown_task' (the order a client fixes
        them in). What it reads is remembered for ``admit_known``."""
        from registry.store import check_model_name  # registry.store imports this module

        try:
            check_model_name(model)
        except InvalidInput:
            raise EdgeRefusal("unknown_model", f"no model named {model!r}") from None
        digest = _hash_token(token) if token else None
        with self._read() as db:
            if db.execute("SELECT 1 FROM versions WHERE model = ? LIMIT 1", (model,)).fetchone() is None:
                raise EdgeRefusal("unknown_model", f"no model named {model!r}")
            device = None
            if token:
                device = db.execute("SELECT device_id, model FROM edge_devices WHERE token_sha256 = ?",
                                    (digest,)).fetchone()
            row = db.execute(f"SELECT {_TASK_COLUMNS} FROM edge_tasks t WHERE task_id = ?", (str(task_id),)).fetchone()
        self._models.add(model)
        if not token:
            raise _no_token()
        if device is not None:
            self._remember_device(digest, device)
        if device is None or device[1] != model:
            raise _wrong_token(model)
        if row is None or row[1] != model:
            raise _no_task(task_id, model)
        task = _task(row)
        self._remember_task(task)
        return device[0], task

    def admit_known(self, model: str, token: str | None, task_id: str, now: float | None = None
                    ) -> tuple[str, EdgeTask] | None:
        """``admit`` from what this process already read — no I/O, so the server calls it on
        its event loop — for a request that would pass every check that needs no body: a
        known model, device and task, the task open (as read within ``TASK_FRESH_S``) and
        before its deadline, and no update of this device recorded here already. None
        otherwise: ``admit`` then reads the store (and refuses, counted)."""
        if not token or model not in self._models:
            return None
        device = self._devices.get(_hash_token(token))
        cached = self._tasks.get(task_id)
        if device is None or device[1] != model or cached is None:
            return None
        read_at, task = cached
        now = time.time() if now is None else now
        if (task.model != model or not task.open or now - read_at > TASK_FRESH_S or now > task.deadline
                or device[0] in self._contributed.get(task_id, ())):
            return None
        return device[0], task

    def _remember_device(self, digest: str, device: tuple[str, str]) -> None:
        if len(self._devices) >= MAX_REMEMBERED:
            self._devices.clear()
        self._devices[digest] = (device[0], device[1])

    def _remember_task(self, task: EdgeTask) -> None:
        if len(self._tasks) >= MAX_REMEMBERED:
            self._tasks.clear()
        self._tasks[task.task_id] = (time.time(), task)

    def device_task(self, model: str, task_id: str) -> EdgeTask:
        """The task a device names in a URL, or EdgeRefusal('unknown_task') when there is none
        of that id for this model."""
        try:
            task = self.get_task(task_id)
        except NotFound:
            task = None
        if task is None or task.model != model:
            raise _no_task(task_id, model)
        return task

    def check_open(self, task: EdgeTask, now: float | None = None) -> None:
        """EdgeRefusal('stale') unless the task is open and before its deadline."""
        self._check_open(task, time.time() if now is None else now)

    def _check_open(self, task: EdgeTask, now: float) -> None:
        if not task.open:
            raise EdgeRefusal("stale", f"task {task.task_id} is round {task.round}, which is closed: fetch the current task")
        if now > task.deadline:
            raise EdgeRefusal("stale", f"task {task.task_id} passed its deadline: fetch the current task")

    def updates(self, task_id: str) -> list[Update]:
        """Every accepted update of a task, in arrival order (the gateway aggregates these)."""
        with self._read() as db:
            rows = db.execute("SELECT device_id, examples, norm, clipped, segment, segment_offset, segment_bytes"
                              " FROM edge_updates WHERE task_id = ? ORDER BY received_at, device_id",
                              (task_id,)).fetchall()
        import numpy as np

        folder = self.root / task_id
        out = []
        with contextlib.ExitStack() as files:
            handles: dict[str, object] = {}
            for device_id, examples, norm, clipped, segment, offset, nbytes in rows:
                if segment is None:  # recorded as a file of its own (the earlier layout)
                    delta = np.fromfile(folder / f"{device_id}.f32", dtype="<f4")
                else:
                    delta = np.empty(int(nbytes) // 4, "<f4")
                    try:
                        if segment not in handles:
                            handles[segment] = files.enter_context(open(folder / segment, "rb"))
                        read_span(handles[segment], int(offset), int(nbytes), delta)
                    except OSError as exc:
                        if self.durability == "power":
                            raise
                        # durability 'process' after a power cut: the row outlived its bytes
                        log.warning("update of device %s in task %s skipped: its bytes were lost (%s)",
                                    device_id, task_id, exc)
                        continue
                out.append(Update(device_id, int(examples), float(norm), bool(clipped), delta))
        return out

    def accepted(self, task_id: str) -> int:
        with self._read() as db:
            return int(db.execute("SELECT COUNT(*) FROM edge_updates WHERE task_id = ?", (task_id,)).fetchone()[0])

    def close_task(self, task_id: str, outcome: dict | None = None) -> EdgeTask:
        """Close a task (later updates for it are stale) and record what the gateway answered."""
        with self._prompt_write() as db:
            db.execute("UPDATE edge_tasks SET state = 'closed', closed_at = COALESCE(closed_at, ?),"
                       " outcome = COALESCE(?, outcome) WHERE task_id = ?",
                       (time.time(), json.dumps(outcome) if outcome is not None else None, task_id))
        return self.get_task(task_id)

    def discard_files(self, task_id: str) -> None:
        """Free a closed task's update files once its round is aggregated (rows stay: the record)."""
        self._forget_task(task_id)
        shutil.rmtree(self.root / task_id, ignore_errors=True)
        self._log.forget(task_id)  # the folder is gone: an append now fails instead of recreating it

    # ------------------------------------------------------------------ status and counters

    def count_refusal(self, model: str, reason: str, round: int = 0, federation: str = "") -> None:
        """Count one refusal: under the task's federation and round when the request named a
        task, else under federation '' and round 0 (no task could say which federation it was for)."""
        with contextlib.suppress(PollinateError):
            self._commits.run(_refusal_count(model, reason, round, federation))

    def status(self, model: str) -> dict:
        """The model's current federation and round (those of the task opened last): {round,
        federation, open, accepted, refused{reason: count}, refused_total{reason: count},
        refused_unattributed{reason: count}, tasks[...]}.

        ``refused`` counts this round's refusals and ``refused_total`` every round's, of this
        federation only: another federation of the same model (an earlier one, or one beside it)
        never shows here. Refusals that could name no task (a wrong token, an unknown task, a bad
        or rate-limited enrolment; and counts kept from before schema 6, which recorded no
        federation) cannot be told apart by federation: they are ``refused_unattributed``, over
        the model's life, so that a refused client always finds itself counted somewhere."""
        with self._read() as db:
            row = db.execute("SELECT federation, round FROM edge_tasks WHERE model = ?"
                             " ORDER BY opened_at DESC, round DESC LIMIT 1", (model,)).fetchone()
            federation, current = row if row is not None else (None, None)
            counts = db.execute("SELECT federation, round, reason, count FROM edge_refusal_counts"
                                " WHERE model = ? AND federation IN (?, '')", (model, federation or "")).fetchall()
            tasks = [] if row is None else [_task(r) for r in db.execute(
                f"SELECT {_TASK_COLUMNS} FROM edge_tasks t WHERE model = ? AND federation = ? AND round = ?"
                " ORDER BY gateway", (model, federation, current))]
        refused: dict[str, int] = {}
        total: dict[str, int] = {}
        unattributed: dict[str, int] = {}
        for fed, rnd, reason, count in counts:
            if fed == "":
                unattributed[reason] = unattributed.get(reason, 0) + int(count)
                continue
            total[reason] = total.get(reason, 0) + int(count)
            if rnd == current:
                refused[reason] = refused.get(reason, 0) + int(count)
        now = time.time()
        return {
            "round": None if current is None else int(current),
            "federation": federation,
            "open": any(t.open and t.deadline > now for t in tasks),
            "accepted": sum(t.accepted for t in tasks),
            "refused": dict(sorted(refused.items())),
            "refused_total": dict(sorted(total.items())),
            "refused_unattributed": dict(sorted(unattributed.items())),
            "tasks": [{"task_id": t.task_id, "gateway": t.gateway, "open": t.open, "accepted": t.accepted,
                       "min_updates": t.min_updates,
                       "deadline": iso_utc(t.deadline)}
                      for t in tasks],
        }


def _refusal_count(model: str, reason: str, round: int, federation: str = ""):
    def count(db: sqlite3.Connection, _batch: dict, _span: None) -> None:
        db.execute("INSERT INTO edge_refusal_counts VALUES (?, ?, ?, ?, 1) ON CONFLICT (model, federation, round, reason)"
                   " DO UPDATE SET count = count + 1", (model, federation, int(round), reason))

    return count


class _Pending:
    """One piece of work queued for the committer, and how its writer hears back: a
    concurrent future (a thread waits on it) or an asyncio future of `loop` (resolved on the
    loop, a whole batch's in one call)."""

    __slots__ = ("work", "append", "prepare", "span", "future", "loop", "times", "finished")

    def __init__(self, work, append=None, prepare=None, loop: asyncio.AbstractEventLoop | None = None):
        self.work, self.append, self.prepare, self.loop = work, append, prepare, loop
        self.span: Span | None = None
        if loop is None:
            self.future = Future()
            self.future.set_running_or_notify_cancel()  # in the committer's hands: it cannot be called off
        else:
            self.future = loop.create_future()  # called from the loop's own thread
        # perf_counter() when it was queued, its batch started, appended, synced, committed
        self.times = [time.perf_counter()]
        self.finished = False  # the committer is done with it (and with the memory of its body)
        if append is not None:
            append[1].busy = self  # its memory is not reused before the committer is done


class GroupCommit:
    """Writes that arrive together share one pwritev per segment (durable as it returns) and
    one SQLite transaction (so one fsync of its log), on one committer thread.

    Without it, concurrent device updates each take the write lock in turn and SQLite's busy
    handler makes the waiting ones sleep (1, 2, 5 … 100 ms): a few dozen updates per second
    on a machine that fsyncs in 2 ms. Here writers queue their work and the committer takes
    everything queued: checks the updates, appends their bytes to their segments (one system
    call per segment) and makes them durable (the folder too when a segment is new) *before*
    taking the write lock, runs each piece of work in one ``BEGIN IMMEDIATE`` transaction,
    commits, and only then tells each writer its own result — an event loop once per batch.
    So a 202 still means durable, no row can name bytes that are not on disk, and a busy
    server wakes one thread per batch, not one per update. (A second thread committing one
    batch while the next is written cost more CPU in hand-offs than it saved in waiting.)
    One per EdgeStore (per process); across processes SQLite's lock still serialises. The
    thread stops when idle and starts again with the next write.

    A piece of work is `work(db, batch, span)`: `batch` is a dict the pieces of one
    transaction share (what one read that the others need not read again), `span` where its
    bytes were appended (None without). It must check before it writes: one that raises
    EdgeRefusal or OSError is refused alone and the others commit, so it must not have
    written anything by then."""

    IDLE_S = 10.0

    def __init__(self, store, log: SegmentLog | None = None, synchronous: str = "FULL"):
        self.store = store
        self.log = log
        self.synchronous = synchronous  # of its commits: FULL (a power cut) or NORMAL (a process kill)
        self._cond = threading.Condition(threading.Lock())
        self._queue: list[_Pending] = []
        self._thread: threading.Thread | None = None
        self._db: sqlite3.Connection | None = None  # only the committer uses it

    def _connection(self) -> sqlite3.Connection:
        """One connection kept open for this process's edge writes. The store opens one per
        transaction; when the last one closes, SQLite checkpoints and truncates the log (more
        fsyncs per update than the update itself). Kept open, it checkpoints as it goes."""
        if self._db is None:
            self._db = _connect(self.store, check_same_thread=False)
            if self.synchronous != "FULL":  # WAL + NORMAL: committed survives a kill -9, not a power cut
                self._db.execute(f"PRAGMA synchronous = {self.synchronous}")
        return self._db

    @contextlib.contextmanager
    def _transaction(self):
        db = self._connection()
        try:
            db.execute("BEGIN IMMEDIATE")
            try:
                yield db
            except BaseException:
                with contextlib.suppress(sqlite3.Error):
                    db.execute("ROLLBACK")
                raise
            db.execute("COMMIT")
        except sqlite3.Error as exc:
            self._db = None  # start afresh next time
            with contextlib.suppress(sqlite3.Error):
                db.close()
            raise PollinateError(f"the store at {self.store.home} is unavailable: {exc}") from None

    def submit(self, work, append: tuple[str, UpdateBody, int] | None = None, prepare=None,
               loop: asyncio.AbstractEventLoop | None = None) -> _Pending:
        """Queue `work` (after `prepare()`, then appending `append` = (task id, body, bytes)
        to the task's segment); its `future` gets its result once committed, or its error.
        With `loop` (the caller's, running) that future is the loop's."""
        pending = _Pending(work, append, prepare, loop)
        with self._cond:
            self._queue.append(pending)
            if self._thread is None:
                self._thread = threading.Thread(target=self._serve, name="pollinate-edge-commit", daemon=True)
                self._thread.start()
            else:
                self._cond.notify()
        return pending

    def run(self, work):
        """`work(db, batch, None)` inside a shared write transaction; its result once committed."""
        return self.submit(work).future.result()

    def _serve(self) -> None:
        while True:
            with self._cond:
                if not self._queue:
                    self._cond.wait(self.IDLE_S)
                    if not self._queue:
                        self._thread = None
                        return
                batch, self._queue = self._queue, []
            try:
                self._commit(batch)
            except BaseException as exc:  # noqa: BLE001 - whatever happens, every writer hears of it
                _answer(batch, {p: PollinateError(f"the edge commit failed: {exc}") for p in batch}, {})

    def _commit(self, batch: list[_Pending]) -> None:
        times = [time.perf_counter()]
        failed: dict[_Pending, BaseException] = {}
        for pending in batch:
            if pending.prepare is not None:
                try:
                    pending.prepare()
                except EdgeRefusal as refusal:
                    failed[pending] = refusal
        durable: set[Path] = set()  # segments written with RWF_DSYNC: no fdatasync to add
        self._append(batch, failed, durable)
        times.append(time.perf_counter())
        synced: dict[Path, OSError | None] = {}
        for pending in batch if self.log is not None and self.log.sync else ():
            # each segment and new folder once, before the lock: others read meanwhile
            if pending.span is None or pending in failed:
                continue
            paths = [] if pending.span.path in durable else [(pending.span.path, datasync)]
            if self.log.needs_link(pending.span.path):
                paths.append((pending.span.path.parent, fsync_dir))
            for path, sync in paths:
                if path not in synced:
                    try:
                        sync(path)
                        synced[path] = None
                    except OSError as exc:
                        synced[path] = exc
                if synced[path] is not None:
                    failed[pending] = synced[path]
        for pending in batch:
            if pending.span is not None and synced.get(pending.span.path.parent, True) is None:
                self.log.linked(pending.span.path)  # its folder was synced: its name is on disk
        times.append(time.perf_counter())
        results: dict[_Pending, object] = {}
        try:
            with self._transaction() as db:
                shared: dict = {}
                for pending in batch:
                    if pending in failed:
                        continue
                    try:
                        results[pending] = pending.work(db, shared, pending.span)
                    except (EdgeRefusal, OSError) as exc:
                        failed[pending] = exc
        except BaseException as exc:  # the transaction rolled back: nothing in it was recorded
            for pending in batch:
                if not isinstance(failed.get(pending), EdgeRefusal):  # each writer raises its own copy
                    failed[pending] = PollinateError(str(exc)) if isinstance(exc, PollinateError) else exc
            results.clear()
            if not isinstance(exc, Exception):
                raise
        finally:
            times.append(time.perf_counter())
            for pending in batch:
                pending.times += times
            _answer(batch, failed, results)

    def _append(self, batch: list[_Pending], failed: dict, durable: set[Path]) -> None:
        """Each task's bytes of the batch in one pwritev to this writer's segment (`durable`:
        the segments whose write was durable already)."""
        by_task: dict[str, list[_Pending]] = {}
        for pending in batch:
            if pending.append is not None and pending not in failed:
                by_task.setdefault(pending.append[0], []).append(pending)
        for task_id, pendings in by_task.items():
            try:
                spans, synced = self.log.append(task_id, [(p.append[1], p.append[2]) for p in pendings])
            except FileNotFoundError:  # the gateway discarded the files of this (closed) round
                for pending in pendings:
                    failed[pending] = EdgeRefusal("stale", f"task {task_id} is over: fetch the current task")
            except OSError as exc:
                for pending in pendings:
                    failed[pending] = exc
            else:
                for pending, span in zip(pendings, spans):
                    pending.span = span
                if synced:
                    durable.add(spans[0].path)


def _answer(batch: list[_Pending], failed: dict, results: dict) -> None:
    for pending in batch:
        pending.finished = True
    answer(batch, failed, results, what="edge")


def _connect(store, check_same_thread: bool = True) -> sqlite3.Connection:
    """A connection set up as the store sets up its own (registry/store.py `_connect`)."""
    from registry.store import BUSY_TIMEOUT_S  # registry.store imports this module

    db = sqlite3.connect(store.db_path, timeout=BUSY_TIMEOUT_S, isolation_level=None,
                         check_same_thread=check_same_thread)
    db.execute(f"PRAGMA busy_timeout = {int(BUSY_TIMEOUT_S * 1000)}")
    db.execute("PRAGMA foreign_keys = ON")
    db.execute("PRAGMA synchronous = FULL")  # as the store (the committer's own follows the durability mode)
    return db


_TASK_COLUMNS = ("task_id, model, federation, round, gateway, base_version, config, weights, size, deadline,"
                 " min_updates, norm_bound, clip, state, opened_at,"
                 " (SELECT COUNT(*) FROM edge_updates u WHERE u.task_id = t.task_id), outcome")


def _task(row) -> EdgeTask:
    (task_id, model, federation, rnd, gateway, base_version, config, weights, size, deadline,
     min_updates, norm_bound, clip, state, opened_at, accepted, outcome) = row
    return EdgeTask(task_id, model, federation, int(rnd), gateway, base_version, json.loads(config),
                    json.loads(weights), int(size), float(deadline), int(min_updates), float(norm_bound),
                    bool(clip), state, float(opened_at), int(accepted), json.loads(outcome) if outcome else None)


def iso_utc(seconds: float) -> str:
    """Unix seconds as ISO 8601 UTC with a Z (what the protocol's `deadline` holds)."""
    return datetime.fromtimestamp(seconds, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _iso_now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")
