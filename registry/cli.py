"""`pollinate models ...`: look into the store and move channels.

The store itself is stdlib-only; this module is its command-line face (typer + rich).
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Optional, Protocol

import typer

from core.console import HomeOption, JsonOption, human_console, print_json
from registry import open_store
from registry.channels import ChannelState
from registry.outcome import export_outcome

# Formats that are not a runnable model: the Keras source, training and export reports.

app = typer.Typer(help="List models and versions, and move channels (promote, staged rollout, rollback).",
                  no_args_is_help=True)


class RemoteChannels(Protocol):
    """Moves channels on a running server instead of the local store (`--server URL`)."""

    def promote(self, name: str, channel: str, version: int, *, rollout_percent: float | None) -> ChannelState: ...

    def rollback(self, name: str, channel: str) -> ChannelState: ...


# The registry does not know the server's routes: the composer (pollinate/cli.py) plugs in
# the server room's admin client here. Unset, `--server` is refused with a clear error.
remote_channels: Callable[[str], RemoteChannels] | None = None

# `models profile` needs the Keras model and the training data (training/): the composer
# plugs training.central.attach_profile in here. (store, name, version) -> VersionRecord
attach_profile: Callable | None = None


def _remote(server: str) -> RemoteChannels:
    from core.errors import PollinateError

    if remote_channels is None:
        raise PollinateError("--server is not available: this installation has no server admin client")
    return remote_channels(server)

ChannelOption = Annotated[str, typer.Option("--channel", "-c", help="Channel name: stable, canary, or [a-z0-9_-]{1,32}.")]
ServerOption = Annotated[
    Optional[str],
    typer.Option("--server", envvar="POLLINATE_SERVER", show_default=False,
                 help="Move the channel through this Pollinate server's HTTP API (bearer token from"
                      " $POLLINATE_ADMIN_TOKEN) instead of the local store."),
]


def _describe_channel(state: dict) -> str:
    if state.get("version") is None:
        return "unset"
    text = f"v{state['version']}"
    if state.get("candidate_version") is not None:
        text += f" (+v{state['candidate_version']} for {state['rollout_percent']:g}%)"
    return text


@app.command("list")
def list_models(home: HomeOption = Path(".pollinate"), as_json: JsonOption = False) -> None:
    """Every model in the store, its latest version and its channels."""
    from rich.table import Table

    models = open_store(home).list_models()
    if as_json:
        print_json({"models": models})
        return
    out = human_console(False)
    if not models:
        out.print(f"No models in {home} yet. Train one: pollinate train --dataset digits")
        return
    table = Table(title=f"Models in {home}")
    for column in ("name", "latest", "versions", "channels"):
        table.add_column(column)
    for model in models:
        channels = ", ".join(f"{name} → {_describe_channel(state)}" for name, state in sorted(model["channels"].items()))
        table.add_row(model["name"], f"v{model['latest_version']}", str(model["versions"]), channels or "—")
    out.print(table)


@app.command("show")
def show(
    name: Annotated[str, typer.Argument(help="Model name.")],
    version: Annotated[Optional[int], typer.Option("--version", "-v", help="Version (default: latest).")] = None,
    home: HomeOption = Path(".pollinate"),
    as_json: JsonOption = False,
) -> None:
    """One version: lineage, metrics, input spec, labels and files."""
    from rich.table import Table

    store = open_store(home)
    record = store.get_version(name, version)
    channels = store.list_channels(name)
    outcome = export_outcome(store, record)
    if as_json:
        print_json({**record.to_dict(), "channels": {c: s.to_dict() for c, s in channels.items()}, "export": outcome})
        return
    out = human_console(False)
    lineage = record.lineage
    out.rule(f"[bold]{record.model} v{record.version}[/]")
    out.print(f"created   {record.created_at}")
    origin = lineage.source
    if lineage.round is not None:
        origin += f", round {lineage.round}"
    if lineage.parent_version is not None:
        origin += f", parent v{lineage.parent_version}"
    out.print(f"lineage   {origin}")
    if lineage.dataset_fingerprint:
        out.print(f"dataset   {lineage.extra.get('dataset', '')} sha256:{lineage.dataset_fingerprint[:16]}…")
    federation = _federation_line(lineage.extra) if lineage.source == "federated" else ""
    if federation:
        out.print(f"clients   {federation}")
    gate = lineage.extra.get("gate") if lineage.source == "federated" else None
    if isinstance(gate, dict):
        verdict = (f"HELD, channel not moved: {gate.get('reason')}" if gate.get("passed") is False else
                   f"passed ({gate.get('metric')} {gate.get('value', 0):.4g} vs {gate.get('reference', 0):.4g}"
                   f" of round {gate.get('reference_round')})")
        out.print(f"gate      {verdict}", soft_wrap=True, markup=False)
    if lineage.hyperparameters:
        out.print("hyper     " + ", ".join(f"{k}={v}" for k, v in sorted(lineage.hyperparameters.items())))
    out.print("metrics   " + ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in sorted(record.metrics.items())))
    spec = record.input_spec
    if spec:
        out.print(f"input     shape {spec.get('shape')} {spec.get('dtype')}, preprocessing: {spec.get('preprocessing', {}).get('kind', 'none')}")
    if record.labels:
        out.print(f"labels    {', '.join(map(str, record.labels))}")
    here = [f"{c} → {_describe_channel(s.to_dict())}" for c, s in sorted(channels.items())]
    out.print(f"channels  {', '.join(here) or '—'}")
    table = Table(title="artifacts")
    for column in ("format", "file", "bytes", "sha256"):
        table.add_column(column)
    for fmt, files in sorted(record.artifacts.items()):
        for f in files:
            table.add_row(fmt, f.name, f"{f.size:,}", f.sha256[:16] + "…")
    out.print(table)
    kinds = outcome["tfjs_kinds"]
    out.print("exports   " + (", ".join(f"{f} ({kinds[f]})" if f in kinds else f for f in outcome["delivered"]) or "—")
              + "  (verified against Keras)")
    for fmt, why in sorted(outcome["refused"].items()):
        out.print(f"refused   {fmt} ({why.get('stage', '?')}): {why.get('reason', '')}")
    for fmt, gaps in sorted(outcome["backend_gaps"].items()):
        for backend, why in sorted(gaps.items()):
            out.print(f"gap       {fmt} not on TF.js {backend} (clients use another backend): {why}")




@app.command("files")
def files(
    name: Annotated[str, typer.Argument(help="Model name.")],
    version: Annotated[Optional[int], typer.Option("--version", "-v", help="Version (default: latest).")] = None,
    fmt: Annotated[Optional[str], typer.Option("--format", "-f", help="Only this format (e.g. keras, report).")] = None,
    out_dir: Annotated[Optional[Path], typer.Option("--out", help="Copy the files here, as <format>/<file>.")] = None,
    home: HomeOption = Path(".pollinate"),
    as_json: JsonOption = False,
) -> None:
    """Where a version's files are, or copies of them under --out with their real names."""
    from core.errors import NotFound

    store = open_store(home)
    record = store.get_version(name, version)
    formats = record.artifacts if fmt is None else {fmt: record.artifacts.get(fmt)}
    if fmt is not None and formats[fmt] is None:
        raise NotFound(f"{name} v{record.version} has no {fmt!r} files; it has: {', '.join(sorted(record.artifacts))}")
    rows = []
    for format_name, format_files in sorted(formats.items()):
        for f in format_files:
            source = store.blob_path(f.sha256)
            path = source
            if out_dir is not None:
                path = Path(out_dir) / format_name / f.name
                path.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(source, path)
            rows.append({"format": format_name, "name": f.name, "bytes": f.size, "sha256": f.sha256, "path": str(path)})
    if as_json:
        print_json({"model": name, "version": record.version, "files": rows})
        return
    from rich.table import Table

    table = Table(title=f"{name} v{record.version}")
    for column in ("format", "file", "bytes", "path"):
        table.add_column(column, overflow="fold")
    for row in rows:
        table.add_row(row["format"], row["name"], f"{row['bytes']:,}", row["path"])
    human_console(False).print(table)


@app.command("promote")
def promote(
    name: Annotated[str, typer.Argument(help="Model name.")],
    version: Annotated[int, typer.Argument(help="The version to promote.")],
    channel: ChannelOption = "stable",
    percent: Annotated[Optional[float], typer.Option("--percent", "-p", help="Staged rollout: give VERSION to this percent of clients (0 < P ≤ 100).")] = None,
    guardrail: Annotated[Optional[list[str]], typer.Option(
        "--guardrail", help="With --percent: roll the candidate back when it is significantly worse on this"
                            " metric (field_accuracy, error_rate, agreement); repeatable.")] = None,
    home: HomeOption = Path(".pollinate"),
    server: ServerOption = None,
    as_json: JsonOption = False,
) -> None:
    """Point a channel at a version, or stage it for a percentage of clients (with guardrails)."""
    from core.errors import InvalidInput
    from registry.monitoring import GUARDRAIL_METRICS

    if guardrail:
        if percent is None or percent >= 100:
            raise InvalidInput("--guardrail watches a staged candidate: use it with --percent P (< 100)")
        unknown = sorted(set(guardrail) - set(GUARDRAIL_METRICS))
        if unknown:
            raise InvalidInput(f"unknown guardrail metric(s) {', '.join(unknown)}; use {', '.join(GUARDRAIL_METRICS)}")
        if server:
            raise InvalidInput("--guardrail applies to the local store (the server enforces what is stored there);"
                               " drop --server")
    if server:
        state = _remote(server).promote(name, channel, version, rollout_percent=percent)
    else:
        store = open_store(home)
        state = store.set_channel(name, channel, version, rollout_percent=percent)
        from registry.monitoring import Monitor

        # every move starts with the guardrails given (none: any earlier ones are dropped)
        Monitor(store).set_guardrails(name, channel, list(guardrail or []))
    _report_channel(state, as_json)
    if guardrail and not as_json:
        human_console(False).print(f"guardrails: {', '.join(guardrail)} (one-sided p < 0.05, ≥ 100 per side)")


@app.command("shadow")
def shadow(
    name: Annotated[str, typer.Argument(help="Model name.")],
    channel: ChannelOption = "stable",
    version: Annotated[Optional[int], typer.Option("--version", "-v", help="The version to run silently beside the channel's.")] = None,
    clear: Annotated[bool, typer.Option("--clear", help="Stop running a shadow version on this channel.")] = False,
    home: HomeOption = Path(".pollinate"),
    as_json: JsonOption = False,
) -> None:
    """Name a shadow version: clients run it beside the served one, never show it, report agreement."""
    from core.errors import InvalidInput

    if (version is None) == (not clear):
        raise InvalidInput("give either --version V or --clear")
    state = open_store(home).set_shadow(name, channel, None if clear else version)
    _report_channel(state, as_json)


@app.command("profile")
def profile(
    target: Annotated[str, typer.Argument(help="NAME or NAME@VERSION (default: the latest version).")],
    home: HomeOption = Path(".pollinate"),
    as_json: JsonOption = False,
) -> None:
    """Attach the monitoring profile to a version registered without one (from its training data)."""
    from core.errors import InvalidInput, PollinateError

    name, _, number = target.partition("@")
    if number and not number.isdigit():
        raise InvalidInput(f"bad version in {target!r}: use NAME@N")
    if attach_profile is None:
        raise PollinateError("`models profile` is not available: this installation has no trainer")
    record = attach_profile(open_store(home), name, int(number) if number else None)
    files = record.artifacts.get("profile", [])
    if as_json:
        print_json({"model": record.model, "version": record.version, "profile": [f.to_dict() for f in files]})
        return
    human_console(False).print(f"{record.model} v{record.version}: profile attached"
                               f" ({', '.join(f'{f.name} {f.size:,} bytes' for f in files)})")


@app.command("rollback")
def rollback(
    name: Annotated[str, typer.Argument(help="Model name.")],
    channel: ChannelOption = "stable",
    home: HomeOption = Path(".pollinate"),
    server: ServerOption = None,
    as_json: JsonOption = False,
) -> None:
    """Undo the channel's last move (the history keeps both moves)."""
    if server:
        state = _remote(server).rollback(name, channel)
    else:
        state = open_store(home).rollback(name, channel)
    _report_channel(state, as_json)


@app.command("history")
def history(
    name: Annotated[str, typer.Argument(help="Model name.")],
    channel: Annotated[Optional[str], typer.Option("--channel", "-c", help="Only this channel.")] = None,
    home: HomeOption = Path(".pollinate"),
    as_json: JsonOption = False,
) -> None:
    """Every channel move, oldest first, with the federated versions the acceptance gate held
    (published, but their channel did not move) in between."""
    from registry.gate import held_versions, history_with_holds

    store = open_store(home)
    rows = history_with_holds(store, name, channel)
    if as_json:
        held = [h for h in held_versions(store, name) if channel is None or h["channel"] == channel]
        print_json({"model": name, "history": rows, "held": held})
        return
    out = human_console(False)
    for row in rows:
        reason = f"  ({row['reason']})" if row.get("reason") else ""
        if row["action"] == "held":
            out.print(f"{row['at']}  {row['channel'] or '?':<10} held      ✗ v{row['version']} (round {row['round']}) "
                      f"not moved to{reason}", soft_wrap=True, markup=False)
            continue
        out.print(f"{row['at']}  {row['channel']:<10} {row['action']:<9} → {_describe_channel(row)}{reason}")


def _report_channel(state, as_json: bool) -> None:
    if as_json:
        print_json(state.to_dict())
        return
    shadow = f", shadow v{state.shadow_version}" if getattr(state, "shadow_version", None) else ""
    human_console(False).print(f"{state.model} [bold]{state.channel}[/] → {_describe_channel(state.to_dict())}{shadow}")


def _federation_line(extra: dict) -> str:
    """Who contributed to a federated round: Flower clients, edge devices behind gateways, own-data nodes."""
    parts = []
    clients = extra.get("clients")
    if clients:
        parts.append(f"{len(clients)} Flower client(s), {extra.get('examples', 0):,} examples")
    edge = extra.get("edge") or {}
    if edge.get("updates"):
        gateways = edge.get("gateways") or {}
        parts.append(f"{edge['updates']} edge update(s) from {edge.get('devices', 0)} device(s), "
                     f"{edge.get('examples', 0):,} examples, via {len(gateways) or '?'} gateway(s)")
        aside = sum(sum((g.get("set_aside") or {}).values()) for g in gateways.values() if isinstance(g, dict))
        if aside:
            parts.append(f"{aside} device update(s) set aside")
    own = extra.get("own_data") or {}
    if own.get("nodes"):
        parts.append(f"{own['nodes']} own-data node(s), {own.get('examples', 0):,} examples")
    for key in ("rejected", "failed"):
        if extra.get(key):
            parts.append(f"{extra[key]} {key}")
    robust = extra.get("robust") or {}
    set_aside = robust.get("set_aside") or {}
    if set_aside:
        parts.append("set aside: " + ", ".join(f"{n} {reason}" for reason, n in sorted(set_aside.items())))
    if robust.get("examples_capped"):
        parts.append(f"{robust['examples_capped']} example claim(s) capped")
    return "; ".join(parts)
