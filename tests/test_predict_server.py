"""Server-side predict against a real `pollinate serve` on a store of really trained models.

The answer must be what a device running the same file gets: LiteRT in this process on the
served version's tflite-float32 file is the reference (<= 1e-5).
"""

from __future__ import annotations

import asyncio
import json
import re
from pathlib import Path

import httpx
import numpy as np
import pytest
from server_helpers.live import LiveServer

from registry import Lineage, Store
from registry.inputs import encode_rows

WINDOW_MS = 25  # wide enough that concurrent requests from this loaded test machine meet


def _export_float32():
    from export.pipeline import ExportOptions, export_for_publish

    return export_for_publish(ExportOptions(formats=("tflite-float32",)))


def _recurrent_tflite(folder: Path) -> Path:
    """A small GRU over the 8 rows of a digit: its TFLite file has a fixed batch of 1."""
    from core.tensorflow import import_tensorflow
    from export.tflite import write_tflite

    import_tensorflow()
    import keras

    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((8, 8)), keras.layers.GRU(8), keras.layers.Dense(3, activation="softmax")])
    return write_tflite(model, folder, variants=("float32",))["float32"]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """digits v1, v2 (float32 TFLite), v3 (Keras only); delivery-eta v1; a GRU (batch fixed to 1)."""
    from training.central import TrainSettings, train_and_register
    from training.datasets import load_dataset

    root = tmp_path_factory.mktemp("predict")
    home = root / "store"
    store = Store(home)
    digits = load_dataset("digits")
    for seed in (0, 1):
        train_and_register(store, digits, TrainSettings(model="mlp", epochs=2, width=16, seed=seed),
                           extra_artifacts=_export_float32())
    train_and_register(store, digits, TrainSettings(model="mlp", epochs=1, width=16, seed=2))
    eta = load_dataset("delivery-eta")
    train_and_register(store, eta, TrainSettings(model="mlp", epochs=2, width=16), extra_artifacts=_export_float32())
    gru = _recurrent_tflite(root / "gru")
    store.publish("sequence", lineage=Lineage("central"), artifacts={"tflite-float32": {"model.tflite": gru}},
                  metrics={}, input_spec={"shape": [8, 8], "dtype": "float32"}, labels=["a", "b", "c"])
    store.publish("broken", lineage=Lineage("central"), artifacts={"tflite-float32": {"model.tflite": b"not a model" * 99}},
                  metrics={}, input_spec={"shape": [4], "dtype": "float32"})
    store.set_channel("digits", "stable", 1)
    store.set_channel("digits", "keras-only", 3)
    env = {"POLLINATE_WEB_CLIENT": "off", "POLLINATE_PREDICT_WINDOW_MS": str(WINDOW_MS)}
    with LiveServer(home, log=root / "serve.log", env=env) as live:
        yield {"home": home, "url": live.url, "pid": live.proc.pid, "digits": digits, "eta": eta,
               "log": root / "serve.log"}


def litert(home: Path, model: str, version: int, x: np.ndarray) -> np.ndarray:
    """LiteRT in this process on the version's stored tflite-float32 file."""
    from export.tflite import LiteRTRunner

    store = Store(home)
    (artifact,) = store.get_version(model, version).artifacts["tflite-float32"]
    return LiteRTRunner(store.objects / artifact.sha256[:2] / artifact.sha256).predict(x)


def post(world, model: str, body, **params) -> httpx.Response:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    return httpx.post(f"{world['url']}/v1/models/{model}/predict", content=content, params=params,
                      headers={"Content-Type": "application/json"}, timeout=60)


def metric(world, name: str, **labels) -> float:
    text = httpx.get(f"{world['url']}/metrics", timeout=30).text
    total = 0.0
    for line in text.splitlines():
        if not line.startswith(name + "{") and not line.startswith(name + " "):
            continue
        found = dict(re.findall(r'(\w+)="([^"]*)"', line.split(" ")[0]))
        if all(found.get(k) == v for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


def test_outputs_equal_litert_on_the_served_version(world):
    x = world["digits"].x_test[:7]
    answer = post(world, "digits", {"inputs": x.tolist()})
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert body["model"] == "digits" and body["version"] == 1
    assert answer.headers["X-Pollinate-Cache"] == "miss" and answer.headers["X-Pollinate-Version"] == "1"
    outputs = np.asarray(body["outputs"], dtype=np.float32)
    assert outputs.shape == (7, 10)
    np.testing.assert_allclose(outputs, litert(world["home"], "digits", 1, x), atol=1e-5, rtol=0)
    one = post(world, "digits", {"inputs": x[3].tolist()}).json()  # one example: a batch of one
    np.testing.assert_allclose(one["outputs"], outputs[3:4], atol=1e-5, rtol=0)


def test_a_repeat_is_answered_from_the_cache(world):
    x = world["digits"].x_test[10:14].tolist()
    hits = metric(world, "pollinate_predict_answers_total", model="digits", cache="hit")
    first = post(world, "digits", {"inputs": x})
    second = post(world, "digits", {"inputs": x})
    assert first.headers["X-Pollinate-Cache"] == "miss"
    assert second.headers["X-Pollinate-Cache"] == "hit" and "X-Pollinate-Batch" not in second.headers
    assert second.content == first.content
    assert metric(world, "pollinate_predict_answers_total", model="digits", cache="hit") == hits + 1
    assert metric(world, "pollinate_predict_answers_total", model="digits", cache="miss") >= 1


def test_the_answer_follows_the_channel_and_the_client_cohort(world):
    store = Store(world["home"])
    x = world["digits"].x_test[20:25]
    before = post(world, "digits", {"inputs": x.tolist()})
    assert before.json()["version"] == 1
    store.set_channel("digits", "stable", 2)
    try:
        after = post(world, "digits", {"inputs": x.tolist()})
        assert after.status_code == 200 and after.json()["version"] == 2
        assert after.headers["X-Pollinate-Cache"] == "miss"  # not version 1's cached answer
        v2 = np.asarray(after.json()["outputs"], dtype=np.float32)
        np.testing.assert_allclose(v2, litert(world["home"], "digits", 2, x), atol=1e-5, rtol=0)
        assert np.abs(v2 - np.asarray(before.json()["outputs"])).max() > 1e-3  # different weights
    finally:
        store.set_channel("digits", "stable", 1)
    back = post(world, "digits", {"inputs": x.tolist()})
    assert back.json()["version"] == 1 and back.headers["X-Pollinate-Cache"] == "hit"
    assert back.content == before.content

    # a staged rollout: each client gets the version its manifest names
    store.set_channel("digits", "canary", 1)
    store.set_channel("digits", "canary", 2, rollout_percent=50)
    seen = set()
    for i in range(12):
        client = f"client-{i}"
        manifest = httpx.get(f"{world['url']}/v1/models/digits/manifest",
                             params={"channel": "canary", "client_id": client}, timeout=30).json()
        answer = post(world, "digits", {"inputs": x[:1].tolist()}, channel="canary", client_id=client).json()
        assert answer["version"] == manifest["version"]
        seen.add(answer["version"])
    assert seen == {1, 2}
    # unset `stable` (the default) means the newest version, as for the manifest; any other unset
    # channel is 404 there and here (a typo never gets the newest version: issue 19)
    assert post(world, "sequence", {"inputs": np.zeros((8, 8)).tolist()}).json()["version"] == 1
    assert post(world, "sequence", {"inputs": np.zeros((8, 8)).tolist()}, channel="nightly").status_code == 404


def test_concurrent_requests_share_one_interpreter_run(world):
    x = world["digits"].x_test[100:124]
    runs = metric(world, "pollinate_predict_runs_total", model="digits")

    async def burst():
        async with httpx.AsyncClient(base_url=world["url"], timeout=60) as client:
            return await asyncio.gather(*(
                client.post("/v1/models/digits/predict", json={"inputs": x[i].tolist()}) for i in range(len(x))
            ))

    answers = asyncio.run(burst())
    assert all(a.status_code == 200 for a in answers)
    shared = [int(a.headers["X-Pollinate-Batch"]) for a in answers]
    assert max(shared) > 1, shared
    expected = litert(world["home"], "digits", 1, x)
    for i, answer in enumerate(answers):  # each request got its own rows back
        np.testing.assert_allclose(answer.json()["outputs"], expected[i : i + 1], atol=1e-5, rtol=0)
    new_runs = metric(world, "pollinate_predict_runs_total", model="digits") - runs
    assert new_runs < len(x)
    assert metric(world, "pollinate_predict_batch_requests_count") > metric(world, "pollinate_predict_batch_requests_bucket", le="1.0")


def test_tabular_rows_for_delivery_eta(world):
    from training.datasets.delivery_eta import generate_orders

    raw = generate_orders(9, seed=7)
    rows = [{k: raw[k][i].item() for k in raw if k != "eta_min"} for i in range(9)]
    answer = post(world, "delivery-eta", {"rows": rows})
    assert answer.status_code == 200, answer.text
    assert answer.json()["version"] == 1
    spec = Store(world["home"]).get_version("delivery-eta", 1).input_spec
    x = encode_rows(rows, spec)
    outputs = np.asarray(answer.json()["outputs"], dtype=np.float32)
    assert outputs.shape == (9, 1)
    np.testing.assert_allclose(outputs, litert(world["home"], "delivery-eta", 1, x), atol=1e-5, rtol=0)
    assert 5 < float(outputs.mean()) < 120  # minutes
    # the same numbers as model inputs are the same cache entry
    same = post(world, "delivery-eta", {"inputs": x.tolist()})
    assert same.headers["X-Pollinate-Cache"] == "hit" and same.content == answer.content


def test_a_fixed_batch_model_runs_its_rows_one_by_one(world):
    from export.tflite import LiteRTRunner

    store = Store(world["home"])
    (artifact,) = store.get_version("sequence", 1).artifacts["tflite-float32"]
    assert LiteRTRunner(store.objects / artifact.sha256[:2] / artifact.sha256).fixed_batch  # the GRU's file: batch 1
    x = np.random.default_rng(0).random((5, 8, 8)).astype(np.float32)
    answer = post(world, "sequence", {"inputs": x.tolist()})
    assert answer.status_code == 200, answer.text
    expected = np.concatenate([litert(world["home"], "sequence", 1, x[i : i + 1]) for i in range(5)])
    np.testing.assert_allclose(answer.json()["outputs"], expected, atol=1e-5, rtol=0)


ETA_ROW = {"distance_km": 2.0, "hour": 19, "weekday": 4, "city": "london", "prep_time_min": 12.0, "courier_load": 1.0}


@pytest.mark.parametrize(
    ("model", "body", "words"),
    [
        ("digits", {"inputs": np.zeros((8, 8)).tolist()}, ["[8, 8, 1]", "[N, 8, 8, 1]", "float32", "[8, 8]"]),
        ("digits", {"inputs": np.zeros((2, 64)).tolist()}, ["[N, 8, 8, 1]", "[2, 64]"]),
        ("digits", {"inputs": np.full((8, 8, 1), "x").tolist()}, ["numbers", "float32"]),
        ("digits", b'{"inputs": %s}' % json.dumps(np.zeros((2, 8, 8, 1)).tolist()).replace("0.0", "NaN", 9).encode(),
         ["non-finite", "at [0, 0, 0, 0]"]),
        ("digits", {"inputs": [[[0.0]] * 8] * 7 + [[[1e39]] * 8]}, ["float32's range"]),
        ("digits", {"rows": [{"a": 1}]}, ["not tabular", "inputs"]),
        ("digits", {}, ["either 'inputs'", "'rows'"]),
        ("delivery-eta", {"rows": [ETA_ROW, {k: v for k, v in ETA_ROW.items() if k != "city"}]},
         ["row 1: missing column 'city'"]),
        ("delivery-eta", {"rows": [{**ETA_ROW, "tip": 2}]}, ["row 0: unknown column 'tip'"]),
        ("delivery-eta", {"rows": [{**ETA_ROW, "hour": "late"}]}, ["row 0, column 'hour'", "not a number"]),
        ("delivery-eta", b'{"rows": [{"distance_km": Infinity, "hour": 19, "weekday": 4, "city": "london",'
                         b' "prep_time_min": 12.0, "courier_load": 1.0}]}', ["column 'distance_km'", "finite"]),
        ("delivery-eta", {"inputs": [1.0, 2.0]}, ["[N, 10]", "[2]"]),
    ],
)
def test_bad_inputs_are_refused_with_422_naming_what_was_expected(world, model, body, words):
    answer = post(world, model, body)
    assert answer.status_code == 422, answer.text
    detail = answer.json()["detail"]
    assert isinstance(detail, str), detail
    for word in words:
        assert word in detail, detail


def test_refusals_of_body_shape_unknown_models_and_versions_without_tflite(world):
    assert post(world, "digits", {"inputs": [1], "rows": [{}]}).status_code == 422
    assert post(world, "digits", {"inputs": [1], "extra": 1}).status_code == 422
    assert post(world, "digits", b"not json").status_code == 422
    missing = post(world, "no-such-model", {"inputs": [1.0]})
    assert missing.status_code == 404 and "no-such-model" in missing.json()["detail"]
    bare = post(world, "digits", {"inputs": np.zeros((8, 8, 1)).tolist()}, channel="keras-only")
    assert bare.status_code == 409
    assert "version 3 has no tflite-float32" in bare.json()["detail"]
    broken = post(world, "broken", {"inputs": [1, 2, 3, 4]})
    assert broken.status_code == 409 and "LiteRT cannot load" in broken.json()["detail"]
    assert metric(world, "pollinate_predict_refusals_total", model="digits", reason="no_artifact") >= 1
    assert metric(world, "pollinate_predict_refusals_total", model="digits", reason="invalid") >= 1


def test_tensorflow_never_loads_in_the_server(world):
    post(world, "digits", {"inputs": world["digits"].x_test[:2].tolist()})  # interpreters are loaded
    maps = Path(f"/proc/{world['pid']}/maps").read_text()
    assert "ai_edge_litert" in maps  # the server did run LiteRT
    assert not [line for line in maps.splitlines() if "/tensorflow/" in line or "libtensorflow" in line]
    assert "Traceback" not in world["log"].read_text()


def test_the_plain_number_reader_agrees_with_json_or_steps_aside():
    """The fast reader gives exactly json.loads' numbers, or None (the general path decides)."""
    from server.predict import read_plain_inputs

    spec = {"shape": [8, 8, 1], "dtype": "float32"}
    rng = np.random.default_rng(1)
    for batch in (None, 1, 3):
        x = rng.normal(size=(8, 8, 1) if batch is None else (batch, 8, 8, 1)) * np.logspace(-12, 12, 64).reshape(8, 8, 1)
        raw = json.dumps({"inputs": x.tolist()}, indent=1 if batch == 3 else None).encode()
        read = read_plain_inputs(raw, spec)
        np.testing.assert_array_equal(read, np.asarray(json.loads(raw)["inputs"]))
    one = json.dumps(np.zeros((8, 8, 1)).tolist())
    arrays = [one.replace("0.0", form, 1) for form in (".5", "01", "+1", "1.", "1 2")]
    arrays += [one.replace("], [", "],, [", 1), "[[1, 2], [3, 4, 5], [6]]", "[]", json.dumps(np.zeros((2, 64)).tolist())]
    for text in ['{"inputs": ' + array + "}" for array in arrays] + ['{"rows": []}']:
        assert read_plain_inputs(text.encode(), spec) is None, text
