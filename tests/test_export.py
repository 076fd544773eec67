"""Export: TFLite variants, on-device training, verification gates, the store and the CLI.

(The TF.js converter's layer-by-layer round trips are in test_export_tfjs.py.)"""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import cli_json, run_cli

from registry import Store
from training.datasets import load_dataset


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


@pytest.fixture(scope="module")
def digits_cnn(digits):
    from training.central import TrainSettings, fit

    model, _ = fit(digits, TrainSettings(model="cnn", epochs=8, seed=0))
    return model


def test_every_tflite_variant_runs_in_litert_and_int8_keeps_accuracy(tmp_path, digits, digits_cnn):
    from export.tflite import LiteRTRunner, write_tflite

    files = write_tflite(digits_cnn, tmp_path, calibration=digits.x_train)
    assert set(files) == {"float32", "dynamic", "float16", "int8"}
    reference = digits_cnn.predict(digits.x_test, verbose=0)
    accuracy = {}
    for variant, path in files.items():
        outputs = LiteRTRunner(path).predict(digits.x_test)
        accuracy[variant] = float((outputs.argmax(1) == digits.y_test).mean())
        if variant == "float32":
            assert np.abs(outputs - reference).max() <= 1e-5
    sizes = {v: p.stat().st_size for v, p in files.items()}
    assert sizes["int8"] < 0.4 * sizes["float32"] and sizes["float16"] < 0.6 * sizes["float32"]
    assert accuracy["float32"] - accuracy["int8"] <= 0.02
    # int8 in/out: the client quantizes with the scale and zero point stored in the file
    int8_io = write_tflite(digits_cnn, tmp_path / "io", ["int8"], calibration=digits.x_train, int8_io=True)["int8"]
    runner = LiteRTRunner(int8_io)
    assert runner.input["dtype"] == np.int8 and runner.output["dtype"] == np.int8
    assert accuracy["float32"] - float((runner.predict(digits.x_test).argmax(1) == digits.y_test).mean()) <= 0.02


def test_recurrent_and_tabular_models_convert_exactly(tmp_path):
    import keras

    from export.tflite import LiteRTRunner, write_tflite

    keras.utils.set_random_seed(0)
    inputs = keras.Input((12, 3))
    x = keras.layers.LSTM(8, return_sequences=True)(inputs)
    x = keras.layers.GRU(6)(x)
    recurrent = keras.Model(inputs, keras.layers.Dense(2)(x))
    tabular_data = load_dataset("delivery-eta")
    from training.zoo import build_model

    tabular = build_model("mlp", tabular_data)
    for model, x in ((recurrent, np.random.default_rng(0).normal(size=(16, 12, 3)).astype("float32")),
                     (tabular, tabular_data.x_test[:64])):
        path = write_tflite(model, tmp_path / model.name, ["float32"])["float32"]
        outputs = LiteRTRunner(path).predict(x)
        assert np.abs(outputs - model.predict(x, verbose=0)).max() <= 1e-4


def test_on_device_training_file(tmp_path, digits, digits_cnn):
    from export.ondevice import OnDeviceTrainer, flatten_weights, unflatten_weights, write_training_tflite

    path = write_training_tflite(digits_cnn, tmp_path / "train.tflite", task="classification", learning_rate=1e-3)
    trainer = OnDeviceTrainer(path)
    assert np.abs(trainer.infer(digits.x_test[:50]) - digits_cnn.predict(digits.x_test[:50], verbose=0)).max() <= 1e-5
    initial = trainer.get_weights()
    assert np.array_equal(initial, flatten_weights(digits_cnn.get_weights()))

    x, y = digits.x_train[:64], digits.y_train[:64]
    losses = [trainer.train(x, y) for _ in range(20)]
    assert losses[-1] < 0.7 * losses[0], losses
    trained = trainer.get_weights()
    assert not np.array_equal(trained, initial)

    trainer.save(tmp_path / "checkpoint")
    target = np.random.default_rng(1).normal(size=initial.shape).astype(np.float32)
    assert trainer.set_weights(target) == len(target)
    assert np.array_equal(trainer.get_weights(), target)
    trainer.restore(tmp_path / "checkpoint")
    assert np.array_equal(trainer.get_weights(), trained)
    # the flat vector maps back onto Keras weights: a phone's update can join a federation
    shaped = unflatten_weights(trained, digits_cnn.get_weights())
    assert [w.shape for w in shaped] == [w.shape for w in digits_cnn.get_weights()]


def test_export_version_attaches_verified_formats_and_refuses_a_failing_gate(tmp_path, digits, monkeypatch):
    from export import verify
    from export.pipeline import ExportOptions, ExportRejected, export_version
    from training.central import TrainSettings, train_and_register

    store = Store(tmp_path / "store")
    train_and_register(store, digits, TrainSettings(model="mlp", epochs=5))
    before = store.get_version("digits", 1)

    monkeypatch.setattr(verify, "FLOAT_TOLERANCE", 0.0)  # an impossible gate: float32 TFLite differs by ~1e-7
    with pytest.raises(ExportRejected, match="tflite-float32"):
        export_version(store, "digits", 1, options=ExportOptions(formats=("tflite-float32",)))
    assert store.get_version("digits", 1).artifacts.keys() == before.artifacts.keys()
    # --strict: the float gate fails, so the passing int8 is not attached either
    with pytest.raises(ExportRejected, match="strict") as rejected:
        export_version(store, "digits", 1, options=ExportOptions(formats=("tflite-float32", "tflite-int8"), strict=True))
    assert rejected.value.report["outcome"]["status"] == "none"
    assert store.get_version("digits", 1).artifacts.keys() == before.artifacts.keys()
    monkeypatch.undo()

    options = ExportOptions(formats=("tflite-float32", "tflite-int8"), tfjs_backends=("cpu",))
    record, report = export_version(store, "digits", 1, options=options)
    assert {"tflite-float32", "tflite-int8", "export-report"} <= set(record.artifacts)
    assert [f.name for f in record.artifacts["tflite-int8"]] == ["model.tflite"]
    assert report["passed"] and report["labelled"] and report["samples"] == len(digits.x_test)
    assert report["outcome"] == {"status": "all", "requested": ["tflite-float32", "tflite-int8"],
                                 "delivered": ["tflite-float32", "tflite-int8"], "refused": {}, "backend_gaps": {}, "strict": False}
    stored = json.loads(store.artifact_path("digits", 1, "export-report", "export-report.json").read_text())
    assert {row["format"] for row in stored["formats"]} == {"tflite-float32", "tflite-int8"}
    with pytest.raises(Exception, match="already has tflite-int8"):
        export_version(store, "digits", 1, options=ExportOptions(formats=("tflite-int8",)))


@pytest.mark.slow
def test_train_exports_every_format_by_default(home):
    summary = cli_json("train", "--dataset", "digits", "--epochs", "5", home=home)
    assert set(summary["artifacts"]) == {
        "keras", "report", "profile", "export-report", "tfjs-layers",
        "tflite-float32", "tflite-dynamic", "tflite-float16", "tflite-int8", "tflite-train",
    }  # (profile: the training data's reference for field monitoring, docs/monitoring.md)
    record = Store(home).get_version("digits", summary["version"])
    report = json.loads(Store(home).artifact_path("digits", record.version, "export-report", "export-report.json").read_text())
    runtimes = {row["runtime"] for row in report["formats"]}
    assert {"tfjs cpu", "tfjs wasm", "LiteRT", "TFLite+Flex"} <= runtimes
    assert report["passed"] and report["outcome"]["status"] == "all"


@pytest.mark.slow
def test_export_a_users_keras_file(tmp_path):
    import keras

    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((6,)), keras.layers.Dense(16, activation="relu"), keras.layers.Dense(3, activation="softmax")])
    model.save(tmp_path / "mine.keras")
    samples = np.random.default_rng(0).normal(size=(100, 6)).astype("float32")
    np.save(tmp_path / "x.npy", samples)
    out = tmp_path / "out"
    report = json.loads(run_cli("export", str(tmp_path / "mine.keras"), "--out", str(out), "--samples",
                                str(tmp_path / "x.npy"), "--json", check=True).stdout)
    assert report["passed"] and report["task"] == "classification" and not report["labelled"]
    assert (out / "tfjs" / "model.json").is_file() and (out / "export-report.json").is_file()
    assert {p.name for p in (out / "tflite").iterdir()} == {
        "float32.tflite", "dynamic.tflite", "float16.tflite", "int8.tflite", "train.tflite"}

    bad = run_cli("export", str(tmp_path / "mine.keras"), "--out", str(tmp_path / "o2"), "--samples", str(tmp_path / "missing.npy"))
    assert bad.returncode == 2 and "not found" in bad.stderr
    wrong = np.zeros((5, 7), np.float32)
    np.save(tmp_path / "wrong.npy", wrong)
    bad = run_cli("export", str(tmp_path / "mine.keras"), "--out", str(tmp_path / "o3"), "--samples", str(tmp_path / "wrong.npy"))
    assert bad.returncode == 2 and "expects (N, 6)" in bad.stderr


def test_unsupported_layer_refuses_tfjs_only(tmp_path):
    import keras

    inputs = keras.Input((4, 8))
    x = keras.layers.MultiHeadAttention(num_heads=2, key_dim=4, name="attention")(inputs, inputs)
    model = keras.Model(inputs, keras.layers.Flatten()(x))
    model.save(tmp_path / "attn.keras")
    out = tmp_path / "out"
    result = run_cli("export", str(tmp_path / "attn.keras"), "--out", str(out), "--formats", "tfjs-layers,tflite-float32")
    assert result.returncode == 3, result.stderr  # some formats delivered
    report = json.loads((out / "export-report.json").read_text())
    reason = report["outcome"]["refused"]["tfjs-layers"]["reason"]
    assert "attention" in reason and "MultiHeadAttention" in reason
    assert not (out / "tfjs").exists() and (out / "tflite" / "float32.tflite").is_file()
