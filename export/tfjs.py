"""Keras 3 → TensorFlow.js LayersModel (`model.json` + weight shards) that `@tensorflow/tfjs` 4.22 loads.

The stock `tensorflowjs` converter writes the Keras 3 topology as is (`batch_shape`, DTypePolicy
objects, `__keras_tensor__` inbound nodes), which TF.js refuses to load. This module writes the
topology itself, in the Keras 2 / tfjs-layers format TF.js reads: it walks the model's graph
(flattening nested models into the outer graph), translates every layer with
`export.tfjs_layers` (refusing, before anything is written, any layer TF.js cannot compute
exactly), and writes the weights with the converter's shard format (`export.tfjs_weights`).

    check_tfjs_support(model)                    # raises UnsupportedLayer naming the layer
    write_tfjs(model, out_dir, quantize=None)    # -> [out_dir/model.json, out_dir/group1-shard1of1.bin, ...]
    write_tfjs_any(model, out_dir, quantize=None)  # -> TfjsWritten(kind="layers"|"graph", folder, files, reason)
    model_kind(out_dir)                          # -> "layers" | "graph" (from model.json's "format")

`write_tfjs_any` is the one entry point for every TF.js format: a LayersModel when this module
can express the model (it trains in TF.js), else a graph model through the stock converter
(`export.tfjs_graph`: inference only), else `TfjsUnsupported` naming the layer and the op.

A Sequential model whose layers form a chain is written as a TF.js `Sequential`; everything else
(functional models, multi-input/-output, shared layers) as a `Functional` graph. Keras 3 layers
TF.js lacks but can express exactly are rewritten (`Normalization` → two frozen `Dense` layers,
shift then diagonal scale; per-feature `Rescaling` → a frozen diagonal `Dense`;
`ReLU(negative_slope=a)` → `LeakyReLU`); see `export.tfjs_layers`.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from core.errors import InvalidInput

from .tfjs_graph import TfjsUnsupported, graph_ops, write_tfjs_graph
from .tfjs_layers import TRANSLATORS, Refuse, TfjsLayer, input_layer
from .tfjs_weights import QUANTIZE_CHOICES, WeightEntry, write_shards

SUPPORTED_LAYERS = tuple(TRANSLATORS)
MODEL_JSON = "model.json"
# Format names (store artifacts, manifests): the format → the weight quantization it carries.
# tfjs-layers is always a LayersModel, tfjs-graph always a graph model; the quantized formats
# are whichever kind the model gets (layers when possible), as their model.json says.
TFJS_FORMATS = {"tfjs-layers": None, "tfjs-graph": None, "tfjs-float16": "float16", "tfjs-uint8": "uint8"}
KINDS = {"layers-model": "layers", "graph-model": "graph"}  # model.json "format" → kind
_SHARD_NAME = re.compile(r"^group\d+-shard\d+of\d+\.bin$")


class UnsupportedLayer(InvalidInput):
    """A layer TF.js cannot run (or not with these options): named, with the reason."""

    def __init__(self, layer_name: str, class_name: str, reason: str):
        self.layer_name = layer_name
        self.class_name = class_name
        self.reason = reason
        super().__init__(f"layer {layer_name!r} ({class_name}) {reason}")


def _pollinate_version() -> str:
    try:
        from importlib.metadata import version

        return version("pollinate")
    except Exception:  # not installed (running from a checkout)
        return "0.0.0+unknown"


@dataclass(frozen=True)
class _Ref:
    """One tensor of the TF.js graph: output `tensor` of call `node` of layer `layer`."""

    layer: str
    node: int
    tensor: int
    shape: tuple


@dataclass
class _Entry:
    layer: TfjsLayer
    inbound_nodes: list = field(default_factory=list)

    @property
    def name(self) -> str:
        return self.layer.config["name"]


@dataclass
class TfjsTopology:
    """What `write_tfjs` writes, computed before anything touches the disk."""

    model_config: dict
    weights: list[WeightEntry]


class _GraphBuilder:
    def __init__(self):
        self.entries: list[_Entry] = []
        self._by_layer: dict[int, object] = {}  # id(Keras layer) -> its _Entry (input) or list of _Entry
        self._names: set[str] = set()

    # -- naming: keep Keras names; a nested model's layer that clashes gets the model's name as prefix
    def _unique(self, name: str, scope: str) -> str:
        candidates = [name] + ([f"{scope}_{name}"] if scope else [])
        for candidate in candidates:
            if candidate not in self._names:
                break
        else:
            i = 1
            while f"{candidates[-1]}_{i}" in self._names:
                i += 1
            candidate = f"{candidates[-1]}_{i}"
        self._names.add(candidate)
        return candidate

    def add_input(self, keras_tensor) -> _Ref:
        layer = keras_tensor._keras_history.operation
        known = self._by_layer.get(id(layer))
        if known is None:
            name = self._unique(layer.name, "")
            try:
                known = _Entry(input_layer(layer, name))
            except Refuse as err:
                raise UnsupportedLayer(layer.name, "InputLayer", f"cannot be exported to TensorFlow.js: {err}") from None
            self._by_layer[id(layer)] = known
            self.entries.append(known)
        return _Ref(known.name, 0, 0, tuple(layer.batch_shape))

    def call(self, layer, inputs: list[_Ref], output_shapes: list[tuple], scope: str) -> list[_Ref]:
        import keras

        if isinstance(layer, keras.Model):
            return self.walk(layer, inputs, scope=layer.name)
        parts = self._by_layer.get(id(layer))
        if parts is None:
            translated = _translate(layer, self._unique(layer.name, scope), [r.shape for r in inputs])
            parts = [_Entry(t) for t in (translated if isinstance(translated, list) else [translated])]
            for extra in parts[1:]:  # an exact rewrite into a chain of TF.js layers (Normalization)
                _rename(extra.layer, self._unique(extra.name, ""))
            self._by_layer[id(layer)] = parts
            self.entries.extend(parts)
        refs = inputs
        for i, part in enumerate(parts):
            part.inbound_nodes.append([[r.layer, r.node, r.tensor, {}] for r in refs])
            node = len(part.inbound_nodes) - 1
            shapes = output_shapes if i == len(parts) - 1 else [refs[0].shape]
            refs = [_Ref(part.name, node, j, tuple(shape)) for j, shape in enumerate(shapes)]
        return refs

    def walk(self, model, inputs: list[_Ref], *, scope: str = "") -> list[_Ref]:
        """Emit `model`'s layers called on `inputs`; return the refs of its outputs."""
        import keras

        if isinstance(model, keras.Sequential):
            refs = inputs
            for layer in model.layers:
                if len(refs) != 1:
                    raise UnsupportedLayer(layer.name, type(layer).__name__, "follows a layer with several outputs in a Sequential model")
                if not isinstance(layer, keras.Model):
                    _require_supported(layer)  # a custom layer: "no TensorFlow.js equivalent", not Keras' compute_output_shape error
                shapes = [tuple(layer.compute_output_shape(refs[0].shape))] if not isinstance(layer, keras.Model) else []
                refs = self.call(layer, refs, shapes, scope)
            return refs
        nodes_by_depth = getattr(model, "_nodes_by_depth", None)
        if nodes_by_depth is None:
            raise InvalidInput(f"model {model.name!r} is a subclassed Keras model; TF.js export needs a Sequential or functional model")
        known: dict[int, _Ref | object] = {id(t): ref for t, ref in zip(model.inputs, inputs)}
        for depth in sorted(nodes_by_depth, reverse=True):
            for node in nodes_by_depth[depth]:
                if node.is_input:
                    continue
                op = node.operation
                if not isinstance(op, keras.layers.Layer):
                    # A raw keras.ops call. Keras 3 records the mask an Embedding(mask_zero=True)
                    # computes this way (not_equal); TF.js derives masks itself, so such an op
                    # only fails the export if a layer takes its output as a real input.
                    for t in node.outputs:
                        known[id(t)] = op
                    continue
                positional = _check_call(op, node)
                refs = [known[id(t)] for t in positional]
                for ref in refs:
                    if not isinstance(ref, _Ref):
                        _refuse_raw_op(ref)
                out_shapes = [tuple(t.shape) for t in node.outputs]
                for t, ref in zip(node.outputs, self.call(op, refs, out_shapes, scope)):
                    known[id(t)] = ref
        outputs = [known[id(t)] for t in model.outputs]
        for ref in outputs:
            if not isinstance(ref, _Ref):
                _refuse_raw_op(ref)
        return outputs


def _rename(layer: TfjsLayer, name: str) -> None:
    old = layer.config["name"]
    if name != old:
        layer.config["name"] = name
        layer.weights = [WeightEntry(name + w.name[len(old):], w.data, w.quantizable) for w in layer.weights]


def _refuse_raw_op(op):
    raise UnsupportedLayer(getattr(op, "name", "?"), f"keras.ops {type(op).__name__}",
                           "is a raw tensor operation (e.g. `x * 2` or a keras.ops call) inside the model, not a layer; "
                           "TF.js can only run layers: use one (Multiply, Add, Rescaling, Activation, ...) instead")


def _check_call(op, node) -> list:
    """Refuse calls TF.js cannot replay; return the positional input tensors (flat)."""
    import keras

    name, cls = op.name, type(op).__name__
    if not isinstance(op, keras.Model):
        _require_supported(op)
    args, kwargs = node.arguments.args, node.arguments.kwargs
    if len(args) != 1:
        raise UnsupportedLayer(name, cls, "is called with several positional arguments; TF.js layers take one input or a list")
    positional = [t for t in keras.tree.flatten(args) if isinstance(t, keras.KerasTensor)]
    for key, value in kwargs.items():
        tensors = [v for v in keras.tree.flatten(value) if isinstance(v, keras.KerasTensor)]
        if not tensors:
            continue  # training=False and the like
        implicit = [getattr(t, "_keras_mask", None) for t in positional]
        if key == "mask" and all(any(m is t for m in implicit) for t in tensors):
            continue  # the mask Keras propagates by itself; TF.js propagates the same one
        raise UnsupportedLayer(name, cls, f"is called with the tensor argument {key}=...; TF.js export supports only "
                                          "a layer's input (masks from Embedding(mask_zero=True) propagate by themselves)")
    return positional


def _require_supported(layer):
    import keras

    cls = type(layer).__name__
    translator = TRANSLATORS.get(cls)
    if translator is None or type(layer) is not getattr(keras.layers, cls, None):
        raise UnsupportedLayer(layer.name, cls, f"has no TensorFlow.js equivalent; supported: {', '.join(SUPPORTED_LAYERS)}")
    return translator


def _translate(layer, name: str, shapes: list[tuple]) -> TfjsLayer | list[TfjsLayer]:
    cls = type(layer).__name__
    translator = _require_supported(layer)
    try:
        return translator(layer, name, layer.get_config(), shapes)
    except Refuse as err:
        raise UnsupportedLayer(layer.name, cls, f"cannot be exported to TensorFlow.js: {err}") from None


def _model_inputs(model) -> list:
    import keras

    if not isinstance(model, keras.Model):
        raise InvalidInput(f"expected a Keras model, got {type(model).__name__}")
    if not isinstance(model, keras.Sequential) and getattr(model, "_nodes_by_depth", None) is None:
        raise InvalidInput(f"model {model.name!r} ({type(model).__name__}) is a subclassed Keras model; "
                           "TF.js export needs a Sequential or functional model")
    try:
        inputs = list(model.inputs or [])
    except (AttributeError, ValueError):
        inputs = []
    if not inputs:
        raise InvalidInput(f"model {model.name!r} has no defined inputs; build it with keras.Input(shape=...) first")
    return inputs


def build_topology(model) -> TfjsTopology:
    """Translate `model` into the tfjs-layers `model_config` and its named weights (nothing written)."""
    import keras

    builder = _GraphBuilder()
    inputs = [builder.add_input(t) for t in _model_inputs(model)]
    outputs = builder.walk(model, inputs)
    weights = [w for entry in builder.entries for w in entry.layer.weights]
    names = [w.name for w in weights]
    if len(set(names)) != len(names):
        raise InvalidInput(f"model {model.name!r} has duplicate weight names; give its layers unique names")

    entries = builder.entries
    chain = (
        isinstance(model, keras.Sequential) and len(inputs) == 1 and len(outputs) == 1
        and all(len(e.inbound_nodes) == 1 and len(e.inbound_nodes[0]) == 1
                and e.inbound_nodes[0][0][:3] == [prev.name, 0, 0] for prev, e in zip(entries, entries[1:]))
        and outputs[0].layer == entries[-1].name
    )
    if chain:
        layers = [{"class_name": e.layer.class_name, "config": e.layer.config} for e in entries]
        config = {"class_name": "Sequential", "config": {"name": model.name, "layers": layers}}
    else:
        layers = [{"class_name": e.layer.class_name, "config": e.layer.config, "name": e.name, "inbound_nodes": e.inbound_nodes}
                  for e in entries]
        config = {"class_name": "Functional", "config": {
            "name": model.name, "trainable": bool(model.trainable), "layers": layers,
            "input_layers": [[r.layer, r.node, r.tensor] for r in inputs],
            "output_layers": [[r.layer, r.node, r.tensor] for r in outputs],
        }}
    return TfjsTopology(config, weights)


def check_tfjs_support(model) -> None:
    """Raise `UnsupportedLayer` naming the first layer (in graph order) TF.js cannot run; else None."""
    build_topology(model)


def write_tfjs(model, out_dir, *, quantize: str | None = None) -> list[Path]:
    """Write `out_dir/model.json` and its weight shards; return their paths (model.json first).

    `quantize`: None (float32), "float16" or "uint8" (affine per tensor, as the stock converter;
    TF.js dequantizes on load). Exact rewrites of preprocessing layers stay float32. The whole
    model is translated before the first byte is written, so an unsupported layer leaves
    `out_dir` untouched. Shard files left in `out_dir` by an earlier export are replaced.
    """
    import keras

    if quantize not in QUANTIZE_CHOICES:
        raise InvalidInput(f"quantize must be one of None, 'float16', 'uint8'; got {quantize!r}")
    topology = build_topology(model)
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise InvalidInput(f"{out_dir} exists and is not a directory")
    out_dir.mkdir(parents=True, exist_ok=True)
    for stale in out_dir.iterdir():
        if _SHARD_NAME.match(stale.name) and stale.is_file():
            stale.unlink()
    manifest, shards = write_shards(topology.weights, out_dir, quantize_to=quantize)
    document = {
        "format": "layers-model",
        "generatedBy": f"keras v{keras.__version__}",
        "convertedBy": f"Pollinate v{_pollinate_version()} (export.tfjs)",
        "modelTopology": {"keras_version": keras.__version__, "backend": keras.backend.backend(),
                          "model_config": topology.model_config},
        "weightsManifest": manifest,
    }
    model_json = out_dir / MODEL_JSON
    tmp = model_json.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(document, allow_nan=False))
    tmp.replace(model_json)
    return [model_json, *shards]


@dataclass(frozen=True)
class TfjsWritten:
    """What `write_tfjs_any` wrote."""

    kind: str  # "layers" (tf.loadLayersModel; trains) | "graph" (tf.loadGraphModel; inference only)
    folder: Path
    files: list[Path]  # model.json first, then the weight shards
    reason: str | None = None  # why not a LayersModel (the refused layer), when kind == "graph"
    quantize: str | None = None

    @property
    def model_json(self) -> Path:
        return self.folder / MODEL_JSON


def write_tfjs_any(model, out_dir, *, quantize: str | None = None, kind: str | None = None) -> TfjsWritten:
    """Write `model` to TF.js in `out_dir`: a LayersModel when the translator can express it,
    else a graph model; `kind="layers"` or `"graph"` forces one (tfjs-layers / tfjs-graph).

    Raises `UnsupportedLayer` (kind="layers"), `TfjsUnsupported` (an op TF.js has no kernel for,
    naming it, and the layer that ruled out a LayersModel), `InvalidInput` (bad arguments, a
    subclassed model). A refused model leaves `out_dir`'s previous contents alone."""
    if quantize not in QUANTIZE_CHOICES:
        raise InvalidInput(f"quantize must be one of None, 'float16', 'uint8'; got {quantize!r}")
    if kind not in (None, "layers", "graph"):
        raise InvalidInput(f"kind must be None, 'layers' or 'graph'; got {kind!r}")
    out_dir = Path(out_dir)
    reason = None
    if kind != "graph":
        try:
            build_topology(model)
        except UnsupportedLayer as err:
            if kind == "layers":
                raise
            reason = str(err)
        else:
            files = write_tfjs(model, out_dir, quantize=quantize)
            return TfjsWritten("layers", out_dir, files, None, quantize)
    else:
        _model_inputs(model)
    try:
        files = write_tfjs_graph(model, out_dir, quantize=quantize)
    except TfjsUnsupported as err:
        raise TfjsUnsupported(err.ops, reason) from None
    return TfjsWritten("graph", out_dir, files, reason or "graph model requested", quantize)


def tfjs_support(model) -> str:
    """"layers" or "graph": the kind `write_tfjs_any` would write, without converting anything
    (a graph model's ops are only known once converted: `write_tfjs_any` may still refuse)."""
    try:
        build_topology(model)
    except UnsupportedLayer:
        _model_inputs(model)
        return "graph"
    return "layers"


def model_kind(folder) -> str:
    """"layers" or "graph" for a TF.js model folder (or its model.json), from model.json's `format`."""
    path = Path(folder)
    path = path / MODEL_JSON if path.is_dir() else path
    try:
        document = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise InvalidInput(f"{path} is not a readable TF.js model.json: {err}") from None
    fmt = document.get("format") if isinstance(document, dict) else None
    if fmt in KINDS:
        return KINDS[fmt]
    topology = document.get("modelTopology") if isinstance(document, dict) else None
    if isinstance(topology, dict) and "node" in topology:
        return "graph"
    if isinstance(topology, dict) and ("model_config" in topology or "class_name" in topology):
        return "layers"
    raise InvalidInput(f"{path} is neither a TF.js layers model nor a graph model (format {fmt!r})")


__all__ = [
    "KINDS", "MODEL_JSON", "SUPPORTED_LAYERS", "TFJS_FORMATS", "TfjsUnsupported", "TfjsWritten", "UnsupportedLayer",
    "build_topology", "check_tfjs_support", "graph_ops", "model_kind", "tfjs_support", "write_tfjs", "write_tfjs_any",
    "write_tfjs_graph",
]
