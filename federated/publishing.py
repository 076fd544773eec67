"""Publishing a federated round: register it, export it, point a channel at it, off the
critical path.

The ServerApp hands each due round to a `RoundPublisher` and goes on with the next round
while a background thread registers, exports and verifies the previous one. Rounds are
published one at a time, in round order, so versions appear in round order and each
version's parent is the last *accepted* version published before it (the federation's start
version for the first). A round the acceptance gate held (acceptance.py) is registered and
exported like any other, with the verdict in its lineage (`extra.gate`), but its channel
does not move and it is nobody's parent. A round whose publish fails (an export gate, a
converter error, a full disk) is recorded with its error and the next round's parent is the
last accepted version that did publish; the federation goes on. `accepted_weights` are the
weights of that parent (edge rounds hand them to devices). `close()` waits for the queue to drain; `wait_idle()` waits for the
rounds handed over so far (edge rounds do, so that devices train on a published version).

Keeping the publish off the critical path is worth most where clients train on other
machines (SuperNodes) or in other processes (the simulation's Ray actors): the server's
export then overlaps their training instead of adding to every round.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from core.errors import PollinateError
from registry import Lineage, Store, VersionRecord

from .acceptance import Verdict
from .settings import FederationSettings
from .strategies import RoundStats
from .task import set_model_weights

log = logging.getLogger("pollinate.federated")
# The publisher yields the CPU to the round in progress (its clients, on a small machine, and the
# server's evaluation) and uses the gaps between; 0 = same priority.
PUBLISHER_NICENESS = int(os.environ.get("POLLINATE_PUBLISHER_NICENESS", "10"))


@dataclass
class RoundJob:
    """Everything one round's publish needs, detached from the running federation."""

    round: int
    weights: list[np.ndarray]
    evaluation: dict  # training.report.evaluate_predictions of the global model on the test split
    predictions: np.ndarray  # its test-split predictions (for the report)
    stats: RoundStats
    full_report: bool = False  # plots too (the run's last round); otherwise report.json only
    verdict: Verdict | None = None  # the acceptance gate's; held (not passed): no channel moves

    @property
    def held(self) -> bool:
        return self.verdict is not None and not self.verdict.passed


@dataclass
class PublishResult:
    round: int
    version: int | None = None
    parent: int | None = None
    error: str | None = None
    seconds: float = 0.0
    waited_seconds: float = 0.0  # time in the queue before its publish began
    breakdown: dict = field(default_factory=dict)  # seconds per stage: keras, report, tflite, verify, register...
    channel_moved: bool = False  # False for a held round, a failed publish


@dataclass
class PublishingSummary:
    published: int = 0
    failed: int = 0
    drain_seconds: float = 0.0  # waiting at the end of the run for the queue to empty
    errors: list[dict] = field(default_factory=list)  # [{"round": N, "error": "..."}]

    def to_dict(self) -> dict:
        return asdict(self)


class RoundPublisher:
    """A background worker that publishes rounds in order; see the module docstring."""

    def __init__(self, store: Store, settings: FederationSettings, dataset, model, parent: int | None,
                 on_result: Callable[[PublishResult], None] | None = None):
        import keras

        self.store = store
        self.settings = settings
        self.dataset = dataset
        # the worker's own copy: the federation keeps setting new weights on the original
        self.model = keras.models.model_from_json(model.to_json())
        set_model_weights(self.model, model.get_weights())
        self.parent = parent
        self.accepted_weights = [np.array(w) for w in model.get_weights()]  # the weights of `parent`
        self.on_result = on_result
        self.summary = PublishingSummary()
        self._queue: queue.Queue = queue.Queue()
        self._thread = threading.Thread(target=self._work, name="pollinate-round-publisher", daemon=True)
        self._thread.start()
        self._closed = False

    def submit(self, job: RoundJob) -> None:
        if self._closed:
            raise PollinateError("the round publisher is closed")
        self._queue.put((job, time.perf_counter()))

    def wait_idle(self) -> int | None:
        """Wait until every round submitted so far is published (or failed); returns the newest
        accepted version published (the federation's start version before any), `parent` of
        the next (its weights: `accepted_weights`)."""
        self._queue.join()
        return self.parent

    def close(self) -> PublishingSummary:
        """Wait for every submitted round to be published (or to fail); idempotent."""
        if not self._closed:
            self._closed = True
            started = time.perf_counter()
            self._queue.put(None)
            self._thread.join()
            self.summary.drain_seconds = time.perf_counter() - started
        return self.summary

    def _work(self) -> None:
        if PUBLISHER_NICENESS and hasattr(os, "setpriority") and hasattr(threading, "get_native_id"):
            try:  # Linux: niceness is per thread, and the Node verifier it starts inherits it
                os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), PUBLISHER_NICENESS)
            except OSError:
                pass
        while True:
            item = self._queue.get()
            if item is None:
                self._queue.task_done()
                return
            try:
                self._publish(*item)
            finally:
                self._queue.task_done()

    def _publish(self, job: RoundJob, queued_at: float) -> None:
        """One round: register, export, report the result (never raises)."""
        result = PublishResult(round=job.round, parent=self.parent)
        started = time.perf_counter()
        result.waited_seconds = started - queued_at
        try:
            set_model_weights(self.model, job.weights)
            record = publish_round(self.store, self.settings, self.model, self.dataset, job, self.parent,
                                   breakdown=result.breakdown)
            result.version = record.version
            if not job.held:
                self.parent = record.version
                self.accepted_weights = [np.array(w) for w in job.weights]
                result.channel_moved = True
            self.summary.published += 1
        except Exception as exc:  # one failed publish never stops the federation
            result.error = _describe(exc)
            self.summary.failed += 1
            self.summary.errors.append({"round": job.round, "error": result.error})
            if isinstance(exc, PollinateError):
                log.warning("round %s: not published: %s", job.round, result.error)
            else:
                log.exception("round %s: not published", job.round)
        result.seconds = time.perf_counter() - started
        if self.on_result:
            try:
                self.on_result(result)
            except Exception:
                log.exception("round %s: the publish callback failed", job.round)


def _describe(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    if isinstance(exc, PollinateError):
        return text or type(exc).__name__
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def write_round_report(folder: Path, dataset, job: RoundJob, federation_id: str) -> dict[str, Path]:
    """The version's `report` artifact: report.json every round; the plots (≈ 0.4 s of
    matplotlib) only where asked, i.e. on the run's last round."""
    extra = {"federation": federation_id, "round": job.round}
    if job.full_report:
        from training.central import write_report

        return write_report(folder, dataset, job.evaluation, {}, extra, job.predictions)
    path = folder / "report.json"
    report = {"dataset": dataset.summary(), "history": {}, **extra, **job.evaluation}
    path.write_text(json.dumps(report, indent=2, sort_keys=True, default=float))
    return {"report.json": path}


def publish_round(store: Store, settings: FederationSettings, model, dataset, job: RoundJob,
                  parent: int | None, breakdown: dict | None = None) -> VersionRecord:
    """Register the round's global model with its exports (verified), and move the channel
    unless the acceptance gate held the round. `breakdown`, when given, receives the seconds
    spent per stage."""
    from export.pipeline import ExportOptions, export_model
    from training.central import profile_artifact
    from training.report import headline_metrics

    stats = job.stats
    seconds = breakdown if breakdown is not None else {}
    clock = [time.perf_counter()]

    def lap(stage: str) -> None:
        now = time.perf_counter()
        seconds[stage] = now - clock[0]
        clock[0] = now

    with tempfile.TemporaryDirectory(prefix="pollinate-round-") as scratch:
        scratch = Path(scratch)
        (scratch / "report").mkdir()
        model.save(scratch / "model.keras")
        lap("keras")
        report = write_round_report(scratch / "report", dataset, job, settings.federation_id)
        lap("report")
        artifacts = {"keras": {"model.keras": scratch / "model.keras"}, "report": report,
                     **profile_artifact(model, dataset)}
        lap("profile")
        if settings.format_list():
            # single-sample latency is a property of the architecture, not of a round's
            # weights: measured once by `pollinate export`, not on every round. TF.js is
            # verified on wasm, the page's default backend (cpu: ~10x the time per check)
            options = ExportOptions(formats=settings.format_list(), tfjs_backends=("wasm",), latency_repeats=1)
            result = export_model(model, scratch / "export", task=dataset.task, x_eval=dataset.x_test,
                                  y_eval=dataset.y_test, calibration=dataset.x_train, options=options,
                                  title=f"{settings.model_name} round {job.round}")
            artifacts.update(result.artifacts())
            seconds.update({f"export:{stage}": value for stage, value in result.report.get("seconds", {}).items()})
            lap("export")
        record = store.publish(
            settings.model_name,
            lineage=Lineage(
                source="federated",
                parent_version=parent,
                round=job.round,
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
                    "robust": stats.robust_summary(),
                    **({"gate": job.verdict.to_dict()} if job.verdict is not None else {}),
                    **({"edge": stats.edge_summary()} if stats.gateways or settings.edge else {}),
                    **({"own_data": {"nodes": len(stats.own_data), "examples": stats.own_data_examples}}
                       if stats.own_data else {}),
                    "data": settings.recipe(),
                    "federation": {k: v for k, v in asdict(settings).items() if k != "progress_file"},
                },
            ),
            artifacts=artifacts,
            metrics=headline_metrics(job.evaluation),
            input_spec=dataset.input_spec(),
            labels=dataset.labels,
        )
    if not job.held:
        store.set_channel(settings.model_name, settings.channel, record.version)
    lap("register")
    return record
