"""The clients' side of field monitoring (docs/monitoring.md).

- web_client/lib/telemetry.js computes the monitoring features and histograms exactly like
  registry/profile.py (the reference): node runs the JavaScript on the same inputs and the
  values agree to 1e-6, the histograms exactly.
- the reference device client (federated/device.py) counts the predictions it makes on its
  local data and posts them as telemetry (`--telemetry`); they appear in the version's report.
- real chromium: digits drawn on the demo page, with the telemetry switch on, appear in the
  served version's telemetry, and the page's correction arrives as feedback naming the
  prediction's id.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from tests.conftest import REPO

WEB = REPO / "web_client"
NODE = shutil.which("node")

needs_node = pytest.mark.skipif(NODE is None, reason="node is not installed")

# node: {cases: [{inputs: [[...flat]], spec, grid?, outputs?}]} on stdin → per case the features
# of each input (and, with a grid, the aggregate's body) on stdout
NODE_SCRIPT = """
import { featureValues, VersionAggregate } from './lib/telemetry.js';
let text = '';
for await (const chunk of process.stdin) text += chunk;
const { cases } = JSON.parse(text);
const out = cases.map(c => {
  const features = c.inputs.map(x => featureValues(Float32Array.from(x), c.spec));
  if (!c.grid) return { features };
  const agg = new VersionAggregate(1, c.grid, c.spec);
  c.inputs.forEach((x, i) => agg.record({ input: Float32Array.from(x), output: c.outputs[i], latencyMs: 1 }));
  return { features, body: agg.body() };
});
process.stdout.write(JSON.stringify(out));
"""


def run_node(cases: list[dict]) -> list[dict]:
    result = subprocess.run([NODE, "--input-type=module", "-e", NODE_SCRIPT], cwd=WEB, input=json.dumps({"cases": cases}),
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def _digits() -> np.ndarray:
    from training.datasets.digits import load_digits

    return load_digits().x_test.astype(np.float32)


TABULAR_SPEC = {
    "shape": [5],
    "preprocessing": {
        "kind": "tabular",
        "columns": [{"name": "km", "type": "numeric"}, {"name": "city", "type": "categorical", "vocabulary": ["a", "b", "c"]},
                    {"name": "load", "type": "numeric"}],
        "features": ["km", "load", "city=a", "city=b", "city=c"],
    },
}


def _cases() -> list[tuple[str, np.ndarray, dict]]:
    rng = np.random.default_rng(7)
    digits = _digits()
    spec = {"shape": [8, 8, 1], "preprocessing": {"kind": "image"}}
    shifted = np.roll(digits[:40], 2, axis=2)
    noisy = rng.uniform(-0.3, 1.4, size=(30, 5, 7, 3)).astype(np.float32)  # out of [0, 1]: clipped
    sparse = np.where(rng.random((20, 6, 6)) < 0.15, rng.random((20, 6, 6)), 0).astype(np.float32)
    empty = np.zeros((2, 8, 8, 1), np.float32)
    city = rng.integers(0, 4, size=50)
    one_hot = np.stack([city == 0, city == 1, city == 2], axis=1).astype(np.float32)  # 3: "(other)", all zero
    tabular = np.concatenate([rng.normal(10, 3, (50, 1)), rng.normal(0, 1, (50, 1)), one_hot], axis=1).astype(np.float32)
    tokens = np.where(rng.random((40, 24)) < 0.3, 0, rng.integers(1, 500, (40, 24))).astype(np.float32)
    return [
        ("digits", digits[:200], spec),
        ("shifted digits", shifted, spec),
        ("empty images", empty, spec),
        ("5x7 RGB, clipped", noisy, {"shape": [5, 7, 3], "preprocessing": {"kind": "image"}}),
        ("6x6 no channel axis", sparse, {"shape": [6, 6], "preprocessing": {"kind": "image"}}),
        ("tabular with a categorical column", tabular, TABULAR_SPEC),
        ("token ids (vector)", tokens, {"shape": [24], "preprocessing": {"kind": "sequence"}}),
    ]


@needs_node
def test_javascript_features_match_the_python_reference():
    from registry.profile import feature_values

    cases = _cases()
    answers = run_node([{"inputs": x.reshape(len(x), -1).tolist(), "spec": spec} for _, x, spec in cases])
    for (name, x, spec), answer in zip(cases, answers):
        reference = feature_values(x, spec)
        assert set(answer["features"][0]) == set(reference), name
        for feature, values in reference.items():
            got = np.array([row[feature] for row in answer["features"]], dtype=np.float64)
            np.testing.assert_allclose(got, values, rtol=0, atol=1e-6, err_msg=f"{name}: {feature}")


@needs_node
def test_javascript_histograms_match_the_python_reference():
    """The aggregate a browser sends equals registry.profile.observe on the same inputs and
    outputs, on a grid built from the training data (deciles, point masses, categories)."""
    from registry.profile import build_profile, grid, observe

    rng = np.random.default_rng(3)
    digits = _digits()
    image_spec = {"shape": [8, 8, 1], "preprocessing": {"kind": "image"}}
    labels = [str(d) for d in range(10)]

    def probabilities(n: int) -> np.ndarray:
        logits = rng.normal(0, 2, (n, 10))
        e = np.exp(logits - logits.max(axis=1, keepdims=True))
        return (e / e.sum(axis=1, keepdims=True)).astype(np.float32)

    train_out = probabilities(len(digits))
    image_grid = grid(build_profile(digits, train_out, image_spec, labels, "classification"))
    seen = np.roll(digits[:150], 1, axis=1)
    seen_out = probabilities(len(seen))

    tab_x = _cases()[5][1]
    tab_y = rng.normal(30, 8, len(tab_x)).astype(np.float32)
    tab_grid = grid(build_profile(tab_x, tab_y[:, None], TABULAR_SPEC, None, "regression", targets=tab_y))
    tab_out = rng.normal(30, 12, (len(tab_x), 1)).astype(np.float32)

    answers = run_node([
        {"inputs": seen.reshape(len(seen), -1).tolist(), "spec": image_spec, "grid": image_grid, "outputs": seen_out.tolist()},
        {"inputs": tab_x.tolist(), "spec": TABULAR_SPEC, "grid": tab_grid, "outputs": tab_out.tolist()},
    ])
    for (x, out, g, spec), answer in zip([(seen, seen_out, image_grid, image_spec), (tab_x, tab_out, tab_grid, TABULAR_SPEC)], answers):
        want = observe(x, out, g, spec)
        body = answer["body"]
        assert body["predictions"] == want["predictions"] == len(x)
        assert body["errors"] == 0
        assert body["features"] == want["features"]
        assert body["prediction"] == want["prediction"]
        assert sum(body["latency_ms"]) == len(x)


# ----------------------------------------------------------------------------- the device client

DEVICE_MODEL = "fielddigits"
DEVICE_SPEC = {"shape": [8, 8, 1], "dtype": "float32",
               "preprocessing": {"kind": "image", "layout": "HWC", "scale": 1 / 16, "offset": 0.0}}
DEVICE_EXAMPLES = 120


@pytest.fixture(scope="module")
def device_world(tmp_path_factory):
    """A store with a small digits model that has a tflite-train file and a profile (its grid in
    the manifest), the device's data as .npz, and `pollinate serve` on it."""
    from core.tensorflow import import_tensorflow
    from export.ondevice import flatten_weights, write_training_tflite
    from registry import Lineage, Store
    from registry.profile import PROFILE_FILE, PROFILE_FORMAT, build_profile
    from tests.server_helpers.live import LiveServer

    import_tensorflow()
    import keras

    root = tmp_path_factory.mktemp("device-telemetry")
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x, y = (bunch.images.astype(np.float32) / 16.0)[..., None], bunch.target.astype(np.int64)
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((8, 8, 1)), keras.layers.Flatten(),
                              keras.layers.Dense(16, activation="relu"), keras.layers.Dense(10, activation="softmax")])
    model.compile(keras.optimizers.Adam(0.01), "sparse_categorical_crossentropy")
    model.fit(x[:600], y[:600], epochs=3, batch_size=32, verbose=0)
    train_file = write_training_tflite(model, root / "build" / "train.tflite", task="classification")
    labels = [str(d) for d in range(10)]
    profile = build_profile(x[:600], model.predict(x[:600], verbose=0), DEVICE_SPEC, labels, "classification")
    profile_file = root / "build" / PROFILE_FILE
    profile_file.write_text(json.dumps(profile))
    home = root / "store"
    record = Store(home).publish(DEVICE_MODEL, lineage=Lineage("central"),
                                 artifacts={"tflite-train": {"train.tflite": train_file}, PROFILE_FORMAT: {PROFILE_FILE: profile_file}},
                                 metrics={"accuracy": 0.8}, input_spec=DEVICE_SPEC, labels=labels)
    device_x, device_y = x[1000:1000 + DEVICE_EXAMPLES], y[1000:1000 + DEVICE_EXAMPLES]
    data = root / "device.npz"
    np.savez(data, x=device_x, y=device_y)
    server = LiveServer(home, log=root / "serve.log").start()
    try:
        yield {"root": root, "home": home, "version": record.version, "data": data, "x": device_x, "y": device_y,
               "weights": model.get_weights(), "base": flatten_weights(model.get_weights()), "server": server,
               "profile": profile}
    finally:
        server.stop()


def _report(world) -> dict:
    import httpx

    answer = httpx.get(f"{world['server'].url}/v1/models/{DEVICE_MODEL}/monitor", timeout=30)
    assert answer.status_code == 200, answer.text
    return answer.json()["report"]["versions"].get(str(world["version"])) or {"predictions": 0, "feedback": 0}


def test_device_cli_with_telemetry_posts_the_counts_of_its_predictions(device_world, tmp_path):
    """`pollinate federate device --telemetry`: before training, the round's model predicts the
    device's 120 examples; they go as batches of 50, 50 and 20 and the server holds exactly
    them, on the version's grid (the same counts registry.profile.observe gives)."""
    import time

    from registry import Store
    from registry.edge import EdgeStore, weights_spec

    world = device_world
    before = _report(world)["predictions"]
    EdgeStore(Store(world["home"])).open_task(
        DEVICE_MODEL, federation="fed-t", round=1, gateway="gw-t", base_version=world["version"],
        config={"epochs": 1, "batch_size": 32, "learning_rate": 0.001}, weights=weights_spec(world["weights"]),
        base=world["base"], deadline=time.time() + 600, min_updates=50, norm_bound=float(np.linalg.norm(world["base"])))
    command = [sys.executable, "-m", "federated.device_cli", "--server", world["server"].url, "--model", DEVICE_MODEL,
               "--data", str(world["data"]), "--state", str(tmp_path / "phone"), "--telemetry", "--telemetry-every", "50",
               "--wait", "5", "--poll", "0.2", "--json"]
    done = subprocess.run(command, capture_output=True, text=True, cwd=REPO, timeout=300,
                          env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout)
    assert summary["contributed"] == 1
    assert summary["telemetry"]["predictions"] == DEVICE_EXAMPLES
    assert summary["telemetry"]["batches"] == 3, summary["telemetry"]
    assert summary["telemetry"]["queued"] == 0 and summary["telemetry"]["refused"] == 0
    assert _report(world)["predictions"] == before + DEVICE_EXAMPLES

    # without --telemetry nothing is counted
    EdgeStore(Store(world["home"])).open_task(
        DEVICE_MODEL, federation="fed-t", round=2, gateway="gw-t", base_version=world["version"],
        config={"epochs": 1, "batch_size": 32, "learning_rate": 0.001}, weights=weights_spec(world["weights"]),
        base=world["base"], deadline=time.time() + 600, min_updates=50, norm_bound=float(np.linalg.norm(world["base"])))
    quiet = subprocess.run([c for c in command if c not in ("--telemetry", "--telemetry-every", "50")],
                           capture_output=True, text=True, cwd=REPO, timeout=300, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
    assert quiet.returncode == 0, quiet.stderr
    assert json.loads(quiet.stdout)["telemetry"] is None
    assert _report(world)["predictions"] == before + DEVICE_EXAMPLES


def test_device_predict_feedback_and_the_offline_queue(device_world, tmp_path):
    """DeviceClient.predict() counts its predictions; feedback names one by id; batches the
    server cannot take wait in the state folder and go with the next flush."""
    from federated.device import DeviceClient, DeviceState, DeviceTelemetry, ProtocolClient
    from registry.profile import observe

    world = device_world
    state = tmp_path / "app"
    before = _report(world)
    device = DeviceClient(world["server"].url, DEVICE_MODEL, world["data"], state, telemetry=True, telemetry_every=1000)
    try:
        answer = device.predict(world["x"][:30])
        assert answer["outputs"].shape == (30, 10) and len(set(answer["ids"])) == 30
        pending = device.telemetry.pending[world["version"]]["body"]
        want = observe(world["x"][:30], answer["outputs"], world["profile"], DEVICE_SPEC)
        assert pending["features"] == want["features"] and pending["prediction"] == want["prediction"]
        label = str(int(world["y"][0]))
        fed = device.feedback(label, prediction_id=answer["ids"][0])  # flushes the batch first: the id is known
        assert fed["accepted"] is True
    finally:
        device.close()
    after = _report(world)
    assert after["predictions"] == before["predictions"] + 30
    assert after["feedback"] == before["feedback"] + 1

    # the server is unreachable: the batch waits in the state folder
    dead = ProtocolClient("http://127.0.0.1:9", DEVICE_MODEL, retries=0, timeout=2)
    offline = DeviceTelemetry(dead, DeviceState(state), DEVICE_MODEL)
    manifest = device._manifest(None)
    offline.record(manifest, world["x"][:7], answer["outputs"][:7], np.ones(7))
    offline.flush()
    assert offline.report.queued == 1 and offline.report.batches == 0
    assert len(DeviceState(state).queued_telemetry(DEVICE_MODEL)) == 1
    # back online: the next flush sends it (once)
    online = DeviceTelemetry(ProtocolClient(world["server"].url, DEVICE_MODEL), DeviceState(state), DEVICE_MODEL)
    online.flush()
    assert online.report.batches == 1 and online.report.queued == 0
    assert DeviceState(state).queued_telemetry(DEVICE_MODEL) == []
    assert _report(world)["predictions"] == after["predictions"] + 7


def test_device_client_enrols_for_a_devices_only_server_and_a_retried_batch_counts_once(device_world, tmp_path):
    """Against POLLINATE_MONITOR_AUTH=device, a device client that never enrolled gets 401 on
    its first batch, enrols once and sends it again with its token; its feedback carries the
    token too. A batch whose answer was lost goes again from the state folder with the same
    batch_id: the server answers it as a duplicate and counts it once. (Before issue 19 the
    server took anonymous batches and the client sent no batch_id.)"""
    import time

    import httpx

    from federated.device import DeviceClient, DeviceState, DeviceTelemetry, ProtocolClient
    from tests.server_helpers.live import LiveServer

    world = device_world
    state = tmp_path / "strict-app"
    with LiveServer(world["home"], log=tmp_path / "strict.log", env={"POLLINATE_MONITOR_AUTH": "device"}) as strict:
        def numbers() -> dict:
            answer = httpx.get(f"{strict.url}/v1/models/{DEVICE_MODEL}/monitor", timeout=30)
            assert answer.status_code == 200, answer.text
            return answer.json()["report"]["versions"].get(str(world["version"])) or {"predictions": 0, "feedback": 0}

        before = numbers()
        device = DeviceClient(strict.url, DEVICE_MODEL, world["data"], state, telemetry=True, telemetry_every=1000)
        try:
            answer = device.predict(world["x"][:12])
            device.telemetry.flush()
            report = device.telemetry.report
            assert (report.batches, report.refused, report.queued) == (1, 0, 0), report.detail
            assert DeviceState(state).identity(device.server, DEVICE_MODEL)["token"], "enrolled on the 401"
            fed = device.feedback(str(int(world["y"][0])), prediction_id=answer["ids"][0])
            assert fed["accepted"] is True
            token = device.identity["token"]
        finally:
            device.close()
        assert numbers()["predictions"] == before["predictions"] + 12
        assert numbers()["feedback"] == before["feedback"] + 1

        # the answer to a batch was lost on the way back: the batch is still in the queue
        sent: list[dict] = []
        http = ProtocolClient(strict.url, DEVICE_MODEL)
        posting = http.post_json
        http.post_json = lambda path, body, **kw: (sent.append({"url": path, "body": body}), posting(path, body, **kw))[1]
        telemetry = DeviceTelemetry(http, DeviceState(state), DEVICE_MODEL, token=lambda refused: None if refused else token)
        telemetry.record(device._manifest(None), world["x"][:5], answer["outputs"][:5], np.ones(5))
        telemetry.flush()
        DeviceState(state).save_queued_telemetry(DEVICE_MODEL, [{**sent[0], "queued_at": time.time()}])
        telemetry.flush()
        assert telemetry.report.batches == 2 and telemetry.report.duplicates == 1
        assert sent[0]["body"]["batch_id"] == sent[1]["body"]["batch_id"]
        assert numbers()["predictions"] == before["predictions"] + 12 + 5, "the retried batch is counted once"


# ----------------------------------------------------------------------------- real chromium

def _browser_missing() -> list[str]:
    from tests.web_helpers.browser import missing_requirements

    return missing_requirements()


@pytest.fixture(scope="module")
def digits_store(tmp_path_factory):
    """digits v1 trained, exported and profiled by `pollinate train`, and `pollinate serve` on it."""
    from tests.conftest import cli_json
    from tests.server_helpers.live import LiveServer

    home = tmp_path_factory.mktemp("telemetry-browser") / "store"
    cli_json("train", "--dataset", "digits", "--epochs", "3", "--seed", "0", home=home)
    logs = tmp_path_factory.mktemp("telemetry-browser-logs")
    with LiveServer(home, log=logs / "serve.log") as live:
        yield {"home": home, "server": live}


@pytest.mark.slow
@pytest.mark.skipif(bool(_browser_missing()), reason="; ".join(_browser_missing()) or "ok")
def test_digits_drawn_in_chromium_appear_in_the_served_versions_telemetry(digits_store, tmp_path):
    """Off by default (drawings before the switch send nothing); on: every prediction is
    counted, a saved correction goes as feedback naming the prediction's id (its batch first),
    and leaving the page sends the rest by navigator.sendBeacon. The server's report holds
    exactly the predictions made with the switch on, the feedback, and no pixel anywhere."""
    import httpx

    from tests.web_helpers.browser import chromium_context
    from training.datasets.digits import load_digits

    server = digits_store["server"]
    data = load_digits()
    digits = [{"label": str(int(y)), "pixels": np.rint(x[..., 0] * 16).astype(int).reshape(-1).tolist()}
              for x, y in zip(data.x_test[:12], data.y_test[:12])]

    def report() -> dict:
        answer = httpx.get(f"{server.url}/v1/models/digits/monitor", timeout=30)
        assert answer.status_code == 200, answer.text
        return answer.json()["report"]["versions"].get("1") or {"predictions": 0, "feedback": 0}

    def draw(page, digit) -> dict:
        page.evaluate("window.pollinate.clear()")
        page.evaluate("values => window.pollinate.drawPixels(values)", digit["pixels"])
        page.get_by_test_id("predict-button").click()
        page.wait_for_function("window.pollinate.lastResult !== null")
        return page.evaluate("({id: window.pollinate.lastResult.id, label: window.pollinate.lastResult.label})")

    sent: list[dict] = []
    with chromium_context(tmp_path / "profile") as (context, messages):
        page = context.new_page()
        page.on("request", lambda r: sent.append({"url": r.url, "body": r.post_data}) if r.method == "POST" else None)
        page.goto(f"{server.url}/web_client/?poll=0&contribute=0&sw=0")
        page.wait_for_function("window.pollinate !== undefined")
        assert page.evaluate("window.pollinate.ready")["version"] == 1
        switch = page.get_by_test_id("telemetry-optin")
        page.wait_for_function("!document.querySelector('[data-testid=telemetry-optin]').disabled")
        assert not switch.is_checked(), "off by default"
        for digit in digits[:3]:
            draw(page, digit)
        assert not [s for s in sent if "/telemetry" in s["url"] or "/feedback" in s["url"]], "nothing before the switch"

        switch.check()
        page.wait_for_function("window.pollinate.telemetry.on === true")
        assert page.get_by_test_id("telemetry-status").get_attribute("data-state") == "on"
        first = [draw(page, digit) for digit in digits[3:8]]
        # the user says what the last one really was: its batch goes, then the feedback naming its id
        truth = digits[7]["label"]
        page.get_by_test_id("correction").select_option(truth)
        page.get_by_test_id("correction-save").click()
        page.wait_for_function("document.querySelector('[data-testid=telemetry-status]').dataset.feedback !== undefined")
        line = page.get_by_test_id("telemetry-status")
        assert line.get_attribute("data-feedback") == "sent", line.text_content()
        assert line.get_attribute("data-feedback-for") == first[-1]["id"]
        after_feedback = report()
        assert after_feedback["predictions"] == 5 and after_feedback["feedback"] == 1, after_feedback
        assert after_feedback["field_accuracy"]["n"] == 1
        assert after_feedback["field_accuracy"]["value"] == (1.0 if first[-1]["label"] == truth else 0.0)

        # a freehand stroke counts like any drawing
        canvas = page.get_by_test_id("draw-canvas")
        page.evaluate("window.pollinate.clear()")
        canvas.scroll_into_view_if_needed()
        box = canvas.bounding_box()
        page.mouse.move(box["x"] + box["width"] * 0.5, box["y"] + box["height"] * 0.15)
        page.mouse.down()
        page.mouse.move(box["x"] + box["width"] * 0.52, box["y"] + box["height"] * 0.85, steps=12)
        page.mouse.up()
        page.wait_for_function("window.pollinate.lastResult !== null")
        for digit in digits[8:12]:
            draw(page, digit)
        assert page.evaluate("window.pollinate.telemetry.stats.pending") == 5
        # leaving the page: the rest goes by sendBeacon on pagehide
        page.goto("about:blank")
        for _ in range(100):
            if report()["predictions"] >= 10:
                break
            page.wait_for_timeout(100)
        assert not [m for m in messages if m.startswith("pageerror")], messages

    final = report()
    assert final["predictions"] == 10, final
    assert final["feedback"] == 1
    assert set(final["drift"]) >= {"ink_mass", "centroid_x", "rows_0", "prediction"}

    # no pixel left the browser: every telemetry body is counts, ids and labels only
    bodies = [json.loads(s["body"]) for s in sent if "/telemetry" in s["url"] and s["body"]]
    assert bodies, "the batch before the feedback is seen by the page's request log"
    for body in bodies:
        assert set(body) <= {"version", "client_id", "batch_id", "predictions", "errors", "latency_ms", "features",
                             "prediction", "shadow", "recent"}
        for counts in [body["latency_ms"], *body["features"].values(), *body["prediction"].values()]:
            assert all(isinstance(c, int) and c >= 0 for c in counts)
