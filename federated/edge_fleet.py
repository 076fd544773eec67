"""Simulated edge fleets beside a simulation (`pollinate federate simulate --edge-browsers N
--edge-devices M`): a real `pollinate serve` on loopback over the simulation's store, N
simulated browsers (web_client/tools/fleet.mjs: the web client's contribute() with TF.js in
Node) and M TFLite devices (DeviceClient threads: the reference device client and its TFLite
interpreter), each on its own partition of the dataset. The simulation's gateway nodes open a
task per round in the same store (gateway.py); the fleets train on it through the device
protocol like real ones would.

Some devices misbehave, drawn per (seed, device, round) like the Node fleet draws them:
- `late`: trains, then posts after its task closed (or its deadline passed): 409 stale;
- `drop`: trains and never posts;
- `stale`: trains, then posts for its old task once a newer round opened (or the run ends).

Every update (accepted or not) becomes one event: client kind, device, round, status, train
seconds, bytes up and down; `EdgeFleet.report()` sums them per kind. Everything started here
stops on `stop()` (the context manager's exit), on errors and on Ctrl-C.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from core.errors import InvalidInput, PollinateError

from .runtime import SIMULATION_SERVER_ENV, ServeProcess, stop_process_tree
from .settings import FederationSettings

REPO = Path(__file__).resolve().parents[1]
FLEET_SCRIPT = REPO / "web_client" / "tools" / "fleet.mjs"
BEHAVIOURS = ("normal", "late", "drop", "stale")
DEVICE_KIND = "phone"  # what the TFLite devices say they are on enrolment


@dataclass(frozen=True)
class FleetOptions:
    """How many simulated devices of each kind, and how they misbehave."""

    browsers: int = 0
    devices: int = 0
    late: float = 0.0
    drop: float = 0.0
    stale: float = 0.0
    seed: int = 0
    poll_seconds: float = 0.5
    forced: tuple[tuple[str, str], ...] = ()  # (device id, behaviour): that device does it every round

    def check(self) -> FleetOptions:
        if self.browsers < 0 or self.devices < 0 or self.browsers + self.devices < 1:
            raise InvalidInput("--edge-browsers and --edge-devices must be ≥ 0, and at least one of them ≥ 1")
        for name in ("late", "drop", "stale"):
            value = getattr(self, name)
            if not 0 <= value <= 1:
                raise InvalidInput(f"--edge-{name} must be in [0, 1], got {value}")
        if self.late + self.drop + self.stale > 1 + 1e-9:
            raise InvalidInput("--edge-late + --edge-drop + --edge-stale must be at most 1")
        for device, behaviour in self.forced:
            if behaviour not in BEHAVIOURS:
                raise InvalidInput(f"device {device}: behaviour must be one of {', '.join(BEHAVIOURS)}")
        return self

    @property
    def total(self) -> int:
        return self.browsers + self.devices

    def browser_ids(self) -> list[str]:
        return [f"browser-{i}" for i in range(self.browsers)]

    def device_ids(self) -> list[str]:
        return [f"tflite-{i}" for i in range(self.devices)]

    def behaviour(self, device: str, round: int) -> str:
        """The same draw as fleet.mjs (drawBehaviour): sha256 of seed, device, round."""
        forced = dict(self.forced).get(device)
        if forced:
            return forced
        digest = hashlib.sha256(f"{self.seed}\0{device}\0{round}".encode()).digest()
        u = int.from_bytes(digest[:4], "big") / 2**32
        if u < self.drop:
            return "drop"
        if u < self.drop + self.late:
            return "late"
        if u < self.drop + self.late + self.stale:
            return "stale"
        return "normal"


def fleet_partitions(settings: FederationSettings, count: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """(x, y) of each simulated device: the partitions after the ordinary clients' (see
    FederationSettings.client_partition)."""
    from .task import client_data

    recipe = json.dumps(settings.recipe(), sort_keys=True)
    clients = settings.num_partitions - settings.edge_gateways
    total = clients + settings.edge_partitions
    return [client_data(recipe, settings.partition, total, clients + k, settings.seed) for k in range(count)]


def check_node() -> str:
    """The Node binary and the web client's TF.js, which the browser fleet needs."""
    node = shutil.which("node")
    if node is None:
        raise InvalidInput("--edge-browsers needs Node.js (node) on PATH")
    if not (REPO / "web_client" / "node_modules" / "@tensorflow" / "tfjs").is_dir():
        raise InvalidInput("--edge-browsers needs the web client's packages: run npm ci in web_client")
    return node


class EdgeFleet:
    """`pollinate serve` and the simulated devices of one simulation (see the module docstring)."""

    def __init__(self, settings: FederationSettings, options: FleetOptions, folder: Path, *, channel: str = "stable"):
        self.settings = settings
        self.options = options.check()
        self.folder = Path(folder)
        self.channel = channel
        self.server: ServeProcess | None = None
        self.fleet: subprocess.Popen | None = None
        self.threads: list[threading.Thread] = []
        self.halt = threading.Event()
        self.lock = threading.Lock()
        self.events: list[dict] = []
        self.errors: list[str] = []
        self._browser_summary: dict | None = None

    # ------------------------------------------------------------------ start / stop

    def __enter__(self) -> EdgeFleet:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def url(self) -> str:
        return self.server.url if self.server else ""

    def start(self) -> None:
        node = check_node() if self.options.browsers else None
        self.folder.mkdir(parents=True, exist_ok=True)
        parts = fleet_partitions(self.settings, self.options.total)
        if self.options.devices:
            _import_tflite()  # once, here: threads importing TensorFlow at once see a half-imported module
        self.server = ServeProcess(self.settings.home, port=0, log_path=self.folder / "serve.log",
                                   env=SIMULATION_SERVER_ENV).__enter__()
        if self.options.browsers:
            self._start_browsers(node, parts[:self.options.browsers])
        for device, (x, y) in zip(self.options.device_ids(), parts[self.options.browsers:]):
            thread = threading.Thread(target=self._device_loop, args=(device, x, y), name=device, daemon=True)
            thread.start()
            self.threads.append(thread)

    def _start_browsers(self, node: str, parts) -> None:
        forced = dict(self.options.forced)
        devices = []
        for device, (x, y) in zip(self.options.browser_ids(), parts):
            entry = {"id": device, "x": np.asarray(x, np.float32).reshape(len(x), -1).round(5).tolist(),
                     "y": np.asarray(y).astype(int).tolist()}
            if device in forced:
                entry["behaviour"] = forced[device]
            devices.append(entry)
        shape = list(np.asarray(parts[0][0]).shape[1:])
        data = self.folder / "browsers.json"
        data.write_text(json.dumps({"input_shape": shape, "devices": devices}))
        o = self.options
        command = [node, str(FLEET_SCRIPT), "--server", self.url, "--model", self.settings.model_name,
                   "--data", str(data), "--rounds", str(self.settings.rounds), "--late", str(o.late),
                   "--drop", str(o.drop), "--stale", str(o.stale), "--seed", str(o.seed),
                   "--poll-ms", str(int(o.poll_seconds * 1000)), "--max-seconds", str(24 * 3600),
                   "--channel", self.channel]
        with open(self.folder / "browsers.jsonl", "wb") as out, open(self.folder / "browsers.log", "wb") as err:
            self.fleet = subprocess.Popen(command, cwd=REPO, stdout=out, stderr=err, stdin=subprocess.DEVNULL,
                                          start_new_session=True)

    def check_alive(self) -> None:
        """Raise when a piece the simulation relies on stopped (called while the rounds run)."""
        if self.server is None or self.server.process is None or self.server.process.poll() is not None:
            raise PollinateError(f"pollinate serve stopped; see {self.folder / 'serve.log'}")
        if self.fleet is not None and self.fleet.poll() not in (None, 0):
            raise PollinateError(f"the browser fleet stopped ({_last_line(self.folder / 'browsers.log')}); "
                                 f"see {self.folder / 'browsers.log'}")

    def stop(self) -> None:
        """Stop the devices (stale ones post what they kept), the browser fleet, then the server."""
        self.halt.set()
        for thread in self.threads:
            thread.join(timeout=30)
        if self.fleet is not None:
            if self.fleet.poll() is None:
                try:  # fleet.mjs posts what it still holds and prints its summary on SIGTERM
                    os.killpg(self.fleet.pid, signal.SIGTERM)
                    self.fleet.wait(timeout=20)
                except (ProcessLookupError, subprocess.TimeoutExpired):
                    pass
            stop_process_tree(self.fleet, timeout=5)
            self._read_browser_events()
            self.fleet = None
        if self.server is not None:
            self.server.stop()
            self.server = None

    # ------------------------------------------------------------------ the TFLite devices

    def _status(self) -> dict:
        import urllib.request

        with urllib.request.urlopen(f"{self.url}/v1/federations/{self.settings.model_name}/status", timeout=10) as r:
            return json.loads(r.read())

    def _hold(self, task: dict, behaviour: str) -> None:
        """A late device waits for its task to close (or its deadline), a stale one for a newer
        round; both give up waiting when the fleet stops."""
        round, deadline = int(task["round"]), _unix(task.get("deadline"))
        while not self.halt.wait(self.options.poll_seconds):
            try:
                status = self._status()
            except OSError:
                continue
            newer = int(status.get("round") or 0) > round
            open_ = any(t.get("task_id") == task["task_id"] and t.get("open") for t in status.get("tasks") or [])
            if newer or (behaviour == "late" and (not open_ or (deadline and time.time() > deadline + 0.5))):
                return

    def _device_loop(self, device: str, x: np.ndarray, y: np.ndarray) -> None:
        from .device import DeviceClient, LocalData

        class Dropped(Exception):
            pass

        def on_event(kind: str, info: dict) -> None:
            if kind == "trained":
                task, report = info["task"], info["report"]
                behaviour = self.options.behaviour(device, int(task["round"]))
                report.detail = behaviour
                if behaviour == "drop":
                    report.status = "dropped"
                    raise Dropped()
                if behaviour in ("late", "stale"):
                    self._hold(task, behaviour)
            elif kind == "done":
                report = info["report"]
                row = {"event": "update", "kind": "tflite", "device": device, "round": report.round,
                       "task_id": report.task_id, "status": report.status,
                       "behaviour": report.detail if report.detail in BEHAVIOURS else "normal",
                       "train_seconds": report.train_seconds, "seconds": report.seconds,
                       "bytes_up": report.bytes_up, "bytes_down": report.bytes_down,
                       "model_bytes": report.model_bytes, "examples": report.examples, "time": time.time()}
                with self.lock:
                    self.events.append(row)

        client = DeviceClient(self.url, self.settings.model_name, LocalData(np.asarray(x), np.asarray(y), device),
                              self.folder / "devices" / device, kind=DEVICE_KIND, poll=self.options.poll_seconds,
                              seed=self.options.seed, retries=3, on_event=on_event)
        try:
            while not self.halt.is_set():
                try:
                    client.run(rounds=1, wait=self.options.poll_seconds * 2)
                except Dropped:
                    task_id = client.summary.tasks[-1].task_id
                    client._skip.add(task_id)  # this device never posts for that task
                    client.state.clear_pending(client.model)
                except Exception as exc:  # a server that went away, a refused enrolment: note it, go on
                    with self.lock:
                        self.errors.append(f"{device}: {type(exc).__name__}: {exc}")
                    if self.halt.wait(1.0):
                        break
        finally:
            client.close()

    # ------------------------------------------------------------------ results

    def _read_browser_events(self) -> None:
        path = self.folder / "browsers.jsonl"
        if not path.exists():
            return
        for line in path.read_text(errors="replace").splitlines():
            try:
                event = json.loads(line)
            except ValueError:
                continue
            if event.get("event") == "update":
                with self.lock:
                    self.events.append({"kind": "browser", **event})
            elif event.get("event") == "done":
                self._browser_summary = event.get("summary")
            elif event.get("event") == "error":
                with self.lock:
                    self.errors.append(f"{event.get('device')}: {event.get('detail')}")

    def report(self) -> dict:
        """Per client kind: updates by status, and the mean train seconds and bytes of an update."""
        with self.lock:
            events = list(self.events)
        kinds: dict[str, dict] = {}
        for kind in sorted({e["kind"] for e in events}):
            rows = [e for e in events if e["kind"] == kind]
            sent = [e for e in rows if e.get("status") not in ("dropped", "started")]
            trained = [e for e in rows if e.get("train_seconds")]
            statuses: dict[str, int] = {}
            for e in rows:
                statuses[str(e.get("status"))] = statuses.get(str(e.get("status")), 0) + 1
            kinds[kind] = {
                "updates": len(rows), "statuses": statuses,
                "train_seconds_mean": _mean([float(e["train_seconds"]) for e in trained]),
                "train_seconds_max": max((float(e["train_seconds"]) for e in trained), default=None),
                "bytes_up_mean": _mean([float(e.get("bytes_up") or 0) for e in sent]),
                "bytes_down_mean": _mean([float(e.get("bytes_down") or 0) for e in rows]),
                "examples_mean": _mean([float(e.get("examples") or 0) for e in rows]),
            }
        return {"kinds": kinds, "events": events, "errors": list(self.errors), "browser_summary": self._browser_summary}


def _import_tflite() -> None:
    import warnings

    from core.tensorflow import import_tensorflow

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import_tensorflow().lite.Interpreter  # noqa: B018 (tf.lite is imported on first touch)


def _mean(values: list[float]) -> float | None:
    return float(np.mean(values)) if values else None


def _unix(iso: str | None) -> float | None:
    if not iso:
        return None
    from datetime import datetime

    try:
        return datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


def _last_line(path: Path) -> str:
    try:
        lines = [ln for ln in path.read_text(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return "no output"
    return lines[-1] if lines else "no output"
