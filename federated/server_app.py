"""The Flower ServerApp: runs the strategy and turns rounds into published versions.

Each round (or every `publish_every` rounds, and always the last) the aggregated global model
is evaluated centrally on the held-out test split, registered as a new version (source
`federated`, its round, its parent version, the strategy, the clients and examples that made
it, how many updates were rejected or dropped), exported (TF.js + TFLite int8 by default,
verified like any export) and pointed to by a channel (default `canary`), so a running
`pollinate serve` hands it to browsers and phones at once.

Flower leaves checkpointing and resuming to the user; here every published round *is* the
checkpoint: `resume` continues from the newest version of the federation and its round.
"""

from __future__ import annotations

import logging
import tempfile
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context, MetricRecord
from flwr.serverapp import Grid, ServerApp

from registry import Lineage, Store, VersionRecord
from core.errors import InvalidInput, PollinateError
from core.tensorflow import import_tensorflow, quiet_keras_warnings

from .settings import FederationSettings
from .strategies import RoundStats, make_strategy
from .task import set_model_weights, to_arrays

log = logging.getLogger("pollinate.federated")

RoundCallback = Callable[[dict], None]


@dataclass
class Start:
    """Where a federation begins: the model, its parent version and the round already done."""

    model: object
    parent_version: int | None
    first_round: int  # rounds already completed (0 for a new federation)
    federation_id: str
    settings: FederationSettings


@dataclass
class FederationOutcome:
    federation_id: str
    model_name: str
    start_round: int
    history: list[dict] = field(default_factory=list)
    versions: list[int] = field(default_factory=list)
    initial: dict = field(default_factory=dict)


def resolve_start(store: Store, settings: FederationSettings, dataset) -> Start:
    """The model to start from: a stored version, a fresh one, or the federation to resume."""
    from training.stored import load_keras_model

    if settings.resume:
        versions = [v for v in _versions_or_none(store, settings.model_name) if v.lineage.source == "federated"]
        if not versions:
            raise InvalidInput(f"nothing to resume: {settings.model_name} has no federated version yet")
        last = versions[-1]
        # the federation's own settings, extended to more rounds if asked for
        saved = FederationSettings(**{**last.lineage.extra["federation"], "resume": False, "home": settings.home})
        saved.rounds = max(saved.rounds, settings.rounds)
        model = load_keras_model(store, last.model, last.version)
        return Start(model, last.version, int(last.lineage.round or 0), saved.federation_id, saved)
    federation_id = settings.federation_id or uuid.uuid4().hex[:12]
    settings.federation_id = federation_id
    if settings.start_from == "scratch":
        import keras

        from training.zoo import build_model

        keras.utils.set_random_seed(settings.seed)
        return Start(build_model(settings.zoo_model, dataset), None, 0, federation_id, settings)
    version = None if settings.start_from == "latest" else int(settings.start_from)
    record = store.get_version(settings.model_name, version)
    return Start(load_keras_model(store, record.model, record.version), record.version, 0, federation_id, settings)


def _versions_or_none(store: Store, name: str) -> list[VersionRecord]:
    try:
        return store.list_versions(name)
    except PollinateError:
        return []


def central_evaluation(model, dataset) -> dict:
    from training.report import evaluate_predictions

    predictions = np.asarray(model.predict(dataset.x_test, batch_size=256, verbose=0))
    return evaluate_predictions(dataset, predictions) | {"_predictions": predictions}


def publish_round(store: Store, settings: FederationSettings, model, dataset, evaluation: dict,
                  round_number: int, parent: int | None, stats: RoundStats) -> VersionRecord:
    """Register the global model of this round with its exports, and move the channel."""
    from export.pipeline import ExportOptions, export_model
    from training.central import write_report
    from training.report import headline_metrics

    predictions = evaluation.pop("_predictions")
    with tempfile.TemporaryDirectory(prefix="pollinate-round-") as scratch:
        scratch = Path(scratch)
        model.save(scratch / "model.keras")
        report = write_report(scratch, dataset, evaluation, {}, {"federation": settings.federation_id,
                                                                  "round": round_number}, predictions)
        artifacts = {"keras": {"model.keras": scratch / "model.keras"}, "report": report}
        if settings.format_list():
            options = ExportOptions(formats=settings.format_list(), tfjs_backends=("cpu",), latency_repeats=5)
            result = export_model(model, scratch / "export", task=dataset.task, x_eval=dataset.x_test,
                                  y_eval=dataset.y_test, calibration=dataset.x_train, options=options,
                                  title=f"{settings.model_name} round {round_number}")
            artifacts.update(result.artifacts())
        record = store.publish(
            settings.model_name,
            lineage=Lineage(
                source="federated",
                parent_version=parent,
                round=round_number,
                dataset_fingerprint=dataset.fingerprint(),
                hyperparameters={"local_epochs": settings.local_epochs, "batch_size": settings.batch_size,
                                 "learning_rate": settings.learning_rate, "strategy": settings.strategy,
                                 "fraction": settings.fraction, "partition": settings.partition},
                extra={
                    "federation_id": settings.federation_id,
                    "strategy": settings.strategy,
                    "clients": sorted(stats.clients),
                    "examples": stats.examples,
                    "rejected": stats.rejected,
                    "failed": stats.failed,
                    "clipped": stats.clipped,
                    "data": settings.recipe(),
                    "federation": asdict(settings),
                },
            ),
            artifacts=artifacts,
            metrics=headline_metrics(evaluation),
            input_spec=dataset.input_spec(),
            labels=dataset.labels,
        )
    store.set_channel(settings.model_name, settings.channel, record.version)
    return record


def run_federation(grid: Grid, settings: FederationSettings, on_round: RoundCallback | None = None,
                   num_nodes: int | None = None) -> FederationOutcome:
    """Run the rounds on `grid` and publish them; shared by simulation and deployment."""
    from training.datasets import reload_dataset

    import_tensorflow()
    quiet_keras_warnings()
    settings.check()
    store = Store(settings.home)
    dataset = reload_dataset(settings.recipe())
    if dataset is None:
        raise InvalidInput(f"dataset {settings.dataset!r} is not available on the server")
    start = resolve_start(store, settings, dataset)
    settings = start.settings
    model = start.model
    if tuple(model.inputs[0].shape[1:]) != dataset.input_shape:
        raise InvalidInput(f"the model takes {tuple(model.inputs[0].shape[1:])}, the dataset gives {dataset.input_shape}")
    remaining = settings.rounds - start.first_round
    outcome = FederationOutcome(start.federation_id, settings.model_name, start.first_round)
    if remaining <= 0:
        log.info("federation %s already completed %s rounds", start.federation_id, start.first_round)
        return outcome

    nodes = num_nodes if num_nodes is not None else len(list(grid.get_node_ids()))
    strategy = make_strategy(settings, max(nodes, settings.min_clients))
    config = ConfigRecord({**settings.to_config(), "architecture": model.to_json(), "task": dataset.task})
    parent = start.parent_version
    clock = {"round_started": time.perf_counter()}

    def evaluate(server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        nonlocal parent
        global_round = start.first_round + server_round
        evaluated_at = time.perf_counter()
        set_model_weights(model, arrays.to_numpy_ndarrays())
        evaluation = central_evaluation(model, dataset)
        test = evaluation["test"]
        eval_seconds = time.perf_counter() - evaluated_at
        if server_round == 0:
            evaluation.pop("_predictions")
            outcome.initial = {"round": global_round, **_headline(test)}
            clock["round_started"] = time.perf_counter()
            return MetricRecord(_headline(test))
        stats = strategy.stats
        row = {
            "round": global_round, **_headline(test),
            "replies": stats.replies, "accepted": stats.accepted, "rejected": stats.rejected,
            "failed": stats.failed, "clipped": stats.clipped, "examples": stats.examples,
            "clients": sorted(stats.clients), "train_loss": stats.train_loss, "reasons": stats.reasons,
            "client_train_seconds_sum": float(sum(stats.client_train_seconds)),
            "client_train_seconds_max": float(max(stats.client_train_seconds, default=0.0)),
            "aggregation_seconds": stats.aggregation_seconds,
            "evaluation_seconds": eval_seconds,
            "version": None, "publish_seconds": 0.0, "publish_error": None,
        }
        due = global_round % settings.publish_every == 0 or global_round == settings.rounds
        if due:
            publish_started = time.perf_counter()
            try:
                record = publish_round(store, settings, model, dataset, evaluation, global_round, parent, stats)
                parent = record.version
                row["version"] = record.version
                outcome.versions.append(record.version)
            except PollinateError as exc:  # e.g. a poisoned model failing an export gate
                row["publish_error"] = str(exc)
                log.warning("round %s: not published: %s", global_round, exc)
            row["publish_seconds"] = time.perf_counter() - publish_started
        now = time.perf_counter()
        row["round_seconds"] = now - clock["round_started"]
        clock["round_started"] = now
        outcome.history.append(row)
        if on_round:
            on_round(row)
        return MetricRecord(_headline(test))

    strategy.start(grid=grid, initial_arrays=ArrayRecord(to_arrays(model.get_weights())), num_rounds=remaining,
                   timeout=settings.round_timeout, train_config=config, evaluate_config=config,
                   evaluate_fn=evaluate)
    return outcome


def _headline(test: dict) -> dict:
    keys = ("accuracy", "loss") if "accuracy" in test else ("mae", "rmse", "loss")
    return {k: float(test[k]) for k in keys}


app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Deployment entry point (`flwr run`): settings come from the run config."""
    settings = FederationSettings.from_config(dict(context.run_config))
    outcome = run_federation(grid, settings, on_round=lambda row: log.warning(
        "round %s: %s, version %s", row["round"], {k: row[k] for k in ("accuracy", "loss") if k in row}, row["version"]))
    log.warning("federation %s finished: versions %s", outcome.federation_id, outcome.versions)
