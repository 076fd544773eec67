"""The `pollinate` console script: composes the subcommands that each room defines in its
own `cli.py`. Nothing here imports TensorFlow, so `pollinate --help` answers at once."""

from __future__ import annotations

import os
import signal
import sys
import warnings

import typer

import registry.cli
import registry.monitor_cli
from core.errors import PollinateError
from export.cli import export, predict
from federated.cli import app as federate_app
from registry.cli import app as models_app
from server.cli import serve
from training.cli import make_train_command

from .demo import demo


def export_on_train(say):
    """`pollinate train` publishes each version with its verified exports (lazy import)."""
    from export.pipeline import export_for_publish

    return export_for_publish(progress=say)


def remote_channels(server_url: str):
    """`pollinate models promote|rollback --server URL`: the server room's admin client."""
    from server.admin_client import AdminClient

    return AdminClient(server_url)


def attach_profile(store, name, version):
    """`pollinate models profile`: training rebuilds the data and computes the profile (lazy import)."""
    from training.central import attach_profile as attach

    return attach(store, name, version)


def monitor_plots(report, timeline, folder, **options):
    """`pollinate monitor --plot DIR`: matplotlib lives in training/ (lazy import)."""
    from training.monitor_plots import write_plots

    return write_plots(report, timeline, folder, **options)


registry.cli.remote_channels = remote_channels
registry.cli.attach_profile = attach_profile
registry.monitor_cli.plotter = monitor_plots

app = typer.Typer(
    name="pollinate",
    help="Train Keras models, export them to TF.js and TFLite, federate with Flower, serve every version.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
app.add_typer(models_app, name="models")
app.add_typer(federate_app, name="federate")
app.command("train")(make_train_command(export_on_train))
app.command("export")(export)
app.command("predict")(predict)
app.command("demo")(demo)
app.command("serve")(serve)
app.command("monitor")(registry.monitor_cli.monitor)


def main() -> None:
    """Entry point: bad input becomes one `error:` line and exit code 2, never a traceback."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")  # TensorFlow's C++ INFO/WARNING lines
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")  # Ray's FutureWarning on CPU-only runs
    warnings.filterwarnings("ignore", message="__array__ implementation doesn't accept a copy keyword")
    # the same for child processes (Ray actors running simulated clients, Flower's subprocesses)
    os.environ.setdefault("PYTHONWARNINGS", "ignore::DeprecationWarning")
    # SIGTERM (a service manager, `timeout`, kill) unwinds like Ctrl-C, so commands that started
    # processes (federate up, simulate, run) stop them on the way out; uvicorn installs its own.
    signal.signal(signal.SIGTERM, _terminate)
    try:
        app()
    except PollinateError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)


def _terminate(signum, frame) -> None:
    """SIGTERM as Ctrl-C (typer exits 130): `with` blocks and `finally` stop what was started."""
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # a second SIGTERM kills at once
    raise KeyboardInterrupt


if __name__ == "__main__":
    main()
