"""Edge gateways: the robust aggregates, a gateway's round against a real store, a gateway
process killed with -9 in its wait and restarted, and real Flower federations (a SuperLink,
a gateway SuperNode, an own-data SuperNode, `pollinate serve`) whose rounds count the devices'
updates in the published versions' lineage."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from conftest import REPO, processes_naming
from federation_helpers.stores import weak_digits_store
from federation_helpers.up import federate_up
from flwr.app import ArrayRecord, ConfigRecord, Error, Message, MessageType, Metadata, MetricRecord, RecordDict

from core.errors import InvalidInput
from federated.gateway import GatewayOptions, NoEdgeUpdates, aggregate, apply_delta, flatten, recheck, serve_round
from federated.settings import FederationSettings
from federated.strategies import make_strategy
from registry import Store
from registry.edge import EdgeStore, Update

# ---------------------------------------------------------------- aggregation


def test_weighted_mean_median_and_trimmed_mean():
    deltas = [np.array([1.0, 0.0, 2.0], np.float32), np.array([3.0, 0.0, 2.0], np.float32),
              np.array([100.0, -50.0, 2.0], np.float32)]
    mean = aggregate(deltas[:2], [1, 3], "mean")
    assert np.allclose(mean, [2.5, 0.0, 2.0])  # (1·1 + 3·3) / 4: weighted by examples
    assert mean.dtype == np.float32
    assert np.allclose(aggregate(deltas, [1, 1, 1], "median"), [3.0, 0.0, 2.0])  # the outlier does not move it
    five = deltas + [np.array([2.0, 1.0, 2.0], np.float32), np.array([-90.0, 0.0, 2.0], np.float32)]
    assert np.allclose(aggregate(five, [1] * 5, "trimmed-mean", trim=0.2), [2.0, 0.0, 2.0])  # cut 1 at each end
    assert np.allclose(aggregate(deltas[:2], [1, 1], "trimmed-mean", trim=0.2), [2.0, 0.0, 2.0])  # too few to cut
    with pytest.raises(NoEdgeUpdates):
        aggregate([], [], "mean")
    with pytest.raises(InvalidInput):
        aggregate(deltas, [1, 1, 1], "mode")
    with pytest.raises(InvalidInput):
        aggregate(deltas[:2], [1, 0], "mean")


def test_the_aggregate_keeps_each_arrays_shape_and_dtype():
    base = [np.ones((2, 3), np.float32), np.array(5, np.int64), np.zeros(2, np.float16)]
    flat = flatten(base)
    assert flat.dtype == np.float32 and flat.size == 9
    out = apply_delta(base, np.arange(9, dtype=np.float32))
    assert [a.shape for a in out] == [(2, 3), (), (2,)] and [a.dtype for a in out] == [np.float32, np.int64, np.float16]
    assert np.allclose(out[0], 1 + np.arange(6).reshape(2, 3))
    assert out[1] == 5  # integer state (a Normalization count) is not a weight
    assert np.allclose(out[2], [7, 8])


def test_the_gateway_checks_stored_updates_again():
    class Task:
        size, norm_bound = 3, 1.0

    good = Update("a", 5, 0.5, False, np.array([0.5, 0, 0], np.float32))
    clipped = Update("b", 5, 3.0, True, np.array([1.0, 0, 0], np.float32))  # sits on the bound
    bad = [Update("c", 5, 0.0, False, np.array([np.nan, 0, 0], np.float32)),
           Update("d", 5, 2.0, False, np.array([2.0, 0, 0], np.float32)),
           Update("e", 5, 0.1, False, np.zeros(4, np.float32)),
           Update("f", 0, 0.1, False, np.zeros(3, np.float32))]
    sound, reasons, norms = recheck(Task(), [good, clipped, *bad])
    assert [u.device_id for u in sound] == ["a", "b"] and norms == pytest.approx([0.5, 1.0])
    assert len(reasons) == 4 and any("NaN" in r for r in reasons) and any("bound" in r for r in reasons)


def test_gateway_options_are_checked():
    assert GatewayOptions.from_node_config({"partition-id": 0}) is None
    options = GatewayOptions.from_node_config({"gateway": "gw-1", "home": "/x", "min-updates": 3, "clip": True,
                                               "aggregate": "median"})
    assert (options.name, options.min_updates, options.clip, options.aggregate) == ("gw-1", 3, True, "median")
    for bad in ({"min_updates": 0}, {"round_deadline": 0}, {"norm_bound": -1}, {"aggregate": "max"}, {"name": "a b"}):
        with pytest.raises(InvalidInput):
            GatewayOptions(**{"name": "gw", "home": ".", **bad}).check()


# ---------------------------------------------------------------- one round against a real store


def _metadata(message_type: str = MessageType.TRAIN, node: int = 7) -> Metadata:
    return Metadata(run_id=1, message_id=f"ins-{time.time_ns()}", src_node_id=0, dst_node_id=node,
                    reply_to_message_id="", group_id="1", created_at=time.time(), ttl=3600.0,
                    message_type=message_type)


def _base_weights() -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [rng.normal(size=(4, 3)).astype(np.float32), rng.normal(size=3).astype(np.float32), np.array(9, np.int64)]


def _train_message(federation: str = "fed-1", global_round: int = 1, base_version: int = 1) -> Message:
    settings = FederationSettings(model_name="tiny", federation_id=federation, local_epochs=2, batch_size=8,
                                  learning_rate=0.01)
    config = ConfigRecord({**settings.to_config(), "global-round": global_round, "base-version": base_version,
                           "weight-names": json.dumps(["dense/kernel", "dense/bias", "norm/count"])})
    return Message(RecordDict({"arrays": ArrayRecord(_base_weights()), "config": config}), metadata=_metadata())


def _tiny_store(home: Path) -> Store:
    from registry import Lineage

    store = Store(home)
    scratch = home.parent / "tiny.bin"
    scratch.write_bytes(b"weights")
    store.publish("tiny", lineage=Lineage(source="central"), artifacts={"keras": {"model.keras": scratch}},
                  input_spec={"shape": [4], "dtype": "float32"})
    return store


def _open_task(edge: EdgeStore, timeout: float = 20.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        device_id, _ = edge.enrol("tiny", "simulated")
        task = edge.task_for("tiny", device_id)
        if task is not None:
            return task
        time.sleep(0.05)
    raise AssertionError("the gateway opened no task")


def _post(edge: EdgeStore, task, delta: np.ndarray, examples: int, kind: str = "browser") -> str:
    device_id, _ = edge.enrol("tiny", kind)
    edge.accept(task.task_id, device_id, delta.astype("<f4").tobytes(), examples=examples)
    return device_id


def test_a_gateway_round_aggregates_the_devices_updates(tmp_path):
    home = tmp_path / "store"
    edge = EdgeStore(_tiny_store(home))
    options = GatewayOptions(name="gw", home=str(home), min_updates=2, round_deadline=30, poll_seconds=0.05).check()
    message = _train_message()
    answer = {}
    worker = threading.Thread(target=lambda: answer.update(reply=serve_round(message, options)))
    worker.start()
    task = _open_task(edge)
    base = flatten(_base_weights())
    assert task.size == base.size == 16 and task.base_version == 1 and task.round == 1
    assert task.config == {"epochs": 2, "batch_size": 8, "learning_rate": 0.01}
    assert [w["name"] for w in task.weights] == ["dense/kernel", "dense/bias", "norm/count"]
    assert task.norm_bound == pytest.approx(float(np.linalg.norm(base)), rel=1e-5)  # default: the base's own norm
    assert np.array_equal(edge.base_weights(task.task_id), base)
    first, second = np.full(16, 0.01, np.float32), np.full(16, 0.05, np.float32)
    _post(edge, task, first, examples=10, kind="browser")
    _post(edge, task, second, examples=30, kind="phone")
    worker.join(timeout=30)
    reply = answer["reply"]
    metrics = reply.content["metrics"]
    assert (metrics["num-examples"], metrics["edge-updates"], metrics["edge-devices"]) == (40, 2, 2)
    assert json.loads(reply.content["edge"]["kinds"]) == {"browser": 1, "phone": 1}
    arrays = reply.content["arrays"].to_numpy_ndarrays()
    expected = (10 * 0.01 + 30 * 0.05) / 40
    assert np.allclose(arrays[0], _base_weights()[0] + expected) and arrays[0].dtype == np.float32
    assert arrays[2] == 9 and arrays[2].dtype == np.int64
    closed = edge.get_task(task.task_id)
    assert not closed.open and closed.outcome["updates"] == 2
    # the same round given again (a restart after the answer): the same task, the same answer
    again = serve_round(message, options)
    assert again.content["metrics"]["edge-updates"] == 2
    assert np.allclose(again.content["arrays"].to_numpy_ndarrays()[0], arrays[0])


def test_no_update_by_the_deadline_fails_the_gateways_round(tmp_path):
    home = tmp_path / "store"
    edge = EdgeStore(_tiny_store(home))
    options = GatewayOptions(name="gw", home=str(home), round_deadline=0.5, poll_seconds=0.05).check()
    with pytest.raises(NoEdgeUpdates, match="no usable device update"):
        serve_round(_train_message(), options)
    assert edge.status("tiny")["open"] is False


GATEWAY_SCRIPT = """
import pickle, sys
from federated.gateway import GatewayOptions, serve_round
message, options = pickle.load(open(sys.argv[1], "rb"))
reply = serve_round(message, options)
print(int(reply.content["metrics"]["edge-updates"]), int(reply.content["metrics"]["edge-resumed"]), flush=True)
"""


def test_a_gateway_killed_in_its_wait_resumes_the_same_task(tmp_path):
    """The process running the gateway's wait is killed with -9 after one device's update was
    accepted; a new process given the same round resumes the same task and counts each
    update once."""
    import pickle

    home = tmp_path / "store"
    edge = EdgeStore(_tiny_store(home))
    options = GatewayOptions(name="gw", home=str(home), min_updates=2, round_deadline=60, poll_seconds=0.05).check()
    job = tmp_path / "job.pickle"
    job.write_bytes(pickle.dumps((_train_message(), options)))
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    command = [sys.executable, "-c", GATEWAY_SCRIPT, str(job)]
    first = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, text=True, start_new_session=True)
    try:
        task = _open_task(edge)
        _post(edge, task, np.full(16, 0.02, np.float32), examples=5)
        os.killpg(first.pid, signal.SIGKILL)
        first.wait(timeout=10)
        assert edge.get_task(task.task_id).open  # killed mid-wait: the task is still open
        second = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, text=True, start_new_session=True)
        _post(edge, task, np.full(16, 0.04, np.float32), examples=5)
        out, _ = second.communicate(timeout=60)
    finally:
        for process in (first, locals().get("second")):
            if process is not None and process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)
    assert second.returncode == 0 and out.split() == ["2", "1"]  # two updates, from a resumed task
    assert edge.accepted(task.task_id) == 2
    assert edge.get_task(task.task_id).outcome["updates"] == 2


# ---------------------------------------------------------------- the strategy counts gateways


def _reply(arrays, node: int, metrics: dict, edge: dict | None = None) -> Message:
    content = {"arrays": ArrayRecord(arrays), "metrics": MetricRecord(metrics)}
    if edge is not None:
        content["edge"] = ConfigRecord(edge)
    metadata = Metadata(run_id=1, message_id=f"reply-{node}", src_node_id=node, dst_node_id=0,
                        reply_to_message_id=f"ins-{node}", group_id="1", created_at=time.time(), ttl=3600.0,
                        message_type=MessageType.TRAIN)
    return Message(RecordDict(content), metadata=metadata)


def test_the_strategy_counts_gateways_once_and_aggregates_mixed_clients():
    reference = [np.zeros(3, np.float32)]
    strategy = make_strategy(FederationSettings(min_clients=1), 4)
    strategy.reference = reference
    gateway = {"num-examples": 30, "train-seconds": 2.0, "edge-updates": 3, "edge-devices": 3, "edge-examples": 30,
               "edge-rejected": 1, "edge-resumed": 0}
    replies = [
        _reply([np.full(3, 1.0, np.float32)], 11, gateway, {"gateway": "gw", "kinds": '{"browser": 2, "phone": 1}'}),
        _reply([np.full(3, 9.0, np.float32)], 12, gateway, {"gateway": "gw", "kinds": "{}"}),  # the same gateway again
        _reply([np.full(3, 3.0, np.float32)], 13, {"num-examples": 10, "train-loss": 0.4, "train-seconds": 1.0,
                                                    "own-data": 1}),
        _reply([np.full(3, 2.0, np.float32)], 14, {"num-examples": 20, "train-loss": 0.6, "train-seconds": 1.0,
                                                    "partition-id": 0, "malicious": 0}),
        Message(Error(code=8, reason="ClientApp crashed"), metadata=_metadata(node=15)),
    ]
    arrays, _ = strategy.aggregate_train(1, replies)
    assert np.allclose(arrays.to_numpy_ndarrays()[0], (30 * 1 + 10 * 3 + 20 * 2) / 60)
    stats = strategy.stats
    assert (stats.accepted, stats.rejected, stats.failed) == (3, 1, 1)
    assert stats.edge_summary() == {"updates": 3, "devices": 3, "examples": 30, "gateways": {
        "gw": {"updates": 3, "devices": 3, "examples": 30, "rejected": 1, "set_aside": {}, "examples_capped": 0,
               "norm_median": None, "kinds": {"browser": 2, "phone": 1}}}}
    assert stats.set_aside == {} and stats.examples_capped == 0  # three honest replies: nothing set aside or cut
    assert stats.own_data == [13] and stats.own_data_examples == 10 and stats.clients == [0]
    assert stats.train_loss == pytest.approx((0.4 * 10 + 0.6 * 20) / 30)  # devices report no loss
    assert any("already answered" in r for r in stats.reasons)


# ---------------------------------------------------------------- real federations


def _free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def _wait_for_port(port: int, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise AssertionError(f"nothing listens on 127.0.0.1:{port}")


@pytest.fixture(scope="module")
def trained_store(tmp_path_factory) -> Path:
    """A store with a small digits model (an MLP, 16 units: rounds stay quick)."""
    return weak_digits_store(tmp_path_factory.mktemp("edge") / "template", width=16)


class Federation:
    """Real processes on loopback: `pollinate serve`, a SuperLink, SuperNodes, `federate run`."""

    def __init__(self, tmp_path: Path, template: Path):
        from server_helpers.live import LiveServer

        self.tmp = tmp_path
        self.home = tmp_path / "store"
        shutil.copytree(template, self.home)
        self.env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
        self.env.pop("POLLINATE_HOME", None)
        self.processes: dict[str, subprocess.Popen] = {}
        self.link_port, = _free_ports(1)
        self.server = LiveServer(self.home, log=tmp_path / "serve.log").start()
        self.run: subprocess.Popen | None = None

    def start(self, name: str, *args: str) -> subprocess.Popen:
        with open(self.tmp / f"{name}.log", "ab") as log:
            process = subprocess.Popen([sys.executable, "-m", "pollinate", "federate", *args, "--home", str(self.home)],
                                       cwd=REPO, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                       start_new_session=True)
        self.processes[name] = process
        return process

    def superlink(self) -> None:
        self.start("superlink", "superlink", "--host", "127.0.0.1", "--port", str(self.link_port))
        _wait_for_port(self.link_port)  # SuperNodes start once the SuperLink answers

    def gateway(self, name: str = "gateway", *args: str) -> subprocess.Popen:
        return self.start(name, "supernode", "--gateway", "gw", "--superlink", f"127.0.0.1:{self.link_port}", *args)

    def submit(self, *args: str) -> None:
        """`federate run --edge ... --json`: its summary on stdout, Flower's log on stderr."""
        with open(self.tmp / "run.out", "wb") as out, open(self.tmp / "run.err", "wb") as err:
            self.run = subprocess.Popen([sys.executable, "-m", "pollinate", "federate", "run", "--edge",
                                         "--superlink", f"127.0.0.1:{self.link_port}", "--formats", "", "--json",
                                         *args, "--home", str(self.home)],
                                        cwd=REPO, env=self.env, stdout=out, stderr=err, start_new_session=True)

    def finish(self, timeout: float = 300) -> dict:
        self.run.wait(timeout=timeout)
        out = (self.tmp / "run.out").read_text()
        assert self.run.returncode == 0, out[-2000:] + (self.tmp / "run.err").read_text()[-3000:] + self.logs()
        return json.loads(out)

    def logs(self) -> str:
        return "".join(f"\n--- {p.name}\n" + p.read_text(errors="replace")[-2500:] for p in sorted(self.tmp.glob("*.log")))

    def kill9(self, name: str) -> None:
        process = self.processes.pop(name)
        os.killpg(process.pid, signal.SIGKILL)  # the SuperNode, its SuperExec and the ClientApp in its wait
        process.wait(timeout=10)

    def stop(self) -> None:
        from federated.runtime import stop_process_tree

        if self.run is not None and self.run.poll() is None:
            stop_process_tree(self.run, timeout=10)
        for process in self.processes.values():
            stop_process_tree(process, timeout=15)
        self.server.stop()


class Device:
    """A device speaking the protocol over HTTP (no training: a small finite delta)."""

    def __init__(self, url: str, model: str = "digits", kind: str = "simulated"):
        self.base = f"{url}/v1/federations/{model}"
        enrolled = httpx.post(f"{self.base}/devices", json={"kind": kind}, timeout=10)
        assert enrolled.status_code == 201, enrolled.text
        self.headers = {"Authorization": f"Bearer {enrolled.json()['token']}"}

    def wait_for_task(self, round: int, timeout: float = 180) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            answer = httpx.get(f"{self.base}/task", headers=self.headers, timeout=10)
            if answer.status_code == 200 and answer.json()["round"] == round:
                return answer.json()
            time.sleep(0.2)
        raise AssertionError(f"no task for round {round}")

    def contribute(self, task: dict, examples: int, scale: float = 1e-3) -> dict:
        weights = httpx.get(f"{self.base}/tasks/{task['task_id']}/weights", headers=self.headers, timeout=10)
        assert weights.status_code == 200 and len(weights.content) == 4 * task["size"]
        base = np.frombuffer(weights.content, "<f4")
        delta = (np.random.default_rng(examples).normal(size=base.size) * scale).astype("<f4")
        posted = httpx.post(f"{self.base}/tasks/{task['task_id']}/updates", params={"examples": examples},
                            content=delta.tobytes(), timeout=30,
                            headers={**self.headers, "Content-Type": "application/octet-stream"})
        assert posted.status_code == 202, posted.text
        return posted.json()


def _federated(home: Path) -> list:
    return [v for v in Store(home).list_versions("digits") if v.lineage.source == "federated"]


@pytest.mark.slow
def test_a_gateway_and_an_own_data_node_complete_two_rounds_counted_in_lineage(tmp_path, trained_store):
    from training.datasets import load_dataset

    digits = load_dataset("digits")
    own = tmp_path / "own.npz"
    np.savez(own, x=digits.x_train[:100], y=digits.y_train[:100])
    federation = Federation(tmp_path, trained_store)
    try:
        federation.superlink()
        federation.gateway("gateway", "--min-updates", "2", "--round-deadline", "120")
        federation.start("own-data", "supernode", "--data", str(own), "--model", "digits@1",
                         "--superlink", f"127.0.0.1:{federation.link_port}")
        federation.submit("--from", "digits@1", "--rounds", "2", "--min-clients", "2")
        devices = [Device(federation.server.url) for _ in range(3)]
        plan = {1: [(devices[0], 10), (devices[1], 30)], 2: [(devices[1], 20), (devices[2], 40)]}
        tasks = {}
        for round, contributions in plan.items():
            for device, examples in contributions:
                tasks[round] = device.wait_for_task(round)
                device.contribute(tasks[round], examples)
        summary = federation.finish()
        status = httpx.get(f"{federation.server.url}/v1/federations/digits/status", timeout=10).json()
    finally:
        federation.stop()
    assert tasks[1]["base_version"] == 1  # the version the round's weights are
    versions = _federated(federation.home)
    assert [v.lineage.round for v in versions] == [1, 2]
    assert tasks[2]["base_version"] == versions[0].version  # round 1 was published before round 2 went out
    for version, examples in zip(versions, (40, 60)):
        extra = version.lineage.extra
        assert extra["edge"]["updates"] == 2 and extra["edge"]["devices"] == 2
        assert extra["edge"]["examples"] == examples
        assert extra["edge"]["gateways"]["gw"]["kinds"] == {"simulated": 2}
        assert extra["own_data"] == {"nodes": 1, "examples": 100}
        assert extra["examples"] == examples + 100 and extra["failed"] == 0
    rows = summary["outcome"]["history"]
    assert [(r["edge_updates"], r["edge_devices"], r["edge_examples"]) for r in rows] == [(2, 2, 40), (2, 2, 60)]
    assert status["round"] == 2 and status["accepted"] == 2 and status["open"] is False


@pytest.mark.slow
def test_a_gateway_killed_mid_round_and_restarted_counts_each_update_once(tmp_path, trained_store):
    """kill -9 the gateway SuperNode (its SuperExec and the ClientApp waiting for devices) after
    one device's update was accepted; start it again: it comes back as a new Flower node, the
    ServerApp gives it the round again, it resumes the same task, and the round completes with
    both updates, each counted once."""
    federation = Federation(tmp_path, trained_store)
    try:
        federation.superlink()
        federation.gateway("gateway", "--min-updates", "2", "--round-deadline", "150")
        federation.submit("--from", "digits@1", "--rounds", "1", "--min-clients", "1")
        first, second = Device(federation.server.url), Device(federation.server.url)
        task = first.wait_for_task(1)
        assert first.contribute(task, 12)["accepted"] == 1
        federation.kill9("gateway")
        killed_at = time.monotonic()
        federation.gateway("gateway-restarted", "--min-updates", "2", "--round-deadline", "150")
        again = second.wait_for_task(1)
        assert again["task_id"] == task["task_id"]  # the task lives in the store, not in the killed process
        assert second.contribute(again, 18)["accepted"] == 2
        summary = federation.finish()
        finished_after = time.monotonic() - killed_at
    finally:
        federation.stop()
    row, = summary["outcome"]["history"]
    assert row["edge_updates"] == 2 and row["edge_examples"] == 30 and row["failed"] == 0
    assert row["redelivered"] >= 1
    version, = _federated(federation.home)
    assert version.lineage.extra["edge"]["updates"] == 2 and version.lineage.extra["edge"]["devices"] == 2
    assert version.lineage.extra["examples"] == 30
    edge = EdgeStore(Store(federation.home))
    assert edge.accepted(task["task_id"]) == 2
    # the restarted gateway took over at once: no waiting for Flower to give up on the dead node
    assert finished_after < 60, finished_after


@pytest.mark.slow
def test_federate_up_runs_an_edge_federation_on_loopback_and_stops_everything(tmp_path, trained_store):

    home = tmp_path / "store"
    with federate_up(trained_store, home, "--rounds", "1", "--gateways", "1", "--min-updates", "1",
                     "--round-deadline", "120") as started:
        up, url = started.process, started.url
        routes = "".join(up.stderr.readline() for _ in range(5))
        assert f"{url}/v1/federations/digits/devices" in routes and f"{url}/v1/federations/digits/status" in routes
        device = Device(url)
        task = device.wait_for_task(1)
        assert task["base_version"] == 1
        device.contribute(task, 25)
        out, err = up.communicate(timeout=300)
    assert up.returncode == 0, err[-3000:]
    assert "round 1/1" in err and "edge: 1 update from 1 device (25 examples) via gw-0" in err
    summary = json.loads(out)
    assert summary["device_endpoint"] == url and summary["outcome"]["versions"] == [2]
    version, = _federated(home)
    assert version.lineage.extra["edge"]["examples"] == 25 and version.lineage.parent_version == 1
    assert processes_naming(home) == []  # serve, the SuperLink, the gateway and Flower's helpers are gone


@pytest.mark.slow
def test_federate_up_stopped_with_sigterm_mid_round_stops_everything(tmp_path, trained_store):
    """SIGTERM (a service manager, `timeout`) to `federate up` alone, while a round waits for
    devices: serve, the SuperLink, the gateway and flwr run are stopped too (--json: progress on stderr)."""
    home = tmp_path / "store"
    with federate_up(trained_store, home, "--rounds", "1", "--min-updates", "1", "--round-deadline", "300",
                     stdout=subprocess.DEVNULL) as started:
        up = started.process
        Device(started.url).wait_for_task(1)  # the round is open, the gateway waits
        assert processes_naming(home)
        up.send_signal(signal.SIGTERM)
        up.communicate(timeout=90)
    assert up.returncode == 130
    deadline = time.monotonic() + 20
    while processes_naming(home) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert processes_naming(home) == []


def test_federate_up_refuses_bad_input_in_one_line(tmp_path):
    from conftest import run_cli

    for args, message in [
        (["--model", "nothing"], "nothing"),
        (["--gateways", "0"], "needs a gateway"),
        (["--aggregate", "max"], "unknown aggregate"),
        (["--from", "digits@x"], "NAME@VERSION"),
        (["--data", str(tmp_path / "missing.npz")], "not found"),
    ]:
        result = run_cli("federate", "up", *args, home=tmp_path / "store")
        assert result.returncode == 2, (args, result.stderr)
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], (args, result.stderr)


@pytest.mark.slow
def test_a_round_without_any_device_update_is_not_published(tmp_path, trained_store):
    """No device came before the deadline: the gateway's reply is an error, the model did not
    change, and no version is made for the round (the federation still ends cleanly)."""
    from conftest import run_cli

    home = tmp_path / "store"
    shutil.copytree(trained_store, home)
    result = run_cli("federate", "up", "--model", "digits", "--rounds", "1", "--round-deadline", "2", "--port", "0",
                     "--formats", "", "--json", home=home, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    outcome = json.loads(result.stdout)["outcome"]
    row, = outcome["history"]
    assert outcome["versions"] == [] and row["published"] is False and row["failed"] == 1
    assert row["publish_error"] == "no client update was accepted: the model did not change"
    assert _federated(home) == []
    assert "not published (no client update was accepted" in result.stderr
