"""Everything that defines a federation, in one flat record.

The same settings travel three ways: from `pollinate federate simulate` options, from a Flower
run config (`[tool.flwr.app.config]` in federated/flower_app/pyproject.toml, or `flwr run --run-config`), and to
every client inside each round's ConfigRecord (so a SuperNode needs nothing but its partition
id). Keys use Flower's kebab-case; values are str/int/float/bool as ConfigRecord requires.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, fields

from core.errors import InvalidInput

STRATEGIES = ("fedavg", "fedprox", "fedadam", "fedavgm", "fedmedian", "fedtrimmedavg", "krum")
ATTACKS = ("scale", "signflip", "nan", "noise", "minus-base", "inflate")


@dataclass
class FederationSettings:
    home: str = ".pollinate"
    model_name: str = "digits"  # the store's model this federation improves
    dataset: str = "digits"  # a built-in dataset name, or a JSON recipe (see training.datasets)
    start_from: str = "latest"  # "latest", a version number, or "scratch"
    zoo_model: str = "cnn"  # the architecture used when starting from scratch
    rounds: int = 3
    partition: str = "dirichlet:0.5"
    num_partitions: int = 10  # clients in a simulation
    fraction: float = 1.0  # share of clients sampled per round
    min_clients: int = 2
    local_epochs: int = 1
    batch_size: int = 16
    learning_rate: float = 1e-3
    strategy: str = "fedavg"
    proximal_mu: float = 0.01  # fedprox
    server_learning_rate: float = 1.0  # fedavgm
    server_momentum: float = 0.9  # fedavgm
    eta: float = 0.01  # fedadam server step
    eta_l: float = 0.01
    beta: float = 0.2  # fedtrimmedavg: share trimmed at each end
    krum_malicious: int = 0  # krum's f (0: 20% of sampled clients)
    clip_norm: float = 0.0  # L2 bound on each update (0 = off)
    # robust screening of every round's updates (federated/robust.py), and of every gateway's
    # device updates: outliers over norm_multiple × the round's median norm and updates whose
    # cosine with the others' mean is under −direction_ratio × the round's median cosine are
    # set aside, a claim's weight is capped at examples_multiple × the median claim (and examples_cap)
    norm_multiple: float = 4.0
    direction_ratio: float = 0.5
    examples_multiple: float = 2.0
    examples_cap: int = 0
    # the acceptance gate (federated/acceptance.py): a round worse than the last accepted one
    # by more than gate_threshold (accuracy points as a fraction, or MAE relative) is published
    # but its channel does not move, and the next round trains from the last accepted model
    gate: bool = True
    gate_threshold: float = 0.02
    publish_every: int = 1  # register + export + publish every k rounds (and always the last)
    channel: str = "canary"
    formats: str = "tfjs-layers,tflite-int8"
    malicious: float = 0.0  # share of clients sending poisoned updates (simulation)
    attack: str = "scale"
    dropout: float = 0.0  # probability that a client fails in a round (simulation)
    seed: int = 0
    round_timeout: float = 600.0
    resume: bool = False
    # edge gateways take part: each train message names the version its weights are (the
    # previous round is published before the next is sent), and a gateway that restarts
    # mid-round gets the round again (federated/redelivery.py)
    edge: bool = False
    # simulated edge fleets (`federate simulate --edge-browsers/--edge-devices`): virtual nodes
    # 0..edge_gateways-1 are gateways; the other nodes are ordinary clients on the first
    # partitions of num_partitions - edge_gateways + edge_partitions, the simulated devices on the rest
    edge_gateways: int = 0
    edge_partitions: int = 0
    edge_min_updates: int = 1
    edge_round_deadline: float = 120.0
    federation_id: str = ""  # set by the server: ties the versions of one federation together
    progress_file: str = ""  # where the ServerApp appends each finished round (JSON lines); "" = nowhere

    def check(self) -> FederationSettings:
        from federated.partition import parse_scheme

        parse_scheme(self.partition)
        if self.strategy not in STRATEGIES:
            raise InvalidInput(f"unknown strategy {self.strategy!r}; choose from {', '.join(STRATEGIES)}")
        if self.attack not in ATTACKS:
            raise InvalidInput(f"unknown attack {self.attack!r}; choose from {', '.join(ATTACKS)}")
        if self.rounds < 1:
            raise InvalidInput("--rounds must be at least 1")
        if self.num_partitions < 1:
            raise InvalidInput("--clients must be at least 1")
        if not 0 < self.fraction <= 1:
            raise InvalidInput("--fraction must be in (0, 1]")
        for name in ("malicious", "dropout"):
            if not 0 <= getattr(self, name) < 1:
                raise InvalidInput(f"--{name} share must be in [0, 1)")
        if self.local_epochs < 1 or self.batch_size < 1 or self.learning_rate <= 0:
            raise InvalidInput("local epochs, batch size and learning rate must be positive")
        if self.publish_every < 1:
            raise InvalidInput("--publish-every must be at least 1")
        if self.clip_norm < 0:
            raise InvalidInput("--clip-norm must be ≥ 0")
        self.robust_policy()
        if not (math.isfinite(self.gate_threshold) and self.gate_threshold >= 0):
            raise InvalidInput("--gate-threshold must be a number ≥ 0 (0.02: two accuracy points, or MAE 2% worse)")
        if self.edge and self.publish_every != 1:
            raise InvalidInput("edge rounds publish every round (devices train on the version of the round "
                               "before): --publish-every must be 1")
        if self.edge and self.start_from == "scratch":
            raise InvalidInput("edge rounds start from a published version (devices load its model files): "
                               "give --from NAME@VERSION, not --from-scratch")
        if self.edge_gateways or self.edge_partitions:
            if not self.edge:
                raise InvalidInput("simulated gateways take part in edge rounds only (edge must be on)")
            if self.edge_gateways < 1 or self.edge_partitions < 0:
                raise InvalidInput("a simulated edge fleet needs at least one gateway")
            if self.num_partitions <= self.edge_gateways and self.edge_partitions < 1:
                raise InvalidInput("the simulation has nobody to train: add clients or edge devices")
            if self.edge_min_updates < 1 or not self.edge_round_deadline > 0:
                raise InvalidInput("--min-updates must be ≥ 1 and --round-deadline positive")
        return self

    def robust_policy(self):
        """The screening of every round's Flower replies (federated/robust.py)."""
        from federated.robust import RobustPolicy

        return RobustPolicy(norm_multiple=self.norm_multiple, direction_ratio=self.direction_ratio,
                            examples_multiple=self.examples_multiple, examples_cap=self.examples_cap).check()

    def client_partition(self, partition_id: int, num_partitions: int) -> tuple[int, int]:
        """A simulated node's (partition id, partition count): with simulated gateways the
        ordinary clients come after them, and the simulated devices hold partitions too."""
        if not self.edge_gateways:
            return partition_id, num_partitions
        return partition_id - self.edge_gateways, num_partitions - self.edge_gateways + self.edge_partitions

    def to_config(self) -> dict:
        """Kebab-case keys with ConfigRecord-friendly values."""
        return {key.replace("_", "-"): value for key, value in asdict(self).items()}

    @classmethod
    def from_config(cls, config) -> FederationSettings:
        """From a Flower run config or ConfigRecord (unknown keys ignored, types coerced)."""
        values = {}
        for f in fields(cls):
            key = f.name.replace("_", "-")
            if key in config:
                raw = config[key]
                kind = type(getattr(cls(), f.name))
                try:
                    values[f.name] = (str(raw).lower() in ("1", "true", "yes")) if kind is bool and isinstance(raw, str) else kind(raw)
                except (TypeError, ValueError):
                    raise InvalidInput(f"run config {key}={raw!r} is not a valid {kind.__name__}") from None
        return cls(**values)

    def recipe(self) -> dict:
        """The dataset recipe (see training.datasets.reload_dataset)."""
        if self.dataset.startswith("{"):
            return json.loads(self.dataset)
        return {"dataset": self.dataset}

    def format_list(self) -> tuple[str, ...]:
        return tuple(f.strip() for f in self.formats.split(",") if f.strip())
