"""The Flower ServerApp: runs the strategy and turns rounds into published versions.

Each round the aggregated global model is evaluated centrally on the held-out test split and
judged by the acceptance gate (acceptance.py) against the last accepted round. Every round
(or every `publish_every` rounds, and always the last) it is then handed to the
`RoundPublisher` (publishing.py), which registers it as a new version (source `federated`,
its round, its parent version, the strategy, the clients and examples that made it, how many
updates were rejected, set aside or dropped, the gate's verdict), exports it (TF.js + TFLite
int8 by default, verified like any export) and, when the gate passed it, points a channel at
it (default `canary`), so a running `pollinate serve` hands it to browsers and phones at
once. A held round is published for inspection but moves no channel, and the next round
trains from the last accepted model. The publish runs in the background while the next
round trains; the run ends when the last round is published.

Progress: with `progress_file` set (the simulation sets it; Flower runs this ServerApp in its
own process), every finished round is appended to that file as a JSON line, then the outcome
or the error: `{"event": "round", "row": {...}}`, `{"event": "done", "outcome": {...}}`,
`{"event": "error", "kind": "InvalidInput", "message": "..."}`.

Flower leaves checkpointing and resuming to the user; here every published round *is* the
checkpoint: `resume` continues from the newest version of the federation and its round.

Edge rounds (`edge` in the settings: gateways take part, see gateway.py): before each train
message goes out the publisher has published the round before, and the message names the
last accepted published version (`base-version`, with `global-round` and the Keras
`weight-names`) and carries that version's weights, so devices load a real version's model
files and train on exactly the weights the gateway hands them (after a held round, or one
whose publish failed, that is the version before it). Rounds go
through a RedeliveringGrid (redelivery.py) so that a gateway restarted mid-round gets its
round again. Each round's row and version lineage count what devices contributed
(`edge`: updates, devices, examples, per gateway).
"""

from __future__ import annotations

import json
import logging
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context, MetricRecord
from flwr.serverapp import Grid, ServerApp

from core.errors import InvalidInput, NotFound, PollinateError
from core.tensorflow import import_tensorflow, quiet_keras_warnings
from registry import Store, VersionRecord

from .acceptance import AcceptanceGate
from .publishing import PublishResult, RoundJob, RoundPublisher
from .redelivery import RedeliveringGrid
from .settings import FederationSettings
from .strategies import make_strategy
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
    publishing: dict = field(default_factory=dict)  # published/failed counts, errors, drain time

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> FederationOutcome:
        keys = ("federation_id", "model_name", "start_round", "history", "versions", "initial", "publishing")
        return cls(**{k: data[k] for k in keys if k in data})


def resolve_start(store: Store, settings: FederationSettings, dataset) -> Start:
    """The model to start from: a stored version, a fresh one, or the federation to resume."""
    from training.stored import load_keras_model

    if settings.resume:
        versions = [v for v in _versions_or_none(store, settings.model_name) if v.lineage.source == "federated"]
        if not versions:
            raise InvalidInput(f"nothing to resume: {settings.model_name} has no federated version yet")
        last = versions[-1]
        # the federation's own settings, extended to more rounds if asked for
        known = {f.name for f in fields(FederationSettings)}
        saved = FederationSettings(**{**{k: v for k, v in last.lineage.extra["federation"].items() if k in known},
                                      "resume": False, "home": settings.home, "progress_file": settings.progress_file})
        saved.rounds = max(saved.rounds, settings.rounds)
        # go on from the last version the gate accepted (a held one is not trained on), after the last round
        accepted = [v for v in versions if (v.lineage.extra.get("gate") or {}).get("passed", True)] or versions
        model = load_keras_model(store, accepted[-1].model, accepted[-1].version)
        return Start(model, accepted[-1].version, int(last.lineage.round or 0), saved.federation_id, saved)
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


def central_evaluation(model, dataset) -> tuple[dict, np.ndarray]:
    """The global model on the held-out test split: (metrics, predictions)."""
    from training.report import evaluate_predictions

    predictions = np.asarray(model.predict(dataset.x_test, batch_size=256, verbose=0))
    return evaluate_predictions(dataset, predictions), predictions


class RoundLedger:
    """The run's history, one row per round, released in round order once final.

    A row is final when its round is trained, aggregated and evaluated, and (when the round
    is due for publishing) the publisher has reported its version or its error. Rows are
    finalised from two threads (the federation's and the publisher's), hence the lock."""

    def __init__(self, outcome: FederationOutcome, on_round: RoundCallback | None):
        self.outcome = outcome
        self.on_round = on_round
        self._pending: list[dict] = []
        self._waiting: set[int] = set()
        self._lock = threading.Lock()

    def add(self, row: dict, awaits_publish: bool) -> None:
        with self._lock:
            self._pending.append(row)
            if awaits_publish:
                self._waiting.add(row["round"])
            self._release()

    def published(self, result: PublishResult) -> None:
        with self._lock:
            for row in self._pending:
                if row["round"] == result.round:
                    row.update(version=result.version, parent_version=result.parent, publish_error=result.error,
                               publish_seconds=result.seconds, publish_wait_seconds=result.waited_seconds,
                               publish_breakdown=result.breakdown, channel_moved=result.channel_moved)
                    if result.version is not None:
                        self.outcome.versions.append(result.version)
            self._waiting.discard(result.round)
            self._release()

    def _release(self) -> None:
        while self._pending and self._pending[0]["round"] not in self._waiting:
            row = self._pending.pop(0)
            self.outcome.history.append(row)
            if self.on_round:
                try:
                    self.on_round(row)
                except Exception:  # a broken progress display must not stop the federation
                    log.exception("round %s: the progress callback failed", row["round"])


def run_federation(grid: Grid, settings: FederationSettings, on_round: RoundCallback | None = None,
                   num_nodes: int | None = None) -> FederationOutcome:
    """Run the rounds on `grid`, handing due rounds to a RoundPublisher; shared by simulation
    and deployment. Returns once every round is published (or has failed to)."""
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
    ledger = RoundLedger(outcome, on_round)
    publisher = RoundPublisher(store, settings, dataset, model, start.parent_version, on_result=ledger.published)
    gate = AcceptanceGate(settings.gate_threshold, settings.gate)
    gate.accepted_arrays = to_arrays(model.get_weights())
    clock = {"round_started": time.perf_counter()}
    if settings.edge:
        grid = RedeliveringGrid(grid)
        config["weight-names"] = json.dumps([w.path for w in model.weights])

        def edge_round(server_round: int) -> dict:
            """Wait for the round before to be published: devices train on that version."""
            waited = time.perf_counter()
            base_version = publisher.wait_idle()
            clock["publish_wait"] = time.perf_counter() - waited
            return {"global-round": start.first_round + server_round, "base-version": int(base_version or 0)}

        strategy.train_config_hook = edge_round

    def train_from(server_round: int, arrays: ArrayRecord) -> ArrayRecord:
        """The arrays the next round trains from: the last accepted model (acceptance.py); in
        edge rounds the weights of the version the task names as its base (publishing.py)."""
        weights = publisher.accepted_weights if settings.edge else gate.accepted_arrays
        return ArrayRecord([np.asarray(w) for w in weights])

    strategy.train_from = train_from

    def evaluate(server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        """Flower's server-side evaluation: evaluate, record the round, hand it to the publisher."""
        global_round = start.first_round + server_round
        evaluated_at = time.perf_counter()
        weights = arrays.to_numpy_ndarrays()
        set_model_weights(model, weights)
        evaluation, predictions = central_evaluation(model, dataset)
        test = evaluation["test"]
        eval_seconds = time.perf_counter() - evaluated_at
        if server_round == 0:
            outcome.initial = {"round": global_round, **_headline(test)}
            gate.start(global_round, test)
            clock["round_started"] = time.perf_counter()
            return MetricRecord(_headline(test))
        stats = strategy.stats
        due = global_round % settings.publish_every == 0 or global_round == settings.rounds
        # a round in which no update was accepted left the model as it was: nothing new to publish
        unchanged = stats.accepted == 0
        skipped = "no client update was accepted: the model did not change" if due and unchanged else None
        due = due and not unchanged
        verdict = None if unchanged else gate.judge(global_round, test, weights)
        if verdict is not None and not verdict.passed:
            log.warning("round %s: %s; the next round trains from round %s", global_round, verdict.reason,
                        verdict.reference_round)
        now = time.perf_counter()
        row = {
            "round": global_round, **_headline(test),
            "gate": verdict.to_dict() if verdict else None, "held": bool(verdict and not verdict.passed),
            "channel_moved": False,
            "replies": stats.replies, "accepted": stats.accepted, "rejected": stats.rejected,
            "set_aside": dict(sorted(stats.set_aside.items())), "examples_capped": stats.examples_capped,
            "examples_weight": stats.examples_weight, "norm_median": stats.norm_median,
            "norm_max": stats.norm_max, "norm_limit": stats.norm_limit, "cosine_min": stats.cosine_min,
            "cosine_median": stats.cosine_median,
            "failed": stats.failed, "clipped": stats.clipped, "examples": stats.examples,
            "clients": sorted(stats.clients), "train_loss": stats.train_loss, "reasons": stats.reasons,
            "client_train_seconds_sum": float(sum(stats.client_train_seconds)),
            "client_train_seconds_max": float(max(stats.client_train_seconds, default=0.0)),
            "aggregation_seconds": stats.aggregation_seconds,
            "evaluation_seconds": eval_seconds,
            # the round's own wall time (training, aggregation, evaluation, Flower); its publish
            # runs in the background: publish_seconds once known
            "round_seconds": now - clock["round_started"],
            "published": due, "version": None, "parent_version": None, "publish_error": skipped,
            "publish_seconds": 0.0, "publish_wait_seconds": 0.0, "publish_breakdown": {},
            "edge_updates": stats.edge_updates, "edge_devices": stats.edge_devices,
            "edge_examples": stats.edge_examples, "gateways": stats.edge_summary()["gateways"],
            "own_data_nodes": len(stats.own_data), "own_data_examples": stats.own_data_examples,
        }
        if settings.edge:
            row["redelivered"] = getattr(grid, "redelivered", 0)
            row["base_publish_wait_seconds"] = clock.pop("publish_wait", 0.0)
        clock["round_started"] = now
        ledger.add(row, awaits_publish=due)
        if due:
            publisher.submit(RoundJob(global_round, weights, evaluation, predictions, stats,
                                      full_report=global_round == settings.rounds, verdict=verdict))
        return MetricRecord(_headline(test))

    started = time.perf_counter()
    try:
        strategy.start(grid=grid, initial_arrays=ArrayRecord(to_arrays(model.get_weights())), num_rounds=remaining,
                       timeout=settings.round_timeout, train_config=config, evaluate_config=config,
                       evaluate_fn=evaluate)
    finally:
        rounds_done = time.perf_counter()
        summary = publisher.close()  # rounds already handed over are still published
    outcome.publishing = {**summary.to_dict(), "rounds_seconds": rounds_done - started,
                          "total_seconds": time.perf_counter() - started}
    return outcome


def describe_edge(row: dict) -> str:
    """', edge: 5 updates from 5 devices (240 examples) via gw-0 (3), gw-1 (2), device updates set aside:
    1 norm_outlier, own data: ..., set aside: ...' or ''."""
    gateways = row.get("gateways") or {}
    text = ""
    if gateways:
        via = ", ".join(f"{name} ({g['updates']})" for name, g in sorted(gateways.items()))
        text += (f", edge: {_count(row['edge_updates'], 'update')} from {_count(row['edge_devices'], 'device')} "
                 f"({_count(row['edge_examples'], 'example')}) via {via}")
        aside: dict[str, int] = {}
        for g in gateways.values():
            for reason, n in (g.get("set_aside") or {}).items():
                aside[reason] = aside.get(reason, 0) + int(n)
        if aside:
            text += ", device updates set aside: " + ", ".join(f"{n} {reason}" for reason, n in sorted(aside.items()))
    if row.get("own_data_nodes"):
        text += (f", own data: {_count(row['own_data_nodes'], 'node')} "
                 f"({_count(row['own_data_examples'], 'example')})")
    if row.get("failed"):
        text += f", {row['failed']} failed"
    if row.get("set_aside"):
        text += ", set aside: " + ", ".join(f"{n} {reason}" for reason, n in sorted(row["set_aside"].items()))
    return text


def _count(n: int, word: str) -> str:
    return f"{n} {word}" + ("" if n == 1 else "s")


def _headline(test: dict) -> dict:
    keys = ("accuracy", "loss") if "accuracy" in test else ("mae", "rmse", "loss")
    return {k: float(test[k]) for k in keys}


class ProgressFile:
    """Appends JSON lines for whoever started the run (see the module docstring)."""

    def __init__(self, path: str):
        self.path = Path(path) if path else None
        self._lock = threading.Lock()

    def write(self, record: dict) -> None:
        if self.path is None:
            return
        line = json.dumps(record, default=_jsonable) + "\n"
        try:
            with self._lock, open(self.path, "a") as handle:
                handle.write(line)
        except OSError as exc:  # e.g. a path on the submitting machine: the log still tells
            log.warning("cannot write progress to %s: %s", self.path, exc)
            self.path = None


def _jsonable(value):
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    return str(value)


ERROR_KINDS = {"InvalidInput": InvalidInput, "NotFound": NotFound, "PollinateError": PollinateError}


def error_record(exc: BaseException) -> dict:
    kind = next((name for name, cls in ERROR_KINDS.items() if type(exc) is cls), None)
    if kind is None:
        kind = "InvalidInput" if isinstance(exc, InvalidInput) else "PollinateError" if isinstance(exc, PollinateError) else "crash"
    message = str(exc).strip() or type(exc).__name__
    return {"event": "error", "kind": kind, "type": type(exc).__name__, "message": message}


app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Entry point for `flwr run` (simulation and deployment): settings come from the run config."""
    settings = FederationSettings.from_config(dict(context.run_config))
    progress = ProgressFile(settings.progress_file)

    def on_round(row: dict) -> None:
        progress.write({"event": "round", "row": row})
        headline = {k: round(row[k], 4) for k in ("accuracy", "mae", "loss") if k in row}
        published = f"version {row['version']}" if row["version"] else (
            f"NOT published: {row['publish_error']}" if row["publish_error"] else "not due for publishing")
        if row.get("held"):
            published += f", HELD (channel not moved): {row['gate']['reason']}"
        log.warning("round %s: %s, %s%s", row["round"], headline, published, describe_edge(row))

    try:
        outcome = run_federation(grid, settings, on_round=on_round)
    except BaseException as exc:
        progress.write(error_record(exc))
        raise
    progress.write({"event": "done", "outcome": outcome.to_dict()})
    pub = outcome.publishing
    log.warning("federation %s finished: versions %s (%s published, %s failed)", outcome.federation_id,
                outcome.versions, pub.get("published", 0), pub.get("failed", 0))
