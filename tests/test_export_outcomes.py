"""Per-format export outcomes, with ordinary Keras 3 models written outside this project.

Each failure a new user met (issue 12) is recreated with our own model and now delivers every
format it can: a near-uniform conv + batch-norm classifier (int8's gate used to refuse the
whole export), a text model on integer token ids (int8 calibration fed float32 into an int32
input), a GRU with Keras 3's default `reset_after=True` (TF.js refuses it, which used to take
TFLite down with it). Real parts throughout: LiteRT, TensorFlow's interpreter for tflite-train,
Node TF.js through verify, the SQLite store, and the CLI in a subprocess for exit codes.
"""

from __future__ import annotations

import json

import httpx
import numpy as np
import pytest
from conftest import run_cli
from server_helpers.live import LiveServer

from registry import Lineage, Store
from server.schemas import ManifestOut

TFLITE = ("tflite-float32", "tflite-dynamic", "tflite-float16", "tflite-int8")


def _keras():
    from core.tensorflow import import_tensorflow

    import_tensorflow()
    import keras

    return keras


def near_uniform_cnn():
    """Random-init conv + batch norm: softmax outputs within a few hundredths of uniform, so
    quantization flips the arg-max of rows Keras itself barely separates."""
    keras = _keras()
    keras.utils.set_random_seed(0)
    return keras.Sequential([
        keras.Input((8, 8, 1)),
        keras.layers.Conv2D(8, 3, padding="same"), keras.layers.BatchNormalization(), keras.layers.ReLU(),
        keras.layers.Conv2D(8, 3, padding="same"), keras.layers.BatchNormalization(), keras.layers.ReLU(),
        keras.layers.GlobalAveragePooling2D(), keras.layers.Dense(10, activation="softmax"),
    ], name="near_uniform")


def text_model():
    keras = _keras()
    keras.utils.set_random_seed(0)
    return keras.Sequential([
        keras.Input((20,), dtype="int32"), keras.layers.Embedding(100, 8), keras.layers.GlobalAveragePooling1D(),
        keras.layers.Dense(16, activation="relu"), keras.layers.Dense(3, activation="softmax"),
    ], name="text")


def gru_model():
    keras = _keras()
    keras.utils.set_random_seed(0)
    return keras.Sequential([keras.Input((10, 4)), keras.layers.GRU(8, name="gru_reset_after"),
                             keras.layers.Dense(3, activation="softmax")], name="gru")


def export(model, x, tmp_path, formats=None, *, y=None, calibration=None, **options):
    from export.pipeline import ALL_FORMATS, ExportOptions, export_model, infer_task

    opts = ExportOptions(formats=formats or ALL_FORMATS, tfjs_backends=("cpu",), latency_repeats=2, **options)
    return export_model(model, tmp_path, task=infer_task(model, x), x_eval=x, y_eval=y,
                        calibration=x if calibration is None else calibration, options=opts, title=model.name)


def test_near_uniform_classifier_gets_every_format_int8_gated_on_confident_rows(tmp_path):
    from export.verify import quantized_classifier_gate

    model = near_uniform_cnn()
    x = np.random.default_rng(0).random((200, 8, 8, 1), dtype=np.float32)
    reference = model.predict(x, verbose=0)
    assert reference.max() < 0.3  # close to uniform over 10 classes
    result = export(model, x, tmp_path)
    outcome = result.outcome
    assert outcome["status"] == "all", outcome["refused"]
    assert outcome["delivered"] == ["tfjs-layers", *TFLITE, "tflite-train"]
    int8 = next(r for r in result.report["formats"] if r["format"] == "tflite-int8")
    assert int8["passed"] and int8["max_abs_diff"] < 0.1 and "max |Δp|" in int8["gate"]
    assert int8["agreement"] < 0.98  # what the old gate (≤ 2 points of agreement lost) refused
    # the gate still bites: a runner that moves probabilities or flips confident rows fails it
    confident = np.tile(np.eye(3)[None, 0] * 0.9 + 0.05, (50, 1)).astype(np.float32)
    flipped = confident[:, [1, 0, 2]]
    assert not quantized_classifier_gate(flipped, confident)[0]
    assert quantized_classifier_gate(confident + 0.01, confident)[0]
    # with labels, accuracy judges the probability drift: a big |Δp| that keeps accuracy passes,
    # one that costs more than 2 points fails, and confident flips still fail
    labels = np.zeros(50, dtype=int)
    drifted = confident.copy()
    drifted[0] = [0.5, 0.45, 0.05]  # |Δp| 0.45 on one row, still class 0
    assert not quantized_classifier_gate(drifted, confident)[0]
    passed, why, _ = quantized_classifier_gate(drifted, confident, labels)
    assert passed and "max |Δp| 0.450 (reported)" in why, why
    wrong = confident.copy()
    wrong[:2] = [0.45, 0.5, 0.05]  # two rows (4 points) wrong; their Keras margin was confident
    assert not quantized_classifier_gate(wrong, confident, labels)[0]
    assert not quantized_classifier_gate(flipped, confident, labels)[0]


def test_text_model_on_token_ids_every_tflite_variant_and_training_file(tmp_path):
    from export.ondevice import OnDeviceTrainer
    from export.tflite import LiteRTRunner

    model = text_model()
    x = np.random.default_rng(0).integers(0, 100, (128, 20)).astype(np.int32)
    result = export(model, x, tmp_path)
    assert result.outcome["status"] == "all", result.outcome["refused"]
    assert result.report["input_dtype"] == "int32"
    runner = LiteRTRunner(result.folders["tflite-int8"])
    assert runner.input["dtype"] == np.int32  # ids stay ids
    trainer = OnDeviceTrainer(result.folders["tflite-train"])
    assert trainer.x_dtype == np.int32
    loss = [trainer.train(x[:32], np.arange(32) % 3) for _ in range(5)]
    assert loss[-1] < loss[0]
    # int8 with int8 output: the input stays int32 ids
    io = export(model, x, tmp_path / "io", formats=("tflite-int8",), int8_io=True)
    runner = LiteRTRunner(io.folders["tflite-int8"])
    assert runner.input["dtype"] == np.int32 and runner.output["dtype"] == np.int8


def attention_gelu_model():
    """Neither TF.js kind can run it: tfjs-layers has no MultiHeadAttention, and exact GELU
    becomes an `Erfc` op TF.js has no kernel for."""
    keras = _keras()
    keras.utils.set_random_seed(0)
    inputs = keras.Input((4, 8))
    x = keras.layers.MultiHeadAttention(num_heads=2, key_dim=4, name="attention")(inputs, inputs)
    x = keras.layers.Dense(8, activation="gelu")(keras.layers.Flatten()(x))
    return keras.Model(inputs, keras.layers.Dense(3, activation="softmax")(x), name="attention_gelu")


def test_gru_refused_by_tfjs_layers_leaves_the_rest_delivered_and_strict_refuses_all(tmp_path):
    from export.tflite import LiteRTRunner

    model = gru_model()
    model.save(tmp_path / "gru.keras")
    x = np.random.default_rng(0).normal(size=(64, 10, 4)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    formats = "tfjs-layers,tflite-float32,tflite-int8"  # one refused when made, one when calibrated
    out = tmp_path / "out"
    result = run_cli("export", str(tmp_path / "gru.keras"), "--out", str(out), "--samples", str(tmp_path / "x.npy"),
                     "--formats", formats)
    assert result.returncode == 3, result.stderr
    assert "gru_reset_after" in result.stdout and "refused" in result.stdout
    report = json.loads((out / "export-report.json").read_text())
    outcome = report["outcome"]
    assert outcome["status"] == "some"
    assert outcome["requested"] == formats.split(",") and outcome["delivered"] == ["tflite-float32"]
    refused = outcome["refused"]["tfjs-layers"]
    assert refused["stage"] == "convert" and "gru_reset_after" in refused["reason"] and "GRU" in refused["reason"]
    # TF 2.19's converter segfaults calibrating Keras 3 GRUs: in a child process, that refuses int8 only
    assert "crashed" in outcome["refused"]["tflite-int8"]["reason"]
    assert sorted(p.name for p in (out / "tflite").iterdir()) == ["float32.tflite"]
    assert not (out / "tfjs").exists()
    assert np.abs(LiteRTRunner(out / "tflite" / "float32.tflite").predict(x) - model.predict(x, verbose=0)).max() < 1e-4

    # with the default formats (train, export without --formats) a TF.js graph model stands in
    result = export(model, x, tmp_path / "fallback", formats=("tfjs-layers",), tfjs_graph_fallback=True)
    assert result.outcome["requested"] == ["tfjs-layers", "tfjs-graph"]
    assert result.outcome["delivered"] == ["tfjs-graph"] and "tfjs-layers" in result.outcome["refused"]
    assert json.loads((result.folders["tfjs-graph"] / "model.json").read_text())["format"] == "graph-model"

    strict = tmp_path / "strict"
    result = run_cli("export", str(tmp_path / "gru.keras"), "--out", str(strict), "--samples", str(tmp_path / "x.npy"),
                     "--formats", formats, "--strict", "--json")
    assert result.returncode == 4, result.stderr
    assert json.loads(result.stdout)["outcome"]["status"] == "none"
    assert sorted(p.name for p in strict.iterdir()) == ["export-report.json", "export-report.md"]
    assert run_cli("export", str(tmp_path / "gru.keras"), "--out", str(tmp_path / "x2"), "--formats", "tflite-nope").returncode == 2


def test_no_format_delivered_exits_4_with_the_reasons(tmp_path):
    attention_gelu_model().save(tmp_path / "attn.keras")
    out = tmp_path / "out"
    result = run_cli("export", str(tmp_path / "attn.keras"), "--out", str(out), "--formats", "tfjs-layers,tfjs-graph")
    assert result.returncode == 4, result.stderr
    outcome = json.loads((out / "export-report.json").read_text())["outcome"]
    assert outcome["delivered"] == [] and set(outcome["refused"]) == {"tfjs-layers", "tfjs-graph"}
    assert "MultiHeadAttention" in outcome["refused"]["tfjs-layers"]["reason"]
    assert "Erfc" in outcome["refused"]["tfjs-graph"]["reason"]
    assert sorted(p.name for p in out.iterdir()) == ["export-report.json", "export-report.md"]


def test_stored_version_carries_only_verified_formats_and_says_what_was_refused(tmp_path):
    from export.pipeline import version_outcome
    from server.manifest import build_manifest

    model = gru_model()
    model.save(tmp_path / "model.keras")
    home = tmp_path / "store"
    store = Store(home)
    store.publish("gru", lineage=Lineage(source="central"), artifacts={"keras": {"model.keras": tmp_path / "model.keras"}},
                  labels=["a", "b", "c"], input_spec={"shape": [10, 4], "dtype": "float32"})
    result = run_cli("export", "gru", "--formats", "tfjs-layers,tflite-float32", home=home)
    assert result.returncode == 3, result.stderr
    record = store.get_version("gru", 1)
    assert {"keras", "tflite-float32", "export-report"} == set(record.artifacts)
    # a later export of the refused format delivers nothing: nothing attached, exit 4
    result = run_cli("export", "gru", "--formats", "tfjs-layers", home=home)
    assert result.returncode == 4 and set(store.get_version("gru", 1).artifacts) == set(record.artifacts)
    # more formats later: a second report, next to the first
    assert run_cli("export", "gru", "--formats", "tflite-dynamic", home=home).returncode == 0
    record = store.get_version("gru", 1)
    assert {"tflite-dynamic", "export-report-2"} <= set(record.artifacts)

    outcome = version_outcome(store, record)
    assert outcome["delivered"] == ["tflite-dynamic", "tflite-float32"]
    assert "gru_reset_after" in outcome["refused"]["tfjs-layers"]["reason"]
    manifest = build_manifest(record, export_outcome=outcome)
    assert manifest["export"]["refused"]["tfjs-layers"]["stage"] == "convert"
    assert build_manifest(record)["export"] == {"delivered": outcome["delivered"], "refused": None}

    shown = run_cli("models", "show", "gru", home=home)
    assert shown.returncode == 0 and "refused   tfjs-layers (convert)" in shown.stdout
    shown = json.loads(run_cli("models", "show", "gru", "--json", home=home).stdout)
    assert shown["export"]["refused"]["tfjs-layers"]["stage"] == "convert"

    # the live server's manifest says the same (the catalog reads the export reports)
    with LiveServer(home, log=tmp_path / "server.log") as server:
        served = httpx.get(f"{server.url}/v1/models/gru/versions/1/manifest", timeout=10).json()
    assert served["export"]["delivered"] == outcome["delivered"]
    assert "gru_reset_after" in served["export"]["refused"]["tfjs-layers"]["reason"]
    ManifestOut.model_validate(served)


def digits_images(x: np.ndarray, size: int, arch: str) -> np.ndarray:
    """8×8 digits in [0, 1] as a MobileNet input: nearest-neighbour repeat to size×size and 3
    channels; V2 takes [-1, 1], V3Small rescales [0, 255] itself."""
    factor = size // 8
    x = np.repeat(np.repeat(np.repeat(x, factor, axis=1), factor, axis=2), 3, axis=3)
    return x * 255 if arch == "MobileNetV3Small" else x * 2 - 1


@pytest.fixture(scope="session")
def trained_mobilenet():
    """keras.applications' MobileNetV2 (α=0.35) or MobileNetV3Small at 32×32, weights=None,
    trained 8 epochs with Adam on the digits (≈ 45 s each on 2 cores, most of it tracing; no
    pretrained weights offline): quantized formats are judged on a model that has learned
    something, not on random weights that amplify rounding. Built once per architecture."""
    cache = {}

    def get(arch: str):
        if arch not in cache:
            from training.datasets import load_dataset

            keras = _keras()
            data = load_dataset("digits")
            keras.utils.set_random_seed(0)
            kwargs = {"alpha": 0.35} if arch == "MobileNetV2" else {}
            model = getattr(keras.applications, arch)(input_shape=(32, 32, 3), weights=None, classes=10, **kwargs)
            for layer in model.layers:
                if isinstance(layer, keras.layers.BatchNormalization):
                    layer.momentum = 0.9  # moving statistics that catch up within 200 steps
            x_train = digits_images(data.x_train, 32, arch)
            steps = 8 * -(-len(x_train) // 32)
            model.compile(optimizer=keras.optimizers.Adam(keras.optimizers.schedules.CosineDecay(3e-3, steps)),
                          loss="sparse_categorical_crossentropy")
            model.fit(x_train, data.y_train, epochs=8, batch_size=32, verbose=0)
            cache[arch] = model, digits_images(data.x_test, 32, arch), data.y_test, x_train, data.y_train
        return cache[arch]

    return get


@pytest.mark.parametrize("arch", ["MobileNetV3Small"])
def test_trained_mobilenets_every_tflite_variant_keeps_keras_accuracy(tmp_path, arch, trained_mobilenet):
    """Every variant converts (int8 calibrated on training digits), runs in LiteRT on the held-out
    digits, keeps Keras' accuracy within 2 points and is delivered, int8 included. V3Small only
    (hard-swish, squeeze-excite: the harder graph) to keep the suite in budget: MobileNetV2
    (α=0.35, trained, 96×96) goes through every format, tflite-train included (made and its
    inference verified), and both gates in every run of benchmarks/export.py; the on-device training
    file of a small CNN is tested in tests/test_export.py and on a device in test_device_client.

    int8's max |Δp| is large (measured: V2 91.1% Keras, int8 90.3%, agreement 98.9%, max |Δp|
    0.42; V3Small 94.8%, 94.1%, 99.3%, 0.19): rounding accumulated over ~50 layers moves a few
    borderline rows (the quantization debugger shows no layer off by more than ~1 step; more
    calibration rows or per-tensor weights do not help). With labels the gate judges that drift
    by accuracy, so int8 is delivered with its |Δp| reported; without labels the strict bound
    refuses it (asserted below on the same outputs)."""
    from export.verify import QUANTIZED_MAX_PROB_DIFF

    model, x, y, x_train, _ = trained_mobilenet(arch)
    result = export(model, x, tmp_path, formats=TFLITE, y=y, calibration=x_train)
    outcome = result.outcome
    rows = {r["format"]: r for r in result.report["formats"]}
    assert set(rows) == set(TFLITE) and all(r["runtime"] == "LiteRT" for r in rows.values())  # all made, all ran
    keras_accuracy = result.report["keras"]["metric"]["accuracy"]
    assert keras_accuracy > 0.75  # it learned the digits (chance: 0.1)
    for fmt in TFLITE:
        assert abs(rows[fmt]["metric"]["accuracy"] - keras_accuracy) <= 0.02, (fmt, rows[fmt]["metric"])
    assert rows["tflite-float32"]["max_abs_diff"] <= 1e-4
    assert outcome["status"] == "all", outcome["refused"]
    for fmt in TFLITE:
        assert rows[fmt]["passed"] and result.folders[fmt].is_file(), rows[fmt]["gate"]
    int8 = rows["tflite-int8"]
    assert int8["confident_agreement"] >= 0.98 and "accuracy" in int8["gate"] and "(reported)" in int8["gate"]
    if int8["max_abs_diff"] > QUANTIZED_MAX_PROB_DIFF:  # the unlabelled gate on the same outputs refuses it
        from export.tflite import LiteRTRunner
        from export.verify import quantized_classifier_gate

        outputs = LiteRTRunner(result.folders["tflite-int8"]).predict(x)
        passed, why, _ = quantized_classifier_gate(outputs, model.predict(x, verbose=0))
        assert not passed and "no labels" in why, why
