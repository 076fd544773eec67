"""Keras 3 → TensorFlow.js *graph model* (`model.json` with a TF GraphDef + weight shards).

For the models a tfjs-layers LayersModel cannot express (GRU with `reset_after=True`,
`MultiHeadAttention`, causal `Conv1D`, `hard_silu`, any layer `export.tfjs_layers` does not
know): the Keras model is exported as a SavedModel with a batch-free input signature
(`model.export(..., format="tf_saved_model")`), and the stock `tensorflowjs` converter turns
that into a graph model that `tf.loadGraphModel` runs (inference only: a graph model does not
train in TF.js). `control_flow_v2=True` keeps recurrent layers' `While` loops as they are
(TensorList ops TF.js implements), which is what makes GRU/LSTM convert. Such a loop runs on
TF.js' cpu backend only (wasm fails in it, a Bidirectional's on cpu too), so a recurrent layer
whose time dimension is static (at most 128 steps) is converted from a clone with
`unroll=True` (`export.unroll`): no loop, every backend; model.json grows with the steps
(GRU(32) over 20 steps, measured: 37 -> 121 kB, conversion 0.5 -> 1.8 s, the weights stay
16 kB as identical constants share one weight; TF.js cpu 14.5 -> 7.4 ms a batch of 16).

    write_tfjs_graph(model, out_dir, quantize=None)   # -> [out_dir/model.json, shards...]
    graph_ops(out_dir / "model.json")                 # the TF ops the graph runs

An op TF.js has no kernel for (exact GELU's `Erfc`, ...) makes the converter refuse the model;
that becomes `TfjsUnsupported` naming the op(s). Nothing is left in `out_dir` then.

The converter is imported lazily and in-process: `import tensorflowjs` costs about 0.4 s once
TensorFlow is loaded (it pulls in TF Decision Forests, JAX and Flax, whose banner goes to
stdout unless told not to: it is, and the import and the conversion run with stdout captured: `--json` output stays clean).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shutil
import tempfile
import threading
from pathlib import Path

from core.errors import InvalidInput, PollinateError

from .unroll import MAX_UNROLL_STEPS, Unrolled, unrolled_clone

MODEL_JSON = "model.json"
QUANTIZE_CHOICES = (None, "float16", "uint8")
_SHARD_NAME = re.compile(r"^group\d+-shard\d+of\d+\.bin$")
_UNSUPPORTED = re.compile(r"Unsupported Ops in the model(?: before| after)? optimization\s*(.*)", re.S)
_convert_lock = threading.Lock()  # the converter builds TF1-style graphs: one conversion at a time


class TfjsUnsupported(InvalidInput):
    """Neither TF.js path can run the model: `ops` are the TF ops TensorFlow.js has no kernel for;
    `layer_reason` (when the LayersModel path was tried first) why no LayersModel either."""

    def __init__(self, ops: list[str], layer_reason: str | None = None):
        self.ops = list(ops)
        self.layer_reason = layer_reason
        names = ", ".join(self.ops) or "?"
        message = f"TensorFlow.js has no op {names} (used by this model): TF.js export refused"
        if layer_reason:
            message += f"; no LayersModel either: {layer_reason}"
        super().__init__(message)


def _converter():
    """`tensorflowjs`' SavedModel converter, imported once, quietly."""
    from core.tensorflow import import_tensorflow

    import_tensorflow()
    # TF Decision Forests prints a banner on import (and, with stdout redirected, would think it
    # runs in a notebook and import IPython): its own switch turns it off.
    os.environ.setdefault("TFDF_DISABLE_WELCOME_MESSAGE", "1")
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            from tensorflowjs.converters import tf_saved_model_conversion_v2
    except ImportError as exc:  # a plain `pip install pollinate`: tfjs-graph is refused, the rest goes on
        raise PollinateError(
            f"TF.js graph models need the tensorflowjs converter ({exc}): pip install \"pollinate[converter]\" "
            "and then pip install --no-deps tensorflowjs==4.22.0"
        ) from exc
    return tf_saved_model_conversion_v2


def _signature(model):
    import tensorflow as tf

    specs = []
    for i, tensor in enumerate(model.inputs):
        dtype = tensor.dtype if isinstance(tensor.dtype, str) else getattr(tensor.dtype, "name", "float32")
        specs.append(tf.TensorSpec([None, *tensor.shape[1:]], dtype or "float32", name=f"input_{i}"))
    return [specs[0]] if len(specs) == 1 else [specs]


def save_model(model, saved_model_dir) -> Path:
    """`model` as a SavedModel with a `serving_default` signature over batch-free inputs."""
    from .tfjs import _model_inputs  # the same "is this a model with inputs" checks as the LayersModel path

    _model_inputs(model)
    saved_model_dir = Path(saved_model_dir)
    model.export(str(saved_model_dir), format="tf_saved_model", input_signature=_signature(model), verbose=False)
    return saved_model_dir


def _quantization_map(quantize: str | None) -> dict | None:
    if quantize not in QUANTIZE_CHOICES:
        raise InvalidInput(f"quantize must be one of None, 'float16', 'uint8'; got {quantize!r}")
    return None if quantize is None else {quantize: True}


def _unsupported_ops(message: str) -> list[str] | None:
    match = _UNSUPPORTED.search(message)
    if not match:
        return None
    return sorted({op for op in re.split(r"[\s,]+", match.group(1).strip()) if re.fullmatch(r"[A-Za-z_][\w>]*", op)})


def convert_saved_model(saved_model_dir, out_dir, *, quantize: str | None = None, note: str | None = None) -> list[Path]:
    """SavedModel → graph model in `out_dir` (replacing shards left by an earlier export).

    Converts into a temporary folder first, so a refused model leaves `out_dir` as it was.
    `note` (what was done to the model first) is appended to model.json's `convertedBy`."""
    qmap = _quantization_map(quantize)
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise InvalidInput(f"{out_dir} exists and is not a directory")
    converter = _converter()
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".tfjs-graph-", dir=out_dir) as tmp, _convert_lock:
        staging = Path(tmp) / "model"
        try:
            with contextlib.redirect_stdout(io.StringIO()):
                converter.convert_tf_saved_model(
                    str(saved_model_dir), str(staging), quantization_dtype_map=qmap, control_flow_v2=True,
                    strip_debug_ops=True, weight_shard_size_bytes=4 * 1024 * 1024,
                )
        except ValueError as err:
            ops = _unsupported_ops(str(err))
            if ops is not None:
                raise TfjsUnsupported(ops) from None
            raise PollinateError(f"the TF.js graph converter failed: {str(err).strip().splitlines()[0]}") from None
        except Exception as err:  # the converter's own failures (grappler, unknown signatures, ...)
            first = (str(err).strip().splitlines() or [type(err).__name__])[0]
            raise PollinateError(f"the TF.js graph converter failed: {type(err).__name__}: {first[:300]}") from None
        document = json.loads((staging / MODEL_JSON).read_text())
        _fix_fused_ops(document, staging)
        _dedupe_constants(document, staging)
        document["convertedBy"] = f"{document.get('convertedBy') or 'TensorFlow.js Converter'} via Pollinate (export.tfjs_graph{'; ' + note if note else ''})"
        (staging / MODEL_JSON).write_text(json.dumps(document))
        for stale in out_dir.iterdir():
            if stale.is_file() and (_SHARD_NAME.match(stale.name) or stale.name == MODEL_JSON):
                stale.unlink()
        written = []
        shards = [p for group in document.get("weightsManifest", []) for p in group["paths"]]
        for name in shards:
            shutil.move(staging / name, out_dir / name)
            written.append(out_dir / name)
        shutil.move(staging / MODEL_JSON, out_dir / MODEL_JSON)
    return [out_dir / MODEL_JSON, *written]


_ELEMENT_BYTES = {"float32": 4, "int32": 4, "float16": 2, "uint8": 1, "bool": 1}
_CONV_OPS = {"_FusedConv2D", "FusedConv2D", "FusedDepthwiseConv2dNative", "_FusedMatMul"}
_HARD_SWISH = "_FusedHardSwish"
_FUSABLE_ACTIVATIONS = {"Relu", "Relu6", "Elu", "Sigmoid", "LeakyRelu", "Prelu"}  # TF.js fuses these (not Tanh)


def _spec_bytes(spec: dict) -> int:
    dtype = (spec.get("quantization") or {}).get("dtype") or spec["dtype"]
    count = 1
    for d in spec["shape"]:
        count *= int(d)
    return count * _ELEMENT_BYTES[dtype]


class _Weights:
    """A graph model's weights as (spec, bytes) per group, edited and written back as shards."""

    def __init__(self, document: dict, folder: Path):
        self.document, self.folder = document, folder
        self.groups: list[list[list]] = []
        self.where: dict[str, tuple[int, int]] = {}
        for g, group in enumerate(document.get("weightsManifest", [])):
            data = b"".join((folder / path).read_bytes() for path in group["paths"])
            entries, at = [], 0
            for spec in group["weights"]:
                size = _spec_bytes(spec)
                self.where[spec["name"]] = (g, len(entries))
                entries.append([spec, data[at:at + size]])
                at += size
            self.groups.append(entries)
        self.changed = False

    def spec(self, name: str) -> dict | None:
        at = self.where.get(name)
        return None if at is None else self.groups[at[0]][at[1]][0]

    def data(self, name: str) -> bytes:
        g, i = self.where[name]
        return self.groups[g][i][1]

    def add(self, spec: dict, data: bytes) -> None:
        if spec["name"] in self.where:
            return
        if not self.groups:
            self.groups.append([])
            self.document.setdefault("weightsManifest", []).append({"paths": [], "weights": []})
        self.where[spec["name"]] = (0, len(self.groups[0]))
        self.groups[0].append([spec, data])
        self.changed = True

    def drop(self, names: set[str]) -> None:
        self.groups = [[entry for entry in entries if entry[0]["name"] not in names] for entries in self.groups]
        self.where = {spec["name"]: (g, i) for g, entries in enumerate(self.groups) for i, (spec, _) in enumerate(entries)}
        self.changed = True

    def write(self, shard_bytes: int = 4 * 1024 * 1024) -> None:
        if not self.changed:
            return
        for g, (group, entries) in enumerate(zip(self.document["weightsManifest"], self.groups)):
            for path in group["paths"]:
                (self.folder / path).unlink(missing_ok=True)
            payload = b"".join(data for _, data in entries)
            count = -(-len(payload) // shard_bytes)
            group["weights"] = [spec for spec, _ in entries]
            group["paths"] = [f"group{g + 1}-shard{i + 1}of{count}.bin" for i in range(count)]
            for i, path in enumerate(group["paths"]):
                (self.folder / path).write_bytes(payload[i * shard_bytes:(i + 1) * shard_bytes])


def _nodes(document: dict) -> list[list[dict]]:
    topology = document.get("modelTopology") or {}
    lists = [topology.setdefault("node", [])]
    lists.extend(function.setdefault("nodeDef", []) for function in (topology.get("library") or {}).get("function", []))
    return lists


def _fused_ops(node: dict) -> list[str]:
    import base64

    return [base64.b64decode(v).decode() for v in ((node.get("attr") or {}).get("fused_ops") or {}).get("list", {}).get("s", [])]


def _set_fused_ops(node: dict, ops: list[str]) -> None:
    import base64

    node["attr"]["fused_ops"] = {"list": {"s": [base64.b64encode(op.encode()).decode() for op in ops]}}


def _scalar_const(weights: _Weights, nodes: list[dict], name: str, value: float) -> str:
    import numpy as np

    if weights.spec(name) is None:
        weights.add({"name": name, "shape": [], "dtype": "float32"}, np.float32(value).tobytes())
    if not any(n.get("name") == name for n in nodes):
        nodes.append({"name": name, "op": "Const", "attr": {
            "value": {"tensor": {"dtype": "DT_FLOAT", "tensorShape": {}}}, "dtype": {"type": "DT_FLOAT"}}})
    return name


def _output_channels(node: dict, weights: _Weights) -> int | None:
    inputs = [i.split(":")[0] for i in node.get("input", [])]
    kernel = weights.spec(inputs[1]) if len(inputs) > 1 else None
    if kernel is None:
        return None
    shape = kernel["shape"]
    if node["op"] == "_FusedMatMul":
        return int(shape[0 if (node.get("attr", {}).get("transpose_b") or {}).get("b") else 1]) if len(shape) == 2 else None
    if len(shape) != 4:
        return None
    return int(shape[2]) * int(shape[3]) if node["op"] == "FusedDepthwiseConv2dNative" else int(shape[3])


def _fix_fused_ops(document: dict, folder: Path) -> None:
    """Make the converter's fused convolutions runnable on every TF.js backend.

    - TF 2.19's grappler fuses MobileNetV3's hard-swish into the convolution
      (`fused_ops: [BiasAdd, _FusedHardSwish]`), an activation TF.js has no kernel for: the
      activation is split off again as `x * relu6(x + 3) * (1/6)` (the ops Keras computes).
    - It also folds a scalar addition into a fused op's bias (hard-sigmoid's `+ 3`): TF.js' cpu
      backend broadcasts it, wasm refuses ("FusedConv2D only supports rank-1 bias but got rank
      0"): such a bias becomes a per-channel copy (the same bytes, so quantized weights stay exact).
    """
    weights = _Weights(document, folder)
    for nodes in _nodes(document):
        for node in list(nodes):
            if node.get("op") not in _CONV_OPS:
                continue
            ops = _fused_ops(node)
            inputs = node.get("input", [])
            if ops[:1] == ["BiasAdd"] and len(inputs) > 2:
                bias = weights.spec(inputs[2].split(":")[0])
                channels = _output_channels(node, weights)
                if bias is not None and bias["shape"] == [] and channels:
                    name = f"{bias['name']}/per_channel_{channels}"
                    weights.add({**bias, "name": name, "shape": [channels]}, weights.data(bias["name"]) * channels)
                    _scalar_const_node(nodes, name, [channels], bias["dtype"])
                    inputs[2] = name
                    weights.changed = True
            if ops and ops[-1] == _HARD_SWISH:
                _set_fused_ops(node, ops[:-1])
                name = node["name"]
                inner = node["name"] = f"{name}/pollinate_conv"
                three = _scalar_const(weights, nodes, "pollinate/hard_swish/three", 3.0)
                sixth = _scalar_const(weights, nodes, "pollinate/hard_swish/one_sixth", 1.0 / 6.0)
                t = {"T": {"type": "DT_FLOAT"}}
                nodes.extend([
                    {"name": f"{name}/pollinate_add", "op": "AddV2", "input": [inner, three], "attr": dict(t)},
                    {"name": f"{name}/pollinate_relu6", "op": "Relu6", "input": [f"{name}/pollinate_add"], "attr": dict(t)},
                    {"name": f"{name}/pollinate_mul", "op": "Mul", "input": [inner, f"{name}/pollinate_relu6"], "attr": dict(t)},
                    {"name": name, "op": "Mul", "input": [f"{name}/pollinate_mul", sixth], "attr": dict(t)},
                ])
                weights.changed = True
                continue
            if node["op"] == "_FusedMatMul" and ops[:1] == ["BiasAdd"] and len(inputs) > 2 and not _vector(weights, inputs[2]):
                _unfuse_matmul(node, nodes, ops)
                weights.changed = True
            elif len(ops) == 2 and ops[0] == "BiasAdd" and ops[1] not in _FUSABLE_ACTIVATIONS:
                _set_fused_ops(node, ops[:1])
                name = node["name"]
                node["name"] = f"{name}/pollinate_fused"
                nodes.append(_activation_node(name, ops[1], node["name"], [], node.get("attr") or {}))
                weights.changed = True
    weights.write()


def _vector(weights: _Weights, tensor: str) -> bool:
    spec = weights.spec(tensor.split(":")[0])
    return spec is not None and len(spec["shape"]) == 1


def _activation_node(name: str, op: str, x: str, extra: list[str], fused_attr: dict) -> dict:
    node = {"name": name, "op": op, "input": [x], "attr": {"T": fused_attr.get("T") or {"type": "DT_FLOAT"}}}
    if op == "LeakyRelu":
        node["attr"]["alpha"] = fused_attr.get("leakyrelu_alpha") or {"f": 0.2}
    elif op == "Prelu":
        node["input"].extend(extra[:1])
    return node


def _unfuse_matmul(node: dict, nodes: list[dict], ops: list[str]) -> None:
    """`_FusedMatMul` whose "bias" is a computed tensor → `MatMul` + `AddV2` (+ the activation)."""
    name, attr = node["name"], node.get("attr") or {}
    data = [i for i in node.get("input", []) if not i.startswith("^")]
    control = [i for i in node.get("input", []) if i.startswith("^")]
    matmul = f"{name}/pollinate_matmul"
    node.update(name=matmul, op="MatMul", input=[*data[:2], *control],
                attr={k: v for k, v in attr.items() if k in ("T", "transpose_a", "transpose_b")})
    added = f"{name}/pollinate_bias" if len(ops) > 1 else name
    nodes.append({"name": added, "op": "AddV2", "input": [matmul, data[2]], "attr": {"T": attr.get("T") or {"type": "DT_FLOAT"}}})
    if len(ops) > 1:
        nodes.append(_activation_node(name, ops[1], added, data[3:], attr))


def _dedupe_constants(document: dict, folder: Path) -> None:
    """One weight for identical constants of the main graph (same dtype, shape, quantization, bytes).

    Each step of an unrolled recurrent layer reads its kernels again; frozen, every read is a
    Const of its own, and the shards would hold the kernels once per time step."""
    topology = document.get("modelTopology") or {}
    if document.get("modelInitializer"):
        return
    weights = _Weights(document, folder)
    nodes = topology.get("node", [])
    first: dict[tuple, str] = {}
    renamed: dict[str, str] = {}
    for node in nodes:
        name = node.get("name")
        spec = weights.spec(name) if node.get("op") == "Const" else None
        if spec is None:
            continue
        key = (json.dumps({k: v for k, v in spec.items() if k != "name"}, sort_keys=True), weights.data(name))
        if key in first:
            renamed[name] = first[key]
        else:
            first[key] = name
    if not renamed:
        return
    topology["node"] = [node for node in nodes if node.get("name") not in renamed]
    for node in topology["node"]:
        if "input" in node:
            node["input"] = [_renamed_input(i, renamed) for i in node["input"]]
    weights.drop(set(renamed))
    weights.write()


def _renamed_input(tensor: str, renamed: dict[str, str]) -> str:
    control = tensor.startswith("^")
    base, colon, port = tensor.lstrip("^").partition(":")
    if base not in renamed:
        return tensor
    return f"{'^' if control else ''}{renamed[base]}{colon}{port}"


def _scalar_const_node(nodes: list[dict], name: str, shape: list[int], dtype: str) -> None:
    if any(n.get("name") == name for n in nodes):
        return
    tf_dtype = {"float32": "DT_FLOAT", "int32": "DT_INT32"}.get(dtype, "DT_FLOAT")
    nodes.append({"name": name, "op": "Const", "attr": {
        "value": {"tensor": {"dtype": tf_dtype, "tensorShape": {"dim": [{"size": str(d)} for d in shape]}}},
        "dtype": {"type": tf_dtype}}})


def write_tfjs_graph(model, out_dir, *, quantize: str | None = None,
                     max_unroll_steps: int = MAX_UNROLL_STEPS) -> list[Path]:
    """Write `model` as a TF.js graph model: `out_dir/model.json` + shards; return their paths
    (model.json first). `quantize`: None (float32 weights), "float16" or "uint8" (the converter's
    weight quantization; TF.js dequantizes on load). Raises `TfjsUnsupported` naming the ops
    TF.js lacks (nothing written), `InvalidInput` for a model without defined inputs.

    Recurrent layers over at most `max_unroll_steps` static time steps are converted unrolled
    (`export.unroll`: no `While` loop, so the wasm backend runs them too; 0 keeps every loop);
    should the unrolled copy fail to save or convert, the model is converted as it is."""
    _quantization_map(quantize)
    from .tfjs import _model_inputs

    _model_inputs(model)
    unrolled = unrolled_clone(model, max_unroll_steps) if max_unroll_steps > 0 else Unrolled(model)
    if unrolled.layers:
        note = "unrolled " + ", ".join(f"{name} ({steps} steps)" for name, steps in unrolled.layers.items())
        try:
            return _write(unrolled.model, out_dir, quantize, note)
        except TfjsUnsupported:
            raise  # the loop version uses the same ops (and the loop's)
        except Exception:  # the loop version is the fallback: it reports its own failure
            pass
    return _write(model, out_dir, quantize, None)


def _write(model, out_dir, quantize: str | None, note: str | None) -> list[Path]:
    with tempfile.TemporaryDirectory(prefix="pollinate-savedmodel-") as tmp:
        saved = save_model(model, Path(tmp) / "saved_model")
        return convert_saved_model(saved, out_dir, quantize=quantize, note=note)


def graph_ops(model_json) -> list[str]:
    """The TF ops a graph model's model.json runs (its main graph and its functions), sorted."""
    document = json.loads(Path(model_json).read_text()) if not isinstance(model_json, dict) else model_json
    topology = document.get("modelTopology") or {}
    ops = {node.get("op") for node in topology.get("node", [])}
    for function in (topology.get("library") or {}).get("function", []):
        ops.update(node.get("op") for node in function.get("nodeDef", []))
    return sorted(op for op in ops if op)
