"""`pollinate export` on ordinary Keras 3 models written the way users write them (issue 12).

Each model is built here, saved as a `.keras` file and exported by the real CLI in a
subprocess (LiteRT, Node TF.js on cpu and wasm, TensorFlow's interpreter for tflite-train).
Per model the exact set of delivered formats is asserted, and every refusal must name the
layer or op at fault; models verification cannot take (several inputs or outputs) must be
refused in one line naming them, never with a traceback. Most models export three formats
to stay quick; `layernorm_tabular` exports the full default set.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import numpy as np
import pytest
from conftest import run_cli

# the custom classes a user's training script defines; the CLI gets them through --code
USER_CODE = '''
import keras


@keras.saving.register_keras_serializable(package="zoo")
class ScaledResidual(keras.layers.Layer):
    def __init__(self, units, alpha=0.5, **kwargs):
        super().__init__(**kwargs)
        self.units, self.alpha = units, alpha

    def build(self, shape):
        self.w = self.add_weight(shape=(shape[-1], self.units), initializer="glorot_uniform", name="w")

    def call(self, x):
        return keras.ops.relu(keras.ops.matmul(x, self.w)) * self.alpha + x[..., : self.units]

    def get_config(self):
        return {**super().get_config(), "units": self.units, "alpha": self.alpha}


@keras.saving.register_keras_serializable(package="zoo")
class TinyNet(keras.Model):
    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.hidden = keras.layers.Dense(16, activation="relu")
        self.head = keras.layers.Dense(3, activation="softmax")

    def call(self, x):
        h = self.hidden(x)
        return self.head(h + 0.1 * keras.ops.tanh(h))
'''

THREE = "tfjs-layers,tflite-float32,tflite-int8"


@dataclass
class Case:
    formats: str | None  # None: the default (every format)
    delivered: set[str]
    refused: dict[str, tuple[str, ...]] = field(default_factory=dict)  # format -> words its reason must hold
    code: bool = False


def _keras(tmp_path):
    from core.tensorflow import import_tensorflow

    import_tensorflow()
    import keras

    from export.pipeline import import_user_code

    code = tmp_path / "zoo_code.py"
    code.write_text(USER_CODE)
    import_user_code(code)
    keras.utils.set_random_seed(0)
    return keras


def _user(name: str):
    import sys

    return getattr(sys.modules["pollinate_user_code_zoo_code"], name)


rng = np.random.default_rng(0)


def _tabular(d=6, n=200):
    return rng.normal(size=(n, d)).astype("float32")


def _images(h=16, w=16, c=1, n=160):
    return rng.random((n, h, w, c), dtype=np.float32)


def _classes(n, k):
    return rng.integers(0, k, n)


def subclassed(keras):
    model = _user("TinyNet")()
    x = _tabular()
    model(x[:1])
    return model, x, _classes(len(x), 3)


def layernorm_tabular(keras):
    L = keras.layers
    model = keras.Sequential([keras.Input((6,)), L.LayerNormalization(), L.Dense(16, activation="relu"), L.Dense(1)])
    x = _tabular()
    return model, x, x.sum(1, keepdims=True)


def text_conv1d_masked(keras):
    L = keras.layers
    model = keras.Sequential([keras.Input((20,), dtype="int32"), L.Embedding(50, 8, mask_zero=True),
                              L.Conv1D(8, 3, activation="relu"), L.GlobalMaxPooling1D(), L.Dense(4, activation="softmax")])
    x = rng.integers(1, 50, (200, 20)).astype("int32")
    x[:, 15:] = 0  # padding
    return model, x, _classes(200, 4)


def bilstm(keras):
    L = keras.layers
    model = keras.Sequential([keras.Input((12, 3)), L.Bidirectional(L.LSTM(8)), L.Dense(2, activation="softmax")])
    return model, rng.normal(size=(120, 12, 3)).astype("float32"), _classes(120, 2)


def dropouts(keras):
    L = keras.layers
    model = keras.Sequential([keras.Input((16, 16, 1)), L.GaussianNoise(0.1), L.Conv2D(8, 3, activation="relu"),
                              L.SpatialDropout2D(0.2), L.MaxPooling2D(), L.Flatten(), L.Dropout(0.3),
                              L.Dense(5, activation="softmax")])
    return model, _images(), _classes(160, 5)


def depthwise_separable(keras):
    L = keras.layers
    model = keras.Sequential([keras.Input((16, 16, 3)), L.Conv2D(8, 3, padding="same"),
                              L.DepthwiseConv2D(3, padding="same", activation="relu"),
                              L.SeparableConv2D(16, 3, activation="relu"), L.GlobalAveragePooling2D(),
                              L.Dense(4, activation="softmax")])
    return model, _images(c=3), _classes(160, 4)


def autoencoder(keras):
    L = keras.layers
    model = keras.Sequential([keras.Input((16, 16, 1)), L.Conv2D(8, 3, strides=2, padding="same", activation="relu"),
                              L.Conv2DTranspose(8, 3, strides=2, padding="same", activation="relu"),
                              L.Conv2D(4, 3, strides=2, padding="same"), L.UpSampling2D(2),
                              L.Conv2D(1, 3, padding="same", activation="sigmoid")])
    x = _images()
    return model, x, x


def rescale_resize(keras):
    L = keras.layers
    model = keras.Sequential([keras.Input((20, 20, 3)), L.Rescaling(1 / 255.0), L.Resizing(12, 12),
                              L.Conv2D(8, 3, activation="relu"), L.GlobalAveragePooling2D(), L.Dense(3, activation="softmax")])
    return model, _images(20, 20, 3) * 255, _classes(160, 3)


def attention(keras):
    L = keras.layers
    inputs = keras.Input((10, 8))
    query = L.Dense(8)(inputs)
    mixed = L.Add()([L.Attention()([query, inputs]), L.AdditiveAttention()([query, inputs])])
    model = keras.Model(inputs, L.Dense(3, activation="softmax")(L.GlobalAveragePooling1D()(mixed)))
    return model, rng.normal(size=(160, 10, 8)).astype("float32"), _classes(160, 3)


def custom_layer(keras):
    model = keras.Sequential([keras.Input((8,)), _user("ScaledResidual")(4, name="scaled_residual"),
                              keras.layers.Dense(2, activation="softmax")])
    return model, _tabular(8), _classes(200, 2)


def leaky_swish_softplus(keras):
    L = keras.layers
    model = keras.Sequential([keras.Input((6,)), L.Dense(16, activation="leaky_relu"), L.Dense(16, activation="swish"),
                              L.Dense(16, activation="softplus"), L.Dense(1)])
    x = _tabular()
    return model, x, x[:, :1]


def gelu_hard_sigmoid(keras):
    L = keras.layers
    model = keras.Sequential([keras.Input((6,)), L.Dense(16, activation="gelu"),
                              L.Dense(16, activation="hard_sigmoid", name="hard"), L.Dense(1)])
    x = _tabular()
    return model, x, x[:, :1]


def multilabel(keras):
    L = keras.layers
    model = keras.Sequential([keras.Input((10,)), L.Dense(16, activation="relu"), L.Dense(5, activation="sigmoid")])
    return model, _tabular(10), (rng.random((200, 5)) > 0.5).astype("float32")


def mixed_precision(keras):
    L = keras.layers
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        model = keras.Sequential([keras.Input((6,)), L.Dense(16, activation="relu", name="half"), L.Dense(3),
                                  L.Activation("softmax", dtype="float32")])
    finally:
        keras.mixed_precision.set_global_policy("float32")
    return model, _tabular(), _classes(200, 3)


CASES = {
    subclassed: Case(THREE, {"tflite-float32", "tflite-int8"}, {"tfjs-layers": ("tiny_net", "subclassed")}, code=True),
    text_conv1d_masked: Case(THREE, {"tfjs-layers", "tflite-float32", "tflite-int8"}),
    dropouts: Case(THREE, {"tfjs-layers", "tflite-float32", "tflite-int8"}),
    depthwise_separable: Case(THREE, {"tfjs-layers", "tflite-float32", "tflite-int8"}),
    autoencoder: Case("tfjs-layers,tflite-float32,tflite-float16", {"tfjs-layers", "tflite-float32", "tflite-float16"}),
    rescale_resize: Case("tfjs-layers,tfjs-graph,tflite-float32", {"tfjs-graph", "tflite-float32"},
                         {"tfjs-layers": ("'resizing'", "Resizing")}),
    attention: Case("tfjs-layers,tfjs-graph,tflite-float32", {"tfjs-graph", "tflite-float32"},
                    {"tfjs-layers": ("'attention'", "Attention")}),
    custom_layer: Case(f"{THREE},tflite-train", {"tflite-float32", "tflite-int8", "tflite-train"},
                       {"tfjs-layers": ("ScaledResidual", "no TensorFlow.js equivalent")}, code=True),
    leaky_swish_softplus: Case("tfjs-layers,tflite-float32", {"tfjs-layers", "tflite-float32"}),
    gelu_hard_sigmoid: Case("tfjs-layers,tfjs-graph,tflite-float32", {"tflite-float32"},
                            {"tfjs-layers": ("'hard'", "hard_sigmoid"), "tfjs-graph": ("Erfc",)}),
    multilabel: Case(THREE, {"tfjs-layers", "tflite-float32", "tflite-int8"}),
    mixed_precision: Case("tfjs-layers,tflite-float32", set(),
                          {"tfjs-layers": ("mixed_float16",), "tflite-float32": ("'half'", "mixed_float16", "float32 policy")}),
}
SLOW_CASES = {
    layernorm_tabular: Case(None, {"tfjs-layers", "tflite-float32", "tflite-dynamic", "tflite-float16", "tflite-int8",
                                   "tflite-train"}),
    bilstm: Case("tfjs-layers,tflite-float32,tflite-dynamic", {"tfjs-layers", "tflite-float32", "tflite-dynamic"}),
}


def _export(tmp_path, build, case: Case):
    keras = _keras(tmp_path)
    model, x, y = build(keras)
    model.compile(optimizer="adam", loss="mse")
    path = tmp_path / f"{build.__name__}.keras"
    model.save(path)
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "y.npy", y)
    args = ["export", str(path), "--samples", str(tmp_path / "x.npy"), "--labels", str(tmp_path / "y.npy"),
            "--out", str(tmp_path / "out"), "--json"]
    if case.formats:
        args += ["--formats", case.formats]
    if case.code:
        args += ["--code", str(tmp_path / "zoo_code.py")]
    return run_cli(*args)


def _check(result, case: Case) -> None:
    assert result.returncode in (0, 3, 4), result.stderr[-2000:]
    report = json.loads(result.stdout)
    outcome = report["outcome"]
    assert set(outcome["delivered"]) == case.delivered, outcome["refused"]
    assert set(outcome["refused"]) == set(case.refused), outcome["refused"]
    for fmt, words in case.refused.items():
        reason = outcome["refused"][fmt]["reason"]
        for word in words:
            assert word in reason, (fmt, reason)
    requested = case.formats.split(",") if case.formats else outcome["requested"]
    expected_code = 0 if case.delivered == set(requested) else 3 if case.delivered else 4
    assert result.returncode == expected_code


@pytest.mark.parametrize("build", list(CASES), ids=lambda f: f.__name__)
def test_zoo_model_exports(tmp_path, build):
    _check(_export(tmp_path, build, CASES[build]), CASES[build])


@pytest.mark.slow
@pytest.mark.parametrize("build", list(SLOW_CASES), ids=lambda f: f.__name__)
def test_zoo_model_exports_slow(tmp_path, build):
    _check(_export(tmp_path, build, SLOW_CASES[build]), SLOW_CASES[build])


def _two_heads(keras, tmp_path):
    L = keras.layers
    image, table = keras.Input((8, 8, 1), name="image"), keras.Input((4,), name="tabular")
    merged = L.Concatenate()([L.Flatten()(L.Conv2D(4, 3)(image)), L.Dense(8)(table)])
    multi_in = keras.Model([image, table], L.Dense(3, activation="softmax")(merged))
    inputs = keras.Input((6,))
    hidden = L.Dense(16, activation="relu")(inputs)
    multi_out = keras.Model(inputs, [L.Dense(3, activation="softmax", name="cls")(hidden), L.Dense(1, name="reg")(hidden)])
    multi_in.save(tmp_path / "multi_input.keras")
    multi_out.save(tmp_path / "multi_output.keras")
    np.save(tmp_path / "x.npy", _tabular())


def test_models_verification_cannot_take_are_refused_in_one_line(tmp_path):
    """Several inputs or outputs, or a custom class without its code: exit 2, one line naming
    what is wrong and the way out; never a traceback."""
    keras = _keras(tmp_path)
    _two_heads(keras, tmp_path)
    model = _user("TinyNet")()
    model(_tabular()[:1])
    model.save(tmp_path / "subclassed.keras")
    multi_in = run_cli("export", str(tmp_path / "multi_input.keras"), "--out", str(tmp_path / "a"))
    multi_out = run_cli("export", str(tmp_path / "multi_output.keras"), "--samples", str(tmp_path / "x.npy"),
                        "--out", str(tmp_path / "b"))
    no_code = run_cli("export", str(tmp_path / "subclassed.keras"), "--out", str(tmp_path / "c"))
    for result, words in ((multi_in, ("2 inputs (image, tabular)",)), (multi_out, ("2 outputs (cls, reg)",)),
                          (no_code, ("'TinyNet'", "--code FILE.py"))):
        assert result.returncode == 2, result.stderr[-2000:]
        assert "Traceback" not in result.stderr
        error = [line for line in result.stderr.splitlines() if line.startswith("error:")]
        assert len(error) == 1 and all(w in error[0] for w in words), result.stderr[-1000:]
        assert len(error[0]) < 400


def test_custom_layer_weight_trains_on_device(tmp_path):
    """A custom layer's own weight feeding a Relu (`relu(x @ w)`, no bias) and a bias-free
    Dense(relu): the converter used to fold the Relu away (0.43 off Keras). tflite-train's
    infer matches Keras, get_weights returns the custom weight, and train moves it."""
    from export.ondevice import OnDeviceTrainer, flatten_weights, unflatten_weights, write_training_tflite

    keras = _keras(tmp_path)
    model = keras.Sequential([keras.Input((8,)), _user("ScaledResidual")(4, name="scaled_residual"),
                              keras.layers.Dense(6, activation="relu", use_bias=False),
                              keras.layers.Dense(2, activation="softmax")])
    x, y = _tabular(8, 32), _classes(32, 2)
    trainer = OnDeviceTrainer(write_training_tflite(model, tmp_path / "train.tflite", task="classification"))
    assert np.abs(trainer.infer(x) - model.predict(x, verbose=0)).max() <= 1e-4
    flat = trainer.get_weights()
    np.testing.assert_array_equal(flat, flatten_weights(model.get_weights()))
    trainer.train(x, y)
    custom = unflatten_weights(trainer.get_weights(), model.get_weights())[0]
    assert custom.shape == (8, 4) and not np.allclose(custom, model.get_weights()[0])
    model.set_weights(unflatten_weights(trainer.get_weights(), model.get_weights()))
    assert np.abs(trainer.infer(x) - model.predict(x, verbose=0)).max() <= 1e-4
