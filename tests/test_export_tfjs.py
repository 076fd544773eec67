"""Keras 3 → TF.js: every supported layer family round-trips through real `@tensorflow/tfjs` in Node.

Each model is built with random weights (BatchNormalization with non-trivial moving statistics,
Normalization adapted on random data), written with `write_tfjs`, loaded and run by
`export/node/run_tfjs.mjs` (one long-lived Node process serves every request) and compared
with Keras `model(x)`. The end of the file checks that process: reused, restarted when it dies,
Node's errors carried over, and a missing Node or runner refused at once with the fix.
"""

from __future__ import annotations

import functools
import http.server
import json
import threading
from pathlib import Path

import keras
import numpy as np
import pytest

from core.errors import InvalidInput, PollinateError
from export import node_runner
from export.node_runner import ensure_node_modules, node_available, run_tfjs, tfjs_fit
from export.tfjs import UnsupportedLayer, check_tfjs_support, write_tfjs

L = keras.layers
TOL = 1e-5


@pytest.fixture(scope="module", autouse=True)
def node_modules():
    if not node_available():
        pytest.skip("Node.js >= 18 is not installed: TF.js export cannot be verified here")
    ensure_node_modules()


def _randomise(model, seed: int = 0) -> None:
    """Random weights everywhere; BN moving statistics far from (0, 1) so they matter."""
    rng = np.random.default_rng(seed)
    for layer in model.layers:
        if isinstance(layer, keras.Model):
            _randomise(layer, seed + 1)
            continue
        if isinstance(layer, L.Normalization):
            continue  # adapted statistics are the point
        for w in layer.weights:
            shape = tuple(w.shape)
            if w.name == "moving_variance":
                w.assign(rng.uniform(0.5, 2.0, size=shape).astype("float32"))
            elif w.name == "moving_mean":
                w.assign(rng.normal(0, 0.5, size=shape).astype("float32"))
            else:
                fan_in = max(1, int(np.prod(shape[:-1])) if len(shape) > 1 else 1)
                w.assign((rng.normal(0, 1, size=shape) / np.sqrt(fan_in)).astype("float32"))
            if w.constraint is not None:  # as after a training step
                w.assign(w.constraint(w.value))


def _roundtrip(model, x, out_dir: Path, *, backend: str = "cpu", quantize=None, latency_repeats: int = 3):
    files = write_tfjs(model, out_dir, quantize=quantize)
    run = run_tfjs(out_dir, x, backend=backend, latency_repeats=latency_repeats)
    expected = model(x if not isinstance(x, list) else x, training=False)
    expected = [np.asarray(e) for e in (expected if isinstance(expected, (list, tuple)) else [expected])]
    assert len(run.all_outputs) == len(expected)
    diffs = []
    for got, want in zip(run.all_outputs, expected):
        assert got.shape == want.shape, (got.shape, want.shape)
        diffs.append(float(np.max(np.abs(got - want))))
    return max(diffs), run, files, diffs


def _topology(out_dir: Path) -> dict:
    return json.loads((out_dir / "model.json").read_text())


def _layers_by_name(out_dir: Path) -> dict:
    config = _topology(out_dir)["modelTopology"]["model_config"]["config"]
    return {layer["config"]["name"]: layer for layer in config["layers"]}


# ---- layer families --------------------------------------------------------------------------


def test_dense_activations_and_merges(tmp_path):
    """Dense with every mapped activation, activation layers, merges, noise/dropout, norms."""
    rng = np.random.default_rng(1)
    inputs = L.Input((12,), name="features")
    h = L.Dense(16, name="trunk")(inputs)
    branches = [L.Dense(4, activation=a, name=f"act_{a}")(h) for a in
                ("linear", "relu", "relu6", "elu", "selu", "sigmoid", "tanh", "softmax", "log_softmax",
                 "softplus", "softsign", "swish", "silu", "mish", "gelu")]
    x = L.Concatenate(name="cat")(branches)
    a = L.Dense(8, name="a", kernel_initializer=keras.initializers.VarianceScaling(2.0, "fan_avg", "untruncated_normal"),
                bias_initializer=keras.initializers.Constant(0.1), kernel_regularizer=keras.regularizers.L2(1e-3),
                kernel_constraint=keras.constraints.MaxNorm(3.0))(x)
    b = L.Dense(8, name="b", trainable=False, kernel_initializer="lecun_normal",
                bias_regularizer=keras.regularizers.L1L2(1e-4, 1e-3), bias_constraint=keras.constraints.NonNeg())(x)
    merged = L.Concatenate()([L.Add()([a, b]), L.Multiply()([a, b]), L.Average()([a, b]),
                              L.Maximum()([a, b]), L.Minimum()([a, b])])
    y = L.Activation("tanh")(merged)
    y = L.ReLU(max_value=0.5)(L.Dense(12)(y))
    y = L.ReLU(negative_slope=0.1, name="re_lu_1")(L.Dense(12)(y))  # rewritten as LeakyReLU
    y = L.LeakyReLU(negative_slope=0.2)(y)
    y = L.ELU()(y)
    y = L.PReLU(name="prelu")(y)
    y = L.BatchNormalization(name="bn")(y)
    y = L.LayerNormalization(name="ln")(y)
    y = L.Dropout(0.5)(y)
    y = L.GaussianNoise(0.3)(y)
    y = L.GaussianDropout(0.3)(y)
    y = L.Dense(5, name="logits")(y)
    outputs = L.Softmax(name="probs")(y)
    model = keras.Model(inputs, outputs, name="dense_family")
    _randomise(model)
    x = rng.normal(size=(64, 12)).astype("float32")
    diff, run, files, _ = _roundtrip(model, x, tmp_path / "m")
    assert diff <= TOL, diff
    layers = _layers_by_name(tmp_path / "m")
    assert layers["b"]["config"]["trainable"] is False and layers["a"]["config"]["trainable"] is True
    assert layers["a"]["config"]["kernel_regularizer"] == {"class_name": "L1L2", "config": {"l1": 0.0, "l2": pytest.approx(1e-3)}}
    assert layers["b"]["config"]["kernel_initializer"]["class_name"] == "LeCunNormal"
    assert layers["re_lu_1"]["class_name"] == "LeakyReLU" and layers["re_lu_1"]["config"]["alpha"] == pytest.approx(0.1)
    assert _topology(tmp_path / "m")["modelTopology"]["model_config"]["class_name"] == "Functional"
    assert [f.name for f in files] == ["model.json", "group1-shard1of1.bin"]


def test_conv2d_family_sequential(tmp_path):
    """Sequential image model: Rescaling, padding, Conv2D, BN, depthwise, separable, pooling, up-sampling."""
    model = keras.Sequential([
        L.Input((16, 16, 3), name="image"),
        L.Rescaling(1 / 127.5, offset=-1.0),
        L.ZeroPadding2D(((1, 2), (2, 1))),
        L.Conv2D(8, 3, strides=2, activation="relu", name="conv"),
        L.BatchNormalization(name="bn"),
        L.DepthwiseConv2D(3, padding="same", depth_multiplier=2, name="dw"),
        L.SeparableConv2D(8, 3, padding="same", activation="relu", name="sep"),
        L.MaxPooling2D(2),
        L.UpSampling2D(2),
        L.AveragePooling2D(2, strides=1, padding="same"),
        L.Conv2DTranspose(4, 3, strides=2, padding="same", name="deconv"),
        L.Cropping2D(((1, 1), (2, 0))),
        L.Conv2D(6, 3, dilation_rate=2, padding="same", use_bias=False, name="dilated"),
        L.GlobalAveragePooling2D(),
        L.Dense(4, activation="softmax", name="out"),
    ], name="conv2d_family")
    _randomise(model)
    x = np.random.default_rng(2).uniform(0, 255, size=(16, 16, 16, 3)).astype("float32")
    diff, run, _, _ = _roundtrip(model, x, tmp_path / "m")
    assert diff <= TOL, diff
    assert _topology(tmp_path / "m")["modelTopology"]["model_config"]["class_name"] == "Sequential"
    assert run.backend == "cpu" and run.latency_ms["median"] > 0


def test_conv1d_pooling_reshape_family(tmp_path):
    inputs = L.Input((20, 6), name="signal")
    x = L.Conv1D(8, 3, padding="valid", dilation_rate=2, activation="relu", name="dilated")(inputs)
    x = L.SpatialDropout1D(0.2)(x)
    x = L.MaxPooling1D(2)(x)
    x = L.Conv1D(8, 3, padding="same", strides=1, name="same")(x)
    x = L.AveragePooling1D(2, strides=1)(x)
    pooled = L.Concatenate()([L.GlobalAveragePooling1D()(x), L.GlobalMaxPooling1D()(x)])
    y = L.Reshape((4, 4))(pooled)
    y = L.Permute((2, 1))(y)
    y = L.Flatten()(y)
    y = L.RepeatVector(3)(L.Dense(5)(y))
    img = L.Reshape((3, 5, 1))(y)
    z = L.GlobalMaxPooling2D()(L.Conv2D(3, 2, padding="same")(img))
    outputs = L.Dense(2, name="out")(L.Concatenate()([L.Flatten()(y), z]))
    model = keras.Model(inputs, outputs, name="conv1d_family")
    _randomise(model)
    x = np.random.default_rng(3).normal(size=(32, 20, 6)).astype("float32")
    diff, _, _, _ = _roundtrip(model, x, tmp_path / "m")
    assert diff <= TOL, diff


def test_embedding_and_recurrent_family(tmp_path):
    inputs = L.Input((12,), dtype="int32", name="tokens")
    x = L.Embedding(50, 8, name="embed")(inputs)
    x = L.LSTM(16, return_sequences=True, name="lstm")(x)
    x = L.GRU(8, reset_after=False, return_sequences=True, go_backwards=True, name="gru")(x)
    # inner layers named: an auto-name ("lstm_7") depends on what earlier tests built
    x = L.Bidirectional(L.LSTM(4, return_sequences=True, name="inner"), merge_mode="sum", name="bi_lstm")(x)
    x = L.Concatenate()([L.SimpleRNN(6, name="rnn")(x),
                         L.Bidirectional(L.GRU(3, reset_after=False, name="inner_gru"), name="bi_gru")(x)])
    outputs = L.Dense(3, activation="softmax", name="out")(x)
    model = keras.Model(inputs, outputs, name="recurrent_family")
    _randomise(model)
    x = np.random.default_rng(4).integers(0, 50, size=(32, 12)).astype("int32")
    diff, _, _, _ = _roundtrip(model, x, tmp_path / "m")
    assert diff <= TOL, diff
    names = {w["name"] for w in _topology(tmp_path / "m")["weightsManifest"][0]["weights"]}
    assert {"embed/embeddings", "lstm/kernel", "lstm/recurrent_kernel", "lstm/bias", "gru/kernel", "rnn/bias",
            "bi_lstm/forward_inner/kernel", "bi_lstm/backward_inner/bias", "bi_gru/forward_inner_gru/kernel"} <= names


def test_masked_embedding_lstm(tmp_path):
    inputs = L.Input((10,), name="tokens")
    x = L.Embedding(20, 4, mask_zero=True, name="embed")(inputs)
    x = L.LSTM(5, name="lstm")(x)
    model = keras.Model(inputs, L.Dense(2, name="out")(x))
    _randomise(model)
    tokens = np.random.default_rng(5).integers(1, 20, size=(16, 10))
    tokens[:, 7:] = 0  # trailing padding, masked out
    diff, _, _, _ = _roundtrip(model, tokens.astype("float32"), tmp_path / "m")
    assert diff <= TOL, diff


def test_normalization_and_rescaling_rewrites(tmp_path):
    """Normalization (axis -1, invert, global) and per-feature Rescaling become frozen diagonal Dense layers."""
    rng = np.random.default_rng(6)
    data = (rng.normal(size=(200, 5)) * [1, 10, 100, 0.01, 1000] + [0, 5, -50, 1, 300]).astype("float32")
    norm = L.Normalization(name="normalise")
    norm.adapt(data)
    global_norm = L.Normalization(axis=None, name="global_normalise")
    global_norm.adapt(data)
    inverse = L.Normalization(mean=[1.0, 2.0, 3.0, 4.0, 5.0], variance=[1.0, 4.0, 0.0, 9.0, 0.25], invert=True, name="denormalise")
    inputs = L.Input((5,), name="features")
    z = norm(inputs)
    x = L.Concatenate()([z, global_norm(inputs), inverse(z)])
    x = L.Rescaling(scale=np.linspace(0.5, 2.0, 15).tolist(), offset=1.5, name="per_feature")(x)
    x = L.Dense(8, activation="relu", name="dense")(x)
    standardised = L.Dense(1, name="standardised")(x)
    outputs = L.Rescaling(scale=12.5, offset=40.0, name="output")(standardised)
    model = keras.Model(inputs, [standardised, outputs], name="tabular")
    _randomise(model)
    _, _, _, diffs = _roundtrip(model, data[:64], tmp_path / "m")
    # The rescaled output is in target units (~40 here): a float32 ulp there is 4e-6, so it is
    # held to 1e-5 relative to its scale; the standardised output to 1e-5 absolute.
    assert diffs[0] <= TOL and diffs[1] <= TOL * 12.5, diffs
    layers = _layers_by_name(tmp_path / "m")
    for name in ("normalise", "normalise_scale", "global_normalise", "denormalise", "denormalise_shift", "per_feature"):
        assert layers[name]["class_name"] == "Dense" and layers[name]["config"]["trainable"] is False
    assert layers["output"]["class_name"] == "Rescaling"
    write_tfjs(model, tmp_path / "q", quantize="uint8")  # exact rewrites keep float32 statistics
    quantized = {w["name"]: "quantization" in w for w in _topology(tmp_path / "q")["weightsManifest"][0]["weights"]}
    assert not quantized["normalise/bias"] and not quantized["normalise_scale/kernel"] and quantized["dense/kernel"]


def test_wide_normalization_stays_small(tmp_path):
    """Past 64 features the rewrite uses 1x1 DepthwiseConv2D (weights O(width), not O(width²)), any rank."""
    rng = np.random.default_rng(16)
    shapes = {"table": (100,), "sequence": (7, 80), "image": (4, 4, 70)}
    inputs, outputs, samples = [], [], []
    for key, shape in shapes.items():
        data = (rng.normal(size=(64, *shape)) * rng.uniform(0.01, 5, size=shape[-1]) + rng.uniform(-500, 500, size=shape[-1])).astype("float32")
        norm = L.Normalization(name=f"norm_{key}")
        norm.adapt(data)
        x = L.Input(shape, name=key)
        inputs.append(x)
        samples.append(data[:32])
        y = L.Rescaling(scale=rng.uniform(0.5, 2, size=shape[-1]).tolist(), name=f"scale_{key}")(norm(x))
        outputs.append(L.Flatten()(y))
    model = keras.Model(inputs, outputs, name="wide")
    diff, _, _, _ = _roundtrip(model, samples, tmp_path / "m")
    assert diff <= TOL, diff
    layers = _layers_by_name(tmp_path / "m")
    assert [layers[n]["class_name"] for n in ("norm_table", "norm_table_shift", "norm_table_scale", "norm_table_restore")] == \
        ["Reshape", "DepthwiseConv2D", "DepthwiseConv2D", "Reshape"]
    assert layers["norm_image"]["class_name"] == "DepthwiseConv2D" and layers["norm_image_scale"]["config"]["trainable"] is False
    weight_bytes = sum(4 * int(np.prod(w["shape"])) for w in _topology(tmp_path / "m")["weightsManifest"][0]["weights"])
    assert weight_bytes < 8 * 1024


def test_nested_models_multi_input_output_shared_layers(tmp_path):
    """Nested Sequential/functional models are flattened; clashing names get the sub-model's prefix."""
    encoder = keras.Sequential([L.Input((6,)), L.Dense(8, activation="relu", name="dense"), L.Dense(4, name="code")], name="encoder")
    inner_in = L.Input((4,))
    head = keras.Model(inner_in, L.Dense(3, name="dense")(L.BatchNormalization(name="head_bn")(inner_in)), name="head")
    a = L.Input((6,), name="a")
    b = L.Input((6,), name="b")
    shared = L.Dense(6, activation="tanh", name="shared")
    code_a, code_b = encoder(shared(a)), encoder(shared(b))
    joined = L.Concatenate(name="join")([code_a, code_b])
    out1 = head(L.Add()([code_a, code_b]))
    out2 = L.Dense(1, name="dense")(joined)
    model = keras.Model([a, b], [out1, out2], name="nested")
    _randomise(model)
    rng = np.random.default_rng(7)
    xs = [rng.normal(size=(20, 6)).astype("float32") for _ in range(2)]
    diff, run, _, _ = _roundtrip(model, xs, tmp_path / "m")
    assert diff <= TOL, diff
    assert len(run.all_outputs) == 2
    layers = _topology(tmp_path / "m")["modelTopology"]["model_config"]["config"]["layers"]
    names = [layer["name"] for layer in layers]
    assert len(names) == len(set(names))
    assert {"dense", "head_dense", "dense_1", "shared", "code", "head_bn"} <= set(names)


# ---- backends, loading, quantization, training -----------------------------------------------------


def _conv_model():
    model = keras.Sequential([
        L.Input((8, 8, 1)), L.Conv2D(8, 3, padding="same", activation="relu"), L.BatchNormalization(),
        L.MaxPooling2D(2), L.Flatten(), L.Dense(32, activation="relu"), L.Dense(10, activation="softmax"),
    ])
    _randomise(model, seed=11)
    return model


def test_wasm_backend_gives_the_same_outputs(tmp_path):
    model = _conv_model()
    x = np.random.default_rng(8).uniform(0, 1, size=(40, 8, 8, 1)).astype("float32")
    write_tfjs(model, tmp_path / "m")
    cpu = run_tfjs(tmp_path / "m", x, backend="cpu", latency_repeats=5)
    wasm = run_tfjs(tmp_path / "m", x, backend="wasm", latency_repeats=5)
    assert wasm.backend == "wasm" and cpu.backend == "cpu" and wasm.report["wasm"]["simd"] in (True, False)
    assert float(np.max(np.abs(wasm.outputs - np.asarray(model(x))))) <= TOL
    assert float(np.max(np.abs(wasm.outputs - cpu.outputs))) <= TOL
    assert wasm.latency_ms["repeats"] == 5 and wasm.latency_ms["p90"] >= wasm.latency_ms["median"] > 0


@pytest.fixture
def http_root(tmp_path):
    root = tmp_path / "www"
    root.mkdir()
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
    handler.log_message = lambda *args: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield root, f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def test_loads_over_http(http_root):
    root, base = http_root
    model = _conv_model()
    write_tfjs(model, root / "models" / "digits")
    x = np.random.default_rng(9).uniform(0, 1, size=(10, 8, 8, 1)).astype("float32")
    run = run_tfjs(f"{base}/models/digits/model.json", x, latency_repeats=2)
    assert float(np.max(np.abs(run.outputs - np.asarray(model(x))))) <= TOL


def test_quantized_weights_load_and_stay_close(tmp_path):
    """A 1.1M-parameter MLP: float32 needs two 4 MiB shards; float16 and uint8 fit in one."""
    model = keras.Sequential([L.Input((64,)), L.Dense(1024, activation="relu"), L.Dense(1024, activation="relu"), L.Dense(10)])
    _randomise(model, seed=12)
    x = np.random.default_rng(10).normal(size=(50, 64)).astype("float32")
    expected = np.asarray(model(x))
    sizes, diffs = {}, {}
    for quantize in (None, "float16", "uint8"):
        out = tmp_path / str(quantize)
        files = write_tfjs(model, out, quantize=quantize)
        assert [f.name for f in files[1:]] == (["group1-shard1of2.bin", "group1-shard2of2.bin"] if quantize is None
                                                else ["group1-shard1of1.bin"])
        sizes[quantize] = sum(f.stat().st_size for f in files[1:])
        diffs[quantize] = float(np.max(np.abs(run_tfjs(out, x, latency_repeats=0).outputs - expected)))
    assert diffs[None] <= TOL
    assert diffs["float16"] <= 1e-2, diffs
    assert diffs["uint8"] <= 0.05 * float(np.max(np.abs(expected))), diffs
    assert sizes["float16"] <= sizes[None] / 2 + 16 and sizes["uint8"] <= sizes[None] / 4 + 16, sizes
    manifest = _topology(tmp_path / "uint8")["weightsManifest"][0]["weights"]
    assert all(w["dtype"] == "float32" and w["quantization"]["dtype"] == "uint8" for w in manifest)


def test_weight_bytes_match_the_stock_converter(tmp_path, monkeypatch):
    """Our shard writer reproduces tensorflowjs.write_weights (bytes and manifest), quantized or not."""
    # TF-DF (imported by tensorflowjs) imports IPython to greet when stdout is not a terminal.
    monkeypatch.setenv("TFDF_DISABLE_WELCOME_MESSAGE", "1")
    write_weights = pytest.importorskip("tensorflowjs.write_weights")
    from export.tfjs_weights import WeightEntry, write_shards

    rng = np.random.default_rng(13)
    entries = [WeightEntry("dense/kernel", rng.normal(size=(300, 700)).astype("float32")),
               WeightEntry("dense/bias", rng.uniform(0.1, 2, size=(700,)).astype("float32")),
               WeightEntry("bn/gamma", np.full((7,), 3.0, dtype="float32"))]
    for quantize in (None, "float16", "uint8"):
        ours, theirs = tmp_path / f"ours-{quantize}", tmp_path / f"theirs-{quantize}"
        ours.mkdir()
        theirs.mkdir()
        manifest, _ = write_shards(entries, ours, quantize_to=quantize, shard_bytes=256 * 1024)
        stock = write_weights.write_weights([[{"name": e.name, "data": e.data} for e in entries]], str(theirs),
                                            shard_size_bytes=256 * 1024, write_manifest=False,
                                            quantization_dtype_map={quantize: True} if quantize else None)
        assert json.loads(json.dumps(manifest)) == json.loads(json.dumps(stock))
        for name in manifest[0]["paths"]:
            assert (ours / name).read_bytes() == (theirs / name).read_bytes()


def test_fit_in_tfjs_lowers_the_loss(tmp_path):
    rng = np.random.default_rng(14)
    centres = rng.normal(0, 3, size=(3, 10))
    labels = rng.integers(0, 3, size=256)
    x = (centres[labels] + rng.normal(0, 1, size=(256, 10)) * 5 + 20).astype("float32")
    norm = L.Normalization(name="normalise")
    norm.adapt(x)
    model = keras.Sequential([L.Input((10,)), norm, L.Dense(16, activation="relu"), L.BatchNormalization(),
                              L.Dropout(0.1), L.Dense(3, activation="softmax")])
    write_tfjs(model, tmp_path / "m")
    losses = tfjs_fit(tmp_path / "m", x, labels.astype("float32"), loss="sparse_categorical_crossentropy",
                      optimizer="adam", learning_rate=0.05, steps=30, batch_size=64)
    assert len(losses) == 30 and all(np.isfinite(losses))
    assert np.mean(losses[-5:]) < 0.6 * np.mean(losses[:3]), losses


# ---- refusals and errors ---------------------------------------------------------------------------


def test_unsupported_layer_is_named_and_nothing_is_written(tmp_path):
    inputs = L.Input((6, 8))
    x = L.Dense(8, name="before")(inputs)
    x = L.MultiHeadAttention(num_heads=2, key_dim=4, name="attn")(x, x)
    model = keras.Model(inputs, L.Flatten()(x))
    out = tmp_path / "never"
    with pytest.raises(UnsupportedLayer, match=r"layer 'attn' \(MultiHeadAttention\) has no TensorFlow.js equivalent; supported: Dense, Conv1D") as err:
        write_tfjs(model, out)
    assert isinstance(err.value, InvalidInput) and err.value.layer_name == "attn"
    assert not out.exists()

    lam = keras.Sequential([L.Input((3,)), L.Dense(3), L.Lambda(lambda t: t * 2, name="double")])
    with pytest.raises(UnsupportedLayer, match="'double' \\(Lambda\\)"):
        check_tfjs_support(lam)
    out.mkdir()
    with pytest.raises(UnsupportedLayer):
        write_tfjs(lam, out)
    assert list(out.iterdir()) == []


@pytest.mark.parametrize("layer, pattern", [
    (lambda: L.GRU(4, name="gru"), r"'gru' \(GRU\).*reset_after=True"),
    (lambda: L.Dense(4, activation="hard_sigmoid", name="hs"), r"'hs' \(Dense\).*hard_sigmoid"),
    (lambda: L.Conv1D(4, 3, groups=2, name="grouped"), r"'grouped' \(Conv1D\).*groups=2"),
    (lambda: L.GlobalAveragePooling1D(keepdims=True, name="keep"), r"'keep'.*keepdims"),
    (lambda: L.Conv1D(4, 3, padding="causal", name="causal"), r"'causal' \(Conv1D\).*causal"),
])
def test_options_tfjs_cannot_reproduce_are_refused(layer, pattern):
    model = keras.Sequential([L.Input((5, 4)), layer()])
    with pytest.raises(UnsupportedLayer, match=pattern):
        check_tfjs_support(model)


def test_weights_breaking_their_constraint_are_refused():
    """TF.js projects weights onto their constraint when loading them; Keras only after a step."""
    model = keras.Sequential([L.Input((3,)), L.Dense(2, kernel_constraint=keras.constraints.NonNeg(), name="pos")])
    model.get_layer("pos").kernel.assign(-np.ones((3, 2), dtype="float32"))
    with pytest.raises(UnsupportedLayer, match=r"'pos' \(Dense\).*violates its constraint NonNeg"):
        check_tfjs_support(model)
    model.get_layer("pos").kernel.assign(np.ones((3, 2), dtype="float32"))
    check_tfjs_support(model)


def test_subclassed_layer_is_refused():
    class Doubling(L.Dense):
        def call(self, inputs):
            return super().call(inputs) * 2

    model = keras.Sequential([L.Input((3,)), Doubling(2, name="twice")])
    with pytest.raises(UnsupportedLayer, match=r"'twice' \(Doubling\)"):
        check_tfjs_support(model)

    inputs = L.Input((3,))
    raw = keras.Model(inputs, L.Dense(2, name="d")(inputs) * 2.0)
    with pytest.raises(UnsupportedLayer, match=r"\(keras.ops Multiply\) is a raw tensor operation"):
        check_tfjs_support(raw)

    class Custom(keras.Model):
        def __init__(self):
            super().__init__(name="custom")
            self.dense = L.Dense(2)

        def call(self, x):
            return self.dense(x)

    custom = Custom()
    custom(np.zeros((1, 3), dtype="float32"))
    with pytest.raises(InvalidInput, match="'custom' .*subclassed Keras model"):
        check_tfjs_support(custom)


def test_bad_arguments_and_node_errors_are_clear(tmp_path):
    model = keras.Sequential([L.Input((4,)), L.Dense(2)])
    with pytest.raises(InvalidInput, match="quantize"):
        write_tfjs(model, tmp_path / "q", quantize="int4")
    assert not (tmp_path / "q").exists()
    write_tfjs(model, tmp_path / "m")
    with pytest.raises(PollinateError, match="TF.js predict in Node failed: .*"):
        run_tfjs(tmp_path / "m", np.zeros((3, 7), dtype="float32"))
    with pytest.raises(PollinateError, match="no model.json"):
        run_tfjs(tmp_path / "missing", np.zeros((3, 4), dtype="float32"))


# ---- the zoo ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("zoo_name, dataset_name", [("cnn", "digits"), ("mlp", "delivery-eta")])
def test_zoo_models_round_trip(tmp_path, zoo_name, dataset_name):
    from training.datasets import load_dataset
    from training.zoo import build_model

    dataset = load_dataset(dataset_name)
    model = build_model(zoo_name, dataset)
    check_tfjs_support(model)
    x = np.asarray(dataset.x_test[:128], dtype="float32")
    diff, run, _, _ = _roundtrip(model, x, tmp_path / "m")
    assert diff <= TOL, diff
    if dataset_name == "delivery-eta":
        layers = _layers_by_name(tmp_path / "m")
        assert layers["normalise"]["class_name"] == "Dense" and layers["output"]["class_name"] == "Rescaling"
    # ...and trains in TF.js, as a browser client will. Convolution gradients on TF.js's pure-JS
    # cpu backend take ~0.3 s per sample-step here (and the wasm backend has no
    # Conv2DBackpropFilter at all), so the CNN takes a few steps on one small batch.
    if dataset_name == "digits":
        losses = tfjs_fit(tmp_path / "m", dataset.x_train[:8], dataset.y_train[:8],
                          loss="sparse_categorical_crossentropy", learning_rate=1e-2, steps=4, batch_size=8)
        assert losses[-1] < 0.8 * losses[0], losses
    else:
        losses = tfjs_fit(tmp_path / "m", dataset.x_train[:640], dataset.y_train[:640], loss="mse",
                          learning_rate=3e-3, steps=20, batch_size=64)
        assert np.mean(losses[-3:]) < 0.8 * np.mean(losses[:3]), losses


# ---- the long-lived Node verifier ------------------------------------------------------------------


def test_one_node_process_serves_every_check_and_comes_back_after_dying(tmp_path):
    model = _conv_model()
    write_tfjs(model, tmp_path / "m")
    x = np.random.default_rng(3).uniform(0, 1, size=(6, 8, 8, 1)).astype("float32")
    first = run_tfjs(tmp_path / "m", x, backend="cpu", latency_repeats=1)
    pid = node_runner.verifier().proc.pid
    for backend in ("wasm", "cpu", "wasm"):  # switching backends in one process keeps the numbers
        again = run_tfjs(tmp_path / "m", x, backend=backend, latency_repeats=1)
        assert again.backend == backend
        assert float(np.max(np.abs(again.outputs - first.outputs))) <= TOL
    assert node_runner.verifier().proc.pid == pid, "the same Node process answered every request"
    tfjs_fit(tmp_path / "m", x, np.arange(6) % 10, loss="sparse_categorical_crossentropy", learning_rate=1e-3,
             steps=1, batch_size=6)

    # an error in Node is the request's error; the process stays up for the next one
    with pytest.raises(PollinateError, match=r"TF.js predict in Node failed: .*input"):
        run_tfjs(tmp_path / "m", np.zeros((2, 7), dtype="float32"), latency_repeats=0)
    hello = node_runner.verifier().request("hello", {}, 60)
    assert hello["pid"] == pid and hello["num_tensors"] == 0, "every request freed its model, inputs and optimizer"

    node_runner.verifier().proc.kill()  # a crash: the next request starts a fresh process
    node_runner.verifier().proc.wait(timeout=10)
    rerun = run_tfjs(tmp_path / "m", x, backend="cpu", latency_repeats=0)
    assert node_runner.verifier().proc.pid != pid
    assert float(np.max(np.abs(rerun.outputs - first.outputs))) <= TOL


def test_the_packaged_bundle_runs_without_node_modules(tmp_path, monkeypatch):
    """dist/run_tfjs.mjs (what the wheel ships) alone, in a folder with no node_modules anywhere up."""
    import shutil
    import subprocess

    source = Path(node_runner.__file__).parent / "node"
    if shutil.which("npm") is not None:  # build it from this checkout's run_tfjs.mjs (esbuild: a second or two)
        subprocess.run(["npm", "run", "build", "--silent"], cwd=source, check=True, capture_output=True, timeout=300)
    elif not (source / "dist" / "run_tfjs.mjs").is_file():
        pytest.skip("npm is needed to build the runner bundle")
    folder = tmp_path / "runner"
    shutil.copytree(source / "dist", folder / "dist")
    model = _conv_model()
    write_tfjs(model, tmp_path / "m")
    x = np.random.default_rng(4).uniform(0, 1, size=(5, 8, 8, 1)).astype("float32")
    monkeypatch.setenv(node_runner.ENV_RUNNER_DIR, str(folder))
    node_runner.shutdown()
    try:
        assert node_runner.check_runner().kind == "bundle"
        for backend in ("cpu", "wasm"):
            run = run_tfjs(tmp_path / "m", x, backend=backend, latency_repeats=1)
            assert run.backend == backend and float(np.max(np.abs(run.outputs - np.asarray(model(x))))) <= TOL
    finally:
        node_runner.shutdown()


def test_missing_node_or_runner_fails_fast_naming_the_fix(tmp_path, monkeypatch):
    import time

    write_tfjs(keras.Sequential([L.Input((4,)), L.Dense(2)]), tmp_path / "m")
    node_runner.shutdown()
    empty = tmp_path / "runner"
    empty.mkdir()
    monkeypatch.setenv(node_runner.ENV_RUNNER_DIR, str(empty))
    started = time.monotonic()
    with pytest.raises(PollinateError, match=r"TF.js runner is missing.*reinstall Pollinate"):
        run_tfjs(tmp_path / "m", np.zeros((1, 4), dtype="float32"))
    (empty / "package-lock.json").write_text("{}")  # a checkout without npm ci
    with pytest.raises(PollinateError, match=r"run scripts/setup.sh"):
        node_runner.check_runner()
    monkeypatch.setenv("PATH", str(tmp_path))  # no node at all
    with pytest.raises(PollinateError, match=r"Node.js >= 18 is needed.*install Node.js 20"):
        node_runner.check_runner()
    assert time.monotonic() - started < 5, "refused at once, nothing installed"
    assert not (empty / "node_modules").exists()
