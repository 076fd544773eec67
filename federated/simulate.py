"""Flower's Simulation Engine on one machine, the current way (flwr 1.42): a SuperLink in
simulation mode on a free loopback port, our app submitted to it with `flwr run`, N virtual
SuperNodes in Ray actors. (`flwr.simulation.run_simulation` is deprecated since 1.28.)

Flower runs our ServerApp in a process of its own, from a FAB copy of the app; the ServerApp
appends each finished round to a progress file (JSON lines, see server_app.py) that this
process tails, so `on_round` still sees every round as it completes, and reads the outcome
(or the error) from the same file. Flower's own state for the run (FLWR_HOME) lives in the
store under `flower/simulations/`; it is removed after the run, unless the run crashed (then
it keeps Flower's logs). The SuperLink and everything it started are stopped on success, on
errors and on Ctrl-C.

With a simulated edge fleet (`fleet`, settings.edge_gateways > 0) the first virtual nodes are
edge gateways, and `pollinate serve` with simulated browsers and TFLite devices runs beside
the simulation over the same store (edge_fleet.py); they are stopped the same way.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import subprocess
import time
import uuid
from dataclasses import replace
from pathlib import Path

import numpy as np

from core.errors import InvalidInput, NotFound, PollinateError

from .runtime import APP_DIR, LocalSuperLink, flower_bin, follow_progress, stop_process_tree, write_run_config
from .server_app import FederationOutcome, RoundCallback
from .settings import FederationSettings

log = logging.getLogger("pollinate.federated")
ERRORS = {"InvalidInput": InvalidInput, "NotFound": NotFound, "PollinateError": PollinateError}


def federation_config(num_supernodes: int, cpus_per_client: float = 1.0, waiting_actors: int = 0) -> dict:
    """`flwr run --federation-config`: N virtual SuperNodes, Ray with one actor per core, plus
    one per gateway (a gateway's ClientApp mostly waits for its devices, and must not keep the
    ordinary clients from running)."""
    per_client = max(1, int(round(cpus_per_client)))
    return {
        "num-supernodes": num_supernodes,
        "backend": "ray",
        "client-resources-num-cpus": per_client,
        "init-args-num-cpus": (os.cpu_count() or 1) + waiting_actors * per_client,
        "init-args-logging-level": "ERROR",
        "init-args-log-to-driver": False,
    }


def simulate(settings: FederationSettings, on_round: RoundCallback | None = None,
             cpus_per_client: float = 1.0, keep_flower_home: bool = False, fleet=None,
             fleet_report: dict | None = None) -> FederationOutcome:
    """Run a federation of `settings.num_partitions` virtual SuperNodes; returns once every
    round is published. Raises the ServerApp's own error (InvalidInput, NotFound, ...).

    `fleet` (edge_fleet.FleetOptions, with settings.edge_gateways > 0): the simulated edge
    devices; `fleet_report` (a dict) receives EdgeFleet.report() and the fleet's folder."""
    settings.check()
    if (fleet is None) != (settings.edge_gateways == 0):
        raise InvalidInput("simulated gateways and a simulated edge fleet go together")
    from export.pipeline import check_runtimes

    check_runtimes(settings.format_list())  # rounds export: fail now, not in round 1's publish
    home = Path(settings.home).resolve()
    finished = _already_finished(settings)
    if finished is not None:  # nothing left to do: no need to start Flower to find out
        return finished
    flwr_home = home / "flower" / "simulations" / f"{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"
    flwr_home.mkdir(parents=True)
    progress = flwr_home / "progress.jsonl"
    settings = replace(settings, home=str(home), progress_file=str(progress))
    overrides = write_run_config(flwr_home / "run-config.toml", settings.to_config())
    federation = " ".join(f"{k}={json.dumps(v)}" for k, v in federation_config(
        settings.num_partitions, cpus_per_client, settings.edge_gateways).items())
    succeeded = False
    edge = None
    try:
        with contextlib.ExitStack() as stack:
            if fleet is not None:
                from .edge_fleet import EdgeFleet

                edge = EdgeFleet(settings, fleet, flwr_home / "edge")
                if fleet_report is not None:  # after the fleet stopped (exit callbacks run last first)
                    stack.callback(lambda: fleet_report.update(edge.report(), folder=str(edge.folder)))
                stack.enter_context(edge)
                if fleet_report is not None:
                    fleet_report["url"] = edge.url
            link = stack.enter_context(LocalSuperLink(flwr_home, simulation=True))
            command = [flower_bin("flwr"), "run", str(APP_DIR), "local", "--run-config", str(overrides),
                       "--federation-config", federation, "--stream"]
            with open(flwr_home / "run.log", "wb") as run_log:
                runner = subprocess.Popen(command, env=link.env, cwd=flwr_home, stdout=run_log,
                                          stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
            try:
                final = follow_progress(progress, runner, on_round, on_tick=edge.check_alive if edge else None)
            finally:
                if runner.poll() is None:
                    stop_process_tree(runner, timeout=5)
        if final is None:
            raise PollinateError(f"the simulation ended without a result; see {flwr_home / 'run.log'} "
                                 f"and {flwr_home / 'superlink.log'}{_last_lines(flwr_home / 'run.log')}")
        if final["event"] == "error":
            succeeded = final["kind"] in ERRORS  # reported cleanly (bad input...): nothing to debug
            error = ERRORS.get(final["kind"], PollinateError)
            message = final["message"] if final["kind"] in ERRORS else f"{final['type']}: {final['message']}"
            raise error(message)
        succeeded = True
        return FederationOutcome.from_dict(final["outcome"])
    finally:
        if succeeded and not keep_flower_home:
            shutil.rmtree(flwr_home, ignore_errors=True)


def _already_finished(settings: FederationSettings) -> FederationOutcome | None:
    """With `resume`: the outcome of a federation that already ran all its rounds (the
    ServerApp decides the same way: see server_app.resolve_start), else None."""
    if not settings.resume:
        return None
    from registry import Store

    try:
        versions = [v for v in Store(settings.home).list_versions(settings.model_name) if v.lineage.source == "federated"]
    except PollinateError:
        versions = []
    if not versions:
        raise InvalidInput(f"nothing to resume: {settings.model_name} has no federated version yet")
    last = versions[-1]
    saved = last.lineage.extra.get("federation", {})
    done = int(last.lineage.round or 0)
    if done < max(int(saved.get("rounds", 0)), settings.rounds):
        return None
    return FederationOutcome(str(saved.get("federation_id", "")), settings.model_name, done)


def _last_lines(path: Path, count: int = 5) -> str:
    try:
        lines = [ln for ln in path.read_text(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return ""
    return (":\n" + "\n".join(lines[-count:])) if lines else ""


def write_history(outcome: FederationOutcome, settings: FederationSettings, folder: Path,
                  reference: dict | None = None, partition: dict | None = None) -> dict[str, Path]:
    """history.json, and the per-round plots."""
    from dataclasses import asdict

    folder.mkdir(parents=True, exist_ok=True)
    files = {"history.json": folder / "history.json"}
    payload = {
        "federation_id": outcome.federation_id,
        "model": outcome.model_name,
        "settings": asdict(settings),
        "start_round": outcome.start_round,
        "initial": outcome.initial,
        "rounds": outcome.history,
        "versions": outcome.versions,
        "publishing": outcome.publishing,
        "reference": reference,
        "partition": partition,
    }
    files["history.json"].write_text(json.dumps(payload, indent=2, default=float) + "\n")
    if outcome.history:
        files["rounds.png"] = plot_rounds({"this run": outcome}, folder / "rounds.png", reference=reference,
                                          title=f"{outcome.model_name}: {settings.strategy}, {settings.num_partitions} clients, {settings.partition}")
    return files


def plot_rounds(runs: dict[str, FederationOutcome | list[dict]], path: Path, *, reference: dict | None, title: str) -> Path:
    """Accuracy (or MAE) and loss per round, one line per run, the central model as a reference."""
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    metric = None
    for label, run in runs.items():
        rows = run.history if isinstance(run, FederationOutcome) else run
        initial = run.initial if isinstance(run, FederationOutcome) else {}
        metric = metric or ("accuracy" if "accuracy" in rows[0] else "mae")
        rounds = ([initial["round"]] if initial else []) + [r["round"] for r in rows]
        for ax, key in zip(axes, (metric, "loss")):
            values = ([initial.get(key)] if initial else []) + [r[key] for r in rows]
            values = [np.nan if v is None or not np.isfinite(v) else v for v in values]
            ax.plot(rounds, values, marker="o", ms=3, label=label)
    if reference:
        for ax, key in zip(axes, (metric, "loss")):
            if reference.get(key) is not None:
                ax.axhline(reference[key], color="black", ls="--", lw=1, label=f"central ({reference.get('label', 'reference')})")
    for ax, key in zip(axes, (metric, "loss")):
        ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
        ax.set_xlabel("round")
        ax.set_ylabel(f"test {key}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    if metric == "accuracy":
        axes[0].set_ylim(0, 1.02)
    axes[1].set_yscale("log")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
