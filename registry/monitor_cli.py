"""`pollinate monitor`: a model in the field — volume, field accuracy, drift, shadow, alerts
(docs/monitoring.md). `pollinate monitor NAME` reports; `pollinate monitor configure NAME`
sets thresholds, value bounds, the guardrails' source share, the webhook and the retraining
command; `pollinate monitor purge NAME --since T` removes monitoring windows (bad data an
operator wants gone: nothing a sender does can remove it).

Plots need matplotlib, which lives in training/: the composer (pollinate/cli.py) plugs the
plotter in here, as it does for the registry's remote channels.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Optional

import typer

from core.console import HomeOption, JsonOption, human_console, print_json
from core.errors import InvalidInput, PollinateError
from registry import open_store

# (report, timeline, folder, psi_threshold=...) -> written paths; set by pollinate/cli.py
plotter: Callable[..., list[Path]] | None = None


def monitor(
    words: Annotated[list[str], typer.Argument(metavar="[configure|purge] NAME", help="NAME to report on, `configure NAME` to change settings, or `purge NAME --since T` to remove windows.",
                                               show_default=False)],
    version: Annotated[Optional[int], typer.Option("--version", "-v", help="Only this version.")] = None,
    since: Annotated[Optional[str], typer.Option("--since", help="From this ISO time or span back (7d, 24h).")] = None,
    until: Annotated[Optional[str], typer.Option("--until", help="purge: up to the hour holding this time (default: no end).")] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="purge: say what would be removed, remove nothing.")] = False,
    plot: Annotated[Optional[Path], typer.Option("--plot", help="Write PNG plots into this folder.")] = None,
    bucket: Annotated[str, typer.Option("--bucket", help="Time buckets of the plots: hour, day or month.")] = "day",
    enforce: Annotated[bool, typer.Option("--enforce", help="Apply the guardrails now: roll back worse candidates.")] = False,
    psi: Annotated[Optional[float], typer.Option("--psi", help="configure: drift alert at PSI >= this (default 0.2).")] = None,
    js: Annotated[Optional[float], typer.Option("--js", help="configure: drift alert at Jensen-Shannon >= this (default 0.1).")] = None,
    min_predictions: Annotated[Optional[int], typer.Option("--min-predictions", help="configure: predictions needed before drift alerts (default 200).")] = None,
    min_accuracy: Annotated[Optional[float], typer.Option("--min-accuracy", help="configure: alert when field accuracy falls below this.")] = None,
    max_mae: Annotated[Optional[float], typer.Option("--max-mae", help="configure: alert when field MAE rises above this.")] = None,
    webhook: Annotated[Optional[str], typer.Option("--webhook", help="configure: POST alerts here as JSON.")] = None,
    retrain: Annotated[Optional[str], typer.Option("--retrain", help="configure: command to run once per alert (e.g. a federated round).")] = None,
    min_value: Annotated[Optional[float], typer.Option("--min-value", help="configure: regression values below this are refused (default: the training range with a margin).")] = None,
    max_value: Annotated[Optional[float], typer.Option("--max-value", help="configure: regression values above this are refused (default: likewise).")] = None,
    guardrail_share: Annotated[Optional[float], typer.Option("--guardrail-share", help="configure: the most of a guardrail's count one source may hold (default 0.1).")] = None,
    home: HomeOption = Path(".pollinate"),
    as_json: JsonOption = False,
) -> None:
    """Watch a model in the field: `pollinate monitor NAME` or `pollinate monitor configure NAME`."""
    from registry.monitoring import Monitor

    settings = {"psi": psi, "js": js, "min_predictions": min_predictions, "min_accuracy": min_accuracy,
                "max_mae": max_mae, "webhook": webhook, "retrain_command": retrain, "min_value": min_value,
                "max_value": max_value, "guardrail_share": guardrail_share}
    if words[:1] != ["purge"] and (until is not None or dry_run):
        raise InvalidInput("--until and --dry-run go with `pollinate monitor purge NAME --since T`")
    if len(words) == 2 and words[0] == "purge":
        if any(v is not None for v in settings.values()):
            raise InvalidInput("purge takes --version, --since, --until and --dry-run only")
        purged = Monitor(open_store(home)).purge(words[1], version=version, since=since, until=until,
                                                 dry_run=dry_run)
        if as_json:
            print_json(purged)
        else:
            _print_purge(purged)
        return
    if len(words) == 2 and words[0] == "configure":
        name = words[1]
        monitor_ = Monitor(open_store(home))
        changed = {k: v for k, v in settings.items() if v is not None}
        config = monitor_.configure(name, **changed) if changed else monitor_.config(name)
        if as_json:
            print_json({"model": name, "config": config})
        else:
            out = human_console(False)
            for key, value in config.items():
                out.print(f"{key:<16} {value if value is not None else '—'}")
        return
    if len(words) != 1:
        raise InvalidInput("usage: pollinate monitor NAME [options] | pollinate monitor configure NAME [settings]"
                           " | pollinate monitor purge NAME --since T [--until T] [--version V]")
    if any(v is not None for v in settings.values()):
        raise InvalidInput("thresholds are set with `pollinate monitor configure NAME --psi ...`")
    name = words[0]
    monitor_ = Monitor(open_store(home))
    rolled = monitor_.enforce(name) if enforce else []
    new_alerts = monitor_.check_alerts(name)
    report = monitor_.report(name, version=version, since=since)
    written: list[Path] = []
    if plot is not None:
        if plotter is None:
            raise PollinateError("--plot is not available: this installation has no plotter")
        timeline = monitor_.timeline(name, version=version, since=since, bucket=bucket)
        written = plotter(report, timeline, plot, psi_threshold=monitor_.config(name)["psi"])
    if as_json:
        print_json(report)
    else:
        _print_report(report, rolled, new_alerts, written)


def _print_purge(purged: dict) -> None:
    out = human_console(False)
    removed = purged["removed"]
    which = f"v{purged['version']}" if purged["version"] is not None else "every version"
    span = f"from {purged['since']}" + (f" to {purged['until']}" if purged["until"] else " on")
    verb = "would remove" if purged["dry_run"] else "removed"
    out.print(f"{purged['model']} {which}, windows {span}: {verb} {removed['windows']} window(s) —"
              f" {removed['batches']:,} batches, {removed['predictions']:,} predictions,"
              f" {removed['feedback']:,} feedback")
    for row in purged["windows"]:
        flag = "" if row["finite"] else "  (sums not finite)"
        out.print(f"  v{row['version']} {row['window']}  {row['predictions']:,} predictions,"
                  f" {row['feedback']:,} feedback{flag}")


def _fmt_interval(metric: dict | None, digits: int = 3) -> str:
    if not metric:
        return "—"
    return f"{metric['value']:.{digits}f} [{metric['low']:.{digits}f}, {metric['high']:.{digits}f}] n={metric['n']}"


def _print_report(report: dict, rolled: list[dict], new_alerts: list[dict], written: list[Path]) -> None:
    from rich.table import Table

    out = human_console(False)
    model = report["model"]
    for channel, state in sorted(report["channels"].items()):
        text = f"v{state['version']}"
        if state.get("candidate_version") is not None:
            text += f" (+v{state['candidate_version']} for {state['rollout_percent']:g}%)"
        if state.get("shadow_version") is not None:
            text += f", shadow v{state['shadow_version']}"
        out.print(f"{channel:<10} → {text}")
    for row in rolled:
        out.print(f"[bold red]rolled back[/] {row['channel']}: {row['reason']}")
    if not report["versions"]:
        out.print(f"No telemetry or feedback for {model} yet"
                  + (f" since {report['since']}" if report.get("since") else "") + ".")
    else:
        table = Table(title=f"{model} in the field" + (f" since {report['since']}" if report.get("since") else ""))
        for column in ("version", "predictions", "errors", "feedback", "field accuracy / MAE (95%)",
                       "latency p50/p95 ms", "shadow agreement", "max drift (PSI)"):
            table.add_column(column)
        for v, s in sorted(report["versions"].items(), key=lambda kv: int(kv[0])):
            quality = _fmt_interval(s.get("field_accuracy")) if "field_accuracy" in s else _fmt_interval(s.get("field_mae"), 4)
            latency = s["latency_ms"]
            lat = "—" if latency["p50"] is None else f"{latency['p50']:g} / {latency['p95']:g}"
            shadow = s.get("shadow")
            agree = "—" if not shadow or shadow["agreement"] is None else \
                f"v{shadow['version']}: {shadow['agreement']:.3f} (n={shadow['compared']})"
            drift = s.get("drift") or {}
            if drift:
                worst = max(drift, key=lambda k: drift[k]["psi"])
                flag = " [bold red]ALERT[/]" if any(d["alert"] for d in drift.values()) else ""
                drift_text = f"{drift[worst]['psi']:.3f} ({worst}){flag}"
            else:
                drift_text = "—"
            table.add_row(f"v{v}", f"{s['predictions']:,}", f"{s['errors']:,}", f"{s['feedback']:,}", quality,
                          lat, agree, drift_text)
        out.print(table)
        for v, s in sorted(report["versions"].items(), key=lambda kv: int(kv[0])):
            if s.get("note"):
                out.print(f"[yellow]v{v}[/]: {s['note']}: {', '.join(s.get('excluded_windows') or [])}")
    alerts = [a for a in report["alerts"] if a["cleared_at"] is None]
    new_ids = {a["id"] for a in new_alerts}
    for alert in alerts:
        out.print(f"[bold red]alert[/]{' (new)' if alert['id'] in new_ids else ''} {alert['raised_at']}  {alert['message']}")
    for path in written:
        out.print(f"plot      {path}")
