"""A copy of a Keras model whose recurrent layers are unrolled: no `While` loop in its graph.

TF.js 4.22 runs a recurrent layer's `While`/TensorList loop on its cpu backend only:
tfjs-backend-wasm fails in its reshape kernel ("Cannot read properties of undefined (reading
'backend')"), and a `Bidirectional` layer's two loops fail on cpu too. With `unroll=True`
Keras writes one cell step per time step instead, plain ops every backend has; that needs the
time dimension to be known, and it grows the graph about linearly with the number of steps.

    unrolled = unrolled_clone(model)        # -> Unrolled(model, layers, kept)
    unrolled.model                          # the clone (same weights), or `model` when nothing unrolls

A GRU, LSTM, SimpleRNN (any `keras.layers.RNN`), or a `Bidirectional` over them, is unrolled
when every call of it sees a static time dimension of at most `max_steps`; otherwise (a `None`
time dimension, a long sequence, an RNN inside another wrapper or a subclassed model, a layer
that does not clone) its loop stays and `kept` says why. The original model is not changed.
"""

from __future__ import annotations

from dataclasses import dataclass, field

MAX_UNROLL_STEPS = 128  # a GRU(32) over 128 steps unrolled: model.json 746 kB (loop: 37), 10 s to convert


@dataclass(frozen=True)
class Unrolled:
    model: object  # the clone with unrolled layers, or the original model when none unrolls
    layers: dict[str, int] = field(default_factory=dict)  # unrolled layer name -> time steps
    kept: dict[str, str] = field(default_factory=dict)  # recurrent layer name -> why its loop stays


def _keras():
    import keras

    return keras


def _is_graph_model(layer) -> bool:
    keras = _keras()
    from keras.src.models.functional import Functional

    return isinstance(layer, (keras.Sequential, Functional))


def _recurrent(layer) -> bool:
    """Whether `layer` is, or holds, a recurrent layer (a loop in its graph)."""
    rnn = _keras().layers.RNN
    flatten = getattr(layer, "_flatten_layers", None)
    sublayers = flatten(include_self=True) if flatten else [layer]
    return any(isinstance(sub, rnn) for sub in sublayers)


def _unrollable(layer) -> bool:
    """A recurrent layer this module knows how to unroll: an RNN, or Bidirectional over RNNs."""
    keras = _keras()
    if isinstance(layer, keras.layers.Bidirectional):
        return isinstance(layer.forward_layer, keras.layers.RNN) and isinstance(layer.backward_layer, keras.layers.RNN)
    return isinstance(layer, keras.layers.RNN)


def _time_steps(layer) -> int | None:
    """The static time dimension every call of `layer` sees, else None (dynamic, differing, unknown)."""
    steps = set()
    for node in getattr(layer, "_inbound_nodes", []):
        args = getattr(node.arguments, "args", ()) or node.input_tensors
        shape = getattr(args[0], "shape", None) if args else None
        if shape is None or len(shape) < 3:
            return None
        steps.add(shape[1])
    return steps.pop() if len(steps) == 1 and None not in steps else None


def _plan(model, max_steps: int, chosen: dict[int, tuple[str, int]], kept: dict[str, str]) -> None:
    for layer in model.layers:
        if _is_graph_model(layer):
            _plan(layer, max_steps, chosen, kept)
            continue
        if not _recurrent(layer):
            continue
        if not _unrollable(layer):
            kept[layer.name] = f"a recurrent layer inside {type(layer).__name__}"
            continue
        steps = _time_steps(layer)
        if steps is None:
            kept[layer.name] = "its time dimension is not static"
        elif steps > max_steps:
            kept[layer.name] = f"{steps} time steps (unrolled up to {max_steps})"
        else:
            chosen[id(layer)] = (layer.name, int(steps))


def _unrolled_config(layer) -> dict:
    config = layer.get_config()
    if isinstance(layer, _keras().layers.Bidirectional):
        for key in ("layer", "backward_layer"):
            if config.get(key):
                config[key] = {**config[key], "config": {**config[key]["config"], "unroll": True}}
    else:
        config["unroll"] = True
    return config


def unrolled_clone(model, max_steps: int = MAX_UNROLL_STEPS) -> Unrolled:
    """`model`'s recurrent layers unrolled where their time dimension allows it (see the module
    docstring); the weights are the model's own values, copied."""
    if not _recurrent(model):
        return Unrolled(model)
    if not _is_graph_model(model):  # a subclassed model: nothing to clone it from
        return Unrolled(model, kept={model.name: "a subclassed model (no layer graph to clone)"})
    chosen: dict[int, tuple[str, int]] = {}
    kept: dict[str, str] = {}
    _plan(model, max_steps, chosen, kept)
    if not chosen:
        return Unrolled(model, kept=kept)

    def clone_layer(layer):
        config = _unrolled_config(layer) if id(layer) in chosen else layer.get_config()
        return layer.__class__.from_config(config)

    keras = _keras()
    try:
        clone = keras.models.clone_model(model, clone_function=clone_layer, recursive=True)
        clone.set_weights(model.get_weights())
    except Exception as err:  # a custom layer whose config does not rebuild it: keep the loops
        why = f"the model does not clone ({type(err).__name__}: {str(err).strip()[:200]})"
        return Unrolled(model, kept={**kept, **{name: why for name, _ in chosen.values()}})
    return Unrolled(clone, dict(chosen.values()), kept)
