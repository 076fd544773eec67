"""TF.js for what tfjs-layers lacks: graph models, weight-quantized formats, mobile architectures.

Every model here is checked in the real `@tensorflow/tfjs` 4.22 under Node (export/node_runner,
cpu and wasm backends) against Keras, and one graph model in real Chromium through pollinate.js
served by a real `pollinate serve`.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest

from export.node_runner import node_available

pytestmark = pytest.mark.skipif(not node_available(), reason="Node.js >= 18 is needed to run TF.js")

TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def keras():
    from core.tensorflow import import_tensorflow

    import_tensorflow()
    import keras

    return keras


def _gru(keras):
    i = keras.Input((6, 3))
    return keras.Model(i, keras.layers.Dense(2)(keras.layers.GRU(8)(i)), name="gru")  # reset_after=True: Keras 3's default


def _gru_dynamic(keras):  # no static time dimension: the GRU keeps its While loop
    i = keras.Input((None, 3))
    return keras.Model(i, keras.layers.Dense(2)(keras.layers.GRU(8)(i)), name="gru_dynamic")


def _recurrent_mix(keras):  # Bidirectional (a GRU: no LayersModel), LSTM, a backwards SimpleRNN
    i = keras.Input((9, 4))
    x = keras.layers.Bidirectional(keras.layers.GRU(6, return_sequences=True))(i)
    x = keras.layers.LSTM(5, return_sequences=True)(x)
    return keras.Model(i, keras.layers.Dense(2)(keras.layers.SimpleRNN(4, go_backwards=True)(x)), name="recurrent_mix")


def _mha(keras):
    i = keras.Input((5, 4))
    x = keras.layers.MultiHeadAttention(2, 4)(i, i)
    return keras.Model(i, keras.layers.GlobalAveragePooling1D()(x), name="mha")


def _causal(keras):
    i = keras.Input((10, 3))
    x = keras.layers.Conv1D(4, 3, padding="causal", activation="relu")(i)
    return keras.Model(i, keras.layers.Dense(3)(keras.layers.Flatten()(x)), name="causal")


BUILDERS = {"gru": _gru, "gru_dynamic": _gru_dynamic, "recurrent_mix": _recurrent_mix, "mha": _mha, "causal": _causal}
# What TF.js 4.22 cannot do on its wasm backend (the cpu backend runs them all; browsers take
# WebGL first): a recurrent layer's While/TensorList loop fails in tfjs-backend-wasm's reshape
# ("Cannot read properties of undefined (reading 'backend')"). Over a static time dimension the
# layers are converted unrolled (export.unroll: no loop), so only the dynamic GRU keeps the gap.
# (MultiHeadAttention's Einsum, which wasm lacks too, runs through web_client/lib/backend.js'
# registerMissingKernels.)
WASM_GAPS = {"gru_dynamic": "reading 'backend'"}
DYNAMIC_STEPS = 6  # the sequence length fed to a model whose time dimension is None
LOOP_OPS = {"While", "StatelessWhile", "TensorListReserve", "TensorListFromTensor", "TensorListStack"}


def _inputs(model, rows=7, seed=0, scale=1.0):
    rng = np.random.default_rng(seed)
    shape = [DYNAMIC_STEPS if d is None else d for d in model.inputs[0].shape[1:]]
    return (rng.normal(size=(rows, *shape)) * scale).astype("float32")


@pytest.fixture(scope="module")
def graph_models(keras, tmp_path_factory):
    from export.tfjs import write_tfjs_any

    keras.utils.set_random_seed(0)
    made = {}
    for name, build in BUILDERS.items():
        model = build(keras)
        started = time.perf_counter()
        written = write_tfjs_any(model, tmp_path_factory.mktemp(name) / "tfjs")
        made[name] = {"model": model, "written": written, "seconds": time.perf_counter() - started}
    return made


@pytest.mark.parametrize("name", list(BUILDERS))
def test_layers_cannot_express_it_so_a_graph_model_is_written(graph_models, name):
    from export.tfjs import graph_ops, model_kind

    written = graph_models[name]["written"]
    assert written.kind == "graph" and model_kind(written.folder) == "graph"
    assert written.files[0] == written.model_json and all(p.is_file() for p in written.files)
    assert "tfjs" in written.reason.lower() or "layer" in written.reason.lower()  # why: the refused layer
    document = json.loads(written.model_json.read_text())
    assert document["format"] == "graph-model"
    assert graph_ops(document)
    assert not [p for p in written.folder.iterdir() if p.name.startswith(".")], "no staging folder left behind"


@pytest.mark.parametrize("backend", ["cpu", "wasm"])
@pytest.mark.parametrize("name", list(BUILDERS))
def test_graph_model_matches_keras_in_tfjs(graph_models, name, backend):
    from core.errors import PollinateError
    from export.node_runner import run_tfjs

    model, written = graph_models[name]["model"], graph_models[name]["written"]
    x = _inputs(model)
    if backend == "wasm" and name in WASM_GAPS:
        with pytest.raises(PollinateError, match=WASM_GAPS[name]):
            run_tfjs(written.folder, x, backend=backend, latency_repeats=0, warmup=0)
        return
    run = run_tfjs(written.folder, x, backend=backend, latency_repeats=3, warmup=1)
    assert run.report["kind"] == "graph" and run.backend == backend
    diff = float(np.abs(run.outputs - model.predict(x, verbose=0)).max())
    print(f"{name} {backend}: max|diff| {diff:.2e}, conversion {graph_models[name]['seconds']:.2f} s")
    assert diff <= TOLERANCE


def test_static_recurrent_layers_are_unrolled_and_a_dynamic_one_keeps_its_loop(graph_models):
    from export.tfjs import graph_ops

    for name in ("gru", "recurrent_mix"):
        written = graph_models[name]["written"]
        assert not LOOP_OPS & set(graph_ops(written.model_json)), name
        assert "unrolled" in json.loads(written.model_json.read_text())["convertedBy"]
    dynamic = graph_models["gru_dynamic"]["written"].model_json
    assert "While" in graph_ops(dynamic) and "unrolled" not in json.loads(dynamic.read_text())["convertedBy"]


def test_unroll_plan_keeps_long_and_dynamic_loops_and_leaves_the_model_alone(keras):
    from export.unroll import MAX_UNROLL_STEPS, unrolled_clone

    keras.utils.set_random_seed(3)
    i = keras.Input((5, 3))
    short = keras.layers.LSTM(4, return_sequences=True, name="short")(i)
    model = keras.Model(i, keras.layers.GRU(2, name="later")(short))
    long_input = keras.Input((MAX_UNROLL_STEPS + 1, 3))
    long = keras.Model(long_input, keras.layers.GRU(2, name="long")(long_input))
    dynamic = keras.Sequential([keras.Input((None, 3)), keras.layers.SimpleRNN(2, name="dyn")])

    plain = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])
    assert unrolled_clone(plain).model is plain and not unrolled_clone(plain).kept
    unrolled = unrolled_clone(model)
    assert unrolled.layers == {"short": 5, "later": 5} and not unrolled.kept and unrolled.model is not model
    assert all(layer.unroll for layer in unrolled.model.layers[1:]) and not any(layer.unroll for layer in model.layers[1:])
    x = np.random.default_rng(0).normal(size=(3, 5, 3)).astype("float32")
    assert float(np.abs(unrolled.model.predict(x, verbose=0) - model.predict(x, verbose=0)).max()) == 0.0  # same weights
    assert unrolled_clone(model, max_steps=4).kept == {"short": "5 time steps (unrolled up to 4)",
                                                      "later": "5 time steps (unrolled up to 4)"}
    kept = unrolled_clone(long)
    assert kept.model is long and not kept.layers and f"{MAX_UNROLL_STEPS + 1} time steps" in kept.kept["long"]
    assert unrolled_clone(dynamic).kept == {"dyn": "its time dimension is not static"}


def test_unrolled_kernels_are_stored_once(keras, tmp_path):
    """A GRU(32) over 20 steps, its loop kept vs unrolled: the weights are not repeated per step."""
    from export.node_runner import run_tfjs
    from export.tfjs_graph import graph_ops, write_tfjs_graph

    keras.utils.set_random_seed(4)
    i = keras.Input((20, 8))
    model = keras.Model(i, keras.layers.Dense(3)(keras.layers.GRU(32)(i)))
    x = _inputs(model)
    expected = model.predict(x, verbose=0)
    sizes = {}
    for kind, steps in (("loop", 0), ("unrolled", 128)):
        started = time.perf_counter()
        files = write_tfjs_graph(model, tmp_path / kind, max_unroll_steps=steps)
        seconds = time.perf_counter() - started
        sizes[kind] = (files[0].stat().st_size, _size(files[1:]))
        assert bool(LOOP_OPS & set(graph_ops(files[0]))) == (kind == "loop")
        diffs = {}
        for backend in ("cpu", "wasm") if kind == "unrolled" else ("cpu",):
            diffs[backend] = float(np.abs(run_tfjs(tmp_path / kind, x, backend=backend, latency_repeats=0).outputs - expected).max())
            assert diffs[backend] <= TOLERANCE
        print(f"GRU(32) x 20 steps, {kind}: model.json {sizes[kind][0] / 1e3:.1f} kB, weights {sizes[kind][1] / 1e3:.1f} kB, "
              f"conversion {seconds:.2f} s, max|diff| {diffs}")
    assert sizes["unrolled"][1] <= sizes["loop"][1]  # identical constants share one weight
    assert sizes["unrolled"][0] < 8 * sizes["loop"][0]


def test_a_graph_model_does_not_train(graph_models):
    from core.errors import PollinateError
    from export.node_runner import tfjs_fit

    model, written = graph_models["causal"]["model"], graph_models["causal"]["written"]
    with pytest.raises(PollinateError, match="inference only"):
        tfjs_fit(written.folder, _inputs(model), np.zeros((7, 3), "float32"), loss="mse", learning_rate=0.01, steps=1)


def test_layers_model_stays_first_choice(keras, tmp_path):
    from export.node_runner import run_tfjs
    from export.tfjs import model_kind, tfjs_support, write_tfjs_any

    i = keras.Input((4,))
    model = keras.Model(i, keras.layers.Dense(3, activation="softmax")(keras.layers.Dense(8, activation="relu")(i)))
    assert tfjs_support(model) == "layers"
    written = write_tfjs_any(model, tmp_path / "l")
    assert written.kind == "layers" and written.reason is None and model_kind(written.folder) == "layers"
    forced = write_tfjs_any(model, tmp_path / "g", kind="graph")
    assert forced.kind == "graph" and model_kind(tmp_path / "g" / "model.json") == "graph"
    x = _inputs(model)
    for folder in (written.folder, forced.folder):
        assert float(np.abs(run_tfjs(folder, x, latency_repeats=0).outputs - model.predict(x, verbose=0)).max()) <= TOLERANCE


def test_an_op_tfjs_lacks_is_refused_by_name(keras, tmp_path):
    from export.tfjs import TfjsUnsupported, tfjs_support, write_tfjs_any

    i = keras.Input((4,))
    exact_gelu = keras.layers.Lambda(lambda t: keras.ops.gelu(t, approximate=False), name="exact_gelu")
    model = keras.Model(i, keras.layers.Dense(2)(exact_gelu(keras.layers.Dense(3)(i))))
    assert tfjs_support(model) == "graph"
    out = tmp_path / "tfjs"
    out.mkdir()
    (out / "keep.txt").write_text("earlier")
    with pytest.raises(TfjsUnsupported) as refused:
        write_tfjs_any(model, out)
    assert refused.value.ops == ["Erfc"]
    assert "Erfc" in str(refused.value) and "exact_gelu" in str(refused.value)  # the op, and the layer
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]


def _size(files) -> int:
    return sum(Path(p).stat().st_size for p in files)


@pytest.mark.parametrize("kind", ["layers", "graph"])
def test_weight_quantized_formats_are_smaller_and_agree(keras, tmp_path, kind):
    from export.node_runner import run_tfjs
    from export.tfjs import TFJS_FORMATS, model_kind, write_tfjs_any

    keras.utils.set_random_seed(1)
    i = keras.Input((12, 8))
    x = keras.layers.Conv1D(32, 3, padding="causal" if kind == "graph" else "same", activation="relu")(i)
    x = keras.layers.Flatten()(x)
    model = keras.Model(i, keras.layers.Dense(10, activation="softmax")(keras.layers.Dense(64, activation="relu")(x)))
    data = _inputs(model, rows=32)
    expected = model.predict(data, verbose=0)
    sizes, diffs = {}, {}
    for fmt, quantize in [("tfjs", None), *((f, q) for f, q in TFJS_FORMATS.items() if q)]:
        written = write_tfjs_any(model, tmp_path / fmt, quantize=quantize)
        assert written.kind == kind and model_kind(written.folder) == kind
        sizes[fmt] = _size(written.files[1:])
        diffs[fmt] = float(np.abs(run_tfjs(written.folder, data, latency_repeats=0).outputs - expected).max())
    print(f"{kind}: weight bytes {sizes}, max|diff| {diffs}")
    assert sizes["tfjs-float16"] < 0.55 * sizes["tfjs"] and sizes["tfjs-uint8"] < 0.3 * sizes["tfjs"]
    assert diffs["tfjs"] <= TOLERANCE
    assert diffs["tfjs-float16"] <= 5e-3 and diffs["tfjs-uint8"] <= 5e-2  # probabilities


# classifier_activation=None: compare logits (an untrained net's softmax is nearly uniform, which
# would hide differences)
MOBILE_CASES = {
    "mobilenet_v2_96": lambda k: k.applications.MobileNetV2(input_shape=(96, 96, 3), alpha=0.35, weights=None,
                                                            classifier_activation=None),
    "mobilenet_v3_small_96": lambda k: k.applications.MobileNetV3Small(input_shape=(96, 96, 3), weights=None,
                                                                       classifier_activation=None),
    "mobilenet_v2_32": lambda k: k.applications.MobileNetV2(input_shape=(32, 32, 3), alpha=0.35, weights=None, classes=10,
                                                            classifier_activation=None),
    "mobilenet_v3_small_32": lambda k: k.applications.MobileNetV3Small(input_shape=(32, 32, 3), weights=None, classes=10,
                                                                       classifier_activation=None),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(MOBILE_CASES))
def test_mobile_architectures_match_keras_in_tfjs(keras, tmp_path, name):
    from export.node_runner import run_tfjs
    from export.tfjs import write_tfjs_any

    keras.utils.set_random_seed(2)
    model = MOBILE_CASES[name](keras)
    x = np.random.default_rng(3).uniform(0, 255, size=(4, *model.inputs[0].shape[1:])).astype("float32")
    if "v2" in name:
        x = x / 127.5 - 1  # MobileNetV2 expects preprocess_input's [-1, 1]; V3 rescales inside
    # untrained, activations vanish with depth (logits ~1e-10): give every BatchNormalization the
    # statistics of real activations (one training-mode pass with momentum 0) so outputs are O(1)
    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.momentum = 0.0
    calibration = np.random.default_rng(4).uniform(0, 255, size=(64, *model.inputs[0].shape[1:])).astype("float32")
    model(calibration / 127.5 - 1 if "v2" in name else calibration, training=True)
    started = time.perf_counter()
    written = write_tfjs_any(model, tmp_path / "tfjs")
    seconds = time.perf_counter() - started
    # V2 is all layers tfjs-layers knows; V3's hard-swish (hard_silu) is not, so a graph model
    assert written.kind == ("layers" if "v2" in name else "graph")
    expected = model.predict(x, verbose=0)
    assert float(expected.std()) > 0.1  # outputs that differ per class and sample: a meaningful comparison
    for backend in ("cpu", "wasm"):
        run = run_tfjs(written.folder, x, backend=backend, latency_repeats=2, warmup=1)
        diff = float(np.abs(run.outputs - expected).max())
        print(f"{name} {written.kind} {backend}: max|diff| {diff:.2e}, {_size(written.files) / 1e6:.2f} MB, "
              f"conversion {seconds:.1f} s, latency {run.latency_ms['median']:.1f} ms, |out| max {np.abs(expected).max():.2f}")
        # relative to the outputs' scale
        assert diff <= TOLERANCE * max(1.0, float(np.abs(expected).max())), (backend, diff, float(np.abs(expected).max()))


# ---------------------------------------------------------------- a graph model in real Chromium

PAGE = """<!doctype html><html><head><script type="importmap">{"imports": {
  "@tensorflow/tfjs": "/web_client/vendor/tfjs/tf.fesm.min.js",
  "@tensorflow/tfjs-core": "/web_client/vendor/tfjs/tf.fesm.min.js",
  "@tensorflow/tfjs-backend-wasm": "/web_client/vendor/tfjs/tf-backend-wasm.fesm.min.js",
  "fs": "/web_client/app/node-builtin-stub.js", "os": "/web_client/app/node-builtin-stub.js",
  "path": "/web_client/app/node-builtin-stub.js", "perf_hooks": "/web_client/app/node-builtin-stub.js"}}
</script></head><body>graph model test</body></html>"""

CHROMIUM_PREDICT = """async ({model, backends, samples}) => {
  const { createClient } = await import('/web_client/pollinate.js');
  const client = createClient({ model, backends, wasmPaths: location.origin + '/web_client/vendor/tfjs/', checkRange: false });
  const load = await client.load();
  const outputs = [];
  for (const sample of samples) outputs.push((await client.predict(sample)).values);
  return { kind: client.modelKind, format: client.format, backend: client.backend, skipped: client.skippedBackends, load, outputs };
}"""


@pytest.mark.slow
def test_graph_model_loads_and_predicts_in_chromium_through_pollinate_js(graph_models, tmp_path):
    from registry import Lineage, Store
    from tests.server_helpers.live import LiveServer
    from tests.web_helpers.browser import chromium_context, missing_requirements

    if missing_requirements():
        pytest.skip("; ".join(missing_requirements()))
    from export.pipeline import ExportOptions, export_version

    store = Store(tmp_path / "store")
    # MHA: Einsum on wasm (our kernel); GRU: unrolled, on wasm; the dynamic GRU: not on wasm (WASM_GAPS)
    cases = ("causal", "mha", "gru", "gru_dynamic")
    samples = {}
    for name in cases:
        model, written = graph_models[name]["model"], graph_models[name]["written"]
        shape = [DYNAMIC_STEPS if d is None else int(d) for d in model.inputs[0].shape[1:]]
        spec = {"shape": shape, "dtype": "float32", "preprocessing": {}}
        if name.startswith("gru"):  # through the exporter: verification finds any wasm gap, the manifest names it
            model.save(tmp_path / f"{name}.keras")
            store.publish(name, lineage=Lineage("central"), artifacts={"keras": {"model.keras": tmp_path / f"{name}.keras"}},
                          metrics={}, input_spec=spec, labels=None)
            record, report = export_version(store, name, 1, options=ExportOptions(formats=("tfjs-graph",), latency_repeats=1))
            assert report["outcome"]["delivered"] == ["tfjs-graph"], report["outcome"]
            if name in WASM_GAPS:
                assert WASM_GAPS[name] in report["outcome"]["backend_gaps"]["tfjs-graph"]["wasm"]
            else:
                assert not report["outcome"]["backend_gaps"], report["outcome"]
        else:
            store.publish(name, lineage=Lineage("central"), artifacts={"tfjs-graph": {p.name: p for p in written.files}},
                          metrics={}, input_spec=spec, labels=None)
        store.set_channel(name, "stable", 1)
        samples[name] = _inputs(model, rows=3, seed=5)
    with LiveServer(store.home, log=tmp_path / "serve.log") as server, \
            chromium_context(tmp_path / "profile") as (context, messages):
        page = context.new_page()
        failed = []
        page.on("response", lambda r: failed.append(f"{r.status} {r.url}") if r.status >= 400 and not r.url.endswith("/favicon.ico") else None)
        page.goto(f"{server.url}/healthz")
        page.set_content(PAGE)
        for name in cases:
            model = graph_models[name]["model"]
            args = {"model": name, "samples": [s.reshape(-1).tolist() for s in samples[name]], "backends": ["wasm", "cpu"]}
            got = page.evaluate(CHROMIUM_PREDICT, args)
            assert got["kind"] == "graph" and got["format"] == "tfjs-graph", got
            # the manifest's unsupported_backends moves the dynamic GRU off wasm; the others stay on it
            assert got["backend"] == ("cpu" if name in WASM_GAPS else "wasm"), got["skipped"]
            if name in WASM_GAPS:
                assert [s["name"] for s in got["skipped"]] == ["wasm"] and WASM_GAPS[name] in got["skipped"][0]["reason"]
            diff = float(np.abs(np.asarray(got["outputs"]) - model.predict(samples[name], verbose=0)).max())
            print(f"chromium {name} on {got['backend']}: max|diff| {diff:.2e}, load {got['load']['ms']:.0f} ms")
            assert diff <= TOLERANCE
        assert not failed, failed
        assert not [m for m in messages if "Failed to load resource" not in m], messages  # 404s: checked by URL above
