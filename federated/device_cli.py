"""`pollinate federate device`: the reference device client on the command line.

A phone or a device with its own labelled data joins an edge federation over the device
protocol with nothing but the version's `tflite-train` file (see ``federated/device.py``).
The command function is registered by ``federated/cli.py``; `python -m federated.device_cli`
runs it on its own.

Exit codes: 0 done (also when no task came within --wait: nothing to do is not a failure),
2 bad input (the data file, the options) or a device that cannot go on, 3 the server did not
answer after every retry.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from core.console import JsonOption, human_console, print_json

ENV_ENROL_TOKEN = "POLLINATE_ENROL_TOKEN"
EXIT_UNAVAILABLE = 3


def device(
    server: Annotated[str, typer.Option("--server", help="The `pollinate serve` URL, e.g. http://127.0.0.1:8000.")],
    model: Annotated[str, typer.Option("--model", "-m", help="The federated model's name.")],
    data: Annotated[Path, typer.Option("--data", help="Local labelled data: .npz with x and y, or a CSV with the model's columns and a label column (the rules of `federate supernode --data`).")],
    target: Annotated[Optional[str], typer.Option("--target", help="The CSV's label column (default: the column the model was trained to predict, else label, target or y).")] = None,
    rounds: Annotated[int, typer.Option("--rounds", "-r", help="Tasks to contribute to before exiting (0: keep going until --wait passes with no task).")] = 1,
    state: Annotated[Path, typer.Option("--state", help="This device's folder: its enrolment, cached model files, an unsent update.")] = Path(".pollinate-device"),
    enrol_token: Annotated[Optional[str], typer.Option("--enrol-token", envvar=ENV_ENROL_TOKEN, help="Token the server wants for enrolment (when it sets POLLINATE_ENROL_TOKEN).", show_default=False)] = None,
    wait: Annotated[float, typer.Option("--wait", help="Seconds to keep polling for a task before giving up.")] = 60.0,
    poll: Annotated[float, typer.Option("--poll", help="Seconds between task polls while none is open (the protocol asks real devices for 10 or more).")] = 10.0,
    kind: Annotated[str, typer.Option("--kind", help="What this device says it is: phone | device | browser | simulated.")] = "device",
    retries: Annotated[int, typer.Option("--retries", help="Retries (exponential backoff from 0.5 s) when the server does not answer or answers 5xx.")] = 6,
    seed: Annotated[Optional[int], typer.Option("--seed", help="Seed for the local shuffles (default: random).")] = None,
    telemetry: Annotated[bool, typer.Option("--telemetry", help="Send field telemetry (docs/monitoring.md): counts of what the round's model predicts on the local data, on the version's fixed bins; never an input. Off unless given.")] = False,
    telemetry_every: Annotated[int, typer.Option("--telemetry-every", help="Predictions per telemetry batch (a run's remainder goes when it ends).")] = 100,
    as_json: JsonOption = False,
) -> None:
    """Train on local data with the model's tflite-train file and send updates to the open edge round."""
    from core.errors import InvalidInput
    from federated.device import DeviceClient, ServerUnavailable

    if rounds < 0:
        raise InvalidInput("--rounds must be 0 (no limit) or more")
    if retries < 0:
        raise InvalidInput("--retries must be 0 or more")
    if poll <= 0:
        raise InvalidInput("--poll must be more than 0 seconds")
    if wait < 0:
        raise InvalidInput("--wait must be 0 seconds or more")
    console = human_console(as_json)
    client = DeviceClient(server, model, data, state, target=target, enrol_token=enrol_token, kind=kind, poll=poll, seed=seed, retries=retries,
                          on_event=_printer(console), telemetry=telemetry, telemetry_every=telemetry_every)
    try:
        summary = client.run(rounds=rounds, wait=wait)
    except ServerUnavailable as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise typer.Exit(EXIT_UNAVAILABLE) from None
    finally:
        client.close()
    if as_json:
        print_json(summary.to_dict())
        return
    console.print(f"Device {summary.device_id[:12]}: {summary.contributed} update(s) accepted; "
                  f"{_kb(summary.bytes_down)} down, {_kb(summary.bytes_up)} up; stopped: {summary.stopped}.")
    if summary.telemetry is not None:
        t = summary.telemetry
        console.print(f"Telemetry: {t.predictions} prediction(s) counted, {t.batches} batch(es) sent ({_kb(t.bytes_up)})"
                      + (f", {t.queued} waiting for the next run" if t.queued else "")
                      + (f", {t.refused} refused" if t.refused else "") + (f" ({t.detail})" if t.detail else "") + ".")


def _printer(console):
    """One line per step a person wants to see; waiting is said once per idle stretch."""
    said_waiting = [False]

    def on_event(kind: str, info: dict) -> None:
        if kind == "enrolled":
            how = "reusing enrolment" if info["reused"] else "enrolled as"
            console.print(f"{how} device {info['device_id']}")
        elif kind == "reenrol":
            console.print(f"[yellow]the server did not know this device's token ({info['detail']}); enrolling again[/]")
        elif kind == "waiting" and not said_waiting[0]:
            console.print(f"no open round for this device yet; polling for up to {info['wait']:g} s")
            said_waiting[0] = True
        elif kind == "task":
            said_waiting[0] = False
        elif kind == "done":
            r = info["report"]
            head = f"round {r.round} (task {r.task_id[:8]}, base v{r.base_version}): "
            if r.status == "accepted":
                how = "resumed from checkpoint" if r.resumed else (
                    f"trained {r.train_seconds:.3f} s ({r.epochs} epoch(s) × {r.steps // max(1, r.epochs)} batch(es) of "
                    f"{r.batch_size}, loss {r.loss_first:.4f} → {r.loss_last:.4f})")
                model = "model cached" if r.model_cached else f"model {_kb(r.model_bytes)}"
                console.print(f"{head}{r.examples} examples, {how}; ↓ {_kb(r.bytes_down)} ({model}) "
                              f"↑ {_kb(r.bytes_up)}{' as float16' if r.dtype == 'float16' else ''}; "
                              f"accepted ({r.accepted} in this round so far)")
            else:
                console.print(f"[yellow]{head}{r.status}[/]: {r.detail or ''}")

    return on_event


def _kb(n: int) -> str:
    return f"{n / 1024:.1f} KB" if n < 1 << 20 else f"{n / (1 << 20):.2f} MB"


def main() -> None:
    """`python -m federated.device_cli ...`: the command alone, with the `pollinate` script's
    error handling (one `error:` line, exit 2)."""
    import os

    from core.errors import PollinateError

    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)
    app.command()(device)
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
