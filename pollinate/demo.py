"""`pollinate demo`: the whole loop on the embedded defaults, for a first look.

Today: train the digits CNN, export it (TF.js + every TFLite variant, verified), register it,
point the `stable` channel at it, and print what was made. Federation and serving join here
as their rooms land.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from .console import HomeOption, JsonOption, human_console, open_store, print_json


def demo(
    epochs: Annotated[int, typer.Option("--epochs", help="Central training epochs.")] = 15,
    seed: Annotated[int, typer.Option("--seed")] = 0,
    home: HomeOption = Path(".pollinate"),
    as_json: JsonOption = False,
) -> None:
    """Run the loop end to end on the digits data and print what it made."""
    from training.cli import print_outcome, run_training

    from .cli import export_on_train
    from training.datasets import load_dataset

    out = human_console(as_json)
    store = open_store(home)
    out.rule("[bold]Pollinate demo[/]")
    out.print(f"Store: {Path(home).resolve()}")
    data = load_dataset("digits")
    outcome = run_training(store, data, model="cnn", epochs=epochs, seed=seed, console=out, export_hook=export_on_train)
    print_outcome(out, outcome)
    record = outcome.record
    channel = store.set_channel(record.model, "stable", record.version)
    out.print(f"Channel [bold]stable[/] of {record.model} now points at v{channel.version}.")
    out.print("\nNext:")
    out.print(f"  pollinate models show {record.model} --home {home}")
    out.print(f"  pollinate models files {record.model} --format report --out ./report --home {home}")
    if as_json:
        print_json({"training": outcome.summary(), "channels": {"stable": channel.to_dict()},
                    "home": str(Path(home).resolve())})
