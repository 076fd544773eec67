"""What every `pollinate` subcommand shares: the `--home` and `--json` options, where
human output goes, and how results are printed.

With `--json`, stdout carries exactly one JSON document and everything meant for a person
(progress, tables) goes to stderr, so `pollinate ... --json | jq` always works.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console

DEFAULT_HOME = Path(".pollinate")

HomeOption = Annotated[
    Path,
    typer.Option(
        "--home",
        envvar="POLLINATE_HOME",
        help="The store folder (SQLite + files). Default: $POLLINATE_HOME, else ./.pollinate",
        show_default=False,
    ),
]
JsonOption = Annotated[bool, typer.Option("--json", help="Print a machine-readable summary on stdout.")]


def human_console(as_json: bool) -> Console:
    """Where tables and progress go: stdout normally, stderr when stdout is reserved for JSON."""
    return Console(stderr=as_json, highlight=False)


def print_json(payload: Any) -> None:
    sys.stdout.write(json.dumps(payload, indent=2, sort_keys=True, default=str) + "\n")
    sys.stdout.flush()
