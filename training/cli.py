"""`pollinate train`: fit a zoo model on a dataset and register it as a new version."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Optional

import typer

from core.console import HomeOption, JsonOption, human_console, print_json
from registry import open_store

# Given a progress callback, returns the hook that exports a freshly trained model before it is
# published (see training.central.ArtifactHook). The CLI layer injects it: training does not
# import export/.
ExportHookFactory = Callable[[Callable[[str], None]], object]


def make_train_command(export_hook: ExportHookFactory | None = None):
    """The `pollinate train` command, exporting each new version when `export_hook` is given."""

    def train(
        dataset: Annotated[Optional[str], typer.Option("--dataset", "-d", help="digits | delivery-eta")] = None,
        csv: Annotated[Optional[Path], typer.Option("--csv", help="Train on your own CSV file instead.")] = None,
        target: Annotated[Optional[str], typer.Option("--target", help="The CSV column to predict.")] = None,
        task: Annotated[str, typer.Option("--task", help="classification | regression | auto (CSV only)")] = "auto",
        drop_missing: Annotated[bool, typer.Option("--drop-missing", help="Drop CSV rows with missing/NaN values instead of refusing them.")] = False,
        model: Annotated[Optional[str], typer.Option("--model", "-m", help="cnn | mlp (default: cnn for images, mlp for tables)")] = None,
        epochs: Annotated[int, typer.Option("--epochs", "-e", help="Training epochs.")] = 15,
        seed: Annotated[int, typer.Option("--seed", help="Random seed: the same seed trains the same weights.")] = 0,
        batch_size: Annotated[int, typer.Option("--batch-size")] = 32,
        learning_rate: Annotated[Optional[float], typer.Option("--learning-rate", help="Adam step size (default per model: cnn 3e-3, mlp 1e-3).")] = None,
        width: Annotated[Optional[int], typer.Option("--width", help="Layer width of the zoo model (default per model).")] = None,
        name: Annotated[Optional[str], typer.Option("--name", help="Model name in the store (default: the dataset's).")] = None,
        home: HomeOption = Path(".pollinate"),
        as_json: JsonOption = False,
        export: Annotated[bool, typer.Option("--export/--no-export", help="Export to TF.js + TFLite and verify before publishing.")] = True,
    ) -> None:
        """Train a model, evaluate it on the test split, and register it as the next version."""
        from registry.store import check_model_name
        from training.datasets import load_dataset

        out = human_console(as_json)
        if name is not None:
            check_model_name(name)
        # read and check the data before the store is touched: bad input writes nothing
        data = load_dataset(dataset, csv=csv, target=target, task=task, drop_missing=drop_missing)
        store = open_store(home)
        outcome = run_training(store, data, model=model, epochs=epochs, seed=seed, batch_size=batch_size,
                               learning_rate=learning_rate, width=width, name=name, console=out,
                               export_hook=export_hook if export else None)
        if as_json:
            print_json(outcome.summary())
        else:
            print_outcome(out, outcome)

    return train


def run_training(store, data, *, model, epochs, seed, batch_size=32, learning_rate=None, width=None, name=None,
                 console, export_hook: ExportHookFactory | None = None):
    """Train with a live progress bar (shared by `train` and `demo`); export before publishing
    when `export_hook` is given."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from training.central import TrainSettings, train_and_register

    settings = TrainSettings(
        model=model or ("cnn" if data.kind == "image" else "mlp"),
        epochs=epochs, seed=seed, batch_size=batch_size, learning_rate=learning_rate, width=width,
    )
    settings.check()
    console.print(
        f"[bold]Training[/] {settings.model} on {data.name} "
        f"({len(data.x_train)} train / {len(data.x_val)} validation / {len(data.x_test)} test, {data.task})"
    )
    with Progress(
        TextColumn("epoch"), MofNCompleteColumn(), BarColumn(), TextColumn("{task.fields[logs]}"),
        TimeElapsedColumn(), console=console, transient=False,
    ) as progress:
        task_id = progress.add_task("train", total=settings.epochs, logs="")

        def on_epoch(done: int, total: int, logs: dict) -> None:
            shown = "  ".join(
                f"{k.replace('accuracy', 'acc')} {logs[k]:.4g}" for k in ("loss", "val_loss", "val_accuracy", "val_mae") if k in logs
            )
            progress.update(task_id, completed=done, logs=shown)

        def say(message: str) -> None:
            progress.update(task_id, logs=message)

        hook = export_hook(say) if export_hook else None
        return train_and_register(store, data, settings, name=name, on_epoch=on_epoch, extra_artifacts=hook)


def print_outcome(console, outcome) -> None:
    from rich.table import Table

    record = outcome.record
    table = Table(title=f"{record.model} v{record.version}", show_header=True)
    table.add_column("metric")
    table.add_column("model", justify="right")
    table.add_column(f"baseline ({outcome.evaluation['baseline']['kind']})", justify="right")
    baseline = outcome.evaluation["baseline"]
    for key in ("accuracy", "loss", "mae", "rmse"):
        if key in record.metrics:
            table.add_row(key, f"{record.metrics[key]:.4f}", f"{baseline[key]:.4f}" if key in baseline else "")
    for key in ("macro_f1", "ece", "r2"):
        if key in record.metrics:
            table.add_row(key, f"{record.metrics[key]:.4f}", "")
    console.print(table)
    console.print(
        f"Registered [bold]{record.model} v{record.version}[/] "
        f"({outcome.parameters:,} parameters, trained in {outcome.train_seconds:.1f}s); "
        f"formats: {', '.join(sorted(record.artifacts))}"
    )
