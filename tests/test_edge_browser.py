"""A real browser learns from corrected digits and its update is accepted by a federated round.

A store with a digits version (trained and exported by the CLI), an open edge task in the same
store whose base is that version's Keras ``get_weights()`` (the test plays the gateway), a real
``pollinate serve``, and the demo page in Debian's headless chromium: the user draws digits,
says what each really was (kept in the browser), turns "help improve this model" on, and the
page trains (on cpu: TF.js wasm cannot train a CNN) and posts local − base. The store holds one
update of the task's size, finite and non-zero, and Keras, given base + that update in the
task's order, computes the losses the page reported: the browser's weight order is Keras'.
Screenshots go to test-artifacts/edge_browser/.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

from tests.conftest import REPO, cli_json
from tests.server_helpers.live import LiveServer
from tests.web_helpers.browser import chromium_context, missing_requirements

# Training a version (~35 s) and a browser: well over 30 s.
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(bool(missing_requirements()), reason="; ".join(missing_requirements()) or "ok"),
]

ARTIFACTS = REPO / "test-artifacts" / "edge_browser"
CORRECTIONS = 3
CONFIG = {"epochs": 1, "batch_size": 8, "learning_rate": 1e-3}
STATUS = "[data-testid=contribute-status]"


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> dict:
    """digits v1, trained and exported to TF.js by `pollinate train`, and its Keras model."""
    import keras

    from registry import Store

    home = tmp_path_factory.mktemp("edge-browser") / "store"
    cli_json("train", "--dataset", "digits", "--epochs", "3", "--seed", "0", home=home)
    folder = Path(tempfile.mkdtemp())
    shutil.copy(Store(home).artifact_path("digits", 1, "keras", "model.keras"), folder / "model.keras")
    model = keras.saving.load_model(folder / "model.keras")
    return {"home": home, "model": model, "logs": tmp_path_factory.mktemp("edge-browser-logs")}


@pytest.fixture
def task(store):
    """An open round for digits whose base is v1's Keras weights, in get_weights() order."""
    from registry import Store
    from registry.edge import EdgeStore, weights_spec

    model = store["model"]
    arrays = model.get_weights()
    base = np.concatenate([a.ravel() for a in arrays]).astype("<f4")
    edge = EdgeStore(Store(store["home"]))
    opened = edge.open_task("digits", federation="browser-test", round=1, gateway="gw-browser", base_version=1,
                            config=CONFIG, weights=weights_spec(arrays, [v.path for v in model.weights]), base=base,
                            deadline=time.time() + 600, min_updates=1, norm_bound=float(np.linalg.norm(base)))
    return {"edge": edge, "task": opened, "base": base}


@pytest.fixture
def server(store, request):
    with LiveServer(store["home"], log=store["logs"] / f"{request.node.name}.log") as live:
        yield live


@pytest.fixture
def corrections(store) -> list[dict]:
    """Test-split digits to correct: the ones v1 gets wrong first (what a user would correct), then others."""
    from training.datasets.digits import load_digits

    data = load_digits()
    pixels = np.rint(data.x_test[..., 0] * 16).astype(int)
    wrong = store["model"].predict(data.x_test, verbose=0).argmax(axis=1) != data.y_test
    order = [*np.flatnonzero(wrong), *np.flatnonzero(~wrong)]
    return [{"label": str(int(data.y_test[i])), "pixels": pixels[i].reshape(-1).tolist()} for i in order]


def keras_loss(model, weights: list[np.ndarray], inputs: np.ndarray, labels: np.ndarray) -> float:
    import keras

    model.set_weights(weights)
    probabilities = model(inputs, training=False)
    return float(np.mean(keras.ops.convert_to_numpy(keras.losses.sparse_categorical_crossentropy(labels, probabilities))))


def unflatten(flat: np.ndarray, spec: list[dict]) -> list[np.ndarray]:
    out, offset = [], 0
    for w in spec:
        size = int(np.prod(w["shape"]))
        out.append(flat[offset:offset + size].reshape(w["shape"]))
        offset += size
    assert offset == flat.size
    return out


def publish_round(home: Path, task, weights: np.ndarray) -> int:
    """What the gateway and the ServerApp do when the round ends, reduced to its result: the
    aggregate (here base + the one update) published as a federated version, v1's TF.js
    topology with a weight shard of the new values (in model.json's order, by name)."""
    import json

    from registry import Lineage, Store

    registry = Store(home)
    v1 = registry.get_version("digits", 1)
    model_json = json.loads(registry.artifact_path("digits", 1, "tfjs-layers", "model.json").read_bytes())
    by_name = dict(zip((w["name"] for w in task.weights), unflatten(weights, task.weights)))
    listed = [w for group in model_json["weightsManifest"] for w in group["weights"]]
    shard = b"".join(by_name[w["name"]].astype("<f4").tobytes() for w in listed)
    model_json["weightsManifest"] = [{"paths": ["group1-shard1of1.bin"], "weights": listed}]
    record = registry.publish(
        "digits", lineage=Lineage("federated", parent_version=1, round=task.round, extra={"edge_updates": 1}),
        artifacts={"tfjs-layers": {"model.json": json.dumps(model_json).encode(), "group1-shard1of1.bin": shard}},
        metrics={}, input_spec=v1.input_spec, labels=v1.labels,
    )
    return record.version


def draw_and_correct(page, digit: dict) -> dict:
    """Paint the digit, predict, pick its true label in the correction control and save it."""
    page.evaluate("window.pollinate.clear()")
    page.evaluate("values => window.pollinate.drawPixels(values)", digit["pixels"])
    page.get_by_test_id("predict-button").click()
    page.wait_for_function("window.pollinate.lastResult !== null")
    predicted = page.evaluate("window.pollinate.lastResult.label")
    correction = page.get_by_test_id("correction")
    assert correction.is_enabled()
    assert correction.input_value() == predicted, "the control starts at the model's guess"
    correction.select_option(digit["label"])
    before = int(page.get_by_test_id("corrections-count").text_content())
    page.get_by_test_id("correction-save").click()
    page.wait_for_function(f"document.querySelector('[data-testid=corrections-count]').textContent === '{before + 1}'")
    assert page.get_by_test_id("correction-save").is_disabled(), "one correction per drawing"
    return {"predicted": predicted, "label": digit["label"]}


def screenshot(page, name: str) -> None:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / name), full_page=True)


def test_corrected_digits_train_in_the_browser_and_the_update_is_accepted(store, task, server, corrections, tmp_path):
    opened, edge, base = task["task"], task["edge"], task["base"]
    with chromium_context(tmp_path / "profile") as (context, messages):
        page = context.new_page()
        requests: list[str] = []
        page.on("request", lambda r: requests.append(r.url))
        page.goto(f"{server.url}/web_client/?poll=0&contribute=0")
        page.wait_for_function("window.pollinate !== undefined")
        assert page.evaluate("window.pollinate.ready")["version"] == 1
        inference_backend = page.evaluate("window.pollinate.client.backend")

        # off by default: nothing goes to the federation until the user says so
        help_improve = page.get_by_test_id("help-improve")
        page.wait_for_function("!document.querySelector('[data-testid=help-improve]').disabled")
        assert not help_improve.is_checked()
        assert page.locator(STATUS).get_attribute("data-phase") == "off"
        assert page.get_by_test_id("corrections-count").text_content() == "0"
        chosen = []
        for digit in corrections[:40]:
            if len(chosen) == CORRECTIONS:
                break
            chosen.append(draw_and_correct(page, digit))
        assert page.get_by_test_id("corrections-count").text_content() == str(CORRECTIONS)
        assert not [u for u in requests if "/v1/federations/" in u], "corrections stay in the browser"
        kept = page.evaluate("""async () => (await window.pollinate.client.examples.list())
            .map(e => ({input: Array.from(e.input), label: e.label}))""")
        assert [str(e["label"]) for e in kept] == [c["label"] for c in chosen]

        # on: enrol, task, base weights, train, post
        help_improve.check()
        page.wait_for_function(f"['accepted', 'error'].includes(document.querySelector('{STATUS}').dataset.status)"
                               f" || document.querySelector('{STATUS}').dataset.phase === 'error'", timeout=90_000)
        status = page.locator(STATUS)
        assert status.get_attribute("data-status") == "accepted", status.text_content()
        outcome = page.evaluate("window.pollinate.learning.state.last")
        screenshot(page, "accepted.png")
        assert outcome["taskId"] == opened.task_id and outcome["round"] == 1
        assert outcome["examples"] == CORRECTIONS
        # TF.js wasm has no convolution gradients: a wasm page trains on cpu and predicts on wasm again
        expected_training = "cpu" if inference_backend == "wasm" else inference_backend
        assert outcome["backend"] == expected_training and outcome["inferenceBackend"] == inference_backend
        assert page.evaluate("window.pollinate.client.tf.getBackend()") == inference_backend
        assert status.get_attribute("data-round") == "1" and status.get_attribute("data-accepted") == "1"
        text = status.text_content()
        assert "Round 1" in text and "accepted" in text and "1 update accepted" in text, text

        # the server's view: one update, of the task's size, finite, non-zero, for 3 examples
        federation = httpx.get(f"{server.url}/v1/federations/digits/status").json()
        assert (federation["round"], federation["accepted"], federation["open"]) == (1, 1, True)
        updates = edge.updates(opened.task_id)
        assert len(updates) == 1
        update = updates[0]
        assert update.examples == CORRECTIONS
        assert update.delta.size == opened.size == base.size
        assert np.isfinite(update.delta).all() and np.abs(update.delta).max() > 0
        assert update.norm == pytest.approx(outcome["norm"], rel=1e-4)  # the page sums in float32

        # Keras, given base + delta in the task's order, computes what the page measured:
        # the browser's weight order and byte layout are Keras'
        x = np.asarray([e["input"] for e in kept], dtype=np.float32).reshape(-1, 8, 8, 1)
        y = np.asarray([e["label"] for e in kept])
        loss_before = keras_loss(store["model"], unflatten(base, opened.weights), x, y)
        loss_after = keras_loss(store["model"], unflatten(base + update.delta, opened.weights), x, y)
        assert loss_before == pytest.approx(outcome["lossBefore"], rel=1e-3, abs=1e-5)
        assert loss_after == pytest.approx(outcome["lossAfter"], rel=1e-3, abs=1e-5)
        assert loss_after < loss_before

        # the round ends (the test plays the gateway and the ServerApp: base + the update becomes
        # v2); the page's ordinary update check brings it in and re-reads the last drawing with it
        assert publish_round(store["home"], opened, base + update.delta) == 2
        assert page.evaluate("window.pollinate.client.checkForUpdate()")["to"] == 2
        page.wait_for_function("document.querySelector('[data-testid=model-version]').textContent === 'v2'")
        notice = page.get_by_test_id("update-notice").text_content()
        assert "Updated to v2" in notice and "federated, round 1" in notice, notice
        page.wait_for_function("window.pollinate.lastResult && window.pollinate.lastResult.version === 2")
        result = page.evaluate("({input: Array.from(window.pollinate.lastResult.modelInput),"
                               " probabilities: window.pollinate.lastResult.probabilities})")
        store["model"].set_weights(unflatten(base + update.delta, opened.weights))
        expected = store["model"].predict(np.asarray(result["input"], np.float32).reshape(1, 8, 8, 1), verbose=0)[0]
        assert np.allclose(result["probabilities"], expected, atol=1e-4)
        assert page.get_by_test_id("correction-save").is_disabled(), "the re-read drawing is already corrected"
        store["model"].set_weights(unflatten(base, opened.weights))
        screenshot(page, "next-version.png")

        # a reload keeps the corrections and the switch; the round already has this browser's update
        page.reload()
        page.wait_for_function("window.pollinate !== undefined")
        page.evaluate("window.pollinate.ready")
        page.wait_for_function(f"document.querySelector('{STATUS}').dataset.phase === 'done'", timeout=60_000)
        assert page.get_by_test_id("corrections-count").text_content() == str(CORRECTIONS)
        assert page.get_by_test_id("help-improve").is_checked()
        assert page.locator(STATUS).get_attribute("data-status") == "no-task"
        assert len(edge.updates(opened.task_id)) == 1, "counted once"

        # off again: the choice is remembered, nothing more is sent
        page.get_by_test_id("help-improve").uncheck()
        assert page.locator(STATUS).get_attribute("data-phase") == "off"
        deadline = time.monotonic() + 10
        while page.evaluate("window.pollinate.client.optedIn()") and time.monotonic() < deadline:
            time.sleep(0.05)
        assert page.evaluate("window.pollinate.client.optedIn()") is False, "the choice is stored"
        screenshot(page, "switched-off.png")
        assert not [m for m in messages if m.startswith("pageerror")], messages
