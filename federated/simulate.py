"""Flower's Simulation Engine on one machine: N virtual SuperNodes in Ray actors, our
ServerApp in this process, every round published to the store as it finishes."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import numpy as np

from core.errors import PollinateError

from .server_app import FederationOutcome, RoundCallback, run_federation
from .settings import FederationSettings


def backend_config(cpus_per_client: float = 1.0) -> dict:
    """Ray: one actor per core on this machine, each running clients one after another."""
    return {
        "client_resources": {"num_cpus": cpus_per_client, "num_gpus": 0.0},
        "init_args": {"num_cpus": os.cpu_count() or 1, "include_dashboard": False,
                      "logging_level": logging.ERROR, "log_to_driver": False},
    }


def quiet_flower() -> None:
    for name in ("flwr", "ray"):
        logging.getLogger(name).setLevel(logging.ERROR)


def simulate(settings: FederationSettings, on_round: RoundCallback | None = None,
             cpus_per_client: float = 1.0) -> FederationOutcome:
    from core.tensorflow import import_tensorflow, quiet_stderr

    import_tensorflow()  # flwr.simulation imports TensorFlow itself: let ours go first, quietly
    with quiet_stderr():
        from flwr.serverapp import ServerApp
        from flwr.simulation import run_simulation

    from .client_app import app as client_app

    settings.check()
    box: dict = {}
    server = ServerApp()

    @server.main()
    def main(grid, context):
        try:
            box["outcome"] = run_federation(grid, settings, on_round, num_nodes=settings.num_partitions)
        except BaseException as exc:  # re-raised in the caller's thread below
            box["error"] = exc

    quiet_flower()
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    run_simulation(server_app=server, client_app=client_app, num_supernodes=settings.num_partitions,
                   backend_config=backend_config(cpus_per_client))
    if "error" in box:
        raise box["error"]
    if "outcome" not in box:
        raise PollinateError("the simulation ended without a result (see the log above)")
    return box["outcome"]


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
