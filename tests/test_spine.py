"""The shape of the code: which room may import which (DESIGN.md's table), plus the stack's pins.

A room importing the CLI package, or the registry growing a dependency on the server, would
still pass every behavioural test; these checks catch it where it is written.
"""

from __future__ import annotations

import ast
import importlib.metadata
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO

ROOMS = ("core", "registry", "training", "export", "federated", "server", "pollinate")
# DESIGN.md: who may import whom (plus core, the bottom every room may use). `pollinate` is
# the CLI composer: it may import everything, and nothing imports it.
ALLOWED = {
    "core": set(),
    "registry": {"core"},
    "training": {"core", "registry"},
    "export": {"core", "registry", "training"},
    "federated": {"core", "registry", "training", "export"},
    "server": {"core", "registry"},
    "pollinate": set(ROOMS),
}


def imported_rooms(path: Path) -> set[str]:
    """Every first-party top-level package that the module imports, anywhere in the file."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module.split(".")[0])
    return found & set(ROOMS)


@pytest.mark.parametrize("room", ROOMS)
def test_rooms_import_only_what_the_design_allows(room: str) -> None:
    bad = []
    for path in sorted((REPO / room).rglob("*.py")):
        extra = imported_rooms(path) - ALLOWED[room] - {room}
        if extra:
            bad.append(f"{path.relative_to(REPO)} imports {', '.join(sorted(extra))}")
    assert not bad, "\n".join(bad)


# Outside clients of the public HTTP API, by design: the reference device client is the executable
# spec of docs/device-protocol.md, and an own-data SuperNode on another machine reads the model's
# input spec from the server's manifest. They use only documented routes.
HTTP_CLIENTS = {"federated/device.py", "federated/own_data.py"}


def test_only_the_server_room_knows_its_routes() -> None:
    """The admin client lives beside the routes; no other room spells a server path, except the
    documented outside clients above."""
    offenders = [str(p.relative_to(REPO)) for room in ROOMS if room != "server"
                 for p in (REPO / room).rglob("*.py") if "/v1/models/" in p.read_text()]
    assert sorted(set(offenders) - HTTP_CLIENTS) == []


def test_the_registry_needs_only_the_standard_library() -> None:
    probe = ("import sys; import registry, registry.store, registry.channels; "
             "print(sorted(m for m in ('numpy', 'typer', 'rich', 'fastapi', 'tensorflow') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=REPO, check=True)
    assert result.stdout.strip() == "[]"


def test_the_stack_is_current_flower_on_tensorflow_2_19() -> None:
    version = importlib.metadata.version
    assert version("flwr") == "1.42.0"
    assert version("tensorflow") == "2.19.0"  # 2.20+ drops the Flex delegate (tflite-train)
    assert version("keras").startswith("3.")
    assert version("numpy").startswith("2.1.")
    assert version("psutil")


def test_pip_check_reports_only_the_known_tensorflowjs_pin() -> None:
    """tensorflowjs is installed without its stale `packaging~=23.1` pin (pyproject.toml's
    `converter` extra): that one line is expected from `pip check`, and nothing else may be."""
    result = subprocess.run([sys.executable, "-m", "pip", "check"], capture_output=True, text=True)
    lines = [line for line in result.stdout.splitlines() if line.strip()]
    unexpected = [line for line in lines if not line.startswith("tensorflowjs 4.22.0 has requirement packaging~=23.1")]
    assert unexpected == [] or unexpected == ["No broken requirements found."], result.stdout
    # and the converter imports and runs its entry point with the newer packaging
    probe = "import tensorflowjs.converters.converter as c; print(callable(c.convert))"
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=300)
    assert result.stdout.strip().endswith("True"), result.stderr[-2000:]
