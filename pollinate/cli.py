"""The `pollinate` console script: composes the subcommands that each room defines in its
own `cli.py`. Nothing here imports TensorFlow, so `pollinate --help` answers at once."""

from __future__ import annotations

import sys

import typer

from registry.cli import app as models_app
from registry.errors import PollinateError
from training.cli import train

from .demo import demo

app = typer.Typer(
    name="pollinate",
    help="Train Keras models, export them to TF.js and TFLite, federate with Flower, serve every version.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
app.add_typer(models_app, name="models")
app.command("train")(train)
app.command("demo")(demo)


def main() -> None:
    """Entry point: bad input becomes one `error:` line and exit code 2, never a traceback."""
    try:
        app()
    except PollinateError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    main()
