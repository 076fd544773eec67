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
from registry import open_store

app = typer.Typer(help="Federated learning with Flower: every round becomes a published version.",
                  no_args_is_help=True)

SUPERLINK_HOST = "127.0.0.1"
SUPERLINK_PORT = 9092  # Flower's own default (8000) is the one `pollinate serve` uses
SUPERLINK = f"{SUPERLINK_HOST}:{SUPERLINK_PORT}"


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
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from core.errors import InvalidInput
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
            if row.get("publish_error"):
                progress.console.print(f"[yellow]round {row['round']} not published:[/] {row['publish_error']}")
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
        "publishing": outcome.publishing,
        "published": outcome.publishing.get("published", len(outcome.versions)),
        "publish_failed": outcome.publishing.get("failed", 0),
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
    if summary["publish_failed"]:
        console.print(f"[yellow]{summary['publish_failed']} round(s) not published:[/] "
                      + "; ".join(f"round {e['round']}: {e['error']}" for e in outcome.publishing.get("errors", [])))
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
    partition_id: Annotated[int, typer.Option("--partition-id", help="This node's share of the dataset.")],
    num_partitions: Annotated[int, typer.Option("--num-partitions", help="How many nodes share it.")],
    superlink_address: Annotated[str, typer.Option("--superlink", help="The SuperLink's HOST:PORT.")] = SUPERLINK,
    host: Annotated[str, typer.Option("--host", help="This node's runtime API (for its ClientApp processes).")] = "127.0.0.1",
    port: Annotated[Optional[int], typer.Option("--port", help="Default: 9100 + partition id.")] = None,
    insecure: Annotated[bool, typer.Option("--insecure/--tls")] = True,
    root_certificates: Annotated[Optional[Path], typer.Option("--root-certificates", help="CA certificate (with --tls).")] = None,
    auth_key: Annotated[Optional[Path], typer.Option("--auth-supernode-private-key", help="This node's private key (SuperLink with --enable-supernode-auth).")] = None,
    home: HomeOption = Path(".pollinate"),
) -> None:
    """Start a Flower SuperNode that trains on one partition."""
    from core.errors import InvalidInput
    from federated.runtime import flower_bin

    if not 0 <= partition_id < num_partitions:
        raise InvalidInput(f"--partition-id must be in 0..{num_partitions - 1}")
    command = [flower_bin("flower-supernode"), "--superlink", superlink_address, "--host", host,
               "--port", str(port if port is not None else 9100 + partition_id),
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
    publish_every: Annotated[int, typer.Option("--publish-every")] = 1,
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
                                  publish_every=publish_every, progress_file=str(progress)).check()
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
        console.print(f"Federation {outcome['federation_id']}: versions {outcome['versions']}; "
                      f"{pub.get('published', 0)} round(s) published, {pub.get('failed', 0)} failed"
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
