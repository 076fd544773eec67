"""`pollinate federate up` as a test starts it: a real process on loopback, in a session of its
own, on a copy of a template store."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from conftest import REPO


@dataclass
class Up:
    process: subprocess.Popen
    url: str  # the device endpoint's base URL
    lines: list[str] = field(default_factory=list)  # stderr up to the "Device endpoint" line


@contextlib.contextmanager
def federate_up(template: Path, home: Path, *args: str, stdout=subprocess.PIPE) -> Iterator[Up]:
    """`federate up --model digits --port 0 --formats "" --json ARGS` on a copy of `template` at
    `home`; yields once it prints its device endpoint. On the way out a process still running
    gets SIGTERM (federate up stops serve, the SuperLink and the gateways itself), then SIGKILL
    for its whole session after 60 s."""
    shutil.copytree(template, home)
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    env.pop("POLLINATE_HOME", None)
    process = subprocess.Popen([sys.executable, "-m", "pollinate", "federate", "up", "--model", "digits", "--port", "0",
                                "--formats", "", "--json", *args, "--home", str(home)],
                               cwd=REPO, env=env, stdout=stdout, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        lines: list[str] = []
        while not lines or not lines[-1].startswith("Device endpoint"):
            line = process.stderr.readline()
            assert line, "".join(lines) + process.stderr.read()
            lines.append(line)
        yield Up(process, lines[-1].split()[2], lines)
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
