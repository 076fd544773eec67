"""Flower strategies by name, each wrapped in the update guard.

The guard checks every client update before the strategy sees it: the arrays must match the
global model's count, shapes and dtypes and hold only finite numbers; with `clip_norm` > 0 an
update whose L2 norm ‖w − w_global‖ exceeds it is scaled down to it. A rejected update is
logged and counted, never aggregated. Failed replies (a client that crashed or timed out)
arrive as error messages, which the strategy drops; the guard counts them too.

Then the sound updates are screened (robust.py, the same rules the edge gateways apply to
their devices): an outlier (its norm far over the round's median) is set aside and counted
per reason, and each reply's `num-examples` is replaced by its capped weight before the
strategy weighs the replies. So the user's strategy (FedAvg by default) runs on screened
updates at FedAvg's cost.

Where the next round starts: `train_from(server_round, arrays)`, when set, replaces the
arrays Flower carries from the last aggregate (the ServerApp's acceptance gate makes a
round after a held one train from the last accepted model; see server_app.py).

Three kinds of client answer a round: a SuperNode on a partition of a built-in dataset
(`partition-id` in its metrics), one on its own data (`own-data`), and an edge gateway
(`edge-updates`, with its name in an `edge` ConfigRecord: federated/gateway.py) that answers
for the devices behind it. The guard counts each kind (RoundStats), keeps one answer per
gateway name a round (a gateway restarted mid-round may answer twice: the second would count
its devices again), and hands the strategy metrics with one set of keys, as Flower's
strategies require.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp.strategy import FedAdam, FedAvg, FedAvgM, FedMedian, FedProx, FedTrimmedAvg, Krum

from .robust import screen
from .settings import FederationSettings

log = logging.getLogger("pollinate.federated")

BASES = {
    "fedavg": FedAvg,
    "fedprox": FedProx,
    "fedadam": FedAdam,
    "fedavgm": FedAvgM,
    "fedmedian": FedMedian,
    "fedtrimmedavg": FedTrimmedAvg,
    "krum": Krum,
}


@dataclass
class RoundStats:
    """What happened to the updates of one round."""

    round: int = 0
    replies: int = 0
    failed: int = 0
    rejected: int = 0
    clipped: int = 0
    accepted: int = 0
    examples: int = 0
    # robust screening (robust.py): updates set aside per reason, claims capped, the weight
    # the kept updates carried, the round's median update norm and the outlier limit used
    set_aside: dict[str, int] = field(default_factory=dict)
    examples_capped: int = 0
    examples_weight: float = 0.0
    norm_median: float | None = None
    norm_max: float | None = None  # the largest kept update norm
    norm_limit: float | None = None
    cosine_min: float | None = None  # the lowest cosine with the others' mean, before setting aside
    cosine_median: float | None = None  # the round's median of those cosines
    clients: list[int] = field(default_factory=list)
    reasons: list[str] = field(default_factory=list)
    client_train_seconds: list[float] = field(default_factory=list)
    train_loss: float | None = None
    aggregation_seconds: float = 0.0
    # own-data SuperNodes (their node ids) and their examples
    own_data: list[int] = field(default_factory=list)
    own_data_examples: int = 0
    # edge gateways: {name: {"updates", "devices", "examples", "rejected", "set_aside", "examples_capped",
    #                         "norm_median", "kinds": {kind: n}}}
    gateways: dict[str, dict] = field(default_factory=dict)

    @property
    def edge_updates(self) -> int:
        return sum(g["updates"] for g in self.gateways.values())

    @property
    def edge_devices(self) -> int:
        return sum(g["devices"] for g in self.gateways.values())

    @property
    def edge_examples(self) -> int:
        return sum(g["examples"] for g in self.gateways.values())

    def robust_summary(self) -> dict:
        """The round's screening, for its history row and its version's lineage."""
        return {"set_aside": dict(sorted(self.set_aside.items())), "examples_capped": self.examples_capped,
                "examples_weight": self.examples_weight, "norm_median": self.norm_median,
                "norm_max": self.norm_max, "norm_limit": self.norm_limit, "cosine_min": self.cosine_min,
                "cosine_median": self.cosine_median}

    def edge_summary(self) -> dict:
        """What the devices behind the gateways contributed (devices: distinct per gateway, summed)."""
        return {"updates": self.edge_updates, "devices": self.edge_devices, "examples": self.edge_examples,
                "gateways": {name: dict(g) for name, g in sorted(self.gateways.items())}}


EDGE_RECORD = "edge"  # the ConfigRecord in a gateway's reply: {"gateway": name, "kinds": JSON, "set-aside": JSON}
NORM_MEDIANS = "edge-norm-medians"  # train config: {gateway: median norm of its kept device updates last round}
COMMON_METRICS = ("num-examples", "train-loss", "train-seconds")


def gateway_answer(msg: Message) -> tuple[str, dict] | None:
    """(gateway name, its counts) for a gateway's reply, None for any other client's."""
    metrics = msg.content["metrics"]
    if "edge-updates" not in metrics:
        return None
    record = msg.content.get(EDGE_RECORD) if hasattr(msg.content, "get") else None
    name = str(record.get("gateway", "")) if record is not None else ""
    name = name or f"node-{msg.metadata.src_node_id}"
    try:
        kinds = json.loads(str(record.get("kinds", "{}"))) if record is not None else {}
    except ValueError:
        kinds = {}
    try:
        set_aside = json.loads(str(record.get("set-aside", "{}"))) if record is not None else {}
    except ValueError:
        set_aside = {}
    counts = {"updates": int(metrics.get("edge-updates", 0)), "devices": int(metrics.get("edge-devices", 0)),
              "examples": int(metrics.get("edge-examples", 0)), "rejected": int(metrics.get("edge-rejected", 0)),
              "set_aside": {str(k): int(v) for k, v in dict(set_aside).items()} if isinstance(set_aside, dict) else {},
              "examples_capped": int(metrics.get("edge-examples-capped", 0)),
              "norm_median": float(metrics.get("edge-norm-median", 0.0)) or None,
              "kinds": {str(k): int(v) for k, v in dict(kinds).items()}}
    return name, counts


def check_update(arrays: list[np.ndarray], reference: list[np.ndarray]) -> str | None:
    """Why this update may not be aggregated, or None when it is sound."""
    if len(arrays) != len(reference):
        return f"{len(arrays)} arrays, the model has {len(reference)}"
    for i, (a, r) in enumerate(zip(arrays, reference)):
        if a.shape != r.shape:
            return f"array {i} has shape {a.shape}, expected {r.shape}"
        if a.dtype != r.dtype:
            return f"array {i} has dtype {a.dtype}, expected {r.dtype}"
        if np.issubdtype(a.dtype, np.floating) and not np.isfinite(a).all():
            return f"array {i} holds NaN or infinite values"
    return None


def update_norm(arrays: list[np.ndarray], reference: list[np.ndarray]) -> float:
    """‖w − w_global‖ over the floating-point arrays (integer state is not a weight)."""
    total = 0.0
    for a, r in zip(arrays, reference):
        if np.issubdtype(a.dtype, np.floating):
            d = a.astype(np.float32, copy=False) - r.astype(np.float32, copy=False)
            d = d.reshape(-1)
            total += float(np.dot(d, d))
    return float(np.sqrt(total))


def clip_update(arrays: list[np.ndarray], reference: list[np.ndarray], bound: float) -> tuple[list[np.ndarray], bool]:
    deltas = [a.astype(np.float64) - r for a, r in zip(arrays, reference)]
    norm = float(np.sqrt(sum(float((d**2).sum()) for d in deltas)))
    if norm <= bound or norm == 0:
        return arrays, False
    factor = bound / norm
    return [(r + d * factor).astype(a.dtype) for a, r, d in zip(arrays, reference, deltas)], True


def strategy_kwargs(settings: FederationSettings, sampled: int) -> dict:
    kwargs: dict = {
        "fraction_train": settings.fraction,
        "fraction_evaluate": 0.0,  # the server evaluates centrally on the held-out test split
        "min_train_nodes": max(1, min(settings.min_clients, sampled)),
        "min_evaluate_nodes": 1,
        "min_available_nodes": max(1, min(settings.min_clients, sampled)),
    }
    name = settings.strategy
    if name == "fedprox":
        kwargs["proximal_mu"] = settings.proximal_mu
    elif name == "fedadam":
        kwargs.update(eta=settings.eta, eta_l=settings.eta_l)
    elif name == "fedavgm":
        kwargs.update(server_learning_rate=settings.server_learning_rate, server_momentum=settings.server_momentum)
    elif name == "fedtrimmedavg":
        kwargs["beta"] = settings.beta
    elif name == "krum":
        kwargs["num_malicious_nodes"] = settings.krum_malicious or max(1, int(0.2 * sampled))
    return kwargs


def make_strategy(settings: FederationSettings, num_nodes: int):
    """The named Flower strategy, guarded. `stats` on the result holds the last round's RoundStats.
    `train_config_hook(server_round) -> dict`, when set, adds keys to each round's train config
    (the ServerApp's edge rounds name their base version that way)."""
    base = BASES[settings.strategy]
    sampled = max(1, int(num_nodes * settings.fraction))

    class Guarded(base):  # type: ignore[misc, valid-type]
        def __init__(self, **kwargs):
            super().__init__(**kwargs)
            self.reference: list[np.ndarray] = []
            self.stats = RoundStats()
            self.history: list[RoundStats] = []
            self.policy = settings.robust_policy()
            self.train_config_hook: Callable[[int], dict] | None = None
            self.train_from: Callable[[int, ArrayRecord], ArrayRecord] | None = None
            self.edge_norm_medians: dict[str, float] = {}  # gateway -> its devices' median kept norm last round

        def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid):
            extra = self.train_config_hook(server_round) if self.train_config_hook is not None else {}
            if self.train_from is not None:
                arrays = self.train_from(server_round, arrays)
            self.reference = arrays.to_numpy_ndarrays()
            config = ConfigRecord({**config, **extra, NORM_MEDIANS: json.dumps(self.edge_norm_medians)})
            return super().configure_train(server_round, arrays, config, grid)

        def aggregate_train(self, server_round: int, replies):
            started = time.perf_counter()
            stats = RoundStats(round=server_round)
            errors: list[Message] = []
            sound: list[tuple[Message, int | str, tuple[str, dict] | None, float, int]] = []
            deltas_of: list[list[np.ndarray]] = []  # each sound reply's arrays (its delta is taken lazily)
            norms: list[float] = []
            for msg in replies:
                stats.replies += 1
                if msg.has_error():
                    stats.failed += 1
                    errors.append(msg)  # the base strategy drops (and logs) error replies
                    continue
                metrics = msg.content["metrics"]
                client = int(metrics.get("partition-id", msg.metadata.src_node_id))
                gateway = gateway_answer(msg)
                if gateway is not None:
                    client = gateway[0]
                arrays = msg.content["arrays"].to_numpy_ndarrays()
                problem = check_update(arrays, self.reference)
                if gateway is not None and (gateway[0] in stats.gateways
                                            or any(g is not None and g[0] == gateway[0] for _, _, g, _, _ in sound)):
                    problem = "this gateway already answered this round (restarted mid-round?): its devices count once"
                if problem:
                    stats.rejected += 1
                    stats.reasons.append(f"client {client}: {problem}")
                    log.warning("round %s: rejected the update of client %s: %s", server_round, client, problem)
                    continue
                if settings.clip_norm > 0:
                    arrays, clipped = clip_update(arrays, self.reference, settings.clip_norm)
                    if clipped:
                        stats.clipped += 1
                        msg.content["arrays"] = ArrayRecord(arrays)
                units = max(1, int(gateway[1]["updates"])) if gateway is not None else 1
                sound.append((msg, client, gateway, float(metrics.get("num-examples", 0)), units))
                norms.append(update_norm(arrays, self.reference))
                deltas_of.append(arrays)
            reference = self.reference

            def pieces(i: int):
                return (a.astype(np.float32, copy=False) - r.astype(np.float32, copy=False)
                        for a, r in zip(deltas_of[i], reference) if np.issubdtype(a.dtype, np.floating))

            # no stand-in median here: with one or two replies (a gateway, an own-data node) each
            # is a registered SuperNode and a gateway has screened its devices already
            screening = screen(norms, [claim for _, _, _, claim, _ in sound], self.policy,
                               contributors=[units for *_, units in sound], pieces=pieces)
            stats.norm_median, stats.norm_limit = screening.kept_norm_median, screening.norm_limit
            stats.norm_max, stats.cosine_min = screening.kept_norm_max, screening.cosine_min
            stats.cosine_median = screening.cosine_median
            stats.examples_capped = screening.capped
            for i, why in sorted(screening.details.items()):
                msg, client, gateway, _, _ = sound[i]
                reason = screening.set_aside[i]
                stats.set_aside[reason] = stats.set_aside.get(reason, 0) + 1
                stats.reasons.append(f"client {client}: set aside: {why}")
                log.warning("round %s: set aside the update of client %s: %s", server_round, client, why)
            kept: list[Message] = []
            medians: dict[str, float] = {}
            for i, weight in zip(screening.kept, screening.weights):
                msg, client, gateway, claim, _ = sound[i]
                metrics = msg.content["metrics"]
                stats.accepted += 1
                examples = int(claim)
                stats.examples += examples
                stats.examples_weight += weight
                if gateway is not None:
                    stats.gateways[gateway[0]] = gateway[1]
                    if gateway[1].get("norm_median"):
                        medians[gateway[0]] = float(gateway[1]["norm_median"])
                elif int(metrics.get("own-data", 0)):
                    stats.own_data.append(msg.metadata.src_node_id)
                    stats.own_data_examples += examples
                else:
                    stats.clients.append(client)
                stats.client_train_seconds.append(float(metrics.get("train-seconds", 0.0)))
                # the strategy weighs the reply by its capped claim, not by what it claimed
                metrics["num-examples"] = float(weight)
                kept.append(msg)
            self.edge_norm_medians = {**self.edge_norm_medians, **medians}
            if kept:
                # devices report no loss: the round's loss is over the clients that trained here
                trained = [m for m in kept if "train-loss" in m.content["metrics"]]
                if trained:
                    weights = [float(m.content["metrics"].get("num-examples", 1)) for m in trained]
                    losses = [float(m.content["metrics"]["train-loss"]) for m in trained]
                    stats.train_loss = float(np.average(losses, weights=weights)) if sum(weights) > 0 else None
                for m in kept:  # Flower aggregates only replies whose metrics have the same keys
                    original = m.content["metrics"]
                    m.content["metrics"] = MetricRecord({k: original.get(k, 0.0) for k in COMMON_METRICS})
                arrays, metrics = super().aggregate_train(server_round, kept + errors)
                result = (self._keep_dtypes(arrays), metrics)
            else:
                result = (None, None)  # nothing sound to aggregate: the global model stays
            stats.aggregation_seconds = time.perf_counter() - started
            self.stats = stats
            self.history.append(stats)
            return result

        def _keep_dtypes(self, arrays: ArrayRecord | None) -> ArrayRecord | None:
            """Averaging turns integer weights (Normalization's sample count) into floats; the
            global model keeps its own dtypes, or every later update would fail the guard."""
            if arrays is None:
                return None
            values = arrays.to_numpy_ndarrays()
            if all(v.dtype == r.dtype for v, r in zip(values, self.reference)):
                return arrays
            return ArrayRecord([
                np.asarray((np.rint(v) if np.issubdtype(r.dtype, np.integer) else v).astype(r.dtype))
                for v, r in zip(values, self.reference)
            ])

    return Guarded(**strategy_kwargs(settings, sampled))
