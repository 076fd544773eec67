"""The Flower ClientApp: local training and evaluation on one client's partition.

Everything a client needs arrives in the round's ConfigRecord (see settings.py), so the same
ClientApp runs in the Simulation Engine and on a SuperNode started with
`--node-config "partition-id=I num-partitions=N"`.

What a node is comes from its node config (`pollinate federate supernode` writes it):
- `partition-id`/`num-partitions`: trains on its partition of the built-in dataset;
- `data`: trains on its own data, a file `federate supernode --data` checked and prepared
  before the node connected (own_data.py);
- `gateway`: an edge gateway, which answers for the devices behind it (gateway.py).
A `query` message asks a node which of these it is (the ServerApp's roll call in edge rounds,
see redelivery.py).

For robustness experiments the simulation can make clients misbehave, decided per client by
a seeded draw so that a run is repeatable:
- `malicious` share of clients poison every update they send (`attack`):
  see `poison` for each attack;
- `dropout`: each round, each client fails with this probability (an exception, which Flower
  reports to the server as an error reply; the strategy drops it).
"""

from __future__ import annotations

import json
import time

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from .gateway import GatewayOptions, serve_round
from .own_data import load_prepared
from .settings import FederationSettings
from .task import client_data, to_arrays, trainer_for

SCALE_FACTOR = -20.0
NOISE_STD = 5.0
MINUS_BASE = -0.999  # the update that cancels the model: w_g + (−0.999 · w_g)
INFLATED_EXAMPLES = 10_000_000  # what an `inflate` attacker claims (the device protocol's maximum)

app = ClientApp()


def partition_of(context: Context, settings: FederationSettings) -> tuple[int, int]:
    node = context.node_config
    partition_id = int(node.get("partition-id", 0))
    num_partitions = int(node.get("num-partitions", settings.num_partitions))
    return settings.client_partition(partition_id, num_partitions)


def is_malicious(settings: FederationSettings, partition_id: int, num_partitions: int) -> bool:
    """The same ⌊share·N⌋ clients are attackers for the whole run (seeded)."""
    count = int(settings.malicious * num_partitions)
    if count == 0:
        return False
    attackers = np.random.default_rng([settings.seed, 7]).permutation(num_partitions)[:count]
    return partition_id in set(attackers.tolist())


def drops_out(settings: FederationSettings, partition_id: int, server_round: int) -> bool:
    if settings.dropout <= 0:
        return False
    return bool(np.random.default_rng([settings.seed, server_round, partition_id, 11]).random() < settings.dropout)


def poison(attack: str, global_weights: list[np.ndarray], local_weights: list[np.ndarray], seed: int) -> list[np.ndarray]:
    """What an attacker sends instead of its honest weights.

    - `scale`: the honest update boosted 20× and reversed, w_g − 20·Δ (a model-replacement
      style attack that dominates a plain average);
    - `signflip`: the update reversed, w_g − Δ;
    - `nan`: NaN everywhere (a broken or hostile client);
    - `noise`: w_g + N(0, 5²) per weight;
    - `minus-base`: w_g − 0.999·w_g, an update that cancels the model (issue 19's device attack);
    - `inflate`: the update reversed, w_g − Δ, sent with a claim of 10,000,000 examples so
      that an example-weighted mean follows it (`train` sets the claim).
    """
    rng = np.random.default_rng(seed)
    out = []
    for g, w in zip(global_weights, local_weights):
        if not np.issubdtype(w.dtype, np.floating):
            out.append(w)
            continue
        delta = w - g
        if attack == "scale":
            out.append((g + SCALE_FACTOR * delta).astype(w.dtype))
        elif attack in ("signflip", "inflate"):
            out.append((g - delta).astype(w.dtype))
        elif attack == "minus-base":
            out.append((g + MINUS_BASE * g).astype(w.dtype))
        elif attack == "nan":
            out.append(np.full_like(w, np.nan))
        else:
            out.append((g + rng.normal(0.0, NOISE_STD, size=w.shape)).astype(w.dtype))
    return out


def _settings(msg: Message) -> FederationSettings:
    return FederationSettings.from_config(msg.content["config"])


def own_data_file(context: Context) -> str:
    return str(context.node_config.get("data", "") or "")


def node_role(context: Context) -> dict:
    """What this node is: {"role": "gateway", "gateway": NAME} | {"role": "own-data"} | {"role": "partition"}."""
    node = context.node_config
    if node.get("gateway"):
        return {"role": "gateway", "gateway": str(node["gateway"])}
    if own_data_file(context):
        return {"role": "own-data", "gateway": ""}
    return {"role": "partition", "gateway": ""}


def _local_data(context: Context, settings: FederationSettings, architecture: str):
    """(x, y, partition id or None): the node's own data, or its partition of the built-in dataset."""
    path = own_data_file(context)
    if path:
        return (*load_prepared(path, architecture), None)
    partition_id, num_partitions = partition_of(context, settings)
    recipe = json.dumps(settings.recipe(), sort_keys=True)
    x, y = client_data(recipe, settings.partition, num_partitions, partition_id, settings.seed)
    return x, y, partition_id


@app.query()
def query(msg: Message, context: Context) -> Message:
    """The roll call: which kind of node this is (and, for a gateway, its name)."""
    return Message(content=RecordDict({"node": ConfigRecord(node_role(context))}), reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    gateway = (GatewayOptions.from_node_config(context.node_config)
               or GatewayOptions.for_simulated_node(context.node_config, msg.content["config"]))
    if gateway is not None:
        return serve_round(msg, gateway)
    started = time.perf_counter()
    settings = _settings(msg)
    config = msg.content["config"]
    server_round = int(config.get("server-round", 0))
    partition_id, num_partitions = partition_of(context, settings)
    if not own_data_file(context) and drops_out(settings, partition_id, server_round):
        raise RuntimeError(f"client {partition_id} dropped out of round {server_round} (simulated)")
    x, y, partition_id = _local_data(context, settings, str(config["architecture"]))
    trainer = trainer_for(str(config["architecture"]), str(config["task"]))
    global_weights = msg.content["arrays"].to_numpy_ndarrays()
    proximal_mu = settings.proximal_mu if settings.strategy == "fedprox" else 0.0
    weights, loss = trainer.fit(
        global_weights, x, y, epochs=settings.local_epochs, batch_size=settings.batch_size,
        learning_rate=settings.learning_rate, proximal_mu=proximal_mu,
        seed=settings.seed * 100_003 + server_round * 1_009 + (partition_id or 0),
    )
    metrics = {
        "num-examples": int(len(x)),
        "train-loss": loss if np.isfinite(loss) else 0.0,
        "train-seconds": time.perf_counter() - started,
    }
    if partition_id is None:
        metrics["own-data"] = 1
    else:
        malicious = is_malicious(settings, partition_id, num_partitions)
        if malicious:
            weights = poison(settings.attack, global_weights, weights, seed=server_round * 7919 + partition_id)
            if settings.attack == "inflate":
                metrics["num-examples"] = INFLATED_EXAMPLES
        metrics.update({"partition-id": partition_id, "malicious": int(malicious)})
    content = RecordDict({"arrays": ArrayRecord(to_arrays(weights)), "metrics": MetricRecord(metrics)})
    return Message(content=content, reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    if GatewayOptions.from_node_config(context.node_config) is not None:
        raise RuntimeError("an edge gateway does not evaluate (its devices hold the data)")
    settings = _settings(msg)
    config = msg.content["config"]
    x, y, _ = _local_data(context, settings, str(config["architecture"]))
    trainer = trainer_for(str(config["architecture"]), str(config["task"]))
    result = trainer.evaluate(msg.content["arrays"].to_numpy_ndarrays(), x, y)
    metrics = {"num-examples": int(len(x)), **{f"eval-{k}": v for k, v in result.items()}}
    return Message(content=RecordDict({"metrics": MetricRecord(metrics)}), reply_to=msg)
