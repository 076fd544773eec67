"""The edge gateway: a Flower SuperNode that answers a round for the devices behind it.

Flower has no client for browsers or phones, so a gateway stands in for them. On a round's
train message its ClientApp (client_app.py dispatches here when the node config names a
`gateway`) opens a *task* in the store it shares with `pollinate serve` (registry/edge.py):
the message's weights as the base, the federation's local epochs, batch size and learning
rate, the version those weights are (`base-version`, which the ServerApp sends), an L2 bound
on updates. Devices fetch the task over HTTP, train and post `local − base`; the server
validates and durably records each update. The gateway waits until `min_updates` are in or
the task's deadline passes, closes the task, checks every update again (same rules as the
server: length, finite values, the norm bound), screens them (robust.py: outliers set aside,
each `examples` claim's weight capped), aggregates the rest and answers Flower with
`base + aggregate` and the summed (capped) example weight, so Flower weighs the gateway like
one client holding all its devices' examples.

The task's norm bound (what the server refuses with 422 `norm`, at no extra cost per update):
`--norm-bound` when given; else RECEIVE_MULTIPLE × the median norm of the updates this
gateway kept in the federation's previous round (the ServerApp sends it back in the train
config, `edge-norm-medians`); in a federation's first round, with no history yet, the base
weights' norm (an update larger than the whole model). The bound is loose on purpose: a
refused honest device cannot send again, and the fine screening happens at the gateway
against the round's own median. Once there is history it never depends on the model's
norm: a poisoned model (a round let through with the screening and the gate off, measured
in benchmarks/results/edge.md) cannot make the next round refuse honest updates, as the
base weights' norm did before issue 19.

Aggregates (over the screened updates):
- `mean`: the mean of the deltas weighted by their capped example counts (FedAvg over the devices);
- `median`: the coordinate-wise median (unweighted), robust to a minority of wild updates;
- `trimmed-mean`: per coordinate, drop the `trim` share of highest and lowest values, average
  the rest (unweighted).

No update by the deadline: the gateway answers with an error (Flower counts the node as
failed for the round) and the federation goes on without it.

Restarts: the task is keyed by (federation, round, gateway name), so a gateway killed in the
middle of its wait and given the round again resumes the *same* task: the same deadline, every
update accepted so far, none counted twice (the store's primary key is (task, device)). A
closed task's update files are kept until this gateway's next round, so a round given again
after the task closed is answered again from the same updates. Flower 1.42 does not give a
round again by itself (a killed ClientApp is answered with an error once its token expires,
a restarted SuperNode registers under a new node id): the ServerApp does
(federated/redelivery.py).
"""

from __future__ import annotations

import json
import logging
import math
import re
import time
from collections import Counter
from dataclasses import dataclass

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

from core.errors import InvalidInput, PollinateError

from .robust import DIRECTION_RATIO, EXAMPLES_MULTIPLE, NORM_MULTIPLE, RobustPolicy, screen
from .settings import FederationSettings
from .strategies import EDGE_RECORD, NORM_MEDIANS

log = logging.getLogger("pollinate.federated")

AGGREGATES = ("mean", "median", "trimmed-mean")
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
NORM_SLACK = 1e-4  # a clipped update sits on the bound, up to float32 rounding
# The task's receive bound: this many times the previous round's median kept norm (module
# docstring). Honest medians moved by at most 11% from one round to the next in the 20-round
# digits CNN run of benchmarks/results/federated.md and no honest update was over 1.5× its median.
RECEIVE_MULTIPLE = 10.0


class NoEdgeUpdates(PollinateError):
    """The round's deadline passed with no usable device update: the gateway fails the round."""


@dataclass(frozen=True)
class GatewayOptions:
    """A gateway's settings (`pollinate federate supernode --gateway NAME ...`), carried to its
    ClientApp in the node config."""

    name: str
    home: str
    min_updates: int = 1
    round_deadline: float = 120.0  # seconds from the task's opening
    norm_bound: float = 0.0  # fixed L2 bound on an update; 0: from the previous round's updates (module docstring)
    clip: bool = False  # scale updates over the bound down to it instead of refusing them
    aggregate: str = "mean"
    trim: float = 0.2  # trimmed-mean: share cut at each end
    poll_seconds: float = 0.25
    norm_multiple: float = NORM_MULTIPLE  # robust.py: outliers over this × the round's median norm
    direction_ratio: float = DIRECTION_RATIO  # robust.py: set aside opposing the round this much
    examples_multiple: float = EXAMPLES_MULTIPLE  # robust.py: a claim weighs at most this × the median claim
    examples_cap: int = 0  # robust.py: and at most this many examples (0: no fixed cap)

    def check(self) -> GatewayOptions:
        if not NAME.match(self.name):
            raise InvalidInput(f"gateway name {self.name!r}: use letters, digits, '.', '_' or '-' (at most 64)")
        if self.min_updates < 1:
            raise InvalidInput("--min-updates must be at least 1")
        if not (self.round_deadline > 0 and math.isfinite(self.round_deadline)):
            raise InvalidInput("--round-deadline must be a positive number of seconds")
        if not (self.norm_bound >= 0 and math.isfinite(self.norm_bound)):
            raise InvalidInput("--norm-bound must be ≥ 0 (0: from the previous round's updates)")
        if self.aggregate not in AGGREGATES:
            raise InvalidInput(f"unknown aggregate {self.aggregate!r}; choose from {', '.join(AGGREGATES)}")
        if not 0 <= self.trim < 0.5:
            raise InvalidInput("--trim must be in [0, 0.5)")
        self.policy()
        return self

    def policy(self) -> RobustPolicy:
        """The screening of this gateway's device updates (the bound itself is the task's)."""
        return RobustPolicy(norm_multiple=self.norm_multiple, direction_ratio=self.direction_ratio,
                            examples_multiple=self.examples_multiple, examples_cap=self.examples_cap).check()

    def to_node_config(self) -> dict:
        return {"gateway": self.name, "home": self.home, "min-updates": self.min_updates,
                "round-deadline": float(self.round_deadline), "norm-bound": float(self.norm_bound),
                "clip": bool(self.clip), "aggregate": self.aggregate, "trim": float(self.trim),
                "norm-multiple": float(self.norm_multiple), "direction-ratio": float(self.direction_ratio),
                "examples-multiple": float(self.examples_multiple),
                "examples-cap": int(self.examples_cap)}

    @classmethod
    def for_simulated_node(cls, node, config) -> GatewayOptions | None:
        """A virtual node of `federate simulate --edge-...` whose partition id is below the run's
        `edge-gateways` is gateway sim-gw-ID on the run's store; None for the others."""
        settings = FederationSettings.from_config(config)
        if "partition-id" not in node or int(node["partition-id"]) >= settings.edge_gateways:
            return None
        return cls(name=f"sim-gw-{int(node['partition-id'])}", home=settings.home,
                   min_updates=settings.edge_min_updates, round_deadline=settings.edge_round_deadline,
                   norm_multiple=settings.norm_multiple, direction_ratio=settings.direction_ratio,
                   examples_multiple=settings.examples_multiple, examples_cap=settings.examples_cap).check()

    @classmethod
    def from_node_config(cls, node) -> GatewayOptions | None:
        """The options in a node config, or None when this node is no gateway."""
        name = str(node.get("gateway", "") or "")
        if not name:
            return None
        clip = node.get("clip", False)
        return cls(name=name, home=str(node.get("home", ".pollinate")),
                   min_updates=int(node.get("min-updates", 1)),
                   round_deadline=float(node.get("round-deadline", 120.0)),
                   norm_bound=float(node.get("norm-bound", 0.0)),
                   clip=clip if isinstance(clip, bool) else str(clip).lower() in ("1", "true", "yes"),
                   aggregate=str(node.get("aggregate", "mean")), trim=float(node.get("trim", 0.2)),
                   norm_multiple=float(node.get("norm-multiple", NORM_MULTIPLE)),
                   direction_ratio=float(node.get("direction-ratio", DIRECTION_RATIO)),
                   examples_multiple=float(node.get("examples-multiple", EXAMPLES_MULTIPLE)),
                   examples_cap=int(node.get("examples-cap", 0))).check()


# ---------------------------------------------------------------- weights as one flat vector


def flatten(arrays: list[np.ndarray]) -> np.ndarray:
    """The arrays as one float32 vector, in order (the protocol's layout)."""
    if not arrays:
        return np.zeros(0, np.float32)
    return np.concatenate([np.asarray(a, dtype=np.float32).reshape(-1) for a in arrays])


def apply_delta(base: list[np.ndarray], delta: np.ndarray) -> list[np.ndarray]:
    """base + delta, each array keeping its shape and dtype. Integer arrays (a Normalization
    layer's sample count) are state, not weights: they keep their base values."""
    out, offset = [], 0
    for array in base:
        array = np.asarray(array)
        size = int(array.size)
        if np.issubdtype(array.dtype, np.floating):
            part = delta[offset:offset + size].reshape(array.shape)
            out.append((array.astype(np.float64) + part).astype(array.dtype))
        else:
            out.append(array.copy())
        offset += size
    if offset != delta.size:
        raise PollinateError(f"the aggregate holds {delta.size} values, the weights {offset}")
    return out


# ---------------------------------------------------------------- robust aggregation


def aggregate(deltas: list[np.ndarray], examples: list[float], method: str = "mean", trim: float = 0.2) -> np.ndarray:
    """One delta from many (see the module docstring for each method); `examples`: each
    update's weight in the mean (its capped claim)."""
    if not deltas:
        raise NoEdgeUpdates("nothing to aggregate")
    if method not in AGGREGATES:
        raise InvalidInput(f"unknown aggregate {method!r}; choose from {', '.join(AGGREGATES)}")
    stack = np.stack([np.asarray(d, dtype=np.float64) for d in deltas])
    if method == "mean":
        weights = np.asarray(examples, dtype=np.float64)
        if weights.shape != (len(deltas),) or (weights <= 0).any():
            raise InvalidInput("the weighted mean needs one positive example weight per update")
        return (weights @ stack / weights.sum()).astype(np.float32)
    if method == "median":
        return np.median(stack, axis=0).astype(np.float32)
    cut = int(math.floor(trim * len(deltas)))
    ordered = np.sort(stack, axis=0)
    kept = ordered[cut:len(deltas) - cut] if len(deltas) - 2 * cut > 0 else ordered
    return kept.mean(axis=0).astype(np.float32)


def recheck(task, updates) -> tuple[list, list[str], list[float]]:
    """The gateway's own check of the stored updates (the server's rules: length, finite values,
    the norm bound): (sound updates, reasons for the others, the sound ones' L2 norms)."""
    sound, reasons, norms = [], [], []
    bound = float(task.norm_bound or 0.0)
    for update in updates:
        delta = np.asarray(update.delta)
        if delta.size != task.size:
            reasons.append(f"device {update.device_id}: {delta.size} values, the task has {task.size}")
            continue
        norm = float(np.linalg.norm(delta.astype(np.float64)))
        if not math.isfinite(norm):
            reasons.append(f"device {update.device_id}: NaN or infinite values")
        elif update.examples < 1:
            reasons.append(f"device {update.device_id}: {update.examples} examples")
        elif bound > 0 and norm > bound * (1 + NORM_SLACK):
            reasons.append(f"device {update.device_id}: L2 norm over the bound {bound:.4g}")
        else:
            sound.append(update)
            norms.append(norm)
    return sound, reasons, norms


def receive_bound(options: GatewayOptions, base_norm: float, reference: float | None) -> float:
    """The task's L2 bound on an update (see the module docstring)."""
    if options.norm_bound > 0:
        return options.norm_bound
    if reference is not None and reference > 0:
        return RECEIVE_MULTIPLE * reference
    return base_norm


def reference_median(config, gateway: str) -> float | None:
    """The median norm of the updates this gateway kept in the previous round, from the train
    config (None in a federation's first round)."""
    raw = config.get(NORM_MEDIANS, "") if hasattr(config, "get") else ""
    try:
        medians = json.loads(str(raw)) if raw else {}
        value = float(medians.get(gateway)) if isinstance(medians, dict) and medians.get(gateway) is not None else None
    except (TypeError, ValueError):
        return None
    return value if value is not None and math.isfinite(value) and value > 0 else None


# ---------------------------------------------------------------- one round


def weight_names(config) -> list[str] | None:
    raw = config.get("weight-names", "") if hasattr(config, "get") else ""
    try:
        names = json.loads(str(raw)) if raw else None
    except ValueError:
        return None
    return [str(n) for n in names] if isinstance(names, list) else None


def serve_round(msg: Message, options: GatewayOptions, *, clock=time.time, sleep=time.sleep) -> Message:
    """Answer one train message for the devices behind this gateway (see the module docstring)."""
    from registry import Store
    from registry.edge import EdgeStore, weights_spec

    started = clock()
    config = msg.content["config"]
    settings = FederationSettings.from_config(config)
    global_round = int(config.get("global-round", config.get("server-round", 0)))
    if not settings.edge:
        log.warning("gateway %s: the federation was not started for edge rounds (federate run --edge): its "
                    "tasks name no base version and a restarted gateway does not get its round again", options.name)
    base_version = int(config.get("base-version", 0)) or None
    base = [np.asarray(a) for a in msg.content["arrays"].to_numpy_ndarrays()]
    names = weight_names(config)
    spec = weights_spec(base, names if names and len(names) == len(base) else None)
    flat = flatten(base)
    reference = reference_median(config, options.name)
    bound = receive_bound(options, float(np.linalg.norm(flat.astype(np.float64))), reference)
    edge = EdgeStore(Store(options.home))
    task = edge.open_task(
        settings.model_name, federation=settings.federation_id, round=global_round, gateway=options.name,
        base_version=base_version,
        config={"epochs": settings.local_epochs, "batch_size": settings.batch_size,
                "learning_rate": settings.learning_rate},
        weights=spec, base=flat, deadline=started + options.round_deadline, min_updates=options.min_updates,
        norm_bound=bound, clip=options.clip)
    resumed = task.opened_at < started - 1e-3
    log.warning("gateway %s: round %s, task %s %s (deadline in %.0f s, %s update(s) so far)", options.name,
                global_round, task.task_id, "resumed" if resumed else "opened", task.deadline - clock(), task.accepted)
    discard_earlier_rounds(edge, task)
    while task.open and task.accepted < task.min_updates and clock() < task.deadline:
        sleep(options.poll_seconds)
        task = edge.get_task(task.task_id)
    edge.close_task(task.task_id)  # from here on an update is stale: the set below is final
    try:
        updates = edge.updates(task.task_id)
    except (OSError, ValueError) as exc:  # files of a task closed long ago
        raise NoEdgeUpdates(f"gateway {options.name}: the updates of round {global_round} are gone ({exc})") from None
    checked, reasons, norms = recheck(task, updates)
    for reason in reasons:
        log.warning("gateway %s: round %s: dropped the update of %s", options.name, global_round, reason)
    screening = screen(norms, [u.examples for u in checked], options.policy(), reference_median=reference,
                       pieces=lambda i: (checked[i].delta,))
    for i, why in sorted(screening.details.items()):
        log.warning("gateway %s: round %s: set aside the update of device %s: %s", options.name, global_round,
                    checked[i].device_id, why)
    sound = [checked[i] for i in screening.kept]
    robust = screening.summary()
    if not sound:
        outcome = {"error": "no usable update by the deadline", "accepted": len(updates), "rejected": len(reasons),
                   **robust}
        edge.close_task(task.task_id, outcome)
        raise NoEdgeUpdates(f"gateway {options.name}: no usable device update for round {global_round} "
                            f"by its deadline ({len(updates)} accepted, {len(reasons)} dropped, "
                            f"{len(screening.set_aside)} set aside)")
    examples = [u.examples for u in sound]
    weight = float(sum(screening.weights))
    delta = aggregate([u.delta for u in sound], screening.weights, options.aggregate, options.trim)
    arrays = apply_delta(base, delta)
    devices = {u.device_id for u in sound}
    kinds = Counter(edge.device_kinds(sorted(devices)).values())
    seconds = clock() - started
    outcome = {"updates": len(sound), "devices": len(devices), "examples": int(sum(examples)),
               "weight": weight, "rejected": len(reasons), "aggregate": options.aggregate, "kinds": dict(kinds),
               "norm_bound": task.norm_bound, **robust}
    edge.close_task(task.task_id, outcome)
    log.warning("gateway %s: round %s answered with %s update(s) from %s device(s), %s examples (weight %.0f), "
                "%s set aside", options.name, global_round, len(sound), len(devices), int(sum(examples)), weight,
                len(screening.set_aside))
    metrics = MetricRecord({
        # Flower weighs the gateway by its devices' capped claims, not by what they claimed
        "num-examples": max(1, int(round(weight))), "train-seconds": float(seconds),
        "edge-updates": len(sound), "edge-devices": len(devices), "edge-examples": int(sum(examples)),
        "edge-rejected": len(reasons), "edge-resumed": int(resumed),
        "edge-set-aside": len(screening.set_aside), "edge-examples-capped": screening.capped,
        "edge-norm-median": float(screening.kept_norm_median or 0.0),
    })
    info = ConfigRecord({"gateway": options.name, "task-id": task.task_id, "kinds": json.dumps(dict(kinds)),
                         "aggregate": options.aggregate, "set-aside": json.dumps(screening.counts())})
    content = RecordDict({"arrays": ArrayRecord(arrays), "metrics": metrics, EDGE_RECORD: info})
    return Message(content=content, reply_to=msg)


def discard_earlier_rounds(edge, current) -> None:
    """Free the update files of this gateway's closed tasks other than the current one (the
    rows stay: they are the record)."""
    for folder in edge.root.iterdir() if edge.root.exists() else ():
        if not folder.is_dir() or folder.name == current.task_id:
            continue
        try:
            task = edge.get_task(folder.name)
        except PollinateError:
            continue
        if task.gateway == current.gateway and not task.open:
            edge.discard_files(task.task_id)
