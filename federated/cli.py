"""`pollinate federate ...`: simulate a federation on one machine, or run one on Flower's
deployment engine (a SuperLink and SuperNodes)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from registry import open_store
from core.console import HomeOption, JsonOption, human_console, print_json

app = typer.Typer(help="Federated learning with Flower: every round becomes a published version.",
                  no_args_is_help=True)

REPO = Path(__file__).resolve().parents[1]
SUPERLINK_FLEET = "127.0.0.1:9092"
SUPERLINK_CONTROL = "127.0.0.1:9093"


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
    malicious: Annotated[Optional[str], typer.Option("--malicious", help="SHARE:ATTACK, attacks: scale, signflip, nan, noise (e.g. 0.2:scale).")] = None,
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
    publish_every: Annotated[int, typer.Option("--publish-every", help="Publish every k rounds (and the last).")] = 1,
    channel: Annotated[str, typer.Option("--channel", help="Channel that follows the federation.")] = "canary",
    formats: Annotated[str, typer.Option("--formats", help="Export formats per published round.")] = "tfjs-layers,tflite-int8",
    seed: Annotated[int, typer.Option("--seed")] = 0,
    out: Annotated[Optional[Path], typer.Option("--out", help="Where history.json and the plots go (default: HOME/federations/ID).")] = None,
    home: HomeOption = Path(".pollinate"),
    as_json: JsonOption = False,
) -> None:
    """Run a federation with Flower's Simulation Engine; each round is registered, exported and published."""
    from core.errors import InvalidInput
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from federated.settings import FederationSettings
    from federated.simulate import simulate, write_history

    console = human_console(as_json)
    share, attack = parse_malicious(malicious)
    if from_scratch and from_version:
        raise InvalidInput("give either --from or --from-scratch, not both")
    model_name, start_from = parse_from(from_version, dataset)
    settings = FederationSettings(
        home=str(Path(home).resolve()), model_name=model_name, dataset=dataset,
        start_from="scratch" if from_scratch else start_from, zoo_model=model, rounds=rounds,
        partition=partition, num_partitions=clients, fraction=fraction, local_epochs=local_epochs,
        batch_size=batch_size, learning_rate=learning_rate, strategy=strategy, proximal_mu=proximal_mu,
        clip_norm=clip_norm, publish_every=publish_every, channel=channel, formats=formats,
        malicious=share, attack=attack, dropout=dropout, seed=seed, resume=resume,
    ).check()
    store = open_store(home)
    if not from_scratch and not resume:
        from core.errors import NotFound

        try:  # fail fast, with the way out
            store.get_version(model_name, None if start_from == "latest" else int(start_from))
        except NotFound as exc:
            raise NotFound(f"{exc}; train one first (pollinate train --dataset {dataset}) or pass --from-scratch") from None
    reference = central_reference(store, model_name)
    partition_info = describe_partition(settings)

    console.print(f"[bold]Federating[/] {model_name}: {clients} clients ({partition}, skew {partition_info['skew']:.2f}), "
                  f"{strategy}, {rounds} rounds" + (f", {share:.0%} {attack} attackers" if share else "")
                  + (f", {dropout:.0%} dropout" if dropout else ""))
    with Progress(TextColumn("round"), MofNCompleteColumn(), BarColumn(), TextColumn("{task.fields[info]}"),
                  TimeElapsedColumn(), console=console) as progress:
        task = progress.add_task("rounds", total=rounds, info="starting Flower…")

        def on_round(row: dict) -> None:
            metric = f"acc {row['accuracy']:.3f}" if "accuracy" in row else f"mae {row['mae']:.3f}"
            version = f"v{row['version']}" if row["version"] else "not published"
            extra = (f" rejected {row['rejected']}" if row["rejected"] else "") + (f" failed {row['failed']}" if row["failed"] else "")
            progress.update(task, completed=row["round"], info=f"{metric} → {version}{extra}")

        outcome = simulate(settings, on_round=on_round)
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
        "failed_total": sum(r["failed"] for r in outcome.history),
        "files": {name: str(path) for name, path in files.items()},
    }
    if as_json:
        print_json(summary)
        return
    final = summary["final"]
    if final:
        metric = "accuracy" if "accuracy" in final else "mae"
        ref = f" (central reference {reference[metric]:.4f})" if reference and metric in reference else ""
        console.print(f"Final test {metric}: {final[metric]:.4f}{ref}; versions {outcome.versions} on channel {channel}; "
                      f"{summary['rejected_total']} updates rejected, {summary['failed_total']} clients failed.")
    console.print(f"History and plots: {folder}")


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


def flower_env(home: Path) -> dict:
    """Flower keeps its own state (FABs, config) under FLWR_HOME: inside our store."""
    flwr_home = Path(home).resolve() / "flower"
    flwr_home.mkdir(parents=True, exist_ok=True)
    # Flower's processes start helpers by name (flower-superexec, flwr-serverapp, flwr-clientapp):
    # put this interpreter's scripts first on PATH, even when the venv is not activated
    scripts = str(Path(sys.executable).parent)
    path = os.pathsep.join([scripts, os.environ.get("PATH", "")])
    return {**os.environ, "FLWR_HOME": str(flwr_home), "TF_CPP_MIN_LOG_LEVEL": "3", "PATH": path,
            # the ServerApp runs from Flower's copy of our .py files: point it at the TF.js runner
            "POLLINATE_TFJS_RUNNER_DIR": str(REPO / "export" / "node")}


def _flower_bin(name: str) -> str:
    path = Path(sys.executable).parent / name
    return str(path) if path.exists() else (shutil.which(name) or name)


@app.command("superlink")
def superlink(
    insecure: Annotated[bool, typer.Option("--insecure/--tls", help="Plain gRPC on loopback (development); --tls needs the certificate options below.")] = True,
    ssl_ca_certfile: Annotated[Optional[Path], typer.Option("--ssl-ca-certfile")] = None,
    ssl_certfile: Annotated[Optional[Path], typer.Option("--ssl-certfile")] = None,
    ssl_keyfile: Annotated[Optional[Path], typer.Option("--ssl-keyfile")] = None,
    fleet_address: Annotated[str, typer.Option("--fleet-api-address")] = SUPERLINK_FLEET,
    control_address: Annotated[str, typer.Option("--control-api-address")] = SUPERLINK_CONTROL,
    serverappio_address: Annotated[str, typer.Option("--serverappio-api-address")] = "127.0.0.1:9091",
    supernode_auth: Annotated[bool, typer.Option("--enable-supernode-auth", help="Only registered SuperNodes may connect (needs --tls).")] = False,
    home: HomeOption = Path(".pollinate"),
) -> None:
    """Start a Flower SuperLink (runs our ServerApp for each `pollinate federate run`)."""
    command = [_flower_bin("flower-superlink"), "--fleet-api-address", fleet_address,
               "--control-api-address", control_address, "--serverappio-api-address", serverappio_address,
               "--database", str(Path(home).resolve() / "flower" / "superlink.db")]
    command += ["--insecure"] if insecure else _tls_args(ssl_ca_certfile, ssl_certfile, ssl_keyfile)
    if supernode_auth:
        command.append("--enable-supernode-auth")
    _exec(command, home)


@app.command("supernode")
def supernode(
    partition_id: Annotated[int, typer.Option("--partition-id", help="This node's share of the dataset.")],
    num_partitions: Annotated[int, typer.Option("--num-partitions", help="How many nodes share it.")],
    superlink_address: Annotated[str, typer.Option("--superlink")] = SUPERLINK_FLEET,
    clientappio_address: Annotated[Optional[str], typer.Option("--clientappio-api-address", help="Default: 127.0.0.1:(9094 + partition id).")] = None,
    insecure: Annotated[bool, typer.Option("--insecure/--tls")] = True,
    root_certificates: Annotated[Optional[Path], typer.Option("--root-certificates", help="CA certificate (with --tls).")] = None,
    auth_key: Annotated[Optional[Path], typer.Option("--auth-supernode-private-key", help="This node's private key (SuperLink with --enable-supernode-auth).")] = None,
    home: HomeOption = Path(".pollinate"),
) -> None:
    """Start a Flower SuperNode that trains on one partition."""
    from core.errors import InvalidInput

    if not 0 <= partition_id < num_partitions:
        raise InvalidInput(f"--partition-id must be in 0..{num_partitions - 1}")
    address = clientappio_address or f"127.0.0.1:{9094 + partition_id}"
    command = [_flower_bin("flower-supernode"), "--superlink", superlink_address,
               "--clientappio-api-address", address,
               "--node-config", f"partition-id={partition_id} num-partitions={num_partitions}"]
    if insecure:
        command.append("--insecure")
    elif root_certificates:
        command += ["--root-certificates", str(root_certificates)]
    else:
        raise InvalidInput("--tls needs --root-certificates CA.crt")
    if auth_key:
        command += ["--auth-supernode-private-key", str(auth_key)]
    _exec(command, home)


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
    control_address: Annotated[str, typer.Option("--superlink", help="The SuperLink's Control API.")] = SUPERLINK_CONTROL,
    insecure: Annotated[bool, typer.Option("--insecure/--tls")] = True,
    root_certificates: Annotated[Optional[Path], typer.Option("--root-certificates")] = None,
    home: HomeOption = Path(".pollinate"),
    as_json: JsonOption = False,
) -> None:
    """Submit our Flower app to a running SuperLink (`flwr run`) and stream its log."""
    from federated.settings import FederationSettings

    model_name, start_from = parse_from(from_version, dataset)
    settings = FederationSettings(home=str(Path(home).resolve()), model_name=model_name, dataset=dataset,
                                  start_from="scratch" if from_scratch else start_from, rounds=rounds,
                                  strategy=strategy, min_clients=min_clients, num_partitions=num_partitions,
                                  partition=partition, formats=formats, channel=channel).check()
    env = flower_env(home)
    connection = {"address": control_address, "insecure": insecure}
    if not insecure:
        connection["root-certificates"] = str(root_certificates)
    write_flower_config(Path(env["FLWR_HOME"]), "pollinate", connection)
    overrides = " ".join(f"{k}={json.dumps(v)}" for k, v in settings.to_config().items()
                         if k in ("home", "model-name", "dataset", "start-from", "rounds", "strategy", "min-clients",
                                  "num-partitions", "partition", "formats", "channel"))
    command = [_flower_bin("flwr"), "run", str(REPO), "pollinate", "--run-config", overrides, "--stream"]
    human_console(as_json).print("$ " + " ".join(command))
    result = subprocess.run(command, env=env)
    if result.returncode != 0:
        raise typer.Exit(result.returncode)
    if as_json:
        store = open_store(home)
        print_json({"model": model_name, "versions": [v.to_dict() for v in store.list_versions(model_name)
                                                       if v.lineage.source == "federated"]})


def write_flower_config(flwr_home: Path, name: str, connection: dict) -> Path:
    """FLWR_HOME/config.toml with one SuperLink connection, the default."""
    lines = ["[superlink]", f'default = "{name}"', "", f"[superlink.{name}]"]
    for key, value in connection.items():
        lines.append(f"{key} = {json.dumps(value)}")
    path = flwr_home / "config.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def _tls_args(ca, cert, key) -> list[str]:
    from core.errors import InvalidInput

    if not (ca and cert and key):
        raise InvalidInput("--tls needs --ssl-ca-certfile, --ssl-certfile and --ssl-keyfile")
    return ["--ssl-ca-certfile", str(ca), "--ssl-certfile", str(cert), "--ssl-keyfile", str(key)]


def _exec(command: list[str], home: Path) -> None:
    """Replace this process with the Flower binary, with FLWR_HOME inside the store."""
    env = flower_env(home)
    sys.stdout.flush()
    os.execvpe(command[0], command, env)

