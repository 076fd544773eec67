"""Flower's own processes, started and stopped from Python: a SuperLink, `flwr run`.

Flower 1.42 (measured): the SuperLink serves its Fleet, Control and runtime APIs over HTTP on
one `--host/--port`; in `--simulation` mode it runs each submitted app with the Simulation
Engine (virtual SuperNodes in Ray actors) in processes of its own, started through its
SuperExec. `flwr run APP CONNECTION` builds a FAB (a copy of the app's .py/.toml/.md files)
and submits it; `--stream` follows the run's log until the run ends. With no network, the
SuperLink must not try to install the app's dependencies
(`--disable-runtime-dependency-installation`): they are this virtual environment.

Everything Flower keeps (its config.toml, installed FABs, the SuperLink's database) lives
under FLWR_HOME, which we put inside the store.

`pollinate federate up` starts a whole edge federation on loopback from these pieces: a
`pollinate serve` on the store (the device endpoint, ServeProcess), a SuperLink, gateway and
own-data SuperNodes (`pollinate federate supernode` processes, start_pollinate), then the run;
every process it started is stopped on exit, on errors and on Ctrl-C.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from core.errors import PollinateError

# The Flower app `flwr run` submits: a folder holding only its pyproject.toml ([tool.flwr.app]),
# whose components are imported from this package, checkout or wheel alike.
APP_DIR = Path(__file__).resolve().parent / "flower_app"
STARTUP_TIMEOUT = 60.0


def flower_bin(name: str) -> str:
    """Flower's executables beside this interpreter (no activated venv needed)."""
    path = Path(sys.executable).parent / name
    return str(path) if path.exists() else (shutil.which(name) or name)


def flower_env(flwr_home: Path) -> dict:
    """The environment for Flower's processes: FLWR_HOME inside the store, our scripts on PATH."""
    flwr_home = Path(flwr_home).resolve()
    flwr_home.mkdir(parents=True, exist_ok=True)
    # Flower's processes start helpers by name (flower-superexec, flwr-serverapp, flwr-simulation,
    # flwr-clientapp): put this interpreter's scripts first on PATH, even when the venv is not activated
    scripts = str(Path(sys.executable).parent)
    path = os.pathsep.join([scripts, os.environ.get("PATH", "")])
    return {**os.environ, "FLWR_HOME": str(flwr_home), "TF_CPP_MIN_LOG_LEVEL": "3", "PATH": path,
            "RAY_DEDUP_LOGS": "0", "FLWR_DISABLE_UPDATE_CHECK": "1"}


def write_flower_config(flwr_home: Path, name: str, connection: dict) -> Path:
    """FLWR_HOME/config.toml with one SuperLink connection, the default."""
    lines = ["[superlink]", f'default = "{name}"', "", f"[superlink.{name}]"]
    lines += [f"{key} = {json.dumps(value)}" for key, value in connection.items()]
    path = Path(flwr_home) / "config.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def write_run_config(path: Path, config: dict) -> Path:
    """A TOML file of run-config overrides for `flwr run --run-config FILE` (values with
    spaces or quotes, such as a JSON dataset recipe, survive a file, not a command line)."""
    lines = []
    for key, value in config.items():
        if isinstance(value, bool):
            text = "true" if value else "false"
        elif isinstance(value, (int, float)):
            text = repr(value)
        else:
            text = json.dumps(str(value))  # a TOML basic string
        lines.append(f"{key} = {text}")
    path.write_text("\n".join(lines) + "\n")
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def port_open(host: str, port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex((host, port)) == 0


def healthy(address: str) -> bool:
    try:
        with urllib.request.urlopen(f"http://{address}/health", timeout=1) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError):
        return False


class LocalSuperLink:
    """A SuperLink on a free loopback port, owned by this process: started in `__enter__`,
    stopped (with everything it started: SuperExec, the simulation, Ray) in `__exit__`, also
    on errors and Ctrl-C."""

    def __init__(self, flwr_home: Path, *, simulation: bool = True, log_name: str = "superlink.log"):
        self.flwr_home = Path(flwr_home).resolve()
        self.simulation = simulation
        self.log_path = self.flwr_home / log_name
        self.process: subprocess.Popen | None = None
        self.address = ""
        self.env = flower_env(self.flwr_home)

    def __enter__(self) -> LocalSuperLink:
        for _ in range(3):  # a free port can be taken between choosing it and binding it
            port = free_port()
            self.address = f"127.0.0.1:{port}"
            command = [flower_bin("flower-superlink"), "--insecure", "--isolation", "subprocess",
                       "--host", "127.0.0.1", "--port", str(port),
                       "--database", str(self.flwr_home / "superlink.db"),
                       "--disable-runtime-dependency-installation"]
            if self.simulation:
                command.append("--simulation")
            with open(self.log_path, "ab") as log:
                self.process = subprocess.Popen(command, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                                stdin=subprocess.DEVNULL, start_new_session=True)
            deadline = time.monotonic() + STARTUP_TIMEOUT
            while time.monotonic() < deadline and self.process.poll() is None:
                if healthy(self.address):
                    write_flower_config(self.flwr_home, "local", {"address": self.address, "insecure": True})
                    return self
                time.sleep(0.1)
            self.stop()
        raise PollinateError(f"the Flower SuperLink did not start; see {self.log_path}")

    def __exit__(self, *exc) -> None:
        self.stop()

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM to the SuperLink and every process it started (they run in sessions of
        their own, so a process group is not enough), SIGKILL to what is left."""
        if self.process is None:
            return
        stop_process_tree(self.process, timeout)
        self.process = None


# A simulation's server is its own (on 127.0.0.1, for the simulation's processes only), and
# all of its simulated browsers and devices enrol and report from that one address: the
# per-address limits that protect a real server (docs/deployment.md) would throttle the
# simulation itself. `pollinate federate up` serves real devices and keeps the defaults.
SIMULATION_SERVER_ENV = {
    "POLLINATE_ENROL_RATE": "100000",      # enrolments a minute per address
    "POLLINATE_TELEMETRY_RATE": "100000",  # telemetry and feedback batches a minute per address
}


class ServeProcess:
    """`pollinate serve --json` on a store, in a process of its own; `url` once it answers.
    `env`: variables for that server only (a simulation's: SIMULATION_SERVER_ENV)."""

    def __init__(self, home: Path, *, host: str = "127.0.0.1", port: int = 0, log_path: Path,
                 env: dict[str, str] | None = None):
        self.home = Path(home).resolve()
        self.host = host
        self.port = port
        self.log_path = Path(log_path)
        self.env = dict(env or {})
        self.process: subprocess.Popen | None = None
        self.url = ""

    def __enter__(self) -> ServeProcess:
        command = [sys.executable, "-m", "pollinate", "serve", "--home", str(self.home), "--host", self.host,
                   "--port", str(self.port), "--json"]
        env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", **self.env}
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=log,
                                            stdin=subprocess.DEVNULL, text=True, start_new_session=True)
        line = self.process.stdout.readline()
        try:
            self.url = json.loads(line)["url"] if line else ""
        except (ValueError, KeyError):
            self.url = ""
        deadline = time.monotonic() + STARTUP_TIMEOUT
        while self.url and self.process.poll() is None and time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"{self.url}/healthz", timeout=1) as response:
                    if response.status == 200:
                        return self
            except (urllib.error.URLError, OSError):
                time.sleep(0.1)
        self.stop()
        raise PollinateError(f"pollinate serve did not start on {self.host}:{self.port}{_last_line(self.log_path)}; "
                             f"see {self.log_path}")

    def __exit__(self, *exc) -> None:
        self.stop()

    def stop(self) -> None:
        if self.process is not None:
            stop_process_tree(self.process, timeout=10)
            self.process = None


def start_pollinate(args: list[str], log_path: Path) -> subprocess.Popen:
    """`pollinate ARGS` in a process (and session) of its own, its output into `log_path`."""
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    with open(log_path, "ab") as log:
        return subprocess.Popen([sys.executable, "-m", "pollinate", *args], env=env, stdout=log,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)


def follow_progress(progress: Path, runner: subprocess.Popen, on_round=None, on_tick=None) -> dict | None:
    """Tail a ServerApp progress file (JSON lines, see server_app.py) until `runner` ends or the
    outcome (or the error) is written; returns that final record. `on_tick()`, called about
    every second, may raise to stop following (e.g. a piece of the federation died)."""
    offset, buffer, final, ticked = 0, "", None, time.monotonic()
    while True:
        finished = runner.poll() is not None  # read once more after the run ended
        if progress.exists():
            with open(progress) as handle:
                handle.seek(offset)
                chunk = handle.read()
                offset = handle.tell()
            buffer += chunk
            *lines, buffer = buffer.split("\n")
            for line in lines:
                if not line.strip():
                    continue
                record = json.loads(line)
                if record["event"] == "round":
                    if on_round:
                        on_round(record["row"])
                else:
                    final = record
        if final is not None or finished:
            return final
        if on_tick and time.monotonic() - ticked > 1:
            ticked = time.monotonic()
            on_tick()
        time.sleep(0.2)


def _last_line(path: Path) -> str:
    """': <the log's last line>' (an error message stays one line), or ''."""
    try:
        lines = [ln.strip() for ln in Path(path).read_text(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return ""
    return f": {lines[-1]}" if lines else ""


def stop_process_tree(process: subprocess.Popen, timeout: float = 10.0) -> None:
    import psutil

    try:
        root = psutil.Process(process.pid)
        tree = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        tree = []
    for p in tree:
        with contextlib.suppress(psutil.Error):
            p.send_signal(signal.SIGTERM)
    _, alive = psutil.wait_procs(tree, timeout=timeout)
    for p in alive:
        with contextlib.suppress(psutil.Error):
            p.kill()
    psutil.wait_procs(alive, timeout=5)
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(timeout=1)
