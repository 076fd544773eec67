"""What every `pollinate` subcommand shares: the `--home` and `--json` options, where
human output goes, and how results are printed.

With `--json`, stdout carries exactly one JSON document and everything meant for a person
(progress, tables) goes to stderr, so `pollinate ... --json | jq` always works.
"""

from __future__ import annotations

import json
import os
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
    """Where tables and progress go: stdout normally, stderr when stdout is reserved for JSON.
    Piped or logged (no terminal, no $COLUMNS), tables get 160 columns rather than rich's 80,
    which cut the export table's numbers short ("6,863…")."""
    stream = sys.stderr if as_json else sys.stdout
    piped = not (hasattr(stream, "isatty") and stream.isatty()) and not os.environ.get("COLUMNS")
    return Console(stderr=as_json, highlight=False, width=160 if piped else None)


def print_json(payload: Any) -> None:
    sys.stdout.write(json.dumps(payload, indent=2, sort_keys=True, default=str) + "\n")
    sys.stdout.flush()
