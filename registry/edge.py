"""Edge rounds in the store: enrolled devices, open tasks and the updates devices sent.

An *edge gateway* (a Flower SuperNode, see ``federated/gateway.py``) turns a Flower round
into a *task* that devices (browsers, phones) fetch over HTTP from ``pollinate serve``
(``server/routers/federations.py``). Both processes meet here, in the store, so that either
can be killed with -9 and restarted without losing an accepted update or counting one twice:

- a device's token is stored as its sha256, never in clear;
- an update is accepted in two steps: its float32 delta is written to a temp file and
  fsynced; then one ``BEGIN IMMEDIATE`` transaction checks that the task is still open and
  that this device has not contributed to it, renames the file into place and inserts the
  row. The 202 goes out only after the commit. A writer killed before the commit leaves a
  file nothing points to (the device gets no 202 and may retry); one killed after it has
  counted the update exactly once (the primary key is (task, device));
- a gateway that restarts in the middle of a round re-opens the *same* task (keyed by
  federation, round and gateway name) and finds every update accepted so far.

Layout under the store's home::

    edge/<task_id>/base.f32            the task's base weights (flat little-endian float32)
    edge/<task_id>/<device_id>.f32     one accepted update (local − base, float32)

The functions never import TensorFlow: the server uses them. The validation rules (length,
finite values, L2-norm bound or clipping, example count) live here so that the server and
the gateway apply the same ones.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import secrets
import shutil
import sqlite3
import time
import uuid
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

from core.errors import InvalidInput, NotFound, PollinateError

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

DEVICE_KINDS = ("browser", "phone", "device", "simulated")
DTYPES = {"float32": np.dtype("<f4"), "float16": np.dtype("<f2")}
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
}
MAX_EXAMPLES = 10_000_000


class EdgeRefusal(PollinateError):
    """A device request the protocol refuses: `reason` is one of REFUSALS, `status` its HTTP code."""

    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason = reason
        self.status = REFUSALS[reason]
        self.detail = detail


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
    check_update_params(dtype, examples)
    width = DTYPES[dtype].itemsize
    expected = task.size * width
    if len(body) != expected:
        raise EdgeRefusal("wrong_length", f"the update has {len(body)} bytes; this task takes {task.size} {dtype} "
                                          f"values ({expected} bytes), the arrays of `weights` concatenated in order")
    delta = np.frombuffer(body, DTYPES[dtype]).astype(np.float32)
    if not np.isfinite(delta).all():
        bad = int((~np.isfinite(delta)).sum())
        raise EdgeRefusal("non_finite", f"the update holds {bad} NaN or infinite value(s)")
    norm = float(np.sqrt(np.dot(delta.astype(np.float64), delta.astype(np.float64))))
    clipped = False
    if task.norm_bound > 0 and norm > task.norm_bound:
        if not task.clip:
            raise EdgeRefusal("norm", f"the update's L2 norm {norm:.4g} is over this task's bound {task.norm_bound:.4g}")
        delta = (delta * (task.norm_bound / norm)).astype(np.float32)
        clipped = True
    return delta, norm, clipped


def _hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def _fsync_write(path: Path, data: bytes) -> None:
    with open(path, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())


class EdgeStore:
    """The edge half of a Store (same SQLite file, same home)."""

    def __init__(self, store):
        self.store = store
        self.root = Path(store.home) / "edge"
        self.root.mkdir(parents=True, exist_ok=True)

    # ------------------------------------------------------------------ devices

    def require_model(self, model: str) -> str:
        """`model` if the store has a version of it, else EdgeRefusal('unknown_model') (404).
        The server checks this first, so that counters only ever name models that exist."""
        from registry.store import check_model_name  # registry.store imports this module

        try:
            check_model_name(model)
            with self.store._read() as db:
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
        with self.store._write() as db:
            self.store._require_model(db, model)
            db.execute("INSERT INTO edge_devices VALUES (?, ?, ?, ?, ?)",
                       (device_id, model, _hash_token(token), kind, _iso_now()))
        return device_id, token

    def authenticate(self, model: str, token: str | None) -> str:
        """The device id a bearer token belongs to, or EdgeRefusal('unauthorized')."""
        if not token:
            raise EdgeRefusal("unauthorized", "a device token is needed: Authorization: Bearer <token> (enrol first)")
        with self.store._read() as db:
            row = db.execute("SELECT device_id, model FROM edge_devices WHERE token_sha256 = ?",
                             (_hash_token(token),)).fetchone()
        if row is None or row[1] != model:
            raise EdgeRefusal("unauthorized", f"this token does not belong to a device enrolled for {model!r}")
        return row[0]

    def device_kinds(self, device_ids: list[str]) -> dict[str, str]:
        if not device_ids:
            return {}
        with self.store._read() as db:
            marks = ",".join("?" * len(device_ids))
            return dict(db.execute(f"SELECT device_id, kind FROM edge_devices WHERE device_id IN ({marks})", device_ids))

    # ------------------------------------------------------------------ tasks

    def open_task(self, model: str, *, federation: str, round: int, gateway: str, base_version: int | None,
                  config: dict, weights: list[dict], base: np.ndarray, deadline: float, min_updates: int,
                  norm_bound: float, clip: bool = False) -> EdgeTask:
        """Open the task for (federation, round, gateway), or return it if it exists (a gateway that
        restarted mid-round resumes its task and every update accepted so far). Older open tasks of
        the same gateway are closed: their updates are stale."""
        base = np.ascontiguousarray(base, dtype="<f4").reshape(-1)
        if base.size != flat_size(weights):
            raise PollinateError(f"base weights hold {base.size} values, the spec {flat_size(weights)}")
        with self.store._read() as db:
            row = db.execute("SELECT task_id FROM edge_tasks WHERE federation = ? AND round = ? AND gateway = ?",
                             (federation, round, gateway)).fetchone()
        if row is not None:
            return self.get_task(row[0])
        task_id = uuid.uuid4().hex
        folder = self.root / task_id
        folder.mkdir(parents=True, exist_ok=True)
        scratch = folder / f".base.{os.getpid()}.tmp"
        _fsync_write(scratch, base.tobytes())
        os.replace(scratch, folder / "base.f32")
        now = time.time()
        try:
            with self.store._write() as db:
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
            with self.store._read() as db:
                row = db.execute("SELECT task_id FROM edge_tasks WHERE federation = ? AND round = ? AND gateway = ?",
                                 (federation, round, gateway)).fetchone()
            return self.get_task(row[0])
        return self.get_task(task_id)

    def get_task(self, task_id: str) -> EdgeTask:
        with self.store._read() as db:
            row = db.execute(f"SELECT {_TASK_COLUMNS} FROM edge_tasks t WHERE task_id = ?", (str(task_id),)).fetchone()
        if row is None:
            raise NotFound(f"no task {task_id!r}")
        return _task(row)

    def task_for(self, model: str, device_id: str, now: float | None = None) -> EdgeTask | None:
        """The open task this device should work on: one it has not contributed to, before its
        deadline, the one with the fewest updates so far (several gateways share the devices)."""
        now = time.time() if now is None else now
        with self.store._read() as db:
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
        return np.fromfile(self.base_path(task_id), dtype="<f4")

    def accept(self, task_id: str, device_id: str, body: bytes, *, dtype: str = "float32",
               examples: object = None, now: float | None = None) -> tuple[EdgeTask, Update]:
        """Validate and durably record one update (the whole protocol POST); EdgeRefusal otherwise.
        Every refusal that names a task is counted against its round."""
        try:
            task = self.get_task(task_id)
        except NotFound:
            raise EdgeRefusal("unknown_task", f"no task {task_id!r}: fetch the current one with GET .../task") from None
        try:
            update, accepted = self._accept(task, device_id, body, dtype, examples, now)
        except EdgeRefusal as refusal:
            self.count_refusal(task.model, refusal.reason, task.round)
            raise
        # `accepted` was counted inside the transaction that recorded this update
        return replace(task, accepted=accepted), update

    def _accept(self, task: EdgeTask, device_id: str, body: bytes, dtype: str, examples: object,
                now: float | None) -> tuple[Update, int]:
        now = time.time() if now is None else now
        self._check_open(task, now)
        delta, norm, clipped = parse_update(task, body, dtype=dtype, examples=examples)
        folder = self.root / task.task_id
        folder.mkdir(parents=True, exist_ok=True)
        scratch = folder / f".{device_id}.{uuid.uuid4().hex}.tmp"
        _fsync_write(scratch, delta.astype("<f4").tobytes())
        try:
            with self.store._write() as db:
                state, = db.execute("SELECT state FROM edge_tasks WHERE task_id = ?", (task.task_id,)).fetchone()
                if state != "open":
                    raise EdgeRefusal("stale", f"task {task.task_id} (round {task.round}) closed while this update "
                                               "arrived: fetch the current task")
                if db.execute("SELECT 1 FROM edge_updates WHERE task_id = ? AND device_id = ?",
                              (task.task_id, device_id)).fetchone():
                    raise EdgeRefusal("duplicate", f"this device already sent its update for task {task.task_id}")
                os.replace(scratch, folder / f"{device_id}.f32")
                db.execute("INSERT INTO edge_updates VALUES (?, ?, ?, ?, ?, ?)",
                           (task.task_id, device_id, int(examples), norm, int(clipped), now))
                accepted, = db.execute("SELECT COUNT(*) FROM edge_updates WHERE task_id = ?",
                                       (task.task_id,)).fetchone()
        finally:
            with contextlib.suppress(FileNotFoundError):
                scratch.unlink()
        return Update(device_id, int(examples), norm, clipped, delta), int(accepted)

    def device_task(self, model: str, task_id: str) -> EdgeTask:
        """The task a device names in a URL, or EdgeRefusal('unknown_task') when there is none
        of that id for this model."""
        try:
            task = self.get_task(task_id)
        except NotFound:
            task = None
        if task is None or task.model != model:
            raise EdgeRefusal("unknown_task", f"no task {task_id!r} for {model!r}: fetch the current one with GET .../task")
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
        with self.store._read() as db:
            rows = db.execute("SELECT device_id, examples, norm, clipped FROM edge_updates WHERE task_id = ?"
                              " ORDER BY received_at, device_id", (task_id,)).fetchall()
        out = []
        for device_id, examples, norm, clipped in rows:
            delta = np.fromfile(self.root / task_id / f"{device_id}.f32", dtype="<f4")
            out.append(Update(device_id, int(examples), float(norm), bool(clipped), delta))
        return out

    def accepted(self, task_id: str) -> int:
        with self.store._read() as db:
            return int(db.execute("SELECT COUNT(*) FROM edge_updates WHERE task_id = ?", (task_id,)).fetchone()[0])

    def close_task(self, task_id: str, outcome: dict | None = None) -> EdgeTask:
        """Close a task (later updates for it are stale) and record what the gateway answered."""
        with self.store._write() as db:
            db.execute("UPDATE edge_tasks SET state = 'closed', closed_at = COALESCE(closed_at, ?),"
                       " outcome = COALESCE(?, outcome) WHERE task_id = ?",
                       (time.time(), json.dumps(outcome) if outcome is not None else None, task_id))
        return self.get_task(task_id)

    def discard_files(self, task_id: str) -> None:
        """Free a closed task's update files once its round is aggregated (rows stay: the record)."""
        shutil.rmtree(self.root / task_id, ignore_errors=True)

    # ------------------------------------------------------------------ status and counters

    def count_refusal(self, model: str, reason: str, round: int = 0) -> None:
        with contextlib.suppress(PollinateError), self.store._write() as db:
            db.execute("INSERT INTO edge_refusals VALUES (?, ?, ?, 1) ON CONFLICT (model, round, reason)"
                       " DO UPDATE SET count = count + 1", (model, int(round), reason))

    def status(self, model: str) -> dict:
        """The model's current round (that of the task opened last): {round, open, accepted,
        refused{reason: count}, refused_total{reason: count}, tasks[...]}.

        `refused` counts this round's refusals plus those that could name no round (401, 404:
        counted under round 0), so a client that was refused always sees itself counted;
        `refused_total` is every refusal the model ever had."""
        with self.store._read() as db:
            row = db.execute("SELECT federation, round FROM edge_tasks WHERE model = ?"
                             " ORDER BY opened_at DESC, round DESC LIMIT 1", (model,)).fetchone()
            counts = db.execute("SELECT round, reason, count FROM edge_refusals WHERE model = ?", (model,)).fetchall()
            federation, current = row if row is not None else (None, None)
            tasks = [] if row is None else [_task(r) for r in db.execute(
                f"SELECT {_TASK_COLUMNS} FROM edge_tasks t WHERE model = ? AND federation = ? AND round = ?"
                " ORDER BY gateway", (model, federation, current))]
        refused: dict[str, int] = {}
        total: dict[str, int] = {}
        for rnd, reason, count in counts:
            total[reason] = total.get(reason, 0) + int(count)
            if rnd == 0 or rnd == current:
                refused[reason] = refused.get(reason, 0) + int(count)
        now = time.time()
        return {
            "round": None if current is None else int(current),
            "federation": federation,
            "open": any(t.open and t.deadline > now for t in tasks),
            "accepted": sum(t.accepted for t in tasks),
            "refused": dict(sorted(refused.items())),
            "refused_total": dict(sorted(total.items())),
            "tasks": [{"task_id": t.task_id, "gateway": t.gateway, "open": t.open, "accepted": t.accepted,
                       "min_updates": t.min_updates,
                       "deadline": iso_utc(t.deadline)}
                      for t in tasks],
        }


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
