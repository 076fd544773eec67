"""The reference device client (`pollinate federate device`, federated/device.py) against the real
`pollinate serve` on loopback and a real store.

The store holds a small digits model version with a real `tflite-train` file (made once per
module by export/ondevice.py); the test plays the gateway by opening tasks with
EdgeStore.open_task, as federated/gateway.py does. The device side never loads Keras: it runs
the file in TensorFlow's TFLite interpreter, through the protocol only. Keras appears only on
the test side, to judge the update (applying it to the base must lower the loss on the
device's data).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
from server_helpers.live import LiveServer

from registry import Lineage, Store
from registry.edge import EdgeStore, weights_spec

REPO = Path(__file__).resolve().parents[1]
MODEL = "phonedigits"
ENROL_TOKEN = "enrol-secret-for-tests"
DEVICE_EXAMPLES = 150  # with batch_size 32: four full batches and a partial one of 22
CONFIG = {"epochs": 2, "batch_size": 32, "learning_rate": 0.001}
SPEC = {"shape": [8, 8, 1], "dtype": "float32",
        "preprocessing": {"kind": "image", "layout": "HWC", "scale": 1 / 16, "offset": 0.0}}


def _keras():
    from core.tensorflow import import_tensorflow

    import_tensorflow()
    import keras

    return keras


def _digits():
    from sklearn.datasets import load_digits

    bunch = load_digits()
    return (bunch.images.astype(np.float32) / 16.0)[..., None], bunch.target.astype(np.int64)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A store with one weak version of a small digits model (trained on 200 images) that has a
    tflite-train file, the device's own data (other images) as .npz, and `pollinate serve`
    (which wants an enrolment token) on it."""
    from export.ondevice import flatten_weights, write_training_tflite

    keras = _keras()
    root = tmp_path_factory.mktemp("device")
    x, y = _digits()
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((8, 8, 1)), keras.layers.Flatten(),
                              keras.layers.Dense(16, activation="relu"), keras.layers.Dense(10, activation="softmax")])
    model.compile(keras.optimizers.Adam(0.01), "sparse_categorical_crossentropy")
    model.fit(x[:200], y[:200], epochs=2, batch_size=32, verbose=0)
    train_file = write_training_tflite(model, root / "build" / "train.tflite", task="classification")
    home = root / "store"
    store = Store(home)
    record = store.publish(MODEL, lineage=Lineage("central"), artifacts={"tflite-train": {"train.tflite": train_file}},
                           metrics={"accuracy": 0.5}, input_spec=SPEC, labels=[str(d) for d in range(10)])
    device_x, device_y = x[1000:1000 + DEVICE_EXAMPLES], y[1000:1000 + DEVICE_EXAMPLES]
    data = root / "device.npz"
    np.savez(data, x=device_x, y=device_y)
    server = LiveServer(home, log=root / "serve.log", env={"POLLINATE_ENROL_TOKEN": ENROL_TOKEN}).start()
    try:
        yield {"root": root, "home": home, "model": model, "version": record.version, "data": data,
               "x": device_x, "y": device_y, "base": flatten_weights(model.get_weights()),
               "weights": model.get_weights(), "file_bytes": train_file.read_bytes(), "server": server}
    finally:
        server.stop()


def open_round(world, round: int, **overrides) -> str:
    """Play the gateway: open this round's task on the version's weights."""
    base = world["base"]
    edge = EdgeStore(Store(world["home"]))
    options = dict(federation="fed-test", round=round, gateway="gw-0", base_version=world["version"], config=CONFIG,
                   weights=weights_spec(world["weights"]), base=base, deadline=time.time() + 600, min_updates=50,
                   norm_bound=float(np.linalg.norm(base)))
    options.update(overrides)
    return edge.open_task(MODEL, **options).task_id


def device_command() -> list[str]:
    """`pollinate federate device` once federated/cli.py registers it; the module's own entry
    point (the same command function) until then."""
    from federated.cli import app

    names = {c.name or c.callback.__name__.replace("_", "-") for c in app.registered_commands}
    if "device" in names:
        return [sys.executable, "-m", "pollinate", "federate", "device"]
    return [sys.executable, "-m", "federated.device_cli"]


def run_device(world, *args: str, state: Path, enrol: bool = True) -> subprocess.CompletedProcess:
    command = [*device_command(), "--server", world["server"].url, "--model", MODEL, *args, "--state", str(state)]
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "COLUMNS": "200"}
    env.pop("POLLINATE_ENROL_TOKEN", None)
    if enrol:
        command += ["--enrol-token", ENROL_TOKEN]
    return subprocess.run(command, capture_output=True, text=True, cwd=REPO, env=env, timeout=300)


def mean_loss(world, flat: np.ndarray) -> float:
    """Sparse categorical cross-entropy of the Keras model with these weights on the device's data."""
    from export.ondevice import unflatten_weights

    model = world["model"]
    saved = model.get_weights()
    model.set_weights(unflatten_weights(flat, saved))
    try:
        p = model.predict(world["x"], verbose=0)
    finally:
        model.set_weights(saved)
    return float(-np.mean(np.log(np.clip(p[np.arange(len(p)), world["y"]], 1e-7, 1))))


def test_device_cli_trains_and_its_update_is_accepted_then_a_restart_reuses_its_enrolment(world, tmp_path):
    task_id = open_round(world, 1)
    state = tmp_path / "phone"
    result = run_device(world, "--data", str(world["data"]), "--rounds", "1", "--wait", "60", "--kind", "phone",
                        "--seed", "0", "--json", state=state)
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["contributed"] == 1 and summary["enrolments"] == 1 and not summary["reused_enrolment"]
    [task] = summary["tasks"]
    size = world["base"].size
    assert task["task_id"] == task_id and task["status"] == "accepted" and task["accepted"] == 1
    assert task["examples"] == DEVICE_EXAMPLES and task["epochs"] == 2 and task["batch_size"] == 32
    assert task["steps"] == 2 * 5  # 4 full batches + the partial one, per epoch
    assert task["train_seconds"] > 0 and task["loss_last"] < task["loss_first"]
    assert task["bytes_up"] == 4 * size and task["model_bytes"] == len(world["file_bytes"]) and not task["model_cached"]
    assert task["bytes_down"] >= task["model_bytes"] + 4 * size
    assert "round 1" in result.stderr and "accepted" in result.stderr  # progress goes to stderr with --json

    edge = EdgeStore(Store(world["home"]))
    status = edge.status(MODEL)
    assert status["round"] == 1 and status["accepted"] == 1
    [update] = edge.updates(task_id)
    assert update.device_id == summary["device_id"] and update.examples == DEVICE_EXAMPLES
    assert update.delta.dtype == np.float32 and update.delta.size == size and np.isfinite(update.delta).all()
    assert mean_loss(world, world["base"] + update.delta) < mean_loss(world, world["base"]) - 0.01

    identity = json.loads((state / f"identity-{MODEL}.json").read_text())
    assert identity["device_id"] == summary["device_id"] and (state / f"identity-{MODEL}.json").stat().st_mode & 0o077 == 0
    assert list((state / "models").glob("*.tflite")) and not list(state.glob("pending-*"))

    # restart: same state, no enrol token needed; this device already contributed → 204 until --wait
    clock = time.monotonic()
    again = run_device(world, "--data", str(world["data"]), "--wait", "1.5", "--poll", "0.5", "--json", state=state,
                       enrol=False)
    assert again.returncode == 0, again.stderr
    second = json.loads(again.stdout)
    assert second["reused_enrolment"] and second["enrolments"] == 0 and second["device_id"] == summary["device_id"]
    assert second["tasks"] == [] and second["idle_polls"] >= 2 and "no task within" in second["stopped"]
    assert time.monotonic() - clock >= 1.5
    assert edge.status(MODEL)["accepted"] == 1
    with Store(world["home"])._read() as db:
        assert db.execute("SELECT COUNT(*) FROM edge_devices WHERE model = ?", (MODEL,)).fetchone()[0] == 1


def test_device_cli_human_output_and_cached_model_file(world, tmp_path):
    """Without --json: one progress line per task; a second device sharing nothing downloads the
    file, and the same state reuses it by sha256 for the next round."""
    state = tmp_path / "device"
    open_round(world, 2)
    first = run_device(world, "--data", str(world["data"]), state=state)
    assert first.returncode == 0, first.stderr
    assert "enrolled as device" in first.stdout and "round 2" in first.stdout and "accepted (" in first.stdout
    open_round(world, 3)
    second = run_device(world, "--data", str(world["data"]), "--json", state=state, enrol=False)
    assert second.returncode == 0, second.stderr
    [task] = json.loads(second.stdout)["tasks"]
    assert task["round"] == 3 and task["status"] == "accepted" and task["model_cached"] and task["model_bytes"] == 0
    assert task["bytes_down"] < len(world["file_bytes"])


@pytest.mark.parametrize("case", ["shape", "labels", "missing_y", "not_npz", "csv_columns", "no_file"])
def test_device_cli_bad_data_is_one_error_line_exit_2(world, tmp_path, case):
    x, y = world["x"][:20], world["y"][:20]
    path = tmp_path / "bad.npz"
    if case == "shape":
        np.savez(path, x=x[:, :7, :7], y=y)
    elif case == "labels":
        np.savez(path, x=x, y=y + 5)
    elif case == "missing_y":
        np.savez(path, x=x)
    elif case == "not_npz":
        path.write_bytes(b"not a zip file")
    elif case == "csv_columns":
        path = tmp_path / "bad.csv"
        path.write_text("a,b,label\n1,2,3\n")
    else:
        path = tmp_path / "absent.npz"
    result = run_device(world, "--data", str(path), "--wait", "0", state=tmp_path / "state")
    assert result.returncode == 2, (result.stdout, result.stderr)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.stderr
    expected = {"shape": "takes (n, 8, 8, 1)", "labels": "is not one of the model's 10 classes",
                "missing_y": "has no array y", "not_npz": "not a readable .npz", "csv_columns": "takes 64 values",
                "no_file": "not found"}[case]
    assert expected in lines[0]
    assert not (tmp_path / "state" / f"identity-{MODEL}.json").exists()  # bad data never enrols


def test_device_cli_without_the_enrol_token_is_refused(world, tmp_path):
    result = run_device(world, "--data", str(world["data"]), "--wait", "0", state=tmp_path / "s", enrol=False)
    assert result.returncode == 2
    assert result.stderr.strip().startswith("error: ") and "enrol" in result.stderr and "Traceback" not in result.stderr


def test_device_cli_server_that_does_not_answer_is_one_error_line_exit_3(world, tmp_path):
    import socket

    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    command = [*device_command(), "--server", f"http://127.0.0.1:{port}", "--model", MODEL, "--data", str(world["data"]),
               "--state", str(tmp_path / "s"), "--retries", "1"]
    result = subprocess.run(command, capture_output=True, text=True, cwd=REPO, timeout=60)
    assert result.returncode == 3, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "after 2 attempt(s)" in lines[0]


# ----------------------------------------------------------------------------- the library, in-process


def client(world, state: Path, **options):
    from federated.device import DeviceClient

    options.setdefault("enrol_token", ENROL_TOKEN)
    options.setdefault("seed", 0)
    options.setdefault("poll", 0.1)
    return DeviceClient(options.pop("server", world["server"].url), MODEL, world["data"], state, **options)


def test_device_reenrols_on_401_and_refetches_a_task_that_went_stale(world, tmp_path):
    """A token the server does not know → enrol again, once; a round that closes while the device
    trains → its upload gets 409 stale → it fetches the new round's task and contributes to that."""
    open_round(world, 4)
    device = client(world, tmp_path / "d")
    device.enrol()
    first_id = device.identity["device_id"]
    device.identity = {**device.identity, "token": "forgotten-token"}
    edge = EdgeStore(Store(world["home"]))
    closed = []

    def close_round_4(kind, info):  # after training, before the upload: a late device
        if kind == "trained" and info["task"]["round"] == 4 and not closed:
            closed.append(open_round(world, 5))  # the gateway moves on: round 4's task closes

    device.on_event = close_round_4
    try:
        summary = device.run(rounds=1, wait=10)
    finally:
        device.close()
    assert summary.refusals.get("unauthorized") == 1 and summary.enrolments == 2  # the first, and the new one
    assert summary.device_id != first_id
    assert [(t.round, t.status) for t in summary.tasks] == [(4, "stale"), (5, "accepted")]
    assert edge.accepted(closed[0]) == 1 and summary.refusals.get("stale") == 1
    late = summary.tasks[0]
    assert late.train_seconds > 0 and late.bytes_up == 4 * world["base"].size  # refused on the upload itself
    assert not list((tmp_path / "d").glob("pending-*")) and not list((tmp_path / "d").glob("checkpoint-*"))


def test_device_duplicate_is_done_with_the_task(world, tmp_path):
    """Posting twice for one task → 409 duplicate: this device is done with it (its first update counts)."""
    from federated.device import ProtocolClient

    task_id = open_round(world, 6)
    device = client(world, tmp_path / "d")
    try:
        summary = device.run(rounds=1, wait=10)
        [task] = summary.tasks
        assert task.status == "accepted"
        answer = ProtocolClient(world["server"].url, MODEL).task(device.identity["token"])
        assert answer is None  # this device is done with round 6
        again = device.run_task({"task_id": task_id, "round": 6, "base_version": world["version"], "config": CONFIG,
                                 "weights": weights_spec(world["weights"]), "size": int(world["base"].size)})
        assert again.status == "duplicate" and "already" in again.detail
    finally:
        device.close()
    assert EdgeStore(Store(world["home"])).accepted(task_id) == 1


def test_device_update_over_the_norm_bound_is_refused_and_not_trained_again(world, tmp_path):
    """422 (norm over the task's bound, clipping off): the task is over for this device; the
    server keeps offering it, the device does not train for it again and stops after --wait."""
    task_id = open_round(world, 9, norm_bound=1e-6)
    device = client(world, tmp_path / "d")
    try:
        summary = device.run(rounds=1, wait=0.5)
    finally:
        device.close()
    [task] = summary.tasks
    assert task.status == "refused" and "norm" in task.detail and summary.refusals == {"norm": 1}
    assert summary.contributed == 0 and "no task within" in summary.stopped and summary.idle_polls >= 2
    assert EdgeStore(Store(world["home"])).accepted(task_id) == 0


def test_device_resends_as_float16_after_413(world, tmp_path):
    """A body over the server's limit → 413 → the same update again as float16 (half the bytes)."""
    size = int(world["base"].size)
    limit = 4 * size - 1  # float32 is over it, float16 fits
    with LiveServer(world["home"], log=tmp_path / "serve.log",
                    env={"POLLINATE_MAX_UPDATE_BYTES": str(limit)}) as small:
        task_id = open_round(world, 7)
        device = client(world, tmp_path / "d", server=small.url, enrol_token=None)
        try:
            summary = device.run(rounds=1, wait=10)
        finally:
            device.close()
    [task] = summary.tasks
    assert task.status == "accepted" and task.dtype == "float16" and summary.refusals == {"too_large": 1}
    assert task.bytes_up == 4 * size + 2 * size
    [update] = EdgeStore(Store(world["home"])).updates(task_id)
    assert update.delta.size == size


class FlakyProxy:
    """A loopback HTTP proxy in front of the real server that answers 503 to the requests
    `fail(method, path, n)` picks (n: how many of that method+path it has seen): the server
    being restarted or overloaded, as a phone meets it."""

    def __init__(self, upstream: str, fail):
        self.upstream, self.fail, self.seen = upstream, fail, {}
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _forward(self):
                key = (self.command, self.path.split("?")[0])
                proxy.seen[key] = proxy.seen.get(key, 0) + 1
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0)) or None
                if proxy.fail(self.command, self.path, proxy.seen[key]):
                    self.send_response(503)
                    self.send_header("Content-Type", "application/json")
                    payload = b'{"detail": "restarting"}'
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    self.wfile.write(payload)
                    return
                headers = {k: v for k, v in self.headers.items() if k.lower() not in ("host", "content-length")}
                request = urllib.request.Request(proxy.upstream + self.path, data=body, headers=headers,
                                                 method=self.command)
                try:
                    with urllib.request.urlopen(request, timeout=30) as answer:
                        status, answer_headers, data = answer.status, answer.headers, answer.read()
                except urllib.error.HTTPError as error:
                    status, answer_headers, data = error.code, error.headers, error.read()
                self.send_response(status)
                for k, v in answer_headers.items():
                    if k.lower() not in ("content-length", "transfer-encoding", "connection", "date", "server"):
                        self.send_header(k, v)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = _forward

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


def test_device_retries_5xx_and_resumes_an_unsent_update_after_a_restart(world, tmp_path):
    """5xx answers are retried with backoff. When every retry of the upload fails the device
    stops (ServerUnavailable) with its trained state saved (the `save` signature); the next
    start `restore`s it and sends it without training again."""
    from federated.device import ProtocolClient, ServerUnavailable

    task_id = open_round(world, 8)
    state = tmp_path / "d"
    proxy = FlakyProxy(world["server"].url, lambda method, path, n: method == "POST" and "/updates" in path or n == 1)
    try:
        http = ProtocolClient(proxy.url, MODEL, retries=2, backoff=0.01)
        device = client(world, state, http=http)
        with pytest.raises(ServerUnavailable, match="3 attempt"):
            device.run(rounds=1, wait=10)
        device.close()
        assert http.traffic.retries >= 4  # the first GETs of manifest, enrol, task... and two for the POST
        pending = json.loads((state / f"pending-{MODEL}.json").read_text())
        assert pending["task_id"] == task_id and Path(pending["checkpoint"]).exists()
        assert EdgeStore(Store(world["home"])).accepted(task_id) == 0
        proxy.fail = lambda method, path, n: False  # the server is back
        device = client(world, state, server=proxy.url)
        try:
            summary = device.run(rounds=1, wait=10)
        finally:
            device.close()
    finally:
        proxy.close()
    [task] = summary.tasks
    assert task.status == "accepted" and task.resumed and task.train_seconds == 0 and summary.reused_enrolment
    assert not (state / f"pending-{MODEL}.json").exists() and not Path(pending["checkpoint"]).exists()
    [update] = EdgeStore(Store(world["home"])).updates(task_id)
    assert mean_loss(world, world["base"] + update.delta) < mean_loss(world, world["base"]) - 0.01


def test_batches_cover_every_example_once_and_fill_a_fixed_batch():
    from federated.device import batches

    rng = np.random.default_rng(0)
    dynamic = batches(150, 32, fixed=False, rng=rng)
    assert [len(b) for b in dynamic] == [32, 32, 32, 32, 22]
    assert sorted(np.concatenate(dynamic)) == list(range(150))
    fixed = batches(150, 32, fixed=True, rng=rng)
    assert [len(b) for b in fixed] == [32] * 5 and set(np.concatenate(fixed)) == set(range(150))
    tiny = batches(5, 8, fixed=True, rng=rng)
    assert [len(b) for b in tiny] == [8] and set(tiny[0]) == set(range(5))


# ----------------------------------------------------------------------------- data files against the input spec


def test_csv_of_pixels_reads_like_the_npz(world, tmp_path):
    """A CSV with one column per input value (64 pixels) and a label column gives the same arrays
    (the own-data rules of `federate supernode --data`)."""
    from federated.device import check_data

    manifest = {"input": SPEC, "labels": [str(d) for d in range(10)], "lineage": {"source": "central"}}
    x, y = world["x"][:30], world["y"][:30]
    rows = [",".join(["label", *(f"p{i}" for i in range(64))])]
    rows += [",".join([str(label), *(repr(float(v)) for v in image.reshape(-1))]) for image, label in zip(x, y)]
    path = tmp_path / "pixels.csv"
    path.write_text("\n".join(rows) + "\n")
    from_csv = check_data(path, manifest)
    from_npz = check_data(world["data"], manifest)
    assert from_csv.x.shape == (30, 8, 8, 1) and from_csv.x.dtype == np.float32
    np.testing.assert_array_equal(from_csv.x, from_npz.x[:30])
    np.testing.assert_array_equal(from_csv.y, from_npz.y[:30])
    assert from_csv.y.dtype.kind == "i"


def test_tabular_csv_is_encoded_with_the_specs_columns_and_vocabularies(tmp_path):
    """Numeric columns pass through, categorical ones become the spec's one-hot blocks (an unknown
    category is all zeros), the target is the column the lineage names, whatever the order."""
    from core.errors import InvalidInput
    from federated.device import check_data

    manifest = {
        "input": {"shape": [4], "dtype": "float32", "preprocessing": {
            "kind": "tabular", "columns": [{"name": "km", "type": "numeric"},
                                           {"name": "zone", "type": "categorical", "vocabulary": ["a", "b", "c"]}]}},
        "labels": None, "lineage": {"source": "central", "extra": {"data": {"target": "minutes"}}},
    }
    path = tmp_path / "orders.csv"
    path.write_text("zone,minutes,km\nb,12.5,3\nz,30,7.5\na,8,1\n")
    data = check_data(path, manifest)
    np.testing.assert_array_equal(data.x, [[3, 0, 1, 0], [7.5, 0, 0, 0], [1, 1, 0, 0]])
    np.testing.assert_array_equal(data.y, np.float32([12.5, 30, 8]))
    path.write_text("zone,minutes\nb,12.5\n")
    with pytest.raises(InvalidInput, match="lacks the model's column"):
        check_data(path, manifest)
    path.write_text("zone,minutes,km\nb,12,far\n")
    with pytest.raises(InvalidInput, match="'far' is not a number"):
        check_data(path, manifest)


def test_token_ids_stay_integers_and_fractions_are_refused(tmp_path):
    from core.errors import InvalidInput
    from federated.device import check_data

    manifest = {"input": {"shape": [5], "dtype": "int32"}, "labels": ["neg", "pos"]}
    path = tmp_path / "ids.npz"
    np.savez(path, x=np.arange(10).reshape(2, 5).astype(np.float64), y=np.array(["pos", "neg"]))
    data = check_data(path, manifest)
    assert data.x.dtype == np.int32 and list(data.y) == [1, 0]
    np.savez(path, x=np.full((2, 5), 0.5), y=np.array([0, 1]))
    with pytest.raises(InvalidInput, match="whole numbers"):
        check_data(path, manifest)
