"""Shared fixtures: a fresh store per test, and a way to run the real `pollinate` script."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def home(tmp_path: Path) -> Path:
    return tmp_path / "store"


def run_cli(*args: str, home: Path | None = None, check: bool = False, timeout: float = 600) -> subprocess.CompletedProcess:
    """Run `pollinate ARGS` in a real subprocess (the installed console script's module)."""
    command = [sys.executable, "-m", "pollinate", *args]
    if home is not None:
        command += ["--home", str(home)]
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "COLUMNS": "200"}
    env.pop("POLLINATE_HOME", None)
    result = subprocess.run(command, capture_output=True, text=True, cwd=REPO, env=env, timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"pollinate {' '.join(args)} failed ({result.returncode}):\n{result.stderr}")
    return result


def cli_json(*args: str, home: Path) -> dict:
    result = run_cli(*args, "--json", home=home, check=True)
    return json.loads(result.stdout)


def processes_naming(path) -> list[list[str]]:
    """Command lines of running processes that mention `path` (a test's store): what a command
    under test left running."""
    import psutil

    found = []
    for process in psutil.process_iter(["cmdline"]):
        try:
            if str(path) in " ".join(process.info["cmdline"] or []):
                found.append(process.info["cmdline"])
        except psutil.Error:
            pass
    return found
