"""Keras 3 layer → tfjs-layers layer(s) (the Keras 2 JSON that `@tensorflow/tfjs` 4.22 reads).

Each translator takes a Keras 3 layer (exactly that class, not a subclass: a subclass may
override `call`) and the shapes of its inputs, and returns the TF.js class name, its config in
Keras 2 form (snake_case keys and values, which TF.js camel-cases on load; dtype as a plain
string; initializers as `{"class_name", "config"}`) and its weights under the names
tfjs-layers gives its own variables (`dense/kernel`, `dw/depthwise_kernel` where Keras 3 says
`kernel`, `lstm/kernel` where Keras says `lstm/lstm_cell/kernel`,
`bi/forward_lstm/kernel`). A rewrite may return a chain of layers (Normalization).
Configs are built key by key from what TF.js understands, never passed through wholesale: a
Keras 3 key TF.js would ignore silently (a GRU's `reset_after`, a ReLU's `threshold`) is either
translated or refused. `Refuse(reason)` is raised for a layer whose options TF.js cannot
reproduce exactly; `export.tfjs` turns it into `UnsupportedLayer` naming the layer.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from .tfjs_weights import WeightEntry


class Refuse(Exception):
    """This layer (with these options) has no exact TF.js equivalent; the message says why."""


@dataclass
class TfjsLayer:
    class_name: str
    config: dict
    weights: list[WeightEntry] = field(default_factory=list)


Shape = tuple  # a Keras shape with None for the batch dimension


# ---- shared pieces of a config ------------------------------------------------------------------

# Keras 3 activation name -> the TF.js name that computes the same function. Left out on purpose:
# hard_sigmoid (Keras 3: relu6(x + 3) / 6; TF.js: clip(0.2 x + 0.5)), hard_silu, exponential,
# and anything custom; leaky_relu becomes a layer of its own (SPLIT_ACTIVATIONS).
ACTIVATIONS = {
    "linear": "linear", "relu": "relu", "relu6": "relu6", "elu": "elu", "selu": "selu",
    "sigmoid": "sigmoid", "tanh": "tanh", "softmax": "softmax", "log_softmax": "log_softmax",
    "softplus": "softplus", "softsign": "softsign", "swish": "swish", "silu": "swish",
    "mish": "mish", "gelu": "gelu",
}

# Keras 3 initializer class -> TF.js class. Initializers only matter if a client re-initialises
# a layer; loaded weights overwrite them. An initializer TF.js lacks becomes Zeros rather than
# refusing an otherwise exact model.
_INITIALIZERS = {
    "GlorotUniform": "GlorotUniform", "GlorotNormal": "GlorotNormal", "HeNormal": "HeNormal",
    "HeUniform": "HeUniform", "LecunNormal": "LeCunNormal", "LecunUniform": "LeCunUniform",
    "Zeros": "Zeros", "Ones": "Ones", "Constant": "Constant", "RandomNormal": "RandomNormal",
    "RandomUniform": "RandomUniform", "TruncatedNormal": "TruncatedNormal",
    "VarianceScaling": "VarianceScaling", "Orthogonal": "Orthogonal",
    "OrthogonalInitializer": "Orthogonal", "Identity": "Identity", "IdentityInitializer": "Identity",
}
_INITIALIZER_KEYS = ("seed", "value", "mean", "stddev", "minval", "maxval", "scale", "mode", "distribution", "gain")
_DISTRIBUTIONS = {"truncated_normal": "truncated_normal", "untruncated_normal": "normal", "normal": "normal", "uniform": "uniform"}


def _class_and_config(spec) -> tuple[str, dict]:
    if isinstance(spec, str):
        return spec, {}
    return spec.get("class_name", ""), dict(spec.get("config") or {})


def initializer(spec) -> dict | None:
    if spec is None:
        return None
    name, conf = _class_and_config(spec)
    camel = "".join(part.capitalize() for part in name.split("_")) if "_" in name or name.islower() else name
    tfjs_name = _INITIALIZERS.get(name) or _INITIALIZERS.get(camel)
    if tfjs_name is None:
        return {"class_name": "Zeros", "config": {}}
    out = {k: conf[k] for k in _INITIALIZER_KEYS if k in conf}
    if not isinstance(out.get("seed"), int):
        out.pop("seed", None)
    if "distribution" in out:
        out["distribution"] = _DISTRIBUTIONS.get(out["distribution"], "truncated_normal")
    return {"class_name": tfjs_name, "config": out}


def regularizer(spec, what: str) -> dict | None:
    """L1 / L2 / L1L2 become TF.js's L1L2 (same penalty); others would change training: refused."""
    if spec is None:
        return None
    name, conf = _class_and_config(spec)
    name = name.lower().replace("_", "")
    if name in ("l1", "l2", "l1l2"):
        return {"class_name": "L1L2", "config": {"l1": float(conf.get("l1", 0.0) if name != "l2" else 0.0),
                                                  "l2": float(conf.get("l2", 0.0) if name != "l1" else 0.0)}}
    raise Refuse(f"{what} {spec!r} has no TF.js equivalent (TF.js has L1, L2 and L1L2)")


_CONSTRAINTS = {"MaxNorm": ("max_value", "axis"), "NonNeg": (), "UnitNorm": ("axis",),
                "MinMaxNorm": ("min_value", "max_value", "rate", "axis")}


def constraint(spec, what: str) -> dict | None:
    if spec is None:
        return None
    name, conf = _class_and_config(spec)
    if name not in _CONSTRAINTS:
        raise Refuse(f"{what} {name!r} has no TF.js equivalent (TF.js has {', '.join(_CONSTRAINTS)})")
    return {"class_name": name, "config": {k: conf[k] for k in _CONSTRAINTS[name] if k in conf}}


def activation(name) -> str:
    if not isinstance(name, str) or name not in ACTIVATIONS:
        raise Refuse(f"activation {name!r} has no exact TF.js equivalent; supported: {', '.join(ACTIVATIONS)}")
    return ACTIVATIONS[name]


def base_config(layer, name: str) -> dict:
    policy = layer.dtype_policy
    if policy.compute_dtype != "float32" or policy.variable_dtype != "float32":
        raise Refuse(f"dtype policy {policy.name!r}: TF.js computes in float32 only")
    return {"name": name, "trainable": bool(layer.trainable), "dtype": "float32"}


def value(variable) -> np.ndarray:
    import keras

    return np.asarray(keras.ops.convert_to_numpy(variable), dtype=np.float32)


def listify(value_):
    if isinstance(value_, (tuple, list)):
        return [listify(v) for v in value_]
    return value_


def _copy(conf: dict, keys: tuple[str, ...]) -> dict:
    return {k: listify(conf[k]) for k in keys if k in conf}


def _with_common(layer, name: str, conf: dict, keys: tuple[str, ...], *, initializers=(), regularizers=(), constraints=()) -> dict:
    out = base_config(layer, name)
    out.update(_copy(conf, keys))
    if "activation" in out:
        out["activation"] = activation(out["activation"])
    for key in initializers:
        out[key] = initializer(conf.get(key))
        if out[key] is None:
            del out[key]
    for key in regularizers:
        spec = conf.get(key)
        if spec is None and key == "activity_regularizer" and getattr(layer, key, None) is not None:
            import keras  # some Keras 3 layers (Dense) leave it out of their config

            spec = keras.regularizers.serialize(layer.activity_regularizer)
        out[key] = regularizer(spec, key)
    for key in constraints:
        out[key] = constraint(conf.get(key), key)
    return out


def _weights(layer, name: str, pairs: list[tuple[str, object]]) -> list[WeightEntry]:
    """(tfjs short name, Keras variable) pairs -> entries; refuses if the layer holds others."""
    present = [(short, var) for short, var in pairs if var is not None]
    if len(present) != len(layer.weights):
        raise Refuse(f"it holds {len(layer.weights)} weights where {len(present)} were expected")
    entries = []
    for short, var in present:
        data = value(var)
        _check_constraint(var, data, short)
        entries.append(WeightEntry(f"{name}/{short}", data))
    return entries


def _check_constraint(variable, data: np.ndarray, short: str) -> None:
    """TF.js applies a weight's constraint when it *loads* the weight (Keras only after updates).

    A trained model's weights already satisfy their constraints, so that projection changes
    nothing; weights set by hand may not, and TF.js would then compute something else.
    """
    import keras

    rule = getattr(variable, "constraint", None)
    if rule is None:
        return
    projected = np.asarray(keras.ops.convert_to_numpy(rule(keras.ops.convert_to_tensor(data))), dtype=np.float32)
    if not np.allclose(projected, data, rtol=1e-5, atol=1e-6):
        raise Refuse(f"its {short} violates its constraint {type(rule).__name__}, and TF.js enforces constraints when it "
                     "loads weights, so the exported model would differ; apply the constraint to the weights (as "
                     "training does) or remove it")


def _refuse_quantized(layer) -> None:
    if getattr(layer, "quantization_mode", None) or getattr(layer, "lora_enabled", False):
        raise Refuse("a quantized or LoRA-enabled layer has no TF.js equivalent; export the float model")


# ---- translators -----------------------------------------------------------------------------------


def input_layer(layer, name: str) -> TfjsLayer:
    if getattr(layer, "sparse", False) or getattr(layer, "ragged", False):
        raise Refuse("sparse and ragged inputs have no TF.js equivalent")
    dtype = str(layer.dtype)
    if dtype.startswith(("int", "uint")):
        dtype = "int32"
    elif dtype.startswith(("float", "bfloat")):
        dtype = "float32"
    elif dtype != "bool":
        raise Refuse(f"input dtype {dtype!r} has no TF.js equivalent")
    return TfjsLayer("InputLayer", {"batch_input_shape": list(layer.batch_shape), "dtype": dtype, "sparse": False, "name": name})


_W = ("kernel_initializer", "bias_initializer")
_R = ("kernel_regularizer", "bias_regularizer", "activity_regularizer")
_C = ("kernel_constraint", "bias_constraint")


def dense(layer, name, conf, shapes) -> TfjsLayer:
    _refuse_quantized(layer)
    cfg = _with_common(layer, name, conf, ("units", "activation", "use_bias"), initializers=_W, regularizers=_R, constraints=_C)
    return TfjsLayer("Dense", cfg, _weights(layer, name, [("kernel", layer.kernel), ("bias", layer.bias)]))


def conv(layer, name, conf, shapes) -> TfjsLayer:
    if conf.get("groups", 1) != 1:
        raise Refuse(f"groups={conf['groups']} (grouped convolution) has no TF.js equivalent")
    if conf.get("padding") == "causal":
        raise Refuse("padding='causal' is not implemented by TF.js's conv1d; pad explicitly and use padding='valid'")
    keys = ("filters", "kernel_size", "strides", "padding", "data_format", "dilation_rate", "activation", "use_bias")
    cfg = _with_common(layer, name, conf, keys, initializers=_W, regularizers=_R, constraints=_C)
    return TfjsLayer(type(layer).__name__, cfg, _weights(layer, name, [("kernel", layer.kernel), ("bias", layer.bias)]))


def conv_transpose(layer, name, conf, shapes) -> TfjsLayer:
    if conf.get("output_padding") is not None:
        raise Refuse("output_padding has no TF.js equivalent")
    if tuple(conf.get("dilation_rate", (1, 1))) != (1, 1):
        raise Refuse("a dilated transposed convolution has no TF.js equivalent")
    keys = ("filters", "kernel_size", "strides", "padding", "data_format", "activation", "use_bias")
    cfg = _with_common(layer, name, conf, keys, initializers=_W, regularizers=_R, constraints=_C)
    return TfjsLayer("Conv2DTranspose", cfg, _weights(layer, name, [("kernel", layer.kernel), ("bias", layer.bias)]))


def depthwise_conv(layer, name, conf, shapes) -> TfjsLayer:
    keys = ("kernel_size", "strides", "padding", "data_format", "dilation_rate", "depth_multiplier", "activation", "use_bias")
    cfg = _with_common(layer, name, conf, keys, initializers=("depthwise_initializer", "bias_initializer"),
                       regularizers=("depthwise_regularizer", "bias_regularizer", "activity_regularizer"),
                       constraints=("depthwise_constraint", "bias_constraint"))
    # Keras 3 names the variable "kernel"; tfjs-layers looks for "depthwise_kernel".
    return TfjsLayer("DepthwiseConv2D", cfg, _weights(layer, name, [("depthwise_kernel", layer.kernel), ("bias", layer.bias)]))


def separable_conv(layer, name, conf, shapes) -> TfjsLayer:
    keys = ("filters", "kernel_size", "strides", "padding", "data_format", "dilation_rate", "depth_multiplier", "activation", "use_bias")
    cfg = _with_common(layer, name, conf, keys,
                       initializers=("depthwise_initializer", "pointwise_initializer", "bias_initializer"),
                       regularizers=("depthwise_regularizer", "pointwise_regularizer", "bias_regularizer", "activity_regularizer"),
                       constraints=("depthwise_constraint", "pointwise_constraint", "bias_constraint"))
    pairs = [("depthwise_kernel", layer.depthwise_kernel), ("pointwise_kernel", layer.pointwise_kernel), ("bias", layer.bias)]
    return TfjsLayer("SeparableConv2D", cfg, _weights(layer, name, pairs))


def pooling(layer, name, conf, shapes) -> TfjsLayer:
    cfg = _with_common(layer, name, conf, ("pool_size", "strides", "padding", "data_format"))
    return TfjsLayer(type(layer).__name__, cfg)


def global_pooling(layer, name, conf, shapes) -> TfjsLayer:
    if conf.get("keepdims"):
        raise Refuse("keepdims=True has no TF.js equivalent; add a Reshape after the pooling instead")
    return TfjsLayer(type(layer).__name__, _with_common(layer, name, conf, ("data_format",)))


def batch_norm(layer, name, conf, shapes) -> TfjsLayer:
    if conf.get("renorm"):
        raise Refuse("batch renormalization (renorm=True) has no TF.js equivalent")
    axis = conf.get("axis", -1)
    if isinstance(axis, (list, tuple)):
        if len(axis) != 1:
            raise Refuse(f"normalising over several axes {axis} has no TF.js equivalent")
        axis = axis[0]
    cfg = _with_common(layer, name, conf, ("momentum", "epsilon", "center", "scale"),
                       initializers=("beta_initializer", "gamma_initializer", "moving_mean_initializer", "moving_variance_initializer"),
                       regularizers=("beta_regularizer", "gamma_regularizer"),
                       constraints=("beta_constraint", "gamma_constraint"))
    cfg["axis"] = int(axis)
    pairs = [("gamma", layer.gamma), ("beta", layer.beta), ("moving_mean", layer.moving_mean), ("moving_variance", layer.moving_variance)]
    return TfjsLayer("BatchNormalization", cfg, _weights(layer, name, pairs))


def layer_norm(layer, name, conf, shapes) -> TfjsLayer:
    if conf.get("rms_scaling"):
        raise Refuse("rms_scaling=True has no TF.js equivalent")
    cfg = _with_common(layer, name, conf, ("axis", "epsilon", "center", "scale"),
                       initializers=("beta_initializer", "gamma_initializer"),
                       regularizers=("beta_regularizer", "gamma_regularizer"),
                       constraints=("beta_constraint", "gamma_constraint"))
    return TfjsLayer("LayerNormalization", cfg, _weights(layer, name, [("gamma", layer.gamma), ("beta", layer.beta)]))


def dropout(layer, name, conf, shapes) -> TfjsLayer:
    keys = ("rate", "noise_shape", "seed") if type(layer).__name__ == "Dropout" else ("rate", "seed")
    cfg = _with_common(layer, name, conf, keys)
    if not isinstance(cfg.get("seed"), int):
        cfg.pop("seed", None)
    return TfjsLayer(type(layer).__name__, cfg)


def noise(layer, name, conf, shapes) -> TfjsLayer:
    keys = ("stddev",) if type(layer).__name__ == "GaussianNoise" else ("rate",)
    return TfjsLayer(type(layer).__name__, _with_common(layer, name, conf, keys))


def simple(keys: tuple[str, ...] = ()) -> Callable:
    def translate(layer, name, conf, shapes) -> TfjsLayer:
        return TfjsLayer(type(layer).__name__, _with_common(layer, name, conf, keys))

    return translate


def flatten(layer, name, conf, shapes) -> TfjsLayer:
    if len(shapes) == 1 and len(shapes[0]) == 2 and shapes[0][1] is not None:
        # Keras 3 lets Flatten pass a (batch, features) input through; TF.js demands rank >= 3.
        return TfjsLayer("Reshape", {**base_config(layer, name), "target_shape": [int(shapes[0][1])]})
    return TfjsLayer("Flatten", _with_common(layer, name, conf, ("data_format",)))


def embedding(layer, name, conf, shapes) -> TfjsLayer:
    _refuse_quantized(layer)
    cfg = _with_common(layer, name, conf, ("input_dim", "output_dim", "mask_zero"),
                       initializers=("embeddings_initializer",),
                       regularizers=("embeddings_regularizer", "activity_regularizer"),
                       constraints=("embeddings_constraint",))
    return TfjsLayer("Embedding", cfg, _weights(layer, name, [("embeddings", layer.embeddings)]))


def recurrent(layer, name, conf, shapes) -> TfjsLayer:
    kind = type(layer).__name__
    if kind == "GRU" and conf.get("reset_after", True):
        raise Refuse("reset_after=True (the Keras 3 default) is not implemented by TF.js's GRU and has no "
                     "exact rewrite; build the layer as GRU(..., reset_after=False)")
    if conf.get("stateful"):
        raise Refuse("stateful=True is not exported (a browser model starts every call from zero state)")
    keys = ["units", "activation", "use_bias", "dropout", "recurrent_dropout", "return_sequences", "return_state",
            "go_backwards", "unroll"]
    if kind != "SimpleRNN":
        keys.append("recurrent_activation")
    if kind == "LSTM":
        keys.append("unit_forget_bias")
    cfg = _with_common(layer, name, conf, tuple(keys),
                       initializers=("kernel_initializer", "recurrent_initializer", "bias_initializer"),
                       regularizers=("kernel_regularizer", "recurrent_regularizer", "bias_regularizer", "activity_regularizer"),
                       constraints=("kernel_constraint", "recurrent_constraint", "bias_constraint"))
    if "recurrent_activation" in cfg:
        cfg["recurrent_activation"] = activation(cfg["recurrent_activation"])
    if kind == "GRU":
        cfg["reset_after"] = False
    # tfjs-layers names the cell's variables after the RNN layer (lstm/kernel); the stock converter
    # writes Keras' lstm/lstm_cell/kernel and relies on a fallback in LayersModel.loadWeights that
    # drops the cell segment. We write the name TF.js itself uses.
    cell = layer.cell
    pairs = [("kernel", cell.kernel), ("recurrent_kernel", cell.recurrent_kernel), ("bias", cell.bias)]
    return TfjsLayer(kind, cfg, _weights(layer, name, pairs))


def bidirectional(layer, name, conf, shapes) -> TfjsLayer:
    """Bidirectional(LSTM|GRU|SimpleRNN): TF.js rebuilds the backward copy from the forward config."""
    import keras

    forward, backward = layer.forward_layer, layer.backward_layer
    kind = type(forward).__name__
    if kind not in ("LSTM", "GRU", "SimpleRNN") or type(forward) is not getattr(keras.layers, kind):
        raise Refuse(f"it wraps {kind}; TF.js export supports Bidirectional LSTM, GRU and SimpleRNN")
    f_conf, b_conf = forward.get_config(), backward.get_config()
    if f_conf.get("return_state"):
        raise Refuse("return_state=True inside Bidirectional is not exported")
    same = {k: v for k, v in f_conf.items() if k not in ("name", "go_backwards")} == \
           {k: v for k, v in b_conf.items() if k not in ("name", "go_backwards")}
    if not same or type(backward) is not type(forward) or bool(b_conf.get("go_backwards")) == bool(f_conf.get("go_backwards")):
        raise Refuse("a custom backward_layer differs from the forward one; TF.js builds the backward layer as a mirror")
    inner_name = forward.name.removeprefix("forward_")
    inner = recurrent(forward, inner_name, f_conf, shapes)
    cfg = {**base_config(layer, name), "layer": {"class_name": inner.class_name, "config": inner.config},
           "merge_mode": conf.get("merge_mode")}
    weights = []
    for direction, sub in (("forward", forward), ("backward", backward)):
        cell = sub.cell
        pairs = [("kernel", cell.kernel), ("recurrent_kernel", cell.recurrent_kernel), ("bias", cell.bias)]
        for short, var in pairs:
            if var is not None:
                data = value(var)
                _check_constraint(var, data, f"{direction} {short}")
                weights.append(WeightEntry(f"{name}/{direction}_{inner_name}/{short}", data))
    if len(weights) != len(layer.weights):
        raise Refuse(f"it holds {len(layer.weights)} weights where {len(weights)} were expected")
    return TfjsLayer("Bidirectional", cfg, weights)


def relu(layer, name, conf, shapes) -> TfjsLayer:
    slope = float(conf.get("negative_slope") or 0.0)
    threshold = float(conf.get("threshold") or 0.0)
    max_value = conf.get("max_value")
    if threshold != 0.0:
        raise Refuse("ReLU(threshold≠0) has no TF.js equivalent")
    if slope == 0.0:
        cfg = base_config(layer, name)
        cfg["max_value"] = None if max_value is None else float(max_value)
        return TfjsLayer("ReLU", cfg)
    if max_value is None:
        return TfjsLayer("LeakyReLU", {**base_config(layer, name), "alpha": slope})
    raise Refuse("ReLU with both negative_slope and max_value has no TF.js equivalent")


def leaky_relu(layer, name, conf, shapes) -> TfjsLayer:
    # Keras 3 renamed alpha to negative_slope; TF.js still reads alpha (and would silently use 0.3).
    return TfjsLayer("LeakyReLU", {**base_config(layer, name), "alpha": float(conf.get("negative_slope", 0.3))})


def elu(layer, name, conf, shapes) -> TfjsLayer:
    if float(conf.get("alpha", 1.0)) != 1.0:
        raise Refuse("ELU(alpha≠1) is not implemented by TF.js")
    return TfjsLayer("ELU", {**base_config(layer, name), "alpha": 1.0})


def prelu(layer, name, conf, shapes) -> TfjsLayer:
    cfg = _with_common(layer, name, conf, ("shared_axes",), initializers=("alpha_initializer",),
                       regularizers=("alpha_regularizer",), constraints=("alpha_constraint",))
    return TfjsLayer("PReLU", cfg, _weights(layer, name, [("alpha", layer.alpha)]))


def softmax(layer, name, conf, shapes) -> TfjsLayer:
    axis = conf.get("axis", -1)
    if isinstance(axis, (list, tuple)):
        if len(axis) != 1:
            raise Refuse(f"softmax over several axes {axis} has no TF.js equivalent")
        axis = axis[0]
    return TfjsLayer("Softmax", {**base_config(layer, name), "axis": int(axis)})


def activation_layer(layer, name, conf, shapes) -> TfjsLayer:
    if conf.get("activation") in SPLIT_ACTIVATIONS:
        return SPLIT_ACTIVATIONS[conf["activation"]](layer, name)
    return TfjsLayer("Activation", {**base_config(layer, name), "activation": activation(conf.get("activation"))})


# Activation names TF.js has no activation function for but a layer that computes the same:
# `activation="leaky_relu"` is Keras 3's `leaky_relu(x, negative_slope=0.2)`, TF.js's
# LeakyReLU layer with alpha 0.2 (its activation list has no leaky_relu).
SPLIT_ACTIVATIONS: dict[str, Callable] = {
    "leaky_relu": lambda layer, name: TfjsLayer("LeakyReLU", {**base_config(layer, name), "alpha": 0.2}),
}


def split_activation(translate: Callable) -> Callable:
    """A layer with `activation=` one of SPLIT_ACTIVATIONS → the layer with a linear activation,
    then the activation as its own TF.js layer (`<name>_activation`): the same two steps Keras
    runs inside the layer's call."""

    def translated(layer, name, conf, shapes):
        act = conf.get("activation")
        if act not in SPLIT_ACTIVATIONS:
            return translate(layer, name, conf, shapes)
        main = translate(layer, name, {**conf, "activation": "linear"}, shapes)
        return [*(main if isinstance(main, list) else [main]), SPLIT_ACTIVATIONS[act](layer, f"{name}_activation")]

    return translated


def spatial_dropout(layer, name, conf, shapes) -> TfjsLayer:
    """SpatialDropout2D/3D (no TF.js class) is a Dropout whose noise covers whole feature maps:
    TF.js's Dropout with `noise_shape` [batch, 1, …, channels] drops the same maps (and, like
    every dropout, is the identity at inference)."""
    rank = len(shapes[0])
    ones = [1] * (rank - 2)
    noise_shape = [None, *ones, shapes[0][-1]] if conf.get("data_format", "channels_last") == "channels_last" \
        else [None, shapes[0][1], *ones]
    cfg = {**_with_common(layer, name, conf, ("rate",)), "noise_shape": noise_shape}
    if isinstance(conf.get("seed"), int):
        cfg["seed"] = conf["seed"]
    return TfjsLayer("Dropout", cfg)


def upsampling(layer, name, conf, shapes) -> TfjsLayer:
    if conf.get("interpolation", "nearest") != "nearest":
        raise Refuse(f"interpolation={conf['interpolation']!r}: TF.js resizes differently from Keras; use 'nearest'")
    return TfjsLayer("UpSampling2D", _with_common(layer, name, conf, ("size", "data_format", "interpolation")))


# Widths up to this get a diagonal Dense (simple, any rank); wider inputs a 1x1 DepthwiseConv2D,
# whose weights grow with the width instead of its square (1,000 one-hot features: 8 KB, not 4 MB).
DENSE_AFFINE_MAX_WIDTH = 64


def _frozen(layer, name: str) -> dict:
    return {**base_config(layer, name), "trainable": False}


def _affine_dense(layer, name: str, scale: np.ndarray, offset: np.ndarray, width: int) -> TfjsLayer:
    """x * scale + offset on the last axis as a frozen Dense with kernel diag(scale).

    x @ diag(scale) is exact apart from the one rounding of each x_i * scale_i (the other terms
    are exact zeros), so with the bias added after it this is Keras' x * scale + offset.
    """
    cfg = {**_frozen(layer, name), "units": width, "activation": "linear", "use_bias": True,
           "kernel_initializer": {"class_name": "Zeros", "config": {}}, "bias_initializer": {"class_name": "Zeros", "config": {}}}
    weights = [WeightEntry(f"{name}/kernel", np.diag(scale).astype(np.float32), quantizable=False),
               WeightEntry(f"{name}/bias", offset, quantizable=False)]
    return TfjsLayer("Dense", cfg, weights)


def _affine_depthwise(layer, name: str, scale: np.ndarray, offset: np.ndarray, width: int) -> TfjsLayer:
    """x * scale + offset per channel as a frozen 1x1 DepthwiseConv2D (rank-4 input)."""
    cfg = {**_frozen(layer, name), "kernel_size": [1, 1], "strides": [1, 1], "padding": "valid",
           "data_format": "channels_last", "dilation_rate": [1, 1], "depth_multiplier": 1, "activation": "linear",
           "use_bias": True, "depthwise_initializer": {"class_name": "Zeros", "config": {}},
           "bias_initializer": {"class_name": "Zeros", "config": {}}}
    weights = [WeightEntry(f"{name}/depthwise_kernel", scale.reshape(1, 1, width, 1), quantizable=False),
               WeightEntry(f"{name}/bias", offset, quantizable=False)]
    return TfjsLayer("DepthwiseConv2D", cfg, weights)


def _reshape(layer, name: str, target: list) -> TfjsLayer:
    return TfjsLayer("Reshape", {**_frozen(layer, name), "target_shape": target})


def affine_chain(layer, name: str, steps: list[tuple[object, object]], shape: Shape, kinds: list[str]) -> list[TfjsLayer]:
    """Per-last-axis `x * scale + offset` steps (in order) as frozen, never-quantized TF.js layers.

    Each step rounds exactly where Keras rounds (one multiply, then one add), so the chain
    computes what the Keras layer computes. Narrow inputs use diagonal Dense layers; wide ones
    1x1 DepthwiseConv2D layers, reshaping to rank 4 and back when the input is not rank 4.
    The first TF.js layer is named `name` (the Keras name); the others `name_<kind>` (one
    kind per step, e.g. "shift", "scale") and `name_restore` for the final reshape.
    """
    width = int(shape[-1])
    vectors = [(np.broadcast_to(np.asarray(a, dtype=np.float32), (width,)).copy(),
                np.broadcast_to(np.asarray(b, dtype=np.float32), (width,)).copy()) for a, b in steps]
    inner = list(shape[1:-1])
    if width <= DENSE_AFFINE_MAX_WIDTH or len(shape) == 4 or sum(d is None for d in inner) > 1:
        make = _affine_depthwise if width > DENSE_AFFINE_MAX_WIDTH and len(shape) == 4 else _affine_dense
        names = [name] + [f"{name}_{kind}" for kind in kinds[1:]]
        return [make(layer, n, a, b, width) for n, (a, b) in zip(names, vectors)]
    rows = -1 if None in inner else int(np.prod(inner, dtype=np.int64)) if inner else 1
    chain = [_reshape(layer, name, [rows, 1, width])]
    chain += [_affine_depthwise(layer, f"{name}_{kind}", a, b, width) for kind, (a, b) in zip(kinds, vectors)]
    chain.append(_reshape(layer, f"{name}_restore", [-1 if d is None else int(d) for d in inner] + [width]))
    return chain


def _per_last_axis(array, width: int | None, what: str) -> np.ndarray:
    """`array` as a vector over the last axis (or a scalar); refuses any other broadcast."""
    a = np.asarray(array, dtype=np.float32)
    if a.ndim == 0 or a.size == 1:
        return a.reshape(())
    if any(d != 1 for d in a.shape[:-1]) or (width is not None and a.shape[-1] != width):
        raise Refuse(f"{what} of shape {a.shape} varies along an axis other than the last; TF.js has no exact equivalent")
    return a.reshape(-1)


def _last_dim(shapes: list[Shape]) -> int:
    if len(shapes) != 1 or not shapes[0] or len(shapes[0]) < 2 or shapes[0][-1] is None:
        raise Refuse("the last axis of its input must have a fixed size")
    return int(shapes[0][-1])


def normalization(layer, name, conf, shapes) -> list[TfjsLayer]:
    """Keras 3 `Normalization` (TF.js has none) → frozen per-feature affine layers, Keras' order kept.

    Keras computes `(x - mean) / s` with `s = max(sqrt(variance), keras.backend.epsilon())`.
    A single affine map `x * (1/s) - mean/s` would subtract two large, nearly equal numbers
    when |mean| >> s (a latitude, a year, a price), losing digits Keras keeps. So the rewrite
    keeps Keras' order of operations: a shift (`x * 1 - mean`, the exact same subtraction),
    then a scale (`* (1/s)`); `invert=True` (`mean + x * s`) becomes a scale then a shift.
    Each step is a diagonal `Dense` (or, for inputs wider than DENSE_AFFINE_MAX_WIDTH, a 1x1
    `DepthwiseConv2D`; see `affine_chain`), written `trainable: false` so training in the
    browser cannot disturb the statistics, and never quantized (per-feature scales span orders
    of magnitude). Statistics per last-axis feature (axis=-1, the default) or global ones
    (axis=None) have this form; any other axis is refused.
    """
    import keras

    width = _last_dim(shapes)
    if layer.mean is None or layer.variance is None:
        raise Refuse("it is not built/adapted (no mean and variance yet)")
    mean = _per_last_axis(keras.ops.convert_to_numpy(layer.mean), width, "the mean")
    variance = _per_last_axis(keras.ops.convert_to_numpy(layer.variance), width, "the variance")
    s = np.maximum(np.sqrt(variance), np.float32(keras.backend.epsilon())).astype(np.float32)
    if layer.invert:
        return affine_chain(layer, name, [(s, 0.0), (1.0, mean)], shapes[0], ["scale", "shift"])
    return affine_chain(layer, name, [(1.0, -mean), (np.float32(1.0) / s, 0.0)], shapes[0], ["shift", "scale"])


def rescaling(layer, name, conf, shapes) -> TfjsLayer | list[TfjsLayer]:
    """Scalar scale/offset → TF.js `Rescaling`; per-feature (last-axis) arrays → a frozen affine layer."""
    scale = np.asarray(layer.scale, dtype=np.float32)
    offset = np.asarray(layer.offset, dtype=np.float32)
    if scale.size == 1 and offset.size == 1:
        return TfjsLayer("Rescaling", {**base_config(layer, name), "scale": float(scale.reshape(())), "offset": float(offset.reshape(()))})
    width = _last_dim(shapes)
    steps = [(_per_last_axis(scale, width, "the scale"), _per_last_axis(offset, width, "the offset"))]
    return affine_chain(layer, name, steps, shapes[0], ["affine"])


# Keras 3 class name -> translator. Exact classes only (see module docstring).
TRANSLATORS: dict[str, Callable] = {
    "Dense": split_activation(dense),
    "Conv1D": split_activation(conv), "Conv2D": split_activation(conv),
    "Conv2DTranspose": split_activation(conv_transpose),
    "DepthwiseConv2D": split_activation(depthwise_conv), "SeparableConv2D": split_activation(separable_conv),
    "MaxPooling1D": pooling, "MaxPooling2D": pooling, "AveragePooling1D": pooling, "AveragePooling2D": pooling,
    "GlobalAveragePooling1D": global_pooling, "GlobalAveragePooling2D": global_pooling,
    "GlobalMaxPooling1D": global_pooling, "GlobalMaxPooling2D": global_pooling,
    "BatchNormalization": batch_norm, "LayerNormalization": layer_norm,
    "Dropout": dropout, "SpatialDropout1D": dropout, "SpatialDropout2D": spatial_dropout,
    "SpatialDropout3D": spatial_dropout, "GaussianNoise": noise, "GaussianDropout": noise,
    "Flatten": flatten, "Reshape": simple(("target_shape",)), "Permute": simple(("dims",)),
    "RepeatVector": simple(("n",)), "ZeroPadding2D": simple(("padding", "data_format")),
    "Cropping2D": simple(("cropping", "data_format")), "UpSampling2D": upsampling,
    "Concatenate": simple(("axis",)), "Add": simple(), "Multiply": simple(), "Average": simple(),
    "Maximum": simple(), "Minimum": simple(),
    "Embedding": embedding, "LSTM": recurrent, "GRU": recurrent, "SimpleRNN": recurrent, "Bidirectional": bidirectional,
    "Activation": activation_layer, "ReLU": relu, "LeakyReLU": leaky_relu, "ELU": elu, "PReLU": prelu, "Softmax": softmax,
    "Rescaling": rescaling, "Normalization": normalization,
}
