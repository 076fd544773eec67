"""Run the real `pollinate serve` in a subprocess on 127.0.0.1 and wait until it answers."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[2]
START_TIMEOUT_S = 30


def wait_healthy(base: str, proc: subprocess.Popen, timeout: float, explain=lambda: "") -> None:
    """Until `base`/healthz answers 200; fails with `explain()` (e.g. the log) if `proc` exits first
    or the time runs out."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            if httpx.get(f"{base}/healthz", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"{base} did not come up:\n{explain()}")
        time.sleep(0.05)


class LiveServer:
    """`python -m pollinate serve --port 0 --json ...`; the first stdout line gives the URL."""

    def __init__(self, home: Path, *args: str, log: Path, env: dict[str, str | None] | None = None):
        self.home = Path(home)
        self.args = args
        self.log = Path(log)
        self.env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
        for key in ("POLLINATE_ADMIN_TOKEN", "POLLINATE_CORS_ORIGINS", "POLLINATE_WEB_CLIENT",
                    "POLLINATE_HOME", "PROMETHEUS_MULTIPROC_DIR", "POLLINATE_SERVER"):
            self.env.pop(key, None)
        for key, value in (env or {}).items():
            if value is None:
                self.env.pop(key, None)
            else:
                self.env[key] = value
        self.proc: subprocess.Popen | None = None
        self.url = ""

    def start(self) -> LiveServer:
        command = [sys.executable, "-m", "pollinate", "serve", "--home", str(self.home), "--port", "0",
                   "--json", *self.args]
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(command, cwd=REPO, env=self.env, stdout=subprocess.PIPE, stderr=log,
                                         text=True, start_new_session=True)
        line = self.proc.stdout.readline()
        if not line:
            self.proc.wait(timeout=10)
            raise RuntimeError(f"pollinate serve exited ({self.proc.returncode}):\n{self.log.read_text()}")
        self.url = json.loads(line)["url"]
        try:
            wait_healthy(self.url, self.proc, START_TIMEOUT_S, self.log.read_text)
        except RuntimeError:
            self.stop()
            raise
        return self

    def kill9(self) -> None:
        """SIGKILL the server's process group (uvicorn and any workers): no clean shutdown."""
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=10)

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)

    def __enter__(self) -> LiveServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
