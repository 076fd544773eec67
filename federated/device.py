"""The reference device client: what a phone app does to contribute to a federation, in Python.

It uses nothing but the device protocol (HTTP, see ``server/routers/federations.py``) and the
version's ``tflite-train`` file run by a TFLite interpreter (``export/ondevice.py`` documents its
signatures). No Keras model is loaded and no Keras code is called, so every step here maps to a
call a Kotlin or Swift app makes with LiteRT's ``Interpreter.runSignature``:

1. enrol once (``POST /v1/federations/{model}/devices``) and keep ``device_id``/``token`` on disk;
2. poll ``GET .../task`` (204: nothing open for this device; wait and poll again);
3. fetch the manifest of the task's ``base_version``, download its ``tflite-train`` file once
   (cached under its sha256, checked against the manifest) and check the local data against the
   manifest's input spec;
4. ``restore`` the file's fresh state (a fresh optimizer per task), ``set_weights`` with the
   task's base weights (``GET .../tasks/{id}/weights``), run ``train`` for ``config.epochs``
   over the local data in ``config.batch_size`` batches, ``save`` a checkpoint (an app killed
   before the upload resumes from it without training again), ``get_weights``;
5. ``POST .../tasks/{id}/updates?examples=N`` with local − base as little-endian float32.

The task's ``learning_rate`` reaches the optimizer only when the file's train signature takes
a ``learning_rate`` input; the files `export/ondevice.py` writes carry the rate they were
exported with (their Adam step), so for them it is informational.

Refusals are handled as the protocol says: 409 (stale round or duplicate) → fetch the task
again (a duplicate means an earlier post of ours already counts); 404 unknown task → fetch the
task again; 401 → enrol again, once; 413 → resend as float16 (half the bytes); 422 → this
update cannot be accepted (e.g. its norm is over the bound): skip the task; 5xx and
connection errors → retry with exponential backoff.

`DeviceClient` is the library entry point (a simulator runs many in one process, each with its
own state folder and interpreter); `pollinate federate device` (``federated/device_cli.py``) is
its command line.

Field telemetry (docs/monitoring.md, opt-in: ``telemetry=True``, ``--telemetry``): the device
counts the predictions it makes — ``DeviceClient.predict()``, and before each task the base
model's predictions on its local data (what the model does on this device's inputs) — on the
version's ``monitoring`` grid (``registry.profile.observe``: the same features and bins as the
server's profile), and posts one batch per version every ``telemetry_every`` predictions and
when a run ends (``POST /v1/models/{name}/telemetry``). Never an input. A batch the server
cannot take now waits in the state folder and goes with the next flush (at most
TELEMETRY_KEEP_S: the server remembers a batch's id that long). Each batch and feedback
carries a random ``batch_id``, made once and kept across retries, so a batch whose answer was
lost is counted once; the device's token goes along (``Authorization: Bearer``), and a server
that takes telemetry from enrolled devices only answers 401 without it: the device enrols (or
enrols again, once) and retries.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import random
import secrets
import time
import urllib.error
import urllib.request
import uuid
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from http.client import HTTPException
from pathlib import Path
from urllib.parse import quote

import numpy as np

from core.errors import InvalidInput, PollinateError

TRAIN_FORMAT = "tflite-train"
TELEMETRY_EVERY = 100      # predictions per version and batch (docs/monitoring.md)
MAX_BATCH_PREDICTIONS = 10_000
MAX_RECENT = 100
TELEMETRY_KEEP_S = 7 * 24 * 3600  # an unsent batch is dropped after this (the server keeps batch ids as long)
MAX_QUEUED_BATCHES = 200
INFER_BATCH = 256
SIGNATURES = ("infer", "train", "get_weights", "set_weights", "save", "restore")
USER_AGENT = "pollinate-device/1"


class DeviceError(PollinateError):
    """The device cannot go on: a refused enrolment, a model without a training file, a task
    that does not fit the file."""


class ServerUnavailable(DeviceError):
    """The server did not answer (connection refused, timeouts, 5xx) after every retry."""


class Refused(PollinateError):
    """A 4xx answer of the protocol: `status`, the server's JSON `detail`, and its refusal reason."""

    def __init__(self, status: int, detail: str, reason: str | None = None):
        super().__init__(f"HTTP {status}: {detail}")
        self.status = status
        self.detail = detail
        self.reason = reason or _reason_for(status, detail)


def _reason_for(status: int, detail: str) -> str:
    """The refusal word when the server's answer gives none (409 is stale or duplicate: both mean
    "fetch the task again"; the word only tells the report which)."""
    if status == 409:
        return "duplicate" if "already" in detail.lower() else "stale"
    return {401: "unauthorized", 404: "unknown_task", 413: "too_large", 422: "rejected"}.get(status, f"http_{status}")


# =============================================================================== local data


@dataclass(frozen=True)
class LocalData:
    """The device's labelled examples, ready for the train signature: x in the model's input
    shape, y as class ids or targets (cast to the signature's dtypes when training)."""

    x: np.ndarray
    y: np.ndarray
    source: str = "memory"

    def __len__(self) -> int:
        return int(len(self.x))


def check_data(data: LocalData | Path, manifest: dict, *, target: str | None = None) -> LocalData:
    """The device's data file (or arrays) checked against a version's manifest by the same rules
    as an own-data SuperNode's (``federated/own_data.py``): `.npz` with `x`, `y`, or a CSV with
    the model's columns and a label column; shape, finite values, input range, labels. An input
    the model takes as integers (token ids) must hold whole numbers. InvalidInput otherwise."""
    from federated import own_data

    recipe = ((manifest.get("lineage") or {}).get("extra") or {}).get("data") or {}
    name = data.source if isinstance(data, LocalData) else Path(data).name
    is_csv = not isinstance(data, LocalData) and Path(data).suffix.lower() == ".csv"
    # the label column's usual name matters only to a CSV (finding it may load a built-in dataset)
    usual = own_data._target_of(recipe) if is_csv and not target else recipe.get("target")
    contract = own_data.contract_from_spec(manifest.get("name") or "model", manifest.get("input"),
                                           manifest.get("labels"), usual, f"v{manifest.get('version')}")
    if isinstance(data, LocalData):
        x, y = own_data.check_arrays(data.x, data.y, contract, name)
    else:
        x, y = own_data.load_own_data(Path(data), contract, target)
    dtype = np.dtype((manifest.get("input") or {}).get("dtype") or "float32")
    if dtype.kind in "iu":
        if not np.equal(np.mod(x, 1), 0).all():
            raise InvalidInput(f"{name}: x must hold whole numbers (the model takes {dtype} ids), it has fractions")
        x = x.astype(dtype)
    return LocalData(x, y, source=str(data.source if isinstance(data, LocalData) else data))


def read_data_file(path: Path) -> Path:
    """What can be said of `--data FILE` before any manifest is known: it exists and is a .npz or .csv."""
    path = Path(path)
    if not path.exists():
        raise InvalidInput(f"data file not found: {path}")
    if path.is_dir() or path.suffix.lower() not in (".npz", ".csv"):
        raise InvalidInput(f"{path}: the data file must be .npz (arrays x, y) or .csv (the model's columns and a label)")
    return path


# =============================================================================== HTTP


@dataclass
class Traffic:
    """Body bytes this device moved (what a metered phone pays for; headers not counted)."""

    down: int = 0
    up: int = 0
    requests: int = 0
    retries: int = 0


class ProtocolClient:
    """The protocol's HTTP calls over the standard library (a phone uses its own HTTP stack):
    4xx → Refused (with the JSON `detail`), 5xx and connection errors → retried with exponential
    backoff and jitter, then ServerUnavailable."""

    def __init__(self, server: str, model: str, *, timeout: float = 30.0, retries: int = 6,
                 backoff: float = 0.5, max_backoff: float = 10.0, sleep: Callable[[float], None] = time.sleep):
        if not server.startswith(("http://", "https://")):
            raise InvalidInput(f"--server must be an http:// or https:// URL, got {server!r}")
        self.server = server.rstrip("/")
        self.model = model
        self.timeout = timeout
        self.retries = max(0, int(retries))
        self.backoff = backoff
        self.max_backoff = max_backoff
        self.sleep = sleep
        self.traffic = Traffic()
        self._federation = f"/v1/federations/{quote(model, safe='')}"

    # ------------------------------------------------------------------ protocol calls

    def manifest(self, version: int | None = None) -> dict:
        """A version's manifest (`None`: the version the model's default channel serves)."""
        base = f"/v1/models/{quote(self.model, safe='')}"
        path = f"{base}/versions/{int(version)}/manifest" if version is not None else f"{base}/manifest"
        return self._json("GET", path)

    def enrol(self, kind: str, enrol_token: str | None) -> tuple[str, str]:
        body = self._json("POST", f"{self._federation}/devices", token=enrol_token, payload={"kind": kind})
        return str(body["device_id"]), str(body["token"])

    def task(self, token: str) -> dict | None:
        """The open task for this device, or None (204)."""
        status, _, body = self.request("GET", f"{self._federation}/task", token=token)
        return None if status == 204 or not body else json.loads(body)

    def base_weights(self, token: str, task_id: str) -> bytes:
        _, _, body = self.request("GET", f"{self._federation}/tasks/{quote(task_id, safe='')}/weights", token=token)
        return body

    def post_update(self, token: str, task_id: str, body: bytes, *, examples: int, dtype: str = "float32") -> dict:
        query = f"examples={int(examples)}" + ("" if dtype == "float32" else f"&dtype={dtype}")
        _, _, answer = self.request("POST", f"{self._federation}/tasks/{quote(task_id, safe='')}/updates?{query}",
                                    token=token, body=body, content_type="application/octet-stream")
        return json.loads(answer)

    def download(self, path: str) -> bytes:
        _, _, body = self.request("GET", path)
        return body

    def post_json(self, path: str, payload: dict, *, token: str | None = None) -> dict:
        """POST a JSON body to a server path (telemetry, feedback): the answer's JSON. Retries
        send the same body (its ``batch_id`` too: counted once)."""
        return self._json("POST", path, token=token, payload=payload)

    # ------------------------------------------------------------------ transport

    def _json(self, method: str, path: str, *, token: str | None = None, payload: dict | None = None) -> dict:
        body = json.dumps(payload).encode() if payload is not None else None
        _, _, answer = self.request(method, path, token=token, body=body,
                                    content_type="application/json" if body is not None else None)
        try:
            return json.loads(answer)
        except ValueError:
            raise DeviceError(f"{method} {path}: the server's answer is not JSON") from None

    def request(self, method: str, path: str, *, token: str | None = None, body: bytes | None = None,
                content_type: str | None = None) -> tuple[int, dict, bytes]:
        url = self.server + path
        headers = {"User-Agent": USER_AGENT, "Accept": "application/json, application/octet-stream"}
        if token:
            headers["Authorization"] = f"Bearer {token}"
        if content_type:
            headers["Content-Type"] = content_type
        last, asked = "", 0.0
        for attempt in range(self.retries + 1):
            if attempt:
                self.traffic.retries += 1
                delay = min(self.max_backoff, self.backoff * 2 ** (attempt - 1)) * (0.5 + random.random() / 2)
                self.sleep(max(delay, asked))  # never sooner than the server's Retry-After
                asked = 0.0
            self.traffic.requests += 1
            if body:
                self.traffic.up += len(body)
            try:
                with urllib.request.urlopen(urllib.request.Request(url, data=body, headers=headers, method=method),
                                            timeout=self.timeout) as response:
                    data = response.read()
                    self.traffic.down += len(data)
                    return response.status, dict(response.headers), data
            except urllib.error.HTTPError as error:
                data = _read_quietly(error)
                self.traffic.down += len(data)
                if error.code >= 500 or error.code == 429:
                    last = f"HTTP {error.code} {_refusal(data)[0] or error.reason}"
                    asked = _retry_after(error.headers.get("Retry-After"), self.max_backoff)
                    continue
                detail, reason = _refusal(data)
                raise Refused(error.code, detail or str(error.reason), reason) from None
            except (TimeoutError, urllib.error.URLError, HTTPException, OSError) as error:
                reason = getattr(error, "reason", error)
                last = f"{type(reason).__name__}: {reason}" if str(reason) else type(reason).__name__
                continue
        raise ServerUnavailable(f"{method} {url} failed after {self.retries + 1} attempt(s): {last}")


def batch_id() -> str:
    """A telemetry batch's or feedback's id (docs/monitoring.md): 32 hex digits, the time in
    milliseconds first (12 digits) then 80 random bits, like a UUIDv7 — ids made later sort
    later, which the server keeps at the end of its index (cheaper than random ones)."""
    return f"{int(time.time() * 1000) & 0xFFFFFFFFFFFF:012x}{secrets.token_hex(10)}"


def _retry_after(value: str | None, cap: float) -> float:
    """Seconds a 503/429 asks to wait (the delta-seconds form), at most `cap`."""
    try:
        return min(cap, max(0.0, float(value))) if value else 0.0
    except ValueError:
        return 0.0  # an HTTP date: the backoff decides


def _read_quietly(error: urllib.error.HTTPError) -> bytes:
    try:
        return error.read() or b""
    except (OSError, HTTPException):
        return b""


def _refusal(data: bytes) -> tuple[str, str | None]:
    """(detail, reason) of a refusal's JSON body; the reason is absent from older servers."""
    try:
        body = json.loads(data)
        detail, reason = body.get("detail"), body.get("reason")
    except (ValueError, AttributeError):
        return data[:200].decode("utf-8", "replace").strip(), None
    detail = detail if isinstance(detail, str) else json.dumps(detail)
    return detail, reason if isinstance(reason, str) else None


# =============================================================================== state on disk


class DeviceState:
    """The device's folder: its identity per (server, model), the training files it downloaded
    (by sha256) and a checkpoint of a trained but not yet accepted update.

    state/identity-<model>.json   {"server", "model", "device_id", "token", "kind", "enrolled_at"} (0600)
    state/models/<sha256>.tflite  downloaded tflite-train files (or a shared `cache` folder)
    state/fresh-<sha256>.ckpt     that file's state as loaded (restored before each task: a fresh optimizer)
    state/pending-<model>.json    {"task_id", "examples", "sha256", "checkpoint"} while an upload is owed
    state/checkpoint-<model>-<task_id>.ckpt   the trained state that upload is made from
    """

    def __init__(self, folder: Path, cache: Path | None = None):
        self.folder = Path(folder)
        self.cache = Path(cache) if cache else self.folder / "models"
        for path in (self.folder, self.cache):
            if path.exists() and not path.is_dir():
                raise InvalidInput(f"--state must be a folder, {path} is a file")
            path.mkdir(parents=True, exist_ok=True)

    def _file(self, stem: str, model: str) -> Path:
        return self.folder / f"{stem}-{model}.json"

    def identity(self, server: str, model: str) -> dict | None:
        data = _read_json(self._file("identity", model))
        if not data or data.get("server") != server or not data.get("token"):
            return None  # a token from another server means nothing here
        return data

    def save_identity(self, identity: dict) -> None:
        _write_json(self._file("identity", identity["model"]), identity, private=True)

    def pending(self, model: str) -> dict | None:
        return _read_json(self._file("pending", model))

    def save_pending(self, model: str, pending: dict) -> None:
        _write_json(self._file("pending", model), pending)

    def clear_pending(self, model: str) -> None:
        pending = self.pending(model)
        for path in (self._file("pending", model), Path(pending["checkpoint"]) if pending else None):
            if path is not None:
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()

    def queued_telemetry(self, model: str) -> list[dict]:
        """Telemetry batches (and feedback) the server could not take yet, oldest first."""
        return list((_read_json(self._file("telemetry-queue", model)) or {}).get("items") or [])

    def save_queued_telemetry(self, model: str, items: list[dict]) -> None:
        path = self._file("telemetry-queue", model)
        if items:
            _write_json(path, {"items": items[-MAX_QUEUED_BATCHES:]})
        else:
            path.unlink(missing_ok=True)

    def checkpoint_path(self, model: str, task_id: str) -> Path:
        return self.folder / f"checkpoint-{model}-{task_id}.ckpt"

    def cached_model(self, sha256: str) -> Path | None:
        path = self.cache / f"{sha256}.tflite"
        return path if path.is_file() else None

    def store_model(self, sha256: str, content: bytes) -> Path:
        path = self.cache / f"{sha256}.tflite"
        scratch = self.cache / f".{sha256}.{uuid.uuid4().hex}.tmp"
        scratch.write_bytes(content)
        os.replace(scratch, path)
        return path


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (ValueError, OSError):
        return None  # a torn or foreign file: start over rather than stop the device


def _write_json(path: Path, data: dict, *, private: bool = False) -> None:
    scratch = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    fd = os.open(scratch, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600 if private else 0o644)
    with os.fdopen(fd, "w") as handle:
        json.dump(data, handle, indent=2, sort_keys=True)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(scratch, path)


# =============================================================================== the tflite-train file


class TrainingFile:
    """One `tflite-train` file in TensorFlow's TFLite interpreter (it needs the Flex ops the plain
    LiteRT wheel lacks): the six signatures, exactly as a phone calls them."""

    def __init__(self, path: Path):
        from core.tensorflow import import_tensorflow, quiet_stderr

        tf = import_tensorflow()
        with quiet_stderr(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # tf.lite.Interpreter's deprecation notice
            self.interpreter = tf.lite.Interpreter(model_path=str(path))
            self.interpreter.allocate_tensors()
        available = self.interpreter.get_signature_list()
        missing = [s for s in SIGNATURES if s not in available]
        if missing:
            raise DeviceError(f"{Path(path).name} is not a tflite-train file: no signature(s) {', '.join(missing)}")
        self.runners = {name: self.interpreter.get_signature_runner(name) for name in SIGNATURES}
        train = self.runners["train"].get_input_details()
        self.train_inputs = set(train)
        self.x_dtype = np.dtype(train["x"]["dtype"])
        self.y_dtype = np.dtype(train["y"]["dtype"])
        batch = int(train["x"]["shape_signature"][0])
        self.fixed_batch = batch if batch > 0 else None  # None: the batch axis is dynamic
        infer_batch = int(self.runners["infer"].get_input_details()["x"]["shape_signature"][0])
        self.infer_batch = infer_batch if infer_batch > 0 else None
        self.size = int(self.runners["set_weights"].get_input_details()["weights"]["shape"][0])

    def train(self, x: np.ndarray, y: np.ndarray, learning_rate: float | None = None) -> float:
        inputs = {"x": np.ascontiguousarray(x, self.x_dtype), "y": np.ascontiguousarray(y, self.y_dtype)}
        if learning_rate is not None and "learning_rate" in self.train_inputs:
            inputs["learning_rate"] = np.float32(learning_rate)
        return float(self.runners["train"](**inputs)["loss"])

    def infer(self, x: np.ndarray) -> np.ndarray:
        return self.runners["infer"](x=np.ascontiguousarray(x, self.x_dtype))["output"]

    def get_weights(self) -> np.ndarray:
        return np.asarray(self.runners["get_weights"]()["weights"], np.float32)

    def set_weights(self, flat: np.ndarray) -> None:
        self.runners["set_weights"](weights=np.ascontiguousarray(flat, np.float32))

    def save(self, path: Path) -> None:
        self.runners["save"](checkpoint_path=np.array(str(path).encode()))

    def restore(self, path: Path) -> None:
        self.runners["restore"](checkpoint_path=np.array(str(path).encode()))


def batches(n: int, batch_size: int, *, fixed: bool, rng: np.random.Generator) -> list[np.ndarray]:
    """One epoch's index batches over a fresh shuffle. The last batch is partial when the train
    signature's batch axis is dynamic; a fixed-batch file gets it filled up with examples from
    the start of the same shuffle (each example still counts once per epoch or, when n is
    smaller than the batch, as evenly as the batch allows)."""
    order = rng.permutation(n)
    out = [order[start:start + batch_size] for start in range(0, n, batch_size)]
    if fixed and len(out[-1]) < batch_size:
        out[-1] = np.resize(np.concatenate([out[-1], order]), batch_size)
    return out


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


# =============================================================================== the client


@dataclass
class TaskReport:
    """What one task cost and how it ended (one row of `--json`'s `tasks`)."""

    task_id: str
    round: int
    base_version: int | None
    status: str = "started"  # accepted | duplicate | stale | unknown_task | refused | skipped
    examples: int = 0
    epochs: int = 0
    batch_size: int = 0
    steps: int = 0
    loss_first: float | None = None  # mean train loss of the first epoch
    loss_last: float | None = None   # ... and of the last
    train_seconds: float = 0.0
    seconds: float = 0.0
    bytes_down: int = 0
    bytes_up: int = 0
    model_bytes: int = 0       # the tflite-train file's share of bytes_down (0 when cached)
    model_cached: bool = False
    resumed: bool = False      # trained before a restart: the checkpoint was sent, no training again
    dtype: str = "float32"
    accepted: int | None = None  # updates the task holds after ours (the 202's count)
    norm: float | None = None
    clipped: bool | None = None
    detail: str | None = None

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class RunSummary:
    server: str
    model: str
    device_id: str = ""
    kind: str = "device"
    reused_enrolment: bool = False
    enrolments: int = 0
    examples: int = 0
    polls: int = 0
    idle_polls: int = 0
    stopped: str = ""
    tasks: list[TaskReport] = field(default_factory=list)
    refusals: dict[str, int] = field(default_factory=dict)
    bytes_down: int = 0
    bytes_up: int = 0
    retries: int = 0
    telemetry: TelemetryReport | None = None  # with telemetry on

    @property
    def contributed(self) -> int:
        return sum(t.status in ("accepted", "duplicate") for t in self.tasks)

    def to_dict(self) -> dict:
        out = asdict(self)
        out["contributed"] = self.contributed
        return out


@dataclass
class TelemetryReport:
    """What the device's telemetry did in a run (the `--json` summary's `telemetry`)."""

    predictions: int = 0       # predictions counted
    batches: int = 0           # batches the server accepted
    duplicates: int = 0        # of those, retries of a batch it had counted already (not counted again)
    queued: int = 0            # batches waiting in the state folder for a later flush
    refused: int = 0           # batches the server refused (4xx other than 429: never sent again)
    bytes_up: int = 0
    windows: list[str] = field(default_factory=list)
    detail: str | None = None  # the last refusal or failure

    def to_dict(self) -> dict:
        return asdict(self)


class DeviceTelemetry:
    """Counts of this device's predictions per version, on the version's grid (the manifest's
    ``monitoring``), posted as telemetry batches. ``registry.profile.observe`` computes the
    feature and prediction histograms, so the numbers are the server's own."""

    def __init__(self, http: ProtocolClient, state: DeviceState, model: str, *, client_id: str | None = None,
                 every: int = TELEMETRY_EVERY, token: Callable[[bool], str | None] | None = None):
        if not 1 <= int(every) <= MAX_BATCH_PREDICTIONS:
            raise InvalidInput(f"--telemetry-every must be 1..{MAX_BATCH_PREDICTIONS}, got {every}")
        self.http = http
        self.state = state
        self.model = model
        self.client_id = client_id
        # token(refused) -> the device token to send (None: none); refused=True after a 401:
        # a new enrolment's token, or None when there is none to be had
        self.token = token
        self.every = int(every)
        self.pending: dict[int, dict] = {}   # version → the batch being counted
        self.report = TelemetryReport()

    @staticmethod
    def counts(manifest: dict) -> bool:
        grid = manifest.get("monitoring")
        return isinstance(grid, dict) and bool(grid.get("prediction")) and bool(grid.get("latency_ms_edges"))

    def _batch(self, manifest: dict) -> dict:
        version = int(manifest["version"])
        if version not in self.pending:
            grid = manifest["monitoring"]
            self.pending[version] = {
                "grid": grid, "input": manifest.get("input") or {},
                "url": grid.get("telemetry_url") or f"/v1/models/{quote(self.model, safe='')}/telemetry",
                "body": {"version": version, "predictions": 0, "errors": 0,
                         "latency_ms": [0] * (len(grid["latency_ms_edges"]) - 1), "features": None, "prediction": None,
                         "recent": []},
            }
        return self.pending[version]

    def record(self, manifest: dict, x: np.ndarray, outputs: np.ndarray, latency_ms: np.ndarray,
               ids: list[str] | None = None) -> None:
        """A batch of predictions of `manifest`'s version: inputs (model inputs), outputs,
        per-prediction latency; flushes the version when it reaches `every`."""
        from registry.profile import bin_counts, observe

        if not self.counts(manifest) or len(x) == 0:
            return
        outputs = np.asarray(outputs, dtype=np.float64).reshape(len(x), -1)
        start = 0
        while start < len(x):
            batch = self._batch(manifest)
            body, grid = batch["body"], batch["grid"]
            take = min(len(x) - start, self.every - body["predictions"])
            part = slice(start, start + take)
            seen = observe(x[part], outputs[part], grid, batch["input"])
            for key in ("features", "prediction"):
                body[key] = seen[key] if body[key] is None else {
                    name: [a + b for a, b in zip(body[key][name], seen[key][name])] for name in seen[key]}
            body["predictions"] += take
            # a prediction that is not finite, or a feature that is not, is an error (not binned)
            finite = np.isfinite(outputs[part]).all(axis=1)
            body["errors"] += int((~finite).sum())
            body["latency_ms"] = [a + b for a, b in zip(body["latency_ms"],
                                                         bin_counts(latency_ms[part], grid["latency_ms_edges"]).tolist())]
            if ids is not None:
                labels = (grid["prediction"].get("labels") or [])
                for i in range(part.start, part.stop):
                    row = outputs[i]
                    if not np.isfinite(row).all():
                        continue
                    if grid["prediction"].get("task") == "regression":
                        entry = {"id": ids[i], "prediction": float(row[0])}
                    else:
                        k = int(row.argmax())
                        entry = {"id": ids[i], "prediction": str(labels[k]), "confidence": round(float(row[k]), 4)}
                    body["recent"] = [*body["recent"], entry][-MAX_RECENT:]
            self.report.predictions += take
            start += take
            if body["predictions"] >= self.every:
                self.flush(int(manifest["version"]))

    def flush(self, version: int | None = None) -> None:
        """Sends the queue, then the pending batch of `version` (None: every version)."""
        versions = list(self.pending) if version is None else [version]
        items = self.state.queued_telemetry(self.model)
        for v in versions:
            batch = self.pending.pop(v, None)
            if batch and batch["body"]["predictions"]:
                body = dict(batch["body"])
                if not body["recent"]:
                    del body["recent"]
                if self.client_id:
                    body["client_id"] = self.client_id[:64]
                body["batch_id"] = batch_id()  # once: the queue keeps it with the batch
                items.append({"url": batch["url"], "body": body, "queued_at": time.time()})
        now = time.time()
        items = [item for item in items if now - float(item.get("queued_at") or now) <= TELEMETRY_KEEP_S]
        left: list[dict] = []
        for i, item in enumerate(items):
            try:
                answer = self.post(item["url"], item["body"])
            except Refused as refusal:
                self.report.refused += 1
                self.report.detail = f"telemetry refused: {refusal}"
                continue
            except ServerUnavailable as exc:
                self.report.detail = f"telemetry not sent yet: {exc}"
                left = items[i:]
                break
            self.report.batches += 1
            self.report.duplicates += bool(answer.get("duplicate"))
            self.report.bytes_up += len(json.dumps(item["body"]))
            if answer.get("window"):
                self.report.windows.append(answer["window"])
        self.report.queued = len(left)
        self.state.save_queued_telemetry(self.model, left)

    def post(self, path: str, body: dict) -> dict:
        """POST a telemetry batch or feedback with the device's token; a 401 (a server that takes
        enrolled devices only) gets one new token and one retry."""
        token = self.token(False) if self.token else None
        try:
            return self.http.post_json(path, body, token=token)
        except Refused as refusal:
            if refusal.status != 401 or self.token is None:
                raise
            renewed = self.token(True)
            if not renewed or renewed == token:
                raise
            return self.http.post_json(path, body, token=renewed)


class DeviceClient:
    """One device: its data, its state folder, its interpreter. `run()` contributes to up to
    `rounds` tasks; `on_event(kind, info)` hears each step (the CLI prints them)."""

    def __init__(self, server: str, model: str, data: LocalData | Path | str, state: Path | str, *,
                 target: str | None = None, enrol_token: str | None = None, kind: str = "device",
                 poll: float = 10.0, seed: int | None = None,
                 cache: Path | None = None, retries: int = 6, http: ProtocolClient | None = None,
                 on_event: Callable[[str, dict], None] | None = None, sleep: Callable[[float], None] = time.sleep,
                 telemetry: bool = False, telemetry_every: int = TELEMETRY_EVERY):
        self.http = http or ProtocolClient(server, model, retries=retries, sleep=sleep)
        self.server = self.http.server
        self.model = model
        self.state = DeviceState(Path(state), cache)
        self.enrol_token = enrol_token
        self.kind = kind
        self.poll = poll
        self.sleep = sleep
        self.rng = np.random.default_rng(seed)
        self.on_event = on_event or (lambda kind, info: None)
        self._raw = data if isinstance(data, LocalData) else read_data_file(Path(data))
        self.target = target
        self.data: LocalData | None = None
        self._checked_for: set[int | None] = set()
        self._manifests: dict[int | None, dict] = {}
        self._files: dict[str, TrainingFile] = {}
        self._fresh: dict[str, Path] = {}
        self._skip: set[str] = set()
        self._reenrolled = False
        self._telemetry_reenrolled = False
        self.identity: dict | None = None
        self.summary = RunSummary(self.server, model, kind=kind)
        # opt-in: nothing is counted or sent without it
        self.telemetry = DeviceTelemetry(self.http, self.state, model, every=telemetry_every,
                                         token=self._telemetry_token) if telemetry else None
        if self.telemetry is not None:
            self.summary.telemetry = self.telemetry.report

    # ------------------------------------------------------------------ steps

    def check_data(self, version: int | None = None) -> LocalData:
        """The local data checked against the input spec of `version` (None: the version the
        model's channel serves): done before enrolling, and again for each task's base version."""
        if version in self._checked_for and self.data is not None:
            return self.data
        self.data = check_data(self._raw, self._manifest(version), target=self.target)
        self._checked_for.add(version)
        return self.data

    def enrol(self, *, force: bool = False) -> dict:
        """This device's identity for (server, model): the stored one, else a new enrolment."""
        if not force:
            stored = self.state.identity(self.server, self.model)
            if stored:
                self.identity = stored
                self.summary.device_id = stored["device_id"]
                self.summary.reused_enrolment = True
                self.on_event("enrolled", {"device_id": stored["device_id"], "reused": True})
                return stored
        try:
            device_id, token = self.http.enrol(self.kind, self.enrol_token)
        except Refused as refusal:
            if refusal.status == 401:
                raise DeviceError(f"the server refused to enrol this device ({refusal.detail}); it needs the enrolment "
                                  "token: --enrol-token or $POLLINATE_ENROL_TOKEN") from None
            if refusal.status == 404:
                raise DeviceError(f"{self.server} has no federation for model {self.model!r}: {refusal.detail}") from None
            raise DeviceError(f"enrolment refused: {refusal}") from None
        self.identity = {"server": self.server, "model": self.model, "device_id": device_id, "token": token,
                         "kind": self.kind, "enrolled_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        self.state.save_identity(self.identity)
        self.summary.device_id = device_id
        self.summary.enrolments += 1
        self.summary.reused_enrolment = False
        self.on_event("enrolled", {"device_id": device_id, "reused": False})
        return self.identity

    def _authed(self, call: Callable[[str], object]):
        """A device-token call; a 401 means the server forgot us (a new store): enrol again, once."""
        try:
            return call(self.identity["token"])
        except Refused as refusal:
            if refusal.status != 401 or self._reenrolled:
                if refusal.status == 401:
                    raise DeviceError(f"the server refused this device's token again after a new enrolment: "
                                      f"{refusal.detail}") from None
                raise
            self._count("unauthorized")
            self._reenrolled = True
            self.on_event("reenrol", {"detail": refusal.detail})
            self.enrol(force=True)
            return call(self.identity["token"])

    def _telemetry_token(self, refused: bool) -> str | None:
        """The token telemetry and feedback carry: this device's (enrolling first when it has
        none yet and the server asked for one), or, after a 401, a new enrolment's (once per
        client); None when enrolment is refused (the telemetry refusal then stands)."""
        if not refused:
            return (self.identity or self.state.identity(self.server, self.model) or {}).get("token")
        if self._telemetry_reenrolled:
            return None
        self._telemetry_reenrolled = True
        had = self._telemetry_token(False)  # a token the server refused: enrol anew
        try:
            return self.enrol(force=bool(had))["token"]
        except DeviceError as exc:
            self.on_event("telemetry-unauthorized", {"detail": str(exc)})
            return None

    def fetch_task(self) -> dict | None:
        self.summary.polls += 1
        return self._authed(self.http.task)

    # ------------------------------------------------------------------ the loop

    def run(self, rounds: int = 1, wait: float = 60.0) -> RunSummary:
        """Contribute to `rounds` tasks (0: as many as come), waiting up to `wait` seconds for
        each; stops early when no task comes within `wait`."""
        started_traffic = asdict(self.http.traffic)
        try:
            self.check_data(None)
            if self.identity is None:
                self.enrol()
            if self.telemetry is not None:
                self.telemetry.client_id = "dev-" + hashlib.sha256(self.identity["device_id"].encode()).hexdigest()[:24]
            idle_since = time.monotonic()
            before = self.summary.contributed  # a simulator may call run() once per round
            while rounds <= 0 or self.summary.contributed - before < rounds:
                task = self.fetch_task()
                if task is not None and task["task_id"] in self._skip:
                    task = None
                if task is None:
                    self.summary.idle_polls += 1
                    waited = time.monotonic() - idle_since
                    if waited >= wait:
                        self.summary.stopped = f"no task within {wait:g} s"
                        break
                    self.on_event("waiting", {"waited": waited, "wait": wait})
                    self.sleep(min(self.poll, max(0.0, wait - waited)))
                    continue
                self.run_task(task)
                idle_since = time.monotonic()
            else:
                self.summary.stopped = f"{self.summary.contributed - before} task(s) done"
        finally:
            if self.telemetry is not None:
                self.telemetry.flush()  # what this run counted goes now (or waits in the state folder)
            traffic = asdict(self.http.traffic)
            self.summary.bytes_down += traffic["down"] - started_traffic["down"]
            self.summary.bytes_up += traffic["up"] - started_traffic["up"]
            self.summary.retries += traffic["retries"] - started_traffic["retries"]
        return self.summary

    def run_task(self, task: dict) -> TaskReport:
        """Train on one task and send the update; the report says how it ended."""
        report = TaskReport(task["task_id"], int(task["round"]), task.get("base_version"))
        self.summary.tasks.append(report)
        clock = time.perf_counter()
        down, up = self.http.traffic.down, self.http.traffic.up
        self.on_event("task", {"task": task})
        try:
            self._run_task(task, report)
        except Refused as refusal:
            self._count(refusal.reason)
            report.detail = refusal.detail
            # 409 stale: the round closed; 409 duplicate: ours already counts; 404: the task is
            # gone; 413 (even as float16) or 422: this update cannot be accepted. Either way this
            # task is over for this device: the loop fetches the current one, never this one again.
            report.status = {404: "unknown_task", 409: refusal.reason}.get(refusal.status, "refused")
            self._skip.add(report.task_id)
            self.state.clear_pending(self.model)
        finally:
            report.seconds = time.perf_counter() - clock
            report.bytes_down = self.http.traffic.down - down
            report.bytes_up = self.http.traffic.up - up
            self.on_event("done", {"report": report})
        return report

    def _run_task(self, task: dict, report: TaskReport) -> None:
        base_version = task.get("base_version")
        data = self.check_data(base_version)
        trainer, sha = self._training_file(base_version, report)
        size = int(task["size"]) if task.get("size") is not None else sum(math.prod(w["shape"]) for w in task["weights"])
        if trainer.size != size:
            raise DeviceError(f"task {task['task_id']} has {size} weight values; the tflite-train file of "
                              f"v{base_version} takes {trainer.size}: they are not the same model")
        classification = bool(self._manifest(base_version).get("labels"))
        if classification != (trainer.y_dtype.kind in "iu"):
            raise DeviceError(f"the tflite-train file's train signature takes y as {trainer.y_dtype}, which does not fit "
                              f"a {'classification' if classification else 'regression'} manifest")
        body = self._authed(lambda token: self.http.base_weights(token, task["task_id"]))
        if len(body) != size * 4:
            raise DeviceError(f"the task's base weights are {len(body)} bytes, expected {size * 4} (float32 × {size})")
        base = np.frombuffer(body, "<f4")
        config = task.get("config") or {}
        report.examples = len(data)
        pending = self.state.pending(self.model)
        if pending and pending.get("task_id") == task["task_id"] and pending.get("sha256") == sha \
                and Path(pending["checkpoint"]).exists():
            trainer.restore(Path(pending["checkpoint"]))  # trained before a restart: send that
            report.resumed = True
            report.examples = int(pending["examples"])
        else:
            if pending:
                self.state.clear_pending(self.model)  # owed to a task that is gone
            self._train(trainer, sha, base, data, config, report)
        local = trainer.get_weights()
        delta = (local.astype(np.float64) - base.astype(np.float64)).astype("<f4")
        if not np.isfinite(delta).all():
            report.status = "skipped"
            report.detail = "training diverged (NaN or infinite weights): nothing sent"
            self._skip.add(task["task_id"])
            self.state.clear_pending(self.model)
            return
        self.on_event("trained", {"report": report, "task": task})  # a simulator may sleep (late) or raise (drop)
        self._send(task, delta, report)
        self.state.clear_pending(self.model)

    def _train(self, trainer: TrainingFile, sha: str, base: np.ndarray, data: LocalData, config: dict,
               report: TaskReport) -> None:
        epochs = max(1, int(config.get("epochs") or 1))
        batch_size = trainer.fixed_batch or max(1, int(config.get("batch_size") or 32))
        learning_rate = config.get("learning_rate")
        report.epochs, report.batch_size = epochs, batch_size
        clock = time.perf_counter()
        trainer.restore(self._fresh[sha])  # a fresh optimizer for every task
        trainer.set_weights(base)
        if self.telemetry is not None:
            # what the round's model predicts on this device's inputs: the field's view of it
            outputs, latency = self._infer(trainer, data.x)
            self.telemetry.record(self._manifest(report.base_version), data.x, outputs, latency)
        for epoch in range(epochs):
            losses = [trainer.train(data.x[idx], data.y[idx], learning_rate)
                      for idx in batches(len(data), batch_size, fixed=trainer.fixed_batch is not None, rng=self.rng)]
            report.steps += len(losses)
            mean = float(np.mean(losses))
            if epoch == 0:
                report.loss_first = mean
            report.loss_last = mean
        report.train_seconds = time.perf_counter() - clock
        checkpoint = self.state.checkpoint_path(self.model, report.task_id)
        trainer.save(checkpoint)
        self.state.save_pending(self.model, {"task_id": report.task_id, "examples": len(data), "sha256": sha,
                                             "checkpoint": str(checkpoint)})

    def _send(self, task: dict, delta: np.ndarray, report: TaskReport) -> None:
        def post(token: str, dtype: str) -> dict:
            payload = delta.tobytes() if dtype == "float32" else delta.astype("<f2").tobytes()
            return self.http.post_update(token, task["task_id"], payload, examples=report.examples, dtype=dtype)

        try:
            answer = self._authed(lambda token: post(token, "float32"))
        except Refused as refusal:
            if refusal.status != 413:
                raise
            self._count("too_large")
            report.dtype = "float16"  # half the bytes; the server widens it back
            answer = self._authed(lambda token: post(token, "float16"))
        report.status = "accepted"
        report.accepted = answer.get("accepted")
        report.norm = answer.get("norm")
        report.clipped = answer.get("clipped")

    # ------------------------------------------------------------------ predictions, telemetry

    @staticmethod
    def _infer(trainer: TrainingFile, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The infer signature over x in batches: (outputs, per-prediction milliseconds)."""
        size = trainer.infer_batch or INFER_BATCH
        outputs, latency = [], []
        for start in range(0, len(x), size):
            chunk = x[start:start + size]
            n = len(chunk)
            if trainer.infer_batch and n < size:  # a fixed batch axis: fill it up, keep the first n
                chunk = np.concatenate([chunk, np.repeat(chunk[:1], size - n, axis=0)])
            clock = time.perf_counter()
            out = np.asarray(trainer.infer(chunk))
            ms = (time.perf_counter() - clock) * 1000.0
            outputs.append(out.reshape(len(chunk), -1)[:n])
            latency.extend([ms / n] * n)
        if not outputs:
            return np.zeros((0, 1)), np.zeros(0)
        return np.concatenate(outputs), np.asarray(latency, dtype=np.float64)

    def predict(self, x: np.ndarray, *, version: int | None = None) -> dict:
        """The outputs of `version` (None: the one the model's channel serves) on model inputs `x`
        (a batch in the input spec), run by its tflite-train file's infer signature, as an app
        predicts. Counted in telemetry when it is on. {"version", "outputs", "ids", "latency_ms"}:
        `ids` are random, one per prediction, for feedback()."""
        manifest = self._manifest(version)
        trainer, sha = self._training_file(version, TaskReport("predict", 0, manifest["version"]))
        trainer.restore(self._fresh[sha])  # the version's own weights (a task may have trained this interpreter)
        x = np.asarray(x)
        outputs, latency = self._infer(trainer, x)
        ids = [uuid.uuid4().hex for _ in range(len(x))]
        if self.telemetry is not None:
            self.telemetry.record(manifest, x, outputs, latency, ids)
        return {"version": int(manifest["version"]), "outputs": outputs, "ids": ids, "latency_ms": latency}

    def feedback(self, label: str | float, *, prediction_id: str | None = None, version: int | None = None,
                 prediction: str | float | None = None) -> dict:
        """What the answer really was (docs/monitoring.md section 3): for an id predict() gave
        (its batch is flushed first, so the server knows it), or for (version, prediction).
        Needs telemetry on."""
        if self.telemetry is None:
            raise DeviceError("feedback is sent only with telemetry on (--telemetry)")
        if prediction_id is not None:
            self.telemetry.flush()
            body: dict = {"prediction_id": prediction_id, "label": label}
        elif version is not None and prediction is not None:
            body = {"version": int(version), "prediction": prediction, "label": label}
        else:
            raise InvalidInput("feedback needs a prediction_id, or a version and its prediction")
        body["batch_id"] = batch_id()  # the HTTP client's retries resend it: counted once
        return self.telemetry.post(f"/v1/models/{quote(self.model, safe='')}/feedback", body)

    # ------------------------------------------------------------------ files

    def _manifest(self, version: int | None) -> dict:
        if version not in self._manifests:
            try:
                self._manifests[version] = self.http.manifest(version)
            except Refused as refusal:
                which = f"v{version}" if version is not None else "any version"
                raise DeviceError(f"{self.server} has no {which} of model {self.model!r}: {refusal.detail}") from None
        return self._manifests[version]

    def _training_file(self, version: int | None, report: TaskReport) -> tuple[TrainingFile, str]:
        """The base version's tflite-train file: from the cache when its sha256 is there,
        else downloaded and checked against the manifest's sha256."""
        manifest = self._manifest(version)
        artifact = (manifest.get("artifacts") or {}).get(TRAIN_FORMAT)
        if not artifact:
            raise DeviceError(f"v{manifest.get('version')} of {self.model!r} has no {TRAIN_FORMAT} file; export it "
                              f"(pollinate export --formats {TRAIN_FORMAT}) so devices can train")
        entry = next((f for f in artifact["files"] if artifact["url"].endswith("/" + quote(f["name"], safe=""))),
                     artifact["files"][0])
        sha = entry["sha256"]
        if sha not in self._files:
            path = self.state.cached_model(sha)
            if path is not None and file_sha256(path) != sha:
                path = None  # a damaged cache entry: download again
            report.model_cached = path is not None
            if path is None:
                try:
                    content = self.http.download(artifact["url"])
                except Refused as refusal:
                    raise DeviceError(f"cannot download {artifact['url']}: {refusal}") from None
                report.model_bytes = len(content)
                if sha256_hex(content) != sha:
                    raise DeviceError(f"the downloaded {TRAIN_FORMAT} file's sha256 {sha256_hex(content)[:12]}… does not "
                                      f"match the manifest's {sha[:12]}…: refusing to run it")
                path = self.state.store_model(sha, content)
            trainer = TrainingFile(path)
            # the file's own state as loaded (exported weights, a zeroed optimizer), restored
            # before each task; the same for every load of this file, so written once
            fresh = self.state.folder / f"fresh-{sha}.ckpt"
            if not fresh.is_file():
                scratch = self.state.folder / f".fresh-{sha}.{uuid.uuid4().hex}.tmp"
                trainer.save(scratch)
                os.replace(scratch, fresh)
            self._files[sha], self._fresh[sha] = trainer, fresh
        else:
            report.model_cached = True
        return self._files[sha], sha

    def close(self) -> None:
        """Send what telemetry is left and drop the interpreters (a simulator closes each device
        it is done with)."""
        if self.telemetry is not None and self.telemetry.pending:
            with contextlib.suppress(PollinateError):
                self.telemetry.flush()
        self._files.clear()
        self._fresh.clear()

    def _count(self, reason: str) -> None:
        self.summary.refusals[reason] = self.summary.refusals.get(reason, 0) + 1


def run_device(server: str, model: str, data: LocalData | Path | str, state: Path | str, *, rounds: int = 1,
               wait: float = 60.0, **options) -> RunSummary:
    """One device from enrolment to its last task: what `pollinate federate device` runs."""
    client = DeviceClient(server, model, data, state, **options)
    try:
        return client.run(rounds=rounds, wait=wait)
    finally:
        client.close()
