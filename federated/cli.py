"""`pollinate federate ...`: simulate a federation on one machine, or run one on Flower's
deployment engine (a SuperLink and SuperNodes)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from core.console import HomeOption, JsonOption, human_console, print_json
from federated.device_cli import device as device_command
from registry import open_store

app = typer.Typer(help="Federated learning with Flower: every round becomes a published version.",
                  no_args_is_help=True)

SUPERLINK_HOST = "127.0.0.1"
SUPERLINK_PORT = 9092  # Flower's own default (8000) is the one `pollinate serve` uses
SUPERLINK = f"{SUPERLINK_HOST}:{SUPERLINK_PORT}"


# The robust defaults (federated/robust.py) and the acceptance gate (federated/acceptance.py)
NormMultipleOption = Annotated[float, typer.Option(
    "--norm-multiple", help="Set aside an update whose L2 norm is over this × the round's median (0: off).")]
DirectionRatioOption = Annotated[float, typer.Option(
    "--direction-ratio", help="Set aside an update whose cosine with the mean of the round's others is below -this x "
                              "the round's median cosine (0: off).")]
ExamplesMultipleOption = Annotated[float, typer.Option(
    "--examples-multiple", help="An update's example claim weighs at most this × the round's median claim (0: no cap).")]
ExamplesCapOption = Annotated[int, typer.Option(
    "--examples-cap", help="...and at most this many examples per device or client (0: no fixed cap).")]
GateThresholdOption = Annotated[float, typer.Option(
    "--gate-threshold", help="Hold a round (published, channel not moved) whose test accuracy is this much below "
                             "the last accepted round's (0.02: 2 points; regressors: MAE this much worse, relative).")]
GateOption = Annotated[bool, typer.Option("--gate/--no-gate", help="The acceptance gate before the channel moves.")]


def parse_from(value: str | None, dataset: str) -> tuple[str, str]:
    """--from NAME[@VERSION] → (model name, "latest" | version)."""
    from core.errors import InvalidInput

    if not value:
        return dataset, "latest"
    name, _, version = value.partition("@")
    if version and not version.isdigit():
        raise InvalidInput(f"--from expects NAME@VERSION (e.g. digits@3), got {value!r}")
    return name, version or "latest"


def parse_malicious(value: str | None) -> tuple[float, str]:
    """--malicious SHARE:ATTACK (e.g. 0.2:scale)."""
    from core.errors import InvalidInput

    if not value:
        return 0.0, "scale"
    share, _, attack = value.partition(":")
    try:
        return float(share), attack or "scale"
    except ValueError:
        raise InvalidInput(f"--malicious expects SHARE:ATTACK (e.g. 0.2:scale), got {value!r}") from None


@app.command("simulate")
def simulate_command(
    dataset: Annotated[str, typer.Option("--dataset", "-d", help="digits | delivery-eta")] = "digits",
    clients: Annotated[int, typer.Option("--clients", "-n", help="Virtual SuperNodes (clients).")] = 10,
    rounds: Annotated[int, typer.Option("--rounds", "-r")] = 3,
    partition: Annotated[str, typer.Option("--partition", help="iid | dirichlet:ALPHA | shards:K")] = "dirichlet:0.5",
    strategy: Annotated[str, typer.Option("--strategy", "-s", help="fedavg | fedprox | fedadam | fedavgm | fedmedian | fedtrimmedavg | krum")] = "fedavg",
    fraction: Annotated[float, typer.Option("--fraction", help="Share of clients sampled per round.")] = 1.0,
    malicious: Annotated[Optional[str], typer.Option("--malicious", help="SHARE:ATTACK, attacks: scale, signflip, nan, noise, minus-base, inflate (e.g. 0.1:minus-base).")] = None,
    dropout: Annotated[float, typer.Option("--dropout", help="Probability that a client fails in a round.")] = 0.0,
    from_version: Annotated[Optional[str], typer.Option("--from", help="Start from NAME@VERSION (default: the latest version of the dataset's model).")] = None,
    from_scratch: Annotated[bool, typer.Option("--from-scratch", help="Start from a freshly initialised zoo model.")] = False,
    model: Annotated[str, typer.Option("--model", "-m", help="Zoo model for --from-scratch.")] = "cnn",
    resume: Annotated[bool, typer.Option("--resume", help="Continue the model's last federation from its last published round.")] = False,
    local_epochs: Annotated[int, typer.Option("--local-epochs")] = 1,
    batch_size: Annotated[int, typer.Option("--batch-size")] = 16,
    learning_rate: Annotated[float, typer.Option("--learning-rate")] = 1e-3,
    proximal_mu: Annotated[float, typer.Option("--proximal-mu", help="FedProx μ.")] = 0.01,
    clip_norm: Annotated[float, typer.Option("--clip-norm", help="Clip each update's L2 norm (0 = off).")] = 0.0,
    norm_multiple: NormMultipleOption = 4.0,
    direction_ratio: DirectionRatioOption = 0.5,
    examples_multiple: ExamplesMultipleOption = 2.0,
    examples_cap: ExamplesCapOption = 0,
    gate: GateOption = True,
    gate_threshold: GateThresholdOption = 0.02,
    publish_every: Annotated[int, typer.Option("--publish-every", help="Publish every k rounds (and the last).")] = 1,
    channel: Annotated[str, typer.Option("--channel", help="Channel that follows the federation.")] = "canary",
    formats: Annotated[str, typer.Option("--formats", help="Export formats per published round.")] = "tfjs-layers,tflite-int8",
    seed: Annotated[int, typer.Option("--seed")] = 0,
    out: Annotated[Optional[Path], typer.Option("--out", help="Where history.json and the plots go (default: HOME/federations/ID).")] = None,
    edge_browsers: Annotated[int, typer.Option("--edge-browsers", help="Simulated browsers (TF.js in Node) behind the gateways.")] = 0,
    edge_devices: Annotated[int, typer.Option("--edge-devices", help="Simulated phones (the TFLite interpreter) behind the gateways.")] = 0,
    edge_gateways: Annotated[int, typer.Option("--edge-gateways", help="Gateway nodes beside the --clients (with an edge fleet).")] = 1,
    edge_late: Annotated[float, typer.Option("--edge-late", help="Probability an edge device posts after its round closed.")] = 0.0,
    edge_drop: Annotated[float, typer.Option("--edge-drop", help="Probability an edge device trains and never posts.")] = 0.0,
    edge_stale: Annotated[float, typer.Option("--edge-stale", help="Probability an edge device posts for an older round.")] = 0.0,
    edge_behaviour: Annotated[Optional[list[str]], typer.Option("--edge-behaviour", help="DEVICE=late|drop|stale|normal every round (e.g. browser-0=late, tflite-1=drop).")] = None,
    min_updates: Annotated[int, typer.Option("--min-updates", help="A gateway answers once this many device updates are in...")] = 1,
    round_deadline: Annotated[float, typer.Option("--round-deadline", help="...or this many seconds after its round opened.")] = 120.0,
    home: HomeOption = Path(".pollinate"),
    as_json: JsonOption = False,
) -> None:
    """Run a federation with Flower's Simulation Engine; each round is registered, exported and published.
    With --edge-browsers/--edge-devices, gateway nodes take part and simulated devices train through a
    `pollinate serve` on loopback (needs a start version: --from NAME@VERSION or the latest)."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from core.errors import InvalidInput
    from federated.server_app import describe_edge
    from federated.settings import FederationSettings
    from federated.simulate import simulate, write_history

    console = human_console(as_json)
    share, attack = parse_malicious(malicious)
    if from_scratch and from_version:
        raise InvalidInput("give either --from or --from-scratch, not both")
    model_name, start_from = parse_from(from_version, dataset)
    fleet = edge_fleet_options(edge_browsers, edge_devices, edge_gateways, edge_late, edge_drop, edge_stale,
                               edge_behaviour, seed, clients)
    if fleet is not None:
        formats = edge_formats(formats, fleet)
    settings = FederationSettings(
        home=str(Path(home).resolve()), model_name=model_name, dataset=dataset,
        start_from="scratch" if from_scratch else start_from, zoo_model=model, rounds=rounds,
        partition=partition, num_partitions=clients + (edge_gateways if fleet else 0), fraction=fraction,
        local_epochs=local_epochs, batch_size=batch_size, learning_rate=learning_rate, strategy=strategy,
        proximal_mu=proximal_mu, clip_norm=clip_norm, publish_every=publish_every, channel=channel, formats=formats,
        norm_multiple=norm_multiple, direction_ratio=direction_ratio, examples_multiple=examples_multiple, examples_cap=examples_cap, gate=gate,
        gate_threshold=gate_threshold,
        malicious=share, attack=attack, dropout=dropout, seed=seed, resume=resume,
        edge=fleet is not None, edge_gateways=edge_gateways if fleet else 0, edge_partitions=fleet.total if fleet else 0,
        edge_min_updates=min_updates, edge_round_deadline=round_deadline,
    ).check()
    store = open_store(home)
    if not from_scratch and not resume:
        from core.errors import NotFound

        try:  # fail fast, with the way out
            store.get_version(model_name, None if start_from == "latest" else int(start_from))
        except NotFound as exc:
            raise NotFound(f"{exc}; train one first (pollinate train --dataset {dataset}) or pass --from-scratch") from None
    reference = central_reference(store, model_name)
    from dataclasses import replace

    # the partition every trainer gets: the clients', then the edge devices'
    shown = replace(settings, num_partitions=clients + (fleet.total if fleet else 0))
    partition_info = describe_partition(shown)

    console.print(f"[bold]Federating[/] {model_name}: {clients} clients ({partition}, skew {partition_info['skew']:.2f}), "
                  f"{strategy}, {rounds} rounds" + (f", {share:.0%} {attack} attackers" if share else "")
                  + (f", {dropout:.0%} dropout" if dropout else "")
                  + (f"; edge: {edge_gateways} gateway(s), {edge_browsers} browser(s), {edge_devices} TFLite device(s) "
                     f"(min {min_updates} update(s), deadline {round_deadline:g} s)" if fleet else ""))
    with Progress(TextColumn("round"), MofNCompleteColumn(), BarColumn(), TextColumn("{task.fields[info]}"),
                  TimeElapsedColumn(), console=console) as progress:
        task = progress.add_task("rounds", total=rounds, info="starting Flower…")

        def on_round(row: dict) -> None:
            metric = f"acc {row['accuracy']:.3f}" if "accuracy" in row else f"mae {row['mae']:.3f}"
            version = f"v{row['version']}" if row["version"] else "not published"
            if row.get("publish_error"):
                progress.console.print(f"[yellow]round {row['round']} not published:[/] {row['publish_error']}")
            extra = (f" rejected {row['rejected']}" if row["rejected"] else "") + (f" failed {row['failed']}" if row["failed"] else "")
            extra += f" set aside {sum(row['set_aside'].values())}" if row.get("set_aside") else ""
            if row.get("held"):
                progress.console.print(f"[yellow]round {row['round']} held, channel {channel} not moved:[/] "
                                       f"{row['gate']['reason']}", soft_wrap=True)
                extra += " HELD"
            extra += f" edge {row['edge_updates']}" if row.get("edge_updates") else ""
            if fleet is not None:
                progress.console.print(f"round {row['round']}/{rounds}: {metric} → {version}{describe_edge(row)}",
                                       soft_wrap=True, markup=False)
            progress.update(task, completed=row["round"], info=f"{metric} → {version}{extra}")

        fleet_report: dict = {}
        outcome = simulate(settings, on_round=on_round, fleet=fleet, fleet_report=fleet_report if fleet else None)
    folder = Path(out) if out else Path(home) / "federations" / outcome.federation_id
    files = write_history(outcome, settings, folder, reference=reference, partition=partition_info)
    from federated.partition import plot_partition

    files["partition.png"] = plot_partition(partition_info, folder / "partition.png", title=f"{clients} clients, {partition}")
    summary = {
        "federation_id": outcome.federation_id, "model": outcome.model_name, "strategy": strategy,
        "rounds": [{k: r[k] for k in r if k not in ("reasons",)} for r in outcome.history],
        "versions": outcome.versions, "channel": channel, "initial": outcome.initial,
        "final": outcome.history[-1] if outcome.history else None, "reference": reference,
        "rejected_total": sum(r["rejected"] for r in outcome.history),
        "set_aside_total": sum(sum(r.get("set_aside", {}).values()) for r in outcome.history),
        "held_rounds": [r["round"] for r in outcome.history if r.get("held")],
        "failed_total": sum(r["failed"] for r in outcome.history),
        "publishing": outcome.publishing,
        "published": outcome.publishing.get("published", len(outcome.versions)),
        "publish_failed": outcome.publishing.get("failed", 0),
        "files": {name: str(path) for name, path in files.items()},
    }
    if fleet is not None:
        summary["edge"] = {"gateways": edge_gateways, "browsers": edge_browsers, "devices": edge_devices,
                           "updates": sum(r.get("edge_updates", 0) for r in outcome.history),
                           "kinds": fleet_report.get("kinds", {}), "errors": fleet_report.get("errors", [])}
        (folder / "edge-updates.json").write_text(json.dumps(fleet_report.get("events", []), indent=1) + "\n")
        summary["files"]["edge-updates.json"] = str(folder / "edge-updates.json")
    if as_json:
        print_json(summary)
        return
    final = summary["final"]
    if final:
        metric = "accuracy" if "accuracy" in final else "mae"
        ref = f" (central reference {reference[metric]:.4f})" if reference and metric in reference else ""
        console.print(f"Final test {metric}: {final[metric]:.4f}{ref}; versions {outcome.versions} on channel {channel}; "
                      f"{summary['rejected_total']} updates rejected, {summary['set_aside_total']} set aside, "
                      f"{summary['failed_total']} clients failed"
                      + (f"; round(s) {summary['held_rounds']} held by the gate." if summary["held_rounds"] else "."))
    if summary["publish_failed"]:
        console.print(f"[yellow]{summary['publish_failed']} round(s) not published:[/] "
                      + "; ".join(f"round {e['round']}: {e['error']}" for e in outcome.publishing.get("errors", [])))
    if fleet is not None:
        for kind, row in summary["edge"]["kinds"].items():
            statuses = ", ".join(f"{n} {status}" for status, n in sorted(row["statuses"].items()))
            console.print(f"{kind}: {statuses}; train {_fmt(row['train_seconds_mean'], 's')} per update, "
                          f"{_fmt(row['bytes_up_mean'], 'B')} up, {_fmt(row['bytes_down_mean'], 'B')} down")
    console.print(f"History and plots: {folder}")


def _fmt(value: float | None, unit: str) -> str:
    if value is None:
        return "-"
    return f"{value:.2f} s" if unit == "s" else f"{value / 1024:.1f} KiB"


def edge_fleet_options(browsers: int, devices: int, gateways: int, late: float, drop: float, stale: float,
                       behaviour: list[str] | None, seed: int, clients: int):
    """The simulated edge fleet of `federate simulate` (None: no --edge-browsers/--edge-devices)."""
    from core.errors import InvalidInput
    from federated.edge_fleet import FleetOptions

    if browsers == 0 and devices == 0:
        if behaviour or late or drop or stale:
            raise InvalidInput("--edge-late/--edge-drop/--edge-stale/--edge-behaviour need --edge-browsers or --edge-devices")
        return None
    if gateways < 1:
        raise InvalidInput("--edge-gateways must be at least 1 with an edge fleet")
    if clients < 0:
        raise InvalidInput("--clients must be ≥ 0")
    forced = []
    for item in behaviour or []:
        device, _, what = item.partition("=")
        if not device or not what:
            raise InvalidInput(f"--edge-behaviour expects DEVICE=BEHAVIOUR (e.g. browser-0=late), got {item!r}")
        forced.append((device, what))
    options = FleetOptions(browsers=browsers, devices=devices, late=late, drop=drop, stale=stale, seed=seed,
                           forced=tuple(forced)).check()
    known = set(options.browser_ids()) | set(options.device_ids())
    for device, _ in forced:
        if device not in known:
            raise InvalidInput(f"--edge-behaviour: no device {device!r} (browser-0.., tflite-0..)")
    return options


def edge_formats(formats: str, fleet) -> str:
    """The per-round formats plus what the edge devices load: tfjs-layers (browsers), tflite-train (phones)."""
    wanted = [f.strip() for f in formats.split(",") if f.strip()]
    for fmt, needed in (("tfjs-layers", fleet.browsers), ("tflite-train", fleet.devices)):
        if needed and fmt not in wanted:
            wanted.append(fmt)
    return ",".join(wanted)


def central_reference(store, model_name: str) -> dict | None:
    """The newest centrally trained version's test metrics: the line a federation aims at."""
    from core.errors import PollinateError

    try:
        versions = [v for v in store.list_versions(model_name) if v.lineage.source == "central"]
    except PollinateError:
        return None
    if not versions:
        return None
    best = versions[-1]
    return {"label": f"v{best.version}", **{k: v for k, v in best.metrics.items() if k in ("accuracy", "loss", "mae", "rmse")}}


def describe_partition(settings) -> dict:
    """Client sizes and label histograms of this federation's partition (what each client gets)."""
    from core.errors import InvalidInput
    from federated.partition import partition, partition_summary
    from federated.task import partition_labels
    from training.datasets import reload_dataset

    dataset = reload_dataset(settings.recipe())
    if dataset is None:
        raise InvalidInput(f"dataset {settings.dataset!r} is not available")
    labels, classes = partition_labels(dataset)
    parts = partition(labels, settings.num_partitions, settings.partition, seed=settings.seed)
    return partition_summary(labels, parts, classes)


# ---------------------------------------------------------------- deployment


def _flower_home(home: Path) -> Path:
    return Path(home).resolve() / "flower"


@app.command("superlink")
def superlink(
    host: Annotated[str, typer.Option("--host", help="Where the SuperLink serves its Fleet, Control and runtime APIs (one HTTP port).")] = SUPERLINK_HOST,
    port: Annotated[int, typer.Option("--port")] = SUPERLINK_PORT,
    insecure: Annotated[bool, typer.Option("--insecure/--tls", help="Plain HTTP on loopback (development); --tls needs the certificate options below.")] = True,
    ssl_ca_certfile: Annotated[Optional[Path], typer.Option("--ssl-ca-certfile")] = None,
    ssl_certfile: Annotated[Optional[Path], typer.Option("--ssl-certfile")] = None,
    ssl_keyfile: Annotated[Optional[Path], typer.Option("--ssl-keyfile")] = None,
    supernode_auth: Annotated[bool, typer.Option("--enable-supernode-auth", help="Only registered SuperNodes may connect (needs --tls).")] = False,
    home: HomeOption = Path(".pollinate"),
) -> None:
    """Start a Flower SuperLink (runs our ServerApp for each `pollinate federate run`)."""
    from federated.runtime import flower_bin

    command = [flower_bin("flower-superlink"), "--host", host, "--port", str(port), "--isolation", "subprocess",
               "--database", str(_flower_home(home) / "superlink.db"),
               # offline: the app's dependencies are this environment, never installed at run time
               "--disable-runtime-dependency-installation"]
    command += ["--insecure"] if insecure else _tls_args(ssl_ca_certfile, ssl_certfile, ssl_keyfile)
    if supernode_auth:
        command.append("--enable-supernode-auth")
    _exec(command, home)


@app.command("supernode")
def supernode(
    partition_id: Annotated[Optional[int], typer.Option("--partition-id", help="This node's share of the built-in dataset.")] = None,
    num_partitions: Annotated[Optional[int], typer.Option("--num-partitions", help="How many nodes share it.")] = None,
    gateway: Annotated[Optional[str], typer.Option("--gateway", help="Run as the edge gateway NAME: devices train through `pollinate serve` on the same --home.")] = None,
    min_updates: Annotated[int, typer.Option("--min-updates", help="Gateway: answer the round once this many device updates are in...")] = 1,
    round_deadline: Annotated[float, typer.Option("--round-deadline", help="Gateway: ...or this many seconds after the round opened.")] = 120.0,
    norm_bound: Annotated[float, typer.Option("--norm-bound", help="Gateway: fixed L2 bound on a device update (0: 10× the median of the previous round's updates; in the first round the norm of the base weights).")] = 0.0,
    clip: Annotated[bool, typer.Option("--clip", help="Gateway: scale updates over the bound down to it instead of refusing them.")] = False,
    aggregate: Annotated[str, typer.Option("--aggregate", help="Gateway: mean (example-weighted) | median | trimmed-mean.")] = "mean",
    trim: Annotated[float, typer.Option("--trim", help="Gateway, trimmed-mean: share cut at each end.")] = 0.2,
    norm_multiple: NormMultipleOption = 4.0,
    direction_ratio: DirectionRatioOption = 0.5,
    examples_multiple: ExamplesMultipleOption = 2.0,
    examples_cap: ExamplesCapOption = 0,
    data: Annotated[Optional[Path], typer.Option("--data", help="Train on this file (.csv with the model's columns, or .npz with x, y) instead of a partition.")] = None,
    model: Annotated[str, typer.Option("--model", help="With --data: the model (NAME or NAME@VERSION) whose input the file must match.")] = "digits",
    server_url: Annotated[Optional[str], typer.Option("--server", help="With --data: read the model's manifest from this pollinate serve (else the store, else the built-in dataset).")] = None,
    target: Annotated[Optional[str], typer.Option("--target", help="With a .csv: the label column.")] = None,
    check_only: Annotated[bool, typer.Option("--check", help="With --data: check the file against the model and exit (no connection).")] = False,
    superlink_address: Annotated[str, typer.Option("--superlink", help="The SuperLink's HOST:PORT.")] = SUPERLINK,
    host: Annotated[str, typer.Option("--host", help="This node's runtime API (for its ClientApp processes).")] = "127.0.0.1",
    port: Annotated[Optional[int], typer.Option("--port", help="Default: 9100 + partition id; a free port for gateways and own-data nodes.")] = None,
    insecure: Annotated[bool, typer.Option("--insecure/--tls")] = True,
    root_certificates: Annotated[Optional[Path], typer.Option("--root-certificates", help="CA certificate (with --tls).")] = None,
    auth_key: Annotated[Optional[Path], typer.Option("--auth-supernode-private-key", help="This node's private key (SuperLink with --enable-supernode-auth).")] = None,
    home: HomeOption = Path(".pollinate"),
) -> None:
    """Start a Flower SuperNode: on a partition of the built-in dataset, on its own data (--data), or as an edge gateway (--gateway)."""
    from core.errors import InvalidInput
    from federated.runtime import flower_bin, free_port, write_run_config

    partitioned = partition_id is not None or num_partitions is not None
    if sum((partitioned, gateway is not None, data is not None)) != 1:
        raise InvalidInput("give one of --partition-id/--num-partitions (built-in data), --data FILE (own data) "
                           "or --gateway NAME (edge devices)")
    nodes = _flower_home(home) / "nodes"
    if partitioned:
        if partition_id is None or num_partitions is None:
            raise InvalidInput("--partition-id and --num-partitions go together")
        if not 0 <= partition_id < num_partitions:
            raise InvalidInput(f"--partition-id must be in 0..{num_partitions - 1}")
        node_config = f"partition-id={partition_id} num-partitions={num_partitions}"
        port = port if port is not None else 9100 + partition_id
    elif gateway is not None:
        from federated.gateway import GatewayOptions

        options = GatewayOptions(name=gateway, home=str(Path(home).resolve()), min_updates=min_updates,
                                 round_deadline=round_deadline, norm_bound=norm_bound, clip=clip,
                                 aggregate=aggregate, trim=trim, norm_multiple=norm_multiple, direction_ratio=direction_ratio,
                                 examples_multiple=examples_multiple, examples_cap=examples_cap).check()
        open_store(home)  # the store devices reach through `pollinate serve --home` (created if new)
        nodes.mkdir(parents=True, exist_ok=True)
        node_config = str(write_run_config(nodes / f"gateway-{gateway}.toml", options.to_node_config()))
    else:
        node_config = _own_data_node_config(data, model, server_url, target, home)
        if check_only:
            return
    if check_only:
        raise InvalidInput("--check goes with --data")
    if port is None:
        port = free_port()
    command = [flower_bin("flower-supernode"), "--superlink", superlink_address, "--host", host,
               "--port", str(port), "--node-config", node_config]
    if insecure:
        command.append("--insecure")
    elif root_certificates:
        command += ["--root-certificates", str(root_certificates)]
    else:
        raise InvalidInput("--tls needs --root-certificates CA.crt")
    if auth_key:
        command += ["--auth-supernode-private-key", str(auth_key)]
    _exec(command, home)


def _own_data_node_config(data: Path, model: str, server_url: str | None, target: str | None, home: Path) -> str:
    """Check the file against the model's input (before connecting: bad data never reaches a
    round), prepare it, and write the node config that points the ClientApp at it."""
    from federated.own_data import prepare, resolve_contract
    from federated.runtime import write_run_config

    name, version = parse_model_ref(model)
    contract = resolve_contract(name, home=Path(home), version=version, server=server_url)
    nodes = _flower_home(home) / "nodes"
    prepared, examples = prepare(Path(data), contract, _flower_home(home) / "own-data", target)
    nodes.mkdir(parents=True, exist_ok=True)
    print(f"own data: {examples} examples from {data}, checked against {contract.source}", flush=True)
    return str(write_run_config(nodes / f"own-data-{prepared.stem}.toml",
                                {"data": str(prepared.resolve()), "data-source": str(Path(data).resolve())}))


def parse_model_ref(value: str) -> tuple[str, int | None]:
    """NAME or NAME@VERSION."""
    from core.errors import InvalidInput

    name, _, version = value.partition("@")
    if not name or (version and not version.isdigit()):
        raise InvalidInput(f"expected NAME or NAME@VERSION (e.g. digits@3), got {value!r}")
    return name, int(version) if version else None


@app.command("run")
def run(
    dataset: Annotated[str, typer.Option("--dataset", "-d")] = "digits",
    rounds: Annotated[int, typer.Option("--rounds", "-r")] = 2,
    strategy: Annotated[str, typer.Option("--strategy", "-s")] = "fedavg",
    from_scratch: Annotated[bool, typer.Option("--from-scratch")] = False,
    from_version: Annotated[Optional[str], typer.Option("--from")] = None,
    min_clients: Annotated[int, typer.Option("--min-clients", help="Wait for this many SuperNodes.")] = 2,
    num_partitions: Annotated[int, typer.Option("--num-partitions")] = 2,
    partition: Annotated[str, typer.Option("--partition")] = "iid",
    formats: Annotated[str, typer.Option("--formats")] = "tfjs-layers,tflite-int8",
    channel: Annotated[str, typer.Option("--channel")] = "canary",
    publish_every: Annotated[int, typer.Option("--publish-every")] = 1,
    edge: Annotated[bool, typer.Option("--edge", help="Edge gateways take part: publish every round before the next (devices train on it), give a restarted gateway its round again.")] = False,
    norm_multiple: NormMultipleOption = 4.0,
    direction_ratio: DirectionRatioOption = 0.5,
    examples_multiple: ExamplesMultipleOption = 2.0,
    examples_cap: ExamplesCapOption = 0,
    gate: GateOption = True,
    gate_threshold: GateThresholdOption = 0.02,
    superlink_address: Annotated[str, typer.Option("--superlink", help="The SuperLink's HOST:PORT.")] = SUPERLINK,
    insecure: Annotated[bool, typer.Option("--insecure/--tls")] = True,
    root_certificates: Annotated[Optional[Path], typer.Option("--root-certificates")] = None,
    home: HomeOption = Path(".pollinate"),
    as_json: JsonOption = False,
) -> None:
    """Submit our Flower app to a running SuperLink (`flwr run`) and stream its log until it ends."""
    import time
    import uuid

    from core.errors import PollinateError
    from federated.runtime import APP_DIR, flower_bin, flower_env, write_flower_config, write_run_config
    from federated.settings import FederationSettings

    model_name, start_from = parse_from(from_version, dataset)
    runs = _flower_home(home) / "runs"
    runs.mkdir(parents=True, exist_ok=True)
    stem = f"{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"
    # read back when the SuperLink runs on this machine (loopback); elsewhere only the log tells
    progress = runs / f"{stem}.progress.jsonl"
    settings = FederationSettings(home=str(Path(home).resolve()), model_name=model_name, dataset=dataset,
                                  start_from="scratch" if from_scratch else start_from, rounds=rounds,
                                  strategy=strategy, min_clients=min_clients, num_partitions=num_partitions,
                                  partition=partition, formats=formats, channel=channel,
                                  publish_every=publish_every, edge=edge, progress_file=str(progress),
                                  norm_multiple=norm_multiple, direction_ratio=direction_ratio, examples_multiple=examples_multiple,
                                  examples_cap=examples_cap, gate=gate, gate_threshold=gate_threshold).check()
    env = flower_env(_flower_home(home))
    connection = {"address": superlink_address, "insecure": insecure}
    if not insecure:
        if root_certificates is None:
            from core.errors import InvalidInput

            raise InvalidInput("--tls needs --root-certificates CA.crt")
        connection["root-certificates"] = str(Path(root_certificates).resolve())
    write_flower_config(Path(env["FLWR_HOME"]), "pollinate", connection)
    overrides = write_run_config(runs / f"{stem}.run-config.toml", settings.to_config())
    command = [flower_bin("flwr"), "run", str(APP_DIR), "pollinate", "--run-config", str(overrides), "--stream"]
    console = human_console(as_json)
    console.print("$ " + " ".join(command))
    result = subprocess.run(command, env=env, stdout=sys.stderr if as_json else None)
    if result.returncode != 0:
        raise typer.Exit(result.returncode)
    final = _final_record(progress)
    if final and final["event"] == "error":
        raise PollinateError(f"the federation failed: {final['message']}")
    outcome = final["outcome"] if final else None
    if as_json:
        store = open_store(home)
        print_json({"model": model_name, "outcome": outcome,
                    "versions": [v.to_dict() for v in store.list_versions(model_name) if v.lineage.source == "federated"]})
    elif outcome:
        pub = outcome.get("publishing", {})
        edge_updates = sum(r.get("edge_updates", 0) for r in outcome.get("history", []))
        held = [r["round"] for r in outcome.get("history", []) if r.get("held")]
        console.print(f"Federation {outcome['federation_id']}: versions {outcome['versions']}; "
                      f"{pub.get('published', 0)} round(s) published, {pub.get('failed', 0)} failed"
                      + (f"; {edge_updates} device update(s) through gateways" if edge_updates else "")
                      + (f"; round(s) {held} held by the acceptance gate (channel not moved)" if held else "")
                      + "".join(f"; round {e['round']}: {e['error']}" for e in pub.get("errors", [])))


def _final_record(progress: Path) -> dict | None:
    if not progress.exists():
        return None
    final = None
    for line in progress.read_text().splitlines():
        if line.strip():
            record = json.loads(line)
            if record["event"] in ("done", "error"):
                final = record
    return final


def _tls_args(ca, cert, key) -> list[str]:
    from core.errors import InvalidInput

    if not (ca and cert and key):
        raise InvalidInput("--tls needs --ssl-ca-certfile, --ssl-certfile and --ssl-keyfile")
    return ["--ssl-ca-certfile", str(ca), "--ssl-certfile", str(cert), "--ssl-keyfile", str(key)]


def _exec(command: list[str], home: Path) -> None:
    """Replace this process with the Flower binary, with FLWR_HOME inside the store."""
    from federated.runtime import flower_env

    env = flower_env(_flower_home(home))
    sys.stdout.flush()
    os.execvpe(command[0], command, env)


# ---------------------------------------------------------------- one command on loopback


@app.command("up")
def up(
    model: Annotated[str, typer.Option("--model", "-m", help="The store's model to federate (its latest version unless --from).")] = "digits",
    rounds: Annotated[int, typer.Option("--rounds", "-r")] = 3,
    gateways: Annotated[int, typer.Option("--gateways", help="Edge gateway SuperNodes (gw-0, gw-1, ...).")] = 1,
    min_updates: Annotated[int, typer.Option("--min-updates", help="A gateway answers once this many device updates are in...")] = 1,
    round_deadline: Annotated[float, typer.Option("--round-deadline", help="...or this many seconds after its round opened.")] = 120.0,
    norm_bound: Annotated[float, typer.Option("--norm-bound", help="Fixed L2 bound on a device update (0: 10× the median of the previous round's updates; in the first round the norm of the base weights).")] = 0.0,
    clip: Annotated[bool, typer.Option("--clip", help="Clip updates over the bound instead of refusing them.")] = False,
    aggregate: Annotated[str, typer.Option("--aggregate", help="mean | median | trimmed-mean")] = "mean",
    norm_multiple: NormMultipleOption = 4.0,
    direction_ratio: DirectionRatioOption = 0.5,
    examples_multiple: ExamplesMultipleOption = 2.0,
    examples_cap: ExamplesCapOption = 0,
    gate: GateOption = True,
    gate_threshold: GateThresholdOption = 0.02,
    data: Annotated[Optional[list[Path]], typer.Option("--data", help="Also an own-data SuperNode on this file (repeat for more).")] = None,
    from_version: Annotated[Optional[str], typer.Option("--from", help="Start from NAME@VERSION.")] = None,
    port: Annotated[int, typer.Option("--port", help="The device endpoint's port (pollinate serve; 0: any free port).")] = 8000,
    local_epochs: Annotated[int, typer.Option("--local-epochs")] = 1,
    batch_size: Annotated[int, typer.Option("--batch-size")] = 16,
    learning_rate: Annotated[float, typer.Option("--learning-rate")] = 1e-3,
    strategy: Annotated[str, typer.Option("--strategy", "-s")] = "fedavg",
    formats: Annotated[str, typer.Option("--formats", help="Export formats per round (browsers: tfjs-layers, phones: tflite-train).")] = "tfjs-layers,tflite-int8,tflite-train",
    channel: Annotated[str, typer.Option("--channel")] = "canary",
    home: HomeOption = Path(".pollinate"),
    as_json: JsonOption = False,
) -> None:
    """Start an edge federation on loopback: pollinate serve (the device endpoint), a SuperLink, the gateway
    SuperNodes (and own-data ones), then the rounds; stops everything at the end or on Ctrl-C."""
    import time
    import uuid
    from contextlib import ExitStack

    from core.errors import InvalidInput, NotFound, PollinateError
    from federated.gateway import GatewayOptions
    from federated.runtime import (
        APP_DIR,
        LocalSuperLink,
        ServeProcess,
        flower_bin,
        follow_progress,
        start_pollinate,
        stop_process_tree,
        write_run_config,
    )
    from federated.server_app import describe_edge
    from federated.settings import FederationSettings

    if gateways < 0 or gateways + len(data or []) < 1:
        raise InvalidInput("--gateways must be ≥ 0, and the federation needs a gateway or a --data node")
    if from_version:
        name, version = parse_model_ref(from_version)
        if model != "digits" and name != model:
            raise InvalidInput(f"--model {model} and --from {from_version} name different models")
        model = name
    else:
        version = None
    GatewayOptions(name="gw-0", home=".", min_updates=min_updates, round_deadline=round_deadline,
                   norm_bound=norm_bound, clip=clip, aggregate=aggregate, norm_multiple=norm_multiple,
                   direction_ratio=direction_ratio, examples_multiple=examples_multiple, examples_cap=examples_cap).check()
    for path in data or []:
        if not Path(path).is_file():
            raise InvalidInput(f"data file not found: {path}")
    home = Path(home).resolve()
    store = open_store(home)
    try:
        record = store.get_version(model, version)
    except NotFound as exc:
        raise NotFound(f"{exc}; train one first (pollinate train --dataset digits) or give --from NAME@VERSION") from None
    if data:  # the own-data nodes check their files too; a bad one stops everything before it starts
        from federated.own_data import load_own_data, resolve_contract

        contract = resolve_contract(model, home=home, version=record.version)
        for path in data:
            load_own_data(Path(path), contract)
    recipe = record.lineage.extra.get("data")
    if not recipe:
        raise InvalidInput(f"{model} v{record.version} does not record its dataset: the server cannot evaluate rounds")
    from export.pipeline import check_runtimes

    check_runtimes(tuple(f.strip() for f in formats.split(",") if f.strip()))
    folder = _flower_home(home) / "up" / f"{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"
    folder.mkdir(parents=True)
    progress = folder / "progress.jsonl"
    settings = FederationSettings(
        home=str(home), model_name=model, dataset=json.dumps(recipe, sort_keys=True), start_from=str(record.version),
        rounds=rounds, min_clients=gateways + len(data or []), local_epochs=local_epochs, batch_size=batch_size,
        learning_rate=learning_rate, strategy=strategy, formats=formats, channel=channel, edge=True,
        progress_file=str(progress), norm_multiple=norm_multiple, direction_ratio=direction_ratio, examples_multiple=examples_multiple,
        examples_cap=examples_cap, gate=gate, gate_threshold=gate_threshold).check()
    console = human_console(as_json)
    rows: list[dict] = []
    with ExitStack() as stack:
        server = stack.enter_context(ServeProcess(home, port=port, log_path=folder / "serve.log"))
        link = stack.enter_context(LocalSuperLink(folder, simulation=False))
        nodes: dict[str, subprocess.Popen] = {}
        stack.callback(lambda: [stop_process_tree(p, timeout=10) for p in nodes.values()])
        for i in range(gateways):  # after the SuperLink answers (Flower's SuperLink state race)
            nodes[f"gateway-{i}"] = (start_pollinate(
                ["federate", "supernode", "--gateway", f"gw-{i}", "--superlink", link.address, "--home", str(home),
                 "--min-updates", str(min_updates), "--round-deadline", str(round_deadline),
                 "--norm-bound", str(norm_bound), "--aggregate", aggregate, *(["--clip"] if clip else []),
                 "--norm-multiple", str(norm_multiple), "--direction-ratio", str(direction_ratio),
                 "--examples-multiple", str(examples_multiple),
                 "--examples-cap", str(examples_cap)],
                folder / f"gateway-{i}.log"))
        for i, path in enumerate(data or []):
            nodes[f"own-data-{i}"] = (start_pollinate(
                ["federate", "supernode", "--data", str(Path(path).resolve()), "--model", f"{model}@{record.version}",
                 "--superlink", link.address, "--home", str(home)], folder / f"own-data-{i}.log"))
        base = f"{server.url}/v1/federations/{model}"
        console.print(f"[bold]Device endpoint[/] {server.url}  (model {model}, from v{record.version})", soft_wrap=True)
        for method, route, what in (("POST", "/devices", "enrol: {device_id, token}"),
                                    ("GET ", "/task", "the open round's task (Authorization: Bearer TOKEN; 204: none)"),
                                    ("GET ", "/tasks/{task_id}/weights", "the task's base weights (float32)"),
                                    ("POST", "/tasks/{task_id}/updates?examples=N", "local − base (float32)"),
                                    ("GET ", "/status", "the round's progress")):
            console.print(f"  {method} {base}{route}  {what}", soft_wrap=True, markup=False)
        console.print(f"SuperLink {link.address}; {gateways} gateway(s) (min {min_updates} update(s), deadline "
                      f"{round_deadline:g} s), {len(data or [])} own-data node(s); logs in {folder}", soft_wrap=True)
        overrides = write_run_config(folder / "run-config.toml", settings.to_config())
        command = [flower_bin("flwr"), "run", str(APP_DIR), "local", "--run-config", str(overrides), "--stream"]
        with open(folder / "run.log", "wb") as run_log:
            runner = subprocess.Popen(command, env=link.env, cwd=folder, stdout=run_log, stderr=subprocess.STDOUT,
                                      stdin=subprocess.DEVNULL, start_new_session=True)
        stack.callback(lambda: stop_process_tree(runner, timeout=5))

        def on_round(row: dict) -> None:
            rows.append(row)
            metric = f"acc {row['accuracy']:.3f}" if "accuracy" in row else f"mae {row['mae']:.3f}"
            version_text = f"v{row['version']}" if row["version"] else f"not published ({row['publish_error']})"
            if row.get("held"):
                version_text += f", held: channel {channel} not moved ({row['gate']['reason']})"
            console.print(f"round {row['round']}/{rounds}: {metric} → {version_text}{describe_edge(row)}",
                          soft_wrap=True, markup=False)

        def pieces_alive() -> None:
            if server.process is None or server.process.poll() is not None:
                raise PollinateError(f"pollinate serve stopped; see {folder / 'serve.log'}")
            if link.process is None or link.process.poll() is not None:
                raise PollinateError(f"the SuperLink stopped; see {link.log_path}")
            for name, process in nodes.items():
                if process.poll() is not None:
                    last = [ln for ln in (folder / f"{name}.log").read_text(errors="replace").splitlines() if ln.strip()]
                    raise PollinateError(f"the {name} SuperNode stopped ({last[-1] if last else 'no output'}); "
                                         f"see {folder / (name + '.log')}")

        final = follow_progress(progress, runner, on_round, on_tick=pieces_alive)
    if final is None:
        raise PollinateError(f"the federation ended without a result; see {folder / 'run.log'}")
    if final["event"] == "error":
        raise PollinateError(f"the federation failed: {final['message']}")
    outcome = final["outcome"]
    if as_json:
        print_json({"model": model, "from_version": record.version, "device_endpoint": server.url,
                    "outcome": outcome, "logs": str(folder)})
        return
    pub = outcome.get("publishing", {})
    console.print(f"Federation {outcome['federation_id']}: versions {outcome['versions']} on channel {channel}; "
                  f"{pub.get('published', 0)} round(s) published, {pub.get('failed', 0)} failed; "
                  f"{sum(r.get('edge_updates', 0) for r in rows)} device update(s) in all.", soft_wrap=True)


# the reference device client (federated/device_cli.py): the executable spec of
# docs/device-protocol.md that phone apps follow
app.command("device")(device_command)
