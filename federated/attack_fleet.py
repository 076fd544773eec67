"""Edge devices over raw HTTP, some of them attackers: how tests and benchmarks/edge.py poison
a round the way issue 19 did.

An attacker does not use the reference client (device.py) and does not train on anything:
it enrols, fetches the task and its base weights, and posts a body it crafted with an
`examples` claim it chose. `craft` builds each (body, claim), one lever per attack:

- `minus-base`: −0.999 × the base weights with the largest claim the protocol takes,
  10,000,000: issue 19's attack (the model cancels itself; the body's norm sits just under
  a bound that is the base weights' own norm);
- `scale`: −20 × an honest update, an honest claim (model replacement: a reversed step
  that dominates the mean by its size);
- `signflip`: −1 × an honest update, an honest claim (the same norm as honest updates: no
  norm rule sees it; it costs the round about twice its share of progress);
- `inflate`: the sign-flipped update with the 10,000,000 claim (dominates by its weight);
- `noise`: N(0, 5²) per value, an honest claim.

The honest devices beside them train for real: Keras (the federation's LocalTrainer) on
their partition of the dataset, local − base, posted with their true example count. They
stand in for browsers and phones (which train the same weights through TF.js or a
tflite-train file) so that a round of ten devices takes seconds.

Standard library HTTP only (urllib): the package's runtime needs nothing else.
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from dataclasses import dataclass

import numpy as np

from core.errors import InvalidInput, PollinateError

ATTACKS = ("minus-base", "scale", "signflip", "inflate", "noise")
MAX_CLAIM = 10_000_000  # the protocol's largest `examples`
MINUS_BASE = -0.999
SCALE = -20.0
NOISE_STD = 5.0


@dataclass
class Answer:
    status: int
    body: dict


class RawDevice:
    """One device speaking the device protocol with nothing but HTTP requests."""

    def __init__(self, server: str, model: str, kind: str = "simulated", timeout: float = 30.0):
        self.base = f"{server.rstrip('/')}/v1/federations/{model}"
        self.timeout = timeout
        answer = self._request("POST", "/devices", json.dumps({"kind": kind}).encode(), "application/json")
        if answer.status != 201:
            raise PollinateError(f"enrolment refused ({answer.status}): {answer.body}")
        self.device_id = answer.body["device_id"]
        self.token = answer.body["token"]

    def _request(self, method: str, path: str, body: bytes | None = None, content_type: str | None = None,
                 raw: bool = False) -> Answer | bytes:
        request = urllib.request.Request(self.base + path, data=body, method=method)
        if getattr(self, "token", None):
            request.add_header("Authorization", f"Bearer {self.token}")
        if content_type:
            request.add_header("Content-Type", content_type)
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                data = response.read()
                if raw:
                    return data
                return Answer(response.status, json.loads(data) if data else {})
        except urllib.error.HTTPError as error:
            data = error.read()
            try:
                parsed = json.loads(data) if data else {}
            except ValueError:
                parsed = {"detail": data.decode(errors="replace")}
            if raw:
                raise PollinateError(f"{method} {path}: {error.code} {parsed}") from None
            return Answer(error.code, parsed)

    def task(self) -> dict | None:
        answer = self._request("GET", "/task")
        return answer.body if answer.status == 200 else None

    def wait_for_task(self, round: int | None = None, timeout: float = 120.0, poll: float = 0.1) -> dict:
        """The open task (of `round`, when given): polls until it is there."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            task = self.task()
            if task is not None and (round is None or int(task["round"]) == round):
                return task
            time.sleep(poll)
        raise PollinateError(f"no task{f' for round {round}' if round is not None else ''} within {timeout:g} s")

    def base_weights(self, task: dict) -> np.ndarray:
        data = self._request("GET", f"/tasks/{task['task_id']}/weights", raw=True)
        return np.frombuffer(data, "<f4").copy()

    def post(self, task: dict, delta: np.ndarray, examples: int) -> Answer:
        body = np.ascontiguousarray(delta, dtype="<f4").tobytes()
        return self._request("POST", f"/tasks/{task['task_id']}/updates?examples={int(examples)}", body,
                             "application/octet-stream")


def craft(attack: str, base: np.ndarray, honest: np.ndarray | None = None, honest_claim: int = 100,
          seed: int = 0) -> tuple[np.ndarray, int]:
    """(the body's delta, its examples claim) for `attack` (module docstring). `honest`,
    `honest_claim`: an honest update of the same task and its count, for the attacks that
    bend one or pass for one."""
    if attack not in ATTACKS:
        raise InvalidInput(f"unknown attack {attack!r}; choose from {', '.join(ATTACKS)}")
    base = np.asarray(base, np.float32)
    if attack == "minus-base":
        return (MINUS_BASE * base).astype(np.float32), MAX_CLAIM
    if attack == "noise":
        return np.random.default_rng(seed).normal(0.0, NOISE_STD, base.size).astype(np.float32), int(honest_claim)
    if honest is None:
        raise InvalidInput(f"the {attack} attack bends an honest update: give one")
    factor = SCALE if attack == "scale" else -1.0
    claim = MAX_CLAIM if attack == "inflate" else int(honest_claim)
    return (factor * np.asarray(honest, np.float32)).astype(np.float32), claim


def weights_of(task: dict, flat: np.ndarray) -> list[np.ndarray]:
    """The flat base weights as the task's arrays (shapes and dtypes of `task['weights']`)."""
    out, offset = [], 0
    for spec in task["weights"]:
        size = int(np.prod(spec["shape"], dtype=np.int64))
        out.append(flat[offset:offset + size].reshape(spec["shape"]).astype(spec["dtype"]))
        offset += size
    if offset != flat.size:
        raise PollinateError(f"the task's weights hold {offset} values, the base {flat.size}")
    return out


def train_honestly(task: dict, base: np.ndarray, x: np.ndarray, y: np.ndarray, *, architecture: str,
                   learning_task: str = "classification", seed: int = 0) -> np.ndarray:
    """An honest device's update: the task's config (epochs, batch size, learning rate) on its
    own examples with Keras, local − base as float32."""
    from .gateway import flatten
    from .task import trainer_for

    config = task["config"]
    trainer = trainer_for(architecture, learning_task)
    weights, _ = trainer.fit(weights_of(task, base), x, y, epochs=int(config["epochs"]),
                             batch_size=int(config["batch_size"]), learning_rate=float(config["learning_rate"]),
                             proximal_mu=0.0, seed=seed)
    return (flatten(weights) - base).astype(np.float32)
