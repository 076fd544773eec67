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


def stored_once(name: str, home: Path, build) -> Path:
    """A store at `home` as `build(home)` makes it; where POLLINATE_TEST_CACHE names a folder
    (scripts/test.sh makes one per run), built once per run under that name and copied (a store
    is a folder: SQLite and files, no absolute paths). The node tests copy the same templates
    (web_client/test-support/server.mjs), so they must be built the same way there."""
    import fcntl
    import shutil

    cache = os.environ.get("POLLINATE_TEST_CACHE")
    if not cache:
        build(home)
        return home
    template = Path(cache) / name
    with open(Path(cache) / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one xdist worker builds it, the others wait and copy
        if not template.is_dir():
            building = Path(cache) / f"{name}.building"
            shutil.rmtree(building, ignore_errors=True)
            build(building)
            building.rename(template)
    shutil.copytree(template, home)
    return home


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
