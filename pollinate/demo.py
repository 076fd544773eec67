"""`pollinate demo`: the whole loop on the embedded defaults, for a first look.

1. train the digits CNN centrally, export it (TF.js + every TFLite variant, verified) and
   register it; the `stable` channel points at it;
2. improve it with a short Flower federation (simulated clients with non-IID data): every
   round becomes a version, exported and published, and the `canary` channel moves to it
   unless the acceptance gate holds it (worse than the last accepted round);
3. serve the store over HTTP and print the URL to open.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from core.console import HomeOption, JsonOption, human_console, print_json
from registry import open_store


def demo(
    epochs: Annotated[int, typer.Option("--epochs", help="Central training epochs.")] = 15,
    rounds: Annotated[int, typer.Option("--rounds", help="Federated rounds (0 to skip the federation).")] = 3,
    clients: Annotated[int, typer.Option("--clients", help="Simulated federated clients.")] = 10,
    seed: Annotated[int, typer.Option("--seed")] = 0,
    serve: Annotated[bool, typer.Option("--serve/--no-serve", help="Serve the store at the end (until Ctrl-C).")] = True,
    port: Annotated[int, typer.Option("--port", help="Port for the server (0: any free port).")] = 8000,
    home: HomeOption = Path(".pollinate"),
    as_json: JsonOption = False,
) -> None:
    """Run the loop end to end on the digits data: train, export, federate, serve."""
    from dataclasses import replace

    from export.node_runner import check_runner
    from server.config import ServerConfig
    from server.serving import prepare
    from training.cli import print_outcome, run_training
    from training.datasets import load_dataset

    from .cli import export_on_train

    out = human_console(as_json)
    store = open_store(home)
    # Everything that could fail late fails now, before minutes of training: Node and the TF.js
    # runner (export verifies TF.js), the demo page with its TF.js files, the port.
    check_runner()
    config = replace(ServerConfig.from_env(), home=Path(home).resolve(), offload=None)
    if serve:
        prepare(config, host="127.0.0.1", port=port)
    out.rule("[bold]Pollinate demo[/]")
    out.print(f"Store: {Path(home).resolve()}")
    out.rule("1. central training + export")
    data = load_dataset("digits")
    outcome = run_training(store, data, model="cnn", epochs=epochs, seed=seed, console=out, export_hook=export_on_train)
    print_outcome(out, outcome)
    record = outcome.record
    stable = store.set_channel(record.model, "stable", record.version)
    out.print(f"Channel [bold]stable[/] of {record.model} → v{stable.version}.")
    summary = {"home": str(Path(home).resolve()), "training": outcome.summary(), "channels": {"stable": stable.to_dict()}}

    if rounds > 0:
        out.rule("2. federated rounds (Flower simulation)")
        summary["federation"] = federate(out, home, record.model, record.version, rounds, clients, seed)

    for name, state in store.list_channels(record.model).items():
        summary["channels"][name] = state.to_dict()
    out.rule("what was made")
    for version in store.list_versions(record.model):
        origin = version.lineage.source + (f" round {version.lineage.round}" if version.lineage.round else "")
        metric = version.metrics.get("accuracy")
        out.print(f"  v{version.version}  {origin:<16} accuracy {metric:.4f}  formats: {', '.join(sorted(version.artifacts))}")
    out.print("  channels: " + ", ".join(f"{c} → v{s['version']}" for c, s in summary["channels"].items()))
    if as_json:
        print_json(summary)
    if serve:
        out.rule("3. serving")
        from server import run as run_server

        def announce(listening) -> None:
            url = listening.url + "/"
            out.print(f"Open [bold]{url}[/] to draw a digit (channel stable, the central model), or "
                      f"[bold]{url}?channel=canary[/] for the federated one. The manifest a browser gets: "
                      f"{url}v1/models/{record.model}/manifest?channel=canary  (Ctrl-C to stop)", soft_wrap=True)

        run_server(config, host="127.0.0.1", port=port, announce=announce)


def federate(out, home: Path, model: str, version: int, rounds: int, clients: int, seed: int) -> dict:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from federated.settings import FederationSettings
    from federated.simulate import simulate

    settings = FederationSettings(home=str(Path(home).resolve()), model_name=model, start_from=str(version),
                                  rounds=rounds, num_partitions=clients, partition="dirichlet:0.5", seed=seed)
    out.print(f"{clients} clients, Dirichlet α=0.5 partition, FedAvg, {rounds} rounds from v{version}; "
              "each round is published and moves channel canary unless the acceptance gate holds it")
    with Progress(TextColumn("round"), MofNCompleteColumn(), BarColumn(), TextColumn("{task.fields[info]}"),
                  TimeElapsedColumn(), console=out) as progress:
        task = progress.add_task("rounds", total=rounds, info="starting Flower…")
        outcome = simulate(settings, on_round=lambda row: progress.update(
            task, completed=row["round"], info=f"acc {row['accuracy']:.3f} → "
            + (f"v{row['version']}" if row.get("version") else f"not published: {row.get('publish_error')}")))
    return {"federation_id": outcome.federation_id, "versions": outcome.versions,
            "accuracy": [row["accuracy"] for row in outcome.history]}
